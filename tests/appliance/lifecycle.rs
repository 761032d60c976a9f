//! Process lifecycle against the real binary: SIGTERM answers what was
//! already sent and exits cleanly, state survives a restart, `validate`
//! checks config and models, and a full LMDB map is an error, not a crash.

use std::process::Command;
use std::time::Duration;

use crate::common::{Appliance, Options, cart_json, view_json};
use cartscore_protocol::Status;
use cartscore_protocol::client::TcpClient;

#[test]
fn sigterm_drains_and_restart_keeps_state() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    let events: Vec<String> = (0..20)
        .map(|i| view_json("keep", i * 10, 100 + (i % 7) as u64, 10.0 + i as f64))
        .collect();
    let (status, body) = app.post("/v1/events", format!("[{}]", events.join(",")));
    assert_eq!(status, 200, "{body}");
    let (_, before) = app.get("/v1/sessions/keep?product_id=101&price=12");
    let (_, scored_before) = app.post("/v1/score?explain=true", cart_json("keep", 300, 101, 12.0));

    // Pipeline many requests, then SIGTERM at once: every one is answered.
    let cart =
        cartscore_core::Event::from_json(cart_json("keep", 300, 101, 12.0).as_bytes()).unwrap();
    let mut client = TcpClient::connect(app.tcp).unwrap();
    client.set_timeout(Some(Duration::from_secs(20))).unwrap();
    let sent = 2_000;
    for _ in 0..sent {
        client.send(&cart);
    }
    client.flush().unwrap();
    app.signal("TERM");
    for _ in 0..sent {
        let response = client.recv().unwrap();
        assert_eq!(response.status, Status::Ok);
    }
    let (status, log) = app.stop();
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(
        log.contains("draining") && log.contains("stopped cleanly"),
        "{log}"
    );
    // The log went to a file: plain text, no colour escapes.
    assert!(!log.contains('\u{1b}'), "colour in a log file: {log:?}");

    let app = Appliance::start(work.path(), &models, &Options::default());
    let (_, after) = app.get("/v1/sessions/keep?product_id=101&price=12");
    assert_eq!(after, before);
    let (_, scored_after) = app.post("/v1/score?explain=true", cart_json("keep", 300, 101, 12.0));
    assert_eq!(scored_after, scored_before);
}

#[test]
fn a_full_store_is_an_error_and_serving_continues() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let options = Options {
        env: vec![("CARTSCORE_STORE__MAP_SIZE_MIB".into(), "1".into())],
        ..Options::default()
    };
    let app = Appliance::start(work.path(), &models, &options);
    app.post("/v1/events", view_json("first", 0, 1, 5.0));
    let mut full = None;
    for round in 0..100 {
        let batch: Vec<String> = (0..500)
            .map(|i| {
                view_json(&format!("s{round}-{i}"), 10, 1, 5.0)
                    .replace("543272936", &(1000 + round * 500 + i).to_string())
            })
            .collect();
        let (status, body) = app.post("/v1/events", format!("[{}]", batch.join(",")));
        if status != 200 {
            full = Some((status, body));
            break;
        }
    }
    let (status, body) = full.expect("the 1 MiB map never filled");
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "map_full");
    assert!(app.metric("cartscore_store_map_full_total") >= 1.0);
    assert_eq!(app.get("/v1/sessions/first").0, 200);
    let (status, _) = app.post("/v1/score", cart_json("first", 20, 1, 5.0));
    assert_eq!(status, 200);
    assert_eq!(app.get("/readyz").0, 200);
}

fn cartscore(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(crate::common::appliance_binary());
    command.args(args).env("RUST_BACKTRACE", "0");
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn validate_checks_config_and_model_folder() {
    let work = tempfile::tempdir().unwrap();
    let example = crate::common::repo_root().join("configs/appliance.toml");
    let models = crate::common::model_dir_with_demo(work.path());
    let models_arg = models.to_str().unwrap();
    let (ok, out) = cartscore(
        &[
            "validate",
            "--config",
            example.to_str().unwrap(),
            "--model-dir",
            models_arg,
        ],
        &[],
    );
    assert!(ok, "{out}");
    assert!(out.contains("demo-1"), "{out}");

    let bad = work.path().join("bad.toml");
    std::fs::write(&bad, "[http]\nlisten = \"nowhere\"\n").unwrap();
    let (ok, out) = cartscore(&["validate", "--config", bad.to_str().unwrap()], &[]);
    assert!(!ok && out.contains("listen"), "{out}");
    let (ok, out) = cartscore(
        &["validate", "--model-dir", models_arg],
        &[("CARTSCORE_STORE__MAP_SIZE_MIB", "0")],
    );
    assert!(!ok && out.contains("store.map_size_mib (0)"), "{out}");
    let (ok, out) = cartscore(
        &["validate", "--model-dir", models_arg],
        &[("CARTSCORE_HTTP__NO_SUCH", "1")],
    );
    assert!(!ok && out.contains("no_such"), "{out}");
    let empty = work.path().join("none");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, out) = cartscore(&["validate", "--model-dir", empty.to_str().unwrap()], &[]);
    assert!(!ok && out.contains("no *.onnx bundle"), "{out}");
    std::fs::write(empty.join("broken.onnx"), b"nope").unwrap();
    let (ok, out) = cartscore(&["validate", "--model-dir", empty.to_str().unwrap()], &[]);
    assert!(!ok && out.contains("broken.onnx"), "{out}");
}
