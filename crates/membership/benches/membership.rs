//! Benchmarks of shoal-membership: `cargo xtask bench membership [--json] [-- --nodes N --seeds S]`.
//!
//! - CPU cost of the hot paths (handling a ping with piggybacked updates,
//!   building a gossip packet), in wall-clock nanoseconds;
//! - memory per member record, from the process RSS;
//! - protocol figures in VIRTUAL time from a small discrete-event network
//!   (latency 0.5–1.5 ms, optional loss): time for every survivor to mark a
//!   crashed member of 16 dead, and time for one update to reach 99.99 % of
//!   N members, with the bytes each node sent per second. The simulator
//!   crate (`shoal-sim`) measures the same with faults; these are a quick
//!   cross-check.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shoal_membership::{Config, Event, LocalNode, Member, MemberState, Membership};

struct Args {
    json: bool,
    nodes: usize,
    seeds: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        json: false,
        nodes: 1000,
        seeds: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--json" => args.json = true,
            "--nodes" => args.nodes = it.next().and_then(|v| v.parse().ok()).unwrap_or(args.nodes),
            "--seeds" => args.seeds = it.next().and_then(|v| v.parse().ok()).unwrap_or(args.seeds),
            _ => {} // `cargo bench` passes --bench; ignore anything unknown.
        }
    }
    args
}

fn report(args: &Args, name: &str, fields: &[(&str, f64)], unit_note: &str) {
    if args.json {
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| {
                if v.is_finite() {
                    format!("\"{k}\":{v}")
                } else {
                    format!("\"{k}\":null")
                }
            })
            .collect();
        println!("{{\"bench\":\"membership/{name}\",{}}}", body.join(","));
    } else {
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{k} = {v:.3}"))
            .collect();
        println!("{name:<28} {}  {unit_note}", body.join(", "));
    }
}

fn addr(i: usize) -> SocketAddr {
    let i = u32::try_from(i).unwrap();
    SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7946))
}

/// The name of the node at `addr` (as the transport would authenticate it).
fn name_of(addr: SocketAddr) -> Arc<str> {
    match addr {
        SocketAddr::V4(a) => {
            let [_, x, y, z] = a.ip().octets();
            name((usize::from(x) << 16) | (usize::from(y) << 8) | usize::from(z))
        }
        SocketAddr::V6(_) => name(usize::MAX),
    }
}

fn name(i: usize) -> Arc<str> {
    Arc::from(format!("node-{i:05}"))
}

fn snapshot(n: usize) -> Vec<Member> {
    let empty: Arc<[u8]> = Arc::from(&[][..]);
    (0..n)
        .map(|i| Member {
            name: name(i),
            generation: 1,
            addr: addr(i),
            incarnation: 0,
            state: MemberState::Alive,
            ready: true,
            metadata: Arc::clone(&empty),
        })
        .collect()
}

fn new_node(config: &Config, i: usize, seed: u64, now: Instant) -> Membership<SmallRng> {
    let local = LocalNode {
        name: format!("node-{i:05}"),
        generation: 1,
        addr: addr(i),
        ready: true,
        metadata: Vec::new(),
    };
    Membership::new(
        config.clone(),
        local,
        SmallRng::seed_from_u64(seed ^ (i as u64) << 20),
        now,
    )
    .unwrap()
}

// ----- CPU --------------------------------------------------------------------

/// A node that knows `n` members, plus one encoded ping from member 1 that
/// carries as many (already known) updates as fit.
fn cpu_benches(args: &Args) {
    let now = Instant::now();
    let config = Config::lan();
    let n = 1000;
    let snap = snapshot(n);
    // A sender whose queue is full of updates: it learns 60 members at a
    // higher incarnation from another node's join push-pull.
    let mut sender = new_node(&config, 1, 1, now);
    sender.bootstrap(snap.iter().cloned(), now);
    let mut newer = snap.clone();
    for m in newer.iter_mut().take(62).skip(2) {
        m.incarnation = 1;
    }
    let mut other = new_node(&config, 2, 2, now);
    // (It must not know the sender yet, or joining it is a no-op.)
    other.bootstrap(newer.into_iter().filter(|m| m.addr != addr(1)), now);
    other.join(&[addr(1)], now);
    while let Some(t) = other.poll_transmit() {
        if t.to == addr(1) {
            sender
                .handle_packet(addr(2), Some(&name(2)), &t.payload, now)
                .unwrap();
        }
    }
    while sender.poll_transmit().is_some() {}
    // Make it probe: the first transmit after a timeout is a ping with piggyback.
    let mut t = now;
    let ping = loop {
        t += Duration::from_millis(10);
        sender.handle_timeout(t);
        if let Some(tr) = sender.poll_transmit()
            && !tr.reliable
        {
            break tr;
        }
    };
    let target = ping.to;
    let target_index = snap.iter().position(|m| m.addr == target).unwrap();
    let mut receiver = new_node(&config, target_index, 3, now);
    receiver.bootstrap(snap.iter().cloned(), now);
    // Warm up, then time.
    for _ in 0..1000 {
        let _ = receiver.handle_packet(addr(1), Some(&name(1)), &ping.payload, t);
        while receiver.poll_transmit().is_some() {}
    }
    let iters = 200_000u32;
    let start = Instant::now();
    for _ in 0..iters {
        receiver
            .handle_packet(addr(1), Some(&name(1)), black_box(&ping.payload), t)
            .unwrap();
        while let Some(tr) = receiver.poll_transmit() {
            black_box(tr);
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(iters);
    report(
        args,
        "handle_ping",
        &[
            ("ns_per_packet", ns),
            ("packet_bytes", ping.payload.len() as f64),
        ],
        "(decode + apply + ack with piggyback)",
    );

    // Gossip fill: a node with 10,000 queued updates sends packets.
    let mut gossiper = new_node(&config, 0, 4, now);
    gossiper.bootstrap(snap.iter().cloned(), now);
    let start = Instant::now();
    let rounds = 2000u32;
    let mut packets = 0u64;
    let mut t = now;
    for _ in 0..rounds {
        t += Duration::from_millis(200);
        gossiper.set_ready(packets.is_multiple_of(2), t);
        gossiper.handle_timeout(t);
        while let Some(tr) = gossiper.poll_transmit() {
            packets += 1;
            black_box(tr);
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / packets as f64;
    report(
        args,
        "timeout_round",
        &[("ns_per_packet_sent", ns)],
        "(timers, probes, gossip, N = 1000)",
    );
}

// ----- memory -----------------------------------------------------------------

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn memory_benches(args: &Args) {
    let now = Instant::now();
    let config = Config {
        view_events: false,
        ..Config::lan()
    };
    let n = 200_000;
    let snap = snapshot(n);
    let nodes_count = 5;
    let before = rss_bytes().unwrap_or(0);
    let mut nodes = Vec::new();
    for k in 0..nodes_count {
        let mut node = new_node(&config, n + k, 5, now);
        node.bootstrap(snap.iter().cloned(), now);
        while node.poll_event().is_some() {}
        nodes.push(node);
    }
    let after = rss_bytes().unwrap_or(0);
    let shared = (after.saturating_sub(before)) as f64 / (n * nodes_count) as f64;
    black_box(&nodes);
    drop(nodes);
    report(
        args,
        "member_record_shared",
        &[("bytes_per_member", shared)],
        "(record + index + probe list; names shared with a snapshot, as in the simulator)",
    );
}

// ----- virtual-time network --------------------------------------------------

/// A packet (source, bytes) or, when `None`, a timer.
type Input = Option<(SocketAddr, Vec<u8>)>;
/// (due, tie-break, node, input, already delayed by a stall)
type Scheduled = (Instant, u64, usize, Input, bool);

/// A discrete-event network of membership nodes.
struct Net {
    nodes: Vec<Membership<SmallRng>>,
    crashed: Vec<bool>,
    armed: Vec<Option<Instant>>,
    /// (due, tie-break, node, packet or timer, already delayed by a stall)
    queue: BinaryHeap<Reverse<Scheduled>>,
    /// One node handling every input late: (node, from, until, delay).
    stall: Option<(usize, Instant, Instant, Duration)>,
    /// Nodes below the split cannot reach those above until this instant.
    partition: Option<(usize, Instant)>,
    seq: u64,
    by_addr: HashMap<SocketAddr, usize>,
    rng: SmallRng,
    loss: f64,
    now: Instant,
    bytes_sent: u64,
}

impl Net {
    fn new(n: usize, config: &Config, seed: u64, start: Instant) -> Net {
        let snap = snapshot(n);
        let nodes: Vec<_> = (0..n)
            .map(|i| {
                let mut node = new_node(config, i, seed, start);
                node.bootstrap(snap.iter().cloned(), start);
                while node.poll_event().is_some() {}
                node
            })
            .collect();
        let mut net = Net {
            crashed: vec![false; n],
            armed: vec![None; n],
            queue: BinaryHeap::new(),
            stall: None,
            partition: None,
            seq: 0,
            by_addr: (0..n).map(|i| (addr(i), i)).collect(),
            rng: SmallRng::seed_from_u64(seed),
            loss: 0.0,
            now: start,
            bytes_sent: 0,
            nodes,
        };
        for i in 0..n {
            net.flush(i);
        }
        net
    }

    fn push(&mut self, at: Instant, node: usize, packet: Input) {
        self.push_event(at, node, packet, false);
    }

    fn push_event(&mut self, at: Instant, node: usize, packet: Input, delayed: bool) {
        self.seq += 1;
        self.queue
            .push(Reverse((at, self.seq, node, packet, delayed)));
    }

    /// Sends what node `i` queued and re-arms its timer.
    fn flush(&mut self, i: usize) {
        let from = addr(i);
        while let Some(t) = self.nodes[i].poll_transmit() {
            self.bytes_sent += t.payload.len() as u64;
            if !t.reliable && self.loss > 0.0 && self.rng.random_bool(self.loss) {
                continue;
            }
            let Some(&to) = self.by_addr.get(&t.to) else {
                continue;
            };
            if let Some((split, until)) = self.partition
                && self.now < until
                && (i < split) != (to < split)
            {
                continue;
            }
            let latency = Duration::from_micros(500 + self.rng.random_range(0..1000));
            let at = self.now + latency;
            self.push(at, to, Some((from, t.payload)));
        }
        // A deadline in the past means "now".
        if let Some(at) = self.nodes[i].poll_timeout().map(|at| at.max(self.now))
            && self.armed[i] != Some(at)
        {
            self.armed[i] = Some(at);
            self.push(at, i, None);
        }
    }

    /// Runs until `until`, calling `watch` after each event with the node touched.
    fn run(&mut self, until: Instant, mut watch: impl FnMut(&mut Self, usize) -> bool) -> bool {
        while let Some(Reverse((at, _, i, packet, delayed))) = self.queue.pop() {
            if at > until {
                self.push_event(at, i, packet, delayed);
                self.now = until;
                return false;
            }
            self.now = at;
            if self.crashed[i] {
                continue;
            }
            if let Some((stalled, from, to, delay)) = self.stall
                && i == stalled
                && !delayed
                && at >= from
                && at < to
            {
                if packet.is_none() {
                    if self.armed[i] != Some(at) {
                        continue;
                    }
                    self.armed[i] = None;
                }
                self.push_event(at + delay, i, packet, true);
                continue;
            }
            match packet {
                Some((from, payload)) => {
                    let sender = name_of(from);
                    let _ = self.nodes[i].handle_packet(from, Some(&sender), &payload, at);
                }
                None => {
                    if !delayed && self.armed[i] != Some(at) {
                        continue; // stale timer entry
                    }
                    self.armed[i] = None;
                    self.nodes[i].handle_timeout(at);
                }
            }
            self.flush(i);
            if watch(self, i) {
                return true;
            }
        }
        false
    }
}

/// Runs 16 lan nodes per seed; crashes node 5 (if `kill`), drops `loss` of
/// the datagrams, stalls node 3 for 30 s by 2 s (if `stall`).
fn faults(args: &Args, label: &str, n: usize, seeds: u64, kill: bool, loss: f64, stall: bool) {
    let config = Config {
        view_events: false,
        ..Config::lan()
    };
    let victim = 5;
    let stalled = 3;
    let mut firsts = Vec::new();
    let mut alls = Vec::new();
    let mut false_positives = 0usize;
    let mut stalled_failed = 0usize;
    let mut idle_bytes = Vec::new();
    for seed in 0..seeds {
        let start = Instant::now();
        let mut net = Net::new(n, &config, seed, start);
        net.loss = loss;
        net.run(start + Duration::from_secs(5), |_, _| false);
        let bytes_before = net.bytes_sent;
        let warm = start + Duration::from_secs(10);
        net.run(warm, |_, _| false);
        idle_bytes.push((net.bytes_sent - bytes_before) as f64 / n as f64 / 5.0);
        let victim_name = name(victim);
        let stalled_name = name(stalled);
        if kill {
            net.crashed[victim] = true;
        }
        if stall {
            net.stall = Some((
                stalled,
                warm,
                warm + Duration::from_secs(30),
                Duration::from_secs(2),
            ));
        }
        let crash = net.now;
        let mut first = None;
        let mut seen = vec![false; n];
        let mut done_at = None;
        net.run(crash + Duration::from_secs(60), |net, i| {
            while let Some(event) = net.nodes[i].poll_event() {
                if let Event::Failed(m) = event {
                    if kill && m.name == victim_name {
                        first.get_or_insert(net.now - crash);
                        seen[i] = true;
                    } else if stall && m.name == stalled_name {
                        stalled_failed += 1;
                    } else {
                        false_positives += 1;
                    }
                }
            }
            if kill && done_at.is_none() && (0..n).all(|j| j == victim || seen[j]) {
                done_at = Some(net.now - crash);
            }
            false
        });
        if let (Some(first), Some(all)) = (first, done_at) {
            firsts.push(first.as_secs_f64());
            alls.push(all.as_secs_f64());
        }
    }
    let mean = |v: &[f64]| {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    let mut fields = vec![
        ("runs", seeds as f64),
        ("false_positives", false_positives as f64),
        ("idle_payload_bytes_per_node_per_s", mean(&idle_bytes)),
    ];
    if kill {
        fields.extend([
            ("detect_first_s_mean", mean(&firsts)),
            ("detect_all_s_mean", mean(&alls)),
            ("detect_all_s_max", max(&alls)),
            ("runs_detected", alls.len() as f64),
        ]);
    }
    if stall {
        fields.push(("stalled_marked_failed", stalled_failed as f64));
    }
    report(
        args,
        label,
        &fields,
        "(virtual seconds, 60 s after the fault)",
    );
}

/// 16 nodes split 8 / 8 for 60 s (longer than gossip to the dead), then
/// healed: time until every node sees all 16 alive again.
fn partition_heal(args: &Args) {
    let config = Config::lan();
    let n = 16;
    let mut heal_times = Vec::new();
    let mut failed_runs = 0;
    for seed in 0..args.seeds {
        let start = Instant::now();
        let mut net = Net::new(n, &config, seed, start);
        net.run(start + Duration::from_secs(10), |_, _| false);
        let heal = net.now + Duration::from_secs(60);
        net.partition = Some((n / 2, heal));
        net.run(heal, |_, _| false);
        let split_ok = net.nodes.iter().all(|m| m.num_live() == n / 2);
        let mut healed_at = None;
        net.run(heal + Duration::from_secs(300), |net, _| {
            while net.nodes.iter_mut().any(|m| m.poll_event().is_some()) {}
            if net.nodes.iter().all(|m| m.num_live() == n) {
                healed_at = Some(net.now - heal);
                return true;
            }
            false
        });
        match (split_ok, healed_at) {
            (true, Some(d)) => heal_times.push(d.as_secs_f64()),
            _ => failed_runs += 1,
        }
    }
    let mean = if heal_times.is_empty() {
        f64::NAN
    } else {
        heal_times.iter().sum::<f64>() / heal_times.len() as f64
    };
    let max = heal_times.iter().copied().fold(f64::NAN, f64::max);
    report(
        args,
        "partition_heal_16_lan",
        &[
            ("heal_s_mean", mean),
            ("heal_s_max", max),
            ("runs", args.seeds as f64),
            ("runs_not_split_or_not_healed", failed_runs as f64),
        ],
        "(virtual seconds after a 60 s 8/8 partition ends)",
    );
}

fn update(args: &Args) {
    let config = Config {
        view_events: false,
        ..Config::lan()
    };
    let n = args.nodes;
    let start = Instant::now();
    let mut net = Net::new(n, &config, 42, start);
    let warm = start + Duration::from_secs(5);
    net.run(warm, |_, _| false);
    let bytes_before = net.bytes_sent;
    let t0 = net.now;
    net.nodes[0].set_metadata(b"v2".to_vec(), t0).unwrap();
    net.flush(0);
    let target = ((n as f64) * 0.9999).ceil() as usize;
    let mut reached = 1usize;
    let mut seen = vec![false; n];
    seen[0] = true;
    let mut at_9999 = None;
    let wall = Instant::now();
    net.run(t0 + Duration::from_secs(30), |net, i| {
        if !seen[i]
            && net.nodes[i]
                .member(&name(0))
                .is_some_and(|m| &*m.metadata == b"v2")
        {
            seen[i] = true;
            reached += 1;
            if reached >= target && at_9999.is_none() {
                at_9999 = Some(net.now - t0);
            }
        }
        reached == n
    });
    let elapsed = (net.now - t0).as_secs_f64();
    let bytes = (net.bytes_sent - bytes_before) as f64 / n as f64 / elapsed.max(1e-9);
    report(
        args,
        &format!("update_{n}_lan"),
        &[
            (
                "converge_9999_s",
                at_9999.map_or(f64::NAN, |d| d.as_secs_f64()),
            ),
            (
                "converge_all_s",
                if reached == n { elapsed } else { f64::NAN },
            ),
            ("bytes_per_node_per_s", bytes),
            ("wall_s", wall.elapsed().as_secs_f64()),
        ],
        "(virtual seconds; payload bytes)",
    );
}

fn main() {
    let args = parse_args();
    cpu_benches(&args);
    memory_benches(&args);
    faults(&args, "kill_one_16_lan", 16, args.seeds, true, 0.0, false);
    faults(
        &args,
        "kill_one_16_lan_loss10",
        16,
        args.seeds,
        true,
        0.1,
        false,
    );
    faults(&args, "stalled_16_lan", 16, args.seeds, false, 0.0, true);
    faults(&args, "kill_one_1000_lan", 1000, 1, true, 0.0, false);
    partition_heal(&args);
    update(&args);
}
