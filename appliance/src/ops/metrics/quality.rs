//! The closed loop's metrics: scored-cart records and their outcomes, the
//! serving models' live quality, and the serving model's feature drift.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use super::{FloatGauges, ReasonLabels, TopicLabels, VersionLabels};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LabelOutcome {
    pub model_version: String,
    pub label: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FeatureLabels {
    pub feature: String,
}

/// Why a scored-cart record was not kept.
const DROP_REASONS: [&str; 3] = ["queue_full", "store_full", "write_failed"];

/// The serving models' live quality over their windows of resolved outcomes.
#[derive(Debug, Default)]
pub struct LiveMetrics {
    pub roc_auc: FloatGauges<VersionLabels>,
    pub log_loss: FloatGauges<VersionLabels>,
    pub brier: FloatGauges<VersionLabels>,
    pub calibration_error: FloatGauges<VersionLabels>,
    pub outcomes: Family<VersionLabels, Gauge>,
    /// The serving bundle's own test-window ROC-AUC.
    pub test_roc_auc: FloatGauges<VersionLabels>,
}

impl LiveMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let live = Self::default();
        for (name, help, family) in [
            (
                "cartscore_live_roc_auc",
                "ROC-AUC of the model version over its window of resolved outcomes",
                &live.roc_auc,
            ),
            (
                "cartscore_live_log_loss",
                "Log-loss over the window of resolved outcomes",
                &live.log_loss,
            ),
            (
                "cartscore_live_brier",
                "Brier score over the window of resolved outcomes",
                &live.brier,
            ),
            (
                "cartscore_live_calibration_error",
                "Expected calibration error (10 bins) over the window of resolved outcomes",
                &live.calibration_error,
            ),
            (
                "cartscore_model_test_roc_auc",
                "The serving bundle's ROC-AUC on its training run's test window",
                &live.test_roc_auc,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "cartscore_live_outcomes",
            "Resolved outcomes in the model version's live window",
            live.outcomes.clone(),
        );
        live
    }
}

/// The serving model's drift against its bundle's data profile.
#[derive(Debug, Default)]
pub struct DriftMetrics {
    pub feature_psi: FloatGauges<FeatureLabels>,
    pub score_psi: Gauge<f64, AtomicU64>,
    pub rows: Gauge,
}

impl DriftMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let drift = Self::default();
        drift.score_psi.set(f64::NAN);
        registry.register(
            "cartscore_feature_psi",
            "Population stability index of the feature over the drift window against the bundle's training window",
            drift.feature_psi.clone(),
        );
        registry.register(
            "cartscore_score_psi",
            "Population stability index of the scores over the drift window against the bundle's validation window (NaN without a profile)",
            drift.score_psi.clone(),
        );
        registry.register(
            "cartscore_drift_rows",
            "Scored rows in the serving model's drift window",
            drift.rows.clone(),
        );
        drift
    }
}

/// Scored-cart records and the outcomes the stream resolves them with.
#[derive(Debug)]
pub struct ClosedLoopMetrics {
    pub outcomes_resolved: Family<LabelOutcome, Counter>,
    pub outcomes_pending: Gauge,
    pub scored_records_dropped: Family<ReasonLabels, Counter>,
    pub log_lost: Family<TopicLabels, Counter>,
}

impl ClosedLoopMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let outcomes_resolved = Family::<LabelOutcome, Counter>::default();
        registry.register(
            "cartscore_outcomes_resolved",
            "Scored carts resolved by the stream with the trainer's label, by model version and label",
            outcomes_resolved.clone(),
        );
        let outcomes_pending = Gauge::default();
        registry.register(
            "cartscore_outcomes_pending",
            "Scored carts whose outcome the stream has not decided yet",
            outcomes_pending.clone(),
        );
        let scored_records_dropped = Family::<ReasonLabels, Counter>::default();
        for reason in DROP_REASONS {
            let _ = scored_records_dropped.get_or_create(&ReasonLabels { reason });
        }
        registry.register(
            "cartscore_scored_records_dropped",
            "Scored-cart records not kept: the writer's queue was full, the store holds store.max_scored_records, or the write failed",
            scored_records_dropped.clone(),
        );
        let log_lost = Family::<TopicLabels, Counter>::default();
        registry.register(
            "cartscore_prediction_log_lost",
            "Prediction-log records the bounded outbox dropped before the broker acknowledged them, by topic",
            log_lost.clone(),
        );
        Self {
            outcomes_resolved,
            outcomes_pending,
            scored_records_dropped,
            log_lost,
        }
    }

    /// Counts records not kept, by reason.
    pub fn dropped(&self, reason: &'static str, records: u64) {
        self.scored_records_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc_by(records);
    }

    /// Scored-cart records dropped for any reason.
    pub fn dropped_total(&self) -> u64 {
        DROP_REASONS
            .into_iter()
            .map(|reason| {
                self.scored_records_dropped
                    .get_or_create(&ReasonLabels { reason })
                    .get()
            })
            .sum()
    }
}
