//! The membership task: one per node, it owns the SWIM state machine and
//! nothing else, so probes are answered on time whatever the driver is busy
//! with (installing a view over a million datums takes the driver a few
//! hundred milliseconds; a probe timeout on the `lan` profile is 100 ms).
//!
//! It reads membership datagrams and reliable membership messages, runs the
//! state machine's timers, sends its packets through its own bounded per-peer
//! queues, and hands the driver, in order, through one bounded queue: the
//! membership events, this node's own record when it changes, and the
//! acknowledgements of commands (sent after the events the command caused,
//! so a caller that waited for `set_ready` finds the driver already knows).
//! When that queue is full the task stops taking events out of the state
//! machine (whose own queue is bounded and coalesces view changes) and stops
//! reading commands until there is room; it keeps answering probes.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use shoal_membership::{Event as MEvent, LocalNode, Member, Membership, TakeoverGate};
use shoal_transport::{DatagramReceiver, Dest, NodeName, Transport};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::driver::{Counts, Out, link_task};
use crate::error::Error;
use crate::view::NodeInfo;
use crate::wire::CH_MEMBERSHIP;

/// A request for the membership task, from an API handle.
pub(crate) enum MembershipCommand {
    /// Join through these seeds.
    Join(Vec<SocketAddr>),
    /// Announce ready (or not); answered once the driver has seen the change.
    SetReady(bool, oneshot::Sender<()>),
    /// Replace the user metadata; answered once the driver has seen it.
    SetMetadata(Vec<u8>, oneshot::Sender<Result<(), Error>>),
    /// Announce the leave; answered once it has been gossiped, or at the
    /// deadline.
    Leave {
        deadline: Instant,
        tx: oneshot::Sender<()>,
    },
    /// The membership part of a snapshot.
    Snapshot(oneshot::Sender<MembershipSnapshot>),
    /// Stop.
    Shutdown,
}

/// What the membership task knows, for [`crate::Snapshot`].
pub(crate) struct MembershipSnapshot {
    pub(crate) local: NodeInfo,
    pub(crate) members: Vec<NodeInfo>,
    pub(crate) stats: shoal_membership::Stats,
}

/// An acknowledgement, delivered by the driver after the events before it.
pub(crate) enum Ack {
    Ready(oneshot::Sender<()>),
    Metadata(oneshot::Sender<Result<(), Error>>),
}

impl Ack {
    pub(crate) fn complete(self) {
        match self {
            Ack::Ready(tx) => {
                let _ = tx.send(());
            }
            Ack::Metadata(tx) => {
                let _ = tx.send(Ok(()));
            }
        }
    }
}

/// What the membership task hands the driver, in order.
pub(crate) enum FromMembership {
    /// A membership event.
    Event(MEvent),
    /// This node's own record changed (ready, metadata, incarnation, state).
    Local(Member),
    /// A command's acknowledgement.
    Ack(Ack),
    /// The cluster declared this node dead (the `DeclaredFailed` event came
    /// just before): membership now runs as a new generation of it (this
    /// record), rejoining the members it knew. The driver starts a new
    /// handoff for it.
    Reborn(Member),
}

/// Most addresses a rebirth rejoins through (members it knew, then seeds).
const REJOIN_TARGETS: usize = 64;

/// How often per-address state (link tasks, names) is swept, and how long
/// an address that is no member's stays without traffic before it goes.
const LINK_IDLE: Duration = Duration::from_secs(10);
/// Link tasks kept besides `max_members`, at most: addresses that are no
/// member's (seeds, addresses being checked) beyond it are swept at once,
/// and a packet that still finds no room is dropped and counted.
const SPARE_LINKS: usize = 1024;

/// A peer's send queue, drained by its link task, and its last use.
struct Link {
    tx: mpsc::Sender<Out>,
    used: Instant,
}

struct LeaveWaiter {
    deadline: Instant,
    tx: oneshot::Sender<()>,
}

/// The membership task's state.
pub(crate) struct MembershipTask {
    name: Arc<str>,
    membership: Membership<SmallRng>,
    transport: Transport,
    counts: Arc<Counts>,
    peer_queue: usize,
    to_driver: mpsc::Sender<FromMembership>,
    /// An item the driver's queue had no room for: sent first next time.
    stash: Option<FromMembership>,
    acks: VecDeque<Ack>,
    last_local: Member,
    /// Per-address send queues: one per address packets went to, swept
    /// (`sweep_links`) when idle and not a member's.
    links: HashMap<SocketAddr, Link>,
    /// Authenticated names by address (from packets and events), to dial a
    /// member by name; swept with the links.
    names: HashMap<SocketAddr, NodeName>,
    next_sweep: Instant,
    leave_waiters: Vec<LeaveWaiter>,
    fenced: bool,
    stop: bool,
    /// The membership configuration, for a rebirth.
    config: shoal_membership::Config,
    /// Seeds of the last join, for a rebirth.
    seeds: Vec<SocketAddr>,
    /// What the application last asked: ready or not.
    wanted_ready: bool,
    /// Reborn, and not yet rejoined: not ready until another member is
    /// known (a node must know the cluster before it is placed on).
    rejoining: bool,
    /// A rebirth to hand the driver (after the `DeclaredFailed` event).
    reborn: Option<Member>,
    /// Whether the node is leaving (a declared death then is no reason to
    /// come back).
    leaving: bool,
    /// Holds a declared death back from the driver until the member's lease
    /// must have lapsed (`takeover_delay`), and drops it if the member
    /// refutes first.
    gate: TakeoverGate,
    /// Where the lease deadline is published for the driver.
    lease: Arc<crate::lease::LeaseCell>,
}

impl MembershipTask {
    pub(crate) fn new(
        membership: Membership<SmallRng>,
        config: shoal_membership::Config,
        transport: Transport,
        counts: Arc<Counts>,
        peer_queue: usize,
        to_driver: mpsc::Sender<FromMembership>,
        lease: Arc<crate::lease::LeaseCell>,
    ) -> MembershipTask {
        let last_local = membership.local().clone();
        let gate = membership.takeover_gate();
        MembershipTask {
            name: Arc::clone(&membership.local().name),
            membership,
            transport,
            counts,
            peer_queue,
            to_driver,
            stash: None,
            acks: VecDeque::new(),
            last_local,
            links: HashMap::new(),
            names: HashMap::new(),
            next_sweep: Instant::now() + LINK_IDLE,
            leave_waiters: Vec::new(),
            fenced: false,
            stop: false,
            config,
            seeds: Vec::new(),
            wanted_ready: false,
            rejoining: false,
            reborn: None,
            leaving: false,
            gate,
            lease,
        }
    }

    /// The task's loop; ends on [`MembershipCommand::Shutdown`], when every
    /// command sender is gone, or when the driver is gone.
    pub(crate) async fn run(
        mut self,
        mut datagrams: DatagramReceiver,
        mut messages: mpsc::Receiver<(SocketAddr, NodeName, Bytes)>,
        mut commands: mpsc::Receiver<MembershipCommand>,
    ) {
        let far = Duration::from_secs(3600);
        let driver = self.to_driver.clone();
        loop {
            self.step(Instant::now());
            if self.stop {
                break;
            }
            let deadline = self.next_deadline().unwrap_or_else(|| Instant::now() + far);
            let blocked = self.stash.is_some();
            tokio::select! {
                biased;
                Some(d) = datagrams.recv() => {
                    self.names.insert(d.from.addr, d.from.name.clone());
                    self.handle_packet(d.from.addr, &d.from.name, &d.payload, "datagram");
                }
                Some((from, name, bytes)) = messages.recv() => {
                    self.handle_packet(from, &name, &bytes, "message");
                }
                cmd = commands.recv(), if !blocked => match cmd {
                    Some(cmd) => self.on_command(cmd, Instant::now()),
                    None => break,
                },
                permit = driver.reserve(), if blocked => match permit {
                    Ok(permit) => {
                        if let Some(item) = self.stash.take() {
                            permit.send(item);
                        }
                    }
                    Err(_) => break,
                },
                () = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
        debug!(node = %self.name, "membership task stopped");
    }

    /// Hands membership a packet with the name the transport authenticated
    /// for its sender (the certificate's name): membership accepts claims
    /// a node makes about itself only under its own name.
    fn handle_packet(
        &mut self,
        from: SocketAddr,
        name: &NodeName,
        bytes: &[u8],
        what: &'static str,
    ) {
        if let Err(error) =
            self.membership
                .handle_packet(from, Some(name.as_str()), bytes, Instant::now())
        {
            Counts::inc(&self.counts.malformed);
            debug!(node = %self.name, %from, %error, what, "malformed membership packet");
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.membership.poll_timeout(),
            self.gate.poll_timeout(),
            self.leave_waiters.iter().map(|w| w.deadline).min(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs due timers, sends the packets, hands the driver what it can
    /// take, and answers leave waiters.
    fn step(&mut self, now: Instant) {
        if self.membership.poll_timeout().is_some_and(|t| t <= now) {
            self.membership.handle_timeout(now);
        }
        if self.gate.poll_timeout().is_some_and(|t| t <= now) {
            self.gate.handle_timeout(now);
        }
        self.lease.set(&self.membership.standing(now));
        if self.rejoining && self.membership.num_live() > 1 {
            // The rejoin was answered: this generation knows the cluster.
            self.rejoining = false;
            info!(node = %self.name, generation = self.membership.local().generation,
                ready = self.wanted_ready, "rejoined as a new generation");
            self.membership.set_ready(self.wanted_ready, now);
        }
        self.hand_to_driver();
        if now >= self.next_sweep {
            self.sweep_links(now, false);
        }
        while let Some(t) = self.membership.poll_transmit() {
            let dest = match self.names.get(&t.to) {
                Some(name) => Dest::node(name.clone(), t.to),
                None => Dest::addr(t.to),
            };
            let payload = Bytes::from(t.payload);
            let out = if t.reliable {
                Out::Message(dest, CH_MEMBERSHIP, payload)
            } else {
                Out::Datagram(dest, payload)
            };
            self.send(t.to, out);
        }
        if !self.leave_waiters.is_empty() {
            let quiet =
                self.membership.pending_broadcasts() == 0 || self.membership.num_live() == 0;
            let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.leave_waiters)
                .into_iter()
                .partition(|w| quiet || now >= w.deadline);
            self.leave_waiters = keep;
            for w in done {
                let _ = w.tx.send(());
            }
        }
    }

    /// Forgets per-address state of addresses that are no member's: those
    /// idle for `LINK_IDLE` (all of them when `all`, because the spare room
    /// is used up). Dropping a link's sender ends its task. Addresses come
    /// from packets and gossip (a peer can name any address), so this is
    /// what bounds them.
    fn sweep_links(&mut self, now: Instant, all: bool) {
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
    fn send(&mut self, addr: SocketAddr, out: Out) {
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

    /// Hands the driver events, then this node's record if it changed, then
    /// acknowledgements, until its queue is full.
    fn hand_to_driver(&mut self) {
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

    /// Replaces this generation, which the cluster declared dead, by a new
    /// one of the same name in the same process: a new membership state
    /// machine that rejoins through the members the old one knew (any
    /// state: after a partition the far side was "dead" here) and the
    /// seeds. It becomes ready, if the application wants it, once the
    /// rejoin is answered. The driver learns it from
    /// [`FromMembership::Reborn`] and starts a new handoff.
    fn rebirth(&mut self, now: Instant) {
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

    fn on_command(&mut self, cmd: MembershipCommand, now: Instant) {
        match cmd {
            MembershipCommand::Join(seeds) => {
                self.seeds.clone_from(&seeds);
                self.membership.join(&seeds, now);
            }
            MembershipCommand::SetReady(ready, tx) => {
                self.wanted_ready = ready;
                self.membership
                    .set_ready(ready && !self.fenced && !self.rejoining, now);
                self.acks.push_back(Ack::Ready(tx));
            }
            MembershipCommand::SetMetadata(metadata, tx) => {
                match self.membership.set_metadata(metadata, now) {
                    Ok(()) => self.acks.push_back(Ack::Metadata(tx)),
                    Err(error) => {
                        let error = match error {
                            shoal_membership::Error::MetadataTooLarge { len, max } => {
                                Error::MetadataTooLarge { len, max }
                            }
                            other => Error::Membership(other),
                        };
                        let _ = tx.send(Err(error));
                    }
                }
            }
            MembershipCommand::Leave { deadline, tx } => {
                info!(node = %self.name, "leaving");
                self.leaving = true;
                self.membership.leave(now);
                self.leave_waiters.push(LeaveWaiter { deadline, tx });
            }
            MembershipCommand::Snapshot(tx) => {
                let _ = tx.send(MembershipSnapshot {
                    local: NodeInfo::from_member(self.membership.local()),
                    members: self
                        .membership
                        .members()
                        .map(NodeInfo::from_member)
                        .collect(),
                    stats: self.membership.stats().clone(),
                });
            }
            MembershipCommand::Shutdown => self.stop = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use shoal_membership::{Config, LocalNode};
    use shoal_transport::{ClusterCa, TransportConfig};

    /// Generous bound on waits: only catches hangs.
    const HANG: Duration = Duration::from_secs(30);

    struct Running {
        addr: SocketAddr,
        transport: Transport,
        commands: mpsc::Sender<MembershipCommand>,
        events: mpsc::Receiver<FromMembership>,
        task: tokio::task::JoinHandle<()>,
    }

    /// A membership task (not running) of node `name` on a loopback
    /// transport, handing its driver events through a queue of `capacity`.
    fn task_on_loopback(
        ca: &ClusterCa,
        name: &str,
        capacity: usize,
    ) -> (
        MembershipTask,
        Transport,
        shoal_transport::Incoming,
        mpsc::Receiver<FromMembership>,
    ) {
        let identity = ca.issue(&NodeName::new(name).unwrap()).unwrap();
        let (transport, incoming) = Transport::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &identity,
            TransportConfig::default(),
        )
        .unwrap();
        let local = LocalNode {
            name: name.into(),
            generation: 1,
            addr: transport.local_addr(),
            ready: false,
            metadata: Vec::new(),
        };
        let now = Instant::now();
        let membership =
            Membership::new(Config::local(), local, SmallRng::seed_from_u64(7), now).unwrap();
        let (events_tx, events) = mpsc::channel(capacity);
        let task = MembershipTask::new(
            membership,
            Config::local(),
            transport.clone(),
            Arc::new(Counts::default()),
            64,
            events_tx,
            Arc::new(crate::lease::LeaseCell::new(now)),
        );
        (task, transport, incoming, events)
    }

    /// A membership task on loopback whose queue to the driver holds
    /// `capacity` items; nobody reads the transport's messages but this task.
    fn start(ca: &ClusterCa, name: &str, capacity: usize) -> Running {
        let (task, transport, incoming, events) = task_on_loopback(ca, name, capacity);
        let addr = transport.local_addr();
        let (messages, datagrams) = incoming.split();
        let (packets_tx, packets_rx) = mpsc::channel(64);
        // Reliable membership messages: what the dispatcher does for them.
        tokio::spawn(async move {
            let mut messages = messages;
            while let Some(m) = messages.recv().await {
                if m.channel == CH_MEMBERSHIP
                    && packets_tx
                        .send((m.from.addr, m.from.name, m.body))
                        .await
                        .is_err()
                {
                    break;
                }
            }
        });
        let (commands, commands_rx) = mpsc::channel(16);
        let task = tokio::spawn(task.run(datagrams, packets_rx, commands_rx));
        Running {
            addr,
            transport,
            commands,
            events,
            task,
        }
    }

    /// Reads what the task hands its driver until a view lists `name`.
    async fn wait_view_with(events: &mut mpsc::Receiver<FromMembership>, name: &str) {
        tokio::time::timeout(HANG, async {
            loop {
                if let FromMembership::Event(MEvent::ViewChanged(members)) =
                    events.recv().await.unwrap()
                    && members.iter().any(|m| &*m.name == name)
                {
                    break;
                }
            }
        })
        .await
        .unwrap();
    }

    async fn stop(node: Running) {
        let _ = node.commands.send(MembershipCommand::Shutdown).await;
        drop(node.events);
        let _ = node.task.await;
        node.transport.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn set_ready_is_acknowledged_after_the_events_it_caused() {
        let ca = ClusterCa::generate().unwrap();
        let mut a = start(&ca, "a", 64);
        let (tx, mut rx) = oneshot::channel();
        a.commands
            .send(MembershipCommand::SetReady(true, tx))
            .await
            .unwrap();
        let (mut local_ready, mut view_ready) = (false, false);
        tokio::time::timeout(HANG, async {
            loop {
                match a.events.recv().await.unwrap() {
                    FromMembership::Local(m) => local_ready = m.ready,
                    FromMembership::Event(MEvent::ViewChanged(members)) => {
                        view_ready = members.iter().any(|m| &*m.name == "a" && m.ready);
                    }
                    FromMembership::Event(_) => {}
                    FromMembership::Reborn(m) => panic!("unexpected rebirth as {}", m.generation),
                    FromMembership::Ack(ack) => {
                        // Nothing answered the caller before the driver
                        // completes the acknowledgement.
                        assert!(rx.try_recv().is_err());
                        ack.complete();
                        break;
                    }
                }
            }
        })
        .await
        .unwrap();
        assert!(local_ready, "the driver got the local record first");
        assert!(view_ready, "and the view with this node ready");
        rx.await.unwrap();
        stop(a).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_driver_does_not_stop_membership() {
        let ca = ClusterCa::generate().unwrap();
        // `a`'s driver does not read: its queue holds one item, filled by
        // its first view.
        let mut a = start(&ca, "a", 1);
        let mut b = start(&ca, "b", 64);
        tokio::time::timeout(HANG, async {
            while a.events.is_empty() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap();
        b.commands
            .send(MembershipCommand::Join(vec![a.addr]))
            .await
            .unwrap();
        // `b` can only learn `a` from `a`'s answer to its join, given while
        // `a`'s queue to its driver is full.
        wait_view_with(&mut b.events, "a").await;
        // Nothing was lost meanwhile: once its driver reads, `a` reports `b`.
        wait_view_with(&mut a.events, "b").await;
        stop(a).await;
        stop(b).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn per_address_state_of_non_members_is_swept_once_idle() {
        // Addresses reach the membership task from packets and gossip (a
        // peer can name any address); each gets a link task and maybe a
        // name. Those of no member must go once idle, members' must stay.
        let ca = ClusterCa::generate().unwrap();
        let (mut task, transport, _incoming, _events) = task_on_loopback(&ca, "a", 64);
        let addr = transport.local_addr();
        // Nothing listens on these ports: the link tasks' sends fail, which
        // is what a made-up address gives.
        let strangers: Vec<SocketAddr> = (0..50u16)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 40_000 + i)))
            .collect();
        for &to in &strangers {
            task.names.insert(to, NodeName::new("ghost").unwrap());
            task.send(to, Out::Datagram(Dest::addr(to), Bytes::from_static(b"x")));
        }
        // This node itself is a member: its address stays whatever happens.
        task.send(
            addr,
            Out::Datagram(Dest::addr(addr), Bytes::from_static(b"x")),
        );
        assert_eq!(task.links.len(), strangers.len() + 1);
        // Not idle yet: nothing goes.
        let now = Instant::now();
        task.sweep_links(now, false);
        assert_eq!(task.links.len(), strangers.len() + 1);
        // Idle for LINK_IDLE: the strangers' links and names go, the
        // member's link stays.
        task.sweep_links(now + LINK_IDLE, false);
        assert_eq!(
            task.links.len(),
            1,
            "{:?}",
            task.links.keys().collect::<Vec<_>>()
        );
        assert!(task.links.contains_key(&addr));
        assert!(strangers.iter().all(|s| !task.names.contains_key(s)));
        // Out of room (`all`): every non-member's link goes at once.
        for &to in &strangers[..5] {
            task.send(to, Out::Datagram(Dest::addr(to), Bytes::from_static(b"x")));
        }
        assert_eq!(task.links.len(), 6);
        task.sweep_links(Instant::now(), true);
        assert_eq!(task.links.len(), 1);
        drop(task);
        transport.shutdown().await;
    }
}
