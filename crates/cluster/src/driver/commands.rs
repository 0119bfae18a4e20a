//! The application's commands: registration (and datums made on demand),
//! transitions, a leave's steps, tokens, states and snapshots.

use super::*;
use shoal_transition::{DatumState, FencingToken};

/// A request from an API handle.
pub(crate) enum Command {
    Register(
        Vec<Arc<dyn ErasedDatum>>,
        oneshot::Sender<Result<usize, Error>>,
    ),
    Unregister(String, Vec<i64>, oneshot::Sender<usize>),
    /// Datums of this type are made by the factory when they are first
    /// needed here (work at their primary, or a notice).
    RegisterFactory(String, Factory, oneshot::Sender<Result<(), Error>>),
    Transition {
        install: bool,
        deadline: Instant,
        tx: oneshot::Sender<TransitionReport>,
    },
    Progress(oneshot::Sender<TransitionReport>),
    /// A graceful leave begins (sent before the node stops being ready):
    /// from now on a relinquish that fails is given up at once.
    BeginLeave(oneshot::Sender<()>),
    /// The transition of a graceful leave: as `Transition` with `install`.
    Leave {
        deadline: Instant,
        tx: oneshot::Sender<TransitionReport>,
    },
    /// After a leave's transition: gives up every relinquish still going on
    /// and answers with every datum given up since the leave began, and the
    /// transition's report.
    GiveUp(oneshot::Sender<(Vec<(String, i64)>, TransitionReport)>),
    /// The fencing token of a datum held here.
    Token(String, i64, oneshot::Sender<Option<FencingToken>>),
    /// A datum's handoff state here and whether this node may act as its
    /// owner now (held, and the lease valid).
    DatumState(String, i64, oneshot::Sender<Option<(DatumState, bool)>>),
    /// Completes the membership task's part of a snapshot.
    Snapshot(Box<MembershipSnapshot>, oneshot::Sender<Snapshot>),
    /// The last step of a leave: hand on every routed message held, parked
    /// or queued here, wait (until `deadline`) until their receivers took
    /// them, then stop; routed messages arriving later are refused.
    Close {
        deadline: Instant,
        tx: oneshot::Sender<()>,
    },
    Shutdown,
}

impl Driver {
    pub(super) fn on_command(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::Register(batch, tx) => {
                let _ = tx.send(self.register(batch, now));
            }
            Command::RegisterFactory(name, factory, tx) => {
                let result = self.core.set_on_demand(&name).map_err(Error::from);
                if result.is_ok() {
                    self.factories.insert(name, factory);
                }
                let _ = tx.send(result);
            }
            Command::Unregister(ty, ids, tx) => {
                let mut count = 0;
                if let Some(ty) = self.core.handoff().lookup_type(&ty) {
                    for id in ids {
                        let datum = Datum::new(ty, id);
                        self.datums.remove(&datum);
                        if self.core.handoff_mut().unregister(datum, now) {
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
                    self.install_latest(now);
                }
                self.waiters.push(Waiter { deadline, tx });
            }
            Command::Progress(tx) => {
                let _ = tx.send(self.report());
            }
            Command::BeginLeave(tx) => {
                self.core.begin_leave();
                let _ = tx.send(());
            }
            Command::Leave { deadline, tx } => {
                self.install_latest(now);
                self.waiters.push(Waiter { deadline, tx });
            }
            Command::GiveUp(tx) => {
                let given_up = self.core.give_up(now);
                // The done markers (farewells) go out now.
                self.pump(now);
                let handoff = self.core.handoff();
                let names = given_up
                    .iter()
                    .map(|d| (handoff.type_name(d.ty).unwrap_or("?").to_owned(), d.id))
                    .collect();
                let _ = tx.send((names, self.report()));
            }
            Command::Token(type_name, id, tx) => {
                let handoff = self.core.handoff();
                let token = handoff
                    .lookup_type(&type_name)
                    .and_then(|ty| handoff.token(Datum::new(ty, id)));
                let _ = tx.send(token);
            }
            Command::DatumState(type_name, id, tx) => {
                let standing = self.core.lease_valid(now);
                let handoff = self.core.handoff();
                let state = handoff
                    .lookup_type(&type_name)
                    .and_then(|ty| handoff.state(Datum::new(ty, id)))
                    .map(|state| (state, standing && state == DatumState::Held));
                let _ = tx.send(state);
            }
            Command::Snapshot(membership, tx) => {
                let _ = tx.send(self.snapshot(*membership));
            }
            Command::Close { deadline, tx } => {
                self.closing = Some((deadline, tx));
                // Routed messages waiting in the backlog go again, as
                // acknowledged forwards; so do the parked ones.
                self.core.close(now);
                for body in self.take_backlog_routed() {
                    match Routed::decode(&body, usize::MAX) {
                        Ok(routed) => self.core.route_again(routed, now),
                        Err(_) => self.malformed_routed(),
                    }
                }
            }
            Command::Shutdown => self.stop = true,
        }
    }

    /// Installs the newest view's table and runs what it starts at once.
    fn install_latest(&mut self, now: Instant) {
        let view = self.core.handoff().view_id();
        let base = self.idle_counters();
        if self.big_install() {
            tokio::task::block_in_place(|| self.core.install_latest(now));
        } else {
            self.core.install_latest(now);
        }
        self.installed(view, base);
        self.pump(now);
    }

    /// The object of datum `d` of a type registered on demand, made by its
    /// factory and kept. `Ok(None)` for other types (nothing to run);
    /// an error when the factory panicked or made another datum (the job
    /// fails, and the handoff retries it).
    pub(super) fn make_on_demand(
        &mut self,
        d: Datum,
    ) -> Result<Option<Arc<dyn ErasedDatum>>, String> {
        let Some(name) = self.core.handoff().type_name(d.ty) else {
            return Ok(None);
        };
        let Some(factory) = self.factories.get(name) else {
            return Ok(None);
        };
        let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory(d.id)));
        let datum = match made {
            Ok(datum) => datum,
            Err(panic) => {
                self.counts.callback_panicked();
                let panic = panic_message(&*panic);
                warn!(node = %self.name, datum_type = name, id = d.id, %panic,
                    "the factory panicked: datum not made");
                return Err(format!("the factory panicked: {panic}"));
            }
        };
        if datum.id() != d.id || datum.type_name() != name {
            warn!(node = %self.name, datum_type = name, id = d.id, made = %datum.name(),
                "the factory made another datum than the one asked for");
            metrics::counter!("shoal_on_demand_refused_total").increment(1);
            return Err(format!("the factory made {}", datum.name()));
        }
        self.datums.insert(d, Arc::clone(&datum));
        Ok(Some(datum))
    }

    fn register(&mut self, batch: Vec<Arc<dyn ErasedDatum>>, now: Instant) -> Result<usize, Error> {
        let mut added = 0;
        self.datums.reserve(batch.len());
        let handoff = self.core.handoff_mut();
        for d in batch {
            let datum = Datum::new(handoff.datum_type(d.type_name())?, d.id());
            if handoff.register(datum, now)? {
                added += 1;
            }
            self.datums.insert(datum, d);
        }
        Ok(added)
    }

    fn snapshot(&self, membership: MembershipSnapshot) -> Snapshot {
        let handoff = self.core.handoff();
        let p = handoff.progress();
        Snapshot {
            local: membership.local,
            members: membership.members,
            view: handoff.view_id(),
            registered: p.registered,
            owned: p.held,
            in_flight: p.in_flight,
            held_work: p.held_work,
            fenced: self.core.is_fenced(),
            transition: handoff.counters().clone(),
            membership: membership.stats,
            transport: self.transport.stats(),
            facade: self.counts.snapshot(self.core.counters()),
        }
    }
}
