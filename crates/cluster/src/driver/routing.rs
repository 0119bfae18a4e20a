//! Owner-bound messages: taken in from peers (origin checked), routed to
//! the owner of their datum, parked during a handoff and re-routed, refused
//! back by a leaver and routed again, delivered here or forwarded.

use super::*;

impl Driver {
    pub(super) fn on_routed_in(&mut self, item: RoutedIn, now: Instant) {
        match item {
            RoutedIn::Routed(peer, bytes, reply) => {
                // The payload stays a slice of the received bytes, which
                // hold the transport's inbound budget until the payload is
                // dropped (taken by the application, or sent on).
                match Routed::decode_shared(&bytes, self.config.limits.max_message) {
                    Ok(mut routed) => {
                        if !self.origin_plausible(&routed, peer.name.as_str()) {
                            Counts::inc(&self.counts.origin_replaced);
                            debug!(node = %self.name, from = %peer, origin = %routed.origin, hops = routed.hops,
                                "routed message's origin is not its sender's: replaced by the sender");
                            routed.origin = peer.name.as_str().to_owned();
                        }
                        self.route_message(routed, false, false, now);
                    }
                    Err(error) => {
                        Counts::inc(&self.counts.malformed);
                        self.counts.dropped(DropReason::Malformed, 1);
                        debug!(node = %self.name, from = %peer, %error, "malformed routed message");
                    }
                }
                // Taken (routed, or dropped and counted here).
                answer_routed(reply, wire::ROUTED_TAKEN);
            }
            RoutedIn::Refused(peer, bytes, reply) => {
                match Refusal::decode(&bytes, self.config.limits.max_message) {
                    Ok(refusal) => {
                        debug!(node = %self.name, from = %peer, reason = ?refusal.reason, "routed message refused");
                        self.refused_by(peer.name.as_str());
                        self.reroute_refused(refusal.routed, now);
                        answer_routed(reply, wire::ROUTED_TAKEN);
                    }
                    Err(error) => {
                        Counts::inc(&self.counts.malformed);
                        debug!(node = %self.name, from = %peer, %error, "malformed refusal");
                        answer_routed(reply, wire::ROUTED_REFUSED);
                    }
                }
            }
        }
    }

    /// Whether a routed message's origin (delivered to the application as
    /// `from`) fits its authenticated sender: a first hop (`hops` 0) comes
    /// from its origin itself; a forwarded one (a node that was not the
    /// owner passed it on) from a member of the view, or one that left it
    /// in the last `DEPARTED_GRACE`, trusted to pass the origin on as it
    /// got it.
    pub(super) fn origin_plausible(&self, routed: &Routed, sender: &str) -> bool {
        routed.origin == sender
            || (routed.hops > 0
                && (self.members.contains_key(sender) || self.departed.contains_key(sender)))
    }

    /// Remembers that the live member `name` refuses routed messages (it is
    /// leaving): messages for it are parked until the view moves on.
    pub(super) fn refused_by(&mut self, name: &str) {
        if let Some(m) = self.members.get(name) {
            self.refusing.insert(NodeId::new(&*m.name, m.generation));
        }
    }

    /// Routes a message a leaving node handed back: like a parked one, to
    /// the owner in force, parked while that is a node that refuses.
    pub(super) fn reroute_refused(&mut self, routed: Routed, now: Instant) {
        Counts::inc(&self.counts.routed_rerouted);
        self.route_message(routed, false, true, now);
    }

    pub(super) fn on_forward_done(&mut self, done: ForwardDone, now: Instant) {
        self.forwards_in_flight = self.forwards_in_flight.saturating_sub(1);
        match done.result {
            Ok(true) => {}
            Ok(false) => {
                self.refusing.insert(done.node);
                self.reroute_refused(done.routed, now);
            }
            Err(error) => {
                // The receiver may have taken it: not sent again.
                debug!(node = %self.name, owner = %done.node, %error, "acknowledged forward failed");
                self.counts.dropped(DropReason::ForwardFailed, 1);
            }
        }
    }

    /// Routes a message for a datum's owner: here, on to the owner, or held.
    pub(super) fn on_routed(&mut self, routed: Routed, from_here: bool) {
        self.route_message(routed, from_here, false, Instant::now());
    }

    /// Routes parked messages again: those due at `now`, or all of them when
    /// a new view was installed.
    pub(super) fn reroute_parked(&mut self, now: Instant, all: bool) {
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
                self.counts.dropped(DropReason::Expired, 1);
                continue;
            }
            self.route_message(p.routed, false, true, now);
        }
    }

    pub(super) fn route_message(
        &mut self,
        mut routed: Routed,
        from_here: bool,
        retry: bool,
        now: Instant,
    ) {
        self.refresh_standing(now);
        enum Decision {
            Here,
            Forward(NodeId),
            Hold(Datum),
            Drop(DropReason),
        }
        let datum = self
            .handoff
            .lookup_type(&routed.datum_type)
            .map(|ty| Datum::new(ty, routed.id))
            .filter(|d| self.handoff.is_registered(*d) || self.register_on_demand(*d, now));
        let decision = match datum {
            Some(d) => match self.handoff.route(d) {
                Route::Process => Decision::Here,
                Route::Forward(node) => Decision::Forward(node.clone()),
                Route::Hold => Decision::Hold(d),
                Route::Fenced => Decision::Drop(DropReason::Fenced),
            },
            None if self.fenced => Decision::Drop(DropReason::Fenced),
            None => {
                let table = self.handoff.table();
                match table.primary(routed.id).and_then(|i| table.view().node(i)) {
                    Some(node) if *node == self.me => Decision::Here,
                    Some(node) => Decision::Forward(node.clone()),
                    None => Decision::Drop(DropReason::NoOwner),
                }
            }
        };
        match decision {
            Decision::Here => self.deliver_local(routed),
            Decision::Forward(node) if self.refusing.contains(&node) => {
                // The owner in force is leaving and refuses: wait for the
                // view without it.
                self.park(routed, now);
            }
            Decision::Forward(node) => {
                if !from_here {
                    // A closing node parks nothing: parked messages would
                    // be lost when it stops.
                    if routed.hops >= self.config.limits.max_forward_hops
                        && !retry
                        && self.closing.is_none()
                    {
                        // This node and the sender disagree on the owner:
                        // one of them has not seen the newest view yet. Keep
                        // the message and route it again shortly.
                        self.park(routed, now);
                        return;
                    }
                    routed.hops = routed.hops.saturating_add(1);
                }
                self.forward_to(&node, routed);
            }
            Decision::Hold(d) => match self.handoff.hold(d, routed) {
                Ok(()) => Counts::inc(&self.counts.routed_held),
                Err(e) => {
                    let reason = match e.kind {
                        shoal_transition::HoldErrorKind::Full => DropReason::HoldFull,
                        shoal_transition::HoldErrorKind::Fenced => DropReason::Fenced,
                        shoal_transition::HoldErrorKind::NotHeld => DropReason::NotHeld,
                    };
                    self.counts.dropped(reason, 1);
                }
            },
            Decision::Drop(reason) => self.counts.dropped(reason, 1),
        }
    }

    pub(super) fn park(&mut self, routed: Routed, now: Instant) {
        if self.parked.len() >= self.config.limits.hold_capacity {
            self.counts.dropped(DropReason::ParkFull, 1);
            return;
        }
        Counts::inc(&self.counts.routed_held);
        self.parked.push_back(Parked {
            retry_at: now + REROUTE_DELAY,
            expires: now + self.config.transition_timeout(),
            routed,
        });
    }

    pub(super) fn deliver_local(&mut self, routed: Routed) {
        let Some(tx) = self.channels.sender(routed.channel) else {
            self.counts.dropped(DropReason::UnknownChannel, 1);
            return;
        };
        Counts::inc(&self.counts.routed_delivered);
        let delivery = Delivery {
            from: Arc::from(routed.origin),
            datum: Some((Arc::from(routed.datum_type), routed.id)),
            payload: routed.payload,
        };
        self.push(Pending::Local(tx, delivery));
    }

    pub(super) fn forward_to(&mut self, node: &NodeId, routed: Routed) {
        let Some(addr) = self.members.get(&*node.name).map(|m| m.addr) else {
            self.counts.dropped(DropReason::UnknownOwner, 1);
            return;
        };
        let Ok(name) = NodeName::new(&node.name) else {
            self.counts.dropped(DropReason::UnknownOwner, 1);
            return;
        };
        Counts::inc(&self.counts.routed_forwarded);
        if self.closing.is_some() {
            // Leaving: the owner answers once its driver took the message,
            // so this node knows nothing is lost when it stops.
            self.forwards_in_flight += 1;
            let transport = self.transport.clone();
            let tx = self.forward_tx.clone();
            let dest = Dest::node(name, addr);
            let node = node.clone();
            tokio::spawn(async move {
                let answer = transport
                    .request(&dest, CH_ROUTED, routed.encode(), ROUTED_REQUEST_TIMEOUT)
                    .await;
                let result = match answer {
                    Ok(b) if &b[..] == wire::ROUTED_TAKEN => Ok(true),
                    Ok(b) if &b[..] == wire::ROUTED_REFUSED => Ok(false),
                    Ok(_) => Err(format!("{dest} answered nonsense")),
                    Err(e) => Err(e.to_string()),
                };
                let _ = tx
                    .send(ForwardDone {
                        node,
                        routed,
                        result,
                    })
                    .await;
            });
            return;
        }
        // The encoded copy keeps the payload it was made from, so a message
        // from a peer keeps its inbound budget while it waits to be sent on
        // (the per-peer queue, the backlog, the transport's send queue).
        let body = holding(routed.encode(), routed.payload);
        let out = Out::Message(Dest::node(name, addr), CH_ROUTED, body);
        self.push(Pending::Peer(addr, out));
    }
}
