//! Unit tests of [`Peers`]: each method keeps the invariants of the
//! module doc ([`Peers::check`]) and the bounds hold.

use super::*;

fn node(i: u64) -> NodeId {
    NodeId::new(format!("n{i}"), i)
}

fn set(nodes: &[u64]) -> BTreeSet<NodeId> {
    nodes.iter().map(|&i| node(i)).collect()
}

#[test]
fn members_added_and_removed_in_node_order() {
    let t0 = Instant::now();
    let mut p = Peers::default();
    let (added, removed) = p.set_members(&set(&[3, 1, 2]), t0).unwrap();
    assert_eq!(added, vec![node(1), node(2), node(3)]);
    assert!(removed.is_empty());
    assert!(p.set_members(&set(&[1, 2, 3]), t0).is_none());
    let t1 = t0 + Duration::from_secs(1);
    let (added, removed) = p.set_members(&set(&[2, 4]), t1).unwrap();
    assert_eq!(added, vec![node(4)]);
    assert_eq!(removed, vec![node(1), node(3)]);
    assert_eq!(
        p.members().cloned().collect::<Vec<_>>(),
        vec![node(2), node(4)]
    );
    assert_eq!(p.member_since(&node(2)), Some(t0));
    assert_eq!(p.member_since(&node(4)), Some(t1));
    assert_eq!(p.member_since(&node(1)), None);
    // Nothing else known of 1 and 3: their entries are gone.
    assert_eq!(p.by_node.len(), 2);
    p.check();
}

#[test]
fn going_clears_membership_markers_and_done_state_but_not_since() {
    let t0 = Instant::now();
    let mut p = Peers::default();
    p.set_members(&set(&[1, 2]), t0);
    p.reset_done(&set(&[1, 2]));
    p.note_answered(&node(1), 3, 4);
    p.note_notified(&node(1));
    assert!(!p.none_missing());
    assert!(p.mark_gone(&node(1), t0, |_| false));
    assert!(!p.mark_gone(&node(1), t0, |_| false));
    assert!(p.is_gone(&node(1)));
    assert!(!p.is_member(&node(1)));
    assert!(!p.is_missing(&node(1)));
    assert_eq!(p.answered(&node(1)), None);
    assert_eq!(p.member_since(&node(1)), Some(t0));
    assert!(p.is_notified(&node(1)));
    assert_eq!(p.missing().cloned().collect::<Vec<_>>(), vec![node(2)]);
    p.check();
}

#[test]
fn done_markers_owed_counted_and_outdated() {
    let mut p = Peers::default();
    p.reset_done(&set(&[1, 2]));
    assert!(p.count_done(&node(1), 7));
    assert!(!p.count_done(&node(1), 7));
    assert_eq!(p.done(&node(1)), Done::Said(7));
    assert!(p.said_done(&node(1)));
    // Said already: still said.
    p.expect_done(&node(1));
    assert!(p.said_done(&node(1)));
    p.marker_outdated(&node(1));
    assert!(p.is_missing(&node(1)));
    assert!(p.drop_missing(&node(2)));
    assert!(!p.drop_missing(&node(2)));
    assert_eq!(p.missing().cloned().collect::<Vec<_>>(), vec![node(1)]);
    p.count_done(&node(1), 8);
    assert!(p.none_missing());
    p.check();
    // A new install forgets every marker.
    p.reset_done(&set(&[3]));
    assert_eq!(p.done(&node(1)), Done::NotAsked);
    assert!(p.is_missing(&node(3)));
    assert_eq!(p.by_node.len(), 1);
    p.check();
}

#[test]
fn announcements_are_news_once_and_bounded() {
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_secs(1);
    let mut p = Peers::default();
    assert!(p.note_announcement(&node(1), 2, ViewId(9), t0));
    assert!(!p.note_announcement(&node(1), 2, ViewId(9), t1));
    assert_eq!(p.announced(&node(1)).map(|a| a.since), Some(t0));
    assert!(p.note_announcement(&node(1), 3, ViewId(9), t1));
    assert_eq!(
        p.announced(&node(1)).map(|a| (a.epoch, a.since)),
        Some((3, t1))
    );
    for i in 2..=MAX_PEERS as u64 {
        p.note_announcement(&node(i), 1, ViewId(1), t0);
    }
    assert_eq!(p.announced.len(), MAX_PEERS);
    // Full: a new peer is news but not recorded; a known one still is.
    let extra = node(MAX_PEERS as u64 + 1);
    assert!(p.note_announcement(&extra, 1, ViewId(1), t0));
    assert_eq!(p.announced(&extra), None);
    assert!(p.note_announcement(&node(1), 4, ViewId(9), t1));
    assert_eq!(p.announced(&node(1)).map(|a| a.epoch), Some(4));
    p.check();
}

#[test]
fn answered_markers_bounded() {
    let mut p = Peers::default();
    for i in 0..MAX_PEERS as u64 {
        p.note_answered(&node(i), 1, 1);
    }
    p.note_answered(&node(MAX_PEERS as u64), 1, 1);
    assert_eq!(p.answered(&node(MAX_PEERS as u64)), None);
    p.note_answered(&node(0), 2, 5);
    assert_eq!(p.answered(&node(0)), Some((2, 5)));
    p.check();
}

#[test]
fn full_departures_forget_the_oldest_unnamed_one() {
    let t0 = Instant::now();
    let mut p = Peers::default();
    let at = |i: u64| t0 + Duration::from_millis(i);
    for i in 0..MAX_PEERS as u64 {
        p.mark_gone(&node(i), at(i), |_| false);
    }
    // Node 0 is the oldest, but a view names it: node 1 goes.
    let named = |n: &NodeId| *n == node(0);
    p.mark_gone(&node(MAX_PEERS as u64), at(MAX_PEERS as u64), named);
    assert!(p.is_gone(&node(0)));
    assert!(!p.is_gone(&node(1)));
    assert!(p.is_gone(&node(MAX_PEERS as u64)));
    assert_eq!(p.counts.gone, MAX_PEERS);
    p.check();
}

#[test]
fn prune_forgets_old_departures_with_their_marks() {
    let t0 = Instant::now();
    let keep = Duration::from_secs(16);
    let mut p = Peers::default();
    // 1: gone and failed, named by a view; 2: gone and failed, unnamed;
    // 3: failed and empty-handed, never gone, unnamed.
    for i in [1, 2] {
        p.mark_failed(&node(i));
        p.mark_gone(&node(i), t0, |_| false);
    }
    p.mark_failed(&node(3));
    p.note_last_word(&node(3), ViewId(1), 5, true, Some(false));
    assert!(p.is_empty_handed(&node(3)));
    let named = |n: &NodeId| *n == node(1);
    p.prune(t0 + keep, keep, named);
    assert!(p.is_gone(&node(2)), "kept for `keep`");
    p.prune(t0 + keep + Duration::from_millis(1), keep, named);
    assert!(p.is_gone(&node(1)) && p.is_failed(&node(1)));
    assert!(!p.is_gone(&node(2)) && !p.is_failed(&node(2)));
    assert!(!p.is_failed(&node(3)) && !p.is_empty_handed(&node(3)));
    p.check();
    // With no departure remembered, failed marks are left alone.
    let mut q = Peers::default();
    q.mark_failed(&node(3));
    q.prune(t0 + keep * 2, keep, |_| false);
    assert!(q.is_failed(&node(3)));
    q.check();
}

/// A member that departs leaves nothing behind once its departure is
/// forgotten: when it became a member goes too, so the table is bounded by
/// the members, the views' nodes and the departures remembered.
#[test]
fn a_departed_members_entry_goes_with_its_departure() {
    let t0 = Instant::now();
    let keep = Duration::from_secs(16);
    let mut p = Peers::default();
    for round in 0..100u64 {
        let n = node(round);
        let at = t0 + Duration::from_secs(round);
        p.set_members(&[n.clone()].into_iter().collect(), at);
        assert!(p.mark_gone(&n, at, |_| false));
        p.prune(at, keep, |_| false);
    }
    // Only the departures of the last `keep` are remembered.
    assert!(p.by_node.len() <= 17, "{} entries", p.by_node.len());
    assert_eq!(p.member_since(&node(0)), None);
    p.check();
}

#[test]
fn pending_done_decided_at_install_and_pruned() {
    let t0 = Instant::now();
    let mut p = Peers::default();
    // A done marker for an unknown view: pending, not empty-handed yet.
    assert!(!p.note_last_word(&node(1), ViewId(7), 4, true, None));
    assert!(!p.is_empty_handed(&node(1)));
    assert_eq!(p.counts.pending, 1);
    // Another view: nothing decided.
    p.on_install(ViewId(8), |_| false);
    assert_eq!(p.counts.pending, 1);
    // Its view without it: empty-handed.
    p.on_install(ViewId(7), |_| false);
    assert!(p.is_empty_handed(&node(1)));
    assert_eq!(p.counts.pending, 0);
    // A view naming it clears the mark.
    p.on_install(ViewId(9), |n| *n == node(1));
    assert!(!p.is_empty_handed(&node(1)));
    // A later announcement of a pending node clears its pending marker.
    p.note_last_word(&node(2), ViewId(7), 4, true, None);
    p.note_last_word(&node(2), ViewId(7), 5, false, None);
    assert_eq!(p.counts.pending, 0);
    // Pruned once neither member, gone nor named.
    p.note_last_word(&node(3), ViewId(7), 4, true, None);
    p.set_members(&set(&[3]), t0);
    p.prune(t0, Duration::ZERO, |_| false);
    assert_eq!(p.counts.pending, 1);
    p.set_members(&set(&[]), t0);
    p.prune(t0, Duration::ZERO, |_| false);
    assert_eq!(p.counts.pending, 0);
    assert!(p.by_node.is_empty());
    p.check();
}

#[test]
fn empty_handed_follows_the_latest_word() {
    let mut p = Peers::default();
    assert!(p.note_last_word(&node(1), ViewId(1), 5, true, Some(false)));
    // The same or an older epoch changes nothing.
    assert!(!p.note_last_word(&node(1), ViewId(1), 5, false, None));
    assert!(p.is_empty_handed(&node(1)));
    // A later install of its, not done: it may hold something again.
    assert!(!p.note_last_word(&node(1), ViewId(2), 6, false, None));
    assert!(!p.is_empty_handed(&node(1)));
    // Gone nodes keep their mark at an install naming them.
    assert!(p.note_last_word(&node(1), ViewId(1), 7, true, Some(false)));
    p.mark_gone(&node(1), Instant::now(), |_| false);
    p.on_install(ViewId(3), |_| true);
    assert!(p.is_empty_handed(&node(1)));
    p.check();
}

#[test]
fn notified_cleared_at_each_install() {
    let mut p = Peers::default();
    p.note_notified(&node(1));
    p.note_notified(&node(2));
    assert!(p.is_notified(&node(1)));
    p.clear_notified();
    assert!(!p.is_notified(&node(1)) && !p.is_notified(&node(2)));
    assert!(p.by_node.is_empty());
    p.check();
}
