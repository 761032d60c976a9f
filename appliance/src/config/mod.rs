//! The appliance's settings: embedded defaults < TOML file < `CARTSCORE_*`
//! environment < command-line flags. Each section lives in its own file with
//! its defaults beside it and validates itself, naming the bad field and
//! value, before anything starts. This module imports nothing else of the
//! crate: every other part reads its settings from here.

/// A default that must be positive, checked when the crate compiles.
macro_rules! nonzero {
    ($n:expr) => {
        const { std::num::NonZero::new($n).expect("a positive default") }
    };
}

mod error;
mod kafka;
mod model;
mod ops;
mod serve;
mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use error::ConfigError;
pub use kafka::{INSTANCE_ID, KafkaConfig, KafkaMode, MANAGED_PROPERTIES, MAX_BATCH_EVENTS};
pub use model::ModelConfig;
pub use ops::{LogConfig, LogFormat, TelemetryConfig};
pub use serve::{HttpConfig, IoDriver, TcpConfig};
pub use store::StoreConfig;

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

/// The settings a flag may override, declared once: each field is a flag
/// (`--http-listen`) and, by its serde name, the dotted key it sets. Global,
/// so it is accepted before or after the subcommand.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
pub struct Overrides {
    /// Override http.listen.
    #[arg(long, global = true)]
    #[serde(rename = "http.listen", skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,
    /// Override tcp.listen.
    #[arg(long, global = true)]
    #[serde(rename = "tcp.listen", skip_serializing_if = "Option::is_none")]
    pub tcp_listen: Option<SocketAddr>,
    /// Override store.path.
    #[arg(long, global = true)]
    #[serde(rename = "store.path", skip_serializing_if = "Option::is_none")]
    pub store_path: Option<PathBuf>,
    /// Override model.dir.
    #[arg(long, global = true)]
    #[serde(rename = "model.dir", skip_serializing_if = "Option::is_none")]
    pub model_dir: Option<PathBuf>,
}

impl Overrides {
    /// Each flag given, as a setting at its dotted key.
    fn merge_into(&self, mut figment: Figment) -> Result<Figment, ConfigError> {
        let given = figment::value::Value::serialize(self)
            .map_err(|e| ConfigError::Parse(format!("command-line flags: {e}")))?;
        for (key, value) in given.into_dict().unwrap_or_default() {
            figment = figment.merge(Serialized::default(&key, value));
        }
        Ok(figment)
    }
}

impl ApplianceConfig {
    /// Defaults, then `file` (if any), then the environment, then `flags`.
    pub fn load(file: Option<&Path>, flags: &Overrides) -> Result<Self, ConfigError> {
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
        let mut config: Self = flags
            .merge_into(figment.merge(env))?
            .extract()
            .map_err(ConfigError::from_figment)?;
        config.normalise();
        config.validate()?;
        Ok(config)
    }

    /// Defaults, then the TOML `text` (no environment, no flags): the
    /// config file's rules alone, for `validate` tooling and the fuzzer.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let mut config: Self = Figment::from(Serialized::defaults(Self::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(ConfigError::from_figment)?;
        config.normalise();
        config.validate()?;
        Ok(config)
    }

    fn normalise(&mut self) {
        if self.tcp.cores == 0 {
            self.tcp.cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        }
    }

    /// Every rule a running appliance relies on: each section's own, then
    /// the ones between sections.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.store.validate()?;
        self.model.validate()?;
        self.http.validate()?;
        self.tcp.validate()?;
        self.log.validate()?;
        self.kafka.validate()?;
        self.telemetry.validate()?;
        let (tcp, http) = (&self.tcp, &self.http);
        if tcp.enabled && tcp.listen == http.listen && tcp.listen.port() != 0 {
            return Err(ConfigError::invalid(
                "tcp.listen",
                tcp.listen,
                "must differ from http.listen",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        file
    }

    /// Loads `text` as the config file; the error as text.
    pub(crate) fn load(text: &str) -> Result<ApplianceConfig, String> {
        ApplianceConfig::load(Some(write(text).path()), &Overrides::default())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid_and_match_the_shipped_example() {
        let config = ApplianceConfig::load(None, &Overrides::default()).unwrap();
        assert_eq!(config.http.listen.port(), 8080);
        assert_eq!(config.tcp.listen.port(), 7070);
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/appliance.toml");
        let from_file = ApplianceConfig::load(Some(&example), &Overrides::default()).unwrap();
        assert_eq!(from_file, config);
    }

    #[test]
    fn file_then_flags() {
        let file = write("[http]\nlisten = \"127.0.0.1:9000\"\nmax_batch = 7\n");
        let flags = Overrides {
            http_listen: Some("127.0.0.1:9001".parse().unwrap()),
            store_path: Some("/tmp/elsewhere".into()),
            ..Overrides::default()
        };
        let config = ApplianceConfig::load(Some(file.path()), &flags).unwrap();
        assert_eq!(config.http.listen.port(), 9001);
        assert_eq!(config.http.max_batch.get(), 7);
        assert_eq!(config.store.path, Path::new("/tmp/elsewhere"));
        assert_eq!(config.tcp.listen.port(), 7070);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let err = load("[http]\nlisen = \"127.0.0.1:9000\"\n").unwrap_err();
        assert!(err.contains("lisen"), "{err}");
        let err = load("[store]\nsession_idle_expiry_secs = 60\n").unwrap_err();
        assert!(err.contains("store.session_idle_expiry_secs (60)"), "{err}");
        let err = load("[tcp]\nmax_frame_bytes = 1\n").unwrap_err();
        assert!(err.contains("tcp.max_frame_bytes"), "{err}");
        let missing =
            ApplianceConfig::load(Some(Path::new("/nonexistent.toml")), &Overrides::default());
        assert!(matches!(missing, Err(ConfigError::Missing { .. })));
    }

    #[test]
    fn a_zero_where_a_count_must_be_positive_names_the_field() {
        for (section, field) in [
            ("store", "sweep_batch"),
            ("store", "max_batch_events"),
            ("store", "map_size_mib"),
            ("http", "max_batch"),
            ("http", "max_ingest_events"),
            ("http", "workers"),
            ("kafka", "batch_max_events"),
            ("kafka", "batch_max_ms"),
        ] {
            let err = load(&format!("[{section}]\n{field} = 0\n")).unwrap_err();
            assert!(
                err.contains(&format!("invalid value for {section}.{field} ("))
                    && err.contains("nonzero"),
                "{section}.{field}: {err}"
            );
        }
    }

    #[test]
    fn tcp_and_http_must_not_share_an_address() {
        let err = load("[http]\nlisten = \"127.0.0.1:9000\"\n[tcp]\nlisten = \"127.0.0.1:9000\"\n")
            .unwrap_err();
        assert!(err.contains("tcp.listen"), "{err}");
    }
}
