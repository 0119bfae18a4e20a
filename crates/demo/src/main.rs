//! `shoal-demo`: a demo node (`shoal-demo node ...`) or the scenario driver
//! (`shoal-demo sim ...`, what `cargo xtask sim` runs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use shoal_demo::driver::{self, Scenario, ScenarioConfig};
use shoal_demo::service::{self, DemoNodeConfig};

#[derive(Parser)]
#[command(
    name = "shoal-demo",
    about = "shoal's demo time-series service and its cluster driver"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum TimingArg {
    Lan,
    Wan,
    Local,
}

impl From<TimingArg> for shoal::Timing {
    fn from(t: TimingArg) -> Self {
        match t {
            TimingArg::Lan => shoal::Timing::Lan,
            TimingArg::Wan => shoal::Timing::Wan,
            TimingArg::Local => shoal::Timing::Local,
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node; commands on stdin, JSON events on stdout.
    Node {
        /// A JSON configuration file (fields as the flags); flags are then ignored.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Node name (the certificate's name).
        #[arg(long, default_value = "")]
        name: String,
        /// UDP address to bind.
        #[arg(long, default_value = "127.0.0.1:0")]
        bind: SocketAddr,
        /// Address the others reach this node at (needed with a wildcard bind).
        #[arg(long)]
        advertise: Option<SocketAddr>,
        /// Directory with ca.crt, node.crt, node.key (PEM).
        #[arg(long, default_value = ".")]
        tls_dir: PathBuf,
        /// Members to join through, comma separated.
        #[arg(long, value_delimiter = ',')]
        seeds: Vec<SocketAddr>,
        /// Store: sqlite:<path> (or a path).
        #[arg(long, default_value = "sqlite:shoal-demo.db")]
        store: String,
        /// Series ids are 0..series.
        #[arg(long, default_value_t = 64)]
        series: u32,
        /// Flush interval, milliseconds.
        #[arg(long, default_value_t = 500)]
        flush_ms: u64,
        /// Membership timing profile.
        #[arg(long, value_enum, default_value = "lan")]
        timing: TimingArg,
    },
    /// Make a cluster CA in DIR/ca and a certificate per name in DIR/<name>
    /// (for running nodes by hand, e.g. across machines).
    Certs {
        /// Output directory.
        #[arg(long)]
        dir: PathBuf,
        /// Node names, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        names: Vec<String>,
    },
    /// Run a scenario with real node processes on loopback.
    Sim {
        /// Nodes at the start.
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Series (datums).
        #[arg(long, default_value_t = 64)]
        series: u32,
        /// Points per second, all nodes together.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Seconds of load, spread between the scenario's steps.
        #[arg(long, default_value_t = 20)]
        duration: u64,
        /// default, join, leave, kill, churn, partition, pause or flap.
        #[arg(long, default_value = "default")]
        scenario: String,
        /// sqlite (a fresh file under the work dir) or sqlite:<path>.
        #[arg(long, default_value = "sqlite")]
        store: String,
        /// Seed of the driver's choices.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Membership timing profile of the nodes.
        #[arg(long, value_enum, default_value = "lan")]
        timing: TimingArg,
        /// Flush interval of the nodes, milliseconds.
        #[arg(long, default_value_t = 500)]
        flush_ms: u64,
        /// Where certificates, the store, logs and the picture go.
        #[arg(long, default_value = "target/sim")]
        work_dir: PathBuf,
        /// Fault duration, seconds: the cut of `partition` (10), the freeze
        /// of `pause` (8), each down and up phase of `flap` (1.5).
        #[arg(long)]
        fault_s: Option<f64>,
        /// Down-up cycles of `flap`.
        #[arg(long, default_value_t = 5)]
        flaps: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Node {
            config,
            name,
            bind,
            advertise,
            tls_dir,
            seeds,
            store,
            series,
            flush_ms,
            timing,
        } => {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .init();
            let config = match config {
                Some(path) => match std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|s| {
                        serde_json::from_str::<DemoNodeConfig>(&s).map_err(|e| e.to_string())
                    }) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("shoal-demo: {}: {e}", path.display());
                        return ExitCode::FAILURE;
                    }
                },
                None => DemoNodeConfig {
                    name,
                    bind,
                    advertise,
                    tls_dir,
                    seeds,
                    store,
                    flush_ms,
                    series,
                    timing: timing.into(),
                },
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("shoal-demo: runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = runtime.block_on(service::run_node(config));
            runtime.shutdown_timeout(Duration::from_secs(1));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("shoal-demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Certs { dir, names } => match make_certs(&dir, &names) {
            Ok(()) => {
                println!(
                    "CA in {}, certificates in {}/<name>",
                    dir.join("ca").display(),
                    dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("shoal-demo: {e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Sim {
            nodes,
            series,
            rate,
            duration,
            scenario,
            store,
            seed,
            json,
            timing,
            flush_ms,
            work_dir,
            fault_s,
            flaps,
        } => {
            let Some(scenario) = Scenario::parse(&scenario) else {
                eprintln!(
                    "shoal-demo: unknown scenario {scenario:?} (default, join, leave, kill, churn, partition, pause, flap)"
                );
                return ExitCode::FAILURE;
            };
            let bin = match std::env::current_exe() {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("shoal-demo: cannot find my own binary: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut cfg = ScenarioConfig::new(bin, work_dir);
            cfg.nodes = nodes.max(1);
            cfg.series = series.max(1);
            cfg.rate = rate;
            cfg.duration = Duration::from_secs(duration);
            cfg.scenario = scenario;
            cfg.store = (store != "sqlite").then_some(store);
            cfg.seed = seed;
            cfg.json = json;
            cfg.timing = timing.into();
            cfg.flush_ms = flush_ms;
            cfg.fault = match fault_s.map(Duration::try_from_secs_f64) {
                None => None,
                Some(Ok(d)) if !d.is_zero() => Some(d),
                Some(_) => {
                    eprintln!("shoal-demo: --fault-s must be a positive number of seconds");
                    return ExitCode::FAILURE;
                }
            };
            cfg.flaps = flaps.max(1);
            let mut out = std::io::stdout();
            match driver::run(cfg, &mut out) {
                Ok(summary) => {
                    if json {
                        match serde_json::to_string(&summary) {
                            Ok(line) => println!("{line}"),
                            Err(e) => eprintln!("shoal-demo: {e}"),
                        }
                    } else if let Err(e) = driver::print_summary(&summary, &mut out) {
                        eprintln!("shoal-demo: {e}");
                    }
                    if summary.ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("shoal-demo: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn make_certs(dir: &std::path::Path, names: &[String]) -> Result<(), shoal_transport::TrustError> {
    let ca_dir = dir.join("ca");
    let ca = match shoal_transport::ClusterCa::read_pem_files(&ca_dir) {
        Ok(ca) => ca,
        Err(_) => {
            let ca = shoal_transport::ClusterCa::generate()?;
            ca.write_pem_files(&ca_dir)?;
            ca
        }
    };
    for name in names {
        let node = shoal_transport::NodeName::new(name)?;
        ca.issue(&node)?.write_pem_files(&dir.join(name))?;
    }
    Ok(())
}
