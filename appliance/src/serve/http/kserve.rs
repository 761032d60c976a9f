//! The Open Inference Protocol (KServe V2): server and model metadata,
//! readiness, and `infer` on FP32 feature rows `[B, 25]` (flat or nested
//! data) answered with FP32 probabilities `[B, 1]`. Errors are the
//! protocol's `{"error":"…"}`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cartscore_core::{FEATURE_COUNT, FEATURE_NAMES};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{ApiError, KserveError};
use super::ops::{readiness, ready_status};
use super::state::App;
use crate::error::Code;

/// The model name under the Open Inference Protocol.
pub const KSERVE_MODEL: &str = "cartscore";

#[derive(Debug, Serialize)]
pub struct ServerMetadata {
    name: &'static str,
    version: &'static str,
    extensions: [&'static str; 0],
}

pub async fn server() -> Json<ServerMetadata> {
    Json(ServerMetadata {
        name: KSERVE_MODEL,
        version: env!("CARGO_PKG_VERSION"),
        extensions: [],
    })
}

#[derive(Debug, Serialize)]
pub struct Live {
    live: bool,
}

pub async fn live() -> Json<Live> {
    Json(Live { live: true })
}

#[derive(Debug, Serialize)]
pub struct Ready {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'static str>,
    ready: bool,
}

pub async fn ready(State(app): App) -> (StatusCode, Json<Ready>) {
    let (ready, _) = readiness(&app);
    (ready_status(ready), Json(Ready { name: None, ready }))
}

/// Any model name but ours is a 404.
fn check_name(name: &str) -> Result<(), KserveError> {
    if name == KSERVE_MODEL {
        return Ok(());
    }
    Err(ApiError::new(
        Code::UnknownModel,
        format!("unknown model {name:?}; this server serves {KSERVE_MODEL:?}"),
    )
    .into())
}

fn no_model() -> KserveError {
    ApiError::new(Code::ModelUnavailable, "no model is loaded").into()
}

#[derive(Debug, Serialize)]
pub struct TensorSpec {
    name: &'static str,
    datatype: &'static str,
    shape: [i64; 2],
}

#[derive(Debug, Serialize)]
pub struct ModelParameters {
    feature_names: [&'static str; FEATURE_COUNT],
    evaluator: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ModelMetadata {
    name: &'static str,
    versions: [String; 1],
    platform: &'static str,
    inputs: [TensorSpec; 1],
    outputs: [TensorSpec; 1],
    parameters: ModelParameters,
}

pub async fn model(
    State(app): App,
    Path(name): Path<String>,
) -> Result<Json<ModelMetadata>, KserveError> {
    check_name(&name)?;
    let model = app.models.current().ok_or_else(no_model)?;
    Ok(Json(ModelMetadata {
        name: KSERVE_MODEL,
        versions: [model.version().to_owned()],
        platform: "onnx",
        inputs: [TensorSpec {
            name: "features",
            datatype: "FP32",
            shape: [-1, FEATURE_COUNT as i64],
        }],
        outputs: [TensorSpec {
            name: "probability",
            datatype: "FP32",
            shape: [-1, 1],
        }],
        parameters: ModelParameters {
            feature_names: FEATURE_NAMES,
            evaluator: model.evaluator_name(),
        },
    }))
}

pub async fn model_ready(
    State(app): App,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Ready>), KserveError> {
    check_name(&name)?;
    let ready = app.models.current().is_some();
    Ok((
        ready_status(ready),
        Json(Ready {
            name: Some(KSERVE_MODEL),
            ready,
        }),
    ))
}

#[derive(Debug, Deserialize)]
pub struct InferRequest {
    id: Option<String>,
    // The protocol's `parameters` and `outputs` are accepted and ignored.
    inputs: Vec<InferInput>,
}

#[derive(Debug, Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    data: Value,
}

#[derive(Debug, Serialize)]
pub struct InferResponse<'a> {
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

fn bad_input(message: String) -> KserveError {
    ApiError::new(Code::BadInput, message).into()
}

/// The request's feature rows, row-major, and how many there are.
fn rows_of(request: &InferRequest, max_batch: usize) -> Result<(Vec<f32>, usize), KserveError> {
    let [input] = request.inputs.as_slice() else {
        return Err(bad_input(format!(
            "expected exactly one input (\"features\"), got {}",
            request.inputs.len()
        )));
    };
    if input.datatype != "FP32" {
        return Err(bad_input(format!(
            "input {:?} has datatype {}, expected FP32",
            input.name, input.datatype
        )));
    }
    let batch = match input.shape.as_slice() {
        [b, n] if *n == FEATURE_COUNT as i64 && *b >= 1 => *b as usize,
        _ => {
            return Err(bad_input(format!(
                "shape {:?} is not [batch, {FEATURE_COUNT}]",
                input.shape
            )));
        }
    };
    if batch > max_batch {
        return Err(ApiError::new(
            Code::BatchTooLarge,
            format!("batch {batch} is over the limit of {max_batch}"),
        )
        .into());
    }
    let mut rows = Vec::with_capacity(batch * FEATURE_COUNT);
    flatten(&input.data, &mut rows).map_err(bad_input)?;
    if rows.len() != batch * FEATURE_COUNT {
        return Err(bad_input(format!(
            "data has {} values; shape {:?} needs {}",
            rows.len(),
            input.shape,
            batch * FEATURE_COUNT
        )));
    }
    Ok((rows, batch))
}

pub async fn infer(
    State(app): App,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, KserveError> {
    check_name(&name)?;
    let body = body.map_err(|e| ApiError::body(&e))?;
    let request: InferRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(Code::MalformedJson, format!("malformed request: {e}")))?;
    let (rows, batch) = rows_of(&request, app.config.max_batch.get())?;
    let model = app.models.current().ok_or_else(no_model)?;
    let probabilities = model.predict_batch(&rows)?;
    // Encoded here, while the model that answered is held.
    Ok(Json(InferResponse {
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
    .into_response())
}
