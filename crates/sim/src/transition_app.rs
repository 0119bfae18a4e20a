//! The transition layer on the simulator: one `shoal_transition::Handoff`
//! per simulated node, driven by that node's real membership events.
//!
//! [`TransitionNode`] implements [`Application`]:
//!
//! - every datum id `0..datums` is registered at start (type `"d"`);
//! - membership events pass through a `TakeoverGate`, as in the facade;
//!   `Failed` / `Left` of a peer become `peer_failed` / `peer_left`, before
//!   the `ViewChanged` that drops it (membership emits them in that order);
//!   `ViewChanged` builds the placement view from the live members' (name,
//!   generation, ready) and installs `PlacementTable::build_from` the table
//!   in force; `DeclaredFailed` fences the node;
//! - before every decision the handoff is told the lease
//!   (`set_standing(Membership::standing(now).is_valid())`), as the
//!   facade's driver does;
//! - notice batches travel as reliable application messages; their single
//!   outcome becomes `send_done`;
//! - relinquish and acquire jobs finish after a seeded random virtual delay,
//!   and fail with a configured probability (the layer retries);
//! - work items for random datums are injected at random nodes and routed
//!   with `Handoff::route`: processed, forwarded one hop, or held.
//!
//! Two families of scenarios:
//!
//! - **Without leases** (`join`, `leave`, `kill-owner`, `chained`, `flap`,
//!   `join-leave-kill`; membership's lease strategy `Off`): a fenced node
//!   leaves and exits. The shared [`TransitionLedger`] keeps, per datum, the
//!   set of processes holding it (from the start of an acquire job to the
//!   end of a successful relinquish), updated incrementally, and checks at
//!   every step: a process starts acquiring only when no other live process
//!   holds the datum, unless that holder was declared failed (failover).
//! - **With leases** (`partition`, `one-way`, `pause`, `link-flap`; the
//!   default strategy, 5 % datagram loss by default): a node declared dead
//!   comes back as a new generation in the same process, as the facade does
//!   (a new `Handoff` that continues the old epoch, installs the old table
//!   and knows the old generation gone). After every step, the
//!   **acting-owner check**: for every datum at most one process *acts as
//!   owner*: holds it per its handoff (`Handoff::token`), its lease valid at
//!   that instant, not frozen (paused), not fenced; no exception for a
//!   holder declared failed. A process hands out a job or processes work
//!   only under a valid lease. At every sampling point the check's record
//!   of holdings is compared with every handoff's. **Liveness**: from the
//!   last heal, every datum has a ready acting owner within
//!   [`recover_bound`]; at the end every node is ready, unfenced, with a
//!   valid lease.
//!
//! In both, work is processed only where the datum is held, and never
//! twice. [`final_check`] checks, once the run settled: every transition
//! ended, every datum is held by exactly its primary, every work item was
//! processed exactly once (except items that sat in a crashed or reborn
//! process's memory).
//!
//! Processes start not ready and become ready as soon as they know another
//! live member (slot 0 alone after a second; a new generation never
//! alone), so processes that join together become ready together, each
//! often before it sees the others ready. Every process tells its layer the
//! live members (`set_peers`), whose done markers a first owner waits for.
//! A process ready before it joined anyone cannot wait for peers it does
//! not know; the checks catch the two first owners that follow, see
//! [`TransitionOptions::ready_on_start`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use shoal_membership::{Event as MembershipEvent, TakeoverGate};
use shoal_placement::{NodeId, PlacementTable, Strategy, View, ViewMember};
use shoal_transition::{
    Config as HandoffConfig, Datum, DatumType, Handoff, HandoffEvent, Job, JobKind, ReleaseTo,
    Route, SendId, WithoutNotice,
};

use crate::acting::ActingOwners;
use crate::app::{AppCtx, Application, MessageId, NodeInfo, NodeView};
use crate::sim::{Action, Sim, SimConfig};
use crate::util::derive_seed;

/// Name of the one datum type the simulation registers.
const DATUM_TYPE: &str = "d";
/// Message tag: a notice batch (the bytes follow).
const TAG_NOTICES: u8 = 0;
/// Message tag: a work item (id, datum, hops follow).
const TAG_WORK: u8 = 1;
/// Work is forwarded at most this many hops before it goes back to the
/// client (one: the node that forwards trusts its view).
const MAX_HOPS: u32 = 1;
/// A node that still knows no other member this long after it started
/// becomes ready alone (it is the first node).
const READY_ALONE_AFTER: Duration = Duration::from_secs(1);
/// Purpose tag of the scenario's random choices.
const TAG_TRANSITION_SCENARIO: u64 = 0x7472_616e;

/// A process: its name and generation.
type Key = (Arc<str>, u64);

/// One unit of work for a datum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppWork {
    /// Unique id (index in the ledger).
    pub id: u64,
    /// The datum it is for.
    pub datum: i64,
    /// How many times it was forwarded.
    pub hops: u32,
}

impl AppWork {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(21);
        out.push(TAG_WORK);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.datum.to_le_bytes());
        out.extend_from_slice(&self.hops.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<AppWork> {
        let id = u64::from_le_bytes(bytes.get(0..8)?.try_into().ok()?);
        let datum = i64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        let hops = u32::from_le_bytes(bytes.get(16..20)?.try_into().ok()?);
        (bytes.len() == 20).then_some(AppWork { id, datum, hops })
    }
}

/// How the simulated application behaves.
#[derive(Clone, Debug)]
pub struct TransitionSettings {
    /// Datums `0..datums`, registered on every node.
    pub datums: u32,
    /// Placement strategy (one copy).
    pub strategy: Strategy,
    /// Configuration of every node's `Handoff`.
    pub handoff: HandoffConfig,
    /// A job takes a uniformly random virtual time within this range.
    pub job_time: (Duration, Duration),
    /// Probability that a job fails.
    pub job_failure: f64,
    /// Each node injects one work item this often (0: none).
    pub work_every: Duration,
    /// No work is injected from this virtual time on.
    pub work_until: Duration,
    /// Virtual time of the scenario's first fault (the cluster formed
    /// before it); timeouts after it are counted apart.
    pub fault_at: Duration,
    /// Graceful leaves as the facade's `leave` does them: at the virtual
    /// time, the process of the slot goes not ready, and once its layer is
    /// idle under a view without it, leaves the membership.
    pub graceful_leaves: Vec<(u32, Duration)>,
    /// Checked once the run settled: every datum a crashed process held was
    /// acquired again within this of the last survivor marking it failed.
    pub failover_within: Option<Duration>,
    /// Leases on: the checks are the acting-owner ones (see the module
    /// documentation) instead of "one holder unless declared failed", and a
    /// process the cluster declared dead comes back as a new generation of
    /// itself, as the facade does, instead of exiting.
    pub leases: bool,
    /// Virtual time at which the last fault healed: from then on every
    /// datum must have a ready acting owner within `recover_within`.
    pub healed_at: Option<Duration>,
    /// The liveness bound (see [`recover_bound`]).
    pub recover_within: Option<Duration>,
    /// With leases: a process declared dead comes back as a new generation
    /// (the facade's behaviour); otherwise it stays fenced in place (to
    /// show that the final check catches it).
    pub rebirth: bool,
}

impl TransitionSettings {
    /// Defaults for `datums` datums: mod-N, default handoff configuration,
    /// jobs of 0 to 20 ms failing 5 % of the time, one work item per node
    /// every 50 ms until 40 s.
    pub fn new(datums: u32) -> TransitionSettings {
        TransitionSettings {
            datums,
            strategy: Strategy::ModN,
            handoff: HandoffConfig::default(),
            job_time: (Duration::ZERO, Duration::from_millis(20)),
            job_failure: 0.05,
            work_every: Duration::from_millis(50),
            work_until: Duration::from_secs(40),
            fault_at: FAULT_AT,
            graceful_leaves: Vec::new(),
            failover_within: None,
            leases: false,
            healed_at: None,
            recover_within: None,
            rebirth: true,
        }
    }
}

/// Counters of one run, kept in the ledger.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TransitionStats {
    /// Acquisitions of a datum last held by another process.
    pub moved: u64,
    /// Successful relinquish jobs.
    pub relinquished: u64,
    /// Successful acquire jobs.
    pub acquired: u64,
    /// Datums acquired without a notice because their owner was declared
    /// failed (`AcquiredWithoutNotice { reason: OwnerGone }`).
    pub failovers: u64,
    /// Datums acquired without a notice once every live member said done
    /// (`AcquiredWithoutNotice { reason: AllDone }`: the notice went to a
    /// view the new owner skipped).
    pub all_done: u64,
    /// Datums acquired without a notice at the timeout.
    pub timeouts: u64,
    /// Of `timeouts`, those after the scenario's first fault (the others
    /// come from the cluster forming).
    pub timeouts_after_fault: u64,
    /// Failed relinquish attempts.
    pub relinquish_failures: u64,
    /// Failed acquire attempts.
    pub acquire_failures: u64,
    /// Relinquishes given up.
    pub relinquish_abandoned: u64,
    /// Acquisitions that overlapped a holder declared failed (allowed).
    pub overlaps_with_declared: u64,
    /// With leases: acquisitions that overlapped a holder nobody declared
    /// failed (allowed when that holder does not act: the acting-owner
    /// check decides).
    pub overlaps_with_lapsed: u64,
    /// Processes reborn as a new generation after a declared death.
    pub rebirths: u64,
    /// With leases: from the heal to the last instant at which some datum
    /// had no ready acting owner, in seconds (0 if none after the heal).
    pub recovered_s: f64,
    /// Nodes that fenced themselves.
    pub fenced: u64,
    /// Notice batches a receiver refused (fenced, or a new generation).
    pub batches_refused: u64,
    /// Longest time a node had a transition running, in seconds.
    pub max_transition_s: f64,
    /// Work items injected.
    pub work_injected: u64,
    /// Work items processed.
    pub work_processed: u64,
    /// Work items forwarded (hops).
    pub work_forwarded: u64,
    /// Forwarded work items that would have needed another hop, sent back
    /// to the client and routed again.
    pub work_bounced: u64,
    /// Work items held during a handoff.
    pub work_held: u64,
    /// Work items that may be lost with a stopped process.
    pub work_maybe_lost: u64,
    /// Crashes of a process that held datums.
    pub crashes: u64,
    /// Over those crashes, the longest time from the last survivor marking
    /// the crashed process failed to every datum it held being acquired
    /// again (0 when all were acquired before), in seconds.
    pub max_failover_lag_s: f64,
}

/// The cross-node ledger: who holds what, work processed, counters.
pub struct TransitionLedger {
    settings: TransitionSettings,
    base: Instant,
    /// Datum id -> processes holding it.
    holders: Vec<Vec<Key>>,
    /// Datum id -> the last process that acquired it.
    last_holder: Vec<Option<Key>>,
    /// Processes some member declared failed.
    declared: HashSet<Key>,
    /// Work id -> times processed.
    processed: Vec<u8>,
    /// Work that may have been lost with a stopped process.
    maybe_lost: HashSet<u64>,
    /// Work returned to "the client", routed again by the next live node.
    orphans: Vec<AppWork>,
    /// Crashes, with the datums the crashed process held.
    failovers: Vec<Failover>,
    /// With leases: acting owners per datum, checked after every step.
    acting: ActingOwners,
    /// With leases: the last instant after the heal at which some datum had
    /// no ready acting owner.
    last_unserved: Option<Instant>,
    /// The counters.
    pub stats: TransitionStats,
}

/// One crash: the datums the crashed process held, when each was next
/// acquired, and when the last survivor marked the process failed.
struct Failover {
    victim: Key,
    waiting: HashSet<i64>,
    last_acquired: Option<Instant>,
    detected: Option<Instant>,
}

/// How long after the last survivor marked a crashed process failed every
/// datum it held must be acquired again in `join-leave-kill`: a round of
/// done markers and an acquire job (0 to 20 ms, failing 5 % of the time and
/// retried), far below the 10 s transition timeout.
pub const FAILOVER_MARGIN: Duration = Duration::from_secs(2);

impl TransitionLedger {
    /// A ledger for a run whose virtual time 0 is `base`.
    pub fn new(settings: TransitionSettings, base: Instant) -> TransitionLedger {
        let n = settings.datums as usize;
        TransitionLedger {
            settings,
            base,
            holders: vec![Vec::new(); n],
            last_holder: vec![None; n],
            declared: HashSet::new(),
            processed: Vec::new(),
            maybe_lost: HashSet::new(),
            orphans: Vec::new(),
            failovers: Vec::new(),
            acting: ActingOwners::new(n),
            last_unserved: None,
            stats: TransitionStats::default(),
        }
    }

    /// `victim` crashed holding `datums`.
    fn crashed(&mut self, victim: &Key, datums: &HashSet<i64>) {
        if datums.is_empty() {
            return;
        }
        self.stats.crashes += 1;
        self.failovers.push(Failover {
            victim: victim.clone(),
            waiting: datums.clone(),
            last_acquired: None,
            detected: None,
        });
    }

    /// A survivor marked `victim` failed at `now`.
    fn detected(&mut self, victim: &Key, now: Instant) {
        for f in self.failovers.iter_mut().filter(|f| f.victim == *victim) {
            f.detected = Some(f.detected.map_or(now, |d| d.max(now)));
        }
    }

    /// For every crash: when its last datum was acquired again, less when
    /// the last survivor marked it failed (None: a datum never was).
    fn failover_lags(&self) -> Vec<(Key, Option<Duration>)> {
        self.failovers
            .iter()
            .map(|f| {
                let lag = match (f.waiting.is_empty(), f.last_acquired, f.detected) {
                    (true, Some(done), Some(detected)) => {
                        Some(done.saturating_duration_since(detected))
                    }
                    (true, _, _) => Some(Duration::ZERO),
                    (false, _, _) => None,
                };
                (f.victim.clone(), lag)
            })
            .collect()
    }

    /// The settings of the run.
    pub fn settings(&self) -> &TransitionSettings {
        &self.settings
    }

    /// `who` starts acquiring `datum`. Returns a violation if another live
    /// process, not declared failed, holds it (without leases; with leases
    /// such a holder may have lost its lease, and the acting-owner check
    /// decides).
    fn start_holding(&mut self, who: &Key, datum: i64) -> Option<String> {
        let declared = &self.declared;
        let set = usize::try_from(datum)
            .ok()
            .and_then(|i| self.holders.get_mut(i))?;
        let mut problem = None;
        let mut overlap = false;
        let mut lapsed = false;
        for other in set.iter().filter(|k| *k != who) {
            if declared.contains(other) || declared.contains(who) {
                overlap = true;
            } else if self.settings.leases {
                lapsed = true;
            } else {
                problem = Some(format!(
                    "{}/{} acquires datum {datum} while {}/{} (live, not declared failed) holds it",
                    who.0, who.1, other.0, other.1
                ));
            }
        }
        if overlap {
            self.stats.overlaps_with_declared += 1;
        }
        if lapsed {
            self.stats.overlaps_with_lapsed += 1;
        }
        if !set.contains(who) {
            set.push(who.clone());
        }
        problem
    }

    /// A process started acquiring `datum` at `now`.
    fn acquiring(&mut self, datum: i64, now: Instant) {
        for f in &mut self.failovers {
            if f.waiting.remove(&datum) {
                f.last_acquired = Some(f.last_acquired.map_or(now, |t| t.max(now)));
            }
        }
    }

    fn stop_holding(&mut self, who: &Key, datum: i64) {
        if let Some(set) = usize::try_from(datum)
            .ok()
            .and_then(|i| self.holders.get_mut(i))
        {
            set.retain(|k| k != who);
        }
    }

    fn acquired(&mut self, who: &Key, datum: i64) {
        self.stats.acquired += 1;
        if let Some(last) = usize::try_from(datum)
            .ok()
            .and_then(|i| self.last_holder.get_mut(i))
        {
            if last.as_ref().is_some_and(|k| k != who) {
                self.stats.moved += 1;
            }
            *last = Some(who.clone());
        }
    }

    fn new_work(&mut self, datum: i64) -> AppWork {
        let id = self.processed.len() as u64;
        self.processed.push(0);
        self.stats.work_injected += 1;
        AppWork { id, datum, hops: 0 }
    }

    /// Records that `item` was processed; a violation if processed before.
    fn process(&mut self, item: &AppWork) -> Option<String> {
        self.stats.work_processed += 1;
        let count = usize::try_from(item.id)
            .ok()
            .and_then(|i| self.processed.get_mut(i))?;
        *count = count.saturating_add(1);
        (*count > 1).then(|| format!("work {} processed {} times", item.id, count))
    }
}

/// The state of one job handed out and not finished yet.
#[derive(Clone, Debug)]
struct RunningJob {
    job: Job,
    ok: bool,
}

/// What a message sent through the simulator carried.
#[derive(Clone, Copy, Debug)]
enum Pending {
    Notices(SendId),
    Work(AppWork),
}

/// The parts of a node that exist once its state machine was built.
struct Core {
    handoff: Handoff<AppWork>,
    ty: DatumType,
}

/// The transition layer of one simulated process.
pub struct TransitionNode {
    key: Key,
    core: Option<Core>,
    strategy: Strategy,
    jobs: BTreeMap<(Instant, u64), RunningJob>,
    job_seq: u64,
    sends: HashMap<MessageId, Pending>,
    holding: HashSet<i64>,
    next_tick: Instant,
    transition_since: Option<Instant>,
    leaving: bool,
    /// A graceful leave began: not ready, leaves once idle.
    departing: bool,
    /// Started (ready_on_start is off): the node asks to be ready once it
    /// knows another live member, or at this time if it still knows none
    /// (the first node).
    ready_alone_at: Option<Instant>,
    /// Membership events pass through the takeover gate, as in the facade:
    /// a declared death is acted on only once the member's lease must have
    /// lapsed, and not at all if it refutes first.
    gate: TakeoverGate,
    /// Datums whose holding (per the handoff) may have changed in this
    /// callback: reported to the acting-owner check at its end.
    touched: Vec<i64>,
    /// Every datum's holding may have changed (a view installed, a peer
    /// gone, a timer, the lease: an acquire waiting to retry holds no token
    /// once queued again, or passed on).
    rescan: bool,
    /// A new generation after a declared death: ready once it knows
    /// another member, never alone.
    reborn: bool,
    /// As the facade's driver: nodes gone without a failover decided here
    /// (after a rebirth, the other nodes of the inherited view, which this
    /// generation's membership never knew; members declared failed while
    /// this node had no standing). Failed over (`peer_superseded`) once a
    /// newer generation of their name is a member. At most
    /// [`MAX_UNRESOLVED`]; beyond, the oldest is dropped (its datums wait
    /// for the transition timeout).
    unresolved: VecDeque<NodeId>,
}

/// Most nodes kept in [`TransitionNode::unresolved`], as in the facade.
const MAX_UNRESOLVED: usize = 4096;

impl fmt::Debug for TransitionNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransitionNode")
            .field("name", &self.key.0)
            .field("generation", &self.key.1)
            .field("holding", &self.holding.len())
            .finish_non_exhaustive()
    }
}

fn between(rng: &mut SmallRng, (lo, hi): (Duration, Duration)) -> Duration {
    let span = u64::try_from(hi.saturating_sub(lo).as_micros()).unwrap_or(u64::MAX);
    lo + Duration::from_micros(rng.random_range(0..=span))
}

fn node_id(key: &Key) -> NodeId {
    NodeId::new(&*key.0, key.1)
}

fn key_of(id: &NodeId) -> Key {
    (Arc::from(id.name.as_str()), id.generation)
}

impl TransitionNode {
    /// This node's state machine (None only if it could not be built).
    pub fn handoff(&self) -> Option<&Handoff<AppWork>> {
        self.core.as_ref().map(|c| &c.handoff)
    }

    /// Datums this process holds, as the ledger counts them.
    pub fn holding(&self) -> usize {
        self.holding.len()
    }

    fn violation(ctx: &mut AppCtx<'_, TransitionLedger>, what: String) {
        let at = ctx.now().saturating_duration_since(ctx.shared().base);
        ctx.violation(format!("{at:?}: {what}"));
    }

    /// Drains the state machine's outputs into the simulation, then tells
    /// the acting-owner check what this process holds now.
    fn pump(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        self.pump_outputs(ctx);
        self.sync_owned(ctx);
    }

    /// Reports the holdings of the datums touched since the last report
    /// (`Handoff::token`: from the hand-out of the acquire job to the end of
    /// a successful relinquish).
    fn sync_owned(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let rescan = std::mem::take(&mut self.rescan);
        if (self.touched.is_empty() && !rescan) || !ctx.shared().settings.leases {
            self.touched.clear();
            return;
        }
        if rescan {
            self.touched.clear();
            self.touched
                .extend(0..i64::from(ctx.shared().settings.datums));
        }
        let (slot, generation) = (ctx.node().slot, self.key.1);
        for d in std::mem::take(&mut self.touched) {
            let owned = self
                .core
                .as_ref()
                .is_some_and(|c| c.handoff.token(Datum::new(c.ty, d)).is_some());
            ctx.shared().acting.set_owned(slot, generation, d, owned);
        }
    }

    /// Whether this process's lease is valid now (always, leases off).
    fn lease_valid(ctx: &AppCtx<'_, TransitionLedger>) -> bool {
        ctx.membership().standing(ctx.now()).is_valid()
    }

    fn pump_outputs(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        loop {
            let Some(core) = self.core.as_mut() else {
                return;
            };
            let mut progressed = false;
            while let Some(job) = core.handoff.poll_job() {
                progressed = true;
                self.touched.push(job.datum.id);
                tracing::debug!(
                    target: "shoal_sim::transition",
                    t = now.saturating_duration_since(ctx.shared().base).as_secs_f64(),
                    node = %self.key.0,
                    generation = self.key.1,
                    datum = job.datum.id,
                    kind = ?job.kind,
                    token = job.token.0,
                    "job"
                );
                if ctx.shared().settings.leases && !Self::lease_valid(ctx) {
                    Self::violation(
                        ctx,
                        format!(
                            "{}/{} starts a {:?} job for datum {} without a valid lease",
                            self.key.0, self.key.1, job.kind, job.datum.id
                        ),
                    );
                }
                if job.kind == JobKind::Acquire {
                    self.holding.insert(job.datum.id);
                    ctx.shared().acquiring(job.datum.id, now);
                    if let Some(problem) = ctx.shared().start_holding(&self.key, job.datum.id) {
                        Self::violation(ctx, problem);
                    }
                }
                let (time, failure) = {
                    let s = &ctx.shared().settings;
                    (s.job_time, s.job_failure)
                };
                let d = between(ctx.rng(), time);
                let ok = !(failure > 0.0 && ctx.rng().random_bool(failure));
                self.job_seq += 1;
                self.jobs
                    .insert((now + d, self.job_seq), RunningJob { job, ok });
            }
            let mut sends = Vec::new();
            while let Some(tx) = core.handoff.poll_transmit() {
                progressed = true;
                sends.push(tx);
            }
            for tx in sends {
                let addr = ctx
                    .membership()
                    .members()
                    .find(|m| *m.name == *tx.to.name && m.generation == tx.to.generation)
                    .map(|m| m.addr);
                match addr {
                    Some(addr) => {
                        let bytes = tx.batch.encode();
                        let mut payload = Vec::with_capacity(bytes.len() + 1);
                        payload.push(TAG_NOTICES);
                        payload.extend_from_slice(&bytes);
                        let id = ctx.send(addr, payload);
                        self.sends.insert(id, Pending::Notices(tx.id));
                    }
                    None => core
                        .handoff
                        .send_done(tx.id, Err("unknown peer".into()), now),
                }
            }
            let mut events = Vec::new();
            while let Some(e) = core.handoff.poll_event() {
                progressed = true;
                events.push(e);
            }
            let mut releases = Vec::new();
            while let Some(r) = core.handoff.poll_release() {
                progressed = true;
                releases.push(r);
            }
            for e in events {
                self.on_handoff_event(e, ctx);
            }
            for r in releases {
                for item in r.work {
                    match &r.to {
                        ReleaseTo::Process => self.process(item, ctx),
                        ReleaseTo::Forward(to) => self.forward(to, item, ctx),
                        ReleaseTo::Returned(_) => ctx.shared().orphans.push(item),
                    }
                }
            }
            if !progressed {
                return;
            }
        }
    }

    fn on_handoff_event(&mut self, e: HandoffEvent, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        tracing::debug!(
            target: "shoal_sim::transition",
            t = now.saturating_duration_since(ctx.shared().base).as_secs_f64(),
            node = %self.key.0,
            generation = self.key.1,
            event = ?e,
            "handoff event"
        );
        match e {
            HandoffEvent::Fenced { .. } => {
                ctx.shared().stats.fenced += 1;
                for d in std::mem::take(&mut self.holding) {
                    ctx.shared().stop_holding(&self.key, d);
                }
            }
            HandoffEvent::TransitionStarted { .. } => {
                self.transition_since.get_or_insert(now);
            }
            HandoffEvent::TransitionEnded { .. } => {
                if let Some(since) = self.transition_since.take() {
                    let s = now.saturating_duration_since(since).as_secs_f64();
                    let stats = &mut ctx.shared().stats;
                    stats.max_transition_s = stats.max_transition_s.max(s);
                }
            }
            HandoffEvent::RelinquishFailed { .. } => ctx.shared().stats.relinquish_failures += 1,
            HandoffEvent::RelinquishAbandoned { datum } => {
                self.touched.push(datum.id);
                ctx.shared().stats.relinquish_abandoned += 1;
                self.holding.remove(&datum.id);
                ctx.shared().stop_holding(&self.key, datum.id);
            }
            HandoffEvent::AcquireFailed { datum, retry, .. } => {
                self.touched.push(datum.id);
                ctx.shared().stats.acquire_failures += 1;
                let held = self.core.as_ref().is_some_and(|c| c.handoff.is_held(datum));
                if !retry && held {
                    // The layer processes the datum anyway: it holds it.
                    self.holding.insert(datum.id);
                    if let Some(problem) = ctx.shared().start_holding(&self.key, datum.id) {
                        Self::violation(ctx, problem);
                    }
                }
            }
            HandoffEvent::AcquiredWithoutNotice { reason, .. } => match reason {
                WithoutNotice::Timeout => {
                    let l = ctx.shared();
                    l.stats.timeouts += 1;
                    if now >= l.base + l.settings.fault_at {
                        l.stats.timeouts_after_fault += 1;
                    }
                }
                WithoutNotice::OwnerGone => ctx.shared().stats.failovers += 1,
                WithoutNotice::AllDone => ctx.shared().stats.all_done += 1,
            },
            HandoffEvent::TransitionSuperseded { .. } | HandoffEvent::ReplicasChanged { .. } => {}
        }
    }

    fn process(&mut self, item: AppWork, ctx: &mut AppCtx<'_, TransitionLedger>) {
        if ctx.shared().settings.leases && !Self::lease_valid(ctx) {
            Self::violation(
                ctx,
                format!(
                    "{}/{} processes work {} for datum {} without a valid lease",
                    self.key.0, self.key.1, item.id, item.datum
                ),
            );
        }
        if !self.holding.contains(&item.datum) {
            Self::violation(
                ctx,
                format!(
                    "{}/{} processes work {} for datum {} it does not hold",
                    self.key.0, self.key.1, item.id, item.datum
                ),
            );
        }
        if let Some(problem) = ctx.shared().process(&item) {
            Self::violation(ctx, problem);
        }
    }

    /// Forwards `item` one hop. An item that was forwarded here already
    /// is not forwarded again (the nodes disagree on the view): it goes
    /// back to the client, which routes it again a little later.
    fn forward(&mut self, to: &NodeId, mut item: AppWork, ctx: &mut AppCtx<'_, TransitionLedger>) {
        if item.hops >= MAX_HOPS {
            item.hops = 0;
            ctx.shared().stats.work_bounced += 1;
            ctx.shared().orphans.push(item);
            return;
        }
        item.hops += 1;
        let addr = ctx
            .membership()
            .members()
            .find(|m| *m.name == *to.name && m.generation == to.generation)
            .map(|m| m.addr);
        match addr {
            Some(addr) => {
                ctx.shared().stats.work_forwarded += 1;
                let id = ctx.send(addr, item.encode());
                self.sends.insert(id, Pending::Work(item));
            }
            // Not reachable from here: back to the client, routed again.
            None => ctx.shared().orphans.push(item),
        }
    }

    /// Routes one work item arriving at this node.
    fn route(&mut self, item: AppWork, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let Some(core) = self.core.as_mut() else {
            ctx.shared().orphans.push(item);
            return;
        };
        let datum = Datum::new(core.ty, item.datum);
        let forward_to = match core.handoff.route(datum) {
            Route::Process => None,
            Route::Forward(to) => Some(to.clone()),
            Route::Hold => {
                match core.handoff.hold(datum, item) {
                    Ok(()) => ctx.shared().stats.work_held += 1,
                    Err(e) => ctx.shared().orphans.push(e.work),
                }
                return;
            }
            Route::Fenced => {
                ctx.shared().orphans.push(item);
                return;
            }
        };
        match forward_to {
            None => self.process(item, ctx),
            Some(to) => self.forward(&to, item, ctx),
        }
    }

    /// Ready as soon as it joined (it knows another live member, ready or
    /// not); the node of slot 0 also alone once nobody answered for a while
    /// (it forms the cluster). Nodes that join together become ready
    /// together, each often before it sees another ready: the layer's wait
    /// for the done markers of every live member (`set_peers`) keeps each
    /// datum to one first owner.
    fn maybe_ready(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        if ctx.membership().local().ready {
            self.ready_alone_at = None;
        }
        let Some(alone_at) = self.ready_alone_at else {
            return;
        };
        let me = &self.key.0;
        let joined = ctx
            .membership()
            .members()
            .any(|m| m.state.is_live() && m.name != *me);
        let first = ctx.node().slot == 0 && ctx.now() >= alone_at && !self.reborn;
        if joined || first {
            self.ready_alone_at = None;
            ctx.set_ready(true);
        }
    }

    /// The facade's graceful leave, when the settings plan one for this
    /// process: not ready; then, once its layer is idle under a view
    /// without it (it relinquished everything and said done), it leaves.
    fn maybe_depart(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        if !self.departing {
            let now = ctx.now();
            let slot = ctx.node().slot;
            let due = {
                let l = ctx.shared();
                l.settings
                    .graceful_leaves
                    .iter()
                    .any(|&(s, at)| s == slot && now >= l.base + at)
            };
            if !due {
                return;
            }
            self.departing = true;
            ctx.set_ready(false);
        }
        let done = self.core.as_ref().is_some_and(|c| {
            let h = &c.handoff;
            h.is_idle() && !h.table().view().contains(h.local())
        });
        if done && !ctx.membership().local().ready {
            self.leaving = true;
            ctx.leave();
        }
    }

    fn install(
        &mut self,
        members: &[shoal_membership::Member],
        ctx: &mut AppCtx<'_, TransitionLedger>,
    ) {
        let Some(core) = self.core.as_mut() else {
            return;
        };
        self.rescan = true;
        let peers: Vec<NodeId> = members
            .iter()
            .filter(|m| m.state.is_live())
            .map(|m| NodeId::new(&*m.name, m.generation))
            .collect();
        core.handoff.set_peers(peers.iter(), ctx.now());
        if !self.unresolved.is_empty() {
            let (gone, keep): (Vec<NodeId>, Vec<NodeId>) = std::mem::take(&mut self.unresolved)
                .into_iter()
                .partition(|n| {
                    members
                        .iter()
                        .any(|m| *m.name == *n.name && m.generation > n.generation)
                });
            self.unresolved = keep.into();
            for n in gone {
                core.handoff.peer_superseded(&n, ctx.now());
            }
        }
        let view = View::new(
            members
                .iter()
                .map(|m| ViewMember::new(&*m.name, m.generation, m.ready)),
        );
        match PlacementTable::build_from(core.handoff.table(), view, &self.strategy, 1) {
            Ok(table) => core.handoff.install(table, ctx.now()),
            Err(e) => Self::violation(ctx, format!("placement: {e}")),
        }
    }
}

impl Application for TransitionNode {
    type Shared = TransitionLedger;

    const STEP_CHECKS: bool = true;

    /// With leases, after every step: at most one process acts as owner of
    /// each datum (holds it per its handoff, lease valid now, not frozen,
    /// not fenced); and, once the last fault healed, when a datum last had
    /// no ready acting owner.
    fn check_step(
        shared: &mut TransitionLedger,
        now: Instant,
        nodes: &mut dyn Iterator<Item = NodeView<'_, Self>>,
    ) -> Result<(), String> {
        if !shared.settings.leases {
            return Ok(());
        }
        for n in nodes {
            let fenced = n.app.handoff().is_none_or(|h| h.is_fenced());
            let acting = !n.frozen && !fenced && n.membership.standing(now).is_valid();
            let ready = n.membership.local().ready;
            shared
                .acting
                .refresh(n.info.slot, n.info.generation, acting, ready);
        }
        if let Some((datum, owners)) = shared.acting.doubled() {
            let at = now.saturating_duration_since(shared.base);
            let owners: Vec<String> = owners
                .iter()
                .map(|(slot, generation)| format!("{}/{generation}", crate::node_name(*slot)))
                .collect();
            return Err(format!(
                "{at:?}: datum {datum} has {} acting owners (held, lease valid, not frozen): {}",
                owners.len(),
                owners.join(", ")
            ));
        }
        if let Some(healed) = shared.settings.healed_at
            && now >= shared.base + healed
            && shared.acting.unserved() > 0
        {
            shared.last_unserved = Some(now);
        }
        Ok(())
    }

    /// With leases, at every sampling point: the acting-owner check's
    /// record of what each process holds is the handoff's own
    /// (`Handoff::token`), for every datum.
    fn check(
        shared: &TransitionLedger,
        nodes: &mut dyn Iterator<Item = NodeView<'_, Self>>,
    ) -> Result<(), String> {
        if !shared.settings.leases {
            return Ok(());
        }
        for n in nodes {
            let Some(core) = n.app.core.as_ref() else {
                continue;
            };
            for id in 0..i64::from(shared.settings.datums) {
                let held = core.handoff.token(Datum::new(core.ty, id)).is_some();
                if held != shared.acting.owns(n.info.slot, n.info.generation, id) {
                    return Err(format!(
                        "{}/{}: the acting-owner check counts datum {id} {} but the handoff {}",
                        n.info.name,
                        n.info.generation,
                        if held { "free" } else { "held" },
                        if held { "holds it" } else { "does not" }
                    ));
                }
            }
        }
        Ok(())
    }

    fn start(ctx: &mut AppCtx<'_, TransitionLedger>) -> Self {
        let now = ctx.now();
        let key: Key = (ctx.node().name.clone(), ctx.node().generation);
        let settings = ctx.shared().settings.clone();
        let core = Self::new_core(&key, None, ctx);
        let first = between(ctx.rng(), (Duration::ZERO, settings.work_every));
        TransitionNode {
            key,
            core,
            strategy: settings.strategy,
            jobs: BTreeMap::new(),
            job_seq: 0,
            sends: HashMap::new(),
            holding: HashSet::new(),
            next_tick: now + first,
            transition_since: None,
            leaving: false,
            departing: false,
            ready_alone_at: Some(now + READY_ALONE_AFTER),
            gate: ctx.membership().takeover_gate(),
            touched: Vec::new(),
            rescan: false,
            reborn: false,
            unresolved: VecDeque::new(),
        }
    }

    fn on_event(&mut self, event: &MembershipEvent, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        self.refresh_standing(ctx);
        if matches!(event, MembershipEvent::DeclaredFailed) {
            // Self-fencing is never held back.
            self.on_gated_event(event, ctx);
        } else {
            self.gate.handle_event(event.clone(), now);
            while let Some(e) = self.gate.poll_event() {
                self.on_gated_event(&e, ctx);
            }
        }
        self.pump(ctx);
    }

    fn on_message(
        &mut self,
        from: &NodeInfo,
        payload: &[u8],
        ctx: &mut AppCtx<'_, TransitionLedger>,
    ) {
        self.refresh_standing(ctx);
        self.on_message_inner(from, payload, ctx);
    }

    fn on_send_done(
        &mut self,
        id: MessageId,
        _to: SocketAddr,
        delivered: bool,
        ctx: &mut AppCtx<'_, TransitionLedger>,
    ) {
        let now = ctx.now();
        self.refresh_standing(ctx);
        match self.sends.remove(&id) {
            Some(Pending::Notices(send)) => {
                if let Some(core) = self.core.as_mut() {
                    let outcome = if delivered {
                        Ok(())
                    } else {
                        Err("not delivered".to_string())
                    };
                    core.handoff.send_done(send, outcome, now);
                }
            }
            Some(Pending::Work(item)) => {
                if !delivered {
                    self.route(item, ctx);
                }
            }
            None => Self::violation(ctx, format!("outcome of unknown message {id:?}")),
        }
        self.pump(ctx);
    }

    fn on_timeout(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        self.refresh_standing(ctx);
        if self.gate.poll_timeout().is_some_and(|t| t <= now) {
            self.gate.handle_timeout(now);
            while let Some(e) = self.gate.poll_event() {
                self.on_gated_event(&e, ctx);
            }
        }
        while let Some(entry) = self.jobs.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let RunningJob { job, ok } = entry.remove();
            self.touched.push(job.datum.id);
            tracing::debug!(
                target: "shoal_sim::transition",
                t = now.saturating_duration_since(ctx.shared().base).as_secs_f64(),
                node = %self.key.0,
                generation = self.key.1,
                datum = job.datum.id,
                kind = ?job.kind,
                ok,
                "job done"
            );
            match (job.kind, ok) {
                (JobKind::Relinquish, true) => {
                    ctx.shared().stats.relinquished += 1;
                    if self.holding.remove(&job.datum.id) {
                        ctx.shared().stop_holding(&self.key, job.datum.id);
                    }
                }
                (JobKind::Acquire, false) => {
                    if self.holding.remove(&job.datum.id) {
                        ctx.shared().stop_holding(&self.key, job.datum.id);
                    }
                }
                (JobKind::Acquire, true) => {
                    if self.holding.contains(&job.datum.id) {
                        ctx.shared().acquired(&self.key, job.datum.id);
                    }
                }
                (JobKind::Relinquish, false) => {}
            }
            if let Some(core) = self.core.as_mut() {
                let outcome = if ok {
                    Ok(())
                } else {
                    Err("simulated failure".to_string())
                };
                core.handoff.job_done(job, outcome, now);
            }
            self.pump(ctx);
        }
        if let Some(core) = self.core.as_mut()
            && core.handoff.poll_timeout().is_some_and(|t| t <= now)
        {
            // A retry due queues the acquire again: no token until its job.
            self.rescan = true;
            core.handoff.handle_timeout(now);
        }
        if !self.leaving {
            self.maybe_ready(ctx);
            self.maybe_depart(ctx);
        }
        if self.next_tick <= now {
            let (every, until, datums, base) = {
                let l = ctx.shared();
                (
                    l.settings.work_every,
                    l.settings.work_until,
                    l.settings.datums,
                    l.base,
                )
            };
            let every = every.max(Duration::from_millis(1));
            self.next_tick = now + every;
            let serving =
                self.core.as_ref().is_some_and(|c| !c.handoff.is_fenced()) && !self.leaving;
            if serving {
                if now < base + until && datums > 0 {
                    let datum = ctx.rng().random_range(0..i64::from(datums));
                    let item = ctx.shared().new_work(datum);
                    self.route(item, ctx);
                }
                for item in std::mem::take(&mut ctx.shared().orphans) {
                    self.route(item, ctx);
                }
            }
        }
        self.pump(ctx);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.next_tick;
        if let Some((&(t, _), _)) = self.jobs.first_key_value() {
            next = next.min(t);
        }
        if let Some(t) = self.core.as_ref().and_then(|c| c.handoff.poll_timeout()) {
            next = next.min(t);
        }
        if let Some(t) = self.gate.poll_timeout() {
            next = next.min(t);
        }
        Some(next)
    }

    fn on_reborn(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let slot = ctx.node().slot;
        let key: Key = (ctx.node().name.clone(), ctx.node().generation);
        ctx.shared().acting.retire(slot);
        ctx.shared().stats.rebirths += 1;
        for d in std::mem::take(&mut self.holding) {
            ctx.shared().stop_holding(&self.key, d);
        }
        // As the facade's driver: outcomes of the old machine's jobs and
        // sends are ignored (the simulator drops the sends' outcomes).
        for pending in std::mem::take(&mut self.sends).into_values() {
            if let Pending::Work(item) = pending {
                let l = ctx.shared();
                l.maybe_lost.insert(item.id);
                l.stats.work_maybe_lost += 1;
            }
        }
        self.jobs.clear();
        self.transition_since = None;
        self.touched.clear();
        let old = self.core.take();
        self.core = Self::new_core(&key, old.as_ref().map(|c| &c.handoff), ctx);
        self.unresolved = old
            .as_ref()
            .map(|c| {
                let me = c.handoff.local();
                c.handoff
                    .table()
                    .view()
                    .nodes()
                    .iter()
                    .filter(|n| *n != me)
                    .take(MAX_UNRESOLVED)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        self.key = key;
        self.reborn = true;
        self.rescan = true;
        self.leaving = false;
        self.ready_alone_at = Some(ctx.now());
        self.refresh_standing(ctx);
        self.pump(ctx);
    }

    fn on_stop(&mut self, node: &NodeInfo, crashed: bool, shared: &mut TransitionLedger) {
        shared.acting.retire(node.slot);
        if crashed {
            shared.crashed(&self.key, &self.holding);
        }
        for d in self.holding.drain() {
            shared.stop_holding(&self.key, d);
        }
        if let Some(core) = self.core.as_ref() {
            for (_, item) in core.handoff.held_work() {
                if crashed {
                    shared.maybe_lost.insert(item.id);
                    shared.stats.work_maybe_lost += 1;
                } else {
                    shared.orphans.push(*item);
                }
            }
        }
        // Work sent and not acknowledged: it may arrive or not.
        for pending in self.sends.values() {
            if let Pending::Work(item) = pending {
                shared.maybe_lost.insert(item.id);
                shared.stats.work_maybe_lost += 1;
            }
        }
    }
}

impl TransitionNode {
    /// A state machine for process `key` with every datum registered. For
    /// a new generation after a declared death (`old`: the fenced machine),
    /// as the facade's driver does it: it continues the old one's epoch,
    /// installs the old one's table as its first view (it knows who held
    /// what, and waits for their notices instead of taking datums as their
    /// first owner), and knows the old generation gone.
    fn new_core(
        key: &Key,
        old: Option<&Handoff<AppWork>>,
        ctx: &mut AppCtx<'_, TransitionLedger>,
    ) -> Option<Core> {
        let now = ctx.now();
        let (config, datums) = {
            let s = &ctx.shared().settings;
            (s.handoff.clone(), s.datums)
        };
        let core = Handoff::new(node_id(key), config)
            .map_err(|e| e.to_string())
            .and_then(|mut handoff| {
                if let Some(old) = old {
                    handoff.observe_epoch(old.epoch());
                    handoff.install(Arc::clone(old.table()), now);
                    // Failed, not left: its datums fail over once the
                    // others are done (the facade's driver does the same).
                    handoff.peer_failed(old.local(), now);
                }
                let ty = handoff.datum_type(DATUM_TYPE).map_err(|e| e.to_string())?;
                for id in 0..i64::from(datums) {
                    handoff
                        .register(Datum::new(ty, id), now)
                        .map_err(|e| e.to_string())?;
                }
                Ok(Core { handoff, ty })
            });
        match core {
            Ok(core) => Some(core),
            Err(e) => {
                Self::violation(ctx, format!("cannot start the transition layer: {e}"));
                None
            }
        }
    }

    /// The handoff learns whether this node may act as an owner (its
    /// lease), as the facade's driver does before every decision.
    fn refresh_standing(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        let valid = ctx.membership().standing(now).is_valid();
        if let Some(core) = self.core.as_mut()
            && core.handoff.has_standing() != valid
        {
            tracing::debug!(
                target: "shoal_sim::transition",
                t = now.saturating_duration_since(ctx.shared().base).as_secs_f64(),
                node = %self.key.0,
                generation = self.key.1,
                valid,
                "set_standing"
            );
            self.rescan = true;
            core.handoff.set_standing(valid, now);
        }
    }

    fn on_gated_event(&mut self, event: &MembershipEvent, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        match event {
            MembershipEvent::ViewChanged(members) => {
                self.install(members, ctx);
                self.maybe_ready(ctx);
            }
            MembershipEvent::Failed(m) | MembershipEvent::Left(m) => {
                let key: Key = (m.name.clone(), m.generation);
                if key != self.key {
                    let failed = matches!(event, MembershipEvent::Failed(_));
                    if failed {
                        ctx.shared().declared.insert(key.clone());
                        ctx.shared().detected(&key, now);
                    }
                    self.rescan = true;
                    if let Some(core) = self.core.as_mut() {
                        let id = node_id(&key);
                        if failed {
                            if !core.handoff.has_standing() {
                                // Not failed over here unless a newer
                                // generation shows it is gone.
                                if self.unresolved.len() >= MAX_UNRESOLVED {
                                    self.unresolved.pop_front();
                                }
                                self.unresolved.push_back(id.clone());
                            }
                            core.handoff.peer_failed(&id, now);
                        } else {
                            core.handoff.peer_left(&id, now);
                        }
                    }
                }
            }
            MembershipEvent::DeclaredFailed => {
                ctx.shared().declared.insert(self.key.clone());
                if let Some(core) = self.core.as_mut() {
                    core.handoff.fence(now);
                }
                if ctx.shared().settings.leases {
                    // As the facade: unless it is leaving, the process
                    // comes back as a new generation (`on_reborn`).
                    if !self.leaving && !self.departing && ctx.shared().settings.rebirth {
                        ctx.rebirth();
                    }
                } else if !self.leaving {
                    // A fenced state machine is final: this process leaves
                    // and exits.
                    self.leaving = true;
                    ctx.leave();
                }
            }
            _ => {}
        }
    }

    fn on_message_inner(
        &mut self,
        from: &NodeInfo,
        payload: &[u8],
        ctx: &mut AppCtx<'_, TransitionLedger>,
    ) {
        let now = ctx.now();
        match payload.split_first() {
            Some((&TAG_NOTICES, bytes)) => {
                if let Some(core) = self.core.as_mut() {
                    let peer = NodeId::new(&*from.name, from.generation);
                    if core.handoff.handle_notices(&peer, bytes, now).is_err() {
                        ctx.shared().stats.batches_refused += 1;
                    }
                }
            }
            Some((&TAG_WORK, bytes)) => match AppWork::decode(bytes) {
                Some(item) => self.route(item, ctx),
                None => Self::violation(ctx, "undecodable work message".into()),
            },
            _ => Self::violation(ctx, "unknown application message".into()),
        }
        self.pump(ctx);
    }
}

/// The checks once the run settled (faults over, membership converged):
/// every live node's transitions ended and it runs the same view, every
/// datum is held by exactly its primary (no orphan, no double owner), no
/// work is waiting, and every work item was processed exactly once except
/// items that may have been lost with a stopped process.
pub fn final_check(sim: &Sim<TransitionNode>) -> Result<(), String> {
    let ledger = sim.shared();
    let mut table: Option<Arc<PlacementTable>> = None;
    for n in sim.nodes() {
        let Some(handoff) = n.app.handoff() else {
            return Err(format!("{} has no transition layer", n.info.name));
        };
        if handoff.is_fenced() || n.leaving {
            continue;
        }
        if !handoff.is_idle() {
            return Err(format!(
                "{}: transition still running: {:?}",
                n.info.name,
                handoff.progress()
            ));
        }
        match &table {
            None => table = Some(handoff.table().clone()),
            Some(t) if t.view_id() != handoff.view_id() => {
                return Err(format!(
                    "{} runs view {} while another node runs view {}",
                    n.info.name,
                    handoff.view_id(),
                    t.view_id()
                ));
            }
            Some(_) => {}
        }
    }
    let Some(table) = table else {
        return Err("no live node at the end".into());
    };
    for (id, holders) in ledger.holders.iter().enumerate() {
        let id = i64::try_from(id).map_err(|e| e.to_string())?;
        let primary = table
            .primary(id)
            .and_then(|i| table.view().node(i))
            .map(key_of);
        let expected: Vec<Key> = primary.into_iter().collect();
        if *holders != expected {
            return Err(format!(
                "datum {id}: held by {holders:?}, its primary is {expected:?}"
            ));
        }
    }
    if let Some(bound) = ledger.settings.failover_within {
        for (victim, lag) in ledger.failover_lags() {
            match lag {
                Some(lag) if lag <= bound => {}
                Some(lag) => {
                    return Err(format!(
                        "datums of {}/{} acquired again {lag:?} after the last survivor marked it \
                         failed (bound {bound:?})",
                        victim.0, victim.1
                    ));
                }
                None => {
                    return Err(format!(
                        "datums of {}/{} never acquired again",
                        victim.0, victim.1
                    ));
                }
            }
        }
    }
    if !ledger.orphans.is_empty() {
        return Err(format!(
            "{} work items never routed again",
            ledger.orphans.len()
        ));
    }
    for (id, &count) in ledger.processed.iter().enumerate() {
        if count != 1 && !(count == 0 && ledger.maybe_lost.contains(&(id as u64))) {
            return Err(format!("work {id} processed {count} times"));
        }
    }
    Ok(())
}

/// The membership-driven transition scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransitionScenario {
    /// A node joins a formed cluster: datums move to it.
    Join,
    /// A node leaves gracefully: it relinquishes, the others acquire on
    /// notice.
    Leave,
    /// A node crashes holding its datums: failover once it is declared
    /// failed.
    KillOwner,
    /// A node joins, and while that transition runs another crashes (even
    /// seeds) or leaves (odd seeds).
    Chained,
    /// Under packet loss, one node's ready flag flaps several times.
    Flap,
    /// A join, a graceful leave (not ready, relinquish, leave, as the
    /// facade does) and a crash, in random order, 0.2 to 3 s apart: every
    /// datum the crashed node held is acquired again within
    /// [`FAILOVER_MARGIN`] of the last survivor marking it failed.
    JoinLeaveKill,
    /// With leases: from 15 s, for 0.5 to 20 s, one node is isolated, a
    /// minority ((N-1)/2 nodes) is cut off, or the cluster splits in two
    /// even halves (by seed, in turn).
    Partition,
    /// With leases: from 15 s, for 0.5 to 20 s, links are cut in one
    /// direction: every link into one node (it hears nobody, all hear it),
    /// every link out of one node, or 1 to N random (from, to) pairs (by
    /// seed, in turn).
    OneWay,
    /// With leases: from 15 s one node is frozen for 0.5 to 60 s
    /// (log-uniform): it handles no input and no timer and sends nothing,
    /// then wakes with its clock jumped and handles its backlog.
    Pause,
    /// With leases: from 15 s, one node or a minority is cut off and
    /// reconnected 2 to 6 times, each state lasting 0.2 to 6 s.
    LinkFlap,
}

impl TransitionScenario {
    /// Every scenario.
    pub const ALL: [TransitionScenario; 10] = [
        TransitionScenario::Join,
        TransitionScenario::Leave,
        TransitionScenario::KillOwner,
        TransitionScenario::Chained,
        TransitionScenario::Flap,
        TransitionScenario::JoinLeaveKill,
        TransitionScenario::Partition,
        TransitionScenario::OneWay,
        TransitionScenario::Pause,
        TransitionScenario::LinkFlap,
    ];

    /// The scenarios run with leases on, checked by the acting-owner check.
    pub const WITH_LEASES: [TransitionScenario; 4] = [
        TransitionScenario::Partition,
        TransitionScenario::OneWay,
        TransitionScenario::Pause,
        TransitionScenario::LinkFlap,
    ];

    /// Whether the scenario runs with leases (and the acting-owner check).
    pub fn leases(self) -> bool {
        Self::WITH_LEASES.contains(&self)
    }

    /// The scenario's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            TransitionScenario::Join => "join",
            TransitionScenario::Leave => "leave",
            TransitionScenario::KillOwner => "kill-owner",
            TransitionScenario::Chained => "chained",
            TransitionScenario::Flap => "flap",
            TransitionScenario::JoinLeaveKill => "join-leave-kill",
            TransitionScenario::Partition => "partition",
            TransitionScenario::OneWay => "one-way",
            TransitionScenario::Pause => "pause",
            TransitionScenario::LinkFlap => "link-flap",
        }
    }
}

impl fmt::Display for TransitionScenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct TransitionOptions {
    /// Which scenario.
    pub scenario: TransitionScenario,
    /// Cluster size (the joiner included for `join` and `chained`).
    pub nodes: u32,
    /// Seed of everything random.
    pub seed: u64,
    /// Number of datums.
    pub datums: u32,
    /// Loss probability of membership datagrams during `flap`, and during
    /// the whole run in the scenarios with leases.
    pub loss: f64,
    /// Placement strategy.
    pub strategy: Strategy,
    /// Every process is ready as soon as it starts, before it joined (the
    /// unsafe formation: see the module documentation). Off by default.
    pub ready_on_start: bool,
    /// The scenarios with leases, run with membership's lease strategy
    /// `Off` (always valid) under the same checks: unsafe, to show that the
    /// acting-owner check catches a cut-off owner that keeps acting. Off by
    /// default.
    pub lease_off: bool,
    /// The scenarios with leases: a process declared dead comes back as a
    /// new generation, as the facade's does (on by default); off, it stays
    /// fenced, which the final check catches.
    pub rebirth: bool,
}

impl TransitionOptions {
    /// `scenario` with `nodes`, `seed` and `datums`, 10 % loss for `flap`
    /// and 5 % for the scenarios with leases, mod-N placement.
    pub fn new(scenario: TransitionScenario, nodes: u32, seed: u64, datums: u32) -> Self {
        TransitionOptions {
            scenario,
            nodes,
            seed,
            datums,
            loss: if scenario.leases() { 0.05 } else { 0.1 },
            strategy: Strategy::ModN,
            ready_on_start: false,
            lease_off: false,
            rebirth: true,
        }
    }
}

/// The result of one run: one JSON line in the CLI.
#[derive(Clone, Debug, Serialize)]
pub struct TransitionReport {
    /// Scenario name.
    pub scenario: &'static str,
    /// Cluster size.
    pub nodes: u32,
    /// Seed.
    pub seed: u64,
    /// Number of datums.
    pub datums: u32,
    /// Placement strategy (`mod-n` or `rendezvous`).
    pub strategy: String,
    /// The scenarios with leases: the fault drawn from the seed.
    pub fault: Option<String>,
    /// The scenarios with leases: the liveness bound, in seconds.
    pub recover_bound_s: Option<f64>,
    /// The counters (moved, relinquished, acquired, failovers, timeouts...).
    #[serde(flatten)]
    pub stats: TransitionStats,
    /// 0, or 1 when the run stopped at a broken invariant or failed its
    /// final check.
    pub invariant_violations: u64,
    /// 0, or 1 when the run stopped at an invariant checked while it ran
    /// (one acting owner, work and jobs only under a valid lease, work
    /// never processed twice, membership's invariants), as opposed to a
    /// final check once it settled (every transition ended, every datum
    /// owned in time, every node ready with a lease).
    pub stopped_early: u64,
    /// Membership's own lease check (`Sim::lease_report`): takeovers whose
    /// victim still held a valid lease at that instant (a fault of the
    /// lease rule, below the transition layer), and the first described.
    pub lease_violations: usize,
    /// The first of those, described.
    pub first_lease_violation: Option<String>,
    /// What broke, if anything.
    pub failure: Option<String>,
    /// Whether the run passed.
    pub ok: bool,
    /// Virtual seconds simulated.
    pub virtual_s: f64,
    /// Events processed.
    pub events: u64,
    /// Hash of everything processed (same seed, same hash).
    pub trace_hash: String,
    /// Wall-clock seconds the run took (not deterministic).
    pub wall_s: f64,
}

impl fmt::Display for TransitionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        write!(
            f,
            "{} nodes={} seed={} datums={} {}: moved={} relinquished={} acquired={} failovers={} \
             all_done={} timeouts={} max_transition_s={:.3} work={}/{} {}",
            self.scenario,
            self.nodes,
            self.seed,
            self.datums,
            self.strategy,
            s.moved,
            s.relinquished,
            s.acquired,
            s.failovers,
            s.all_done,
            s.timeouts,
            s.max_transition_s,
            s.work_processed,
            s.work_injected,
            match &self.failure {
                None => "ok".to_string(),
                Some(f) => format!("FAILED: {f}"),
            }
        )
    }
}

/// When the fault of every scenario happens.
const FAULT_AT: Duration = Duration::from_secs(15);
/// Faults are over by then at the latest (flap).
const QUIET_AT: Duration = Duration::from_secs(30);
/// End of every run.
const END_AT: Duration = Duration::from_secs(60);

/// A report for a run that did not complete, with `failure`.
pub fn failed_report(opts: &TransitionOptions, failure: String) -> TransitionReport {
    let mut report = empty_report(opts);
    report.failure = Some(failure);
    report
}

fn empty_report(opts: &TransitionOptions) -> TransitionReport {
    TransitionReport {
        scenario: opts.scenario.name(),
        nodes: opts.nodes,
        seed: opts.seed,
        datums: opts.datums,
        strategy: match opts.strategy {
            Strategy::ModN => "mod-n".to_string(),
            _ => "rendezvous".to_string(),
        },
        fault: None,
        recover_bound_s: None,
        stats: TransitionStats::default(),
        invariant_violations: 0,
        stopped_early: 0,
        lease_violations: 0,
        first_lease_violation: None,
        failure: None,
        ok: false,
        virtual_s: 0.0,
        events: 0,
        trace_hash: String::new(),
        wall_s: 0.0,
    }
}

/// Runs one scenario and checks it.
pub fn run(opts: &TransitionOptions) -> TransitionReport {
    let wall = Instant::now();
    let mut settings = TransitionSettings::new(opts.datums);
    settings.strategy = opts.strategy.clone();
    settings.work_until = QUIET_AT + Duration::from_secs(15);
    let plan = join_leave_kill_plan(opts);
    if let Some(p) = &plan {
        settings.graceful_leaves = vec![(p.leaver, p.leave_at)];
        settings.failover_within = Some(FAILOVER_MARGIN);
    }
    let mconfig = if opts.scenario.leases() && !opts.lease_off {
        shoal_membership::Config::lan()
    } else {
        // Leases off: these scenarios' checker counts a datum held from
        // its acquire to the end of its relinquish, not acted on under a
        // valid lease, so a lapsed holder that stops acting would read as
        // a second owner. The gate and the standing rule run (as
        // pass-throughs with no lease).
        shoal_membership::Config {
            lease: shoal_membership::LeaseStrategy::Off,
            ..shoal_membership::Config::lan()
        }
    };
    let faults = fault_plan(opts);
    let mut end = END_AT;
    let mut report = empty_report(opts);
    if let Some(f) = &faults {
        let bound = recover_bound(&mconfig, &settings.handoff, opts.nodes);
        settings.leases = true;
        settings.rebirth = opts.rebirth;
        settings.healed_at = Some(f.healed_at);
        settings.recover_within = Some(bound);
        settings.work_until = f.healed_at + WORK_AFTER_HEAL;
        end = f.healed_at + bound + SETTLE_AFTER_BOUND;
        report.fault = Some(f.fault.clone());
        report.recover_bound_s = Some(bound.as_secs_f64());
    }
    let failure = if opts.nodes < 3 {
        Some("transition scenarios need at least 3 nodes".to_string())
    } else if opts.nodes < 4 && opts.scenario == TransitionScenario::JoinLeaveKill {
        Some("join-leave-kill needs at least 4 nodes".to_string())
    } else if let Err(e) = settings.handoff.validate() {
        Some(format!("transition configuration: {e}"))
    } else {
        None
    };
    if let Some(f) = failure {
        report.failure = Some(f);
        report.invariant_violations = 1;
        return report;
    }
    let base = Instant::now();
    let mut cfg = SimConfig::new(opts.seed, mconfig);
    // Nodes join first, then become ready (as `shoal-cluster` nodes do).
    cfg.ready_on_start = opts.ready_on_start;
    let shared = TransitionLedger::new(settings, base);
    let mut sim: Sim<TransitionNode> = match Sim::new(cfg, opts.nodes, base, shared) {
        Ok(sim) => sim,
        Err(e) => {
            report.failure = Some(e);
            report.invariant_violations = 1;
            return report;
        }
    };
    schedule(&mut sim, opts);
    if let Some(f) = faults {
        sim.schedule(Duration::ZERO, Action::SetLoss(opts.loss));
        for (at, action) in f.actions {
            sim.schedule(at, action);
        }
        sim.schedule(f.healed_at, Action::Quiet);
    }
    let outcome = sim.run_until(end).map_err(|v| v.to_string());
    if let Err(e) = &outcome {
        report.failure = Some(e.clone());
        report.invariant_violations = 1;
        report.stopped_early = 1;
    }
    let settled = outcome
        .and_then(|()| sim.check_converged())
        .and_then(|()| final_check_leases(&sim))
        .and_then(|()| final_check(&sim));
    if let (Err(e), None) = (settled, &report.failure) {
        report.failure = Some(e);
        report.invariant_violations = 1;
    }
    report.ok = report.failure.is_none();
    if opts.scenario.leases() && !opts.lease_off {
        let lease = sim.lease_report();
        report.lease_violations = lease.violations;
        report.first_lease_violation = lease.first_violation;
    }
    report.stats = sim.shared().stats.clone();
    report.stats.max_failover_lag_s = sim
        .shared()
        .failover_lags()
        .into_iter()
        .filter_map(|(_, lag)| lag)
        .max()
        .unwrap_or_default()
        .as_secs_f64();
    if let (Some(healed), Some(last)) =
        (sim.shared().settings.healed_at, sim.shared().last_unserved)
    {
        report.stats.recovered_s = last.saturating_duration_since(base + healed).as_secs_f64();
    }
    report.virtual_s = sim.now().as_secs_f64();
    report.events = sim.steps();
    report.trace_hash = format!("{:016x}", sim.trace_hash());
    report.wall_s = wall.elapsed().as_secs_f64();
    report
}

/// When `join-leave-kill` joins, leaves and kills, and whom.
struct JoinLeaveKillPlan {
    join_at: Duration,
    leaver: u32,
    leave_at: Duration,
    victim: u32,
    kill_at: Duration,
    last: Duration,
}

/// The plan of a `join-leave-kill` run (None for other scenarios): the
/// three changes in a random order from `FAULT_AT`, 0.2 to 3 s apart; the
/// leaver and the victim are two of the first nodes.
fn join_leave_kill_plan(opts: &TransitionOptions) -> Option<JoinLeaveKillPlan> {
    if opts.scenario != TransitionScenario::JoinLeaveKill || opts.nodes < 4 {
        return None;
    }
    let mut rng = SmallRng::seed_from_u64(derive_seed(opts.seed, TAG_TRANSITION_SCENARIO, 1));
    let initial = opts.nodes - 1;
    let leaver = rng.random_range(0..initial);
    let victim = (leaver + rng.random_range(1..initial)) % initial;
    let mut order = [0u8, 1, 2];
    for i in (1..order.len()).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    let mut at = FAULT_AT;
    let mut times = [Duration::ZERO; 3];
    for &op in &order {
        if let Some(t) = times.get_mut(usize::from(op)) {
            *t = at;
        }
        at += between(
            &mut rng,
            (Duration::from_millis(200), Duration::from_millis(3_000)),
        );
    }
    let [join_at, leave_at, kill_at] = times;
    Some(JoinLeaveKillPlan {
        join_at,
        leaver,
        leave_at,
        victim,
        kill_at,
        last: join_at.max(leave_at).max(kill_at),
    })
}

/// Schedules the scenario's starts and faults.
fn schedule(sim: &mut Sim<TransitionNode>, opts: &TransitionOptions) {
    let mut rng = SmallRng::seed_from_u64(derive_seed(opts.seed, TAG_TRANSITION_SCENARIO, 0));
    let n = opts.nodes;
    let joins = matches!(
        opts.scenario,
        TransitionScenario::Join | TransitionScenario::Chained | TransitionScenario::JoinLeaveKill
    );
    let initial = if joins { n - 1 } else { n };
    for slot in 0..initial {
        sim.schedule(
            Duration::from_millis(10 * u64::from(slot)),
            Action::Start { slot },
        );
    }
    let victim = rng.random_range(0..initial);
    match opts.scenario {
        TransitionScenario::Join => {
            sim.schedule(FAULT_AT, Action::Start { slot: n - 1 });
            sim.schedule(FAULT_AT, Action::Quiet);
        }
        TransitionScenario::Leave => {
            // The facade's leave (not ready, relinquish, then leave), run
            // by the process itself: a member leaving the membership while
            // it holds datums loses its standing at once and relinquishes
            // nothing, which the product never does.
            sim.shared_mut()
                .settings
                .graceful_leaves
                .push((victim, FAULT_AT));
            sim.schedule(FAULT_AT, Action::Quiet);
        }
        TransitionScenario::KillOwner => {
            sim.schedule(
                FAULT_AT,
                Action::Crash {
                    slot: victim,
                    measure: false,
                },
            );
            sim.schedule(FAULT_AT, Action::Quiet);
        }
        TransitionScenario::Chained => {
            sim.schedule(FAULT_AT, Action::Start { slot: n - 1 });
            let second = FAULT_AT
                + between(
                    &mut rng,
                    (Duration::from_millis(20), Duration::from_millis(1_500)),
                );
            if opts.seed.is_multiple_of(2) {
                sim.schedule(
                    second,
                    Action::Crash {
                        slot: victim,
                        measure: false,
                    },
                );
            } else {
                // A graceful leave, as in `leave`.
                sim.shared_mut()
                    .settings
                    .graceful_leaves
                    .push((victim, second));
            }
            sim.schedule(second, Action::Quiet);
        }
        TransitionScenario::JoinLeaveKill => {
            // The graceful leave is in the settings (the process runs it).
            if let Some(p) = join_leave_kill_plan(opts) {
                sim.schedule(p.join_at, Action::Start { slot: n - 1 });
                sim.schedule(
                    p.kill_at,
                    Action::Crash {
                        slot: p.victim,
                        measure: false,
                    },
                );
                sim.schedule(p.last, Action::Quiet);
            }
        }
        // Their faults come from `fault_plan`.
        TransitionScenario::Partition
        | TransitionScenario::OneWay
        | TransitionScenario::Pause
        | TransitionScenario::LinkFlap => {}
        TransitionScenario::Flap => {
            sim.schedule(
                FAULT_AT - Duration::from_secs(2),
                Action::SetLoss(opts.loss),
            );
            let mut at = FAULT_AT;
            for i in 0..4 {
                sim.schedule(
                    at,
                    Action::SetReady {
                        slot: victim,
                        ready: i % 2 == 1,
                    },
                );
                at += between(
                    &mut rng,
                    (Duration::from_millis(200), Duration::from_millis(3_000)),
                );
            }
            sim.schedule(QUIET_AT, Action::SetLoss(0.0));
            sim.schedule(QUIET_AT, Action::Quiet);
        }
    }
}

/// Work is injected until this long after the last heal.
const WORK_AFTER_HEAL: Duration = Duration::from_secs(5);
/// The scenarios with leases end this long after the liveness bound.
const SETTLE_AFTER_BOUND: Duration = Duration::from_secs(5);

/// The liveness bound of the scenarios with leases: after the last fault
/// healed, every datum has a ready owner that acts (holds it, lease valid)
/// within this, from the timing profile:
///
/// - the slowest dead verdict that may still come after the heal (a
///   suspicion raised just before it, never confirmed): the longest
///   suspicion timeout, `suspicion_max_mult × suspicion_mult × max(1,
///   log10 N) × probe_interval`, plus one probe (`probe_interval`);
/// - news of a verdict reaching its subject, which is reborn at once and
///   rejoins: `reconnect_interval`;
/// - twice the takeover delay: the new generation's lease becomes valid
///   only after its evidence held that long (`Returning`), and a healthy
///   node fenced by a cut-off node's stale verdict (the heal storm) goes
///   through it once more;
/// - the transition: a datum whose notice went to the old generation is
///   taken at the handoff's `timeout`.
pub fn recover_bound(
    membership: &shoal_membership::Config,
    handoff: &HandoffConfig,
    nodes: u32,
) -> Duration {
    let scale = f64::from(nodes.max(1)).log10().max(1.0);
    let suspicion = membership.probe_interval.mul_f64(
        f64::from(membership.suspicion_mult) * f64::from(membership.suspicion_max_mult) * scale,
    );
    suspicion
        + membership.probe_interval
        + membership.reconnect_interval
        + membership.takeover_delay() * 2
        + handoff.timeout
}

/// The fault of a scenario with leases, drawn from the seed.
struct FaultPlan {
    actions: Vec<(Duration, Action)>,
    /// When the last fault ends (the last heal, or the wake-up).
    healed_at: Duration,
    /// What it is, for the report.
    fault: String,
}

/// The fault of `opts` (None for the scenarios without leases).
fn fault_plan(opts: &TransitionOptions) -> Option<FaultPlan> {
    if !opts.scenario.leases() {
        return None;
    }
    let mut rng = SmallRng::seed_from_u64(derive_seed(opts.seed, TAG_TRANSITION_SCENARIO, 2));
    let n = opts.nodes;
    let mut order: Vec<u32> = (0..n).collect();
    for i in (1..order.len()).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    let cut = |k: u32| -> Vec<u32> {
        let mut groups = vec![0; n as usize];
        for &slot in order.iter().take(k as usize) {
            if let Some(g) = groups.get_mut(slot as usize) {
                *g = 1;
            }
        }
        groups
    };
    let one = order.first().copied().unwrap_or(0);
    let variant = opts.seed % 3;
    let secs = |d: Duration| d.as_secs_f64();
    let mut actions = Vec::new();
    let (healed_at, fault) = match opts.scenario {
        TransitionScenario::Partition => {
            let (k, name) = match variant {
                0 => (1, "isolated"),
                1 => ((n - 1) / 2, "minority"),
                _ => (n / 2, "even"),
            };
            let lasts = between(
                &mut rng,
                (Duration::from_millis(500), Duration::from_secs(20)),
            );
            actions.push((FAULT_AT, Action::Partition { groups: cut(k) }));
            actions.push((FAULT_AT + lasts, Action::Heal));
            (
                FAULT_AT + lasts,
                format!("{name} {k}|{} for {:.2}s", n - k, secs(lasts)),
            )
        }
        TransitionScenario::OneWay => {
            let others = order.iter().copied().filter(|&s| s != one);
            let (pairs, name): (Vec<(u32, u32)>, _) = match variant {
                0 => (others.map(|o| (o, one)).collect(), "deaf"),
                1 => (others.map(|o| (one, o)).collect(), "mute"),
                _ => {
                    let k = rng.random_range(1..=n);
                    let mut pairs = Vec::new();
                    while pairs.len() < k as usize {
                        let a = rng.random_range(0..n);
                        let b = rng.random_range(0..n);
                        if a != b && !pairs.contains(&(a, b)) {
                            pairs.push((a, b));
                        }
                    }
                    (pairs, "pairs")
                }
            };
            let lasts = between(
                &mut rng,
                (Duration::from_millis(500), Duration::from_secs(20)),
            );
            let fault = format!(
                "{name} ({} links{}) for {:.2}s",
                pairs.len(),
                if variant < 2 {
                    format!(", node {one}")
                } else {
                    String::new()
                },
                secs(lasts)
            );
            actions.push((FAULT_AT, Action::OneWay { pairs }));
            actions.push((FAULT_AT + lasts, Action::Heal));
            (FAULT_AT + lasts, fault)
        }
        TransitionScenario::Pause => {
            // Log-uniform from 0.5 s to 60 s.
            let (lo, hi) = (0.5f64.ln(), 60f64.ln());
            let lasts = Duration::from_secs_f64(rng.random_range(lo..hi).exp());
            actions.push((
                FAULT_AT,
                Action::Pause {
                    slot: one,
                    duration: lasts,
                },
            ));
            (
                FAULT_AT + lasts,
                format!("node {one} paused for {:.2}s", secs(lasts)),
            )
        }
        _ => {
            let (k, name) = if variant.is_multiple_of(2) {
                (1, "isolated")
            } else {
                ((n - 1) / 2, "minority")
            };
            let toggles = rng.random_range(2..=6u32);
            let span = (Duration::from_millis(200), Duration::from_secs(6));
            let mut at = FAULT_AT;
            for i in 0..toggles {
                actions.push((at, Action::Partition { groups: cut(k) }));
                at += between(&mut rng, span);
                actions.push((at, Action::Heal));
                if i + 1 < toggles {
                    at += between(&mut rng, span);
                }
            }
            (
                at,
                format!(
                    "{name} {k}|{} cut {toggles} times over {:.2}s",
                    n - k,
                    secs(at - FAULT_AT)
                ),
            )
        }
    };
    Some(FaultPlan {
        actions,
        healed_at,
        fault,
    })
}

/// With leases, once the run settled: no live process is fenced or not
/// ready, every one holds a valid lease, every datum has a ready acting
/// owner, and since the last heal every datum had one within the bound.
pub fn final_check_leases(sim: &Sim<TransitionNode>) -> Result<(), String> {
    let ledger = sim.shared();
    let s = &ledger.settings;
    let (Some(healed), Some(bound)) = (s.healed_at, s.recover_within) else {
        return Ok(());
    };
    let now = ledger.base + sim.now();
    for n in sim.nodes() {
        if n.leaving {
            continue;
        }
        if n.app.handoff().is_none_or(|h| h.is_fenced()) {
            return Err(format!(
                "{}/{} is fenced at the end",
                n.info.name, n.info.generation
            ));
        }
        if !n.membership.local().ready {
            return Err(format!(
                "{}/{} is not ready at the end",
                n.info.name, n.info.generation
            ));
        }
        let standing = n.membership.standing(now);
        if !standing.is_valid() {
            return Err(format!(
                "{}/{} has no valid lease at the end: {standing:?}",
                n.info.name, n.info.generation
            ));
        }
    }
    if let Some(d) = ledger.acting.an_unserved() {
        return Err(format!(
            "datum {d} has no ready acting owner at the end ({} such datums)",
            ledger.acting.unserved()
        ));
    }
    if let Some(last) = ledger.last_unserved {
        let after = last.saturating_duration_since(ledger.base + healed);
        if after > bound {
            return Err(format!(
                "a datum had no ready acting owner {after:?} after the last heal (bound {bound:?})"
            ));
        }
    }
    Ok(())
}
