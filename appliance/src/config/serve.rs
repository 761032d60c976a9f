//! `[http]` and `[tcp]`: the JSON API and the binary protocol.

use std::net::SocketAddr;
use std::num::NonZeroUsize;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Most events in one /v1/score batch or rows in one KServe infer call.
    pub max_batch: NonZeroUsize,
    /// Most events in one /v1/events request.
    pub max_ingest_events: NonZeroUsize,
    /// Bearer token for /admin/*; empty means no token is required.
    pub admin_token: String,
    /// Tokio worker threads for the HTTP API.
    pub workers: NonZeroUsize,
    /// Open connections held at most; one more is closed at once (counted).
    pub max_connections: NonZeroUsize,
    /// A connection whose next request's headers have not all arrived this
    /// long after it started waiting for them (a slow client, or an idle
    /// keep-alive connection) is closed.
    pub header_read_timeout_ms: u64,
    /// A request whose body and answer take longer is answered 408.
    pub request_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 4 * 1024 * 1024,
            max_batch: nonzero!(1_000),
            max_ingest_events: nonzero!(10_000),
            admin_token: String::new(),
            workers: NonZeroUsize::MIN,
            max_connections: nonzero!(1_024),
            header_read_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
        }
    }
}

impl HttpConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::at_least("http.max_body_bytes", self.max_body_bytes, 1024)?;
        ConfigError::at_least(
            "http.header_read_timeout_ms",
            self.header_read_timeout_ms,
            100,
        )?;
        ConfigError::at_least("http.request_timeout_ms", self.request_timeout_ms, 100)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoDriver {
    /// io_uring where the kernel allows it, epoll otherwise.
    Auto,
    /// Always epoll (monoio's legacy driver).
    Epoll,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// Serving threads, each with its own SO_REUSEPORT listener; 0 = one per CPU.
    pub cores: usize,
    pub driver: IoDriver,
    /// Largest accepted request frame (bytes after the length prefix).
    pub max_frame_bytes: u32,
    /// Open connections held at most, over all cores; one more is closed
    /// at once (counted).
    pub max_connections: NonZeroUsize,
    /// A connection that sends no complete frame for this long is closed;
    /// 0 keeps idle connections open.
    pub idle_timeout_ms: u64,
    /// A connection whose answers cannot be written for this long (a client
    /// that does not read) is closed.
    pub write_timeout_ms: u64,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            cores: 0,
            driver: IoDriver::Auto,
            max_frame_bytes: 4096,
            max_connections: nonzero!(4_096),
            idle_timeout_ms: 300_000,
            write_timeout_ms: 10_000,
        }
    }
}

impl TcpConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(64..=1 << 20).contains(&self.max_frame_bytes) {
            return Err(ConfigError::invalid(
                "tcp.max_frame_bytes",
                self.max_frame_bytes,
                "must be between 64 and 1048576",
            ));
        }
        ConfigError::at_least("tcp.write_timeout_ms", self.write_timeout_ms, 100)?;
        if self.idle_timeout_ms != 0 {
            ConfigError::at_least("tcp.idle_timeout_ms", self.idle_timeout_ms, 100)?;
        }
        if self.cores > 1024 {
            return Err(ConfigError::invalid(
                "tcp.cores",
                self.cores,
                "must be at most 1024",
            ));
        }
        Ok(())
    }
}
