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
    self, Cap, Caps, DecodeError, Encoding, FrameReader, INLINE_FRAME_MAX, LEN_PREFIX,
    MAX_HEADER_LEN, MAX_HELLO_LEN, OutFrame, StreamKind, code,
};
use crate::inbound::{Charged, Datagram, Incoming, Message, Responder, SlottedDatagram};
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

mod connect;
mod lifecycle;
mod receive;

use connect::*;
use lifecycle::*;
use receive::*;

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
        OutFrame::within_ratio(
            channel,
            body,
            self.config.compress_min,
            self.config.compression_level,
            self.caps.of(channel).max_ratio,
        )
    }
}

/// Counts work in progress on a connection so it is not closed as idle.
pub(crate) struct BusyGuard(Arc<PeerConn>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

struct Queued {
    frame: OutFrame,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// One admitted connection to a peer.
pub(crate) struct PeerConn {
    peer: Peer,
    conn: quinn::Connection,
    initiated_locally: bool,
    /// The peer's process instance, from its hello (0 until then).
    instance: AtomicU64,
    /// The writer's queue, made (and the writer task started) by the first
    /// one-way message: many connections carry only datagrams and requests,
    /// and an idle one should not pay for a task and a queue block.
    queue_tx: OnceLock<mpsc::UnboundedSender<Queued>>,
    /// Set by a graceful close's drain; from then on no writer starts.
    /// Taken around starting the writer so the two never cross.
    writer_barred: Mutex<bool>,
    /// Bytes allowed in the send queue.
    budget: Arc<Semaphore>,
    /// Bi streams data channels may open at once
    /// ([`TransportConfig::data_streams`]).
    data_streams: Arc<Semaphore>,
    /// The peer's shares of the inbound budgets (shared by its connections).
    share: Arc<PeerBudget>,
    /// Frames of this connection refused (caps, ratio, deadline).
    refusals: AtomicU32,
    active: AtomicBool,
    busy: AtomicUsize,
    superseded: AtomicBool,
    hello_tx: Mutex<Option<oneshot::Sender<u64>>>,
    /// Graceful close in progress (either side started it).
    closing: AtomicBool,
    /// Message streams this side opened / of the peer's that ended here.
    streams_opened: AtomicU32,
    streams_finished: AtomicU32,
    /// Asks the writer to flush, finish its stream and stop.
    drain_tx: watch::Sender<bool>,
    /// Set by the writer when it stopped.
    writer_done: watch::Sender<bool>,
    /// The peer's `Done` (with its stream count), phase 2 of a graceful close.
    peer_done: watch::Sender<Option<u32>>,
    /// Request streams the peer may have open now (grows on demand up to
    /// `max_concurrent_requests`, never shrinks).
    bi_limit: AtomicU32,
}

impl PeerConn {
    fn touch(&self) {
        self.active.store(true, Ordering::Relaxed);
    }

    fn busy(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::Relaxed);
        self.touch();
        BusyGuard(self.clone())
    }

    /// Raises the peer's request stream limit when the work in progress here
    /// reaches a quarter of it, so the peer finds room before it needs it
    /// (it reaches `max` while the peer has `max / 4` requests open).
    fn grow_bi_limit(&self, max: u32) {
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
    fn queue(self: &Arc<Self>, inner: &Arc<Inner>) -> Option<&mpsc::UnboundedSender<Queued>> {
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

    fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    fn initiator<'a>(&'a self, me: &'a NodeName) -> &'a NodeName {
        if self.initiated_locally {
            me
        } else {
            &self.peer.name
        }
    }
}

fn transport_config(config: &TransportConfig) -> Result<quinn::TransportConfig, BindError> {
    let mut t = quinn::TransportConfig::default();
    // Grown on demand per connection (`PeerConn::grow_bi_limit`).
    t.max_concurrent_bidi_streams(VarInt::from_u32(initial_bi_streams(config)));
    // Hello, the shared message stream, and room for a replacement.
    t.max_concurrent_uni_streams(VarInt::from_u32(8));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(config.idle_timeout)
            .map_err(|_| BindError::Config("idle_timeout is too long".into()))?,
    ));
    t.keep_alive_interval(Some(config.keep_alive));
    t.stream_receive_window(VarInt::from_u32(4 * 1024 * 1024));
    t.receive_window(VarInt::from_u32(32 * 1024 * 1024));
    t.send_window(32 * 1024 * 1024);
    t.datagram_receive_buffer_size(Some(1024 * 1024));
    t.datagram_send_buffer_size(1024 * 1024);
    Ok(t)
}

fn initial_bi_streams(config: &TransportConfig) -> u32 {
    INITIAL_BI_STREAMS.min(config.max_concurrent_requests)
}

fn udp_socket(addr: SocketAddr, buffer: usize) -> Result<std::net::UdpSocket, BindError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let err = |source| BindError::Socket { addr, source };
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    // The kernel may cap these (net.core.rmem_max / wmem_max); a smaller
    // buffer is not fatal, only slower under load.
    if let Err(e) = socket.set_recv_buffer_size(buffer) {
        warn!(error = %e, bytes = buffer, "could not raise the UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(buffer) {
        warn!(error = %e, bytes = buffer, "could not raise the UDP send buffer");
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket.into())
}

fn random_instance() -> u64 {
    let rng = ring::rand::SystemRandom::new();
    ring::rand::generate::<[u8; 8]>(&rng)
        .map(|b| u64::from_le_bytes(b.expose()))
        .unwrap_or_else(|_| {
            // Fall back to time and pid: instance ids need uniqueness, not secrecy.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            nanos ^ (u64::from(std::process::id()) << 32)
        })
        .max(1)
}

impl Transport {
    /// Starts an endpoint on a UDP socket bound to `addr` (port 0 picks a
    /// free port), with socket buffers raised to
    /// [`TransportConfig::socket_buffer_bytes`]. Must be called inside a
    /// tokio runtime.
    ///
    /// # Errors
    /// [`BindError`] for a bad configuration, a socket that cannot be bound,
    /// or an identity rustls refuses.
    pub fn bind(
        addr: SocketAddr,
        identity: &NodeIdentity,
        config: TransportConfig,
    ) -> Result<(Self, Incoming), BindError> {
        config.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BindError::NoRuntime);
        }
        let socket = udp_socket(addr, config.socket_buffer_bytes)?;
        let socket = quinn::Runtime::wrap_udp_socket(&quinn::TokioRuntime, socket)
            .map_err(|source| BindError::Socket { addr, source })?;
        Self::with_socket(socket, identity, config)
    }

    /// Starts an endpoint on any socket implementing quinn's
    /// [`quinn::AsyncUdpSocket`], such as a
    /// [`crate::virtual_net::VirtualSocket`]. Must be called inside a tokio
    /// runtime.
    ///
    /// # Errors
    /// As [`Transport::bind`].
    pub fn with_socket(
        socket: Arc<dyn quinn::AsyncUdpSocket>,
        identity: &NodeIdentity,
        config: TransportConfig,
    ) -> Result<(Self, Incoming), BindError> {
        config.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(BindError::NoRuntime);
        }
        let addr = socket.local_addr().map_err(|source| BindError::Socket {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
        let severed = Arc::new(AtomicBool::new(false));
        let socket = Arc::new(SeverableSocket::new(socket, Arc::clone(&severed)));
        Self::start(identity, config, severed, |ep_config, server_config| {
            quinn::Endpoint::new_with_abstract_socket(
                ep_config,
                Some(server_config),
                socket,
                Arc::new(quinn::TokioRuntime),
            )
            .map_err(|source| BindError::Socket { addr, source })
        })
    }

    fn start(
        identity: &NodeIdentity,
        config: TransportConfig,
        severed: Arc<AtomicBool>,
        make: impl FnOnce(
            quinn::EndpointConfig,
            quinn::ServerConfig,
        ) -> Result<quinn::Endpoint, BindError>,
    ) -> Result<(Self, Incoming), BindError> {
        let tls = TlsConfigs::new(identity)?;
        let tcfg = Arc::new(transport_config(&config)?);
        let mut server_config = quinn::ServerConfig::with_crypto(tls.server.clone());
        server_config.transport_config(tcfg.clone());
        // Peers are known by address: a connection must not move.
        server_config.migration(false);
        let mut client_named = tls.client_named.clone();
        client_named.transport_config(tcfg.clone());
        let mut client_any = tls.client_any.clone();
        client_any.transport_config(tcfg);
        let ep_config = quinn::EndpointConfig::new(Arc::new(identity.reset_key()));
        let endpoint = make(ep_config, server_config)?;
        let local_addr = endpoint
            .local_addr()
            .map(canonical_addr)
            .map_err(|source| BindError::Socket {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?;
        let (shut_tx, shut_rx) = watch::channel(false);
        let (messages_tx, messages) = mpsc::channel(config.inbound_messages);
        let (control_tx, control) = mpsc::channel(config.inbound_messages);
        let (datagrams_tx, datagrams) = mpsc::channel(config.inbound_datagrams);
        let inner = Arc::new(Inner {
            me: identity.name().clone(),
            instance: random_instance(),
            endpoint,
            local_addr,
            client_named,
            client_any,
            stats: Stats::default(),
            table: Mutex::new(Table::default()),
            messages_tx,
            control_tx,
            datagrams_tx,
            budgets: Budgets::new(&config),
            caps: config.caps(),
            config,
            shut: AtomicBool::new(false),
            severed,
            shut_tx,
        });
        tokio::spawn(accept_loop(inner.clone()));
        info!(node = %inner.me, addr = %local_addr, "transport listening");
        Ok((
            Self { inner },
            Incoming {
                messages,
                control,
                datagrams,
                shut: shut_rx,
            },
        ))
    }

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
            pc.conn.close(code::OK.into(), b"disconnect");
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
                frame,
                _permit: permit,
            };
            let sent = match pc.queue(&self.inner) {
                Some(tx) => tx.send(queued).map_err(|e| e.0),
                None => Err(queued),
            };
            match sent {
                Ok(()) => return Ok(()),
                Err(q) if !retried && pc.closing.load(Ordering::SeqCst) => {
                    retried = true;
                    frame = q.frame;
                }
                Err(_) => return Err(self.closed_error(&pc)),
            }
        }
    }

    /// Sends a request on `channel` and waits for the answer, at most
    /// `timeout` (connection included).
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

    async fn request_inner(&self, dest: &Dest, frame: OutFrame) -> Result<Bytes, TransportError> {
        let inner = &self.inner;
        let pc = self.connection(dest).await?;
        let _busy = pc.busy();
        let peer = Dest::from(&pc.peer);
        let (_data, (mut send, mut recv)) = open_bi(pc.as_ref(), &frame, &inner.config).await?;
        write_frame(&mut send, StreamKind::Request, &frame)
            .await
            .map_err(|e| write_error(&peer, &e))?;
        let _ = send.finish();
        count_sent(inner, &frame);
        let channel = frame.header.channel;
        let caps = inner.caps.of(channel);
        // The request's own timeout bounds the wait: no frame deadline. The
        // answer on a control channel is charged to the control budget, so
        // it never waits for large answers on other channels.
        let charging = if inner.config.is_control(channel) {
            Charging::Message
        } else {
            Charging::Response
        };
        let response = read_frame(inner, &pc, &mut recv, |_| caps, None, charging).await;
        match response {
            Ok(d) => {
                Stats::inc(&inner.stats.responses_received);
                // The charge ends here: the requester holds the answer now.
                Ok(d.body)
            }
            Err(ReadFrameError::Refused(
                e @ (DecodeError::TooLarge { .. } | DecodeError::Ratio { .. }),
            )) => {
                let _ = recv.stop(code::TOO_LARGE.into());
                refused(inner, &pc, &e);
                let (size, limit) = match e {
                    DecodeError::TooLarge { announced, limit } => (announced, limit),
                    _ => (0, caps.max_size as u64),
                };
                Err(TransportError::TooLarge {
                    peer,
                    size,
                    limit,
                    side: "answer over the local limit",
                })
            }
            Err(ReadFrameError::Refused(e)) => {
                let _ = recv.stop(code::PROTOCOL.into());
                count_decode_error(inner, &e);
                Err(TransportError::Rejected {
                    peer,
                    reason: format!("malformed answer: {e}"),
                })
            }
            Err(ReadFrameError::Stream(e)) => Err(read_error(&peer, &e)),
            Err(ReadFrameError::TimedOut | ReadFrameError::Gone) => Err(TransportError::Closed {
                peer,
                reason: "the answer could not be read".into(),
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

    /// A large one-way message on a bi stream of its own; waits for the
    /// receiver's verdict.
    async fn send_single(&self, pc: &Arc<PeerConn>, frame: OutFrame) -> Result<(), TransportError> {
        let inner = &self.inner;
        let _busy = pc.busy();
        let peer = Dest::from(&pc.peer);
        let timeout = inner.config.send_timeout;
        let work = async {
            let (_data, (mut send, mut recv)) = open_bi(pc.as_ref(), &frame, &inner.config).await?;
            write_frame(&mut send, StreamKind::Single, &frame)
                .await
                .map_err(|e| write_error(&peer, &e))?;
            let _ = send.finish();
            match recv.read_to_end(0).await {
                Ok(_) => Ok(()),
                Err(quinn::ReadToEndError::Read(e)) => Err(read_error(&peer, &e)),
                Err(quinn::ReadToEndError::TooLong) => Err(TransportError::Rejected {
                    peer: peer.clone(),
                    reason: "unexpected data in the verdict".into(),
                }),
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(())) => {
                count_sent(inner, &frame);
                Ok(())
            }
            Ok(Err(TransportError::TooLarge { peer, limit, .. })) => {
                Err(TransportError::TooLarge {
                    peer,
                    size: frame.header_raw_len(),
                    limit,
                    side: "refused by the receiver",
                })
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(TransportError::TimedOut {
                peer,
                after: timeout,
            }),
        }
    }

    /// A one-way message on a control channel: on a bi stream of its own at
    /// a higher priority, so that it never waits behind the shared message
    /// stream (whose reader may be waiting for a data budget the peer's
    /// application does not free). `Ok` once it is handed to QUIC, like a
    /// queued message; the receiver's verdict is read in the background
    /// (a refusal is counted in `messages_lost` and logged).
    async fn send_control(
        &self,
        pc: &Arc<PeerConn>,
        frame: OutFrame,
    ) -> Result<(), TransportError> {
        let inner = &self.inner;
        let busy = pc.busy();
        let peer = Dest::from(&pc.peer);
        let timeout = inner.config.send_timeout;
        let work = async {
            let (_, (mut send, recv)) = open_bi(pc.as_ref(), &frame, &inner.config).await?;
            write_frame(&mut send, StreamKind::Single, &frame)
                .await
                .map_err(|e| write_error(&peer, &e))?;
            let _ = send.finish();
            Ok::<_, TransportError>(recv)
        };
        let mut recv = match tokio::time::timeout(timeout, work).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(TransportError::TimedOut {
                    peer,
                    after: timeout,
                });
            }
        };
        count_sent(inner, &frame);
        let stats = Arc::clone(&self.inner);
        tokio::spawn(async move {
            let _busy = busy;
            let verdict = tokio::time::timeout(timeout, recv.read_to_end(0)).await;
            if !matches!(verdict, Ok(Ok(_))) {
                Stats::inc(&stats.stats.messages_lost);
                debug!(%peer, "control message not confirmed by the receiver");
            }
        });
        Ok(())
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

impl TransportError {
    fn for_peer(self, dest: &Dest) -> Self {
        let peer = dest.clone();
        match self {
            Self::Unreachable { reason, .. } => Self::Unreachable { peer, reason },
            Self::Rejected { reason, .. } => Self::Rejected { peer, reason },
            Self::TooLarge {
                size, limit, side, ..
            } => Self::TooLarge {
                peer,
                size,
                limit,
                side,
            },
            Self::QueueFull { .. } => Self::QueueFull { peer },
            Self::Closed { reason, .. } => Self::Closed { peer, reason },
            Self::TimedOut { after, .. } => Self::TimedOut { peer, after },
            Self::Shutdown => Self::Shutdown,
        }
    }
}

/// Opens a bi stream for `frame`: on a control channel at a higher
/// priority; on any other channel only while fewer than
/// [`TransportConfig::data_streams`] of them are open to the peer (the
/// permit returned lives as long as the stream is in use), so that
/// [`crate::CONTROL_STREAMS`] of the peer's stream limit stay free for
/// control traffic.
async fn open_bi(
    pc: &PeerConn,
    frame: &OutFrame,
    config: &TransportConfig,
) -> Result<
    (
        Option<tokio::sync::OwnedSemaphorePermit>,
        (quinn::SendStream, quinn::RecvStream),
    ),
    TransportError,
> {
    let peer = Dest::from(&pc.peer);
    let control = config.is_control(frame.header.channel);
    let permit = if control {
        None
    } else {
        let p = pc.data_streams.clone().acquire_owned().await;
        Some(p.map_err(|_| TransportError::Closed {
            peer: peer.clone(),
            reason: "connection closing".into(),
        })?)
    };
    let (send, recv) = pc.conn.open_bi().await.map_err(|e| classify(&peer, &e))?;
    if control {
        let _ = send.set_priority(CONTROL_PRIORITY);
    }
    Ok((permit, (send, recv)))
}

/// QUIC send priority of control streams (others have 0): their bytes go
/// out first when the connection's congestion window is the limit.
const CONTROL_PRIORITY: i32 = 1;

fn count_sent(inner: &Inner, frame: &OutFrame) {
    Stats::inc(&inner.stats.messages_sent);
    Stats::add(&inner.stats.bytes_sent, frame.wire_len() as u64 + 1);
    if frame.is_compressed() {
        Stats::inc(&inner.stats.messages_compressed);
    }
}

fn count_decode_error(inner: &Inner, e: &DecodeError) {
    match e {
        DecodeError::TooLarge { .. } => Stats::inc(&inner.stats.frames_too_large),
        DecodeError::Ratio { .. } => Stats::inc(&inner.stats.frames_over_ratio),
        _ => Stats::inc(&inner.stats.frames_malformed),
    }
}

/// Counts a frame refused for its size or ratio and holds it against the
/// connection ([`strike`]).
fn refused(inner: &Inner, pc: &PeerConn, e: &DecodeError) {
    count_decode_error(inner, e);
    warn!(peer = %pc.peer, error = %e, "frame refused");
    strike(inner, pc);
}

/// Counts a refusal against the connection; closes it at `max_refusals`.
fn strike(inner: &Inner, pc: &PeerConn) {
    let n = pc.refusals.fetch_add(1, Ordering::Relaxed) + 1;
    if n == inner.config.max_refusals {
        Stats::inc(&inner.stats.connections_closed_for_abuse);
        warn!(peer = %pc.peer, refusals = n, "closing a connection that keeps sending refused frames");
        pc.conn
            .close(code::PROTOCOL.into(), b"too many refused frames");
    }
}

/// Sorts a connection error into the error kinds callers handle.
fn classify(peer: &Dest, e: &ConnectionError) -> TransportError {
    let peer = peer.clone();
    let is_crypto = |code: u64| (0x100..0x200).contains(&code);
    match e {
        ConnectionError::TimedOut => TransportError::Unreachable {
            peer,
            reason: "no answer (timed out)".into(),
        },
        ConnectionError::TransportError(t) if is_crypto(u64::from(t.code)) => {
            TransportError::Rejected {
                peer,
                reason: format!("TLS handshake failed here: {t}"),
            }
        }
        ConnectionError::ConnectionClosed(c) if is_crypto(u64::from(c.error_code)) => {
            TransportError::Rejected {
                peer,
                reason: format!("the peer refused the TLS handshake: {c}"),
            }
        }
        ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from(code::REJECTED) => {
            TransportError::Rejected {
                peer,
                reason: format!(
                    "the peer refused this node: {}",
                    String::from_utf8_lossy(&c.reason)
                ),
            }
        }
        ConnectionError::VersionMismatch => TransportError::Rejected {
            peer,
            reason: "no common QUIC version".into(),
        },
        ConnectionError::LocallyClosed => TransportError::Closed {
            peer,
            reason: "closed locally".into(),
        },
        other => TransportError::Closed {
            peer,
            reason: other.to_string(),
        },
    }
}

fn write_error(peer: &Dest, e: &quinn::WriteError) -> TransportError {
    match e {
        quinn::WriteError::Stopped(c) if *c == VarInt::from(code::TOO_LARGE) => {
            TransportError::TooLarge {
                peer: peer.clone(),
                size: 0,
                limit: 0,
                side: "refused by the receiver",
            }
        }
        quinn::WriteError::ConnectionLost(c) => classify(peer, c),
        other => TransportError::Closed {
            peer: peer.clone(),
            reason: other.to_string(),
        },
    }
}

fn read_error(peer: &Dest, e: &quinn::ReadError) -> TransportError {
    match e {
        quinn::ReadError::Reset(c) if *c == VarInt::from(code::TOO_LARGE) => {
            TransportError::TooLarge {
                peer: peer.clone(),
                size: 0,
                limit: 0,
                side: "refused by the receiver",
            }
        }
        quinn::ReadError::Reset(c) if *c == VarInt::from(code::NO_RESPONSE) => {
            TransportError::Closed {
                peer: peer.clone(),
                reason: "the peer dropped the request without answering".into(),
            }
        }
        quinn::ReadError::ConnectionLost(c) => classify(peer, c),
        other => TransportError::Closed {
            peer: peer.clone(),
            reason: other.to_string(),
        },
    }
}
