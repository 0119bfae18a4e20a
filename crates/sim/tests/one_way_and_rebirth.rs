//! Two engine features the transition scenarios with leases use: one-way
//! cuts (`Action::OneWay`) and a process that the cluster declared dead
//! coming back as a new generation of itself (`AppCtx::rebirth`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_membership::{Config, Event};
use shoal_sim::{Action, AppCtx, Application, MessageId, NodeView, Sim, SimConfig, node_name};

/// Outcomes of reliable messages per (from, to) slot pair, rebirths seen.
#[derive(Default)]
struct Ledger {
    /// (from, to) -> (delivered, failed), from `since` on.
    outcomes: HashMap<(u32, u32), (u32, u32)>,
    /// Only outcomes of messages sent at or after this count (none: none).
    since: Option<Instant>,
    /// (slot, old generation, new generation) of every rebirth.
    rebirths: Vec<(u32, u64, u64)>,
    /// Pauses seen by the per-step check: (slot, frozen steps).
    frozen_steps: HashMap<u32, u64>,
}

/// Every 100 ms sends one reliable message to every other slot; comes back
/// as a new generation when declared dead.
struct Pinger {
    next: Instant,
    slot: u32,
    generation: u64,
    /// Instances live across rebirths: how many this one went through.
    lives: u32,
    sent: HashMap<MessageId, (u32, Instant)>,
}

const SLOTS: u32 = 5;

fn addr_of(slot: u32) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, slot as u8], 7946))
}

impl Application for Pinger {
    type Shared = Ledger;

    const STEP_CHECKS: bool = true;

    fn start(ctx: &mut AppCtx<'_, Ledger>) -> Self {
        Pinger {
            next: ctx.now() + Duration::from_millis(100),
            slot: ctx.node().slot,
            generation: ctx.node().generation,
            lives: 1,
            sent: HashMap::new(),
        }
    }

    fn on_event(&mut self, event: &Event, ctx: &mut AppCtx<'_, Ledger>) {
        if matches!(event, Event::DeclaredFailed) {
            ctx.rebirth();
        }
    }

    fn on_reborn(&mut self, ctx: &mut AppCtx<'_, Ledger>) {
        let (old, new) = (self.generation, ctx.node().generation);
        ctx.shared().rebirths.push((self.slot, old, new));
        assert_eq!(ctx.membership().local().generation, new);
        assert!(
            !ctx.membership().local().ready,
            "a new generation starts not ready"
        );
        self.generation = new;
        self.lives += 1;
        self.sent.clear();
    }

    fn on_send_done(
        &mut self,
        id: MessageId,
        _to: SocketAddr,
        delivered: bool,
        ctx: &mut AppCtx<'_, Ledger>,
    ) {
        let Some((to, at)) = self.sent.remove(&id) else {
            ctx.violation(format!("outcome of unknown message {id:?}"));
            return;
        };
        let from = self.slot;
        let ledger = ctx.shared();
        if ledger.since.is_some_and(|s| at >= s) {
            let e = ledger.outcomes.entry((from, to)).or_default();
            if delivered {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
    }

    fn on_timeout(&mut self, ctx: &mut AppCtx<'_, Ledger>) {
        let now = ctx.now();
        if now < self.next {
            return;
        }
        self.next = now + Duration::from_millis(100);
        for to in (0..SLOTS).filter(|&s| s != self.slot) {
            let id = ctx.send(addr_of(to), vec![0]);
            self.sent.insert(id, (to, now));
        }
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next)
    }

    fn check_step(
        shared: &mut Ledger,
        _now: Instant,
        nodes: &mut dyn Iterator<Item = NodeView<'_, Self>>,
    ) -> Result<(), String> {
        for n in nodes.filter(|n| n.frozen) {
            *shared.frozen_steps.entry(n.info.slot).or_default() += 1;
        }
        Ok(())
    }
}

fn cluster(seed: u64) -> Sim<Pinger> {
    let base = Instant::now();
    let mut sim: Sim<Pinger> = Sim::new(
        SimConfig::new(seed, Config::lan()),
        SLOTS,
        base,
        Ledger::default(),
    )
    .unwrap();
    for slot in 0..SLOTS {
        sim.schedule(
            Duration::from_millis(10 * u64::from(slot)),
            Action::Start { slot },
        );
    }
    sim
}

#[test]
fn a_one_way_cut_drops_datagrams_one_way_and_reliable_messages_both_ways() {
    let mut sim = cluster(3);
    // 1 no longer hears 0; 0 still hears 1.
    sim.schedule(
        Duration::from_secs(5),
        Action::OneWay {
            pairs: vec![(0, 1)],
        },
    );
    sim.schedule(Duration::from_secs(7), Action::Heal);
    sim.schedule(Duration::from_secs(7), Action::Quiet);
    sim.run_until(Duration::from_millis(5_001)).unwrap();
    // Count the outcomes of the messages sent from now until 6.5 s.
    let now = sim.base() + sim.now();
    sim.shared_mut().since = Some(now);
    sim.run_until(Duration::from_millis(6_500)).unwrap();
    let o = |sim: &Sim<Pinger>, from, to| {
        sim.shared()
            .outcomes
            .get(&(from, to))
            .copied()
            .unwrap_or_default()
    };
    sim.shared_mut().since = None;
    assert_eq!(o(&sim, 0, 1).0, 0, "0 -> 1 is cut: {:?}", o(&sim, 0, 1));
    assert!(o(&sim, 0, 1).1 > 0);
    assert_eq!(
        o(&sim, 1, 0).0,
        0,
        "a connection needs both ways: {:?}",
        o(&sim, 1, 0)
    );
    assert!(
        o(&sim, 0, 2).0 > 0 && o(&sim, 0, 2).1 == 0,
        "{:?}",
        o(&sim, 0, 2)
    );
    assert!(
        o(&sim, 2, 1).0 > 0 && o(&sim, 2, 1).1 == 0,
        "{:?}",
        o(&sim, 2, 1)
    );
    sim.run_until(Duration::from_secs(30)).unwrap();
    sim.check_converged().unwrap();
}

#[test]
fn a_process_declared_dead_comes_back_as_a_new_generation_in_the_same_process() {
    let mut sim = cluster(5);
    sim.run_until(Duration::from_secs(5)).unwrap();
    let old = sim.generation(4).unwrap();
    // Node 4 is cut off long enough to be declared dead, then heals.
    sim.schedule(
        Duration::from_secs(5),
        Action::Partition {
            groups: vec![0, 0, 0, 0, 1],
        },
    );
    sim.schedule(Duration::from_secs(15), Action::Heal);
    sim.schedule(Duration::from_secs(15), Action::Quiet);
    sim.run_until(Duration::from_secs(40)).unwrap();
    let new = sim.generation(4).unwrap();
    assert!(new > old, "generation {old} -> {new}");
    let rebirths = &sim.shared().rebirths;
    assert!(
        rebirths
            .iter()
            .any(|&(slot, o, n)| slot == 4 && o == old && n == new),
        "{rebirths:?}"
    );
    let node = sim.nodes().find(|n| n.info.slot == 4).unwrap();
    assert!(node.app.lives >= 2, "the same instance lives on");
    assert_eq!(node.app.generation, new);
    assert!(!node.leaving);
    sim.check_converged().unwrap();
    // Every other node sees the new generation and not the old one.
    for n in sim.nodes().filter(|n| n.info.slot != 4) {
        let seen: Vec<u64> = n
            .membership
            .members()
            .filter(|m| *m.name == *node_name(4) && m.state.is_live())
            .map(|m| m.generation)
            .collect();
        assert_eq!(seen, vec![new], "{}", n.info.name);
    }
}

#[test]
fn a_paused_process_is_frozen_for_the_step_checks_until_it_wakes() {
    let mut sim = cluster(9);
    sim.schedule(
        Duration::from_secs(5),
        Action::Pause {
            slot: 2,
            duration: Duration::from_secs(1),
        },
    );
    sim.run_until(Duration::from_millis(5_500)).unwrap();
    let during = sim.shared().frozen_steps.get(&2).copied().unwrap_or(0);
    assert!(during > 0, "steps while slot 2 is paused see it frozen");
    assert_eq!(sim.shared().frozen_steps.len(), 1, "only slot 2");
    assert!(sim.nodes().find(|n| n.info.slot == 2).unwrap().frozen);
    sim.run_until(Duration::from_millis(6_000)).unwrap();
    assert!(!sim.nodes().find(|n| n.info.slot == 2).unwrap().frozen);
    let after = sim.shared().frozen_steps[&2];
    sim.run_until(Duration::from_secs(8)).unwrap();
    assert_eq!(sim.shared().frozen_steps[&2], after, "awake from 6 s on");
}
