//! The consumer's callbacks: on assignment every partition starts at the
//! store's position (not the group's: the store owns the truth), statistics
//! feed the lag and the stream's health, and librdkafka's log goes to
//! tracing.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use cartscore_core::SourcePosition;
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;

use super::client::{PartitionKey, forward_log, kind};
use super::health::StreamHealth;
use super::members::{Publisher, partitions_of};
use crate::ops::metrics::{Metrics, PartitionLabels, StreamMetrics};
use crate::shard::Ownership;
use crate::store::{OffsetKind, Store};

/// Callbacks of the consumer: rebalances seek to the store's offsets,
/// statistics feed lag and health, librdkafka's log goes to tracing.
pub(super) struct ConsumerCallbacks {
    pub(super) store: Arc<Store>,
    pub(super) health: Arc<StreamHealth>,
    pub(super) metrics: Arc<Metrics>,
    /// Next offset to apply per assigned partition: what the store holds.
    pub(super) positions: Mutex<HashMap<PartitionKey, i64>>,
    /// The last change-data-capture row applied per partition, as stored.
    pub(super) sources: Mutex<HashMap<PartitionKey, SourcePosition>>,
    /// In shard mode: the group's ownership and this shard's publisher.
    pub(super) shard: Option<ShardHooks>,
}

pub(super) struct ShardHooks {
    pub(super) ownership: Arc<Ownership>,
    pub(super) publisher: Publisher,
    pub(super) topics: Vec<String>,
    /// The assignment whose lost partitions the consumer thread must purge
    /// (after committing the batch in hand): partition count and owned set.
    pub(super) purge: Mutex<Option<(u32, BTreeSet<u32>)>>,
}

impl ShardHooks {
    /// Claims the partition numbers of a new (eager, complete) assignment.
    fn assigned(
        &self,
        consumer: &BaseConsumer<ConsumerCallbacks>,
        tpl: &TopicPartitionList,
        metrics: &Metrics,
    ) {
        let mine: BTreeSet<u32> = tpl
            .elements()
            .iter()
            .filter_map(|e| u32::try_from(e.partition()).ok())
            .collect();
        let Some(partitions) = self
            .topics
            .iter()
            .find_map(|topic| partitions_of(consumer, topic))
        else {
            tracing::error!(topics = ?self.topics, "no partition count for the consumed topics; ownership stays unknown");
            return;
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let record = self
            .ownership
            .claim(partitions as u32, mine.clone(), now_ms, metrics);
        self.publisher.publish(&record);
        *self.purge.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((partitions as u32, mine));
    }
}

impl ConsumerCallbacks {
    pub(super) fn positions(&self) -> std::sync::MutexGuard<'_, HashMap<PartitionKey, i64>> {
        self.positions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn sources(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<PartitionKey, SourcePosition>> {
        self.sources.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The assignment to purge for, once (shard mode).
    pub(super) fn take_purge(&self) -> Option<(u32, BTreeSet<u32>)> {
        self.shard
            .as_ref()?
            .purge
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    pub(super) fn stream(&self) -> &StreamMetrics {
        &self.metrics.stream
    }

    /// Sets each assigned partition's start to the lower of the store's
    /// applied and delivered positions (the beginning when this store never
    /// applied from it), and remembers the applied one: messages below it
    /// only have their outputs re-sent.
    pub(super) fn seek_to_store(&self, tpl: &mut TopicPartitionList) {
        let mut applied: HashMap<PartitionKey, i64> = HashMap::new();
        let mut delivered: HashMap<PartitionKey, i64> = HashMap::new();
        let mut commit_lsns: HashMap<PartitionKey, i64> = HashMap::new();
        let mut lsns: HashMap<PartitionKey, i64> = HashMap::new();
        match self.store.offsets() {
            Ok(offsets) => {
                for o in offsets {
                    let map = match o.kind {
                        OffsetKind::Applied => &mut applied,
                        OffsetKind::Delivered => &mut delivered,
                        OffsetKind::SourceCommitLsn => &mut commit_lsns,
                        OffsetKind::SourceLsn => &mut lsns,
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
        let mut sources = self.sources();
        for elem in tpl.elements() {
            let key = (elem.topic().to_owned(), elem.partition());
            match (commit_lsns.get(&key), lsns.get(&key)) {
                (Some(&commit_lsn), Some(&lsn)) => {
                    sources.insert(
                        key,
                        SourcePosition {
                            commit_lsn: commit_lsn as u64,
                            lsn: lsn as u64,
                        },
                    );
                }
                _ => {
                    sources.remove(&key);
                }
            }
        }
        drop(sources);
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
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Some(shard) = &self.shard
                    && assigned.is_ok()
                {
                    shard.assigned(consumer, tpl, &self.metrics);
                }
                assigned
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
