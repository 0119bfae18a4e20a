//! Waiting for a token: who may hold it (the candidates of the recent
//! views), when a wait is settled, and what a view change does to a datum
//! in flight.

use super::*;

enum Candidates {
    /// No other node was primary in a recent view.
    None,
    /// Some were, all declared failed and out of the view in force.
    AllGone,
    /// Some were and are not gone: each says done once it holds nothing the
    /// view in force gives another node (the rest failed and are out).
    AllDone,
    /// One left, or failed while still in the view in force: it may have
    /// relinquished under a view not seen here and its notice be on its way,
    /// and it will not say done. Wait for the notice or the timeout.
    Pending,
}

impl<W> Handoff<W> {
    /// Whether the nodes other than this one that were the datum's primary
    /// in a recent view may still hold it, and who answers for them.
    fn candidates(&self, id: i64) -> Candidates {
        let (mut any, mut alive) = (false, false);
        for past in &self.history {
            let Some(p) = past.table.primary(id) else {
                continue;
            };
            if Some(p) == past.self_index {
                continue;
            }
            any = true;
            let Some(node) = past.table.view().node(p) else {
                continue;
            };
            // Failed over only for a node declared failed while it was a
            // member (a node that left, or was not ready, stays up and may
            // relinquish under a view this node has not installed yet), and
            // only once the view in force no longer has it: the done markers
            // of that view cover every notice it sent before dying.
            let failed_out = past.failed.get(p.get()).copied().unwrap_or(false)
                && !self.current.view().contains(node);
            if failed_out {
                continue;
            }
            if self.peers.is_gone(node) {
                // Gone after saying done under a view without it: it had
                // relinquished everything (and delivered its notices).
                if self.peers.is_empty_handed(node) {
                    continue;
                }
                return Candidates::Pending;
            }
            // Alive: it owes its done marker until it says done for the view in force.
            alive = true;
        }
        match (any, alive) {
            (_, true) => Candidates::AllDone,
            (true, false) => Candidates::AllGone,
            (false, false) => Candidates::None,
        }
    }

    /// When a wait for `d` may end at its deadline: `None` if now, else
    /// `Some(instant)` to look again. It may not while a live node that may
    /// hold `d` (the primary of a recent view here, or the node this node's
    /// own token went to) has not announced the view in force, or announced
    /// it less than `timeout` ago. Such a node may still act as its owner:
    /// it may not have installed the view in force (membership reached it
    /// later, or not yet, as under one-way cuts), or it installed a view
    /// this node skipped that made it primary again and restarted its
    /// relinquish. Its relinquish deadline (`relinquish_timeout` after its
    /// install, which precedes its announcement here) has passed once it
    /// announced the view in force `timeout` ago. Nodes failed out of the
    /// view in force and nodes that left are not waited for here; a member
    /// back from a refuted failure verdict (failed here, named by the view
    /// in force) is.
    pub(super) fn holder_may_act(&self, d: Datum, now: Instant) -> Option<Instant> {
        let again = self.possible_holders(d).iter().fold(now, |again, node| {
            again.max(self.holder_settles_at(node, now))
        });
        (again > now).then_some(again)
    }

    /// When `node`, a possible holder of a datum this node waits for,
    /// stops holding the wait's deadline up (`now`: it does not).
    pub(super) fn holder_settles_at(&self, node: &NodeId, now: Instant) -> Instant {
        let failed = self.peers.is_failed(node);
        let in_force = self.current.view().contains(node);
        // A node that left is not waited for, nor one failed out of the
        // view in force. One failed here whose verdict was refuted (the
        // view in force names it again) is alive and may act: waited for,
        // on its announcements, like any other.
        let departed = self.peers.is_gone(node) && !(failed && in_force);
        if *node == self.local || (failed && !in_force) || departed {
            return now;
        }
        match self.peers.announced(node) {
            Some(a) if a.view == self.current.view_id() => (a.since + self.config.timeout).max(now),
            // Not at the view in force as far as this node knows: look
            // again after a whole timeout.
            _ => now + self.config.timeout,
        }
    }

    /// The nodes other than this one that may hold `d` while this node
    /// waits for it: the primaries of the recent views (not failed out of
    /// the view in force), the node this node's own token went to, the
    /// nodes of the view in force and live members last heard at a view
    /// this node no longer remembers (or never heard), and those that
    /// deferred the deadline of a wait for it before and may still hold it
    /// (`deferred`).
    pub(super) fn possible_holders(&self, d: Datum) -> Vec<NodeId> {
        let mut holders: Vec<NodeId> = Vec::new();
        let mut add = |node: &NodeId| {
            if !holders.contains(node) {
                holders.push(node.clone());
            }
        };
        for past in &self.history {
            let Some(p) = past
                .table
                .primary(d.id)
                .filter(|&p| Some(p) != past.self_index)
            else {
                continue;
            };
            let Some(node) = past.table.view().node(p) else {
                continue;
            };
            // Failed over, as in `candidates`.
            if past.failed.get(p.get()).copied().unwrap_or(false)
                && !self.current.view().contains(node)
            {
                continue;
            }
            add(node);
        }
        if let Some(Some(at)) = self.returning.get(&d) {
            add(at);
        }
        // A node whose latest announcement heard here is of a view this
        // node no longer remembers (or that never announced anything) may
        // still be at a view in which it is the primary.
        let remembered = |v: ViewId| {
            v == self.current.view_id() || self.history.iter().any(|p| p.table.view_id() == v)
        };
        for node in self
            .current
            .view()
            .nodes()
            .iter()
            .chain(self.peers.members())
        {
            if *node != self.local
                && !self
                    .peers
                    .announced(node)
                    .is_some_and(|a| remembered(a.view))
            {
                add(node);
            }
        }
        if let Some(nodes) = self.deferred.get(&d) {
            nodes.iter().for_each(&mut add);
        }
        holders
    }

    /// This node became primary of a datum it does not hold.
    pub(super) fn begin_wait(&mut self, d: Datum, mut s: Slot, now: Instant) {
        s.enter(Phase::Awaiting);
        s.attempt = 0;
        s.flight = self.enter_cohort(d, now);
        s.since = s.flight;
        self.registry.set(d, s);
        self.settle_wait(d, s, now);
    }

    /// The notice this node sent for `d` was delivered, expired or dropped
    /// (`s` is its slot, now `Free`). If this node is the datum's primary
    /// again, it waits for it: the node the notice went to passes it back.
    /// A notice for any view in force since the token left here may bring
    /// it, so the wait counts views from the token's flight on.
    ///
    /// `at`: the node that may have the token now (`None`: not known). Until
    /// the token comes back, the wait ends only by a notice, the timeout,
    /// or the failover of that node: its done markers may predate the token
    /// reaching it (it may get it under a view it has not installed yet).
    pub(super) fn token_left(&mut self, d: Datum, s: Slot, at: Option<NodeId>, now: Instant) {
        if s.phase() != Phase::Free || !matches!(self.primary_of(d.id), Primary::Me) {
            return;
        }
        self.returning.insert(d, at);
        let since = s.flight;
        self.begin_wait(d, s, now);
        self.registry.modify(&d, |s| {
            if s.phase() == Phase::Awaiting {
                s.since = since;
            }
        });
    }

    /// A wait ends without a notice once every live node (ready or not) and
    /// every node of the recent views has said done with the view in force:
    /// none of them holds the datum then, so the primary takes it. Until
    /// then it is remembered in `blocked_on_done`. A departed holder that
    /// will never say done leaves the wait to its notice or the timeout.
    pub(super) fn settle_wait(&mut self, d: Datum, s: Slot, now: Instant) {
        // Only the primary may take a datum without a notice: for a relay,
        // the primary in force (not among the candidates) may hold it.
        if s.phase() != Phase::Awaiting || !matches!(self.primary_of(d.id), Primary::Me) {
            return;
        }
        let mut returned = false;
        if let Some(at) = self.returning.get(&d) {
            // This node's own token went to `at` (or nobody knows where):
            // it comes back by notice, unless `at` failed and is out, or
            // `at` is a live target whose done marker for this instance of
            // the view in force is required below (see `answers_for`).
            let failed_out = at
                .as_ref()
                .is_some_and(|n| self.peers.is_failed(n) && !self.current.view().contains(n));
            if !failed_out {
                if !at.as_ref().is_some_and(|n| self.answers_for(n)) {
                    return;
                }
                returned = true;
            }
        }
        // Without standing no token is minted: a node that may not act as
        // owner takes nothing as first owner, on done markers or by
        // failover. The wait is settled again when standing comes back
        // (`set_standing`). So nodes that form a cluster before any has a
        // lease pass no tokens among themselves as the views grow.
        if !self.standing {
            return;
        }
        let source = match self.candidates(d.id) {
            Candidates::Pending => return,
            // The token is this node's own: whoever was primary since, the
            // node it went to must say done too.
            _ if returned => Source::AllDone,
            Candidates::AllDone => Source::AllDone,
            Candidates::AllGone => Source::OwnerGone,
            Candidates::None => Source::Fresh,
        };
        let fresh = matches!(source, Source::Fresh);
        if self.installing || self.missing_done(fresh, now) {
            self.blocked_on_done.push(d);
        } else if returned && !self.answered_by_token_holder(d) {
            // The node the token went to stopped being a target before it
            // said done (it left the live members): wait for the notice or
            // the timeout.
        } else {
            self.take_token(d, s, source, now);
        }
    }

    /// One datum under a new view (the view in force is already the new one).
    pub(super) fn on_view_change(&mut self, d: Datum, now: Instant) {
        let Some(mut s) = self.registry.get(&d) else {
            return;
        };
        let mine = matches!(self.primary_of(d.id), Primary::Me);
        use Phase::*;
        match (s.phase(), mine) {
            // A notice on its way (`Passed`, `TokenWait`) stays addressed
            // to the node it went to; this node waits once it has left.
            (Free, true) => {
                // A fresh wait: a token this node sent away long ago and
                // that expired as a relay elsewhere no longer holds it up.
                if !self.returning.is_empty() {
                    self.returning.remove(&d);
                }
                self.begin_wait(d, s, now);
            }
            (Held, false) => self.start_relinquish(d, s, now),
            (RelinquishQueued | RelinquishBackoff, true) => {
                // Came back before the relinquish ran: keep it.
                s.enter(Held);
                self.registry.set(d, s);
            }
            (Awaiting, false) => {
                s.enter(Relay);
                self.registry.set(d, s);
            }
            (Awaiting, true) => {
                // Still waiting: the holder may have seen views this node did
                // not (and kept the datum meanwhile), so the deadline restarts
                // at every view change. It never ends early, only late.
                s.flight = self.enter_cohort(d, now);
                self.registry.set(d, s);
                self.settle_wait(d, s, now);
            }
            (Relay, true) => {
                // A new wait: a notice sent under a view of the old one may
                // be a token that a primary in between made worthless by
                // taking the datum once everyone was done.
                s.enter(Awaiting);
                s.flight = self.enter_cohort(d, now);
                s.since = s.flight;
                self.registry.set(d, s);
                self.settle_wait(d, s, now);
            }
            (AcquireQueued | AcquireBackoff, false) => {
                // Not acquired yet: pass the token on instead.
                s.flight = self.enter_cohort(d, now);
                self.take_token(d, s, Source::PassOn, now);
            }
            (TokenQueued | TokenParked, _) => {
                self.take_token(d, s, Source::Reroute, now);
            }
            (Acquiring, false) => {
                self.acquire_superseded.entry(d).or_insert(now);
            }
            (Acquiring, true) => {
                self.acquire_superseded.remove(&d);
            }
            _ => {}
        }
    }
}
