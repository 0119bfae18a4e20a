//! A simulation campaign sized for CI: hundreds of seeds of small clusters
//! (5 to 8 nodes) under random fault schedules (crashes, restarts, joins,
//! leaves, stalls, partitions, loss and duplication bursts, garbage), each
//! checked for every invariant and for convergence once the faults stop.
//!
//! `SHOAL_SIM_SEEDS=N` runs N seeds per test instead (longer campaigns:
//! `cargo xtask sim --virtual --scenario random --campaign N`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_sim::scenario;
use shoal_sim::{ScenarioKind, ScenarioOptions};

fn seeds() -> u64 {
    std::env::var("SHOAL_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

/// Runs `seeds()` seeds from `first`, returning the reports that failed.
fn campaign(kind: ScenarioKind, first: u64, loss: f64) -> Vec<String> {
    let mut failed = Vec::new();
    let mut settled = 0;
    for seed in first..first + seeds() {
        let nodes = 5 + (seed % 4) as u32;
        let opts = ScenarioOptions {
            loss,
            ..ScenarioOptions::new(kind, nodes, seed)
        };
        let r = scenario::run(&opts);
        if r.settle_s.is_some() {
            settled += 1;
        }
        if !r.ok {
            failed.push(r.to_string());
        }
    }
    assert!(
        settled > 0,
        "no run ever settled: the check cannot have run"
    );
    failed
}

#[test]
fn random_faults_keep_every_invariant() {
    let failed = campaign(ScenarioKind::Random, 10_000, 0.0);
    assert!(
        failed.is_empty(),
        "{} runs failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn random_faults_on_a_lossy_network_keep_every_invariant() {
    let failed = campaign(ScenarioKind::Random, 20_000, 0.05);
    assert!(
        failed.is_empty(),
        "{} runs failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn churn_keeps_every_invariant() {
    let failed = campaign(ScenarioKind::Churn, 30_000, 0.0);
    assert!(
        failed.is_empty(),
        "{} runs failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
