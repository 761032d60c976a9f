//! The skew test: the real data slice replayed in order into the running
//! appliance, every cart scored over HTTP and TCP just before it is ingested,
//! must give exactly what the offline `cartscore-trainer predict` gives.

use std::process::Command;

use crate::common::{Appliance, Options, dataset, trainer};
use cartscore_core::{CsvLayout, Event, EventType, FEATURE_COUNT, FEATURE_NAMES};
use cartscore_protocol::Status;
use cartscore_protocol::client::TcpClient;

const TOLERANCE: f64 = 1e-6;

#[derive(Debug)]
struct Offline {
    session: String,
    product_id: u64,
    features: [f32; FEATURE_COUNT],
    probability: f32,
    label: bool,
    event_time: String,
}

fn offline_predictions(work: &std::path::Path) -> Vec<Offline> {
    let out = work.join("offline.csv");
    let status = Command::new(trainer())
        .arg("predict")
        .arg("--input")
        .arg(dataset())
        .arg("--model")
        .arg(crate::common::demo_model())
        .arg("--out")
        .arg(&out)
        .env("RUST_BACKTRACE", "0")
        .status()
        .unwrap();
    assert!(status.success());
    let mut reader = csv::Reader::from_path(&out).unwrap();
    let header = reader.headers().unwrap().clone();
    let column = |name: &str| header.iter().position(|h| h == name).unwrap();
    let (session, product, probability, label, time) = (
        column("user_session"),
        column("product_id"),
        column("probability"),
        column("label"),
        column("event_time"),
    );
    let feature_columns: Vec<usize> = FEATURE_NAMES.iter().map(|n| column(n)).collect();
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            let mut features = [0f32; FEATURE_COUNT];
            for (i, c) in feature_columns.iter().enumerate() {
                features[i] = r[*c].parse().unwrap();
            }
            Offline {
                session: r[session].to_owned(),
                product_id: r[product].parse().unwrap(),
                features,
                probability: r[probability].parse().unwrap(),
                label: &r[label] == "1",
                event_time: r[time].to_owned(),
            }
        })
        .collect()
}

#[test]
fn live_scores_equal_offline_predict_on_the_real_slice() {
    let work = tempfile::tempdir().unwrap();
    let offline = offline_predictions(work.path());
    assert!(offline.len() > 100, "the slice has {} carts", offline.len());

    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    let mut tcp = TcpClient::connect(app.tcp).unwrap();

    // Flexible: the slice's last line is cut short, and must reach validation.
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(dataset())
        .unwrap();
    let layout = CsvLayout::from_header(reader.byte_headers().unwrap()).unwrap();
    let mut pending: Vec<String> = Vec::new();
    let flush = |pending: &mut Vec<String>| {
        if pending.is_empty() {
            return;
        }
        let (status, body) = app.post("/v1/events", format!("[{}]", pending.join(",")));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["applied"], pending.len(), "{body}");
        pending.clear();
    };

    let (mut carts, mut invalid, mut known, mut worst) = (0usize, 0usize, 0usize, 0f64);
    let mut differences = Vec::new();
    let mut record = csv::ByteRecord::new();
    while reader.read_byte_record(&mut record).unwrap() {
        let event = match Event::from_csv(&record, &layout) {
            Ok(event) => event,
            Err(_) => {
                invalid += 1;
                continue;
            }
        };
        let json = event.to_json().to_string();
        if event.event_type == EventType::Cart {
            flush(&mut pending);
            let expected = &offline[carts];
            assert_eq!(
                (expected.session.as_str(), expected.product_id),
                (event.user_session.as_str(), event.product_id),
                "cart {carts} is not the offline row {carts}"
            );
            let (status, http) = app.post("/v1/score?explain=true", &json);
            assert_eq!(status, 200, "{http}");
            let over_tcp = tcp.score(&event).unwrap();
            assert_eq!(over_tcp.status, Status::Ok, "{}", over_tcp.message);
            assert_eq!(over_tcp.model_version, "demo-1");
            assert_eq!(http["session_known"], over_tcp.session_known);
            known += usize::from(over_tcp.session_known);

            // JSON carries each f32 in its shortest form; read it back as f32.
            let as_f32 = |v: &serde_json::Value| v.as_f64().unwrap() as f32;
            let http_probability = as_f32(&http["probability"]);
            let mut check = |what: &str, live: f32, offline: f32| {
                let diff = (f64::from(live) - f64::from(offline)).abs();
                worst = worst.max(diff);
                if diff > TOLERANCE {
                    differences.push(format!(
                        "cart {carts} {what}: live {live} offline {offline}"
                    ));
                }
            };
            check("probability (HTTP)", http_probability, expected.probability);
            check(
                "probability (TCP)",
                over_tcp.probability,
                expected.probability,
            );
            for (i, name) in FEATURE_NAMES.iter().enumerate() {
                let live = as_f32(&http["features"][name]);
                check(name, live, expected.features[i]);
            }
            carts += 1;
        }
        pending.push(json);
    }
    flush(&mut pending);

    assert_eq!(carts, offline.len(), "every offline cart was scored live");
    assert_eq!(invalid, 1, "the slice's one truncated last line");
    assert!(known > 0, "some carts continue a known session");
    assert!(
        differences.is_empty(),
        "{} differences beyond {TOLERANCE}:\n{}",
        differences.len(),
        differences.join("\n")
    );
    println!(
        "skew: {carts} carts ({known} in known sessions), {} feature values and {} probabilities compared, max |diff| {worst:e}",
        carts * FEATURE_COUNT,
        carts * 2
    );

    // The closed loop: every scored cart was recorded; an event a day after
    // the slice moves the watermark past every session's expiry, so the
    // sweep resolves the rest negative. The live quality must be the
    // offline one over the same carts (a cart scored twice, or two cart
    // events of one product at the same time, is one record: the first).
    let (status, body) = app.post(
        "/v1/events",
        crate::common::view_json("closed-loop-sentinel", 2 * 86_400, 1, 1.0),
    );
    assert_eq!(status, 200, "{body}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let live = loop {
        let (_, model) = app.get("/v1/model");
        if model["outcomes_pending"] == 0
            && model["live"]["demo-1"]["count"].as_u64().unwrap_or(0) > 0
        {
            break model["live"]["demo-1"].clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "outcomes still pending: {model}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let mut seen = std::collections::HashSet::new();
    let expected: Vec<(f32, bool)> = offline
        .iter()
        .filter(|o| seen.insert((o.session.clone(), o.product_id, o.event_time.clone())))
        .map(|o| (o.probability, o.label))
        .collect();
    assert_eq!(live["count"], expected.len(), "{live}");
    let positives = expected.iter().filter(|(_, y)| *y).count();
    assert_eq!(live["positives"], positives, "{live}");
    // Pair counting, independent of the appliance's ranks: a tie is one half.
    let mut wins = 0.0;
    for &(p, _) in expected.iter().filter(|(_, y)| *y) {
        for &(q, _) in expected.iter().filter(|(_, y)| !*y) {
            wins += if p > q {
                1.0
            } else if p == q {
                0.5
            } else {
                0.0
            };
        }
    }
    let offline_auc = wins / (positives * (expected.len() - positives)) as f64;
    let live_auc = live["roc_auc"].as_f64().unwrap();
    assert!(
        (live_auc - offline_auc).abs() < 1e-9,
        "live ROC-AUC {live_auc} offline {offline_auc}"
    );
    let (status, page) = app.get("/v1/outcomes?limit=10000");
    assert_eq!(status, 200, "{page}");
    let paged = page["outcomes"].as_array().unwrap();
    assert_eq!(paged.len(), expected.len());
    assert_eq!(
        paged.iter().filter(|o| o["label"] == true).count(),
        positives
    );
    let metrics = app.get_text("/metrics");
    assert!(
        metrics.contains("cartscore_live_roc_auc{model_version=\"demo-1\"}"),
        "{metrics}"
    );
    println!(
        "closed loop: {} carts resolved ({positives} positive), live ROC-AUC {live_auc} = offline {offline_auc}",
        expected.len()
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}
