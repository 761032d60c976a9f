//! The cart examples split by time into training, validation and test
//! windows (equal timestamps never straddle a boundary), with the string
//! encodings learned on the training window: out-of-fold for its own rows.

use anyhow::{Result, bail, ensure};
use cartscore_core::encoding::{DEFAULT_MIN_COUNT, DEFAULT_SMOOTHING};
use cartscore_core::{CategoryTable, EncodingTables, FEATURE_COUNT, Timestamp};

use super::config::TrainConfig;
use crate::gbdt::Matrix;
use crate::replay::{Example, Interner};
use crate::report::WindowSummary;

/// The examples of one time window, encoded.
pub(super) struct Window {
    pub(super) matrix: Matrix,
    pub(super) examples: Vec<usize>,
    pub(super) from: Timestamp,
    pub(super) to: Timestamp,
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

    pub(super) fn positives(&self) -> usize {
        self.matrix.labels.iter().filter(|&&l| l).count()
    }

    pub(super) fn summary(&self) -> WindowSummary {
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
pub(super) struct Windows {
    pub(super) tables: EncodingTables,
    /// Every example's row, in example order (training rows out-of-fold).
    pub(super) encoded: Vec<[f32; FEATURE_COUNT]>,
    train_end: usize,
    valid_end: usize,
    pub(super) train: Window,
    pub(super) validation: Window,
    pub(super) test: Window,
}

impl Windows {
    pub(super) fn split(
        examples: &[Example],
        names: &Interner,
        config: &TrainConfig,
    ) -> Result<Self> {
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
    pub(super) fn name_of(&self, i: usize) -> &'static str {
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
