//! The S3 data lake and model registry, through the object_store crate (so
//! AWS S3, MinIO and SeaweedFS work alike; endpoint, region and credentials
//! come from the usual `AWS_*` environment variables). [`client`] is the S3
//! client; [`load`] writes the lake, [`read`] streams it back for training,
//! [`registry`] keeps published bundles.
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

mod client;
pub mod load;
pub mod read;
pub mod registry;

pub use client::{Lake, LakeError};
pub use load::LakeLoadOptions;
