//! OpenTelemetry export over OTLP/HTTP: traces of sampled HTTP requests,
//! every model reload and every ingest batch, and the appliance's metrics.
//!
//! Off by default. When `telemetry.otlp_endpoint` is empty no provider is
//! built, [`span`] and [`http_request`] return `None` after one atomic load,
//! and the TCP cores never touch any of this: nothing is exported and
//! nothing slows down. Export runs on the SDK's own threads with a blocking
//! HTTP client, so a slow collector never holds a request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use thiserror::Error;

use cartscore_protocol::Status;

use crate::config::TelemetryConfig;
use crate::ops::metrics::{LATENCY_BUCKETS, Metrics, OutcomeLabels, SourceLabels};

#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("failed to build the OTLP {signal} exporter for {endpoint}: {reason}")]
    Exporter {
        signal: &'static str,
        endpoint: String,
        reason: String,
    },
}

/// What request handlers need when export is on.
struct Active {
    tracer: SdkTracer,
    sample_every: u64,
    seen: AtomicU64,
    http_requests: Counter<u64>,
    http_duration: Histogram<f64>,
}

static ACTIVE: OnceLock<Active> = OnceLock::new();

/// A recording span, ended (and queued for export) on drop.
pub struct SpanGuard(opentelemetry_sdk::trace::Span);

impl SpanGuard {
    pub fn attr(&mut self, key: &'static str, value: impl Into<Value>) {
        self.0.set_attribute(KeyValue::new(key, value));
    }
}

impl Drop for SpanGuard {
    fn drop(&mut self) {
        self.0.end();
    }
}

impl std::fmt::Debug for SpanGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpanGuard")
    }
}

pub fn enabled() -> bool {
    ACTIVE.get().is_some()
}

/// Starts a span when export is on (reloads, ingest batches).
pub fn span(name: &'static str) -> Option<SpanGuard> {
    ACTIVE
        .get()
        .map(|active| SpanGuard(active.tracer.start(name)))
}

/// One HTTP request as export sees it: its metrics are recorded by
/// [`HttpRequest::finish`], and 1 in `sample_every` requests is a span.
#[derive(Debug)]
pub struct HttpRequest {
    span: Option<SpanGuard>,
    method: String,
    route: &'static str,
}

/// Starts recording a request when export is on. `route` is the bounded
/// route label the Prometheus metrics use, so no path is ever an attribute.
pub fn http_request(method: &str, route: &'static str) -> Option<HttpRequest> {
    let active = ACTIVE.get()?;
    let n = active.seen.fetch_add(1, Ordering::Relaxed);
    let mut span = n
        .is_multiple_of(active.sample_every)
        .then(|| SpanGuard(active.tracer.start("http.request")));
    if let Some(span) = &mut span {
        span.attr("http.request.method", method.to_owned());
        span.attr("http.route", route);
    }
    Some(HttpRequest {
        span,
        method: method.to_owned(),
        route,
    })
}

impl HttpRequest {
    pub fn finish(mut self, status: u16, seconds: f64) {
        let Some(active) = ACTIVE.get() else { return };
        let status = i64::from(status);
        let attributes = [
            KeyValue::new("http.request.method", self.method),
            KeyValue::new("http.route", self.route),
            KeyValue::new("http.response.status_code", status),
        ];
        active.http_requests.add(1, &attributes);
        active.http_duration.record(seconds, &attributes);
        if let Some(span) = &mut self.span {
            span.attr("http.response.status_code", status);
        }
    }
}

/// Label values of the Prometheus families mirrored as OTel instruments
/// whose vocabulary belongs to another part of the appliance.
#[derive(Debug, Clone, Copy)]
pub struct Mirrors {
    pub reload_outcomes: &'static [&'static str],
    pub event_sources: &'static [&'static str],
}

/// The providers; dropping flushes what is queued.
pub struct Telemetry {
    tracer: Option<SdkTracerProvider>,
    meter: Option<SdkMeterProvider>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("enabled", &self.tracer.is_some())
            .finish()
    }
}

impl Telemetry {
    pub fn disabled() -> Self {
        Self {
            tracer: None,
            meter: None,
        }
    }

    pub fn start(
        config: &TelemetryConfig,
        metrics: &Arc<Metrics>,
        mirrors: Mirrors,
    ) -> Result<Self, TelemetryError> {
        if !config.enabled() {
            return Ok(Self::disabled());
        }
        let base = config.otlp_endpoint.trim_end_matches('/');
        let failed = |signal: &'static str, endpoint: &str, error: &dyn std::fmt::Display| {
            TelemetryError::Exporter {
                signal,
                endpoint: endpoint.to_owned(),
                reason: error.to_string(),
            }
        };
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();

        let traces = format!("{base}/v1/traces");
        let spans = SpanExporter::builder()
            .with_http()
            .with_endpoint(traces.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| failed("trace", &traces, &e))?;
        let tracer_provider = SdkTracerProvider::builder()
            .with_batch_exporter(spans)
            .with_resource(resource.clone())
            .build();

        let metrics_url = format!("{base}/v1/metrics");
        let exporter = MetricExporter::builder()
            .with_http()
            .with_endpoint(metrics_url.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| failed("metrics", &metrics_url, &e))?;
        let reader = PeriodicReader::builder(exporter)
            .with_interval(Duration::from_millis(config.metrics_interval_ms))
            .build();
        let meter_provider = SdkMeterProvider::builder()
            .with_reader(reader)
            .with_resource(resource)
            .build();
        let meter = meter_provider.meter("cartscore");
        register_observers(&meter, metrics, mirrors);

        let sample_every = (1.0 / config.request_sample_ratio).round().max(1.0) as u64;
        let _ = ACTIVE.set(Active {
            tracer: tracer_provider.tracer("cartscore"),
            sample_every,
            seen: AtomicU64::new(0),
            http_requests: meter
                .u64_counter("cartscore.http.requests")
                .with_description("HTTP requests by route and status")
                .build(),
            http_duration: meter
                .f64_histogram("http.server.request.duration")
                .with_unit("s")
                .with_description("HTTP request duration")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
        });
        tracing::info!(
            endpoint = base,
            sample_every,
            "OpenTelemetry export enabled"
        );
        Ok(Self {
            tracer: Some(tracer_provider),
            meter: Some(meter_provider),
        })
    }

    /// Exports what is queued; called on shutdown.
    pub fn shutdown(self) {
        if let Some(tracer) = self.tracer
            && let Err(error) = tracer.shutdown()
        {
            tracing::warn!(%error, "failed to flush traces");
        }
        if let Some(meter) = self.meter
            && let Err(error) = meter.shutdown()
        {
            tracing::warn!(%error, "failed to flush metrics");
        }
    }
}

/// Mirrors the Prometheus counters and gauges as observable instruments:
/// the hot paths keep updating one set of atomics, read at export time.
fn register_observers(
    meter: &opentelemetry::metrics::Meter,
    metrics: &Arc<Metrics>,
    mirrors: Mirrors,
) {
    let m = Arc::clone(metrics);
    meter
        .u64_observable_counter("cartscore.tcp.requests")
        .with_description("Binary-protocol requests by outcome")
        .with_callback(move |observer| {
            for status in Status::ALL {
                let count = m
                    .tcp_requests
                    .get_or_create(&OutcomeLabels {
                        outcome: status.label(),
                    })
                    .get();
                observer.observe(count, &[KeyValue::new("outcome", status.label())]);
            }
        })
        .build();
    let m = Arc::clone(metrics);
    meter
        .u64_observable_counter("cartscore.events.applied")
        .with_description("Events applied to the store by source")
        .with_callback(move |observer| {
            for &source in mirrors.event_sources {
                let count = m
                    .events_applied
                    .get_or_create(&SourceLabels { source })
                    .get();
                observer.observe(count, &[KeyValue::new("source", source)]);
            }
        })
        .build();
    let m = Arc::clone(metrics);
    meter
        .u64_observable_counter("cartscore.model.reloads")
        .with_description("Model reloads by outcome")
        .with_callback(move |observer| {
            for &outcome in mirrors.reload_outcomes {
                let count = m
                    .model_reloads
                    .get_or_create(&OutcomeLabels { outcome })
                    .get();
                observer.observe(count, &[KeyValue::new("outcome", outcome)]);
            }
        })
        .build();
    let m = Arc::clone(metrics);
    meter
        .i64_observable_gauge("cartscore.live_sessions")
        .with_description("Sessions held in the store")
        .with_callback(move |observer| observer.observe(m.live_sessions.get(), &[]))
        .build();
    let m = Arc::clone(metrics);
    meter
        .i64_observable_gauge("cartscore.store.used")
        .with_unit("By")
        .with_description("Bytes of the LMDB map in use")
        .with_callback(move |observer| observer.observe(m.store_used_bytes.get(), &[]))
        .build();
    let m = Arc::clone(metrics);
    meter
        .f64_observable_gauge("cartscore.stream.staleness")
        .with_unit("s")
        .with_description("How far the store is behind the stream")
        .with_callback(move |observer| observer.observe(m.stream.staleness.get(), &[]))
        .build();
}
