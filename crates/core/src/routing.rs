//! Owner-bound messages: routed to the owner of their datum (here, on to
//! the owner, or held during a handoff), parked when two nodes disagree on
//! the owner or the owner is leaving, handed back by a leaver and routed
//! again.

use std::time::Instant;

use shoal_placement::NodeId;
use shoal_transition::{Datum, HoldErrorKind, Route};
use tracing::{debug, info};

use crate::{DropReason, ForwardOutcome, NodeCore, Output, Parked, Work};

/// Where a message goes.
enum Decision {
    Here,
    Forward(NodeId),
    Hold(Datum),
    Drop(DropReason),
}

impl<W: Work, R> NodeCore<W, R> {
    /// Routes a message the application sent from this node.
    pub fn route_local(&mut self, work: W, now: Instant) {
        self.refresh_standing(now);
        self.route(work, true, false, now);
    }

    /// Routes a message a peer handed over. Its origin (delivered to the
    /// application as its sender) must fit the authenticated `sender`: a
    /// first hop comes from its origin itself; a forwarded one from a
    /// member of the view, or one that left it in the last
    /// `departed_grace`. Otherwise the origin is replaced by the sender.
    pub fn route_from_peer(&mut self, mut work: W, sender: &str, now: Instant) {
        self.refresh_standing(now);
        if let Some(origin) = work.origin()
            && origin != sender
            && !(work.hops() > 0
                && (self.members.contains_key(sender) || self.departed.contains_key(sender)))
        {
            self.counters.origin_replaced += 1;
            debug!(node = %self.me, from = sender, origin, hops = work.hops(),
                "routed message's origin is not its sender's: replaced by the sender");
            work.set_origin(sender);
        }
        self.route(work, false, false, now);
    }

    /// Routes a message again: one a send failed for, or one held in the
    /// driver's queues when a leave's last step began. Parked while its
    /// owner refuses.
    pub fn route_again(&mut self, work: W, now: Instant) {
        self.refresh_standing(now);
        self.route(work, false, true, now);
    }

    /// The live member `sender` refused a routed message (it is leaving)
    /// and handed it back: messages for it are parked until the view moves
    /// on, and this one is routed again.
    pub fn handle_refusal(&mut self, sender: &str, work: W, now: Instant) {
        if let Some(m) = self.members.get(sender) {
            self.refusing.insert(NodeId::new(&*m.name, m.generation));
        }
        self.counters.rerouted += 1;
        self.route_again(work, now);
    }

    /// An acknowledged forward to `to` completed.
    pub fn forward_done(&mut self, to: NodeId, work: W, outcome: ForwardOutcome, now: Instant) {
        self.forwards_in_flight = self.forwards_in_flight.saturating_sub(1);
        match outcome {
            ForwardOutcome::Taken => {}
            ForwardOutcome::Refused => {
                self.refusing.insert(to);
                self.counters.rerouted += 1;
                self.route_again(work, now);
            }
            ForwardOutcome::Failed(error) => {
                // The receiver may have taken it: not sent again.
                debug!(node = %self.me, owner = %to, %error, "acknowledged forward failed");
                self.drop_work(DropReason::ForwardFailed, work);
            }
        }
    }

    /// The last step of a leave: from now on forwards are acknowledged and
    /// nothing is parked; every parked message is routed again now.
    pub fn close(&mut self, now: Instant) {
        info!(node = %self.me, parked = self.parked.len(), "closing: handing on routed messages");
        self.closing = true;
        self.reroute_parked(now, true);
    }

    /// Drops every parked message (the node stops), as `reason`.
    pub fn drop_parked(&mut self, reason: DropReason) {
        for p in std::mem::take(&mut self.parked) {
            self.drop_work(reason, p.work);
        }
    }

    /// Counts `work` dropped for `reason` and hands it out
    /// ([`Output::Dropped`]).
    pub(crate) fn drop_work(&mut self, reason: DropReason, work: W) {
        self.counters.dropped(reason, 1);
        self.outputs.push_back(Output::Dropped { reason, work });
    }

    /// Counts `n` messages the driver dropped for `reason`.
    pub fn count_dropped(&mut self, reason: DropReason, n: u64) {
        self.counters.dropped(reason, n);
    }

    /// Routes parked messages again: those due at `now`, or all of them
    /// (a new view was installed, or the node is closing).
    pub(crate) fn reroute_parked(&mut self, now: Instant, all: bool) {
        let mut due = Vec::new();
        while let Some(p) = self.parked.front() {
            if !all && p.retry_at > now {
                break;
            }
            if let Some(p) = self.parked.pop_front() {
                due.push(p);
            }
        }
        for p in due {
            if now >= p.expires {
                self.drop_work(DropReason::Expired, p.work);
                continue;
            }
            self.route(p.work, false, true, now);
        }
    }

    /// Where work for a datum that is not registered here goes: to the
    /// primary of the table in force, or here when that is this node.
    fn unregistered(&self, id: i64) -> Decision {
        if self.fenced {
            return Decision::Drop(DropReason::Fenced);
        }
        let table = self.handoff.table();
        match table.primary(id).and_then(|i| table.view().node(i)) {
            Some(node) if *node == self.me => Decision::Here,
            Some(node) => Decision::Forward(node.clone()),
            None => Decision::Drop(DropReason::NoOwner),
        }
    }

    /// Registers datum `d` on demand when work for it reaches this node as
    /// its primary: its type is made on demand, this node is not fenced,
    /// and the table in force names this node.
    fn register_on_demand(&mut self, d: Datum, now: Instant) -> bool {
        if self.fenced || !self.handoff.is_on_demand(d.ty) {
            return false;
        }
        let table = self.handoff.table();
        let mine = table
            .primary(d.id)
            .and_then(|i| table.view().node(i))
            .is_some_and(|n| *n == self.me);
        if !mine {
            return false;
        }
        match self.handoff.register(d, now) {
            Ok(_) => true,
            Err(error) => {
                debug!(node = %self.me, %error, id = d.id, "on-demand registration refused");
                false
            }
        }
    }

    /// Routes `work`: `from_here` when the application sent it on this
    /// node (its hop count stays), `retry` when it was parked or handed
    /// back (never parked for the hop limit again).
    pub(crate) fn route(&mut self, mut work: W, from_here: bool, retry: bool, now: Instant) {
        let datum = self
            .handoff
            .lookup_type(work.datum_type())
            .map(|ty| Datum::new(ty, work.datum_id()))
            .filter(|d| self.handoff.is_registered(*d) || self.register_on_demand(*d, now));
        let decision = match datum {
            Some(d) => match self.handoff.route(d) {
                Route::Process => Decision::Here,
                Route::Forward(node) => Decision::Forward(node.clone()),
                Route::Hold => Decision::Hold(d),
                Route::Fenced => Decision::Drop(DropReason::Fenced),
            },
            None => self.unregistered(work.datum_id()),
        };
        match decision {
            Decision::Here => self.deliver(work),
            Decision::Forward(node) if self.refusing.contains(&node) => {
                // The owner in force is leaving and refuses: wait for the
                // view without it.
                self.park(work, now);
            }
            Decision::Forward(node) => {
                if !from_here {
                    // A closing node parks nothing: parked messages would
                    // be lost when it stops.
                    if work.hops() >= self.config.max_forward_hops && !retry && !self.closing {
                        // This node and the sender disagree on the owner:
                        // one of them has not seen the newest view yet.
                        // Keep the message and route it again shortly.
                        self.park(work, now);
                        return;
                    }
                    work.set_hops(work.hops().saturating_add(1));
                }
                self.forward_to(node, work);
            }
            Decision::Hold(d) => match self.handoff.hold(d, work) {
                Ok(()) => self.counters.held += 1,
                Err(e) => {
                    let reason = match e.kind {
                        HoldErrorKind::Full => DropReason::HoldFull,
                        HoldErrorKind::Fenced => DropReason::Fenced,
                        HoldErrorKind::NotHeld => DropReason::NotHeld,
                    };
                    self.drop_work(reason, e.work);
                }
            },
            Decision::Drop(reason) => self.drop_work(reason, work),
        }
    }

    pub(crate) fn park(&mut self, work: W, now: Instant) {
        if self.parked.len() >= self.config.park_capacity {
            self.drop_work(DropReason::ParkFull, work);
            return;
        }
        self.counters.held += 1;
        self.parked.push_back(Parked {
            retry_at: now + self.config.reroute_delay,
            expires: now + self.config.park_expiry,
            work,
        });
    }

    pub(crate) fn deliver(&mut self, work: W) {
        self.counters.delivered += 1;
        self.outputs.push_back(Output::Deliver(work));
    }

    pub(crate) fn forward_to(&mut self, node: NodeId, work: W) {
        let Some(addr) = self.members.get(&*node.name).map(|m| m.addr) else {
            self.drop_work(DropReason::UnknownOwner, work);
            return;
        };
        self.counters.forwarded += 1;
        if self.closing {
            // Leaving: the owner answers once it took the message, so this
            // node knows nothing is lost when it stops.
            self.forwards_in_flight += 1;
        }
        self.outputs.push_back(Output::Forward {
            to: node,
            addr,
            work,
            acknowledged: self.closing,
        });
    }
}
