//! What a run measured: traffic and process-seconds, detection of crashes,
//! dissemination of metadata changes, false positives, leases and
//! takeovers, convergence after the faults.

use std::collections::HashSet;
use std::time::Duration;

use super::{Sim, node_name};
use crate::app::Application;
use crate::check::{Detection, Dissemination, ProcKey};
use crate::net::duration_ns;

/// Leases in a run: see [`Sim::lease_report`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LeaseReport {
    /// Takeovers: verdicts that stood `takeover_delay`, by accusers holding
    /// a valid lease then.
    pub takeovers: usize,
    /// Takeovers whose victim still held a valid lease (and was neither
    /// fenced nor stopped) at that instant: two owners.
    pub violations: usize,
    /// The smallest margin (victim out of the way before the takeover), in
    /// seconds; negative for a violation.
    pub min_margin_s: Option<f64>,
    /// Virtual time of the first takeover.
    pub first_takeover_s: Option<f64>,
    /// The first violation, described.
    pub first_violation: Option<String>,
}

/// Bytes and messages sent so far, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Membership unreliable packets (probes, acks, gossip).
    pub unreliable_msgs: u64,
    /// Their bytes.
    pub unreliable_bytes: u64,
    /// Membership reliable messages (push-pull, joins).
    pub reliable_msgs: u64,
    /// Their bytes.
    pub reliable_bytes: u64,
    /// Application messages.
    pub app_msgs: u64,
    /// Their bytes.
    pub app_bytes: u64,
    /// Packets dropped: lost, partitioned, receiver down or unknown.
    pub dropped: u64,
    /// Extra copies delivered by duplication.
    pub duplicated: u64,
    /// Garbage packets rejected by membership, as expected.
    pub garbage_rejected: u64,
}

impl Traffic {
    /// Membership bytes, both kinds.
    pub fn membership_bytes(&self) -> u64 {
        self.unreliable_bytes + self.reliable_bytes
    }

    /// Membership messages, both kinds.
    pub fn membership_msgs(&self) -> u64 {
        self.unreliable_msgs + self.reliable_msgs
    }
}

/// Measured detection of a crash, in virtual seconds after the crash.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DetectionTimes {
    /// First survivor to mark it suspect.
    pub first_suspect_s: Option<f64>,
    /// First survivor to mark it failed.
    pub first_s: Option<f64>,
    /// Last survivor to mark it failed (None until all have).
    pub all_s: Option<f64>,
    /// Survivors that have not marked it failed yet.
    pub pending: usize,
}

/// Measured dissemination of a metadata change, in virtual seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DisseminationTimes {
    /// Until 99.99 % of the members live at the change had it.
    pub threshold_s: Option<f64>,
    /// Until all of them had it.
    pub all_s: Option<f64>,
    /// How many have it.
    pub informed: usize,
    /// How many were live at the change.
    pub population: usize,
}

/// `ceil(0.9999 x n)`, in integers (the float product rounds 10,000 up to
/// 10,000 instead of 9,999).
fn four_nines(n: usize) -> usize {
    n.saturating_mul(9_999).div_ceil(10_000)
}

impl<A: Application> Sim<A> {
    /// Bytes and messages sent so far.
    pub fn traffic(&self) -> Traffic {
        self.traffic
    }

    /// Process-seconds of live processes so far (the denominator of per-node
    /// rates).
    pub fn node_seconds(&mut self) -> f64 {
        self.account();
        self.node_ns as f64 / 1e9
    }

    pub(super) fn account(&mut self) {
        let dt = self.now_ns.saturating_sub(self.accounted_ns);
        self.node_ns += u128::from(dt) * self.live.len() as u128;
        self.accounted_ns = self.now_ns;
    }

    /// Whether the cluster has stayed converged after [`Action::Quiet`] for
    /// `fencing_grace`, and self-fencing was checked then.
    ///
    /// [`Action::Quiet`]: super::Action::Quiet
    pub fn settled(&self) -> bool {
        self.fencing_checked && self.converged_at.is_some()
    }

    /// When the cluster was first seen converged after [`Action::Quiet`].
    ///
    /// [`Action::Quiet`]: super::Action::Quiet
    pub fn converged_at(&self) -> Option<Duration> {
        self.converged_at.map(Duration::from_nanos)
    }

    /// Times the cluster diverged again after it had converged following
    /// [`Action::Quiet`] (a late consequence of a fault, e.g. a node that
    /// was stalled declaring a member failed from a stale suspicion). Each
    /// must converge again within `settle_limit`.
    ///
    /// [`Action::Quiet`]: super::Action::Quiet
    pub fn rediverged(&self) -> u64 {
        self.rediverged
    }

    /// When [`Action::Quiet`] took effect.
    ///
    /// [`Action::Quiet`]: super::Action::Quiet
    pub fn quiet_at(&self) -> Option<Duration> {
        self.quiet_at.map(Duration::from_nanos)
    }

    /// Distinct healthy processes (never crashed, stalled, leaving, nor cut
    /// off by a partition) that some node marked failed.
    pub fn false_positives(&self) -> usize {
        self.checks.false_positives.len()
    }

    /// Failed events about healthy processes (a process marked failed by
    /// three nodes counts three times).
    pub fn false_positive_events(&self) -> u64 {
        self.checks.false_positive_events
    }

    /// False-positive "failed" events whose accuser was a stalled process.
    pub fn false_positive_events_by_stalled(&self) -> u64 {
        self.checks.false_positive_events_by_stalled
    }

    /// Whether any node marked a stalled process failed.
    pub fn stalled_marked_failed(&self) -> bool {
        self.checks.stalled_marked_failed
    }

    /// How many times a node learnt that the cluster declared it failed.
    pub fn declared_failed_events(&self) -> u64 {
        self.checks.declared_failed_events
    }

    /// Takeovers so far (a verdict that still stood `takeover_delay` after
    /// it was made, by an accuser holding a valid lease at that instant)
    /// and how long before each the victim had lost its lease, been fenced
    /// or stopped.
    pub fn lease_report(&self) -> LeaseReport {
        let takeovers = self.checks.takeovers(self.now_ns);
        let s = |ns: i128| ns as f64 / 1e9;
        LeaseReport {
            takeovers: takeovers.len(),
            violations: takeovers.iter().filter(|t| t.margin_ns < 0).count(),
            min_margin_s: takeovers.iter().map(|t| t.margin_ns).min().map(s),
            first_takeover_s: takeovers.first().map(|t| s(i128::from(t.at_ns))),
            first_violation: takeovers.iter().find(|t| t.margin_ns < 0).map(|t| {
                format!(
                    "{} (generation {}) still held a valid lease {:.3}s after {} (generation {}) took \
                     its datums over at {:.3}s",
                    node_name(t.victim.0),
                    t.victim.1,
                    s(-t.margin_ns),
                    node_name(t.accuser.0),
                    t.accuser.1,
                    s(i128::from(t.at_ns))
                )
            }),
        }
    }

    /// When the slot's current process last lost its lease at or after
    /// `from` (a lease lapsed for want of contact counts from its expiry).
    pub fn standing_lost_at(&self, slot: u32, from: Duration) -> Option<Duration> {
        let generation = self.current_generation(slot)?;
        let from = duration_ns(from);
        self.checks
            .fate((slot, generation))?
            .standing
            .iter()
            .find(|(at, valid)| *at >= from && !valid)
            .map(|(at, _)| Duration::from_nanos(*at))
    }

    /// Whether every live process (not leaving) holds a valid lease now.
    pub fn all_standing(&self) -> bool {
        let now = self.instant(self.now_ns);
        self.live.iter().all(|&slot| {
            self.slots
                .get(slot as usize)
                .and_then(|s| s.proc.as_deref())
                .is_none_or(|p| p.leaving || p.membership.standing(now).is_valid())
        })
    }

    /// Times healthy processes (never crashed, stalled, leaving, nor cut off)
    /// lost their lease at or after `from`.
    pub fn healthy_lapses(&self, from: Duration) -> u64 {
        let from = duration_ns(from);
        self.checks
            .fates
            .values()
            .filter(|f| !f.crashed && !f.stalled && !f.partitioned && !f.leaving)
            .map(|f| {
                f.standing
                    .iter()
                    .filter(|(at, valid)| *at >= from && !valid)
                    .count() as u64
            })
            .sum()
    }

    /// Detection of each measured crash, in order.
    pub fn detections(&self) -> Vec<DetectionTimes> {
        let s = |from: u64, to: Option<u64>| to.map(|t| t.saturating_sub(from) as f64 / 1e9);
        self.checks
            .detections
            .iter()
            .map(|d: &Detection| DetectionTimes {
                first_suspect_s: s(d.crashed_ns, d.first_suspect_ns),
                first_s: s(d.crashed_ns, d.first_ns),
                all_s: s(d.crashed_ns, d.all_ns),
                pending: d.survivors.len(),
            })
            .collect()
    }

    /// Dissemination of each measured metadata change, in order.
    pub fn disseminations(&self) -> Vec<DisseminationTimes> {
        let s = |from: u64, to: Option<u64>| to.map(|t| t.saturating_sub(from) as f64 / 1e9);
        self.checks
            .disseminations
            .iter()
            .map(|d: &Dissemination| DisseminationTimes {
                threshold_s: s(d.started_ns, d.threshold_ns),
                all_s: s(d.started_ns, d.all_ns),
                informed: d.informed.len(),
                population: d.population.len(),
            })
            .collect()
    }

    pub(super) fn measure_detection(&mut self, victim: ProcKey) {
        let survivors: HashSet<ProcKey> = self
            .live
            .iter()
            .filter(|&&s| s != victim.0)
            .filter_map(|&s| self.current_generation(s).map(|g| (s, g)))
            .collect();
        self.checks.detections.push(Detection {
            victim,
            crashed_ns: self.now_ns,
            survivors,
            first_ns: None,
            all_ns: None,
            first_suspect_ns: None,
        });
    }

    /// Called while the origin's process is out of its slot (being driven),
    /// so it is added to the population explicitly.
    pub(super) fn measure_dissemination(&mut self, origin: ProcKey, metadata: Vec<u8>) {
        let mut population: HashSet<ProcKey> = self
            .live
            .iter()
            .filter_map(|&s| self.current_generation(s).map(|g| (s, g)))
            .collect();
        population.insert(origin);
        let threshold = four_nines(population.len());
        tracing::info!(
            target: "shoal_sim::events",
            population = population.len(),
            threshold,
            "measuring the dissemination of a metadata change"
        );
        let mut informed = HashSet::new();
        informed.insert(origin);
        let done = informed.len() >= threshold;
        self.checks.disseminations.push(Dissemination {
            origin,
            metadata,
            started_ns: self.now_ns,
            threshold_ns: done.then_some(self.now_ns),
            all_ns: (population.len() <= 1).then_some(self.now_ns),
            population,
            informed,
            threshold,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_nines_of_a_population() {
        assert_eq!(four_nines(10_000), 9_999);
        assert_eq!(four_nines(20_000), 19_998);
        assert_eq!(four_nines(200), 200);
        assert_eq!(four_nines(1), 1);
        assert_eq!(four_nines(0), 0);
    }
}
