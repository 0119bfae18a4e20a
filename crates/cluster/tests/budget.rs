//! Byte budgets on real nodes (loopback): messages from a peer hold their
//! bytes in the receiving node's inbound budget until the application takes
//! them, so a channel nobody reads pins at most the sender's share.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Ledger, PATIENCE, config, eventually, join_all, ready_all, settled, start};
use shoal::{ClusterCa, JobReason, Node};

/// The handoff tests start failure detectors: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_reader_pins_at_most_the_senders_share() {
    let _serial = SERIAL.lock().await;
    let ca = ClusterCa::generate().unwrap();
    let mut cb = config("b");
    cb.limits.max_message = 1 << 20;
    cb.limits.inbound_bytes = 4 << 20; // 2 MiB per peer
    let share = 2 << 20;
    let a = start(&ca, config("a")).await;
    let b = start(&ca, cb).await;
    join_all(&[a.clone(), b.clone()]).await;
    // The same channel on both; b's receiver is never read (its queue holds
    // up to 8,192 messages: 256 MiB of these without a byte budget).
    let (to_b, _a_rx) = a.channel::<Vec<u8>>("bulk").unwrap();
    let (_b_tx, mut b_rx) = b.channel::<Vec<u8>>("bulk").unwrap();
    let size = 32 * 1024;
    let count = 400u32; // 12.5 MiB
    let sender = tokio::spawn(async move {
        for i in 0..count {
            let body: Vec<u8> = (0..size).map(|j| (j as u32 ^ i) as u8).collect();
            if to_b.send_to("b", &body).await.is_err() {
                return i;
            }
        }
        count
    });
    // Either b's budget fills up (with the byte budget held) or b takes far
    // more than its share of messages (without it).
    let most = (share / size) as u64 + 1;
    eventually("b's budget fills or b queues past it", || {
        b.inbound_bytes_held_by("a") + 2 * (size + 1024) >= share
            || b.transport_stats().messages_received > 2 * most
    })
    .await;
    // Membership messages (the join's push-pull) count here too.
    let received = b.transport_stats().messages_received;
    assert!(
        received <= most + 16,
        "{received} messages of {size} bytes queued for a reader that never reads"
    );
    assert!(b.inbound_bytes_held() <= share);
    assert!(!sender.is_finished(), "the sender is pushed back");
    // The reader wakes up: every message arrives, in order, and the budget
    // is given back.
    for i in 0..count {
        let m = tokio::time::timeout(Duration::from_secs(30), b_rx.recv())
            .await
            .expect("message never arrived")
            .unwrap();
        assert_eq!(m.payload.len(), size);
        assert_eq!(m.payload[1], (1 ^ i) as u8, "message {i} lost or reordered");
    }
    assert_eq!(sender.await.unwrap(), count);
    eventually("budget given back", || b.inbound_bytes_held() == 0).await;
    assert!(b.transport_stats().inbound_budget_waits > 0);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_membership_and_notice_messages_are_refused_from_their_header() {
    let _serial = SERIAL.lock().await;
    use shoal::NodeName;
    use shoal::wire::{CH_MEMBERSHIP, CH_NOTICES};
    use shoal_transport::{Dest, Transport, TransportConfig, TransportError, WhenFull};

    let ca = ClusterCa::generate().unwrap();
    let a = start(&ca, config("a")).await;
    a.join(&[]).await.unwrap();
    // A process with a valid certificate of the cluster, outside it.
    let id = ca.issue(&NodeName::new("rogue").unwrap()).unwrap();
    let (rogue, _in) = Transport::bind(
        "127.0.0.1:0".parse().unwrap(),
        &id,
        TransportConfig::default(),
    )
    .unwrap();
    let to_a = Dest::node(NodeName::new("a").unwrap(), a.local().addr);
    // Incompressible, so its size on the wire is its size.
    let noise = |n: usize| {
        let mut x = 0x9e37_79b9_u32;
        bytes::Bytes::from(
            (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect::<Vec<u8>>(),
        )
    };
    // Push-pull state is at most 4 MiB, a notice batch 1 MiB: a node's
    // limit for other messages (16 MiB) does not apply to them.
    let err = rogue
        .send(&to_a, CH_MEMBERSHIP, noise(5 << 20), WhenFull::Wait)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::TooLarge { side, .. } if side.contains("receiver")),
        "{err}"
    );
    let err = rogue
        .request(&to_a, CH_NOTICES, noise(2 << 20), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::TooLarge { .. }), "{err}");
    assert!(a.transport_stats().frames_too_large >= 2);
    assert_eq!(a.inbound_bytes_held(), 0);
    rogue.shutdown().await;
    a.shutdown().await;
}

/// How a's application leaves b's messages unread.
#[derive(Clone, Copy, Debug)]
enum Unread {
    /// Large messages until b's share of a's data budget is full.
    Bytes,
    /// Small messages until the channel's queue is full (the dispatcher of
    /// data messages waits for room in it).
    Count,
}

/// a's application never reads a channel b sends to, until b's share of
/// a's inbound budget, or the channel's queue, is full; then b leaves.
/// b's notice batches and done markers (control traffic) still reach a:
/// every datum b held is handed over by notice, none at the transition
/// timeout, and the leave completes.
async fn a_handoff_gets_through_past_unread_messages(unread: Unread) {
    let _serial = SERIAL.lock().await;
    const DATUMS: i64 = 60;
    let ca = ClusterCa::generate().unwrap();
    let ledger = Arc::new(Ledger::default());
    let mut ca_cfg = config("a");
    ca_cfg.limits.max_message = 1 << 20;
    ca_cfg.limits.inbound_bytes = 4 << 20; // 2 MiB per peer
    let share = 2 << 20;
    if let Unread::Count = unread {
        ca_cfg.limits.channel_queue = 16;
    }
    let a = start(&ca, ca_cfg).await;
    let b = start(&ca, config("b")).await;
    let nodes = [a.clone(), b.clone()];
    join_all(&nodes).await;
    let refs: Vec<&Node> = nodes.iter().collect();
    ready_all(&refs, DATUMS, &ledger).await;
    settled(&refs, 2, DATUMS, &ledger).await;
    let held = ledger.lock().held_by("b");
    assert!(held > 0);

    // a registers the channel and never reads it.
    let (_a_tx, _a_rx) = a.channel::<Vec<u8>>("bulk").unwrap();
    let (to_a, _b_rx) = b.channel::<Vec<u8>>("bulk").unwrap();
    let size = match unread {
        Unread::Bytes => 32 * 1024,
        Unread::Count => 16,
    };
    let sender = tokio::spawn(async move {
        let mut sent = 0u32;
        while to_a.send_to("a", &vec![7u8; size]).await.is_ok() {
            sent += 1;
        }
        sent
    });
    match unread {
        Unread::Bytes => {
            eventually("b's share of a's budget is full", || {
                a.inbound_bytes_held_by("b") + 2 * (size + 1024) >= share
            })
            .await;
        }
        Unread::Count => {
            let start = tokio::time::Instant::now();
            while a.snapshot().await.unwrap().facade.channel_full == 0 {
                assert!(start.elapsed() < PATIENCE, "a's channel queue never filled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    // Let the stall settle in: whatever b sends to a now waits.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!sender.is_finished(), "b is pushed back");

    ledger.clear_history();
    let report = b.leave(PATIENCE).await.unwrap();
    assert!(report.completed, "{report:?}");
    assert_eq!(report.relinquished, held);
    settled(&refs[..1], 1, DATUMS, &ledger).await;
    let t = a.snapshot().await.unwrap().transition;
    assert_eq!(
        t.acquired_after_timeout, 0,
        "a waited out the transition timeout for b's notices"
    );
    let taken: Vec<_> = ledger
        .lock()
        .acquire_reasons
        .iter()
        .filter(|(node, ..)| node == "a")
        .cloned()
        .collect();
    assert_eq!(taken.len() as u64, held);
    assert!(
        taken.iter().all(|(_, _, r, _)| *r == JobReason::Handoff),
        "every datum b held is handed over by its notice: {taken:?}"
    );
    assert!(ledger.violations().is_empty(), "{:?}", ledger.violations());
    a.shutdown().await;
    sender.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_gets_through_when_a_peers_share_is_full_of_unread_messages() {
    a_handoff_gets_through_past_unread_messages(Unread::Bytes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_gets_through_when_a_channels_queue_is_full() {
    a_handoff_gets_through_past_unread_messages(Unread::Count).await;
}

/// A channel nobody reads delays only itself: once its queue is full, the
/// messages for it wait apart (in order, holding their sender's share of
/// the data budget), and other channels and peers go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_channel_delays_only_itself_and_the_peers_that_fill_it() {
    let _serial = SERIAL.lock().await;
    const COUNT: u32 = 20_000;
    let ca = ClusterCa::generate().unwrap();
    let mut ca_cfg = config("a");
    ca_cfg.limits.max_message = 1 << 20;
    ca_cfg.limits.inbound_bytes = 4 << 20; // 2 MiB per peer
    ca_cfg.limits.channel_queue = 16;
    let share = 2 << 20;
    let a = start(&ca, ca_cfg).await;
    let b = start(&ca, config("b")).await;
    let c = start(&ca, config("c")).await;
    join_all(&[a.clone(), b.clone(), c.clone()]).await;
    let (_a_bulk_tx, mut a_bulk) = a.channel::<u32>("bulk").unwrap();
    let (_a_other_tx, mut a_other) = a.channel::<u32>("other").unwrap();
    let (b_bulk, _b_bulk_rx) = b.channel::<u32>("bulk").unwrap();
    let (c_other, _c_other_rx) = c.channel::<u32>("other").unwrap();
    // 20,000 messages of 4 bytes hold 144 bytes each of b's share: 2.7 MiB.
    let sender = tokio::spawn(async move {
        for i in 0..COUNT {
            b_bulk.send_to("a", &i).await.unwrap();
        }
    });
    let start_wait = tokio::time::Instant::now();
    while a.snapshot().await.unwrap().facade.channel_full == 0 {
        assert!(
            start_wait.elapsed() < PATIENCE,
            "a's channel queue never filled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another peer's message on another channel is not held up.
    c_other.send_to("a", &7).await.unwrap();
    let m = tokio::time::timeout(PATIENCE, a_other.recv())
        .await
        .expect("a message on another channel waited for the stuck one")
        .unwrap();
    assert_eq!(m.payload, 7);
    // b's messages wait in b's share, which fills: then b is read no further.
    eventually("b's share of a's budget fills", || {
        a.inbound_bytes_held_by("b") >= share * 9 / 10
    })
    .await;
    assert!(a.inbound_bytes_held() <= 2 * share);
    let full = a.snapshot().await.unwrap().facade.channel_full;
    assert!(full > 0);
    // The reader wakes up: every message arrives, in order.
    for i in 0..COUNT {
        let m = tokio::time::timeout(PATIENCE, a_bulk.recv())
            .await
            .expect("message never arrived")
            .unwrap();
        assert_eq!(m.payload, i, "message lost or reordered");
    }
    tokio::time::timeout(PATIENCE, sender)
        .await
        .unwrap()
        .unwrap();
    eventually("budget given back", || a.inbound_bytes_held() == 0).await;
    for n in [a, b, c] {
        n.shutdown().await;
    }
}
