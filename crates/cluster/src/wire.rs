//! What the facade itself puts on the wire: channel ids, and the envelope of
//! a message routed to a datum's owner.
//!
//! Membership packets and notice batches are encoded by their layers; the
//! facade only chooses the transport channel they ride on. A routed message
//! is postcard behind a one-byte version envelope (`[version][body]`);
//! decoding is bounded by the transport's message limit, names by 255 bytes,
//! and every failure is a typed [`WireError`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Transport channel of reliable membership transmits (push-pull, join,
/// fallback ping).
pub const CH_MEMBERSHIP: u32 = 1;
/// Transport channel of relinquish notice batches (request / answer).
pub const CH_NOTICES: u32 = 2;
/// Transport channel of messages routed to a datum's owner: one-way, or as
/// a request (a leaving node's forwards) answered [`ROUTED_TAKEN`] or
/// [`ROUTED_REFUSED`].
pub const CH_ROUTED: u32 = 3;
/// Transport channel of routed messages a leaving node refused, handed back
/// to the node that sent them ([`Refusal`], request answered
/// [`ROUTED_TAKEN`] once that node's driver routed it again).
pub const CH_REFUSED: u32 = 4;
/// Transport channel of routed messages sent together ([`RoutedBatch`]):
/// one-way; a link to a peer batches the routed messages that queued up
/// for it while it was sending, so an idle link sends each alone (on
/// [`CH_ROUTED`]) and a busy one pays the transport's per-message cost once
/// per batch.
pub const CH_ROUTED_BATCH: u32 = 5;
/// Features of the facade a node announces to its peers (in the transport's
/// hello, [`shoal_transport::TransportConfig::app_features`]); a node uses
/// one towards a peer only if the peer announced it, so nodes of two
/// versions can run in one cluster (a rolling upgrade).
pub mod features {
    /// The peer takes batches of routed messages ([`super::CH_ROUTED_BATCH`]):
    /// towards one that does not, each routed message goes alone.
    pub const ROUTED_BATCH: u32 = 1;
    /// Everything this version speaks.
    pub const ALL: u32 = ROUTED_BATCH;
}

/// User channels have this bit set; internal ones never do.
pub const USER_CHANNEL_BIT: u32 = 0x8000_0000;

/// Version byte of a routed message.
pub const ROUTED_VERSION: u8 = 1;
/// Longest datum type or node name carried in a routed message.
pub const MAX_NAME_LEN: usize = 255;

/// Answer to a notice batch: taken.
pub const NOTICE_ACK: &[u8] = &[0];
/// Answer to a notice batch: refused (the sender retries).
pub const NOTICE_NACK: &[u8] = &[1];

/// Answer to a routed message (or a refusal) sent as a request: the node's
/// driver took it.
pub const ROUTED_TAKEN: &[u8] = &[0];
/// Answer to a routed message sent as a request: refused, this node is
/// leaving; the sender routes it again.
pub const ROUTED_REFUSED: &[u8] = &[1];

/// Version byte of a batch of routed messages.
pub const ROUTED_BATCH_VERSION: u8 = 1;

/// Version byte of a refusal.
pub const REFUSAL_VERSION: u8 = 1;

/// The stable id of a user channel: FNV-1a (32 bit) of its name, with the
/// user bit set. Every node derives the same id from the same name,
/// whatever order channels are registered in.
pub fn channel_id(name: &str) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash | USER_CHANNEL_BIT
}

/// A message on its way to the owner of a datum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routed {
    /// The user channel id.
    pub channel: u32,
    /// The datum's type name.
    pub datum_type: String,
    /// The datum's id.
    pub id: i64,
    /// The node the application sent it from.
    pub origin: String,
    /// Times a node that was not the owner forwarded it.
    pub hops: u8,
    /// The serialised user payload.
    pub payload: Bytes,
}

#[derive(Serialize, Deserialize)]
struct RoutedBody<'a> {
    channel: u32,
    datum_type: &'a str,
    id: i64,
    origin: &'a str,
    hops: u8,
    #[serde(with = "serde_bytes_ref")]
    payload: &'a [u8],
}

mod serde_bytes_ref {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<&'de [u8], D::Error> {
        <&'de [u8]>::deserialize(d)
    }
}

/// Decoding a routed message failed; the message is dropped and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Zero bytes.
    #[error("empty message")]
    Empty,
    /// Larger than the limit.
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Length received.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Another version.
    #[error("unsupported routed-message version {0}")]
    Version(u8),
    /// Not a valid message.
    #[error("malformed routed message: {0}")]
    Malformed(String),
    /// Bytes left after the message.
    #[error("{0} trailing bytes after the routed message")]
    Trailing(usize),
    /// A name that is empty or too long.
    #[error("name of {0} bytes in a routed message (1 to 255)")]
    BadName(usize),
    /// A channel id without the user bit.
    #[error("routed message for internal channel {0:#x}")]
    BadChannel(u32),
}

impl shoal_core::Work for Routed {
    fn datum_type(&self) -> &str {
        &self.datum_type
    }

    fn datum_id(&self) -> i64 {
        self.id
    }

    fn hops(&self) -> u8 {
        self.hops
    }

    fn set_hops(&mut self, hops: u8) {
        self.hops = hops;
    }

    fn origin(&self) -> Option<&str> {
        Some(&self.origin)
    }

    fn set_origin(&mut self, origin: &str) {
        origin.clone_into(&mut self.origin);
    }
}

impl Routed {
    /// Encodes the message in its version envelope.
    pub fn encode(&self) -> Bytes {
        let body = RoutedBody {
            channel: self.channel,
            datum_type: &self.datum_type,
            id: self.id,
            origin: &self.origin,
            hops: self.hops,
            payload: &self.payload,
        };
        let mut out = Vec::with_capacity(self.payload.len() + self.datum_type.len() + 32);
        out.push(ROUTED_VERSION);
        // Serialising into a Vec cannot fail for this struct; on the
        // impossible failure the receiver sees a malformed message.
        match postcard::to_extend(&body, out) {
            Ok(out) => Bytes::from(out),
            Err(_) => Bytes::from_static(&[ROUTED_VERSION]),
        }
    }

    /// Decodes a routed message of at most `max` bytes.
    ///
    /// # Errors
    /// [`WireError`]; the bytes change nothing.
    pub fn decode(bytes: &[u8], max: usize) -> Result<Routed, WireError> {
        Self::decode_with(bytes, max, Bytes::copy_from_slice)
    }

    /// As [`Routed::decode`], but the payload is a slice of `bytes`, not a
    /// copy: whatever `bytes` holds (the transport's inbound budget, for a
    /// message from a peer) stays held while the payload lives.
    ///
    /// # Errors
    /// [`WireError`]; the bytes change nothing.
    pub fn decode_shared(bytes: &Bytes, max: usize) -> Result<Routed, WireError> {
        Self::decode_with(bytes, max, |p| bytes.slice_ref(p))
    }

    fn decode_with(
        bytes: &[u8],
        max: usize,
        payload: impl FnOnce(&[u8]) -> Bytes,
    ) -> Result<Routed, WireError> {
        let (&version, rest) = bytes.split_first().ok_or(WireError::Empty)?;
        if bytes.len() > max {
            return Err(WireError::TooLarge {
                len: bytes.len(),
                max,
            });
        }
        if version != ROUTED_VERSION {
            return Err(WireError::Version(version));
        }
        let (body, tail): (RoutedBody<'_>, &[u8]) =
            postcard::take_from_bytes(rest).map_err(|e| WireError::Malformed(e.to_string()))?;
        if !tail.is_empty() {
            return Err(WireError::Trailing(tail.len()));
        }
        for name in [body.datum_type, body.origin] {
            if name.is_empty() || name.len() > MAX_NAME_LEN {
                return Err(WireError::BadName(name.len()));
            }
        }
        if body.channel & USER_CHANNEL_BIT == 0 {
            return Err(WireError::BadChannel(body.channel));
        }
        Ok(Routed {
            channel: body.channel,
            datum_type: body.datum_type.to_owned(),
            id: body.id,
            origin: body.origin.to_owned(),
            hops: body.hops,
            payload: payload(body.payload),
        })
    }
}

/// Why a node refused a routed message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseReason {
    /// The node is leaving: it has handed on what it held and takes nothing
    /// more.
    Leaving,
}

impl RefuseReason {
    fn code(self) -> u8 {
        match self {
            RefuseReason::Leaving => 1,
        }
    }

    fn from_code(code: u8) -> Option<RefuseReason> {
        match code {
            1 => Some(RefuseReason::Leaving),
            _ => None,
        }
    }
}

/// A routed message handed back to the node that sent it, with the reason:
/// `[version][reason][routed message]` on [`CH_REFUSED`]. The node routes
/// it again (to the owner in force).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Why it was refused.
    pub reason: RefuseReason,
    /// The message, as it arrived at the refusing node.
    pub routed: Routed,
}

impl Refusal {
    /// Builds the frame from the refused message's bytes as they arrived
    /// (they are not decoded on the refusing node).
    pub fn encode_raw(reason: RefuseReason, routed: &[u8]) -> Bytes {
        let mut out = Vec::with_capacity(routed.len() + 2);
        out.push(REFUSAL_VERSION);
        out.push(reason.code());
        out.extend_from_slice(routed);
        Bytes::from(out)
    }

    /// Encodes a refusal.
    pub fn encode(&self) -> Bytes {
        Refusal::encode_raw(self.reason, &self.routed.encode())
    }

    /// Decodes a refusal of at most `max` bytes.
    ///
    /// # Errors
    /// [`WireError`] (a bad version, an unknown reason, or the routed
    /// message's own errors); the bytes change nothing.
    pub fn decode(bytes: &[u8], max: usize) -> Result<Refusal, WireError> {
        let [version, reason, routed @ ..] = bytes else {
            return Err(WireError::Empty);
        };
        if *version != REFUSAL_VERSION {
            return Err(WireError::Version(*version));
        }
        let reason = RefuseReason::from_code(*reason)
            .ok_or_else(|| WireError::Malformed(format!("unknown refusal reason {reason}")))?;
        Ok(Refusal {
            reason,
            routed: Routed::decode(routed, max)?,
        })
    }
}

/// A batch of routed messages, each kept encoded as on [`CH_ROUTED`]:
/// `[version][count: u32 LE]` then, `count` times, `[len: u32 LE][message]`.
pub struct RoutedBatch;

impl RoutedBatch {
    /// Bytes a message adds to a batch besides its own.
    pub const ENTRY_OVERHEAD: usize = 4;
    /// Bytes of the batch's header.
    pub const HEADER: usize = 5;

    /// Encodes encoded routed messages as one batch.
    pub fn encode(messages: &[Bytes]) -> Bytes {
        let len = Self::HEADER
            + messages
                .iter()
                .map(|m| m.len() + Self::ENTRY_OVERHEAD)
                .sum::<usize>();
        let mut out = Vec::with_capacity(len);
        out.push(ROUTED_BATCH_VERSION);
        out.extend_from_slice(&(messages.len() as u32).to_le_bytes());
        for m in messages {
            out.extend_from_slice(&(m.len() as u32).to_le_bytes());
            out.extend_from_slice(m);
        }
        Bytes::from(out)
    }

    /// The messages of a batch of at most `max` bytes, as slices of
    /// `bytes` (each holds the batch's inbound budget until dropped); each
    /// is then decoded with [`Routed::decode_shared`].
    ///
    /// # Errors
    /// [`WireError`] for a batch that is empty, too large, of another
    /// version, or whose lengths do not add up; the bytes change nothing.
    pub fn split(bytes: &Bytes, max: usize) -> Result<Vec<Bytes>, WireError> {
        if bytes.len() > max {
            return Err(WireError::TooLarge {
                len: bytes.len(),
                max,
            });
        }
        let (&version, rest) = bytes.split_first().ok_or(WireError::Empty)?;
        if version != ROUTED_BATCH_VERSION {
            return Err(WireError::Version(version));
        }
        let (count, mut rest) = take_u32(rest)?;
        // Every entry takes at least its length prefix and one byte.
        if count as usize > rest.len() / (Self::ENTRY_OVERHEAD + 1) {
            return Err(WireError::Malformed(format!(
                "a batch of {count} messages in {} bytes",
                rest.len()
            )));
        }
        let mut messages = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let (len, tail) = take_u32(rest)?;
            let len = len as usize;
            if len == 0 || len > tail.len() {
                return Err(WireError::Malformed(format!(
                    "a batch entry of {len} bytes with {} left",
                    tail.len()
                )));
            }
            let (message, tail) = tail.split_at(len);
            messages.push(bytes.slice_ref(message));
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(WireError::Trailing(rest.len()));
        }
        Ok(messages)
    }
}

fn take_u32(bytes: &[u8]) -> Result<(u32, &[u8]), WireError> {
    let (head, rest) = bytes
        .split_first_chunk::<4>()
        .ok_or_else(|| WireError::Malformed("a batch cut short".into()))?;
    Ok((u32::from_le_bytes(*head), rest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Routed {
        Routed {
            channel: channel_id("points"),
            datum_type: "series".into(),
            id: -42,
            origin: "node-1".into(),
            hops: 1,
            payload: Bytes::from_static(b"hello"),
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(Routed::decode(&m.encode(), 1 << 20).unwrap(), m);
    }

    #[test]
    fn batches_round_trip_as_slices_of_the_batch() {
        let messages: Vec<Bytes> = (0..3)
            .map(|i| {
                let mut m = sample();
                m.id = i;
                m.encode()
            })
            .collect();
        let batch = RoutedBatch::encode(&messages);
        let split = RoutedBatch::split(&batch, 1 << 20).unwrap();
        assert_eq!(split, messages);
        // Zero-copy: each message points into the batch.
        let range = batch.as_ptr() as usize..batch.as_ptr() as usize + batch.len();
        assert!(split.iter().all(|m| range.contains(&(m.as_ptr() as usize))));
        assert_eq!(
            RoutedBatch::split(&RoutedBatch::encode(&[]), 64),
            Ok(vec![])
        );
    }

    #[test]
    fn batches_refuse_bad_input() {
        let batch = RoutedBatch::encode(&[sample().encode(), sample().encode()]);
        let bad = |v: Vec<u8>| RoutedBatch::split(&Bytes::from(v), 1 << 20);
        assert_eq!(bad(vec![]), Err(WireError::Empty));
        assert!(matches!(
            RoutedBatch::split(&batch, batch.len() - 1),
            Err(WireError::TooLarge { .. })
        ));
        let mut v = batch.to_vec();
        v[0] = 7;
        assert_eq!(bad(v), Err(WireError::Version(7)));
        let mut v = batch.to_vec();
        v.push(0);
        assert_eq!(bad(v), Err(WireError::Trailing(1)));
        // Cut short, and a count the bytes cannot hold.
        assert!(matches!(
            bad(batch[..batch.len() - 1].to_vec()),
            Err(WireError::Malformed(_))
        ));
        let mut v = batch.to_vec();
        v[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(bad(v), Err(WireError::Malformed(_))));
        // An entry longer than what is left.
        let mut v = batch.to_vec();
        v[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(bad(v), Err(WireError::Malformed(_))));
    }

    #[test]
    fn channel_ids_are_stable_and_user_tagged() {
        assert_eq!(channel_id("points"), channel_id("points"));
        assert_ne!(channel_id("points"), channel_id("point"));
        assert!(channel_id("") & USER_CHANNEL_BIT != 0);
        // FNV-1a of "a" is 0xe40c292c.
        assert_eq!(channel_id("a"), 0xe40c_292c);
    }

    #[test]
    fn refuses_bad_input() {
        let bytes = sample().encode();
        assert_eq!(Routed::decode(&[], 100), Err(WireError::Empty));
        assert!(matches!(
            Routed::decode(&bytes, 4),
            Err(WireError::TooLarge { .. })
        ));
        let mut v = bytes.to_vec();
        v[0] = 9;
        assert_eq!(Routed::decode(&v, 1 << 20), Err(WireError::Version(9)));
        let mut v = bytes.to_vec();
        v.push(0);
        assert_eq!(Routed::decode(&v, 1 << 20), Err(WireError::Trailing(1)));
        let truncated = &bytes[..bytes.len() - 2];
        assert!(matches!(
            Routed::decode(truncated, 1 << 20),
            Err(WireError::Malformed(_))
        ));
        let mut m = sample();
        m.channel = CH_ROUTED;
        assert!(matches!(
            Routed::decode(&m.encode(), 1 << 20),
            Err(WireError::BadChannel(_))
        ));
        let mut m = sample();
        m.origin = String::new();
        assert_eq!(
            Routed::decode(&m.encode(), 1 << 20),
            Err(WireError::BadName(0))
        );
    }

    #[test]
    fn refusal_round_trip_and_bad_input() {
        let r = Refusal {
            reason: RefuseReason::Leaving,
            routed: sample(),
        };
        let bytes = r.encode();
        assert_eq!(Refusal::decode(&bytes, 1 << 20).unwrap(), r);
        assert_eq!(Refusal::decode(&[], 100), Err(WireError::Empty));
        assert_eq!(Refusal::decode(&[1], 100), Err(WireError::Empty));
        let mut v = bytes.to_vec();
        v[0] = 7;
        assert_eq!(Refusal::decode(&v, 1 << 20), Err(WireError::Version(7)));
        let mut v = bytes.to_vec();
        v[1] = 9;
        assert!(matches!(
            Refusal::decode(&v, 1 << 20),
            Err(WireError::Malformed(_))
        ));
        let mut v = bytes.to_vec();
        v.push(0);
        assert_eq!(Refusal::decode(&v, 1 << 20), Err(WireError::Trailing(1)));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Routed::decode(&bytes, 256);
            let _ = Refusal::decode(&bytes, 256);
        }

        #[test]
        fn mutated_messages_never_panic(i in 0usize..64, b in any::<u8>()) {
            let mut v = sample().encode().to_vec();
            let n = v.len();
            v[i % n] = b;
            let _ = Routed::decode(&v, 1 << 20);
        }
    }
}
