//! `predict`: offline, point-in-time scoring of every cart event in the input
//! with a bundle, as the appliance would score it live just before ingesting it.
//! A plain tree ensemble is scored by the appliance's own compiled evaluator
//! (`core::compiled`), so the offline probabilities are the served ones to
//! the bit, and the offline ROC-AUC is the live one; any other graph by tract.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use cartscore_core::bundle::GOLDEN_TOLERANCE;
use cartscore_core::compiled::CompiledEnsemble;
use cartscore_core::explain::Explainer;
use cartscore_core::{FEATURE_COUNT, FEATURE_NAMES, TractModel};

use crate::files::MergedEvents;
use crate::replay::Replay;

#[derive(Debug, Default)]
pub struct PredictSummary {
    pub events: u64,
    pub carts: usize,
    pub invalid: u64,
    /// With a LightGBM reference: the largest |TreeSHAP - LightGBM| over
    /// every contribution and base value written.
    pub lightgbm_max_diff: Option<f64>,
}

/// Contributions beside each score.
#[derive(Debug, Default, Clone)]
pub struct Explain {
    pub enabled: bool,
    /// LightGBM's model text of the bundle, to check every row against.
    pub lightgbm: Option<PathBuf>,
}

pub fn run(
    inputs: &[PathBuf],
    model_path: &Path,
    out: &Path,
    error_budget: f64,
    explain: &Explain,
) -> Result<PredictSummary> {
    let model = TractModel::load(model_path)
        .with_context(|| format!("failed to load bundle {}", model_path.display()))?;
    let mut source = MergedEvents::open(inputs, error_budget)?;
    let mut replay = Replay::new();
    while let Some(event) = source.next_event()? {
        replay.push(&event);
    }
    let tables = &model.metadata.encodings;
    let mut rows = Vec::with_capacity(replay.examples.len() * FEATURE_COUNT);
    for example in &replay.examples {
        rows.extend_from_slice(&example.encoded(&replay.interner, tables).0);
    }
    let compiled = CompiledEnsemble::compile(&model.proto);
    let probabilities = match &compiled {
        Ok(compiled) => compiled.predict_rows(&rows),
        Err(reason) => {
            tracing::warn!(%reason, "not a plain tree ensemble; scoring with tract");
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            crate::train::predict_parallel(&model, &rows, threads)?
        }
    };
    let contributions = if explain.enabled {
        let compiled = match &compiled {
            Ok(compiled) => compiled,
            Err(reason) => bail!("only a plain tree ensemble can be explained: {reason}"),
        };
        let explainer = Explainer::verified(compiled, &model.metadata)
            .with_context(|| format!("{} cannot explain its scores", model_path.display()))?;
        let explained: Vec<Vec<f64>> = rows
            .as_chunks::<FEATURE_COUNT>()
            .0
            .iter()
            .map(|row| {
                let e = explainer.explain(row);
                let mut values = e.contributions;
                values.push(e.base_value);
                values
            })
            .collect();
        Some(explained)
    } else {
        None
    };
    let lightgbm_max_diff = match (&contributions, &explain.lightgbm) {
        (Some(ours), Some(path)) => Some(check_against_lightgbm(path, &rows, ours)?),
        (None, Some(_)) => bail!("--lightgbm checks the contributions: it needs --explain"),
        _ => None,
    };

    let mut writer = csv::Writer::from_path(out)
        .with_context(|| format!("failed to create {}", out.display()))?;
    let mut header = vec!["event_time", "user_session", "product_id"];
    header.extend(FEATURE_NAMES);
    header.extend(["label", "probability", "model_version"]);
    let shap_columns: Vec<String> = FEATURE_NAMES
        .iter()
        .map(|name| format!("shap_{name}"))
        .chain(["shap_base_value".to_owned()])
        .collect();
    if contributions.is_some() {
        header.extend(shap_columns.iter().map(String::as_str));
    }
    writer.write_record(&header)?;
    for (i, example) in replay.examples.iter().enumerate() {
        let mut record = vec![
            example.time.to_rfc3339(),
            example.session.to_string(),
            example.product_id.to_string(),
        ];
        // Shortest round-trip text, so readers get back the exact f32.
        record.extend(
            rows[i * FEATURE_COUNT..(i + 1) * FEATURE_COUNT]
                .iter()
                .map(|v| v.to_string()),
        );
        record.push(u8::from(example.label).to_string());
        record.push(probabilities[i].to_string());
        record.push(model.metadata.model_version.clone());
        if let Some(contributions) = &contributions {
            // f64 in its shortest round-trip text.
            record.extend(contributions[i].iter().map(|v| v.to_string()));
        }
        writer.write_record(&record)?;
    }
    writer
        .flush()
        .with_context(|| format!("failed to write {}", out.display()))?;
    Ok(PredictSummary {
        events: replay.events,
        carts: replay.examples.len(),
        invalid: source.stats.invalid,
        lightgbm_max_diff,
    })
}

/// LightGBM's own contributions of `rows` against `ours` (per row: one per
/// feature, then the base value); the largest difference, or an error past
/// the bundle tolerance.
fn check_against_lightgbm(path: &Path, rows: &[f32], ours: &[Vec<f64>]) -> Result<f64> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("failed to read the LightGBM model {}", path.display()))?;
    let booster = crate::gbdt::load(&text)?;
    let theirs = booster
        .predict_contrib(rows, FEATURE_COUNT as i32, true)
        .map_err(|e| anyhow::anyhow!("LightGBM contributions failed: {e}"))?;
    ensure!(
        theirs.len() == ours.len() * (FEATURE_COUNT + 1),
        "LightGBM gave {} contributions for {} rows",
        theirs.len(),
        ours.len()
    );
    let mut worst = 0f64;
    for (row, (ours, theirs)) in ours
        .iter()
        .zip(theirs.chunks(FEATURE_COUNT + 1))
        .enumerate()
    {
        for (column, (a, b)) in ours.iter().zip(theirs).enumerate() {
            let diff = (a - b).abs();
            ensure!(
                diff <= GOLDEN_TOLERANCE,
                "row {row}, {}: TreeSHAP {a}, LightGBM {b} (|diff| {diff:e} > {GOLDEN_TOLERANCE:e})",
                FEATURE_NAMES.get(column).copied().unwrap_or("base_value")
            );
            worst = worst.max(diff);
        }
    }
    Ok(worst)
}
