//! Fault schedules drawn from a generator: churn (joins, leaves, crashes,
//! restarts) and random faults of every kind.

use std::time::Duration;

use rand::Rng;

use crate::sim::Action;

/// Longest input delay of a stall in [`random_schedule`].
pub const MAX_STALL_DELAY: Duration = Duration::from_secs(3);

/// Joins, leaves, crashes and restarts, about one every second, within
/// `window`, on `initial` started nodes and `slots` slots in all.
pub fn churn_schedule<R: Rng>(
    rng: &mut R,
    initial: u32,
    slots: u32,
    window: Duration,
) -> Vec<(Duration, Action)> {
    let mut out = Vec::new();
    let mut next_new = initial;
    let mut t = Duration::ZERO;
    loop {
        t += Duration::from_millis(rng.random_range(300..1_700));
        if t >= window {
            break;
        }
        let slot = rng.random_range(0..next_new.max(1));
        let action = match rng.random_range(0..4u32) {
            0 if next_new < slots => {
                next_new += 1;
                Action::Start { slot: next_new - 1 }
            }
            0 | 1 => Action::Start { slot },
            2 => Action::Crash {
                slot,
                measure: false,
            },
            _ => Action::Leave { slot },
        };
        out.push((t, action));
    }
    out
}

/// A random fault schedule within `window` over `slots` slots (the first
/// `initial` started): crashes, restarts, joins, graceful leaves, stalls,
/// partitions (always healed by the end of the window), bursts of loss and
/// duplication, metadata changes and garbage packets. Loss, duplication and
/// partitions are reset at the end; stalls end by then too (their backlog
/// drains at most [`MAX_STALL_DELAY`] later).
pub fn random_schedule<R: Rng>(
    rng: &mut R,
    initial: u32,
    slots: u32,
    window: Duration,
) -> Vec<(Duration, Action)> {
    let mut out = Vec::new();
    let mut t = Duration::ZERO;
    let slots = slots.max(1);
    let initial = initial.max(1);
    loop {
        t += Duration::from_millis(rng.random_range(200..2_500));
        if t >= window {
            break;
        }
        let slot = rng.random_range(0..slots);
        let live_slot = rng.random_range(0..initial);
        let action = match rng.random_range(0..100u32) {
            0..15 => Action::Crash {
                slot: live_slot,
                measure: false,
            },
            15..35 => Action::Start { slot },
            35..42 => Action::Leave { slot: live_slot },
            42..52 => {
                let left = window.saturating_sub(t);
                let duration = Duration::from_millis(rng.random_range(500..10_000)).min(left);
                Action::Stall {
                    slot: live_slot,
                    delay: Duration::from_millis(rng.random_range(100..3_000)).min(MAX_STALL_DELAY),
                    duration,
                    timers: rng.random_bool(0.5),
                }
            }
            52..62 => {
                let groups = (0..slots).map(|_| rng.random_range(0..2u32)).collect();
                Action::Partition { groups }
            }
            62..72 => Action::Heal,
            72..82 => Action::SetLoss(rng.random_range(0.0..0.3)),
            82..87 => Action::SetDuplicate(rng.random_range(0.0..0.2)),
            87..95 => Action::SetMetadata {
                slot: live_slot,
                metadata: vec![rng.random(); rng.random_range(0..64)],
                measure: false,
            },
            _ => Action::Garbage {
                slot: live_slot,
                len: rng.random_range(0..1_500),
            },
        };
        out.push((t, action));
    }
    out.push((window, Action::Heal));
    out.push((window, Action::SetLoss(0.0)));
    out.push((window, Action::SetDuplicate(0.0)));
    out
}
