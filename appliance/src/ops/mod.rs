//! Operating the appliance: Prometheus [`metrics`], OpenTelemetry export
//! ([`telemetry`]), the serving cores' [`heartbeat`]s and the [`systemd`]
//! side (readiness, reload and stop notices, the watchdog). Every other part
//! reports through here; this module depends on none of them.

pub mod heartbeat;
pub mod metrics;
pub mod systemd;
pub mod telemetry;
