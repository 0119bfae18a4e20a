//! The report of a scenario run ([`Report`]) and the traffic measured over
//! its window.

use std::fmt;

use serde::Serialize;

use super::{Profile, ScenarioKind, ScenarioOptions};
use crate::app::Application;
use crate::sim::{Sim, Traffic};

/// The outcome of one run: one JSON object per line with `--json`. Fields
/// that do not apply to the scenario are `null`. Times are virtual seconds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// Scenario name.
    pub scenario: ScenarioKind,
    /// Initial cluster size.
    pub nodes: u32,
    /// Seed.
    pub seed: u64,
    /// Membership profile.
    pub profile: Profile,
    /// Loss probability of unreliable packets.
    pub loss: f64,
    /// From the crash to the first survivor marking the node suspect.
    pub suspect_first_s: Option<f64>,
    /// From the crash to the first survivor marking the node failed.
    pub detect_first_s: Option<f64>,
    /// From the crash to the last survivor marking the node failed.
    pub detect_all_s: Option<f64>,
    /// Distinct healthy members (never crashed, stalled, leaving, nor cut
    /// off by a partition) that some node marked failed. Null in
    /// partition-heal, where every member is cut off from half the cluster.
    pub false_positives: Option<u64>,
    /// "Failed" events about healthy members, all accusers counted.
    pub false_positive_events: u64,
    /// Those of them whose accuser was the stalled node itself.
    pub false_positive_events_by_stalled: u64,
    /// Whether any node marked the stalled node failed (stalled-node only).
    pub stalled_marked_failed: Option<bool>,
    /// Times nodes learnt that the cluster declared them failed.
    pub declared_failed: u64,
    /// From the metadata change until 99.99 % of members had it.
    pub converge_s: Option<f64>,
    /// From the metadata change until every member had it.
    pub converge_all_s: Option<f64>,
    /// From the last fault until every live node saw exactly the live
    /// members (the last time, if it diverged again).
    pub settle_s: Option<f64>,
    /// Times the cluster, converged after the last fault, diverged again (a
    /// late consequence of the fault) and had to converge anew.
    pub rediverged: u64,
    /// Membership bytes sent per live node per virtual second, over the
    /// measurement window (from the fault or change to the end).
    pub bytes_per_node_per_s: Option<f64>,
    /// Membership messages sent per live node per virtual second, same
    /// window.
    pub msgs_per_node_per_s: Option<f64>,
    /// The part of `bytes_per_node_per_s` sent as unreliable datagrams.
    pub datagram_bytes_per_node_per_s: Option<f64>,
    /// From the fault to the last cut-off (or paused) node losing its lease
    /// (partition-heal, partition-minority, isolated, paused).
    pub standing_lost_s: Option<f64>,
    /// From the fault to the first takeover of a cut-off node's datums: a
    /// dead verdict released by the takeover gate (`takeover_delay` after the
    /// suspicion behind it, never before the verdict), by a node holding a
    /// valid lease.
    pub takeover_first_s: Option<f64>,
    /// Takeovers in the run (verdicts that stood until the gate released them, by nodes
    /// holding a valid lease then).
    pub takeovers: u64,
    /// The smallest margin between a takeover and its victim losing its
    /// lease (or being fenced, or stopping) before it; negative: two owners.
    pub lease_margin_min_s: Option<f64>,
    /// Takeovers whose victim still held a valid lease then.
    pub lease_violations: u64,
    /// From the heal (the last fault) until every live node held a valid
    /// lease again.
    pub standing_regained_s: Option<f64>,
    /// Times healthy nodes (never crashed, stalled, leaving, nor cut off)
    /// lost their lease after the cluster formed.
    pub healthy_lapses: u64,
    /// Invariant violations found (the run stops at the first).
    pub invariant_violations: u64,
    /// The violation, with its step, or why the protocol outcome is wrong.
    pub failure: Option<String>,
    /// Step (events processed) at which the violation was found.
    pub failure_step: Option<u64>,
    /// Whether the scenario's protocol outcome holds (no violation, and for
    /// kill-one every survivor marked the crash).
    pub ok: bool,
    /// Virtual time simulated.
    pub virtual_s: f64,
    /// Events processed.
    pub events: u64,
    /// Hash of the event trace (equal for equal runs).
    pub trace_hash: String,
    /// Wall-clock seconds the run took (the only wall-clock figure).
    pub wall_s: f64,
    /// Peak resident memory of the process so far, in MiB.
    pub peak_rss_mib: Option<f64>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn opt(v: Option<f64>, unit: &str) -> String {
            v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}{unit}"))
        }
        writeln!(
            f,
            "scenario {} | {} nodes | seed {} | profile {:?} | loss {}",
            self.scenario, self.nodes, self.seed, self.profile, self.loss
        )?;
        writeln!(
            f,
            "  detection      first suspect {}  first failed {}  all failed {}",
            opt(self.suspect_first_s, "s"),
            opt(self.detect_first_s, "s"),
            opt(self.detect_all_s, "s")
        )?;
        writeln!(
            f,
            "  accuracy       false positives {} ({} events, {} by the stalled node)  stalled node marked failed {}  declared-failed signals {}",
            self.false_positives
                .map_or_else(|| "-".to_string(), |n| n.to_string()),
            self.false_positive_events,
            self.false_positive_events_by_stalled,
            self.stalled_marked_failed
                .map_or_else(|| "-".to_string(), |b| b.to_string()),
            self.declared_failed
        )?;
        writeln!(
            f,
            "  dissemination  99.99% {}  all {}  settle after last fault {} (diverged again {} times)",
            opt(self.converge_s, "s"),
            opt(self.converge_all_s, "s"),
            opt(self.settle_s, "s"),
            self.rediverged
        )?;
        writeln!(
            f,
            "  traffic        {} B/node/s ({} as datagrams)  {} msgs/node/s",
            opt(self.bytes_per_node_per_s, ""),
            opt(self.datagram_bytes_per_node_per_s, ""),
            opt(self.msgs_per_node_per_s, "")
        )?;
        writeln!(
            f,
            "  lease          lost {}  first takeover {}  takeovers {}  min margin {}  violations {}  regained {}  healthy lapses {}",
            opt(self.standing_lost_s, "s"),
            opt(self.takeover_first_s, "s"),
            self.takeovers,
            opt(self.lease_margin_min_s, "s"),
            self.lease_violations,
            opt(self.standing_regained_s, "s"),
            self.healthy_lapses
        )?;
        writeln!(
            f,
            "  run            {:.1}s virtual, {} events, {:.2}s wall, peak RSS {} MiB, trace {}",
            self.virtual_s,
            self.events,
            self.wall_s,
            opt(self.peak_rss_mib, ""),
            self.trace_hash
        )?;
        match &self.failure {
            None => write!(f, "  result         ok: no invariant violated"),
            Some(why) => write!(
                f,
                "  result         FAILED ({} violations): {why}",
                self.invariant_violations
            ),
        }
    }
}

/// A report of a run that could not produce one (nothing measured, not ok).
pub fn failed_report(opts: &ScenarioOptions, failure: String) -> Report {
    let mut report = empty_report(opts);
    report.failure = Some(failure);
    report
}

pub(super) fn empty_report(opts: &ScenarioOptions) -> Report {
    Report {
        scenario: opts.scenario,
        nodes: opts.nodes,
        seed: opts.seed,
        profile: opts.profile,
        loss: opts.loss,
        suspect_first_s: None,
        detect_first_s: None,
        detect_all_s: None,
        false_positives: None,
        false_positive_events: 0,
        false_positive_events_by_stalled: 0,
        stalled_marked_failed: None,
        declared_failed: 0,
        converge_s: None,
        converge_all_s: None,
        settle_s: None,
        rediverged: 0,
        bytes_per_node_per_s: None,
        msgs_per_node_per_s: None,
        datagram_bytes_per_node_per_s: None,
        standing_lost_s: None,
        takeover_first_s: None,
        takeovers: 0,
        lease_margin_min_s: None,
        lease_violations: 0,
        standing_regained_s: None,
        healthy_lapses: 0,
        invariant_violations: 0,
        failure: None,
        failure_step: None,
        ok: false,
        virtual_s: 0.0,
        events: 0,
        trace_hash: String::new(),
        wall_s: 0.0,
        peak_rss_mib: None,
    }
}

/// Traffic counters at the start of the measurement window.
pub(super) struct Window {
    traffic: Traffic,
    node_s: f64,
}

pub(super) fn open_window<A: Application>(sim: &mut Sim<A>) -> Window {
    Window {
        traffic: sim.traffic(),
        node_s: sim.node_seconds(),
    }
}

pub(super) fn close_window<A: Application>(sim: &mut Sim<A>, w: &Window, report: &mut Report) {
    let t = sim.traffic();
    let node_s = sim.node_seconds() - w.node_s;
    if node_s <= 0.0 {
        return;
    }
    let bytes = t.membership_bytes() - w.traffic.membership_bytes();
    let msgs = t.membership_msgs() - w.traffic.membership_msgs();
    let datagram = t.unreliable_bytes - w.traffic.unreliable_bytes;
    report.bytes_per_node_per_s = Some(bytes as f64 / node_s);
    report.msgs_per_node_per_s = Some(msgs as f64 / node_s);
    report.datagram_bytes_per_node_per_s = Some(datagram as f64 / node_s);
}
