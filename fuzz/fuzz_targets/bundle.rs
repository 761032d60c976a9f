//! Bundle loading, as the reloader does it: ONNX bytes to metadata, the
//! golden vectors checked by tract, the ensemble compiled and verified.
//! A refused bundle names its reason; a bundle that loads with the
//! compiled evaluator gives tract's probability on rows made from the
//! input, and an explanation that adds up to the score.
#![no_main]

use std::io::Write;

use cartscore_appliance::model::serving::Evaluator;
use cartscore_appliance::model::{LoadLimits, ServingModel};
use cartscore_core::compiled::check_rows;
use cartscore_core::{FEATURE_COUNT, FeatureRow, TractModel};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::NamedTempFile::new().expect("a temporary file");
    file.write_all(data).expect("written");
    let limits = LoadLimits {
        verify_rows: 16,
        max_bytes: 8 << 20,
    };
    let model = match ServingModel::load(file.path(), limits) {
        Ok((model, _)) => model,
        Err(error) => {
            assert!(!error.to_string().is_empty());
            return;
        }
    };
    let Evaluator::Compiled(compiled) = &model.evaluator else {
        return;
    };
    let tract = TractModel::from_bytes(data).expect("loaded once, it loads again");
    let seed = data
        .iter()
        .fold(7u64, |h, b| h.rotate_left(5) ^ u64::from(*b));
    // A full chunk of 16 rows, so the batch form (QuickScorer) is checked too.
    let rows = check_rows(&model.metadata.golden_rows(), 16, seed);
    let reference = tract.predict(&rows).expect("tract scores what it verified");
    let diff = compiled.max_difference(&rows, &reference);
    assert!(diff <= 1e-5, "compiled and tract differ by {diff}");
    for row in rows.chunks_exact(FEATURE_COUNT) {
        let row = FeatureRow(row.try_into().expect("a row"));
        if let Ok(explanation) = model.explain(&row) {
            let raw = f64::from(compiled.raw_score(&row.0));
            let total = explanation.total();
            assert!(
                (total - raw).abs() <= 1e-4,
                "explanation adds to {total}, the score is {raw}"
            );
        }
    }
});
