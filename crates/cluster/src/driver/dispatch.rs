//! The dispatcher: reads the transport's messages and hands each to its
//! consumer (membership, notices and routed messages to the driver, user
//! messages to their channel), and answers what it cannot hand over.

use super::*;

/// Answers a routed message sent as a request, in a task.
pub(super) fn answer_routed(reply: Option<Responder>, answer: &'static [u8]) {
    if let Some(reply) = reply {
        tokio::spawn(async move {
            let _ = reply.respond(Bytes::from_static(answer)).await;
        });
    }
}

/// Hands a routed message back to the node it came from: this node is
/// leaving and its driver has stopped. A request is answered
/// [`wire::ROUTED_REFUSED`]; a one-way message goes back in a [`Refusal`]
/// (a request: the other node answers once its driver routed it again).
/// Counted in `refusals_in_flight` until done, so the transport stays up.
pub(super) fn refuse(
    transport: &Transport,
    counts: &Arc<Counts>,
    from: &Peer,
    body: &Bytes,
    reply: Option<Responder>,
) {
    counts.refused();
    counts.refusals_in_flight.fetch_add(1, Ordering::SeqCst);
    let counts = Arc::clone(counts);
    if let Some(reply) = reply {
        tokio::spawn(async move {
            let _ = reply
                .respond(Bytes::from_static(wire::ROUTED_REFUSED))
                .await;
            counts.refusals_in_flight.fetch_sub(1, Ordering::SeqCst);
        });
        return;
    }
    let transport = transport.clone();
    let dest = Dest::node(from.name.clone(), from.addr);
    let frame = Refusal::encode_raw(RefuseReason::Leaving, body);
    tokio::spawn(async move {
        let answer = transport
            .request(&dest, CH_REFUSED, frame, REQUEST_TIMEOUT)
            .await;
        match answer {
            Ok(b) if &b[..] == wire::ROUTED_TAKEN => {}
            other => {
                debug!(%dest, ?other, "refused message not handed back");
                counts.dropped(DropReason::RefusalFailed, 1);
            }
        }
        counts.refusals_in_flight.fetch_sub(1, Ordering::SeqCst);
    });
}

/// Refuses every message of a batch (see [`refuse`]); a malformed batch is
/// counted and dropped.
pub(super) fn refuse_batch(transport: &Transport, counts: &Arc<Counts>, from: &Peer, body: &Bytes) {
    match RoutedBatch::split(body, usize::MAX) {
        Ok(messages) => {
            for m in &messages {
                refuse(transport, counts, from, m, None);
            }
        }
        Err(error) => {
            Counts::inc(&counts.malformed);
            counts.dropped(DropReason::Malformed, 1);
            debug!(%from, %error, "malformed batch of routed messages");
        }
    }
}

/// Answers a notice batch request, in a task (the answer is a stream write).
pub(super) fn answer(reply: Option<Responder>, ok: bool) {
    if let Some(reply) = reply {
        let answer = if ok {
            wire::NOTICE_ACK
        } else {
            wire::NOTICE_NACK
        };
        tokio::spawn(async move {
            let _ = reply.respond(Bytes::from_static(answer)).await;
        });
    }
}

/// Room found in a full user channel's queue (or the channel is closed).
type ChannelRoom = (
    u32,
    Result<mpsc::OwnedPermit<Delivery>, mpsc::error::SendError<()>>,
);

/// Peers' messages for user channels whose queue is full, waiting in order
/// (per channel) while the dispatcher goes on with other channels and
/// peers. Each holds its bytes in its sender's share of the data budget
/// (its body comes from `recv_held`), so the spill is bounded by that
/// budget, not by a count: a channel nobody reads pins at most the share
/// of each peer that sends to it, and those peers' data streams are then
/// read no further (QUIC pushes back on them).
#[derive(Default)]
struct Spill {
    /// By channel: its queue and the messages waiting for room in it.
    waiting: HashMap<u32, (mpsc::Sender<Delivery>, VecDeque<Delivery>)>,
    /// One task per waiting channel, waiting for room in its queue.
    room: tokio::task::JoinSet<ChannelRoom>,
}

impl Spill {
    /// Whether messages for channel `id` wait here (a new one goes after
    /// them).
    fn waits(&self, id: u32) -> bool {
        self.waiting.contains_key(&id)
    }

    fn push(&mut self, id: u32, delivery: Delivery) {
        if let Some((_, queue)) = self.waiting.get_mut(&id) {
            queue.push_back(delivery);
        }
    }

    /// Channel `id`'s queue is full: `delivery` waits, and so do the
    /// channel's next messages, until there is room.
    fn start(&mut self, id: u32, tx: mpsc::Sender<Delivery>, delivery: Delivery) {
        self.wait_for_room(id, &tx);
        self.waiting.insert(id, (tx, VecDeque::from([delivery])));
    }

    fn wait_for_room(&mut self, id: u32, tx: &mpsc::Sender<Delivery>) {
        let tx = tx.clone();
        self.room
            .spawn(async move { (id, tx.reserve_owned().await) });
    }

    /// Room in channel `id`'s queue: hands over what fits, in order.
    fn on_room(
        &mut self,
        id: u32,
        permit: Result<mpsc::OwnedPermit<Delivery>, mpsc::error::SendError<()>>,
        counts: &Counts,
    ) {
        let Some((tx, mut queue)) = self.waiting.remove(&id) else {
            return;
        };
        let Ok(permit) = permit else {
            // The application dropped the channel's receiver.
            counts.dropped(DropReason::ChannelClosed, queue.len() as u64);
            return;
        };
        if let Some(d) = queue.pop_front() {
            permit.send(d);
        }
        while let Some(d) = queue.pop_front() {
            match tx.try_send(d) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(d)) => {
                    queue.push_front(d);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    counts.dropped(DropReason::ChannelClosed, queue.len() as u64 + 1);
                    return;
                }
            }
        }
        if !queue.is_empty() {
            self.wait_for_room(id, &tx);
            self.waiting.insert(id, (tx, queue));
        }
    }
}

/// How often a user channel whose queue stays full is reported.
const CHANNEL_FULL_REPORT: Duration = Duration::from_secs(10);

/// A peer's message found user channel `id`'s queue full: counted, and
/// logged at warn (at most every [`CHANNEL_FULL_REPORT`] per channel).
fn channel_full(
    channels: &ChannelTable,
    counts: &Counts,
    id: u32,
    from: &Peer,
    reported: &mut HashMap<u32, Instant>,
) {
    Counts::inc(&counts.channel_full);
    let name = channels.name(id).unwrap_or_else(|| Arc::from("?"));
    metrics::counter!("shoal_channel_full_total", "channel" => name.to_string()).increment(1);
    let now = Instant::now();
    if reported
        .get(&id)
        .is_none_or(|&at| now.duration_since(at) >= CHANNEL_FULL_REPORT)
    {
        reported.insert(id, now);
        warn!(
            channel = %name,
            from = %from,
            "a channel's receive queue is full (its reader is not keeping up): peers' messages wait for it"
        );
    }
}

/// Reads the transport's messages and hands each to its consumer: internal
/// ones to the driver, user ones to their channel. Waits when a queue is
/// full, so the transport stops reading and QUIC pushes back on senders.
/// Runs as two tasks: one on the control messages (membership, notices),
/// one on the others, so that waiting for room in a user channel or the
/// owner-routed queue never delays control traffic.
///
/// Once a leaving node's driver has stopped (`counts.refusing`), it refuses
/// every routed message (hands it back to its sender) and keeps serving
/// user channels until the transport shuts down.
pub(super) async fn dispatch(
    mut messages: MessageReceiver,
    transport: Transport,
    channels: Arc<ChannelTable>,
    counts: Arc<Counts>,
    membership_tx: mpsc::Sender<(SocketAddr, NodeName, Bytes)>,
    notice_tx: mpsc::Sender<NoticeRequest>,
    routed_tx: mpsc::Sender<RoutedIn>,
) {
    // Bodies keep their inbound budget until their consumer drops them, so
    // the transport's byte budget (and each peer's share of it) bounds every
    // queue below as well: membership, notices, routed, user channels, held
    // and parked work.
    // When each user channel's full queue was last reported.
    let mut full_reported: HashMap<u32, Instant> = HashMap::new();
    let mut spill = Spill::default();
    loop {
        let m = tokio::select! {
            biased;
            Some(done) = spill.room.join_next(), if !spill.room.is_empty() => {
                if let Ok((id, permit)) = done {
                    spill.on_room(id, permit, &counts);
                }
                continue;
            }
            m = messages.recv_held() => m,
        };
        let Some(m) = m else { break };
        let refusing = counts.refusing.load(Ordering::SeqCst);
        let delivered = match m.channel {
            // The membership task outlives a closed driver until shutdown.
            CH_MEMBERSHIP => {
                membership_tx
                    .send((m.from.addr, m.from.name, m.body))
                    .await
                    .is_ok()
                    || refusing
            }
            CH_NOTICES if refusing => {
                answer(m.reply, false);
                true
            }
            CH_NOTICES => notice_tx
                .send(NoticeRequest(m.from, m.body, m.reply))
                .await
                .is_ok(),
            CH_ROUTED if refusing => {
                refuse(&transport, &counts, &m.from, &m.body, m.reply);
                true
            }
            CH_ROUTED => {
                if let Err(mpsc::error::SendError(item)) = routed_tx
                    .send(RoutedIn::Routed(m.from, m.body, m.reply))
                    .await
                    && let RoutedIn::Routed(from, body, reply) = item
                {
                    // The driver closed its queue as it stopped: refuse.
                    refuse(&transport, &counts, &from, &body, reply);
                }
                true
            }
            CH_ROUTED_BATCH if refusing => {
                refuse_batch(&transport, &counts, &m.from, &m.body);
                true
            }
            CH_ROUTED_BATCH => {
                if let Err(mpsc::error::SendError(item)) =
                    routed_tx.send(RoutedIn::Batch(m.from, m.body)).await
                    && let RoutedIn::Batch(from, body) = item
                {
                    refuse_batch(&transport, &counts, &from, &body);
                }
                true
            }
            CH_REFUSED if refusing => {
                answer_routed(m.reply, wire::ROUTED_REFUSED);
                true
            }
            CH_REFUSED => {
                if let Err(mpsc::error::SendError(item)) = routed_tx
                    .send(RoutedIn::Refused(m.from, m.body, m.reply))
                    .await
                    && let RoutedIn::Refused(_, _, reply) = item
                {
                    answer_routed(reply, wire::ROUTED_REFUSED);
                }
                true
            }
            id if id & USER_CHANNEL_BIT != 0 => {
                match channels.sender(id) {
                    Some(tx) => {
                        let delivery = Delivery {
                            from: Arc::from(m.from.name.as_str()),
                            datum: None,
                            payload: m.body,
                        };
                        if spill.waits(id) {
                            spill.push(id, delivery);
                            channel_full(&channels, &counts, id, &m.from, &mut full_reported);
                        } else {
                            match tx.try_send(delivery) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Closed(_)) => {
                                    counts.dropped(DropReason::ChannelClosed, 1);
                                }
                                Err(mpsc::error::TrySendError::Full(delivery)) => {
                                    spill.start(id, tx, delivery);
                                    channel_full(
                                        &channels,
                                        &counts,
                                        id,
                                        &m.from,
                                        &mut full_reported,
                                    );
                                }
                            }
                        }
                    }
                    None => {
                        metrics::counter!("shoal_unknown_channel_total").increment(1);
                        debug!(from = %m.from, channel = id, "message for an unregistered channel dropped");
                    }
                }
                true
            }
            other => {
                Counts::inc(&counts.malformed);
                debug!(from = %m.from, channel = other, "message on an unknown internal channel");
                true
            }
        };
        if !delivered {
            break;
        }
    }
}
