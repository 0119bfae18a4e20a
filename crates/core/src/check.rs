//! The ownership ledger (feature `check`): the ground truth of which
//! process holds which datum and where each piece of work was processed,
//! and the invariants a cluster of nodes must keep, checked as events
//! happen. It is the one set of rules for every checker of ownership: the
//! handoff harness (`shoal_sim::harness`) checks against it, and so are the
//! simulator's campaigns and the facade's tests to:
//!
//! - **single owner**: a process starts holding a datum (its acquire job
//!   starts, or a failed acquire leaves it held) only when no other process
//!   holds it, unless one of the two was declared failed by the cluster
//!   (failover: counted in [`Ledger::overlaps_with_declared`]). With
//!   leases, an overlap with a holder nobody declared failed is only
//!   counted ([`Ledger::overlaps_with_lapsed`]): that holder may have lost
//!   its lease, and the acting-owner check decides. A holder holds until
//!   its relinquish finished, so this also proves relinquish before
//!   acquire;
//! - **work where held**: a piece of work is processed only by a process
//!   that holds its datum;
//! - **exactly once**: every piece of work issued is processed exactly
//!   once, except work that may have been lost with a crashed process
//!   ([`Ledger::maybe_lost`]), which is processed at most once.
//!
//! The ledger is generic over the key of a process `K` (a node index, a
//! name and generation...). Virtual time comes in as a [`Duration`] since
//! the start of the run and is written in every violation.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::time::Duration;

/// A piece of work issued, and how many times it was processed.
#[derive(Clone, Copy, Debug)]
struct WorkRecord {
    datum: i64,
    processed: u32,
}

/// Who holds what, work processed, and every rule broken. See the module
/// documentation for the rules.
#[derive(Debug)]
pub struct Ledger<K> {
    leases: bool,
    /// Datum id -> processes holding it, in the order they started.
    holders: HashMap<i64, Vec<K>>,
    /// Processes the cluster declared failed.
    declared: HashSet<K>,
    /// Datum id -> when a process last started holding it.
    acquired_at: HashMap<i64, Duration>,
    /// Work id -> its datum and times processed.
    work: BTreeMap<u64, WorkRecord>,
    /// Work that may have been lost with a crashed process.
    maybe_lost: BTreeSet<u64>,
    overlaps_with_declared: u64,
    overlaps_with_lapsed: u64,
    violations: Vec<String>,
}

impl<K: Clone + Eq + Hash + Debug> Ledger<K> {
    /// An empty ledger. With `leases`, an overlap with a holder nobody
    /// declared failed is counted, not a violation.
    #[must_use]
    pub fn new(leases: bool) -> Ledger<K> {
        Ledger {
            leases,
            holders: HashMap::new(),
            declared: HashSet::new(),
            acquired_at: HashMap::new(),
            work: BTreeMap::new(),
            maybe_lost: BTreeSet::new(),
            overlaps_with_declared: 0,
            overlaps_with_lapsed: 0,
            violations: Vec::new(),
        }
    }

    /// Records a violation found outside the ledger's own rules, at `at`.
    pub fn violation(&mut self, at: Duration, what: impl std::fmt::Display) {
        self.violations.push(format!("{at:?}: {what}"));
    }

    /// Every violation so far, in order.
    #[must_use]
    pub fn violations(&self) -> &[String] {
        &self.violations
    }

    /// Takes the violations so far.
    pub fn take_violations(&mut self) -> Vec<String> {
        std::mem::take(&mut self.violations)
    }

    /// The cluster declared `who` failed: from now on its holding no longer
    /// counts against a process that starts holding, nor its own against
    /// others.
    pub fn declare_failed(&mut self, who: &K) {
        self.declared.insert(who.clone());
    }

    /// `who` counts as live again. For checkers that key a process by its
    /// name only, so that a node back as a new generation has the key of
    /// the one declared failed: call it once the cluster settled again,
    /// after the old generation's holdings were taken over
    /// ([`Self::take_over`]).
    pub fn revive(&mut self, who: &K) {
        self.declared.remove(who);
    }

    /// Whether the cluster declared `who` failed.
    #[must_use]
    pub fn is_declared(&self, who: &K) -> bool {
        self.declared.contains(who)
    }

    /// `who` starts holding `datum` at `at` (its acquire job starts, or a
    /// failed acquire leaves it held). A violation when another process
    /// holds it, neither declared failed, without leases.
    pub fn start_holding(&mut self, who: &K, datum: i64, at: Duration) {
        self.acquired_at.insert(datum, at);
        let set = self.holders.entry(datum).or_default();
        let mut overlap = false;
        let mut lapsed = false;
        let mut live = Vec::new();
        for other in set.iter().filter(|k| *k != who) {
            if self.declared.contains(other) || self.declared.contains(who) {
                overlap = true;
            } else if self.leases {
                lapsed = true;
            } else {
                live.push(other.clone());
            }
        }
        if !set.contains(who) {
            set.push(who.clone());
        }
        if overlap {
            self.overlaps_with_declared += 1;
        }
        if lapsed {
            self.overlaps_with_lapsed += 1;
        }
        if !live.is_empty() {
            self.violations.push(format!(
                "{at:?}: {who:?} acquires datum {datum} while {live:?} (live, not declared \
                 failed) hold it"
            ));
        }
    }

    /// As [`Self::start_holding`], then every holder of `datum` declared
    /// failed stops holding it: a takeover voids a failed process's claim
    /// (it fenced itself, or will, and never relinquishes).
    pub fn take_over(&mut self, who: &K, datum: i64, at: Duration) {
        self.start_holding(who, datum, at);
        if let Some(set) = self.holders.get_mut(&datum) {
            let declared = &self.declared;
            set.retain(|k| k == who || !declared.contains(k));
        }
    }

    /// How many datums some process holds.
    #[must_use]
    pub fn held_count(&self) -> usize {
        self.holders.values().filter(|s| !s.is_empty()).count()
    }

    /// `who` stops holding `datum` (its relinquish finished, its acquire
    /// failed, or it gave the datum up).
    pub fn stop_holding(&mut self, who: &K, datum: i64) {
        if let Some(set) = self.holders.get_mut(&datum) {
            set.retain(|k| k != who);
        }
    }

    /// `who` stops holding everything (it crashed, stopped, or fenced
    /// itself); returns the datums it held, in order.
    pub fn drop_process(&mut self, who: &K) -> Vec<i64> {
        let mut held = Vec::new();
        for (datum, set) in &mut self.holders {
            let before = set.len();
            set.retain(|k| k != who);
            if set.len() != before {
                held.push(*datum);
            }
        }
        held.sort_unstable();
        held
    }

    /// Whether `who` holds `datum`.
    #[must_use]
    pub fn holds(&self, who: &K, datum: i64) -> bool {
        self.holders.get(&datum).is_some_and(|s| s.contains(who))
    }

    /// The datums `who` holds, in order.
    #[must_use]
    pub fn held_by(&self, who: &K) -> Vec<i64> {
        let mut held: Vec<i64> = self
            .holders
            .iter()
            .filter(|(_, set)| set.contains(who))
            .map(|(d, _)| *d)
            .collect();
        held.sort_unstable();
        held
    }

    /// The processes holding `datum`, in the order they started.
    #[must_use]
    pub fn holders(&self, datum: i64) -> &[K] {
        self.holders.get(&datum).map_or(&[], Vec::as_slice)
    }

    /// When a process last started holding `datum` (None: never).
    #[must_use]
    pub fn acquired_at(&self, datum: i64) -> Option<Duration> {
        self.acquired_at.get(&datum).copied()
    }

    /// Starts holding that overlapped a holder declared failed (allowed).
    #[must_use]
    pub fn overlaps_with_declared(&self) -> u64 {
        self.overlaps_with_declared
    }

    /// With leases: starts holding that overlapped a holder nobody
    /// declared failed (it may have lost its lease).
    #[must_use]
    pub fn overlaps_with_lapsed(&self) -> u64 {
        self.overlaps_with_lapsed
    }

    /// A piece of work `id` for `datum` was issued (by a client): it must
    /// be processed exactly once.
    pub fn issue(&mut self, id: u64, datum: i64) {
        self.work.entry(id).or_insert(WorkRecord {
            datum,
            processed: 0,
        });
    }

    /// Work issued so far.
    #[must_use]
    pub fn issued(&self) -> usize {
        self.work.len()
    }

    /// `who` processed work `id` for `datum` at `at`. A violation when
    /// `who` does not hold `datum`, and when the work was processed
    /// before.
    pub fn process(&mut self, who: &K, id: u64, datum: i64, at: Duration) {
        if !self.holds(who, datum) {
            self.violations.push(format!(
                "{at:?}: {who:?} processes work {id} for datum {datum} it does not hold"
            ));
        }
        let record = self.work.entry(id).or_insert(WorkRecord {
            datum,
            processed: 0,
        });
        record.processed = record.processed.saturating_add(1);
        if record.processed > 1 {
            self.violations.push(format!(
                "{at:?}: work {id} (datum {datum}) processed {} times",
                record.processed
            ));
        }
    }

    /// Times work `id` was processed.
    #[must_use]
    pub fn times_processed(&self, id: u64) -> u32 {
        self.work.get(&id).map_or(0, |r| r.processed)
    }

    /// Work `id` may have been lost with a crashed process: it need not be
    /// processed.
    pub fn maybe_lost(&mut self, id: u64) {
        self.maybe_lost.insert(id);
    }

    /// Work that may have been lost.
    #[must_use]
    pub fn lost(&self) -> usize {
        self.maybe_lost.len()
    }

    /// At the end of a run: one violation per piece of work issued and
    /// never processed without having been maybe lost (work processed
    /// twice was reported when it happened).
    #[must_use]
    pub fn unprocessed(&self, at: Duration) -> Vec<String> {
        self.work
            .iter()
            .filter(|(id, r)| r.processed == 0 && !self.maybe_lost.contains(id))
            .map(|(id, r)| format!("{at:?}: work {id} (datum {}) never processed", r.datum))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(5);

    #[test]
    fn a_second_holder_is_a_violation() {
        let mut l: Ledger<u32> = Ledger::new(false);
        l.start_holding(&1, 7, T);
        assert!(l.violations().is_empty());
        l.start_holding(&2, 7, T * 2);
        assert_eq!(l.violations().len(), 1, "{:?}", l.violations());
        assert!(l.violations()[0].contains("acquires datum 7"));
        assert!(l.violations()[0].starts_with("10ms"));
        assert_eq!(l.holders(7), &[1, 2]);
    }

    #[test]
    fn a_takeover_voids_a_declared_holder_and_a_revived_key_counts_again() {
        let mut l: Ledger<u32> = Ledger::new(false);
        l.start_holding(&1, 7, T);
        l.start_holding(&1, 8, T);
        l.declare_failed(&1);
        l.take_over(&2, 7, T);
        assert_eq!(l.holders(7), &[2]);
        assert_eq!(l.overlaps_with_declared(), 1);
        assert_eq!(l.held_count(), 2);
        l.revive(&1);
        // Live again: its stale claim on 8 counts against a newcomer.
        l.take_over(&3, 8, T);
        assert_eq!(l.violations().len(), 1, "{:?}", l.violations());
    }

    #[test]
    fn starting_again_where_held_is_no_violation() {
        let mut l: Ledger<u32> = Ledger::new(false);
        l.start_holding(&1, 7, T);
        l.start_holding(&1, 7, T);
        assert!(l.violations().is_empty());
        assert_eq!(l.holders(7), &[1]);
    }

    #[test]
    fn a_holder_that_stopped_does_not_count() {
        let mut l: Ledger<u32> = Ledger::new(false);
        l.start_holding(&1, 7, T);
        l.stop_holding(&1, 7);
        l.start_holding(&2, 7, T);
        assert!(l.violations().is_empty());
        assert!(!l.holds(&1, 7) && l.holds(&2, 7));
    }

    #[test]
    fn a_dropped_process_holds_nothing() {
        let mut l: Ledger<u32> = Ledger::new(false);
        l.start_holding(&1, 7, T);
        l.start_holding(&1, 3, T);
        l.start_holding(&2, 4, T);
        assert_eq!(l.held_by(&1), vec![3, 7]);
        assert_eq!(l.drop_process(&1), vec![3, 7]);
        assert!(l.held_by(&1).is_empty());
        l.start_holding(&2, 7, T);
        assert!(l.violations().is_empty());
    }

    #[test]
    fn an_overlap_with_a_declared_holder_is_counted_not_a_violation() {
        let mut l: Ledger<u32> = Ledger::new(false);
        l.start_holding(&1, 7, T);
        l.declare_failed(&1);
        l.start_holding(&2, 7, T);
        assert!(l.violations().is_empty());
        assert_eq!(l.overlaps_with_declared(), 1);
        // The declared process acquiring while a live one holds: failover
        // seen from the other side, allowed too.
        l.start_holding(&1, 8, T);
        l.start_holding(&3, 9, T);
        l.start_holding(&1, 9, T);
        assert!(l.violations().is_empty());
        assert_eq!(l.overlaps_with_declared(), 2);
        assert!(l.is_declared(&1) && !l.is_declared(&2));
    }

    #[test]
    fn with_leases_an_overlap_with_a_live_holder_is_only_counted() {
        let mut l: Ledger<u32> = Ledger::new(true);
        l.start_holding(&1, 7, T);
        l.start_holding(&2, 7, T);
        assert!(l.violations().is_empty());
        assert_eq!(l.overlaps_with_lapsed(), 1);
        assert_eq!(l.overlaps_with_declared(), 0);
    }

    #[test]
    fn acquired_at_is_the_last_start() {
        let mut l: Ledger<u32> = Ledger::new(false);
        assert_eq!(l.acquired_at(7), None);
        l.start_holding(&1, 7, T);
        l.stop_holding(&1, 7);
        l.start_holding(&2, 7, T * 3);
        assert_eq!(l.acquired_at(7), Some(T * 3));
    }

    #[test]
    fn work_is_processed_only_where_held() {
        let mut l: Ledger<u32> = Ledger::new(false);
        l.issue(0, 7);
        l.process(&1, 0, 7, T);
        assert_eq!(l.violations().len(), 1);
        assert!(l.violations()[0].contains("does not hold"));
        l.start_holding(&1, 7, T);
        l.issue(1, 7);
        l.process(&1, 1, 7, T);
        assert_eq!(l.violations().len(), 1);
    }

    #[test]
    fn work_is_processed_once() {
        let mut l: Ledger<u32> = Ledger::new(false);
        l.start_holding(&1, 7, T);
        l.issue(0, 7);
        l.process(&1, 0, 7, T);
        assert!(l.violations().is_empty());
        l.process(&1, 0, 7, T);
        assert_eq!(l.times_processed(0), 2);
        assert_eq!(l.violations().len(), 1);
        assert!(l.violations()[0].contains("processed 2 times"));
    }

    #[test]
    fn work_never_processed_is_a_violation_unless_maybe_lost() {
        let mut l: Ledger<u32> = Ledger::new(false);
        l.start_holding(&1, 7, T);
        for id in 0..3 {
            l.issue(id, 7);
        }
        assert_eq!(l.issued(), 3);
        l.process(&1, 0, 7, T);
        l.maybe_lost(1);
        assert_eq!(l.lost(), 1);
        let v = l.unprocessed(T);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("work 2 (datum 7) never processed"));
    }

    #[test]
    fn violations_are_taken() {
        let mut l: Ledger<u32> = Ledger::new(false);
        l.violation(T, "something");
        assert_eq!(l.take_violations(), vec!["5ms: something".to_owned()]);
        assert!(l.violations().is_empty());
    }
}
