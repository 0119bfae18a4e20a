//! Request/response and acknowledged delivery, built on typed channels.
//!
//! A request channel is two channels: asks (`name`) and answers
//! (`name` + `"\u{1f}answer"`). An ask carries the asking node's name and a
//! correlation id beside the payload, so whichever node finally takes it (the
//! owner of a datum after any number of forwards and handoffs, or a named
//! node) answers the asker directly. The asker keeps a bounded table of
//! pending asks; an answer for an ask no longer waited for (it timed out) is
//! counted and dropped.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};

use crate::channel::{Received, Receiver, Sender};
use crate::error::{RequestError, SendError};
use crate::view::ClusterView;

/// Both ends of a request channel ([`Node::request_channel`]).
///
/// [`Node::request_channel`]: crate::Node::request_channel
pub type RequestChannel<Q, R> = (Requester<Q, R>, Requests<Q, R>);

/// Asks one node may wait for at once on one request channel; a further
/// ask fails with [`RequestError::TooManyPending`] (nothing is sent).
pub const MAX_PENDING_ASKS: usize = 65_536;

/// Longest refusal reason carried back to an asker, in bytes (longer ones
/// are cut at a character boundary).
pub const MAX_REFUSAL_LEN: usize = 256;

/// Suffix of the answer channel's name.
const ANSWER_SUFFIX: &str = "\u{1f}answer";

/// Longest name of a request channel (the answer channel's name adds the
/// suffix and must fit the 255-byte limit).
pub(crate) const MAX_REQUEST_CHANNEL_NAME: usize = crate::wire::MAX_NAME_LEN - ANSWER_SUFFIX.len();

/// The answer channel's name of request channel `name`.
pub(crate) fn answer_channel(name: &str) -> String {
    format!("{name}{ANSWER_SUFFIX}")
}

/// An ask on the wire: postcard of this, on the request channel.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) struct Ask {
    /// The node to answer.
    asker: String,
    /// The asker's correlation id.
    corr: u64,
    /// The request, postcard.
    body: Vec<u8>,
}

/// An answer on the wire: postcard of this, on the answer channel.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) struct Answer {
    corr: u64,
    /// The response (postcard), or why the ask was refused.
    outcome: Outcome,
}

/// What an answer brings: the response (postcard) or a refusal reason.
type Outcome = Result<Vec<u8>, String>;

/// Asks waited for, by correlation id.
type PendingMap = HashMap<u64, oneshot::Sender<Outcome>>;

/// Asks waited for, by correlation id.
struct Pending {
    map: Mutex<PendingMap>,
    next: AtomicU64,
    late: AtomicU64,
}

impl Pending {
    fn lock(&self) -> MutexGuard<'_, PendingMap> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn open(self: &Arc<Self>) -> Result<(PendingGuard, oneshot::Receiver<Outcome>), RequestError> {
        let (tx, rx) = oneshot::channel();
        let mut map = self.lock();
        if map.len() >= MAX_PENDING_ASKS {
            return Err(RequestError::TooManyPending(MAX_PENDING_ASKS));
        }
        let corr = self.next.fetch_add(1, Ordering::Relaxed);
        map.insert(corr, tx);
        Ok((
            PendingGuard {
                pending: Arc::clone(self),
                corr,
            },
            rx,
        ))
    }

    fn complete(&self, answer: Answer) {
        match self.lock().remove(&answer.corr) {
            Some(tx) => {
                let _ = tx.send(answer.outcome);
            }
            None => {
                self.late.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("shoal_late_answers_total").increment(1);
            }
        }
    }
}

/// Removes its pending entry when the ask ends, however it ends.
struct PendingGuard {
    pending: Arc<Pending>,
    corr: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.pending.lock().remove(&self.corr);
    }
}

/// Asks on one request channel and waits for the answers. Cheap to clone.
///
/// Made by [`Node::request_channel`](crate::Node::request_channel).
pub struct Requester<Q, R> {
    asks: Sender<Ask>,
    pending: Arc<Pending>,
    view: watch::Receiver<Arc<ClusterView>>,
    me: Arc<str>,
    _types: PhantomData<fn(Q) -> R>,
}

impl<Q, R> Clone for Requester<Q, R> {
    fn clone(&self) -> Self {
        Requester {
            asks: self.asks.clone(),
            pending: Arc::clone(&self.pending),
            view: self.view.clone(),
            me: Arc::clone(&self.me),
            _types: PhantomData,
        }
    }
}

impl<Q, R> std::fmt::Debug for Requester<Q, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requester")
            .field("channel", &self.asks.name())
            .finish_non_exhaustive()
    }
}

impl<Q: Serialize, R: DeserializeOwned> Requester<Q, R> {
    /// Asks the owner of datum `(datum_type, id)` and waits for its answer.
    ///
    /// The ask is routed like [`Sender::send_to_owner`]: forwarded to the
    /// owner, held while the datum is in flight, sent on after a handoff;
    /// the node whose application takes it answers this node directly.
    /// `timeout` bounds the whole call (sending included).
    ///
    /// # Errors
    /// [`RequestError::Timeout`] when no answer came in time (the owner may
    /// still have handled the ask: a crash of the owner, a message dropped
    /// on the way, or a slow handler all read the same);
    /// [`RequestError::Refused`] with the handler's reason;
    /// [`RequestError::Send`] (no owner, shut down, …);
    /// [`RequestError::BadAnswer`]; [`RequestError::TooManyPending`];
    /// [`RequestError::Shutdown`].
    pub async fn ask_owner(
        &self,
        datum_type: &str,
        id: i64,
        request: &Q,
        timeout: Duration,
    ) -> Result<R, RequestError> {
        self.exchange(AskTo::Owner(datum_type, id), request, timeout)
            .await
    }

    /// Asks the node named `node` (this node too) and waits for its answer.
    ///
    /// # Errors
    /// As [`Requester::ask_owner`], and [`RequestError::PeerGone`] when
    /// `node` leaves the live view (dies or leaves) before it answered.
    pub async fn ask(&self, node: &str, request: &Q, timeout: Duration) -> Result<R, RequestError> {
        self.exchange(AskTo::Node(node), request, timeout).await
    }

    /// Sends one ask to `to` and waits (all within `timeout`) for its
    /// answer; the pending entry goes however the wait ends.
    async fn exchange(
        &self,
        to: AskTo<'_>,
        request: &Q,
        timeout: Duration,
    ) -> Result<R, RequestError> {
        let body = postcard::to_allocvec(request).map_err(SendError::from)?;
        let (guard, rx) = self.pending.open()?;
        let ask = Ask {
            asker: self.me.to_string(),
            corr: guard.corr,
            body,
        };
        let exchange = async {
            match to {
                AskTo::Owner(datum_type, id) => {
                    self.asks.send_to_owner(datum_type, id, &ask).await?;
                    await_answer(rx, None).await
                }
                AskTo::Node(node) => {
                    self.asks.send_to(node, &ask).await?;
                    let gone = (node != &*self.me).then(|| (node, self.view.clone()));
                    await_answer(rx, gone).await
                }
            }
        };
        let outcome = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| RequestError::Timeout(timeout))?;
        drop(guard);
        decode_answer(outcome?)
    }

    /// Answers that arrived after their ask stopped waiting (timed out or
    /// cancelled), so far.
    pub fn late_answers(&self) -> u64 {
        self.pending.late.load(Ordering::Relaxed)
    }

    /// Asks waiting for an answer now.
    pub fn pending(&self) -> usize {
        self.pending.lock().len()
    }
}

/// Where an ask goes.
#[derive(Clone, Copy)]
enum AskTo<'a> {
    /// The owner of datum `(type, id)`, routed.
    Owner(&'a str, i64),
    /// A named node.
    Node(&'a str),
}

/// Waits for the answer; with `gone`, fails once that node is no longer a
/// live member of the view.
async fn await_answer(
    rx: oneshot::Receiver<Outcome>,
    gone: Option<(&str, watch::Receiver<Arc<ClusterView>>)>,
) -> Result<Outcome, RequestError> {
    let Some((node, mut view)) = gone else {
        return rx.await.map_err(|_| RequestError::Shutdown);
    };
    tokio::pin!(rx);
    loop {
        if view.borrow_and_update().member(node).is_none() {
            return Err(RequestError::PeerGone(node.to_owned()));
        }
        tokio::select! {
            answer = &mut rx => return answer.map_err(|_| RequestError::Shutdown),
            changed = view.changed() => {
                if changed.is_err() {
                    return Err(RequestError::Shutdown);
                }
            }
        }
    }
}

fn decode_answer<R: DeserializeOwned>(outcome: Outcome) -> Result<R, RequestError> {
    match outcome {
        Ok(bytes) => {
            postcard::from_bytes(&bytes).map_err(|e| RequestError::BadAnswer(e.to_string()))
        }
        Err(reason) => Err(RequestError::Refused(reason)),
    }
}

/// Receives the asks of one request channel. Dropping it unregisters the
/// channel.
///
/// Made by [`Node::request_channel`](crate::Node::request_channel).
pub struct Requests<Q, R> {
    asks: Receiver<Ask>,
    answers: Sender<Answer>,
    decode_errors: u64,
    _types: PhantomData<fn() -> (Q, R)>,
}

impl<Q, R> std::fmt::Debug for Requests<Q, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Requests")
            .field("channel", &self.asks.name())
            .finish_non_exhaustive()
    }
}

impl<Q: DeserializeOwned, R: Serialize> Requests<Q, R> {
    /// The next ask. An ask whose request does not decode as `Q` is refused
    /// back to its asker, counted ([`Requests::decode_errors`]) and
    /// skipped. `None` once the node is shut down.
    pub async fn recv(&mut self) -> Option<Request<Q, R>> {
        let (from, datum, payload, reply) = self.next_ask().await?;
        Some(Request {
            from,
            datum,
            payload,
            reply: Some(reply),
            _answer: PhantomData,
        })
    }

    /// The next ask that decodes, with where its answer goes.
    async fn next_ask(&mut self) -> Option<(Arc<str>, Option<(Arc<str>, i64)>, Q, Reply)> {
        loop {
            let Received { datum, payload, .. } = self.asks.recv().await?;
            let Ask { asker, corr, body } = payload;
            let reply = Reply {
                answers: self.answers.clone(),
                asker,
                corr,
            };
            match postcard::from_bytes::<Q>(&body) {
                Ok(request) => {
                    return Some((Arc::from(reply.asker.as_str()), datum, request, reply));
                }
                Err(error) => {
                    self.decode_errors += 1;
                    metrics::counter!("shoal_channel_decode_errors_total", "channel" => self.asks.name().to_owned())
                        .increment(1);
                    tracing::debug!(channel = %self.asks.name(), asker = %reply.asker, %error, "undecodable request refused");
                    let _ = reply
                        .send(Err(format!("request does not decode: {error}")))
                        .await;
                }
            }
        }
    }

    /// Requests that did not decode as `Q` so far.
    pub fn decode_errors(&self) -> u64 {
        self.decode_errors + self.asks.decode_errors()
    }

    /// The channel's name.
    pub fn name(&self) -> &str {
        self.asks.name()
    }
}

/// Where an answer goes.
struct Reply {
    answers: Sender<Answer>,
    asker: String,
    corr: u64,
}

impl Reply {
    async fn send(&self, outcome: Outcome) -> Result<(), SendError> {
        let answer = Answer {
            corr: self.corr,
            outcome,
        };
        self.answers.send_to(&self.asker, &answer).await
    }
}

/// One ask, to be answered once with [`Request::respond`] or
/// [`Request::refuse`]. Dropped unanswered, it is refused ("dropped without
/// an answer") so the asker does not wait out its timeout.
pub struct Request<Q, R> {
    /// The node that asked (the answer goes there, whoever forwarded the
    /// ask on the way).
    pub from: Arc<str>,
    /// For an ask to a datum's owner: the datum (type, id).
    pub datum: Option<(Arc<str>, i64)>,
    /// The request.
    pub payload: Q,
    reply: Option<Reply>,
    _answer: PhantomData<fn(R)>,
}

impl<Q: std::fmt::Debug, R> std::fmt::Debug for Request<Q, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("from", &self.from)
            .field("datum", &self.datum)
            .field("payload", &self.payload)
            .finish_non_exhaustive()
    }
}

impl<Q, R: Serialize> Request<Q, R> {
    /// Answers the asker with `response`.
    ///
    /// # Errors
    /// [`SendError`]: the asker is no longer a live member, the response
    /// does not serialise (the asker is then told so), the transport failed.
    pub async fn respond(mut self, response: &R) -> Result<(), SendError> {
        let Some(reply) = self.reply.take() else {
            return Ok(());
        };
        match postcard::to_allocvec(response) {
            Ok(bytes) => reply.send(Ok(bytes)).await,
            Err(error) => {
                let _ = reply
                    .send(Err(format!("response does not serialise: {error}")))
                    .await;
                Err(SendError::Encode(error))
            }
        }
    }

    /// Refuses the ask with `reason` (cut to [`MAX_REFUSAL_LEN`] bytes); the
    /// asker's call fails with [`RequestError::Refused`].
    ///
    /// # Errors
    /// [`SendError`] as [`Request::respond`].
    pub async fn refuse(mut self, reason: &str) -> Result<(), SendError> {
        let Some(reply) = self.reply.take() else {
            return Ok(());
        };
        reply.send(Err(cut(reason).to_owned())).await
    }
}

impl<Q, R> Drop for Request<Q, R> {
    fn drop(&mut self) {
        let Some(reply) = self.reply.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = reply
                    .send(Err("dropped without an answer".to_owned()))
                    .await;
            });
        }
    }
}

fn cut(reason: &str) -> &str {
    if reason.len() <= MAX_REFUSAL_LEN {
        return reason;
    }
    let mut end = MAX_REFUSAL_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Builds the two ends of a request channel from its two raw channels, and
/// starts the task that hands answers to the asks waiting for them (it
/// ends when the node shuts down).
pub(crate) fn request_channel<Q, R>(
    asks: (Sender<Ask>, Receiver<Ask>),
    answers: (Sender<Answer>, Receiver<Answer>),
    view: watch::Receiver<Arc<ClusterView>>,
    me: Arc<str>,
) -> (Requester<Q, R>, Requests<Q, R>) {
    let (ask_tx, ask_rx) = asks;
    let (answer_tx, mut answer_rx) = answers;
    let pending = Arc::new(Pending {
        map: Mutex::new(HashMap::new()),
        // Correlation ids start at a random point: an answer for another
        // node's ask, or a guessed one, finds nothing waiting.
        next: AtomicU64::new(
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
        ),
        late: AtomicU64::new(0),
    });
    let waiting = Arc::clone(&pending);
    tokio::spawn(async move {
        while let Some(answer) = answer_rx.recv().await {
            waiting.complete(answer.payload);
        }
        // The node shut down: every ask still waiting fails with Shutdown.
        waiting.lock().clear();
    });
    (
        Requester {
            asks: ask_tx,
            pending,
            view,
            me,
            _types: PhantomData,
        },
        Requests {
            asks: ask_rx,
            answers: answer_tx,
            decode_errors: 0,
            _types: PhantomData,
        },
    )
}

/// Sends messages that the receiving application acknowledges when it
/// takes them. Cheap to clone.
///
/// Made by [`Node::acked_channel`](crate::Node::acked_channel).
pub struct AckedSender<T> {
    inner: Requester<T, ()>,
}

impl<T> Clone for AckedSender<T> {
    fn clone(&self) -> Self {
        AckedSender {
            inner: self.inner.clone(),
        }
    }
}

impl<T> std::fmt::Debug for AckedSender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckedSender").finish_non_exhaustive()
    }
}

impl<T: Serialize> AckedSender<T> {
    /// Sends `msg` to the owner of datum `(datum_type, id)` (routed as
    /// [`Sender::send_to_owner`]) and resolves once the owner's
    /// application took it off its [`AckedReceiver`].
    ///
    /// # Errors
    /// [`RequestError::Timeout`]: not acknowledged within `timeout` (it may
    /// or may not have been taken: at-least-once needs the application to
    /// send again and to tolerate a duplicate); others as
    /// [`Requester::ask_owner`].
    pub async fn send_to_owner(
        &self,
        datum_type: &str,
        id: i64,
        msg: &T,
        timeout: Duration,
    ) -> Result<(), RequestError> {
        self.inner.ask_owner(datum_type, id, msg, timeout).await
    }

    /// Sends `msg` to the node named `node` and resolves once its
    /// application took it.
    ///
    /// # Errors
    /// As [`Requester::ask`].
    pub async fn send_to(
        &self,
        node: &str,
        msg: &T,
        timeout: Duration,
    ) -> Result<(), RequestError> {
        self.inner.ask(node, msg, timeout).await
    }
}

/// Receives the messages of an acknowledged channel; taking one
/// acknowledges it to its sender.
pub struct AckedReceiver<T> {
    inner: Requests<T, ()>,
}

impl<T> std::fmt::Debug for AckedReceiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AckedReceiver").finish_non_exhaustive()
    }
}

impl<T: DeserializeOwned> AckedReceiver<T> {
    /// The next message; its sender's call resolves as it is returned.
    /// `None` once the node is shut down.
    pub async fn recv(&mut self) -> Option<Received<T>> {
        let (from, datum, payload, reply) = self.inner.next_ask().await?;
        // The sender learns of the take; a failed acknowledgement (the
        // sender is gone) changes nothing here.
        let _ = reply.send(Ok(Vec::new())).await;
        Some(Received {
            from,
            datum,
            payload,
        })
    }

    /// Messages that did not decode as `T` so far.
    pub fn decode_errors(&self) -> u64 {
        self.inner.decode_errors()
    }
}

pub(crate) fn acked_channel<T>(
    pair: (Requester<T, ()>, Requests<T, ()>),
) -> (AckedSender<T>, AckedReceiver<T>) {
    (
        AckedSender { inner: pair.0 },
        AckedReceiver { inner: pair.1 },
    )
}
