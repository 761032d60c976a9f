//! Shard membership over Kafka: a shard publishes its [`MemberRecord`] to
//! `kafka.members_topic` (keyed by its member id) on every assignment, and a
//! follower thread reads every record of the topic from its start into the
//! shared [`Ownership`]. The topic is meant to be compacted: only the latest
//! record per member matters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::client::{StreamError, consumer_config, kind, producer_config};
use crate::config::KafkaConfig;
use crate::ops::metrics::Metrics;
use crate::shard::{MemberRecord, Ownership};

/// How often the follower looks for the topic (or new partitions of it).
const METADATA_RETRY: Duration = Duration::from_secs(1);

/// Publishes this shard's records.
pub(super) struct Publisher {
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
    metrics: Arc<Metrics>,
}

impl Publisher {
    pub(super) fn new(config: &KafkaConfig, metrics: Arc<Metrics>) -> Result<Self, StreamError> {
        let producer = producer_config(config)
            .set("client.id", "cartscore-members")
            .create()
            .map_err(|source| StreamError::Client {
                client: "membership producer",
                brokers: config.brokers.clone(),
                source,
            })?;
        Ok(Self {
            producer,
            topic: config.members_topic.clone(),
            metrics,
        })
    }

    /// Queues the record; delivery is librdkafka's (retried until its
    /// message timeout). Never blocks the rebalance that calls it.
    pub(super) fn publish(&self, record: &MemberRecord) {
        let payload = match serde_json::to_vec(record) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::error!(%error, "failed to encode the membership record");
                return;
            }
        };
        let sent = self.producer.send(
            BaseRecord::to(&self.topic)
                .key(record.member.member.as_bytes())
                .payload(&payload),
        );
        match sent {
            Ok(()) => tracing::info!(
                member = record.member.member,
                owned = ?record.owned,
                partitions = record.partitions,
                "published this shard's partitions"
            ),
            Err((error, _)) => {
                self.metrics
                    .shard
                    .membership_errors
                    .get_or_create(&kind("publish"))
                    .inc();
                tracing::error!(%error, topic = self.topic, "failed to publish this shard's partitions");
            }
        }
    }
}

/// The follower: reads every membership record into `ownership`.
#[derive(Debug)]
pub(super) struct Follower {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Follower {
    pub(super) fn start(
        config: &KafkaConfig,
        ownership: Arc<Ownership>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StreamError> {
        let mut client = consumer_config(config);
        // Outside the group: it is assigned the topic's partitions and never
        // commits, so it neither joins the shards' rebalances nor needs an
        // instance id of its own.
        client
            .set("group.id", format!("{}.members", config.group_id))
            .set("client.id", "cartscore-members")
            .remove("group.instance.id")
            .remove("partition.assignment.strategy")
            .set("statistics.interval.ms", "0");
        let consumer: BaseConsumer = client.create().map_err(|source| StreamError::Client {
            client: "membership consumer",
            brokers: config.brokers.clone(),
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let topic = config.members_topic.clone();
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("kafka-members".into())
                .spawn(move || follow(&consumer, &topic, &ownership, &metrics, &stop))?
        };
        Ok(Self { stop, thread })
    }

    pub(super) fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.thread.join().is_err() {
            tracing::error!("the membership thread panicked");
        }
    }
}

fn follow(
    consumer: &BaseConsumer,
    topic: &str,
    ownership: &Ownership,
    metrics: &Metrics,
    stop: &AtomicBool,
) {
    let mut assigned = 0usize;
    let mut next_check = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if std::time::Instant::now() >= next_check {
            next_check = std::time::Instant::now() + METADATA_RETRY * 10;
            match partitions_of(consumer, topic) {
                Some(count) if count > assigned => {
                    let mut tpl = TopicPartitionList::new();
                    for partition in assigned..count {
                        let _ =
                            tpl.add_partition_offset(topic, partition as i32, Offset::Beginning);
                    }
                    if let Err(error) = consumer.incremental_assign(&tpl) {
                        tracing::warn!(%error, topic, "failed to read the membership topic");
                        next_check = std::time::Instant::now() + METADATA_RETRY;
                    } else {
                        assigned = count;
                    }
                }
                Some(_) => {}
                None => next_check = std::time::Instant::now() + METADATA_RETRY,
            }
        }
        let Some(polled) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = match polled {
            Ok(message) => message,
            Err(error) => {
                tracing::debug!(%error, topic, "membership poll failed");
                continue;
            }
        };
        match message.payload() {
            // A tombstone: the member left.
            None => {
                if let Some(member) = message.key().and_then(|k| std::str::from_utf8(k).ok()) {
                    ownership.forget(member, metrics);
                }
            }
            Some(bytes) => match serde_json::from_slice::<MemberRecord>(bytes) {
                Ok(record) => ownership.observe(record, metrics),
                Err(error) => {
                    metrics
                        .shard
                        .membership_errors
                        .get_or_create(&kind("malformed"))
                        .inc();
                    tracing::warn!(%error, topic, offset = message.offset(), "skipping a malformed membership record");
                }
            },
        }
    }
}

/// Partitions of `topic`, when its metadata can be read.
pub(super) fn partitions_of<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> Option<usize> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(2))
        .ok()?;
    let topic = metadata.topics().first()?;
    if topic.error().is_some() || topic.partitions().is_empty() {
        return None;
    }
    Some(topic.partitions().len())
}
