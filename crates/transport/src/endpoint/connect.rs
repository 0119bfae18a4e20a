//! Connections made: dialled (one dial per peer at a time) or accepted,
//! the peer's certificate name verified, admitted under the per-peer and
//! endpoint limits, and installed in the table.

use super::*;

pub(super) async fn dial_task(inner: Arc<Inner>, dest: Dest, tx: watch::Sender<DialResult>) {
    let addr = canonical_addr(dest.addr);
    let result = dial(&inner, &dest).await;
    if let Err(e) = &result {
        debug!(peer = %dest, error = %e, "dial failed");
    }
    lock(&inner.table).dialing.remove(&addr);
    let _ = tx.send(Some(result));
}

pub(super) async fn dial(inner: &Arc<Inner>, dest: &Dest) -> Result<Arc<PeerConn>, TransportError> {
    let addr = canonical_addr(dest.addr);
    let (config, sni) = match &dest.name {
        Some(name) => (inner.client_named.clone(), name.as_str()),
        None => (inner.client_any.clone(), ANY_NODE_SNI),
    };
    // Numbered as the dial starts ([`Inner::arrivals`]).
    let arrival = inner.arrivals.fetch_add(1, Ordering::Relaxed);
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
    admit(inner, conn, Peer { name, addr }, true, arrival).await
}

/// The verified name of the peer of an established connection, after
/// checking the negotiated protocol.
pub(super) fn verified_name(conn: &quinn::Connection) -> Result<NodeName, String> {
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

pub(super) async fn accept_loop(inner: Arc<Inner>) {
    while let Some(incoming) = inner.endpoint.accept().await {
        if inner.shut.load(Ordering::Relaxed) {
            incoming.refuse();
            continue;
        }
        // Numbered here, in the one loop that sees the peers' connection
        // attempts in the order they arrived ([`Inner::arrivals`]).
        let arrival = inner.arrivals.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(accept_one(inner.clone(), incoming, arrival));
    }
}

pub(super) async fn accept_one(inner: Arc<Inner>, incoming: quinn::Incoming, arrival: u64) {
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
    if let Err(e) = admit(&inner, conn, Peer { name, addr }, false, arrival).await {
        debug!(from = %addr, error = %e, "incoming connection not admitted");
    }
}

/// How the wait for the peer's hello ended.
enum Admission {
    Open,
    BadHello,
    NoHello,
    Closed,
}

/// Starts the tasks of a verified connection, exchanges hellos and installs
/// it as the connection for its address.
pub(super) async fn admit(
    inner: &Arc<Inner>,
    conn: quinn::Connection,
    peer: Peer,
    initiated_locally: bool,
    arrival: u64,
) -> Result<Arc<PeerConn>, TransportError> {
    let pc = Arc::new(PeerConn {
        peer: peer.clone(),
        conn: conn.clone(),
        initiated_locally,
        arrival,
        state: watch::channel(ConnState::Admitting).0,
        queue_tx: OnceLock::new(),
        requests_tx: OnceLock::new(),
        answers_tx: OnceLock::new(),
        pending: Mutex::new(HashMap::new()),
        next_request: AtomicU64::new(0),
        peer_features: AtomicU32::new(0),
        peer_app_features: AtomicU32::new(0),
        budget: Arc::new(Semaphore::new(inner.config.send_queue_bytes)),
        data_streams: Arc::new(Semaphore::new(inner.config.data_streams())),
        share: inner.budgets.peer(&peer.name),
        refusals: AtomicU32::new(0),
        active: AtomicBool::new(true),
        busy: AtomicUsize::new(0),
        streams_opened: AtomicU32::new(0),
        streams_finished: AtomicU32::new(0),
        writer_done: watch::channel(false).0,
        bi_limit: AtomicU32::new(initial_bi_streams(&inner.config)),
    });
    // Our hello: tells the peer our instance, and is the first thing the
    // server says, so a client learns that the server admitted it.
    let hello = frame::encode_hello(&frame::Hello {
        version: frame::ENVELOPE_VERSION,
        instance: inner.instance,
        features: frame::features::ALL,
        app_features: inner.config.app_features,
    });
    let hello_conn = conn.clone();
    tokio::spawn(async move {
        if let Ok(mut s) = hello_conn.open_uni().await
            && s.write_all(&hello).await.is_ok()
        {
            let _ = s.finish();
        }
    });
    let mut state = pc.state.subscribe();
    tokio::spawn(accept_uni_loop(inner.clone(), pc.clone()));
    tokio::spawn(accept_bi_loop(inner.clone(), pc.clone()));
    tokio::spawn(datagram_loop(inner.clone(), pc.clone()));
    let dest = Dest::from(&peer);
    let timeout = inner.config.handshake_timeout;
    // The peer's hello (read by `handle_uni`) moves the state on. A close
    // here moves it first and closes QUIC after, so the state's outcome is
    // seen first.
    let outcome = tokio::select! {
        biased;
        r = tokio::time::timeout(timeout, state.wait_for(|s| !matches!(s, ConnState::Admitting))) => {
            match r {
                Err(_) => Admission::NoHello,
                Ok(Err(_)) => Admission::Closed,
                Ok(Ok(s)) => match &*s {
                    ConnState::Closed {
                        reason: CloseReason::Local { reason: BAD_HELLO, .. },
                        ..
                    } => Admission::BadHello,
                    ConnState::Closed { .. } => Admission::Closed,
                    _ => Admission::Open,
                },
            }
        }
        e = conn.closed() => {
            pc.ended(e);
            Admission::Closed
        }
    };
    match outcome {
        Admission::Open => {}
        Admission::BadHello => {
            Stats::inc(&inner.stats.handshakes_rejected);
            return Err(TransportError::Rejected {
                peer: dest,
                reason: "malformed hello".into(),
            });
        }
        Admission::NoHello => {
            pc.close(code::REJECTED, "no hello");
            Stats::inc(&inner.stats.handshakes_rejected);
            return Err(TransportError::TimedOut {
                peer: dest,
                after: timeout,
            });
        }
        Admission::Closed => {
            let e = conn
                .close_reason()
                .unwrap_or(quinn::ConnectionError::LocallyClosed);
            let err = classify(&dest, &e);
            if matches!(err, TransportError::Rejected { .. }) {
                Stats::inc(&inner.stats.handshakes_rejected);
            }
            return Err(err);
        }
    }
    Stats::inc(&inner.stats.connections_opened);
    tokio::spawn(watchdog(inner.clone(), pc.clone()));
    #[cfg(test)]
    install_gate(inner, &pc).await;
    install(inner, &pc);
    debug!(peer = %peer, outgoing = initiated_locally, "connection admitted");
    Ok(pc)
}

/// Tests only: waits until the test opens the gate set for `pc`'s address
/// ([`Inner::install_gates`]), if any.
#[cfg(test)]
async fn install_gate(inner: &Inner, pc: &PeerConn) {
    let gate = lock(&inner.install_gates).get(&pc.peer.addr).cloned();
    if let Some(mut gate) = gate {
        let _ = gate.wait_for(|open| *open).await;
    }
}

/// Makes `pc` the connection used for its address and its name, unless a
/// newer one wins. Connections are ordered by [`PeerConn::arrival`] (when
/// this endpoint first saw them), never by when their admission ended: a
/// connection's messages are delivered while it is still being admitted,
/// so a late admission must not make an older connection look newer.
///
/// - One certificate name has one connection: when a connection of the
///   same name is installed at another address (a restarted process at a
///   new port, or a peer dialing from many ports to multiply its
///   per-connection windows and queues), the older of the two is replaced,
///   whichever of them is installed last: an older `pc` is not installed
///   at all. A replaced connection closes gracefully, so nothing it
///   carries is lost ([`replace_by_name`]).
/// - At one address: duplicates from racing dials to the same process are
///   resolved the same way on both sides, the connection dialed by the node
///   with the smaller name is kept and the other is left to drain and
///   close; otherwise (the peer, or we, connected again; or another node or
///   a restarted process at that address) the newer one is kept, and an
///   older one of another process is closed at once (that process is gone).
pub(super) fn install(inner: &Arc<Inner>, pc: &Arc<PeerConn>) {
    let mut close_now = None;
    let mut by_name = Vec::new();
    let mut cut_short = Vec::new();
    {
        let mut table = lock(&inner.table);
        if inner.shut.load(Ordering::Relaxed) {
            drop(table);
            pc.close(code::SHUTDOWN, "shutdown");
            return;
        }
        // Closed, or closing (moved under this lock by `start_closing`):
        // never installed.
        if !pc.is_open() {
            return;
        }
        let addr = pc.peer.addr;
        let newer_elsewhere = table.conns.iter().find_map(|(a, c)| {
            (*a != addr && c.peer.name == pc.peer.name && !c.is_closed() && c.arrival > pc.arrival)
                .then_some(*a)
        });
        if let Some(newer) = newer_elsewhere {
            by_name.push((pc.clone(), newer));
        } else {
            let keep_new = match table.conns.get(&addr) {
                None => true,
                Some(cur) if Arc::ptr_eq(cur, pc) => return,
                Some(cur) if cur.is_closed() => true,
                Some(cur) if cur.peer.name != pc.peer.name || cur.instance() != pc.instance() => {
                    // Another node, or the same node restarted: the older
                    // one's process is gone.
                    let newer = cur.arrival < pc.arrival;
                    close_now = Some(if newer { cur.clone() } else { pc.clone() });
                    newer
                }
                Some(cur) if cur.initiated_locally != pc.initiated_locally => {
                    // A cross dial: both sides keep the same one.
                    pc.initiator(&inner.me) < cur.initiator(&inner.me)
                }
                // Not a cross dial: the peer (or we) connected again.
                Some(cur) => cur.arrival < pc.arrival,
            };
            if keep_new {
                if let Some(old) = table.conns.insert(addr, pc.clone()) {
                    let _ = old.apply(Event::Superseded);
                }
                let others: Vec<SocketAddr> = table
                    .conns
                    .iter()
                    .filter(|(a, c)| **a != addr && c.peer.name == pc.peer.name)
                    .map(|(a, _)| *a)
                    .collect();
                for a in others {
                    if let Some(old) = table.conns.remove(&a) {
                        by_name.push((old, addr));
                    }
                }
            } else if close_now.is_none() {
                let _ = pc.apply(Event::Superseded);
            }
        }
        for (old, _) in &by_name {
            // One graceful replacement per name at a time: one still under
            // way is cut short.
            if let Some(prev) = table.replacing.insert(old.peer.name.clone(), old.clone())
                && !Arc::ptr_eq(&prev, old)
                && !prev.is_closed()
            {
                cut_short.push(prev);
            }
        }
    }
    if let Some(old) = close_now {
        debug!(peer = %old.peer, "replacing the connection to a previous instance");
        old.close(code::SUPERSEDED, "replaced");
    }
    for old in cut_short {
        warn!(peer = %old.peer,
            "the name was replaced again while its previous connection was closing: that one is closed at once");
        old.close(code::SUPERSEDED, REPLACED_AGAIN);
    }
    for (old, newer) in by_name {
        replace_by_name(inner, old, newer);
    }
}

/// Close reason of a connection replaced by a newer one of its name.
const REPLACED_BY_NAME: &str = "replaced by another address";
/// Close reason of a connection whose graceful close after a replacement
/// was cut short by a further replacement of its name.
pub(super) const REPLACED_AGAIN: &str = "replaced again while closing";

/// Closes `old`, replaced by a newer connection of the same name at
/// `newer` (another address): gracefully ([`graceful_close`]), so what
/// either side sent or queued on it is delivered (a send that picks it as
/// it starts closing is moved to a new connection) rather than lost with an
/// abrupt close. Only the most recent replacement of a name is graceful
/// ([`install`] cuts an earlier one still under way short), which bounds
/// what a peer dialing from many ports holds to two connections.
fn replace_by_name(inner: &Arc<Inner>, old: Arc<PeerConn>, newer: SocketAddr) {
    Stats::inc(&inner.stats.connections_replaced_by_name);
    warn!(peer = %old.peer, new_addr = %newer,
        "a newer connection of this certificate name came from another address: the older one is closed");
    tokio::spawn(graceful_close(
        inner.clone(),
        old,
        code::SUPERSEDED,
        REPLACED_BY_NAME,
    ));
}
