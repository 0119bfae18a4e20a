//! Deterministic multi-node simulation of the handoff, each node a
//! `shoal_core::NodeCore` under a fake membership: every scenario over many
//! seeds, invariants checked at every step (see `shoal_sim::harness`).
//! `SHOAL_TRANSITION_SEEDS=n` runs n seeds per scenario (default 150).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_sim::harness::{HarnessConfig, SCENARIOS, run_scenario, run_scenario_with};

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
    assert_eq!(SCENARIOS.len(), 11);
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
fn concurrent_ready() {
    run("concurrent-ready");
}

/// The check behind `concurrent_ready` can fail: when the views name only
/// the ready members (the core then does not know the live peers that are
/// not ready yet), nodes that become ready together each acquire every
/// datum.
#[test]
fn concurrent_ready_without_peers_gives_two_first_owners() {
    let caught = (0..10).any(|seed| {
        let mut cfg = HarnessConfig::new(seed);
        cfg.peers = false;
        run_scenario_with("concurrent-ready", cfg)
            .iter()
            .any(|v| v.contains("acquires datum") && v.contains("hold it"))
    });
    assert!(caught, "two first owners went unnoticed");
}

#[test]
fn false_positive() {
    run("false-positive");
}

#[test]
fn chaos() {
    run("chaos");
}

/// Chaos where a tenth of the batches that arrive are reported failed to
/// their sender all the same: a notice re-sent after such a false failure
/// goes to the same node, which refuses it once it took the first copy.
#[test]
fn lost_ack() {
    run("lost-ack");
}

#[test]
fn stress() {
    run("stress");
}

/// Joins, graceful leaves and crashes in random order, close together (a
/// leave then a crash within the timeout among them): every datum a crashed
/// node held is acquired again within the detection delay, the install skew
/// and `FAILOVER_MARGIN` (1.6 s, below the 2 s timeout), not at the timeout.
/// Without the leaver's farewell done marker, most seeds with a leave before
/// a crash wait the timeout.
#[test]
fn join_leave_kill() {
    run("join-leave-kill");
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
    let v = shoal_sim::harness::run_scenario_traced(
        name,
        seed.parse().unwrap(),
        Some(datum.parse().unwrap()),
    );
    for line in &v {
        eprintln!("violation: {line}");
    }
}

/// A crashed owner's datums are taken over by failover (owner gone, after
/// one round of done markers), not by waiting out the timeout.
#[test]
fn kill_owner_fails_over_without_waiting_for_the_timeout() {
    use shoal_sim::harness::{Harness, HarnessConfig};
    use std::time::Duration;
    for seed in 0..20 {
        let mut cfg = HarnessConfig::new(seed);
        cfg.job_failure = 0.0;
        let timeout = cfg.handoff.timeout;
        let mut sim = Harness::new(cfg, 4);
        sim.run_for(Duration::from_secs(1));
        let victim = sim.random_member().unwrap();
        sim.kill(victim);
        // Detection takes at most 0.8 s and installs 0.3 s more: well
        // before the 2 s timeout, every survivor holds its share again.
        sim.run_for(Duration::from_millis(1_500));
        let survivors: Vec<usize> = (0..sim.node_count()).filter(|&n| n != victim).collect();
        let held: usize = survivors
            .iter()
            .map(|&n| sim.handoff(n).unwrap().progress().held)
            .sum();
        assert_eq!(
            held, 120,
            "seed {seed}: all datums held again before the timeout"
        );
        let timeouts: u64 = survivors
            .iter()
            .map(|&n| sim.handoff(n).unwrap().counters().acquired_after_timeout)
            .sum();
        let failovers: u64 = survivors
            .iter()
            .map(|&n| sim.handoff(n).unwrap().counters().acquired_owner_gone)
            .sum();
        assert_eq!(timeouts, 0, "seed {seed}");
        assert!(failovers > 0, "seed {seed}");
        let v = sim.settle(timeout * 4);
        assert!(v.is_empty(), "seed {seed}: {v:?}");
    }
}
