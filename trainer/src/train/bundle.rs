//! The deployable bundle: LightGBM's trees as an ONNX
//! `TreeEnsembleClassifier` with the encodings, golden vectors and metadata,
//! then read back by tract, which must give LightGBM's probabilities.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use cartscore_core::compiled::CompiledEnsemble;
use cartscore_core::{
    BundleMetadata, CONTRACT_VERSION, DataProfile, FEATURE_COUNT, FEATURE_NAMES, GoldenVector,
    ShapMetadata, TractModel,
};
use lightgbm3::Booster;
use serde::Serialize;

use super::config::TrainRequest;
use super::evaluate::Evaluated;
use super::windows::{Window, Windows};
use crate::export::{self as onnx, Tree};
use crate::gbdt::{TreeParams, Tuned};
use crate::replay::Replay;
use crate::report::Parity;

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
pub(super) struct Bundle {
    pub(super) bytes: Vec<u8>,
    pub(super) metadata: BundleMetadata,
    trees: Vec<Tree>,
}

/// The ONNX bundle: trees, encodings, golden vectors (test rows and rows on
/// split thresholds, with LightGBM's probabilities), the data profile (the
/// training window's features, the validation window's scores) and the
/// metadata.
pub(super) fn export(
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
    let shap = shap_metadata(booster, &trees, &golden_rows)?;
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
        iterations: tuned.iterations,
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
        profile: Some(DataProfile::of(
            &served_rows(replay, data),
            &evaluated.validation_p,
        )),
        shap,
    };
    let bytes = onnx::encode(&onnx::onnx_model(&trees, &metadata));
    Ok(Bundle {
        bytes,
        metadata,
        trees,
    })
}

/// Most training rows the data profile's quantiles are cut from: evenly
/// spaced through the window beyond it (a million rows place a decile to
/// within a thousandth, and the data set's 12 M would be another 1.2 GB).
const PROFILE_MAX_ROWS: usize = 1_000_000;

/// The training window's rows as the appliance computes them: encoded with
/// the bundle's tables. (The model was fitted on out-of-fold encodings,
/// whose spread differs; drift is about what serving sees.)
fn served_rows(replay: &Replay, data: &Windows) -> Vec<f32> {
    let step = data.train.examples.len().div_ceil(PROFILE_MAX_ROWS).max(1);
    data.train
        .examples
        .clone()
        .step_by(step)
        .flat_map(|i| replay.examples[i].encoded(&replay.interner, &data.tables).0)
        .collect()
}

/// The covers TreeSHAP needs and LightGBM's own contributions of the golden
/// rows, which the appliance must reproduce before it explains a score.
/// `None` (the bundle serves, unexplained) when the model text has no counts.
pub fn shap_metadata(
    booster: &Booster,
    trees: &[Tree],
    golden_rows: &[f32],
) -> Result<Option<ShapMetadata>> {
    let Some(covers) = onnx::covers(trees) else {
        tracing::warn!("the LightGBM model has no node counts: the bundle cannot explain scores");
        return Ok(None);
    };
    let contributions = booster
        .predict_contrib(golden_rows, FEATURE_COUNT as i32, true)
        .map_err(|e| anyhow::anyhow!("LightGBM contributions failed: {e}"))?;
    Ok(Some(ShapMetadata {
        covers,
        golden_contributions: contributions
            .chunks(FEATURE_COUNT + 1)
            .map(<[f64]>::to_vec)
            .collect(),
    }))
}

fn lightgbm_predict(booster: &Booster, rows: &[f32]) -> Result<Vec<f64>> {
    booster
        .predict_with_params(rows, FEATURE_COUNT as i32, true, "num_threads=1")
        .map_err(|e| anyhow::anyhow!("LightGBM prediction failed: {e}"))
}

/// tract, reading the exported bytes, must give LightGBM's probabilities on
/// the whole test window and on up to 2,000 rows sitting on split edges.
/// Rows of the test window tract scores as well (tract walks leaves one by
/// one: about 3 ms a row for a few hundred trees).
const TRACT_SAMPLE: usize = 2_000;

/// Every test-window row and up to 2,000 rows on split thresholds, scored by
/// the evaluator the appliance serves with against LightGBM; tract, the
/// reader the appliance verifies that evaluator with, on the edge rows and
/// a sample. Complete, and cheap at any scale.
pub(super) fn check_parity(
    bundle: &Bundle,
    booster: &Booster,
    model_text: &str,
    test: &Window,
    threads: usize,
    out: &Path,
) -> Result<Parity> {
    let started = Instant::now();
    let tract = TractModel::from_bytes(&bundle.bytes)
        .context("the exported bundle does not load in tract")?;
    let compiled = CompiledEnsemble::compile(&tract.proto)
        .context("the exported bundle does not compile to the served evaluator")?;
    let edge = onnx::edge_rows(&bundle.trees, &test.matrix.values, 2_000);
    let mut rows = test.matrix.values.clone();
    rows.extend_from_slice(&edge);
    let reference = lightgbm_predict_threads(booster, &rows, threads)?;
    let served = compiled.predict_rows(&rows);
    let max_diff = reference
        .iter()
        .zip(&served)
        .map(|(&a, &b)| (a - f64::from(b)).abs())
        .fold(0.0, f64::max);
    if max_diff > cartscore_core::bundle::GOLDEN_TOLERANCE {
        let evidence = keep_disagreement(
            &Disagreement {
                bundle,
                model_text,
                rows: &rows,
                reference: &reference,
                served: &served,
                compiled: &compiled,
                tract: &tract,
                test_rows: test.matrix.rows(),
            },
            out,
        );
        bail!(
            "the served evaluator disagrees with LightGBM by {max_diff:e} on the test window: the export is wrong; {evidence}"
        );
    }
    // Tract: the split edges and an even sample of the window.
    let test_rows = test.matrix.values.len() / FEATURE_COUNT;
    let every = (test_rows / TRACT_SAMPLE).max(1);
    let mut sample: Vec<f32> = test
        .matrix
        .values
        .chunks_exact(FEATURE_COUNT)
        .step_by(every)
        .take(TRACT_SAMPLE)
        .flatten()
        .copied()
        .collect();
    sample.extend_from_slice(&edge);
    let sample_reference = lightgbm_predict_threads(booster, &sample, threads)?;
    let tract_p = predict_parallel(&tract, &sample, threads)?;
    let tract_diff = sample_reference
        .iter()
        .zip(&tract_p)
        .map(|(&a, &b)| (a - f64::from(b)).abs())
        .fold(0.0, f64::max);
    ensure!(
        tract_diff <= cartscore_core::bundle::GOLDEN_TOLERANCE,
        "tract disagrees with LightGBM by {tract_diff:e}: the export is wrong"
    );
    Ok(Parity {
        reader: "cartscore compiled evaluator (verified by tract-onnx 0.23 on a sample)",
        rows: reference.len(),
        edge_rows: edge.len() / FEATURE_COUNT,
        max_abs_diff: max_diff,
        tract_rows: sample_reference.len(),
        tract_max_abs_diff: tract_diff,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// A parity failure's evidence.
struct Disagreement<'a> {
    bundle: &'a Bundle,
    model_text: &'a str,
    rows: &'a [f32],
    reference: &'a [f64],
    served: &'a [f32],
    compiled: &'a CompiledEnsemble,
    tract: &'a TractModel,
    test_rows: usize,
}

/// Keeps what a disagreement needs to be understood: the rejected bundle,
/// LightGBM's text of it and the rows that disagree most (with what each
/// reader says of them) under `out/rejected/`; says where, and which reader
/// differs on the worst row (the plain walk and tract tell an export error
/// from an evaluator error).
fn keep_disagreement(d: &Disagreement, out: &Path) -> String {
    let mut worst: Vec<usize> = (0..d.served.len())
        .filter(|&i| {
            (d.reference[i] - f64::from(d.served[i])).abs()
                > cartscore_core::bundle::GOLDEN_TOLERANCE
        })
        .collect();
    let count = worst.len();
    worst.sort_by(|&a, &b| {
        let diff = |i: usize| (d.reference[i] - f64::from(d.served[i])).abs();
        diff(b).total_cmp(&diff(a))
    });
    worst.truncate(100);
    let row = |i: usize| -> &[f32; FEATURE_COUNT] {
        d.rows[i * FEATURE_COUNT..(i + 1) * FEATURE_COUNT]
            .try_into()
            .expect("rows are FEATURE_COUNT wide")
    };
    let mut csv = format!(
        "row,window,lightgbm,served,plain_walk,tract,{}\n",
        FEATURE_NAMES.join(",")
    );
    let mut first = String::new();
    for &i in &worst {
        let plain = 1.0 / (1.0 + (-d.compiled.raw_score_plain(row(i))).exp());
        let tract = d
            .tract
            .predict(row(i))
            .ok()
            .and_then(|p| p.first().copied())
            .map_or("error".to_string(), |p| format!("{p:?}"));
        let window = if i < d.test_rows { "test" } else { "edge" };
        let values: Vec<String> = row(i).iter().map(|v| format!("{v:?}")).collect();
        let line = format!(
            "{i},{window},{:?},{:?},{plain:?},{tract},{}",
            d.reference[i],
            d.served[i],
            values.join(",")
        );
        if first.is_empty() {
            first = format!(
                "row {i} ({window}): LightGBM {:?}, served {:?}, plain walk {plain:?}, tract {tract}",
                d.reference[i], d.served[i]
            );
        }
        csv.push_str(&line);
        csv.push('\n');
    }
    let dir = out.join("rejected");
    let kept = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("model.onnx"), &d.bundle.bytes))
        .and_then(|()| std::fs::write(dir.join("lightgbm.txt"), d.model_text))
        .and_then(|()| std::fs::write(dir.join("disagreements.csv"), csv));
    match kept {
        Ok(()) => format!(
            "{count} rows differ; worst {first}; the bundle, LightGBM's text and the rows are in {}",
            dir.display()
        ),
        Err(e) => format!(
            "{count} rows differ; worst {first}; could not keep them in {}: {e}",
            dir.display()
        ),
    }
}

/// LightGBM's probabilities of `rows` on `threads` threads.
fn lightgbm_predict_threads(booster: &Booster, rows: &[f32], threads: usize) -> Result<Vec<f64>> {
    booster
        .predict_with_params(
            rows,
            FEATURE_COUNT as i32,
            true,
            &format!("num_threads={}", threads.max(1)),
        )
        .map_err(|e| anyhow::anyhow!("LightGBM prediction failed: {e}"))
}

pub(super) fn importance(booster: &Booster) -> BTreeMap<String, f64> {
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
