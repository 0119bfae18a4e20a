//! Byte budgets on real nodes (loopback): messages from a peer hold their
//! bytes in the receiving node's inbound budget until the application takes
//! them, so a channel nobody reads pins at most the sender's share.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{config, eventually, join_all, start};
use shoal::ClusterCa;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_reader_pins_at_most_the_senders_share() {
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
