//! Node identities and the membership view placement is computed from.

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::hash::{FNV_OFFSET, fnv1a64, mix64};

/// Identity of a node: name plus generation (process start time, ns since the
/// Unix epoch). A restarted node has a new generation and is a different node.
///
/// The derived `Ord` compares by name, then generation; the placement order is
/// different (see [`NodeId::placement_cmp`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId {
    /// The node's name, unique among the live members of a cluster.
    pub name: String,
    /// Process start time in nanoseconds since the Unix epoch.
    pub generation: u64,
}

impl NodeId {
    /// A node id from its parts.
    pub fn new(name: impl Into<String>, generation: u64) -> NodeId {
        NodeId {
            name: name.into(),
            generation,
        }
    }

    /// The placement order: oldest generation first, ties by name (byte-wise).
    /// The seed compared start times as decimal strings; this compares them
    /// as numbers.
    #[must_use]
    pub fn placement_cmp(&self, other: &NodeId) -> Ordering {
        self.generation
            .cmp(&other.generation)
            .then_with(|| self.name.cmp(&other.name))
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.generation)
    }
}

/// One member as membership reports it (input to placement).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewMember {
    /// Who it is.
    pub id: NodeId,
    /// Whether it takes part in placement (the seed's ready flag).
    pub ready: bool,
}

impl ViewMember {
    /// A member from its parts.
    pub fn new(name: impl Into<String>, generation: u64, ready: bool) -> ViewMember {
        ViewMember {
            id: NodeId::new(name, generation),
            ready,
        }
    }
}

/// Stable id of the set of ready members: the same set gives the same id on
/// every node, whatever order the members were seen in, on every platform and
/// Rust version.
///
/// It is `mix64(fnv1a64(encoding))` where the encoding is, over the placement
/// list: the number of nodes as `u64` little-endian, then for each node its
/// generation (`u64` LE), the length of its name in bytes (`u64` LE) and the
/// name's UTF-8 bytes. See [`crate::hash`] for the two functions.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ViewId(pub u64);

impl fmt::Display for ViewId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Index of a node in a [`View`]'s placement list (valid only for that view).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeIndex(pub u32);

impl NodeIndex {
    /// The index as a `usize`, for indexing the view's node list.
    #[inline]
    #[must_use]
    pub const fn get(self) -> usize {
        self.0 as usize
    }
}

/// The placement list: the ready members sorted by (generation, name), as the
/// seed orders them, plus the view's stable [`ViewId`].
///
/// Building a view:
/// 1. when several members share a name, the one with the newest generation
///    wins (an older generation is a process that has since restarted), and
///    if the same (name, generation) is reported twice it is ready only if
///    every report says so;
/// 2. then only ready members are kept;
/// 3. they are sorted oldest generation first, ties by name.
///
/// The result does not depend on the order of the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// Ready nodes in placement order.
    nodes: Vec<NodeId>,
    /// Indices into `nodes`, sorted by name (for `index_of`).
    by_name: Vec<u32>,
    id: ViewId,
}

impl Default for View {
    fn default() -> View {
        View::new(std::iter::empty())
    }
}

impl View {
    /// The view of `members`: keeps only ready ones; duplicate names: newest
    /// generation wins (see the type's documentation for the exact rules).
    pub fn new(members: impl IntoIterator<Item = ViewMember>) -> View {
        let mut members: Vec<ViewMember> = members.into_iter().collect();
        // Name ascending, newest generation first, not-ready before ready, so
        // the first entry of each name is the one that counts.
        members.sort_unstable_by(|a, b| {
            a.id.name
                .cmp(&b.id.name)
                .then_with(|| b.id.generation.cmp(&a.id.generation))
                .then_with(|| a.ready.cmp(&b.ready))
        });
        members.dedup_by(|later, first| later.id.name == first.id.name);
        let nodes = members
            .into_iter()
            .filter(|m| m.ready)
            .map(|m| m.id)
            .collect();
        View::from_unique_ready(nodes)
    }

    /// The view whose ready nodes are `nodes` (all taken as ready; duplicate
    /// names: newest generation wins).
    pub fn from_nodes(nodes: impl IntoIterator<Item = NodeId>) -> View {
        View::new(nodes.into_iter().map(|id| ViewMember { id, ready: true }))
    }

    /// `nodes` have distinct names.
    fn from_unique_ready(mut nodes: Vec<NodeId>) -> View {
        nodes.sort_unstable_by(NodeId::placement_cmp);
        let mut by_name: Vec<u32> = (0..nodes.len())
            .map(|i| u32::try_from(i).unwrap_or(u32::MAX))
            .collect();
        by_name.sort_unstable_by(|&a, &b| name_at(&nodes, a).cmp(name_at(&nodes, b)));
        let id = view_id(&nodes);
        View { nodes, by_name, id }
    }

    /// The view's stable id.
    #[must_use]
    pub fn id(&self) -> ViewId {
        self.id
    }

    /// The ready nodes in placement order: oldest generation first, ties by
    /// name. A node's position is its [`NodeIndex`].
    #[must_use]
    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    /// Number of ready nodes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is ready.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Index of the ready node called `name` (O(log n)).
    #[must_use]
    pub fn index_of(&self, name: &str) -> Option<NodeIndex> {
        let pos = self
            .by_name
            .binary_search_by(|&i| name_at(&self.nodes, i).cmp(name))
            .ok()?;
        self.by_name.get(pos).copied().map(NodeIndex)
    }

    /// Index of exactly this node (name and generation), if it is in the view.
    #[must_use]
    pub fn index_of_id(&self, id: &NodeId) -> Option<NodeIndex> {
        self.index_of(&id.name)
            .filter(|&i| self.node(i).is_some_and(|n| n.generation == id.generation))
    }

    /// Whether exactly this node (name and generation) is in the view.
    #[must_use]
    pub fn contains(&self, id: &NodeId) -> bool {
        self.index_of_id(id).is_some()
    }

    /// The node at `index`, if the index is valid for this view.
    #[must_use]
    pub fn node(&self, index: NodeIndex) -> Option<&NodeId> {
        self.nodes.get(index.get())
    }

    /// For each node, its position in name order (used for tie-breaks that
    /// must not depend on which other nodes are in the view).
    pub(crate) fn name_ranks(&self) -> Vec<u32> {
        let mut ranks = vec![0u32; self.nodes.len()];
        for (rank, &i) in self.by_name.iter().enumerate() {
            if let Some(slot) = ranks.get_mut(i as usize) {
                *slot = u32::try_from(rank).unwrap_or(u32::MAX);
            }
        }
        ranks
    }
}

fn name_at(nodes: &[NodeId], i: u32) -> &str {
    nodes.get(i as usize).map_or("", |n| n.name.as_str())
}

fn view_id(nodes: &[NodeId]) -> ViewId {
    let mut h = fnv1a64(FNV_OFFSET, &(nodes.len() as u64).to_le_bytes());
    for node in nodes {
        h = fnv1a64(h, &node.generation.to_le_bytes());
        h = fnv1a64(h, &(node.name.len() as u64).to_le_bytes());
        h = fnv1a64(h, node.name.as_bytes());
    }
    ViewId(mix64(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, generation: u64, ready: bool) -> ViewMember {
        ViewMember::new(name, generation, ready)
    }

    #[test]
    fn orders_by_generation_numerically_then_name() {
        // As strings "9" > "10"; numerically 9 < 10.
        let view = View::new([m("b", 10, true), m("a", 10, true), m("c", 9, true)]);
        let names: Vec<&str> = view.nodes().iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["c", "a", "b"]);
        assert_eq!(view.index_of("a"), Some(NodeIndex(1)));
        assert_eq!(view.index_of("c"), Some(NodeIndex(0)));
        assert_eq!(view.index_of("z"), None);
        assert_eq!(view.node(NodeIndex(2)).map(|n| n.name.as_str()), Some("b"));
        assert_eq!(view.node(NodeIndex(3)), None);
    }

    #[test]
    fn keeps_only_ready_and_newest_generation() {
        let view = View::new([
            m("a", 1, true),
            m("a", 5, true),
            m("b", 2, false),
            m("c", 3, true),
            // The newest generation of d is not ready: the older one does not count.
            m("d", 1, true),
            m("d", 2, false),
            // Same identity reported twice with different flags: not ready.
            m("e", 4, true),
            m("e", 4, false),
        ]);
        assert_eq!(view.nodes(), &[NodeId::new("c", 3), NodeId::new("a", 5)]);
        assert!(view.contains(&NodeId::new("a", 5)));
        assert!(!view.contains(&NodeId::new("a", 1)));
        assert_eq!(view.index_of_id(&NodeId::new("a", 1)), None);
        assert_eq!(view.len(), 2);
    }

    #[test]
    fn view_id_ignores_input_order_and_not_ready_members() {
        let a = View::new([m("x", 1, true), m("y", 2, true), m("z", 3, false)]);
        let b = View::new([m("y", 2, true), m("q", 9, false), m("x", 1, true)]);
        assert_eq!(a.id(), b.id());
        assert_eq!(a, b);
        let c = View::new([m("x", 1, true), m("y", 3, true)]);
        assert_ne!(a.id(), c.id());
        let d = View::new([m("x", 1, true)]);
        assert_ne!(a.id(), d.id());
    }

    #[test]
    fn view_id_is_pinned() {
        // Must never change: nodes of different builds compare view ids.
        assert_eq!(View::default().id(), ViewId(0x813f_0174_a236_7c13));
        let v = View::from_nodes([NodeId::new("node-1", 1_700_000_000_000_000_000)]);
        assert_eq!(v.id(), ViewId(0x95cd_5972_a79a_7dfa));
    }

    #[test]
    fn view_id_separates_name_boundaries() {
        let a = View::from_nodes([NodeId::new("ab", 1), NodeId::new("c", 1)]);
        let b = View::from_nodes([NodeId::new("a", 1), NodeId::new("bc", 1)]);
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn empty_view() {
        let v = View::new([m("a", 1, false)]);
        assert!(v.is_empty());
        assert_eq!(v.len(), 0);
        assert_eq!(v.index_of("a"), None);
        assert_eq!(v.id(), View::default().id());
    }

    #[test]
    fn name_ranks_follow_name_order() {
        let v = View::from_nodes([
            NodeId::new("b", 1),
            NodeId::new("a", 2),
            NodeId::new("c", 0),
        ]);
        // Placement order: c, b, a. Name ranks: a=0, b=1, c=2.
        assert_eq!(v.name_ranks(), vec![2, 1, 0]);
    }

    #[test]
    fn serde_round_trip() {
        let id = NodeId::new("n", 42);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, r#"{"name":"n","generation":42}"#);
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), id);
        let vid = ViewId(7);
        assert_eq!(
            serde_json::from_str::<ViewId>(&serde_json::to_string(&vid).unwrap()).unwrap(),
            vid
        );
    }
}
