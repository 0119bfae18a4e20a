//! Lifeguard's suspicion timer and the other formulas of the protocol.

use std::time::{Duration, Instant};

/// Minimal suspicion timeout: `mult × max(1, log10(max(1, n))) × interval`.
pub(crate) fn suspicion_min(mult: u32, n: usize, interval: Duration) -> Duration {
    let scale = (n.max(1) as f64).log10().max(1.0);
    interval.mul_f64(f64::from(mult) * scale)
}

/// Timeout after `confirmations` independent confirmations:
/// `max(min, max − (max − min) × ln(C + 1) / ln(k + 1))`, or `min` at once
/// when no confirmation is expected (`k == 0`).
pub(crate) fn suspicion_timeout(
    min: Duration,
    max: Duration,
    k: u32,
    confirmations: u32,
) -> Duration {
    if k == 0 || max <= min {
        return min;
    }
    let fraction = f64::from(confirmations + 1).ln() / f64::from(k + 1).ln();
    let shrink = (max - min).mul_f64(fraction.min(1.0));
    max.saturating_sub(shrink).max(min)
}

/// How many times each node piggybacks an update: `mult × ceil(log10(n + 1))`.
pub(crate) fn retransmit_limit(mult: u32, n: usize) -> u32 {
    let scale = ((n as f64) + 1.0).log10().ceil() as u32;
    mult.saturating_mul(scale.max(1))
}

/// memberlist's push-pull scaling: the interval grows by one step per
/// doubling of the cluster above 32 members.
pub(crate) fn push_pull_scale(interval: Duration, n: usize) -> Duration {
    const THRESHOLD: f64 = 32.0;
    if n as f64 <= THRESHOLD {
        return interval;
    }
    let steps = ((n as f64).log2() - THRESHOLD.log2()).ceil() + 1.0;
    interval.mul_f64(steps)
}

/// One member's suspicion: who accused it and when it will be declared dead.
#[derive(Debug, Clone)]
pub(crate) struct Suspicion {
    pub start: Instant,
    pub min: Duration,
    pub max: Duration,
    /// Confirmations expected.
    pub k: u32,
    /// Hashes of the distinct accusers; the first is the original one.
    accusers: Vec<u64>,
    pub deadline: Instant,
    /// When the deadline was last computed (a confirmation can move it into
    /// the past; that is not lateness).
    pub set_at: Instant,
    /// The deadline was already extended once because this node woke late.
    pub graced: bool,
}

impl Suspicion {
    pub(crate) fn new(accuser: u64, start: Instant, min: Duration, max: Duration, k: u32) -> Self {
        let deadline = start + suspicion_timeout(min, max, k, 0);
        let accusers = vec![accuser];
        Suspicion {
            start,
            min,
            max,
            k,
            accusers,
            deadline,
            set_at: start,
            graced: false,
        }
    }

    /// Independent confirmations so far (the first accuser excluded).
    pub(crate) fn confirmations(&self) -> u32 {
        u32::try_from(self.accusers.len().saturating_sub(1)).unwrap_or(u32::MAX)
    }

    /// Counts `accuser` once; returns true (and moves the deadline earlier)
    /// when it is a new confirmation that still matters.
    pub(crate) fn confirm(&mut self, accuser: u64, now: Instant) -> bool {
        if self.confirmations() >= self.k || self.accusers.contains(&accuser) {
            return false;
        }
        self.accusers.push(accuser);
        self.set_at = now;
        self.deadline =
            self.start + suspicion_timeout(self.min, self.max, self.k, self.confirmations());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(d: Duration) -> u128 {
        d.as_millis()
    }

    #[test]
    fn min_scales_with_log10_of_members() {
        let second = Duration::from_secs(1);
        assert_eq!(suspicion_min(4, 0, second), Duration::from_secs(4));
        assert_eq!(suspicion_min(4, 5, second), Duration::from_secs(4));
        assert_eq!(suspicion_min(4, 10, second), Duration::from_secs(4));
        assert_eq!(suspicion_min(4, 100, second), Duration::from_secs(8));
        assert_eq!(ms(suspicion_min(4, 16, second)), 4816);
        assert_eq!(ms(suspicion_min(4, 16, Duration::from_millis(200))), 963);
    }

    #[test]
    fn timeout_shrinks_with_confirmations() {
        let min = Duration::from_secs(2);
        let max = Duration::from_secs(12);
        // k = 2 (mult 4): 0 → max, 1 → max − 10 × ln2/ln3, 2 → min.
        assert_eq!(suspicion_timeout(min, max, 2, 0), max);
        assert_eq!(ms(suspicion_timeout(min, max, 2, 1)), 5690);
        assert_eq!(suspicion_timeout(min, max, 2, 2), min);
        assert_eq!(suspicion_timeout(min, max, 2, 5), min);
        assert_eq!(suspicion_timeout(min, max, 0, 0), min);
    }

    #[test]
    fn suspicion_counts_each_accuser_once() {
        let start = Instant::now();
        let min = Duration::from_secs(2);
        let max = Duration::from_secs(12);
        let mut s = Suspicion::new(1, start, min, max, 2);
        assert_eq!(s.deadline, start + max);
        assert!(
            !s.confirm(1, start),
            "the original accuser does not confirm"
        );
        assert!(s.confirm(2, start));
        assert!(!s.confirm(2, start), "a repeated accuser counts once");
        assert_eq!(s.confirmations(), 1);
        assert_eq!(ms(s.deadline - start), 5690);
        assert!(s.confirm(3, start));
        assert_eq!(s.deadline, start + min);
        assert!(
            !s.confirm(4, start),
            "beyond k confirmations nothing changes"
        );
    }

    #[test]
    fn retransmit_limit_grows_with_log_n() {
        assert_eq!(retransmit_limit(4, 1), 4);
        assert_eq!(retransmit_limit(4, 9), 4);
        assert_eq!(retransmit_limit(4, 10), 8);
        assert_eq!(retransmit_limit(4, 16), 8);
        assert_eq!(retransmit_limit(4, 99), 8);
        assert_eq!(retransmit_limit(4, 100), 12);
        assert_eq!(retransmit_limit(4, 10_000), 20);
    }

    #[test]
    fn push_pull_interval_scales_above_32() {
        let base = Duration::from_secs(30);
        assert_eq!(push_pull_scale(base, 32), base);
        assert_eq!(push_pull_scale(base, 33), base * 2);
        assert_eq!(push_pull_scale(base, 64), base * 2);
        assert_eq!(push_pull_scale(base, 65), base * 3);
        assert_eq!(push_pull_scale(base, 10_000), base * 10);
    }
}
