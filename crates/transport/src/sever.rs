//! A socket that can be cut off the network at once: the abrupt stop of a
//! process, for tests and fault drills ([`Transport::sever`]).
//!
//! [`Transport::sever`]: crate::Transport::sever

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Wraps the endpoint's socket. Until it is severed every call goes to the
/// inner socket; once severed, sends are dropped (reported as sent, as a
/// network that loses them would) and received packets are discarded.
pub(crate) struct SeverableSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    severed: Arc<AtomicBool>,
}

impl SeverableSocket {
    pub(crate) fn new(inner: Arc<dyn AsyncUdpSocket>, severed: Arc<AtomicBool>) -> Self {
        SeverableSocket { inner, severed }
    }

    fn severed(&self) -> bool {
        self.severed.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for SeverableSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SeverableSocket")
            .field("severed", &self.severed())
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for SeverableSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Arc::clone(&self.inner).create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if self.severed() {
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.inner.poll_recv(cx, bufs, meta) {
                // Drain and discard until the inner socket has nothing more
                // (it then registered the waker and returns Pending).
                Poll::Ready(Ok(_)) if self.severed() => continue,
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}
