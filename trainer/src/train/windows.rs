//! The cart examples split by time into training, validation and test
//! windows (equal timestamps never straddle a boundary), with the string
//! encodings learned on the training window: out-of-fold for its own rows.

use std::ops::Range;

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
    /// The window's examples: a run of consecutive ones, in time order.
    pub(super) examples: Range<usize>,
    pub(super) from: Timestamp,
    pub(super) to: Timestamp,
}

impl Window {
    /// The examples of `range`, each encoded with the tables `tables_of`
    /// gives it. Rows are written straight into the window's matrix: at the
    /// data set's scale a second copy is gigabytes.
    fn of<'t>(
        examples: &[Example],
        range: Range<usize>,
        names: &Interner,
        tables_of: impl Fn(usize) -> &'t EncodingTables,
    ) -> Self {
        let mut matrix = Matrix::new(FEATURE_COUNT);
        matrix.values.reserve_exact(range.len() * FEATURE_COUNT);
        matrix.labels.reserve_exact(range.len());
        for i in range.clone() {
            let example = &examples[i];
            matrix.push(&example.encoded(names, tables_of(i)).0, example.label);
        }
        Self {
            matrix,
            from: examples.get(range.start).map_or(Timestamp(0), |e| e.time),
            to: examples
                .get(range.end.saturating_sub(1))
                .map_or(Timestamp(0), |e| e.time),
            examples: range,
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
        let (tables, fold_tables) = learn_all(&examples[..train_end], names);
        let windows = Self {
            // Training rows out-of-fold; the others with the full tables.
            train: Window::of(examples, 0..train_end, names, |i| &fold_tables[i % FOLDS]),
            validation: Window::of(examples, train_end..valid_end, names, |_| &tables),
            test: Window::of(examples, valid_end..examples.len(), names, |_| &tables),
            tables,
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

    /// Example `i`'s row as the model saw it (training rows out-of-fold).
    pub(super) fn row(&self, i: usize) -> &[f32; FEATURE_COUNT] {
        let (window, at) = match i {
            i if i < self.train_end => (&self.train, i),
            i if i < self.valid_end => (&self.validation, i - self.train_end),
            i => (&self.test, i - self.valid_end),
        };
        window
            .matrix
            .row(at)
            .try_into()
            .expect("the windows' matrices are FEATURE_COUNT wide")
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

/// The tables learned on the whole training window (validation and test
/// rows use them, and the bundle ships them) and, for fold `k`, on the
/// training rows outside it: training rows get out-of-fold encodings, so a
/// row never sees its own label through its brand's rate.
fn learn_all(train: &[Example], names: &Interner) -> (EncodingTables, Vec<EncodingTables>) {
    let tables = learn_tables(train.iter(), names);
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
    (tables, fold_tables)
}
