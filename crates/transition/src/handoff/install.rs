//! Installing a view: the new table in force, the old one remembered, each
//! datum whose primary changed set moving, the notices parked for the new
//! view taken out to be confirmed, and the replica-set events.

use super::*;

impl<W> Handoff<W> {
    /// Installs a new placement table (a new view). Every registered datum
    /// whose primary changes starts moving; what was already in flight
    /// carries on under the new view without being relinquished or acquired
    /// twice. Installing the view already in force does nothing.
    pub fn install(&mut self, table: impl Into<Arc<PlacementTable>>, now: Instant) {
        let table = table.into();
        let now = self.clock(now);
        if self.fenced || table.view_id() == self.current.view_id() {
            return;
        }
        self.process_timeouts(now);
        let running = self.transition.filter(|_| !self.is_idle());
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        self.cohorts.push_back(Cohort {
            id: epoch,
            start: now,
            datums: Vec::new(),
        });

        let old = std::mem::replace(&mut self.current, Arc::clone(&table));
        // A node of the new view may acquire again, unless it is gone: a
        // view naming a node this node already knows left or failed is older
        // news than its last word. Done markers for this view that came
        // before it: decided now.
        self.peers
            .on_install(table.view_id(), |n| table.view().contains(n));
        let old_self = self.self_index;
        self.self_index = table.view().index_of_id(&self.local);
        let failed = old
            .view()
            .nodes()
            .iter()
            .map(|n| self.peers.is_failed(n))
            .collect();
        self.seen.insert(old.view_id(), now);
        self.seen.remove(&table.view_id());
        self.history.push_front(PastView {
            table: Arc::clone(&old),
            self_index: old_self,
            left: now,
            left_epoch: epoch,
            failed,
        });
        // The view in force is never "past": drop an older entry of the same id.
        let current_id = table.view_id();
        self.history.retain(|p| p.table.view_id() != current_id);
        self.prune(now);
        self.counters.views += 1;
        self.install_seq = self.install_seq.max(self.heard_epoch) + 1;
        self.peers.clear_notified();
        self.reset_done();

        // Outgoing buffers are per node index of the view in force: their
        // tokens are routed again below.
        self.out.clear();
        self.out.resize_with(table.view().len(), OutBuf::default);

        if old.copies() > 1 || table.copies() > 1 {
            self.replica_events(&old, old_self, &table);
        }

        self.installing = true;
        let me = self.self_index;
        let todo: Vec<Datum> = self
            .registry
            .map
            .iter()
            .filter(|(d, s)| {
                let mine = me.is_some() && table.primary(d.id) == me;
                !matches!(
                    (s.phase(), mine),
                    (Phase::Free, false) | (Phase::Held, true)
                )
            })
            .map(|(d, _)| *d)
            .collect();
        for d in todo {
            self.on_view_change(d, now);
        }
        if self
            .cohorts
            .back()
            .is_some_and(|c| c.id == epoch && c.datums.is_empty())
        {
            self.cohorts.pop_back();
        }

        // Notices that arrived before this view did: each is taken once its
        // sender confirms that it is still at the install it sent it from
        // (`confirm_parked`). What the previous view left unconfirmed is
        // refused.
        self.refuse_unconfirmed(|_, _| true);
        if let Some(parked) = self.parked.remove(&current_id) {
            self.parked_total = self.parked_total.saturating_sub(parked.datums.len());
            let mut report = NoticeReport::default();
            let mut held = Parked {
                first: now,
                datums: HashMap::default(),
                senders: Vec::new(),
            };
            let mut datums: Vec<(Datum, u32)> = parked.datums.into_iter().collect();
            datums.sort_unstable();
            for (d, i) in datums {
                let Some((node, epoch)) = parked.senders.get(i as usize) else {
                    continue;
                };
                if !self.sender_unmoved(node, *epoch) {
                    report.stale += 1;
                    continue;
                }
                held.datums.insert(d, i);
            }
            held.senders = parked.senders;
            self.count_report(&report);
            if !held.datums.is_empty() {
                self.unconfirmed = Some(held);
            }
        }
        self.installing = false;
        if !self.is_busy() {
            self.done_seq = Some(self.install_seq);
        }
        self.announce();
        if !self.missing_done(false, now) {
            self.release_unheld_waits(now, false);
        }
        self.recheck_held();

        if let Some(view) = running {
            self.events.push_back(HandoffEvent::TransitionSuperseded {
                view,
                by: current_id,
            });
        }
        let p = self.progress();
        info!(
            node = %self.local, view = %current_id, nodes = table.view().len(),
            relinquish = p.relinquishing, awaiting = p.awaiting, acquire = p.acquiring,
            "transition started"
        );
        self.events.push_back(HandoffEvent::TransitionStarted {
            view: current_id,
            relinquish: p.relinquishing,
            awaiting: p.awaiting,
            acquire: p.acquiring,
        });
        self.transition = Some(current_id);
        self.check_ended();
    }

    fn replica_events(
        &mut self,
        old: &PlacementTable,
        old_self: Option<NodeIndex>,
        new: &PlacementTable,
    ) {
        let map: Vec<Option<NodeIndex>> = old
            .view()
            .nodes()
            .iter()
            .map(|n| new.view().index_of_id(n))
            .collect();
        let role = |row: &[NodeIndex], me: Option<NodeIndex>| match me
            .and_then(|me| row.iter().position(|&x| x == me))
        {
            Some(0) => Role::Primary,
            Some(_) => Role::Replica,
            None => Role::None,
        };
        let mut datums: Vec<Datum> = self.registry.map.keys().copied().collect();
        datums.sort_unstable();
        for d in datums {
            let old_row = old.owners(d.id);
            let new_row = new.owners(d.id);
            let previous = role(old_row, old_self);
            let current = role(new_row, self.self_index);
            if previous == Role::None && current == Role::None {
                continue;
            }
            let same = old_row.len() == new_row.len()
                && old_row.iter().all(|i| {
                    map.get(i.get())
                        .copied()
                        .flatten()
                        .is_some_and(|j| new_row.contains(&j))
                });
            if !same {
                self.events.push_back(HandoffEvent::ReplicasChanged {
                    datum: d,
                    view: new.view_id(),
                    previous,
                    current,
                });
            }
        }
    }
}
