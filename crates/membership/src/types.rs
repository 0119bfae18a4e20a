//! The public data types: members, events, transmits, counters, errors.

use std::net::SocketAddr;
use std::sync::Arc;

/// This node's identity and initial state, given to [`Membership::new`].
///
/// [`Membership::new`]: crate::Membership::new
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalNode {
    /// Unique name of the node in the cluster (1 to `max_name_len` bytes).
    pub name: String,
    /// The process start time (for example nanoseconds since the Unix epoch).
    /// A restarted process has a higher generation and supersedes the old.
    pub generation: u64,
    /// The address other members reach this node at.
    pub addr: SocketAddr,
    /// Whether the node is ready to own datums.
    pub ready: bool,
    /// User metadata, at most `max_metadata_len` bytes.
    pub metadata: Vec<u8>,
}

/// What this node believes about a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// A probe failed; it is declared dead unless it refutes in time. Still
    /// part of the live view.
    Suspect,
    /// Declared failed.
    Dead,
    /// Left gracefully.
    Left,
}

impl MemberState {
    /// Alive or suspect: part of the live view.
    pub fn is_live(self) -> bool {
        matches!(self, MemberState::Alive | MemberState::Suspect)
    }
}

/// One member as this node knows it.
///
/// Cloning is cheap: the name and metadata are reference counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Unique name.
    pub name: Arc<str>,
    /// Process start time: a higher generation is a restarted process that
    /// supersedes the older one.
    pub generation: u64,
    /// Address to reach it.
    pub addr: SocketAddr,
    /// Incarnation number: raised by the member itself to refute a suspicion
    /// or to announce a change of its ready flag or metadata.
    pub incarnation: u64,
    /// Alive, suspect, dead or left.
    pub state: MemberState,
    /// Ready to own datums.
    pub ready: bool,
    /// User metadata (at most `max_metadata_len` bytes).
    pub metadata: Arc<[u8]>,
}

/// A packet to send, polled from [`Membership::poll_transmit`].
///
/// [`Membership::poll_transmit`]: crate::Membership::poll_transmit
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub to: SocketAddr,
    /// `true` for a reliable transmit (push-pull state, joins, the fallback
    /// ping): send it on a stream, it may be up to `max_state_size` bytes.
    /// `false`: an unreliable datagram of at most `max_packet_size` bytes.
    pub reliable: bool,
    /// The encoded packet; hand it to the receiver's `handle_packet`.
    pub payload: Vec<u8>,
}

/// Name and generation (plus address) of one claimant in a name conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimant {
    /// Process start time.
    pub generation: u64,
    /// Address the claimant announced.
    pub addr: SocketAddr,
}

/// What happened, polled from [`Membership::poll_event`].
///
/// Individual events come first, in order; `ViewChanged` is coalesced (at
/// most one pending) and carries the newest view when it is polled.
///
/// [`Membership::poll_event`]: crate::Membership::poll_event
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A member appeared: never seen, back after leaving, or a new generation
    /// of a known name.
    Joined(Member),
    /// A live member's ready flag or metadata changed (including this node's).
    Updated(Member),
    /// A member is suspected of having failed.
    Suspected(Member),
    /// A suspect or dead member refuted and is alive again.
    Alive(Member),
    /// A member was declared failed, or was superseded by a new generation of
    /// the same name while it still looked alive.
    Failed(Member),
    /// A member left gracefully (this node too, after [`leave`]).
    ///
    /// [`leave`]: crate::Membership::leave
    Left(Member),
    /// Two live processes claimed the same name. The winner is the higher
    /// generation, then the higher address; every member resolves it the same
    /// way. When `local_lost` is true this node is the loser: it stops
    /// announcing itself and a [`Event::DeclaredFailed`] follows.
    NameConflict {
        /// The disputed name.
        name: Arc<str>,
        /// The claimant that keeps the name.
        winner: Claimant,
        /// The claimant that lost it.
        loser: Claimant,
        /// Whether this node lost.
        local_lost: bool,
    },
    /// The live members (alive and suspect, this node included while it is
    /// live) after a join, failure, leave, or a change of ready flag or
    /// metadata. Coalesced: at most one is pending, and it carries the view
    /// at the moment it is polled.
    ViewChanged(Vec<Member>),
    /// This node learned of a death verdict about it that it cannot answer
    /// by refutation (one at its current incarnation, or one its author
    /// acted on before reviving it), or gave its name to another process.
    /// Layers above must stop acting as an owner at once (self-fencing).
    /// Membership itself refutes, as SWIM does, unless the name was lost. A
    /// verdict about an older, already refuted incarnation is answered by
    /// refutation and does not fence.
    DeclaredFailed,
    /// This node's lease flipped: it may act as an owner again, or may no
    /// longer (`Standing` says why). Emitted on a change of validity only,
    /// not when a valid lease is merely extended; read
    /// [`Membership::standing`](crate::Membership::standing) for the current
    /// expiry.
    StandingChanged(crate::Standing),
}

/// Counters; read them with [`Membership::stats`].
///
/// [`Membership::stats`]: crate::Membership::stats
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets handled (valid or not).
    pub packets_in: u64,
    /// Bytes handled.
    pub bytes_in: u64,
    /// Unreliable packets queued for sending.
    pub packets_out: u64,
    /// Bytes of unreliable packets queued.
    pub bytes_out: u64,
    /// Reliable transmits queued.
    pub reliable_out: u64,
    /// Bytes of reliable transmits queued.
    pub reliable_bytes_out: u64,
    /// Packets rejected as malformed, oversized or of another version.
    pub decode_errors: u64,
    /// Messages applied from valid packets.
    pub messages_in: u64,
    /// Probes started.
    pub probes: u64,
    /// Probes that ended without an ack (the target became suspect).
    pub probes_failed: u64,
    /// Indirect probe requests sent.
    pub indirect_probes: u64,
    /// Nacks received from relays.
    pub nacks_received: u64,
    /// Indirect probes relayed for other members.
    pub relays: u64,
    /// Relay requests dropped because `max_relays` were in flight.
    pub relays_dropped: u64,
    /// Acks that matched no probe or relay (late or duplicated).
    pub stray_acks: u64,
    /// Suspicions started (by this node or learned).
    pub suspicions: u64,
    /// Members this node marked dead.
    pub failures: u64,
    /// Suspicions about this node that it refuted.
    pub refutations: u64,
    /// Refutations sent straight to an accuser (besides gossip).
    pub direct_refutations: u64,
    /// Accusations about another member at an incarnation it already
    /// refuted, answered with its newer `Alive` straight to the accuser
    /// (whose refutation may not reach it directly).
    pub stale_accusations_answered: u64,
    /// Last-chance pings to a suspect whose suspicion expired unconfirmed.
    pub suspicion_checks: u64,
    /// Push-pulls started because a dead member answered a ping (healed
    /// partitions).
    pub reconnects: u64,
    /// Acks that asked the pinger for its `Alive` (it was unknown or newer).
    pub alive_requests: u64,
    /// Push-pulls sent to a seed that was not a live member (clusters that
    /// formed apart merge this way).
    pub seed_push_pulls: u64,
    /// Times this node learned it had been declared failed.
    pub declared_failed: u64,
    /// Name conflicts seen.
    pub name_conflicts: u64,
    /// Updates that were stale or otherwise ignored.
    pub ignored_updates: u64,
    /// Updates queued for piggybacking.
    pub broadcasts_queued: u64,
    /// Gossip packets sent.
    pub gossip_packets: u64,
    /// Push-pull exchanges started by this node (joins included).
    pub push_pulls: u64,
    /// Push-pull states received.
    pub push_pulls_received: u64,
    /// Push-pull states truncated to `max_state_size`.
    pub states_truncated: u64,
    /// Members forgotten after `reap_after`.
    pub reaped: u64,
    /// Transmits dropped because the queue was full.
    pub transmits_dropped: u64,
    /// Events dropped because the queue was full.
    pub events_dropped: u64,
    /// Times this node's lease lapsed (valid to not valid).
    pub standing_lost: u64,
    /// Pings sent to witnesses (strategy `Witnesses`; their bytes are in
    /// `packets_out` and `bytes_out` like any ping's).
    pub witness_pings: u64,
    /// First-hand claims whose authenticated sender is another node, or
    /// claims about this node that only it can make, refused: a ping or
    /// push-pull whose sender field is not the sender, an acted-on notice
    /// not sent by its author, another generation or address of this node
    /// announced by someone else.
    pub forged_claims: u64,
    /// Third-party messages refused for an incarnation too far above the one
    /// known (more than a refutation could plausibly have reached), or at
    /// the acted-on notice's incarnation.
    pub incarnations_refused: u64,
    /// Acks and nacks refused: not from the probe's target nor from a relay
    /// that was asked (or not from the member a ping went to).
    pub acks_refused: u64,
    /// Indirect probe requests refused: the requester is not a live member
    /// under its authenticated name, or the target is not a live member at
    /// that generation and address.
    pub relays_refused: u64,
    /// New members refused because `max_members` were known.
    pub members_refused: u64,
    /// Third-party claims that only the member itself may make (a new
    /// member, a new generation or address, a leave) checked by asking the
    /// member, at the claimed address, for its own `Alive` (an
    /// `AliveRequest`); the claim itself is not applied.
    pub claims_checked: u64,
    /// Such checks not sent because too many were in flight.
    pub claim_checks_dropped: u64,
    /// Third-party down states (dead, left) about members not known here,
    /// ignored: a tombstone is recorded only from the member or a check.
    pub unknown_down_refused: u64,
}

/// Errors returned to the caller of [`Membership`](crate::Membership).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The configuration is unusable.
    #[error("invalid membership configuration: {0}")]
    InvalidConfig(&'static str),
    /// The node name is empty or longer than `max_name_len`.
    #[error("invalid node name: {len} bytes (must be 1 to {max})")]
    InvalidName {
        /// Length given.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// Metadata longer than `max_metadata_len`; nothing was changed.
    #[error("metadata too large: {len} bytes, the limit is {max}")]
    MetadataTooLarge {
        /// Length given.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
}

/// Why a packet was rejected by [`Membership::handle_packet`]. The packet is
/// dropped whole, counted in [`Stats::decode_errors`], and changes nothing.
///
/// [`Membership::handle_packet`]: crate::Membership::handle_packet
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Zero bytes.
    #[error("empty packet")]
    Empty,
    /// Larger than `max_state_size`.
    #[error("packet of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Length received.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Another protocol version.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// A message did not decode.
    #[error("malformed message {index}: {source}")]
    Malformed {
        /// Position of the message in the packet.
        index: usize,
        /// What postcard reported.
        #[source]
        source: postcard::Error,
    },
    /// A name that is empty or longer than `max_name_len`.
    #[error("message {index} carries a name of {len} bytes")]
    BadName {
        /// Position of the message in the packet.
        index: usize,
        /// Length received.
        len: usize,
    },
    /// Metadata longer than `max_metadata_len`.
    #[error("message {index} carries {len} bytes of metadata")]
    MetadataTooLarge {
        /// Position of the message in the packet.
        index: usize,
        /// Length received.
        len: usize,
    },
    /// A header with no message after it, or push-pull states outside a
    /// push-pull.
    #[error("message {index} is out of place")]
    Unexpected {
        /// Position of the message in the packet.
        index: usize,
    },
    /// More messages than a packet may carry: 256 besides push-pull
    /// states, and at most `max_members` states.
    #[error("message {index} is over the limit of {max} messages of its kind")]
    TooManyMessages {
        /// Position of the first message over the limit.
        index: usize,
        /// The limit.
        max: usize,
    },
}
