//! The compiled evaluator agrees with tract on the bundled demo model: its
//! golden vectors (which include rows sitting on split thresholds) and
//! thousands of random rows.

use std::path::PathBuf;

use cartscore_core::compiled::{CompileError, CompiledEnsemble, check_rows};
use cartscore_core::onnx::ModelProto;
use cartscore_core::{FEATURE_COUNT, TractModel};

fn demo() -> (TractModel, CompiledEnsemble) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo/model.onnx");
    let tract = TractModel::load(&path).expect("demo bundle loads in tract");
    let compiled = CompiledEnsemble::compile(&tract.proto).expect("demo bundle compiles");
    (tract, compiled)
}

#[test]
fn compiled_demo_matches_tract() {
    let (tract, compiled) = demo();
    assert!(compiled.trees() > 10);
    let golden = tract.metadata.golden_rows();
    for g in &tract.metadata.golden_vectors {
        let row: [f32; FEATURE_COUNT] = g.features.as_slice().try_into().unwrap();
        assert!((f64::from(compiled.predict(&row)) - g.probability).abs() <= 1e-5);
    }
    let random = check_rows(&golden, 5_000, 0x9e37_79b9_7f4a_7c15);
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
