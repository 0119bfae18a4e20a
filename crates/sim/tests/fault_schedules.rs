//! proptest over random fault schedules on small clusters: whatever the
//! schedule, no invariant breaks and the cluster converges once the faults
//! stop. Failing schedules shrink to a minimal one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use shoal_membership::Config;
use shoal_sim::{Action, Sim, SimConfig};

#[derive(Clone, Debug)]
enum Fault {
    Crash(u32),
    Start(u32),
    Leave(u32),
    Stall {
        slot: u32,
        delay_ms: u64,
        for_ms: u64,
        timers: bool,
    },
    Partition(u32),
    Heal,
    Loss(u8),
    Duplicate(u8),
}

const SLOTS: u32 = 7;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.parse().ok()
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        (0..SLOTS).prop_map(Fault::Crash),
        (0..SLOTS).prop_map(Fault::Start),
        (0..SLOTS).prop_map(Fault::Leave),
        (0..SLOTS, 100..3_000u64, 100..8_000u64, any::<bool>()).prop_map(
            |(slot, delay_ms, for_ms, timers)| {
                Fault::Stall {
                    slot,
                    delay_ms,
                    for_ms,
                    timers,
                }
            }
        ),
        (1..(1u32 << SLOTS) - 1).prop_map(Fault::Partition),
        Just(Fault::Heal),
        (0..40u8).prop_map(Fault::Loss),
        (0..20u8).prop_map(Fault::Duplicate),
    ]
}

fn action(f: &Fault) -> Action {
    match *f {
        Fault::Crash(slot) => Action::Crash {
            slot,
            measure: false,
        },
        Fault::Start(slot) => Action::Start { slot },
        Fault::Leave(slot) => Action::Leave { slot },
        Fault::Stall {
            slot,
            delay_ms,
            for_ms,
            timers,
        } => Action::Stall {
            slot,
            delay: Duration::from_millis(delay_ms),
            duration: Duration::from_millis(for_ms),
            timers,
        },
        Fault::Partition(mask) => Action::Partition {
            groups: (0..SLOTS).map(|s| (mask >> s) & 1).collect(),
        },
        Fault::Heal => Action::Heal,
        Fault::Loss(p) => Action::SetLoss(f64::from(p) / 100.0),
        Fault::Duplicate(p) => Action::SetDuplicate(f64::from(p) / 100.0),
    }
}

proptest! {
    // A fixed generator seed: CI runs the same 256 schedules every time.
    // `SHOAL_SIM_PROPTEST_SEED=<n>` and `SHOAL_SIM_PROPTEST_CASES=<n>`
    // explore others.
    #![proptest_config(ProptestConfig {
        cases: env_u64("SHOAL_SIM_PROPTEST_CASES").map_or(256, |n| u32::try_from(n).unwrap_or(u32::MAX)),
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(env_u64("SHOAL_SIM_PROPTEST_SEED").unwrap_or(1)),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_fault_schedule_keeps_invariants_and_converges(
        seed in any::<u64>(),
        initial in 3..=SLOTS,
        faults in prop::collection::vec((0..25_000u64, fault()), 0..25),
    ) {
        let mut sim: Sim = Sim::new(SimConfig::new(seed, Config::lan()), SLOTS, Instant::now(), ()).unwrap();
        for slot in 0..initial {
            sim.schedule(Duration::from_millis(20 * u64::from(slot)), Action::Start { slot });
        }
        let start = Duration::from_secs(3);
        let mut last = start;
        for (at, f) in &faults {
            let at = start + Duration::from_millis(*at);
            last = last.max(at);
            sim.schedule(at, action(f));
        }
        // Stalls may outlast the schedule by their length plus their delay.
        let end = last + Duration::from_secs(12);
        sim.schedule(end, Action::Heal);
        sim.schedule(end, Action::SetLoss(0.0));
        sim.schedule(end, Action::SetDuplicate(0.0));
        sim.schedule(end, Action::Quiet);
        let limit = end + sim.config().settle_limit + Duration::from_secs(1);
        let outcome = sim.run_while(limit, Duration::from_millis(100), |s| {
            s.now() > end && s.settled()
        });
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
        prop_assert!(outcome.unwrap(), "did not converge");
        prop_assert!(sim.check_converged().is_ok());
    }
}
