//! The S3 data lake and model registry, through the object_store crate (so
//! AWS S3, MinIO and SeaweedFS work alike; endpoint, region and credentials
//! come from the usual `AWS_*` environment variables).
//!
//! Lake layout under `s3://bucket[/prefix]`:
//! - `events/year=YYYY/month=MM/day=DD/hour=HH/part-<file>-<seq>.parquet`:
//!   validated events, typed, one hour per folder;
//! - `rejects/<file>-<seq>.csv`: the rows that failed validation, with why;
//! - `_checkpoints/<checksum>.json`: per source file, how far its load got.
//!
//! A load writes parts, then moves the file's checkpoint past them. An
//! interrupted load resumes from the checkpoint and writes the same part
//! names with the same rows again, so no row is ever stored twice, and a
//! finished file is skipped.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::time::Instant;

use arrow_array::builder::{
    Float64Builder, StringBuilder, TimestampMicrosecondBuilder, UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use cartscore_core::{CsvLayout, Event, Timestamp};
use chrono::{Datelike, Timelike};
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::source::{MergedEvents, ReadStats, SourceError};

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("{url} is not an S3 location: {reason} (expected s3://bucket[/prefix])")]
    Url { url: String, reason: String },
    #[error("S3 {what} failed at {endpoint}, bucket {bucket}, key {key}: {source}")]
    Store {
        what: &'static str,
        endpoint: String,
        bucket: String,
        key: String,
        source: Box<object_store::Error>,
    },
    #[error("cannot configure S3 for {bucket} at {endpoint}: {source}")]
    Config {
        endpoint: String,
        bucket: String,
        source: Box<object_store::Error>,
    },
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("cannot encode Parquet for {key}: {reason}")]
    Parquet { key: String, reason: String },
    #[error("checkpoint {key} is unreadable: {reason}")]
    Checkpoint { key: String, reason: String },
    #[error("load of {path} interrupted after {flushes} flushes (test hook)")]
    Interrupted { path: PathBuf, flushes: usize },
}

/// A bucket and key prefix on an S3-compatible server.
pub struct Lake {
    store: Arc<AmazonS3>,
    runtime: tokio::runtime::Runtime,
    bucket: String,
    prefix: String,
    endpoint: String,
}

impl std::fmt::Debug for Lake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Lake(s3://{}/{} at {})",
            self.bucket, self.prefix, self.endpoint
        )
    }
}

impl Lake {
    /// `s3://bucket[/prefix]`; the endpoint (`AWS_ENDPOINT_URL` or
    /// `AWS_ENDPOINT`), region and credentials come from the environment.
    /// Plain-HTTP endpoints (a local MinIO or SeaweedFS) are allowed.
    pub fn open(url: &str) -> Result<Self, LakeError> {
        let bad = |reason: &str| LakeError::Url {
            url: url.into(),
            reason: reason.into(),
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("no s3:// scheme"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket"));
        }
        let endpoint = ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
            .iter()
            .find_map(|k| std::env::var(k).ok())
            .unwrap_or_else(|| "https://s3.amazonaws.com".into());
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if endpoint.starts_with("http://") {
            builder = builder.with_allow_http(true);
        }
        if std::env::var("AWS_REGION").is_err() && std::env::var("AWS_DEFAULT_REGION").is_err() {
            builder = builder.with_region("us-east-1");
        }
        let store = builder.build().map_err(|source| LakeError::Config {
            endpoint: endpoint.clone(),
            bucket: bucket.into(),
            source: Box::new(source),
        })?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| bad(&format!("cannot start the I/O runtime: {e}")))?;
        Ok(Self {
            store: Arc::new(store),
            runtime,
            bucket: bucket.into(),
            prefix: prefix.trim_matches('/').into(),
            endpoint,
        })
    }

    /// The object key of `name` under this location's prefix.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.into()
        } else {
            format!("{}/{name}", self.prefix)
        }
    }

    pub fn url(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    fn error(
        &self,
        what: &'static str,
        key: &str,
    ) -> impl FnOnce(object_store::Error) -> LakeError + use<> {
        let (endpoint, bucket, key) = (self.endpoint.clone(), self.bucket.clone(), key.to_owned());
        move |source| LakeError::Store {
            what,
            endpoint,
            bucket,
            key,
            source: Box::new(source),
        }
    }

    pub fn put(&self, key: &str, bytes: Vec<u8>) -> Result<(), LakeError> {
        let path = ObjectPath::from(key);
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(self.error("PUT", key))
    }

    /// The object's bytes, or `None` when there is no such object.
    pub fn get_opt(&self, key: &str) -> Result<Option<Vec<u8>>, LakeError> {
        let path = ObjectPath::from(key);
        let result = self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(got) => got.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        });
        result
            .map(|b| b.map(|b| b.to_vec()))
            .map_err(self.error("GET", key))
    }

    /// Streams an object into a local file.
    pub fn download(&self, key: &str, to: &Path) -> Result<(), LakeError> {
        let path = ObjectPath::from(key);
        let mut file = File::create(to).map_err(|e| LakeError::Read {
            path: to.into(),
            reason: e.to_string(),
        })?;
        let written = self.runtime.block_on(async {
            let mut stream = self.store.get(&path).await?.into_stream();
            while let Some(chunk) = stream.try_next().await? {
                file.write_all(&chunk)
                    .map_err(|e| object_store::Error::Generic {
                        store: "local file",
                        source: Box::new(e),
                    })?;
            }
            Ok(())
        });
        if written.is_err() {
            // No partial file stays behind for someone to take as complete.
            let _ = std::fs::remove_file(to);
        }
        written.map_err(self.error("GET", key))
    }

    /// Keys under `prefix` (a folder, no trailing slash), sorted, with their
    /// last-modified time.
    pub fn list(
        &self,
        prefix: &str,
    ) -> Result<Vec<(String, chrono::DateTime<chrono::Utc>)>, LakeError> {
        let path = ObjectPath::from(prefix);
        let listed = self.runtime.block_on(
            self.store
                .list(Some(&path))
                .map_ok(|meta| (meta.location.to_string(), meta.last_modified))
                .try_collect::<Vec<_>>(),
        );
        let mut keys = listed.map_err(self.error("LIST", prefix))?;
        keys.sort();
        Ok(keys)
    }
}

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
        let checksum =
            crate::warehouse::file_checksum(path).map_err(|e| read_error(e.to_string()))?;
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
        let file = File::open(path).map_err(|e| read_error(e.to_string()))?;
        let mut reader = csv::ReaderBuilder::new()
            .flexible(true)
            .buffer_capacity(1 << 20)
            .from_reader(BufReader::with_capacity(1 << 20, file));
        let header = reader
            .byte_headers()
            .map_err(|e| read_error(e.to_string()))?;
        let layout = CsvLayout::from_header(header)
            .map_err(|e| read_error(format!("unusable header: {e}")))?;
        let tag = &checksum[..16];
        let mut hours: BTreeMap<Hour, Vec<Event>> = BTreeMap::new();
        let mut rejects = csv::Writer::from_writer(Vec::new());
        let mut pending = 0u64;
        let mut flushes = 0usize;
        let mut record = csv::ByteRecord::new();
        let mut last_line = 1u64;
        loop {
            let more = match reader.read_byte_record(&mut record) {
                Ok(more) => more,
                Err(e) if matches!(e.kind(), csv::ErrorKind::Io(_)) => {
                    return Err(read_error(e.to_string()));
                }
                // A row the CSV reader cannot take is that row's problem.
                Err(e) => {
                    let line = last_line + 1;
                    last_line = line;
                    if line >= checkpoint.next_line {
                        load.rows += 1;
                        load.invalid += 1;
                        checkpoint.rows += 1;
                        reject(
                            &mut rejects,
                            &mut checkpoint,
                            line,
                            "malformed",
                            &e.to_string(),
                        );
                        pending += 1;
                    }
                    continue;
                }
            };
            if !more {
                break;
            }
            // Counted here: the csv crate's positions are one short on CRLF
            // files (the data set's form). A record is one line.
            let line = last_line + 1;
            last_line = line;
            if line < checkpoint.next_line {
                continue;
            }
            load.rows += 1;
            checkpoint.rows += 1;
            match Event::from_csv(&record, &layout) {
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
    pub fn open(url: &str, budget: f64) -> Result<Self, SourceError> {
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
            return Err(SourceError::Empty { path: url.into() });
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

    pub fn next_event(&mut self) -> Result<Option<Event>, SourceError> {
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

/// The files of a bundle in the registry; the model goes last, so a
/// version whose `model.onnx` exists is complete.
const REGISTRY_FILES: [&str; 3] = ["report.json", "report.txt", "model.onnx"];

impl Lake {
    /// Publishes a training output folder under `models/<version>/`.
    pub fn publish_model(&self, version: &str, out: &Path) -> Result<Vec<String>, LakeError> {
        let mut keys = Vec::new();
        for name in REGISTRY_FILES {
            let file = out.join(name);
            let bytes = std::fs::read(&file).map_err(|e| LakeError::Read {
                path: file.clone(),
                reason: e.to_string(),
            })?;
            let key = self.key(&format!("models/{version}/{name}"));
            self.put(&key, bytes)?;
            keys.push(self.url(&key));
        }
        Ok(keys)
    }

    /// The versions in the registry, oldest first (by when their model was
    /// published).
    pub fn model_versions(&self) -> Result<Vec<String>, LakeError> {
        let prefix = self.key("models");
        let mut found: Vec<(chrono::DateTime<chrono::Utc>, String)> = self
            .list(&prefix)?
            .into_iter()
            .filter_map(|(key, modified)| {
                let rest = key.strip_prefix(&prefix)?.trim_start_matches('/');
                let version = rest.strip_suffix("/model.onnx")?;
                (!version.contains('/')).then(|| (modified, version.to_owned()))
            })
            .collect();
        found.sort();
        Ok(found.into_iter().map(|(_, v)| v).collect())
    }

    /// Streams `models/<version>/model.onnx` into `to`; `latest` picks the
    /// most recently published version. Returns the version.
    pub fn fetch_model(&self, version: &str, to: &Path) -> Result<String, LakeError> {
        let version = if version == "latest" {
            self.model_versions()?
                .pop()
                .ok_or_else(|| LakeError::Read {
                    path: self.url(&self.key("models/")).into(),
                    reason: "the registry holds no model".into(),
                })?
        } else {
            version.to_owned()
        };
        self.download(&self.key(&format!("models/{version}/model.onnx")), to)?;
        Ok(version)
    }
}
