//! The registry: every registered datum with its slot (phase, flight,
//! attempt, fencing token), how many are in each phase, and registering and
//! forgetting datums.

use super::*;

/// Where one registered datum stands on this node.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Phase {
    /// Not held here, nothing pending.
    Free = 0,
    /// Acquired here: work is processed here.
    Held,
    /// Held, waiting for a relinquish job slot.
    RelinquishQueued,
    /// Relinquish job handed to the application.
    Relinquishing,
    /// Relinquish failed; waiting to retry.
    RelinquishBackoff,
    /// Primary here; waiting for the notice (the "token").
    Awaiting,
    /// Was primary and waiting, is not primary any more: passes the notice
    /// on if it arrives here. Passive: does not keep a transition running.
    Relay,
    /// Have the token, primary here; waiting for an acquire job slot.
    AcquireQueued,
    /// Acquire job handed to the application.
    Acquiring,
    /// Acquire failed; waiting to retry.
    AcquireBackoff,
    /// Relinquished; the notice's send failed, waiting to retry.
    TokenWait,
    /// Relinquished; notice in the outgoing buffer.
    TokenQueued,
    /// Relinquished; no node owns the datum in the current view.
    TokenParked,
    /// Relinquished; notice handed out for sending, outcome not known yet.
    Passed,
}

const PHASES: usize = 14;

impl Phase {
    pub(super) fn state(self) -> DatumState {
        use Phase::*;
        match self {
            Free => DatumState::Free,
            Held => DatumState::Held,
            RelinquishQueued | Relinquishing | RelinquishBackoff => DatumState::Relinquishing,
            Awaiting => DatumState::Awaiting,
            Relay => DatumState::Relaying,
            AcquireQueued | Acquiring | AcquireBackoff => DatumState::Acquiring,
            TokenWait | TokenQueued | Passed => DatumState::NoticePending,
            TokenParked => DatumState::Unowned,
        }
    }

    /// Whether a datum in phase `self` may move to phase `to`: the edges of
    /// the phase graph (`docs/transition.md`, "Per-datum phases"). Every
    /// phase change goes through [`Slot::enter`], which checks it against
    /// this in debug builds (so the test suites and simulator runs check the
    /// graph). A datum is registered `Free` and may be unregistered in any
    /// phase; a token rerouted at a view change may stay where it was.
    ///
    /// ```text
    /// from               to                  when
    /// Free               Awaiting            primary here, not held: wait for the token
    ///                    AcquireQueued       registered here with its notice parked
    /// Held               RelinquishQueued    a view gave it to another node
    /// RelinquishQueued   Relinquishing       job handed out
    ///                    Held                back here before it ran (view change, deadline)
    ///                    Free                abandoned at the relinquish deadline
    /// Relinquishing      AcquireQueued,      relinquished: the token goes where the
    ///                    TokenQueued,        view in force says (here, another node,
    ///                    TokenParked         nobody)
    ///                    RelinquishBackoff   failed: retried after a backoff
    ///                    Held                failed, and the datum is back here
    ///                    Free                abandoned at the deadline (the job's outcome
    ///                                        is ignored)
    /// RelinquishBackoff  RelinquishQueued    retried
    ///                    Held                back here (view change, retry, deadline)
    ///                    Free                abandoned at the deadline
    /// Awaiting           AcquireQueued       notice, every holder gone or done, timeout
    ///                    Relay               a view made another node primary
    /// Relay              Awaiting            primary here again
    ///                    TokenQueued,        the notice came after all: passed on
    ///                    TokenParked
    ///                    Free                timeout
    /// AcquireQueued      Acquiring           job handed out
    ///                    TokenQueued,        not primary any more: passed on
    ///                    TokenParked
    /// Acquiring          Held                acquired (or failed `max_acquire_attempts`
    ///                                        times: processed anyway)
    ///                    AcquireBackoff      failed: retried after a backoff
    ///                    TokenQueued,        failed, not primary any more: passed on
    ///                    TokenParked
    /// AcquireBackoff     AcquireQueued       retried
    ///                    TokenQueued,        not primary any more: passed on
    ///                    TokenParked
    /// TokenQueued        Passed              its batch handed out for sending
    /// TokenQueued,       AcquireQueued,      rerouted at a view change
    /// TokenParked        TokenQueued,
    ///                    TokenParked
    ///                    Free                expired at the timeout
    /// Passed             Free                delivered, or expired at the timeout
    ///                    TokenWait           the send failed
    /// TokenWait          Passed              re-sent to the same address
    ///                    Free                the addressee is gone, or expired
    /// Passed,            AcquireQueued,      this node's own notice came back (the
    /// TokenWait          TokenQueued,        token is here again)
    ///                    TokenParked
    /// ```
    pub(super) const fn may_enter(self, to: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, to),
            (Free, Awaiting | AcquireQueued)
                | (Held, RelinquishQueued)
                | (RelinquishQueued, Relinquishing | Held | Free)
                | (
                    Relinquishing,
                    AcquireQueued | TokenQueued | TokenParked | RelinquishBackoff | Held | Free
                )
                | (RelinquishBackoff, RelinquishQueued | Held | Free)
                | (Awaiting, AcquireQueued | Relay)
                | (Relay, Awaiting | TokenQueued | TokenParked | Free)
                | (AcquireQueued, Acquiring | TokenQueued | TokenParked)
                | (Acquiring, Held | AcquireBackoff | TokenQueued | TokenParked)
                | (AcquireBackoff, AcquireQueued | TokenQueued | TokenParked)
                | (TokenQueued, Passed)
                | (
                    TokenQueued | TokenParked,
                    AcquireQueued | TokenQueued | TokenParked | Free
                )
                | (Passed, Free | TokenWait)
                | (TokenWait, Passed | Free)
                | (
                    Passed | TokenWait,
                    AcquireQueued | TokenQueued | TokenParked
                )
        )
    }
}

/// One registered datum on this node: its phase and the flight it is in.
#[derive(Copy, Clone, Debug)]
pub(super) struct Slot {
    /// Cohort (see [`Cohort`]) whose deadlines apply to the current flight.
    pub(super) flight: u64,
    /// For a wait: the epoch (cohort id) at which it began. A notice for a
    /// past view counts only if that view was still in force after this.
    pub(super) since: u64,
    /// Changed only by [`Slot::enter`].
    phase: Phase,
    /// Attempts so far of the current job or send.
    pub(super) attempt: u8,
    /// The fencing token of the ownership that the last acquire job started
    /// (meaningful while held, relinquishing or acquiring).
    pub(super) token: u64,
    /// How the token of the queued or running acquire reached this node
    /// (fits the slot's padding).
    pub(super) reason: JobReason,
}

impl Slot {
    /// Where the datum stands.
    #[inline]
    pub(super) fn phase(&self) -> Phase {
        self.phase
    }

    /// Moves the datum to phase `to`: the one place a phase changes (the
    /// slot is then written back with [`Registry::set`], or changed in place
    /// by [`Registry::modify`], which keep the counts). Debug builds check
    /// that the change is an edge of the phase graph ([`Phase::may_enter`]).
    #[inline]
    pub(super) fn enter(&mut self, to: Phase) {
        debug_assert!(
            self.phase.may_enter(to),
            "phase change {:?} -> {:?} is not in the phase graph",
            self.phase,
            to
        );
        self.phase = to;
    }
}

/// Reads the entries of `datums` in `map` in one tight loop and decides
/// nothing (see [`Registry::warm`]); `read` reads what the loop that follows
/// will.
#[inline]
pub(super) fn warm<'a, V>(
    map: &HashMap<Datum, V, DetState>,
    datums: impl IntoIterator<Item = &'a Datum>,
    read: impl Fn(&V) -> u64,
) {
    let mut sum = 0u64;
    for d in datums {
        if let Some(v) = map.get(d) {
            sum = sum.wrapping_add(read(v));
        }
    }
    std::hint::black_box(sum);
}

/// All registered datums with their phase, and how many are in each phase.
#[derive(Default)]
pub(super) struct Registry {
    pub(super) map: HashMap<Datum, Slot, DetState>,
    counts: [usize; PHASES],
}

impl Registry {
    #[inline]
    pub(super) fn get(&self, d: &Datum) -> Option<Slot> {
        self.map.get(d).copied()
    }

    #[inline]
    pub(super) fn set(&mut self, d: Datum, slot: Slot) {
        if let Some(s) = self.map.get_mut(&d) {
            // A slot written back was read after the datum's last change.
            debug_assert!(
                s.phase == slot.phase || s.phase.may_enter(slot.phase),
                "slot of {d} written back from a stale copy: {:?} -> {:?}",
                s.phase,
                slot.phase
            );
            if let Some(c) = self.counts.get_mut(s.phase as usize) {
                *c = c.saturating_sub(1);
            }
            if let Some(c) = self.counts.get_mut(slot.phase as usize) {
                *c += 1;
            }
            *s = slot;
        }
    }

    /// Reads and changes a slot with one lookup; keeps the counts right.
    #[inline]
    pub(super) fn modify<R>(&mut self, d: &Datum, f: impl FnOnce(&mut Slot) -> R) -> Option<R> {
        let s = self.map.get_mut(d)?;
        let before = s.phase;
        let r = f(s);
        if s.phase != before {
            if let Some(c) = self.counts.get_mut(before as usize) {
                *c = c.saturating_sub(1);
            }
            if let Some(c) = self.counts.get_mut(s.phase as usize) {
                *c += 1;
            }
        }
        Some(r)
    }

    pub(super) fn insert(&mut self, d: Datum) -> bool {
        if self.map.contains_key(&d) {
            return false;
        }
        let slot = Slot {
            flight: 0,
            since: 0,
            phase: Phase::Free,
            attempt: 0,
            token: 0,
            reason: JobReason::First,
        };
        self.map.insert(d, slot);
        self.counts[Phase::Free as usize] += 1;
        true
    }

    pub(super) fn remove(&mut self, d: &Datum) -> Option<Slot> {
        let s = self.map.remove(d)?;
        if let Some(c) = self.counts.get_mut(s.phase as usize) {
            *c = c.saturating_sub(1);
        }
        Some(s)
    }

    /// Reads the slots of `datums` in one tight loop and decides nothing:
    /// a registry of a million datums is far larger than the cache, and
    /// lookups that do not wait on each other miss it together, where the
    /// same lookups spread over a loop that does work between them each
    /// wait for their miss in turn. Called on the next few datums a loop
    /// will look up.
    #[inline]
    pub(super) fn warm<'a>(&self, datums: impl IntoIterator<Item = &'a Datum>) {
        // The flight and the phase: a slot may straddle two cache lines.
        warm(&self.map, datums, |s| s.flight ^ s.phase as u64);
    }

    /// Orders datums as their slots lie in memory, so a batch of lookups
    /// walks the table instead of jumping around it (deterministic).
    pub(super) fn sort_for_locality(&self, datums: &mut [Datum]) {
        use std::hash::BuildHasher;
        let buckets = (self.map.capacity() * 8 / 7 + 1).next_power_of_two() as u64;
        let mask = buckets.saturating_sub(1);
        let hasher = self.map.hasher();
        datums.sort_by_cached_key(|d| (hasher.hash_one(d) & mask, *d));
    }

    #[inline]
    pub(super) fn count(&self, p: Phase) -> usize {
        self.counts.get(p as usize).copied().unwrap_or(0)
    }
}

impl<W> Handoff<W> {
    /// Registers a datum (the seed's `LoadDistData`). Registering again is a
    /// no-op returning `false`. If this node is its primary and no other node
    /// was in a recent view, it is acquired at once; during a transition it
    /// waits for the previous owner's notice like any moving datum.
    ///
    /// # Errors
    /// [`RegistryError::UnknownType`] for a type not interned here,
    /// [`RegistryError::Fenced`].
    pub fn register(&mut self, datum: Datum, now: Instant) -> Result<bool, RegistryError> {
        if self.fenced {
            return Err(RegistryError::Fenced);
        }
        if self.types.name(datum.ty).is_none() {
            return Err(RegistryError::UnknownType(datum.ty.index()));
        }
        let now = self.clock(now);
        if !self.registry.insert(datum) {
            return Ok(false);
        }
        if let Primary::Me = self.primary_of(datum.id) {
            let view = self.current.view_id();
            let parked = self.parked.get_mut(&view).and_then(|p| {
                let i = p.datums.remove(&datum)?;
                p.senders.get(i as usize).cloned()
            });
            if parked.is_some() {
                self.parked_total = self.parked_total.saturating_sub(1);
            }
            let key = parked.as_ref().map_or(0, |(node, _)| self.sender_key(node));
            let parked_here = match parked {
                Some((node, epoch))
                    if self.is_copy(
                        datum,
                        Src {
                            node: &node,
                            epoch,
                            key,
                        },
                    ) =>
                {
                    self.counters.notices_copy_refused += 1;
                    false
                }
                Some((node, epoch)) if self.sender_unmoved(&node, epoch) => {
                    self.note_taken(
                        datum,
                        Src {
                            node: &node,
                            epoch,
                            key,
                        },
                        now,
                    );
                    true
                }
                Some(_) => {
                    self.counters.notices_stale += 1;
                    false
                }
                None => false,
            };
            if let Some(slot) = self.registry.get(&datum) {
                if parked_here {
                    self.counters.notices_accepted += 1;
                    self.take_token(datum, slot, Source::Notice, now);
                } else {
                    self.begin_wait(datum, slot, now);
                }
            }
        }
        self.maybe_release(datum);
        self.check_ended();
        Ok(true)
    }

    /// Datums of type `ty` exist on demand: besides [`Handoff::register`]
    /// (which the driver calls when work for one arrives at its primary),
    /// a notice for an unregistered datum of this type registers it and is
    /// taken, instead of waiting parked for a registration. So a datum
    /// created on one node follows its ownership to the next, and a node
    /// relinquishes only the datums it has.
    pub fn set_on_demand(&mut self, ty: DatumType, on: bool) {
        if on {
            self.on_demand.insert(ty);
        } else {
            self.on_demand.remove(&ty);
        }
    }

    /// Whether datums of type `ty` exist on demand
    /// ([`Handoff::set_on_demand`]).
    #[must_use]
    pub fn is_on_demand(&self, ty: DatumType) -> bool {
        self.on_demand.contains(&ty)
    }

    /// Interns `ty` and registers the datum; returns it.
    ///
    /// # Errors
    /// As [`Handoff::datum_type`] and [`Handoff::register`].
    pub fn register_named(
        &mut self,
        ty: &str,
        id: i64,
        now: Instant,
    ) -> Result<Datum, RegistryError> {
        let datum = Datum::new(self.datum_type(ty)?, id);
        self.register(datum, now)?;
        Ok(datum)
    }

    /// Forgets a datum, whatever it is doing: a running job's completion will
    /// be ignored, a notice it was owed is dropped, work held for it comes
    /// back as [`ReturnReason::Unregistered`]. Returns whether it was registered.
    pub fn unregister(&mut self, datum: Datum, now: Instant) -> bool {
        self.clock(now);
        if self.registry.remove(&datum).is_none() {
            return false;
        }
        self.acquire_superseded.remove(&datum);
        self.returning.remove(&datum);
        self.deferred.remove(&datum);
        if let Some(work) = self.held.remove(&datum) {
            self.held_total = self.held_total.saturating_sub(work.len());
            self.releases.push_back(Release {
                datum,
                to: ReleaseTo::Returned(ReturnReason::Unregistered),
                work: work.into(),
            });
        }
        self.check_ended();
        true
    }
}
