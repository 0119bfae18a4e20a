//! The probe cycle: pings and their acks (direct, through relays, and the
//! relays this node serves), the acks this node sends (after the whole
//! packet was applied, with what it has to tell the pinger about itself),
//! nacks, the next target, and a failed probe turning into a suspicion.

use super::*;

/// The probe in progress.
#[derive(Debug, Clone, Copy)]
pub(super) struct Probe {
    pub(super) slot: u32,
    /// When the ping left: an ack proves contact from then on (lease).
    pub(super) sent_at: Instant,
    pub(super) generation: u64,
    /// The ping carried a death-verdict notice to its target.
    pub(super) carries_notice: bool,
    pub(super) seq: u32,
    pub(super) indirect_at: Instant,
    pub(super) deadline: Instant,
    pub(super) indirect_sent: bool,
    pub(super) expected_nacks: u32,
    pub(super) nacks: u32,
}

/// An indirect probe this node runs for another member.
#[derive(Debug, Clone, Copy)]
pub(super) struct Relay {
    pub(super) seq: u32,
    /// Hash of the target's name: only its ack counts.
    pub(super) target: u64,
    /// When this node pinged the target for the requester.
    pub(super) sent_at: Instant,
    pub(super) requester: SocketAddr,
    pub(super) requester_seq: u32,
    pub(super) nack_at: Instant,
}

/// An ack to send once the whole packet was applied.
#[derive(Debug, Clone, Copy)]
pub(super) struct DeferredAck {
    pub(super) to: SocketAddr,
    pub(super) seq: u32,
    pub(super) reliable: bool,
    pub(super) extra: AckExtra,
}

/// What rides with an ack, about the pinger itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AckExtra {
    Nothing,
    /// We do not know the pinger, or an older version of it: ask.
    AskAlive,
    /// We hold the pinger (in this slot) suspect or dead: tell it.
    Accuse(u32),
    /// We revived the pinger (in this slot) and it may not know it had been
    /// declared dead: tell it again.
    Notice(u32),
}

impl<R: Rng> Membership<R> {
    pub(super) fn next_seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    pub(super) fn bump_awareness(&mut self, delta: i64) {
        let max = i64::from(self.config.awareness_max.saturating_sub(1));
        let score = (i64::from(self.awareness) + delta).clamp(0, max);
        self.awareness = u32::try_from(score).unwrap_or(0);
    }

    pub(super) fn scaled_probe_interval(&self) -> Duration {
        self.config
            .probe_interval
            .saturating_mul(self.awareness + 1)
    }

    pub(super) fn on_ping(&mut self, from: SocketAddr, sender: Option<&str>, ping: &Ping<'_>) {
        if sender != Some(ping.from) {
            // The pinger tells who it is; only its own name counts (the ack
            // and what rides on it are about the pinger).
            self.stats.forged_claims += 1;
            debug!(claimed = ping.from, ?sender, %from, "refused a ping sent under another name");
            return;
        }
        if ping.target != &*self.local.name {
            self.stats.ignored_updates += 1;
            return;
        }
        if ping.generation < self.local.generation {
            // Aimed at an older process of ours: do not ack for it, but make
            // sure the prober learns the new generation, directly (a
            // restarted node whose seeds are gone may know no one to gossip
            // to).
            self.refresh_local_alive();
            self.on_alive_request(from);
            return;
        }
        if ping.generation > self.local.generation {
            self.stats.ignored_updates += 1;
            return;
        }
        let extra = self.pinger_extra(ping);
        self.deferred_acks.push(DeferredAck {
            to: from,
            seq: ping.seq,
            reliable: ping.reliable,
            extra,
        });
    }

    pub(super) fn send_ack(&mut self, ack: &DeferredAck) {
        let mut buf = self.new_packet();
        wire::encode(&Message::Ack(ack.seq), &mut buf);
        match ack.extra {
            AckExtra::Nothing => {}
            AckExtra::AskAlive => {
                self.stats.alive_requests += 1;
                wire::encode(&Message::AliveRequest, &mut buf);
            }
            AckExtra::Accuse(slot) => {
                if let Some(m) = self.slot(slot) {
                    let acc = Accusation {
                        name: &m.name,
                        generation: m.generation,
                        incarnation: m.incarnation,
                        from: &self.local.name,
                    };
                    match m.state {
                        MemberState::Suspect => wire::encode(&Message::Suspect(acc), &mut buf),
                        MemberState::Dead => wire::encode(&Message::Dead(acc), &mut buf),
                        MemberState::Alive | MemberState::Left => {}
                    }
                }
            }
            AckExtra::Notice(slot) => {
                self.append_notice(slot, &mut buf);
            }
        }
        if ack.reliable {
            self.send(ack.to, true, buf);
        } else {
            self.finish_unreliable(ack.to, buf);
        }
    }

    /// What to tell a pinger about itself: ask for its `Alive` if our record
    /// of it is missing or older, or tell it we hold it suspect or dead.
    pub(super) fn pinger_extra(&self, ping: &Ping<'_>) -> AckExtra {
        if ping.from == &*self.local.name {
            return AckExtra::Nothing;
        }
        let Some(slot) = self.table.find(ping.from) else {
            return AckExtra::AskAlive;
        };
        let Some(record) = self.slot(slot) else {
            return AckExtra::AskAlive;
        };
        let newer =
            (ping.from_generation, ping.from_incarnation) > (record.generation, record.incarnation);
        if newer {
            return AckExtra::AskAlive;
        }
        if ping.from_generation == record.generation
            && matches!(record.state, MemberState::Suspect | MemberState::Dead)
        {
            return AckExtra::Accuse(slot);
        }
        if self.notices.contains_key(&slot) {
            return AckExtra::Notice(slot);
        }
        AckExtra::Nothing
    }

    pub(super) fn on_indirect_ping(
        &mut self,
        from: SocketAddr,
        sender: Option<&str>,
        req: &IndirectPing<'_>,
        now: Instant,
    ) {
        // Only a live member may ask, under its own name, and only about a
        // live member at the generation and address known here: a relay
        // never pings an address a peer chose, nor reveals its sequence
        // numbers to a stranger.
        let requester_ok = sender.is_some_and(|name| {
            self.member(name)
                .is_some_and(|m| m.state.is_live() && name != &*self.local.name)
        });
        if !requester_ok {
            self.stats.relays_refused += 1;
            debug!(?sender, %from, target = req.target, "refused an indirect probe from a non-member");
            return;
        }
        if req.target == &*self.local.name {
            if req.generation == self.local.generation {
                self.deferred_acks.push(DeferredAck {
                    to: from,
                    seq: req.seq,
                    reliable: false,
                    extra: AckExtra::Nothing,
                });
            }
            return;
        }
        if !self.member(req.target).is_some_and(|m| {
            m.state.is_live() && m.generation == req.generation && m.addr == req.addr
        }) {
            self.stats.relays_refused += 1;
            debug!(?sender, target = req.target, addr = %req.addr, "refused an indirect probe of a member not known so");
            return;
        }
        if self.relays.len() >= self.config.max_relays {
            self.stats.relays_dropped += 1;
            return;
        }
        let target = self.hasher.hash_str(req.target);
        let seq = self.next_seq();
        let mut buf = self.new_packet();
        wire::encode(
            &ping_msg(&self.local, seq, req.target, req.generation, false),
            &mut buf,
        );
        self.finish_unreliable(req.addr, buf);
        self.stats.relays += 1;
        // The relay nacks at 80 % of the probe timeout so the nack reaches
        // the prober before its own deadline.
        let nack_at = later(now, self.config.probe_timeout.mul_f64(0.8));
        self.relays.push_back(Relay {
            seq,
            target,
            sent_at: now,
            requester: from,
            requester_seq: req.seq,
            nack_at,
        });
    }

    /// Whether `sender` is the member in `slot`.
    pub(super) fn is_member(&self, slot: u32, sender: Option<&str>) -> bool {
        sender.is_some_and(|name| self.slot(slot).is_some_and(|m| *m.name == *name))
    }

    /// Whether `sender` is the target or one of the relays asked for the
    /// probe in progress.
    pub(super) fn answers_probe(&self, probe: &Probe, sender: Option<&str>) -> bool {
        self.is_member(probe.slot, sender)
            || (probe.indirect_sent
                && self
                    .probe_relays
                    .iter()
                    .any(|&relay| self.is_member(relay, sender)))
    }

    pub(super) fn refuse_ack(&mut self, sender: Option<&str>, seq: u32) {
        self.stats.acks_refused += 1;
        debug!(
            ?sender,
            seq, "refused an ack from a node that was not asked"
        );
    }

    pub(super) fn on_ack(
        &mut self,
        from: SocketAddr,
        sender: Option<&str>,
        seq: u32,
        now: Instant,
    ) {
        if let Some(probe) = self.probe
            && probe.seq == seq
        {
            if !self.answers_probe(&probe, sender) {
                self.refuse_ack(sender, seq);
                return;
            }
            // Answered, directly or through a relay: contact since the ping
            // left (the lease counts from the send time).
            self.lease.contact(probe.sent_at);
            self.witness_acked(probe.slot, from, probe.sent_at);
            // A direct answer in time means we are healthy; an answer after
            // indirect probes proves nothing either way.
            if !probe.indirect_sent {
                self.bump_awareness(-1);
            }
            // Only the target's own ack proves it read a packet carrying the
            // notice (the direct and the reliable ping both carry it; an ack
            // forwarded by a relay does not).
            if probe.carries_notice && self.slot(probe.slot).is_some_and(|m| m.addr == from) {
                self.notices.remove(&probe.slot);
            }
            self.probe = None;
            return;
        }
        if let Some(pos) = self.relays.iter().position(|r| r.seq == seq) {
            let target = self.relays.get(pos).map(|r| r.target);
            if sender.map(|name| self.hasher.hash_str(name)) != target {
                self.refuse_ack(sender, seq);
                return;
            }
            if let Some(relay) = self.relays.remove(pos) {
                self.lease.contact(relay.sent_at);
                let mut buf = self.new_packet();
                wire::encode(&Message::Ack(relay.requester_seq), &mut buf);
                self.finish_unreliable(relay.requester, buf);
            }
            return;
        }
        if let Some(pos) = self.checks.iter().position(|(c, _, _)| *c == seq) {
            if !self
                .checks
                .get(pos)
                .is_some_and(|&(_, slot, _)| self.is_member(slot, sender))
            {
                self.refuse_ack(sender, seq);
                return;
            }
            if let Some((_, slot, sent_at)) = self.checks.remove(pos) {
                self.lease.contact(sent_at);
                self.witness_acked(slot, from, sent_at);
            }
            return;
        }
        if let Some(&(_, slot, _)) = self.lease.witnesses.pings.iter().find(|p| p.0 == seq)
            && !self.is_member(slot, sender)
        {
            self.refuse_ack(sender, seq);
            return;
        }
        if let Some((slot, sent_at)) = self.lease.witnesses.take_ping(seq) {
            self.lease.contact(sent_at);
            self.witness_acked(slot, from, sent_at);
            return;
        }
        if let Some(pos) = self.notice_pings.iter().position(|(s, _, _)| *s == seq) {
            if !self
                .notice_pings
                .get(pos)
                .is_some_and(|&(_, slot, _)| self.is_member(slot, sender))
            {
                self.refuse_ack(sender, seq);
                return;
            }
            if let Some((_, slot, sent_at)) = self.notice_pings.remove(pos) {
                self.lease.contact(sent_at);
                self.witness_acked(slot, from, sent_at);
                self.notices.remove(&slot);
            }
            return;
        }
        if let Some((reconnect_seq, slot, sent_at)) = self.reconnect
            && reconnect_seq == seq
        {
            if !self.is_member(slot, sender) {
                self.refuse_ack(sender, seq);
                return;
            }
            self.lease.contact(sent_at);
            self.witness_acked(slot, from, sent_at);
            // A dead member answers: the partition (or whatever it was) is
            // over. Exchange full state so both sides learn and refute.
            self.reconnect = None;
            if let Some(addr) = self
                .slot(slot)
                .filter(|m| m.state == MemberState::Dead)
                .map(|m| m.addr)
            {
                self.stats.reconnects += 1;
                self.send_state(addr, false, true, now);
            }
            return;
        }
        self.stats.stray_acks += 1;
    }

    pub(super) fn on_nack(&mut self, sender: Option<&str>, seq: u32) {
        let Some(probe) = self.probe else {
            return;
        };
        if probe.seq == seq
            && !self
                .probe_relays
                .iter()
                .any(|&relay| self.is_member(relay, sender))
        {
            self.refuse_ack(sender, seq);
            return;
        }
        if let Some(probe) = self.probe.as_mut()
            && probe.seq == seq
            && probe.indirect_sent
        {
            probe.nacks = (probe.nacks + 1).min(probe.expected_nacks);
            self.stats.nacks_received += 1;
        }
    }

    pub(super) fn fire_relays(&mut self, now: Instant) {
        while let Some(relay) = self.relays.front().copied() {
            if relay.nack_at > now {
                break;
            }
            self.relays.pop_front();
            let mut buf = self.new_packet();
            wire::encode(&Message::Nack(relay.requester_seq), &mut buf);
            self.finish_unreliable(relay.requester, buf);
        }
    }

    pub(super) fn fire_probe(&mut self, now: Instant) {
        if let Some(probe) = self.probe {
            if !probe.indirect_sent && now >= probe.indirect_at {
                self.send_indirect_probes();
                // Woken late (this node was slow): still give the relays
                // their full window before accusing anyone.
                let window = probe.deadline.saturating_duration_since(probe.indirect_at);
                if let Some(p) = self.probe.as_mut() {
                    p.deadline = p.deadline.max(later(now, window));
                }
            } else if now >= probe.deadline {
                self.probe_failed(now);
            }
        }
        if self.probe.is_none()
            && now >= self.next_probe_at
            && self.local.state == MemberState::Alive
        {
            self.start_probe(now);
        }
    }

    pub(super) fn start_probe(&mut self, now: Instant) {
        let interval = self.scaled_probe_interval();
        self.next_probe_at = later(now, interval);
        let Some(slot) = self.table.next_probe_target(&mut self.rng) else {
            return;
        };
        let seq = self.next_seq();
        let Some(target) = self.slot(slot) else {
            return;
        };
        let mut buf = self.new_packet();
        wire::encode(
            &ping_msg(&self.local, seq, &target.name, target.generation, false),
            &mut buf,
        );
        if target.state == MemberState::Suspect {
            // Lifeguard's buddy system: tell a suspect at once so it refutes.
            wire::encode(
                &Message::Suspect(Accusation {
                    name: &target.name,
                    generation: target.generation,
                    incarnation: target.incarnation,
                    from: &self.local.name,
                }),
                &mut buf,
            );
        }
        let (addr, generation) = (target.addr, target.generation);
        let carries_notice = self.append_notice(slot, &mut buf);
        self.probe = Some(Probe {
            slot,
            sent_at: now,
            generation,
            carries_notice,
            seq,
            indirect_at: later(now, self.config.probe_timeout),
            deadline: later(now, interval),
            indirect_sent: false,
            expected_nacks: 0,
            nacks: 0,
        });
        self.stats.probes += 1;
        self.finish_unreliable(addr, buf);
    }

    pub(super) fn send_indirect_probes(&mut self) {
        let Some(mut probe) = self.probe else { return };
        probe.indirect_sent = true;
        let Some(target) = self.slot(probe.slot) else {
            self.probe = None;
            return;
        };
        if target.generation != probe.generation {
            self.probe = None;
            return;
        }
        let (name, addr) = (Arc::clone(&target.name), target.addr);
        let exclude = probe.slot;
        let mut relays = std::mem::take(&mut self.scratch_slots);
        self.table.sample(
            self.config.indirect_checks,
            &mut relays,
            &mut self.rng,
            |slot, m| slot != exclude && m.state == MemberState::Alive,
        );
        for &relay in &relays {
            let Some(relay_addr) = self.slot(relay).map(|m| m.addr) else {
                continue;
            };
            let mut buf = self.new_packet();
            wire::encode(
                &Message::IndirectPing(IndirectPing {
                    seq: probe.seq,
                    target: &name,
                    generation: probe.generation,
                    addr,
                }),
                &mut buf,
            );
            self.finish_unreliable(relay_addr, buf);
            self.stats.indirect_probes += 1;
        }
        probe.expected_nacks = u32::try_from(relays.len()).unwrap_or(u32::MAX);
        self.probe_relays.clone_from(&relays);
        self.scratch_slots = relays;
        self.probe = Some(probe);
        if self.config.reliable_ping {
            let mut buf = self.new_packet();
            wire::encode(
                &ping_msg(&self.local, probe.seq, &name, probe.generation, true),
                &mut buf,
            );
            if probe.carries_notice {
                self.append_notice(probe.slot, &mut buf);
            }
            self.send(addr, true, buf);
        }
    }

    pub(super) fn probe_failed(&mut self, now: Instant) {
        let Some(probe) = self.probe.take() else {
            return;
        };
        // Lifeguard: missing nacks mean the problem may be ours.
        let delta = if probe.expected_nacks > 0 {
            probe.expected_nacks - probe.nacks.min(probe.expected_nacks)
        } else {
            1
        };
        self.bump_awareness(i64::from(delta));
        self.stats.probes_failed += 1;
        let Some(target) = self.slot(probe.slot) else {
            return;
        };
        if target.generation != probe.generation || !target.state.is_live() {
            return;
        }
        let name = Arc::clone(&target.name);
        let local = Arc::clone(&self.local.name);
        let acc = Accusation {
            name: &name,
            generation: target.generation,
            incarnation: target.incarnation,
            from: &local,
        };
        debug!(member = %name, awareness = self.awareness, nacks = probe.nacks, expected_nacks = probe.expected_nacks, "probe failed");
        self.apply_suspect(&acc, Mode::Announce, now);
    }

    /// A last-chance ping to a suspect (with the suspicion, so it refutes in
    /// its ack), unreliable and, if configured, reliable.
    pub(super) fn send_check(&mut self, slot: u32, now: Instant) {
        let seq = self.next_seq();
        let Some(target) = self.slot(slot) else {
            return;
        };
        let ping = |reliable| ping_msg(&self.local, seq, &target.name, target.generation, reliable);
        let suspect = Message::Suspect(Accusation {
            name: &target.name,
            generation: target.generation,
            incarnation: target.incarnation,
            from: &self.local.name,
        });
        let mut buf = self.new_packet();
        wire::encode(&ping(false), &mut buf);
        wire::encode(&suspect, &mut buf);
        let reliable = self.config.reliable_ping.then(|| {
            let mut buf = wire::new_packet(64);
            wire::encode(&ping(true), &mut buf);
            wire::encode(&suspect, &mut buf);
            buf
        });
        let addr = target.addr;
        if self.checks.len() >= MAX_CHECKS {
            self.checks.pop_front();
        }
        self.checks.push_back((seq, slot, now));
        self.stats.suspicion_checks += 1;
        self.finish_unreliable(addr, buf);
        if let Some(buf) = reliable {
            self.send(addr, true, buf);
        }
    }
}
