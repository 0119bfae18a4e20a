//! shoal's demo service and the real-process cluster driver behind
//! `cargo xtask sim`.
//!
//! The service is a small time-series aggregator of the kind the seed was
//! written for. Each datum is a series (count, sum, min, max, last time).
//! Points enter at any node and go to the series' owner through
//! `send_to_owner`; the owner aggregates them in memory, acknowledges them
//! to the ingesting node, and flushes them to the store periodically. A
//! relinquish writes the series to the store before the notice goes; an
//! acquire loads it. Every write records the writing node and its
//! generation in an append-only `writes` table, so ownership can be audited
//! afterwards ([`store::Store::audit`]).
//!
//! The driver ([`driver::run`]) starts nodes as child processes of the
//! `shoal-demo` binary on loopback, talks to them over the line protocol of
//! [`protocol`], plays a scenario (join, graceful leave, SIGKILL, restart),
//! and computes a [`driver::Summary`]: points acknowledged versus persisted,
//! loss attributed to kills, double-owner writes, failure detection time,
//! the duration of each transition, and an SVG timeline.
//!
//! ```
//! use shoal_demo::protocol::NodeCommand;
//! use shoal_demo::store::Aggregate;
//!
//! assert_eq!(NodeCommand::parse("p 1 7 2.5"), Some(NodeCommand::Point { id: 1, series: 7, value: 2.5 }));
//! let mut series = Aggregate::default();
//! series.add(2.5, 1_000);
//! series.add(-1.0, 2_000);
//! assert_eq!((series.count, series.min, series.max), (2, -1.0, 2.5));
//! ```
//!
//! `docs/demo.md` explains the protocol, the verdict and how to run it.

pub mod driver;
pub mod fault;
pub mod protocol;
pub mod service;
pub mod store;
mod svg;
