//! Every error the appliance reports, in one table: its code (what the JSON
//! API answers), its HTTP status, its metric label and its binary-protocol
//! status. Domain errors (store, ingest, validation, model, score) implement
//! [`ErrorCode`]; the HTTP errors, the KServe V2 errors, the TCP answers and
//! the metric labels are all read from [`Code::row`], so no status or label
//! is ever chosen by looking at a message.

use axum::http::StatusCode;
use cartscore_core::EventError;
use cartscore_protocol::Status;

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    /// The `error.code` of a JSON answer.
    pub code: &'static str,
    pub status: StatusCode,
    /// The `reason` label of the metrics that count it.
    pub label: &'static str,
    /// The status of a binary-protocol answer.
    pub tcp: Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    // The request itself.
    MalformedJson,
    BadQuery,
    BadBody,
    BadInput,
    BodyTooLarge,
    BatchTooLarge,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    Unauthorized,
    UnknownModel,
    /// An event that fails `core`'s validation: the rule's code (such as
    /// `negative_price`) is both the answer's code and the metric label.
    InvalidEvent(&'static str),
    NotACart,
    // Shards.
    NotOwner,
    OwnerUnknown,
    // State.
    SessionNotFound,
    SessionAmbiguous,
    MapFull,
    StoreOpen,
    StoreLmdb,
    StoreCorrupt,
    StoreEncode,
    // Models.
    ModelUnavailable,
    ModelFailed,
    ModelRejected,
    ReloadTimeout,
    /// The model that answered cannot explain (no covers in its bundle).
    ExplainUnavailable,
    /// A promote or rollback that cannot be done (no challenger, another
    /// contract, nothing to roll back to).
    ModelChangeRefused,
    /// A promote or rollback whose files could not be moved.
    ModelChangeFailed,
    // The process.
    ShuttingDown,
}

impl Code {
    /// The table.
    #[rustfmt::skip]
    pub const fn row(self) -> Row {
        use StatusCode as H;
        use Status::{InternalError, InvalidEvent, MalformedFrame, ModelUnavailable, NotOwner, OwnerUnknown, Unsupported};
        const fn row(code: &'static str, status: H, label: &'static str, tcp: Status) -> Row {
            Row {
                code,
                status,
                label,
                tcp,
            }
        }
        match self {
            Code::MalformedJson => row("malformed_json", H::BAD_REQUEST, "malformed_json", MalformedFrame),
            Code::BadQuery => row("bad_query", H::BAD_REQUEST, "bad_query", MalformedFrame),
            Code::BadBody => row("bad_body", H::BAD_REQUEST, "bad_body", MalformedFrame),
            Code::BadInput => row("bad_input", H::BAD_REQUEST, "bad_input", MalformedFrame),
            Code::BodyTooLarge => row("body_too_large", H::PAYLOAD_TOO_LARGE, "body_too_large", MalformedFrame),
            Code::BatchTooLarge => row("batch_too_large", H::PAYLOAD_TOO_LARGE, "batch_too_large", MalformedFrame),
            Code::NotFound => row("not_found", H::NOT_FOUND, "not_found", MalformedFrame),
            Code::MethodNotAllowed => row("method_not_allowed", H::METHOD_NOT_ALLOWED, "method_not_allowed", MalformedFrame),
            Code::RequestTimeout => row("request_timeout", H::REQUEST_TIMEOUT, "request_timeout", MalformedFrame),
            Code::Unauthorized => row("unauthorized", H::UNAUTHORIZED, "unauthorized", MalformedFrame),
            Code::UnknownModel => row("unknown_model", H::NOT_FOUND, "unknown_model", MalformedFrame),
            Code::InvalidEvent(rule) => row(rule, H::UNPROCESSABLE_ENTITY, rule, InvalidEvent),
            Code::NotACart => row("not_a_cart_event", H::UNPROCESSABLE_ENTITY, "not_a_cart_event", InvalidEvent),
            Code::NotOwner => row("not_owner", H::MISDIRECTED_REQUEST, "not_owner", NotOwner),
            Code::OwnerUnknown => row("owner_unknown", H::SERVICE_UNAVAILABLE, "owner_unknown", OwnerUnknown),
            Code::SessionNotFound => row("session_not_found", H::NOT_FOUND, "session_not_found", InvalidEvent),
            Code::SessionAmbiguous => row("session_ambiguous", H::CONFLICT, "session_ambiguous", InvalidEvent),
            Code::MapFull => row("map_full", H::INSUFFICIENT_STORAGE, "map_full", InternalError),
            Code::StoreOpen => row("store_error", H::INTERNAL_SERVER_ERROR, "open", InternalError),
            Code::StoreLmdb => row("store_error", H::INTERNAL_SERVER_ERROR, "lmdb", InternalError),
            Code::StoreCorrupt => row("store_error", H::INTERNAL_SERVER_ERROR, "corrupt", InternalError),
            Code::StoreEncode => row("store_error", H::INTERNAL_SERVER_ERROR, "encode", InternalError),
            Code::ModelUnavailable => row("model_unavailable", H::SERVICE_UNAVAILABLE, "model_unavailable", ModelUnavailable),
            Code::ModelFailed => row("model_error", H::INTERNAL_SERVER_ERROR, "model_error", InternalError),
            Code::ModelRejected => row("model_rejected", H::UNPROCESSABLE_ENTITY, "model_rejected", InternalError),
            Code::ReloadTimeout => row("reload_timeout", H::GATEWAY_TIMEOUT, "reload_timeout", InternalError),
            Code::ExplainUnavailable => row("explain_unavailable", H::CONFLICT, "explain_unavailable", Unsupported),
            Code::ModelChangeRefused => row("model_change_refused", H::CONFLICT, "refused", InternalError),
            Code::ModelChangeFailed => row("model_change_failed", H::INTERNAL_SERVER_ERROR, "failed", InternalError),
            Code::ShuttingDown => row("shutting_down", H::SERVICE_UNAVAILABLE, "shutting_down", InternalError),
        }
    }

    pub const fn name(self) -> &'static str {
        self.row().code
    }

    pub const fn status(self) -> StatusCode {
        self.row().status
    }

    pub const fn label(self) -> &'static str {
        self.row().label
    }

    pub const fn tcp(self) -> Status {
        self.row().tcp
    }

    /// The reasons a write transaction fails, as the store's metrics label
    /// them (exported at 0 from the start).
    pub const STORE_WRITE: [Code; 4] = [
        Code::MapFull,
        Code::StoreLmdb,
        Code::StoreCorrupt,
        Code::StoreEncode,
    ];
}

/// An error that knows its row of the table.
pub trait ErrorCode: std::error::Error {
    fn error_code(&self) -> Code;

    /// The shard that should answer instead (a `not_owner` error).
    fn redirect(&self) -> Option<&cartscore_protocol::Redirect> {
        None
    }
}

/// Validation is `core`'s: its code names the rule that failed.
impl ErrorCode for EventError {
    fn error_code(&self) -> Code {
        Code::InvalidEvent(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_validation_rule_is_an_unprocessable_invalid_event_labelled_by_its_code() {
        for rule in EventError::CODES {
            let row = Code::InvalidEvent(rule).row();
            assert_eq!((row.code, row.label), (rule, rule));
            assert_eq!(row.status, StatusCode::UNPROCESSABLE_ENTITY);
            assert_eq!(row.tcp, Status::InvalidEvent);
        }
        let error = EventError::NegativePrice { value: -1.0 };
        assert_eq!(error.error_code().name(), "negative_price");
    }

    #[test]
    fn store_failures_share_an_answer_but_keep_their_labels() {
        let labels: Vec<_> = Code::STORE_WRITE.iter().map(|c| c.label()).collect();
        assert_eq!(labels, ["map_full", "lmdb", "corrupt", "encode"]);
        assert_eq!(Code::StoreLmdb.name(), "store_error");
        assert_eq!(Code::MapFull.status(), StatusCode::INSUFFICIENT_STORAGE);
    }
}
