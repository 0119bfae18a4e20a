//! Membership's events to the core, a rebirth, and what is published to the
//! application when transitions end (waiters, reports).

use super::*;

impl Driver {
    pub(super) fn on_membership(&mut self, item: FromMembership, now: Instant) {
        match item {
            FromMembership::Event(event) => self.on_membership_event(event, now),
            FromMembership::Local(local) => self.core.set_local(local),
            FromMembership::Ack(ack) => {
                // Publish first: the caller that waited reads the view.
                if self.core.take_view_changed() {
                    self.publish();
                }
                ack.complete();
            }
            FromMembership::Reborn(local) => self.reborn(local, now),
        }
    }

    fn on_membership_event(&mut self, event: MEvent, now: Instant) {
        match &event {
            MEvent::Failed(_) => metrics::counter!("shoal_members_failed_total").increment(1),
            MEvent::DeclaredFailed => metrics::counter!("shoal_fenced_total").increment(1),
            _ => {}
        }
        let view = self.core.handoff().view_id();
        let base = self.idle_counters();
        if matches!(event, MEvent::ViewChanged(_)) && self.big_install() {
            // Installing walks every registered datum: a few hundred
            // milliseconds for a million. Let the other tasks of this
            // worker (the membership task among them) move to another
            // thread meanwhile, so probes are still answered.
            tokio::task::block_in_place(|| self.core.handle_membership(event, now));
        } else {
            self.core.handle_membership(event, now);
        }
        self.installed(view, base);
    }

    /// The handoff's counters when it is idle: a transition report counts
    /// from there if a view is installed next.
    pub(super) fn idle_counters(&self) -> Option<Counters> {
        let handoff = self.core.handoff();
        handoff.is_idle().then(|| handoff.counters().clone())
    }

    /// After an input that may have installed a view (`before` was in
    /// force): counted, and the reports count from `base` when the handoff
    /// was idle.
    pub(super) fn installed(&mut self, before: shoal_placement::ViewId, base: Option<Counters>) {
        if self.core.handoff().view_id() != before {
            metrics::counter!("shoal_views_installed_total").increment(1);
            if let Some(base) = base {
                self.report_base = base;
            }
        }
    }

    /// Whether installing a view should leave this thread to other tasks.
    pub(super) fn big_install(&self) -> bool {
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        multi_thread && self.datums.len() >= BLOCKING_INSTALL_DATUMS
    }

    /// The membership task started a new generation of this node after the
    /// cluster declared the old one dead: the core starts a new handoff
    /// (see [`NodeCore::reborn`]) and every datum is registered again (it
    /// holds none: the others failed the old generation's datums over).
    fn reborn(&mut self, local: shoal_membership::Member, now: Instant) {
        let generation = local.generation;
        if let Err(error) = self.core.reborn(local, now) {
            warn!(node = %self.name, %error, "cannot start the new generation's handoff");
            return;
        }
        for (_, datum) in std::mem::take(&mut self.datums) {
            if let Ok(d) = self.core.register(datum.type_name(), datum.id(), now) {
                self.datums.insert(d, datum);
            }
        }
        info!(node = %self.name, generation, datums = self.datums.len(),
            "new generation: handoff restarted");
        // The old machine's sends are ignored when they complete.
        self.sends.clear();
        self.report_base = Counters::default();
    }

    pub(super) fn finish_waiters(&mut self, now: Instant) {
        if self.waiters.is_empty() {
            return;
        }
        let idle = self.core.handoff().is_idle();
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| idle || now >= w.deadline || w.tx.is_closed());
        self.waiters = keep;
        if !done.is_empty() {
            let report = self.report();
            for w in done {
                let _ = w.tx.send(report.clone());
            }
        }
    }

    pub(super) fn report(&self) -> TransitionReport {
        let handoff = self.core.handoff();
        let c = handoff.counters();
        let b = &self.report_base;
        let p = handoff.progress();
        // `awaiting()` walks the whole registry: stop once every awaiting
        // datum was seen (none, once the handoff is over).
        let awaiting = handoff
            .awaiting()
            .take(p.awaiting.min(64))
            .map(|d| {
                let ty = handoff.type_name(d.ty).unwrap_or("?").to_owned();
                (ty, d.id)
            })
            .collect();
        let without_notice =
            |c: &Counters| c.acquired_after_timeout + c.acquired_owner_gone + c.acquired_all_done;
        TransitionReport {
            view: p.view,
            completed: handoff.is_idle(),
            relinquished: c.relinquished.saturating_sub(b.relinquished),
            acquired: c.acquired.saturating_sub(b.acquired),
            acquired_without_notice: without_notice(c).saturating_sub(without_notice(b)),
            relinquish_failures: c.relinquish_failures.saturating_sub(b.relinquish_failures),
            acquire_failures: c.acquire_failures.saturating_sub(b.acquire_failures),
            relinquish_abandoned: c
                .relinquish_abandoned
                .saturating_sub(b.relinquish_abandoned),
            in_flight: p.in_flight,
            awaiting,
        }
    }
}
