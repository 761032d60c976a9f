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
    /// Larger bundle files are refused before they are read.
    pub max_bundle_bytes: u64,
    /// Resolved outcomes per model version the live quality is computed
    /// over (the newest).
    pub live_window: std::num::NonZeroUsize,
    /// Scored rows (the newest) the serving model's feature drift is
    /// measured over.
    pub drift_window: std::num::NonZeroUsize,
    /// Folder of the challenger: its newest valid bundle scores every cart
    /// beside the primary. Default: `shadow/` inside `dir`.
    pub shadow_dir: Option<PathBuf>,
    /// Share of sessions (by a stable hash of the session id) the
    /// challenger answers instead of the primary; 0 = shadow only.
    pub canary_share: f64,
    /// The decision threshold of the champion/challenger agreement: the
    /// share of carts on which one model is at or above it and the other
    /// below.
    pub flip_threshold: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("models/demo"),
            watch: true,
            verify_random_rows: 256,
            max_bundle_bytes: 256 * 1024 * 1024,
            live_window: nonzero!(10_000),
            drift_window: nonzero!(10_000),
            shadow_dir: None,
            canary_share: 0.0,
            flip_threshold: 0.5,
        }
    }
}

impl ModelConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::non_empty("model.dir", &self.dir)?;
        // The smallest valid bundle is a few kilobytes.
        ConfigError::at_least("model.max_bundle_bytes", self.max_bundle_bytes, 1024)?;
        if let Some(shadow) = &self.shadow_dir {
            ConfigError::non_empty("model.shadow_dir", shadow)?;
            if shadow == &self.dir {
                return Err(ConfigError::invalid(
                    "model.shadow_dir",
                    shadow.display(),
                    "must not be model.dir: the challenger needs a folder of its own",
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.canary_share) {
            return Err(ConfigError::invalid(
                "model.canary_share",
                self.canary_share,
                "must be a share between 0 and 1",
            ));
        }
        if !(self.flip_threshold > 0.0 && self.flip_threshold < 1.0) {
            return Err(ConfigError::invalid(
                "model.flip_threshold",
                self.flip_threshold,
                "must be a probability strictly between 0 and 1",
            ));
        }
        Ok(())
    }

    /// The challenger's folder.
    pub fn shadow_dir(&self) -> PathBuf {
        self.shadow_dir
            .clone()
            .unwrap_or_else(|| self.dir.join("shadow"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_thresholds_are_checked_and_the_shadow_folder_defaults_inside() {
        let config = ModelConfig::default();
        assert!(config.validate().is_ok());
        assert_eq!(config.shadow_dir(), PathBuf::from("models/demo/shadow"));
        for (edit, field) in [
            (
                Box::new(|c: &mut ModelConfig| c.canary_share = 1.5)
                    as Box<dyn Fn(&mut ModelConfig)>,
                "model.canary_share",
            ),
            (
                Box::new(|c| c.canary_share = f64::NAN),
                "model.canary_share",
            ),
            (Box::new(|c| c.flip_threshold = 1.0), "model.flip_threshold"),
            (
                Box::new(|c| c.shadow_dir = Some(PathBuf::from("models/demo"))),
                "model.shadow_dir",
            ),
        ] {
            let mut bad = ModelConfig::default();
            edit(&mut bad);
            let error = bad.validate().unwrap_err().to_string();
            assert!(error.contains(field), "{error}");
        }
    }
}
