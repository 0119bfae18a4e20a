//! The virtual network: per-packet latency with jitter, loss, duplication and
//! reordering, and partitions between groups of nodes.
//!
//! Unreliable packets (membership's datagrams) may be lost, duplicated and
//! reordered. Reliable messages (membership's push-pull and joins, and every
//! application message) model a QUIC stream: they are never lost at random
//! nor duplicated, but they are not ordered with respect to each other, and
//! they fail when the receiver is down or on the other side of a partition,
//! or when either direction between the two is cut (a connection needs
//! both).

use std::collections::HashSet;
use std::time::Duration;

use rand::Rng;

/// How packets travel between nodes. Every probability is per packet.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConfig {
    /// One-way base latency of every packet.
    pub latency: Duration,
    /// Extra one-way delay, uniform in `0..=jitter`, drawn per packet. Jitter
    /// larger than the gap between two sends reorders them.
    pub jitter: Duration,
    /// Probability that an unreliable packet is lost.
    pub loss: f64,
    /// Probability that an unreliable packet is delivered twice (the copy
    /// with its own latency).
    pub duplicate: f64,
    /// Probability that a packet is held back by an extra delay uniform in
    /// `0..=reorder_delay` (on top of latency and jitter).
    pub reorder: f64,
    /// Upper bound of the extra delay of a held-back packet.
    pub reorder_delay: Duration,
    /// How long after sending a reliable message the sender learns that it
    /// could not be delivered (receiver down or partitioned away); models a
    /// QUIC connection or stream failing.
    pub reliable_fail_after: Duration,
}

impl NetConfig {
    /// A local network: 200 µs one-way latency plus up to 300 µs of jitter,
    /// no loss, no duplication, 1 % of packets held back up to 5 ms.
    pub fn lan() -> NetConfig {
        NetConfig {
            latency: Duration::from_micros(200),
            jitter: Duration::from_micros(300),
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.01,
            reorder_delay: Duration::from_millis(5),
            reliable_fail_after: Duration::from_secs(1),
        }
    }

    /// Checks that every probability is within `0..=1`.
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in [
            ("loss", self.loss),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} must be a probability in 0..=1, got {p}"));
            }
        }
        Ok(())
    }

    /// One-way delay of one copy of a packet, in nanoseconds.
    pub(crate) fn delay_ns<R: Rng>(&self, rng: &mut R) -> u64 {
        let mut ns = duration_ns(self.latency);
        let jitter = duration_ns(self.jitter);
        if jitter > 0 {
            ns = ns.saturating_add(rng.random_range(0..=jitter));
        }
        if self.reorder > 0.0 && rng.random_bool(self.reorder) {
            let extra = duration_ns(self.reorder_delay);
            if extra > 0 {
                ns = ns.saturating_add(rng.random_range(0..=extra));
            }
        }
        ns
    }

    /// Decides the fate of one packet: the delays of the copies that arrive
    /// (none when lost, two when duplicated).
    pub(crate) fn plan<R: Rng>(&self, reliable: bool, rng: &mut R) -> Copies {
        if reliable {
            return Copies::One(self.delay_ns(rng));
        }
        if self.loss > 0.0 && rng.random_bool(self.loss) {
            return Copies::Lost;
        }
        let first = self.delay_ns(rng);
        if self.duplicate > 0.0 && rng.random_bool(self.duplicate) {
            return Copies::Two(first, self.delay_ns(rng));
        }
        Copies::One(first)
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig::lan()
    }
}

/// The copies of a packet that arrive, with their one-way delays in ns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Copies {
    Lost,
    One(u64),
    Two(u64, u64),
}

/// Which group each node slot is in; packets only travel within a group.
/// Group 0 is everyone when there is no partition. On top of the groups,
/// one-way cuts: directed links whose packets are dropped.
#[derive(Clone, Debug, Default)]
pub(crate) struct Partitions {
    /// Group of each slot; slots beyond the end are in group 0.
    current: Vec<u32>,
    /// Directed links (from, to) that drop every packet.
    blocked: HashSet<(u32, u32)>,
}

impl Partitions {
    pub(crate) fn group(&self, slot: u32) -> u32 {
        group_of(&self.current, slot)
    }

    /// Whether a packet from `from` reaches `to` (direction matters under a
    /// one-way cut).
    pub(crate) fn connected(&self, from: u32, to: u32) -> bool {
        self.group(from) == self.group(to)
            && (self.blocked.is_empty() || !self.blocked.contains(&(from, to)))
    }

    /// Whether packets travel both ways between `a` and `b` (what a
    /// connection, QUIC or TCP, needs to carry anything).
    pub(crate) fn connected_both(&self, a: u32, b: u32) -> bool {
        self.connected(a, b) && self.connected(b, a)
    }

    /// Packets from `from` to `to` are dropped, for every listed pair, on top
    /// of the cuts already in force.
    pub(crate) fn block(&mut self, pairs: impl IntoIterator<Item = (u32, u32)>) {
        self.blocked.extend(pairs);
    }

    /// Puts the listed slots in the given groups (other slots in group 0).
    pub(crate) fn split(&mut self, groups: Vec<u32>) {
        self.current = groups;
    }

    /// Removes every partition and every one-way cut.
    pub(crate) fn heal(&mut self) {
        self.current.clear();
        self.blocked.clear();
    }

    /// Whether some slots are cut off from others (in one direction or both).
    pub(crate) fn is_split(&self) -> bool {
        self.current.iter().any(|&g| g != 0) || !self.blocked.is_empty()
    }
}

fn group_of(layout: &[u32], slot: u32) -> u32 {
    usize::try_from(slot)
        .ok()
        .and_then(|i| layout.get(i))
        .copied()
        .unwrap_or(0)
}

/// Saturating conversion of a duration to nanoseconds.
pub(crate) fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    #[test]
    fn loss_and_duplication_follow_their_probabilities() {
        let cfg = NetConfig {
            loss: 0.25,
            duplicate: 0.5,
            ..NetConfig::lan()
        };
        let mut rng = SmallRng::seed_from_u64(7);
        let (mut lost, mut two) = (0u32, 0u32);
        for _ in 0..10_000 {
            match cfg.plan(false, &mut rng) {
                Copies::Lost => lost += 1,
                Copies::Two(..) => two += 1,
                Copies::One(_) => {}
            }
        }
        assert!((2_200..2_800).contains(&lost), "lost {lost}");
        // Half of the 75 % that survive.
        assert!((3_400..4_100).contains(&two), "duplicated {two}");
    }

    #[test]
    fn reliable_messages_are_never_lost_or_duplicated() {
        let cfg = NetConfig {
            loss: 1.0,
            duplicate: 1.0,
            ..NetConfig::lan()
        };
        let mut rng = SmallRng::seed_from_u64(1);
        for _ in 0..100 {
            assert!(matches!(cfg.plan(true, &mut rng), Copies::One(_)));
        }
    }

    #[test]
    fn delays_stay_within_latency_jitter_and_reorder_bounds() {
        let cfg = NetConfig {
            reorder: 0.5,
            ..NetConfig::lan()
        };
        let mut rng = SmallRng::seed_from_u64(3);
        let low = duration_ns(cfg.latency);
        let high = low + duration_ns(cfg.jitter) + duration_ns(cfg.reorder_delay);
        let mut held_back = 0;
        for _ in 0..1_000 {
            let d = cfg.delay_ns(&mut rng);
            assert!((low..=high).contains(&d));
            if d > low + duration_ns(cfg.jitter) {
                held_back += 1;
            }
        }
        assert!(held_back > 100, "{held_back}");
    }

    #[test]
    fn partitions_separate_groups_until_healed() {
        let mut p = Partitions::default();
        assert!(p.connected(0, 5));
        p.split(vec![0, 0, 1, 1]);
        assert!(p.is_split());
        assert!(p.connected(0, 1));
        assert!(!p.connected(1, 2));
        assert!(p.connected(0, 9), "slots past the layout are in group 0");
        p.heal();
        assert!(p.connected(1, 2));
        assert!(!p.is_split());
    }

    #[test]
    fn a_one_way_cut_drops_one_direction_until_healed() {
        let mut p = Partitions::default();
        p.block([(1, 2)]);
        assert!(p.is_split());
        assert!(!p.connected(1, 2), "1 -> 2 is cut");
        assert!(p.connected(2, 1), "2 -> 1 still travels");
        assert!(!p.connected_both(2, 1));
        assert!(p.connected_both(0, 1));
        p.heal();
        assert!(p.connected(1, 2));
        assert!(!p.is_split());
    }

    #[test]
    fn bad_probabilities_are_rejected() {
        let cfg = NetConfig {
            loss: 1.5,
            ..NetConfig::lan()
        };
        assert!(cfg.validate().is_err());
        assert!(NetConfig::lan().validate().is_ok());
    }
}
