//! A tree ensemble compiled into a flat, cache-friendly evaluator.
//!
//! Stock tract runs `TreeEnsembleClassifier` with a linear scan over leaves
//! (milliseconds per row for a few hundred trees). A bundle whose graph is one
//! binary `TreeEnsembleClassifier` with LOGISTIC output is compiled here
//! instead. A compiled ensemble is only trusted once it agrees with tract:
//! the loaders compare [`CompiledEnsemble::max_difference`] (both the
//! one-row and the batch walk) against tract's output on the bundle's golden
//! vectors and on [`check_rows`] around them.
//!
//! The walk. A row walking one tree is a chain of dependent loads (node,
//! then feature, then child), each waiting for the last: most of its time
//! is latency, not work. So the evaluator walks several chains at once:
//! [`LANES`] trees side by side for one row, [`LANES`] rows side by side
//! through one tree for a batch. To walk in lockstep without a branch per
//! step, every leaf is a node that leads back to itself (threshold +inf,
//! both children itself), so a tree is walked exactly its depth in steps
//! and a walk that reached its leaf early stays there; the next node is
//! picked from the pair of children by the comparison, not by a branch.
//! Leaves are added in tree order, one at a time, in both walks, so a row
//! scores to the same bits alone or in a batch.

mod quick;

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

/// Trees walked side by side (one row), or rows (a batch).
pub const LANES: usize = 16;

/// A row padded to a power of two, so that a masked feature index needs no
/// bounds check.
const PADDED: usize = 32;
const FEATURE_MASK: u32 = PADDED as u32 - 1;
const NAN_RIGHT: u32 = 1 << 31;

/// One node of the walk: `x > threshold` (or NaN where `NAN_RIGHT` says)
/// goes to `child + 1`, anything else to `child`: a node's two children are
/// neighbours, so the next node is an addition, not a load. A leaf is its
/// own child with an infinite threshold: no value goes past it.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C, align(16))]
struct Step {
    /// Feature index, with [`NAN_RIGHT`] set when NaN goes right.
    feature: u32,
    threshold: f32,
    child: u32,
    /// The leaf's value (0 at a split).
    value: f32,
}

/// Trees `order[first..first + count]`, walked together `depth` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Group {
    first: u32,
    count: u32,
    depth: u32,
}

/// The compiled ensemble: trees stored back to back, roots listed in order;
/// and the same trees laid out for the walk.
#[derive(Debug, Clone, PartialEq)]
pub struct CompiledEnsemble {
    nodes: Vec<Node>,
    roots: Vec<u32>,
    leaf_values: Vec<f32>,
    base: f32,
    /// The walk's nodes (trees back to back, siblings side by side), each
    /// tree's root there, its depth, the order trees are walked and summed
    /// in (by depth, so a group walks no longer than its trees need) and
    /// the one-row groups over that order.
    steps: Vec<Step>,
    walk_roots: Vec<u32>,
    depths: Vec<u32>,
    order: Vec<u32>,
    groups: Vec<Group>,
    /// The batch form, when every tree fits its masks.
    quick: Option<Box<quick::Quick>>,
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
            steps: Vec::new(),
            walk_roots: Vec::new(),
            depths: Vec::new(),
            order: Vec::new(),
            groups: Vec::new(),
            quick: None,
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
        compiled.lay_out_walk()?;
        compiled.quick = quick::Quick::new(
            &compiled.nodes,
            &compiled.roots,
            &compiled.leaf_values,
            &compiled.order,
        )
        .map(Box::new);
        Ok(compiled)
    }

    /// The walk's layout of the checked trees (see the module's notes):
    /// each tree breadth first from its root, a split's children placed
    /// side by side.
    fn lay_out_walk(&mut self) -> Result<(), CompileError> {
        let mut steps = Vec::with_capacity(self.nodes.len());
        let mut walk_roots = Vec::with_capacity(self.roots.len());
        let mut depths = Vec::with_capacity(self.roots.len());
        for &root in &self.roots {
            let base = steps.len() as u32;
            walk_roots.push(base);
            // (node in `nodes`, its place in `steps`, its depth)
            let mut queue = std::collections::VecDeque::from([(root, base, 0u32)]);
            let mut next = base + 1;
            let mut depth = 0;
            steps.push(Step {
                feature: 0,
                threshold: 0.0,
                child: 0,
                value: 0.0,
            });
            while let Some((node, at, level)) = queue.pop_front() {
                depth = depth.max(level);
                let n = self.nodes[node as usize];
                let step = if n.feature == LEAF {
                    Step {
                        feature: 0,
                        threshold: f32::INFINITY,
                        child: at,
                        value: self.leaf_values[n.left as usize],
                    }
                } else {
                    let child = next;
                    next += 2;
                    steps.push(Step {
                        feature: 0,
                        threshold: 0.0,
                        child: 0,
                        value: 0.0,
                    });
                    steps.push(Step {
                        feature: 0,
                        threshold: 0.0,
                        child: 0,
                        value: 0.0,
                    });
                    queue.push_back((n.left, child, level + 1));
                    queue.push_back((n.right, child + 1, level + 1));
                    let nan_left = n.feature & MISSING_LEFT != 0;
                    Step {
                        feature: (n.feature & !MISSING_LEFT) | if nan_left { 0 } else { NAN_RIGHT },
                        threshold: n.threshold,
                        child,
                        value: 0.0,
                    }
                };
                steps[at as usize] = step;
            }
            depths.push(depth);
        }
        let mut order: Vec<u32> = (0..self.roots.len() as u32).collect();
        order.sort_by_key(|&t| depths[t as usize]);
        // Full groups of the deepest trees; the few left over, the
        // shallowest, walk first in a group of their own.
        let partial = order.len() % LANES;
        let mut groups = Vec::new();
        if partial > 0 {
            groups.push(Group {
                first: 0,
                count: partial as u32,
                depth: order[..partial]
                    .iter()
                    .map(|&t| depths[t as usize])
                    .max()
                    .unwrap_or(0),
            });
        }
        for (g, trees) in order[partial..].chunks(LANES).enumerate() {
            groups.push(Group {
                first: (partial + g * LANES) as u32,
                count: trees.len() as u32,
                depth: trees.iter().map(|&t| depths[t as usize]).max().unwrap_or(0),
            });
        }
        self.groups = groups;
        // The walk's invariant (see `step`): no index leaves `steps`. A
        // leaf is its own child; a split's children both follow it.
        let len = steps.len() as u64;
        let inside = walk_roots.iter().all(|&r| u64::from(r) < len)
            && steps.iter().enumerate().all(|(i, s)| {
                let child = u64::from(s.child);
                if child == i as u64 {
                    child < len
                } else {
                    child > i as u64 && child + 1 < len
                }
            });
        if !inside {
            return Err(CompileError::BadTree {
                tree: 0,
                reason: "the walk's layout has an index past its nodes".into(),
            });
        }
        self.steps = steps;
        self.walk_roots = walk_roots;
        self.depths = depths;
        self.order = order;
        Ok(())
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

    /// The raw score (sum of leaves plus base) of one row, walking
    /// [`LANES`] trees at a time. (QuickScorer's form for one row, a set per
    /// tree cleared split by split, was measured slower: for one row it
    /// clears about half of all splits, more work than walking the depth.)
    #[inline]
    pub fn raw_score(&self, row: &[f32; FEATURE_COUNT]) -> f32 {
        self.raw_score_padded(&pad(row))
    }

    #[inline]
    fn raw_score_padded(&self, x: &[f32; PADDED]) -> f32 {
        if x.iter().any(|v| v.is_nan()) {
            self.raw_score_walk::<true>(x)
        } else {
            self.raw_score_walk::<false>(x)
        }
    }

    #[inline(always)]
    fn raw_score_walk<const NAN: bool>(&self, x: &[f32; PADDED]) -> f32 {
        let mut sum = self.base;
        for group in &self.groups {
            let trees = &self.order[group.first as usize..(group.first + group.count) as usize];
            let mut at = [0u32; LANES];
            for (lane, &tree) in at.iter_mut().zip(trees) {
                *lane = self.walk_roots[tree as usize];
            }
            if trees.len() == LANES {
                // A full group: a loop the compiler unrolls.
                for _ in 0..group.depth {
                    for lane in &mut at {
                        *lane = step::<NAN>(&self.steps, x, *lane);
                    }
                }
            } else {
                for _ in 0..group.depth {
                    for lane in &mut at[..trees.len()] {
                        *lane = step::<NAN>(&self.steps, x, *lane);
                    }
                }
            }
            for &lane in &at[..trees.len()] {
                sum += self.steps[lane as usize].value;
            }
        }
        sum
    }

    /// The raw score walking one tree at a time, node by node with a branch
    /// per split: the reference the fast walks are tested against.
    pub fn raw_score_plain(&self, row: &[f32; FEATURE_COUNT]) -> f32 {
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
        logistic(self.raw_score(row))
    }

    /// Raw scores of a row-major batch (a trailing partial row is ignored):
    /// QuickScorer (see `quick`) on 16 rows at a time, the walk for the
    /// rows left over or when a tree has over 64 leaves. The same bits as
    /// [`Self::raw_score`] row by row: the trees are summed in the same order.
    pub fn raw_scores(&self, rows: &[f32]) -> Vec<f32> {
        let Some(quick) = &self.quick else {
            return self.raw_scores_walk(rows);
        };
        let rows = rows.as_chunks::<FEATURE_COUNT>().0;
        let full = rows.len() - rows.len() % quick::LANES;
        let mut out = vec![self.base; rows.len()];
        // Not for fewer than 16 rows: setting up the leaf sets (16 KiB) cost
        // a batch of one row half as much again as its walk.
        if full > 0 {
            quick.add_leaves(&rows[..full], &mut out[..full]);
        }
        for (score, row) in out[full..].iter_mut().zip(&rows[full..]) {
            *score = self.raw_score(row);
        }
        out
    }

    /// Whether batches are scored by QuickScorer (every tree has at most 64
    /// leaves) rather than walked.
    pub fn has_quick_batches(&self) -> bool {
        self.quick.is_some()
    }

    /// Raw scores of a row-major batch, walking [`LANES`] rows at a time
    /// through each tree (fewer rows than that: row by row, trees side by
    /// side): the same bits as [`Self::raw_scores`].
    pub fn raw_scores_walk(&self, rows: &[f32]) -> Vec<f32> {
        let rows = rows.as_chunks::<FEATURE_COUNT>().0;
        if rows.len() < LANES {
            return rows.iter().map(|row| self.raw_score(row)).collect();
        }
        let mut out = Vec::with_capacity(rows.len());
        // Blocks whose padded rows stay in L1 while every tree passes.
        const BLOCK: usize = 64;
        let mut padded = [[0f32; PADDED]; BLOCK];
        let mut sums = [0f32; BLOCK];
        for block in rows.chunks(BLOCK) {
            let n = block.len();
            for (p, row) in padded.iter_mut().zip(block) {
                *p = pad(row);
            }
            let full = n - n % LANES;
            sums[..n].fill(self.base);
            if padded[..full].iter().flatten().any(|v| v.is_nan()) {
                self.walk_block::<true>(&padded[..full], &mut sums[..full]);
            } else {
                self.walk_block::<false>(&padded[..full], &mut sums[..full]);
            }
            // The block's last few rows: trees side by side, in the same order.
            for (sum, x) in sums[full..n].iter_mut().zip(&padded[full..n]) {
                *sum = self.raw_score_padded(x);
            }
            out.extend_from_slice(&sums[..n]);
        }
        out
    }

    /// Adds every tree's leaf to each row's sum, [`LANES`] rows at a time.
    #[inline(always)]
    fn walk_block<const NAN: bool>(&self, padded: &[[f32; PADDED]], sums: &mut [f32]) {
        for &tree in &self.order {
            let (root, depth) = (self.walk_roots[tree as usize], self.depths[tree as usize]);
            for (rows, sums) in padded.chunks_exact(LANES).zip(sums.chunks_exact_mut(LANES)) {
                let mut at = [root; LANES];
                for _ in 0..depth {
                    for (lane, x) in at.iter_mut().zip(rows) {
                        *lane = step::<NAN>(&self.steps, x, *lane);
                    }
                }
                for (sum, &lane) in sums.iter_mut().zip(&at) {
                    *sum += self.steps[lane as usize].value;
                }
            }
        }
    }

    /// P(purchase) for each row of a row-major batch (a trailing partial
    /// row is ignored).
    pub fn predict_rows(&self, rows: &[f32]) -> Vec<f32> {
        probabilities(self.raw_scores(rows))
    }

    /// [`Self::predict_rows`] walking every row (the same bits; benches
    /// time the two side by side).
    pub fn predict_rows_walk(&self, rows: &[f32]) -> Vec<f32> {
        probabilities(self.raw_scores_walk(rows))
    }

    /// The largest difference to `reference` over `rows` (row-major), of
    /// every form: one row at a time, the batch and the batch walked (NaN if
    /// any gives NaN, or if the forms disagree at all).
    pub fn max_difference(&self, rows: &[f32], reference: &[f32]) -> f32 {
        let batch = self.raw_scores(rows);
        let walked = self.raw_scores_walk(rows);
        rows.as_chunks::<FEATURE_COUNT>()
            .0
            .iter()
            .zip(reference)
            .zip(batch.into_iter().zip(walked))
            .map(|((row, &r), (b, w))| {
                let one = self.raw_score(row);
                if one.to_bits() != b.to_bits() || one.to_bits() != w.to_bits() {
                    return f32::NAN;
                }
                (logistic(one) - r).abs()
            })
            .fold(0.0, |worst, d| {
                if d.is_nan() || worst.is_nan() {
                    f32::NAN
                } else {
                    worst.max(d)
                }
            })
    }
}

#[inline]
fn logistic(raw: f32) -> f32 {
    1.0 / (1.0 + (-raw).exp())
}

/// Raw scores turned into probabilities in place.
fn probabilities(mut scores: Vec<f32>) -> Vec<f32> {
    for s in &mut scores {
        *s = logistic(*s);
    }
    scores
}

#[inline]
fn pad(row: &[f32; FEATURE_COUNT]) -> [f32; PADDED] {
    let mut x = [0f32; PADDED];
    x[..FEATURE_COUNT].copy_from_slice(row);
    x
}

/// One step of a walk: the child `x` goes to (a leaf: itself). Without
/// `NAN` the row holds no NaN (the contract's rows use a -1 sentinel), and
/// the step is one comparison.
///
/// `at` is never out of `steps`: a walk starts at a root and moves to a
/// node's `child` or `child + 1`, and [`CompiledEnsemble::lay_out_walk`]
/// checks that every root, every `child + 1` and every leaf's `child` (itself)
/// is inside `steps` before any walk. The bounds check this skips was a
/// fifth of a batch's time (4.9 against 6.0 ns per tree per row on the demo).
#[inline(always)]
#[allow(unsafe_code)]
fn step<const NAN: bool>(steps: &[Step], x: &[f32; PADDED], at: u32) -> u32 {
    debug_assert!((at as usize) < steps.len());
    // SAFETY: `at < steps.len()`, checked for every index a walk can reach
    // when the layout was made (see above).
    let s = unsafe { *steps.get_unchecked(at as usize) };
    let value = x[(s.feature & FEATURE_MASK) as usize];
    // `x > t` is false for NaN, which then goes right only where flagged.
    let right = if NAN {
        (value > s.threshold) | (value.is_nan() & (s.feature & NAN_RIGHT != 0))
    } else {
        value > s.threshold
    };
    s.child + u32::from(right)
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
