//! The facade's counters: those of the tasks around the core (dispatcher,
//! link tasks, membership task, jobs), as atomics they share, merged with
//! the core's own ([`RouteCounters`]) in a snapshot.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use shoal_core::{DropReason, RouteCounters};
use shoal_transition::{Datum, JobKind};
use tracing::{debug, warn};

use crate::datum::CallbackFailure;
use crate::view::{FacadeCounters, RoutedDrops};

/// The facade's counters, shared with the dispatcher and membership tasks,
/// and the state of a leave's last step, which the dispatcher reads.
#[derive(Default)]
pub(crate) struct Counts {
    routed_refused: AtomicU64,
    /// Routed messages dropped outside the core (channels, links, refusals,
    /// a leave's deadline, a stop), by reason.
    drops: [AtomicU64; DropReason::ALL.len()],
    pub(crate) datagrams_dropped: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) jobs_started: AtomicU64,
    /// Relinquish / acquire callbacks and factories that panicked.
    pub(crate) callback_panics: AtomicU64,
    /// Peers' messages that found their user channel's queue full.
    pub(crate) channel_full: AtomicU64,
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

    pub(crate) fn refused(&self) {
        Self::inc(&self.routed_refused);
    }

    /// A job's outcome as the handoff takes it; a panic is counted and
    /// logged, then fails the job as an error would.
    pub(crate) fn job_result(
        &self,
        node: &str,
        datum: Datum,
        kind: JobKind,
        result: Result<(), CallbackFailure>,
    ) -> Result<(), String> {
        if let Err(failure @ CallbackFailure::Panicked(_)) = &result {
            self.callback_panicked();
            warn!(%node, %datum, ?kind, %failure, "application callback panicked: the job fails");
        }
        result.map_err(|e| e.to_string())
    }

    pub(crate) fn callback_panicked(&self) {
        Self::inc(&self.callback_panics);
        metrics::counter!("shoal_callback_panics_total").increment(1);
    }

    /// Counts `n` routed messages dropped for `reason` outside the core.
    pub(crate) fn dropped(&self, reason: DropReason, n: u64) {
        if n == 0 {
            return;
        }
        self.drops[reason.index()].fetch_add(n, Ordering::Relaxed);
        dropped_metric(reason, n);
        debug!(reason = reason.name(), n, "routed message dropped");
    }

    /// The counters, with the core's.
    pub(crate) fn snapshot(&self, core: &RouteCounters) -> FacadeCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let d = |r: DropReason| g(&self.drops[r.index()]) + core.drops_for(r);
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
            routed_delivered: core.delivered,
            routed_forwarded: core.forwarded,
            routed_held: core.held,
            routed_dropped: drops.total(),
            drops,
            routed_refused: g(&self.routed_refused),
            routed_rerouted: core.rerouted,
            datagrams_dropped: g(&self.datagrams_dropped),
            malformed: g(&self.malformed) + core.malformed_notices,
            jobs_started: g(&self.jobs_started),
            callback_panics: g(&self.callback_panics),
            routed_origin_replaced: core.origin_replaced,
            channel_full: g(&self.channel_full),
        }
    }
}

/// `shoal_routed_dropped_total{reason}`.
pub(crate) fn dropped_metric(reason: DropReason, n: u64) {
    metrics::counter!("shoal_routed_dropped_total", "reason" => reason.name()).increment(n);
}
