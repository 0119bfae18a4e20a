//! The discrete-event engine: virtual clock, event queue, node processes,
//! the network between them, faults, and the invariant checks.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shoal_membership::{Config, Event, LocalNode, Member, Membership, Transmit};

use crate::app::{AppCommand, AppCtx, AppOutput, Application, MessageId, NodeInfo, NodeView};
use crate::check::{Checks, Detection, Dissemination, ProcKey, World, is_live};
use crate::net::{Copies, NetConfig, Partitions, duration_ns};
use crate::util::{TraceHash, derive_seed};

/// Purpose tags for derived seeds.
const TAG_NET: u64 = 1;
const TAG_MEMBERSHIP: u64 = 2;
const TAG_APP: u64 = 3;

/// Port every simulated node listens on (each slot has its own IP).
const PORT: u16 = 7946;

/// Most addresses a reborn process rejoins through (members it knew, then
/// seeds), as the facade's rebirth.
const REJOIN_TARGETS: usize = 64;

/// Everything that shapes a run. Two runs with equal configurations and
/// scenarios process the same events in the same order.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The seed every random choice derives from: the network's and the
    /// scenario's generator, and one generator per process.
    pub seed: u64,
    /// Membership configuration of every node.
    pub membership: Config,
    /// The virtual network.
    pub net: NetConfig,
    /// Whether a process marks itself ready when it starts.
    pub ready_on_start: bool,
    /// At every sampling point, also scan every node's whole member list
    /// against the per-observer records (O(N^2): for small clusters).
    pub deep_checks: bool,
    /// Period of the sampling points (application checks, deep checks).
    pub sample_every: Duration,
    /// Period of the convergence check once faults stopped (O(N^2) each).
    pub converge_check_every: Duration,
    /// Until the cluster converged after faults, a cheap O(N) test (does
    /// every live node count the right number of live members?) runs this
    /// often; the O(N^2) check only runs when it passes (then every
    /// `converge_check_every`). Gives `settle_s` this resolution at any size.
    pub converge_poll_every: Duration,
    /// After [`Action::Quiet`], every live node must see exactly the live
    /// members within this time, or the run stops with a violation.
    pub settle_limit: Duration,
    /// Once the cluster has stayed converged this long after faults, every
    /// running process that some node marked failed must have received
    /// `DeclaredFailed` (the news had time to arrive).
    pub fencing_grace: Duration,
    /// A started process that still knows no other live member after this
    /// long joins again through other seeds (as a real node's driver
    /// retries its seeds).
    pub rejoin_after: Duration,
    /// How long a process keeps running after it called `leave`, so its
    /// leave message goes out, before it exits.
    pub leave_linger: Duration,
    /// How many live nodes a starting process is given as seeds.
    pub seeds_per_join: usize,
}

impl SimConfig {
    /// Defaults for a run with this seed and membership configuration: LAN
    /// network, checks every second, 120 s to settle.
    pub fn new(seed: u64, membership: Config) -> SimConfig {
        SimConfig {
            seed,
            membership,
            net: NetConfig::lan(),
            ready_on_start: true,
            deep_checks: true,
            sample_every: Duration::from_secs(1),
            converge_check_every: Duration::from_secs(1),
            converge_poll_every: Duration::from_millis(100),
            settle_limit: Duration::from_secs(120),
            fencing_grace: Duration::from_secs(5),
            rejoin_after: Duration::from_secs(5),
            leave_linger: Duration::from_secs(2),
            seeds_per_join: 3,
        }
    }
}

/// Leases in a run: see [`Sim::lease_report`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeaseReport {
    /// Takeovers: verdicts that stood `takeover_delay`, by accusers holding
    /// a valid lease then.
    pub takeovers: usize,
    /// Takeovers whose victim still held a valid lease (and was neither
    /// fenced nor stopped) at that instant: two owners.
    pub violations: usize,
    /// The smallest margin (victim out of the way before the takeover), in
    /// seconds; negative for a violation.
    pub min_margin_s: Option<f64>,
    /// Virtual time of the first takeover.
    pub first_takeover_s: Option<f64>,
    /// The first violation, described.
    pub first_violation: Option<String>,
}

/// A fault or command applied at a virtual time.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Start a process in a slot that has none (first start, or restart as a
    /// new generation). It joins through up to `seeds_per_join` live nodes
    /// it can reach, or starts alone when there are none.
    Start {
        /// The slot.
        slot: u32,
    },
    /// Crash the slot's process (kill -9): it stops at once, silently.
    Crash {
        /// The slot.
        slot: u32,
        /// Measure how long survivors take to mark it failed.
        measure: bool,
    },
    /// Graceful leave: `leave()`, then the process exits after the linger.
    Leave {
        /// The slot.
        slot: u32,
    },
    /// From now on for `duration`, the slot's process handles every packet
    /// `delay` late (a CPU-starved node); `timers` delays its timers too.
    /// Inputs stay in order; the backlog drains after the window.
    Stall {
        /// The slot.
        slot: u32,
        /// How late each input is handled.
        delay: Duration,
        /// How long the stall lasts.
        duration: Duration,
        /// Whether timers are late too (otherwise they fire on time and only
        /// packets wait, the harsher case for false suspicions).
        timers: bool,
    },
    /// The slot's process is stopped (SIGSTOP) for `duration`: it handles
    /// nothing, timers included, and on waking handles every input that
    /// arrived meanwhile, in order, at the wake-up time.
    Pause {
        /// The slot.
        slot: u32,
        /// How long it is stopped.
        duration: Duration,
    },
    /// Partition the network: slot `i` goes to group `groups[i]` (missing
    /// slots to group 0); packets cross no group boundary.
    Partition {
        /// Group of each slot.
        groups: Vec<u32>,
    },
    /// Cut links in one direction: packets from `from` to `to` are dropped
    /// (`to` no longer hears `from`, `from` still hears `to`), for every
    /// listed pair, on top of the partitions in force. Reliable messages
    /// between the two fail both ways (a connection needs both directions).
    OneWay {
        /// The (from, to) slot pairs cut.
        pairs: Vec<(u32, u32)>,
    },
    /// Remove every partition and every one-way cut.
    Heal,
    /// Change the loss probability of unreliable packets.
    SetLoss(f64),
    /// Change the duplication probability of unreliable packets.
    SetDuplicate(f64),
    /// Change a node's metadata.
    SetMetadata {
        /// The slot.
        slot: u32,
        /// New metadata.
        metadata: Vec<u8>,
        /// Measure how fast the change reaches the other members.
        measure: bool,
    },
    /// Change a node's ready flag.
    SetReady {
        /// The slot.
        slot: u32,
        /// New flag.
        ready: bool,
    },
    /// Deliver `len` random bytes to the slot as a membership packet: it must
    /// be rejected with an error and change nothing.
    Garbage {
        /// The slot.
        slot: u32,
        /// Length of the garbage.
        len: usize,
    },
    /// Faults stop here: from now on every live node must come to see
    /// exactly the live members within `settle_limit`.
    Quiet,
}

/// A broken invariant, with what is needed to reproduce it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Seed of the run.
    pub seed: u64,
    /// Number of events processed when it was found (1-based).
    pub step: u64,
    /// Virtual time, in nanoseconds since the start.
    pub time_ns: u64,
    /// What broke.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invariant violated (seed {}, step {}, t={:.6}s): {}",
            self.seed,
            self.step,
            self.time_ns as f64 / 1e9,
            self.message
        )
    }
}

impl std::error::Error for Violation {}

/// Bytes and messages sent so far, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Membership unreliable packets (probes, acks, gossip).
    pub unreliable_msgs: u64,
    /// Their bytes.
    pub unreliable_bytes: u64,
    /// Membership reliable messages (push-pull, joins).
    pub reliable_msgs: u64,
    /// Their bytes.
    pub reliable_bytes: u64,
    /// Application messages.
    pub app_msgs: u64,
    /// Their bytes.
    pub app_bytes: u64,
    /// Packets dropped: lost, partitioned, receiver down or unknown.
    pub dropped: u64,
    /// Extra copies delivered by duplication.
    pub duplicated: u64,
    /// Garbage packets rejected by membership, as expected.
    pub garbage_rejected: u64,
}

impl Traffic {
    /// Membership bytes, both kinds.
    pub fn membership_bytes(&self) -> u64 {
        self.unreliable_bytes + self.reliable_bytes
    }

    /// Membership messages, both kinds.
    pub fn membership_msgs(&self) -> u64 {
        self.unreliable_msgs + self.reliable_msgs
    }
}

/// Measured detection of a crash, in virtual seconds after the crash.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetectionTimes {
    /// First survivor to mark it suspect.
    pub first_suspect_s: Option<f64>,
    /// First survivor to mark it failed.
    pub first_s: Option<f64>,
    /// Last survivor to mark it failed (None until all have).
    pub all_s: Option<f64>,
    /// Survivors that have not marked it failed yet.
    pub pending: usize,
}

/// Measured dissemination of a metadata change, in virtual seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DisseminationTimes {
    /// Until 99.99 % of the members live at the change had it.
    pub threshold_s: Option<f64>,
    /// Until all of them had it.
    pub all_s: Option<f64>,
    /// How many have it.
    pub informed: usize,
    /// How many were live at the change.
    pub population: usize,
}

struct Stall {
    generation: u64,
    until_ns: u64,
    delay_ns: u64,
    timers: bool,
}

struct Proc<A> {
    info: NodeInfo,
    membership: Membership<SmallRng>,
    app: A,
    app_rng: SmallRng,
    leaving: bool,
    incarnation: u64,
}

struct Slot<A> {
    name: Arc<str>,
    addr: SocketAddr,
    proc: Option<Box<Proc<A>>>,
    /// Deadline of the timer entry in the queue that is current, if any.
    timer_armed: Option<u64>,
    /// Inputs are handled in order: none before this time (stall backlog).
    backlog_until: u64,
    stall: Option<Stall>,
    /// A pause of the process of this generation until this time: it
    /// handles nothing before (see [`Action::Pause`]).
    frozen: Option<(u64, u64)>,
    /// Consecutive timer firings at the same instant (busy-loop guard).
    spins: u32,
    spin_ns: u64,
}

impl<A> Slot<A> {
    /// Whether the process of `generation` is paused at `now_ns` (a pause
    /// ends at its wake-up instant: inputs handled then are handled awake).
    fn frozen_at(&self, generation: u64, now_ns: u64) -> bool {
        self.frozen
            .is_some_and(|(g, until)| g == generation && now_ns < until)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Channel {
    Unreliable,
    Reliable,
    /// An application message, with the id its sender was given.
    App(u64),
}

impl Channel {
    fn tag(self) -> u64 {
        match self {
            Channel::Unreliable => 0,
            Channel::Reliable => 1,
            Channel::App(_) => 2,
        }
    }
}

enum Ev {
    Packet {
        to: u32,
        from: u32,
        from_generation: u64,
        channel: Channel,
        payload: Vec<u8>,
        /// Set once the packet sits in the receiver's input backlog: the
        /// generation that accepted it.
        accepted_by: Option<u64>,
    },
    Timer {
        slot: u32,
        generation: u64,
        deferred: bool,
    },
    SendDone {
        slot: u32,
        generation: u64,
        id: u64,
        to: SocketAddr,
        delivered: bool,
    },
    Rejoin {
        slot: u32,
        generation: u64,
    },
    Exit {
        slot: u32,
        generation: u64,
    },
    Act(Action),
    Sample,
    ConvergeCheck {
        epoch: u64,
    },
}

struct Entry {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed, so the max-heap pops the earliest (time, sequence).
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct WorldRef<'a> {
    by_name: &'a HashMap<Arc<str>, u32>,
}

impl World for WorldRef<'_> {
    fn slot_of(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }
}

/// A simulated cluster: slots that run processes (membership plus an
/// application `A`), a virtual clock, a virtual network and a fault
/// schedule.
pub struct Sim<A: Application = ()> {
    cfg: SimConfig,
    base: Instant,
    now_ns: u64,
    seq: u64,
    steps: u64,
    queue: BinaryHeap<Entry>,
    slots: Vec<Slot<A>>,
    by_name: HashMap<Arc<str>, u32>,
    /// Slots with a live (started, not leaving) process, for O(1) random picks.
    live: Vec<u32>,
    live_index: HashMap<u32, usize>,
    rng: SmallRng,
    shared: A::Shared,
    partitions: Partitions,
    next_generation: u64,
    checks: Checks,
    traffic: Traffic,
    node_ns: u128,
    accounted_ns: u64,
    trace: TraceHash,
    violation: Option<Violation>,
    quiet_at: Option<u64>,
    /// Bumped by every fault and by `Quiet`: stale convergence checks lapse.
    quiet_epoch: u64,
    /// Times the cluster, once converged after the faults, diverged again.
    rediverged: u64,
    /// Whether self-fencing was checked in the current converged episode.
    fencing_checked: bool,
    diverged_at: Option<u64>,
    converged_at: Option<u64>,
    app_out: AppOutput,
    next_message_id: u64,
    samples_started: bool,
}

/// Logs a membership event (target `shoal_sim::events`, level debug; run
/// with `RUST_LOG=shoal_sim::events=debug` to see the story of a run).
fn log_event(now_ns: u64, node: &NodeInfo, ev: &Event) {
    if !tracing::enabled!(target: "shoal_sim::events", tracing::Level::DEBUG) {
        return;
    }
    let t = now_ns as f64 / 1e9;
    let (kind, member) = match ev {
        Event::Joined(m) => ("joined", Some(m)),
        Event::Updated(m) => ("updated", Some(m)),
        Event::Suspected(m) => ("suspected", Some(m)),
        Event::Alive(m) => ("alive", Some(m)),
        Event::Failed(m) => ("failed", Some(m)),
        Event::Left(m) => ("left", Some(m)),
        Event::NameConflict { .. } => ("name-conflict", None),
        Event::ViewChanged(_) => return,
        Event::DeclaredFailed => ("declared-failed", None),
        Event::StandingChanged(standing) => {
            tracing::debug!(
                target: "shoal_sim::events",
                t,
                node = %node.name,
                generation = node.generation,
                valid = standing.is_valid(),
                ?standing,
                "standing"
            );
            return;
        }
    };
    match member {
        Some(m) => tracing::debug!(
            target: "shoal_sim::events",
            t,
            node = %node.name,
            generation = node.generation,
            member = %m.name,
            member_generation = m.generation,
            incarnation = m.incarnation,
            "{kind}"
        ),
        None => tracing::debug!(target: "shoal_sim::events", t, node = %node.name, "{kind}"),
    }
}

fn slot_addr(slot: u32) -> SocketAddr {
    let [_, a, b, c] = slot.to_be_bytes();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, a, b, c)), PORT)
}

/// `ceil(0.9999 x n)`, in integers (the float product rounds 10,000 up to
/// 10,000 instead of 9,999).
fn four_nines(n: usize) -> usize {
    n.saturating_mul(9_999).div_ceil(10_000)
}

/// Name of the node in `slot`.
pub fn node_name(slot: u32) -> String {
    format!("node-{slot:05}")
}

impl<A: Application> Sim<A> {
    /// A cluster of `slots` empty node slots (start processes with
    /// [`Action::Start`] or [`Sim::bootstrap`]). `base` is the instant that
    /// virtual time 0 maps to; nothing reads the real clock after it.
    pub fn new(
        cfg: SimConfig,
        slots: u32,
        base: Instant,
        shared: A::Shared,
    ) -> Result<Self, String> {
        cfg.net.validate()?;
        if slots > 1 << 24 {
            return Err(format!("at most 16,777,216 slots, asked for {slots}"));
        }
        let checks = Checks {
            takeover_ns: duration_ns(cfg.membership.takeover_delay()),
            from_suspicion: cfg.membership.takeover_from_suspicion(),
            lease_period_ns: duration_ns(cfg.membership.lease_period),
            lease_off: cfg.membership.lease == shoal_membership::LeaseStrategy::Off,
            base: Some(base),
            ..Checks::default()
        };
        let mut sim = Sim {
            rng: SmallRng::seed_from_u64(derive_seed(cfg.seed, TAG_NET, 0)),
            cfg,
            base,
            now_ns: 0,
            seq: 0,
            steps: 0,
            queue: BinaryHeap::new(),
            slots: Vec::new(),
            by_name: HashMap::new(),
            live: Vec::new(),
            live_index: HashMap::new(),
            shared,
            partitions: Partitions::default(),
            next_generation: 1,
            checks,
            traffic: Traffic::default(),
            node_ns: 0,
            accounted_ns: 0,
            trace: TraceHash::default(),
            violation: None,
            quiet_at: None,
            quiet_epoch: 0,
            rediverged: 0,
            fencing_checked: false,
            diverged_at: None,
            converged_at: None,
            app_out: AppOutput::default(),
            next_message_id: 0,
            samples_started: false,
        };
        for slot in 0..slots {
            sim.add_slot(slot);
        }
        Ok(sim)
    }

    fn add_slot(&mut self, slot: u32) {
        let name: Arc<str> = node_name(slot).into();
        let addr = slot_addr(slot);
        self.by_name.insert(name.clone(), slot);
        self.slots.push(Slot {
            name,
            addr,
            proc: None,
            timer_armed: None,
            backlog_until: 0,
            stall: None,
            frozen: None,
            spins: 0,
            spin_ns: 0,
        });
    }

    /// The configuration in force.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Virtual time since the start.
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.now_ns)
    }

    /// The instant of virtual time `ns`.
    fn instant(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns)
    }

    fn ns_of(&self, at: Instant) -> u64 {
        duration_ns(at.saturating_duration_since(self.base))
    }

    /// Events processed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Hash of every event processed so far (time, kind, node, payload).
    pub fn trace_hash(&self) -> u64 {
        self.trace.value()
    }

    /// The first broken invariant, if any.
    pub fn violation(&self) -> Option<&Violation> {
        self.violation.as_ref()
    }

    /// The cross-node ledger of the application.
    pub fn shared(&self) -> &A::Shared {
        &self.shared
    }

    /// The cross-node ledger of the application, to change between runs
    /// (e.g. what a test measures from now on).
    pub fn shared_mut(&mut self) -> &mut A::Shared {
        &mut self.shared
    }

    /// The instant virtual time 0 maps to.
    pub fn base(&self) -> Instant {
        self.base
    }

    /// Bytes and messages sent so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Process-seconds of live processes so far (the denominator of per-node
    /// rates).
    pub fn node_seconds(&mut self) -> f64 {
        self.account();
        self.node_ns as f64 / 1e9
    }

    /// Number of live processes (started, not leaving).
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Number of slots.
    pub fn slot_count(&self) -> u32 {
        u32::try_from(self.slots.len()).unwrap_or(u32::MAX)
    }

    /// Whether the cluster has stayed converged after [`Action::Quiet`] for
    /// `fencing_grace`, and self-fencing was checked then.
    pub fn settled(&self) -> bool {
        self.fencing_checked && self.converged_at.is_some()
    }

    /// When the cluster was first seen converged after [`Action::Quiet`].
    pub fn converged_at(&self) -> Option<Duration> {
        self.converged_at.map(Duration::from_nanos)
    }

    /// Times the cluster diverged again after it had converged following
    /// [`Action::Quiet`] (a late consequence of a fault, e.g. a node that
    /// was stalled declaring a member failed from a stale suspicion). Each
    /// must converge again within `settle_limit`.
    pub fn rediverged(&self) -> u64 {
        self.rediverged
    }

    /// When [`Action::Quiet`] took effect.
    pub fn quiet_at(&self) -> Option<Duration> {
        self.quiet_at.map(Duration::from_nanos)
    }

    /// Distinct healthy processes (never crashed, stalled, leaving, nor cut
    /// off by a partition) that some node marked failed.
    pub fn false_positives(&self) -> usize {
        self.checks.false_positives.len()
    }

    /// Failed events about healthy processes (a process marked failed by
    /// three nodes counts three times).
    pub fn false_positive_events(&self) -> u64 {
        self.checks.false_positive_events
    }

    /// False-positive "failed" events whose accuser was a stalled process.
    pub fn false_positive_events_by_stalled(&self) -> u64 {
        self.checks.false_positive_events_by_stalled
    }

    /// Whether any node marked a stalled process failed.
    pub fn stalled_marked_failed(&self) -> bool {
        self.checks.stalled_marked_failed
    }

    /// How many times a node learnt that the cluster declared it failed.
    pub fn declared_failed_events(&self) -> u64 {
        self.checks.declared_failed_events
    }

    /// Takeovers so far (a verdict that still stood `takeover_delay` after
    /// it was made, by an accuser holding a valid lease at that instant)
    /// and how long before each the victim had lost its lease, been fenced
    /// or stopped.
    pub fn lease_report(&self) -> LeaseReport {
        let takeovers = self.checks.takeovers(self.now_ns);
        let s = |ns: i128| ns as f64 / 1e9;
        LeaseReport {
            takeovers: takeovers.len(),
            violations: takeovers.iter().filter(|t| t.margin_ns < 0).count(),
            min_margin_s: takeovers.iter().map(|t| t.margin_ns).min().map(s),
            first_takeover_s: takeovers.first().map(|t| s(i128::from(t.at_ns))),
            first_violation: takeovers.iter().find(|t| t.margin_ns < 0).map(|t| {
                format!(
                    "{} (generation {}) still held a valid lease {:.3}s after {} (generation {}) took \
                     its datums over at {:.3}s",
                    node_name(t.victim.0),
                    t.victim.1,
                    s(-t.margin_ns),
                    node_name(t.accuser.0),
                    t.accuser.1,
                    s(i128::from(t.at_ns))
                )
            }),
        }
    }

    /// When the slot's current process last lost its lease at or after
    /// `from` (a lease lapsed for want of contact counts from its expiry).
    pub fn standing_lost_at(&self, slot: u32, from: Duration) -> Option<Duration> {
        let generation = self.current_generation(slot)?;
        let from = duration_ns(from);
        self.checks
            .fate((slot, generation))?
            .standing
            .iter()
            .find(|(at, valid)| *at >= from && !valid)
            .map(|(at, _)| Duration::from_nanos(*at))
    }

    /// The generation of the slot's current process.
    pub fn generation(&self, slot: u32) -> Option<u64> {
        self.current_generation(slot)
    }

    /// Whether every live process (not leaving) holds a valid lease now.
    pub fn all_standing(&self) -> bool {
        let now = self.instant(self.now_ns);
        self.live.iter().all(|&slot| {
            self.slots
                .get(slot as usize)
                .and_then(|s| s.proc.as_deref())
                .is_none_or(|p| p.leaving || p.membership.standing(now).is_valid())
        })
    }

    /// Times healthy processes (never crashed, stalled, leaving, nor cut off)
    /// lost their lease at or after `from`.
    pub fn healthy_lapses(&self, from: Duration) -> u64 {
        let from = duration_ns(from);
        self.checks
            .fates
            .values()
            .filter(|f| !f.crashed && !f.stalled && !f.partitioned && !f.leaving)
            .map(|f| {
                f.standing
                    .iter()
                    .filter(|(at, valid)| *at >= from && !valid)
                    .count() as u64
            })
            .sum()
    }

    /// Detection of each measured crash, in order.
    pub fn detections(&self) -> Vec<DetectionTimes> {
        let s = |from: u64, to: Option<u64>| to.map(|t| t.saturating_sub(from) as f64 / 1e9);
        self.checks
            .detections
            .iter()
            .map(|d: &Detection| DetectionTimes {
                first_suspect_s: s(d.crashed_ns, d.first_suspect_ns),
                first_s: s(d.crashed_ns, d.first_ns),
                all_s: s(d.crashed_ns, d.all_ns),
                pending: d.survivors.len(),
            })
            .collect()
    }

    /// Dissemination of each measured metadata change, in order.
    pub fn disseminations(&self) -> Vec<DisseminationTimes> {
        let s = |from: u64, to: Option<u64>| to.map(|t| t.saturating_sub(from) as f64 / 1e9);
        self.checks
            .disseminations
            .iter()
            .map(|d: &Dissemination| DisseminationTimes {
                threshold_s: s(d.started_ns, d.threshold_ns),
                all_s: s(d.started_ns, d.all_ns),
                informed: d.informed.len(),
                population: d.population.len(),
            })
            .collect()
    }

    /// The live processes, for inspection.
    pub fn nodes(&self) -> impl Iterator<Item = NodeView<'_, A>> {
        self.slots.iter().filter_map(|s| {
            s.proc.as_deref().map(|p| NodeView {
                info: &p.info,
                membership: &p.membership,
                app: &p.app,
                leaving: p.leaving,
                frozen: s.frozen_at(p.info.generation, self.now_ns),
            })
        })
    }

    /// Schedules `action` at virtual time `at` (at "now" if `at` has passed).
    pub fn schedule(&mut self, at: Duration, action: Action) {
        let at = duration_ns(at).max(self.now_ns);
        self.push(at, Ev::Act(action));
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Entry {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn violate(&mut self, message: String) {
        if self.violation.is_none() {
            tracing::error!(seed = self.cfg.seed, step = self.steps, %message, "invariant violated");
            self.violation = Some(Violation {
                seed: self.cfg.seed,
                step: self.steps,
                time_ns: self.now_ns,
                message,
            });
        }
    }

    fn account(&mut self) {
        let dt = self.now_ns.saturating_sub(self.accounted_ns);
        self.node_ns += u128::from(dt) * self.live.len() as u128;
        self.accounted_ns = self.now_ns;
    }

    fn live_insert(&mut self, slot: u32) {
        self.account();
        if let std::collections::hash_map::Entry::Vacant(e) = self.live_index.entry(slot) {
            e.insert(self.live.len());
            self.live.push(slot);
        }
    }

    fn live_remove(&mut self, slot: u32) {
        self.account();
        if let Some(i) = self.live_index.remove(&slot) {
            self.live.swap_remove(i);
            if let Some(&moved) = self.live.get(i) {
                self.live_index.insert(moved, i);
            }
        }
    }

    /// Starts processes in slots `0..n` at once, each already knowing all
    /// the others as alive (membership's `bootstrap`), instead of simulating
    /// `n` joins. Events emitted by the bootstrap itself are dropped.
    pub fn bootstrap(&mut self, n: u32) -> Result<(), String> {
        let n = n.min(self.slot_count());
        let mut started = Vec::with_capacity(n as usize);
        for slot in 0..n {
            if self
                .slots
                .get(slot as usize)
                .is_some_and(|s| s.proc.is_none())
            {
                let p = self.new_proc(slot)?;
                started.push(p);
            }
        }
        let now = self.instant(self.now_ns);
        let members: Vec<Member> = started
            .iter()
            .map(|p| p.membership.local().clone())
            .collect();
        for mut p in started {
            p.membership.bootstrap(members.iter().cloned(), now);
            while p.membership.poll_event().is_some() {}
            let slot = p.info.slot;
            self.install(slot, p);
        }
        Ok(())
    }

    fn new_proc(&mut self, slot: u32) -> Result<Box<Proc<A>>, String> {
        let generation = self.next_generation;
        self.next_generation += 1;
        let Some(s) = self.slots.get(slot as usize) else {
            return Err(format!("no slot {slot}"));
        };
        let info = NodeInfo {
            slot,
            name: s.name.clone(),
            generation,
            addr: s.addr,
        };
        let local = LocalNode {
            name: s.name.to_string(),
            generation,
            addr: s.addr,
            ready: self.cfg.ready_on_start,
            metadata: Vec::new(),
        };
        let now = self.instant(self.now_ns);
        let rng = SmallRng::seed_from_u64(derive_seed(self.cfg.seed, TAG_MEMBERSHIP, generation));
        let membership = Membership::new(self.cfg.membership.clone(), local, rng, now)
            .map_err(|e| format!("membership of {} rejected its configuration: {e}", s.name))?;
        let mut app_rng = SmallRng::seed_from_u64(derive_seed(self.cfg.seed, TAG_APP, generation));
        let mut out = std::mem::take(&mut self.app_out);
        let app = {
            let mut ctx = AppCtx {
                now,
                node: &info,
                membership: &membership,
                shared: &mut self.shared,
                rng: &mut app_rng,
                out: &mut out,
                next_message_id: &mut self.next_message_id,
            };
            A::start(&mut ctx)
        };
        self.app_out = out;
        let incarnation = membership.local().incarnation;
        *self.checks.fate_mut((slot, generation)) = crate::check::Fate {
            up: true,
            ..Default::default()
        };
        Ok(Box::new(Proc {
            info,
            membership,
            app,
            app_rng,
            leaving: false,
            incarnation,
        }))
    }

    /// Puts a freshly started process in its slot and drives its first
    /// outputs.
    fn install(&mut self, slot: u32, mut p: Box<Proc<A>>) {
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.timer_armed = None;
            s.backlog_until = self.now_ns;
            s.stall = None;
            self.drive(&mut p);
            if let Some(s) = self.slots.get_mut(slot as usize) {
                s.proc = Some(p);
            }
            self.live_insert(slot);
        }
    }

    /// Runs events until virtual time `until` (or the first violation).
    pub fn run_until(&mut self, until: Duration) -> Result<(), Violation> {
        if !self.samples_started {
            self.samples_started = true;
            let first = self.now_ns + duration_ns(self.cfg.sample_every);
            self.push(first, Ev::Sample);
        }
        let until = duration_ns(until);
        while let Some(top) = self.queue.peek() {
            if top.at > until {
                break;
            }
            let Some(entry) = self.queue.pop() else { break };
            self.now_ns = entry.at;
            self.steps += 1;
            self.dispatch(entry.ev);
            if A::STEP_CHECKS && self.violation.is_none() {
                self.step_check();
            }
            if let Some(v) = &self.violation {
                return Err(v.clone());
            }
        }
        self.now_ns = self.now_ns.max(until);
        self.account();
        Ok(())
    }

    /// Runs until `until` or until `done` holds, checked every `every` of
    /// virtual time. Returns whether `done` held.
    pub fn run_while(
        &mut self,
        until: Duration,
        every: Duration,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Result<bool, Violation> {
        let every = every.max(Duration::from_millis(1));
        loop {
            if done(self) {
                return Ok(true);
            }
            let now = self.now();
            if now >= until {
                return Ok(false);
            }
            self.run_until((now + every).min(until))?;
        }
    }

    fn dispatch(&mut self, ev: Ev) {
        self.trace.word(self.now_ns);
        match ev {
            Ev::Packet {
                to,
                from,
                from_generation,
                channel,
                payload,
                accepted_by,
            } => {
                self.trace.word(0x10 | channel.tag());
                self.trace.word((u64::from(to) << 32) | u64::from(from));
                self.trace.bytes(&payload);
                self.on_packet(to, from, from_generation, channel, payload, accepted_by);
            }
            Ev::Timer {
                slot,
                generation,
                deferred,
            } => {
                self.trace.word(0x20 | u64::from(deferred));
                self.trace.word(u64::from(slot));
                self.on_timer(slot, generation, deferred);
            }
            Ev::SendDone {
                slot,
                generation,
                id,
                to,
                delivered,
            } => {
                self.trace.word(0x30 | u64::from(delivered));
                self.trace.word(u64::from(slot));
                self.trace.word(id);
                self.on_send_done(slot, generation, id, to, delivered);
            }
            Ev::Rejoin { slot, generation } => {
                self.trace.word(0x40);
                self.trace.word(u64::from(slot));
                self.on_rejoin(slot, generation);
            }
            Ev::Exit { slot, generation } => {
                self.trace.word(0x50);
                self.trace.word(u64::from(slot));
                if self.current_generation(slot) == Some(generation) {
                    self.stop(slot, false);
                }
            }
            Ev::Act(action) => {
                self.trace.word(0x60);
                self.act(action);
            }
            Ev::Sample => {
                self.trace.word(0x70);
                self.sample();
                let next = self.now_ns + duration_ns(self.cfg.sample_every).max(1);
                self.push(next, Ev::Sample);
            }
            Ev::ConvergeCheck { epoch } => {
                self.trace.word(0x80);
                if epoch == self.quiet_epoch {
                    self.converge_check();
                }
            }
        }
    }

    /// The slot whose address is `addr` (addresses are `10.a.b.c:7946` with
    /// `a.b.c` the slot number), without hashing.
    fn slot_of_addr(&self, addr: SocketAddr) -> Option<u32> {
        let IpAddr::V4(ip) = addr.ip() else {
            return None;
        };
        let [ten, a, b, c] = ip.octets();
        if ten != 10 || addr.port() != PORT {
            return None;
        }
        let slot = u32::from_be_bytes([0, a, b, c]);
        ((slot as usize) < self.slots.len()).then_some(slot)
    }

    fn current_generation(&self, slot: u32) -> Option<u64> {
        self.slots
            .get(slot as usize)
            .and_then(|s| s.proc.as_ref())
            .map(|p| p.info.generation)
    }

    /// When an input arriving now at `slot` gets handled, if later than now:
    /// during a stall `delay` later, and never before earlier inputs.
    fn deferral(&mut self, slot: u32, timer: bool) -> Option<u64> {
        let now = self.now_ns;
        let s = self.slots.get_mut(slot as usize)?;
        let generation = s.proc.as_ref()?.info.generation;
        let stall = s.stall.as_ref().filter(|st| st.generation == generation);
        if timer && !stall.is_some_and(|st| st.timers) {
            return None;
        }
        let mut at = match stall {
            Some(st) if now < st.until_ns => now.saturating_add(st.delay_ns),
            _ => now,
        };
        at = at.max(s.backlog_until);
        if at > now {
            s.backlog_until = at;
            Some(at)
        } else {
            None
        }
    }

    fn take_proc(&mut self, slot: u32) -> Option<Box<Proc<A>>> {
        self.slots.get_mut(slot as usize)?.proc.take()
    }

    fn put_proc(&mut self, slot: u32, p: Box<Proc<A>>) {
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.proc = Some(p);
        }
    }

    fn on_packet(
        &mut self,
        to: u32,
        from: u32,
        from_generation: u64,
        channel: Channel,
        payload: Vec<u8>,
        accepted_by: Option<u64>,
    ) {
        let current = self.current_generation(to);
        let deliverable = match accepted_by {
            // Already in the receiver's input backlog: lost if it restarted.
            Some(generation) => current == Some(generation),
            None => {
                current.is_some()
                    && match channel {
                        Channel::Unreliable => self.partitions.connected(from, to),
                        Channel::Reliable | Channel::App(_) => {
                            self.partitions.connected_both(from, to)
                        }
                    }
            }
        };
        if !deliverable {
            self.traffic.dropped += 1;
            if let Channel::App(id) = channel {
                self.send_done(from, from_generation, id, slot_addr(to), false);
            }
            return;
        }
        if accepted_by.is_none()
            && let Some(at) = self.deferral(to, false)
        {
            self.push(
                at,
                Ev::Packet {
                    to,
                    from,
                    from_generation,
                    channel,
                    payload,
                    accepted_by: current,
                },
            );
            return;
        }
        let Some(mut p) = self.take_proc(to) else {
            return;
        };
        let now = self.instant(self.now_ns);
        let from_addr = slot_addr(from);
        match channel {
            Channel::Unreliable | Channel::Reliable => {
                // The simulated network authenticates the sender's name, as
                // the transport's certificates do.
                let sender = node_name(from);
                if let Err(e) = p
                    .membership
                    .handle_packet(from_addr, Some(&sender), &payload, now)
                {
                    self.violate(format!(
                        "{} could not decode a {} byte packet that {} sent: {e}",
                        p.info.name,
                        payload.len(),
                        node_name(from)
                    ));
                }
            }
            Channel::App(id) => {
                let peer = NodeInfo {
                    slot: from,
                    name: self
                        .slots
                        .get(from as usize)
                        .map(|s| s.name.clone())
                        .unwrap_or_else(|| node_name(from).into()),
                    generation: from_generation,
                    addr: from_addr,
                };
                self.app_call(&mut p, |app, ctx| app.on_message(&peer, &payload, ctx));
                self.send_done(from, from_generation, id, slot_addr(to), true);
            }
        }
        self.drive(&mut p);
        self.put_proc(to, p);
    }

    fn on_timer(&mut self, slot: u32, generation: u64, deferred: bool) {
        let now = self.now_ns;
        if self.current_generation(slot) != Some(generation) {
            return;
        }
        if !deferred {
            let Some(s) = self.slots.get_mut(slot as usize) else {
                return;
            };
            if s.timer_armed != Some(now) {
                return; // superseded by an earlier deadline
            }
            s.timer_armed = None;
            if let Some(at) = self.deferral(slot, true) {
                self.push(
                    at,
                    Ev::Timer {
                        slot,
                        generation,
                        deferred: true,
                    },
                );
                return;
            }
        }
        let Some(mut p) = self.take_proc(slot) else {
            return;
        };
        let at = self.instant(now);
        if p.membership.poll_timeout().is_some_and(|d| d <= at) {
            p.membership.handle_timeout(at);
        }
        if p.app.poll_timeout().is_some_and(|d| d <= at) {
            self.app_call(&mut p, |app, ctx| app.on_timeout(ctx));
        }
        if let Some(s) = self.slots.get_mut(slot as usize) {
            if s.spin_ns == now {
                s.spins += 1;
            } else {
                s.spin_ns = now;
                s.spins = 0;
            }
        }
        self.drive(&mut p);
        self.put_proc(slot, p);
    }

    /// Tells the sender of application message `id` its outcome: delivered
    /// (after the acknowledgement's trip back) or failed (after
    /// `reliable_fail_after`).
    fn send_done(&mut self, slot: u32, generation: u64, id: u64, to: SocketAddr, delivered: bool) {
        let after = if delivered {
            self.cfg.net.delay_ns(&mut self.rng)
        } else {
            duration_ns(self.cfg.net.reliable_fail_after)
        };
        self.push(
            self.now_ns + after,
            Ev::SendDone {
                slot,
                generation,
                id,
                to,
                delivered,
            },
        );
    }

    fn on_send_done(
        &mut self,
        slot: u32,
        generation: u64,
        id: u64,
        to: SocketAddr,
        delivered: bool,
    ) {
        if self.current_generation(slot) != Some(generation) {
            return;
        }
        let Some(mut p) = self.take_proc(slot) else {
            return;
        };
        let id = MessageId(id);
        self.app_call(&mut p, |app, ctx| app.on_send_done(id, to, delivered, ctx));
        self.drive(&mut p);
        self.put_proc(slot, p);
    }

    fn app_call(&mut self, p: &mut Proc<A>, f: impl FnOnce(&mut A, &mut AppCtx<'_, A::Shared>)) {
        let now = self.instant(self.now_ns);
        let Proc {
            info,
            membership,
            app,
            app_rng,
            ..
        } = p;
        let mut ctx = AppCtx {
            now,
            node: info,
            membership,
            shared: &mut self.shared,
            rng: app_rng,
            out: &mut self.app_out,
            next_message_id: &mut self.next_message_id,
        };
        f(app, &mut ctx);
    }

    /// Collects everything a process produced after an input: membership
    /// packets and events (checked, then given to the application), the
    /// application's messages and commands; then re-arms its timer.
    fn drive(&mut self, p: &mut Proc<A>) {
        // Commands can produce more output; loop until nothing is left.
        let mut rounds = 0u32;
        loop {
            while let Some(t) = p.membership.poll_transmit() {
                self.send_transmit(p.info.slot, p.info.generation, t);
            }
            // A rebirth (a command) replaces the generation mid-drive.
            let observer: ProcKey = (p.info.slot, p.info.generation);
            while let Some(ev) = p.membership.poll_event() {
                log_event(self.now_ns, &p.info, &ev);
                let checked = {
                    let world = WorldRef {
                        by_name: &self.by_name,
                    };
                    let mut checked = self.checks.on_event(
                        observer,
                        &ev,
                        self.now_ns,
                        p.membership.local().incarnation,
                        &world,
                    );
                    if checked.is_ok()
                        && self.cfg.deep_checks
                        && let Event::ViewChanged(view) = &ev
                    {
                        checked = view.iter().try_for_each(|m| {
                            self.checks.observe_member(observer, m, &world).map(|_| ())
                        });
                    }
                    checked
                };
                if let Err(m) = checked {
                    self.violate(m);
                }
                self.app_call(p, |app, ctx| app.on_event(&ev, ctx));
            }
            if self.app_out.is_empty() {
                break;
            }
            rounds += 1;
            if rounds > 1_000 {
                self.violate(format!(
                    "{}: the application keeps issuing commands that produce events that make it \
                     issue more (1,000 rounds in one step)",
                    p.info.name
                ));
                self.app_out = AppOutput::default();
                break;
            }
            let out = std::mem::take(&mut self.app_out);
            for (id, to, payload) in out.sends {
                self.send_app(p.info.slot, p.info.generation, id, to, payload);
            }
            for v in out.violations {
                self.violate(format!(
                    "{} (application at {}): {v}",
                    p.info.name, p.info.slot
                ));
            }
            for c in out.commands {
                self.command(p, c);
            }
        }
        let incarnation = p.membership.local().incarnation;
        if incarnation < p.incarnation {
            self.violate(format!(
                "{} lowered its own incarnation from {} to {incarnation}",
                p.info.name, p.incarnation
            ));
        }
        p.incarnation = incarnation;
        self.rearm(p);
    }

    fn command(&mut self, p: &mut Proc<A>, c: AppCommand) {
        let now = self.instant(self.now_ns);
        match c {
            AppCommand::SetReady(ready) => p.membership.set_ready(ready, now),
            AppCommand::SetMetadata(metadata) => {
                if let Err(e) = p.membership.set_metadata(metadata, now) {
                    tracing::debug!(node = %p.info.name, error = %e, "metadata refused");
                }
            }
            AppCommand::Leave => self.begin_leave(p),
            AppCommand::Rebirth => self.rebirth(p),
        }
    }

    /// The process, declared dead by the cluster, comes back as a new
    /// generation of itself: a new membership (not ready) that joins
    /// through every member the old one knew, in any state, and a few
    /// live seeds, with the old one's witness set
    /// (`Membership::inherit_lease`); the old generation counts as stopped
    /// (not crashed). The application instance stays and hears
    /// [`Application::on_reborn`].
    fn rebirth(&mut self, p: &mut Proc<A>) {
        if p.leaving {
            return;
        }
        let slot = p.info.slot;
        let old: ProcKey = (slot, p.info.generation);
        let now = self.instant(self.now_ns);
        let mut targets: Vec<SocketAddr> = Vec::new();
        let known = p
            .membership
            .members()
            .filter(|m| *m.name != *p.info.name)
            .map(|m| m.addr);
        for addr in known.chain(self.pick_seeds(slot)) {
            if addr != p.info.addr && !targets.contains(&addr) && targets.len() < REJOIN_TARGETS {
                targets.push(addr);
            }
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let local = LocalNode {
            name: p.info.name.to_string(),
            generation,
            addr: p.info.addr,
            ready: false,
            metadata: p.membership.local().metadata.to_vec(),
        };
        let rng = SmallRng::seed_from_u64(derive_seed(self.cfg.seed, TAG_MEMBERSHIP, generation));
        let mut membership = match Membership::new(self.cfg.membership.clone(), local, rng, now) {
            Ok(m) => m,
            Err(e) => {
                self.violate(format!(
                    "membership of {} rejected its configuration: {e}",
                    p.info.name
                ));
                return;
            }
        };
        tracing::debug!(
            target: "shoal_sim::events",
            t = self.now_ns as f64 / 1e9,
            node = %p.info.name,
            old = old.1,
            generation,
            targets = targets.len(),
            "reborn"
        );
        // Its predecessor's witness set, frozen until its own lease has
        // been valid once (not one drawn from what it sees alive).
        membership.inherit_lease(p.membership.lease_evidence(), now);
        if !targets.is_empty() {
            membership.join(&targets, now);
        }
        self.checks.fate_mut(old).up = false;
        self.checks.stopped(old, self.now_ns);
        let split = self.partitions.is_split();
        *self.checks.fate_mut((slot, generation)) = crate::check::Fate {
            up: true,
            partitioned: split,
            ..Default::default()
        };
        p.incarnation = membership.local().incarnation;
        p.membership = membership;
        p.info.generation = generation;
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.timer_armed = None;
            s.stall = None;
        }
        self.app_call(p, |app, ctx| app.on_reborn(ctx));
        let at = self.now_ns + duration_ns(self.cfg.rejoin_after);
        self.push(at, Ev::Rejoin { slot, generation });
    }

    fn begin_leave(&mut self, p: &mut Proc<A>) {
        if p.leaving {
            return;
        }
        p.leaving = true;
        p.membership.leave(self.instant(self.now_ns));
        self.checks
            .fate_mut((p.info.slot, p.info.generation))
            .leaving = true;
        self.live_remove(p.info.slot);
        let at = self.now_ns + duration_ns(self.cfg.leave_linger);
        self.push(
            at,
            Ev::Exit {
                slot: p.info.slot,
                generation: p.info.generation,
            },
        );
    }

    fn rearm(&mut self, p: &Proc<A>) {
        let deadline = match (p.membership.poll_timeout(), p.app.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(deadline) = deadline else { return };
        let mut at = self.ns_of(deadline).max(self.now_ns);
        let slot = p.info.slot;
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if at == self.now_ns && s.spin_ns == at && s.spins >= 1_000 {
            let name = p.info.name.clone();
            self.violate(format!(
                "{name}'s timer keeps asking to fire at the same instant: handle_timeout does not \
                 move poll_timeout forward"
            ));
            at += 1_000_000;
        }
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if s.timer_armed.is_some_and(|armed| armed <= at) {
            return;
        }
        s.timer_armed = Some(at);
        self.push(
            at,
            Ev::Timer {
                slot,
                generation: p.info.generation,
                deferred: false,
            },
        );
    }

    fn send_transmit(&mut self, from: u32, from_generation: u64, t: Transmit) {
        let channel = if t.reliable {
            self.traffic.reliable_msgs += 1;
            self.traffic.reliable_bytes += t.payload.len() as u64;
            Channel::Reliable
        } else {
            self.traffic.unreliable_msgs += 1;
            self.traffic.unreliable_bytes += t.payload.len() as u64;
            Channel::Unreliable
        };
        self.route(from, from_generation, t.to, channel, t.payload);
    }

    fn send_app(
        &mut self,
        from: u32,
        from_generation: u64,
        id: MessageId,
        to: SocketAddr,
        payload: Vec<u8>,
    ) {
        self.traffic.app_msgs += 1;
        self.traffic.app_bytes += payload.len() as u64;
        self.route(from, from_generation, to, Channel::App(id.0), payload);
    }

    fn route(
        &mut self,
        from: u32,
        from_generation: u64,
        to: SocketAddr,
        channel: Channel,
        payload: Vec<u8>,
    ) {
        let Some(to_slot) = self.slot_of_addr(to) else {
            self.traffic.dropped += 1;
            if let Channel::App(id) = channel {
                self.send_done(from, from_generation, id, to, false);
            }
            return;
        };
        let copies = self
            .cfg
            .net
            .plan(!matches!(channel, Channel::Unreliable), &mut self.rng);
        let packet = |payload| Ev::Packet {
            to: to_slot,
            from,
            from_generation,
            channel,
            payload,
            accepted_by: None,
        };
        match copies {
            Copies::Lost => self.traffic.dropped += 1,
            Copies::One(d) => self.push(self.now_ns + d, packet(payload)),
            Copies::Two(d1, d2) => {
                self.traffic.duplicated += 1;
                self.push(self.now_ns + d1, packet(payload.clone()));
                self.push(self.now_ns + d2, packet(payload));
            }
        }
    }

    /// A fault happened: the cluster is no longer expected to be converged
    /// until the next [`Action::Quiet`].
    fn unquiet(&mut self) {
        self.quiet_epoch += 1;
        self.quiet_at = None;
        self.converged_at = None;
        self.diverged_at = None;
    }

    fn act(&mut self, action: Action) {
        tracing::info!(
            target: "shoal_sim::events",
            t = self.now_ns as f64 / 1e9,
            ?action,
            "action"
        );
        let now = self.instant(self.now_ns);
        if matches!(
            action,
            Action::Start { .. }
                | Action::Crash { .. }
                | Action::Leave { .. }
                | Action::Stall { .. }
                | Action::Pause { .. }
                | Action::Partition { .. }
                | Action::OneWay { .. }
                | Action::Heal
        ) {
            self.unquiet();
        }
        match action {
            Action::Start { slot } => self.start(slot),
            Action::Crash { slot, measure } => {
                if let Some(generation) = self.current_generation(slot) {
                    if measure {
                        self.measure_detection((slot, generation));
                    }
                    self.checks.fate_mut((slot, generation)).crashed = true;
                    self.stop(slot, true);
                }
            }
            Action::Leave { slot } => {
                if let Some(mut p) = self.take_proc(slot) {
                    self.begin_leave(&mut p);
                    self.drive(&mut p);
                    self.put_proc(slot, p);
                }
            }
            Action::Stall {
                slot,
                delay,
                duration,
                timers,
            } => {
                let now_ns = self.now_ns;
                if let Some(generation) = self.current_generation(slot)
                    && let Some(s) = self.slots.get_mut(slot as usize)
                {
                    s.stall = Some(Stall {
                        generation,
                        until_ns: now_ns + duration_ns(duration),
                        delay_ns: duration_ns(delay),
                        timers,
                    });
                    self.checks.fate_mut((slot, generation)).stalled = true;
                }
            }
            Action::Pause { slot, duration } => {
                let now_ns = self.now_ns;
                if let Some(generation) = self.current_generation(slot)
                    && let Some(s) = self.slots.get_mut(slot as usize)
                {
                    let until_ns = now_ns + duration_ns(duration);
                    // Nothing is handled before the wake-up: a stall with no
                    // delay of its own, timers included, behind a backlog
                    // that ends then.
                    s.stall = Some(Stall {
                        generation,
                        until_ns,
                        delay_ns: 0,
                        timers: true,
                    });
                    s.backlog_until = s.backlog_until.max(until_ns);
                    s.frozen = Some((generation, until_ns));
                    self.checks.fate_mut((slot, generation)).stalled = true;
                }
            }
            Action::Partition { groups } => {
                self.partitions.split(groups);
                self.mark_partitioned();
            }
            Action::OneWay { pairs } => {
                self.partitions.block(pairs);
                self.mark_partitioned();
            }
            Action::Heal => self.partitions.heal(),
            Action::SetLoss(p) => self.cfg.net.loss = p.clamp(0.0, 1.0),
            Action::SetDuplicate(p) => self.cfg.net.duplicate = p.clamp(0.0, 1.0),
            Action::SetMetadata {
                slot,
                metadata,
                measure,
            } => {
                if let Some(mut p) = self.take_proc(slot) {
                    match p.membership.set_metadata(metadata.clone(), now) {
                        Ok(()) if measure => {
                            self.measure_dissemination((slot, p.info.generation), metadata)
                        }
                        Ok(()) => {}
                        Err(e) => tracing::debug!(slot, error = %e, "metadata refused"),
                    }
                    self.drive(&mut p);
                    self.put_proc(slot, p);
                }
            }
            Action::SetReady { slot, ready } => {
                if let Some(mut p) = self.take_proc(slot) {
                    p.membership.set_ready(ready, now);
                    self.drive(&mut p);
                    self.put_proc(slot, p);
                }
            }
            Action::Garbage { slot, len } => {
                if let Some(mut p) = self.take_proc(slot) {
                    let bytes: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                    let from = slot_addr(slot.wrapping_add(1) % self.slot_count().max(1));
                    let sender = node_name(slot.wrapping_add(1) % self.slot_count().max(1));
                    match p.membership.handle_packet(from, Some(&sender), &bytes, now) {
                        Err(_) => self.traffic.garbage_rejected += 1,
                        Ok(()) => tracing::debug!(slot, len, "random bytes decoded as a packet"),
                    }
                    self.drive(&mut p);
                    self.put_proc(slot, p);
                }
            }
            Action::Quiet => {
                self.unquiet();
                self.quiet_at = Some(self.now_ns);
                self.push(
                    self.now_ns,
                    Ev::ConvergeCheck {
                        epoch: self.quiet_epoch,
                    },
                );
            }
        }
    }

    /// While the network is split, every live process counts as cut off
    /// (so it is not "healthy" for the false-positive count).
    fn mark_partitioned(&mut self) {
        if !self.partitions.is_split() {
            return;
        }
        for i in 0..self.live.len() {
            let Some(&slot) = self.live.get(i) else { break };
            if let Some(generation) = self.current_generation(slot) {
                self.checks.fate_mut((slot, generation)).partitioned = true;
            }
        }
    }

    fn measure_detection(&mut self, victim: ProcKey) {
        let survivors: HashSet<ProcKey> = self
            .live
            .iter()
            .filter(|&&s| s != victim.0)
            .filter_map(|&s| self.current_generation(s).map(|g| (s, g)))
            .collect();
        self.checks.detections.push(Detection {
            victim,
            crashed_ns: self.now_ns,
            survivors,
            first_ns: None,
            all_ns: None,
            first_suspect_ns: None,
        });
    }

    /// Called while the origin's process is out of its slot (being driven),
    /// so it is added to the population explicitly.
    fn measure_dissemination(&mut self, origin: ProcKey, metadata: Vec<u8>) {
        let mut population: HashSet<ProcKey> = self
            .live
            .iter()
            .filter_map(|&s| self.current_generation(s).map(|g| (s, g)))
            .collect();
        population.insert(origin);
        let threshold = four_nines(population.len());
        tracing::info!(
            target: "shoal_sim::events",
            population = population.len(),
            threshold,
            "measuring the dissemination of a metadata change"
        );
        let mut informed = HashSet::new();
        informed.insert(origin);
        let done = informed.len() >= threshold;
        self.checks.disseminations.push(Dissemination {
            origin,
            metadata,
            started_ns: self.now_ns,
            threshold_ns: done.then_some(self.now_ns),
            all_ns: (population.len() <= 1).then_some(self.now_ns),
            population,
            informed,
            threshold,
        });
    }

    /// Picks up to `seeds_per_join` live nodes as the seed list of `slot`,
    /// like a configured seed list: one it can reach now if there is one,
    /// the others at random whichever side of a partition they are on
    /// (membership retries unanswered seeds, so a node started during a
    /// partition finds the other side once it heals).
    fn pick_seeds(&mut self, slot: u32) -> Vec<SocketAddr> {
        let want = self.cfg.seeds_per_join;
        let mut seeds = Vec::with_capacity(want);
        if self.live.is_empty() || want == 0 {
            return seeds;
        }
        let mut reachable_found = false;
        for attempt in 0..want * 8 {
            if seeds.len() >= want {
                break;
            }
            let i = self.rng.random_range(0..self.live.len());
            let Some(&candidate) = self.live.get(i) else {
                continue;
            };
            let addr = slot_addr(candidate);
            if candidate == slot || seeds.contains(&addr) {
                continue;
            }
            let reachable = self.partitions.connected(slot, candidate);
            // The first half of the attempts look for a reachable seed first.
            if !reachable && !reachable_found && attempt < want * 4 && seeds.len() + 1 >= want {
                continue;
            }
            reachable_found |= reachable;
            seeds.push(addr);
        }
        seeds
    }

    fn start(&mut self, slot: u32) {
        while self.slots.len() <= slot as usize {
            let next = self.slot_count();
            self.add_slot(next);
        }
        if self.current_generation(slot).is_some() {
            return;
        }
        let mut p = match self.new_proc(slot) {
            Ok(p) => p,
            Err(e) => {
                self.violate(e);
                return;
            }
        };
        let seeds = self.pick_seeds(slot);
        tracing::debug!(
            target: "shoal_sim::events",
            t = self.now_ns as f64 / 1e9,
            node = %p.info.name,
            generation = p.info.generation,
            ?seeds,
            "start"
        );
        if !seeds.is_empty() {
            p.membership.join(&seeds, self.instant(self.now_ns));
        }
        let generation = p.info.generation;
        self.install(slot, p);
        self.mark_partitioned();
        let at = self.now_ns + duration_ns(self.cfg.rejoin_after);
        self.push(at, Ev::Rejoin { slot, generation });
    }

    fn on_rejoin(&mut self, slot: u32, generation: u64) {
        if self.current_generation(slot) != Some(generation) {
            return;
        }
        let Some(mut p) = self.take_proc(slot) else {
            return;
        };
        let knows_someone = p
            .membership
            .members()
            .any(|m| *m.name != *p.info.name && is_live(&m.state));
        if !knows_someone && !p.leaving {
            let seeds = self.pick_seeds(slot);
            if !seeds.is_empty() {
                tracing::debug!(
                    slot,
                    seeds = seeds.len(),
                    "node knows nobody: joining again"
                );
                p.membership.join(&seeds, self.instant(self.now_ns));
            }
            let at = self.now_ns + duration_ns(self.cfg.rejoin_after);
            self.push(at, Ev::Rejoin { slot, generation });
        }
        self.drive(&mut p);
        self.put_proc(slot, p);
    }

    fn stop(&mut self, slot: u32, crashed: bool) {
        let Some(mut p) = self.take_proc(slot) else {
            return;
        };
        let key = (slot, p.info.generation);
        self.live_remove(slot);
        let fate = self.checks.fate_mut(key);
        fate.up = false;
        self.checks.stopped(key, self.now_ns);
        p.app.on_stop(&p.info, crashed, &mut self.shared);
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.timer_armed = None;
            s.stall = None;
        }
    }

    /// The application's check after every step
    /// ([`Application::check_step`]), over the processes in their slots.
    fn step_check(&mut self) {
        let now_ns = self.now_ns;
        let now = self.instant(now_ns);
        let result = {
            let mut views = self.slots.iter().filter_map(|s| {
                s.proc.as_deref().map(|p| NodeView {
                    info: &p.info,
                    membership: &p.membership,
                    app: &p.app,
                    leaving: p.leaving,
                    frozen: s.frozen_at(p.info.generation, now_ns),
                })
            });
            A::check_step(&mut self.shared, now, &mut views)
        };
        if let Err(m) = result {
            self.violate(format!("application check: {m}"));
        }
    }

    fn sample(&mut self) {
        if self.cfg.deep_checks {
            self.deep_check();
        }
        let result = {
            let mut views = self.slots.iter().filter_map(|s| {
                s.proc.as_deref().map(|p| NodeView {
                    info: &p.info,
                    membership: &p.membership,
                    app: &p.app,
                    leaving: p.leaving,
                    frozen: s.frozen_at(p.info.generation, self.now_ns),
                })
            });
            A::check(&self.shared, &mut views)
        };
        if let Err(m) = result {
            self.violate(format!("application check: {m}"));
        }
    }

    /// Every member record of every live node, against what that node
    /// reported before (incarnations only grow, no resurrection).
    fn deep_check(&mut self) {
        let world = WorldRef {
            by_name: &self.by_name,
        };
        let mut broken = None;
        'nodes: for s in &self.slots {
            let Some(p) = s.proc.as_deref() else { continue };
            let observer = (p.info.slot, p.info.generation);
            for m in p.membership.members() {
                if *m.name == *p.info.name && m.generation == p.info.generation {
                    continue;
                }
                if let Err(msg) = self.checks.observe_member(observer, m, &world) {
                    broken = Some(msg);
                    break 'nodes;
                }
            }
        }
        if let Some(msg) = broken {
            self.violate(msg);
        }
    }

    fn converge_check(&mut self) {
        let Some(quiet) = self.quiet_at else { return };
        // Not converged yet: the O(N) count test first, often.
        let counts = if self.converged_at.is_none() {
            self.live_counts_differ()
        } else {
            None
        };
        let polling = counts.is_some();
        let result = match counts {
            Some(why) => Err(why),
            None => self.check_converged(),
        };
        match result {
            Ok(()) => match self.converged_at {
                None => {
                    tracing::info!(t = self.now_ns as f64 / 1e9, "cluster converged");
                    self.converged_at = Some(self.now_ns);
                    self.fencing_checked = false;
                }
                Some(at) => {
                    if !self.fencing_checked
                        && self.now_ns >= at + duration_ns(self.cfg.fencing_grace)
                    {
                        self.fencing_checked = true;
                        self.check_fencing();
                    }
                }
            },
            Err(why) => {
                if self.converged_at.take().is_some() {
                    // Late consequences of a fault (a suspicion that started
                    // during it) may still play out: allowed, counted, and
                    // the cluster must converge again within the limit.
                    tracing::info!(t = self.now_ns as f64 / 1e9, %why, "cluster diverged again");
                    self.rediverged += 1;
                    self.diverged_at = Some(self.now_ns);
                }
                let since = self.diverged_at.unwrap_or(quiet).max(quiet);
                if self.now_ns >= since + duration_ns(self.cfg.settle_limit) {
                    self.violate(format!(
                        "no convergence {:.1}s after faults stopped: {why}",
                        self.cfg.settle_limit.as_secs_f64()
                    ));
                }
            }
        }
        let every = if polling {
            self.cfg
                .converge_poll_every
                .min(self.cfg.converge_check_every)
        } else {
            self.cfg.converge_check_every
        };
        let next = self.now_ns + duration_ns(every).max(1);
        self.push(
            next,
            Ev::ConvergeCheck {
                epoch: self.quiet_epoch,
            },
        );
    }

    /// Self-fencing: every running process that some node marked failed has
    /// learned it since (`Event::DeclaredFailed`); otherwise the others
    /// fail its datums over while it still acts as their owner. Checked once
    /// the cluster has stayed converged for `fencing_grace` after faults.
    fn check_fencing(&mut self) {
        let running = |key: ProcKey| self.current_generation(key.0) == Some(key.1);
        let unfenced = self.live.iter().find_map(|&slot| {
            let generation = self.current_generation(slot)?;
            let fate = self.checks.fate((slot, generation))?;
            let held_lease = |accuser: ProcKey, from: u64, to: Option<u64>| {
                self.checks
                    .fate(accuser)
                    .is_some_and(|a| a.standing_during(from, to, self.checks.lease_off))
            };
            let (accuser, incarnation) =
                fate.unfenced_by(running, held_lease, self.checks.takeover_ns)?;
            Some((slot, generation, accuser, incarnation, fate.fenced_below))
        });
        if let Some((slot, generation, accuser, incarnation, fenced_below)) = unfenced {
            self.violate(format!(
                "{} (generation {generation}) was marked failed at incarnation {incarnation} by {} (still \
                 running) and never learned it (DeclaredFailed covers incarnations below {fenced_below:?}): \
                 it would keep acting as an owner while the other fails its datums over",
                node_name(slot),
                node_name(accuser.0),
            ));
        }
    }

    /// A live process (not leaving, itself live) whose count of live members
    /// differs from the number of live processes: then the cluster has not
    /// converged ([`check_converged`](Self::check_converged) fails too).
    /// Costs O(N).
    fn live_counts_differ(&self) -> Option<String> {
        let live = self.live.len();
        self.slots.iter().find_map(|s| {
            let p = s.proc.as_deref()?;
            let counted = p.membership.num_live();
            (!p.leaving && p.membership.local().state.is_live() && counted != live).then(|| {
                format!(
                    "{} counts {counted} live members but {live} are live",
                    p.info.name
                )
            })
        })
    }

    /// Whether every live process sees exactly the live processes (name and
    /// generation) as alive or suspect. Costs O(N^2).
    pub fn check_converged(&self) -> Result<(), String> {
        let live = self.live.len();
        for s in &self.slots {
            let Some(p) = s.proc.as_deref() else { continue };
            if p.leaving {
                continue;
            }
            let mut seen = 0usize;
            let mut listed_self = false;
            for m in p.membership.members() {
                if !is_live(&m.state) {
                    continue;
                }
                let by_addr = self.slot_of_addr(m.addr).filter(|&s| {
                    self.slots
                        .get(s as usize)
                        .is_some_and(|s| *s.name == *m.name)
                });
                let Some(slot) = by_addr.or_else(|| self.by_name.get(&*m.name).copied()) else {
                    return Err(format!(
                        "{} sees unknown member {:?}",
                        p.info.name, &*m.name
                    ));
                };
                let ok = self
                    .slots
                    .get(slot as usize)
                    .and_then(|s| s.proc.as_deref())
                    .is_some_and(|q| q.info.generation == m.generation && !q.leaving);
                if !ok {
                    return Err(format!(
                        "{} sees {} (generation {}) as {:?}, but that process is not live",
                        p.info.name, &*m.name, m.generation, m.state
                    ));
                }
                if slot == p.info.slot {
                    listed_self = true;
                }
                seen += 1;
            }
            if !listed_self {
                seen += 1;
            }
            if seen != live {
                let missing = self
                    .live
                    .iter()
                    .copied()
                    .find(|&l| {
                        let Some(q) = self.slots.get(l as usize).and_then(|s| s.proc.as_deref())
                        else {
                            return false;
                        };
                        l != p.info.slot
                            && !p.membership.members().any(|m| {
                                *m.name == *q.info.name
                                    && m.generation == q.info.generation
                                    && is_live(&m.state)
                            })
                    })
                    .map(node_name)
                    .unwrap_or_default();
                return Err(format!(
                    "{} sees {seen} live members but {live} are live (missing e.g. {missing})",
                    p.info.name
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_nines_of_a_population() {
        assert_eq!(four_nines(10_000), 9_999);
        assert_eq!(four_nines(20_000), 19_998);
        assert_eq!(four_nines(200), 200);
        assert_eq!(four_nines(1), 1);
        assert_eq!(four_nines(0), 0);
    }

    #[test]
    fn slot_addresses_round_trip() {
        let sim: Sim =
            Sim::new(SimConfig::new(1, Config::lan()), 70_000, Instant::now(), ()).unwrap();
        for slot in [0, 1, 255, 256, 65_535, 69_999] {
            assert_eq!(sim.slot_of_addr(slot_addr(slot)), Some(slot));
        }
        assert_eq!(sim.slot_of_addr(slot_addr(70_000)), None);
        let other_port = SocketAddr::new(slot_addr(3).ip(), PORT + 1);
        assert_eq!(sim.slot_of_addr(other_port), None);
    }
}
