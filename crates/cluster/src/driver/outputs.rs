//! The core's outputs carried out: deliveries to the application's
//! channels, forwards and notice batches to peers, answers, and the view
//! published to API handles.

use super::*;

impl Driver {
    /// Carries out the core's outputs.
    pub(super) fn carry_out(&mut self, now: Instant) {
        while let Some(output) = self.core.poll_output(now) {
            match output {
                Output::Handoff(event) => handoff_metrics(&event, &self.core),
                Output::Deliver(routed) => self.deliver_local(routed),
                Output::Forward {
                    to,
                    addr,
                    work,
                    acknowledged,
                } => self.forward(to, addr, work, acknowledged, now),
                Output::SendNotices {
                    instance,
                    id,
                    to,
                    addr,
                    batch,
                } => self.send_notices(instance, id, &to, addr, batch.encode()),
                Output::CancelNotices(id) => {
                    if let Some(task) = self.sends.remove(&id) {
                        task.abort();
                    }
                }
                Output::AnswerNotices {
                    reply: (reply, _held),
                    accepted,
                } => answer(reply, accepted),
                Output::Dropped { reason, .. } => counts::dropped_metric(reason, 1),
                Output::PeerGone(addr) => {
                    self.links.remove(&addr);
                    self.dests.remove(&addr);
                }
            }
        }
    }

    fn deliver_local(&mut self, routed: Routed) {
        let Some(tx) = self.channels.sender(routed.channel) else {
            self.counts.dropped(DropReason::UnknownChannel, 1);
            return;
        };
        let delivery = Delivery {
            from: Arc::from(routed.origin),
            datum: Some((Arc::from(routed.datum_type), routed.id)),
            payload: routed.payload,
        };
        self.push(Pending::Local(tx, delivery));
    }

    fn forward(
        &mut self,
        to: NodeId,
        addr: SocketAddr,
        routed: Routed,
        acknowledged: bool,
        now: Instant,
    ) {
        let Some(dest) = self.dest(&to, addr) else {
            self.counts.dropped(DropReason::UnknownOwner, 1);
            if acknowledged {
                let outcome = ForwardOutcome::Failed("invalid name".into());
                self.core.forward_done(to, routed, outcome, now);
            }
            return;
        };
        if !acknowledged {
            // The encoded copy keeps the payload it was made from, so a
            // message from a peer keeps its inbound budget while it waits.
            let body = queues::holding(routed.encode(), routed.payload.clone());
            self.push(Pending::Peer(addr, Out::Message(dest, CH_ROUTED, body)));
            return;
        }
        // Leaving: the owner answers once it took the message, so this node
        // knows nothing is lost when it stops.
        let transport = self.transport.clone();
        let tx = self.done_tx.clone();
        tokio::spawn(async move {
            let answer = transport
                .request(&dest, CH_ROUTED, routed.encode(), REQUEST_TIMEOUT)
                .await;
            let outcome = match answer {
                Ok(b) if &b[..] == wire::ROUTED_TAKEN => ForwardOutcome::Taken,
                Ok(b) if &b[..] == wire::ROUTED_REFUSED => ForwardOutcome::Refused,
                Ok(_) => ForwardOutcome::Failed(format!("{dest} answered nonsense")),
                Err(e) => ForwardOutcome::Failed(e.to_string()),
            };
            let _ = tx.send(Done::Forward(to, routed, outcome)).await;
        });
    }

    /// The transport's address of node `to` at `addr`, kept per address
    /// (a forward per message would otherwise check and copy the name).
    fn dest(&mut self, to: &NodeId, addr: SocketAddr) -> Option<Dest> {
        if let Some(dest) = self.dests.get(&addr)
            && dest.name.as_ref().is_some_and(|n| n.as_str() == to.name)
        {
            return Some(dest.clone());
        }
        let dest = Dest::node(NodeName::new(&to.name).ok()?, addr);
        self.dests.insert(addr, dest.clone());
        Some(dest)
    }

    fn send_notices(
        &mut self,
        instance: u64,
        id: SendId,
        to: &NodeId,
        addr: SocketAddr,
        body: Vec<u8>,
    ) {
        let Some(dest) = self.dest(to, addr) else {
            let error = Err(format!("{to} has an invalid name"));
            self.core.send_done(instance, id, error, Instant::now());
            return;
        };
        let transport = self.transport.clone();
        let tx = self.done_tx.clone();
        let task = tokio::spawn(async move {
            let answer = transport
                .request(&dest, CH_NOTICES, Bytes::from(body), REQUEST_TIMEOUT)
                .await;
            let result = match answer {
                Ok(b) if &b[..] == wire::NOTICE_ACK => Ok(()),
                Ok(_) => Err(format!("{dest} refused the notices")),
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(Done::Send(instance, id, result)).await;
        });
        self.sends.insert(id, task.abort_handle());
    }

    pub(super) fn publish(&mut self) {
        self.version += 1;
        let mut members: Vec<NodeInfo> = self.core.members().map(NodeInfo::from_member).collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        let handoff = self.core.handoff();
        metrics::gauge!("shoal_members_live").set(members.len() as f64);
        metrics::gauge!("shoal_standing").set(if handoff.has_standing() { 1.0 } else { 0.0 });
        let view = ClusterView {
            local: NodeInfo::from_member(self.core.local()),
            members,
            ready: self.core.ready_view(),
            placement: Arc::clone(handoff.table()),
            version: self.version,
            fenced: self.core.is_fenced(),
            standing: handoff.has_standing(),
            settled: handoff.is_settled(),
        };
        self.view_tx.send_replace(Arc::new(view));
    }
}
/// The metrics of a handoff event (the core logs it).
fn handoff_metrics(event: &HandoffEvent, core: &Core) {
    match event {
        HandoffEvent::TransitionStarted { .. } => {
            metrics::counter!("shoal_transitions_total").increment(1);
        }
        HandoffEvent::TransitionEnded { .. } => {
            let held = core.handoff().progress().held;
            metrics::gauge!("shoal_datums_owned").set(held as f64);
        }
        HandoffEvent::RelinquishFailed { .. } | HandoffEvent::AcquireFailed { .. } => {
            metrics::counter!("shoal_job_failures_total").increment(1);
        }
        HandoffEvent::AcquiredWithoutNotice { .. } => {
            metrics::counter!("shoal_acquired_without_notice_total").increment(1);
        }
        _ => {}
    }
}
