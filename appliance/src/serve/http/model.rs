//! `GET /v1/model`: what serves (the primary, the challenger beside it, the
//! rollback), how each was verified and whether it explains, the last
//! reload and recent rejections, the live quality per version, champion and
//! challenger compared on the same carts, and the primary's drift.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::state::App;
use crate::model::reload::Rejection;
use crate::model::{Loaded, ReloadReport};
use crate::quality::QualityReport;
use crate::quality::comparison::ComparisonReport;
use crate::quality::drift::DriftReport;

/// Whether a model explains its scores, and how its explainer was checked.
#[derive(Debug, Serialize)]
pub struct ExplainStatus {
    available: bool,
    /// Golden vectors whose LightGBM contributions TreeSHAP reproduced.
    #[serde(skip_serializing_if = "Option::is_none")]
    verified_rows: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    verified_max_diff: Option<f64>,
    /// Why not, when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// A bundle in one of the slots.
#[derive(Debug, Serialize)]
pub struct ModelView<'a> {
    model_version: &'a str,
    contract_version: u32,
    evaluator: &'static str,
    trees: usize,
    path: &'a Path,
    size_bytes: u64,
    blake3: &'a str,
    loaded_at_unix_seconds: f64,
    load_ms: f64,
    verified_rows: usize,
    verified_max_diff: f64,
    explain: ExplainStatus,
    feature_names: &'a [String],
    data_fingerprint: &'a str,
    metrics: &'a BTreeMap<String, f64>,
}

impl<'a> ModelView<'a> {
    fn of(loaded: &'a Loaded) -> Self {
        let model = &loaded.model;
        let explain = match &model.explainer {
            Ok(e) => ExplainStatus {
                available: true,
                verified_rows: Some(e.verified_rows),
                verified_max_diff: Some(e.verified_max_diff),
                reason: None,
            },
            Err(reason) => ExplainStatus {
                available: false,
                verified_rows: None,
                verified_max_diff: None,
                reason: Some(reason.to_string()),
            },
        };
        Self {
            model_version: model.version(),
            contract_version: model.metadata.contract_version,
            evaluator: model.evaluator_name(),
            trees: model.trees,
            path: &loaded.file.path,
            size_bytes: model.size_bytes,
            blake3: &model.blake3,
            loaded_at_unix_seconds: model
                .loaded_at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            load_ms: model.load_time.as_secs_f64() * 1e3,
            verified_rows: model.verified_rows,
            verified_max_diff: model.verified_max_diff,
            explain,
            feature_names: &model.metadata.feature_names,
            data_fingerprint: &model.metadata.data_fingerprint,
            metrics: &model.metadata.metrics,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Folders {
    primary: PathBuf,
    challenger: PathBuf,
    rollback: PathBuf,
}

#[derive(Debug, Serialize)]
pub struct ModelAnswer<'a> {
    /// The primary: it answers every cart but the canary sessions'.
    model: Option<ModelView<'a>>,
    /// The challenger, scoring every cart beside the primary.
    challenger: Option<ModelView<'a>>,
    /// What `POST /admin/rollback` would return to.
    rollback: Option<ModelView<'a>>,
    /// Share of sessions the challenger answers.
    canary_share: f64,
    model_dir: &'a Path,
    folders: Folders,
    last_reload: Option<ReloadReport>,
    recent_rejections: Vec<Rejection>,
    /// The live quality of every model version that resolved outcomes,
    /// over its window (`model.live_window`) of the carts it answered; the
    /// bundle's own test metrics are under `model.metrics`.
    live: BTreeMap<String, QualityReport>,
    /// Champion and challenger on the same resolved carts, per pair.
    comparison: Vec<ComparisonReport>,
    outcomes_pending: i64,
    /// The primary's inputs and scores against its bundle's profile
    /// (population stability index); null for a bundle without a profile.
    drift: Option<DriftReport>,
}

/// `GET /v1/model`.
pub async fn model(State(app): App) -> Response {
    let set = app.models.set();
    let dirs = app.models.dirs();
    Json(ModelAnswer {
        model: set.primary.as_ref().map(ModelView::of),
        challenger: set.challenger.as_ref().map(ModelView::of),
        rollback: set.rollback.as_ref().map(ModelView::of),
        canary_share: set.canary_share,
        model_dir: app.models.dir(),
        folders: Folders {
            primary: dirs.primary.clone(),
            challenger: dirs.challenger.clone(),
            rollback: dirs.rollback.clone(),
        },
        last_reload: app.models.last_report(),
        recent_rejections: app.models.recent_rejections(),
        live: app.live.report(),
        comparison: app.live.comparisons.report(),
        outcomes_pending: app.metrics.closed_loop.outcomes_pending.get(),
        drift: app.drift.report(),
    })
    .into_response()
}
