//! The S3 client: a bucket and key prefix on an S3-compatible server, and
//! the few object operations the lake and the registry need.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::files::FilesError;

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
    #[error("no .parquet objects under {url}")]
    Empty { url: String },
    #[error(transparent)]
    Files(#[from] FilesError),
    #[error(transparent)]
    Csv(#[from] cartscore_core::DatasetError),
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
