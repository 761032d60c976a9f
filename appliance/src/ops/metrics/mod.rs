//! Prometheus metrics in base units. Counters get `_total` from the encoder.
//! Hot-path handles (the TCP cores') are resolved once, so a request costs a
//! few atomic adds and no label lookup.
//!
//! Every part of the appliance counts into this one registry; it depends on
//! none of them. A family whose labels are known in advance is exported at 0
//! from the first scrape: the label sets of this module's own vocabulary
//! (binary-protocol outcomes, store failures) here, the others by the part
//! that owns them when it starts (reload outcomes, event sources).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use cartscore_protocol::Status;

use crate::error::Code;

mod challenger;
mod quality;

pub use challenger::{ChallengerMetrics, ChangeLabels, PairLabels, RoleLabels};
pub use quality::{ClosedLoopMetrics, DriftMetrics, FeatureLabels, LabelOutcome, LiveMetrics};

/// Latency buckets in seconds, from 10 µs: the appliance answers in
/// microseconds, so the usual 5 ms first bucket would hide everything.
pub const LATENCY_BUCKETS: [f64; 16] = [
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 1.0, 2.5,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOnly {
    pub route: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub api: &'static str,
    pub reason: &'static str,
}

/// Why a connection is refused or closed for cause, per API.
pub const CONNECTION_REASONS: [(&str, &str); 9] = [
    ("http", "max_connections"),
    ("http", "header_timeout"),
    ("http", "request_timeout"),
    ("http", "malformed_request"),
    ("tcp", "max_connections"),
    ("tcp", "idle_timeout"),
    ("tcp", "write_timeout"),
    ("tcp", "malformed_frame"),
    ("tcp", "frame_too_large"),
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceReasonLabels {
    pub source: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicLabels {
    pub topic: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TopicReasonLabels {
    pub topic: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: i32,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub version: String,
    pub contract: String,
    pub evaluator: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub model_version: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
pub(crate) type FloatGauges<L> = Family<L, Gauge<f64, AtomicU64>>;

#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub http_requests: Family<RouteLabels, Counter>,
    pub http_duration: HistogramFamily<RouteOnly>,
    pub tcp_requests: Family<OutcomeLabels, Counter>,
    pub tcp_duration: Histogram,
    pub tcp_connections: Gauge,
    pub tcp_frame_errors: Family<ReasonLabels, Counter>,
    pub http_connections: Gauge,
    pub connections_refused: Family<ConnectionLabels, Counter>,
    pub connections_closed: Family<ConnectionLabels, Counter>,
    pub events_applied: Family<SourceLabels, Counter>,
    pub events_invalid: Family<SourceReasonLabels, Counter>,
    pub ingest_batch_duration: Histogram,
    pub store_write_errors: Family<ReasonLabels, Counter>,
    pub store_map_full: Counter,
    pub store_used_bytes: Gauge,
    pub store_map_size_bytes: Gauge,
    pub live_sessions: Gauge,
    pub users: Gauge,
    pub sessions_expired: Counter,
    pub users_expired: Counter,
    pub event_time_watermark: Gauge<f64, AtomicU64>,
    pub model_info: Family<ModelLabels, Gauge>,
    pub model_reloads: Family<OutcomeLabels, Counter>,
    pub model_loaded_timestamp: Gauge<f64, AtomicU64>,
    pub stream: StreamMetrics,
    pub shard: ShardMetrics,
    pub live: LiveMetrics,
    pub drift: DriftMetrics,
    pub closed_loop: ClosedLoopMetrics,
    pub challenger: ChallengerMetrics,
}

/// The Kafka consumer's view: consumed, routed, lag and health.
#[derive(Debug)]
pub struct StreamMetrics {
    pub messages: Family<TopicLabels, Counter>,
    pub key_mismatches: Family<TopicReasonLabels, Counter>,
    pub cdc_duplicates: Family<TopicLabels, Counter>,
    pub skipped: Counter,
    pub produced: Family<TopicLabels, Counter>,
    pub produce_errors: Counter,
    pub poll_errors: Family<ReasonLabels, Counter>,
    pub batch_retries: Family<ReasonLabels, Counter>,
    pub rebalances: Family<ReasonLabels, Counter>,
    pub consumer_lag: Family<PartitionLabels, Gauge>,
    pub connected: Gauge,
    pub staleness: Gauge<f64, AtomicU64>,
    pub apply_delay: Histogram,
    pub batch_duration: Histogram,
}

impl StreamMetrics {
    fn register(registry: &mut Registry) -> Self {
        let this = Self {
            messages: Family::default(),
            key_mismatches: Family::default(),
            cdc_duplicates: Family::default(),
            skipped: Counter::default(),
            produced: Family::default(),
            produce_errors: Counter::default(),
            poll_errors: Family::default(),
            batch_retries: Family::default(),
            rebalances: Family::default(),
            consumer_lag: Family::default(),
            connected: Gauge::default(),
            staleness: Gauge::default(),
            apply_delay: latency_histogram(),
            batch_duration: latency_histogram(),
        };
        let r = registry.sub_registry_with_prefix("cartscore_stream");
        r.register(
            "messages",
            "Kafka messages consumed, valid or not, by topic",
            this.messages.clone(),
        );
        r.register(
            "key_mismatches",
            "Valid events whose record key is not their user_id (the key policy shards rely on), by topic and reason",
            this.key_mismatches.clone(),
        );
        r.register(
            "cdc_duplicates",
            "Change-data-capture rows at or below their partition's last applied source position (re-sent by Debezium), not applied",
            this.cdc_duplicates.clone(),
        );
        r.register(
            "skipped",
            "Messages delivered again below the stored position and not re-applied",
            this.skipped.clone(),
        );
        r.register(
            "produced",
            "Records delivered to the output topics (validated, invalid, the prediction log)",
            this.produced.clone(),
        );
        r.register(
            "produce_errors",
            "Output records whose delivery failed and was retried",
            this.produce_errors.clone(),
        );
        r.register(
            "poll_errors",
            "Errors returned by the consumer's poll, by kind",
            this.poll_errors.clone(),
        );
        r.register(
            "batch_retries",
            "Batches the store refused, consumed again from the stored offsets, by reason",
            this.batch_retries.clone(),
        );
        r.register(
            "rebalances",
            "Group rebalances by kind: assign, revoke, error",
            this.rebalances.clone(),
        );
        r.register(
            "consumer_lag",
            "Messages on the broker not yet applied, per partition (from the last statistics)",
            this.consumer_lag.clone(),
        );
        r.register(
            "connected",
            "1 while a broker connection is up",
            this.connected.clone(),
        );
        r.register(
            "staleness_seconds",
            "Time since the store last held everything the broker had",
            this.staleness.clone(),
        );
        r.register(
            "apply_delay_seconds",
            "From a batch's oldest message timestamp to its state being readable",
            this.apply_delay.clone(),
        );
        r.register(
            "batch_duration_seconds",
            "From a batch's first message polled to its commit",
            this.batch_duration.clone(),
        );
        this
    }
}

/// A shard's view of its group (`kafka.mode = shard`).
#[derive(Debug, Default)]
pub struct ShardMetrics {
    pub members: Gauge,
    pub owned_partitions: Gauge,
    pub purged_sessions: Counter,
    pub purged_users: Counter,
    pub redirects: Family<ApiLabels, Counter>,
    pub membership_errors: Family<ReasonLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub api: &'static str,
}

impl ShardMetrics {
    fn register(registry: &mut Registry) -> Self {
        let this = Self::default();
        for api in ["http", "tcp"] {
            let _ = this.redirects.get_or_create(&ApiLabels { api });
        }
        for reason in ["publish", "malformed"] {
            let _ = this
                .membership_errors
                .get_or_create(&ReasonLabels { reason });
        }
        let r = registry.sub_registry_with_prefix("cartscore_shard");
        r.register(
            "members",
            "Shards known in the group, this one included",
            this.members.clone(),
        );
        r.register(
            "owned_partitions",
            "Partition numbers this shard is assigned",
            this.owned_partitions.clone(),
        );
        r.register(
            "purged_sessions",
            "Sessions dropped because their partition moved to another shard",
            this.purged_sessions.clone(),
        );
        r.register(
            "purged_users",
            "Users dropped because their partition moved to another shard",
            this.purged_users.clone(),
        );
        r.register(
            "redirects",
            "Scores answered with the owning shard instead (HTTP 421, TCP not_owner), by API",
            this.redirects.clone(),
        );
        r.register(
            "membership_errors",
            "Membership records that could not be published or read, by reason",
            this.membership_errors.clone(),
        );
        this
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let http_requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "cartscore_http_requests",
            "HTTP requests by route and status code",
            http_requests.clone(),
        );
        let http_duration: HistogramFamily<RouteOnly> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "cartscore_http_request_duration_seconds",
            "Time from request to response by route",
            http_duration.clone(),
        );
        let tcp_requests = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "cartscore_tcp_requests",
            "Binary-protocol requests by outcome",
            tcp_requests.clone(),
        );
        let tcp_duration = latency_histogram();
        registry.register(
            "cartscore_tcp_request_duration_seconds",
            "Server time per binary-protocol request, from its frame read to its response queued",
            tcp_duration.clone(),
        );
        let tcp_connections = Gauge::default();
        registry.register(
            "cartscore_tcp_connections",
            "Open binary-protocol connections",
            tcp_connections.clone(),
        );
        let tcp_frame_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "cartscore_tcp_frame_errors",
            "Malformed binary-protocol frames by reason (the connection is closed after each)",
            tcp_frame_errors.clone(),
        );
        let http_connections = Gauge::default();
        registry.register(
            "cartscore_http_connections",
            "Open HTTP connections",
            http_connections.clone(),
        );
        let connections_refused = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "cartscore_connections_refused",
            "Connections closed as soon as accepted, by API and reason (max_connections: http.max_connections / tcp.max_connections are open)",
            connections_refused.clone(),
        );
        let connections_closed = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "cartscore_connections_closed",
            "Connections the appliance closed for cause, by API and reason: header_timeout, request_timeout, malformed_request (HTTP); idle_timeout, write_timeout, malformed_frame, frame_too_large (TCP)",
            connections_closed.clone(),
        );
        for (api, reason) in CONNECTION_REASONS {
            let family = if reason == "max_connections" {
                &connections_refused
            } else {
                &connections_closed
            };
            let _ = family.get_or_create(&ConnectionLabels { api, reason });
        }
        let events_applied = Family::<SourceLabels, Counter>::default();
        registry.register(
            "cartscore_events_applied",
            "Valid events applied to the store by source",
            events_applied.clone(),
        );
        let events_invalid = Family::<SourceReasonLabels, Counter>::default();
        registry.register(
            "cartscore_events_invalid",
            "Events rejected by validation, by source and error code",
            events_invalid.clone(),
        );
        let ingest_batch_duration = latency_histogram();
        registry.register(
            "cartscore_ingest_batch_duration_seconds",
            "Time to apply one write transaction of events",
            ingest_batch_duration.clone(),
        );
        let store_write_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "cartscore_store_write_errors",
            "Failed write transactions by reason",
            store_write_errors.clone(),
        );
        let store_map_full = Counter::default();
        registry.register(
            "cartscore_store_map_full",
            "Write transactions refused because the LMDB map is full",
            store_map_full.clone(),
        );
        let store_used_bytes = Gauge::default();
        registry.register(
            "cartscore_store_used_bytes",
            "Bytes of the LMDB map in use",
            store_used_bytes.clone(),
        );
        let store_map_size_bytes = Gauge::default();
        registry.register(
            "cartscore_store_map_size_bytes",
            "Configured LMDB map size",
            store_map_size_bytes.clone(),
        );
        let live_sessions = Gauge::default();
        registry.register(
            "cartscore_live_sessions",
            "Sessions held in the store (idle ones are swept)",
            live_sessions.clone(),
        );
        let users = Gauge::default();
        registry.register("cartscore_users", "Users held in the store", users.clone());
        let sessions_expired = Counter::default();
        registry.register(
            "cartscore_sessions_expired",
            "Idle sessions deleted by the sweeper",
            sessions_expired.clone(),
        );
        let users_expired = Counter::default();
        registry.register(
            "cartscore_users_expired",
            "Idle users deleted by the sweeper",
            users_expired.clone(),
        );
        let event_time_watermark = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "cartscore_event_time_watermark_seconds",
            "Latest event time applied to the store (Unix seconds)",
            event_time_watermark.clone(),
        );
        let model_info = Family::<ModelLabels, Gauge>::default();
        registry.register(
            "cartscore_model_info",
            "The serving bundle (value 1)",
            model_info.clone(),
        );
        let model_reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "cartscore_model_reloads",
            "Model reload attempts by result: loaded, unchanged, rejected",
            model_reloads.clone(),
        );
        let model_loaded_timestamp = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "cartscore_model_loaded_timestamp_seconds",
            "When the serving bundle was swapped in (Unix seconds)",
            model_loaded_timestamp.clone(),
        );
        let stream = StreamMetrics::register(&mut registry);
        let shard = ShardMetrics::register(&mut registry);
        let live = LiveMetrics::register(&mut registry);
        let drift = DriftMetrics::register(&mut registry);
        let closed_loop = ClosedLoopMetrics::register(&mut registry);
        let challenger = ChallengerMetrics::register(&mut registry);
        // Known label sets start at 0, so dashboards and `increase()`
        // alerts have a series from the first scrape, not the first event.
        for outcome in Status::ALL.map(Status::label) {
            let _ = tcp_requests.get_or_create(&OutcomeLabels { outcome });
        }
        for reason in Code::STORE_WRITE.map(Code::label) {
            let _ = store_write_errors.get_or_create(&ReasonLabels { reason });
        }
        Self {
            registry,
            http_requests,
            http_duration,
            tcp_requests,
            tcp_duration,
            tcp_connections,
            tcp_frame_errors,
            http_connections,
            connections_refused,
            connections_closed,
            events_applied,
            events_invalid,
            ingest_batch_duration,
            store_write_errors,
            store_map_full,
            store_used_bytes,
            store_map_size_bytes,
            live_sessions,
            users,
            sessions_expired,
            users_expired,
            event_time_watermark,
            model_info,
            model_reloads,
            model_loaded_timestamp,
            stream,
            shard,
            live,
            drift,
            closed_loop,
            challenger,
        }
    }

    /// Counts a failed write transaction by its reason.
    pub fn store_write_failed(&self, code: Code) {
        self.store_write_errors
            .get_or_create(&ReasonLabels {
                reason: code.label(),
            })
            .inc();
        if code == Code::MapFull {
            self.store_map_full.inc();
        }
    }

    /// Counts an event rejected by validation, by where it came from.
    pub fn event_invalid(&self, source: &'static str, code: Code) {
        self.events_invalid
            .get_or_create(&SourceReasonLabels {
                source,
                reason: code.label(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
