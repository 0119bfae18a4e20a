//! Feeds arbitrary bytes to a node that knows a few members, as packets from
//! the network: nothing may panic, and a rejected packet must change nothing.

#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use shoal_membership::{Config, LocalNode, Member, MemberState, Membership};

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let local = LocalNode {
        name: "fuzz".into(),
        generation: 7,
        addr: SocketAddr::from(([127, 0, 0, 1], 7000)),
        ready: true,
        metadata: Vec::new(),
    };
    let Ok(mut node) = Membership::new(Config::lan(), local, SmallRng::seed_from_u64(1), now)
    else {
        return;
    };
    let snapshot = (0..4u16).map(|i| Member {
        name: Arc::from(format!("m{i}")),
        generation: 1,
        addr: SocketAddr::from(([127, 0, 0, 1], 7001 + i)),
        incarnation: 1,
        state: MemberState::Alive,
        ready: true,
        metadata: Arc::from(&[][..]),
    });
    node.bootstrap(snapshot, now);
    // The input may hold several packets: split on a length prefix byte.
    let mut rest = data;
    let mut t = now;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (packet, tail) = tail.split_at(len);
        rest = tail;
        let before: Vec<Member> = node.members().cloned().collect();
        if node
            .handle_packet(SocketAddr::from(([127, 0, 0, 1], 7001)), Some("m0"), packet, t)
            .is_err()
        {
            let after: Vec<Member> = node.members().cloned().collect();
            assert_eq!(before, after, "a rejected packet changed the member table");
        }
        t += Duration::from_millis(37);
        node.handle_timeout(t);
        while node.poll_transmit().is_some() {}
        while node.poll_event().is_some() {}
    }
    // Also the whole input as one packet (covers large push-pull states).
    let _ = node.handle_packet(SocketAddr::from(([127, 0, 0, 1], 7002)), None, data, t);
    // The amplification case: what a few hundred bytes of zstd decompress
    // to (the transport allows ratio 1,024 on the membership channel): the
    // input repeated up to 4 MiB, as one packet. `-timeout` bounds the CPU
    // it may cost, `-rss_limit_mb` the memory.
    if let Some((&pick, unit)) = data.split_first()
        && pick == 0xA5
        && !unit.is_empty()
    {
        let big: Vec<u8> = unit.iter().copied().cycle().take(4 << 20).collect();
        let _ = node.handle_packet(SocketAddr::from(([127, 0, 0, 1], 7003)), None, &big, t);
    }
});
