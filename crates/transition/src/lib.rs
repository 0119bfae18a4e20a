//! The transition layer: the relinquish / notice / acquire handoff of datums
//! between nodes, as a sans-IO state machine.
//!
//! Each node runs one [`Handoff`]. It keeps the registry of datums (type name
//! and id), the placement table in force, and the handoffs in flight. When a
//! new table arrives ([`Handoff::install`]), every datum whose primary changes
//! moves: the old primary **relinquishes** it (a [`Job`] the application runs:
//! persist, stop processing), then sends the new primary a **notice**; the new
//! primary **acquires** it (another job) on the notice, at once when every
//! node that could hold it is declared gone, or when the timeout passes. A
//! datum nobody held before is acquired by its first owner without waiting.
//!
//! Sans-IO: no clock, no sockets, no threads. Inputs take `now`; outputs are
//! polled — [`Handoff::poll_job`], [`Handoff::poll_transmit`] (notice batches
//! to send, postcard in a version envelope), [`Handoff::poll_event`],
//! [`Handoff::poll_release`] (held work, released once) and
//! [`Handoff::poll_timeout`].
//!
//! What it fixes from the seed: notices leave only after the relinquish
//! succeeded, in batches, on a path that never waits for the receiver (two
//! nodes owing each other a million notices finish); notices carry the view
//! id, so stale or duplicate ones are counted and ignored; a view arriving
//! mid-transition supersedes cleanly; a failed owner's datums are taken over
//! at once; failures are retried and reported; jobs are capped; work for
//! datums in flight is held in a bounded buffer; a node declared failed fences
//! itself. `docs/transition.md` has the protocol and its corner cases.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use shoal_placement::{NodeId, PlacementTable, Strategy, View};
//! use shoal_transition::{Config, Handoff, JobKind, Route};
//!
//! let (a, b) = (NodeId::new("a", 1), NodeId::new("b", 2));
//! let table = |nodes: &[&NodeId]| {
//!     let view = View::from_nodes(nodes.iter().map(|n| (*n).clone()));
//!     PlacementTable::build(view, &Strategy::ModN, 1).unwrap()
//! };
//! let now = Instant::now();
//! let mut node_a: Handoff = Handoff::new(a.clone(), Config::default()).unwrap();
//! let mut node_b: Handoff = Handoff::new(b.clone(), Config::default()).unwrap();
//! let series_a = node_a.datum_type("series").unwrap();
//! let series_b = node_b.datum_type("series").unwrap();
//! for id in 0..4 {
//!     node_a.register(shoal_transition::Datum::new(series_a, id), now).unwrap();
//!     node_b.register(shoal_transition::Datum::new(series_b, id), now).unwrap();
//! }
//!
//! // "a" alone: it owns everything and nobody held it before: acquire at once.
//! node_a.install(table(&[&a]), now);
//! node_b.install(table(&[&a]), now); // b sees the cluster before it is ready
//! while let Some(job) = node_a.poll_job() {
//!     assert_eq!(job.kind, JobKind::Acquire);
//!     node_a.job_done(job, Ok(()), now);
//! }
//!
//! // "b" becomes ready: datums 1 and 3 move from a to b.
//! let later = now + Duration::from_millis(10);
//! node_a.install(table(&[&a, &b]), later);
//! node_b.install(table(&[&a, &b]), later);
//! let moving = shoal_transition::Datum::new(series_b, 1);
//! assert_eq!(node_b.route(moving), Route::Hold); // b waits for a's notice
//! while let Some(job) = node_a.poll_job() {
//!     assert_eq!(job.kind, JobKind::Relinquish); // a persists, then notifies
//!     node_a.job_done(job, Ok(()), later);
//! }
//! // The notices (and each node's "done" marker) go over the network.
//! while deliver(&mut node_a, &mut node_b, later) | deliver(&mut node_b, &mut node_a, later) {}
//! while let Some(job) = node_b.poll_job() {
//!     assert_eq!(job.kind, JobKind::Acquire);
//!     node_b.job_done(job, Ok(()), later);
//! }
//! assert_eq!(node_b.route(moving), Route::Process);
//! assert!(node_a.is_idle() && node_b.is_idle());
//! assert_eq!(node_b.counters().notices_accepted, 2);
//!
//! /// Hands every batch `from` has to send to `to`, as a transport would.
//! fn deliver(from: &mut Handoff, to: &mut Handoff, now: Instant) -> bool {
//!     let sender = from.local().clone();
//!     let mut any = false;
//!     while let Some(tx) = from.poll_transmit() {
//!         assert_eq!(&tx.to, to.local());
//!         to.handle_notices(&sender, &tx.batch.encode(), now).unwrap();
//!         from.send_done(tx.id, Ok(()), now);
//!         any = true;
//!     }
//!     any
//! }
//! ```

mod datum;
mod error;
mod handoff;
mod types;
mod wire;

pub use datum::{Datum, DatumType, DetHasher, DetState};
pub use error::{ConfigError, HoldError, HoldErrorKind, NoticeError, RegistryError, WireError};
pub use handoff::{Handoff, MAX_EPOCH_JUMP};
pub use types::{
    Config, Counters, DatumState, FencingToken, HandoffEvent, Job, JobKind, JobReason,
    NoticeReport, Progress, Release, ReleaseTo, ReturnReason, Role, Route, SendId, Transmit,
    WithoutNotice,
};
pub use wire::{NoticeBatch, NoticeGroup, WIRE_VERSION, WireLimits};
