//! The Kafka event source: consume raw events, route each message by
//! `core`'s validation (valid ones to the store and, optionally, to the
//! validated topic; invalid ones to the invalid topic with the reason and the
//! original bytes), and apply them exactly once.
//!
//! Exactly once: the store, not the broker, owns the consumed positions. A
//! batch's state changes and its next offsets are one LMDB transaction; on
//! assignment the consumer seeks to the stored offsets (the beginning of a
//! partition it has never applied), and messages below the stored position are
//! skipped, so no rebalance, retry or crash can apply a message twice or skip
//! one. Offsets are also committed to the group, for lag tools only.
//!
//! The output topics are at-least-once: a batch's records are delivered
//! before its state commits, so a crash in between re-sends them; each record
//! carries its source topic, partition and offset to de-duplicate on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine;
use cartscore_core::Event;
use cartscore_core::EventError;
use rdkafka::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use serde::Serialize;
use serde_json::json;
use thiserror::Error;

use crate::config::{KafkaConfig, KafkaMode};
use crate::ingest::Ingestor;
use crate::metrics::{
    Metrics, PartitionLabels, ReasonLabels, SourceReasonLabels, StreamMetrics, TopicLabels,
};
use crate::store::{Store, StreamOffset};

/// Settings the consumer manages itself; `kafka.properties` may not set them.
pub const MANAGED_PROPERTIES: [&str; 6] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "enable.partition.eof",
    "statistics.interval.ms",
];

/// How often a replica looks for partitions added to its topics.
const METADATA_REFRESH: Duration = Duration::from_secs(30);
/// How soon a replica asks again when a topic's metadata was unavailable.
const METADATA_RETRY: Duration = Duration::from_secs(1);
/// How long an idle poll waits; bounds how quickly a stop is noticed.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// Pause before retrying a batch the store or the broker refused.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// An invalid-topic record above this carries a truncated original: brokers
/// refuse records over 1 MB by default, and a refused record would stall
/// the partition.
const MAX_INVALID_RECORD_BYTES: usize = 900 * 1024;
/// What an over-large original is cut to.
const TRUNCATED_ORIGINAL_BYTES: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum StreamError {
    #[error("failed to create the Kafka {client} for {brokers}: {source}")]
    Client {
        client: &'static str,
        brokers: String,
        #[source]
        source: KafkaError,
    },
    #[error("failed to subscribe to {topics:?}: {source}")]
    Subscribe {
        topics: Vec<String>,
        #[source]
        source: KafkaError,
    },
    #[error("failed to start the consumer thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// What /readyz and /metrics say about the stream. Shared with the HTTP side.
#[derive(Debug)]
pub struct StreamHealth {
    started: Instant,
    stale_after: Duration,
    connected: AtomicBool,
    /// Milliseconds after `started` when the consumer last had applied
    /// everything the broker held; `u64::MAX` before that ever happened.
    current_at_ms: AtomicU64,
    lag: AtomicI64,
    partitions: AtomicI64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    pub connected: bool,
    /// Messages on the broker not yet applied, over the assigned partitions,
    /// as of the last statistics (every second).
    pub lag: i64,
    pub assigned_partitions: i64,
    /// Time since the store last held everything the broker had.
    pub staleness_seconds: f64,
    /// `staleness_seconds` is over `kafka.stale_after_ms`.
    pub stale: bool,
}

impl StreamHealth {
    pub fn new(stale_after: Duration) -> Self {
        Self {
            started: Instant::now(),
            stale_after,
            connected: AtomicBool::new(false),
            current_at_ms: AtomicU64::new(u64::MAX),
            lag: AtomicI64::new(0),
            partitions: AtomicI64::new(0),
        }
    }

    fn mark_current(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.current_at_ms.store(now, Ordering::Relaxed);
    }

    pub fn status(&self) -> StreamStatus {
        let since = match self.current_at_ms.load(Ordering::Relaxed) {
            u64::MAX => Duration::ZERO,
            ms => Duration::from_millis(ms),
        };
        let staleness = self.started.elapsed().saturating_sub(since);
        StreamStatus {
            connected: self.connected.load(Ordering::Relaxed),
            lag: self.lag.load(Ordering::Relaxed),
            assigned_partitions: self.partitions.load(Ordering::Relaxed),
            staleness_seconds: staleness.as_secs_f64(),
            stale: staleness > self.stale_after,
        }
    }
}

type PartitionKey = (String, i32);

/// Callbacks of the consumer: rebalances seek to the store's offsets,
/// statistics feed lag and health, librdkafka's log goes to tracing.
struct ConsumerCallbacks {
    store: Arc<Store>,
    health: Arc<StreamHealth>,
    metrics: Arc<Metrics>,
    /// Next offset to apply per assigned partition: what the store holds.
    positions: Mutex<HashMap<PartitionKey, i64>>,
}

impl ConsumerCallbacks {
    fn positions(&self) -> std::sync::MutexGuard<'_, HashMap<PartitionKey, i64>> {
        self.positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn stream(&self) -> &StreamMetrics {
        &self.metrics.stream
    }

    /// Sets each assigned partition's start to the store's next offset, or
    /// its beginning when this store never applied from it.
    fn seek_to_store(&self, tpl: &mut TopicPartitionList) {
        let stored: HashMap<PartitionKey, i64> = match self.store.offsets() {
            Ok(offsets) => offsets
                .into_iter()
                .map(|o| ((o.topic, o.partition), o.next_offset))
                .collect(),
            Err(error) => {
                // Without the stored offsets nothing can be applied safely;
                // the batch path re-reads them and skips what is applied.
                tracing::error!(%error, "failed to read stored stream offsets at assignment");
                HashMap::new()
            }
        };
        let mut positions = self.positions();
        for mut elem in tpl.elements() {
            let key = (elem.topic().to_owned(), elem.partition());
            let (offset, next) = match stored.get(&key) {
                Some(&next) => (Offset::Offset(next), next),
                None => (Offset::Beginning, 0),
            };
            if let Err(error) = elem.set_offset(offset) {
                tracing::error!(topic = key.0, partition = key.1, %error, "failed to set the start offset");
            }
            tracing::info!(
                topic = key.0,
                partition = key.1,
                next_offset = next,
                "partition assigned"
            );
            positions.insert(key, next);
        }
    }
}

impl ClientContext for ConsumerCallbacks {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log(level, fac, message);
    }

    fn stats(&self, stats: Statistics) {
        let connected = stats.brokers.values().any(|b| b.state == "UP");
        self.health.connected.store(connected, Ordering::Relaxed);
        self.stream().connected.set(i64::from(connected));
        let positions = self.positions();
        let mut total = 0;
        let mut known = true;
        for (key, next) in positions.iter() {
            let hi = stats
                .topics
                .get(&key.0)
                .and_then(|t| t.partitions.get(&key.1))
                .map_or(-1, |p| p.hi_offset);
            // A negative high watermark means no fetch answered yet.
            if hi < 0 {
                known = false;
                continue;
            }
            let lag = (hi - next).max(0);
            total += lag;
            self.stream()
                .consumer_lag
                .get_or_create(&PartitionLabels {
                    topic: key.0.clone(),
                    partition: key.1,
                })
                .set(lag);
        }
        self.health.lag.store(total, Ordering::Relaxed);
        self.health
            .partitions
            .store(positions.len() as i64, Ordering::Relaxed);
        if connected && known && total == 0 {
            self.health.mark_current();
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.health.connected.store(false, Ordering::Relaxed);
            self.stream().connected.set(0);
        }
        tracing::warn!(%error, reason, "Kafka client error");
    }
}

impl ConsumerContext for ConsumerCallbacks {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.stream()
                    .rebalances
                    .get_or_create(&kind("assign"))
                    .inc();
                self.seek_to_store(tpl);
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.stream()
                    .rebalances
                    .get_or_create(&kind("revoke"))
                    .inc();
                let mut positions = self.positions();
                for elem in tpl.elements() {
                    positions.remove(&(elem.topic().to_owned(), elem.partition()));
                    tracing::info!(
                        topic = elem.topic(),
                        partition = elem.partition(),
                        "partition revoked"
                    );
                }
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    positions.clear();
                    consumer.unassign()
                }
            }
            other => {
                self.stream().rebalances.get_or_create(&kind("error")).inc();
                tracing::warn!(error = ?other, "rebalance failed; dropping the assignment");
                self.positions().clear();
                consumer.unassign()
            }
        };
        if let Err(error) = result {
            tracing::error!(%error, "failed to apply a rebalance");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(error) = result {
            // Only lag tools read the group's offsets; the store holds the truth.
            tracing::debug!(%error, "committing offsets to the group failed");
        }
    }
}

fn kind(kind: &'static str) -> ReasonLabels {
    ReasonLabels { reason: kind }
}

fn forward_log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", fac, "{message}");
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

/// Collects the indexes of records whose delivery failed, to send again.
#[derive(Default)]
struct DeliveryTracker {
    failed: Mutex<Vec<usize>>,
}

impl ClientContext for DeliveryTracker {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log(level, fac, message);
    }
}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, index: usize) {
        if let Err((error, _)) = result {
            tracing::warn!(%error, "delivery to an output topic failed; will retry");
            self.failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(index);
        }
    }
}

/// A record for the validated or the invalid topic.
#[derive(Debug)]
struct OutputRecord {
    topic: usize,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    source: Source,
}

#[derive(Debug, Clone)]
struct Source {
    topic: String,
    partition: i32,
    offset: i64,
}

impl Source {
    fn headers(&self) -> OwnedHeaders {
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
struct Batch {
    events: Vec<Event>,
    outputs: Vec<OutputRecord>,
    next_offsets: HashMap<PartitionKey, i64>,
    messages: usize,
    started: Option<Instant>,
    /// Broker timestamps (ms) of the batch's messages, for the apply delay.
    oldest_timestamp_ms: Option<i64>,
}

const VALIDATED: usize = 0;
const INVALID: usize = 1;

impl Batch {
    fn is_empty(&self) -> bool {
        self.messages == 0
    }

    fn route(&mut self, message: &BorrowedMessage<'_>, forward_validated: bool, metrics: &Metrics) {
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
        metrics
            .stream
            .messages
            .get_or_create(&TopicLabels {
                topic: source.topic.clone(),
            })
            .inc();
        self.next_offsets
            .insert((source.topic.clone(), source.partition), source.offset + 1);
        let parsed = match message.payload() {
            None => Err(EventError::Malformed {
                reason: "empty message (a tombstone or a null value)".into(),
            }),
            Some(bytes) => Event::from_json(bytes),
        };
        match parsed {
            Ok(event) => {
                if forward_validated {
                    self.outputs.push(OutputRecord {
                        topic: VALIDATED,
                        key: Some(event.user_session.clone().into_bytes()),
                        payload: event.to_json().to_string().into_bytes(),
                        source,
                    });
                }
                self.events.push(event);
            }
            Err(error) => {
                metrics
                    .events_invalid
                    .get_or_create(&SourceReasonLabels {
                        source: "kafka",
                        reason: error.code(),
                    })
                    .inc();
                self.outputs.push(OutputRecord {
                    topic: INVALID,
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
fn invalid_record(
    error: &EventError,
    source: &Source,
    key: Option<&[u8]>,
    original: Option<&[u8]>,
) -> Vec<u8> {
    let original = original.unwrap_or_default();
    let encode = |bytes: &[u8]| match std::str::from_utf8(bytes) {
        Ok(text) => (json!(text), "utf8"),
        Err(_) => (
            json!(base64::engine::general_purpose::STANDARD.encode(bytes)),
            "base64",
        ),
    };
    let key = key.map(|k| encode(k).0);
    let record = |kept: &[u8], truncated: bool| {
        let (value, encoding) = encode(kept);
        json!({
            "error": {"code": error.code(), "message": error.to_string()},
            "source": {"topic": source.topic, "partition": source.partition, "offset": source.offset},
            "key": key,
            "original": value,
            "original_encoding": encoding,
            "original_bytes": original.len(),
            "original_truncated": truncated,
        })
        .to_string()
        .into_bytes()
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

/// The running consumer; [`StreamConsumer::stop`] applies what it holds and
/// returns.
#[derive(Debug)]
pub struct StreamConsumer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl StreamConsumer {
    pub fn start(
        config: &KafkaConfig,
        store: Arc<Store>,
        ingestor: Ingestor,
        metrics: Arc<Metrics>,
        health: Arc<StreamHealth>,
    ) -> Result<Self, StreamError> {
        let callbacks = ConsumerCallbacks {
            store,
            health,
            metrics: Arc::clone(&metrics),
            positions: Mutex::default(),
        };
        let consumer: BaseConsumer<ConsumerCallbacks> = consumer_config(config)
            .create_with_context(callbacks)
            .map_err(|source| StreamError::Client {
                client: "consumer",
                brokers: config.brokers.clone(),
                source,
            })?;
        let producer: BaseProducer<DeliveryTracker> = producer_config(config)
            .create_with_context(DeliveryTracker::default())
            .map_err(|source| StreamError::Client {
                client: "producer",
                brokers: config.brokers.clone(),
                source,
            })?;
        if config.mode == KafkaMode::Shard {
            let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
            consumer
                .subscribe(&topics)
                .map_err(|source| StreamError::Subscribe {
                    topics: config.topics.clone(),
                    source,
                })?;
        }
        tracing::info!(brokers = config.brokers, mode = ?config.mode, group = config.group_id, topics = ?config.topics, "consuming events from Kafka");
        let stop = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            consumer,
            producer,
            ingestor,
            metrics,
            config: config.clone(),
            stop: Arc::clone(&stop),
            last_error: None,
        };
        let thread = std::thread::Builder::new()
            .name("kafka-consumer".into())
            .spawn(move || worker.run())?;
        Ok(Self { stop, thread })
    }

    /// Stops polling, applies the batch in hand, and leaves the group.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.thread.join().is_err() {
            tracing::error!("the Kafka consumer thread panicked");
        }
    }
}

fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        .set("client.id", "cartscore")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest")
        // The fetch long-poll bound. Kafka answers a fetch as soon as data
        // arrives, but tansu re-reads its storage only after sleeping half
        // the remaining wait, so a long wait there is latency; 10 ms costs
        // ~100 idle fetches a second per broker. Overridable in properties.
        .set("fetch.wait.max.ms", "10")
        .set("statistics.interval.ms", "1000");
    for (key, value) in &config.properties {
        client.set(key, value);
    }
    client
}

fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", "cartscore-router")
        .set("acks", "all")
        .set("linger.ms", "1")
        .set("message.timeout.ms", "30000");
    for (key, value) in &config.properties {
        // Consumer-only settings would make the producer refuse to start.
        if !key.starts_with("group.") && !key.starts_with("auto.") && !key.starts_with("fetch.") {
            client.set(key, value);
        }
    }
    client
}

struct Worker {
    consumer: BaseConsumer<ConsumerCallbacks>,
    producer: BaseProducer<DeliveryTracker>,
    ingestor: Ingestor,
    metrics: Arc<Metrics>,
    config: KafkaConfig,
    stop: Arc<AtomicBool>,
    /// The last poll error and when it was logged, to log repeats once a minute.
    last_error: Option<(String, Instant)>,
}

impl Worker {
    fn run(mut self) {
        let max_wait = Duration::from_millis(self.config.batch_max_ms);
        let mut batch = Batch::default();
        let mut next_metadata_check = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if self.config.mode == KafkaMode::Replica
                && batch.is_empty()
                && Instant::now() >= next_metadata_check
            {
                let complete = self.assign_new_partitions();
                next_metadata_check = Instant::now()
                    + if complete {
                        METADATA_REFRESH
                    } else {
                        METADATA_RETRY
                    };
            }
            let timeout = match batch.started {
                None => IDLE_POLL,
                Some(started) => max_wait.saturating_sub(started.elapsed()),
            };
            match self.consumer.poll(timeout) {
                Some(Ok(message)) => {
                    if self.already_applied(&message) {
                        self.metrics.stream.skipped.inc();
                    } else {
                        batch.route(&message, self.config.forward_validated, &self.metrics);
                    }
                }
                Some(Err(error)) => self.poll_error(&error),
                None => {}
            }
            let full = batch.messages >= self.config.batch_max_events;
            let due = batch.started.is_some_and(|s| s.elapsed() >= max_wait);
            if !batch.is_empty() && (full || due) {
                self.commit(std::mem::take(&mut batch));
            }
        }
        if !batch.is_empty() {
            self.commit(batch);
        }
        self.consumer.unsubscribe();
        tracing::info!("Kafka consumer stopped");
    }

    /// Replica mode: assigns the topics' partitions not yet consumed,
    /// starting at the store's offsets. False when the broker's metadata
    /// could not be read.
    fn assign_new_partitions(&mut self) -> bool {
        let mut fresh = TopicPartitionList::new();
        let mut complete = true;
        for topic in self.config.topics.clone() {
            // A missing topic (the CDC one is often created later) must not
            // hold back the others.
            let partitions = match self
                .consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(2))
            {
                Ok(metadata) => metadata
                    .topics()
                    .iter()
                    .map(|t| match t.error() {
                        Some(error) => Err(KafkaError::MetadataFetch(error.into())),
                        None => Ok(t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>()),
                    })
                    .next()
                    .unwrap_or(Ok(Vec::new())),
                Err(error) => Err(error),
            };
            match partitions {
                Ok(ids) => {
                    let known = self.consumer.context().positions();
                    for id in ids {
                        if !known.contains_key(&(topic.clone(), id)) {
                            fresh.add_partition(&topic, id);
                        }
                    }
                }
                Err(error) => {
                    complete = false;
                    let error = format!("{topic}: {error}");
                    self.note_error("metadata", error);
                }
            }
        }
        if fresh.count() > 0 {
            let callbacks = self.consumer.context();
            callbacks
                .stream()
                .rebalances
                .get_or_create(&kind("assign"))
                .inc();
            callbacks.seek_to_store(&mut fresh);
            if let Err(error) = self.consumer.incremental_assign(&fresh) {
                tracing::error!(%error, "failed to assign partitions");
                let mut positions = callbacks.positions();
                for elem in fresh.elements() {
                    positions.remove(&(elem.topic().to_owned(), elem.partition()));
                }
                return false;
            }
        }
        complete
    }

    /// A message below the store's position was applied before (a rebalance
    /// or retry can deliver it again).
    fn already_applied(&self, message: &BorrowedMessage<'_>) -> bool {
        let positions = self.consumer.context().positions();
        positions
            .get(&(message.topic().to_owned(), message.partition()))
            .is_some_and(|&next| message.offset() < next)
    }

    fn poll_error(&mut self, error: &KafkaError) {
        let kind = match error {
            KafkaError::MessageConsumption(_) => "consumption",
            KafkaError::PartitionEOF(_) => "partition_eof",
            _ => "other",
        };
        self.note_error(kind, error.to_string());
    }

    /// Counts an error by kind and logs it, a repeat at most once a minute.
    fn note_error(&mut self, kind: &'static str, text: String) {
        self.metrics
            .stream
            .poll_errors
            .get_or_create(&ReasonLabels { reason: kind })
            .inc();
        let repeat = self
            .last_error
            .as_ref()
            .is_some_and(|(last, at)| *last == text && at.elapsed() < Duration::from_secs(60));
        if !repeat {
            tracing::warn!(kind, error = text, "Kafka error");
            self.last_error = Some((text, Instant::now()));
        }
    }

    /// Delivers the batch's output records, then applies its events with its
    /// offsets in one transaction. Delivery is retried until it succeeds; a
    /// batch the store refuses (a full map) is consumed again from the stored
    /// offsets; either way a batch not applied when the appliance stops is
    /// consumed again on restart.
    fn commit(&mut self, batch: Batch) {
        if !self.deliver(&batch.outputs) {
            return;
        }
        let offsets: Vec<StreamOffset> = batch
            .next_offsets
            .iter()
            .map(|((topic, partition), &next_offset)| StreamOffset {
                topic: topic.clone(),
                partition: *partition,
                next_offset,
            })
            .collect();
        if let Err(error) = self
            .ingestor
            .apply_blocking(batch.events, offsets.clone(), "kafka")
        {
            self.metrics
                .stream
                .batch_retries
                .get_or_create(&kind(error.code()))
                .inc();
            tracing::error!(%error, "failed to apply a Kafka batch; consuming it again from the stored offsets");
            if !self.stop.load(Ordering::Relaxed) {
                std::thread::sleep(RETRY_PAUSE);
                self.rewind(batch.next_offsets.keys());
            }
            return;
        }
        if let (Some(started), Some(ts)) = (batch.started, batch.oldest_timestamp_ms) {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            self.metrics
                .stream
                .apply_delay
                .observe(((now_ms - ts).max(0)) as f64 / 1e3);
            self.metrics
                .stream
                .batch_duration
                .observe(started.elapsed().as_secs_f64());
        }
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        {
            let mut positions = self.consumer.context().positions();
            for offset in &offsets {
                positions.insert((offset.topic.clone(), offset.partition), offset.next_offset);
                if let Err(error) = tpl.add_partition_offset(
                    &offset.topic,
                    offset.partition,
                    Offset::Offset(offset.next_offset),
                ) {
                    tracing::debug!(%error, "failed to list an offset to commit");
                }
            }
        }
        if let Err(error) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(%error, "committing offsets to the group failed");
        }
    }

    /// Seeks `partitions` back to the store's positions, so that a batch
    /// that could not be applied is consumed again.
    fn rewind<'a>(&self, partitions: impl Iterator<Item = &'a PartitionKey>) {
        let mut tpl = TopicPartitionList::new();
        {
            let positions = self.consumer.context().positions();
            for key in partitions {
                if let Some(&next) = positions.get(key)
                    && let Err(error) =
                        tpl.add_partition_offset(&key.0, key.1, Offset::Offset(next))
                {
                    tracing::error!(%error, topic = key.0, partition = key.1, "failed to list a partition to rewind");
                }
            }
        }
        if let Err(error) = self.consumer.seek_partitions(tpl, Duration::from_secs(10)) {
            tracing::error!(%error, "failed to rewind to the stored offsets");
        }
    }

    /// Sends `records` and waits until each is acknowledged, re-sending the
    /// failed ones. False when the appliance stopped first.
    fn deliver(&self, records: &[OutputRecord]) -> bool {
        let topics = [
            self.config.validated_topic.as_str(),
            self.config.invalid_topic.as_str(),
        ];
        let mut pending: Vec<usize> = (0..records.len()).collect();
        while !pending.is_empty() {
            for &index in &pending {
                let record = &records[index];
                let mut base = BaseRecord::with_opaque_to(topics[record.topic], index)
                    .payload(&record.payload)
                    .headers(record.source.headers());
                if let Some(key) = &record.key {
                    base = base.key(key);
                }
                let mut attempt = base;
                loop {
                    match self.producer.send(attempt) {
                        Ok(()) => break,
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                            self.producer.poll(Duration::from_millis(10));
                            attempt = back;
                        }
                        Err((error, _)) => {
                            tracing::error!(%error, topic = topics[record.topic], "failed to queue an output record");
                            self.producer
                                .context()
                                .failed
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(index);
                            break;
                        }
                    }
                }
            }
            if let Err(error) = self.producer.flush(Duration::from_secs(30)) {
                tracing::warn!(%error, "output topics did not acknowledge in time");
            }
            let mut failed = std::mem::take(
                &mut *self
                    .producer
                    .context()
                    .failed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
            );
            failed.sort_unstable();
            failed.dedup();
            for (slot, topic) in topics.iter().enumerate() {
                let delivered = pending
                    .iter()
                    .filter(|&&i| records[i].topic == slot && failed.binary_search(&i).is_err())
                    .count();
                if delivered > 0 {
                    self.metrics
                        .stream
                        .produced
                        .get_or_create(&TopicLabels {
                            topic: (*topic).to_owned(),
                        })
                        .inc_by(delivered as u64);
                }
            }
            if !failed.is_empty() {
                self.metrics
                    .stream
                    .produce_errors
                    .inc_by(failed.len() as u64);
                if self.stop.load(Ordering::Relaxed) {
                    return false;
                }
                std::thread::sleep(RETRY_PAUSE);
            }
            pending = failed;
        }
        true
    }
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

    #[test]
    fn staleness_grows_until_marked_current() {
        let health = StreamHealth::new(Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(30));
        assert!(health.status().stale);
        health.mark_current();
        let status = health.status();
        assert!(!status.stale, "{status:?}");
    }
}
