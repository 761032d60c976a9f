//! What every part of the consumer shares: the two clients' settings,
//! librdkafka's log as tracing, and how partitions and failures are named.

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use thiserror::Error;

use crate::config::{KafkaConfig, KafkaMode};
use crate::ops::metrics::ReasonLabels;

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

/// A topic and a partition of it.
pub(super) type PartitionKey = (String, i32);

pub(super) fn consumer_config(config: &KafkaConfig) -> ClientConfig {
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
        // arrives, whatever the bound; nisshi (the test broker) re-reads its
        // storage after sleeping half the remaining wait, and gives the
        // storage read only about half the wait as its budget: at 10 ms a
        // consumer behind by many small batches got one batch per partition
        // per round trip (54 events/s, so it never caught up; README, Kafka
        // stream), while at 50 ms it drains over 100k events/s and a
        // stream at production rates still has data in every round.
        // Overridable in properties.
        .set("fetch.wait.max.ms", "50")
        .set("statistics.interval.ms", "1000");
    if config.mode == KafkaMode::Shard {
        // Eager and positional: a member gets the same partition numbers of
        // every co-partitioned topic (config validation keeps it so).
        client.set("partition.assignment.strategy", "range");
    }
    for (key, value) in &config.properties {
        client.set(key, value);
    }
    client
}

pub(super) fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("client.id", "cartscore-router")
        .set("acks", "all")
        .set("linger.ms", "1")
        // As the Java client: a million requests in flight (librdkafka's
        // default) queue behind each other on a broker that serves a
        // connection's requests in turn; five let later records batch.
        .set("max.in.flight.requests.per.connection", "5")
        // Records are keyed by user; the Java client's partitioner puts
        // them where every other client and the shards expect them.
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "30000");
    for (key, value) in &config.properties {
        // Consumer-only settings would make the producer refuse to start.
        if !key.starts_with("group.") && !key.starts_with("auto.") && !key.starts_with("fetch.") {
            client.set(key, value);
        }
    }
    client
}

pub(super) fn kind(kind: &'static str) -> ReasonLabels {
    ReasonLabels { reason: kind }
}

pub(super) fn forward_log(level: RDKafkaLogLevel, fac: &str, message: &str) {
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
