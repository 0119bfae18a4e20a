//! The ownership lease as the driver reads it: a deadline the membership
//! task writes after every step (from `Membership::standing`) and the driver
//! reads at every routing decision, so a node woken from a pause never
//! processes work under a lease that lapsed while it was frozen, whichever
//! of its tasks runs first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use shoal_membership::Standing;

/// No lease: the node may not act as an owner.
const NONE: u64 = 0;
/// A lease without expiry (strategy `Off`).
const FOREVER: u64 = u64::MAX;

/// The lease deadline, shared by the membership task (writer) and the driver
/// (reader): nanoseconds after `base`, or [`NONE`] / [`FOREVER`].
#[derive(Debug)]
pub(crate) struct LeaseCell {
    base: Instant,
    until: AtomicU64,
}

impl LeaseCell {
    /// A cell whose lease is valid until told otherwise (a node starting
    /// alone may act at once; membership corrects it on its first step).
    pub(crate) fn new(base: Instant) -> LeaseCell {
        LeaseCell {
            base,
            until: AtomicU64::new(FOREVER),
        }
    }

    /// Records what membership says now.
    pub(crate) fn set(&self, standing: &Standing) {
        let v = match standing {
            Standing::Valid { until: None } => FOREVER,
            Standing::Valid { until: Some(t) } => {
                let nanos = t.saturating_duration_since(self.base).as_nanos();
                u64::try_from(nanos)
                    .unwrap_or(FOREVER - 1)
                    .clamp(1, FOREVER - 1)
            }
            _ => NONE,
        };
        self.until.store(v, Ordering::Release);
    }

    /// The lease as the node core takes it.
    pub(crate) fn lease(&self) -> shoal_core::Lease {
        match self.until.load(Ordering::Acquire) {
            NONE => shoal_core::Lease::None,
            FOREVER => shoal_core::Lease::Forever,
            v => shoal_core::Lease::Until(self.base + Duration::from_nanos(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_lapses_at_its_deadline_and_invalid_standings_are_none() {
        let base = Instant::now();
        let cell = LeaseCell::new(base);
        assert!(cell.lease().valid(base + Duration::from_secs(1000)));
        let until = base + Duration::from_secs(2);
        cell.set(&Standing::Valid { until: Some(until) });
        assert!(cell.lease().valid(base + Duration::from_millis(1999)));
        assert!(!cell.lease().valid(until));
        assert_eq!(cell.lease().expiry(), Some(until));
        cell.set(&Standing::NoContact { last_contact: None });
        assert!(!cell.lease().valid(base));
        assert_eq!(cell.lease().expiry(), None);
        cell.set(&Standing::Valid { until: None });
        assert!(cell.lease().valid(base + Duration::from_secs(1 << 20)));
    }
}
