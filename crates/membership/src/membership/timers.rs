//! Periodic work: notices re-sent, reconnects to dead members, suspicions
//! expiring, gossip rounds and reaping (the push-pull rounds and the join
//! retried are in `push_pull.rs`).

use super::*;

impl<R: Rng> Membership<R> {
    /// Re-sends pending death-verdict notices, each in a ping of its own:
    /// the member's ack proves it applied the notice (then it is dropped).
    pub(super) fn resend_notices(&mut self, now: Instant) {
        let pending: Vec<u32> = self
            .notices
            .keys()
            .copied()
            .take(MAX_NOTICE_PINGS)
            .collect();
        for slot in pending {
            let seq = self.next_seq();
            let Some(m) = self.slot(slot) else {
                self.notices.remove(&slot);
                continue;
            };
            let mut buf = self.new_packet();
            wire::encode(
                &ping_msg(&self.local, seq, &m.name, m.generation, false),
                &mut buf,
            );
            self.append_notice(slot, &mut buf);
            let addr = m.addr;
            if self.notice_pings.len() >= MAX_CHECKS {
                self.notice_pings.pop_front();
            }
            self.notice_pings.push_back((seq, slot, now));
            self.send(addr, false, buf);
        }
    }

    /// Pings one random dead member; an ack means it is reachable again (a
    /// healed partition) and triggers a push-pull with it.
    pub(super) fn fire_reconnect(&mut self, now: Instant) {
        if now < self.next_reconnect_at {
            return;
        }
        self.next_reconnect_at = later(now, self.config.reconnect_interval);
        self.reconnect = None;
        if self.local.state != MemberState::Alive {
            return;
        }
        self.resend_notices(now);
        if !self.table.any_down() {
            return;
        }
        let mut targets = std::mem::take(&mut self.scratch_slots);
        self.table.sample(1, &mut targets, &mut self.rng, |_, m| {
            m.state == MemberState::Dead
        });
        let target = targets.first().copied();
        self.scratch_slots = targets;
        let Some(slot) = target else { return };
        let seq = self.next_seq();
        let Some(member) = self.slot(slot) else {
            return;
        };
        let mut buf = self.new_packet();
        wire::encode(
            &ping_msg(&self.local, seq, &member.name, member.generation, false),
            &mut buf,
        );
        let addr = member.addr;
        self.reconnect = Some((seq, slot, now));
        self.send(addr, false, buf);
    }

    pub(super) fn fire_suspicions(&mut self, now: Instant) {
        while let Some(&(at, slot)) = self.suspicion_deadlines.first() {
            if at > now {
                break;
            }
            self.suspicion_deadlines.pop_first();
            // Woken long after the deadline: this node was stalled, and a
            // refutation may be waiting in its input. Grant one probe
            // interval to read it before declaring anyone dead (once).
            // Not confirmed by enough independent members: ping the suspect
            // once more ourselves, carrying the suspicion, so its refutation
            // comes straight back even if the gossip of it missed us.
            if let Some(s) = self.suspicions.get_mut(&slot)
                && !s.graced
            {
                let late =
                    now.saturating_duration_since(at.max(s.set_at)) >= self.config.probe_interval;
                let unconfirmed = s.confirmations() < s.k.max(1);
                if late || unconfirmed {
                    s.graced = true;
                    s.deadline = later(now, self.config.probe_interval);
                    let deadline = s.deadline;
                    self.suspicion_deadlines.insert((deadline, slot));
                    if unconfirmed {
                        self.send_check(slot, now);
                    }
                    continue;
                }
            }
            let Some(suspicion) = self.suspicions.remove(&slot) else {
                continue;
            };
            let Some(member) = self.slot(slot) else {
                continue;
            };
            if member.state != MemberState::Suspect {
                continue;
            }
            let name = Arc::clone(&member.name);
            let local = Arc::clone(&self.local.name);
            let acc = Accusation {
                name: &name,
                generation: member.generation,
                incarnation: member.incarnation,
                from: &local,
            };
            debug!(member = %name, confirmations = suspicion.confirmations(),
                after_ms = u64::try_from(now.saturating_duration_since(suspicion.start).as_millis()).unwrap_or(u64::MAX),
                "suspicion timed out");
            self.apply_dead(&acc, Mode::Announce, now);
            // The suspicion was taken out above: the takeover delay counts
            // from its start (`suspected_from`, as the gate counts).
            self.table.set_suspected_from(slot, suspicion.start);
        }
    }

    /// When the next gossip round is due: every `gossip_interval`, and
    /// sooner once a broadcast was queued since the last round, as soon as
    /// `gossip_interval / NEWS_GAP_DIVISOR` has passed since that round. A
    /// suspicion, verdict or refutation then reaches the cluster in a few
    /// network hops instead of one gossip interval per hop, and rounds
    /// still go out at most `NEWS_GAP_DIVISOR` times per interval.
    pub(super) fn gossip_due(&self) -> Instant {
        if self.news_queued {
            let gap = self.config.gossip_interval / NEWS_GAP_DIVISOR;
            self.next_gossip_at.min(later(self.last_gossip_at, gap))
        } else {
            self.next_gossip_at
        }
    }

    pub(super) fn fire_gossip(&mut self, now: Instant) {
        if now < self.gossip_due() {
            return;
        }
        self.next_gossip_at = later(now, self.config.gossip_interval);
        self.last_gossip_at = now;
        self.news_queued = false;
        if self.broadcasts.is_empty() {
            return;
        }
        let gossip_to_dead = self.config.gossip_to_dead;
        let mut targets = std::mem::take(&mut self.scratch_slots);
        let table = &self.table;
        table.sample(
            self.config.gossip_fanout,
            &mut targets,
            &mut self.rng,
            |slot, m| match m.state {
                MemberState::Alive | MemberState::Suspect => true,
                MemberState::Dead => table
                    .down_since(slot)
                    .is_some_and(|since| now.saturating_duration_since(since) < gossip_to_dead),
                MemberState::Left => false,
            },
        );
        let limit = self.retransmit_limit();
        for &slot in &targets {
            let Some(addr) = self.slot(slot).map(|m| m.addr) else {
                continue;
            };
            let mut buf = self.new_packet();
            if self
                .broadcasts
                .fill(&mut buf, self.config.max_packet_size, limit)
                == 0
            {
                break;
            }
            self.stats.gossip_packets += 1;
            self.send(addr, false, buf);
        }
        self.scratch_slots = targets;
    }

    pub(super) fn fire_reap(&mut self, now: Instant) {
        while let Some(slot) = self.table.next_reap(now) {
            self.remove_member(slot);
        }
    }
}
