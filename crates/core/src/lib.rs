//! The node core: everything one shoal node decides between its layers,
//! as a sans-IO state machine.
//!
//! `shoal-membership` says who is in the cluster, `shoal-placement` who
//! owns what in a view, `shoal-transition` how datums change hands. What
//! glues them together lives here, once, and is run unchanged by the
//! facade's tokio driver (`shoal`, `crates/cluster`) and by the simulator
//! (`shoal-sim`), so the policy the simulator's campaigns check is the one
//! the product runs:
//!
//! - **membership to handoff**: events and views become `peer_failed`,
//!   `peer_left`, `set_peers` and installed placement tables; a declared
//!   death fences the node; a new generation starts a new handoff that
//!   inherits the old one's epoch and view ([`NodeCore::reborn`]);
//! - **the lease**: before every decision the handoff is told whether the
//!   node may act as an owner ([`NodeCore::set_lease`]);
//! - **routing of owner-bound messages**: processed here, forwarded to the
//!   owner (at most [`CoreConfig::max_forward_hops`] hops), held during a
//!   handoff, parked and routed again when two nodes disagree on the owner,
//!   and handed back by a leaving node;
//! - **notices**: batches are decoded, matched to the member that sent
//!   them, kept for a short grace when they name a view not installed here
//!   yet, and answered;
//! - **bookkeeping**: notice sends in flight (cancelled when their
//!   addressee is declared failed), completions of a former generation's
//!   jobs and sends ignored, counters of every routed message's fate, and
//!   when the published view must change.
//!
//! It reads no clock, does no I/O and uses no randomness: every input
//! carries `now`, the outputs are polled, and the same inputs give the same
//! outputs in the same order (nothing depends on a hash map's iteration
//! order), so a simulation replays exactly from its seed. A driver's loop is, in this order:
//!
//! 1. feed inputs: [`NodeCore::set_lease`] (whenever membership's standing
//!    may have changed), [`NodeCore::handle_membership`],
//!    [`NodeCore::handle_notices`], [`NodeCore::route_local`],
//!    [`NodeCore::route_from_peer`], completions ([`NodeCore::job_done`],
//!    [`NodeCore::send_done`], [`NodeCore::forward_done`]), and
//!    [`NodeCore::handle_timeout`] once [`NodeCore::poll_timeout`] is due;
//! 2. run the jobs of [`NodeCore::poll_job`] (report each with `job_done`);
//! 3. carry out every [`Output`] of [`NodeCore::poll_output`];
//! 4. publish the view when [`NodeCore::take_view_changed`] says so;
//! 5. sleep until the next input or [`NodeCore::poll_timeout`].
//!
//! ```
//! use std::time::Instant;
//! use shoal_core::{CoreConfig, Lease, NodeCore, Output, Work};
//! use shoal_membership::{Event, Member, MemberState};
//!
//! #[derive(Debug)]
//! struct Msg { id: i64, hops: u8 }
//! impl Work for Msg {
//!     fn datum_type(&self) -> &str { "series" }
//!     fn datum_id(&self) -> i64 { self.id }
//!     fn hops(&self) -> u8 { self.hops }
//!     fn set_hops(&mut self, hops: u8) { self.hops = hops }
//! }
//!
//! let now = Instant::now();
//! let me = Member {
//!     name: "a".into(), generation: 1, addr: "127.0.0.1:7000".parse().unwrap(),
//!     incarnation: 0, state: MemberState::Alive, ready: true, metadata: [].into(),
//! };
//! let mut core: NodeCore<Msg, ()> = NodeCore::new(
//!     me.clone(), shoal_transition::Config::default(), CoreConfig::default(),
//! ).unwrap();
//! core.set_lease(Lease::Forever, now);
//! core.register("series", 7, now).unwrap();
//! core.handle_membership(Event::ViewChanged(vec![me]), now);
//! while let Some(job) = core.poll_job() {
//!     let instance = core.instance();
//!     core.job_done(instance, job, Ok(()), now); // acquire: a's alone
//! }
//! while core.poll_output(now).is_some() {}
//! core.route_local(Msg { id: 7, hops: 0 }, now);
//! assert!(matches!(core.poll_output(now), Some(Output::Deliver(m)) if m.id == 7));
//! ```

#[cfg(feature = "check")]
pub mod check;
mod counters;
mod members;
mod notices;
mod routing;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_membership::{Member, Standing};
use shoal_placement::{NodeId, PlacementTable, Strategy};
use shoal_transition::{
    ConfigError, Datum, Handoff, HandoffEvent, Job, NoticeBatch, RegistryError, ReleaseTo,
    ReturnReason, SendId,
};
use tracing::{debug, info, warn};

pub use counters::{DropReason, RouteCounters};

/// An owner-bound message as the core routes it: the datum it is for, and
/// how many times a node that was not the owner passed it on.
pub trait Work {
    /// The datum's type name.
    fn datum_type(&self) -> &str;
    /// The datum's id.
    fn datum_id(&self) -> i64;
    /// Times a node that was not the owner forwarded it.
    fn hops(&self) -> u8;
    /// Sets the hop count.
    fn set_hops(&mut self, hops: u8);
    /// The node the message was sent from, when it carries one (delivered
    /// to the application as its sender): checked against the peer that
    /// handed it over ([`NodeCore::route_from_peer`]).
    fn origin(&self) -> Option<&str> {
        None
    }
    /// Replaces the origin by the authenticated sender's name.
    fn set_origin(&mut self, _origin: &str) {}
}

/// Whether placement tables are installed as membership views arrive, or
/// only when the application asks ([`NodeCore::install_latest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum InstallMode {
    /// Every new view is installed at once.
    #[default]
    Auto,
    /// Views are kept as the latest table; the application installs it.
    Manual,
}

/// The core's policy knobs. The defaults are the facade's.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// How placement tables are built from the ready members.
    pub strategy: Strategy,
    /// Owners per datum (primary plus replicas).
    pub copies: usize,
    /// When views are installed.
    pub install: InstallMode,
    /// Hops after which a message whose route disagrees with its sender's
    /// is parked instead of forwarded again.
    pub max_forward_hops: u8,
    /// Most parked messages; beyond, they are dropped (`park_full`).
    pub park_capacity: usize,
    /// How long a parked message is kept before it is dropped (`expired`).
    pub park_expiry: Duration,
    /// Delay before a parked message is routed again.
    pub reroute_delay: Duration,
    /// How long a notice batch for a view not installed here waits for it.
    pub notice_grace: Duration,
    /// Most notice batches waiting for their view; beyond, they are taken
    /// at once.
    pub max_early_notices: usize,
    /// How long a member that left the view still counts as a forwarder of
    /// routed messages.
    pub departed_grace: Duration,
    /// Most nodes remembered as gone without a failover decided here.
    pub max_unresolved: usize,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            strategy: Strategy::default(),
            copies: 1,
            install: InstallMode::Auto,
            max_forward_hops: 1,
            park_capacity: 65_536,
            park_expiry: Duration::from_secs(30),
            reroute_delay: Duration::from_millis(100),
            notice_grace: Duration::from_millis(500),
            max_early_notices: 4096,
            departed_grace: Duration::from_secs(60),
            max_unresolved: 4096,
        }
    }
}

/// The node's ownership lease, as membership last stated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lease {
    /// The node may not act as an owner.
    None,
    /// Valid without expiry (lease strategy `Off`).
    Forever,
    /// Valid until this instant unless renewed.
    Until(Instant),
}

impl Lease {
    /// Whether the lease is valid at `now`.
    pub fn valid(self, now: Instant) -> bool {
        match self {
            Lease::None => false,
            Lease::Forever => true,
            Lease::Until(t) => now < t,
        }
    }

    /// When a valid lease lapses unless renewed.
    pub fn expiry(self) -> Option<Instant> {
        match self {
            Lease::Until(t) => Some(t),
            _ => None,
        }
    }
}

impl From<&Standing> for Lease {
    fn from(standing: &Standing) -> Lease {
        match standing {
            Standing::Valid { until: None } => Lease::Forever,
            Standing::Valid { until: Some(t) } => Lease::Until(*t),
            _ => Lease::None,
        }
    }
}

/// The outcome of an acknowledged forward ([`Output::Forward`] with
/// `acknowledged`).
#[derive(Debug)]
pub enum ForwardOutcome {
    /// The receiver took it.
    Taken,
    /// The receiver refused it (it is leaving too): routed again.
    Refused,
    /// No answer: the receiver may have taken it; not sent again.
    Failed(String),
}

/// Something the driver must do, from [`NodeCore::poll_output`].
#[derive(Debug)]
pub enum Output<W, R> {
    /// The handoff reported this (for logs, metrics and tests).
    Handoff(HandoffEvent),
    /// Hand `W` to the application here: this node owns its datum.
    Deliver(W),
    /// Send `W` to `to` at `addr`. When `acknowledged` (this node is
    /// leaving), report the receiver's answer with
    /// [`NodeCore::forward_done`].
    Forward {
        /// The owner.
        to: NodeId,
        /// Its address.
        addr: SocketAddr,
        /// The message (its hop count raised when a peer had sent it here).
        work: W,
        /// Whether the receiver's answer must be reported.
        acknowledged: bool,
    },
    /// Send a notice batch as a request; report its outcome with
    /// [`NodeCore::send_done`] and this `instance`.
    SendNotices {
        /// The handoff instance that made it.
        instance: u64,
        /// The send's id.
        id: SendId,
        /// The addressee.
        to: NodeId,
        /// Its address.
        addr: SocketAddr,
        /// The notices.
        batch: NoticeBatch,
    },
    /// Stop the notice send `id`: its addressee was declared failed, and
    /// the core already reported the send failed to the handoff.
    CancelNotices(SendId),
    /// Answer a notice request.
    AnswerNotices {
        /// The driver's handle for the request.
        reply: R,
        /// Whether the handoff took the batch.
        accepted: bool,
    },
    /// A message the core gave up on, already counted in
    /// [`RouteCounters::drops`]: the facade drops it, the simulator
    /// accounts for it (its client may send it again).
    Dropped {
        /// Why.
        reason: DropReason,
        /// The message.
        work: W,
    },
    /// The member at this address left the cluster: its link can go.
    PeerGone(SocketAddr),
}

/// A notice batch for a view not in force here yet.
struct EarlyNotice<R> {
    until: Instant,
    peer: String,
    batch: NoticeBatch,
    reply: R,
}

/// A message kept for a while: its route disagreed with its sender's, or
/// its owner refuses (leaving), or its generation was fenced.
struct Parked<W> {
    retry_at: Instant,
    expires: Instant,
    work: W,
}

/// One node's core. `W` is the owner-bound message, `R` the driver's handle
/// for answering a notice request.
pub struct NodeCore<W, R> {
    config: CoreConfig,
    me: NodeId,
    /// This node's membership record, as membership last sent it.
    local: Member,
    /// The live members by name, from membership's last view.
    members: HashMap<Arc<str>, Member>,
    /// Members that left the view in the last `departed_grace`, and when.
    departed: HashMap<Arc<str>, Instant>,
    handoff: Handoff<W>,
    /// The newest table built from a view (installed at once in `Auto`).
    latest: Option<Arc<PlacementTable>>,
    parked: VecDeque<Parked<W>>,
    early_notices: VecDeque<EarlyNotice<R>>,
    /// Notice sends in flight and their addressee (ordered: cancelling them
    /// reports failures to the handoff in one order on every run).
    sends: BTreeMap<SendId, NodeId>,
    /// Nodes that refused a routed message (they are leaving).
    refusing: HashSet<NodeId>,
    /// The last step of a leave: forwards are acknowledged, nothing parked.
    closing: bool,
    forwards_in_flight: usize,
    /// During a graceful leave: the datums whose relinquish was given up.
    leaving: Option<Vec<Datum>>,
    fenced: bool,
    /// Nodes gone without a failover decided here (after a rebirth, the
    /// other nodes of the inherited view; members declared failed while
    /// this node had no standing): failed over once a newer generation of
    /// their name is a member.
    unresolved: VecDeque<NodeId>,
    /// Which handoff machine is in force (a rebirth starts a new one).
    instance: u64,
    lease: Lease,
    view_dirty: bool,
    published_settled: bool,
    counters: RouteCounters,
    outputs: VecDeque<Output<W, R>>,
    /// The types registered on demand (kept across a rebirth).
    on_demand: Vec<String>,
}

impl<W: Work, R> NodeCore<W, R> {
    /// A core for the node `local`, with a handoff of `handoff` config.
    /// Its lease is valid until [`Self::set_lease`] says otherwise (a node
    /// starting alone may act at once).
    ///
    /// # Errors
    /// When the handoff's configuration is refused.
    pub fn new(
        local: Member,
        handoff: shoal_transition::Config,
        config: CoreConfig,
    ) -> Result<Self, ConfigError> {
        let me = NodeId::new(&*local.name, local.generation);
        let handoff = Handoff::new(me.clone(), handoff)?;
        Ok(NodeCore {
            config,
            me,
            local,
            members: HashMap::new(),
            departed: HashMap::new(),
            handoff,
            latest: None,
            parked: VecDeque::new(),
            early_notices: VecDeque::new(),
            sends: BTreeMap::new(),
            refusing: HashSet::new(),
            closing: false,
            forwards_in_flight: 0,
            leaving: None,
            fenced: false,
            unresolved: VecDeque::new(),
            instance: 0,
            lease: Lease::Forever,
            view_dirty: true,
            published_settled: false,
            counters: RouteCounters::default(),
            outputs: VecDeque::new(),
            on_demand: Vec::new(),
        })
    }

    // ----- accessors -----------------------------------------------------------

    /// This node's id (name and generation).
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// This node's membership record.
    pub fn local(&self) -> &Member {
        &self.local
    }

    /// The live members, from membership's last view.
    pub fn members(&self) -> impl Iterator<Item = &Member> + '_ {
        self.members.values()
    }

    /// The handoff state machine in force.
    pub fn handoff(&self) -> &Handoff<W> {
        &self.handoff
    }

    /// The handoff, for the application's direct requests (tokens, give
    /// up, unregister).
    pub fn handoff_mut(&mut self) -> &mut Handoff<W> {
        &mut self.handoff
    }

    /// Which handoff machine is in force: tag jobs and sends with it, and
    /// report their completion with it.
    pub fn instance(&self) -> u64 {
        self.instance
    }

    /// Whether the cluster declared this node failed (and its handoff is
    /// fenced) and no new generation started since.
    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// Whether the lease is valid at `now`.
    pub fn lease_valid(&self, now: Instant) -> bool {
        self.lease.valid(now)
    }

    /// The routed messages' counters.
    pub fn counters(&self) -> &RouteCounters {
        &self.counters
    }

    /// Messages parked here.
    pub fn parked(&self) -> usize {
        self.parked.len()
    }

    /// Acknowledged forwards not answered yet.
    pub fn forwards_in_flight(&self) -> usize {
        self.forwards_in_flight
    }

    /// Whether nothing routed is left here: nothing held, parked or
    /// waiting for an acknowledgement (a leave's last step waits for this).
    pub fn routed_idle(&self) -> bool {
        self.parked.is_empty()
            && self.forwards_in_flight == 0
            && self.handoff.progress().held_work == 0
    }

    /// Messages that would be lost if the node stopped now: held, parked
    /// or waiting for an acknowledgement.
    pub fn routed_left(&self) -> usize {
        self.parked.len() + self.forwards_in_flight + self.handoff.progress().held_work
    }

    /// The placement view of the live members (ready or not).
    pub fn ready_view(&self) -> shoal_placement::View {
        members::ready_view(&self.members)
    }

    /// Whether the published view is out of date (a member, the lease, the
    /// table or `settled` changed); clears the flag.
    pub fn take_view_changed(&mut self) -> bool {
        let settled = self.handoff.is_settled();
        let changed = self.view_dirty || settled != self.published_settled;
        self.view_dirty = false;
        self.published_settled = settled;
        changed
    }

    /// When [`Self::handle_timeout`] is due next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.handoff.poll_timeout(),
            self.lease.expiry(),
            self.parked.front().map(|p| p.retry_at),
            self.early_notices.iter().map(|e| e.until).min(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ----- inputs --------------------------------------------------------------

    /// What membership says of this node's lease now.
    pub fn set_lease(&mut self, lease: Lease, now: Instant) {
        self.lease = lease;
        self.refresh_standing(now);
    }

    /// This node's own membership record changed (ready flag, metadata).
    pub fn set_local(&mut self, local: Member) {
        self.local = local;
        self.view_dirty = true;
    }

    /// Timers: the lease's expiry, the handoff's deadlines, early notices
    /// whose grace ran out, parked messages due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.refresh_standing(now);
        if self.handoff.poll_timeout().is_some_and(|t| t <= now) {
            self.handoff.handle_timeout(now);
        }
        self.release_early_notices(now);
        self.reroute_parked(now, false);
    }

    /// Registers datum `(type_name, id)`; `Some(datum)` with the handoff's
    /// key for it (also when it was registered already).
    ///
    /// # Errors
    /// When the handoff refuses it.
    pub fn register(
        &mut self,
        type_name: &str,
        id: i64,
        now: Instant,
    ) -> Result<Datum, RegistryError> {
        let ty = self.handoff.datum_type(type_name)?;
        let datum = Datum::new(ty, id);
        self.handoff.register(datum, now)?;
        Ok(datum)
    }

    /// Datums of type `type_name` are registered when they are first needed
    /// here (work at their primary, or a notice); the driver makes their
    /// objects when their first job comes.
    ///
    /// # Errors
    /// When the type cannot be added.
    pub fn set_on_demand(&mut self, type_name: &str) -> Result<(), RegistryError> {
        let ty = self.handoff.datum_type(type_name)?;
        self.handoff.set_on_demand(ty, true);
        if !self.on_demand.iter().any(|n| n == type_name) {
            self.on_demand.push(type_name.to_owned());
        }
        Ok(())
    }

    /// The next relinquish or acquire job to run. Run it (or report it at
    /// once) and report its outcome with [`Self::job_done`].
    pub fn poll_job(&mut self) -> Option<Job> {
        self.handoff.poll_job()
    }

    /// A job of handoff `instance` completed.
    pub fn job_done(&mut self, instance: u64, job: Job, result: Result<(), String>, now: Instant) {
        if instance == self.instance {
            self.handoff.job_done(job, result, now);
        } else {
            debug!(node = %self.me, datum = %job.datum, "job of a former generation completed: ignored");
        }
    }

    /// A notice send of handoff `instance` completed: `Ok` when the
    /// receiver took the batch.
    pub fn send_done(
        &mut self,
        instance: u64,
        id: SendId,
        result: Result<(), String>,
        now: Instant,
    ) {
        if instance == self.instance && self.sends.remove(&id).is_some() {
            self.handoff.send_done(id, result, now);
        }
    }

    /// Installs the newest table (manual installs, and a leave).
    pub fn install_latest(&mut self, now: Instant) {
        if let Some(table) = self.latest.clone() {
            self.install(table, now);
        }
    }

    /// A graceful leave begins: from now on a relinquish that fails is
    /// given up at once, so the done markers let the new owners take the
    /// datum without waiting for a timeout.
    pub fn begin_leave(&mut self) {
        self.leaving.get_or_insert_with(Vec::new);
    }

    /// After a leave's transition: gives up every relinquish still going
    /// on, and returns every datum given up since the leave began.
    pub fn give_up(&mut self, now: Instant) -> Vec<Datum> {
        let mut given_up = self.leaving.take().unwrap_or_default();
        given_up.extend(self.handoff.give_up_relinquishes(now));
        given_up
    }

    // ----- outputs -------------------------------------------------------------

    /// The next thing to do, in order: the handoff's events, its notice
    /// sends, then the messages it releases (delivered here, forwarded,
    /// parked or returned), with what routing decided in between.
    pub fn poll_output(&mut self, now: Instant) -> Option<Output<W, R>> {
        if self.outputs.is_empty() {
            self.collect(now);
        }
        self.outputs.pop_front()
    }

    /// Moves the handoff's outputs to the queue.
    fn collect(&mut self, now: Instant) {
        while let Some(event) = self.handoff.poll_event() {
            if let (Some(given_up), HandoffEvent::RelinquishFailed { datum, .. }) =
                (&mut self.leaving, &event)
                && self.handoff.give_up_relinquish(*datum, now)
            {
                warn!(node = %self.me, datum = %datum, "leaving: relinquish failed, given up");
                given_up.push(*datum);
            }
            log_event(&self.me, &event);
            self.outputs.push_back(Output::Handoff(event));
        }
        while let Some(t) = self.handoff.poll_transmit() {
            let addr = self
                .members
                .get(&*t.to.name)
                .filter(|m| m.generation == t.to.generation)
                .map(|m| m.addr);
            let Some(addr) = addr else {
                self.handoff
                    .send_done(t.id, Err(format!("{} is not a member", t.to)), now);
                continue;
            };
            debug!(node = %self.me, to = %t.to, view = %t.batch.view, done = t.batch.done,
                notices = t.batch.groups.iter().map(|g| g.ids.len()).sum::<usize>(), "sending notices");
            self.sends.insert(t.id, t.to.clone());
            self.outputs.push_back(Output::SendNotices {
                instance: self.instance,
                id: t.id,
                to: t.to,
                addr,
                batch: t.batch,
            });
        }
        while let Some(release) = self.handoff.poll_release() {
            match release.to {
                ReleaseTo::Process => {
                    for work in release.work {
                        self.deliver(work);
                    }
                }
                ReleaseTo::Forward(node) => {
                    for work in release.work {
                        self.forward_to(node.clone(), work);
                    }
                }
                ReleaseTo::Returned(ReturnReason::Fenced) => {
                    // The generation was declared dead; its successor (or
                    // the datums' new owners) will take them: route again
                    // once the new generation knows the cluster.
                    for work in release.work {
                        self.park(work, now);
                    }
                }
                ReleaseTo::Returned(reason) => {
                    warn!(node = %self.me, datum = %release.datum, ?reason, count = release.work.len(),
                        "held messages returned undelivered");
                    for work in release.work {
                        self.drop_work(DropReason::Returned, work);
                    }
                }
            }
        }
    }

    /// Tells the handoff whether this node may act as an owner at `now`.
    fn refresh_standing(&mut self, now: Instant) {
        let valid = self.lease.valid(now);
        if valid != self.handoff.has_standing() {
            if valid {
                info!(node = %self.me, "ownership lease valid again");
            } else {
                warn!(node = %self.me, "ownership lease lapsed: holding work for owned datums");
            }
            self.handoff.set_standing(valid, now);
            self.view_dirty = true;
        }
    }
}

/// Logs a handoff event at the level it deserves.
fn log_event(me: &NodeId, event: &HandoffEvent) {
    match event {
        HandoffEvent::TransitionStarted {
            view,
            relinquish,
            awaiting,
            acquire,
        } => info!(node = %me, %view, relinquish, awaiting, acquire, "transition started"),
        HandoffEvent::TransitionEnded { view } => info!(node = %me, %view, "transition ended"),
        HandoffEvent::RelinquishFailed { .. } | HandoffEvent::AcquireFailed { .. } => {
            warn!(node = %me, ?event, "handoff job failed");
        }
        HandoffEvent::RelinquishAbandoned { .. } | HandoffEvent::Fenced { .. } => {
            warn!(node = %me, ?event, "handoff");
        }
        HandoffEvent::AcquiredWithoutNotice { .. }
        | HandoffEvent::TransitionSuperseded { .. }
        | HandoffEvent::ReplicasChanged { .. } => debug!(node = %me, ?event, "handoff"),
    }
}

#[cfg(test)]
mod tests;
