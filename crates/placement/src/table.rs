//! The placement table: built once per view, then read.

use std::fmt;

use crate::error::PlacementError;
use crate::hash::{datum_hash, reduce};
use crate::rendezvous::{self, Assignment};
use crate::strategy::Strategy;
use crate::view::{NodeId, NodeIndex, View, ViewId};

/// Built once per view, then read: O(1), allocation-free owner lookups.
///
/// Every datum maps to a *slot* whose owner row was computed at build time:
/// - [`Strategy::ModN`]: slot `id mod n` (euclidean, so negative ids work),
///   and the rows are the `n` rotations of the placement list, cut to
///   `min(copies, n)`. They are stored as one ring `0, 1, …, n-1, 0, …` of
///   `n + min(copies, n) - 1` entries, so row `s` is `ring[s .. s + width]`.
/// - [`Strategy::Rendezvous`]: slot = partition `reduce(datum_hash(id), P)`,
///   and `P` rows of `min(copies, n)` entries.
#[derive(Clone)]
pub struct PlacementTable {
    view: View,
    strategy: Strategy,
    copies: usize,
    /// `min(copies, n)`: the length of every owner row.
    width: usize,
    layout: Layout,
}

#[derive(Clone)]
enum Layout {
    /// No ready node: no owners.
    Empty,
    /// `n` as i64 (> 0) and the ring of node indices.
    ModN { n: i64, ring: Vec<NodeIndex> },
    /// Partition count (> 0) and the assignment (`partitions × width`
    /// owner entries).
    Partitions {
        partitions: u32,
        assignment: Assignment,
    },
}

impl fmt::Debug for PlacementTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlacementTable")
            .field("view_id", &self.view.id())
            .field("nodes", &self.view.len())
            .field("strategy", &self.strategy)
            .field("copies", &self.copies)
            .finish_non_exhaustive()
    }
}

impl Default for PlacementTable {
    fn default() -> PlacementTable {
        PlacementTable::empty()
    }
}

impl PlacementTable {
    /// Largest number of owner entries a table may hold
    /// (`partitions × min(copies, n)` for [`Strategy::Rendezvous`]): 2^24,
    /// 64 MiB of rows.
    pub const MAX_ENTRIES: u64 = 1 << 24;

    /// Largest number of ready nodes a view may have to build a table.
    pub const MAX_NODES: usize = 1 << 24;

    /// Builds the table of `view` under `strategy`, with `copies` owners per
    /// datum (primary plus replicas; fewer when there are fewer nodes).
    ///
    /// # Errors
    /// [`PlacementError::ZeroCopies`] when `copies` is 0; for
    /// [`Strategy::Rendezvous`], [`PlacementError::ZeroPartitions`] and
    /// [`PlacementError::TooManyPartitions`] for a partition count outside
    /// `1..=Strategy::MAX_PARTITIONS`, and [`PlacementError::TableTooLarge`]
    /// beyond [`Self::MAX_ENTRIES`]; [`PlacementError::TooManyNodes`] beyond
    /// [`Self::MAX_NODES`]. The checks do not depend on the view being empty.
    pub fn build(
        view: View,
        strategy: &Strategy,
        copies: usize,
    ) -> Result<PlacementTable, PlacementError> {
        PlacementTable::build_inner(view, strategy, copies, None)
    }

    /// The table of `view` with this table's strategy and copies: exactly
    /// what [`Self::build`] returns, computed faster when the views differ
    /// by a few nodes.
    ///
    /// For [`Strategy::Rendezvous`] the table keeps every partition's
    /// ranking of its best nodes; a rebuild re-ranks over all nodes only the
    /// partitions that lost one of those, and otherwise just weighs the
    /// joining nodes: O(partitions × changed nodes) instead of
    /// O(partitions × n), then the load bound is applied again. (For
    /// [`Strategy::ModN`] a build is already O(n).) Use it on every view
    /// change in large clusters.
    ///
    /// Mind that [`Self::empty`] is a mod-N table with one copy: to start
    /// from nothing with another configuration use [`Self::build`] or
    /// [`Self::build_from`].
    ///
    /// # Errors
    /// As [`Self::build`] (the configuration was valid for this table, so
    /// only [`PlacementError::TooManyNodes`] can occur).
    pub fn rebuild(&self, view: View) -> Result<PlacementTable, PlacementError> {
        PlacementTable::build_inner(view, &self.strategy, self.copies, Some(self))
    }

    /// [`Self::build`], reusing the work of `previous` where its
    /// configuration allows (same strategy and partition count, same number
    /// of owners per datum), as [`Self::rebuild`] does; otherwise a plain
    /// build. The result is always exactly what [`Self::build`] returns.
    ///
    /// # Errors
    /// As [`Self::build`].
    pub fn build_from(
        previous: &PlacementTable,
        view: View,
        strategy: &Strategy,
        copies: usize,
    ) -> Result<PlacementTable, PlacementError> {
        PlacementTable::build_inner(view, strategy, copies, Some(previous))
    }

    fn build_inner(
        view: View,
        strategy: &Strategy,
        copies: usize,
        previous: Option<&PlacementTable>,
    ) -> Result<PlacementTable, PlacementError> {
        if copies == 0 {
            return Err(PlacementError::ZeroCopies);
        }
        if let Strategy::Rendezvous { partitions } = *strategy {
            if partitions == 0 {
                return Err(PlacementError::ZeroPartitions);
            }
            if partitions > Strategy::MAX_PARTITIONS {
                return Err(PlacementError::TooManyPartitions {
                    partitions,
                    max: Strategy::MAX_PARTITIONS,
                });
            }
        }
        let n = view.len();
        if n > Self::MAX_NODES {
            return Err(PlacementError::TooManyNodes {
                nodes: n,
                max: Self::MAX_NODES,
            });
        }
        let width = copies.min(n);
        let layout = if n == 0 {
            Layout::Empty
        } else {
            match *strategy {
                Strategy::ModN => {
                    let ring = (0..n + width - 1)
                        .map(|i| NodeIndex(u32::try_from(i % n).unwrap_or(0)))
                        .collect();
                    Layout::ModN {
                        n: i64::try_from(n).unwrap_or(i64::MAX),
                        ring,
                    }
                }
                Strategy::Rendezvous { partitions } => {
                    let entries = u64::from(partitions) * width as u64;
                    if entries > Self::MAX_ENTRIES {
                        return Err(PlacementError::TableTooLarge {
                            entries,
                            max: Self::MAX_ENTRIES,
                        });
                    }
                    let bound = Strategy::LOAD_BOUND_PERCENT;
                    let assignment = match previous.map(|t| (&t.layout, &t.view)) {
                        Some((
                            Layout::Partitions {
                                partitions: old_partitions,
                                assignment: old,
                            },
                            old_view,
                        )) if *old_partitions == partitions => {
                            rendezvous::reassign(old, old_view, &view, partitions, width, bound)
                        }
                        _ => rendezvous::assign(&view, partitions, width, bound),
                    };
                    Layout::Partitions {
                        partitions,
                        assignment,
                    }
                }
            }
        };
        Ok(PlacementTable {
            view,
            strategy: strategy.clone(),
            copies,
            width,
            layout,
        })
    }

    /// The table of the empty view: no nodes, no owners (mod-N, one copy).
    #[must_use]
    pub fn empty() -> PlacementTable {
        PlacementTable {
            view: View::default(),
            strategy: Strategy::ModN,
            copies: 1,
            width: 0,
            layout: Layout::Empty,
        }
    }

    /// The view the table was built from.
    #[must_use]
    pub fn view(&self) -> &View {
        &self.view
    }

    /// The id of that view.
    #[must_use]
    pub fn view_id(&self) -> ViewId {
        self.view.id()
    }

    /// The strategy the table was built with.
    #[must_use]
    pub fn strategy(&self) -> &Strategy {
        &self.strategy
    }

    /// Copies asked for (owners per datum are `min(copies, n)`).
    #[must_use]
    pub fn copies(&self) -> usize {
        self.copies
    }

    /// The number of owners of every datum: `min(copies, n)`.
    #[must_use]
    pub fn width(&self) -> usize {
        self.width
    }

    /// Owners of datum `id`: primary first, distinct, `min(copies, n)` of
    /// them; empty when no node is ready. O(1), no allocation, never panics.
    #[inline]
    #[must_use]
    pub fn owners(&self, id: i64) -> &[NodeIndex] {
        match &self.layout {
            Layout::Empty => &[],
            Layout::ModN { n, ring } => {
                // rem_euclid by a positive n is in 0..n: no overflow, even
                // for i64::MIN.
                let slot = id.rem_euclid(*n) as usize;
                ring.get(slot..slot + self.width).unwrap_or(&[])
            }
            Layout::Partitions {
                partitions,
                assignment,
            } => {
                let start = reduce(datum_hash(id), *partitions) as usize * self.width;
                assignment
                    .rows
                    .get(start..start + self.width)
                    .unwrap_or(&[])
            }
        }
    }

    /// The primary owner of datum `id`, if any node is ready.
    #[inline]
    #[must_use]
    pub fn primary(&self, id: i64) -> Option<NodeIndex> {
        self.owners(id).first().copied()
    }

    /// The owners of datum `id` as node ids, primary first.
    pub fn owner_ids(&self, id: i64) -> impl Iterator<Item = &NodeId> {
        self.owners(id).iter().filter_map(|&i| self.view.node(i))
    }

    /// Whether `node` is one of the owners of datum `id`.
    #[must_use]
    pub fn is_owner(&self, id: i64, node: NodeIndex) -> bool {
        self.owners(id).contains(&node)
    }

    /// The slot of datum `id` (ModN: `id mod n`; Rendezvous: its partition),
    /// or `None` when the table is empty. Datums in the same slot have the
    /// same owners.
    #[must_use]
    pub fn slot(&self, id: i64) -> Option<u32> {
        match &self.layout {
            Layout::Empty => None,
            Layout::ModN { n, .. } => u32::try_from(id.rem_euclid(*n)).ok(),
            Layout::Partitions { partitions, .. } => Some(reduce(datum_hash(id), *partitions)),
        }
    }

    /// Number of slots (and owner rows): `n` for ModN, the partition count
    /// for Rendezvous, 0 when empty.
    #[must_use]
    pub fn slot_count(&self) -> usize {
        match &self.layout {
            Layout::Empty => 0,
            Layout::ModN { n, .. } => usize::try_from(*n).unwrap_or(0),
            Layout::Partitions { partitions, .. } => *partitions as usize,
        }
    }

    /// Owners of slot `slot`, as [`Self::owners`] gives them for its datums.
    #[must_use]
    pub fn slot_owners(&self, slot: u32) -> &[NodeIndex] {
        let s = slot as usize;
        match &self.layout {
            Layout::Empty => &[],
            Layout::ModN { ring, .. } => ring.get(s..s + self.width).unwrap_or(&[]),
            Layout::Partitions { assignment, .. } => assignment
                .rows
                .get(s * self.width..(s + 1) * self.width)
                .unwrap_or(&[]),
        }
    }

    /// Whether datums fall into the same slots in both tables (same
    /// strategy with the same slot count), so rows can be compared per slot.
    fn same_slots(&self, other: &PlacementTable) -> bool {
        match (&self.layout, &other.layout) {
            (Layout::ModN { n: a, .. }, Layout::ModN { n: b, .. }) => a == b,
            (
                Layout::Partitions { partitions: a, .. },
                Layout::Partitions { partitions: b, .. },
            ) => a == b,
            _ => false,
        }
    }

    /// What changes for each of `ids` from this (old) table to `new`: the
    /// datums whose primary changes, with the old and new primary, and the
    /// datums whose owner set changes while the primary stays. Nodes are
    /// compared by identity (name and generation): a restarted node is a
    /// different owner. Datums are reported in input order, once per
    /// occurrence in `ids`.
    ///
    /// When both tables use the same slots (same strategy, same `n` for
    /// ModN or the same partition count) each slot's rows are compared once
    /// and datums only look their slot up; otherwise every datum's rows are
    /// compared (O(copies) each).
    pub fn diff(&self, new: &PlacementTable, ids: impl IntoIterator<Item = i64>) -> TableDiff {
        let mut cmp = RowComparer::new(self, new);
        let mut diff = TableDiff::default();
        let mut per_slot: Vec<Change> = if self.same_slots(new) {
            vec![Change::Unknown; self.slot_count()]
        } else {
            Vec::new()
        };
        for id in ids {
            // With shared slots the slot is computed once and the rows are
            // only read for a cache miss or a move.
            let slot = if per_slot.is_empty() {
                None
            } else {
                self.slot(id)
            };
            let (change, old_row, new_row) =
                match slot.and_then(|s| Some((s, per_slot.get_mut(s as usize)?))) {
                    Some((s, cached)) => {
                        let (old_row, new_row) = (self.slot_owners(s), new.slot_owners(s));
                        if *cached == Change::Unknown {
                            *cached = cmp.compare(old_row, new_row);
                        }
                        (*cached, old_row, new_row)
                    }
                    None => {
                        let (old_row, new_row) = (self.owners(id), new.owners(id));
                        (cmp.compare(old_row, new_row), old_row, new_row)
                    }
                };
            match change {
                Change::Primary => diff.primary_moves.push(PrimaryMove {
                    id,
                    from: old_row.first().and_then(|&i| self.view.node(i)).cloned(),
                    to: new_row.first().and_then(|&i| new.view.node(i)).cloned(),
                }),
                Change::Replicas => diff.replica_changes.push(id),
                Change::Same | Change::Unknown => {}
            }
        }
        diff
    }
}

/// How a datum's owners changed.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Change {
    Unknown,
    Same,
    Primary,
    Replicas,
}

/// Compares owner rows of two tables by node identity.
struct RowComparer {
    /// Old node index -> new node index of the same (name, generation).
    old_to_new: Vec<Option<NodeIndex>>,
    /// Per new node: the comparison that last marked it.
    marks: Vec<u64>,
    epoch: u64,
}

impl RowComparer {
    fn new(old: &PlacementTable, new: &PlacementTable) -> RowComparer {
        RowComparer {
            old_to_new: old
                .view
                .nodes()
                .iter()
                .map(|id| new.view.index_of_id(id))
                .collect(),
            marks: vec![0; new.view.len()],
            epoch: 0,
        }
    }

    fn map(&self, old: NodeIndex) -> Option<NodeIndex> {
        self.old_to_new.get(old.get()).copied().flatten()
    }

    fn compare(&mut self, old_row: &[NodeIndex], new_row: &[NodeIndex]) -> Change {
        match (old_row.first(), new_row.first()) {
            (None, None) => return Change::Same,
            (Some(&o), Some(&n)) if self.map(o) == Some(n) => {}
            _ => return Change::Primary,
        }
        if old_row.len() != new_row.len() {
            return Change::Replicas;
        }
        // Rows hold distinct nodes: equal length and old ⊆ new means equal sets.
        self.epoch += 1;
        for &n in new_row {
            if let Some(mark) = self.marks.get_mut(n.get()) {
                *mark = self.epoch;
            }
        }
        let all_kept = old_row.iter().all(|&o| {
            self.map(o)
                .and_then(|n| self.marks.get(n.get()))
                .is_some_and(|&mark| mark == self.epoch)
        });
        if all_kept {
            Change::Same
        } else {
            Change::Replicas
        }
    }
}

/// A datum whose primary owner changes between two tables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrimaryMove {
    /// The datum.
    pub id: i64,
    /// Its primary in the old table (`None` if no node was ready).
    pub from: Option<NodeId>,
    /// Its primary in the new table (`None` if no node is ready).
    pub to: Option<NodeId>,
}

/// The result of [`PlacementTable::diff`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableDiff {
    /// Datums whose primary changes, in input order.
    pub primary_moves: Vec<PrimaryMove>,
    /// Datums whose owner set changed but primary did not, in input order.
    pub replica_changes: Vec<i64>,
}

impl TableDiff {
    /// Whether nothing changes for any of the datums.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.primary_moves.is_empty() && self.replica_changes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(names: &[(&str, u64)]) -> View {
        View::from_nodes(names.iter().map(|&(n, g)| NodeId::new(n, g)))
    }

    fn abc() -> View {
        view(&[("a", 1), ("b", 2), ("c", 3)])
    }

    fn names(t: &PlacementTable, id: i64) -> Vec<&str> {
        t.owner_ids(id).map(|n| n.name.as_str()).collect()
    }

    #[test]
    fn modn_follows_the_seed_formula() {
        let t = PlacementTable::build(abc(), &Strategy::ModN, 2).unwrap();
        assert_eq!(names(&t, 0), ["a", "b"]);
        assert_eq!(names(&t, 1), ["b", "c"]);
        assert_eq!(names(&t, 2), ["c", "a"]);
        assert_eq!(names(&t, 3), ["a", "b"]);
        assert_eq!(t.width(), 2);
        assert_eq!(t.copies(), 2);
        assert_eq!(t.slot_count(), 3);
    }

    #[test]
    fn negative_and_extreme_ids() {
        let t = PlacementTable::build(abc(), &Strategy::ModN, 3).unwrap();
        // Euclidean remainder: -1 mod 3 = 2.
        assert_eq!(names(&t, -1), ["c", "a", "b"]);
        assert_eq!(names(&t, -3), ["a", "b", "c"]);
        // i64::MIN = -9223372036854775808 ≡ 1 (mod 3); i64::MAX ≡ 1 (mod 3).
        assert_eq!(i64::MIN.rem_euclid(3), 1);
        assert_eq!(names(&t, i64::MIN), ["b", "c", "a"]);
        assert_eq!(names(&t, i64::MAX), ["b", "c", "a"]);
        assert_eq!(t.slot(i64::MIN), Some(1));
        for strategy in [Strategy::ModN, Strategy::Rendezvous { partitions: 64 }] {
            let t = PlacementTable::build(abc(), &strategy, 2).unwrap();
            for id in [i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX] {
                assert_eq!(t.owners(id).len(), 2, "{strategy:?} {id}");
                assert!(t.primary(id).is_some());
            }
        }
    }

    #[test]
    fn copies_beyond_nodes_gives_each_node_once() {
        for strategy in [Strategy::ModN, Strategy::Rendezvous { partitions: 16 }] {
            let t = PlacementTable::build(abc(), &strategy, 10).unwrap();
            assert_eq!(t.copies(), 10);
            assert_eq!(t.width(), 3);
            for id in -20..20 {
                let mut owners = t.owners(id).to_vec();
                owners.sort();
                assert_eq!(owners, [NodeIndex(0), NodeIndex(1), NodeIndex(2)]);
            }
        }
    }

    #[test]
    fn no_ready_node_no_owner() {
        let empty = View::new([crate::ViewMember::new("a", 1, false)]);
        for strategy in [Strategy::ModN, Strategy::rendezvous()] {
            let t = PlacementTable::build(empty.clone(), &strategy, 2).unwrap();
            assert!(t.owners(5).is_empty());
            assert_eq!(t.primary(i64::MIN), None);
            assert_eq!(t.owner_ids(0).count(), 0);
            assert_eq!(t.slot(0), None);
            assert_eq!(t.slot_count(), 0);
            assert!(t.slot_owners(0).is_empty());
        }
        let t = PlacementTable::empty();
        assert!(t.owners(0).is_empty());
        assert_eq!(t.view_id(), View::default().id());
        assert_eq!(t.width(), 0);
    }

    #[test]
    fn configuration_errors() {
        assert_eq!(
            PlacementTable::build(abc(), &Strategy::ModN, 0).unwrap_err(),
            PlacementError::ZeroCopies
        );
        assert_eq!(
            PlacementTable::build(View::default(), &Strategy::ModN, 0).unwrap_err(),
            PlacementError::ZeroCopies
        );
        assert_eq!(
            PlacementTable::build(abc(), &Strategy::Rendezvous { partitions: 0 }, 1).unwrap_err(),
            PlacementError::ZeroPartitions
        );
        assert_eq!(
            PlacementTable::build(
                View::default(),
                &Strategy::Rendezvous {
                    partitions: u32::MAX
                },
                1
            )
            .unwrap_err(),
            PlacementError::TooManyPartitions {
                partitions: u32::MAX,
                max: Strategy::MAX_PARTITIONS
            }
        );
        let err = PlacementTable::build(
            abc(),
            &Strategy::Rendezvous {
                partitions: Strategy::MAX_PARTITIONS,
            },
            2,
        )
        .unwrap_err();
        assert_eq!(
            err,
            PlacementError::TableTooLarge {
                entries: 2 * u64::from(Strategy::MAX_PARTITIONS),
                max: PlacementTable::MAX_ENTRIES
            }
        );
        assert!(err.to_string().contains("owner entries"));
    }

    #[test]
    fn one_node_owns_everything() {
        let one = view(&[("solo", 9)]);
        for strategy in [Strategy::ModN, Strategy::Rendezvous { partitions: 8 }] {
            let t = PlacementTable::build(one.clone(), &strategy, 3).unwrap();
            for id in [i64::MIN, -7, 0, 7, i64::MAX] {
                assert_eq!(t.owners(id), &[NodeIndex(0)]);
            }
        }
    }

    #[test]
    fn slot_owners_match_owners() {
        for strategy in [Strategy::ModN, Strategy::Rendezvous { partitions: 32 }] {
            let t = PlacementTable::build(abc(), &strategy, 2).unwrap();
            for id in -50..50 {
                let slot = t.slot(id).unwrap();
                assert!((slot as usize) < t.slot_count());
                assert_eq!(t.slot_owners(slot), t.owners(id));
            }
            assert!(t.slot_owners(u32::MAX).is_empty());
        }
    }

    #[test]
    fn diff_reports_primary_moves_with_from_and_to() {
        let old = PlacementTable::build(abc(), &Strategy::ModN, 1).unwrap();
        let new = PlacementTable::build(
            view(&[("a", 1), ("b", 2), ("c", 3), ("d", 4)]),
            &Strategy::ModN,
            1,
        )
        .unwrap();
        let diff = old.diff(&new, [0, 1, 2, 3, 4]);
        // Old: a b c a b; new: a b c d a.
        assert_eq!(
            diff.primary_moves,
            vec![
                PrimaryMove {
                    id: 3,
                    from: Some(NodeId::new("a", 1)),
                    to: Some(NodeId::new("d", 4))
                },
                PrimaryMove {
                    id: 4,
                    from: Some(NodeId::new("b", 2)),
                    to: Some(NodeId::new("a", 1))
                },
            ]
        );
        assert!(diff.replica_changes.is_empty());
        assert!(old.diff(&old, -10..10).is_empty());
    }

    #[test]
    fn diff_reports_replica_changes() {
        // Same n, same slots: c restarts (new generation) and is a different node.
        let old = PlacementTable::build(abc(), &Strategy::ModN, 2).unwrap();
        let restarted = view(&[("a", 1), ("b", 2), ("c", 30)]);
        let new = PlacementTable::build(restarted, &Strategy::ModN, 2).unwrap();
        let diff = old.diff(&new, 0..6);
        // Rows: 0 = [a, b] same; 1 = [b, c] replica; 2 = [c, a] primary.
        assert_eq!(diff.replica_changes, vec![1, 4]);
        let moved: Vec<i64> = diff.primary_moves.iter().map(|m| m.id).collect();
        assert_eq!(moved, vec![2, 5]);
        assert_eq!(diff.primary_moves[0].from, Some(NodeId::new("c", 3)));
        assert_eq!(diff.primary_moves[0].to, Some(NodeId::new("c", 30)));

        // More copies, same primary: the owner set grows.
        let wider = PlacementTable::build(abc(), &Strategy::ModN, 3).unwrap();
        let diff = old.diff(&wider, 0..3);
        assert!(diff.primary_moves.is_empty());
        assert_eq!(diff.replica_changes, vec![0, 1, 2]);

        // Replica order does not matter, only the set.
        let two = view(&[("a", 1), ("b", 2)]);
        let t2 = PlacementTable::build(two, &Strategy::ModN, 2).unwrap();
        let t3 = PlacementTable::build(abc(), &Strategy::ModN, 2).unwrap();
        // n differs: per-datum comparison path. Id 0: [a,b] -> [a,b] same.
        let diff = t2.diff(&t3, [0]);
        assert!(diff.is_empty());
    }

    #[test]
    fn diff_from_and_to_nothing() {
        let empty = PlacementTable::empty();
        let full = PlacementTable::build(abc(), &Strategy::rendezvous(), 1).unwrap();
        let up = empty.diff(&full, [1, 2]);
        assert_eq!(up.primary_moves.len(), 2);
        assert!(
            up.primary_moves
                .iter()
                .all(|m| m.from.is_none() && m.to.is_some())
        );
        let down = full.diff(&empty, [1, 2]);
        assert!(
            down.primary_moves
                .iter()
                .all(|m| m.from.is_some() && m.to.is_none())
        );
        assert!(empty.diff(&PlacementTable::empty(), [1]).is_empty());
    }

    #[test]
    fn diff_reports_duplicates_in_input_order() {
        let old = PlacementTable::build(abc(), &Strategy::ModN, 1).unwrap();
        let new = PlacementTable::build(view(&[("a", 1), ("b", 2)]), &Strategy::ModN, 1).unwrap();
        let diff = old.diff(&new, [2, 2, -1]);
        let ids: Vec<i64> = diff.primary_moves.iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![2, 2, -1]);
    }

    #[test]
    fn debug_is_a_summary() {
        let t = PlacementTable::build(abc(), &Strategy::rendezvous(), 1).unwrap();
        let s = format!("{t:?}");
        assert!(s.contains("nodes: 3") && s.contains("Rendezvous"), "{s}");
        assert!(s.len() < 300);
    }
}
