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
//! The output topics are at-least-once and never hold up the state: a
//! batch's state commits at once, its output records are sent alongside, and
//! a second stored position per partition ("delivered") advances once the
//! broker acknowledged them. A restart resumes from the lower of the two and
//! re-sends the outputs of messages between them without applying them
//! again. Each record carries its source topic, partition and offset to
//! de-duplicate on.

use std::collections::{HashMap, VecDeque};
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
use crate::store::{OffsetKind, Store, StreamOffset};

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
/// How soon delivered positions are stored when no batch carries them.
const DELIVERED_WRITE_INTERVAL: Duration = Duration::from_millis(200);
/// How often applied positions are committed to the consumer group. Only lag
/// tools read them, and each commit is a write on the broker.
const GROUP_COMMIT_INTERVAL: Duration = Duration::from_secs(1);
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

    /// Sets each assigned partition's start to the lower of the store's
    /// applied and delivered positions (the beginning when this store never
    /// applied from it), and remembers the applied one: messages below it
    /// only have their outputs re-sent.
    fn seek_to_store(&self, tpl: &mut TopicPartitionList) {
        let mut applied: HashMap<PartitionKey, i64> = HashMap::new();
        let mut delivered: HashMap<PartitionKey, i64> = HashMap::new();
        match self.store.offsets() {
            Ok(offsets) => {
                for o in offsets {
                    let map = match o.kind {
                        OffsetKind::Applied => &mut applied,
                        OffsetKind::Delivered => &mut delivered,
                    };
                    map.insert((o.topic, o.partition), o.next_offset);
                }
            }
            Err(error) => {
                // Without the stored offsets nothing can be applied safely;
                // the batch path re-reads them and skips what is applied.
                tracing::error!(%error, "failed to read stored stream offsets at assignment");
            }
        }
        let mut positions = self.positions();
        for mut elem in tpl.elements() {
            let key = (elem.topic().to_owned(), elem.partition());
            let (start, next) = match applied.get(&key) {
                Some(&next) => {
                    let from = delivered.get(&key).map_or(next, |&d| d.min(next));
                    (Offset::Offset(from), next)
                }
                None => (Offset::Beginning, 0),
            };
            if let Err(error) = elem.set_offset(start) {
                tracing::error!(topic = key.0, partition = key.1, %error, "failed to set the start offset");
            }
            tracing::info!(topic = key.0, partition = key.1, next_offset = next, start = ?start, "partition assigned");
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

/// Collects delivery reports (the record's tag and whether it arrived) for
/// the consumer thread to settle.
#[derive(Default)]
struct DeliveryTracker {
    reports: Mutex<Vec<(usize, bool)>>,
}

impl ClientContext for DeliveryTracker {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        forward_log(level, fac, message);
    }
}

impl ProducerContext for DeliveryTracker {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, tag: usize) {
        if let Err((error, _)) = result {
            tracing::warn!(%error, "delivery to an output topic failed; sending it again");
        }
        self.reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((tag, result.is_ok()));
    }
}

/// A record's tag: its batch's sequence number and its index in the batch.
const TAG_INDEX_BITS: u32 = 20;
/// Most records a batch may route (the tag's index bits).
pub const MAX_BATCH_EVENTS: usize = 1 << TAG_INDEX_BITS;
/// Batches whose outputs may await acknowledgement at once; beyond it the
/// consumer waits, so a broker that stops acknowledging stops consumption.
const MAX_IN_FLIGHT_BATCHES: usize = 256;

/// The output records of one batch, kept until all are acknowledged.
#[derive(Debug)]
struct InFlight {
    records: Vec<OutputRecord>,
    unacknowledged: usize,
    /// Next offset per partition of the batch: delivered once it completes.
    ends: HashMap<PartitionKey, i64>,
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
    /// Next offset per partition over the messages applied to state.
    applied_ends: HashMap<PartitionKey, i64>,
    /// Next offset per partition over every message of the batch.
    ends: HashMap<PartitionKey, i64>,
    messages: usize,
    /// Messages per topic, added to the metric once per batch rather than
    /// with a labelled lookup per message.
    messages_by_topic: HashMap<String, u64>,
    started: Option<Instant>,
    /// Broker timestamps (ms) of the batch's messages, for the apply delay.
    oldest_timestamp_ms: Option<i64>,
}

const VALIDATED: usize = 0;
const INVALID: usize = 1;

/// The topic of an output record's slot (`VALIDATED` or `INVALID`).
fn output_topic(config: &KafkaConfig, slot: usize) -> &str {
    if slot == VALIDATED {
        &config.validated_topic
    } else {
        &config.invalid_topic
    }
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Routes one message. `replay` marks a message whose state is already
    /// stored: only its outputs are sent again.
    fn route(
        &mut self,
        message: &BorrowedMessage<'_>,
        replay: bool,
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
                if !replay {
                    self.events.push(event);
                }
            }
            Err(error) => {
                if !replay {
                    metrics
                        .events_invalid
                        .get_or_create(&SourceReasonLabels {
                            source: "kafka",
                            reason: error.code(),
                        })
                        .inc();
                }
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
            in_flight: VecDeque::new(),
            first_in_flight: 0,
            delivered: HashMap::new(),
            last_delivered_write: Instant::now(),
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
    /// Batches whose output records await acknowledgement, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Sequence number of `in_flight[0]`.
    first_in_flight: u64,
    /// Delivered positions not yet written to the store.
    delivered: HashMap<PartitionKey, i64>,
    last_delivered_write: Instant,
}

impl Worker {
    fn run(mut self) {
        let max_wait = Duration::from_millis(self.config.batch_max_ms);
        let mut batch = Batch::default();
        let mut next_metadata_check = Instant::now();
        let mut last_group_commit = Instant::now();
        let mut group_behind = false;
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
                    let replay = self.already_applied(&message);
                    if replay {
                        self.metrics.stream.skipped.inc();
                    }
                    batch.route(
                        &message,
                        replay,
                        self.config.forward_validated,
                        &self.metrics,
                    );
                }
                Some(Err(error)) => self.poll_error(&error),
                None => {}
            }
            self.settle_deliveries();
            let full = batch.messages >= self.config.batch_max_events;
            let due = batch.started.is_some_and(|s| s.elapsed() >= max_wait);
            if !batch.is_empty() && (full || due) {
                self.commit(std::mem::take(&mut batch));
                group_behind = true;
            }
            if batch.is_empty()
                && !self.delivered.is_empty()
                && self.last_delivered_write.elapsed() >= DELIVERED_WRITE_INTERVAL
            {
                // Nothing to ride along with: record delivery on its own.
                self.commit(Batch::default());
            }
            if group_behind && last_group_commit.elapsed() >= GROUP_COMMIT_INTERVAL {
                self.commit_to_group();
                last_group_commit = Instant::now();
                group_behind = false;
            }
        }
        if !batch.is_empty() {
            self.commit(batch);
        }
        // Give the outputs in flight a last chance, then store how far they got.
        if let Err(error) = self.producer.flush(Duration::from_secs(10)) {
            tracing::warn!(%error, "output records still unacknowledged at stop; they are sent again on restart");
        }
        self.settle_deliveries();
        if !self.delivered.is_empty() {
            self.commit(Batch::default());
        }
        self.commit_to_group();
        self.consumer.unsubscribe();
        tracing::info!("Kafka consumer stopped");
        // The writer exits once every Ingestor handle is gone; ours must go
        // before librdkafka's close, which blocks for as long as it cannot
        // reach the broker.
        let Self {
            consumer,
            producer,
            ingestor,
            ..
        } = self;
        drop(ingestor);
        drop(producer);
        drop(consumer);
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

    /// Sends the batch's output records, then applies its events with its
    /// applied positions, and the delivered positions acknowledged so far,
    /// in one transaction. A batch the store refuses (a full map) is consumed
    /// again from the stored offsets; a batch not applied when the appliance
    /// stops is consumed again on restart.
    fn commit(&mut self, batch: Batch) {
        for (topic, count) in batch.messages_by_topic {
            self.metrics
                .stream
                .messages
                .get_or_create(&TopicLabels { topic })
                .inc_by(count);
        }
        self.send_outputs(batch.outputs, batch.ends);
        let mut offsets: Vec<StreamOffset> = batch
            .applied_ends
            .iter()
            .map(|((topic, partition), &next_offset)| StreamOffset {
                topic: topic.clone(),
                partition: *partition,
                next_offset,
                kind: OffsetKind::Applied,
            })
            .collect();
        let delivered = std::mem::take(&mut self.delivered);
        offsets.extend(
            delivered
                .iter()
                .map(|((topic, partition), &next_offset)| StreamOffset {
                    topic: topic.clone(),
                    partition: *partition,
                    next_offset,
                    kind: OffsetKind::Delivered,
                }),
        );
        if batch.events.is_empty() && offsets.is_empty() {
            return;
        }
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
            for (key, next) in delivered {
                let slot = self.delivered.entry(key).or_insert(next);
                *slot = (*slot).max(next);
            }
            if !self.stop.load(Ordering::Relaxed) {
                std::thread::sleep(RETRY_PAUSE);
                self.rewind(batch.applied_ends.keys());
            }
            return;
        }
        self.last_delivered_write = Instant::now();
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
        let mut positions = self.consumer.context().positions();
        for offset in offsets {
            if offset.kind == OffsetKind::Applied {
                positions.insert((offset.topic, offset.partition), offset.next_offset);
            }
        }
    }

    /// Commits the applied positions to the consumer group, for lag tools
    /// only (the store holds the truth). Async: it never holds up a batch.
    fn commit_to_group(&self) {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in self.consumer.context().positions().iter() {
            if let Err(error) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
                tracing::debug!(%error, "failed to list an offset to commit");
            }
        }
        if tpl.count() == 0 {
            return;
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

    /// Queues a batch's output records (waiting while too many batches are
    /// unacknowledged). A batch without records completes in its turn.
    fn send_outputs(&mut self, records: Vec<OutputRecord>, ends: HashMap<PartitionKey, i64>) {
        if records.is_empty() && ends.is_empty() {
            return;
        }
        while self.in_flight.len() >= MAX_IN_FLIGHT_BATCHES && !self.stop.load(Ordering::Relaxed) {
            self.producer.poll(Duration::from_millis(10));
            self.settle_deliveries();
        }
        let seq = self.first_in_flight + self.in_flight.len() as u64;
        self.in_flight.push_back(InFlight {
            unacknowledged: records.len(),
            records,
            ends,
        });
        let last = self.in_flight.len() - 1;
        for index in 0..self.in_flight[last].records.len() {
            self.send_record(seq, index);
        }
        self.settle_deliveries();
    }

    fn send_record(&self, seq: u64, index: usize) {
        let Some(batch) = seq
            .checked_sub(self.first_in_flight)
            .and_then(|slot| self.in_flight.get(slot as usize))
        else {
            return;
        };
        let record = &batch.records[index];
        let topic = output_topic(&self.config, record.topic);
        let tag = ((seq as usize) << TAG_INDEX_BITS) | index;
        let mut base = BaseRecord::with_opaque_to(topic, tag)
            .payload(&record.payload)
            .headers(record.source.headers());
        if let Some(key) = &record.key {
            base = base.key(key);
        }
        loop {
            match self.producer.send(base) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    self.producer.poll(Duration::from_millis(10));
                    base = back;
                }
                Err((error, _)) => {
                    // Not queued (e.g. an unknown topic): reported like a
                    // failed delivery, so it is sent again.
                    tracing::error!(%error, topic, "failed to queue an output record");
                    self.producer
                        .context()
                        .reports
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((tag, false));
                    return;
                }
            }
        }
    }

    /// Serves delivery reports: counts them, re-sends failed records, and
    /// turns completed batches (oldest first) into delivered positions.
    fn settle_deliveries(&mut self) {
        self.producer.poll(Duration::ZERO);
        let reports = std::mem::take(
            &mut *self
                .producer
                .context()
                .reports
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let mut retry = Vec::new();
        for (tag, delivered) in reports {
            let seq = (tag >> TAG_INDEX_BITS) as u64;
            let index = tag & (MAX_BATCH_EVENTS - 1);
            let Some(batch) = seq
                .checked_sub(self.first_in_flight)
                .and_then(|slot| self.in_flight.get_mut(slot as usize))
            else {
                continue;
            };
            if delivered {
                batch.unacknowledged -= 1;
                let topic = output_topic(&self.config, batch.records[index].topic);
                self.metrics
                    .stream
                    .produced
                    .get_or_create(&TopicLabels {
                        topic: topic.to_owned(),
                    })
                    .inc();
            } else {
                self.metrics.stream.produce_errors.inc();
                retry.push((seq, index));
            }
        }
        for (seq, index) in retry {
            self.send_record(seq, index);
        }
        while self
            .in_flight
            .front()
            .is_some_and(|b| b.unacknowledged == 0)
        {
            if let Some(done) = self.in_flight.pop_front() {
                self.first_in_flight += 1;
                for (key, next) in done.ends {
                    let slot = self.delivered.entry(key).or_insert(next);
                    *slot = (*slot).max(next);
                }
            }
        }
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
