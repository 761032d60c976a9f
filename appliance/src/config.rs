//! The appliance's settings: embedded defaults < TOML file < `CARTSCORE_*`
//! environment < command-line flags, then validated as a whole so that a bad
//! value is reported by its field name before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use cartscore_core::state::{SESSION_IDLE_TIMEOUT_SECS, USER_IDLE_TIMEOUT_SECS};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Environment variables override file settings as
/// `CARTSCORE_<SECTION>__<FIELD>`, e.g. `CARTSCORE_HTTP__LISTEN=0.0.0.0:8080`.
pub const ENV_PREFIX: &str = "CARTSCORE_";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApplianceConfig {
    pub store: StoreConfig,
    pub model: ModelConfig,
    pub http: HttpConfig,
    pub tcp: TcpConfig,
    pub log: LogConfig,
    pub kafka: KafkaConfig,
    pub telemetry: TelemetryConfig,
    /// How long SIGTERM waits for in-flight requests before exiting anyway.
    pub shutdown_grace_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Folder of the LMDB environment (created if missing).
    pub path: PathBuf,
    /// Size of the memory map: the most the store can hold.
    pub map_size_mib: u64,
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
    pub sweep_batch: usize,
    /// Most events applied in one write transaction.
    pub max_batch_events: usize,
    /// fsync every commit. Off trades the last transactions on power loss
    /// (never on a process crash) for write throughput.
    pub sync: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Folder watched for `.onnx` bundles; the newest valid one serves.
    pub dir: PathBuf,
    /// Reload when files change in the folder (SIGHUP and /admin/reload work
    /// regardless).
    pub watch: bool,
    /// Random feature rows on which a compiled ensemble must match tract
    /// before it may serve (in addition to the bundle's golden vectors).
    pub verify_random_rows: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Most events in one /v1/score batch or rows in one KServe infer call.
    pub max_batch: usize,
    /// Most events in one /v1/events request.
    pub max_ingest_events: usize,
    /// Bearer token for /admin/*; empty means no token is required.
    pub admin_token: String,
    /// Tokio worker threads for the HTTP API.
    pub workers: usize,
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
}

/// How an appliance divides the stream with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaMode {
    /// Consume every partition of the topics (no group membership): each
    /// appliance holds every session. Restarts resume at once.
    Replica,
    /// Join the consumer group and take the partitions it assigns: sessions
    /// are split between the group's appliances. Set `group.instance.id` in
    /// `kafka.properties` so a restart keeps its partitions.
    Shard,
}

/// The Kafka event source. Without brokers the appliance takes events over
/// `POST /v1/events` only (the embedded default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port…]`; empty = no Kafka.
    pub brokers: String,
    pub mode: KafkaMode,
    /// Consumer group: the group shards share; for replicas, the name their
    /// offsets are committed under (give each replica its own).
    pub group_id: String,
    /// Topics of raw events (flat JSON, JsonConverter envelopes or Debezium
    /// ExtractNewRecordState rows).
    pub topics: Vec<String>,
    /// Valid events are produced here, normalised, when `forward_validated`.
    pub validated_topic: String,
    pub forward_validated: bool,
    /// Invalid messages are produced here with the reason and original bytes.
    pub invalid_topic: String,
    /// Most messages per write transaction.
    pub batch_max_events: usize,
    /// Longest a message waits for its batch to fill before it is applied.
    pub batch_max_ms: u64,
    /// The stream counts as stale when the store has not held everything the
    /// broker had for this long.
    pub stale_after_ms: u64,
    /// A stale stream makes /readyz answer 503 (otherwise it only says so).
    pub unready_when_stale: bool,
    /// Extra librdkafka settings for both clients (security, timeouts…).
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            mode: KafkaMode::Replica,
            group_id: "cartscore".into(),
            topics: vec![
                "tracking.raw_user_behavior".into(),
                "tracking_postgres_cdc.public.events".into(),
            ],
            validated_topic: "tracking.user_behavior.validated".into(),
            forward_validated: false,
            invalid_topic: "tracking.user_behavior.invalid".into(),
            batch_max_events: 5_000,
            batch_max_ms: 5,
            stale_after_ms: 10_000,
            unready_when_stale: false,
            properties: std::collections::BTreeMap::new(),
        }
    }
}

impl KafkaConfig {
    pub fn enabled(&self) -> bool {
        !self.brokers.is_empty()
    }
}

/// Kafka's rule for topic names.
fn valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

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

impl TelemetryConfig {
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }
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

impl Default for ApplianceConfig {
    fn default() -> Self {
        Self {
            store: StoreConfig::default(),
            model: ModelConfig::default(),
            http: HttpConfig::default(),
            tcp: TcpConfig::default(),
            log: LogConfig::default(),
            kafka: KafkaConfig::default(),
            telemetry: TelemetryConfig::default(),
            shutdown_grace_ms: 10_000,
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("var/cartscore"),
            map_size_mib: 1024,
            session_idle_expiry_secs: SESSION_IDLE_TIMEOUT_SECS as u64,
            user_idle_expiry_secs: USER_IDLE_TIMEOUT_SECS as u64,
            allowed_lateness_secs: 4 * 3600,
            sweep_batch: 1_000,
            max_batch_events: 10_000,
            sync: true,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("models/demo"),
            watch: true,
            verify_random_rows: 256,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 4 * 1024 * 1024,
            max_batch: 1_000,
            max_ingest_events: 10_000,
            admin_token: String::new(),
            workers: 1,
        }
    }
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            cores: 0,
            driver: IoDriver::Auto,
            max_frame_bytes: 4096,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config file {path} does not exist")]
    Missing { path: PathBuf },
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid value for {field} ({value}): {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
}

/// Settings given on the command line, applied last.
#[derive(Debug, Default, Clone)]
pub struct CliOverrides {
    pub http_listen: Option<SocketAddr>,
    pub tcp_listen: Option<SocketAddr>,
    pub store_path: Option<PathBuf>,
    pub model_dir: Option<PathBuf>,
}

impl CliOverrides {
    /// Each flag given, as a setting at its dotted key.
    fn merge_into(&self, mut figment: Figment) -> Figment {
        if let Some(v) = self.http_listen {
            figment = figment.merge(Serialized::default("http.listen", v));
        }
        if let Some(v) = self.tcp_listen {
            figment = figment.merge(Serialized::default("tcp.listen", v));
        }
        if let Some(v) = &self.store_path {
            figment = figment.merge(Serialized::default("store.path", v));
        }
        if let Some(v) = &self.model_dir {
            figment = figment.merge(Serialized::default("model.dir", v));
        }
        figment
    }
}

impl ApplianceConfig {
    /// Defaults, then `file` (if any), then the environment, then `cli`.
    pub fn load(file: Option<&Path>, cli: &CliOverrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Self::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Missing { path: path.into() });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // Only `CARTSCORE_<SECTION>__<FIELD>` variables are settings; other
        // CARTSCORE_* variables (the trainer's, the test harness's) are not.
        let env = Env::prefixed(ENV_PREFIX)
            .filter(|key| key.as_str().contains("__"))
            .split("__");
        let mut config: Self = cli
            .merge_into(figment.merge(env))
            .extract()
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.normalise();
        config.validate()?;
        Ok(config)
    }

    fn validate_kafka(&self) -> Result<(), ConfigError> {
        let k = &self.kafka;
        if !k.enabled() {
            return Ok(());
        }
        let invalid = |field: &'static str, value: &dyn std::fmt::Display, reason: &str| {
            ConfigError::Invalid {
                field,
                value: value.to_string(),
                reason: reason.into(),
            }
        };
        if k.group_id.is_empty() {
            return Err(invalid("kafka.group_id", &"\"\"", "must not be empty"));
        }
        if k.topics.is_empty() {
            return Err(invalid("kafka.topics", &"[]", "name at least one topic"));
        }
        for topic in &k.topics {
            if !valid_topic(topic) {
                return Err(invalid(
                    "kafka.topics",
                    topic,
                    "a topic name is 1 to 249 of [a-zA-Z0-9._-]",
                ));
            }
        }
        for (field, topic) in [
            ("kafka.validated_topic", &k.validated_topic),
            ("kafka.invalid_topic", &k.invalid_topic),
        ] {
            if !valid_topic(topic) {
                return Err(invalid(
                    field,
                    topic,
                    "a topic name is 1 to 249 of [a-zA-Z0-9._-]",
                ));
            }
            if k.topics.contains(topic) {
                return Err(invalid(
                    field,
                    topic,
                    "is also consumed (kafka.topics): its records would loop back",
                ));
            }
        }
        if !(1..=crate::stream::MAX_BATCH_EVENTS).contains(&k.batch_max_events) {
            return Err(invalid(
                "kafka.batch_max_events",
                &k.batch_max_events,
                "must be between 1 and 1048576",
            ));
        }
        if k.batch_max_ms == 0 {
            return Err(invalid("kafka.batch_max_ms", &0, "must be at least 1"));
        }
        if let Some(key) = k
            .properties
            .keys()
            .find(|key| crate::stream::MANAGED_PROPERTIES.contains(&key.as_str()))
        {
            return Err(invalid(
                "kafka.properties",
                key,
                "is set by the appliance itself (offsets live in the store)",
            ));
        }
        Ok(())
    }

    fn normalise(&mut self) {
        if self.tcp.cores == 0 {
            self.tcp.cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        }
    }

    /// Every rule a running appliance relies on, each naming its field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(field: &'static str, value: impl ToString, reason: &str) -> ConfigError {
            ConfigError::Invalid {
                field,
                value: value.to_string(),
                reason: reason.into(),
            }
        }
        let s = &self.store;
        if s.map_size_mib < 1 {
            return Err(invalid(
                "store.map_size_mib",
                s.map_size_mib,
                "must be at least 1",
            ));
        }
        if s.map_size_mib > 1 << 24 {
            return Err(invalid(
                "store.map_size_mib",
                s.map_size_mib,
                "must be at most 16 TiB",
            ));
        }
        if s.session_idle_expiry_secs < SESSION_IDLE_TIMEOUT_SECS as u64 {
            return Err(invalid(
                "store.session_idle_expiry_secs",
                s.session_idle_expiry_secs,
                "must be at least the feature contract's session timeout (7200 s): expiring sooner would change live features",
            ));
        }
        if s.user_idle_expiry_secs < USER_IDLE_TIMEOUT_SECS as u64 {
            return Err(invalid(
                "store.user_idle_expiry_secs",
                s.user_idle_expiry_secs,
                "must be at least the feature contract's user timeout (7776000 s)",
            ));
        }
        if s.sweep_batch == 0 {
            return Err(invalid("store.sweep_batch", 0, "must be at least 1"));
        }
        if s.max_batch_events == 0 {
            return Err(invalid("store.max_batch_events", 0, "must be at least 1"));
        }
        if s.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "\"\"", "must not be empty"));
        }
        if self.model.dir.as_os_str().is_empty() {
            return Err(invalid("model.dir", "\"\"", "must not be empty"));
        }
        let h = &self.http;
        if h.max_body_bytes < 1024 {
            return Err(invalid(
                "http.max_body_bytes",
                h.max_body_bytes,
                "must be at least 1024",
            ));
        }
        if h.max_batch == 0 {
            return Err(invalid("http.max_batch", 0, "must be at least 1"));
        }
        if h.max_ingest_events == 0 {
            return Err(invalid("http.max_ingest_events", 0, "must be at least 1"));
        }
        if h.workers == 0 {
            return Err(invalid("http.workers", 0, "must be at least 1"));
        }
        self.validate_kafka()?;
        let t = &self.telemetry;
        if t.enabled()
            && !(t.otlp_endpoint.starts_with("http://") || t.otlp_endpoint.starts_with("https://"))
        {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                &t.otlp_endpoint,
                "must be an http:// or https:// URL (OTLP/HTTP), or empty for no export",
            ));
        }
        if !(t.request_sample_ratio > 0.0 && t.request_sample_ratio <= 1.0) {
            return Err(invalid(
                "telemetry.request_sample_ratio",
                t.request_sample_ratio,
                "must be above 0 and at most 1",
            ));
        }
        if t.metrics_interval_ms < 100 {
            return Err(invalid(
                "telemetry.metrics_interval_ms",
                t.metrics_interval_ms,
                "must be at least 100",
            ));
        }
        let t = &self.tcp;
        if !(64..=1 << 20).contains(&t.max_frame_bytes) {
            return Err(invalid(
                "tcp.max_frame_bytes",
                t.max_frame_bytes,
                "must be between 64 and 1048576",
            ));
        }
        if t.cores > 1024 {
            return Err(invalid("tcp.cores", t.cores, "must be at most 1024"));
        }
        if t.enabled && t.listen == h.listen && t.listen.port() != 0 {
            return Err(invalid(
                "tcp.listen",
                t.listen,
                "must differ from http.listen",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.filter).is_err() {
            return Err(invalid(
                "log.filter",
                &self.log.filter,
                "not a tracing filter",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    #[test]
    fn defaults_are_valid_and_match_the_shipped_example() {
        let config = ApplianceConfig::load(None, &CliOverrides::default()).unwrap();
        assert_eq!(config.http.listen.port(), 8080);
        assert_eq!(config.tcp.listen.port(), 7070);
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/appliance.toml");
        let from_file = ApplianceConfig::load(Some(&example), &CliOverrides::default()).unwrap();
        assert_eq!(from_file, config);
    }

    #[test]
    fn kafka_settings_are_checked_only_when_enabled() {
        let load = |text: &str| {
            ApplianceConfig::load(Some(write(text).path()), &CliOverrides::default())
                .map_err(|e| e.to_string())
        };
        // Without brokers the section is inert.
        assert!(load("[kafka]\ntopics = []\n").is_ok());
        let on = "[kafka]\nbrokers = \"127.0.0.1:9092\"\n";
        assert!(load(on).is_ok());
        let err = load(&format!("{on}topics = []\n")).unwrap_err();
        assert!(err.contains("kafka.topics"), "{err}");
        let err = load(&format!("{on}topics = [\"bad topic\"]\n")).unwrap_err();
        assert!(err.contains("kafka.topics (bad topic)"), "{err}");
        let err = load(&format!(
            "{on}invalid_topic = \"tracking.raw_user_behavior\"\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("kafka.invalid_topic") && err.contains("loop"),
            "{err}"
        );
        let err = load(&format!(
            "{on}[kafka.properties]\n\"enable.auto.commit\" = \"true\"\n"
        ))
        .unwrap_err();
        assert!(
            err.contains("kafka.properties (enable.auto.commit)"),
            "{err}"
        );
        let err = load(&format!("{on}mode = \"sideways\"\n")).unwrap_err();
        assert!(err.contains("sideways"), "{err}");
    }

    #[test]
    fn file_then_cli() {
        let file = write("[http]\nlisten = \"127.0.0.1:9000\"\nmax_batch = 7\n");
        let cli = CliOverrides {
            http_listen: Some("127.0.0.1:9001".parse().unwrap()),
            ..Default::default()
        };
        let config = ApplianceConfig::load(Some(file.path()), &cli).unwrap();
        assert_eq!(config.http.listen.port(), 9001);
        assert_eq!(config.http.max_batch, 7);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let file = write("[http]\nlisen = \"127.0.0.1:9000\"\n");
        let err = ApplianceConfig::load(Some(file.path()), &CliOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("lisen"), "{err}");
        let file = write("[store]\nsession_idle_expiry_secs = 60\n");
        let err = ApplianceConfig::load(Some(file.path()), &CliOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("store.session_idle_expiry_secs (60)"), "{err}");
        let file = write("[tcp]\nmax_frame_bytes = 1\n");
        let err = ApplianceConfig::load(Some(file.path()), &CliOverrides::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("tcp.max_frame_bytes"), "{err}");
        let missing = ApplianceConfig::load(
            Some(Path::new("/nonexistent.toml")),
            &CliOverrides::default(),
        );
        assert!(matches!(missing, Err(ConfigError::Missing { .. })));
    }
}
