//! An in-memory network for running QUIC endpoints without sockets.
//!
//! [`VirtualNetwork`] routes packets between [`VirtualSocket`]s by address,
//! in process. A `VirtualSocket` implements quinn's
//! [`quinn::AsyncUdpSocket`], so
//! [`Transport::with_socket`](crate::Transport::with_socket) runs a full
//! endpoint (TLS included) on it. quinn reads time through the tokio runtime,
//! so a paused tokio clock applies. Links can be cut to model partitions;
//! each socket's inbox is bounded and drops on overflow, like UDP.
//!
//! ```
//! use std::sync::Arc;
//! use shoal_transport::virtual_net::VirtualNetwork;
//!
//! let net = VirtualNetwork::new();
//! let a = net.bind("10.0.0.1:7000".parse().unwrap()).unwrap();
//! let b = net.bind("10.0.0.2:7000".parse().unwrap()).unwrap();
//! net.set_link(a.addr(), b.addr(), false); // partition a from b
//! # let _: (Arc<_>, Arc<_>) = (a, b);
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Packets an inbox holds before it drops new ones.
pub const INBOX_PACKETS: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Default)]
struct Inbox {
    packets: VecDeque<(SocketAddr, Vec<u8>)>,
    waker: Option<Waker>,
}

#[derive(Default)]
struct Net {
    sockets: HashMap<SocketAddr, Weak<Mutex<Inbox>>>,
    cut: HashSet<(SocketAddr, SocketAddr)>,
    dropped: u64,
    delivered: u64,
}

/// A set of virtual sockets that can reach each other. Cheap to clone.
#[derive(Clone, Default)]
pub struct VirtualNetwork {
    net: Arc<Mutex<Net>>,
}

impl fmt::Debug for VirtualNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let net = lock(&self.net);
        f.debug_struct("VirtualNetwork")
            .field("sockets", &net.sockets.len())
            .field("delivered", &net.delivered)
            .field("dropped", &net.dropped)
            .finish()
    }
}

impl VirtualNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds a socket at `addr`.
    ///
    /// # Errors
    /// `AddrInUse` if a live socket already has that address.
    pub fn bind(&self, addr: SocketAddr) -> io::Result<Arc<VirtualSocket>> {
        let mut net = lock(&self.net);
        if net.sockets.get(&addr).is_some_and(|w| w.strong_count() > 0) {
            return Err(io::Error::new(io::ErrorKind::AddrInUse, addr.to_string()));
        }
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        net.sockets.insert(addr, Arc::downgrade(&inbox));
        Ok(Arc::new(VirtualSocket {
            addr,
            inbox,
            net: self.net.clone(),
        }))
    }

    /// Cuts (`up == false`) or restores the link between `a` and `b`, both
    /// directions.
    pub fn set_link(&self, a: SocketAddr, b: SocketAddr, up: bool) {
        let mut net = lock(&self.net);
        if up {
            net.cut.remove(&(a, b));
            net.cut.remove(&(b, a));
        } else {
            net.cut.insert((a, b));
            net.cut.insert((b, a));
        }
    }

    /// Packets delivered and dropped so far (cut link, no socket, full inbox).
    pub fn counts(&self) -> (u64, u64) {
        let net = lock(&self.net);
        (net.delivered, net.dropped)
    }
}

/// One socket of a [`VirtualNetwork`].
pub struct VirtualSocket {
    addr: SocketAddr,
    inbox: Arc<Mutex<Inbox>>,
    net: Arc<Mutex<Net>>,
}

impl fmt::Debug for VirtualSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtualSocket")
            .field("addr", &self.addr)
            .finish()
    }
}

impl VirtualSocket {
    /// The socket's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn deliver(&self, to: SocketAddr, packet: &[u8]) {
        let target = {
            let mut net = lock(&self.net);
            let target = if net.cut.contains(&(self.addr, to)) {
                None
            } else {
                net.sockets.get(&to).and_then(Weak::upgrade)
            };
            if target.is_none() {
                net.dropped += 1;
            }
            target
        };
        let Some(target) = target else { return };
        let waker = {
            let mut inbox = lock(&target);
            if inbox.packets.len() >= INBOX_PACKETS {
                drop(inbox);
                lock(&self.net).dropped += 1;
                return;
            }
            inbox.packets.push_back((self.addr, packet.to_vec()));
            inbox.waker.take()
        };
        lock(&self.net).delivered += 1;
        if let Some(w) = waker {
            w.wake();
        }
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for VirtualSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        // One segment per packet (max_transmit_segments is 1), but honour a
        // segment size if quinn gives one.
        match transmit.segment_size {
            Some(size) if size > 0 => {
                for segment in transmit.contents.chunks(size) {
                    self.deliver(transmit.destination, segment);
                }
            }
            _ => self.deliver(transmit.destination, transmit.contents),
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut inbox = lock(&self.inbox);
        let mut n = 0;
        for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()) {
            let Some((from, packet)) = inbox.packets.pop_front() else {
                break;
            };
            let len = packet.len().min(buf.len());
            if let (Some(dst), Some(src)) = (buf.get_mut(..len), packet.get(..len)) {
                dst.copy_from_slice(src);
            }
            *meta = RecvMeta {
                addr: from,
                len,
                stride: len,
                ecn: None,
                dst_ip: Some(self.addr.ip()),
            };
            n += 1;
        }
        if n == 0 {
            inbox.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

impl Drop for VirtualSocket {
    fn drop(&mut self) {
        let mut net = lock(&self.net);
        if net
            .sockets
            .get(&self.addr)
            .is_some_and(|w| w.strong_count() == 0)
        {
            net.sockets.remove(&self.addr);
        }
    }
}
