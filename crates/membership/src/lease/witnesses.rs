//! The witness set `W` of strategy `Witnesses`: who is in it, kept up to
//! date with `R`, the pings that refresh it and whether its majority is
//! reached.

use super::*;

/// Pings to witnesses remembered (to match their acks), at most; when full
/// the oldest is forgotten and its ack, if it still comes, counts as stray.
const MAX_WITNESS_PINGS: usize = 256;
/// Slots entered into `R` remembered for an incremental update of the
/// witness set, at most; past it the set is rebuilt with one scan.
pub(super) const MAX_ENTERED: usize = 64;

/// The size of the witness set for a reference set of `n` members (this
/// node included): all of them up to 3 (one for 1 or 2), then the largest
/// odd number not above `n`, at most `2⌈log₂ n⌉ + 1` (5 at 5 members, 9 at
/// 16, 13 at 64, 17 at 200, 21 at 1,000, 29 at 10,000). Always odd: a split
/// into two sides gives one of them a strict majority.
pub(crate) fn witness_set_size(n: usize) -> usize {
    if n <= 2 {
        return 1;
    }
    let odd = if n % 2 == 1 { n } else { n - 1 };
    let log2 = (usize::BITS - (n - 1).leading_zeros()) as usize;
    odd.min(2 * log2 + 1)
}

/// Who a witness is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WitnessId {
    /// This node: it counts for itself.
    Local,
    /// The member in this slot (whatever its generation: a witness is a
    /// place on the network, and a restarted witness answers from the same
    /// side of a partition).
    Slot(u32),
    /// Reaped while the set was frozen, or this node's own previous
    /// generation in an inherited set: never answers again.
    Gone,
    /// Inherited from a previous generation of this node, by name, and not
    /// in the member table (yet): unreachable until a member of that name
    /// is.
    Unknown,
}

/// One member of the witness set.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Witness {
    pub(crate) id: WitnessId,
    /// Its place in the witness order (`hash::witness_rank`).
    pub(crate) rank: u64,
    /// Send time of the latest ping of this node it acknowledged directly.
    pub(crate) acked: Option<Instant>,
    /// Send time of the latest witness ping to it.
    pub(crate) pinged: Option<Instant>,
}

/// The witness set `W` of strategy [`LeaseStrategy::Witnesses`]: the
/// members of `R` (this node included) with the lowest witness ranks. It
/// follows `R`: rebuilt (by the membership, which knows the names) when a
/// witness leaves `R` or the set's size changes, merged incrementally when a
/// member enters; frozen with `R` while the lease is not valid, a witness
/// reaped meanwhile staying in it as [`WitnessId::Gone`]. Before the lease
/// was ever valid (`R` empty and frozen), it follows the live view instead,
/// so a starting node pings the witnesses it will need; a node reborn in
/// the same process starts with its predecessor's set instead
/// ([`LeaseEvidence`]), frozen.
#[derive(Debug, Default)]
pub(crate) struct Witnesses {
    /// Sorted by rank.
    pub(crate) list: Vec<Witness>,
    /// The set must be rebuilt before it is next read.
    pub(crate) stale: bool,
    /// Slots that entered `R` since the last rebuild.
    pub(crate) entered: Vec<u32>,
    /// Witness pings in flight: (seq, slot, send time).
    pub(crate) pings: VecDeque<(u32, u32, Instant)>,
    /// The set is inherited from a previous generation of this node: the
    /// remote witnesses by name (index in `list`, name), resolved to a
    /// slot as members enter and leave the table. Empty otherwise, and
    /// once the lease has been valid.
    pub(crate) inherited: Vec<(usize, Arc<str>)>,
}

impl Witnesses {
    fn position(&self, slot: u32) -> Option<usize> {
        self.list.iter().position(|w| w.id == WitnessId::Slot(slot))
    }

    /// Whether the member in `slot` is a witness.
    pub(crate) fn contains(&self, slot: u32) -> bool {
        self.position(slot).is_some()
    }

    /// A ping to the member in `slot`, sent at `sent_at`, was acknowledged
    /// by that member itself.
    pub(crate) fn acked(&mut self, slot: u32, sent_at: Instant) {
        if let Some(i) = self.position(slot)
            && let Some(w) = self.list.get_mut(i)
        {
            w.acked = w.acked.max(Some(sent_at));
        }
    }

    /// A witness ping went to `slot` at `now` with sequence number `seq`.
    pub(crate) fn ping_sent(&mut self, seq: u32, slot: u32, now: Instant) {
        if let Some(i) = self.position(slot)
            && let Some(w) = self.list.get_mut(i)
        {
            w.pinged = Some(now);
        }
        if self.pings.len() >= MAX_WITNESS_PINGS {
            self.pings.pop_front();
        }
        self.pings.push_back((seq, slot, now));
    }

    /// The witness ping with sequence number `seq`, if it was one: (slot,
    /// send time).
    pub(crate) fn take_ping(&mut self, seq: u32) -> Option<(u32, Instant)> {
        let pos = self.pings.iter().position(|(s, _, _)| *s == seq)?;
        self.pings.remove(pos).map(|(_, slot, at)| (slot, at))
    }

    /// Replaces the set by the `size` lowest-ranked `candidates`, keeping
    /// what is known of the members that stay.
    pub(crate) fn rebuild(
        &mut self,
        candidates: impl Iterator<Item = (WitnessId, u64)>,
        size: usize,
    ) {
        let mut next: Vec<Witness> = Vec::with_capacity(size + 1);
        for (id, rank) in candidates {
            let pos = next.partition_point(|w| (w.rank, w.id_key()) < (rank, key(id)));
            if pos >= size {
                continue;
            }
            next.insert(pos, Witness::new(id, rank));
            next.truncate(size);
        }
        for w in &mut next {
            if let Some(old) = self.list.iter().find(|o| o.id == w.id) {
                w.acked = old.acked;
                w.pinged = old.pinged;
            }
        }
        self.list = next;
        self.stale = false;
        self.entered.clear();
    }

    /// Merges a member that entered `R` (of rank `rank`) into a set whose
    /// size does not change: it replaces the highest-ranked witness if it
    /// ranks lower.
    pub(crate) fn merge(&mut self, slot: u32, rank: u64) {
        if self.contains(slot) {
            return;
        }
        let id = WitnessId::Slot(slot);
        let Some(last) = self.list.last() else {
            self.stale = true;
            return;
        };
        if (rank, key(id)) >= (last.rank, last.id_key()) {
            return;
        }
        self.list.pop();
        let pos = self
            .list
            .partition_point(|w| (w.rank, w.id_key()) < (rank, key(id)));
        self.list.insert(pos, Witness::new(id, rank));
    }

    /// (Witnesses that answered a ping sent after `now − period`, this node
    /// included if it is one; the set's size; when that count drops below a
    /// strict majority without new answers, `None` if never).
    pub(crate) fn count(&self, now: Instant, period: Duration) -> (usize, usize, Option<Instant>) {
        let size = self.list.len();
        let fresh = |w: &Witness| {
            matches!(w.id, WitnessId::Slot(_))
                .then_some(w.acked)
                .flatten()
                .and_then(|a| a.checked_add(period))
                .filter(|until| *until > now)
        };
        let local = usize::from(self.list.iter().any(|w| w.id == WitnessId::Local));
        let remote = self.list.iter().filter_map(fresh).count();
        let reached = local + remote;
        // The lease holds while `needed` remote answers stay fresh: until
        // the `needed`-th latest expiry among them.
        let needed = (size / 2 + 1).saturating_sub(local);
        let until = if needed == 0 {
            None
        } else {
            self.list
                .iter()
                .filter_map(fresh)
                .filter(|&e| {
                    self.list
                        .iter()
                        .filter_map(fresh)
                        .filter(|&x| x >= e)
                        .count()
                        >= needed
                })
                .max()
        };
        (reached, size, until)
    }
}

impl Witness {
    /// A witness of rank `rank` not pinged yet.
    pub(crate) fn new(id: WitnessId, rank: u64) -> Witness {
        Witness {
            id,
            rank,
            acked: None,
            pinged: None,
        }
    }

    fn id_key(&self) -> u64 {
        key(self.id)
    }
}

/// A tie-break between equal ranks: this node first, then by slot.
fn key(id: WitnessId) -> u64 {
    match id {
        WitnessId::Local => 0,
        WitnessId::Slot(slot) => u64::from(slot) + 1,
        WitnessId::Gone | WitnessId::Unknown => u64::MAX,
    }
}
