//! Ranks with ties shared, and the ROC-AUC they give: one implementation
//! for the trainer's report, the appliance's live quality and its
//! champion/challenger comparison, so their figures agree to the bit.

/// 1-based ranks of `values` in ascending order; equal values share the
/// average of their ranks.
pub fn mid_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let average = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            ranks[k] = average;
        }
        i = j + 1;
    }
    ranks
}

/// ROC-AUC by the rank statistic (a tie counts one half); `None` unless
/// both classes are present.
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    let positives = labels.iter().filter(|&&l| l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return None;
    }
    // Sums of half-integers: exact in any order.
    let rank_sum: f64 = mid_ranks(scores)
        .iter()
        .zip(labels)
        .filter(|(_, l)| **l)
        .map(|(r, _)| r)
        .sum();
    Some((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_share_ranks_and_count_one_half() {
        assert_eq!(mid_ranks(&[0.2, 0.1, 0.2, 0.3]), vec![2.5, 1.0, 2.5, 4.0]);
        // 3 positives x 3 negatives; the positive wins 0.9>0.8, 0.9>0.3 x2,
        // 0.8=0.8 (half), 0.8>0.3 x2: 5.5 of 9.
        let scores = [0.9, 0.8, 0.8, 0.3, 0.3, 0.1];
        let labels = [true, false, true, false, false, true];
        assert_eq!(roc_auc(&scores, &labels), Some(5.5 / 9.0));
        assert_eq!(roc_auc(&[0.4], &[true]), None);
    }
}
