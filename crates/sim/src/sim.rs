//! The discrete-event engine ([`Sim`]): the cluster's slots and the
//! processes in them here, and one module per other concern: what a run is
//! given ([`config`]), the virtual clock and event queue ([`queue`]), the
//! network ([`network`]), driving a process ([`process`]), processes
//! starting and stopping ([`lifecycle`]), faults ([`faults`]), the
//! invariants ([`invariants`]) and what a run measured ([`report`]).

mod config;
mod faults;
mod invariants;
mod lifecycle;
mod network;
mod process;
mod queue;
mod report;

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rand::SeedableRng;
use rand::rngs::SmallRng;
use shoal_membership::Membership;

pub use self::config::{Action, SimConfig};
pub use self::invariants::Violation;
use self::network::slot_addr;
use self::queue::Entry;
pub use self::report::{DetectionTimes, DisseminationTimes, LeaseReport, Traffic};
use crate::app::{AppOutput, Application, NodeInfo, NodeView};
use crate::check::Checks;
use crate::net::{Partitions, duration_ns};
use crate::util::{TraceHash, derive_seed};

/// Purpose tags for derived seeds.
const TAG_NET: u64 = 1;
const TAG_MEMBERSHIP: u64 = 2;
const TAG_APP: u64 = 3;

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

    /// Number of live processes (started, not leaving).
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Number of slots.
    pub fn slot_count(&self) -> u32 {
        u32::try_from(self.slots.len()).unwrap_or(u32::MAX)
    }

    /// The generation of the slot's current process.
    pub fn generation(&self, slot: u32) -> Option<u64> {
        self.current_generation(slot)
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

    fn current_generation(&self, slot: u32) -> Option<u64> {
        self.slots
            .get(slot as usize)
            .and_then(|s| s.proc.as_ref())
            .map(|p| p.info.generation)
    }

    fn take_proc(&mut self, slot: u32) -> Option<Box<Proc<A>>> {
        self.slots.get_mut(slot as usize)?.proc.take()
    }

    fn put_proc(&mut self, slot: u32, p: Box<Proc<A>>) {
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.proc = Some(p);
        }
    }
}
