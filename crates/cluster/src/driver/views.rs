//! Membership to handoff: events and views from the membership task, a
//! rebirth, placement tables installed, handoff events, and what is
//! published to the application (views, transitions, waiters).

use super::*;

impl Driver {
    pub(super) fn on_membership(&mut self, item: FromMembership, now: Instant) {
        match item {
            FromMembership::Event(event) => self.on_membership_event(event, now),
            FromMembership::Local(local) => {
                self.local = local;
                self.view_dirty = true;
            }
            FromMembership::Ack(ack) => {
                // Publish first: the caller that waited reads the view.
                if self.view_dirty {
                    self.publish();
                }
                ack.complete();
            }
            FromMembership::Reborn(local) => self.reborn(local, now),
        }
    }

    /// The membership task started a new generation of this node after the
    /// cluster declared the old one dead: a new handoff state machine for
    /// it, with every datum registered again (it holds none: the others
    /// failed the old generation's datums over). Jobs and sends of the old
    /// machine still running are ignored when they complete.
    pub(super) fn reborn(&mut self, local: Member, now: Instant) {
        let me = NodeId::new(&*local.name, local.generation);
        let handoff = match Handoff::new(me.clone(), self.handoff.config().clone()) {
            Ok(h) => h,
            Err(error) => {
                warn!(node = %self.name, %error, "cannot start the new generation's handoff");
                return;
            }
        };
        let old = std::mem::replace(&mut self.handoff, handoff);
        // The cluster as the old generation last saw it: with it as its
        // first view, the new generation knows who held what, and waits for
        // their notices instead of taking datums as their first owner.
        //
        // The old generation failed, and this node knows it for certain: it
        // was fenced in this process just before (`DeclaredFailed` comes
        // first), so it will neither send a notice nor a done marker, and
        // every job it still has running completes unheard under a token
        // the new generation's exceeds. Its datums are failed over here as
        // the other members fail them over (it is their failed member too):
        // a datum this generation is primary of is taken once every live
        // member and every node of the recent views has said done with the
        // view in force, instead of after the transition timeout, which a
        // departure that is not a failure (`peer_left`) would wait for.
        // (The new handoff has standing at its creation: the lease read at
        // the next pump only gates what it does from then on.)
        let old_me = old.local().clone();
        self.handoff.observe_epoch(old.epoch());
        self.handoff.install(Arc::clone(old.table()), now);
        self.handoff.peer_failed(&old_me, now);
        self.unresolved = old
            .table()
            .view()
            .nodes()
            .iter()
            .filter(|n| **n != old_me)
            .take(MAX_UNRESOLVED)
            .cloned()
            .collect();
        for name in self.factories.keys() {
            if let Ok(ty) = self.handoff.datum_type(name) {
                self.handoff.set_on_demand(ty, true);
            }
        }
        let datums = std::mem::take(&mut self.datums);
        for (_, datum) in datums {
            let Ok(ty) = self.handoff.datum_type(datum.type_name()) else {
                continue;
            };
            let d = Datum::new(ty, datum.id());
            if self.handoff.register(d, now).is_ok() {
                self.datums.insert(d, datum);
            }
        }
        drop(old);
        info!(node = %self.name, generation = local.generation, datums = self.datums.len(),
            "new generation: handoff restarted");
        self.instance += 1;
        // The old machine's sends are ignored when they complete.
        self.sends.clear();
        self.me = me;
        self.local = local;
        self.members.clear();
        self.latest = None;
        self.fenced = false;
        self.report_base = Counters::default();
        self.view_dirty = true;
    }

    pub(super) fn on_membership_event(&mut self, event: MEvent, now: Instant) {
        match event {
            MEvent::Joined(m) | MEvent::Updated(m) | MEvent::Alive(m) => {
                debug!(node = %self.name, member = %m.name, state = ?m.state, ready = m.ready, "member");
                self.view_dirty = true;
            }
            MEvent::Suspected(m) => {
                info!(node = %self.name, member = %m.name, "member suspected");
                self.view_dirty = true;
            }
            MEvent::Failed(m) => {
                warn!(node = %self.name, member = %m.name, generation = m.generation, "member failed");
                metrics::counter!("shoal_members_failed_total").increment(1);
                if *m.name != *self.name || m.generation != self.me.generation {
                    let id = NodeId::new(&*m.name, m.generation);
                    self.abort_sends_to(&id, now);
                    if !self.handoff.has_standing() {
                        // Not failed over here (see `Handoff::peer_failed`)
                        // unless a newer generation shows it is gone.
                        if self.unresolved.len() >= MAX_UNRESOLVED {
                            self.unresolved.pop_front();
                        }
                        self.unresolved.push_back(id.clone());
                    }
                    self.handoff.peer_failed(&id, now);
                    self.links.remove(&m.addr);
                }
                self.view_dirty = true;
            }
            MEvent::Left(m) => {
                info!(node = %self.name, member = %m.name, "member left");
                if *m.name != *self.name || m.generation != self.me.generation {
                    let id = NodeId::new(&*m.name, m.generation);
                    self.handoff.peer_left(&id, now);
                    self.links.remove(&m.addr);
                }
                self.view_dirty = true;
            }
            MEvent::NameConflict {
                name, local_lost, ..
            } => {
                warn!(node = %self.name, %name, local_lost, "two processes claim one name");
            }
            MEvent::ViewChanged(members) => {
                // Every live member, ready or not, says done before a datum
                // is taken without its notice: two nodes made ready at once
                // each wait for the other instead of both acquiring.
                let peers: Vec<NodeId> = members
                    .iter()
                    .map(|m| NodeId::new(&*m.name, m.generation))
                    .collect();
                self.handoff.set_peers(peers.iter(), now);
                let members: HashMap<Arc<str>, Member> = members
                    .into_iter()
                    .map(|m| (Arc::clone(&m.name), m))
                    .collect();
                self.departed.retain(|name, at| {
                    !members.contains_key(name) && now.duration_since(*at) < DEPARTED_GRACE
                });
                for name in self.members.keys().filter(|n| !members.contains_key(*n)) {
                    self.departed.insert(Arc::clone(name), now);
                }
                self.members = members;
                if !self.unresolved.is_empty() {
                    let members = &self.members;
                    let (gone, keep): (Vec<NodeId>, Vec<NodeId>) =
                        std::mem::take(&mut self.unresolved)
                            .into_iter()
                            .partition(|n| {
                                members
                                    .get(&*n.name)
                                    .is_some_and(|m| m.generation > n.generation)
                            });
                    self.unresolved = keep.into();
                    for n in gone {
                        info!(node = %self.name, peer = %n, "superseded by a newer generation: failed over");
                        self.handoff.peer_superseded(&n, now);
                    }
                }
                // A node that refused is forgotten once it left the view.
                let members = &self.members;
                self.refusing.retain(|n| {
                    members
                        .get(&*n.name)
                        .is_some_and(|m| m.generation == n.generation)
                });
                self.on_view(now);
            }
            // Not consulted yet: the lease is wired into ownership separately.
            MEvent::StandingChanged(_) => {}
            MEvent::DeclaredFailed => {
                warn!(node = %self.name, "the cluster declared this node failed: fencing");
                metrics::counter!("shoal_fenced_total").increment(1);
                self.handoff.fence(now);
                self.fenced = true;
                // The membership task has marked this node not ready.
                self.view_dirty = true;
            }
        }
    }

    /// Stops the notice sends in flight to `node`, declared failed, and
    /// reports each failed: the handoff routes their notices again after
    /// its backoff, to the primary in force. Safe as a request timeout is:
    /// a batch the dead generation took before it was fenced gives it
    /// nothing to act on (it acquires nothing without its lease, which
    /// lapsed before the verdict reached this node through the takeover
    /// gate).
    pub(super) fn abort_sends_to(&mut self, node: &NodeId, now: Instant) {
        let ids: Vec<SendId> = self
            .sends
            .iter()
            .filter(|(_, (to, _))| to == node)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some((_, task)) = self.sends.remove(&id) {
                task.abort();
                self.handoff
                    .send_done(id, Err(format!("{node} was declared failed")), now);
            }
        }
    }

    pub(super) fn ready_view(&self) -> View {
        View::new(
            self.members
                .values()
                .map(|m| shoal_placement::ViewMember::new(&*m.name, m.generation, m.ready)),
        )
    }

    pub(super) fn on_view(&mut self, now: Instant) {
        self.view_dirty = true;
        let view = self.ready_view();
        if self
            .latest
            .as_ref()
            .is_some_and(|t| t.view_id() == view.id())
        {
            return;
        }
        match PlacementTable::build(view, &self.config.strategy, self.config.copies) {
            Ok(table) => {
                let table = Arc::new(table);
                self.latest = Some(Arc::clone(&table));
                if self.config.transition == TransitionMode::Auto {
                    self.install(table, now);
                }
            }
            Err(error) => warn!(node = %self.name, %error, "placement table refused"),
        }
    }

    pub(super) fn install(&mut self, table: Arc<PlacementTable>, now: Instant) {
        if table.view_id() == self.handoff.view_id() {
            return;
        }
        if self.handoff.is_idle() {
            self.report_base = self.handoff.counters().clone();
        }
        info!(node = %self.name, view = %table.view_id(), nodes = table.view().len(), "installing placement");
        // Installing walks every registered datum: a few hundred
        // milliseconds for a million. On a multi-threaded runtime, let the
        // other tasks of this worker (the membership task among them) move
        // to another thread meanwhile, so probes are still answered.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread && self.datums.len() >= BLOCKING_INSTALL_DATUMS {
            tokio::task::block_in_place(|| self.handoff.install(table, now));
        } else {
            self.handoff.install(table, now);
        }
        metrics::counter!("shoal_views_installed_total").increment(1);
        self.reroute_parked(now, true);
        self.view_dirty = true;
    }

    pub(super) fn handle_events(&mut self, now: Instant) {
        while let Some(event) = self.handoff.poll_event() {
            if let (Some(given_up), HandoffEvent::RelinquishFailed { datum, .. }) =
                (&mut self.leaving, &event)
                && self.handoff.give_up_relinquish(*datum, now)
            {
                warn!(node = %self.name, datum = %datum, "leaving: relinquish failed, given up");
                given_up.push(*datum);
            }
            self.on_handoff_event(event);
        }
    }

    pub(super) fn on_handoff_event(&mut self, event: HandoffEvent) {
        match &event {
            HandoffEvent::TransitionStarted {
                view,
                relinquish,
                awaiting,
                acquire,
            } => {
                info!(node = %self.name, %view, relinquish, awaiting, acquire, "transition started");
                metrics::counter!("shoal_transitions_total").increment(1);
            }
            HandoffEvent::TransitionEnded { view } => {
                let p = self.handoff.progress();
                info!(node = %self.name, %view, held = p.held, "transition ended");
                metrics::gauge!("shoal_datums_owned").set(p.held as f64);
            }
            HandoffEvent::RelinquishFailed { .. } | HandoffEvent::AcquireFailed { .. } => {
                warn!(node = %self.name, ?event, "handoff job failed");
                metrics::counter!("shoal_job_failures_total").increment(1);
            }
            HandoffEvent::RelinquishAbandoned { .. } | HandoffEvent::Fenced { .. } => {
                warn!(node = %self.name, ?event, "handoff");
            }
            HandoffEvent::AcquiredWithoutNotice { .. } => {
                debug!(node = %self.name, ?event, "handoff");
                metrics::counter!("shoal_acquired_without_notice_total").increment(1);
            }
            HandoffEvent::TransitionSuperseded { .. } | HandoffEvent::ReplicasChanged { .. } => {
                debug!(node = %self.name, ?event, "handoff");
            }
        }
    }

    pub(super) fn finish_waiters(&mut self, now: Instant) {
        if !self.waiters.is_empty() {
            let idle = self.handoff.is_idle();
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
    }

    pub(super) fn report(&self) -> TransitionReport {
        let c = self.handoff.counters();
        let b = &self.report_base;
        let p = self.handoff.progress();
        // `awaiting()` walks the whole registry: stop once every awaiting
        // datum was seen (none, once the handoff is over), or a progress
        // poll on a node of a million datums costs a full scan each time.
        let awaiting = self
            .handoff
            .awaiting()
            .take(p.awaiting.min(64))
            .map(|d| {
                let ty = self.handoff.type_name(d.ty).unwrap_or("?").to_owned();
                (ty, d.id)
            })
            .collect();
        TransitionReport {
            view: p.view,
            completed: self.handoff.is_idle(),
            relinquished: c.relinquished.saturating_sub(b.relinquished),
            acquired: c.acquired.saturating_sub(b.acquired),
            acquired_without_notice: (c.acquired_after_timeout
                + c.acquired_owner_gone
                + c.acquired_all_done)
                .saturating_sub(
                    b.acquired_after_timeout + b.acquired_owner_gone + b.acquired_all_done,
                ),
            relinquish_failures: c.relinquish_failures.saturating_sub(b.relinquish_failures),
            acquire_failures: c.acquire_failures.saturating_sub(b.acquire_failures),
            relinquish_abandoned: c
                .relinquish_abandoned
                .saturating_sub(b.relinquish_abandoned),
            in_flight: p.in_flight,
            awaiting,
        }
    }

    pub(super) fn publish(&mut self) {
        self.view_dirty = false;
        self.published_settled = self.handoff.is_settled();
        self.version += 1;
        let mut members: Vec<NodeInfo> = self.members.values().map(NodeInfo::from_member).collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        metrics::gauge!("shoal_members_live").set(members.len() as f64);
        let view = ClusterView {
            local: NodeInfo::from_member(&self.local),
            members,
            ready: self.ready_view(),
            placement: Arc::clone(self.handoff.table()),
            version: self.version,
            fenced: self.fenced,
            standing: self.handoff.has_standing(),
            settled: self.published_settled,
        };
        self.view_tx.send_replace(Arc::new(view));
    }
}
