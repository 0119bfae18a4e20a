//! What travels between nodes: relinquish notices, in batches.
//!
//! Encoding: postcard, behind a one-byte version envelope
//! (`[version][body]`). postcard is not self-describing, so the body enum
//! only ever gains variants at the end and a layout change bumps the version.
//! Ids in a group are sorted and sent as zig-zag varint deltas, so a batch
//! of consecutive ids costs about one byte per notice.
//!
//! Decoding is bounded: the whole message is at most
//! [`WireLimits::max_bytes`], type names at most 255 bytes, groups at most
//! [`WireLimits::max_groups`]; every failure is a typed [`WireError`], never a
//! panic.

use serde::{Deserialize, Serialize};
use shoal_placement::{NodeId, ViewId};

use crate::error::WireError;

/// The wire version this build writes and reads.
pub const WIRE_VERSION: u8 = 2;

/// Limits applied when decoding bytes from a peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireLimits {
    /// Largest accepted message, in bytes (default 1 MiB).
    pub max_bytes: usize,
    /// Most type groups in one batch (default 1,024).
    pub max_groups: usize,
}

impl Default for WireLimits {
    fn default() -> WireLimits {
        WireLimits {
            max_bytes: 1 << 20,
            max_groups: 1024,
        }
    }
}

/// The notices for the datums of one type in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoticeGroup {
    /// The datum type name.
    pub datum_type: String,
    /// The datum ids (any order; the encoder sorts them).
    pub ids: Vec<i64>,
}

/// A batch of relinquish notices from one node to another.
///
/// Each notice says: "`from` relinquished this datum (its state is durable)
/// and does not hold it; in view `view`, `to` is its primary."
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoticeBatch {
    /// The view, as the sender had it when it sent the notices, in which `to`
    /// is the primary of every datum of the batch.
    pub view: ViewId,
    /// The sender (name and generation).
    pub from: NodeId,
    /// The addressee (name and generation): a restarted node never takes
    /// notices meant for its previous generation.
    pub to: NodeId,
    /// The notices, grouped by datum type.
    pub groups: Vec<NoticeGroup>,
    /// The sender's install count when it sent the batch: which instance of
    /// `view` it speaks of (view ids recur when the same members come back).
    /// Every batch also tells the addressee that `from` is at `view` now.
    pub epoch: u64,
    /// The done marker: `from` is at `view` and has nothing left to
    /// relinquish under it (every notice it owed for that view was
    /// delivered). Lets a primary acquire a datum nobody notified it of.
    pub done: bool,
    /// With `done`: the addressee's own `epoch` this marker answers (the
    /// last batch `from` had from it said it was at `view`). A marker counts
    /// only for the instance of the view it answers, never a later one.
    /// Without `done`, in an announcement: the addressee's latest `epoch`
    /// at `view` that `from` had heard of (0: none), so the batch was sent
    /// after `from` learnt of that install (it confirms the notices the
    /// addressee parked for it). 0 in a batch of notices.
    pub echo: u64,
}

impl NoticeBatch {
    /// Number of notices in the batch.
    #[must_use]
    pub fn len(&self) -> usize {
        self.groups.iter().map(|g| g.ids.len()).sum()
    }

    /// Whether the batch holds no notice.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Encodes the batch in a version envelope.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let groups = self
            .groups
            .iter()
            .map(|g| {
                let mut ids = g.ids.clone();
                ids.sort_unstable();
                let mut prev = 0i64;
                let deltas = ids
                    .iter()
                    .map(|&id| {
                        let d = id.wrapping_sub(prev);
                        prev = id;
                        d
                    })
                    .collect();
                WireGroup {
                    datum_type: g.datum_type.clone(),
                    deltas,
                }
            })
            .collect();
        let body = Body::Notices(WireNotices {
            view: self.view,
            from: self.from.clone(),
            to: self.to.clone(),
            groups,
            epoch: self.epoch,
            done: self.done,
            echo: self.echo,
        });
        let mut out = vec![WIRE_VERSION];
        // Serialising plain structs into a Vec cannot fail; keep the version
        // byte alone rather than panic if it ever did.
        if let Ok(bytes) = postcard::to_allocvec(&body) {
            out.extend_from_slice(&bytes);
        }
        out
    }

    /// Decodes a batch from bytes received from a peer, within `limits`.
    ///
    /// # Errors
    /// [`WireError`] when the bytes are too large, of another version,
    /// malformed, followed by trailing bytes, or break a limit.
    pub fn decode(bytes: &[u8], limits: &WireLimits) -> Result<NoticeBatch, WireError> {
        if bytes.len() > limits.max_bytes {
            return Err(WireError::TooLarge {
                len: bytes.len(),
                max: limits.max_bytes,
            });
        }
        let (&version, rest) = bytes
            .split_first()
            .ok_or_else(|| WireError::Malformed("empty message".into()))?;
        if version != WIRE_VERSION {
            return Err(WireError::Version(version));
        }
        let (body, trailing) = postcard::take_from_bytes::<Body>(rest)
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        if !trailing.is_empty() {
            return Err(WireError::Trailing(trailing.len()));
        }
        let Body::Notices(n) = body;
        if n.groups.len() > limits.max_groups {
            return Err(WireError::TooManyGroups {
                count: n.groups.len(),
                max: limits.max_groups,
            });
        }
        let mut groups = Vec::with_capacity(n.groups.len());
        for g in n.groups {
            let len = g.datum_type.len();
            if len == 0 || len > crate::datum::TypeRegistry::MAX_NAME_LEN {
                return Err(WireError::BadTypeName {
                    len,
                    max: crate::datum::TypeRegistry::MAX_NAME_LEN,
                });
            }
            let mut prev = 0i64;
            let ids = g
                .deltas
                .iter()
                .map(|&d| {
                    prev = prev.wrapping_add(d);
                    prev
                })
                .collect();
            groups.push(NoticeGroup {
                datum_type: g.datum_type,
                ids,
            });
        }
        Ok(NoticeBatch {
            view: n.view,
            from: n.from,
            to: n.to,
            groups,
            epoch: n.epoch,
            done: n.done,
            echo: n.echo,
        })
    }
}

/// Everything one node sends another through this layer. Append variants only.
#[derive(Serialize, Deserialize)]
enum Body {
    Notices(WireNotices),
}

#[derive(Serialize, Deserialize)]
struct WireNotices {
    view: ViewId,
    from: NodeId,
    to: NodeId,
    groups: Vec<WireGroup>,
    epoch: u64,
    done: bool,
    echo: u64,
}

#[derive(Serialize, Deserialize)]
struct WireGroup {
    datum_type: String,
    deltas: Vec<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn batch(ids: Vec<i64>) -> NoticeBatch {
        NoticeBatch {
            view: ViewId(42),
            from: NodeId::new("a", 1),
            to: NodeId::new("b", 2),
            groups: vec![
                NoticeGroup {
                    datum_type: "series".into(),
                    ids,
                },
                NoticeGroup {
                    datum_type: "rollup".into(),
                    ids: vec![i64::MIN, -1, 0, i64::MAX],
                },
            ],
            epoch: 7,
            done: true,
            echo: 3,
        }
    }

    #[test]
    fn round_trip_sorts_ids() {
        let b = batch(vec![9, 3, 7]);
        let back = NoticeBatch::decode(&b.encode(), &WireLimits::default()).unwrap();
        assert_eq!(back.groups[0].ids, vec![3, 7, 9]);
        assert_eq!(back.groups[1].ids, vec![i64::MIN, -1, 0, i64::MAX]);
        assert_eq!(back.view, b.view);
        assert_eq!(back.from, b.from);
        assert_eq!(back.to, b.to);
        assert!(back.done);
        assert_eq!((back.epoch, back.echo), (7, 3));
        assert_eq!(back.len(), 7);
    }

    #[test]
    fn consecutive_ids_cost_about_a_byte_each() {
        let b = batch((1_000_000..1_010_000).collect());
        let bytes = b.encode();
        assert!(bytes.len() < 10_100, "{} bytes", bytes.len());
    }

    #[test]
    fn rejects_bad_envelopes() {
        let limits = WireLimits::default();
        assert!(matches!(
            NoticeBatch::decode(&[], &limits),
            Err(WireError::Malformed(_))
        ));
        let mut bytes = batch(vec![1]).encode();
        bytes[0] = 9;
        assert_eq!(
            NoticeBatch::decode(&bytes, &limits),
            Err(WireError::Version(9))
        );
        let mut bytes = batch(vec![1]).encode();
        bytes.push(0);
        assert_eq!(
            NoticeBatch::decode(&bytes, &limits),
            Err(WireError::Trailing(1))
        );
        let bytes = batch(vec![1]).encode();
        assert!(matches!(
            NoticeBatch::decode(&bytes[..bytes.len() - 1], &limits),
            Err(WireError::Malformed(_))
        ));
        let small = WireLimits {
            max_bytes: 8,
            ..WireLimits::default()
        };
        assert!(matches!(
            NoticeBatch::decode(&bytes, &small),
            Err(WireError::TooLarge { .. })
        ));
        let one_group = WireLimits {
            max_groups: 1,
            ..WireLimits::default()
        };
        assert!(matches!(
            NoticeBatch::decode(&bytes, &one_group),
            Err(WireError::TooManyGroups { count: 2, max: 1 })
        ));
    }

    #[test]
    fn rejects_bad_type_names() {
        let mut b = batch(vec![1]);
        b.groups[0].datum_type = String::new();
        assert!(matches!(
            NoticeBatch::decode(&b.encode(), &WireLimits::default()),
            Err(WireError::BadTypeName { len: 0, .. })
        ));
        b.groups[0].datum_type = "t".repeat(256);
        assert!(matches!(
            NoticeBatch::decode(&b.encode(), &WireLimits::default()),
            Err(WireError::BadTypeName { len: 256, .. })
        ));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = NoticeBatch::decode(&bytes, &WireLimits::default());
            let mut v = vec![WIRE_VERSION];
            v.extend_from_slice(&bytes);
            let _ = NoticeBatch::decode(&v, &WireLimits::default());
        }

        #[test]
        fn round_trip_any_ids(ids in proptest::collection::vec(any::<i64>(), 0..200), view in any::<u64>()) {
            let mut b = batch(ids.clone());
            b.view = ViewId(view);
            let back = NoticeBatch::decode(&b.encode(), &WireLimits::default()).unwrap();
            let mut sorted = ids;
            sorted.sort_unstable();
            prop_assert_eq!(&back.groups[0].ids, &sorted);
            prop_assert_eq!(back.view, ViewId(view));
        }
    }
}
