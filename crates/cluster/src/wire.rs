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
/// Transport channel of messages routed to a datum's owner.
pub const CH_ROUTED: u32 = 3;
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
            payload: Bytes::copy_from_slice(body.payload),
        })
    }
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

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Routed::decode(&bytes, 256);
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
