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

/// A tmpfs of `mib` MiB mounted on `dir` (unmounted on drop), or `None`
/// where this machine does not let the tests mount one.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, mib: u32) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir)
            .status()
            .ok()?;
        status.success().then(|| Self(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_found_at_start_and_never_crashes_a_running_store() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let disk = work.path().join("disk");
    let Some(_tmpfs) = Tmpfs::mount(&disk, 48) else {
        // Mounting needs CAP_SYS_ADMIN; say so loudly rather than pass.
        panic!(
            "cannot mount a tmpfs here: this test needs root (CAP_SYS_ADMIN) to make a small disk"
        );
    };
    let store = disk.join("store");
    let store_arg = store.to_str().unwrap();
    // A map larger than the disk: refused at start, with the reason.
    let mut command = Command::new(crate::common::appliance_binary());
    let output = command
        .args([
            "--model-dir",
            models.to_str().unwrap(),
            "--store-path",
            store_arg,
        ])
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--tcp-listen",
            "127.0.0.1:0",
        ])
        .env("CARTSCORE_STORE__MAP_SIZE_MIB", "64")
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        log.contains("cannot reserve the store's map (64 MiB)") && log.contains("No space left"),
        "{log}"
    );
    std::fs::remove_dir_all(&store).unwrap();

    // A map that fits, then the disk filled by someone else: the store's
    // pages are reserved, so ingest and scoring go on (no SIGBUS), and the
    // map filling up is the error it always is.
    let options = Options {
        env: vec![("CARTSCORE_STORE__MAP_SIZE_MIB".into(), "8".into())],
        ..Options::default()
    };
    let app = Appliance::start(&disk, &models, &options);
    let filler = disk.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let chunk = vec![7u8; 1 << 20];
    while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
    drop(file);
    let mut statuses = std::collections::BTreeMap::new();
    for round in 0..60 {
        let batch: Vec<String> = (0..500)
            .map(|i| {
                view_json(&format!("d{round}-{i}"), 10, 1, 5.0)
                    .replace("543272936", &(1000 + round * 500 + i).to_string())
            })
            .collect();
        let (status, _) = app.post("/v1/events", format!("[{}]", batch.join(",")));
        *statuses.entry(status).or_insert(0) += 1;
        let (scored, body) = app.post("/v1/score", cart_json(&format!("d{round}-0"), 20, 1, 5.0));
        assert_eq!(scored, 200, "{body}");
    }
    assert!(statuses.contains_key(&200), "{statuses:?}");
    assert!(
        statuses.contains_key(&507),
        "the 8 MiB map never filled: {statuses:?}"
    );
    assert_eq!(app.get("/readyz").0, 200);
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
    // Space freed and a larger map: it starts, keeping what it had.
    std::fs::remove_file(&filler).unwrap();
    let options = Options {
        env: vec![("CARTSCORE_STORE__MAP_SIZE_MIB".into(), "24".into())],
        ..Options::default()
    };
    let app = Appliance::start(&disk, &models, &options);
    assert_eq!(app.get("/v1/sessions/d0-0").0, 200);
    let (status, _) = app.post("/v1/events", view_json("after", 30, 1, 5.0));
    assert_eq!(status, 200);
    println!(
        "full disk: batches answered {statuses:?} while the disk was full; restarted with a larger map"
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_folder_that_is_not_a_store_is_refused_untouched() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let start = |store: &std::path::Path| {
        Command::new(crate::common::appliance_binary())
            .args(["--model-dir", models.to_str().unwrap()])
            .arg("--store-path")
            .arg(store)
            .args([
                "--http-listen",
                "127.0.0.1:0",
                "--tcp-listen",
                "127.0.0.1:0",
            ])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    // Someone else's folder.
    let foreign = work.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("report.pdf"), b"%PDF").unwrap();
    let output = start(&foreign);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        log.contains("is not an LMDB store") && log.contains("report.pdf"),
        "{log}"
    );
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1);
    // A data.mdb that is not LMDB's.
    let garbage = work.path().join("garbage");
    std::fs::create_dir_all(&garbage).unwrap();
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(garbage.join("data.mdb"), &bytes).unwrap();
    let output = start(&garbage);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(log.contains("failed to open the LMDB store"), "{log}");
    assert_eq!(std::fs::read(garbage.join("data.mdb")).unwrap(), bytes);
    // (A store of a newer layout is refused untouched too: the store's unit
    // test `a_store_of_a_newer_layout_is_refused_untouched`.)
}
