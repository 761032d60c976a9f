//! The closed loop on synthetic data with a known oracle: thousands of
//! carts scored one by one just before they are ingested, resolved by the
//! stream with the trainer's label, must give the live ROC-AUC and
//! reliability table computed offline from `cartscore-trainer predict`; the
//! same traffic keeps every drift index low, and the traffic with its
//! prices multiplied by 3 drives the price's index over the alert line and
//! fires the shipped alert rule in promtool.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{Appliance, Options, TestDatabase, repo_root, run_ok, trainer};
use cartscore_core::{BundleMetadata, CsvLayout, Event, EventType, FEATURE_COUNT, FEATURE_NAMES};
use serde_json::Value;

/// The rule's description, as the shipped file has it.
const DRIFT_DESCRIPTION: &str = "The serving model's scored rows no longer look like what it was trained on (GET /v1/model, drift). Check the upstream data of that feature (units, a new catalogue, a pipeline change) before trusting the scores; retrain if the change is real.";

/// One cart as `cartscore-trainer predict` saw it.
#[derive(Debug)]
pub struct Offline {
    pub session: String,
    pub product_id: u64,
    pub features: [f32; FEATURE_COUNT],
    pub probability: f32,
    pub label: bool,
    pub event_time: String,
    /// With `--explain`: each feature's contribution, then the base value.
    pub shap: Option<Vec<f64>>,
}

/// `cartscore-trainer predict` on `input` with the demo model.
pub fn offline_predictions(work: &Path, input: &Path) -> Vec<Offline> {
    predict_with(work, input, &crate::common::demo_model(), &[])
}

/// `cartscore-trainer predict` on `input` with `model` and `extra` flags;
/// its output is `<work>/<model's folder name>-offline.csv`.
pub fn predict_with(work: &Path, input: &Path, model: &Path, extra: &[&str]) -> Vec<Offline> {
    let folder = model
        .parent()
        .and_then(Path::file_name)
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let out = work.join(format!("{folder}-offline.csv"));
    let stdout = run_ok(
        Command::new(trainer())
            .arg("predict")
            .arg("--input")
            .arg(input)
            .arg("--model")
            .arg(model)
            .arg("--out")
            .arg(&out)
            .args(extra),
    );
    print!("{stdout}");
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
    let shap_columns: Option<Vec<usize>> =
        header
            .iter()
            .position(|h| h == "shap_base_value")
            .map(|base| {
                FEATURE_NAMES
                    .iter()
                    .map(|n| column(&format!("shap_{n}")))
                    .chain([base])
                    .collect()
            });
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
                shap: shap_columns
                    .as_ref()
                    .map(|columns| columns.iter().map(|&c| r[c].parse().unwrap()).collect()),
            }
        })
        .collect()
}

impl Offline {
    /// Fails unless `event`, the `i`th cart replayed, is this offline row.
    pub fn assert_is(&self, i: usize, event: &Event) {
        assert_eq!(
            (self.session.as_str(), self.product_id),
            (event.user_session.as_str(), event.product_id),
            "cart {i} is not the offline row {i}"
        );
    }
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct Replayed {
    pub carts: usize,
    pub invalid: usize,
    pub last_micros: i64,
}

/// Replays `input` in order into the appliance over HTTP: each cart is
/// handed to `score` just before it is ingested, with everything before it
/// applied. `edit` may change each event first.
pub fn replay_scoring(
    app: &Appliance,
    input: &Path,
    edit: impl Fn(&mut Event),
    mut score: impl FnMut(usize, &Event, &str),
) -> Replayed {
    // Flexible: a data set's last line may be cut short, and must reach validation.
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(input)
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
    let mut replayed = Replayed::default();
    let mut record = csv::ByteRecord::new();
    while reader.read_byte_record(&mut record).unwrap() {
        let mut event = match Event::from_csv(&record, &layout) {
            Ok(event) => event,
            Err(_) => {
                replayed.invalid += 1;
                continue;
            }
        };
        edit(&mut event);
        let json = event.to_json().to_string();
        if event.event_type == EventType::Cart {
            flush(&mut pending);
            score(replayed.carts, &event, &json);
            replayed.carts += 1;
        }
        replayed.last_micros = replayed.last_micros.max(event.event_time.micros());
        pending.push(json);
        if pending.len() >= 1_000 {
            flush(&mut pending);
        }
    }
    flush(&mut pending);
    replayed
}

/// Moves the event-time watermark two days past `last_micros`, so the sweep
/// resolves every pending cart, and returns `version`'s live quality once
/// none is pending.
pub fn resolve_all(app: &Appliance, last_micros: i64, version: &str) -> Value {
    let sentinel = format!(
        r#"{{"event_time":{},"event_type":"view","product_id":1,"category_id":1,"category_code":"","brand":"","price":1.0,"user_id":1,"user_session":"closed-loop-sentinel"}}"#,
        last_micros + 2 * 86_400 * 1_000_000
    );
    let (status, body) = app.post("/v1/events", sentinel);
    assert_eq!(status, 200, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, model) = app.get("/v1/model");
        if model["outcomes_pending"] == 0
            && model["live"][version]["count"].as_u64().unwrap_or(0) > 0
        {
            return model["live"][version].clone();
        }
        assert!(Instant::now() < deadline, "outcomes still pending: {model}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The carts the store keeps one record of: the first of each (session,
/// product, cart time).
pub fn first_records(offline: &[Offline]) -> Vec<(f32, bool)> {
    let mut seen = HashSet::new();
    offline
        .iter()
        .filter(|o| seen.insert((o.session.clone(), o.product_id, o.event_time.clone())))
        .map(|o| (o.probability, o.label))
        .collect()
}

/// ROC-AUC by counting pairs, independent of the appliance's ranks: a tie
/// is one half.
pub fn pair_counted_auc(pairs: &[(f32, bool)]) -> f64 {
    let positives: Vec<f32> = pairs.iter().filter(|(_, y)| *y).map(|(p, _)| *p).collect();
    let negatives: Vec<f32> = pairs.iter().filter(|(_, y)| !*y).map(|(p, _)| *p).collect();
    let mut wins = 0.0;
    for &p in &positives {
        for &q in &negatives {
            wins += if p > q {
                1.0
            } else if p == q {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (positives.len() * negatives.len()) as f64
}

/// Checks the live quality against the offline carts: count, positives,
/// ROC-AUC within 1e-9; returns both AUCs.
pub fn assert_live_equals_offline(live: &Value, expected: &[(f32, bool)]) -> (f64, f64) {
    assert_eq!(live["count"], expected.len(), "{live}");
    let positives = expected.iter().filter(|(_, y)| *y).count();
    assert_eq!(live["positives"], positives, "{live}");
    let offline_auc = pair_counted_auc(expected);
    let live_auc = live["roc_auc"].as_f64().unwrap();
    assert!(
        (live_auc - offline_auc).abs() < 1e-9,
        "live ROC-AUC {live_auc} offline {offline_auc}"
    );
    (live_auc, offline_auc)
}

pub fn synthetic(work: &Path, events: u64, seed: u64) -> (PathBuf, PathBuf) {
    let (csv, oracle) = (work.join("synthetic.csv"), work.join("oracle.csv"));
    let status = Command::new(trainer())
        .args([
            "synth",
            "--events",
            &events.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .arg("--out")
        .arg(&csv)
        .arg("--oracle")
        .arg(&oracle)
        .env("RUST_BACKTRACE", "0")
        .status()
        .unwrap();
    assert!(status.success());
    (csv, oracle)
}

fn score(app: &Appliance, json: &str) -> f32 {
    let (status, body) = app.post("/v1/score", json);
    assert_eq!(status, 200, "{body}");
    body["probability"].as_f64().unwrap() as f32
}

/// The drift report's index per feature name.
fn psi_by_feature(model: &Value) -> Vec<(String, f64)> {
    model["drift"]["features"]
        .as_array()
        .unwrap_or_else(|| panic!("no drift in {model}"))
        .iter()
        .map(|f| {
            (
                f["feature"].as_str().unwrap().to_owned(),
                f["psi"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// `cartscore-trainer outcomes` once into a fresh warehouse: every
/// resolved cart lands once (a second copy adds nothing), and the
/// warehouse's `live.quality` view computes the appliance's ROC-AUC in SQL.
fn assert_the_warehouse_copy_agrees(app: &Appliance, resolved: usize, live_auc: f64) {
    let warehouse = TestDatabase::new("live");
    let copy = || {
        let stdout = run_ok(Command::new(trainer()).args([
            "outcomes",
            "--appliance",
            &app.http,
            "--postgres",
            &warehouse.url,
        ]));
        serde_json::from_str::<Value>(&stdout).unwrap()
    };
    let first = copy();
    assert_eq!(first["added"], resolved, "{first}");
    let again = copy();
    assert_eq!(again["added"], 0, "{again}");
    assert_eq!(again["next_seq"], first["next_seq"], "{again}");
    let row = warehouse
        .client()
        .query_one(
            "SELECT outcomes, roc_auc::float8 FROM live.quality WHERE model_version = 'demo-1' AND scored_as = 'served'",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, i64>(0) as usize, resolved);
    let sql_auc: f64 = row.get(1);
    assert!(
        (sql_auc - live_auc).abs() < 1e-9,
        "warehouse ROC-AUC {sql_auc}, appliance {live_auc}"
    );
}

#[test]
fn synthetic_carts_resolve_to_the_offline_auc_and_calibration_and_stay_in_distribution() {
    let work = tempfile::tempdir().unwrap();
    // The demo model's own data (scripts/build-demo-model.sh): its training
    // window, then the validation and test windows it was never fitted on.
    // The generator draws its catalogue (brands, categories, prices) from
    // the seed, so another seed is another shop, not the same population.
    let (input, _oracle) = synthetic(work.path(), 200_000, 7);
    let offline = offline_predictions(work.path(), &input);
    assert!(offline.len() >= 2_000, "{} carts", offline.len());

    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    let mut mismatches = 0usize;
    let replayed = replay_scoring(
        &app,
        &input,
        |_| {},
        |i, event, json| {
            let expected = &offline[i];
            expected.assert_is(i, event);
            // `predict` scores with the serving evaluator: the same f32.
            let live = score(&app, json);
            mismatches += usize::from(live != expected.probability);
        },
    );
    assert_eq!(replayed.carts, offline.len());
    assert_eq!(mismatches, 0, "live scores differ from offline predict");

    let live = resolve_all(&app, replayed.last_micros, "demo-1");
    let expected = first_records(&offline);
    let (live_auc, offline_auc) = assert_live_equals_offline(&live, &expected);
    assert_the_warehouse_copy_agrees(&app, expected.len(), live_auc);

    // The reliability table, computed here from the offline probabilities
    // over the same ten equal-width bins.
    let table = live["reliability"].as_array().unwrap();
    assert_eq!(table.len(), 10);
    for (b, bin) in table.iter().enumerate() {
        let members: Vec<&(f32, bool)> = expected
            .iter()
            .filter(|(p, _)| ((f64::from(*p) * 10.0) as usize).min(9) == b)
            .collect();
        assert_eq!(bin["count"], members.len(), "bin {b}: {bin}");
        if members.is_empty() {
            continue;
        }
        let n = members.len() as f64;
        let mean_p = members.iter().map(|(p, _)| f64::from(*p)).sum::<f64>() / n;
        let observed = members.iter().filter(|(_, y)| *y).count() as f64 / n;
        // The offline file carries f32 probabilities to 9 decimals: below
        // an f32 step near 1 (6e-8) they agree, not to the last bit.
        assert!(
            (bin["mean_predicted"].as_f64().unwrap() - mean_p).abs() < 1e-7,
            "bin {b}: {bin} vs {mean_p}"
        );
        assert!(
            (bin["observed_rate"].as_f64().unwrap() - observed).abs() < 1e-12,
            "bin {b}: {bin} vs {observed}"
        );
    }

    // Same generator, same population: no feature, and not the score, drifts.
    let (_, model) = app.get("/v1/model");
    assert_eq!(model["drift"]["model_version"], "demo-1", "{model}");
    let rows = model["drift"]["rows"].as_u64().unwrap();
    assert_eq!(rows as usize, offline.len().min(10_000), "{model}");
    let psi = psi_by_feature(&model);
    assert_eq!(psi.len(), FEATURE_COUNT);
    // The same index computed here from the offline rows with the bundle's
    // profile: the live one is it.
    let (_, bundle) = BundleMetadata::read_file(&crate::common::demo_model()).unwrap();
    let profile = bundle.profile.expect("the demo bundle has a data profile");
    for (column, (feature, live_psi)) in psi.iter().enumerate() {
        let histogram = &profile.features[column].histogram;
        let mut counts = vec![0u64; histogram.slots()];
        for o in &offline {
            counts[histogram.slot(o.features[column])] += 1;
        }
        let offline_psi = histogram.psi(&counts).unwrap();
        assert!(
            (live_psi - offline_psi).abs() < 1e-9,
            "{feature}: live PSI {live_psi} offline {offline_psi}"
        );
    }
    // Every feature stays under 0.1 but the weekday: the 15 days scored
    // have another mix of weekdays than the first 11 the profile is of
    // (0.115, computed above the same way offline): calendar, not drift.
    let drifted: Vec<&(String, f64)> = psi
        .iter()
        .filter(|(f, p)| *p >= 0.1 && f != "weekday")
        .collect();
    assert!(
        drifted.is_empty(),
        "in-distribution traffic drifted: {psi:?}"
    );
    let worst = psi
        .iter()
        .filter(|(f, _)| f != "weekday")
        .cloned()
        .fold((String::new(), 0.0), |a, b| if b.1 > a.1 { b } else { a });
    let score_psi = model["drift"]["score_psi"].as_f64().unwrap();
    assert!(score_psi < 0.1, "score PSI {score_psi}");
    println!(
        "closed loop (synthetic, the demo model's data): {} carts, {} resolved ({} positive), live ROC-AUC {live_auc} = offline {offline_auc}; drift over {rows} rows: worst feature but the weekday {} PSI {:.4}, weekday {:.4}, score PSI {score_psi:.4}",
        offline.len(),
        expected.len(),
        expected.iter().filter(|(_, y)| *y).count(),
        worst.0,
        worst.1,
        psi[3].1
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn prices_in_another_unit_drift_the_price_and_fire_the_alert_rule() {
    let work = tempfile::tempdir().unwrap();
    let (input, _oracle) = synthetic(work.path(), 200_000, 7);
    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    let replayed = replay_scoring(
        &app,
        &input,
        |event| event.price *= 3.0,
        |_, _, json| {
            score(&app, json);
        },
    );
    assert!(replayed.carts >= 2_000, "{} carts", replayed.carts);
    let (_, model) = app.get("/v1/model");
    let psi = psi_by_feature(&model);
    let of = |name: &str| psi.iter().find(|(f, _)| f == name).unwrap().1;
    assert!(of("price") > 0.25, "price PSI {}: {psi:?}", of("price"));
    // The catalogue's brands and categories are the training data's, so
    // they stay put; a ratio of two prices in the same unit does not move.
    assert!(
        of("brand_freq") < 0.1,
        "brand_freq PSI {}",
        of("brand_freq")
    );
    assert!(
        of("price_to_mean_view_price") < 0.1,
        "price_to_mean_view_price PSI {}",
        of("price_to_mean_view_price")
    );

    // The shipped rule, fed what this appliance exports.
    let metrics = app.get_text("/metrics");
    let rows = app.metric("cartscore_drift_rows");
    assert_eq!(rows as usize, replayed.carts.min(10_000));
    let mut series = vec![format!(
        "      - series: 'cartscore_drift_rows{{job=\"cartscore\",instance=\"a\"}}'\n        values: '{rows}x60'\n"
    )];
    let mut firing = Vec::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("cartscore_feature_psi{feature=\"") else {
            continue;
        };
        let (feature, value) = rest.split_once("\"} ").unwrap();
        let value: f64 = value.trim().parse().unwrap();
        series.push(format!(
            "      - series: 'cartscore_feature_psi{{job=\"cartscore\",instance=\"a\",feature=\"{feature}\"}}'\n        values: '{value}x60'\n"
        ));
        if value > 0.25 {
            firing.push(format!(
                "          - exp_labels: {{severity: warn, job: cartscore, instance: a, feature: {feature}}}\n            exp_annotations:\n              summary: \"cartscore on a: feature {feature} has drifted from the training window (PSI {value:.2})\"\n              description: \"{DRIFT_DESCRIPTION}\"\n"
            ));
        }
    }
    assert!(
        firing.iter().any(|f| f.contains("feature: price}")),
        "{firing:?}"
    );
    let rules = repo_root().join("configs/prometheus/cartscore-alerts.yml");
    let test = format!(
        "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{}    alert_rule_test:\n      - eval_time: 10m\n        alertname: CartscoreFeatureDrift\n        exp_alerts: []\n      - eval_time: 20m\n        alertname: CartscoreFeatureDrift\n        exp_alerts:\n{}",
        rules.display(),
        series.concat(),
        firing.concat()
    );
    let test_file = work.path().join("drift.test.yml");
    std::fs::write(&test_file, &test).unwrap();
    println!("{test}");
    crate::observability::promtool(&["test", "rules", test_file.to_str().unwrap()]);
    println!("drift (prices x3): {psi:?}");
    println!(
        "drift (prices x3, {} carts): price PSI {:.3}; {} feature(s) over 0.25 fire CartscoreFeatureDrift in promtool",
        replayed.carts,
        of("price"),
        firing.len()
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}
