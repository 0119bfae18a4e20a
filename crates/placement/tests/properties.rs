//! Property tests of placement: owners, order independence, the seed's
//! formula, and diffs against a naive recomputation.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use shoal_placement::{NodeId, PlacementTable, Strategy as Rule, View, ViewMember};

/// Deterministic runs: a fixed seed (CI and every machine see the same
/// cases), no failure-persistence files.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(0x5ea1_0001),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Members drawn from a small name space so that duplicates, restarts and
/// not-ready members all occur.
fn members() -> impl Strategy<Value = Vec<ViewMember>> {
    prop::collection::vec((0u8..12, 0u64..6, prop::bool::weighted(0.8)), 0..16).prop_map(|v| {
        v.into_iter()
            .map(|(name, generation, ready)| ViewMember::new(format!("n{name}"), generation, ready))
            .collect()
    })
}

fn rule() -> impl Strategy<Value = Rule> {
    prop_oneof![
        Just(Rule::ModN),
        (1u32..300).prop_map(|partitions| Rule::Rendezvous { partitions }),
    ]
}

fn ids() -> impl Strategy<Value = Vec<i64>> {
    prop::collection::vec(any::<i64>(), 0..40).prop_map(|mut v| {
        v.extend([i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX]);
        v
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn owners_are_distinct_ready_and_min_copies(
        members in members(), rule in rule(), copies in 1usize..6, ids in ids()
    ) {
        let view = View::new(members.clone());
        let n = view.len();
        let table = PlacementTable::build(view, &rule, copies).unwrap();
        for id in ids {
            let owners = table.owners(id);
            prop_assert_eq!(owners.len(), copies.min(n));
            let distinct: BTreeSet<_> = owners.iter().collect();
            prop_assert_eq!(distinct.len(), owners.len());
            prop_assert_eq!(table.primary(id), owners.first().copied());
            for node in table.owner_ids(id) {
                // Ready, and the newest generation of its name.
                prop_assert!(members.iter().any(|m| m.id == *node && m.ready));
                prop_assert!(members.iter().all(|m| m.id.name != node.name
                    || m.id.generation <= node.generation));
            }
        }
    }

    #[test]
    fn the_same_members_in_any_order_give_the_same_owners(
        (members, shuffled) in members().prop_flat_map(|m| (Just(m.clone()), Just(m).prop_shuffle())),
        rule in rule(), copies in 1usize..4, ids in ids()
    ) {
        let a = PlacementTable::build(View::new(members), &rule, copies).unwrap();
        let b = PlacementTable::build(View::new(shuffled), &rule, copies).unwrap();
        prop_assert_eq!(a.view_id(), b.view_id());
        prop_assert_eq!(a.view(), b.view());
        for id in ids {
            let oa: Vec<&NodeId> = a.owner_ids(id).collect();
            let ob: Vec<&NodeId> = b.owner_ids(id).collect();
            prop_assert_eq!(oa, ob);
        }
    }

    #[test]
    fn view_id_depends_only_on_the_ready_set(members in members(), extra in members()) {
        // Adding only not-ready members of new names changes nothing.
        let view = View::new(members.clone());
        let mut more = members;
        more.extend(extra.into_iter().map(|m| ViewMember::new(format!("x{}", m.id.name), m.id.generation, false)));
        prop_assert_eq!(View::new(more).id(), view.id());
    }

    #[test]
    fn modn_is_the_seed_formula(members in members(), copies in 1usize..6, ids in ids()) {
        let view = View::new(members);
        let nodes = view.nodes().to_vec();
        let n = nodes.len() as i128;
        let table = PlacementTable::build(view, &Rule::ModN, copies).unwrap();
        for id in ids {
            let got: Vec<&NodeId> = table.owner_ids(id).collect();
            let expected: Vec<&NodeId> = (0..copies.min(nodes.len()) as i128)
                .map(|i| &nodes[(i128::from(id) + i).rem_euclid(n) as usize])
                .collect();
            prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn diff_matches_a_naive_comparison(
        old in members(), new in members(), old_rule in rule(), same_rule in any::<bool>(),
        new_rule in rule(), old_copies in 1usize..4, new_copies in 1usize..4, ids in ids()
    ) {
        let new_rule = if same_rule { old_rule.clone() } else { new_rule };
        let a = PlacementTable::build(View::new(old), &old_rule, old_copies).unwrap();
        let b = PlacementTable::build(View::new(new), &new_rule, new_copies).unwrap();
        let diff = a.diff(&b, ids.iter().copied());
        let mut moves = Vec::new();
        let mut replicas = Vec::new();
        for &id in &ids {
            let before: Vec<&NodeId> = a.owner_ids(id).collect();
            let after: Vec<&NodeId> = b.owner_ids(id).collect();
            if before.first() != after.first() {
                moves.push((id, before.first().map(|n| (*n).clone()), after.first().map(|n| (*n).clone())));
            } else if before.iter().collect::<BTreeSet<_>>() != after.iter().collect::<BTreeSet<_>>() {
                replicas.push(id);
            }
        }
        let got: Vec<_> = diff.primary_moves.iter().map(|m| (m.id, m.from.clone(), m.to.clone())).collect();
        prop_assert_eq!(got, moves);
        prop_assert_eq!(diff.replica_changes, replicas);
    }

    #[test]
    fn rebuild_gives_what_build_gives(
        views in prop::collection::vec(members(), 2..5), rule in rule(), copies in 1usize..4,
        other_rule in rule(), other_copies in 1usize..4
    ) {
        // A chain of views: each table rebuilt from the previous one must be
        // identical to one built from scratch.
        let mut views = views.into_iter().map(View::new);
        let first = views.next().unwrap();
        let mut table = PlacementTable::build(first, &rule, copies).unwrap();
        for view in views {
            let rebuilt = table.rebuild(view.clone()).unwrap();
            let built = PlacementTable::build(view.clone(), &rule, copies).unwrap();
            prop_assert_eq!(rebuilt.view(), built.view());
            prop_assert_eq!(rebuilt.slot_count(), built.slot_count());
            for slot in 0..built.slot_count() as u32 {
                prop_assert_eq!(rebuilt.slot_owners(slot), built.slot_owners(slot));
            }
            // From a table of another configuration: still a plain build.
            let other = PlacementTable::build_from(&table, view, &other_rule, other_copies).unwrap();
            let plain = PlacementTable::build(other.view().clone(), &other_rule, other_copies).unwrap();
            for slot in 0..plain.slot_count() as u32 {
                prop_assert_eq!(other.slot_owners(slot), plain.slot_owners(slot));
            }
            table = rebuilt;
        }
    }

    #[test]
    fn rendezvous_moves_little_on_join_and_leave(
        names in prop::collection::btree_set("[a-z]{1,8}", 2..30), partitions in 2000u32..6000
    ) {
        let nodes: Vec<NodeId> = names.iter().enumerate().map(|(i, n)| NodeId::new(n.clone(), i as u64)).collect();
        let rule = Rule::Rendezvous { partitions };
        let n = nodes.len() - 1;
        let before = PlacementTable::build(View::from_nodes(nodes[..n].to_vec()), &rule, 1).unwrap();
        let after = PlacementTable::build(View::from_nodes(nodes.clone()), &rule, 1).unwrap();
        let joined = &nodes[n];
        let (mut moved, mut to_joined) = (0usize, 0usize);
        for slot in 0..partitions {
            let a = before.view().node(before.slot_owners(slot)[0]).unwrap();
            let b = after.view().node(after.slot_owners(slot)[0]).unwrap();
            if a != b {
                moved += 1;
                if b == joined { to_joined += 1; }
            }
        }
        let ideal = f64::from(partitions) / (n as f64 + 1.0);
        // Generous bounds: binomial noise of a few thousand partitions plus
        // the load bound's knock-on moves.
        prop_assert!((moved as f64) < 1.5 * ideal + 20.0, "moved {} ideal {}", moved, ideal);
        prop_assert!((to_joined as f64) > 0.6 * ideal - 20.0, "to joined {} ideal {}", to_joined, ideal);
        prop_assert!(moved - to_joined <= moved / 2 + 10, "knock-on {} of {}", moved - to_joined, moved);
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Configuration and identities decoded from untrusted text: errors,
    /// never panics, and a decoded strategy builds or reports an error.
    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = serde_json::from_slice::<NodeId>(&bytes);
        let _ = serde_json::from_slice::<ViewMember>(&bytes);
        if let Ok(rule) = serde_json::from_slice::<Rule>(&bytes) {
            let _ = PlacementTable::build(View::default(), &rule, 1);
        }
    }

    #[test]
    fn any_decoded_partition_count_builds_or_errors(
        partitions in prop_oneof![0u32..50_000, any::<u32>()], copies in 0usize..4
    ) {
        let json = format!(r#"{{"Rendezvous":{{"partitions":{partitions}}}}}"#);
        let rule: Rule = serde_json::from_str(&json).unwrap();
        let view = View::from_nodes([NodeId::new("a", 1), NodeId::new("b", 2)]);
        // Large counts are rejected before any allocation.
        if partitions <= 50_000 || partitions > Rule::MAX_PARTITIONS || copies == 0 {
            match PlacementTable::build(view, &rule, copies) {
                Ok(t) => prop_assert_eq!(t.owners(0).len(), copies.min(2)),
                Err(_) => prop_assert!(copies == 0 || partitions == 0 || partitions > Rule::MAX_PARTITIONS),
            }
        }
    }
}
