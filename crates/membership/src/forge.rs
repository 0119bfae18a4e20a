//! Crafting membership packets by hand, for adversarial tests and tools
//! (feature `forge`; never needed to run a node). Each function encodes one
//! message; [`packet`] puts messages behind the version byte, as
//! [`Membership::handle_packet`](crate::Membership::handle_packet) reads
//! them. Nothing here is checked: that is the point.

use std::net::SocketAddr;

use crate::wire::{
    self, Accusation, Alive, IndirectPing, Message, Ping, PushPull, State, WireState,
};

/// A member state inside a push-pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgedState {
    /// Alive.
    Alive,
    /// Suspect.
    Suspect,
    /// Dead.
    Dead,
    /// Left.
    Left,
}

/// A whole packet: the version byte, then `messages` back to back.
pub fn packet(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut buf = wire::new_packet(messages.iter().map(Vec::len).sum::<usize>() + 1);
    for m in messages {
        buf.extend_from_slice(m);
    }
    buf
}

/// A ping to `target` (at `generation`), saying it comes from `from`.
pub fn ping(seq: u32, target: &str, generation: u64, from: &str, from_generation: u64) -> Vec<u8> {
    wire::encode_one(&Message::Ping(Ping {
        seq,
        target,
        generation,
        reliable: false,
        from,
        from_generation,
        from_incarnation: 0,
    }))
}

/// A request to probe `target` at `addr` and forward its ack.
pub fn indirect_ping(seq: u32, target: &str, generation: u64, addr: SocketAddr) -> Vec<u8> {
    wire::encode_one(&Message::IndirectPing(IndirectPing {
        seq,
        target,
        generation,
        addr,
    }))
}

/// An ack of `seq`.
pub fn ack(seq: u32) -> Vec<u8> {
    wire::encode_one(&Message::Ack(seq))
}

/// An `Alive` about `name`.
pub fn alive(
    name: &str,
    generation: u64,
    incarnation: u64,
    addr: SocketAddr,
    ready: bool,
) -> Vec<u8> {
    wire::encode_one(&Message::Alive(Alive {
        name,
        generation,
        incarnation,
        addr,
        ready,
        metadata: &[],
    }))
}

/// A suspicion of `name`, by `from`.
pub fn suspect(name: &str, generation: u64, incarnation: u64, from: &str) -> Vec<u8> {
    wire::encode_one(&Message::Suspect(Accusation {
        name,
        generation,
        incarnation,
        from,
    }))
}

/// A death verdict about `name`, by `from` (`from == name`: a leave).
pub fn dead(name: &str, generation: u64, incarnation: u64, from: &str) -> Vec<u8> {
    wire::encode_one(&Message::Dead(Accusation {
        name,
        generation,
        incarnation,
        from,
    }))
}

/// A push-pull header, saying it comes from `from`.
pub fn push_pull(from: &str, join: bool, reply: bool) -> Vec<u8> {
    wire::encode_one(&Message::PushPull(PushPull { from, join, reply }))
}

/// One member's state inside a push-pull.
pub fn state(
    name: &str,
    generation: u64,
    incarnation: u64,
    addr: SocketAddr,
    ready: bool,
    state: ForgedState,
) -> Vec<u8> {
    wire::encode_one(&Message::State(State {
        member: Alive {
            name,
            generation,
            incarnation,
            addr,
            ready,
            metadata: &[],
        },
        state: match state {
            ForgedState::Alive => WireState::Alive,
            ForgedState::Suspect => WireState::Suspect,
            ForgedState::Dead => WireState::Dead,
            ForgedState::Left => WireState::Left,
        },
    }))
}

/// The sequence number of the first message of `packet` if it is a ping
/// (what a peer learns from a ping it receives).
pub fn ping_seq(packet: &[u8]) -> Option<u32> {
    let rest = packet.get(wire::HEADER_LEN..)?;
    match postcard::take_from_bytes::<Message<'_>>(rest) {
        Ok((Message::Ping(p), _)) => Some(p.seq),
        _ => None,
    }
}
