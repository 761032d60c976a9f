//! The challenger's metrics: its scores beside the primary (shadow) and
//! instead of it (canary), champion and challenger compared on the same
//! resolved carts, explanations, and promotes and rollbacks.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{FloatGauges, VersionLabels};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLabels {
    pub action: &'static str,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PairScoreLabels {
    /// `shadow`: the challenger scored a cart the primary answered;
    /// `canary`: the challenger answered, the primary scored beside it.
    pub mode: &'static str,
    pub outcome: &'static str,
}

/// A model of a compared pair, by its part in it.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub model_version: String,
    /// `champion` (the primary) or `challenger`.
    pub role: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PairLabels {
    pub champion: String,
    pub challenger: String,
}

#[derive(Debug)]
pub struct ChallengerMetrics {
    pub info: Family<VersionLabels, Gauge>,
    /// Second scores of a cart, resolved once: shadow ok, canary ok, failed.
    pub shadow_scored: Counter,
    pub canary_scored: Counter,
    pub pair_failed: Counter,
    pub changes: Family<ChangeLabels, Counter>,
    pub explanations: Counter,
    pub roc_auc: FloatGauges<RoleLabels>,
    pub log_loss: FloatGauges<RoleLabels>,
    pub calibration_error: FloatGauges<RoleLabels>,
    pub outcomes: Family<PairLabels, Gauge>,
    pub mean_abs_diff: FloatGauges<PairLabels>,
    pub flip_share: FloatGauges<PairLabels>,
    pub rank_correlation: FloatGauges<PairLabels>,
}

impl ChallengerMetrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let scores = Family::<PairScoreLabels, Counter>::default();
        let pair = |mode, outcome| {
            scores
                .get_or_create(&PairScoreLabels { mode, outcome })
                .clone()
        };
        let this = Self {
            info: Family::default(),
            shadow_scored: pair("shadow", "ok"),
            canary_scored: pair("canary", "ok"),
            pair_failed: pair("any", "failed"),
            changes: Family::default(),
            explanations: Counter::default(),
            roc_auc: FloatGauges::default(),
            log_loss: FloatGauges::default(),
            calibration_error: FloatGauges::default(),
            outcomes: Family::default(),
            mean_abs_diff: FloatGauges::default(),
            flip_share: FloatGauges::default(),
            rank_correlation: FloatGauges::default(),
        };
        for action in ["promote", "rollback"] {
            for outcome in ["done", "refused", "failed"] {
                let _ = this
                    .changes
                    .get_or_create(&ChangeLabels { action, outcome });
            }
        }
        registry.register(
            "cartscore_challenger_info",
            "The challenger scoring beside the primary (value 1)",
            this.info.clone(),
        );
        registry.register(
            "cartscore_pair_scores",
            "Carts scored by both models: the challenger beside the primary (shadow), the primary beside the challenger (canary), or the second score failed",
            scores,
        );
        registry.register(
            "cartscore_model_changes",
            "Promotes and rollbacks by outcome: done, refused (no challenger, another contract), failed (files not moved)",
            this.changes.clone(),
        );
        registry.register(
            "cartscore_explanations",
            "Scores explained with TreeSHAP (explain=true, TCP explain requests)",
            this.explanations.clone(),
        );
        for (name, help, family) in [
            (
                "cartscore_comparison_roc_auc",
                "ROC-AUC of champion and challenger on the same resolved carts",
                &this.roc_auc,
            ),
            (
                "cartscore_comparison_log_loss",
                "Log-loss of champion and challenger on the same resolved carts",
                &this.log_loss,
            ),
            (
                "cartscore_comparison_calibration_error",
                "Expected calibration error of champion and challenger on the same resolved carts",
                &this.calibration_error,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "cartscore_comparison_outcomes",
            "Resolved carts both models scored, in the pair's window",
            this.outcomes.clone(),
        );
        for (name, help, family) in [
            (
                "cartscore_agreement_mean_abs_diff",
                "Mean |champion - challenger| probability over the pair's window",
                &this.mean_abs_diff,
            ),
            (
                "cartscore_agreement_flip_share",
                "Share of the pair's carts whose decision at model.flip_threshold differs between the two models",
                &this.flip_share,
            ),
            (
                "cartscore_agreement_rank_correlation",
                "Spearman rank correlation of the two models' probabilities over the pair's window",
                &this.rank_correlation,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        this
    }
}
