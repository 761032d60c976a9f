//! `train`: replay -> labelled examples -> time split -> encodings -> tuned
//! LightGBM -> evaluation against baselines (and the oracle) -> ONNX bundle
//! verified with tract.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use cartscore_core::encoding::{DEFAULT_MIN_COUNT, DEFAULT_SMOOTHING};
use cartscore_core::features::ORIGINAL_SIX;
use cartscore_core::{
    BundleMetadata, CONTRACT_VERSION, CategoryTable, EncodingTables, FEATURE_COUNT, FEATURE_NAMES,
    GoldenVector, Timestamp, TractModel,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::export;
use crate::gbdt::{self, Matrix, TuneConfig};
use crate::metrics::{Scores, calibration};
use crate::replay::{Example, Interner, Replay};
use crate::source::{Events, SourceSpec};

/// Everything `train` can be told; a TOML file may set any of it, flags win.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub trials: usize,
    pub threads: usize,
    pub seed: u64,
    pub max_iterations: u32,
    pub early_stopping: u32,
    /// Share of cart examples (by time) in the training window.
    pub train_fraction: f64,
    /// Share in the validation window; the rest is the test window.
    pub validation_fraction: f64,
    /// Largest tolerated share of invalid input rows.
    pub error_budget: f64,
    pub golden_vectors: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            trials: 8,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            seed: 1,
            max_iterations: 400,
            early_stopping: 30,
            train_fraction: 0.7,
            validation_fraction: 0.15,
            error_budget: 0.05,
            golden_vectors: 32,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, value: String, why: &str| {
            anyhow::anyhow!("config field `{field}` = {value}: {why}")
        };
        if self.trials == 0 {
            return Err(bad("trials", self.trials.to_string(), "must be at least 1"));
        }
        if !(0.1..0.95).contains(&self.train_fraction) {
            return Err(bad(
                "train_fraction",
                self.train_fraction.to_string(),
                "must be in [0.1, 0.95)",
            ));
        }
        if !(0.01..0.5).contains(&self.validation_fraction)
            || self.train_fraction + self.validation_fraction >= 0.99
        {
            return Err(bad(
                "validation_fraction",
                self.validation_fraction.to_string(),
                "must be in [0.01, 0.5) and leave at least 1% for the test window",
            ));
        }
        if !(0.0..=1.0).contains(&self.error_budget) {
            return Err(bad(
                "error_budget",
                self.error_budget.to_string(),
                "must be a fraction in [0, 1]",
            ));
        }
        if self.golden_vectors == 0 {
            return Err(bad("golden_vectors", "0".into(), "must be at least 1"));
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct TrainRequest {
    pub source: SourceSpec,
    pub out: PathBuf,
    pub oracle: Option<PathBuf>,
    pub model_version: Option<String>,
    pub write_test_rows: bool,
    pub config: TrainConfig,
}

/// The examples of one time window, encoded.
struct Window {
    matrix: Matrix,
    examples: Vec<usize>,
    from: Timestamp,
    to: Timestamp,
}

fn window(
    examples: &[Example],
    range: std::ops::Range<usize>,
    encoded: &[[f32; FEATURE_COUNT]],
) -> Window {
    let mut matrix = Matrix::new(FEATURE_COUNT);
    for i in range.clone() {
        matrix.push(&encoded[i], examples[i].label);
    }
    Window {
        matrix,
        from: examples.get(range.start).map_or(Timestamp(0), |e| e.time),
        to: examples
            .get(range.end.saturating_sub(1))
            .map_or(Timestamp(0), |e| e.time),
        examples: range.collect(),
    }
}

/// Index where the time window starting at example `i` begins: ties in time
/// stay in the earlier window so no timestamp is in two windows.
fn cut(examples: &[Example], fraction: f64) -> usize {
    let mut i = ((examples.len() as f64) * fraction) as usize;
    while i > 0 && i < examples.len() && examples[i].time == examples[i - 1].time {
        i += 1;
    }
    i.min(examples.len())
}

fn learn_tables<'a>(
    examples: impl Iterator<Item = &'a Example> + Clone,
    names: &Interner,
) -> EncodingTables {
    let column = |k: usize| {
        CategoryTable::learn(
            examples.clone().map(|e| (names.name(e.keys[k]), e.label)),
            DEFAULT_SMOOTHING,
            DEFAULT_MIN_COUNT,
        )
    };
    EncodingTables {
        brand: column(0),
        category_l1: column(1),
        category_l2: column(2),
    }
}

const FOLDS: usize = 5;

/// Training rows get out-of-fold encodings (a row never sees its own label
/// through its brand's rate); validation and test rows use the tables learned
/// on the whole training window, which the bundle ships.
fn encode_all(
    examples: &[Example],
    train_end: usize,
    names: &Interner,
) -> (EncodingTables, Vec<[f32; FEATURE_COUNT]>) {
    let train = &examples[..train_end];
    let tables = learn_tables(train.iter(), names);
    let mut encoded: Vec<[f32; FEATURE_COUNT]> = Vec::with_capacity(examples.len());
    let fold_tables: Vec<EncodingTables> = (0..FOLDS)
        .map(|fold| {
            learn_tables(
                train
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % FOLDS != fold)
                    .map(|(_, e)| e),
                names,
            )
        })
        .collect();
    for (i, example) in examples.iter().enumerate() {
        let t = if i < train_end {
            &fold_tables[i % FOLDS]
        } else {
            &tables
        };
        encoded.push(example.encoded(names, t).0);
    }
    (tables, encoded)
}

fn load_oracle(path: &Path) -> Result<HashMap<(i64, String, u64), f64>> {
    let mut reader = csv::Reader::from_path(path)
        .with_context(|| format!("failed to open oracle file {}", path.display()))?;
    let mut out = HashMap::new();
    for (i, record) in reader.records().enumerate() {
        let record =
            record.with_context(|| format!("{}:{}: bad oracle row", path.display(), i + 2))?;
        let parse = || -> Option<((i64, String, u64), f64)> {
            let time = Timestamp::parse(record.get(0)?).ok()?;
            Some((
                (
                    time.micros(),
                    record.get(1)?.to_owned(),
                    record.get(2)?.parse().ok()?,
                ),
                record.get(3)?.parse().ok()?,
            ))
        };
        let (key, p) =
            parse().with_context(|| format!("{}:{}: bad oracle row", path.display(), i + 2))?;
        out.insert(key, p);
    }
    Ok(out)
}

fn scores_json(scores: &Scores, probabilities: &[f64], labels: &[bool]) -> serde_json::Value {
    let mut v = serde_json::to_value(scores).unwrap_or_default();
    v["calibration"] = serde_json::to_value(calibration(probabilities, labels)).unwrap_or_default();
    v
}

pub fn run(request: &TrainRequest) -> Result<serde_json::Value> {
    let config = &request.config;
    config.validate()?;
    let started = Instant::now();

    // 1. Replay every valid event in time order through the shared crate.
    let mut source = Events::open(&request.source, config.error_budget)?;
    let mut replay = Replay::new();
    while let Some(event) = source.next_event()? {
        replay.push(&event);
    }
    let read_stats = source.stats().clone();
    let replay_seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        events = replay.events,
        examples = replay.examples.len(),
        seconds = replay_seconds,
        "replay done"
    );
    let examples = &replay.examples;
    ensure!(
        examples.len() >= 100,
        "only {} cart events in the input: too few to train on",
        examples.len()
    );

    // 2. Split by time.
    let train_end = cut(examples, config.train_fraction);
    let valid_end =
        cut(examples, config.train_fraction + config.validation_fraction).max(train_end + 1);
    ensure!(
        valid_end < examples.len(),
        "the test window is empty: add data or lower the training fractions"
    );
    let (tables, encoded) = encode_all(examples, train_end, &replay.interner);
    let train = window(examples, 0..train_end, &encoded);
    let valid = window(examples, train_end..valid_end, &encoded);
    let test = window(examples, valid_end..examples.len(), &encoded);
    for (name, w) in [("train", &train), ("validation", &valid), ("test", &test)] {
        let positives = w.matrix.labels.iter().filter(|&&l| l).count();
        if positives == 0 || positives == w.matrix.rows() {
            bail!(
                "the {name} window ({} rows) has only one class: add data",
                w.matrix.rows()
            );
        }
    }

    // 3. Tune on the validation window.
    let tune_started = Instant::now();
    let tuned = gbdt::tune(
        &train.matrix,
        &valid.matrix,
        &TuneConfig {
            trials: config.trials,
            threads: config.threads,
            seed: config.seed,
            max_iterations: config.max_iterations,
            early_stopping: config.early_stopping,
        },
    )?;
    let tune_seconds = tune_started.elapsed().as_secs_f64();
    let booster = gbdt::load(&tuned.model_text)?;

    // 4. Evaluate on the test window, next to the baselines.
    let test_p = gbdt::predict(&booster, &test.matrix)?;
    let valid_p = gbdt::predict(&booster, &valid.matrix)?;
    let test_scores = Scores::of(&test_p, &test.matrix.labels);
    let valid_scores = Scores::of(&valid_p, &valid.matrix.labels);
    let base_rate =
        train.matrix.labels.iter().filter(|&&l| l).count() as f64 / train.matrix.rows() as f64;
    let base_p = vec![base_rate; test.matrix.rows()];
    let stump = gbdt::stump(&train.matrix.select(&ORIGINAL_SIX))?;
    let stump_p = gbdt::predict(&stump, &test.matrix.select(&ORIGINAL_SIX))?;
    let mut baselines = serde_json::Map::new();
    baselines.insert(
        "base_rate".into(),
        serde_json::to_value(Scores::of(&base_p, &test.matrix.labels))?,
    );
    baselines.insert(
        "original_stack".into(),
        serde_json::to_value(Scores::of(&stump_p, &test.matrix.labels))?,
    );

    let oracle = match &request.oracle {
        None => serde_json::Value::Null,
        Some(path) => {
            let table = load_oracle(path)?;
            let (mut p, mut labels) = (Vec::new(), Vec::new());
            for &i in &test.examples {
                let e = &examples[i];
                if let Some(&q) = table.get(&(e.time.micros(), e.session.to_string(), e.product_id))
                {
                    p.push(q);
                    labels.push(e.label);
                }
            }
            ensure!(
                !p.is_empty(),
                "the oracle file {} matches no test-window cart event",
                path.display()
            );
            let scores = Scores::of(&p, &labels);
            json!({ "matched": p.len(), "roc_auc": scores.roc_auc, "pr_auc": scores.pr_auc,
                    "log_loss": scores.log_loss, "brier": scores.brier })
        }
    };

    // 5. Export the bundle with golden vectors and check it in tract.
    let trees = export::parse_lightgbm(&tuned.model_text)?;
    let n_golden = config.golden_vectors.min(test.matrix.rows());
    let mut golden_rows: Vec<f32> = (0..n_golden)
        .flat_map(|k| test.matrix.row(k * test.matrix.rows() / n_golden).to_vec())
        .collect();
    golden_rows.extend(export::edge_rows(&trees, &test.matrix.values, 8));
    let golden_p = booster
        .predict_with_params(&golden_rows, FEATURE_COUNT as i32, true, "num_threads=1")
        .map_err(|e| anyhow::anyhow!("LightGBM prediction failed: {e}"))?;
    let golden_vectors: Vec<GoldenVector> = golden_rows
        .chunks(FEATURE_COUNT)
        .zip(&golden_p)
        .map(|(row, &p)| GoldenVector {
            features: row.to_vec(),
            probability: p,
        })
        .collect();
    let fingerprint = replay.fingerprint();
    let model_hash = blake3::hash(tuned.model_text.as_bytes()).to_hex()[..8].to_string();
    let model_version = request
        .model_version
        .clone()
        .unwrap_or_else(|| format!("{}-{model_hash}", &fingerprint[..8]));
    let metrics = BTreeMap::from([
        ("test_roc_auc".to_string(), test_scores.roc_auc),
        ("test_pr_auc".to_string(), test_scores.pr_auc),
        ("test_log_loss".to_string(), test_scores.log_loss),
        ("test_brier".to_string(), test_scores.brier),
        ("validation_roc_auc".to_string(), valid_scores.roc_auc),
    ]);
    let metadata = BundleMetadata {
        model_version: model_version.clone(),
        contract_version: CONTRACT_VERSION,
        feature_names: FEATURE_NAMES.iter().map(|s| s.to_string()).collect(),
        encodings: tables,
        data_fingerprint: fingerprint.clone(),
        metrics,
        params: json!({
            "trainer": format!("cartscore-trainer {}", env!("CARGO_PKG_VERSION")),
            "engine": "lightgbm",
            "trees": trees.len(),
            // Timings stay out of the bundle so the same data gives the same bytes.
            "best_params": tuned.best.params,
            "best_trial": tuned.best.index,
            "iterations": tuned.best.iterations,
            "seed": config.seed,
        }),
        golden_vectors,
    };
    let bytes = export::encode(&export::onnx_model(&trees, &metadata));
    let parity_started = Instant::now();
    let tract =
        TractModel::from_bytes(&bytes).context("the exported bundle does not load in tract")?;
    let mut parity_rows = test.matrix.values.clone();
    let edge = export::edge_rows(&trees, &test.matrix.values, 2_000);
    parity_rows.extend_from_slice(&edge);
    let reference = booster
        .predict_with_params(&parity_rows, FEATURE_COUNT as i32, true, "num_threads=1")
        .map_err(|e| anyhow::anyhow!("LightGBM prediction failed: {e}"))?;
    let tract_p = predict_parallel(&tract, &parity_rows, config.threads)?;
    let max_diff = reference
        .iter()
        .zip(&tract_p)
        .map(|(&a, &b)| (a - f64::from(b)).abs())
        .fold(0.0, f64::max);
    ensure!(
        max_diff <= cartscore_core::bundle::GOLDEN_TOLERANCE,
        "tract disagrees with LightGBM by {max_diff:e} on the test window: the export is wrong"
    );
    let parity_seconds = parity_started.elapsed().as_secs_f64();

    // 6. Write the bundle atomically, then the reports.
    std::fs::create_dir_all(&request.out)
        .with_context(|| format!("failed to create {}", request.out.display()))?;
    let model_path = request.out.join("model.onnx");
    write_atomically(&model_path, &bytes)?;
    let importance = booster
        .feature_importance(lightgbm3::ImportanceType::Gain)
        .map(|g| {
            FEATURE_NAMES
                .iter()
                .zip(g)
                .map(|(n, v)| (n.to_string(), v))
                .collect::<BTreeMap<_, _>>()
        })
        .unwrap_or_default();
    let window_json = |w: &Window| {
        json!({ "rows": w.matrix.rows(), "positives": w.matrix.labels.iter().filter(|&&l| l).count(),
        "from": w.from.to_rfc3339(), "to": w.to.to_rfc3339() })
    };
    let auc_vs_oracle = oracle
        .get("roc_auc")
        .and_then(|v| v.as_f64())
        .map(|o| test_scores.roc_auc / o);
    let report = json!({
        "model_version": model_version,
        "contract_version": CONTRACT_VERSION,
        "data_fingerprint": fingerprint,
        "model_file": model_path.display().to_string(),
        "model_bytes": bytes.len(),
        "input": read_stats,
        "replay": { "events": replay.events, "cart_examples": examples.len(), "peak_live_sessions": replay.peak_sessions.max(replay.live_sessions()) },
        "rows": { "train": train.matrix.rows(), "validation": valid.matrix.rows(), "test": test.matrix.rows() },
        "windows": { "train": window_json(&train), "validation": window_json(&valid), "test": window_json(&test) },
        "test": scores_json(&test_scores, &test_p, &test.matrix.labels),
        "validation": scores_json(&valid_scores, &valid_p, &valid.matrix.labels),
        "baselines": baselines,
        "oracle": oracle,
        "auc_vs_oracle": auc_vs_oracle,
        "tuning": { "search": "random", "selected_by": "validation roc_auc", "early_stopping": "validation binary_logloss",
                    "trials": tuned.trials, "best": tuned.best, "seconds": tune_seconds },
        "parity": { "reader": "tract-onnx 0.23", "rows": reference.len(), "edge_rows": edge.len() / FEATURE_COUNT,
                    "max_abs_diff": max_diff, "seconds": parity_seconds },
        "feature_importance_gain": importance,
        "timings": { "replay_seconds": replay_seconds, "total_seconds": started.elapsed().as_secs_f64() },
    });
    write_atomically(
        &request.out.join("report.json"),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    write_atomically(
        &request.out.join("report.txt"),
        crate::report::text(&report).as_bytes(),
    )?;
    if request.write_test_rows {
        write_test_rows(&request.out.join("test_rows.csv"), &test.matrix, &test_p)?;
    }
    let mut report = report;
    // 7. Trained from the warehouse: write the feature rows back to gold.
    if let SourceSpec::Postgres(url) = &request.source {
        let gold_started = Instant::now();
        let split = |i: usize| match i {
            i if i < train_end => "train",
            i if i < valid_end => "validation",
            _ => "test",
        };
        let rows = examples
            .iter()
            .zip(&encoded)
            .enumerate()
            .map(|(i, (e, row))| crate::warehouse::GoldRow {
                time: e.time,
                session: &e.session,
                product_id: e.product_id,
                split: split(i),
                label: e.label,
                features: row,
            });
        let written = crate::warehouse::Warehouse::connect(url)?.write_gold(
            &crate::warehouse::GoldRun {
                model_version: &model_version,
                data_fingerprint: &fingerprint,
                contract_version: CONTRACT_VERSION,
                source: &request.source.describe(),
                report: &report,
            },
            rows,
        )?;
        report["gold"] = json!({ "table": "gold.feature_rows", "rows": written,
                                 "seconds": gold_started.elapsed().as_secs_f64() });
        write_atomically(
            &request.out.join("report.json"),
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
    }
    Ok(report)
}

/// Scores rows with tract on `threads` threads (tract's tree walk is slow, and
/// the parity check covers the whole test window).
pub fn predict_parallel(model: &TractModel, rows: &[f32], threads: usize) -> Result<Vec<f32>> {
    const CHUNK_ROWS: usize = 256;
    let chunks: Vec<&[f32]> = rows.chunks(CHUNK_ROWS * FEATURE_COUNT).collect();
    let mut out = Vec::with_capacity(rows.len() / FEATURE_COUNT);
    for scored in crate::parallel::map(&chunks, threads, |_, chunk| model.predict(chunk)) {
        out.extend(scored?);
    }
    Ok(out)
}

/// Test-window rows with the trainer's probabilities, for independent readers
/// (the ONNX Runtime parity test).
fn write_test_rows(path: &Path, matrix: &Matrix, probabilities: &[f64]) -> Result<()> {
    let mut writer = csv::Writer::from_path(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    let mut header: Vec<String> = FEATURE_NAMES.iter().map(|s| s.to_string()).collect();
    header.extend(["label".into(), "probability".into()]);
    writer.write_record(&header)?;
    for (i, (label, probability)) in matrix.labels.iter().zip(probabilities).enumerate() {
        let mut record: Vec<String> = matrix.row(i).iter().map(|v| v.to_string()).collect();
        record.push(u8::from(*label).to_string());
        record.push(format!("{probability:.9}"));
        writer.write_record(&record)?;
    }
    writer.flush()?;
    Ok(())
}

/// Writes beside the target and renames, so a watcher never sees half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("failed to write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("failed to move {} into place", path.display()))?;
    Ok(())
}
