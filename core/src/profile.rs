//! The training data's profile, for drift: per feature, bins cut at the
//! training window's quantiles with the share of rows in each, and the share
//! of the "not available" sentinel; and the model's score distribution on
//! the validation window. The trainer writes it into the bundle; the
//! appliance bins its scored rows the same way and compares the two with
//! the population stability index.

use serde::{Deserialize, Serialize};

use crate::features::{FEATURE_COUNT, FEATURE_NAMES, NOT_AVAILABLE};

/// Quantile bins per histogram (fewer where values repeat).
pub const PROFILE_BINS: usize = 10;

/// Slots a histogram may have (bins and the missing one), so that a
/// counter's slot fits a byte.
pub const MAX_SLOTS: usize = u8::MAX as usize;

/// Shares are floored at this before the PSI's logarithm, so a bin empty
/// on one side adds a large but finite term (the usual convention).
pub const PSI_FLOOR: f64 = 1e-4;

/// A histogram: `edges` cut the line into `edges.len() + 1` bins,
/// `(-inf, e0)`, `[e0, e1)`, …, `[e_last, +inf)`; `missing` is the share of
/// the sentinel (and NaN), which sits in no bin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Histogram {
    /// f32, the type of the features and scores binned: JSON carries an
    /// f32 exactly, and a value equal to an edge stays equal after reading.
    pub edges: Vec<f32>,
    pub shares: Vec<f64>,
    pub missing: f64,
}

/// One feature's histogram, named.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureHistogram {
    pub name: String,
    pub histogram: Histogram,
}

/// What the bundle says its inputs and scores looked like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataProfile {
    /// Training-window rows the feature histograms were made from.
    pub rows: usize,
    pub features: Vec<FeatureHistogram>,
    /// Validation-window rows the score histogram was made from.
    pub score_rows: usize,
    pub score: Histogram,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProfileError {
    #[error("the profile has {found} features, the contract has {expected}")]
    FeatureCount { found: usize, expected: usize },
    #[error("the profile's feature {column} is `{found}`, the contract's is `{expected}`")]
    FeatureName {
        column: usize,
        found: String,
        expected: &'static str,
    },
    #[error(
        "histogram `{name}` has {edges} edges and {shares} shares (needs edges + 1, at most {MAX_SLOTS} bins in all)"
    )]
    Shape {
        name: String,
        edges: usize,
        shares: usize,
    },
    #[error("histogram `{name}`'s edges are not strictly increasing finite numbers")]
    Edges { name: String },
    #[error("histogram `{name}`'s shares are not non-negative and summing to 1 (sum {sum})")]
    Shares { name: String, sum: f64 },
}

impl Histogram {
    /// Cuts `values` at their quantiles; NaN and [`NOT_AVAILABLE`] are
    /// counted as missing. `values` need not be sorted.
    pub fn from_values(values: impl IntoIterator<Item = f32>, bins: usize) -> Self {
        let mut present = Vec::new();
        let mut missing = 0usize;
        for v in values {
            if is_missing(v) {
                missing += 1;
            } else {
                present.push(v);
            }
        }
        present.sort_by(f32::total_cmp);
        let total = present.len() + missing;
        let mut edges: Vec<f32> = Vec::new();
        if !present.is_empty() {
            for k in 1..bins {
                let edge = present[k * present.len() / bins];
                // A quantile equal to the minimum would leave the first bin
                // empty on the training side: such values go to the bin above.
                if edge > present[0] && edges.last().is_none_or(|&last| edge > last) {
                    edges.push(edge);
                }
            }
        }
        let mut counts = vec![0usize; edges.len() + 1];
        for &v in &present {
            counts[bin_of(&edges, v)] += 1;
        }
        let share = |c: usize| {
            if total == 0 {
                0.0
            } else {
                c as f64 / total as f64
            }
        };
        Self {
            shares: counts.into_iter().map(share).collect(),
            missing: share(missing),
            edges,
        }
    }

    /// Slots of a counter for this histogram: one per bin and the last for
    /// missing values.
    pub fn slots(&self) -> usize {
        self.shares.len() + 1
    }

    /// The slot `value` falls in (see [`Self::slots`]).
    pub fn slot(&self, value: f32) -> usize {
        if is_missing(value) {
            self.shares.len()
        } else {
            bin_of(&self.edges, value)
        }
    }

    /// The population stability index of `counts` (per slot) against this
    /// histogram: sum over slots of (actual - expected) * ln(actual /
    /// expected), shares floored at [`PSI_FLOOR`]. None without counts.
    pub fn psi(&self, counts: &[u64]) -> Option<f64> {
        let total: u64 = counts.iter().sum();
        if total == 0 || counts.len() != self.slots() {
            return None;
        }
        let expected = self.shares.iter().chain(std::iter::once(&self.missing));
        Some(
            expected
                .zip(counts)
                .filter(|&(&e, &c)| e > 0.0 || c > 0)
                .map(|(&e, &c)| {
                    let a = (c as f64 / total as f64).max(PSI_FLOOR);
                    let e = e.max(PSI_FLOOR);
                    (a - e) * (a / e).ln()
                })
                .sum(),
        )
    }

    fn check(&self, name: &str) -> Result<(), ProfileError> {
        if self.shares.len() != self.edges.len() + 1 || self.slots() > MAX_SLOTS {
            return Err(ProfileError::Shape {
                name: name.into(),
                edges: self.edges.len(),
                shares: self.shares.len(),
            });
        }
        if self.edges.iter().any(|e| !e.is_finite()) || self.edges.windows(2).any(|w| w[0] >= w[1])
        {
            return Err(ProfileError::Edges { name: name.into() });
        }
        let sum: f64 = self.shares.iter().sum::<f64>() + self.missing;
        let negative = self
            .shares
            .iter()
            .chain([&self.missing])
            .any(|&s| s.is_nan() || s < 0.0);
        if negative || (sum - 1.0).abs() > 1e-6 {
            return Err(ProfileError::Shares {
                name: name.into(),
                sum,
            });
        }
        Ok(())
    }
}

impl DataProfile {
    /// Profiles training rows (`FEATURE_COUNT` values each, row after row)
    /// and validation-window scores.
    pub fn of(training_rows: &[f32], validation_scores: &[f64]) -> Self {
        let rows = training_rows.len() / FEATURE_COUNT;
        let features = FEATURE_NAMES
            .iter()
            .enumerate()
            .map(|(column, name)| FeatureHistogram {
                name: (*name).to_owned(),
                histogram: Histogram::from_values(
                    training_rows
                        .chunks_exact(FEATURE_COUNT)
                        .map(|row| row[column]),
                    PROFILE_BINS,
                ),
            })
            .collect();
        Self {
            rows,
            features,
            score_rows: validation_scores.len(),
            // Served probabilities are f32.
            score: Histogram::from_values(
                validation_scores.iter().map(|&p| p as f32),
                PROFILE_BINS,
            ),
        }
    }

    /// Refuses a profile that does not follow the feature contract or whose
    /// histograms are malformed.
    pub fn check(&self) -> Result<(), ProfileError> {
        if self.features.len() != FEATURE_COUNT {
            return Err(ProfileError::FeatureCount {
                found: self.features.len(),
                expected: FEATURE_COUNT,
            });
        }
        for (column, (feature, expected)) in self.features.iter().zip(FEATURE_NAMES).enumerate() {
            if feature.name != expected {
                return Err(ProfileError::FeatureName {
                    column,
                    found: feature.name.clone(),
                    expected,
                });
            }
            feature.histogram.check(expected)?;
        }
        self.score.check("score")
    }
}

fn is_missing(value: f32) -> bool {
    value.is_nan() || value == NOT_AVAILABLE
}

fn bin_of(edges: &[f32], value: f32) -> usize {
    edges.partition_point(|&e| e <= value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_bins_hold_equal_shares_and_repeated_values_merge() {
        let h = Histogram::from_values((0..1000u16).map(f32::from), 10);
        assert_eq!(h.edges.len(), 9);
        assert!(h.shares.iter().all(|&s| (s - 0.1).abs() < 1e-12));
        assert_eq!(h.slot(-5.0), 0);
        assert_eq!(h.slot(999.0), 9);
        // Mostly zeros, the sentinel, a few ones: zero gets its own bin.
        let values = std::iter::repeat_n(0.0, 80)
            .chain(std::iter::repeat_n(1.0, 10))
            .chain(std::iter::repeat_n(-1.0, 10));
        let h = Histogram::from_values(values, 10);
        assert_eq!(h.edges, vec![1.0]);
        assert_eq!(h.shares, vec![0.8, 0.1]);
        assert_eq!(h.missing, 0.1);
        assert_eq!(h.slot(-1.0), 2);
        assert_eq!(h.slot(f32::NAN), 2);
    }

    #[test]
    fn psi_is_zero_on_the_same_shares_and_grows_with_a_shift() {
        let h = Histogram::from_values((0..1000u16).map(f32::from), 10);
        let same: Vec<u64> = vec![10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 0];
        assert!(h.psi(&same).unwrap().abs() < 1e-12);
        let mut shifted = [0u64; 11];
        for v in (0..1000u16).map(|v| f32::from(v) * 3.0) {
            shifted[h.slot(v)] += 1;
        }
        // A third of the values stay in range; the rest land in the top bin.
        assert!(h.psi(&shifted).unwrap() > 1.0);
        assert_eq!(h.psi(&[0; 11]), None);
        assert_eq!(h.psi(&[1; 3]), None);
        // By hand: two bins, expected 0.5/0.5, actual 0.75/0.25.
        let two = Histogram {
            edges: vec![1.0],
            shares: vec![0.5, 0.5],
            missing: 0.0,
        };
        let by_hand = 0.25 * (1.5f64).ln() + (-0.25) * (0.5f64).ln();
        assert!((two.psi(&[3, 1, 0]).unwrap() - by_hand).abs() < 1e-12);
    }

    #[test]
    fn a_profile_is_checked_against_the_contract() {
        let rows: Vec<f32> = (0..100 * FEATURE_COUNT).map(|i| (i % 37) as f32).collect();
        let scores: Vec<f64> = (0..100).map(|i| f64::from(i) / 100.0).collect();
        let profile = DataProfile::of(&rows, &scores);
        assert_eq!(profile.check(), Ok(()));
        assert_eq!((profile.rows, profile.score_rows), (100, 100));
        let mut bad = profile.clone();
        bad.features[2].name = "prize".into();
        assert!(matches!(
            bad.check(),
            Err(ProfileError::FeatureName { column: 2, .. })
        ));
        let mut bad = profile.clone();
        bad.score.shares[0] += 0.5;
        assert!(matches!(bad.check(), Err(ProfileError::Shares { .. })));
        let mut bad = profile;
        bad.features[0].histogram.edges.reverse();
        assert!(matches!(bad.check(), Err(ProfileError::Edges { .. })));
    }
}
