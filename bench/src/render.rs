//! Events as the wire carries them: read from the data set's CSV, rendered
//! as a flat JSON object, a JsonConverter envelope or a Debezium row, and
//! broken on purpose the way an upstream bug would break them. Request
//! bodies (the latency modes) and Kafka messages (the producer) both come
//! from here.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use cartscore_core::Event;
use clap::ValueEnum;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A flat JSON object per event.
    Flat,
    /// The Kafka Connect JsonConverter `{"schema", "payload"}` envelope.
    Envelope,
    /// A Debezium ExtractNewRecordState row in the envelope (event_time as
    /// an ISO-8601 ZonedTimestamp, plus `__op`, `__table`, `__deleted`, `id`).
    Debezium,
}

/// How an event is broken, as an upstream bug would break it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corruption {
    NegativePrice,
    TextPrice,
    MissingSession,
    UnknownEventType,
    ZeroUserId,
    TruncatedJson,
}

impl Corruption {
    pub const ALL: [Corruption; 6] = [
        Self::NegativePrice,
        Self::TextPrice,
        Self::MissingSession,
        Self::UnknownEventType,
        Self::ZeroUserId,
        Self::TruncatedJson,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::NegativePrice => "negative_price",
            Self::TextPrice => "text_price",
            Self::MissingSession => "missing_session",
            Self::UnknownEventType => "unknown_event_type",
            Self::ZeroUserId => "zero_user_id",
            Self::TruncatedJson => "truncated_json",
        }
    }
}

/// The valid events of a CSV file of the data set (the real slice or
/// `cartscore-trainer synth` output), in file order.
pub fn load_events(path: &Path) -> Result<Vec<Event>> {
    let (events, invalid) = cartscore_core::dataset::read_all(path)?;
    // Corruption is chosen, not inherited: a bad input row (the slice's last
    // line is cut mid-row) is reported and left out.
    for (line, error) in invalid {
        eprintln!("{}: line {line} left out: {error}", path.display());
    }
    ensure!(!events.is_empty(), "{} holds no events", path.display());
    Ok(events)
}

/// Renders events in one wire form.
#[derive(Debug)]
pub struct Renderer {
    format: Format,
    schema: Value,
    next_id: u64,
}

impl Renderer {
    pub fn new(format: Format) -> Self {
        let field = |name: &str, kind: &str, optional: bool| json!({"field": name, "type": kind, "optional": optional});
        let time = if format == Format::Debezium {
            json!({"field": "event_time", "type": "string", "optional": false,
                   "name": "io.debezium.time.ZonedTimestamp", "version": 1})
        } else {
            field("event_time", "string", false)
        };
        let mut fields = vec![
            time,
            field("event_type", "string", false),
            field("product_id", "int64", false),
            field("category_id", "int64", false),
            field("category_code", "string", true),
            field("brand", "string", true),
            field("price", "double", false),
            field("user_id", "int64", false),
            field("user_session", "string", false),
        ];
        if format == Format::Debezium {
            fields.insert(0, field("id", "int64", false));
            fields.push(field("__op", "string", true));
            fields.push(field("__table", "string", true));
            fields.push(field("__deleted", "string", true));
        }
        Self {
            format,
            schema: json!({"type": "struct", "optional": false, "name": "events.Value", "fields": fields}),
            next_id: 1,
        }
    }

    /// The message for `event`, broken as `corruption` says when given.
    pub fn render(
        &mut self,
        event: &Event,
        session: &str,
        corruption: Option<Corruption>,
    ) -> Vec<u8> {
        let mut row = event.to_json();
        row["user_session"] = json!(session);
        if self.format == Format::Debezium {
            row["event_time"] = json!(event.event_time.to_rfc3339());
            row["id"] = json!(self.next_id);
            row["__op"] = json!("c");
            row["__table"] = json!("events");
            row["__deleted"] = json!("false");
            self.next_id += 1;
        }
        match corruption {
            Some(Corruption::NegativePrice) => row["price"] = json!(-event.price - 1.0),
            Some(Corruption::TextPrice) => row["price"] = json!("n/a"),
            Some(Corruption::MissingSession) => {
                if let Some(map) = row.as_object_mut() {
                    map.remove("user_session");
                }
            }
            Some(Corruption::UnknownEventType) => row["event_type"] = json!("click"),
            Some(Corruption::ZeroUserId) => row["user_id"] = json!(0),
            Some(Corruption::TruncatedJson) | None => {}
        }
        let message = match self.format {
            Format::Flat => row,
            Format::Envelope | Format::Debezium => {
                json!({"schema": self.schema, "payload": row})
            }
        };
        let mut bytes = message.to_string().into_bytes();
        if corruption == Some(Corruption::TruncatedJson) {
            bytes.truncate(bytes.len() / 2);
        }
        bytes
    }
}

/// Waits until `sent` events are due at `rate` per second since `start`.
pub fn pace(start: Instant, sent: u64, rate: u64) {
    if rate == 0 {
        return;
    }
    let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
    }
}
