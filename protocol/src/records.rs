//! The closed loop's records as they leave the appliance: a resolved
//! outcome (`GET /v1/outcomes`, the outcomes log) and what it says of its
//! scored cart (also the head of a predictions-log record). One definition
//! for the appliance that writes them and for their readers (the trainer's
//! copy into the warehouse, a consumer of the logs).

use serde::{Deserialize, Serialize};

/// The other model's score of the same cart: the challenger's when the
/// primary answered (shadow), the primary's when the challenger did (canary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedScore {
    pub model_version: String,
    pub probability: f32,
}

/// What both logs say of a scored cart, with the sequence number it is
/// stored under, so a reader of an at-least-once log de-duplicates on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoredCart {
    pub seq: u64,
    pub user_id: u64,
    pub user_session: String,
    pub product_id: u64,
    /// RFC 3339, microseconds, UTC.
    pub cart_time: String,
    pub model_version: String,
    pub probability: f32,
    pub scored_at_unix_ms: i64,
    /// The challenger answered (a canary session).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub canary: bool,
    /// The other model's score, when two models scored the cart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paired: Option<PairedScore>,
}

/// One resolved cart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeRecord {
    #[serde(flatten)]
    pub cart: ScoredCart,
    pub label: bool,
    /// RFC 3339: the event time of what decided the label.
    pub resolved_at: String,
    /// Event time from the cart to what decided it.
    pub resolution_delay_seconds: f64,
}

/// A page of `GET /v1/outcomes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomesPage {
    pub outcomes: Vec<OutcomeRecord>,
    /// `since` of the next page.
    pub next: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_reads_back_as_written_and_leaves_out_what_is_unset() {
        let outcome = OutcomeRecord {
            cart: ScoredCart {
                seq: 3,
                user_id: 1,
                user_session: "s".into(),
                product_id: 2,
                cart_time: "2019-10-01T00:00:00.000000Z".into(),
                model_version: "v1".into(),
                probability: 0.1,
                scored_at_unix_ms: 4,
                canary: false,
                paired: None,
            },
            label: true,
            resolved_at: "2019-10-01T00:10:00.000000Z".into(),
            resolution_delay_seconds: 600.0,
        };
        let text = serde_json::to_string(&outcome).unwrap();
        assert!(
            !text.contains("canary") && !text.contains("paired"),
            "{text}"
        );
        assert!(text.contains(r#""seq":3"#), "flattened: {text}");
        assert_eq!(
            serde_json::from_str::<OutcomeRecord>(&text).unwrap(),
            outcome
        );

        let canary = OutcomeRecord {
            cart: ScoredCart {
                canary: true,
                paired: Some(PairedScore {
                    model_version: "v0".into(),
                    probability: 0.3,
                }),
                ..outcome.cart.clone()
            },
            ..outcome
        };
        let text = serde_json::to_string(&canary).unwrap();
        assert_eq!(
            serde_json::from_str::<OutcomeRecord>(&text).unwrap(),
            canary
        );
    }
}
