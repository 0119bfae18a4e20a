//! The per-node handoff state machine. See the crate docs and
//! `docs/transition.md` for the protocol. This file holds the state, its
//! accessors, fencing and the helpers the child modules share; each child
//! module owns one concern of the implementation.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_placement::{NodeId, NodeIndex, PlacementTable, ViewId};
use tracing::{debug, info, warn};

use crate::datum::{DetState, TypeRegistry};
use crate::error::{ConfigError, HoldError, HoldErrorKind, NoticeError, RegistryError};
use crate::types::{
    Config, Counters, DatumState, FencingToken, HandoffEvent, Job, JobKind, JobReason,
    NoticeReport, Progress, Release, ReleaseTo, ReturnReason, Role, Route, SendId, Transmit,
    WithoutNotice,
};
use crate::wire::{NoticeBatch, NoticeGroup};
use crate::{Datum, DatumType};

mod install;
mod jobs;
mod notices_in;
mod peer_state;
mod peers;
mod registry;
mod timers;
mod tokens;
mod waits;
mod work;

use peer_state::Peers;
use registry::{Phase, Registry, Slot};
use timers::{Timer, TimerKind};

/// The echo of a done marker that answers no instance of the receiver (see
/// [`Handoff::push_state`]). Install counts never reach it.
const FAREWELL: u64 = u64::MAX;

/// Datums whose registry slots are read together ahead of a loop's
/// lookups ([`Registry::warm`]).
const WARM_AHEAD: usize = 32;

/// How far ahead of every epoch it knew a batch's epoch may be (2^32
/// installs). Epochs grow by one per install plus what is heard, so honest
/// nodes never come near it; a batch beyond it is refused, or a single
/// faulty peer could push every node's fencing tokens to the end of `u64`.
pub const MAX_EPOCH_JUMP: u64 = 1 << 32;

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
    /// What this node knows of each peer: live members, departures,
    /// failures, announcements, done markers owed, received and sent,
    /// notices handed out (see [`peer_state`]). A departure is kept while a
    /// view of this node names the node, and for `16 × timeout` after it
    /// went (a view naming a node may be installed here after its departure
    /// was learnt).
    peers: Peers,
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
    /// Waits whose deadline was deferred ([`Handoff::wait_deadline`]), by
    /// datum: the possible holders that held it up at its last deferral.
    /// A holder stays one after its past view is forgotten (`history`
    /// keeps a view only `timeout` after it was left), until it announced
    /// the view in force `timeout` before, is failed out or left (see
    /// [`Handoff::holder_may_act`]), also while this node relays the datum
    /// and when it waits for it again. At most one entry per registered
    /// datum, each of distinct nodes of the views installed here (the
    /// primaries of the recent views and the node a token went to); an
    /// entry is dropped when a token for the datum arrives here or it is
    /// unregistered, or by `prune` once the datum is neither awaited nor
    /// relayed here.
    deferred: HashMap<Datum, Vec<NodeId>, DetState>,
    next_retry: u64,
    timers: BinaryHeap<Reverse<Timer>>,
    timer_seq: u64,
    parked: HashMap<ViewId, Parked, DetState>,
    parked_total: usize,
    /// The notices parked for the view in force, taken out at its install:
    /// each waits for its sender's done marker answering this install, at
    /// the install count the notice came from, before it is taken (see
    /// [`Handoff::confirm_parked`]). `first` is the install. Refused when
    /// the sender moves on, is gone, the view changes or `timeout` passes.
    /// Counts against `max_parked` with `parked`.
    unconfirmed: Option<Parked>,
    held: HashMap<Datum, VecDeque<W>, DetState>,
    held_total: usize,
    releases: VecDeque<Release<W>>,
    events: VecDeque<HandoffEvent>,
    counters: Counters,
    fenced: bool,
    /// Whether this node may act as an owner (its ownership lease, from
    /// membership): see [`Handoff::set_standing`].
    standing: bool,
    now: Option<Instant>,
    transition: Option<ViewId>,
    /// This node's install count: which instance of the view in force its
    /// batches speak of (their `epoch`). A Lamport clock: each install
    /// moves it past every epoch heard (`heard_epoch`), so it also orders
    /// fencing tokens across nodes.
    install_seq: u64,
    /// The highest epoch of any batch received.
    heard_epoch: u64,
    /// `Some(install_seq)` once this node is done with the view in force.
    done_seq: Option<u64>,
    /// Nodes gone here (declared failed, the verdict since refuted) that
    /// the view in force names again and that said done with this install:
    /// a wait ends without a notice only once every such node did, as any
    /// live node of the view (see [`Handoff::gone_in_view_missing`]).
    /// Cleared at each install; at most the nodes of the view in force.
    gone_in_view_done: BTreeSet<NodeId>,
    /// Waits that nobody alive can answer, blocked only on done markers.
    blocked_on_done: Vec<Datum>,
    /// Inside `install`: waits are settled once the parked notices of the
    /// new view have been taken.
    installing: bool,
    /// Datums acquiring here when a view gave them to another node, and
    /// when: their relinquish deadline counts from then, not from the end of
    /// the acquire, or the new primary could time out first. At most one per
    /// acquire job.
    acquire_superseded: HashMap<Datum, Instant, DetState>,
    /// Jobs [`Handoff::poll_job`] may pop before it reads the slots of the
    /// next [`WARM_AHEAD`] queued datums again (a cache hint only).
    warm_jobs: usize,
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
            peers: Peers::default(),
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
            deferred: HashMap::default(),
            next_retry: 0,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            parked: HashMap::default(),
            parked_total: 0,
            unconfirmed: None,
            held: HashMap::default(),
            held_total: 0,
            releases: VecDeque::new(),
            events: VecDeque::new(),
            counters: Counters::default(),
            fenced: false,
            standing: true,
            now: None,
            transition: None,
            install_seq: 0,
            heard_epoch: 0,
            done_seq: None,
            blocked_on_done: Vec::new(),
            gone_in_view_done: BTreeSet::new(),
            installing: false,
            acquire_superseded: HashMap::default(),
            warm_jobs: 0,
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
            .is_some_and(|s| s.phase() == Phase::Held)
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
        self.peers.is_gone(node)
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
        !self.installing && self.done_seq.is_some() && self.peers.none_missing() && self.is_idle()
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
            .filter(|(_, s)| s.phase() == Phase::Awaiting)
            .map(|(d, _)| *d)
    }

    /// Where `datum` stands on this node (None: not registered).
    #[must_use]
    pub fn state(&self, datum: Datum) -> Option<DatumState> {
        self.registry.get(&datum).map(|s| s.phase().state())
    }

    /// The fencing token of this node's ownership of `datum`: `Some` from
    /// the moment its acquire job is handed out until its relinquish
    /// succeeds (held, acquiring, or relinquishing), `None` otherwise.
    #[must_use]
    pub fn token(&self, datum: Datum) -> Option<FencingToken> {
        let s = self.registry.get(&datum)?;
        use Phase::*;
        matches!(
            s.phase(),
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
            .filter(|(_, s)| !matches!(s.phase(), Phase::Held | Phase::Free))
            .map(|(d, s)| (*d, s.phase().state()))
    }

    // ----- fencing ---------------------------------------------------------

    /// The cluster declared *this* node failed: stop processing every datum
    /// at once. [`HandoffEvent::Fenced`] is the next event; no job, notice or
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
        self.events.push_front(HandoffEvent::Fenced { datums });
        self.relinquish_queue.clear();
        self.acquire_superseded.clear();
        self.acquire_queue.clear();
        self.out.clear();
        self.transmits.clear();
        self.sent.clear();
        self.retrying.clear();
        self.timers.clear();
        self.unconfirmed = None;
        self.peers.clear_notified();
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

    // ----- events ----------------------------------------------------------

    /// The next event.
    pub fn poll_event(&mut self) -> Option<HandoffEvent> {
        self.events.pop_front()
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

    fn check_ended(&mut self) {
        self.maybe_send_done();
        if let Some(view) = self.transition
            && self.is_idle()
        {
            self.transition = None;
            info!(node = %self.local, view = %view, "transition ended");
            self.events
                .push_back(HandoffEvent::TransitionEnded { view });
        }
    }
}
