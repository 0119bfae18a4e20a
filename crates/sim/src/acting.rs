//! The acting-owner check of the transition app: at every step, at most one
//! process *acts as owner* of each datum, and (for the liveness check) when
//! every datum last lacked a ready owner that acts.
//!
//! A process acts as owner of a datum at an instant when it holds the datum
//! per its handoff (`Handoff::token` is `Some`: from the hand-out of the
//! acquire job to the success of the relinquish), its handoff is not fenced,
//! its lease is valid at that instant (`Membership::standing(now)`, what the
//! handoff is told with `set_standing`) and it is not frozen (paused). A
//! holder some member declared failed gets no exception.
//!
//! Costs: the application reports each change of a process's holdings
//! ([`ActingOwners::set_owned`], O(1)); after every step the simulator
//! hands every process's flags to [`ActingOwners::refresh`] (O(1) unless a
//! flag changed, then O(datums) for that process). Per datum the number of
//! acting holders and of acting ready holders is kept, with the number of
//! datums held twice and of datums without a ready acting owner.

/// One process slot's holdings as the check counts them.
#[derive(Clone, Debug, Default)]
struct SlotOwner {
    /// The generation these holdings belong to.
    generation: u64,
    /// Datum id -> held (per the handoff).
    owned: Vec<bool>,
    /// Held, lease valid, not frozen, not fenced: counted in `acting`.
    acting: bool,
    /// Acting and ready: counted in `serving`.
    serving: bool,
}

/// Acting owners per datum, updated incrementally.
#[derive(Clone, Debug)]
pub(crate) struct ActingOwners {
    datums: usize,
    slots: Vec<SlotOwner>,
    /// Datum id -> processes acting as its owner.
    acting: Vec<u32>,
    /// Datum id -> ready processes acting as its owner.
    serving: Vec<u32>,
    /// Datums with two acting owners or more.
    doubled: usize,
    /// Datums without a ready acting owner.
    unserved: usize,
}

impl ActingOwners {
    /// No process holds anything: every datum is unserved.
    pub(crate) fn new(datums: usize) -> ActingOwners {
        ActingOwners {
            datums,
            slots: Vec::new(),
            acting: vec![0; datums],
            serving: vec![0; datums],
            doubled: 0,
            unserved: datums,
        }
    }

    fn slot_mut(&mut self, slot: u32, generation: u64) -> &mut SlotOwner {
        let i = slot as usize;
        if self.slots.len() <= i {
            self.slots.resize_with(i + 1, SlotOwner::default);
        }
        if self
            .slots
            .get(i)
            .is_some_and(|s| s.generation != generation)
        {
            self.retire(slot);
            if let Some(s) = self.slots.get_mut(i) {
                s.generation = generation;
            }
        }
        let datums = self.datums;
        let s = &mut self.slots[i];
        if s.owned.len() != datums {
            s.owned = vec![false; datums];
        }
        s
    }

    /// Adds (`sign` true) or removes one holder of `d` with these flags.
    fn count(&mut self, d: usize, acting: bool, serving: bool, add: bool) {
        if acting && let Some(c) = self.acting.get_mut(d) {
            if add {
                *c += 1;
                if *c == 2 {
                    self.doubled += 1;
                }
            } else {
                if *c == 2 {
                    self.doubled -= 1;
                }
                *c = c.saturating_sub(1);
            }
        }
        if serving && let Some(c) = self.serving.get_mut(d) {
            if add {
                *c += 1;
                if *c == 1 {
                    self.unserved -= 1;
                }
            } else {
                if *c == 1 {
                    self.unserved += 1;
                }
                *c = c.saturating_sub(1);
            }
        }
    }

    /// The process (slot, generation) holds `datum` or not, per its handoff.
    /// A new generation in the slot retires the old one's holdings.
    pub(crate) fn set_owned(&mut self, slot: u32, generation: u64, datum: i64, owned: bool) {
        let Ok(d) = usize::try_from(datum) else {
            return;
        };
        if d >= self.datums {
            return;
        }
        let s = self.slot_mut(slot, generation);
        if s.owned[d] == owned {
            return;
        }
        s.owned[d] = owned;
        let (acting, serving) = (s.acting, s.serving);
        self.count(d, acting, serving, owned);
    }

    /// The slot's process stopped, or was replaced by a new generation: it
    /// holds nothing any more.
    pub(crate) fn retire(&mut self, slot: u32) {
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return;
        };
        let owned = std::mem::take(&mut s.owned);
        let (acting, serving) = (s.acting, s.serving);
        s.acting = false;
        s.serving = false;
        for (d, _) in owned.iter().enumerate().filter(|(_, o)| **o) {
            self.count(d, acting, serving, false);
        }
    }

    /// The process's flags at this instant: whether it may act as owner
    /// (lease valid, not frozen, not fenced) and whether it is ready.
    pub(crate) fn refresh(&mut self, slot: u32, generation: u64, acting: bool, ready: bool) {
        let serving = acting && ready;
        let s = self.slot_mut(slot, generation);
        if s.acting == acting && s.serving == serving {
            return;
        }
        let (was_acting, was_serving) = (s.acting, s.serving);
        s.acting = acting;
        s.serving = serving;
        let owned = std::mem::take(&mut s.owned);
        for (d, _) in owned.iter().enumerate().filter(|(_, o)| **o) {
            self.count(d, was_acting, was_serving, false);
            self.count(d, acting, serving, true);
        }
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.owned = owned;
        }
    }

    /// A datum with two acting owners or more, and the slots of its
    /// acting owners.
    pub(crate) fn doubled(&self) -> Option<(i64, Vec<(u32, u64)>)> {
        if self.doubled == 0 {
            return None;
        }
        let d = self.acting.iter().position(|&c| c >= 2)?;
        let owners = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.acting && s.owned.get(d).copied().unwrap_or(false))
            .map(|(i, s)| (i as u32, s.generation))
            .collect();
        Some((d as i64, owners))
    }

    /// How many datums have no ready acting owner.
    pub(crate) fn unserved(&self) -> usize {
        self.unserved
    }

    /// One datum without a ready acting owner, if any.
    pub(crate) fn an_unserved(&self) -> Option<i64> {
        self.serving.iter().position(|&c| c == 0).map(|d| d as i64)
    }

    /// Whether the check counts `datum` as held by (slot, generation).
    pub(crate) fn owns(&self, slot: u32, generation: u64, datum: i64) -> bool {
        let Ok(d) = usize::try_from(datum) else {
            return false;
        };
        self.slots
            .get(slot as usize)
            .is_some_and(|s| s.generation == generation && s.owned.get(d).copied().unwrap_or(false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_acting_holders_are_counted_and_a_lapsed_one_is_not() {
        let mut a = ActingOwners::new(4);
        a.refresh(0, 1, true, true);
        a.refresh(1, 2, false, true);
        a.set_owned(0, 1, 2, true);
        a.set_owned(1, 2, 2, true);
        assert!(a.doubled().is_none(), "slot 1 has no lease");
        assert_eq!(a.unserved(), 3);
        a.refresh(1, 2, true, true);
        assert_eq!(a.doubled(), Some((2, vec![(0, 1), (1, 2)])));
        a.refresh(0, 1, false, true);
        assert!(a.doubled().is_none());
        assert_eq!(a.unserved(), 3);
        a.set_owned(1, 2, 2, false);
        assert_eq!(a.unserved(), 4);
        assert_eq!(a.an_unserved(), Some(0));
    }

    #[test]
    fn a_new_generation_retires_the_old_holdings() {
        let mut a = ActingOwners::new(2);
        a.refresh(3, 1, true, true);
        a.set_owned(3, 1, 0, true);
        a.set_owned(3, 1, 1, true);
        assert_eq!(a.unserved(), 0);
        a.refresh(3, 2, true, false);
        assert!(!a.owns(3, 1, 0));
        assert_eq!(a.unserved(), 2);
        a.set_owned(3, 2, 1, true);
        assert!(a.owns(3, 2, 1));
        assert_eq!(a.unserved(), 2, "not ready: acting but not serving");
        a.retire(3);
        assert!(!a.owns(3, 2, 1));
        assert!(a.doubled().is_none());
    }
}
