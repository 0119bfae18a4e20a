//! Error types of the transition layer.

use std::fmt;

use shoal_placement::NodeId;

use crate::Datum;

/// Registering datums or datum types failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// Type names must be 1 to 255 bytes long.
    #[error("datum type name of {len} bytes: must be 1 to 255 bytes")]
    BadTypeName {
        /// Length of the rejected name.
        len: usize,
    },
    /// The node already interned the most types it accepts.
    #[error("too many datum types (at most {max})")]
    TooManyTypes {
        /// The limit.
        max: usize,
    },
    /// The type was not interned by this node.
    #[error("unknown datum type index {0}")]
    UnknownType(u32),
    /// The node was declared failed by the cluster and stopped for good.
    #[error("this node is fenced (the cluster declared it failed)")]
    Fenced,
}

/// Decoding bytes received from a peer failed. The bytes change nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The message is larger than the receiver accepts.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Size of the message.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The envelope names a wire version this build does not speak.
    #[error("unsupported wire version {0}")]
    Version(u8),
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Bytes were left over after the message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// A datum type name is empty or too long.
    #[error("datum type name of {len} bytes: must be 1 to {max}")]
    BadTypeName {
        /// Length of the name.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Too many groups of one type in a batch.
    #[error("{count} type groups in a batch (at most {max})")]
    TooManyGroups {
        /// Groups in the batch.
        count: usize,
        /// The limit.
        max: usize,
    },
}

/// A batch of notices was refused as a whole. Counted; nothing else changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoticeError {
    /// The bytes did not decode.
    #[error("undecodable notice batch: {0}")]
    Wire(#[from] WireError),
    /// The batch names another sender than the authenticated peer it came from.
    #[error("notice batch claims to come from {claimed}, but arrived from {peer}")]
    SenderMismatch {
        /// The sender named in the batch.
        claimed: NodeId,
        /// The authenticated peer.
        peer: NodeId,
    },
    /// The batch is addressed to another node (or an earlier generation of this one).
    #[error("notice batch addressed to {to}, not to this node")]
    Misaddressed {
        /// The addressee named in the batch.
        to: NodeId,
    },
    /// This node is fenced and takes no part any more.
    #[error("this node is fenced (the cluster declared it failed)")]
    Fenced,
    /// The batch's epoch is further ahead of every epoch this node knew than
    /// any run of installs could take it ([`MAX_EPOCH_JUMP`]).
    ///
    /// [`MAX_EPOCH_JUMP`]: crate::MAX_EPOCH_JUMP
    #[error("notice batch epoch {epoch} jumps too far ahead of {known}")]
    EpochJump {
        /// The epoch in the batch.
        epoch: u64,
        /// The highest epoch this node knew.
        known: u64,
    },
}

/// The configuration is inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A duration that must be positive is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// `relinquish_timeout` must not exceed `timeout`.
    #[error("relinquish_timeout must not exceed timeout")]
    RelinquishAfterTimeout,
}

/// Why [`Handoff::hold`](crate::Handoff::hold) refused a piece of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldErrorKind {
    /// The node's hold buffer is full: push back on the sender and retry later.
    Full,
    /// The datum is not in a state where work is held: route it again
    /// ([`Handoff::route`](crate::Handoff::route)).
    NotHeld,
    /// This node is fenced.
    Fenced,
}

/// Work refused by [`Handoff::hold`](crate::Handoff::hold), handed back untouched.
pub struct HoldError<W> {
    /// Why it was refused.
    pub kind: HoldErrorKind,
    /// The datum the work is for.
    pub datum: Datum,
    /// The work itself, returned to the caller.
    pub work: W,
}

impl<W> fmt::Debug for HoldError<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HoldError")
            .field("kind", &self.kind)
            .field("datum", &self.datum)
            .finish_non_exhaustive()
    }
}

impl<W> fmt::Display for HoldError<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            HoldErrorKind::Full => write!(f, "hold buffer full, work for {} refused", self.datum),
            HoldErrorKind::NotHeld => {
                write!(f, "work for {} is not held now: route it again", self.datum)
            }
            HoldErrorKind::Fenced => write!(f, "node fenced, work for {} refused", self.datum),
        }
    }
}

impl<W> std::error::Error for HoldError<W> {}
