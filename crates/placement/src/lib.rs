//! Placement: which nodes own a datum.
//!
//! shoal gives every datum (an integer id) one primary owner, plus replica
//! owners when `copies > 1`. This crate is the pure function from a
//! membership view to those owners. It is sans-IO: no clock, no sockets, no
//! randomness, so every node that sees the same set of ready members computes
//! the same owners.
//!
//! - A [`View`] is the placement list: the ready members, oldest generation
//!   (process start time) first, ties by name, with a stable [`ViewId`].
//! - A [`Strategy`] is the rule: [`Strategy::ModN`], the seed's
//!   `ready[(id + i) mod n]`, or [`Strategy::Rendezvous`], fixed partitions
//!   placed by bounded-load rendezvous hashing so a join or leave moves only
//!   about `1/(n+1)` or `1/n` of the datums.
//! - A [`PlacementTable`] is built once per view and answers
//!   [`PlacementTable::owners`] in O(1) without allocating;
//!   [`PlacementTable::diff`] lists, for a set of datums, which change
//!   primary and which change replicas between two tables;
//!   [`PlacementTable::rebuild`] builds the next view's table from the
//!   current one, with the same result as a build but in time proportional
//!   to the nodes that changed.
//!
//! ```
//! use shoal_placement::{ViewMember, PlacementTable, Strategy, View};
//!
//! let old = View::new([
//!     ViewMember::new("b", 200, true),
//!     ViewMember::new("a", 100, true),
//!     ViewMember::new("c", 300, false), // not ready: takes no part
//! ]);
//! assert_eq!(old.nodes()[0].name, "a"); // oldest first
//!
//! let table = PlacementTable::build(old.clone(), &Strategy::ModN, 2)?;
//! // Datum 7 on 2 nodes: primary ready[7 mod 2] = "b", replica "a".
//! let owners: Vec<&str> = table.owner_ids(7).map(|n| n.name.as_str()).collect();
//! assert_eq!(owners, ["b", "a"]);
//! assert_eq!(table.owners(-1).len(), 2); // negative ids are fine
//!
//! // "c" becomes ready: which datums change primary?
//! let new = View::new([
//!     ViewMember::new("a", 100, true),
//!     ViewMember::new("b", 200, true),
//!     ViewMember::new("c", 300, true),
//! ]);
//! assert_ne!(old.id(), new.id());
//! let next = PlacementTable::build(new, &Strategy::ModN, 2)?;
//! let diff = table.diff(&next, 0..6);
//! assert_eq!(diff.primary_moves.len(), 4); // mod-N moves most datums
//!
//! // The minimal-movement strategy moves about 1/(n+1) of them.
//! let r_old = PlacementTable::build(old, &Strategy::rendezvous(), 1)?;
//! let r_new = r_old.rebuild(next.view().clone())?;
//! let moved = r_old.diff(&r_new, 0..30_000).primary_moves.len();
//! assert!(moved > 8_000 && moved < 12_000);
//! # Ok::<(), shoal_placement::PlacementError>(())
//! ```
//!
//! The protocol notes, trade-offs and measured figures are in
//! `docs/placement.md`.

mod error;
pub mod hash;
mod rendezvous;
mod strategy;
mod table;
mod view;

pub use error::PlacementError;
pub use strategy::Strategy;
pub use table::{PlacementTable, PrimaryMove, TableDiff};
pub use view::{NodeId, NodeIndex, View, ViewId, ViewMember};
