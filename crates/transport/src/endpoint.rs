//! The endpoint: one QUIC endpoint per node, its connections and their tasks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{ConnectionError, VarInt};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::budget::{Budgets, Charge, MESSAGE_OVERHEAD, PeerBudget};
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
    queue_tx: mpsc::UnboundedSender<Queued>,
    /// Bytes allowed in the send queue.
    budget: Arc<Semaphore>,
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
    t.max_concurrent_bidi_streams(VarInt::from_u32(config.max_concurrent_requests));
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
    /// At most [`TransportConfig::inbound_bytes`].
    pub fn inbound_bytes_charged(&self) -> usize {
        self.inner.budgets.charged()
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
            match pc.queue_tx.send(Queued {
                frame,
                _permit: permit,
            }) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(q)) if !retried && pc.closing.load(Ordering::SeqCst) => {
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
        let (mut send, mut recv) = pc.conn.open_bi().await.map_err(|e| classify(&peer, &e))?;
        write_frame(&mut send, StreamKind::Request, &frame)
            .await
            .map_err(|e| write_error(&peer, &e))?;
        let _ = send.finish();
        count_sent(inner, &frame);
        let channel = frame.header.channel;
        let caps = inner.caps.of(channel);
        // The request's own timeout bounds the wait: no frame deadline.
        let response = read_frame(inner, &pc, &mut recv, |_| caps, None, Charging::Response).await;
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
            let (mut send, mut recv) = pc.conn.open_bi().await.map_err(|e| classify(&peer, &e))?;
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

async fn write_frame(
    send: &mut quinn::SendStream,
    kind: StreamKind,
    frame: &OutFrame,
) -> Result<(), quinn::WriteError> {
    let mut head = BytesMut::with_capacity(1 + LEN_PREFIX + MAX_HEADER_LEN);
    head.extend_from_slice(&[kind as u8]);
    head.extend_from_slice(&frame.head_bytes());
    let mut chunks = [head.freeze(), frame.body.clone()];
    send.write_all_chunks(&mut chunks).await
}

enum ReadFrameError {
    /// Over the caps, or malformed: the frame is refused.
    Refused(DecodeError),
    /// The frame did not arrive within `frame_timeout`.
    TimedOut,
    Stream(quinn::ReadError),
    /// A budget is closed (never in practice).
    Gone,
}

/// Which budget a frame is charged to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Charging {
    /// A message or request for the inbound queue.
    Message,
    /// The answer to one of this node's requests.
    Response,
}

/// A frame read from a stream of its own, decoded, with its charge.
struct Decoded {
    channel: u32,
    body: Bytes,
    charge: Charge,
    /// Frame bytes on the wire, length prefix included.
    wire: usize,
}

/// Reads one length-prefixed frame from a stream of its own: the prefix and
/// header first, checked against the channel's caps before anything large
/// is allocated; then the budget is charged (waiting for room: the stream
/// is not read meanwhile); then the body is read and decoded.
///
/// With a `deadline`, the prefix and header must arrive by then, and the
/// body within `frame_timeout` of the charge.
async fn read_frame(
    inner: &Inner,
    pc: &PeerConn,
    recv: &mut quinn::RecvStream,
    caps: impl Fn(u32) -> Cap,
    deadline: Option<Instant>,
    charging: Charging,
) -> Result<Decoded, ReadFrameError> {
    let mut prefix = [0u8; LEN_PREFIX];
    read_exact(recv, &mut prefix, deadline).await?;
    let max_frame = frame::max_frame_len(inner.caps.max_size());
    let len = frame::check_frame_len(u32::from_le_bytes(prefix), max_frame)
        .map_err(ReadFrameError::Refused)?;
    let head_len = len.min(MAX_HEADER_LEN);
    let mut buf = vec![0u8; head_len];
    read_exact(recv, &mut buf, deadline).await?;
    let inspected = frame::inspect(&buf, len, caps).map_err(ReadFrameError::Refused)?;
    let compressed = matches!(inspected.header.encoding, Encoding::Zstd { .. });
    let overhead = match charging {
        Charging::Message => MESSAGE_OVERHEAD,
        Charging::Response => 0,
    };
    // While decompressing, the compressed body and the output coexist.
    let want = if compressed {
        inspected.size + len
    } else {
        len.max(inspected.size)
    } + overhead;
    let charge = match charging {
        Charging::Message => charge_message(inner, &pc.share, want).await,
        Charging::Response => inner.budgets.response(&pc.share, want).await,
    };
    let mut charge = charge.ok_or(ReadFrameError::Gone)?;
    // Time spent waiting for this node's own budget does not count.
    let deadline = deadline.map(|_| Instant::now() + inner.config.frame_timeout);
    buf.resize(len, 0);
    read_exact(recv, buf.get_mut(head_len..).unwrap_or_default(), deadline).await?;
    let body = frame::decode_body(Bytes::from(buf), &inspected).map_err(ReadFrameError::Refused)?;
    if compressed {
        charge.shrink_to(inspected.size + overhead);
    }
    Ok(Decoded {
        channel: inspected.header.channel,
        body,
        charge,
        wire: LEN_PREFIX + len,
    })
}

/// Reads a frame of a hello stream (tiny, no budget).
async fn read_small_frame(
    recv: &mut quinn::RecvStream,
    max_frame: usize,
) -> Result<Bytes, ReadFrameError> {
    let mut prefix = [0u8; LEN_PREFIX];
    read_exact(recv, &mut prefix, None).await?;
    let len = frame::check_frame_len(u32::from_le_bytes(prefix), max_frame)
        .map_err(ReadFrameError::Refused)?;
    let mut buf = vec![0u8; len];
    read_exact(recv, &mut buf, None).await?;
    Ok(Bytes::from(buf))
}

async fn read_exact(
    recv: &mut quinn::RecvStream,
    buf: &mut [u8],
    deadline: Option<Instant>,
) -> Result<(), ReadFrameError> {
    let read = recv.read_exact(buf);
    let r = match deadline {
        Some(d) => tokio::time::timeout_at(d, read)
            .await
            .map_err(|_| ReadFrameError::TimedOut)?,
        None => read.await,
    };
    r.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(_) => {
            ReadFrameError::Stream(quinn::ReadError::ClosedStream)
        }
        quinn::ReadExactError::ReadError(e) => ReadFrameError::Stream(e),
    })
}

async fn dial_task(inner: Arc<Inner>, dest: Dest, tx: watch::Sender<DialResult>) {
    let addr = canonical_addr(dest.addr);
    let result = dial(&inner, &dest).await;
    if let Err(e) = &result {
        debug!(peer = %dest, error = %e, "dial failed");
    }
    lock(&inner.table).dialing.remove(&addr);
    let _ = tx.send(Some(result));
}

async fn dial(inner: &Arc<Inner>, dest: &Dest) -> Result<Arc<PeerConn>, TransportError> {
    let addr = canonical_addr(dest.addr);
    let (config, sni) = match &dest.name {
        Some(name) => (inner.client_named.clone(), name.as_str()),
        None => (inner.client_any.clone(), ANY_NODE_SNI),
    };
    let connecting = inner
        .endpoint
        .connect_with(config, addr, sni)
        .map_err(|e| TransportError::Unreachable {
            peer: dest.clone(),
            reason: e.to_string(),
        })?;
    let timeout = inner.config.handshake_timeout;
    let conn = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => {
            return Err(TransportError::TimedOut {
                peer: dest.clone(),
                after: timeout,
            });
        }
        Ok(Err(e)) => {
            let err = classify(dest, &e);
            if matches!(err, TransportError::Rejected { .. }) {
                Stats::inc(&inner.stats.handshakes_rejected);
            }
            return Err(err);
        }
        Ok(Ok(conn)) => conn,
    };
    let name = match verified_name(&conn) {
        Ok(name) if dest.name.as_ref().is_none_or(|n| *n == name) => name,
        Ok(name) => {
            conn.close(code::REJECTED.into(), b"unexpected node name");
            Stats::inc(&inner.stats.handshakes_rejected);
            return Err(TransportError::Rejected {
                peer: dest.clone(),
                reason: format!("the certificate names {name}"),
            });
        }
        Err(reason) => {
            conn.close(code::REJECTED.into(), b"bad peer identity");
            Stats::inc(&inner.stats.handshakes_rejected);
            return Err(TransportError::Rejected {
                peer: dest.clone(),
                reason,
            });
        }
    };
    admit(inner, conn, Peer { name, addr }, true).await
}

/// The verified name of the peer of an established connection, after
/// checking the negotiated protocol.
fn verified_name(conn: &quinn::Connection) -> Result<NodeName, String> {
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() != Some(ALPN) {
        return Err("the peer does not speak shoal/1".into());
    }
    let certs = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or_else(|| "no peer certificate".to_owned())?;
    let cert = certs
        .first()
        .ok_or_else(|| "empty certificate chain".to_owned())?;
    node_name_of(cert).map_err(|e| e.to_string())
}

async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        if inner.shut.load(Ordering::Relaxed) {
            incoming.refuse();
            continue;
        }
        tokio::spawn(accept_one(inner.clone(), incoming));
    }
}

async fn accept_one(inner: Arc<Inner>, incoming: quinn::Incoming) {
    let addr = canonical_addr(incoming.remote_address());
    let unknown = Dest::addr(addr);
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            debug!(from = %addr, error = %e, "incoming connection failed");
            return;
        }
    };
    let conn = match tokio::time::timeout(inner.config.handshake_timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            let err = classify(&unknown, &e);
            if matches!(err, TransportError::Rejected { .. }) {
                Stats::inc(&inner.stats.handshakes_rejected);
                warn!(from = %addr, error = %e, "handshake rejected");
            } else {
                debug!(from = %addr, error = %e, "incoming handshake failed");
            }
            return;
        }
        Err(_) => {
            debug!(from = %addr, "incoming handshake timed out");
            return;
        }
    };
    let name = match verified_name(&conn) {
        Ok(name) => name,
        Err(reason) => {
            warn!(from = %addr, %reason, "peer rejected after handshake");
            conn.close(code::REJECTED.into(), reason.as_bytes());
            Stats::inc(&inner.stats.handshakes_rejected);
            return;
        }
    };
    if let Err(e) = admit(&inner, conn, Peer { name, addr }, false).await {
        debug!(from = %addr, error = %e, "incoming connection not admitted");
    }
}

/// Starts the tasks of a verified connection, exchanges hellos and installs
/// it as the connection for its address.
async fn admit(
    inner: &Arc<Inner>,
    conn: quinn::Connection,
    peer: Peer,
    initiated_locally: bool,
) -> Result<Arc<PeerConn>, TransportError> {
    let (queue_tx, queue_rx) = mpsc::unbounded_channel();
    let (hello_tx, hello_rx) = oneshot::channel();
    let pc = Arc::new(PeerConn {
        peer: peer.clone(),
        conn: conn.clone(),
        initiated_locally,
        instance: AtomicU64::new(0),
        queue_tx,
        budget: Arc::new(Semaphore::new(inner.config.send_queue_bytes)),
        share: inner.budgets.peer(&peer.name),
        refusals: AtomicU32::new(0),
        active: AtomicBool::new(true),
        busy: AtomicUsize::new(0),
        superseded: AtomicBool::new(false),
        hello_tx: Mutex::new(Some(hello_tx)),
        closing: AtomicBool::new(false),
        streams_opened: AtomicU32::new(0),
        streams_finished: AtomicU32::new(0),
        drain_tx: watch::channel(false).0,
        writer_done: watch::channel(false).0,
        peer_done: watch::channel(None).0,
    });
    // Our hello: tells the peer our instance, and is the first thing the
    // server says, so a client learns that the server admitted it.
    let hello = frame::encode_hello(&frame::Hello {
        version: frame::ENVELOPE_VERSION,
        instance: inner.instance,
    });
    let hello_conn = conn.clone();
    tokio::spawn(async move {
        if let Ok(mut s) = hello_conn.open_uni().await
            && s.write_all(&hello).await.is_ok()
        {
            let _ = s.finish();
        }
    });
    tokio::spawn(accept_uni_loop(inner.clone(), pc.clone()));
    tokio::spawn(accept_bi_loop(inner.clone(), pc.clone()));
    tokio::spawn(datagram_loop(inner.clone(), pc.clone()));
    let dest = Dest::from(&peer);
    let timeout = inner.config.handshake_timeout;
    let instance = tokio::select! {
        r = tokio::time::timeout(timeout, hello_rx) => match r {
            Ok(Ok(instance)) => instance,
            Ok(Err(_)) => {
                conn.close(code::PROTOCOL.into(), b"bad hello");
                Stats::inc(&inner.stats.handshakes_rejected);
                return Err(TransportError::Rejected { peer: dest, reason: "malformed hello".into() });
            }
            Err(_) => {
                conn.close(code::REJECTED.into(), b"no hello");
                Stats::inc(&inner.stats.handshakes_rejected);
                return Err(TransportError::TimedOut { peer: dest, after: timeout });
            }
        },
        e = conn.closed() => {
            let err = classify(&dest, &e);
            if matches!(err, TransportError::Rejected { .. }) {
                Stats::inc(&inner.stats.handshakes_rejected);
            }
            return Err(err);
        }
    };
    pc.instance.store(instance, Ordering::Relaxed);
    Stats::inc(&inner.stats.connections_opened);
    tokio::spawn(writer_task(inner.clone(), pc.clone(), queue_rx));
    tokio::spawn(watchdog(inner.clone(), pc.clone()));
    install(inner, &pc);
    debug!(peer = %peer, outgoing = initiated_locally, "connection admitted");
    Ok(pc)
}

/// Makes `pc` the connection used for its address, unless a live duplicate
/// to the same process wins the tie-break. Duplicates from racing dials are
/// resolved the same way on both sides: the connection dialed by the node
/// with the smaller name is kept; the other is left to drain and close.
fn install(inner: &Inner, pc: &Arc<PeerConn>) {
    let mut close_old = None;
    {
        let mut table = lock(&inner.table);
        if inner.shut.load(Ordering::Relaxed) {
            drop(table);
            pc.conn.close(code::SHUTDOWN.into(), b"shutdown");
            return;
        }
        let addr = pc.peer.addr;
        let keep_new = match table.conns.get(&addr) {
            None => true,
            Some(cur) if Arc::ptr_eq(cur, pc) => return,
            Some(cur) if cur.is_closed() => true,
            Some(cur)
                if cur.peer.name != pc.peer.name
                    || cur.instance.load(Ordering::Relaxed)
                        != pc.instance.load(Ordering::Relaxed) =>
            {
                // Another node, or the same node restarted: the old one is dead.
                close_old = Some(cur.clone());
                true
            }
            Some(cur) => {
                if cur.initiated_locally == pc.initiated_locally {
                    // Not a cross dial: the peer (or we) replaced it.
                    true
                } else {
                    pc.initiator(&inner.me) < cur.initiator(&inner.me)
                }
            }
        };
        if keep_new {
            if let Some(old) = table.conns.insert(addr, pc.clone()) {
                old.superseded.store(true, Ordering::Relaxed);
            }
        } else {
            pc.superseded.store(true, Ordering::Relaxed);
        }
    }
    if let Some(old) = close_old {
        debug!(peer = %old.peer, "replacing the connection to a previous instance");
        old.conn.close(code::SUPERSEDED.into(), b"replaced");
    }
}

/// Writes queued one-way messages on the connection's shared stream, many
/// frames per write.
async fn writer_task(
    inner: Arc<Inner>,
    pc: Arc<PeerConn>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
) {
    let mut stream: Option<quinn::SendStream> = None;
    // Allocated on first use: most connections (membership only) never send
    // a one-way message, and an idle connection should cost little.
    let mut batch = Vec::new();
    let mut buf = BytesMut::new();
    let mut drain_rx = pc.drain_tx.subscribe();
    let mut draining = false;
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, 512) => n,
            _ = pc.conn.closed() => 0,
            _ = drain_rx.wait_for(|d| *d), if !draining => {
                // Graceful close: take what is queued, then stop.
                draining = true;
                rx.close();
                while let Ok(q) = rx.try_recv() {
                    batch.push(q);
                }
                batch.len()
            }
        };
        if n == 0 {
            break;
        }
        buf.clear();
        if stream.is_none() {
            match pc.conn.open_uni().await {
                Ok(s) => {
                    stream = Some(s);
                    pc.streams_opened.fetch_add(1, Ordering::SeqCst);
                    buf.extend_from_slice(&[StreamKind::Messages as u8]);
                }
                Err(e) => {
                    debug!(peer = %pc.peer, error = %e, "cannot open the message stream");
                    Stats::add(&inner.stats.messages_lost, batch.len() as u64);
                    batch.clear();
                    break;
                }
            }
        }
        let mut compressed = 0;
        for q in &batch {
            q.frame.write_to(&mut buf);
            compressed += u64::from(q.frame.is_compressed());
        }
        let len = buf.len() as u64;
        let Some(s) = stream.as_mut() else { break };
        match s.write_chunk(buf.split().freeze()).await {
            Ok(()) => {
                Stats::add(&inner.stats.messages_sent, batch.len() as u64);
                Stats::add(&inner.stats.bytes_sent, len);
                Stats::add(&inner.stats.messages_compressed, compressed);
                pc.touch();
            }
            Err(e) => {
                Stats::add(&inner.stats.messages_lost, batch.len() as u64);
                match e {
                    quinn::WriteError::Stopped(code) => {
                        warn!(peer = %pc.peer, %code, "peer stopped the message stream");
                        stream = None;
                    }
                    e => {
                        debug!(peer = %pc.peer, error = %e, "message stream failed");
                        batch.clear();
                        break;
                    }
                }
            }
        }
        batch.clear();
        if draining {
            break;
        }
    }
    if let Some(mut s) = stream {
        let _ = s.finish();
        if draining {
            // Wait until the peer has every byte, so closing loses nothing.
            let _ = tokio::time::timeout(GRACE, s.stopped()).await;
        }
    }
    pc.writer_done.send_replace(true);
    // Whatever is still queued cannot be sent any more.
    rx.close();
    let mut lost = 0;
    while rx.try_recv().is_ok() {
        lost += 1;
    }
    Stats::add(&inner.stats.messages_lost, lost);
}

/// Watches a connection: removes it from the table when it ends, and closes
/// it when idle (sooner when a duplicate superseded it).
async fn watchdog(inner: Arc<Inner>, pc: Arc<PeerConn>) {
    let idle_close = inner.config.idle_close;
    let tick = (idle_close / 4).clamp(Duration::from_millis(100), Duration::from_secs(15));
    let ticks_to_close = (idle_close.as_millis() / tick.as_millis().max(1)).max(1) as u32;
    let mut idle_ticks = 0u32;
    let reason = loop {
        tokio::select! {
            e = pc.conn.closed() => break e,
            () = tokio::time::sleep(tick) => {}
        }
        let was_active = pc.active.swap(false, Ordering::Relaxed);
        let busy = pc.busy.load(Ordering::Relaxed) > 0
            || pc.budget.available_permits() < inner.config.send_queue_bytes;
        if was_active || busy {
            idle_ticks = 0;
            continue;
        }
        idle_ticks += 1;
        let limit = if pc.superseded.load(Ordering::Relaxed) {
            SUPERSEDED_IDLE_TICKS
        } else {
            ticks_to_close
        };
        if idle_ticks >= limit && !pc.closing.load(Ordering::SeqCst) {
            debug!(peer = %pc.peer, "closing idle connection");
            tokio::spawn(graceful_close(inner.clone(), pc.clone()));
        }
    };
    remove_from_table(&inner, &pc);
    Stats::inc(&inner.stats.connections_closed);
    debug!(peer = %pc.peer, reason = %reason, "connection closed");
}

async fn accept_uni_loop(inner: Arc<Inner>, pc: Arc<PeerConn>) {
    while let Ok(recv) = pc.conn.accept_uni().await {
        tokio::spawn(handle_uni(inner.clone(), pc.clone(), recv));
    }
}

async fn accept_bi_loop(inner: Arc<Inner>, pc: Arc<PeerConn>) {
    while let Ok((send, recv)) = pc.conn.accept_bi().await {
        tokio::spawn(handle_bi(inner.clone(), pc.clone(), send, recv));
    }
}

async fn datagram_loop(inner: Arc<Inner>, pc: Arc<PeerConn>) {
    while let Ok(datagram) = pc.conn.read_datagram().await {
        Stats::add(&inner.stats.bytes_received, datagram.len() as u64);
        pc.touch();
        match frame::decode_datagram(datagram) {
            Ok(payload) => {
                Stats::inc(&inner.stats.datagrams_received);
                // The sender's share of the queue, then the queue itself.
                let queued = Budgets::try_datagram(&pc.share).is_some_and(|slot| {
                    let d = Datagram {
                        from: pc.peer.clone(),
                        payload,
                    };
                    inner
                        .datagrams_tx
                        .try_send(SlottedDatagram {
                            datagram: d,
                            _slot: slot,
                        })
                        .is_ok()
                });
                if !queued {
                    Stats::inc(&inner.stats.datagrams_dropped);
                }
            }
            Err(_) => {
                Stats::inc(&inner.stats.datagrams_malformed);
                debug!(peer = %pc.peer, "malformed datagram dropped");
            }
        }
    }
}

async fn handle_uni(inner: Arc<Inner>, pc: Arc<PeerConn>, mut recv: quinn::RecvStream) {
    let mut kind = [0u8; 1];
    if recv.read_exact(&mut kind).await.is_err() {
        return;
    }
    match StreamKind::from_byte(kind[0]) {
        Some(StreamKind::Hello) => {
            let hello = match read_small_frame(&mut recv, MAX_HELLO_LEN).await {
                Ok(f) => frame::decode_hello(&f).ok(),
                Err(_) => None,
            };
            let slot = lock(&pc.hello_tx).take();
            match (hello, slot) {
                (Some(h), Some(tx)) => {
                    let _ = tx.send(h.instance);
                }
                (None, slot) => {
                    Stats::inc(&inner.stats.frames_malformed);
                    // Dropping the sender fails the admission.
                    drop(slot);
                }
                (Some(_), None) => Stats::inc(&inner.stats.frames_malformed),
            }
        }
        Some(StreamKind::Messages) => {
            read_messages(&inner, &pc, recv).await;
            pc.streams_finished.fetch_add(1, Ordering::SeqCst);
        }
        Some(k @ (StreamKind::GoAway | StreamKind::Done)) => {
            let mut count = [0u8; 4];
            if recv.read_exact(&mut count).await.is_err() {
                Stats::inc(&inner.stats.frames_malformed);
                return;
            }
            let count = u32::from_le_bytes(count);
            if k == StreamKind::GoAway {
                tokio::spawn(answer_goaway(inner.clone(), pc.clone(), count));
            } else {
                pc.peer_done.send_replace(Some(count));
            }
        }
        _ => {
            Stats::inc(&inner.stats.frames_malformed);
            warn!(peer = %pc.peer, kind = kind[0], "unknown uni stream kind");
            let _ = recv.stop(code::PROTOCOL.into());
        }
    }
}

/// How a pass over the frames buffered from the shared stream ended.
enum Pass {
    /// Every whole frame was handled; read more.
    More,
    /// The stream must be stopped with this code.
    Stop(u32),
    /// The application is gone.
    Gone,
}

/// Reads the peer's shared message stream until it ends.
///
/// Each frame is checked against the inline caps of its channel, then
/// charged to the budgets before it is decompressed; when the budgets are
/// full, what is decoded is handed over first, then the reader waits (and
/// stops reading, so QUIC flow control pushes back on the sender).
async fn read_messages(inner: &Inner, pc: &Arc<PeerConn>, mut recv: quinn::RecvStream) {
    let mut reader = FrameReader::new(INLINE_FRAME_MAX);
    let mut ready = Ready {
        msgs: Vec::new(),
        charge: inner.budgets.empty(&pc.share),
    };
    let frame_timeout = inner.config.frame_timeout;
    // When this node started waiting for the rest of a partial frame.
    let mut partial_since: Option<Instant> = None;
    let mut chunks: [Bytes; 32] = Default::default();
    loop {
        // Several chunks per read: fewer, larger batches to charge and queue.
        let read = recv.read_chunks(&mut chunks);
        let got = if reader.has_partial() {
            let since = *partial_since.get_or_insert_with(Instant::now);
            match tokio::time::timeout_at(since + frame_timeout, read).await {
                Ok(r) => r,
                Err(_) => {
                    Stats::inc(&inner.stats.frames_timed_out);
                    warn!(peer = %pc.peer, "partial frame timed out; message stream stopped");
                    let _ = recv.stop(code::TIMED_OUT.into());
                    strike(inner, pc);
                    return;
                }
            }
        } else {
            partial_since = None;
            read.await
        };
        let n = match got {
            Ok(Some(n)) => n,
            Ok(None) => {
                if reader.has_partial() {
                    Stats::inc(&inner.stats.frames_malformed);
                }
                return;
            }
            Err(_) => return,
        };
        for chunk in chunks.iter_mut().take(n) {
            Stats::add(&inner.stats.bytes_received, chunk.len() as u64);
            reader.push(chunk);
            *chunk = Bytes::new();
        }
        pc.touch();
        let pass = decode_buffered(inner, pc, &mut reader, &mut ready, &mut partial_since).await;
        // Everything decoded before a framing error is still delivered.
        if deliver_all(inner, &mut ready).await.is_err() {
            let _ = recv.stop(code::GONE.into());
            return;
        }
        match pass {
            Pass::More => {}
            Pass::Stop(c) => {
                let _ = recv.stop(c.into());
                return;
            }
            Pass::Gone => {
                let _ = recv.stop(code::GONE.into());
                return;
            }
        }
    }
}

/// Messages decoded from the shared stream, not yet in the inbound queue,
/// and their charge.
struct Ready {
    msgs: Vec<Message>,
    charge: Charge,
}

/// Decodes the whole frames buffered in `reader` into `ready`, charging each.
async fn decode_buffered(
    inner: &Inner,
    pc: &Arc<PeerConn>,
    reader: &mut FrameReader,
    ready: &mut Ready,
    partial_since: &mut Option<Instant>,
) -> Pass {
    loop {
        let f = match reader.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => return Pass::More,
            Err(e) => {
                // The framing is lost: nothing after this can be trusted.
                Stats::inc(&inner.stats.frames_malformed);
                warn!(peer = %pc.peer, error = %e, "broken message stream stopped");
                return Pass::Stop(code::PROTOCOL);
            }
        };
        *partial_since = None;
        let inspected = match frame::inspect(&f, f.len(), |ch| inner.caps.inline(ch)) {
            Ok(i) => i,
            Err(e @ (DecodeError::TooLarge { .. } | DecodeError::Ratio { .. })) => {
                refused(inner, pc, &e);
                return Pass::Stop(code::TOO_LARGE);
            }
            Err(e) => {
                // A bad header: the framing holds, skip this frame.
                count_decode_error(inner, &e);
                debug!(peer = %pc.peer, error = %e, "frame dropped");
                continue;
            }
        };
        let want = inspected.size + MESSAGE_OVERHEAD;
        if !inner.budgets.try_add(&mut ready.charge, want) {
            // The budget may be full of what this reader decoded: hand that
            // over first, then wait for room.
            if deliver_all(inner, ready).await.is_err() {
                return Pass::Gone;
            }
            match charge_message(inner, &pc.share, want).await {
                Some(c) => ready.charge = c,
                None => return Pass::Gone,
            }
        }
        match frame::decode_body(f, &inspected) {
            Ok(body) => ready.msgs.push(Message {
                from: pc.peer.clone(),
                channel: inspected.header.channel,
                body,
                reply: None,
            }),
            Err(e) => {
                ready.charge.give_back(want, 1);
                count_decode_error(inner, &e);
                debug!(peer = %pc.peer, error = %e, "frame dropped");
            }
        }
    }
}

/// Charges a message of `want` bytes to `share`, waiting for room (counted
/// in `inbound_budget_waits` when it must wait).
async fn charge_message(inner: &Inner, share: &Arc<PeerBudget>, want: usize) -> Option<Charge> {
    if let Some(charge) = inner.budgets.try_message(share, want) {
        return Some(charge);
    }
    Stats::inc(&inner.stats.inbound_budget_waits);
    inner.budgets.message(share, want).await
}

/// Hands decoded messages to the inbound queue, reserving room for many at
/// once (one wait per batch rather than per message). Waits while the queue
/// is full: that is the backpressure.
/// The messages share the batch's charge, which a fresh one replaces.
async fn deliver_all(inner: &Inner, ready: &mut Ready) -> Result<(), ()> {
    if ready.msgs.is_empty() {
        return Ok(());
    }
    inner.budgets.note_peak();
    let fresh = inner.budgets.empty(ready.charge.share());
    let charge = Arc::new(Mutex::new(std::mem::replace(&mut ready.charge, fresh)));
    let tx = &inner.messages_tx;
    let cap = tx.max_capacity().max(1);
    while !ready.msgs.is_empty() {
        let n = ready.msgs.len().min(cap);
        let permits = tx.reserve_many(n).await.map_err(|_| ())?;
        Stats::add(&inner.stats.messages_received, n as u64);
        for (permit, msg) in permits.zip(ready.msgs.drain(..n)) {
            permit.send(Charged {
                msg,
                charge: Some(Arc::clone(&charge)),
            });
        }
    }
    Ok(())
}

async fn handle_bi(
    inner: Arc<Inner>,
    pc: Arc<PeerConn>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let busy = pc.busy();
    let refuse = |send: &mut quinn::SendStream, recv: &mut quinn::RecvStream, c: u32| {
        let _ = recv.stop(c.into());
        let _ = send.reset(c.into());
    };
    // The kind, prefix and header must arrive by then.
    let deadline = Instant::now() + inner.config.frame_timeout;
    let mut kind = [0u8; 1];
    match read_exact(&mut recv, &mut kind, Some(deadline)).await {
        Ok(()) => {}
        Err(ReadFrameError::TimedOut) => {
            Stats::inc(&inner.stats.frames_timed_out);
            refuse(&mut send, &mut recv, code::TIMED_OUT);
            strike(&inner, &pc);
            return;
        }
        Err(_) => {
            refuse(&mut send, &mut recv, code::PROTOCOL);
            return;
        }
    }
    let kind = match StreamKind::from_byte(kind[0]) {
        Some(k @ (StreamKind::Single | StreamKind::Request)) => k,
        _ => {
            Stats::inc(&inner.stats.frames_malformed);
            warn!(peer = %pc.peer, kind = kind[0], "unknown bi stream kind");
            refuse(&mut send, &mut recv, code::PROTOCOL);
            return;
        }
    };
    let caps = &inner.caps;
    let read = read_frame(
        &inner,
        &pc,
        &mut recv,
        |ch| caps.of(ch),
        Some(deadline),
        Charging::Message,
    )
    .await;
    let d = match read {
        Ok(d) => d,
        Err(ReadFrameError::Refused(
            e @ (DecodeError::TooLarge { .. } | DecodeError::Ratio { .. }),
        )) => {
            refused(&inner, &pc, &e);
            refuse(&mut send, &mut recv, code::TOO_LARGE);
            return;
        }
        Err(ReadFrameError::Refused(e)) => {
            count_decode_error(&inner, &e);
            debug!(peer = %pc.peer, error = %e, "frame refused");
            refuse(&mut send, &mut recv, code::PROTOCOL);
            return;
        }
        Err(ReadFrameError::TimedOut) => {
            Stats::inc(&inner.stats.frames_timed_out);
            warn!(peer = %pc.peer, "frame timed out; stream dropped");
            refuse(&mut send, &mut recv, code::TIMED_OUT);
            strike(&inner, &pc);
            return;
        }
        Err(ReadFrameError::Stream(e)) => {
            debug!(peer = %pc.peer, error = %e, "incoming stream failed");
            return;
        }
        Err(ReadFrameError::Gone) => {
            refuse(&mut send, &mut recv, code::GONE);
            return;
        }
    };
    Stats::add(&inner.stats.bytes_received, (d.wire + 1) as u64);
    let (reply, verdict) = match kind {
        StreamKind::Request => (
            Some(Responder {
                stream: Some(send),
                peer: pc.peer.clone(),
                channel: d.channel,
                inner: inner.clone(),
                _busy: busy,
            }),
            None,
        ),
        _ => (None, Some(send)),
    };
    let msg = Message {
        from: pc.peer.clone(),
        channel: d.channel,
        body: d.body,
        reply,
    };
    Stats::inc(&inner.stats.messages_received);
    let charged = Charged {
        msg,
        charge: Some(Arc::new(Mutex::new(d.charge))),
    };
    if inner.messages_tx.send(charged).await.is_err() {
        if let Some(mut send) = verdict {
            let _ = send.reset(code::GONE.into());
        }
        return;
    }
    if let Some(mut send) = verdict {
        let _ = send.finish();
    }
}

fn remove_from_table(inner: &Inner, pc: &Arc<PeerConn>) {
    let mut table = lock(&inner.table);
    if table
        .conns
        .get(&pc.peer.addr)
        .is_some_and(|c| Arc::ptr_eq(c, pc))
    {
        table.conns.remove(&pc.peer.addr);
    }
}

/// Stops sending on a connection: flushes and finishes the message stream
/// (waiting until the peer has it) and waits for requests in progress.
async fn drain(pc: &Arc<PeerConn>) {
    pc.drain_tx.send_replace(true);
    let mut done = pc.writer_done.subscribe();
    let _ = tokio::time::timeout(GRACE, done.wait_for(|d| *d)).await;
    wait_until(|| pc.busy.load(Ordering::SeqCst) == 0).await;
}

/// Polls `cond` (rare path: closing connections) for at most [`GRACE`].
async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + GRACE;
    while !cond() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn send_control(pc: &PeerConn, kind: StreamKind) -> bool {
    let count = pc.streams_opened.load(Ordering::SeqCst);
    let mut msg = [kind as u8, 0, 0, 0, 0];
    if let Some(dst) = msg.get_mut(1..) {
        dst.copy_from_slice(&count.to_le_bytes());
    }
    match pc.conn.open_uni().await {
        Ok(mut s) => s.write_all(&msg).await.is_ok() && s.finish().is_ok(),
        Err(_) => false,
    }
}

/// Closes an idle or superseded connection without losing anything in
/// flight: both sides stop sending, flush, and read everything the other
/// sent before the connection closes.
///
/// 1. This side leaves the table (no new sends), flushes, and sends `GoAway`
///    with the number of message streams it opened.
/// 2. The peer does the same, reads all our streams, and answers `Done` with
///    its own count ([`answer_goaway`]).
/// 3. We read all its streams and close. Each step waits at most [`GRACE`].
async fn graceful_close(inner: Arc<Inner>, pc: Arc<PeerConn>) {
    if pc.closing.swap(true, Ordering::SeqCst) {
        return;
    }
    remove_from_table(&inner, &pc);
    drain(&pc).await;
    if send_control(&pc, StreamKind::GoAway).await {
        let mut done = pc.peer_done.subscribe();
        let peer_count = tokio::time::timeout(GRACE, done.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|v| *v));
        if let Some(peer_count) = peer_count {
            wait_until(|| pc.streams_finished.load(Ordering::SeqCst) >= peer_count).await;
        }
    }
    pc.conn.close(code::IDLE.into(), b"idle");
}

/// The peer's side of [`graceful_close`].
async fn answer_goaway(inner: Arc<Inner>, pc: Arc<PeerConn>, peer_count: u32) {
    pc.closing.store(true, Ordering::SeqCst);
    remove_from_table(&inner, &pc);
    drain(&pc).await;
    wait_until(|| pc.streams_finished.load(Ordering::SeqCst) >= peer_count).await;
    send_control(&pc, StreamKind::Done).await;
    // The initiator closes; close anyway if it does not.
    if tokio::time::timeout(2 * GRACE, pc.conn.closed())
        .await
        .is_err()
    {
        pc.conn.close(code::IDLE.into(), b"idle");
    }
}
