//! The consumer thread: polls, routes each message into the current batch,
//! and commits a batch (its state, its applied positions and the delivered
//! positions so far, in one LMDB transaction) when it is full or due. A batch
//! the store refuses is consumed again from the stored offsets.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::client::{PartitionKey, kind};
use super::outputs::Outputs;
use super::rebalance::ConsumerCallbacks;
use super::route::Batch;
use crate::config::{KafkaConfig, KafkaMode};
use crate::error::ErrorCode;
use crate::ingest::writer::{EventSource, Ingestor};
use crate::ops::metrics::{Metrics, ReasonLabels, TopicLabels, TopicReasonLabels};
use crate::store::{OffsetKind, StreamOffset};

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

pub(super) struct Worker {
    pub(super) consumer: BaseConsumer<ConsumerCallbacks>,
    pub(super) outputs: Outputs,
    pub(super) ingestor: Ingestor,
    pub(super) metrics: Arc<Metrics>,
    pub(super) config: KafkaConfig,
    pub(super) stop: Arc<AtomicBool>,
    /// The last poll error and when it was logged, to log repeats once a minute.
    pub(super) last_error: Option<(String, Instant)>,
    pub(super) last_delivered_write: Instant,
}

impl Worker {
    pub(super) fn run(mut self) {
        let max_wait = Duration::from_millis(self.config.batch_max_ms.get());
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
            // An open batch only takes what librdkafka already holds: the
            // first empty poll closes it (a group commit). Messages that
            // arrive while it is written make the next batch, so batches
            // grow with the rate and the write time instead of every
            // message waiting out `batch_max_ms`.
            let timeout = if batch.is_empty() {
                IDLE_POLL
            } else {
                Duration::ZERO
            };
            let polled = self.consumer.poll(timeout);
            let drained = polled.is_none();
            match polled {
                Some(Ok(message)) => {
                    let replay = self.already_applied(&message);
                    if replay {
                        self.metrics.stream.skipped.inc();
                    }
                    // Asked only for a CDC row that carries a position: the
                    // lock and the key's copy stay off every other message.
                    let callbacks = self.consumer.context();
                    let applied_source = || {
                        callbacks
                            .sources()
                            .get(&(message.topic().to_owned(), message.partition()))
                            .copied()
                    };
                    batch.route(
                        &message,
                        replay,
                        applied_source,
                        self.config.forward_validated,
                        &self.metrics,
                    );
                }
                Some(Err(error)) => self.poll_error(&error),
                None => {}
            }
            self.outputs.settle();
            if let Some((partitions, owned)) = self.consumer.context().take_purge() {
                // What was polled before the rebalance goes in first, so
                // that the purge also removes what it added.
                if !batch.is_empty() {
                    self.commit(std::mem::take(&mut batch));
                }
                self.purge(partitions, &owned);
            }
            let full = batch.messages >= self.config.batch_max_events.get();
            let due = drained || batch.started.is_some_and(|s| s.elapsed() >= max_wait);
            if !batch.is_empty() && (full || due) {
                self.commit(std::mem::take(&mut batch));
                group_behind = true;
            }
            if batch.is_empty()
                && self.outputs.has_delivered()
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
        self.outputs.flush(Duration::from_secs(10));
        if self.outputs.has_delivered() {
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
            outputs,
            ingestor,
            ..
        } = self;
        drop(ingestor);
        drop(outputs);
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
        for (topic, count) in batch.duplicates {
            self.metrics
                .stream
                .cdc_duplicates
                .get_or_create(&TopicLabels { topic })
                .inc_by(count);
        }
        for ((topic, mismatch), count) in batch.key_mismatches {
            self.metrics
                .stream
                .key_mismatches
                .get_or_create(&TopicReasonLabels {
                    topic,
                    reason: mismatch.label(),
                })
                .inc_by(count);
        }
        self.outputs.send(batch.outputs, batch.ends);
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
        // The last change-data-capture row of each partition, with the state
        // it produced: a re-sent copy is recognised after any restart.
        for ((topic, partition), position) in &batch.sources {
            for (kind, value) in [
                (OffsetKind::SourceCommitLsn, position.commit_lsn),
                (OffsetKind::SourceLsn, position.lsn),
            ] {
                offsets.push(StreamOffset {
                    topic: topic.clone(),
                    partition: *partition,
                    next_offset: value as i64,
                    kind,
                });
            }
        }
        let delivered = self.outputs.take_delivered();
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
        if let Err(error) =
            self.ingestor
                .apply_blocking(batch.events, offsets.clone(), EventSource::Kafka)
        {
            self.metrics
                .stream
                .batch_retries
                .get_or_create(&kind(error.error_code().label()))
                .inc();
            tracing::error!(%error, "failed to apply a Kafka batch; consuming it again from the stored offsets");
            self.outputs.restore(delivered);
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
        self.consumer.context().sources().extend(batch.sources);
        let mut positions = self.consumer.context().positions();
        for offset in offsets {
            if offset.kind == OffsetKind::Applied {
                positions.insert((offset.topic, offset.partition), offset.next_offset);
            }
        }
    }

    /// Shard mode: drops what this shard no longer owns (see
    /// [`crate::store::Store::purge_unowned`]).
    fn purge(&self, partitions: u32, owned: &std::collections::BTreeSet<u32>) {
        let store = &self.consumer.context().store;
        match store.purge_unowned(partitions, owned) {
            Ok(outcome) => {
                let shard = &self.metrics.shard;
                shard.purged_sessions.inc_by(outcome.sessions as u64);
                shard.purged_users.inc_by(outcome.users as u64);
                tracing::info!(
                    owned = ?owned,
                    sessions = outcome.sessions,
                    users = outcome.users,
                    offsets = outcome.offsets,
                    "dropped the state of partitions now owned by other shards"
                );
            }
            Err(error) => {
                self.metrics.store_write_failed(error.error_code());
                tracing::error!(%error, "failed to drop the state of partitions owned by other shards");
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
}
