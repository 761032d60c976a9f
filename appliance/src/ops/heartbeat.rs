//! Heartbeats of the serving cores: each core's own runtime stamps its slot,
//! so a wedged core shows as a stale slot (the watchdog reads them).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often each serving core stamps its heartbeat.
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(200);

/// The serving cores' last heartbeats, in milliseconds since `base`.
#[derive(Debug)]
pub struct Heartbeats {
    base: Instant,
    beats: Vec<AtomicU64>,
}

impl Heartbeats {
    pub fn new(cores: usize) -> Self {
        Self {
            base: Instant::now(),
            beats: (0..cores).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn beat(&self, core: usize) {
        if let Some(slot) = self.beats.get(core) {
            slot.store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// The core that beat longest ago, and how long ago.
    pub fn stalest(&self) -> Option<(usize, Duration)> {
        let now = self.base.elapsed().as_millis() as u64;
        self.beats
            .iter()
            .enumerate()
            .map(|(core, slot)| {
                (
                    core,
                    Duration::from_millis(now.saturating_sub(slot.load(Ordering::Relaxed))),
                )
            })
            .max_by_key(|(_, age)| *age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stalest_core_is_the_one_that_beat_longest_ago() {
        let beats = Heartbeats::new(3);
        std::thread::sleep(Duration::from_millis(30));
        beats.beat(0);
        beats.beat(2);
        let (core, age) = beats.stalest().unwrap();
        assert_eq!(core, 1);
        assert!(age >= Duration::from_millis(30));
        beats.beat(1);
        assert!(beats.stalest().unwrap().1 < Duration::from_millis(30));
    }
}
