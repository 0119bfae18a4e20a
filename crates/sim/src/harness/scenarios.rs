//! The named scenarios, the failover deadlines of `join-leave-kill`, and
//! the checks at the end of a run.

use std::time::Duration;

use rand::Rng;
use shoal_placement::Strategy;
use shoal_transition::Datum;

use super::{Harness, HarnessConfig, TYPE};

impl Harness {
    /// Stops injecting work, runs until membership and transitions have
    /// settled (`settle` of virtual time), then checks the final invariants.
    /// Returns every violation seen during the run.
    pub fn settle(&mut self, settle: Duration) -> Vec<String> {
        self.set_work(false);
        self.run_for(settle);
        let latest = self.views.len() - 1;
        let mut v = self.check.take_violations();
        // The table of the last view, as a live node that saw it has it.
        let table = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(n, s)| self.live(*n) && !s.declared && s.installed == latest)
            .map(|(_, s)| std::sync::Arc::clone(s.core.handoff().table()))
            .next();
        for (n, s) in self.nodes.iter().enumerate() {
            if !s.alive || s.declared {
                continue;
            }
            if s.installed != latest {
                v.push(format!("node {n} never saw the last view"));
            }
            if table
                .as_ref()
                .is_some_and(|t| t.view_id() != s.core.handoff().view_id())
            {
                v.push(format!("node {n} never installed the last view"));
            }
            if !s.core.handoff().is_idle() {
                v.push(format!(
                    "node {n} not idle: {:?}",
                    s.core.handoff().progress()
                ));
            }
            if s.transition_running {
                v.push(format!("node {n}: transition never ended"));
            }
            if s.core.parked() > 0 {
                v.push(format!(
                    "node {n}: {} messages still parked",
                    s.core.parked()
                ));
            }
        }
        let Some(table) = table else {
            v.push("no live node saw the last view".to_owned());
            return v;
        };
        for id in 0..self.cfg.datums {
            let owner = table
                .primary(id)
                .and_then(|i| table.view().node(i))
                .and_then(|o| self.index_of(o));
            let holders: Vec<usize> = (0..self.nodes.len())
                .filter(|&n| self.live(n))
                .filter(|&n| {
                    self.nodes.get(n).is_some_and(|s| {
                        let h = s.core.handoff();
                        h.lookup_type(TYPE)
                            .is_some_and(|ty| h.is_held(Datum::new(ty, id)))
                    })
                })
                .collect();
            let expected: Vec<usize> = owner.into_iter().collect();
            if holders != expected {
                v.push(format!(
                    "datum {id}: held by {holders:?}, placement says {expected:?}"
                ));
            }
            let truth: Vec<usize> = (0..self.nodes.len())
                .filter(|&n| self.live(n) && self.check.holds(&n, id))
                .collect();
            if truth != expected {
                v.push(format!(
                    "datum {id}: application holds it on {truth:?}, placement says {expected:?}"
                ));
            }
        }
        v.extend(self.check.unprocessed(self.now));
        v.extend(self.check.take_violations());
        v
    }
}

/// The named scenarios of the test suite: `join`, `leave`, `kill-owner`,
/// `chained`, `flap` (under send failures), `false-positive`, `chaos` (six
/// random changes of any kind, close together, under send failures),
/// `lost-ack` (the same, and a tenth of the batches that arrive are reported
/// failed to their sender all the same), `stress`
/// (the same with slow, failing jobs, tiny caps and batches, and replicas),
/// `concurrent-ready` (a cluster forming from nodes that become ready at the
/// same moment, each first seeing only itself ready), `join-leave-kill`
/// (joins, graceful leaves and crashes in random order, close together; every
/// datum a crashed node held is acquired again within [`failover_bound`]).
pub const SCENARIOS: &[&str] = &[
    "join",
    "leave",
    "kill-owner",
    "chained",
    "flap",
    "false-positive",
    "chaos",
    "lost-ack",
    "stress",
    "concurrent-ready",
    "join-leave-kill",
];

/// What the survivors may take, beyond the failure detection and the skew of
/// installing the view without the crashed node, to acquire again every datum
/// it held: a round of done markers and an acquire job, with retries (the
/// transition `timeout` is well above it).
pub const FAILOVER_MARGIN: Duration = Duration::from_millis(500);

/// How long after a crash every datum the crashed node held must be acquired
/// again in `join-leave-kill`: the longest detection delay, plus the install
/// skew, plus [`FAILOVER_MARGIN`].
#[must_use]
pub fn failover_bound(cfg: &HarnessConfig) -> Duration {
    cfg.detect_delay.1 + cfg.install_skew + FAILOVER_MARGIN
}

/// A crash whose datums must be acquired again by `deadline`.
struct FailoverCheck {
    victim: usize,
    at: Duration,
    deadline: Duration,
    datums: Vec<i64>,
}

impl Harness {
    /// Ready members that installed a view naming themselves (they finished
    /// joining, as a node does before it leaves).
    fn joined_members(&self) -> Vec<usize> {
        self.members
            .iter()
            .copied()
            .filter(|&n| {
                self.nodes
                    .get(n)
                    .is_some_and(|s| s.core.handoff().table().view().contains(&s.id))
            })
            .collect()
    }

    fn pick(&mut self, from: &[usize]) -> Option<usize> {
        if from.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..from.len());
        from.get(i).copied()
    }

    /// Runs for `d`, checking on the way every failover whose deadline
    /// passes.
    fn run_checking(&mut self, d: Duration, checks: &mut Vec<FailoverCheck>) {
        let end = self.now + d;
        loop {
            let next = checks.iter().map(|c| c.deadline).min();
            match next {
                Some(at) if at <= end => {
                    let step = at.saturating_sub(self.now);
                    self.run_for(step);
                    let (due, rest): (Vec<_>, Vec<_>) =
                        checks.drain(..).partition(|c| c.deadline <= self.now);
                    *checks = rest;
                    for c in due {
                        self.check_failover(&c);
                    }
                }
                _ => {
                    let step = end.saturating_sub(self.now);
                    self.run_for(step);
                    return;
                }
            }
        }
    }

    fn check_failover(&mut self, c: &FailoverCheck) {
        let late: Vec<i64> = c
            .datums
            .iter()
            .copied()
            .filter(|&d| self.check.acquired_at(d).is_none_or(|t| t <= c.at))
            .collect();
        if !late.is_empty() {
            let what = format!(
                "datums {late:?} of node {} (crashed at {:?}) not acquired again within {:?}",
                c.victim,
                c.at,
                c.deadline.saturating_sub(c.at)
            );
            self.check.violation(self.now, what);
        }
    }
}

/// `join-leave-kill`: a join, a graceful leave and a crash in random order,
/// then up to two more of them, each 0.3 (the install skew) to 1.2 s after
/// the previous one (and after a crash, not before every survivor learnt it).
/// A node leaves once it finished joining.
fn join_leave_kill(sim: &mut Harness, bound: Duration) {
    #[derive(Clone, Copy)]
    enum Op {
        Join,
        Leave,
        Kill,
    }
    let mut ops = vec![Op::Join, Op::Leave, Op::Kill];
    for i in (1..ops.len()).rev() {
        let j = sim.rng.random_range(0..=i);
        ops.swap(i, j);
    }
    for _ in 0..sim.rng.random_range(0..=2) {
        let op = match sim.rng.random_range(0..3) {
            0 => Op::Join,
            1 => Op::Leave,
            _ => Op::Kill,
        };
        ops.push(op);
    }
    // The harness builds every table from one global member list, and a
    // node installs it whether or not it was told of an earlier crash yet;
    // membership never shows a view without a node before declaring it
    // failed. So the next change waits until every survivor learnt the crash.
    // And one change waits for the install skew of the previous one, so no
    // node skips a view (a leaver's done marker for a view skipped here is
    // not used: see docs/transition.md, known limits).
    let detected = sim.cfg.detect_delay.1 + sim.cfg.install_skew;
    let skew = sim.cfg.install_skew;
    let mut checks = Vec::new();
    let mut after_kill = false;
    for op in ops {
        let mut gap = sim.random_duration(skew, Duration::from_millis(1_200));
        if after_kill {
            gap = gap.max(detected);
        }
        after_kill = false;
        sim.run_checking(gap, &mut checks);
        // Keep two ready members at least.
        let joined = sim.joined_members();
        match op {
            Op::Join => {
                sim.join();
            }
            Op::Leave if sim.members.len() > 2 => {
                if let Some(n) = sim.pick(&joined) {
                    sim.leave(n);
                }
            }
            Op::Kill if sim.members.len() > 2 => {
                let members = sim.members.clone();
                if let Some(n) = sim.pick(&members) {
                    let datums = sim.check.held_by(&n);
                    let at = sim.now;
                    sim.kill(n);
                    after_kill = true;
                    // A datum of an earlier crash may have gone to this node
                    // before it acquired it: it now waits for this detection.
                    for c in &mut checks {
                        c.deadline = c.deadline.max(at + bound);
                    }
                    checks.push(FailoverCheck {
                        victim: n,
                        at,
                        deadline: at + bound,
                        datums,
                    });
                }
            }
            Op::Leave | Op::Kill => {
                sim.join();
            }
        }
    }
    sim.run_checking(bound, &mut checks);
}

/// Runs a named scenario with `seed`; returns the violations (empty: passed).
#[must_use]
pub fn run_scenario(name: &str, seed: u64) -> Vec<String> {
    run_scenario_traced(name, seed, None)
}

/// [`run_scenario`], printing to stderr everything that happens to datum `trace`.
#[must_use]
pub fn run_scenario_traced(name: &str, seed: u64, trace: Option<i64>) -> Vec<String> {
    let mut cfg = HarnessConfig::new(seed);
    cfg.trace = trace;
    run_scenario_with(name, cfg)
}

/// [`run_scenario`] from a configuration (its `seed` seeds the run); the
/// scenario adjusts the fields it is about (send failures, job times...).
#[must_use]
pub fn run_scenario_with(name: &str, mut cfg: HarnessConfig) -> Vec<String> {
    let seed = cfg.seed;
    let mut settle = cfg.handoff.timeout * 6;
    match name {
        "flap" => cfg.send_failure = 0.2,
        "chaos" => cfg.send_failure = 0.1,
        "lost-ack" => {
            cfg.send_failure = 0.1;
            cfg.lost_ack = 0.1;
        }
        "stress" => {
            // Slow, often failing jobs and sends, tiny caps and batches,
            // replicas: everything queues, retries and crosses views.
            cfg.job_time = (Duration::ZERO, Duration::from_millis(400));
            cfg.job_failure = 0.2;
            cfg.send_failure = 0.15;
            cfg.install_skew = Duration::from_millis(400);
            cfg.copies = if seed.is_multiple_of(2) { 2 } else { 1 };
            cfg.handoff.max_relinquish_jobs = 2;
            cfg.handoff.max_acquire_jobs = 2;
            cfg.handoff.max_batch = 3;
            settle = cfg.handoff.timeout * 40;
        }
        _ => {}
    }
    if seed % 3 == 1 {
        cfg.strategy = Strategy::Rendezvous { partitions: 64 };
    }
    if name == "concurrent-ready" {
        // Nodes start and know each other, then become ready together, each
        // before it sees another ready: each first installs a view of
        // itself alone. Without waiting for the live peers' done markers,
        // every one of them would acquire every datum.
        let mut sim = Harness::new(cfg, 0);
        let nodes: Vec<usize> = (0..3 + seed % 3).map(|_| sim.start()).collect();
        let gap = sim.random_duration(Duration::ZERO, Duration::from_millis(100));
        sim.run_for(gap);
        for &n in &nodes {
            sim.ready_alone(n);
        }
        for &n in &nodes {
            let gap = sim.random_duration(Duration::ZERO, Duration::from_millis(400));
            sim.run_for(gap);
            sim.ready(n);
        }
        let busy = sim.random_duration(Duration::from_millis(500), Duration::from_secs(2));
        sim.run_for(busy);
        return sim.settle(settle);
    }
    let bound = failover_bound(&cfg);
    let mut sim = Harness::new(cfg, 3 + (seed % 2) as usize);
    let warmup = sim.random_duration(Duration::from_millis(200), Duration::from_secs(1));
    sim.run_for(warmup);
    match name {
        "join" => {
            sim.join();
        }
        "leave" => {
            if let Some(n) = sim.random_member() {
                sim.leave(n);
            }
        }
        "kill-owner" => {
            if let Some(n) = sim.random_member() {
                sim.kill(n);
            }
        }
        "chained" => {
            sim.join();
            let gap = sim.random_duration(Duration::ZERO, Duration::from_millis(600));
            sim.run_for(gap);
            match seed % 3 {
                0 => {
                    sim.join();
                }
                1 => {
                    if let Some(n) = sim.random_member() {
                        sim.leave(n);
                    }
                }
                _ => {
                    if let Some(n) = sim.random_member() {
                        sim.kill(n);
                    }
                }
            }
        }
        "flap" => {
            let n = sim.join();
            for _ in 0..5 {
                let gap =
                    sim.random_duration(Duration::from_millis(50), Duration::from_millis(1_500));
                sim.run_for(gap);
                sim.unready(n);
                let gap =
                    sim.random_duration(Duration::from_millis(50), Duration::from_millis(1_500));
                sim.run_for(gap);
                sim.ready(n);
            }
        }
        "false-positive" => {
            if let Some(n) = sim.random_member() {
                sim.declare_failed(n);
            }
        }
        "chaos" | "lost-ack" | "stress" => {
            // Random joins, leaves, crashes, flaps and false declarations,
            // close together, while sends fail.
            for _ in 0..6 {
                let gap = sim.random_duration(Duration::ZERO, Duration::from_millis(1_200));
                sim.run_for(gap);
                let members = sim.members().len();
                let pick = sim.random_duration(Duration::ZERO, Duration::from_millis(5));
                match (pick.as_micros() % 6, members) {
                    (0, _) | (_, 0..=1) => {
                        sim.join();
                    }
                    (1, _) => {
                        if let Some(n) = sim.random_member() {
                            sim.leave(n);
                        }
                    }
                    (2, _) => {
                        if let Some(n) = sim.random_member() {
                            sim.kill(n);
                        }
                    }
                    (3, _) => {
                        if let Some(n) = sim.random_member() {
                            sim.declare_failed(n);
                        }
                    }
                    _ => {
                        if let Some(n) = sim.random_member() {
                            sim.unready(n);
                            let back =
                                sim.random_duration(Duration::ZERO, Duration::from_millis(800));
                            sim.run_for(back);
                            sim.ready(n);
                        }
                    }
                }
            }
        }
        "join-leave-kill" => join_leave_kill(&mut sim, bound),
        other => return vec![format!("unknown scenario {other}")],
    }
    let busy = sim.random_duration(Duration::from_millis(500), Duration::from_secs(2));
    sim.run_for(busy);
    sim.settle(settle)
}
