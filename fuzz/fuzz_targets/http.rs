//! The HTTP bodies, through the appliance's own router: `/v1/score` (one
//! cart, a batch, with explanations and the shadow's score), `/v1/events`
//! (an array or JSON lines) and KServe V2 infer. Whatever the body, the
//! answer is a 2xx or a 4xx (507 when the store is full), its body is JSON,
//! and an error carries a code from the table (`{"error":{"code"…}}`, or the
//! Open Inference Protocol's `{"error":"…"}` under /v2).
#![no_main]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

#[path = "fixture.rs"]
mod fixture;

const ROUTES: [&str; 5] = [
    "/v1/score",
    "/v1/score?explain=true&shadow=true",
    "/v1/events",
    "/v2/models/cartscore/infer",
    "/v1/score?explain=maybe",
];

fuzz_target!(|data: &[u8]| {
    fixture::FIXTURE.with(|fixture| {
        for route in ROUTES {
            let request = Request::post(route)
                .header("content-type", "application/json")
                .body(Body::from(data.to_vec()))
                .expect("a request");
            let (status, body) = fixture.runtime.block_on(async {
                let response = fixture
                    .router
                    .clone()
                    .oneshot(request)
                    .await
                    .expect("the router answers");
                let status = response.status();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .expect("the body")
                    .to_bytes();
                (status, body)
            });
            assert!(
                !status.is_server_error() || status == StatusCode::INSUFFICIENT_STORAGE,
                "{route}: {status} {}",
                String::from_utf8_lossy(&body)
            );
            let json: serde_json::Value = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("{route}: {status} answered with no JSON ({e})"));
            if status.is_client_error() {
                let error = &json["error"];
                if route.starts_with("/v2") {
                    assert!(error.is_string(), "{route}: {json}");
                } else {
                    assert!(error["code"].is_string(), "{route}: {json}");
                    assert!(error["message"].is_string(), "{route}: {json}");
                }
            }
        }
    });
});
