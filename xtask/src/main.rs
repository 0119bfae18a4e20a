//! `cargo xtask`: the project's automation.
//!
//! - `cargo xtask bench <layer> [--json]` runs a layer's benchmark in release
//!   mode. Each benchmark is a `harness = false` bench target of its crate
//!   that prints one JSON object per line with `--json`, a readable table
//!   without.
//! - `cargo xtask sim [--nodes N --scenario S --json ...]` builds the demo
//!   service (`shoal-demo`) in release and runs a cluster of real node
//!   processes on loopback through a scenario, printing progress, events and
//!   a verdict, and writing an SVG timeline under `target/sim/`.
//! - `cargo xtask sim --virtual [...]` runs the deterministic simulator
//!   (`shoal-sim`) on a virtual clock and network.
//!
//! - `cargo xtask fuzz --seconds N [--target T]` runs every cargo-fuzz
//!   target (`crates/*/fuzz`) for N seconds on the stable toolchain and
//!   prints executions, coverage and crashes per target (`fuzz.rs`).
//!
//! xtask itself stays light (it only spawns `cargo`), so `cargo xtask` starts
//! quickly; the heavy work is compiled in release by the commands it runs.

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

mod fuzz;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "shoal's project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a layer's benchmark in release mode and print its report.
    Bench {
        /// Which benchmark: one of the layers that has one.
        #[arg(value_parser = BENCHES.iter().map(|(name, _)| *name).collect::<Vec<_>>())]
        layer: String,
        /// One JSON object per line instead of a readable table.
        #[arg(long)]
        json: bool,
        /// Extra arguments passed to the benchmark binary.
        #[arg(last = true)]
        rest: Vec<String>,
    },
    /// Run every fuzz target for a while; print executions and coverage.
    Fuzz(fuzz::FuzzArgs),
    /// Run a simulated cluster.
    Sim {
        /// Run the sans-IO layers on a virtual clock and network (shoal-sim).
        #[arg(long = "virtual")]
        virtual_net: bool,
        /// Arguments for the simulator: without `--virtual`, the real-process
        /// driver (`--nodes`, `--series`, `--rate`, `--duration`, `--scenario`,
        /// `--store`, `--seed`, `--json`, `--fault-s`, `--flaps`; `cargo run -p shoal-demo -- sim --help` lists
        /// them); with it, the simulator (`cargo xtask sim --virtual -- --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        rest: Vec<String>,
    },
}

/// (benchmark name, package that holds the bench target of the same name).
const BENCHES: &[(&str, &str)] = &[
    ("placement", "shoal-placement"),
    ("membership", "shoal-membership"),
    ("transport", "shoal-transport"),
    ("transition", "shoal-transition"),
    ("cluster", "shoal"),
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Bench { layer, json, rest } => {
            let Some((name, package)) = BENCHES.iter().find(|(name, _)| *name == layer) else {
                eprintln!("xtask: no benchmark named {layer}");
                return ExitCode::FAILURE;
            };
            let mut cmd = cargo();
            cmd.args([
                "bench",
                "--quiet",
                "--package",
                package,
                "--bench",
                name,
                "--",
            ]);
            if json {
                cmd.arg("--json");
            }
            cmd.args(rest);
            run(cmd)
        }
        Cmd::Fuzz(args) => fuzz::run(&args),
        Cmd::Sim { virtual_net, rest } => {
            let mut cmd = cargo();
            if virtual_net {
                cmd.args([
                    "run",
                    "--quiet",
                    "--release",
                    "--package",
                    "shoal-sim",
                    "--",
                ]);
            } else {
                // Real processes: the demo binary is both the node and the
                // driver (crates/demo); its files go under target/sim/.
                let work_dir = target_dir().join("sim");
                cmd.args([
                    "run",
                    "--quiet",
                    "--release",
                    "--package",
                    "shoal-demo",
                    "--",
                    "sim",
                ]);
                cmd.arg("--work-dir").arg(work_dir);
            }
            cmd.args(rest);
            run(cmd)
        }
    }
}

/// The cargo target directory (`CARGO_TARGET_DIR`, else `<workspace>/target`).
fn target_dir() -> std::path::PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => dir.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target"),
    }
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run(mut cmd: Command) -> ExitCode {
    match cmd.status() {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("xtask: {cmd:?} exited with {status}");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("xtask: could not run {cmd:?}: {err}");
            ExitCode::FAILURE
        }
    }
}
