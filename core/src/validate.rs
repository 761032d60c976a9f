//! What can be wrong with an incoming event, and the limits that decide it.
//!
//! Every rejection names the field and the reason and has a stable short
//! `code()` used as a metric label and in the invalid-event topic.

use thiserror::Error;

/// Largest accepted message (JSON object, CSV line or envelope) in bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// `user_session` length bounds in bytes (the data set uses 36-byte UUIDs).
pub const MAX_SESSION_BYTES: usize = 128;
/// Longest accepted `brand` or `category_code`.
pub const MAX_TEXT_BYTES: usize = 256;

/// The event fields, as named in the data set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Field {
    EventTime,
    EventType,
    ProductId,
    CategoryId,
    CategoryCode,
    Brand,
    Price,
    UserId,
    UserSession,
}

impl Field {
    pub const ALL: [Field; 9] = [
        Field::EventTime,
        Field::EventType,
        Field::ProductId,
        Field::CategoryId,
        Field::CategoryCode,
        Field::Brand,
        Field::Price,
        Field::UserId,
        Field::UserSession,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Field::EventTime => "event_time",
            Field::EventType => "event_type",
            Field::ProductId => "product_id",
            Field::CategoryId => "category_id",
            Field::CategoryCode => "category_code",
            Field::Brand => "brand",
            Field::Price => "price",
            Field::UserId => "user_id",
            Field::UserSession => "user_session",
        }
    }
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why an event was rejected.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum EventError {
    #[error("message is {len} bytes, over the {max}-byte limit")]
    Oversize { len: usize, max: usize },
    #[error("message is not valid UTF-8")]
    NotUtf8,
    #[error("malformed message: {reason}")]
    Malformed { reason: String },
    #[error("missing field `{field}`")]
    Missing { field: Field },
    #[error("field `{field}` has the wrong type: expected {expected}")]
    WrongType {
        field: Field,
        expected: &'static str,
    },
    #[error("field `{field}` is not a valid unsigned integer: {value:?}")]
    BadInteger { field: Field, value: String },
    #[error("field `{field}` must be greater than zero")]
    ZeroId { field: Field },
    #[error("unknown event_type {value:?} (expected view, cart, remove_from_cart or purchase)")]
    UnknownEventType { value: String },
    #[error("price is not a number: {value:?}")]
    BadPrice { value: String },
    #[error("price must be finite")]
    NonFinitePrice,
    #[error("price must not be negative, got {value}")]
    NegativePrice { value: f64 },
    #[error("user_session is empty")]
    EmptySession,
    #[error("user_session is {len} bytes, over the {max}-byte limit")]
    SessionTooLong { len: usize, max: usize },
    #[error("field `{field}` is {len} bytes, over the {max}-byte limit")]
    TextTooLong {
        field: Field,
        len: usize,
        max: usize,
    },
    #[error("event_time is not a recognised timestamp: {value:?}")]
    BadTimestamp { value: String },
    #[error("event_time {micros} µs since epoch is outside 2000-01-01 .. 2100-01-01")]
    TimestampOutOfRange { micros: i64 },
    #[error("the row is a CDC delete marker, not an event")]
    DeletedRow,
    #[error("the row is a CDC update of a stored event: events are facts and are not changed")]
    UpdatedRow,
}

impl EventError {
    /// Stable identifier for metrics and the invalid-event topic.
    pub fn code(&self) -> &'static str {
        match self {
            EventError::Oversize { .. } => "oversize",
            EventError::NotUtf8 => "not_utf8",
            EventError::Malformed { .. } => "malformed",
            EventError::Missing { .. } => "missing_field",
            EventError::WrongType { .. } => "wrong_type",
            EventError::BadInteger { .. } => "bad_integer",
            EventError::ZeroId { .. } => "zero_id",
            EventError::UnknownEventType { .. } => "unknown_event_type",
            EventError::BadPrice { .. } => "bad_price",
            EventError::NonFinitePrice => "non_finite_price",
            EventError::NegativePrice { .. } => "negative_price",
            EventError::EmptySession => "empty_session",
            EventError::SessionTooLong { .. } => "session_too_long",
            EventError::TextTooLong { .. } => "text_too_long",
            EventError::BadTimestamp { .. } => "bad_timestamp",
            EventError::TimestampOutOfRange { .. } => "timestamp_out_of_range",
            EventError::DeletedRow => "deleted_row",
            EventError::UpdatedRow => "updated_row",
        }
    }

    /// The field the error is about, when there is one.
    pub fn field(&self) -> Option<Field> {
        match self {
            EventError::Missing { field }
            | EventError::WrongType { field, .. }
            | EventError::BadInteger { field, .. }
            | EventError::ZeroId { field }
            | EventError::TextTooLong { field, .. } => Some(*field),
            EventError::UnknownEventType { .. } => Some(Field::EventType),
            EventError::BadPrice { .. }
            | EventError::NonFinitePrice
            | EventError::NegativePrice { .. } => Some(Field::Price),
            EventError::EmptySession | EventError::SessionTooLong { .. } => {
                Some(Field::UserSession)
            }
            EventError::BadTimestamp { .. } | EventError::TimestampOutOfRange { .. } => {
                Some(Field::EventTime)
            }
            EventError::Oversize { .. }
            | EventError::NotUtf8
            | EventError::Malformed { .. }
            | EventError::DeletedRow
            | EventError::UpdatedRow => None,
        }
    }

    /// Every code, for pre-registering metric series.
    pub const CODES: [&'static str; 18] = [
        "oversize",
        "not_utf8",
        "malformed",
        "missing_field",
        "wrong_type",
        "bad_integer",
        "zero_id",
        "unknown_event_type",
        "bad_price",
        "non_finite_price",
        "negative_price",
        "empty_session",
        "session_too_long",
        "text_too_long",
        "bad_timestamp",
        "timestamp_out_of_range",
        "deleted_row",
        "updated_row",
    ];
}
