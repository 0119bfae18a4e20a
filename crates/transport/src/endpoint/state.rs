//! A connection's lifecycle as one value ([`ConnState`]) behind one lock,
//! changed only through [`ConnState::apply`], which holds every legal
//! transition.
//!
//! ```text
//!             Hello               Drain                PeerDone
//! Admitting ─────────▶ Open ─────────────▶ Closing ─────────────▶ Closing
//!     │                 │ ▲                   │                  (peer done)
//!     │                 └─┘ Superseded        │                      │
//!     │ BadHello        │                     │                      │
//!     └────── Close ────┴─────── Close ───────┴──────── Close ───────┴──▶ Closed
//! ```
//!
//! The state lives in a `watch` channel (its lock, and a wake-up for the
//! tasks waiting for a transition: admission for the hello, the writer
//! for a drain, a graceful close for the peer's `Done`). Critical sections
//! are tiny: a transition, a read, or starting the writer task (a spawn,
//! so that a drain either sees the writer or bars it); nothing awaits with
//! the lock held (its guard cannot cross an `await` in a spawned task),
//! and QUIC is closed after it is released. Lock order: the endpoint's
//! table, then a connection's state (installing, superseding and starting
//! a graceful close happen under the table's lock); never the other way
//! round.
//!
//! What is not lifecycle stays where it was: counters and gauges (work in
//! progress, refusals, streams opened and finished, the request stream
//! limit, recent activity) are atomics, and the writer task reports its own
//! end on a channel of its own.

use quinn::ConnectionError;

use crate::frame::code;

/// Close reason of a connection whose peer's hello was malformed.
pub(super) const BAD_HELLO: &str = "bad hello";

/// Where a connection is in its life.
#[derive(Debug)]
pub(super) enum ConnState {
    /// TLS done and the peer's certificate name verified; the readers run,
    /// and this side waits for the peer's hello before using it.
    Admitting,
    /// Both hellos exchanged: the connection carries traffic.
    Open {
        /// The peer's process instance, from its hello.
        instance: u64,
        /// A duplicate to the same process won the tie-break: this one
        /// closes after a short idle time rather than `idle_close`.
        superseded: bool,
    },
    /// Graceful close in progress, started by either side: the connection
    /// left the table, no writer starts any more, and sends moving to it
    /// go to a new connection.
    Closing {
        /// The peer's process instance, from its hello.
        instance: u64,
        /// The peer's `Done` with the number of message streams it opened.
        peer_done: Option<u32>,
    },
    /// The QUIC connection is closed (terminal).
    Closed {
        /// Why, as first known.
        reason: CloseReason,
        /// It went through [`ConnState::Closing`]: a send that picked it
        /// moves to a new connection rather than failing.
        drained: bool,
    },
}

/// Why a connection closed.
#[derive(Debug, Clone)]
pub(super) enum CloseReason {
    /// This node closed it, with this QUIC application error code and reason.
    Local {
        /// A [`crate::frame::code`].
        code: u32,
        /// Sent to the peer as the close reason.
        reason: &'static str,
    },
    /// It ended otherwise: the peer closed it, it timed out, the endpoint
    /// shut down.
    Ended(ConnectionError),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local { code, reason } => write!(f, "closed here ({reason}, code {code})"),
            Self::Ended(e) => e.fmt(f),
        }
    }
}

/// What happens to a connection.
#[derive(Debug, Clone)]
pub(super) enum Event {
    /// The peer's hello arrived, with its process instance.
    Hello(u64),
    /// The peer's hello could not be decoded.
    BadHello,
    /// A duplicate connection to the same process won the tie-break.
    Superseded,
    /// A graceful close starts (this side idle, or the peer's `GoAway`).
    Drain,
    /// The peer's `Done` arrived, with its count of message streams.
    PeerDone(u32),
    /// The connection is closed, here or otherwise.
    Close(CloseReason),
}

/// An event the current state does not allow (a protocol violation by the
/// peer, such as a second hello or a `Done` it was not asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Illegal;

impl ConnState {
    /// The one place a connection's state changes. `Ok(true)`: the state
    /// moved; `Ok(false)`: nothing to do (the event is already reflected, or
    /// is moot in a closed connection); `Err(Illegal)`: the event cannot
    /// happen in this state, and the state is unchanged.
    ///
    /// | from | event | to |
    /// |---|---|---|
    /// | `Admitting` | `Hello(i)` | `Open { i, superseded: false }` |
    /// | `Admitting` | `BadHello` | `Closed` (`PROTOCOL`, [`BAD_HELLO`]) |
    /// | `Open` | `Superseded` | `Open { superseded: true }` |
    /// | `Open` | `Drain` | `Closing` (same instance) |
    /// | `Closing` | `PeerDone(n)` | `Closing { peer_done: n }` (first one kept) |
    /// | any but `Closed` | `Close(r)` | `Closed { r, drained: from Closing }` |
    ///
    /// A hello once open, a `Superseded` or `Drain` while admitting and a
    /// `Done` outside a graceful close are illegal; in `Closed` every event
    /// is moot, and so are a bad hello once admitted (only counted) and
    /// `Superseded`, `Drain` or a second `Done` while closing.
    pub(super) fn apply(&mut self, event: Event) -> Result<bool, Illegal> {
        use ConnState::*;
        let next = match (&*self, event) {
            (Admitting, Event::Hello(instance)) => Open {
                instance,
                superseded: false,
            },
            (Admitting, Event::BadHello) => Closed {
                reason: CloseReason::Local {
                    code: code::PROTOCOL,
                    reason: BAD_HELLO,
                },
                drained: false,
            },
            // A bad hello once admitted: counted, nothing else.
            (Open { .. } | Closing { .. }, Event::BadHello) => return Ok(false),
            (
                Open {
                    superseded: true, ..
                },
                Event::Superseded,
            ) => return Ok(false),
            (Open { instance, .. }, Event::Superseded) => Open {
                instance: *instance,
                superseded: true,
            },
            (Open { instance, .. }, Event::Drain) => Closing {
                instance: *instance,
                peer_done: None,
            },
            (
                Closing {
                    instance,
                    peer_done: None,
                },
                Event::PeerDone(n),
            ) => Closing {
                instance: *instance,
                peer_done: Some(n),
            },
            (Closing { .. }, Event::Superseded | Event::Drain | Event::PeerDone(_)) => {
                return Ok(false);
            }
            (Closed { .. }, _) => return Ok(false),
            (state, Event::Close(reason)) => Closed {
                reason,
                drained: matches!(state, Closing { .. }),
            },
            (Admitting, Event::Superseded | Event::Drain | Event::PeerDone(_))
            | (Open { .. }, Event::PeerDone(_))
            | (Open { .. } | Closing { .. }, Event::Hello(_)) => return Err(Illegal),
        };
        *self = next;
        Ok(true)
    }

    /// The peer's process instance, once its hello arrived (and until the
    /// connection closed).
    pub(super) fn instance(&self) -> Option<u64> {
        match self {
            Self::Open { instance, .. } | Self::Closing { instance, .. } => Some(*instance),
            Self::Admitting | Self::Closed { .. } => None,
        }
    }

    /// No writer may start: a graceful close began or the connection is
    /// closed.
    pub(super) fn bars_writer(&self) -> bool {
        matches!(self, Self::Closing { .. } | Self::Closed { .. })
    }

    /// A graceful close began (it may have ended since): sends move on.
    pub(super) fn drained(&self) -> bool {
        matches!(
            self,
            Self::Closing { .. } | Self::Closed { drained: true, .. }
        )
    }

    /// The peer's `Done` count, once it arrived.
    pub(super) fn peer_done(&self) -> Option<u32> {
        match self {
            Self::Closing { peer_done, .. } => *peer_done,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(reason: &'static str) -> CloseReason {
        CloseReason::Local { code: 5, reason }
    }

    fn open() -> ConnState {
        let mut s = ConnState::Admitting;
        assert_eq!(s.apply(Event::Hello(7)), Ok(true));
        s
    }

    #[test]
    fn a_graceful_close_runs_admitting_open_closing_closed() {
        let mut s = open();
        assert_eq!(s.instance(), Some(7));
        assert!(!s.bars_writer() && !s.drained());
        assert_eq!(s.apply(Event::Superseded), Ok(true));
        assert_eq!(s.apply(Event::Superseded), Ok(false));
        assert!(matches!(
            s,
            ConnState::Open {
                superseded: true,
                ..
            }
        ));
        assert_eq!(s.apply(Event::Drain), Ok(true));
        assert!(s.bars_writer() && s.drained());
        assert_eq!(s.instance(), Some(7));
        // Both sides may start a close at once: the second is a no-op.
        assert_eq!(s.apply(Event::Drain), Ok(false));
        assert_eq!(s.apply(Event::PeerDone(3)), Ok(true));
        assert_eq!(s.apply(Event::PeerDone(9)), Ok(false));
        assert_eq!(s.peer_done(), Some(3));
        assert_eq!(s.apply(Event::Close(local("idle"))), Ok(true));
        assert!(matches!(s, ConnState::Closed { drained: true, .. }));
        assert!(s.drained() && s.bars_writer());
        assert_eq!(s.instance(), None);
    }

    #[test]
    fn closed_is_terminal_and_keeps_its_first_reason() {
        let mut s = open();
        assert_eq!(s.apply(Event::Close(local("disconnect"))), Ok(true));
        assert!(!s.drained(), "an abrupt close moves no send");
        for e in [
            Event::Hello(1),
            Event::Superseded,
            Event::Drain,
            Event::PeerDone(1),
            Event::Close(CloseReason::Ended(ConnectionError::TimedOut)),
        ] {
            assert_eq!(s.apply(e), Ok(false));
        }
        assert!(matches!(
            s,
            ConnState::Closed {
                reason: CloseReason::Local {
                    reason: "disconnect",
                    ..
                },
                drained: false
            }
        ));
    }

    #[test]
    fn events_out_of_order_are_illegal_and_change_nothing() {
        let mut s = ConnState::Admitting;
        for e in [Event::Superseded, Event::Drain, Event::PeerDone(1)] {
            assert_eq!(s.apply(e), Err(Illegal));
            assert!(matches!(s, ConnState::Admitting));
        }
        let mut s = open();
        assert_eq!(s.apply(Event::Hello(8)), Err(Illegal));
        assert_eq!(s.apply(Event::PeerDone(1)), Err(Illegal));
        assert_eq!(s.instance(), Some(7));
        s.apply(Event::Drain).ok();
        assert_eq!(s.apply(Event::Hello(8)), Err(Illegal));
        let mut s = ConnState::Admitting;
        assert_eq!(s.apply(Event::Close(local("no hello"))), Ok(true));
        assert!(matches!(s, ConnState::Closed { drained: false, .. }));
    }

    #[test]
    fn a_bad_hello_fails_the_admission_only() {
        let mut s = ConnState::Admitting;
        assert_eq!(s.apply(Event::BadHello), Ok(true));
        assert!(matches!(
            s,
            ConnState::Closed {
                reason: CloseReason::Local {
                    code: code::PROTOCOL,
                    reason: BAD_HELLO
                },
                ..
            }
        ));
        let mut s = open();
        assert_eq!(s.apply(Event::BadHello), Ok(false));
        assert!(matches!(s, ConnState::Open { instance: 7, .. }));
    }
}
