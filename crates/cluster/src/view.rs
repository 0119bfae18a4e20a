//! What the application reads: members, the view, snapshots, reports.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use shoal_membership::{Member, MemberState};
use shoal_placement::{NodeId, PlacementTable, View, ViewId};

/// One node as this node knows it (the seed's `Node`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Unique name.
    pub name: Arc<str>,
    /// Generation: the process start time, nanoseconds since the Unix epoch.
    /// A restarted node has a higher one.
    pub generation: u64,
    /// Address it is reached at.
    pub addr: SocketAddr,
    /// Alive, suspect, dead or left.
    pub state: MemberState,
    /// Ready to own datums.
    pub ready: bool,
    /// User metadata.
    pub metadata: Arc<[u8]>,
}

impl NodeInfo {
    pub(crate) fn from_member(m: &Member) -> NodeInfo {
        NodeInfo {
            name: Arc::clone(&m.name),
            generation: m.generation,
            addr: m.addr,
            state: m.state,
            ready: m.ready,
            metadata: Arc::clone(&m.metadata),
        }
    }

    /// The process start time.
    pub fn start_time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.generation)
    }

    /// Identity for placement: name and generation.
    pub fn id(&self) -> NodeId {
        NodeId::new(&*self.name, self.generation)
    }
}

/// The cluster as this node sees it; a new one is published on every change
/// (through [`Node::changes`](crate::Node::changes)). Cheap to share
/// (`Arc`); reading it never waits for the node's driver.
#[derive(Clone, Debug)]
pub struct ClusterView {
    /// This node.
    pub local: NodeInfo,
    /// Live members (alive or suspect, ready or not), this node included
    /// while it is live, sorted by name.
    pub members: Vec<NodeInfo>,
    /// The ready members in placement order (oldest generation first, ties
    /// by name): the seed's `SortedNodes`.
    pub ready: View,
    /// The placement table in force (installed by the last transition):
    /// owner lookups are O(1) and allocation-free.
    pub placement: Arc<PlacementTable>,
    /// Bumped on every change of this view.
    pub version: u64,
    /// Whether the cluster declared this node failed (it processes nothing).
    pub fenced: bool,
    /// Whether this node may act as an owner now: its ownership lease is
    /// valid (fresh contact with the cluster and, by default, a majority of
    /// it in sight; `docs/partitions.md`). While it is not, work for the
    /// datums it holds waits and nothing is acquired.
    pub standing: bool,
    /// Whether the cluster is settled as this node can tell: every live
    /// member (and every node of the recent views) said done with the view
    /// in force here, this node too, and nothing is in flight here. It
    /// comes from the handoff's done markers, which every member sends to
    /// every other after each transition, so no extra traffic. Watch it
    /// with [`Node::changes`](crate::Node::changes) or wait for it with
    /// [`Node::wait_settled`](crate::Node::wait_settled).
    pub settled: bool,
}

impl ClusterView {
    /// The owners of datum `id` (primary first) in the table in force.
    pub fn owners(&self, id: i64) -> impl Iterator<Item = &NodeId> {
        self.placement.owner_ids(id)
    }

    /// The primary owner of datum `id`.
    pub fn primary(&self, id: i64) -> Option<&NodeId> {
        self.placement
            .primary(id)
            .and_then(|i| self.placement.view().node(i))
    }

    /// A live member by name.
    pub fn member(&self, name: &str) -> Option<&NodeInfo> {
        self.members
            .binary_search_by(|m| (*m.name).cmp(name))
            .ok()
            .and_then(|i| self.members.get(i))
    }

    /// The id of the placement view in force.
    pub fn view_id(&self) -> ViewId {
        self.placement.view_id()
    }
}

/// Progress and outcome of a transition (counts since it started).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransitionReport {
    /// The view the transition was for.
    pub view: Option<ViewId>,
    /// Whether nothing is in flight any more.
    pub completed: bool,
    /// Datums this node relinquished.
    pub relinquished: u64,
    /// Datums this node acquired.
    pub acquired: u64,
    /// Of those, acquired without a notice (timeout, old owner gone, or every
    /// live member done with the view while the notice went to a skipped one).
    pub acquired_without_notice: u64,
    /// Relinquish attempts that failed.
    pub relinquish_failures: u64,
    /// Acquire attempts that failed.
    pub acquire_failures: u64,
    /// Datums whose relinquish was abandoned at the timeout.
    pub relinquish_abandoned: u64,
    /// Datums still in flight on this node.
    pub in_flight: usize,
    /// Some of the datums this node still waits for (type, id), at most 64.
    pub awaiting: Vec<(String, i64)>,
}

/// A point-in-time picture of a node, printable as a table (`Display`).
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// This node.
    pub local: NodeInfo,
    /// Every member known, any state.
    pub members: Vec<NodeInfo>,
    /// The placement view in force.
    pub view: ViewId,
    /// Datums registered here.
    pub registered: usize,
    /// Datums owned (acquired) here.
    pub owned: usize,
    /// Handoffs in flight here (relinquishing, awaited, acquiring, notices
    /// not delivered).
    pub in_flight: usize,
    /// Pieces of work held for datums in flight.
    pub held_work: usize,
    /// Whether this node is fenced.
    pub fenced: bool,
    /// The handoff layer's counters.
    pub transition: shoal_transition::Counters,
    /// The membership layer's counters.
    pub membership: shoal_membership::Stats,
    /// The transport's counters.
    pub transport: shoal_transport::StatsSnapshot,
    /// The facade's own counters.
    pub facade: FacadeCounters,
}

/// Counters of the facade itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FacadeCounters {
    /// Messages for datum owners delivered to a local channel.
    pub routed_delivered: u64,
    /// Messages for datum owners sent on to another node.
    pub routed_forwarded: u64,
    /// Messages for datum owners held during a handoff.
    pub routed_held: u64,
    /// Messages for datum owners dropped on this node, all reasons
    /// (the sum of [`FacadeCounters::drops`]).
    pub routed_dropped: u64,
    /// The same drops, by reason.
    pub drops: RoutedDrops,
    /// Messages for datum owners this node refused because it was leaving
    /// (handed back to the node that sent them, which routes them again).
    pub routed_refused: u64,
    /// Refused messages that came back to this node and were routed again.
    pub routed_rerouted: u64,
    /// Membership datagrams dropped because a peer queue was full.
    pub datagrams_dropped: u64,
    /// Packets from peers that did not decode (membership, notices, routed).
    pub malformed: u64,
    /// Relinquish and acquire jobs started.
    pub jobs_started: u64,
    /// Relinquish and acquire callbacks (and datum factories) that
    /// panicked. The panic is caught: the job fails as if the callback had
    /// returned an error (a relinquish is retried, an acquire reported as
    /// failed), and the driver goes on.
    pub callback_panics: u64,
    /// Routed messages whose stated origin did not fit their authenticated
    /// sender (a first hop from another node than its origin, or a forward
    /// from a node that is no member, nor one that left in the last
    /// minute): delivered and routed with the sender as their origin, so
    /// the application's `from` is never a name the sender made up.
    pub routed_origin_replaced: u64,
    /// Messages from peers that found their user channel's receive queue
    /// full (`limits.channel_queue`), or others of that channel waiting
    /// already: the channel's reader is not keeping up, or stuck. They wait
    /// apart, in order, holding their bytes in their senders' shares of
    /// the inbound budget, while other channels go on; logged at warn with
    /// the channel and the peer, at most every 10 s per channel. Also
    /// `shoal_channel_full_total{channel}`.
    pub channel_full: u64,
}

/// Messages for datum owners dropped on this node, by reason. Each is also
/// counted in `shoal_routed_dropped_total{reason}` under the field's name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutedDrops {
    /// No ready node owns the datum in the table in force (`no_owner`).
    pub no_owner: u64,
    /// This node is fenced (`fenced`).
    pub fenced: u64,
    /// The hold buffer (`limits.hold_capacity`) was full (`hold_full`).
    pub hold_full: u64,
    /// The handoff refused to hold work it had just routed to the hold
    /// (`not_held`; cannot happen while the driver is the only caller).
    pub not_held: u64,
    /// Parked until the transition timeout without the views agreeing
    /// (`expired`).
    pub expired: u64,
    /// The park buffer (`limits.hold_capacity`) was full (`park_full`).
    pub park_full: u64,
    /// No local receiver for the channel (`unknown_channel`).
    pub unknown_channel: u64,
    /// The receiver of the channel was dropped (`channel_closed`).
    pub channel_closed: u64,
    /// The owner is not a live member here (`unknown_owner`).
    pub unknown_owner: u64,
    /// The link task of the peer had stopped (`link_closed`).
    pub link_closed: u64,
    /// The transport failed to send it to the owner (`send_failed`): the
    /// peer is gone or unreachable.
    pub send_failed: u64,
    /// Held work handed back by the handoff layer, because its datum was
    /// unregistered or this node fenced (`returned`).
    pub returned: u64,
    /// Undecodable (`malformed`).
    pub malformed: u64,
    /// A leaving node's acknowledged forward got no answer (`forward_failed`):
    /// the owner may or may not have taken it, so it is not sent again.
    pub forward_failed: u64,
    /// A leaving node could not hand a refused message back to its sender
    /// (`refusal_failed`).
    pub refusal_failed: u64,
    /// Still held, parked or queued when a leaving node's deadline passed
    /// (`leave_timeout`).
    pub leave_timeout: u64,
    /// Still held, parked or queued when the node was shut down without
    /// leaving (`shutdown`).
    pub shutdown: u64,
}

impl RoutedDrops {
    /// The total over every reason.
    pub fn total(&self) -> u64 {
        self.fields().iter().map(|(_, v)| v).sum()
    }

    /// `(reason, count)` for every reason, for export.
    pub fn fields(&self) -> [(&'static str, u64); 17] {
        [
            ("no_owner", self.no_owner),
            ("fenced", self.fenced),
            ("hold_full", self.hold_full),
            ("not_held", self.not_held),
            ("expired", self.expired),
            ("park_full", self.park_full),
            ("unknown_channel", self.unknown_channel),
            ("channel_closed", self.channel_closed),
            ("unknown_owner", self.unknown_owner),
            ("link_closed", self.link_closed),
            ("send_failed", self.send_failed),
            ("returned", self.returned),
            ("malformed", self.malformed),
            ("forward_failed", self.forward_failed),
            ("refusal_failed", self.refusal_failed),
            ("leave_timeout", self.leave_timeout),
            ("shutdown", self.shutdown),
        ]
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "node {} (generation {}) at {}{}",
            self.local.name,
            self.local.generation,
            self.local.addr,
            if self.fenced { " FENCED" } else { "" }
        )?;
        writeln!(
            f,
            "view {}  registered {}  owned {}  in flight {}  held work {}",
            self.view, self.registered, self.owned, self.in_flight, self.held_work
        )?;
        writeln!(
            f,
            "{:<24} {:<8} {:<6} {:<22} {:>20} {:>6}",
            "member", "state", "ready", "address", "generation", "meta"
        )?;
        for m in &self.members {
            writeln!(
                f,
                "{:<24} {:<8} {:<6} {:<22} {:>20} {:>6}",
                m.name,
                format!("{:?}", m.state).to_lowercase(),
                if m.ready { "yes" } else { "no" },
                m.addr.to_string(),
                m.generation,
                m.metadata.len()
            )?;
        }
        let t = &self.transition;
        writeln!(
            f,
            "handoff: relinquished {} acquired {} (without notice {}) notices sent {} accepted {} stale {}",
            t.relinquished,
            t.acquired,
            t.acquired_after_timeout + t.acquired_owner_gone + t.acquired_all_done,
            t.notices_sent,
            t.notices_accepted,
            t.notices_stale
        )?;
        let c = &self.facade;
        write!(
            f,
            "routed: delivered {} forwarded {} held {} refused {} rerouted {} dropped {}",
            c.routed_delivered,
            c.routed_forwarded,
            c.routed_held,
            c.routed_refused,
            c.routed_rerouted,
            c.routed_dropped
        )?;
        for (reason, n) in c.drops.fields() {
            if n > 0 {
                write!(f, " {reason} {n}")?;
            }
        }
        write!(f, "; malformed packets {}", c.malformed)
    }
}
