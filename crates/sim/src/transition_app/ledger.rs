//! The cross-node ledger (who holds what, work processed, counters) and the
//! checks once a run settled.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_core::check::Ledger;
use shoal_placement::PlacementTable;

use super::{AppWork, Key, TransitionNode, TransitionSettings, TransitionStats, key_of};
use crate::acting::ActingOwners;
use crate::sim::Sim;

/// The cross-node ledger: who holds what, work processed, counters. The
/// ownership rules are the project's one set
/// ([`shoal_core::check::Ledger`]): a process starts holding a datum only
/// where no other holds it unless one of them was declared failed (with
/// leases such an overlap is only counted, and the acting-owner check
/// decides), work is processed only where held and exactly once unless it
/// may have been lost with a stopped process.
pub struct TransitionLedger {
    pub(super) settings: TransitionSettings,
    pub(super) base: Instant,
    /// Who holds what, work issued and processed, processes declared failed.
    pub(super) owners: Ledger<Key>,
    /// Datum id -> the last process that acquired it.
    pub(super) last_holder: Vec<Option<Key>>,
    /// Work returned to "the client", routed again by the next live node.
    pub(super) orphans: Vec<AppWork>,
    /// Crashes, with the datums the crashed process held.
    failovers: Vec<Failover>,
    /// With leases: acting owners per datum, checked after every step.
    pub(super) acting: ActingOwners,
    /// With leases: the last instant after the heal at which some datum had
    /// no ready acting owner.
    pub(super) last_unserved: Option<Instant>,
    /// The counters.
    pub stats: TransitionStats,
}

/// One crash: the datums the crashed process held, when each was next
/// acquired, and when the last survivor marked the process failed.
struct Failover {
    victim: Key,
    waiting: HashSet<i64>,
    last_acquired: Option<Instant>,
    detected: Option<Instant>,
}

/// How long after the last survivor marked a crashed process failed every
/// datum it held must be acquired again in `join-leave-kill`: a round of
/// done markers and an acquire job (0 to 20 ms, failing 5 % of the time and
/// retried), far below the 10 s transition timeout.
pub const FAILOVER_MARGIN: Duration = Duration::from_secs(2);

impl TransitionLedger {
    /// A ledger for a run whose virtual time 0 is `base`.
    pub fn new(settings: TransitionSettings, base: Instant) -> TransitionLedger {
        let n = settings.datums as usize;
        let leases = settings.leases;
        TransitionLedger {
            settings,
            base,
            owners: Ledger::new(leases),
            last_holder: vec![None; n],
            orphans: Vec::new(),
            failovers: Vec::new(),
            acting: ActingOwners::new(n),
            last_unserved: None,
            stats: TransitionStats::default(),
        }
    }

    /// `victim` crashed holding `datums`.
    pub(super) fn crashed(&mut self, victim: &Key, datums: Vec<i64>) {
        if datums.is_empty() {
            return;
        }
        self.stats.crashes += 1;
        self.failovers.push(Failover {
            victim: victim.clone(),
            waiting: datums.into_iter().collect(),
            last_acquired: None,
            detected: None,
        });
    }

    /// A survivor marked `victim` failed at `now`.
    pub(super) fn detected(&mut self, victim: &Key, now: Instant) {
        for f in self.failovers.iter_mut().filter(|f| f.victim == *victim) {
            f.detected = Some(f.detected.map_or(now, |d| d.max(now)));
        }
    }

    /// For every crash: when its last datum was acquired again, less when
    /// the last survivor marked it failed (None: a datum never was).
    pub(super) fn failover_lags(&self) -> Vec<(Key, Option<Duration>)> {
        self.failovers
            .iter()
            .map(|f| {
                let lag = match (f.waiting.is_empty(), f.last_acquired, f.detected) {
                    (true, Some(done), Some(detected)) => {
                        Some(done.saturating_duration_since(detected))
                    }
                    (true, _, _) => Some(Duration::ZERO),
                    (false, _, _) => None,
                };
                (f.victim.clone(), lag)
            })
            .collect()
    }

    /// The settings of the run.
    pub fn settings(&self) -> &TransitionSettings {
        &self.settings
    }

    /// The virtual time of `now`.
    fn at(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.base)
    }

    /// The violations the ownership rules found since the last call.
    fn problems(&mut self) -> Option<String> {
        let v = self.owners.take_violations();
        (!v.is_empty()).then(|| v.join("; "))
    }

    /// The cluster declared `who` failed.
    pub(super) fn declare_failed(&mut self, who: &Key) {
        self.owners.declare_failed(who);
    }

    /// `who` starts acquiring `datum` at `now`. Returns a violation if
    /// another live process, not declared failed, holds it (without
    /// leases; with leases such a holder may have lost its lease, and the
    /// acting-owner check decides).
    pub(super) fn start_holding(&mut self, who: &Key, datum: i64, now: Instant) -> Option<String> {
        let at = self.at(now);
        self.owners.start_holding(who, datum, at);
        self.problems()
    }

    /// A process started acquiring `datum` at `now`.
    pub(super) fn acquiring(&mut self, datum: i64, now: Instant) {
        for f in &mut self.failovers {
            if f.waiting.remove(&datum) {
                f.last_acquired = Some(f.last_acquired.map_or(now, |t| t.max(now)));
            }
        }
    }

    pub(super) fn stop_holding(&mut self, who: &Key, datum: i64) {
        self.owners.stop_holding(who, datum);
    }

    /// Whether `who` holds `datum`.
    pub(super) fn holds(&self, who: &Key, datum: i64) -> bool {
        self.owners.holds(who, datum)
    }

    /// `who` stops holding everything (fenced, reborn or stopped); returns
    /// what it held.
    pub(super) fn drop_process(&mut self, who: &Key) -> Vec<i64> {
        self.owners.drop_process(who)
    }

    /// Work `id` may have been lost with a stopped process.
    pub(super) fn maybe_lost(&mut self, id: u64) {
        self.owners.maybe_lost(id);
        self.stats.work_maybe_lost += 1;
    }

    pub(super) fn acquired(&mut self, who: &Key, datum: i64) {
        self.stats.acquired += 1;
        if let Some(last) = usize::try_from(datum)
            .ok()
            .and_then(|i| self.last_holder.get_mut(i))
        {
            if last.as_ref().is_some_and(|k| k != who) {
                self.stats.moved += 1;
            }
            *last = Some(who.clone());
        }
    }

    pub(super) fn new_work(&mut self, datum: i64) -> AppWork {
        let id = self.owners.issued() as u64;
        self.owners.issue(id, datum);
        self.stats.work_injected += 1;
        AppWork { id, datum, hops: 0 }
    }

    /// Records that `who` processed `item` at `now`; a violation if it does
    /// not hold the datum, or processed it before.
    pub(super) fn process(&mut self, who: &Key, item: &AppWork, now: Instant) -> Option<String> {
        self.stats.work_processed += 1;
        let at = self.at(now);
        self.owners.process(who, item.id, item.datum, at);
        self.problems()
    }
}

/// The checks once the run settled (faults over, membership converged):
/// every live node's transitions ended and it runs the same view, every
/// datum is held by exactly its primary (no orphan, no double owner), no
/// work is waiting, and every work item was processed exactly once except
/// items that may have been lost with a stopped process.
pub fn final_check(sim: &Sim<TransitionNode>) -> Result<(), String> {
    let ledger = sim.shared();
    let mut table: Option<Arc<PlacementTable>> = None;
    for n in sim.nodes() {
        let Some(handoff) = n.app.handoff() else {
            return Err(format!("{} has no transition layer", n.info.name));
        };
        if handoff.is_fenced() || n.leaving {
            continue;
        }
        if !handoff.is_idle() {
            return Err(format!(
                "{}: transition still running: {:?}",
                n.info.name,
                handoff.progress()
            ));
        }
        match &table {
            None => table = Some(handoff.table().clone()),
            Some(t) if t.view_id() != handoff.view_id() => {
                return Err(format!(
                    "{} runs view {} while another node runs view {}",
                    n.info.name,
                    handoff.view_id(),
                    t.view_id()
                ));
            }
            Some(_) => {}
        }
    }
    let Some(table) = table else {
        return Err("no live node at the end".into());
    };
    for id in 0..i64::from(ledger.settings.datums) {
        let holders = ledger.owners.holders(id);
        let primary = table
            .primary(id)
            .and_then(|i| table.view().node(i))
            .map(key_of);
        let expected: Vec<Key> = primary.into_iter().collect();
        if holders != expected.as_slice() {
            return Err(format!(
                "datum {id}: held by {holders:?}, its primary is {expected:?}"
            ));
        }
    }
    if let Some(bound) = ledger.settings.failover_within {
        for (victim, lag) in ledger.failover_lags() {
            match lag {
                Some(lag) if lag <= bound => {}
                Some(lag) => {
                    return Err(format!(
                        "datums of {}/{} acquired again {lag:?} after the last survivor marked it \
                         failed (bound {bound:?})",
                        victim.0, victim.1
                    ));
                }
                None => {
                    return Err(format!(
                        "datums of {}/{} never acquired again",
                        victim.0, victim.1
                    ));
                }
            }
        }
    }
    if !ledger.orphans.is_empty() {
        return Err(format!(
            "{} work items never routed again",
            ledger.orphans.len()
        ));
    }
    if let Some(first) = ledger.owners.unprocessed(sim.now()).first() {
        return Err(first.clone());
    }
    Ok(())
}

/// With leases, once the run settled: no live process is fenced or not
/// ready, every one holds a valid lease, every datum has a ready acting
/// owner, and since the last heal every datum had one within the bound.
pub fn final_check_leases(sim: &Sim<TransitionNode>) -> Result<(), String> {
    let ledger = sim.shared();
    let s = &ledger.settings;
    let (Some(healed), Some(bound)) = (s.healed_at, s.recover_within) else {
        return Ok(());
    };
    let now = ledger.base + sim.now();
    for n in sim.nodes() {
        if n.leaving {
            continue;
        }
        if n.app.handoff().is_none_or(|h| h.is_fenced()) {
            return Err(format!(
                "{}/{} is fenced at the end",
                n.info.name, n.info.generation
            ));
        }
        if !n.membership.local().ready {
            return Err(format!(
                "{}/{} is not ready at the end",
                n.info.name, n.info.generation
            ));
        }
        let standing = n.membership.standing(now);
        if !standing.is_valid() {
            return Err(format!(
                "{}/{} has no valid lease at the end: {standing:?}",
                n.info.name, n.info.generation
            ));
        }
    }
    if let Some(d) = ledger.acting.an_unserved() {
        return Err(format!(
            "datum {d} has no ready acting owner at the end ({} such datums)",
            ledger.acting.unserved()
        ));
    }
    if let Some(last) = ledger.last_unserved {
        let after = last.saturating_duration_since(ledger.base + healed);
        if after > bound {
            return Err(format!(
                "a datum had no ready acting owner {after:?} after the last heal (bound {bound:?})"
            ));
        }
    }
    Ok(())
}
