//! Placement benchmark: `cargo xtask bench placement [--json] [-- options]`.
//!
//! For each strategy (mod-N and rendezvous) and each cluster size it reports:
//! - `lookup_ns`: median over batches of 10,000 of the ns per primary owner
//!   lookup on a built table, over 1,000,000 random ids;
//! - `build_us`: median time to build the table (µs);
//! - `rebuild_us`: median time of `PlacementTable::rebuild` from that table
//!   to the view with one more node (µs);
//! - `moved_fraction_join`: fraction of the datums 0..1,000,000 whose primary
//!   changes when one node (the newest) joins;
//! - `moved_fraction_leave`: the same when the middle node of the placement
//!   list leaves;
//! - `max_over_mean`: most datums (of 0..1,000,000) on one primary over the
//!   mean;
//! - `diff_ms`: time of `PlacementTable::diff` over the 1,000,000 datums for
//!   the join.
//!
//! Options: `--json`, `--nodes 3,16,100,1000`, `--partitions N`,
//! `--copies N`, `--strategy modn|rendezvous|all`. Unknown flags (cargo
//! passes `--bench`) are ignored.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Instant;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shoal_placement::{NodeId, PlacementTable, Strategy, View};

const DATUMS: i64 = 1_000_000;
const LOOKUPS: usize = 1_000_000;
const BATCH: usize = 10_000;

struct Options {
    json: bool,
    nodes: Vec<usize>,
    partitions: u32,
    copies: usize,
    strategies: Vec<&'static str>,
}

fn parse_args() -> Options {
    let mut o = Options {
        json: false,
        nodes: vec![3, 16, 100, 1000],
        partitions: Strategy::DEFAULT_PARTITIONS,
        copies: 1,
        strategies: vec!["modn", "rendezvous"],
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => o.json = true,
            "--nodes" => {
                if let Some(v) = args.next() {
                    o.nodes = v.split(',').filter_map(|s| s.trim().parse().ok()).collect();
                }
            }
            "--partitions" => {
                if let Some(v) = args.next().and_then(|v| v.parse().ok()) {
                    o.partitions = v;
                }
            }
            "--copies" => {
                if let Some(v) = args.next().and_then(|v| v.parse().ok()) {
                    o.copies = v;
                }
            }
            "--strategy" => match args.next().as_deref() {
                Some("modn") => o.strategies = vec!["modn"],
                Some("rendezvous") => o.strategies = vec!["rendezvous"],
                _ => {}
            },
            _ => {} // e.g. `--bench` from cargo
        }
    }
    o
}

fn node(i: usize) -> NodeId {
    NodeId::new(
        format!("node-{i:05}"),
        1_700_000_000_000_000_000 + i as u64 * 1_000,
    )
}

fn view(range: impl Iterator<Item = usize>) -> View {
    View::from_nodes(range.map(node))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    strategy: &'static str,
    nodes: usize,
    partitions: Option<u32>,
    lookup_ns: f64,
    build_us: f64,
    rebuild_us: f64,
    moved_join: f64,
    moved_leave: f64,
    max_over_mean: f64,
    diff_ms: f64,
}

fn measure(strategy: &Strategy, name: &'static str, n: usize, copies: usize, ids: &[i64]) -> Row {
    let base = view(0..n);
    let builds = if n >= 1000 { 3 } else { 7 };
    let mut build_times = Vec::with_capacity(builds);
    let mut table = PlacementTable::empty();
    for _ in 0..builds {
        let v = base.clone();
        let start = Instant::now();
        table = black_box(PlacementTable::build(v, strategy, copies).unwrap());
        build_times.push(start.elapsed().as_secs_f64() * 1e6);
    }

    // Warm up, then time batches of lookups.
    let mut acc = 0u64;
    for &id in &ids[..BATCH] {
        acc = acc.wrapping_add(u64::from(table.owners(id).first().map_or(0, |i| i.0)));
    }
    let mut batch_ns = Vec::with_capacity(ids.len() / BATCH);
    for batch in ids.chunks(BATCH) {
        let start = Instant::now();
        for &id in batch {
            let owners = table.owners(black_box(id));
            acc = acc.wrapping_add(u64::from(owners.first().map_or(0, |i| i.0)));
        }
        batch_ns.push(start.elapsed().as_nanos() as f64 / batch.len() as f64);
    }
    black_box(acc);

    // Balance over datums 0..DATUMS.
    let mut load = vec![0u64; n];
    for id in 0..DATUMS {
        if let Some(p) = table.primary(id) {
            load[p.get()] += 1;
        }
    }
    let max = load.iter().copied().max().unwrap_or(0) as f64;
    let max_over_mean = max / (DATUMS as f64 / n as f64);

    // Join of a newest node, leave of the middle node of the placement list.
    let joined = PlacementTable::build(view(0..=n), strategy, copies).unwrap();
    let mut rebuild_times = Vec::with_capacity(builds);
    for _ in 0..builds {
        let v = view(0..=n);
        let start = Instant::now();
        let rebuilt = black_box(table.rebuild(v).unwrap());
        rebuild_times.push(start.elapsed().as_secs_f64() * 1e6);
        assert_eq!(rebuilt.slot_count(), joined.slot_count());
    }
    let start = Instant::now();
    let join = table.diff(&joined, 0..DATUMS);
    let diff_ms = start.elapsed().as_secs_f64() * 1e3;
    let middle = n / 2;
    let left =
        PlacementTable::build(view((0..n).filter(|&i| i != middle)), strategy, copies).unwrap();
    let leave = table.diff(&left, 0..DATUMS);

    Row {
        strategy: name,
        nodes: n,
        partitions: match strategy {
            Strategy::Rendezvous { partitions } => Some(*partitions),
            Strategy::ModN => None,
        },
        lookup_ns: median(batch_ns),
        build_us: median(build_times),
        rebuild_us: median(rebuild_times),
        moved_join: join.primary_moves.len() as f64 / DATUMS as f64,
        moved_leave: leave.primary_moves.len() as f64 / DATUMS as f64,
        max_over_mean,
        diff_ms,
    }
}

fn main() {
    let o = parse_args();
    let mut rng = SmallRng::seed_from_u64(0x5ea1);
    let ids: Vec<i64> = (0..LOOKUPS).map(|_| rng.random::<i64>()).collect();
    if !o.json {
        println!(
            "{:<11} {:>6} {:>10} {:>10} {:>12} {:>11} {:>9} {:>11} {:>11} {:>9} {:>9}",
            "strategy",
            "nodes",
            "partitions",
            "lookup_ns",
            "build_us",
            "rebuild_us",
            "join",
            "1.1/(N+1)",
            "leave",
            "max/mean",
            "diff_ms"
        );
    }
    for &name in &o.strategies {
        let strategy = match name {
            "modn" => Strategy::ModN,
            _ => Strategy::Rendezvous {
                partitions: o.partitions,
            },
        };
        for &n in &o.nodes {
            if n == 0 {
                continue;
            }
            let r = measure(&strategy, name, n, o.copies, &ids);
            if o.json {
                let partitions = r.partitions.map_or("null".to_string(), |p| p.to_string());
                println!(
                    "{{\"bench\":\"placement\",\"strategy\":\"{}\",\"nodes\":{},\"copies\":{},\
                     \"partitions\":{},\"lookup_ns\":{:.2},\"build_us\":{:.1},\"rebuild_us\":{:.1},\
                     \"moved_fraction_join\":{:.5},\"moved_fraction_leave\":{:.5},\
                     \"max_over_mean\":{:.4},\"diff_ms\":{:.1}}}",
                    r.strategy,
                    r.nodes,
                    o.copies,
                    partitions,
                    r.lookup_ns,
                    r.build_us,
                    r.rebuild_us,
                    r.moved_join,
                    r.moved_leave,
                    r.max_over_mean,
                    r.diff_ms
                );
            } else {
                println!(
                    "{:<11} {:>6} {:>10} {:>10.2} {:>12.1} {:>11.1} {:>9.5} {:>11.5} {:>11.5} {:>9.4} {:>9.1}",
                    r.strategy,
                    r.nodes,
                    r.partitions.map_or("-".to_string(), |p| p.to_string()),
                    r.lookup_ns,
                    r.build_us,
                    r.rebuild_us,
                    r.moved_join,
                    1.1 / (r.nodes as f64 + 1.0),
                    r.moved_leave,
                    r.max_over_mean,
                    r.diff_ms
                );
            }
        }
    }
}
