//! `[model]`: the folder bundles are delivered to and how they are checked.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::ConfigError;

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
    /// Resolved outcomes per model version the live quality is computed
    /// over (the newest).
    pub live_window: std::num::NonZeroUsize,
    /// Scored rows (the newest) the serving model's feature drift is
    /// measured over.
    pub drift_window: std::num::NonZeroUsize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("models/demo"),
            watch: true,
            verify_random_rows: 256,
            live_window: nonzero!(10_000),
            drift_window: nonzero!(10_000),
        }
    }
}

impl ModelConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::non_empty("model.dir", &self.dir)
    }
}
