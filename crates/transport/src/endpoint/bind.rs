//! Starting an endpoint: the UDP socket, quinn's transport settings, the
//! TLS configurations and the accept loop.

use super::*;

pub(super) fn transport_config(
    config: &TransportConfig,
) -> Result<quinn::TransportConfig, BindError> {
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

pub(super) fn initial_bi_streams(config: &TransportConfig) -> u32 {
    INITIAL_BI_STREAMS.min(config.max_concurrent_requests)
}

pub(super) fn udp_socket(
    addr: SocketAddr,
    buffer: usize,
) -> Result<std::net::UdpSocket, BindError> {
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

pub(super) fn random_instance() -> u64 {
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

    pub(super) fn start(
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
            arrivals: AtomicU64::new(0),
            #[cfg(test)]
            install_gates: Mutex::default(),
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
}
