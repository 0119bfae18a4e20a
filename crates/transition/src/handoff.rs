//! The per-node handoff state machine. See the crate docs and
//! `docs/transition.md` for the protocol; this file is its implementation.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_placement::{NodeId, NodeIndex, PlacementTable, ViewId};
use tracing::{debug, info, warn};

use crate::datum::{DetState, TypeRegistry};
use crate::error::{ConfigError, HoldError, HoldErrorKind, NoticeError, RegistryError};
use crate::types::{
    Config, Counters, DatumState, Event, FencingToken, Job, JobKind, JobReason, NoticeReport,
    Progress, Release, ReleaseTo, ReturnReason, Role, Route, SendId, Transmit, WithoutNotice,
};
use crate::wire::{NoticeBatch, NoticeGroup};
use crate::{Datum, DatumType};

/// The echo of a done marker that answers no instance of the receiver (see
/// [`Handoff::push_state`]). Install counts never reach it.
const FAREWELL: u64 = u64::MAX;

/// Where one registered datum stands on this node.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// Not held here, nothing pending.
    Free = 0,
    /// Acquired here: work is processed here.
    Held,
    /// Held, waiting for a relinquish job slot.
    RelinquishQueued,
    /// Relinquish job handed to the application.
    Relinquishing,
    /// Relinquish failed; waiting to retry.
    RelinquishBackoff,
    /// Primary here; waiting for the notice (the "token").
    Awaiting,
    /// Was primary and waiting, is not primary any more: passes the notice
    /// on if it arrives here. Passive: does not keep a transition running.
    Relay,
    /// Have the token, primary here; waiting for an acquire job slot.
    AcquireQueued,
    /// Acquire job handed to the application.
    Acquiring,
    /// Acquire failed; waiting to retry.
    AcquireBackoff,
    /// Relinquished; the notice's send failed, waiting to retry.
    TokenWait,
    /// Relinquished; notice in the outgoing buffer.
    TokenQueued,
    /// Relinquished; no node owns the datum in the current view.
    TokenParked,
    /// Relinquished; notice handed out for sending, outcome not known yet.
    Passed,
}

const PHASES: usize = 14;

impl Phase {
    fn state(self) -> DatumState {
        use Phase::*;
        match self {
            Free => DatumState::Free,
            Held => DatumState::Held,
            RelinquishQueued | Relinquishing | RelinquishBackoff => DatumState::Relinquishing,
            Awaiting => DatumState::Awaiting,
            Relay => DatumState::Relaying,
            AcquireQueued | Acquiring | AcquireBackoff => DatumState::Acquiring,
            TokenWait | TokenQueued | Passed => DatumState::NoticePending,
            TokenParked => DatumState::Unowned,
        }
    }
}

/// How far ahead of every epoch it knew a batch's epoch may be (2^32
/// installs). Epochs grow by one per install plus what is heard, so honest
/// nodes never come near it; a batch beyond it is refused, or a single
/// faulty peer could push every node's fencing tokens to the end of `u64`.
pub const MAX_EPOCH_JUMP: u64 = 1 << 32;

#[derive(Copy, Clone, Debug)]
struct Slot {
    /// Cohort (see [`Cohort`]) whose deadlines apply to the current flight.
    flight: u64,
    /// For a wait: the epoch (cohort id) at which it began. A notice for a
    /// past view counts only if that view was still in force after this.
    since: u64,
    phase: Phase,
    /// Attempts so far of the current job or send.
    attempt: u8,
    /// The fencing token of the ownership that the last acquire job started
    /// (meaningful while held, relinquishing or acquiring).
    token: u64,
    /// How the token of the queued or running acquire reached this node
    /// (fits the slot's padding).
    reason: JobReason,
}

/// All registered datums with their phase, and how many are in each phase.
#[derive(Default)]
struct Registry {
    map: HashMap<Datum, Slot, DetState>,
    counts: [usize; PHASES],
}

impl Registry {
    #[inline]
    fn get(&self, d: &Datum) -> Option<Slot> {
        self.map.get(d).copied()
    }

    #[inline]
    fn set(&mut self, d: Datum, slot: Slot) {
        if let Some(s) = self.map.get_mut(&d) {
            if let Some(c) = self.counts.get_mut(s.phase as usize) {
                *c = c.saturating_sub(1);
            }
            if let Some(c) = self.counts.get_mut(slot.phase as usize) {
                *c += 1;
            }
            *s = slot;
        }
    }

    /// Reads and changes a slot with one lookup; keeps the counts right.
    #[inline]
    fn modify<R>(&mut self, d: &Datum, f: impl FnOnce(&mut Slot) -> R) -> Option<R> {
        let s = self.map.get_mut(d)?;
        let before = s.phase;
        let r = f(s);
        if s.phase != before {
            if let Some(c) = self.counts.get_mut(before as usize) {
                *c = c.saturating_sub(1);
            }
            if let Some(c) = self.counts.get_mut(s.phase as usize) {
                *c += 1;
            }
        }
        Some(r)
    }

    fn insert(&mut self, d: Datum) -> bool {
        if self.map.contains_key(&d) {
            return false;
        }
        let slot = Slot {
            flight: 0,
            since: 0,
            phase: Phase::Free,
            attempt: 0,
            token: 0,
            reason: JobReason::First,
        };
        self.map.insert(d, slot);
        self.counts[Phase::Free as usize] += 1;
        true
    }

    fn remove(&mut self, d: &Datum) -> Option<Slot> {
        let s = self.map.remove(d)?;
        if let Some(c) = self.counts.get_mut(s.phase as usize) {
            *c = c.saturating_sub(1);
        }
        Some(s)
    }

    /// Orders datums as their slots lie in memory, so a batch of lookups
    /// walks the table instead of jumping around it (deterministic).
    fn sort_for_locality(&self, datums: &mut [Datum]) {
        use std::hash::BuildHasher;
        let buckets = (self.map.capacity() * 8 / 7 + 1).next_power_of_two() as u64;
        let mask = buckets.saturating_sub(1);
        let hasher = self.map.hasher();
        datums.sort_by_cached_key(|d| (hasher.hash_one(d) & mask, *d));
    }

    #[inline]
    fn count(&self, p: Phase) -> usize {
        self.counts.get(p as usize).copied().unwrap_or(0)
    }
}

/// A past view, remembered while it was replaced less than `timeout` ago.
struct PastView {
    table: Arc<PlacementTable>,
    self_index: Option<NodeIndex>,
    left: Instant,
    /// The cohort id of the install that replaced it: a wait whose flight is
    /// at least this never saw this view in force.
    left_epoch: u64,
    /// Per node index: declared failed while a member of the view in force
    /// (eligible for failover).
    failed: Vec<bool>,
}

/// Datums that entered a flight at the same instant: they share deadlines
/// (`start + relinquish_timeout`, `start + timeout`). Cohorts are created in
/// time order, so their deadlines are too: a FIFO, no heap.
struct Cohort {
    id: u64,
    start: Instant,
    datums: Vec<Datum>,
}

#[derive(Default)]
struct OutBuf {
    datums: Vec<Datum>,
    since: Option<Instant>,
}

struct SentBatch {
    datums: Vec<Datum>,
    /// For a state batch (announcement or done marker): the addressee.
    state: Option<NodeId>,
    /// For a notice batch: its addressee, view and epoch. A failed send is
    /// re-sent exactly so, never re-addressed (rule 3).
    notice: Option<Address>,
}

/// Where a notice batch went: addressee, the view it names, the sender's
/// install count (`epoch`) it carries.
#[derive(Clone)]
struct Address {
    to: NodeId,
    view: ViewId,
    epoch: u64,
}

/// Notices whose send failed, to re-send to the same address after a
/// backoff: each datum with the flight it was relinquished (or passed on)
/// in, so a later token of the same datum is never taken for this one.
struct Retry {
    address: Address,
    datums: Vec<(Datum, u64)>,
}

struct Parked {
    first: Instant,
    /// Datum → index in `senders`.
    datums: HashMap<Datum, u32, DetState>,
    /// Who sent them, at which of its install counts (`epoch`).
    senders: Vec<(NodeId, u64)>,
}

/// Who sent a notice, and at which of its install counts.
#[derive(Copy, Clone)]
struct Src<'a> {
    node: &'a NodeId,
    epoch: u64,
    /// `node` hashed (see [`Handoff::sender_key`]), once per batch.
    key: u64,
}

#[derive(Debug)]
enum TimerKind {
    RelinquishRetry {
        datum: Datum,
        flight: u64,
        attempt: u8,
    },
    AcquireRetry {
        datum: Datum,
        flight: u64,
        attempt: u8,
    },
    Resend {
        key: u64,
    },
    ResendState {
        to: NodeId,
        seq: u64,
    },
    /// The relinquish deadline of a datum whose acquire ended after a view
    /// had already given it to another node.
    AbandonRelinquish {
        datum: Datum,
        flight: u64,
    },
    /// A live member outside every view here may have stayed silent for
    /// [`silent_peer_grace`](Handoff::silent_peer_grace): settle the waits
    /// blocked on done markers again.
    SilentPeer,
}

#[derive(Debug)]
struct Timer {
    at: Instant,
    seq: u64,
    kind: TimerKind,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at && self.seq == other.seq
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// How this node came to have a datum's token (the right to acquire it).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Source {
    /// No node could have held it: first owner.
    Fresh,
    /// This node's relinquish succeeded.
    Relinquished,
    /// A relinquish notice arrived.
    Notice,
    /// Every possible holder is gone.
    OwnerGone,
    /// Every live node said done with the view in force: nobody holds it.
    AllDone,
    /// The wait timed out.
    Timeout,
    /// The view changed: route the token again.
    Reroute,
    /// A token this node had not acquired yet, passed on.
    PassOn,
}

enum Candidates {
    /// No other node was primary in a recent view.
    None,
    /// Some were, all declared failed and out of the view in force.
    AllGone,
    /// Some were and are not gone: each says done once it holds nothing the
    /// view in force gives another node (the rest failed and are out).
    AllDone,
    /// One left, or failed while still in the view in force: it may have
    /// relinquished under a view not seen here and its notice be on its way,
    /// and it will not say done. Wait for the notice or the timeout.
    Pending,
}

#[derive(Copy, Clone)]
enum ViewAt {
    Current,
    Past(usize),
    Stale,
    Unknown,
}

enum Primary {
    Me,
    Other(NodeIndex),
    Nobody,
}

/// One node's handoff state machine: registry of datums, placement table in
/// force, handoffs in flight. Sans-IO: every input takes `now`, outputs are
/// polled. `W` is the application's work held for datums in flight.
///
/// See the [crate documentation](crate) for the protocol and an example.
pub struct Handoff<W = Vec<u8>> {
    local: NodeId,
    config: Config,
    types: TypeRegistry,
    /// Types whose datums are registered by their first notice here
    /// ([`Handoff::set_on_demand`]).
    on_demand: BTreeSet<DatumType>,
    registry: Registry,
    current: Arc<PlacementTable>,
    self_index: Option<NodeIndex>,
    history: VecDeque<PastView>,
    seen: HashMap<ViewId, Instant, DetState>,
    /// Nodes declared failed or left, with when this node learnt it: no
    /// done marker is expected from them. Kept while a view of this node
    /// names them, and for `16 × timeout` after they went (a view naming a
    /// node may be installed here after its departure was learnt).
    gone: BTreeMap<NodeId, Instant>,
    /// Nodes declared failed while members of the view in force: their
    /// datums may fail over (see [`Handoff::peer_failed`]).
    failed: BTreeSet<NodeId>,
    /// Nodes that said done under a view without themselves, with the
    /// install count (epoch) they said it at, when no later install of
    /// theirs was heard of and no view installed here since names them:
    /// they hold nothing. Once gone, they are no holder to wait for (a node
    /// that left after relinquishing everything). See
    /// [`Handoff::note_last_word`].
    empty_handed: BTreeMap<NodeId, u64>,
    /// Nodes whose latest word is a done marker for a view this node has not
    /// had in force (yet), with that word's epoch: decided when that view is
    /// installed here (see [`Handoff::note_last_word`]).
    pending_done: BTreeMap<NodeId, (u64, ViewId)>,
    cohorts: VecDeque<Cohort>,
    /// Cohorts before this index had their relinquish deadline processed.
    rcursor: usize,
    next_epoch: u64,
    relinquish_queue: VecDeque<Datum>,
    acquire_queue: VecDeque<Datum>,
    out: Vec<OutBuf>,
    transmits: VecDeque<Transmit>,
    sent: HashMap<u64, SentBatch, DetState>,
    next_send: u64,
    retrying: HashMap<u64, Retry, DetState>,
    /// Per datum: the sender (hashed name and generation) and the sender's
    /// install count of the last notice taken here. A copy of it (a send the
    /// transport reported failed although it was delivered, re-sent) is
    /// refused: its token is spent. Kept `2 × timeout` (see `taken_order`).
    taken: HashMap<Datum, (u64, u64), DetState>,
    /// The senders of the notices in `taken`, by their key: the previous
    /// owner an acquire after a handoff names ([`Job::previous`]). One entry
    /// per sender, cleared once `taken` is empty.
    sender_names: HashMap<u64, NodeId, DetState>,
    /// When each entry of `taken` was made, oldest first, to forget it.
    taken_order: VecDeque<(Instant, Datum, u64)>,
    /// Datums this node is primary of and waits for, whose token it sent
    /// to a node (`None`: not known which) that may have it now: see
    /// [`Handoff::token_left`]. At most one entry per registered datum.
    returning: HashMap<Datum, Option<NodeId>, DetState>,
    next_retry: u64,
    timers: BinaryHeap<Reverse<Timer>>,
    timer_seq: u64,
    parked: HashMap<ViewId, Parked, DetState>,
    parked_total: usize,
    held: HashMap<Datum, VecDeque<W>, DetState>,
    held_total: usize,
    releases: VecDeque<Release<W>>,
    events: VecDeque<Event>,
    counters: Counters,
    fenced: bool,
    /// Whether this node may act as an owner (its ownership lease, from
    /// membership): see [`Handoff::set_standing`].
    standing: bool,
    now: Option<Instant>,
    transition: Option<ViewId>,
    /// Nodes (other than this one, not gone) that may hold a datum of this
    /// node and have not said "done" for the view in force yet.
    done_missing: BTreeSet<NodeId>,
    /// This node's install count: which instance of the view in force its
    /// batches speak of (their `epoch`). A Lamport clock: each install
    /// moves it past every epoch heard (`heard_epoch`), so it also orders
    /// fencing tokens across nodes.
    install_seq: u64,
    /// The highest epoch of any batch received.
    heard_epoch: u64,
    /// `Some(install_seq)` once this node is done with the view in force.
    done_seq: Option<u64>,
    /// Per peer: the latest (epoch, view) its batches said it was at.
    announced: HashMap<NodeId, (u64, ViewId), DetState>,
    /// Per peer: (this node's install count, the peer's epoch) of the last
    /// done marker sent to it.
    answered: HashMap<NodeId, (u64, u64), DetState>,
    /// Waits that nobody alive can answer, blocked only on done markers.
    blocked_on_done: Vec<Datum>,
    /// Live members other than this node, ready or not (see
    /// [`Handoff::set_peers`]): each must say done before a wait ends
    /// without a notice.
    peers: BTreeSet<NodeId>,
    /// When each live member outside the views here became one: a member
    /// that never sent this node a batch is waited for at most
    /// [`Handoff::silent_peer_grace`] from then, except by a first owner.
    /// One entry per member of `peers`.
    peer_since: HashMap<NodeId, Instant, DetState>,
    /// Nodes that said done for the view in force, with their epoch.
    done_received: BTreeMap<NodeId, u64>,
    /// Inside `install`: waits are settled once the parked notices of the
    /// new view have been taken.
    installing: bool,
    /// Datums acquiring here when a view gave them to another node, and
    /// when: their relinquish deadline counts from then, not from the end of
    /// the acquire, or the new primary could time out first. At most one per
    /// acquire job.
    acquire_superseded: HashMap<Datum, Instant, DetState>,
}

impl<W> std::fmt::Debug for Handoff<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handoff")
            .field("local", &self.local)
            .field("view", &self.current.view_id())
            .field("progress", &self.progress())
            .field("fenced", &self.fenced)
            .finish_non_exhaustive()
    }
}

impl<W> Handoff<W> {
    /// A node's state machine, with no datum and the empty placement table
    /// (no owner for anything).
    ///
    /// Install the table of the cluster as this node sees it *before* this
    /// node is ready, so that its first table naming itself has the previous
    /// owners to wait for; a datum is acquired without waiting only when no
    /// other node was its primary in a recent view.
    ///
    /// # Errors
    /// [`ConfigError`] when `config` does not validate.
    pub fn new(local: NodeId, config: Config) -> Result<Handoff<W>, ConfigError> {
        config.validate()?;
        Ok(Handoff {
            local,
            config,
            types: TypeRegistry::default(),
            on_demand: BTreeSet::new(),
            registry: Registry::default(),
            current: Arc::new(PlacementTable::empty()),
            self_index: None,
            history: VecDeque::new(),
            seen: HashMap::default(),
            gone: BTreeMap::new(),
            empty_handed: BTreeMap::new(),
            pending_done: BTreeMap::new(),
            failed: BTreeSet::new(),
            cohorts: VecDeque::new(),
            rcursor: 0,
            next_epoch: 1,
            relinquish_queue: VecDeque::new(),
            acquire_queue: VecDeque::new(),
            out: Vec::new(),
            transmits: VecDeque::new(),
            sent: HashMap::default(),
            next_send: 0,
            retrying: HashMap::default(),
            taken: HashMap::default(),
            sender_names: HashMap::default(),
            taken_order: VecDeque::new(),
            returning: HashMap::default(),
            next_retry: 0,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            parked: HashMap::default(),
            parked_total: 0,
            held: HashMap::default(),
            held_total: 0,
            releases: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
            fenced: false,
            standing: true,
            now: None,
            transition: None,
            done_missing: BTreeSet::new(),
            install_seq: 0,
            heard_epoch: 0,
            done_seq: None,
            announced: HashMap::default(),
            answered: HashMap::default(),
            blocked_on_done: Vec::new(),
            peers: BTreeSet::new(),
            peer_since: HashMap::default(),
            done_received: BTreeMap::new(),
            installing: false,
            acquire_superseded: HashMap::default(),
        })
    }

    // ----- accessors -------------------------------------------------------

    /// This node's identity.
    #[must_use]
    pub fn local(&self) -> &NodeId {
        &self.local
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The placement table in force. Owner lookups on it are O(1) and never
    /// wait for a transition; share the `Arc` with readers.
    #[must_use]
    pub fn table(&self) -> &Arc<PlacementTable> {
        &self.current
    }

    /// The id of the view in force.
    #[must_use]
    pub fn view_id(&self) -> ViewId {
        self.current.view_id()
    }

    /// The primary owner of `id` in the view in force.
    #[must_use]
    pub fn owner(&self, id: i64) -> Option<&NodeId> {
        self.current
            .primary(id)
            .and_then(|i| self.current.view().node(i))
    }

    /// Interns a datum type name (1 to 255 bytes; at most 65,536 types).
    ///
    /// # Errors
    /// [`RegistryError::BadTypeName`] or [`RegistryError::TooManyTypes`].
    pub fn datum_type(&mut self, name: &str) -> Result<DatumType, RegistryError> {
        self.types.intern(name)
    }

    /// The interned type of `name`, if this node interned it.
    #[must_use]
    pub fn lookup_type(&self, name: &str) -> Option<DatumType> {
        self.types.lookup(name)
    }

    /// The name of an interned type.
    #[must_use]
    pub fn type_name(&self, ty: DatumType) -> Option<&str> {
        self.types.name(ty)
    }

    /// Whether `datum` is registered.
    #[must_use]
    pub fn is_registered(&self, datum: Datum) -> bool {
        self.registry.map.contains_key(&datum)
    }

    /// Whether this node holds `datum` acquired (work for it is processed here).
    #[must_use]
    pub fn is_held(&self, datum: Datum) -> bool {
        self.registry
            .get(&datum)
            .is_some_and(|s| s.phase == Phase::Held)
    }

    /// The running counters.
    #[must_use]
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Whether the cluster declared this node failed (it then does nothing more).
    #[must_use]
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Whether `node` left or was declared failed, as this node still
    /// remembers it (while a view here names it, and for 16 × `timeout`
    /// after it went): a batch it sent before it went is still its last
    /// word, to hand to [`Handoff::handle_notices`].
    #[must_use]
    pub fn is_gone(&self, node: &NodeId) -> bool {
        self.gone.contains_key(node)
    }

    /// Whether this node may act as an owner (see [`Handoff::set_standing`]).
    #[must_use]
    pub fn has_standing(&self) -> bool {
        self.standing
    }

    /// Tells the handoff whether this node may act as an owner now: its
    /// ownership lease (`shoal_membership::Membership::standing`). True
    /// at the start.
    ///
    /// While it may not (cut off from the majority, or just woken from a
    /// pause): work for the datums it holds is held, not processed
    /// ([`Route::Hold`]); no job is handed out (an acquire would load and
    /// claim a datum, a relinquish would write it: both act as owner; a
    /// relinquish waits for the lease to come back, and if the node is
    /// declared dead meanwhile its successor takes the datum over); and a
    /// peer declared failed meanwhile is not failed over by this node (its
    /// view of who failed comes from the wrong side). When it may again,
    /// held work for the datums it still holds is released to it.
    pub fn set_standing(&mut self, valid: bool, now: Instant) {
        let now = self.clock(now);
        if self.standing == valid {
            return;
        }
        self.standing = valid;
        if valid {
            info!(node = %self.local, "standing regained: acting as owner again");
            self.recheck_held();
            // Waits left unsettled while without standing (`settle_wait`).
            self.release_unheld_waits(now, true);
            self.check_ended();
        } else {
            self.counters.standing_lost += 1;
            warn!(node = %self.local, "standing lost: holding work, no acquisitions");
        }
    }

    /// Datums in flight on this node (see [`Progress::in_flight`]).
    #[must_use]
    pub fn in_flight(&self) -> usize {
        use Phase::*;
        [
            RelinquishQueued,
            Relinquishing,
            RelinquishBackoff,
            Awaiting,
            AcquireQueued,
            Acquiring,
            AcquireBackoff,
            TokenWait,
            TokenQueued,
            Passed,
        ]
        .iter()
        .map(|&p| self.registry.count(p))
        .sum()
    }

    /// Whether nothing is in flight (the transition, if any, has ended).
    #[must_use]
    pub fn is_idle(&self) -> bool {
        self.in_flight() == 0
    }

    /// Whether the handoff of the view in force is over everywhere this
    /// node can tell: nothing is in flight here, this node said done with
    /// the view in force, and every live peer and every node of the recent
    /// views said done with that same view (their done markers). All
    /// members agree on the view and none has anything in flight for it.
    #[must_use]
    pub fn is_settled(&self) -> bool {
        !self.installing
            && self.done_seq.is_some()
            && self.done_missing.is_empty()
            && self.is_idle()
    }

    /// A snapshot of what is in flight.
    #[must_use]
    pub fn progress(&self) -> Progress {
        use Phase::*;
        let c = |p| self.registry.count(p);
        Progress {
            view: Some(self.current.view_id()),
            registered: self.registry.map.len(),
            held: c(Held),
            relinquishing: c(RelinquishQueued) + c(Relinquishing) + c(RelinquishBackoff),
            awaiting: c(Awaiting),
            acquiring: c(AcquireQueued) + c(Acquiring) + c(AcquireBackoff),
            notices_pending: c(TokenWait) + c(TokenQueued) + c(Passed),
            unowned: c(TokenParked),
            relaying: c(Relay),
            in_flight: self.in_flight(),
            held_work: self.held_total,
            parked_notices: self.parked_total,
        }
    }

    /// The datums this node is primary of and still waits for (O(registered)).
    pub fn awaiting(&self) -> impl Iterator<Item = Datum> + '_ {
        self.registry
            .map
            .iter()
            .filter(|(_, s)| s.phase == Phase::Awaiting)
            .map(|(d, _)| *d)
    }

    /// Where `datum` stands on this node (None: not registered).
    #[must_use]
    pub fn state(&self, datum: Datum) -> Option<DatumState> {
        self.registry.get(&datum).map(|s| s.phase.state())
    }

    /// The fencing token of this node's ownership of `datum`: `Some` from
    /// the moment its acquire job is handed out until its relinquish
    /// succeeds (held, acquiring, or relinquishing), `None` otherwise.
    #[must_use]
    pub fn token(&self, datum: Datum) -> Option<FencingToken> {
        let s = self.registry.get(&datum)?;
        use Phase::*;
        matches!(
            s.phase,
            Held | RelinquishQueued
                | Relinquishing
                | RelinquishBackoff
                | Acquiring
                | AcquireBackoff
        )
        .then_some(FencingToken(s.token))
    }

    /// The highest epoch this node has installed or heard: every token it
    /// mints from now on is at least this.
    #[must_use]
    pub fn epoch(&self) -> u64 {
        self.install_seq.max(self.heard_epoch)
    }

    /// Raises what this node has heard to at least `epoch`: a new state
    /// machine that takes over from an older one of the same process (a new
    /// generation after a declared death) continues its clock, so its first
    /// tokens are above every token the old one minted or heard of.
    pub fn observe_epoch(&mut self, epoch: u64) {
        self.heard_epoch = self.heard_epoch.max(epoch);
    }

    /// Every registered datum not simply held or free here, with its state
    /// (O(registered)).
    pub fn in_flight_datums(&self) -> impl Iterator<Item = (Datum, DatumState)> + '_ {
        self.registry
            .map
            .iter()
            .filter(|(_, s)| !matches!(s.phase, Phase::Held | Phase::Free))
            .map(|(d, s)| (*d, s.phase.state()))
    }

    /// The work held right now, per datum, oldest first.
    pub fn held_work(&self) -> impl Iterator<Item = (Datum, &W)> + '_ {
        self.held
            .iter()
            .flat_map(|(d, q)| q.iter().map(move |w| (*d, w)))
    }

    // ----- routing and held work -------------------------------------------

    /// Where work for `datum` must go right now. Never waits; O(1).
    #[must_use]
    pub fn route(&self, datum: Datum) -> Route<'_> {
        if self.fenced {
            return Route::Fenced;
        }
        let by_table = || match self.primary_of(datum.id) {
            Primary::Me => Route::Process,
            Primary::Other(i) => self
                .current
                .view()
                .node(i)
                .map_or(Route::Hold, Route::Forward),
            Primary::Nobody => Route::Hold,
        };
        let Some(s) = self.registry.get(&datum) else {
            return by_table();
        };
        use Phase::*;
        match s.phase {
            Held if self.standing => Route::Process,
            Held => Route::Hold,
            RelinquishQueued | Relinquishing | RelinquishBackoff | Awaiting | AcquireQueued
            | Acquiring | AcquireBackoff => Route::Hold,
            Free | Relay | TokenWait | TokenQueued | TokenParked | Passed => match by_table() {
                Route::Process => Route::Hold,
                other => other,
            },
        }
    }

    /// Keeps `work` for `datum` until the datum lands; it is then released
    /// once (see [`Handoff::poll_release`]), to this node or to the owner.
    ///
    /// # Errors
    /// The work is handed back in a [`HoldError`]: `Full` when the node's hold
    /// buffer (`Config::hold_capacity`) is full (push back on the sender),
    /// `NotHeld` when [`Handoff::route`] is not [`Route::Hold`], `Fenced`.
    pub fn hold(&mut self, datum: Datum, work: W) -> Result<(), HoldError<W>> {
        let kind = match self.route(datum) {
            Route::Fenced => Some(HoldErrorKind::Fenced),
            Route::Hold if self.held_total >= self.config.hold_capacity => {
                self.counters.hold_refused += 1;
                Some(HoldErrorKind::Full)
            }
            Route::Hold => None,
            Route::Process | Route::Forward(_) => Some(HoldErrorKind::NotHeld),
        };
        if let Some(kind) = kind {
            return Err(HoldError { kind, datum, work });
        }
        self.held.entry(datum).or_default().push_back(work);
        self.held_total += 1;
        Ok(())
    }

    // ----- registry --------------------------------------------------------

    /// Registers a datum (the seed's `LoadDistData`). Registering again is a
    /// no-op returning `false`. If this node is its primary and no other node
    /// was in a recent view, it is acquired at once; during a transition it
    /// waits for the previous owner's notice like any moving datum.
    ///
    /// # Errors
    /// [`RegistryError::UnknownType`] for a type not interned here,
    /// [`RegistryError::Fenced`].
    pub fn register(&mut self, datum: Datum, now: Instant) -> Result<bool, RegistryError> {
        if self.fenced {
            return Err(RegistryError::Fenced);
        }
        if self.types.name(datum.ty).is_none() {
            return Err(RegistryError::UnknownType(datum.ty.index()));
        }
        let now = self.clock(now);
        if !self.registry.insert(datum) {
            return Ok(false);
        }
        if let Primary::Me = self.primary_of(datum.id) {
            let view = self.current.view_id();
            let parked = self.parked.get_mut(&view).and_then(|p| {
                let i = p.datums.remove(&datum)?;
                p.senders.get(i as usize).cloned()
            });
            if parked.is_some() {
                self.parked_total = self.parked_total.saturating_sub(1);
            }
            let key = parked.as_ref().map_or(0, |(node, _)| self.sender_key(node));
            let parked_here = match parked {
                Some((node, epoch))
                    if self.is_copy(
                        datum,
                        Src {
                            node: &node,
                            epoch,
                            key,
                        },
                    ) =>
                {
                    self.counters.notices_copy_refused += 1;
                    false
                }
                Some((node, epoch)) if self.sender_unmoved(&node, epoch) => {
                    self.note_taken(
                        datum,
                        Src {
                            node: &node,
                            epoch,
                            key,
                        },
                        now,
                    );
                    true
                }
                Some(_) => {
                    self.counters.notices_stale += 1;
                    false
                }
                None => false,
            };
            if let Some(slot) = self.registry.get(&datum) {
                if parked_here {
                    self.counters.notices_accepted += 1;
                    self.take_token(datum, slot, Source::Notice, now);
                } else {
                    self.begin_wait(datum, slot, now);
                }
            }
        }
        self.maybe_release(datum);
        self.check_ended();
        Ok(true)
    }

    /// Datums of type `ty` exist on demand: besides [`Handoff::register`]
    /// (which the driver calls when work for one arrives at its primary),
    /// a notice for an unregistered datum of this type registers it and is
    /// taken, instead of waiting parked for a registration. So a datum
    /// created on one node follows its ownership to the next, and a node
    /// relinquishes only the datums it has.
    pub fn set_on_demand(&mut self, ty: DatumType, on: bool) {
        if on {
            self.on_demand.insert(ty);
        } else {
            self.on_demand.remove(&ty);
        }
    }

    /// Whether datums of type `ty` exist on demand
    /// ([`Handoff::set_on_demand`]).
    #[must_use]
    pub fn is_on_demand(&self, ty: DatumType) -> bool {
        self.on_demand.contains(&ty)
    }

    /// Interns `ty` and registers the datum; returns it.
    ///
    /// # Errors
    /// As [`Handoff::datum_type`] and [`Handoff::register`].
    pub fn register_named(
        &mut self,
        ty: &str,
        id: i64,
        now: Instant,
    ) -> Result<Datum, RegistryError> {
        let datum = Datum::new(self.datum_type(ty)?, id);
        self.register(datum, now)?;
        Ok(datum)
    }

    /// Forgets a datum, whatever it is doing: a running job's completion will
    /// be ignored, a notice it was owed is dropped, work held for it comes
    /// back as [`ReturnReason::Unregistered`]. Returns whether it was registered.
    pub fn unregister(&mut self, datum: Datum, now: Instant) -> bool {
        self.clock(now);
        if self.registry.remove(&datum).is_none() {
            return false;
        }
        self.acquire_superseded.remove(&datum);
        self.returning.remove(&datum);
        if let Some(work) = self.held.remove(&datum) {
            self.held_total = self.held_total.saturating_sub(work.len());
            self.releases.push_back(Release {
                datum,
                to: ReleaseTo::Returned(ReturnReason::Unregistered),
                work: work.into(),
            });
        }
        self.check_ended();
        true
    }

    // ----- inputs ----------------------------------------------------------

    /// Installs a new placement table (a new view). Every registered datum
    /// whose primary changes starts moving; what was already in flight
    /// carries on under the new view without being relinquished or acquired
    /// twice. Installing the view already in force does nothing.
    pub fn install(&mut self, table: impl Into<Arc<PlacementTable>>, now: Instant) {
        let table = table.into();
        let now = self.clock(now);
        if self.fenced || table.view_id() == self.current.view_id() {
            return;
        }
        self.process_timeouts(now);
        let running = self.transition.filter(|_| !self.is_idle());
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.cohorts.push_back(Cohort {
            id: epoch,
            start: now,
            datums: Vec::new(),
        });

        let old = std::mem::replace(&mut self.current, Arc::clone(&table));
        // A node of the new view may acquire again, unless it is gone: a
        // view naming a node this node already knows left or failed is older
        // news than its last word.
        let gone = &self.gone;
        self.empty_handed
            .retain(|n, _| !table.view().contains(n) || gone.contains_key(n));
        // Done markers for this view that came before it: decided now.
        let id = table.view_id();
        let due: Vec<(NodeId, u64)> = self
            .pending_done
            .iter()
            .filter(|(_, (_, v))| *v == id)
            .map(|(n, (e, _))| (n.clone(), *e))
            .collect();
        for (n, e) in due {
            self.pending_done.remove(&n);
            if !table.view().contains(&n) && self.empty_handed.get(&n).is_none_or(|x| *x < e) {
                self.empty_handed.insert(n, e);
            }
        }
        let old_self = self.self_index;
        self.self_index = table.view().index_of_id(&self.local);
        let failed = old
            .view()
            .nodes()
            .iter()
            .map(|n| self.failed.contains(n))
            .collect();
        self.seen.insert(old.view_id(), now);
        self.seen.remove(&table.view_id());
        self.history.push_front(PastView {
            table: Arc::clone(&old),
            self_index: old_self,
            left: now,
            left_epoch: epoch,
            failed,
        });
        // The view in force is never "past": drop an older entry of the same id.
        let current_id = table.view_id();
        self.history.retain(|p| p.table.view_id() != current_id);
        self.prune(now);
        self.counters.views += 1;
        self.install_seq = self.install_seq.max(self.heard_epoch) + 1;
        self.reset_done();

        // Outgoing buffers are per node index of the view in force: their
        // tokens are routed again below.
        self.out.clear();
        self.out.resize_with(table.view().len(), OutBuf::default);

        if old.copies() > 1 || table.copies() > 1 {
            self.replica_events(&old, old_self, &table);
        }

        self.installing = true;
        let me = self.self_index;
        let todo: Vec<Datum> = self
            .registry
            .map
            .iter()
            .filter(|(d, s)| {
                let mine = me.is_some() && table.primary(d.id) == me;
                !matches!((s.phase, mine), (Phase::Free, false) | (Phase::Held, true))
            })
            .map(|(d, _)| *d)
            .collect();
        for d in todo {
            self.on_view_change(d, now);
        }
        if self
            .cohorts
            .back()
            .is_some_and(|c| c.id == epoch && c.datums.is_empty())
        {
            self.cohorts.pop_back();
        }

        // Notices that arrived before this view did.
        if let Some(parked) = self.parked.remove(&current_id) {
            self.parked_total = self.parked_total.saturating_sub(parked.datums.len());
            let mut report = NoticeReport::default();
            let mut datums: Vec<(Datum, u32)> = parked.datums.into_iter().collect();
            datums.sort_unstable();
            for (d, i) in datums {
                let Some((node, epoch)) = parked.senders.get(i as usize) else {
                    continue;
                };
                if !self.sender_unmoved(node, *epoch) {
                    report.stale += 1;
                    continue;
                }
                let src = Src {
                    node,
                    epoch: *epoch,
                    key: self.sender_key(node),
                };
                self.take_notice(ViewAt::Current, d, src, now, &mut report);
            }
            self.count_report(&report);
        }
        self.installing = false;
        if !self.is_busy() {
            self.done_seq = Some(self.install_seq);
        }
        self.announce();
        if !self.missing_done(false, now) {
            self.release_unheld_waits(now, false);
        }
        self.recheck_held();

        if let Some(view) = running {
            self.events.push_back(Event::TransitionSuperseded {
                view,
                by: current_id,
            });
        }
        let p = self.progress();
        info!(
            node = %self.local, view = %current_id, nodes = table.view().len(),
            relinquish = p.relinquishing, awaiting = p.awaiting, acquire = p.acquiring,
            "transition started"
        );
        self.events.push_back(Event::TransitionStarted {
            view: current_id,
            relinquish: p.relinquishing,
            awaiting: p.awaiting,
            acquire: p.acquiring,
        });
        self.transition = Some(current_id);
        self.check_ended();
    }

    /// The outcome of a job handed out by [`Handoff::poll_job`]. `Err` holds
    /// the application's error message. A completion for a job that is no
    /// longer current (the datum was unregistered, or its relinquish was
    /// abandoned) is counted and ignored.
    pub fn job_done(&mut self, job: Job, outcome: Result<(), String>, now: Instant) {
        let now = self.clock(now);
        if self.fenced {
            return;
        }
        let d = job.datum;
        let expected = match job.kind {
            JobKind::Relinquish => Phase::Relinquishing,
            JobKind::Acquire => Phase::Acquiring,
        };
        let current = |s: &Slot| {
            s.phase == expected && s.flight == job.flight && u32::from(s.attempt) + 1 == job.attempt
        };
        // The common successes, in one lookup.
        if outcome.is_ok() {
            let mine = matches!(self.primary_of(d.id), Primary::Me);
            let (phase, primary) = match job.kind {
                JobKind::Relinquish => self.token_phase(d.id),
                JobKind::Acquire => (Phase::Held, Primary::Me),
            };
            let done = self.registry.modify(&d, |s| {
                let ok = current(s);
                if ok {
                    s.phase = phase;
                    s.attempt = 0;
                }
                ok.then_some(*s)
            });
            let Some(s) = done.flatten() else {
                self.counters.stale_completions += 1;
                return;
            };
            match job.kind {
                JobKind::Relinquish => {
                    self.counters.relinquished += 1;
                    self.after_token(d, primary, Source::Relinquished, now);
                }
                JobKind::Acquire => {
                    self.counters.acquired += 1;
                    let since = self.acquire_superseded.remove(&d);
                    if !mine {
                        // The view moved on during the acquire: hand it on,
                        // by the deadline that view change set.
                        let deadline = since.unwrap_or(now) + self.config.relinquish_timeout;
                        self.start_relinquish(d, s, now);
                        if let Some(s) = self.registry.get(&d) {
                            if deadline <= now {
                                self.abandon_relinquish(d, s.flight);
                            } else {
                                let flight = s.flight;
                                self.add_timer(
                                    deadline,
                                    TimerKind::AbandonRelinquish { datum: d, flight },
                                );
                            }
                        }
                    }
                    self.maybe_release(d);
                }
            }
            self.check_ended();
            return;
        }
        let Err(error) = outcome else {
            return;
        };
        let Some(mut s) = self.registry.get(&d).filter(current) else {
            self.counters.stale_completions += 1;
            return;
        };
        let mine = matches!(self.primary_of(d.id), Primary::Me);
        match job.kind {
            JobKind::Relinquish => {
                self.counters.relinquish_failures += 1;
                debug!(node = %self.local, datum = %d, attempt = job.attempt, %error, "relinquish failed");
                if mine {
                    // The datum came back here meanwhile: keep it.
                    s.phase = Phase::Held;
                    self.registry.set(d, s);
                } else {
                    s.attempt = s.attempt.saturating_add(1);
                    s.phase = Phase::RelinquishBackoff;
                    self.registry.set(d, s);
                    let at = now + self.backoff(s.attempt);
                    self.add_timer(
                        at,
                        TimerKind::RelinquishRetry {
                            datum: d,
                            flight: s.flight,
                            attempt: s.attempt,
                        },
                    );
                }
                self.events.push_back(Event::RelinquishFailed {
                    datum: d,
                    attempt: job.attempt,
                    error,
                    retry: !mine,
                });
                self.maybe_release(d);
            }
            JobKind::Acquire => {
                self.counters.acquire_failures += 1;
                debug!(node = %self.local, datum = %d, attempt = job.attempt, %error, "acquire failed");
                let retry = mine && job.attempt < u32::from(self.config.max_acquire_attempts);
                if !mine || !retry {
                    self.acquire_superseded.remove(&d);
                }
                if !mine {
                    s.flight = self.enter_cohort(d, now);
                    self.take_token(d, s, Source::PassOn, now);
                } else if retry {
                    s.attempt = s.attempt.saturating_add(1);
                    s.phase = Phase::AcquireBackoff;
                    self.registry.set(d, s);
                    let at = now + self.backoff(s.attempt);
                    self.add_timer(
                        at,
                        TimerKind::AcquireRetry {
                            datum: d,
                            flight: s.flight,
                            attempt: s.attempt,
                        },
                    );
                } else {
                    debug!(
                        node = %self.local, datum = %d, attempts = job.attempt,
                        "acquire keeps failing: processing the datum anyway"
                    );
                    s.phase = Phase::Held;
                    self.registry.set(d, s);
                    self.maybe_release(d);
                }
                self.events.push_back(Event::AcquireFailed {
                    datum: d,
                    attempt: job.attempt,
                    error,
                    retry,
                });
            }
        }
        self.check_ended();
    }

    /// Decodes and takes a notice batch received from the authenticated peer `from`.
    ///
    /// # Errors
    /// [`NoticeError`] when the batch is refused as a whole (counted; nothing
    /// else changes). Individual notices that are stale, duplicate or
    /// misdirected are counted in the returned report, never an error.
    pub fn handle_notices(
        &mut self,
        from: &NodeId,
        bytes: &[u8],
        now: Instant,
    ) -> Result<NoticeReport, NoticeError> {
        match NoticeBatch::decode(bytes, &self.config.wire) {
            Ok(batch) => self.handle_batch(from, batch, now),
            Err(e) => {
                self.counters.batches_rejected += 1;
                debug!(node = %self.local, peer = %from, error = %e, "undecodable notice batch");
                Err(e.into())
            }
        }
    }

    /// Takes a decoded notice batch received from the authenticated peer `from`.
    ///
    /// # Errors
    /// As [`Handoff::handle_notices`].
    pub fn handle_batch(
        &mut self,
        from: &NodeId,
        batch: NoticeBatch,
        now: Instant,
    ) -> Result<NoticeReport, NoticeError> {
        let now = self.clock(now);
        let refused = if self.fenced {
            Some(NoticeError::Fenced)
        } else if batch.from != *from {
            Some(NoticeError::SenderMismatch {
                claimed: batch.from.clone(),
                peer: from.clone(),
            })
        } else if batch.to != self.local {
            Some(NoticeError::Misaddressed {
                to: batch.to.clone(),
            })
        } else if batch.epoch
            > self
                .install_seq
                .max(self.heard_epoch)
                .saturating_add(MAX_EPOCH_JUMP)
        {
            self.counters.epoch_jumps_refused += 1;
            Some(NoticeError::EpochJump {
                epoch: batch.epoch,
                known: self.install_seq.max(self.heard_epoch),
            })
        } else {
            None
        };
        if let Some(e) = refused {
            self.counters.batches_rejected += 1;
            debug!(node = %self.local, peer = %from, error = %e, "notice batch refused");
            return Err(e);
        }
        self.counters.batches_received += 1;
        self.heard_epoch = self.heard_epoch.max(batch.epoch);
        let mut report = NoticeReport::default();
        let at = self.locate_view(batch.view);
        let (done, view, epoch, echo) = (batch.done, batch.view, batch.epoch, batch.echo);
        let key = self.sender_key(from);
        for group in batch.groups {
            let Some(ty) = self.types.lookup(&group.datum_type) else {
                report.unknown_type += group.ids.len();
                continue;
            };
            let mut datums: Vec<Datum> = group.ids.iter().map(|&id| Datum::new(ty, id)).collect();
            self.registry.sort_for_locality(&mut datums);
            for d in datums {
                let src = Src {
                    node: from,
                    epoch,
                    key,
                };
                match at {
                    ViewAt::Stale => report.stale += 1,
                    ViewAt::Unknown => self.park(view, d, src, now, &mut report),
                    ViewAt::Current | ViewAt::Past(_) => {
                        self.take_notice(at, d, src, now, &mut report);
                    }
                }
            }
        }
        self.count_report(&report);
        self.peer_state(from, view, epoch, done.then_some(echo), now);
        self.check_ended();
        Ok(report)
    }

    /// The outcome of sending a [`Transmit`]: `Ok` once the peer received
    /// it, `Err` when the transport gave up. After a failure the notices are
    /// routed again (to the primary in force then) after a backoff, until
    /// they expire at the timeout.
    pub fn send_done(&mut self, id: SendId, outcome: Result<(), String>, now: Instant) {
        let now = self.clock(now);
        let Some(batch) = self.sent.remove(&id.0) else {
            return;
        };
        if self.fenced {
            return;
        }
        match outcome {
            Ok(()) => {
                for d in batch.datums {
                    let delivered = self.registry.modify(&d, |s| {
                        let passed = s.phase == Phase::Passed;
                        if passed {
                            s.phase = Phase::Free;
                            s.attempt = 0;
                        }
                        passed.then_some(*s)
                    });
                    if let Some(s) = delivered.flatten() {
                        let at = batch.notice.as_ref().map(|a| a.to.clone());
                        self.token_left(d, s, at, now);
                    }
                }
            }
            Err(error) => {
                self.counters.send_failures += 1;
                debug!(node = %self.local, send = id.0, %error, "notice batch not delivered");
                if let Some(to) = batch.state {
                    let at = now + self.config.retry_base;
                    let seq = self.install_seq;
                    self.add_timer(at, TimerKind::ResendState { to, seq });
                }
                // The peer may have received the batch all the same: it is
                // re-sent to the same node under the same view and epoch,
                // never to another one, so at most one node can take it
                // (and that node refuses a second copy, see `taken`).
                let mut back = Vec::new();
                let mut attempt = 0u8;
                for d in batch.datums {
                    let Some(mut s) = self.registry.get(&d) else {
                        continue;
                    };
                    if s.phase == Phase::Passed {
                        s.phase = Phase::TokenWait;
                        s.attempt = s.attempt.saturating_add(1);
                        attempt = attempt.max(s.attempt);
                        self.registry.set(d, s);
                        back.push((d, s.flight));
                    }
                }
                if let Some(address) = batch.notice.filter(|_| !back.is_empty()) {
                    let key = self.next_retry;
                    self.next_retry += 1;
                    self.retrying.insert(
                        key,
                        Retry {
                            address,
                            datums: back,
                        },
                    );
                    let at = now + self.backoff(attempt);
                    self.add_timer(at, TimerKind::Resend { key });
                }
            }
        }
        self.check_ended();
    }

    /// Gives up relinquishing `datum` now, as the relinquish deadline would
    /// (`RelinquishAbandoned`): the node stops holding it (its unsaved state
    /// is likely lost), sends no notice for it, and once nothing else is
    /// busy says done, so the datum's primary takes it on everyone's done
    /// markers without waiting for a timeout. A job still running is left to
    /// finish; its completion is ignored. For a node on its way out (a
    /// graceful leave) whose application could not relinquish the datum.
    /// Returns whether the datum was being relinquished here and is not any
    /// more (a datum whose primary this node is again is kept, as at the
    /// deadline).
    pub fn give_up_relinquish(&mut self, datum: Datum, now: Instant) -> bool {
        let _ = self.clock(now);
        if self.fenced {
            return false;
        }
        let Some(s) = self.registry.get(&datum).filter(|s| {
            matches!(
                s.phase,
                Phase::RelinquishQueued | Phase::Relinquishing | Phase::RelinquishBackoff
            )
        }) else {
            return false;
        };
        self.abandon_relinquish(datum, s.flight);
        let given_up = self
            .registry
            .get(&datum)
            .is_some_and(|s| s.phase == Phase::Free);
        self.check_ended();
        given_up
    }

    /// [`Handoff::give_up_relinquish`] for every datum being relinquished
    /// here (queued, running, or backing off after a failure); returns those
    /// given up, sorted.
    pub fn give_up_relinquishes(&mut self, now: Instant) -> Vec<Datum> {
        let mut datums: Vec<Datum> = self
            .registry
            .map
            .iter()
            .filter(|(_, s)| {
                matches!(
                    s.phase,
                    Phase::RelinquishQueued | Phase::Relinquishing | Phase::RelinquishBackoff
                )
            })
            .map(|(d, _)| *d)
            .collect();
        datums.sort_unstable();
        datums.retain(|&d| self.give_up_relinquish(d, now));
        datums
    }

    /// Membership declared `node` failed. Waits whose every possible holder
    /// is now gone end at once (failover), instead of at the timeout. If
    /// `node` is this node, this is [`Handoff::fence`].
    ///
    /// Call it *before* installing the view without `node`: failover applies
    /// only to a node declared failed while it is a member of the view in
    /// force (it died holding its datums). A node already out of the view
    /// (not ready, leaving) may have relinquished under a view this node has
    /// not seen; its datums wait for the notice or the timeout. Neither is a
    /// failover decided while this node has no standing
    /// ([`Handoff::set_standing`]): cut off from the majority, it sees the
    /// others fail, not the other way round.
    pub fn peer_failed(&mut self, node: &NodeId, now: Instant) {
        if !self.fenced
            && self.standing
            && *node != self.local
            && self.current.view().contains(node)
        {
            self.failed.insert(node.clone());
        }
        self.peer_gone(node, now);
    }

    /// `node`, a node of a view this node installed, is gone for good: a
    /// newer generation of its name is a member. A newer generation exists
    /// only once the old process ended, by a crash or a death verdict
    /// (which fenced it), so its datums are failed over as for
    /// [`Handoff::peer_failed`] whatever this node's standing: which side
    /// of a cut this node is on does not change which generation of a name
    /// is alive. For a node membership never reported (a node reborn as a
    /// new generation knows the members of its old view only from that
    /// view), or one it reported failed while this node had no standing
    /// (gone then, but not failed over). Never for a node that left: its
    /// datums are in the hands of the nodes it notified.
    pub fn peer_superseded(&mut self, node: &NodeId, now: Instant) {
        let now = self.clock(now);
        if self.fenced || *node == self.local || !self.in_views(node) {
            return;
        }
        self.failed.insert(node.clone());
        if !self.gone.contains_key(node) {
            self.peer_gone(node, now);
            return;
        }
        info!(node = %self.local, peer = %node, "gone peer superseded: failed over");
        for past in &mut self.history {
            if let Some(i) = past.table.view().index_of_id(node)
                && let Some(g) = past.failed.get_mut(i.get())
            {
                *g = true;
            }
        }
        self.release_unheld_waits(now, true);
        self.check_ended();
    }

    /// `node` left the cluster gracefully (it relinquished what it held
    /// first and sent the notices, possibly under a view this node has not
    /// installed yet): no done marker is expected from it any more, but its
    /// datums are not failed over; their notices are on their way.
    pub fn peer_left(&mut self, node: &NodeId, now: Instant) {
        self.peer_gone(node, now);
    }

    /// The live members of the cluster other than this node, ready or not
    /// (alive or suspect), as membership sees them now; replaces the set
    /// given before. Nodes declared failed or left are ignored.
    ///
    /// A datum is taken without its notice (first owner, failover, or a
    /// notice sent under a view this node skipped) only once each of them has
    /// said done with the view in force, as well as every node of the recent
    /// views. Two nodes that become ready at the same moment, each before it
    /// saw the other ready, each install a view with only themselves; since
    /// each waits for the other's done marker for that view, which the other
    /// never sends, neither acquires until both install the view with both,
    /// and the datum gets one first owner, not two.
    ///
    /// A node whose membership has not seen a peer yet cannot wait for it: a
    /// node must finish joining before it becomes ready.
    pub fn set_peers<'a>(&mut self, peers: impl IntoIterator<Item = &'a NodeId>, now: Instant) {
        let now = self.clock(now);
        if self.fenced {
            return;
        }
        let peers: BTreeSet<NodeId> = peers
            .into_iter()
            .filter(|n| **n != self.local && !self.gone.contains_key(*n))
            .cloned()
            .collect();
        if peers == self.peers {
            return;
        }
        let added: Vec<NodeId> = peers.difference(&self.peers).cloned().collect();
        let removed: Vec<NodeId> = self.peers.difference(&peers).cloned().collect();
        self.peers = peers;
        for n in &removed {
            self.peer_since.remove(n);
        }
        if !added.is_empty() {
            let at = now + self.silent_peer_grace();
            self.add_timer(at, TimerKind::SilentPeer);
        }
        for n in added {
            self.peer_since.insert(n.clone(), now);
            if self.in_views(&n) {
                continue;
            }
            if !self.done_received.contains_key(&n) {
                self.done_missing.insert(n.clone());
            }
            self.push_state(n);
        }
        let mut emptied = false;
        for n in removed {
            if !self.in_views(&n) && self.done_missing.remove(&n) {
                emptied = !self.missing_done(false, now);
            }
        }
        if emptied {
            self.release_unheld_waits(now, false);
        }
        self.check_ended();
    }

    /// Whether `node` is in the view in force or a recent one.
    fn in_views(&self, node: &NodeId) -> bool {
        self.current.view().contains(node)
            || self.history.iter().any(|p| p.table.view().contains(node))
    }

    /// The cluster declared *this* node failed: stop processing every datum
    /// at once. [`Event::Fenced`] is the next event; no job, notice or
    /// release is handed out any more except held work, returned as
    /// [`ReturnReason::Fenced`]. Final: a node rejoins with a new generation
    /// and a new state machine.
    pub fn fence(&mut self, now: Instant) {
        self.clock(now);
        if self.fenced {
            return;
        }
        self.fenced = true;
        let datums = self.registry.map.len()
            - self.registry.count(Phase::Free)
            - self.registry.count(Phase::Relay)
            - self.registry.count(Phase::TokenParked);
        warn!(node = %self.local, datums, "declared failed by the cluster: fenced");
        self.events.push_front(Event::Fenced { datums });
        self.relinquish_queue.clear();
        self.acquire_superseded.clear();
        self.acquire_queue.clear();
        self.out.clear();
        self.transmits.clear();
        self.sent.clear();
        self.retrying.clear();
        self.timers.clear();
        let mut held: Vec<(Datum, VecDeque<W>)> = self.held.drain().collect();
        held.sort_unstable_by_key(|(d, _)| *d);
        self.held_total = 0;
        for (datum, work) in held {
            self.releases.push_back(Release {
                datum,
                to: ReleaseTo::Returned(ReturnReason::Fenced),
                work: work.into(),
            });
        }
        self.transition = None;
    }

    /// Runs everything due at `now`: relinquish deadlines, wait timeouts,
    /// retries, batch lingering, expiry of parked notices.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.clock(now);
        if self.fenced {
            return;
        }
        self.process_timeouts(now);
        self.check_ended();
    }

    // ----- outputs ---------------------------------------------------------

    /// The next relinquish or acquire job for the application, within the
    /// configured concurrency caps. Report it with [`Handoff::job_done`].
    pub fn poll_job(&mut self) -> Option<Job> {
        if self.fenced || !self.standing {
            return None;
        }
        let view = self.current.view_id();
        while self.registry.count(Phase::Relinquishing) < self.config.max_relinquish_jobs {
            let Some(d) = self.relinquish_queue.pop_front() else {
                break;
            };
            let started = self.registry.modify(&d, |s| {
                (s.phase == Phase::RelinquishQueued).then(|| {
                    s.phase = Phase::Relinquishing;
                    *s
                })
            });
            if let Some(s) = started.flatten() {
                return Some(Job {
                    kind: JobKind::Relinquish,
                    datum: d,
                    view,
                    attempt: u32::from(s.attempt) + 1,
                    token: FencingToken(s.token),
                    reason: JobReason::Moving,
                    previous: None,
                    flight: s.flight,
                });
            }
        }
        // Every acquisition's token is at least every epoch this node has
        // heard and its own install count (see `FencingToken`).
        let token = self.install_seq.max(self.heard_epoch);
        while self.standing && self.registry.count(Phase::Acquiring) < self.config.max_acquire_jobs
        {
            let Some(d) = self.acquire_queue.pop_front() else {
                break;
            };
            let started = self.registry.modify(&d, |s| {
                (s.phase == Phase::AcquireQueued).then(|| {
                    s.phase = Phase::Acquiring;
                    s.token = token;
                    *s
                })
            });
            if let Some(s) = started.flatten() {
                return Some(Job {
                    kind: JobKind::Acquire,
                    datum: d,
                    view,
                    attempt: u32::from(s.attempt) + 1,
                    token: FencingToken(s.token),
                    reason: s.reason,
                    previous: self.previous_owner(d, s.reason),
                    flight: s.flight,
                });
            }
        }
        None
    }

    /// The next notice batch to send. Batches fill up to `max_batch`; a
    /// partly filled one goes out once no relinquish is queued or running,
    /// or after `batch_linger`. Report the outcome with [`Handoff::send_done`].
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.fenced {
            return None;
        }
        if self.transmits.is_empty()
            && self.registry.count(Phase::RelinquishQueued) == 0
            && self.registry.count(Phase::Relinquishing) == 0
        {
            for i in 0..self.out.len() {
                self.flush(i);
            }
            self.maybe_send_done();
        }
        self.transmits.pop_front()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next release of held work.
    pub fn poll_release(&mut self) -> Option<Release<W>> {
        self.releases.pop_front()
    }

    /// When [`Handoff::handle_timeout`] should be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.fenced {
            return None;
        }
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| {
            next = Some(next.map_or(t, |n| n.min(t)));
        };
        if let Some(c) = self.cohorts.get(self.rcursor) {
            consider(c.start + self.config.relinquish_timeout);
        }
        if let Some(c) = self.cohorts.front() {
            consider(c.start + self.config.timeout);
        }
        if let Some(Reverse(t)) = self.timers.peek() {
            consider(t.at);
        }
        for b in &self.out {
            if let Some(since) = b.since {
                consider(since + self.config.batch_linger);
            }
        }
        for p in self.parked.values() {
            consider(p.first + self.config.timeout);
        }
        next
    }

    // ----- internals -------------------------------------------------------

    fn clock(&mut self, now: Instant) -> Instant {
        let now = match self.now {
            Some(prev) if prev > now => prev,
            _ => now,
        };
        self.now = Some(now);
        now
    }

    #[inline]
    fn primary_of(&self, id: i64) -> Primary {
        match self.current.primary(id) {
            None => Primary::Nobody,
            Some(p) if Some(p) == self.self_index => Primary::Me,
            Some(p) => Primary::Other(p),
        }
    }

    fn backoff(&self, attempt: u8) -> Duration {
        let factor = 1u32 << u32::from(attempt.saturating_sub(1)).min(16);
        self.config
            .retry_base
            .saturating_mul(factor)
            .min(self.config.retry_max)
    }

    fn add_timer(&mut self, at: Instant, kind: TimerKind) {
        self.timer_seq += 1;
        self.timers.push(Reverse(Timer {
            at,
            seq: self.timer_seq,
            kind,
        }));
    }

    /// Puts `d` in the cohort of instant `now`, creating it if needed.
    fn enter_cohort(&mut self, d: Datum, now: Instant) -> u64 {
        if let Some(c) = self.cohorts.back_mut().filter(|c| c.start == now) {
            c.datums.push(d);
            return c.id;
        }
        let id = self.next_epoch;
        self.next_epoch += 1;
        self.cohorts.push_back(Cohort {
            id,
            start: now,
            datums: vec![d],
        });
        id
    }

    fn start_relinquish(&mut self, d: Datum, mut s: Slot, now: Instant) {
        s.phase = Phase::RelinquishQueued;
        s.attempt = 0;
        s.flight = self.enter_cohort(d, now);
        self.registry.set(d, s);
        self.relinquish_queue.push_back(d);
    }

    /// Whether the nodes other than this one that were the datum's primary
    /// in a recent view may still hold it, and who answers for them.
    fn candidates(&self, id: i64) -> Candidates {
        let (mut any, mut alive) = (false, false);
        for past in &self.history {
            let Some(p) = past.table.primary(id) else {
                continue;
            };
            if Some(p) == past.self_index {
                continue;
            }
            any = true;
            let Some(node) = past.table.view().node(p) else {
                continue;
            };
            // Failed over only for a node declared failed while it was a
            // member (a node that left, or was not ready, stays up and may
            // relinquish under a view this node has not installed yet), and
            // only once the view in force no longer has it: the done markers
            // of that view cover every notice it sent before dying.
            let failed_out = past.failed.get(p.get()).copied().unwrap_or(false)
                && !self.current.view().contains(node);
            if failed_out {
                continue;
            }
            if self.gone.contains_key(node) {
                // Gone after saying done under a view without it: it had
                // relinquished everything (and delivered its notices).
                if self.empty_handed.contains_key(node) {
                    continue;
                }
                return Candidates::Pending;
            }
            // Alive: in `done_missing` until it says done for the view in force.
            alive = true;
        }
        match (any, alive) {
            (_, true) => Candidates::AllDone,
            (true, false) => Candidates::AllGone,
            (false, false) => Candidates::None,
        }
    }

    /// This node became primary of a datum it does not hold.
    fn begin_wait(&mut self, d: Datum, mut s: Slot, now: Instant) {
        s.phase = Phase::Awaiting;
        s.attempt = 0;
        s.flight = self.enter_cohort(d, now);
        s.since = s.flight;
        self.registry.set(d, s);
        self.settle_wait(d, s, now);
    }

    /// The notice this node sent for `d` was delivered, expired or dropped
    /// (`s` is its slot, now `Free`). If this node is the datum's primary
    /// again, it waits for it: the node the notice went to passes it back.
    /// A notice for any view in force since the token left here may bring
    /// it, so the wait counts views from the token's flight on.
    ///
    /// `at`: the node that may have the token now (`None`: not known). Until
    /// the token comes back, the wait ends only by a notice, the timeout,
    /// or the failover of that node: its done markers may predate the token
    /// reaching it (it may get it under a view it has not installed yet).
    fn token_left(&mut self, d: Datum, s: Slot, at: Option<NodeId>, now: Instant) {
        if s.phase != Phase::Free || !matches!(self.primary_of(d.id), Primary::Me) {
            return;
        }
        self.returning.insert(d, at);
        let since = s.flight;
        self.begin_wait(d, s, now);
        self.registry.modify(&d, |s| {
            if s.phase == Phase::Awaiting {
                s.since = since;
            }
        });
    }

    /// A wait ends without a notice once every live node (ready or not) and
    /// every node of the recent views has said done with the view in force:
    /// none of them holds the datum then, so the primary takes it. Until
    /// then it is remembered in `blocked_on_done`. A departed holder that
    /// will never say done leaves the wait to its notice or the timeout.
    fn settle_wait(&mut self, d: Datum, s: Slot, now: Instant) {
        // Only the primary may take a datum without a notice: for a relay,
        // the primary in force (not among the candidates) may hold it.
        if s.phase != Phase::Awaiting || !matches!(self.primary_of(d.id), Primary::Me) {
            return;
        }
        let mut returned = false;
        if let Some(at) = self.returning.get(&d) {
            // This node's own token went to `at` (or nobody knows where):
            // it comes back by notice, unless `at` failed and is out, or
            // `at` is a live target whose done marker for this instance of
            // the view in force is required below (see `answers_for`).
            let failed_out = at
                .as_ref()
                .is_some_and(|n| self.failed.contains(n) && !self.current.view().contains(n));
            if !failed_out {
                if !at.as_ref().is_some_and(|n| self.answers_for(n)) {
                    return;
                }
                returned = true;
            }
        }
        // Without standing no token is minted: a node that may not act as
        // owner takes nothing as first owner, on done markers or by
        // failover. The wait is settled again when standing comes back
        // (`set_standing`). So nodes that form a cluster before any has a
        // lease pass no tokens among themselves as the views grow.
        if !self.standing {
            return;
        }
        let source = match self.candidates(d.id) {
            Candidates::Pending => return,
            // The token is this node's own: whoever was primary since, the
            // node it went to must say done too.
            _ if returned => Source::AllDone,
            Candidates::AllDone => Source::AllDone,
            Candidates::AllGone => Source::OwnerGone,
            Candidates::None => Source::Fresh,
        };
        let fresh = matches!(source, Source::Fresh);
        if self.installing || self.missing_done(fresh, now) {
            self.blocked_on_done.push(d);
        } else if returned && !self.answered_by_token_holder(d) {
            // The node the token went to stopped being a target before it
            // said done (it left the live members): wait for the notice or
            // the timeout.
        } else {
            self.take_token(d, s, source, now);
        }
    }

    /// How long a live member outside every view here that never sent this
    /// node a batch (a member that joined and stays silent, not running a
    /// handoff or withholding its done markers) is waited for before a wait
    /// that has a previous owner ends without its done marker: a quarter of
    /// `timeout` (2.5 s by default) from when it became a member. A first
    /// owner (no previous owner in a recent view) waits for it whatever the
    /// time: two nodes made ready at once must each hear the other first.
    pub fn silent_peer_grace(&self) -> Duration {
        self.config.timeout / 4
    }

    /// Whether a wait must still wait for a done marker: some node in
    /// `done_missing`, other than (unless `fresh`) a silent live member past
    /// its grace (see [`Handoff::silent_peer_grace`]). Such a member is in
    /// no view here (it is no previous owner) and announced nothing: the
    /// datum's token is with the previous owners, whose word the wait has.
    fn missing_done(&self, fresh: bool, now: Instant) -> bool {
        if fresh {
            return !self.done_missing.is_empty();
        }
        let grace = self.silent_peer_grace();
        self.done_missing.iter().any(|n| {
            self.announced.contains_key(n)
                || self.in_views(n)
                || self.peer_since.get(n).is_none_or(|&at| at + grace > now)
        })
    }

    /// Whether `node`, which this node's token for a datum went to, is a
    /// live target that must say done with this instance of the view in
    /// force before any wait ends without a notice (it is in
    /// `done_missing`, or said done already).
    ///
    /// Its done marker ends a wait for the returning token: it answers this
    /// node's announcement of the view in force, an install later than the
    /// one the notice was sent from, so once `node` sent it, a notice of
    /// this node's still parked there is spent (its sender moved on,
    /// `sender_unmoved`) and is never taken; a notice it took was
    /// relinquished or passed on before it said done (a relay is busy until
    /// its notice is delivered), so the token came back or went to a node
    /// that must say done too. The notice was delivered before the wait
    /// began (`token_left`), so it was at `node` before that marker counts.
    fn answers_for(&self, node: &NodeId) -> bool {
        self.is_target(node)
            && (self.done_missing.contains(node) || self.done_received.contains_key(node))
    }

    /// Whether the node datum `d`'s token went to (see
    /// [`Handoff::answers_for`]) said done with this instance of the view in
    /// force.
    fn answered_by_token_holder(&self, d: Datum) -> bool {
        self.returning
            .get(&d)
            .and_then(Option::as_ref)
            .is_some_and(|n| self.is_target(n) && self.done_received.contains_key(n))
    }

    /// One datum under a new view (the view in force is already the new one).
    fn on_view_change(&mut self, d: Datum, now: Instant) {
        let Some(mut s) = self.registry.get(&d) else {
            return;
        };
        let mine = matches!(self.primary_of(d.id), Primary::Me);
        use Phase::*;
        match (s.phase, mine) {
            // A notice on its way (`Passed`, `TokenWait`) stays addressed
            // to the node it went to; this node waits once it has left.
            (Free, true) => {
                // A fresh wait: a token this node sent away long ago and
                // that expired as a relay elsewhere no longer holds it up.
                if !self.returning.is_empty() {
                    self.returning.remove(&d);
                }
                self.begin_wait(d, s, now);
            }
            (Held, false) => self.start_relinquish(d, s, now),
            (RelinquishQueued | RelinquishBackoff, true) => {
                // Came back before the relinquish ran: keep it.
                s.phase = Held;
                self.registry.set(d, s);
            }
            (Awaiting, false) => {
                s.phase = Relay;
                self.registry.set(d, s);
            }
            (Awaiting, true) => {
                // Still waiting: the holder may have seen views this node did
                // not (and kept the datum meanwhile), so the deadline restarts
                // at every view change. It never ends early, only late.
                s.flight = self.enter_cohort(d, now);
                self.registry.set(d, s);
                self.settle_wait(d, s, now);
            }
            (Relay, true) => {
                // A new wait: a notice sent under a view of the old one may
                // be a token that a primary in between made worthless by
                // taking the datum once everyone was done.
                s.phase = Awaiting;
                s.flight = self.enter_cohort(d, now);
                s.since = s.flight;
                self.registry.set(d, s);
                self.settle_wait(d, s, now);
            }
            (AcquireQueued | AcquireBackoff, false) => {
                // Not acquired yet: pass the token on instead.
                s.flight = self.enter_cohort(d, now);
                self.take_token(d, s, Source::PassOn, now);
            }
            (TokenQueued | TokenParked, _) => {
                self.take_token(d, s, Source::Reroute, now);
            }
            (Acquiring, false) => {
                self.acquire_superseded.entry(d).or_insert(now);
            }
            (Acquiring, true) => {
                self.acquire_superseded.remove(&d);
            }
            _ => {}
        }
    }

    /// This node has the datum's token (the right to acquire it): acquire it
    /// if primary here, else pass it to the primary, else keep it.
    fn take_token(&mut self, d: Datum, mut s: Slot, source: Source, now: Instant) {
        let (phase, primary) = self.token_phase(d.id);
        s.phase = phase;
        if phase == Phase::AcquireQueued {
            s.attempt = 0;
        }
        self.registry.set(d, s);
        self.after_token(d, primary, source, now);
    }

    /// Where a token for datum `id` goes: the datum's next phase here.
    #[inline]
    fn token_phase(&self, id: i64) -> (Phase, Primary) {
        let primary = self.primary_of(id);
        let phase = match primary {
            Primary::Me => Phase::AcquireQueued,
            Primary::Other(_) => Phase::TokenQueued,
            Primary::Nobody => Phase::TokenParked,
        };
        (phase, primary)
    }

    /// The effects of a token arriving, once the slot has its new phase.
    fn after_token(&mut self, d: Datum, primary: Primary, source: Source, now: Instant) {
        if !self.returning.is_empty() {
            self.returning.remove(&d);
        }
        match primary {
            Primary::Me => {
                self.acquire_queue.push_back(d);
                let why = match source {
                    Source::Fresh => JobReason::First,
                    Source::Notice | Source::PassOn => JobReason::Handoff,
                    Source::OwnerGone => JobReason::Failover,
                    Source::AllDone => JobReason::NobodyHeld,
                    Source::Timeout => JobReason::Timeout,
                    Source::Relinquished | Source::Reroute => JobReason::Returned,
                };
                self.registry.modify(&d, |s| s.reason = why);
                let reason = match source {
                    Source::Timeout => {
                        self.counters.acquired_after_timeout += 1;
                        Some(WithoutNotice::Timeout)
                    }
                    Source::OwnerGone => {
                        self.counters.acquired_owner_gone += 1;
                        Some(WithoutNotice::OwnerGone)
                    }
                    Source::AllDone => {
                        self.counters.acquired_all_done += 1;
                        Some(WithoutNotice::AllDone)
                    }
                    _ => None,
                };
                // Other notices for it, parked under views not seen here,
                // are spent: a recurring view id must not revive them.
                self.forget_parked(d);
                if let Some(reason) = reason {
                    debug!(node = %self.local, datum = %d, ?reason, "acquiring without notice");
                    self.events
                        .push_back(Event::AcquiredWithoutNotice { datum: d, reason });
                }
            }
            Primary::Other(i) => {
                if matches!(source, Source::Notice | Source::OwnerGone) {
                    self.counters.notices_relayed += 1;
                }
                let full = if let Some(buf) = self.out.get_mut(i.get()) {
                    buf.datums.push(d);
                    if buf.since.is_none() {
                        buf.since = Some(now);
                    }
                    buf.datums.len() >= self.config.max_batch
                } else {
                    false
                };
                if full {
                    self.flush(i.get());
                }
            }
            Primary::Nobody => {}
        }
        self.maybe_release(d);
    }

    /// Moves the outgoing buffer of node index `i` to the transmit queue.
    fn flush(&mut self, i: usize) {
        let Some(buf) = self.out.get_mut(i) else {
            return;
        };
        buf.since = None;
        let pending = std::mem::take(&mut buf.datums);
        if pending.is_empty() {
            return;
        }
        let Some(to) = self.current.view().node(NodeIndex(i as u32)).cloned() else {
            return;
        };
        let mut datums = Vec::with_capacity(pending.len());
        for d in pending {
            let passed = self.registry.modify(&d, |s| {
                let queued = s.phase == Phase::TokenQueued;
                if queued {
                    s.phase = Phase::Passed;
                }
                queued
            });
            if passed == Some(true) {
                datums.push(d);
            }
        }
        if datums.is_empty() {
            return;
        }
        let address = Address {
            to,
            view: self.current.view_id(),
            epoch: self.install_seq,
        };
        self.send_notices(address, datums);
    }

    /// Hands out one notice batch for `datums` (already `Passed`).
    fn send_notices(&mut self, address: Address, datums: Vec<Datum>) {
        // Grouped by type; the datums keep the registry's order (the
        // encoder sorts the ids), so the completions walk memory in order.
        let mut groups: Vec<(DatumType, NoticeGroup)> = Vec::new();
        for d in &datums {
            let at = match groups.iter().position(|(ty, _)| *ty == d.ty) {
                Some(at) => at,
                None => {
                    let name = self.types.name(d.ty).unwrap_or_default().to_owned();
                    groups.push((
                        d.ty,
                        NoticeGroup {
                            datum_type: name,
                            ids: Vec::new(),
                        },
                    ));
                    groups.len() - 1
                }
            };
            if let Some((_, g)) = groups.get_mut(at) {
                g.ids.push(d.id);
            }
        }
        groups.sort_unstable_by_key(|(ty, _)| *ty);
        let groups: Vec<NoticeGroup> = groups.into_iter().map(|(_, g)| g).collect();
        let id = self.next_send;
        self.next_send += 1;
        self.counters.batches_sent += 1;
        self.counters.notices_sent += datums.len() as u64;
        let to = address.to.clone();
        let batch = NoticeBatch {
            view: address.view,
            from: self.local.clone(),
            to: to.clone(),
            groups,
            epoch: address.epoch,
            done: false,
            echo: 0,
        };
        self.sent.insert(
            id,
            SentBatch {
                datums,
                state: None,
                notice: Some(address),
            },
        );
        self.transmits.push_back(Transmit {
            id: SendId(id),
            to,
            batch,
        });
    }

    fn locate_view(&self, view: ViewId) -> ViewAt {
        if view == self.current.view_id() {
            return ViewAt::Current;
        }
        if let Some(i) = self.history.iter().position(|p| p.table.view_id() == view) {
            return ViewAt::Past(i);
        }
        if self.seen.contains_key(&view) {
            ViewAt::Stale
        } else {
            ViewAt::Unknown
        }
    }

    /// One notice for a view this node knows (in force or recent).
    fn take_notice(
        &mut self,
        at: ViewAt,
        d: Datum,
        src: Src<'_>,
        now: Instant,
        report: &mut NoticeReport,
    ) {
        let (table, self_idx, left_epoch) = match at {
            ViewAt::Current => (&self.current, self.self_index, None),
            ViewAt::Past(i) => match self.history.get(i) {
                Some(p) => (&p.table, p.self_index, Some(p.left_epoch)),
                None => {
                    report.stale += 1;
                    return;
                }
            },
            ViewAt::Stale | ViewAt::Unknown => {
                report.stale += 1;
                return;
            }
        };
        let view = table.view_id();
        let primary = table.primary(d.id);
        if primary.is_none() || primary != self_idx {
            report.misdirected += 1;
            return;
        }
        if self.is_copy(d, src) {
            report.copies += 1;
            return;
        }
        // This node told the sender it was done with a later install of the
        // sender's: the sender may have counted that marker to take the
        // datum back (`answers_for`), so this older token is spent.
        let spent = self.answered_later(src);
        enum Taken {
            Yes,
            Stale,
            Duplicate,
        }
        let (phase, primary) = self.token_phase(d.id);
        let taken = self.registry.modify(&d, |s| match s.phase {
            Phase::Awaiting | Phase::Relay => {
                // A past view counts only if it was in force during this wait.
                if spent || left_epoch.is_some_and(|left| left <= s.since) {
                    Taken::Stale
                } else {
                    s.phase = phase;
                    if phase == Phase::AcquireQueued {
                        s.attempt = 0;
                    }
                    Taken::Yes
                }
            }
            // This node's own notice, still on its way as far as it knows
            // (the send outcome is not in, or it failed and waits for a
            // retry), comes back through the node it went to: the token is
            // here again. A past view counts only if it was in force after
            // the token left.
            Phase::Passed | Phase::TokenWait => {
                if spent || left_epoch.is_some_and(|left| left <= s.flight) {
                    Taken::Stale
                } else {
                    s.phase = phase;
                    s.attempt = 0;
                    Taken::Yes
                }
            }
            Phase::Free => Taken::Stale,
            _ => Taken::Duplicate,
        });
        match taken {
            // A type created on demand: the datum exists from its first
            // notice here. Registered now, it waits as any moving datum
            // and the notice is taken as for a datum registered before.
            None if self.on_demand.contains(&d.ty) && !self.fenced => {
                if matches!(self.register(d, now), Ok(true)) {
                    self.counters.registered_on_demand += 1;
                    self.take_notice(at, d, src, now, report);
                } else {
                    self.park(view, d, src, now, report);
                }
            }
            // Not registered (yet): keep it for a registration during this view.
            None => self.park(view, d, src, now, report),
            Some(Taken::Yes) => {
                report.accepted += 1;
                self.note_taken(d, src, now);
                self.after_token(d, primary, Source::Notice, now);
            }
            Some(Taken::Stale) => report.stale += 1,
            Some(Taken::Duplicate) => report.duplicate += 1,
        }
    }

    /// The key of a notice's sender in `taken`.
    fn sender_key(&self, node: &NodeId) -> u64 {
        use std::hash::BuildHasher;
        self.registry.map.hasher().hash_one(node)
    }

    /// Whether this node already took this very notice (same sender, same
    /// install count of the sender, same datum): a copy whose token is
    /// spent. A node relinquishes or passes on a datum at most once per
    /// install of its own, so the pair names one notice.
    fn is_copy(&self, d: Datum, src: Src<'_>) -> bool {
        self.taken
            .get(&d)
            .is_some_and(|&(k, e)| e == src.epoch && k == src.key)
    }

    /// Whether this node answered an announcement of the notice's sender
    /// made at a later install than the notice's with a done marker: the
    /// sender may have counted that marker, so the notice's token is spent.
    fn answered_later(&self, src: Src<'_>) -> bool {
        self.answered
            .get(src.node)
            .is_some_and(|&(_, e)| e != FAREWELL && e > src.epoch)
    }

    fn note_taken(&mut self, d: Datum, src: Src<'_>, now: Instant) {
        self.sender_names
            .entry(src.key)
            .or_insert_with(|| src.node.clone());
        self.taken.insert(d, (src.key, src.epoch));
        self.taken_order.push_back((now, d, src.epoch));
    }

    fn park(
        &mut self,
        view: ViewId,
        d: Datum,
        src: Src<'_>,
        now: Instant,
        report: &mut NoticeReport,
    ) {
        if self.parked_total >= self.config.max_parked {
            report.overflow += 1;
            return;
        }
        let p = self.parked.entry(view).or_insert_with(|| Parked {
            first: now,
            datums: HashMap::default(),
            senders: Vec::new(),
        });
        let i = match p
            .senders
            .iter()
            .position(|(n, e)| n == src.node && *e == src.epoch)
        {
            Some(i) => i,
            None => {
                p.senders.push((src.node.clone(), src.epoch));
                p.senders.len() - 1
            }
        };
        if let std::collections::hash_map::Entry::Vacant(v) = p.datums.entry(d) {
            v.insert(i as u32);
            self.parked_total += 1;
            report.parked += 1;
        } else {
            report.duplicate += 1;
        }
    }

    /// Whether the sender of a parked notice is still at the install it sent
    /// it from. Once it moved on, another node may have taken the datum from
    /// the done markers of a later view (a new token), so this old one is
    /// spent; if it was the only one, the done markers or the timeout end the
    /// wait. A notice of a sender that left or failed is spent too; one never
    /// heard from otherwise is taken at its word.
    fn sender_unmoved(&self, node: &NodeId, epoch: u64) -> bool {
        if self.gone.contains_key(node) {
            // It left or failed: an announcement of a later install may have
            // been lost with it (a send that failed is not retried by a node
            // that is gone), while another node, told by its done marker
            // that it holds nothing, took the datum.
            return false;
        }
        self.announced.get(node).is_none_or(|(e, _)| *e == epoch)
    }

    fn forget_parked(&mut self, d: Datum) {
        if self.parked_total == 0 {
            return;
        }
        let mut removed = 0;
        for p in self.parked.values_mut() {
            removed += usize::from(p.datums.remove(&d).is_some());
        }
        self.parked_total = self.parked_total.saturating_sub(removed);
    }

    fn count_report(&mut self, r: &NoticeReport) {
        let c = &mut self.counters;
        c.notices_accepted += r.accepted as u64;
        c.notices_duplicate += r.duplicate as u64;
        c.notices_stale += r.stale as u64;
        c.notices_misdirected += r.misdirected as u64;
        c.notices_parked += r.parked as u64;
        c.notices_parked_dropped += r.overflow as u64;
        c.notices_unknown_type += r.unknown_type as u64;
        c.notices_copy_refused += r.copies as u64;
    }

    fn peer_gone(&mut self, node: &NodeId, now: Instant) {
        let now = self.clock(now);
        if self.fenced {
            return;
        }
        if *node == self.local {
            self.fence(now);
            return;
        }
        if self.gone.contains_key(node) {
            return;
        }
        if self.gone.len() >= 65_536 {
            // Bounded: the oldest departure not named by a view goes first.
            let current = Arc::clone(&self.current);
            let history = &self.history;
            let oldest = self
                .gone
                .iter()
                .filter(|(n, _)| {
                    !current.view().contains(n)
                        && !history.iter().any(|p| p.table.view().contains(n))
                })
                .min_by_key(|(_, at)| **at)
                .map(|(n, _)| n.clone());
            if let Some(n) = oldest {
                self.gone.remove(&n);
            }
        }
        self.gone.insert(node.clone(), now);
        info!(node = %self.local, peer = %node, "peer gone");
        if self.failed.contains(node) {
            for past in &mut self.history {
                if let Some(i) = past.table.view().index_of_id(node)
                    && let Some(g) = past.failed.get_mut(i.get())
                {
                    *g = true;
                }
            }
        }
        self.peers.remove(node);
        // `announced` keeps its last install count: a notice it sent before
        // it moved on and left stays spent (see `sender_unmoved`).
        self.answered.remove(node);
        self.done_received.remove(node);
        self.done_missing.remove(node);
        self.release_unheld_waits(now, true);
        self.check_ended();
    }

    /// Once every node that may hold something has said "done" for the view
    /// in force: the waits that no live node can answer end now.
    ///
    /// `all`: look at every wait (a node is gone: candidates changed), not
    /// only those that were blocked on done markers.
    fn release_unheld_waits(&mut self, now: Instant, all: bool) {
        let waiting = if all {
            let mut waiting = Vec::new();
            for c in &self.cohorts {
                for d in &c.datums {
                    if self.registry.get(d).is_some_and(|s| {
                        s.flight == c.id && matches!(s.phase, Phase::Awaiting | Phase::Relay)
                    }) {
                        waiting.push(*d);
                    }
                }
            }
            self.blocked_on_done.clear();
            waiting
        } else if !self.missing_done(false, now) {
            // Waits of first owners still blocked (on a silent member) go
            // back on the list in `settle_wait`.
            std::mem::take(&mut self.blocked_on_done)
        } else {
            return;
        };
        for d in waiting {
            if let Some(s) = self
                .registry
                .get(&d)
                .filter(|s| matches!(s.phase, Phase::Awaiting | Phase::Relay))
            {
                self.settle_wait(d, s, now);
            }
        }
    }

    /// A new view is in force: every node of it and of the recent views
    /// (other than this one, not gone) must say "done" again.
    fn reset_done(&mut self) {
        let mut expected = BTreeSet::new();
        for n in self.current.view().nodes() {
            expected.insert(n.clone());
        }
        for p in &self.history {
            for n in p.table.view().nodes() {
                expected.insert(n.clone());
            }
        }
        expected.extend(self.peers.iter().cloned());
        expected.remove(&self.local);
        for g in self.gone.keys() {
            expected.remove(g);
        }
        self.done_received.clear();
        self.done_missing = expected;
        self.blocked_on_done.clear();
    }

    /// Whether anything is left to relinquish (or acquire and then hand on)
    /// under the view in force, or a notice is not delivered yet.
    fn is_busy(&self) -> bool {
        use Phase::*;
        [
            RelinquishQueued,
            Relinquishing,
            RelinquishBackoff,
            TokenWait,
            TokenQueued,
            // Done follows the delivery of every notice: a primary that has
            // everyone's done marker and no notice takes the datum, and a
            // notice still on its way would then arrive as a duplicate.
            Passed,
            Acquiring,
        ]
        .iter()
        .any(|&p| self.registry.count(p) > 0)
    }

    /// Whether this node exchanges its state with `node`: a live member or a
    /// node of the view in force or a recent one, not gone.
    fn is_target(&self, node: &NodeId) -> bool {
        *node != self.local
            && !self.gone.contains_key(node)
            && (self.peers.contains(node) || self.in_views(node))
    }

    /// Every node this node exchanges its state with: the nodes of the view
    /// in force and of the recent views, and the live members, minus gone
    /// ones.
    fn targets(&self) -> BTreeSet<NodeId> {
        self.current
            .view()
            .nodes()
            .iter()
            .chain(self.history.iter().flat_map(|p| p.table.view().nodes()))
            .chain(self.peers.iter())
            .filter(|n| **n != self.local && !self.gone.contains_key(*n))
            .cloned()
            .collect()
    }

    /// Tells every target where this node stands (just installed a view).
    fn announce(&mut self) {
        for to in self.targets() {
            self.push_state(to);
        }
    }

    /// Once nothing is left to relinquish under the view in force: a done
    /// marker to each target already at that view. The others get theirs
    /// when they say they are there ([`Handoff::peer_state`]), except when
    /// this node is not in the view in force: then every target gets one at
    /// once (a farewell, see [`Handoff::push_state`]), since a node on its
    /// way out may be gone before the others get to that view.
    fn maybe_send_done(&mut self) {
        if self.fenced || self.done_seq == Some(self.install_seq) || self.is_busy() {
            return;
        }
        self.done_seq = Some(self.install_seq);
        let view = self.current.view_id();
        let seq = self.install_seq;
        let due: Vec<NodeId> = if self.self_index.is_none() {
            self.targets()
                .into_iter()
                .filter(|n| self.answered.get(n).is_none_or(|(s, _)| *s != seq))
                .collect()
        } else {
            self.announced
                .iter()
                .filter(|(n, (e, v))| {
                    *v == view && self.answered.get(*n) != Some(&(seq, *e)) && self.is_target(n)
                })
                .map(|(n, _)| n.clone())
                .collect()
        };
        for to in due {
            self.push_state(to);
        }
    }

    /// Records what the latest word of `from` (at its install count
    /// `epoch`) says of what it holds. A done marker for a view without
    /// `from` means it relinquished everything and had its notices delivered
    /// to that view's primaries. It counts once that view is the view in
    /// force here or a recent one: its notices then went to this node for
    /// what this node owns (or to a primary this node was past, which passes
    /// them on). A marker for a view this node has not installed yet waits
    /// for that view (`pending_done`): under an older view here, a node it
    /// sent a notice to may take the datum while this node would take it
    /// too. A node done with a view without itself says so to every target
    /// (echo [`FAREWELL`]), whatever view they are at, since it may be gone
    /// before they get there.
    ///
    /// Until `from` installs another view (a later epoch), it acquires
    /// nothing: only a primary acquires, and that view names it nowhere. So
    /// only a later epoch clears the mark (a batch of the same epoch is an
    /// older announcement overtaken on the way, or a notice it passed on as a
    /// relay), as does installing a view here that names it while it is not
    /// gone. Returns whether `from` just became empty-handed.
    fn note_last_word(
        &mut self,
        from: &NodeId,
        view: ViewId,
        epoch: u64,
        done: Option<u64>,
    ) -> bool {
        if self
            .pending_done
            .get(from)
            .is_some_and(|(e, _)| epoch > *e || done.is_some())
        {
            self.pending_done.remove(from);
        }
        let empty = match done {
            None => false,
            Some(_) => {
                let table = if view == self.current.view_id() {
                    Some(&self.current)
                } else {
                    self.history
                        .iter()
                        .find(|p| p.table.view_id() == view)
                        .map(|p| &p.table)
                };
                match table {
                    Some(t) => !t.view().contains(from),
                    None => {
                        if self.pending_done.len() < 65_536 {
                            self.pending_done.insert(from.clone(), (epoch, view));
                        }
                        false
                    }
                }
            }
        };
        match self.empty_handed.get(from) {
            Some(&e) if e >= epoch => false,
            Some(_) if !empty => {
                self.empty_handed.remove(from);
                false
            }
            Some(_) => {
                self.empty_handed.insert(from.clone(), epoch);
                false
            }
            None if empty => {
                self.empty_handed.insert(from.clone(), epoch);
                true
            }
            None => false,
        }
    }

    /// What a batch from `from` says of it: it is at instance `epoch` of
    /// `view`, and (`done = Some(echo)`) done with it, answering this node's
    /// instance `echo`. A done marker counts only for the instance it
    /// answers, and stops counting once `from` says it moved on: a recurring
    /// view id never revives an old marker.
    fn peer_state(
        &mut self,
        from: &NodeId,
        view: ViewId,
        epoch: u64,
        done: Option<u64>,
        now: Instant,
    ) {
        // A gone node's last batches may arrive after it left (or after it
        // was declared failed): they still tell what it held when it went.
        let gone = self.gone.contains_key(from);
        if !gone && !self.is_target(from) {
            return;
        }
        // Batches may arrive out of order: only the latest one speaks.
        if self.announced.get(from).is_some_and(|(e, _)| epoch < *e) {
            return;
        }
        if self.announced.len() < 65_536 || self.announced.contains_key(from) {
            self.announced.insert(from.clone(), (epoch, view));
        }
        let emptied = self.note_last_word(from, view, epoch, done);
        if gone {
            if emptied {
                // It was a possible holder of the waits it appears in.
                self.release_unheld_waits(now, true);
            }
            return;
        }
        let current = self.current.view_id();
        let counted = view == current && done == Some(self.install_seq);
        if counted {
            self.done_received.insert(from.clone(), epoch);
            if self.done_missing.remove(from) && !self.missing_done(false, now) {
                self.release_unheld_waits(now, false);
            }
        } else if self
            .done_received
            .get(from)
            .is_some_and(|&e| view != current || epoch > e)
        {
            // It moved on since its marker: the marker no longer speaks for
            // the view in force here.
            self.done_received.remove(from);
            self.done_missing.insert(from.clone());
        }
        // A node done with a view without itself answers every new
        // announcement with a farewell: it may have become ready again in
        // the meantime as far as `from` knows (a view naming this node
        // clears the earlier one there), and this one is news from after
        // that announcement.
        if (view == current || self.self_index.is_none())
            && self.done_seq == Some(self.install_seq)
            && self.answered.get(from) != Some(&(self.install_seq, epoch))
        {
            self.push_state(from.clone());
        }
    }

    /// Sends `to` where this node stands: a done marker answering its
    /// latest batch if both are at the view in force and this node is done
    /// with it, else an announcement of the view and install count. A node
    /// that is done with a view without itself says so to every target
    /// (echo [`FAREWELL`], which answers no instance and is never counted as
    /// one): it holds nothing, which lets the others stop waiting for it
    /// once it is gone, even if they reach that view only after it left.
    fn push_state(&mut self, to: NodeId) {
        let view = self.current.view_id();
        let done = self.done_seq == Some(self.install_seq);
        let latest = self.announced.get(&to).copied();
        // The echo sent, and the announcement it answers (`answered`).
        let answer = match latest {
            Some((e, v)) if v == view && done => Some((e, e)),
            _ if done && self.self_index.is_none() => {
                Some((FAREWELL, latest.map_or(FAREWELL, |(e, _)| e)))
            }
            _ => None,
        };
        if let Some((_, e)) = answer
            && (self.answered.len() < 65_536 || self.answered.contains_key(&to))
        {
            self.answered.insert(to.clone(), (self.install_seq, e));
        }
        let answer = answer.map(|(echo, _)| echo);
        let id = self.next_send;
        self.next_send += 1;
        let batch = NoticeBatch {
            view,
            from: self.local.clone(),
            to: to.clone(),
            groups: Vec::new(),
            epoch: self.install_seq,
            done: answer.is_some(),
            echo: answer.unwrap_or(0),
        };
        self.sent.insert(
            id,
            SentBatch {
                datums: Vec::new(),
                state: Some(to.clone()),
                notice: None,
            },
        );
        self.transmits.push_back(Transmit {
            id: SendId(id),
            to,
            batch,
        });
    }

    fn process_timeouts(&mut self, now: Instant) {
        let abandoned = self.counters.relinquish_abandoned;
        let timed_out = self.counters.acquired_after_timeout;
        self.run_deadlines(now);
        let abandoned = self.counters.relinquish_abandoned - abandoned;
        let timed_out = self.counters.acquired_after_timeout - timed_out;
        if abandoned > 0 || timed_out > 0 {
            warn!(
                node = %self.local, abandoned, timed_out,
                "handoff deadlines passed: relinquishes abandoned, datums acquired without notice"
            );
        }
    }

    fn run_deadlines(&mut self, now: Instant) {
        // Relinquish deadlines: give up and stop holding.
        while let Some(c) = self.cohorts.get_mut(self.rcursor) {
            if c.start + self.config.relinquish_timeout > now {
                break;
            }
            let id = c.id;
            let datums = std::mem::take(&mut c.datums);
            for &d in &datums {
                self.abandon_relinquish(d, id);
            }
            if let Some(c) = self.cohorts.get_mut(self.rcursor) {
                c.datums = datums;
            }
            self.rcursor += 1;
        }
        // Full deadlines: waits acquire, tokens expire, relays stop.
        while let Some(c) = self.cohorts.front() {
            if c.start + self.config.timeout > now {
                break;
            }
            let Some(c) = self.cohorts.pop_front() else {
                break;
            };
            self.rcursor = self.rcursor.saturating_sub(1);
            for d in c.datums {
                let Some(mut s) = self.registry.get(&d).filter(|s| s.flight == c.id) else {
                    continue;
                };
                use Phase::*;
                match s.phase {
                    Awaiting => self.take_token(d, s, Source::Timeout, now),
                    Relay => {
                        s.phase = Free;
                        self.registry.set(d, s);
                        if !self.returning.is_empty() {
                            self.returning.remove(&d);
                        }
                    }
                    TokenWait | TokenQueued | TokenParked | Passed => {
                        self.counters.notices_expired += 1;
                        s.phase = Free;
                        self.registry.set(d, s);
                        self.token_left(d, s, None, now);
                        self.maybe_release(d);
                    }
                    RelinquishQueued | Relinquishing | RelinquishBackoff => {
                        self.abandon_relinquish(d, c.id);
                    }
                    _ => {}
                }
            }
        }
        // Retries.
        while let Some(Reverse(t)) = self.timers.peek() {
            if t.at > now {
                break;
            }
            let Some(Reverse(t)) = self.timers.pop() else {
                break;
            };
            self.fire(t.kind, now);
        }
        // Lingering batches.
        for i in 0..self.out.len() {
            let due = self
                .out
                .get(i)
                .and_then(|b| b.since)
                .is_some_and(|since| since + self.config.batch_linger <= now);
            if due {
                self.flush(i);
            }
        }
        // Parked notices for views that never came.
        let timeout = self.config.timeout;
        let expired: Vec<ViewId> = self
            .parked
            .iter()
            .filter(|(_, p)| p.first + timeout <= now)
            .map(|(v, _)| *v)
            .collect();
        for v in expired {
            if let Some(p) = self.parked.remove(&v) {
                self.parked_total = self.parked_total.saturating_sub(p.datums.len());
                self.counters.notices_parked_dropped += p.datums.len() as u64;
            }
        }
        self.prune(now);
    }

    fn abandon_relinquish(&mut self, d: Datum, flight: u64) {
        let Some(mut s) = self.registry.get(&d).filter(|s| {
            s.flight == flight
                && matches!(
                    s.phase,
                    Phase::RelinquishQueued | Phase::Relinquishing | Phase::RelinquishBackoff
                )
        }) else {
            return;
        };
        if matches!(self.primary_of(d.id), Primary::Me) {
            // The datum came back here meanwhile: nobody else will take it.
            // A running job finishes (success: acquire again; failure: kept).
            if s.phase != Phase::Relinquishing {
                s.phase = Phase::Held;
                self.registry.set(d, s);
                self.maybe_release(d);
            }
            return;
        }
        debug!(node = %self.local, datum = %d, "relinquish abandoned at its deadline");
        self.counters.relinquish_abandoned += 1;
        s.phase = Phase::Free;
        self.registry.set(d, s);
        self.events
            .push_back(Event::RelinquishAbandoned { datum: d });
        self.maybe_release(d);
    }

    fn fire(&mut self, kind: TimerKind, now: Instant) {
        match kind {
            TimerKind::RelinquishRetry {
                datum,
                flight,
                attempt,
            } => {
                let Some(mut s) = self.registry.get(&datum).filter(|s| {
                    s.phase == Phase::RelinquishBackoff
                        && s.flight == flight
                        && s.attempt == attempt
                }) else {
                    return;
                };
                if matches!(self.primary_of(datum.id), Primary::Me) {
                    s.phase = Phase::Held;
                    self.registry.set(datum, s);
                    self.maybe_release(datum);
                } else {
                    s.phase = Phase::RelinquishQueued;
                    self.registry.set(datum, s);
                    self.relinquish_queue.push_back(datum);
                }
            }
            TimerKind::AcquireRetry {
                datum,
                flight,
                attempt,
            } => {
                let Some(mut s) = self.registry.get(&datum).filter(|s| {
                    s.phase == Phase::AcquireBackoff && s.flight == flight && s.attempt == attempt
                }) else {
                    return;
                };
                if matches!(self.primary_of(datum.id), Primary::Me) {
                    s.phase = Phase::AcquireQueued;
                    self.registry.set(datum, s);
                    self.acquire_queue.push_back(datum);
                } else {
                    s.flight = self.enter_cohort(datum, now);
                    self.take_token(datum, s, Source::PassOn, now);
                }
            }
            TimerKind::AbandonRelinquish { datum, flight } => {
                self.abandon_relinquish(datum, flight);
            }
            TimerKind::SilentPeer => self.release_unheld_waits(now, false),
            TimerKind::ResendState { to, seq } => {
                if seq == self.install_seq && self.is_target(&to) {
                    self.push_state(to);
                }
            }
            TimerKind::Resend { key } => {
                let Some(retry) = self.retrying.remove(&key) else {
                    return;
                };
                let gone = self.gone.contains_key(&retry.address.to);
                let mut datums = Vec::new();
                for (d, flight) in retry.datums {
                    let Some(mut s) = self
                        .registry
                        .get(&d)
                        .filter(|s| s.phase == Phase::TokenWait && s.flight == flight)
                    else {
                        continue;
                    };
                    if gone {
                        // Never re-addressed: the token is dropped, as if it
                        // expired; the done markers or the timeout end the wait.
                        self.counters.notices_undeliverable += 1;
                        s.phase = Phase::Free;
                        s.attempt = 0;
                        self.registry.set(d, s);
                        self.token_left(d, s, Some(retry.address.to.clone()), now);
                        self.maybe_release(d);
                    } else {
                        s.phase = Phase::Passed;
                        self.registry.set(d, s);
                        datums.push(d);
                    }
                }
                if !datums.is_empty() {
                    self.send_notices(retry.address, datums);
                }
            }
        }
    }

    /// For an acquire after a handoff: the sender of the notice taken for
    /// `d` (kept `2 × timeout`, see `taken`).
    fn previous_owner(&self, d: Datum, reason: JobReason) -> Option<NodeId> {
        if reason != JobReason::Handoff {
            return None;
        }
        let (key, _) = self.taken.get(&d)?;
        self.sender_names.get(key).cloned()
    }

    fn prune(&mut self, now: Instant) {
        let timeout = self.config.timeout;
        // A copy of a notice comes at most `timeout` after its sender's view
        // change (it stops retrying then) plus one transfer: twice the
        // timeout covers it.
        let keep_taken = timeout.saturating_mul(2);
        while let Some(&(at, d, epoch)) = self.taken_order.front() {
            if at + keep_taken >= now {
                break;
            }
            self.taken_order.pop_front();
            if self.taken.get(&d).is_some_and(|&(_, e)| e == epoch) {
                self.taken.remove(&d);
            }
        }
        if self.taken.is_empty() {
            self.sender_names.clear();
        }
        while self.history.len() > self.config.max_history {
            self.history.pop_back();
        }
        while self.history.back().is_some_and(|p| p.left + timeout < now) {
            self.history.pop_back();
        }
        // Views seen are remembered longer, to recognise stale notices.
        let keep = timeout.saturating_mul(16);
        if self.seen.len() > 64 {
            self.seen.retain(|_, left| *left + keep >= now);
        }
        if self.seen.len() > 4096 {
            let mut by_age: Vec<(Instant, ViewId)> =
                self.seen.iter().map(|(v, t)| (*t, *v)).collect();
            by_age.sort_unstable();
            for (_, v) in by_age.iter().take(self.seen.len() - 4096) {
                self.seen.remove(v);
            }
        }
        if !self.gone.is_empty() {
            let current = Arc::clone(&self.current);
            let history = &self.history;
            let known = |n: &NodeId| {
                current.view().contains(n) || history.iter().any(|p| p.table.view().contains(n))
            };
            let keep = timeout.saturating_mul(16);
            self.gone.retain(|n, at| known(n) || *at + keep >= now);
            // A failed node is remembered as long as its departure: a view
            // may name it again after the views that knew it were pruned
            // (a membership view still holding its old generation at a
            // heal), and its datums must still fail over, not wait for the
            // timeout as those of a node that left.
            let gone = &self.gone;
            self.failed.retain(|n| known(n) || gone.contains_key(n));
            self.empty_handed
                .retain(|n, _| known(n) || gone.contains_key(n));
        }
        if !self.pending_done.is_empty() {
            let current = Arc::clone(&self.current);
            let (history, gone, peers) = (&self.history, &self.gone, &self.peers);
            self.pending_done.retain(|n, _| {
                peers.contains(n)
                    || gone.contains_key(n)
                    || current.view().contains(n)
                    || history.iter().any(|p| p.table.view().contains(n))
            });
        }
    }

    fn replica_events(
        &mut self,
        old: &PlacementTable,
        old_self: Option<NodeIndex>,
        new: &PlacementTable,
    ) {
        let map: Vec<Option<NodeIndex>> = old
            .view()
            .nodes()
            .iter()
            .map(|n| new.view().index_of_id(n))
            .collect();
        let role = |row: &[NodeIndex], me: Option<NodeIndex>| match me
            .and_then(|me| row.iter().position(|&x| x == me))
        {
            Some(0) => Role::Primary,
            Some(_) => Role::Replica,
            None => Role::None,
        };
        let mut datums: Vec<Datum> = self.registry.map.keys().copied().collect();
        datums.sort_unstable();
        for d in datums {
            let old_row = old.owners(d.id);
            let new_row = new.owners(d.id);
            let previous = role(old_row, old_self);
            let current = role(new_row, self.self_index);
            if previous == Role::None && current == Role::None {
                continue;
            }
            let same = old_row.len() == new_row.len()
                && old_row.iter().all(|i| {
                    map.get(i.get())
                        .copied()
                        .flatten()
                        .is_some_and(|j| new_row.contains(&j))
                });
            if !same {
                self.events.push_back(Event::ReplicasChanged {
                    datum: d,
                    view: new.view_id(),
                    previous,
                    current,
                });
            }
        }
    }

    fn maybe_release(&mut self, d: Datum) {
        if self.held.is_empty() || !self.held.contains_key(&d) {
            return;
        }
        let to = match self.route(d) {
            Route::Hold => return,
            Route::Process => ReleaseTo::Process,
            Route::Forward(n) => ReleaseTo::Forward(n.clone()),
            Route::Fenced => ReleaseTo::Returned(ReturnReason::Fenced),
        };
        if let Some(work) = self.held.remove(&d) {
            self.held_total = self.held_total.saturating_sub(work.len());
            self.releases.push_back(Release {
                datum: d,
                to,
                work: work.into(),
            });
        }
    }

    fn recheck_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut keys: Vec<Datum> = self.held.keys().copied().collect();
        keys.sort_unstable();
        for d in keys {
            self.maybe_release(d);
        }
    }

    fn check_ended(&mut self) {
        self.maybe_send_done();
        if let Some(view) = self.transition
            && self.is_idle()
        {
            self.transition = None;
            info!(node = %self.local, view = %view, "transition ended");
            self.events.push_back(Event::TransitionEnded { view });
        }
    }
}
