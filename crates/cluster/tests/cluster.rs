//! Real QUIC on loopback, several nodes in one process. Timeouts only bound
//! hangs; nothing asserts on speed. Tests run one at a time (a shared lock)
//! so failure detectors are not starved of CPU by other tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use shoal::wire::{CH_MEMBERSHIP, CH_NOTICES, CH_ROUTED, channel_id};
use shoal::{ClusterCa, Error, MemberState, Node, NodeName, TransitionMode};
use shoal_transport::{Dest, Transport, TransportConfig, WhenFull};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_example_one_node() {
    let _serial = SERIAL.lock().await;
    let ca = ClusterCa::generate().unwrap();
    let ledger = Arc::new(Ledger::default());
    let mut cfg = config("solo");
    cfg.transition = TransitionMode::Manual;
    let node = start(&ca, cfg).await;
    node.join(&[]).await.unwrap();
    let mut changes = node.changes();
    changes.borrow_and_update();
    register(&node, 10, &ledger).await;
    node.set_ready(true).await.unwrap();
    // A change event carrying the new view (earlier changes, such as the
    // datums registered, may come first: the stream yields the latest view).
    let view = tokio::time::timeout(PATIENCE, changes.wait_for(|v| v.local.ready))
        .await
        .unwrap()
        .unwrap()
        .clone();
    assert!(view.local.ready);
    assert_eq!(view.ready.len(), 1);
    // Manual mode: nothing moves before the application's transition.
    assert!(ledger.lock().acquired.is_empty());
    let report = node.transition(PATIENCE).await.unwrap();
    assert!(report.completed);
    assert_eq!(report.acquired, 10);
    assert_eq!(node.owners(3)[0].name, "solo");
    let report = node.leave(PATIENCE).await.unwrap();
    assert_eq!(report.relinquished, 10);
    assert!(ledger.lock().holder.is_empty());
    assert!(ledger.violations().is_empty());
    assert!(matches!(node.set_ready(true).await, Err(Error::Shutdown)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_agree_and_ready_and_metadata_propagate() {
    let _serial = SERIAL.lock().await;
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["a", "b", "c"]).await;
    for n in &nodes {
        let names: Vec<_> = n.members().iter().map(|m| m.name.to_string()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(n.members().iter().all(|m| m.state == MemberState::Alive));
    }
    let mut changes = nodes[0].changes();
    changes.borrow_and_update();
    nodes[1].set_ready(true).await.unwrap();
    nodes[2].set_metadata(b"rack-7".to_vec()).await.unwrap();
    let too_big = vec![0u8; 513];
    assert!(matches!(
        nodes[2].set_metadata(too_big).await,
        Err(Error::MetadataTooLarge { len: 513, max: 512 })
    ));
    eventually("ready flag and metadata everywhere", || {
        nodes.iter().all(|n| {
            let v = n.view();
            v.member("b").is_some_and(|m| m.ready)
                && v.member("c").is_some_and(|m| &*m.metadata == b"rack-7")
                && v.ready.len() == 1
        })
    })
    .await;
    // The local change fired the local notification too.
    assert!(changes.has_changed().unwrap());
    assert_eq!(nodes[0].sorted_nodes()[0].name, "b");
    let snapshot = nodes[0].snapshot().await.unwrap();
    let table = snapshot.to_string();
    assert!(table.contains("rack") || table.contains(" 6"), "{table}");
    assert_eq!(snapshot.members.len(), 3);
    for n in &nodes {
        n.shutdown().await;
    }
}

/// Datums registered everywhere end with one owner each; a 4th node joins
/// and exactly the datums that move are relinquished by their old owner and
/// acquired by the new one after the notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datums_have_one_owner_and_a_join_moves_exactly_what_changes() {
    let _serial = SERIAL.lock().await;
    const DATUMS: i64 = 300;
    let ca = ClusterCa::generate().unwrap();
    let ledger = Arc::new(Ledger::default());
    let nodes = cluster(&ca, &["a", "b", "c"]).await;
    let refs: Vec<&Node> = nodes.iter().collect();
    ready_all(&refs, DATUMS, &ledger).await;
    settled(&refs, 3, DATUMS, &ledger).await;
    let before = nodes[0].view();
    ledger.clear_history();

    let d = start(&ca, config("d")).await;
    d.join(&[nodes[1].local().addr]).await.unwrap();
    register(&d, DATUMS, &ledger).await;
    eventually("d sees three ready nodes", || d.view().ready.len() == 3).await;
    d.set_ready(true).await.unwrap();
    let mut all = refs.clone();
    all.push(&d);
    settled(&all, 4, DATUMS, &ledger).await;
    let after = d.view();

    let mut want_relinquished = BTreeSet::new();
    let mut want_acquired = BTreeSet::new();
    for id in 0..DATUMS {
        let old = before.primary(id).unwrap().name.clone();
        let new = after.primary(id).unwrap().name.clone();
        if old != new {
            want_relinquished.insert((old, id));
            want_acquired.insert((new, id));
        }
    }
    assert!(!want_acquired.is_empty());
    {
        let l = ledger.lock();
        let relinquished: BTreeSet<_> = l.relinquished.iter().cloned().collect();
        let acquired: BTreeSet<_> = l.acquired.iter().cloned().collect();
        assert_eq!(
            l.relinquished.len(),
            relinquished.len(),
            "relinquished twice"
        );
        assert_eq!(l.acquired.len(), acquired.len(), "acquired twice");
        assert_eq!(relinquished, want_relinquished);
        assert_eq!(acquired, want_acquired);
        assert!(l.violations.is_empty(), "{:?}", l.violations);
    }
    for n in &all {
        let t = n.snapshot().await.unwrap().transition;
        assert_eq!(
            t.acquired_after_timeout + t.acquired_owner_gone + t.acquired_all_done,
            0,
            "a join moves every datum by its notice"
        );
    }
    for n in all {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_leave_relinquishes_everything() {
    let _serial = SERIAL.lock().await;
    const DATUMS: i64 = 200;
    let ca = ClusterCa::generate().unwrap();
    let ledger = Arc::new(Ledger::default());
    // Every relinquish and acquire as a spawned task (no inline first poll).
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let mut cfg = config(name);
        cfg.limits.inline_first_poll = false;
        nodes.push(start(&ca, cfg).await);
    }
    join_all(&nodes).await;
    let refs: Vec<&Node> = nodes.iter().collect();
    ready_all(&refs, DATUMS, &ledger).await;
    settled(&refs, 3, DATUMS, &ledger).await;
    let held = ledger.lock().holder.values().filter(|h| *h == "c").count() as u64;
    assert!(held > 0);
    let report = nodes[2].leave(PATIENCE).await.unwrap();
    assert!(report.completed);
    assert_eq!(report.relinquished, held);
    assert!(!ledger.lock().holder.values().any(|h| h == "c"));
    settled(&refs[..2], 2, DATUMS, &ledger).await;
    eventually("c is gone from the others' views", || {
        nodes[..2].iter().all(|n| n.view().member("c").is_none())
    })
    .await;
    for n in &nodes[..2] {
        let t = n.snapshot().await.unwrap().transition;
        assert_eq!(t.acquired_after_timeout, 0);
    }
    assert!(ledger.violations().is_empty(), "{:?}", ledger.violations());
    for n in &nodes[..2] {
        n.shutdown().await;
    }
}

/// A node dropped without leaving is detected and its datums are acquired
/// elsewhere at once, not after the transition timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_node_is_detected_and_its_datums_taken_over() {
    let _serial = SERIAL.lock().await;
    const DATUMS: i64 = 200;
    let ca = ClusterCa::generate().unwrap();
    let ledger = Arc::new(Ledger::default());
    // A failover happens at once only when every node that was the datum's
    // primary in a recent view (replaced less than the transition timeout
    // ago) is declared failed, so the views of the cluster forming must be
    // older than that timeout: 4 s here, and we wait it out before the kill.
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let mut cfg = config(name);
        cfg.transition_timeout_ms = 4_000;
        nodes.push(start(&ca, cfg).await);
    }
    join_all(&nodes).await;
    let refs: Vec<&Node> = nodes.iter().collect();
    ready_all(&refs, DATUMS, &ledger).await;
    settled(&refs, 3, DATUMS, &ledger).await;
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    let before: Vec<_> = {
        let mut v = Vec::new();
        for n in &nodes[..2] {
            v.push(n.snapshot().await.unwrap().transition);
        }
        v
    };
    ledger.lock().dead.insert("c".into());
    nodes[2].shutdown().await;
    settled(&refs[..2], 2, DATUMS, &ledger).await;
    let mut gone = 0;
    for (n, b) in nodes[..2].iter().zip(&before) {
        let t = n.snapshot().await.unwrap().transition;
        assert_eq!(
            t.acquired_after_timeout, b.acquired_after_timeout,
            "waited out the timeout"
        );
        gone += t.acquired_owner_gone - b.acquired_owner_gone;
        let c = n.snapshot().await.unwrap();
        assert!(
            c.members
                .iter()
                .any(|m| &*m.name == "c" && m.state == MemberState::Dead)
        );
    }
    assert!(gone > 0);
    assert!(ledger.violations().is_empty(), "{:?}", ledger.violations());
    for n in &nodes[..2] {
        n.shutdown().await;
    }
}

/// Messages sent to datum owners while a 4th node joins arrive exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_messages_during_a_transition_arrive_once() {
    let _serial = SERIAL.lock().await;
    const DATUMS: i64 = 100;
    const MESSAGES: u64 = 3000;
    let ca = ClusterCa::generate().unwrap();
    let ledger = Arc::new(Ledger::default());
    let mut nodes = cluster(&ca, &["a", "b", "c"]).await;
    let d = start(&ca, config("d")).await;
    nodes.push(d);
    // Message sequence number -> where it was processed (node, datum).
    type Deliveries = Arc<Mutex<HashMap<u64, Vec<(String, i64)>>>>;
    let received: Deliveries = Arc::default();
    let mut senders = Vec::new();
    for n in &nodes {
        let (tx, mut rx) = n.channel::<u64>("work").unwrap();
        senders.push(tx);
        let received = Arc::clone(&received);
        let name = n.local().name.to_string();
        let ledger = Arc::clone(&ledger);
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                let (ty, id) = m.datum.unwrap();
                assert_eq!(&*ty, "series");
                // Processed only where the datum is held.
                let holder = ledger.lock().holder.get(&id).cloned();
                if holder.as_deref() != Some(name.as_str()) {
                    ledger.lock().violations.push(format!(
                        "message {} for {id} processed on {name}, held by {holder:?}",
                        m.payload
                    ));
                }
                received
                    .lock()
                    .unwrap()
                    .entry(m.payload)
                    .or_default()
                    .push((name.clone(), id));
            }
        });
    }
    let refs: Vec<&Node> = nodes[..3].iter().collect();
    ready_all(&refs, DATUMS, &ledger).await;
    settled(&refs, 3, DATUMS, &ledger).await;

    let sender = senders[0].clone();
    let sending = tokio::spawn(async move {
        for seq in 0..MESSAGES {
            let id = (seq * 7919) as i64 % DATUMS;
            sender.send_to_owner("series", id, &seq).await.unwrap();
            if seq % 100 == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let d = &nodes[3];
    d.join(&[nodes[0].local().addr]).await.unwrap();
    register(d, DATUMS, &ledger).await;
    eventually("d sees three ready nodes", || d.view().ready.len() == 3).await;
    d.set_ready(true).await.unwrap();
    sending.await.unwrap();
    let all: Vec<&Node> = nodes.iter().collect();
    settled(&all, 4, DATUMS, &ledger).await;
    eventually("every message delivered", || {
        received.lock().unwrap().len() as u64 == MESSAGES
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (seq, at) in received.lock().unwrap().iter() {
        assert_eq!(at.len(), 1, "message {seq} delivered {at:?}");
    }
    assert!(ledger.violations().is_empty(), "{:?}", ledger.violations());
    for n in &nodes {
        n.shutdown().await;
    }
}

/// A node with a certificate from another CA can neither join nor send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_certificate_cannot_join_or_send() {
    let _serial = SERIAL.lock().await;
    let ca = ClusterCa::generate().unwrap();
    let nodes = cluster(&ca, &["a", "b"]).await;
    let (_, mut inbox) = nodes[0].channel::<u64>("work").unwrap();

    let other = ClusterCa::generate().unwrap();
    let mut cfg = config("intruder");
    cfg.join_timeout_ms = 2_000;
    let intruder = start(&other, cfg).await;
    let joined = intruder.join(&[nodes[0].local().addr]).await;
    assert!(matches!(joined, Err(Error::JoinTimeout(_))), "{joined:?}");
    assert_eq!(intruder.members().len(), 1);

    // Straight through a transport with the foreign identity, too.
    let id = other.issue(&NodeName::new("intruder2").unwrap()).unwrap();
    let (raw, _in) = Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        &id,
        TransportConfig::default(),
    )
    .unwrap();
    let to_a = Dest::node(NodeName::new("a").unwrap(), nodes[0].local().addr);
    let body = Bytes::from(postcard::to_allocvec(&7u64).unwrap());
    let _ = raw
        .send(&to_a, channel_id("work"), body, WhenFull::Fail)
        .await;
    let _ = raw.send_datagram(&to_a, b"hello").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(inbox.try_recv().is_none());
    for n in &nodes {
        assert_eq!(n.members().len(), 2);
        assert!(n.view().member("intruder").is_none());
    }
    assert!(nodes[0].transport_stats().handshakes_rejected > 0);
    raw.shutdown().await;
    intruder.shutdown().await;
    for n in &nodes {
        n.shutdown().await;
    }
}

/// Garbage on every path is counted and dropped; the cluster carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_do_not_disturb_the_cluster() {
    let _serial = SERIAL.lock().await;
    const DATUMS: i64 = 50;
    let ca = ClusterCa::generate().unwrap();
    let ledger = Arc::new(Ledger::default());
    let nodes = cluster(&ca, &["a", "b"]).await;
    let (_, mut inbox) = nodes[0].channel::<u64>("work").unwrap();
    let (sender_b, _) = nodes[1].channel::<u64>("work").unwrap();
    let refs: Vec<&Node> = nodes.iter().collect();
    ready_all(&refs, DATUMS, &ledger).await;
    settled(&refs, 2, DATUMS, &ledger).await;

    // An authenticated peer (a valid certificate) sending garbage.
    let id = ca.issue(&NodeName::new("rogue").unwrap()).unwrap();
    let (raw, _in) = Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        &id,
        TransportConfig::default(),
    )
    .unwrap();
    let to_a = Dest::node(NodeName::new("a").unwrap(), nodes[0].local().addr);
    let junk = |n: usize| Bytes::from((0..n).map(|i| (i * 37 % 251) as u8).collect::<Vec<_>>());
    for n in [1, 7, 100, 900] {
        raw.send_datagram(&to_a, &junk(n)).await.unwrap();
        for ch in [CH_MEMBERSHIP, CH_ROUTED, channel_id("work"), 77] {
            raw.send(&to_a, ch, junk(n), WhenFull::Wait).await.unwrap();
        }
        let answer = raw
            .request(&to_a, CH_NOTICES, junk(n), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(&answer[..], shoal::wire::NOTICE_NACK);
    }
    // Raw UDP that is not even QUIC.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for n in [0, 1, 50, 1200] {
        udp.send_to(&junk(n), nodes[0].local().addr).unwrap();
    }
    let start = tokio::time::Instant::now();
    let mut snap = nodes[0].snapshot().await.unwrap();
    while snap.facade.malformed < 12 && start.elapsed() < PATIENCE {
        tokio::time::sleep(Duration::from_millis(50)).await;
        snap = nodes[0].snapshot().await.unwrap();
    }
    assert!(snap.facade.malformed >= 12, "{snap}");
    assert!(snap.membership.decode_errors >= 4, "{snap}");

    // Still one cluster, every datum still owned, messages still flow.
    for n in &nodes {
        assert_eq!(n.members().len(), 2);
    }
    let owned_by_a = (0..DATUMS)
        .find(|id| nodes[0].owners(*id)[0].name == "a")
        .unwrap();
    sender_b
        .send_to_owner("series", owned_by_a, &99)
        .await
        .unwrap();
    // The junk sent on "work" was skipped (undecodable) or decoded as some
    // number; the real message arrives, from its datum's route.
    loop {
        let m = tokio::time::timeout(PATIENCE, inbox.recv())
            .await
            .unwrap()
            .unwrap();
        if m.datum.is_some() {
            assert_eq!(m.payload, 99);
            assert_eq!(&*m.from, "b");
            break;
        }
        assert_eq!(&*m.from, "rogue");
    }
    settled(&refs, 2, DATUMS, &ledger).await;
    raw.shutdown().await;
    for n in &nodes {
        n.shutdown().await;
    }
}
