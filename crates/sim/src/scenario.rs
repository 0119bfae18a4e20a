//! Named scenarios, random fault schedules and the report they produce.

use std::fmt;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use shoal_membership::{Config, LeaseStrategy};

use crate::app::Application;
use crate::sim::{Action, Sim, SimConfig, Violation};
use crate::util::{derive_seed, peak_rss_bytes};

/// Longest input delay of a stall in [`random_schedule`].
pub const MAX_STALL_DELAY: Duration = Duration::from_secs(3);

/// Purpose tag of the scenario's own random choices.
const TAG_SCENARIO: u64 = 4;

/// Above this many nodes the cluster is bootstrapped (every node starts
/// knowing the others) instead of formed by joins, and O(N^2) checks are
/// only run once faults stop.
pub const BOOTSTRAP_ABOVE: u32 = 64;

/// The scenarios the simulator knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioKind {
    /// One node crashes; measures how long the survivors take to mark it
    /// failed.
    KillOne,
    /// One node handles every packet 2 s late for 30 s, then recovers;
    /// counts healthy members wrongly marked failed.
    StalledNode,
    /// The cluster splits in two halves for 20 s, then heals; measures how
    /// long until every node sees every other again.
    PartitionHeal,
    /// The largest minority ((N-1)/2 nodes) is cut off from the rest for
    /// 20 s, then the network heals; measures when the minority loses its
    /// lease against when the majority takes its datums over.
    PartitionMinority,
    /// One node is cut off from all the others for 20 s, then heals.
    Isolated,
    /// One node is stopped (SIGSTOP) for 8 s, then resumes.
    Paused,
    /// Joins, graceful leaves, crashes and restarts for 40 s, then quiet.
    Churn,
    /// One node changes its metadata; measures how long until 99.99 % of
    /// the members have the change.
    Update,
    /// A random fault schedule (crashes, restarts, joins, leaves, stalls,
    /// partitions, loss and duplication bursts, garbage packets) drawn from
    /// the seed, then quiet.
    Random,
}

impl ScenarioKind {
    /// The scenario's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::KillOne => "kill-one",
            ScenarioKind::StalledNode => "stalled-node",
            ScenarioKind::PartitionHeal => "partition-heal",
            ScenarioKind::PartitionMinority => "partition-minority",
            ScenarioKind::Isolated => "isolated",
            ScenarioKind::Paused => "paused",
            ScenarioKind::Churn => "churn",
            ScenarioKind::Update => "update",
            ScenarioKind::Random => "random",
        }
    }
}

impl fmt::Display for ScenarioKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Membership timing profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Profile {
    /// `Config::lan()`, the default.
    Lan,
    /// `Config::wan()`.
    Wan,
    /// `Config::local()`.
    Local,
}

impl Profile {
    /// The membership configuration of this profile.
    pub fn config(self) -> Config {
        match self {
            Profile::Lan => Config::lan(),
            Profile::Wan => Config::wan(),
            Profile::Local => Config::local(),
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct ScenarioOptions {
    /// Which scenario.
    pub scenario: ScenarioKind,
    /// Initial cluster size.
    pub nodes: u32,
    /// Seed of everything random.
    pub seed: u64,
    /// Loss probability of unreliable packets, for the whole run.
    pub loss: f64,
    /// Duplication probability of unreliable packets, for the whole run.
    pub duplicate: f64,
    /// Membership timing profile.
    pub profile: Profile,
    /// Stalled-node scenario: also delay the stalled node's timers (by
    /// default only its packets wait, the harsher case).
    pub stall_timers: bool,
    /// Membership's `lease_period`, when not the profile's (the takeover
    /// delay follows it).
    pub lease_period: Option<Duration>,
}

impl ScenarioOptions {
    /// Options for `scenario` at `nodes` nodes with `seed`, no loss, LAN.
    pub fn new(scenario: ScenarioKind, nodes: u32, seed: u64) -> ScenarioOptions {
        ScenarioOptions {
            scenario,
            nodes,
            seed,
            loss: 0.0,
            duplicate: 0.0,
            profile: Profile::Lan,
            stall_timers: false,
            lease_period: None,
        }
    }
}

/// The outcome of one run: one JSON object per line with `--json`. Fields
/// that do not apply to the scenario are `null`. Times are virtual seconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// Scenario name.
    pub scenario: ScenarioKind,
    /// Initial cluster size.
    pub nodes: u32,
    /// Seed.
    pub seed: u64,
    /// Membership profile.
    pub profile: Profile,
    /// Loss probability of unreliable packets.
    pub loss: f64,
    /// From the crash to the first survivor marking the node suspect.
    pub suspect_first_s: Option<f64>,
    /// From the crash to the first survivor marking the node failed.
    pub detect_first_s: Option<f64>,
    /// From the crash to the last survivor marking the node failed.
    pub detect_all_s: Option<f64>,
    /// Distinct healthy members (never crashed, stalled, leaving, nor cut
    /// off by a partition) that some node marked failed. Null in
    /// partition-heal, where every member is cut off from half the cluster.
    pub false_positives: Option<u64>,
    /// "Failed" events about healthy members, all accusers counted.
    pub false_positive_events: u64,
    /// Those of them whose accuser was the stalled node itself.
    pub false_positive_events_by_stalled: u64,
    /// Whether any node marked the stalled node failed (stalled-node only).
    pub stalled_marked_failed: Option<bool>,
    /// Times nodes learnt that the cluster declared them failed.
    pub declared_failed: u64,
    /// From the metadata change until 99.99 % of members had it.
    pub converge_s: Option<f64>,
    /// From the metadata change until every member had it.
    pub converge_all_s: Option<f64>,
    /// From the last fault until every live node saw exactly the live
    /// members (the last time, if it diverged again).
    pub settle_s: Option<f64>,
    /// Times the cluster, converged after the last fault, diverged again (a
    /// late consequence of the fault) and had to converge anew.
    pub rediverged: u64,
    /// Membership bytes sent per live node per virtual second, over the
    /// measurement window (from the fault or change to the end).
    pub bytes_per_node_per_s: Option<f64>,
    /// Membership messages sent per live node per virtual second, same
    /// window.
    pub msgs_per_node_per_s: Option<f64>,
    /// The part of `bytes_per_node_per_s` sent as unreliable datagrams.
    pub datagram_bytes_per_node_per_s: Option<f64>,
    /// From the fault to the last cut-off (or paused) node losing its lease
    /// (partition-heal, partition-minority, isolated, paused).
    pub standing_lost_s: Option<f64>,
    /// From the fault to the first takeover of a cut-off node's datums: a
    /// dead verdict released by the takeover gate (`takeover_delay` after the
    /// suspicion behind it, never before the verdict), by a node holding a
    /// valid lease.
    pub takeover_first_s: Option<f64>,
    /// Takeovers in the run (verdicts that stood until the gate released them, by nodes
    /// holding a valid lease then).
    pub takeovers: u64,
    /// The smallest margin between a takeover and its victim losing its
    /// lease (or being fenced, or stopping) before it; negative: two owners.
    pub lease_margin_min_s: Option<f64>,
    /// Takeovers whose victim still held a valid lease then.
    pub lease_violations: u64,
    /// From the heal (the last fault) until every live node held a valid
    /// lease again.
    pub standing_regained_s: Option<f64>,
    /// Times healthy nodes (never crashed, stalled, leaving, nor cut off)
    /// lost their lease after the cluster formed.
    pub healthy_lapses: u64,
    /// Invariant violations found (the run stops at the first).
    pub invariant_violations: u64,
    /// The violation, with its step, or why the protocol outcome is wrong.
    pub failure: Option<String>,
    /// Step (events processed) at which the violation was found.
    pub failure_step: Option<u64>,
    /// Whether the scenario's protocol outcome holds (no violation, and for
    /// kill-one every survivor marked the crash).
    pub ok: bool,
    /// Virtual time simulated.
    pub virtual_s: f64,
    /// Events processed.
    pub events: u64,
    /// Hash of the event trace (equal for equal runs).
    pub trace_hash: String,
    /// Wall-clock seconds the run took (the only wall-clock figure).
    pub wall_s: f64,
    /// Peak resident memory of the process so far, in MiB.
    pub peak_rss_mib: Option<f64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn opt(v: Option<f64>, unit: &str) -> String {
            v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}{unit}"))
        }
        writeln!(
            f,
            "scenario {} | {} nodes | seed {} | profile {:?} | loss {}",
            self.scenario, self.nodes, self.seed, self.profile, self.loss
        )?;
        writeln!(
            f,
            "  detection      first suspect {}  first failed {}  all failed {}",
            opt(self.suspect_first_s, "s"),
            opt(self.detect_first_s, "s"),
            opt(self.detect_all_s, "s")
        )?;
        writeln!(
            f,
            "  accuracy       false positives {} ({} events, {} by the stalled node)  stalled node marked failed {}  declared-failed signals {}",
            self.false_positives
                .map_or_else(|| "-".to_string(), |n| n.to_string()),
            self.false_positive_events,
            self.false_positive_events_by_stalled,
            self.stalled_marked_failed
                .map_or_else(|| "-".to_string(), |b| b.to_string()),
            self.declared_failed
        )?;
        writeln!(
            f,
            "  dissemination  99.99% {}  all {}  settle after last fault {} (diverged again {} times)",
            opt(self.converge_s, "s"),
            opt(self.converge_all_s, "s"),
            opt(self.settle_s, "s"),
            self.rediverged
        )?;
        writeln!(
            f,
            "  traffic        {} B/node/s ({} as datagrams)  {} msgs/node/s",
            opt(self.bytes_per_node_per_s, ""),
            opt(self.datagram_bytes_per_node_per_s, ""),
            opt(self.msgs_per_node_per_s, "")
        )?;
        writeln!(
            f,
            "  lease          lost {}  first takeover {}  takeovers {}  min margin {}  violations {}  regained {}  healthy lapses {}",
            opt(self.standing_lost_s, "s"),
            opt(self.takeover_first_s, "s"),
            self.takeovers,
            opt(self.lease_margin_min_s, "s"),
            self.lease_violations,
            opt(self.standing_regained_s, "s"),
            self.healthy_lapses
        )?;
        writeln!(
            f,
            "  run            {:.1}s virtual, {} events, {:.2}s wall, peak RSS {} MiB, trace {}",
            self.virtual_s,
            self.events,
            self.wall_s,
            opt(self.peak_rss_mib, ""),
            self.trace_hash
        )?;
        match &self.failure {
            None => write!(f, "  result         ok: no invariant violated"),
            Some(why) => write!(
                f,
                "  result         FAILED ({} violations): {why}",
                self.invariant_violations
            ),
        }
    }
}

/// Membership and simulator configuration for a scenario run.
pub fn sim_config(opts: &ScenarioOptions) -> SimConfig {
    let mut membership = opts.profile.config();
    if let Some(period) = opts.lease_period {
        membership.lease_period = period;
    }
    let large = opts.nodes > BOOTSTRAP_ABOVE;
    if opts.nodes > 1_000 {
        // Building a 10,000-member view per node per change is the largest
        // cost of a big run, and nothing here reads it.
        membership.view_events = false;
    }
    let mut cfg = SimConfig::new(opts.seed, membership);
    cfg.net.loss = opts.loss;
    cfg.net.duplicate = opts.duplicate;
    cfg.deep_checks = !large;
    cfg.converge_check_every = if large {
        // O(N^2) per check: once after the faults, then rarely.
        Duration::from_secs(30)
    } else {
        Duration::from_millis(100)
    };
    // Partitions heal through push-pull with dead members: give it a few
    // rounds (the interval grows with N), plus the longest suspicion.
    let m = &cfg.membership;
    let log2n = f64::from(opts.nodes.max(2)).log2();
    let scale = ((log2n - 5.0).max(0.0).ceil() + 1.0) as u32;
    let log10n = f64::from(opts.nodes.max(1)).log10().max(1.0);
    let suspicion_max = m
        .probe_interval
        .mul_f64(f64::from(m.suspicion_mult) * log10n * f64::from(m.suspicion_max_mult));
    cfg.settle_limit = m.push_pull_interval * scale * 3 + suspicion_max + Duration::from_secs(10);
    cfg
}

/// Runs one scenario with no application layer.
pub fn run(opts: &ScenarioOptions) -> Report {
    run_with::<()>(opts, ())
}

/// A report of a run that could not produce one (nothing measured, not ok).
pub fn failed_report(opts: &ScenarioOptions, failure: String) -> Report {
    let mut report = empty_report(opts);
    report.failure = Some(failure);
    report
}

fn empty_report(opts: &ScenarioOptions) -> Report {
    Report {
        scenario: opts.scenario,
        nodes: opts.nodes,
        seed: opts.seed,
        profile: opts.profile,
        loss: opts.loss,
        suspect_first_s: None,
        detect_first_s: None,
        detect_all_s: None,
        false_positives: None,
        false_positive_events: 0,
        false_positive_events_by_stalled: 0,
        stalled_marked_failed: None,
        declared_failed: 0,
        converge_s: None,
        converge_all_s: None,
        settle_s: None,
        rediverged: 0,
        bytes_per_node_per_s: None,
        msgs_per_node_per_s: None,
        datagram_bytes_per_node_per_s: None,
        standing_lost_s: None,
        takeover_first_s: None,
        takeovers: 0,
        lease_margin_min_s: None,
        lease_violations: 0,
        standing_regained_s: None,
        healthy_lapses: 0,
        invariant_violations: 0,
        failure: None,
        failure_step: None,
        ok: false,
        virtual_s: 0.0,
        events: 0,
        trace_hash: String::new(),
        wall_s: 0.0,
        peak_rss_mib: None,
    }
}

/// Runs one scenario with application `A` on every node.
pub fn run_with<A: Application>(opts: &ScenarioOptions, shared: A::Shared) -> Report {
    let wall = Instant::now();
    let cfg = sim_config(opts);
    let extra = if opts.scenario == ScenarioKind::Churn || opts.scenario == ScenarioKind::Random {
        opts.nodes / 2 + 2
    } else {
        0
    };
    let mut report = empty_report(opts);
    let mut sim = match Sim::<A>::new(cfg, opts.nodes + extra, Instant::now(), shared) {
        Ok(sim) => sim,
        Err(e) => {
            report.failure = Some(e);
            return report;
        }
    };
    let outcome = drive(&mut sim, opts, &mut report);
    if let Err(v) = &outcome {
        report.invariant_violations = 1;
        report.failure = Some(v.to_string());
        report.failure_step = Some(v.step);
    }
    let lease = sim.lease_report();
    report.takeovers = lease.takeovers as u64;
    report.lease_violations = lease.violations as u64;
    report.lease_margin_min_s = lease.min_margin_s;
    if report.failure.is_none()
        && let Some(why) = lease.first_violation
        && matches!(
            opts.scenario,
            ScenarioKind::PartitionHeal
                | ScenarioKind::PartitionMinority
                | ScenarioKind::Isolated
                | ScenarioKind::Paused
        )
    {
        // The lease's promise in the scenarios made for it: no two owners.
        report.failure = Some(why);
    }
    report.ok = report.failure.is_none();
    if !matches!(
        opts.scenario,
        ScenarioKind::PartitionHeal | ScenarioKind::PartitionMinority | ScenarioKind::Isolated
    ) {
        report.false_positives = Some(sim.false_positives() as u64);
    }
    report.false_positive_events = sim.false_positive_events();
    report.false_positive_events_by_stalled = sim.false_positive_events_by_stalled();
    report.rediverged = sim.rediverged();
    report.declared_failed = sim.declared_failed_events();
    if let (Some(q), Some(c)) = (sim.quiet_at(), sim.converged_at()) {
        report.settle_s = Some(c.saturating_sub(q).as_secs_f64());
    }
    report.virtual_s = sim.now().as_secs_f64();
    report.events = sim.steps();
    report.trace_hash = format!("{:016x}", sim.trace_hash());
    report.wall_s = wall.elapsed().as_secs_f64();
    report.peak_rss_mib = peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0));
    report
}

/// Traffic counters at the start of the measurement window.
struct Window {
    traffic: crate::sim::Traffic,
    node_s: f64,
}

fn open_window<A: Application>(sim: &mut Sim<A>) -> Window {
    Window {
        traffic: sim.traffic(),
        node_s: sim.node_seconds(),
    }
}

fn close_window<A: Application>(sim: &mut Sim<A>, w: &Window, report: &mut Report) {
    let t = sim.traffic();
    let node_s = sim.node_seconds() - w.node_s;
    if node_s <= 0.0 {
        return;
    }
    let bytes = t.membership_bytes() - w.traffic.membership_bytes();
    let msgs = t.membership_msgs() - w.traffic.membership_msgs();
    let datagram = t.unreliable_bytes - w.traffic.unreliable_bytes;
    report.bytes_per_node_per_s = Some(bytes as f64 / node_s);
    report.msgs_per_node_per_s = Some(msgs as f64 / node_s);
    report.datagram_bytes_per_node_per_s = Some(datagram as f64 / node_s);
}

/// Forms the cluster: bootstrapped above [`BOOTSTRAP_ABOVE`] nodes, by joins
/// (one every 20 ms, through live seeds) below. Returns once every node
/// sees every other, then lets it run `warmup` more.
fn form<A: Application>(sim: &mut Sim<A>, nodes: u32, warmup: Duration) -> Result<(), Violation> {
    if nodes > BOOTSTRAP_ABOVE {
        if let Err(e) = sim.bootstrap(nodes) {
            return Err(Violation {
                seed: sim.config().seed,
                step: sim.steps(),
                time_ns: 0,
                message: e,
            });
        }
    } else {
        for slot in 0..nodes {
            sim.schedule(
                Duration::from_millis(20 * u64::from(slot)),
                Action::Start { slot },
            );
        }
        sim.run_until(Duration::from_millis(20 * u64::from(nodes)))?;
    }
    sim.schedule(sim.now(), Action::Quiet);
    let limit = sim.now() + sim.config().settle_limit;
    sim.run_while(limit, Duration::from_millis(100), |s| {
        s.converged_at().is_some()
    })?;
    let t = sim.now() + warmup;
    sim.run_until(t)
}

fn scenario_rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(derive_seed(seed, TAG_SCENARIO, 0))
}

fn drive<A: Application>(
    sim: &mut Sim<A>,
    opts: &ScenarioOptions,
    report: &mut Report,
) -> Result<(), Violation> {
    let mut rng = scenario_rng(opts.seed);
    let n = opts.nodes;
    match opts.scenario {
        ScenarioKind::KillOne => {
            form(sim, n, Duration::from_secs(5))?;
            let victim = rng.random_range(0..n);
            let t0 = sim.now();
            let window = open_window(sim);
            sim.schedule(
                t0,
                Action::Crash {
                    slot: victim,
                    measure: true,
                },
            );
            sim.schedule(t0, Action::Quiet);
            let limit = t0 + Duration::from_secs(60);
            sim.run_while(limit, Duration::from_millis(50), |s| {
                s.now() >= t0 + Duration::from_secs(10)
                    && s.settled()
                    && s.detections().first().is_some_and(|d| d.all_s.is_some())
            })?;
            close_window(sim, &window, report);
            report.healthy_lapses = sim.healthy_lapses(t0);
            if let Some(d) = sim.detections().first() {
                report.suspect_first_s = d.first_suspect_s;
                report.detect_first_s = d.first_s;
                report.detect_all_s = d.all_s;
                if d.all_s.is_none() {
                    report.failure = Some(format!(
                        "{} survivors never marked the crashed node failed",
                        d.pending
                    ));
                }
            }
        }
        ScenarioKind::StalledNode => {
            form(sim, n, Duration::from_secs(5))?;
            let slot = rng.random_range(0..n);
            let t0 = sim.now();
            let window = open_window(sim);
            let stall = Duration::from_secs(30);
            let delay = Duration::from_secs(2);
            sim.schedule(
                t0,
                Action::Stall {
                    slot,
                    delay,
                    duration: stall,
                    timers: opts.stall_timers,
                },
            );
            // The backlog drains `delay` after the window closes.
            sim.schedule(t0 + stall + delay, Action::Quiet);
            let end = t0 + stall + delay + Duration::from_secs(30);
            sim.run_until(end)?;
            let limit = end + sim.config().settle_limit;
            sim.run_while(limit, Duration::from_millis(100), |s| s.settled())?;
            close_window(sim, &window, report);
            report.stalled_marked_failed = Some(sim.stalled_marked_failed());
        }
        ScenarioKind::PartitionHeal | ScenarioKind::PartitionMinority | ScenarioKind::Isolated => {
            form(sim, n, Duration::from_secs(5))?;
            let mut order: Vec<u32> = (0..n).collect();
            order.shuffle(&mut rng);
            let cut = match opts.scenario {
                ScenarioKind::PartitionHeal => n / 2,
                ScenarioKind::PartitionMinority => (n.saturating_sub(1) / 2).max(1),
                _ => 1,
            };
            let mut groups = vec![0u32; n as usize];
            let mut cut_off: Vec<u32> = order.iter().copied().take(cut as usize).collect();
            for &slot in &cut_off {
                if let Some(g) = groups.get_mut(slot as usize) {
                    *g = 1;
                }
            }
            let witnesses = witness_slots(sim);
            if sim.config().membership.lease == LeaseStrategy::Witnesses && cut > 1 {
                // The side holding most witnesses keeps its lease, whichever
                // side has more nodes; the other is the one cut off.
                let held = cut_off.iter().filter(|s| witnesses.contains(s)).count();
                if 2 * held > witnesses.len() {
                    cut_off = order.iter().copied().skip(cut as usize).collect();
                }
            } else if 2 * cut == n {
                // An even split: the side holding the oldest process keeps
                // its lease; the other is the one cut off.
                let oldest = (0..n).min_by_key(|&slot| (sim.generation(slot), slot));
                if let Some(oldest) = oldest
                    && cut_off.contains(&oldest)
                {
                    cut_off = order.iter().copied().skip(cut as usize).collect();
                }
            }
            let t0 = sim.now();
            let window = open_window(sim);
            let held = Duration::from_secs(20);
            sim.schedule(t0, Action::Partition { groups });
            sim.schedule(t0 + held, Action::Heal);
            sim.schedule(t0 + held, Action::Quiet);
            sim.run_until(t0 + held)?;
            measure_cut_off(sim, &cut_off, t0, report);
            settle_measuring_standing(sim, t0 + held, report)?;
            report.healthy_lapses = sim.healthy_lapses(t0);
            close_window(sim, &window, report);
        }
        ScenarioKind::Paused => {
            form(sim, n, Duration::from_secs(5))?;
            let slot = rng.random_range(0..n);
            let t0 = sim.now();
            let window = open_window(sim);
            let pause = Duration::from_secs(8);
            sim.schedule(
                t0,
                Action::Pause {
                    slot,
                    duration: pause,
                },
            );
            sim.schedule(t0 + pause, Action::Quiet);
            sim.run_until(t0 + pause)?;
            // Let it wake and read its backlog before judging.
            let woke = t0 + pause + Duration::from_millis(1);
            sim.run_until(woke)?;
            measure_cut_off(sim, &[slot], t0, report);
            settle_measuring_standing(sim, t0 + pause, report)?;
            report.healthy_lapses = sim.healthy_lapses(t0);
            close_window(sim, &window, report);
        }
        ScenarioKind::Churn => {
            form(sim, n, Duration::from_secs(5))?;
            let t0 = sim.now();
            let window = open_window(sim);
            let faults = Duration::from_secs(40);
            for (at, action) in churn_schedule(&mut rng, n, sim.slot_count(), faults) {
                sim.schedule(t0 + at, action);
            }
            sim.schedule(t0 + faults, Action::Quiet);
            sim.run_until(t0 + faults)?;
            let limit = t0 + faults + sim.config().settle_limit;
            sim.run_while(limit, Duration::from_millis(100), |s| s.settled())?;
            close_window(sim, &window, report);
        }
        ScenarioKind::Update => {
            let warmup = if n > 1_000 { 2 } else { 5 };
            form(sim, n, Duration::from_secs(warmup))?;
            let origin = rng.random_range(0..n);
            let t0 = sim.now();
            let window = open_window(sim);
            let metadata = format!("updated by {origin} at {:.3}", t0.as_secs_f64()).into_bytes();
            sim.schedule(
                t0,
                Action::SetMetadata {
                    slot: origin,
                    metadata,
                    measure: true,
                },
            );
            sim.run_while(
                t0 + Duration::from_secs(60),
                Duration::from_millis(10),
                // At least 10 s of traffic after the change, for a steady rate.
                |s| {
                    s.now() >= t0 + Duration::from_secs(10)
                        && s.disseminations()
                            .first()
                            .is_some_and(|d| d.all_s.is_some())
                },
            )?;
            close_window(sim, &window, report);
            if let Some(d) = sim.disseminations().first() {
                report.converge_s = d.threshold_s;
                report.converge_all_s = d.all_s;
                if d.threshold_s.is_none() {
                    report.failure = Some(format!(
                        "the update reached only {} of {} members",
                        d.informed, d.population
                    ));
                }
            }
            // The cluster must still agree on who is live.
            if let Err(why) = sim.check_converged() {
                report.failure.get_or_insert(why);
            }
        }
        ScenarioKind::Random => {
            form(sim, n, Duration::from_secs(2))?;
            let t0 = sim.now();
            let window = open_window(sim);
            let faults = Duration::from_secs(30);
            let schedule = random_schedule(&mut rng, n, sim.slot_count(), faults);
            let last = schedule.iter().map(|(at, _)| *at).max().unwrap_or_default();
            for (at, action) in schedule {
                sim.schedule(t0 + at, action);
            }
            // Stalls end within the window, but a stalled node's backlog
            // drains up to its delay later: faults stop after that.
            let quiet = t0 + last + MAX_STALL_DELAY;
            sim.schedule(quiet, Action::Quiet);
            sim.run_until(quiet)?;
            let limit = quiet + sim.config().settle_limit;
            sim.run_while(limit, Duration::from_millis(100), |s| s.settled())?;
            close_window(sim, &window, report);
        }
    }
    Ok(())
}

/// The slots of the witness set (`LeaseStrategy::Witnesses`) as the first
/// live node holds it (the nodes of a converged cluster hold the same).
fn witness_slots<A: Application>(sim: &Sim<A>) -> Vec<u32> {
    let Some(node) = sim.nodes().find(|n| !n.leaving) else {
        return Vec::new();
    };
    node.membership
        .witnesses()
        .filter_map(|m| m.name.strip_prefix("node-")?.parse().ok())
        .collect()
}

/// Lease measurements about the nodes cut off (or paused) at `t0`: when
/// the last of them lost its lease, when the first takeover of one of them
/// came; and lapses of healthy nodes since `t0`.
fn measure_cut_off<A: Application>(
    sim: &mut Sim<A>,
    cut_off: &[u32],
    t0: Duration,
    report: &mut Report,
) {
    let lost: Vec<Option<Duration>> = cut_off
        .iter()
        .map(|&slot| sim.standing_lost_at(slot, t0))
        .collect();
    report.standing_lost_s = if lost.iter().all(Option::is_some) {
        lost.iter()
            .flatten()
            .max()
            .map(|at| at.saturating_sub(t0).as_secs_f64())
    } else {
        None
    };
    let lease = sim.lease_report();
    report.takeover_first_s = lease
        .first_takeover_s
        .map(|at| at - t0.as_secs_f64())
        .filter(|s| *s >= 0.0);
    report.healthy_lapses = sim.healthy_lapses(t0);
}

/// Runs until the cluster settled after the last fault at `healed`,
/// recording when every live node held a valid lease again.
fn settle_measuring_standing<A: Application>(
    sim: &mut Sim<A>,
    healed: Duration,
    report: &mut Report,
) -> Result<(), Violation> {
    let limit = healed + sim.config().settle_limit;
    let mut regained: Option<Duration> = None;
    sim.run_while(limit, Duration::from_millis(100), |s| {
        if regained.is_none() && s.all_standing() {
            regained = Some(s.now());
        }
        s.settled() && regained.is_some()
    })?;
    report.standing_regained_s = regained.map(|at| at.saturating_sub(healed).as_secs_f64());
    if regained.is_none() && report.failure.is_none() {
        report.failure = Some("some live node never held a valid lease again".into());
    }
    Ok(())
}

/// Joins, leaves, crashes and restarts, about one every second, within
/// `window`, on `initial` started nodes and `slots` slots in all.
pub fn churn_schedule<R: Rng>(
    rng: &mut R,
    initial: u32,
    slots: u32,
    window: Duration,
) -> Vec<(Duration, Action)> {
    let mut out = Vec::new();
    let mut next_new = initial;
    let mut t = Duration::ZERO;
    loop {
        t += Duration::from_millis(rng.random_range(300..1_700));
        if t >= window {
            break;
        }
        let slot = rng.random_range(0..next_new.max(1));
        let action = match rng.random_range(0..4u32) {
            0 if next_new < slots => {
                next_new += 1;
                Action::Start { slot: next_new - 1 }
            }
            0 | 1 => Action::Start { slot },
            2 => Action::Crash {
                slot,
                measure: false,
            },
            _ => Action::Leave { slot },
        };
        out.push((t, action));
    }
    out
}

/// A random fault schedule within `window` over `slots` slots (the first
/// `initial` started): crashes, restarts, joins, graceful leaves, stalls,
/// partitions (always healed by the end of the window), bursts of loss and
/// duplication, metadata changes and garbage packets. Loss, duplication and
/// partitions are reset at the end; stalls end by then too (their backlog
/// drains at most [`MAX_STALL_DELAY`] later).
pub fn random_schedule<R: Rng>(
    rng: &mut R,
    initial: u32,
    slots: u32,
    window: Duration,
) -> Vec<(Duration, Action)> {
    let mut out = Vec::new();
    let mut t = Duration::ZERO;
    let slots = slots.max(1);
    let initial = initial.max(1);
    loop {
        t += Duration::from_millis(rng.random_range(200..2_500));
        if t >= window {
            break;
        }
        let slot = rng.random_range(0..slots);
        let live_slot = rng.random_range(0..initial);
        let action = match rng.random_range(0..100u32) {
            0..15 => Action::Crash {
                slot: live_slot,
                measure: false,
            },
            15..35 => Action::Start { slot },
            35..42 => Action::Leave { slot: live_slot },
            42..52 => {
                let left = window.saturating_sub(t);
                let duration = Duration::from_millis(rng.random_range(500..10_000)).min(left);
                Action::Stall {
                    slot: live_slot,
                    delay: Duration::from_millis(rng.random_range(100..3_000)).min(MAX_STALL_DELAY),
                    duration,
                    timers: rng.random_bool(0.5),
                }
            }
            52..62 => {
                let groups = (0..slots).map(|_| rng.random_range(0..2u32)).collect();
                Action::Partition { groups }
            }
            62..72 => Action::Heal,
            72..82 => Action::SetLoss(rng.random_range(0.0..0.3)),
            82..87 => Action::SetDuplicate(rng.random_range(0.0..0.2)),
            87..95 => Action::SetMetadata {
                slot: live_slot,
                metadata: vec![rng.random(); rng.random_range(0..64)],
                measure: false,
            },
            _ => Action::Garbage {
                slot: live_slot,
                len: rng.random_range(0..1_500),
            },
        };
        out.push((t, action));
    }
    out.push((window, Action::Heal));
    out.push((window, Action::SetLoss(0.0)));
    out.push((window, Action::SetDuplicate(0.0)));
    out
}
