//! Error answers, built from the code table: `{"error":{"code","message"}}`
//! for the JSON API and `{"error":"…"}` under /v2, as the Open Inference
//! Protocol requires, both with the code's HTTP status.

use axum::Json;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::{Code, ErrorCode};

/// An answer that is an error: its row of the table and what to say.
#[derive(Debug)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A body axum could not read: over `http.max_body_bytes`, or broken.
    pub fn body(rejection: &BytesRejection) -> Self {
        let code = if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Code::BodyTooLarge
        } else {
            Code::BadBody
        };
        Self::new(code, rejection.body_text())
    }

    pub fn query(rejection: &QueryRejection) -> Self {
        Self::new(Code::BadQuery, rejection.body_text())
    }

    pub fn json(error: &serde_json::Error) -> Self {
        Self::new(Code::MalformedJson, error.to_string())
    }

    pub fn no_model() -> Self {
        Self::new(
            Code::ModelUnavailable,
            "no model is loaded; see GET /v1/model",
        )
    }

    /// Refuses more than `limit` items in one request.
    pub fn check_batch(len: usize, limit: usize) -> Result<(), Self> {
        if len > limit {
            return Err(Self::new(
                Code::BatchTooLarge,
                format!("{len} events; the limit is {limit}"),
            ));
        }
        Ok(())
    }

    /// The `{"code","message"}` object of an answer or of a batch item.
    pub fn body_of(&self) -> ErrorBody {
        ErrorBody {
            code: self.code.name(),
            message: self.message.clone(),
        }
    }
}

/// Every domain error answers with its own row and its message.
impl<E: ErrorCode> From<E> for ApiError {
    fn from(error: E) -> Self {
        Self::new(error.error_code(), error.to_string())
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub code: &'static str,
    pub message: String,
}

impl ErrorBody {
    pub fn of(error: &dyn ErrorCode) -> Self {
        Self {
            code: error.error_code().name(),
            message: error.to_string(),
        }
    }
}

#[derive(Debug, Serialize)]
struct ErrorAnswer {
    error: ErrorBody,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.code.status();
        let body = ErrorAnswer {
            error: self.body_of(),
        };
        (status, Json(body)).into_response()
    }
}

/// An error under /v2: the same table, the protocol's shape.
#[derive(Debug)]
pub struct KserveError(pub ApiError);

#[derive(Debug, Serialize)]
struct KserveErrorAnswer {
    error: String,
}

impl<E: Into<ApiError>> From<E> for KserveError {
    fn from(error: E) -> Self {
        Self(error.into())
    }
}

impl IntoResponse for KserveError {
    fn into_response(self) -> Response {
        let status = self.0.code.status();
        (
            status,
            Json(KserveErrorAnswer {
                error: self.0.message,
            }),
        )
            .into_response()
    }
}
