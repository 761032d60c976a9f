//! `[log]` and `[telemetry]`: what the appliance says about itself.

use serde::{Deserialize, Serialize};

use super::error::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter such as `info` or `info,cartscore_appliance=debug`;
    /// `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if tracing_subscriber::EnvFilter::try_new(&self.filter).is_err() {
            return Err(ConfigError::invalid(
                "log.filter",
                &self.filter,
                "not a tracing filter",
            ));
        }
        Ok(())
    }
}

/// OpenTelemetry export over OTLP/HTTP (protobuf). Off unless an endpoint
/// is set; then nothing else changes on the TCP path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Collector base URL such as `http://127.0.0.1:4318` (`/v1/traces` and
    /// `/v1/metrics` are appended); empty = no export.
    pub otlp_endpoint: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// Share of HTTP requests traced (1 in round(1/ratio)); reloads and
    /// ingest batches are always traced.
    pub request_sample_ratio: f64,
    /// How often metrics are pushed.
    pub metrics_interval_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "cartscore".into(),
            request_sample_ratio: 0.01,
            metrics_interval_ms: 10_000,
        }
    }
}

impl TelemetryConfig {
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled()
            && !(self.otlp_endpoint.starts_with("http://")
                || self.otlp_endpoint.starts_with("https://"))
        {
            return Err(ConfigError::invalid(
                "telemetry.otlp_endpoint",
                &self.otlp_endpoint,
                "must be an http:// or https:// URL (OTLP/HTTP), or empty for no export",
            ));
        }
        if !(self.request_sample_ratio > 0.0 && self.request_sample_ratio <= 1.0) {
            return Err(ConfigError::invalid(
                "telemetry.request_sample_ratio",
                self.request_sample_ratio,
                "must be above 0 and at most 1",
            ));
        }
        ConfigError::at_least(
            "telemetry.metrics_interval_ms",
            self.metrics_interval_ms,
            100,
        )
    }
}
