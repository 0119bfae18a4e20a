//! `shoal-sim`: runs a simulated cluster scenario on a virtual clock and
//! network and prints its report (`cargo xtask sim --virtual ...`).
//!
//! Exit status: 0 when every run kept its invariants and reached its
//! protocol outcome, 1 otherwise, 2 on bad arguments.

use std::process::ExitCode;

use clap::Parser;
use shoal_sim::scenario::{self, Report};
use shoal_sim::{Profile, ScenarioKind, ScenarioOptions};

/// Deterministic simulator of a shoal cluster (membership on a virtual
/// clock and network). With no arguments: kill-one at 16 nodes, seed 1.
#[derive(Parser, Debug)]
#[command(name = "shoal-sim", version)]
struct Cli {
    /// Accepted for `cargo xtask sim --virtual`; the simulator is always
    /// virtual.
    #[arg(long = "virtual", hide = true)]
    virtual_net: bool,
    /// Scenario to run.
    #[arg(long, value_enum, default_value_t = ScenarioKind::KillOne)]
    scenario: ScenarioKind,
    /// Number of nodes (bootstrapped above 64, formed by joins below).
    #[arg(long, default_value_t = 16)]
    nodes: u32,
    /// Seed of the run (or of the first run of a campaign).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Loss probability of membership datagrams, 0..=1.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
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
    for (name, p) in [("--loss", cli.loss), ("--duplicate", cli.duplicate)] {
        if !(0.0..=1.0).contains(&p) {
            eprintln!("shoal-sim: {name} must be within 0..=1, got {p}");
            return ExitCode::from(2);
        }
    }
    if cli.nodes == 0 {
        eprintln!("shoal-sim: --nodes must be at least 1");
        return ExitCode::from(2);
    }
    let base = ScenarioOptions {
        scenario: cli.scenario,
        nodes: cli.nodes,
        seed: cli.seed,
        loss: cli.loss,
        duplicate: cli.duplicate,
        profile: cli.profile,
        stall_timers: cli.stall_timers,
    };
    let reports = match cli.campaign {
        None => vec![scenario::run(&base)],
        Some(runs) => campaign(&base, runs, cli.jobs.max(1)),
    };
    for r in &reports {
        if cli.json {
            match serde_json::to_string(r) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("shoal-sim: cannot encode the report: {e}"),
            }
        } else if cli.campaign.is_none() || !r.ok {
            println!("{r}");
        }
    }
    if cli.campaign.is_some() && !cli.json {
        print_summary(&reports);
    }
    if reports.iter().all(|r| r.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `runs` seeds on `jobs` threads; reports come back in seed order.
fn campaign(base: &ScenarioOptions, runs: u64, jobs: usize) -> Vec<Report> {
    let next = std::sync::atomic::AtomicU64::new(0);
    let mut reports: Vec<Report> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= runs {
                            break;
                        }
                        let opts = ScenarioOptions {
                            seed: base.seed.wrapping_add(i),
                            ..base.clone()
                        };
                        mine.push(run_catching_panics(&opts));
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| {
                // Runs catch their own panics, so a worker cannot die; if
                // one did, say so rather than lose its seeds silently.
                w.join().unwrap_or_else(|_| {
                    eprintln!("shoal-sim: a campaign worker died; its runs are missing");
                    std::process::exit(1)
                })
            })
            .collect()
    });
    reports.sort_by_key(|r| r.seed.wrapping_sub(base.seed));
    reports
}

/// Runs one seed; a panic (in the simulator or a layer under test) becomes a
/// failed report naming the seed instead of ending the campaign.
fn run_catching_panics(opts: &ScenarioOptions) -> Report {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario::run(opts))) {
        Ok(report) => report,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
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
