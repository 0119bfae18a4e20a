//! Carrying out what the node core decided: its jobs started, its outputs
//! (deliveries checked against the ledger, forwards and notice batches sent,
//! dropped work handed back to the client), the handoff's events counted,
//! and the holdings reported to the acting-owner check.

use rand::Rng;
use shoal_core::{DropReason, Output};
use shoal_transition::{HandoffEvent, Job, JobKind, WithoutNotice};

use super::{Pending, RunningJob, TransitionNode, owns};
use crate::app::AppCtx;
use crate::transition_app::{AppWork, TAG_NOTICES, TransitionLedger, between};

impl TransitionNode {
    /// Runs the core's jobs and carries out its outputs until it has none,
    /// then tells the acting-owner check what this process holds now.
    pub(super) fn pump(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        loop {
            let mut progressed = false;
            while let Some((instance, job)) = self
                .core
                .as_mut()
                .and_then(|c| c.poll_job().map(|j| (c.instance(), j)))
            {
                progressed = true;
                self.start_job(instance, job, ctx);
            }
            while let Some(out) = self.core.as_mut().and_then(|c| c.poll_output(now)) {
                progressed = true;
                self.on_output(out, ctx);
            }
            if !progressed {
                break;
            }
        }
        if let Some(core) = self.core.as_ref() {
            let held = core.counters().held;
            ctx.shared().stats.work_held += held.saturating_sub(self.held_counted);
            self.held_counted = held;
        }
        self.sync_owned(ctx);
    }

    /// Reports the holdings of the datums touched since the last report
    /// (`Handoff::token`: from the hand-out of the acquire job to the end of
    /// a successful relinquish), or of every datum when the handoff's
    /// standing, view or fence changed.
    fn sync_owned(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let shape = self.core.as_ref().map(|c| {
            let h = c.handoff();
            (h.has_standing(), h.view_id(), h.is_fenced())
        });
        let rescan = std::mem::take(&mut self.rescan) || shape != self.shape;
        self.shape = shape;
        if (self.touched.is_empty() && !rescan) || !ctx.shared().settings.leases {
            self.touched.clear();
            return;
        }
        if rescan {
            self.touched.clear();
            self.touched
                .extend(0..i64::from(ctx.shared().settings.datums));
        }
        let (slot, generation) = (ctx.node().slot, self.key.1);
        for d in std::mem::take(&mut self.touched) {
            let owned = self.core.as_ref().is_some_and(|c| owns(c, d));
            ctx.shared().acting.set_owned(slot, generation, d, owned);
        }
    }

    /// A job the core handed out: checked, entered in the ledger, and run
    /// for a seeded random virtual time.
    fn start_job(&mut self, instance: u64, job: Job, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        self.touched.push(job.datum.id);
        tracing::debug!(
            target: "shoal_sim::transition",
            t = now.saturating_duration_since(ctx.shared().base).as_secs_f64(),
            node = %self.key.0,
            generation = self.key.1,
            datum = job.datum.id,
            kind = ?job.kind,
            token = job.token.0,
            "job"
        );
        if ctx.shared().settings.leases && !Self::lease_valid(ctx) {
            Self::violation(
                ctx,
                format!(
                    "{}/{} starts a {:?} job for datum {} without a valid lease",
                    self.key.0, self.key.1, job.kind, job.datum.id
                ),
            );
        }
        if job.kind == JobKind::Acquire {
            ctx.shared().acquiring(job.datum.id, now);
            if let Some(problem) = ctx.shared().start_holding(&self.key, job.datum.id, now) {
                Self::violation(ctx, problem);
            }
        }
        let (time, failure) = {
            let s = &ctx.shared().settings;
            (s.job_time, s.job_failure)
        };
        let d = between(ctx.rng(), time);
        let ok = !(failure > 0.0 && ctx.rng().random_bool(failure));
        self.job_seq += 1;
        self.jobs
            .insert((now + d, self.job_seq), RunningJob { instance, job, ok });
    }

    /// Carries out one output of the core.
    fn on_output(&mut self, out: Output<AppWork, ()>, ctx: &mut AppCtx<'_, TransitionLedger>) {
        match out {
            Output::Handoff(e) => self.on_handoff_event(e, ctx),
            Output::Deliver(work) => self.process(work, ctx),
            Output::Forward {
                to,
                addr,
                work,
                acknowledged,
            } => {
                ctx.shared().stats.work_forwarded += 1;
                let id = ctx.send(addr, work.encode());
                let acknowledged = acknowledged.then_some(to);
                self.sends.insert(id, Pending::Work { work, acknowledged });
            }
            Output::SendNotices {
                instance,
                id,
                addr,
                batch,
                ..
            } => {
                let bytes = batch.encode();
                let mut payload = Vec::with_capacity(bytes.len() + 1);
                payload.push(TAG_NOTICES);
                payload.extend_from_slice(&bytes);
                let message = ctx.send(addr, payload);
                self.sends
                    .insert(message, Pending::Notices { instance, id });
            }
            Output::CancelNotices(id) => {
                for pending in self.sends.values_mut() {
                    if matches!(pending, Pending::Notices { id: s, .. } if *s == id) {
                        *pending = Pending::Cancelled;
                    }
                }
            }
            Output::AnswerNotices { accepted, .. } => {
                if !accepted {
                    ctx.shared().stats.batches_refused += 1;
                }
            }
            Output::Dropped { reason, work } => {
                Self::count_dropped(reason, ctx.shared());
                Self::to_client(work, ctx.shared());
            }
            Output::PeerGone(_) => {}
        }
    }

    /// Counts work the core gave up on.
    pub(super) fn count_dropped(reason: DropReason, ledger: &mut TransitionLedger) {
        *ledger.stats.work_dropped.entry(reason.name()).or_default() += 1;
    }

    /// `work` goes back to the client, which routes it again at a node's
    /// next tick.
    pub(super) fn to_client(mut work: AppWork, ledger: &mut TransitionLedger) {
        work.hops = 0;
        ledger.orphans.push(work);
    }

    fn on_handoff_event(&mut self, e: HandoffEvent, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        tracing::debug!(
            target: "shoal_sim::transition",
            t = now.saturating_duration_since(ctx.shared().base).as_secs_f64(),
            node = %self.key.0,
            generation = self.key.1,
            event = ?e,
            "handoff event"
        );
        match e {
            HandoffEvent::Fenced { .. } => {
                ctx.shared().stats.fenced += 1;
                ctx.shared().drop_process(&self.key);
            }
            HandoffEvent::TransitionStarted { .. } => {
                self.transition_since.get_or_insert(now);
            }
            HandoffEvent::TransitionEnded { .. } => {
                if let Some(since) = self.transition_since.take() {
                    let s = now.saturating_duration_since(since).as_secs_f64();
                    let stats = &mut ctx.shared().stats;
                    stats.max_transition_s = stats.max_transition_s.max(s);
                }
            }
            HandoffEvent::RelinquishFailed { .. } => ctx.shared().stats.relinquish_failures += 1,
            HandoffEvent::RelinquishAbandoned { datum } => {
                self.touched.push(datum.id);
                ctx.shared().stats.relinquish_abandoned += 1;
                ctx.shared().stop_holding(&self.key, datum.id);
            }
            HandoffEvent::AcquireFailed { datum, retry, .. } => {
                self.touched.push(datum.id);
                ctx.shared().stats.acquire_failures += 1;
                let held = self
                    .core
                    .as_ref()
                    .is_some_and(|c| c.handoff().is_held(datum));
                if !retry && held {
                    // The layer processes the datum anyway: it holds it.
                    if let Some(problem) = ctx.shared().start_holding(&self.key, datum.id, now) {
                        Self::violation(ctx, problem);
                    }
                }
            }
            HandoffEvent::AcquiredWithoutNotice { reason, .. } => match reason {
                WithoutNotice::Timeout => {
                    let l = ctx.shared();
                    l.stats.timeouts += 1;
                    if now >= l.base + l.settings.fault_at {
                        l.stats.timeouts_after_fault += 1;
                    }
                }
                WithoutNotice::OwnerGone => ctx.shared().stats.failovers += 1,
                WithoutNotice::AllDone => ctx.shared().stats.all_done += 1,
            },
            HandoffEvent::TransitionSuperseded { .. } | HandoffEvent::ReplicasChanged { .. } => {}
        }
    }

    /// The core delivers `item` here (`Output::Deliver`): checked against
    /// the ledger, and recorded.
    fn process(&mut self, item: AppWork, ctx: &mut AppCtx<'_, TransitionLedger>) {
        if ctx.shared().settings.leases && !Self::lease_valid(ctx) {
            Self::violation(
                ctx,
                format!(
                    "{}/{} processes work {} for datum {} without a valid lease",
                    self.key.0, self.key.1, item.id, item.datum
                ),
            );
        }
        let now = ctx.now();
        if let Some(problem) = ctx.shared().process(&self.key, &item, now) {
            Self::violation(ctx, problem);
        }
    }
}
