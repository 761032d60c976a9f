//! `engine`: cartscore's compiled evaluator alone, in process, on bundles
//! and feature rows, at several batch sizes: the Rust side of the engine
//! comparison (`bench/engines/compare.sh` runs it beside ONNX Runtime,
//! LightGBM, treelite and lleaves on the same models and rows).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use cartscore_core::bundle::BundleMetadata;
use cartscore_core::compiled::CompiledEnsemble;
use cartscore_core::{FEATURE_COUNT, FEATURE_NAMES};
use clap::Args;
use serde::Serialize;

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Bundles to time (repeatable).
    #[arg(long = "bundle", required = true)]
    pub bundles: Vec<PathBuf>,
    /// Feature rows: a CSV with a column per feature, named as the contract
    /// names them (`cartscore-trainer predict`'s output).
    #[arg(long)]
    pub rows: PathBuf,
    /// Rows per call.
    #[arg(long, value_delimiter = ',', default_value = "1,16,1024")]
    pub batch: Vec<usize>,
    /// Seconds spent on each bundle and batch size.
    #[arg(long, default_value_t = 2.0)]
    pub seconds: f64,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct EngineResult {
    pub bundle: PathBuf,
    /// `served`: what the appliance scores batches with (QuickScorer from
    /// 16 rows); `walk`: the same trees walked, timed beside it.
    pub form: &'static str,
    pub trees: usize,
    pub batch: usize,
    pub calls: u64,
    /// Median over 20 samples of the time per call.
    pub ns_per_call: f64,
    pub ns_per_row: f64,
    pub ns_per_tree_per_row: f64,
}

/// The feature columns of `path`, row-major.
pub fn read_rows(path: &PathBuf) -> Result<Vec<f32>> {
    let mut reader = csv::Reader::from_path(path)
        .with_context(|| format!("failed to open {}", path.display()))?;
    let header = reader.headers()?.clone();
    let columns: Vec<usize> = FEATURE_NAMES
        .iter()
        .map(|name| {
            header
                .iter()
                .position(|h| h == *name)
                .with_context(|| format!("{} has no column {name}", path.display()))
        })
        .collect::<Result<_>>()?;
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record?;
        for &c in &columns {
            rows.push(
                record[c]
                    .parse::<f32>()
                    .with_context(|| format!("{}: not a number: {}", path.display(), &record[c]))?,
            );
        }
    }
    ensure!(!rows.is_empty(), "{} holds no rows", path.display());
    Ok(rows)
}

/// One of the evaluator's batch forms.
type Predict = fn(&CompiledEnsemble, &[f32]) -> Vec<f32>;

/// Times `f` (one call) for about `seconds`; the median of 20 samples.
fn median_ns(seconds: f64, mut f: impl FnMut(usize)) -> (u64, f64) {
    // Calibrate: how many calls fill a twentieth of the time.
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed().as_secs_f64() < seconds / 200.0 {
        f(calls);
        calls += 1;
    }
    let per_sample = (calls * 10).max(1);
    let mut samples = Vec::with_capacity(20);
    let mut total = 0u64;
    for _ in 0..20 {
        let started = Instant::now();
        for i in 0..per_sample {
            f(i);
        }
        samples.push(started.elapsed().as_nanos() as f64 / per_sample as f64);
        total += per_sample as u64;
    }
    samples.sort_by(f64::total_cmp);
    (total, samples[samples.len() / 2])
}

pub fn engine(args: &EngineArgs) -> Result<()> {
    let rows = read_rows(&args.rows)?;
    let count = rows.len() / FEATURE_COUNT;
    let mut results = Vec::new();
    for path in &args.bundles {
        let (proto, _) = BundleMetadata::read_file(path)
            .with_context(|| format!("failed to read {}", path.display()))?;
        let compiled = CompiledEnsemble::compile(&proto)
            .with_context(|| format!("{} is not a plain tree ensemble", path.display()))?;
        for &batch in &args.batch {
            ensure!(
                batch > 0 && batch <= count,
                "batch {batch}: the rows file has {count} rows"
            );
            // Consecutive windows of the rows, so calls do not repeat one input.
            let windows = count - batch + 1;
            let forms: [(&'static str, Predict); 2] = [
                ("served", CompiledEnsemble::predict_rows),
                ("walk", CompiledEnsemble::predict_rows_walk),
            ];
            for (form, predict) in forms {
                let (calls, ns) = median_ns(args.seconds, |i| {
                    let start = (i * batch) % windows * FEATURE_COUNT;
                    std::hint::black_box(predict(
                        &compiled,
                        std::hint::black_box(&rows[start..start + batch * FEATURE_COUNT]),
                    ));
                });
                let result = EngineResult {
                    bundle: path.clone(),
                    form,
                    trees: compiled.trees(),
                    batch,
                    calls,
                    ns_per_call: ns,
                    ns_per_row: ns / batch as f64,
                    ns_per_tree_per_row: ns / (batch * compiled.trees()) as f64,
                };
                println!(
                    "{:<40} {:>4} trees  batch {:>5}  {:<6}  {:>10.1} ns/call  {:>8.1} ns/row  {:>6.2} ns/tree/row",
                    path.display(),
                    result.trees,
                    batch,
                    form,
                    result.ns_per_call,
                    result.ns_per_row,
                    result.ns_per_tree_per_row
                );
                results.push(result);
            }
        }
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use cartscore_core::compiled::check_rows;

    #[test]
    fn times_both_forms_of_the_demo_bundle_at_each_batch() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo/model.onnx");
        let (_, metadata) = BundleMetadata::read_file(&bundle).unwrap();
        let rows = check_rows(&metadata.golden_rows(), 40, 1);
        let mut csv = FEATURE_NAMES.join(",") + "\n";
        for row in rows.chunks(FEATURE_COUNT) {
            let cells: Vec<String> = row.iter().map(f32::to_string).collect();
            csv += &(cells.join(",") + "\n");
        }
        let rows_path = dir.path().join("rows.csv");
        std::fs::write(&rows_path, csv).unwrap();
        let json = dir.path().join("out.json");
        engine(&EngineArgs {
            bundles: vec![bundle],
            rows: rows_path,
            batch: vec![1, 16],
            seconds: 0.02,
            json: Some(json.clone()),
        })
        .unwrap();
        let results: Vec<serde_json::Value> =
            serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
        let found: Vec<(String, u64)> = results
            .iter()
            .map(|r| {
                assert!(r["ns_per_tree_per_row"].as_f64().unwrap() > 0.0);
                (
                    r["form"].as_str().unwrap().to_owned(),
                    r["batch"].as_u64().unwrap(),
                )
            })
            .collect();
        let expected: Vec<(String, u64)> = [1, 16]
            .into_iter()
            .flat_map(|b| [("served".to_owned(), b), ("walk".to_owned(), b)])
            .collect();
        assert_eq!(found, expected);
    }
}
