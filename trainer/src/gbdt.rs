//! Gradient-boosted trees with LightGBM: random-search tuning on the
//! validation window with early stopping, trials run in parallel.

use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use lightgbm3::{Booster, Dataset};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::json;

use crate::metrics::roc_auc;

/// A row-major f32 matrix with labels.
#[derive(Debug, Clone, Default)]
pub struct Matrix {
    pub values: Vec<f32>,
    pub width: usize,
    pub labels: Vec<bool>,
}

impl Matrix {
    pub fn new(width: usize) -> Self {
        Self {
            values: Vec::new(),
            width,
            labels: Vec::new(),
        }
    }

    pub fn push(&mut self, row: &[f32], label: bool) {
        self.values.extend_from_slice(row);
        self.labels.push(label);
    }

    pub fn rows(&self) -> usize {
        self.labels.len()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.width..(i + 1) * self.width]
    }

    /// Keeps only the given columns, in the given order.
    pub fn select(&self, columns: &[usize]) -> Matrix {
        let mut out = Matrix::new(columns.len());
        for i in 0..self.rows() {
            let row = self.row(i);
            out.values.extend(columns.iter().map(|&c| row[c]));
        }
        out.labels = self.labels.clone();
        out
    }

    /// At most `max` rows drawn uniformly with `seed`, in their order;
    /// `None` when the matrix is no larger (or `max` is 0).
    pub fn sample(&self, max: usize, seed: u64) -> Option<Matrix> {
        if max == 0 || self.rows() <= max {
            return None;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut picked = rand::seq::index::sample(&mut rng, self.rows(), max).into_vec();
        picked.sort_unstable();
        let mut out = Matrix::new(self.width);
        out.values.reserve(max * self.width);
        out.labels.reserve(max);
        for i in picked {
            out.push(self.row(i), self.labels[i]);
        }
        Some(out)
    }

    fn float_labels(&self) -> Vec<f32> {
        self.labels
            .iter()
            .map(|&l| f32::from(u8::from(l)))
            .collect()
    }

    fn dataset(&self, reference: Option<&Dataset>) -> Result<Dataset> {
        Dataset::from_slice_with_reference(
            &self.values,
            &self.float_labels(),
            self.width as i32,
            true,
            reference,
        )
        .map_err(|e| anyhow!("LightGBM rejected the data set: {e}"))
    }
}

/// The hyper-parameters searched over.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TreeParams {
    pub num_leaves: u32,
    pub learning_rate: f64,
    pub min_data_in_leaf: u32,
    pub feature_fraction: f64,
    pub bagging_fraction: f64,
    pub lambda_l2: f64,
    pub max_iterations: u32,
}

impl TreeParams {
    fn sample(rng: &mut ChaCha8Rng, max_iterations: u32, num_leaves: Option<u32>) -> Self {
        // Drawn even when fixed, so the other parameters stay the same draws.
        let drawn = [7, 15, 31, 63][rng.random_range(0..4)];
        Self {
            num_leaves: num_leaves.unwrap_or(drawn),
            learning_rate: 10f64.powf(rng.random_range(-1.6..-0.8)),
            min_data_in_leaf: [10, 20, 50, 100][rng.random_range(0..4)],
            feature_fraction: rng.random_range(0.6..1.0),
            bagging_fraction: rng.random_range(0.6..1.0),
            lambda_l2: [0.0, 1.0, 5.0, 20.0][rng.random_range(0..4)],
            max_iterations,
        }
    }

    fn lightgbm(&self, seed: u64, early_stopping: u32) -> serde_json::Value {
        let mut params = self.lightgbm_params(seed, early_stopping);
        // lightgbm3 stops at the first round without improvement when told
        // 0 rounds: no early stopping is no key at all.
        if early_stopping == 0
            && let Some(map) = params.as_object_mut()
        {
            map.remove("early_stopping_rounds");
        }
        params
    }

    fn lightgbm_params(&self, seed: u64, early_stopping: u32) -> serde_json::Value {
        json!({
            "objective": "binary",
            "metric": "binary_logloss",
            "num_iterations": self.max_iterations,
            "early_stopping_rounds": early_stopping,
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1,
            "lambda_l2": self.lambda_l2,
            "seed": seed,
            // Reproducible models: one thread per trial, fixed layout, no timing-based choices.
            "deterministic": true,
            "force_col_wise": true,
            "num_threads": 1,
            "verbosity": -1,
        })
    }
}

/// One tuning trial's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub index: usize,
    pub params: TreeParams,
    pub iterations: i32,
    pub validation_auc: f64,
    pub seconds: f64,
}

/// The tuned model: LightGBM's text form plus what chose it.
#[derive(Debug)]
pub struct Tuned {
    pub model_text: String,
    /// Trees in `model_text`: the best trial's, or the refit's.
    pub iterations: i32,
    pub best: Trial,
    pub trials: Vec<Trial>,
}

#[derive(Debug, Clone)]
pub struct TuneConfig {
    pub trials: usize,
    pub threads: usize,
    pub seed: u64,
    pub max_iterations: u32,
    pub early_stopping: u32,
    pub num_leaves: Option<u32>,
}

/// A model trained on `train`, early-stopped and judged on `valid`.
struct Fitted {
    text: String,
    iterations: i32,
    validation_auc: f64,
    seconds: f64,
}

fn train_one(train: &Matrix, valid: &Matrix, params: &serde_json::Value) -> Result<Fitted> {
    let started = Instant::now();
    let train_set = train.dataset(None)?;
    let valid_set = valid.dataset(Some(&train_set))?;
    let booster = Booster::train_with_valid(train_set, Some(valid_set), params)
        .map_err(|e| anyhow!("LightGBM training failed: {e}"))?;
    let predictions = predict(&booster, valid)?;
    let text = booster
        .save_string()
        .map_err(|e| anyhow!("cannot serialise the LightGBM model: {e}"))?;
    Ok(Fitted {
        text,
        iterations: booster.num_iterations(),
        validation_auc: roc_auc(&predictions, &valid.labels),
        seconds: started.elapsed().as_secs_f64(),
    })
}

pub fn predict(booster: &Booster, data: &Matrix) -> Result<Vec<f64>> {
    if data.rows() == 0 {
        return Ok(Vec::new());
    }
    booster
        .predict_with_params(&data.values, data.width as i32, true, "num_threads=1")
        .map_err(|e| anyhow!("LightGBM prediction failed: {e}"))
}

pub fn load(model_text: &str) -> Result<Booster> {
    Booster::from_string(model_text).map_err(|e| anyhow!("cannot load the LightGBM model: {e}"))
}

type TrialOutcome = Result<(Trial, String)>;

/// Random search: every trial trains on `train`, early-stops and is scored on
/// `valid`; the highest validation ROC-AUC wins (the lowest index on ties).
pub fn tune(train: &Matrix, valid: &Matrix, config: &TuneConfig) -> Result<Tuned> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let candidates: Vec<TreeParams> = (0..config.trials.max(1))
        .map(|_| TreeParams::sample(&mut rng, config.max_iterations, config.num_leaves))
        .collect();
    let outcomes = crate::parallel::map(
        &candidates,
        config.threads,
        |index, params| -> TrialOutcome {
            let fitted = train_one(
                train,
                valid,
                &params.lightgbm(config.seed + index as u64, config.early_stopping),
            )?;
            let trial = Trial {
                index,
                params: params.clone(),
                iterations: fitted.iterations,
                validation_auc: fitted.validation_auc,
                seconds: fitted.seconds,
            };
            tracing::info!(
                index,
                auc = trial.validation_auc,
                iterations = trial.iterations,
                seconds = trial.seconds,
                "trial done"
            );
            Ok((trial, fitted.text))
        },
    );
    let mut trials = Vec::new();
    let mut best: Option<(Trial, String)> = None;
    for outcome in outcomes {
        let (trial, text) = outcome?;
        trials.push(trial.clone());
        let better = match &best {
            None => true,
            Some((b, _)) => trial.validation_auc > b.validation_auc || b.validation_auc.is_nan(),
        };
        if better {
            best = Some((trial, text));
        }
    }
    let (best, model_text) = best.context("no tuning trial succeeded")?;
    Ok(Tuned {
        model_text,
        iterations: best.iterations,
        best,
        trials,
    })
}

/// The winner of a search on samples, trained again on the whole windows.
#[derive(Debug, Clone, Serialize)]
pub struct Refit {
    pub train_rows: usize,
    pub validation_rows: usize,
    pub iterations: i32,
    pub validation_auc: f64,
    pub seconds: f64,
}

/// `best`'s parameters trained on all of `train`, early-stopped on all of
/// `valid` (more rows usually support more trees than the sample did).
pub fn refit(
    train: &Matrix,
    valid: &Matrix,
    best: &Trial,
    config: &TuneConfig,
) -> Result<(String, Refit)> {
    let fitted = train_one(
        train,
        valid,
        &best
            .params
            .lightgbm(config.seed + best.index as u64, config.early_stopping),
    )?;
    let refit = Refit {
        train_rows: train.rows(),
        validation_rows: valid.rows(),
        iterations: fitted.iterations,
        validation_auc: fitted.validation_auc,
        seconds: fitted.seconds,
    };
    tracing::info!(
        iterations = refit.iterations,
        auc = refit.validation_auc,
        seconds = refit.seconds,
        "refit on the whole training window done"
    );
    Ok((fitted.text, refit))
}

/// The original stack's model: a single depth-1 tree.
pub fn stump(train: &Matrix) -> Result<Booster> {
    let params = json!({
        "objective": "binary", "num_iterations": 1, "num_leaves": 2, "max_depth": 1,
        "learning_rate": 1.0, "min_data_in_leaf": 20, "deterministic": true,
        "force_col_wise": true, "num_threads": 1, "verbosity": -1,
    });
    Booster::train(train.dataset(None)?, &params)
        .map_err(|e| anyhow!("LightGBM stump training failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::{onnx_model, parse_lightgbm};
    use cartscore_core::bundle::{BundleMetadata, GoldenVector, ShapMetadata};
    use cartscore_core::compiled::CompiledEnsemble;
    use cartscore_core::explain::{ExplainError, Explainer};
    use cartscore_core::{CONTRACT_VERSION, EncodingTables, FEATURE_COUNT, FEATURE_NAMES};

    #[test]
    fn a_sample_keeps_the_asked_rows_in_order_and_the_same_for_a_seed() {
        let mut m = Matrix::new(2);
        for i in 0..10_000u16 {
            m.push(&[f32::from(i), -f32::from(i)], i.is_multiple_of(3));
        }
        assert!(m.sample(0, 1).is_none(), "0 means every row");
        assert!(m.sample(10_000, 1).is_none(), "no larger than asked");
        let a = m.sample(1_000, 7).unwrap();
        assert_eq!((a.rows(), a.width), (1_000, 2));
        let firsts: Vec<f32> = (0..a.rows()).map(|i| a.row(i)[0]).collect();
        assert!(firsts.windows(2).all(|w| w[0] < w[1]), "time order kept");
        for i in 0..a.rows() {
            let original = a.row(i)[0] as usize;
            assert_eq!(a.row(i)[1], -a.row(i)[0], "rows stay whole");
            assert_eq!(
                a.labels[i],
                original.is_multiple_of(3),
                "labels follow their rows"
            );
        }
        assert_eq!(m.sample(1_000, 7).unwrap().values, a.values);
        assert_ne!(m.sample(1_000, 8).unwrap().values, a.values);
        // Uniform over the window, not its start: both halves are drawn from.
        let late = firsts.iter().filter(|&&v| v >= 5_000.0).count();
        assert!(
            (400..600).contains(&late),
            "{late} of 1000 from the second half"
        );
    }

    /// The bundle the trainer would export for `booster`, with `golden`
    /// rows: compiled as the appliance compiles it.
    fn bundle(booster: &Booster, golden: &[f32]) -> (CompiledEnsemble, BundleMetadata) {
        let trees = parse_lightgbm(&booster.save_string().unwrap()).unwrap();
        let probabilities = predict(booster, &{
            let mut m = Matrix::new(FEATURE_COUNT);
            m.values = golden.to_vec();
            m.labels = vec![false; golden.len() / FEATURE_COUNT];
            m
        })
        .unwrap();
        let metadata = BundleMetadata {
            model_version: "shap-test".into(),
            contract_version: CONTRACT_VERSION,
            feature_names: FEATURE_NAMES.iter().map(|s| s.to_string()).collect(),
            encodings: EncodingTables::default(),
            data_fingerprint: "test".into(),
            metrics: Default::default(),
            params: serde_json::Value::Null,
            golden_vectors: golden
                .chunks(FEATURE_COUNT)
                .zip(probabilities)
                .map(|(row, probability)| GoldenVector {
                    features: row.to_vec(),
                    probability,
                })
                .collect(),
            profile: None,
            shap: crate::train::shap_metadata(booster, &trees, golden).unwrap(),
        };
        let compiled = CompiledEnsemble::compile(&onnx_model(&trees, &metadata)).unwrap();
        (compiled, metadata)
    }

    /// LightGBM reads inputs within 1e-35 of zero as 0 and splits at its
    /// zero bin's edges (±1e-35): the exported trees, compiled as the
    /// appliance compiles them, take LightGBM's branch for every input
    /// there, on a model LightGBM trained itself.
    #[test]
    fn inputs_at_lightgbms_zero_bin_score_as_lightgbm_scores_them() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut data = Matrix::new(FEATURE_COUNT);
        for i in 0..3_000 {
            let mut row = vec![0.5f32; FEATURE_COUNT];
            // A sentinel, zero or a positive value: each bought at its own rate.
            row[0] = [-1.0, 0.0, 2.0][i % 3];
            let rate = [0.2, 0.8, 0.4][i % 3];
            data.push(&row, rng.random::<f64>() < rate);
        }
        let params = json!({
            "objective": "binary", "num_iterations": 5, "num_leaves": 4,
            "min_data_in_leaf": 10, "deterministic": true, "force_col_wise": true,
            "num_threads": 1, "verbosity": -1,
        });
        let booster = Booster::train(data.dataset(None).unwrap(), &params).unwrap();
        let text = booster.save_string().unwrap();
        assert!(
            text.contains("-1.0000000180025095e-35") && text.contains(" 1.0000000180025095e-35"),
            "LightGBM split elsewhere than its zero bin's edges:\n{text}"
        );
        let mut probes = Matrix::new(FEATURE_COUNT);
        let zero = 1e-35f32;
        for x in [
            0.0f32,
            -0.0,
            1e-36,
            -1e-36,
            zero,
            -zero,
            zero.next_up(),
            -zero.next_up(),
            zero.next_down(),
            -zero.next_down(),
            -1.0,
            2.0,
        ] {
            let mut row = vec![0.5f32; FEATURE_COUNT];
            row[0] = x;
            probes.push(&row, false);
        }
        let (compiled, _) = bundle(&booster, &probes.values[..FEATURE_COUNT]);
        let expected = predict(&booster, &probes).unwrap();
        for (i, want) in expected.iter().enumerate() {
            let got = compiled.predict(probes.row(i).try_into().unwrap());
            assert!(
                (f64::from(got) - want).abs() < 1e-6,
                "input {:e}: compiled {got}, LightGBM {want}",
                probes.row(i)[0]
            );
        }
    }

    /// A booster on random rows whose label depends on a few features
    /// (with interactions), so the trees split on many and repeat some.
    fn booster(rows: usize, seed: u64) -> (Booster, Matrix) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut data = Matrix::new(FEATURE_COUNT);
        for _ in 0..rows {
            let row: Vec<f32> = (0..FEATURE_COUNT)
                .map(|_| rng.random_range(-1.0f32..1.0))
                .collect();
            let logit = 2.0 * row[0] - 1.5 * row[3] * row[4] + row[7].abs() + 0.5 * row[12];
            let label = rng.random::<f32>() < 1.0 / (1.0 + (-logit).exp());
            data.push(&row, label);
        }
        let params = json!({
            "objective": "binary", "num_iterations": 40, "num_leaves": 15,
            "learning_rate": 0.2, "min_data_in_leaf": 10, "deterministic": true,
            "force_col_wise": true, "num_threads": 1, "verbosity": -1, "seed": seed,
        });
        let booster = Booster::train(data.dataset(None).unwrap(), &params).unwrap();
        (booster, data)
    }

    #[test]
    fn the_bundles_explainer_equals_lightgbms_own_contributions() {
        let (booster, data) = booster(3_000, 11);
        let rows = 400;
        let sample = &data.values[..rows * FEATURE_COUNT];
        let (compiled, metadata) = bundle(&booster, &sample[..8 * FEATURE_COUNT]);
        let explainer = Explainer::verified(&compiled, &metadata).unwrap();
        assert_eq!(explainer.verified_rows, 8);
        let contrib = booster
            .predict_contrib(sample, FEATURE_COUNT as i32, true)
            .unwrap();
        let width = FEATURE_COUNT + 1;
        assert_eq!(contrib.len(), rows * width);
        let mut worst = 0f64;
        for (r, row) in sample.as_chunks::<FEATURE_COUNT>().0.iter().enumerate() {
            let ours = explainer.explain(row);
            let theirs = &contrib[r * width..(r + 1) * width];
            worst = worst.max((ours.base_value - theirs[FEATURE_COUNT]).abs());
            for (a, b) in ours.contributions.iter().zip(theirs) {
                worst = worst.max((a - b).abs());
            }
            // Local accuracy against the raw score the appliance serves.
            let raw = f64::from(compiled.raw_score(row));
            assert!(
                (ours.total() - raw).abs() < 1e-5,
                "row {r}: {} vs {raw}",
                ours.total()
            );
        }
        eprintln!("TreeSHAP vs predict_contrib: max |diff| {worst:e} over {rows} rows");
        // The served leaves are f32, LightGBM's f64.
        assert!(
            worst < 1e-5,
            "largest difference from predict_contrib {worst}"
        );
        // The test means something: several features carry weight.
        let first = explainer.explain(&sample.as_chunks::<FEATURE_COUNT>().0[0]);
        assert!(
            first
                .contributions
                .iter()
                .filter(|c| c.abs() > 1e-3)
                .count()
                >= 3
        );
    }

    #[test]
    fn a_bundle_whose_covers_or_contributions_are_wrong_is_not_explained() {
        let (booster, data) = booster(2_000, 5);
        let golden = &data.values[..4 * FEATURE_COUNT];
        let (compiled, metadata) = bundle(&booster, golden);
        let with = |edit: &dyn Fn(&mut ShapMetadata)| {
            let mut m = metadata.clone();
            edit(m.shap.as_mut().unwrap());
            Explainer::verified(&compiled, &m).unwrap_err()
        };
        // A leaf's cover changed: the expectation moves, the contributions
        // differ. (An inner node's cover under a split on the same feature
        // cancels out of TreeSHAP's path fractions, so a leaf is edited.)
        let err = with(&|s| *s.covers[0].last_mut().unwrap() += 500);
        assert!(
            matches!(err, ExplainError::GoldenMismatch { index: 0, .. }),
            "{err}"
        );
        let err = with(&|s| {
            s.covers[3].pop();
        });
        assert!(matches!(err, ExplainError::Covers(_)), "{err}");
        let err = with(&|s| s.golden_contributions[2][7] += 1e-3);
        assert!(
            matches!(err, ExplainError::GoldenMismatch { index: 2, column, .. } if column == FEATURE_NAMES[7]),
            "{err}"
        );
        let err = with(&|s| {
            s.golden_contributions.pop();
        });
        assert!(
            matches!(
                err,
                ExplainError::GoldenCount {
                    found: 3,
                    expected: 4
                }
            ),
            "{err}"
        );
        let mut none = metadata.clone();
        none.shap = None;
        assert!(matches!(
            Explainer::verified(&compiled, &none),
            Err(ExplainError::NoCovers)
        ));
    }
}
