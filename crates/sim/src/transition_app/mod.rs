//! The transition layer on the simulator: one `shoal_core::NodeCore` (the
//! node core the facade's driver runs, with its `shoal_transition::Handoff`)
//! per simulated node, driven by that node's real membership events.
//!
//! [`TransitionNode`] implements [`Application`](crate::app::Application)
//! and is a driver of the core, as the facade's tokio driver is; the policy
//! (membership to handoff, lease, routing of work, notices) is the core's:
//!
//! - every datum id `0..datums` is registered at start (type `"d"`), and
//!   again in a new generation after a rebirth (`NodeCore::reborn`);
//! - membership events pass through a `TakeoverGate`, as in the facade, then
//!   go to `NodeCore::handle_membership` (peers failed or left, views and
//!   their placement tables, a declared death fences the node);
//! - before every decision the core is told the lease
//!   (`set_lease(Lease::from(&standing(now)), now)`), as the facade's
//!   driver does;
//! - notice batches travel as reliable application messages; their single
//!   outcome becomes `NodeCore::send_done`;
//! - relinquish and acquire jobs finish after a seeded random virtual delay,
//!   and fail with a configured probability (the layer retries);
//! - work items for random datums are injected at random nodes (the client)
//!   and routed by the core (`route_local`; `route_from_peer` at a node they
//!   were forwarded to; `route_again` when a send failed): processed,
//!   forwarded, held, or parked and routed again (the core's hop limit).
//!   Work the core gives up on (`Output::Dropped`) goes back to the client,
//!   which routes it again.
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
//!   (`NodeCore::reborn`: a new `Handoff` that continues the old epoch,
//!   installs the old table and knows the old generation gone). After every
//!   step, the **acting-owner check**: for every datum at most one process
//!   *acts as owner*: holds it per its handoff (`Handoff::token`), its lease
//!   valid at that instant, not frozen (paused), not fenced; no exception
//!   for a holder declared failed. A process hands out a job or processes
//!   work only under a valid lease. At every sampling point the check's
//!   record of holdings is compared with every handoff's. **Liveness**:
//!   from the last heal, every datum has a ready acting owner within
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
//! live members (`set_peers`, through the core), whose done markers a first
//! owner waits for. A process ready before it joined anyone cannot wait for
//! peers it does not know; the checks catch the two first owners that
//! follow, see [`TransitionOptions::ready_on_start`].

mod ledger;
mod node;
mod run;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rand::rngs::SmallRng;
use serde::Serialize;
use shoal_core::Work;
use shoal_placement::{NodeId, Strategy};
use shoal_transition::Config as HandoffConfig;

pub use ledger::{FAILOVER_MARGIN, TransitionLedger, final_check, final_check_leases};
pub use node::TransitionNode;
pub use run::{
    TransitionOptions, TransitionReport, TransitionScenario, failed_report, recover_bound, run,
};

/// Name of the one datum type the simulation registers.
const DATUM_TYPE: &str = "d";
/// Message tag: a notice batch (the bytes follow).
const TAG_NOTICES: u8 = 0;
/// Message tag: a work item (id, datum, hops follow).
const TAG_WORK: u8 = 1;
/// A node that still knows no other member this long after it started
/// becomes ready alone (it is the first node).
const READY_ALONE_AFTER: Duration = Duration::from_secs(1);
/// Purpose tag of the scenario's random choices.
const TAG_TRANSITION_SCENARIO: u64 = 0x7472_616e;
/// When the fault of every scenario happens.
const FAULT_AT: Duration = Duration::from_secs(15);

/// A process: its name and generation.
type Key = (Arc<str>, u64);

/// One unit of work for a datum, routed by the node core as an
/// owner-bound message (`shoal_core::Work`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppWork {
    /// Unique id (index in the ledger).
    pub id: u64,
    /// The datum it is for.
    pub datum: i64,
    /// How many times a node that was not the owner forwarded it.
    pub hops: u8,
}

impl AppWork {
    /// Length of an encoded work item after its tag.
    const ENCODED: usize = 17;

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + Self::ENCODED);
        out.push(TAG_WORK);
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&self.datum.to_le_bytes());
        out.push(self.hops);
        out
    }

    fn decode(bytes: &[u8]) -> Option<AppWork> {
        let id = u64::from_le_bytes(bytes.get(0..8)?.try_into().ok()?);
        let datum = i64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        let hops = *bytes.get(16)?;
        (bytes.len() == Self::ENCODED).then_some(AppWork { id, datum, hops })
    }
}

impl Work for AppWork {
    fn datum_type(&self) -> &str {
        DATUM_TYPE
    }

    fn datum_id(&self) -> i64 {
        self.datum
    }

    fn hops(&self) -> u8 {
        self.hops
    }

    fn set_hops(&mut self, hops: u8) {
        self.hops = hops;
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
    /// Datums a gracefully leaving node gave up (a relinquish failed during
    /// its leave: `NodeCore::begin_leave` / `give_up`, as the facade's
    /// `leave`); the new owner takes them on everyone's done markers.
    pub leave_given_up: u64,
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
    /// Work items held during a handoff, or parked by the node core (its
    /// route disagreed with the sender's, or its generation was fenced).
    pub work_held: u64,
    /// Work items the node core gave up on (`Output::Dropped`), by reason:
    /// each went back to the client and was routed again.
    pub work_dropped: BTreeMap<&'static str, u64>,
    /// Work items that may be lost with a stopped process.
    pub work_maybe_lost: u64,
    /// Crashes of a process that held datums.
    pub crashes: u64,
    /// Over those crashes, the longest time from the last survivor marking
    /// the crashed process failed to every datum it held being acquired
    /// again (0 when all were acquired before), in seconds.
    pub max_failover_lag_s: f64,
}
/// A uniformly random duration within `(lo, hi)`.
fn between(rng: &mut SmallRng, (lo, hi): (Duration, Duration)) -> Duration {
    let span = u64::try_from(hi.saturating_sub(lo).as_micros()).unwrap_or(u64::MAX);
    lo + Duration::from_micros(rng.random_range(0..=span))
}

/// The ledger's key of a node.
fn key_of(id: &NodeId) -> Key {
    (Arc::from(id.name.as_str()), id.generation)
}
