//! Notice batches from peers: decoded, matched to the member that sent
//! them, handed to the handoff (or kept for a short grace when they name a
//! view not installed here yet), and answered.

use std::time::Instant;

use shoal_placement::NodeId;
use shoal_transition::NoticeBatch;
use tracing::{debug, warn};

use crate::{EarlyNotice, NodeCore, Output, Work};

impl<W: Work, R> NodeCore<W, R> {
    /// A notice batch request from the authenticated peer `peer` (its
    /// name). Answered through [`Output::AnswerNotices`] with `reply`: at
    /// once, or once the view it names is installed here (at most
    /// `notice_grace` later).
    pub fn handle_notices(&mut self, peer: &str, bytes: &[u8], reply: R, now: Instant) {
        self.refresh_standing(now);
        let batch = match NoticeBatch::decode(bytes, &self.handoff.config().wire) {
            Ok(batch) => batch,
            Err(error) => {
                self.counters.malformed_notices += 1;
                debug!(node = %self.me, from = peer, %error, "undecodable notice batch");
                self.outputs.push_back(Output::AnswerNotices {
                    reply,
                    accepted: false,
                });
                return;
            }
        };
        if batch.view != self.handoff.view_id()
            && self.early_notices.len() < self.config.max_early_notices
        {
            // Sent under a view this node has not installed (yet): the
            // sender saw the change first. Give gossip a moment to bring it
            // here; a recurring view id would otherwise make the notices
            // look stale.
            self.early_notices.push_back(EarlyNotice {
                until: now + self.config.notice_grace,
                peer: peer.to_owned(),
                batch,
                reply,
            });
            return;
        }
        self.take_notices(peer, batch, reply, now);
    }

    /// Notice batches waiting for their view.
    pub fn early_notices(&self) -> usize {
        self.early_notices.len()
    }

    /// Hands early notice batches to the handoff once their view is in
    /// force here, or their grace ran out.
    pub(crate) fn release_early_notices(&mut self, now: Instant) {
        if self.early_notices.is_empty() {
            return;
        }
        let view = self.handoff.view_id();
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early_notices)
            .into_iter()
            .partition(|e| e.batch.view == view || now >= e.until);
        self.early_notices = keep.into();
        for e in due {
            self.take_notices(&e.peer, e.batch, e.reply, now);
        }
    }

    fn take_notices(&mut self, peer: &str, batch: NoticeBatch, reply: R, now: Instant) {
        let accepted = match self.notice_sender(peer, &batch.from) {
            Some(from) => match self.handoff.handle_batch(&from, batch, now) {
                Ok(report) => {
                    debug!(node = %self.me, from = peer, ?report, "notices");
                    true
                }
                Err(error) => {
                    warn!(node = %self.me, from = peer, %error, "notice batch refused");
                    false
                }
            },
            None => {
                debug!(node = %self.me, from = peer, "notices from an unknown member");
                false
            }
        };
        self.outputs
            .push_back(Output::AnswerNotices { reply, accepted });
    }

    /// Who sent a notice batch that `claimed` to be from: the live member of
    /// the authenticated peer's name, or the departed member of that name
    /// and generation (one the handoff still remembers as gone). A leaver's
    /// last batch (its farewell done marker, sent just before it leaves the
    /// membership) often arrives after the leave was gossiped here; it
    /// still tells the handoff that the leaver held nothing.
    fn notice_sender(&self, peer: &str, claimed: &NodeId) -> Option<NodeId> {
        let live = self
            .members
            .get(peer)
            .map(|m| NodeId::new(&*m.name, m.generation));
        if live.as_ref() == Some(claimed) || claimed.name != peer {
            return live;
        }
        if self.handoff.is_gone(claimed) {
            Some(claimed.clone())
        } else {
            live
        }
    }
}
