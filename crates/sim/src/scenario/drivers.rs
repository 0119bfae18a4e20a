//! The drivers of the scenarios: forming the cluster, applying each
//! scenario's faults and measuring what it is about.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use shoal_membership::LeaseStrategy;

use super::report::{close_window, open_window};
use super::schedule::{MAX_STALL_DELAY, churn_schedule, random_schedule};
use super::{BOOTSTRAP_ABOVE, Report, ScenarioKind, ScenarioOptions};
use crate::app::Application;
use crate::sim::{Action, Sim, Violation};
use crate::util::derive_seed;

/// Purpose tag of the scenario's own random choices.
const TAG_SCENARIO: u64 = 4;

/// Forms the cluster: bootstrapped above [`BOOTSTRAP_ABOVE`] nodes, by joins
/// (one every 20 ms, through live seeds) below. Returns once every node
/// sees every other, then lets it run `warmup` more.
fn form<A: Application>(sim: &mut Sim<A>, nodes: u32, warmup: Duration) -> Result<(), Violation> {
    if nodes > BOOTSTRAP_ABOVE {
        if let Err(e) = sim.bootstrap(nodes) {
            return Err(Violation {
                seed: sim.config().seed,
                step: sim.steps(),
                time_ns: 0,
                message: e,
            });
        }
    } else {
        for slot in 0..nodes {
            sim.schedule(
                Duration::from_millis(20 * u64::from(slot)),
                Action::Start { slot },
            );
        }
        sim.run_until(Duration::from_millis(20 * u64::from(nodes)))?;
    }
    sim.schedule(sim.now(), Action::Quiet);
    let limit = sim.now() + sim.config().settle_limit;
    sim.run_while(limit, Duration::from_millis(100), |s| {
        s.converged_at().is_some()
    })?;
    let t = sim.now() + warmup;
    sim.run_until(t)
}

fn scenario_rng(seed: u64) -> SmallRng {
    SmallRng::seed_from_u64(derive_seed(seed, TAG_SCENARIO, 0))
}

pub(super) fn drive<A: Application>(
    sim: &mut Sim<A>,
    opts: &ScenarioOptions,
    report: &mut Report,
) -> Result<(), Violation> {
    let mut rng = scenario_rng(opts.seed);
    let n = opts.nodes;
    match opts.scenario {
        ScenarioKind::KillOne => {
            form(sim, n, Duration::from_secs(5))?;
            let victim = rng.random_range(0..n);
            let t0 = sim.now();
            let window = open_window(sim);
            sim.schedule(
                t0,
                Action::Crash {
                    slot: victim,
                    measure: true,
                },
            );
            sim.schedule(t0, Action::Quiet);
            let limit = t0 + Duration::from_secs(60);
            sim.run_while(limit, Duration::from_millis(50), |s| {
                s.now() >= t0 + Duration::from_secs(10)
                    && s.settled()
                    && s.detections().first().is_some_and(|d| d.all_s.is_some())
            })?;
            close_window(sim, &window, report);
            report.healthy_lapses = sim.healthy_lapses(t0);
            if let Some(d) = sim.detections().first() {
                report.suspect_first_s = d.first_suspect_s;
                report.detect_first_s = d.first_s;
                report.detect_all_s = d.all_s;
                if d.all_s.is_none() {
                    report.failure = Some(format!(
                        "{} survivors never marked the crashed node failed",
                        d.pending
                    ));
                }
            }
        }
        ScenarioKind::StalledNode => {
            form(sim, n, Duration::from_secs(5))?;
            let slot = rng.random_range(0..n);
            let t0 = sim.now();
            let window = open_window(sim);
            let stall = Duration::from_secs(30);
            let delay = Duration::from_secs(2);
            sim.schedule(
                t0,
                Action::Stall {
                    slot,
                    delay,
                    duration: stall,
                    timers: opts.stall_timers,
                },
            );
            // The backlog drains `delay` after the window closes.
            sim.schedule(t0 + stall + delay, Action::Quiet);
            let end = t0 + stall + delay + Duration::from_secs(30);
            sim.run_until(end)?;
            let limit = end + sim.config().settle_limit;
            sim.run_while(limit, Duration::from_millis(100), |s| s.settled())?;
            close_window(sim, &window, report);
            report.stalled_marked_failed = Some(sim.stalled_marked_failed());
        }
        ScenarioKind::PartitionHeal | ScenarioKind::PartitionMinority | ScenarioKind::Isolated => {
            form(sim, n, Duration::from_secs(5))?;
            let mut order: Vec<u32> = (0..n).collect();
            order.shuffle(&mut rng);
            let cut = match opts.scenario {
                ScenarioKind::PartitionHeal => n / 2,
                ScenarioKind::PartitionMinority => (n.saturating_sub(1) / 2).max(1),
                _ => 1,
            };
            let mut groups = vec![0u32; n as usize];
            let mut cut_off: Vec<u32> = order.iter().copied().take(cut as usize).collect();
            for &slot in &cut_off {
                if let Some(g) = groups.get_mut(slot as usize) {
                    *g = 1;
                }
            }
            let witnesses = witness_slots(sim);
            if sim.config().membership.lease == LeaseStrategy::Witnesses && cut > 1 {
                // The side holding most witnesses keeps its lease, whichever
                // side has more nodes; the other is the one cut off.
                let held = cut_off.iter().filter(|s| witnesses.contains(s)).count();
                if 2 * held > witnesses.len() {
                    cut_off = order.iter().copied().skip(cut as usize).collect();
                }
            } else if 2 * cut == n {
                // An even split: the side holding the oldest process keeps
                // its lease; the other is the one cut off.
                let oldest = (0..n).min_by_key(|&slot| (sim.generation(slot), slot));
                if let Some(oldest) = oldest
                    && cut_off.contains(&oldest)
                {
                    cut_off = order.iter().copied().skip(cut as usize).collect();
                }
            }
            let t0 = sim.now();
            let window = open_window(sim);
            let held = Duration::from_secs(20);
            sim.schedule(t0, Action::Partition { groups });
            sim.schedule(t0 + held, Action::Heal);
            sim.schedule(t0 + held, Action::Quiet);
            sim.run_until(t0 + held)?;
            measure_cut_off(sim, &cut_off, t0, report);
            settle_measuring_standing(sim, t0 + held, report)?;
            report.healthy_lapses = sim.healthy_lapses(t0);
            close_window(sim, &window, report);
        }
        ScenarioKind::Paused => {
            form(sim, n, Duration::from_secs(5))?;
            let slot = rng.random_range(0..n);
            let t0 = sim.now();
            let window = open_window(sim);
            let pause = Duration::from_secs(8);
            sim.schedule(
                t0,
                Action::Pause {
                    slot,
                    duration: pause,
                },
            );
            sim.schedule(t0 + pause, Action::Quiet);
            sim.run_until(t0 + pause)?;
            // Let it wake and read its backlog before judging.
            let woke = t0 + pause + Duration::from_millis(1);
            sim.run_until(woke)?;
            measure_cut_off(sim, &[slot], t0, report);
            settle_measuring_standing(sim, t0 + pause, report)?;
            report.healthy_lapses = sim.healthy_lapses(t0);
            close_window(sim, &window, report);
        }
        ScenarioKind::Churn => {
            form(sim, n, Duration::from_secs(5))?;
            let t0 = sim.now();
            let window = open_window(sim);
            let faults = Duration::from_secs(40);
            for (at, action) in churn_schedule(&mut rng, n, sim.slot_count(), faults) {
                sim.schedule(t0 + at, action);
            }
            sim.schedule(t0 + faults, Action::Quiet);
            sim.run_until(t0 + faults)?;
            let limit = t0 + faults + sim.config().settle_limit;
            sim.run_while(limit, Duration::from_millis(100), |s| s.settled())?;
            close_window(sim, &window, report);
        }
        ScenarioKind::Update => {
            let warmup = if n > 1_000 { 2 } else { 5 };
            form(sim, n, Duration::from_secs(warmup))?;
            let origin = rng.random_range(0..n);
            let t0 = sim.now();
            let window = open_window(sim);
            let metadata = format!("updated by {origin} at {:.3}", t0.as_secs_f64()).into_bytes();
            sim.schedule(
                t0,
                Action::SetMetadata {
                    slot: origin,
                    metadata,
                    measure: true,
                },
            );
            sim.run_while(
                t0 + Duration::from_secs(60),
                Duration::from_millis(10),
                // At least 10 s of traffic after the change, for a steady rate.
                |s| {
                    s.now() >= t0 + Duration::from_secs(10)
                        && s.disseminations()
                            .first()
                            .is_some_and(|d| d.all_s.is_some())
                },
            )?;
            close_window(sim, &window, report);
            if let Some(d) = sim.disseminations().first() {
                report.converge_s = d.threshold_s;
                report.converge_all_s = d.all_s;
                if d.threshold_s.is_none() {
                    report.failure = Some(format!(
                        "the update reached only {} of {} members",
                        d.informed, d.population
                    ));
                }
            }
            // The cluster must still agree on who is live.
            if let Err(why) = sim.check_converged() {
                report.failure.get_or_insert(why);
            }
        }
        ScenarioKind::Random => {
            form(sim, n, Duration::from_secs(2))?;
            let t0 = sim.now();
            let window = open_window(sim);
            let faults = Duration::from_secs(30);
            let schedule = random_schedule(&mut rng, n, sim.slot_count(), faults);
            let last = schedule.iter().map(|(at, _)| *at).max().unwrap_or_default();
            for (at, action) in schedule {
                sim.schedule(t0 + at, action);
            }
            // Stalls end within the window, but a stalled node's backlog
            // drains up to its delay later: faults stop after that.
            let quiet = t0 + last + MAX_STALL_DELAY;
            sim.schedule(quiet, Action::Quiet);
            sim.run_until(quiet)?;
            let limit = quiet + sim.config().settle_limit;
            sim.run_while(limit, Duration::from_millis(100), |s| s.settled())?;
            close_window(sim, &window, report);
        }
    }
    Ok(())
}

/// The slots of the witness set (`LeaseStrategy::Witnesses`) as the first
/// live node holds it (the nodes of a converged cluster hold the same).
fn witness_slots<A: Application>(sim: &Sim<A>) -> Vec<u32> {
    let Some(node) = sim.nodes().find(|n| !n.leaving) else {
        return Vec::new();
    };
    node.membership
        .witnesses()
        .filter_map(|m| m.name.strip_prefix("node-")?.parse().ok())
        .collect()
}

/// Lease measurements about the nodes cut off (or paused) at `t0`: when
/// the last of them lost its lease, when the first takeover of one of them
/// came; and lapses of healthy nodes since `t0`.
fn measure_cut_off<A: Application>(
    sim: &mut Sim<A>,
    cut_off: &[u32],
    t0: Duration,
    report: &mut Report,
) {
    let lost: Vec<Option<Duration>> = cut_off
        .iter()
        .map(|&slot| sim.standing_lost_at(slot, t0))
        .collect();
    report.standing_lost_s = if lost.iter().all(Option::is_some) {
        lost.iter()
            .flatten()
            .max()
            .map(|at| at.saturating_sub(t0).as_secs_f64())
    } else {
        None
    };
    let lease = sim.lease_report();
    report.takeover_first_s = lease
        .first_takeover_s
        .map(|at| at - t0.as_secs_f64())
        .filter(|s| *s >= 0.0);
    report.healthy_lapses = sim.healthy_lapses(t0);
}

/// Runs until the cluster settled after the last fault at `healed`,
/// recording when every live node held a valid lease again.
fn settle_measuring_standing<A: Application>(
    sim: &mut Sim<A>,
    healed: Duration,
    report: &mut Report,
) -> Result<(), Violation> {
    let limit = healed + sim.config().settle_limit;
    let mut regained: Option<Duration> = None;
    sim.run_while(limit, Duration::from_millis(100), |s| {
        if regained.is_none() && s.all_standing() {
            regained = Some(s.now());
        }
        s.settled() && regained.is_some()
    })?;
    report.standing_regained_s = regained.map(|at| at.saturating_sub(healed).as_secs_f64());
    if regained.is_none() && report.failure.is_none() {
        report.failure = Some("some live node never held a valid lease again".into());
    }
    Ok(())
}
