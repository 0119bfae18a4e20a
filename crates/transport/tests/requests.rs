//! Requests multiplexed on the long-lived requests and answers streams, on
//! loopback with real sockets. Timeouts only bound hangs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use shoal_transport::frame::{
    self, EXCHANGE_FRAME_MAX, ExchangeTag, FrameReader, OutFrame, StreamKind, code,
};
use shoal_transport::{Dest, NodeName, TransportConfig, TransportError, throwaway_cluster};

/// Many more small requests than the responder's stream limit are in
/// flight at once (they take no stream each), and answers given in any
/// order reach their own requesters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_requests_need_no_stream_each_and_answers_find_their_requester() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a, _a_in) = start(&ids[0], TransportConfig::default());
    let mut config = TransportConfig::default();
    // With a stream per request, at most 8 could be open at once.
    config.max_concurrent_requests = 8;
    let (b, mut b_in) = start(&ids[1], config);
    let to_b = dest_of(&b);
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let (a, to_b) = (a.clone(), to_b.clone());
        tasks.push(tokio::spawn(async move {
            let answer = a
                .request(&to_b, 1, Bytes::from(i.to_le_bytes().to_vec()), HANG)
                .await
                .unwrap();
            (i, answer)
        }));
    }
    let mut held = Vec::new();
    for _ in 0..200 {
        held.push(next_message(&mut b_in).await);
    }
    // Answered last to first: each answer is the request's body, twice.
    while let Some(m) = held.pop() {
        let mut twice = m.body.to_vec();
        twice.extend_from_slice(&m.body);
        m.reply.unwrap().respond(Bytes::from(twice)).await.unwrap();
    }
    for t in tasks {
        let (i, answer) = within(t).await.unwrap();
        let mut want = i.to_le_bytes().to_vec();
        want.extend_from_slice(&i.to_le_bytes());
        assert_eq!(&answer[..], &want[..]);
    }
    let s = a.stats();
    assert_eq!(s.responses_received, 200);
    assert_eq!(s.messages_lost, 0);
}

/// An answer too large for the answers stream comes on a stream of its own,
/// and a large request on a bi stream of its own: both arrive whole, and so
/// do compressible ones whose compressed frame would fit a shared stream
/// (whose reader takes at most 64 KiB decompressed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_and_answers_take_streams_of_their_own() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a, _a_in) = start(&ids[0], TransportConfig::default());
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());
    let to_b = dest_of(&b);
    let big = noise(300 * 1024, 7);
    let answerer = {
        let big = big.clone();
        tokio::spawn(async move {
            for _ in 0..2 {
                let m = next_message(&mut b_in).await;
                let answer = if m.body.len() > 1000 {
                    Bytes::from(m.body.len().to_le_bytes().to_vec())
                } else {
                    big.clone()
                };
                m.reply.unwrap().respond(answer).await.unwrap();
            }
            b_in
        })
    };
    let answer = within(a.request(&to_b, 1, Bytes::from_static(b"big?"), HANG))
        .await
        .unwrap();
    assert!(answer == big, "the large answer differs");
    let answer = within(a.request(&to_b, 1, big.clone(), HANG))
        .await
        .unwrap();
    assert_eq!(&answer[..], &big.len().to_le_bytes()[..]);
    let mut b_in = within(answerer).await.unwrap();

    // 256 KiB that compress within the ratio cap to less than 64 KiB, both
    // ways.
    let mut text = Vec::new();
    let mut i = 0u64;
    while text.len() < 256 * 1024 {
        text.extend_from_slice(format!("datum {i} value {} ;", (i * 7919) % 10007).as_bytes());
        i += 1;
    }
    let squashy = Bytes::from(text);
    let frame = OutFrame::within_ratio(1, squashy.clone(), 1024, 1, 64);
    assert!(frame.is_compressed() && frame.wire_len() < 64 * 1024);
    let answerer = {
        let squashy = squashy.clone();
        tokio::spawn(async move {
            let m = next_message(&mut b_in).await;
            assert!(m.body == squashy, "the compressible request differs");
            m.reply.unwrap().respond(squashy).await.unwrap();
        })
    };
    let answer = within(a.request(&to_b, 1, squashy.clone(), HANG))
        .await
        .unwrap();
    assert!(answer == squashy, "the compressible answer differs");
    within(answerer).await.unwrap();
    let s = b.stats();
    assert_eq!((s.frames_too_large, s.frames_malformed), (0, 0), "{s:?}");
}

/// Answers never wait behind requests: with this node's budget share full
/// of the peer's requests that its application does not take, the answers
/// to this node's own requests still arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_arrive_while_requests_wait_for_budget() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let mut config = TransportConfig::default();
    config.max_message_size = 1 << 20;
    config.inbound_bytes = 3 << 20; // 1.5 MiB per peer
    let (a, a_in) = start(&ids[0], config);
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());
    let (to_a, to_b) = (dest_of(&a), dest_of(&b));
    // b floods a with 32 KiB requests that a's application never takes.
    let mut flood = Vec::new();
    for i in 0..64u32 {
        let (b, to_a) = (b.clone(), to_a.clone());
        flood.push(tokio::spawn(async move {
            let _ = b.request(&to_a, 1, noise(32 * 1024, i + 1), HANG).await;
        }));
    }
    let share = 3 << 19;
    eventually("a's share of b full", || {
        a.inbound_bytes_charged_by(b.name()) + 32 * 1024 + 64 > share
    })
    .await;
    // b answers a's request.
    let answerer = tokio::spawn(async move {
        let m = next_message(&mut b_in).await;
        m.reply.unwrap().respond(Bytes::from_static(b"pong")).await
    });
    let answer = within(a.request(&to_b, 1, Bytes::from_static(b"ping"), HANG))
        .await
        .unwrap();
    assert_eq!(&answer[..], b"pong");
    within(answerer).await.unwrap().unwrap();
    for t in flood {
        t.abort();
    }
    drop(a_in);
}

/// A request whose connection closes fails at once, not at its timeout;
/// one that times out leaves nothing behind, and its late answer is
/// dropped while the next request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_end_with_their_connection_or_their_timeout() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let (a, _a_in) = start(&ids[0], TransportConfig::default());
    let (b, mut b_in) = start(&ids[1], TransportConfig::default());
    let to_b = dest_of(&b);

    let short = Duration::from_millis(300);
    let err = within(a.request(&to_b, 1, Bytes::from_static(b"late"), short))
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::TimedOut { .. }), "{err:?}");
    let late = next_message(&mut b_in).await;
    late.reply
        .unwrap()
        .respond(Bytes::from_static(b"too late"))
        .await
        .unwrap();
    let next = {
        let (a, to_b) = (a.clone(), to_b.clone());
        tokio::spawn(async move { a.request(&to_b, 1, Bytes::from_static(b"next"), HANG).await })
    };
    let m = next_message(&mut b_in).await;
    assert_eq!(&m.body[..], b"next");
    m.reply
        .unwrap()
        .respond(Bytes::from_static(b"on time"))
        .await
        .unwrap();
    assert_eq!(&within(next).await.unwrap().unwrap()[..], b"on time");

    // Held unanswered; then b drops the connection.
    let held = {
        let (a, to_b) = (a.clone(), to_b.clone());
        let long = Duration::from_secs(600);
        tokio::spawn(async move { a.request(&to_b, 1, Bytes::from_static(b"held"), long).await })
    };
    let m = next_message(&mut b_in).await;
    b.disconnect(a.local_addr());
    let err = within(held).await.unwrap().unwrap_err();
    assert!(
        matches!(err, TransportError::Closed { .. }),
        "not failed as closed: {err:?}"
    );
    drop(m);
}

/// Requests from both sides at gaps around the idle timeout, so idle
/// closes and requests keep meeting: every request is answered (one sent
/// as its connection starts closing goes on a new connection; one in
/// progress holds the close until its answer came).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_closes_racing_with_requests_answer_every_one() {
    let (_, ids) = throwaway_cluster(&["a", "b"]).unwrap();
    let mut cfg = TransportConfig::default();
    cfg.idle_close = Duration::from_millis(200);
    let (a, a_in) = start(&ids[0], cfg.clone());
    let (b, b_in) = start(&ids[1], cfg);
    let echo = |mut inbox: shoal_transport::Incoming| {
        tokio::spawn(async move {
            while let Some(m) = inbox.recv_message().await {
                if let Some(reply) = m.reply {
                    // Answered a little later, so closes meet answers too.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        reply.respond(m.body).await
                    });
                }
            }
        })
    };
    let (ea, eb) = (echo(a_in), echo(b_in));
    let mut seed = 0x2545_f491_u32;
    for i in 0..24u32 {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let gap = 120 + u64::from(seed >> 16) % 260;
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let (from, to) = if i % 2 == 0 {
            (&a, dest_of(&b))
        } else {
            (&b, dest_of(&a))
        };
        let body = Bytes::from(i.to_le_bytes().to_vec());
        let answer = within(from.request(&to, 1, body.clone(), HANG))
            .await
            .unwrap();
        assert_eq!(answer, body);
    }
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sa.responses_received + sb.responses_received, 24);
    assert!(
        sa.connections_closed + sb.connections_closed >= 2,
        "idle closes happened: {sa:?} {sb:?}"
    );
    ea.abort();
    eb.abort();
}

/// An exchange frame: length prefix, tag, id, rest.
fn xframe(tag: u8, id: u64, rest: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    out.put_u32_le((frame::EXCHANGE_PREFIX + rest.len()) as u32);
    out.put_u8(tag);
    out.put_u64_le(id);
    out.put_slice(rest);
    out.to_vec()
}

/// The first uni stream of `kind` the server opens to the raw client
/// `conn` (after its hello stream, say), its kind byte read.
async fn accept_stream(conn: &quinn::Connection, kind: StreamKind) -> quinn::RecvStream {
    loop {
        let mut r = within(conn.accept_uni()).await.unwrap();
        let mut first = [0u8; 1];
        r.read_exact(&mut first).await.unwrap();
        if first[0] == kind as u8 {
            return r;
        }
    }
}

/// At least `n` exchange frames read from `recv`, split.
async fn read_exchanges(recv: &mut quinn::RecvStream, n: usize) -> Vec<frame::Exchange> {
    let mut reader = FrameReader::new(EXCHANGE_FRAME_MAX);
    let mut got = Vec::new();
    while got.len() < n {
        let chunk = within(recv.read_chunk(1 << 16, true))
            .await
            .unwrap()
            .expect("stream ended");
        reader.push(&chunk.bytes);
        while let Some(f) = reader.next_frame().unwrap() {
            got.push(frame::split_exchange(f).unwrap());
        }
    }
    got
}

/// The envelope of a frame (without its length prefix).
fn envelope(f: &OutFrame) -> Vec<u8> {
    f.to_bytes()[frame::LEN_PREFIX..].to_vec()
}

/// Garbage on a requests stream is counted and dropped, requests that cannot
/// be taken are refused by id on the answers stream, a good request in
/// between is answered, and a frame no requests stream may carry stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_by_id_and_counted() {
    let (_, ids) = throwaway_cluster(&["b", "x"]).unwrap();
    let (b, mut b_in) = start(&ids[0], TransportConfig::default());
    let (_ep, raw) = raw_client(&ids[1], &b).await;
    let responder = tokio::spawn(async move {
        while let Some(m) = b_in.recv_message().await {
            if let Some(reply) = m.reply {
                reply.respond(Bytes::from_static(b"pong")).await.unwrap();
            }
        }
    });
    let mut bad_version = OutFrame::new(3, Bytes::from_static(b"v9"), 1 << 20, 1);
    bad_version.header.version = 9;
    let mut lying = OutFrame::new(3, Bytes::from(vec![5u8; 5000]), 1, 1);
    lying.header.encoding = frame::Encoding::Zstd { raw_len: 1 << 40 };
    let good = OutFrame::new(3, Bytes::from_static(b"ping"), 1 << 20, 1);
    let mut stream = vec![StreamKind::Requests as u8];
    stream.extend_from_slice(&xframe(1, 1, &envelope(&bad_version)));
    stream.extend_from_slice(&xframe(1, 2, &envelope(&lying)));
    stream.extend_from_slice(&[3, 0, 0, 0, 1, 0, 0]); // shorter than a prefix
    stream.extend_from_slice(&xframe(2, 3, &envelope(&good))); // not a request
    stream.extend_from_slice(&xframe(9, 4, &envelope(&good))); // unknown tag
    stream.extend_from_slice(&xframe(1, 7, &envelope(&good)));
    let mut s = raw.open_uni().await.unwrap();
    s.write_all(&stream).await.unwrap();

    let mut answers = accept_stream(&raw, StreamKind::Answers).await;
    let got = read_exchanges(&mut answers, 3).await;
    assert_eq!((got[0].tag, got[0].id), (ExchangeTag::Refusal, 1));
    assert_eq!(frame::refusal_code(&got[0].rest), code::PROTOCOL);
    assert_eq!((got[1].tag, got[1].id), (ExchangeTag::Refusal, 2));
    assert_eq!(frame::refusal_code(&got[1].rest), code::TOO_LARGE);
    assert_eq!((got[2].tag, got[2].id), (ExchangeTag::Response, 7));
    let caps = frame::Caps::new(1 << 20, 64, &[]);
    let (channel, body) = frame::decode_envelope(got[2].rest.clone(), &caps).unwrap();
    assert_eq!((channel, &body[..]), (3, &b"pong"[..]));

    // A length no requests stream may carry: the stream is stopped.
    s.write_all(&(u32::MAX).to_le_bytes()).await.unwrap();
    let stopped = within(s.stopped()).await.unwrap();
    assert_eq!(
        stopped,
        Some(quinn::VarInt::from_u32(frame::code::PROTOCOL))
    );
    let st = b.stats();
    // bad version, short frame, wrong tag, unknown tag, the broken stream
    assert!(st.frames_malformed >= 5, "{st:?}");
    assert!(st.frames_too_large >= 1, "{st:?}");
    assert_eq!(st.messages_received, 1, "{st:?}");
    responder.abort();
}

/// Towards a peer whose hello does not name the requests streams (a node of
/// the version before them, in a rolling upgrade) every request takes a bi
/// stream of its own; towards one that names them, the requests stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_requests_streams_gets_a_stream_per_request() {
    let (_, ids) = throwaway_cluster(&["b", "x", "y"]).unwrap();
    let (b, _b_in) = start(&ids[0], TransportConfig::default());
    // x says hello as a node before the features did: two fields.
    let (ep_x, x) = raw_connect(&ids[1], &b).await;
    let mut old = vec![StreamKind::Hello as u8];
    old.extend_from_slice(&2u32.to_le_bytes());
    old.extend_from_slice(&[frame::ENVELOPE_VERSION, 42]);
    send_uni(&x, &old).await;
    eventually("x admitted", || {
        b.peers().iter().any(|p| p.name.as_str() == "x")
    })
    .await;
    let old_node = tokio::spawn(async move {
        let (mut send, mut recv) = x.accept_bi().await.unwrap();
        let request = recv.read_to_end(1000).await.unwrap();
        assert_eq!(request[0], StreamKind::Request as u8);
        let caps = frame::Caps::new(1 << 20, 64, &[]);
        let (channel, body) = frame::decode_envelope(
            Bytes::copy_from_slice(&request[1 + frame::LEN_PREFIX..]),
            &caps,
        )
        .unwrap();
        assert_eq!((channel, &body[..]), (1, &b"hi"[..]));
        let answer = OutFrame::new(1, Bytes::from_static(b"old"), 1 << 20, 1);
        send.write_all(&answer.to_bytes()).await.unwrap();
        send.finish().unwrap();
        x
    });
    let to_x = Dest::node(NodeName::new("x").unwrap(), ep_x.local_addr().unwrap());
    let answer = within(b.request(&to_x, 1, Bytes::from_static(b"hi"), HANG))
        .await
        .unwrap();
    assert_eq!(&answer[..], b"old");
    let _x = within(old_node).await.unwrap();

    // y names them: b's request comes on its requests stream.
    let (ep_y, y) = raw_client(&ids[2], &b).await;
    eventually("y admitted", || {
        b.peers().iter().any(|p| p.name.as_str() == "y")
    })
    .await;
    let to_y = Dest::node(NodeName::new("y").unwrap(), ep_y.local_addr().unwrap());
    let requester = {
        let b = b.clone();
        tokio::spawn(async move {
            b.request(&to_y, 1, Bytes::from_static(b"hi"), Duration::from_secs(5))
                .await
        })
    };
    let mut requests = accept_stream(&y, StreamKind::Requests).await;
    let got = read_exchanges(&mut requests, 1).await;
    assert_eq!(got[0].tag, ExchangeTag::Request);
    requester.abort();
}
