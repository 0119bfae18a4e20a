//! Push-pull anti-entropy: this node's full state sent (each round, to a
//! member or a seed that is not one; a join and its retries), and a
//! peer's state merged (its answer, a seed's answer to our join, a
//! bootstrap snapshot).

use super::*;

impl<R: Rng> Membership<R> {
    pub(super) fn fire_push_pull(&mut self, now: Instant) {
        if now < self.next_push_pull_at {
            return;
        }
        let interval = push_pull_scale(self.config.push_pull_interval, self.live());
        self.next_push_pull_at = later(now, interval);
        if !self.local.state.is_live() {
            return;
        }
        // Dead members too, so the two sides of a healed partition meet.
        let mut targets = std::mem::take(&mut self.scratch_slots);
        self.table.sample(1, &mut targets, &mut self.rng, |_, m| {
            m.state != MemberState::Left
        });
        let target = targets
            .first()
            .and_then(|slot| self.slot(*slot))
            .map(|m| m.addr);
        self.scratch_slots = targets;
        if let Some(addr) = target {
            self.send_state(addr, false, true, now);
        }
        // A seed that is not a live member here: maybe another cluster that
        // formed while we were apart. One of them per round.
        if self.seeds.is_empty() || self.join.is_some() {
            return;
        }
        let unknown: Vec<SocketAddr> = self
            .seeds
            .iter()
            .copied()
            .filter(|seed| {
                !self
                    .table
                    .iter()
                    .any(|m| m.addr == *seed && m.state.is_live())
            })
            .collect();
        if unknown.is_empty() {
            return;
        }
        let pick = self.rng.random_range(0..unknown.len());
        if let Some(&seed) = unknown.get(pick)
            && Some(seed) != target
        {
            self.stats.seed_push_pulls += 1;
            self.send_state(seed, false, true, now);
        }
    }

    /// Sends this node's full state (reliable), truncated to
    /// `max_state_size` from a random starting member if need be.
    pub(super) fn send_state(&mut self, to: SocketAddr, join: bool, reply: bool, now: Instant) {
        if reply {
            // A request: its answer is contact, from now (lease).
            self.lease.pull_sent(to, now);
        }
        let max = self.config.max_state_size;
        let mut buf = wire::new_packet(self.config.max_packet_size.min(max));
        wire::encode(
            &Message::PushPull(PushPull {
                from: &self.local.name,
                join,
                reply,
            }),
            &mut buf,
        );
        let local_state = wire_state(self.local.state);
        wire::encode(
            &Message::State(State {
                member: alive_of(&self.local),
                state: local_state,
            }),
            &mut buf,
        );
        let len = self.table.slots();
        let start = if len == 0 {
            0
        } else {
            self.rng.random_range(0..len)
        };
        let mut truncated = false;
        for i in 0..len {
            let Some(m) = u32::try_from((start + i) % len)
                .ok()
                .and_then(|slot| self.table.get(slot))
            else {
                continue;
            };
            let before = buf.len();
            wire::encode(
                &Message::State(State {
                    member: alive_of(m),
                    state: wire_state(m.state),
                }),
                &mut buf,
            );
            if buf.len() > max {
                buf.truncate(before);
                truncated = true;
                break;
            }
        }
        if truncated {
            self.stats.states_truncated += 1;
        }
        self.stats.push_pulls += 1;
        self.send(to, true, buf);
    }

    pub(super) fn fire_join(&mut self, now: Instant) {
        let Some(join) = self.join.as_mut() else {
            return;
        };
        if now < join.next_at {
            return;
        }
        // Already in touch with a seed (it is a live member here): done.
        let seeds_known = join.seeds.iter().any(|addr| {
            self.table
                .iter()
                .any(|m| m.addr == *addr && m.state == MemberState::Alive)
        });
        if seeds_known {
            self.join = None;
            return;
        }
        let Some(join) = self.join.as_mut() else {
            return;
        };
        join.next_at = later(now, join.delay);
        join.delay = join
            .delay
            .saturating_mul(2)
            .min(self.config.push_pull_interval);
        let seeds = join.seeds.clone();
        for seed in seeds {
            self.send_state(seed, true, true, now);
        }
    }

    /// For simulators and restarts: merges a member snapshot as push-pull
    /// would, silently (no per-member events, nothing re-broadcast; one
    /// `ViewChanged` follows). Unknown members are inserted in the state
    /// given (a suspect one as alive); known ones follow the usual precedence
    /// rules. Entries about this node are ignored. Names and metadata are
    /// shared with the snapshot, not copied.
    pub fn bootstrap(&mut self, members: impl IntoIterator<Item = Member>, now: Instant) {
        let members = members.into_iter();
        let expected = members.size_hint().0;
        self.table.reserve(expected);
        for member in members {
            if member.name == self.local.name {
                continue;
            }
            if member.name.is_empty() || member.name.len() > self.config.max_name_len {
                continue;
            }
            if member.metadata.len() > self.config.max_metadata_len {
                continue;
            }
            let info = AliveInfo::from_member(&member);
            match (self.table.find(&member.name), member.state) {
                (None, MemberState::Alive | MemberState::Suspect) => {
                    self.apply_alive(info, Mode::Quiet, now);
                }
                (None, state @ (MemberState::Dead | MemberState::Left)) => {
                    self.insert_down(info, state, now);
                }
                (Some(_), MemberState::Alive) => self.apply_alive(info, Mode::Quiet, now),
                (Some(_), state) => {
                    let from = if state == MemberState::Left {
                        Arc::clone(&member.name)
                    } else {
                        Arc::clone(&self.local.name)
                    };
                    let acc = Accusation {
                        name: &member.name,
                        generation: member.generation,
                        incarnation: member.incarnation,
                        from: &from,
                    };
                    if state == MemberState::Left {
                        self.apply_dead(&acc, Mode::Quiet, now);
                    } else {
                        self.apply_suspect(&acc, Mode::Quiet, now);
                    }
                }
            }
        }
        self.view_dirty = true;
        // Spread the first push-pull over the (size-scaled) interval, so nodes
        // bootstrapped together do not all exchange state at once.
        let interval = push_pull_scale(self.config.push_pull_interval, self.live());
        self.next_push_pull_at = later(now, interval.mul_f64(self.rng.random_range(0.0..1.0)));
    }

    /// One member of a push-pull state; `from` is the sender (authenticated),
    /// counted as the accuser of the suspect and dead members it reports.
    /// What it says about itself counts first-hand; about others, what a
    /// third party may say (`vet_alive`, `vet_accusation`).
    pub(super) fn merge_state(
        &mut self,
        state: &State<'_>,
        from: &str,
        join_answer: bool,
        now: Instant,
    ) {
        let member = &state.member;
        let acc = Accusation {
            name: member.name,
            generation: member.generation,
            incarnation: member.incarnation,
            from,
        };
        let known = member.name == &*self.local.name || self.table.find(member.name).is_some();
        let info = AliveInfo::from_wire(member);
        let first_hand = member.name == from;
        match state.state {
            _ if join_answer && !known => {
                // A seed's answer to our join: unknown members as it lists
                // them (the member cap still applies).
                match state.state {
                    WireState::Alive => self.apply_alive(info, Mode::Merge, now),
                    WireState::Suspect => {
                        self.apply_alive(info, Mode::Merge, now);
                        self.apply_suspect(&acc, Mode::Merge, now);
                    }
                    WireState::Dead => self.insert_down(info, MemberState::Dead, now),
                    WireState::Left => self.insert_down(info, MemberState::Left, now),
                }
                return;
            }
            WireState::Alive => {
                if self.vet_alive(Some(from), &info, now) {
                    self.apply_alive(info, Mode::Merge, now);
                }
                return;
            }
            WireState::Suspect | WireState::Dead | WireState::Left if first_hand => {
                // A member does not report itself down; a leaving node sends
                // its leave as a message. Nothing to apply.
                self.stats.ignored_updates += 1;
                return;
            }
            WireState::Dead | WireState::Left if !known => {
                // A tombstone from a third party could bar the name (a high
                // generation makes the real member's announcements stale).
                self.stats.unknown_down_refused += 1;
                return;
            }
            WireState::Suspect | WireState::Dead | WireState::Left => {
                if !self.vet_alive(Some(from), &info, now) {
                    return;
                }
            }
        }
        match state.state {
            WireState::Alive => {}
            WireState::Suspect | WireState::Dead if member.name == &*self.local.name => {
                if state.state == WireState::Dead {
                    self.apply_dead(&acc, Mode::Merge, now);
                } else {
                    self.apply_suspect(&acc, Mode::Merge, now);
                }
            }
            WireState::Suspect => {
                // Learn an unknown member first, then the suspicion.
                self.apply_alive(AliveInfo::from_wire(member), Mode::Merge, now);
                self.apply_suspect(&acc, Mode::Merge, now);
            }
            WireState::Dead
                if self
                    .table
                    .by_name(member.name)
                    .is_some_and(|m| !m.state.is_live() && m.generation == member.generation) =>
            {
                // Already down here; the remote saw it refute and die again
                // at a later incarnation. Nothing to revive: keep it dead,
                // at the later incarnation (stale alives then stay stale).
                if let Some(slot) = self.table.find(member.name)
                    && self
                        .slot(slot)
                        .is_some_and(|m| m.incarnation < member.incarnation)
                {
                    self.table
                        .edit(slot, |m| m.incarnation = member.incarnation);
                    self.set_state(slot, MemberState::Dead, now);
                }
            }
            WireState::Dead => {
                // The remote may be wrong (a partition): only suspect. But
                // the member itself must learn it was declared dead.
                self.apply_alive(AliveInfo::from_wire(member), Mode::Merge, now);
                if let Some(slot) = self.table.find(member.name)
                    && self.slot(slot).is_some_and(|m| {
                        m.state.is_live()
                            && m.generation == member.generation
                            && m.incarnation <= member.incarnation
                    })
                {
                    self.tell_declared_dead(slot, member.incarnation, from);
                }
                self.apply_suspect(&acc, Mode::Merge, now);
            }
            WireState::Left => {
                // Only the member's own word counts for a leave: ask it.
                let acc = Accusation {
                    from: member.name,
                    ..acc
                };
                if self.vet_accusation(Some(from), &acc, Mode::Merge, now) {
                    self.apply_dead(&acc, Mode::Merge, now);
                }
            }
        }
    }

    /// Sends our `Alive` straight to the live members our join answer
    /// listed (at most `MAX_CLAIM_CHECKS`): they take a new member only
    /// from itself, and this reaches them as fast as the seed's gossip
    /// would have (which they now only check with us).
    pub(super) fn announce_to_members(&mut self) {
        if self.local.state != MemberState::Alive {
            return;
        }
        let targets: Vec<SocketAddr> = self
            .table
            .iter()
            .filter(|m| m.state.is_live())
            .map(|m| m.addr)
            .take(MAX_CLAIM_CHECKS)
            .collect();
        for to in targets {
            let mut buf = self.new_packet();
            wire::encode(&Message::Alive(alive_of(&self.local)), &mut buf);
            self.finish_unreliable(to, buf);
        }
    }
}
