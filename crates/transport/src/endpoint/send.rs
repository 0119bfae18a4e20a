//! The send paths on streams of their own: requests, large one-way
//! messages and control messages, each on a bi stream (within the data
//! stream limit, or at control priority).

use super::*;

impl Transport {
    pub(super) async fn request_inner(
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
