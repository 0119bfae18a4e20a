//! Peers and their done markers: who is a target, who said done with which
//! instance of a view, what a failed, superseded or departed peer releases,
//! and when this node says done itself.

use super::peer_state::Done;
use super::*;

impl<W> Handoff<W> {
    /// The outcome of sending a [`Transmit`]: `Ok` once the peer received
    /// it, `Err` when the transport gave up. After a failure the notices are
    /// routed again (to the primary in force then) after a backoff, until
    /// they expire at the timeout.
    pub fn send_done(&mut self, id: SendId, outcome: Result<(), String>, now: Instant) {
        let now = self.clock(now);
        let Some(batch) = self.sent.remove(&id.0) else {
            return;
        };
        if self.fenced {
            return;
        }
        match outcome {
            Ok(()) => {
                for (i, &d) in batch.datums.iter().enumerate() {
                    if i % WARM_AHEAD == 0 {
                        let next = batch.datums.get(i..).unwrap_or_default();
                        self.registry.warm(next.iter().take(WARM_AHEAD));
                    }
                    let delivered = self.registry.modify(&d, |s| {
                        let passed = s.phase() == Phase::Passed;
                        if passed {
                            s.enter(Phase::Free);
                            s.attempt = 0;
                        }
                        passed.then_some(*s)
                    });
                    if let Some(s) = delivered.flatten() {
                        let at = batch.notice.as_ref().map(|a| a.to.clone());
                        self.token_left(d, s, at, now);
                    }
                }
            }
            Err(error) => {
                self.counters.send_failures += 1;
                debug!(node = %self.local, send = id.0, %error, "notice batch not delivered");
                if let Some(to) = batch.state {
                    let at = now + self.config.retry_base;
                    let seq = self.install_seq;
                    self.add_timer(at, TimerKind::ResendState { to, seq });
                }
                // The peer may have received the batch all the same: it is
                // re-sent to the same node under the same view and epoch,
                // never to another one, so at most one node can take it
                // (and that node refuses a second copy, see `taken`).
                let mut back = Vec::new();
                let mut attempt = 0u8;
                for d in batch.datums {
                    let Some(mut s) = self.registry.get(&d) else {
                        continue;
                    };
                    if s.phase() == Phase::Passed {
                        s.enter(Phase::TokenWait);
                        s.attempt = s.attempt.saturating_add(1);
                        attempt = attempt.max(s.attempt);
                        self.registry.set(d, s);
                        back.push((d, s.flight));
                    }
                }
                if let Some(address) = batch.notice.filter(|_| !back.is_empty()) {
                    let key = self.next_retry;
                    self.next_retry += 1;
                    self.retrying.insert(
                        key,
                        Retry {
                            address,
                            datums: back,
                        },
                    );
                    let at = now + self.backoff(attempt);
                    self.add_timer(at, TimerKind::Resend { key });
                }
            }
        }
        self.check_ended();
    }

    /// Membership declared `node` failed. Waits whose every possible holder
    /// is now gone end at once (failover), instead of at the timeout. If
    /// `node` is this node, this is [`Handoff::fence`].
    ///
    /// Call it *before* installing the view without `node`: failover applies
    /// only to a node declared failed while it is a member of the view in
    /// force (it died holding its datums). A node already out of the view
    /// (not ready, leaving) may have relinquished under a view this node has
    /// not seen; its datums wait for the notice or the timeout. Neither is a
    /// failover decided while this node has no standing
    /// ([`Handoff::set_standing`]): cut off from the majority, it sees the
    /// others fail, not the other way round.
    pub fn peer_failed(&mut self, node: &NodeId, now: Instant) {
        if !self.fenced
            && self.standing
            && *node != self.local
            && self.current.view().contains(node)
        {
            self.peers.mark_failed(node);
        }
        self.peer_gone(node, now);
    }

    /// `node`, a node of a view this node installed, is gone for good: a
    /// newer generation of its name is a member. A newer generation exists
    /// only once the old process ended, by a crash or a death verdict
    /// (which fenced it), so its datums are failed over as for
    /// [`Handoff::peer_failed`] whatever this node's standing: which side
    /// of a cut this node is on does not change which generation of a name
    /// is alive. For a node membership never reported (a node reborn as a
    /// new generation knows the members of its old view only from that
    /// view), or one it reported failed while this node had no standing
    /// (gone then, but not failed over). Never for a node that left: its
    /// datums are in the hands of the nodes it notified.
    pub fn peer_superseded(&mut self, node: &NodeId, now: Instant) {
        let now = self.clock(now);
        if self.fenced || *node == self.local || !self.in_views(node) {
            return;
        }
        self.peers.mark_failed(node);
        if !self.peers.is_gone(node) {
            self.peer_gone(node, now);
            return;
        }
        info!(node = %self.local, peer = %node, "gone peer superseded: failed over");
        for past in &mut self.history {
            if let Some(i) = past.table.view().index_of_id(node)
                && let Some(g) = past.failed.get_mut(i.get())
            {
                *g = true;
            }
        }
        self.release_unheld_waits(now, true);
        self.check_ended();
    }

    /// `node` left the cluster gracefully (it relinquished what it held
    /// first and sent the notices, possibly under a view this node has not
    /// installed yet): no done marker is expected from it any more, but its
    /// datums are not failed over; their notices are on their way.
    pub fn peer_left(&mut self, node: &NodeId, now: Instant) {
        self.peer_gone(node, now);
    }

    /// The live members of the cluster other than this node, ready or not
    /// (alive or suspect), as membership sees them now; replaces the set
    /// given before. Nodes declared failed or left are ignored.
    ///
    /// A datum is taken without its notice (first owner, failover, or a
    /// notice sent under a view this node skipped) only once each of them has
    /// said done with the view in force, as well as every node of the recent
    /// views. Two nodes that become ready at the same moment, each before it
    /// saw the other ready, each install a view with only themselves; since
    /// each waits for the other's done marker for that view, which the other
    /// never sends, neither acquires until both install the view with both,
    /// and the datum gets one first owner, not two.
    ///
    /// A node whose membership has not seen a peer yet cannot wait for it: a
    /// node must finish joining before it becomes ready.
    pub fn set_peers<'a>(&mut self, peers: impl IntoIterator<Item = &'a NodeId>, now: Instant) {
        let now = self.clock(now);
        if self.fenced {
            return;
        }
        let peers: BTreeSet<NodeId> = peers
            .into_iter()
            .filter(|n| **n != self.local && !self.peers.is_gone(n))
            .cloned()
            .collect();
        let Some((added, removed)) = self.peers.set_members(&peers, now) else {
            return;
        };
        if !added.is_empty() {
            let at = now + self.silent_peer_grace();
            self.add_timer(at, TimerKind::SilentPeer);
        }
        for n in added {
            if self.in_views(&n) {
                continue;
            }
            self.peers.expect_done(&n);
            self.push_state(n);
        }
        let mut emptied = false;
        for n in removed {
            if !self.in_views(&n) && self.peers.drop_missing(&n) {
                emptied = !self.missing_done(false, now);
            }
        }
        if emptied {
            self.release_unheld_waits(now, false);
        }
        self.check_ended();
    }

    /// Whether `node` is in the view in force or a recent one.
    pub(super) fn in_views(&self, node: &NodeId) -> bool {
        self.current.view().contains(node)
            || self.history.iter().any(|p| p.table.view().contains(node))
    }

    /// How long a live member outside every view here that never sent this
    /// node a batch (a member that joined and stays silent, not running a
    /// handoff or withholding its done markers) is waited for before a wait
    /// that has a previous owner ends without its done marker: a quarter of
    /// `timeout` (2.5 s by default) from when it became a member. A first
    /// owner (no previous owner in a recent view) waits for it whatever the
    /// time: two nodes made ready at once must each hear the other first.
    pub fn silent_peer_grace(&self) -> Duration {
        self.config.timeout / 4
    }

    /// Whether a wait must still wait for a done marker: some node that
    /// owes its done marker, other than (unless `fresh`) a silent live member past
    /// its grace (see [`Handoff::silent_peer_grace`]). Such a member is in
    /// no view here (it is no previous owner) and announced nothing: the
    /// datum's token is with the previous owners, whose word the wait has.
    pub(super) fn missing_done(&self, fresh: bool, now: Instant) -> bool {
        if self.gone_in_view_missing() {
            return true;
        }
        if fresh {
            return !self.peers.none_missing();
        }
        let grace = self.silent_peer_grace();
        self.peers.missing().any(|n| {
            self.peers.announced(n).is_some()
                || self.in_views(n)
                || self.peers.member_since(n).is_none_or(|at| at + grace > now)
        })
    }

    /// Whether `node`, which this node's token for a datum went to, is a
    /// live target that must say done with this instance of the view in
    /// force before any wait ends without a notice (it owes its done
    /// marker, or said done already).
    ///
    /// Its done marker ends a wait for the returning token: it answers this
    /// node's announcement of the view in force, an install later than the
    /// one the notice was sent from, so once `node` sent it, a notice of
    /// this node's still parked there is spent (its sender moved on,
    /// `sender_unmoved`) and is never taken; a notice it took was
    /// relinquished or passed on before it said done (a relay is busy until
    /// its notice is delivered), so the token came back or went to a node
    /// that must say done too. The notice was delivered before the wait
    /// began (`token_left`), so it was at `node` before that marker counts.
    pub(super) fn answers_for(&self, node: &NodeId) -> bool {
        self.is_target(node) && (self.peers.is_missing(node) || self.peers.said_done(node))
    }

    /// Whether the node datum `d`'s token went to (see
    /// [`Handoff::answers_for`]) said done with this instance of the view in
    /// force.
    pub(super) fn answered_by_token_holder(&self, d: Datum) -> bool {
        self.returning
            .get(&d)
            .and_then(Option::as_ref)
            .is_some_and(|n| self.is_target(n) && self.peers.said_done(n))
    }

    pub(super) fn peer_gone(&mut self, node: &NodeId, now: Instant) {
        let now = self.clock(now);
        if self.fenced {
            return;
        }
        if *node == self.local {
            self.fence(now);
            return;
        }
        // Bounded: when full, the oldest departure not named by a view goes
        // first. Gone, it is no live member, owes no done marker and no
        // marker sent to it is remembered. Its announcement keeps its last
        // install count: a notice it sent before it moved on and left stays
        // spent (see `sender_unmoved`).
        let (current, history) = (&self.current, &self.history);
        let named = |n: &NodeId| {
            current.view().contains(n) || history.iter().any(|p| p.table.view().contains(n))
        };
        if !self.peers.mark_gone(node, now, named) {
            return;
        }
        info!(node = %self.local, peer = %node, "peer gone");
        if self.peers.is_failed(node) {
            for past in &mut self.history {
                if let Some(i) = past.table.view().index_of_id(node)
                    && let Some(g) = past.failed.get_mut(i.get())
                {
                    *g = true;
                }
            }
        }
        // Its parked notices waiting for its word are spent (rule 5).
        self.refuse_unconfirmed(|n, _| n == node);
        self.release_unheld_waits(now, true);
        self.check_ended();
    }

    /// Once every node that may hold something has said "done" for the view
    /// in force: the waits that no live node can answer end now.
    ///
    /// `all`: look at every wait (a node is gone: candidates changed), not
    /// only those that were blocked on done markers.
    pub(super) fn release_unheld_waits(&mut self, now: Instant, all: bool) {
        let waiting = if all {
            let mut waiting = Vec::new();
            for c in &self.cohorts {
                for (i, d) in c.datums.iter().enumerate() {
                    if i % WARM_AHEAD == 0 {
                        let next = c.datums.get(i..).unwrap_or_default();
                        self.registry.warm(next.iter().take(WARM_AHEAD));
                    }
                    if self.registry.get(d).is_some_and(|s| {
                        s.flight == c.id && matches!(s.phase(), Phase::Awaiting | Phase::Relay)
                    }) {
                        waiting.push(*d);
                    }
                }
            }
            self.blocked_on_done.clear();
            waiting
        } else if !self.missing_done(false, now) {
            // Waits of first owners still blocked (on a silent member) go
            // back on the list in `settle_wait`.
            std::mem::take(&mut self.blocked_on_done)
        } else {
            return;
        };
        for d in waiting {
            if let Some(s) = self
                .registry
                .get(&d)
                .filter(|s| matches!(s.phase(), Phase::Awaiting | Phase::Relay))
            {
                self.settle_wait(d, s, now);
            }
        }
    }

    /// A new view is in force: every node of it and of the recent views
    /// (other than this one, not gone) must say "done" again.
    pub(super) fn reset_done(&mut self) {
        let mut expected = BTreeSet::new();
        for n in self.current.view().nodes() {
            expected.insert(n.clone());
        }
        for p in &self.history {
            for n in p.table.view().nodes() {
                expected.insert(n.clone());
            }
        }
        expected.extend(self.peers.members().cloned());
        expected.remove(&self.local);
        expected.retain(|n| !self.peers.is_gone(n));
        self.peers.reset_done(&expected);
        self.blocked_on_done.clear();
        self.gone_in_view_done.clear();
    }

    /// Whether a node gone here that the view in force names again has not
    /// said done with this install. Membership may withdraw a failure
    /// verdict (the member refuted it at a higher incarnation) after this
    /// node acted on it: the member is live and in the views again under
    /// the same identity, and may hold datums it took meanwhile from nodes
    /// that never saw the verdict. This node trusts no notice of it any
    /// more, but waits for its done marker like any live node's before it
    /// takes a datum without a notice. Not for a node a newer generation of
    /// whose name is a member or in the view (its process ended): it says
    /// nothing again, and the next view drops it.
    pub(super) fn gone_in_view_missing(&self) -> bool {
        // Called for every wait settled: nothing to walk in the usual case.
        if !self.peers.any_gone() {
            return false;
        }
        let view = self.current.view();
        view.nodes().iter().any(|n| {
            *n != self.local
                && self.peers.is_gone(n)
                && !self.gone_in_view_done.contains(n)
                && !view
                    .nodes()
                    .iter()
                    .chain(self.peers.members())
                    .any(|m| m.name == n.name && m.generation > n.generation)
        })
    }

    /// Whether anything is left to relinquish (or acquire and then hand on)
    /// under the view in force, or a notice is not delivered yet.
    pub(super) fn is_busy(&self) -> bool {
        use Phase::*;
        [
            RelinquishQueued,
            Relinquishing,
            RelinquishBackoff,
            TokenWait,
            TokenQueued,
            // Done follows the delivery of every notice: a primary that has
            // everyone's done marker and no notice takes the datum, and a
            // notice still on its way would then arrive as a duplicate.
            Passed,
            Acquiring,
        ]
        .iter()
        .any(|&p| self.registry.count(p) > 0)
    }

    /// Whether this node exchanges its state with `node`: a live member or a
    /// node of the view in force or a recent one, not gone.
    pub(super) fn is_target(&self, node: &NodeId) -> bool {
        *node != self.local
            && !self.peers.is_gone(node)
            && (self.peers.is_member(node) || self.in_views(node))
    }

    /// Whether this node tells `node` where it stands (announcements, done
    /// markers): a target, or a node of the view in force even if it is
    /// gone here. A member declared failed whose verdict was refuted is in
    /// the views again with the same identity; this node trusts nothing it
    /// says any more, but it may be the primary of datums this node
    /// relinquished (their notices to it are dropped), and it waits: its
    /// wait ends on the done markers, and never at its deadline while this
    /// node may still act as their owner as far as it knows (see
    /// [`Handoff::holder_may_act`]). What this node says of itself is true
    /// whoever hears it.
    pub(super) fn is_listener(&self, node: &NodeId) -> bool {
        self.is_target(node) || (*node != self.local && self.current.view().contains(node))
    }

    /// Every node this node tells where it stands: the nodes of the view in
    /// force, and those of the recent views and the live members that are
    /// not gone.
    pub(super) fn targets(&self) -> BTreeSet<NodeId> {
        let current = self.current.view().nodes().iter();
        let others = self
            .history
            .iter()
            .flat_map(|p| p.table.view().nodes())
            .chain(self.peers.members())
            .filter(|n| !self.peers.is_gone(n));
        current
            .chain(others)
            .filter(|n| **n != self.local)
            .cloned()
            .collect()
    }

    /// Tells every target where this node stands (just installed a view).
    pub(super) fn announce(&mut self) {
        for to in self.targets() {
            self.push_state(to);
        }
    }

    /// Once nothing is left to relinquish under the view in force: a done
    /// marker to each target already at that view. The others get theirs
    /// when they say they are there ([`Handoff::peer_state`]), except when
    /// this node is not in the view in force: then every target gets one at
    /// once (a farewell, see [`Handoff::push_state`]), since a node on its
    /// way out may be gone before the others get to that view.
    pub(super) fn maybe_send_done(&mut self) {
        if self.fenced || self.done_seq == Some(self.install_seq) || self.is_busy() {
            return;
        }
        self.done_seq = Some(self.install_seq);
        let view = self.current.view_id();
        let seq = self.install_seq;
        let due: Vec<NodeId> = if self.self_index.is_none() {
            self.targets()
                .into_iter()
                .filter(|n| self.peers.answered(n).is_none_or(|(s, _)| s != seq))
                .collect()
        } else {
            // In the order of the announcements' map (see `handoff/peer_state.rs`).
            self.peers
                .announcements()
                .filter(|(n, a)| {
                    a.view == view
                        && self.peers.answered(n) != Some((seq, a.epoch))
                        && self.is_listener(n)
                })
                .map(|(n, _)| n.clone())
                .collect()
        };
        for to in due {
            self.push_state(to);
        }
    }

    /// Records what the latest word of `from` (at its install count
    /// `epoch`) says of what it holds. A done marker for a view without
    /// `from` means it relinquished everything and had its notices delivered
    /// to that view's primaries. It counts once that view is the view in
    /// force here or a recent one: its notices then went to this node for
    /// what this node owns (or to a primary this node was past, which passes
    /// them on). A marker for a view this node has not installed yet waits
    /// for that view (a pending done marker): under an older view here, a node it
    /// sent a notice to may take the datum while this node would take it
    /// too. A node done with a view without itself says so to every target
    /// (echo [`FAREWELL`]), whatever view they are at, since it may be gone
    /// before they get there.
    ///
    /// Until `from` installs another view (a later epoch), it acquires
    /// nothing: only a primary acquires, and that view names it nowhere. So
    /// only a later epoch clears the mark (a batch of the same epoch is an
    /// older announcement overtaken on the way, or a notice it passed on as a
    /// relay), as does installing a view here that names it while it is not
    /// gone. Returns whether `from` just became empty-handed.
    pub(super) fn note_last_word(
        &mut self,
        from: &NodeId,
        view: ViewId,
        epoch: u64,
        done: Option<u64>,
    ) -> bool {
        // Whether `view`, if it is the view in force or a recent one here,
        // names `from`.
        let names = done.and_then(|_| {
            let table = if view == self.current.view_id() {
                Some(&self.current)
            } else {
                self.history
                    .iter()
                    .find(|p| p.table.view_id() == view)
                    .map(|p| &p.table)
            };
            table.map(|t| t.view().contains(from))
        });
        self.peers
            .note_last_word(from, view, epoch, done.is_some(), names)
    }

    /// What a batch from `from` says of it: it is at instance `epoch` of
    /// `view`, sent after it heard of this node's instance `echo` of that
    /// view (0: none), and (`done`) done with it. A done marker counts only
    /// for the instance it answers, and stops counting once `from` says it
    /// moved on: a recurring view id never revives an old marker.
    pub(super) fn peer_state(
        &mut self,
        from: &NodeId,
        view: ViewId,
        epoch: u64,
        done: bool,
        echo: u64,
        now: Instant,
    ) {
        let done = done.then_some(echo);
        // A gone node's last batches may arrive after it left (or after it
        // was declared failed): they still tell what it held when it went.
        let gone = self.peers.is_gone(from);
        if !gone && !self.is_target(from) {
            return;
        }
        // Batches may arrive out of order: only the latest one speaks.
        if self.peers.announced(from).is_some_and(|a| epoch < a.epoch) {
            return;
        }
        // It moved on: its notices from an earlier install, parked here for
        // the view in force, are spent.
        self.refuse_unconfirmed(|n, e| n == from && e < epoch);
        let fresh = self.peers.note_announcement(from, epoch, view, now);
        let emptied = self.note_last_word(from, view, epoch, done);
        if gone {
            if emptied {
                // It was a possible holder of the waits it appears in.
                self.release_unheld_waits(now, true);
            }
            // Named by the view in force again: its done marker for this
            // install is required (`gone_in_view_missing`); a later word
            // of its replaces it.
            let current = self.current.view_id();
            if self.current.view().contains(from) {
                let counted = view == current && done == Some(self.install_seq);
                if counted {
                    if self.gone_in_view_done.insert(from.clone()) && !self.missing_done(false, now)
                    {
                        self.release_unheld_waits(now, false);
                    }
                } else {
                    self.gone_in_view_done.remove(from);
                }
            }
            // Still in the view in force (a refuted verdict): its waits end
            // on the done markers, so it gets this node's, as a live node
            // would (see `is_listener`).
            if view == self.current.view_id()
                && self.current.view().contains(from)
                && self.done_seq == Some(self.install_seq)
                && self.peers.answered(from) != Some((self.install_seq, epoch))
            {
                self.push_state(from.clone());
            }
            return;
        }
        let current = self.current.view_id();
        if view == current && echo == self.install_seq {
            // It answers this install (done or not) and is still where its
            // parked notices came from: they are taken before the waits are
            // settled again.
            self.confirm_parked(from, epoch, now);
        }
        let counted = view == current && done == Some(self.install_seq);
        if counted {
            if self.peers.count_done(from, epoch) && !self.missing_done(false, now) {
                self.release_unheld_waits(now, false);
            }
        } else if let Done::Said(e) = self.peers.done(from)
            && (view != current || epoch > e)
        {
            // It moved on since its marker: the marker no longer speaks for
            // the view in force here.
            self.peers.marker_outdated(from);
        }
        // A node done with a view without itself answers every new
        // announcement with a farewell: it may have become ready again in
        // the meantime as far as `from` knows (a view naming this node
        // clears the earlier one there), and this one is news from after
        // that announcement.
        if (view == current || self.self_index.is_none())
            && self.done_seq == Some(self.install_seq)
            && self.peers.answered(from) != Some((self.install_seq, epoch))
        {
            self.push_state(from.clone());
        } else if fresh
            && view == current
            && self.done_seq != Some(self.install_seq)
            && self.peers.is_notified(from)
        {
            // Not done yet, but `from` may have parked notices this node sent
            // it at this install: an announcement echoing its own lets it
            // take them now (`confirm_parked`) instead of at the done marker.
            self.push_state(from.clone());
        }
    }

    /// Sends `to` where this node stands: a done marker answering its
    /// latest batch if both are at the view in force and this node is done
    /// with it, else an announcement of the view and install count (echoing
    /// `to`'s latest install of that view heard here, if any). A node
    /// that is done with a view without itself says so to every target
    /// (echo [`FAREWELL`], which answers no instance and is never counted as
    /// one): it holds nothing, which lets the others stop waiting for it
    /// once it is gone, even if they reach that view only after it left.
    pub(super) fn push_state(&mut self, to: NodeId) {
        let view = self.current.view_id();
        let done = self.done_seq == Some(self.install_seq);
        let latest = self.peers.announced(&to).map(|a| (a.epoch, a.view));
        // The echo sent, and the announcement it answers (recorded as answered).
        let answer = match latest {
            Some((e, v)) if v == view && done => Some((e, e)),
            _ if done && self.self_index.is_none() => {
                Some((FAREWELL, latest.map_or(FAREWELL, |(e, _)| e)))
            }
            _ => None,
        };
        if let Some((_, e)) = answer {
            // Not recorded for a new peer when full (see `handoff/peer_state.rs`).
            self.peers.note_answered(&to, self.install_seq, e);
        }
        let marker = answer.is_some();
        // An announcement echoes the addressee's latest install of the view
        // in force that this node heard of: it was sent after that.
        let echo = answer
            .map(|(echo, _)| echo)
            .unwrap_or_else(|| latest.filter(|(_, v)| *v == view).map_or(0, |(e, _)| e));
        let id = self.next_send;
        self.next_send += 1;
        let batch = NoticeBatch {
            view,
            from: self.local.clone(),
            to: to.clone(),
            groups: Vec::new(),
            epoch: self.install_seq,
            done: marker,
            echo,
        };
        self.sent.insert(
            id,
            SentBatch {
                datums: Vec::new(),
                state: Some(to.clone()),
                notice: None,
            },
        );
        self.transmits.push_back(Transmit {
            id: SendId(id),
            to,
            batch,
        });
    }
}
