//! Inbound budgets: what decoded data from peers may cost this node.
//!
//! Every inbound message is charged, before its body is read or decompressed,
//! the decompressed size its header announces plus [`MESSAGE_OVERHEAD`]
//! against the endpoint-wide byte budget and the sender's share of it, and
//! one slot of the sender's share of the message queue. The charge travels
//! with the message through the inbound queue and is released when the
//! application takes the message from [`crate::Incoming`] (or, taken with
//! [`crate::MessageReceiver::recv_held`], when its body is dropped). A reader that
//! cannot be charged waits, which stops it reading its stream: QUIC flow
//! control then pushes back on the sender. Responses to this node's requests
//! have a budget of their own (they are taken by the requester, not from the
//! queue, so they must not wait behind it), and datagrams a per-peer share of
//! the datagram queue.
//!
//! Messages on control channels ([`crate::TransportConfig::control_channels`])
//! are charged to a byte budget of their own, with its own per-peer shares
//! (bytes and queue slots), so messages on other channels that nobody
//! consumes never make control traffic wait.
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
    control_bytes: Arc<Semaphore>,
    control_messages: Arc<Semaphore>,
}

/// Which budget a message is charged to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Any channel but a control channel.
    Data,
    /// A control channel.
    Control,
}

/// The endpoint-wide inbound budgets and every peer's shares of them.
#[derive(Debug)]
pub(crate) struct Budgets {
    bytes: Arc<Semaphore>,
    bytes_total: usize,
    control: Arc<Semaphore>,
    control_total: usize,
    peer_control: usize,
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

/// Budget held by inbound messages (or a response) until the application
/// takes them: dropping it gives the bytes and the queue slots back. The
/// messages decoded from one read of the shared stream share one charge
/// (released when the last of them is taken: never sooner than each one's
/// own), which keeps the cost per message low; a consumer that holds a
/// body further splits the message's own part off (`split_off`).
#[derive(Debug)]
pub(crate) struct Charge {
    global: Arc<Semaphore>,
    peer: Arc<Semaphore>,
    slots: Arc<Semaphore>,
    bytes: usize,
    nslots: usize,
    share: Arc<PeerBudget>,
}

impl Charge {
    /// The peer's shares this charge draws on.
    pub(crate) fn share(&self) -> &Arc<PeerBudget> {
        &self.share
    }

    /// Gives back all but `keep` bytes (after decompression freed the
    /// compressed body).
    pub(crate) fn shrink_to(&mut self, keep: usize) {
        let extra = self.bytes.saturating_sub(keep);
        self.give_back(extra, 0);
    }

    /// Moves up to `bytes` of this charge into a charge of their own (the
    /// budgets neither grow nor shrink) and gives one queue slot back: a
    /// message taken from the inbound queue by a consumer that holds its
    /// body further. Its bytes stay charged until that body is dropped,
    /// independently of the messages decoded with it.
    pub(crate) fn split_off(&mut self, bytes: usize) -> Charge {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        self.give_back(0, 1);
        Charge {
            global: Arc::clone(&self.global),
            peer: Arc::clone(&self.peer),
            slots: Arc::clone(&self.slots),
            bytes,
            nslots: 0,
            share: Arc::clone(&self.share),
        }
    }

    /// Gives back `bytes` and `slots` (a message charged, then refused).
    pub(crate) fn give_back(&mut self, bytes: usize, slots: usize) {
        let bytes = bytes.min(self.bytes);
        let slots = slots.min(self.nslots);
        if bytes > 0 {
            self.bytes -= bytes;
            self.global.add_permits(bytes);
            self.peer.add_permits(bytes);
        }
        if slots > 0 {
            self.nslots -= slots;
            self.slots.add_permits(slots);
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.give_back(self.bytes, self.nslots);
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
            control: Arc::new(Semaphore::new(config.control_bytes)),
            control_total: config.control_bytes,
            peer_control: config.peer_share(config.control_bytes),
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
            control_bytes: Arc::new(Semaphore::new(self.peer_control)),
            control_messages: Arc::new(Semaphore::new(self.peer_messages)),
        });
        peers.insert(name.clone(), Arc::downgrade(&share));
        share
    }

    /// An empty charge for messages of `share`'s peer, to add to.
    pub(crate) fn empty(&self, share: &Arc<PeerBudget>, class: Class) -> Charge {
        let (global, peer, slots) = match class {
            Class::Data => (&self.bytes, &share.bytes, &share.messages),
            Class::Control => (&self.control, &share.control_bytes, &share.control_messages),
        };
        Charge {
            global: global.clone(),
            peer: peer.clone(),
            slots: slots.clone(),
            bytes: 0,
            nslots: 0,
            share: share.clone(),
        }
    }

    /// The share of a peer in the budget `charge` draws on.
    fn share_of(&self, charge: &Charge) -> usize {
        if Arc::ptr_eq(&charge.global, &self.control) {
            self.peer_control
        } else {
            self.peer_bytes
        }
    }

    /// Adds a message of `bytes` (overhead included) to `charge` if the
    /// budgets have room now.
    pub(crate) fn try_add(&self, charge: &mut Charge, bytes: usize) -> bool {
        let n = to_u32(bytes.min(self.share_of(charge)));
        let Ok(slot) = charge.slots.try_acquire() else {
            return false;
        };
        let Ok(peer) = charge.peer.try_acquire_many(n) else {
            return false;
        };
        let Ok(global) = charge.global.try_acquire_many(n) else {
            return false;
        };
        slot.forget();
        peer.forget();
        global.forget();
        charge.bytes += n as usize;
        charge.nslots += 1;
        true
    }

    /// Charges a message of `bytes` (overhead included) if the budgets have
    /// room now.
    pub(crate) fn try_message(
        &self,
        share: &Arc<PeerBudget>,
        class: Class,
        bytes: usize,
    ) -> Option<Charge> {
        let mut charge = self.empty(share, class);
        if !self.try_add(&mut charge, bytes) {
            return None;
        }
        self.note_peak();
        Some(charge)
    }

    /// Charges a message of `bytes` (overhead included), waiting for room:
    /// first in the sender's shares, then in the endpoint's budget. `None`
    /// only if a budget was closed (never, in practice).
    pub(crate) async fn message(
        &self,
        share: &Arc<PeerBudget>,
        class: Class,
        bytes: usize,
    ) -> Option<Charge> {
        let mut charge = self.empty(share, class);
        let n = to_u32(bytes.min(self.share_of(&charge)));
        let slot = charge.slots.acquire().await.ok()?;
        let peer = charge.peer.acquire_many(n).await.ok()?;
        let global = charge.global.acquire_many(n).await.ok()?;
        slot.forget();
        peer.forget();
        global.forget();
        charge.bytes = n as usize;
        charge.nslots = 1;
        self.peak.fetch_max(self.charged(), Ordering::Relaxed);
        Some(charge)
    }

    /// Charges a response being read and decoded, waiting for room.
    pub(crate) async fn response(&self, share: &Arc<PeerBudget>, bytes: usize) -> Option<Charge> {
        let mut charge = Charge {
            global: self.responses.clone(),
            peer: share.responses.clone(),
            slots: share.messages.clone(),
            bytes: 0,
            nslots: 0,
            share: share.clone(),
        };
        let n = to_u32(bytes.min(self.peer_responses));
        let peer = charge.peer.acquire_many(n).await.ok()?;
        let global = charge.global.acquire_many(n).await.ok()?;
        peer.forget();
        global.forget();
        charge.bytes = n as usize;
        Some(charge)
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

    /// Records the current charge in the high-water mark (called once per
    /// batch of messages queued, and for every message charged alone).
    pub(crate) fn note_peak(&self) {
        self.peak.fetch_max(self.charged(), Ordering::Relaxed);
    }

    /// The most bytes of inbound messages ever charged at once.
    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Bytes of inbound messages on control channels charged right now.
    pub(crate) fn control_charged(&self) -> usize {
        self.control_total
            .saturating_sub(self.control.available_permits())
    }

    /// Of the data bytes charged, those charged to the peer called `name`.
    pub(crate) fn charged_by(&self, name: &NodeName) -> usize {
        lock(&self.peers)
            .get(name)
            .and_then(Weak::upgrade)
            .map_or(0, |s| {
                self.peer_bytes.saturating_sub(s.bytes.available_permits())
            })
    }

    /// Bytes of control messages charged to the peer called `name`.
    pub(crate) fn control_charged_by(&self, name: &NodeName) -> usize {
        lock(&self.peers)
            .get(name)
            .and_then(Weak::upgrade)
            .map_or(0, |s| {
                self.peer_control
                    .saturating_sub(s.control_bytes.available_permits())
            })
    }
}
