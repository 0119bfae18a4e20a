//! What a run is given: the simulator's configuration ([`SimConfig`]) and
//! the faults and commands a schedule applies ([`Action`]).

use std::time::Duration;

use shoal_membership::Config;

use crate::net::NetConfig;

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
