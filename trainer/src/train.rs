//! `train`, as its steps: [`replay`] the source through `core` into cart
//! examples -> [`Windows::split`] them by time and encode the strings ->
//! [`tune`] LightGBM on the validation window -> [`evaluate`] on the test
//! window against the baselines (and the oracle) -> [`export`] the ONNX
//! bundle -> [`check_parity`] with tract -> [`write_outputs`] -> (from the
//! warehouse) [`write_gold`].

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
use lightgbm3::Booster;
use serde::{Deserialize, Serialize};

use crate::export::{self as onnx, Tree};
use crate::files::ReadStats;
use crate::gbdt::{self, Matrix, TreeParams, TuneConfig, Tuned};
use crate::metrics::{Scores, calibration};
use crate::replay::{Example, Interner, Replay};
use crate::report::{
    Baselines, Evaluation, GoldSummary, OracleScores, Parity, ReplaySummary, Split, Timings,
    TrainReport, Tuning, WindowSummary,
};
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

/// Trains, exports and verifies a bundle; writes `model.onnx` and the
/// reports into `request.out`.
pub fn run(request: &TrainRequest) -> Result<TrainReport> {
    let config = &request.config;
    config.validate()?;
    let started = Instant::now();
    let replayed = replay(&request.source, config.error_budget)?;
    let examples = &replayed.replay.examples;
    let data = Windows::split(examples, &replayed.replay.interner, config)?;
    let (tuned, tuning) = tune(&data, config)?;
    let booster = gbdt::load(&tuned.model_text)?;
    let evaluation = evaluate(&booster, &data, request.oracle.as_deref(), examples)?;
    let bundle = export(
        request,
        &tuned,
        &booster,
        &data,
        &evaluation,
        &replayed.replay,
    )?;
    let parity = check_parity(&bundle, &booster, &data.test, config.threads)?;
    let model_file = request.out.join("model.onnx");
    let mut report = TrainReport {
        model_version: bundle.metadata.model_version.clone(),
        contract_version: CONTRACT_VERSION,
        data_fingerprint: bundle.metadata.data_fingerprint.clone(),
        model_file: model_file.display().to_string(),
        model_bytes: bundle.bytes.len(),
        input: replayed.stats,
        replay: ReplaySummary {
            events: replayed.replay.events,
            cart_examples: examples.len(),
            peak_live_sessions: replayed
                .replay
                .peak_sessions
                .max(replayed.replay.live_sessions()),
        },
        rows: Split {
            train: data.train.matrix.rows(),
            validation: data.validation.matrix.rows(),
            test: data.test.matrix.rows(),
        },
        windows: Split {
            train: data.train.summary(),
            validation: data.validation.summary(),
            test: data.test.summary(),
        },
        test: evaluation.test,
        validation: evaluation.validation,
        baselines: evaluation.baselines,
        auc_vs_oracle: evaluation.auc_vs_oracle,
        oracle: evaluation.oracle,
        tuning,
        parity,
        feature_importance_gain: importance(&booster),
        timings: Timings {
            replay_seconds: replayed.seconds,
            total_seconds: started.elapsed().as_secs_f64(),
        },
        gold: None,
    };
    write_outputs(
        request,
        &bundle.bytes,
        &report,
        &data.test,
        &evaluation.test_p,
    )?;
    if let SourceSpec::Postgres(url) = &request.source {
        report.gold = Some(write_gold(url, request, &report, examples, &data)?);
        write_report_json(&request.out, &report)?;
    }
    Ok(report)
}

/// Every valid event of the source replayed in time order through `core`.
struct Replayed {
    replay: Replay,
    stats: ReadStats,
    seconds: f64,
}

fn replay(source: &SourceSpec, error_budget: f64) -> Result<Replayed> {
    let started = Instant::now();
    let mut events = Events::open(source, error_budget)?;
    let mut replay = Replay::new();
    while let Some(event) = events.next_event()? {
        replay.push(&event);
    }
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        events = replay.events,
        examples = replay.examples.len(),
        seconds,
        "replay done"
    );
    ensure!(
        replay.examples.len() >= 100,
        "only {} cart events in the input: too few to train on",
        replay.examples.len()
    );
    Ok(Replayed {
        stats: events.stats().clone(),
        replay,
        seconds,
    })
}

/// The examples of one time window, encoded.
struct Window {
    matrix: Matrix,
    examples: Vec<usize>,
    from: Timestamp,
    to: Timestamp,
}

impl Window {
    fn of(
        examples: &[Example],
        range: std::ops::Range<usize>,
        encoded: &[[f32; FEATURE_COUNT]],
    ) -> Self {
        let mut matrix = Matrix::new(FEATURE_COUNT);
        for i in range.clone() {
            matrix.push(&encoded[i], examples[i].label);
        }
        Self {
            matrix,
            from: examples.get(range.start).map_or(Timestamp(0), |e| e.time),
            to: examples
                .get(range.end.saturating_sub(1))
                .map_or(Timestamp(0), |e| e.time),
            examples: range.collect(),
        }
    }

    fn positives(&self) -> usize {
        self.matrix.labels.iter().filter(|&&l| l).count()
    }

    fn summary(&self) -> WindowSummary {
        WindowSummary {
            rows: self.matrix.rows(),
            positives: self.positives(),
            from: self.from.to_rfc3339(),
            to: self.to.to_rfc3339(),
        }
    }
}

/// The examples split by time into training, validation and test windows,
/// with the encoding tables learned on the training window.
struct Windows {
    tables: EncodingTables,
    /// Every example's row, in example order (training rows out-of-fold).
    encoded: Vec<[f32; FEATURE_COUNT]>,
    train_end: usize,
    valid_end: usize,
    train: Window,
    validation: Window,
    test: Window,
}

impl Windows {
    fn split(examples: &[Example], names: &Interner, config: &TrainConfig) -> Result<Self> {
        let train_end = cut(examples, config.train_fraction);
        let valid_end =
            cut(examples, config.train_fraction + config.validation_fraction).max(train_end + 1);
        ensure!(
            valid_end < examples.len(),
            "the test window is empty: add data or lower the training fractions"
        );
        let (tables, encoded) = encode_all(examples, train_end, names);
        let windows = Self {
            train: Window::of(examples, 0..train_end, &encoded),
            validation: Window::of(examples, train_end..valid_end, &encoded),
            test: Window::of(examples, valid_end..examples.len(), &encoded),
            tables,
            encoded,
            train_end,
            valid_end,
        };
        for (name, w) in [
            ("train", &windows.train),
            ("validation", &windows.validation),
            ("test", &windows.test),
        ] {
            let positives = w.positives();
            if positives == 0 || positives == w.matrix.rows() {
                bail!(
                    "the {name} window ({} rows) has only one class: add data",
                    w.matrix.rows()
                );
            }
        }
        Ok(windows)
    }

    /// The window example `i` belongs to.
    fn name_of(&self, i: usize) -> &'static str {
        match i {
            i if i < self.train_end => "train",
            i if i < self.valid_end => "validation",
            _ => "test",
        }
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

/// Random search on the validation window (never the test window).
fn tune(data: &Windows, config: &TrainConfig) -> Result<(Tuned, Tuning)> {
    let started = Instant::now();
    let tuned = gbdt::tune(
        &data.train.matrix,
        &data.validation.matrix,
        &TuneConfig {
            trials: config.trials,
            threads: config.threads,
            seed: config.seed,
            max_iterations: config.max_iterations,
            early_stopping: config.early_stopping,
        },
    )?;
    let tuning = Tuning {
        search: "random",
        selected_by: "validation roc_auc",
        early_stopping: "validation binary_logloss",
        trials: tuned.trials.clone(),
        best: tuned.best.clone(),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((tuned, tuning))
}

/// The tuned model on the test and validation windows, and the baselines
/// and the oracle on the test window.
struct Evaluated {
    test: Evaluation,
    /// The model's test-window probabilities (for `test_rows.csv`).
    test_p: Vec<f64>,
    validation: Evaluation,
    baselines: Baselines,
    oracle: Option<OracleScores>,
    auc_vs_oracle: Option<f64>,
}

fn evaluation(probabilities: &[f64], labels: &[bool]) -> Evaluation {
    Evaluation {
        scores: Scores::of(probabilities, labels),
        calibration: calibration(probabilities, labels),
    }
}

fn evaluate(
    booster: &Booster,
    data: &Windows,
    oracle: Option<&Path>,
    examples: &[Example],
) -> Result<Evaluated> {
    let (train, test) = (&data.train.matrix, &data.test.matrix);
    let test_p = gbdt::predict(booster, test)?;
    let valid_p = gbdt::predict(booster, &data.validation.matrix)?;
    let base_rate = data.train.positives() as f64 / train.rows() as f64;
    let base_p = vec![base_rate; test.rows()];
    let stump = gbdt::stump(&train.select(&ORIGINAL_SIX))?;
    let stump_p = gbdt::predict(&stump, &test.select(&ORIGINAL_SIX))?;
    let oracle = match oracle {
        None => None,
        Some(path) => Some(oracle_scores(path, &data.test, examples)?),
    };
    let test_eval = evaluation(&test_p, &test.labels);
    let auc_vs_oracle = oracle
        .as_ref()
        .map(|o| test_eval.scores.roc_auc / o.roc_auc);
    Ok(Evaluated {
        test: test_eval,
        test_p,
        validation: evaluation(&valid_p, &data.validation.matrix.labels),
        baselines: Baselines {
            base_rate: Scores::of(&base_p, &test.labels),
            original_stack: Scores::of(&stump_p, &test.labels),
        },
        oracle,
        auc_vs_oracle,
    })
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

/// The oracle's probabilities on the test window's carts: the best reachable
/// scores for synthetic data.
fn oracle_scores(path: &Path, test: &Window, examples: &[Example]) -> Result<OracleScores> {
    let table = load_oracle(path)?;
    let (mut p, mut labels) = (Vec::new(), Vec::new());
    for &i in &test.examples {
        let e = &examples[i];
        if let Some(&q) = table.get(&(e.time.micros(), e.session.to_string(), e.product_id)) {
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
    Ok(OracleScores {
        matched: p.len(),
        roc_auc: scores.roc_auc,
        pr_auc: scores.pr_auc,
        log_loss: scores.log_loss,
        brier: scores.brier,
    })
}

/// Who trained the bundle and how; part of the bundle's bytes, so it holds
/// no timings (the same data gives the same bytes).
#[derive(Debug, Serialize)]
struct TrainerParams<'a> {
    trainer: String,
    engine: &'static str,
    trees: usize,
    best_params: &'a TreeParams,
    best_trial: usize,
    iterations: i32,
    seed: u64,
}

/// The exported bundle and the trees it was made from.
struct Bundle {
    bytes: Vec<u8>,
    metadata: BundleMetadata,
    trees: Vec<Tree>,
}

/// The ONNX bundle: trees, encodings, golden vectors (test rows and rows on
/// split thresholds, with LightGBM's probabilities) and the metadata.
fn export(
    request: &TrainRequest,
    tuned: &Tuned,
    booster: &Booster,
    data: &Windows,
    evaluated: &Evaluated,
    replay: &Replay,
) -> Result<Bundle> {
    let config = &request.config;
    let test = &data.test.matrix;
    let trees = onnx::parse_lightgbm(&tuned.model_text)?;
    let n_golden = config.golden_vectors.min(test.rows());
    let mut golden_rows: Vec<f32> = (0..n_golden)
        .flat_map(|k| test.row(k * test.rows() / n_golden).to_vec())
        .collect();
    golden_rows.extend(onnx::edge_rows(&trees, &test.values, 8));
    let golden_p = lightgbm_predict(booster, &golden_rows)?;
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
    let (test_scores, valid_scores) = (&evaluated.test.scores, &evaluated.validation.scores);
    let metrics = BTreeMap::from([
        ("test_roc_auc".to_string(), test_scores.roc_auc),
        ("test_pr_auc".to_string(), test_scores.pr_auc),
        ("test_log_loss".to_string(), test_scores.log_loss),
        ("test_brier".to_string(), test_scores.brier),
        ("validation_roc_auc".to_string(), valid_scores.roc_auc),
    ]);
    let params = TrainerParams {
        trainer: format!("cartscore-trainer {}", env!("CARGO_PKG_VERSION")),
        engine: "lightgbm",
        trees: trees.len(),
        best_params: &tuned.best.params,
        best_trial: tuned.best.index,
        iterations: tuned.best.iterations,
        seed: config.seed,
    };
    let metadata = BundleMetadata {
        model_version,
        contract_version: CONTRACT_VERSION,
        feature_names: FEATURE_NAMES.iter().map(|s| s.to_string()).collect(),
        encodings: data.tables.clone(),
        data_fingerprint: fingerprint,
        metrics,
        params: serde_json::to_value(&params)?,
        golden_vectors,
    };
    let bytes = onnx::encode(&onnx::onnx_model(&trees, &metadata));
    Ok(Bundle {
        bytes,
        metadata,
        trees,
    })
}

fn lightgbm_predict(booster: &Booster, rows: &[f32]) -> Result<Vec<f64>> {
    booster
        .predict_with_params(rows, FEATURE_COUNT as i32, true, "num_threads=1")
        .map_err(|e| anyhow::anyhow!("LightGBM prediction failed: {e}"))
}

/// tract, reading the exported bytes, must give LightGBM's probabilities on
/// the whole test window and on up to 2,000 rows sitting on split edges.
fn check_parity(
    bundle: &Bundle,
    booster: &Booster,
    test: &Window,
    threads: usize,
) -> Result<Parity> {
    let started = Instant::now();
    let tract = TractModel::from_bytes(&bundle.bytes)
        .context("the exported bundle does not load in tract")?;
    let mut rows = test.matrix.values.clone();
    let edge = onnx::edge_rows(&bundle.trees, &test.matrix.values, 2_000);
    rows.extend_from_slice(&edge);
    let reference = lightgbm_predict(booster, &rows)?;
    let tract_p = predict_parallel(&tract, &rows, threads)?;
    let max_diff = reference
        .iter()
        .zip(&tract_p)
        .map(|(&a, &b)| (a - f64::from(b)).abs())
        .fold(0.0, f64::max);
    ensure!(
        max_diff <= cartscore_core::bundle::GOLDEN_TOLERANCE,
        "tract disagrees with LightGBM by {max_diff:e} on the test window: the export is wrong"
    );
    Ok(Parity {
        reader: "tract-onnx 0.23",
        rows: reference.len(),
        edge_rows: edge.len() / FEATURE_COUNT,
        max_abs_diff: max_diff,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn importance(booster: &Booster) -> BTreeMap<String, f64> {
    booster
        .feature_importance(lightgbm3::ImportanceType::Gain)
        .map(|g| {
            FEATURE_NAMES
                .iter()
                .zip(g)
                .map(|(n, v)| (n.to_string(), v))
                .collect()
        })
        .unwrap_or_default()
}

/// The bundle (atomically, so a watcher never sees half of it), then the
/// reports, and the test rows when asked.
fn write_outputs(
    request: &TrainRequest,
    bytes: &[u8],
    report: &TrainReport,
    test: &Window,
    test_p: &[f64],
) -> Result<()> {
    std::fs::create_dir_all(&request.out)
        .with_context(|| format!("failed to create {}", request.out.display()))?;
    write_atomically(&request.out.join("model.onnx"), bytes)?;
    write_report_json(&request.out, report)?;
    write_atomically(&request.out.join("report.txt"), report.text().as_bytes())?;
    if request.write_test_rows {
        write_test_rows(&request.out.join("test_rows.csv"), &test.matrix, test_p)?;
    }
    Ok(())
}

fn write_report_json(out: &Path, report: &TrainReport) -> Result<()> {
    write_atomically(
        &out.join("report.json"),
        serde_json::to_string_pretty(report)?.as_bytes(),
    )
}

/// Trained from the warehouse: the replay's point-in-time rows, exactly as
/// the model saw them, go back to `gold.feature_rows`.
fn write_gold(
    url: &str,
    request: &TrainRequest,
    report: &TrainReport,
    examples: &[Example],
    data: &Windows,
) -> Result<GoldSummary> {
    let started = Instant::now();
    let rows = examples
        .iter()
        .zip(&data.encoded)
        .enumerate()
        .map(|(i, (e, row))| crate::warehouse::GoldRow {
            time: e.time,
            session: &e.session,
            product_id: e.product_id,
            split: data.name_of(i),
            label: e.label,
            features: row,
        });
    let written = crate::warehouse::Warehouse::connect(url)?.write_gold(
        &crate::warehouse::GoldRun {
            model_version: &report.model_version,
            data_fingerprint: &report.data_fingerprint,
            contract_version: CONTRACT_VERSION,
            source: &request.source.describe(),
            report,
        },
        rows,
    )?;
    Ok(GoldSummary {
        table: "gold.feature_rows",
        rows: written,
        seconds: started.elapsed().as_secs_f64(),
    })
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
