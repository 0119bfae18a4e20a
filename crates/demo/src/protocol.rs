//! The control protocol between the driver and a demo node process.
//!
//! The driver writes one command per line on the node's stdin:
//!
//! | line | meaning |
//! |---|---|
//! | `p <point id> <series> <value>` | ingest a point (sent to the series' owner) |
//! | `r <series>` | read the series' aggregate from its owner (a request to the owner), answer `read` or `read_failed` |
//! | `status` | answer with a `status` event |
//! | `flush` | write every pending delta now, answer `flushed` |
//! | `leave` | leave gracefully (relinquish everything), answer `left`, exit |
//! | `quit` | flush, answer `bye`, exit without leaving |
//!
//! End of stdin makes the node exit at once (the driver is gone). The node
//! writes one JSON object per line on stdout ([`NodeEvent`], tagged by `"ev"`);
//! logs go to stderr.

use serde::{Deserialize, Serialize};

/// A command line from the driver.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeCommand {
    /// Ingest a point.
    Point {
        /// Point id.
        id: u64,
        /// Series.
        series: i64,
        /// Value.
        value: f64,
    },
    /// Read a series' aggregate from its owner.
    Read {
        /// Series.
        series: i64,
    },
    /// Report status.
    Status,
    /// Flush now.
    Flush,
    /// Leave gracefully and exit.
    Leave,
    /// Flush and exit.
    Quit,
}

impl NodeCommand {
    /// Parses a line; `None` when it is not a command.
    pub fn parse(line: &str) -> Option<NodeCommand> {
        let mut words = line.split_ascii_whitespace();
        let cmd = match words.next()? {
            "p" => NodeCommand::Point {
                id: words.next()?.parse().ok()?,
                series: words.next()?.parse().ok()?,
                value: words.next()?.parse().ok()?,
            },
            "r" => NodeCommand::Read {
                series: words.next()?.parse().ok()?,
            },
            "status" => NodeCommand::Status,
            "flush" => NodeCommand::Flush,
            "leave" => NodeCommand::Leave,
            "quit" => NodeCommand::Quit,
            _ => return None,
        };
        if words.next().is_some() {
            return None;
        }
        Some(cmd)
    }
}

/// Members by state as one node sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCounts {
    /// Alive.
    pub alive: usize,
    /// Suspect.
    pub suspect: usize,
    /// Dead.
    pub dead: usize,
    /// Left.
    pub left: usize,
}

/// An event line from a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum NodeEvent {
    /// The node is up (not joined yet).
    Started {
        /// Name.
        name: String,
        /// Generation.
        generation: u64,
        /// Address it listens on.
        addr: String,
    },
    /// The node joined, registered the series and is ready.
    Ready {
        /// Name.
        name: String,
        /// Whether some seed answered.
        joined: bool,
    },
    /// A member changed state in this node's view (`alive`, `suspect`, or
    /// `gone`: no longer live here).
    Member {
        /// The member.
        peer: String,
        /// Its generation.
        generation: u64,
        /// New state.
        state: String,
    },
    /// Points this node ingested were accepted by `owner`.
    Acked {
        /// The owner.
        owner: String,
        /// Its generation.
        generation: u64,
        /// How many.
        count: u64,
        /// Their ids.
        #[serde(default)]
        ids: Vec<u64>,
    },
    /// A point could not be sent to any owner (not acknowledged).
    Refused {
        /// Point id.
        id: u64,
    },
    /// Answer to `r`: the series' aggregate as its owner holds it
    /// (stored plus not yet flushed).
    Read {
        /// The series.
        series: i64,
        /// The owner that answered.
        owner: String,
        /// The fencing token of its ownership.
        token: u64,
        /// Points in the aggregate.
        count: u64,
        /// Their sum.
        sum: f64,
    },
    /// Answer to `r` when no owner answered.
    ReadFailed {
        /// The series.
        series: i64,
        /// Why.
        error: String,
    },
    /// Answer to `status`.
    Status {
        /// Name.
        name: String,
        /// Generation.
        generation: u64,
        /// Members known, by state.
        members: MemberCounts,
        /// Live members.
        live: usize,
        /// Placement view in force.
        view_id: u64,
        /// Series owned here.
        owned: usize,
        /// Handoffs in flight here.
        in_flight: usize,
        /// Points ingested per second since the last status.
        points_per_s: f64,
        /// Points accepted as owner, total.
        accepted: u64,
        /// Points accepted and not yet flushed.
        pending: u64,
        /// Whether the cluster declared this node failed.
        fenced: bool,
        /// Whether this node is ready (in the placement) in its own view.
        #[serde(default)]
        ready: bool,
        /// Failed flushes.
        flush_errors: u64,
        /// Series writes the store refused because a newer owner's fencing
        /// token was there.
        #[serde(default)]
        stale_writes_refused: u64,
        /// Accepted points lost to those refusals.
        #[serde(default)]
        points_refused: u64,
    },
    /// Answer to `flush`.
    Flushed {
        /// Name.
        name: String,
        /// Points still pending (0 unless the store failed).
        pending: u64,
    },
    /// Answer to `leave`.
    Left {
        /// Name.
        name: String,
        /// Series relinquished by the leave.
        relinquished: u64,
        /// Whether the final transition completed.
        completed: bool,
        /// Points still pending.
        pending: u64,
    },
    /// Answer to `quit`.
    Bye {
        /// Name.
        name: String,
        /// Points still pending.
        pending: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse() {
        assert_eq!(
            NodeCommand::parse("p 7 -3 1.5"),
            Some(NodeCommand::Point {
                id: 7,
                series: -3,
                value: 1.5
            })
        );
        assert_eq!(NodeCommand::parse("status"), Some(NodeCommand::Status));
        assert_eq!(
            NodeCommand::parse("r -4"),
            Some(NodeCommand::Read { series: -4 })
        );
        assert_eq!(NodeCommand::parse("r"), None);
        assert_eq!(NodeCommand::parse("p 7 x 1"), None);
        assert_eq!(NodeCommand::parse("p 7 1"), None);
        assert_eq!(NodeCommand::parse("quit now"), None);
        assert_eq!(NodeCommand::parse(""), None);
    }

    #[test]
    fn events_round_trip() {
        let e = NodeEvent::Acked {
            owner: "n1".into(),
            generation: 5,
            count: 3,
            ids: vec![4, 9, 12],
        };
        let line = serde_json::to_string(&e).unwrap();
        assert!(line.starts_with(r#"{"ev":"acked""#));
        assert_eq!(serde_json::from_str::<NodeEvent>(&line).unwrap(), e);
    }
}
