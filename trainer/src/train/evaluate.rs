//! The tuned model on the test window (used once, for the report) and the
//! validation window, next to the baselines: the training window's base
//! rate and the original stack's stump on its six features, and, for
//! synthetic data, the oracle's best reachable scores.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use cartscore_core::Timestamp;
use cartscore_core::features::ORIGINAL_SIX;
use lightgbm3::Booster;

use super::windows::{Window, Windows};
use crate::gbdt;
use crate::metrics::{Scores, calibration};
use crate::replay::Example;
use crate::report::{Baselines, Evaluation, OracleScores};

/// The tuned model on the test and validation windows, and the baselines
/// and the oracle on the test window.
pub(super) struct Evaluated {
    pub(super) test: Evaluation,
    /// The model's test-window probabilities (for `test_rows.csv`).
    pub(super) test_p: Vec<f64>,
    pub(super) validation: Evaluation,
    /// The model's validation-window probabilities (for the score profile).
    pub(super) validation_p: Vec<f64>,
    pub(super) baselines: Baselines,
    pub(super) oracle: Option<OracleScores>,
    pub(super) auc_vs_oracle: Option<f64>,
}

fn evaluation(probabilities: &[f64], labels: &[bool]) -> Evaluation {
    Evaluation {
        scores: Scores::of(probabilities, labels),
        calibration: calibration(probabilities, labels),
    }
}

pub(super) fn evaluate(
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
        validation_p: valid_p,
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
    for i in test.examples.clone() {
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
