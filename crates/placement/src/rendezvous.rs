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
//! (100 × n))` partitions, and the assignment is the partition-optimal
//! *stable* one, computed by the partition-proposing deferred acceptance of
//! Gale and Shapley: each partition proposes to its nodes from the highest
//! weight down; a full node keeps the proposals of highest weight and rejects
//! the weakest, which then propose to their next choice. Deferred acceptance
//! reaches the same assignment whatever the order of proposals, and when the
//! bound does not bind it is exactly plain rendezvous. A joining node takes
//! the partitions that weigh it highest (up to its cap); a leaving node's
//! partitions go to their next choices. The bound costs extra moves only
//! where it binds: nodes at the cap shed their weakest partitions when the
//! cap drops by one, which is rare while `P/n` is large (see
//! `docs/placement.md`).
//!
//! Replicas of a partition are the highest-weight nodes other than its
//! primary (without a load bound).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::hash::{name_key, partition_hash, rendezvous_score, unmix32};
use crate::view::{NodeIndex, View};

/// A (partition, node) weight: the 32-bit score in the high half, the
/// node's name rank in the low half. Distinct nodes never have equal
/// weights; when scores tie (probability 2^-32 per pair) the name decides,
/// which still does not depend on the rest of the view.
type Weight = u64;

#[inline]
fn weight(score: u32, name_rank: u32) -> Weight {
    (u64::from(score) << 32) | u64::from(name_rank)
}

fn rank_of(w: Weight) -> u32 {
    (w & 0xffff_ffff) as u32
}

/// Nodes of a view as the assignment sees them.
struct Nodes {
    keys: Vec<u32>,
    name_ranks: Vec<u32>,
    /// Name rank -> node index.
    by_rank: Vec<u32>,
    /// (key, name rank), sorted by key.
    by_key: Vec<(u32, u32)>,
    /// Key -> name rank, for [`Nodes::weight_of_score`].
    key_index: KeyIndex,
    /// Whether all keys differ. Then, for a given partition, all scores
    /// differ too (`mix32` and adding the partition hash are bijections), so
    /// scores alone order the nodes, and the node that has a score can be
    /// recovered from it: `key = unmix32(score) - partition_hash`.
    distinct_keys: bool,
}

impl Nodes {
    fn new(view: &View) -> Nodes {
        let keys: Vec<u32> = view.nodes().iter().map(|n| name_key(&n.name)).collect();
        let name_ranks = view.name_ranks();
        let mut by_rank = vec![0u32; name_ranks.len()];
        for (index, &rank) in name_ranks.iter().enumerate() {
            if let Some(slot) = by_rank.get_mut(rank as usize) {
                *slot = u32::try_from(index).unwrap_or(u32::MAX);
            }
        }
        let mut by_key: Vec<(u32, u32)> = keys
            .iter()
            .copied()
            .zip(name_ranks.iter().copied())
            .collect();
        by_key.sort_unstable();
        let distinct_keys = by_key
            .windows(2)
            .all(|w| w.first().map(|x| x.0) != w.get(1).map(|x| x.0));
        let key_index = KeyIndex::new(&by_key);
        Nodes {
            keys,
            name_ranks,
            by_rank,
            by_key,
            key_index,
            distinct_keys,
        }
    }

    /// The weight of the node that has `score` on the partition of hash
    /// `ph`; only meaningful when keys are distinct.
    fn weight_of_score(&self, ph: u32, score: u32) -> Weight {
        let key = unmix32(score).wrapping_sub(ph);
        weight(score, self.key_index.get(key).unwrap_or(0))
    }

    fn node_of(&self, w: Weight) -> u32 {
        self.by_rank.get(rank_of(w) as usize).copied().unwrap_or(0)
    }

    /// The highest weight of partition hash `ph` strictly below `bound`.
    fn best_below(&self, ph: u32, bound: Weight) -> Option<Weight> {
        if self.distinct_keys {
            // Scores alone decide; a branch-free maximum vectorises. A result
            // of 0 is ambiguous (no score below the limit, or a score of 0).
            let limit = (bound >> 32) as u32;
            let best = self
                .keys
                .iter()
                .map(|&key| rendezvous_score(ph, key))
                .fold(0u32, |m, s| if s < limit { m.max(s) } else { m });
            let found = best > 0
                || self
                    .keys
                    .iter()
                    .any(|&key| rendezvous_score(ph, key) == 0 && limit > 0);
            return found.then(|| self.weight_of_score(ph, best));
        }
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

/// An open-addressing map from node key to name rank. Keys are already
/// uniform hashes, so their top bits pick the slot; the table is at most half
/// full, so a lookup takes one or two probes.
#[derive(Clone, Debug)]
struct KeyIndex {
    /// (key, rank + 1); rank + 1 = 0 marks an empty slot.
    slots: Vec<(u32, u32)>,
    shift: u32,
}

impl KeyIndex {
    fn new(entries: &[(u32, u32)]) -> KeyIndex {
        let size = (entries.len() * 2).next_power_of_two().max(2);
        let mut index = KeyIndex {
            slots: vec![(0, 0); size],
            shift: 32 - size.trailing_zeros(),
        };
        let mask = size - 1;
        for &(key, rank) in entries {
            let mut i = index.home(key);
            while let Some(slot) = index.slots.get_mut(i) {
                if slot.1 == 0 {
                    *slot = (key, rank.saturating_add(1));
                    break;
                }
                i = (i + 1) & mask;
            }
        }
        index
    }

    fn home(&self, key: u32) -> usize {
        // shift <= 31 (size >= 2); checked_shr keeps this total anyway.
        key.checked_shr(self.shift).unwrap_or(0) as usize
    }

    /// The rank stored for `key` (the first, if a key was inserted twice).
    fn get(&self, key: u32) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        for _ in 0..self.slots.len() {
            let &(k, r) = self.slots.get(i)?;
            if r == 0 {
                return None;
            }
            if k == key {
                return Some(r - 1);
            }
            i = (i + 1) & mask;
        }
        None
    }
}

/// The result of an assignment: the owner rows, and what a later
/// [`reassign`] needs to start from.
#[derive(Clone, Debug, Default)]
pub(crate) struct Assignment {
    /// `partitions × width` owner entries, row by row, primary first.
    pub(crate) rows: Vec<NodeIndex>,
    /// The scores of every partition's `width` best nodes by weight (before
    /// the load bound), best first; empty when two names of the view share a
    /// key (the scores then do not identify the nodes).
    ranking: Vec<u32>,
}

/// Assigns `partitions` partitions to the nodes of a non-empty `view`, with
/// `copies` (in `1..=view.len()`) owners each.
pub(crate) fn assign(
    view: &View,
    partitions: u32,
    copies: usize,
    load_bound_percent: u32,
) -> Assignment {
    let nodes = Nodes::new(view);
    let depth = copies.min(nodes.keys.len());
    if depth == 0 || partitions == 0 {
        return Assignment::default();
    }
    let top = if depth == 1 && nodes.distinct_keys {
        best_candidates(&nodes, partitions)
    } else {
        ranked_candidates(&nodes, partitions, depth)
    };
    finish(&nodes, top, depth, partitions, load_bound_percent)
}

/// Like [`assign`] for `view`, with the same result, starting from the
/// assignment `previous` made for `previous_view` with the same partition
/// count and width.
///
/// The ranking of a partition over the new nodes is its previous ranking,
/// minus the nodes that left, plus the nodes that joined. While none of its
/// `width` best nodes left, its new best are the best of those and the
/// joiners (the nodes that stayed all rank below them), so only partitions
/// that lost one of their best nodes are ranked again over every node. A
/// change of a few nodes then costs O(partitions × changes) instead of
/// O(partitions × n). Nodes are matched by key (the score depends on
/// nothing else), and the shortcut is only taken when the keys of both views
/// are distinct, so that a score identifies its node.
pub(crate) fn reassign(
    previous: &Assignment,
    previous_view: &View,
    view: &View,
    partitions: u32,
    copies: usize,
    load_bound_percent: u32,
) -> Assignment {
    let nodes = Nodes::new(view);
    let depth = copies.min(nodes.keys.len());
    let previous_depth = copies.min(previous_view.len());
    if depth == 0
        || depth != previous_depth
        || !nodes.distinct_keys
        || previous.ranking.len() != partitions as usize * depth
    {
        return assign(view, partitions, copies, load_bound_percent);
    }
    let mut old_keys: Vec<u32> = previous_view
        .nodes()
        .iter()
        .map(|n| name_key(&n.name))
        .collect();
    old_keys.sort_unstable();
    let new_keys: Vec<u32> = nodes.by_key.iter().map(|&(k, _)| k).collect();
    let left: Vec<u32> = old_keys
        .iter()
        .copied()
        .filter(|k| new_keys.binary_search(k).is_err())
        .collect();
    let joined: Vec<u32> = new_keys
        .iter()
        .copied()
        .filter(|k| old_keys.binary_search(k).is_err())
        .collect();

    let mut top: Vec<Weight> = Vec::with_capacity(previous.ranking.len());
    let mut best: Vec<Weight> = Vec::with_capacity(depth + 1);
    for (p, scores) in (0..partitions).zip(previous.ranking.chunks_exact(depth)) {
        let ph = partition_hash(p);
        let lost_one = scores
            .iter()
            .any(|&s| left.binary_search(&unmix32(s).wrapping_sub(ph)).is_ok());
        if depth == 1 {
            // Keys are distinct, so scores alone order the nodes.
            let score = if lost_one {
                nodes
                    .keys
                    .iter()
                    .fold(0, |m, &key| m.max(rendezvous_score(ph, key)))
            } else {
                joined
                    .iter()
                    .fold(scores.first().copied().unwrap_or(0), |m, &key| {
                        m.max(rendezvous_score(ph, key))
                    })
            };
            top.push(nodes.weight_of_score(ph, score));
            continue;
        }
        best.clear();
        if lost_one {
            rank_partition(&nodes, ph, depth, &mut best);
        } else {
            best.extend(scores.iter().map(|&s| nodes.weight_of_score(ph, s)));
            for &key in &joined {
                let score = rendezvous_score(ph, key);
                push_ranked(&mut best, depth, nodes.weight_of_score(ph, score));
            }
        }
        top.extend_from_slice(&best);
    }
    finish(&nodes, top, depth, partitions, load_bound_percent)
}

/// From every partition's `depth` best weights: the stable primaries under
/// the load bound, then the rows.
fn finish(
    nodes: &Nodes,
    top: Vec<Weight>,
    depth: usize,
    partitions: u32,
    load_bound_percent: u32,
) -> Assignment {
    let n = nodes.keys.len();
    let cap = capacity(partitions, n, load_bound_percent);
    let primary = stable_primaries(nodes, &top, depth, cap);
    let mut rows: Vec<NodeIndex> = Vec::with_capacity(top.len());
    for (&first, candidates) in primary.iter().zip(top.chunks_exact(depth)) {
        rows.push(NodeIndex(first));
        let replicas = candidates
            .iter()
            .map(|&w| nodes.node_of(w))
            .filter(|&node| node != first)
            .take(depth - 1);
        rows.extend(replicas.map(NodeIndex));
    }
    let ranking = if nodes.distinct_keys {
        top.iter().map(|&w| (w >> 32) as u32).collect()
    } else {
        Vec::new()
    };
    Assignment { rows, ranking }
}

/// The primary node of every partition: the partition-optimal stable
/// assignment with at most `cap` partitions per node, found by deferred
/// acceptance. `top` holds each partition's `depth` best weights, best first.
fn stable_primaries(nodes: &Nodes, top: &[Weight], depth: usize, cap: usize) -> Vec<u32> {
    let n = nodes.keys.len();
    let p_count = top.len() / depth.max(1);
    let row = |p: usize| top.get(p * depth..(p + 1) * depth).unwrap_or(&[]);
    let first = |p: usize| row(p).first().copied().unwrap_or(0);

    // Every partition at its first choice; done if no node is over the cap
    // (then the bound does not bind and this is plain rendezvous).
    let mut load = vec![0usize; n];
    for p in 0..p_count {
        if let Some(l) = load.get_mut(nodes.node_of(first(p)) as usize) {
            *l += 1;
        }
    }
    if load.iter().all(|&l| l <= cap) {
        return (0..p_count).map(|p| nodes.node_of(first(p))).collect();
    }

    // Deferred acceptance: each node holds its best proposals in a min-heap
    // and rejects the weakest beyond its cap; a rejected partition proposes
    // to its next choice.
    let mut held: Vec<BinaryHeap<Reverse<(Weight, u32)>>> = load
        .iter()
        .map(|&l| BinaryHeap::with_capacity(l.min(cap) + 1))
        .collect();
    // The weight of the node each partition last proposed to.
    let mut current: Vec<Weight> = Vec::with_capacity(p_count);
    for p in 0..p_count {
        let w = first(p);
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
        // None is unreachable while n × cap >= partitions; keep the
        // partition on its first choice rather than leave it without owner.
        let w = next.unwrap_or_else(|| first(pi));
        if let Some(c) = current.get_mut(pi) {
            *c = w;
        }
        let Some(heap) = held.get_mut(nodes.node_of(w) as usize) else {
            continue;
        };
        if heap.len() < cap || next.is_none() {
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
    let mut primary = vec![0u32; p_count];
    for (node, heap) in held.iter().enumerate() {
        for Reverse((_, p)) in heap.iter() {
            if let Some(slot) = primary.get_mut(*p as usize) {
                *slot = u32::try_from(node).unwrap_or(u32::MAX);
            }
        }
    }
    primary
}

/// The best node of every partition, as weights, when all keys differ.
///
/// Then the scores of one partition are all different (`mix32` and adding
/// the partition hash are bijections), so the best node is the one with the
/// highest score, and it can be recovered from that score alone:
/// `key = unmix32(score) - partition_hash`. So this only sweeps maxima, node
/// by node over all partitions (which vectorises), then looks each winning
/// key up.
fn best_candidates(nodes: &Nodes, partitions: u32) -> Vec<Weight> {
    let hashes: Vec<u32> = (0..partitions).map(partition_hash).collect();
    let mut best: Vec<u32> = vec![0; hashes.len()];
    for &key in &nodes.keys {
        for (b, &h) in best.iter_mut().zip(&hashes) {
            *b = (*b).max(rendezvous_score(h, key));
        }
    }
    best.iter()
        .zip(&hashes)
        .map(|(&score, &h)| nodes.weight_of_score(h, score))
        .collect()
}

/// The `depth` best candidates of every partition, best first, by full
/// weight (score, then name).
fn ranked_candidates(nodes: &Nodes, partitions: u32, depth: usize) -> Vec<Weight> {
    let mut top: Vec<Weight> = Vec::with_capacity(partitions as usize * depth);
    let mut best: Vec<Weight> = Vec::with_capacity(depth + 1);
    for p in 0..partitions {
        best.clear();
        rank_partition(nodes, partition_hash(p), depth, &mut best);
        top.extend_from_slice(&best);
    }
    top
}

/// Fills `best` (empty) with the `depth` best weights of the partition of
/// hash `ph`, best first.
fn rank_partition(nodes: &Nodes, ph: u32, depth: usize, best: &mut Vec<Weight>) {
    for (&key, &rank) in nodes.keys.iter().zip(&nodes.name_ranks) {
        push_ranked(best, depth, weight(rendezvous_score(ph, key), rank));
    }
}

/// Inserts `w` into `best` (sorted best first, at most `depth` long) if it
/// is among the `depth` best.
#[inline]
fn push_ranked(best: &mut Vec<Weight>, depth: usize, w: Weight) {
    if best.len() == depth {
        match best.last() {
            Some(&last) if w > last => {
                best.pop();
            }
            _ => return,
        }
    }
    let at = best.partition_point(|&b| b > w);
    best.insert(at, w);
}

/// Most partitions one node may be the primary of.
pub(crate) fn capacity(partitions: u32, nodes: usize, load_bound_percent: u32) -> usize {
    let num = u128::from(partitions) * u128::from(100 + u64::from(load_bound_percent));
    let den = 100u128 * nodes.max(1) as u128;
    usize::try_from(num.div_ceil(den))
        .unwrap_or(usize::MAX)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::NodeId;

    fn view(n: usize) -> View {
        View::from_nodes((0..n).map(|i| NodeId::new(format!("n{i}"), (i as u64 * 7919) % 13)))
    }

    /// All weights of partition `p`, indexed by node.
    fn weights(nodes: &Nodes, p: u32) -> Vec<Weight> {
        let ph = partition_hash(p);
        nodes
            .keys
            .iter()
            .zip(&nodes.name_ranks)
            .map(|(&k, &r)| weight(rendezvous_score(ph, k), r))
            .collect()
    }

    /// Checks that `rows` is the stable assignment under the load bound, with
    /// replicas the best other nodes.
    fn check_stable(n: usize, partitions: u32, copies: usize, bound: u32) {
        check_stable_view(&view(n), partitions, copies, bound);
    }

    fn check_stable_view(v: &View, partitions: u32, copies: usize, bound: u32) {
        let n = v.len();
        let v = v.clone();
        let nodes = Nodes::new(&v);
        let rows = assign(&v, partitions, copies, bound).rows;
        assert_eq!(rows.len(), partitions as usize * copies);
        let cap = capacity(partitions, n, bound);
        let primary: Vec<usize> = rows.chunks(copies).map(|r| r[0].get()).collect();
        let mut load = vec![0usize; n];
        for &p in &primary {
            load[p] += 1;
        }
        assert!(load.iter().all(|&l| l <= cap), "over cap {cap}: {load:?}");
        let all: Vec<Vec<Weight>> = (0..partitions).map(|p| weights(&nodes, p)).collect();
        // The weakest (weight, partition) each node holds.
        let mut weakest = vec![(Weight::MAX, u32::MAX); n];
        for (p, &node) in primary.iter().enumerate() {
            weakest[node] = weakest[node].min((all[p][node], p as u32));
        }
        for (p, &node) in primary.iter().enumerate() {
            let mine = all[p][node];
            for m in 0..n {
                if all[p][m] > mine {
                    // p prefers m: m must be full of partitions it prefers to p.
                    assert_eq!(load[m], cap, "blocking pair p{p} n{m}");
                    assert!(
                        weakest[m] > (all[p][m], p as u32),
                        "blocking pair p{p} n{m}"
                    );
                }
            }
            // Replicas: the best other nodes, best first.
            let mut others: Vec<(Weight, usize)> = (0..n)
                .filter(|&m| m != node)
                .map(|m| (all[p][m], m))
                .collect();
            others.sort_unstable_by(|a, b| b.cmp(a));
            let expected: Vec<usize> = others.iter().take(copies - 1).map(|&(_, m)| m).collect();
            let got: Vec<usize> = rows[p * copies + 1..(p + 1) * copies]
                .iter()
                .map(|i| i.get())
                .collect();
            assert_eq!(got, expected, "replicas of p{p}");
        }
    }

    #[test]
    fn assignment_is_stable_under_the_bound() {
        for (n, partitions, copies, bound) in [
            (1, 10, 1, 0),
            (2, 7, 1, 0),
            (3, 100, 2, 0),
            (5, 64, 3, 5),
            (7, 1000, 1, 0),
            (7, 1000, 4, 5),
            (10, 50, 2, 0),
            (13, 5, 2, 0), // fewer partitions than nodes
            (40, 4000, 1, 2),
        ] {
            check_stable(n, partitions, copies, bound);
        }
    }

    #[test]
    fn without_a_binding_bound_it_is_plain_rendezvous() {
        let v = view(9);
        let nodes = Nodes::new(&v);
        let rows = assign(&v, 500, 1, 10_000).rows;
        for (p, owner) in rows.iter().enumerate() {
            let w = weights(&nodes, p as u32);
            let best = (0..9).max_by_key(|&m| w[m]).unwrap();
            assert_eq!(owner.get(), best);
        }
    }

    #[test]
    fn zero_bound_balances_exactly() {
        // With b = 0 the cap is ceil(P/n): loads differ by at most one when
        // n divides into P evenly or nearly.
        let rows = assign(&view(6), 600, 1, 0).rows;
        let mut load = [0usize; 6];
        for r in &rows {
            load[r.get()] += 1;
        }
        assert_eq!(load, [100; 6]);
    }

    #[test]
    fn capacity_rounds_up_and_covers_all_partitions() {
        assert_eq!(capacity(100, 3, 0), 34);
        assert_eq!(capacity(100, 3, 5), 35);
        assert_eq!(capacity(131_072, 100, 5), 1377);
        assert_eq!(capacity(5, 13, 5), 1);
        for (p, n, b) in [
            (1, 1, 0),
            (7, 3, 0),
            (1 << 24, 1 << 24, 5),
            (u32::MAX, 1, 5),
        ] {
            assert!(capacity(p, n, b) * n >= p as usize);
        }
    }

    #[test]
    fn names_sharing_a_key_are_told_apart_by_name() {
        // Two names whose 32-bit keys collide: every score ties between them.
        assert_eq!(name_key("c36330"), name_key("c116803"));
        let v = View::from_nodes([
            NodeId::new("c36330", 1),
            NodeId::new("c116803", 2),
            NodeId::new("other", 3),
        ]);
        let nodes = Nodes::new(&v);
        assert!(!nodes.distinct_keys);
        assert!(Nodes::new(&view(50)).distinct_keys);
        for copies in [1, 2, 3] {
            let rows = assign(&v, 400, copies, 10_000).rows;
            for (p, row) in rows.chunks(copies).enumerate() {
                let w = weights(&nodes, p as u32);
                let mut order: Vec<usize> = (0..3).collect();
                order.sort_unstable_by_key(|&m| std::cmp::Reverse(w[m]));
                let got: Vec<usize> = row.iter().map(|i| i.get()).collect();
                assert_eq!(got, order[..copies], "p{p}");
                // Of the two colliding names, the later name ("c36330") wins.
                let a = got.iter().position(|&m| m == 0);
                let b = got.iter().position(|&m| m == 1);
                if let (Some(a), Some(b)) = (a, b) {
                    assert!(a < b);
                }
            }
        }
        check_stable_view(&v, 400, 2, 0);
    }

    #[test]
    fn fast_and_general_candidate_searches_agree() {
        for n in [1, 2, 3, 17, 64] {
            let nodes = Nodes::new(&view(n));
            assert!(nodes.distinct_keys);
            assert_eq!(
                best_candidates(&nodes, 5000),
                ranked_candidates(&nodes, 5000, 1)
            );
        }
    }

    #[test]
    fn fast_and_general_next_choice_searches_agree() {
        let fast = Nodes::new(&view(40));
        assert!(fast.distinct_keys);
        let general = Nodes {
            distinct_keys: false,
            keys: fast.keys.clone(),
            name_ranks: fast.name_ranks.clone(),
            by_rank: fast.by_rank.clone(),
            by_key: fast.by_key.clone(),
            key_index: fast.key_index.clone(),
        };
        for p in 0..300 {
            let ph = partition_hash(p);
            // Walk each partition's whole ranking down from the top.
            let mut bound = Weight::MAX;
            let mut steps = 0;
            loop {
                let a = fast.best_below(ph, bound);
                assert_eq!(a, general.best_below(ph, bound), "p{p} step {steps}");
                let Some(w) = a else { break };
                bound = w;
                steps += 1;
            }
            assert_eq!(steps, 40);
        }
        assert_eq!(fast.best_below(0, 0), None);
    }

    #[test]
    fn reassign_starts_from_the_previous_ranking() {
        let old = view(12);
        let new = View::from_nodes(
            old.nodes()
                .iter()
                .skip(1)
                .cloned()
                .chain([NodeId::new("late", 99)]),
        );
        for copies in [1, 3] {
            let previous = assign(&old, 700, copies, 5);
            assert_eq!(previous.ranking.len(), 700 * copies);
            let full = assign(&new, 700, copies, 5);
            let incremental = reassign(&previous, &old, &new, 700, copies, 5);
            assert_eq!(incremental.rows, full.rows);
            assert_eq!(incremental.ranking, full.ranking);
            // The shortcut really reads the previous ranking: a corrupted
            // one shows through...
            let corrupted = Assignment {
                rows: previous.rows.clone(),
                ranking: vec![0; previous.ranking.len()],
            };
            assert_ne!(
                reassign(&corrupted, &old, &new, 700, copies, 5).rows,
                full.rows
            );
            // ...unless the widths differ, which forces a full assignment.
            let two = View::from_nodes(old.nodes().iter().take(2).cloned());
            let narrow = assign(&two, 700, 3, 5);
            assert_eq!(narrow.ranking.len(), 700 * 2);
            assert_eq!(
                reassign(&narrow, &two, &new, 700, 3, 5).rows,
                assign(&new, 700, 3, 5).rows
            );
        }
        // Colliding keys: no ranking is kept, and reassign falls back.
        let colliding = View::from_nodes([NodeId::new("c36330", 1), NodeId::new("c116803", 2)]);
        let a = assign(&colliding, 50, 1, 5);
        assert!(a.ranking.is_empty());
        assert_eq!(
            reassign(&a, &colliding, &old, 50, 1, 5).rows,
            assign(&old, 50, 1, 5).rows
        );
        assert_eq!(
            reassign(&previous_of(&old), &old, &colliding, 50, 1, 5).rows,
            a.rows
        );
    }

    fn previous_of(v: &View) -> Assignment {
        assign(v, 50, 1, 5)
    }

    #[test]
    fn key_index_finds_every_key() {
        for n in [0usize, 1, 2, 3, 7, 100, 1000] {
            let entries: Vec<(u32, u32)> = (0..n as u32)
                .map(|i| (crate::hash::mix32(i.wrapping_mul(7)), i))
                .collect();
            let index = KeyIndex::new(&entries);
            for &(k, r) in &entries {
                assert_eq!(index.get(k), Some(r));
            }
            assert_eq!(index.get(0x1234_5678), None);
        }
        // Keys that share their top bits still resolve (probing).
        let index = KeyIndex::new(&[(0x8000_0001, 4), (0x8000_0002, 5), (0x8000_0003, 6)]);
        assert_eq!(index.get(0x8000_0003), Some(6));
        assert_eq!(index.get(0x8000_0004), None);
    }

    #[test]
    fn degenerate_inputs_give_no_rows() {
        assert!(assign(&View::default(), 10, 1, 5).rows.is_empty());
        assert!(assign(&view(3), 0, 1, 5).rows.is_empty());
        assert!(assign(&view(3), 10, 0, 5).rows.is_empty());
    }
}
