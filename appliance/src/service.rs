//! The service manager's side of the process: systemd's `sd_notify`
//! readiness, reload and stop notices, and the watchdog.
//!
//! READY=1 is sent once the store is open, a model serves and both
//! listeners are bound. The watchdog is pinged only while every serving core
//! is provably turning over (each core's own runtime stamps a heartbeat) and
//! the store answers a read, so a wedged core gets the process restarted
//! instead of silently dropping a share of connections. Without
//! `NOTIFY_SOCKET` every call here is a no-op.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::reload::ModelRegistry;
use crate::store::Store;

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

#[derive(Debug, Clone, Copy)]
pub struct ServiceManager {
    /// WatchdogSec as systemd passed it (WATCHDOG_USEC), when enabled.
    watchdog: Option<Duration>,
}

impl ServiceManager {
    /// Reads WATCHDOG_USEC / WATCHDOG_PID as `sd_watchdog_enabled(3)`
    /// does: the pid, when set, must be ours (a child does not inherit the
    /// duty). sd-notify's own check also refuses an unset pid.
    pub fn from_env() -> Self {
        let usec = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok());
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|pid| pid.parse::<u32>().ok() == Some(std::process::id()));
        let watchdog = usec
            .filter(|&usec| usec > 0 && for_us)
            .map(Duration::from_micros);
        Self { watchdog }
    }

    fn notify(states: &[NotifyState<'_>]) {
        if let Err(error) = sd_notify::notify(false, states) {
            tracing::warn!(%error, "failed to notify the service manager");
        }
    }

    pub fn ready(&self, status: &str) {
        Self::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn reloading(&self) {
        Self::notify(&[
            NotifyState::Reloading,
            NotifyState::monotonic_usec_now().unwrap_or(NotifyState::Status("reloading")),
        ]);
    }

    pub fn stopping(&self) {
        Self::notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
    }

    /// Sends READY=1 as soon as a model serves (at once when one already
    /// does): without a model the appliance answers `model_unavailable`,
    /// which is not a service that is up.
    pub fn spawn_ready_when_serving(self, models: Arc<ModelRegistry>, listeners: String) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                if let Some(model) = models.current() {
                    self.ready(&format!("serving model {} on {listeners}", model.version()));
                    tracing::info!("ready (service manager notified when NOTIFY_SOCKET is set)");
                    return;
                }
            }
        });
    }

    /// Pings the watchdog every half period while the process is healthy.
    pub fn spawn_watchdog(self, heartbeats: Arc<Heartbeats>, store: Arc<Store>) {
        let Some(period) = self.watchdog else {
            return;
        };
        tracing::info!(
            period_ms = period.as_millis() as u64,
            "systemd watchdog enabled"
        );
        // A core is stalled once it missed several heartbeats.
        let stall = (period / 2).max(HEARTBEAT_EVERY * 4);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match health(&heartbeats, &store, stall) {
                    Ok(()) => Self::notify(&[NotifyState::Watchdog]),
                    Err(problem) => {
                        tracing::error!(problem, "unhealthy: withholding the watchdog ping");
                    }
                }
            }
        });
    }
}

fn health(heartbeats: &Heartbeats, store: &Store, stall: Duration) -> Result<(), String> {
    if let Some((core, age)) = heartbeats.stalest()
        && age > stall
    {
        return Err(format!(
            "serving core {core} has not turned over for {} ms",
            age.as_millis()
        ));
    }
    store
        .reader()
        .map(drop)
        .map_err(|error| format!("the store is not readable: {error}"))
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
