//! What arrives: frames read (small ones whole, large ones charged to the
//! inbound budget before their body is read), messages decoded and
//! delivered, datagrams, and request streams answered.

use super::*;

pub(super) async fn write_frame(
    send: &mut quinn::SendStream,
    kind: StreamKind,
    frame: &OutFrame,
) -> Result<(), quinn::WriteError> {
    let mut chunks = frame.stream_chunks(Some(kind));
    send.write_all_chunks(&mut chunks).await
}

pub(super) enum ReadFrameError {
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
pub(super) enum Charging {
    /// A message or request for the inbound queue.
    Message,
    /// The answer to one of this node's requests.
    Response,
}

/// A frame read from a stream of its own, decoded, with its charge.
pub(super) struct Decoded {
    pub(super) channel: u32,
    pub(super) body: Bytes,
    pub(super) charge: Charge,
    /// Frame bytes on the wire, length prefix included.
    pub(super) wire: usize,
}

/// Reads one length-prefixed frame from a stream of its own: the prefix and
/// header first, checked against the channel's caps before anything large
/// is allocated; then the budget is charged (waiting for room: the stream
/// is not read meanwhile); then the body is read and decoded.
///
/// With a `deadline`, the prefix and header must arrive by then, and the
/// body within `frame_timeout` of the charge.
pub(super) async fn read_frame(
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
    let channel = inspected.header.channel;
    let charge = match charging {
        Charging::Message => {
            charge_message(inner, pc, class_of(inner, channel), channel, want).await
        }
        Charging::Response => inner.budgets.response(&pc.share, want).await,
    };
    let mut charge = charge.ok_or(ReadFrameError::Gone)?;
    // Time spent waiting for this node's own budget does not count.
    let deadline = deadline.map(|_| Instant::now() + inner.config.frame_timeout);
    buf.resize(len, 0);
    read_exact(recv, buf.get_mut(head_len..).unwrap_or_default(), deadline).await?;
    take_end(recv);
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

/// Reads the end of a stream whose one frame was read, if it has arrived
/// (it usually comes in the frame's last packet), without waiting for it.
/// quinn sends STOP_SENDING for a stream dropped before its end was read,
/// even when the end was there: one frame more per request each way.
pub(super) fn take_end(recv: &mut quinn::RecvStream) {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let read = std::pin::pin!(recv.read_chunk(1, true));
    // Pending (the end is still to come) or trailing bytes: the stream is
    // stopped when dropped, as before.
    let _ = std::future::Future::poll(read, &mut cx);
}

/// Reads a frame of a hello stream (tiny, no budget).
pub(super) async fn read_small_frame(
    recv: &mut quinn::RecvStream,
    max_frame: usize,
) -> Result<Bytes, ReadFrameError> {
    let mut prefix = [0u8; LEN_PREFIX];
    read_exact(recv, &mut prefix, None).await?;
    let len = frame::check_frame_len(u32::from_le_bytes(prefix), max_frame)
        .map_err(ReadFrameError::Refused)?;
    let mut buf = vec![0u8; len];
    read_exact(recv, &mut buf, None).await?;
    take_end(recv);
    Ok(Bytes::from(buf))
}

pub(super) async fn read_exact(
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

pub(super) async fn accept_uni_loop(inner: Arc<Inner>, pc: Arc<PeerConn>) {
    while let Ok(recv) = pc.conn.accept_uni().await {
        tokio::spawn(handle_uni(inner.clone(), pc.clone(), recv));
    }
}

pub(super) async fn accept_bi_loop(inner: Arc<Inner>, pc: Arc<PeerConn>) {
    let max = inner.config.max_concurrent_requests;
    while let Ok((send, recv)) = pc.conn.accept_bi().await {
        // Counted busy from here, so the limit grows with the streams the
        // peer keeps open.
        let busy = pc.busy();
        pc.grow_bi_limit(max);
        tokio::spawn(handle_bi(inner.clone(), pc.clone(), busy, send, recv));
    }
}

pub(super) async fn datagram_loop(inner: Arc<Inner>, pc: Arc<PeerConn>) {
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

pub(super) async fn handle_uni(inner: Arc<Inner>, pc: Arc<PeerConn>, mut recv: quinn::RecvStream) {
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
            // A bad hello fails the admission; a second hello is refused.
            let applied = match hello {
                Some(h) => {
                    // Known before the connection is open, so every use of
                    // it sees them. A second hello's are ignored.
                    if pc.instance().is_none() {
                        pc.peer_features.store(h.features, Ordering::SeqCst);
                        pc.peer_app_features.store(h.app_features, Ordering::SeqCst);
                    }
                    pc.apply(Event::Hello(h.instance))
                }
                None => {
                    let _ = pc.apply(Event::BadHello);
                    Err(Illegal)
                }
            };
            if applied.is_err() {
                Stats::inc(&inner.stats.frames_malformed);
            }
        }
        Some(StreamKind::Messages) => {
            read_messages(&inner, &pc, recv, StreamKind::Messages).await;
            pc.streams_finished.fetch_add(1, Ordering::SeqCst);
        }
        Some(k @ (StreamKind::Requests | StreamKind::Answers)) => {
            read_messages(&inner, &pc, recv, k).await;
        }
        Some(StreamKind::LargeAnswer) => read_large_answer(&inner, &pc, recv).await,
        Some(k @ (StreamKind::GoAway | StreamKind::Done)) => {
            let mut count = [0u8; 4];
            if recv.read_exact(&mut count).await.is_err() {
                Stats::inc(&inner.stats.frames_malformed);
                return;
            }
            take_end(&mut recv);
            let count = u32::from_le_bytes(count);
            if k == StreamKind::GoAway {
                tokio::spawn(answer_goaway(inner.clone(), pc.clone(), count));
            } else {
                if pc.apply(Event::PeerDone(count)).is_err() {
                    debug!(peer = %pc.peer, "done outside a graceful close ignored");
                }
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
pub(super) enum Pass {
    /// Every whole frame was handled; read more.
    More,
    /// The stream must be stopped with this code.
    Stop(u32),
    /// The application is gone.
    Gone,
}

/// How long a reader of a long-lived stream keeps what a burst grew (its
/// batch of decoded messages, its frame buffer: about 140 KiB after a burst
/// of one-way messages) once there is nothing to read.
const READER_RELEASE_AFTER: Duration = Duration::from_secs(1);

/// Reads one of the peer's long-lived streams until it ends: the shared
/// message stream, its requests stream or its answers stream (`kind`).
///
/// Each message or request is checked against the inline caps of its
/// channel, then charged to the budgets before it is decompressed; when the
/// budgets are full, what is decoded is handed over first, then the reader
/// waits (and stops reading, so QUIC flow control pushes back on the
/// sender). Answers are handed to their requesters and never wait.
pub(super) async fn read_messages(
    inner: &Arc<Inner>,
    pc: &Arc<PeerConn>,
    mut recv: quinn::RecvStream,
    kind: StreamKind,
) {
    let max_frame = if kind == StreamKind::Messages {
        INLINE_FRAME_MAX
    } else {
        EXCHANGE_FRAME_MAX
    };
    let mut reader = FrameReader::new(max_frame);
    // Everything on the shared stream is charged to the data budget: it
    // waits behind data anyway (this transport sends control messages on
    // streams of their own).
    let mut ready = Ready {
        msgs: Vec::new(),
        charge: inner.budgets.empty(&pc.share, Class::Data),
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
            if ready.msgs.capacity() > 0 || reader.holds_buffer() {
                // Nothing to read for a while: free what the last burst grew
                // (the batch of decoded messages, the reader's buffer).
                tokio::pin!(read);
                match tokio::time::timeout(READER_RELEASE_AFTER, &mut read).await {
                    Ok(r) => r,
                    Err(_) => {
                        ready.msgs = Vec::new();
                        reader.release();
                        read.await
                    }
                }
            } else {
                read.await
            }
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
        let pass = match kind {
            StreamKind::Messages => {
                decode_buffered(inner, pc, &mut reader, &mut ready, &mut partial_since).await
            }
            StreamKind::Requests => {
                decode_requests(inner, pc, &mut reader, &mut ready, &mut partial_since).await
            }
            _ => decode_answers(inner, pc, &mut reader, &mut partial_since),
        };
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
pub(super) struct Ready {
    pub(super) msgs: Vec<Message>,
    pub(super) charge: Charge,
}

/// Decodes the whole frames buffered in `reader` into `ready`, charging each.
pub(super) async fn decode_buffered(
    inner: &Inner,
    pc: &Arc<PeerConn>,
    reader: &mut FrameReader,
    ready: &mut Ready,
    partial_since: &mut Option<Instant>,
) -> Pass {
    loop {
        let f = match next_frame(inner, pc, reader, partial_since) {
            Ok(Some(f)) => f,
            Ok(None) => return Pass::More,
            Err(pass) => return pass,
        };
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
        if charge_ready(inner, pc, ready, inspected.header.channel, want)
            .await
            .is_err()
        {
            return Pass::Gone;
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

/// Adds a frame of `want` bytes on `channel` to the charge of `ready`; when
/// the budget has no room, hands over what `ready` holds first (the budget
/// may be full of it), then waits for room. `Err` when the application is
/// gone.
async fn charge_ready(
    inner: &Inner,
    pc: &PeerConn,
    ready: &mut Ready,
    channel: u32,
    want: usize,
) -> Result<(), ()> {
    if inner.budgets.try_add(&mut ready.charge, want) {
        return Ok(());
    }
    deliver_all(inner, ready).await?;
    ready.charge = charge_message(inner, pc, Class::Data, channel, want)
        .await
        .ok_or(())?;
    Ok(())
}

/// Takes the next whole frame buffered in `reader`; `Err` with the pass's
/// end when the framing is lost.
fn next_frame(
    inner: &Inner,
    pc: &PeerConn,
    reader: &mut FrameReader,
    partial_since: &mut Option<Instant>,
) -> Result<Option<Bytes>, Pass> {
    match reader.next_frame() {
        Ok(Some(f)) => {
            *partial_since = None;
            Ok(Some(f))
        }
        Ok(None) => Ok(None),
        Err(e) => {
            // The framing is lost: nothing after this can be trusted.
            Stats::inc(&inner.stats.frames_malformed);
            warn!(peer = %pc.peer, error = %e, "broken stream stopped");
            Err(Pass::Stop(code::PROTOCOL))
        }
    }
}

/// The next exchange frame buffered in `reader` that a stream of `kind`
/// may carry (requests on a requests stream, answers and refusals on an
/// answers stream); others are counted as malformed and skipped (the
/// framing holds). `Err` with the pass's end when the framing is lost.
fn next_exchange(
    inner: &Inner,
    pc: &PeerConn,
    reader: &mut FrameReader,
    partial_since: &mut Option<Instant>,
    kind: StreamKind,
) -> Result<Option<frame::Exchange>, Pass> {
    while let Some(f) = next_frame(inner, pc, reader, partial_since)? {
        match frame::split_exchange(f) {
            Ok(x) if (x.tag == ExchangeTag::Request) == (kind == StreamKind::Requests) => {
                return Ok(Some(x));
            }
            Ok(_) | Err(_) => {
                count_decode_error(inner, &DecodeError::Exchange);
                debug!(peer = %pc.peer, ?kind, "malformed exchange frame dropped");
            }
        }
    }
    Ok(None)
}

/// Decodes the whole request frames buffered in `reader` into `ready`,
/// charging each; a request that cannot be taken is refused on the answers
/// stream (the framing holds, so the stream goes on).
pub(super) async fn decode_requests(
    inner: &Arc<Inner>,
    pc: &Arc<PeerConn>,
    reader: &mut FrameReader,
    ready: &mut Ready,
    partial_since: &mut Option<Instant>,
) -> Pass {
    loop {
        let x = match next_exchange(inner, pc, reader, partial_since, StreamKind::Requests) {
            Ok(Some(x)) => x,
            Ok(None) => return Pass::More,
            Err(pass) => return pass,
        };
        // Refusals and answers go out on this writer: start it now, so a
        // responder dropped anywhere can queue its refusal without a task.
        pc.exchange_queue(inner, StreamKind::Answers);
        let inspected = match frame::inspect(&x.rest, x.rest.len(), |ch| inner.caps.inline(ch)) {
            Ok(i) => i,
            Err(e @ (DecodeError::TooLarge { .. } | DecodeError::Ratio { .. })) => {
                refused(inner, pc, &e);
                refuse_exchange(pc, x.id, code::TOO_LARGE);
                continue;
            }
            Err(e) => {
                count_decode_error(inner, &e);
                debug!(peer = %pc.peer, error = %e, "request refused");
                refuse_exchange(pc, x.id, code::PROTOCOL);
                continue;
            }
        };
        let want = inspected.size + MESSAGE_OVERHEAD;
        if charge_ready(inner, pc, ready, inspected.header.channel, want)
            .await
            .is_err()
        {
            refuse_exchange(pc, x.id, code::GONE);
            return Pass::Gone;
        }
        match frame::decode_body(x.rest, &inspected) {
            Ok(body) => ready.msgs.push(Message {
                from: pc.peer.clone(),
                channel: inspected.header.channel,
                body,
                reply: Some(Responder {
                    to: Some(AnswerTo::Exchange {
                        pc: pc.clone(),
                        id: x.id,
                    }),
                    peer: pc.peer.clone(),
                    channel: inspected.header.channel,
                    inner: inner.clone(),
                    _busy: pc.busy(),
                }),
            }),
            Err(e) => {
                ready.charge.give_back(want, 1);
                count_decode_error(inner, &e);
                debug!(peer = %pc.peer, error = %e, "request refused");
                refuse_exchange(pc, x.id, code::PROTOCOL);
            }
        }
    }
}

/// Hands the whole answer frames buffered in `reader` to their requesters
/// (an answer whose requester stopped waiting is dropped). Never waits.
pub(super) fn decode_answers(
    inner: &Inner,
    pc: &PeerConn,
    reader: &mut FrameReader,
    partial_since: &mut Option<Instant>,
) -> Pass {
    loop {
        let x = match next_exchange(inner, pc, reader, partial_since, StreamKind::Answers) {
            Ok(Some(x)) => x,
            Ok(None) => return Pass::More,
            Err(pass) => return pass,
        };
        let answer = if x.tag == ExchangeTag::Refusal {
            Answer::Refused(frame::refusal_code(&x.rest))
        } else {
            let decoded = frame::inspect(&x.rest, x.rest.len(), |ch| inner.caps.inline(ch))
                .and_then(|i| frame::decode_body(x.rest, &i));
            match decoded {
                Ok(body) => Answer::Body(body),
                Err(e) => {
                    match e {
                        DecodeError::TooLarge { .. } | DecodeError::Ratio { .. } => {
                            refused(inner, pc, &e);
                        }
                        _ => count_decode_error(inner, &e),
                    }
                    Answer::Malformed(e)
                }
            }
        };
        if !pc.answer(x.id, answer) {
            debug!(peer = %pc.peer, id = x.id, "answer to a request no longer waiting dropped");
        }
    }
}

/// Reads an answer too large for the answers stream, on a stream of its
/// own, and hands it to its requester: charged to the answer budget while
/// it is read; the id must arrive within `frame_timeout`.
pub(super) async fn read_large_answer(inner: &Inner, pc: &PeerConn, mut recv: quinn::RecvStream) {
    let deadline = Instant::now() + inner.config.frame_timeout;
    let mut id = [0u8; LARGE_ANSWER_HEAD - 1];
    if read_exact(&mut recv, &mut id, Some(deadline))
        .await
        .is_err()
    {
        let _ = recv.stop(code::PROTOCOL.into());
        return;
    }
    let id = u64::from_le_bytes(id);
    if !lock(&pc.pending).contains_key(&id) {
        // Nobody waits for it: do not read it.
        let _ = recv.stop(code::OK.into());
        return;
    }
    let caps = &inner.caps;
    let read = read_frame(
        inner,
        pc,
        &mut recv,
        |ch| caps.of(ch),
        Some(deadline),
        Charging::Response,
    )
    .await;
    let answer = match read {
        // The charge ends here: the requester holds the answer now.
        Ok(d) => Answer::Body(d.body),
        Err(ReadFrameError::Refused(e)) => {
            let _ = recv.stop(code::TOO_LARGE.into());
            match e {
                DecodeError::TooLarge { .. } | DecodeError::Ratio { .. } => refused(inner, pc, &e),
                _ => count_decode_error(inner, &e),
            }
            Answer::Malformed(e)
        }
        Err(ReadFrameError::TimedOut) => {
            Stats::inc(&inner.stats.frames_timed_out);
            let _ = recv.stop(code::TIMED_OUT.into());
            strike(inner, pc);
            // The requester learns that its answer was lost.
            pc.forget(id);
            return;
        }
        Err(ReadFrameError::Stream(_) | ReadFrameError::Gone) => {
            pc.forget(id);
            return;
        }
    };
    pc.answer(id, answer);
}

/// The budget a message on `channel` is charged to.
pub(super) fn class_of(inner: &Inner, channel: u32) -> Class {
    if inner.config.is_control(channel) {
        Class::Control
    } else {
        Class::Data
    }
}

/// How long a reader waits for budget before the wait is reported as a
/// stall (`inbound_budget_stalls`, a warning naming the peer and channel).
pub(super) const BUDGET_STALL: Duration = Duration::from_secs(1);

/// Charges a message of `want` bytes on `channel` to `pc`'s peer's share of
/// the `class` budget, waiting for room (counted in `inbound_budget_waits`,
/// and `control_budget_waits` for control, when it must wait; reported when
/// the wait lasts longer than [`BUDGET_STALL`]).
pub(super) async fn charge_message(
    inner: &Inner,
    pc: &PeerConn,
    class: Class,
    channel: u32,
    want: usize,
) -> Option<Charge> {
    let share = &pc.share;
    if let Some(charge) = inner.budgets.try_message(share, class, want) {
        return Some(charge);
    }
    Stats::inc(&inner.stats.inbound_budget_waits);
    if class == Class::Control {
        Stats::inc(&inner.stats.control_budget_waits);
    }
    let wait = inner.budgets.message(share, class, want);
    tokio::pin!(wait);
    if let Ok(charge) = tokio::time::timeout(BUDGET_STALL, &mut wait).await {
        return charge;
    }
    Stats::inc(&inner.stats.inbound_budget_stalls);
    let held = match class {
        Class::Data => inner.budgets.charged_by(&pc.peer.name),
        Class::Control => inner.budgets.control_charged_by(&pc.peer.name),
    };
    warn!(
        peer = %pc.peer,
        channel,
        control = class == Class::Control,
        held,
        wanted = want,
        "inbound budget share of this peer full of messages not taken yet: its streams wait"
    );
    wait.await
}

/// Hands decoded messages to the inbound queue, reserving room for many at
/// once (one wait per batch rather than per message). Waits while the queue
/// is full: that is the backpressure.
/// The messages share the batch's charge, which a fresh one replaces.
pub(super) async fn deliver_all(inner: &Inner, ready: &mut Ready) -> Result<(), ()> {
    if ready.msgs.is_empty() {
        return Ok(());
    }
    inner.budgets.note_peak();
    let fresh = inner.budgets.empty(ready.charge.share(), Class::Data);
    let charge = Arc::new(Mutex::new(std::mem::replace(&mut ready.charge, fresh)));
    if !inner.config.control_channels.is_empty()
        && ready
            .msgs
            .iter()
            .any(|m| inner.config.is_control(m.channel))
    {
        // Control messages on the shared stream (a peer that sends them
        // there): each to its own queue, in order.
        Stats::add(&inner.stats.messages_received, ready.msgs.len() as u64);
        for msg in ready.msgs.drain(..) {
            let charged = Charged {
                charge: Some(Arc::clone(&charge)),
                msg,
            };
            inner
                .queue_for(charged.msg.channel)
                .send(charged)
                .await
                .map_err(|_| ())?;
        }
        return Ok(());
    }
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

pub(super) async fn handle_bi(
    inner: Arc<Inner>,
    pc: Arc<PeerConn>,
    busy: BusyGuard,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
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
    if inner.config.is_control(d.channel) {
        // The answer (or verdict) goes first too.
        let _ = send.set_priority(CONTROL_PRIORITY);
    }
    let (reply, verdict) = match kind {
        StreamKind::Request => (
            Some(Responder {
                to: Some(AnswerTo::Stream(send)),
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
    if inner.queue_for(d.channel).send(charged).await.is_err() {
        if let Some(mut send) = verdict {
            let _ = send.reset(code::GONE.into());
        }
        return;
    }
    if let Some(mut send) = verdict {
        let _ = send.finish();
    }
}
