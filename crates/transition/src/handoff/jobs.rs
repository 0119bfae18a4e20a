//! Jobs: relinquish and acquire jobs handed to the application within the
//! concurrency caps, their completions (success, failure and retry), and
//! giving up a relinquish.

use super::*;

impl<W> Handoff<W> {
    /// The datums of the next jobs [`Handoff::poll_job`] may hand out, in
    /// that order, at most `n`: relinquishes first, then acquisitions. A
    /// hint, deciding nothing: an entry is skipped when its job is polled if
    /// its datum moved on meanwhile, and a cap may hold a job back. A driver
    /// may use it to bring what those jobs need into the cache ahead of
    /// them.
    pub fn next_jobs(&self, n: usize) -> impl Iterator<Item = Datum> + '_ {
        self.relinquish_queue
            .iter()
            .chain(self.acquire_queue.iter())
            .take(n)
            .copied()
    }

    /// The next relinquish or acquire job for the application, within the
    /// configured concurrency caps. Report it with [`Handoff::job_done`].
    pub fn poll_job(&mut self) -> Option<Job> {
        if self.fenced || !self.standing {
            return None;
        }
        let view = self.current.view_id();
        while self.registry.count(Phase::Relinquishing) < self.config.max_relinquish_jobs {
            let Some(d) = self.relinquish_queue.pop_front() else {
                break;
            };
            self.warm_queued(d, false);
            let started = self.registry.modify(&d, |s| {
                (s.phase() == Phase::RelinquishQueued).then(|| {
                    s.enter(Phase::Relinquishing);
                    *s
                })
            });
            if let Some(s) = started.flatten() {
                return Some(Job {
                    kind: JobKind::Relinquish,
                    datum: d,
                    view,
                    attempt: u32::from(s.attempt) + 1,
                    token: FencingToken(s.token),
                    reason: JobReason::Moving,
                    previous: None,
                    flight: s.flight,
                });
            }
        }
        // Every acquisition's token is at least every epoch this node has
        // heard and its own install count (see `FencingToken`).
        let token = self.install_seq.max(self.heard_epoch);
        while self.standing && self.registry.count(Phase::Acquiring) < self.config.max_acquire_jobs
        {
            let Some(d) = self.acquire_queue.pop_front() else {
                break;
            };
            self.warm_queued(d, true);
            let started = self.registry.modify(&d, |s| {
                (s.phase() == Phase::AcquireQueued).then(|| {
                    s.enter(Phase::Acquiring);
                    s.token = token;
                    *s
                })
            });
            if let Some(s) = started.flatten() {
                return Some(Job {
                    kind: JobKind::Acquire,
                    datum: d,
                    view,
                    attempt: u32::from(s.attempt) + 1,
                    token: FencingToken(s.token),
                    reason: s.reason,
                    previous: self.previous_owner(d, s.reason),
                    flight: s.flight,
                });
            }
        }
        None
    }

    /// Every [`WARM_AHEAD`] datums popped from the job queues: reads the
    /// slots of `d` and of the datums queued after it together (see
    /// [`Registry::warm`]), and for acquisitions (`acquire`: `d` came from
    /// the acquire queue) the notices taken for them too, which name the
    /// previous owner ([`Handoff::previous_owner`]).
    #[inline]
    fn warm_queued(&mut self, d: Datum, acquire: bool) {
        if self.warm_jobs == 0 {
            let next = self
                .relinquish_queue
                .iter()
                .chain(self.acquire_queue.iter());
            self.registry
                .warm(std::iter::once(&d).chain(next.take(WARM_AHEAD - 1)));
            if acquire {
                let next = std::iter::once(&d).chain(self.acquire_queue.iter());
                registry::warm(&self.taken, next.take(WARM_AHEAD), |t| t.0);
            }
            self.warm_jobs = WARM_AHEAD;
        }
        self.warm_jobs -= 1;
    }

    /// The outcome of a job handed out by [`Handoff::poll_job`]. `Err` holds
    /// the application's error message. A completion for a job that is no
    /// longer current (the datum was unregistered, or its relinquish was
    /// abandoned) is counted and ignored.
    pub fn job_done(&mut self, job: Job, outcome: Result<(), String>, now: Instant) {
        let now = self.clock(now);
        if self.fenced {
            return;
        }
        let d = job.datum;
        let expected = match job.kind {
            JobKind::Relinquish => Phase::Relinquishing,
            JobKind::Acquire => Phase::Acquiring,
        };
        let current = |s: &Slot| {
            s.phase() == expected
                && s.flight == job.flight
                && u32::from(s.attempt) + 1 == job.attempt
        };
        // The common successes, in one lookup.
        if outcome.is_ok() {
            let mine = matches!(self.primary_of(d.id), Primary::Me);
            let (phase, primary) = match job.kind {
                JobKind::Relinquish => self.token_phase(d.id),
                JobKind::Acquire => (Phase::Held, Primary::Me),
            };
            let done = self.registry.modify(&d, |s| {
                let ok = current(s);
                if ok {
                    s.enter(phase);
                    s.attempt = 0;
                }
                ok.then_some(*s)
            });
            let Some(s) = done.flatten() else {
                self.counters.stale_completions += 1;
                return;
            };
            match job.kind {
                JobKind::Relinquish => {
                    self.counters.relinquished += 1;
                    self.after_token(d, primary, Source::Relinquished, now);
                }
                JobKind::Acquire => {
                    self.counters.acquired += 1;
                    let since = self.acquire_superseded.remove(&d);
                    if !mine {
                        // The view moved on during the acquire: hand it on,
                        // by the deadline that view change set.
                        let deadline = since.unwrap_or(now) + self.config.relinquish_timeout;
                        self.start_relinquish(d, s, now);
                        if let Some(s) = self.registry.get(&d) {
                            if deadline <= now {
                                self.abandon_relinquish(d, s.flight);
                            } else {
                                let flight = s.flight;
                                self.add_timer(
                                    deadline,
                                    TimerKind::AbandonRelinquish { datum: d, flight },
                                );
                            }
                        }
                    }
                    self.maybe_release(d);
                }
            }
            self.check_ended();
            return;
        }
        let Err(error) = outcome else {
            return;
        };
        let Some(mut s) = self.registry.get(&d).filter(current) else {
            self.counters.stale_completions += 1;
            return;
        };
        let mine = matches!(self.primary_of(d.id), Primary::Me);
        match job.kind {
            JobKind::Relinquish => {
                self.counters.relinquish_failures += 1;
                debug!(node = %self.local, datum = %d, attempt = job.attempt, %error, "relinquish failed");
                if mine {
                    // The datum came back here meanwhile: keep it.
                    s.enter(Phase::Held);
                    self.registry.set(d, s);
                } else {
                    s.attempt = s.attempt.saturating_add(1);
                    s.enter(Phase::RelinquishBackoff);
                    self.registry.set(d, s);
                    let at = now + self.backoff(s.attempt);
                    self.add_timer(
                        at,
                        TimerKind::RelinquishRetry {
                            datum: d,
                            flight: s.flight,
                            attempt: s.attempt,
                        },
                    );
                }
                self.events.push_back(HandoffEvent::RelinquishFailed {
                    datum: d,
                    attempt: job.attempt,
                    error,
                    retry: !mine,
                });
                self.maybe_release(d);
            }
            JobKind::Acquire => {
                self.counters.acquire_failures += 1;
                debug!(node = %self.local, datum = %d, attempt = job.attempt, %error, "acquire failed");
                let retry = mine && job.attempt < u32::from(self.config.max_acquire_attempts);
                if !mine || !retry {
                    self.acquire_superseded.remove(&d);
                }
                if !mine {
                    s.flight = self.enter_cohort(d, now);
                    self.take_token(d, s, Source::PassOn, now);
                } else if retry {
                    s.attempt = s.attempt.saturating_add(1);
                    s.enter(Phase::AcquireBackoff);
                    self.registry.set(d, s);
                    let at = now + self.backoff(s.attempt);
                    self.add_timer(
                        at,
                        TimerKind::AcquireRetry {
                            datum: d,
                            flight: s.flight,
                            attempt: s.attempt,
                        },
                    );
                } else {
                    debug!(
                        node = %self.local, datum = %d, attempts = job.attempt,
                        "acquire keeps failing: processing the datum anyway"
                    );
                    s.enter(Phase::Held);
                    self.registry.set(d, s);
                    self.maybe_release(d);
                }
                self.events.push_back(HandoffEvent::AcquireFailed {
                    datum: d,
                    attempt: job.attempt,
                    error,
                    retry,
                });
            }
        }
        self.check_ended();
    }

    /// Gives up relinquishing `datum` now, as the relinquish deadline would
    /// (`RelinquishAbandoned`): the node stops holding it (its unsaved state
    /// is likely lost), sends no notice for it, and once nothing else is
    /// busy says done, so the datum's primary takes it on everyone's done
    /// markers without waiting for a timeout. A job still running is left to
    /// finish; its completion is ignored. For a node on its way out (a
    /// graceful leave) whose application could not relinquish the datum.
    /// Returns whether the datum was being relinquished here and is not any
    /// more (a datum whose primary this node is again is kept, as at the
    /// deadline).
    pub fn give_up_relinquish(&mut self, datum: Datum, now: Instant) -> bool {
        let _ = self.clock(now);
        if self.fenced {
            return false;
        }
        let Some(s) = self.registry.get(&datum).filter(|s| {
            matches!(
                s.phase(),
                Phase::RelinquishQueued | Phase::Relinquishing | Phase::RelinquishBackoff
            )
        }) else {
            return false;
        };
        self.abandon_relinquish(datum, s.flight);
        let given_up = self
            .registry
            .get(&datum)
            .is_some_and(|s| s.phase() == Phase::Free);
        self.check_ended();
        given_up
    }

    /// [`Handoff::give_up_relinquish`] for every datum being relinquished
    /// here (queued, running, or backing off after a failure); returns those
    /// given up, sorted.
    pub fn give_up_relinquishes(&mut self, now: Instant) -> Vec<Datum> {
        let mut datums: Vec<Datum> = self
            .registry
            .map
            .iter()
            .filter(|(_, s)| {
                matches!(
                    s.phase(),
                    Phase::RelinquishQueued | Phase::Relinquishing | Phase::RelinquishBackoff
                )
            })
            .map(|(d, _)| *d)
            .collect();
        datums.sort_unstable();
        datums.retain(|&d| self.give_up_relinquish(d, now));
        datums
    }

    pub(super) fn start_relinquish(&mut self, d: Datum, mut s: Slot, now: Instant) {
        s.enter(Phase::RelinquishQueued);
        s.attempt = 0;
        s.flight = self.enter_cohort(d, now);
        self.registry.set(d, s);
        self.relinquish_queue.push_back(d);
    }

    /// For an acquire after a handoff: the sender of the notice taken for
    /// `d` (kept `2 × timeout`, see `taken`).
    fn previous_owner(&self, d: Datum, reason: JobReason) -> Option<NodeId> {
        if reason != JobReason::Handoff {
            return None;
        }
        let (key, _) = self.taken.get(&d)?;
        self.sender_names.get(key).cloned()
    }
}
