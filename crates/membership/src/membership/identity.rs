//! Who may say what: each update vetted by the name the transport
//! authenticated for its sender before it is applied. First-hand claims
//! (a new member, generation or address; a leave) count only from the
//! member itself, and are otherwise checked with it; a third party's
//! incarnations must stay within reach of a refutation.

use super::*;

impl<R: Rng> Membership<R> {
    /// Whether an `Alive` may be applied, given who sent it. The member
    /// itself (`sender` is its name) may announce anything about itself. A
    /// third party may relay what does not change the member's identity:
    /// the same generation and address, at an incarnation at most
    /// `MAX_INCARNATION_STEP` above the known one (a refutation or an
    /// update; one the member did not make it answers by refuting); but a
    /// refutation of a member held suspect or down relayed by a sender that
    /// is no member is checked, as below, instead of applied. A new
    /// member, generation or address from a third party is not applied but
    /// checked: the member is asked at the claimed address for its own
    /// `Alive`, which then counts first-hand.
    pub(super) fn vet_alive(
        &mut self,
        sender: Option<&str>,
        info: &AliveInfo<'_>,
        now: Instant,
    ) -> bool {
        let name = info.name.as_str();
        if sender == Some(name) {
            return true;
        }
        if name == &*self.local.name {
            if info.generation < self.local.generation {
                return true; // an older process of ours: re-announced
            }
            if info.generation == self.local.generation && info.addr == self.local.addr {
                return self.incarnation_ok(info.incarnation, self.local.incarnation);
            }
            // Another process under our name: only its own word counts (a
            // restart of this node on another address). Ask it; if the
            // address is ours, nobody else can be there.
            self.stats.forged_claims += 1;
            debug!(?sender, generation = info.generation, addr = %info.addr, "refused another identity of this node from a third party");
            if info.addr != self.local.addr {
                self.check_claim(name, info.addr, now);
            }
            return false;
        }
        let Some(record) = self.table.by_name(name) else {
            if self.room_for_member() {
                self.check_claim(name, info.addr, now);
            }
            return false;
        };
        let (generation, addr, incarnation, state) = (
            record.generation,
            record.addr,
            record.incarnation,
            record.state,
        );
        if info.generation < generation {
            return true; // stale: ignored by the precedence rules
        }
        if info.generation > generation || info.addr != addr {
            self.check_claim(name, info.addr, now);
            return false;
        }
        if !self.incarnation_ok(info.incarnation, incarnation) {
            return false;
        }
        if state != MemberState::Alive
            && info.incarnation > incarnation
            && sender.is_none_or(|s| self.table.find(s).is_none())
        {
            // A refutation of a member held suspect or down, relayed by a
            // process that is no member (it may be keeping a stopped node
            // alive): the member is asked, and only its own answer counts.
            debug!(
                ?sender,
                member = name,
                "checking a refutation relayed by a non-member"
            );
            self.check_claim(name, addr, now);
            return false;
        }
        true
    }

    /// Whether a suspicion or death verdict may be applied, given who sent
    /// it. Anyone may accuse a member at an incarnation it can refute (at
    /// most `MAX_INCARNATION_STEP` above the known one). A leave counts only
    /// from the member itself; relayed, the member is asked (a member that
    /// left answers with its leave) and the relay's word counts as a
    /// suspicion by the relay (the member refutes it if it did not leave;
    /// if it left and stopped, the relays confirm one another and it is
    /// declared dead after the minimal suspicion timeout). An acted-on
    /// notice counts only from its author.
    pub(super) fn vet_accusation(
        &mut self,
        sender: Option<&str>,
        acc: &Accusation<'_>,
        mode: Mode,
        now: Instant,
    ) -> bool {
        let left = acc.from == acc.name;
        if acc.name == &*self.local.name {
            if acc.incarnation == wire::ACTED_ON {
                if sender == Some(acc.from) && !left {
                    return true;
                }
                self.stats.forged_claims += 1;
                debug!(
                    ?sender,
                    accuser = acc.from,
                    "refused an acted-on notice not sent by its author"
                );
                return false;
            }
            return self.incarnation_ok(acc.incarnation, self.local.incarnation);
        }
        if acc.incarnation == wire::ACTED_ON {
            self.stats.incarnations_refused += 1;
            return false;
        }
        let Some(record) = self.table.by_name(acc.name) else {
            return true; // ignored by the precedence rules
        };
        let (addr, incarnation, state) = (record.addr, record.incarnation, record.state);
        if left && sender != Some(acc.name) {
            if state.is_live()
                && acc.generation == record.generation
                && self.incarnation_ok(acc.incarnation, incarnation)
            {
                self.check_claim(acc.name, addr, now);
                if let Some(relay) = sender {
                    let suspicion = Accusation {
                        from: relay,
                        ..*acc
                    };
                    self.apply_suspect(&suspicion, mode, now);
                }
            }
            return false;
        }
        self.incarnation_ok(acc.incarnation, incarnation)
    }

    /// Whether a third party's incarnation is within reach of the known one;
    /// counts a refusal.
    pub(super) fn incarnation_ok(&mut self, claimed: u64, known: u64) -> bool {
        if claimed > known.saturating_add(MAX_INCARNATION_STEP) {
            self.stats.incarnations_refused += 1;
            debug!(claimed, known, "refused an incarnation out of reach");
            return false;
        }
        true
    }

    /// Asks `name` at `addr` for its own `Alive` (the answer counts
    /// first-hand), once per name and address while a check is in flight.
    pub(super) fn check_claim(&mut self, name: &str, addr: SocketAddr, now: Instant) {
        if addr == self.local.addr || self.local.state != MemberState::Alive {
            return;
        }
        while self.claim_checks.front().is_some_and(|c| c.2 <= now) {
            self.claim_checks.pop_front();
        }
        let key = self.hasher.hash_str(name);
        if self.claim_checks.iter().any(|c| c.0 == key && c.1 == addr) {
            return;
        }
        if self.claim_checks.len() >= MAX_CLAIM_CHECKS {
            self.stats.claim_checks_dropped += 1;
            return;
        }
        // Long enough for a round trip, short enough that a lost answer is
        // asked again at the next gossip of the claim.
        let expiry = later(now, self.config.probe_interval.saturating_mul(5));
        self.claim_checks.push_back((key, addr, expiry));
        self.stats.claims_checked += 1;
        let mut buf = self.new_packet();
        wire::encode(&Message::AliveRequest, &mut buf);
        self.finish_unreliable(addr, buf);
    }
}
