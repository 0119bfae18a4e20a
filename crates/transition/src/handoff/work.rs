//! The application's work: where work for a datum goes right now (its
//! route), the bounded hold buffer for datums in flight, and the release of
//! held work once its datum lands.

use super::*;

impl<W> Handoff<W> {
    /// Where work for `datum` must go right now. Never waits; O(1).
    #[must_use]
    pub fn route(&self, datum: Datum) -> Route<'_> {
        if self.fenced {
            return Route::Fenced;
        }
        let by_table = || match self.primary_of(datum.id) {
            Primary::Me => Route::Process,
            Primary::Other(i) => self
                .current
                .view()
                .node(i)
                .map_or(Route::Hold, Route::Forward),
            Primary::Nobody => Route::Hold,
        };
        let Some(s) = self.registry.get(&datum) else {
            return by_table();
        };
        use Phase::*;
        match s.phase() {
            Held if self.standing => Route::Process,
            Held => Route::Hold,
            RelinquishQueued | Relinquishing | RelinquishBackoff | Awaiting | AcquireQueued
            | Acquiring | AcquireBackoff => Route::Hold,
            Free | Relay | TokenWait | TokenQueued | TokenParked | Passed => match by_table() {
                Route::Process => Route::Hold,
                other => other,
            },
        }
    }

    /// Keeps `work` for `datum` until the datum lands; it is then released
    /// once (see [`Handoff::poll_release`]), to this node or to the owner.
    ///
    /// # Errors
    /// The work is handed back in a [`HoldError`]: `Full` when the node's hold
    /// buffer (`Config::hold_capacity`) is full (push back on the sender),
    /// `NotHeld` when [`Handoff::route`] is not [`Route::Hold`], `Fenced`.
    pub fn hold(&mut self, datum: Datum, work: W) -> Result<(), HoldError<W>> {
        let kind = match self.route(datum) {
            Route::Fenced => Some(HoldErrorKind::Fenced),
            Route::Hold if self.held_total >= self.config.hold_capacity => {
                self.counters.hold_refused += 1;
                Some(HoldErrorKind::Full)
            }
            Route::Hold => None,
            Route::Process | Route::Forward(_) => Some(HoldErrorKind::NotHeld),
        };
        if let Some(kind) = kind {
            return Err(HoldError { kind, datum, work });
        }
        self.held.entry(datum).or_default().push_back(work);
        self.held_total += 1;
        Ok(())
    }

    /// The work held right now, per datum, oldest first.
    pub fn held_work(&self) -> impl Iterator<Item = (Datum, &W)> + '_ {
        self.held
            .iter()
            .flat_map(|(d, q)| q.iter().map(move |w| (*d, w)))
    }

    /// The next release of held work.
    pub fn poll_release(&mut self) -> Option<Release<W>> {
        self.releases.pop_front()
    }

    pub(super) fn maybe_release(&mut self, d: Datum) {
        if self.held.is_empty() || !self.held.contains_key(&d) {
            return;
        }
        let to = match self.route(d) {
            Route::Hold => return,
            Route::Process => ReleaseTo::Process,
            Route::Forward(n) => ReleaseTo::Forward(n.clone()),
            Route::Fenced => ReleaseTo::Returned(ReturnReason::Fenced),
        };
        if let Some(work) = self.held.remove(&d) {
            self.held_total = self.held_total.saturating_sub(work.len());
            self.releases.push_back(Release {
                datum: d,
                to,
                work: work.into(),
            });
        }
    }

    pub(super) fn recheck_held(&mut self) {
        if self.held.is_empty() {
            return;
        }
        let mut keys: Vec<Datum> = self.held.keys().copied().collect();
        keys.sort_unstable();
        for d in keys {
            self.maybe_release(d);
        }
    }
}
