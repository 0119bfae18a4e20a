//! Tokens out: a token taken or returned goes where the view in force says,
//! and notices to one peer collect in its batch until flushed.

use super::*;

impl<W> Handoff<W> {
    /// The next notice batch to send. Batches fill up to `max_batch`; a
    /// partly filled one goes out once no relinquish is queued or running,
    /// or after `batch_linger`. Report the outcome with [`Handoff::send_done`].
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.fenced {
            return None;
        }
        if self.transmits.is_empty()
            && self.registry.count(Phase::RelinquishQueued) == 0
            && self.registry.count(Phase::Relinquishing) == 0
        {
            for i in 0..self.out.len() {
                self.flush(i);
            }
            self.maybe_send_done();
        }
        self.transmits.pop_front()
    }

    /// This node has the datum's token (the right to acquire it): acquire it
    /// if primary here, else pass it to the primary, else keep it.
    pub(super) fn take_token(&mut self, d: Datum, mut s: Slot, source: Source, now: Instant) {
        let (phase, primary) = self.token_phase(d.id);
        s.enter(phase);
        if phase == Phase::AcquireQueued {
            s.attempt = 0;
        }
        self.registry.set(d, s);
        self.after_token(d, primary, source, now);
    }

    /// Where a token for datum `id` goes: the datum's next phase here.
    #[inline]
    pub(super) fn token_phase(&self, id: i64) -> (Phase, Primary) {
        let primary = self.primary_of(id);
        let phase = match primary {
            Primary::Me => Phase::AcquireQueued,
            Primary::Other(_) => Phase::TokenQueued,
            Primary::Nobody => Phase::TokenParked,
        };
        (phase, primary)
    }

    /// The effects of a token arriving, once the slot has its new phase.
    pub(super) fn after_token(&mut self, d: Datum, primary: Primary, source: Source, now: Instant) {
        if !self.returning.is_empty() {
            self.returning.remove(&d);
        }
        if !self.deferred.is_empty() {
            self.deferred.remove(&d);
        }
        match primary {
            Primary::Me => {
                self.acquire_queue.push_back(d);
                let why = match source {
                    Source::Fresh => JobReason::First,
                    Source::Notice | Source::PassOn => JobReason::Handoff,
                    Source::OwnerGone => JobReason::Failover,
                    Source::AllDone => JobReason::NobodyHeld,
                    Source::Timeout => JobReason::Timeout,
                    Source::Relinquished | Source::Reroute => JobReason::Returned,
                };
                self.registry.modify(&d, |s| s.reason = why);
                let reason = match source {
                    Source::Timeout => {
                        self.counters.acquired_after_timeout += 1;
                        Some(WithoutNotice::Timeout)
                    }
                    Source::OwnerGone => {
                        self.counters.acquired_owner_gone += 1;
                        Some(WithoutNotice::OwnerGone)
                    }
                    Source::AllDone => {
                        self.counters.acquired_all_done += 1;
                        Some(WithoutNotice::AllDone)
                    }
                    _ => None,
                };
                // Other notices for it, parked under views not seen here,
                // are spent: a recurring view id must not revive them.
                self.forget_parked(d);
                if let Some(reason) = reason {
                    debug!(node = %self.local, datum = %d, ?reason, "acquiring without notice");
                    self.events
                        .push_back(HandoffEvent::AcquiredWithoutNotice { datum: d, reason });
                }
            }
            Primary::Other(i) => {
                if matches!(source, Source::Notice | Source::OwnerGone) {
                    self.counters.notices_relayed += 1;
                }
                let full = if let Some(buf) = self.out.get_mut(i.get()) {
                    buf.datums.push(d);
                    if buf.since.is_none() {
                        buf.since = Some(now);
                    }
                    buf.datums.len() >= self.config.max_batch
                } else {
                    false
                };
                if full {
                    self.flush(i.get());
                }
            }
            Primary::Nobody => {}
        }
        self.maybe_release(d);
    }

    /// Moves the outgoing buffer of node index `i` to the transmit queue.
    pub(super) fn flush(&mut self, i: usize) {
        let Some(buf) = self.out.get_mut(i) else {
            return;
        };
        buf.since = None;
        let pending = std::mem::take(&mut buf.datums);
        if pending.is_empty() {
            return;
        }
        let Some(to) = self.current.view().node(NodeIndex(i as u32)).cloned() else {
            return;
        };
        let mut datums = Vec::with_capacity(pending.len());
        for d in pending {
            let passed = self.registry.modify(&d, |s| {
                let queued = s.phase() == Phase::TokenQueued;
                if queued {
                    s.enter(Phase::Passed);
                }
                queued
            });
            if passed == Some(true) {
                datums.push(d);
            }
        }
        if datums.is_empty() {
            return;
        }
        let address = Address {
            to,
            view: self.current.view_id(),
            epoch: self.install_seq,
        };
        self.send_notices(address, datums);
    }

    /// Hands out one notice batch for `datums` (already `Passed`).
    pub(super) fn send_notices(&mut self, address: Address, datums: Vec<Datum>) {
        // Grouped by type; the datums keep the registry's order (the
        // encoder sorts the ids), so the completions walk memory in order.
        let mut groups: Vec<(DatumType, NoticeGroup)> = Vec::new();
        for d in &datums {
            let at = match groups.iter().position(|(ty, _)| *ty == d.ty) {
                Some(at) => at,
                None => {
                    let name = self.types.name(d.ty).unwrap_or_default().to_owned();
                    groups.push((
                        d.ty,
                        NoticeGroup {
                            datum_type: name,
                            ids: Vec::new(),
                        },
                    ));
                    groups.len() - 1
                }
            };
            if let Some((_, g)) = groups.get_mut(at) {
                g.ids.push(d.id);
            }
        }
        groups.sort_unstable_by_key(|(ty, _)| *ty);
        let groups: Vec<NoticeGroup> = groups.into_iter().map(|(_, g)| g).collect();
        let id = self.next_send;
        self.next_send += 1;
        self.counters.batches_sent += 1;
        self.counters.notices_sent += datums.len() as u64;
        let to = address.to.clone();
        if address.epoch == self.install_seq && !self.peers.is_notified(&to) {
            self.peers.note_notified(&to);
        }
        let batch = NoticeBatch {
            view: address.view,
            from: self.local.clone(),
            to: to.clone(),
            groups,
            epoch: address.epoch,
            done: false,
            echo: 0,
        };
        self.sent.insert(
            id,
            SentBatch {
                datums,
                state: None,
                notice: Some(address),
            },
        );
        self.transmits.push_back(Transmit {
            id: SendId(id),
            to,
            batch,
        });
    }
}
