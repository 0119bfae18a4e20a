//! Inbound budgets: what decoded data from peers may cost this node.
//!
//! Every inbound message is charged, before its body is read or decompressed,
//! the decompressed size its header announces plus [`MESSAGE_OVERHEAD`]
//! against the endpoint-wide byte budget and the sender's share of it, and
//! one slot of the sender's share of the message queue. The charge travels
//! with the message through the inbound queue and is released when the
//! application takes the message from [`crate::Incoming`]. A reader that
//! cannot be charged waits, which stops it reading its stream: QUIC flow
//! control then pushes back on the sender. Responses to this node's requests
//! have a budget of their own (they are taken by the requester, not from the
//! queue, so they must not wait behind it), and datagrams a per-peer share of
//! the datagram queue.
//!
//! Shares are per node name, not per connection: a peer gets no more by
//! opening more connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::TransportConfig;
use crate::frame;
use crate::name::NodeName;

/// Bytes charged for every inbound message on top of its decompressed size
/// (its bookkeeping: sender, channel, queue slot), so that a flood of empty
/// messages is bounded in bytes too.
pub const MESSAGE_OVERHEAD: usize = 128;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One peer's shares of the endpoint-wide budgets.
#[derive(Debug)]
pub(crate) struct PeerBudget {
    bytes: Arc<Semaphore>,
    messages: Arc<Semaphore>,
    datagrams: Arc<Semaphore>,
    responses: Arc<Semaphore>,
}

/// The endpoint-wide inbound budgets and every peer's shares of them.
#[derive(Debug)]
pub(crate) struct Budgets {
    bytes: Arc<Semaphore>,
    bytes_total: usize,
    responses: Arc<Semaphore>,
    peer_bytes: usize,
    peer_messages: usize,
    peer_datagrams: usize,
    peer_responses: usize,
    /// Most bytes ever charged at once.
    peak: AtomicUsize,
    /// Shares by node name; an entry lives while a connection or a charge
    /// of that peer does.
    peers: Mutex<HashMap<NodeName, Weak<PeerBudget>>>,
}

/// Budget held by one inbound message (or response) until the application
/// takes it: dropping it gives the bytes (and the queue slot) back.
#[derive(Debug)]
pub(crate) struct Charge {
    global: OwnedSemaphorePermit,
    peer: OwnedSemaphorePermit,
    _slot: Option<OwnedSemaphorePermit>,
    _share: Arc<PeerBudget>,
}

impl Charge {
    /// Gives back all but `keep` bytes (after decompression freed the
    /// compressed body).
    pub(crate) fn shrink_to(&mut self, keep: usize) {
        let extra = self.global.num_permits().saturating_sub(keep);
        if extra > 0 {
            drop(self.global.split(extra));
            drop(self.peer.split(extra));
        }
    }
}

/// A datagram's slot in its sender's share of the datagram queue.
pub(crate) type DatagramSlot = OwnedSemaphorePermit;

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Budgets {
    pub(crate) fn new(config: &TransportConfig) -> Self {
        let responses = frame::max_frame_len(config.max_message_size).saturating_mul(2);
        Self {
            bytes: Arc::new(Semaphore::new(config.inbound_bytes)),
            bytes_total: config.inbound_bytes,
            responses: Arc::new(Semaphore::new(responses)),
            peer_bytes: config.peer_share(config.inbound_bytes),
            peer_messages: config.peer_share(config.inbound_messages),
            peer_datagrams: config.peer_share(config.inbound_datagrams),
            // One response of the largest size at a time per peer.
            peer_responses: frame::max_frame_len(config.max_message_size),
            peak: AtomicUsize::new(0),
            peers: Mutex::new(HashMap::new()),
        }
    }

    /// The shares of the peer called `name` (shared by all its connections).
    pub(crate) fn peer(&self, name: &NodeName) -> Arc<PeerBudget> {
        let mut peers = lock(&self.peers);
        if let Some(share) = peers.get(name).and_then(Weak::upgrade) {
            return share;
        }
        peers.retain(|_, w| w.strong_count() > 0);
        let share = Arc::new(PeerBudget {
            bytes: Arc::new(Semaphore::new(self.peer_bytes)),
            messages: Arc::new(Semaphore::new(self.peer_messages)),
            datagrams: Arc::new(Semaphore::new(self.peer_datagrams)),
            responses: Arc::new(Semaphore::new(self.peer_responses)),
        });
        peers.insert(name.clone(), Arc::downgrade(&share));
        share
    }

    /// Charges a message of `bytes` (overhead included) if the budgets have
    /// room now.
    pub(crate) fn try_message(&self, share: &Arc<PeerBudget>, bytes: usize) -> Option<Charge> {
        let n = to_u32(bytes.min(self.peer_bytes));
        let slot = share.messages.clone().try_acquire_owned().ok()?;
        let peer = share.bytes.clone().try_acquire_many_owned(n).ok()?;
        let global = self.bytes.clone().try_acquire_many_owned(n).ok()?;
        self.peak.fetch_max(self.charged(), Ordering::Relaxed);
        Some(Charge {
            global,
            peer,
            _slot: Some(slot),
            _share: share.clone(),
        })
    }

    /// Charges a message of `bytes` (overhead included), waiting for room:
    /// first in the sender's shares, then in the endpoint's budget. `None`
    /// only if a budget was closed (never, in practice).
    pub(crate) async fn message(&self, share: &Arc<PeerBudget>, bytes: usize) -> Option<Charge> {
        let n = to_u32(bytes.min(self.peer_bytes));
        let slot = share.messages.clone().acquire_owned().await.ok()?;
        let peer = share.bytes.clone().acquire_many_owned(n).await.ok()?;
        let global = self.bytes.clone().acquire_many_owned(n).await.ok()?;
        self.peak.fetch_max(self.charged(), Ordering::Relaxed);
        Some(Charge {
            global,
            peer,
            _slot: Some(slot),
            _share: share.clone(),
        })
    }

    /// Charges a response being read and decoded, waiting for room.
    pub(crate) async fn response(&self, share: &Arc<PeerBudget>, bytes: usize) -> Option<Charge> {
        let n = to_u32(bytes.min(self.peer_responses));
        let peer = share.responses.clone().acquire_many_owned(n).await.ok()?;
        let global = self.responses.clone().acquire_many_owned(n).await.ok()?;
        Some(Charge {
            global,
            peer,
            _slot: None,
            _share: share.clone(),
        })
    }

    /// A slot for a datagram from this peer, if its share of the datagram
    /// queue has room.
    pub(crate) fn try_datagram(share: &PeerBudget) -> Option<DatagramSlot> {
        share.datagrams.clone().try_acquire_owned().ok()
    }

    /// Bytes of inbound messages charged right now (read, decoded or queued,
    /// not yet taken by the application).
    pub(crate) fn charged(&self) -> usize {
        self.bytes_total
            .saturating_sub(self.bytes.available_permits())
    }

    /// The most bytes of inbound messages ever charged at once.
    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Of those, the bytes charged to the peer called `name`.
    pub(crate) fn charged_by(&self, name: &NodeName) -> usize {
        lock(&self.peers)
            .get(name)
            .and_then(Weak::upgrade)
            .map_or(0, |s| {
                self.peer_bytes.saturating_sub(s.bytes.available_permits())
            })
    }
}
