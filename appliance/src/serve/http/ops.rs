//! Operating endpoints: liveness, readiness, Prometheus metrics and the
//! admin actions (reload, promote, rollback).

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::error::{ApiError, ErrorBody};
use super::state::{App, AppState};
use crate::error::Code;
use crate::ingest::kafka::StreamStatus;
use crate::model::{
    Change, ChangeReport, ReloadReport, ReloadRequest, ReloadResult, ReloadTrigger,
};

const ADMIN_RELOAD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Serialize)]
pub struct Checks {
    model_loaded: bool,
    tcp_listening: bool,
    store_readable: bool,
    stream: Option<StreamStatus>,
}

/// Ready to score. A stale stream is reported, and fails readiness only when
/// configured to: scores from slightly old state usually beat no scores.
pub fn readiness(app: &AppState) -> (bool, Checks) {
    let checks = Checks {
        model_loaded: app.models.current().is_some(),
        tcp_listening: app.tcp_ready.load(Ordering::Relaxed),
        store_readable: app.store.reader().is_ok(),
        stream: app.stream.as_ref().map(|h| h.status()),
    };
    let fresh_enough = !app.unready_when_stale || checks.stream.as_ref().is_none_or(|s| !s.stale);
    let ready =
        checks.model_loaded && checks.tcp_listening && checks.store_readable && fresh_enough;
    (ready, checks)
}

/// 200 when `ready`, else 503.
pub fn ready_status(ready: bool) -> StatusCode {
    if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

#[derive(Debug, Serialize)]
pub struct Alive {
    status: &'static str,
}

pub async fn healthz() -> Json<Alive> {
    Json(Alive { status: "ok" })
}

#[derive(Debug, Serialize)]
pub struct Readiness {
    ready: bool,
    checks: Checks,
}

pub async fn readyz(State(app): App) -> (StatusCode, Json<Readiness>) {
    let (ready, checks) = readiness(&app);
    (ready_status(ready), Json(Readiness { ready, checks }))
}

pub async fn metrics(State(app): App) -> Response {
    if let Some(health) = &app.stream {
        app.metrics
            .stream
            .staleness
            .set(health.status().staleness_seconds);
    }
    app.live.export(&app.metrics);
    app.drift.export(&app.metrics);
    if let Ok(stats) = app.store.stats() {
        let m = &app.metrics;
        m.live_sessions.set(stats.sessions as i64);
        m.users.set(stats.users as i64);
        m.store_used_bytes.set(stats.used_bytes as i64);
        m.store_map_size_bytes.set(stats.map_size_bytes as i64);
        if stats.watermark_micros != i64::MIN {
            m.event_time_watermark
                .set(stats.watermark_micros as f64 / 1e6);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}

fn authorized(app: &AppState, headers: &HeaderMap) -> bool {
    let token = &app.config.admin_token;
    if token.is_empty() {
        return true;
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| constant_time_eq(given.as_bytes(), token.as_bytes()))
}

fn require_admin(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    if authorized(app, headers) {
        return Ok(());
    }
    Err(ApiError::new(
        Code::Unauthorized,
        "a valid `Authorization: Bearer <token>` header is required",
    ))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn reloader_stopped() -> ApiError {
    ApiError::new(Code::ShuttingDown, "the reloader has stopped")
}

#[derive(Debug, Serialize)]
pub struct ReloadAnswer {
    report: ReloadReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody>,
}

/// `POST /admin/reload`: reload now and answer with the report (200 loaded
/// or unchanged; a rejected bundle or an empty folder is an error).
pub async fn admin_reload(State(app): App, headers: HeaderMap) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let (reply, done) = tokio::sync::oneshot::channel();
    app.reload
        .send(ReloadRequest {
            trigger: ReloadTrigger::Admin,
            reply: Some(reply),
        })
        .map_err(|_| reloader_stopped())?;
    let report = tokio::time::timeout(ADMIN_RELOAD_TIMEOUT, done)
        .await
        .map_err(|_| ApiError::new(Code::ReloadTimeout, "reload still running"))?
        .map_err(|_| reloader_stopped())?;
    let failure = match report.result {
        ReloadResult::Loaded | ReloadResult::Unchanged => None,
        ReloadResult::Rejected => Some(Code::ModelRejected),
        ReloadResult::NoModel => Some(Code::ModelUnavailable),
    };
    let error = failure.map(|code| {
        let message = report.rejected.first().map_or_else(
            || "no loadable bundle in the model folder".to_owned(),
            |r| r.reason.clone(),
        );
        ApiError::new(code, message).body_of()
    });
    let status = failure.map_or(StatusCode::OK, Code::status);
    Ok((status, Json(ReloadAnswer { report, error })).into_response())
}

/// `POST /admin/promote`: the challenger becomes the primary, the primary
/// the rollback (409 without a challenger or with another contract).
pub async fn admin_promote(app: App, headers: HeaderMap) -> Result<Json<ChangeReport>, ApiError> {
    change_models(app.0, &headers, Change::Promote).await
}

/// `POST /admin/rollback`: the previous primary serves again, the primary
/// becomes the rollback (409 when there is none).
pub async fn admin_rollback(app: App, headers: HeaderMap) -> Result<Json<ChangeReport>, ApiError> {
    change_models(app.0, &headers, Change::Rollback).await
}

async fn change_models(
    app: std::sync::Arc<AppState>,
    headers: &HeaderMap,
    action: Change,
) -> Result<Json<ChangeReport>, ApiError> {
    require_admin(&app, headers)?;
    let models = std::sync::Arc::clone(&app.models);
    // File moves and syncs: off the async workers.
    let report = tokio::task::spawn_blocking(move || match action {
        Change::Promote => models.promote(),
        Change::Rollback => models.rollback(),
    })
    .await
    .map_err(|_| ApiError::new(Code::ShuttingDown, "the model change was interrupted"))??;
    Ok(Json(report))
}
