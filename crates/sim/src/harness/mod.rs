//! The handoff harness: a deterministic simulation of many [`NodeCore`]s
//! under a fake membership, on a virtual clock.
//!
//! Each simulated node is a `NodeCore<HarnessWork, _>`, the node core the
//! facade runs, fed by the harness as a driver feeds it:
//!
//! - **membership**: a fake one, with no SWIM underneath. It decides who is
//!   ready and tells every node as `shoal_membership::Event`s: a node that
//!   starts is in every live node's next `ViewChanged` at once (not ready);
//!   a change of the ready set reaches each node after its own random
//!   *install skew*; a crash or a false declaration reaches each survivor
//!   after a random *detection delay* as `Failed` then a view without the
//!   node; a graceful leaver that finished is `Left` then dropped; a node
//!   declared failed while alive is told `DeclaredFailed` and fences itself.
//!   Every node has a fake loopback address;
//! - **network**: notice batches (`Output::SendNotices`, answered with
//!   [`NodeCore::send_done`]) and forwarded work (`Output::Forward`, taken
//!   with [`NodeCore::route_from_peer`]) either arrive after a random delay
//!   or fail, and the sender learns which; a batch may also arrive and be
//!   reported failed all the same (a lost acknowledgement). A send to a
//!   node that is gone fails; so does a notice request a node still had
//!   unanswered when it went;
//! - **application**: relinquish and acquire jobs ([`NodeCore::poll_job`])
//!   take a random time and may fail; clients inject work at random nodes
//!   ([`NodeCore::route_local`]); work the core gives up on
//!   (`Output::Dropped`), or that a stopping node still had, goes back to a
//!   client that sends it again; work that was in a crashed node's memory
//!   may be lost. The lease is `Lease::Forever` (no leases here).
//!
//! The ground truth of who holds what is the one ownership ledger
//! ([`shoal_core::check::Ledger`], keyed by node index), fed as jobs start
//! and finish. Its rules are checked at every step; at the end
//! ([`Harness::settle`]): every live node installed the last view, has
//! nothing in flight and ended its transition, every datum is held by
//! exactly its primary (in the handoff and in the ledger), and every piece
//! of work was processed exactly once (or may have been lost in a crash).
//!
//! Everything random comes from one seeded `SmallRng`: same seed, same
//! run. The clock is read once, for the origin of virtual time.

mod node;
mod scenarios;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shoal_core::check::Ledger;
use shoal_core::{CoreConfig, Lease, NodeCore, Work};
use shoal_membership::{Event, Member, MemberState};
use shoal_placement::{NodeId, Strategy};
use shoal_transition::{Config, Handoff, Job, SendId};

pub use scenarios::{
    FAILOVER_MARGIN, SCENARIOS, failover_bound, run_scenario, run_scenario_traced,
    run_scenario_with,
};

/// The one datum type of the harness.
const TYPE: &str = "d";

/// A piece of application work for a datum, as the harness routes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HarnessWork {
    /// Unique id of the piece of work.
    pub id: u64,
    /// The datum id it is for.
    pub datum: i64,
    /// Times a node that was not the owner forwarded it (the core's count).
    pub hops: u8,
    /// Times it crossed the network since a client last sent it (a bound
    /// on forwarding loops).
    pub sends: u32,
}

impl Work for HarnessWork {
    fn datum_type(&self) -> &str {
        TYPE
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

/// How a node answers a notice request: who sent it, and the sender's
/// handle for the send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoticeReply {
    from: usize,
    instance: u64,
    id: SendId,
    /// Delivered, but the sender is told it failed.
    ack_lost: bool,
}

type Core = NodeCore<HarnessWork, NoticeReply>;

/// Parameters of a simulation run.
#[derive(Clone, Debug)]
pub struct HarnessConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Datum ids `0..datums`, of one type, registered on every node.
    pub datums: i64,
    /// Placement strategy.
    pub strategy: Strategy,
    /// Owners per datum.
    pub copies: usize,
    /// The handoff configuration of every node.
    pub handoff: Config,
    /// Network delay range of a message.
    pub net_delay: (Duration, Duration),
    /// Probability that a send fails (the sender is told).
    pub send_failure: f64,
    /// Probability that a notice batch that arrives is reported failed to
    /// its sender all the same.
    pub lost_ack: f64,
    /// Duration range of a relinquish or acquire job.
    pub job_time: (Duration, Duration),
    /// Probability that a job fails.
    pub job_failure: f64,
    /// Longest delay between a change of the ready set and a node seeing it.
    pub install_skew: Duration,
    /// Range of the delay before survivors learn that a node failed.
    pub detect_delay: (Duration, Duration),
    /// Mean interval between two pieces of work injected (None: no work).
    pub work_every: Option<Duration>,
    /// Print to stderr everything that happens to this datum id (debugging).
    pub trace: Option<i64>,
    /// Whether the views the fake membership hands out name the members
    /// that are not ready (as membership does): the core tells its handoff
    /// every live member, ready or not, and a first owner waits for their
    /// done markers. Off: a view names only the ready members and the node
    /// itself (the check that two nodes becoming ready at once would both
    /// acquire every datum without them).
    pub peers: bool,
}

impl HarnessConfig {
    /// Defaults suited to fast tests: 2 s timeout, 1-30 ms network, 0-10 ms
    /// jobs, 5 % job failures, 300 ms install skew.
    #[must_use]
    pub fn new(seed: u64) -> HarnessConfig {
        HarnessConfig {
            seed,
            datums: 120,
            strategy: Strategy::ModN,
            copies: 1,
            handoff: Config {
                timeout: Duration::from_secs(2),
                relinquish_timeout: Duration::from_millis(1_500),
                max_relinquish_jobs: 8,
                max_acquire_jobs: 8,
                max_batch: 16,
                batch_linger: Duration::from_millis(2),
                retry_base: Duration::from_millis(20),
                retry_max: Duration::from_millis(200),
                hold_capacity: 64,
                ..Config::default()
            },
            peers: true,
            net_delay: (Duration::from_millis(1), Duration::from_millis(30)),
            send_failure: 0.0,
            lost_ack: 0.0,
            job_time: (Duration::ZERO, Duration::from_millis(10)),
            job_failure: 0.05,
            install_skew: Duration::from_millis(300),
            detect_delay: (Duration::from_millis(200), Duration::from_millis(800)),
            work_every: Some(Duration::from_millis(5)),
            trace: None,
        }
    }
}

/// What a message on the virtual network carries.
#[derive(Clone, Debug)]
enum Payload {
    /// An encoded notice batch, and the sender's handle for the send.
    Notices {
        bytes: Vec<u8>,
        instance: u64,
        id: SendId,
        /// Delivered, but the transport tells the sender it failed (a
        /// connection lost after the peer got the data, before it said so).
        ack_lost: bool,
    },
    /// Forwarded work.
    Work(HarnessWork),
}

/// A message in transit.
#[derive(Clone, Debug)]
struct Message {
    from: usize,
    to: usize,
    payload: Payload,
}

/// The fate of one send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// Delivered after this delay (unless the receiver is gone by then).
    Arrives(Duration),
    /// The transport reports a failure to the sender after this delay.
    Fails(Duration),
    /// Delivered after this delay, and yet reported failed to the sender.
    ArrivesAckLost(Duration),
}

fn between<R: Rng>(rng: &mut R, (lo, hi): (Duration, Duration)) -> Duration {
    if hi <= lo {
        return lo;
    }
    let span = u64::try_from((hi - lo).as_micros()).unwrap_or(u64::MAX);
    lo + Duration::from_micros(rng.random_range(0..=span))
}

#[derive(Debug)]
enum Ev {
    /// The node sees the ready set of view `seq`.
    View {
        node: usize,
        seq: usize,
    },
    Deliver(Message),
    SendOutcome {
        node: usize,
        instance: u64,
        id: SendId,
        ok: bool,
    },
    WorkFailed {
        node: usize,
        item: HarnessWork,
    },
    JobDone {
        node: usize,
        instance: u64,
        job: Job,
        ok: bool,
    },
    /// The node learns that `peer` failed (or left).
    PeerGone {
        node: usize,
        peer: usize,
        left: bool,
    },
    /// The node learns the cluster declared it failed.
    Fence {
        node: usize,
    },
    Timer {
        node: usize,
    },
    /// A client sends work to the node.
    Route {
        node: usize,
        item: HarnessWork,
    },
    Inject,
}

struct HarnessNode {
    id: NodeId,
    /// Its membership record (alive, not ready).
    member: Member,
    core: Core,
    alive: bool,
    /// Declared failed by the cluster (holding no longer counts).
    declared: bool,
    leaving: bool,
    /// The view (ready set) it last saw.
    installed: usize,
    /// The nodes it was told failed or left.
    gone: BTreeSet<usize>,
    /// Notice requests it took and did not answer yet.
    unanswered: Vec<NoticeReply>,
    timer: Option<Duration>,
    transition_running: bool,
}

/// Figures of a run.
#[derive(Clone, Debug, Default)]
pub struct HarnessStats {
    /// Notice batches delivered.
    pub batches: u64,
    /// Notice batches whose send failed.
    pub failed_sends: u64,
    /// Work items injected.
    pub work: u64,
    /// Work the cores gave up on and the clients sent again, by reason.
    pub dropped: BTreeMap<&'static str, u64>,
    /// Datums acquired without a notice (timeouts and failovers).
    pub acquired_without_notice: u64,
    /// Relinquishes abandoned.
    pub abandoned: u64,
    /// Notice batches refused because their sender was declared failed
    /// (a receiver that started after the verdict never knew it).
    pub refused_from_declared: u64,
}

/// A simulated cluster.
pub struct Harness {
    cfg: HarnessConfig,
    rng: SmallRng,
    base: Instant,
    now: Duration,
    queue: BinaryHeap<Reverse<(Duration, u64)>>,
    pending: BTreeMap<u64, Ev>,
    seq: u64,
    nodes: Vec<HarnessNode>,
    /// Node indexes in the ready set, in order of joining.
    members: Vec<usize>,
    /// Every ready set handed out, in order (a view's `seq` is its index).
    views: Vec<Vec<usize>>,
    /// The ownership ledger, keyed by node index.
    pub check: Ledger<usize>,
    next_item: u64,
    work_on: bool,
    generation: u64,
    /// Counts: notices sent, work, drops (for reports).
    pub stats: HarnessStats,
}

impl Harness {
    /// A cluster of `nodes` ready nodes that formed from nothing: every datum
    /// is acquired by its first owner.
    #[must_use]
    pub fn new(cfg: HarnessConfig, nodes: usize) -> Harness {
        let mut sim = Harness {
            rng: SmallRng::seed_from_u64(cfg.seed),
            cfg,
            base: Instant::now(),
            now: Duration::ZERO,
            queue: BinaryHeap::new(),
            pending: BTreeMap::new(),
            seq: 0,
            nodes: Vec::new(),
            members: Vec::new(),
            views: vec![Vec::new()],
            check: Ledger::new(false),
            next_item: 0,
            work_on: false,
            generation: 1_000,
            stats: HarnessStats::default(),
        };
        for _ in 0..nodes {
            let n = sim.spawn();
            sim.members.push(n);
        }
        sim.change_membership();
        if sim.cfg.work_every.is_some() {
            sim.work_on = true;
            sim.schedule(Duration::ZERO, Ev::Inject);
        }
        sim
    }

    /// The virtual time elapsed.
    #[must_use]
    pub fn now(&self) -> Duration {
        self.now
    }

    /// Number of nodes ever created.
    #[must_use]
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Indexes of the ready members.
    #[must_use]
    pub fn members(&self) -> &[usize] {
        &self.members
    }

    /// The core of node `n`.
    #[must_use]
    pub fn core(&self, n: usize) -> Option<&NodeCore<HarnessWork, NoticeReply>> {
        self.nodes.get(n).map(|s| &s.core)
    }

    /// The handoff state machine of node `n`.
    #[must_use]
    pub fn handoff(&self, n: usize) -> Option<&Handoff<HarnessWork>> {
        self.nodes.get(n).map(|s| s.core.handoff())
    }

    /// Picks one of the ready members at random.
    pub fn random_member(&mut self) -> Option<usize> {
        if self.members.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..self.members.len());
        self.members.get(i).copied()
    }

    /// Draws a duration in `[lo, hi]` from the run's generator.
    pub fn random_duration(&mut self, lo: Duration, hi: Duration) -> Duration {
        between(&mut self.rng, (lo, hi))
    }

    /// Starts or stops injecting work.
    pub fn set_work(&mut self, on: bool) {
        if on && !self.work_on && self.cfg.work_every.is_some() {
            self.schedule(Duration::ZERO, Ev::Inject);
        }
        self.work_on = on;
    }

    /// A new node: it sees the cluster as it is (the last ready set, not
    /// ready itself), and every live node sees it at once, not ready.
    fn spawn(&mut self) -> usize {
        let n = self.nodes.len();
        self.generation += 1;
        let name = format!("n{n}");
        let id = NodeId::new(&*name, self.generation);
        let port = u16::try_from(20_000 + n).unwrap_or(u16::MAX);
        let member = Member {
            name: name.into(),
            generation: self.generation,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            incarnation: 0,
            state: MemberState::Alive,
            ready: false,
            metadata: Vec::new().into(),
        };
        let at = self.at();
        let config = CoreConfig {
            strategy: self.cfg.strategy.clone(),
            copies: self.cfg.copies,
            ..CoreConfig::default()
        };
        let mut core = match Core::new(member.clone(), self.cfg.handoff.clone(), config.clone()) {
            Ok(core) => core,
            Err(e) => {
                self.check.violation(self.now, format!("bad config: {e}"));
                #[allow(clippy::expect_used)]
                Core::new(member.clone(), Config::default(), config)
                    .expect("default config is valid")
            }
        };
        core.set_lease(Lease::Forever, at);
        for d in 0..self.cfg.datums {
            if let Err(e) = core.register(TYPE, d, at) {
                self.check
                    .violation(self.now, format!("register failed: {e}"));
            }
        }
        let gone = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.alive || s.declared)
            .map(|(i, _)| i)
            .collect();
        self.nodes.push(HarnessNode {
            id,
            member,
            core,
            alive: true,
            declared: false,
            leaving: false,
            installed: self.views.len() - 1,
            gone,
            unanswered: Vec::new(),
            timer: None,
            transition_running: false,
        });
        for o in 0..self.nodes.len() {
            if self.live(o) {
                self.feed_view(o);
                self.pump(o);
            }
        }
        n
    }

    /// The members node `o` sees: every node it was not told gone, ready
    /// when in the ready set it last saw (without `peers`: only the ready
    /// ones, and itself).
    fn member_list(&self, o: usize) -> Vec<Member> {
        let Some(node) = self.nodes.get(o) else {
            return Vec::new();
        };
        let ready: &[usize] = self.views.get(node.installed).map_or(&[], Vec::as_slice);
        self.nodes
            .iter()
            .enumerate()
            .filter(|(m, _)| *m == o || !node.gone.contains(m))
            .filter_map(|(m, s)| {
                let r = ready.contains(&m);
                (self.cfg.peers || r || m == o).then(|| Member {
                    ready: r,
                    ..s.member.clone()
                })
            })
            .collect()
    }

    /// Hands node `o` the members it sees now.
    fn feed_view(&mut self, o: usize) {
        let members = self.member_list(o);
        let at = self.at();
        if let Some(s) = self.nodes.get_mut(o) {
            s.core.handle_membership(Event::ViewChanged(members), at);
        }
    }

    /// A node starts and learns the cluster, but is not ready yet.
    pub fn start(&mut self) -> usize {
        self.spawn()
    }

    /// Node `n` becomes ready before it has seen any other node ready: it
    /// alone sees a ready set of only itself. [`Harness::ready`] later.
    pub fn ready_alone(&mut self, n: usize) {
        if n >= self.nodes.len() {
            return;
        }
        self.views.push(vec![n]);
        let seq = self.views.len() - 1;
        self.schedule(Duration::ZERO, Ev::View { node: n, seq });
    }

    /// A new ready set, seen by every live node after its own random skew.
    fn change_membership(&mut self) {
        self.views.push(self.members.clone());
        let seq = self.views.len() - 1;
        for n in 0..self.nodes.len() {
            if self.nodes.get(n).is_some_and(|s| s.alive && !s.declared) {
                let skew = between(&mut self.rng, (Duration::ZERO, self.cfg.install_skew));
                self.schedule(skew, Ev::View { node: n, seq });
            }
        }
    }

    /// A new node joins: it sees the current view, then becomes ready.
    pub fn join(&mut self) -> usize {
        let n = self.spawn();
        self.members.push(n);
        self.change_membership();
        n
    }

    /// Node `n` stops being ready (it stays up and relinquishes what it holds).
    pub fn unready(&mut self, n: usize) {
        self.members.retain(|&m| m != n);
        self.change_membership();
    }

    /// Node `n` becomes ready again.
    pub fn ready(&mut self, n: usize) {
        if !self.members.contains(&n) && self.nodes.get(n).is_some_and(|s| s.alive && !s.declared) {
            self.members.push(n);
            self.change_membership();
        }
    }

    /// Node `n` leaves gracefully: not ready, relinquishes, then leaves once idle.
    pub fn leave(&mut self, n: usize) {
        if let Some(s) = self.nodes.get_mut(n) {
            s.leaving = true;
        }
        self.unready(n);
    }

    /// Node `n` crashes; after a detection delay the others learn it failed.
    /// The work in its memory may be lost.
    pub fn kill(&mut self, n: usize) {
        if !self.nodes.get(n).is_some_and(|s| s.alive) {
            return;
        }
        self.stop(n, true);
        self.declare(n);
    }

    /// The cluster declares node `n` failed while it is alive (a false
    /// positive): the others fail over, `n` is told and fences itself.
    pub fn declare_failed(&mut self, n: usize) {
        self.declare(n);
        let d = between(&mut self.rng, self.cfg.detect_delay);
        self.schedule(d, Ev::Fence { node: n });
    }

    fn declare(&mut self, n: usize) {
        let Some(s) = self.nodes.get_mut(n) else {
            return;
        };
        s.declared = true;
        self.check.declare_failed(&n);
        self.members.retain(|&m| m != n);
        self.views.push(self.members.clone());
        let seq = self.views.len() - 1;
        // Membership detects the failure, then each node learns it and sees
        // the view without the node (in that order, as membership emits
        // them), each after its own skew.
        let d = between(&mut self.rng, self.cfg.detect_delay);
        for o in 0..self.nodes.len() {
            if o == n || !self.nodes.get(o).is_some_and(|s| s.alive && !s.declared) {
                continue;
            }
            let at = d + between(&mut self.rng, (Duration::ZERO, self.cfg.install_skew));
            self.schedule(
                at,
                Ev::PeerGone {
                    node: o,
                    peer: n,
                    left: false,
                },
            );
            self.schedule(at, Ev::View { node: o, seq });
        }
    }

    fn schedule(&mut self, after: Duration, ev: Ev) {
        self.seq += 1;
        let at = self.now + after;
        self.queue.push(Reverse((at, self.seq)));
        self.pending.insert(self.seq, ev);
    }

    /// Runs the simulation for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > end {
                break;
            }
            self.queue.pop();
            self.now = self.now.max(at);
            if let Some(ev) = self.pending.remove(&seq) {
                self.step(ev);
            }
            self.check_leavers();
        }
        self.now = self.now.max(end);
    }

    /// A leaver that saw the last view and has nothing in flight stops;
    /// the others learn it left a network delay later.
    fn check_leavers(&mut self) {
        let latest = self.views.len() - 1;
        for n in 0..self.nodes.len() {
            let done = self.nodes.get(n).is_some_and(|s| {
                s.alive && s.leaving && s.installed == latest && s.core.handoff().is_idle()
            });
            if !done {
                continue;
            }
            self.stop(n, false);
            for o in 0..self.nodes.len() {
                if o != n {
                    let d = between(&mut self.rng, self.cfg.net_delay);
                    self.schedule(
                        d,
                        Ev::PeerGone {
                            node: o,
                            peer: n,
                            left: true,
                        },
                    );
                }
            }
        }
    }

    fn at(&self) -> Instant {
        self.base + self.now
    }

    /// Alive and not fenced.
    fn live(&self, n: usize) -> bool {
        self.nodes
            .get(n)
            .is_some_and(|s| s.alive && !s.core.is_fenced())
    }

    fn index_of(&self, id: &NodeId) -> Option<usize> {
        self.nodes.iter().position(|s| s.id == *id)
    }

    fn trace(&self, datum: i64, what: impl FnOnce() -> String) {
        if self.cfg.trace == Some(datum) {
            eprintln!("{:>12?} d{datum}: {}", self.now, what());
        }
    }
}
