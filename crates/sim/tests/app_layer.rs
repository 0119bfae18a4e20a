//! The extension point: an application layer on every node that sends
//! reliable messages through the virtual network, with a shared ledger that
//! checks them incrementally and a cross-node check at sampling points.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::Rng;
use shoal_membership::{Config, Event};
use shoal_sim::{Action, AppCtx, Application, MessageId, NodeInfo, NodeView, Sim, SimConfig};

/// Every message is handled at most once, and its sender learns exactly one
/// outcome: "delivered" only if it was handled, "failed" only if it was not.
#[derive(Default)]
struct Ledger {
    next_id: u64,
    sent: HashMap<u64, (u32, u32)>,
    /// Handled by the receiver.
    delivered: HashSet<u64>,
    /// Reported delivered to the sender.
    acked: HashSet<u64>,
    /// Reported failed to the sender.
    failed: HashSet<u64>,
    view_changes: u64,
    declared_failed: u64,
    stops: u64,
}

/// Sends one message every 50 ms to a random live member it knows.
struct Chatter {
    next: Instant,
    slot: u32,
    /// The ledger id of each message in flight.
    in_flight: HashMap<MessageId, u64>,
}

fn id_of(payload: &[u8]) -> u64 {
    u64::from_le_bytes(payload[..8].try_into().unwrap())
}

impl Application for Chatter {
    type Shared = Ledger;

    fn start(ctx: &mut AppCtx<'_, Ledger>) -> Self {
        Chatter {
            next: ctx.now() + Duration::from_millis(50),
            slot: ctx.node().slot,
            in_flight: HashMap::new(),
        }
    }

    fn on_event(&mut self, event: &Event, ctx: &mut AppCtx<'_, Ledger>) {
        match event {
            Event::ViewChanged(_) => ctx.shared().view_changes += 1,
            Event::DeclaredFailed => ctx.shared().declared_failed += 1,
            _ => {}
        }
    }

    fn on_message(&mut self, from: &NodeInfo, payload: &[u8], ctx: &mut AppCtx<'_, Ledger>) {
        let id = id_of(payload);
        let me = ctx.node().slot;
        let ledger = ctx.shared();
        let problem = match ledger.sent.get(&id) {
            None => Some(format!("message {id} was never sent")),
            Some(&(src, dst)) if src != from.slot || dst != me => Some(format!(
                "message {id} from {src} to {dst} arrived at {me} from {}",
                from.slot
            )),
            Some(_) if ledger.failed.contains(&id) || !ledger.delivered.insert(id) => {
                Some(format!("message {id} delivered twice or after its failure"))
            }
            Some(_) => None,
        };
        if let Some(problem) = problem {
            ctx.violation(problem);
        }
    }

    fn on_send_done(
        &mut self,
        id: MessageId,
        _to: SocketAddr,
        delivered: bool,
        ctx: &mut AppCtx<'_, Ledger>,
    ) {
        let Some(own) = self.in_flight.remove(&id) else {
            ctx.violation(format!(
                "outcome of unknown message {id:?}, or a second one"
            ));
            return;
        };
        let ledger = ctx.shared();
        let handled = ledger.delivered.contains(&own);
        let fresh = if delivered {
            ledger.acked.insert(own)
        } else {
            ledger.failed.insert(own)
        };
        if !fresh || handled != delivered {
            ctx.violation(format!(
                "message {own}: outcome delivered={delivered} but handled={handled}"
            ));
        }
    }

    fn on_timeout(&mut self, ctx: &mut AppCtx<'_, Ledger>) {
        self.next = ctx.now() + Duration::from_millis(50);
        let me = ctx.node().name.clone();
        let peers: Vec<(SocketAddr, String)> = ctx
            .membership()
            .members()
            .filter(|m| m.state.is_live() && *m.name != *me)
            .map(|m| (m.addr, m.name.to_string()))
            .collect();
        if peers.is_empty() {
            return;
        }
        let (addr, name) = peers[ctx.rng().random_range(0..peers.len())].clone();
        let dst: u32 = name.trim_start_matches("node-").parse().unwrap();
        let ledger = ctx.shared();
        ledger.next_id += 1;
        let id = ledger.next_id;
        ledger.sent.insert(id, (self.slot, dst));
        let mut payload = id.to_le_bytes().to_vec();
        payload.extend_from_slice(b"hello");
        let message = ctx.send(addr, payload);
        self.in_flight.insert(message, id);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next)
    }

    fn on_stop(&mut self, _node: &NodeInfo, _crashed: bool, shared: &mut Ledger) {
        shared.stops += 1;
    }

    fn check(
        shared: &Ledger,
        nodes: &mut dyn Iterator<Item = NodeView<'_, Self>>,
    ) -> Result<(), String> {
        // Cross-node: every live instance is where its slot says.
        for n in nodes {
            if n.app.slot != n.info.slot {
                return Err(format!(
                    "instance of slot {} runs in slot {}",
                    n.app.slot, n.info.slot
                ));
            }
        }
        if shared
            .delivered
            .intersection(&shared.failed)
            .next()
            .is_some()
        {
            return Err("a message was both delivered and failed".into());
        }
        Ok(())
    }
}

#[test]
fn reliable_messages_arrive_once_or_fail_once_through_crashes_and_partitions() {
    let cfg = SimConfig::new(11, Config::lan());
    let mut sim: Sim<Chatter> = Sim::new(cfg, 6, Instant::now(), Ledger::default()).unwrap();
    for slot in 0..6 {
        sim.schedule(
            Duration::from_millis(10 * u64::from(slot)),
            Action::Start { slot },
        );
    }
    sim.schedule(
        Duration::from_secs(5),
        Action::Crash {
            slot: 2,
            measure: false,
        },
    );
    sim.schedule(
        Duration::from_secs(6),
        Action::Partition {
            groups: vec![0, 0, 0, 1, 1, 1],
        },
    );
    sim.schedule(Duration::from_secs(9), Action::Heal);
    sim.schedule(Duration::from_secs(10), Action::Start { slot: 2 });
    sim.schedule(Duration::from_secs(12), Action::Leave { slot: 5 });
    sim.schedule(Duration::from_secs(12), Action::Quiet);
    sim.run_until(Duration::from_secs(60)).unwrap();

    let ledger = sim.shared();
    assert!(ledger.sent.len() > 1_000, "sent {}", ledger.sent.len());
    assert!(
        !ledger.failed.is_empty(),
        "the crash and the partition make sends fail"
    );
    // Everything sent more than a second ago has an outcome (messages sent
    // by processes that stopped since have none).
    let resolved = ledger.acked.len() + ledger.failed.len();
    assert!(
        ledger.sent.len() - resolved < 200,
        "{} of {} unresolved",
        ledger.sent.len() - resolved,
        ledger.sent.len()
    );
    assert!(ledger.view_changes > 6);
    assert_eq!(ledger.stops, 2, "one crash and one exit after leave");
    assert!(sim.check_converged().is_ok());
    assert_eq!(sim.live_count(), 5);
}

#[test]
fn an_application_violation_stops_the_run_with_seed_and_step() {
    struct Strict;
    impl Application for Strict {
        type Shared = u32;
        fn start(_ctx: &mut AppCtx<'_, u32>) -> Self {
            Strict
        }
        fn on_event(&mut self, event: &Event, ctx: &mut AppCtx<'_, u32>) {
            if matches!(event, Event::Failed(_)) {
                *ctx.shared() += 1;
                ctx.violation("nobody may fail in this test");
            }
        }
    }
    let mut sim: Sim<Strict> =
        Sim::new(SimConfig::new(5, Config::lan()), 4, Instant::now(), 0).unwrap();
    for slot in 0..4 {
        sim.schedule(Duration::ZERO, Action::Start { slot });
    }
    sim.schedule(
        Duration::from_secs(3),
        Action::Crash {
            slot: 1,
            measure: false,
        },
    );
    let err = sim.run_until(Duration::from_secs(30)).unwrap_err();
    assert_eq!(err.seed, 5);
    assert_eq!(err.step, sim.steps());
    assert!(err.message.contains("nobody may fail"), "{err}");
    assert_eq!(*sim.shared(), 1, "the run stopped at the first violation");
    assert!(err.time_ns > 3_000_000_000);
}

#[test]
fn the_cross_node_check_runs_at_sampling_points() {
    struct Counting;
    impl Application for Counting {
        type Shared = std::cell::Cell<u32>;
        fn start(_ctx: &mut AppCtx<'_, Self::Shared>) -> Self {
            Counting
        }
        fn check(
            shared: &Self::Shared,
            nodes: &mut dyn Iterator<Item = NodeView<'_, Self>>,
        ) -> Result<(), String> {
            shared.set(shared.get() + 1);
            if nodes.count() == 3 {
                Ok(())
            } else {
                Err("expected 3 live nodes".into())
            }
        }
    }
    let mut sim: Sim<Counting> = Sim::new(
        SimConfig::new(1, Config::lan()),
        3,
        Instant::now(),
        Default::default(),
    )
    .unwrap();
    sim.bootstrap(3).unwrap();
    sim.run_until(Duration::from_millis(10_500)).unwrap();
    assert_eq!(sim.shared().get(), 10, "one check per virtual second");
    sim.schedule(
        sim.now(),
        Action::Crash {
            slot: 0,
            measure: false,
        },
    );
    let err = sim.run_until(Duration::from_secs(20)).unwrap_err();
    assert!(err.message.contains("expected 3 live nodes"), "{err}");
}
