//! Deterministic discrete-event simulator for shoal's sans-IO layers: many
//! nodes on a virtual clock and a virtual network, with faults, checking the
//! protocol's invariants at every step.
//!
//! Each simulated node runs `shoal_membership::Membership` (and optionally an
//! [`Application`] layer next to it, the extension point for transition).
//! Nothing here reads the wall clock (except to report `wall_s`, and for the
//! origin of a handoff harness run's virtual time) or uses
//! global randomness: virtual time is a base `Instant` plus a virtual
//! duration, and every random choice comes from generators derived from one
//! seed (one for the network and the scenario, one per process), so the same
//! seed gives the same run, event for event ([`Sim::trace_hash`]).
//!
//! - **Engine** ([`Sim`]): a binary heap of events keyed by (virtual time,
//!   sequence number); per-node timers only through `poll_timeout`, one
//!   current timer entry per node; no O(N) work per event.
//! - **Network** ([`NetConfig`]): latency with jitter, loss, duplication,
//!   reordering, partitions that heal; reliable messages (push-pull, joins,
//!   application messages) are never lost at random but fail when the peer
//!   is down or partitioned away.
//! - **Faults** ([`Action`]): crashes, restarts (a new generation), joins,
//!   graceful leaves, CPU-starved nodes that handle their input late,
//!   paused nodes, partitions, one-way cuts, loss and duplication bursts,
//!   garbage packets; a process declared dead may come back as a new
//!   generation of itself ([`AppCommand::Rebirth`]).
//! - **Invariants**, checked as events happen: a node's incarnations of a
//!   member only grow; no member comes back from dead or left without a
//!   higher incarnation or a new generation; every packet a peer produced
//!   decodes; after faults stop ([`Action::Quiet`]), every live node comes to
//!   see exactly the live members within a limit; a running node that a
//!   still-running node marked failed learns it (`DeclaredFailed`, the
//!   self-fencing signal). The run stops at the first violation with its
//!   seed and step ([`Violation`]).
//! - **Transition on membership** ([`transition_app`]): one
//!   `shoal_transition::Handoff` per process driven by its real membership
//!   events, with datums, jobs and work, in scenarios `join`, `leave`,
//!   `kill-owner`, `chained`, `flap` and `join-leave-kill`, and with leases
//!   `partition`, `one-way`, `pause` and `link-flap` (a node declared dead
//!   comes back as a new generation), its ownership invariants checked at
//!   every step (at most one process acting as owner of a datum: holding it
//!   under a valid lease, not frozen) and its liveness after the last heal
//!   (`--app transition` on the command line).
//! - **Handoff harness** ([`harness`]): a lighter simulation without SWIM,
//!   many `shoal_core::NodeCore`s fed by a fake membership with install
//!   skew, detection delays, lost acknowledgements and false positives,
//!   checked by the shared ownership ledger (`shoal_core::check`).
//! - **Scenarios** ([`scenario`]): `kill-one`, `stalled-node`,
//!   `partition-heal`, `churn`, `update`, `random`, each producing a
//!   [`Report`] (detection times, false positives, dissemination time,
//!   bandwidth per node).
//!
//! See `docs/simulator.md` for the network model, when each invariant is
//! checked, the figures and how to plug a layer in.
//!
//! # Example
//!
//! Five nodes form a cluster by joining, one crashes, and every survivor
//! marks it failed:
//!
//! ```
//! use std::time::{Duration, Instant};
//! use shoal_membership::Config;
//! use shoal_sim::{Action, Sim, SimConfig};
//!
//! let mut sim: Sim = Sim::new(SimConfig::new(42, Config::lan()), 5, Instant::now(), ()).unwrap();
//! for slot in 0..5 {
//!     sim.schedule(Duration::from_millis(10 * u64::from(slot)), Action::Start { slot });
//! }
//! sim.schedule(Duration::from_secs(10), Action::Crash { slot: 3, measure: true });
//! sim.schedule(Duration::from_secs(10), Action::Quiet);
//! sim.run_until(Duration::from_secs(30)).unwrap();
//!
//! let detection = sim.detections()[0];
//! assert_eq!(detection.pending, 0, "every survivor marked node 3 failed");
//! assert!(detection.all_s.unwrap() < 10.0);
//! assert_eq!(sim.false_positives(), 0);
//! assert!(sim.check_converged().is_ok());
//! ```

mod acting;
mod app;
mod check;
pub mod harness;
mod net;
pub mod scenario;
mod sim;
pub mod transition_app;
mod util;

pub use app::{AppCommand, AppCtx, Application, MessageId, NodeInfo, NodeView};
pub use net::NetConfig;
pub use scenario::{Profile, Report, ScenarioKind, ScenarioOptions};
pub use sim::{
    Action, DetectionTimes, DisseminationTimes, LeaseReport, Sim, SimConfig, Traffic, Violation,
    node_name,
};
pub use util::{TraceHash, peak_rss_bytes, run_seeds};
