//! Training input files: CSV in the data set's form (read by `core`'s one
//! reader) and Parquet with the same columns, given as files or folders. Each
//! file is read as a stream and the files are merged by event time, so
//! memory does not grow with the number of events. Rows that fail validation
//! are counted by reason with their file and line, and a run stops only when
//! they exceed the error budget. The lake's reader merges its hour folders
//! with this too.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int64Type, TimestampMicrosecondType, UInt64Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use cartscore_core::event::{RawEvent, RawValue};
use cartscore_core::{CsvEvents, DatasetError, Event, EventError};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("input path {path} does not exist or cannot be read: {source}")]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("input {path} holds no .csv or .parquet files")]
    Empty { path: PathBuf },
    #[error(transparent)]
    Csv(#[from] DatasetError),
    #[error("cannot read Parquet {path}: {reason}")]
    Parquet { path: PathBuf, reason: String },
    #[error(
        "{invalid} of {rows} rows are invalid ({:.2}%), over the error budget of {:.2}%; first: {first}",
        100.0 * *invalid as f64 / *rows as f64, 100.0 * budget
    )]
    OverBudget {
        invalid: u64,
        rows: u64,
        budget: f64,
        first: String,
    },
}

/// A row that failed validation, with where it was.
#[derive(Debug, Clone, Serialize)]
pub struct BadRow {
    pub file: String,
    pub line: u64,
    pub code: &'static str,
    pub message: String,
}

/// What reading the inputs found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReadStats {
    pub files: Vec<String>,
    pub rows: u64,
    pub valid: u64,
    pub invalid: u64,
    pub invalid_by_reason: BTreeMap<&'static str, u64>,
    /// The first few invalid rows, for the report.
    pub invalid_samples: Vec<BadRow>,
    /// Valid events whose time is earlier than the previous event of the same file.
    pub out_of_order: u64,
}

const MAX_SAMPLES: usize = 20;
/// The budget is judged only after this many rows, so a bad first row does not abort.
const BUDGET_MIN_ROWS: u64 = 1_000;

impl ReadStats {
    /// Adds what another reader found (the lake reads one hour at a time).
    pub fn absorb(&mut self, other: ReadStats) {
        self.files.extend(other.files);
        self.rows += other.rows;
        self.valid += other.valid;
        self.invalid += other.invalid;
        self.out_of_order += other.out_of_order;
        for (reason, n) in other.invalid_by_reason {
            *self.invalid_by_reason.entry(reason).or_default() += n;
        }
        let room = MAX_SAMPLES.saturating_sub(self.invalid_samples.len());
        self.invalid_samples
            .extend(other.invalid_samples.into_iter().take(room));
    }

    /// Counts one row read at `path:line`: a valid event is returned (and
    /// checked against the previous one's time), an invalid one recorded.
    pub(crate) fn record(
        &mut self,
        row: Result<Event, EventError>,
        path: &Path,
        line: u64,
        last_time: &mut Option<cartscore_core::Timestamp>,
    ) -> Option<Event> {
        self.rows += 1;
        match row {
            Ok(event) => {
                self.valid += 1;
                if last_time.is_some_and(|t| event.event_time < t) {
                    self.out_of_order += 1;
                }
                *last_time = Some(event.event_time);
                Some(event)
            }
            Err(err) => {
                self.record_invalid(path, line, &err);
                None
            }
        }
    }

    fn record_invalid(&mut self, file: &Path, line: u64, err: &EventError) {
        self.invalid += 1;
        *self.invalid_by_reason.entry(err.code()).or_default() += 1;
        if self.invalid_samples.len() < MAX_SAMPLES {
            self.invalid_samples.push(BadRow {
                file: file.display().to_string(),
                line,
                code: err.code(),
                message: err.to_string(),
            });
        }
    }

    pub(crate) fn check_budget(&self, budget: f64, final_check: bool) -> Result<(), FilesError> {
        if (final_check || self.rows >= BUDGET_MIN_ROWS)
            && self.rows > 0
            && self.invalid as f64 > budget * self.rows as f64
        {
            let first = self
                .invalid_samples
                .first()
                .map(|b| format!("{}:{}: {}", b.file, b.line, b.message))
                .unwrap_or_default();
            return Err(FilesError::OverBudget {
                invalid: self.invalid,
                rows: self.rows,
                budget,
                first,
            });
        }
        Ok(())
    }
}

/// Lists the `.csv` and `.parquet` files under `paths` (recursively, sorted).
pub fn list_inputs(paths: &[PathBuf]) -> Result<Vec<PathBuf>, FilesError> {
    let mut files = Vec::new();
    for path in paths {
        // `-` is standard input: a CSV streamed in (`synth --out - | train --input -`).
        let path = if path.as_os_str() == "-" {
            &PathBuf::from("/dev/stdin")
        } else {
            path
        };
        let meta = std::fs::metadata(path).map_err(|source| FilesError::Path {
            path: path.clone(),
            source,
        })?;
        // A file, or a pipe or device read once in order.
        if !meta.is_dir() {
            files.push(path.clone());
            continue;
        }
        let before = files.len();
        collect_dir(path, &mut files)?;
        if files.len() == before {
            return Err(FilesError::Empty { path: path.clone() });
        }
    }
    Ok(files)
}

fn collect_dir(dir: &Path, files: &mut Vec<PathBuf>) -> Result<(), FilesError> {
    let io = |source| FilesError::Path {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort();
    for entry in entries {
        let hidden = entry
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if entry.is_dir() {
            collect_dir(&entry, files)?;
        } else if matches!(
            entry.extension().and_then(|e| e.to_str()),
            Some("csv" | "parquet")
        ) {
            files.push(entry);
        }
    }
    Ok(())
}

enum FileReader {
    Csv(CsvEvents),
    Parquet {
        reader: ParquetRecordBatchReader,
        batch: Option<RecordBatch>,
        row: usize,
        /// Rows read so far; row n is "line" n + 1 in reports, as a CSV's would be.
        read: u64,
    },
}

struct OpenFile {
    path: PathBuf,
    reader: FileReader,
    last_time: Option<cartscore_core::Timestamp>,
}

impl OpenFile {
    fn open(path: &Path) -> Result<Self, FilesError> {
        let is_parquet = path.extension().and_then(|e| e.to_str()) == Some("parquet");
        let reader = if is_parquet {
            let file = File::open(path).map_err(|source| FilesError::Path {
                path: path.into(),
                source,
            })?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .and_then(|b| b.with_batch_size(8192).build())
                .map_err(|e| FilesError::Parquet {
                    path: path.into(),
                    reason: e.to_string(),
                })?;
            FileReader::Parquet {
                reader,
                batch: None,
                row: 0,
                read: 0,
            }
        } else {
            FileReader::Csv(CsvEvents::open(path)?)
        };
        Ok(Self {
            path: path.into(),
            reader,
            last_time: None,
        })
    }

    /// The next valid event of this file; invalid rows are counted and skipped.
    fn next_event(&mut self, stats: &mut ReadStats) -> Result<Option<Event>, FilesError> {
        loop {
            let (line, parsed) = match &mut self.reader {
                FileReader::Csv(rows) => match rows.next_row()? {
                    None => return Ok(None),
                    Some(row) => (row.line, row.event()),
                },
                FileReader::Parquet {
                    reader,
                    batch,
                    row,
                    read,
                } => {
                    if batch.as_ref().is_none_or(|b| *row >= b.num_rows()) {
                        match reader.next() {
                            None => return Ok(None),
                            Some(Ok(next)) => {
                                *batch = Some(next);
                                *row = 0;
                                continue;
                            }
                            Some(Err(e)) => {
                                return Err(FilesError::Parquet {
                                    path: self.path.clone(),
                                    reason: e.to_string(),
                                });
                            }
                        }
                    }
                    let Some(b) = batch.as_ref() else { continue };
                    let event = parquet_row(b, *row);
                    *row += 1;
                    *read += 1;
                    (*read + 1, event)
                }
            };
            if let Some(event) = stats.record(parsed, &self.path, line, &mut self.last_time) {
                return Ok(Some(event));
            }
        }
    }
}

/// Reads one Parquet row through the same validation as every other form.
pub(crate) fn parquet_row(batch: &RecordBatch, row: usize) -> Result<Event, EventError> {
    let value = |name: &str| -> RawValue<'_> {
        let Some(column) = batch.column_by_name(name) else {
            return RawValue::Missing;
        };
        if column.is_null(row) {
            return RawValue::Null;
        }
        match column.data_type() {
            DataType::Utf8 => RawValue::Str(Cow::Borrowed(column.as_string::<i32>().value(row))),
            DataType::LargeUtf8 => {
                RawValue::Str(Cow::Borrowed(column.as_string::<i64>().value(row)))
            }
            DataType::Int64 => RawValue::Signed(column.as_primitive::<Int64Type>().value(row)),
            DataType::UInt64 => RawValue::Unsigned(column.as_primitive::<UInt64Type>().value(row)),
            DataType::Float64 => RawValue::Float(column.as_primitive::<Float64Type>().value(row)),
            DataType::Float32 => {
                RawValue::Float(f64::from(column.as_primitive::<Float32Type>().value(row)))
            }
            DataType::Timestamp(TimeUnit::Microsecond, _) => {
                RawValue::Signed(column.as_primitive::<TimestampMicrosecondType>().value(row))
            }
            _ => RawValue::Composite,
        }
    };
    RawEvent {
        event_time: value("event_time"),
        event_type: value("event_type"),
        product_id: value("product_id"),
        category_id: value("category_id"),
        category_code: value("category_code"),
        brand: value("brand"),
        price: value("price"),
        user_id: value("user_id"),
        user_session: value("user_session"),
        deleted: false,
        updated: false,
    }
    .validate()
}

/// Streams the valid events of several files in event-time order (ties keep
/// file order, then row order). Within one file, rows are taken in the order
/// they are written: out-of-order rows are counted, not re-sorted.
pub struct MergedEvents {
    files: Vec<OpenFile>,
    heads: BinaryHeap<Reverse<(cartscore_core::Timestamp, usize)>>,
    pending: Vec<Option<Event>>,
    pub stats: ReadStats,
    budget: f64,
}

impl std::fmt::Debug for MergedEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergedEvents")
            .field("files", &self.stats.files)
            .finish_non_exhaustive()
    }
}

impl MergedEvents {
    pub fn open(paths: &[PathBuf], error_budget: f64) -> Result<Self, FilesError> {
        let inputs = list_inputs(paths)?;
        let mut files = Vec::with_capacity(inputs.len());
        let mut stats = ReadStats::default();
        for path in &inputs {
            files.push(OpenFile::open(path)?);
            stats.files.push(path.display().to_string());
        }
        let mut merged = Self {
            heads: BinaryHeap::new(),
            pending: vec![None; files.len()],
            files,
            stats,
            budget: error_budget,
        };
        for i in 0..merged.files.len() {
            merged.refill(i)?;
        }
        Ok(merged)
    }

    fn refill(&mut self, i: usize) -> Result<(), FilesError> {
        if let Some(event) = self.files[i].next_event(&mut self.stats)? {
            self.heads.push(Reverse((event.event_time, i)));
            self.pending[i] = Some(event);
        }
        self.stats.check_budget(self.budget, false)
    }

    /// The next event in time order, or `None` at the end (after the final budget check).
    pub fn next_event(&mut self) -> Result<Option<Event>, FilesError> {
        let Some(Reverse((_, i))) = self.heads.pop() else {
            self.stats.check_budget(self.budget, true)?;
            return Ok(None);
        };
        let event = self.pending[i].take();
        self.refill(i)?;
        Ok(event)
    }
}

/// The BLAKE3 checksum of a file's bytes: what the warehouse's manifest and
/// the lake's checkpoints know a file by, whatever its name.
pub fn file_checksum(path: &Path) -> Result<String, std::io::Error> {
    let mut hasher = blake3::Hasher::new();
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const HEADER: &str = "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n";

    fn write(dir: &Path, name: &str, rows: &[&str]) -> PathBuf {
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(HEADER.as_bytes()).unwrap();
        for r in rows {
            writeln!(f, "{r}").unwrap();
        }
        path
    }

    #[test]
    fn merges_files_by_time_and_reports_bad_rows_with_lines() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.csv",
            &[
                "2019-10-01 00:00:00 UTC,view,1,2,,,1.00,3,s1",
                "2019-10-01 00:00:10 UTC,view,1,2,,,-1.00,3,s1",
                "2019-10-01 00:00:20 UTC,cart,1,2,,,1.00,3,s1",
            ],
        );
        write(
            dir.path(),
            "b.csv",
            &["2019-10-01 00:00:05 UTC,view,9,2,,,1.00,4,s2"],
        );
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let mut merged = MergedEvents::open(&[dir.path().to_path_buf()], 0.5).unwrap();
        let mut products = Vec::new();
        while let Some(e) = merged.next_event().unwrap() {
            products.push((e.product_id, e.event_time.secs() % 60));
        }
        assert_eq!(products, vec![(1, 0), (9, 5), (1, 20)]);
        assert_eq!(merged.stats.invalid, 1);
        let bad = &merged.stats.invalid_samples[0];
        assert_eq!((bad.line, bad.code), (3, "negative_price"));
        assert!(bad.file.ends_with("a.csv"));
    }

    #[test]
    fn error_budget_stops_the_run() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.csv",
            &[
                "x,view,1,2,,,1.00,3,s1",
                "2019-10-01 00:00:00 UTC,view,1,2,,,1.00,3,s1",
            ],
        );
        let mut merged = MergedEvents::open(&[dir.path().to_path_buf()], 0.1).unwrap();
        let err = loop {
            match merged.next_event() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("budget not enforced"),
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("error budget"), "{err}");
    }

    #[test]
    fn missing_input_is_a_clear_error() {
        let err = MergedEvents::open(&[PathBuf::from("/nonexistent/events.csv")], 0.0)
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/events.csv"), "{err}");
    }
}
