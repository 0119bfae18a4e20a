//! Deadlines: relinquish attempts and their abandonment, wait timeouts,
//! retries of failed sends, and pruning of what is remembered.

use super::*;

#[derive(Debug)]
pub(super) enum TimerKind {
    RelinquishRetry {
        datum: Datum,
        flight: u64,
        attempt: u8,
    },
    AcquireRetry {
        datum: Datum,
        flight: u64,
        attempt: u8,
    },
    Resend {
        key: u64,
    },
    ResendState {
        to: NodeId,
        seq: u64,
    },
    /// The relinquish deadline of a datum whose acquire ended after a view
    /// had already given it to another node.
    AbandonRelinquish {
        datum: Datum,
        flight: u64,
    },
    /// A live member outside every view here may have stayed silent for
    /// [`silent_peer_grace`](Handoff::silent_peer_grace): settle the waits
    /// blocked on done markers again.
    SilentPeer,
    /// A wait whose deadline was deferred because a holder might still act
    /// ([`Handoff::holder_may_act`]): look at it again.
    WaitDeadline {
        datum: Datum,
        flight: u64,
    },
}

#[derive(Debug)]
pub(super) struct Timer {
    at: Instant,
    seq: u64,
    kind: TimerKind,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at && self.seq == other.seq
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl<W> Handoff<W> {
    /// When [`Handoff::handle_timeout`] should be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.fenced {
            return None;
        }
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| {
            next = Some(next.map_or(t, |n| n.min(t)));
        };
        if let Some(c) = self.cohorts.get(self.rcursor) {
            consider(c.start + self.config.relinquish_timeout);
        }
        if let Some(c) = self.cohorts.front() {
            consider(c.start + self.config.timeout);
        }
        if let Some(Reverse(t)) = self.timers.peek() {
            consider(t.at);
        }
        for b in &self.out {
            if let Some(since) = b.since {
                consider(since + self.config.batch_linger);
            }
        }
        for p in self.parked.values().chain(self.unconfirmed.as_ref()) {
            consider(p.first + self.config.timeout);
        }
        next
    }

    pub(super) fn backoff(&self, attempt: u8) -> Duration {
        let factor = 1u32 << u32::from(attempt.saturating_sub(1)).min(16);
        self.config
            .retry_base
            .saturating_mul(factor)
            .min(self.config.retry_max)
    }

    pub(super) fn add_timer(&mut self, at: Instant, kind: TimerKind) {
        self.timer_seq += 1;
        self.timers.push(Reverse(Timer {
            at,
            seq: self.timer_seq,
            kind,
        }));
    }

    /// Runs everything due at `now`: relinquish deadlines, wait timeouts,
    /// retries, batch lingering, expiry of parked notices.
    pub fn handle_timeout(&mut self, now: Instant) {
        let now = self.clock(now);
        if self.fenced {
            return;
        }
        self.process_timeouts(now);
        self.check_ended();
    }

    pub(super) fn process_timeouts(&mut self, now: Instant) {
        let abandoned = self.counters.relinquish_abandoned;
        let timed_out = self.counters.acquired_after_timeout;
        self.run_deadlines(now);
        let abandoned = self.counters.relinquish_abandoned - abandoned;
        let timed_out = self.counters.acquired_after_timeout - timed_out;
        if abandoned > 0 || timed_out > 0 {
            warn!(
                node = %self.local, abandoned, timed_out,
                "handoff deadlines passed: relinquishes abandoned, datums acquired without notice"
            );
        }
    }

    pub(super) fn run_deadlines(&mut self, now: Instant) {
        // Relinquish deadlines: give up and stop holding.
        while let Some(c) = self.cohorts.get_mut(self.rcursor) {
            if c.start + self.config.relinquish_timeout > now {
                break;
            }
            let id = c.id;
            let datums = std::mem::take(&mut c.datums);
            for &d in &datums {
                self.abandon_relinquish(d, id);
            }
            if let Some(c) = self.cohorts.get_mut(self.rcursor) {
                c.datums = datums;
            }
            self.rcursor += 1;
        }
        // Full deadlines: waits acquire, tokens expire, relays stop.
        while let Some(c) = self.cohorts.front() {
            if c.start + self.config.timeout > now {
                break;
            }
            let Some(c) = self.cohorts.pop_front() else {
                break;
            };
            self.rcursor = self.rcursor.saturating_sub(1);
            for d in c.datums {
                let Some(mut s) = self.registry.get(&d).filter(|s| s.flight == c.id) else {
                    continue;
                };
                use Phase::*;
                match s.phase() {
                    Awaiting => self.wait_deadline(d, s, now),
                    Relay => {
                        s.enter(Free);
                        self.registry.set(d, s);
                        if !self.returning.is_empty() {
                            self.returning.remove(&d);
                        }
                    }
                    TokenWait | TokenQueued | TokenParked | Passed => {
                        self.counters.notices_expired += 1;
                        s.enter(Free);
                        self.registry.set(d, s);
                        self.token_left(d, s, None, now);
                        self.maybe_release(d);
                    }
                    RelinquishQueued | Relinquishing | RelinquishBackoff => {
                        self.abandon_relinquish(d, c.id);
                    }
                    _ => {}
                }
            }
        }
        // Retries.
        while let Some(Reverse(t)) = self.timers.peek() {
            if t.at > now {
                break;
            }
            let Some(Reverse(t)) = self.timers.pop() else {
                break;
            };
            self.fire(t.kind, now);
        }
        // Lingering batches.
        for i in 0..self.out.len() {
            let due = self
                .out
                .get(i)
                .and_then(|b| b.since)
                .is_some_and(|since| since + self.config.batch_linger <= now);
            if due {
                self.flush(i);
            }
        }
        // Parked notices for views that never came.
        let timeout = self.config.timeout;
        let expired: Vec<ViewId> = self
            .parked
            .iter()
            .filter(|(_, p)| p.first + timeout <= now)
            .map(|(v, _)| *v)
            .collect();
        for v in expired {
            if let Some(p) = self.parked.remove(&v) {
                self.parked_total = self.parked_total.saturating_sub(p.datums.len());
                self.counters.notices_parked_dropped += p.datums.len() as u64;
            }
        }
        // Notices of the view in force whose sender never confirmed them.
        if self
            .unconfirmed
            .as_ref()
            .is_some_and(|p| p.first + timeout <= now)
        {
            self.refuse_unconfirmed(|_, _| true);
        }
        self.prune(now);
    }

    /// A wait reached its deadline (`s` is its slot, `Awaiting`). It
    /// acquires without a notice (`AcquiredWithoutNotice { reason: Timeout }`)
    /// unless this node has no standing, or a live node that may hold the
    /// datum may still act as its owner ([`Handoff::holder_may_act`]):
    /// then the wait restarts, and is looked at again once that node's
    /// relinquish deadline must have passed.
    pub(super) fn wait_deadline(&mut self, d: Datum, mut s: Slot, now: Instant) {
        if !self.standing {
            // No token is minted without standing, not even at the
            // deadline: a node cut off into a minority would later pass it
            // on, newer than the real holder's, to a primary that then
            // acquires while the holder still acts. The wait restarts;
            // standing's return settles it (`set_standing`), or the next
            // deadline.
            s.flight = self.enter_cohort(d, now);
            self.registry.set(d, s);
            return;
        }
        let Some(again) = self.holder_may_act(d, now) else {
            self.take_token(d, s, Source::Timeout, now);
            return;
        };
        // A live node that may hold the datum has not been at the view in
        // force long enough for its own relinquish deadline to have passed
        // (it may not have installed that view at all, or installed a view
        // in between that gave the datum back to it): acquiring now could
        // give two acting owners. The wait restarts (it stays in a cohort,
        // so a failover of that node still ends it), and is looked at again
        // at `again`.
        self.counters.timeouts_deferred += 1;
        debug!(node = %self.local, datum = %d, "wait deadline deferred: a holder may still act");
        // The holders in the way are remembered past the recent views:
        // the view in which one was primary may be forgotten here before it
        // announces the view in force.
        let mut holders = self.possible_holders(d);
        holders.retain(|n| self.holder_settles_at(n, now) > now);
        self.deferred.insert(d, holders);
        s.flight = self.enter_cohort(d, now);
        self.registry.set(d, s);
        if again < now + self.config.timeout {
            self.add_timer(
                again,
                TimerKind::WaitDeadline {
                    datum: d,
                    flight: s.flight,
                },
            );
        }
    }

    pub(super) fn abandon_relinquish(&mut self, d: Datum, flight: u64) {
        let Some(mut s) = self.registry.get(&d).filter(|s| {
            s.flight == flight
                && matches!(
                    s.phase(),
                    Phase::RelinquishQueued | Phase::Relinquishing | Phase::RelinquishBackoff
                )
        }) else {
            return;
        };
        if matches!(self.primary_of(d.id), Primary::Me) {
            // The datum came back here meanwhile: nobody else will take it.
            // A running job finishes (success: acquire again; failure: kept).
            if s.phase() != Phase::Relinquishing {
                s.enter(Phase::Held);
                self.registry.set(d, s);
                self.maybe_release(d);
            }
            return;
        }
        debug!(node = %self.local, datum = %d, "relinquish abandoned at its deadline");
        self.counters.relinquish_abandoned += 1;
        s.enter(Phase::Free);
        self.registry.set(d, s);
        self.events
            .push_back(HandoffEvent::RelinquishAbandoned { datum: d });
        self.maybe_release(d);
    }

    pub(super) fn fire(&mut self, kind: TimerKind, now: Instant) {
        match kind {
            TimerKind::RelinquishRetry {
                datum,
                flight,
                attempt,
            } => {
                let Some(mut s) = self.registry.get(&datum).filter(|s| {
                    s.phase() == Phase::RelinquishBackoff
                        && s.flight == flight
                        && s.attempt == attempt
                }) else {
                    return;
                };
                if matches!(self.primary_of(datum.id), Primary::Me) {
                    s.enter(Phase::Held);
                    self.registry.set(datum, s);
                    self.maybe_release(datum);
                } else {
                    s.enter(Phase::RelinquishQueued);
                    self.registry.set(datum, s);
                    self.relinquish_queue.push_back(datum);
                }
            }
            TimerKind::AcquireRetry {
                datum,
                flight,
                attempt,
            } => {
                let Some(mut s) = self.registry.get(&datum).filter(|s| {
                    s.phase() == Phase::AcquireBackoff && s.flight == flight && s.attempt == attempt
                }) else {
                    return;
                };
                if matches!(self.primary_of(datum.id), Primary::Me) {
                    s.enter(Phase::AcquireQueued);
                    self.registry.set(datum, s);
                    self.acquire_queue.push_back(datum);
                } else {
                    s.flight = self.enter_cohort(datum, now);
                    self.take_token(datum, s, Source::PassOn, now);
                }
            }
            TimerKind::AbandonRelinquish { datum, flight } => {
                self.abandon_relinquish(datum, flight);
            }
            TimerKind::SilentPeer => self.release_unheld_waits(now, false),
            TimerKind::WaitDeadline { datum, flight } => {
                if let Some(s) = self
                    .registry
                    .get(&datum)
                    .filter(|s| s.phase() == Phase::Awaiting && s.flight == flight)
                {
                    self.wait_deadline(datum, s, now);
                }
            }
            TimerKind::ResendState { to, seq } => {
                if seq == self.install_seq && self.is_listener(&to) {
                    self.push_state(to);
                }
            }
            TimerKind::Resend { key } => {
                let Some(retry) = self.retrying.remove(&key) else {
                    return;
                };
                let gone = self.peers.is_gone(&retry.address.to);
                let mut datums = Vec::new();
                for (d, flight) in retry.datums {
                    let Some(mut s) = self
                        .registry
                        .get(&d)
                        .filter(|s| s.phase() == Phase::TokenWait && s.flight == flight)
                    else {
                        continue;
                    };
                    if gone {
                        // Never re-addressed: the token is dropped, as if it
                        // expired; the done markers or the timeout end the wait.
                        self.counters.notices_undeliverable += 1;
                        s.enter(Phase::Free);
                        s.attempt = 0;
                        self.registry.set(d, s);
                        self.token_left(d, s, Some(retry.address.to.clone()), now);
                        self.maybe_release(d);
                    } else {
                        s.enter(Phase::Passed);
                        self.registry.set(d, s);
                        datums.push(d);
                    }
                }
                if !datums.is_empty() {
                    self.send_notices(retry.address, datums);
                }
            }
        }
    }

    pub(super) fn prune(&mut self, now: Instant) {
        let timeout = self.config.timeout;
        // A copy of a notice comes at most `timeout` after its sender's view
        // change (it stops retrying then) plus one transfer: twice the
        // timeout covers it.
        let keep_taken = timeout.saturating_mul(2);
        while let Some(&(at, d, epoch)) = self.taken_order.front() {
            if at + keep_taken >= now {
                break;
            }
            self.taken_order.pop_front();
            if self.taken.get(&d).is_some_and(|&(_, e)| e == epoch) {
                self.taken.remove(&d);
            }
        }
        if self.taken.is_empty() {
            self.sender_names.clear();
        }
        while self.history.len() > self.config.max_history {
            self.history.pop_back();
        }
        while self.history.back().is_some_and(|p| p.left + timeout < now) {
            self.history.pop_back();
        }
        // Views seen are remembered longer, to recognise stale notices.
        let keep = timeout.saturating_mul(16);
        if self.seen.len() > 64 {
            self.seen.retain(|_, left| *left + keep >= now);
        }
        if self.seen.len() > 4096 {
            let mut by_age: Vec<(Instant, ViewId)> =
                self.seen.iter().map(|(v, t)| (*t, *v)).collect();
            by_age.sort_unstable();
            for (_, v) in by_age.iter().take(self.seen.len() - 4096) {
                self.seen.remove(v);
            }
        }
        // Departures (with the failed and empty-handed marks of the nodes
        // no longer gone) and pending done markers of nodes no view here
        // names.
        let (current, history) = (&self.current, &self.history);
        let known = |n: &NodeId| {
            current.view().contains(n) || history.iter().any(|p| p.table.view().contains(n))
        };
        self.peers.prune(now, timeout.saturating_mul(16), known);
        if !self.deferred.is_empty() {
            let registry = &self.registry;
            // Kept while this node waits for the datum or relays it (it
            // may wait for it again, and the holder may still hold it).
            self.deferred.retain(|d, _| {
                registry
                    .get(d)
                    .is_some_and(|s| matches!(s.phase(), Phase::Awaiting | Phase::Relay))
            });
        }
    }
}
