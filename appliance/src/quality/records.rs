//! The closed loop's records as they leave the appliance: a resolved
//! outcome (`GET /v1/outcomes`, the outcomes log) and a scored cart (the
//! predictions log), each with the sequence number it is stored under, so
//! a warehouse reading an at-least-once log can de-duplicate on it.

use cartscore_core::{FEATURE_NAMES, Timestamp};
use cartscore_protocol::records::{OutcomeRecord, PairedScore as PairedView, ScoredCart};
use serde::Serialize;
use serde::ser::SerializeMap;

use crate::store::{Outcome, PairedScore, Prediction};

fn paired_view(paired: Option<PairedScore>) -> Option<PairedView> {
    paired.map(|p| PairedView {
        model_version: p.model_version,
        probability: p.probability,
    })
}

/// A stored outcome as it leaves the appliance.
pub fn outcome_record(seq: u64, o: Outcome) -> OutcomeRecord {
    OutcomeRecord {
        label: o.label,
        resolved_at: Timestamp(o.resolved_at_micros).to_rfc3339(),
        resolution_delay_seconds: (o.resolved_at_micros - o.cart_time_micros) as f64 / 1e6,
        cart: ScoredCart {
            seq,
            user_id: o.user_id,
            user_session: o.user_session,
            product_id: o.product_id,
            cart_time: Timestamp(o.cart_time_micros).to_rfc3339(),
            model_version: o.model_version,
            probability: o.probability,
            scored_at_unix_ms: o.scored_at_ms,
            canary: o.canary,
            paired: paired_view(o.paired),
        },
    }
}

/// One scored cart, with the feature row the model saw.
#[derive(Debug, Serialize)]
pub struct PredictionView {
    #[serde(flatten)]
    pub cart: ScoredCart,
    /// By the contract's names, in its order (`-1` is the missing sentinel).
    pub features: FeaturesByName,
}

impl PredictionView {
    pub fn new(seq: u64, p: Prediction) -> Self {
        Self {
            features: ByName(p.features),
            cart: ScoredCart {
                seq,
                user_id: p.user_id,
                user_session: p.user_session,
                product_id: p.product_id,
                cart_time: Timestamp(p.cart_time_micros).to_rfc3339(),
                model_version: p.model_version,
                probability: p.probability,
                scored_at_unix_ms: p.scored_at_ms,
                canary: p.canary,
                paired: paired_view(p.paired),
            },
        }
    }
}

/// One value per feature (a row, or an explanation's contributions) as a
/// JSON object keyed by feature name, in the contract's order.
#[derive(Debug)]
pub struct ByName<T>(pub Vec<T>);

/// A feature row, by name.
pub type FeaturesByName = ByName<f32>;

impl<T: Serialize> Serialize for ByName<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in FEATURE_NAMES.iter().zip(&self.0) {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prediction_names_every_feature_in_the_contracts_order() {
        let features: Vec<f32> = (0..FEATURE_NAMES.len()).map(|i| i as f32).collect();
        let view = PredictionView::new(
            7,
            Prediction {
                user_id: 1,
                user_session: "s".into(),
                product_id: 2,
                cart_time_micros: 1_569_888_000_000_000,
                model_version: "v1".into(),
                probability: 0.25,
                features,
                scored_at_ms: 3,
                paired: None,
                canary: false,
            },
        );
        let text = serde_json::to_string(&view).unwrap();
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["seq"], 7);
        assert_eq!(value["cart_time"], "2019-10-01T00:00:00.000000Z");
        let names: Vec<&str> = FEATURE_NAMES.to_vec();
        for (i, name) in names.iter().enumerate() {
            assert_eq!(value["features"][name], i as f64, "{name}");
        }
        // Object keys in the contract's order, as a reader sees them.
        let first = text.find(names[0]).unwrap();
        let last = text.find(names[names.len() - 1]).unwrap();
        assert!(first < last);
    }
}
