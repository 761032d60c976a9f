//! The binary scoring protocol, version 1 (docs/protocol.md). Every frame is
//! a little-endian u32 length followed by that many bytes; requests and
//! responses carry a request id so a client can pipeline.
//!
//! The wire types live in their own crate so that clients (the bench, the
//! end-to-end tests, a caller's service) build without the daemon: this
//! crate needs only `cartscore-core`, for the event a request carries and its
//! validation. [`client`] is a blocking client. [`records`] are the
//! closed loop's outcome records, as `GET /v1/outcomes` and the outcomes
//! log carry them.

pub mod client;
pub mod records;

use std::borrow::Cow;

use cartscore_core::event::{RawEvent, RawValue};
use cartscore_core::{Event, EventError};
use thiserror::Error;

pub const VERSION: u8 = 1;
pub const KIND_SCORE: u8 = 1;
/// Score and explain: the response carries each feature's TreeSHAP
/// contribution after its strings.
pub const KIND_EXPLAIN: u8 = 2;
/// Response flag: the cart's session was known.
pub const FLAG_SESSION_KNOWN: u8 = 1;
/// Response flag: an explanation follows the strings.
pub const FLAG_EXPLANATION: u8 = 2;
/// Request bytes after the length prefix, before the strings.
pub const REQUEST_HEADER: usize = 58;
/// Response bytes after the length prefix, before the strings.
pub const RESPONSE_HEADER: usize = 20;
/// Largest frame a client accepts; responses are small.
pub const MAX_RESPONSE_FRAME: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    /// The event failed validation (or is not a cart); the connection stays open.
    InvalidEvent = 1,
    /// No model is loaded; the connection stays open.
    ModelUnavailable = 2,
    /// The frame could not be parsed; the server closes the connection after it.
    MalformedFrame = 3,
    /// The frame's version is not 1; the server closes the connection after it.
    UnsupportedVersion = 4,
    /// The store or the model failed; the connection stays open.
    InternalError = 5,
    /// Another shard owns the cart's user; the message is a [`Redirect`]
    /// naming it. The connection stays open.
    NotOwner = 6,
    /// No shard has claimed the user's partition yet (the group is
    /// rebalancing); retry shortly. The connection stays open.
    OwnerUnknown = 7,
    /// The serving model cannot do what was asked (explain a score without
    /// node covers in its bundle); the message says why. The connection
    /// stays open.
    Unsupported = 8,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Self::Ok,
        Self::InvalidEvent,
        Self::ModelUnavailable,
        Self::MalformedFrame,
        Self::UnsupportedVersion,
        Self::InternalError,
        Self::NotOwner,
        Self::OwnerUnknown,
        Self::Unsupported,
    ];

    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            0 => Self::Ok,
            1 => Self::InvalidEvent,
            2 => Self::ModelUnavailable,
            3 => Self::MalformedFrame,
            4 => Self::UnsupportedVersion,
            5 => Self::InternalError,
            6 => Self::NotOwner,
            7 => Self::OwnerUnknown,
            8 => Self::Unsupported,
            _ => return None,
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::InvalidEvent => "invalid_event",
            Self::ModelUnavailable => "model_unavailable",
            Self::MalformedFrame => "malformed_frame",
            Self::UnsupportedVersion => "unsupported_version",
            Self::InternalError => "internal_error",
            Self::NotOwner => "not_owner",
            Self::OwnerUnknown => "owner_unknown",
            Self::Unsupported => "unsupported",
        }
    }
}

/// Where a `NotOwner` answer sends the caller: the owning shard, and the
/// partition the user is on among how many, so a client can place other
/// users itself (`cartscore_core::shard::partition_of_user`). On the wire,
/// the answer's message: `member=… http=… tcp=… partition=… partitions=…`
/// (`tcp=-` when the owner serves no binary protocol).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub member: String,
    pub http: String,
    pub tcp: Option<String>,
    pub partition: u32,
    pub partitions: u32,
}

impl Redirect {
    pub fn to_message(&self) -> String {
        format!(
            "member={} http={} tcp={} partition={} partitions={}",
            self.member,
            self.http,
            self.tcp.as_deref().unwrap_or("-"),
            self.partition,
            self.partitions
        )
    }

    pub fn parse(message: &str) -> Option<Self> {
        let mut fields = std::collections::HashMap::new();
        for part in message.split_ascii_whitespace() {
            let (key, value) = part.split_once('=')?;
            fields.insert(key, value);
        }
        let partitions: u32 = fields.get("partitions")?.parse().ok()?;
        let partition: u32 = fields.get("partition")?.parse().ok()?;
        if partition >= partitions {
            return None;
        }
        Some(Self {
            member: (*fields.get("member")?).to_owned(),
            http: (*fields.get("http")?).to_owned(),
            tcp: fields
                .get("tcp")
                .filter(|t| **t != "-")
                .map(|t| (*t).to_owned()),
            partition,
            partitions,
        })
    }
}

/// Why a request frame could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame of {len} bytes is shorter than the {REQUEST_HEADER}-byte request header")]
    TooShort { len: usize },
    #[error("protocol version {0} is not supported (this server speaks 1)")]
    UnsupportedVersion(u8),
    #[error("unknown request kind {0}")]
    UnknownKind(u8),
    #[error("string lengths ({strings} bytes) do not match the frame length {len}")]
    LengthMismatch { strings: usize, len: usize },
}

impl FrameError {
    pub fn status(&self) -> Status {
        match self {
            Self::UnsupportedVersion(_) => Status::UnsupportedVersion,
            _ => Status::MalformedFrame,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::TooShort { .. } => "too_short",
            Self::UnsupportedVersion(_) => "unsupported_version",
            Self::UnknownKind(_) => "unknown_kind",
            Self::LengthMismatch { .. } => "length_mismatch",
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(bytes)
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Score,
    /// Score, and explain the score feature by feature.
    Explain,
}

impl Kind {
    pub fn byte(self) -> u8 {
        match self {
            Self::Score => KIND_SCORE,
            Self::Explain => KIND_EXPLAIN,
        }
    }
}

/// A request frame split into its fields, borrowing the input.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreFrame<'a> {
    pub kind: Kind,
    pub request_id: u64,
    pub event_time_micros: i64,
    pub product_id: u64,
    pub category_id: u64,
    pub user_id: u64,
    pub price: f64,
    pub user_session: &'a [u8],
    pub category_code: &'a [u8],
    pub brand: &'a [u8],
}

fn text(bytes: &[u8]) -> RawValue<'_> {
    match std::str::from_utf8(bytes) {
        Ok(s) => RawValue::Str(Cow::Borrowed(s)),
        // Not UTF-8: let validation name the field as having the wrong type.
        Err(_) => RawValue::Composite,
    }
}

fn optional_text(bytes: &[u8]) -> RawValue<'_> {
    if bytes.is_empty() {
        RawValue::Null
    } else {
        text(bytes)
    }
}

impl ScoreFrame<'_> {
    /// The cart event, validated by the same routine as every other input.
    pub fn to_event(&self) -> Result<Event, EventError> {
        RawEvent {
            event_time: RawValue::Signed(self.event_time_micros),
            event_type: RawValue::Str(Cow::Borrowed("cart")),
            product_id: RawValue::Unsigned(self.product_id),
            category_id: RawValue::Unsigned(self.category_id),
            category_code: optional_text(self.category_code),
            brand: optional_text(self.brand),
            price: RawValue::Float(self.price),
            user_id: RawValue::Unsigned(self.user_id),
            user_session: text(self.user_session),
            deleted: false,
            updated: false,
        }
        .validate()
    }
}

/// Parses the frame at the start of `buf`: `Ok(None)` when more bytes are
/// needed, otherwise the frame and its total size (prefix included).
pub fn parse_request(
    buf: &[u8],
    max_frame: usize,
) -> Result<Option<(ScoreFrame<'_>, usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max_frame {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame,
        });
    }
    if buf.len() >= 5 && buf[4] != VERSION {
        return Err(FrameError::UnsupportedVersion(buf[4]));
    }
    if len < REQUEST_HEADER {
        return Err(FrameError::TooShort { len });
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let b = &buf[4..4 + len];
    let kind = match b[1] {
        KIND_SCORE => Kind::Score,
        KIND_EXPLAIN => Kind::Explain,
        other => return Err(FrameError::UnknownKind(other)),
    };
    let (session_len, code_len, brand_len) = (u16_at(b, 52), u16_at(b, 54), u16_at(b, 56));
    let strings = session_len + code_len + brand_len;
    if REQUEST_HEADER + strings != len {
        return Err(FrameError::LengthMismatch { strings, len });
    }
    let s0 = REQUEST_HEADER;
    let (s1, s2) = (s0 + session_len, s0 + session_len + code_len);
    let frame = ScoreFrame {
        kind,
        request_id: u64_at(b, 4),
        event_time_micros: u64_at(b, 12) as i64,
        product_id: u64_at(b, 20),
        category_id: u64_at(b, 28),
        user_id: u64_at(b, 36),
        price: f64::from_bits(u64_at(b, 44)),
        user_session: &b[s0..s1],
        category_code: &b[s1..s2],
        brand: &b[s2..len],
    };
    Ok(Some((frame, 4 + len)))
}

fn clamp_u16(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.len().min(usize::from(u16::MAX))]
}

/// Appends a score request frame for `cart` (its event type is implied: cart).
pub fn encode_request(out: &mut Vec<u8>, request_id: u64, cart: &Event) {
    encode_request_of(out, Kind::Score, request_id, cart);
}

/// Appends a request frame of `kind` for `cart`.
pub fn encode_request_of(out: &mut Vec<u8>, kind: Kind, request_id: u64, cart: &Event) {
    let session = clamp_u16(cart.user_session.as_bytes());
    let code = clamp_u16(cart.category_code.as_deref().unwrap_or("").as_bytes());
    let brand = clamp_u16(cart.brand.as_deref().unwrap_or("").as_bytes());
    let len = REQUEST_HEADER + session.len() + code.len() + brand.len();
    out.reserve(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[VERSION, kind.byte(), 0, 0]);
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&cart.event_time.micros().to_le_bytes());
    out.extend_from_slice(&cart.product_id.to_le_bytes());
    out.extend_from_slice(&cart.category_id.to_le_bytes());
    out.extend_from_slice(&cart.user_id.to_le_bytes());
    out.extend_from_slice(&cart.price.to_bits().to_le_bytes());
    for s in [session, code, brand] {
        out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    }
    for s in [session, code, brand] {
        out.extend_from_slice(s);
    }
}

/// A score's attribution: TreeSHAP contributions in log-odds, one per
/// feature in the contract's order, and the base value they start from
/// (base + sum = the model's raw score, the logit of the probability).
#[derive(Debug, Clone, PartialEq)]
pub struct Attribution {
    pub base_value: f64,
    pub contributions: Vec<f64>,
}

/// One response, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreResponse {
    pub request_id: u64,
    pub status: Status,
    pub session_known: bool,
    pub probability: f32,
    pub model_version: String,
    pub message: String,
    /// Present when an explain request was answered with status ok.
    pub explanation: Option<Attribution>,
}

/// A response to encode, borrowing its strings.
#[derive(Debug, Clone, Copy)]
pub struct Answer<'a> {
    pub request_id: u64,
    pub status: Status,
    pub session_known: bool,
    pub probability: f32,
    pub model_version: &'a str,
    pub message: &'a str,
    /// The base value and the contributions, for an explain request.
    pub explanation: Option<(f64, &'a [f64])>,
}

/// Appends a response frame.
pub fn encode_response(out: &mut Vec<u8>, answer: &Answer<'_>) {
    let version = clamp_u16(answer.model_version.as_bytes());
    let message = clamp_u16(answer.message.as_bytes());
    // At most u16::MAX contributions: the count is a u16.
    let explanation = answer
        .explanation
        .map(|(base, c)| (base, &c[..c.len().min(usize::from(u16::MAX))]));
    let explained = explanation.map_or(0, |(_, c)| 2 + 8 + 8 * c.len());
    let len = RESPONSE_HEADER + version.len() + message.len() + explained;
    let mut flags = 0;
    if answer.session_known {
        flags |= FLAG_SESSION_KNOWN;
    }
    if explanation.is_some() {
        flags |= FLAG_EXPLANATION;
    }
    out.reserve(4 + len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[VERSION, answer.status as u8, flags, 0]);
    out.extend_from_slice(&answer.request_id.to_le_bytes());
    out.extend_from_slice(&answer.probability.to_le_bytes());
    out.extend_from_slice(&(version.len() as u16).to_le_bytes());
    out.extend_from_slice(&(message.len() as u16).to_le_bytes());
    out.extend_from_slice(version);
    out.extend_from_slice(message);
    if let Some((base, contributions)) = explanation {
        out.extend_from_slice(&(contributions.len() as u16).to_le_bytes());
        out.extend_from_slice(&base.to_le_bytes());
        for c in contributions {
            out.extend_from_slice(&c.to_le_bytes());
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ResponseError {
    #[error("response frame of {0} bytes is malformed")]
    Malformed(usize),
    #[error("response has unknown status {0}")]
    UnknownStatus(u8),
}

/// Parses the response at the start of `buf`, like [`parse_request`].
pub fn parse_response(buf: &[u8]) -> Result<Option<(ScoreResponse, usize)>, ResponseError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(RESPONSE_HEADER..=MAX_RESPONSE_FRAME).contains(&len) {
        return Err(ResponseError::Malformed(len));
    }
    if buf.len() < 4 + len {
        return Ok(None);
    }
    let b = &buf[4..4 + len];
    let status = Status::from_byte(b[1]).ok_or(ResponseError::UnknownStatus(b[1]))?;
    let (version_len, message_len) = (u16_at(b, 16), u16_at(b, 18));
    let version_end = RESPONSE_HEADER + version_len;
    let strings_end = version_end + message_len;
    let explanation = if b[2] & FLAG_EXPLANATION != 0 {
        if strings_end + 10 > len {
            return Err(ResponseError::Malformed(len));
        }
        let count = u16_at(b, strings_end);
        if strings_end + 10 + 8 * count != len {
            return Err(ResponseError::Malformed(len));
        }
        let f64_at = |at: usize| f64::from_bits(u64_at(b, at));
        Some(Attribution {
            base_value: f64_at(strings_end + 2),
            contributions: (0..count)
                .map(|i| f64_at(strings_end + 10 + 8 * i))
                .collect(),
        })
    } else {
        if strings_end != len {
            return Err(ResponseError::Malformed(len));
        }
        None
    };
    let response = ScoreResponse {
        request_id: u64_at(b, 4),
        status,
        session_known: b[2] & FLAG_SESSION_KNOWN != 0,
        probability: f32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        model_version: String::from_utf8_lossy(&b[RESPONSE_HEADER..version_end]).into_owned(),
        message: String::from_utf8_lossy(&b[version_end..strings_end]).into_owned(),
        explanation,
    };
    Ok(Some((response, 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cartscore_core::{EventType, Timestamp};

    fn cart() -> Event {
        Event {
            event_time: Timestamp::from_secs(1_569_888_000),
            event_type: EventType::Cart,
            product_id: 1_004_856,
            category_id: 2_053_013_555_631_882_655,
            category_code: Some("electronics.smartphone".into()),
            brand: Some("samsung".into()),
            price: 130.76,
            user_id: 543_272_936,
            user_session: "8187d148-3c41-46d4-b0c0-9c08cd9dc564".into(),
        }
    }

    #[test]
    fn a_redirect_survives_its_message() {
        let redirect = Redirect {
            member: "b".into(),
            http: "10.0.0.2:8080".into(),
            tcp: Some("10.0.0.2:7070".into()),
            partition: 3,
            partitions: 6,
        };
        assert_eq!(
            Redirect::parse(&redirect.to_message()),
            Some(redirect.clone())
        );
        let http_only = Redirect {
            tcp: None,
            ..redirect
        };
        assert_eq!(Redirect::parse(&http_only.to_message()), Some(http_only));
        assert_eq!(
            Redirect::parse("member=b http=x tcp=- partition=6 partitions=6"),
            None
        );
        assert_eq!(Redirect::parse("no model"), None);
        assert_eq!(Status::from_byte(6), Some(Status::NotOwner));
    }

    #[test]
    fn request_round_trips_through_validation() {
        let mut buf = Vec::new();
        encode_request(&mut buf, 77, &cart());
        let (frame, used) = parse_request(&buf, 4096).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(frame.request_id, 77);
        assert_eq!(frame.to_event().unwrap(), cart());
        // Every prefix is "need more", never an error.
        for cut in 0..buf.len() {
            assert_eq!(parse_request(&buf[..cut], 4096), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn absent_strings_are_absent_and_bad_values_are_invalid_events() {
        let mut event = cart();
        event.brand = None;
        event.category_code = None;
        let mut buf = Vec::new();
        encode_request(&mut buf, 1, &event);
        let (frame, _) = parse_request(&buf, 4096).unwrap().unwrap();
        assert_eq!(frame.to_event().unwrap(), event);
        event.price = -3.0;
        buf.clear();
        encode_request(&mut buf, 1, &event);
        let (frame, _) = parse_request(&buf, 4096).unwrap().unwrap();
        assert_eq!(frame.to_event().unwrap_err().code(), "negative_price");
    }

    #[test]
    fn malformed_frames_are_named() {
        let mut buf = Vec::new();
        encode_request(&mut buf, 1, &cart());
        assert!(matches!(
            parse_request(&buf, 64),
            Err(FrameError::TooLarge { .. })
        ));
        let mut bad = buf.clone();
        bad[4] = 9;
        assert_eq!(
            parse_request(&bad, 4096),
            Err(FrameError::UnsupportedVersion(9))
        );
        let mut bad = buf.clone();
        bad[5] = 7;
        assert_eq!(parse_request(&bad, 4096), Err(FrameError::UnknownKind(7)));
        let mut explain = Vec::new();
        encode_request_of(&mut explain, Kind::Explain, 1, &cart());
        let (frame, _) = parse_request(&explain, 4096).unwrap().unwrap();
        assert_eq!(frame.kind, Kind::Explain);
        let mut bad = buf.clone();
        bad[56] = bad[56].wrapping_add(1);
        assert!(matches!(
            parse_request(&bad, 4096),
            Err(FrameError::LengthMismatch { .. })
        ));
        let short = [10u8, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_request(&short, 4096),
            Err(FrameError::TooShort { len: 10 })
        );
    }

    #[test]
    fn response_round_trips() {
        let mut buf = Vec::new();
        let ok = Answer {
            request_id: 9,
            status: Status::Ok,
            session_known: true,
            probability: 0.25,
            model_version: "demo-1",
            message: "",
            explanation: None,
        };
        encode_response(&mut buf, &ok);
        encode_response(
            &mut buf,
            &Answer {
                request_id: 10,
                status: Status::InvalidEvent,
                session_known: false,
                probability: f32::NAN,
                message: "bad price",
                ..ok
            },
        );
        let contributions = [0.5, -0.25, 0.0];
        encode_response(
            &mut buf,
            &Answer {
                request_id: 11,
                explanation: Some((-3.5, &contributions)),
                ..ok
            },
        );
        let (first, used) = parse_response(&buf).unwrap().unwrap();
        assert_eq!(
            (first.request_id, first.status, first.session_known),
            (9, Status::Ok, true)
        );
        assert_eq!(
            (first.probability, first.model_version.as_str()),
            (0.25, "demo-1")
        );
        assert_eq!(first.explanation, None);
        let (second, more) = parse_response(&buf[used..]).unwrap().unwrap();
        assert_eq!(
            (second.status, second.message.as_str()),
            (Status::InvalidEvent, "bad price")
        );
        let rest = &buf[used + more..];
        let (third, last) = parse_response(rest).unwrap().unwrap();
        assert_eq!(last, rest.len());
        assert!(third.session_known);
        assert_eq!(
            third.explanation,
            Some(Attribution {
                base_value: -3.5,
                contributions: contributions.to_vec()
            })
        );
        // An explanation whose count disagrees with the length is refused.
        let mut bad = rest.to_vec();
        let count_at = bad.len() - 8 * 3 - 10;
        bad[count_at] = 4;
        assert!(matches!(
            parse_response(&bad),
            Err(ResponseError::Malformed(_))
        ));
    }
}
