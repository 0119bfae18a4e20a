//! The wire format: a version byte, then postcard-encoded messages back to
//! back (a compound packet).
//!
//! Decoding borrows names and metadata from the packet (no allocation) and is
//! done twice: a first pass validates the whole packet (version, every message,
//! limits, structure) so a bad packet is rejected whole and changes nothing;
//! the second pass applies it.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::DecodeError;

/// Protocol version carried in the first byte of every packet. Bump it when a
/// message changes shape; postcard is positional, so new message kinds may
/// only be appended.
/// The incarnation of a `Dead` notice that tells a member "a verdict about
/// you was acted on (your datums were taken over) before your refutation
/// reached me": sent only to the member itself, which fences and does not
/// refute it; anyone else ignores it.
pub(crate) const ACTED_ON: u64 = u64::MAX;

pub(crate) const VERSION: u8 = 1;
/// Bytes before the first message.
pub(crate) const HEADER_LEN: usize = 1;

/// Every message kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Message<'a> {
    /// Are you alive? Answered by `Ack(seq)` to the sender.
    #[serde(borrow)]
    Ping(Ping<'a>),
    /// Please ping `target` for me and forward its ack (or a nack).
    #[serde(borrow)]
    IndirectPing(IndirectPing<'a>),
    /// Answer to a ping.
    Ack(u32),
    /// A relay did not hear from the target in time.
    Nack(u32),
    /// A member is alive at an incarnation, with its ready flag and metadata.
    #[serde(borrow)]
    Alive(Alive<'a>),
    /// A member is suspected by `from`.
    #[serde(borrow)]
    Suspect(Accusation<'a>),
    /// A member was declared dead by `from`; when `from` is the member itself
    /// it left.
    #[serde(borrow)]
    Dead(Accusation<'a>),
    /// Start of a full-state exchange; `State` messages follow.
    #[serde(borrow)]
    PushPull(PushPull<'a>),
    /// One member's full state inside a push-pull.
    #[serde(borrow)]
    State(State<'a>),
    /// "I do not know you (or an older you): send me your `Alive`." Sent
    /// with the ack to a ping whose sender is unknown or newer than the
    /// receiver's record of it.
    AliveRequest,
}

/// A probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Ping<'a> {
    pub seq: u32,
    /// Name the prober believes it is talking to.
    pub target: &'a str,
    /// Generation the prober believes it is talking to.
    pub generation: u64,
    /// Answer on the reliable path (this ping came that way).
    pub reliable: bool,
    /// Who is asking: name, generation and incarnation of the sender, so a
    /// target whose record of it is missing or older can ask for its `Alive`
    /// and one that holds it suspect or dead can tell it at once.
    pub from: &'a str,
    pub from_generation: u64,
    pub from_incarnation: u64,
}

/// A request to probe someone on the sender's behalf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IndirectPing<'a> {
    pub seq: u32,
    pub target: &'a str,
    pub generation: u64,
    pub addr: SocketAddr,
}

/// A member's announced state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Alive<'a> {
    pub name: &'a str,
    pub generation: u64,
    pub incarnation: u64,
    pub addr: SocketAddr,
    pub ready: bool,
    pub metadata: &'a [u8],
}

/// A suspicion or a death verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Accusation<'a> {
    pub name: &'a str,
    pub generation: u64,
    pub incarnation: u64,
    /// Who accuses.
    pub from: &'a str,
}

/// Push-pull header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PushPull<'a> {
    /// Name of the sender (counted as the accuser for the suspect and dead
    /// members it reports).
    pub from: &'a str,
    /// Sent by a joining node.
    pub join: bool,
    /// The receiver should answer with its own state.
    pub reply: bool,
}

/// State of one member in a push-pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct State<'a> {
    #[serde(borrow)]
    pub member: Alive<'a>,
    pub state: WireState,
}

/// Member state on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum WireState {
    Alive,
    Suspect,
    Dead,
    Left,
}

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_len: usize,
    pub max_name_len: usize,
    pub max_metadata_len: usize,
    /// Messages other than push-pull `State`s in one packet, at most.
    pub max_messages: usize,
    /// `State` messages in one push-pull, at most (`max_members`).
    pub max_states: usize,
}

/// Messages other than push-pull states in one packet, at most. A datagram
/// of `max_packet_size` (1,150 bytes) holds about 80 piggybacked updates;
/// a packet with more is refused whole before it is applied, so a small
/// compressed packet cannot expand into millions of messages to apply.
pub(crate) const MAX_MESSAGES: usize = 256;

// Worst-case encoded sizes (varints at their longest), used to check that a
// configuration's packet size holds what it must.
const VARINT_U64: usize = 10;
const VARINT_U32: usize = 5;
const VARINT_LEN: usize = 3; // lengths up to 2^21
const ADDR: usize = 1 + 16 + 3; // variant tag, IPv6 octets, port

/// Largest encoded `Alive` for these limits.
pub(crate) fn max_alive_len(max_name: usize, max_metadata: usize) -> usize {
    1 + VARINT_LEN + max_name + 2 * VARINT_U64 + ADDR + 1 + VARINT_LEN + max_metadata
}

/// Largest encoded `Ping` for these limits.
pub(crate) fn max_ping_len(max_name: usize) -> usize {
    1 + VARINT_U32 + 2 * (VARINT_LEN + max_name) + 3 * VARINT_U64 + 1
}

/// Largest encoded accusation (`Suspect` or `Dead`).
pub(crate) fn max_accusation_len(max_name: usize) -> usize {
    1 + 2 * (VARINT_LEN + max_name) + 2 * VARINT_U64
}

/// Appends one encoded message to `buf`.
pub(crate) fn encode(msg: &Message<'_>, buf: &mut Vec<u8>) {
    // Writing into a Vec cannot fail and these types always serialise; should
    // postcard ever report an error, drop the partial message.
    let before = buf.len();
    if postcard::to_io(msg, &mut *buf).is_err() {
        buf.truncate(before);
    }
}

/// Encodes one message into its own buffer (for the piggyback queue).
pub(crate) fn encode_one(msg: &Message<'_>) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    encode(msg, &mut buf);
    buf
}

/// A new packet buffer holding the header.
pub(crate) fn new_packet(capacity: usize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(capacity);
    buf.push(VERSION);
    buf
}

fn name_ok(name: &str, limits: &Limits) -> bool {
    !name.is_empty() && name.len() <= limits.max_name_len
}

fn check_message(index: usize, msg: &Message<'_>, limits: &Limits) -> Result<(), DecodeError> {
    let bad_name = |name: &str| DecodeError::BadName {
        index,
        len: name.len(),
    };
    let check_alive = |alive: &Alive<'_>| {
        if !name_ok(alive.name, limits) {
            return Err(bad_name(alive.name));
        }
        if alive.metadata.len() > limits.max_metadata_len {
            return Err(DecodeError::MetadataTooLarge {
                index,
                len: alive.metadata.len(),
            });
        }
        Ok(())
    };
    match msg {
        Message::Ping(Ping { target, from, .. }) => {
            for name in [target, from] {
                if !name_ok(name, limits) {
                    return Err(bad_name(name));
                }
            }
        }
        Message::IndirectPing(IndirectPing { target, .. }) => {
            if !name_ok(target, limits) {
                return Err(bad_name(target));
            }
        }
        Message::Ack(_) | Message::Nack(_) | Message::AliveRequest => {}
        Message::Alive(alive) => check_alive(alive)?,
        Message::State(state) => check_alive(&state.member)?,
        Message::Suspect(acc) | Message::Dead(acc) => {
            for name in [acc.name, acc.from] {
                if !name_ok(name, limits) {
                    return Err(bad_name(name));
                }
            }
        }
        Message::PushPull(header) => {
            if !name_ok(header.from, limits) {
                return Err(bad_name(header.from));
            }
        }
    }
    Ok(())
}

/// Validates a whole packet: size, version, every message and its limits, and
/// the structure (a push-pull header comes first and only then may `State`
/// messages follow). Returns the number of messages.
#[cfg(test)]
pub(crate) fn check_packet(bytes: &[u8], limits: &Limits) -> Result<usize, DecodeError> {
    let mut out = Vec::new();
    decode_packet(bytes, limits, &mut out)?;
    Ok(out.len())
}

/// Decodes and validates a whole packet into `out` (cleared first): size,
/// version, every message and its limits, and the structure (a push-pull
/// header comes first and only then may `State` messages follow). On error
/// `out` is left empty. Names and metadata borrow from `bytes`.
pub(crate) fn decode_packet<'a>(
    bytes: &'a [u8],
    limits: &Limits,
    out: &mut Vec<Message<'a>>,
) -> Result<(), DecodeError> {
    out.clear();
    let result = decode_into(bytes, limits, out);
    if result.is_err() {
        out.clear();
    }
    result
}

fn decode_into<'a>(
    bytes: &'a [u8],
    limits: &Limits,
    out: &mut Vec<Message<'a>>,
) -> Result<(), DecodeError> {
    if bytes.len() > limits.max_len {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: limits.max_len,
        });
    }
    let Some((&version, mut rest)) = bytes.split_first() else {
        return Err(DecodeError::Empty);
    };
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let mut index = 0;
    let mut push_pull = false;
    let (mut states, mut others) = (0usize, 0usize);
    while !rest.is_empty() {
        let (msg, tail) = postcard::take_from_bytes::<Message<'_>>(rest)
            .map_err(|source| DecodeError::Malformed { index, source })?;
        check_message(index, &msg, limits)?;
        match msg {
            Message::PushPull(_) if index == 0 => push_pull = true,
            Message::PushPull(_) => return Err(DecodeError::Unexpected { index }),
            Message::State(_) if !push_pull => return Err(DecodeError::Unexpected { index }),
            _ => {}
        }
        let (count, max) = if matches!(msg, Message::State(_)) {
            states += 1;
            (states, limits.max_states)
        } else {
            others += 1;
            (others, limits.max_messages)
        };
        if count > max {
            return Err(DecodeError::TooManyMessages { index, max });
        }
        out.push(msg);
        rest = tail;
        index += 1;
    }
    if index == 0 {
        return Err(DecodeError::Unexpected { index });
    }
    Ok(())
}

/// Iterates over the messages of an encoded packet (tests read what a node
/// sent with it).
#[cfg(test)]
pub(crate) struct Messages<'a> {
    rest: &'a [u8],
}

#[cfg(test)]
impl<'a> Messages<'a> {
    pub(crate) fn new(packet: &'a [u8]) -> Self {
        Messages {
            rest: packet.get(HEADER_LEN..).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
impl<'a> Iterator for Messages<'a> {
    type Item = Message<'a>;

    fn next(&mut self) -> Option<Message<'a>> {
        if self.rest.is_empty() {
            return None;
        }
        match postcard::take_from_bytes::<Message<'a>>(self.rest) {
            Ok((msg, tail)) => {
                self.rest = tail;
                Some(msg)
            }
            Err(_) => {
                self.rest = &[];
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_len: 1150,
            max_name_len: 128,
            max_metadata_len: 512,
            max_messages: MAX_MESSAGES,
            max_states: 4,
        }
    }

    fn addr() -> SocketAddr {
        "[2001:db8::1]:65535".parse().unwrap()
    }

    #[test]
    fn round_trip_compound() {
        let msgs = [
            Message::Ping(Ping {
                seq: u32::MAX,
                target: "node-a",
                generation: u64::MAX,
                reliable: true,
                from: "node-b",
                from_generation: 3,
                from_incarnation: 4,
            }),
            Message::AliveRequest,
            Message::Ack(7),
            Message::Nack(8),
            Message::IndirectPing(IndirectPing {
                seq: 3,
                target: "b",
                generation: 1,
                addr: addr(),
            }),
            Message::Alive(Alive {
                name: "c",
                generation: 2,
                incarnation: 9,
                addr: addr(),
                ready: true,
                metadata: b"meta",
            }),
            Message::Suspect(Accusation {
                name: "d",
                generation: 1,
                incarnation: 2,
                from: "e",
            }),
            Message::Dead(Accusation {
                name: "d",
                generation: 1,
                incarnation: 2,
                from: "d",
            }),
        ];
        let mut packet = new_packet(256);
        for msg in &msgs {
            encode(msg, &mut packet);
        }
        assert_eq!(check_packet(&packet, &limits()), Ok(msgs.len()));
        let decoded: Vec<_> = Messages::new(&packet).collect();
        assert_eq!(decoded, msgs);
    }

    #[test]
    fn worst_case_sizes_hold() {
        let name = "n".repeat(128);
        let meta = vec![0xffu8; 512];
        let alive = Message::Alive(Alive {
            name: &name,
            generation: u64::MAX,
            incarnation: u64::MAX,
            addr: addr(),
            ready: true,
            metadata: &meta,
        });
        assert!(encode_one(&alive).len() <= max_alive_len(128, 512));
        let ping = Message::Ping(Ping {
            seq: u32::MAX,
            target: &name,
            generation: u64::MAX,
            reliable: false,
            from: &name,
            from_generation: u64::MAX,
            from_incarnation: u64::MAX,
        });
        assert!(encode_one(&ping).len() <= max_ping_len(128));
        let acc = Message::Dead(Accusation {
            name: &name,
            generation: u64::MAX,
            incarnation: u64::MAX,
            from: &name,
        });
        assert!(encode_one(&acc).len() <= max_accusation_len(128));
    }

    #[test]
    fn rejects_bad_packets() {
        let l = limits();
        assert_eq!(check_packet(&[], &l), Err(DecodeError::Empty));
        assert_eq!(check_packet(&[9, 0], &l), Err(DecodeError::Version(9)));
        assert_eq!(
            check_packet(&[VERSION], &l),
            Err(DecodeError::Unexpected { index: 0 })
        );
        assert!(matches!(
            check_packet(&vec![VERSION; 2000], &l),
            Err(DecodeError::TooLarge { len: 2000, .. })
        ));
        // Unknown message tag.
        assert!(matches!(
            check_packet(&[VERSION, 200], &l),
            Err(DecodeError::Malformed { index: 0, .. })
        ));
        // A valid message followed by garbage: rejected whole.
        let mut packet = new_packet(16);
        encode(&Message::Ack(1), &mut packet);
        packet.push(0xff);
        assert!(matches!(
            check_packet(&packet, &l),
            Err(DecodeError::Malformed { index: 1, .. })
        ));
        // Empty name.
        let mut packet = new_packet(16);
        encode(
            &Message::Ping(Ping {
                seq: 1,
                target: "",
                generation: 1,
                reliable: false,
                from: "x",
                from_generation: 1,
                from_incarnation: 0,
            }),
            &mut packet,
        );
        assert_eq!(
            check_packet(&packet, &l),
            Err(DecodeError::BadName { index: 0, len: 0 })
        );
        // Metadata over the limit.
        let meta = vec![1u8; 513];
        let mut packet = new_packet(600);
        encode(
            &Message::Alive(Alive {
                name: "a",
                generation: 1,
                incarnation: 1,
                addr: addr(),
                ready: false,
                metadata: &meta,
            }),
            &mut packet,
        );
        assert_eq!(
            check_packet(&packet, &l),
            Err(DecodeError::MetadataTooLarge { index: 0, len: 513 })
        );
        // State outside a push-pull.
        let mut packet = new_packet(64);
        encode(
            &Message::State(State {
                member: Alive {
                    name: "a",
                    generation: 1,
                    incarnation: 1,
                    addr: addr(),
                    ready: false,
                    metadata: &[],
                },
                state: WireState::Dead,
            }),
            &mut packet,
        );
        assert_eq!(
            check_packet(&packet, &l),
            Err(DecodeError::Unexpected { index: 0 })
        );
    }

    #[test]
    fn message_counts_are_capped() {
        let l = Limits {
            max_len: 1 << 20,
            ..limits()
        };
        // One-byte messages: the cap stops the decoder, not the length.
        let mut packet = new_packet(MAX_MESSAGES + 2);
        for _ in 0..MAX_MESSAGES {
            encode(&Message::AliveRequest, &mut packet);
        }
        assert_eq!(check_packet(&packet, &l), Ok(MAX_MESSAGES));
        encode(&Message::AliveRequest, &mut packet);
        assert_eq!(
            check_packet(&packet, &l),
            Err(DecodeError::TooManyMessages {
                index: MAX_MESSAGES,
                max: MAX_MESSAGES
            })
        );
        // States beyond `max_states` (the member cap) are refused too.
        let mut packet = new_packet(256);
        encode(
            &Message::PushPull(PushPull {
                from: "a",
                join: false,
                reply: false,
            }),
            &mut packet,
        );
        let state = Message::State(State {
            member: Alive {
                name: "a",
                generation: 1,
                incarnation: 1,
                addr: addr(),
                ready: false,
                metadata: &[],
            },
            state: WireState::Alive,
        });
        for _ in 0..l.max_states {
            encode(&state, &mut packet);
        }
        assert_eq!(check_packet(&packet, &l), Ok(l.max_states + 1));
        encode(&state, &mut packet);
        assert!(matches!(
            check_packet(&packet, &l),
            Err(DecodeError::TooManyMessages { max: 4, .. })
        ));
    }

    #[test]
    fn length_prefix_larger_than_packet_is_rejected_without_allocating() {
        // Alive with a name length of 2^20 but only a few bytes present.
        let packet = [VERSION, 4, 0x80, 0x80, 0x40, b'a'];
        assert!(matches!(
            check_packet(&packet, &limits()),
            Err(DecodeError::Malformed { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..1200)) {
            let _ = check_packet(&bytes, &limits());
            let _ = Messages::new(&bytes).count();
        }

        #[test]
        fn random_bytes_after_header_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let mut packet = vec![VERSION];
            packet.extend_from_slice(&bytes);
            let _ = check_packet(&packet, &limits());
        }
    }
}
