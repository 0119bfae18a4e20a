//! The ownership lease as membership keeps it: the reference and witness
//! sets kept up to date with the view, the witnesses' pings, the standing
//! judged and reported, and the evidence a rebirth inherits.

use super::*;

impl<R: Rng> Membership<R> {
    /// This node's witness set by name, for a new generation of it started
    /// in the same process ([`inherit_lease`](Self::inherit_lease)): taken
    /// from a node declared dead, before it is replaced. Empty with a
    /// strategy other than `Witnesses`.
    pub fn lease_evidence(&self) -> LeaseEvidence {
        if self.lease.strategy != LeaseStrategy::Witnesses {
            return LeaseEvidence::default();
        }
        let w = &self.lease.witnesses;
        let witnesses = w
            .list
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let name = match x.id {
                    WitnessId::Local => Some(Arc::clone(&self.local.name)),
                    WitnessId::Slot(slot) => self.slot(slot).map(|m| Arc::clone(&m.name)),
                    WitnessId::Unknown => w
                        .inherited
                        .iter()
                        .find(|(at, _)| *at == i)
                        .map(|(_, name)| Arc::clone(name)),
                    WitnessId::Gone => None,
                };
                (name, x.rank)
            })
            .collect();
        LeaseEvidence {
            name: Some(Arc::clone(&self.local.name)),
            witnesses,
        }
    }

    /// Starts this node, a new generation of a process declared dead, with
    /// its predecessor's witness set ([`lease_evidence`](Self::lease_evidence)
    /// of the old `Membership`), frozen until this node's lease has been
    /// valid once; call right after [`new`](Self::new), before `join`. Its
    /// witnesses are known by name: one not in the member table (yet), and
    /// the predecessor itself (a dead generation), count as unreachable. A
    /// new process instead draws its witnesses from the members it sees
    /// alive, which inside a cut-off piece are only that piece's.
    ///
    /// Returns whether the evidence was taken. It is not (the node starts as
    /// a new process does) if it is empty, from another name, the strategy
    /// is not `Witnesses`, this node's lease was already valid, or its
    /// remote witnesses could never be a strict majority of it (a witness
    /// set of one: the predecessor itself).
    pub fn inherit_lease(&mut self, evidence: LeaseEvidence, now: Instant) -> bool {
        let own = &self.local.name;
        let remote = evidence
            .witnesses
            .iter()
            .filter(|(name, _)| name.as_ref().is_some_and(|n| n != own))
            .count();
        if self.lease.strategy != LeaseStrategy::Witnesses
            || evidence.name.as_ref() != Some(own)
            || !self.lease.starting()
            || self.lease.reported
            || 2 * remote <= evidence.witnesses.len()
        {
            return false;
        }
        let w = &mut self.lease.witnesses;
        w.list.clear();
        w.inherited.clear();
        w.entered.clear();
        w.stale = false;
        for (i, (name, rank)) in evidence.witnesses.into_iter().enumerate() {
            w.list
                .push(crate::lease::Witness::new(WitnessId::Gone, rank));
            if let Some(name) = name.filter(|n| n != own) {
                w.inherited.push((i, name));
            }
        }
        self.resolve_inherited();
        info!(name = %self.local.name, witnesses = self.lease.witnesses.list.len(),
            "inherited the previous generation's witness set");
        self.update_standing(now);
        true
    }

    /// Finds the members of an inherited witness set in the member table
    /// (by name, whatever their generation: a witness is a place on the
    /// network); one that is not there, or whose slot changed, has not
    /// answered yet.
    pub(super) fn resolve_inherited(&mut self) {
        let table = &self.table;
        let w = &mut self.lease.witnesses;
        for (i, name) in &w.inherited {
            let id = table.find(name).map_or(WitnessId::Unknown, WitnessId::Slot);
            if let Some(x) = w.list.get_mut(*i)
                && x.id != id
            {
                x.id = id;
                x.acked = None;
                x.pinged = None;
            }
        }
    }

    /// Re-judges the lease at `now`: the reference set follows the view
    /// again once the lease is valid (rebuilt from it on the way back), and
    /// a change of validity is reported.
    pub(super) fn update_standing(&mut self, now: Instant) {
        if self.lease.strategy == LeaseStrategy::Off {
            return;
        }
        self.lease.clock = self.lease.clock.max(now);
        let longest_suspicion = suspicion_min(
            self.config.suspicion_mult,
            self.live(),
            self.config.probe_interval,
        )
        .saturating_mul(self.config.suspicion_max_mult);
        self.lease.linger = self.lease.settle.saturating_add(longest_suspicion);
        if self.lease.tracking {
            let table = &self.table;
            self.lease
                .settle_deaths(|slot| table.get(slot).map(|m| m.state));
        }
        self.refresh_witnesses();
        let mut standing = self.judge(now);
        if standing.is_valid() && !self.lease.reported {
            // Back after a lapse (or at start): the evidence must hold for
            // the takeover delay first.
            self.lease.returning_since.get_or_insert(now);
            standing = self.lease.hysteresis(standing, now);
        } else if !standing.is_valid() {
            self.lease.returning_since = None;
        }
        if standing.is_valid() && !self.lease.tracking {
            self.lease.thaw(self.table.states());
            self.lease.tracking = true;
            self.refresh_witnesses();
            standing = self.judge(now);
        }
        let valid = standing.is_valid();
        if !valid {
            self.lease.freeze();
        } else {
            self.lease.returning_since = None;
        }
        self.lease.tracking = valid;
        if valid != self.lease.reported {
            self.lease.reported = valid;
            if valid {
                info!(name = %self.local.name, ?standing, "lease valid");
            } else {
                self.lease.lapsed_at = Some(now);
                self.stats.standing_lost += 1;
                warn!(name = %self.local.name, ?standing, "lease lapsed: this node may not act as an owner");
            }
            self.emit(Event::StandingChanged(standing));
        }
    }

    /// Brings the witness set up to date with `R` (or, before the first
    /// valid lease, with the live view); frozen `R`, frozen set.
    pub(super) fn refresh_witnesses(&mut self) {
        if self.lease.strategy != LeaseStrategy::Witnesses {
            return;
        }
        let starting = self.lease.starting();
        if !self.lease.tracking && !starting {
            return;
        }
        let n = if starting {
            self.live().max(1)
        } else {
            self.lease.reference_size()
        };
        let size = witness_set_size(n);
        let w = &self.lease.witnesses;
        if !w.stale && w.list.len() == size {
            if w.entered.is_empty() {
                return;
            }
            if !starting {
                let entered = std::mem::take(&mut self.lease.witnesses.entered);
                for &slot in &entered {
                    if !self.lease.in_ref(slot) {
                        continue;
                    }
                    if let Some(m) = self.slot(slot) {
                        let rank = witness_rank(&m.name, m.generation);
                        self.lease.witnesses.merge(slot, rank);
                    }
                }
                self.lease.witnesses.entered = entered;
                self.lease.witnesses.entered.clear();
                if !self.lease.witnesses.stale {
                    return;
                }
            }
        }
        let local = (
            WitnessId::Local,
            witness_rank(&self.local.name, self.local.generation),
        );
        let lease = &self.lease;
        let remote = self.table.entries().filter_map(|(slot, m)| {
            let candidate = if starting {
                m.state.is_live()
            } else {
                lease.in_ref(slot)
            };
            candidate.then(|| (WitnessId::Slot(slot), witness_rank(&m.name, m.generation)))
        });
        let candidates: Vec<(WitnessId, u64)> = std::iter::once(local).chain(remote).collect();
        self.lease.witnesses.rebuild(candidates.into_iter(), size);
    }

    /// A ping to `slot`, sent at `sent_at`, was acknowledged from `from`:
    /// a witness's answer if it came from the witness itself (an answer
    /// forwarded by a relay proves the relay reaches it, not this node).
    pub(super) fn witness_acked(&mut self, slot: u32, from: SocketAddr, sent_at: Instant) {
        if self.lease.strategy == LeaseStrategy::Witnesses
            && self.slot(slot).is_some_and(|m| m.addr == from)
        {
            self.lease.witnesses.acked(slot, sent_at);
        }
    }

    /// Pings the witnesses whose last answer is getting old (strategy
    /// `Witnesses`), once per probe interval: each is due half a lease
    /// period after the send time of the ping it last answered, and again a
    /// probe interval after an unanswered witness ping; at most
    /// `⌈remote witnesses × probe interval / (lease_period / 2)⌉ + 1` per
    /// round, the longest unpinged first, so the pings spread evenly. Plain
    /// pings with their own sequence numbers (any member answers them),
    /// without piggybacked updates.
    pub(super) fn fire_witnesses(&mut self, now: Instant) {
        if self.lease.strategy != LeaseStrategy::Witnesses || now < self.next_witness_at {
            return;
        }
        self.next_witness_at = later(now, self.config.probe_interval);
        if self.local.state != MemberState::Alive {
            return;
        }
        let period = self.config.lease_period;
        let refresh = period / 2;
        // An unanswered witness ping is retried at the next round: with
        // `lease_period` a few probe intervals long, waiting longer would
        // let one lost datagram expire the witness's last answer.
        let retry = self.config.probe_interval;
        let remote = self
            .lease
            .witnesses
            .list
            .iter()
            .filter(|w| matches!(w.id, WitnessId::Slot(_)))
            .count();
        if remote == 0 {
            return;
        }
        let per_round = self.config.probe_interval.as_nanos() * remote as u128;
        let budget = per_round.div_ceil(refresh.as_nanos().max(1)) as usize + 1;
        for _ in 0..budget {
            let due = self
                .lease
                .witnesses
                .list
                .iter()
                .filter_map(|w| match w.id {
                    WitnessId::Slot(slot) => Some((slot, w)),
                    _ => None,
                })
                .filter(|(_, w)| {
                    w.acked.is_none_or(|a| now >= later(a, refresh))
                        && w.pinged.is_none_or(|p| now >= later(p, retry))
                })
                .min_by_key(|(_, w)| w.pinged)
                .map(|(slot, _)| slot);
            let Some(slot) = due else {
                break;
            };
            self.send_witness_ping(slot, now);
        }
    }

    pub(super) fn send_witness_ping(&mut self, slot: u32, now: Instant) {
        let seq = self.next_seq();
        self.lease.witnesses.ping_sent(seq, slot, now);
        let Some(m) = self.slot(slot) else {
            return;
        };
        let mut buf = self.new_packet();
        wire::encode(
            &ping_msg(&self.local, seq, &m.name, m.generation, false),
            &mut buf,
        );
        let addr = m.addr;
        self.stats.witness_pings += 1;
        // No piggybacked updates: the same few witnesses would use up each
        // update's retransmissions, and fewer members would hear it (the
        // witnesses' acks, to every member, carry updates instead).
        self.send(addr, false, buf);
    }

    /// The lease at `now`, caching the oldest member of the reference set.
    pub(super) fn judge(&mut self, now: Instant) -> Standing {
        let active = self.local.state == MemberState::Alive && !self.superseded;
        let holds = if self.lease.needs_oldest() {
            let oldest = match self.lease.oldest {
                Some(oldest) => oldest,
                None => {
                    let oldest = self.oldest_in_ref();
                    self.lease.oldest = Some(oldest);
                    oldest
                }
            };
            self.holds(oldest)
        } else {
            false
        };
        self.lease.evaluate(now, active, || holds)
    }

    /// The oldest member of the reference set by (generation, name), the
    /// placement order: `None` for this node. O(N).
    pub(super) fn oldest_in_ref(&self) -> Option<u32> {
        let mut best: (u64, &str, Option<u32>) = (self.local.generation, &self.local.name, None);
        for (slot, m) in self.table.entries() {
            if self.lease.in_ref(slot) && (m.generation, &*m.name) < (best.0, best.1) {
                best = (m.generation, &m.name, Some(slot));
            }
        }
        best.2
    }

    /// Whether this node holds `oldest` (itself, or a member held alive).
    pub(super) fn holds(&self, oldest: Option<u32>) -> bool {
        match oldest {
            None => true,
            Some(slot) => self
                .slot(slot)
                .is_some_and(|m| m.state == MemberState::Alive),
        }
    }
}
