//! What the transport delivers to the application, and how requests are
//! answered.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::budget::{Charge, DatagramSlot, MESSAGE_OVERHEAD};
use crate::endpoint::{BusyGuard, Inner, PeerConn, answer_exchange, refuse_exchange};
use crate::error::TransportError;
use crate::frame::code;
use crate::name::{Dest, Peer};
use crate::stats::Stats;

/// A datagram from a verified peer.
#[derive(Clone, Debug)]
pub struct Datagram {
    /// Who sent it.
    pub from: Peer,
    /// The payload, as the peer passed it to [`crate::Transport::send_datagram`].
    pub payload: Bytes,
}

/// A message from a verified peer: one-way, or a request to answer.
#[derive(Debug)]
pub struct Message {
    /// Who sent it.
    pub from: Peer,
    /// The channel (message type) id the sender chose.
    pub channel: u32,
    /// The message, decompressed.
    pub body: Bytes,
    /// For a request: the way to answer it. Dropping it unanswered tells the
    /// requester ([`TransportError::Closed`]).
    pub reply: Option<Responder>,
}

/// A message in the inbound queue with the budget it holds; the budget is
/// released when the application takes the message.
#[derive(Debug)]
pub(crate) struct Charged {
    pub(crate) msg: Message,
    /// Messages decoded together share one charge, released when the last
    /// of them is taken (or, through [`MessageReceiver::recv_held`], when
    /// the last of their bodies is dropped).
    pub(crate) charge: Option<Arc<Mutex<Charge>>>,
}

/// A message body that holds its share of the inbound budget until every
/// copy and slice of it is dropped (see [`MessageReceiver::recv_held`]).
struct HeldBody {
    body: Bytes,
    _charge: Charge,
}

impl AsRef<[u8]> for HeldBody {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

impl Charged {
    /// The message, its body now holding the charge.
    fn into_held(self) -> Message {
        let Charged { mut msg, charge } = self;
        if let Some(shared) = charge {
            let own = shared
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .split_off(msg.body.len() + MESSAGE_OVERHEAD);
            msg.body = Bytes::from_owner(HeldBody {
                body: msg.body,
                _charge: own,
            });
        }
        msg
    }
}

/// A datagram in the inbound queue with its slot in its sender's share.
#[derive(Debug)]
pub(crate) struct SlottedDatagram {
    pub(crate) datagram: Datagram,
    pub(crate) _slot: DatagramSlot,
}

/// What the application can take out of a queue (dropping the budget held).
trait Take {
    type Out;
    fn take(self) -> Self::Out;
}

impl Take for Charged {
    type Out = Message;
    fn take(self) -> Message {
        self.msg
    }
}

impl Take for SlottedDatagram {
    type Out = Datagram;
    fn take(self) -> Datagram {
        self.datagram
    }
}

/// One item from [`Incoming::recv`].
#[derive(Debug)]
pub enum Inbound {
    /// A datagram.
    Datagram(Datagram),
    /// A message or request.
    Message(Message),
}

/// Answers one request. Use it once; dropping it unanswered resets the
/// request's stream so the requester learns at once.
pub struct Responder {
    /// Where the answer goes; `None` once answered.
    pub(crate) to: Option<AnswerTo>,
    pub(crate) peer: Peer,
    pub(crate) channel: u32,
    pub(crate) inner: Arc<Inner>,
    pub(crate) _busy: BusyGuard,
}

/// Where a request's answer goes.
pub(crate) enum AnswerTo {
    /// The request's own bi stream.
    Stream(quinn::SendStream),
    /// The answers stream of the connection it came on, with its id.
    Exchange {
        /// The connection.
        pc: Arc<PeerConn>,
        /// The request's id.
        id: u64,
    },
}

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Responder")
            .field("peer", &self.peer)
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl Responder {
    /// Sends `body` as the answer (on the request's channel).
    ///
    /// # Errors
    /// [`TransportError::TooLarge`] above this node's message limit (the
    /// requester then sees its request refused), [`TransportError::Closed`]
    /// when the connection or the requester went away.
    pub async fn respond(mut self, body: Bytes) -> Result<(), TransportError> {
        let dest = Dest::from(&self.peer);
        let Some(to) = self.to.take() else {
            return Err(TransportError::Closed {
                peer: dest,
                reason: "already answered".into(),
            });
        };
        let limit = self.inner.caps.of(self.channel).max_size;
        if body.len() > limit {
            refuse(to, code::TOO_LARGE);
            return Err(TransportError::TooLarge {
                peer: dest,
                size: body.len() as u64,
                limit: limit as u64,
                side: "local limit",
            });
        }
        let frame = self.inner.out_frame(self.channel, body);
        let mut stream = match to {
            AnswerTo::Stream(stream) => stream,
            AnswerTo::Exchange { pc, id } => {
                return answer_exchange(&self.inner, &pc, id, frame).await;
            }
        };
        let wire = frame.wire_len() as u64;
        let mut chunks = frame.stream_chunks(None);
        let closed = |e: &dyn std::fmt::Display| TransportError::Closed {
            peer: Dest::from(&self.peer),
            reason: e.to_string(),
        };
        stream
            .write_all_chunks(&mut chunks)
            .await
            .map_err(|e| closed(&e))?;
        let _ = stream.finish();
        Stats::add(&self.inner.stats.bytes_sent, wire);
        if frame.is_compressed() {
            Stats::inc(&self.inner.stats.messages_compressed);
        }
        Ok(())
    }

    /// The requester.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(to) = self.to.take() {
            refuse(to, code::NO_RESPONSE);
        }
    }
}

/// Tells the requester its request is refused with `code`.
fn refuse(to: AnswerTo, code: u32) {
    match to {
        AnswerTo::Stream(mut stream) => {
            let _ = stream.reset(code.into());
        }
        AnswerTo::Exchange { pc, id } => refuse_exchange(&pc, id, code),
    }
}

/// The receiving side of a transport: messages and datagrams from verified
/// peers, in two bounded queues.
///
/// Messages: bounded in count ([`crate::TransportConfig::inbound_messages`])
/// and in bytes ([`crate::TransportConfig::inbound_bytes`], decompressed),
/// each peer to its share. A message holds its bytes from the moment its
/// header is read until the application takes it here. When the queue or
/// a budget is full, the transport stops reading streams and QUIC flow
/// control makes the senders wait (their send queues fill, then their `send`
/// waits or fails as they chose). Nothing is dropped. Datagrams: when their
/// queue, or the sender's share of it, is full, new datagrams are dropped and
/// counted (`datagrams_dropped`).
///
/// Messages on control channels ([`crate::TransportConfig::control_channels`])
/// have a queue (and budget) of their own, read before the others; a
/// consumer that may be slow with the others reads them from a receiver of
/// their own ([`MessageReceiver::take_control`]).
#[derive(Debug)]
pub struct Incoming {
    pub(crate) messages: mpsc::Receiver<Charged>,
    pub(crate) control: mpsc::Receiver<Charged>,
    pub(crate) datagrams: mpsc::Receiver<SlottedDatagram>,
    pub(crate) shut: watch::Receiver<bool>,
}

/// Waits until the transport is shut down.
async fn shut_down(shut: &mut watch::Receiver<bool>) {
    // An error means the transport is gone altogether: shut down too.
    let _ = shut.wait_for(|s| *s).await;
}

/// Receives from `rx` until it is empty and the transport is shut down.
async fn recv_or_shut<T: Take>(
    rx: &mut mpsc::Receiver<T>,
    shut: &mut watch::Receiver<bool>,
) -> Option<T::Out> {
    tokio::select! {
        biased;
        item = rx.recv() => item.map(Take::take),
        () = shut_down(shut) => rx.try_recv().ok().map(Take::take),
    }
}

/// The next message, from `control` first (when there is one), until both
/// queues are empty and the transport is shut down.
async fn recv_either(
    data: &mut mpsc::Receiver<Charged>,
    control: Option<&mut mpsc::Receiver<Charged>>,
    shut: &mut watch::Receiver<bool>,
) -> Option<Charged> {
    let Some(control) = control else {
        return tokio::select! {
            biased;
            item = data.recv() => item,
            () = shut_down(shut) => data.try_recv().ok(),
        };
    };
    tokio::select! {
        biased;
        Some(item) = control.recv() => Some(item),
        Some(item) = data.recv() => Some(item),
        () = shut_down(shut) => match control.try_recv() {
            Ok(item) => Some(item),
            Err(_) => data.try_recv().ok(),
        },
    }
}

impl Incoming {
    /// The next datagram or message, datagrams first when both wait (they
    /// carry failure detection, which must not queue behind bulk messages),
    /// then messages on control channels. `None` once the transport is shut
    /// down and every queue is empty.
    pub async fn recv(&mut self) -> Option<Inbound> {
        tokio::select! {
            biased;
            Some(d) = self.datagrams.recv() => Some(Inbound::Datagram(d.take())),
            Some(m) = self.control.recv() => Some(Inbound::Message(m.take())),
            Some(m) = self.messages.recv() => Some(Inbound::Message(m.take())),
            () = shut_down(&mut self.shut) => match self.datagrams.try_recv() {
                Ok(d) => Some(Inbound::Datagram(d.take())),
                Err(_) => self
                    .control
                    .try_recv()
                    .or_else(|_| self.messages.try_recv())
                    .ok()
                    .map(|m| Inbound::Message(m.take())),
            },
        }
    }

    /// The next message, control channels first (datagrams stay queued);
    /// `None` after shutdown.
    pub async fn recv_message(&mut self) -> Option<Message> {
        recv_either(&mut self.messages, Some(&mut self.control), &mut self.shut)
            .await
            .map(Take::take)
    }

    /// The next datagram (messages stay queued); `None` after shutdown.
    pub async fn recv_datagram(&mut self) -> Option<Datagram> {
        recv_or_shut(&mut self.datagrams, &mut self.shut).await
    }

    /// Splits into separate message and datagram receivers, for reading them
    /// from different tasks.
    pub fn split(self) -> (MessageReceiver, DatagramReceiver) {
        (
            MessageReceiver {
                data: self.messages,
                control: Some(self.control),
                shut: self.shut.clone(),
            },
            DatagramReceiver(self.datagrams, self.shut),
        )
    }
}

/// The message half of [`Incoming::split`]: every message, control channels
/// first, until [`MessageReceiver::take_control`] moves those to a receiver
/// of their own.
#[derive(Debug)]
pub struct MessageReceiver {
    data: mpsc::Receiver<Charged>,
    control: Option<mpsc::Receiver<Charged>>,
    shut: watch::Receiver<bool>,
}

impl MessageReceiver {
    /// Moves the messages on control channels to a receiver of their own,
    /// for a task that consumes them whatever this receiver's consumer is
    /// waiting for (a consumer that waits for room in a full queue of its
    /// own must not make control messages wait). This receiver keeps the
    /// others. `None` if they were taken already.
    pub fn take_control(&mut self) -> Option<MessageReceiver> {
        let control = self.control.take()?;
        Some(MessageReceiver {
            data: control,
            control: None,
            shut: self.shut.clone(),
        })
    }

    async fn next(&mut self) -> Option<Charged> {
        recv_either(&mut self.data, self.control.as_mut(), &mut self.shut).await
    }

    fn try_next(&mut self) -> Option<Charged> {
        if let Some(c) = self.control.as_mut()
            && let Ok(m) = c.try_recv()
        {
            return Some(m);
        }
        self.data.try_recv().ok()
    }

    /// The next message; `None` after shutdown.
    pub async fn recv(&mut self) -> Option<Message> {
        self.next().await.map(Take::take)
    }

    /// The next message, whose body keeps holding the message's inbound
    /// budget (its sender's share included) until the body and every
    /// slice or clone of it are dropped, rather than until this call: for
    /// a consumer that queues messages further (the budget then bounds its
    /// queues too, and is given back when its own consumer is done with
    /// them). `None` after shutdown.
    pub async fn recv_held(&mut self) -> Option<Message> {
        self.next().await.map(Charged::into_held)
    }

    /// Takes up to `limit` waiting messages into `out` (waiting for at least
    /// one); returns how many, 0 after shutdown.
    pub async fn recv_many(&mut self, out: &mut Vec<Message>, limit: usize) -> usize {
        if limit == 0 {
            return 0;
        }
        let Some(first) = self.next().await else {
            return 0;
        };
        out.push(first.take());
        let mut n = 1;
        while n < limit {
            match self.try_next() {
                Some(m) => out.push(m.take()),
                None => break,
            }
            n += 1;
        }
        n
    }
}

/// The datagram half of [`Incoming::split`].
#[derive(Debug)]
pub struct DatagramReceiver(mpsc::Receiver<SlottedDatagram>, watch::Receiver<bool>);

impl DatagramReceiver {
    /// The next datagram; `None` after shutdown.
    pub async fn recv(&mut self) -> Option<Datagram> {
        recv_or_shut(&mut self.0, &mut self.1).await
    }

    /// The next datagram already received, without waiting.
    pub fn try_recv(&mut self) -> Option<Datagram> {
        self.0.try_recv().ok().map(Take::take)
    }
}
