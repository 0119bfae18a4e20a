//! End-to-end tests on loopback with real sockets. Timeouts only bound hangs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use bytes::Bytes;
use shoal_transport::frame::{self, OutFrame, StreamKind};
use shoal_transport::virtual_net::VirtualNetwork;
mod common;
use common::*;

use shoal_transport::{
    ClusterCa, Dest, Inbound, Incoming, Message, NodeName, Transport, TransportConfig,
    TransportError, WhenFull, throwaway_cluster,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagram_round_trip_with_verified_sender() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a, mut a_in) = start(&ids[0], TransportConfig::default());
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());

    within(a.send_datagram(&dest_of(&b), b"ping"))
        .await
        .unwrap();
    let d = within(b_in.recv_datagram()).await.unwrap();
    assert_eq!(&d.payload[..], b"ping");
    assert_eq!(d.from.name.as_str(), "a");
    assert_eq!(d.from.addr, a.local_addr());

    // Answer the verified sender by its peer record.
    within(b.send_datagram(&Dest::from(&d.from), b"pong"))
        .await
        .unwrap();
    match within(a_in.recv()).await.unwrap() {
        Inbound::Datagram(d) => {
            assert_eq!(&d.payload[..], b"pong");
            assert_eq!(d.from.name.as_str(), "b");
        }
        other => panic!("expected a datagram, got {other:?}"),
    }

    // A node does not dial itself.
    let err = within(a.send_datagram(&dest_of(&a), b"me"))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Rejected { .. }), "{err}");

    // The size limit is exposed and enforced: no silent truncation.
    let max = a.max_datagram_size(&dest_of(&b)).unwrap();
    assert!(max >= 1000, "max datagram {max}");
    let big = vec![0u8; max + 1];
    let err = within(a.send_datagram(&dest_of(&b), &big))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::TooLarge { .. }), "{err}");
    assert_eq!(err.peer().unwrap().addr, b.local_addr());
    within(a.send_datagram(&dest_of(&b), &vec![7u8; max]))
        .await
        .unwrap();
    let d = within(b_in.recv_datagram()).await.unwrap();
    assert_eq!(d.payload.len(), max);
    assert!(b.stats().datagrams_received >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_and_requests_both_ways() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a, mut a_in) = start(&ids[0], TransportConfig::default());
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());

    for i in 0..200u32 {
        within(a.send(
            &dest_of(&b),
            5,
            Bytes::from(i.to_le_bytes().to_vec()),
            WhenFull::Wait,
        ))
        .await
        .unwrap();
    }
    for i in 0..200u32 {
        let m = next_message(&mut b_in).await;
        assert_eq!(m.channel, 5);
        assert_eq!(m.from.name.as_str(), "a");
        assert!(m.reply.is_none());
        assert_eq!(&m.body[..], &i.to_le_bytes(), "messages arrive in order");
    }

    // B reaches A by address only (as a join seed) and learns its name.
    let seed = Dest::addr(a.local_addr());
    let peer = within(b.connect(&seed)).await.unwrap();
    assert_eq!(peer.name.as_str(), "a");
    within(b.send(&seed, 9, Bytes::from_static(b"back"), WhenFull::Fail))
        .await
        .unwrap();
    let m = next_message(&mut a_in).await;
    assert_eq!(
        (&m.body[..], m.channel, m.from.name.as_str()),
        (&b"back"[..], 9, "b")
    );

    // Requests both ways, answered by a task reading the inbound queue.
    let responder = |mut inc: Incoming| {
        tokio::spawn(async move {
            while let Some(m) = inc.recv_message().await {
                if let Some(reply) = m.reply {
                    if &m.body[..] == b"ignore me" {
                        drop(reply);
                        continue;
                    }
                    let mut answer = m.body.to_vec();
                    answer.reverse();
                    reply.respond(Bytes::from(answer)).await.unwrap();
                }
            }
        })
    };
    let _ra = responder(a_in);
    let _rb = responder(b_in);
    let ans = within(a.request(&dest_of(&b), 1, Bytes::from_static(b"abc"), HANG))
        .await
        .unwrap();
    assert_eq!(&ans[..], b"cba");
    let ans = within(b.request(&dest_of(&a), 1, Bytes::from_static(b"xyz"), HANG))
        .await
        .unwrap();
    assert_eq!(&ans[..], b"zyx");
    // Concurrent requests on one connection.
    let mut tasks = Vec::new();
    for i in 0..50u32 {
        let a = a.clone();
        let to = dest_of(&b);
        tasks.push(tokio::spawn(async move {
            let body = Bytes::from(format!("req-{i}"));
            let ans = a.request(&to, 2, body, HANG).await.unwrap();
            assert_eq!(
                String::from_utf8(ans.to_vec()).unwrap(),
                format!("req-{i}").chars().rev().collect::<String>()
            );
        }));
    }
    for t in tasks {
        within(t).await.unwrap();
    }
    // A request dropped unanswered is reported, not left hanging.
    let err = within(a.request(&dest_of(&b), 1, Bytes::from_static(b"ignore me"), HANG))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Closed { .. }), "{err}");
    // One connection serves both directions. b's dial by address can race
    // a's hello on the connection a opened (a loaded machine sees it about
    // once in three runs): both sides then resolve the duplicate to one
    // connection, as in the simultaneous-open test below.
    within(async {
        while (a.open_connections(), b.open_connections()) != (1, 1) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A channel configured plain sends even a very compressible message as
/// it is; other channels still compress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_channels_are_never_compressed() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let mut cfg = TransportConfig::default();
    cfg.plain_channels = vec![5];
    let (a, _a_in) = start(&ids[0], cfg);
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());
    // Compressible within the default ratio cap: text with a counter.
    let mut text = Vec::new();
    let mut i = 0u64;
    while text.len() < 32 * 1024 {
        text.extend_from_slice(format!("datum {i} value {} ;", i % 977).as_bytes());
        i += 1;
    }
    let body = Bytes::from(text);
    within(a.send(&dest_of(&b), 5, body.clone(), WhenFull::Wait))
        .await
        .unwrap();
    assert!(next_message(&mut b_in).await.body == body);
    assert_eq!(a.stats().messages_compressed, 0);
    within(a.send(&dest_of(&b), 3, body.clone(), WhenFull::Wait))
        .await
        .unwrap();
    assert!(next_message(&mut b_in).await.body == body);
    assert_eq!(a.stats().messages_compressed, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_message_is_compressed_and_restored() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a, _a_in) = start(&ids[0], TransportConfig::default());
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());
    // Compressible but not trivial: a repeating text with a counter.
    let mut body = Vec::with_capacity(10 << 20);
    let mut i = 0u64;
    while body.len() < 10 << 20 {
        body.extend_from_slice(format!("datum {i} value {} ;", i % 977).as_bytes());
        i += 1;
    }
    body.truncate(10 << 20);
    let body = Bytes::from(body);
    within(a.send(&dest_of(&b), 3, body.clone(), WhenFull::Wait))
        .await
        .unwrap();
    let m = next_message(&mut b_in).await;
    assert_eq!(m.body.len(), body.len());
    assert!(m.body == body, "restored bytes differ");
    let s = a.stats();
    assert_eq!(s.messages_compressed, 1);
    assert!(
        s.bytes_sent < (body.len() / 2) as u64,
        "sent {} bytes",
        s.bytes_sent
    );
    // The same as a request answer.
    let (a2, b2) = (a.clone(), body.clone());
    let h = tokio::spawn(async move {
        let m = next_message(&mut b_in).await;
        m.reply.unwrap().respond(b2).await.unwrap();
    });
    let ans = within(a2.request(&dest_of(&b), 4, Bytes::from_static(b"big?"), HANG))
        .await
        .unwrap();
    assert!(ans == body);
    within(h).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_messages_are_refused_on_both_sides() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    // Channel 1 compresses without a ratio cap on both sides, so the last
    // case below really is compressed on the wire.
    let no_ratio = vec![shoal_transport::ChannelCap {
        channel: 1,
        max_size: 16 << 20,
        max_ratio: u32::MAX,
    }];
    let mut big = TransportConfig::default(); // 16 MiB
    big.channel_caps = no_ratio.clone();
    let (a, _a_in) = start(&ids[0], big);
    let mut small = TransportConfig::default();
    small.max_message_size = 1 << 20;
    small.channel_caps = no_ratio;
    let (b, mut b_in) = start(&ids[1], small);
    let to_b = dest_of(&b);

    // Over the sender's own limit: refused before anything is sent.
    let err = within(a.send(
        &to_b,
        1,
        Bytes::from(vec![0u8; (16 << 20) + 1]),
        WhenFull::Wait,
    ))
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::TooLarge {
                side: "local limit",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(a.stats().bytes_sent, 0);
    assert_eq!(a.open_connections(), 0, "nothing was even dialed");

    // Within the sender's limit, over the receiver's: the receiver refuses the
    // frame header and the sender learns it.
    let mut x = 1u32;
    let noise: Vec<u8> = (0..(2 << 20))
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let err = within(a.send(&to_b, 1, Bytes::from(noise.clone()), WhenFull::Wait))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::TooLarge {
                side: "refused by the receiver",
                ..
            }
        ),
        "{err}"
    );
    let err = within(a.request(&to_b, 1, Bytes::from(noise), HANG))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::TooLarge { .. }), "{err}");
    // A compressible message that only its decompressed size betrays.
    let err = within(a.send(&to_b, 1, Bytes::from(vec![1u8; 3 << 20]), WhenFull::Wait))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::TooLarge { .. }), "{err}");
    assert_eq!(b.stats().frames_too_large, 3);
    assert_eq!(b.stats().messages_received, 0);

    // The connection still serves normal traffic.
    within(a.send(&to_b, 2, Bytes::from_static(b"fine"), WhenFull::Wait))
        .await
        .unwrap();
    let m = next_message(&mut b_in).await;
    assert_eq!(&m.body[..], b"fine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_of_another_ca_delivers_nothing_in_either_role() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    // A rogue with a valid-looking certificate for "a", from another CA.
    let rogue_ca = ClusterCa::generate().unwrap();
    let rogue_id = rogue_ca.issue(&NodeName::new("a").unwrap()).unwrap();
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());
    let (rogue, mut rogue_in) = start(&rogue_id, TransportConfig::default());

    // Rogue dials b: refused, nothing delivered to b.
    let r = within(rogue.send_datagram(&dest_of(&b), b"evil")).await;
    assert!(r.is_err(), "rogue datagram accepted");
    let r = within(rogue.send(
        &Dest::addr(b.local_addr()),
        1,
        Bytes::from_static(b"evil"),
        WhenFull::Wait,
    ))
    .await;
    assert!(matches!(r, Err(TransportError::Rejected { .. })), "{r:?}");
    let r = within(rogue.request(&dest_of(&b), 1, Bytes::from_static(b"evil"), HANG)).await;
    assert!(r.is_err());
    assert_silent(&mut b_in).await;
    assert!(b.stats().handshakes_rejected >= 1);
    assert_eq!(b.stats().connections_opened, 0);

    // b dials the rogue (rogue accepting): b refuses its certificate.
    let err = within(b.connect(&Dest::addr(rogue.local_addr())))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Rejected { .. }), "{err}");
    let named = Dest::node(NodeName::new("a").unwrap(), rogue.local_addr());
    assert!(within(b.send_datagram(&named, b"hi")).await.is_err());
    assert!(
        within(b.send(&named, 1, Bytes::from_static(b"hi"), WhenFull::Wait))
            .await
            .is_err()
    );
    assert_silent(&mut rogue_in).await;
    assert_eq!(rogue.stats().connections_opened, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_for_the_wrong_name_is_refused() {
    let (_, ids) = throwaway_cluster(&["a", "b", "c"]).unwrap();
    let (a, mut a_in) = start(&ids[0], TransportConfig::default());
    let (b, _b_in) = start(&ids[1], TransportConfig::default());
    // b expects node "c" at a's address; a's certificate names "a".
    let wrong = Dest::node(NodeName::new("c").unwrap(), a.local_addr());
    let err = within(b.send(&wrong, 1, Bytes::from_static(b"x"), WhenFull::Wait))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Rejected { .. }), "{err}");
    assert_eq!(err.peer(), Some(&wrong));
    assert!(within(b.send_datagram(&wrong, b"x")).await.is_err());
    assert_silent(&mut a_in).await;
    assert!(b.stats().handshakes_rejected >= 1);
    // The right name at the same address works.
    within(b.send(&dest_of(&a), 1, Bytes::from_static(b"ok"), WhenFull::Wait))
        .await
        .unwrap();
    assert_eq!(&next_message(&mut a_in).await.body[..], b"ok");
    // With a connection to "a" open, asking for "c" there is still refused.
    let err = within(b.send(&wrong, 1, Bytes::from_static(b"x"), WhenFull::Wait))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Rejected { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_peer_on_the_same_address_is_reached_again() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a, _a_in) = start(&ids[0], TransportConfig::default());
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());
    let to_b = dest_of(&b);
    within(a.send(&to_b, 1, Bytes::from_static(b"one"), WhenFull::Wait))
        .await
        .unwrap();
    assert_eq!(&next_message(&mut b_in).await.body[..], b"one");

    // b stops without telling a (crash-like: only its own side closes).
    let addr = b.local_addr();
    b.shutdown().await;
    drop(b);
    drop(b_in);
    let (b2, mut b2_in) = within(async {
        loop {
            match Transport::bind(addr, &ids[1], TransportConfig::default()) {
                Ok(x) => break x,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    let answerer = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(m) = b2_in.recv_message().await {
            if let Some(r) = m.reply {
                let _ = r.respond(Bytes::from_static(b"alive")).await;
                got.push(m.body);
                break;
            }
        }
        got
    });
    // a retries until the new instance answers (the first attempts may hit
    // the old connection's remains).
    let answer = within(async {
        loop {
            match a
                .request(
                    &to_b,
                    1,
                    Bytes::from_static(b"again"),
                    Duration::from_secs(2),
                )
                .await
            {
                Ok(ans) => break ans,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    assert_eq!(&answer[..], b"alive");
    assert_eq!(within(answerer).await.unwrap().len(), 1);
    b2.shutdown().await;
}

/// A hello stream whose frame does not decode: the version, then a
/// process instance cut short.
fn bad_hello() -> Vec<u8> {
    let body = [frame::ENVELOPE_VERSION, 0x80];
    let mut out = vec![StreamKind::Hello as u8];
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_counted_and_dropped_while_others_are_served() {
    let (_, ids) = throwaway_cluster(&["a", "b", "x"]).unwrap();
    let (a, _a_in) = start(&ids[0], TransportConfig::default());
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());
    let (_ep, raw) = raw_client(&ids[2], &b).await;

    // Garbage datagrams: untagged, and empty.
    raw.send_datagram(Bytes::from_static(b"\x7fgarbage"))
        .unwrap();
    raw.send_datagram(Bytes::new()).unwrap();
    // A tagged datagram still gets through, named by the client's certificate.
    raw.send_datagram(frame::encode_datagram(b"real")).unwrap();
    let d = within(b_in.recv_datagram()).await.unwrap();
    assert_eq!((&d.payload[..], d.from.name.as_str()), (&b"real"[..], "x"));

    // A uni stream of unknown kind.
    let mut s = raw.open_uni().await.unwrap();
    s.write_all(&[0x99, 1, 2, 3]).await.unwrap();
    s.finish().unwrap();

    // A message stream: a frame with a bad version, one with a bad header,
    // one with a lying compressed body, then a good frame: only the good one
    // is delivered.
    let mut bad_version = OutFrame::new(1, Bytes::from_static(b"v2"), 1 << 20, 1);
    bad_version.header.version = 9;
    let mut lying = OutFrame::new(1, Bytes::from(vec![5u8; 5000]), 1, 1);
    assert!(lying.is_compressed());
    lying.header.encoding = frame::Encoding::Zstd { raw_len: 100 };
    let mut stream = vec![StreamKind::Messages as u8];
    stream.extend_from_slice(&bad_version.to_bytes());
    stream.extend_from_slice(&[3, 0, 0, 0, 0xff, 0xff, 0xff]);
    stream.extend_from_slice(&lying.to_bytes());
    stream.extend_from_slice(&OutFrame::new(7, Bytes::from_static(b"good"), 1 << 20, 1).to_bytes());
    let mut s = raw.open_uni().await.unwrap();
    s.write_all(&stream).await.unwrap();
    let m = next_message(&mut b_in).await;
    assert_eq!((&m.body[..], m.channel), (&b"good"[..], 7));
    // Then a length prefix no message stream may carry: the stream is stopped.
    s.write_all(&(u32::MAX).to_le_bytes()).await.unwrap();
    let stopped = within(s.stopped()).await.unwrap();
    assert_eq!(
        stopped,
        Some(quinn::VarInt::from_u32(frame::code::PROTOCOL))
    );

    // A request announcing more than the limit is refused by a reset.
    let (mut send, mut recv) = raw.open_bi().await.unwrap();
    let mut req = vec![StreamKind::Request as u8];
    req.extend_from_slice(&(u32::MAX - 1).to_le_bytes());
    send.write_all(&req).await.unwrap();
    let r = within(recv.read_to_end(100)).await;
    assert!(r.is_err(), "over-limit request answered: {r:?}");

    // Meanwhile a well-behaved node is served as usual.
    within(a.send(
        &dest_of(&b),
        2,
        Bytes::from_static(b"from a"),
        WhenFull::Wait,
    ))
    .await
    .unwrap();
    let m = next_message(&mut b_in).await;
    assert_eq!((&m.body[..], m.from.name.as_str()), (&b"from a"[..], "a"));
    // And the raw client's connection is still up for valid traffic.
    raw.send_datagram(frame::encode_datagram(b"still here"))
        .unwrap();
    let d = within(b_in.recv_datagram()).await.unwrap();
    assert_eq!(&d.payload[..], b"still here");

    let s = b.stats();
    assert_eq!(s.datagrams_malformed, 2, "{s:?}");
    assert!(s.frames_malformed >= 4, "{s:?}"); // kind, version, header, stream
    assert!(s.frames_malformed + s.frames_too_large >= 6, "{s:?}");
    assert!(s.frames_too_large >= 1, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_fails_or_waits_and_loses_nothing() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let mut cfg = TransportConfig::default();
    cfg.send_queue_bytes = 128 * 1024;
    cfg.inbound_messages = 64;
    let (a, _a_in) = start(&ids[0], cfg.clone());
    let (b, mut b_in) = start(&ids[1], cfg);
    let to_b = dest_of(&b);
    // b does not read: flow control stops a's writer, a's queue fills.
    // Fill until the queue stays full even when given time to drain: then
    // flow control, not a busy writer, holds it.
    let mut accepted = 0u64;
    let mut full_in_a_row = 0;
    within(async {
        while full_in_a_row < 3 {
            let body = Bytes::from(accepted.to_le_bytes().to_vec());
            match a.send(&to_b, 1, body, WhenFull::Fail).await {
                Ok(()) => {
                    accepted += 1;
                    full_in_a_row = 0;
                }
                Err(TransportError::QueueFull { peer }) => {
                    assert_eq!(peer, to_b);
                    full_in_a_row += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert!(a.stats().send_queue_full >= 1);
    // A waiting sender blocks instead, and completes once b reads.
    let (a2, to_b2) = (a.clone(), to_b.clone());
    let waiting = tokio::spawn(async move {
        a2.send(
            &to_b2,
            1,
            Bytes::from(u64::MAX.to_le_bytes().to_vec()),
            WhenFull::Wait,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiting.is_finished(),
        "a full queue must make the sender wait"
    );
    for expected in 0..accepted {
        let m = next_message(&mut b_in).await;
        assert_eq!(&m.body[..], &expected.to_le_bytes(), "lost or reordered");
    }
    within(waiting).await.unwrap().unwrap();
    assert_eq!(
        &next_message(&mut b_in).await.body[..],
        &u64::MAX.to_le_bytes()
    );
    assert_eq!(a.stats().messages_lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_dials_settle_on_one_connection_and_idle_ones_close() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let mut cfg = TransportConfig::default();
    cfg.idle_close = Duration::from_millis(800);
    let (a, mut a_in) = start(&ids[0], cfg.clone());
    let (b, mut b_in) = start(&ids[1], cfg);
    // Both dial at once.
    let (to_a, to_b) = (dest_of(&a), dest_of(&b));
    let (ra, rb) = within(async { tokio::join!(a.connect(&to_b), b.connect(&to_a)) }).await;
    assert_eq!(ra.unwrap().name.as_str(), "b");
    assert_eq!(rb.unwrap().name.as_str(), "a");
    // Traffic keeps flowing whichever connection each side picked.
    for i in 0..20u8 {
        within(a.send(&dest_of(&b), 1, Bytes::from(vec![i]), WhenFull::Wait))
            .await
            .unwrap();
        within(b.send(&dest_of(&a), 1, Bytes::from(vec![i]), WhenFull::Wait))
            .await
            .unwrap();
    }
    for i in 0..20u8 {
        assert_eq!(&next_message(&mut b_in).await.body[..], &[i]);
        assert_eq!(&next_message(&mut a_in).await.body[..], &[i]);
    }
    // Both sides agree on one connection: the duplicate closes first.
    let mut saw_one = false;
    within(async {
        loop {
            match (a.open_connections(), b.open_connections()) {
                (1, 1) => saw_one = true,
                (0, 0) => break,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let _ = saw_one; // a fast machine may close both before we look
    // Idle connections are closed, and reopened on demand.
    assert!(a.peers().is_empty());
    within(a.send(
        &dest_of(&b),
        1,
        Bytes::from_static(b"again"),
        WhenFull::Wait,
    ))
    .await
    .unwrap();
    assert_eq!(&next_message(&mut b_in).await.body[..], b"again");
    assert!(a.stats().connections_closed >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_endpoints_talk_over_the_virtual_network() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let net = VirtualNetwork::new();
    let sa = net.bind("10.1.0.1:7000".parse().unwrap()).unwrap();
    let sb = net.bind("10.1.0.2:7000".parse().unwrap()).unwrap();
    let (a, _a_in) =
        Transport::with_socket(sa.clone(), &ids[0], TransportConfig::default()).unwrap();
    let (b, mut b_in) =
        Transport::with_socket(sb.clone(), &ids[1], TransportConfig::default()).unwrap();
    assert_eq!(b.local_addr(), sb.addr());
    within(a.send(
        &dest_of(&b),
        1,
        Bytes::from_static(b"virtual"),
        WhenFull::Wait,
    ))
    .await
    .unwrap();
    let m = next_message(&mut b_in).await;
    assert_eq!((&m.body[..], m.from.addr), (&b"virtual"[..], sa.addr()));
    within(a.send_datagram(&dest_of(&b), b"dgram"))
        .await
        .unwrap();
    assert_eq!(
        &within(b_in.recv_datagram()).await.unwrap().payload[..],
        b"dgram"
    );
    let (delivered, _) = net.counts();
    assert!(delivered > 0);
    // A cut link: requests time out instead of arriving.
    net.set_link(sa.addr(), sb.addr(), false);
    let err = within(a.request(
        &dest_of(&b),
        1,
        Bytes::from_static(b"?"),
        Duration::from_millis(300),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, TransportError::TimedOut { .. }), "{err}");
    assert_silent(&mut b_in).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_incoming_and_refuses_sends() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a, mut a_in) = start(&ids[0], TransportConfig::default());
    let (b, b_in) = start(&ids[1], TransportConfig::default());
    let (mut b_msgs, mut b_dgrams) = b_in.split();
    within(a.send(&dest_of(&b), 1, Bytes::from_static(b"last"), WhenFull::Wait))
        .await
        .unwrap();
    // Wait until it is in b's queue, then shut b down while a clone lives on.
    within(async {
        while b.stats().messages_received == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let b_clone = b.clone();
    within(b.shutdown()).await;
    // What was queued is still handed out, then the receivers end.
    assert_eq!(&within(b_msgs.recv()).await.unwrap().body[..], b"last");
    assert!(within(b_msgs.recv()).await.is_none());
    assert!(within(b_dgrams.recv()).await.is_none());
    let err = within(b_clone.send(&dest_of(&a), 1, Bytes::new(), WhenFull::Wait))
        .await
        .unwrap_err();
    assert_eq!(err, TransportError::Shutdown);
    within(a.shutdown()).await;
    assert!(within(a_in.recv()).await.is_none());
}

/// A severed endpoint goes silent like a crashed process: nothing it sends
/// arrives, nothing sent to it is delivered, and its peer is not told the
/// connection closed (its request times out instead of failing as closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_severed_endpoint_goes_silent_without_a_goodbye() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a, mut a_in) = start(&ids[0], TransportConfig::default());
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());
    within(a.send(
        &dest_of(&b),
        1,
        Bytes::from_static(b"before"),
        WhenFull::Wait,
    ))
    .await
    .unwrap();
    assert_eq!(&next_message(&mut b_in).await.body[..], b"before");
    assert!(!b.is_severed());
    b.sever();
    assert!(b.is_severed());
    // b's sends leave nothing on the wire.
    let _ = within(b.send_datagram(&dest_of(&a), b"ghost")).await;
    // a's request reaches nobody: it times out, the connection was not
    // closed by b.
    let err = within(a.request(
        &dest_of(&b),
        1,
        Bytes::from_static(b"?"),
        Duration::from_millis(300),
    ))
    .await
    .unwrap_err();
    assert!(matches!(err, TransportError::TimedOut { .. }), "{err}");
    assert_silent(&mut b_in).await;
    assert_silent(&mut a_in).await;
    within(b.shutdown()).await;
    within(a.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_and_the_next_send_reconnects() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a, _a_in) = start(&ids[0], TransportConfig::default());
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());
    within(a.send(&dest_of(&b), 1, Bytes::from_static(b"1"), WhenFull::Wait))
        .await
        .unwrap();
    assert_eq!(&next_message(&mut b_in).await.body[..], b"1");
    assert_eq!(a.peers().len(), 1);
    a.disconnect(b.local_addr());
    assert!(a.peers().is_empty());
    within(a.send(&dest_of(&b), 1, Bytes::from_static(b"2"), WhenFull::Wait))
        .await
        .unwrap();
    assert_eq!(&next_message(&mut b_in).await.body[..], b"2");
    assert_eq!(a.stats().connections_opened, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_says_hello_is_not_admitted() {
    let (_, ids) = throwaway_cluster(&["b", "x"]).unwrap();
    let mut cfg = TransportConfig::default();
    cfg.handshake_timeout = Duration::from_millis(300);
    let (b, _b_in) = start(&ids[0], cfg);
    // The raw client completes TLS (its certificate is valid) but sends no
    // hello: b must close it and never use it.
    let (_ep, conn) = raw_connect(&ids[1], &b).await;
    let reason = within(conn.closed()).await;
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(frame::code::REJECTED)),
        "{reason:?}"
    );
    assert_eq!(b.stats().handshakes_rejected, 1);
    assert_eq!(b.stats().connections_opened, 0);
    assert!(b.peers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_hello_closes_the_connection_and_a_second_one_is_only_counted() {
    let (_, ids) = throwaway_cluster(&["b", "x", "y"]).unwrap();
    let (b, mut b_in) = start(&ids[0], TransportConfig::default());

    // A first hello that does not decode: not admitted, closed with PROTOCOL.
    let (_ep_x, x) = raw_connect(&ids[1], &b).await;
    send_uni(&x, &bad_hello()).await;
    let reason = within(x.closed()).await;
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c)
            if c.error_code == quinn::VarInt::from_u32(frame::code::PROTOCOL)
                && &c.reason[..] == b"bad hello"),
        "{reason:?}"
    );
    eventually("the bad hello counted", || {
        let s = b.stats();
        s.handshakes_rejected == 1 && s.frames_malformed == 1
    })
    .await;
    assert_eq!(b.stats().connections_opened, 0);
    assert!(b.peers().is_empty());

    // An admitted connection, then a second hello (a valid one with another
    // instance, and a malformed one): each is counted as malformed and
    // nothing else changes.
    let (ep_y, y) = raw_client(&ids[2], &b).await;
    // Admitted first: the hello streams are read concurrently.
    eventually("y admitted", || b.stats().connections_opened == 1).await;
    send_uni(
        &y,
        &frame::encode_hello(&frame::Hello {
            version: frame::ENVELOPE_VERSION,
            instance: 43,
            features: frame::features::ALL,
            app_features: 0,
        }),
    )
    .await;
    send_uni(&y, &bad_hello()).await;
    eventually("both second hellos counted", || {
        b.stats().frames_malformed == 3
    })
    .await;

    // The connection keeps working both ways, under the same peer.
    let mut stream = vec![StreamKind::Messages as u8];
    stream
        .extend_from_slice(&OutFrame::new(4, Bytes::from_static(b"still"), 1 << 20, 1).to_bytes());
    send_uni(&y, &stream).await;
    let m = next_message(&mut b_in).await;
    assert_eq!(
        (&m.body[..], m.channel, m.from.name.as_str()),
        (&b"still"[..], 4, "y")
    );
    let peers = b.peers();
    assert_eq!(peers.len(), 1);
    assert_eq!(
        (peers[0].name.as_str(), peers[0].addr),
        ("y", ep_y.local_addr().unwrap())
    );
    within(b.send_datagram(&Dest::from(&peers[0]), b"back"))
        .await
        .unwrap();
    assert_eq!(
        within(y.read_datagram()).await.unwrap(),
        frame::encode_datagram(b"back")
    );
    assert!(y.close_reason().is_none());
    let s = b.stats();
    assert_eq!(s.handshakes_rejected, 1, "{s:?}");
    assert_eq!(s.frames_malformed, 3, "{s:?}");
    assert_eq!(s.connections_opened, 1, "{s:?}");
    assert_eq!(s.connections_closed, 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_closes_racing_with_sends_lose_nothing() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let mut cfg = TransportConfig::default();
    cfg.idle_close = Duration::from_millis(200);
    let (a, mut a_in) = start(&ids[0], cfg.clone());
    let (b, mut b_in) = start(&ids[1], cfg);
    // Gaps around the idle timeout, from both sides, so idle closes and
    // sends keep meeting; every message must still arrive exactly once.
    let mut seed = 0x2545_f491_u32;
    let mut sent = 0u32;
    for i in 0..24u32 {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let gap = 120 + u64::from(seed >> 16) % 260;
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let (from, to, inbox) = if i % 2 == 0 {
            (&a, dest_of(&b), &mut b_in)
        } else {
            (&b, dest_of(&a), &mut a_in)
        };
        within(from.send(
            &to,
            1,
            Bytes::from(i.to_le_bytes().to_vec()),
            WhenFull::Wait,
        ))
        .await
        .unwrap();
        assert_eq!(&next_message(inbox).await.body[..], &i.to_le_bytes());
        sent += 1;
    }
    assert_eq!(sent, 24);
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sa.messages_lost + sb.messages_lost, 0);
    assert!(
        sa.connections_closed + sb.connections_closed >= 2,
        "idle closes happened: {sa:?} {sb:?}"
    );
}

// ---- Inbound budgets, caps and deadlines (no peer can exhaust another's
// memory). Assertions are on counters and bytes charged, never on speed.

/// A frame on a bi stream of its own: kind byte, then the frame.
fn single(frame: &OutFrame) -> Vec<u8> {
    let mut out = vec![StreamKind::Single as u8];
    out.extend_from_slice(&frame.to_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_bombs_are_refused_before_anything_is_charged() {
    let (_, ids) = throwaway_cluster(&["b", "x"]).unwrap();
    let mut cfg = TransportConfig::default(); // 16 MiB, ratio 64
    // Channel 9 carries large state: any ratio (so only size caps hold).
    cfg.channel_caps = vec![shoal_transport::ChannelCap {
        channel: 9,
        max_size: 16 << 20,
        max_ratio: u32::MAX,
    }];
    cfg.max_refusals = 3;
    let (b, _b_in) = start(&ids[0], cfg);
    let (_ep, raw) = raw_client(&ids[1], &b).await;
    // 16 MiB of zeros: a few hundred bytes of zstd.
    let bomb = |channel| OutFrame::new(channel, Bytes::from(vec![0u8; 16 << 20]), 1, 1);
    assert!(bomb(5).to_bytes().len() < 4096);

    // 1. On an ordinary channel, a stream of its own: over the ratio.
    let (mut send, mut recv) = raw.open_bi().await.unwrap();
    send.write_all(&single(&bomb(5))).await.unwrap();
    let verdict = within(recv.read_to_end(0)).await;
    assert!(
        matches!(&verdict, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(c))) if *c == quinn::VarInt::from_u32(frame::code::TOO_LARGE)),
        "{verdict:?}"
    );
    assert_eq!(b.stats().frames_over_ratio, 1);

    // 2. On the shared stream, even on the any-ratio channel: a frame there
    //    decodes to at most 64 KiB, so the stream is stopped.
    let mut s = raw.open_uni().await.unwrap();
    let mut bytes = vec![StreamKind::Messages as u8];
    bytes.extend_from_slice(&bomb(9).to_bytes());
    s.write_all(&bytes).await.unwrap();
    let stopped = within(s.stopped()).await.unwrap();
    assert_eq!(
        stopped,
        Some(quinn::VarInt::from_u32(frame::code::TOO_LARGE))
    );
    assert_eq!(b.stats().frames_too_large, 1);

    // 3. A bomb that lies small: 1,000 bytes announced, 16 MiB inside. The
    //    output buffer is the announced size; decompression stops there.
    let mut liar = bomb(9);
    liar.header.encoding = frame::Encoding::Zstd { raw_len: 1000 };
    let (mut send, mut recv) = raw.open_bi().await.unwrap();
    send.write_all(&single(&liar)).await.unwrap();
    assert!(within(recv.read_to_end(0)).await.is_err());
    assert_eq!(b.stats().frames_malformed, 1);

    // Nothing near a bomb's size was ever charged, so never allocated.
    assert!(
        b.inbound_bytes_charged_peak() < 64 * 1024,
        "peak {}",
        b.inbound_bytes_charged_peak()
    );
    assert_eq!(b.inbound_bytes_charged(), 0);
    assert_eq!(b.stats().messages_received, 0);
    assert_eq!(b.stats().connections_closed_for_abuse, 0);

    // 4. A third refusal (max_refusals = 3) closes the connection.
    let (mut send, _recv) = raw.open_bi().await.unwrap();
    send.write_all(&single(&bomb(5))).await.unwrap();
    let reason = within(raw.closed()).await;
    assert!(
        matches!(&reason, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == quinn::VarInt::from_u32(frame::code::PROTOCOL)),
        "{reason:?}"
    );
    assert_eq!(b.stats().connections_closed_for_abuse, 1);
    assert_eq!(b.stats().frames_over_ratio, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_peer_holds_only_its_share_and_loses_the_stream_at_the_deadline() {
    let (_, ids) = throwaway_cluster(&["a", "b", "c", "x"]).unwrap();
    // b: 2 MiB messages, 8 MiB of budget, 4 MiB per peer; no deadline within
    // the test, so the stalled frames stay charged throughout.
    let mut cfg = TransportConfig::default();
    cfg.max_message_size = 2 << 20;
    cfg.inbound_bytes = 8 << 20;
    cfg.frame_timeout = Duration::from_secs(3600);
    let (a, _a_in) = start(&ids[0], cfg.clone());
    let (b, mut b_in) = start(&ids[1], cfg.clone());
    let (_ep, raw) = raw_client(&ids[3], &b).await;
    let x = NodeName::new("x").unwrap();
    // x opens large frames (plain, ~2 MiB each) and sends only their head.
    let big = OutFrame::new(7, noise((2 << 20) - 100, 7), usize::MAX, 1);
    let head = single(&big)[..1 + 4 + 8 + 1000].to_vec();
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let (mut send, recv) = raw.open_bi().await.unwrap();
        send.write_all(&head).await.unwrap();
        stalled.push((send, recv));
    }
    eventually("x's first frame charged", || {
        b.inbound_bytes_charged_by(&x) > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One frame fits x's share (4 MiB); the next waits for it.
    let share = 4 << 20;
    let charged_x = b.inbound_bytes_charged_by(&x);
    assert!(
        charged_x >= (2 << 20) - 1000 && charged_x <= share,
        "x holds {charged_x}"
    );
    assert!(b.inbound_bytes_charged_peak() <= share);

    // Another peer's large message is still taken (it needs b's verdict).
    let from_a = noise((2 << 20) - 100, 8);
    within(a.send(&dest_of(&b), 7, from_a.clone(), WhenFull::Wait))
        .await
        .unwrap();
    let m = next_message(&mut b_in).await;
    assert_eq!((m.from.name.as_str(), m.body == from_a), ("a", true));
    assert_eq!(
        b.stats().frames_timed_out,
        0,
        "x's frames are still pending"
    );
    assert!(b.inbound_bytes_charged_by(&x) > 0);
    drop(stalled);

    // c: a 1-s deadline. A stalled frame on a stream of its own and one on
    // the shared stream are both dropped, and their budget given back.
    let mut short = TransportConfig::default();
    short.frame_timeout = Duration::from_secs(1);
    let (c, _c_in) = start(&ids[2], short);
    let (_ep2, raw2) = raw_client(&ids[3], &c).await;
    let (mut send, mut recv) = raw2.open_bi().await.unwrap();
    send.write_all(&head).await.unwrap();
    let mut s = raw2.open_uni().await.unwrap();
    let inline = OutFrame::new(7, noise(30_000, 9), usize::MAX, 1).to_bytes();
    let mut bytes = vec![StreamKind::Messages as u8];
    bytes.extend_from_slice(&inline[..500]);
    s.write_all(&bytes).await.unwrap();
    let verdict = within(recv.read_to_end(0)).await;
    assert!(
        matches!(&verdict, Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(c))) if *c == quinn::VarInt::from_u32(frame::code::TIMED_OUT)),
        "{verdict:?}"
    );
    let stopped = within(s.stopped()).await.unwrap();
    assert_eq!(
        stopped,
        Some(quinn::VarInt::from_u32(frame::code::TIMED_OUT))
    );
    assert_eq!(c.stats().frames_timed_out, 2);
    assert_eq!(c.inbound_bytes_charged(), 0);
    assert!(
        c.inbound_bytes_charged_peak() >= (2 << 20) - 1000,
        "the stalled frame was charged"
    );
    // The connection stays up for valid traffic.
    raw2.send_datagram(frame::encode_datagram(b"still here"))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_compressible_frames_is_held_to_its_share() {
    let (_, ids) = throwaway_cluster(&["a", "b", "x"]).unwrap();
    let mut cfg = TransportConfig::default();
    cfg.max_message_size = 1 << 20;
    cfg.inbound_bytes = 4 << 20; // 2 MiB per peer
    // A state-like channel: any ratio, so only the byte budget holds.
    cfg.channel_caps = vec![shoal_transport::ChannelCap {
        channel: 9,
        max_size: 1 << 20,
        max_ratio: u32::MAX,
    }];
    let (a, _a_in) = start(&ids[0], cfg.clone());
    let (b, mut b_in) = start(&ids[1], cfg);
    let (_ep, raw) = raw_client(&ids[2], &b).await;
    let x = NodeName::new("x").unwrap();
    let share = 2 << 20;

    // x: 2,000 frames of 64 KiB of zeros on the shared stream (a few dozen
    // bytes each on the wire, 128 MiB decompressed), and 32 streams of
    // 1 MiB of zeros each.
    let zeros = OutFrame::new(9, Bytes::from(vec![0u8; 60_000]), 1, 1).to_bytes();
    assert!(zeros.len() < 100);
    let mut flood = vec![StreamKind::Messages as u8];
    for _ in 0..2000 {
        flood.extend_from_slice(&zeros);
    }
    let mut s = raw.open_uni().await.unwrap();
    s.write_all(&flood).await.unwrap();
    // b does not read: x's charge reaches its share and stays there.
    eventually("x's flood charged", || {
        b.inbound_bytes_charged_by(&x) > share / 2 || b.stats().messages_received > 100
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let queued = b.stats().messages_received;
    assert!(
        queued < 100,
        "{queued} messages queued: the share, not the count, binds"
    );
    let big = single(&OutFrame::new(9, Bytes::from(vec![0u8; 1 << 20]), 1, 1));
    let mut verdicts = Vec::new();
    for _ in 0..32 {
        let (mut send, mut recv) = raw.open_bi().await.unwrap();
        send.write_all(&big).await.unwrap();
        verdicts.push(tokio::spawn(async move {
            let _keep = send;
            recv.read_to_end(0).await.is_ok()
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        b.inbound_bytes_charged_peak() <= share,
        "peak {} over x's share",
        b.inbound_bytes_charged_peak()
    );
    let accepted = verdicts.iter().filter(|v| v.is_finished()).count();
    assert!(accepted <= 2, "{accepted} of x's 1-MiB frames accepted");
    assert!(b.stats().messages_received < 100);

    // a still gets a large message accepted (its verdict needs the charge).
    let from_a = noise(512 * 1024, 3);
    within(a.send(&dest_of(&b), 9, from_a.clone(), WhenFull::Wait))
        .await
        .unwrap();
    assert!(b.inbound_bytes_charged() <= 4 << 20);
    // Reading drains x's flood as it refills its share, and reaches a's.
    within(async {
        loop {
            let m = next_message(&mut b_in).await;
            if m.from.name.as_str() == "a" {
                assert!(m.body == from_a);
                break;
            }
        }
    })
    .await;
    assert!(b.inbound_bytes_charged_peak() <= 4 << 20);
    assert!(b.inbound_bytes_charged_by(&x) <= share);
}

/// The byte-budget tests' configuration: messages up to 1 MiB, an inbound
/// budget of 3 MiB (1.5 MiB per peer with two peers), 256 KiB of send queue.
fn budget_config() -> TransportConfig {
    let mut cfg = TransportConfig::default();
    cfg.max_message_size = 1 << 20;
    cfg.inbound_bytes = 3 << 20; // 1.5 MiB per peer
    cfg.send_queue_bytes = 256 * 1024;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_messages_push_back_by_bytes_and_lose_nothing() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let cfg = budget_config();
    let (a, _a_in) = start(&ids[0], cfg.clone());
    let (b, mut b_in) = start(&ids[1], cfg);
    let to_b = dest_of(&b);
    let share = 3 << 19;
    // 32-KiB incompressible messages; b does not read. The count limit
    // (8192) is far away: only the byte budget can stop b's reader.
    let body = |i: u32| noise(32 * 1024, i + 1);
    let accepted = send_until_pushed_back(&a, &to_b, body, u32::MAX).await;
    let charged = b.inbound_bytes_charged();
    assert!(charged <= share, "{charged} charged");
    assert!(b.inbound_bytes_charged_peak() <= share);
    assert!(
        b.stats().messages_received <= (share / (32 * 1024)) as u64,
        "{} queued",
        b.stats().messages_received
    );
    // A waiting sender blocks until b reads.
    let (a2, to_b2) = (a.clone(), to_b.clone());
    let last = body(u32::MAX - 1);
    let last2 = last.clone();
    let waiting = tokio::spawn(async move { a2.send(&to_b2, 1, last2, WhenFull::Wait).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !waiting.is_finished(),
        "a full budget must make the sender wait"
    );
    for i in 0..accepted {
        let m = next_message(&mut b_in).await;
        assert!(m.body == body(i), "message {i} lost or reordered");
    }
    within(waiting).await.unwrap().unwrap();
    assert!(next_message(&mut b_in).await.body == last);
    assert_eq!(a.stats().messages_lost, 0);
    assert_eq!(b.inbound_bytes_charged(), 0);
}

/// Sends `body(i)` on channel 1 from `a` to `to`, refusing to wait, until
/// three sends in a row found the queue full (the sender is pushed back)
/// or `limit` were accepted; returns how many were accepted.
async fn send_until_pushed_back(
    a: &Transport,
    to: &Dest,
    body: impl Fn(u32) -> Bytes,
    limit: u32,
) -> u32 {
    let mut accepted = 0u32;
    let mut full_in_a_row = 0;
    within(async {
        while full_in_a_row < 3 && accepted < limit {
            match a.send(to, 1, body(accepted), WhenFull::Fail).await {
                Ok(()) => {
                    accepted += 1;
                    full_in_a_row = 0;
                }
                Err(TransportError::QueueFull { .. }) => {
                    full_in_a_row += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    accepted
}

/// A consumer that takes every message at once and queues it further (a
/// reader downstream that is stuck), each body keeping its budget until
/// dropped: its task and the queue.
fn hold_everything(
    mut messages: shoal_transport::MessageReceiver,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::mpsc::UnboundedReceiver<Message>,
) {
    let (held_tx, held_rx) = tokio::sync::mpsc::unbounded_channel();
    let consumer = tokio::spawn(async move {
        while let Some(m) = messages.recv_held().await {
            if held_tx.send(m).is_err() {
                break;
            }
        }
    });
    (consumer, held_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_held_past_recv_keep_their_budget_until_dropped() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let cfg = budget_config();
    let (a, _a_in) = start(&ids[0], cfg.clone());
    let (b, b_in) = start(&ids[1], cfg);
    let to_b = dest_of(&b);
    let share = 3 << 19;
    let size = 32 * 1024;
    // b's consumer takes every message at once and queues it further (a
    // reader downstream that is stuck): without its budget held, it would
    // take all 400 (12.5 MiB) and the sender would never be pushed back.
    let (messages, _datagrams) = b_in.split();
    let (consumer, mut held_rx) = hold_everything(messages);
    let body = |i: u32| noise(size, i + 1);
    let accepted = send_until_pushed_back(&a, &to_b, body, 400).await;
    assert!(accepted < 400, "the sender was never pushed back");
    let mut held = Vec::new();
    while let Ok(m) = held_rx.try_recv() {
        held.push(m);
    }
    let held_bytes: usize = held.iter().map(|m| m.body.len()).sum();
    assert!(
        held_bytes <= share,
        "{held_bytes} bytes held past the budget"
    );
    let charged = b.inbound_bytes_charged();
    assert!(
        charged >= held_bytes && charged <= share,
        "{charged} charged, {held_bytes} held"
    );
    assert!(b.stats().inbound_budget_waits > 0);
    // Dropping the bodies lets the rest in, in order.
    let mut i = 0;
    for m in held.drain(..) {
        assert!(m.body == body(i), "message {i} lost or reordered");
        i += 1;
    }
    while i < accepted {
        let m = within(held_rx.recv()).await.unwrap();
        assert!(m.body == body(i), "message {i} lost or reordered");
        i += 1;
    }
    eventually("every budget given back", || b.inbound_bytes_charged() == 0).await;
    assert_eq!(a.stats().messages_lost, 0);
    consumer.abort();
}

/// A peer's share of the data budget is full of messages a consumer holds
/// and does not let go (a stuck reader downstream): messages and requests
/// on a control channel still get through, from a receiver of their own,
/// charged to the control budget; the stall is reported; and once the
/// bodies are dropped every data message arrives, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_channels_get_through_a_full_data_share() {
    const CONTROL: u32 = 9;
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let mut cfg = budget_config();
    cfg.control_channels = vec![CONTROL];
    cfg.control_bytes = 4 << 20;
    let (a, _a_in) = start(&ids[0], cfg.clone());
    let (b, b_in) = start(&ids[1], cfg);
    let to_b = dest_of(&b);
    let share = 3 << 19;
    let size = 32 * 1024;
    let (mut messages, _datagrams) = b_in.split();
    let mut control = messages.take_control().expect("control receiver");
    assert!(messages.take_control().is_none());
    let (consumer, mut held_rx) = hold_everything(messages);
    let body = |i: u32| noise(size, i + 1);
    let accepted = send_until_pushed_back(&a, &to_b, body, 400).await;
    assert!(accepted < 400, "the sender was never pushed back");
    assert!(b.inbound_bytes_charged_by(a.name()) + size + 1024 >= share);
    // b's reader of a's shared stream waits for budget: reported.
    eventually("the stall is reported", || {
        b.stats().inbound_budget_stalls > 0
    })
    .await;

    // A small and a large one-way message and a request on the control
    // channel, none of which waits for the data budget.
    let small = noise(100, 7);
    let large = noise(200 * 1024, 8);
    within(a.send(&to_b, CONTROL, small.clone(), WhenFull::Fail))
        .await
        .unwrap();
    within(a.send(&to_b, CONTROL, large.clone(), WhenFull::Fail))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = within(control.recv_held()).await.expect("control closed");
        assert_eq!(m.channel, CONTROL);
        got.push(m.body);
    }
    got.sort_by_key(Bytes::len);
    assert!(
        got[0] == small && got[1] == large,
        "control messages garbled"
    );
    assert!(b.control_bytes_charged() >= large.len());
    drop(got);
    let answer = {
        let a = a.clone();
        let to_b = to_b.clone();
        tokio::spawn(async move {
            a.request(&to_b, CONTROL, Bytes::from_static(b"ping"), HANG)
                .await
        })
    };
    let req = within(control.recv()).await.expect("control closed");
    assert_eq!(&req.body[..], b"ping");
    req.reply
        .expect("a request")
        .respond(Bytes::from_static(b"pong"))
        .await
        .unwrap();
    assert_eq!(&within(answer).await.unwrap().unwrap()[..], b"pong");
    assert_eq!(b.control_bytes_charged(), 0);
    assert!(b.inbound_bytes_charged_by(a.name()) + size + 1024 >= share);

    // The stuck consumer lets go: every data message arrives, in order.
    let mut i = 0;
    while i < accepted {
        let m = within(held_rx.recv()).await.unwrap();
        assert!(m.body == body(i), "message {i} lost or reordered");
        i += 1;
    }
    eventually("every budget given back", || b.inbound_bytes_charged() == 0).await;
    assert_eq!(a.stats().messages_lost, 0);
    consumer.abort();
}

/// Requests on data channels that the peer's application leaves unanswered
/// are in flight at most `max_concurrent_requests` less the streams kept for
/// control at once (the next waits for one to end): a control request still
/// gets a stream and its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_requests_leave_streams_for_control() {
    const CONTROL: u32 = 9;
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let mut cfg = TransportConfig::default();
    cfg.max_concurrent_requests = 4; // 2 for data, 2 kept for control
    cfg.control_channels = vec![CONTROL];
    let (a, _a_in) = start(&ids[0], cfg.clone());
    let (b, b_in) = start(&ids[1], cfg);
    let to_b = dest_of(&b);
    let (mut messages, _datagrams) = b_in.split();
    let mut control = messages.take_control().expect("control receiver");
    let mut pending = Vec::new();
    for i in 0..3u8 {
        let a = a.clone();
        let to_b = to_b.clone();
        pending.push(tokio::spawn(async move {
            a.request(&to_b, 1, Bytes::from(vec![i]), HANG).await
        }));
    }
    // b's application takes two and holds them unanswered; the third waits
    // on a's side for room.
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(within(messages.recv()).await.expect("messages closed"));
    }
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), messages.recv()).await {
        panic!("a third data request got a stream: {m:?}");
    }
    let answer = {
        let a = a.clone();
        let to_b = to_b.clone();
        tokio::spawn(async move {
            a.request(&to_b, CONTROL, Bytes::from_static(b"ping"), HANG)
                .await
        })
    };
    let req = within(control.recv()).await.expect("control closed");
    req.reply
        .expect("a request")
        .respond(Bytes::from_static(b"pong"))
        .await
        .unwrap();
    assert_eq!(&within(answer).await.unwrap().unwrap()[..], b"pong");
    // Answering the held requests lets the third through.
    for m in held.drain(..) {
        m.reply
            .unwrap()
            .respond(Bytes::from_static(b"ok"))
            .await
            .unwrap();
    }
    let m = within(messages.recv()).await.expect("messages closed");
    m.reply
        .unwrap()
        .respond(Bytes::from_static(b"ok"))
        .await
        .unwrap();
    for p in pending {
        assert_eq!(&within(p).await.unwrap().unwrap()[..], b"ok");
    }
}

/// The request stream limit starts small (an idle connection costs less)
/// and grows on demand: `max_concurrent_requests` requests held open by the
/// responder all reach it, and one more waits for room. The requests are
/// too large for the shared requests stream, so each takes a stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_stream_limit_grows_to_max_concurrent_requests() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a, _a_in) = start(&ids[0], TransportConfig::default());
    let mut config = TransportConfig::default();
    config.max_concurrent_requests = 100;
    let (b, mut b_in) = start(&ids[1], config);
    let to_b = dest_of(&b);
    within(a.connect(&to_b)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..101u32 {
        let (a, to_b) = (a.clone(), to_b.clone());
        tasks.push(tokio::spawn(async move {
            a.request(&to_b, 1, noise(70 * 1024, i + 1), HANG).await
        }));
    }
    // Nothing is answered yet: every request arrived on a stream of its own.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(next_message(&mut b_in).await);
    }
    assert_silent(&mut b_in).await;
    for m in held {
        m.reply.unwrap().respond(m.body).await.unwrap();
    }
    // Room again: the last one arrives.
    let m = next_message(&mut b_in).await;
    m.reply.unwrap().respond(m.body).await.unwrap();
    for t in tasks {
        within(t).await.unwrap().unwrap();
    }
}

/// A request whose end arrived with its frame is read to its end, so the
/// responder does not stop the stream (quinn sends STOP_SENDING for a
/// stream dropped unread, one frame more per request). Single-threaded, so
/// the client's frame and end leave in one packet.
#[tokio::test]
async fn a_request_read_to_its_end_is_not_stopped() {
    let (_, ids) = throwaway_cluster(&["b", "x"]).unwrap();
    let (b, mut b_in) = start(&ids[0], TransportConfig::default());
    let (_ep, raw) = raw_client(&ids[1], &b).await;
    let _responder = tokio::spawn(async move {
        while let Some(m) = b_in.recv_message().await {
            if let Some(reply) = m.reply {
                reply.respond(m.body).await.unwrap();
            }
        }
    });
    for i in 0..5u8 {
        let (mut send, mut recv) = raw.open_bi().await.unwrap();
        let mut req = vec![StreamKind::Request as u8];
        req.extend_from_slice(&OutFrame::new(3, Bytes::from(vec![i; 10]), 1 << 20, 1).to_bytes());
        send.write_all(&req).await.unwrap();
        send.finish().unwrap();
        let answer = within(recv.read_to_end(1000)).await.unwrap();
        assert_eq!(answer.len(), 4 + 3 + 10, "one response frame");
    }
    assert_eq!(raw.stats().frame_rx.stop_sending, 0);
}

/// One certificate name, one connection: a second process holding the
/// same certificate (or one peer dialing from many ports) replaces the
/// older connection instead of adding to it, and it is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_connecting_from_another_address_replaces_its_older_connection() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a1, _a1_in) = start(&ids[0], TransportConfig::default());
    let (a2, _a2_in) = start(&ids[0], TransportConfig::default());
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());
    let to_b = dest_of(&b);
    within(a1.send(&to_b, 1, Bytes::from_static(b"one"), WhenFull::Wait))
        .await
        .unwrap();
    assert_eq!(&next_message(&mut b_in).await.body[..], b"one");
    within(a2.send(&to_b, 1, Bytes::from_static(b"two"), WhenFull::Wait))
        .await
        .unwrap();
    assert_eq!(&next_message(&mut b_in).await.body[..], b"two");
    within(async {
        while b.open_connections() != 1 || a1.open_connections() != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(b.stats().connections_replaced_by_name, 1);
    assert_eq!(a2.open_connections(), 1);
    // The older connection closed gracefully: nothing was lost.
    for t in [&a1, &a2, &b] {
        assert_eq!(t.stats().messages_lost, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_freed_its_burst_buffers_keeps_the_order() {
    // The writer frees its batch after 1 s with an empty queue: bursts
    // separated by more than that go through a freed and regrown batch, on
    // the same connection and stream, and every message arrives once, in
    // order.
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a, _a_in) = start(&ids[0], TransportConfig::default());
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());
    let to_b = dest_of(&b);
    let mut next = 0u32;
    for burst in 0..3 {
        if burst > 0 {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
        }
        let first = next;
        for _ in 0..2_000 {
            within(a.send(
                &to_b,
                1,
                Bytes::from(next.to_le_bytes().to_vec()),
                WhenFull::Wait,
            ))
            .await
            .unwrap();
            next += 1;
        }
        for i in first..next {
            assert_eq!(&next_message(&mut b_in).await.body[..], &i.to_le_bytes());
        }
    }
    let s = a.stats();
    assert_eq!(s.messages_lost, 0, "{s:?}");
    assert_eq!(s.connections_opened, 1, "one connection throughout: {s:?}");
}

/// The application's features travel in the hello: each side reads the
/// other's once connected, and nothing before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_features_are_read_from_the_peers_hello() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let mut cfg = TransportConfig::default();
    cfg.app_features = 6;
    let (a, _a_in) = start(&ids[0], cfg);
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());
    let (to_a, to_b) = (dest_of(&a), dest_of(&b));
    assert_eq!(a.peer_app_features(&to_b), None);
    within(a.send(&to_b, 1, Bytes::from_static(b"hi"), WhenFull::Wait))
        .await
        .unwrap();
    next_message(&mut b_in).await;
    assert_eq!(a.peer_app_features(&to_b), Some(0));
    eventually("b has a's connection", || {
        b.peer_app_features(&to_a).is_some()
    })
    .await;
    assert_eq!(b.peer_app_features(&to_a), Some(6));
}
