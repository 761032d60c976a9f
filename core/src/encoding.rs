//! Tables that turn the string columns (brand, category levels) into numbers:
//! each known value maps to its frequency among training cart events and its
//! smoothed purchase rate; an unseen value falls back to frequency 0 and the
//! prior rate. The trainer learns them; the bundle carries them.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// Strength of the prior in the smoothed rate, in pseudo-examples.
pub const DEFAULT_SMOOTHING: f64 = 20.0;
/// Values seen fewer times than this in training are left to the prior.
pub const DEFAULT_MIN_COUNT: u32 = 3;

/// One column's table: value -> `[frequency, purchase_rate]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryTable {
    pub prior_rate: f32,
    pub values: BTreeMap<String, [f32; 2]>,
}

impl CategoryTable {
    pub fn lookup(&self, key: &str) -> [f32; 2] {
        self.values
            .get(key)
            .copied()
            .unwrap_or([0.0, self.prior_rate])
    }

    /// Learns a table from `(value, label)` pairs of training examples.
    pub fn learn<'a>(
        examples: impl IntoIterator<Item = (&'a str, bool)>,
        smoothing: f64,
        min_count: u32,
    ) -> Self {
        let mut counts: HashMap<&str, (u32, u32)> = HashMap::new();
        let (mut total, mut positives) = (0u64, 0u64);
        for (key, label) in examples {
            let entry = counts.entry(key).or_default();
            entry.0 += 1;
            entry.1 += u32::from(label);
            total += 1;
            positives += u64::from(label);
        }
        let prior = if total == 0 {
            0.0
        } else {
            positives as f64 / total as f64
        };
        let values = counts
            .into_iter()
            .filter(|(_, (n, _))| *n >= min_count)
            .map(|(key, (n, pos))| {
                let freq = f64::from(n) / total as f64;
                let rate = (f64::from(pos) + smoothing * prior) / (f64::from(n) + smoothing);
                (key.to_owned(), [freq as f32, rate as f32])
            })
            .collect();
        Self {
            prior_rate: prior as f32,
            values,
        }
    }
}

/// The three string columns' tables.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncodingTables {
    pub brand: CategoryTable,
    pub category_l1: CategoryTable,
    pub category_l2: CategoryTable,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothed_rates_and_prior_fallback() {
        let mut examples = vec![("a", true); 3];
        examples.extend(vec![("a", false); 1]);
        examples.extend(vec![("b", false); 4]);
        examples.push(("rare", true));
        let table = CategoryTable::learn(examples.iter().copied(), 1.0, 2);
        let prior = 4.0 / 9.0;
        assert!((table.prior_rate - prior as f32).abs() < 1e-6);
        let [freq, rate] = table.lookup("a");
        assert!((freq - 4.0 / 9.0).abs() < 1e-6);
        assert!((rate - ((3.0 + prior) / 5.0) as f32).abs() < 1e-6);
        assert_eq!(table.lookup("rare"), [0.0, table.prior_rate]);
        assert_eq!(table.lookup("never"), [0.0, table.prior_rate]);
    }
}
