//! Typed message channels, identified by a stable name.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_transport::{Dest, NodeName, WhenFull};
use tokio::sync::mpsc;

use crate::error::SendError;
use crate::node::Shared;

/// A message as it reaches a channel's queue (payload not decoded yet).
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) from: Arc<str>,
    pub(crate) datum: Option<(Arc<str>, i64)>,
    pub(crate) payload: Bytes,
}

pub(crate) struct ChannelEntry {
    pub(crate) tx: mpsc::Sender<Delivery>,
    pub(crate) name: Arc<str>,
}

/// The registered channels of a node, by id.
#[derive(Default)]
pub(crate) struct ChannelTable {
    pub(crate) map: RwLock<HashMap<u32, ChannelEntry>>,
}

impl ChannelTable {
    /// The queue of channel `id`, if registered.
    pub(crate) fn sender(&self, id: u32) -> Option<mpsc::Sender<Delivery>> {
        self.map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .map(|e| e.tx.clone())
    }

    /// The name of channel `id`, if registered.
    pub(crate) fn name(&self, id: u32) -> Option<Arc<str>> {
        self.map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&id)
            .map(|e| Arc::clone(&e.name))
    }

    fn remove(&self, id: u32) {
        self.map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&id);
    }
}

/// A message received on a typed channel.
///
/// A message sent to a datum's owner was delivered while this node held the
/// datum; by the time it is taken off the queue the datum may have been
/// relinquished. Check [`Node::holds`](crate::Node::holds) before acting as
/// the owner and send it on with [`Sender::send_to_owner`] if it is no longer
/// held (see [`DistDatum`](crate::DistDatum)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received<T> {
    /// The node the application sent it from.
    pub from: Arc<str>,
    /// For a message sent to a datum's owner: the datum (type, id).
    pub datum: Option<(Arc<str>, i64)>,
    /// The payload.
    pub payload: T,
}

/// Sends messages of type `T` on one channel. Cheap to clone.
pub struct Sender<T> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: u32,
    pub(crate) name: Arc<str>,
    pub(crate) _type: PhantomData<fn(T)>,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender {
            shared: Arc::clone(&self.shared),
            id: self.id,
            name: Arc::clone(&self.name),
            _type: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("channel", &self.name)
            .field("id", &self.id)
            .finish()
    }
}

impl<T: Serialize> Sender<T> {
    /// The channel's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `msg` to the node named `node` (this node too).
    ///
    /// Waits while the peer's send queue is full (at most the transport's
    /// send timeout). `Ok` means queued for the peer.
    ///
    /// # Errors
    /// [`SendError::UnknownNode`] when no live member has that name,
    /// [`SendError::Encode`], [`SendError::Transport`], [`SendError::Shutdown`].
    pub async fn send_to(&self, node: &str, msg: &T) -> Result<(), SendError> {
        let body = Bytes::from(postcard::to_allocvec(msg)?);
        self.send_bytes_to(node, body).await
    }

    pub(crate) async fn send_bytes_to(&self, node: &str, body: Bytes) -> Result<(), SendError> {
        let shared = &self.shared;
        if node == shared.name.as_str() {
            let tx = shared
                .channels
                .sender(self.id)
                .ok_or_else(|| SendError::UnknownNode(node.to_owned()))?;
            let delivery = Delivery {
                from: Arc::clone(&shared.name_arc),
                datum: None,
                payload: body,
            };
            return tx.send(delivery).await.map_err(|_| SendError::Shutdown);
        }
        let addr = {
            let view = shared.view_rx.borrow();
            view.member(node).map(|m| m.addr)
        };
        let addr = addr.ok_or_else(|| SendError::UnknownNode(node.to_owned()))?;
        let name = NodeName::new(node).map_err(|_| SendError::UnknownNode(node.to_owned()))?;
        shared
            .transport
            .send(&Dest::node(name, addr), self.id, body, WhenFull::Wait)
            .await?;
        Ok(())
    }

    /// Sends `msg` to the owner (primary) of datum `(datum_type, id)`.
    ///
    /// The node's driver routes it: processed here when this node owns the
    /// datum, sent to the owner otherwise. A node that receives it and is no
    /// longer the owner forwards it once more (at most
    /// `limits.max_forward_hops`); a node where the datum is in flight holds
    /// it and delivers it, once, when the handoff ends. Waits while the
    /// driver's owner queue (`limits.owner_queue`) is full. `Ok` means the
    /// driver took it.
    ///
    /// # Errors
    /// [`SendError::NoOwner`] when no ready node exists in the view in
    /// force, [`SendError::Encode`], [`SendError::Shutdown`].
    pub async fn send_to_owner(&self, datum_type: &str, id: i64, msg: &T) -> Result<(), SendError> {
        let body = Bytes::from(postcard::to_allocvec(msg)?);
        if self.shared.view_rx.borrow().placement.primary(id).is_none() {
            return Err(SendError::NoOwner {
                datum_type: datum_type.to_owned(),
                id,
            });
        }
        let routed = crate::wire::Routed {
            channel: self.id,
            datum_type: datum_type.to_owned(),
            id,
            origin: self.shared.name.as_str().to_owned(),
            hops: 0,
            payload: body,
        };
        self.shared
            .owner_tx
            .send(routed)
            .await
            .map_err(|_| SendError::Shutdown)
    }
}

/// Receives the messages of one channel, decoded. Dropping it unregisters
/// the channel (later messages for it are dropped and counted).
pub struct Receiver<T> {
    pub(crate) rx: mpsc::Receiver<Delivery>,
    pub(crate) table: Arc<ChannelTable>,
    pub(crate) id: u32,
    pub(crate) name: Arc<str>,
    pub(crate) decode_errors: Arc<AtomicU64>,
    pub(crate) _type: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("channel", &self.name)
            .field("id", &self.id)
            .finish()
    }
}

impl<T: DeserializeOwned> Receiver<T> {
    /// The next message. A payload that does not decode as `T` is skipped,
    /// counted ([`Receiver::decode_errors`]) and logged. `None` once the
    /// node is shut down.
    pub async fn recv(&mut self) -> Option<Received<T>> {
        loop {
            let d = self.rx.recv().await?;
            if let Some(r) = self.decode(d) {
                return Some(r);
            }
        }
    }

    /// A message if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<Received<T>> {
        loop {
            let d = self.rx.try_recv().ok()?;
            if let Some(r) = self.decode(d) {
                return Some(r);
            }
        }
    }

    fn decode(&self, d: Delivery) -> Option<Received<T>> {
        match postcard::from_bytes::<T>(&d.payload) {
            Ok(payload) => Some(Received {
                from: d.from,
                datum: d.datum,
                payload,
            }),
            Err(error) => {
                self.decode_errors.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("shoal_channel_decode_errors_total", "channel" => self.name.to_string())
                    .increment(1);
                tracing::debug!(channel = %self.name, from = %d.from, %error, "undecodable payload dropped");
                None
            }
        }
    }

    /// Payloads that did not decode as `T` so far.
    pub fn decode_errors(&self) -> u64 {
        self.decode_errors.load(Ordering::Relaxed)
    }

    /// The channel's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.table.remove(self.id);
    }
}
