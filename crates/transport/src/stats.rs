//! Counters of an endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $field:ident),* $(,)?) => {
        /// Live counters of one endpoint (relaxed atomics, shared by its tasks).
        #[derive(Debug, Default)]
        pub(crate) struct Stats {
            $(pub(crate) $field: AtomicU64,)*
        }

        /// A snapshot of an endpoint's counters, from [`crate::Transport::stats`].
        /// All counters only grow.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $field: u64,)*
        }

        impl Stats {
            pub(crate) fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot {
                    $($field: self.$field.load(Ordering::Relaxed),)*
                }
            }
        }

        impl StatsSnapshot {
            /// `(name, value)` pairs, for exporting to a metrics system.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field),)*]
            }
        }
    };
}

counters! {
    /// Connections established and admitted (both directions).
    connections_opened,
    /// Connections that ended (closed by either side, lost, idle).
    connections_closed,
    /// Handshakes refused: bad or foreign certificate, wrong name, no hello.
    handshakes_rejected,
    /// Datagrams handed to QUIC.
    datagrams_sent,
    /// Well-formed datagrams received (including those then dropped).
    datagrams_received,
    /// Of those, datagrams dropped because the inbound datagram queue was full.
    datagrams_dropped,
    /// Datagrams without the shoal tag.
    datagrams_malformed,
    /// One-way messages and requests handed to QUIC.
    messages_sent,
    /// Well-formed one-way messages and requests received (handed to the
    /// inbound queue, waiting for room when it is full).
    messages_received,
    /// Responses received by requesters.
    responses_received,
    /// Messages sent with zstd compression.
    messages_compressed,
    /// Messages accepted into a send queue that were lost because the
    /// connection died before they were written.
    messages_lost,
    /// Sends refused because a queue was full and the caller chose not to wait.
    send_queue_full,
    /// Frames with a bad header, version, compressed body or stream kind.
    frames_malformed,
    /// Inbound frames refused because they exceed this node's message limit
    /// or their channel's size cap (stream reset `TOO_LARGE`).
    frames_too_large,
    /// Inbound compressed frames refused because they announce more than
    /// their channel's compression ratio allows (stream reset `TOO_LARGE`).
    frames_over_ratio,
    /// Streams dropped because a frame did not arrive completely within
    /// `frame_timeout`.
    frames_timed_out,
    /// Connections closed because they had `max_refusals` frames refused.
    connections_closed_for_abuse,
    /// Connections closed (gracefully) because a newer connection of the
    /// same certificate name came from another address, whichever was
    /// installed first (one name, one connection: a peer cannot multiply
    /// its per-connection share by connecting from many ports).
    connections_replaced_by_name,
    /// Times a stream reader had to wait before reading a message's body
    /// because the inbound byte or count budget, or its sender's share of
    /// it, was full (the application, or a consumer holding bodies from
    /// `MessageReceiver::recv_held`, had not taken enough yet): the sender
    /// is pushed back by QUIC flow control meanwhile.
    inbound_budget_waits,
    /// Of those waits, the ones for a control channel's budget
    /// (`TransportConfig::control_channels`): its messages wait only for
    /// other control messages not yet taken.
    control_budget_waits,
    /// Waits for budget that lasted longer than `BUDGET_STALL` (1 s): the
    /// sender's share stays full of messages nobody takes (a stuck reader).
    /// Each is also logged at warn, with the peer and the channel.
    inbound_budget_stalls,
    /// Frame and datagram bytes written (headers included).
    bytes_sent,
    /// Frame and datagram bytes read (headers included).
    bytes_received,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
