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
//! The output topics are at-least-once and never hold up the state (see
//! [`outputs`]); each record carries its source topic, partition and offset
//! to de-duplicate on.
//!
//! By seam: [`consumer`] is the thread's loop and its batches, [`route`]
//! what each message becomes, [`outputs`] the producer of the output topics,
//! [`rebalance`] the consumer's callbacks (assignments, statistics),
//! [`health`] what readiness and the metrics say about the stream, and
//! [`prediction_log`] the closed loop's scored carts and outcomes to Kafka.

mod client;
mod consumer;
pub mod health;
mod members;
mod outputs;
mod prediction_log;
mod rebalance;
mod route;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::config::{KafkaConfig, KafkaMode};
use crate::ingest::writer::Ingestor;
use crate::ops::metrics::{Metrics, TopicLabels, TopicReasonLabels};
use crate::shard::Ownership;
use crate::store::Store;
use cartscore_core::shard::KeyMismatch;
use client::consumer_config;
use consumer::Worker;
use outputs::Outputs;
use rebalance::{ConsumerCallbacks, ShardHooks};

pub use client::StreamError;
pub use health::{StreamHealth, StreamStatus};
pub use prediction_log::PredictionLog;

/// The running consumer; [`StreamConsumer::stop`] applies what it holds and
/// returns.
#[derive(Debug)]
pub struct StreamConsumer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    members: Option<members::Follower>,
}

impl StreamConsumer {
    pub fn start(
        config: &KafkaConfig,
        store: Arc<Store>,
        ingestor: Ingestor,
        metrics: Arc<Metrics>,
        health: Arc<StreamHealth>,
        ownership: Option<Arc<Ownership>>,
    ) -> Result<Self, StreamError> {
        // Known before the first mismatch or copy, so alerts can use `rate()`.
        for topic in &config.topics {
            let _ = metrics.stream.cdc_duplicates.get_or_create(&TopicLabels {
                topic: topic.clone(),
            });
            for mismatch in KeyMismatch::ALL {
                let _ = metrics
                    .stream
                    .key_mismatches
                    .get_or_create(&TopicReasonLabels {
                        topic: topic.clone(),
                        reason: mismatch.label(),
                    });
            }
        }
        let (shard, members) = match ownership {
            Some(ownership) if config.mode == KafkaMode::Shard => {
                let follower =
                    members::Follower::start(config, Arc::clone(&ownership), Arc::clone(&metrics))?;
                let hooks = ShardHooks {
                    ownership,
                    publisher: members::Publisher::new(config, Arc::clone(&metrics))?,
                    topics: config.topics.clone(),
                    purge: Mutex::default(),
                };
                (Some(hooks), Some(follower))
            }
            _ => (None, None),
        };
        let callbacks = ConsumerCallbacks {
            store,
            health,
            metrics: Arc::clone(&metrics),
            positions: Mutex::default(),
            sources: Mutex::default(),
            shard,
        };
        let consumer: BaseConsumer<ConsumerCallbacks> = consumer_config(config)
            .create_with_context(callbacks)
            .map_err(|source| StreamError::Client {
                client: "consumer",
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
            outputs: Outputs::new(config, Arc::clone(&metrics), Arc::clone(&stop))?,
            ingestor,
            metrics,
            config: config.clone(),
            stop: Arc::clone(&stop),
            last_error: None,
            last_delivered_write: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("kafka-consumer".into())
            .spawn(move || worker.run())?;
        Ok(Self {
            stop,
            thread,
            members,
        })
    }

    /// Stops polling, applies the batch in hand, and leaves the group.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.thread.join().is_err() {
            tracing::error!("the Kafka consumer thread panicked");
        }
        if let Some(members) = self.members {
            members.stop();
        }
    }
}
