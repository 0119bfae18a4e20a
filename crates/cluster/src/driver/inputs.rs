//! Completions of the driver's tasks, and routed messages from peers
//! (decoded, then handed to the core).

use super::*;

impl Driver {
    pub(super) fn on_done(&mut self, done: Done, now: Instant) {
        match done {
            Done::Job(instance, job, result) => self.core.job_done(instance, job, result, now),
            Done::Send(instance, id, result) => {
                if instance == self.core.instance() {
                    self.sends.remove(&id);
                }
                self.core.send_done(instance, id, result, now);
            }
            Done::Forward(to, routed, outcome) => self.core.forward_done(to, routed, outcome, now),
        }
    }

    pub(super) fn on_routed_in(&mut self, item: RoutedIn, now: Instant) {
        let max = self.config.limits.max_message;
        match item {
            RoutedIn::Routed(peer, bytes, reply) => {
                // The payload stays a slice of the received bytes, which
                // hold the transport's inbound budget until it is dropped.
                match Routed::decode_shared(&bytes, max) {
                    Ok(routed) => self.core.route_from_peer(routed, peer.name.as_str(), now),
                    Err(error) => {
                        self.malformed_routed();
                        debug!(node = %self.name, from = %peer, %error, "malformed routed message");
                    }
                }
                // Taken (routed, or dropped and counted).
                answer_routed(reply, wire::ROUTED_TAKEN);
            }
            RoutedIn::Batch(peer, bytes) => match RoutedBatch::split(&bytes, max) {
                Ok(messages) => {
                    for m in messages {
                        match Routed::decode_shared(&m, max) {
                            Ok(routed) => {
                                self.core.route_from_peer(routed, peer.name.as_str(), now);
                            }
                            Err(error) => {
                                self.malformed_routed();
                                debug!(node = %self.name, from = %peer, %error, "malformed routed message");
                            }
                        }
                    }
                }
                Err(error) => {
                    self.malformed_routed();
                    debug!(node = %self.name, from = %peer, %error, "malformed batch of routed messages");
                }
            },
            RoutedIn::Refused(peer, bytes, reply) => match Refusal::decode(&bytes, max) {
                Ok(refusal) => {
                    debug!(node = %self.name, from = %peer, reason = ?refusal.reason, "routed message refused");
                    self.core
                        .handle_refusal(peer.name.as_str(), refusal.routed, now);
                    answer_routed(reply, wire::ROUTED_TAKEN);
                }
                Err(error) => {
                    Counts::inc(&self.counts.malformed);
                    debug!(node = %self.name, from = %peer, %error, "malformed refusal");
                    answer_routed(reply, wire::ROUTED_REFUSED);
                }
            },
        }
    }

    pub(super) fn malformed_routed(&self) {
        Counts::inc(&self.counts.malformed);
        self.counts.dropped(DropReason::Malformed, 1);
    }
}
