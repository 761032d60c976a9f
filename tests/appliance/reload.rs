//! Hot reload against the real binary: new bundles under load with zero
//! failed requests, every kind of bad bundle refused while the old model
//! keeps serving, temp and dot files ignored, SIGHUP.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::common::{Appliance, Options, cart_json, deliver, demo_variant};
use cartscore_protocol::Status;
use cartscore_protocol::client::TcpClient;

const RELOADS: usize = 5;

fn cart() -> cartscore_core::Event {
    cartscore_core::Event::from_json(cart_json("load", 30, 11, 100.0).as_bytes()).unwrap()
}

#[test]
fn reloads_under_load_fail_no_request() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let last_version = Arc::new(std::sync::Mutex::new(String::new()));

    let mut load = Vec::new();
    for _ in 0..2 {
        let (stop, ok, failed, last_version) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            last_version.clone(),
        );
        let addr = app.tcp;
        load.push(std::thread::spawn(move || {
            let mut client = TcpClient::connect(addr).unwrap();
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..16 {
                    client.send(&cart());
                }
                client.flush().unwrap();
                for _ in 0..16 {
                    match client.recv() {
                        Ok(r) if r.status == Status::Ok => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            *last_version.lock().unwrap() = r.model_version;
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    let http_failures = Arc::new(AtomicU64::new(0));
    {
        let (stop, http_failures) = (stop.clone(), http_failures.clone());
        let url = format!("{}/v1/score", app.http);
        load.push(std::thread::spawn(move || {
            let agent = crate::common::agent();
            let body = cart_json("load", 30, 11, 100.0);
            while !stop.load(Ordering::Relaxed) {
                let status = agent
                    .post(&url)
                    .send(body.as_bytes())
                    .map(|r| r.status().as_u16());
                if status.ok() != Some(200) {
                    http_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    std::thread::sleep(Duration::from_millis(300));
    let mut swap_times = Vec::new();
    for i in 1..=RELOADS {
        let version = format!("demo-r{i}");
        let bytes = demo_variant(|m| m.model_version = version.clone());
        let delivered = Instant::now();
        deliver(&models, &format!("model-r{i}.onnx"), &bytes);
        app.wait_for_version(&version, Duration::from_secs(30));
        swap_times.push(delivered.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for thread in load {
        thread.join().unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "reload under load: {ok} TCP scores, {failed} failed, {} HTTP failures; delivery-to-serving {swap_times:?}",
        http_failures.load(Ordering::Relaxed)
    );
    assert_eq!(failed, 0);
    assert_eq!(http_failures.load(Ordering::Relaxed), 0);
    assert!(ok > 1000, "only {ok} requests ran during the reloads");
    assert_eq!(*last_version.lock().unwrap(), format!("demo-r{RELOADS}"));
    assert!(
        app.metric("cartscore_model_reloads_total{outcome=\"loaded\"}") >= (RELOADS + 1) as f64
    );
}

#[test]
fn bad_bundles_are_rejected_while_the_old_model_serves() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    let demo = std::fs::read(crate::common::demo_model()).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated.onnx",
            demo[..demo.len() / 2].to_vec(),
            "not a valid ONNX",
        ),
        (
            "garbage.onnx",
            b"this is not a model".to_vec(),
            "not a valid ONNX",
        ),
        (
            "contract.onnx",
            demo_variant(|m| {
                m.model_version = "bad-contract".into();
                m.contract_version = 99;
            }),
            "contract",
        ),
        (
            "outputs.onnx",
            demo_variant(|m| {
                m.model_version = "bad-outputs".into();
                let g = &mut m.golden_vectors[0];
                g.probability = if g.probability > 0.5 { 0.01 } else { 0.99 };
            }),
            "golden",
        ),
    ];
    let mut client = TcpClient::connect(app.tcp).unwrap();
    for (name, bytes, reason) in &cases {
        deliver(&models, name, bytes);
        let deadline = Instant::now() + Duration::from_secs(30);
        let rejection = loop {
            let (_, model) = app.get("/v1/model");
            let found = model["recent_rejections"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| {
                    r["file"]["path"]
                        .as_str()
                        .is_some_and(|p| p.ends_with(name))
                })
                .cloned();
            if let Some(r) = found {
                break r;
            }
            assert!(
                Instant::now() < deadline,
                "{name} was not rejected: {model}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let why = rejection["reason"].as_str().unwrap();
        assert!(why.contains(reason), "{name}: {why}");
        assert_eq!(app.serving_version().as_deref(), Some("demo-1"), "{name}");
        let response = client.score(&cart()).unwrap();
        assert_eq!(
            (response.status, response.model_version.as_str()),
            (Status::Ok, "demo-1")
        );
        assert!(
            app.log().contains(name),
            "the rejection is logged with the file name"
        );
    }
    assert!(
        app.metric("cartscore_model_reloads_total{outcome=\"rejected\"}") >= cases.len() as f64
    );

    // Files still being delivered are never loaded, even on an explicit reload.
    std::fs::write(
        models.join(".hidden.onnx"),
        demo_variant(|m| m.model_version = "hidden".into()),
    )
    .unwrap();
    std::fs::write(
        models.join("partial.onnx.tmp"),
        demo_variant(|m| m.model_version = "tmp".into()),
    )
    .unwrap();
    let (status, body) = app.post("/admin/reload", "");
    assert_eq!(
        status, 200,
        "known-bad files are skipped, not retried: {body}"
    );
    assert_eq!(body["report"]["result"], "unchanged", "{body}");
    assert_eq!(app.serving_version().as_deref(), Some("demo-1"));
    assert_eq!(app.get("/readyz").0, 200);
}

#[test]
fn sighup_reloads_when_watching_is_off() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let options = Options {
        env: vec![("CARTSCORE_MODEL__WATCH".into(), "false".into())],
        ..Options::default()
    };
    let app = Appliance::start(work.path(), &models, &options);
    deliver(
        &models,
        "next.onnx",
        &demo_variant(|m| m.model_version = "demo-hup".into()),
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        app.serving_version().as_deref(),
        Some("demo-1"),
        "not watching"
    );
    app.signal("HUP");
    app.wait_for_version("demo-hup", Duration::from_secs(30));
    let (_, model) = app.get("/v1/model");
    assert_eq!(model["last_reload"]["trigger"], "signal");
}

#[test]
fn starts_without_a_model_and_becomes_ready_when_one_arrives() {
    let work = tempfile::tempdir().unwrap();
    let models = work.path().join("empty-models");
    std::fs::create_dir_all(&models).unwrap();
    let options = Options {
        expect_no_model: true,
        ..Options::default()
    };
    let app = Appliance::start(work.path(), &models, &options);
    assert_eq!(app.get("/readyz").0, 503);
    let (status, body) = app.post("/v1/score", cart_json("x", 0, 1, 1.0));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("model_unavailable"))
    );
    let response = TcpClient::connect(app.tcp).unwrap().score(&cart()).unwrap();
    assert_eq!(response.status, Status::ModelUnavailable);
    deliver(
        &models,
        "model.onnx",
        &std::fs::read(crate::common::demo_model()).unwrap(),
    );
    app.wait_for_version("demo-1", Duration::from_secs(30));
    assert_eq!(app.get("/readyz").0, 200);
}
