//! Tunables of an endpoint.

use std::time::Duration;

use crate::error::BindError;
use crate::frame::{INLINE_FRAME_MAX, LEN_PREFIX, MAX_HEADER_LEN};

/// What a send does when the peer's send queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WhenFull {
    /// Wait for room, at most [`TransportConfig::send_timeout`]
    /// ([`crate::TransportError::TimedOut`] after that).
    #[default]
    Wait,
    /// Fail at once with [`crate::TransportError::QueueFull`].
    Fail,
}

/// Configuration of a [`crate::Transport`]. Start from `Default` and change
/// fields; [`TransportConfig::validate`] runs when the endpoint starts.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TransportConfig {
    /// Largest message (uncompressed) this node sends or accepts. Larger is
    /// refused before anything is allocated or sent. Default 16 MiB; at least
    /// 64 KiB.
    pub max_message_size: usize,
    /// Messages at least this long are compressed with zstd (and sent
    /// compressed only when that makes them smaller). Default 1 KiB.
    pub compress_min: usize,
    /// zstd level. Default 1 (fast).
    pub compression_level: i32,
    /// Bytes of one-way messages queued for one peer and not yet written to
    /// QUIC. A full queue makes senders wait or fail ([`WhenFull`]).
    /// Default 4 MiB; at least 64 KiB.
    pub send_queue_bytes: usize,
    /// Capacity of the inbound message queue the application reads. When it
    /// is full, stream readers stop reading, so QUIC flow control pushes back
    /// on the senders: nothing is dropped. Default 8192.
    pub inbound_messages: usize,
    /// Capacity of the inbound datagram queue. When it is full, new datagrams
    /// are dropped and counted (`datagrams_dropped`): datagrams are
    /// unreliable by nature. Default 4096.
    pub inbound_datagrams: usize,
    /// Concurrent requests (and large one-way messages) a peer may have open
    /// towards this node; more wait on the peer's side. Default 256. QUIC
    /// counts a stream until its last bytes are acknowledged, so this also
    /// covers requests completed within the last ACK delay.
    pub max_concurrent_requests: u32,
    /// Time to establish and admit a connection. Default 5 s.
    pub handshake_timeout: Duration,
    /// Longest a send waits for a connection or queue room with
    /// [`WhenFull::Wait`]. Default 10 s.
    pub send_timeout: Duration,
    /// QUIC idle timeout: a connection that hears nothing (not even
    /// keep-alives) for this long is dead. Default 15 s.
    pub idle_timeout: Duration,
    /// QUIC keep-alive interval. Default 3 s.
    pub keep_alive: Duration,
    /// A connection with no application traffic for this long is closed to
    /// free its memory; it is reopened on demand. Default 60 s.
    pub idle_close: Duration,
    /// UDP socket send and receive buffer size asked from the kernel (it may
    /// cap it, see `net.core.rmem_max`). Default 4 MiB.
    pub socket_buffer_bytes: usize,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            max_message_size: 16 * 1024 * 1024,
            compress_min: 1024,
            compression_level: 1,
            send_queue_bytes: 4 * 1024 * 1024,
            inbound_messages: 8192,
            inbound_datagrams: 4096,
            max_concurrent_requests: 256,
            handshake_timeout: Duration::from_secs(5),
            send_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(15),
            keep_alive: Duration::from_secs(3),
            idle_close: Duration::from_secs(60),
            socket_buffer_bytes: 4 * 1024 * 1024,
        }
    }
}

impl TransportConfig {
    /// Checks every value is in range.
    ///
    /// # Errors
    /// [`BindError::Config`] naming the first bad field.
    pub fn validate(&self) -> Result<(), BindError> {
        let bad = |msg: &str| Err(BindError::Config(msg.to_owned()));
        if self.max_message_size < INLINE_FRAME_MAX {
            return bad("max_message_size must be at least 64 KiB");
        }
        if self.max_message_size > (u32::MAX as usize) - MAX_HEADER_LEN {
            return bad("max_message_size must be below 4 GiB");
        }
        if self.send_queue_bytes < INLINE_FRAME_MAX + LEN_PREFIX
            || self.send_queue_bytes > (u32::MAX >> 4) as usize
        {
            return bad("send_queue_bytes must be between 64 KiB and 256 MiB");
        }
        if self.inbound_messages == 0 || self.inbound_datagrams == 0 {
            return bad("inbound queue capacities must be positive");
        }
        if self.max_concurrent_requests == 0 {
            return bad("max_concurrent_requests must be positive");
        }
        if self.handshake_timeout.is_zero()
            || self.send_timeout.is_zero()
            || self.idle_close.is_zero()
        {
            return bad("timeouts must be positive");
        }
        if self.keep_alive.is_zero() || self.keep_alive >= self.idle_timeout {
            return bad("keep_alive must be positive and shorter than idle_timeout");
        }
        if quinn::IdleTimeout::try_from(self.idle_timeout).is_err() {
            return bad("idle_timeout is too long for QUIC");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::field_reassign_with_default)]
    fn default_is_valid_and_bad_values_are_refused() {
        assert!(TransportConfig::default().validate().is_ok());
        let mut c = TransportConfig::default();
        c.max_message_size = 1000;
        assert!(c.validate().is_err());
        let mut c = TransportConfig::default();
        c.keep_alive = c.idle_timeout;
        assert!(c.validate().is_err());
        let mut c = TransportConfig::default();
        c.send_queue_bytes = 10;
        assert!(c.validate().is_err());
    }
}
