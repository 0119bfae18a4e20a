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
