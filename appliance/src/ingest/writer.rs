//! The single writer. Every source of events (`POST /v1/events`, the Kafka
//! consumer) hands validated batches to this thread, which groups what is
//! queued into one write transaction (group commit) and, between batches,
//! runs the expiry sweep a slice per transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender};
use std::time::{Duration, Instant};

use cartscore_core::Event;
use thiserror::Error;

use crate::error::{Code, ErrorCode};
use crate::ops::metrics::ReasonLabels;
use crate::ops::metrics::{Metrics, SourceLabels};
use crate::ops::telemetry;
use crate::quality::LiveQuality;
use crate::quality::drift::DriftMonitor;
use crate::store::{
    AppliedBatch, CartRecord, LogPositions, Outcome, Store, StoreError, StreamOffset,
};
use prometheus_client::metrics::counter::Counter;

/// Pause between two garbage-collection passes over the store. Expiry is
/// semantic (an idle session reads as new whether or not it was deleted), so
/// this only bounds how long dead entries occupy the map.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// How soon scored-cart records are written when no events come to carry
/// them (with a flowing stream they ride along with its batches). Each is a
/// transaction, with an fsync under store.sync: scoring at 10k/s while the
/// stream is idle costs five commits a second, not a hundred.
const RECORD_FLUSH: Duration = Duration::from_millis(200);

/// Hands scored-cart records to the writer without ever waiting: when its
/// queue is full the record is dropped and counted, never the score delayed.
#[derive(Debug, Clone)]
pub struct Recorder {
    /// `None` with `store.record_scores` off.
    queue: Option<SyncSender<CartRecord>>,
    dropped: Counter,
}

impl Recorder {
    /// A recorder with a queue of `capacity`, and the writer's end of it.
    pub fn new(capacity: usize, metrics: &Metrics) -> (Self, Receiver<CartRecord>) {
        Self::with(capacity, true, metrics)
    }

    /// [`Recorder::new`], recording nothing unless `enabled`.
    pub fn with(capacity: usize, enabled: bool, metrics: &Metrics) -> (Self, Receiver<CartRecord>) {
        let (queue, records) = std::sync::mpsc::sync_channel(capacity);
        let dropped = metrics
            .closed_loop
            .scored_records_dropped
            .get_or_create(&ReasonLabels {
                reason: "queue_full",
            })
            .clone();
        let queue = enabled.then_some(queue);
        (Self { queue, dropped }, records)
    }

    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// Queues the record `make` builds (not built when recording is off).
    pub fn record(&self, make: impl FnOnce() -> CartRecord) {
        if let Some(queue) = &self.queue
            && queue.try_send(make()).is_err()
        {
            self.dropped.inc();
        }
    }
}

/// How far the prediction log's publisher got: it raises these as the
/// broker acknowledges, the writer stores them with its next transaction.
#[derive(Debug, Default)]
pub struct LogDelivered {
    predictions: AtomicU64,
    outcomes: AtomicU64,
}

impl LogDelivered {
    pub fn new(from: LogPositions) -> Self {
        let this = Self::default();
        this.set(from);
        this
    }

    pub fn set(&self, positions: LogPositions) {
        self.predictions
            .store(positions.predictions, Ordering::Relaxed);
        self.outcomes.store(positions.outcomes, Ordering::Relaxed);
    }

    pub fn get(&self) -> LogPositions {
        LogPositions {
            predictions: self.predictions.load(Ordering::Relaxed),
            outcomes: self.outcomes.load(Ordering::Relaxed),
        }
    }
}

/// What the writer keeps of the closed loop: the records' queue, the live
/// windows it feeds with resolved outcomes, the drift window it feeds with
/// the scored rows, and the prediction log's positions to store.
#[derive(Debug)]
pub struct ClosedLoop {
    pub records: Receiver<CartRecord>,
    pub live: Arc<LiveQuality>,
    pub drift: Arc<DriftMonitor>,
    pub log: Option<Arc<LogDelivered>>,
}

/// Where a batch of events came from (the `source` label of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSource {
    Http,
    Kafka,
}

impl EventSource {
    pub const ALL: [EventSource; 2] = [Self::Http, Self::Kafka];
    pub const LABELS: [&'static str; 2] = ["http", "kafka"];

    pub fn label(self) -> &'static str {
        Self::LABELS[self as usize]
    }
}

#[derive(Debug, Clone, Error)]
pub enum IngestError {
    /// The write transaction failed; one error answers every job it held.
    #[error(transparent)]
    Store(Arc<StoreError>),
    #[error("the ingest writer has stopped")]
    Stopped,
}

impl ErrorCode for IngestError {
    fn error_code(&self) -> Code {
        match self {
            Self::Store(error) => error.error_code(),
            Self::Stopped => Code::ShuttingDown,
        }
    }
}

type Reply = tokio::sync::oneshot::Receiver<Result<AppliedBatch, IngestError>>;

struct IngestJob {
    events: Vec<Event>,
    offsets: Vec<StreamOffset>,
    source: EventSource,
    reply: tokio::sync::oneshot::Sender<Result<AppliedBatch, IngestError>>,
}

/// Handle to the writer thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct Ingestor {
    jobs: Sender<IngestJob>,
}

impl std::fmt::Debug for IngestJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestJob")
            .field("events", &self.events.len())
            .finish_non_exhaustive()
    }
}

impl Ingestor {
    /// Starts the writer thread. It stops once every `Ingestor` is dropped,
    /// after applying what is queued.
    pub fn start(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        max_batch_events: usize,
        closed_loop: ClosedLoop,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        // Known before the first event, so `rate()` works from the first scrape.
        for source in EventSource::ALL {
            let _ = metrics.events_applied.get_or_create(&SourceLabels {
                source: source.label(),
            });
        }
        let (jobs, queue) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(&store, &metrics, &queue, max_batch_events, &closed_loop))?;
        Ok((Self { jobs }, handle))
    }

    fn enqueue(
        &self,
        events: Vec<Event>,
        offsets: Vec<StreamOffset>,
        source: EventSource,
    ) -> Result<Reply, IngestError> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.jobs
            .send(IngestJob {
                events,
                offsets,
                source,
                reply,
            })
            .map_err(|_| IngestError::Stopped)?;
        Ok(done)
    }

    /// Applies `events` (and records `offsets`) in order, atomically.
    pub async fn apply(
        &self,
        events: Vec<Event>,
        offsets: Vec<StreamOffset>,
        source: EventSource,
    ) -> Result<AppliedBatch, IngestError> {
        let done = self.enqueue(events, offsets, source)?;
        done.await.map_err(|_| IngestError::Stopped)?
    }

    /// [`Ingestor::apply`] for threads outside an async runtime.
    pub fn apply_blocking(
        &self,
        events: Vec<Event>,
        offsets: Vec<StreamOffset>,
        source: EventSource,
    ) -> Result<AppliedBatch, IngestError> {
        let done = self.enqueue(events, offsets, source)?;
        done.blocking_recv().map_err(|_| IngestError::Stopped)?
    }
}

fn writer_loop(
    store: &Store,
    metrics: &Metrics,
    queue: &Receiver<IngestJob>,
    max_events: usize,
    closed_loop: &ClosedLoop,
) {
    let mut last_pass = Instant::now();
    let mut pass_running = true;
    let mut pending = match store.pending_records() {
        Ok(pending) => pending as i64,
        Err(error) => {
            tracing::error!(%error, "failed to count pending scored carts");
            0
        }
    };
    metrics.closed_loop.outcomes_pending.set(pending);
    let mut records: Vec<CartRecord> = Vec::new();
    let mut last_flush = Instant::now();
    // The positions the store holds; a newer one rides with the next
    // transaction, or gets its own at the records' cadence.
    let mut log_stored = closed_loop.log.as_ref().map(|log| log.get());
    let log_due = |stored: Option<LogPositions>| {
        let now = closed_loop.log.as_ref()?.get();
        (Some(now) != stored).then_some(now)
    };
    let mut resolved = |outcomes: &[Outcome], stored: usize| {
        pending += stored as i64 - outcomes.len() as i64;
        metrics.closed_loop.outcomes_pending.set(pending);
        closed_loop.live.observe(outcomes, Some(metrics));
    };
    let drain = |records: &mut Vec<CartRecord>| {
        let from = records.len();
        records.extend(closed_loop.records.try_iter().take(max_events));
        closed_loop.drift.observe(&records[from..]);
    };
    loop {
        drain(&mut records);
        let flush_pending = !records.is_empty() || log_due(log_stored).is_some();
        let flush_due = records.len() >= max_events || last_flush.elapsed() >= RECORD_FLUSH;
        let wait = if pass_running || (flush_pending && flush_due) {
            Duration::ZERO
        } else {
            // Nothing to flush: wake at the records' cadence to look again.
            let flush_in = if flush_pending {
                RECORD_FLUSH.saturating_sub(last_flush.elapsed())
            } else {
                RECORD_FLUSH
            };
            SWEEP_INTERVAL
                .saturating_sub(last_pass.elapsed())
                .min(flush_in)
        };
        match queue.recv_timeout(wait) {
            Ok(first) => {
                let mut group = vec![first];
                let mut queued = group[0].events.len();
                while queued < max_events {
                    match queue.try_recv() {
                        Ok(job) => {
                            queued += job.events.len();
                            group.push(job);
                        }
                        Err(_) => break,
                    }
                }
                drain(&mut records);
                last_flush = Instant::now();
                let delivered = log_due(log_stored);
                let written = apply_group(store, metrics, group, &records, delivered);
                records.clear();
                if let Some((outcomes, stored)) = written {
                    log_stored = delivered.or(log_stored);
                    resolved(&outcomes, stored);
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                let delivered = log_due(log_stored);
                if (!records.is_empty() || delivered.is_some())
                    && (records.len() >= max_events || last_flush.elapsed() >= RECORD_FLUSH)
                {
                    last_flush = Instant::now();
                    let written = apply_group(store, metrics, Vec::new(), &records, delivered);
                    records.clear();
                    if let Some((outcomes, stored)) = written {
                        log_stored = delivered.or(log_stored);
                        resolved(&outcomes, stored);
                    }
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                let delivered = log_due(log_stored);
                if !records.is_empty() || delivered.is_some() {
                    apply_group(store, metrics, Vec::new(), &records, delivered);
                }
                return;
            }
        }
        if !pass_running && last_pass.elapsed() >= SWEEP_INTERVAL {
            pass_running = true;
            last_pass = Instant::now();
        }
        if pass_running {
            // One slice per transaction, so queued events wait at most one.
            pass_running = match store.sweep() {
                Ok(outcome) => {
                    metrics.sessions_expired.inc_by(outcome.sessions as u64);
                    metrics.users_expired.inc_by(outcome.users as u64);
                    resolved(&outcome.outcomes, 0);
                    outcome.more
                }
                Err(error) => {
                    metrics.store_write_failed(error.error_code());
                    tracing::error!(%error, "expiry sweep failed");
                    false
                }
            };
        }
    }
}

/// Applies `group`, stores `records` and the prediction log's `delivered`
/// positions in one transaction; returns the outcomes it resolved and how
/// many records it stored, or `None` when it failed.
fn apply_group(
    store: &Store,
    metrics: &Metrics,
    group: Vec<IngestJob>,
    records: &[CartRecord],
    delivered: Option<LogPositions>,
) -> Option<(Vec<Outcome>, usize)> {
    let mut span = telemetry::span("ingest.batch");
    if let Some(span) = &mut span {
        let events: usize = group.iter().map(|j| j.events.len()).sum();
        span.attr("cartscore.ingest.events", events as i64);
        span.attr("cartscore.ingest.jobs", group.len() as i64);
        span.attr(
            "cartscore.ingest.source",
            group.first().map_or("", |j| j.source.label()),
        );
    }
    let started = Instant::now();
    let result = store.apply_with(
        group.iter().flat_map(|j| &j.events),
        group.iter().flat_map(|j| &j.offsets),
        records,
        delivered,
    );
    metrics
        .ingest_batch_duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok((applied, outcomes)) => {
            if applied.records_refused > 0 {
                metrics
                    .closed_loop
                    .dropped("store_full", applied.records_refused as u64);
            }
            for job in group {
                metrics
                    .events_applied
                    .get_or_create(&SourceLabels {
                        source: job.source.label(),
                    })
                    .inc_by(job.events.len() as u64);
                let _ = job.reply.send(Ok(AppliedBatch {
                    events: job.events.len(),
                    ..AppliedBatch::default()
                }));
            }
            Some((outcomes, applied.records_stored))
        }
        Err(error) => {
            let code = error.error_code();
            if let Some(span) = &mut span {
                span.attr("error.type", code.label());
            }
            metrics.store_write_failed(code);
            tracing::error!(%error, events = group.iter().map(|j| j.events.len()).sum::<usize>(), "write transaction failed; nothing of it was applied");
            let shared = IngestError::Store(Arc::new(error));
            for job in group {
                let _ = job.reply.send(Err(shared.clone()));
            }
            if !records.is_empty() {
                metrics
                    .closed_loop
                    .dropped("write_failed", records.len() as u64);
            }
            None
        }
    }
}
