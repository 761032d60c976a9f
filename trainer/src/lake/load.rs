//! Loading CSV files of the data set into the lake: validated events as
//! hourly Parquet under `events/year=/month=/day=/hour=/`, rejects as CSV
//! under `rejects/`, and a checkpoint per source file under `_checkpoints/`.
//!
//! A load writes parts, then moves the file's checkpoint past them. An
//! interrupted load resumes from the checkpoint and writes the same part
//! names with the same rows again, so no row is ever stored twice, and a
//! finished file is skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use arrow_array::builder::{
    Float64Builder, StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use cartscore_core::{CsvEvents, Event, Timestamp};
use chrono::{Datelike, Timelike};
use serde::{Deserialize, Serialize};

use super::client::{Lake, LakeError};

/// How far the load of one source file got; stored as JSON next to the data.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    pub source_file: String,
    pub checksum: String,
    /// The first CSV line (1 = header) not yet stored.
    pub next_line: u64,
    pub rows: u64,
    pub valid: u64,
    pub invalid: u64,
    pub invalid_by_reason: BTreeMap<String, u64>,
    pub parts: Vec<String>,
    pub complete: bool,
}

/// What loading one file into the lake did.
#[derive(Debug, Clone, Serialize)]
pub struct LakeLoad {
    pub file: PathBuf,
    pub checksum: String,
    /// Rows read by this run (0 when the file was already complete).
    pub rows: u64,
    pub valid: u64,
    pub invalid: u64,
    pub parts_written: usize,
    pub resumed_from_line: u64,
    pub already_loaded: bool,
    pub seconds: f64,
}

/// Tuning of a lake load.
#[derive(Debug, Clone)]
pub struct LakeLoadOptions {
    /// Rows read between two checkpoints (each flush writes one Parquet part
    /// per hour it touched).
    pub rows_per_flush: u64,
    /// Test hook: stop after this many complete flushes, having written the
    /// next flush's parts but not its checkpoint (the worst place to die).
    pub interrupt_after_flushes: Option<usize>,
}

impl Default for LakeLoadOptions {
    fn default() -> Self {
        Self {
            rows_per_flush: 1_000_000,
            interrupt_after_flushes: None,
        }
    }
}

type Hour = (i32, u32, u32, u32);

impl Lake {
    pub fn load(
        &self,
        files: &[PathBuf],
        options: &LakeLoadOptions,
    ) -> Result<Vec<LakeLoad>, LakeError> {
        files
            .iter()
            .map(|file| self.load_file(file, options))
            .collect()
    }

    fn load_file(&self, path: &Path, options: &LakeLoadOptions) -> Result<LakeLoad, LakeError> {
        let started = Instant::now();
        let read_error = |reason: String| LakeError::Read {
            path: path.into(),
            reason,
        };
        let checksum = crate::files::file_checksum(path).map_err(|e| read_error(e.to_string()))?;
        let checkpoint_key = self.key(&format!("_checkpoints/{checksum}.json"));
        let mut checkpoint = match self.get_opt(&checkpoint_key)? {
            Some(bytes) => {
                serde_json::from_slice::<Checkpoint>(&bytes).map_err(|e| LakeError::Checkpoint {
                    key: checkpoint_key.clone(),
                    reason: e.to_string(),
                })?
            }
            None => Checkpoint {
                source_file: path.display().to_string(),
                checksum: checksum.clone(),
                next_line: 2,
                ..Checkpoint::default()
            },
        };
        let mut load = LakeLoad {
            file: path.into(),
            checksum: checksum.clone(),
            rows: 0,
            valid: 0,
            invalid: 0,
            parts_written: 0,
            resumed_from_line: checkpoint.next_line,
            already_loaded: checkpoint.complete,
            seconds: 0.0,
        };
        if checkpoint.complete {
            load.seconds = started.elapsed().as_secs_f64();
            return Ok(load);
        }
        let mut rows = CsvEvents::open(path)?;
        let tag = &checksum[..16];
        let mut hours: BTreeMap<Hour, Vec<Event>> = BTreeMap::new();
        let mut rejects = csv::Writer::from_writer(Vec::new());
        let mut pending = 0u64;
        let mut flushes = 0usize;
        let mut last_line = 1u64;
        while let Some(row) = rows.next_row()? {
            let line = row.line;
            last_line = line;
            if line < checkpoint.next_line {
                continue;
            }
            load.rows += 1;
            checkpoint.rows += 1;
            match row.event() {
                Ok(event) => {
                    checkpoint.valid += 1;
                    load.valid += 1;
                    hours
                        .entry(hour_of(event.event_time))
                        .or_default()
                        .push(event);
                }
                Err(err) => {
                    load.invalid += 1;
                    reject(
                        &mut rejects,
                        &mut checkpoint,
                        line,
                        err.code(),
                        &err.to_string(),
                    );
                }
            }
            pending += 1;
            if pending >= options.rows_per_flush {
                let interrupt = options.interrupt_after_flushes == Some(flushes);
                load.parts_written += self.flush(tag, &mut hours, &mut rejects, &mut checkpoint)?;
                if interrupt {
                    return Err(LakeError::Interrupted {
                        path: path.into(),
                        flushes,
                    });
                }
                checkpoint.next_line = line + 1;
                self.put_checkpoint(&checkpoint_key, &checkpoint)?;
                flushes += 1;
                pending = 0;
            }
        }
        load.parts_written += self.flush(tag, &mut hours, &mut rejects, &mut checkpoint)?;
        checkpoint.next_line = last_line + 1;
        checkpoint.complete = true;
        self.put_checkpoint(&checkpoint_key, &checkpoint)?;
        load.seconds = started.elapsed().as_secs_f64();
        Ok(load)
    }

    /// Writes one Parquet part per buffered hour and the rejects, and adds
    /// them to the checkpoint (not yet stored). Part names follow the
    /// checkpoint's count, so a retry after a crash overwrites, never adds.
    fn flush(
        &self,
        tag: &str,
        hours: &mut BTreeMap<Hour, Vec<Event>>,
        rejects: &mut csv::Writer<Vec<u8>>,
        checkpoint: &mut Checkpoint,
    ) -> Result<usize, LakeError> {
        let mut written = 0;
        for ((y, m, d, h), events) in std::mem::take(hours) {
            let seq = checkpoint.parts.len();
            let key = self.key(&format!(
                "events/year={y:04}/month={m:02}/day={d:02}/hour={h:02}/part-{tag}-{seq:06}.parquet"
            ));
            let bytes = encode_parquet(&events).map_err(|reason| LakeError::Parquet {
                key: key.clone(),
                reason,
            })?;
            self.put(&key, bytes)?;
            checkpoint.parts.push(key);
            written += 1;
        }
        let taken = std::mem::replace(rejects, csv::Writer::from_writer(Vec::new()));
        let bytes = taken.into_inner().map_err(|e| LakeError::Parquet {
            key: "rejects".into(),
            reason: e.to_string(),
        })?;
        if !bytes.is_empty() {
            let seq = checkpoint.parts.len();
            let key = self.key(&format!("rejects/{tag}-{seq:06}.csv"));
            self.put(&key, bytes)?;
            checkpoint.parts.push(key);
            written += 1;
        }
        Ok(written)
    }

    fn put_checkpoint(&self, key: &str, checkpoint: &Checkpoint) -> Result<(), LakeError> {
        let bytes = serde_json::to_vec_pretty(checkpoint).map_err(|e| LakeError::Checkpoint {
            key: key.into(),
            reason: e.to_string(),
        })?;
        self.put(key, bytes)
    }
}

fn reject(
    out: &mut csv::Writer<Vec<u8>>,
    checkpoint: &mut Checkpoint,
    line: u64,
    code: &str,
    message: &str,
) {
    checkpoint.invalid += 1;
    *checkpoint.invalid_by_reason.entry(code.into()).or_default() += 1;
    let _ = out.write_record([
        checkpoint.source_file.as_str(),
        &line.to_string(),
        code,
        message,
    ]);
}

fn hour_of(time: Timestamp) -> Hour {
    let t = chrono::DateTime::from_timestamp_micros(time.micros()).unwrap_or_default();
    (t.year(), t.month(), t.day(), t.hour())
}

/// The lake's Parquet schema: the event's validated, typed fields.
fn encode_parquet(events: &[Event]) -> Result<Vec<u8>, String> {
    let n = events.len();
    let mut time = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut kind = StringBuilder::with_capacity(n, n * 8);
    let (mut product, mut category, mut user) = (
        UInt64Builder::with_capacity(n),
        UInt64Builder::with_capacity(n),
        UInt64Builder::with_capacity(n),
    );
    let mut code = StringBuilder::with_capacity(n, n * 16);
    let mut brand = StringBuilder::with_capacity(n, n * 8);
    let mut price = Float64Builder::with_capacity(n);
    let mut session = StringBuilder::with_capacity(n, n * 36);
    for e in events {
        time.append_value(e.event_time.micros());
        kind.append_value(e.event_type.as_str());
        product.append_value(e.product_id);
        category.append_value(e.category_id);
        code.append_option(e.category_code.as_deref());
        brand.append_option(e.brand.as_deref());
        price.append_value(e.price);
        user.append_value(e.user_id);
        session.append_value(&e.user_session);
    }
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("event_time", Arc::new(time.finish())),
        ("event_type", Arc::new(kind.finish())),
        ("product_id", Arc::new(product.finish())),
        ("category_id", Arc::new(category.finish())),
        ("category_code", Arc::new(code.finish())),
        ("brand", Arc::new(brand.finish())),
        ("price", Arc::new(price.finish())),
        ("user_id", Arc::new(user.finish())),
        ("user_session", Arc::new(session.finish())),
    ];
    let batch = RecordBatch::try_from_iter(columns).map_err(|e| e.to_string())?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_max_row_group_row_count(Some(128 * 1024))
        .build();
    let mut out = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), Some(props))
        .map_err(|e| e.to_string())?;
    writer.write(&batch).map_err(|e| e.to_string())?;
    writer.close().map_err(|e| e.to_string())?;
    Ok(out)
}
