//! Notice batches from peers: handed to the handoff, or kept for a short
//! grace when they name a view membership has not delivered here yet.

use super::*;

impl Driver {
    pub(super) fn on_notices(&mut self, request: NoticeRequest, now: Instant) {
        let NoticeRequest(peer, bytes, reply) = request;
        let batch = match NoticeBatch::decode(&bytes, &self.handoff.config().wire) {
            Ok(batch) => batch,
            Err(error) => {
                Counts::inc(&self.counts.malformed);
                debug!(node = %self.name, from = %peer, %error, "undecodable notice batch");
                answer(reply, false);
                return;
            }
        };
        if batch.view != self.handoff.view_id() && self.early_notices.len() < MAX_EARLY_NOTICES {
            // Sent under a view this node has not installed (yet): the
            // sender saw the change first. Give gossip a moment to bring it
            // here; a recurring view id would otherwise make the notices look
            // stale.
            self.early_notices.push_back(EarlyNotice {
                until: now + NOTICE_GRACE,
                peer,
                batch,
                reply,
                _wire: bytes,
            });
            return;
        }
        self.take_notices(peer, batch, reply, now);
    }

    /// Hands early notice batches to the handoff once their view is in
    /// force here, or their grace ran out.
    pub(super) fn release_early_notices(&mut self, now: Instant) {
        if self.early_notices.is_empty() {
            return;
        }
        let view = self.handoff.view_id();
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early_notices)
            .into_iter()
            .partition(|e| e.batch.view == view || now >= e.until);
        self.early_notices = keep.into();
        for e in due {
            self.take_notices(e.peer, e.batch, e.reply, now);
        }
    }

    pub(super) fn take_notices(
        &mut self,
        peer: Peer,
        batch: NoticeBatch,
        reply: Option<Responder>,
        now: Instant,
    ) {
        let from = self.notice_sender(&peer, &batch.from);
        let ok = match from {
            Some(from) => match self.handoff.handle_batch(&from, batch, now) {
                Ok(report) => {
                    debug!(node = %self.name, from = %peer, ?report, "notices");
                    true
                }
                Err(error) => {
                    warn!(node = %self.name, from = %peer, %error, "notice batch refused");
                    false
                }
            },
            None => {
                debug!(node = %self.name, from = %peer, "notices from an unknown member");
                false
            }
        };
        answer(reply, ok);
    }

    /// Who sent a notice batch that `claimed` to be from: the live member of
    /// the authenticated peer's name, or the departed member of that name
    /// and generation (one the handoff still remembers as gone). A leaver's last batch (its farewell done marker, sent
    /// just before it leaves the membership) often arrives after the leave
    /// was gossiped here; it still tells the handoff that the leaver held
    /// nothing (`docs/transition.md` rule 6), and refusing it made the datums
    /// it had owned in a recent view wait out the timeout after a crash.
    pub(super) fn notice_sender(&self, peer: &Peer, claimed: &NodeId) -> Option<NodeId> {
        let live = self
            .members
            .get(peer.name.as_str())
            .map(|m| NodeId::new(&*m.name, m.generation));
        if live.as_ref() == Some(claimed) || claimed.name != peer.name.as_str() {
            return live;
        }
        if self.handoff.is_gone(claimed) {
            Some(claimed.clone())
        } else {
            live
        }
    }
}
