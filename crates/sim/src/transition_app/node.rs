//! One simulated process: a driver of the node core (`shoal_core::NodeCore`)
//! on the simulator, as the facade's tokio driver is one in the product.
//! What is here is the simulator's, not policy: the takeover gate's call
//! order, jobs run with virtual delays and failures, reliable messages,
//! readiness, graceful leaves, rebirths, and the ledger's checks.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use rand::Rng;
use shoal_core::{CoreConfig, DropReason, ForwardOutcome, Lease, NodeCore, Output};
use shoal_membership::{Event as MembershipEvent, TakeoverGate};
use shoal_placement::{NodeId, ViewId};
use shoal_transition::{Datum, Handoff, Job, JobKind, SendId};

use super::{
    AppWork, DATUM_TYPE, Key, READY_ALONE_AFTER, TAG_NOTICES, TAG_WORK, TransitionLedger, between,
};
use crate::app::{AppCtx, Application, MessageId, NodeInfo, NodeView};

mod outputs;

/// The node core the simulation drives (no handle for notice answers: a
/// notice batch's sender learns its outcome from the reliable message).
type Core = NodeCore<AppWork, ()>;

/// The state of one job handed out and not finished yet.
#[derive(Clone, Debug)]
struct RunningJob {
    /// The core's handoff instance that handed it out.
    instance: u64,
    job: Job,
    ok: bool,
}

/// What a message sent through the simulator carried.
#[derive(Clone, Debug)]
enum Pending {
    /// A notice batch of handoff `instance`.
    Notices { instance: u64, id: SendId },
    /// A notice send the core cancelled (its addressee was declared
    /// failed): its outcome is ignored.
    Cancelled,
    /// A work item; `acknowledged` with its owner when the core waits for
    /// the outcome (`forward_done`).
    Work {
        work: AppWork,
        acknowledged: Option<NodeId>,
    },
}

/// What the holdings of a handoff depend on besides its jobs: its standing,
/// the view in force, and whether it is fenced. When one changes, every
/// datum's holding is reported again.
type Shape = (bool, ViewId, bool);

/// The transition layer of one simulated process.
pub struct TransitionNode {
    key: Key,
    core: Option<Core>,
    jobs: BTreeMap<(Instant, u64), RunningJob>,
    job_seq: u64,
    sends: HashMap<MessageId, Pending>,
    next_tick: Instant,
    transition_since: Option<Instant>,
    leaving: bool,
    /// A graceful leave began: not ready, leaves once idle.
    departing: bool,
    /// Started (ready_on_start is off): the node asks to be ready once it
    /// knows another live member, or at this time if it still knows none
    /// (the first node).
    ready_alone_at: Option<Instant>,
    /// Membership events pass through the takeover gate, as in the facade:
    /// a declared death is acted on only once the member's lease must have
    /// lapsed, and not at all if it refutes first.
    gate: TakeoverGate,
    /// Datums whose holding (per the handoff) may have changed in this
    /// callback: reported to the acting-owner check at its end.
    touched: Vec<i64>,
    /// Every datum's holding may have changed (a view installed, a peer
    /// gone, a timer: an acquire waiting to retry holds no token once
    /// queued again, or passed on).
    rescan: bool,
    /// The handoff's [`Shape`] at the last report.
    shape: Option<Shape>,
    /// A new generation after a declared death: ready once it knows
    /// another member, never alone.
    reborn: bool,
    /// The core's count of held or parked work already added to the stats.
    held_counted: u64,
    /// The virtual time of the last callback (the stop has none).
    now: Instant,
}

impl fmt::Debug for TransitionNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransitionNode")
            .field("name", &self.key.0)
            .field("generation", &self.key.1)
            .finish_non_exhaustive()
    }
}

/// Whether `core`'s handoff holds datum `id` (`Handoff::token`).
fn owns(core: &Core, id: i64) -> bool {
    let h = core.handoff();
    h.lookup_type(DATUM_TYPE)
        .is_some_and(|ty| h.token(Datum::new(ty, id)).is_some())
}

impl TransitionNode {
    /// This node's state machine (None only if it could not be built).
    pub fn handoff(&self) -> Option<&Handoff<AppWork>> {
        self.core.as_ref().map(NodeCore::handoff)
    }

    /// This node's core (None only if it could not be built).
    pub fn core(&self) -> Option<&NodeCore<AppWork, ()>> {
        self.core.as_ref()
    }

    fn violation(ctx: &mut AppCtx<'_, TransitionLedger>, what: String) {
        let at = ctx.now().saturating_duration_since(ctx.shared().base);
        ctx.violation(format!("{at:?}: {what}"));
    }

    /// Whether this process's lease is valid now (always, leases off).
    fn lease_valid(ctx: &AppCtx<'_, TransitionLedger>) -> bool {
        ctx.membership().standing(ctx.now()).is_valid()
    }

    /// A core for this process with every datum registered, as the
    /// facade's driver makes it: the settings' strategy, one copy, and the
    /// handoff's transition timeout as the longest a message stays parked.
    fn new_core(ctx: &mut AppCtx<'_, TransitionLedger>) -> Option<Core> {
        let now = ctx.now();
        let (handoff, strategy) = {
            let s = &ctx.shared().settings;
            (s.handoff.clone(), s.strategy.clone())
        };
        let config = CoreConfig {
            strategy,
            copies: 1,
            park_expiry: handoff.timeout,
            ..CoreConfig::default()
        };
        let local = ctx.membership().local().clone();
        match NodeCore::new(local, handoff, config) {
            Ok(mut core) => {
                Self::register_all(&mut core, ctx);
                core.set_lease(Lease::from(&ctx.membership().standing(now)), now);
                Some(core)
            }
            Err(e) => {
                Self::violation(ctx, format!("cannot start the node core: {e}"));
                None
            }
        }
    }

    /// Registers every datum `0..datums` (at start, and in a new
    /// generation).
    fn register_all(core: &mut Core, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        for id in 0..i64::from(ctx.shared().settings.datums) {
            if let Err(e) = core.register(DATUM_TYPE, id, now) {
                Self::violation(ctx, format!("cannot register datum {id}: {e}"));
                return;
            }
        }
    }

    /// The core learns the lease, as the facade's driver tells it before
    /// every decision.
    fn refresh_lease(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        self.now = now;
        if let Some(core) = self.core.as_mut() {
            core.set_lease(Lease::from(&ctx.membership().standing(now)), now);
        }
    }

    /// Ready as soon as it joined (it knows another live member, ready or
    /// not); the node of slot 0 also alone once nobody answered for a while
    /// (it forms the cluster). Nodes that join together become ready
    /// together, each often before it sees another ready: the layer's wait
    /// for the done markers of every live member (`set_peers`) keeps each
    /// datum to one first owner.
    fn maybe_ready(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        if ctx.membership().local().ready {
            self.ready_alone_at = None;
        }
        let Some(alone_at) = self.ready_alone_at else {
            return;
        };
        let me = &self.key.0;
        let joined = ctx
            .membership()
            .members()
            .any(|m| m.state.is_live() && m.name != *me);
        let first = ctx.node().slot == 0 && ctx.now() >= alone_at && !self.reborn;
        if joined || first {
            self.ready_alone_at = None;
            ctx.set_ready(true);
        }
    }

    /// The facade's graceful leave, when the settings plan one for this
    /// process: not ready; then, once its layer is idle under a view
    /// without it (it relinquished everything and said done), it leaves.
    fn maybe_depart(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        if !self.departing {
            let now = ctx.now();
            let slot = ctx.node().slot;
            let due = {
                let l = ctx.shared();
                l.settings
                    .graceful_leaves
                    .iter()
                    .any(|&(s, at)| s == slot && now >= l.base + at)
            };
            if !due {
                return;
            }
            self.departing = true;
            // As the facade's `leave`: a relinquish that fails from now on
            // is given up at once (its done markers let the new owner take
            // the datum), then the node goes not ready.
            if let Some(core) = self.core.as_mut() {
                core.begin_leave();
            }
            ctx.set_ready(false);
        }
        let done = self.core.as_ref().is_some_and(|c| {
            let h = c.handoff();
            h.is_idle() && !h.table().view().contains(h.local())
        });
        if done && !ctx.membership().local().ready {
            // The transition without this node is over: what was given up
            // during it is counted (the farewells go out with the next
            // pump), then the node leaves the membership.
            if let Some(core) = self.core.as_mut() {
                let given_up = core.give_up(ctx.now()).len() as u64;
                ctx.shared().stats.leave_given_up += given_up;
            }
            self.leaving = true;
            ctx.leave();
        }
    }

    /// One membership event out of the takeover gate (or a declared death
    /// of this node, never held back).
    fn on_gated_event(&mut self, event: MembershipEvent, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        match &event {
            MembershipEvent::ViewChanged(_) => {
                self.rescan = true;
                if let Some(core) = self.core.as_mut() {
                    core.handle_membership(event, now);
                }
                self.maybe_ready(ctx);
            }
            MembershipEvent::Failed(m) | MembershipEvent::Left(m) => {
                let key: Key = (m.name.clone(), m.generation);
                if key != self.key {
                    if matches!(event, MembershipEvent::Failed(_)) {
                        ctx.shared().declare_failed(&key);
                        ctx.shared().detected(&key, now);
                    }
                    self.rescan = true;
                }
                if let Some(core) = self.core.as_mut() {
                    core.handle_membership(event, now);
                }
            }
            MembershipEvent::DeclaredFailed => {
                ctx.shared().declare_failed(&self.key);
                if let Some(core) = self.core.as_mut() {
                    core.handle_membership(event, now);
                }
                if ctx.shared().settings.leases {
                    // As the facade: unless it is leaving, the process
                    // comes back as a new generation (`on_reborn`).
                    if !self.leaving && !self.departing && ctx.shared().settings.rebirth {
                        ctx.rebirth();
                    }
                } else if !self.leaving {
                    // A fenced state machine is final: this process leaves
                    // and exits.
                    self.leaving = true;
                    ctx.leave();
                }
            }
            _ => {
                if let Some(core) = self.core.as_mut() {
                    core.handle_membership(event, now);
                }
            }
        }
    }

    /// Routes work the client injects at this node.
    fn route_local(&mut self, work: AppWork, ctx: &mut AppCtx<'_, TransitionLedger>) {
        match self.core.as_mut() {
            Some(core) => core.route_local(work, ctx.now()),
            None => Self::to_client(work, ctx.shared()),
        }
    }
}

impl Application for TransitionNode {
    type Shared = TransitionLedger;

    const STEP_CHECKS: bool = true;

    /// With leases, after every step: at most one process acts as owner of
    /// each datum (holds it per its handoff, lease valid now, not frozen,
    /// not fenced); and, once the last fault healed, when a datum last had
    /// no ready acting owner.
    fn check_step(
        shared: &mut TransitionLedger,
        now: Instant,
        nodes: &mut dyn Iterator<Item = NodeView<'_, Self>>,
    ) -> Result<(), String> {
        if !shared.settings.leases {
            return Ok(());
        }
        for n in nodes {
            let fenced = n.app.handoff().is_none_or(Handoff::is_fenced);
            let acting = !n.frozen && !fenced && n.membership.standing(now).is_valid();
            let ready = n.membership.local().ready;
            shared
                .acting
                .refresh(n.info.slot, n.info.generation, acting, ready);
        }
        if let Some((datum, owners)) = shared.acting.doubled() {
            let at = now.saturating_duration_since(shared.base);
            let owners: Vec<String> = owners
                .iter()
                .map(|(slot, generation)| format!("{}/{generation}", crate::node_name(*slot)))
                .collect();
            return Err(format!(
                "{at:?}: datum {datum} has {} acting owners (held, lease valid, not frozen): {}",
                owners.len(),
                owners.join(", ")
            ));
        }
        if let Some(healed) = shared.settings.healed_at
            && now >= shared.base + healed
            && shared.acting.unserved() > 0
        {
            shared.last_unserved = Some(now);
        }
        Ok(())
    }

    /// With leases, at every sampling point: the acting-owner check's
    /// record of what each process holds is the handoff's own
    /// (`Handoff::token`), for every datum.
    fn check(
        shared: &TransitionLedger,
        nodes: &mut dyn Iterator<Item = NodeView<'_, Self>>,
    ) -> Result<(), String> {
        if !shared.settings.leases {
            return Ok(());
        }
        for n in nodes {
            let Some(core) = n.app.core.as_ref() else {
                continue;
            };
            for id in 0..i64::from(shared.settings.datums) {
                let held = owns(core, id);
                if held != shared.acting.owns(n.info.slot, n.info.generation, id) {
                    return Err(format!(
                        "{}/{}: the acting-owner check counts datum {id} {} but the handoff {}",
                        n.info.name,
                        n.info.generation,
                        if held { "free" } else { "held" },
                        if held { "holds it" } else { "does not" }
                    ));
                }
            }
        }
        Ok(())
    }

    fn start(ctx: &mut AppCtx<'_, TransitionLedger>) -> Self {
        let now = ctx.now();
        let key: Key = (ctx.node().name.clone(), ctx.node().generation);
        let work_every = ctx.shared().settings.work_every;
        let core = Self::new_core(ctx);
        let first = between(ctx.rng(), (std::time::Duration::ZERO, work_every));
        TransitionNode {
            key,
            core,
            jobs: BTreeMap::new(),
            job_seq: 0,
            sends: HashMap::new(),
            next_tick: now + first,
            transition_since: None,
            leaving: false,
            departing: false,
            ready_alone_at: Some(now + READY_ALONE_AFTER),
            gate: ctx.membership().takeover_gate(),
            touched: Vec::new(),
            rescan: false,
            shape: None,
            reborn: false,
            held_counted: 0,
            now,
        }
    }

    fn on_event(&mut self, event: &MembershipEvent, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        self.refresh_lease(ctx);
        if matches!(event, MembershipEvent::DeclaredFailed) {
            // Self-fencing is never held back.
            self.on_gated_event(event.clone(), ctx);
        } else {
            self.gate.handle_event(event.clone(), now);
            while let Some(e) = self.gate.poll_event() {
                self.on_gated_event(e, ctx);
            }
        }
        self.pump(ctx);
    }

    fn on_message(
        &mut self,
        from: &NodeInfo,
        payload: &[u8],
        ctx: &mut AppCtx<'_, TransitionLedger>,
    ) {
        let now = ctx.now();
        self.refresh_lease(ctx);
        match payload.split_first() {
            Some((&TAG_NOTICES, bytes)) => {
                if let Some(core) = self.core.as_mut() {
                    core.handle_notices(&from.name, bytes, (), now);
                }
            }
            Some((&TAG_WORK, bytes)) => match (AppWork::decode(bytes), self.core.as_mut()) {
                (Some(work), Some(core)) => core.route_from_peer(work, &from.name, now),
                (Some(work), None) => Self::to_client(work, ctx.shared()),
                (None, _) => Self::violation(ctx, "undecodable work message".into()),
            },
            _ => Self::violation(ctx, "unknown application message".into()),
        }
        self.pump(ctx);
    }

    fn on_send_done(
        &mut self,
        id: MessageId,
        _to: SocketAddr,
        delivered: bool,
        ctx: &mut AppCtx<'_, TransitionLedger>,
    ) {
        let now = ctx.now();
        self.refresh_lease(ctx);
        let outcome = if delivered {
            Ok(())
        } else {
            Err("not delivered".to_string())
        };
        match (self.sends.remove(&id), self.core.as_mut()) {
            (Some(Pending::Notices { instance, id, .. }), Some(core)) => {
                core.send_done(instance, id, outcome, now);
            }
            (Some(Pending::Notices { .. } | Pending::Cancelled), _) => {}
            (Some(Pending::Work { work, .. }), None) => {
                if !delivered {
                    Self::to_client(work, ctx.shared());
                }
            }
            (
                Some(Pending::Work {
                    work,
                    acknowledged: None,
                }),
                Some(core),
            ) => {
                // Not handled by the receiver (the simulator's reliable
                // message says so for certain).
                if !delivered {
                    // As the facade's link: a routed message the transport
                    // failed to send is dropped and counted (here it goes
                    // back to the client, which routes it again later).
                    core.count_dropped(DropReason::SendFailed, 1);
                    Self::count_dropped(DropReason::SendFailed, ctx.shared());
                    Self::to_client(work, ctx.shared());
                }
            }
            (
                Some(Pending::Work {
                    work,
                    acknowledged: Some(to),
                }),
                Some(core),
            ) => {
                let outcome = match outcome {
                    Ok(()) => ForwardOutcome::Taken,
                    Err(e) => ForwardOutcome::Failed(e),
                };
                core.forward_done(to, work, outcome, now);
            }
            (None, _) => Self::violation(ctx, format!("outcome of unknown message {id:?}")),
        }
        self.pump(ctx);
    }

    fn on_timeout(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        self.refresh_lease(ctx);
        if self.gate.poll_timeout().is_some_and(|t| t <= now) {
            self.gate.handle_timeout(now);
            while let Some(e) = self.gate.poll_event() {
                self.on_gated_event(e, ctx);
            }
        }
        while let Some(entry) = self.jobs.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let RunningJob { instance, job, ok } = entry.remove();
            self.touched.push(job.datum.id);
            tracing::debug!(
                target: "shoal_sim::transition",
                t = now.saturating_duration_since(ctx.shared().base).as_secs_f64(),
                node = %self.key.0,
                generation = self.key.1,
                datum = job.datum.id,
                kind = ?job.kind,
                ok,
                "job done"
            );
            match (job.kind, ok) {
                (JobKind::Relinquish, true) => {
                    ctx.shared().stats.relinquished += 1;
                    ctx.shared().stop_holding(&self.key, job.datum.id);
                }
                (JobKind::Acquire, false) => {
                    ctx.shared().stop_holding(&self.key, job.datum.id);
                }
                (JobKind::Acquire, true) => {
                    if ctx.shared().holds(&self.key, job.datum.id) {
                        ctx.shared().acquired(&self.key, job.datum.id);
                    }
                }
                (JobKind::Relinquish, false) => {}
            }
            if let Some(core) = self.core.as_mut() {
                let outcome = if ok {
                    Ok(())
                } else {
                    Err("simulated failure".to_string())
                };
                core.job_done(instance, job, outcome, now);
            }
            self.pump(ctx);
        }
        if let Some(core) = self.core.as_mut()
            && core.poll_timeout().is_some_and(|t| t <= now)
        {
            // A retry due queues the acquire again: no token until its job.
            self.rescan = true;
            core.handle_timeout(now);
        }
        if !self.leaving {
            self.maybe_ready(ctx);
            self.maybe_depart(ctx);
        }
        if self.next_tick <= now {
            let (every, until, datums, base) = {
                let l = ctx.shared();
                (
                    l.settings.work_every,
                    l.settings.work_until,
                    l.settings.datums,
                    l.base,
                )
            };
            let every = every.max(std::time::Duration::from_millis(1));
            self.next_tick = now + every;
            let serving =
                self.core.as_ref().is_some_and(|c| !c.handoff().is_fenced()) && !self.leaving;
            if serving {
                if now < base + until && datums > 0 {
                    let datum = ctx.rng().random_range(0..i64::from(datums));
                    let item = ctx.shared().new_work(datum);
                    self.route_local(item, ctx);
                }
                for item in std::mem::take(&mut ctx.shared().orphans) {
                    self.route_local(item, ctx);
                }
            }
        }
        self.pump(ctx);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        let mut next = self.next_tick;
        if let Some((&(t, _), _)) = self.jobs.first_key_value() {
            next = next.min(t);
        }
        if let Some(t) = self.core.as_ref().and_then(NodeCore::poll_timeout) {
            next = next.min(t);
        }
        if let Some(t) = self.gate.poll_timeout() {
            next = next.min(t);
        }
        Some(next)
    }

    fn on_reborn(&mut self, ctx: &mut AppCtx<'_, TransitionLedger>) {
        let now = ctx.now();
        let slot = ctx.node().slot;
        let key: Key = (ctx.node().name.clone(), ctx.node().generation);
        ctx.shared().acting.retire(slot);
        ctx.shared().stats.rebirths += 1;
        ctx.shared().drop_process(&self.key);
        // As the facade's driver: outcomes of the old machine's jobs and
        // sends are ignored (the simulator drops the sends' outcomes; the
        // core ignores a former instance's).
        for pending in std::mem::take(&mut self.sends).into_values() {
            if let Pending::Work { work, .. } = pending {
                let l = ctx.shared();
                l.maybe_lost(work.id);
            }
        }
        self.jobs.clear();
        self.transition_since = None;
        self.touched.clear();
        let local = ctx.membership().local().clone();
        if let Some(mut core) = self.core.take() {
            match core.reborn(local, now) {
                Ok(()) => Self::register_all(&mut core, ctx),
                Err(e) => Self::violation(ctx, format!("cannot start a new generation: {e}")),
            }
            self.core = Some(core);
        }
        self.key = key;
        self.reborn = true;
        self.rescan = true;
        self.leaving = false;
        self.ready_alone_at = Some(now);
        self.refresh_lease(ctx);
        self.pump(ctx);
    }

    fn on_stop(&mut self, node: &NodeInfo, crashed: bool, shared: &mut TransitionLedger) {
        shared.acting.retire(node.slot);
        let held = shared.drop_process(&self.key);
        if crashed {
            shared.crashed(&self.key, held);
        }
        // Work in this process's memory (parked by the core, or held by
        // the handoff): lost with a crash, handed back to the client by an
        // exit.
        let mut left = Vec::new();
        if let Some(core) = self.core.as_mut() {
            core.drop_parked(DropReason::Shutdown);
            while let Some(out) = core.poll_output(self.now) {
                match out {
                    Output::Dropped { reason, work } => {
                        Self::count_dropped(reason, shared);
                        left.push(work);
                    }
                    Output::Deliver(work) | Output::Forward { work, .. } => left.push(work),
                    _ => {}
                }
            }
            left.extend(core.handoff().held_work().map(|(_, w)| *w));
        }
        for work in left {
            if crashed {
                shared.maybe_lost(work.id);
            } else {
                Self::to_client(work, shared);
            }
        }
        // Work sent and not acknowledged: it may arrive or not.
        for pending in self.sends.values() {
            if let Pending::Work { work, .. } = pending {
                shared.maybe_lost(work.id);
            }
        }
    }
}
