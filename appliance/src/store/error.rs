//! Why a store operation failed. A full map is its own error: the batch is
//! refused whole and the daemon keeps serving.

use std::path::PathBuf;

use heed::MdbError;
use rkyv::rancor;
use thiserror::Error;

use crate::error::{Code, ErrorCode};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("failed to open the LMDB store at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: heed::Error,
    },
    #[error(
        "{path} is not an LMDB store: it holds other files ({found}) and no data.mdb; point store.path at a new or empty folder (nothing was written)"
    )]
    NotAStore { path: PathBuf, found: String },
    #[error(
        "cannot reserve the store's map ({map_size_mib} MiB) on disk for {path}: {source}; free space or lower store.map_size_mib"
    )]
    Reserve {
        path: PathBuf,
        map_size_mib: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the LMDB map is full ({map_size_mib} MiB): raise store.map_size_mib and restart; nothing of this batch was applied"
    )]
    MapFull { map_size_mib: u64 },
    #[error("LMDB {operation} failed: {source}")]
    Lmdb {
        operation: &'static str,
        #[source]
        source: heed::Error,
    },
    #[error("stored {database} value for key {key} is not a valid archive: {source}")]
    Corrupt {
        database: &'static str,
        key: String,
        #[source]
        source: rancor::Error,
    },
    #[error(
        "the store at {path} has layout {found}, this build reads layouts 2 and 3: move it aside and let the stream rebuild it (the offsets go with it)"
    )]
    Layout { path: PathBuf, found: i64 },
    #[error("failed to encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: rancor::Error,
    },
}

impl ErrorCode for StoreError {
    fn error_code(&self) -> Code {
        match self {
            Self::Open { .. }
            | Self::Layout { .. }
            | Self::NotAStore { .. }
            | Self::Reserve { .. } => Code::StoreOpen,
            Self::MapFull { .. } => Code::MapFull,
            Self::Lmdb { .. } => Code::StoreLmdb,
            Self::Corrupt { .. } => Code::StoreCorrupt,
            Self::Encode { .. } => Code::StoreEncode,
        }
    }
}

/// Maps an LMDB failure of `operation`, telling a full map apart.
pub(super) fn lmdb(
    operation: &'static str,
    map_size_mib: u64,
) -> impl Fn(heed::Error) -> StoreError {
    move |source| match source {
        heed::Error::Mdb(MdbError::MapFull) => StoreError::MapFull { map_size_mib },
        source => StoreError::Lmdb { operation, source },
    }
}
