//! Per-peer send queues: one link task per address packets go to, and the
//! sweep that bounds them.

use super::*;

/// How often per-address state (link tasks, names) is swept, and how long
/// an address that is no member's stays without traffic before it goes.
pub(super) const LINK_IDLE: Duration = Duration::from_secs(10);
/// Link tasks kept besides `max_members`, at most: addresses that are no
/// member's (seeds, addresses being checked) beyond it are swept at once,
/// and a packet that still finds no room is dropped and counted.
const SPARE_LINKS: usize = 1024;

/// A peer's send queue, drained by its link task, and its last use.
pub(super) struct Link {
    tx: mpsc::Sender<Out>,
    used: Instant,
}

impl MembershipTask {
    /// Forgets per-address state of addresses that are no member's: those
    /// idle for `LINK_IDLE` (all of them when `all`, because the spare room
    /// is used up). Dropping a link's sender ends its task. Addresses come
    /// from packets and gossip (a peer can name any address), so this is
    /// what bounds them.
    pub(super) fn sweep_links(&mut self, now: Instant, all: bool) {
        self.next_sweep = now + LINK_IDLE;
        let members: std::collections::HashSet<SocketAddr> =
            self.membership.members().map(|m| m.addr).collect();
        let before = self.links.len();
        self.links.retain(|addr, link| {
            members.contains(addr)
                || (!all && !link.tx.is_closed() && now.duration_since(link.used) < LINK_IDLE)
        });
        let links = &self.links;
        self.names
            .retain(|addr, _| members.contains(addr) || links.contains_key(addr));
        if self.links.len() < before {
            debug!(node = %self.name, swept = before - self.links.len(), links = self.links.len(),
                "per-address state of non-members swept");
        }
    }

    /// Queues a packet for its peer; a full queue drops it (membership
    /// retransmits) and counts the drop.
    pub(super) fn send(&mut self, addr: SocketAddr, out: Out) {
        let now = Instant::now();
        let cap = self.config.max_members.saturating_add(SPARE_LINKS);
        if !self.links.contains_key(&addr) && self.links.len() >= cap {
            self.sweep_links(now, true);
            if self.links.len() >= cap {
                Counts::inc(&self.counts.datagrams_dropped);
                metrics::counter!("shoal_peer_queue_drops_total").increment(1);
                return;
            }
        }
        let tx = match self.links.get_mut(&addr).filter(|l| !l.tx.is_closed()) {
            Some(link) => {
                link.used = now;
                link.tx.clone()
            }
            None => {
                let (tx, rx) = mpsc::channel(self.peer_queue);
                tokio::spawn(link_task(
                    self.transport.clone(),
                    rx,
                    Arc::clone(&self.name),
                    Arc::clone(&self.counts),
                ));
                self.links.insert(
                    addr,
                    Link {
                        tx: tx.clone(),
                        used: now,
                    },
                );
                tx
            }
        };
        if tx.try_send(out).is_err() {
            Counts::inc(&self.counts.datagrams_dropped);
            metrics::counter!("shoal_peer_queue_drops_total").increment(1);
        }
    }
}
