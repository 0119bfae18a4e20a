//! The placement table: built once per view, then read.

use std::fmt;

use crate::error::PlacementError;
use crate::hash::{datum_hash, reduce};
use crate::rendezvous;
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
    /// Partition count (> 0) and `partitions × width` owner entries.
    Partitions {
        partitions: u32,
        rows: Vec<NodeIndex>,
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
                    let rows =
                        rendezvous::assign(&view, partitions, width, Strategy::LOAD_BOUND_PERCENT);
                    Layout::Partitions { partitions, rows }
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
            Layout::Partitions { partitions, rows } => {
                let start = reduce(datum_hash(id), *partitions) as usize * self.width;
                rows.get(start..start + self.width).unwrap_or(&[])
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
            Layout::Partitions { rows, .. } => rows
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
            let old_row = self.owners(id);
            let new_row = new.owners(id);
            let change = match self.slot(id).and_then(|s| per_slot.get_mut(s as usize)) {
                Some(cached) => {
                    if *cached == Change::Unknown {
                        *cached = cmp.compare(old_row, new_row);
                    }
                    *cached
                }
                None => cmp.compare(old_row, new_row),
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
