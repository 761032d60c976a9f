//! What /readyz and /metrics say about the stream: connected, lag, and how
//! long since the store last held everything the broker had.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug)]
pub struct StreamHealth {
    started: Instant,
    stale_after: Duration,
    pub(super) connected: AtomicBool,
    /// Milliseconds after `started` when the consumer last had applied
    /// everything the broker held; `u64::MAX` before that ever happened.
    current_at_ms: AtomicU64,
    pub(super) lag: AtomicI64,
    pub(super) partitions: AtomicI64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    pub connected: bool,
    /// Messages on the broker not yet applied, over the assigned partitions,
    /// as of the last statistics (every second).
    pub lag: i64,
    pub assigned_partitions: i64,
    /// Time since the store last held everything the broker had.
    pub staleness_seconds: f64,
    /// `staleness_seconds` is over `kafka.stale_after_ms`.
    pub stale: bool,
}

impl StreamHealth {
    pub fn new(stale_after: Duration) -> Self {
        Self {
            started: Instant::now(),
            stale_after,
            connected: AtomicBool::new(false),
            current_at_ms: AtomicU64::new(u64::MAX),
            lag: AtomicI64::new(0),
            partitions: AtomicI64::new(0),
        }
    }

    pub(super) fn mark_current(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.current_at_ms.store(now, Ordering::Relaxed);
    }

    pub fn status(&self) -> StreamStatus {
        let since = match self.current_at_ms.load(Ordering::Relaxed) {
            u64::MAX => Duration::ZERO,
            ms => Duration::from_millis(ms),
        };
        let staleness = self.started.elapsed().saturating_sub(since);
        StreamStatus {
            connected: self.connected.load(Ordering::Relaxed),
            lag: self.lag.load(Ordering::Relaxed),
            assigned_partitions: self.partitions.load(Ordering::Relaxed),
            staleness_seconds: staleness.as_secs_f64(),
            stale: staleness > self.stale_after,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staleness_grows_until_marked_current() {
        let health = StreamHealth::new(Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(30));
        assert!(health.status().stale);
        health.mark_current();
        let status = health.status();
        assert!(!status.stale, "{status:?}");
    }
}
