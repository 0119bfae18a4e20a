//! What became of the owner-bound messages the core routed.

use tracing::debug;

/// Why a routed message was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// No node owns its datum in the view in force.
    NoOwner,
    /// This node is fenced.
    Fenced,
    /// The datum's hold queue is full.
    HoldFull,
    /// The datum is not held here any more.
    NotHeld,
    /// It stayed parked longer than `park_expiry`.
    Expired,
    /// The park is full.
    ParkFull,
    /// Its user channel is not registered here.
    UnknownChannel,
    /// The application dropped its channel's receiver.
    ChannelClosed,
    /// Its owner is not a member (no address).
    UnknownOwner,
    /// The link to its owner closed.
    LinkClosed,
    /// The transport failed to send it.
    SendFailed,
    /// Handed back undelivered by the handoff.
    Returned,
    /// It could not be decoded.
    Malformed,
    /// An acknowledged forward got no answer.
    ForwardFailed,
    /// A refusal could not be handed back.
    RefusalFailed,
    /// A leave's deadline passed with it still here.
    LeaveTimeout,
    /// The node stopped with it still here.
    Shutdown,
}

impl DropReason {
    /// Every reason, in the order of [`RouteCounters::drops`].
    pub const ALL: [DropReason; 17] = [
        DropReason::NoOwner,
        DropReason::Fenced,
        DropReason::HoldFull,
        DropReason::NotHeld,
        DropReason::Expired,
        DropReason::ParkFull,
        DropReason::UnknownChannel,
        DropReason::ChannelClosed,
        DropReason::UnknownOwner,
        DropReason::LinkClosed,
        DropReason::SendFailed,
        DropReason::Returned,
        DropReason::Malformed,
        DropReason::ForwardFailed,
        DropReason::RefusalFailed,
        DropReason::LeaveTimeout,
        DropReason::Shutdown,
    ];

    /// Its index in [`Self::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Its name in metrics and reports (snake case).
    pub fn name(self) -> &'static str {
        match self {
            DropReason::NoOwner => "no_owner",
            DropReason::Fenced => "fenced",
            DropReason::HoldFull => "hold_full",
            DropReason::NotHeld => "not_held",
            DropReason::Expired => "expired",
            DropReason::ParkFull => "park_full",
            DropReason::UnknownChannel => "unknown_channel",
            DropReason::ChannelClosed => "channel_closed",
            DropReason::UnknownOwner => "unknown_owner",
            DropReason::LinkClosed => "link_closed",
            DropReason::SendFailed => "send_failed",
            DropReason::Returned => "returned",
            DropReason::Malformed => "malformed",
            DropReason::ForwardFailed => "forward_failed",
            DropReason::RefusalFailed => "refusal_failed",
            DropReason::LeaveTimeout => "leave_timeout",
            DropReason::Shutdown => "shutdown",
        }
    }
}

/// Counters of the routed messages this core decided on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteCounters {
    /// Handed to the application here.
    pub delivered: u64,
    /// Sent on to their owner.
    pub forwarded: u64,
    /// Held during a handoff, or parked.
    pub held: u64,
    /// Handed back by a leaving node and routed again.
    pub rerouted: u64,
    /// Whose origin was not plausible for their sender, and was replaced.
    pub origin_replaced: u64,
    /// Notice batches that could not be decoded.
    pub malformed_notices: u64,
    /// Dropped, by reason (indexed by [`DropReason::index`]).
    pub drops: [u64; 17],
}

impl RouteCounters {
    /// Counts `n` messages dropped for `reason`.
    pub fn dropped(&mut self, reason: DropReason, n: u64) {
        if n == 0 {
            return;
        }
        self.drops[reason.index()] += n;
        debug!(reason = reason.name(), n, "routed message dropped");
    }

    /// Messages dropped for `reason`.
    pub fn drops_for(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()]
    }
}
