//! `predict`: offline, point-in-time scoring of every cart event in the input
//! with a bundle, as the appliance would score it live just before ingesting it.
//! A plain tree ensemble is scored by the appliance's own compiled evaluator
//! (`core::compiled`), so the offline probabilities are the served ones to
//! the bit, and the offline ROC-AUC is the live one; any other graph by tract.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cartscore_core::compiled::CompiledEnsemble;
use cartscore_core::{FEATURE_COUNT, FEATURE_NAMES, TractModel};

use crate::files::MergedEvents;
use crate::replay::Replay;

#[derive(Debug, Default)]
pub struct PredictSummary {
    pub events: u64,
    pub carts: usize,
    pub invalid: u64,
}

pub fn run(
    inputs: &[PathBuf],
    model_path: &Path,
    out: &Path,
    error_budget: f64,
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
    let probabilities = match CompiledEnsemble::compile(&model.proto) {
        Ok(compiled) => compiled.predict_rows(&rows),
        Err(reason) => {
            tracing::warn!(%reason, "not a plain tree ensemble; scoring with tract");
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            crate::train::predict_parallel(&model, &rows, threads)?
        }
    };

    let mut writer = csv::Writer::from_path(out)
        .with_context(|| format!("failed to create {}", out.display()))?;
    let mut header = vec!["event_time", "user_session", "product_id"];
    header.extend(FEATURE_NAMES);
    header.extend(["label", "probability", "model_version"]);
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
        writer.write_record(&record)?;
    }
    writer
        .flush()
        .with_context(|| format!("failed to write {}", out.display()))?;
    Ok(PredictSummary {
        events: replay.events,
        carts: replay.examples.len(),
        invalid: source.stats.invalid,
    })
}
