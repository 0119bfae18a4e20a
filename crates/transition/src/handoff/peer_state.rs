//! What this node knows of each peer, behind one type: [`Peers`].
//!
//! Every fact about one peer but its announcement (kept apart, see the
//! last section) is a field of its [`PeerState`]: whether it is
//! a live member (and since when), whether it is gone (and since when),
//! failed, empty-handed, what done marker it owes or gave for the view in
//! force, which done marker this node last answered it with, whether this
//! node handed it notices at its install in force. The handoff reads and
//! changes them only through the methods of [`Peers`], which keep the
//! derived counts and the index of missing done markers in step with the
//! states, and drop a peer's entry once nothing is known of it.
//!
//! # Invariants (checked by [`Peers::check`] in the unit tests)
//!
//! - `missing` is exactly the set of peers whose `done` is
//!   [`Done::Missing`] (kept as an index: [`Peers::missing`] is read for
//!   every wait settled, and must not walk every peer).
//! - `counts` is the number of peers that are gone, that have an answered
//!   marker, that have a pending done marker.
//! - A gone peer is not a live member and owes no done marker (`done` is
//!   [`Done::NotAsked`]): [`Peers::mark_gone`] clears both,
//!   [`Peers::set_members`] and [`Peers::reset_done`] are given only nodes
//!   that are not gone, and a gone peer's batches never count as done.
//! - A live member has `member_since`. `member_since` is cleared when the
//!   node stops being a member by [`Peers::set_members`], not when it goes
//!   (see "Bounds"): it is read only for a peer that owes a
//!   done marker, which a gone peer never does, and it is overwritten when
//!   the node becomes a member again.
//! - No entry of `by_node` is blank (every field at its default).
//!
//! # Bounds, and what happens when full
//!
//! At most [`MAX_PEERS`] (65,536) peers each are gone, have an
//! announcement, have an answered done marker, have a pending done marker:
//!
//! - Gone: when full, the oldest departure of a node no view here names is
//!   forgotten to make room (none: the table grows past the cap by the
//!   nodes the views name). Departures are forgotten anyway `16 × timeout`
//!   after they were learnt once no view here names them
//!   ([`Peers::prune`]).
//! - Announcements are never forgotten (a notice sent before its sender
//!   moved on and left stays spent); when full, a peer not heard of yet is
//!   not recorded: it is treated as one that announced nothing.
//! - Answered markers: when full, a marker to a new peer is sent but not
//!   recorded (it may be answered again).
//! - Pending done markers: when full, a new one is not recorded (the peer
//!   is not taken for empty-handed when its view is installed).
//!
//! The other facts are held for live members, nodes of the views here, and
//! nodes that went: a failed or empty-handed mark, and when a departed
//! member became one, are forgotten with the departure once no view names
//! the node ([`Peers::prune`]), so every entry is bounded by the live
//! members, the nodes of the views and the departures remembered. (A node
//! whose departure was forgotten and that a later view named again would,
//! if it owed a done marker and stayed silent, hold waits up instead of
//! being passed over as a silent member; membership never names a
//! departed identity again.)
//!
//! # Why announcements are apart
//!
//! The announcements are kept in their own hash map, not in [`PeerState`]:
//! the done markers for the view in force are sent to the peers that
//! announced it in that map's iteration order
//! (`Handoff::maybe_send_done`), which fixes the order of the transmits and
//! so every simulator trace. A `BTreeMap` (node order) would send the same
//! markers in another order. The map only grows (announcements are never
//! forgotten), and every announcement heard is written to it, news or not:
//! `HashMap::insert` makes room for one more entry before it looks the key
//! up, so writing back a known peer can grow the table, and the order
//! depends on those writes too.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use shoal_placement::{NodeId, ViewId};

use crate::datum::DetState;

/// At most this many peers each are gone, have an announcement, have an
/// answered done marker, or have a pending done marker (see the module
/// doc for what happens when full).
pub(super) const MAX_PEERS: usize = 65_536;

/// Where a peer stands with its done marker for this node's install of the
/// view in force.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub(super) enum Done {
    /// None is expected: not a target at the install (or gone since).
    #[default]
    NotAsked,
    /// Expected and not received (or it moved on since it said done).
    Missing,
    /// Said done with this install, at its own install count.
    Said(u64),
}

/// A peer's latest announcement: it is at instance `epoch` of `view`, first
/// heard `since`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) struct Announced {
    pub(super) epoch: u64,
    pub(super) view: ViewId,
    /// When this (epoch, view) was first heard of (a new install of the
    /// peer's): a wait ends at its deadline only once every live holder
    /// announced the view in force at least `timeout` ago
    /// (`Handoff::holder_may_act`).
    pub(super) since: Instant,
}

/// What this node knows of one peer, besides its announcement.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
struct PeerState {
    /// A live member other than this node, ready or not
    /// (`Handoff::set_peers`): it must say done before a wait ends without
    /// a notice.
    member: bool,
    /// When it last became a live member: a member in no view here that
    /// never sent this node a batch is waited for at most
    /// `Handoff::silent_peer_grace` from then.
    member_since: Option<Instant>,
    /// Declared failed or left, with when this node learnt it: no done
    /// marker is expected from it.
    gone: Option<Instant>,
    /// Declared failed while a member of the view in force (or superseded
    /// by a newer generation): its datums may fail over.
    failed: bool,
    /// Said done under a view without itself, at this install count of its,
    /// and no later install of its was heard of and no view installed here
    /// since names it: it holds nothing (`Handoff::note_last_word`).
    empty_handed: Option<u64>,
    /// Its latest word is a done marker for a view this node has not had in
    /// force (yet), with that word's epoch: decided when that view is
    /// installed here.
    pending_done: Option<(u64, ViewId)>,
    /// This node handed it notices at its install in force: a new
    /// announcement of the view in force from it is answered at once.
    notified: bool,
    /// (this node's install count, the peer's epoch) of the last done
    /// marker sent to it.
    answered: Option<(u64, u64)>,
    /// Its done marker for this node's install of the view in force.
    done: Done,
}

impl PeerState {
    fn is_blank(&self) -> bool {
        *self == PeerState::default()
    }
}

/// How many peers carry each bounded fact.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
struct Counts {
    gone: usize,
    answered: usize,
    pending: usize,
}

impl Counts {
    /// Accounts for `node` changing from `before` to `after`, keeping
    /// `missing` in step.
    fn account(
        &mut self,
        missing: &mut BTreeSet<NodeId>,
        node: &NodeId,
        before: &PeerState,
        after: &PeerState,
    ) {
        let step = |c: &mut usize, b: bool, a: bool| match (b, a) {
            (false, true) => *c += 1,
            (true, false) => *c -= 1,
            _ => {}
        };
        step(&mut self.gone, before.gone.is_some(), after.gone.is_some());
        step(
            &mut self.answered,
            before.answered.is_some(),
            after.answered.is_some(),
        );
        step(
            &mut self.pending,
            before.pending_done.is_some(),
            after.pending_done.is_some(),
        );
        match (before.done == Done::Missing, after.done == Done::Missing) {
            (false, true) => {
                missing.insert(node.clone());
            }
            (true, false) => {
                missing.remove(node);
            }
            _ => {}
        }
    }
}

/// What this node knows of every peer (see the module doc).
#[derive(Default)]
pub(super) struct Peers {
    by_node: BTreeMap<NodeId, PeerState>,
    /// Apart from `by_node` for its iteration order (see the module doc).
    /// Never shrinks; at most [`MAX_PEERS`] entries.
    announced: HashMap<NodeId, Announced, DetState>,
    /// The peers whose `done` is [`Done::Missing`].
    missing: BTreeSet<NodeId>,
    counts: Counts,
}

impl Peers {
    // ----- one peer --------------------------------------------------------

    fn get(&self, node: &NodeId) -> PeerState {
        self.by_node.get(node).copied().unwrap_or_default()
    }

    /// Writes `node`'s state back, keeping the counts and `missing` in step
    /// and dropping a blank entry.
    fn put(&mut self, node: &NodeId, p: PeerState) {
        let before = self.get(node);
        if before == p {
            return;
        }
        self.counts.account(&mut self.missing, node, &before, &p);
        if p.is_blank() {
            self.by_node.remove(node);
        } else if let Some(slot) = self.by_node.get_mut(node) {
            *slot = p;
        } else {
            self.by_node.insert(node.clone(), p);
        }
    }

    fn update<R>(&mut self, node: &NodeId, f: impl FnOnce(&mut PeerState) -> R) -> R {
        let mut p = self.get(node);
        let r = f(&mut p);
        self.put(node, p);
        r
    }

    /// Applies `f` to every peer, keeping the counts and `missing` in step
    /// and dropping the entries left blank.
    fn each(&mut self, mut f: impl FnMut(&NodeId, &mut PeerState)) {
        let Peers {
            by_node,
            missing,
            counts,
            ..
        } = self;
        by_node.retain(|n, p| {
            let before = *p;
            f(n, p);
            counts.account(missing, n, &before, p);
            !p.is_blank()
        });
    }

    // ----- membership ------------------------------------------------------

    /// Whether `node` is a live member.
    pub(super) fn is_member(&self, node: &NodeId) -> bool {
        self.by_node.get(node).is_some_and(|p| p.member)
    }

    /// The live members, in node order.
    pub(super) fn members(&self) -> impl Iterator<Item = &NodeId> + '_ {
        self.by_node
            .iter()
            .filter(|(_, p)| p.member)
            .map(|(n, _)| n)
    }

    /// When `node` last became a live member, if it did (see the module
    /// doc: kept after it goes).
    pub(super) fn member_since(&self, node: &NodeId) -> Option<Instant> {
        self.by_node.get(node).and_then(|p| p.member_since)
    }

    /// Makes `members` (none of them gone) the live members as of `now`.
    /// `None` if they are the members already; else the nodes added and
    /// removed, each in node order.
    pub(super) fn set_members(
        &mut self,
        members: &BTreeSet<NodeId>,
        now: Instant,
    ) -> Option<(Vec<NodeId>, Vec<NodeId>)> {
        if self.members().eq(members.iter()) {
            return None;
        }
        let added: Vec<NodeId> = members
            .iter()
            .filter(|n| !self.is_member(n))
            .cloned()
            .collect();
        let removed: Vec<NodeId> = self
            .members()
            .filter(|n| !members.contains(*n))
            .cloned()
            .collect();
        for n in &removed {
            self.update(n, |p| {
                p.member = false;
                p.member_since = None;
            });
        }
        for n in &added {
            debug_assert!(!self.is_gone(n), "a gone node made a member");
            self.update(n, |p| {
                p.member = true;
                p.member_since = Some(now);
            });
        }
        Some((added, removed))
    }

    // ----- departures ------------------------------------------------------

    /// Whether any departure is remembered (a cheap test before a walk).
    pub(super) fn any_gone(&self) -> bool {
        self.counts.gone > 0
    }

    /// Whether `node` is gone (left or declared failed), as remembered.
    pub(super) fn is_gone(&self, node: &NodeId) -> bool {
        self.by_node.get(node).is_some_and(|p| p.gone.is_some())
    }

    /// Records that `node` is gone as of `now`: it is no live member any
    /// more, owes no done marker, and no answered marker of it is kept.
    /// When [`MAX_PEERS`] departures are remembered, the oldest one of a
    /// node not `named` by a view here is forgotten first. Returns false
    /// (and changes nothing) if it was gone already.
    pub(super) fn mark_gone(
        &mut self,
        node: &NodeId,
        now: Instant,
        named: impl Fn(&NodeId) -> bool,
    ) -> bool {
        if self.is_gone(node) {
            return false;
        }
        if self.counts.gone >= MAX_PEERS {
            let oldest = self
                .by_node
                .iter()
                .filter_map(|(n, p)| p.gone.map(|at| (n, at)))
                .filter(|(n, _)| !named(n))
                .min_by_key(|(_, at)| *at)
                .map(|(n, _)| n.clone());
            if let Some(n) = oldest {
                self.update(&n, |p| p.gone = None);
            }
        }
        self.update(node, |p| {
            p.gone = Some(now);
            p.member = false;
            p.answered = None;
            p.done = Done::NotAsked;
        });
        true
    }

    /// Whether `node` was declared failed (see [`Peers::mark_failed`]).
    pub(super) fn is_failed(&self, node: &NodeId) -> bool {
        self.by_node.get(node).is_some_and(|p| p.failed)
    }

    /// Records that `node`'s datums may fail over.
    pub(super) fn mark_failed(&mut self, node: &NodeId) {
        self.update(node, |p| p.failed = true);
    }

    /// Forgets, once no view here names them (`known` false): departures
    /// learnt more than `keep` ago; then the failed and empty-handed marks
    /// of nodes no longer gone (only while some departure was remembered
    /// before this call); then the pending done markers of nodes neither
    /// live members nor gone.
    pub(super) fn prune(&mut self, now: Instant, keep: Duration, known: impl Fn(&NodeId) -> bool) {
        let any_gone = self.counts.gone > 0;
        let any_pending = self.counts.pending > 0;
        if !any_gone && !any_pending {
            return;
        }
        self.each(|n, p| {
            if any_gone {
                let known = known(n);
                if p.gone.is_some_and(|at| !known && at + keep < now) {
                    p.gone = None;
                }
                // A failed node is remembered as long as its departure: a
                // view may name it again after the views that knew it were
                // pruned (a membership view still holding its old
                // generation at a heal), and its datums must still fail
                // over, not wait for the timeout as those of a node that
                // left.
                if !known && p.gone.is_none() {
                    p.failed = false;
                    p.empty_handed = None;
                    // When a departed member became one goes with its
                    // departure: nothing reads it for a gone node, and
                    // kept, it would leave one entry per departure.
                    if !p.member {
                        p.member_since = None;
                    }
                }
            }
            if any_pending
                && p.pending_done.is_some()
                && !(p.member || p.gone.is_some() || known(n))
            {
                p.pending_done = None;
            }
        });
    }

    // ----- what a peer said ------------------------------------------------

    /// `node`'s latest announcement, if any was recorded.
    pub(super) fn announced(&self, node: &NodeId) -> Option<Announced> {
        self.announced.get(node).copied()
    }

    /// Every announcement, in the order of the map (see the module doc).
    pub(super) fn announcements(&self) -> impl Iterator<Item = (&NodeId, &Announced)> + '_ {
        self.announced.iter()
    }

    /// Records that `node` is at instance `epoch` of `view` (a batch not
    /// older than its latest): `since` is `now` if that is news. Not
    /// recorded for a new peer when [`MAX_PEERS`] are. Returns whether it is
    /// news (another epoch or view than the latest recorded).
    pub(super) fn note_announcement(
        &mut self,
        node: &NodeId,
        epoch: u64,
        view: ViewId,
        now: Instant,
    ) -> bool {
        let latest = self.announced.get(node).copied();
        let fresh = latest.is_none_or(|a| (a.epoch, a.view) != (epoch, view));
        if self.announced.len() < MAX_PEERS || latest.is_some() {
            // Written back even when it is no news: an insert makes room
            // first, so it may grow the table, which changes the map's
            // iteration order (see the module doc).
            let since = match latest {
                Some(a) if !fresh => a.since,
                _ => now,
            };
            self.announced
                .insert(node.clone(), Announced { epoch, view, since });
        }
        fresh
    }

    /// Records what the latest word of `node` (at its install count
    /// `epoch`, of `view`) says of what it holds; `done`: it is a done
    /// marker, and `names` says (if `view` is the view in force or a recent
    /// one here) whether `view` names `node`. Returns whether `node` just
    /// became empty-handed. See `Handoff::note_last_word`.
    pub(super) fn note_last_word(
        &mut self,
        node: &NodeId,
        view: ViewId,
        epoch: u64,
        done: bool,
        names: Option<bool>,
    ) -> bool {
        self.update(node, |p| {
            if p.pending_done.is_some_and(|(e, _)| epoch > e || done) {
                p.pending_done = None;
            }
        });
        let empty = done
            && match names {
                Some(names) => !names,
                None => {
                    if self.counts.pending < MAX_PEERS {
                        self.update(node, |p| p.pending_done = Some((epoch, view)));
                    }
                    false
                }
            };
        self.update(node, |p| match p.empty_handed {
            Some(e) if e >= epoch => false,
            Some(_) if !empty => {
                p.empty_handed = None;
                false
            }
            Some(_) => {
                p.empty_handed = Some(epoch);
                false
            }
            None if empty => {
                p.empty_handed = Some(epoch);
                true
            }
            None => false,
        })
    }

    /// Whether `node` holds nothing as far as this node knows (see
    /// [`PeerState::empty_handed`]).
    pub(super) fn is_empty_handed(&self, node: &NodeId) -> bool {
        self.by_node
            .get(node)
            .is_some_and(|p| p.empty_handed.is_some())
    }

    /// A view is installed: `names` says whether it names a node. A node
    /// it names that is not gone may acquire again (its empty-handed mark
    /// is cleared); the pending done markers for this view are decided.
    pub(super) fn on_install(&mut self, view: ViewId, names: impl Fn(&NodeId) -> bool) {
        self.each(|n, p| {
            if p.empty_handed.is_some() && p.gone.is_none() && names(n) {
                p.empty_handed = None;
            }
            if let Some((e, v)) = p.pending_done
                && v == view
            {
                p.pending_done = None;
                if !names(n) && p.empty_handed.is_none_or(|x| x < e) {
                    p.empty_handed = Some(e);
                }
            }
        });
    }

    // ----- done markers ----------------------------------------------------

    /// `node`'s done marker for this node's install of the view in force.
    pub(super) fn done(&self, node: &NodeId) -> Done {
        self.by_node.get(node).map_or(Done::NotAsked, |p| p.done)
    }

    /// Whether `node` said done with this node's install of the view in
    /// force.
    pub(super) fn said_done(&self, node: &NodeId) -> bool {
        matches!(self.done(node), Done::Said(_))
    }

    /// Whether `node` owes its done marker.
    pub(super) fn is_missing(&self, node: &NodeId) -> bool {
        self.missing.contains(node)
    }

    /// Whether no peer owes its done marker.
    pub(super) fn none_missing(&self) -> bool {
        self.missing.is_empty()
    }

    /// The peers that owe their done marker, in node order.
    pub(super) fn missing(&self) -> impl Iterator<Item = &NodeId> + '_ {
        self.missing.iter()
    }

    /// A new install: exactly the nodes of `expected` (none gone) owe their
    /// done marker; every marker received is forgotten.
    pub(super) fn reset_done(&mut self, expected: &BTreeSet<NodeId>) {
        self.each(|_, p| p.done = Done::NotAsked);
        for n in expected {
            debug_assert!(!self.is_gone(n), "a gone node owes a done marker");
            self.update(n, |p| p.done = Done::Missing);
        }
    }

    /// `node` (not gone) owes its done marker, unless it said done already.
    pub(super) fn expect_done(&mut self, node: &NodeId) {
        self.update(node, |p| {
            if !matches!(p.done, Done::Said(_)) {
                p.done = Done::Missing;
            }
        });
    }

    /// `node` (not gone) said done with this install at its `epoch`.
    /// Returns whether it owed it.
    pub(super) fn count_done(&mut self, node: &NodeId, epoch: u64) -> bool {
        self.update(node, |p| {
            std::mem::replace(&mut p.done, Done::Said(epoch)) == Done::Missing
        })
    }

    /// `node` moved on since its done marker: it owes one again.
    pub(super) fn marker_outdated(&mut self, node: &NodeId) {
        self.update(node, |p| p.done = Done::Missing);
    }

    /// `node` owes no done marker any more. Returns whether it owed one.
    pub(super) fn drop_missing(&mut self, node: &NodeId) -> bool {
        self.update(node, |p| {
            let owed = p.done == Done::Missing;
            if owed {
                p.done = Done::NotAsked;
            }
            owed
        })
    }

    /// The last done marker this node sent `node`: (this node's install
    /// count, the peer's epoch it answered).
    pub(super) fn answered(&self, node: &NodeId) -> Option<(u64, u64)> {
        self.by_node.get(node).and_then(|p| p.answered)
    }

    /// Records a done marker sent to `node` (not recorded for a new peer
    /// when [`MAX_PEERS`] are).
    pub(super) fn note_answered(&mut self, node: &NodeId, seq: u64, epoch: u64) {
        if self.counts.answered < MAX_PEERS || self.answered(node).is_some() {
            self.update(node, |p| p.answered = Some((seq, epoch)));
        }
    }

    // ----- notices handed out ----------------------------------------------

    /// Whether this node handed `node` notices at its install in force.
    pub(super) fn is_notified(&self, node: &NodeId) -> bool {
        self.by_node.get(node).is_some_and(|p| p.notified)
    }

    /// This node handed `node` notices at its install in force.
    pub(super) fn note_notified(&mut self, node: &NodeId) {
        self.update(node, |p| p.notified = true);
    }

    /// A new install (or fencing): no notice handed out at it yet.
    pub(super) fn clear_notified(&mut self) {
        self.each(|_, p| p.notified = false);
    }

    // ----- checks ----------------------------------------------------------

    /// Panics unless the invariants of the module doc hold.
    #[cfg(test)]
    fn check(&self) {
        let mut counts = Counts::default();
        let mut missing = BTreeSet::new();
        for (n, p) in &self.by_node {
            assert!(!p.is_blank(), "blank entry for {n}");
            counts.account(&mut missing, n, &PeerState::default(), p);
            if p.gone.is_some() {
                assert!(!p.member, "{n} gone and a member");
                assert_eq!(p.done, Done::NotAsked, "{n} gone and owes a marker");
            }
            if p.member {
                assert!(p.member_since.is_some(), "member {n} without since");
            }
        }
        assert_eq!(counts, self.counts);
        assert_eq!(missing, self.missing);
        assert!(self.announced.len() <= MAX_PEERS);
    }
}

#[cfg(test)]
mod tests;
