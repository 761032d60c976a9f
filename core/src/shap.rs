//! Exact path-dependent TreeSHAP (Lundberg, Erion and Lee, "Consistent
//! Individualized Feature Attribution for Tree Ensembles", Algorithm 2; the
//! same recursion as the `shap` package's `tree_shap.h`): each feature's
//! contribution to one row's raw score (log-odds for this model), from the
//! trees and each node's training cover, in O(leaves × depth²) per tree.
//! Local accuracy holds by construction: the expected value plus the
//! contributions is the raw score.
//!
//! The trees come with their covers (how many training rows reached each
//! node): the ONNX graph does not carry them, so the bundle has to (issue
//! 17; this module is the algorithm, checked against the Shapley values
//! computed by brute force from their definition).

use thiserror::Error;

/// One node of a tree to explain; children are indices into the same tree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ShapNode {
    Split {
        feature: u32,
        /// `x <= threshold` goes left.
        threshold: f32,
        /// Where NaN goes.
        missing_left: bool,
        left: u32,
        right: u32,
        cover: f64,
    },
    Leaf {
        value: f64,
        cover: f64,
    },
}

impl ShapNode {
    fn cover(&self) -> f64 {
        match *self {
            Self::Split { cover, .. } | Self::Leaf { cover, .. } => cover,
        }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum ShapError {
    #[error("tree {tree} has no nodes")]
    Empty { tree: usize },
    #[error("covers are given for {found} trees, the ensemble has {expected}")]
    Trees { found: usize, expected: usize },
    #[error("tree {tree} has {found} covers for {expected} nodes")]
    Covers {
        tree: usize,
        found: usize,
        expected: usize,
    },
    #[error("tree {tree} node {node}: {reason}")]
    Node {
        tree: usize,
        node: usize,
        reason: String,
    },
}

/// A validated ensemble to explain: trees (root first), the base score the
/// trees are added to, and the row width.
#[derive(Debug, Clone)]
pub struct TreeExplainer {
    trees: Vec<Vec<ShapNode>>,
    features: usize,
    /// Deepest root-to-leaf path (splits), which sizes the path buffer.
    max_depth: usize,
    expected_value: f64,
}

/// One row's attribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// The expected raw score over the training data (the covers' weights).
    pub base_value: f64,
    /// Per feature, in the row's order; `base_value` + their sum is the
    /// row's raw score.
    pub contributions: Vec<f64>,
}

impl Explanation {
    /// The raw score the attribution adds up to.
    pub fn total(&self) -> f64 {
        self.base_value + self.contributions.iter().sum::<f64>()
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct PathElement {
    feature: u32,
    zero_fraction: f64,
    one_fraction: f64,
    weight: f64,
}

impl TreeExplainer {
    /// Checks every tree: children point forward inside the tree, features
    /// are inside the row, covers are finite and a split's is positive.
    pub fn new(trees: Vec<Vec<ShapNode>>, base: f64, features: usize) -> Result<Self, ShapError> {
        let mut max_depth = 0;
        let mut expected_value = base;
        for (t, tree) in trees.iter().enumerate() {
            if tree.is_empty() {
                return Err(ShapError::Empty { tree: t });
            }
            let bad = |node: usize, reason: String| ShapError::Node {
                tree: t,
                node,
                reason,
            };
            for (i, node) in tree.iter().enumerate() {
                let cover = node.cover();
                if !cover.is_finite() || cover < 0.0 {
                    return Err(bad(i, format!("cover {cover} is not a finite count")));
                }
                match *node {
                    ShapNode::Split {
                        feature,
                        left,
                        right,
                        threshold,
                        ..
                    } => {
                        if feature as usize >= features {
                            return Err(bad(
                                i,
                                format!("feature {feature} is past the row's {features}"),
                            ));
                        }
                        if threshold.is_nan() {
                            return Err(bad(i, "threshold is NaN".into()));
                        }
                        if cover <= 0.0 {
                            return Err(bad(i, "a split with no cover".into()));
                        }
                        for child in [left, right] {
                            let child = child as usize;
                            if child <= i || child >= tree.len() {
                                return Err(bad(
                                    i,
                                    format!("child {child} does not point forward in the tree"),
                                ));
                            }
                        }
                    }
                    ShapNode::Leaf { value, .. } => {
                        if !value.is_finite() {
                            return Err(bad(i, format!("leaf value {value}")));
                        }
                    }
                }
            }
            let (depth, expected) = depth_and_expectation(tree, 0);
            max_depth = max_depth.max(depth);
            expected_value += expected;
        }
        Ok(Self {
            trees,
            features,
            max_depth,
            expected_value,
        })
    }

    pub fn expected_value(&self) -> f64 {
        self.expected_value
    }

    /// Each feature's contribution to `row`'s raw score.
    pub fn explain(&self, row: &[f32]) -> Explanation {
        let mut contributions = vec![0.0; self.features];
        // Every level keeps its own copy of the path (at most depth + 2
        // elements), back to back.
        let levels = self.max_depth + 2;
        let mut buffer = vec![PathElement::default(); levels * (levels + 1) / 2 + levels];
        for tree in &self.trees {
            recurse(
                tree,
                row,
                &mut contributions,
                &mut buffer,
                Visit {
                    node: 0,
                    depth: 0,
                    zero_fraction: 1.0,
                    one_fraction: 1.0,
                    feature: u32::MAX,
                },
            );
        }
        Explanation {
            base_value: self.expected_value,
            contributions,
        }
    }
}

/// The depth of the subtree at `node` and its cover-weighted mean leaf.
fn depth_and_expectation(tree: &[ShapNode], node: usize) -> (usize, f64) {
    match tree[node] {
        ShapNode::Leaf { value, .. } => (0, value),
        ShapNode::Split {
            left, right, cover, ..
        } => {
            let (l, r) = (left as usize, right as usize);
            let (left_depth, left_mean) = depth_and_expectation(tree, l);
            let (right_depth, right_mean) = depth_and_expectation(tree, r);
            let mean = (tree[l].cover() * left_mean + tree[r].cover() * right_mean) / cover;
            (1 + left_depth.max(right_depth), mean)
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Visit {
    node: usize,
    /// Elements of the parent's path (the first is the root's placeholder).
    depth: usize,
    zero_fraction: f64,
    one_fraction: f64,
    feature: u32,
}

fn recurse(
    tree: &[ShapNode],
    row: &[f32],
    phi: &mut [f64],
    buffer: &mut [PathElement],
    visit: Visit,
) {
    // This level's path: a copy of the parent's, extended by the edge taken.
    let (parent, rest) = buffer.split_at_mut(visit.depth);
    rest[..visit.depth].copy_from_slice(parent);
    let path = rest;
    let mut depth = visit.depth;
    extend(
        path,
        depth,
        visit.zero_fraction,
        visit.one_fraction,
        visit.feature,
    );
    match tree[visit.node] {
        ShapNode::Leaf { value, .. } => {
            for i in 1..=depth {
                let weight = unwound_sum(path, depth, i);
                let element = path[i];
                phi[element.feature as usize] +=
                    weight * (element.one_fraction - element.zero_fraction) * value;
            }
        }
        ShapNode::Split {
            feature,
            threshold,
            missing_left,
            left,
            right,
            cover,
        } => {
            let x = row.get(feature as usize).copied().unwrap_or(f32::NAN);
            let (hot, cold) = if goes_left(x, threshold, missing_left) {
                (left, right)
            } else {
                (right, left)
            };
            let (hot, cold) = (hot as usize, cold as usize);
            let mut incoming_zero = 1.0;
            let mut incoming_one = 1.0;
            // A feature split on again higher up: its edge is undone and
            // the fractions carried on, so it appears once on the path.
            if let Some(k) = (1..=depth).find(|&k| path[k].feature == feature) {
                incoming_zero = path[k].zero_fraction;
                incoming_one = path[k].one_fraction;
                unwind(path, depth, k);
                depth -= 1;
            }
            let children = &mut path[..];
            for (child, zero, one) in [
                (hot, tree[hot].cover() / cover * incoming_zero, incoming_one),
                (cold, tree[cold].cover() / cover * incoming_zero, 0.0),
            ] {
                recurse(
                    tree,
                    row,
                    phi,
                    children,
                    Visit {
                        node: child,
                        depth: depth + 1,
                        zero_fraction: zero,
                        one_fraction: one,
                        feature,
                    },
                );
            }
        }
    }
}

/// A split's rule, as the served ensemble applies it.
fn goes_left(x: f32, threshold: f32, missing_left: bool) -> bool {
    if x.is_nan() {
        missing_left
    } else {
        x <= threshold
    }
}

fn extend(path: &mut [PathElement], depth: usize, zero: f64, one: f64, feature: u32) {
    path[depth] = PathElement {
        feature,
        zero_fraction: zero,
        one_fraction: one,
        weight: if depth == 0 { 1.0 } else { 0.0 },
    };
    let scale = (depth + 1) as f64;
    for i in (0..depth).rev() {
        path[i + 1].weight += one * path[i].weight * (i + 1) as f64 / scale;
        path[i].weight = zero * path[i].weight * (depth - i) as f64 / scale;
    }
}

fn unwind(path: &mut [PathElement], depth: usize, index: usize) {
    let one = path[index].one_fraction;
    let zero = path[index].zero_fraction;
    let scale = (depth + 1) as f64;
    let mut next_one_portion = path[depth].weight;
    for i in (0..depth).rev() {
        if one != 0.0 {
            let kept = path[i].weight;
            path[i].weight = next_one_portion * scale / ((i + 1) as f64 * one);
            next_one_portion = kept - path[i].weight * zero * (depth - i) as f64 / scale;
        } else {
            path[i].weight = path[i].weight * scale / (zero * (depth - i) as f64);
        }
    }
    for i in index..depth {
        path[i].feature = path[i + 1].feature;
        path[i].zero_fraction = path[i + 1].zero_fraction;
        path[i].one_fraction = path[i + 1].one_fraction;
    }
}

/// The total weight of the path with element `index` unwound.
fn unwound_sum(path: &[PathElement], depth: usize, index: usize) -> f64 {
    let one = path[index].one_fraction;
    let zero = path[index].zero_fraction;
    let scale = (depth + 1) as f64;
    let mut next_one_portion = path[depth].weight;
    let mut total = 0.0;
    for i in (0..depth).rev() {
        if one != 0.0 {
            let part = next_one_portion * scale / ((i + 1) as f64 * one);
            total += part;
            next_one_portion = path[i].weight - part * zero * (depth - i) as f64 / scale;
        } else if zero != 0.0 {
            total += path[i].weight / zero / ((depth - i) as f64 / scale);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic generator for random trees and rows.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn unit(&mut self) -> f64 {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    /// A random tree over `features` features whose leaves split `cover`
    /// rows (features repeat along paths, which the unwinding must handle).
    fn random_tree(rng: &mut Rng, features: u32, depth: usize) -> Vec<ShapNode> {
        fn grow(
            rng: &mut Rng,
            nodes: &mut Vec<ShapNode>,
            features: u32,
            depth: usize,
            cover: f64,
        ) -> u32 {
            let at = nodes.len();
            if depth == 0 || cover < 2.0 || rng.next().is_multiple_of(5) {
                nodes.push(ShapNode::Leaf {
                    value: rng.unit() * 2.0 - 1.0,
                    cover,
                });
                return at as u32;
            }
            nodes.push(ShapNode::Leaf { value: 0.0, cover });
            let left_cover = (cover * (0.1 + 0.8 * rng.unit())).round().max(1.0);
            let feature = (rng.next() % u64::from(features)) as u32;
            let threshold = (rng.unit() as f32) * 2.0 - 1.0;
            let missing_left = rng.next().is_multiple_of(2);
            let left = grow(rng, nodes, features, depth - 1, left_cover);
            let right = grow(rng, nodes, features, depth - 1, cover - left_cover);
            nodes[at] = ShapNode::Split {
                feature,
                threshold,
                missing_left,
                left,
                right,
                cover,
            };
            at as u32
        }
        let mut nodes = Vec::new();
        grow(rng, &mut nodes, features, depth, 1_000.0);
        nodes
    }

    /// The tree's expected value given the features in `known` (a bit
    /// set) are the row's: the others follow both children by cover.
    fn conditional(tree: &[ShapNode], node: usize, row: &[f32], known: u32) -> f64 {
        match tree[node] {
            ShapNode::Leaf { value, .. } => value,
            ShapNode::Split {
                feature,
                threshold,
                missing_left,
                left,
                right,
                cover,
            } => {
                let (l, r) = (left as usize, right as usize);
                if known & (1 << feature) != 0 {
                    let left = goes_left(row[feature as usize], threshold, missing_left);
                    conditional(tree, if left { l } else { r }, row, known)
                } else {
                    (tree[l].cover() * conditional(tree, l, row, known)
                        + tree[r].cover() * conditional(tree, r, row, known))
                        / cover
                }
            }
        }
    }

    /// Shapley values from their definition, over every coalition.
    fn brute_force(trees: &[Vec<ShapNode>], row: &[f32], features: usize) -> Vec<f64> {
        let value =
            |known: u32| -> f64 { trees.iter().map(|t| conditional(t, 0, row, known)).sum() };
        let factorial = |n: usize| -> f64 { (1..=n).map(|k| k as f64).product() };
        let m = features;
        (0..m)
            .map(|i| {
                let mut phi = 0.0;
                for set in 0u32..(1 << m) {
                    if set & (1 << i) != 0 {
                        continue;
                    }
                    let size = set.count_ones() as usize;
                    let weight = factorial(size) * factorial(m - size - 1) / factorial(m);
                    phi += weight * (value(set | (1 << i)) - value(set));
                }
                phi
            })
            .collect()
    }

    fn raw_score(trees: &[Vec<ShapNode>], base: f64, row: &[f32]) -> f64 {
        base + trees
            .iter()
            .map(|t| conditional(t, 0, row, u32::MAX))
            .sum::<f64>()
    }

    #[test]
    fn contributions_are_the_shapley_values_and_add_up_to_the_score() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut attributed = 0;
        for case in 0..200 {
            let features = 1 + (rng.next() % 6) as usize;
            let trees: Vec<_> = (0..1 + rng.next() % 4)
                .map(|_| {
                    let depth = 1 + (rng.next() % 6) as usize;
                    random_tree(&mut rng, features as u32, depth)
                })
                .collect();
            let base = rng.unit() - 0.5;
            let explainer = TreeExplainer::new(trees.clone(), base, features).unwrap();
            let row: Vec<f32> = (0..features)
                .map(|_| {
                    if rng.next().is_multiple_of(7) {
                        f32::NAN
                    } else {
                        (rng.unit() as f32) * 2.4 - 1.2
                    }
                })
                .collect();
            let explanation = explainer.explain(&row);
            let exact = brute_force(&trees, &row, features);
            for (i, (got, want)) in explanation.contributions.iter().zip(&exact).enumerate() {
                assert!(
                    (got - want).abs() < 1e-9,
                    "case {case} feature {i}: {got} vs {want}"
                );
            }
            let total = explanation.base_value + explanation.contributions.iter().sum::<f64>();
            let score = raw_score(&trees, base, &row);
            assert!(
                (total - score).abs() < 1e-9,
                "case {case}: {total} vs {score}"
            );
            let empty = trees
                .iter()
                .map(|t| conditional(t, 0, &row, 0))
                .sum::<f64>();
            assert!((explanation.base_value - base - empty).abs() < 1e-9);
            attributed += usize::from(exact.iter().filter(|v| v.abs() > 1e-6).count() > 1);
        }
        // Most cases attribute the score to several features.
        assert!(attributed > 100, "{attributed}");
    }

    #[test]
    fn a_tree_that_cannot_be_explained_is_refused_with_its_place() {
        let leaf = ShapNode::Leaf {
            value: 1.0,
            cover: 5.0,
        };
        let split = |feature, left, cover| ShapNode::Split {
            feature,
            threshold: 0.5,
            missing_left: true,
            left,
            right: 2,
            cover,
        };
        let refused = |tree: Vec<ShapNode>| TreeExplainer::new(vec![tree], 0.0, 3).unwrap_err();
        assert_eq!(
            refused(vec![split(3, 1, 10.0), leaf, leaf]),
            ShapError::Node {
                tree: 0,
                node: 0,
                reason: "feature 3 is past the row's 3".into()
            }
        );
        assert!(matches!(
            refused(vec![split(0, 0, 10.0), leaf, leaf]),
            ShapError::Node { node: 0, ref reason, .. } if reason.contains("forward")
        ));
        assert!(matches!(
            refused(vec![split(0, 1, 0.0), leaf, leaf]),
            ShapError::Node { ref reason, .. } if reason.contains("no cover")
        ));
        assert_eq!(
            TreeExplainer::new(vec![vec![]], 0.0, 3).unwrap_err(),
            ShapError::Empty { tree: 0 }
        );
        let nan = ShapNode::Leaf {
            value: f64::NAN,
            cover: 1.0,
        };
        assert!(TreeExplainer::new(vec![vec![split(0, 1, 2.0), leaf, nan]], 0.0, 3).is_err());
    }
}
