//! Bounded-load rendezvous assignment of partitions to nodes.
//!
//! Every (partition, node) pair has a weight: the [`rendezvous_score`] of the
//! partition's hash and the node name's key, ties broken by name order (so
//! the comparison of two nodes never depends on which other nodes are in the
//! view). Plain rendezvous gives each partition to its highest-weight node;
//! with `P` partitions on `n` nodes the most loaded node then carries about
//! `1 + 2.5 / sqrt(P/n)` times the mean.
//!
//! To cap that, every node accepts at most `cap = ceil(P × (100 + b) /
//! (100 × n))` partitions, and the assignment is the *stable* one (the
//! partition-proposing deferred acceptance of Gale and Shapley): each
//! partition proposes to its nodes from the highest weight down; a full node
//! keeps the proposals of highest weight and rejects the weakest. Because
//! both sides rank by the same weights the stable assignment is unique, so
//! it does not depend on the order partitions are processed in, and when the
//! load bound does not bind it is exactly plain rendezvous. A joining node
//! takes the partitions that weigh it highest (up to its cap); a leaving
//! node's partitions go to their next choices.
//!
//! Replicas of a partition are the highest-weight nodes other than its
//! primary (without a load bound).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::hash::{name_key, partition_hash, rendezvous_score};
use crate::view::{NodeIndex, View};

/// Extra candidates kept per partition beyond its `copies`, so that most
/// rejections find the next choice without a scan of every node.
const SPARE_CANDIDATES: usize = 3;

/// A (partition, node) weight: score in the high 64 bits, the node's name
/// rank in the low 32. Distinct nodes never have equal weights.
type Weight = u128;

fn weight(score: u64, name_rank: u32) -> Weight {
    (u128::from(score) << 32) | u128::from(name_rank)
}

fn rank_of(w: Weight) -> u32 {
    (w & 0xffff_ffff) as u32
}

/// Nodes of a view as the assignment sees them.
struct Nodes {
    keys: Vec<u64>,
    name_ranks: Vec<u32>,
    /// Name rank -> node index.
    by_rank: Vec<u32>,
}

impl Nodes {
    fn new(view: &View) -> Nodes {
        let keys: Vec<u64> = view.nodes().iter().map(|n| name_key(&n.name)).collect();
        let name_ranks = view.name_ranks();
        let mut by_rank = vec![0u32; name_ranks.len()];
        for (index, &rank) in name_ranks.iter().enumerate() {
            if let Some(slot) = by_rank.get_mut(rank as usize) {
                *slot = u32::try_from(index).unwrap_or(u32::MAX);
            }
        }
        Nodes {
            keys,
            name_ranks,
            by_rank,
        }
    }

    fn node_of(&self, w: Weight) -> u32 {
        self.by_rank.get(rank_of(w) as usize).copied().unwrap_or(0)
    }

    /// The highest weight of partition hash `ph` strictly below `bound`.
    fn best_below(&self, ph: u64, bound: Weight) -> Option<Weight> {
        let mut best: Option<Weight> = None;
        for (&key, &rank) in self.keys.iter().zip(&self.name_ranks) {
            let w = weight(rendezvous_score(ph, key), rank);
            if w < bound && best.is_none_or(|b| w > b) {
                best = Some(w);
            }
        }
        best
    }
}

/// Assigns `partitions` partitions to the nodes of a non-empty `view`.
/// Returns `partitions × copies` owner entries, row by row, primary first;
/// `copies` must be in `1..=view.len()`.
pub(crate) fn assign(
    view: &View,
    partitions: u32,
    copies: usize,
    load_bound_percent: u32,
) -> Vec<NodeIndex> {
    let nodes = Nodes::new(view);
    let n = nodes.keys.len();
    let p_count = partitions as usize;
    if n == 0 || p_count == 0 || copies == 0 {
        return Vec::new();
    }
    let depth = (copies + SPARE_CANDIDATES).min(n);

    // 1. The `depth` best candidates of every partition, best first.
    let mut top: Vec<Weight> = Vec::with_capacity(p_count * depth);
    let mut best: Vec<Weight> = Vec::with_capacity(depth + 1);
    for p in 0..partitions {
        let ph = partition_hash(p);
        best.clear();
        for (&key, &rank) in nodes.keys.iter().zip(&nodes.name_ranks) {
            let w = weight(rendezvous_score(ph, key), rank);
            if best.len() == depth {
                match best.last() {
                    Some(&last) if w > last => {
                        best.pop();
                    }
                    _ => continue,
                }
            }
            let at = best.partition_point(|&b| b > w);
            best.insert(at, w);
        }
        top.extend_from_slice(&best);
    }
    let row = |p: usize| top.get(p * depth..(p + 1) * depth).unwrap_or(&[]);

    // 2. Stable assignment under the load bound (deferred acceptance).
    let cap = capacity(partitions, n, load_bound_percent);
    let mut held: Vec<BinaryHeap<Reverse<(Weight, u32)>>> = vec![BinaryHeap::new(); n];
    // The weight of the node each partition last proposed to.
    let mut current: Vec<Weight> = Vec::with_capacity(p_count);
    for p in 0..p_count {
        let w = row(p).first().copied().unwrap_or(0);
        current.push(w);
        if let Some(heap) = held.get_mut(nodes.node_of(w) as usize) {
            heap.push(Reverse((w, p as u32)));
        }
    }
    let mut rejected: Vec<u32> = Vec::new();
    for heap in &mut held {
        while heap.len() > cap {
            if let Some(Reverse((_, p))) = heap.pop() {
                rejected.push(p);
            }
        }
    }
    while let Some(p) = rejected.pop() {
        let pi = p as usize;
        let Some(&bound) = current.get(pi) else {
            continue;
        };
        let next = row(pi)
            .iter()
            .copied()
            .find(|&w| w < bound)
            .or_else(|| nodes.best_below(partition_hash(p), bound));
        let Some(w) = next else {
            // Unreachable while n × cap >= partitions; keep the partition on
            // its first choice rather than leave it without an owner.
            let first = row(pi).first().copied().unwrap_or(0);
            if let Some(heap) = held.get_mut(nodes.node_of(first) as usize) {
                heap.push(Reverse((first, p)));
            }
            if let Some(c) = current.get_mut(pi) {
                *c = first;
            }
            continue;
        };
        if let Some(c) = current.get_mut(pi) {
            *c = w;
        }
        let Some(heap) = held.get_mut(nodes.node_of(w) as usize) else {
            continue;
        };
        if heap.len() < cap {
            heap.push(Reverse((w, p)));
        } else if heap
            .peek()
            .is_some_and(|Reverse(weakest)| *weakest < (w, p))
        {
            if let Some(Reverse((_, evicted))) = heap.pop() {
                rejected.push(evicted);
            }
            heap.push(Reverse((w, p)));
        } else {
            // Rejected here: try the next choice.
            rejected.push(p);
        }
    }

    // 3. Rows: the primary, then the best other candidates.
    let mut primary = vec![0u32; p_count];
    for (node, heap) in held.iter().enumerate() {
        for Reverse((_, p)) in heap.iter() {
            if let Some(slot) = primary.get_mut(*p as usize) {
                *slot = node as u32;
            }
        }
    }
    let mut rows: Vec<NodeIndex> = Vec::with_capacity(p_count * copies);
    for (p, &first) in primary.iter().enumerate() {
        rows.push(NodeIndex(first));
        let replicas = row(p)
            .iter()
            .map(|&w| nodes.node_of(w))
            .filter(|&node| node != first)
            .take(copies - 1);
        rows.extend(replicas.map(NodeIndex));
    }
    rows
}

/// Most partitions one node may be the primary of.
pub(crate) fn capacity(partitions: u32, nodes: usize, load_bound_percent: u32) -> usize {
    let num = u128::from(partitions) * u128::from(100 + u64::from(load_bound_percent));
    let den = 100u128 * nodes.max(1) as u128;
    usize::try_from(num.div_ceil(den))
        .unwrap_or(usize::MAX)
        .max(1)
}
