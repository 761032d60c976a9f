//! Champion and challenger on the same carts: for every resolved cart both
//! models scored, the primary's probability and the challenger's, whichever
//! answered. Each pair of versions keeps a window of the last
//! `model.live_window` such carts, and reports both models' quality on it
//! (the same [`super::evaluate`] as the live windows) and how far they
//! agree: mean |Δp|, the share of carts whose decision at
//! `model.flip_threshold` flips, and the Spearman rank correlation.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

use cartscore_core::rank::mid_ranks;

use super::{QualityReport, evaluate};
use crate::ops::metrics::{Metrics, PairLabels, RoleLabels};
use crate::store::Outcome;

/// (champion, challenger) versions.
type Pair = (String, String);
/// Champion's and challenger's probabilities, and the label, per cart.
type Window = VecDeque<(f32, f32, bool)>;

#[derive(Debug)]
pub struct Comparisons {
    window: usize,
    flip_threshold: f64,
    by_pair: Mutex<BTreeMap<Pair, Window>>,
}

/// One pair's report in `GET /v1/model`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComparisonReport {
    pub champion: String,
    pub challenger: String,
    /// Resolved carts both scored, in the window.
    pub count: usize,
    pub champion_quality: QualityReport,
    pub challenger_quality: QualityReport,
    pub agreement: Agreement,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Agreement {
    pub mean_abs_diff: f64,
    pub flip_threshold: f64,
    pub flip_share: f64,
    /// None with fewer than two carts or a constant score.
    pub rank_correlation: Option<f64>,
}

impl Comparisons {
    pub fn new(window: usize, flip_threshold: f64) -> Self {
        Self {
            window,
            flip_threshold,
            by_pair: Mutex::default(),
        }
    }

    /// Adds the outcomes both models scored (oldest first).
    pub fn observe(&self, outcomes: &[Outcome]) {
        let mut pairs = self.by_pair.lock().unwrap_or_else(PoisonError::into_inner);
        for outcome in outcomes {
            let Some(((champion, p_champion), (challenger, p_challenger))) = outcome.pair() else {
                continue;
            };
            let window = pairs
                .entry((champion.to_owned(), challenger.to_owned()))
                .or_default();
            if window.len() == self.window {
                window.pop_front();
            }
            window.push_back((p_champion, p_challenger, outcome.label));
        }
    }

    pub fn report(&self) -> Vec<ComparisonReport> {
        let pairs = self.by_pair.lock().unwrap_or_else(PoisonError::into_inner);
        pairs
            .iter()
            .map(|((champion, challenger), window)| {
                let champion_pairs: Vec<(f32, bool)> =
                    window.iter().map(|&(p, _, y)| (p, y)).collect();
                let challenger_pairs: Vec<(f32, bool)> =
                    window.iter().map(|&(_, q, y)| (q, y)).collect();
                ComparisonReport {
                    champion: champion.clone(),
                    challenger: challenger.clone(),
                    count: window.len(),
                    champion_quality: evaluate(&champion_pairs),
                    challenger_quality: evaluate(&challenger_pairs),
                    agreement: agreement(window, self.flip_threshold),
                }
            })
            .collect()
    }

    /// Sets the comparison gauges from [`Self::report`].
    pub fn export(&self, metrics: &Metrics) -> Vec<ComparisonReport> {
        let report = self.report();
        let m = &metrics.challenger;
        for pair in &report {
            for (role, version, quality) in [
                ("champion", &pair.champion, &pair.champion_quality),
                ("challenger", &pair.challenger, &pair.challenger_quality),
            ] {
                let labels = RoleLabels {
                    model_version: version.clone(),
                    role,
                };
                m.roc_auc
                    .get_or_create(&labels)
                    .set(quality.roc_auc.unwrap_or(f64::NAN));
                m.log_loss.get_or_create(&labels).set(quality.log_loss);
                m.calibration_error
                    .get_or_create(&labels)
                    .set(quality.expected_calibration_error);
            }
            let labels = PairLabels {
                champion: pair.champion.clone(),
                challenger: pair.challenger.clone(),
            };
            m.outcomes.get_or_create(&labels).set(pair.count as i64);
            m.mean_abs_diff
                .get_or_create(&labels)
                .set(pair.agreement.mean_abs_diff);
            m.flip_share
                .get_or_create(&labels)
                .set(pair.agreement.flip_share);
            m.rank_correlation
                .get_or_create(&labels)
                .set(pair.agreement.rank_correlation.unwrap_or(f64::NAN));
        }
        report
    }
}

/// Pearson correlation, `None` when either side is constant.
fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len() as f64;
    if a.len() < 2 {
        return None;
    }
    let (mean_a, mean_b) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut cov, mut var_a, mut var_b) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        cov += (x - mean_a) * (y - mean_b);
        var_a += (x - mean_a) * (x - mean_a);
        var_b += (y - mean_b) * (y - mean_b);
    }
    (var_a > 0.0 && var_b > 0.0).then(|| cov / (var_a * var_b).sqrt())
}

fn agreement(window: &Window, threshold: f64) -> Agreement {
    let n = window.len().max(1) as f64;
    let (mut diff, mut flips) = (0.0, 0usize);
    let (mut champion, mut challenger) = (Vec::new(), Vec::new());
    for &(p, q, _) in window {
        let (p, q) = (f64::from(p), f64::from(q));
        diff += (p - q).abs();
        flips += usize::from((p >= threshold) != (q >= threshold));
        champion.push(p);
        challenger.push(q);
    }
    Agreement {
        mean_abs_diff: diff / n,
        flip_threshold: threshold,
        flip_share: flips as f64 / n,
        rank_correlation: pearson(&mid_ranks(&champion), &mid_ranks(&challenger)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PairedScore;

    fn outcome(p: f32, q: f32, label: bool, canary: bool) -> Outcome {
        // The answering model's probability is the outcome's own.
        let (answered, other, answered_version, other_version) = if canary {
            (q, p, "v2", "v1")
        } else {
            (p, q, "v1", "v2")
        };
        Outcome {
            user_id: 1,
            user_session: "s".into(),
            product_id: 1,
            cart_time_micros: 0,
            model_version: answered_version.into(),
            probability: answered,
            label,
            resolved_at_micros: 0,
            scored_at_ms: 0,
            paired: Some(PairedScore {
                model_version: other_version.into(),
                probability: other,
            }),
            canary,
        }
    }

    #[test]
    fn both_models_are_judged_on_the_same_carts_whichever_answered() {
        let comparisons = Comparisons::new(100, 0.5);
        // Champion v1 ranks perfectly; challenger v2 inverts one pair.
        let carts = [
            (0.9, 0.6, true, false),
            (0.8, 0.2, true, true),
            (0.3, 0.7, false, false),
            (0.1, 0.1, false, true),
        ];
        let outcomes: Vec<Outcome> = carts
            .iter()
            .map(|&(p, q, y, c)| outcome(p, q, y, c))
            .collect();
        comparisons.observe(&outcomes);
        // A cart one model scored alone is not compared.
        let mut alone = outcome(0.5, 0.5, true, false);
        alone.paired = None;
        comparisons.observe(&[alone]);
        let [report] = comparisons.report().try_into().unwrap();
        assert_eq!(
            (report.champion.as_str(), report.challenger.as_str()),
            ("v1", "v2")
        );
        assert_eq!(report.count, 4);
        assert_eq!(report.champion_quality.roc_auc, Some(1.0));
        // Positives 0.6, 0.2 against negatives 0.7, 0.1: 2 of 4 pairs.
        assert_eq!(report.challenger_quality.roc_auc, Some(0.5));
        let a = &report.agreement;
        let expected_diff = (0.3 + 0.6 + 0.4 + 0.0) / 4.0;
        assert!((a.mean_abs_diff - expected_diff).abs() < 1e-6, "{a:?}");
        // 0.8 vs 0.2 and 0.3 vs 0.7 flip at 0.5.
        assert_eq!(a.flip_share, 0.5);
        // Ranks 4,3,2,1 against 3,2,4,1: Spearman 0.4.
        assert!((a.rank_correlation.unwrap() - 0.4).abs() < 1e-12, "{a:?}");
    }

    #[test]
    fn a_constant_side_has_no_correlation() {
        assert_eq!(pearson(&[1.0, 1.0], &[1.0, 2.0]), None);
    }
}
