//! The skew test: the real data slice replayed in order into the running
//! appliance, every cart scored over HTTP and TCP just before it is ingested,
//! must give exactly what the offline `cartscore-trainer predict` gives.

use crate::closed_loop::{
    assert_live_equals_offline, first_records, offline_predictions, replay_scoring, resolve_all,
};
use crate::common::{Appliance, Options, dataset};
use cartscore_core::{FEATURE_COUNT, FEATURE_NAMES};
use cartscore_protocol::Status;
use cartscore_protocol::client::TcpClient;

const TOLERANCE: f64 = 1e-6;

#[test]
fn live_scores_equal_offline_predict_on_the_real_slice() {
    let work = tempfile::tempdir().unwrap();
    let offline = offline_predictions(work.path(), &dataset());
    assert!(offline.len() > 100, "the slice has {} carts", offline.len());

    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    let mut tcp = TcpClient::connect(app.tcp).unwrap();

    let (mut known, mut worst) = (0usize, 0f64);
    let mut differences = Vec::new();
    let replayed = replay_scoring(
        &app,
        &dataset(),
        |_| {},
        |carts, event, json| {
            let expected = &offline[carts];
            expected.assert_is(carts, event);
            let (status, http) = app.post("/v1/score?explain=true", json);
            assert_eq!(status, 200, "{http}");
            let over_tcp = tcp.score(event).unwrap();
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
        },
    );
    let carts = replayed.carts;
    assert_eq!(carts, offline.len(), "every offline cart was scored live");
    assert_eq!(replayed.invalid, 1, "the slice's one truncated last line");
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
    let live = resolve_all(&app, replayed.last_micros, "demo-1");
    let expected = first_records(&offline);
    let positives = expected.iter().filter(|(_, y)| *y).count();
    let (live_auc, offline_auc) = assert_live_equals_offline(&live, &expected);
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
