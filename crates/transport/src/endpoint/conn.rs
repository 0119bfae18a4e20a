//! One connection's record ([`PeerConn`]): the peer, the QUIC connection,
//! its lifecycle state (moved only through [`PeerConn::apply`]), its send
//! queue and writer, its budgets and its counters.

use super::*;

/// Counts work in progress on a connection so it is not closed as idle.
pub(crate) struct BusyGuard(Arc<PeerConn>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

pub(super) struct Queued {
    pub(super) frame: OutFrame,
    pub(super) _permit: tokio::sync::OwnedSemaphorePermit,
}

/// One connection to a peer whose certificate name was verified, from its
/// admission to its close.
pub(crate) struct PeerConn {
    pub(super) peer: Peer,
    pub(super) conn: quinn::Connection,
    pub(super) initiated_locally: bool,
    /// When this endpoint first saw the connection, as a number from the
    /// endpoint's [`Inner::arrivals`] (see there): of two connections of
    /// one name, the one with the larger number is the newer and wins.
    pub(super) arrival: u64,
    /// Where the connection is in its life: one value behind one lock,
    /// changed only by [`PeerConn::apply`] (see [`ConnState`]). A `watch`
    /// channel so that tasks can wait for a transition.
    pub(super) state: watch::Sender<ConnState>,
    /// The writer's queue, made (and the writer task started) by the first
    /// one-way message: many connections carry only datagrams and requests,
    /// and an idle one should not pay for a task and a queue block.
    pub(super) queue_tx: OnceLock<mpsc::UnboundedSender<Queued>>,
    /// Bytes allowed in the send queue.
    pub(super) budget: Arc<Semaphore>,
    /// Bi streams data channels may open at once
    /// ([`TransportConfig::data_streams`]).
    pub(super) data_streams: Arc<Semaphore>,
    /// The peer's shares of the inbound budgets (shared by its connections).
    pub(super) share: Arc<PeerBudget>,
    /// Frames of this connection refused (caps, ratio, deadline).
    pub(super) refusals: AtomicU32,
    /// Traffic since the watchdog's last tick.
    pub(super) active: AtomicBool,
    /// Work in progress (requests, large and control messages).
    pub(super) busy: AtomicUsize,
    /// Message streams this side opened / of the peer's that ended here.
    pub(super) streams_opened: AtomicU32,
    pub(super) streams_finished: AtomicU32,
    /// Set by the writer when it stopped.
    pub(super) writer_done: watch::Sender<bool>,
    /// Request streams the peer may have open now (grows on demand up to
    /// `max_concurrent_requests`, never shrinks).
    pub(super) bi_limit: AtomicU32,
}

impl PeerConn {
    pub(super) fn touch(&self) {
        self.active.store(true, Ordering::Relaxed);
    }

    pub(super) fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.touch();
        BusyGuard(self.clone())
    }

    /// Raises the peer's request stream limit when the work in progress here
    /// reaches a quarter of it, so the peer finds room before it needs it
    /// (it reaches `max` while the peer has `max / 4` requests open).
    pub(super) fn grow_bi_limit(&self, max: u32) {
        let limit = self.bi_limit.load(Ordering::Relaxed);
        if limit >= max || self.busy.load(Ordering::Relaxed).saturating_mul(4) < limit as usize {
            return;
        }
        let new = limit.saturating_mul(2).min(max);
        if self
            .bi_limit
            .compare_exchange(limit, new, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.conn
                .set_max_concurrent_bi_streams(VarInt::from_u32(new));
        }
    }

    /// The writer's queue, starting the writer on first use; `None` once a
    /// graceful close barred it (the caller moves to a new connection).
    pub(super) fn queue(
        self: &Arc<Self>,
        inner: &Arc<Inner>,
    ) -> Option<&mpsc::UnboundedSender<Queued>> {
        if let Some(tx) = self.queue_tx.get() {
            return Some(tx);
        }
        // Under the state's lock, so a drain starting now either sees the
        // writer ([`PeerConn::start_drain`]) or bars it.
        let state = self.state.borrow();
        if state.bars_writer() {
            return None;
        }
        let tx = self.queue_tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(writer_task(inner.clone(), self.clone(), rx));
            tx
        });
        drop(state);
        Some(tx)
    }

    /// Applies `event` to the connection's state ([`ConnState::apply`]),
    /// waking the tasks that wait for a transition when the state moved.
    /// A move to a close decided here then closes the QUIC connection,
    /// outside the lock.
    pub(super) fn apply(&self, event: Event) -> Result<bool, Illegal> {
        self.apply_and(event, |_| ()).0
    }

    /// [`PeerConn::apply`], also running `also` on the state under the same
    /// lock (whether or not the state moved).
    fn apply_and<R: Default>(
        &self,
        event: Event,
        also: impl FnOnce(&ConnState) -> R,
    ) -> (Result<bool, Illegal>, R) {
        let mut result = Ok(false);
        let mut close = None;
        let mut out = None;
        self.state.send_if_modified(|s| {
            result = s.apply(event);
            if result == Ok(true)
                && let ConnState::Closed {
                    reason: CloseReason::Local { code, reason },
                    ..
                } = s
            {
                close = Some((*code, *reason));
            }
            out = Some(also(s));
            result == Ok(true)
        });
        if let Some((code, reason)) = close {
            self.conn.close(code.into(), reason.as_bytes());
        }
        // `send_if_modified` always runs the closure.
        (result, out.unwrap_or_default())
    }

    /// Closes the connection here with `code` and `reason` (if QUIC has not
    /// closed it already, which is then recorded instead).
    pub(super) fn close(&self, code: u32, reason: &'static str) {
        let reason = match self.conn.close_reason() {
            Some(e) => CloseReason::Ended(e),
            None => CloseReason::Local { code, reason },
        };
        let _ = self.apply(Event::Close(reason));
    }

    /// Records that QUIC closed the connection (the watchdog saw it end).
    pub(super) fn ended(&self, e: ConnectionError) {
        let _ = self.apply(Event::Close(CloseReason::Ended(e)));
    }

    /// Starts a graceful close ([`Event::Drain`]): `Ok(true)` if this call
    /// started it, `Ok(false)` if one was already under way (or the
    /// connection is closed); with whether a writer was started before the
    /// drain barred it.
    pub(super) fn start_drain(&self) -> (Result<bool, Illegal>, bool) {
        self.apply_and(Event::Drain, |_| self.queue_tx.get().is_some())
    }

    /// The peer's process instance, once its hello arrived.
    pub(super) fn instance(&self) -> Option<u64> {
        self.state.borrow().instance()
    }

    /// Admitted, and no close under way.
    pub(super) fn is_open(&self) -> bool {
        matches!(*self.state.borrow(), ConnState::Open { .. })
    }

    /// A duplicate to the same process won the tie-break.
    pub(super) fn is_superseded(&self) -> bool {
        matches!(
            *self.state.borrow(),
            ConnState::Open {
                superseded: true,
                ..
            }
        )
    }

    /// A graceful close began (it may have ended since): a send that
    /// picked this connection moves to a new one.
    pub(super) fn drained(&self) -> bool {
        self.state.borrow().drained()
    }

    /// Closed, as QUIC sees it: at once when the peer or QUIC ended it
    /// (the state learns that from the watchdog a moment later), and right
    /// after the state for a close decided here. On every send's path, so
    /// it takes no lock of ours.
    pub(super) fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    pub(super) fn initiator<'a>(&'a self, me: &'a NodeName) -> &'a NodeName {
        if self.initiated_locally {
            me
        } else {
            &self.peer.name
        }
    }
}
