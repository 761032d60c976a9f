//! What `train` is told: the settings a TOML file or flags may give, and
//! the request the CLI builds from them.

use std::path::PathBuf;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::source::SourceSpec;

/// Everything `train` can be told; a TOML file may set any of it, flags win.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub trials: usize,
    pub threads: usize,
    pub seed: u64,
    pub max_iterations: u32,
    /// Rounds without a better validation log-loss that end a trial; 0
    /// trains exactly `max_iterations` trees.
    pub early_stopping: u32,
    /// Leaves per tree in every trial, instead of searching it (for models
    /// of a given shape, such as the engine comparison's).
    pub num_leaves: Option<u32>,
    /// Share of cart examples (by time) in the training window.
    pub train_fraction: f64,
    /// Share in the validation window; the rest is the test window.
    pub validation_fraction: f64,
    /// Largest tolerated share of invalid input rows.
    pub error_budget: f64,
    pub golden_vectors: usize,
    /// Most rows of the training (and the validation) window a search trial
    /// sees. A trial's cost grows with the rows, and the ranking of
    /// parameters settles long before the data set's 12 M training rows:
    /// a larger window is sampled (uniformly, seeded) for the search, and the
    /// winner is trained again on all of it, early-stopped on the whole
    /// validation window. 0 searches on every row.
    pub tune_rows: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            trials: 8,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            seed: 1,
            max_iterations: 400,
            early_stopping: 30,
            num_leaves: None,
            train_fraction: 0.7,
            validation_fraction: 0.15,
            error_budget: 0.05,
            golden_vectors: 32,
            tune_rows: 1_000_000,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, value: String, why: &str| {
            anyhow::anyhow!("config field `{field}` = {value}: {why}")
        };
        if self.trials == 0 {
            return Err(bad("trials", self.trials.to_string(), "must be at least 1"));
        }
        if !(0.1..0.95).contains(&self.train_fraction) {
            return Err(bad(
                "train_fraction",
                self.train_fraction.to_string(),
                "must be in [0.1, 0.95)",
            ));
        }
        if !(0.01..0.5).contains(&self.validation_fraction)
            || self.train_fraction + self.validation_fraction >= 0.99
        {
            return Err(bad(
                "validation_fraction",
                self.validation_fraction.to_string(),
                "must be in [0.01, 0.5) and leave at least 1% for the test window",
            ));
        }
        if !(0.0..=1.0).contains(&self.error_budget) {
            return Err(bad(
                "error_budget",
                self.error_budget.to_string(),
                "must be a fraction in [0, 1]",
            ));
        }
        if let Some(leaves) = self.num_leaves
            && !(2..=4096).contains(&leaves)
        {
            return Err(bad(
                "num_leaves",
                leaves.to_string(),
                "must be in [2, 4096]",
            ));
        }
        if self.tune_rows != 0 && self.tune_rows < 1_000 {
            return Err(bad(
                "tune_rows",
                self.tune_rows.to_string(),
                "must be 0 (every row) or at least 1000",
            ));
        }
        if self.golden_vectors == 0 {
            return Err(bad("golden_vectors", "0".into(), "must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct TrainRequest {
    pub source: SourceSpec,
    pub out: PathBuf,
    pub oracle: Option<PathBuf>,
    pub model_version: Option<String>,
    pub write_test_rows: bool,
    pub config: TrainConfig,
}
