//! The endpoint: one QUIC endpoint per node, its connections and their tasks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{ConnectionError, VarInt};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::budget::{Budgets, Charge, Class, MESSAGE_OVERHEAD, PeerBudget};
use crate::config::{TransportConfig, WhenFull};
use crate::error::{BindError, TransportError};
use crate::frame::{
    self, Cap, Caps, DecodeError, EXCHANGE_FRAME_MAX, Encoding, ExchangeTag, FrameReader,
    INLINE_FRAME_MAX, LEN_PREFIX, MAX_HEADER_LEN, MAX_HELLO_LEN, OutFrame, StreamKind, code,
};
use crate::inbound::{AnswerTo, Charged, Datagram, Incoming, Message, Responder, SlottedDatagram};
use crate::name::{Dest, NodeName, Peer, canonical_addr};
use crate::sever::SeverableSocket;
use crate::stats::{Stats, StatsSnapshot};
use crate::trust::{ALPN, NodeIdentity, TlsConfigs, node_name_of};

/// Largest message body sent on the shared per-peer stream; larger one-way
/// messages get a stream of their own. Every node accepts at least this much.
const INLINE_BODY_MAX: usize = INLINE_FRAME_MAX - MAX_HEADER_LEN;
/// Server name sent when dialing an address whose node is unknown.
const ANY_NODE_SNI: &str = "any-node.shoal.invalid";
/// Ticks of inactivity after which a superseded duplicate connection closes.
const SUPERSEDED_IDLE_TICKS: u32 = 2;
/// Longest wait of each step of a graceful close before closing anyway.
const GRACE: Duration = Duration::from_secs(5);
/// Request streams a peer may open at first, before the limit grows towards
/// [`TransportConfig::max_concurrent_requests`]. quinn keeps an entry per
/// allowed stream in two tables of each connection (about 170 bytes per
/// stream for both ends), so an idle connection allowed 256 costs about
/// 40 KiB more than one allowed 16.
const INITIAL_BI_STREAMS: u32 = 16;
/// How long a connection's writer keeps its batch (room for the messages
/// it takes from its queue at once, grown by a burst to up to 512, about
/// 50 KiB) while its queue stays empty; then it frees it, so a connection
/// that carried a burst and now carries only datagrams and requests does
/// not hold it for as long as it stays open.
const WRITER_RELEASE_AFTER: Duration = Duration::from_secs(1);

mod bind;
mod conn;
mod connect;
mod errors;
mod lifecycle;
mod receive;
mod send;
mod state;
#[cfg(test)]
mod tests;

use bind::*;
use conn::*;
pub(crate) use conn::{BusyGuard, PeerConn};
use connect::*;
use errors::*;
use lifecycle::*;
use receive::*;
use send::*;
pub(crate) use send::{answer_exchange, refuse_exchange};
use state::*;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One node's QUIC endpoint: sends datagrams, messages and requests to other
/// nodes of the cluster and receives theirs (through [`Incoming`]).
///
/// Cheap to clone; all clones share the endpoint. Call
/// [`Transport::shutdown`] to stop it: background tasks keep it alive until
/// then.
#[derive(Clone, Debug)]
pub struct Transport {
    inner: Arc<Inner>,
}

type DialResult = Option<Result<Arc<PeerConn>, TransportError>>;

#[derive(Default)]
struct Table {
    /// The connection used for sending to each address.
    conns: HashMap<SocketAddr, Arc<PeerConn>>,
    /// Dials in progress, shared by everyone who needs the same address.
    dialing: HashMap<SocketAddr, watch::Receiver<DialResult>>,
    /// Per name, the connection being closed gracefully because a newer one
    /// of that name replaced it ([`install`]): at most one per name, so a
    /// peer dialing from many ports holds at most two connections here.
    /// Removed when it closes (the watchdog).
    replacing: HashMap<NodeName, Arc<PeerConn>>,
}

pub(crate) struct Inner {
    me: NodeName,
    instance: u64,
    endpoint: quinn::Endpoint,
    local_addr: SocketAddr,
    client_named: quinn::ClientConfig,
    client_any: quinn::ClientConfig,
    pub(crate) config: TransportConfig,
    pub(crate) stats: Stats,
    table: Mutex<Table>,
    /// Numbers the connections in the order this endpoint first saw them
    /// (see [`PeerConn::arrival`]). An accepted connection takes its number
    /// in the accept loop, when quinn hands over the peer's first packet: one
    /// loop, so in the order the peer's connection attempts arrived, before
    /// any handshake or task scheduling can reorder them. A dialled one takes
    /// it when the dial starts, just before quinn sends the first packet.
    /// Both points precede everything the connection can carry, so a peer
    /// that connects again (from another port, or after a restart) always
    /// gets a larger number than its earlier connection however late that
    /// one's admission ends; admission order (hello waits, a task starved of
    /// CPU) cannot reorder them.
    arrivals: AtomicU64,
    /// Tests only: the install of a connection from one of these addresses
    /// waits until its gate opens, to drive installs out of order.
    #[cfg(test)]
    install_gates: Mutex<HashMap<SocketAddr, watch::Receiver<bool>>>,
    messages_tx: mpsc::Sender<Charged>,
    /// Messages on control channels, queued apart.
    control_tx: mpsc::Sender<Charged>,
    datagrams_tx: mpsc::Sender<SlottedDatagram>,
    /// What inbound data may cost, endpoint-wide and per peer.
    budgets: Budgets,
    /// Caps of every channel's inbound messages (size, compression ratio).
    pub(crate) caps: Caps,
    shut: AtomicBool,
    /// Set by [`Transport::sever`]: the socket sends and receives nothing.
    severed: Arc<AtomicBool>,
    /// Tells the receivers the endpoint is shut down.
    shut_tx: watch::Sender<bool>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("name", &self.me)
            .field("addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// The inbound queue of messages on `channel`.
    pub(crate) fn queue_for(&self, channel: u32) -> &mpsc::Sender<Charged> {
        if self.config.is_control(channel) {
            &self.control_tx
        } else {
            &self.messages_tx
        }
    }

    /// Frames a message for the wire, compressed when that helps and stays
    /// within the channel's ratio cap (so a peer with the same caps never
    /// refuses it).
    pub(crate) fn out_frame(&self, channel: u32, body: Bytes) -> OutFrame {
        let compress_min = if self.config.plain_channels.contains(&channel) {
            usize::MAX
        } else {
            self.config.compress_min
        };
        OutFrame::within_ratio(
            channel,
            body,
            compress_min,
            self.config.compression_level,
            self.caps.of(channel).max_ratio,
        )
    }
}

impl Transport {
    /// The address this endpoint listens on (and sends from).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This node's name.
    pub fn name(&self) -> &NodeName {
        &self.inner.me
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Bytes of inbound messages charged right now: announced decompressed
    /// sizes (plus [`crate::MESSAGE_OVERHEAD`] each) of messages being read,
    /// decoded or waiting in [`Incoming`], until the application takes them.
    /// At most [`TransportConfig::inbound_bytes`]. Messages on control
    /// channels are not included: see [`Transport::control_bytes_charged`].
    pub fn inbound_bytes_charged(&self) -> usize {
        self.inner.budgets.charged()
    }

    /// Bytes of inbound messages on control channels charged right now (as
    /// [`Transport::inbound_bytes_charged`], against
    /// [`TransportConfig::control_bytes`]).
    pub fn control_bytes_charged(&self) -> usize {
        self.inner.budgets.control_charged()
    }

    /// The most bytes [`Transport::inbound_bytes_charged`] ever reached: the
    /// high-water mark of inbound message memory.
    pub fn inbound_bytes_charged_peak(&self) -> usize {
        self.inner.budgets.peak()
    }

    /// The bytes of the peer called `name`'s share (all its connections)
    /// in use: charged, or already set aside for a reader of its that waits
    /// for the rest. At most its share, [`TransportConfig::peer_share_percent`]
    /// of the budget.
    pub fn inbound_bytes_charged_by(&self, name: &NodeName) -> usize {
        self.inner.budgets.charged_by(name)
    }

    /// The peers this node currently has a connection to (for sending).
    pub fn peers(&self) -> Vec<Peer> {
        lock(&self.inner.table)
            .conns
            .values()
            .filter(|pc| !pc.is_closed())
            .map(|pc| pc.peer.clone())
            .collect()
    }

    /// The application's features the peer at `dest` announced in its hello
    /// ([`TransportConfig::app_features`]); `None` while there is no
    /// connection to it (0 from a peer of a version without them).
    pub fn peer_app_features(&self, dest: &Dest) -> Option<u32> {
        self.open_connection(dest)
            .map(|pc| pc.peer_app_features.load(Ordering::SeqCst))
    }

    /// QUIC connections open right now, in either direction, duplicates
    /// included.
    pub fn open_connections(&self) -> usize {
        self.inner.endpoint.open_connections()
    }

    /// Makes sure a connection to `dest` is open and admitted by both sides,
    /// and returns the verified peer (how a node learns a join seed's name).
    ///
    /// # Errors
    /// [`TransportError::Unreachable`], [`TransportError::Rejected`],
    /// [`TransportError::TimedOut`], [`TransportError::Shutdown`].
    pub async fn connect(&self, dest: &Dest) -> Result<Peer, TransportError> {
        Ok(self.connection(dest).await?.peer.clone())
    }

    /// Closes the connection to `addr`, if any (say, when membership declares
    /// the node dead). Queued messages to it are dropped and counted.
    pub fn disconnect(&self, addr: SocketAddr) {
        let removed = lock(&self.inner.table).conns.remove(&canonical_addr(addr));
        if let Some(pc) = removed {
            pc.close(code::OK, "disconnect");
        }
    }

    /// The largest datagram payload that fits the connection to `dest` right
    /// now (it grows with path MTU discovery, from about 1,160 bytes); `None`
    /// when there is no connection yet.
    pub fn max_datagram_size(&self, dest: &Dest) -> Option<usize> {
        let table = lock(&self.inner.table);
        let pc = table.conns.get(&canonical_addr(dest.addr))?;
        if dest.name.as_ref().is_some_and(|n| *n != pc.peer.name) {
            return None;
        }
        pc.conn.max_datagram_size().map(|m| m.saturating_sub(1))
    }

    /// Sends an unreliable datagram (a membership packet) to `dest`,
    /// connecting first if needed. It may be lost; it is never truncated.
    ///
    /// # Errors
    /// [`TransportError::TooLarge`] when `payload` exceeds
    /// [`Transport::max_datagram_size`], and the connection errors of
    /// [`Transport::connect`].
    pub async fn send_datagram(&self, dest: &Dest, payload: &[u8]) -> Result<(), TransportError> {
        let pc = self.connection(dest).await?;
        let peer = Dest::from(&pc.peer);
        let Some(max) = pc.conn.max_datagram_size() else {
            return Err(TransportError::Rejected {
                peer,
                reason: "the peer does not accept datagrams".into(),
            });
        };
        if payload.len() + 1 > max {
            return Err(TransportError::TooLarge {
                peer,
                size: payload.len() as u64,
                limit: max.saturating_sub(1) as u64,
                side: "datagram size",
            });
        }
        let datagram = frame::encode_datagram(payload);
        let len = datagram.len() as u64;
        let sent = tokio::time::timeout(
            self.inner.config.send_timeout,
            pc.conn.send_datagram_wait(datagram),
        )
        .await;
        match sent {
            Err(_) => Err(TransportError::TimedOut {
                peer,
                after: self.inner.config.send_timeout,
            }),
            Ok(Err(quinn::SendDatagramError::TooLarge)) => Err(TransportError::TooLarge {
                peer,
                size: payload.len() as u64,
                limit: pc.conn.max_datagram_size().unwrap_or(1).saturating_sub(1) as u64,
                side: "datagram size",
            }),
            Ok(Err(quinn::SendDatagramError::ConnectionLost(e))) => Err(classify(&peer, &e)),
            Ok(Err(e)) => Err(TransportError::Rejected {
                peer,
                reason: e.to_string(),
            }),
            Ok(Ok(())) => {
                Stats::inc(&self.inner.stats.datagrams_sent);
                Stats::add(&self.inner.stats.bytes_sent, len);
                pc.touch();
                Ok(())
            }
        }
    }

    /// Sends a one-way message on `channel` to `dest`, connecting first if
    /// needed.
    ///
    /// Messages up to 64 KiB go through the peer's bounded send queue and its
    /// long-lived stream, in order; `Ok` means queued (the queue is written
    /// out unless the connection dies, which is counted in `messages_lost`).
    /// Larger messages get a stream of their own and `Ok` means the receiver
    /// took the message; they are not ordered with the others.
    ///
    /// # Errors
    /// [`TransportError::TooLarge`] above the local limit (nothing is sent)
    /// or when the receiver refused it, [`TransportError::QueueFull`] with
    /// [`WhenFull::Fail`], [`TransportError::TimedOut`] after
    /// [`TransportConfig::send_timeout`] with [`WhenFull::Wait`], and the
    /// connection errors of [`Transport::connect`].
    pub async fn send(
        &self,
        dest: &Dest,
        channel: u32,
        body: Bytes,
        when_full: WhenFull,
    ) -> Result<(), TransportError> {
        self.check_size(dest, channel, body.len())?;
        let inline = body.len() <= INLINE_BODY_MAX;
        let mut frame = self.inner.out_frame(channel, body);
        let config = &self.inner.config;
        let timeout = config.send_timeout;
        // A connection found just as it closes gracefully refuses the message
        // explicitly; then the message goes on a new connection, once.
        let mut retried = false;
        loop {
            // Fast path without a timer: the connection is usually open.
            let pc = match self.open_connection(dest) {
                Some(pc) => pc,
                None => match tokio::time::timeout(timeout, self.connection(dest)).await {
                    Ok(pc) => pc?,
                    Err(_) => {
                        return Err(TransportError::TimedOut {
                            peer: dest.clone(),
                            after: timeout,
                        });
                    }
                },
            };
            if self.inner.config.is_control(channel) {
                return self.send_control(&pc, frame).await;
            }
            if !inline {
                return self.send_single(&pc, frame).await;
            }
            let peer = || Dest::from(&pc.peer);
            let need = frame.wire_len() as u32;
            // Fast path without a timer: the queue usually has room.
            let permit = match (pc.budget.clone().try_acquire_many_owned(need), when_full) {
                (Ok(permit), _) => permit,
                (Err(_), WhenFull::Fail) => {
                    Stats::inc(&self.inner.stats.send_queue_full);
                    return Err(TransportError::QueueFull { peer: peer() });
                }
                (Err(_), WhenFull::Wait) => {
                    match tokio::time::timeout(timeout, pc.budget.clone().acquire_many_owned(need))
                        .await
                    {
                        Ok(Ok(p)) => p,
                        Ok(Err(_)) => return Err(self.closed_error(&pc)),
                        Err(_) => {
                            return Err(TransportError::TimedOut {
                                peer: peer(),
                                after: timeout,
                            });
                        }
                    }
                }
            };
            let queued = Queued {
                item: Item::Message(frame),
                _permit: Some(permit),
            };
            let sent = match pc.queue(&self.inner) {
                Some(tx) => tx.send(queued).map_err(|e| e.0),
                None => Err(queued),
            };
            match sent {
                Ok(()) => return Ok(()),
                Err(Queued {
                    item: Item::Message(f),
                    ..
                }) if !retried && pc.drained() => {
                    retried = true;
                    frame = f;
                }
                Err(_) => return Err(self.closed_error(&pc)),
            }
        }
    }

    /// Sends a request on `channel` and waits for the answer, at most
    /// `timeout` (connection included).
    ///
    /// A request on a data channel whose frame fits 64 KiB goes on the
    /// connection's long-lived requests stream, named by an id, and its
    /// answer comes on the peer's answers stream; others (control channels,
    /// larger requests) take a bi stream of their own. At most
    /// [`TransportConfig::max_concurrent_requests`] less
    /// [`crate::CONTROL_STREAMS`] requests on data channels (with large
    /// one-way messages) are in flight to a peer at once: the next waits for
    /// room, within `timeout`. A request waiting for its answer fails at once
    /// when its connection closes.
    ///
    /// # Errors
    /// [`TransportError::TooLarge`] for a request above the local limit, a
    /// request the peer refused as too large, or an answer above the local
    /// limit; [`TransportError::Closed`] when the peer dropped the request;
    /// [`TransportError::TimedOut`]; and the errors of [`Transport::connect`].
    pub async fn request(
        &self,
        dest: &Dest,
        channel: u32,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        self.check_size(dest, channel, body.len())?;
        let frame = self.inner.out_frame(channel, body);
        match tokio::time::timeout(timeout, self.request_inner(dest, frame)).await {
            Ok(r) => r,
            Err(_) => Err(TransportError::TimedOut {
                peer: dest.clone(),
                after: timeout,
            }),
        }
    }

    /// Cuts the endpoint off the network at once, as if its process had
    /// died: from now on its socket sends nothing and discards everything
    /// it receives. Connections are not closed, so peers see silence (their
    /// idle timeout, their membership's probes) rather than a goodbye. For
    /// tests and fault drills of an abrupt stop; call
    /// [`Transport::shutdown`] afterwards to release the endpoint (it then
    /// sends nothing either).
    pub fn sever(&self) {
        if !self.inner.severed.swap(true, Ordering::SeqCst) {
            warn!(node = %self.inner.me, "transport severed: nothing is sent or received any more");
        }
    }

    /// Whether [`Transport::sever`] was called.
    pub fn is_severed(&self) -> bool {
        self.inner.severed.load(Ordering::SeqCst)
    }

    /// Stops the endpoint: waits up to a second for send queues to drain,
    /// closes every connection and the socket. Later sends fail with
    /// [`TransportError::Shutdown`]; [`Incoming`] ends once drained.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        if inner.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        let conns: Vec<_> = lock(&inner.table).conns.drain().map(|(_, pc)| pc).collect();
        let drained = async {
            for pc in &conns {
                let _ = pc
                    .budget
                    .acquire_many(inner.config.send_queue_bytes as u32)
                    .await;
            }
        };
        // A severed endpoint sends nothing: there is nothing to drain and
        // no goodbye to wait for.
        let severed = inner.severed.load(Ordering::SeqCst);
        if !severed {
            let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
        }
        inner.endpoint.close(code::SHUTDOWN.into(), b"shutdown");
        if !severed {
            let _ = tokio::time::timeout(Duration::from_secs(1), inner.endpoint.wait_idle()).await;
        }
        inner.shut_tx.send_replace(true);
        info!(node = %inner.me, "transport shut down");
    }

    fn check_size(&self, dest: &Dest, channel: u32, size: usize) -> Result<(), TransportError> {
        let limit = self.inner.caps.of(channel).max_size;
        if size > limit {
            return Err(TransportError::TooLarge {
                peer: dest.clone(),
                size: size as u64,
                limit: limit as u64,
                side: "local limit",
            });
        }
        Ok(())
    }

    fn closed_error(&self, pc: &PeerConn) -> TransportError {
        match pc.conn.close_reason() {
            Some(e) => classify(&Dest::from(&pc.peer), &e),
            None => TransportError::Closed {
                peer: Dest::from(&pc.peer),
                reason: "connection closing".into(),
            },
        }
    }

    /// The admitted connection for `dest` if one is open.
    fn open_connection(&self, dest: &Dest) -> Option<Arc<PeerConn>> {
        let table = lock(&self.inner.table);
        let pc = table.conns.get(&canonical_addr(dest.addr))?;
        (!pc.is_closed() && dest.name.as_ref().is_none_or(|n| *n == pc.peer.name))
            .then(|| pc.clone())
    }

    /// The admitted connection for `dest`, dialing (once, shared by every
    /// caller) if there is none.
    async fn connection(&self, dest: &Dest) -> Result<Arc<PeerConn>, TransportError> {
        let addr = canonical_addr(dest.addr);
        if addr == self.inner.local_addr {
            return Err(TransportError::Rejected {
                peer: dest.clone(),
                reason: "that is this node's own address".into(),
            });
        }
        let mut dials = 0u32;
        loop {
            if self.inner.shut.load(Ordering::Relaxed) {
                return Err(TransportError::Shutdown);
            }
            let mut wait = {
                let mut table = lock(&self.inner.table);
                if let Some(pc) = table.conns.get(&addr)
                    && !pc.is_closed()
                    && dest.name.as_ref().is_none_or(|n| *n == pc.peer.name)
                {
                    return Ok(pc.clone());
                }
                match table.dialing.get(&addr) {
                    Some(rx) => rx.clone(),
                    None => {
                        if dials >= 2 {
                            // Our dials succeeded but each connection was gone
                            // at once: report it rather than loop.
                            return Err(TransportError::Closed {
                                peer: dest.clone(),
                                reason: "the connection closed right after it opened".into(),
                            });
                        }
                        let (tx, rx) = watch::channel(None);
                        table.dialing.insert(addr, rx.clone());
                        tokio::spawn(dial_task(self.inner.clone(), dest.clone(), tx));
                        dials += 1;
                        rx
                    }
                }
            };
            let outcome = wait.wait_for(Option::is_some).await.map(|v| v.clone());
            match outcome {
                Ok(Some(Ok(pc))) => {
                    if dest.name.as_ref().is_none_or(|n| *n == pc.peer.name) && !pc.is_closed() {
                        return Ok(pc);
                    }
                }
                Ok(Some(Err(e))) => return Err(e.for_peer(dest)),
                Ok(None) | Err(_) => {
                    return Err(TransportError::Unreachable {
                        peer: dest.clone(),
                        reason: "dial abandoned".into(),
                    });
                }
            }
        }
    }
}
