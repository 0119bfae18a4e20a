//! SWIM membership with the Lifeguard extensions, as a sans-IO state machine.
//!
//! This layer decides who is in a shoal cluster. Each node probes one member
//! per protocol period; a member that answers neither a direct ping nor the
//! indirect pings sent through other members becomes *suspect*, and is
//! declared *dead* when its suspicion times out without a refutation. Member
//! state (alive / suspect / dead / left, incarnation, ready flag, generation,
//! user metadata) spreads by piggybacking on every packet, by gossip rounds and
//! by periodic full-state push-pull exchanges. The layers above (placement,
//! transition) act on its events: who joined, failed or left, and the
//! coalesced view of live members.
//!
//! Lifeguard makes the detector fast without crying wolf: a node that misses
//! acks and nacks backs its own probing off (local health), a suspicion
//! starts long and shrinks only as independent members confirm it, and a
//! probe of a suspect carries the suspicion so it can refute at once.
//!
//! # Sans-IO
//!
//! [`Membership`] does no I/O, reads no clock and draws randomness only from
//! the seeded generator it is given. The driver feeds it packets
//! ([`handle_packet`](Membership::handle_packet)) and timeouts
//! ([`handle_timeout`](Membership::handle_timeout)) with the current time, and
//! polls what it wants to send ([`poll_transmit`](Membership::poll_transmit)),
//! what happened ([`poll_event`](Membership::poll_event)) and when to wake it
//! next ([`poll_timeout`](Membership::poll_timeout)). Transmits marked
//! `reliable` (push-pull states, joins, the fallback ping) go on a stream;
//! the others are datagrams of at most `max_packet_size` bytes.
//!
//! # Example
//!
//! Two nodes in memory, on a virtual clock:
//!
//! ```
//! use std::time::{Duration, Instant};
//! use rand::{SeedableRng, rngs::SmallRng};
//! use shoal_membership::{Config, LocalNode, Membership, MemberState};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let start = Instant::now(); // the driver's clock, not the core's
//! let node = |name: &str, port: u16| LocalNode {
//!     name: name.into(),
//!     generation: 1,
//!     addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
//!     ready: true,
//!     metadata: Vec::new(),
//! };
//! let mut nodes = [
//!     Membership::new(Config::lan(), node("a", 7001), SmallRng::seed_from_u64(1), start)?,
//!     Membership::new(Config::lan(), node("b", 7002), SmallRng::seed_from_u64(2), start)?,
//! ];
//! nodes[1].join(&[nodes[0].local().addr], start);
//!
//! // Deliver every transmit at once and step the clock by 10 ms for 2 s.
//! for step in 0..200 {
//!     let now = start + Duration::from_millis(10 * step);
//!     for node in &mut nodes {
//!         node.handle_timeout(now);
//!     }
//!     for from in 0..2 {
//!         while let Some(transmit) = nodes[from].poll_transmit() {
//!             // The sender's address, and its name as the transport
//!             // authenticated it (its certificate's name).
//!             let (addr, name) = (nodes[from].local().addr, nodes[from].local().name.clone());
//!             let to = nodes.iter_mut().find(|n| n.local().addr == transmit.to).unwrap();
//!             to.handle_packet(addr, Some(&name), &transmit.payload, now)?;
//!         }
//!     }
//! }
//! for node in &nodes {
//!     let alive = node.members().filter(|m| m.state == MemberState::Alive).count();
//!     assert_eq!(alive, 2);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The protocol, message types, timers, precedence rules and the profiles'
//! computed detection times and bandwidth are in `docs/membership.md`.

mod broadcast;
mod config;
#[cfg(feature = "forge")]
pub mod forge;
mod hash;
mod lease;
mod membership;
mod suspicion;
mod takeover;
mod types;
mod wire;

#[cfg(test)]
mod tests;

pub use config::Config;
pub use lease::{LeaseEvidence, LeaseStrategy, Standing};
pub use membership::Membership;
pub use takeover::TakeoverGate;
pub use types::{
    Claimant, DecodeError, Error, Event, LocalNode, Member, MemberState, Stats, Transmit,
};

/// The protocol version this build speaks (first byte of every packet).
pub const PROTOCOL_VERSION: u8 = wire::VERSION;
