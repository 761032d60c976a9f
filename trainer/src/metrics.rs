//! Evaluation metrics for probabilistic binary classifiers.

use serde::Serialize;

/// ROC-AUC by the rank statistic, with ties given half credit (NaN with one
/// class): `core`'s, which the appliance's live quality uses too.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> f64 {
    cartscore_core::rank::roc_auc(scores, labels).unwrap_or(f64::NAN)
}

/// PR-AUC as average precision (the step-wise area, as scikit-learn computes it).
pub fn pr_auc(scores: &[f64], labels: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    if positives == 0.0 {
        return f64::NAN;
    }
    let (mut tp, mut fp, mut ap, mut last_recall) = (0.0, 0.0, 0.0, 0.0);
    let mut i = 0;
    while i < order.len() {
        // Tied scores form one threshold.
        let mut j = i;
        while j < order.len() && scores[order[j]] == scores[order[i]] {
            if labels[order[j]] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            j += 1;
        }
        let recall = tp / positives;
        ap += (recall - last_recall) * tp / (tp + fp);
        last_recall = recall;
        i = j;
    }
    ap
}

const EPS: f64 = 1e-15;

pub fn log_loss(probabilities: &[f64], labels: &[bool]) -> f64 {
    let sum: f64 = probabilities
        .iter()
        .zip(labels)
        .map(|(&p, &y)| {
            let p = p.clamp(EPS, 1.0 - EPS);
            if y { -p.ln() } else { -(1.0 - p).ln() }
        })
        .sum();
    sum / probabilities.len().max(1) as f64
}

pub fn brier(probabilities: &[f64], labels: &[bool]) -> f64 {
    let sum: f64 = probabilities
        .iter()
        .zip(labels)
        .map(|(&p, &y)| (p - f64::from(u8::from(y))).powi(2))
        .sum();
    sum / probabilities.len().max(1) as f64
}

/// One bin of a reliability table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CalibrationBin {
    pub lower: f64,
    pub upper: f64,
    pub count: u64,
    pub mean_predicted: f64,
    pub observed_rate: f64,
}

/// Ten equal-width probability bins; empty bins are left out.
pub fn calibration(probabilities: &[f64], labels: &[bool]) -> Vec<CalibrationBin> {
    const BINS: usize = 10;
    let mut sums = [(0u64, 0f64, 0u64); BINS];
    for (&p, &y) in probabilities.iter().zip(labels) {
        let bin = ((p * BINS as f64) as usize).min(BINS - 1);
        sums[bin].0 += 1;
        sums[bin].1 += p;
        sums[bin].2 += u64::from(y);
    }
    sums.iter()
        .enumerate()
        .filter(|(_, (n, _, _))| *n > 0)
        .map(|(i, &(n, p, pos))| CalibrationBin {
            lower: i as f64 / BINS as f64,
            upper: (i + 1) as f64 / BINS as f64,
            count: n,
            mean_predicted: p / n as f64,
            observed_rate: pos as f64 / n as f64,
        })
        .collect()
}

/// The metrics reported for every model and baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    pub rows: usize,
    pub positives: usize,
    pub roc_auc: f64,
    pub pr_auc: f64,
    pub log_loss: f64,
    pub brier: f64,
}

impl Scores {
    pub fn of(probabilities: &[f64], labels: &[bool]) -> Self {
        Self {
            rows: labels.len(),
            positives: labels.iter().filter(|&&l| l).count(),
            roc_auc: roc_auc(probabilities, labels),
            pr_auc: pr_auc(probabilities, labels),
            log_loss: log_loss(probabilities, labels),
            brier: brier(probabilities, labels),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_matches_pairwise_definition() {
        let scores = [0.1, 0.4, 0.35, 0.8, 0.4];
        let labels = [false, false, true, true, true];
        // Pairs (pos, neg): (0.35,0.1)=1 (0.35,0.4)=0 (0.8,*)=2 (0.4,0.1)=1 (0.4,0.4)=0.5 → 4.5/6
        assert!((roc_auc(&scores, &labels) - 0.75).abs() < 1e-12);
        assert!((roc_auc(&[0.5; 4], &[true, false, true, false]) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn average_precision_known_value() {
        // sklearn: average_precision_score([0,0,1,1],[0.1,0.4,0.35,0.8]) = 0.8333…
        let ap = pr_auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]);
        assert!((ap - 0.833_333_333_333_333_4).abs() < 1e-12, "{ap}");
    }

    #[test]
    fn losses_and_calibration() {
        let p = [0.9, 0.1, 0.8, 0.3];
        let y = [true, false, false, true];
        let expected = -(0.9f64.ln() + 0.9f64.ln() + 0.2f64.ln() + 0.3f64.ln()) / 4.0;
        assert!((log_loss(&p, &y) - expected).abs() < 1e-12);
        assert!((brier(&p, &y) - (0.01 + 0.01 + 0.64 + 0.49) / 4.0).abs() < 1e-12);
        let bins = calibration(&p, &y);
        assert_eq!(bins.iter().map(|b| b.count).sum::<u64>(), 4);
        assert_eq!(bins.last().map(|b| b.observed_rate), Some(1.0));
    }
}
