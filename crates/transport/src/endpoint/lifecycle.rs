//! A connection's life after install: its writer task, the idle watchdog,
//! removal from the table, and the graceful close (goaway, drain).

use super::*;

/// Writes a connection's queued frames on one long-lived stream of `kind`,
/// many frames per write, started on first use ([`PeerConn::queue`],
/// [`PeerConn::exchange_queue`]):
///
/// - [`StreamKind::Messages`]: one-way messages. A graceful close bars the
///   queue; what it holds is written, the stream finished (counted in the
///   close's stream counts), and the writer reports its end.
/// - [`StreamKind::Requests`] and [`StreamKind::Answers`]: requests; answers
///   and refusals. Written until the connection closes, so answers still go
///   out during a graceful close (which waits for the requests in
///   progress); a request is not sent on a connection that is closing.
pub(super) async fn writer_task(
    inner: Arc<Inner>,
    pc: Arc<PeerConn>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    kind: StreamKind,
) {
    let messages = kind == StreamKind::Messages;
    let mut stream: Option<quinn::SendStream> = None;
    // Allocated on first use: most connections (membership only) never send
    // a one-way message, and an idle connection should cost little. A burst
    // grows it (up to 512 messages, about 50 KiB); it is freed once the
    // queue stayed empty for `WRITER_RELEASE_AFTER`.
    let mut batch = Vec::new();
    let mut state = pc.state.subscribe();
    let mut draining = false;
    loop {
        // A timer only while the queue is empty: a writer behind a busy
        // queue sets none.
        let release = batch.capacity() > 0 && rx.is_empty();
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, 512) => n,
            () = tokio::time::sleep(WRITER_RELEASE_AFTER), if release => {
                batch = Vec::new();
                continue;
            }
            _ = pc.conn.closed() => 0,
            _ = state.wait_for(ConnState::bars_writer), if messages && !draining => {
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
        let sent = batch.iter().filter(|q| q.item.is_message()).count() as u64;
        // One buffer per batch, sized exactly, handed to quinn whole: none is
        // kept between batches (a buffer split off a larger one would keep
        // all of that one alive while the connection idles).
        let mut buf =
            BytesMut::with_capacity(1 + batch.iter().map(|q| q.item.wire_len()).sum::<usize>());
        if stream.is_none() {
            match pc.conn.open_uni().await {
                Ok(s) => {
                    stream = Some(s);
                    if messages {
                        pc.streams_opened.fetch_add(1, Ordering::SeqCst);
                    }
                    buf.extend_from_slice(&[kind as u8]);
                }
                Err(e) => {
                    debug!(peer = %pc.peer, error = %e, ?kind, "cannot open the stream");
                    lose(&inner, &pc, &mut batch);
                    break;
                }
            }
        }
        let mut compressed = 0;
        for q in &batch {
            q.item.write_to(&mut buf);
            compressed += u64::from(q.item.is_compressed());
        }
        let len = buf.len() as u64;
        let Some(s) = stream.as_mut() else { break };
        match s.write_chunk(buf.freeze()).await {
            Ok(()) => {
                Stats::add(&inner.stats.messages_sent, sent);
                Stats::add(&inner.stats.bytes_sent, len);
                Stats::add(&inner.stats.messages_compressed, compressed);
                pc.touch();
            }
            Err(e) => {
                lose(&inner, &pc, &mut batch);
                match e {
                    quinn::WriteError::Stopped(code) => {
                        warn!(peer = %pc.peer, %code, ?kind, "peer stopped the stream");
                        stream = None;
                    }
                    e => {
                        debug!(peer = %pc.peer, error = %e, ?kind, "stream failed");
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
    if messages {
        pc.writer_done.send_replace(true);
    }
    // Whatever is still queued cannot be sent any more.
    rx.close();
    let mut rest = Vec::new();
    while let Ok(q) = rx.try_recv() {
        rest.push(q);
    }
    lose(&inner, &pc, &mut rest);
}

/// Counts the messages and requests of `batch` lost (and empties it); the
/// requesters of lost requests learn at once.
fn lose(inner: &Inner, pc: &PeerConn, batch: &mut Vec<Queued>) {
    for q in batch.drain(..) {
        if q.item.is_message() {
            Stats::inc(&inner.stats.messages_lost);
        }
        if let Item::Exchange {
            tag: ExchangeTag::Request,
            id,
            ..
        } = q.item
        {
            pc.forget(id);
        }
    }
}

/// Watches a connection: removes it from the table when it ends, and closes
/// it when idle (sooner when a duplicate superseded it).
pub(super) async fn watchdog(inner: Arc<Inner>, pc: Arc<PeerConn>) {
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
        let limit = if pc.is_superseded() {
            SUPERSEDED_IDLE_TICKS
        } else {
            ticks_to_close
        };
        if idle_ticks >= limit && pc.is_open() {
            debug!(peer = %pc.peer, "closing idle connection");
            tokio::spawn(graceful_close(
                inner.clone(),
                pc.clone(),
                code::IDLE,
                "idle",
            ));
        }
    };
    pc.ended(reason.clone());
    // Requests waiting for an answer on it fail now (after the state says
    // closed: a request registered later sees that instead).
    lock(&pc.pending).clear();
    remove_from_table(&inner, &pc);
    Stats::inc(&inner.stats.connections_closed);
    // The first reason known: a close decided here, or QUIC's.
    let reason = match &*pc.state.borrow() {
        ConnState::Closed { reason, .. } => reason.clone(),
        _ => CloseReason::Ended(reason),
    };
    debug!(peer = %pc.peer, %reason, "connection closed");
}

pub(super) fn remove_from_table(inner: &Inner, pc: &Arc<PeerConn>) {
    let mut table = lock(&inner.table);
    if table
        .conns
        .get(&pc.peer.addr)
        .is_some_and(|c| Arc::ptr_eq(c, pc))
    {
        table.conns.remove(&pc.peer.addr);
    }
    if table
        .replacing
        .get(&pc.peer.name)
        .is_some_and(|c| Arc::ptr_eq(c, pc))
    {
        table.replacing.remove(&pc.peer.name);
    }
}

/// Starts a graceful close ([`PeerConn::start_drain`]) and takes the
/// connection out of the table, both under the table's lock: no send finds
/// it there once it is closing, and [`install`] never puts it back.
pub(super) fn start_closing(inner: &Inner, pc: &Arc<PeerConn>) -> (Result<bool, Illegal>, bool) {
    let mut table = lock(&inner.table);
    let started = pc.start_drain();
    if started.0.is_ok()
        && table
            .conns
            .get(&pc.peer.addr)
            .is_some_and(|c| Arc::ptr_eq(c, pc))
    {
        table.conns.remove(&pc.peer.addr);
    }
    started
}

/// Stops sending on a connection once its state is
/// [`ConnState::Closing`] (which wakes the writer): waits until the writer,
/// if one was started, flushed and finished the message stream and the
/// peer has it, and for requests in progress.
pub(super) async fn drain(pc: &Arc<PeerConn>, writer: bool) {
    if writer {
        let mut done = pc.writer_done.subscribe();
        let _ = tokio::time::timeout(GRACE, done.wait_for(|d| *d)).await;
    }
    wait_until(|| pc.busy.load(Ordering::SeqCst) == 0).await;
}

/// Polls `cond` (rare path: closing connections) for at most [`GRACE`].
pub(super) async fn wait_until(cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + GRACE;
    while !cond() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(super) async fn send_control(pc: &PeerConn, kind: StreamKind) -> bool {
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

/// Closes an idle, superseded or replaced connection without losing
/// anything in flight: both sides stop sending, flush, and read everything
/// the other sent before the connection closes (with `code` and `reason`).
///
/// 1. This side moves to [`ConnState::Closing`] and leaves the table (no
///    new sends), flushes, and sends `GoAway` with the number of message
///    streams it opened.
/// 2. The peer does the same, reads all our streams, and answers `Done` with
///    its own count ([`answer_goaway`]).
/// 3. We read all its streams and close. Each step waits at most [`GRACE`]
///    (the wait for `Done` ends early if the connection closes).
pub(super) async fn graceful_close(
    inner: Arc<Inner>,
    pc: Arc<PeerConn>,
    code: u32,
    reason: &'static str,
) {
    let (Ok(true), writer) = start_closing(&inner, &pc) else {
        return;
    };
    drain(&pc, writer).await;
    if send_control(&pc, StreamKind::GoAway).await {
        let mut state = pc.state.subscribe();
        let done =
            state.wait_for(|s| s.peer_done().is_some() || matches!(s, ConnState::Closed { .. }));
        let peer_count = tokio::time::timeout(GRACE, done)
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|s| s.peer_done()));
        if let Some(peer_count) = peer_count {
            wait_until(|| pc.streams_finished.load(Ordering::SeqCst) >= peer_count).await;
        }
    }
    pc.close(code, reason);
}

/// The peer's side of [`graceful_close`].
pub(super) async fn answer_goaway(inner: Arc<Inner>, pc: Arc<PeerConn>, peer_count: u32) {
    // A go-away may overtake the peer's hello: let the admission settle
    // (it ends within the handshake timeout).
    let mut state = pc.state.subscribe();
    let settled = state.wait_for(|s| !matches!(s, ConnState::Admitting));
    let _ = tokio::time::timeout(inner.config.handshake_timeout + GRACE, settled).await;
    let (drain_started, writer) = start_closing(&inner, &pc);
    if drain_started.is_err() {
        // Still admitting: the admission's own timeout closes it.
        debug!(peer = %pc.peer, "go-away before the hello ignored");
        return;
    }
    drain(&pc, writer).await;
    wait_until(|| pc.streams_finished.load(Ordering::SeqCst) >= peer_count).await;
    send_control(&pc, StreamKind::Done).await;
    // The initiator closes; close anyway if it does not.
    if tokio::time::timeout(2 * GRACE, pc.conn.closed())
        .await
        .is_err()
    {
        pc.close(code::IDLE, "idle");
    }
}
