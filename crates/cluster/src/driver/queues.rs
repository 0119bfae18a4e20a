//! Bounded queues out of the driver: one per peer, drained by a link task
//! (the driver only try-sends), the application's channels, and the
//! backlog of items that found their queue full. While the backlog is not
//! empty the driver takes no more routed messages, so the backlog holds at
//! most one batch of them.

use super::*;

/// One item for a peer's link task.
pub(crate) enum Out {
    Datagram(Dest, Bytes),
    Message(Dest, u32, Bytes),
}

/// An item waiting for room in a bounded queue (the driver's backlog).
pub(super) enum Pending {
    Local(mpsc::Sender<Delivery>, Delivery),
    Peer(SocketAddr, Out),
}

/// A sender to wait on for room, cloned out of the backlog's head.
pub(super) enum Room {
    Local(mpsc::Sender<Delivery>),
    Peer(mpsc::Sender<Out>),
}

pub(super) async fn wait_room(room: Option<Room>) {
    match room {
        Some(Room::Local(tx)) => {
            let _ = tx.reserve().await;
        }
        Some(Room::Peer(tx)) => {
            let _ = tx.reserve().await;
        }
        None => std::future::pending().await,
    }
}

impl Driver {
    pub(super) fn link(&mut self, addr: SocketAddr) -> mpsc::Sender<Out> {
        if let Some(tx) = self.links.get(&addr).filter(|tx| !tx.is_closed()) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(self.config.limits.peer_queue);
        tokio::spawn(link_task(
            self.transport.clone(),
            rx,
            Arc::clone(&self.name),
            Arc::clone(&self.counts),
        ));
        self.links.insert(addr, tx.clone());
        tx
    }

    /// Whether every peer's queue is empty.
    pub(super) fn links_idle(&self) -> bool {
        self.links
            .values()
            .all(|tx| tx.capacity() == tx.max_capacity())
    }

    pub(super) fn push(&mut self, item: Pending) {
        if self.backlog.is_empty() {
            if let Some(item) = self.try_push(item) {
                self.backlog.push_back(item);
            }
        } else {
            self.backlog.push_back(item);
        }
    }

    /// Tries to hand `item` to its queue; gives it back when the queue is full.
    fn try_push(&mut self, item: Pending) -> Option<Pending> {
        match item {
            Pending::Local(tx, d) => match tx.try_send(d) {
                Ok(()) => None,
                Err(mpsc::error::TrySendError::Full(d)) => Some(Pending::Local(tx, d)),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.counts.dropped(DropReason::ChannelClosed, 1);
                    None
                }
            },
            Pending::Peer(addr, out) => {
                let tx = self.link(addr);
                match tx.try_send(out) {
                    Ok(()) => None,
                    Err(mpsc::error::TrySendError::Full(out)) => Some(Pending::Peer(addr, out)),
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        self.counts.dropped(DropReason::LinkClosed, 1);
                        None
                    }
                }
            }
        }
    }

    pub(super) fn backlog_room(&mut self) -> Option<Room> {
        match self.backlog.front()? {
            Pending::Local(tx, _) => Some(Room::Local(tx.clone())),
            Pending::Peer(addr, _) => {
                let addr = *addr;
                Some(Room::Peer(self.link(addr)))
            }
        }
    }

    pub(super) fn flush_backlog(&mut self) {
        while let Some(item) = self.backlog.pop_front() {
            if let Some(item) = self.try_push(item) {
                self.backlog.push_front(item);
                return;
            }
        }
    }

    /// Routed messages waiting in the backlog.
    pub(super) fn backlog_routed(&self) -> usize {
        self.backlog
            .iter()
            .filter(|p| match p {
                Pending::Local(..) => true,
                Pending::Peer(_, Out::Message(_, ch, _)) => *ch == CH_ROUTED,
                Pending::Peer(..) => false,
            })
            .count()
    }

    /// Takes the routed messages out of the backlog (a leave's last step
    /// routes them again, as acknowledged forwards).
    pub(super) fn take_backlog_routed(&mut self) -> Vec<Bytes> {
        let mut routed = Vec::new();
        for item in std::mem::take(&mut self.backlog) {
            match item {
                Pending::Peer(_, Out::Message(_, CH_ROUTED, body)) => routed.push(body),
                other => self.backlog.push_back(other),
            }
        }
        routed
    }
}

/// `bytes` that keep `hold` alive as long as they (or a slice of them) live.
pub(super) fn holding(bytes: Bytes, hold: Bytes) -> Bytes {
    struct Holding {
        bytes: Bytes,
        _hold: Bytes,
    }
    impl AsRef<[u8]> for Holding {
        fn as_ref(&self) -> &[u8] {
            &self.bytes
        }
    }
    Bytes::from_owner(Holding { bytes, _hold: hold })
}

/// Items a link task takes from its queue at once.
const LINK_BATCH: usize = 256;
/// Largest batch of routed messages a link sends as one message: below the
/// transport's inline frame limit (larger messages get a stream each).
const ROUTED_BATCH_BYTES: usize = 4 * 1024;

/// Routed messages for one peer taken from the link's queue together, sent
/// as one [`RoutedBatch`] (or alone when there is just one).
#[derive(Default)]
struct Batch {
    dest: Option<Dest>,
    messages: Vec<Bytes>,
    bytes: usize,
}

/// Sends one peer's queued items through the transport, in order. The
/// routed messages that queued up together go as one batch: an idle link
/// sends each message alone at once, a busy one pays the transport's
/// per-message cost once per batch. A routed message the transport fails
/// to send is counted as dropped (`send_failed`).
pub(crate) async fn link_task(
    transport: Transport,
    mut rx: mpsc::Receiver<Out>,
    node: Arc<str>,
    counts: Arc<Counts>,
) {
    let mut buf = Vec::with_capacity(LINK_BATCH);
    let mut batch = Batch::default();
    while rx.recv_many(&mut buf, LINK_BATCH).await > 0 {
        for out in buf.drain(..) {
            match out {
                Out::Message(dest, CH_ROUTED, body)
                    if body.len() + RoutedBatch::ENTRY_OVERHEAD + RoutedBatch::HEADER
                        <= ROUTED_BATCH_BYTES =>
                {
                    let size = body.len() + RoutedBatch::ENTRY_OVERHEAD;
                    let other_dest = batch.dest.as_ref().is_some_and(|d| *d != dest);
                    if other_dest || batch.bytes + size + RoutedBatch::HEADER > ROUTED_BATCH_BYTES {
                        flush(&transport, &mut batch, &node, &counts).await;
                    }
                    batch.dest.get_or_insert(dest);
                    batch.bytes += size;
                    batch.messages.push(body);
                }
                out => {
                    flush(&transport, &mut batch, &node, &counts).await;
                    send_one(&transport, out, &node, &counts).await;
                }
            }
        }
        flush(&transport, &mut batch, &node, &counts).await;
    }
}

/// Sends the batch of routed messages: as one message, or each alone when
/// it holds one or the peer does not take batches (a node of a version
/// before them: [`wire::features::ROUTED_BATCH`]).
async fn flush(transport: &Transport, batch: &mut Batch, node: &str, counts: &Counts) {
    let Some(dest) = batch.dest.take() else {
        return;
    };
    let messages = std::mem::take(&mut batch.messages);
    batch.bytes = 0;
    match <[Bytes; 1]>::try_from(messages) {
        Ok([one]) => send_routed(transport, &dest, CH_ROUTED, one, 1, node, counts).await,
        Err(messages)
            if transport
                .peer_app_features(&dest)
                .is_some_and(|f| f & wire::features::ROUTED_BATCH != 0) =>
        {
            let n = messages.len() as u64;
            let body = RoutedBatch::encode(&messages);
            send_routed(transport, &dest, CH_ROUTED_BATCH, body, n, node, counts).await;
        }
        Err(messages) => {
            for one in messages {
                send_routed(transport, &dest, CH_ROUTED, one, 1, node, counts).await;
            }
        }
    }
}

/// Sends `n` routed messages as one transport message; counts them dropped
/// (`send_failed`) if that fails.
async fn send_routed(
    transport: &Transport,
    dest: &Dest,
    channel: u32,
    body: Bytes,
    n: u64,
    node: &str,
    counts: &Counts,
) {
    if let Err(error) = transport.send(dest, channel, body, WhenFull::Wait).await {
        metrics::counter!("shoal_send_failures_total", "kind" => "message").increment(1);
        debug!(%node, %dest, %error, messages = n, "routed messages not sent");
        counts.dropped(DropReason::SendFailed, n);
    }
}

async fn send_one(transport: &Transport, out: Out, node: &str, counts: &Counts) {
    let result = match &out {
        Out::Datagram(dest, payload) => transport.send_datagram(dest, payload).await,
        Out::Message(dest, channel, body) => {
            transport
                .send(dest, *channel, body.clone(), WhenFull::Wait)
                .await
        }
    };
    if let Err(error) = result {
        let (what, dest) = match &out {
            Out::Datagram(dest, _) => ("datagram", dest),
            Out::Message(dest, _, _) => ("message", dest),
        };
        metrics::counter!("shoal_send_failures_total", "kind" => what).increment(1);
        debug!(%node, %dest, %error, what, "send failed");
        if matches!(out, Out::Message(_, CH_ROUTED, _)) {
            counts.dropped(DropReason::SendFailed, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use shoal_transport::{TransportConfig, throwaway_cluster};

    use super::*;
    use crate::wire;

    /// Routed messages queued together for a peer that announced batches go
    /// as batches; for a peer of a version without them (its hello names no
    /// such feature), each goes alone on the routed channel.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_link_batches_only_for_peers_that_take_batches() {
        let hang = Duration::from_secs(20);
        let (_, ids) = throwaway_cluster(&["a", "new", "old"]).unwrap();
        let local = "127.0.0.1:0".parse().unwrap();
        let (a, _a_in) = Transport::bind(local, &ids[0], TransportConfig::default()).unwrap();
        let mut cfg = TransportConfig::default();
        cfg.app_features = wire::features::ALL;
        for (id, cfg, batched) in [
            (&ids[1], cfg, true),
            (&ids[2], TransportConfig::default(), false),
        ] {
            let (peer, mut peer_in) = Transport::bind(local, id, cfg).unwrap();
            let dest = Dest::node(peer.name().clone(), peer.local_addr());
            tokio::time::timeout(hang, a.connect(&dest))
                .await
                .unwrap()
                .unwrap();
            let (tx, rx) = mpsc::channel(64);
            for i in 0..20u8 {
                tx.try_send(Out::Message(
                    dest.clone(),
                    CH_ROUTED,
                    Bytes::from(vec![i; 10]),
                ))
                .unwrap();
            }
            drop(tx);
            let counts = Arc::new(Counts::default());
            let link = tokio::spawn(link_task(a.clone(), rx, Arc::from("a"), counts.clone()));
            let (mut routed, mut batches) = (Vec::new(), 0);
            while routed.len() < 20 {
                let m = tokio::time::timeout(hang, peer_in.recv_message())
                    .await
                    .unwrap()
                    .unwrap();
                match m.channel {
                    CH_ROUTED => routed.push(m.body),
                    CH_ROUTED_BATCH => {
                        batches += 1;
                        routed.extend(RoutedBatch::split(&m.body, 1 << 20).unwrap());
                    }
                    other => panic!("unexpected channel {other}"),
                }
            }
            tokio::time::timeout(hang, link).await.unwrap().unwrap();
            let want: Vec<Bytes> = (0..20u8).map(|i| Bytes::from(vec![i; 10])).collect();
            assert_eq!(routed, want, "in order, each once");
            assert_eq!(batches > 0, batched, "batches: {batches}");
        }
    }
}
