//! Error types of the facade.

use shoal_transport::{BindError, TransportError, TrustError};

/// The configuration is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A bound that must be positive is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(&'static str),
}

/// Starting a node failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Reading or creating the certificates failed.
    #[error("certificates: {0}")]
    Trust(#[from] TrustError),
    /// The certificate names another node than `config.name`.
    #[error("the certificate names {cert:?}, the configuration {config:?}")]
    NameMismatch {
        /// Name in the certificate.
        cert: String,
        /// Name in the configuration.
        config: String,
    },
    /// The transport could not start.
    #[error("transport: {0}")]
    Bind(#[from] BindError),
    /// Membership refused the node (name or metadata out of range).
    #[error("membership: {0}")]
    Membership(#[from] shoal_membership::Error),
    /// The handoff layer refused its configuration.
    #[error("transition: {0}")]
    Transition(#[from] shoal_transition::ConfigError),
    /// The placement layer refused the strategy or copies.
    #[error("placement: {0}")]
    Placement(#[from] shoal_placement::PlacementError),
    /// `bind` is a wildcard address and no `advertise` address was given.
    #[error("bind address {0} is a wildcard: set `advertise`")]
    NoAdvertiseAddress(std::net::SocketAddr),
    /// `tls` is `provided` but no identity was passed.
    #[error("tls is `provided`: start the node with Node::start_with_identity")]
    NoIdentity,
}

/// Errors of the node's API calls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The node was shut down (or its driver stopped).
    #[error("the node is shut down")]
    Shutdown,
    /// Metadata longer than the limit; nothing changed.
    #[error("metadata of {len} bytes exceeds the limit of {max}")]
    MetadataTooLarge {
        /// Length given.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The membership layer refused the request (for example a metadata
    /// limit it enforces); nothing changed.
    #[error("membership: {0}")]
    Membership(shoal_membership::Error),
    /// No seed answered within the join timeout (membership keeps trying in
    /// the background).
    #[error("no seed answered within {0:?}")]
    JoinTimeout(std::time::Duration),
    /// A datum or datum type was refused by the handoff layer.
    #[error("datum registry: {0}")]
    Registry(#[from] shoal_transition::RegistryError),
    /// A channel name is taken already, or collides with another name's id.
    #[error("channel {name:?} is already registered (id {id:#x})")]
    ChannelTaken {
        /// The name asked for.
        name: String,
        /// Its id.
        id: u32,
    },
    /// The channel name is empty or longer than 255 bytes.
    #[error("invalid channel name of {0} bytes (1 to 255)")]
    BadChannelName(usize),
    /// A graceful leave ([`Node::leave`](crate::Node::leave)) gave up these
    /// datums `(type, id)`: their relinquish failed or had not completed by
    /// the leave's timeout. The node left all the same, holding nothing;
    /// the datums' new owners took them without a notice, so state the
    /// relinquish did not save is lost unless the application kept it.
    #[error("left without relinquishing {} datum(s)", datums.len())]
    LeaveIncomplete {
        /// The datums given up, `(type, id)`.
        datums: Vec<(String, i64)>,
        /// How the leave's transition went.
        report: Box<crate::TransitionReport>,
    },
}

/// Sending a typed message failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The payload could not be serialised.
    #[error("payload does not serialise: {0}")]
    Encode(#[from] postcard::Error),
    /// No live member of that name.
    #[error("no live member named {0:?}")]
    UnknownNode(String),
    /// No ready node owns the datum (the cluster has no ready node).
    #[error("datum {datum_type}:{id} has no owner")]
    NoOwner {
        /// The datum type.
        datum_type: String,
        /// The datum id.
        id: i64,
    },
    /// The transport refused or failed the send.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The node was shut down.
    #[error("the node is shut down")]
    Shutdown,
}

/// An ask ([`Requester`](crate::Requester)) or an acknowledged send
/// ([`AckedSender`](crate::AckedSender)) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No answer within the timeout. The receiver may still have taken the
    /// ask: its node crashed, the message was dropped on the way (every
    /// drop is counted by reason on the node that dropped it), or the
    /// handler is slow.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The receiving application refused the ask (or dropped it without an
    /// answer, or its request did not decode there).
    #[error("refused: {0}")]
    Refused(String),
    /// The node asked is no longer a live member (it died or left) and had
    /// not answered.
    #[error("node {0:?} is gone")]
    PeerGone(String),
    /// The ask could not be sent: no owner, no such node, the transport
    /// failed, or the request does not serialise.
    #[error(transparent)]
    Send(#[from] SendError),
    /// The answer did not decode as the response type.
    #[error("the answer does not decode: {0}")]
    BadAnswer(String),
    /// Too many asks wait for an answer on this channel already; nothing
    /// was sent.
    #[error("{0} asks are waiting already")]
    TooManyPending(usize),
    /// This node shut down while the ask waited.
    #[error("the node is shut down")]
    Shutdown,
}
