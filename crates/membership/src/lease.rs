//! Lease evidence: may this node act as an owner at `now`?
//!
//! Membership tells the layers above who is in the cluster; a node that is
//! cut off (a partition) or was paused (SIGSTOP, a long GC) keeps believing
//! what it last heard while the others declare it dead and take its datums.
//! The lease is the node's own evidence that it is still part of the
//! cluster, made of two conditions (the strategy chooses which apply):
//!
//! 1. **Fresh contact**: `now < last_contact + lease_period`, where
//!    `last_contact` is the *send time* of the latest acknowledged ping of
//!    this node (its probes, direct or through relays, the pings it relays,
//!    last-chance and reconnect pings) or push-pull request. A send time is
//!    used, not the receive time of the answer, so a process that was
//!    paused wakes with a lapsed lease even if answers wait in its input.
//! 2. **Witness majority** (strategy `Witnesses`, the default): of a small
//!    witness set `W` drawn from the reference set `R` (below) by a rank
//!    every node computes alike from (name, generation), a strict majority
//!    acknowledged directly a ping this node sent within `lease_period`
//!    (this node counts for itself if it is a witness). The node pings its
//!    witnesses itself, so a node cut off from most of them loses its lease
//!    within `lease_period` of the cut whatever the cluster's size, and a
//!    split into two sides leaves the lease to the side holding most
//!    witnesses (`W` is odd-sized). `W` follows `R`: frozen while the lease
//!    is not valid, renewed when a witness leaves `R`.
//! 3. **Majority standing** (strategy `Majority`): of a reference set `R`
//!    (the live view while the lease was valid, frozen while it is not; kept
//!    with every strategy, `W` is drawn from it), the members this node holds
//!    alive, plus itself, are a strict majority; on an exact half, the side
//!    holding the oldest member of `R` by (generation, name) keeps it. A
//!    member declared dead stays in `R`, unreachable, for the takeover delay
//!    plus the longest suspicion of valid lease before it leaves: a
//!    minority learns one suspicion at a time which members it no longer
//!    reaches, and its first verdicts must not shrink `R` to its size.
//!
//! After a lapse (and at start) the evidence must hold for the takeover
//! delay before the lease is valid again (`Standing::Returning`): a node
//! that reaches one member again may not have suspected yet every member it
//! no longer reaches.
//!
//! A new generation started in the same process (a rebirth after a dead
//! verdict) inherits its predecessor's witness set ([`LeaseEvidence`]),
//! frozen until its own lease has been valid once: drawn from the live view
//! instead, inside a cut-off piece it would hold only that piece's members.
//!
//! The other nodes wait [`Config::takeover_delay`] after they started
//! suspecting a member (after their own dead verdict with `Majority`)
//! before taking its datums, by which time a member that could not answer
//! their probes has lost its lease.
//!
//! [`Config::takeover_delay`]: crate::Config::takeover_delay

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::MemberState;

mod witnesses;

use witnesses::MAX_ENTERED;
pub(crate) use witnesses::{Witness, WitnessId, Witnesses, witness_set_size};

/// Push-pull requests remembered (to time their replies), at most.
const MAX_PULLS: usize = 16;

/// How a node decides whether it may act as an owner ([`Config::lease`]).
///
/// [`Config::lease`]: crate::Config::lease
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeaseStrategy {
    /// Fresh contact, and acknowledgements from a strict majority of the
    /// witness set: a few members (`2⌈log₂ N⌉ + 1`, all of them up to 5)
    /// drawn from the reference set by a hash every node computes alike,
    /// and pinged directly. A node cut off from most witnesses loses its
    /// lease within `lease_period` whatever the cluster's size, and an even
    /// split keeps the side with most witnesses. The default.
    #[default]
    Witnesses,
    /// Fresh contact, and a strict majority of the reference set held alive
    /// (an exact half keeps it if it holds the oldest member). Decided from
    /// the local view, so from about 500 nodes a near-even split leaves
    /// minority nodes their lease past the majority's takeover (their
    /// suspicions of the other side arrive one gossip message at a time):
    /// use `Witnesses` there.
    Majority,
    /// Fresh contact, and at least this many members (this node included)
    /// held alive, whatever the cluster's size.
    StaticQuorum(usize),
    /// Fresh contact only: a minority that can still reach itself keeps its
    /// lease. Safe against pauses and isolated nodes, not against
    /// partitions.
    ContactOnly,
    /// Always valid: the behaviour before leases. **Unsafe under
    /// partitions and pauses**: two nodes may own one datum until the cut-off
    /// one learns it was declared dead. [`Config::takeover_delay`] is zero.
    ///
    /// [`Config::takeover_delay`]: crate::Config::takeover_delay
    Off,
}

/// Whether this node may act as an owner, from
/// [`Membership::standing`](crate::Membership::standing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// It may, until `until` unless fresh evidence extends it (`None`: no
    /// expiry, strategy `Off`). A majority lost before then ends it too.
    Valid {
        /// When the lease lapses without a new acknowledged ping.
        until: Option<Instant>,
    },
    /// No ping or push-pull request sent in the last `lease_period` was
    /// answered: this node is cut off, or was paused.
    NoContact {
        /// Send time of the latest answered one (`None`: never).
        last_contact: Option<Instant>,
    },
    /// Too few members of the reference set are held alive (`Majority`,
    /// `StaticQuorum`), or too few witnesses answered (`Witnesses`).
    NoMajority {
        /// Members held alive, this node included (of the reference set with
        /// `Majority`, of the view with `StaticQuorum`); with `Witnesses`,
        /// the witnesses that acknowledged a ping sent within
        /// `lease_period`, this node included if it is one.
        reachable: usize,
        /// The size of the reference set (strategy `Majority`: more than
        /// half is needed), the quorum (`StaticQuorum`), or the size of the
        /// witness set (`Witnesses`: more than half is needed).
        reference: usize,
    },
    /// The evidence holds again after a lapse, but must hold for the
    /// takeover delay before the lease is valid again (the reference set's
    /// reachability may be stale right after a lapse: a cut-off node that
    /// reaches one member again has not yet suspected every member it no
    /// longer reaches).
    Returning {
        /// When it becomes valid if the evidence keeps holding.
        valid_at: Instant,
    },
    /// This node left the cluster or lost its name to another process.
    Inactive,
}

impl Standing {
    /// Whether the node may act as an owner.
    pub fn is_valid(&self) -> bool {
        matches!(self, Standing::Valid { .. })
    }
}

/// The lease state of one node. The reference set is a bitset over member
/// slots; counts are kept up to date by [`Lease::member_changed`], so
/// evaluating the lease is O(1) (plus an O(N) scan, cached, on an exact
/// half).
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) strategy: LeaseStrategy,
    period: Duration,
    last_contact: Option<Instant>,
    /// Whether `R` follows the view (the lease was valid at the last
    /// evaluation) or is frozen.
    pub(crate) tracking: bool,
    /// The validity last reported with `StandingChanged`.
    pub(crate) reported: bool,
    /// When the last lapse of a lease reported valid was noticed (at or
    /// after the instant it lapsed): the lease was valid up to about then.
    /// `None` while it never was valid. Bounds which of this node's verdicts
    /// can have been acted on (see `Membership::acted_on`).
    pub(crate) lapsed_at: Option<Instant>,
    in_ref: Vec<u64>,
    /// Remote members in `R`.
    ref_remote: usize,
    /// Remote members in `R` held alive (not suspect, dead or left).
    ref_alive: usize,
    /// Remote members held alive, in `R` or not (`StaticQuorum`).
    view_alive: usize,
    /// Members of a frozen `R` that were reaped since: never reachable.
    ref_ghosts: usize,
    /// The oldest member of `R` (`None` inside: this node), while `R` is
    /// unchanged.
    pub(crate) oldest: Option<Option<u32>>,
    /// Push-pull requests in flight: (to, send time).
    pulls: VecDeque<(SocketAddr, Instant)>,
    /// Members of `R` declared dead while the lease was valid: they leave
    /// `R` once the lease stayed valid for `settle` after it (until then
    /// they count as unreachable). Cleared when the lease lapses.
    leaving: VecDeque<(Instant, u32)>,
    /// How long the evidence must hold again after a lapse (the takeover
    /// delay).
    pub(crate) settle: Duration,
    /// How long a member declared dead stays in `R` (as unreachable) while
    /// the lease stays valid: the takeover delay plus the longest
    /// suspicion, set by the membership as the view's size changes. A
    /// minority learns of the members it can no longer reach one suspicion
    /// at a time; the early verdicts must not leave `R` before it learned
    /// of the rest.
    pub(crate) linger: Duration,
    /// Since when the evidence holds again after a lapse.
    pub(crate) returning_since: Option<Instant>,
    /// The time of the input being handled.
    pub(crate) clock: Instant,
    /// The witness set (strategy `Witnesses`).
    pub(crate) witnesses: Witnesses,
}

impl Lease {
    pub(crate) fn new(
        strategy: LeaseStrategy,
        period: Duration,
        settle: Duration,
        now: Instant,
    ) -> Self {
        let off = strategy == LeaseStrategy::Off;
        Lease {
            strategy,
            period,
            last_contact: None,
            tracking: off,
            reported: off,
            lapsed_at: None,
            in_ref: Vec::new(),
            ref_remote: 0,
            ref_alive: 0,
            ref_ghosts: 0,
            view_alive: 0,
            oldest: None,
            pulls: VecDeque::new(),
            leaving: VecDeque::new(),
            settle,
            linger: settle,
            returning_since: None,
            clock: now,
            witnesses: Witnesses::default(),
        }
    }

    /// A ping or push-pull request sent at `sent_at` was answered.
    pub(crate) fn contact(&mut self, sent_at: Instant) {
        self.last_contact = self.last_contact.max(Some(sent_at));
    }

    /// A push-pull request went to `to` at `now`; its reply is contact.
    pub(crate) fn pull_sent(&mut self, to: SocketAddr, now: Instant) {
        if self.pulls.len() >= MAX_PULLS {
            self.pulls.pop_front();
        }
        self.pulls.push_back((to, now));
    }

    /// A push-pull reply came from `from`: contact, from its request's send
    /// time (the oldest request to that address still in flight).
    pub(crate) fn pull_answered(&mut self, from: SocketAddr) {
        if let Some(pos) = self.pulls.iter().position(|(to, _)| *to == from)
            && let Some((_, sent_at)) = self.pulls.remove(pos)
        {
            self.contact(sent_at);
        }
    }

    pub(crate) fn in_ref(&self, slot: u32) -> bool {
        let (word, bit) = (slot as usize / 64, slot % 64);
        self.in_ref.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    fn set_in_ref(&mut self, slot: u32, on: bool) {
        let (word, bit) = (slot as usize / 64, slot % 64);
        if self.in_ref.len() <= word {
            if !on {
                return;
            }
            self.in_ref.resize(word + 1, 0);
        }
        if let Some(w) = self.in_ref.get_mut(word) {
            if on {
                *w |= 1 << bit;
            } else {
                *w &= !(1 << bit);
            }
        }
    }

    /// The member in `slot` went from `was` to `now` (`None`: no member in
    /// the slot). While the lease is valid `R` follows the live view; while
    /// it lapsed `R` keeps its members (only their reachability changes),
    /// and a member reaped meanwhile stays in it as unreachable.
    pub(crate) fn member_changed(
        &mut self,
        slot: u32,
        was: Option<MemberState>,
        now: Option<MemberState>,
    ) {
        if was == Some(MemberState::Alive) {
            self.view_alive = self.view_alive.saturating_sub(1);
        }
        if now == Some(MemberState::Alive) {
            self.view_alive += 1;
        }
        let was_in = self.in_ref(slot);
        if self.starting()
            && was.is_some_and(MemberState::is_live) != now.is_some_and(MemberState::is_live)
        {
            // Before the first valid lease the witnesses follow the view.
            self.witnesses.stale = true;
        }
        let now_in = if self.tracking {
            // A member declared dead stays in `R` (unreachable) until the
            // lease has stayed valid for `settle` after the verdict: a
            // minority whose suspicions lag must not shrink `R` to its own
            // size with early verdicts. A member that left is gone at once.
            let dying = was_in && now == Some(MemberState::Dead);
            if dying {
                let due = self.clock.checked_add(self.linger).unwrap_or(self.clock);
                self.leaving.push_back((due, slot));
            }
            dying || now.is_some_and(MemberState::is_live)
        } else {
            was_in && now.is_some()
        };
        if !self.tracking && was_in && now.is_none() {
            self.ref_ghosts += 1;
        }
        if was_in {
            self.ref_remote = self.ref_remote.saturating_sub(1);
            if was == Some(MemberState::Alive) {
                self.ref_alive = self.ref_alive.saturating_sub(1);
            }
        }
        if now_in {
            self.ref_remote += 1;
            if now == Some(MemberState::Alive) {
                self.ref_alive += 1;
            }
        }
        if was_in != now_in {
            self.set_in_ref(slot, now_in);
            self.oldest = None;
            self.witness_moved(slot, now_in);
        }
    }

    /// Members of `R`, this node and reaped ones included.
    pub(crate) fn reference_size(&self) -> usize {
        self.ref_remote + self.ref_ghosts + 1
    }

    /// Before the first valid lease: `R` is empty and frozen (the witness
    /// set follows the live view meanwhile, unless it was inherited).
    pub(crate) fn starting(&self) -> bool {
        !self.tracking && self.ref_remote == 0 && self.ref_ghosts == 0 && !self.inherited()
    }

    /// Whether the witness set is a predecessor's, frozen until this
    /// node's lease has been valid once.
    pub(crate) fn inherited(&self) -> bool {
        !self.witnesses.inherited.is_empty()
    }

    /// The member in `slot` entered or left `R`: the witness set follows
    /// while the lease is valid; frozen, a witness that left (was reaped)
    /// stays in it, gone.
    fn witness_moved(&mut self, slot: u32, entered: bool) {
        if self.strategy != LeaseStrategy::Witnesses {
            return;
        }
        let w = &mut self.witnesses;
        if !self.tracking {
            if !entered
                && let Some(i) = w.list.iter().position(|x| x.id == WitnessId::Slot(slot))
                && let Some(x) = w.list.get_mut(i)
            {
                x.id = WitnessId::Gone;
                x.acked = None;
            }
        } else if entered {
            if w.entered.len() >= MAX_ENTERED {
                w.stale = true;
            } else {
                w.entered.push(slot);
            }
        } else if w.contains(slot) {
            w.stale = true;
        }
    }

    /// A new process (generation) took the member's slot. While the lease
    /// is valid the old one leaves `R` and the new one enters; while it
    /// lapsed the old one stays in `R`, unreachable.
    pub(crate) fn member_replaced(
        &mut self,
        slot: u32,
        was: Option<MemberState>,
        now: Option<MemberState>,
    ) {
        if self.tracking {
            self.member_changed(slot, was, now);
            if self.in_ref(slot) {
                self.oldest = None;
                // Its witness rank changed with its generation.
                self.witnesses.stale = true;
            }
        } else {
            self.member_changed(slot, was, Some(MemberState::Dead));
        }
    }

    /// Members declared dead at least `settle` ago leave `R` if they are
    /// still dead (`state_of` the slot now); call while the lease is valid.
    pub(crate) fn settle_deaths(&mut self, state_of: impl Fn(u32) -> Option<MemberState>) {
        while let Some(&(due, slot)) = self.leaving.front() {
            if due > self.clock {
                break;
            }
            self.leaving.pop_front();
            if self.in_ref(slot) && state_of(slot) == Some(MemberState::Dead) {
                self.set_in_ref(slot, false);
                self.ref_remote = self.ref_remote.saturating_sub(1);
                self.oldest = None;
                self.witness_moved(slot, false);
            }
        }
    }

    /// The lease lapsed: `R` freezes, dead members stay in it.
    pub(crate) fn freeze(&mut self) {
        self.leaving.clear();
    }

    /// The lease became valid again: `R` follows the view from now on.
    /// Live members not in it enter; members of it that died meanwhile
    /// leave after `settle` more of valid lease (as if they had died now),
    /// those that left or were reaped leave at once.
    pub(crate) fn thaw(&mut self, members: impl Iterator<Item = (u32, Option<MemberState>)>) {
        self.ref_ghosts = 0;
        self.oldest = None;
        self.leaving.clear();
        self.witnesses.stale = true;
        self.witnesses.inherited.clear();
        let due = self.clock.checked_add(self.linger).unwrap_or(self.clock);
        for (slot, state) in members {
            let was_in = self.in_ref(slot);
            match state {
                Some(state) if state.is_live() && !was_in => {
                    self.set_in_ref(slot, true);
                    self.ref_remote += 1;
                    if state == MemberState::Alive {
                        self.ref_alive += 1;
                    }
                }
                Some(state) if state.is_live() => {}
                Some(MemberState::Dead) if was_in => self.leaving.push_back((due, slot)),
                _ if was_in => {
                    self.set_in_ref(slot, false);
                    self.ref_remote = self.ref_remote.saturating_sub(1);
                }
                _ => {}
            }
        }
    }

    /// When a lease reported valid lapses for want of contact (for
    /// `poll_timeout`).
    pub(crate) fn expiry(&self) -> Option<Instant> {
        if self.strategy == LeaseStrategy::Off {
            return None;
        }
        if self.reported && self.alone() {
            return None;
        }
        if !self.reported {
            return self.returning_since?.checked_add(self.settle);
        }
        let contact = self.last_contact?.checked_add(self.period);
        if self.strategy == LeaseStrategy::Witnesses {
            let (_, _, witnessed) = self.witnesses.count(self.clock, self.period);
            return match (contact, witnessed) {
                (Some(c), Some(w)) => Some(c.min(w)),
                (c, _) => c,
            };
        }
        contact
    }

    /// A cluster of one: no live peer in sight and none in the reference
    /// set (it never had one, or every peer left or was failed over while
    /// its lease was valid) nor in an inherited witness set: nobody to
    /// answer its probes, and nobody to compete with, so it needs no
    /// contact.
    fn alone(&self) -> bool {
        if self.inherited() {
            return false;
        }
        let alone_may_own = match self.strategy {
            LeaseStrategy::StaticQuorum(quorum) => quorum <= 1,
            _ => true,
        };
        self.ref_remote == 0 && self.ref_ghosts == 0 && self.view_alive == 0 && alone_may_own
    }

    /// A lease that is not reported valid, whose evidence (`base`) holds at
    /// `now`: `Returning` until it held for `settle`, then `base`.
    pub(crate) fn hysteresis(&self, base: Standing, now: Instant) -> Standing {
        if !base.is_valid() || self.reported || self.strategy == LeaseStrategy::Off {
            return base;
        }
        let since = self.returning_since.unwrap_or(now);
        let valid_at = since.checked_add(self.settle).unwrap_or(since);
        if now >= valid_at {
            base
        } else {
            Standing::Returning { valid_at }
        }
    }

    /// Whether the `Majority` strategy stands on an exact half, where the
    /// oldest member of `R` decides.
    pub(crate) fn needs_oldest(&self) -> bool {
        self.strategy == LeaseStrategy::Majority
            && self.ref_ghosts == 0
            && 2 * (self.ref_alive + 1) == self.ref_remote + 1
    }

    /// The next instant the contact condition lapses, while it holds.
    pub(crate) fn contact_until(&self, now: Instant) -> Option<Instant> {
        let until = self.last_contact?.checked_add(self.period)?;
        (now < until).then_some(until)
    }

    /// The lease at `now`. `active`: this node is a live member (not left,
    /// not superseded). `holds_oldest` is asked only on an exact half.
    pub(crate) fn evaluate(
        &self,
        now: Instant,
        active: bool,
        holds_oldest: impl FnOnce() -> bool,
    ) -> Standing {
        if !active {
            return Standing::Inactive;
        }
        if self.strategy == LeaseStrategy::Off {
            return Standing::Valid { until: None };
        }
        if self.alone() {
            return Standing::Valid { until: None };
        }
        let Some(until) = self.contact_until(now) else {
            return Standing::NoContact {
                last_contact: self.last_contact,
            };
        };
        let valid = Standing::Valid { until: Some(until) };
        let reachable = self.ref_alive + 1;
        match self.strategy {
            LeaseStrategy::Off | LeaseStrategy::ContactOnly => valid,
            LeaseStrategy::StaticQuorum(quorum) => {
                // A fixed quorum of the members held alive, whatever the
                // view's size (no reference set).
                let reachable = self.view_alive + 1;
                if reachable >= quorum {
                    valid
                } else {
                    Standing::NoMajority {
                        reachable,
                        reference: quorum,
                    }
                }
            }
            LeaseStrategy::Witnesses => {
                let (reachable, reference, until_witnessed) =
                    self.witnesses.count(now, self.period);
                if 2 * reachable > reference {
                    Standing::Valid {
                        until: Some(until_witnessed.map_or(until, |w| w.min(until))),
                    }
                } else {
                    Standing::NoMajority {
                        reachable,
                        reference,
                    }
                }
            }
            LeaseStrategy::Majority => {
                let reference = self.ref_remote + self.ref_ghosts + 1;
                // A reaped member of a frozen set may have been the oldest:
                // an exact half then keeps nothing.
                let tie_won = 2 * reachable == reference && self.ref_ghosts == 0 && holds_oldest();
                if 2 * reachable > reference || tie_won {
                    valid
                } else {
                    Standing::NoMajority {
                        reachable,
                        reference,
                    }
                }
            }
        }
    }
}

/// A node's witness set, by name, for the next generation of the same
/// process ([`Membership::lease_evidence`], then
/// [`Membership::inherit_lease`]).
///
/// A process declared dead comes back as a new generation whose lease was
/// never valid; drawing its witness set from the members it sees alive, as
/// a new process does, would let it hold a lease inside a cut-off piece
/// (where it sees only that piece). With its predecessor's set, frozen
/// until its own lease has been valid once, it needs the same majority the
/// predecessor needed, its predecessor not counting (that generation is
/// dead; the others may have replaced it as a witness).
///
/// [`Membership::lease_evidence`]: crate::Membership::lease_evidence
/// [`Membership::inherit_lease`]: crate::Membership::inherit_lease
#[derive(Debug, Clone, Default)]
pub struct LeaseEvidence {
    /// The name of the node it was taken from.
    pub(crate) name: Option<Arc<str>>,
    /// The witness set, lowest rank first: (name, rank); `None` for a
    /// witness that never answers again.
    pub(crate) witnesses: Vec<(Option<Arc<str>>, u64)>,
}

impl LeaseEvidence {
    /// The size of the witness set it carries (0: none, the strategy is
    /// not `Witnesses`).
    pub fn len(&self) -> usize {
        self.witnesses.len()
    }

    /// Whether it carries no witness set.
    pub fn is_empty(&self) -> bool {
        self.witnesses.is_empty()
    }
}
