//! Turns a LightGBM model into the bundle: an `ai.onnx.ml.TreeEnsembleClassifier`
//! (post_transform LOGISTIC, no ZipMap) with the cartscore metadata.
//!
//! LightGBM splits `x <= t` on f64 thresholds while ONNX thresholds and our
//! feature rows are f32. Each threshold becomes the f32 `T` for which every
//! f32 input takes the same branch in both (see [`f32_threshold`]).

use anyhow::{Context, Result, bail, ensure};
use cartscore_core::BundleMetadata;
use cartscore_core::FEATURE_COUNT;
use cartscore_core::onnx::attribute_proto::AttributeType;
use cartscore_core::onnx::tensor_shape_proto::{Dimension, dimension};
use cartscore_core::onnx::type_proto::{Tensor as TensorType, Value as TypeValue};
use cartscore_core::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto,
    TypeProto, ValueInfoProto,
};
use prost::Message;

/// One split of a tree.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub feature: usize,
    pub threshold: f64,
    pub default_left: bool,
    pub left: Child,
    pub right: Child,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Child {
    Split(usize),
    Leaf(usize),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Tree {
    pub splits: Vec<Split>,
    pub leaves: Vec<f64>,
    /// Training rows that reached each split and each leaf (LightGBM's
    /// `internal_count`, `leaf_count`): TreeSHAP's covers. Empty when the
    /// model text has none.
    pub split_counts: Vec<u64>,
    pub leaf_counts: Vec<u64>,
}

/// Each tree's covers in its ONNX node-id order (splits, then leaves, as
/// [`onnx_model`] numbers them), or `None` when the model text lacks counts.
/// A tree that is a single leaf needs none: its value is all it adds.
pub fn covers(trees: &[Tree]) -> Option<Vec<Vec<u64>>> {
    trees
        .iter()
        .map(|tree| {
            if tree.splits.is_empty() {
                return Some(vec![tree.leaf_counts.first().copied().unwrap_or(0)]);
            }
            (tree.split_counts.len() == tree.splits.len()
                && tree.leaf_counts.len() == tree.leaves.len())
            .then(|| [tree.split_counts.as_slice(), &tree.leaf_counts].concat())
        })
        .collect()
}

/// LightGBM reads an input with `|x| <= 1e-35` (its `kZeroThreshold`, an
/// f32) as 0: its predictor keeps only the values above it as non-zero.
const LIGHTGBM_ZERO: f32 = 1e-35;

/// The f32 `T` such that, for every f32 input `x`, `x <= T` exactly when
/// LightGBM sends `x` left at its threshold `t`: it compares `x <= t` in
/// f64, after reading `|x| <= 1e-35` as 0. Away from zero that is the
/// largest f32 not above `t`. LightGBM's own zero bin puts thresholds at
/// exactly ±1e-35, where the difference shows: at `t = -1e-35` an input of
/// -1e-35 goes right in LightGBM (it is 0 there), not left.
pub fn f32_threshold(t: f64) -> f32 {
    let zero = f64::from(LIGHTGBM_ZERO);
    if t >= zero || t < -zero {
        // Inputs near zero fall on the same side as 0 does.
        let f = t as f32;
        if f64::from(f) > t { f.next_down() } else { f }
    } else if t >= 0.0 {
        // Left: everything up to the band's top (the band reads 0 <= t).
        LIGHTGBM_ZERO
    } else {
        // -1e-35 <= t < 0: left only below the band (it reads 0 > t).
        (-LIGHTGBM_ZERO).next_down()
    }
}

fn numbers<T: std::str::FromStr>(key: &str, value: &str) -> Result<Vec<T>> {
    value
        .split_whitespace()
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| anyhow::anyhow!("LightGBM model field {key} has a bad value {v:?}"))
        })
        .collect()
}

/// Parses LightGBM's text model format (what `save_string` returns).
pub fn parse_lightgbm(text: &str) -> Result<Vec<Tree>> {
    let mut trees = Vec::new();
    let mut fields: Vec<(&str, &str)> = Vec::new();
    let mut in_tree = false;
    for line in text.lines().chain(std::iter::once("")) {
        if line.starts_with("Tree=") {
            in_tree = true;
            fields.clear();
        } else if line.trim().is_empty() || line.starts_with("end of trees") {
            if in_tree {
                trees.push(
                    parse_tree(&fields)
                        .with_context(|| format!("in LightGBM tree {}", trees.len()))?,
                );
                in_tree = false;
            }
        } else if in_tree && let Some((k, v)) = line.split_once('=') {
            fields.push((k, v));
        }
    }
    ensure!(!trees.is_empty(), "the LightGBM model has no trees");
    Ok(trees)
}

fn parse_tree(fields: &[(&str, &str)]) -> Result<Tree> {
    let get = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .unwrap_or("")
    };
    let num_leaves: usize = get("num_leaves").trim().parse().context("num_leaves")?;
    if get("num_cat").trim().parse::<usize>().unwrap_or(0) > 0 {
        bail!("categorical splits are not supported");
    }
    let leaves: Vec<f64> = numbers("leaf_value", get("leaf_value"))?;
    ensure!(
        leaves.len() == num_leaves,
        "{} leaf values for {num_leaves} leaves",
        leaves.len()
    );
    let counts = |key: &str, expected: usize| -> Result<Vec<u64>> {
        let values: Vec<u64> = numbers(key, get(key))?;
        ensure!(
            values.is_empty() || values.len() == expected,
            "{} {key} values for {expected} nodes",
            values.len()
        );
        Ok(values)
    };
    let leaf_counts = counts("leaf_count", num_leaves)?;
    if num_leaves == 1 {
        return Ok(Tree {
            leaves,
            leaf_counts,
            ..Tree::default()
        });
    }
    let split_counts = counts("internal_count", num_leaves - 1)?;
    let features: Vec<usize> = numbers("split_feature", get("split_feature"))?;
    let thresholds: Vec<f64> = numbers("threshold", get("threshold"))?;
    let decisions: Vec<u32> = numbers("decision_type", get("decision_type"))?;
    let left: Vec<i64> = numbers("left_child", get("left_child"))?;
    let right: Vec<i64> = numbers("right_child", get("right_child"))?;
    let n = num_leaves - 1;
    ensure!(
        [
            features.len(),
            thresholds.len(),
            decisions.len(),
            left.len(),
            right.len()
        ]
        .iter()
        .all(|&l| l == n),
        "split arrays do not have {n} entries"
    );
    let child = |c: i64| -> Result<Child> {
        if c >= 0 {
            ensure!((c as usize) < n, "child {c} out of range");
            Ok(Child::Split(c as usize))
        } else {
            let leaf = (!c) as usize;
            ensure!(leaf < num_leaves, "leaf {leaf} out of range");
            Ok(Child::Leaf(leaf))
        }
    };
    let mut splits = Vec::with_capacity(n);
    for i in 0..n {
        let decision = decisions[i];
        ensure!(decision & 1 == 0, "categorical split in node {i}");
        let missing = (decision >> 2) & 3;
        // Missing type Zero would send 0.0 down the default branch; rows never
        // carry NaN and training never sets zero_as_missing, so only None/NaN occur.
        ensure!(
            missing != 1,
            "zero-as-missing split in node {i} is not supported"
        );
        ensure!(
            features[i] < FEATURE_COUNT,
            "split on feature {} outside the contract",
            features[i]
        );
        splits.push(Split {
            feature: features[i],
            threshold: thresholds[i],
            default_left: decision & 2 != 0,
            left: child(left[i])?,
            right: child(right[i])?,
        });
    }
    Ok(Tree {
        splits,
        leaves,
        split_counts,
        leaf_counts,
    })
}

fn ints(name: &str, values: Vec<i64>) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values,
        ..Default::default()
    }
}

fn floats(name: &str, values: Vec<f32>) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Floats as i32,
        floats: values,
        ..Default::default()
    }
}

fn strings(name: &str, values: Vec<&str>) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Strings as i32,
        strings: values.into_iter().map(|s| s.as_bytes().to_vec()).collect(),
        ..Default::default()
    }
}

fn string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: value.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn tensor_info(name: &str, elem_type: i32, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            denotation: String::new(),
            value: Some(match d {
                Some(v) => dimension::Value::DimValue(*v),
                None => dimension::Value::DimParam("batch".into()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            denotation: String::new(),
            value: Some(TypeValue::TensorType(TensorType {
                elem_type,
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

const FLOAT: i32 = 1;
const INT64: i32 = 7;

/// Builds the ONNX graph `features [batch, N] -> (label [batch], probabilities [batch, 2])`.
pub fn onnx_model(trees: &[Tree], metadata: &BundleMetadata) -> ModelProto {
    let (mut tree_ids, mut node_ids, mut feature_ids, mut modes, mut values) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut true_ids, mut false_ids, mut missing_true) = (vec![], vec![], vec![]);
    let (mut leaf_tree_ids, mut leaf_node_ids, mut leaf_weights) = (vec![], vec![], vec![]);
    for (t, tree) in trees.iter().enumerate() {
        let internal = tree.splits.len() as i64;
        let id = |c: Child| match c {
            Child::Split(i) => i as i64,
            Child::Leaf(l) => internal + l as i64,
        };
        for (i, split) in tree.splits.iter().enumerate() {
            tree_ids.push(t as i64);
            node_ids.push(i as i64);
            feature_ids.push(split.feature as i64);
            modes.push("BRANCH_LEQ");
            values.push(f32_threshold(split.threshold));
            true_ids.push(id(split.left));
            false_ids.push(id(split.right));
            missing_true.push(i64::from(split.default_left));
        }
        for (l, &value) in tree.leaves.iter().enumerate() {
            tree_ids.push(t as i64);
            node_ids.push(internal + l as i64);
            feature_ids.push(0);
            modes.push("LEAF");
            values.push(0.0);
            true_ids.push(0);
            false_ids.push(0);
            missing_true.push(0);
            leaf_tree_ids.push(t as i64);
            leaf_node_ids.push(internal + l as i64);
            leaf_weights.push(value as f32);
        }
    }
    let leaf_count = leaf_weights.len();
    let node = NodeProto {
        input: vec!["features".into()],
        output: vec!["label".into(), "probabilities".into()],
        name: "trees".into(),
        op_type: "TreeEnsembleClassifier".into(),
        domain: "ai.onnx.ml".into(),
        attribute: vec![
            ints("classlabels_int64s", vec![0, 1]),
            ints("nodes_treeids", tree_ids),
            ints("nodes_nodeids", node_ids),
            ints("nodes_featureids", feature_ids),
            strings("nodes_modes", modes),
            floats("nodes_values", values),
            ints("nodes_truenodeids", true_ids),
            ints("nodes_falsenodeids", false_ids),
            ints("nodes_missing_value_tracks_true", missing_true),
            ints("class_treeids", leaf_tree_ids),
            ints("class_nodeids", leaf_node_ids),
            ints("class_ids", vec![0; leaf_count]),
            floats("class_weights", leaf_weights),
            string("post_transform", "LOGISTIC"),
        ],
        doc_string: String::new(),
    };
    ModelProto {
        ir_version: 8,
        opset_import: vec![
            OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            },
            OperatorSetIdProto {
                domain: "ai.onnx.ml".into(),
                version: 1,
            },
        ],
        producer_name: "cartscore-trainer".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        doc_string: "P(cart item is purchased later in the session)".into(),
        graph: Some(GraphProto {
            node: vec![node],
            name: "cartscore".into(),
            input: vec![tensor_info(
                "features",
                FLOAT,
                &[None, Some(FEATURE_COUNT as i64)],
            )],
            output: vec![
                tensor_info("label", INT64, &[None]),
                tensor_info("probabilities", FLOAT, &[None, Some(2)]),
            ],
            ..Default::default()
        }),
        metadata_props: metadata.to_metadata_props(),
        ..Default::default()
    }
}

pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Rows that sit exactly on split thresholds (and one f32 step above), made
/// from `base` rows: where f64 and f32 trees would disagree if the threshold
/// conversion were wrong.
pub fn edge_rows(trees: &[Tree], base: &[f32], limit: usize) -> Vec<f32> {
    let base_rows = base.len() / FEATURE_COUNT;
    if base_rows == 0 {
        return Vec::new();
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for split in trees.iter().flat_map(|t| &t.splits) {
        let at = f32_threshold(split.threshold);
        if !at.is_finite() || !seen.insert((split.feature, at.to_bits())) {
            continue;
        }
        for value in [at, at.next_up()] {
            let i = seen.len() % base_rows;
            let mut row = base[i * FEATURE_COUNT..(i + 1) * FEATURE_COUNT].to_vec();
            row[split.feature] = value;
            out.extend_from_slice(&row);
        }
        if out.len() / FEATURE_COUNT >= limit {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// LightGBM's side of `t` for an f32 input: `x <= t` in f64, with
    /// `|x| <= 1e-35` read as 0.
    fn lightgbm_left(x: f32, t: f64) -> bool {
        let x = if x.abs() <= LIGHTGBM_ZERO {
            0.0
        } else {
            f64::from(x)
        };
        x <= t
    }

    #[test]
    fn near_zero_every_f32_takes_lightgbms_branch() {
        let zero = f64::from(LIGHTGBM_ZERO);
        let mut inputs = vec![0.0f32, -0.0, 1e-36, -1e-36, 1e-45, -1e-45, 1.0, -1.0];
        for edge in [LIGHTGBM_ZERO, -LIGHTGBM_ZERO] {
            inputs.extend([edge, edge.next_up(), edge.next_down()]);
        }
        for t in [
            zero, -zero, 0.0, 5e-36, -5e-36, 2e-35, -2e-35, 1e-30, -1e-30,
        ] {
            let f = f32_threshold(t);
            for &x in &inputs {
                assert_eq!(
                    x <= f,
                    lightgbm_left(x, t),
                    "threshold {t:e} -> {f:e}, input {x:e}"
                );
            }
        }
    }

    #[test]
    fn threshold_keeps_every_f32_on_its_side() {
        for t in [
            0.1f64,
            1.0000000180025095e-35,
            35.785,
            1e30,
            -2.5,
            -3e-30,
            7.0,
            1.0 / 3.0,
        ] {
            let f = f32_threshold(t);
            assert!(f64::from(f) <= t);
            assert!(
                f64::from(f.next_up()) > t,
                "{t}: {f} is not the largest f32 below"
            );
            assert_eq!(f, f32_threshold(t), "away from zero: plain rounding down");
        }
    }

    const MODEL: &str = "tree\nversion=v4\n\nTree=0\nnum_leaves=3\nnum_cat=0\nsplit_feature=2 8\n\
        threshold=35.785000000000004 1.5000000000000002\ndecision_type=2 2\nleft_child=1 -1\nright_child=-3 -2\n\
        leaf_value=0.5 -0.25 0.125\nshrinkage=1\n\n\nTree=1\nnum_leaves=1\nnum_cat=0\nsplit_feature=\nthreshold=\n\
        decision_type=\nleft_child=\nright_child=\nleaf_value=0.03\nshrinkage=1\n\n\nend of trees\n";

    #[test]
    fn parses_lightgbm_text() {
        let trees = parse_lightgbm(MODEL).unwrap();
        assert_eq!(trees.len(), 2);
        assert_eq!(trees[0].splits[0].left, Child::Split(1));
        assert_eq!(trees[0].splits[0].right, Child::Leaf(2));
        assert_eq!(trees[0].splits[1].left, Child::Leaf(0));
        assert_eq!(trees[1].leaves, vec![0.03]);
        assert!(parse_lightgbm("tree\n").is_err());
    }
}
