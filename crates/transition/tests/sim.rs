//! Deterministic multi-node simulation of the handoff: every scenario over
//! many seeds, invariants checked at every step (see `testkit`).
//! `SHOAL_TRANSITION_SEEDS=n` runs n seeds per scenario (default 150).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_transition::testkit::{SCENARIOS, run_scenario};

fn seeds() -> u64 {
    std::env::var("SHOAL_TRANSITION_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150)
}

fn run(name: &str) {
    let mut failures = Vec::new();
    for seed in 0..seeds() {
        let v = run_scenario(name, seed);
        if !v.is_empty() {
            failures.push(format!(
                "{name} seed {seed}: {} violation(s), first: {}",
                v.len(),
                v.iter().take(5).cloned().collect::<Vec<_>>().join(" | ")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn scenario_names_are_known() {
    assert_eq!(SCENARIOS.len(), 6);
    assert!(!run_scenario("no-such", 0).is_empty());
}

#[test]
fn join() {
    run("join");
}

#[test]
fn leave() {
    run("leave");
}

#[test]
fn kill_owner() {
    run("kill-owner");
}

#[test]
fn chained() {
    run("chained");
}

#[test]
fn flap() {
    run("flap");
}

#[test]
fn false_positive() {
    run("false-positive");
}

#[test]
fn same_seed_same_run() {
    for name in SCENARIOS {
        assert_eq!(run_scenario(name, 7), run_scenario(name, 7));
    }
}

/// `SHOAL_TRANSITION_TRACE=scenario:seed:datum` replays one run and prints
/// everything that happens to one datum.
#[test]
fn trace_one_run() {
    let Ok(spec) = std::env::var("SHOAL_TRANSITION_TRACE") else {
        return;
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let [name, seed, datum] = parts[..] else {
        panic!("SHOAL_TRANSITION_TRACE=scenario:seed:datum");
    };
    let v = shoal_transition::testkit::run_scenario_traced(
        name,
        seed.parse().unwrap(),
        Some(datum.parse().unwrap()),
    );
    for line in &v {
        eprintln!("violation: {line}");
    }
}
