//! Rebirth: a generation the cluster declared dead comes back as a new one.

use super::*;

/// Most addresses a rebirth rejoins through (members it knew, then seeds).
const REJOIN_TARGETS: usize = 64;

impl MembershipTask {
    /// Replaces this generation, which the cluster declared dead, by a new
    /// one of the same name in the same process: a new membership state
    /// machine that rejoins through the members the old one knew (any
    /// state: after a partition the far side was "dead" here) and the
    /// seeds. It becomes ready, if the application wants it, once the
    /// rejoin is answered. The driver learns it from
    /// [`FromMembership::Reborn`] and starts a new handoff.
    pub(super) fn rebirth(&mut self, now: Instant) {
        let old = self.membership.local().clone();
        let generation = crate::node::generation_now().max(old.generation.saturating_add(1));
        let mut targets: Vec<SocketAddr> = Vec::new();
        for addr in self
            .membership
            .members()
            .filter(|m| *m.name != *old.name)
            .map(|m| m.addr)
            .chain(self.seeds.iter().copied())
        {
            if addr != old.addr && !targets.contains(&addr) && targets.len() < REJOIN_TARGETS {
                targets.push(addr);
            }
        }
        let local = LocalNode {
            name: old.name.to_string(),
            generation,
            addr: old.addr,
            ready: false,
            metadata: old.metadata.to_vec(),
        };
        // Seeded by the operating system, never from gossiped values.
        let rng = SmallRng::from_os_rng();
        let mut membership = match Membership::new(self.config.clone(), local, rng, now) {
            Ok(m) => m,
            Err(error) => {
                warn!(node = %self.name, %error, "cannot start a new generation: stays fenced");
                return;
            }
        };
        // Connections that lived through the cut (or the pause) may be
        // stalled in QUIC's retransmission backoff for seconds after the
        // heal: requests the new generation sends on them (its first state
        // and done markers) would wait that long. Close them all: the new
        // generation dials afresh, and the peers, told of the close,
        // redial too.
        for peer in self.transport.peers() {
            self.transport.disconnect(peer.addr);
        }
        // The old generation's witness set, frozen until the new one's lease
        // has been valid once: one drawn from the members it sees alive
        // could give it a lease inside a cut-off piece.
        membership.inherit_lease(self.membership.lease_evidence(), now);
        membership.join(&targets, now);
        info!(node = %self.name, old = old.generation, generation, targets = targets.len(),
            "declared dead: rejoining as a new generation");
        metrics::counter!("shoal_rebirths_total").increment(1);
        self.membership = membership;
        self.fenced = false;
        self.rejoining = true;
        self.reborn = Some(self.membership.local().clone());
    }
}
