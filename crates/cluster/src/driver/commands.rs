//! The application's commands: registration (and datums made on demand),
//! sends, holds, snapshots.

use super::*;

impl Driver {
    pub(super) fn on_command(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::Register(batch, tx) => {
                let _ = tx.send(self.register(batch, now));
            }
            Command::RegisterFactory(name, factory, tx) => {
                let result = self
                    .handoff
                    .datum_type(&name)
                    .map(|ty| {
                        self.handoff.set_on_demand(ty, true);
                        self.factories.insert(name, factory);
                    })
                    .map_err(Error::from);
                let _ = tx.send(result);
            }
            Command::Unregister(ty, ids, tx) => {
                let mut count = 0;
                if let Some(ty) = self.handoff.lookup_type(&ty) {
                    for id in ids {
                        let datum = Datum::new(ty, id);
                        self.datums.remove(&datum);
                        if self.handoff.unregister(datum, now) {
                            count += 1;
                        }
                    }
                }
                let _ = tx.send(count);
            }
            Command::Transition {
                install,
                deadline,
                tx,
            } => {
                if install {
                    if let Some(table) = self.latest.clone() {
                        self.install(table, now);
                    }
                    self.drain_handoff(now);
                }
                self.waiters.push(Waiter { deadline, tx });
            }
            Command::Progress(tx) => {
                let _ = tx.send(self.report());
            }
            Command::BeginLeave(tx) => {
                self.leaving.get_or_insert_with(Vec::new);
                let _ = tx.send(());
            }
            Command::Leave { deadline, tx } => {
                if let Some(table) = self.latest.clone() {
                    self.install(table, now);
                }
                self.drain_handoff(now);
                self.waiters.push(Waiter { deadline, tx });
            }
            Command::GiveUp(tx) => {
                let mut given_up = self.leaving.take().unwrap_or_default();
                given_up.extend(self.handoff.give_up_relinquishes(now));
                // The done markers (farewells) go out now.
                self.drain_handoff(now);
                let names = given_up
                    .iter()
                    .map(|d| {
                        let ty = self.handoff.type_name(d.ty).unwrap_or("?").to_owned();
                        (ty, d.id)
                    })
                    .collect();
                let _ = tx.send((names, self.report()));
            }
            Command::Token(type_name, id, tx) => {
                let token = self
                    .handoff
                    .lookup_type(&type_name)
                    .and_then(|ty| self.handoff.token(Datum::new(ty, id)));
                let _ = tx.send(token);
            }
            Command::DatumState(type_name, id, tx) => {
                let standing = self.lease.valid(now);
                let state = self
                    .handoff
                    .lookup_type(&type_name)
                    .and_then(|ty| self.handoff.state(Datum::new(ty, id)))
                    .map(|state| (state, standing && state == DatumState::Held));
                let _ = tx.send(state);
            }
            Command::Snapshot(membership, tx) => {
                let _ = tx.send(self.snapshot(*membership));
            }
            Command::Close { deadline, tx } => self.close(deadline, tx, now),
            Command::Shutdown => self.stop = true,
        }
    }

    /// The object of datum `d` of a type registered on demand, made by its
    /// factory and kept (the handoff registered `d` on a notice, or is about
    /// to on work). `None` for other types, or when the factory made a datum
    /// of another id or type (logged and counted as a failed creation).
    pub(super) fn make_on_demand(&mut self, d: Datum) -> Option<Arc<dyn ErasedDatum>> {
        let name = self.handoff.type_name(d.ty)?;
        let factory = self.factories.get(name)?;
        let datum = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory(d.id))) {
            Ok(datum) => datum,
            Err(panic) => {
                Counts::inc(&self.counts.callback_panics);
                metrics::counter!("shoal_callback_panics_total").increment(1);
                warn!(node = %self.name, datum_type = name, id = d.id,
                    panic = %panic_message(&*panic), "the factory panicked: datum not made");
                return None;
            }
        };
        if datum.id() != d.id || datum.type_name() != name {
            warn!(node = %self.name, datum_type = name, id = d.id, made = %datum.name(),
                "the factory made another datum than the one asked for");
            metrics::counter!("shoal_on_demand_refused_total").increment(1);
            return None;
        }
        self.datums.insert(d, Arc::clone(&datum));
        Some(datum)
    }

    /// Registers datum `d` on demand when work for it reaches this node as
    /// its primary: its type has a factory, this node is not fenced, and
    /// the table in force names this node. Returns whether `d` is now
    /// registered.
    pub(super) fn register_on_demand(&mut self, d: Datum, now: Instant) -> bool {
        if self.fenced || !self.handoff.is_on_demand(d.ty) {
            return false;
        }
        let table = self.handoff.table();
        let mine = table
            .primary(d.id)
            .and_then(|i| table.view().node(i))
            .is_some_and(|n| *n == self.me);
        if !mine || self.make_on_demand(d).is_none() {
            return false;
        }
        match self.handoff.register(d, now) {
            Ok(_) => true,
            Err(error) => {
                self.datums.remove(&d);
                debug!(node = %self.name, %error, id = d.id, "on-demand registration refused");
                false
            }
        }
    }

    pub(super) fn register(
        &mut self,
        batch: Vec<Arc<dyn ErasedDatum>>,
        now: Instant,
    ) -> Result<usize, Error> {
        let mut added = 0;
        self.datums.reserve(batch.len());
        for d in batch {
            let ty = self.handoff.datum_type(d.type_name())?;
            let datum = Datum::new(ty, d.id());
            if self.handoff.register(datum, now)? {
                added += 1;
            }
            self.datums.insert(datum, d);
        }
        Ok(added)
    }

    pub(super) fn snapshot(&self, membership: MembershipSnapshot) -> Snapshot {
        let p = self.handoff.progress();
        Snapshot {
            local: membership.local,
            members: membership.members,
            view: self.handoff.view_id(),
            registered: p.registered,
            owned: p.held,
            in_flight: p.in_flight,
            held_work: p.held_work,
            fenced: self.fenced,
            transition: self.handoff.counters().clone(),
            membership: membership.stats,
            transport: self.transport.stats(),
            facade: self.counts.snapshot(),
        }
    }
}
