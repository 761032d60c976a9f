//! Challenger models and explanations against the real binary: a second
//! bundle trained by `cartscore-trainer` scores every cart beside the demo
//! model exactly as `predict` scores it with that bundle, and both are
//! judged on the same resolved carts; canary sessions stay on the
//! challenger; promote and rollback move the files under TCP and HTTP load
//! with no failed request and survive restarts; the TreeSHAP contributions
//! equal LightGBM's own and an independent check by the `shap` package.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use crate::closed_loop::{
    Offline, first_records, pair_counted_auc, predict_with, replay_scoring, resolve_all, synthetic,
};
use crate::common::{
    Appliance, Load, Options, cart_json, dataset, demo_model, repo_root, run_ok, trainer,
};
use cartscore_core::{Event, FEATURE_COUNT, FEATURE_NAMES};
use cartscore_protocol::Status;
use cartscore_protocol::client::TcpClient;
use serde_json::Value;

const CHALLENGER: &str = "challenger-1";

/// The synthetic events (the demo model's own generator and seed, fewer of
/// them) and a challenger trained on them: another model of the same
/// contract, trained once per test run.
fn challenger() -> &'static (PathBuf, PathBuf) {
    static TRAINED: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    TRAINED.get_or_init(|| {
        let work = tempfile::tempdir().unwrap().keep();
        let (input, _oracle) = synthetic(&work, 60_000, 7);
        let out = work.join("challenger");
        run_ok(
            Command::new(trainer())
                .arg("train")
                .arg("--input")
                .arg(&input)
                .arg("--out")
                .arg(&out)
                .args(["--trials", "1", "--threads", "2", "--seed", "3"])
                .args(["--max-iterations", "40", "--model-version", CHALLENGER]),
        );
        (input, out)
    })
}

/// A model folder with the demo bundle, and the challenger in `shadow/`.
fn folders(work: &Path) -> PathBuf {
    let models = crate::common::model_dir_with_demo(work);
    let shadow = models.join("shadow");
    std::fs::create_dir_all(&shadow).unwrap();
    std::fs::copy(
        challenger().1.join("model.onnx"),
        shadow.join("challenger.onnx"),
    )
    .unwrap();
    models
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn the_shadow_scores_as_predict_does_and_both_models_are_judged_on_the_same_carts() {
    let work = tempfile::tempdir().unwrap();
    let (input, challenger_dir) = challenger();
    let primary = predict_with(work.path(), input, &demo_model(), &[]);
    let shadow = predict_with(work.path(), input, &challenger_dir.join("model.onnx"), &[]);
    assert!(primary.len() > 1_000, "{} carts", primary.len());
    let models = folders(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    let (_, model) = app.get("/v1/model");
    assert_eq!(model["model"]["model_version"], "demo-1", "{model}");
    assert_eq!(model["challenger"]["model_version"], CHALLENGER, "{model}");
    let mut tcp = TcpClient::connect(app.tcp).unwrap();
    let mut skew = Vec::new();
    let replayed = replay_scoring(
        &app,
        input,
        |_| {},
        |i, event, json| {
            primary[i].assert_is(i, event);
            let (status, answer) = app.post("/v1/score?shadow=true", json);
            assert_eq!(status, 200, "{answer}");
            let as_f32 = |v: &Value| v.as_f64().unwrap() as f32;
            assert_eq!(answer["model_version"], "demo-1");
            assert_eq!(answer["shadow"]["model_version"], CHALLENGER, "{answer}");
            // The same f32 as offline, to the bit: skew 0.
            if as_f32(&answer["probability"]) != primary[i].probability
                || as_f32(&answer["shadow"]["probability"]) != shadow[i].probability
            {
                skew.push(format!(
                    "cart {i}: {answer} vs {} / {}",
                    primary[i].probability, shadow[i].probability
                ));
            }
            // Without shadow=true the answer is the primary's alone.
            let over_tcp = tcp.score(event).unwrap();
            assert_eq!(over_tcp.status, Status::Ok);
            assert_eq!(
                (over_tcp.model_version.as_str(), over_tcp.probability),
                ("demo-1", primary[i].probability)
            );
        },
    );
    assert!(
        skew.is_empty(),
        "{} carts differ:\n{}",
        skew.len(),
        skew.join("\n")
    );
    assert_eq!(replayed.carts, primary.len());

    resolve_all(&app, replayed.last_micros, "demo-1");
    let (_, model) = app.get("/v1/model");
    let comparison = &model["comparison"][0];
    assert_eq!(comparison["champion"], "demo-1", "{model}");
    assert_eq!(comparison["challenger"], CHALLENGER, "{model}");
    let first_primary = first_records(&primary);
    let first_shadow = first_records(&shadow);
    assert_eq!(comparison["count"], first_primary.len());
    for (quality, expected) in [
        (&comparison["champion_quality"], &first_primary),
        (&comparison["challenger_quality"], &first_shadow),
    ] {
        let live = quality["roc_auc"].as_f64().unwrap();
        let offline = pair_counted_auc(expected);
        assert!(
            (live - offline).abs() < 1e-9,
            "live {live} offline {offline}"
        );
    }
    // Agreement, computed here from the two offline files.
    let pairs: Vec<(f64, f64)> = first_primary
        .iter()
        .zip(&first_shadow)
        .map(|((p, _), (q, _))| (f64::from(*p), f64::from(*q)))
        .collect();
    let n = pairs.len() as f64;
    let mean_abs = pairs.iter().map(|(p, q)| (p - q).abs()).sum::<f64>() / n;
    let flips = pairs
        .iter()
        .filter(|(p, q)| (*p >= 0.5) != (*q >= 0.5))
        .count() as f64
        / n;
    let agreement = &comparison["agreement"];
    assert!(
        (agreement["mean_abs_diff"].as_f64().unwrap() - mean_abs).abs() < 1e-9,
        "{agreement}"
    );
    assert_eq!(
        agreement["flip_share"].as_f64().unwrap(),
        flips,
        "{agreement}"
    );
    let metrics = app.get_text("/metrics");
    for series in [
        format!(
            "cartscore_comparison_roc_auc{{model_version=\"{CHALLENGER}\",role=\"challenger\"}}"
        ),
        "cartscore_comparison_roc_auc{model_version=\"demo-1\",role=\"champion\"}".to_owned(),
        format!(
            "cartscore_agreement_flip_share{{champion=\"demo-1\",challenger=\"{CHALLENGER}\"}}"
        ),
    ] {
        assert!(metrics.contains(&series), "{series} missing");
    }
    let shadow_scored = app.metric("cartscore_pair_scores_total{mode=\"shadow\",outcome=\"ok\"}");
    assert!(
        shadow_scored >= 2.0 * primary.len() as f64,
        "{shadow_scored}"
    );
    println!(
        "shadow: {} carts, primary and challenger equal predict's to the bit; on {} resolved carts: demo-1 ROC-AUC {}, {CHALLENGER} {}, mean |dp| {mean_abs:.4}, flips {flips:.4}, rank correlation {}",
        primary.len(),
        first_primary.len(),
        comparison["champion_quality"]["roc_auc"],
        comparison["challenger_quality"]["roc_auc"],
        agreement["rank_correlation"]
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn canary_sessions_stay_on_the_challenger_for_life_and_each_model_is_judged_on_its_own() {
    let work = tempfile::tempdir().unwrap();
    let models = folders(work.path());
    let options = Options {
        env: vec![("CARTSCORE_MODEL__CANARY_SHARE".into(), "0.5".into())],
        ..Options::default()
    };
    let mut app = Appliance::start(work.path(), &models, &options);
    let sessions: Vec<String> = (0..300).map(|i| format!("canary-{i:04}")).collect();
    let mut tcp = TcpClient::connect(app.tcp).unwrap();
    let mut served: HashMap<String, String> = HashMap::new();
    let mut views = Vec::new();
    for (i, session) in sessions.iter().enumerate() {
        views.push(crate::common::view_json(session, i as i64, 7, 50.0));
    }
    let (status, body) = app.post("/v1/events", format!("[{}]", views.join(",")));
    assert_eq!(status, 200, "{body}");
    for (i, session) in sessions.iter().enumerate() {
        let cart = cart_json(session, i as i64 + 10, 7, 50.0);
        let (status, answer) = app.post("/v1/score?shadow=true", &cart);
        assert_eq!(status, 200, "{answer}");
        let version = answer["model_version"].as_str().unwrap().to_owned();
        assert_eq!(answer["canary"] == true, version == CHALLENGER, "{answer}");
        // The other model scored it too.
        let other = if version == CHALLENGER {
            "demo-1"
        } else {
            CHALLENGER
        };
        assert_eq!(answer["shadow"]["model_version"], other, "{answer}");
        // The same session, asked again and over TCP: the same model.
        let (_, again) = app.post("/v1/score", &cart);
        assert_eq!(again["model_version"], version.as_str());
        let event = Event::from_json(cart.as_bytes()).unwrap();
        let over_tcp = tcp.score(&event).unwrap();
        assert_eq!(over_tcp.model_version, version);
        served.insert(session.clone(), version);
    }
    let canary = served.values().filter(|v| *v == CHALLENGER).count();
    let share = canary as f64 / sessions.len() as f64;
    assert!((0.4..=0.6).contains(&share), "canary share {share}");

    // Half the carts bought, then every session expired: each model's
    // live window holds the carts it answered.
    let purchases: Vec<String> = sessions
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(i, s)| cart_json(s, i as i64 + 20, 7, 50.0).replace("\"cart\"", "\"purchase\""))
        .collect();
    let (status, body) = app.post("/v1/events", format!("[{}]", purchases.join(",")));
    assert_eq!(status, 200, "{body}");
    let last = cartscore_core::Timestamp::from_secs(1_569_920_400 + 400).micros();
    let live = resolve_all(&app, last, "demo-1");
    let (_, model) = app.get("/v1/model");
    assert_eq!(live["count"], sessions.len() - canary, "{model}");
    assert_eq!(model["live"][CHALLENGER]["count"], canary, "{model}");
    assert_eq!(model["comparison"][0]["count"], sessions.len(), "{model}");

    // A restart keeps every session on its side.
    app.kill();
    let app = Appliance::start(work.path(), &models, &options);
    let mut tcp = TcpClient::connect(app.tcp).unwrap();
    for (i, session) in sessions.iter().enumerate().step_by(7) {
        let event =
            Event::from_json(cart_json(session, i as i64 + 30, 8, 50.0).as_bytes()).unwrap();
        let over_tcp = tcp.score(&event).unwrap();
        assert_eq!(&over_tcp.model_version, &served[session], "{session}");
    }
    println!(
        "canary: {canary} of {} sessions on {CHALLENGER} (share 0.5), stable across calls, protocols and a restart",
        sessions.len()
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}

fn admin(app: &Appliance, action: &str, token: Option<&str>) -> (u16, Value) {
    let header = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = header
        .iter()
        .map(|h| ("Authorization", h.as_str()))
        .collect();
    app.post_with(&format!("/admin/{action}"), "", &headers)
}

#[test]
fn promote_and_rollback_under_load_fail_nothing_and_survive_restarts() {
    let work = tempfile::tempdir().unwrap();
    let models = folders(work.path());
    let options = Options {
        env: vec![("CARTSCORE_HTTP__ADMIN_TOKEN".into(), "s3cret".into())],
        ..Options::default()
    };
    let mut app = Appliance::start(work.path(), &models, &options);
    let token = Some("s3cret");
    // Nothing to roll back to yet; no token, no change.
    let (status, body) = admin(&app, "rollback", token);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("model_change_refused")),
        "{body}"
    );
    let (status, _) = admin(&app, "promote", None);
    assert_eq!(status, 401);

    let load = Load::start(&app);
    std::thread::sleep(Duration::from_millis(500));
    let (status, report) = admin(&app, "promote", token);
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["primary_version"], CHALLENGER, "{report}");
    assert_eq!(report["rollback_version"], "demo-1", "{report}");
    assert_eq!(report["challenger_version"], Value::Null, "{report}");
    // What an operator sees with ls.
    assert_eq!(names(&models), ["challenger.onnx"]);
    assert_eq!(names(&models.join("previous")), ["model.onnx"]);
    assert!(names(&models.join("shadow")).is_empty());
    std::thread::sleep(Duration::from_millis(500));
    let (status, body) = admin(&app, "promote", token);
    assert_eq!(status, 409, "no challenger left: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no challenger"),
        "{body}"
    );
    let (status, report) = admin(&app, "rollback", token);
    assert_eq!(
        (status, report["primary_version"].as_str()),
        (200, Some("demo-1")),
        "{report}"
    );
    assert_eq!(names(&models), ["model.onnx"]);
    assert_eq!(names(&models.join("previous")), ["challenger.onnx"]);
    std::thread::sleep(Duration::from_millis(500));
    // A second rollback undoes the first.
    let (status, report) = admin(&app, "rollback", token);
    assert_eq!(
        (status, report["primary_version"].as_str()),
        (200, Some(CHALLENGER)),
        "{report}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let (failed, answered) = load.finish();
    assert_eq!(
        failed, 0,
        "failed requests across the changes: {answered:?}"
    );
    assert!(
        answered.get("demo-1").is_some_and(|n| *n > 0)
            && answered.get(CHALLENGER).is_some_and(|n| *n > 0),
        "{answered:?}"
    );
    // The reloads the renames set off changed nothing.
    let (_, model) = app.get("/v1/model");
    assert_eq!(model["model"]["model_version"], CHALLENGER, "{model}");
    assert_eq!(model["rollback"]["model_version"], "demo-1", "{model}");
    assert!(
        app.metric("cartscore_model_changes_total{action=\"promote\",outcome=\"done\"}") >= 1.0
    );
    assert!(
        app.metric("cartscore_model_changes_total{action=\"rollback\",outcome=\"done\"}") >= 2.0
    );

    // Durable: a restart serves the same, and can roll back.
    app.kill();
    let app = Appliance::start(work.path(), &models, &options);
    let (_, model) = app.get("/v1/model");
    assert_eq!(model["model"]["model_version"], CHALLENGER, "{model}");
    assert_eq!(model["rollback"]["model_version"], "demo-1", "{model}");
    let (status, _) = admin(&app, "rollback", token);
    assert_eq!(status, 200);
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
    let app = Appliance::start(work.path(), &models, &options);
    assert_eq!(app.serving_version().as_deref(), Some("demo-1"));
    println!(
        "promote/rollback: {answered:?} answered across 1 promote and 2 rollbacks, 0 failed; state kept across 2 restarts"
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}

/// The logit of an f32 probability, as the served raw score.
fn logit(p: f32) -> f64 {
    let p = f64::from(p);
    (p / (1.0 - p)).ln()
}

#[test]
fn contributions_equal_lightgbms_on_the_real_slice_and_the_shap_package_agrees() {
    let work = tempfile::tempdir().unwrap();
    let lightgbm = repo_root().join("models/demo/lightgbm.txt");
    let lightgbm_arg = lightgbm.to_str().unwrap();
    // predict checks every row against LightGBM's own predict_contrib.
    let offline: Vec<Offline> = predict_with(
        work.path(),
        &dataset(),
        &demo_model(),
        &["--explain", "--lightgbm", lightgbm_arg],
    );
    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    let (_, model) = app.get("/v1/model");
    let explain = &model["model"]["explain"];
    assert_eq!(explain["available"], true, "{model}");
    assert!(explain["verified_rows"].as_u64().unwrap() >= 8, "{explain}");
    assert!(
        explain["verified_max_diff"].as_f64().unwrap() <= 1e-5,
        "{explain}"
    );
    let mut tcp = TcpClient::connect(app.tcp).unwrap();
    let shap_header: Vec<String> = FEATURE_NAMES.iter().map(|n| format!("shap_{n}")).collect();
    let mut rows = format!(
        "{},{},shap_base_value\n",
        FEATURE_NAMES.join(","),
        shap_header.join(",")
    );
    let (mut worst_offline, mut worst_local) = (0f64, 0f64);
    replay_scoring(
        &app,
        &dataset(),
        |_| {},
        |i, event, json| {
            offline[i].assert_is(i, event);
            let expected = offline[i].shap.as_ref().unwrap();
            let (status, answer) = app.post("/v1/score?explain=true", json);
            assert_eq!(status, 200, "{answer}");
            let explanation = &answer["explanation"];
            let base = explanation["base_value"].as_f64().unwrap();
            let live: Vec<f64> = FEATURE_NAMES
                .iter()
                .map(|n| explanation["contributions"][n].as_f64().unwrap())
                .chain([base])
                .collect();
            // TCP explain answers the same.
            let over_tcp = tcp.explain(event).unwrap();
            assert_eq!(over_tcp.status, Status::Ok, "{}", over_tcp.message);
            let attribution = over_tcp.explanation.unwrap();
            // serde_json reads f64 text to within an ulp, not always exactly.
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-12;
            assert!(close(attribution.base_value, base));
            for (t, h) in attribution.contributions.iter().zip(&live) {
                assert!(close(*t, *h), "TCP {t} HTTP {h}");
            }
            for (a, b) in live.iter().zip(expected) {
                worst_offline = worst_offline.max((a - b).abs());
            }
            // Local accuracy: base + contributions = the served logit.
            let total: f64 = live.iter().sum();
            let p = answer["probability"].as_f64().unwrap() as f32;
            worst_local = worst_local.max((total - logit(p)).abs());
            // Reasons: every feature, by |contribution|, largest first.
            let reasons = explanation["reasons"].as_array().unwrap();
            assert_eq!(reasons.len(), FEATURE_COUNT);
            let magnitudes: Vec<f64> = reasons
                .iter()
                .map(|r| r["contribution"].as_f64().unwrap().abs())
                .collect();
            assert!(magnitudes.windows(2).all(|w| w[0] >= w[1]), "{reasons:?}");
            let features: Vec<String> = FEATURE_NAMES
                .iter()
                .map(|n| answer["features"][n].to_string())
                .collect();
            rows.push_str(&format!(
                "{},{}\n",
                features.join(","),
                live.iter()
                    .map(f64::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        },
    );
    assert!(
        worst_offline < 1e-12,
        "live vs predict --explain: {worst_offline:e}"
    );
    assert!(worst_local < 1e-5, "local accuracy: {worst_local:e}");
    // The independent check: the shap package's TreeExplainer on the
    // bundle's own trees and covers.
    let rows_file = work.path().join("explained.csv");
    std::fs::write(&rows_file, rows).unwrap();
    let stdout = run_ok(
        Command::new("python3")
            .arg(repo_root().join("tests/python/shap_parity.py"))
            .arg(demo_model())
            .arg(&rows_file),
    );
    println!(
        "explain: {} carts of the real slice; live = predict --explain (max |diff| {worst_offline:e}), predict = LightGBM predict_contrib within 1e-5, local accuracy {worst_local:e}; {}",
        offline.len(),
        stdout.trim()
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_bundle_without_covers_serves_and_says_it_cannot_explain() {
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let bytes = crate::common::demo_variant(|m| m.shap = None);
    std::fs::write(models.join("model.onnx"), bytes).unwrap();
    let app = Appliance::start(work.path(), &models, &Options::default());
    let (_, model) = app.get("/v1/model");
    assert_eq!(model["model"]["explain"]["available"], false, "{model}");
    let cart = cart_json("plain", 10, 7, 10.0);
    let (status, answer) = app.post("/v1/score", &cart);
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = app.post("/v1/score?explain=true", &cart);
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["error"]["code"], "explain_unavailable", "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .unwrap()
            .contains("covers"),
        "{answer}"
    );
    let mut tcp = TcpClient::connect(app.tcp).unwrap();
    let event = Event::from_json(cart.as_bytes()).unwrap();
    let refused = tcp.explain(&event).unwrap();
    assert_eq!(refused.status, Status::Unsupported, "{refused:?}");
    assert_eq!(tcp.score(&event).unwrap().status, Status::Ok);
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}
