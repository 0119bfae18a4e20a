//! Configuration, inputs and outputs of the [`Handoff`](crate::Handoff) state machine.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_placement::{NodeId, ViewId};

use crate::Datum;
use crate::error::ConfigError;
use crate::wire::{NoticeBatch, WireLimits};

/// Tuning of one node's handoff state machine. Every node of a cluster should
/// use the same `timeout` and `relinquish_timeout`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// How long a new primary waits for a relinquish notice before it
    /// acquires anyway ("the data is likely lost"), counted from the view
    /// change that started the wait. Also the life of a relinquished datum's
    /// undelivered notice, and of notices parked for a view not seen yet.
    /// Default 10 s.
    pub timeout: Duration,
    /// How long the old primary keeps trying to relinquish (retries with
    /// backoff) before it gives up and stops holding the datum, counted from
    /// the view change. At most `timeout`; the gap between the two is the
    /// margin for nodes installing a view at slightly different times.
    /// Default 7.5 s.
    pub relinquish_timeout: Duration,
    /// Most relinquish jobs handed to the application and not completed yet.
    /// Default 256.
    pub max_relinquish_jobs: usize,
    /// Most acquire jobs handed to the application and not completed yet.
    /// Default 256.
    pub max_acquire_jobs: usize,
    /// Attempts of a failing acquire before the node gives up and processes
    /// the datum anyway, reporting it. Default 6.
    pub max_acquire_attempts: u8,
    /// Most notices in one batch. Default 16,384 (about 20 KiB on the wire).
    pub max_batch: usize,
    /// How long a partly filled batch may wait for more notices while
    /// relinquish jobs are still running. Default 5 ms.
    pub batch_linger: Duration,
    /// First retry delay after a failed relinquish, acquire or send; doubles
    /// per attempt up to `retry_max`. Default 100 ms.
    pub retry_base: Duration,
    /// Longest retry delay. Default 2 s.
    pub retry_max: Duration,
    /// Most pieces of held work (all datums together) this node buffers.
    /// When full, [`Handoff::hold`](crate::Handoff::hold) refuses. Default 65,536.
    pub hold_capacity: usize,
    /// Most notices kept for a view this node has not installed yet, or for
    /// datums it has not registered yet. Beyond it they are dropped and
    /// counted (the new primary then acquires at its timeout). Default 1,048,576.
    pub max_parked: usize,
    /// Most past views remembered (those replaced less than `timeout` ago).
    /// Default 32.
    pub max_history: usize,
    /// Limits on decoding notice batches.
    pub wire: WireLimits,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            timeout: Duration::from_secs(10),
            relinquish_timeout: Duration::from_millis(7_500),
            max_relinquish_jobs: 256,
            max_acquire_jobs: 256,
            max_acquire_attempts: 6,
            max_batch: 16_384,
            batch_linger: Duration::from_millis(5),
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            hold_capacity: 65_536,
            max_parked: 1 << 20,
            max_history: 32,
            wire: WireLimits::default(),
        }
    }
}

impl Config {
    /// Checks the configuration is usable.
    ///
    /// # Errors
    /// [`ConfigError`] for a zero duration or capacity, or a
    /// `relinquish_timeout` above `timeout`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let nonzero = [
            (self.timeout.is_zero(), "timeout"),
            (self.relinquish_timeout.is_zero(), "relinquish_timeout"),
            (self.retry_base.is_zero(), "retry_base"),
            (self.retry_max.is_zero(), "retry_max"),
            (self.max_relinquish_jobs == 0, "max_relinquish_jobs"),
            (self.max_acquire_jobs == 0, "max_acquire_jobs"),
            (self.max_acquire_attempts == 0, "max_acquire_attempts"),
            (self.max_batch == 0, "max_batch"),
            (self.max_history == 0, "max_history"),
            (self.wire.max_bytes == 0, "wire.max_bytes"),
        ];
        if let Some((_, name)) = nonzero.iter().find(|(zero, _)| *zero) {
            return Err(ConfigError::Zero(name));
        }
        if self.relinquish_timeout > self.timeout {
            return Err(ConfigError::RelinquishAfterTimeout);
        }
        Ok(())
    }
}

/// What the application must run for a datum.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// Persist the datum's state and stop processing it (the seed's `Relinquish()`).
    Relinquish,
    /// Get ready to process the datum (the seed's `Acquire()`).
    Acquire,
}

/// A relinquish or acquire the application must run, then report with
/// [`Handoff::job_done`](crate::Handoff::job_done) (passing the job back).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// Relinquish or acquire.
    pub kind: JobKind,
    /// The datum.
    pub datum: Datum,
    /// The view in force when the job was handed out.
    pub view: ViewId,
    /// 1 for the first attempt, then 2, 3... on retries.
    pub attempt: u32,
    /// The fencing token of this node's ownership of the datum: for an
    /// acquire, the token the new ownership starts with; for a relinquish,
    /// the token it held the datum under (flush under it). See
    /// [`FencingToken`].
    pub token: FencingToken,
    /// Why the job runs: for a relinquish, [`JobReason::Moving`]; for an
    /// acquire, how the ownership reached this node (a graceful handoff, a
    /// failover, …).
    pub reason: JobReason,
    /// For an acquire after a graceful handoff ([`JobReason::Handoff`]):
    /// the node whose notice handed the datum over (the previous owner, or
    /// the node that passed its notice on). `None` otherwise.
    pub previous: Option<NodeId>,
    pub(crate) flight: u64,
}

/// Why a relinquish or acquire job runs ([`Job::reason`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum JobReason {
    /// A relinquish: the datum moves to another node (a view change, or
    /// this node leaving).
    Moving,
    /// An acquire as the datum's first owner: no node could have held it.
    First,
    /// An acquire after the previous holder's notice: a graceful handoff
    /// (the holder persisted the datum in its relinquish).
    Handoff,
    /// An acquire after every possible holder was declared failed (and its
    /// lease lapsed): a failover; state it did not persist is lost.
    Failover,
    /// An acquire once every live node said done with the view: nobody
    /// held the datum.
    NobodyHeld,
    /// An acquire after the wait for the previous holder timed out.
    Timeout,
    /// An acquire of a token that came back to this node (its own
    /// relinquish, or a notice it had passed on returned).
    Returned,
}

/// A number that strictly increases for a datum from one owner to the next.
///
/// Every acquisition gets one ([`Job::token`], [`Handoff::token`]). A store
/// that the application writes through keeps the highest token it accepted
/// per datum and refuses a write carrying a lower one, in the same statement
/// as the write: a former owner that was paused past its lease, or cut off,
/// can then no longer overwrite what its successor wrote.
///
/// Tokens are a Lamport clock over view installs: every notice batch carries
/// its sender's install count (`epoch`), a node's install count jumps past
/// every epoch it has heard, and an acquisition's token is the larger of its
/// node's install count and every epoch it has heard. The previous owner
/// acquired under an install it has since left (it relinquished or was
/// declared failed under a later one), and that later install, or a batch
/// sent under it, reached the new owner before it acquires: by the notice,
/// by the done markers every node waits for, or by the announcements every
/// node sends at install (see `docs/transition.md`, "Fencing tokens").
///
/// [`Handoff::token`]: crate::Handoff::token
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken(pub u64);

impl FencingToken {
    /// The token as a number (what a store keeps and compares).
    #[must_use]
    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for FencingToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where work for a datum must go right now.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    /// This node holds the datum: process the work here.
    Process,
    /// Another node owns (or is about to own) the datum: forward the work there.
    Forward(&'a NodeId),
    /// The datum is in flight here, or held here by a node that may not act
    /// as owner right now (no standing): keep the work with
    /// [`Handoff::hold`](crate::Handoff::hold) until it can go.
    Hold,
    /// This node was declared failed by the cluster: it processes nothing.
    Fenced,
}

/// Why held work came back to the application instead of being delivered.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ReturnReason {
    /// The datum was unregistered while work was held for it.
    Unregistered,
    /// The node was fenced.
    Fenced,
}

/// Where released held work goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReleaseTo {
    /// The datum landed here: process the work, in order.
    Process,
    /// The datum's owner is another node: forward the work there, in order.
    Forward(NodeId),
    /// The work is handed back undelivered.
    Returned(ReturnReason),
}

/// Work held for a datum, released once, in the order it was held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release<W> {
    /// The datum.
    pub datum: Datum,
    /// Where the work goes.
    pub to: ReleaseTo,
    /// The work, oldest first.
    pub work: Vec<W>,
}

/// Identifies a notice batch handed out by
/// [`Handoff::poll_transmit`](crate::Handoff::poll_transmit); report its
/// outcome with [`Handoff::send_done`](crate::Handoff::send_done).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SendId(pub u64);

/// A notice batch to send reliably to a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Report the outcome with this id.
    pub id: SendId,
    /// The peer (same as `batch.to`).
    pub to: NodeId,
    /// The notices; [`NoticeBatch::encode`] gives the bytes.
    pub batch: NoticeBatch,
}

/// Why a datum was acquired without its relinquish notice.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum WithoutNotice {
    /// The timeout passed: the old owner's state may be lost.
    Timeout,
    /// Every node that could hold the datum failed or left.
    OwnerGone,
    /// Every live node said it is done with the view in force, so none holds
    /// the datum: its notice went to a view this node skipped, or was lost.
    /// The old owner's relinquish had ended (saved, or abandoned and
    /// reported as [`HandoffEvent::RelinquishAbandoned`] there).
    AllDone,
}

/// This node's part in a datum's owner set.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The primary: the one that processes it.
    Primary,
    /// A replica (copies > 1).
    Replica,
    /// Not an owner.
    None,
}

/// What happened, for the application and for operators.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandoffEvent {
    /// The cluster declared this node failed: it stopped processing every
    /// datum at once (`datums` of them were held or in flight here).
    Fenced {
        /// Datums held or in flight when the node stopped.
        datums: usize,
    },
    /// A new view was installed and some datums are in flight.
    TransitionStarted {
        /// The new view.
        view: ViewId,
        /// Datums this node relinquishes.
        relinquish: usize,
        /// Datums this node waits for (notice not received yet).
        awaiting: usize,
        /// Datums this node acquires.
        acquire: usize,
    },
    /// Nothing is in flight any more for this view's transition.
    TransitionEnded {
        /// The view.
        view: ViewId,
    },
    /// A view was replaced while its transition ran; what was in flight
    /// carries on under the new view (nothing is relinquished or acquired twice).
    TransitionSuperseded {
        /// The replaced view.
        view: ViewId,
        /// The new view.
        by: ViewId,
    },
    /// A relinquish job failed.
    RelinquishFailed {
        /// The datum.
        datum: Datum,
        /// Which attempt failed (from 1).
        attempt: u32,
        /// The application's error.
        error: String,
        /// Whether it will be retried (false when the datum came back to
        /// this node, which keeps it).
        retry: bool,
    },
    /// Relinquishing did not succeed within `relinquish_timeout`: this node
    /// stopped holding the datum without a notice; the new primary will
    /// acquire it at its timeout. Its unsaved state is likely lost.
    RelinquishAbandoned {
        /// The datum.
        datum: Datum,
    },
    /// An acquire job failed.
    AcquireFailed {
        /// The datum.
        datum: Datum,
        /// Which attempt failed (from 1).
        attempt: u32,
        /// The application's error.
        error: String,
        /// Whether it will be retried; when false, the node gave up after
        /// `max_acquire_attempts` and processes the datum anyway.
        retry: bool,
    },
    /// The datum was acquired without a relinquish notice.
    AcquiredWithoutNotice {
        /// The datum.
        datum: Datum,
        /// Why.
        reason: WithoutNotice,
    },
    /// With copies > 1: the datum's owner set changed and this node is or
    /// was in it. Only the primary relinquishes and acquires; replicas sync
    /// as the application sees fit.
    ReplicasChanged {
        /// The datum.
        datum: Datum,
        /// The new view.
        view: ViewId,
        /// This node's role before.
        previous: Role,
        /// This node's role now.
        current: Role,
    },
}

/// How a batch of notices was taken, notice by notice.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoticeReport {
    /// Notices that ended a wait (the datum is acquired or passed on).
    pub accepted: usize,
    /// Notices for a datum already held, acquiring, or already passed on.
    pub duplicate: usize,
    /// Notices for a view too old, or that no wait here can take.
    pub stale: usize,
    /// Notices for a datum whose primary in that view is not this node.
    pub misdirected: usize,
    /// Notices kept for later (view not installed yet, or datum not registered yet).
    pub parked: usize,
    /// Notices dropped because the parking space is full.
    pub overflow: usize,
    /// Notices of a datum type this node never interned.
    pub unknown_type: usize,
    /// Copies of a notice this node already took (same sender, same
    /// install count of the sender, same datum): a send the transport
    /// reported failed although it was delivered, re-sent. Refused: the
    /// token they carry is spent.
    pub copies: usize,
}

/// Running counters of one node (monotonic).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Views installed.
    pub views: u64,
    /// Notice batches handed out for sending.
    pub batches_sent: u64,
    /// Notices handed out for sending.
    pub notices_sent: u64,
    /// Sends reported failed (their notices are retried).
    pub send_failures: u64,
    /// Notice batches received and decoded.
    pub batches_received: u64,
    /// Times this node lost its standing (see `Handoff::set_standing`).
    pub standing_lost: u64,
    /// Batches refused because their epoch jumped implausibly far ahead of
    /// every epoch this node knew (they would exhaust fencing tokens).
    pub epoch_jumps_refused: u64,
    /// Batches refused as a whole (undecodable, misaddressed, wrong sender, fenced).
    pub batches_rejected: u64,
    /// Notices that ended a wait.
    pub notices_accepted: u64,
    /// Duplicate notices ignored.
    pub notices_duplicate: u64,
    /// Stale notices ignored.
    pub notices_stale: u64,
    /// Misdirected notices ignored.
    pub notices_misdirected: u64,
    /// Notices of unknown datum types ignored.
    pub notices_unknown_type: u64,
    /// Notices parked for later.
    pub notices_parked: u64,
    /// Parked notices dropped (parking full) or expired.
    pub notices_parked_dropped: u64,
    /// Notices passed on to another node (this node was an intermediate primary).
    pub notices_relayed: u64,
    /// Copies of notices already taken here, refused (see [`NoticeReport::copies`]).
    pub notices_copy_refused: u64,
    /// Notices parked for a view not installed yet, refused after its
    /// install because their sender did not confirm that it was still at
    /// the install it sent them from (a done marker answering this node's
    /// install): it announced a later install, left or was declared failed,
    /// or the view changed or `timeout` passed first. Their token may be
    /// spent (`docs/transition.md`, rule 5).
    pub notices_unconfirmed: u64,
    /// Notices whose send failed and whose addressee left or was declared
    /// failed before a retry got through: dropped (never re-addressed).
    pub notices_undeliverable: u64,
    /// Datums of an on-demand type registered by their first notice here
    /// ([`Handoff::set_on_demand`](crate::Handoff::set_on_demand)).
    pub registered_on_demand: u64,
    /// Relinquish jobs completed successfully.
    pub relinquished: u64,
    /// Relinquish job failures.
    pub relinquish_failures: u64,
    /// Datums whose relinquish was abandoned at `relinquish_timeout`.
    pub relinquish_abandoned: u64,
    /// Acquire jobs completed successfully.
    pub acquired: u64,
    /// Acquire job failures.
    pub acquire_failures: u64,
    /// Datums acquired after the timeout, without a notice.
    pub acquired_after_timeout: u64,
    /// Wait deadlines passed while a live node that may hold the datum had
    /// not announced the view in force for a whole `timeout`: the wait
    /// restarted instead of acquiring (it ends by the notice, the done
    /// markers, the holder's failover, or a later deadline).
    pub timeouts_deferred: u64,
    /// Datums acquired at once because their possible holders were gone.
    pub acquired_owner_gone: u64,
    /// Datums acquired without their notice once every live node had said
    /// done with the view in force (the notice went to a skipped view).
    pub acquired_all_done: u64,
    /// Relinquished datums whose notice could not be delivered within the timeout.
    pub notices_expired: u64,
    /// Job completions for jobs no longer current (ignored).
    pub stale_completions: u64,
    /// Pieces of work refused because the hold buffer was full.
    pub hold_refused: u64,
}

/// Where one registered datum stands on this node.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum DatumState {
    /// Not held here, nothing pending.
    Free,
    /// Acquired: processed here.
    Held,
    /// Being relinquished (queued, running, or waiting to retry).
    Relinquishing,
    /// Primary here, waiting for the relinquish notice.
    Awaiting,
    /// Being acquired (queued, running, or waiting to retry).
    Acquiring,
    /// Relinquished here; the notice is not delivered yet.
    NoticePending,
    /// Relinquished here; no node owns it in the view in force.
    Unowned,
    /// Was primary and waiting, is not any more: passes a late notice on.
    Relaying,
}

/// A snapshot of what is in flight on this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The view in force.
    pub view: Option<ViewId>,
    /// Datums registered.
    pub registered: usize,
    /// Datums held (acquired, processed here).
    pub held: usize,
    /// Datums being relinquished (queued, running, or waiting to retry).
    pub relinquishing: usize,
    /// Datums this node is primary of and waits for.
    pub awaiting: usize,
    /// Datums being acquired (queued, running, or waiting to retry).
    pub acquiring: usize,
    /// Relinquished datums whose notice is not delivered yet.
    pub notices_pending: usize,
    /// Relinquished datums with no owner in the current view.
    pub unowned: usize,
    /// Datums this node waited for as an intermediate primary, to pass on.
    pub relaying: usize,
    /// Everything that keeps the transition running (relinquishing +
    /// awaiting + acquiring + notices_pending).
    pub in_flight: usize,
    /// Pieces of work held.
    pub held_work: usize,
    /// Notices parked for a view not installed yet (those of the view in
    /// force still waiting for their sender's confirmation are not counted).
    pub parked_notices: usize,
}
