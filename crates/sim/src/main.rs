//! `shoal-sim`: runs a simulated cluster scenario on a virtual clock and
//! network and prints its report (`cargo xtask sim --virtual ...`).
//!
//! Exit status: 0 when every run kept its invariants and reached its
//! protocol outcome, 1 otherwise, 2 on bad arguments.

use std::process::ExitCode;

use clap::Parser;
use clap::ValueEnum;
use shoal_placement::Strategy;
use shoal_sim::scenario::{self, Report};
use shoal_sim::transition_app::{self, TransitionOptions, TransitionReport, TransitionScenario};
use shoal_sim::{Profile, ScenarioKind, ScenarioOptions, run_seeds};

/// Which layers the simulated nodes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum AppKind {
    /// Membership alone.
    Membership,
    /// The transition layer (relinquish / notice / acquire) on top of
    /// membership, with datums and work.
    Transition,
}

/// Deterministic simulator of a shoal cluster (membership on a virtual
/// clock and network). With no arguments: kill-one at 16 nodes, seed 1.
#[derive(Parser, Debug)]
#[command(name = "shoal-sim", version)]
struct Cli {
    /// Accepted for `cargo xtask sim --virtual`; the simulator is always
    /// virtual.
    #[arg(long = "virtual", hide = true)]
    virtual_net: bool,
    /// Layers to simulate.
    #[arg(long, value_enum, default_value_t = AppKind::Membership)]
    app: AppKind,
    /// Scenario to run. Membership: kill-one (default), stalled-node,
    /// partition-heal, partition-minority, isolated, paused, churn, update,
    /// random. Transition: join (default), leave, kill-owner, chained,
    /// flap, join-leave-kill, and with leases partition, one-way, pause,
    /// link-flap.
    #[arg(long)]
    scenario: Option<String>,
    /// Number of nodes (membership: 16 by default, bootstrapped above 64;
    /// transition: 6 by default).
    #[arg(long)]
    nodes: Option<u32>,
    /// Transition: number of datums.
    #[arg(long, default_value_t = 1_000)]
    datums: u32,
    /// Transition: rendezvous placement (256 partitions) instead of mod-N.
    #[arg(long)]
    rendezvous: bool,
    /// Seed of the run (or of the first run of a campaign).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Loss probability of membership datagrams, 0..=1 (membership: 0 by
    /// default; transition: the loss during `flap`, 0.1 by default, and
    /// during the whole run with leases, 0.05 by default).
    #[arg(long)]
    loss: Option<f64>,
    /// Duplication probability of membership datagrams, 0..=1.
    #[arg(long, default_value_t = 0.0)]
    duplicate: f64,
    /// Membership timing profile.
    #[arg(long, value_enum, default_value_t = Profile::Lan)]
    profile: Profile,
    /// stalled-node: delay the stalled node's timers too (by default only its
    /// packets wait).
    #[arg(long)]
    stall_timers: bool,
    /// Membership's lease period in milliseconds, when not the profile's
    /// (the takeover delay follows it).
    #[arg(long)]
    lease_period_ms: Option<u64>,
    /// Run this many seeds (seed, seed+1, ...) and summarise.
    #[arg(long)]
    campaign: Option<u64>,
    /// Worker threads for a campaign.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// One JSON object per line instead of a readable report.
    #[arg(long)]
    json: bool,
    /// `cargo bench` style flag; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    for (name, p) in [
        ("--loss", cli.loss.unwrap_or(0.0)),
        ("--duplicate", cli.duplicate),
    ] {
        if !(0.0..=1.0).contains(&p) {
            eprintln!("shoal-sim: {name} must be within 0..=1, got {p}");
            return ExitCode::from(2);
        }
    }
    if cli.nodes == Some(0) {
        eprintln!("shoal-sim: --nodes must be at least 1");
        return ExitCode::from(2);
    }
    if cli.app == AppKind::Transition {
        return transition_main(&cli);
    }
    let scenario = match cli.scenario.as_deref() {
        None => ScenarioKind::KillOne,
        Some(name) => match ScenarioKind::from_str(name, true) {
            Ok(kind) => kind,
            Err(_) => {
                eprintln!("shoal-sim: unknown membership scenario {name:?}");
                return ExitCode::from(2);
            }
        },
    };
    let base = ScenarioOptions {
        scenario,
        nodes: cli.nodes.unwrap_or(16),
        seed: cli.seed,
        loss: cli.loss.unwrap_or(0.0),
        duplicate: cli.duplicate,
        profile: cli.profile,
        stall_timers: cli.stall_timers,
        lease_period: cli.lease_period_ms.map(std::time::Duration::from_millis),
    };
    let reports = match cli.campaign {
        None => vec![scenario::run(&base)],
        Some(runs) => campaign(&base, runs, cli.jobs.max(1)),
    };
    emit_reports(&cli, &reports, |r| r.ok, print_summary)
}

/// `--app transition`: runs the transition scenario (or a campaign of
/// seeds) and prints one report per run.
fn transition_main(cli: &Cli) -> ExitCode {
    let scenario = match cli.scenario.as_deref() {
        None => TransitionScenario::Join,
        Some(name) => match TransitionScenario::from_str(name, true) {
            Ok(kind) => kind,
            Err(_) => {
                eprintln!("shoal-sim: unknown transition scenario {name:?}");
                return ExitCode::from(2);
            }
        },
    };
    let mut base = TransitionOptions::new(scenario, cli.nodes.unwrap_or(6), cli.seed, cli.datums);
    if let Some(loss) = cli.loss {
        base.loss = loss;
    }
    if cli.rendezvous {
        base.strategy = Strategy::Rendezvous { partitions: 256 };
    }
    let runs = cli.campaign.unwrap_or(1);
    let reports = run_seeds(runs, cli.jobs.max(1), |i| {
        let opts = TransitionOptions {
            seed: base.seed.wrapping_add(i),
            ..base.clone()
        };
        match std::panic::catch_unwind(|| transition_app::run(&opts)) {
            Ok(report) => report,
            Err(panic) => {
                let mut report = transition_app::failed_report(&opts, panic_message(&*panic));
                report.invariant_violations = 1;
                report
            }
        }
    });
    emit_reports(cli, &reports, |r| r.ok, print_transition_summary)
}

fn print_transition_summary(reports: &[TransitionReport]) {
    let failed: Vec<u64> = reports.iter().filter(|r| !r.ok).map(|r| r.seed).collect();
    println!(
        "campaign: {} runs, {} failed{}",
        reports.len(),
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" (seeds {failed:?})")
        }
    );
    let sum = |f: fn(&TransitionReport) -> u64| -> u64 { reports.iter().map(f).sum() };
    let max_transition = reports
        .iter()
        .map(|r| r.stats.max_transition_s)
        .fold(0.0, f64::max);
    println!(
        "  moved {}  relinquished {}  acquired {}  failovers {}  all_done {}  timeouts {}  max_transition_s {:.3}",
        sum(|r| r.stats.moved),
        sum(|r| r.stats.relinquished),
        sum(|r| r.stats.acquired),
        sum(|r| r.stats.failovers),
        sum(|r| r.stats.all_done),
        sum(|r| r.stats.timeouts),
        max_transition
    );
    if reports.iter().any(|r| r.recover_bound_s.is_some()) {
        let max_recovered = reports
            .iter()
            .filter(|r| r.ok)
            .map(|r| r.stats.recovered_s)
            .fold(0.0, f64::max);
        let mut recovered: Vec<f64> = reports
            .iter()
            .filter(|r| r.ok)
            .map(|r| r.stats.recovered_s)
            .collect();
        recovered.sort_by(f64::total_cmp);
        let p = |q: f64| {
            let i = ((recovered.len() as f64 * q).ceil() as usize).saturating_sub(1);
            recovered.get(i).copied().unwrap_or(0.0)
        };
        println!(
            "  stopped early (invariant broken while running) {}  rebirths {}  recovered_s p50 {:.2} p99 {:.2} max {:.2} (bound {:.2})",
            sum(|r| r.stopped_early),
            sum(|r| r.stats.rebirths),
            p(0.5),
            p(0.99),
            max_recovered,
            reports
                .iter()
                .filter_map(|r| r.recover_bound_s)
                .fold(0.0, f64::max)
        );
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "unknown panic".to_string())
}

/// Runs `runs` seeds on `jobs` threads; reports come back in seed order.
fn campaign(base: &ScenarioOptions, runs: u64, jobs: usize) -> Vec<Report> {
    run_seeds(runs, jobs, |i| {
        let opts = ScenarioOptions {
            seed: base.seed.wrapping_add(i),
            ..base.clone()
        };
        run_catching_panics(&opts)
    })
}

/// Runs one seed; a panic (in the simulator or a layer under test) becomes a
/// failed report naming the seed instead of ending the campaign.
fn run_catching_panics(opts: &ScenarioOptions) -> Report {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario::run(opts))) {
        Ok(report) => report,
        Err(panic) => {
            let what = panic_message(&*panic);
            let mut report =
                scenario::failed_report(opts, format!("panicked (seed {}): {what}", opts.seed));
            report.invariant_violations = 1;
            report
        }
    }
}

fn print_summary(reports: &[Report]) {
    let failed: Vec<u64> = reports.iter().filter(|r| !r.ok).map(|r| r.seed).collect();
    let pct = |mut v: Vec<f64>, q: f64| -> String {
        if v.is_empty() {
            return "-".into();
        }
        v.sort_by(f64::total_cmp);
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v.get(i).map_or_else(|| "-".into(), |x| format!("{x:.3}"))
    };
    let col =
        |f: fn(&Report) -> Option<f64>| -> Vec<f64> { reports.iter().filter_map(f).collect() };
    println!(
        "campaign: {} runs, {} failed{}",
        reports.len(),
        failed.len(),
        if failed.is_empty() {
            String::new()
        } else {
            format!(" (seeds {failed:?})")
        }
    );
    for (name, f) in [
        (
            "detect_all_s",
            (|r: &Report| r.detect_all_s) as fn(&Report) -> Option<f64>,
        ),
        ("settle_s", |r: &Report| r.settle_s),
        ("converge_s", |r: &Report| r.converge_s),
        ("bytes_per_node_per_s", |r: &Report| r.bytes_per_node_per_s),
        ("wall_s", |r: &Report| Some(r.wall_s)),
    ] {
        let v = col(f);
        if !v.is_empty() {
            println!(
                "  {name:<22} p50 {}  p99 {}  max {}",
                pct(v.clone(), 0.5),
                pct(v.clone(), 0.99),
                pct(v, 1.0)
            );
        }
    }
    let fp: u64 = reports.iter().filter_map(|r| r.false_positives).sum();
    let with_fp = reports
        .iter()
        .filter(|r| r.false_positives.unwrap_or(0) > 0)
        .count();
    let rediverged = reports.iter().filter(|r| r.rediverged > 0).count();
    println!("  false positives        {fp} in all, in {with_fp} runs");
    println!("  runs that diverged again after settling: {rediverged}");
}

/// Prints the reports of one run or a campaign (JSON lines, or readable text
/// for single runs and failed campaign runs, then a campaign summary) and
/// turns them into the exit status: success only when every run is ok.
fn emit_reports<R: serde::Serialize + std::fmt::Display>(
    cli: &Cli,
    reports: &[R],
    ok: impl Fn(&R) -> bool,
    summary: fn(&[R]),
) -> ExitCode {
    for r in reports {
        if cli.json {
            match serde_json::to_string(r) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("shoal-sim: cannot encode the report: {e}"),
            }
        } else if cli.campaign.is_none() || !ok(r) {
            println!("{r}");
        }
    }
    if cli.campaign.is_some() && !cli.json {
        summary(reports);
    }
    if reports.iter().all(ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
