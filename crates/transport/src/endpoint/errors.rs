//! Errors sorted and counted: connection, stream and decode errors turned
//! into [`TransportError`]s, and refused frames held against the
//! connection that sent them.

use super::*;

impl TransportError {
    pub(super) fn for_peer(self, dest: &Dest) -> Self {
        let peer = dest.clone();
        match self {
            Self::Unreachable { reason, .. } => Self::Unreachable { peer, reason },
            Self::Rejected { reason, .. } => Self::Rejected { peer, reason },
            Self::TooLarge {
                size, limit, side, ..
            } => Self::TooLarge {
                peer,
                size,
                limit,
                side,
            },
            Self::QueueFull { .. } => Self::QueueFull { peer },
            Self::Closed { reason, .. } => Self::Closed { peer, reason },
            Self::TimedOut { after, .. } => Self::TimedOut { peer, after },
            Self::Shutdown => Self::Shutdown,
        }
    }
}

pub(super) fn count_decode_error(inner: &Inner, e: &DecodeError) {
    match e {
        DecodeError::TooLarge { .. } => Stats::inc(&inner.stats.frames_too_large),
        DecodeError::Ratio { .. } => Stats::inc(&inner.stats.frames_over_ratio),
        _ => Stats::inc(&inner.stats.frames_malformed),
    }
}

/// Counts a frame refused for its size or ratio and holds it against the
/// connection ([`strike`]).
pub(super) fn refused(inner: &Inner, pc: &PeerConn, e: &DecodeError) {
    count_decode_error(inner, e);
    warn!(peer = %pc.peer, error = %e, "frame refused");
    strike(inner, pc);
}

/// Counts a refusal against the connection; closes it at `max_refusals`.
pub(super) fn strike(inner: &Inner, pc: &PeerConn) {
    let n = pc.refusals.fetch_add(1, Ordering::Relaxed) + 1;
    if n == inner.config.max_refusals {
        Stats::inc(&inner.stats.connections_closed_for_abuse);
        warn!(peer = %pc.peer, refusals = n, "closing a connection that keeps sending refused frames");
        pc.close(code::PROTOCOL, "too many refused frames");
    }
}

/// Sorts a connection error into the error kinds callers handle.
pub(super) fn classify(peer: &Dest, e: &ConnectionError) -> TransportError {
    let peer = peer.clone();
    let is_crypto = |code: u64| (0x100..0x200).contains(&code);
    match e {
        ConnectionError::TimedOut => TransportError::Unreachable {
            peer,
            reason: "no answer (timed out)".into(),
        },
        ConnectionError::TransportError(t) if is_crypto(u64::from(t.code)) => {
            TransportError::Rejected {
                peer,
                reason: format!("TLS handshake failed here: {t}"),
            }
        }
        ConnectionError::ConnectionClosed(c) if is_crypto(u64::from(c.error_code)) => {
            TransportError::Rejected {
                peer,
                reason: format!("the peer refused the TLS handshake: {c}"),
            }
        }
        ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from(code::REJECTED) => {
            TransportError::Rejected {
                peer,
                reason: format!(
                    "the peer refused this node: {}",
                    String::from_utf8_lossy(&c.reason)
                ),
            }
        }
        ConnectionError::VersionMismatch => TransportError::Rejected {
            peer,
            reason: "no common QUIC version".into(),
        },
        ConnectionError::LocallyClosed => TransportError::Closed {
            peer,
            reason: "closed locally".into(),
        },
        other => TransportError::Closed {
            peer,
            reason: other.to_string(),
        },
    }
}

pub(super) fn write_error(peer: &Dest, e: &quinn::WriteError) -> TransportError {
    match e {
        quinn::WriteError::Stopped(c) if *c == VarInt::from(code::TOO_LARGE) => {
            TransportError::TooLarge {
                peer: peer.clone(),
                size: 0,
                limit: 0,
                side: "refused by the receiver",
            }
        }
        quinn::WriteError::ConnectionLost(c) => classify(peer, c),
        other => TransportError::Closed {
            peer: peer.clone(),
            reason: other.to_string(),
        },
    }
}

pub(super) fn read_error(peer: &Dest, e: &quinn::ReadError) -> TransportError {
    match e {
        quinn::ReadError::Reset(c)
            if *c == VarInt::from(code::TOO_LARGE) || *c == VarInt::from(code::NO_RESPONSE) =>
        {
            refusal_error(peer, u32::try_from(c.into_inner()).unwrap_or(u32::MAX))
        }
        quinn::ReadError::ConnectionLost(c) => classify(peer, c),
        other => TransportError::Closed {
            peer: peer.clone(),
            reason: other.to_string(),
        },
    }
}

/// The error of a request the peer refused with `code` (a reset request
/// stream, or a refusal on the answers stream).
pub(super) fn refusal_error(peer: &Dest, code: u32) -> TransportError {
    let peer = peer.clone();
    match code {
        code::TOO_LARGE => TransportError::TooLarge {
            peer,
            size: 0,
            limit: 0,
            side: "refused by the receiver",
        },
        code::NO_RESPONSE => TransportError::Closed {
            peer,
            reason: "the peer dropped the request without answering".into(),
        },
        code::GONE => TransportError::Closed {
            peer,
            reason: "the peer's application is gone".into(),
        },
        code::PROTOCOL => TransportError::Rejected {
            peer,
            reason: "the peer refused the request as malformed".into(),
        },
        other => TransportError::Closed {
            peer,
            reason: format!("the peer refused the request (code {other})"),
        },
    }
}
