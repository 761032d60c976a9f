//! `train`, as its steps: [`replay`] the source through `core` into cart
//! examples -> [`Windows::split`] them by time and encode the strings ->
//! [`tune`] LightGBM on the validation window -> [`evaluate`] on the test
//! window against the baselines (and the oracle) -> [`export`] the ONNX
//! bundle -> [`check_parity`] with tract -> [`write_outputs`] -> (from the
//! warehouse) [`write_gold`].

mod bundle;
mod config;
mod evaluate;
mod windows;

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use cartscore_core::{CONTRACT_VERSION, FEATURE_NAMES};

use crate::files::ReadStats;
use crate::gbdt::{self, Matrix, TuneConfig, Tuned};
use crate::replay::{Example, Replay};
use crate::report::{
    GoldSummary, ReplaySummary, SampleRows, Split, Stage, Timings, TrainReport, Tuning,
};
use crate::source::{Events, SourceSpec};
use bundle::{check_parity, export, importance};
use evaluate::evaluate;
use windows::{Window, Windows};

pub use bundle::predict_parallel;
#[cfg(test)]
pub(crate) use bundle::shap_metadata;
pub use config::{TrainConfig, TrainRequest};

/// Trains, exports and verifies a bundle; writes `model.onnx` and the
/// reports into `request.out`.
pub fn run(request: &TrainRequest) -> Result<TrainReport> {
    let config = &request.config;
    config.validate()?;
    let started = Instant::now();
    let mut clock = StageClock::default();
    let replayed = replay(&request.source, config.error_budget)?;
    clock.end("replay");
    let examples = &replayed.replay.examples;
    let data = Windows::split(examples, &replayed.replay.interner, config)?;
    clock.end("split");
    let (tuned, tuning) = tune(&data, config, &mut clock)?;
    let booster = gbdt::load(&tuned.model_text)?;
    let evaluation = evaluate(&booster, &data, request.oracle.as_deref(), examples)?;
    clock.end("evaluate");
    let bundle = export(
        request,
        &tuned,
        &booster,
        &data,
        &evaluation,
        &replayed.replay,
    )?;
    clock.end("export");
    let parity = check_parity(
        &bundle,
        &booster,
        &tuned.model_text,
        &data.test,
        config.threads,
        &request.out,
    )?;
    clock.end("parity");
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
            peak_live_sessions: replayed.replay.peak_sessions,
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
            total_seconds: 0.0,
            stages: Vec::new(),
        },
        gold: None,
    };
    write_outputs(
        request,
        &bundle.bytes,
        &tuned.model_text,
        &data.test,
        &evaluation.test_p,
    )?;
    clock.end("write");
    if let SourceSpec::Postgres(url) = &request.source {
        report.gold = Some(write_gold(url, request, &report, examples, &data)?);
        clock.end("gold");
    }
    report.timings.stages = clock.stages;
    report.timings.total_seconds = started.elapsed().as_secs_f64();
    write_report_json(&request.out, &report)?;
    write_atomically(&request.out.join("report.txt"), report.text().as_bytes())?;
    Ok(report)
}

/// The steps' times and memory, in order.
struct StageClock {
    stages: Vec<Stage>,
    since: Instant,
}

impl Default for StageClock {
    fn default() -> Self {
        Self {
            stages: Vec::new(),
            since: Instant::now(),
        }
    }
}

impl StageClock {
    fn end(&mut self, stage: &'static str) {
        self.stages.push(Stage::end(stage, self.since));
        self.since = Instant::now();
    }
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
    replay.finish();
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

/// Random search on the validation window (never the test window), on
/// samples of both windows when they exceed `tune_rows`; then the winner
/// trained on the whole windows.
fn tune(data: &Windows, config: &TrainConfig, clock: &mut StageClock) -> Result<(Tuned, Tuning)> {
    let started = Instant::now();
    let tune_config = TuneConfig {
        trials: config.trials,
        threads: config.threads,
        seed: config.seed,
        max_iterations: config.max_iterations,
        early_stopping: config.early_stopping,
        num_leaves: config.num_leaves,
    };
    let (train, valid) = (&data.train.matrix, &data.validation.matrix);
    let train_sample = train.sample(config.tune_rows, config.seed);
    let valid_sample = valid.sample(config.tune_rows, config.seed.wrapping_add(1));
    let sample = (train_sample.is_some() || valid_sample.is_some()).then(|| SampleRows {
        train: train_sample.as_ref().map_or(train.rows(), Matrix::rows),
        validation: valid_sample.as_ref().map_or(valid.rows(), Matrix::rows),
    });
    let mut tuned = gbdt::tune(
        train_sample.as_ref().unwrap_or(train),
        valid_sample.as_ref().unwrap_or(valid),
        &tune_config,
    )?;
    drop((train_sample, valid_sample));
    clock.end("search");
    let refit = match sample {
        Some(_) => {
            let (text, refit) = gbdt::refit(train, valid, &tuned.best, &tune_config)?;
            tuned.model_text = text;
            tuned.iterations = refit.iterations;
            clock.end("refit");
            Some(refit)
        }
        None => None,
    };
    let tuning = Tuning {
        search: "random",
        selected_by: "validation roc_auc",
        early_stopping: "validation binary_logloss",
        trials: tuned.trials.clone(),
        best: tuned.best.clone(),
        sample,
        refit,
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((tuned, tuning))
}

/// The bundle (atomically, so a watcher never sees half of it) and
/// LightGBM's text of it, and the test rows when asked; the reports follow
/// once every step has run.
fn write_outputs(
    request: &TrainRequest,
    bytes: &[u8],
    model_text: &str,
    test: &Window,
    test_p: &[f64],
) -> Result<()> {
    std::fs::create_dir_all(&request.out)
        .with_context(|| format!("failed to create {}", request.out.display()))?;
    write_atomically(&request.out.join("model.onnx"), bytes)?;
    // LightGBM's own text of the model: the reference for predict
    // --lightgbm and for engines that read it (the bench's comparison).
    write_atomically(&request.out.join("lightgbm.txt"), model_text.as_bytes())?;
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
        .enumerate()
        .map(|(i, e)| crate::warehouse::GoldRow {
            time: e.time,
            session: &e.session,
            product_id: e.product_id,
            split: data.name_of(i),
            label: e.label,
            features: data.row(i),
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
