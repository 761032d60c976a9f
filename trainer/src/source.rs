//! Where training events come from: files (the embedded default), the
//! warehouse's silver table, or the lake's Parquet partitions, one kind per
//! run, each replayed in event-time order with its rows accounted the same
//! way (see [`crate::files::ReadStats`]).

use std::path::{Path, PathBuf};

use cartscore_core::Event;

use crate::files::{FilesError, MergedEvents, ReadStats};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error(transparent)]
    Warehouse(#[from] crate::warehouse::WarehouseError),
    #[error(transparent)]
    Lake(#[from] crate::lake::LakeError),
    #[error("cannot mix sources: {0}")]
    Mixed(String),
}

/// Where training events come from: files (the embedded default), the
/// warehouse's silver table, or the lake's Parquet partitions.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    Files(Vec<PathBuf>),
    Postgres(String),
    Lake(String),
}

impl SourceSpec {
    /// `postgres://…` / `postgresql://…`, `s3://bucket/prefix`, or paths;
    /// one kind per run.
    pub fn parse(args: &[String]) -> Result<Self, SourceError> {
        let kind = |a: &str| {
            if a.starts_with("postgres://") || a.starts_with("postgresql://") {
                1
            } else if a.starts_with("s3://") {
                2
            } else {
                0
            }
        };
        match args {
            [one] if kind(one) == 1 => Ok(SourceSpec::Postgres(one.clone())),
            [one] if kind(one) == 2 => Ok(SourceSpec::Lake(one.clone())),
            many if many.iter().all(|a| kind(a) == 0) => {
                Ok(SourceSpec::Files(many.iter().map(PathBuf::from).collect()))
            }
            _ => Err(SourceError::Mixed(format!(
                "{args:?}: give one postgres:// URL, one s3:// URL, or files and folders"
            ))),
        }
    }

    /// For reports and logs: never a password.
    pub fn describe(&self) -> String {
        match self {
            SourceSpec::Files(paths) => paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            SourceSpec::Postgres(url) => {
                format!(
                    "postgres://{} silver.events",
                    crate::warehouse::endpoint_of(url)
                )
            }
            SourceSpec::Lake(url) => url.clone(),
        }
    }
}

/// The valid events of a source, in time order, with what reading found.
#[derive(Debug)]
pub enum Events {
    Files(MergedEvents),
    Warehouse {
        rows: crate::warehouse::WarehouseEvents,
        stats: ReadStats,
        budget: f64,
        last_time: Option<cartscore_core::Timestamp>,
    },
    Lake(crate::lake::read::LakeEvents),
}

impl Events {
    pub fn open(spec: &SourceSpec, error_budget: f64) -> Result<Self, SourceError> {
        Ok(match spec {
            SourceSpec::Files(paths) => Events::Files(MergedEvents::open(paths, error_budget)?),
            SourceSpec::Postgres(url) => {
                let rows = crate::warehouse::WarehouseEvents::open(url)?;
                let stats = ReadStats {
                    files: vec![spec.describe()],
                    ..ReadStats::default()
                };
                Events::Warehouse {
                    rows,
                    stats,
                    budget: error_budget,
                    last_time: None,
                }
            }
            SourceSpec::Lake(url) => {
                Events::Lake(crate::lake::read::LakeEvents::open(url, error_budget)?)
            }
        })
    }

    pub fn next_event(&mut self) -> Result<Option<Event>, SourceError> {
        match self {
            Events::Files(merged) => Ok(merged.next_event()?),
            Events::Lake(lake) => Ok(lake.next_event()?),
            Events::Warehouse {
                rows,
                stats,
                budget,
                last_time,
            } => loop {
                let Some(row) = rows.next_row()? else {
                    stats.check_budget(*budget, true)?;
                    return Ok(None);
                };
                let line = stats.rows + 1;
                match stats.record(row, Path::new("silver.events"), line, last_time) {
                    Some(event) => return Ok(Some(event)),
                    None => stats.check_budget(*budget, false)?,
                }
            },
        }
    }

    pub fn stats(&self) -> &ReadStats {
        match self {
            Events::Files(merged) => &merged.stats,
            Events::Warehouse { stats, .. } => stats,
            Events::Lake(lake) => lake.stats(),
        }
    }
}
