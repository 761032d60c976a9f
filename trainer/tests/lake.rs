//! The S3 lake, the model registry and MLflow against real servers
//! (scripts/test.sh starts SeaweedFS's S3 gateway, PostgreSQL and an MLflow
//! tracking server and exports CARTSCORE_TEST_S3 / _POSTGRES / _MLFLOW).
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::{TestBucket, TestDb, dataset, fails, fails_at, mlflow_url, ok, ok_json, trainer};
use serde_json::Value;

const FAST: [&str; 6] = ["--trials", "2", "--max-iterations", "30", "--threads", "2"];

fn train(source: &str, out: &Path, extra: &[&str]) -> (Value, String) {
    let stdout = ok(&[
        &["train", "--source", source, "--out", out.to_str().unwrap()][..],
        &FAST,
        extra,
    ]
    .concat());
    let report = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    (report, stdout)
}

/// The slice without its exact duplicate lines (first occurrences kept):
/// what silver holds after loading the slice.
fn without_duplicates(from: &Path, to: &Path) {
    let data = std::fs::read(from).unwrap();
    let mut seen = std::collections::HashSet::new();
    let lines: Vec<&[u8]> = data.split_inclusive(|b| *b == b'\n').collect();
    let kept: Vec<&[u8]> = lines
        .iter()
        .copied()
        .filter(|line| seen.insert(line.to_vec()))
        .collect();
    assert_eq!(
        lines.len() - kept.len(),
        5,
        "the slice holds five duplicate lines"
    );
    std::fs::write(to, kept.concat()).unwrap();
}

#[test]
fn the_same_data_gives_the_same_model_from_files_postgres_and_s3() {
    let work = tempfile::tempdir().unwrap();
    let clean = work.path().join("slice.csv");
    without_duplicates(&dataset(), &clean);
    let db = TestDb::new("sources");
    let bucket = TestBucket::new("sources");
    // The warehouse gets the raw slice (silver removes the duplicates), the
    // lake and the file source the de-duplicated copy.
    ok_json(&[
        "load",
        "--input",
        dataset().to_str().unwrap(),
        "--postgres",
        &db.url,
    ]);
    let lake = ok_json(&[
        "load",
        "--input",
        clean.to_str().unwrap(),
        "--s3",
        &bucket.url(""),
    ]);
    assert_eq!(lake["s3"]["files"][0]["valid"], 17_429, "{lake}");
    let keys = bucket.keys("events/");
    assert!(
        keys.iter()
            .all(|k| k.starts_with("events/year=2019/month=10/day=01/hour=0")
                && k.ends_with(".parquet")),
        "{keys:?}"
    );
    assert_eq!(
        keys.iter().filter(|k| k.contains("hour=00")).count(),
        1,
        "one part per hour of a small load: {keys:?}"
    );

    let (from_file, _) = train(clean.to_str().unwrap(), &work.path().join("file"), &[]);
    let (from_pg, _) = train(&db.url, &work.path().join("pg"), &[]);
    let (from_s3, _) = train(&bucket.url("events/"), &work.path().join("s3"), &[]);
    for (name, report) in [("pg", &from_pg), ("s3", &from_s3)] {
        assert_eq!(report["input"]["valid"], 17_429, "{name}");
        assert_eq!(
            report["data_fingerprint"], from_file["data_fingerprint"],
            "{name}"
        );
        assert_eq!(
            report["model_version"], from_file["model_version"],
            "{name}"
        );
        assert_eq!(
            std::fs::read(work.path().join(name).join("model.onnx")).unwrap(),
            std::fs::read(work.path().join("file/model.onnx")).unwrap(),
            "{name}: the bundle bytes"
        );
    }
    // A prefix narrower than events/ reads only its hours.
    let (one_hour, _) = train(
        &bucket.url("events/year=2019/month=10/day=01/hour=02/"),
        &work.path().join("hour2"),
        &[],
    );
    assert!(one_hour["input"]["valid"].as_u64().unwrap() < 17_429);
}

#[test]
fn an_interrupted_lake_load_resumes_without_duplicates() {
    let bucket = TestBucket::new("resume");
    let data = dataset();
    let data = data.to_str().unwrap();
    let args = [
        "load",
        "--input",
        data,
        "--s3",
        &bucket.url(""),
        "--rows-per-flush",
        "3000",
    ];
    // Dies after two checkpoints, having written the third flush's parts.
    let stderr = fails(&[&args[..], &["--interrupt-after-flushes", "2"]].concat());
    assert!(stderr.contains("interrupted after 2 flushes"), "{stderr}");
    let checkpoint_key = bucket
        .keys("_checkpoints/")
        .pop()
        .expect("a checkpoint was written");
    let checkpoint: Value = serde_json::from_slice(&bucket.get(&checkpoint_key)).unwrap();
    assert_eq!(checkpoint["complete"], false);
    assert_eq!(
        checkpoint["next_line"], 6_002,
        "two flushes of 3,000 rows from line 2"
    );
    let parts_before = bucket.keys("events/").len();

    let resumed = ok_json(&args);
    let file = &resumed["s3"]["files"][0];
    assert_eq!(file["resumed_from_line"], 6_002, "{resumed}");
    assert_eq!(file["rows"], 17_435 - 6_000);
    let parts = bucket.keys("events/");
    assert!(parts.len() >= parts_before);
    let checkpoint: Value = serde_json::from_slice(&bucket.get(&checkpoint_key)).unwrap();
    assert_eq!(checkpoint["complete"], true);
    assert_eq!(checkpoint["rows"], 17_435);
    assert_eq!(checkpoint["valid"], 17_434);
    assert_eq!(checkpoint["invalid_by_reason"]["missing_field"], 1);
    assert_eq!(bucket.keys("rejects/").len(), 1);

    // Done: a third run adds nothing.
    let again = ok_json(&args);
    assert_eq!(again["s3"]["files"][0]["already_loaded"], true);
    assert_eq!(bucket.keys("events/"), parts);

    // Every valid row is in the lake exactly once: the replay reads 17,434.
    let work = tempfile::tempdir().unwrap();
    let (report, _) = train(&bucket.url("events"), &work.path().join("m"), &[]);
    assert_eq!(report["input"]["rows"], 17_434, "{}", report["input"]);
    let (direct, _) = train(data, &work.path().join("direct"), &[]);
    assert_eq!(report["model_version"], direct["model_version"]);
}

#[test]
fn bundles_go_through_the_registry_and_mlflow_to_an_appliance_folder() {
    let bucket = TestBucket::new("registry");
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("trained");
    let experiment = format!("cartscore-test-{}", std::process::id());
    let registered = format!("cartscore-test-{}", std::process::id());
    let (report, stdout) = train(
        dataset().to_str().unwrap(),
        &out,
        &[
            "--registry",
            &bucket.url("ml"),
            "--mlflow-url",
            &mlflow_url(),
            "--mlflow-experiment",
            &experiment,
            "--mlflow-model",
            &registered,
        ],
    );
    let version = report["model_version"].as_str().unwrap();
    let mut keys = bucket.keys("ml/models/");
    keys.sort();
    assert_eq!(
        keys,
        ["model.onnx", "report.json", "report.txt"].map(|f| format!("ml/models/{version}/{f}"))
    );
    assert_eq!(
        bucket.get(&format!("ml/models/{version}/model.onnx")),
        std::fs::read(out.join("model.onnx")).unwrap()
    );

    // publish: the newest version lands in the model folder under its name,
    // atomically (no temporary left behind).
    let models = work.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let published = ok(&[
        "publish",
        "--registry",
        &bucket.url("ml"),
        "--to",
        models.to_str().unwrap(),
    ]);
    assert!(published.contains(version), "{published}");
    let names: Vec<String> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [format!("model-{version}.onnx")]);
    assert_eq!(
        std::fs::read(models.join(&names[0])).unwrap(),
        std::fs::read(out.join("model.onnx")).unwrap()
    );
    let stderr = fails(&[
        "publish",
        "--registry",
        &bucket.url("ml"),
        "--version",
        "no-such-version",
        "--to",
        models.to_str().unwrap(),
    ]);
    assert!(
        stderr.contains("ml/models/no-such-version/model.onnx"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_dir(&models).unwrap().count(),
        1,
        "nothing left behind"
    );

    // MLflow: the run, its metrics and artifacts, the version and its alias.
    assert!(stdout.contains("as @champion"), "{stdout}");
    let api = |path: &str| -> Value {
        let url = format!("{}/api/2.0/mlflow/{path}", mlflow_url());
        serde_json::from_str(
            &ureq::get(&url)
                .call()
                .unwrap()
                .body_mut()
                .read_to_string()
                .unwrap(),
        )
        .unwrap()
    };
    let alias = api(&format!(
        "registered-models/alias?name={registered}&alias=champion"
    ));
    let run_id = alias["model_version"]["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        alias["model_version"]["tags"][0]["value"], version,
        "{alias}"
    );
    let run = api(&format!("runs/get?run_id={run_id}"));
    assert_eq!(run["run"]["info"]["status"], "FINISHED");
    let metrics = run["run"]["data"]["metrics"].as_array().unwrap();
    let auc = metrics.iter().find(|m| m["key"] == "test_roc_auc").unwrap();
    assert!(
        (auc["value"].as_f64().unwrap() - report["test"]["roc_auc"].as_f64().unwrap()).abs() < 1e-9
    );
    assert!(
        run["run"]["data"]["params"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["key"] == "num_leaves")
    );
    let artifacts = api(&format!("artifacts/list?run_id={run_id}&path=model"));
    assert_eq!(
        artifacts["files"][0]["path"], "model/model.onnx",
        "{artifacts}"
    );
    assert_eq!(
        artifacts["files"][0]["file_size"].as_u64().unwrap(),
        std::fs::metadata(out.join("model.onnx")).unwrap().len()
    );
}

#[test]
fn an_unreachable_bucket_is_a_clear_error_naming_the_endpoint() {
    let work = tempfile::tempdir().unwrap();
    let stderr = fails_at(
        &[
            "load",
            "--input",
            dataset().to_str().unwrap(),
            "--s3",
            "s3://lake-x/raw",
        ],
        "http://127.0.0.1:1",
    );
    assert!(
        stderr.contains("http://127.0.0.1:1") && stderr.contains("bucket lake-x"),
        "{stderr}"
    );
    let bad = trainer(&[
        "train",
        "--source",
        "s3://",
        "--out",
        work.path().to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no bucket"));
    let mixed = trainer(&[
        "train",
        "--source",
        "s3://a/b",
        "--source",
        "postgres://x@y/z",
        "--out",
        work.path().to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&mixed.stderr).contains("cannot mix sources"));
    let out = work.path().join("m");
    let stderr = fails(
        &[
            &[
                "train",
                "--source",
                dataset().to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ][..],
            &FAST,
            &["--mlflow-url", "http://127.0.0.1:1"],
        ]
        .concat(),
    );
    assert!(
        stderr.contains("failed to log the run to MLflow at http://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(
        out.join("model.onnx").exists(),
        "the bundle is kept when MLflow is down"
    );
}
