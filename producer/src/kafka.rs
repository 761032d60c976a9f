//! A producer that counts what the broker acknowledged and refused, and
//! times each acknowledgement from its send call.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use cartscore_bench::load::nanos_histogram;
use hdrhistogram::Histogram;
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

#[derive(Debug)]
pub struct Deliveries {
    pub acked: AtomicU64,
    pub failed: AtomicU64,
    /// Send call → acknowledgement of every acknowledged record, nanoseconds.
    ack_latency: Mutex<Histogram<u64>>,
    epoch: Instant,
}

impl Deliveries {
    /// Send call → acknowledgement so far, nanoseconds.
    pub fn ack_latency(&self) -> Histogram<u64> {
        // A panic in the delivery callback leaves a histogram still worth reading.
        self.ack_latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    /// When the record was handed to librdkafka, in nanoseconds after `epoch`.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, sent_nanos: usize) {
        match result {
            Ok(_) => {
                self.acked.fetch_add(1, Ordering::Relaxed);
                let waited =
                    (self.epoch.elapsed().as_nanos() as u64).saturating_sub(sent_nanos as u64);
                if let Ok(mut histogram) = self.ack_latency.lock() {
                    histogram.saturating_record(waited.max(1));
                }
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The header that marks a freshness probe; its value is the probe's session id.
pub const PROBE_HEADER: &str = "cartscore-probe";

pub struct EventProducer {
    inner: ThreadedProducer<Deliveries>,
    topic: String,
}

impl EventProducer {
    /// `properties` are librdkafka settings applied last (`-X key=value`).
    pub fn connect(
        brokers: &str,
        topic: &str,
        linger_ms: u32,
        properties: &[(String, String)],
    ) -> Result<Self> {
        let deliveries = Deliveries {
            acked: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            ack_latency: Mutex::new(nanos_histogram()),
            epoch: Instant::now(),
        };
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("client.id", "cartscore-producer")
            .set("linger.ms", linger_ms.to_string())
            .set("acks", "all")
            // librdkafka's default (a million) sends each linger's few records
            // as a request of its own without waiting. A broker that serves a
            // connection's requests in turn, each a storage transaction
            // (nisshi on PostgreSQL), then queues them: at 2,000 events/s
            // and linger.ms=1 acknowledgements fell 7 s behind. Five, the
            // Java client's default, lets the records that arrive while five
            // are out share the next request.
            .set("max.in.flight.requests.per.connection", "5")
            // The Java client's partitioner: the appliance and the scoring
            // client find a user's partition with the same murmur2
            // (cartscore_core::shard), whatever language produced the record.
            .set("partitioner", "murmur2_random")
            .set("queue.buffering.max.messages", "1000000");
        for (key, value) in properties {
            config.set(key, value);
        }
        let inner = config
            .create_with_context(deliveries)
            .with_context(|| format!("failed to create a Kafka producer for {brokers}"))?;
        Ok(Self {
            inner,
            topic: topic.to_owned(),
        })
    }

    /// Queues one record keyed by `key`, waiting while the local queue is
    /// full. A `probe` id goes in the `cartscore-probe` header.
    pub fn send(&self, key: &[u8], payload: &[u8], probe: Option<&str>) -> Result<()> {
        let sent = self.inner.context().epoch.elapsed().as_nanos() as usize;
        let mut record = BaseRecord::with_opaque_to(&self.topic, sent)
            .key(key)
            .payload(payload);
        if let Some(probe) = probe {
            record = record.headers(OwnedHeaders::new().insert(Header {
                key: PROBE_HEADER,
                value: Some(probe),
            }));
        }
        loop {
            match self.inner.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    std::thread::sleep(Duration::from_millis(1));
                    record = back;
                }
                Err((error, _)) => {
                    return Err(error)
                        .with_context(|| format!("failed to produce to {}", self.topic));
                }
            }
        }
    }

    /// Waits until every queued record is acknowledged or failed.
    pub fn flush(&self) -> Result<&Deliveries> {
        self.inner
            .flush(Duration::from_secs(120))
            .context("records were still unacknowledged after 120 s")?;
        Ok(self.inner.context())
    }
}

/// A `key=value` librdkafka setting from the command line.
pub fn property(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected key=value, got {text:?}")),
    }
}

/// A consumer outside any group (it is assigned partitions, never commits)
/// with `fetch.wait.max.ms` of `fetch_wait_ms` and then `properties`.
pub fn plain_consumer(
    brokers: &str,
    group: &str,
    fetch_wait_ms: u32,
    properties: &[(String, String)],
) -> Result<BaseConsumer> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", fetch_wait_ms.to_string());
    for (key, value) in properties {
        config.set(key, value);
    }
    config
        .create()
        .with_context(|| format!("failed to create a Kafka consumer for {brokers}"))
}

/// Every partition of `topic` with its first and next offsets as they are now.
pub fn partition_ends(consumer: &BaseConsumer, topic: &str) -> Result<Vec<(i32, i64, i64)>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("failed to read the metadata of {topic}"))?;
    let mut ends = Vec::new();
    for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition.id(), Duration::from_secs(10))
            .with_context(|| format!("failed to read the ends of {topic}/{}", partition.id()))?;
        ends.push((partition.id(), low, high));
    }
    ensure!(!ends.is_empty(), "topic {topic} has no partitions");
    Ok(ends)
}
