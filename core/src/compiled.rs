//! A tree ensemble compiled into a flat, cache-friendly evaluator.
//!
//! Stock tract runs `TreeEnsembleClassifier` with a linear scan over leaves
//! (milliseconds per row for a few hundred trees). A bundle whose graph is one
//! binary `TreeEnsembleClassifier` with LOGISTIC output is compiled here
//! instead: every tree becomes a run of 16-byte nodes walked by index. A
//! compiled ensemble is only trusted once it agrees with tract: the loaders
//! compare [`CompiledEnsemble::max_difference`] against tract's output on the
//! bundle's golden vectors and on [`check_rows`] around them.

use crate::onnx::{AttributeProto, ModelProto, NodeProto};
use thiserror::Error;

use crate::features::FEATURE_COUNT;
use crate::shap::{ShapError, ShapNode, TreeExplainer};

#[derive(Debug, Error, PartialEq)]
pub enum CompileError {
    #[error("graph is not a single TreeEnsembleClassifier (it has {nodes} nodes, first `{first}`)")]
    NotATreeEnsemble { nodes: usize, first: String },
    #[error("attribute `{name}` is missing or has the wrong type")]
    Attribute { name: &'static str },
    #[error("attribute `{name}` has {found} entries, expected {expected}")]
    Length {
        name: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("unsupported {what}: {value}")]
    Unsupported { what: &'static str, value: String },
    #[error("tree {tree}: {reason}")]
    BadTree { tree: usize, reason: String },
    #[error("tree {tree} node {node}: {what} {value} is not a number the model can serve")]
    NonFinite {
        tree: usize,
        node: usize,
        what: &'static str,
        value: f32,
    },
}

const LEAF: u32 = u32::MAX;
const MISSING_LEFT: u32 = 1 << 31;

/// One node: a split (`x[feature] <= threshold` goes left) or a leaf whose
/// value index is in `left`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
struct Node {
    /// Feature index, with [`MISSING_LEFT`] set when NaN goes left; [`LEAF`] for leaves.
    feature: u32,
    threshold: f32,
    left: u32,
    right: u32,
}

/// The compiled ensemble: trees stored back to back, roots listed in order.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledEnsemble {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    leaf_values: Vec<f32>,
    base: f32,
}

fn attr<'a>(node: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    node.attribute.iter().find(|a| a.name == name)
}

fn ints<'a>(node: &'a NodeProto, name: &'static str) -> Result<&'a [i64], CompileError> {
    attr(node, name)
        .map(|a| a.ints.as_slice())
        .ok_or(CompileError::Attribute { name })
}

fn floats<'a>(node: &'a NodeProto, name: &'static str) -> Result<&'a [f32], CompileError> {
    attr(node, name)
        .map(|a| a.floats.as_slice())
        .ok_or(CompileError::Attribute { name })
}

fn same_len(name: &'static str, found: usize, expected: usize) -> Result<(), CompileError> {
    if found == expected {
        Ok(())
    } else {
        Err(CompileError::Length {
            name,
            found,
            expected,
        })
    }
}

impl CompiledEnsemble {
    /// Compiles the bundle's graph, or says why it is not a plain binary ensemble.
    pub fn compile(model: &ModelProto) -> Result<Self, CompileError> {
        let nodes = model
            .graph
            .as_ref()
            .map(|g| g.node.as_slice())
            .unwrap_or_default();
        let [node] = nodes else {
            return Err(CompileError::NotATreeEnsemble {
                nodes: nodes.len(),
                first: nodes.first().map(|n| n.op_type.clone()).unwrap_or_default(),
            });
        };
        if node.op_type != "TreeEnsembleClassifier" || node.domain != "ai.onnx.ml" {
            return Err(CompileError::NotATreeEnsemble {
                nodes: 1,
                first: node.op_type.clone(),
            });
        }
        let transform =
            attr(node, "post_transform").map(|a| String::from_utf8_lossy(&a.s).into_owned());
        if transform.as_deref() != Some("LOGISTIC") {
            return Err(CompileError::Unsupported {
                what: "post_transform",
                value: format!("{transform:?}"),
            });
        }
        let labels = ints(node, "classlabels_int64s")?;
        if labels.len() != 2 {
            return Err(CompileError::Unsupported {
                what: "class labels",
                value: format!("{labels:?}"),
            });
        }
        let tree_ids = ints(node, "nodes_treeids")?;
        let n = tree_ids.len();
        let node_ids = ints(node, "nodes_nodeids")?;
        let features = ints(node, "nodes_featureids")?;
        let values = floats(node, "nodes_values")?;
        let true_ids = ints(node, "nodes_truenodeids")?;
        let false_ids = ints(node, "nodes_falsenodeids")?;
        let missing = attr(node, "nodes_missing_value_tracks_true")
            .map(|a| a.ints.as_slice())
            .unwrap_or(&[]);
        let modes = attr(node, "nodes_modes")
            .map(|a| a.strings.as_slice())
            .ok_or(CompileError::Attribute {
                name: "nodes_modes",
            })?;
        for (name, len) in [
            ("nodes_nodeids", node_ids.len()),
            ("nodes_featureids", features.len()),
            ("nodes_values", values.len()),
            ("nodes_truenodeids", true_ids.len()),
            ("nodes_falsenodeids", false_ids.len()),
            ("nodes_modes", modes.len()),
        ] {
            same_len(name, len, n)?;
        }
        if !missing.is_empty() {
            same_len("nodes_missing_value_tracks_true", missing.len(), n)?;
        }
        let leaf_trees = ints(node, "class_treeids")?;
        let leaf_nodes = ints(node, "class_nodeids")?;
        let leaf_classes = ints(node, "class_ids")?;
        let leaf_weights = floats(node, "class_weights")?;
        same_len("class_nodeids", leaf_nodes.len(), leaf_trees.len())?;
        same_len("class_ids", leaf_classes.len(), leaf_trees.len())?;
        same_len("class_weights", leaf_weights.len(), leaf_trees.len())?;
        if let Some(c) = leaf_classes.iter().find(|&&c| c != 0) {
            return Err(CompileError::Unsupported {
                what: "leaf class id (binary layout needs 0)",
                value: c.to_string(),
            });
        }
        let base = match attr(node, "base_values") {
            Some(a) if a.floats.len() == 1 => a.floats[0],
            Some(a) if !a.floats.is_empty() => {
                return Err(CompileError::Unsupported {
                    what: "base_values",
                    value: format!("{:?}", a.floats),
                });
            }
            _ => 0.0,
        };

        let n_trees = tree_ids.iter().copied().max().map_or(0, |m| m as usize + 1);
        // Group node positions by tree; node ids index within a tree.
        let mut by_tree: Vec<Vec<usize>> = vec![Vec::new(); n_trees];
        for (pos, &t) in tree_ids.iter().enumerate() {
            let t = usize::try_from(t).map_err(|_| CompileError::BadTree {
                tree: 0,
                reason: format!("negative tree id {t}"),
            })?;
            by_tree[t].push(pos);
        }
        let mut leaf_of: std::collections::HashMap<(i64, i64), f32> =
            std::collections::HashMap::new();
        for ((&t, &id), &w) in leaf_trees.iter().zip(leaf_nodes).zip(leaf_weights) {
            *leaf_of.entry((t, id)).or_default() += w;
        }

        let mut compiled = Self {
            nodes: Vec::with_capacity(n),
            roots: Vec::with_capacity(n_trees),
            leaf_values: Vec::new(),
            base,
        };
        for (tree, positions) in by_tree.iter().enumerate() {
            let bad = |reason: String| CompileError::BadTree { tree, reason };
            let offset = compiled.nodes.len() as u32;
            let max_id = positions
                .iter()
                .map(|&p| node_ids[p])
                .max()
                .ok_or_else(|| bad("no nodes".into()))?;
            let size = usize::try_from(max_id).map_err(|_| bad("negative node id".into()))? + 1;
            if size != positions.len() {
                return Err(bad(format!("node ids are not 0..{}", positions.len())));
            }
            let mut local = vec![None; size];
            for &p in positions {
                let id = node_ids[p] as usize;
                if local[id].replace(p).is_some() {
                    return Err(bad(format!("node id {id} appears twice")));
                }
            }
            let child = |id: i64| -> Result<u32, CompileError> {
                if id < 0 || id as usize >= size {
                    return Err(bad(format!("child {id} out of range")));
                }
                Ok(offset + id as u32)
            };
            for (id, p) in local.into_iter().enumerate() {
                let p = p.ok_or_else(|| bad(format!("node id {id} missing")))?;
                let mode = String::from_utf8_lossy(&modes[p]);
                let node = match mode.as_ref() {
                    "LEAF" => {
                        let value = leaf_of
                            .get(&(tree as i64, id as i64))
                            .copied()
                            .unwrap_or(0.0);
                        if !value.is_finite() {
                            return Err(CompileError::NonFinite {
                                tree,
                                node: id,
                                what: "leaf value",
                                value,
                            });
                        }
                        compiled.leaf_values.push(value);
                        Node {
                            feature: LEAF,
                            threshold: 0.0,
                            left: compiled.leaf_values.len() as u32 - 1,
                            right: 0,
                        }
                    }
                    "BRANCH_LEQ" | "BRANCH_LT" => {
                        let feature = usize::try_from(features[p])
                            .ok()
                            .filter(|&f| f < FEATURE_COUNT)
                            .ok_or_else(|| {
                                bad(format!(
                                    "feature {} outside the {FEATURE_COUNT}-column row",
                                    features[p]
                                ))
                            })?;
                        // An infinite threshold is a split every value takes
                        // one way; NaN compares false with everything.
                        if values[p].is_nan() {
                            return Err(CompileError::NonFinite {
                                tree,
                                node: id,
                                what: "threshold",
                                value: values[p],
                            });
                        }
                        // `x < t` on f32 is `x <= largest f32 below t`.
                        let threshold = if mode == "BRANCH_LT" {
                            values[p].next_down()
                        } else {
                            values[p]
                        };
                        let nan_left = missing.get(p).is_some_and(|&m| m != 0);
                        Node {
                            feature: feature as u32 | if nan_left { MISSING_LEFT } else { 0 },
                            threshold,
                            left: child(true_ids[p])?,
                            right: child(false_ids[p])?,
                        }
                    }
                    other => {
                        return Err(CompileError::Unsupported {
                            what: "node mode",
                            value: other.to_string(),
                        });
                    }
                };
                compiled.nodes.push(node);
            }
            compiled.roots.push(offset);
        }
        compiled.check_acyclic()?;
        Ok(compiled)
    }

    /// Children must point forward within their tree, so every walk ends.
    fn check_acyclic(&self) -> Result<(), CompileError> {
        for (tree, &root) in self.roots.iter().enumerate() {
            let end = self
                .roots
                .get(tree + 1)
                .copied()
                .unwrap_or(self.nodes.len() as u32);
            for i in root..end {
                let n = self.nodes[i as usize];
                if n.feature != LEAF
                    && (n.left <= i || n.right <= i || n.left >= end || n.right >= end)
                {
                    return Err(CompileError::BadTree {
                        tree,
                        reason: format!("node {} does not point forward", i - root),
                    });
                }
            }
        }
        Ok(())
    }

    pub fn trees(&self) -> usize {
        self.roots.len()
    }

    /// The same trees for TreeSHAP, with `covers[tree][node id]` (the ONNX
    /// ids: each tree is laid out in node-id order) and exactly the served
    /// thresholds, missing-value sides and leaf values, so an explanation
    /// adds up to the raw score this ensemble serves.
    pub fn explainer(&self, covers: &[Vec<u64>]) -> Result<TreeExplainer, ShapError> {
        if covers.len() != self.roots.len() {
            return Err(ShapError::Trees {
                found: covers.len(),
                expected: self.roots.len(),
            });
        }
        let mut trees = Vec::with_capacity(self.roots.len());
        for (tree, (&root, covers)) in self.roots.iter().zip(covers).enumerate() {
            let end = self
                .roots
                .get(tree + 1)
                .copied()
                .unwrap_or(self.nodes.len() as u32);
            let nodes = &self.nodes[root as usize..end as usize];
            if covers.len() != nodes.len() {
                return Err(ShapError::Covers {
                    tree,
                    found: covers.len(),
                    expected: nodes.len(),
                });
            }
            let shap_nodes = nodes
                .iter()
                .zip(covers)
                .map(|(n, &cover)| {
                    let cover = cover as f64;
                    if n.feature == LEAF {
                        ShapNode::Leaf {
                            value: f64::from(self.leaf_values[n.left as usize]),
                            cover,
                        }
                    } else {
                        ShapNode::Split {
                            feature: n.feature & !MISSING_LEFT,
                            threshold: n.threshold,
                            missing_left: n.feature & MISSING_LEFT != 0,
                            left: n.left - root,
                            right: n.right - root,
                            cover,
                        }
                    }
                })
                .collect();
            trees.push(shap_nodes);
        }
        TreeExplainer::new(trees, f64::from(self.base), FEATURE_COUNT)
    }

    /// The raw score (sum of leaves plus base) of one row.
    #[inline]
    pub fn raw_score(&self, row: &[f32; FEATURE_COUNT]) -> f32 {
        let mut sum = self.base;
        for &root in &self.roots {
            let mut i = root as usize;
            loop {
                let n = self.nodes[i];
                if n.feature == LEAF {
                    sum += self.leaf_values[n.left as usize];
                    break;
                }
                let x = row[(n.feature & !MISSING_LEFT) as usize];
                let go_left = if x.is_nan() {
                    n.feature & MISSING_LEFT != 0
                } else {
                    x <= n.threshold
                };
                i = if go_left { n.left } else { n.right } as usize;
            }
        }
        sum
    }

    /// P(purchase) for one row.
    #[inline]
    pub fn predict(&self, row: &[f32; FEATURE_COUNT]) -> f32 {
        1.0 / (1.0 + (-self.raw_score(row)).exp())
    }

    /// P(purchase) for each row of a row-major batch (a trailing partial
    /// row is ignored).
    pub fn predict_rows(&self, rows: &[f32]) -> Vec<f32> {
        rows.as_chunks::<FEATURE_COUNT>()
            .0
            .iter()
            .map(|row| self.predict(row))
            .collect()
    }

    /// The largest difference to `reference` over `rows` (row-major).
    pub fn max_difference(&self, rows: &[f32], reference: &[f32]) -> f32 {
        rows.chunks_exact(FEATURE_COUNT)
            .zip(reference)
            .map(|(row, &r)| {
                let row: &[f32; FEATURE_COUNT] = row.try_into().unwrap_or(&[0.0; FEATURE_COUNT]);
                (self.predict(row) - r).abs()
            })
            .fold(0.0, f32::max)
    }
}

/// Deterministic rows near `golden` for checking an evaluator against a
/// reference: each starts from a golden row and perturbs some columns
/// (scaled, small counts, negative or price-like values), so tree walks reach
/// deep leaves and both sides of many splits. Row-major.
pub fn check_rows(golden: &[Vec<f32>], count: usize, seed: u64) -> Vec<f32> {
    // xorshift64*: reproducible without a dependency.
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut out = Vec::with_capacity(count * FEATURE_COUNT);
    if golden.is_empty() {
        return out;
    }
    for _ in 0..count {
        let base = &golden[(next() % golden.len() as u64) as usize];
        for c in 0..FEATURE_COUNT {
            let v = base.get(c).copied().unwrap_or(0.0);
            let r = next();
            out.push(match r % 4 {
                0 => v,
                1 => v * (0.5 + (r >> 32) as f32 / u32::MAX as f32),
                2 => ((r >> 40) % 50) as f32,
                _ => {
                    if c == crate::features::col::PRICE {
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
