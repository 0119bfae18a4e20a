//! Transport benchmark: `cargo xtask bench transport [--json] [-- --secs N]`.
//!
//! Two nodes in one process (one tokio runtime, 2 worker threads) on
//! loopback, mutual TLS. Reports one-way message throughput (100-byte
//! payloads, one sending task with `WhenFull::Wait`, so as many in flight as
//! the send queue holds), request/response latency at moderate load (8
//! requesters, one request per millisecond each) and saturated (16
//! closed-loop requesters), handshake time (connect until both sides admitted
//! the connection) and memory per idle connection, both ends in this process,
//! measured twice. `idle_conn_kib`: RSS delta over 200 idle connections from
//! 200 fresh client endpoints (bound before the measurement) to one server,
//! divided by 200; it includes what each client endpoint pays on its first
//! connection whatever the number of its connections (pages of quinn's
//! endpoint receive buffer first touched, its tables' first allocations).
//! `idle_conn_warm_kib`: the same 200 endpoints each open a second
//! connection, to another server endpoint, while the first stays open: the
//! RSS delta over those 200 is the cost of one more connection of an endpoint
//! already in use (a node's endpoint holds all its connections).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_transport::{Dest, Transport, TransportConfig, WhenFull, throwaway_cluster};

const PAYLOAD: usize = 100;
const IDLE_CONNS: usize = 200;

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let secs: u64 = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(json, Duration::from_secs(secs)));
}

async fn run(json: bool, window: Duration) {
    let names: Vec<String> = (0..IDLE_CONNS + 3).map(|i| format!("n{i}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (_ca, ids) = throwaway_cluster(&name_refs).unwrap();
    let local = "127.0.0.1:0".parse().unwrap();
    let (a, _a_in) = Transport::bind(local, &ids[0], TransportConfig::default()).unwrap();
    let (b, b_in) = Transport::bind(local, &ids[1], TransportConfig::default()).unwrap();
    let to_b = Dest::node(b.name().clone(), b.local_addr());
    a.connect(&to_b).await.unwrap();
    let (mut b_msgs, _b_dgrams) = b_in.split();

    // --- handshakes and idle connection memory (first, so the allocator has
    // little freed memory to reuse and the RSS delta is not understated) ---
    let mut cfg = TransportConfig::default();
    cfg.socket_buffer_bytes = 256 * 1024;
    let mut clients = Vec::new();
    for id in &ids[3..] {
        clients.push(Transport::bind(local, id, cfg.clone()).unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = rss_bytes();
    let mut hs = Vec::new();
    for (c, _) in &clients {
        let t = Instant::now();
        c.connect(&to_b).await.unwrap();
        hs.push(t.elapsed());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_bytes();
    hs.sort();
    let handshake_ms = hs.iter().map(Duration::as_secs_f64).sum::<f64>() / hs.len() as f64 * 1e3;
    let idle_conn_kib = rss_after.saturating_sub(rss_before) as f64 / IDLE_CONNS as f64 / 1024.0;
    // The same endpoints' second connections (to another server endpoint),
    // with their first ones still open: endpoint-level memory is paid.
    let (c, _c_in) = Transport::bind(local, &ids[2], TransportConfig::default()).unwrap();
    let to_c = Dest::node(c.name().clone(), c.local_addr());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = rss_bytes();
    for (client, _) in &clients {
        client.connect(&to_c).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_bytes();
    let idle_conn_warm_kib =
        rss_after.saturating_sub(rss_before) as f64 / IDLE_CONNS as f64 / 1024.0;
    // Back to 200 idle connections for the rest.
    c.shutdown().await;

    // --- one-way throughput ---
    let received = Arc::new(AtomicU64::new(0));
    let recv_task = {
        let received = received.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            loop {
                buf.clear();
                let n = b_msgs.recv_many(&mut buf, 1024).await;
                if n == 0 {
                    break;
                }
                let mut answered = 0;
                for m in buf.drain(..) {
                    if let Some(reply) = m.reply {
                        // Latency phase: answer with the request body.
                        tokio::spawn(async move {
                            let _ = reply.respond(m.body).await;
                        });
                        answered += 1;
                    }
                }
                received.fetch_add((n - answered) as u64, Ordering::Relaxed);
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let (a, to_b, stop) = (a.clone(), to_b.clone(), stop.clone());
        tokio::spawn(async move {
            let payload = Bytes::from(vec![0xab; PAYLOAD]);
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                a.send(&to_b, 1, payload.clone(), WhenFull::Wait)
                    .await
                    .unwrap();
                sent += 1;
            }
            sent
        })
    };
    // Warm up, then measure what the receiver gets in the window.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start_count = received.load(Ordering::Relaxed);
    let start = Instant::now();
    tokio::time::sleep(window).await;
    let got = received.load(Ordering::Relaxed) - start_count;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _sent = sender.await.unwrap();
    let msgs_per_s = got as f64 / elapsed;
    // Let the queue drain before the latency phase.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // --- request/response: saturated (16 closed-loop requesters) ---
    let requesters = |n: usize, pace: Option<Duration>| {
        let deadline = Instant::now() + window;
        let mut tasks = Vec::new();
        for _ in 0..n {
            let (a, to_b) = (a.clone(), to_b.clone());
            tasks.push(tokio::spawn(async move {
                let body = Bytes::from(vec![0xcd; PAYLOAD]);
                let mut lat = Vec::new();
                let mut tick = pace.map(|p| {
                    let mut i = tokio::time::interval(p);
                    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    i
                });
                while Instant::now() < deadline {
                    if let Some(tick) = tick.as_mut() {
                        tick.tick().await;
                    }
                    let t = Instant::now();
                    a.request(&to_b, 2, body.clone(), Duration::from_secs(5))
                        .await
                        .unwrap();
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        tasks
    };
    let mut sat = Vec::new();
    for t in requesters(16, None) {
        sat.extend(t.await.unwrap());
    }
    sat.sort();
    let saturated_per_s = sat.len() as f64 / window.as_secs_f64();
    let saturated_p99 = percentile(&sat, 0.99);
    // --- request/response latency at moderate load: 8 requesters, each one
    // request per millisecond (about 8,000 requests/s) ---
    let mut lat = Vec::new();
    for t in requesters(8, Some(Duration::from_millis(1))) {
        lat.extend(t.await.unwrap());
    }
    lat.sort();
    let requests_per_s = lat.len() as f64 / window.as_secs_f64();
    let (p50, p99) = (percentile(&lat, 0.50), percentile(&lat, 0.99));

    let stats = a.stats();

    if json {
        println!(
            "{{\"bench\":\"transport\",\"process\":\"one\",\"payload_bytes\":{PAYLOAD},\"msgs_per_s\":{msgs_per_s:.0},\"requests_per_s\":{requests_per_s:.0},\"saturated_requests_per_s\":{saturated_per_s:.0},\"saturated_p99_ms\":{saturated_p99:.3},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"handshake_ms\":{handshake_ms:.3},\"handshake_p50_ms\":{:.3},\"idle_conn_kib\":{idle_conn_kib:.1},\"idle_conn_warm_kib\":{idle_conn_warm_kib:.1},\"idle_conns\":{IDLE_CONNS},\"window_s\":{},\"messages_lost\":{}}}",
            percentile(&hs, 0.5),
            window.as_secs(),
            stats.messages_lost
        );
    } else {
        println!(
            "transport benchmark (two nodes, one process, loopback, mTLS, {}-s windows)",
            window.as_secs()
        );
        println!("  one-way {PAYLOAD}-byte messages   {msgs_per_s:>12.0} msg/s");
        println!(
            "  request/response, moderate load {requests_per_s:>12.0} req/s   p50 {p50:.3} ms   p99 {p99:.3} ms"
        );
        println!(
            "  request/response, saturated     {saturated_per_s:>12.0} req/s   p99 {saturated_p99:.3} ms (16 closed-loop requesters)"
        );
        println!(
            "  handshake (connect + hellos)    {handshake_ms:>12.3} ms mean   p50 {:.3} ms",
            percentile(&hs, 0.5)
        );
        println!(
            "  idle connection memory         {idle_conn_kib:>12.1} KiB (both ends, RSS delta / {IDLE_CONNS}, fresh client endpoints)"
        );
        println!(
            "  idle connection memory, warm   {idle_conn_warm_kib:>12.1} KiB (both ends, endpoints' second connections)"
        );
        println!(
            "  messages lost                  {:>12}",
            stats.messages_lost
        );
    }
    for (c, _) in &clients {
        c.shutdown().await;
    }
    a.shutdown().await;
    b.shutdown().await;
    recv_task.abort();
}
