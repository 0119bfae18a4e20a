//! The checks at the end of a run and the verdict they give.

use std::time::Instant;

use crate::store::Store;
use crate::svg;

use super::{FaultReport, KillLoss, ScenarioError, Sim, Status, Summary};

/// How much longer than its failure detection (by every survivor) a kill's
/// transition may take: above, the verdict fails (a timeout was waited out).
pub const KILL_SETTLE_BOUND_S: f64 = 2.0;

/// Points ingested this long before a kill and never acknowledged are
/// attributed to it (they were on their way to, or queued at, the victim).
const KILL_UNACKED_BEFORE_S: f64 = 1.0;

/// Longest time from the heal of a fault (the cut removed, the process
/// thawed) until every running node reports the same view, nothing in
/// flight, ready and not fenced: above, the verdict fails.
pub const HEAL_SETTLE_BOUND_S: f64 = 3.0;

impl Sim<'_> {
    pub(super) fn verdict(&mut self, started: Instant) -> Result<Summary, ScenarioError> {
        let store = Store::open(&self.store_url)?;
        let audit = store.audit()?;
        let persisted_total = store.total_points()?;
        let mut lost_by_kill = Vec::new();
        let mut lost_outside = 0u64;
        let mut lost_total = 0u64;
        let mut lost_to_fencing = 0u64;
        let with_faults = !self.fault_windows.is_empty();
        for (writer, acked) in &self.acked {
            let persisted = audit.persisted.get(writer).copied().unwrap_or(0);
            let all_lost = acked.saturating_sub(persisted);
            lost_total += all_lost;
            // What the store refused (a stale token) is the faults' doing
            // in a run with faults; without, it is a loss like any other.
            let fenced = if with_faults {
                audit
                    .refused_points
                    .get(writer)
                    .copied()
                    .unwrap_or(0)
                    .min(all_lost)
            } else {
                0
            };
            lost_to_fencing += fenced;
            let lost = all_lost - fenced;
            // A process may have had several generations (rebirths after
            // a declared death): its kill explains the loss of each.
            let proc = self.proc_of(writer);
            match self.kills.iter().find(|k| Some(k.proc) == proc) {
                Some(k) => match lost_by_kill
                    .iter_mut()
                    .find(|l: &&mut KillLoss| l.node == k.name && l.generation == k.generation)
                {
                    Some(l) => l.lost += lost,
                    None => lost_by_kill.push(KillLoss {
                        node: k.name.clone(),
                        generation: k.generation,
                        lost,
                        unacknowledged: 0,
                    }),
                },
                None => lost_outside += lost,
            }
        }
        for k in &self.kills {
            if !lost_by_kill
                .iter()
                .any(|l| l.node == k.name && l.generation == k.generation)
            {
                lost_by_kill.push(KillLoss {
                    node: k.name.clone(),
                    generation: k.generation,
                    lost: 0,
                    unacknowledged: 0,
                });
            }
        }
        // Points never acknowledged nor refused: explained by a kill, or a
        // violation.
        let mut unacked_outside = 0u64;
        let mut unacked_examples = Vec::new();
        let mut fault_unacked = vec![0u64; self.fault_windows.len()];
        for (id, (proc, at, _)) in &self.outstanding {
            let explained = self.kills.iter().find(|k| {
                let since = at.saturating_duration_since(k.at).as_secs_f64();
                let before = k.at.saturating_duration_since(*at).as_secs_f64();
                let settled = k.settled_s.unwrap_or(f64::INFINITY);
                k.proc == *proc || (before <= KILL_UNACKED_BEFORE_S && since <= settled)
            });
            let by_kill = explained.and_then(|k| {
                lost_by_kill
                    .iter_mut()
                    .find(|l| l.node == k.name && l.generation == k.generation)
            });
            let by_fault = || {
                self.fault_windows.iter().position(|w| {
                    let since = at.saturating_duration_since(w.at).as_secs_f64();
                    let before = w.at.saturating_duration_since(*at).as_secs_f64();
                    before <= KILL_UNACKED_BEFORE_S && since <= w.settled_s.unwrap_or(f64::INFINITY)
                })
            };
            match (by_kill, by_fault()) {
                (Some(l), _) => l.unacknowledged += 1,
                (None, Some(w)) => {
                    if let Some(w) = fault_unacked.get_mut(w) {
                        *w += 1;
                    }
                }
                (None, None) => {
                    unacked_outside += 1;
                    if unacked_examples.len() < 5 {
                        let name = self.procs.get(*proc).map(|p| p.name.clone());
                        unacked_examples.push((*id, name, self.t(*at)));
                    }
                }
            }
        }
        if unacked_outside > 0 {
            unacked_examples.sort_by(|a, b| a.2.total_cmp(&b.2));
            self.problems.push(format!(
                "{unacked_outside} points sent to a node were never acknowledged nor refused, outside any kill (id, ingesting node, t): {unacked_examples:?}"
            ));
        }
        if self.acked_twice > 0 {
            self.problems
                .push(format!("{} points acknowledged twice", self.acked_twice));
        }
        let mut detect_first: Option<f64> = None;
        let mut detect_all: Option<f64> = None;
        for k in &self.kills {
            let first = k.detected.values().copied().fold(f64::INFINITY, f64::min);
            let all = k.detected.values().copied().fold(0.0, f64::max);
            if k.survivors.iter().all(|s| k.detected.contains_key(s)) && first.is_finite() {
                detect_first = Some(detect_first.map_or(first, |d| d.max(first)));
                detect_all = Some(detect_all.map_or(all, |d| d.max(all)));
                // The handoff after a kill starts when the survivors see
                // it failed; taking much longer means a timeout was waited.
                if let Some(s) = k.settled_s
                    && s > all + KILL_SETTLE_BOUND_S
                {
                    self.problems.push(format!(
                        "kill of {}: the transition took {s:.2}s, more than its detection by every survivor ({all:.2}s) + {KILL_SETTLE_BOUND_S:.0}s",
                        k.name
                    ));
                }
            } else {
                let missing: Vec<&String> = k
                    .survivors
                    .iter()
                    .filter(|s| !k.detected.contains_key(*s))
                    .collect();
                self.problems.push(format!(
                    "kill of {}: never marked failed by {missing:?}",
                    k.name
                ));
            }
        }
        if audit.double_owner_writes > 0 {
            self.problems.push(format!(
                "double-owner writes on series {:?}",
                audit.double_owner_series
            ));
        }
        let fenced_nodes = self
            .procs
            .iter()
            .filter(|p| p.status.as_ref().is_some_and(|s| s.fenced))
            .count();
        let max_transition = self
            .transitions
            .iter()
            .filter_map(|t| t.s)
            .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))));
        let svg_path = self.cfg.work_dir.join("timeline.svg");
        let end = self.t(Instant::now());
        std::fs::write(
            &svg_path,
            svg::render(&self.samples, &self.marks, end, self.cfg.series),
        )?;
        for (w, n) in self.fault_windows.iter_mut().zip(&fault_unacked) {
            w.unacknowledged = *n;
        }
        let faults: Vec<FaultReport> = self
            .fault_windows
            .iter()
            .map(|w| FaultReport {
                fault: w.label.clone(),
                at_s: self.t(w.at),
                heal_to_settled_s: w.heal_to_settled_s,
                unacknowledged: w.unacknowledged,
            })
            .collect();
        let heal_to_settled = if faults.iter().any(|f| f.heal_to_settled_s.is_none()) {
            None
        } else {
            faults
                .iter()
                .filter_map(|f| f.heal_to_settled_s)
                .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))))
        };
        if !self.fenced_at_end.is_empty() {
            self.problems
                .push(format!("nodes fenced at the end: {:?}", self.fenced_at_end));
        }
        let last = |f: fn(&Status) -> u64| -> u64 {
            self.procs
                .iter()
                .filter_map(|p| p.status.as_ref().map(f))
                .sum()
        };
        let stale_writes_refused = last(|s| s.stale_writes_refused);
        let points_refused_by_store = last(|s| s.points_refused);
        let points_sent: u64 = self.acked.values().sum();
        let mut reads_wrong = self.read_failures.len();
        for id in 0..i64::from(self.cfg.series) {
            let stored = store.load(id)?.map_or(0, |a| a.count);
            match self.reads.get(&id) {
                Some((_, count)) if *count == stored => {}
                Some((owner, count)) => {
                    reads_wrong += 1;
                    self.problems.push(format!(
                        "series {id}: its owner {owner} answered {count} points, the store holds {stored}"
                    ));
                }
                None if self.read_failures.iter().any(|(s, _)| *s == id) => {}
                None => {
                    reads_wrong += 1;
                    self.problems
                        .push(format!("series {id}: the read got no answer"));
                }
            }
        }
        for (id, error) in &self.read_failures {
            self.problems
                .push(format!("series {id}: the read failed: {error}"));
        }
        let ok = lost_outside == 0
            && self.fenced_at_end.is_empty()
            && unacked_outside == 0
            && self.acked_twice == 0
            && audit.double_owner_writes == 0
            && self.problems.is_empty()
            && points_sent > 0;
        Ok(Summary {
            event: "summary",
            scenario: self.cfg.scenario.name(),
            nodes: self.cfg.nodes,
            series: self.cfg.series,
            points_ingested: self.injected,
            points_sent,
            points_unacknowledged: self.outstanding.len() as u64,
            unacknowledged_outside_kills: unacked_outside,
            points_acked_twice: self.acked_twice,
            points_persisted: persisted_total,
            points_lost: lost_total,
            lost_outside_kills: lost_outside,
            lost_by_kill,
            points_refused: self.refused,
            double_owner_writes: audit.double_owner_writes,
            detect_first_s: detect_first,
            detect_all_s: detect_all,
            transitions: self.transitions.clone(),
            max_transition_s: max_transition,
            fenced_nodes,
            fenced_nodes_at_end: self.fenced_at_end.len(),
            reads_answered: self.reads.len(),
            reads_wrong,
            stale_writes_refused,
            stale_writes_refused_store: audit.stale_writes_refused,
            points_refused_by_store,
            points_refused_by_store_audit: audit.refused_points.values().sum(),
            lost_to_fencing,
            faults,
            heal_to_settled_s: heal_to_settled,
            unavailable_s: self.unavailable.map(|(g, _, _)| g),
            unavailable_series: self.unavailable.map(|(_, s, t)| (s, t)),
            problems: self.problems.clone(),
            svg: svg_path.display().to_string(),
            wall_s: started.elapsed().as_secs_f64(),
            ok,
        })
    }
}
