//! OpenTelemetry export, received by a local OTLP/HTTP listener and decoded
//! with the OTLP protobuf definitions: what an OpenTelemetry Collector gets.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value as NumberValue;
use prost::Message;

use crate::common::{
    Appliance, Options, cart_json, deliver, demo_variant, model_dir_with_demo, view_json,
};

type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// An OTLP/HTTP endpoint: answers every POST with 200 and keeps the bodies.
fn otlp_listener() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received: Received = Arc::default();
    let store = Arc::clone(&received);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let store = Arc::clone(&store);
            std::thread::spawn(move || serve(stream, &store));
        }
    });
    (url, received)
}

fn serve(mut stream: TcpStream, store: &Received) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = request.parse(&buffer) {
            let length: usize = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0);
            if buffer.len() >= head + length {
                let path = request.path.unwrap_or("").to_owned();
                store
                    .lock()
                    .unwrap()
                    .push((path, buffer[head..head + length].to_vec()));
                buffer.drain(..head + length);
                let reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
                if stream.write_all(reply).is_err() {
                    return;
                }
                continue;
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

#[derive(Debug, Default)]
struct Seen {
    spans: Vec<(String, Vec<(String, String)>)>,
    service_names: Vec<String>,
    /// Metric name -> the largest value or count seen in a data point.
    metrics: std::collections::BTreeMap<String, f64>,
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        _ => String::new(),
    }
}

fn decode(received: &Received) -> Seen {
    let mut seen = Seen::default();
    for (path, body) in received.lock().unwrap().iter() {
        match path.as_str() {
            "/v1/traces" => {
                let request = ExportTraceServiceRequest::decode(body.as_slice())
                    .expect("a valid OTLP trace export");
                for resource in request.resource_spans {
                    for attr in resource.resource.iter().flat_map(|r| &r.attributes) {
                        if attr.key == "service.name" {
                            seen.service_names.push(text(attr.value.as_ref()));
                        }
                    }
                    for span in resource.scope_spans.into_iter().flat_map(|s| s.spans) {
                        let attrs = span
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), text(a.value.as_ref())))
                            .collect();
                        seen.spans.push((span.name, attrs));
                    }
                }
            }
            "/v1/metrics" => {
                let request = ExportMetricsServiceRequest::decode(body.as_slice())
                    .expect("a valid OTLP metrics export");
                for metric in request
                    .resource_metrics
                    .into_iter()
                    .flat_map(|r| r.scope_metrics)
                    .flat_map(|s| s.metrics)
                {
                    let number = |v: &Option<NumberValue>| match v {
                        Some(NumberValue::AsInt(i)) => *i as f64,
                        Some(NumberValue::AsDouble(d)) => *d,
                        None => 0.0,
                    };
                    let value = match &metric.data {
                        Some(Data::Sum(sum)) => sum
                            .data_points
                            .iter()
                            .map(|p| number(&p.value))
                            .fold(0.0, f64::max),
                        Some(Data::Gauge(gauge)) => gauge
                            .data_points
                            .iter()
                            .map(|p| number(&p.value))
                            .fold(0.0, f64::max),
                        Some(Data::Histogram(h)) => {
                            h.data_points.iter().map(|p| p.count as f64).sum()
                        }
                        _ => 0.0,
                    };
                    let entry = seen.metrics.entry(metric.name).or_insert(0.0);
                    *entry = entry.max(value);
                }
            }
            other => panic!("unexpected OTLP path {other}"),
        }
    }
    seen
}

fn spans_named<'a>(seen: &'a Seen, name: &str) -> Vec<&'a Vec<(String, String)>> {
    seen.spans
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, a)| a)
        .collect()
}

fn attr<'a>(attrs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    attrs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[test]
fn traces_and_metrics_reach_an_otlp_listener() {
    let (endpoint, received) = otlp_listener();
    let work = tempfile::tempdir().unwrap();
    let models = model_dir_with_demo(work.path());
    let options = Options {
        env: vec![
            ("CARTSCORE_TELEMETRY__OTLP_ENDPOINT".into(), endpoint),
            (
                "CARTSCORE_TELEMETRY__REQUEST_SAMPLE_RATIO".into(),
                "0.5".into(),
            ),
            (
                "CARTSCORE_TELEMETRY__METRICS_INTERVAL_MS".into(),
                "200".into(),
            ),
        ],
        ..Options::default()
    };
    let app = Appliance::start(work.path(), &models, &options);
    let events: String = (0..20)
        .map(|i| view_json("otel", i, 7, 10.0) + "\n")
        .collect();
    assert_eq!(app.post("/v1/events", events).0, 200);
    for _ in 0..20 {
        assert_eq!(app.post("/v1/score", cart_json("otel", 30, 7, 10.0)).0, 200);
    }
    deliver(
        &models,
        "model-otel.onnx",
        &demo_variant(|m| m.model_version = "otel-2".into()),
    );
    app.wait_for_version("otel-2", Duration::from_secs(30));

    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = loop {
        let seen = decode(&received);
        let done = spans_named(&seen, "model.reload")
            .iter()
            .any(|a| attr(a, "cartscore.model.version") == Some("otel-2"))
            && !spans_named(&seen, "ingest.batch").is_empty()
            && spans_named(&seen, "http.request").len() >= 10
            && seen
                .metrics
                .get("cartscore.events.applied")
                .is_some_and(|v| *v >= 20.0)
            && seen
                .metrics
                .get("http.server.request.duration")
                .is_some_and(|v| *v >= 20.0);
        if done || Instant::now() > deadline {
            break seen;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let summary = format!(
        "spans: {:?}\nmetrics: {:?}",
        seen.spans.iter().map(|s| &s.0).collect::<Vec<_>>(),
        seen.metrics
    );
    assert!(
        seen.service_names.iter().all(|s| s == "cartscore") && !seen.service_names.is_empty(),
        "{summary}"
    );

    let reloads = spans_named(&seen, "model.reload");
    let swap = reloads
        .iter()
        .find(|a| attr(a, "cartscore.model.version") == Some("otel-2"))
        .unwrap_or_else(|| panic!("no reload span for otel-2\n{summary}"));
    assert_eq!(
        attr(swap, "cartscore.reload.result"),
        Some("loaded"),
        "{swap:?}"
    );

    let batches = spans_named(&seen, "ingest.batch");
    assert!(
        batches
            .iter()
            .any(|a| attr(a, "cartscore.ingest.events") == Some("20")
                && attr(a, "cartscore.ingest.source") == Some("http")),
        "no 20-event HTTP batch: {batches:?}"
    );

    // 1 in 2 requests sampled: the 20 scores alone give 10.
    let requests = spans_named(&seen, "http.request");
    let scores = requests
        .iter()
        .filter(|a| attr(a, "http.route") == Some("/v1/score"))
        .count();
    assert!(
        (9..=11).contains(&scores),
        "{scores} sampled /v1/score spans of 20\n{summary}"
    );
    assert!(
        requests
            .iter()
            .all(|a| attr(a, "http.response.status_code").is_some())
    );

    assert!(
        seen.metrics["cartscore.events.applied"] >= 20.0,
        "{summary}"
    );
    assert!(
        seen.metrics["http.server.request.duration"] >= 21.0,
        "{summary}"
    );
    for name in [
        "cartscore.tcp.requests",
        "cartscore.model.reloads",
        "cartscore.live_sessions",
        "cartscore.store.used",
    ] {
        assert!(seen.metrics.contains_key(name), "{name} missing\n{summary}");
    }
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn without_an_endpoint_nothing_is_exported() {
    let (endpoint, received) = otlp_listener();
    let work = tempfile::tempdir().unwrap();
    let models = model_dir_with_demo(work.path());
    // The SDK's own variables must not switch export on by themselves.
    let options = Options {
        env: vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint.clone()),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT".into(),
                format!("{endpoint}/v1/traces"),
            ),
        ],
        ..Options::default()
    };
    let app = Appliance::start(work.path(), &models, &options);
    for _ in 0..20 {
        assert_eq!(
            app.post("/v1/score", cart_json("quiet", 30, 7, 10.0)).0,
            200
        );
    }
    std::thread::sleep(Duration::from_millis(1_500));
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
    assert!(
        received.lock().unwrap().is_empty(),
        "exported without an endpoint"
    );
    assert!(!log.contains("OpenTelemetry export enabled"), "{log}");
}
