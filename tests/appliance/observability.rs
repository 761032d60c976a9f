//! The operator's side: the Prometheus alert rules pass promtool (syntax and
//! their unit tests), and every metric the rules and the Grafana dashboard
//! query is one a running appliance exports.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use cartscore_protocol::client::TcpClient;

use crate::broker::{Broker, TestProducer, create_topic, kafka_env, unique};
use crate::common::{Appliance, Options, cart_json, model_dir_with_demo, repo_root, view_json};

/// Runs promtool in the rules' folder; fails the test with its output.
pub fn promtool(args: &[&str]) {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(repo_root().join("configs/prometheus"))
        .output()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    assert!(
        output.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    promtool(&["check", "rules", "cartscore-alerts.yml"]);
    promtool(&["test", "rules", "cartscore-alerts.test.yml"]);
}

/// `cartscore_*` names in a text, as exported (histograms by their series).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("cartscore_") {
        let start = i + found;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        names.insert(text[start..end].to_owned());
        i = end;
    }
    names
}

#[test]
fn the_rules_and_the_dashboard_query_only_exported_metrics() {
    let rules =
        std::fs::read_to_string(repo_root().join("configs/prometheus/cartscore-alerts.yml"))
            .unwrap();
    let dashboard =
        std::fs::read_to_string(repo_root().join("configs/grafana/cartscore-dashboard.json"))
            .unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let mut exprs = String::new();
    for panel in parsed["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push_str(target["expr"].as_str().unwrap());
            exprs.push('\n');
        }
    }
    assert!(exprs.lines().count() >= 20, "dashboard has too few queries");
    let mut wanted = metric_names(&rules);
    wanted.extend(metric_names(&exprs));

    // An appliance with every source active: Kafka, HTTP and TCP traffic,
    // a rejected event and a malformed frame.
    let brokers = Broker::shared();
    let (raw, invalid) = (unique("obs-raw"), unique("obs-invalid"));
    create_topic(brokers, &raw, 1);
    create_topic(brokers, &invalid, 1);
    let work = tempfile::tempdir().unwrap();
    let models = model_dir_with_demo(work.path());
    let options = Options {
        env: [
            kafka_env(brokers, "obs", &[&raw]),
            vec![("CARTSCORE_KAFKA__INVALID_TOPIC".into(), invalid.clone())],
        ]
        .concat(),
        ..Options::default()
    };
    let app = Appliance::start(work.path(), &models, &options);
    let producer = TestProducer::new(brokers);
    producer.send(
        &raw,
        0,
        Some("obs"),
        Some(view_json("obs", 1, 7, 10.0).as_bytes()),
    );
    producer.send(&raw, 0, Some("obs"), Some(b"{not json"));
    producer.flush();
    assert_eq!(
        app.post("/v1/events", view_json("obs-http", 1, 7, 10.0)).0,
        200
    );
    assert_eq!(
        app.post("/v1/events", view_json("obs-http", 2, 7, -1.0)).0,
        200
    );
    assert_eq!(
        app.post("/v1/score", cart_json("obs-http", 30, 7, 10.0)).0,
        200
    );
    let mut client = TcpClient::connect(app.tcp).unwrap();
    let cart = cartscore_core::Event::from_json(cart_json("obs", 30, 7, 10.0).as_bytes()).unwrap();
    client.score(&cart).unwrap();
    // The scored cart's purchase resolves its outcome: the live metrics.
    let purchase = cart_json("obs-http", 40, 7, 10.0).replace("\"cart\"", "\"purchase\"");
    assert_eq!(app.post("/v1/events", purchase).0, 200);
    let mut bad = TcpClient::connect(app.tcp).unwrap();
    bad.send_raw(&[0xff; 16]);
    bad.flush().unwrap();
    let _ = bad.recv();

    let deadline = Instant::now() + Duration::from_secs(30);
    let missing = loop {
        let exported = app.get_text("/metrics");
        let missing: Vec<&String> = wanted
            .iter()
            .filter(|name| {
                // A histogram may be named by its family (in prose) or a series.
                let series = [name.to_string(), format!("{name}_bucket")];
                !exported.lines().any(|l| {
                    series.iter().any(|s| {
                        l.strip_prefix(s.as_str())
                            .is_some_and(|rest| rest.starts_with(['{', ' ']))
                    })
                })
            })
            .collect();
        if missing.is_empty() || Instant::now() > deadline {
            break missing.into_iter().cloned().collect::<Vec<_>>();
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\nqueried: {wanted:?}"
    );
    println!(
        "{} metric names queried by the rules and the dashboard, all exported",
        wanted.len()
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}
