//! The compiled evaluator agrees with tract on the bundled demo model: its
//! golden vectors (which include rows sitting on split thresholds) and
//! thousands of random rows.

#![allow(clippy::unwrap_used)]

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

mod random_ensembles {
    //! Random ensembles (any depth up to 8, any feature, thresholds from a
    //! small set so rows land exactly on them, NaN sent left or right) in
    //! the demo's graph, against tract: rows of finite values, NaN, ±inf
    //! and values exactly on thresholds. Both walks (one row, a batch) must
    //! give tract's probability, the same bits as each other, and the plain
    //! walk's raw score.

    use super::*;
    use cartscore_core::BundleMetadata;
    use proptest::prelude::*;
    use prost::Message;

    const CUTS: [f32; 6] = [-1.0, 0.0, 0.5, 1.0, 3.25, 100.0];

    #[derive(Debug, Clone)]
    enum Shape {
        Leaf(f32),
        Split {
            feature: u8,
            cut: usize,
            nan_left: bool,
            left: Box<Shape>,
            right: Box<Shape>,
        },
    }

    fn shape(depth: u32) -> BoxedStrategy<Shape> {
        let leaf = (-2.0f32..2.0).prop_map(Shape::Leaf);
        if depth == 0 {
            return leaf.boxed();
        }
        let split = (
            0u8..FEATURE_COUNT as u8,
            0..CUTS.len(),
            any::<bool>(),
            shape(depth - 1),
            shape(depth - 1),
        )
            .prop_map(|(feature, cut, nan_left, left, right)| Shape::Split {
                feature,
                cut,
                nan_left,
                left: Box::new(left),
                right: Box::new(right),
            });
        prop_oneof![1 => leaf, 3 => split].boxed()
    }

    /// The ONNX arrays of the trees, nodes numbered depth first.
    #[derive(Default)]
    struct Arrays {
        tree: Vec<i64>,
        node: Vec<i64>,
        feature: Vec<i64>,
        mode: Vec<Vec<u8>>,
        value: Vec<f32>,
        yes: Vec<i64>,
        no: Vec<i64>,
        missing: Vec<i64>,
        leaf_tree: Vec<i64>,
        leaf_node: Vec<i64>,
        weight: Vec<f32>,
    }

    impl Arrays {
        /// Adds `shape` as node `id` of `tree`; returns the next free id.
        fn add(&mut self, tree: i64, id: i64, shape: &Shape) -> i64 {
            let at = self.node.len();
            self.tree.push(tree);
            self.node.push(id);
            match shape {
                Shape::Leaf(w) => {
                    self.feature.push(0);
                    self.mode.push(b"LEAF".to_vec());
                    self.value.push(0.0);
                    self.yes.push(0);
                    self.no.push(0);
                    self.missing.push(0);
                    self.leaf_tree.push(tree);
                    self.leaf_node.push(id);
                    self.weight.push(*w);
                    id + 1
                }
                Shape::Split {
                    feature,
                    cut,
                    nan_left,
                    left,
                    right,
                } => {
                    self.feature.push(i64::from(*feature));
                    self.mode.push(b"BRANCH_LEQ".to_vec());
                    self.value.push(CUTS[*cut]);
                    self.missing.push(i64::from(*nan_left));
                    self.yes.push(id + 1);
                    self.no.push(0);
                    let next = self.add(tree, id + 1, left);
                    self.no[at] = next;
                    self.add(tree, next, right)
                }
            }
        }
    }

    /// A tree's leaf for `row`, walked from its shape: the oracle the
    /// bundle's golden vector is made with.
    fn leaf(shape: &Shape, row: &[f32]) -> f32 {
        match shape {
            Shape::Leaf(w) => *w,
            Shape::Split {
                feature,
                cut,
                nan_left,
                left,
                right,
            } => {
                let x = row[usize::from(*feature)];
                let go_left = if x.is_nan() {
                    *nan_left
                } else {
                    x <= CUTS[*cut]
                };
                leaf(if go_left { left } else { right }, row)
            }
        }
    }

    /// The demo's bundle with these trees, its golden vector the zero row
    /// scored by walking the shapes.
    fn bundle(trees: &[Shape], base: f32) -> TractModel {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/demo/model.onnx");
        let mut proto = ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
        let mut a = Arrays::default();
        for (t, tree) in trees.iter().enumerate() {
            a.add(t as i64, 0, tree);
        }
        let node = &mut proto.graph.as_mut().unwrap().node[0];
        for attr in &mut node.attribute {
            match attr.name.as_str() {
                "nodes_treeids" => attr.ints = a.tree.clone(),
                "nodes_nodeids" => attr.ints = a.node.clone(),
                "nodes_featureids" => attr.ints = a.feature.clone(),
                "nodes_modes" => attr.strings = a.mode.clone(),
                "nodes_values" => attr.floats = a.value.clone(),
                "nodes_truenodeids" => attr.ints = a.yes.clone(),
                "nodes_falsenodeids" => attr.ints = a.no.clone(),
                "nodes_missing_value_tracks_true" => attr.ints = a.missing.clone(),
                "class_treeids" => attr.ints = a.leaf_tree.clone(),
                "class_nodeids" => attr.ints = a.leaf_node.clone(),
                "class_ids" => attr.ints = vec![0; a.leaf_node.len()],
                "class_weights" => attr.floats = a.weight.clone(),
                "base_values" => attr.floats = vec![base],
                _ => {}
            }
        }
        let mut metadata = BundleMetadata::from_metadata_props(&proto.metadata_props).unwrap();
        let zeros = vec![0f32; FEATURE_COUNT];
        let raw = f64::from(base)
            + trees
                .iter()
                .map(|t| f64::from(leaf(t, &zeros)))
                .sum::<f64>();
        metadata.golden_vectors = vec![cartscore_core::GoldenVector {
            features: zeros,
            probability: 1.0 / (1.0 + (-raw).exp()),
        }];
        metadata.shap = None;
        metadata.profile = None;
        proto.metadata_props = metadata.to_metadata_props();
        TractModel::from_bytes(&proto.encode_to_vec()).unwrap()
    }

    fn value() -> impl Strategy<Value = f32> {
        prop_oneof![
            4 => (0..CUTS.len()).prop_map(|i| CUTS[i]),
            3 => -200.0f32..200.0,
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY),
            1 => Just(f32::NEG_INFINITY),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]
        #[test]
        fn every_walk_gives_tracts_probability(
            trees in proptest::collection::vec(shape(8), 1..40),
            rows in proptest::collection::vec(value(), FEATURE_COUNT * 70),
        ) {
            // No base value: tract 0.23 ignores a lone `base_values` of a
            // binary classifier (the compiled walk adds it), so such a
            // bundle fails the load-time check; the trainer writes none.
            let tract = bundle(&trees, 0.0);
            let compiled = CompiledEnsemble::compile(&tract.proto).unwrap();
            let reference = tract.predict(&rows).unwrap();
            let batch = compiled.predict_rows(&rows);
            for (i, row) in rows.as_chunks::<FEATURE_COUNT>().0.iter().enumerate() {
                let one = compiled.predict(row);
                prop_assert_eq!(one.to_bits(), batch[i].to_bits(), "row {}: one {} batch {}", i, one, batch[i]);
                // The fast walks sum the trees in depth order, the plain one
                // in file order: the same leaves, rounded in another order.
                let (fast, plain) = (compiled.raw_score(row), compiled.raw_score_plain(row));
                prop_assert!((fast - plain).abs() <= 1e-5, "row {}: fast {} plain {}", i, fast, plain);
                prop_assert!((one - reference[i]).abs() <= 1e-6, "row {}: {:?}: compiled {} tract {}", i, row, one, reference[i]);
            }
        }

        /// Trees of at most 64 leaves: batches are scored by QuickScorer
        /// (32-bit sets up to 32 leaves, 64-bit past), to the walk's bits
        /// and tract's probabilities, with NaN in some rows or in none.
        #[test]
        fn quickscorer_gives_the_walks_bits_and_tracts_probability(
            trees in proptest::collection::vec(shape(6), 1..160),
            rows in proptest::collection::vec(value(), FEATURE_COUNT * 64),
            nan_free in any::<bool>(),
        ) {
            let mut rows = rows;
            if nan_free {
                rows.iter_mut().filter(|v| v.is_nan()).for_each(|v| *v = 0.5);
            }
            let tract = bundle(&trees, 0.0);
            let compiled = CompiledEnsemble::compile(&tract.proto).unwrap();
            prop_assert!(compiled.has_quick_batches());
            let reference = tract.predict(&rows).unwrap();
            let batch = compiled.raw_scores(&rows);
            let walked = compiled.raw_scores_walk(&rows);
            for (i, row) in rows.as_chunks::<FEATURE_COUNT>().0.iter().enumerate() {
                let one = compiled.raw_score(row);
                prop_assert_eq!(batch[i].to_bits(), walked[i].to_bits(), "row {}: quick {} walk {}", i, batch[i], walked[i]);
                prop_assert_eq!(one.to_bits(), batch[i].to_bits(), "row {}: one {} batch {}", i, one, batch[i]);
                let p = 1.0 / (1.0 + (-batch[i]).exp());
                // Up to 160 leaves in f32, summed in another order than tract sums them.
                prop_assert!((p - reference[i]).abs() <= 1e-5, "row {}: {:?}: compiled {} tract {}", i, row, p, reference[i]);
            }
            prop_assert!(compiled.max_difference(&rows, &reference) <= 1e-5);
        }
    }
}
