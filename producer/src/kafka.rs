//! A producer that counts what the broker acknowledged and refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

#[derive(Debug, Default)]
pub struct Deliveries {
    pub acked: AtomicU64,
    pub failed: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.acked.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

pub struct EventProducer {
    inner: ThreadedProducer<Deliveries>,
    topic: String,
}

impl EventProducer {
    pub fn connect(brokers: &str, topic: &str, linger_ms: u32) -> Result<Self> {
        let inner = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("client.id", "cartscore-producer")
            .set("linger.ms", linger_ms.to_string())
            .set("acks", "all")
            .set("queue.buffering.max.messages", "1000000")
            .create_with_context(Deliveries::default())
            .with_context(|| format!("failed to create a Kafka producer for {brokers}"))?;
        Ok(Self {
            inner,
            topic: topic.to_owned(),
        })
    }

    /// Queues one record keyed by `key`, waiting while the local queue is full.
    pub fn send(&self, key: &[u8], payload: &[u8]) -> Result<()> {
        let mut record = BaseRecord::to(&self.topic).key(key).payload(payload);
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
