//! The virtual network between processes: addresses of slots, packets
//! routed through partitions, loss, duplication and delay, and the outcome
//! of application messages.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use shoal_membership::Transmit;

use super::Sim;
use super::queue::Ev;
use crate::app::{Application, MessageId};
use crate::net::{Copies, duration_ns};

/// Port every simulated node listens on (each slot has its own IP).
const PORT: u16 = 7946;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Channel {
    Unreliable,
    Reliable,
    /// An application message, with the id its sender was given.
    App(u64),
}

impl Channel {
    pub(super) fn tag(self) -> u64 {
        match self {
            Channel::Unreliable => 0,
            Channel::Reliable => 1,
            Channel::App(_) => 2,
        }
    }
}

pub(super) fn slot_addr(slot: u32) -> SocketAddr {
    let [_, a, b, c] = slot.to_be_bytes();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, a, b, c)), PORT)
}

impl<A: Application> Sim<A> {
    /// The slot whose address is `addr` (addresses are `10.a.b.c:7946` with
    /// `a.b.c` the slot number), without hashing.
    pub(super) fn slot_of_addr(&self, addr: SocketAddr) -> Option<u32> {
        let IpAddr::V4(ip) = addr.ip() else {
            return None;
        };
        let [ten, a, b, c] = ip.octets();
        if ten != 10 || addr.port() != PORT {
            return None;
        }
        let slot = u32::from_be_bytes([0, a, b, c]);
        ((slot as usize) < self.slots.len()).then_some(slot)
    }

    pub(super) fn send_transmit(&mut self, from: u32, from_generation: u64, t: Transmit) {
        let channel = if t.reliable {
            self.traffic.reliable_msgs += 1;
            self.traffic.reliable_bytes += t.payload.len() as u64;
            Channel::Reliable
        } else {
            self.traffic.unreliable_msgs += 1;
            self.traffic.unreliable_bytes += t.payload.len() as u64;
            Channel::Unreliable
        };
        self.route(from, from_generation, t.to, channel, t.payload);
    }

    pub(super) fn send_app(
        &mut self,
        from: u32,
        from_generation: u64,
        id: MessageId,
        to: SocketAddr,
        payload: Vec<u8>,
    ) {
        self.traffic.app_msgs += 1;
        self.traffic.app_bytes += payload.len() as u64;
        self.route(from, from_generation, to, Channel::App(id.0), payload);
    }

    pub(super) fn route(
        &mut self,
        from: u32,
        from_generation: u64,
        to: SocketAddr,
        channel: Channel,
        payload: Vec<u8>,
    ) {
        let Some(to_slot) = self.slot_of_addr(to) else {
            self.traffic.dropped += 1;
            if let Channel::App(id) = channel {
                self.send_done(from, from_generation, id, to, false);
            }
            return;
        };
        let copies = self
            .cfg
            .net
            .plan(!matches!(channel, Channel::Unreliable), &mut self.rng);
        let packet = |payload| Ev::Packet {
            to: to_slot,
            from,
            from_generation,
            channel,
            payload,
            accepted_by: None,
        };
        match copies {
            Copies::Lost => self.traffic.dropped += 1,
            Copies::One(d) => self.push(self.now_ns + d, packet(payload)),
            Copies::Two(d1, d2) => {
                self.traffic.duplicated += 1;
                self.push(self.now_ns + d1, packet(payload.clone()));
                self.push(self.now_ns + d2, packet(payload));
            }
        }
    }

    /// Tells the sender of application message `id` its outcome: delivered
    /// (after the acknowledgement's trip back) or failed (after
    /// `reliable_fail_after`).
    pub(super) fn send_done(
        &mut self,
        slot: u32,
        generation: u64,
        id: u64,
        to: SocketAddr,
        delivered: bool,
    ) {
        let after = if delivered {
            self.cfg.net.delay_ns(&mut self.rng)
        } else {
            duration_ns(self.cfg.net.reliable_fail_after)
        };
        self.push(
            self.now_ns + after,
            Ev::SendDone {
                slot,
                generation,
                id,
                to,
                delivered,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use shoal_membership::Config;

    use super::*;
    use crate::sim::SimConfig;

    #[test]
    fn slot_addresses_round_trip() {
        let sim: Sim =
            Sim::new(SimConfig::new(1, Config::lan()), 70_000, Instant::now(), ()).unwrap();
        for slot in [0, 1, 255, 256, 65_535, 69_999] {
            assert_eq!(sim.slot_of_addr(slot_addr(slot)), Some(slot));
        }
        assert_eq!(sim.slot_of_addr(slot_addr(70_000)), None);
        let other_port = SocketAddr::new(slot_addr(3).ip(), PORT + 1);
        assert_eq!(sim.slot_of_addr(other_port), None);
    }
}
