//! The benchmark harness against a running appliance: every latency mode
//! produces its table, JSON, HDR distribution and plot, and the reload mode
//! swaps models under load without a failed request.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::broker::{Broker, create_topic, kafka_env, unique};
use crate::common::{
    Appliance, Options, bench_binary, dataset, model_dir_with_demo, producer_binary,
};

/// Runs `cartscore-bench`; returns its stdout and the JSON it wrote.
fn bench(work: &Path, name: &str, args: &[&str], extra: &[&str]) -> (String, Value) {
    run_tool(&bench_binary(), work, name, args, extra)
}

/// Runs a harness binary with `--json` right after its mode.
fn run_tool(
    tool: &Path,
    work: &Path,
    name: &str,
    args: &[&str],
    extra: &[&str],
) -> (String, Value) {
    let json = work.join(format!("{name}.json"));
    // Right after the mode: `sweep`'s target subcommand comes last.
    let output = Command::new(tool)
        .arg(args[0])
        .args(["--json", json.to_str().unwrap()])
        .args(extra)
        .args(&args[1..])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{} {args:?} failed:\n{stdout}\n{}",
        tool.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (stdout, summary)
}

fn check_run(summary: &Value, rate: f64) {
    assert_eq!(summary["errors"], 0, "{summary}");
    let achieved = summary["achieved_rate"].as_f64().unwrap();
    assert!(achieved > 0.9 * rate && achieved < 1.1 * rate, "{summary}");
    let latency = &summary["latency"];
    for key in ["p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
        assert!(latency[key].as_f64().unwrap() > 0.0, "{key}: {summary}");
    }
    assert!(latency["p50_us"].as_f64() <= latency["p99_us"].as_f64());
}

#[test]
fn latency_modes_measure_a_running_appliance() {
    let work = tempfile::tempdir().unwrap();
    let models = model_dir_with_demo(work.path());
    let app = Appliance::start(work.path(), &models, &Options::default());
    let out = work.path();
    let tcp = app.tcp.to_string();
    let load = ["--rate", "2000", "--duration", "1", "--warmup", "0.3"];

    let hdr = out.join("tcp.hgrm");
    let png = out.join("tcp.png");
    let (table, summary) = bench(
        out,
        "tcp",
        &[
            &[
                "tcp",
                "--addr",
                &tcp,
                "--connections",
                "2",
                "--pipeline",
                "4",
            ][..],
            &load,
        ]
        .concat(),
        &[
            "--hdr",
            hdr.to_str().unwrap(),
            "--plot",
            png.to_str().unwrap(),
        ],
    );
    assert!(table.contains("from schedule (CO-corrected)"), "{table}");
    check_run(&summary, 2000.0);
    let requests = summary["requests"].as_u64().unwrap();
    assert!((1800..=2200).contains(&requests), "{summary}");
    let distribution = std::fs::read_to_string(&hdr).unwrap();
    assert!(
        distribution.contains(&format!("Total count    = {requests:>12}")),
        "{distribution}"
    );
    assert_eq!(&std::fs::read(&png).unwrap()[..4], b"\x89PNG");

    let score = format!("{}/v1/score", app.http);
    let (_, summary) = bench(
        out,
        "http",
        &[&["http", "--url", &score][..], &load].concat(),
        &[],
    );
    check_run(&summary, 2000.0);

    // KServe V2 with a template; the data set's carts over TCP.
    let infer = format!("{}/v2/models/cartscore/infer", app.http);
    let body = r#"{"inputs":[{"name":"features","shape":[1,25],"datatype":"FP32","data":[{seq},0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0]}]}"#;
    let (_, summary) = bench(
        out,
        "kserve",
        &[&["http", "--url", &infer, "--body", body][..], &load].concat(),
        &[],
    );
    check_run(&summary, 2000.0);
    let input = dataset();
    let (_, summary) = bench(
        out,
        "tcp-dataset",
        &[
            &["tcp", "--addr", &tcp, "--input", input.to_str().unwrap()][..],
            &load,
        ]
        .concat(),
        &[],
    );
    check_run(&summary, 2000.0);

    // A 404 is counted as an error by its status, not as a success.
    let missing = format!("{}/v1/nope", app.http);
    let output = Command::new(bench_binary())
        .args([
            "http",
            "--url",
            &missing,
            "--rate",
            "200",
            "--duration",
            "0.5",
            "--warmup",
            "0",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("http_404"), "{text}");

    // A bound no healthy run misses, even on a loaded 2-core machine (a
    // concurrent build put p99 at 32 ms): this checks the sweep's stepping
    // and report, not the machine's latency.
    let (table, summary) = bench(
        out,
        "sweep",
        &[
            "sweep",
            "--p99-us",
            "1000000",
            "--rate",
            "1000",
            "--max-rate",
            "4000",
            "--factor",
            "2",
            "--refine",
            "0",
            "--duration",
            "0.5",
            "--warmup",
            "0.2",
            "tcp",
            "--addr",
            &tcp,
        ],
        &[],
    );
    assert!(table.contains("highest rate"), "{table}");
    assert_eq!(
        summary["max_passing_rate"].as_f64(),
        Some(4000.0),
        "{summary}"
    );
    assert_eq!(summary["steps"].as_array().unwrap().len(), 3);

    let (table, summary) = bench(
        out,
        "reload",
        &[
            "reload",
            "--addr",
            &tcp,
            "--model-dir",
            models.to_str().unwrap(),
            "--bundle",
            crate::common::demo_model().to_str().unwrap(),
            "--reloads",
            "3",
            "--interval-ms",
            "200",
            "--rate",
            "2000",
            "--warmup",
            "0.3",
        ],
        &[],
    );
    assert!(table.contains("reloads 3/3 swapped"), "{table}");
    assert_eq!(summary["extra"]["failed_requests"], 0, "{summary}");
    assert_eq!(summary["extra"]["swapped"], 3, "{summary}");
    assert!(
        app.serving_version().unwrap().ends_with("-3"),
        "{:?}",
        app.serving_version()
    );
    let (status, log) = app.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn freshness_mode_measures_applied_rate_and_freshness_through_kafka() {
    let brokers = Broker::shared();
    let topic = unique("bench-ingest");
    create_topic(brokers, &topic, 1);
    let work = tempfile::tempdir().unwrap();
    let models = model_dir_with_demo(work.path());
    let options = Options {
        env: kafka_env(brokers, "bench", &[&topic]),
        ..Options::default()
    };
    let app = Appliance::start(work.path(), &models, &options);
    let input = dataset();
    let (table, summary) = run_tool(
        &producer_binary(),
        work.path(),
        "freshness",
        &[
            "freshness",
            "--brokers",
            brokers,
            "--topic",
            &topic,
            "--http",
            &app.http,
            "--input",
            input.to_str().unwrap(),
            "--rate",
            "500",
            "--seconds",
            "2",
            "--probes-per-second",
            "10",
        ],
        &[],
    );
    for row in [
        "acknowledged by the broker",
        "received by a plain consumer",
        "visible in the appliance",
    ] {
        assert!(table.contains(row), "{row}: {table}");
    }
    assert_eq!(summary["events"], 1000, "{summary}");
    assert_eq!(summary["acknowledged"], 1000, "{summary}");
    assert_eq!(summary["lost_probes"], 0, "{summary}");
    assert_eq!(summary["probes"], 20, "{summary}");
    assert!(
        summary["applied_rate"].as_f64().unwrap() > 100.0,
        "{summary}"
    );
    assert!(
        summary["freshness"]["p50_us"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
    // The split: every event's acknowledgement, every probe at the plain
    // consumer, and the appliance's batches from its /metrics.
    assert_eq!(summary["acknowledged_after"]["count"], 1000, "{summary}");
    assert_eq!(
        summary["plain_consumer"]["received"]["count"], 20,
        "{summary}"
    );
    assert_eq!(summary["plain_consumer"]["lost_probes"], 0, "{summary}");
    assert!(
        summary["appliance_batches"]["batches"].as_u64().unwrap() > 0
            && summary["appliance_batches"]["mean_duration_ms"]
                .as_f64()
                .unwrap()
                > 0.0,
        "{summary}"
    );
    assert!(app.metric("cartscore_events_applied_total{source=\"kafka\"}") >= 1000.0);
}
