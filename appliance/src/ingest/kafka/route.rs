//! Routing a consumed message by `core`'s validation: a valid event goes to
//! the batch's state changes (and, when asked, to the validated topic,
//! normalised); an invalid one to the invalid topic with its reason, where it
//! came from and its original bytes. A message whose state is already stored
//! (a replay after a restart) only has its outputs sent again.

use std::collections::HashMap;
use std::time::Instant;

use base64::Engine;
use cartscore_core::shard::{KeyMismatch, check_key, stream_key};
use cartscore_core::{Event, EventError, SourcePosition};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use serde::Serialize;

use super::client::PartitionKey;
use crate::error::ErrorCode;
use crate::ingest::writer::EventSource;
use crate::ops::metrics::Metrics;

/// An invalid-topic record above this carries a truncated original: brokers
/// refuse records over 1 MB by default, and a refused record would stall
/// the partition.
const MAX_INVALID_RECORD_BYTES: usize = 900 * 1024;
/// What an over-large original is cut to.
const TRUNCATED_ORIGINAL_BYTES: usize = 64 * 1024;

/// Which output topic a record goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OutputTopic {
    /// `kafka.validated_topic`: valid events, normalised.
    Validated,
    /// `kafka.invalid_topic`: invalid messages with the reason.
    Invalid,
}

/// A record for an output topic.
#[derive(Debug)]
pub(super) struct OutputRecord {
    pub(super) topic: OutputTopic,
    pub(super) key: Option<Vec<u8>>,
    pub(super) payload: Vec<u8>,
    pub(super) source: Source,
}

/// Where a consumed message came from; every output record carries it as
/// headers, to de-duplicate on.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Source {
    topic: String,
    partition: i32,
    offset: i64,
}

impl Source {
    pub(super) fn headers(&self) -> OwnedHeaders {
        OwnedHeaders::new_with_capacity(3)
            .insert(Header {
                key: "cartscore-source-topic",
                value: Some(self.topic.as_str()),
            })
            .insert(Header {
                key: "cartscore-source-partition",
                value: Some(&self.partition.to_string()),
            })
            .insert(Header {
                key: "cartscore-source-offset",
                value: Some(&self.offset.to_string()),
            })
    }
}

/// The messages polled since the last commit, already routed.
#[derive(Debug, Default)]
pub(super) struct Batch {
    pub(super) events: Vec<Event>,
    pub(super) outputs: Vec<OutputRecord>,
    /// Next offset per partition over the messages applied to state.
    pub(super) applied_ends: HashMap<PartitionKey, i64>,
    /// Next offset per partition over every message of the batch.
    pub(super) ends: HashMap<PartitionKey, i64>,
    pub(super) messages: usize,
    /// Messages per topic, added to the metric once per batch rather than
    /// with a labelled lookup per message.
    pub(super) messages_by_topic: HashMap<String, u64>,
    /// Valid events whose key breaks the key policy, by topic and reason.
    pub(super) key_mismatches: HashMap<(String, KeyMismatch), u64>,
    /// The last change-data-capture row applied per partition in this batch.
    pub(super) sources: HashMap<PartitionKey, SourcePosition>,
    /// Change-data-capture rows at or below their partition's last applied
    /// position (re-sent by a restarted Debezium), by topic: not applied.
    pub(super) duplicates: HashMap<String, u64>,
    pub(super) started: Option<Instant>,
    /// Broker timestamps (ms) of the batch's messages, for the apply delay.
    pub(super) oldest_timestamp_ms: Option<i64>,
}

impl Batch {
    pub(super) fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Routes one message. `replay` marks a message whose state is already
    /// stored: only its outputs are sent again. `applied_source` is the last
    /// change-data-capture row the store applied from its partition.
    pub(super) fn route(
        &mut self,
        message: &BorrowedMessage<'_>,
        replay: bool,
        applied_source: impl FnOnce() -> Option<SourcePosition>,
        forward_validated: bool,
        metrics: &Metrics,
    ) {
        let source = Source {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        };
        self.started.get_or_insert_with(Instant::now);
        self.messages += 1;
        if let Some(ts) = message.timestamp().to_millis() {
            self.oldest_timestamp_ms = Some(self.oldest_timestamp_ms.map_or(ts, |t| t.min(ts)));
        }
        match self.messages_by_topic.get_mut(&source.topic) {
            Some(count) => *count += 1,
            None => {
                self.messages_by_topic.insert(source.topic.clone(), 1);
            }
        }
        let key = (source.topic.clone(), source.partition);
        if !replay {
            self.applied_ends.insert(key.clone(), source.offset + 1);
        }
        self.ends.insert(key, source.offset + 1);
        let parsed = match message.payload() {
            None => Err(EventError::Malformed {
                reason: "empty message (a tombstone or a null value)".into(),
            }),
            Some(bytes) => Event::from_json_with_source(bytes),
        };
        match parsed {
            Ok((_, Some(position)))
                if !replay
                    && self
                        .sources
                        .get(&(source.topic.clone(), source.partition))
                        .copied()
                        .or_else(applied_source)
                        .is_some_and(|last| position <= last) =>
            {
                // The same change again: its state is already applied.
                *self.duplicates.entry(source.topic).or_default() += 1;
            }
            Ok((event, position)) => {
                if !replay && let Some(position) = position {
                    self.sources
                        .insert((source.topic.clone(), source.partition), position);
                }
                if !replay && let Err(mismatch) = check_key(message.key(), event.user_id) {
                    *self
                        .key_mismatches
                        .entry((source.topic.clone(), mismatch))
                        .or_default() += 1;
                }
                if forward_validated {
                    self.outputs.push(OutputRecord {
                        topic: OutputTopic::Validated,
                        key: Some(stream_key(event.user_id).as_bytes().to_vec()),
                        payload: event.to_json().to_string().into_bytes(),
                        source,
                    });
                }
                if !replay {
                    self.events.push(event);
                }
            }
            Err(error) => {
                if !replay {
                    metrics.event_invalid(EventSource::Kafka.label(), error.error_code());
                }
                self.outputs.push(OutputRecord {
                    topic: OutputTopic::Invalid,
                    key: message.key().map(<[u8]>::to_vec),
                    payload: invalid_record(&error, &source, message.key(), message.payload()),
                    source,
                });
            }
        }
    }
}

/// The invalid-topic record: reason, where the message came from, and its
/// bytes unchanged (UTF-8 text as a string, anything else as base64).
#[derive(Debug, Serialize)]
struct InvalidRecord<'a> {
    error: Reason<'a>,
    source: &'a Source,
    key: Option<String>,
    original: String,
    original_encoding: &'static str,
    original_bytes: usize,
    original_truncated: bool,
}

#[derive(Debug, Serialize)]
struct Reason<'a> {
    code: &'a str,
    message: String,
}

/// Text as it is, anything else as base64, and which of the two.
fn encode(bytes: &[u8]) -> (String, &'static str) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (text.to_owned(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(bytes),
            "base64",
        ),
    }
}

fn invalid_record(
    error: &EventError,
    source: &Source,
    key: Option<&[u8]>,
    original: Option<&[u8]>,
) -> Vec<u8> {
    let original = original.unwrap_or_default();
    let record = |kept: &[u8], truncated: bool| {
        let (value, encoding) = encode(kept);
        let record = InvalidRecord {
            error: Reason {
                code: error.error_code().name(),
                message: error.to_string(),
            },
            source,
            key: key.map(|k| encode(k).0),
            original: value,
            original_encoding: encoding,
            original_bytes: original.len(),
            original_truncated: truncated,
        };
        // A struct of strings and numbers always serialises.
        serde_json::to_vec(&record).unwrap_or_default()
    };
    let full = record(original, false);
    if full.len() <= MAX_INVALID_RECORD_BYTES {
        return full;
    }
    // Cut on a character boundary when the original is text.
    let mut cut = TRUNCATED_ORIGINAL_BYTES.min(original.len());
    if let Ok(text) = std::str::from_utf8(original) {
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
    }
    record(&original[..cut], true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> Source {
        Source {
            topic: "tracking.raw_user_behavior".into(),
            partition: 2,
            offset: 41,
        }
    }

    fn parse(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn invalid_record_keeps_text_and_base64s_binary() {
        let error = Event::from_json(b"{\"price\": 1").unwrap_err();
        let text = parse(&invalid_record(
            &error,
            &source(),
            Some(b"s1"),
            Some(b"{\"price\": 1"),
        ));
        assert_eq!(text["error"]["code"], "malformed");
        assert_eq!(text["source"]["offset"], 41);
        assert_eq!(text["source"]["partition"], 2);
        assert_eq!(text["original"], "{\"price\": 1");
        assert_eq!(text["original_encoding"], "utf8");
        assert_eq!(text["key"], "s1");

        let binary = [0xff_u8, 0x00, 0xfe, b'{'];
        let error = Event::from_json(&binary).unwrap_err();
        let record = parse(&invalid_record(&error, &source(), None, Some(&binary)));
        assert_eq!(record["original_encoding"], "base64");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(record["original"].as_str().unwrap())
            .unwrap();
        assert_eq!(decoded, binary);
        assert_eq!(record["original_truncated"], false);
    }

    #[test]
    fn huge_originals_are_truncated_on_a_character_boundary() {
        let huge = "é".repeat(600 * 1024);
        let error = Event::from_json(huge.as_bytes()).unwrap_err();
        assert_eq!(error.code(), "oversize");
        let bytes = invalid_record(&error, &source(), None, Some(huge.as_bytes()));
        assert!(bytes.len() <= MAX_INVALID_RECORD_BYTES);
        let record = parse(&bytes);
        assert_eq!(record["original_truncated"], true);
        assert_eq!(record["original_bytes"], huge.len());
        assert!(huge.starts_with(record["original"].as_str().unwrap()));
    }
}
