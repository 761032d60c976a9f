//! The output topics: validated events and invalid messages, produced
//! at-least-once beside the state. A batch's records stay in flight until the
//! broker acknowledged every one of them (a failed one is sent again); then
//! its partitions' next offsets become "delivered" positions, which the
//! consumer stores with its next transaction. A restart resumes from the
//! lower of the applied and delivered positions, so no output is lost.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};

use super::client::{PartitionKey, StreamError, forward_log, producer_config};
use super::route::{OutputRecord, OutputTopic};
use crate::config::{KafkaConfig, MAX_BATCH_EVENTS};
use crate::ops::metrics::{Metrics, TopicLabels};

/// A record's tag: its batch's sequence number above its index in the batch.
const TAG_INDEX_BITS: u32 = MAX_BATCH_EVENTS.trailing_zeros();
/// Batches whose outputs may await acknowledgement at once; beyond it the
/// consumer waits, so a broker that stops acknowledging stops consumption.
const MAX_IN_FLIGHT_BATCHES: usize = 256;

/// Collects delivery reports (the record's tag and whether it arrived) for
/// the producing thread to settle.
#[derive(Default)]
pub(super) struct DeliveryTracker {
    reports: Mutex<Vec<(usize, bool)>>,
}

impl DeliveryTracker {
    pub(super) fn report(&self, tag: usize, delivered: bool) {
        self.reports
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((tag, delivered));
    }

    pub(super) fn take(&self) -> Vec<(usize, bool)> {
        std::mem::take(&mut *self.reports.lock().unwrap_or_else(PoisonError::into_inner))
    }
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
        self.report(tag, result.is_ok());
    }
}

/// Queues `record` (tagged `tag`), waiting while librdkafka's queue is full;
/// a record it refuses (e.g. an unknown topic) is reported like a failed
/// delivery, so its producer sends it again.
pub(super) fn queue(
    producer: &BaseProducer<DeliveryTracker>,
    mut record: BaseRecord<'_, [u8], [u8], usize>,
    tag: usize,
    topic: &str,
) {
    loop {
        match producer.send(record) {
            Ok(()) => return,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                producer.poll(Duration::from_millis(10));
                record = back;
            }
            Err((error, _)) => {
                tracing::error!(%error, topic, "failed to queue an output record");
                producer.context().report(tag, false);
                return;
            }
        }
    }
}

/// The output records of one batch, kept until all are acknowledged.
#[derive(Debug)]
struct InFlight {
    records: Vec<OutputRecord>,
    unacknowledged: usize,
    /// Next offset per partition of the batch: delivered once it completes.
    ends: HashMap<PartitionKey, i64>,
}

pub(super) struct Outputs {
    producer: BaseProducer<DeliveryTracker>,
    validated_topic: String,
    invalid_topic: String,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    /// Batches whose output records await acknowledgement, oldest first.
    in_flight: VecDeque<InFlight>,
    /// Sequence number of `in_flight[0]`.
    first_in_flight: u64,
    /// Delivered positions not yet written to the store.
    delivered: HashMap<PartitionKey, i64>,
}

impl Outputs {
    pub(super) fn new(
        config: &KafkaConfig,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, StreamError> {
        let producer = producer_config(config)
            .create_with_context(DeliveryTracker::default())
            .map_err(|source| StreamError::Client {
                client: "producer",
                brokers: config.brokers.clone(),
                source,
            })?;
        Ok(Self {
            producer,
            validated_topic: config.validated_topic.clone(),
            invalid_topic: config.invalid_topic.clone(),
            metrics,
            stop,
            in_flight: VecDeque::new(),
            first_in_flight: 0,
            delivered: HashMap::new(),
        })
    }

    fn topic(&self, topic: OutputTopic) -> &str {
        match topic {
            OutputTopic::Validated => &self.validated_topic,
            OutputTopic::Invalid => &self.invalid_topic,
        }
    }

    /// Queues a batch's output records (waiting while too many batches are
    /// unacknowledged). A batch without records completes in its turn.
    pub(super) fn send(&mut self, records: Vec<OutputRecord>, ends: HashMap<PartitionKey, i64>) {
        if records.is_empty() && ends.is_empty() {
            return;
        }
        while self.in_flight.len() >= MAX_IN_FLIGHT_BATCHES && !self.stop.load(Ordering::Relaxed) {
            self.producer.poll(Duration::from_millis(10));
            self.settle();
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
        self.settle();
    }

    fn send_record(&self, seq: u64, index: usize) {
        let Some(batch) = seq
            .checked_sub(self.first_in_flight)
            .and_then(|slot| self.in_flight.get(slot as usize))
        else {
            return;
        };
        let record = &batch.records[index];
        let topic = self.topic(record.topic);
        let tag = ((seq as usize) << TAG_INDEX_BITS) | index;
        let mut base = BaseRecord::with_opaque_to(topic, tag)
            .payload(record.payload.as_slice())
            .headers(record.source.headers());
        if let Some(key) = &record.key {
            base = base.key(key.as_slice());
        }
        queue(&self.producer, base, tag, topic);
    }

    /// Serves delivery reports: counts them, re-sends failed records, and
    /// turns completed batches (oldest first) into delivered positions.
    pub(super) fn settle(&mut self) {
        self.producer.poll(Duration::ZERO);
        let mut retry = Vec::new();
        for (tag, delivered) in self.producer.context().take() {
            let seq = (tag >> TAG_INDEX_BITS) as u64;
            let index = tag & (MAX_BATCH_EVENTS - 1);
            let Some(slot) = seq.checked_sub(self.first_in_flight) else {
                continue;
            };
            let Some(topic) = self
                .in_flight
                .get(slot as usize)
                .map(|batch| batch.records[index].topic)
            else {
                continue;
            };
            if delivered {
                self.in_flight[slot as usize].unacknowledged -= 1;
                let topic = self.topic(topic).to_owned();
                self.metrics
                    .stream
                    .produced
                    .get_or_create(&TopicLabels { topic })
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
                self.restore(done.ends);
            }
        }
    }

    pub(super) fn has_delivered(&self) -> bool {
        !self.delivered.is_empty()
    }

    /// The delivered positions to store with the next transaction.
    pub(super) fn take_delivered(&mut self) -> HashMap<PartitionKey, i64> {
        std::mem::take(&mut self.delivered)
    }

    /// Puts back delivered positions a transaction failed to store.
    pub(super) fn restore(&mut self, delivered: HashMap<PartitionKey, i64>) {
        for (key, next) in delivered {
            let slot = self.delivered.entry(key).or_insert(next);
            *slot = (*slot).max(next);
        }
    }

    /// Gives the records in flight a last chance at stop.
    pub(super) fn flush(&mut self, timeout: Duration) {
        if let Err(error) = self.producer.flush(timeout) {
            tracing::warn!(%error, "output records still unacknowledged at stop; they are sent again on restart");
        }
        self.settle();
    }
}
