//! One admitted connection's record ([`PeerConn`]): the peer, the QUIC
//! connection, its send queue and writer, its budgets and its counters.

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

/// One admitted connection to a peer.
pub(crate) struct PeerConn {
    pub(super) peer: Peer,
    pub(super) conn: quinn::Connection,
    pub(super) initiated_locally: bool,
    /// The peer's process instance, from its hello (0 until then).
    pub(super) instance: AtomicU64,
    /// The writer's queue, made (and the writer task started) by the first
    /// one-way message: many connections carry only datagrams and requests,
    /// and an idle one should not pay for a task and a queue block.
    pub(super) queue_tx: OnceLock<mpsc::UnboundedSender<Queued>>,
    /// Set by a graceful close's drain; from then on no writer starts.
    /// Taken around starting the writer so the two never cross.
    pub(super) writer_barred: Mutex<bool>,
    /// Bytes allowed in the send queue.
    pub(super) budget: Arc<Semaphore>,
    /// Bi streams data channels may open at once
    /// ([`TransportConfig::data_streams`]).
    pub(super) data_streams: Arc<Semaphore>,
    /// The peer's shares of the inbound budgets (shared by its connections).
    pub(super) share: Arc<PeerBudget>,
    /// Frames of this connection refused (caps, ratio, deadline).
    pub(super) refusals: AtomicU32,
    pub(super) active: AtomicBool,
    pub(super) busy: AtomicUsize,
    pub(super) superseded: AtomicBool,
    pub(super) hello_tx: Mutex<Option<oneshot::Sender<u64>>>,
    /// Graceful close in progress (either side started it).
    pub(super) closing: AtomicBool,
    /// Message streams this side opened / of the peer's that ended here.
    pub(super) streams_opened: AtomicU32,
    pub(super) streams_finished: AtomicU32,
    /// Asks the writer to flush, finish its stream and stop.
    pub(super) drain_tx: watch::Sender<bool>,
    /// Set by the writer when it stopped.
    pub(super) writer_done: watch::Sender<bool>,
    /// The peer's `Done` (with its stream count), phase 2 of a graceful close.
    pub(super) peer_done: watch::Sender<Option<u32>>,
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
        let barred = lock(&self.writer_barred);
        if *barred {
            return None;
        }
        Some(self.queue_tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(writer_task(inner.clone(), self.clone(), rx));
            tx
        }))
    }

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
