//! QUIC transport for shoal: one endpoint per node, mutual TLS against the
//! cluster CA, unreliable datagrams and framed messages over streams.
//!
//! This layer moves bytes between authenticated nodes and knows nothing of
//! membership or datums. The facade uses it for:
//!
//! - **datagrams** by address ([`Transport::send_datagram`]): SWIM packets;
//!   they may be lost, are never truncated, and a payload larger than
//!   [`Transport::max_datagram_size`] is an error;
//! - **one-way messages** ([`Transport::send`]): framed on one long-lived
//!   stream per peer, in order, through a bounded per-peer queue that makes
//!   the sender wait or fail ([`WhenFull`]);
//! - **requests** ([`Transport::request`]): up to 64 KiB on data channels,
//!   multiplexed by id on one long-lived requests stream per peer and their
//!   answers on the peer's answers stream; on control channels, or larger,
//!   one short stream each. Answered through the [`Responder`] in the
//!   received [`Message`].
//!
//! Every connection is TLS 1.3 with client certificates, ALPN `shoal/1` and
//! no 0-RTT. The peer's certificate must chain to the cluster CA
//! ([`ClusterCa`]) and name a node ([`NodeName`]): when dialing a known node
//! ([`Dest::node`]) that name; when dialing an address ([`Dest::addr`], a join
//! seed) any node, whose name is then reported. A connection is used only
//! after both sides exchanged a hello, so a client whose certificate the
//! server refused never delivers anything, and every [`Datagram`] and
//! [`Message`] carries the verified [`Peer`] (name and address).
//!
//! Messages are postcard envelopes (version, channel id, body), compressed
//! with zstd above [`TransportConfig::compress_min`] when that makes them
//! smaller, and limited to [`TransportConfig::max_message_size`] on both
//! sides, checked before any allocation. See `docs/transport.md` for the wire
//! format, limits, queues and counters.
//!
//! ```no_run
//! use bytes::Bytes;
//! use shoal_transport::{
//!     ClusterCa, Dest, Inbound, NodeName, Transport, TransportConfig, WhenFull,
//! };
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! // One CA per cluster; each node gets a certificate naming it.
//! let ca = ClusterCa::generate()?;
//! let a_id = ca.issue(&NodeName::new("node-a")?)?;
//! let b_id = ca.issue(&NodeName::new("node-b")?)?;
//!
//! let local = "127.0.0.1:0".parse()?;
//! let (a, _a_in) = Transport::bind(local, &a_id, TransportConfig::default())?;
//! let (b, mut b_in) = Transport::bind(local, &b_id, TransportConfig::default())?;
//!
//! // A known node by name and address; a seed would be Dest::addr(addr).
//! let to_b = Dest::node(b_id.name().clone(), b.local_addr());
//! a.send(&to_b, 1, Bytes::from_static(b"hello"), WhenFull::Wait).await?;
//! a.send_datagram(&to_b, b"ping").await?;
//!
//! while let Some(item) = b_in.recv().await {
//!     match item {
//!         Inbound::Datagram(d) => println!("datagram from {}", d.from),
//!         Inbound::Message(m) => println!("message on {} from {}", m.channel, m.from),
//!     }
//! }
//! # Ok(())
//! # }
//! ```

mod budget;
mod config;
mod endpoint;
mod error;
pub mod frame;
mod inbound;
mod name;
mod sever;
mod stats;
mod trust;
pub mod virtual_net;

pub use budget::MESSAGE_OVERHEAD;
pub use bytes::Bytes;
pub use config::{CONTROL_STREAMS, ChannelCap, TransportConfig, WhenFull};
pub use endpoint::Transport;
pub use error::{BindError, TransportError, TrustError};
pub use inbound::{
    Datagram, DatagramReceiver, Inbound, Incoming, Message, MessageReceiver, Responder,
};
pub use name::{Dest, MAX_NODE_NAME_LEN, NodeName, Peer};
pub use stats::StatsSnapshot;
pub use trust::{ALPN, ClusterCa, NODE_CERT_YEARS, NodeIdentity};

/// Builds a throwaway cluster CA and one identity per name, in memory: for
/// tests, examples and local runs (`cargo xtask sim`).
///
/// # Errors
/// [`TrustError`] for an invalid name or a generation failure.
pub fn throwaway_cluster(names: &[&str]) -> Result<(ClusterCa, Vec<NodeIdentity>), TrustError> {
    let ca = ClusterCa::generate()?;
    let ids = names
        .iter()
        .map(|n| ca.issue(&NodeName::new(n)?))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ca, ids))
}
