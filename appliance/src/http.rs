//! The JSON API (axum): scoring, ingest, the feature service, model status,
//! the Open Inference Protocol (KServe V2), health, metrics and admin.
//! Every error is `{"error":{"code","message"}}` with a fitting status,
//! except under /v2, which answers `{"error":"…"}` as that protocol requires.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cartscore_core::features::col;
use cartscore_core::state::{ArchivedSessionState, ArchivedUserState};
use cartscore_core::validate::MAX_SESSION_BYTES;
use cartscore_core::{
    Event, EventError, EventType, FEATURE_COUNT, FEATURE_NAMES, FeatureRow, Timestamp,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::config::HttpConfig;
use crate::ingest::Ingestor;
use crate::metrics::{Metrics, RouteLabels, RouteOnly, SourceReasonLabels};
use crate::model::ServingModel;
use crate::reload::{ModelRegistry, ReloadRequest, ReloadResult, ReloadTrigger};
use crate::score::{self, ScoreError};
use crate::store::{Store, StoreError};
use crate::stream::StreamHealth;

/// The model name under the Open Inference Protocol.
pub const KSERVE_MODEL: &str = "cartscore";
const ADMIN_RELOAD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug)]
pub struct AppState {
    pub store: Arc<Store>,
    pub models: Arc<ModelRegistry>,
    pub metrics: Arc<Metrics>,
    pub ingestor: Ingestor,
    pub reload: std::sync::mpsc::Sender<ReloadRequest>,
    pub config: HttpConfig,
    /// The binary-protocol listeners are up (or disabled).
    pub tcp_ready: AtomicBool,
    /// The Kafka consumer's health, when one runs.
    pub stream: Option<Arc<StreamHealth>>,
    /// A stale stream makes /readyz fail (`kafka.unready_when_stale`).
    pub unready_when_stale: bool,
}

type App = State<Arc<AppState>>;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn body(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "bad_body"
        };
        Self::new(status, code, rejection.body_text())
    }

    fn invalid_event(error: &EventError) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            error.code(),
            error.to_string(),
        )
    }

    fn no_model() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_unavailable",
            "no model is loaded; see GET /v1/model",
        )
    }

    fn store(error: &StoreError) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "store_error",
            error.to_string(),
        )
    }
}

impl From<ScoreError> for ApiError {
    fn from(error: ScoreError) -> Self {
        let status = match error {
            ScoreError::NotACart(_) => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error.code(), error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    let router = Router::new()
        .route("/v1/score", post(score_handler))
        .route("/v1/events", post(events_handler))
        .route("/v1/sessions/{id}", get(session_handler))
        .route("/v1/model", get(model_handler))
        .route("/v2", get(kserve_server))
        .route("/v2/health/live", get(kserve_live))
        .route("/v2/health/ready", get(kserve_ready))
        .route("/v2/models/{name}", get(kserve_model))
        .route("/v2/models/{name}/ready", get(kserve_model_ready))
        .route("/v2/models/{name}/infer", post(kserve_infer))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .route("/admin/reload", post(admin_reload))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit));
    // Only with export on: off, requests pass through no extra layer.
    let router = if crate::telemetry::enabled() {
        router.layer(middleware::from_fn(crate::telemetry::http_layer))
    } else {
        router
    };
    router
        .layer(middleware::from_fn_with_state(Arc::clone(&state), track))
        .with_state(state)
}

/// Counts and times every request by its route pattern (not its path, so
/// session ids do not explode the label space).
async fn track(State(app): App, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| route_label(p.as_str()));
    let response = next.run(request).await;
    app.metrics
        .http_duration
        .get_or_create(&RouteOnly { route })
        .observe(started.elapsed().as_secs_f64());
    app.metrics
        .http_requests
        .get_or_create(&RouteLabels {
            route,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

pub(crate) fn route_label(pattern: &str) -> &'static str {
    const ROUTES: [&str; 14] = [
        "/v1/score",
        "/v1/events",
        "/v1/sessions/{id}",
        "/v1/model",
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
        "/healthz",
        "/readyz",
        "/metrics",
        "/admin/reload",
    ];
    ROUTES
        .into_iter()
        .find(|r| *r == pattern)
        .unwrap_or("other")
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreQuery {
    #[serde(default)]
    explain: bool,
}

#[derive(Debug, Deserialize)]
struct BatchProbe<'a> {
    #[serde(borrow, default)]
    events: Option<Vec<&'a RawValue>>,
}

/// f32 values in their shortest exact form: going through `serde_json::Value`
/// would widen them to f64 digits (0.39225027 -> 0.39225026965141296).
#[derive(Debug)]
struct Named(Vec<(&'static str, f32)>);

impl Serialize for Named {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
}

#[derive(Debug, Serialize)]
struct ScoreResult {
    probability: f32,
    session_known: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    features: Option<Named>,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum BatchItem {
    Scored(ScoreResult),
    Failed { error: ErrorBody },
}

#[derive(Debug, Serialize)]
struct SingleScore<'a> {
    #[serde(flatten)]
    result: ScoreResult,
    model_version: &'a str,
}

#[derive(Debug, Serialize)]
struct BatchScore<'a> {
    model_version: &'a str,
    results: Vec<BatchItem>,
}

fn score_result(scored: &score::Scored, explain: bool) -> ScoreResult {
    ScoreResult {
        probability: scored.probability,
        session_known: scored.session_known,
        features: explain.then(|| Named(scored.row.named().collect())),
    }
}

fn failed(code: &'static str, message: impl std::fmt::Display) -> BatchItem {
    BatchItem::Failed {
        error: ErrorBody {
            code,
            message: message.to_string(),
        },
    }
}

async fn score_handler(
    State(app): App,
    query: Result<Query<ScoreQuery>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    let body = body.map_err(ApiError::body)?;
    let probe: BatchProbe<'_> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string()))?;
    let model = app.models.current().ok_or_else(ApiError::no_model)?;
    let reader = app.store.reader().map_err(|e| ApiError::store(&e))?;
    let model_version = model.version();
    match probe.events {
        None => {
            let event = Event::from_json(&body).map_err(|e| ApiError::invalid_event(&e))?;
            let scored = score::score(&model, &reader, &event)?;
            Ok(Json(SingleScore {
                result: score_result(&scored, query.explain),
                model_version,
            })
            .into_response())
        }
        Some(items) => {
            check_batch(items.len(), app.config.max_batch)?;
            let results = items
                .iter()
                .map(|raw| match Event::from_json(raw.get().as_bytes()) {
                    Err(e) => failed(e.code(), e),
                    Ok(event) => match score::score(&model, &reader, &event) {
                        Ok(scored) => BatchItem::Scored(score_result(&scored, query.explain)),
                        Err(e) => failed(e.code(), e),
                    },
                })
                .collect();
            Ok(Json(BatchScore {
                model_version,
                results,
            })
            .into_response())
        }
    }
}

fn check_batch(len: usize, limit: usize) -> Result<(), ApiError> {
    if len > limit {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "batch_too_large",
            format!("{len} events; the limit is {limit}"),
        ));
    }
    Ok(())
}

/// The raw items of an ingest body: a JSON array, or JSON lines.
fn ingest_items(body: &[u8]) -> Result<Vec<&[u8]>, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let items: Vec<&RawValue> = serde_json::from_slice(body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string()))?;
        return Ok(items.into_iter().map(|r| r.get().as_bytes()).collect());
    }
    Ok(body
        .split(|b| *b == b'\n')
        .filter(|line| line.iter().any(|b| !b.is_ascii_whitespace()))
        .collect())
}

async fn events_handler(
    State(app): App,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map_err(ApiError::body)?;
    let items = ingest_items(&body)?;
    check_batch(items.len(), app.config.max_ingest_events)?;
    let mut valid = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (index, item) in items.iter().enumerate() {
        match Event::from_json(item) {
            Ok(event) => valid.push(event),
            Err(error) => {
                app.metrics
                    .events_invalid
                    .get_or_create(&SourceReasonLabels {
                        source: "http",
                        reason: error.code(),
                    })
                    .inc();
                errors.push(json!({
                    "index": index,
                    "code": error.code(),
                    "field": error.field().map(|f| f.name()),
                    "message": error.to_string(),
                }));
            }
        }
    }
    let applied = valid.len();
    if !valid.is_empty() {
        app.ingestor
            .apply(valid, Vec::new(), "http")
            .await
            .map_err(|e| {
                let status = match e.code() {
                    "map_full" => StatusCode::INSUFFICIENT_STORAGE,
                    "shutting_down" => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::INTERNAL_SERVER_ERROR,
                };
                ApiError::new(status, e.code(), e.to_string())
            })?;
    }
    Ok(Json(json!({
        "applied": applied,
        "rejected": errors.len(),
        "errors": errors,
    })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SessionQuery {
    /// Product of the hypothetical cart (default: one not in the session).
    product_id: Option<u64>,
    price: Option<f64>,
    /// Time of the hypothetical cart (default: the store's watermark).
    at: Option<String>,
}

fn session_json(s: &ArchivedSessionState) -> Value {
    let facts = s.facts(0);
    json!({
        "user_id": s.user_id.to_native(),
        "started_at": facts.started_at.to_rfc3339(),
        "last_event_at": facts.last_event_at.to_rfc3339(),
        "events": facts.events,
        "views": facts.views,
        "carts": facts.carts,
        "removes": facts.removes,
        "purchases": facts.purchases,
        "distinct_products": facts.distinct_products,
        "mean_view_price": facts.mean_view_price,
        "products": s.products.iter().map(|p| json!({
            "product_id": p.product_id.to_native(),
            "last_seen_at": p.last_seen_at.get().to_rfc3339(),
            "views": p.views.to_native(),
            "carts": p.carts.to_native(),
            "removes": p.removes.to_native(),
            "purchases": p.purchases.to_native(),
        })).collect::<Vec<_>>(),
    })
}

fn user_json(u: &ArchivedUserState) -> Value {
    let facts = u.facts();
    json!({
        "first_seen_at": facts.first_seen_at.to_rfc3339(),
        "last_event_at": facts.last_event_at.to_rfc3339(),
        "sessions": facts.sessions,
        "events": facts.events,
        "views": u.views.to_native(),
        "carts": facts.carts,
        "purchases": facts.purchases,
    })
}

/// Columns that come from the cart's brand and category, not from state.
const ENCODED: [usize; 6] = [
    col::BRAND_FREQ,
    col::BRAND_PURCHASE_RATE,
    col::CATEGORY_L1_FREQ,
    col::CATEGORY_L1_PURCHASE_RATE,
    col::CATEGORY_L2_FREQ,
    col::CATEGORY_L2_PURCHASE_RATE,
];

async fn session_handler(
    State(app): App,
    Path(id): Path<String>,
    query: Result<Query<SessionQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.body_text()))?;
    let reader = app.store.reader().map_err(|e| ApiError::store(&e))?;
    // No valid event carries a longer id, and LMDB refuses over-long keys.
    let stored = if id.len() <= MAX_SESSION_BYTES {
        reader.session(&id).map_err(|e| ApiError::store(&e))?
    } else {
        None
    };
    let Some(session) = stored else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "session_not_found",
            format!("no state for session {id:?} (never seen, or expired and swept)"),
        ));
    };
    let user_id = session.user_id.to_native();
    let user = reader.user(user_id).map_err(|e| ApiError::store(&e))?;
    let watermark = reader.watermark().map_err(|e| ApiError::store(&e))?;
    let at = match &query.at {
        Some(text) => Timestamp::parse(text)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_query", e.to_string()))?,
        None => watermark.unwrap_or_else(|| session.last_event_at.get()),
    };
    let product_id = query.product_id.unwrap_or(0);
    let cart = Event {
        event_time: at,
        event_type: EventType::Cart,
        product_id,
        category_id: 0,
        category_code: None,
        brand: None,
        price: query.price.unwrap_or(0.0),
        user_id,
        user_session: id.clone(),
    };
    let session_facts = session.facts(product_id);
    let row = FeatureRow::from_facts(Some(session_facts), user.map(|u| u.facts()), &cart);
    let features = Named(
        (0..FEATURE_COUNT)
            .filter(|c| !ENCODED.contains(c))
            .map(|c| (FEATURE_NAMES[c], row.0[c]))
            .collect(),
    );
    Ok(Json(json!({
        "session_id": id,
        "live": session_facts.is_live_at(at),
        "as_of": at.to_rfc3339(),
        "session": session_json(session),
        "user": user.map(user_json),
        "features": features,
        "features_note": "values a cart of product_id at as_of would get; brand and category encodings depend on the cart and are left out",
    })))
}

fn model_json(model: &ServingModel) -> Value {
    json!({
        "model_version": model.version(),
        "contract_version": model.metadata.contract_version,
        "evaluator": model.evaluator_name(),
        "trees": model.trees,
        "path": model.file.path,
        "size_bytes": model.file.size,
        "blake3": model.blake3,
        "loaded_at_unix_seconds": model.loaded_at.duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        "load_ms": model.load_time.as_secs_f64() * 1e3,
        "verified_rows": model.verified_rows,
        "verified_max_diff": model.verified_max_diff,
        "feature_names": model.metadata.feature_names,
        "data_fingerprint": model.metadata.data_fingerprint,
        "metrics": model.metadata.metrics,
    })
}

async fn model_handler(State(app): App) -> Json<Value> {
    let model = app.models.current();
    Json(json!({
        "model": model.as_deref().map(model_json),
        "model_dir": app.models.dir(),
        "last_reload": app.models.last_report(),
        "recent_rejections": app.models.recent_rejections(),
    }))
}

/// Ready to score. A stale stream is reported, and fails readiness only when
/// configured to: scores from slightly old state usually beat no scores.
fn readiness(app: &AppState) -> (bool, Value) {
    let model = app.models.current().is_some();
    let tcp = app.tcp_ready.load(Ordering::Relaxed);
    let store = app.store.reader().is_ok();
    let stream = app.stream.as_ref().map(|h| h.status());
    let fresh_enough = !app.unready_when_stale || stream.as_ref().is_none_or(|s| !s.stale);
    (
        model && tcp && store && fresh_enough,
        json!({
            "model_loaded": model,
            "tcp_listening": tcp,
            "store_readable": store,
            "stream": stream,
        }),
    )
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(app): App) -> (StatusCode, Json<Value>) {
    let (ready, checks) = readiness(&app);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready, "checks": checks})))
}

async fn metrics_handler(State(app): App) -> Response {
    if let Some(health) = &app.stream {
        app.metrics
            .stream
            .staleness
            .set(health.status().staleness_seconds);
    }
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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn reloader_stopped() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the reloader has stopped",
    )
}

async fn admin_reload(State(app): App, headers: HeaderMap) -> Result<Response, ApiError> {
    if !authorized(&app, &headers) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer <token>` header is required",
        ));
    }
    let (reply, done) = tokio::sync::oneshot::channel();
    app.reload
        .send(ReloadRequest {
            trigger: ReloadTrigger::Admin,
            reply: Some(reply),
        })
        .map_err(|_| reloader_stopped())?;
    let report = tokio::time::timeout(ADMIN_RELOAD_TIMEOUT, done)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "reload_timeout",
                "reload still running",
            )
        })?
        .map_err(|_| reloader_stopped())?;
    let status = match report.result {
        ReloadResult::Loaded | ReloadResult::Unchanged => StatusCode::OK,
        ReloadResult::Rejected => StatusCode::UNPROCESSABLE_ENTITY,
        ReloadResult::NoModel => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut body = json!({"report": report});
    if status != StatusCode::OK {
        let reason = report.rejected.first().map_or_else(
            || "no loadable bundle in the model folder".to_owned(),
            |r| r.reason.clone(),
        );
        body["error"] = json!({"code": "model_rejected", "message": reason});
    }
    Ok((status, Json(body)).into_response())
}

// ----- Open Inference Protocol (KServe V2) -----

fn kserve_error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"error": message.into()}))).into_response()
}

async fn kserve_server() -> Json<Value> {
    Json(json!({
        "name": "cartscore",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
    }))
}

async fn kserve_live() -> Json<Value> {
    Json(json!({"live": true}))
}

async fn kserve_ready(State(app): App) -> (StatusCode, Json<Value>) {
    let (ready, _) = readiness(&app);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"ready": ready})))
}

/// The 404 for any model name but ours.
fn unknown_model(name: &str) -> Option<Response> {
    (name != KSERVE_MODEL).then(|| {
        kserve_error(
            StatusCode::NOT_FOUND,
            format!("unknown model {name:?}; this server serves {KSERVE_MODEL:?}"),
        )
    })
}

async fn kserve_model(State(app): App, Path(name): Path<String>) -> Response {
    if let Some(response) = unknown_model(&name) {
        return response;
    }
    let Some(model) = app.models.current() else {
        return kserve_error(StatusCode::SERVICE_UNAVAILABLE, "no model is loaded");
    };
    Json(json!({
        "name": KSERVE_MODEL,
        "versions": [model.version()],
        "platform": "onnx",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, FEATURE_COUNT]}],
        "outputs": [{"name": "probability", "datatype": "FP32", "shape": [-1, 1]}],
        "parameters": {"feature_names": FEATURE_NAMES, "evaluator": model.evaluator_name()},
    }))
    .into_response()
}

async fn kserve_model_ready(State(app): App, Path(name): Path<String>) -> Response {
    if let Some(response) = unknown_model(&name) {
        return response;
    }
    let ready = app.models.current().is_some();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({"name": KSERVE_MODEL, "ready": ready}))).into_response()
}

#[derive(Debug, Deserialize)]
struct InferRequest {
    id: Option<String>,
    inputs: Vec<InferInput>,
    #[allow(dead_code)]
    parameters: Option<Value>,
    #[allow(dead_code)]
    outputs: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Debug, Serialize)]
struct InferResponse<'a> {
    model_name: &'static str,
    model_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: [InferOutput; 1],
}

#[derive(Debug, Serialize)]
struct InferOutput {
    name: &'static str,
    datatype: &'static str,
    shape: [usize; 2],
    data: Vec<f32>,
}

/// Flattens row-major data given flat or nested, as the protocol allows.
fn flatten(value: &Value, out: &mut Vec<f32>) -> Result<(), String> {
    match value {
        Value::Array(items) => items.iter().try_for_each(|v| flatten(v, out)),
        Value::Number(n) => {
            let v = n.as_f64().ok_or("not a number")? as f32;
            if !v.is_finite() {
                return Err(format!("{n} is not a finite FP32 value"));
            }
            out.push(v);
            Ok(())
        }
        other => Err(format!("expected numbers, found {other}")),
    }
}

async fn kserve_infer(
    State(app): App,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Some(response) = unknown_model(&name) {
        return response;
    }
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return kserve_error(rejection.status(), rejection.body_text()),
    };
    let request: InferRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return kserve_error(StatusCode::BAD_REQUEST, format!("malformed request: {e}")),
    };
    let [input] = request.inputs.as_slice() else {
        return kserve_error(
            StatusCode::BAD_REQUEST,
            format!(
                "expected exactly one input (\"features\"), got {}",
                request.inputs.len()
            ),
        );
    };
    if input.datatype != "FP32" {
        return kserve_error(
            StatusCode::BAD_REQUEST,
            format!(
                "input {:?} has datatype {}, expected FP32",
                input.name, input.datatype
            ),
        );
    }
    let batch = match input.shape.as_slice() {
        [b, n] if *n == FEATURE_COUNT as i64 && *b >= 1 => *b as usize,
        _ => {
            return kserve_error(
                StatusCode::BAD_REQUEST,
                format!("shape {:?} is not [batch, {FEATURE_COUNT}]", input.shape),
            );
        }
    };
    if batch > app.config.max_batch {
        return kserve_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "batch {batch} is over the limit of {}",
                app.config.max_batch
            ),
        );
    }
    let mut rows = Vec::with_capacity(batch * FEATURE_COUNT);
    if let Err(e) = flatten(&input.data, &mut rows) {
        return kserve_error(StatusCode::BAD_REQUEST, e);
    }
    if rows.len() != batch * FEATURE_COUNT {
        return kserve_error(
            StatusCode::BAD_REQUEST,
            format!(
                "data has {} values; shape {:?} needs {}",
                rows.len(),
                input.shape,
                batch * FEATURE_COUNT
            ),
        );
    }
    let Some(model) = app.models.current() else {
        return kserve_error(StatusCode::SERVICE_UNAVAILABLE, "no model is loaded");
    };
    match model.predict_batch(&rows) {
        Ok(probabilities) => Json(InferResponse {
            model_name: KSERVE_MODEL,
            model_version: model.version(),
            id: request.id,
            outputs: [InferOutput {
                name: "probability",
                datatype: "FP32",
                shape: [batch, 1],
                data: probabilities,
            }],
        })
        .into_response(),
        Err(e) => kserve_error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
