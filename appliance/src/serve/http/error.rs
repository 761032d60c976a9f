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
    /// A `not_owner` answer names the shard to ask (boxed: every handler
    /// returns this type, and an inline owner would double its size).
    pub owner: Option<Box<OwnerBody>>,
}

impl ApiError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            owner: None,
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
            owner: self.owner.as_deref().cloned(),
        }
    }
}

/// Every domain error answers with its own row and its message.
impl<E: ErrorCode> From<E> for ApiError {
    fn from(error: E) -> Self {
        Self {
            code: error.error_code(),
            message: error.to_string(),
            owner: error.redirect().map(|r| Box::new(OwnerBody::of(r))),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<OwnerBody>,
}

/// The shard that holds a user, in a `not_owner` answer (HTTP 421).
#[derive(Debug, Clone, Serialize)]
pub struct OwnerBody {
    pub member: String,
    pub http: String,
    pub tcp: Option<String>,
    pub partition: u32,
    pub partitions: u32,
}

impl OwnerBody {
    fn of(redirect: &cartscore_protocol::Redirect) -> Self {
        Self {
            member: redirect.member.clone(),
            http: redirect.http.clone(),
            tcp: redirect.tcp.clone(),
            partition: redirect.partition,
            partitions: redirect.partitions,
        }
    }
}

impl ErrorBody {
    pub fn of(error: &dyn ErrorCode) -> Self {
        Self {
            code: error.error_code().name(),
            message: error.to_string(),
            owner: error.redirect().map(OwnerBody::of),
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
