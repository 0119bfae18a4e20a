//! What the membership task hands the driver, in order: membership's events
//! through the takeover gate, this node's own record, acknowledgements.

use super::*;

impl MembershipTask {
    /// Hands the driver events, then this node's record if it changed, then
    /// acknowledgements, until its queue is full.
    pub(super) fn hand_to_driver(&mut self) {
        loop {
            let item = match self.stash.take() {
                Some(item) => item,
                None => match self.next_for_driver() {
                    Some(item) => item,
                    None => return,
                },
            };
            match self.to_driver.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    self.stash = Some(item);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.stop = true;
                    return;
                }
            }
        }
    }

    fn next_for_driver(&mut self) -> Option<FromMembership> {
        if let Some(member) = self.reborn.take() {
            self.last_local = member.clone();
            return Some(FromMembership::Reborn(member));
        }
        // Membership's events go through the takeover gate; what the gate
        // lets out goes to the driver, in order.
        loop {
            if let Some(event) = self.gate.poll_event() {
                self.on_event(&event);
                return Some(FromMembership::Event(event));
            }
            let Some(event) = self.membership.poll_event() else {
                break;
            };
            if matches!(event, MEvent::DeclaredFailed) {
                // Self-fencing is never held back.
                self.on_event(&event);
                return Some(FromMembership::Event(event));
            }
            self.gate.handle_event(event, Instant::now());
        }
        if *self.membership.local() != self.last_local {
            self.last_local = self.membership.local().clone();
            return Some(FromMembership::Local(self.last_local.clone()));
        }
        self.acks.pop_front().map(FromMembership::Ack)
    }

    /// What the membership task itself does about an event before the
    /// driver sees it.
    fn on_event(&mut self, event: &MEvent) {
        match event {
            MEvent::Joined(m) | MEvent::Updated(m) | MEvent::Alive(m) => {
                if let Ok(name) = NodeName::new(&m.name) {
                    self.names.insert(m.addr, name);
                }
            }
            MEvent::Failed(m) | MEvent::Left(m) => {
                if *m.name != *self.name || m.generation != self.last_local.generation {
                    self.links.remove(&m.addr);
                }
            }
            MEvent::DeclaredFailed => {
                // This generation is fenced for good: leave the ready view
                // now. Unless the node is leaving, come back as a new
                // generation (the driver is told after this event).
                warn!(node = %self.name, "the cluster declared this node failed: fenced");
                self.fenced = true;
                self.membership.set_ready(false, Instant::now());
                if !self.leaving {
                    self.rebirth(Instant::now());
                }
            }
            MEvent::Suspected(_)
            | MEvent::NameConflict { .. }
            | MEvent::ViewChanged(_)
            | MEvent::StandingChanged(_) => {}
        }
    }
}
