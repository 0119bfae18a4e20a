//! Error types of the transport.

use std::path::PathBuf;
use std::time::Duration;

use crate::name::Dest;

/// Errors creating, reading or checking certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A node name breaks the naming rules (see [`crate::NodeName`]).
    #[error("invalid node name {name:?}: {reason}")]
    InvalidName {
        /// The refused name (cut to a sane length).
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// rcgen could not generate a key or certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file or string did not hold what was expected.
    #[error("bad PEM for {what}: {reason}")]
    Pem {
        /// Which item (CA certificate, node key, ...).
        what: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A certificate is not one this cluster's CA issued for a node.
    #[error("certificate refused: {0}")]
    Certificate(String),
    /// A private key does not belong to the certificate beside it.
    #[error("the {0} key does not match its certificate")]
    KeyMismatch(&'static str),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Errors starting an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The UDP socket could not be created, configured or bound.
    #[error("cannot bind {addr}: {source}")]
    Socket {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The identity could not be turned into a TLS configuration.
    #[error(transparent)]
    Trust(#[from] TrustError),
    /// A configuration value is out of range.
    #[error("invalid transport configuration: {0}")]
    Config(String),
    /// The endpoint must be started from inside a tokio runtime.
    #[error("no tokio runtime: start the transport from inside one")]
    NoRuntime,
}

/// Why sending to a peer, or waiting for its answer, failed. Every variant
/// but [`TransportError::Shutdown`] says which peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// No connection could be established (no answer, refused by the network).
    #[error("cannot reach {peer}: {reason}")]
    Unreachable {
        /// The destination.
        peer: Dest,
        /// What happened.
        reason: String,
    },
    /// The handshake or a check after it failed: bad certificate, wrong node
    /// name, or the peer refused our certificate.
    #[error("{peer} rejected: {reason}")]
    Rejected {
        /// The destination.
        peer: Dest,
        /// What was refused, by whom.
        reason: String,
    },
    /// The message or datagram is larger than the sender's limit, the
    /// receiver's limit (the receiver refused it), or the current datagram
    /// size.
    #[error("{size} bytes for {peer} exceed the limit of {limit} bytes ({side})")]
    TooLarge {
        /// The destination.
        peer: Dest,
        /// Size of what was sent (0 when only the receiver knew it).
        size: u64,
        /// The limit that was hit (0 when the receiver did not say).
        limit: u64,
        /// Whose limit: "local limit", "refused by the receiver", "datagram size".
        side: &'static str,
    },
    /// The per-peer send queue is full and the caller chose not to wait.
    #[error("send queue to {peer} is full")]
    QueueFull {
        /// The destination.
        peer: Dest,
    },
    /// The connection closed (peer shut down, idle close, reset) or the peer
    /// dropped a request without answering.
    #[error("connection to {peer} closed: {reason}")]
    Closed {
        /// The destination.
        peer: Dest,
        /// What closed it.
        reason: String,
    },
    /// The operation did not finish in time.
    #[error("timed out after {after:?} waiting for {peer}")]
    TimedOut {
        /// The destination.
        peer: Dest,
        /// How long it waited.
        after: Duration,
    },
    /// The local transport was shut down.
    #[error("the transport is shut down")]
    Shutdown,
}

impl TransportError {
    /// The peer the error is about (`None` for [`TransportError::Shutdown`]).
    pub fn peer(&self) -> Option<&Dest> {
        match self {
            Self::Unreachable { peer, .. }
            | Self::Rejected { peer, .. }
            | Self::TooLarge { peer, .. }
            | Self::QueueFull { peer }
            | Self::Closed { peer, .. }
            | Self::TimedOut { peer, .. } => Some(peer),
            Self::Shutdown => None,
        }
    }
}
