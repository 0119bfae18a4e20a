//! Timers, limits and the three profiles (`lan`, `wan`, `local`).

use std::time::Duration;

use crate::{Error, LeaseStrategy};

/// Every timer and limit of the protocol.
///
/// Start from a profile ([`Config::lan`], the default, [`Config::wan`] or
/// [`Config::local`]) and change fields as needed; [`Membership::new`]
/// validates the result.
///
/// The detection time and bandwidth each profile gives are computed in
/// `docs/membership.md`; in short, with `N` members:
///
/// - suspicion timeout `min = suspicion_mult × max(1, log10(N)) ×
///   probe_interval`, `max = suspicion_max_mult × min`, shrinking from `max`
///   to `min` as independent members confirm the suspicion;
/// - a failed member is first probed after about one `probe_interval`, the
///   probe fails one `probe_interval` later, and the suspicion and then the
///   "dead" verdict take a few network hops to reach everyone (news is
///   gossiped at once);
/// - each update is piggybacked `retransmit_mult × ceil(log10(N + 1))` times.
///
/// [`Membership::new`]: crate::Membership::new
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Time between two probes of this node (one member per period, in
    /// round-robin over a shuffled list). Multiplied by the local health
    /// score + 1 when this node is the slow one (Lifeguard).
    pub probe_interval: Duration,
    /// How long a direct ping waits for its ack before indirect probes are
    /// sent through other members. Must be below `probe_interval`.
    pub probe_timeout: Duration,
    /// Suspicion multiplier: the minimal suspicion timeout is
    /// `suspicion_mult × max(1, log10(N)) × probe_interval`. The number of
    /// independent confirmations expected is `suspicion_mult − 2`.
    pub suspicion_mult: u32,
    /// The suspicion timeout starts at `suspicion_max_mult` times the minimal
    /// one and shrinks towards it with each independent confirmation.
    pub suspicion_max_mult: u32,
    /// Number of members asked to probe a target indirectly after a direct
    /// ping went unanswered.
    pub indirect_checks: usize,
    /// Retransmit multiplier: each update is piggybacked
    /// `retransmit_mult × ceil(log10(N + 1))` times by every member that
    /// learns it.
    pub retransmit_mult: u32,
    /// Time between two gossip rounds (only sent when updates are queued).
    pub gossip_interval: Duration,
    /// Members each gossip round sends to.
    pub gossip_fanout: usize,
    /// Time between two full-state push-pull exchanges with one random member
    /// (alive, suspect or dead, so partitions heal). Scaled up above 32
    /// members as memberlist does: `× (ceil(log2(N) − log2(32)) + 1)`.
    pub push_pull_interval: Duration,
    /// How long dead members still receive gossip (so a wrongly declared
    /// member or the far side of a healed partition learns the verdict and
    /// refutes it).
    pub gossip_to_dead: Duration,
    /// How often a random dead member is pinged; if it answers (a healed
    /// partition) a push-pull with it follows at once.
    pub reconnect_interval: Duration,
    /// How long a dead or left member is remembered (as a tombstone: stale
    /// updates about it are recognised and ignored) before it is forgotten.
    pub reap_after: Duration,
    /// Send a reliable ping alongside the indirect probes (memberlist's TCP
    /// fallback), so one lossy path alone does not raise a suspicion.
    pub reliable_ping: bool,
    /// Largest unreliable packet this node sends (and accepts). Default
    /// 1,150 bytes: what one QUIC datagram carries.
    pub max_packet_size: usize,
    /// Largest reliable transmit (push-pull full state) this node sends and
    /// accepts. A larger state is sent in part, starting from a random member,
    /// so successive exchanges cover everyone.
    pub max_state_size: usize,
    /// Largest user metadata; [`Membership::set_metadata`] refuses more.
    ///
    /// [`Membership::set_metadata`]: crate::Membership::set_metadata
    pub max_metadata_len: usize,
    /// Longest member name, in bytes.
    pub max_name_len: usize,
    /// Local health (awareness) ceiling: the score runs from 0 to
    /// `awareness_max − 1`, and the probe interval is multiplied by score + 1.
    pub awareness_max: u32,
    /// First delay before join push-pulls to the seeds are retried; doubles
    /// up to `push_pull_interval` until a seed answers.
    pub join_retry_interval: Duration,
    /// Indirect probes this node relays at once for others; further requests
    /// are dropped (and counted) until some finish.
    pub max_relays: usize,
    /// Transmits waiting in [`Membership::poll_transmit`]'s queue; when full,
    /// new transmits are dropped (and counted): membership tolerates loss.
    ///
    /// [`Membership::poll_transmit`]: crate::Membership::poll_transmit
    pub max_queued_transmits: usize,
    /// Events waiting in [`Membership::poll_event`]'s queue; when full, the
    /// oldest is dropped (and counted). The coalesced `ViewChanged` is never
    /// lost: it is built from the current state when polled.
    ///
    /// [`Membership::poll_event`]: crate::Membership::poll_event
    pub max_queued_events: usize,
    /// Emit `Event::ViewChanged` (building it costs O(N) each time it is
    /// polled). A simulator of 10,000 nodes can turn it off.
    pub view_events: bool,
    /// How this node decides whether it may act as an owner
    /// ([`Membership::standing`]); `Witnesses` by default.
    ///
    /// [`Membership::standing`]: crate::Membership::standing
    pub lease: LeaseStrategy,
    /// How long an acknowledged ping keeps the lease fresh, from its send
    /// time. Long enough that a healthy node's witness pings and probes
    /// renew it even on a lossy network (10 probe intervals on `lan`: each
    /// witness is pinged every half period and a lost ping retried at the
    /// next round); short, because [`takeover_delay`](Self::takeover_delay)
    /// grows with it. [`LeaseStrategy::Majority`] needs at least
    /// `2 × suspicion_mult × probe_interval`, 1.6 s on `lan`
    /// ([`validate`](Self::validate) refuses less).
    pub lease_period: Duration,
    /// The largest rate difference between two nodes' clocks, in percent:
    /// a lease of `lease_period` on a node whose clock runs slow lasts up to
    /// that much longer on another's clock.
    pub max_clock_drift_percent: u32,
    /// Added to the drift-scaled lease period in
    /// [`takeover_delay`](Self::takeover_delay): scheduling slack of the
    /// node that loses its lease.
    pub takeover_margin: Duration,
    /// Most members this node keeps (itself, live, dead and left ones
    /// included; 16,384 by default). A new member beyond it is refused and
    /// counted in `Stats::members_refused`; a bootstrap snapshot stops there.
    /// Push-pull states carry at most this many members.
    pub max_members: usize,
}

/// The shortest `lease_period` [`LeaseStrategy::Majority`] is accepted
/// with, in units of `suspicion_mult × probe_interval` (the minimal
/// suspicion timeout of a small cluster, the time scale on which a cut-off
/// minority suspects the other side): 1.6 s on `lan`. With 200 ms probes and
/// multiplier 4 the simulator found a 1 s lease unsafe (5–20 % of 16-node
/// partitions) and 2 s safe.
const MAJORITY_LEASE_SUSPICIONS: u32 = 2;

impl Default for Config {
    fn default() -> Self {
        Config::lan()
    }
}

impl Config {
    /// The default profile, for one data centre (round trips under a few
    /// milliseconds): probe every 100 ms with a 50 ms ack timeout,
    /// suspicion multiplier 8 (a minimal suspicion timeout of 0.96 s at 16
    /// members), 3 indirect probes, retransmit multiplier 4, gossip to 3
    /// members every 200 ms (news at once, at most every 50 ms), push-pull
    /// every 15 s (as the seed; memberlist: 30 s), a dead member pinged every
    /// second.
    ///
    /// It probes ten times as often as memberlist's LAN profile (1 s), so a
    /// crashed member of 16 is suspected about 0.1–0.5 s after the crash and
    /// marked dead by everyone about 1 s later (memberlist: about 6 s in
    /// all). The suspicion timeout is the one a 200 ms probe interval with
    /// multiplier 4 gives: probing twice as often as that only shortens the
    /// wait for the first probe of a crashed member (SWIM's first probe of a
    /// given member comes after an exponentially distributed wait, mean
    /// about one probe interval; its tail was most of the spread of
    /// failover times). Probe traffic is about 1 kB/s per node, gossip at
    /// most `3 × 1,150 B / 200 ms ≈ 17 kB/s` and only while updates are
    /// queued (up to four times that while news keeps arriving: a new
    /// update brings the next round forward to 50 ms after the last). A
    /// node that stops answering for about one second (the minimal
    /// suspicion timeout at 16 members) is declared dead: use `wan` if
    /// pauses that long are normal.
    pub fn lan() -> Config {
        Config {
            probe_interval: Duration::from_millis(100),
            probe_timeout: Duration::from_millis(50),
            suspicion_mult: 8,
            suspicion_max_mult: 6,
            indirect_checks: 3,
            retransmit_mult: 4,
            gossip_interval: Duration::from_millis(200),
            gossip_fanout: 3,
            push_pull_interval: Duration::from_secs(15),
            gossip_to_dead: Duration::from_secs(30),
            reconnect_interval: Duration::from_secs(1),
            reap_after: Duration::from_secs(15 * 60),
            reliable_ping: true,
            max_packet_size: 1150,
            max_state_size: 4 << 20,
            max_metadata_len: 512,
            max_name_len: 128,
            awareness_max: 8,
            join_retry_interval: Duration::from_secs(1),
            max_relays: 256,
            max_queued_transmits: 4096,
            max_queued_events: 65_536,
            view_events: true,
            lease: LeaseStrategy::Witnesses,
            lease_period: Duration::from_secs(1),
            max_clock_drift_percent: 10,
            takeover_margin: Duration::from_millis(100),
            max_members: 16_384,
        }
    }

    /// Members spread over regions (round trips up to a few hundred
    /// milliseconds): memberlist's WAN timings, probe every 5 s with a 3 s
    /// timeout, suspicion multiplier 6, gossip to 4 members every 500 ms,
    /// push-pull every 60 s. Detection at 16 members takes about 45 s.
    pub fn wan() -> Config {
        Config {
            probe_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(3),
            suspicion_mult: 6,
            indirect_checks: 3,
            retransmit_mult: 4,
            gossip_interval: Duration::from_millis(500),
            gossip_fanout: 4,
            push_pull_interval: Duration::from_secs(60),
            gossip_to_dead: Duration::from_secs(60),
            reap_after: Duration::from_secs(60 * 60),
            reconnect_interval: Duration::from_secs(10),
            join_retry_interval: Duration::from_secs(2),
            lease_period: Duration::from_secs(50),
            takeover_margin: Duration::from_secs(1),
            ..Config::lan()
        }
    }

    /// All members on one host (tests, local demos): probe every 100 ms with
    /// a 50 ms timeout, suspicion multiplier 4, gossip every 50 ms,
    /// push-pull every 10 s. Detection at 16 members takes under 1 s.
    pub fn local() -> Config {
        Config {
            probe_interval: Duration::from_millis(100),
            probe_timeout: Duration::from_millis(50),
            suspicion_mult: 4,
            gossip_interval: Duration::from_millis(50),
            push_pull_interval: Duration::from_secs(10),
            gossip_to_dead: Duration::from_secs(15),
            reap_after: Duration::from_secs(5 * 60),
            reconnect_interval: Duration::from_millis(500),
            join_retry_interval: Duration::from_millis(200),
            lease_period: Duration::from_secs(1),
            takeover_margin: Duration::from_millis(50),
            ..Config::lan()
        }
    }

    /// How long after it started suspecting a member (at the incarnation of
    /// its dead verdict; after the verdict itself if it held no such
    /// suspicion) another node must wait before taking that member's
    /// datums, and never before its verdict
    /// ([`TakeoverGate`](crate::TakeoverGate)):
    /// `lease_period × (1 + max_clock_drift) + takeover_margin`. By then a
    /// member that has answered no probe since the suspicion started has
    /// lost its lease (no fresh contact), even on a clock that runs slow. Zero
    /// with [`LeaseStrategy::Off`] (no lease: take over at once, as before).
    pub fn takeover_delay(&self) -> Duration {
        if self.lease == LeaseStrategy::Off {
            return Duration::ZERO;
        }
        let drift = self.max_clock_drift_percent.min(100);
        (self.lease_period * (100 + drift) / 100).saturating_add(self.takeover_margin)
    }

    /// Whether the takeover delay may count from the start of the suspicion
    /// behind a verdict ([`TakeoverGate`](crate::TakeoverGate)): with the
    /// contact-based leases (`Witnesses`, `StaticQuorum`, `ContactOnly`),
    /// where a member that answers no probe has no fresh contact either.
    /// Not with `Majority`, whose lease rests on the member's own view (a
    /// cut-off minority that still reaches itself keeps it until its own
    /// verdicts about the majority), nor with `Off`: the delay then counts
    /// from the verdict.
    #[must_use]
    pub fn takeover_from_suspicion(&self) -> bool {
        !matches!(self.lease, LeaseStrategy::Majority | LeaseStrategy::Off)
    }

    /// Checks that the configuration is usable; [`Membership::new`] calls it.
    ///
    /// [`Membership::new`]: crate::Membership::new
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: &'static str| Err(Error::InvalidConfig(what));
        // Bounds that keep every timer computation far from overflow.
        const DAY: Duration = Duration::from_secs(24 * 60 * 60);
        let timers = [
            self.probe_interval,
            self.gossip_interval,
            self.push_pull_interval,
            self.gossip_to_dead,
            self.reconnect_interval,
            self.join_retry_interval,
            self.lease_period,
            self.takeover_margin,
        ];
        if timers.iter().any(|d| *d > DAY) || self.reap_after > 3650 * DAY {
            return bad("timers must be at most a day (reap_after at most ten years)");
        }
        if self.suspicion_mult > 100
            || self.suspicion_max_mult > 100
            || self.retransmit_mult > 100
            || self.awareness_max > 64
            || self.gossip_fanout > 1000
            || self.indirect_checks > 1000
        {
            return bad("multipliers, fan-outs and awareness_max out of range");
        }
        if self.max_packet_size > 65_507 || self.max_state_size > 1 << 30 {
            return bad("max_packet_size at most 65,507 bytes, max_state_size at most 1 GiB");
        }
        if self.probe_interval.is_zero() {
            return bad("probe_interval must be positive");
        }
        if self.probe_timeout.is_zero() || self.probe_timeout >= self.probe_interval {
            return bad("probe_timeout must be positive and below probe_interval");
        }
        if self.suspicion_mult == 0 || self.suspicion_max_mult == 0 {
            return bad("suspicion multipliers must be positive");
        }
        if self.retransmit_mult == 0 {
            return bad("retransmit_mult must be positive");
        }
        if self.gossip_interval.is_zero() || self.push_pull_interval.is_zero() {
            return bad("gossip_interval and push_pull_interval must be positive");
        }
        if self.awareness_max == 0 {
            return bad("awareness_max must be at least 1");
        }
        if self.max_members < 2 || self.max_members > 1 << 24 {
            return bad("max_members must be between 2 and 16,777,216");
        }
        if self.max_name_len == 0 || self.max_name_len > 1024 {
            return bad("max_name_len must be between 1 and 1024");
        }
        if self.join_retry_interval.is_zero() || self.reconnect_interval.is_zero() {
            return bad("join_retry_interval and reconnect_interval must be positive");
        }
        // A packet must hold a ping to a suspect (ping plus the suspicion),
        // and one full alive update (the largest message) alone, or updates
        // with full metadata never travel.
        let needed = crate::wire::HEADER_LEN
            + (crate::wire::max_ping_len(self.max_name_len)
                + crate::wire::max_accusation_len(self.max_name_len))
            .max(crate::wire::max_alive_len(
                self.max_name_len,
                self.max_metadata_len,
            ));
        if self.max_packet_size < needed {
            return bad("max_packet_size too small for a ping plus one update with full metadata");
        }
        if self.max_state_size < self.max_packet_size {
            return bad("max_state_size must be at least max_packet_size");
        }
        if self.max_clock_drift_percent > 100 {
            return bad("max_clock_drift_percent at most 100");
        }
        if self.lease != LeaseStrategy::Off && self.lease_period <= self.probe_interval {
            return bad("lease_period must exceed probe_interval (probes renew the lease)");
        }
        if self.lease == LeaseStrategy::Majority
            && self.lease_period
                < self
                    .probe_interval
                    .saturating_mul(self.suspicion_mult)
                    .saturating_mul(MAJORITY_LEASE_SUSPICIONS)
        {
            // The view-majority rule decides from suspicions: with a shorter
            // lease a minority node has not suspected enough of the other
            // side before the majority takes its datums (the simulator found
            // 5-20 % of 16-node partitions unsafe at 5 probe intervals).
            return bad(
                "LeaseStrategy::Majority needs lease_period of at least 2 × suspicion_mult × probe_interval",
            );
        }
        if self.max_queued_transmits == 0 || self.max_queued_events == 0 {
            return bad("queue limits must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_valid() {
        Config::lan().validate().unwrap();
        Config::wan().validate().unwrap();
        Config::local().validate().unwrap();
        assert_eq!(Config::default(), Config::lan());
    }

    #[test]
    fn takeover_delay_covers_the_lease() {
        let lan = Config::lan();
        assert_eq!(lan.takeover_delay(), Duration::from_millis(1200));
        let off = Config {
            lease: LeaseStrategy::Off,
            ..Config::lan()
        };
        assert_eq!(off.takeover_delay(), Duration::ZERO);
        assert!(lan.takeover_from_suspicion());
        assert!(!off.takeover_from_suspicion());
        let majority = Config {
            lease: LeaseStrategy::Majority,
            ..Config::lan()
        };
        assert!(!majority.takeover_from_suspicion());
        let short = Config {
            lease_period: lan.probe_interval,
            ..Config::lan()
        };
        assert!(short.validate().is_err());
    }

    #[test]
    fn the_view_majority_rule_needs_a_longer_lease_than_lan_gives() {
        // `lan` leases last 10 probe intervals, enough for the witness rule
        // but not for the view-majority rule, which must not be chosen
        // with it silently.
        let majority = Config {
            lease: LeaseStrategy::Majority,
            ..Config::lan()
        };
        assert!(matches!(majority.validate(), Err(Error::InvalidConfig(_))));
        let majority = Config {
            lease_period: Duration::from_secs(2),
            ..majority
        };
        majority.validate().unwrap();
        assert_eq!(majority.takeover_delay(), Duration::from_millis(2300));
        Config::lan().validate().unwrap();
    }

    #[test]
    fn rejects_packets_too_small_for_metadata() {
        let config = Config {
            max_packet_size: 650,
            ..Config::lan()
        };
        assert!(matches!(config.validate(), Err(Error::InvalidConfig(_))));
        let config = Config {
            max_packet_size: 600,
            max_metadata_len: 64,
            max_name_len: 64,
            ..Config::lan()
        };
        config.validate().unwrap();
    }

    #[test]
    fn rejects_values_that_could_overflow() {
        for config in [
            Config {
                probe_interval: Duration::MAX,
                ..Config::lan()
            },
            Config {
                suspicion_mult: u32::MAX,
                ..Config::lan()
            },
            Config {
                max_packet_size: usize::MAX,
                ..Config::lan()
            },
            Config {
                reap_after: Duration::MAX,
                ..Config::lan()
            },
        ] {
            assert!(matches!(config.validate(), Err(Error::InvalidConfig(_))));
        }
    }

    #[test]
    fn rejects_timeout_above_interval() {
        let config = Config {
            probe_timeout: Duration::from_millis(300),
            ..Config::lan()
        };
        assert!(config.validate().is_err());
    }
}
