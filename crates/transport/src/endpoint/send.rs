//! The send paths of requests and of what does not go on the shared
//! message stream:
//!
//! - requests of at most [`INLINE_FRAME_MAX`] bytes on data channels are
//!   multiplexed on one long-lived requests stream per connection and
//!   direction, each named by an id; their answers come back on the peer's
//!   answers stream (a large answer on a stream of its own);
//! - requests on control channels or larger ones, large one-way messages
//!   and control messages each take a bi stream of their own (within the
//!   data stream limit, or at control priority).

use super::*;

impl Transport {
    pub(super) async fn request_inner(
        &self,
        dest: &Dest,
        frame: OutFrame,
    ) -> Result<Bytes, TransportError> {
        if self.inner.config.is_control(frame.header.channel) || !frame.fits_inline() {
            return self.request_on_stream(dest, frame).await;
        }
        // A connection found just as it closes gracefully takes no new
        // request; then the request goes on a new connection, once.
        let mut retried = false;
        loop {
            let pc = self.connection(dest).await?;
            if !pc.speaks(frame::features::REQUEST_STREAMS) {
                // A peer of a version without the requests streams.
                return self.request_on_stream(dest, frame).await;
            }
            // Busy before the check: a graceful close that starts after it
            // waits for this request.
            let busy = pc.busy();
            if pc.drained() {
                drop(busy);
                if retried {
                    return Err(self.closed_error(&pc));
                }
                retried = true;
                continue;
            }
            return self.exchange(&pc, frame).await;
        }
    }

    /// Sends a request on `pc`'s requests stream and waits for its answer
    /// (the caller's timeout bounds the wait).
    async fn exchange(&self, pc: &Arc<PeerConn>, frame: OutFrame) -> Result<Bytes, TransportError> {
        let inner = &self.inner;
        let peer = Dest::from(&pc.peer);
        let _slot = pc
            .data_streams
            .acquire()
            .await
            .map_err(|_| self.closed_error(pc))?;
        let need = (frame::EXCHANGE_PREFIX + frame.wire_len()) as u32;
        let permit = match pc.budget.clone().try_acquire_many_owned(need) {
            Ok(p) => p,
            Err(_) => pc
                .budget
                .clone()
                .acquire_many_owned(need)
                .await
                .map_err(|_| self.closed_error(pc))?,
        };
        let (id, answer) = pc.register();
        // Forgets the request if this future is dropped (its timeout).
        let _pending = Pending { pc, id };
        // The watchdog fails every request waiting on a connection that
        // closed, after it marked the connection closed: registered before
        // that, this one is failed with them; after, it sees it here.
        if pc.is_closed_state() {
            return Err(self.closed_error(pc));
        }
        if pc
            .queue_exchange(inner, ExchangeTag::Request, id, frame, permit)
            .is_err()
        {
            return Err(self.closed_error(pc));
        }
        match answer.await {
            Ok(Answer::Body(body)) => {
                Stats::inc(&inner.stats.responses_received);
                Ok(body)
            }
            Ok(Answer::Refused(c)) => Err(refusal_error(&peer, c)),
            Ok(Answer::Malformed(
                e @ (DecodeError::TooLarge { .. } | DecodeError::Ratio { .. }),
            )) => {
                let (size, limit) = match e {
                    DecodeError::TooLarge { announced, limit } => (announced, limit),
                    _ => (0, 0),
                };
                Err(TransportError::TooLarge {
                    peer,
                    size,
                    limit,
                    side: "answer over the local limit",
                })
            }
            Ok(Answer::Malformed(e)) => Err(TransportError::Rejected {
                peer,
                reason: format!("malformed answer: {e}"),
            }),
            // The request was lost with its stream, or the connection
            // closed before its answer came (the watchdog failed it).
            Err(_) => Err(match pc.conn.close_reason() {
                Some(e) => classify(&peer, &e),
                None => TransportError::Closed {
                    peer,
                    reason: "the request was lost with its stream".into(),
                },
            }),
        }
    }

    /// A request on a bi stream of its own: on a control channel (at
    /// control priority), or too large for the requests stream.
    async fn request_on_stream(
        &self,
        dest: &Dest,
        frame: OutFrame,
    ) -> Result<Bytes, TransportError> {
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

    /// A large one-way message on a bi stream of its own; waits for the
    /// receiver's verdict.
    pub(super) async fn send_single(
        &self,
        pc: &Arc<PeerConn>,
        frame: OutFrame,
    ) -> Result<(), TransportError> {
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
    pub(super) async fn send_control(
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
}

/// A request waiting on the requests stream: forgotten when its requester
/// stops waiting, however that happens.
struct Pending<'a> {
    pc: &'a PeerConn,
    id: u64,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.pc.forget(self.id);
    }
}

/// Answers the peer's request `id` with `frame`: on the answers stream when
/// it fits, else on a stream of its own ([`StreamKind::LargeAnswer`]).
/// Waits at most [`TransportConfig::send_timeout`] for room in the send
/// queue or for the stream.
pub(crate) async fn answer_exchange(
    inner: &Arc<Inner>,
    pc: &Arc<PeerConn>,
    id: u64,
    frame: OutFrame,
) -> Result<(), TransportError> {
    let peer = Dest::from(&pc.peer);
    let timeout = inner.config.send_timeout;
    let closed = |reason: String| TransportError::Closed {
        peer: peer.clone(),
        reason,
    };
    if frame.fits_inline() {
        let need = (frame::EXCHANGE_PREFIX + frame.wire_len()) as u32;
        let permit = match pc.budget.clone().try_acquire_many_owned(need) {
            Ok(p) => p,
            Err(_) => {
                match tokio::time::timeout(timeout, pc.budget.clone().acquire_many_owned(need))
                    .await
                {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) => return Err(closed("connection closing".into())),
                    Err(_) => {
                        return Err(TransportError::TimedOut {
                            peer,
                            after: timeout,
                        });
                    }
                }
            }
        };
        return pc
            .queue_exchange(inner, ExchangeTag::Response, id, frame, permit)
            .map_err(|()| closed("connection closed".into()));
    }
    let work = async {
        let mut send = pc.conn.open_uni().await.map_err(|e| classify(&peer, &e))?;
        let mut head = [0u8; LARGE_ANSWER_HEAD];
        head[0] = StreamKind::LargeAnswer as u8;
        if let Some(dst) = head.get_mut(1..) {
            dst.copy_from_slice(&id.to_le_bytes());
        }
        send.write_all(&head)
            .await
            .map_err(|e| write_error(&peer, &e))?;
        let mut chunks = frame.stream_chunks(None);
        send.write_all_chunks(&mut chunks)
            .await
            .map_err(|e| write_error(&peer, &e))?;
        let _ = send.finish();
        Ok::<_, TransportError>(())
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(())) => {
            Stats::add(
                &inner.stats.bytes_sent,
                (LARGE_ANSWER_HEAD + frame.wire_len()) as u64,
            );
            if frame.is_compressed() {
                Stats::inc(&inner.stats.messages_compressed);
            }
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(TransportError::TimedOut {
            peer,
            after: timeout,
        }),
    }
}

/// Bytes before a large answer's frame: its kind and id.
pub(super) const LARGE_ANSWER_HEAD: usize = 9;

/// Refuses the peer's request `id` with `code` on the answers stream (its
/// writer was started when the request arrived); nothing waits.
pub(crate) fn refuse_exchange(pc: &PeerConn, id: u64, code: u32) {
    if let Some(tx) = pc.answers_tx.get() {
        let _ = tx.send(Queued {
            item: Item::Refusal { id, code },
            _permit: None,
        });
    }
}

/// Opens a bi stream for `frame`: on a control channel at a higher
/// priority; on any other channel only while fewer than
/// [`TransportConfig::data_streams`] of them are open to the peer (the
/// permit returned lives as long as the stream is in use), so that
/// [`crate::CONTROL_STREAMS`] of the peer's stream limit stay free for
/// control traffic.
pub(super) async fn open_bi(
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
pub(super) const CONTROL_PRIORITY: i32 = 1;

pub(super) fn count_sent(inner: &Inner, frame: &OutFrame) {
    Stats::inc(&inner.stats.messages_sent);
    Stats::add(&inner.stats.bytes_sent, frame.wire_len() as u64 + 1);
    if frame.is_compressed() {
        Stats::inc(&inner.stats.messages_compressed);
    }
}
