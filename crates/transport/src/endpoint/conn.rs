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

/// What a writer puts on its stream.
pub(super) enum Item {
    /// A one-way message (the shared message stream).
    Message(OutFrame),
    /// A request (the requests stream) or the answer to one (the answers
    /// stream).
    Exchange {
        tag: ExchangeTag,
        id: u64,
        frame: OutFrame,
    },
    /// A request refused with a [`code`] (the answers stream).
    Refusal { id: u64, code: u32 },
}

impl Item {
    /// Appends the item's frame to `buf`.
    pub(super) fn write_to(&self, buf: &mut BytesMut) {
        match self {
            Self::Message(frame) => frame.write_to(buf),
            Self::Exchange { tag, id, frame } => frame.write_exchange(*tag, *id, buf),
            Self::Refusal { id, code } => frame::write_refusal(*id, *code, buf),
        }
    }

    /// Bytes [`Item::write_to`] appends.
    pub(super) fn wire_len(&self) -> usize {
        match self {
            Self::Message(frame) => frame.wire_len(),
            Self::Exchange { frame, .. } => frame::EXCHANGE_PREFIX + frame.wire_len(),
            Self::Refusal { .. } => LEN_PREFIX + frame::EXCHANGE_PREFIX + 4,
        }
    }

    /// Counted in `messages_sent` (one-way messages and requests).
    pub(super) fn is_message(&self) -> bool {
        matches!(
            self,
            Self::Message(_)
                | Self::Exchange {
                    tag: ExchangeTag::Request,
                    ..
                }
        )
    }

    pub(super) fn is_compressed(&self) -> bool {
        match self {
            Self::Message(frame) | Self::Exchange { frame, .. } => frame.is_compressed(),
            Self::Refusal { .. } => false,
        }
    }
}

/// An item in a writer's queue, with the bytes of the send queue it holds
/// (none for a refusal: a dozen bytes, at most one per request received).
pub(super) struct Queued {
    pub(super) item: Item,
    pub(super) _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// How a request sent on the requests stream ended, as the reader of the
/// answers stream learnt.
#[derive(Debug)]
pub(super) enum Answer {
    /// The answer's body.
    Body(Bytes),
    /// The peer refused the request (a [`code`]).
    Refused(u32),
    /// The answer could not be taken.
    Malformed(DecodeError),
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
    /// The queue of the writer of this side's requests, made (and the
    /// writer started) by the first request on a data channel that fits
    /// the stream ([`StreamKind::Requests`]).
    pub(super) requests_tx: OnceLock<mpsc::UnboundedSender<Queued>>,
    /// The queue of the writer of answers and refusals to the peer's
    /// requests ([`StreamKind::Answers`]), made by the first request
    /// received there. Never barred: answers go out until the connection
    /// closes (a graceful close waits for the requests in progress).
    pub(super) answers_tx: OnceLock<mpsc::UnboundedSender<Queued>>,
    /// This side's requests on the requests stream waiting for their
    /// answer, by id. At most [`TransportConfig::data_streams`] (the
    /// permits of `data_streams`); an entry leaves when its answer comes or
    /// its requester gives up.
    pub(super) pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    /// The next request id on the requests stream.
    pub(super) next_request: AtomicU64,
    /// The features of the peer's hello ([`frame::features`]), set before
    /// the hello moves the connection to open (0 until then).
    pub(super) peer_features: AtomicU32,
    /// The application's features of the peer's hello, likewise.
    pub(super) peer_app_features: AtomicU32,
    /// Bytes allowed in the send queue.
    pub(super) budget: Arc<Semaphore>,
    /// Requests and large one-way messages on data channels in flight at
    /// once ([`TransportConfig::data_streams`]): each holds a bi stream, or
    /// a request an entry of `pending`.
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
            tokio::spawn(writer_task(
                inner.clone(),
                self.clone(),
                rx,
                StreamKind::Messages,
            ));
            tx
        });
        drop(state);
        Some(tx)
    }

    /// The queue of the writer of `kind` ([`StreamKind::Requests`] or
    /// [`StreamKind::Answers`]), starting the writer on first use.
    pub(super) fn exchange_queue(
        self: &Arc<Self>,
        inner: &Arc<Inner>,
        kind: StreamKind,
    ) -> &mpsc::UnboundedSender<Queued> {
        let cell = if kind == StreamKind::Requests {
            &self.requests_tx
        } else {
            &self.answers_tx
        };
        cell.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(writer_task(inner.clone(), self.clone(), rx, kind));
            tx
        })
    }

    /// Queues a request (on the requests stream) or an answer (on the
    /// answers stream) holding `permit` of the send queue; `Err` once the
    /// writer stopped (the connection closed).
    pub(super) fn queue_exchange(
        self: &Arc<Self>,
        inner: &Arc<Inner>,
        tag: ExchangeTag,
        id: u64,
        frame: OutFrame,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<(), ()> {
        let kind = if tag == ExchangeTag::Request {
            StreamKind::Requests
        } else {
            StreamKind::Answers
        };
        let queued = Queued {
            item: Item::Exchange { tag, id, frame },
            _permit: Some(permit),
        };
        self.exchange_queue(inner, kind)
            .send(queued)
            .map_err(|_| ())
    }

    /// A new request id and the receiver of its answer.
    pub(super) fn register(&self) -> (u64, oneshot::Receiver<Answer>) {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        (id, rx)
    }

    /// Hands `answer` to the request `id`, if its requester still waits.
    pub(super) fn answer(&self, id: u64, answer: Answer) -> bool {
        let tx = lock(&self.pending).remove(&id);
        tx.is_some_and(|tx| tx.send(answer).is_ok())
    }

    /// Forgets the request `id` (its requester gave up, or it was lost with
    /// its stream: the requester then learns it).
    pub(super) fn forget(&self, id: u64) {
        lock(&self.pending).remove(&id);
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

    /// Whether the peer's hello named `feature`.
    pub(super) fn speaks(&self, feature: u32) -> bool {
        self.peer_features.load(Ordering::SeqCst) & feature == feature
    }

    /// The peer's process instance, once its hello arrived.
    pub(super) fn instance(&self) -> Option<u64> {
        self.state.borrow().instance()
    }

    /// Closed, as the state knows it (the watchdog records a close QUIC
    /// saw; a close decided here is recorded at once).
    pub(super) fn is_closed_state(&self) -> bool {
        matches!(*self.state.borrow(), ConnState::Closed { .. })
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
