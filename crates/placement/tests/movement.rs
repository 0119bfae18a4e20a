//! Movement and balance of the minimal-movement strategy at its default
//! partition count, on fixed node names (deterministic), against the targets
//! in `docs/placement.md`: a join moves at most 1.1/(N+1) of the datums, a
//! leave at most 1.1/N, and the most loaded primary carries at most 1.10
//! times the mean, for every cluster size up to 100.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use shoal_placement::{NodeId, PlacementTable, Strategy, View};

const DATUMS: i64 = 1_000_000;

fn node(prefix: &str, i: usize) -> NodeId {
    NodeId::new(
        format!("{prefix}-{i}"),
        1_700_000_000_000_000_000 + i as u64,
    )
}

fn table(prefix: &str, nodes: impl Iterator<Item = usize>) -> PlacementTable {
    let view = View::from_nodes(nodes.map(|i| node(prefix, i)));
    PlacementTable::build(view, &Strategy::rendezvous(), 1).unwrap()
}

/// Fraction of the datums `0..DATUMS` whose primary differs.
fn moved(a: &PlacementTable, b: &PlacementTable) -> f64 {
    let moved = (0..DATUMS)
        .filter(|&id| a.owner_ids(id).next() != b.owner_ids(id).next())
        .count();
    moved as f64 / DATUMS as f64
}

fn max_over_mean(t: &PlacementTable) -> f64 {
    let mut load = vec![0u64; t.view().len()];
    for id in 0..DATUMS {
        load[t.primary(id).unwrap().get()] += 1;
    }
    *load.iter().max().unwrap() as f64 * t.view().len() as f64 / DATUMS as f64
}

fn check(prefix: &str, sizes: &[usize]) {
    for &n in sizes {
        let base = table(prefix, 0..n);
        let joined = table(prefix, 0..=n);
        let middle = n / 2;
        let left = table(prefix, (0..n).filter(|&i| i != middle));

        let join = moved(&base, &joined);
        let ideal_join = 1.0 / (n as f64 + 1.0);
        assert!(
            join <= 1.1 * ideal_join,
            "{prefix} n={n}: join moved {join}"
        );
        assert!(
            join >= 0.9 * ideal_join,
            "{prefix} n={n}: join moved {join}"
        );

        let leave = moved(&base, &left);
        let ideal_leave = 1.0 / n as f64;
        assert!(
            leave <= 1.1 * ideal_leave,
            "{prefix} n={n}: leave moved {leave}"
        );
        assert!(
            leave >= 0.9 * ideal_leave,
            "{prefix} n={n}: leave moved {leave}"
        );

        let balance = max_over_mean(&base);
        assert!(balance <= 1.10, "{prefix} n={n}: max/mean {balance}");
    }
}

#[test]
fn small_clusters_move_about_one_share() {
    check("node", &[2, 3, 4, 5, 7, 10]);
}

#[test]
fn larger_clusters_move_about_one_share() {
    check("host", &[16, 31, 50, 64, 99]);
}

#[test]
fn restarting_a_node_moves_only_its_datums_and_back_to_it() {
    // Rendezvous keys on the name: a restarted node (new generation) takes
    // back exactly the partitions it had, so only its datums change primary,
    // from its old generation to its new one.
    let nodes: Vec<NodeId> = (0..8).map(|i| node("r", i)).collect();
    let mut restarted = nodes.clone();
    restarted[3].generation += 1_000;
    let rule = Strategy::rendezvous();
    let a = PlacementTable::build(View::from_nodes(nodes.clone()), &rule, 2).unwrap();
    let b = PlacementTable::build(View::from_nodes(restarted.clone()), &rule, 2).unwrap();
    let diff = a.diff(&b, 0..100_000);
    assert!(!diff.primary_moves.is_empty());
    for m in &diff.primary_moves {
        assert_eq!(m.from.as_ref(), Some(&nodes[3]));
        assert_eq!(m.to.as_ref(), Some(&restarted[3]));
    }
    // Datums it held as a replica only: replica changes.
    for &id in &diff.replica_changes {
        assert!(a.owner_ids(id).skip(1).any(|n| *n == nodes[3]));
    }
    let share = diff.primary_moves.len() as f64 / 100_000.0;
    assert!((0.08..0.17).contains(&share), "{share}");
}

#[test]
fn rebuilding_from_the_previous_table_gives_the_same_table() {
    // Default partitions, copies 1 and 3, a sequence of joins, leaves and a
    // restart, including sizes where the load bound binds.
    for copies in [1, 3] {
        let rule = Strategy::rendezvous();
        let steps: Vec<Vec<usize>> = vec![
            (0..40).collect(),
            (0..41).collect(),
            (0..43).collect(),
            (1..43).filter(|&i| i != 20).collect(),
            (1..44).collect(),
        ];
        let mut table = PlacementTable::build(
            View::from_nodes(steps[0].iter().map(|&i| node("b", i))),
            &rule,
            copies,
        )
        .unwrap();
        for (k, step) in steps.iter().enumerate().skip(1) {
            let mut nodes: Vec<NodeId> = step.iter().map(|&i| node("b", i)).collect();
            if k == 4 {
                nodes[5].generation += 1; // a restart
            }
            let view = View::from_nodes(nodes);
            let rebuilt = table.rebuild(view.clone()).unwrap();
            let built = PlacementTable::build(view, &rule, copies).unwrap();
            for slot in 0..built.slot_count() as u32 {
                assert_eq!(
                    rebuilt.slot_owners(slot),
                    built.slot_owners(slot),
                    "copies {copies} step {k} slot {slot}"
                );
            }
            table = rebuilt;
        }
    }
}

#[test]
fn placement_is_pinned_across_versions() {
    // Nodes of a cluster may run different builds during a rolling upgrade:
    // they must agree on owners. Any change of these values is a breaking
    // change of the placement and must be called out as such.
    let view = View::from_nodes((0..5).map(|i| node("pin", i)));
    let rendezvous = PlacementTable::build(view.clone(), &Strategy::rendezvous(), 2).unwrap();
    let modn = PlacementTable::build(view, &Strategy::ModN, 2).unwrap();
    let names = |t: &PlacementTable, id: i64| -> String {
        t.owner_ids(id)
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    };
    let got: Vec<String> = [0, 1, 2, 3, -1, i64::MIN, i64::MAX, 123_456_789]
        .iter()
        .map(|&id| format!("{} | {}", names(&rendezvous, id), names(&modn, id)))
        .collect();
    assert_eq!(got, PINNED);
}

/// Owners (rendezvous | mod-N) of datums 0, 1, 2, 3, -1, i64::MIN,
/// i64::MAX and 123456789 on nodes pin-0..pin-4, two copies. The mod-N side
/// is the seed's formula: e.g. i64::MIN ≡ 2 (mod 5), so pin-2, pin-3.
const PINNED: [&str; 8] = [
    "pin-1,pin-3 | pin-0,pin-1",
    "pin-1,pin-2 | pin-1,pin-2",
    "pin-3,pin-4 | pin-2,pin-3",
    "pin-2,pin-3 | pin-3,pin-4",
    "pin-2,pin-0 | pin-4,pin-0",
    "pin-4,pin-1 | pin-2,pin-3",
    "pin-3,pin-0 | pin-2,pin-3",
    "pin-2,pin-0 | pin-4,pin-0",
];
