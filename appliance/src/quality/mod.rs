//! The serving model's live quality: the resolved outcomes of its scored
//! carts (the store resolves them with the trainer's label, see
//! `store::outcomes`) over a sliding window of the last `model.live_window`
//! per model version, as ROC-AUC, log-loss, Brier score, expected
//! calibration error and a reliability table; [`comparison`] holds champion
//! and challenger side by side on the carts both scored; [`drift`] compares
//! the scored rows with the bundle's data profile.

pub mod comparison;
pub mod drift;
pub mod records;

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

use crate::ops::metrics::{LabelOutcome, Metrics, VersionLabels};
use crate::store::Outcome;
use comparison::Comparisons;

/// Probability bins of the reliability table and the calibration error.
pub const BINS: usize = 10;

/// The windows of every model version that resolved outcomes (each on the
/// carts it answered), and of every champion/challenger pair (both on the
/// carts both scored).
#[derive(Debug)]
pub struct LiveQuality {
    window: usize,
    by_version: Mutex<BTreeMap<String, VecDeque<(f32, bool)>>>,
    pub comparisons: Comparisons,
}

impl LiveQuality {
    pub fn new(window: usize, flip_threshold: f64) -> Self {
        Self {
            window,
            by_version: Mutex::default(),
            comparisons: Comparisons::new(window, flip_threshold),
        }
    }

    /// Adds resolved outcomes (oldest first); counts them when `metrics`.
    pub fn observe(&self, outcomes: &[Outcome], metrics: Option<&Metrics>) {
        self.comparisons.observe(outcomes);
        let mut windows = self
            .by_version
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for outcome in outcomes {
            let window = windows.entry(outcome.model_version.clone()).or_default();
            if window.len() == self.window {
                window.pop_front();
            }
            window.push_back((outcome.probability, outcome.label));
            if let Some(metrics) = metrics {
                metrics
                    .closed_loop
                    .outcomes_resolved
                    .get_or_create(&LabelOutcome {
                        model_version: outcome.model_version.clone(),
                        label: if outcome.label { "1" } else { "0" },
                    })
                    .inc();
            }
        }
    }

    /// The quality of every version's window.
    pub fn report(&self) -> BTreeMap<String, QualityReport> {
        let windows = self
            .by_version
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        windows
            .iter()
            .map(|(version, window)| {
                let pairs: Vec<(f32, bool)> = window.iter().copied().collect();
                (version.clone(), evaluate(&pairs))
            })
            .collect()
    }

    /// Sets the live and the comparison gauges from [`Self::report`].
    pub fn export(&self, metrics: &Metrics) -> BTreeMap<String, QualityReport> {
        self.comparisons.export(metrics);
        let report = self.report();
        for (version, quality) in &report {
            let labels = VersionLabels {
                model_version: version.clone(),
            };
            let live = &metrics.live;
            live.outcomes
                .get_or_create(&labels)
                .set(quality.count as i64);
            // NaN while the window holds one class only: the series exists
            // and compares false.
            live.roc_auc
                .get_or_create(&labels)
                .set(quality.roc_auc.unwrap_or(f64::NAN));
            live.log_loss.get_or_create(&labels).set(quality.log_loss);
            live.brier.get_or_create(&labels).set(quality.brier);
            live.calibration_error
                .get_or_create(&labels)
                .set(quality.expected_calibration_error);
        }
        report
    }
}

/// One window's quality.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QualityReport {
    pub count: usize,
    pub positives: usize,
    pub positive_rate: f64,
    /// None while the window holds only one class.
    pub roc_auc: Option<f64>,
    pub log_loss: f64,
    pub brier: f64,
    pub expected_calibration_error: f64,
    pub reliability: Vec<ReliabilityBin>,
}

/// Predicted against observed, for carts whose probability is in `[from, to)`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReliabilityBin {
    pub from: f64,
    pub to: f64,
    pub count: usize,
    pub mean_predicted: f64,
    pub observed_rate: f64,
}

/// ROC-AUC by ranks (a tie counts one half), log-loss, Brier score and the
/// calibration over [`BINS`] equal-width bins.
pub fn evaluate(pairs: &[(f32, bool)]) -> QualityReport {
    let count = pairs.len();
    let positives = pairs.iter().filter(|(_, y)| *y).count();
    let scores: Vec<f64> = pairs.iter().map(|(p, _)| f64::from(*p)).collect();
    let labels: Vec<bool> = pairs.iter().map(|(_, y)| *y).collect();
    let roc_auc = cartscore_core::rank::roc_auc(&scores, &labels);
    let mut log_loss = 0.0;
    let mut brier = 0.0;
    let mut bins = vec![(0usize, 0f64, 0usize); BINS];
    for &(p, y) in pairs {
        let p = f64::from(p);
        let clamped = p.clamp(1e-15, 1.0 - 1e-15);
        let y = f64::from(u8::from(y));
        log_loss -= y * clamped.ln() + (1.0 - y) * (1.0 - clamped).ln();
        brier += (p - y) * (p - y);
        let bin = ((p * BINS as f64) as usize).min(BINS - 1);
        bins[bin].0 += 1;
        bins[bin].1 += p;
        bins[bin].2 += y as usize;
    }
    let n = count.max(1) as f64;
    let mut ece = 0.0;
    let reliability = bins
        .iter()
        .enumerate()
        .map(|(b, &(c, sum_p, pos))| {
            let (mean_predicted, observed_rate) = if c == 0 {
                (0.0, 0.0)
            } else {
                (sum_p / c as f64, pos as f64 / c as f64)
            };
            ece += c as f64 / n * (mean_predicted - observed_rate).abs();
            ReliabilityBin {
                from: b as f64 / BINS as f64,
                to: (b + 1) as f64 / BINS as f64,
                count: c,
                mean_predicted,
                observed_rate,
            }
        })
        .collect();
    QualityReport {
        count,
        positives,
        positive_rate: positives as f64 / n,
        roc_auc,
        log_loss: log_loss / n,
        brier: brier / n,
        expected_calibration_error: ece,
        reliability,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_counts_ties_as_one_half_and_matches_pair_counting() {
        let pairs = [
            (0.9, true),
            (0.8, false),
            (0.8, true),
            (0.3, false),
            (0.3, false),
            (0.1, true),
        ];
        // Pairs (positive, negative): 3 positives x 3 negatives = 9; the
        // positive beats the negative in 0.9>0.8, 0.9>0.3 x2, 0.8=0.8 (half),
        // 0.8>0.3 x2: 5.5 of 9.
        let report = evaluate(&pairs);
        assert!((report.roc_auc.unwrap() - 5.5 / 9.0).abs() < 1e-12);
        assert_eq!((report.count, report.positives), (6, 3));
        assert_eq!(evaluate(&[(0.4, true)]).roc_auc, None);
        let perfect = evaluate(&[(0.95, true), (0.05, false)]);
        assert!(perfect.expected_calibration_error < 0.051);
        assert!((perfect.brier - 0.0025).abs() < 1e-9);
        assert_eq!(perfect.reliability.len(), BINS);
    }
}
