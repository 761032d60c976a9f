//! The compiled evaluator agrees with tract on the bundled demo model: its
//! golden vectors (which include rows sitting on split thresholds) and
//! thousands of random rows.

use std::path::PathBuf;

use cartscore_core::compiled::{CompileError, CompiledEnsemble};
use cartscore_core::{FEATURE_COUNT, TractModel};
use tract_onnx::pb::ModelProto;

fn demo() -> (TractModel, CompiledEnsemble) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo/model.onnx");
    let tract = TractModel::load(&path).expect("demo bundle loads in tract");
    let compiled = CompiledEnsemble::compile(&tract.proto).expect("demo bundle compiles");
    (tract, compiled)
}

/// xorshift64*: a deterministic source of rows without another dependency.
fn rows(n: usize, golden: &[Vec<f32>]) -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut out = Vec::with_capacity(n * FEATURE_COUNT);
    for _ in 0..n {
        // Start from a real row and perturb some columns, so walks reach deep leaves.
        let base = &golden[(next() % golden.len() as u64) as usize];
        for (c, &v) in base.iter().enumerate() {
            let r = next();
            out.push(match r % 4 {
                0 => v,
                1 => v * (0.5 + (r >> 32) as f32 / u32::MAX as f32),
                2 => ((r >> 40) % 50) as f32,
                _ => {
                    if c == 2 {
                        ((r >> 20) % 100_000) as f32 / 100.0
                    } else {
                        -1.0 + (r >> 50) as f32 / 4096.0
                    }
                }
            });
        }
    }
    out
}

#[test]
fn compiled_demo_matches_tract() {
    let (tract, compiled) = demo();
    assert!(compiled.trees() > 10);
    let golden: Vec<Vec<f32>> = tract
        .metadata
        .golden_vectors
        .iter()
        .map(|g| g.features.clone())
        .collect();
    for g in &tract.metadata.golden_vectors {
        let row: [f32; FEATURE_COUNT] = g.features.as_slice().try_into().unwrap();
        assert!((f64::from(compiled.predict(&row)) - g.probability).abs() <= 1e-5);
    }
    let random = rows(5_000, &golden);
    let reference = tract.predict(&random).unwrap();
    let worst = compiled.max_difference(&random, &reference);
    assert!(
        worst <= 1e-6,
        "compiled evaluator differs from tract by {worst}"
    );
}

#[test]
fn other_graphs_are_left_to_tract() {
    let empty = ModelProto::default();
    assert!(matches!(
        CompiledEnsemble::compile(&empty),
        Err(CompileError::NotATreeEnsemble { nodes: 0, .. })
    ));
    let (tract, _) = demo();
    let mut proto = tract.proto.clone();
    let node = &mut proto.graph.as_mut().unwrap().node[0];
    node.attribute
        .iter_mut()
        .find(|a| a.name == "post_transform")
        .unwrap()
        .s = b"SOFTMAX".to_vec();
    assert!(matches!(
        CompiledEnsemble::compile(&proto),
        Err(CompileError::Unsupported {
            what: "post_transform",
            ..
        })
    ));
    let mut proto = tract.proto.clone();
    let node = &mut proto.graph.as_mut().unwrap().node[0];
    node.attribute
        .iter_mut()
        .find(|a| a.name == "nodes_truenodeids")
        .unwrap()
        .ints[0] = 0;
    assert!(matches!(
        CompiledEnsemble::compile(&proto),
        Err(CompileError::BadTree { .. })
    ));
}
