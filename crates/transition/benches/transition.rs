//! Benchmark of the handoff: the state machines of all nodes exchanging
//! notices in memory (encoded and decoded as on the wire), with no-op
//! relinquish and acquire, from the new view to every node idle.
//!
//! `cargo xtask bench transition [--json] [-- --datums N]`: one row per
//! (change, strategy): 3 -> 4 nodes (join) and 4 -> 3 (leave), mod-N and
//! rendezvous (minimal movement). `--json` prints one JSON object per line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use shoal_placement::{NodeId, PlacementTable, Strategy, View};
use shoal_transition::{Config, Datum, Handoff};

struct Row {
    datums: i64,
    nodes_before: usize,
    nodes_after: usize,
    strategy: &'static str,
    wall_s: f64,
    cpu_s: f64,
    setup_s: f64,
    notices: u64,
    batches: u64,
    peak_in_flight: usize,
    moved: u64,
}

/// CPU time of this process so far (user + system), from /proc; NaN elsewhere.
/// Reported next to wall time because the machine may be shared.
fn cpu_time() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name (which is in parentheses).
    let Some(rest) = stat.rsplit(')').next() else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    match (ticks(11), ticks(12)) {
        // utime and stime, in clock ticks (100 per second on Linux).
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

fn table(nodes: &[NodeId], strategy: &Strategy) -> Arc<PlacementTable> {
    let view = View::from_nodes(nodes.iter().cloned());
    Arc::new(PlacementTable::build(view, strategy, 1).unwrap())
}

/// Runs every node until none has anything left to do; returns
/// (notices, batches, peak in flight).
fn drive(nodes: &mut [Handoff<()>], ids: &[NodeId], now: Instant) -> (u64, u64, usize) {
    let mut notices = 0u64;
    let mut batches = 0u64;
    let mut peak = 0usize;
    loop {
        let mut progressed = false;
        for node in nodes.iter_mut() {
            while let Some(job) = node.poll_job() {
                node.job_done(job, Ok(()), now);
                progressed = true;
            }
        }
        for i in 0..nodes.len() {
            while let Some(tx) = nodes[i].poll_transmit() {
                progressed = true;
                let bytes = tx.batch.encode();
                notices += tx.batch.len() as u64;
                batches += 1;
                let to = ids.iter().position(|n| *n == tx.to).unwrap();
                nodes[to].handle_notices(&ids[i], &bytes, now).unwrap();
                nodes[i].send_done(tx.id, Ok(()), now);
            }
        }
        let in_flight: usize = nodes.iter().map(Handoff::in_flight).sum();
        peak = peak.max(in_flight);
        for node in nodes.iter_mut() {
            while node.poll_event().is_some() {}
        }
        if !progressed {
            break;
        }
    }
    for node in nodes.iter() {
        assert!(node.is_idle(), "{node:?} not idle");
    }
    (notices, batches, peak)
}

fn run(datums: i64, before: usize, after: usize, strategy: &Strategy) -> Row {
    let total = before.max(after);
    let ids: Vec<NodeId> = (0..total)
        .map(|i| NodeId::new(format!("node-{i}"), 1_000 + i as u64))
        .collect();
    let setup = Instant::now();
    let now = Instant::now();
    let mut nodes: Vec<Handoff<()>> = ids
        .iter()
        .map(|id| Handoff::new(id.clone(), Config::default()).unwrap())
        .collect();
    for node in &mut nodes {
        let ty = node.datum_type("series").unwrap();
        for id in 0..datums {
            node.register(Datum::new(ty, id), now).unwrap();
        }
    }
    let t_before = table(&ids[..before], strategy);
    let t_after = table(&ids[..after], strategy);
    for node in &mut nodes {
        node.install(Arc::clone(&t_before), now);
    }
    drive(&mut nodes, &ids, now);
    let acquired_before: u64 = nodes.iter().map(|n| n.counters().acquired).sum();
    assert_eq!(acquired_before, datums as u64);
    let setup_s = setup.elapsed().as_secs_f64();

    let start = Instant::now();
    let cpu_start = cpu_time();
    for node in &mut nodes {
        node.install(Arc::clone(&t_after), now);
    }
    let (notices, batches, peak_in_flight) = drive(&mut nodes, &ids, now);
    let wall_s = start.elapsed().as_secs_f64();
    let cpu_s = cpu_time() - cpu_start;
    let moved = nodes.iter().map(|n| n.counters().acquired).sum::<u64>() - acquired_before;
    assert_eq!(moved, notices, "every move is one notice");
    Row {
        datums,
        nodes_before: before,
        nodes_after: after,
        strategy: strategy.name(),
        wall_s,
        cpu_s,
        setup_s,
        notices,
        batches,
        peak_in_flight,
        moved,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let datums = args
        .iter()
        .position(|a| a == "--datums")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000i64);
    let only: Option<usize> = args
        .iter()
        .position(|a| a == "--row")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok());
    let strategies = [Strategy::ModN, Strategy::rendezvous()];
    let mut row = 0usize;
    if !json {
        println!(
            "{:>9} {:>6} {:>11} {:>8} {:>7} {:>9} {:>9} {:>8} {:>10} {:>8}",
            "datums",
            "nodes",
            "strategy",
            "wall_s",
            "cpu_s",
            "notices",
            "moved",
            "batches",
            "peak",
            "setup_s"
        );
    }
    for strategy in &strategies {
        for (before, after) in [(3, 4), (4, 3)] {
            row += 1;
            if only.is_some_and(|o| o != row) {
                continue;
            }
            let r = run(datums, before, after, strategy);
            if json {
                println!(
                    "{{\"bench\":\"transition\",\"datums\":{},\"nodes_before\":{},\"nodes_after\":{},\"strategy\":\"{}\",\"wall_s\":{:.4},\"cpu_s\":{:.2},\"notices\":{},\"moved\":{},\"batches\":{},\"peak_in_flight\":{},\"setup_s\":{:.3}}}",
                    r.datums,
                    r.nodes_before,
                    r.nodes_after,
                    r.strategy,
                    r.wall_s,
                    r.cpu_s,
                    r.notices,
                    r.moved,
                    r.batches,
                    r.peak_in_flight,
                    r.setup_s
                );
            } else {
                println!(
                    "{:>9} {:>6} {:>11} {:>8.3} {:>7.2} {:>9} {:>9} {:>8} {:>10} {:>8.2}",
                    r.datums,
                    format!("{}->{}", r.nodes_before, r.nodes_after),
                    r.strategy,
                    r.wall_s,
                    r.cpu_s,
                    r.notices,
                    r.moved,
                    r.batches,
                    r.peak_in_flight,
                    r.setup_s
                );
            }
        }
    }
}
