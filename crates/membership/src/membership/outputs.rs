//! What leaves this node: events and transmits (bounded queues), updates
//! queued for piggybacking, and what this node says about itself.

use super::*;

impl<R: Rng> Membership<R> {
    pub(super) fn emit(&mut self, event: Event) {
        if self.events.len() >= self.config.max_queued_events {
            self.events.pop_front();
            self.stats.events_dropped += 1;
        }
        self.events.push_back(event);
    }

    pub(super) fn send(&mut self, to: SocketAddr, reliable: bool, payload: Vec<u8>) {
        if self.transmits.len() >= self.config.max_queued_transmits {
            self.stats.transmits_dropped += 1;
            return;
        }
        if reliable {
            self.stats.reliable_out += 1;
            self.stats.reliable_bytes_out += payload.len() as u64;
        } else {
            self.stats.packets_out += 1;
            self.stats.bytes_out += payload.len() as u64;
        }
        self.transmits.push_back(Transmit {
            to,
            reliable,
            payload,
        });
    }

    pub(super) fn retransmit_limit(&self) -> u32 {
        retransmit_limit(self.config.retransmit_mult, self.live().max(1))
    }

    pub(super) fn new_packet(&self) -> Vec<u8> {
        wire::new_packet(self.config.max_packet_size)
    }

    /// Adds piggybacked updates to an unreliable packet and queues it.
    pub(super) fn finish_unreliable(&mut self, to: SocketAddr, mut buf: Vec<u8>) {
        let limit = self.retransmit_limit();
        self.broadcasts
            .fill(&mut buf, self.config.max_packet_size, limit);
        self.send(to, false, buf);
    }

    pub(super) fn queue_broadcast(&mut self, slot: u32, bytes: Vec<u8>) {
        self.stats.broadcasts_queued += 1;
        self.broadcasts.push(slot, bytes);
        self.news_queued = true;
    }

    pub(super) fn broadcast_local_alive(&mut self) {
        let bytes = wire::encode_one(&Message::Alive(alive_of(&self.local)));
        self.queue_broadcast(LOCAL_SLOT, bytes);
    }

    pub(super) fn broadcast_alive(&mut self, slot: u32) {
        let Some(member) = self.slot(slot) else {
            return;
        };
        let bytes = wire::encode_one(&Message::Alive(alive_of(member)));
        self.queue_broadcast(slot, bytes);
    }

    pub(super) fn local_changed(&mut self) {
        self.view_dirty = self.view_dirty || self.local.state.is_live();
        if self.local.state != MemberState::Alive || self.superseded {
            return;
        }
        self.local.incarnation = self.local.incarnation.saturating_add(1);
        self.broadcast_local_alive();
        self.emit(Event::Updated(self.local.clone()));
    }

    /// A member asked for our `Alive` (it did not know us, or an older us).
    ///
    /// Also how a claim a third party made about us is checked: our answer
    /// counts first-hand. Having left, we answer with our leave instead, so
    /// a relayed leave is confirmed by us.
    pub(super) fn on_alive_request(&mut self, from: SocketAddr) {
        let mut buf = self.new_packet();
        match self.local.state {
            MemberState::Alive => {
                wire::encode(&Message::Alive(alive_of(&self.local)), &mut buf);
            }
            MemberState::Left if !self.superseded => wire::encode(
                &Message::Dead(Accusation {
                    name: &self.local.name,
                    generation: self.local.generation,
                    incarnation: self.local.incarnation,
                    from: &self.local.name,
                }),
                &mut buf,
            ),
            MemberState::Suspect | MemberState::Dead | MemberState::Left => return,
        }
        self.finish_unreliable(from, buf);
    }

    /// Appends a pending death-verdict notice for the member in `slot` to a
    /// packet going to it; returns whether there was one. The notice stays
    /// pending until a probe of ours that carried it is acked (the member
    /// applies a whole packet before acking, so the ack proves delivery).
    pub(super) fn append_notice(&self, slot: u32, buf: &mut Vec<u8>) -> bool {
        let Some(notice) = self.notices.get(&slot) else {
            return false;
        };
        let Some(m) = self.slot(slot) else {
            return false;
        };
        wire::encode(
            &Message::Dead(Accusation {
                name: &m.name,
                generation: m.generation,
                incarnation: notice.incarnation,
                from: &notice.accuser,
            }),
            buf,
        );
        true
    }
}

/// A ping from this node (`local`), telling the target who is asking and at
/// which incarnation, so a target that is behind can catch up.
pub(super) fn ping_msg<'a>(
    local: &'a Member,
    seq: u32,
    target: &'a str,
    generation: u64,
    reliable: bool,
) -> Message<'a> {
    Message::Ping(Ping {
        seq,
        target,
        generation,
        reliable,
        from: &local.name,
        from_generation: local.generation,
        from_incarnation: local.incarnation,
    })
}

pub(super) fn alive_of(member: &Member) -> Alive<'_> {
    Alive {
        name: &member.name,
        generation: member.generation,
        incarnation: member.incarnation,
        addr: member.addr,
        ready: member.ready,
        metadata: &member.metadata,
    }
}

pub(super) fn wire_state(state: MemberState) -> WireState {
    match state {
        MemberState::Alive => WireState::Alive,
        MemberState::Suspect => WireState::Suspect,
        MemberState::Dead => WireState::Dead,
        MemberState::Left => WireState::Left,
    }
}
