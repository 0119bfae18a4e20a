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
    Counters, Datum, DatumState, DetState, FencingToken, Handoff, HandoffEvent, Job, JobKind,
    NoticeBatch, ReleaseTo, Route, SendId,
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

mod commands;
mod notices;
mod routing;
mod views;

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
/// Jobs whose datums are read ahead together ([`Driver::warm_datums`]).
const WARM_AHEAD: usize = 32;

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
    /// Peers' messages that found their user channel's queue full.
    channel_full: AtomicU64,
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
            channel_full: g(&self.channel_full),
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
    /// The application's datums, hashed as the handoff's registry is
    /// ([`DetState`]): a view's relinquish jobs come out in the registry's
    /// table order, so the lookup of each job's datum walks this table in
    /// the same order (with std's random hasher each lookup of a
    /// million-datum handoff missed the cache on the control bytes and on
    /// the entry), and hashing an id costs a few multiplies, not SipHash.
    datums: HashMap<Datum, Arc<dyn ErasedDatum>, DetState>,
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
    /// Jobs are left over from the last pump: loop again once the other
    /// tasks had their turn, without sleeping.
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
            datums: HashMap::default(),
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
        // Control messages (membership, notices) have a dispatcher of their
        // own: the other one may wait for room in a full user channel or
        // owner-routed queue, which must not delay them.
        let mut messages = messages;
        let control_dispatcher = messages.take_control().map(|control| {
            tokio::spawn(dispatch(
                control,
                self.transport.clone(),
                Arc::clone(&self.channels),
                Arc::clone(&self.counts),
                membership_tx.clone(),
                notice_tx.clone(),
                routed_tx.clone(),
            ))
        });
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
            let more_jobs = self.more_jobs;
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
                // Jobs left over: let the other tasks run, then pump again.
                // (A timer due now fires on the timer's next millisecond
                // tick: the pumps of a million-job handoff waited up to
                // 1 ms each, about as long as they worked.)
                () = tokio::task::yield_now(), if more_jobs => {}
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
            if let Some(control) = &control_dispatcher {
                control.abort();
            }
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

    /// Reads the datums of the next [`WARM_AHEAD`] jobs (`first`'s and
    /// what the handoff has queued after it) in one tight loop: their map
    /// entries and `Arc`s lie at random places of a large heap, and loads
    /// that do not wait on each other miss the cache together, where one
    /// job at a time waited for each miss in turn.
    fn warm_datums(&self, first: Datum) {
        let mut sum = 0usize;
        for d in std::iter::once(first).chain(self.handoff.next_jobs(WARM_AHEAD - 1)) {
            if let Some(datum) = self.datums.get(&d) {
                sum = sum.wrapping_add(Arc::strong_count(datum));
            }
        }
        std::hint::black_box(sum);
    }

    fn drain_handoff(&mut self, now: Instant) {
        self.more_jobs = false;
        self.handle_events(now);
        let mut inline_budget = INLINE_JOBS_PER_PUMP;
        let mut warm = 0;
        while inline_budget > 0
            && let Some(job) = self.handoff.poll_job()
        {
            if warm == 0 {
                self.warm_datums(job.datum);
                warm = WARM_AHEAD;
            }
            warm -= 1;
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

    // ----- inputs --------------------------------------------------------------

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

/// Room found in a full user channel's queue (or the channel is closed).
type ChannelRoom = (
    u32,
    Result<mpsc::OwnedPermit<Delivery>, mpsc::error::SendError<()>>,
);

/// Peers' messages for user channels whose queue is full, waiting in order
/// (per channel) while the dispatcher goes on with other channels and
/// peers. Each holds its bytes in its sender's share of the data budget
/// (its body comes from `recv_held`), so the spill is bounded by that
/// budget, not by a count: a channel nobody reads pins at most the share
/// of each peer that sends to it, and those peers' data streams are then
/// read no further (QUIC pushes back on them).
#[derive(Default)]
struct Spill {
    /// By channel: its queue and the messages waiting for room in it.
    waiting: HashMap<u32, (mpsc::Sender<Delivery>, VecDeque<Delivery>)>,
    /// One task per waiting channel, waiting for room in its queue.
    room: tokio::task::JoinSet<ChannelRoom>,
}

impl Spill {
    /// Whether messages for channel `id` wait here (a new one goes after
    /// them).
    fn waits(&self, id: u32) -> bool {
        self.waiting.contains_key(&id)
    }

    fn push(&mut self, id: u32, delivery: Delivery) {
        if let Some((_, queue)) = self.waiting.get_mut(&id) {
            queue.push_back(delivery);
        }
    }

    /// Channel `id`'s queue is full: `delivery` waits, and so do the
    /// channel's next messages, until there is room.
    fn start(&mut self, id: u32, tx: mpsc::Sender<Delivery>, delivery: Delivery) {
        self.wait_for_room(id, &tx);
        self.waiting.insert(id, (tx, VecDeque::from([delivery])));
    }

    fn wait_for_room(&mut self, id: u32, tx: &mpsc::Sender<Delivery>) {
        let tx = tx.clone();
        self.room
            .spawn(async move { (id, tx.reserve_owned().await) });
    }

    /// Room in channel `id`'s queue: hands over what fits, in order.
    fn on_room(
        &mut self,
        id: u32,
        permit: Result<mpsc::OwnedPermit<Delivery>, mpsc::error::SendError<()>>,
        counts: &Counts,
    ) {
        let Some((tx, mut queue)) = self.waiting.remove(&id) else {
            return;
        };
        let Ok(permit) = permit else {
            // The application dropped the channel's receiver.
            counts.dropped(DropReason::ChannelClosed, queue.len() as u64);
            return;
        };
        if let Some(d) = queue.pop_front() {
            permit.send(d);
        }
        while let Some(d) = queue.pop_front() {
            match tx.try_send(d) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(d)) => {
                    queue.push_front(d);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    counts.dropped(DropReason::ChannelClosed, queue.len() as u64 + 1);
                    return;
                }
            }
        }
        if !queue.is_empty() {
            self.wait_for_room(id, &tx);
            self.waiting.insert(id, (tx, queue));
        }
    }
}

/// How often a user channel whose queue stays full is reported.
const CHANNEL_FULL_REPORT: Duration = Duration::from_secs(10);

/// A peer's message found user channel `id`'s queue full: counted, and
/// logged at warn (at most every [`CHANNEL_FULL_REPORT`] per channel).
fn channel_full(
    channels: &ChannelTable,
    counts: &Counts,
    id: u32,
    from: &Peer,
    reported: &mut HashMap<u32, Instant>,
) {
    Counts::inc(&counts.channel_full);
    let name = channels.name(id).unwrap_or_else(|| Arc::from("?"));
    metrics::counter!("shoal_channel_full_total", "channel" => name.to_string()).increment(1);
    let now = Instant::now();
    if reported
        .get(&id)
        .is_none_or(|&at| now.duration_since(at) >= CHANNEL_FULL_REPORT)
    {
        reported.insert(id, now);
        warn!(
            channel = %name,
            from = %from,
            "a channel's receive queue is full (its reader is not keeping up): peers' messages wait for it"
        );
    }
}

/// Reads the transport's messages and hands each to its consumer: internal
/// ones to the driver, user ones to their channel. Waits when a queue is
/// full, so the transport stops reading and QUIC pushes back on senders.
/// Runs as two tasks: one on the control messages (membership, notices),
/// one on the others, so that waiting for room in a user channel or the
/// owner-routed queue never delays control traffic.
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
    // When each user channel's full queue was last reported.
    let mut full_reported: HashMap<u32, Instant> = HashMap::new();
    let mut spill = Spill::default();
    loop {
        let m = tokio::select! {
            biased;
            Some(done) = spill.room.join_next(), if !spill.room.is_empty() => {
                if let Ok((id, permit)) = done {
                    spill.on_room(id, permit, &counts);
                }
                continue;
            }
            m = messages.recv_held() => m,
        };
        let Some(m) = m else { break };
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
                        if spill.waits(id) {
                            spill.push(id, delivery);
                            channel_full(&channels, &counts, id, &m.from, &mut full_reported);
                        } else {
                            match tx.try_send(delivery) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Closed(_)) => {
                                    counts.dropped(DropReason::ChannelClosed, 1);
                                }
                                Err(mpsc::error::TrySendError::Full(delivery)) => {
                                    spill.start(id, tx, delivery);
                                    channel_full(
                                        &channels,
                                        &counts,
                                        id,
                                        &m.from,
                                        &mut full_reported,
                                    );
                                }
                            }
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
