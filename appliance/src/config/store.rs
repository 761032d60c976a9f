//! `[store]`: the LMDB environment, expiry and the writer's batching.

use std::num::{NonZeroU64, NonZeroUsize};
use std::path::PathBuf;

use cartscore_core::state::{SESSION_IDLE_TIMEOUT_SECS, USER_IDLE_TIMEOUT_SECS};
use serde::{Deserialize, Serialize};

use super::error::ConfigError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Folder of the LMDB environment (created if missing).
    pub path: PathBuf,
    /// Size of the memory map: the most the store can hold.
    pub map_size_mib: NonZeroU64,
    /// Sessions idle this long (in event time) are deleted. At least the
    /// feature contract's 2 h session timeout, or live features would change.
    pub session_idle_expiry_secs: u64,
    /// Users idle this long (in event time) are deleted; at least 90 days.
    pub user_idle_expiry_secs: u64,
    /// How far behind the event-time watermark an event may arrive and still
    /// find its state: the sweeper keeps state this much longer than the
    /// expiry, so when it runs never changes a result.
    pub allowed_lateness_secs: u64,
    /// Most sessions or users examined per sweep transaction, so a sweep
    /// never holds the writer for long.
    pub sweep_batch: NonZeroUsize,
    /// Most events applied in one write transaction.
    pub max_batch_events: NonZeroUsize,
    /// fsync every commit. Off trades the last transactions on power loss
    /// (never on a process crash) for write throughput.
    pub sync: bool,
    /// Most scored-cart records held (pending or resolved); beyond it new
    /// ones are dropped and counted.
    pub max_scored_records: NonZeroUsize,
    /// A resolved record older than this in event time is deleted (until
    /// then the same cart scored again keeps its first record).
    pub scored_record_max_age_secs: u64,
    /// Record every scored cart (the closed loop: live quality, drift, the
    /// prediction log). Off, scoring records nothing and nothing resolves.
    pub record_scores: bool,
    /// Scored-cart records waiting for the writer; when full, a record is
    /// dropped (counted), never the score delayed.
    pub record_queue: NonZeroUsize,
    /// Most resolved outcomes kept (`GET /v1/outcomes`, the live window at
    /// start-up); the oldest go first.
    pub max_outcomes: NonZeroUsize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("var/cartscore"),
            map_size_mib: nonzero!(1024),
            session_idle_expiry_secs: SESSION_IDLE_TIMEOUT_SECS as u64,
            user_idle_expiry_secs: USER_IDLE_TIMEOUT_SECS as u64,
            allowed_lateness_secs: 4 * 3600,
            sweep_batch: nonzero!(1_000),
            max_batch_events: nonzero!(10_000),
            sync: true,
            max_scored_records: nonzero!(1_000_000),
            scored_record_max_age_secs: 2 * 86_400,
            record_scores: true,
            record_queue: nonzero!(65_536),
            max_outcomes: nonzero!(1_000_000),
        }
    }
}

impl StoreConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.map_size_mib.get() > 1 << 24 {
            return Err(ConfigError::invalid(
                "store.map_size_mib",
                self.map_size_mib,
                "must be at most 16 TiB",
            ));
        }
        if self.session_idle_expiry_secs < SESSION_IDLE_TIMEOUT_SECS as u64 {
            return Err(ConfigError::invalid(
                "store.session_idle_expiry_secs",
                self.session_idle_expiry_secs,
                "must be at least the feature contract's session timeout (7200 s): expiring sooner would change live features",
            ));
        }
        if self.user_idle_expiry_secs < USER_IDLE_TIMEOUT_SECS as u64 {
            return Err(ConfigError::invalid(
                "store.user_idle_expiry_secs",
                self.user_idle_expiry_secs,
                "must be at least the feature contract's user timeout (7776000 s)",
            ));
        }
        ConfigError::non_empty("store.path", &self.path)
    }
}
