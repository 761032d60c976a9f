//! What a training run found, as one type: written as `report.json`,
//! rendered as `report.txt`, logged to MLflow and read by the CLI, all from
//! the same fields.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::files::ReadStats;
use crate::gbdt::{Refit, Trial};
use crate::metrics::{CalibrationBin, Scores};

#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub model_version: String,
    pub contract_version: u32,
    pub data_fingerprint: String,
    pub model_file: String,
    pub model_bytes: usize,
    /// The rows read, valid and invalid (by reason, with samples).
    pub input: ReadStats,
    pub replay: ReplaySummary,
    pub rows: Split<usize>,
    pub windows: Split<WindowSummary>,
    /// The tuned model on the test window (used once, for this report).
    pub test: Evaluation,
    pub validation: Evaluation,
    pub baselines: Baselines,
    /// The best reachable scores, when the data came with an oracle.
    pub oracle: Option<OracleScores>,
    pub auc_vs_oracle: Option<f64>,
    pub tuning: Tuning,
    pub parity: Parity,
    pub feature_importance_gain: BTreeMap<String, f64>,
    pub timings: Timings,
    /// Trained from the warehouse: the feature rows written back to gold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gold: Option<GoldSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplaySummary {
    pub events: u64,
    pub cart_examples: usize,
    pub peak_live_sessions: usize,
}

/// One value per time window.
#[derive(Debug, Clone, Serialize)]
pub struct Split<T> {
    pub train: T,
    pub validation: T,
    pub test: T,
}

#[derive(Debug, Clone, Serialize)]
pub struct WindowSummary {
    pub rows: usize,
    pub positives: usize,
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    #[serde(flatten)]
    pub scores: Scores,
    pub calibration: Vec<CalibrationBin>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Baselines {
    /// Every cart scored with the training window's purchase rate.
    pub base_rate: Scores,
    /// The original stack's model: one stump on its six features.
    pub original_stack: Scores,
}

impl Baselines {
    pub fn named(&self) -> [(&'static str, &Scores); 2] {
        [
            ("base_rate", &self.base_rate),
            ("original_stack", &self.original_stack),
        ]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct OracleScores {
    /// Test-window carts the oracle file has a probability for.
    pub matched: usize,
    pub roc_auc: f64,
    pub pr_auc: f64,
    pub log_loss: f64,
    pub brier: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Tuning {
    pub search: &'static str,
    pub selected_by: &'static str,
    pub early_stopping: &'static str,
    pub trials: Vec<Trial>,
    pub best: Trial,
    /// Rows the search trials trained and were judged on, when the windows
    /// were sampled (see `tune_rows`).
    pub sample: Option<SampleRows>,
    /// The winner trained again on the whole windows, after a sampled search.
    pub refit: Option<Refit>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SampleRows {
    pub train: usize,
    pub validation: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Parity {
    /// What scored every row against LightGBM: the compiled evaluator the
    /// appliance serves with.
    pub reader: &'static str,
    /// Test-window rows plus rows on split thresholds.
    pub rows: usize,
    pub edge_rows: usize,
    /// Largest |served - LightGBM| over all of them.
    pub max_abs_diff: f64,
    /// Rows tract scored too (the split-edge rows and a sample of the test
    /// window), and its largest difference from LightGBM on them.
    pub tract_rows: usize,
    pub tract_max_abs_diff: f64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub replay_seconds: f64,
    pub total_seconds: f64,
    /// Each step's wall time and the process's memory when it ended.
    pub stages: Vec<Stage>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub stage: &'static str,
    pub seconds: f64,
    /// Resident set size when the stage ended (`VmRSS`), in bytes.
    pub rss_bytes: Option<u64>,
    /// The run's peak resident set size so far (`VmHWM`), in bytes.
    pub peak_rss_bytes: Option<u64>,
}

impl Stage {
    /// Ends a stage that began at `started`, with the memory it leaves.
    pub fn end(stage: &'static str, started: std::time::Instant) -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kib = |key: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            let value: u64 = line[key.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(value * 1024)
        };
        let stage = Self {
            stage,
            seconds: started.elapsed().as_secs_f64(),
            rss_bytes: kib("VmRSS:"),
            peak_rss_bytes: kib("VmHWM:"),
        };
        tracing::info!(
            stage = stage.stage,
            seconds = stage.seconds,
            rss_mib = stage.rss_bytes.map(|b| b >> 20),
            peak_rss_mib = stage.peak_rss_bytes.map(|b| b >> 20),
            "stage done"
        );
        stage
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct GoldSummary {
    pub table: &'static str,
    pub rows: u64,
    pub seconds: f64,
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.4}")
    } else {
        "n/a".into()
    }
}

impl TrainReport {
    /// The human-readable twin of report.json.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let r = self;
        let _ = writeln!(out, "cartscore training report");
        let _ = writeln!(out, "model version      {}", r.model_version);
        let _ = writeln!(out, "contract version   {}", r.contract_version);
        let _ = writeln!(out, "data fingerprint   {}", r.data_fingerprint);
        let _ = writeln!(
            out,
            "input              {} rows, {} valid, {} invalid {}",
            r.input.rows,
            r.input.valid,
            r.input.invalid,
            serde_json::to_string(&r.input.invalid_by_reason).unwrap_or_default()
        );
        let _ = writeln!(
            out,
            "replay             {} events, {} cart examples",
            r.replay.events, r.replay.cart_examples
        );
        let _ = writeln!(out, "\nwindows (by time)");
        for (name, w) in [
            ("train", &r.windows.train),
            ("validation", &r.windows.validation),
            ("test", &r.windows.test),
        ] {
            let _ = writeln!(
                out,
                "  {name:<11} {:>8} rows {:>7} positive   {} .. {}",
                w.rows, w.positives, w.from, w.to
            );
        }
        let _ = writeln!(
            out,
            "\ntest window          ROC-AUC  PR-AUC  log-loss  Brier"
        );
        let mut line = |name: &str, roc: f64, pr: f64, log_loss: f64, brier: f64| {
            let _ = writeln!(
                out,
                "  {name:<18} {:>7}  {:>6}  {:>8}  {:>6}",
                num(roc),
                num(pr),
                num(log_loss),
                num(brier)
            );
        };
        let scores = |s: &Scores| (s.roc_auc, s.pr_auc, s.log_loss, s.brier);
        for (name, s) in [
            ("model", &r.test.scores),
            ("original stack", &r.baselines.original_stack),
            ("base rate", &r.baselines.base_rate),
        ] {
            let (a, b, c, d) = scores(s);
            line(name, a, b, c, d);
        }
        if let Some(o) = &r.oracle {
            line("oracle", o.roc_auc, o.pr_auc, o.log_loss, o.brier);
            let _ = writeln!(
                out,
                "  model AUC / oracle AUC = {}",
                r.auc_vs_oracle.map_or_else(|| "n/a".into(), num)
            );
        }
        let _ = writeln!(out, "\ncalibration (test)   predicted  observed   count");
        for bin in &r.test.calibration {
            let _ = writeln!(
                out,
                "  [{:.1}, {:.1})        {:>8}  {:>8}  {:>6}",
                bin.lower,
                bin.upper,
                num(bin.mean_predicted),
                num(bin.observed_rate),
                bin.count
            );
        }
        let t = &r.tuning;
        let _ = writeln!(
            out,
            "\ntuning             {} random trials in {:.1} s; best #{} validation AUC {} with {} trees",
            t.trials.len(),
            t.seconds,
            t.best.index,
            num(t.best.validation_auc),
            t.best.iterations
        );
        if let (Some(sample), Some(refit)) = (&t.sample, &t.refit) {
            let _ = writeln!(
                out,
                "                   (trials on {} training / {} validation rows sampled; the winner trained again on {} / {} rows in {:.1} s: validation AUC {} with {} trees)",
                sample.train,
                sample.validation,
                refit.train_rows,
                refit.validation_rows,
                refit.seconds,
                num(refit.validation_auc),
                refit.iterations
            );
        }
        let _ = writeln!(
            out,
            "best params        {}",
            // As a JSON object with sorted keys, like the bundle's params.
            serde_json::to_value(&t.best.params).unwrap_or_default()
        );
        let p = &r.parity;
        let _ = writeln!(
            out,
            "parity             {} rows ({} on split edges), served evaluator max |diff| {:e}; tract on {} of them, max |diff| {:e}",
            p.rows, p.edge_rows, p.max_abs_diff, p.tract_rows, p.tract_max_abs_diff
        );
        let _ = writeln!(out, "total time         {:.1} s", r.timings.total_seconds);
        for s in &r.timings.stages {
            let mib = |b: Option<u64>| b.map_or("?".to_string(), |b| (b >> 20).to_string());
            let _ = writeln!(
                out,
                "  {:<16} {:>8.1} s   RSS {:>6} MiB   peak {:>6} MiB",
                s.stage,
                s.seconds,
                mib(s.rss_bytes),
                mib(s.peak_rss_bytes)
            );
        }
        out
    }
}
