//! A bundle's explainer: exact TreeSHAP over the compiled ensemble with the
//! covers the bundle carries, accepted only once it reproduces LightGBM's own
//! contributions of every golden vector and adds up to the served raw score.
//! The trainer's `predict --explain` and the appliance's `explain=true` both
//! come from here, so the offline reference and the live answer are one
//! implementation.

use serde::Serialize;
use thiserror::Error;

use crate::bundle::{BundleMetadata, GOLDEN_TOLERANCE};
use crate::compiled::CompiledEnsemble;
use crate::features::{FEATURE_COUNT, FEATURE_NAMES};
use crate::shap::{Explanation, ShapError, TreeExplainer};

#[derive(Debug, Error)]
pub enum ExplainError {
    #[error(
        "the bundle carries no node covers (`cartscore.shap`), so its scores cannot be explained; retrain it with this trainer"
    )]
    NoCovers,
    #[error("the bundle is not a plain tree ensemble, which is all TreeSHAP explains")]
    NotATreeEnsemble,
    #[error("the bundle's covers do not fit its trees: {0}")]
    Covers(#[from] ShapError),
    #[error("the bundle has {found} golden contributions for {expected} golden vectors")]
    GoldenCount { found: usize, expected: usize },
    #[error("golden contribution {index} has {found} values, expected {expected}")]
    GoldenWidth {
        index: usize,
        found: usize,
        expected: usize,
    },
    #[error(
        "golden vector {index}, {column}: TreeSHAP gives {actual}, LightGBM gave {expected} (|diff| {diff:e} > {GOLDEN_TOLERANCE:e})"
    )]
    GoldenMismatch {
        index: usize,
        column: &'static str,
        expected: f64,
        actual: f64,
        diff: f64,
    },
    #[error(
        "golden vector {index}: base + contributions = {total}, the served raw score is {raw} (|diff| {diff:e} > {GOLDEN_TOLERANCE:e})"
    )]
    LocalAccuracy {
        index: usize,
        total: f64,
        raw: f64,
        diff: f64,
    },
}

/// A verified explainer and how closely it met LightGBM.
#[derive(Debug, Clone)]
pub struct Explainer {
    shap: TreeExplainer,
    /// Largest |ours - LightGBM's| over the golden contributions.
    pub verified_max_diff: f64,
    pub verified_rows: usize,
}

/// One feature's part in a score, for `reasons`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Reason {
    pub name: &'static str,
    pub value: f32,
    /// In log-odds.
    pub contribution: f64,
}

impl Explainer {
    /// Builds the explainer of `compiled` from `metadata`'s covers and checks
    /// it against the golden contributions.
    pub fn verified(
        compiled: &CompiledEnsemble,
        metadata: &BundleMetadata,
    ) -> Result<Self, ExplainError> {
        let shap_meta = metadata.shap.as_ref().ok_or(ExplainError::NoCovers)?;
        let shap = compiled.explainer(&shap_meta.covers)?;
        let golden = &metadata.golden_vectors;
        if shap_meta.golden_contributions.len() != golden.len() {
            return Err(ExplainError::GoldenCount {
                found: shap_meta.golden_contributions.len(),
                expected: golden.len(),
            });
        }
        let mut worst = 0f64;
        for (index, (vector, theirs)) in golden
            .iter()
            .zip(&shap_meta.golden_contributions)
            .enumerate()
        {
            if theirs.len() != FEATURE_COUNT + 1 {
                return Err(ExplainError::GoldenWidth {
                    index,
                    found: theirs.len(),
                    expected: FEATURE_COUNT + 1,
                });
            }
            let ours = shap.explain(&vector.features);
            let pairs = ours
                .contributions
                .iter()
                .zip(FEATURE_NAMES)
                .chain([(&ours.base_value, "base_value")]);
            for ((&actual, column), &expected) in pairs.zip(theirs) {
                let diff = (actual - expected).abs();
                if diff.is_nan() || diff > GOLDEN_TOLERANCE {
                    return Err(ExplainError::GoldenMismatch {
                        index,
                        column,
                        expected,
                        actual,
                        diff,
                    });
                }
                worst = worst.max(diff);
            }
            let row: &[f32; FEATURE_COUNT] =
                vector
                    .features
                    .as_slice()
                    .try_into()
                    .map_err(|_| ExplainError::GoldenWidth {
                        index,
                        found: vector.features.len(),
                        expected: FEATURE_COUNT,
                    })?;
            let total = ours.total();
            let raw = f64::from(compiled.raw_score(row));
            let diff = (total - raw).abs();
            if diff.is_nan() || diff > GOLDEN_TOLERANCE {
                return Err(ExplainError::LocalAccuracy {
                    index,
                    total,
                    raw,
                    diff,
                });
            }
        }
        Ok(Self {
            shap,
            verified_max_diff: worst,
            verified_rows: golden.len(),
        })
    }

    pub fn explain(&self, row: &[f32; FEATURE_COUNT]) -> Explanation {
        self.shap.explain(row)
    }

    pub fn base_value(&self) -> f64 {
        self.shap.expected_value()
    }
}

/// The features of `row` by |contribution|, largest first (ties in the
/// contract's column order).
pub fn reasons(row: &[f32; FEATURE_COUNT], explanation: &Explanation) -> Vec<Reason> {
    let mut reasons: Vec<Reason> = FEATURE_NAMES
        .iter()
        .zip(row)
        .zip(&explanation.contributions)
        .map(|((&name, &value), &contribution)| Reason {
            name,
            value,
            contribution,
        })
        .collect();
    reasons.sort_by(|a, b| b.contribution.abs().total_cmp(&a.contribution.abs()));
    reasons
}
