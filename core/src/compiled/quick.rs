//! QuickScorer for batches: Lucchese et al., "QuickScorer: a Fast Algorithm
//! to Rank Documents with Additive Ensembles of Regression Trees" (SIGIR
//! 2015), with rows side by side as in its vectorised form (V-QuickScorer).
//!
//! Why not walk: a walk takes a tree's depth in steps of about ten
//! instructions each, and no interleaving removes the instructions. Here a
//! tree's leaves are numbered left to right, and a row's leaf is the leftmost
//! one that none of the splits the row goes right at rules out (a split rules
//! out its left subtree). So each split carries a bit mask of the leaves it
//! keeps, a row's leaf set starts full, every split the row goes right at
//! clears its bits, and the lowest bit left is the leaf. A value goes right
//! (`x > threshold`) at a prefix of its feature's splits sorted by threshold,
//! so there is no walk and no branch per split: a split is one comparison
//! for [`LANES`] rows at once and a masked AND of their leaf sets.
//!
//! The trees are taken in the walk's order and their leaves added in it, so
//! a row scores to the same bits here as in the walk.

use std::fmt::Debug;
use std::ops::{BitAnd, Index};

use super::{LEAF, MISSING_LEFT, Node};
use crate::features::FEATURE_COUNT;

/// Rows scored side by side.
pub(super) const LANES: usize = 16;

/// A tree with more leaves than bits in a mask is left to the walk.
const MAX_LEAVES: usize = 64;

const SLOTS: usize = FEATURE_COUNT + 1;

/// A tree's leaf set: a bit per leaf. Trees of at most 32 leaves (the
/// demo's, LightGBM's default 31) take a `u32`, so one vector register
/// holds a tree's sets for [`LANES`] rows; deeper ones a `u64`.
pub(super) trait Mask: Copy + PartialEq + Debug + BitAnd<Output = Self> {
    const ALL: Self;
    /// Leaves a tree may have.
    const BITS: usize;
    /// Trees scored together: their sets for [`LANES`] rows (8 KiB) stay in
    /// L1 while the block's splits stream past.
    const BLOCK: usize;
    /// A tree's leaves, padded to [`Mask::BITS`].
    type Leaves: Index<usize, Output = f32> + Copy + PartialEq + Debug;
    fn leaves(values: &[f32]) -> Self::Leaves;
    fn of(bits: u64) -> Self;
    fn lowest(self) -> usize;
    /// Adds each set's leaf to `sums` with AVX-512 where this width has a
    /// form for it (false: the caller adds them). Call only on a CPU with
    /// the features `Isa::Avx512` checks.
    #[inline(always)]
    fn add_leaves_avx512(
        _sets: &[[Self; LANES]],
        _leaves: &[Self::Leaves],
        _sums: &mut [f32; LANES],
    ) -> bool {
        false
    }
}

impl Mask for u32 {
    const ALL: Self = u32::MAX;
    const BITS: usize = 32;
    const BLOCK: usize = 128;
    type Leaves = [f32; 32];
    fn leaves(values: &[f32]) -> [f32; 32] {
        padded(values)
    }
    fn of(bits: u64) -> Self {
        bits as u32
    }
    #[inline(always)]
    fn lowest(self) -> usize {
        self.trailing_zeros() as usize
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn add_leaves_avx512(
        sets: &[[u32; LANES]],
        leaves: &[[f32; 32]],
        sums: &mut [f32; LANES],
    ) -> bool {
        // SAFETY: the caller runs on a CPU with AVX-512 F and CD.
        #[allow(unsafe_code)]
        unsafe {
            add_narrow_leaves_avx512(sets, leaves, sums);
        }
        true
    }
}

/// A tree's 32 leaves fit two registers, so a row's leaf is one permute
/// (a gather was a quarter of a batch's time); the lowest bit is found
/// from its leading zeros.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512cd")]
#[allow(unsafe_code)]
fn add_narrow_leaves_avx512(sets: &[[u32; LANES]], leaves: &[[f32; 32]], sums: &mut [f32; LANES]) {
    use std::arch::x86_64::{
        _mm512_add_ps, _mm512_and_si512, _mm512_loadu_ps, _mm512_loadu_si512, _mm512_lzcnt_epi32,
        _mm512_permutex2var_ps, _mm512_set1_epi32, _mm512_setzero_si512, _mm512_storeu_ps,
        _mm512_sub_epi32,
    };
    // SAFETY: every load and store is of 16 lanes inside an array of 16
    // (a set, the sums) or 32 (a tree's leaves, at 0 and 16).
    unsafe {
        let mut acc = _mm512_loadu_ps(sums.as_ptr());
        let zero = _mm512_setzero_si512();
        let top = _mm512_set1_epi32(31);
        for (set, leaves) in sets.iter().zip(leaves) {
            let set = _mm512_loadu_si512(set.as_ptr().cast());
            let lowest = _mm512_and_si512(set, _mm512_sub_epi32(zero, set));
            let index = _mm512_sub_epi32(top, _mm512_lzcnt_epi32(lowest));
            let low = _mm512_loadu_ps(leaves.as_ptr());
            let high = _mm512_loadu_ps(leaves.as_ptr().add(16));
            acc = _mm512_add_ps(acc, _mm512_permutex2var_ps(low, index, high));
        }
        _mm512_storeu_ps(sums.as_mut_ptr(), acc);
    }
}

impl Mask for u64 {
    const ALL: Self = u64::MAX;
    const BITS: usize = 64;
    const BLOCK: usize = 64;
    type Leaves = [f32; 64];
    fn leaves(values: &[f32]) -> [f32; 64] {
        padded(values)
    }
    fn of(bits: u64) -> Self {
        bits
    }
    #[inline(always)]
    fn lowest(self) -> usize {
        self.trailing_zeros() as usize
    }
}

/// A tree's leaves, then zeros up to `N` (at most `N` leaves: `Quick::new`
/// numbers no more than the mask has bits).
fn padded<const N: usize>(values: &[f32]) -> [f32; N] {
    let mut padded = [0.0; N];
    padded[..values.len()].copy_from_slice(values);
    padded
}

/// Room for every index a `u8` can hold, so a split's tree needs no bounds check.
const SET_ROWS: usize = 256;

/// A block's leaf sets for a chunk of rows, each tree's on its own cache
/// line(s) (a set split over two lines made every AND two loads).
#[repr(C, align(64))]
struct LeafSets<M>([[M; LANES]; SET_ROWS]);

/// The instruction sets the batch loop is compiled for; the best the CPU
/// has is picked once.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Baseline,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512cd")
            {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("bmi1")
            {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    /// Every form this CPU can run, for tests that compare them.
    #[cfg(test)]
    fn available() -> Vec<Self> {
        let mut all = vec![Isa::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                all.push(Isa::Avx2);
            }
            if Isa::detect() == Isa::Avx512 {
                all.push(Isa::Avx512);
            }
        }
        all
    }
}

/// The ensemble as QuickScorer's tables: trees in blocks of at most
/// [`Mask::BLOCK`] (consecutive in the walk's order), each block's splits
/// grouped by feature and sorted by threshold.
#[derive(Debug, Clone, PartialEq)]
struct Tables<M: Mask> {
    /// Block `b` holds the trees at walk positions `starts[b]..starts[b + 1]`.
    starts: Vec<u32>,
    /// Block `b`'s splits on feature `f`:
    /// `offsets[b * SLOTS + f]..offsets[b * SLOTS + f + 1]`.
    offsets: Vec<u32>,
    thresholds: Vec<f32>,
    /// The split's tree, as its place in its block.
    trees: Vec<u8>,
    /// The leaves a row keeps when it goes right at the split.
    masks: Vec<M>,
    /// Where NaN goes right at the split.
    nan_right: Vec<bool>,
    /// The leaves of the tree at each walk position, left to right.
    leaves: Vec<M::Leaves>,
}

#[derive(Debug, Clone, PartialEq)]
enum Form {
    Narrow(Tables<u32>),
    Wide(Tables<u64>),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct Quick {
    form: Form,
    isa: Isa,
}

/// A tree's leaves left to right, and each split (a node, once per path to
/// it) with the range of those leaves its left subtree holds.
struct Numbered {
    leaves: Vec<f32>,
    splits: Vec<(u32, usize, usize)>,
}

/// One split as it is placed in its block.
struct Split<M> {
    feature: u32,
    threshold: f32,
    nan_right: bool,
    tree: u8,
    mask: M,
}

impl Quick {
    /// The tables for `order`'s trees, or `None` when a tree has more than
    /// [`MAX_LEAVES`] leaves (the walk then scores batches too).
    pub(super) fn new(
        nodes: &[Node],
        roots: &[u32],
        leaf_values: &[f32],
        order: &[u32],
    ) -> Option<Self> {
        let mut numbered = Vec::with_capacity(order.len());
        for &tree in order {
            let root = roots[tree as usize];
            let end = roots
                .get(tree as usize + 1)
                .copied()
                .unwrap_or(nodes.len() as u32);
            // A tree of at most 64 leaves has at most 127 nodes; more
            // (nodes shared by several parents) is left to the walk, which
            // also bounds the recursion below.
            if (end - root) as usize >= 2 * MAX_LEAVES {
                return None;
            }
            let mut tree = Numbered {
                leaves: Vec::new(),
                splits: Vec::new(),
            };
            number_leaves(nodes, leaf_values, root, &mut tree)?;
            numbered.push(tree);
        }
        let widest = numbered.iter().map(|t| t.leaves.len()).max().unwrap_or(0);
        let form = if widest <= u32::BITS as usize {
            Form::Narrow(Tables::new(nodes, &numbered))
        } else {
            Form::Wide(Tables::new(nodes, &numbered))
        };
        Some(Quick {
            form,
            isa: Isa::detect(),
        })
    }

    /// Adds every tree's leaf to `sums` for each full [`LANES`] rows of
    /// `rows` (the sums of a trailing partial chunk are left as they are).
    pub(super) fn add_leaves(&self, rows: &[[f32; FEATURE_COUNT]], sums: &mut [f32]) {
        match &self.form {
            Form::Narrow(tables) => tables.add_leaves(self.isa, rows, sums),
            Form::Wide(tables) => tables.add_leaves(self.isa, rows, sums),
        }
    }

    /// The same leaves with another form (tests).
    #[cfg(test)]
    fn add_leaves_as(&self, isa: Isa, rows: &[[f32; FEATURE_COUNT]], sums: &mut [f32]) {
        Quick {
            isa,
            form: self.form.clone(),
        }
        .add_leaves(rows, sums);
    }
}

impl<M: Mask> Tables<M> {
    fn new(nodes: &[Node], numbered: &[Numbered]) -> Self {
        let mut tables = Tables {
            starts: vec![0],
            offsets: Vec::new(),
            thresholds: Vec::new(),
            trees: Vec::new(),
            masks: Vec::new(),
            nan_right: Vec::new(),
            leaves: Vec::with_capacity(numbered.len()),
        };
        for block in numbered.chunks(M::BLOCK) {
            let mut splits = Vec::new();
            for (k, tree) in block.iter().enumerate() {
                tables.leaves.push(M::leaves(&tree.leaves));
                for &(node, from, to) in &tree.splits {
                    let n = nodes[node as usize];
                    // The right subtree keeps at least one of the tree's
                    // at most 64 leaves, so the shift stays below 64.
                    let cleared = ((1u64 << (to - from)) - 1) << from;
                    splits.push(Split {
                        feature: n.feature & !MISSING_LEFT,
                        threshold: n.threshold,
                        nan_right: n.feature & MISSING_LEFT == 0,
                        tree: k as u8,
                        mask: M::of(!cleared),
                    });
                }
            }
            splits.sort_by(|a, b| {
                a.feature
                    .cmp(&b.feature)
                    .then(a.threshold.total_cmp(&b.threshold))
            });
            let mut at = 0;
            for f in 0..SLOTS {
                tables.offsets.push((tables.thresholds.len() + at) as u32);
                while at < splits.len() && (splits[at].feature as usize) == f {
                    at += 1;
                }
            }
            for s in splits {
                tables.thresholds.push(s.threshold);
                tables.trees.push(s.tree);
                tables.masks.push(s.mask);
                tables.nan_right.push(s.nan_right);
            }
            tables.starts.push(tables.leaves.len() as u32);
        }
        tables
    }

    fn add_leaves(&self, isa: Isa, rows: &[[f32; FEATURE_COUNT]], sums: &mut [f32]) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::detect` found these features on this CPU.
            #[allow(unsafe_code)]
            Isa::Avx512 => unsafe { self.add_leaves_avx512(rows, sums) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            #[allow(unsafe_code)]
            Isa::Avx2 => unsafe { self.add_leaves_avx2(rows, sums) },
            Isa::Baseline => self.add_leaves_with::<false>(rows, sums),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512cd,bmi1,popcnt")]
    fn add_leaves_avx512(&self, rows: &[[f32; FEATURE_COUNT]], sums: &mut [f32]) {
        self.add_leaves_with::<true>(rows, sums);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,bmi1,popcnt")]
    fn add_leaves_avx2(&self, rows: &[[f32; FEATURE_COUNT]], sums: &mut [f32]) {
        self.add_leaves_with::<false>(rows, sums);
    }

    /// `AVX512`: called from the AVX-512 form only.
    #[inline(always)]
    fn add_leaves_with<const AVX512: bool>(&self, rows: &[[f32; FEATURE_COUNT]], sums: &mut [f32]) {
        let mut sets = LeafSets([[M::ALL; LANES]; SET_ROWS]);
        let sets = &mut sets.0;
        let chunks = rows.as_chunks::<LANES>().0;
        for (rows, sums) in chunks.iter().zip(sums.as_chunks_mut::<LANES>().0) {
            // Feature-major: one feature's values for the chunk's rows side by side.
            let mut xs = [[0f32; LANES]; FEATURE_COUNT];
            for (lane, row) in rows.iter().enumerate() {
                for (f, &v) in row.iter().enumerate() {
                    xs[f][lane] = v;
                }
            }
            // The splits any row goes right at are those below the largest
            // value (`max` passes NaN over; NaN is handled apart).
            let mut largest = [f32::NEG_INFINITY; FEATURE_COUNT];
            let mut nan = [false; FEATURE_COUNT];
            for f in 0..FEATURE_COUNT {
                for &v in &xs[f] {
                    largest[f] = largest[f].max(v);
                    nan[f] |= v.is_nan();
                }
            }
            for (b, window) in self.starts.windows(2).enumerate() {
                let (first, last) = (window[0] as usize, window[1] as usize);
                for set in &mut sets[..last - first] {
                    *set = [M::ALL; LANES];
                }
                let offsets = &self.offsets[b * SLOTS..(b + 1) * SLOTS];
                for f in 0..FEATURE_COUNT {
                    let (lo, hi) = (offsets[f] as usize, offsets[f + 1] as usize);
                    let thresholds = &self.thresholds[lo..hi];
                    let masks = &self.masks[lo..hi];
                    let trees = &self.trees[lo..hi];
                    let x = &xs[f];
                    // A count, not a binary search: no chain of dependent
                    // steps, and the comparisons are vectorised.
                    let below = thresholds
                        .iter()
                        .map(|&t| usize::from(t < largest[f]))
                        .sum::<usize>();
                    for ((&t, &mask), &tree) in thresholds[..below]
                        .iter()
                        .zip(&masks[..below])
                        .zip(&trees[..below])
                    {
                        let set = &mut sets[usize::from(tree)];
                        for (s, &v) in set.iter_mut().zip(x) {
                            *s = *s & if v > t { mask } else { M::ALL };
                        }
                    }
                    if nan[f] {
                        let nan_right = &self.nan_right[lo..hi];
                        for ((&mask, &tree), &right) in masks.iter().zip(trees).zip(nan_right) {
                            if right {
                                let set = &mut sets[usize::from(tree)];
                                for (s, &v) in set.iter_mut().zip(x) {
                                    *s = *s & if v.is_nan() { mask } else { M::ALL };
                                }
                            }
                        }
                    }
                }
                let (sets, leaves) = (&sets[..last - first], &self.leaves[first..last]);
                if AVX512 && M::add_leaves_avx512(sets, leaves, sums) {
                    continue;
                }
                for (set, leaves) in sets.iter().zip(leaves) {
                    for (sum, &s) in sums.iter_mut().zip(set) {
                        // The row's own leaf is never cleared, so the lowest
                        // bit is one of the tree's leaves.
                        *sum += leaves[s.lowest() & (M::BITS - 1)];
                    }
                }
            }
        }
    }
}

/// Numbers the leaves under `node` left to right into `tree`, and records
/// each split with the range of leaves its left subtree holds. `None` past
/// [`MAX_LEAVES`] leaves (a node reached by two paths counts twice, so this
/// also ends the numbering of a graph that shares nodes).
fn number_leaves(
    nodes: &[Node],
    leaf_values: &[f32],
    node: u32,
    tree: &mut Numbered,
) -> Option<()> {
    let n = nodes[node as usize];
    if n.feature == LEAF {
        if tree.leaves.len() == MAX_LEAVES {
            return None;
        }
        tree.leaves.push(leaf_values[n.left as usize]);
        return Some(());
    }
    let first = tree.leaves.len();
    number_leaves(nodes, leaf_values, n.left, tree)?;
    tree.splits.push((node, first, tree.leaves.len()));
    number_leaves(nodes, leaf_values, n.right, tree)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use prost::Message;

    use super::super::{CompiledEnsemble, check_rows};
    use super::*;
    use crate::bundle::BundleMetadata;
    use crate::onnx::ModelProto;

    #[test]
    fn every_instruction_set_scores_the_walks_bits() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/demo/model.onnx");
        let proto = ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
        let metadata = BundleMetadata::from_metadata_props(&proto.metadata_props).unwrap();
        let compiled = CompiledEnsemble::compile(&proto).unwrap();
        let quick = compiled.quick.as_ref().unwrap();
        assert!(matches!(quick.form, Form::Narrow(_)));
        let mut rows = check_rows(&metadata.golden_rows(), 16 * 40, 7);
        // Some NaN, in some chunks only, on both NaN sides.
        for i in (0..rows.len()).step_by(97).take(40) {
            rows[i] = f32::NAN;
        }
        let walked = compiled.raw_scores_walk(&rows);
        let chunks = rows.as_chunks::<FEATURE_COUNT>().0;
        for isa in Isa::available() {
            let mut sums = vec![compiled.base; chunks.len()];
            quick.add_leaves_as(isa, chunks, &mut sums);
            for (i, (q, w)) in sums.iter().zip(&walked).enumerate() {
                assert_eq!(
                    q.to_bits(),
                    w.to_bits(),
                    "{isa:?}, row {i}: {q} against the walk's {w}"
                );
            }
        }
    }

    #[test]
    fn a_tree_over_64_leaves_is_left_to_the_walk() {
        // A chain of 64 splits on feature 0 (split i at node 2 i, its left
        // leaf after it, its right the next split) has 65 leaves.
        let mut nodes = Vec::new();
        let mut leaf_values = Vec::new();
        for i in 0..64u32 {
            nodes.push(Node {
                feature: 0,
                threshold: i as f32,
                left: 2 * i + 1,
                right: 2 * i + 2,
            });
            leaf_values.push(i as f32);
            nodes.push(Node {
                feature: LEAF,
                threshold: 0.0,
                left: i,
                right: 0,
            });
        }
        nodes.push(Node {
            feature: LEAF,
            threshold: 0.0,
            left: 64,
            right: 0,
        });
        leaf_values.push(64.0);
        assert!(Quick::new(&nodes, &[0], &leaf_values, &[0]).is_none());
        // The first 63 splits (64 leaves) fit: cut the chain there.
        let mut short = nodes[..2 * 63].to_vec();
        short.push(Node {
            feature: LEAF,
            threshold: 0.0,
            left: 63,
            right: 0,
        });
        let quick = Quick::new(&short, &[0], &leaf_values, &[0]).unwrap();
        let mut row = [0f32; FEATURE_COUNT];
        let mut rows = Vec::new();
        for lane in 0..LANES {
            row[0] = lane as f32 * 4.0 + 0.5;
            rows.push(row);
        }
        assert!(matches!(quick.form, Form::Wide(_)));
        for isa in Isa::available() {
            let mut sums = vec![0f32; LANES];
            quick.add_leaves_as(isa, &rows, &mut sums);
            // x = 4 l + 0.5 goes right at splits 0..=4 l, left at 4 l + 1: leaf 4 l + 1.
            for (lane, sum) in sums.iter().enumerate() {
                assert_eq!(*sum, (4 * lane + 1) as f32, "{isa:?}, lane {lane}");
            }
        }
    }
}
