//! Tunables of an endpoint.

use std::time::Duration;

use crate::error::BindError;
use crate::frame::{self, INLINE_FRAME_MAX, LEN_PREFIX, MAX_HEADER_LEN};

/// Caps of one channel's inbound messages, tighter than the node-wide
/// [`TransportConfig::max_message_size`] and [`TransportConfig::max_ratio`]
/// (for instance, looser ratio for a channel carrying large, repetitive
/// state). See [`TransportConfig::channel_caps`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelCap {
    /// The channel id.
    pub channel: u32,
    /// Largest message on the channel, decompressed (cut to
    /// `max_message_size`).
    pub max_size: usize,
    /// Largest decompressed / compressed ratio of a compressed message on the
    /// channel.
    pub max_ratio: u32,
}

/// Bi streams of a peer's [`TransportConfig::max_concurrent_requests`] that
/// requests and large one-way messages on data channels leave free for
/// control channels (at most half of them), so that a peer whose
/// application holds many requests unanswered still gets its control
/// traffic through. Nodes of a cluster are assumed to share that setting.
pub const CONTROL_STREAMS: u32 = 16;

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
    /// Channels whose messages are never compressed, whatever their size:
    /// for traffic where compressing costs more CPU than it saves (many
    /// small messages sent together on a fast network). Default empty.
    pub plain_channels: Vec<u32>,
    /// Features of the application above the transport, announced to every
    /// peer in the hello, for the application to read a peer's with
    /// [`crate::Transport::peer_app_features`] before it uses one (so that
    /// nodes of two versions can run in one cluster). Default 0.
    pub app_features: u32,
    /// Bytes of one-way messages queued for one peer and not yet written to
    /// QUIC. A full queue makes senders wait or fail ([`WhenFull`]).
    /// Default 4 MiB; at least 64 KiB.
    pub send_queue_bytes: usize,
    /// Capacity of the inbound message queue the application reads, in
    /// messages. When it is full, stream readers stop reading, so QUIC flow
    /// control pushes back on the senders: nothing is dropped. One peer may
    /// hold at most [`TransportConfig::peer_share_percent`] of it. Default
    /// 8192.
    pub inbound_messages: usize,
    /// Bytes of inbound messages (decompressed, plus
    /// [`crate::MESSAGE_OVERHEAD`] each) decoded or being read and not yet
    /// taken by the application. A message is charged from the size its
    /// header announces before its body is read or decompressed, and
    /// released when the application receives it. When the budget (or the
    /// sender's share) is used up, stream readers stop reading and QUIC flow
    /// control pushes back on the senders: nothing is dropped. Default
    /// 64 MiB; the per-peer share must hold one message of
    /// `max_message_size`.
    pub inbound_bytes: usize,
    /// Percentage of each endpoint-wide inbound budget (message bytes,
    /// message count, datagram count, response bytes) one peer may hold, so
    /// that others still make progress. Default 50.
    pub peer_share_percent: u8,
    /// Capacity of the inbound datagram queue. When it is full, or the
    /// sender's share of it is, new datagrams are dropped and counted
    /// (`datagrams_dropped`): datagrams are unreliable by nature. Default
    /// 4096.
    pub inbound_datagrams: usize,
    /// Largest decompressed / compressed ratio of a compressed message, on
    /// channels without an entry in [`TransportConfig::channel_caps`]. A
    /// frame above it is refused before decompression (`frames_over_ratio`);
    /// a sender never compresses beyond its own caps (it sends plain
    /// instead). Default 64.
    pub max_ratio: u32,
    /// Per-channel caps on inbound messages (size and ratio); channels not
    /// listed get `max_message_size` and `max_ratio`. Messages on the shared
    /// stream are at most 64 KiB decompressed whatever their channel. A
    /// frame over its cap is refused with `TOO_LARGE` (`frames_too_large`).
    /// Default empty.
    pub channel_caps: Vec<ChannelCap>,
    /// Control channels: their inbound messages are charged to a budget of
    /// their own ([`TransportConfig::control_bytes`], the same per-peer
    /// share) and queued apart from the others (read first by
    /// [`crate::Incoming`], or from a receiver of their own with
    /// [`crate::MessageReceiver::take_control`]), so messages on other
    /// channels that nobody consumes never make them wait. On the sending
    /// side their one-way messages get a QUIC stream of their own at a
    /// higher priority rather than the shared message stream, and their
    /// requests too get the higher priority; requests and large messages
    /// on other channels leave [`CONTROL_STREAMS`] of the peer's
    /// concurrent bi streams free for them. Meant for a node's own
    /// protocol traffic (few messages, each bounded by a
    /// [`ChannelCap`]). Default empty.
    pub control_channels: Vec<u32>,
    /// Bytes of inbound messages on control channels read, decoded or
    /// queued and not yet taken, endpoint-wide (one peer to
    /// [`TransportConfig::peer_share_percent`]), charged like
    /// [`TransportConfig::inbound_bytes`] but apart from it. When it (or the
    /// sender's share) is full, that peer's control streams wait (QUIC flow
    /// control); nothing is dropped. Its per-peer share should hold the
    /// largest control message twice (compressed and decompressed, as it
    /// is charged while decompressing); a message is never charged more
    /// than the share. Default 16 MiB.
    pub control_bytes: usize,
    /// A frame must arrive completely within this time from its first byte
    /// (not counting time this node makes it wait for budget); otherwise its
    /// stream is dropped (`frames_timed_out`). A bi stream must also deliver
    /// its first frame within this time of being opened. Default 20 s.
    pub frame_timeout: Duration,
    /// Frames refused (over a cap or ratio, or timed out) on one connection
    /// before the connection is closed (`connections_closed_for_abuse`).
    /// Default 8.
    pub max_refusals: u32,
    /// Concurrent requests (and large one-way messages) a peer may have open
    /// towards this node on streams of their own; more wait on the peer's
    /// side. Also bounds this node's requests on data channels in flight to
    /// a peer, on the shared requests stream or not (this value less
    /// [`CONTROL_STREAMS`]; nodes of a cluster are assumed to share it).
    /// Default 256. QUIC
    /// counts a stream until its last bytes are acknowledged, so this also
    /// covers requests completed within the last ACK delay. A connection
    /// starts by allowing 16 and doubles the allowance whenever the work in
    /// progress on it reaches a quarter of it, up to this value: quinn keeps
    /// table entries for every allowed stream (about 170 bytes each for both
    /// ends), which an idle connection does not pay for.
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
            plain_channels: Vec::new(),
            app_features: 0,
            send_queue_bytes: 4 * 1024 * 1024,
            inbound_messages: 8192,
            inbound_bytes: 64 * 1024 * 1024,
            peer_share_percent: 50,
            inbound_datagrams: 4096,
            max_ratio: 64,
            channel_caps: Vec::new(),
            control_channels: Vec::new(),
            control_bytes: 16 * 1024 * 1024,
            frame_timeout: Duration::from_secs(20),
            max_refusals: 8,
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
        if self.peer_share_percent == 0 || self.peer_share_percent > 100 {
            return bad("peer_share_percent must be between 1 and 100");
        }
        if self.peer_share(self.inbound_bytes)
            < frame::max_frame_len(self.max_message_size) + crate::MESSAGE_OVERHEAD
        {
            return bad(
                "inbound_bytes x peer_share_percent must hold one message of max_message_size",
            );
        }
        if self.inbound_bytes > u32::MAX as usize || self.control_bytes > u32::MAX as usize {
            return bad("inbound_bytes and control_bytes must be below 4 GiB");
        }
        if self.control_bytes == 0 {
            return bad("control_bytes must be positive");
        }
        if self.max_ratio == 0 || self.channel_caps.iter().any(|c| c.max_ratio == 0) {
            return bad("compression ratios must be positive");
        }
        if self.frame_timeout.is_zero() || self.max_refusals == 0 {
            return bad("frame_timeout and max_refusals must be positive");
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

    /// One peer's share of an endpoint-wide budget of `total` (at least 1).
    pub(crate) fn peer_share(&self, total: usize) -> usize {
        (total / 100)
            .saturating_mul(usize::from(self.peer_share_percent))
            .saturating_add(total % 100 * usize::from(self.peer_share_percent) / 100)
            .max(1)
    }

    /// Whether `channel` is a control channel.
    pub(crate) fn is_control(&self, channel: u32) -> bool {
        self.control_channels.contains(&channel)
    }

    /// Bi streams to a peer that data channels may have open at once.
    pub(crate) fn data_streams(&self) -> usize {
        let reserved = CONTROL_STREAMS.min(self.max_concurrent_requests / 2);
        (self.max_concurrent_requests - reserved).max(1) as usize
    }

    /// The caps of every channel, as the frame decoder takes them.
    pub(crate) fn caps(&self) -> frame::Caps {
        let overrides: Vec<_> = self
            .channel_caps
            .iter()
            .map(|c| {
                (
                    c.channel,
                    frame::Cap {
                        max_size: c.max_size,
                        max_ratio: c.max_ratio,
                    },
                )
            })
            .collect();
        frame::Caps::new(self.max_message_size, self.max_ratio, &overrides)
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
        let mut c = TransportConfig::default();
        c.inbound_bytes = c.max_message_size;
        assert!(
            c.validate().is_err(),
            "a peer's share must hold one message"
        );
        let mut c = TransportConfig::default();
        c.peer_share_percent = 0;
        assert!(c.validate().is_err());
        let mut c = TransportConfig::default();
        c.control_bytes = 0;
        assert!(c.validate().is_err());
        let mut c = TransportConfig::default();
        assert_eq!(c.data_streams(), 256 - CONTROL_STREAMS as usize);
        c.max_concurrent_requests = 4;
        assert_eq!(c.data_streams(), 2, "at most half kept for control");
        c.max_concurrent_requests = 1;
        assert_eq!(c.data_streams(), 1);
        let c = TransportConfig::default();
        assert_eq!(c.peer_share(100), 50);
        assert_eq!(c.peer_share(1), 1);
    }
}
