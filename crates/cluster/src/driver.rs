//! The driver: one task per node that owns the handoff state machine and
//! runs it on tokio over the QUIC transport. Membership runs on a task of its
//! own ([`crate::gossip`]) and hands the driver its events in order.
//!
//! It selects over commands from API handles, membership's events, notice
//! batches from the transport, job and send completions, owner-routed
//! messages, and the earliest deadline of the handoff. It never
//! awaits the network or the application inline: every send goes through a
//! bounded per-peer queue drained by a link task (try-send), every
//! relinquish / acquire and every notice batch runs as a spawned task that
//! reports back through a bounded queue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_membership::{Event as MEvent, Member};
use shoal_placement::{NodeId, PlacementTable, View};
use shoal_transition::{
    Counters, Datum, DatumState, Event as HEvent, FencingToken, Handoff, Job, JobKind, NoticeBatch,
    ReleaseTo, Route, SendId,
};
use shoal_transport::{Dest, MessageReceiver, NodeName, Peer, Responder, Transport, WhenFull};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, trace, warn};

use crate::channel::{ChannelTable, Delivery};
use crate::config::{NodeConfig, TransitionMode};
use crate::datum::{
    CallbackFailure, CatchPanic, ErasedDatum, Factory, HandoffContext, panic_message,
};
use crate::error::Error;
use crate::gossip::{FromMembership, MembershipSnapshot};
use crate::lease::LeaseCell;
use crate::view::{ClusterView, FacadeCounters, NodeInfo, RoutedDrops, Snapshot, TransitionReport};
use crate::wire::{
    self, CH_MEMBERSHIP, CH_NOTICES, CH_REFUSED, CH_ROUTED, Refusal, RefuseReason, Routed,
    USER_CHANNEL_BIT,
};

/// Longest a notice batch request waits for the receiver's answer.
const NOTICE_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a leaving node's acknowledged forward, or a refusal, waits for
/// the receiver's answer.
const ROUTED_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a member that left the view still counts as a forwarder of
/// routed messages (`Driver::origin_plausible`).
const DEPARTED_GRACE: Duration = Duration::from_secs(60);
/// Items the driver takes from one input queue per wake-up.
const BATCH: usize = 256;
/// Registered datums from which installing a view runs in `block_in_place`.
const BLOCKING_INSTALL_DATUMS: usize = 50_000;
/// Jobs completed inline per pump; more wait for the next turn of the loop,
/// so a million no-op jobs never keep the driver from its probes.
const INLINE_JOBS_PER_PUMP: usize = 2048;

/// A request from an API handle.
pub(crate) enum Command {
    Register(
        Vec<Arc<dyn ErasedDatum>>,
        oneshot::Sender<Result<usize, Error>>,
    ),
    Unregister(String, Vec<i64>, oneshot::Sender<usize>),
    /// Datums of this type are made by the factory when they are first
    /// needed here (work at their primary, or a notice).
    RegisterFactory(String, Factory, oneshot::Sender<Result<(), Error>>),
    Transition {
        install: bool,
        deadline: Instant,
        tx: oneshot::Sender<TransitionReport>,
    },
    Progress(oneshot::Sender<TransitionReport>),
    /// A graceful leave begins (sent before the node stops being ready):
    /// from now on a relinquish that fails is given up at once (not
    /// retried): the node is on its way out, and its done markers then let
    /// the datum's new primary take it without waiting for a timeout.
    BeginLeave(oneshot::Sender<()>),
    /// The transition of a graceful leave: as `Transition` with `install`.
    Leave {
        deadline: Instant,
        tx: oneshot::Sender<TransitionReport>,
    },
    /// After a leave's transition: gives up every relinquish still going on
    /// (its deadline passed) and answers with every datum given up since
    /// the leave began, and the transition's report.
    GiveUp(oneshot::Sender<(Vec<(String, i64)>, TransitionReport)>),
    /// The fencing token of a datum held here.
    Token(String, i64, oneshot::Sender<Option<FencingToken>>),
    /// A datum's handoff state here and whether this node may act as its
    /// owner now (held, and the lease valid).
    DatumState(String, i64, oneshot::Sender<Option<(DatumState, bool)>>),
    /// Completes the membership task's part of a snapshot.
    Snapshot(Box<MembershipSnapshot>, oneshot::Sender<Snapshot>),
    /// The last step of a leave: hand on every routed message held, parked
    /// or queued here, wait (until `deadline`) until their receivers took
    /// them, then stop; routed messages arriving later are refused.
    Close {
        deadline: Instant,
        tx: oneshot::Sender<()>,
    },
    Shutdown,
}

/// The driver's inputs from the node: the transport's messages, the
/// membership task's queues, API commands and owner-routed messages.
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
/// a leaving node refused and handed back. `reply` is set when the sender
/// asked for an answer.
enum RoutedIn {
    Routed(Peer, Bytes, Option<Responder>),
    Refused(Peer, Bytes, Option<Responder>),
}

/// The outcome of a leaving node's acknowledged forward.
struct ForwardDone {
    node: NodeId,
    routed: Routed,
    /// `Ok(true)` taken, `Ok(false)` refused (the receiver is leaving too).
    result: Result<bool, String>,
}

/// One item for a peer's link task.
pub(crate) enum Out {
    Datagram(Dest, Bytes),
    Message(Dest, u32, Bytes),
}

/// An item waiting for room in a bounded queue (the driver's backlog).
enum Pending {
    Local(mpsc::Sender<Delivery>, Delivery),
    Peer(SocketAddr, Out),
}

/// A sender to wait on for room, cloned out of the backlog's head.
enum Room {
    Local(mpsc::Sender<Delivery>),
    Peer(mpsc::Sender<Out>),
}

async fn wait_room(room: Option<Room>) {
    match room {
        Some(Room::Local(tx)) => {
            let _ = tx.reserve().await;
        }
        Some(Room::Peer(tx)) => {
            let _ = tx.reserve().await;
        }
        None => std::future::pending().await,
    }
}

/// The driver's own completion queues, made with it.
pub(crate) struct DriverQueues {
    job_rx: mpsc::Receiver<JobDone>,
    send_rx: mpsc::Receiver<SendDone>,
    forward_rx: mpsc::Receiver<ForwardDone>,
}

pub(crate) struct JobDone {
    /// The handoff instance that handed the job out (see `Driver::instance`).
    instance: u64,
    job: Job,
    result: Result<(), String>,
}

pub(crate) struct SendDone {
    instance: u64,
    id: SendId,
    result: Result<(), String>,
}

/// Why a routed message was dropped (see [`RoutedDrops`], whose fields are
/// in this order).
#[derive(Clone, Copy, Debug)]
pub(crate) enum DropReason {
    NoOwner,
    Fenced,
    HoldFull,
    NotHeld,
    Expired,
    ParkFull,
    UnknownChannel,
    ChannelClosed,
    UnknownOwner,
    LinkClosed,
    SendFailed,
    Returned,
    Malformed,
    ForwardFailed,
    RefusalFailed,
    LeaveTimeout,
    Shutdown,
}

const DROP_REASONS: usize = 17;

impl DropReason {
    fn index(self) -> usize {
        self as usize
    }
}

/// The facade's counters, shared with the dispatcher and membership tasks,
/// and the state of a leave's last step, which the dispatcher reads.
#[derive(Default)]
pub(crate) struct Counts {
    routed_delivered: AtomicU64,
    routed_forwarded: AtomicU64,
    routed_held: AtomicU64,
    routed_refused: AtomicU64,
    routed_rerouted: AtomicU64,
    drops: [AtomicU64; DROP_REASONS],
    pub(crate) datagrams_dropped: AtomicU64,
    pub(crate) malformed: AtomicU64,
    jobs_started: AtomicU64,
    /// Relinquish / acquire callbacks and factories that panicked.
    callback_panics: AtomicU64,
    origin_replaced: AtomicU64,
    /// Set once a leaving node's driver stopped: routed messages that
    /// arrive are refused from then on.
    pub(crate) refusing: AtomicBool,
    /// Refusals being handed back (the transport stays up until they are).
    pub(crate) refusals_in_flight: AtomicUsize,
}

impl Counts {
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A job's outcome as the handoff takes it; a panic is counted and
    /// logged, then fails the job as an error would.
    fn job_result(
        &self,
        node: &str,
        datum: Datum,
        kind: JobKind,
        result: Result<(), CallbackFailure>,
    ) -> Result<(), String> {
        if let Err(failure @ CallbackFailure::Panicked(_)) = &result {
            Self::inc(&self.callback_panics);
            metrics::counter!("shoal_callback_panics_total").increment(1);
            warn!(%node, %datum, ?kind, %failure, "application callback panicked: the job fails");
        }
        result.map_err(|e| e.to_string())
    }

    /// Counts `n` routed messages dropped for `reason`.
    pub(crate) fn dropped(&self, reason: DropReason, n: u64) {
        if n == 0 {
            return;
        }
        self.drops[reason.index()].fetch_add(n, Ordering::Relaxed);
        let name = RoutedDrops::default().fields()[reason.index()].0;
        metrics::counter!("shoal_routed_dropped_total", "reason" => name).increment(n);
        debug!(reason = name, n, "routed message dropped");
    }

    fn snapshot(&self) -> FacadeCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let d = |r: DropReason| g(&self.drops[r.index()]);
        let drops = RoutedDrops {
            no_owner: d(DropReason::NoOwner),
            fenced: d(DropReason::Fenced),
            hold_full: d(DropReason::HoldFull),
            not_held: d(DropReason::NotHeld),
            expired: d(DropReason::Expired),
            park_full: d(DropReason::ParkFull),
            unknown_channel: d(DropReason::UnknownChannel),
            channel_closed: d(DropReason::ChannelClosed),
            unknown_owner: d(DropReason::UnknownOwner),
            link_closed: d(DropReason::LinkClosed),
            send_failed: d(DropReason::SendFailed),
            returned: d(DropReason::Returned),
            malformed: d(DropReason::Malformed),
            forward_failed: d(DropReason::ForwardFailed),
            refusal_failed: d(DropReason::RefusalFailed),
            leave_timeout: d(DropReason::LeaveTimeout),
            shutdown: d(DropReason::Shutdown),
        };
        FacadeCounters {
            routed_delivered: g(&self.routed_delivered),
            routed_forwarded: g(&self.routed_forwarded),
            routed_held: g(&self.routed_held),
            routed_dropped: drops.total(),
            drops,
            routed_refused: g(&self.routed_refused),
            routed_rerouted: g(&self.routed_rerouted),
            datagrams_dropped: g(&self.datagrams_dropped),
            malformed: g(&self.malformed),
            jobs_started: g(&self.jobs_started),
            callback_panics: g(&self.callback_panics),
            routed_origin_replaced: g(&self.origin_replaced),
        }
    }
}

/// Answers a routed message sent as a request, in a task.
fn answer_routed(reply: Option<Responder>, answer: &'static [u8]) {
    if let Some(reply) = reply {
        tokio::spawn(async move {
            let _ = reply.respond(Bytes::from_static(answer)).await;
        });
    }
}

/// Hands a routed message back to the node it came from: this node is
/// leaving and its driver has stopped. A request is answered
/// [`wire::ROUTED_REFUSED`]; a one-way message goes back in a [`Refusal`]
/// (a request: the other node answers once its driver routed it again).
/// Counted in `refusals_in_flight` until done, so the transport stays up.
fn refuse(
    transport: &Transport,
    counts: &Arc<Counts>,
    from: &Peer,
    body: &Bytes,
    reply: Option<Responder>,
) {
    Counts::inc(&counts.routed_refused);
    counts.refusals_in_flight.fetch_add(1, Ordering::SeqCst);
    let counts = Arc::clone(counts);
    if let Some(reply) = reply {
        tokio::spawn(async move {
            let _ = reply
                .respond(Bytes::from_static(wire::ROUTED_REFUSED))
                .await;
            counts.refusals_in_flight.fetch_sub(1, Ordering::SeqCst);
        });
        return;
    }
    let transport = transport.clone();
    let dest = Dest::node(from.name.clone(), from.addr);
    let frame = Refusal::encode_raw(RefuseReason::Leaving, body);
    tokio::spawn(async move {
        let answer = transport
            .request(&dest, CH_REFUSED, frame, ROUTED_REQUEST_TIMEOUT)
            .await;
        match answer {
            Ok(b) if &b[..] == wire::ROUTED_TAKEN => {}
            other => {
                debug!(%dest, ?other, "refused message not handed back");
                counts.dropped(DropReason::RefusalFailed, 1);
            }
        }
        counts.refusals_in_flight.fetch_sub(1, Ordering::SeqCst);
    });
}

/// Answers a notice batch request, in a task (the answer is a stream write).
fn answer(reply: Option<Responder>, ok: bool) {
    if let Some(reply) = reply {
        let answer = if ok {
            wire::NOTICE_ACK
        } else {
            wire::NOTICE_NACK
        };
        tokio::spawn(async move {
            let _ = reply.respond(Bytes::from_static(answer)).await;
        });
    }
}

/// A notice batch for a view not in force here yet.
struct EarlyNotice {
    until: Instant,
    peer: Peer,
    batch: NoticeBatch,
    reply: Option<Responder>,
    /// The batch as received: holds its inbound budget in the transport
    /// while the batch waits here (at most `MAX_EARLY_NOTICES` batches).
    _wire: Bytes,
}

/// How long a notice batch for a view not in force here waits for that view.
const NOTICE_GRACE: Duration = Duration::from_millis(500);
/// Most notice batches waiting for their view; beyond, they are taken at once.
const MAX_EARLY_NOTICES: usize = 4096;

struct Parked {
    retry_at: Instant,
    expires: Instant,
    routed: Routed,
}

/// Most nodes kept in [`Driver::unresolved`].
const MAX_UNRESOLVED: usize = 4096;

/// Delay before a parked message is routed again.
const REROUTE_DELAY: Duration = Duration::from_millis(100);

struct Waiter {
    deadline: Instant,
    tx: oneshot::Sender<TransitionReport>,
}

pub(crate) struct Driver {
    config: NodeConfig,
    name: Arc<str>,
    me: NodeId,
    /// This node's membership record, as the membership task last sent it.
    local: Member,
    /// The live members by name, from membership's last view.
    members: HashMap<Arc<str>, Member>,
    /// Members that left the view in the last `DEPARTED_GRACE`, and when: a
    /// leaving node forwards what it still had after its leave was
    /// announced.
    departed: HashMap<Arc<str>, Instant>,
    handoff: Handoff<Routed>,
    transport: Transport,
    channels: Arc<ChannelTable>,
    view_tx: watch::Sender<Arc<ClusterView>>,
    datums: HashMap<Datum, Arc<dyn ErasedDatum>>,
    /// Factories of the types registered on demand, by type name.
    factories: HashMap<String, Factory>,
    links: HashMap<SocketAddr, mpsc::Sender<Out>>,
    latest: Option<Arc<PlacementTable>>,
    backlog: VecDeque<Pending>,
    /// Messages whose route disagreed with the sender's after the hop limit
    /// (views not converged yet): re-routed after a short delay or on the
    /// next installed view, until they expire. Bounded by `hold_capacity`.
    parked: VecDeque<Parked>,
    early_notices: VecDeque<EarlyNotice>,
    job_tx: mpsc::Sender<JobDone>,
    send_tx: mpsc::Sender<SendDone>,
    /// The notice sends in flight (one task each), with their addressee:
    /// those to a member declared failed are stopped and reported failed at
    /// once, so the handoff routes their notices again to the primary in
    /// force instead of waiting out the request timeout on a connection
    /// that went through the partition (its answer, if any, would be the
    /// refusal of the dead generation's successor). As many entries as the
    /// handoff has sends outstanding; each leaves when its send completes.
    sends: HashMap<SendId, (NodeId, tokio::task::AbortHandle)>,
    forward_tx: mpsc::Sender<ForwardDone>,
    /// Nodes that refused a routed message (they are leaving): messages for
    /// them are parked until the view moves on. Pruned on every view.
    refusing: HashSet<NodeId>,
    /// The last step of a leave, once asked: forwards are acknowledged
    /// requests, the driver stops when nothing is left or at the deadline.
    closing: Option<(Instant, oneshot::Sender<()>)>,
    /// Acknowledged forwards not answered yet.
    forwards_in_flight: usize,
    waiters: Vec<Waiter>,
    /// During a graceful leave: the datums whose relinquish was given up
    /// (see [`Command::Leave`]).
    leaving: Option<Vec<Datum>>,
    report_base: Counters,
    counts: Arc<Counts>,
    version: u64,
    view_dirty: bool,
    /// `settled` as last published in the view.
    published_settled: bool,
    fenced: bool,
    /// Nodes gone without a failover decided here: after a rebirth, the
    /// other nodes of the view the new generation inherited from the old
    /// one (its membership never knew them); and members declared failed
    /// while this node had no standing. When a newer generation of one of
    /// their names is a member, that node is gone for good and failed over
    /// ([`Handoff::peer_superseded`]); no event would say so. Bounded by
    /// [`MAX_UNRESOLVED`]: beyond, the oldest is dropped (its datums wait
    /// for the transition timeout, as before this list).
    unresolved: VecDeque<NodeId>,
    /// Which handoff state machine is in force: a rebirth (a new generation
    /// after a declared death) starts a new one, and completions of the old
    /// one's jobs and sends are ignored.
    instance: u64,
    /// The ownership lease, as the membership task last published it.
    lease: Arc<LeaseCell>,
    stop: bool,
    /// Jobs are left over from the last pump: loop again without sleeping.
    more_jobs: bool,
}

impl Driver {
    pub(crate) fn new(
        config: NodeConfig,
        local: Member,
        handoff: Handoff<Routed>,
        transport: Transport,
        channels: Arc<ChannelTable>,
        view_tx: watch::Sender<Arc<ClusterView>>,
        counts: Arc<Counts>,
    ) -> (Driver, DriverQueues) {
        let jobs = config.limits.max_relinquish_jobs + config.limits.max_acquire_jobs + 16;
        let (job_tx, job_rx) = mpsc::channel(jobs);
        let (send_tx, send_rx) = mpsc::channel(1024);
        let (forward_tx, forward_rx) = mpsc::channel(1024);
        let name: Arc<str> = Arc::clone(&local.name);
        let me = NodeId::new(&*name, local.generation);
        let driver = Driver {
            config,
            name,
            me,
            local,
            members: HashMap::new(),
            departed: HashMap::new(),
            handoff,
            transport,
            channels,
            view_tx,
            datums: HashMap::new(),
            factories: HashMap::new(),
            links: HashMap::new(),
            latest: None,
            backlog: VecDeque::new(),
            parked: VecDeque::new(),
            early_notices: VecDeque::new(),
            job_tx,
            send_tx,
            sends: HashMap::new(),
            forward_tx,
            refusing: HashSet::new(),
            closing: None,
            forwards_in_flight: 0,
            waiters: Vec::new(),
            leaving: None,
            report_base: Counters::default(),
            counts,
            version: 0,
            view_dirty: true,
            published_settled: false,
            fenced: false,
            unresolved: VecDeque::new(),
            instance: 0,
            lease: Arc::new(LeaseCell::new(Instant::now())),
            stop: false,
            more_jobs: false,
        };
        let queues = DriverQueues {
            job_rx,
            send_rx,
            forward_rx,
        };
        (driver, queues)
    }

    /// The driver's loop; ends on [`Command::Shutdown`], at the end of
    /// [`Command::Close`], or when every API handle is gone.
    pub(crate) async fn run(mut self, queues: DriverQueues, inputs: DriverInputs) {
        let DriverQueues {
            mut job_rx,
            mut send_rx,
            mut forward_rx,
        } = queues;
        let DriverInputs {
            messages,
            membership_tx,
            mut membership_rx,
            mut cmd_rx,
            mut owner_rx,
        } = inputs;
        let (notice_tx, mut notice_rx) = mpsc::channel(1024);
        let (routed_tx, mut routed_rx) = mpsc::channel(self.config.limits.owner_queue);
        let dispatcher = tokio::spawn(dispatch(
            messages,
            self.transport.clone(),
            Arc::clone(&self.channels),
            Arc::clone(&self.counts),
            membership_tx,
            notice_tx,
            routed_tx,
        ));
        let mut membership_buf = Vec::with_capacity(BATCH);
        let mut owner_buf = Vec::with_capacity(BATCH);
        let mut routed_buf = Vec::with_capacity(BATCH);
        let far = Duration::from_secs(3600);
        // Local sends are still taken; closed (and drained) once a leave's
        // last step starts.
        let mut owner_open = true;
        loop {
            let now = Instant::now();
            self.pump(now);
            if self.closing.is_some() {
                if owner_open && !owner_rx.is_closed() {
                    // New local sends fail from now on; those queued are
                    // still routed.
                    owner_rx.close();
                }
                let late = self.closing.as_ref().is_some_and(|c| now >= c.0);
                if (!owner_open || late) && self.closed(now) {
                    break;
                }
            }
            if self.stop {
                break;
            }
            let deadline = self.next_deadline().unwrap_or_else(|| Instant::now() + far);
            let paused = !self.backlog.is_empty();
            let room = self.backlog_room();
            tokio::select! {
                biased;
                cmd = cmd_rx.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd, Instant::now()),
                    None => break,
                },
                n = membership_rx.recv_many(&mut membership_buf, BATCH) => {
                    if n == 0 { break; }
                    let now = Instant::now();
                    for item in membership_buf.drain(..) {
                        self.on_membership(item, now);
                    }
                }
                Some(r) = notice_rx.recv() => self.on_notices(r, Instant::now()),
                Some(j) = job_rx.recv() => {
                    let now = Instant::now();
                    self.job_done(j, now);
                    while let Ok(j) = job_rx.try_recv() {
                        self.job_done(j, now);
                    }
                }
                Some(s) = send_rx.recv() => {
                    if s.instance == self.instance {
                        self.sends.remove(&s.id);
                        self.handoff.send_done(s.id, s.result, Instant::now());
                    }
                }
                Some(f) = forward_rx.recv() => self.on_forward_done(f, Instant::now()),
                () = wait_room(room), if paused => self.flush_backlog(),
                n = routed_rx.recv_many(&mut routed_buf, BATCH), if !paused => {
                    if n == 0 { break; }
                    let now = Instant::now();
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
                    for routed in owner_buf.drain(..) {
                        self.on_routed(routed, true);
                    }
                }
                () = tokio::time::sleep_until(deadline.into()) => {}
            }
        }
        if let Some((_, tx)) = self.closing.take() {
            // Local sends still queued at the deadline.
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
                    RoutedIn::Refused(_, _, reply) => {
                        // Cannot route it any more: the refusing node counts it.
                        answer_routed(reply, wire::ROUTED_REFUSED);
                    }
                }
            }
            let _ = tx.send(());
            info!(node = %self.name, "driver closed: routed messages are refused from now on");
        } else {
            dispatcher.abort();
            // Stopped without leaving: what is still here is lost.
            let queued = self
                .backlog
                .iter()
                .filter(|p| match p {
                    Pending::Local(..) => true,
                    Pending::Peer(_, Out::Message(_, ch, _)) => *ch == CH_ROUTED,
                    Pending::Peer(..) => false,
                })
                .count();
            let lost = queued
                + self.parked.len()
                + self.handoff.progress().held_work
                + routed_rx.len()
                + owner_rx.len()
                + self.forwards_in_flight;
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
        let held = self.handoff.progress().held_work;
        let links_idle = self
            .links
            .values()
            .all(|tx| tx.capacity() == tx.max_capacity());
        if self.parked.is_empty()
            && self.backlog.is_empty()
            && self.forwards_in_flight == 0
            && held == 0
            && links_idle
        {
            return true;
        }
        if now < *deadline {
            return false;
        }
        let left = self.parked.len() + self.backlog.len() + self.forwards_in_flight + held;
        warn!(node = %self.name, parked = self.parked.len(), backlog = self.backlog.len(),
            in_flight = self.forwards_in_flight, held, "leave deadline: routed messages left behind");
        self.counts.dropped(DropReason::LeaveTimeout, left as u64);
        true
    }

    fn job_done(&mut self, j: JobDone, now: Instant) {
        if j.instance == self.instance {
            self.handoff.job_done(j.job, j.result, now);
        } else {
            debug!(node = %self.name, datum = %j.job.datum, "job of a former generation completed: ignored");
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        if self.more_jobs {
            return Some(Instant::now());
        }
        [
            self.handoff.poll_timeout(),
            self.waiters.iter().map(|w| w.deadline).min(),
            self.lease.expiry(),
            self.parked.front().map(|p| p.retry_at),
            self.early_notices.iter().map(|e| e.until).min(),
            self.closing.as_ref().map(|c| c.0),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ----- the state machines' outputs ---------------------------------------

    /// The lease cell the membership task publishes the lease in.
    pub(crate) fn lease(&self) -> Arc<LeaseCell> {
        Arc::clone(&self.lease)
    }

    /// Tells the handoff whether this node may act as an owner at `now`
    /// (its lease), before anything is routed or acquired.
    fn refresh_standing(&mut self, now: Instant) {
        let valid = self.lease.valid(now);
        if valid != self.handoff.has_standing() {
            if valid {
                info!(node = %self.name, "ownership lease valid again");
            } else {
                warn!(node = %self.name, "ownership lease lapsed: holding work for owned datums");
            }
            metrics::gauge!("shoal_standing").set(if valid { 1.0 } else { 0.0 });
            self.handoff.set_standing(valid, now);
            self.view_dirty = true;
        }
    }

    fn pump(&mut self, now: Instant) {
        self.refresh_standing(now);
        if self.handoff.poll_timeout().is_some_and(|t| t <= now) {
            self.handoff.handle_timeout(now);
        }
        self.release_early_notices(now);
        self.drain_handoff(now);
        self.reroute_parked(now, false);
        self.drain_handoff(now);
        // Publish first: a caller woken by a finished transition reads the
        // owners of the view it installed.
        if self.handoff.is_settled() != self.published_settled {
            self.view_dirty = true;
        }
        if self.view_dirty {
            self.publish();
        }
        self.finish_waiters(now);
    }

    fn drain_handoff(&mut self, now: Instant) {
        self.more_jobs = false;
        self.handle_events(now);
        let mut inline_budget = INLINE_JOBS_PER_PUMP;
        while inline_budget > 0
            && let Some(job) = self.handoff.poll_job()
        {
            let Some(datum) = self
                .datums
                .get(&job.datum)
                .cloned()
                .or_else(|| self.make_on_demand(job.datum))
            else {
                self.handoff.job_done(job, Ok(()), now);
                continue;
            };
            Counts::inc(&self.counts.jobs_started);
            trace!(datum = %datum.name(), kind = ?job.kind, attempt = job.attempt, "job");
            let ctx = HandoffContext {
                token: job.token,
                view: job.view,
                attempt: job.attempt,
                reason: job.reason,
                previous: job.previous.clone(),
            };
            let kind = job.kind;
            let mut fut = CatchPanic(match kind {
                JobKind::Relinquish => datum.relinquish_boxed(ctx),
                JobKind::Acquire => datum.acquire_boxed(ctx),
            });
            if self.config.limits.inline_first_poll {
                // Poll once here: a job that completes without waiting (an
                // in-memory flush, a no-op) costs no task and no queue hop.
                // One that waits continues as a task from where it stopped.
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                if let std::task::Poll::Ready(result) = Pin::new(&mut fut).poll(&mut cx) {
                    let result = self.counts.job_result(&self.name, job.datum, kind, result);
                    self.handoff.job_done(job, result, now);
                    inline_budget -= 1;
                    if inline_budget == 0 {
                        // Let probes and messages in before the next slice.
                        self.more_jobs = true;
                    }
                    continue;
                }
            }
            let tx = self.job_tx.clone();
            let instance = self.instance;
            let counts = Arc::clone(&self.counts);
            let name = Arc::clone(&self.name);
            tokio::spawn(async move {
                let result = fut.await;
                let result = counts.job_result(&name, job.datum, kind, result);
                let _ = tx
                    .send(JobDone {
                        instance,
                        job,
                        result,
                    })
                    .await;
            });
        }
        // Failures of the jobs completed inline, before the done markers go.
        self.handle_events(now);
        while let Some(t) = self.handoff.poll_transmit() {
            let member = self
                .members
                .get(&*t.to.name)
                .filter(|m| m.generation == t.to.generation);
            let dest = member.and_then(|m| {
                NodeName::new(&m.name)
                    .ok()
                    .map(|name| Dest::node(name, m.addr))
            });
            let Some(dest) = dest else {
                self.handoff
                    .send_done(t.id, Err(format!("{} is not a member", t.to)), now);
                continue;
            };
            debug!(node = %self.name, to = %t.to, view = %t.batch.view, done = t.batch.done,
                notices = t.batch.groups.iter().map(|g| g.ids.len()).sum::<usize>(), "sending notices");
            let body = Bytes::from(t.batch.encode());
            let transport = self.transport.clone();
            let tx = self.send_tx.clone();
            let id = t.id;
            let instance = self.instance;
            let to = t.to;
            let task = tokio::spawn(async move {
                let answer = transport
                    .request(&dest, CH_NOTICES, body, NOTICE_REQUEST_TIMEOUT)
                    .await;
                let result = match answer {
                    Ok(b) if &b[..] == wire::NOTICE_ACK => Ok(()),
                    Ok(_) => Err(format!("{dest} refused the notices")),
                    Err(e) => Err(e.to_string()),
                };
                let _ = tx
                    .send(SendDone {
                        instance,
                        id,
                        result,
                    })
                    .await;
            });
            self.sends.insert(id, (to, task.abort_handle()));
        }
        while let Some(release) = self.handoff.poll_release() {
            match release.to {
                ReleaseTo::Process => {
                    for work in release.work {
                        self.deliver_local(work);
                    }
                }
                ReleaseTo::Forward(node) => {
                    for work in release.work {
                        self.forward_to(&node, work);
                    }
                }
                ReleaseTo::Returned(shoal_transition::ReturnReason::Fenced) => {
                    // The generation was declared dead; its successor (or
                    // the datums' new owners) will take them: route again
                    // once the new generation knows the cluster.
                    for work in release.work {
                        self.park(work, now);
                    }
                }
                ReleaseTo::Returned(reason) => {
                    warn!(node = %self.name, datum = %release.datum, ?reason, count = release.work.len(),
                        "held messages returned undelivered");
                    self.counts
                        .dropped(DropReason::Returned, release.work.len() as u64);
                }
            }
        }
    }

    fn on_membership(&mut self, item: FromMembership, now: Instant) {
        match item {
            FromMembership::Event(event) => self.on_membership_event(event, now),
            FromMembership::Local(local) => {
                self.local = local;
                self.view_dirty = true;
            }
            FromMembership::Ack(ack) => {
                // Publish first: the caller that waited reads the view.
                if self.view_dirty {
                    self.publish();
                }
                ack.complete();
            }
            FromMembership::Reborn(local) => self.reborn(local, now),
        }
    }

    /// The membership task started a new generation of this node after the
    /// cluster declared the old one dead: a new handoff state machine for
    /// it, with every datum registered again (it holds none: the others
    /// failed the old generation's datums over). Jobs and sends of the old
    /// machine still running are ignored when they complete.
    fn reborn(&mut self, local: Member, now: Instant) {
        let me = NodeId::new(&*local.name, local.generation);
        let handoff = match Handoff::new(me.clone(), self.handoff.config().clone()) {
            Ok(h) => h,
            Err(error) => {
                warn!(node = %self.name, %error, "cannot start the new generation's handoff");
                return;
            }
        };
        let old = std::mem::replace(&mut self.handoff, handoff);
        // The cluster as the old generation last saw it: with it as its
        // first view, the new generation knows who held what, and waits for
        // their notices instead of taking datums as their first owner.
        //
        // The old generation failed, and this node knows it for certain: it
        // was fenced in this process just before (`DeclaredFailed` comes
        // first), so it will neither send a notice nor a done marker, and
        // every job it still has running completes unheard under a token
        // the new generation's exceeds. Its datums are failed over here as
        // the other members fail them over (it is their failed member too):
        // a datum this generation is primary of is taken once every live
        // member and every node of the recent views has said done with the
        // view in force, instead of after the transition timeout, which a
        // departure that is not a failure (`peer_left`) would wait for.
        // (The new handoff has standing at its creation: the lease read at
        // the next pump only gates what it does from then on.)
        let old_me = old.local().clone();
        self.handoff.observe_epoch(old.epoch());
        self.handoff.install(Arc::clone(old.table()), now);
        self.handoff.peer_failed(&old_me, now);
        self.unresolved = old
            .table()
            .view()
            .nodes()
            .iter()
            .filter(|n| **n != old_me)
            .take(MAX_UNRESOLVED)
            .cloned()
            .collect();
        for name in self.factories.keys() {
            if let Ok(ty) = self.handoff.datum_type(name) {
                self.handoff.set_on_demand(ty, true);
            }
        }
        let datums = std::mem::take(&mut self.datums);
        for (_, datum) in datums {
            let Ok(ty) = self.handoff.datum_type(datum.type_name()) else {
                continue;
            };
            let d = Datum::new(ty, datum.id());
            if self.handoff.register(d, now).is_ok() {
                self.datums.insert(d, datum);
            }
        }
        drop(old);
        info!(node = %self.name, generation = local.generation, datums = self.datums.len(),
            "new generation: handoff restarted");
        self.instance += 1;
        // The old machine's sends are ignored when they complete.
        self.sends.clear();
        self.me = me;
        self.local = local;
        self.members.clear();
        self.latest = None;
        self.fenced = false;
        self.report_base = Counters::default();
        self.view_dirty = true;
    }

    fn on_membership_event(&mut self, event: MEvent, now: Instant) {
        match event {
            MEvent::Joined(m) | MEvent::Updated(m) | MEvent::Alive(m) => {
                debug!(node = %self.name, member = %m.name, state = ?m.state, ready = m.ready, "member");
                self.view_dirty = true;
            }
            MEvent::Suspected(m) => {
                info!(node = %self.name, member = %m.name, "member suspected");
                self.view_dirty = true;
            }
            MEvent::Failed(m) => {
                warn!(node = %self.name, member = %m.name, generation = m.generation, "member failed");
                metrics::counter!("shoal_members_failed_total").increment(1);
                if *m.name != *self.name || m.generation != self.me.generation {
                    let id = NodeId::new(&*m.name, m.generation);
                    self.abort_sends_to(&id, now);
                    if !self.handoff.has_standing() {
                        // Not failed over here (see `Handoff::peer_failed`)
                        // unless a newer generation shows it is gone.
                        if self.unresolved.len() >= MAX_UNRESOLVED {
                            self.unresolved.pop_front();
                        }
                        self.unresolved.push_back(id.clone());
                    }
                    self.handoff.peer_failed(&id, now);
                    self.links.remove(&m.addr);
                }
                self.view_dirty = true;
            }
            MEvent::Left(m) => {
                info!(node = %self.name, member = %m.name, "member left");
                if *m.name != *self.name || m.generation != self.me.generation {
                    let id = NodeId::new(&*m.name, m.generation);
                    self.handoff.peer_left(&id, now);
                    self.links.remove(&m.addr);
                }
                self.view_dirty = true;
            }
            MEvent::NameConflict {
                name, local_lost, ..
            } => {
                warn!(node = %self.name, %name, local_lost, "two processes claim one name");
            }
            MEvent::ViewChanged(members) => {
                // Every live member, ready or not, says done before a datum
                // is taken without its notice: two nodes made ready at once
                // each wait for the other instead of both acquiring.
                let peers: Vec<NodeId> = members
                    .iter()
                    .map(|m| NodeId::new(&*m.name, m.generation))
                    .collect();
                self.handoff.set_peers(peers.iter(), now);
                let members: HashMap<Arc<str>, Member> = members
                    .into_iter()
                    .map(|m| (Arc::clone(&m.name), m))
                    .collect();
                self.departed.retain(|name, at| {
                    !members.contains_key(name) && now.duration_since(*at) < DEPARTED_GRACE
                });
                for name in self.members.keys().filter(|n| !members.contains_key(*n)) {
                    self.departed.insert(Arc::clone(name), now);
                }
                self.members = members;
                if !self.unresolved.is_empty() {
                    let members = &self.members;
                    let (gone, keep): (Vec<NodeId>, Vec<NodeId>) =
                        std::mem::take(&mut self.unresolved)
                            .into_iter()
                            .partition(|n| {
                                members
                                    .get(&*n.name)
                                    .is_some_and(|m| m.generation > n.generation)
                            });
                    self.unresolved = keep.into();
                    for n in gone {
                        info!(node = %self.name, peer = %n, "superseded by a newer generation: failed over");
                        self.handoff.peer_superseded(&n, now);
                    }
                }
                // A node that refused is forgotten once it left the view.
                let members = &self.members;
                self.refusing.retain(|n| {
                    members
                        .get(&*n.name)
                        .is_some_and(|m| m.generation == n.generation)
                });
                self.on_view(now);
            }
            // Not consulted yet: the lease is wired into ownership separately.
            MEvent::StandingChanged(_) => {}
            MEvent::DeclaredFailed => {
                warn!(node = %self.name, "the cluster declared this node failed: fencing");
                metrics::counter!("shoal_fenced_total").increment(1);
                self.handoff.fence(now);
                self.fenced = true;
                // The membership task has marked this node not ready.
                self.view_dirty = true;
            }
        }
    }

    /// Stops the notice sends in flight to `node`, declared failed, and
    /// reports each failed: the handoff routes their notices again after
    /// its backoff, to the primary in force. Safe as a request timeout is:
    /// a batch the dead generation took before it was fenced gives it
    /// nothing to act on (it acquires nothing without its lease, which
    /// lapsed before the verdict reached this node through the takeover
    /// gate).
    fn abort_sends_to(&mut self, node: &NodeId, now: Instant) {
        let ids: Vec<SendId> = self
            .sends
            .iter()
            .filter(|(_, (to, _))| to == node)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some((_, task)) = self.sends.remove(&id) {
                task.abort();
                self.handoff
                    .send_done(id, Err(format!("{node} was declared failed")), now);
            }
        }
    }

    fn ready_view(&self) -> View {
        View::new(
            self.members
                .values()
                .map(|m| shoal_placement::Member::new(&*m.name, m.generation, m.ready)),
        )
    }

    fn on_view(&mut self, now: Instant) {
        self.view_dirty = true;
        let view = self.ready_view();
        if self
            .latest
            .as_ref()
            .is_some_and(|t| t.view_id() == view.id())
        {
            return;
        }
        match PlacementTable::build(view, &self.config.strategy, self.config.copies) {
            Ok(table) => {
                let table = Arc::new(table);
                self.latest = Some(Arc::clone(&table));
                if self.config.transition == TransitionMode::Auto {
                    self.install(table, now);
                }
            }
            Err(error) => warn!(node = %self.name, %error, "placement table refused"),
        }
    }

    fn install(&mut self, table: Arc<PlacementTable>, now: Instant) {
        if table.view_id() == self.handoff.view_id() {
            return;
        }
        if self.handoff.is_idle() {
            self.report_base = self.handoff.counters().clone();
        }
        info!(node = %self.name, view = %table.view_id(), nodes = table.view().len(), "installing placement");
        // Installing walks every registered datum: a few hundred
        // milliseconds for a million. On a multi-threaded runtime, let the
        // other tasks of this worker (the membership task among them) move
        // to another thread meanwhile, so probes are still answered.
        let multi_thread = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        if multi_thread && self.datums.len() >= BLOCKING_INSTALL_DATUMS {
            tokio::task::block_in_place(|| self.handoff.install(table, now));
        } else {
            self.handoff.install(table, now);
        }
        metrics::counter!("shoal_views_installed_total").increment(1);
        self.reroute_parked(now, true);
        self.view_dirty = true;
    }

    fn handle_events(&mut self, now: Instant) {
        while let Some(event) = self.handoff.poll_event() {
            if let (Some(given_up), HEvent::RelinquishFailed { datum, .. }) =
                (&mut self.leaving, &event)
                && self.handoff.give_up_relinquish(*datum, now)
            {
                warn!(node = %self.name, datum = %datum, "leaving: relinquish failed, given up");
                given_up.push(*datum);
            }
            self.on_handoff_event(event);
        }
    }

    fn on_handoff_event(&mut self, event: HEvent) {
        match &event {
            HEvent::TransitionStarted {
                view,
                relinquish,
                awaiting,
                acquire,
            } => {
                info!(node = %self.name, %view, relinquish, awaiting, acquire, "transition started");
                metrics::counter!("shoal_transitions_total").increment(1);
            }
            HEvent::TransitionEnded { view } => {
                let p = self.handoff.progress();
                info!(node = %self.name, %view, held = p.held, "transition ended");
                metrics::gauge!("shoal_datums_owned").set(p.held as f64);
            }
            HEvent::RelinquishFailed { .. } | HEvent::AcquireFailed { .. } => {
                warn!(node = %self.name, ?event, "handoff job failed");
                metrics::counter!("shoal_job_failures_total").increment(1);
            }
            HEvent::RelinquishAbandoned { .. } | HEvent::Fenced { .. } => {
                warn!(node = %self.name, ?event, "handoff");
            }
            HEvent::AcquiredWithoutNotice { .. } => {
                debug!(node = %self.name, ?event, "handoff");
                metrics::counter!("shoal_acquired_without_notice_total").increment(1);
            }
            HEvent::TransitionSuperseded { .. } | HEvent::ReplicasChanged { .. } => {
                debug!(node = %self.name, ?event, "handoff");
            }
        }
    }

    fn finish_waiters(&mut self, now: Instant) {
        if !self.waiters.is_empty() {
            let idle = self.handoff.is_idle();
            let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
                .into_iter()
                .partition(|w| idle || now >= w.deadline || w.tx.is_closed());
            self.waiters = keep;
            if !done.is_empty() {
                let report = self.report();
                for w in done {
                    let _ = w.tx.send(report.clone());
                }
            }
        }
    }

    fn report(&self) -> TransitionReport {
        let c = self.handoff.counters();
        let b = &self.report_base;
        let p = self.handoff.progress();
        let awaiting = self
            .handoff
            .awaiting()
            .take(64)
            .map(|d| {
                let ty = self.handoff.type_name(d.ty).unwrap_or("?").to_owned();
                (ty, d.id)
            })
            .collect();
        TransitionReport {
            view: p.view,
            completed: self.handoff.is_idle(),
            relinquished: c.relinquished.saturating_sub(b.relinquished),
            acquired: c.acquired.saturating_sub(b.acquired),
            acquired_without_notice: (c.acquired_after_timeout
                + c.acquired_owner_gone
                + c.acquired_all_done)
                .saturating_sub(
                    b.acquired_after_timeout + b.acquired_owner_gone + b.acquired_all_done,
                ),
            relinquish_failures: c.relinquish_failures.saturating_sub(b.relinquish_failures),
            acquire_failures: c.acquire_failures.saturating_sub(b.acquire_failures),
            relinquish_abandoned: c
                .relinquish_abandoned
                .saturating_sub(b.relinquish_abandoned),
            in_flight: p.in_flight,
            awaiting,
        }
    }

    fn publish(&mut self) {
        self.view_dirty = false;
        self.published_settled = self.handoff.is_settled();
        self.version += 1;
        let mut members: Vec<NodeInfo> = self.members.values().map(NodeInfo::from_member).collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        metrics::gauge!("shoal_members_live").set(members.len() as f64);
        let view = ClusterView {
            local: NodeInfo::from_member(&self.local),
            members,
            ready: self.ready_view(),
            placement: Arc::clone(self.handoff.table()),
            version: self.version,
            fenced: self.fenced,
            standing: self.handoff.has_standing(),
            settled: self.published_settled,
        };
        self.view_tx.send_replace(Arc::new(view));
    }

    // ----- inputs --------------------------------------------------------------

    fn on_command(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::Register(batch, tx) => {
                let _ = tx.send(self.register(batch, now));
            }
            Command::RegisterFactory(name, factory, tx) => {
                let result = self
                    .handoff
                    .datum_type(&name)
                    .map(|ty| {
                        self.handoff.set_on_demand(ty, true);
                        self.factories.insert(name, factory);
                    })
                    .map_err(Error::from);
                let _ = tx.send(result);
            }
            Command::Unregister(ty, ids, tx) => {
                let mut count = 0;
                if let Some(ty) = self.handoff.lookup_type(&ty) {
                    for id in ids {
                        let datum = Datum::new(ty, id);
                        self.datums.remove(&datum);
                        if self.handoff.unregister(datum, now) {
                            count += 1;
                        }
                    }
                }
                let _ = tx.send(count);
            }
            Command::Transition {
                install,
                deadline,
                tx,
            } => {
                if install {
                    if let Some(table) = self.latest.clone() {
                        self.install(table, now);
                    }
                    self.drain_handoff(now);
                }
                self.waiters.push(Waiter { deadline, tx });
            }
            Command::Progress(tx) => {
                let _ = tx.send(self.report());
            }
            Command::BeginLeave(tx) => {
                self.leaving.get_or_insert_with(Vec::new);
                let _ = tx.send(());
            }
            Command::Leave { deadline, tx } => {
                if let Some(table) = self.latest.clone() {
                    self.install(table, now);
                }
                self.drain_handoff(now);
                self.waiters.push(Waiter { deadline, tx });
            }
            Command::GiveUp(tx) => {
                let mut given_up = self.leaving.take().unwrap_or_default();
                given_up.extend(self.handoff.give_up_relinquishes(now));
                // The done markers (farewells) go out now.
                self.drain_handoff(now);
                let names = given_up
                    .iter()
                    .map(|d| {
                        let ty = self.handoff.type_name(d.ty).unwrap_or("?").to_owned();
                        (ty, d.id)
                    })
                    .collect();
                let _ = tx.send((names, self.report()));
            }
            Command::Token(type_name, id, tx) => {
                let token = self
                    .handoff
                    .lookup_type(&type_name)
                    .and_then(|ty| self.handoff.token(Datum::new(ty, id)));
                let _ = tx.send(token);
            }
            Command::DatumState(type_name, id, tx) => {
                let standing = self.lease.valid(now);
                let state = self
                    .handoff
                    .lookup_type(&type_name)
                    .and_then(|ty| self.handoff.state(Datum::new(ty, id)))
                    .map(|state| (state, standing && state == DatumState::Held));
                let _ = tx.send(state);
            }
            Command::Snapshot(membership, tx) => {
                let _ = tx.send(self.snapshot(*membership));
            }
            Command::Close { deadline, tx } => self.close(deadline, tx, now),
            Command::Shutdown => self.stop = true,
        }
    }

    /// The object of datum `d` of a type registered on demand, made by its
    /// factory and kept (the handoff registered `d` on a notice, or is about
    /// to on work). `None` for other types, or when the factory made a datum
    /// of another id or type (logged and counted as a failed creation).
    fn make_on_demand(&mut self, d: Datum) -> Option<Arc<dyn ErasedDatum>> {
        let name = self.handoff.type_name(d.ty)?;
        let factory = self.factories.get(name)?;
        let datum = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory(d.id))) {
            Ok(datum) => datum,
            Err(panic) => {
                Counts::inc(&self.counts.callback_panics);
                metrics::counter!("shoal_callback_panics_total").increment(1);
                warn!(node = %self.name, datum_type = name, id = d.id,
                    panic = %panic_message(&*panic), "the factory panicked: datum not made");
                return None;
            }
        };
        if datum.id() != d.id || datum.type_name() != name {
            warn!(node = %self.name, datum_type = name, id = d.id, made = %datum.name(),
                "the factory made another datum than the one asked for");
            metrics::counter!("shoal_on_demand_refused_total").increment(1);
            return None;
        }
        self.datums.insert(d, Arc::clone(&datum));
        Some(datum)
    }

    /// Registers datum `d` on demand when work for it reaches this node as
    /// its primary: its type has a factory, this node is not fenced, and
    /// the table in force names this node. Returns whether `d` is now
    /// registered.
    fn register_on_demand(&mut self, d: Datum, now: Instant) -> bool {
        if self.fenced || !self.handoff.is_on_demand(d.ty) {
            return false;
        }
        let table = self.handoff.table();
        let mine = table
            .primary(d.id)
            .and_then(|i| table.view().node(i))
            .is_some_and(|n| *n == self.me);
        if !mine || self.make_on_demand(d).is_none() {
            return false;
        }
        match self.handoff.register(d, now) {
            Ok(_) => true,
            Err(error) => {
                self.datums.remove(&d);
                debug!(node = %self.name, %error, id = d.id, "on-demand registration refused");
                false
            }
        }
    }

    fn register(&mut self, batch: Vec<Arc<dyn ErasedDatum>>, now: Instant) -> Result<usize, Error> {
        let mut added = 0;
        self.datums.reserve(batch.len());
        for d in batch {
            let ty = self.handoff.datum_type(d.type_name())?;
            let datum = Datum::new(ty, d.id());
            if self.handoff.register(datum, now)? {
                added += 1;
            }
            self.datums.insert(datum, d);
        }
        Ok(added)
    }

    fn snapshot(&self, membership: MembershipSnapshot) -> Snapshot {
        let p = self.handoff.progress();
        Snapshot {
            local: membership.local,
            members: membership.members,
            view: self.handoff.view_id(),
            registered: p.registered,
            owned: p.held,
            in_flight: p.in_flight,
            held_work: p.held_work,
            fenced: self.fenced,
            transition: self.handoff.counters().clone(),
            membership: membership.stats,
            transport: self.transport.stats(),
            facade: self.counts.snapshot(),
        }
    }

    fn on_notices(&mut self, request: NoticeRequest, now: Instant) {
        let NoticeRequest(peer, bytes, reply) = request;
        let batch = match NoticeBatch::decode(&bytes, &self.handoff.config().wire) {
            Ok(batch) => batch,
            Err(error) => {
                Counts::inc(&self.counts.malformed);
                debug!(node = %self.name, from = %peer, %error, "undecodable notice batch");
                answer(reply, false);
                return;
            }
        };
        if batch.view != self.handoff.view_id() && self.early_notices.len() < MAX_EARLY_NOTICES {
            // Sent under a view this node has not installed (yet): the
            // sender saw the change first. Give gossip a moment to bring it
            // here; a recurring view id would otherwise make the notices look
            // stale.
            self.early_notices.push_back(EarlyNotice {
                until: now + NOTICE_GRACE,
                peer,
                batch,
                reply,
                _wire: bytes,
            });
            return;
        }
        self.take_notices(peer, batch, reply, now);
    }

    /// Hands early notice batches to the handoff once their view is in
    /// force here, or their grace ran out.
    fn release_early_notices(&mut self, now: Instant) {
        if self.early_notices.is_empty() {
            return;
        }
        let view = self.handoff.view_id();
        let (due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.early_notices)
            .into_iter()
            .partition(|e| e.batch.view == view || now >= e.until);
        self.early_notices = keep.into();
        for e in due {
            self.take_notices(e.peer, e.batch, e.reply, now);
        }
    }

    fn take_notices(
        &mut self,
        peer: Peer,
        batch: NoticeBatch,
        reply: Option<Responder>,
        now: Instant,
    ) {
        let from = self.notice_sender(&peer, &batch.from);
        let ok = match from {
            Some(from) => match self.handoff.handle_batch(&from, batch, now) {
                Ok(report) => {
                    debug!(node = %self.name, from = %peer, ?report, "notices");
                    true
                }
                Err(error) => {
                    warn!(node = %self.name, from = %peer, %error, "notice batch refused");
                    false
                }
            },
            None => {
                debug!(node = %self.name, from = %peer, "notices from an unknown member");
                false
            }
        };
        answer(reply, ok);
    }

    /// Who sent a notice batch that `claimed` to be from: the live member of
    /// the authenticated peer's name, or the departed member of that name
    /// and generation (one the handoff still remembers as gone). A leaver's last batch (its farewell done marker, sent
    /// just before it leaves the membership) often arrives after the leave
    /// was gossiped here; it still tells the handoff that the leaver held
    /// nothing (`docs/transition.md` rule 6), and refusing it made the datums
    /// it had owned in a recent view wait out the timeout after a crash.
    fn notice_sender(&self, peer: &Peer, claimed: &NodeId) -> Option<NodeId> {
        let live = self
            .members
            .get(peer.name.as_str())
            .map(|m| NodeId::new(&*m.name, m.generation));
        if live.as_ref() == Some(claimed) || claimed.name != peer.name.as_str() {
            return live;
        }
        if self.handoff.is_gone(claimed) {
            Some(claimed.clone())
        } else {
            live
        }
    }

    fn on_routed_in(&mut self, item: RoutedIn, now: Instant) {
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
    fn origin_plausible(&self, routed: &Routed, sender: &str) -> bool {
        routed.origin == sender
            || (routed.hops > 0
                && (self.members.contains_key(sender) || self.departed.contains_key(sender)))
    }

    /// Remembers that the live member `name` refuses routed messages (it is
    /// leaving): messages for it are parked until the view moves on.
    fn refused_by(&mut self, name: &str) {
        if let Some(m) = self.members.get(name) {
            self.refusing.insert(NodeId::new(&*m.name, m.generation));
        }
    }

    /// Routes a message a leaving node handed back: like a parked one, to
    /// the owner in force, parked while that is a node that refuses.
    fn reroute_refused(&mut self, routed: Routed, now: Instant) {
        Counts::inc(&self.counts.routed_rerouted);
        self.route_message(routed, false, true, now);
    }

    /// The last step of a leave: every parked message and every routed
    /// message waiting in the backlog is sent again, as an acknowledged
    /// forward; the loop ends once nothing is left ([`Driver::closed`]).
    fn close(&mut self, deadline: Instant, tx: oneshot::Sender<()>, now: Instant) {
        info!(node = %self.name, parked = self.parked.len(), backlog = self.backlog.len(),
            "closing: handing on routed messages");
        self.closing = Some((deadline, tx));
        let backlog = std::mem::take(&mut self.backlog);
        for item in backlog {
            match item {
                Pending::Peer(_, Out::Message(_, CH_ROUTED, body)) => {
                    match Routed::decode(&body, usize::MAX) {
                        Ok(routed) => self.route_message(routed, false, true, now),
                        Err(_) => self.counts.dropped(DropReason::Malformed, 1),
                    }
                }
                other => self.backlog.push_back(other),
            }
        }
        self.reroute_parked(now, true);
    }

    fn on_forward_done(&mut self, done: ForwardDone, now: Instant) {
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
    fn on_routed(&mut self, routed: Routed, from_here: bool) {
        self.route_message(routed, from_here, false, Instant::now());
    }

    /// Routes parked messages again: those due at `now`, or all of them when
    /// a new view was installed.
    fn reroute_parked(&mut self, now: Instant, all: bool) {
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

    fn route_message(&mut self, mut routed: Routed, from_here: bool, retry: bool, now: Instant) {
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

    fn park(&mut self, routed: Routed, now: Instant) {
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

    fn deliver_local(&mut self, routed: Routed) {
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

    fn forward_to(&mut self, node: &NodeId, routed: Routed) {
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

    // ----- bounded queues ------------------------------------------------------

    fn link(&mut self, addr: SocketAddr) -> mpsc::Sender<Out> {
        if let Some(tx) = self.links.get(&addr).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(self.config.limits.peer_queue);
        tokio::spawn(link_task(
            self.transport.clone(),
            rx,
            Arc::clone(&self.name),
            Arc::clone(&self.counts),
        ));
        self.links.insert(addr, tx.clone());
        tx
    }

    fn push(&mut self, item: Pending) {
        if self.backlog.is_empty() {
            if let Some(item) = self.try_push(item) {
                self.backlog.push_back(item);
            }
        } else {
            self.backlog.push_back(item);
        }
    }

    /// Tries to hand `item` to its queue; gives it back when the queue is full.
    fn try_push(&mut self, item: Pending) -> Option<Pending> {
        match item {
            Pending::Local(tx, d) => match tx.try_send(d) {
                Ok(()) => None,
                Err(mpsc::error::TrySendError::Full(d)) => Some(Pending::Local(tx, d)),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.counts.dropped(DropReason::ChannelClosed, 1);
                    None
                }
            },
            Pending::Peer(addr, out) => {
                let tx = self.link(addr);
                match tx.try_send(out) {
                    Ok(()) => None,
                    Err(mpsc::error::TrySendError::Full(out)) => Some(Pending::Peer(addr, out)),
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        self.counts.dropped(DropReason::LinkClosed, 1);
                        None
                    }
                }
            }
        }
    }

    fn backlog_room(&mut self) -> Option<Room> {
        match self.backlog.front()? {
            Pending::Local(tx, _) => Some(Room::Local(tx.clone())),
            Pending::Peer(addr, _) => {
                let addr = *addr;
                Some(Room::Peer(self.link(addr)))
            }
        }
    }

    fn flush_backlog(&mut self) {
        while let Some(item) = self.backlog.pop_front() {
            if let Some(item) = self.try_push(item) {
                self.backlog.push_front(item);
                return;
            }
        }
    }
}

/// `bytes` that keep `hold` alive as long as they (or a slice of them) live.
fn holding(bytes: Bytes, hold: Bytes) -> Bytes {
    struct Holding {
        bytes: Bytes,
        _hold: Bytes,
    }
    impl AsRef<[u8]> for Holding {
        fn as_ref(&self) -> &[u8] {
            &self.bytes
        }
    }
    Bytes::from_owner(Holding { bytes, _hold: hold })
}

/// Sends one peer's queued items through the transport, in order. A routed
/// message the transport fails to send is counted as dropped
/// (`send_failed`).
pub(crate) async fn link_task(
    transport: Transport,
    mut rx: mpsc::Receiver<Out>,
    node: Arc<str>,
    counts: Arc<Counts>,
) {
    while let Some(out) = rx.recv().await {
        let result = match &out {
            Out::Datagram(dest, payload) => transport.send_datagram(dest, payload).await,
            Out::Message(dest, channel, body) => {
                transport
                    .send(dest, *channel, body.clone(), WhenFull::Wait)
                    .await
            }
        };
        if let Err(error) = result {
            let (what, dest) = match &out {
                Out::Datagram(dest, _) => ("datagram", dest),
                Out::Message(dest, _, _) => ("message", dest),
            };
            metrics::counter!("shoal_send_failures_total", "kind" => what).increment(1);
            debug!(%node, %dest, %error, what, "send failed");
            if matches!(out, Out::Message(_, CH_ROUTED, _)) {
                counts.dropped(DropReason::SendFailed, 1);
            }
        }
    }
}

/// Reads the transport's messages and hands each to its consumer: internal
/// ones to the driver, user ones to their channel. Waits when a queue is
/// full, so the transport stops reading and QUIC pushes back on senders.
///
/// Once a leaving node's driver has stopped (`counts.refusing`), it refuses
/// every routed message (hands it back to its sender) and keeps serving
/// user channels until the transport shuts down.
async fn dispatch(
    mut messages: MessageReceiver,
    transport: Transport,
    channels: Arc<ChannelTable>,
    counts: Arc<Counts>,
    membership_tx: mpsc::Sender<(SocketAddr, NodeName, Bytes)>,
    notice_tx: mpsc::Sender<NoticeRequest>,
    routed_tx: mpsc::Sender<RoutedIn>,
) {
    // Bodies keep their inbound budget until their consumer drops them, so
    // the transport's byte budget (and each peer's share of it) bounds every
    // queue below as well: membership, notices, routed, user channels, held
    // and parked work.
    while let Some(m) = messages.recv_held().await {
        let refusing = counts.refusing.load(Ordering::SeqCst);
        let delivered = match m.channel {
            // The membership task outlives a closed driver until shutdown.
            CH_MEMBERSHIP => {
                membership_tx
                    .send((m.from.addr, m.from.name, m.body))
                    .await
                    .is_ok()
                    || refusing
            }
            CH_NOTICES if refusing => {
                answer(m.reply, false);
                true
            }
            CH_NOTICES => notice_tx
                .send(NoticeRequest(m.from, m.body, m.reply))
                .await
                .is_ok(),
            CH_ROUTED if refusing => {
                refuse(&transport, &counts, &m.from, &m.body, m.reply);
                true
            }
            CH_ROUTED => {
                if let Err(mpsc::error::SendError(item)) = routed_tx
                    .send(RoutedIn::Routed(m.from, m.body, m.reply))
                    .await
                    && let RoutedIn::Routed(from, body, reply) = item
                {
                    // The driver closed its queue as it stopped: refuse.
                    refuse(&transport, &counts, &from, &body, reply);
                }
                true
            }
            CH_REFUSED if refusing => {
                answer_routed(m.reply, wire::ROUTED_REFUSED);
                true
            }
            CH_REFUSED => {
                if let Err(mpsc::error::SendError(item)) = routed_tx
                    .send(RoutedIn::Refused(m.from, m.body, m.reply))
                    .await
                    && let RoutedIn::Refused(_, _, reply) = item
                {
                    answer_routed(reply, wire::ROUTED_REFUSED);
                }
                true
            }
            id if id & USER_CHANNEL_BIT != 0 => {
                match channels.sender(id) {
                    Some(tx) => {
                        let delivery = Delivery {
                            from: Arc::from(m.from.name.as_str()),
                            datum: None,
                            payload: m.body,
                        };
                        if tx.send(delivery).await.is_err() {
                            counts.dropped(DropReason::ChannelClosed, 1);
                        }
                    }
                    None => {
                        metrics::counter!("shoal_unknown_channel_total").increment(1);
                        debug!(from = %m.from, channel = id, "message for an unregistered channel dropped");
                    }
                }
                true
            }
            other => {
                Counts::inc(&counts.malformed);
                debug!(from = %m.from, channel = other, "message on an unknown internal channel");
                true
            }
        };
        if !delivered {
            break;
        }
    }
}
