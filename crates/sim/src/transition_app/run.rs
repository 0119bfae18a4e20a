//! The scenarios: what to run, the faults drawn from the seed, one run and
//! its report.

use std::fmt;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use shoal_placement::Strategy;
use shoal_transition::Config as HandoffConfig;

use super::{
    FAILOVER_MARGIN, FAULT_AT, TAG_TRANSITION_SCENARIO, TransitionLedger, TransitionNode,
    TransitionSettings, TransitionStats, between, final_check, final_check_leases,
};
use crate::sim::{Action, Sim, SimConfig};
use crate::util::derive_seed;

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
    report.stats.overlaps_with_declared = sim.shared().owners.overlaps_with_declared();
    report.stats.overlaps_with_lapsed = sim.shared().owners.overlaps_with_lapsed();
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
