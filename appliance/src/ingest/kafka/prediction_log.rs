//! The prediction log: every scored cart to `kafka.predictions_topic` and
//! every resolved outcome to `kafka.outcomes_topic`, as JSON keyed by user,
//! so a warehouse keeps them. The records come from the store's outbox
//! (`store::log`), in sequence order, each stream from its delivered
//! position; a record stays in flight until the broker acknowledged it (a
//! failed one is sent again), and the lowest one in flight is the delivered
//! position the writer stores with its next transaction. A restart resumes
//! from the stored positions: at least once, and the state never waits for
//! the broker (the outbox is bounded; what it drops before delivery is
//! counted as lost).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde::Serialize;

use super::client::{StreamError, producer_config};
use super::outputs::{DeliveryTracker, queue};
use crate::config::KafkaConfig;
use crate::ingest::writer::LogDelivered;
use crate::ops::metrics::{Metrics, TopicLabels};
use crate::quality::records::{PredictionView, outcome_record};
use crate::store::{LogPositions, Store, StoreError};

/// Records read from the store per look.
const PAGE: usize = 1_000;
/// Records of one log awaiting acknowledgement; beyond it the publisher
/// waits for the broker, and the outbox holds the rest.
const MAX_IN_FLIGHT: usize = 20_000;
/// How long the publisher waits when it found nothing new.
const IDLE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Log {
    Predictions = 0,
    Outcomes = 1,
}

impl Log {
    const ALL: [Log; 2] = [Log::Predictions, Log::Outcomes];
}

/// One log's records from the store to the broker.
#[derive(Debug)]
struct Stream {
    topic: String,
    /// The next sequence number to read from the store.
    next: u64,
    /// Sent and not acknowledged: key and payload, to send again.
    in_flight: BTreeMap<u64, (String, Vec<u8>)>,
}

impl Stream {
    /// Everything below it was acknowledged.
    fn delivered(&self) -> u64 {
        self.in_flight.keys().next().copied().unwrap_or(self.next)
    }
}

/// The running publisher; [`PredictionLog::stop`] gives what is in flight
/// a last chance and returns.
#[derive(Debug)]
pub struct PredictionLog {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl PredictionLog {
    /// Starts publishing from the positions `delivered` holds (the store's).
    pub fn start(
        config: &KafkaConfig,
        store: Arc<Store>,
        delivered: Arc<LogDelivered>,
        metrics: Arc<Metrics>,
        flush_at_stop: Duration,
    ) -> Result<Self, StreamError> {
        let producer = producer_config(config)
            .set("client.id", "cartscore-prediction-log")
            .create_with_context(DeliveryTracker::default())
            .map_err(|source| StreamError::Client {
                client: "prediction-log producer",
                brokers: config.brokers.clone(),
                source,
            })?;
        let from = delivered.get();
        let stream = |topic: &str, next| Stream {
            topic: topic.to_owned(),
            next,
            in_flight: BTreeMap::new(),
        };
        let streams = [
            stream(&config.predictions_topic, from.predictions),
            stream(&config.outcomes_topic, from.outcomes),
        ];
        for stream in &streams {
            let labels = TopicLabels {
                topic: stream.topic.clone(),
            };
            let _ = metrics.closed_loop.log_lost.get_or_create(&labels);
            let _ = metrics.stream.produced.get_or_create(&labels);
        }
        tracing::info!(
            predictions = config.predictions_topic,
            outcomes = config.outcomes_topic,
            from_prediction = from.predictions,
            from_outcome = from.outcomes,
            "publishing the prediction log"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let publisher = Publisher {
            producer,
            store,
            delivered,
            metrics,
            streams,
            stop: Arc::clone(&stop),
            flush_at_stop,
        };
        let thread = std::thread::Builder::new()
            .name("prediction-log".into())
            .spawn(move || publisher.run())?;
        Ok(Self { stop, thread })
    }

    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.thread.join().is_err() {
            tracing::error!("the prediction-log thread panicked");
        }
    }
}

struct Publisher {
    producer: BaseProducer<DeliveryTracker>,
    store: Arc<Store>,
    delivered: Arc<LogDelivered>,
    metrics: Arc<Metrics>,
    streams: [Stream; 2],
    stop: Arc<AtomicBool>,
    flush_at_stop: Duration,
}

impl Publisher {
    fn run(mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            let mut read = 0;
            for log in Log::ALL {
                read += self.fill(log);
            }
            self.producer
                .poll(if read == 0 { IDLE } else { Duration::ZERO });
            self.settle();
        }
        if let Err(error) = self.producer.flush(self.flush_at_stop) {
            tracing::warn!(%error, "prediction-log records still unacknowledged at stop; they are sent again on restart");
        }
        self.settle();
    }

    /// Reads the log's next page from the store and sends it; returns how
    /// many records it read.
    fn fill(&mut self, log: Log) -> usize {
        let stream = &self.streams[log as usize];
        let room = MAX_IN_FLIGHT
            .saturating_sub(stream.in_flight.len())
            .min(PAGE);
        if room == 0 {
            return 0;
        }
        let page = match read_page(&self.store, log, stream.next, room) {
            Ok(page) => page,
            Err(error) => {
                tracing::error!(%error, topic = stream.topic, "failed to read the prediction log's outbox");
                return 0;
            }
        };
        let read = page.len();
        for (seq, key, payload) in page {
            let stream = &mut self.streams[log as usize];
            if seq > stream.next {
                // The bounded outbox dropped these before the broker took them.
                self.metrics
                    .closed_loop
                    .log_lost
                    .get_or_create(&TopicLabels {
                        topic: stream.topic.clone(),
                    })
                    .inc_by(seq - stream.next);
            }
            stream.next = seq + 1;
            stream.in_flight.insert(seq, (key, payload));
            self.send(log, seq);
        }
        read
    }

    fn send(&self, log: Log, seq: u64) {
        let stream = &self.streams[log as usize];
        let Some((key, payload)) = stream.in_flight.get(&seq) else {
            return;
        };
        let tag = ((seq as usize) << 1) | log as usize;
        let record = BaseRecord::with_opaque_to(&stream.topic, tag)
            .key(key.as_bytes())
            .payload(payload.as_slice());
        queue(&self.producer, record, tag, &stream.topic);
    }

    /// Serves delivery reports: acknowledged records leave the flight,
    /// failed ones are sent again, and the delivered positions move up.
    fn settle(&mut self) {
        let mut retry = Vec::new();
        for (tag, acknowledged) in self.producer.context().take() {
            let log = Log::ALL[tag & 1];
            let seq = (tag >> 1) as u64;
            let stream = &mut self.streams[log as usize];
            if acknowledged {
                if stream.in_flight.remove(&seq).is_some() {
                    self.metrics
                        .stream
                        .produced
                        .get_or_create(&TopicLabels {
                            topic: stream.topic.clone(),
                        })
                        .inc();
                }
            } else {
                self.metrics.stream.produce_errors.inc();
                retry.push((log, seq));
            }
        }
        for (log, seq) in retry {
            self.send(log, seq);
        }
        self.delivered.set(LogPositions {
            predictions: self.streams[Log::Predictions as usize].delivered(),
            outcomes: self.streams[Log::Outcomes as usize].delivered(),
        });
    }
}

/// A page of one log as (sequence number, key, JSON payload).
fn read_page(
    store: &Store,
    log: Log,
    since: u64,
    limit: usize,
) -> Result<Vec<(u64, String, Vec<u8>)>, StoreError> {
    fn encode<T: Serialize>(seq: u64, user_id: u64, view: &T) -> Option<(u64, String, Vec<u8>)> {
        match serde_json::to_vec(view) {
            Ok(payload) => Some((seq, user_id.to_string(), payload)),
            Err(error) => {
                // Plain data: unreachable short of a bug, and never worth a crash.
                tracing::error!(%error, seq, "failed to encode a prediction-log record");
                None
            }
        }
    }
    Ok(match log {
        Log::Predictions => store
            .predictions_since(since, limit)?
            .into_iter()
            .filter_map(|(seq, p)| encode(seq, p.user_id, &PredictionView::new(seq, p)))
            .collect(),
        Log::Outcomes => store
            .outcomes_since(since, limit)?
            .into_iter()
            .filter_map(|(seq, o)| encode(seq, o.user_id, &outcome_record(seq, o)))
            .collect(),
    })
}
