//! Named scenarios, random fault schedules and the report they produce:
//! the options and the run here; the report ([`Report`]), the drivers of
//! the scenarios and the fault schedules in modules of their own.

mod drivers;
mod report;
mod schedule;

use std::fmt;
use std::time::{Duration, Instant};

use serde::Serialize;
use shoal_membership::Config;

use self::drivers::drive;
use self::report::empty_report;
pub use self::report::{Report, failed_report};
pub use self::schedule::{MAX_STALL_DELAY, churn_schedule, random_schedule};
use crate::app::Application;
use crate::sim::{Sim, SimConfig};
use crate::util::peak_rss_bytes;

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
