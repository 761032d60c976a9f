//! The service manager's side of the process: systemd's `sd_notify`
//! readiness, reload and stop notices, and the watchdog.
//!
//! READY=1 is sent once the store is open, a model serves and both
//! listeners are bound. The watchdog is pinged only while every serving core
//! is provably turning over (each core's own runtime stamps a heartbeat) and
//! the store answers a read, so a wedged core gets the process restarted
//! instead of silently dropping a share of connections. Without
//! `NOTIFY_SOCKET` every call here is a no-op. What "serving" and "the store
//! reads" mean is the caller's: this module knows only systemd.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::ops::heartbeat::{HEARTBEAT_EVERY, Heartbeats};

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

    /// Sends READY=1 as soon as `serving` names the model that serves (at
    /// once when one already does): without a model the appliance answers
    /// `model_unavailable`, which is not a service that is up.
    pub fn spawn_ready_when_serving(
        self,
        serving: impl Fn() -> Option<String> + Send + 'static,
        listeners: String,
    ) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                if let Some(version) = serving() {
                    self.ready(&format!("serving model {version} on {listeners}"));
                    tracing::info!("ready (service manager notified when NOTIFY_SOCKET is set)");
                    return;
                }
            }
        });
    }

    /// Pings the watchdog every half period while every core beats and
    /// `store_reads` succeeds.
    pub fn spawn_watchdog(
        self,
        heartbeats: Arc<Heartbeats>,
        store_reads: impl Fn() -> Result<(), String> + Send + 'static,
    ) {
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
                match health(&heartbeats, &store_reads, stall) {
                    Ok(()) => Self::notify(&[NotifyState::Watchdog]),
                    Err(problem) => {
                        tracing::error!(problem, "unhealthy: withholding the watchdog ping");
                    }
                }
            }
        });
    }
}

fn health(
    heartbeats: &Heartbeats,
    store_reads: &impl Fn() -> Result<(), String>,
    stall: Duration,
) -> Result<(), String> {
    if let Some((core, age)) = heartbeats.stalest()
        && age > stall
    {
        return Err(format!(
            "serving core {core} has not turned over for {} ms",
            age.as_millis()
        ));
    }
    store_reads().map_err(|error| format!("the store is not readable: {error}"))
}
