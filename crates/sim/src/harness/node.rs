//! The harness as a driver of each node's core: events in, jobs and
//! outputs out, onto the virtual network and into the ledger.

use std::time::Duration;

use rand::Rng;
use shoal_core::{DropReason, Output};
use shoal_membership::{Event, MemberState};
use shoal_placement::NodeId;
use shoal_transition::{Datum, HandoffEvent, Job, JobKind};

use super::{Ev, Fate, Harness, HarnessWork, Message, Payload, between};

impl Harness {
    pub(super) fn step(&mut self, ev: Ev) {
        let at = self.at();
        match ev {
            Ev::View { node, seq } => {
                if !self.live(node) {
                    return;
                }
                if let Some(s) = self.nodes.get_mut(node) {
                    if s.installed >= seq {
                        return;
                    }
                    s.installed = seq;
                }
                if let Some(t) = self.cfg.trace {
                    let ready = self.views.get(seq).cloned().unwrap_or_default();
                    self.trace(t, || {
                        format!("node {node} sees view #{seq}, ready {ready:?}")
                    });
                }
                self.feed_view(node);
                self.pump(node);
            }
            Ev::Deliver(msg) => self.deliver(msg),
            Ev::SendOutcome {
                node,
                instance,
                id,
                ok,
            } => {
                if !self.live(node) {
                    return;
                }
                if let Some(s) = self.nodes.get_mut(node) {
                    let outcome = if ok {
                        Ok(())
                    } else {
                        Err("send failed".into())
                    };
                    s.core.send_done(instance, id, outcome, at);
                }
                self.pump(node);
            }
            Ev::WorkFailed { node, item } => {
                if self.live(node) {
                    if let Some(s) = self.nodes.get_mut(node) {
                        s.core.route_again(item, at);
                    }
                    self.pump(node);
                } else {
                    self.reinject(item);
                }
            }
            Ev::JobDone {
                node,
                instance,
                job,
                ok,
            } => self.job_done(node, instance, job, ok),
            Ev::PeerGone { node, peer, left } => {
                if !self.live(node) {
                    return;
                }
                let Some(mut member) = self.nodes.get(peer).map(|s| s.member.clone()) else {
                    return;
                };
                if let Some(t) = self.cfg.trace {
                    self.trace(t, || {
                        format!("node {node} learns n{peer} gone (left={left})")
                    });
                }
                member.state = if left {
                    MemberState::Left
                } else {
                    MemberState::Dead
                };
                let event = if left {
                    Event::Left(member)
                } else {
                    Event::Failed(member)
                };
                if let Some(s) = self.nodes.get_mut(node) {
                    s.gone.insert(peer);
                    s.core.handle_membership(event, at);
                }
                // Then the view without it.
                self.feed_view(node);
                self.pump(node);
            }
            Ev::Fence { node } => self.fence(node),
            Ev::Timer { node } => {
                if !self.live(node) {
                    return;
                }
                if let Some(s) = self.nodes.get_mut(node) {
                    s.timer = None;
                    s.core.handle_timeout(at);
                }
                self.pump(node);
            }
            Ev::Route { node, item } => {
                if self.live(node) {
                    self.trace(item.datum, || {
                        format!("work {} sent to node {node}", item.id)
                    });
                    if let Some(s) = self.nodes.get_mut(node) {
                        s.core.route_local(item, at);
                    }
                    self.pump(node);
                } else {
                    self.reinject(item);
                }
            }
            Ev::Inject => {
                if !self.work_on {
                    return;
                }
                if let Some(every) = self.cfg.work_every {
                    let datum = self.rng.random_range(0..self.cfg.datums.max(1));
                    let item = HarnessWork {
                        id: self.next_item,
                        datum,
                        hops: 0,
                        sends: 0,
                    };
                    self.next_item += 1;
                    self.check.issue(item.id, item.datum);
                    self.stats.work += 1;
                    self.reinject(item);
                    let d = between(&mut self.rng, (Duration::ZERO, every * 2));
                    self.schedule(d, Ev::Inject);
                }
            }
        }
    }

    /// The cluster's verdict reaches node `n`: it fences itself, hands the
    /// work it kept back to the clients, and does nothing more.
    fn fence(&mut self, n: usize) {
        if !self.live(n) {
            return;
        }
        let at = self.at();
        let mut outputs = Vec::new();
        if let Some(s) = self.nodes.get_mut(n) {
            s.core.handle_membership(Event::DeclaredFailed, at);
            match s.core.poll_output(at) {
                Some(Output::Handoff(HandoffEvent::Fenced { .. })) => {}
                other => {
                    let what = format!("node {n}: first output after the fence is {other:?}");
                    self.check.violation(self.now, what);
                    outputs.extend(other);
                }
            }
            // Work routed again after the fence is refused: parked, then
            // dropped here and sent again by its client.
            s.core.drop_parked(DropReason::Fenced);
            while let Some(o) = s.core.poll_output(at) {
                outputs.push(o);
            }
        }
        self.trace_all(|| format!("node {n} fenced"));
        for o in outputs {
            self.on_output(n, o);
        }
        self.check.drop_process(&n);
        self.fail_unanswered(n);
    }

    /// Node `n` stops (a crash, or a leaver done): the work in its memory
    /// is maybe lost (a crash) or handed back to the clients (a leave);
    /// the notice requests it did not answer fail at their senders.
    pub(super) fn stop(&mut self, n: usize, crashed: bool) {
        let at = self.at();
        let Some(s) = self.nodes.get_mut(n) else {
            return;
        };
        let mut kept: Vec<HarnessWork> = s
            .core
            .handoff()
            .held_work()
            .map(|(_, w)| w.clone())
            .collect();
        s.core.drop_parked(DropReason::Shutdown);
        while let Some(o) = s.core.poll_output(at) {
            if let Output::Dropped { work, .. }
            | Output::Deliver(work)
            | Output::Forward { work, .. } = o
            {
                kept.push(work);
            }
        }
        s.alive = false;
        s.leaving = false;
        self.check.drop_process(&n);
        for item in kept {
            if crashed {
                self.check.maybe_lost(item.id);
            } else {
                self.reinject(item);
            }
        }
        self.fail_unanswered(n);
    }

    /// The notice requests node `n` took and will never answer fail at
    /// their senders (the connection is gone).
    fn fail_unanswered(&mut self, n: usize) {
        let replies = self
            .nodes
            .get_mut(n)
            .map(|s| std::mem::take(&mut s.unanswered))
            .unwrap_or_default();
        for r in replies {
            self.schedule(
                Duration::ZERO,
                Ev::SendOutcome {
                    node: r.from,
                    instance: r.instance,
                    id: r.id,
                    ok: false,
                },
            );
        }
    }

    /// Work arrives at a random live node (a client sending or retrying).
    pub(super) fn reinject(&mut self, mut item: HarnessWork) {
        item.hops = 0;
        item.sends = 0;
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&n| self.live(n)).collect();
        if live.is_empty() {
            self.check.maybe_lost(item.id);
            return;
        }
        let n = live
            .get(self.rng.random_range(0..live.len()))
            .copied()
            .unwrap_or(0);
        let d = between(&mut self.rng, self.cfg.net_delay);
        self.schedule(d, Ev::Route { node: n, item });
    }

    fn forward(&mut self, from: usize, to: &NodeId, mut item: HarnessWork) {
        item.sends += 1;
        self.trace(item.datum, || {
            format!("work {} forwarded by node {from} to {to}", item.id)
        });
        if item.sends > 1_000 {
            let what = format!("work {} forwarded 1000 times", item.id);
            self.check.violation(self.now, what);
            self.check.maybe_lost(item.id);
            return;
        }
        let Some(to) = self.index_of(to) else {
            self.schedule(
                Duration::from_millis(1),
                Ev::WorkFailed { node: from, item },
            );
            return;
        };
        let msg = Message {
            from,
            to,
            payload: Payload::Work(item),
        };
        self.send(msg);
    }

    fn fate(&mut self) -> Fate {
        let delay = between(&mut self.rng, self.cfg.net_delay);
        let failure = self.cfg.send_failure;
        let lost_ack = self.cfg.lost_ack;
        if failure > 0.0 && self.rng.random_bool(failure.min(1.0)) {
            Fate::Fails(delay)
        } else if lost_ack > 0.0 && self.rng.random_bool(lost_ack.min(1.0)) {
            Fate::ArrivesAckLost(delay)
        } else {
            Fate::Arrives(delay)
        }
    }

    fn send(&mut self, mut msg: Message) {
        match self.fate() {
            Fate::Arrives(d) => self.schedule(d, Ev::Deliver(msg)),
            Fate::ArrivesAckLost(d) => {
                if let Payload::Notices { ack_lost, .. } = &mut msg.payload {
                    *ack_lost = true;
                    self.stats.failed_sends += 1;
                }
                self.schedule(d, Ev::Deliver(msg));
            }
            Fate::Fails(d) => match msg.payload {
                Payload::Notices { instance, id, .. } => {
                    self.stats.failed_sends += 1;
                    self.schedule(
                        d,
                        Ev::SendOutcome {
                            node: msg.from,
                            instance,
                            id,
                            ok: false,
                        },
                    );
                }
                Payload::Work(item) => self.schedule(
                    d,
                    Ev::WorkFailed {
                        node: msg.from,
                        item,
                    },
                ),
            },
        }
    }

    fn deliver(&mut self, msg: Message) {
        let at = self.at();
        let receiver_up = self.live(msg.to);
        let sender = self
            .nodes
            .get(msg.from)
            .map(|s| s.member.name.clone())
            .unwrap_or_default();
        match msg.payload {
            Payload::Notices {
                bytes,
                instance,
                id,
                ack_lost,
            } => {
                if !receiver_up {
                    // The transport tells the sender.
                    self.schedule(
                        Duration::ZERO,
                        Ev::SendOutcome {
                            node: msg.from,
                            instance,
                            id,
                            ok: false,
                        },
                    );
                    return;
                }
                let reply = super::NoticeReply {
                    from: msg.from,
                    instance,
                    id,
                    ack_lost,
                };
                self.stats.batches += 1;
                if let Some(s) = self.nodes.get_mut(msg.to) {
                    s.unanswered.push(reply);
                    s.core.handle_notices(&sender, &bytes, reply, at);
                }
                self.pump(msg.to);
            }
            Payload::Work(item) => {
                if receiver_up {
                    if let Some(s) = self.nodes.get_mut(msg.to) {
                        s.core.route_from_peer(item, &sender, at);
                    }
                    self.pump(msg.to);
                } else {
                    self.schedule(
                        Duration::ZERO,
                        Ev::WorkFailed {
                            node: msg.from,
                            item,
                        },
                    );
                }
            }
        }
    }

    fn job_done(&mut self, n: usize, instance: u64, job: Job, ok: bool) {
        if !self.live(n) {
            return;
        }
        let at = self.at();
        self.trace(job.datum.id, || {
            format!("node {n} {:?} #{} done ok={ok}", job.kind, job.attempt)
        });
        match (job.kind, ok) {
            // The relinquished state is durable: the node stops holding.
            (JobKind::Relinquish, true) => self.check.stop_holding(&n, job.datum.id),
            // A failed acquire leaves the datum not acquired (for now).
            (JobKind::Acquire, false) => self.check.stop_holding(&n, job.datum.id),
            _ => {}
        }
        let outcome = if ok {
            Ok(())
        } else {
            Err("simulated failure".to_owned())
        };
        if let Some(s) = self.nodes.get_mut(n) {
            s.core.job_done(instance, job, outcome, at);
        }
        self.pump(n);
    }

    /// Runs node `n`'s jobs and carries out its outputs until it has none,
    /// then wakes it at its next deadline.
    pub(super) fn pump(&mut self, n: usize) {
        let at = self.at();
        loop {
            if !self.live(n) {
                return;
            }
            let Some(s) = self.nodes.get_mut(n) else {
                return;
            };
            let instance = s.core.instance();
            let mut jobs = Vec::new();
            while let Some(job) = s.core.poll_job() {
                jobs.push(job);
            }
            let mut outputs = Vec::new();
            while let Some(o) = s.core.poll_output(at) {
                outputs.push(o);
            }
            if jobs.is_empty() && outputs.is_empty() {
                break;
            }
            for job in jobs {
                self.trace(job.datum.id, || {
                    format!("node {n} starts {:?} #{}", job.kind, job.attempt)
                });
                if job.kind == JobKind::Acquire {
                    self.check.start_holding(&n, job.datum.id, self.now);
                }
                let d = between(&mut self.rng, self.cfg.job_time);
                let failure = self.cfg.job_failure;
                let ok = !(failure > 0.0 && self.rng.random_bool(failure));
                self.schedule(
                    d,
                    Ev::JobDone {
                        node: n,
                        instance,
                        job,
                        ok,
                    },
                );
            }
            for o in outputs {
                self.on_output(n, o);
            }
        }
        // Wake the node at its next deadline.
        let now = self.now;
        let base = self.base;
        let Some(s) = self.nodes.get_mut(n) else {
            return;
        };
        if let Some(t) = s.core.poll_timeout() {
            let t = t.saturating_duration_since(base).max(now);
            if s.timer.is_none_or(|cur| t < cur) {
                s.timer = Some(t);
                self.schedule(t - now, Ev::Timer { node: n });
            }
        }
    }

    fn on_output(&mut self, n: usize, o: Output<HarnessWork, super::NoticeReply>) {
        match o {
            Output::Handoff(e) => self.on_event(n, e),
            Output::Deliver(item) => {
                self.trace(item.datum, || {
                    format!("work {} processed at node {n}", item.id)
                });
                self.check.process(&n, item.id, item.datum, self.now);
            }
            Output::Forward { to, work, .. } => self.forward(n, &to, work),
            Output::SendNotices {
                instance,
                id,
                to,
                batch,
                ..
            } => {
                if let Some(t) = self.cfg.trace
                    && (batch.done || batch.groups.iter().any(|g| g.ids.contains(&t)))
                {
                    self.trace(t, || {
                        format!(
                            "node {n} sends notices to {to}: view {} done {}",
                            batch.view, batch.done
                        )
                    });
                }
                match self.index_of(&to) {
                    Some(to) => self.send(Message {
                        from: n,
                        to,
                        payload: Payload::Notices {
                            bytes: batch.encode(),
                            instance,
                            id,
                            ack_lost: false,
                        },
                    }),
                    None => self.schedule(
                        Duration::ZERO,
                        Ev::SendOutcome {
                            node: n,
                            instance,
                            id,
                            ok: false,
                        },
                    ),
                }
            }
            Output::AnswerNotices { reply, accepted } => {
                if let Some(s) = self.nodes.get_mut(n) {
                    s.unanswered.retain(|r| *r != reply);
                }
                if !accepted {
                    // A node the cluster declared failed may still send
                    // before its verdict reaches it; a node that started
                    // since never knew it as a member and refuses.
                    let declared = self.nodes.get(reply.from).is_some_and(|s| s.declared);
                    if declared {
                        self.stats.refused_from_declared += 1;
                    } else {
                        let what =
                            format!("node {n}: notice batch from node {} refused", reply.from);
                        self.check.violation(self.now, what);
                    }
                }
                self.schedule(
                    Duration::ZERO,
                    Ev::SendOutcome {
                        node: reply.from,
                        instance: reply.instance,
                        id: reply.id,
                        ok: accepted && !reply.ack_lost,
                    },
                );
            }
            Output::Dropped { reason, work } => {
                self.trace(work.datum, || {
                    format!("work {} dropped at node {n}: {}", work.id, reason.name())
                });
                *self.stats.dropped.entry(reason.name()).or_default() += 1;
                self.reinject(work);
            }
            Output::CancelNotices(_) | Output::PeerGone(_) => {}
        }
    }

    fn on_event(&mut self, n: usize, e: HandoffEvent) {
        if let Some(t) = self.cfg.trace {
            let about = match &e {
                HandoffEvent::RelinquishFailed { datum, .. }
                | HandoffEvent::RelinquishAbandoned { datum }
                | HandoffEvent::AcquireFailed { datum, .. }
                | HandoffEvent::AcquiredWithoutNotice { datum, .. } => datum.id == t,
                HandoffEvent::Fenced { .. } => true,
                _ => false,
            };
            if about {
                self.trace(t, || format!("node {n} event {e:?}"));
            }
        }
        match e {
            HandoffEvent::RelinquishAbandoned { datum } => {
                self.stats.abandoned += 1;
                self.check.stop_holding(&n, datum.id);
            }
            // Given up, yet held: the application processes the datum
            // anyway, it holds it.
            HandoffEvent::AcquireFailed {
                datum,
                retry: false,
                ..
            } if self.is_held(n, datum) => {
                self.check.start_holding(&n, datum.id, self.now);
            }
            HandoffEvent::AcquiredWithoutNotice { .. } => self.stats.acquired_without_notice += 1,
            HandoffEvent::Fenced { .. } => {
                self.check.drop_process(&n);
            }
            HandoffEvent::TransitionStarted { .. } => {
                if let Some(s) = self.nodes.get_mut(n) {
                    s.transition_running = true;
                }
            }
            HandoffEvent::TransitionEnded { .. } => {
                if let Some(s) = self.nodes.get_mut(n) {
                    s.transition_running = false;
                }
            }
            _ => {}
        }
    }

    /// Whether node `n`'s handoff holds `datum`.
    pub(super) fn is_held(&self, n: usize, datum: Datum) -> bool {
        self.nodes
            .get(n)
            .is_some_and(|s| s.core.handoff().is_held(datum))
    }

    fn trace_all(&self, what: impl FnOnce() -> String) {
        if let Some(t) = self.cfg.trace {
            self.trace(t, what);
        }
    }
}
