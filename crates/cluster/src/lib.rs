//! shoal: run identical nodes as one leaderless cluster.
//!
//! Every piece of application state, a *datum* (a type name and an integer
//! id), belongs to one node at a time; any node that receives work for a
//! datum forwards it to that node. When nodes join, leave or die, ownership
//! moves by a handoff: the old owner *relinquishes* the datum (persists it),
//! sends a *notice*, and the new owner *acquires* it only after that notice,
//! or at once when the old owner has been declared failed.
//!
//! This crate is the facade: a [`Node`] drives the sans-IO layers
//! (`shoal-membership`: SWIM with Lifeguard; `shoal-placement`: who owns
//! what; `shoal-transition`: the handoff) on tokio over `shoal-transport`
//! (QUIC with mutual TLS), and offers the API an application uses: join,
//! leave, ready flag, metadata, members, change notifications, datums,
//! transitions, and typed messages to a node or to a datum's owner.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use shoal::{DatumError, DistDatum, HandoffContext, Node, NodeConfig};
//!
//! struct Series { id: i64 }
//! impl DistDatum for Series {
//!     fn id(&self) -> i64 { self.id }
//!     fn type_name(&self) -> &str { "series" }
//!     async fn relinquish(&self, _ctx: HandoffContext) -> Result<(), DatumError> { Ok(()) }
//!     async fn acquire(&self, _ctx: HandoffContext) -> Result<(), DatumError> { Ok(()) }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let (_ca, ids) = shoal::throwaway_cluster(&["node-1"])?; // a development CA
//! // (production: `NodeConfig::tls = TlsConfig::Files` and `Node::start`)
//! let node = Node::start_with_identity(NodeConfig::local("node-1"), ids[0].clone()).await?;
//! node.join(&[]).await?; // nobody: a cluster of one
//! node.register((0..100).map(|id| Arc::new(Series { id }))).await?;
//! node.set_ready(true).await?;
//!
//! // Typed messages, routed to the owner of a datum.
//! let (points, mut inbox) = node.channel::<f64>("points")?;
//! points.send_to_owner("series", 42, &1.5).await?;
//! let msg = inbox.recv().await.unwrap();
//! assert_eq!(msg.payload, 1.5);
//! assert!(node.holds("series", 42).await?); // acquired here, lease valid
//!
//! let mut changes = node.changes();
//! changes.changed().await?; // a new view (members, placement)
//! println!("{}", node.snapshot().await?);
//! node.leave(Duration::from_secs(5)).await?;
//! # Ok(())
//! # }
//! ```
//!
//! `docs/facade.md` describes the driver, the queues and what happens when
//! each is full; `docs/seed-parity.md` maps every call of the Go package
//! shoal reimplements to its shoal equivalent.

mod channel;
mod config;
mod datum;
mod driver;
mod error;
mod gossip;
mod lease;
mod node;
mod request;
mod view;
pub mod wire;

pub use channel::{Received, Receiver, Sender};
pub use config::{Limits, NodeConfig, Timing, TlsConfig, TransitionMode};
pub use datum::{DatumError, DistDatum, HandoffContext};
pub use error::{ConfigError, Error, RequestError, SendError, StartError};
pub use node::Node;
pub use request::{
    AckedReceiver, AckedSender, MAX_PENDING_ASKS, MAX_REFUSAL_LEN, Request, RequestChannel,
    Requester, Requests,
};
pub use view::{ClusterView, FacadeCounters, NodeInfo, RoutedDrops, Snapshot, TransitionReport};

pub use shoal_membership::{LeaseStrategy, MemberState};
pub use shoal_placement::{NodeId, PlacementTable, Strategy, View, ViewId};
pub use shoal_transition::{DatumState, FencingToken, JobReason};
pub use shoal_transport::{ClusterCa, NodeIdentity, NodeName, throwaway_cluster};

/// The membership layer (SWIM with Lifeguard, leases), for the types a
/// [`Snapshot`] and [`NodeConfig`] name (`membership::Stats`,
/// `membership::Member`, …).
pub use shoal_membership as membership;
/// The placement layer, for the types a [`ClusterView`] names.
pub use shoal_placement as placement;
/// The handoff layer, for the types a [`Snapshot`] names
/// (`transition::Counters`, …).
pub use shoal_transition as transition;
/// The QUIC transport, for the types a [`Snapshot`] names
/// (`transport::StatsSnapshot`, …) and for building identities.
pub use shoal_transport as transport;
