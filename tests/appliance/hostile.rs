//! Hostile input against the real binary: adversarial bundles dropped into
//! its model folder while TCP and HTTP load runs (each refused with its
//! reason or served correctly, no request failed, the previous model
//! serving), and hostile clients (slowloris, idle connections past the
//! limit, bodies over every limit, deep JSON, frames dribbled a byte at a
//! time or over the limit, a client that never reads) closed with a counted
//! reason while a well-behaved client is served throughout.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{
    Appliance, Load, Options, cart_json, deliver, demo_graph_variant, demo_model, demo_variant,
};
use cartscore_core::Event;
use cartscore_core::onnx::{ModelProto, NodeProto};
use cartscore_protocol::Status;
use cartscore_protocol::client::TcpClient;
use serde_json::Value;

/// The demo graph's node attribute `name`.
fn attribute<'a>(
    proto: &'a mut ModelProto,
    name: &str,
) -> &'a mut cartscore_core::onnx::AttributeProto {
    proto.graph.as_mut().unwrap().node[0]
        .attribute
        .iter_mut()
        .find(|a| a.name == name)
        .unwrap()
}

/// Waits until `file` is among the recent rejections; returns its reason.
fn rejection_of(app: &Appliance, file: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, model) = app.get("/v1/model");
        let found = model["recent_rejections"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["file"]["path"].as_str() == file.to_str())
            .map(|r| r["reason"].as_str().unwrap().to_owned());
        if let Some(reason) = found {
            return reason;
        }
        assert!(
            Instant::now() < deadline,
            "{} was not refused: {model}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn adversarial_bundles_are_refused_under_load_while_the_old_model_serves() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    let load = Load::start(&app);
    std::thread::sleep(Duration::from_millis(300));

    let nan_leaf = demo_graph_variant(|p| attribute(p, "class_weights").floats[0] = f32::NAN);
    let infinite_leaf =
        demo_graph_variant(|p| attribute(p, "class_weights").floats[3] = f32::INFINITY);
    let past_the_row = demo_graph_variant(|p| attribute(p, "nodes_featureids").ints[0] = 30);
    let bumped_contract = demo_variant(|m| m.contract_version += 1);
    let reordered = demo_variant(|m| m.feature_names.reverse());
    let edited_golden = demo_variant(|m| m.golden_vectors[0].probability += 0.1);
    // (name, bytes, what the reason must say)
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("nan-leaf.onnx", nan_leaf, &["NaN", "golden"]),
        ("infinite-leaf.onnx", infinite_leaf, &["inf", "golden"]),
        ("past-the-row.onnx", past_the_row, &["feature 30", "30"]),
        ("bumped-contract.onnx", bumped_contract, &["contract"]),
        ("reordered.onnx", reordered, &["feature"]),
        ("edited-golden.onnx", edited_golden, &["golden"]),
        ("empty.onnx", Vec::new(), &["empty (0 bytes)"]),
        (
            "random.onnx",
            (0..5_000u32).map(|i| (i * 7919 % 251) as u8).collect(),
            &["not a valid ONNX"],
        ),
    ];
    let mut reasons = Vec::new();
    for (name, bytes, expected) in &cases {
        deliver(&models, name, bytes);
        let reason = rejection_of(&app, &models.join(name));
        assert!(
            expected.iter().any(|e| reason.contains(e)),
            "{name}: {reason} names none of {expected:?}"
        );
        assert_eq!(app.serving_version().as_deref(), Some("demo-1"));
        reasons.push(format!("{name}: {reason}"));
    }
    // A file over model.max_bundle_bytes (256 MiB), sparse: refused unread.
    let huge = models.join("huge.onnx");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(300 << 20)
        .unwrap();
    let started = Instant::now();
    let reason = rejection_of(&app, &huge);
    assert!(
        reason.contains("max_bundle_bytes") && reason.contains("refused unread"),
        "{reason}"
    );
    reasons.push(format!(
        "huge.onnx (300 MiB, refused in {:?}): {reason}",
        started.elapsed()
    ));
    // Links that lead nowhere, and a folder with a bundle's name.
    std::os::unix::fs::symlink(models.join("loop-b.onnx"), models.join("loop-a.onnx")).unwrap();
    std::os::unix::fs::symlink(models.join("loop-a.onnx"), models.join("loop-b.onnx")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/model.onnx", models.join("dangling.onnx")).unwrap();
    std::fs::create_dir(models.join("folder.onnx")).unwrap();
    for (name, expected) in [
        ("loop-a.onnx", "symbolic links"),
        ("dangling.onnx", "No such file"),
        ("folder.onnx", "is a directory"),
    ] {
        let reason = rejection_of(&app, &models.join(name));
        assert!(reason.contains(expected), "{name}: {reason}");
        reasons.push(format!("{name}: {reason}"));
    }
    assert_eq!(app.serving_version().as_deref(), Some("demo-1"));

    // A valid graph that is not a plain tree ensemble (the demo's, then an
    // Identity): tract serves it, with the demo's answers.
    let (_, before) = app.post("/v1/score", cart_json("hostile", 10, 7, 10.0));
    let wrapped = demo_graph_variant(|p| {
        let graph = p.graph.as_mut().unwrap();
        let out = graph.node[0]
            .output
            .iter_mut()
            .find(|o| *o == "probabilities")
            .unwrap();
        *out = "probabilities_raw".into();
        graph.node.push(NodeProto {
            input: vec!["probabilities_raw".into()],
            output: vec!["probabilities".into()],
            name: "passthrough".into(),
            op_type: "Identity".into(),
            ..NodeProto::default()
        });
    });
    deliver(&models, "wrapped.onnx", &wrapped);
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.get("/v1/model").1["model"]["evaluator"] != "tract" {
        assert!(
            Instant::now() < deadline,
            "the wrapped graph was not served: {}",
            app.get("/v1/model").1
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, by_tract) = app.post("/v1/score", cart_json("hostile", 10, 7, 10.0));
    let (p, q) = (
        before["probability"].as_f64().unwrap(),
        by_tract["probability"].as_f64().unwrap(),
    );
    assert!((p - q).abs() < 1e-6, "compiled {p} vs tract {q}");
    // And back to the compiled demo.
    deliver(
        &models,
        "demo-again.onnx",
        &std::fs::read(demo_model()).unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.get("/v1/model").1["model"]["evaluator"] != "compiled" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }

    let (failed, answered) = load.finish();
    assert_eq!(failed, 0, "failed requests: {answered:?}");
    let rejected = app.metric("cartscore_model_reloads_total{outcome=\"rejected\"}");
    // Files that arrive together are refused by one reload.
    assert!(rejected >= 8.0, "{rejected} rejected reloads");
    println!(
        "adversarial bundles, 0 failed of {answered:?}:\n  {}",
        reasons.join("\n  ")
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}

/// Reads until the peer closes; how long that took, or None if it did not
/// within `limit`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Some(started.elapsed());
            }
            Err(_) => return None,
        }
    }
}

/// Sends `request` on a fresh connection and returns the status line's code.
fn raw_http(app: &Appliance, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(app.http.trim_start_matches("http://")).unwrap();
    stream.write_all(request).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap()
}

#[test]
fn hostile_clients_are_closed_for_cause_and_others_are_served() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let limits = [
        ("CARTSCORE_HTTP__MAX_CONNECTIONS", "64"),
        // Long enough that the well-behaved client, starved of a core for
        // a moment on a loaded machine, is not taken for an idle one.
        ("CARTSCORE_HTTP__HEADER_READ_TIMEOUT_MS", "2500"),
        ("CARTSCORE_HTTP__REQUEST_TIMEOUT_MS", "3000"),
        ("CARTSCORE_HTTP__MAX_BODY_BYTES", "65536"),
        ("CARTSCORE_TCP__MAX_CONNECTIONS", "32"),
        ("CARTSCORE_TCP__IDLE_TIMEOUT_MS", "2500"),
        ("CARTSCORE_TCP__WRITE_TIMEOUT_MS", "2500"),
    ];
    let options = Options {
        env: limits
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        ..Options::default()
    };
    let app = Appliance::start(work.path(), &models, &options);
    let rss_before = rss_kib(app.pid());
    // The well-behaved client, throughout.
    let load = Load::start(&app);
    let http_addr = app.http.trim_start_matches("http://").to_owned();

    // Slowloris: headers dribbled a byte every 100 ms.
    let mut slow = TcpStream::connect(&http_addr).unwrap();
    slow.write_all(b"POST /v1/score HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let dribble = std::thread::spawn(move || {
        for _ in 0..40 {
            if slow.write_all(b"X").is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    // Idle connections (fewer than the limit, so the well-behaved client,
    // should it reconnect, is not refused): closed after the header timeout.
    let mut idle: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(&http_addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let closed: Vec<Option<Duration>> = idle
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_secs(10)))
        .collect();
    assert!(
        closed.iter().all(Option::is_some),
        "an idle connection stayed open: {closed:?}"
    );
    assert!(
        dribble.join().unwrap(),
        "the slowloris connection was never closed"
    );

    // Bodies just over the limits, deep nesting, a body dribbled in.
    let big = format!(
        "{{\"events\":[{}]}}",
        vec![cart_json("b", 1, 1, 1.0); 400].join(",")
    );
    assert!(big.len() > 65_536);
    assert_eq!(app.post("/v1/score", &big).0, 413);
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let (status, body) = app.post("/v1/events", &deep);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (413, Some("body_too_large")),
        "{body}"
    );
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let (status, body) = app.post("/v1/score", &deep);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("malformed_json")),
        "{body}"
    );
    let started = Instant::now();
    let answer = raw_http(
        &app,
        b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"event_time\"",
    );
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(15));

    // TCP: a frame a byte at a time is answered.
    let cart = Event::from_json(cart_json("tcp", 10, 7, 10.0).as_bytes()).unwrap();
    let mut frame = Vec::new();
    cartscore_protocol::encode_request(&mut frame, 1, &cart);
    let mut dribbled = TcpStream::connect(app.tcp).unwrap();
    dribbled.set_nodelay(true).unwrap();
    for byte in &frame {
        dribbled.write_all(std::slice::from_ref(byte)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut head = [0u8; 4];
    dribbled.read_exact(&mut head).unwrap();
    let mut rest = vec![0u8; u32::from_le_bytes(head) as usize];
    dribbled.read_exact(&mut rest).unwrap();
    assert_eq!(rest[1], Status::Ok as u8);
    // Over the frame limit: an error frame, then closed.
    let mut over = TcpStream::connect(app.tcp).unwrap();
    over.write_all(&(1u32 << 20).to_le_bytes()).unwrap();
    assert!(closed_within(&mut over, Duration::from_secs(5)).is_some());
    // Idle, and a frame never finished: closed after the idle timeout.
    let opened = Instant::now();
    let mut silent = TcpStream::connect(app.tcp).unwrap();
    let mut unfinished = TcpStream::connect(app.tcp).unwrap();
    unfinished.write_all(&frame[..10]).unwrap();
    eprintln!("connected in {:?}", opened.elapsed());
    for s in [&mut silent, &mut unfinished] {
        closed_within(s, Duration::from_secs(10)).expect("an idle TCP connection stayed open");
        let took = opened.elapsed();
        let tcp: Vec<String> = app
            .get_text("/metrics")
            .lines()
            .filter(|l| l.contains("api=\"tcp\"") || l.starts_with("cartscore_tcp_connections"))
            .map(str::to_owned)
            .collect();
        assert!(took >= Duration::from_millis(2_000), "{took:?} {tcp:?}");
    }
    // A client that sends but never reads: closed after the write timeout.
    let mut deaf = TcpStream::connect(app.tcp).unwrap();
    let mut many = Vec::new();
    // More answers than the sockets' buffers hold (~30 bytes each).
    for id in 0..400_000 {
        cartscore_protocol::encode_request(&mut many, id, &cart);
    }
    deaf.set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut sent = 0;
    for chunk in many.chunks(64 * 1024) {
        if deaf.write_all(chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    std::thread::sleep(Duration::from_millis(5_000));
    let (failed, answered) = load.finish();
    assert_eq!(failed, 0, "the well-behaved client failed: {answered:?}");
    // More connections than the limits: the extra ones closed at once.
    let mut crowd: Vec<TcpStream> = (0..96)
        .map(|_| TcpStream::connect(&http_addr).unwrap())
        .collect();
    let refused = crowd
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_millis(300)))
        .filter(Option::is_some)
        .count();
    assert!(
        refused >= 20,
        "{refused} of 96 refused with http.max_connections 64"
    );
    drop(crowd);
    let mut crowd: Vec<TcpStream> = (0..48)
        .map(|_| TcpStream::connect(app.tcp).unwrap())
        .collect();
    let refused = crowd
        .iter_mut()
        .map(|s| closed_within(s, Duration::from_millis(300)))
        .filter(Option::is_some)
        .count();
    assert!(
        refused >= 10,
        "{refused} of 48 refused with tcp.max_connections 32"
    );
    drop(crowd);

    let counted = |series: &str| app.metric(series);
    let reasons = [
        (
            "http",
            "max_connections",
            "cartscore_connections_refused_total",
        ),
        (
            "http",
            "header_timeout",
            "cartscore_connections_closed_total",
        ),
        (
            "http",
            "request_timeout",
            "cartscore_connections_closed_total",
        ),
        (
            "tcp",
            "max_connections",
            "cartscore_connections_refused_total",
        ),
        ("tcp", "idle_timeout", "cartscore_connections_closed_total"),
        ("tcp", "write_timeout", "cartscore_connections_closed_total"),
        (
            "tcp",
            "frame_too_large",
            "cartscore_connections_closed_total",
        ),
    ];
    let mut tally = Vec::new();
    for (api, reason, family) in reasons {
        let n = counted(&format!("{family}{{api=\"{api}\",reason=\"{reason}\"}}"));
        assert!(
            n >= 1.0,
            "{api} {reason} not counted:\n{}",
            app.get_text("/metrics")
        );
        tally.push(format!("{api}/{reason} {n}"));
    }
    let rss_after = rss_kib(app.pid());
    assert!(
        rss_after < rss_before + 200 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    let (_, model): (u16, Value) = app.get("/v1/model");
    assert_eq!(model["model"]["model_version"], "demo-1");
    println!(
        "hostile clients: served {answered:?} with 0 failures; closed for cause {}; {sent} bytes sent by the deaf client; RSS {rss_before} -> {rss_after} KiB",
        tally.join(", ")
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn pauses_shorter_than_the_idle_timeout_keep_a_tcp_connection() {
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let options = Options {
        env: vec![("CARTSCORE_TCP__IDLE_TIMEOUT_MS".into(), "1000".into())],
        ..Options::default()
    };
    let app = Appliance::start(work.path(), &models, &options);
    let mut client = TcpClient::connect(app.tcp).unwrap();
    let cart = Event::from_json(cart_json("gaps", 10, 7, 10.0).as_bytes()).unwrap();
    for _ in 0..3 {
        assert_eq!(client.score(&cart).unwrap().status, Status::Ok);
        std::thread::sleep(Duration::from_millis(600));
    }
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_minute_of_soak_finds_nothing_growing() {
    // Scoring over TCP and HTTP, events streaming with event time 1,200 times
    // the clock (sessions expire within the run and are swept), a reload
    // every 15 s: `cartscore-bench soak` fails on a failed request or on a
    // resource still growing over the second half (README: a 30-minute run).
    let work = tempfile::tempdir().unwrap();
    let models = crate::common::model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    let report = work.path().join("soak.json");
    let output = std::process::Command::new(crate::common::bench_binary())
        .args(["soak", "--pid", &app.pid().to_string()])
        .args(["--tcp", &app.tcp.to_string()])
        .args(["--http", app.http.trim_start_matches("http://")])
        .arg("--model-dir")
        .arg(&models)
        .arg("--bundle")
        .arg(demo_model())
        .arg("--store")
        .arg(&app.store_dir)
        .args([
            "--duration",
            "60",
            "--sample-every",
            "5",
            "--reload-every",
            "15",
        ])
        .args(["--time-scale", "1200"])
        .arg("--input")
        .arg(crate::common::dataset())
        .arg("--json")
        .arg(&report)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["passed"], true);
    assert_eq!(report["failed_requests"], 0);
    assert!(report["reloads"].as_u64().unwrap() >= 3, "{report}");
    // Sessions did expire and were swept: the count came down from its top.
    let sessions: Vec<f64> = report["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["live_sessions"].as_f64().unwrap())
        .collect();
    let top = sessions.iter().copied().fold(0.0, f64::max);
    assert!(*sessions.last().unwrap() < top, "{sessions:?}");
    println!("{stdout}");
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}
