//! Applying `Alive`, `Suspect` and `Dead` updates (vetted first by who sent
//! them, `identity.rs`) by the precedence rules, and the answers they call
//! for: refutations, stale accusations answered, verdicts told to their
//! subject.

use super::*;

/// Where a member name comes from: borrowed from a packet, or shared.
#[derive(Clone, Copy)]
pub(super) enum NameSrc<'a> {
    Wire(&'a str),
    Shared(&'a Arc<str>),
}

impl NameSrc<'_> {
    pub(super) fn as_str(&self) -> &str {
        match self {
            NameSrc::Wire(name) => name,
            NameSrc::Shared(name) => name,
        }
    }

    pub(super) fn to_arc(self) -> Arc<str> {
        match self {
            NameSrc::Wire(name) => Arc::from(name),
            NameSrc::Shared(name) => Arc::clone(name),
        }
    }
}

/// Where metadata comes from: borrowed from a packet, or shared.
#[derive(Clone, Copy)]
pub(super) enum MetaSrc<'a> {
    Wire(&'a [u8]),
    Shared(&'a Arc<[u8]>),
}

impl MetaSrc<'_> {
    pub(super) fn as_slice(&self) -> &[u8] {
        match self {
            MetaSrc::Wire(meta) => meta,
            MetaSrc::Shared(meta) => meta,
        }
    }

    pub(super) fn to_arc(self, empty: &Arc<[u8]>) -> Arc<[u8]> {
        match self {
            MetaSrc::Wire([]) => Arc::clone(empty),
            MetaSrc::Wire(meta) => Arc::from(meta),
            MetaSrc::Shared(meta) => Arc::clone(meta),
        }
    }
}

/// An alive announcement, from the wire or from a snapshot.
#[derive(Clone, Copy)]
pub(super) struct AliveInfo<'a> {
    pub(super) name: NameSrc<'a>,
    pub(super) generation: u64,
    pub(super) incarnation: u64,
    pub(super) addr: SocketAddr,
    pub(super) ready: bool,
    pub(super) metadata: MetaSrc<'a>,
}

impl<'a> AliveInfo<'a> {
    pub(super) fn from_wire(alive: &Alive<'a>) -> Self {
        AliveInfo {
            name: NameSrc::Wire(alive.name),
            generation: alive.generation,
            incarnation: alive.incarnation,
            addr: alive.addr,
            ready: alive.ready,
            metadata: MetaSrc::Wire(alive.metadata),
        }
    }

    pub(super) fn from_member(member: &'a Member) -> Self {
        AliveInfo {
            name: NameSrc::Shared(&member.name),
            generation: member.generation,
            incarnation: member.incarnation,
            addr: member.addr,
            ready: member.ready,
            metadata: MetaSrc::Shared(&member.metadata),
        }
    }

    /// A member record of this announcement, in `state` (`empty`: the
    /// shared empty metadata).
    pub(super) fn to_member(self, state: MemberState, empty: &Arc<[u8]>) -> Member {
        Member {
            name: self.name.to_arc(),
            generation: self.generation,
            addr: self.addr,
            incarnation: self.incarnation,
            state,
            ready: self.ready,
            metadata: self.metadata.to_arc(empty),
        }
    }
}

/// Where an update comes from, which decides what it may do.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// A message (gossip, piggyback, own probe): events, re-broadcast, and a
    /// suspicion from a new accuser confirms an existing one.
    Announce,
    /// A push-pull state: events and re-broadcast, but it never confirms a
    /// suspicion (the sender only relays what it heard; counting it would
    /// let one node's suspicion confirm itself through others).
    Merge,
    /// A bootstrap snapshot: no per-member events, nothing re-broadcast.
    Quiet,
}

impl Mode {
    pub(super) fn announces(self) -> bool {
        self != Mode::Quiet
    }
}

impl<R: Rng> Membership<R> {
    /// Whether this node's dead verdict about a member, reached at
    /// `down_since`, may have been acted on by the layers above: the
    /// takeover gate has released it (the takeover delay after the start of
    /// the suspicion behind the verdict, `suspected_from`, or after the
    /// verdict itself when this node held no such suspicion; the gate
    /// counts the same way, from its own sight of the suspicion, never
    /// earlier), and this node's lease was valid at some instant since then
    /// (a node takes datums over only while its lease is valid).
    /// A node that was cut off into a minority reaches verdicts about the
    /// majority's members while its lease has lapsed; after the heal those
    /// members refute, and must not be told a verdict was acted on that
    /// never was (they would fence for nothing: the heal storm).
    pub(super) fn acted_on(
        &self,
        down_since: Option<Instant>,
        suspected_from: Option<Instant>,
        now: Instant,
    ) -> bool {
        let Some(since) = down_since else {
            // No record of when: assume it was.
            return true;
        };
        let delay = self.config.takeover_delay();
        let Some(takeover) = suspected_from
            .filter(|_| self.config.takeover_from_suspicion())
            .unwrap_or(since)
            .checked_add(delay)
            .map(|t| t.max(since))
        else {
            return false;
        };
        if now < takeover {
            return false;
        }
        if self.lease.strategy == LeaseStrategy::Off {
            return true;
        }
        self.lease.reported
            || self.standing(now).is_valid()
            || self
                .lease
                .lapsed_at
                .is_some_and(|lapsed| lapsed >= takeover)
    }

    /// Whether one more member fits under `max_members`; counts a refusal.
    pub(super) fn room_for_member(&mut self) -> bool {
        // The local node counts as one.
        if self.table.len() + 1 >= self.config.max_members {
            self.stats.members_refused += 1;
            return false;
        }
        true
    }

    pub(super) fn apply_alive(&mut self, info: AliveInfo<'_>, mode: Mode, now: Instant) {
        if info.name.as_str() == &*self.local.name {
            self.alive_about_self(&info);
            return;
        }
        let Some(slot) = self.table.find(info.name.as_str()) else {
            if !self.room_for_member() {
                return;
            }
            let member = info.to_member(MemberState::Alive, &self.empty_metadata);
            let slot = self.insert_member(member, now);
            if mode.announces() {
                if let Some(m) = self.slot(slot) {
                    debug!(member = %m.name, generation = m.generation, incarnation = m.incarnation, addr = %m.addr, "joined");
                    self.emit(Event::Joined(m.clone()));
                }
                self.broadcast_alive(slot);
            }
            return;
        };
        let Some(record) = self.slot(slot) else {
            return;
        };
        let (generation, incarnation, addr, state) = (
            record.generation,
            record.incarnation,
            record.addr,
            record.state,
        );
        let down_since = self.table.down_since(slot);
        let suspected_from = self.table.suspected_from(slot);
        if info.generation < generation {
            self.stats.ignored_updates += 1;
            return;
        }
        if info.generation > generation {
            self.replace_identity(slot, info, mode, now);
            return;
        }
        if info.addr != addr && state.is_live() {
            // Two live processes claim one (name, generation): the higher
            // address wins, the same way everywhere.
            self.stats.name_conflicts += 1;
            let theirs = Claimant {
                generation: info.generation,
                addr: info.addr,
            };
            let ours = Claimant { generation, addr };
            let (winner, loser) = if info.addr > addr {
                (theirs, ours)
            } else {
                (ours, theirs)
            };
            warn!(member = info.name.as_str(), generation, winner = %winner.addr, loser = %loser.addr, "name conflict");
            if mode.announces() {
                self.emit(Event::NameConflict {
                    name: info.name.to_arc(),
                    winner,
                    loser,
                    local_lost: false,
                });
            }
            if info.addr > addr {
                self.replace_identity(slot, info, mode, now);
            }
            return;
        }
        if info.incarnation <= incarnation {
            self.stats.ignored_updates += 1;
            return;
        }
        let Some(record) = self.slot(slot) else {
            return;
        };
        let changed = record.ready != info.ready || *record.metadata != *info.metadata.as_slice();
        let empty = &self.empty_metadata;
        self.table.edit(slot, |record| {
            record.incarnation = info.incarnation;
            record.addr = info.addr;
            record.ready = info.ready;
            if changed {
                record.metadata = info.metadata.to_arc(empty);
            }
        });
        self.set_state(slot, MemberState::Alive, now);
        let acted_on = self.acted_on(down_since, suspected_from, now);
        if state == MemberState::Dead && mode.announces() && acted_on {
            // Our verdict stood for the takeover delay: the layers above
            // have taken its datums over. It refuted, maybe without ever
            // hearing of the verdict, or only of an older one it could
            // answer: tell it the verdict was acted on (a notice no
            // refutation answers), so it fences. (A verdict withdrawn
            // sooner was never acted on: nothing to tell.)
            self.tell_declared_dead(slot, wire::ACTED_ON, &self.local.name.clone());
        }
        if changed {
            self.view_dirty = true;
        }
        if mode.announces() {
            if let Some(m) = self.slot(slot).cloned() {
                match state {
                    MemberState::Alive => {}
                    MemberState::Suspect | MemberState::Dead => {
                        debug!(member = %m.name, incarnation = m.incarnation, was = ?state, "alive again");
                        self.emit(Event::Alive(m.clone()));
                    }
                    MemberState::Left => {
                        debug!(member = %m.name, incarnation = m.incarnation, "rejoined");
                        self.emit(Event::Joined(m.clone()));
                    }
                }
                if changed && state != MemberState::Left {
                    self.emit(Event::Updated(m));
                }
            }
            self.broadcast_alive(slot);
        }
    }

    /// A new generation (or the winner of a name conflict) takes a record.
    pub(super) fn replace_identity(
        &mut self,
        slot: u32,
        info: AliveInfo<'_>,
        mode: Mode,
        now: Instant,
    ) {
        let Some(old) = self.slot(slot).cloned() else {
            return;
        };
        let empty = &self.empty_metadata;
        self.table.edit(slot, |record| {
            record.generation = info.generation;
            record.incarnation = info.incarnation;
            record.addr = info.addr;
            record.ready = info.ready;
            record.metadata = info.metadata.to_arc(empty);
        });
        // Not `set_state`: the lease hears of a new generation, not of a
        // state change (its witness rank changed with it).
        self.table
            .apply(slot, MemberState::Alive, now, &mut self.rng);
        self.lease
            .member_replaced(slot, Some(old.state), Some(MemberState::Alive));
        self.clear_suspicion(slot);
        self.notices.remove(&slot);
        if old.state.is_live() && self.probe.is_some_and(|p| p.slot == slot) {
            self.probe = None;
        }
        self.view_dirty = true;
        debug!(member = %old.name, old_generation = old.generation, generation = info.generation, "new generation");
        if mode.announces() {
            if old.state.is_live() {
                self.emit(Event::Failed(old));
            }
            if let Some(m) = self.slot(slot).cloned() {
                self.emit(Event::Joined(m));
            }
            self.broadcast_alive(slot);
        } else {
            self.broadcasts.remove(slot);
        }
    }

    pub(super) fn alive_about_self(&mut self, info: &AliveInfo<'_>) {
        let ours = Claimant {
            generation: self.local.generation,
            addr: self.local.addr,
        };
        let theirs = Claimant {
            generation: info.generation,
            addr: info.addr,
        };
        if info.generation < ours.generation {
            // An older process of ours is still talked about: re-announce.
            self.refresh_local_alive();
            return;
        }
        if info.generation == ours.generation && info.addr == ours.addr {
            if info.incarnation > self.local.incarnation && self.local.state == MemberState::Alive {
                self.refute(info.incarnation);
            }
            return;
        }
        // Another live process claims our name.
        self.stats.name_conflicts += 1;
        let we_lose = (info.generation, info.addr) > (ours.generation, ours.addr);
        if we_lose {
            warn!(name = %self.local.name, winner = %theirs.addr, winner_generation = theirs.generation,
                "another process took this node's name; going passive");
            self.emit(Event::NameConflict {
                name: Arc::clone(&self.local.name),
                winner: theirs,
                loser: ours,
                local_lost: true,
            });
            self.stats.declared_failed += 1;
            self.emit(Event::DeclaredFailed);
            self.local.state = MemberState::Dead;
            self.superseded = true;
            self.probe = None;
            self.join = None;
            self.broadcasts.remove(LOCAL_SLOT);
            self.view_dirty = true;
        } else {
            warn!(name = %self.local.name, loser = %theirs.addr, "another process claims this node's name; keeping it");
            self.emit(Event::NameConflict {
                name: Arc::clone(&self.local.name),
                winner: ours,
                loser: theirs,
                local_lost: false,
            });
            self.refresh_local_alive();
        }
    }

    /// Re-queues our alive announcement unless one is already queued.
    pub(super) fn refresh_local_alive(&mut self) {
        if self.local.state == MemberState::Alive && !self.broadcasts.contains(LOCAL_SLOT) {
            self.broadcast_local_alive();
        }
    }

    /// Raises our incarnation above an accusation and announces it.
    pub(super) fn refute(&mut self, accused: u64) {
        // Saturates: a (buggy) accusation at u64::MAX cannot be refuted, but
        // cannot overflow either.
        self.local.incarnation = self.local.incarnation.max(accused).saturating_add(1);
        self.stats.refutations += 1;
        self.bump_awareness(1);
        self.broadcast_local_alive();
        debug!(name = %self.local.name, incarnation = self.local.incarnation, "refuted");
    }

    /// Whether an accusation about this node is to be refuted: same process,
    /// not leaving, at least our incarnation. A stale one (we already refuted
    /// it) is answered directly to its accuser, whose timer may still run.
    pub(super) fn accusation_about_self(&mut self, acc: &Accusation<'_>) -> bool {
        if self.local.state != MemberState::Alive {
            return false;
        }
        if acc.generation < self.local.generation {
            self.refresh_local_alive();
            return false;
        }
        if acc.generation != self.local.generation {
            return false;
        }
        if acc.incarnation < self.local.incarnation {
            self.tell_accuser(acc.from);
            return false;
        }
        true
    }

    /// Sends our alive announcement straight to an accuser (once per accuser
    /// and incarnation): gossip alone may miss exactly the node whose
    /// suspicion timer is running.
    pub(super) fn tell_accuser(&mut self, accuser: &str) {
        if accuser == &*self.local.name {
            return;
        }
        let hash = self.hasher.hash_str(accuser);
        if self.told.0 != self.local.incarnation {
            self.told.0 = self.local.incarnation;
            self.told.1.clear();
        }
        if self.told.1.contains(&hash) || self.told.1.len() >= MAX_TOLD {
            return;
        }
        self.told.1.push(hash);
        let Some(addr) = self
            .member(accuser)
            .filter(|m| m.state != MemberState::Left)
            .map(|m| m.addr)
        else {
            return;
        };
        let mut buf = self.new_packet();
        wire::encode(&Message::Alive(alive_of(&self.local)), &mut buf);
        self.stats.direct_refutations += 1;
        self.finish_unreliable(addr, buf);
    }

    /// An accusation about a live member at an incarnation below the one
    /// known here: the member refuted it, but its refutation may not reach
    /// the accuser (one-way loss between them, or the gossip ran out before
    /// it got there), and an accuser that never hears it declares the
    /// member dead on its own and, after the takeover delay, takes datums the
    /// member still holds under a valid lease. So the newer record goes
    /// straight to the accuser, once per (accuser, member, incarnation).
    pub(super) fn answer_stale_accusation(&mut self, slot: u32, acc: &Accusation<'_>, mode: Mode) {
        if !mode.announces() || acc.from == &*self.local.name || acc.from == acc.name {
            return;
        }
        let Some(record) = self.slot(slot).cloned() else {
            return;
        };
        if acc.generation != record.generation
            || acc.incarnation >= record.incarnation
            || record.state != MemberState::Alive
        {
            return;
        }
        let key = self.hasher.hash_str(acc.from)
            ^ self.hasher.hash_str(acc.name).rotate_left(21)
            ^ record.incarnation.rotate_left(42);
        if self.stale_answered.contains(&key) {
            return;
        }
        let Some(to) = self
            .member(acc.from)
            .filter(|m| m.state.is_live())
            .map(|m| m.addr)
        else {
            return;
        };
        if self.stale_answered.len() >= MAX_STALE_ANSWERED {
            self.stale_answered.pop_front();
        }
        self.stale_answered.push_back(key);
        let mut buf = self.new_packet();
        wire::encode(&Message::Alive(alive_of(&record)), &mut buf);
        self.stats.stale_accusations_answered += 1;
        self.finish_unreliable(to, buf);
    }

    /// The slot of the member an accusation is about, if it is about the
    /// member's current generation at an incarnation not below the one
    /// known here (and, with `live_only`, while the member is live).
    /// Otherwise `None`: counted in `ignored_updates`, and a known member's
    /// newer record goes back to the accuser (`answer_stale_accusation`).
    fn accused(&mut self, acc: &Accusation<'_>, mode: Mode, live_only: bool) -> Option<u32> {
        let Some(slot) = self.table.find(acc.name) else {
            self.stats.ignored_updates += 1;
            return None;
        };
        let record = self.slot(slot)?;
        if acc.generation != record.generation
            || acc.incarnation < record.incarnation
            || (live_only && !record.state.is_live())
        {
            self.stats.ignored_updates += 1;
            self.answer_stale_accusation(slot, acc, mode);
            return None;
        }
        Some(slot)
    }

    pub(super) fn apply_suspect(&mut self, acc: &Accusation<'_>, mode: Mode, now: Instant) {
        if acc.name == &*self.local.name {
            if self.accusation_about_self(acc) {
                self.refute(acc.incarnation);
                self.tell_accuser(acc.from);
            }
            return;
        }
        let Some(slot) = self.accused(acc, mode, false) else {
            return;
        };
        let Some(record) = self.slot(slot) else {
            return;
        };
        let accuser = self.hasher.hash_str(acc.from);
        match record.state {
            MemberState::Dead | MemberState::Left => {
                self.stats.ignored_updates += 1;
            }
            MemberState::Suspect => {
                let Some(s) = self.suspicions.get_mut(&slot) else {
                    return;
                };
                let old_deadline = s.deadline;
                if mode == Mode::Announce && s.confirm(accuser, now) {
                    let new_deadline = s.deadline;
                    self.suspicion_deadlines.remove(&(old_deadline, slot));
                    self.suspicion_deadlines.insert((new_deadline, slot));
                    if mode.announces() {
                        self.queue_broadcast(slot, wire::encode_one(&Message::Suspect(*acc)));
                    }
                } else {
                    self.stats.ignored_updates += 1;
                }
            }
            MemberState::Alive => {
                let n = self.live();
                let mut k = self.config.suspicion_mult.saturating_sub(2);
                if n.saturating_sub(2) < k as usize {
                    k = 0;
                }
                let min = suspicion_min(self.config.suspicion_mult, n, self.config.probe_interval);
                let max = min.saturating_mul(self.config.suspicion_max_mult);
                let suspicion = Suspicion::new(accuser, now, min, max, k);
                self.suspicion_deadlines.insert((suspicion.deadline, slot));
                self.suspicions.insert(slot, suspicion);
                self.stats.suspicions += 1;
                self.table
                    .edit(slot, |record| record.incarnation = acc.incarnation);
                self.set_state(slot, MemberState::Suspect, now);
                if mode.announces() {
                    if let Some(m) = self.slot(slot).cloned() {
                        debug!(member = %m.name, incarnation = m.incarnation, accuser = acc.from, "suspected");
                        self.emit(Event::Suspected(m));
                    }
                    self.queue_broadcast(slot, wire::encode_one(&Message::Suspect(*acc)));
                }
            }
        }
    }

    pub(super) fn apply_dead(&mut self, acc: &Accusation<'_>, mode: Mode, now: Instant) {
        let left = acc.from == acc.name;
        if acc.name == &*self.local.name {
            // A verdict at our current incarnation (or above) is one we never
            // answered: its author may have taken our datums over, so the
            // layers above must fence. A verdict about an older incarnation
            // was already refuted; its author revives us when our refutation
            // reaches it (answered directly below), within the takeover
            // delay or it tells us so at our new incarnation: no fence.
            // Reported once per (accuser, incarnation): copies of one
            // verdict arrive by many gossip paths.
            // A node whose ownership lease is valid refutes such a verdict
            // instead: with the majority in sight and fresh contact, the
            // verdict comes from a node that could not reach it (a cut-off
            // minority spreading stale verdicts after a heal); the others
            // hold a verdict back for the takeover delay and withdraw it
            // when the refutation arrives, and one that acted anyway sends
            // the acted-on notice, which always fences.
            let standing = self.standing(now).is_valid();
            if !left
                && self.local.state == MemberState::Alive
                && acc.generation == self.local.generation
                && acc.incarnation >= self.local.incarnation
                && (acc.incarnation == wire::ACTED_ON || !standing)
            {
                // (`ACTED_ON` is above every incarnation: a verdict its
                // author acted on, told after our refutation reached it.)
                // An acted-on notice is keyed by our incarnation: one per
                // accuser and refutation (its copies repeat until acked).
                let verdict = if acc.incarnation == wire::ACTED_ON {
                    (self.local.incarnation, !self.hasher.hash_str(acc.from))
                } else {
                    (acc.incarnation, self.hasher.hash_str(acc.from))
                };
                if !self.verdicts.contains(&verdict) {
                    if self.verdicts.len() >= MAX_VERDICTS {
                        self.verdicts.pop_front();
                    }
                    self.verdicts.push_back(verdict);
                    warn!(name = %self.local.name, incarnation = acc.incarnation, accuser = acc.from,
                        "the cluster declared this node failed");
                    self.stats.declared_failed += 1;
                    self.emit(Event::DeclaredFailed);
                }
            }
            if acc.incarnation == wire::ACTED_ON {
                // Not an accusation: the author already revived us.
                return;
            }
            if self.accusation_about_self(acc) {
                self.refute(acc.incarnation);
                self.tell_accuser(acc.from);
            }
            return;
        }
        if acc.incarnation == wire::ACTED_ON {
            // Only ever sent to the member itself: not a verdict to apply.
            self.stats.ignored_updates += 1;
            return;
        }
        let Some(slot) = self.accused(acc, mode, true) else {
            return;
        };
        let Some(record) = self.slot(slot) else {
            return;
        };
        let was = record.state;
        // A suspicion held here at the verdict's incarnation: the member has
        // answered no probe since it started (a refutation would have
        // ended it), so the takeover delay may count from there.
        let suspected = (was == MemberState::Suspect && acc.incarnation == record.incarnation)
            .then(|| self.suspicions.get(&slot).map(|s| s.start))
            .flatten();
        let state = if left {
            MemberState::Left
        } else {
            MemberState::Dead
        };
        self.table
            .edit(slot, |record| record.incarnation = acc.incarnation);
        self.set_state(slot, state, now);
        if let Some(start) = suspected {
            self.table.set_suspected_from(slot, start);
        }
        if !left {
            self.stats.failures += 1;
        }
        if mode.announces() {
            if let Some(m) = self.slot(slot).cloned() {
                if left {
                    info!(member = %m.name, incarnation = m.incarnation, "left");
                    self.emit(Event::Left(m));
                } else {
                    info!(member = %m.name, incarnation = m.incarnation, accuser = acc.from, "failed");
                    self.emit(Event::Failed(m));
                }
            }
            self.queue_broadcast(slot, wire::encode_one(&Message::Dead(*acc)));
        }
    }

    /// Sends a member our (or `accuser`'s) death verdict about it at
    /// `incarnation`, directly: only the member itself acts on it (it reports
    /// `DeclaredFailed` once per incarnation, and refutes if still needed).
    ///
    /// Sent on the reliable path, and repeated on every ping and ack to it
    /// until one of our pings carrying it is acked, so neither a lost packet
    /// nor a partition leaves it unfenced.
    pub(super) fn tell_declared_dead(&mut self, slot: u32, incarnation: u64, accuser: &str) {
        let Some(m) = self.slot(slot) else { return };
        let mut buf = self.new_packet();
        wire::encode(
            &Message::Dead(Accusation {
                name: &m.name,
                generation: m.generation,
                incarnation,
                from: accuser,
            }),
            &mut buf,
        );
        let addr = m.addr;
        self.send(addr, true, buf);
        self.notices.insert(
            slot,
            Notice {
                incarnation,
                accuser: Arc::from(accuser),
            },
        );
    }
}
