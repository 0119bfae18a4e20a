//! The transition layer driven by real membership events in the simulator:
//! join, leave, kill-owner, chained, flap (under loss) and join-leave-kill,
//! over many seeds, with the ownership, ordering, work and termination
//! invariants checked at every step and once the run settled.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_placement::Strategy;
use shoal_sim::transition_app::{self, TransitionOptions, TransitionReport, TransitionScenario};

/// Seeds per scenario in `cargo test`; `SHOAL_SIM_TRANSITION_SEEDS=n` for more.
fn seeds() -> u64 {
    std::env::var("SHOAL_SIM_TRANSITION_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEEDS)
}

const DEFAULT_SEEDS: u64 = 100;

/// Options of seed `seed`: 4 to 8 nodes, 100 to 2,000 datums, rendezvous on
/// every third seed.
fn options(scenario: TransitionScenario, seed: u64) -> TransitionOptions {
    let nodes = 4 + (seed % 5) as u32;
    let datums = [100, 500, 2_000][(seed % 3) as usize];
    let mut opts = TransitionOptions::new(scenario, nodes, seed, datums);
    if seed % 3 == 2 {
        opts.strategy = Strategy::Rendezvous { partitions: 256 };
    }
    opts
}

fn campaign(scenario: TransitionScenario) -> Vec<TransitionReport> {
    let reports = shoal_sim::run_seeds(seeds(), 2, |i| {
        transition_app::run(&options(scenario, i + 1))
    });
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.ok)
        .map(ToString::to_string)
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
    reports
}

#[test]
fn join() {
    let reports = campaign(TransitionScenario::Join);
    for r in &reports {
        assert!(r.stats.moved > 0, "{r}");
    }
}

#[test]
fn leave() {
    campaign(TransitionScenario::Leave);
}

#[test]
fn kill_owner() {
    let reports = campaign(TransitionScenario::KillOwner);
    for r in &reports {
        assert!(r.stats.failovers > 0, "{r}");
    }
}

#[test]
fn chained() {
    campaign(TransitionScenario::Chained);
}

#[test]
fn flap() {
    campaign(TransitionScenario::Flap);
}

/// Join, graceful leave (as the facade's) and crash in random order, 0.2 to
/// 3 s apart: every datum the crashed node held is acquired again within
/// `FAILOVER_MARGIN` (1 s) of the last survivor marking it failed, not at
/// the 10 s timeout (checked in the run), and no work is lost outside the
/// crashed node's memory.
#[test]
fn join_leave_kill() {
    let reports = campaign(TransitionScenario::JoinLeaveKill);
    for r in &reports {
        assert!(r.stats.crashes > 0, "{r}");
        assert_eq!(r.stats.timeouts_after_fault, 0, "{r}");
    }
}

#[test]
fn same_seed_same_run() {
    for scenario in TransitionScenario::ALL {
        let opts = options(scenario, 7);
        let (a, b) = (transition_app::run(&opts), transition_app::run(&opts));
        assert!(a.ok, "{a}");
        assert_eq!(a.trace_hash, b.trace_hash, "{scenario}");
        assert_eq!(a.events, b.events);
        assert_eq!(
            serde_json::to_string(&a.stats).unwrap(),
            serde_json::to_string(&b.stats).unwrap()
        );
        let other = transition_app::run(&options(scenario, 8 + 5 * 3));
        assert_ne!(a.trace_hash, other.trace_hash, "{scenario}");
    }
}

#[test]
fn the_report_has_the_fields_a_campaign_reads() {
    let r = transition_app::run(&options(TransitionScenario::KillOwner, 3));
    let json: serde_json::Value = serde_json::to_value(&r).unwrap();
    for field in [
        "scenario",
        "nodes",
        "seed",
        "datums",
        "moved",
        "relinquished",
        "acquired",
        "failovers",
        "timeouts",
        "max_transition_s",
        "invariant_violations",
    ] {
        assert!(json.get(field).is_some(), "missing {field} in {json}");
    }
    assert_eq!(json["scenario"], "kill-owner");
    assert_eq!(json["invariant_violations"], 0);
}

/// The checks can fail: nodes ready before they joined each acquire every
/// datum as its first owner, and the ledger stops the run at once.
#[test]
fn nodes_ready_before_joining_give_two_owners_and_the_check_catches_it() {
    let mut opts = TransitionOptions::new(TransitionScenario::Join, 5, 1, 500);
    opts.ready_on_start = true;
    let r = transition_app::run(&opts);
    assert!(!r.ok, "{r}");
    assert_eq!(r.invariant_violations, 1);
    let failure = r.failure.unwrap();
    assert!(
        failure.contains("acquires datum") && failure.contains("not declared failed) hold it"),
        "{failure}"
    );
}
