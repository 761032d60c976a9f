//! Events into the store. [`writer`] is the single writer every source
//! hands validated batches to (group commit, the expiry sweep between
//! batches); [`kafka`] is the stream source, exactly once. `POST /v1/events`
//! (serve) is the other source.

pub mod kafka;
pub mod writer;

pub use writer::{ClosedLoop, EventSource, IngestError, Ingestor, LogDelivered, Recorder};
