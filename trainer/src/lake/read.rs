//! Training from the lake: the events of a location in time order, hour
//! folders one after another, each downloaded in the background (one ahead)
//! and merged by time across its parts with the trainer's file reader.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, sync_channel};

use cartscore_core::Event;

use super::client::{Lake, LakeError};
use crate::files::{MergedEvents, ReadStats};

/// The events of a lake location in time order: hour folders one after
/// another, each downloaded (in the background, one ahead) and merged by
/// time across its parts with the same reader as local files.
pub struct LakeEvents {
    hours: Receiver<Result<(String, PathBuf), LakeError>>,
    current: Option<(String, PathBuf, MergedEvents)>,
    stats: ReadStats,
    budget: f64,
    _scratch: tempfile::TempDir,
}

impl std::fmt::Debug for LakeEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeEvents")
            .field("files", &self.stats.files)
            .finish_non_exhaustive()
    }
}

impl LakeEvents {
    /// `s3://bucket/events/…`: every `.parquet` object under that prefix.
    pub fn open(url: &str, budget: f64) -> Result<Self, LakeError> {
        let lake = Lake::open(url)?;
        let prefix = lake.key("");
        let prefix = prefix.trim_end_matches('/');
        let keys: Vec<String> = lake
            .list(prefix)?
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.ends_with(".parquet"))
            .collect();
        if keys.is_empty() {
            return Err(LakeError::Empty { url: url.into() });
        }
        let mut by_hour: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for key in keys {
            let folder = key.rsplit_once('/').map_or("", |(f, _)| f).to_owned();
            by_hour.entry(folder).or_default().push(key);
        }
        let scratch = tempfile::tempdir().map_err(|e| LakeError::Read {
            path: std::env::temp_dir(),
            reason: e.to_string(),
        })?;
        let root = scratch.path().to_path_buf();
        let (tx, rx) = sync_channel(1);
        std::thread::Builder::new()
            .name("lake-reader".into())
            .spawn(move || {
                for (n, (folder, keys)) in by_hour.into_iter().enumerate() {
                    let dir = root.join(format!("{n:06}"));
                    let fetched = std::fs::create_dir_all(&dir)
                        .map_err(|e| LakeError::Read {
                            path: dir.clone(),
                            reason: e.to_string(),
                        })
                        .and_then(|()| {
                            keys.iter().try_for_each(|key| {
                                let name = key.rsplit_once('/').map_or(key.as_str(), |(_, n)| n);
                                lake.download(key, &dir.join(name))
                            })
                        });
                    let stop = fetched.is_err();
                    if tx.send(fetched.map(|()| (lake.url(&folder), dir))).is_err() || stop {
                        return;
                    }
                }
            })
            .map_err(|e| LakeError::Read {
                path: "lake-reader thread".into(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            hours: rx,
            current: None,
            stats: ReadStats::default(),
            budget,
            _scratch: scratch,
        })
    }

    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    pub fn next_event(&mut self) -> Result<Option<Event>, LakeError> {
        loop {
            if let Some((_, _, merged)) = self.current.as_mut() {
                if let Some(event) = merged.next_event()? {
                    return Ok(Some(event));
                }
                if let Some((folder, dir, merged)) = self.current.take() {
                    let mut found = merged.stats;
                    found.files = vec![folder];
                    self.stats.absorb(found);
                    // Done with this hour: free its disk before the next one.
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
            match self.hours.recv() {
                Ok(hour) => {
                    let (folder, dir) = hour?;
                    let merged = MergedEvents::open(std::slice::from_ref(&dir), 1.0)?;
                    self.current = Some((folder, dir, merged));
                }
                Err(_) => {
                    self.stats.check_budget(self.budget, true)?;
                    return Ok(None);
                }
            }
        }
    }
}
