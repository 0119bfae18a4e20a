//! Notices in: a batch checked against its sender and this node, then each
//! notice taken (the token is here), parked for a view not installed yet,
//! or refused and counted (a copy, a spent token, misdirected).

use super::*;

#[derive(Copy, Clone)]
enum ViewAt {
    Current,
    Past(usize),
    Stale,
    Unknown,
}

impl<W> Handoff<W> {
    /// Decodes and takes a notice batch received from the authenticated peer `from`.
    ///
    /// # Errors
    /// [`NoticeError`] when the batch is refused as a whole (counted; nothing
    /// else changes). Individual notices that are stale, duplicate or
    /// misdirected are counted in the returned report, never an error.
    pub fn handle_notices(
        &mut self,
        from: &NodeId,
        bytes: &[u8],
        now: Instant,
    ) -> Result<NoticeReport, NoticeError> {
        match NoticeBatch::decode(bytes, &self.config.wire) {
            Ok(batch) => self.handle_batch(from, batch, now),
            Err(e) => {
                self.counters.batches_rejected += 1;
                debug!(node = %self.local, peer = %from, error = %e, "undecodable notice batch");
                Err(e.into())
            }
        }
    }

    /// Takes a decoded notice batch received from the authenticated peer `from`.
    ///
    /// # Errors
    /// As [`Handoff::handle_notices`].
    pub fn handle_batch(
        &mut self,
        from: &NodeId,
        batch: NoticeBatch,
        now: Instant,
    ) -> Result<NoticeReport, NoticeError> {
        let now = self.clock(now);
        let refused = if self.fenced {
            Some(NoticeError::Fenced)
        } else if batch.from != *from {
            Some(NoticeError::SenderMismatch {
                claimed: batch.from.clone(),
                peer: from.clone(),
            })
        } else if batch.to != self.local {
            Some(NoticeError::Misaddressed {
                to: batch.to.clone(),
            })
        } else if batch.epoch
            > self
                .install_seq
                .max(self.heard_epoch)
                .saturating_add(MAX_EPOCH_JUMP)
        {
            self.counters.epoch_jumps_refused += 1;
            Some(NoticeError::EpochJump {
                epoch: batch.epoch,
                known: self.install_seq.max(self.heard_epoch),
            })
        } else {
            None
        };
        if let Some(e) = refused {
            self.counters.batches_rejected += 1;
            debug!(node = %self.local, peer = %from, error = %e, "notice batch refused");
            return Err(e);
        }
        self.counters.batches_received += 1;
        self.heard_epoch = self.heard_epoch.max(batch.epoch);
        let mut report = NoticeReport::default();
        let at = self.locate_view(batch.view);
        let (done, view, epoch, echo) = (batch.done, batch.view, batch.epoch, batch.echo);
        let key = self.sender_key(from);
        for group in batch.groups {
            let Some(ty) = self.types.lookup(&group.datum_type) else {
                report.unknown_type += group.ids.len();
                continue;
            };
            let mut datums: Vec<Datum> = group.ids.iter().map(|&id| Datum::new(ty, id)).collect();
            self.registry.sort_for_locality(&mut datums);
            for (i, &d) in datums.iter().enumerate() {
                if i % WARM_AHEAD == 0 {
                    self.registry
                        .warm(datums.get(i..).unwrap_or_default().iter().take(WARM_AHEAD));
                }
                let src = Src {
                    node: from,
                    epoch,
                    key,
                };
                match at {
                    ViewAt::Stale => report.stale += 1,
                    ViewAt::Unknown => self.park(view, d, src, now, &mut report),
                    ViewAt::Current | ViewAt::Past(_) => {
                        self.take_notice(at, d, src, now, &mut report);
                    }
                }
            }
        }
        self.count_report(&report);
        self.peer_state(from, view, epoch, done, echo, now);
        self.check_ended();
        Ok(report)
    }

    fn locate_view(&self, view: ViewId) -> ViewAt {
        if view == self.current.view_id() {
            return ViewAt::Current;
        }
        if let Some(i) = self.history.iter().position(|p| p.table.view_id() == view) {
            return ViewAt::Past(i);
        }
        if self.seen.contains_key(&view) {
            ViewAt::Stale
        } else {
            ViewAt::Unknown
        }
    }

    /// One notice for a view this node knows (in force or recent).
    fn take_notice(
        &mut self,
        at: ViewAt,
        d: Datum,
        src: Src<'_>,
        now: Instant,
        report: &mut NoticeReport,
    ) {
        let (table, self_idx, left_epoch) = match at {
            ViewAt::Current => (&self.current, self.self_index, None),
            ViewAt::Past(i) => match self.history.get(i) {
                Some(p) => (&p.table, p.self_index, Some(p.left_epoch)),
                None => {
                    report.stale += 1;
                    return;
                }
            },
            ViewAt::Stale | ViewAt::Unknown => {
                report.stale += 1;
                return;
            }
        };
        let view = table.view_id();
        let primary = table.primary(d.id);
        if primary.is_none() || primary != self_idx {
            report.misdirected += 1;
            return;
        }
        if self.is_copy(d, src) {
            report.copies += 1;
            return;
        }
        // This node told the sender it was done with a later install of the
        // sender's: the sender may have counted that marker to take the
        // datum back (`answers_for`), so this older token is spent.
        let spent = self.answered_later(src);
        enum Taken {
            Yes,
            Stale,
            Duplicate,
        }
        let (phase, primary) = self.token_phase(d.id);
        let taken = self.registry.modify(&d, |s| match s.phase() {
            Phase::Awaiting | Phase::Relay => {
                // A past view counts only if it was in force during this wait.
                if spent || left_epoch.is_some_and(|left| left <= s.since) {
                    Taken::Stale
                } else {
                    s.enter(phase);
                    if phase == Phase::AcquireQueued {
                        s.attempt = 0;
                    }
                    Taken::Yes
                }
            }
            // This node's own notice, still on its way as far as it knows
            // (the send outcome is not in, or it failed and waits for a
            // retry), comes back through the node it went to: the token is
            // here again. A past view counts only if it was in force after
            // the token left.
            Phase::Passed | Phase::TokenWait => {
                if spent || left_epoch.is_some_and(|left| left <= s.flight) {
                    Taken::Stale
                } else {
                    s.enter(phase);
                    s.attempt = 0;
                    Taken::Yes
                }
            }
            Phase::Free => Taken::Stale,
            _ => Taken::Duplicate,
        });
        match taken {
            // A type created on demand: the datum exists from its first
            // notice here. Registered now, it waits as any moving datum
            // and the notice is taken as for a datum registered before.
            None if self.on_demand.contains(&d.ty) && !self.fenced => {
                if matches!(self.register(d, now), Ok(true)) {
                    self.counters.registered_on_demand += 1;
                    self.take_notice(at, d, src, now, report);
                } else {
                    self.park(view, d, src, now, report);
                }
            }
            // Not registered (yet): keep it for a registration during this view.
            None => self.park(view, d, src, now, report),
            Some(Taken::Yes) => {
                report.accepted += 1;
                self.note_taken(d, src, now);
                self.after_token(d, primary, Source::Notice, now);
            }
            Some(Taken::Stale) => report.stale += 1,
            Some(Taken::Duplicate) => report.duplicate += 1,
        }
    }

    /// The key of a notice's sender in `taken`.
    pub(super) fn sender_key(&self, node: &NodeId) -> u64 {
        use std::hash::BuildHasher;
        self.registry.map.hasher().hash_one(node)
    }

    /// Whether this node already took this very notice (same sender, same
    /// install count of the sender, same datum): a copy whose token is
    /// spent. A node relinquishes or passes on a datum at most once per
    /// install of its own, so the pair names one notice.
    pub(super) fn is_copy(&self, d: Datum, src: Src<'_>) -> bool {
        self.taken
            .get(&d)
            .is_some_and(|&(k, e)| e == src.epoch && k == src.key)
    }

    /// Whether this node answered an announcement of the notice's sender
    /// made at a later install than the notice's with a done marker: the
    /// sender may have counted that marker, so the notice's token is spent.
    pub(super) fn answered_later(&self, src: Src<'_>) -> bool {
        self.peers
            .answered(src.node)
            .is_some_and(|(_, e)| e != FAREWELL && e > src.epoch)
    }

    pub(super) fn note_taken(&mut self, d: Datum, src: Src<'_>, now: Instant) {
        self.sender_names
            .entry(src.key)
            .or_insert_with(|| src.node.clone());
        self.taken.insert(d, (src.key, src.epoch));
        self.taken_order.push_back((now, d, src.epoch));
    }

    pub(super) fn park(
        &mut self,
        view: ViewId,
        d: Datum,
        src: Src<'_>,
        now: Instant,
        report: &mut NoticeReport,
    ) {
        let unconfirmed = self.unconfirmed.as_ref().map_or(0, |p| p.datums.len());
        if self.parked_total + unconfirmed >= self.config.max_parked {
            report.overflow += 1;
            return;
        }
        let p = self.parked.entry(view).or_insert_with(|| Parked {
            first: now,
            datums: HashMap::default(),
            senders: Vec::new(),
        });
        let i = match p
            .senders
            .iter()
            .position(|(n, e)| n == src.node && *e == src.epoch)
        {
            Some(i) => i,
            None => {
                p.senders.push((src.node.clone(), src.epoch));
                p.senders.len() - 1
            }
        };
        if let std::collections::hash_map::Entry::Vacant(v) = p.datums.entry(d) {
            v.insert(i as u32);
            self.parked_total += 1;
            report.parked += 1;
        } else {
            report.duplicate += 1;
        }
    }

    /// Whether the sender of a parked notice is still at the install it sent
    /// it from. Once it moved on, another node may have taken the datum from
    /// the done markers of a later view (a new token), so this old one is
    /// spent; if it was the only one, the done markers or the timeout end the
    /// wait. A notice of a sender that left or failed is spent too. One that
    /// passes is taken only once its sender confirms it after the install
    /// ([`Handoff::confirm_parked`]); parked during the install in force (a
    /// datum registered later), it was taken as it came.
    pub(super) fn sender_unmoved(&self, node: &NodeId, epoch: u64) -> bool {
        if self.peers.is_gone(node) {
            // It left or failed: an announcement of a later install may have
            // been lost with it (a send that failed is not retried by a node
            // that is gone), while another node, told by its done marker
            // that it holds nothing, took the datum.
            return false;
        }
        self.peers.announced(node).is_none_or(|a| a.epoch == epoch)
    }

    pub(super) fn forget_parked(&mut self, d: Datum) {
        if let Some(p) = self.unconfirmed.as_mut() {
            p.datums.remove(&d);
        }
        if self.parked_total == 0 {
            return;
        }
        let mut removed = 0;
        for p in self.parked.values_mut() {
            removed += usize::from(p.datums.remove(&d).is_some());
        }
        self.parked_total = self.parked_total.saturating_sub(removed);
    }

    /// `from` said done with this node's install of the view in force, at
    /// its install count `epoch`: the notices it sent at that install and
    /// that were parked here for this view are taken now.
    ///
    /// The notice names a view, not an instance of it: view ids recur, and a
    /// notice parked here may come from an earlier instance of the view
    /// than the one installed now. Its sender may have moved on since and
    /// said done elsewhere, so that another node took the datum on the done
    /// markers, and left; if neither its later announcement nor its
    /// departure reached this node, nothing here tells the token is spent.
    /// A done marker answering this install (its echo is this node's
    /// install count) was sent after this node installed the view, so if it
    /// carries the notice's install count, the sender had installed nothing
    /// since it sent the notice: it said done with no other view, and the
    /// token it sent is still the only one.
    pub(super) fn confirm_parked(&mut self, from: &NodeId, epoch: u64, now: Instant) {
        let Some(p) = self.unconfirmed.as_mut() else {
            return;
        };
        let Some(i) = p.senders.iter().position(|(n, e)| n == from && *e == epoch) else {
            return;
        };
        let mut datums: Vec<Datum> = p
            .datums
            .iter()
            .filter(|(_, s)| **s as usize == i)
            .map(|(d, _)| *d)
            .collect();
        for d in &datums {
            p.datums.remove(d);
        }
        if p.datums.is_empty() {
            self.unconfirmed = None;
        }
        datums.sort_unstable();
        let src = Src {
            node: from,
            epoch,
            key: self.sender_key(from),
        };
        let mut report = NoticeReport::default();
        for d in datums {
            self.take_notice(ViewAt::Current, d, src, now, &mut report);
        }
        self.count_report(&report);
    }

    /// Refuses the notices waiting for their sender's confirmation
    /// ([`Handoff::confirm_parked`]) whose sender and install count match
    /// `spent`: counted (`notices_unconfirmed`), nothing else changes (the
    /// wait goes on, for the done markers or the timeout).
    pub(super) fn refuse_unconfirmed(&mut self, spent: impl Fn(&NodeId, u64) -> bool) {
        let Some(p) = self.unconfirmed.as_mut() else {
            return;
        };
        let refused: Vec<u32> = p
            .senders
            .iter()
            .enumerate()
            .filter(|(_, (n, e))| spent(n, *e))
            .map(|(i, _)| i as u32)
            .collect();
        if refused.is_empty() {
            return;
        }
        let before = p.datums.len();
        p.datums.retain(|_, i| !refused.contains(i));
        let gone = before - p.datums.len();
        if p.datums.is_empty() {
            self.unconfirmed = None;
        }
        if gone > 0 {
            self.counters.notices_unconfirmed += gone as u64;
            debug!(node = %self.local, notices = gone, "parked notices refused: not confirmed by their sender");
        }
    }

    pub(super) fn count_report(&mut self, r: &NoticeReport) {
        let c = &mut self.counters;
        c.notices_accepted += r.accepted as u64;
        c.notices_duplicate += r.duplicate as u64;
        c.notices_stale += r.stale as u64;
        c.notices_misdirected += r.misdirected as u64;
        c.notices_parked += r.parked as u64;
        c.notices_parked_dropped += r.overflow as u64;
        c.notices_unknown_type += r.unknown_type as u64;
        c.notices_copy_refused += r.copies as u64;
    }
}
