//! The driver: one task per node that runs the node's core
//! ([`shoal_core::NodeCore`], every decision of the handoff and of routing)
//! on tokio over the QUIC transport. Membership runs on a task of its own
//! ([`crate::gossip`]) and hands the driver its events in order.
//!
//! The driver is a shell: it feeds the core its inputs with `now` (commands
//! from API handles, membership's events, notice batches and routed
//! messages from the dispatcher, job and send completions, owner-routed
//! messages, the core's deadline), runs the jobs the core hands out, and
//! carries out the core's outputs. It never awaits the network or the
//! application inline: every send goes through a bounded per-peer queue
//! drained by a link task (try-send), every relinquish / acquire that does
//! not complete at once and every notice batch runs as a spawned task that
//! reports back through a bounded queue.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_core::{DropReason, ForwardOutcome, NodeCore, Output};
use shoal_membership::Event as MEvent;
use shoal_placement::NodeId;
use shoal_transition::{Counters, Datum, DetState, HandoffEvent, Job, JobKind, SendId};
use shoal_transport::{Dest, MessageReceiver, NodeName, Peer, Responder, Transport, WhenFull};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, trace, warn};

use crate::channel::{ChannelTable, Delivery};
use crate::config::NodeConfig;
use crate::datum::{CatchPanic, ErasedDatum, Factory, HandoffContext, panic_message};
use crate::error::Error;
use crate::gossip::{FromMembership, MembershipSnapshot};
use crate::lease::LeaseCell;
use crate::view::{ClusterView, NodeInfo, Snapshot, TransitionReport};
use crate::wire::{
    self, CH_MEMBERSHIP, CH_NOTICES, CH_REFUSED, CH_ROUTED, CH_ROUTED_BATCH, Refusal, RefuseReason,
    Routed, RoutedBatch, USER_CHANNEL_BIT,
};

mod commands;
mod counts;
mod dispatch;
mod inputs;
mod jobs;
mod membership;
mod outputs;
mod queues;

pub(crate) use commands::Command;
pub(crate) use counts::Counts;
use dispatch::{answer, answer_routed, dispatch, refuse};
pub(crate) use queues::{Out, link_task};
use queues::{Pending, wait_room};

/// The core as the facade runs it: routed messages, and notice requests
/// answered through the transport (the request's bytes ride along, holding
/// their inbound budget while an early batch waits).
pub(crate) type Core = NodeCore<Routed, (Option<Responder>, Bytes)>;

/// Longest a notice batch request, or a leaving node's acknowledged
/// forward or refusal, waits for the receiver's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Items the driver takes from one input queue per wake-up.
const BATCH: usize = 256;
/// Registered datums from which feeding a view runs in `block_in_place`.
const BLOCKING_INSTALL_DATUMS: usize = 50_000;
/// Jobs completed inline per pump; more wait for the next turn of the loop,
/// so a million no-op jobs never keep the driver from its inputs.
const INLINE_JOBS_PER_PUMP: usize = 2048;
/// Jobs whose datums are read ahead together ([`Driver::warm_datums`]).
const WARM_AHEAD: usize = 32;

/// The driver's inputs from the node.
pub(crate) struct DriverInputs {
    /// Messages from the transport, read by the dispatcher.
    pub(crate) messages: MessageReceiver,
    /// Where the dispatcher hands reliable membership messages.
    pub(crate) membership_tx: mpsc::Sender<(SocketAddr, NodeName, Bytes)>,
    /// Events and acknowledgements from the membership task.
    pub(crate) membership_rx: mpsc::Receiver<FromMembership>,
    /// Commands from API handles.
    pub(crate) cmd_rx: mpsc::Receiver<Command>,
    /// Messages for datum owners, from this node's senders.
    pub(crate) owner_rx: mpsc::Receiver<Routed>,
}

/// A notice batch request, from the dispatcher.
struct NoticeRequest(Peer, Bytes, Option<Responder>);

/// A routed message from a peer, from the dispatcher: one to route, or one
/// a leaving node refused and handed back.
enum RoutedIn {
    Routed(Peer, Bytes, Option<Responder>),
    /// A batch of one-way routed messages ([`RoutedBatch`]).
    Batch(Peer, Bytes),
    Refused(Peer, Bytes, Option<Responder>),
}

/// A spawned task's completion.
pub(crate) enum Done {
    Job(u64, Job, Result<(), String>),
    Send(u64, SendId, Result<(), String>),
    Forward(NodeId, Routed, ForwardOutcome),
}

struct Waiter {
    deadline: Instant,
    tx: oneshot::Sender<TransitionReport>,
}

pub(crate) struct Driver {
    config: NodeConfig,
    name: Arc<str>,
    core: Core,
    transport: Transport,
    channels: Arc<ChannelTable>,
    view_tx: watch::Sender<Arc<ClusterView>>,
    /// The application's datums, hashed as the handoff's registry is
    /// ([`DetState`]): a view's jobs come out in the registry's table
    /// order, so the lookups walk this table in the same order.
    datums: HashMap<Datum, Arc<dyn ErasedDatum>, DetState>,
    /// Factories of the types registered on demand, by type name.
    factories: HashMap<String, Factory>,
    links: HashMap<SocketAddr, mpsc::Sender<Out>>,
    /// Forwarding addresses by socket address (see `Driver::dest`).
    dests: HashMap<SocketAddr, Dest>,
    backlog: VecDeque<Pending>,
    done_tx: mpsc::Sender<Done>,
    /// The notice sends in flight: stopped when the core cancels them.
    sends: HashMap<SendId, tokio::task::AbortHandle>,
    /// The last step of a leave, once asked.
    closing: Option<(Instant, oneshot::Sender<()>)>,
    waiters: Vec<Waiter>,
    report_base: Counters,
    counts: Arc<Counts>,
    version: u64,
    /// The ownership lease, as the membership task last published it.
    lease: Arc<LeaseCell>,
    stop: bool,
    /// Jobs are left over from the last pump: loop again at once.
    more_jobs: bool,
}

impl Driver {
    pub(crate) fn new(
        config: NodeConfig,
        core: Core,
        transport: Transport,
        channels: Arc<ChannelTable>,
        view_tx: watch::Sender<Arc<ClusterView>>,
        counts: Arc<Counts>,
    ) -> (Driver, mpsc::Receiver<Done>) {
        let capacity = config.limits.max_relinquish_jobs + config.limits.max_acquire_jobs + 2048;
        let (done_tx, done_rx) = mpsc::channel(capacity);
        let driver = Driver {
            config,
            name: Arc::clone(&core.local().name),
            core,
            transport,
            channels,
            view_tx,
            datums: HashMap::default(),
            factories: HashMap::new(),
            links: HashMap::new(),
            dests: HashMap::new(),
            backlog: VecDeque::new(),
            done_tx,
            sends: HashMap::new(),
            closing: None,
            waiters: Vec::new(),
            report_base: Counters::default(),
            counts,
            version: 0,
            lease: Arc::new(LeaseCell::new(Instant::now())),
            stop: false,
            more_jobs: false,
        };
        (driver, done_rx)
    }

    /// The lease cell the membership task publishes the lease in.
    pub(crate) fn lease(&self) -> Arc<LeaseCell> {
        Arc::clone(&self.lease)
    }

    /// The time, with the core told the lease as it stands now.
    fn now(&mut self) -> Instant {
        let now = Instant::now();
        self.core.set_lease(self.lease.lease(), now);
        now
    }

    /// The driver's loop; ends on [`Command::Shutdown`], at the end of
    /// [`Command::Close`], or when every API handle is gone.
    pub(crate) async fn run(mut self, mut done_rx: mpsc::Receiver<Done>, inputs: DriverInputs) {
        let DriverInputs {
            mut messages,
            membership_tx,
            mut membership_rx,
            mut cmd_rx,
            mut owner_rx,
        } = inputs;
        let (notice_tx, mut notice_rx) = mpsc::channel(1024);
        let (routed_tx, mut routed_rx) = mpsc::channel(self.config.limits.owner_queue);
        // Control messages (membership, notices) have a dispatcher of their
        // own: the other one may wait for room in a full user channel or
        // owner-routed queue, which must not delay them.
        let spawn_dispatch = |messages| {
            tokio::spawn(dispatch(
                messages,
                self.transport.clone(),
                Arc::clone(&self.channels),
                Arc::clone(&self.counts),
                membership_tx.clone(),
                notice_tx.clone(),
                routed_tx.clone(),
            ))
        };
        let control = messages.take_control().map(spawn_dispatch);
        let data = spawn_dispatch(messages);
        let mut membership_buf = Vec::with_capacity(BATCH);
        let mut owner_buf = Vec::with_capacity(BATCH);
        let mut routed_buf = Vec::with_capacity(BATCH);
        let mut done_buf = Vec::with_capacity(BATCH);
        // Local sends are taken until a leave's last step drained them.
        let mut owner_open = true;
        loop {
            let now = self.now();
            self.pump(now);
            if self.closing.is_some() {
                // New local sends fail from now on; those queued are routed.
                owner_rx.close();
                let late = self.closing.as_ref().is_some_and(|c| now >= c.0);
                if (!owner_open || late) && self.closed(now) {
                    break;
                }
            }
            if self.stop {
                break;
            }
            let far = now + Duration::from_secs(3600);
            let deadline = self.next_deadline().unwrap_or(far);
            let paused = !self.backlog.is_empty();
            let room = self.backlog_room();
            let more_jobs = self.more_jobs;
            tokio::select! {
                biased;
                cmd = cmd_rx.recv() => match cmd {
                    Some(cmd) => { let now = self.now(); self.on_command(cmd, now) }
                    None => break,
                },
                n = membership_rx.recv_many(&mut membership_buf, BATCH) => {
                    if n == 0 { break; }
                    let now = self.now();
                    for item in membership_buf.drain(..) {
                        self.on_membership(item, now);
                    }
                }
                Some(NoticeRequest(peer, bytes, reply)) = notice_rx.recv() => {
                    let now = self.now();
                    let hold = bytes.clone();
                    self.core.handle_notices(peer.name.as_str(), &bytes, (reply, hold), now);
                }
                n = done_rx.recv_many(&mut done_buf, BATCH) => {
                    if n == 0 { break; }
                    let now = self.now();
                    for done in done_buf.drain(..) {
                        self.on_done(done, now);
                    }
                }
                () = wait_room(room), if paused => self.flush_backlog(),
                n = routed_rx.recv_many(&mut routed_buf, BATCH), if !paused => {
                    if n == 0 { break; }
                    let now = self.now();
                    for item in routed_buf.drain(..) {
                        self.on_routed_in(item, now);
                    }
                }
                n = owner_rx.recv_many(&mut owner_buf, BATCH), if !paused && owner_open => {
                    if n == 0 {
                        if self.closing.is_none() { break; }
                        owner_open = false;
                        continue;
                    }
                    let now = self.now();
                    for routed in owner_buf.drain(..) {
                        self.core.route_local(routed, now);
                    }
                }
                // Jobs left over: let the other tasks run, then pump again.
                () = tokio::task::yield_now(), if more_jobs => {}
                () = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
        if let Some((_, tx)) = self.closing.take() {
            self.counts
                .dropped(DropReason::LeaveTimeout, owner_rx.len() as u64);
            // From here on the dispatcher refuses routed messages; those it
            // handed over already are refused here. It runs until the
            // transport shuts down.
            self.counts.refusing.store(true, Ordering::SeqCst);
            routed_rx.close();
            while let Ok(item) = routed_rx.try_recv() {
                match item {
                    RoutedIn::Routed(peer, body, reply) => {
                        refuse(&self.transport, &self.counts, &peer, &body, reply);
                    }
                    RoutedIn::Batch(peer, body) => {
                        dispatch::refuse_batch(&self.transport, &self.counts, &peer, &body)
                    }
                    RoutedIn::Refused(_, _, reply) => answer_routed(reply, wire::ROUTED_REFUSED),
                }
            }
            let _ = tx.send(());
            info!(node = %self.name, "driver closed: routed messages are refused from now on");
        } else {
            data.abort();
            if let Some(control) = &control {
                control.abort();
            }
            // Stopped without leaving: what is still here is lost.
            let lost =
                self.backlog_routed() + self.core.routed_left() + routed_rx.len() + owner_rx.len();
            self.counts.dropped(DropReason::Shutdown, lost as u64);
            debug!(node = %self.name, "driver stopped");
        }
    }

    /// Whether a leave's last step is over: nothing held, parked, queued or
    /// waiting for an answer (or its deadline passed, and what is left is
    /// counted as dropped).
    fn closed(&mut self, now: Instant) -> bool {
        let Some((deadline, _)) = &self.closing else {
            return false;
        };
        if self.core.routed_idle() && self.backlog.is_empty() && self.links_idle() {
            return true;
        }
        if now < *deadline {
            return false;
        }
        let left = self.backlog.len() + self.core.routed_left();
        warn!(node = %self.name, left, "leave deadline: routed messages left behind");
        self.counts.dropped(DropReason::LeaveTimeout, left as u64);
        true
    }

    fn next_deadline(&self) -> Option<Instant> {
        [
            self.core.poll_timeout(),
            self.waiters.iter().map(|w| w.deadline).min(),
            self.closing.as_ref().map(|c| c.0),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn pump(&mut self, now: Instant) {
        if self.core.poll_timeout().is_some_and(|t| t <= now) {
            self.core.handle_timeout(now);
        }
        self.run_jobs(now);
        self.carry_out(now);
        // Publish first: a caller woken by a finished transition reads the
        // owners of the view it installed.
        if self.core.take_view_changed() {
            self.publish();
        }
        self.finish_waiters(now);
    }
}
