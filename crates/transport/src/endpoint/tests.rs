//! Loopback tests that need the endpoint's insides: installs driven out
//! of order through [`Inner::install_gates`]. Timeouts only bound hangs.

use std::collections::BTreeSet;

use super::*;
use crate::throwaway_cluster;

/// Bounds every wait: a hang fails the test, speed never does.
const HANG: Duration = Duration::from_secs(20);

async fn within<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(HANG, f).await.expect("operation hung")
}

fn start(id: &NodeIdentity, config: TransportConfig) -> (Transport, Incoming) {
    Transport::bind("127.0.0.1:0".parse().unwrap(), id, config).unwrap()
}

async fn until(cond: impl Fn() -> bool) {
    within(async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// `tag` (6 bytes) then 16 KiB that do not compress.
fn padded(tag: &str) -> Bytes {
    let mut body = tag.as_bytes().to_vec();
    let mut x = 0x9e37_79b9_7f4a_7c15_u64 ^ tag.len() as u64;
    for _ in 0..16 * 1024 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        body.push(x as u8);
    }
    Bytes::from(body)
}

fn installed(t: &Transport, addr: SocketAddr) -> bool {
    t.peers().iter().any(|p| p.addr == addr)
}

/// The race this guards against: a connection's messages are delivered
/// while it is still being admitted, so a peer that connects again from
/// another port may have its newer connection installed first. The older
/// one's install, late, must not replace it; the older one is closed
/// gracefully, and nothing sent on it is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_connection_installed_late_is_replaced_and_loses_nothing() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a1, _a1_in) = start(&ids[0], TransportConfig::default());
    let (a2, _a2_in) = start(&ids[0], TransportConfig::default());
    // Two queued messages per peer name: what "a" sends beyond them waits,
    // unread, on its connections while the test does not read.
    let small = TransportConfig {
        inbound_messages: 4,
        ..TransportConfig::default()
    };
    let (b, mut b_in) = start(&ids[1], small);
    let to_b = Dest::node(b.name().clone(), b.local_addr());
    let gate = watch::channel(false).0;
    lock(&b.inner.install_gates).insert(a1.local_addr(), gate.subscribe());

    // a1's connection is admitted by b and carries messages, but b's
    // install of it waits.
    within(a1.send(&to_b, 1, Bytes::from_static(b"one"), WhenFull::Wait))
        .await
        .unwrap();
    let one = within(b_in.recv_message()).await.unwrap();
    assert_eq!(&one.body[..], b"one");
    assert!(!installed(&b, a1.local_addr()));
    // More than b's stream window (4 MiB): b reads no further than its
    // share, so when a1's connection is replaced most of this waits unread
    // in b's QUIC buffers and the last megabyte still in a1's send queue.
    let mut expected = BTreeSet::new();
    for i in 0..320 {
        let body = format!("a1-{i:03}");
        within(a1.send(&to_b, 1, padded(&body), WhenFull::Wait))
            .await
            .unwrap();
        expected.insert(body);
    }
    // a2, the same name from another port, connects later and is installed
    // first.
    within(a2.send(&to_b, 1, padded("two..."), WhenFull::Wait))
        .await
        .unwrap();
    expected.insert("two...".to_owned());
    until(|| installed(&b, a2.local_addr())).await;

    // Now the older connection's install: it must lose to the newer one.
    gate.send_replace(true);
    until(|| b.stats().connections_replaced_by_name == 1).await;
    assert!(
        installed(&b, a2.local_addr()),
        "the newer connection was replaced"
    );
    assert!(!installed(&b, a1.local_addr()));

    // Every message accepted by `send`, on either connection, arrives
    // (a1's were still unread when its connection was replaced).
    let mut got = BTreeSet::new();
    let mut a1_order = Vec::new();
    while got.len() < expected.len() {
        let Ok(m) = tokio::time::timeout(HANG, b_in.recv_message()).await else {
            panic!(
                "{} messages accepted by send never arrived ({} counted lost by a1)",
                expected.len() - got.len(),
                a1.stats().messages_lost
            );
        };
        let m = m.unwrap();
        let body = String::from_utf8_lossy(m.body.get(..6).unwrap_or(&m.body)).into_owned();
        if body.starts_with("a1-") {
            a1_order.push(body.clone());
        }
        assert!(got.insert(body), "delivered twice");
    }
    assert_eq!(got, expected);
    assert!(
        a1_order.is_sorted(),
        "a1's messages out of order: {a1_order:?}"
    );
    until(|| b.open_connections() == 1 && a1.open_connections() == 0).await;
    assert_eq!(a2.open_connections(), 1);
    assert_eq!(b.stats().connections_replaced_by_name, 1);
    for t in [&a1, &a2, &b] {
        assert_eq!(t.stats().messages_lost, 0);
    }
}

/// What a peer dialing from many ports holds: one connection, and one
/// older one closing gracefully. A further replacement cuts the older
/// one's graceful close short (what it had queued is counted as lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_replaced_again_while_its_older_connection_closes_cuts_that_close_short() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a1, _a1_in) = start(&ids[0], TransportConfig::default());
    let (a2, _a2_in) = start(&ids[0], TransportConfig::default());
    let (a3, _a3_in) = start(&ids[0], TransportConfig::default());
    let small = TransportConfig {
        inbound_messages: 4,
        ..TransportConfig::default()
    };
    // b never reads: a graceful close of a1's connection cannot finish
    // (it gives up after its grace time, seconds).
    let (b, _b_in) = start(&ids[1], small);
    let to_b = Dest::node(b.name().clone(), b.local_addr());
    for i in 0..320 {
        within(a1.send(&to_b, 1, padded(&format!("a1-{i:03}")), WhenFull::Wait))
            .await
            .unwrap();
    }
    until(|| installed(&b, a1.local_addr())).await;
    let a1_conn = lock(&a1.inner.table)
        .conns
        .get(&b.local_addr())
        .cloned()
        .unwrap();
    // a2 and a3 connect, and both wait to be installed: released together,
    // in either order, they are two replacements in a row.
    let gate = watch::channel(false).0;
    for a in [&a2, &a3] {
        lock(&b.inner.install_gates).insert(a.local_addr(), gate.subscribe());
        within(a.send(&to_b, 1, padded("more.."), WhenFull::Wait))
            .await
            .unwrap();
    }
    until(|| b.stats().connections_opened == 3).await;
    gate.send_replace(true);
    until(|| b.stats().connections_replaced_by_name == 2).await;
    assert!(installed(&b, a3.local_addr()));
    until(|| a1_conn.is_closed()).await;
    match a1_conn.conn.close_reason() {
        Some(ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code, VarInt::from(code::SUPERSEDED));
            assert_eq!(
                String::from_utf8_lossy(&c.reason),
                REPLACED_AGAIN,
                "a1's connection was not cut short"
            );
        }
        other => panic!("a1's connection ended otherwise: {other:?}"),
    }
    // Not silent: a1's send queue still held messages b never got.
    until(|| a1.stats().messages_lost > 0).await;
}
