//! The verdict's public form: the [`Summary`] and its parts, the timeline
//! picture's points, and the readable print of a summary.

use std::io::Write;

use serde::Serialize;

/// Loss attributed to one kill.
#[derive(Clone, Debug, Serialize)]
pub struct KillLoss {
    /// Victim name.
    pub node: String,
    /// Victim generation.
    pub generation: u64,
    /// Points it had acknowledged and not persisted.
    pub lost: u64,
    /// Points sent to a node and never acknowledged nor refused that this
    /// kill explains: ingested by the victim, or ingested from 1 s before
    /// the kill until its transition settled.
    pub unacknowledged: u64,
}

/// What one fault (a partition, a pause, a flap) cost.
#[derive(Clone, Debug, Serialize)]
pub struct FaultReport {
    /// What it was (`partition n1,n2 | n3,n4,n5`, `pause n3`, ...).
    pub fault: String,
    /// Seconds from the start of the run when it began.
    pub at_s: f64,
    /// Seconds from the (last) heal until the cluster settled; `None` if
    /// it did not within the settle timeout.
    pub heal_to_settled_s: Option<f64>,
    /// Points sent to a node and never acknowledged nor refused that this
    /// fault explains: ingested from 1 s before it began until the cluster
    /// settled after the heal.
    pub unacknowledged: u64,
}

/// One transition: an event and how long until the cluster settled.
#[derive(Clone, Debug, Serialize)]
pub struct TransitionTime {
    /// What happened (`join n6`, `leave n2`, ...).
    pub event: String,
    /// Seconds from the event until every node agreed on the view and had
    /// nothing in flight; `None` if it did not settle in time.
    pub s: Option<f64>,
}

/// The verdict of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Always `"summary"`.
    pub event: &'static str,
    /// Scenario played.
    pub scenario: &'static str,
    /// Nodes at the start.
    pub nodes: usize,
    /// Series.
    pub series: u32,
    /// Points the driver sent to a node to ingest.
    pub points_ingested: u64,
    /// Points acknowledged to the driver (accepted by an owner).
    pub points_sent: u64,
    /// Points sent to a node and never acknowledged nor refused.
    pub points_unacknowledged: u64,
    /// Of those, not explained by a kill (see [`KillLoss::unacknowledged`]):
    /// a violation.
    pub unacknowledged_outside_kills: u64,
    /// Points acknowledged more than once (accepted twice): a violation.
    pub points_acked_twice: u64,
    /// Points in the store.
    pub points_persisted: u64,
    /// Acknowledged points not persisted.
    pub points_lost: u64,
    /// Of those, lost by a generation that was not killed.
    pub lost_outside_kills: u64,
    /// Loss per kill.
    pub lost_by_kill: Vec<KillLoss>,
    /// Points refused by the ingesting node (no owner; never acknowledged).
    pub points_refused: u64,
    /// Store rows written by a node after another had taken the series.
    pub double_owner_writes: u64,
    /// Kill → first survivor marks the victim failed, seconds (worst kill).
    pub detect_first_s: Option<f64>,
    /// Kill → every survivor marks the victim failed, seconds (worst kill).
    pub detect_all_s: Option<f64>,
    /// Every transition.
    pub transitions: Vec<TransitionTime>,
    /// The longest transition.
    pub max_transition_s: Option<f64>,
    /// Nodes that reported themselves fenced.
    pub fenced_nodes: usize,
    /// Nodes whose last status before the drain said fenced: a violation.
    pub fenced_nodes_at_end: usize,
    /// Series read at the end through the facade's request/response (each
    /// asked of a running node, answered by the series' owner).
    pub reads_answered: usize,
    /// Reads that failed or whose count differed from the store's after
    /// the final flush: a violation.
    pub reads_wrong: usize,
    /// Series writes the store refused for a stale fencing token, as the
    /// nodes reported them (their last status, summed).
    pub stale_writes_refused: u64,
    /// The same from the store's audit (`refused` rows of `writes`).
    pub stale_writes_refused_store: u64,
    /// Accepted (acknowledged) points lost to those refusals, as the nodes
    /// reported them.
    pub points_refused_by_store: u64,
    /// The same from the store's audit (points of the `refused` rows).
    pub points_refused_by_store_audit: u64,
    /// Acknowledged points not persisted because the store refused them
    /// (stale token) in a run with faults: attributed to the faults, not in
    /// `lost_outside_kills`.
    pub lost_to_fencing: u64,
    /// Every fault injected.
    pub faults: Vec<FaultReport>,
    /// The longest time from a heal until the cluster settled (worst
    /// fault); `None` without faults or when one never settled.
    pub heal_to_settled_s: Option<f64>,
    /// Longest time a series had no owner accepting its points, seconds,
    /// measured from the acknowledgements: for each series, the time from
    /// the first point ingested after its last acknowledgement until the
    /// next acknowledgement (of any of its points). The floor is the
    /// acknowledgement batching (50 ms) plus routing; a wait that no
    /// acknowledgement ends (the series never served again) is not in it.
    pub unavailable_s: Option<f64>,
    /// The series of `unavailable_s` and when that gap ended (seconds from
    /// the start of the run).
    pub unavailable_series: Option<(i64, f64)>,
    /// Failures other than the above (a node that died unasked, a stuck
    /// drain, a detection never observed).
    pub problems: Vec<String>,
    /// The timeline picture.
    pub svg: String,
    /// Run time, seconds.
    pub wall_s: f64,
    /// No violation.
    pub ok: bool,
}

/// A point of the timeline picture.
#[derive(Clone, Debug)]
pub(crate) struct Sample {
    pub(crate) t: f64,
    pub(crate) node: String,
    pub(crate) state: &'static str,
    pub(crate) owned: usize,
}

/// An event of the timeline picture.
#[derive(Clone, Debug)]
pub(crate) struct Mark {
    pub(crate) t: f64,
    pub(crate) label: String,
}

/// Prints a summary as readable lines (the non-JSON form).
///
/// # Errors
/// Writing to `out`.
pub fn print_summary(s: &Summary, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "== verdict ({} scenario, {} nodes, {} series, {:.1}s)",
        s.scenario, s.nodes, s.series, s.wall_s
    )?;
    writeln!(out, "points ingested             {}", s.points_ingested)?;
    writeln!(out, "points sent (acknowledged)  {}", s.points_sent)?;
    writeln!(out, "points refused at ingest    {}", s.points_refused)?;
    writeln!(
        out,
        "points never acknowledged   {}",
        s.points_unacknowledged
    )?;
    writeln!(out, "points persisted            {}", s.points_persisted)?;
    writeln!(out, "points lost                 {}", s.points_lost)?;
    for k in &s.lost_by_kill {
        writeln!(
            out,
            "  lost by the kill of {} (generation {}): {} (points it had not flushed), {} never acknowledged",
            k.node, k.generation, k.lost, k.unacknowledged
        )?;
    }
    writeln!(out, "lost outside kills          {}", s.lost_outside_kills)?;
    writeln!(
        out,
        "unacknowledged outside kills {}",
        s.unacknowledged_outside_kills
    )?;
    writeln!(out, "acknowledged twice          {}", s.points_acked_twice)?;
    writeln!(out, "double-owner writes         {}", s.double_owner_writes)?;
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}s"));
    writeln!(
        out,
        "stale writes refused        {} (nodes) / {} (store rows)",
        s.stale_writes_refused, s.stale_writes_refused_store
    )?;
    writeln!(
        out,
        "points refused by the store {} (nodes) / {} (store rows); lost to fencing {}",
        s.points_refused_by_store, s.points_refused_by_store_audit, s.lost_to_fencing
    )?;
    for f in &s.faults {
        writeln!(
            out,
            "fault at {:.1}s: {}: settled {} after the heal, {} never acknowledged",
            f.at_s,
            f.fault,
            opt(f.heal_to_settled_s),
            f.unacknowledged
        )?;
    }
    writeln!(
        out,
        "longest series unavailable  {}{}",
        opt(s.unavailable_s),
        s.unavailable_series
            .map_or(String::new(), |(id, t)| format!(
                " (series {id}, until {t:.1}s)"
            ))
    )?;
    writeln!(out, "fenced nodes at the end     {}", s.fenced_nodes_at_end)?;
    writeln!(
        out,
        "end reads (ask the owner)   {} answered, {} wrong",
        s.reads_answered, s.reads_wrong
    )?;
    writeln!(
        out,
        "failure detection           first {} / all survivors {}",
        opt(s.detect_first_s),
        opt(s.detect_all_s)
    )?;
    for t in &s.transitions {
        writeln!(out, "transition {:<20} {}", t.event, opt(t.s))?;
    }
    for p in &s.problems {
        writeln!(out, "PROBLEM: {p}")?;
    }
    writeln!(out, "timeline picture            {}", s.svg)?;
    writeln!(out, "{}", if s.ok { "OK" } else { "FAILED" })?;
    Ok(())
}
