//! End-to-end tests of the `cartscore-trainer` binary: synthetic data, the
//! real data slice, CSV and Parquet inputs, bad input, the exported bundle in
//! tract and in ONNX Runtime, and the committed demo model.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt64Array};
use cartscore_core::{CsvLayout, Event, FEATURE_COUNT, TractModel};
use parquet::arrow::ArrowWriter;
use serde_json::Value;

use common::{dataset, fails, ok, repo, trainer};

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn report(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).expect("report.json"))
        .expect("json")
}

#[test]
fn synth_is_deterministic_and_realistic() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        dir.path().join("a.csv"),
        dir.path().join("b.csv"),
        dir.path().join("c.csv"),
    );
    ok(&["synth", "--events", "100000", "--seed", "3", "--out", s(&a)]);
    ok(&["synth", "--events", "100000", "--seed", "3", "--out", s(&b)]);
    ok(&["synth", "--events", "100000", "--seed", "4", "--out", s(&c)]);
    let (a, b, c) = (
        std::fs::read(a).unwrap(),
        std::fs::read(&b).unwrap(),
        std::fs::read(c).unwrap(),
    );
    assert_eq!(a, b, "same seed, same bytes");
    assert_ne!(a, c, "another seed, other data");

    // Every row validates through the core crate, in the data set's exact form.
    let mut reader = csv::Reader::from_reader(a.as_slice());
    assert_eq!(
        reader
            .headers()
            .unwrap()
            .iter()
            .collect::<Vec<_>>()
            .join(","),
        "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
    );
    let layout = CsvLayout::from_header(reader.byte_headers().unwrap()).unwrap();
    let (mut n, mut views, mut carts, mut purchases, mut removes, mut no_brand, mut no_category) =
        (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
    let mut last = None;
    for record in reader.byte_records() {
        let e = Event::from_csv(&record.unwrap(), &layout).expect("synthetic rows are valid");
        assert!(
            last.is_none_or(|t| t <= e.event_time),
            "rows are in time order"
        );
        last = Some(e.event_time);
        n += 1.0;
        match e.event_type {
            cartscore_core::EventType::View => views += 1.0,
            cartscore_core::EventType::Cart => carts += 1.0,
            cartscore_core::EventType::Purchase => purchases += 1.0,
            cartscore_core::EventType::RemoveFromCart => removes += 1.0,
        }
        no_brand += f64::from(u8::from(e.brand.is_none()));
        no_category += f64::from(u8::from(e.category_code.is_none()));
    }
    assert_eq!(n, 100_000.0);
    assert!((0.94..=0.97).contains(&(views / n)), "views {}", views / n);
    assert!(
        (0.015..=0.025).contains(&(carts / n)),
        "carts {}",
        carts / n
    );
    assert!(
        (0.01..=0.02).contains(&(purchases / n)),
        "purchases {}",
        purchases / n
    );
    assert!(removes > 0.0);
    assert!((0.05..0.4).contains(&(no_brand / n)) && (0.05..0.6).contains(&(no_category / n)));
}

#[test]
fn synth_injects_invalid_rows_that_training_counts_and_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dirty.csv");
    // The summary goes to stderr: with `--out -` stdout carries the events.
    let out = trainer(&[
        "synth",
        "--events",
        "150000",
        "--seed",
        "5",
        "--invalid-rate",
        "0.02",
        "--out",
        s(&data),
    ]);
    assert!(out.status.success());
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("invalid"), "{summary}");
    let model_dir = dir.path().join("model");
    ok(&[
        "train",
        "--input",
        s(&data),
        "--out",
        s(&model_dir),
        "--trials",
        "2",
        "--max-iterations",
        "50",
    ]);
    let r = report(&model_dir);
    let invalid = r["input"]["invalid"].as_u64().unwrap();
    assert!((2_000..4_000).contains(&invalid), "{invalid}");
    let reasons = r["input"]["invalid_by_reason"].as_object().unwrap();
    for code in [
        "negative_price",
        "unknown_event_type",
        "empty_session",
        "zero_id",
        "bad_timestamp",
    ] {
        assert!(
            reasons.contains_key(code),
            "{code} missing from {reasons:?}"
        );
    }
    let sample = &r["input"]["invalid_samples"][0];
    assert!(
        sample["file"].as_str().unwrap().ends_with("dirty.csv")
            && sample["line"].as_u64().unwrap() > 1
    );

    let over = trainer(&[
        "train",
        "--input",
        s(&data),
        "--out",
        s(&model_dir),
        "--error-budget",
        "0.001",
    ]);
    assert!(!over.status.success());
    let stderr = String::from_utf8_lossy(&over.stderr);
    assert!(
        stderr.contains("error budget") && stderr.contains("dirty.csv"),
        "{stderr}"
    );
}

/// A window larger than `--tune-rows` is sampled for the search; the
/// winner is trained again on every row, and that is the model exported.
#[test]
fn a_sampled_search_trains_the_winner_again_on_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("events.csv");
    ok(&[
        "synth",
        "--events",
        "150000",
        "--seed",
        "9",
        "--out",
        s(&data),
    ]);
    let refused = trainer(&[
        "train",
        "--input",
        s(&data),
        "--out",
        s(&dir.path().join("x")),
        "--tune-rows",
        "10",
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("tune_rows") && stderr.contains("10"),
        "{stderr}"
    );

    let model_dir = dir.path().join("model");
    ok(&[
        "train",
        "--input",
        s(&data),
        "--out",
        s(&model_dir),
        "--trials",
        "2",
        "--max-iterations",
        "60",
        "--tune-rows",
        "1000",
    ]);
    let r = report(&model_dir);
    let (train_rows, validation_rows) = (
        r["rows"]["train"].as_u64().unwrap(),
        r["rows"]["validation"].as_u64().unwrap(),
    );
    assert!(
        train_rows > 1_000,
        "{train_rows} training rows: too few to sample"
    );
    let tuning = &r["tuning"];
    assert_eq!(tuning["sample"]["train"], 1_000, "{tuning}");
    assert_eq!(
        tuning["sample"]["validation"].as_u64().unwrap(),
        validation_rows.min(1_000)
    );
    let refit = &tuning["refit"];
    assert_eq!(refit["train_rows"].as_u64().unwrap(), train_rows);
    assert_eq!(refit["validation_rows"].as_u64().unwrap(), validation_rows);
    // The exported model is the refit: its trees, its validation AUC.
    let (_, bundle) =
        cartscore_core::BundleMetadata::read_file(&model_dir.join("model.onnx")).unwrap();
    assert_eq!(
        bundle.params["iterations"].as_i64(),
        refit["iterations"].as_i64(),
        "{refit}"
    );
    assert!(
        (r["validation"]["roc_auc"].as_f64().unwrap() - refit["validation_auc"].as_f64().unwrap())
            .abs()
            < 1e-6,
        "{refit} vs {}",
        r["validation"]
    );
    let text = std::fs::read_to_string(model_dir.join("report.txt")).unwrap();
    assert!(text.contains("trained again on"), "{text}");
}

#[test]
fn missing_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = trainer(&[
        "train",
        "--input",
        "/no/such/events.csv",
        "--out",
        s(dir.path()),
    ]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/no/such/events.csv"));
}

#[test]
fn a_headerless_csv_is_named_with_the_columns_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let headerless = dir.path().join("headerless.csv");
    std::fs::write(
        &headerless,
        "2019-10-01 00:00:00 UTC,view,1,2,,,1.0,3,s1\n2019-10-01 00:00:01 UTC,cart,1,2,,,1.0,3,s1\n",
    )
    .unwrap();
    let out = dir.path().join("model");
    let stderr = fails(&["train", "--input", s(&headerless), "--out", s(&out)]);
    assert!(
        stderr.contains("headerless.csv: the first line is not a header row"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("2019-10-01 00:00:00 UTC,view"), "{stderr}");
}

#[test]
fn trains_a_model_near_the_oracle_that_tract_and_onnxruntime_reproduce() {
    let dir = tempfile::tempdir().unwrap();
    let (data, oracle, model_dir) = (
        dir.path().join("e.csv"),
        dir.path().join("o.csv"),
        dir.path().join("m"),
    );
    ok(&[
        "synth",
        "--events",
        "600000",
        "--seed",
        "11",
        "--out",
        s(&data),
        "--oracle",
        s(&oracle),
    ]);
    ok(&[
        "train",
        "--input",
        s(&data),
        "--oracle",
        s(&oracle),
        "--out",
        s(&model_dir),
        "--write-test-rows",
        "--trials",
        "6",
    ]);
    let r = report(&model_dir);
    for key in ["roc_auc", "pr_auc", "log_loss", "brier"] {
        assert!(r["test"][key].as_f64().is_some(), "test.{key}");
    }
    let auc = r["test"]["roc_auc"].as_f64().unwrap();
    let oracle_auc = r["oracle"]["roc_auc"].as_f64().unwrap();
    let stump = r["baselines"]["original_stack"]["roc_auc"]
        .as_f64()
        .unwrap();
    assert!(auc > stump + 0.05, "model {auc} vs original stack {stump}");
    assert!(
        auc >= 0.95 * oracle_auc,
        "model {auc} vs oracle {oracle_auc}"
    );
    assert_eq!(r["baselines"]["base_rate"]["roc_auc"].as_f64(), Some(0.5));
    for w in ["train", "validation", "test"] {
        assert!(r["rows"][w].as_u64().unwrap() > 500, "{w} window");
    }
    // Windows follow time: training ends before validation starts, before test.
    assert!(r["windows"]["train"]["to"].as_str() < r["windows"]["validation"]["from"].as_str());
    assert!(r["windows"]["validation"]["to"].as_str() < r["windows"]["test"]["from"].as_str());
    assert!(r["parity"]["max_abs_diff"].as_f64().unwrap() <= 1e-5);
    assert!(r["parity"]["edge_rows"].as_u64().unwrap() > 0);
    assert!(
        std::fs::read_to_string(model_dir.join("report.txt"))
            .unwrap()
            .contains("oracle")
    );

    // tract, as an independent load of the file, on the whole test window.
    let model = TractModel::load(&model_dir.join("model.onnx"))
        .expect("bundle loads and its golden vectors verify");
    assert_eq!(model.metadata.feature_names.len(), FEATURE_COUNT);
    let mut rows_file = csv::Reader::from_path(model_dir.join("test_rows.csv")).unwrap();
    let (mut rows, mut expected) = (Vec::new(), Vec::new());
    for record in rows_file.records() {
        let record = record.unwrap();
        rows.extend((0..FEATURE_COUNT).map(|i| record[i].parse::<f32>().unwrap()));
        expected.push(record[FEATURE_COUNT + 1].parse::<f64>().unwrap());
    }
    let got = model.predict(&rows).unwrap();
    let worst = got
        .iter()
        .zip(&expected)
        .map(|(&g, &e)| (f64::from(g) - e).abs())
        .fold(0.0, f64::max);
    assert!(worst <= 1e-5, "tract differs by {worst}");

    // ONNX Runtime as a second, independent reader.
    let script = repo().join("tests/python/onnxruntime_parity.py");
    let py = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
        .arg(&script)
        .arg(model_dir.join("model.onnx"))
        .arg(model_dir.join("test_rows.csv"))
        .output()
        .expect("python3 runs");
    assert!(
        py.status.success(),
        "ONNX Runtime parity failed (the test command installs onnxruntime):\n{}{}",
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr)
    );

    // predict scores every cart event point-in-time with the same bundle.
    let scored = dir.path().join("scored.csv");
    ok(&[
        "predict",
        "--input",
        s(&data),
        "--model",
        s(&model_dir.join("model.onnx")),
        "--out",
        s(&scored),
    ]);
    let mut scored_rows = csv::Reader::from_path(&scored).unwrap();
    let header = scored_rows.headers().unwrap().clone();
    assert_eq!(&header[3], "brand_freq");
    let n = scored_rows.records().count() as u64;
    assert_eq!(n, r["replay"]["cart_examples"].as_u64().unwrap());
}

fn csv_to_parquet(csv_path: &Path, parquet_path: &Path) {
    let (events, invalid) = cartscore_core::dataset::read_all(csv_path).unwrap();
    assert!(invalid.is_empty(), "{invalid:?}");
    let text = |f: &dyn Fn(&Event) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from(events.iter().map(f).collect::<Vec<_>>()))
    };
    let batch = RecordBatch::try_from_iter(vec![
        ("event_time", text(&|e| Some(e.event_time.to_rfc3339()))),
        (
            "event_type",
            text(&|e| Some(e.event_type.as_str().to_string())),
        ),
        (
            "product_id",
            Arc::new(UInt64Array::from_iter_values(
                events.iter().map(|e| e.product_id),
            )) as ArrayRef,
        ),
        (
            "category_id",
            Arc::new(UInt64Array::from_iter_values(
                events.iter().map(|e| e.category_id),
            )) as ArrayRef,
        ),
        ("category_code", text(&|e| e.category_code.clone())),
        ("brand", text(&|e| e.brand.clone())),
        (
            "price",
            Arc::new(Float64Array::from_iter_values(
                events.iter().map(|e| e.price),
            )) as ArrayRef,
        ),
        (
            "user_id",
            Arc::new(UInt64Array::from_iter_values(
                events.iter().map(|e| e.user_id),
            )) as ArrayRef,
        ),
        ("user_session", text(&|e| Some(e.user_session.clone()))),
    ])
    .unwrap();
    let mut writer = ArrowWriter::try_new(
        std::fs::File::create(parquet_path).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_and_csv_inputs_give_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let (data, parquet) = (dir.path().join("e.csv"), dir.path().join("lake/e.parquet"));
    std::fs::create_dir_all(parquet.parent().unwrap()).unwrap();
    ok(&[
        "synth",
        "--events",
        "120000",
        "--seed",
        "21",
        "--out",
        s(&data),
    ]);
    csv_to_parquet(&data, &parquet);
    let (a, b) = (dir.path().join("from_csv"), dir.path().join("from_parquet"));
    let models = dir.path().join("appliance-models");
    std::fs::create_dir_all(&models).unwrap();
    let args = ["--trials", "2", "--max-iterations", "40", "--threads", "2"];
    ok(&[&["train", "--input", s(&data), "--out", s(&a)][..], &args].concat());
    let stdout = ok(&[
        &[
            "train",
            "--input",
            s(parquet.parent().unwrap()),
            "--out",
            s(&b),
            "--publish",
            s(&models),
        ][..],
        &args,
    ]
    .concat());
    let (ra, rb) = (report(&a), report(&b));
    assert_eq!(ra["data_fingerprint"], rb["data_fingerprint"]);
    assert_eq!(ra["model_version"], rb["model_version"]);
    assert_eq!(
        std::fs::read(a.join("model.onnx")).unwrap(),
        std::fs::read(b.join("model.onnx")).unwrap()
    );
    // --publish delivers the bundle under its version, with no temporary left.
    let published = models.join(format!(
        "model-{}.onnx",
        rb["model_version"].as_str().unwrap()
    ));
    assert!(
        stdout.contains(&format!("published {}", published.display())),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read(&published).unwrap(),
        std::fs::read(b.join("model.onnx")).unwrap()
    );
    let names: Vec<_> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn the_real_slice_is_scored_by_the_demo_model() {
    let dataset = dataset();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scored.csv");
    let demo = repo().join("models/demo/model.onnx");
    let summary = ok(&[
        "predict",
        "--input",
        s(&dataset),
        "--model",
        s(&demo),
        "--out",
        s(&out),
    ]);
    // 165 cart events; the truncated last line is the one invalid row.
    assert!(
        summary.contains("scored 165 cart events of 17434 events (1 invalid rows skipped)"),
        "{summary}"
    );
    let mut reader = csv::Reader::from_path(&out).unwrap();
    for record in reader.records() {
        let p: f64 = record.unwrap()[FEATURE_COUNT + 4].parse().unwrap();
        assert!((0.0..=1.0).contains(&p));
    }
}

#[test]
fn the_demo_model_rebuilds_identically() {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("bash")
        .arg(repo().join("scripts/build-demo-model.sh"))
        .arg(dir.path())
        .env("TRAINER", env!("CARGO_BIN_EXE_cartscore-trainer"))
        .env("RUST_BACKTRACE", "0")
        .status()
        .expect("run build-demo-model.sh");
    assert!(status.success());
    let committed =
        TractModel::load(&repo().join("models/demo/model.onnx")).expect("committed demo loads");
    let rebuilt = TractModel::load(&dir.path().join("model.onnx")).expect("rebuilt demo loads");
    assert_eq!(rebuilt.metadata, committed.metadata);
    for g in &committed.metadata.golden_vectors {
        assert_eq!(
            rebuilt.predict(&g.features).unwrap(),
            committed.predict(&g.features).unwrap()
        );
    }
    assert_eq!(
        std::fs::read(dir.path().join("model.onnx")).unwrap(),
        std::fs::read(repo().join("models/demo/model.onnx")).unwrap(),
        "the demo bundle is byte-for-byte reproducible"
    );
}
