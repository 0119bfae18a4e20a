//! The membership task: one per node, it owns the SWIM state machine and
//! nothing else, so probes are answered on time whatever the driver is busy
//! with (installing a view over a million datums takes the driver a few
//! hundred milliseconds; a probe timeout on the `lan` profile is 50 ms).
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
//!
//! Its parts: `events` (what goes to the driver, through the takeover gate),
//! `links` (the per-peer send queues) and `rebirth` (a new generation after
//! the cluster declared this one dead).

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

mod events;
mod links;
mod rebirth;
#[cfg(test)]
mod tests;

use links::{LINK_IDLE, Link};

/// Packets handled per wake-up of the task, before its timers run.
const INPUT_BATCH: usize = 256;

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
                    self.on_datagram(&d);
                    // Everything already received is handled before the
                    // timers of the next step: after a stall (the task
                    // waited for a core), a probe's answer that sat in the
                    // queue behind another datagram would otherwise be
                    // read only after its timeout had suspected the member.
                    for _ in 1..INPUT_BATCH {
                        let Some(d) = datagrams.try_recv() else { break };
                        self.on_datagram(&d);
                    }
                }
                Some((from, name, bytes)) = messages.recv() => {
                    self.handle_packet(from, &name, &bytes, "message");
                    for _ in 1..INPUT_BATCH {
                        let Ok((from, name, bytes)) = messages.try_recv() else { break };
                        self.handle_packet(from, &name, &bytes, "message");
                    }
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

    fn on_datagram(&mut self, d: &shoal_transport::Datagram) {
        self.names.insert(d.from.addr, d.from.name.clone());
        self.handle_packet(d.from.addr, &d.from.name, &d.payload, "datagram");
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
