//! The JSON API (axum), one file per API: [`v1`] (scoring, ingest, the
//! feature service, the shard map, the outcomes), [`model`] (the models'
//! status), [`kserve`] (the Open Inference Protocol, V2), [`ops`] (health,
//! readiness, metrics, admin) and [`error`] (the error
//! answers of both APIs, from the code table). This file builds the router
//! and times every request once, for Prometheus and, when export is on,
//! OpenTelemetry.

pub mod error;
pub mod kserve;
pub mod model;
pub mod ops;
pub mod server;
pub mod state;
pub mod v1;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::error::Code;
use crate::ops::metrics::{ConnectionLabels, RouteLabels, RouteOnly};
use crate::ops::telemetry;
use error::ApiError;
use state::App;
pub use state::AppState;

/// Every route, as its pattern: the bounded label set of the request metrics.
const ROUTES: [&str; 18] = [
    "/v1/score",
    "/v1/events",
    "/v1/sessions/{id}",
    "/v1/model",
    "/v1/shards",
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
    "/v1/outcomes",
    "/admin/promote",
    "/admin/rollback",
];

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.config.max_body_bytes;
    Router::new()
        .route(ROUTES[0], post(v1::score))
        .route(ROUTES[1], post(v1::events))
        .route(ROUTES[2], get(v1::session))
        .route(ROUTES[3], get(model::model))
        .route(ROUTES[4], get(v1::shards))
        .route(ROUTES[5], get(kserve::server))
        .route(ROUTES[6], get(kserve::live))
        .route(ROUTES[7], get(kserve::ready))
        .route(ROUTES[8], get(kserve::model))
        .route(ROUTES[9], get(kserve::model_ready))
        .route(ROUTES[10], post(kserve::infer))
        .route(ROUTES[11], get(ops::healthz))
        .route(ROUTES[12], get(ops::readyz))
        .route(ROUTES[13], get(ops::metrics))
        .route(ROUTES[14], post(ops::admin_reload))
        .route(ROUTES[15], get(v1::outcomes))
        .route(ROUTES[16], post(ops::admin_promote))
        .route(ROUTES[17], post(ops::admin_rollback))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), track))
        .with_state(state)
}

/// Counts and times every request by its route pattern (not its path, so
/// session ids do not explode the label space), and answers 408 to one
/// whose body and handling outlast `http.request_timeout_ms` (a body
/// dribbled in holds no more than that).
async fn track(State(app): App, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| route_label(p.as_str()));
    let exported = telemetry::http_request(request.method().as_str(), route);
    let limit = std::time::Duration::from_millis(app.config.request_timeout_ms);
    let response = match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            app.metrics
                .connections_closed
                .get_or_create(&ConnectionLabels {
                    api: "http",
                    reason: "request_timeout",
                })
                .inc();
            ApiError::new(
                Code::RequestTimeout,
                format!(
                    "the request took longer than http.request_timeout_ms ({} ms)",
                    app.config.request_timeout_ms
                ),
            )
            .into_response()
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    app.metrics
        .http_duration
        .get_or_create(&RouteOnly { route })
        .observe(seconds);
    app.metrics
        .http_requests
        .get_or_create(&RouteLabels { route, status })
        .inc();
    if let Some(exported) = exported {
        exported.finish(status, seconds);
    }
    response
}

fn route_label(pattern: &str) -> &'static str {
    ROUTES
        .into_iter()
        .find(|r| *r == pattern)
        .unwrap_or("other")
}

async fn not_found() -> ApiError {
    ApiError::new(Code::NotFound, "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(Code::MethodNotAllowed, "method not allowed on this route")
}
