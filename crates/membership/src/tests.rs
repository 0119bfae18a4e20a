//! Unit tests of the protocol rules, driving one node with crafted packets,
//! and a tiny in-memory cluster on a virtual clock.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;

use crate::wire::{self, Accusation, Alive, Message, Ping, PushPull, State, WireState};
use crate::{
    Config, DecodeError, Error, Event, LocalNode, Member, MemberState, Membership, Transmit,
};

type Node = Membership<SmallRng>;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn local(name: &str, port: u16) -> LocalNode {
    LocalNode {
        name: name.into(),
        generation: 100,
        addr: addr(port),
        ready: false,
        metadata: Vec::new(),
    }
}

fn node_with(config: Config, name: &str, port: u16, now: Instant) -> Node {
    Membership::new(
        config,
        local(name, port),
        SmallRng::seed_from_u64(u64::from(port)),
        now,
    )
    .unwrap()
}

/// The timings these tests compute their figures for: `Config::lan()` with a
/// 200 ms probe interval, a 100 ms probe timeout and suspicion multiplier 4
/// (the `lan` profile until it probed every 100 ms). The tests check the
/// protocol's mechanics, not the default profile's values.
fn timing() -> Config {
    Config {
        probe_interval: Duration::from_millis(200),
        probe_timeout: Duration::from_millis(100),
        suspicion_mult: 4,
        ..Config::lan()
    }
}

fn node(now: Instant) -> Node {
    node_with(timing(), "me", 1, now)
}

fn packet(msgs: &[Message<'_>]) -> Vec<u8> {
    let mut buf = wire::new_packet(256);
    for msg in msgs {
        wire::encode(msg, &mut buf);
    }
    buf
}

fn alive(name: &str, generation: u64, incarnation: u64, port: u16) -> Message<'_> {
    Message::Alive(Alive {
        name,
        generation,
        incarnation,
        addr: addr(port),
        ready: false,
        metadata: &[],
    })
}

fn suspect<'a>(name: &'a str, generation: u64, incarnation: u64, from: &'a str) -> Message<'a> {
    Message::Suspect(Accusation {
        name,
        generation,
        incarnation,
        from,
    })
}

fn dead<'a>(name: &'a str, generation: u64, incarnation: u64, from: &'a str) -> Message<'a> {
    Message::Dead(Accusation {
        name,
        generation,
        incarnation,
        from,
    })
}

/// Delivers `msgs` as sent by their natural authors (`author`): what the
/// precedence tests feed a node is what its subject said first-hand.
/// Consecutive messages of one author (and the push-pull states, acks and
/// requests after them) go in one packet, each other author's in its own.
fn deliver(node: &mut Node, msgs: &[Message<'_>], now: Instant) {
    let mut start = 0;
    while start < msgs.len() {
        let first = author(&msgs[start..=start]);
        let mut end = start + 1;
        while end < msgs.len() {
            let next = author(&msgs[end..=end]);
            if next.is_some() && next != first {
                break;
            }
            end += 1;
        }
        deliver_as(node, first, &msgs[start..end], now);
        start = end;
    }
}

/// Delivers `msgs` from a peer the transport authenticated as `sender`.
fn deliver_as(node: &mut Node, sender: Option<&str>, msgs: &[Message<'_>], now: Instant) {
    node.handle_packet(addr(9999), sender, &packet(msgs), now)
        .unwrap();
}

/// Who would have sent these messages: the pinger, the push-pull's sender,
/// the member an `Alive` is about, the accuser of a suspicion or verdict.
fn author<'a>(msgs: &[Message<'a>]) -> Option<&'a str> {
    msgs.iter().find_map(|msg| match *msg {
        Message::Ping(p) => Some(p.from),
        Message::PushPull(h) => Some(h.from),
        Message::Alive(a) => Some(a.name),
        Message::Suspect(a) | Message::Dead(a) => Some(a.from),
        Message::State(_)
        | Message::IndirectPing(_)
        | Message::Ack(_)
        | Message::Nack(_)
        | Message::AliveRequest => None,
    })
}

/// The name of the member `node` knows at `at` (who answers a ping sent
/// there).
fn name_at(node: &Node, at: SocketAddr) -> Option<String> {
    node.members()
        .find(|m| m.addr == at)
        .map(|m| m.name.to_string())
}

/// A ping to "me" (generation 100) from `from`.
fn ping_from<'a>(
    seq: u32,
    from: &'a str,
    from_generation: u64,
    from_incarnation: u64,
) -> Message<'a> {
    Message::Ping(Ping {
        seq,
        target: "me",
        generation: 100,
        reliable: false,
        from,
        from_generation,
        from_incarnation,
    })
}

fn drain_events(node: &mut Node) -> Vec<Event> {
    std::iter::from_fn(|| node.poll_event()).collect()
}

fn drain_transmits(node: &mut Node) -> Vec<Transmit> {
    std::iter::from_fn(|| node.poll_transmit()).collect()
}

fn state_of(node: &Node, name: &str) -> Option<(MemberState, u64)> {
    node.member(name).map(|m| (m.state, m.incarnation))
}

/// All messages of every transmit.
fn sent_messages(transmits: &[Transmit]) -> Vec<Message<'_>> {
    transmits
        .iter()
        .flat_map(|t| wire::Messages::new(&t.payload))
        .collect()
}

// ----- precedence -----------------------------------------------------------

#[test]
fn alive_needs_strictly_higher_incarnation() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 5, 2)], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Alive, 5)));
    let events = drain_events(&mut n);
    assert!(matches!(&events[0], Event::Joined(m) if &*m.name == "x"));
    // Equal or lower incarnation: ignored (no change of metadata either).
    let meta = b"new";
    let same = Message::Alive(Alive {
        name: "x",
        generation: 1,
        incarnation: 5,
        addr: addr(2),
        ready: true,
        metadata: meta,
    });
    deliver(&mut n, &[same, alive("x", 1, 4, 2)], now);
    assert!(!n.member("x").unwrap().ready);
    // Higher: applied, Updated reported.
    let higher = Message::Alive(Alive {
        name: "x",
        generation: 1,
        incarnation: 6,
        addr: addr(2),
        ready: true,
        metadata: meta,
    });
    drain_events(&mut n);
    deliver(&mut n, &[higher], now);
    let x = n.member("x").unwrap();
    assert!(x.ready);
    assert_eq!(&*x.metadata, meta);
    let events = drain_events(&mut n);
    assert!(matches!(&events[0], Event::Updated(m) if m.ready));
    assert!(matches!(&events[1], Event::ViewChanged(v) if v.len() == 2));
}

#[test]
fn suspect_applies_at_equal_incarnation_and_alive_refutes_only_higher() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 5, 2)], now);
    deliver(&mut n, &[suspect("x", 1, 4, "y")], now);
    assert_eq!(
        state_of(&n, "x"),
        Some((MemberState::Alive, 5)),
        "lower incarnation ignored"
    );
    deliver(&mut n, &[suspect("x", 1, 5, "y")], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Suspect, 5)));
    deliver(&mut n, &[alive("x", 1, 5, 2)], now);
    assert_eq!(
        state_of(&n, "x"),
        Some((MemberState::Suspect, 5)),
        "equal alive does not refute"
    );
    drain_events(&mut n);
    deliver(&mut n, &[alive("x", 1, 6, 2)], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Alive, 6)));
    let events = drain_events(&mut n);
    assert!(matches!(&events[0], Event::Alive(m) if m.incarnation == 6));
}

#[test]
fn dead_overrides_suspect_and_is_not_resurrected_without_higher_incarnation() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 5, 2), suspect("x", 1, 5, "y")], now);
    deliver(&mut n, &[dead("x", 1, 4, "y")], now);
    assert_eq!(
        state_of(&n, "x"),
        Some((MemberState::Suspect, 5)),
        "lower dead ignored"
    );
    drain_events(&mut n);
    deliver(&mut n, &[dead("x", 1, 5, "y")], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Dead, 5)));
    let events = drain_events(&mut n);
    assert!(matches!(&events[0], Event::Failed(m) if &*m.name == "x"));
    assert!(matches!(&events[1], Event::ViewChanged(v) if v.len() == 1));
    deliver(&mut n, &[alive("x", 1, 5, 2), suspect("x", 1, 5, "z")], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Dead, 5)));
    deliver(&mut n, &[alive("x", 1, 6, 2)], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Alive, 6)));
    assert_eq!(n.num_live(), 2);
}

#[test]
fn dead_from_the_member_itself_is_a_leave() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 1, 2), alive("y", 1, 1, 3)], now);
    drain_events(&mut n);
    deliver(&mut n, &[dead("x", 1, 1, "x"), dead("y", 1, 1, "me")], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Left, 1)));
    assert_eq!(state_of(&n, "y"), Some((MemberState::Dead, 1)));
    let events = drain_events(&mut n);
    assert!(matches!(&events[0], Event::Left(m) if &*m.name == "x"));
    assert!(matches!(&events[1], Event::Failed(m) if &*m.name == "y"));
    // A left member rejoining with a higher incarnation is a join.
    deliver(&mut n, &[alive("x", 1, 2, 2)], now);
    let events = drain_events(&mut n);
    assert!(matches!(&events[0], Event::Joined(m) if &*m.name == "x"));
}

#[test]
fn updates_about_unknown_members_are_ignored_except_alive() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(
        &mut n,
        &[suspect("ghost", 1, 1, "y"), dead("ghost", 1, 1, "y")],
        now,
    );
    assert!(n.member("ghost").is_none());
    assert_eq!(n.stats().ignored_updates, 2);
}

// ----- generations and conflicts --------------------------------------------

#[test]
fn new_generation_supersedes_and_old_generation_is_stale() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 9, 2)], now);
    drain_events(&mut n);
    deliver(&mut n, &[alive("x", 2, 0, 3)], now);
    let x = n.member("x").unwrap();
    assert_eq!((x.generation, x.incarnation, x.addr), (2, 0, addr(3)));
    let events = drain_events(&mut n);
    assert!(matches!(&events[0], Event::Failed(m) if m.generation == 1));
    assert!(matches!(&events[1], Event::Joined(m) if m.generation == 2));
    // Anything about generation 1 is now stale.
    deliver(
        &mut n,
        &[
            alive("x", 1, 50, 2),
            suspect("x", 1, 50, "y"),
            dead("x", 1, 50, "y"),
        ],
        now,
    );
    assert_eq!(state_of(&n, "x"), Some((MemberState::Alive, 0)));
    assert_eq!(n.member("x").unwrap().generation, 2);
    // A new generation replaces a dead record too, without a Failed event.
    deliver(&mut n, &[dead("x", 2, 0, "y")], now);
    drain_events(&mut n);
    deliver(&mut n, &[alive("x", 3, 0, 4)], now);
    let events = drain_events(&mut n);
    assert!(matches!(&events[0], Event::Joined(m) if m.generation == 3));
    assert_eq!(n.num_live(), 2);
}

#[test]
fn name_conflict_between_live_processes_is_resolved_by_address() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 1, 5)], now);
    drain_events(&mut n);
    // Same generation, lower address: the existing claimant keeps the name.
    deliver(&mut n, &[alive("x", 1, 7, 4)], now);
    assert_eq!(n.member("x").unwrap().addr, addr(5));
    let events = drain_events(&mut n);
    assert!(
        matches!(&events[0], Event::NameConflict { winner, loser, local_lost: false, .. }
        if winner.addr == addr(5) && loser.addr == addr(4))
    );
    // Higher address: takes the name.
    deliver(&mut n, &[alive("x", 1, 0, 6)], now);
    assert_eq!(n.member("x").unwrap().addr, addr(6));
    assert_eq!(n.stats().name_conflicts, 2);
}

#[test]
fn local_node_losing_its_name_goes_passive_and_reports_it() {
    let now = Instant::now();
    let mut n = node(now);
    drain_events(&mut n);
    deliver(&mut n, &[alive("me", 101, 0, 7)], now);
    let events = drain_events(&mut n);
    assert!(
        matches!(&events[0], Event::NameConflict { local_lost: true, winner, .. } if winner.generation == 101)
    );
    assert_eq!(events[1], Event::DeclaredFailed);
    assert!(n.is_superseded());
    assert_eq!(n.poll_timeout(), None);
    assert_eq!(n.local().state, MemberState::Dead);
    // Passive: answers nothing.
    drain_transmits(&mut n);
    deliver(
        &mut n,
        &[Message::Ping(Ping {
            seq: 1,
            target: "me",
            generation: 100,
            reliable: false,
            from: "x",
            from_generation: 1,
            from_incarnation: 1,
        })],
        now,
    );
    assert!(n.poll_transmit().is_none());
}

#[test]
fn local_node_keeps_its_name_against_an_older_or_lower_claimant() {
    let now = Instant::now();
    let mut n = node(now);
    drain_transmits(&mut n);
    drain_events(&mut n);
    // An older generation of ours: re-announce ourselves, no conflict.
    deliver(&mut n, &[alive("me", 99, 40, 1)], now);
    assert!(drain_events(&mut n).is_empty());
    // Same generation, lower address: we win and say so.
    deliver(&mut n, &[alive("me", 100, 3, 0)], now);
    let events = drain_events(&mut n);
    assert!(matches!(
        &events[0],
        Event::NameConflict {
            local_lost: false,
            ..
        }
    ));
    assert!(!n.is_superseded());
}

// ----- refutation and self-fencing -------------------------------------------

#[test]
fn suspicion_about_self_is_refuted_with_higher_incarnation() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 1, 2)], now);
    drain_transmits(&mut n);
    deliver(&mut n, &[suspect("me", 100, 0, "x")], now);
    assert_eq!(n.local().incarnation, 1);
    assert_eq!(n.stats().refutations, 1);
    assert_eq!(n.awareness(), 1, "refuting counts against local health");
    // Stale suspicion (lower incarnation) is ignored.
    deliver(&mut n, &[suspect("me", 100, 0, "x")], now);
    assert_eq!(n.local().incarnation, 1);
    // A higher one is refuted above it.
    deliver(&mut n, &[suspect("me", 100, 7, "x")], now);
    assert_eq!(n.local().incarnation, 8);
    assert!(!drain_events(&mut n).contains(&Event::DeclaredFailed));
}

#[test]
fn declared_dead_is_reported_then_refuted() {
    let now = Instant::now();
    let mut n = node(now);
    drain_events(&mut n);
    deliver(&mut n, &[dead("me", 100, 0, "x")], now);
    assert_eq!(drain_events(&mut n), vec![Event::DeclaredFailed]);
    assert_eq!(n.local().incarnation, 1);
    assert_eq!(n.local().state, MemberState::Alive);
    assert_eq!(n.stats().declared_failed, 1);
}

#[test]
fn buddy_ping_refutation_rides_on_the_ack() {
    let now = Instant::now();
    let mut n = node(now);
    drain_transmits(&mut n);
    let ping = Message::Ping(Ping {
        seq: 42,
        target: "me",
        generation: 100,
        reliable: false,
        from: "x",
        from_generation: 1,
        from_incarnation: 1,
    });
    deliver(&mut n, &[ping, suspect("me", 100, 0, "x")], now);
    let transmits = drain_transmits(&mut n);
    assert_eq!(transmits.len(), 1);
    let msgs = sent_messages(&transmits);
    assert_eq!(msgs[0], Message::Ack(42));
    assert!(
        msgs.iter()
            .any(|m| matches!(m, Message::Alive(a) if a.name == "me" && a.incarnation == 1)),
        "{msgs:?}"
    );
}

#[test]
fn ping_for_other_name_or_older_generation_is_not_acked() {
    let now = Instant::now();
    let mut n = node(now);
    drain_transmits(&mut n);
    for (target, generation) in [("other", 100), ("me", 99), ("me", 101)] {
        deliver(
            &mut n,
            &[Message::Ping(Ping {
                seq: 1,
                target,
                generation,
                reliable: false,
                from: "x",
                from_generation: 1,
                from_incarnation: 1,
            })],
            now,
        );
    }
    // Not acked; the older generation is told ours (our alive), nothing else.
    let transmits = drain_transmits(&mut n);
    let msgs = sent_messages(&transmits);
    assert!(
        msgs.iter()
            .all(|m| matches!(m, Message::Alive(a) if a.name == "me" && a.generation == 100)),
        "{msgs:?}"
    );
    // A reliable ping is answered on the reliable path.
    deliver(
        &mut n,
        &[Message::Ping(Ping {
            seq: 2,
            target: "me",
            generation: 100,
            reliable: true,
            from: "x",
            from_generation: 1,
            from_incarnation: 1,
        })],
        now,
    );
    let transmits = drain_transmits(&mut n);
    assert!(transmits[0].reliable);
    assert_eq!(sent_messages(&transmits)[0], Message::Ack(2));
}

// ----- suspicion timer --------------------------------------------------------

/// A node that knows `n` alive members named m0..m{n-1}.
fn node_knowing(n: usize, now: Instant) -> Node {
    let mut node = node(now);
    let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        deliver(&mut node, &[alive(name, 1, 1, 1000 + i as u16)], now);
    }
    drain_events(&mut node);
    node
}

/// Runs the node until `name` is dead; every other member acks its pings.
fn time_to_dead(node: &mut Node, name: &str, start: Instant) -> Duration {
    let mut t = start;
    while node.member(name).unwrap().state != MemberState::Dead {
        t += Duration::from_millis(1);
        node.handle_timeout(t);
        let transmits = drain_transmits(node);
        for transmit in &transmits {
            for msg in wire::Messages::new(&transmit.payload) {
                if let Message::Ping(ping) = msg
                    && ping.target != name
                {
                    deliver_as(node, Some(ping.target), &[Message::Ack(ping.seq)], t);
                }
            }
        }
        assert!(t - start < Duration::from_secs(60), "never declared dead");
    }
    t - start
}

#[test]
fn suspicion_times_out_at_max_without_confirmations() {
    let now = Instant::now();
    // 15 members + this node: N = 16, min = 4 × log10(16) × 200 ms = 963 ms,
    // max = 6 × min.
    let mut n = node_knowing(15, now);
    // This node is the first accuser, so its own failing probes of m3 add no
    // confirmation; m3 never answers.
    deliver(&mut n, &[suspect("m3", 1, 1, "me")], now);
    let took = time_to_dead(&mut n, "m3", now);
    // max = 5,779 ms, then one last-chance ping and a probe interval (200 ms).
    assert!(took.as_millis().abs_diff(5779 + 200) <= 2, "{took:?}");
    assert_eq!(n.stats().suspicion_checks, 1);
}

#[test]
fn unconfirmed_suspicion_pings_the_suspect_before_declaring_it_dead() {
    let now = Instant::now();
    let mut n = node_knowing(15, now);
    deliver(&mut n, &[suspect("m3", 1, 1, "m1")], now);
    drain_transmits(&mut n);
    // Expiry at max (5,779 ms) sends a ping carrying the suspicion to m3.
    let at = now + Duration::from_millis(5780);
    n.handle_timeout(at);
    assert_eq!(state_of(&n, "m3"), Some((MemberState::Suspect, 1)));
    let transmits = drain_transmits(&mut n);
    let to_m3: Vec<&Transmit> = transmits.iter().filter(|t| t.to == addr(1003)).collect();
    assert_eq!(to_m3.len(), 2, "unreliable and reliable");
    let msgs: Vec<_> = wire::Messages::new(&to_m3[0].payload).collect();
    let Message::Ping(ping) = msgs[0] else {
        panic!("{msgs:?}")
    };
    assert!(matches!(msgs[1], Message::Suspect(a) if a.name == "m3" && a.from == "me"));
    // m3 answers: ack plus its refutation. No failure, not a stray ack.
    n.handle_packet(
        addr(1003),
        Some("m3"),
        &packet(&[Message::Ack(ping.seq), alive("m3", 1, 2, 1003)]),
        at,
    )
    .unwrap();
    n.handle_timeout(at + Duration::from_secs(1));
    assert_eq!(state_of(&n, "m3"), Some((MemberState::Alive, 2)));
    assert_eq!(n.stats().stray_acks, 0);
    assert_eq!(n.stats().failures, 0);
}

#[test]
fn confirmed_suspicion_expires_without_a_last_check() {
    let now = Instant::now();
    let mut n = node_knowing(15, now);
    deliver(
        &mut n,
        &[
            suspect("m3", 1, 1, "m1"),
            suspect("m3", 1, 1, "m2"),
            suspect("m3", 1, 1, "m4"),
        ],
        now,
    );
    n.handle_timeout(now + Duration::from_millis(964));
    assert_eq!(state_of(&n, "m3"), Some((MemberState::Dead, 1)));
    assert_eq!(n.stats().suspicion_checks, 0);
}

#[test]
fn suspicion_shrinks_with_independent_confirmations() {
    let now = Instant::now();
    let mut n = node_knowing(15, now);
    deliver(&mut n, &[suspect("m3", 1, 1, "m1")], now);
    // The same accuser twice counts once; two others confirm: k = 2 → min.
    deliver(&mut n, &[suspect("m3", 1, 1, "m1")], now);
    deliver(&mut n, &[suspect("m3", 1, 1, "m2")], now);
    deliver(&mut n, &[suspect("m3", 1, 1, "m4")], now);
    let took = time_to_dead(&mut n, "m3", now);
    assert!(took.as_millis().abs_diff(963) <= 2, "{took:?}");
    let events = drain_events(&mut n);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Failed(m) if &*m.name == "m3"))
    );
    assert_eq!(n.stats().failures, 1);
}

#[test]
fn suspicion_with_one_confirmation_is_between_min_and_max() {
    let now = Instant::now();
    let mut n = node_knowing(15, now);
    deliver(
        &mut n,
        &[suspect("m3", 1, 1, "me"), suspect("m3", 1, 1, "m2")],
        now,
    );
    let took = time_to_dead(&mut n, "m3", now);
    // max − (max − min) × ln 2 / ln 3 with min = 963.2 ms, max = 5779 ms,
    // then the last-chance ping (1 confirmation < k = 2) and 200 ms.
    assert!(took.as_millis().abs_diff(2741 + 200) <= 3, "{took:?}");
}

#[test]
fn small_cluster_expects_no_confirmations() {
    let now = Instant::now();
    // N = 3: k = mult − 2 = 2 > N − 2 = 1, so k = 0 and min applies at once.
    let mut n = node_knowing(2, now);
    deliver(&mut n, &[suspect("m0", 1, 1, "m1")], now);
    let took = time_to_dead(&mut n, "m0", now);
    // ...plus the last-chance ping: one accuser alone never suffices.
    assert!(took.as_millis().abs_diff(800 + 200) <= 2, "{took:?}");
}

// ----- dissemination -----------------------------------------------------------

/// Runs `n` in 10 ms steps from `from` until no broadcast is pending (at
/// most 2 s), dropping what it sends; returns the time it got there.
fn drain_broadcasts(n: &mut Node, from: Instant) -> Instant {
    let mut t = from;
    for _ in 0..200 {
        t += Duration::from_millis(10);
        n.handle_timeout(t);
        drain_transmits(n);
        if n.pending_broadcasts() == 0 {
            break;
        }
    }
    assert_eq!(n.pending_broadcasts(), 0);
    t
}

#[test]
fn updates_are_retransmitted_up_to_the_limit() {
    let now = Instant::now();
    // N = 16 → limit 4 × ceil(log10 17) = 8.
    let mut n = node_knowing(15, now);
    // Let the joins' own re-broadcasts drain first.
    let mut t = drain_broadcasts(&mut n, now);
    n.set_metadata(b"hello".to_vec(), t).unwrap();
    let mut carried = 0;
    for _ in 0..200 {
        t += Duration::from_millis(10);
        n.handle_timeout(t);
        let transmits = drain_transmits(&mut n);
        carried += sent_messages(&transmits)
            .iter()
            .filter(|m| matches!(m, Message::Alive(a) if a.name == "me" && a.metadata == b"hello"))
            .count();
    }
    assert_eq!(carried, 8);
    assert_eq!(n.pending_broadcasts(), 0);
}

/// When the first packet carrying a suspicion of `name` leaves `n`, after
/// `at`, driven in 1 ms steps for up to `within`.
fn first_gossip_of_suspicion(
    n: &mut Node,
    name: &str,
    at: Instant,
    within: Duration,
) -> Option<Duration> {
    let mut t = at;
    while t - at <= within {
        n.handle_timeout(t);
        let transmits = drain_transmits(n);
        if sent_messages(&transmits)
            .iter()
            .any(|m| matches!(m, Message::Suspect(s) if s.name == name))
        {
            return Some(t - at);
        }
        t += Duration::from_millis(1);
    }
    None
}

#[test]
fn news_goes_out_without_waiting_for_the_gossip_interval() {
    let now = Instant::now();
    let mut n = node_knowing(15, now);
    // Drain the joins' broadcasts: the round that sent the last of them
    // has just gone out.
    let t = drain_broadcasts(&mut n, now);
    // A suspicion heard right after a round: relayed at the news gap
    // (200 ms / 4 = 50 ms after that round), not at the next periodic round
    // 200 ms later.
    deliver(&mut n, &[suspect("m3", 1, 1, "m7")], t);
    let took = first_gossip_of_suspicion(&mut n, "m3", t, Duration::from_secs(1));
    let took = took.expect("the suspicion was never gossiped");
    assert!(took <= Duration::from_millis(50), "{took:?}");
    // Once the news is out, rounds are periodic again: a second suspicion
    // heard at once waits for the news gap after that round, so rounds go
    // out at most four times per gossip interval.
    let round = t + took;
    deliver(&mut n, &[suspect("m4", 1, 1, "m7")], round);
    let took = first_gossip_of_suspicion(&mut n, "m4", round, Duration::from_secs(1));
    let took = took.expect("the second suspicion was never gossiped");
    assert_eq!(took, Duration::from_millis(50));
}

#[test]
fn packets_stay_within_the_size_bound_with_many_updates_queued() {
    let now = Instant::now();
    let mut n = node(now);
    let meta = vec![7u8; 512];
    let names: Vec<String> = (0..500)
        .map(|i| format!("member-with-a-longish-name-{i}"))
        .collect();
    for (i, name) in names.iter().enumerate() {
        let msg = Message::Alive(Alive {
            name,
            generation: 1,
            incarnation: 1,
            addr: addr(2000 + i as u16),
            ready: true,
            metadata: &meta,
        });
        n.handle_packet(addr(9999), author(&[msg]), &packet(&[msg]), now)
            .unwrap();
    }
    assert!(n.pending_broadcasts() > 400);
    let mut t = now;
    let mut sent = 0;
    for _ in 0..100 {
        t += Duration::from_millis(50);
        n.handle_timeout(t);
        for transmit in drain_transmits(&mut n) {
            if !transmit.reliable {
                assert!(transmit.payload.len() <= 1150, "{}", transmit.payload.len());
                sent += 1;
            } else {
                assert!(transmit.payload.len() <= timing().max_state_size);
            }
        }
    }
    assert!(sent > 10);
}

#[test]
fn probe_of_a_suspect_carries_the_suspicion() {
    let now = Instant::now();
    let mut n = node_knowing(1, now);
    deliver(&mut n, &[suspect("m0", 1, 1, "zz")], now);
    drain_transmits(&mut n);
    let mut t = now;
    let mut found = false;
    for _ in 0..100 {
        t += Duration::from_millis(10);
        n.handle_timeout(t);
        let transmits = drain_transmits(&mut n);
        let msgs = sent_messages(&transmits);
        if let Some(pos) = msgs
            .iter()
            .position(|m| matches!(m, Message::Ping(p) if p.target == "m0"))
        {
            assert!(
                matches!(msgs.get(pos + 1), Some(Message::Suspect(a)) if a.name == "m0" && a.from == "me")
            );
            found = true;
            break;
        }
    }
    assert!(found);
}

// ----- metadata and ready -------------------------------------------------------

#[test]
fn metadata_over_the_limit_is_an_error_and_changes_nothing() {
    let now = Instant::now();
    let mut n = node(now);
    drain_events(&mut n);
    let before = n.local().clone();
    let err = n.set_metadata(vec![0; 513], now).unwrap_err();
    assert_eq!(err, Error::MetadataTooLarge { len: 513, max: 512 });
    assert_eq!(n.local(), &before);
    assert!(drain_events(&mut n).is_empty());
    n.set_metadata(vec![1; 512], now).unwrap();
    assert_eq!(n.local().incarnation, 1);
    // Construction refuses too.
    let mut big = local("a", 3);
    big.metadata = vec![0; 600];
    let r = Membership::new(timing(), big, SmallRng::seed_from_u64(1), now);
    assert!(matches!(r, Err(Error::MetadataTooLarge { len: 600, .. })));
    let r = Membership::new(timing(), local("", 3), SmallRng::seed_from_u64(1), now);
    assert!(matches!(r, Err(Error::InvalidName { len: 0, .. })));
}

#[test]
fn ready_change_raises_incarnation_and_reports() {
    let now = Instant::now();
    let mut n = node(now);
    drain_events(&mut n);
    n.set_ready(true, now);
    n.set_ready(true, now);
    assert_eq!(n.local().incarnation, 1);
    let events = drain_events(&mut n);
    assert!(matches!(&events[0], Event::Updated(m) if m.ready));
    assert!(matches!(&events[1], Event::ViewChanged(v) if v[0].ready));
    assert_eq!(events.len(), 2);
}

// ----- view events ---------------------------------------------------------------

#[test]
fn view_changed_is_coalesced_and_carries_the_newest_view() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(
        &mut n,
        &[
            alive("a", 1, 1, 2),
            alive("b", 1, 1, 3),
            alive("c", 1, 1, 4),
        ],
        now,
    );
    deliver(&mut n, &[dead("c", 1, 1, "c")], now);
    let events = drain_events(&mut n);
    let views: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, Event::ViewChanged(_)))
        .collect();
    assert_eq!(views.len(), 1);
    let Event::ViewChanged(view) = views[0] else {
        unreachable!()
    };
    let names: HashSet<&str> = view.iter().map(|m| &*m.name).collect();
    assert_eq!(names, HashSet::from(["me", "a", "b"]));
    assert!(matches!(events.last(), Some(Event::ViewChanged(_))));
    // Suspicion does not change the view.
    deliver(&mut n, &[suspect("a", 1, 1, "b")], now);
    let events = drain_events(&mut n);
    assert_eq!(events.len(), 1);
    assert!(matches!(&events[0], Event::Suspected(_)));
}

#[test]
fn event_queue_is_bounded() {
    let now = Instant::now();
    let config = Config {
        max_queued_events: 4,
        view_events: false,
        ..timing()
    };
    let mut n = node_with(config, "me", 1, now);
    let names: Vec<String> = (0..10).map(|i| format!("n{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        deliver(&mut n, &[alive(name, 1, 1, 10 + i as u16)], now);
    }
    let events = drain_events(&mut n);
    assert_eq!(events.len(), 4);
    assert!(matches!(&events[0], Event::Joined(m) if &*m.name == "n6"));
    assert_eq!(n.stats().events_dropped, 6);
}

// ----- push-pull -----------------------------------------------------------------

fn state<'a>(name: &'a str, incarnation: u64, port: u16, state: WireState) -> Message<'a> {
    Message::State(State {
        member: Alive {
            name,
            generation: 1,
            incarnation,
            addr: addr(port),
            ready: false,
            metadata: &[],
        },
        state,
    })
}

#[test]
fn push_pull_merges_remote_dead_as_suspect() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 3, 2)], now);
    let header = Message::PushPull(PushPull {
        from: "peer",
        join: false,
        reply: true,
    });
    drain_transmits(&mut n);
    deliver(
        &mut n,
        &[
            header,
            state("peer", 1, 9, WireState::Alive),
            state("x", 3, 2, WireState::Dead),
            state("gone", 1, 4, WireState::Dead),
            state("bye", 1, 5, WireState::Left),
        ],
        now,
    );
    assert_eq!(state_of(&n, "x"), Some((MemberState::Suspect, 3)));
    assert_eq!(state_of(&n, "peer"), Some((MemberState::Alive, 1)));
    // Unknown dead and left members are not recorded on a third party's
    // word (a tombstone at a high generation would bar the name): refused,
    // counted.
    assert_eq!(state_of(&n, "gone"), None);
    assert_eq!(state_of(&n, "bye"), None);
    assert_eq!(n.stats().unknown_down_refused, 2);
    let events = drain_events(&mut n);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::Failed(_) | Event::Left(_)))
    );
    // It answered with its own full state, reliably.
    let transmits = drain_transmits(&mut n);
    let reply = transmits
        .iter()
        .find(|t| t.reliable && t.to == addr(9999))
        .unwrap();
    let msgs: Vec<_> = wire::Messages::new(&reply.payload).collect();
    assert!(matches!(
        msgs[0],
        Message::PushPull(PushPull { reply: false, .. })
    ));
    // Itself, the peer and x (not the refused tombstones).
    assert_eq!(msgs.len(), 1 + 3);
}

#[test]
fn push_pull_saying_we_are_dead_is_declared_failed() {
    let now = Instant::now();
    let mut n = node(now);
    drain_events(&mut n);
    let header = Message::PushPull(PushPull {
        from: "peer",
        join: false,
        reply: false,
    });
    let mut buf = wire::new_packet(64);
    wire::encode(&header, &mut buf);
    wire::encode(
        &Message::State(State {
            member: Alive {
                name: "me",
                generation: 100,
                incarnation: 0,
                addr: addr(1),
                ready: false,
                metadata: &[],
            },
            state: WireState::Dead,
        }),
        &mut buf,
    );
    n.handle_packet(addr(5), Some("peer"), &buf, now).unwrap();
    assert_eq!(drain_events(&mut n), vec![Event::DeclaredFailed]);
    assert_eq!(n.local().incarnation, 1);
}

#[test]
fn state_is_truncated_to_max_state_size() {
    let now = Instant::now();
    let config = Config {
        max_state_size: 2000,
        ..timing()
    };
    let mut n = node_with(config, "me", 1, now);
    let names: Vec<String> = (0..200).map(|i| format!("member-{i:04}")).collect();
    for (i, name) in names.iter().enumerate() {
        deliver(&mut n, &[alive(name, 1, 1, 2000 + i as u16)], now);
    }
    drain_transmits(&mut n);
    n.join(&[addr(7)], now);
    let transmits = drain_transmits(&mut n);
    let join = transmits.iter().find(|t| t.reliable).unwrap();
    assert!(join.payload.len() <= 2000);
    assert_eq!(n.stats().states_truncated, 1);
    let msgs: Vec<_> = wire::Messages::new(&join.payload).collect();
    assert!(matches!(
        msgs[1],
        Message::State(State {
            member: Alive { name: "me", .. },
            ..
        })
    ));
}

// ----- reaping and leaving -------------------------------------------------------

#[test]
fn dead_and_left_members_are_reaped_after_the_configured_time() {
    let now = Instant::now();
    let config = Config {
        reap_after: Duration::from_secs(10),
        ..timing()
    };
    let mut n = node_with(config, "me", 1, now);
    deliver(&mut n, &[alive("x", 1, 1, 2), alive("y", 1, 1, 3)], now);
    deliver(&mut n, &[dead("x", 1, 1, "z")], now);
    deliver(
        &mut n,
        &[dead("y", 1, 1, "y")],
        now + Duration::from_secs(5),
    );
    n.handle_timeout(now + Duration::from_secs(9));
    assert!(n.member("x").is_some());
    n.handle_timeout(now + Duration::from_secs(10));
    assert!(n.member("x").is_none());
    assert!(n.member("y").is_some());
    // Refuted in between: y's reap is cancelled.
    deliver(
        &mut n,
        &[alive("y", 1, 2, 3)],
        now + Duration::from_secs(12),
    );
    n.handle_timeout(now + Duration::from_secs(20));
    assert_eq!(state_of(&n, "y"), Some((MemberState::Alive, 2)));
    assert_eq!(n.stats().reaped, 1);
    // The slot is reused by a newcomer.
    deliver(
        &mut n,
        &[alive("w", 1, 1, 4)],
        now + Duration::from_secs(21),
    );
    assert_eq!(n.members().count(), 3);
}

#[test]
fn leave_announces_left_and_stops_probing() {
    let now = Instant::now();
    let mut n = node_knowing(3, now);
    drain_transmits(&mut n);
    n.leave(now);
    assert_eq!(n.local().state, MemberState::Left);
    let events = drain_events(&mut n);
    assert!(matches!(&events[0], Event::Left(m) if &*m.name == "me"));
    assert!(matches!(&events[1], Event::ViewChanged(v) if v.len() == 3));
    let transmits = drain_transmits(&mut n);
    assert!(
        sent_messages(&transmits)
            .iter()
            .any(|m| matches!(m, Message::Dead(a) if a.name == "me" && a.from == "me"))
    );
    // Keeps gossiping the leave, never probes again.
    let mut t = now;
    for _ in 0..100 {
        t += Duration::from_millis(50);
        n.handle_timeout(t);
        let transmits = drain_transmits(&mut n);
        assert!(
            !sent_messages(&transmits)
                .iter()
                .any(|m| matches!(m, Message::Ping(_)))
        );
    }
    assert_eq!(n.pending_broadcasts(), 0);
    // A death verdict about a left node is not refuted.
    deliver(&mut n, &[dead("me", 100, 0, "m1")], t);
    assert!(drain_events(&mut n).is_empty());
}

// ----- bad input -----------------------------------------------------------------

#[test]
fn bad_packets_are_counted_and_change_nothing() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 1, 2)], now);
    drain_events(&mut n);
    drain_transmits(&mut n);
    let before: Vec<Member> = n.members().cloned().collect();
    // A valid update followed by garbage: nothing applied.
    let mut bad = packet(&[alive("x", 1, 5, 2)]);
    bad.push(0xee);
    assert!(matches!(
        n.handle_packet(addr(3), None, &bad, now),
        Err(DecodeError::Malformed { index: 1, .. })
    ));
    assert_eq!(
        n.handle_packet(addr(3), None, &[], now),
        Err(DecodeError::Empty)
    );
    assert_eq!(
        n.handle_packet(addr(3), None, &[2, 0], now),
        Err(DecodeError::Version(2))
    );
    let huge = vec![wire::VERSION; (4 << 20) + 1];
    assert!(matches!(
        n.handle_packet(addr(3), None, &huge, now),
        Err(DecodeError::TooLarge { .. })
    ));
    assert_eq!(n.stats().decode_errors, 4);
    let after: Vec<Member> = n.members().cloned().collect();
    assert_eq!(before, after);
    assert!(drain_events(&mut n).is_empty());
    assert!(n.poll_transmit().is_none());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
    #[test]
    fn random_packets_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..1300), header in proptest::bool::ANY) {
        let now = Instant::now();
        let mut n = node_knowing(3, now);
        let mut bytes = bytes;
        if header {
            bytes.insert(0, wire::VERSION);
        }
        let before: Vec<Member> = n.members().cloned().collect();
        if n.handle_packet(addr(3), None, &bytes, now).is_err() {
            let after: Vec<Member> = n.members().cloned().collect();
            proptest::prop_assert_eq!(before, after);
        }
        n.handle_timeout(now + Duration::from_secs(1));
    }
}

// ----- awareness -------------------------------------------------------------------

#[test]
fn failed_probes_without_nacks_raise_awareness_and_slow_probing() {
    let now = Instant::now();
    let mut n = node_knowing(5, now);
    drain_transmits(&mut n);
    let mut t = now;
    let mut pings = Vec::new();
    // Nobody answers anything: every probe fails with no nacks.
    for _ in 0..3000 {
        t += Duration::from_millis(10);
        n.handle_timeout(t);
        drain_transmits(&mut n);
        let probes = n.stats().probes;
        if probes > pings.len() as u64 {
            pings.push(t);
        }
    }
    assert_eq!(n.awareness(), 7);
    let gaps: Vec<Duration> = pings.windows(2).map(|w| w[1] - w[0]).collect();
    let last = *gaps.last().unwrap();
    assert_eq!(
        last,
        Duration::from_millis(1600),
        "probe interval × (7 + 1)"
    );
    assert!(gaps[0] < Duration::from_millis(300));
}

// ----- a small cluster on a virtual clock ------------------------------------------

/// (observer, member name, member generation).
type SeenKey = (usize, Arc<str>, u64);

/// Nodes exchanging packets in memory with 1 ms latency.
struct Cluster {
    nodes: Vec<Node>,
    crashed: HashSet<usize>,
    now: Instant,
    in_flight: Vec<(Instant, usize, SocketAddr, Vec<u8>)>,
    failed: Vec<(usize, Arc<str>, Duration)>,
    start: Instant,
    /// Loss probability of unreliable packets, drawn from `rng`.
    loss: f64,
    rng: SmallRng,
    /// Per (observer, member name, generation): last incarnation seen in an
    /// event, and the incarnation it was declared dead at.
    seen: std::collections::HashMap<SeenKey, (u64, Option<u64>)>,
    violations: Vec<String>,
}

impl Cluster {
    fn new(n: usize, config: Config) -> Cluster {
        let start = Instant::now();
        let nodes: Vec<Node> = (0..n)
            .map(|i| node_with(config.clone(), &format!("n{i}"), 100 + i as u16, start))
            .collect();
        let mut cluster = Cluster {
            nodes,
            crashed: HashSet::new(),
            now: start,
            in_flight: Vec::new(),
            failed: Vec::new(),
            start,
            loss: 0.0,
            rng: SmallRng::seed_from_u64(n as u64),
            seen: std::collections::HashMap::new(),
            violations: Vec::new(),
        };
        let seed = cluster.nodes[0].local().addr;
        for i in 1..n {
            cluster.nodes[i].join(&[seed], start);
        }
        cluster
    }

    /// Incarnations only grow; a member declared dead comes back only with a
    /// higher incarnation (or as a new generation, a different key).
    fn observe(&mut self, observer: usize, event: &Event) {
        let (m, dead) = match event {
            Event::Joined(m) | Event::Updated(m) | Event::Suspected(m) | Event::Alive(m) => {
                (m, false)
            }
            Event::Failed(m) => (m, true),
            _ => return,
        };
        let key = (observer, Arc::clone(&m.name), m.generation);
        let entry = self.seen.entry(key).or_insert((m.incarnation, None));
        if m.incarnation < entry.0 {
            self.violations.push(format!(
                "n{observer}: {} incarnation went {} -> {}",
                m.name, entry.0, m.incarnation
            ));
        }
        if !dead && entry.1.is_some_and(|at| m.incarnation <= at) {
            self.violations.push(format!(
                "n{observer}: {} resurrected at incarnation {}",
                m.name, m.incarnation
            ));
        }
        entry.0 = entry.0.max(m.incarnation);
        if dead {
            entry.1 = Some(m.incarnation);
        } else if entry.1.is_some_and(|at| m.incarnation > at) {
            entry.1 = None;
        }
    }

    fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        self.nodes.iter().position(|n| n.local().addr == addr)
    }

    fn run(&mut self, duration: Duration) {
        let end = self.now + duration;
        while self.now < end {
            self.now += Duration::from_millis(1);
            let now = self.now;
            // Deliver what arrived.
            let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.in_flight)
                .into_iter()
                .partition(|(at, ..)| *at <= now);
            self.in_flight = later;
            for (_, to, from, payload) in due {
                if !self.crashed.contains(&to) {
                    let sender = self
                        .index_of(from)
                        .map(|i| Arc::clone(&self.nodes[i].local().name));
                    self.nodes[to]
                        .handle_packet(from, sender.as_deref(), &payload, now)
                        .unwrap();
                }
            }
            for i in 0..self.nodes.len() {
                if self.crashed.contains(&i) {
                    continue;
                }
                if self.nodes[i].poll_timeout().is_some_and(|at| at <= now) {
                    self.nodes[i].handle_timeout(now);
                }
                let from = self.nodes[i].local().addr;
                while let Some(t) = self.nodes[i].poll_transmit() {
                    if !t.reliable
                        && self.loss > 0.0
                        && rand::Rng::random_bool(&mut self.rng, self.loss)
                    {
                        continue;
                    }
                    if let Some(to) = self.index_of(t.to) {
                        self.in_flight
                            .push((now + Duration::from_millis(1), to, from, t.payload));
                    }
                }
                while let Some(event) = self.nodes[i].poll_event() {
                    self.observe(i, &event);
                    if let Event::Failed(m) = event {
                        self.failed.push((i, m.name, now - self.start));
                    }
                }
            }
        }
    }

    fn all_see(&self, name: &str, state: MemberState) -> bool {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.crashed.contains(i))
            .all(|(_, n)| n.member(name).is_some_and(|m| m.state == state))
    }
}

#[test]
fn cluster_converges_without_false_positives() {
    let mut c = Cluster::new(8, timing());
    c.run(Duration::from_secs(60));
    for n in &c.nodes {
        assert_eq!(n.num_live(), 8, "{} sees {}", n.local().name, n.num_live());
        assert_eq!(n.stats().suspicions, 0);
    }
    assert!(c.failed.is_empty(), "{:?}", c.failed);
}

#[test]
fn cluster_detects_a_crash_quickly() {
    let mut c = Cluster::new(8, timing());
    c.run(Duration::from_secs(5));
    c.crashed.insert(3);
    let crash = c.now;
    let mut detected = None;
    for _ in 0..100 {
        c.run(Duration::from_millis(100));
        if c.all_see("n3", MemberState::Dead) {
            detected = Some(c.now - crash);
            break;
        }
    }
    let detected = detected.expect("crash never detected by everyone");
    eprintln!(
        "detected by all after {detected:?}; probes {}",
        c.nodes[0].stats().probes
    );
    // N = 8: min = 4 × 1 × 200 ms = 800 ms plus probing and gossip.
    assert!(detected < Duration::from_secs(3), "{detected:?}");
    assert!(
        c.failed.iter().all(|(_, name, _)| &**name == "n3"),
        "{:?}",
        c.failed
    );
    c.run(Duration::from_secs(5));
    for (i, n) in c.nodes.iter().enumerate() {
        if i != 3 {
            assert_eq!(n.num_live(), 7);
        }
    }
}

#[test]
fn cluster_sees_a_leave_as_left() {
    let mut c = Cluster::new(6, timing());
    c.run(Duration::from_secs(5));
    let now = c.now;
    c.nodes[2].leave(now);
    c.run(Duration::from_secs(2));
    assert!(c.all_see("n2", MemberState::Left));
    assert!(c.failed.is_empty(), "{:?}", c.failed);
    assert_eq!(c.nodes[2].pending_broadcasts(), 0);
}

#[test]
fn cluster_accepts_a_restarted_generation() {
    let mut c = Cluster::new(5, timing());
    c.run(Duration::from_secs(5));
    // n4 restarts: same name and address, new generation.
    let now = c.now;
    let mut restarted = local("n4", 104);
    restarted.generation = 200;
    c.nodes[4] = Membership::new(timing(), restarted, SmallRng::seed_from_u64(77), now).unwrap();
    let seed = c.nodes[0].local().addr;
    c.nodes[4].join(&[seed], now);
    c.run(Duration::from_secs(3));
    for n in &c.nodes {
        let m = n.member("n4").unwrap();
        assert_eq!(
            (m.generation, m.state),
            (200, MemberState::Alive),
            "at {}",
            n.local().name
        );
        assert_eq!(n.num_live(), 5);
    }
}

#[test]
fn bootstrap_builds_a_view_without_events_or_gossip() {
    let now = Instant::now();
    let mut n = node(now);
    drain_events(&mut n);
    let name: Arc<str> = Arc::from("x");
    let snapshot = vec![
        Member {
            name: Arc::clone(&name),
            generation: 1,
            addr: addr(2),
            incarnation: 3,
            state: MemberState::Alive,
            ready: true,
            metadata: Arc::from(&b"m"[..]),
        },
        Member {
            name: Arc::from("d"),
            generation: 1,
            addr: addr(3),
            incarnation: 1,
            state: MemberState::Dead,
            ready: false,
            metadata: Arc::from(&[][..]),
        },
        Member {
            name: Arc::from("me"),
            generation: 100,
            addr: addr(1),
            incarnation: 50,
            state: MemberState::Dead,
            ready: false,
            metadata: Arc::from(&[][..]),
        },
    ];
    let pending = n.pending_broadcasts();
    n.bootstrap(snapshot, now);
    assert_eq!(n.pending_broadcasts(), pending);
    assert_eq!(n.num_live(), 2);
    assert_eq!(state_of(&n, "d"), Some((MemberState::Dead, 1)));
    assert_eq!(n.local().incarnation, 0);
    // The name is shared with the snapshot, not copied.
    assert!(Arc::ptr_eq(&n.member("x").unwrap().name, &name));
    let events = drain_events(&mut n);
    assert_eq!(events.len(), 1);
    assert!(matches!(&events[0], Event::ViewChanged(v) if v.len() == 2));
}

// ----- a node that wakes late -----------------------------------------------------

#[test]
fn late_wakeup_grants_one_probe_interval_before_declaring_dead() {
    let now = Instant::now();
    let mut n = node_knowing(15, now);
    deliver(&mut n, &[suspect("m3", 1, 1, "me")], now);
    // The suspicion is due after max = 5.78 s; this node sleeps until 8 s.
    let late = now + Duration::from_secs(8);
    n.handle_timeout(late);
    assert_eq!(
        state_of(&n, "m3"),
        Some((MemberState::Suspect, 1)),
        "graced, not dead"
    );
    // The refutation that was waiting in its input arrives: no failure.
    deliver(&mut n, &[alive("m3", 1, 2, 1003)], late);
    n.handle_timeout(late + Duration::from_secs(1));
    assert_eq!(state_of(&n, "m3"), Some((MemberState::Alive, 2)));
    // Without a refutation the verdict comes one probe interval later.
    deliver(&mut n, &[suspect("m4", 1, 1, "me")], late);
    let later_still = late + Duration::from_secs(20);
    n.handle_timeout(later_still);
    assert_eq!(state_of(&n, "m4"), Some((MemberState::Suspect, 1)));
    n.handle_timeout(later_still + Duration::from_millis(199));
    assert_eq!(state_of(&n, "m4"), Some((MemberState::Suspect, 1)));
    n.handle_timeout(later_still + Duration::from_millis(200));
    assert_eq!(state_of(&n, "m4"), Some((MemberState::Dead, 1)));
}

#[test]
fn confirmation_moving_the_deadline_into_the_past_is_not_lateness() {
    let now = Instant::now();
    let mut n = node_knowing(15, now);
    deliver(&mut n, &[suspect("m3", 1, 1, "me")], now);
    // Two confirmations 2 s later: the deadline (start + min = 963 ms) is
    // already past, and the member is declared dead at the next timeout.
    let t = now + Duration::from_secs(2);
    deliver(
        &mut n,
        &[suspect("m3", 1, 1, "m1"), suspect("m3", 1, 1, "m2")],
        t,
    );
    n.handle_timeout(t);
    assert_eq!(state_of(&n, "m3"), Some((MemberState::Dead, 1)));
}

#[test]
fn late_direct_timeout_still_gives_relays_their_window() {
    let now = Instant::now();
    let mut n = node_knowing(5, now);
    drain_transmits(&mut n);
    // Find the first probe (witness pings are pings too, not probes).
    let mut t = now;
    let ping_at = loop {
        t += Duration::from_millis(1);
        n.handle_timeout(t);
        drain_transmits(&mut n);
        if n.stats().probes > 0 {
            break t;
        }
    };
    // Asleep past the whole probe period (200 ms): the indirect probes go
    // out now, and the probe fails only a relay window (100 ms) later.
    let woke = ping_at + Duration::from_millis(500);
    n.handle_timeout(woke);
    let msgs = drain_transmits(&mut n);
    assert!(
        sent_messages(&msgs)
            .iter()
            .any(|m| matches!(m, Message::IndirectPing(_)))
    );
    assert_eq!(n.stats().probes_failed, 0);
    n.handle_timeout(woke + Duration::from_millis(99));
    assert_eq!(n.stats().probes_failed, 0);
    n.handle_timeout(woke + Duration::from_millis(100));
    assert_eq!(n.stats().probes_failed, 1);
}

#[test]
fn refutation_goes_straight_to_the_accuser_once() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 1, 2), alive("y", 1, 1, 3)], now);
    drain_transmits(&mut n);
    deliver(&mut n, &[suspect("me", 100, 0, "x")], now);
    let transmits = drain_transmits(&mut n);
    let to_x: Vec<_> = transmits.iter().filter(|t| t.to == addr(2)).collect();
    assert_eq!(to_x.len(), 1);
    let msgs: Vec<_> = wire::Messages::new(&to_x[0].payload).collect();
    assert!(matches!(msgs[0], Message::Alive(a) if a.name == "me" && a.incarnation == 1));
    // The same stale accusation again (e.g. via another gossip path): x was
    // already told at this incarnation.
    deliver(&mut n, &[suspect("me", 100, 0, "x")], now);
    assert!(drain_transmits(&mut n).is_empty());
    // Another accuser of the already refuted incarnation is told too.
    deliver(&mut n, &[suspect("me", 100, 0, "y")], now);
    let transmits = drain_transmits(&mut n);
    assert_eq!(transmits.len(), 1);
    assert_eq!(transmits[0].to, addr(3));
    assert_eq!(n.local().incarnation, 1);
    assert_eq!(n.stats().direct_refutations, 2);
}

#[test]
fn a_dead_member_that_answers_a_reconnect_ping_gets_a_push_pull() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 1, 2), dead("x", 1, 1, "y")], now);
    drain_transmits(&mut n);
    let mut t = now;
    let seq = loop {
        t += Duration::from_millis(10);
        assert!(t - now < Duration::from_secs(3), "no reconnect ping");
        n.handle_timeout(t);
        let transmits = drain_transmits(&mut n);
        let ping = transmits
            .iter()
            .filter(|tr| tr.to == addr(2))
            .flat_map(|tr| wire::Messages::new(&tr.payload))
            .find_map(|m| match m {
                Message::Ping(p) if p.target == "x" => Some(p.seq),
                _ => None,
            });
        if let Some(seq) = ping {
            break seq;
        }
    };
    n.handle_packet(
        addr(2),
        name_at(&n, addr(2)).as_deref(),
        &packet(&[Message::Ack(seq)]),
        t,
    )
    .unwrap();
    let transmits = drain_transmits(&mut n);
    assert_eq!(transmits.len(), 1);
    assert!(transmits[0].reliable && transmits[0].to == addr(2));
    assert!(matches!(
        wire::Messages::new(&transmits[0].payload).next(),
        Some(Message::PushPull(PushPull { reply: true, .. }))
    ));
    assert_eq!(n.stats().reconnects, 1);
    // Still dead until it refutes.
    assert_eq!(state_of(&n, "x"), Some((MemberState::Dead, 1)));
}

#[test]
fn push_pull_relaying_a_suspicion_does_not_confirm_it() {
    let now = Instant::now();
    let mut n = node_knowing(15, now);
    deliver(&mut n, &[suspect("m3", 1, 1, "me")], now);
    // Two members push their state, in which m3 is suspect (they only relay
    // our own suspicion): no confirmation, the timer stays at max.
    for sender in ["m1", "m2"] {
        let header = Message::PushPull(PushPull {
            from: sender,
            join: false,
            reply: false,
        });
        deliver(
            &mut n,
            &[header, state("m3", 1, 1003, WireState::Suspect)],
            now,
        );
    }
    n.handle_timeout(now + Duration::from_millis(5000));
    assert_eq!(state_of(&n, "m3"), Some((MemberState::Suspect, 1)));
    // The same accusations as gossip (their own probes failed) do confirm.
    let t = now + Duration::from_millis(5000);
    deliver(
        &mut n,
        &[suspect("m3", 1, 1, "m1"), suspect("m3", 1, 1, "m2")],
        t,
    );
    n.handle_timeout(t + Duration::from_millis(1));
    assert_eq!(state_of(&n, "m3"), Some((MemberState::Dead, 1)));
}

#[test]
fn ack_asks_an_unknown_or_newer_pinger_for_its_alive() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 1, 2)], now);
    drain_transmits(&mut n);
    // Unknown pinger, newer incarnation, newer generation: ask.
    for (seq, from, generation, incarnation) in [(1, "z", 1, 0), (2, "x", 1, 2), (3, "x", 2, 0)] {
        deliver(
            &mut n,
            &[ping_from(seq, from, generation, incarnation)],
            now,
        );
        let transmits = drain_transmits(&mut n);
        let msgs = sent_messages(&transmits)
            .into_iter()
            .filter(|m| matches!(m, Message::Ack(_) | Message::AliveRequest))
            .collect::<Vec<_>>();
        assert_eq!(
            msgs,
            vec![Message::Ack(seq), Message::AliveRequest],
            "{from} {generation} {incarnation}"
        );
    }
    // Up to date: nothing extra.
    deliver(&mut n, &[ping_from(4, "x", 1, 1)], now);
    let transmits = drain_transmits(&mut n);
    let msgs = sent_messages(&transmits);
    assert!(!msgs.contains(&Message::AliveRequest));
    assert_eq!(n.stats().alive_requests, 3);
    // Asked ourselves: answer with our alive.
    deliver(&mut n, &[Message::AliveRequest], now);
    let transmits = drain_transmits(&mut n);
    assert_eq!(transmits[0].to, addr(9999));
    assert!(matches!(sent_messages(&transmits)[0], Message::Alive(a) if a.name == "me"));
}

#[test]
fn ack_tells_a_pinger_we_hold_dead_so_it_refutes() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 3, 2), dead("x", 1, 3, "y")], now);
    drain_transmits(&mut n);
    deliver(&mut n, &[ping_from(9, "x", 1, 3)], now);
    let transmits = drain_transmits(&mut n);
    let msgs = sent_messages(&transmits);
    assert_eq!(msgs[0], Message::Ack(9));
    assert!(
        matches!(msgs[1], Message::Dead(a) if a.name == "x" && a.incarnation == 3 && a.from == "me")
    );
    // Its refutation (higher incarnation) brings it back.
    deliver(&mut n, &[alive("x", 1, 4, 2)], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Alive, 4)));
}

#[test]
fn a_verdict_about_an_incarnation_already_refuted_does_not_fence() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 1, 2), alive("y", 1, 1, 3)], now);
    drain_events(&mut n);
    drain_transmits(&mut n);
    // Suspected at 0, refuted to 1; meanwhile y declared us dead at 0.
    deliver(&mut n, &[suspect("me", 100, 0, "x")], now);
    assert_eq!(n.local().incarnation, 1);
    assert!(drain_events(&mut n).is_empty());
    drain_transmits(&mut n);
    deliver(&mut n, &[dead("me", 100, 0, "y")], now);
    assert!(
        drain_events(&mut n).is_empty(),
        "refuted already: no DeclaredFailed"
    );
    assert_eq!(
        n.local().incarnation,
        1,
        "already refuted: no new incarnation"
    );
    // The refutation goes straight to the accuser, which revives us.
    let transmits = drain_transmits(&mut n);
    assert!(
        transmits.iter().any(|t| t.to == addr(3)
            && wire::Messages::new(&t.payload)
                .any(|m| matches!(m, Message::Alive(a) if a.name == "me" && a.incarnation == 1))),
        "{transmits:?}"
    );
    assert_eq!(n.stats().declared_failed, 0);
}

#[test]
fn a_verdict_at_the_current_incarnation_fences_once_per_accuser() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 1, 2)], now);
    drain_events(&mut n);
    // Declared dead at 0, our incarnation: never answered, so its author
    // may have taken our datums over. Reported and refuted.
    deliver(&mut n, &[dead("me", 100, 0, "y")], now);
    assert_eq!(drain_events(&mut n), vec![Event::DeclaredFailed]);
    assert_eq!(n.local().incarnation, 1);
    // The same verdict again (another gossip copy): no second signal.
    deliver(&mut n, &[dead("me", 100, 0, "y")], now);
    assert!(drain_events(&mut n).is_empty());
    // Another accuser at the same, now refuted, incarnation: no signal.
    deliver(&mut n, &[dead("me", 100, 0, "z")], now);
    assert!(drain_events(&mut n).is_empty());
    // A new verdict at the current incarnation: reported and refuted.
    deliver(&mut n, &[dead("me", 100, 1, "z")], now);
    assert_eq!(drain_events(&mut n), vec![Event::DeclaredFailed]);
    assert_eq!(n.local().incarnation, 2);
    // Our own leave message echoed back is not a verdict; a different
    // generation is not about us.
    deliver(&mut n, &[dead("me", 99, 5, "z")], now);
    assert!(drain_events(&mut n).is_empty());
}

/// The death-verdict messages about x in transmits to x (port 2).
fn verdicts_to_x(transmits: &[Transmit]) -> Vec<u64> {
    transmits
        .iter()
        .filter(|t| t.to == addr(2))
        .flat_map(|t| wire::Messages::new(&t.payload))
        .filter_map(|m| match m {
            Message::Dead(a) if a.name == "x" => Some(a.incarnation),
            _ => None,
        })
        .collect()
}

#[test]
fn reviving_a_member_after_the_takeover_delay_tells_it_at_its_new_incarnation() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 3, 2), dead("x", 1, 3, "me")], now);
    drain_transmits(&mut n);
    // Our verdict stood for the takeover delay: its datums were taken. The
    // notice is at the incarnation it announced, which it cannot refute
    // away: it fences.
    let late = now + n.takeover_delay();
    deliver(&mut n, &[alive("x", 1, 4, 2)], late);
    assert_eq!(verdicts_to_x(&drain_transmits(&mut n)), vec![u64::MAX]);
}

#[test]
fn the_takeover_delay_counts_from_the_suspicion_behind_the_verdict() {
    let now = Instant::now();
    let verdict = now + Duration::from_millis(800);
    let suspected_then_dead = || {
        let mut n = node(now);
        deliver(&mut n, &[alive("x", 1, 3, 2), suspect("x", 1, 3, "y")], now);
        deliver(&mut n, &[dead("x", 1, 3, "z")], verdict);
        drain_transmits(&mut n);
        n
    };
    // x answered nothing since the suspicion started here: the gate takes
    // it over the takeover delay after that start, before the delay after
    // the verdict has passed; a revival from then on is told so.
    let mut n = suspected_then_dead();
    let taken = now + n.takeover_delay();
    assert!(taken < verdict + n.takeover_delay());
    let mut m = suspected_then_dead();
    deliver(
        &mut m,
        &[alive("x", 1, 4, 2)],
        taken - Duration::from_millis(1),
    );
    assert!(verdicts_to_x(&drain_transmits(&mut m)).is_empty());
    deliver(&mut n, &[alive("x", 1, 4, 2)], taken);
    assert_eq!(verdicts_to_x(&drain_transmits(&mut n)), vec![u64::MAX]);

    // A suspicion at an older incarnation (x refuted it, then was accused
    // again) says nothing about the later one: the delay counts from the
    // verdict.
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 3, 2), suspect("x", 1, 3, "y")], now);
    deliver(&mut n, &[dead("x", 1, 4, "z")], verdict);
    drain_transmits(&mut n);
    let at = now + n.takeover_delay();
    deliver(&mut n, &[alive("x", 1, 5, 2)], at);
    assert!(verdicts_to_x(&drain_transmits(&mut n)).is_empty());
}

#[test]
fn reviving_a_member_within_the_takeover_delay_tells_it_nothing() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 3, 2), dead("x", 1, 3, "me")], now);
    drain_transmits(&mut n);
    // Withdrawn before anything was taken over: nothing to fence for.
    let early = now + n.takeover_delay() - Duration::from_millis(1);
    deliver(&mut n, &[alive("x", 1, 4, 2)], early);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Alive, 4)));
    assert!(verdicts_to_x(&drain_transmits(&mut n)).is_empty());
    // With no lease (`Off`), every verdict is acted on at once.
    let config = Config {
        lease: crate::LeaseStrategy::Off,
        ..timing()
    };
    let mut n = node_with(config, "me", 1, now);
    deliver(&mut n, &[alive("x", 1, 3, 2), dead("x", 1, 3, "me")], now);
    drain_transmits(&mut n);
    deliver(&mut n, &[alive("x", 1, 4, 2)], now);
    assert_eq!(verdicts_to_x(&drain_transmits(&mut n)), vec![u64::MAX]);
}

#[test]
fn an_acted_on_notice_fences_without_a_refutation_and_is_not_a_verdict_for_others() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 1, 2)], now);
    drain_events(&mut n);
    // We refuted to 3 long ago; y acted on an older verdict: it says so.
    deliver(&mut n, &[suspect("me", 100, 2, "x")], now);
    assert_eq!(n.local().incarnation, 3);
    deliver(&mut n, &[dead("me", 100, u64::MAX, "y")], now);
    assert_eq!(drain_events(&mut n), vec![Event::DeclaredFailed]);
    assert_eq!(n.local().incarnation, 3, "nothing to refute");
    deliver(&mut n, &[dead("me", 100, u64::MAX, "y")], now);
    assert!(drain_events(&mut n).is_empty(), "once per accuser");
    // About someone else, it is no verdict.
    deliver(&mut n, &[dead("x", 1, u64::MAX, "y")], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Alive, 1)));
}

#[test]
fn a_ping_for_an_older_generation_is_answered_with_our_alive() {
    let now = Instant::now();
    let mut n = node(now);
    drain_transmits(&mut n);
    let old = Message::Ping(Ping {
        seq: 5,
        target: "me",
        generation: 99,
        reliable: false,
        from: "x",
        from_generation: 1,
        from_incarnation: 0,
    });
    deliver(&mut n, &[old], now);
    let transmits = drain_transmits(&mut n);
    let msgs = sent_messages(&transmits);
    assert!(
        !msgs.iter().any(|m| matches!(m, Message::Ack(_))),
        "not acked"
    );
    assert!(
        transmits.iter().any(|t| t.to == addr(9999)
            && wire::Messages::new(&t.payload)
                .any(|m| matches!(m, Message::Alive(a) if a.name == "me" && a.generation == 100))),
        "{transmits:?}"
    );
}

#[test]
fn push_pull_listing_a_live_member_as_dead_tells_that_member() {
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 3, 2)], now);
    drain_transmits(&mut n);
    let header = Message::PushPull(PushPull {
        from: "peer",
        join: false,
        reply: false,
    });
    deliver(&mut n, &[header, state("x", 3, 2, WireState::Dead)], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Suspect, 3)));
    let transmits = drain_transmits(&mut n);
    let to_x: Vec<Message<'_>> = transmits
        .iter()
        .filter(|t| t.to == addr(2))
        .flat_map(|t| wire::Messages::new(&t.payload))
        .collect();
    assert!(
        to_x.iter()
            .any(|m| matches!(m, Message::Dead(a) if a.name == "x" && a.from == "peer")),
        "{to_x:?}"
    );
}

#[test]
fn a_join_request_through_us_does_not_end_our_own_join() {
    let now = Instant::now();
    let mut n = node(now);
    n.join(&[addr(50)], now);
    drain_transmits(&mut n);
    // Another node joins through us (a push-pull request).
    let request = Message::PushPull(PushPull {
        from: "newcomer",
        join: true,
        reply: true,
    });
    deliver(
        &mut n,
        &[request, state("newcomer", 0, 60, WireState::Alive)],
        now,
    );
    drain_transmits(&mut n);
    // Our seed is still retried.
    let mut retried = false;
    for step in 1..=300 {
        n.handle_timeout(now + Duration::from_millis(10 * step));
        if drain_transmits(&mut n)
            .iter()
            .any(|t| t.reliable && t.to == addr(50))
        {
            retried = true;
            break;
        }
    }
    assert!(retried);
    // An answer from a node that is not one of our seeds (say the newcomer,
    // answering our periodic push-pull) does not end it either.
    let other = Message::PushPull(PushPull {
        from: "newcomer",
        join: false,
        reply: false,
    });
    let t0 = now + Duration::from_secs(3);
    n.handle_packet(
        addr(60),
        Some("newcomer"),
        &packet(&[other, state("newcomer", 0, 60, WireState::Alive)]),
        t0,
    )
    .unwrap();
    drain_transmits(&mut n);
    let mut retried = false;
    for step in 1..=300 {
        n.handle_timeout(t0 + Duration::from_millis(10 * step));
        if drain_transmits(&mut n)
            .iter()
            .any(|t| t.reliable && t.to == addr(50))
        {
            retried = true;
            break;
        }
    }
    assert!(retried, "join ended by a non-seed");
    // An answer from the seed ends it.
    let answer = Message::PushPull(PushPull {
        from: "seed",
        join: false,
        reply: false,
    });
    let t = now + Duration::from_secs(5);
    n.handle_packet(
        addr(50),
        Some("seed"),
        &packet(&[answer, state("seed", 0, 50, WireState::Alive)]),
        t,
    )
    .unwrap();
    for step in 1..=1000 {
        n.handle_timeout(t + Duration::from_millis(100 * step));
        assert!(
            !drain_transmits(&mut n)
                .iter()
                .any(|tr| tr.to == addr(50) && tr.reliable && {
                    matches!(
                        wire::Messages::new(&tr.payload).next(),
                        Some(Message::PushPull(PushPull { join: true, .. }))
                    )
                }),
            "join retried after an answer"
        );
    }
}

#[test]
fn revived_member_hears_the_verdict_until_a_probe_carrying_it_is_acked() {
    let start = Instant::now();
    let mut n = node(start);
    deliver(&mut n, &[alive("x", 1, 3, 2), dead("x", 1, 3, "me")], start);
    // Revived after the takeover delay: it must hear of the verdict.
    let now = start + n.takeover_delay();
    deliver(&mut n, &[alive("x", 1, 4, 2)], now);
    let transmits = drain_transmits(&mut n);
    assert!(
        transmits.iter().any(|t| t.reliable && t.to == addr(2)),
        "told reliably"
    );
    let is_notice = |m: &Message<'_>| matches!(m, Message::Dead(a) if a.name == "x" && a.incarnation == u64::MAX);
    // Every ack to its pings carries the verdict (delivery is not known).
    for seq in 0..5 {
        deliver(&mut n, &[ping_from(seq, "x", 1, 4)], now);
        let transmits = drain_transmits(&mut n);
        assert_eq!(
            sent_messages(&transmits)
                .iter()
                .filter(|m| is_notice(m))
                .count(),
            1
        );
    }
    // Our probe of x carries it too; once x acks that probe, it is done.
    let mut t = now;
    let seq = loop {
        t += Duration::from_millis(10);
        assert!(t - now < Duration::from_secs(3), "x never probed");
        n.handle_timeout(t);
        let transmits = drain_transmits(&mut n);
        let msgs = sent_messages(&transmits);
        if let Some(Message::Ping(p)) = msgs
            .iter()
            .find(|m| matches!(m, Message::Ping(p) if p.target == "x"))
        {
            assert!(msgs.iter().any(is_notice), "{msgs:?}");
            break p.seq;
        }
    };
    // An ack that reached us by another path (another address) proves
    // nothing.
    deliver_as(&mut n, Some("x"), &[Message::Ack(seq)], t);
    deliver(&mut n, &[ping_from(98, "x", 1, 4)], t);
    let transmits = drain_transmits(&mut n);
    assert!(sent_messages(&transmits).iter().any(is_notice));
    // x's own ack does... but that probe is over; the next probe carries it
    // again and x acks it directly.
    let seq = loop {
        t += Duration::from_millis(10);
        assert!(t - now < Duration::from_secs(10), "x never probed again");
        n.handle_timeout(t);
        let transmits = drain_transmits(&mut n);
        let msgs = sent_messages(&transmits);
        if let Some(Message::Ping(p)) = msgs
            .iter()
            .find(|m| matches!(m, Message::Ping(p) if p.target == "x" && !p.reliable))
            && msgs.iter().any(is_notice)
        {
            break p.seq;
        }
    };
    n.handle_packet(
        addr(2),
        name_at(&n, addr(2)).as_deref(),
        &packet(&[Message::Ack(seq)]),
        t,
    )
    .unwrap();
    deliver(&mut n, &[ping_from(99, "x", 1, 4)], t);
    let transmits = drain_transmits(&mut n);
    assert!(!sent_messages(&transmits).iter().any(is_notice));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Random faults on 5 nodes (loss, a crash, a restart as a new
    /// generation), then quiet: the invariants hold throughout, and every
    /// running node ends up seeing exactly the running nodes.
    #[test]
    fn random_faults_then_quiet_converge(
        seed in 0u64..1_000_000,
        loss in 0.0f64..0.3,
        crash in proptest::option::of((0usize..5, 1u64..15)),
        restart in proptest::option::of((0usize..5, 1u64..15)),
    ) {
        let mut c = Cluster::new(5, timing());
        c.rng = SmallRng::seed_from_u64(seed);
        c.run(Duration::from_secs(3));
        c.loss = loss;
        let mut events: Vec<(u64, bool, usize)> = Vec::new();
        if let Some((i, at)) = crash { events.push((at, true, i)); }
        if let Some((i, at)) = restart { events.push((at, false, i)); }
        events.sort();
        let mut t = 0;
        for (at, is_crash, i) in events {
            c.run(Duration::from_secs(at - t));
            t = at;
            if is_crash {
                c.crashed.insert(i);
            } else if !c.crashed.contains(&i) {
                let now = c.now;
                let mut local = local(&format!("n{i}"), 100 + i as u16);
                local.generation = 1000 + at;
                c.nodes[i] = Membership::new(timing(), local, SmallRng::seed_from_u64(seed ^ at), now).unwrap();
                let seed_addr = c.nodes[(i + 1) % 5].local().addr;
                c.nodes[i].join(&[seed_addr], now);
            }
        }
        c.run(Duration::from_secs(16 - t));
        c.loss = 0.0;
        c.run(Duration::from_secs(40));
        proptest::prop_assert!(c.violations.is_empty(), "{:?}", c.violations);
        let running: HashSet<(String, u64)> = (0..5)
            .filter(|i| !c.crashed.contains(i))
            .map(|i| (c.nodes[i].local().name.to_string(), c.nodes[i].local().generation))
            .collect();
        for i in (0..5).filter(|i| !c.crashed.contains(i)) {
            let view: HashSet<(String, u64)> = c.nodes[i]
                .live_members()
                .map(|m| (m.name.to_string(), m.generation))
                .collect();
            proptest::prop_assert_eq!(&view, &running, "n{} disagrees", i);
        }
    }
}

#[test]
fn a_seed_that_is_not_a_live_member_is_contacted_at_push_pull_time() {
    let now = Instant::now();
    let mut n = node(now);
    n.join(&[addr(50)], now);
    let answer = Message::PushPull(PushPull {
        from: "seed",
        join: false,
        reply: false,
    });
    n.handle_packet(
        addr(50),
        Some("seed"),
        &packet(&[answer, state("seed", 0, 50, WireState::Alive)]),
        now,
    )
    .unwrap();
    drain_transmits(&mut n);
    let mut t = now;
    // The seed is no longer a live member (here it left; across a partition
    // it would be dead): it is contacted again at the next push-pull rounds,
    // besides the regular push-pull with a member.
    deliver(
        &mut n,
        &[alive("x", 1, 1, 2), dead("seed", 1, 0, "seed")],
        t,
    );
    assert_eq!(state_of(&n, "seed"), Some((MemberState::Left, 0)));
    let mut contacted = false;
    for _ in 0..400 {
        t += Duration::from_millis(100);
        n.handle_timeout(t);
        if drain_transmits(&mut n)
            .iter()
            .any(|tr| tr.reliable && tr.to == addr(50))
        {
            contacted = true;
        }
    }
    assert!(contacted);
    assert!(n.stats().seed_push_pulls >= 1);
}

#[test]
fn pending_verdict_notices_are_resent_every_reconnect_interval_until_acked() {
    let now = Instant::now();
    let config = Config {
        // No probing in the way: only the notice pings go to x.
        probe_interval: Duration::from_secs(3600),
        probe_timeout: Duration::from_secs(1),
        // (No lease: it would need probes to renew it.)
        lease: crate::LeaseStrategy::Off,
        ..timing()
    };
    let start = now;
    let mut n = node_with(config, "me", 1, start);
    deliver(&mut n, &[alive("x", 1, 3, 2), dead("x", 1, 3, "me")], start);
    let now = start + n.takeover_delay();
    deliver(&mut n, &[alive("x", 1, 4, 2)], now);
    drain_transmits(&mut n);
    let is_notice = |m: &Message<'_>| matches!(m, Message::Dead(a) if a.name == "x" && a.incarnation == u64::MAX);
    let mut t = now;
    let mut seqs = Vec::new();
    for _ in 0..30 {
        t += Duration::from_millis(100);
        n.handle_timeout(t);
        for tr in drain_transmits(&mut n).iter().filter(|tr| tr.to == addr(2)) {
            let msgs: Vec<_> = wire::Messages::new(&tr.payload).collect();
            if let (Some(Message::Ping(p)), true) = (msgs.first(), msgs.iter().any(is_notice)) {
                seqs.push(p.seq);
            }
        }
    }
    assert!(seqs.len() >= 2, "resent at least twice in 3 s: {seqs:?}");
    // The member acks one: no more notices.
    deliver_as(&mut n, Some("x"), &[Message::Ack(*seqs.last().unwrap())], t);
    for _ in 0..30 {
        t += Duration::from_millis(100);
        n.handle_timeout(t);
        let transmits = drain_transmits(&mut n);
        assert!(!sent_messages(&transmits).iter().any(is_notice));
    }
}

// ----- lease (Membership::standing) -------------------------------------

/// Runs timers from `t` in 10 ms steps until a probe goes to one of the
/// members and acks it at once; returns the probe's send time and target.
fn probe_and_ack(n: &mut Node, t: &mut Instant) -> (Instant, SocketAddr) {
    for _ in 0..1000 {
        *t += Duration::from_millis(10);
        n.handle_timeout(*t);
        let transmits = drain_transmits(n);
        let found = transmits
            .iter()
            .find_map(|tr| match wire::Messages::new(&tr.payload).next() {
                Some(Message::Ping(p)) if !tr.reliable => Some((p.seq, tr.to)),
                _ => None,
            });
        if let Some((seq, to)) = found {
            n.handle_packet(
                to,
                name_at(n, to).as_deref(),
                &packet(&[Message::Ack(seq)]),
                *t,
            )
            .unwrap();
            return (*t, to);
        }
    }
    panic!("no probe");
}

fn standing_events(n: &mut Node) -> Vec<crate::Standing> {
    drain_events(n)
        .into_iter()
        .filter_map(|e| match e {
            Event::StandingChanged(s) => Some(s),
            _ => None,
        })
        .collect()
}

/// `timing()` with the view-majority lease (`LeaseStrategy::Majority`),
/// which needs a 2 s lease.
fn majority() -> Config {
    Config {
        lease: crate::LeaseStrategy::Majority,
        lease_period: Duration::from_secs(2),
        ..timing()
    }
}

/// A node that knows `peers` alive members (x0, x1, ... on ports 10..).
fn node_with_peers(config: Config, peers: u16, now: Instant) -> Node {
    let mut n = node_with(config, "me", 1, now);
    let names: Vec<String> = (0..peers).map(|i| format!("x{i}")).collect();
    let msgs: Vec<Message<'_>> = names
        .iter()
        .zip(10..)
        .map(|(name, port)| alive(name, 1, 1, port))
        .collect();
    deliver(&mut n, &msgs, now);
    drain_events(&mut n);
    drain_transmits(&mut n);
    n
}

/// Probes and acks until the lease is valid (the evidence must hold for the
/// takeover delay first); returns the last probe's send time.
fn establish(n: &mut Node, t: &mut Instant) -> Instant {
    let deadline = *t + Duration::from_secs(10);
    loop {
        let (sent, _) = probe_and_ack(n, t);
        n.handle_timeout(*t);
        drain_transmits(n);
        if n.standing(*t).is_valid() {
            return sent;
        }
        assert!(*t < deadline, "never valid: {:?}", n.standing(*t));
    }
}

#[test]
fn the_lease_lasts_lease_period_from_the_send_time_of_the_last_acked_probe() {
    use crate::Standing;
    let start = Instant::now();
    let mut n = node_with_peers(majority(), 4, start);
    assert_eq!(
        n.standing(start),
        Standing::NoContact { last_contact: None }
    );
    // Contact, but it must hold for the takeover delay before it counts.
    let mut t = start;
    let (first, _) = probe_and_ack(&mut n, &mut t);
    assert_eq!(
        n.standing(t),
        Standing::Returning {
            valid_at: t + n.takeover_delay()
        }
    );
    assert!(standing_events(&mut n).is_empty());
    assert!(first + n.takeover_delay() > t);
    let sent = establish(&mut n, &mut t);
    let period = majority().lease_period;
    assert_eq!(
        n.standing(t),
        Standing::Valid {
            until: Some(sent + period)
        }
    );
    assert!(
        standing_events(&mut n)
            .iter()
            .all(|s| matches!(s, Standing::Valid { .. }))
    );
    // The driver is woken when it lapses.
    assert!(n.poll_timeout().unwrap() <= sent + period);
    // No answer to anything from now on: it lapses lease_period after the
    // send time, and StandingChanged says so.
    while t < sent + period {
        t += Duration::from_millis(10);
        n.handle_timeout(t);
        drain_transmits(&mut n);
    }
    assert_eq!(
        standing_events(&mut n),
        vec![Standing::NoContact {
            last_contact: Some(sent)
        }]
    );
    assert!(!n.standing(t).is_valid());
    assert_eq!(n.stats().standing_lost, 1);
}

#[test]
fn a_paused_node_wakes_with_a_lapsed_lease_even_if_acks_wait_in_its_input() {
    let start = Instant::now();
    let mut n = node_with_peers(timing(), 4, start);
    let mut t = start;
    establish(&mut n, &mut t);
    // Its next probe leaves; then the process is stopped for 8 s. The ack
    // arrived meanwhile and is read on waking.
    let (seq, to, sent) = loop {
        t += Duration::from_millis(10);
        n.handle_timeout(t);
        let transmits = drain_transmits(&mut n);
        if let Some(found) =
            transmits
                .iter()
                .find_map(|tr| match wire::Messages::new(&tr.payload).next() {
                    Some(Message::Ping(p)) if !tr.reliable => Some((p.seq, tr.to, t)),
                    _ => None,
                })
        {
            break found;
        }
    };
    drain_events(&mut n);
    let woke = sent + Duration::from_secs(8);
    n.handle_packet(
        to,
        name_at(&n, to).as_deref(),
        &packet(&[Message::Ack(seq)]),
        woke,
    )
    .unwrap();
    assert!(matches!(
        n.standing(woke),
        crate::Standing::NoContact { last_contact: Some(c) } if c == sent
    ));
    assert!(
        standing_events(&mut n)
            .last()
            .is_some_and(|s| !s.is_valid())
    );
}

#[test]
fn a_push_pull_reply_is_contact_from_its_request() {
    let start = Instant::now();
    let config = Config {
        lease: crate::LeaseStrategy::ContactOnly,
        ..timing()
    };
    let mut n = node_with(config, "me", 1, start);
    n.join(&[addr(50)], start);
    drain_transmits(&mut n);
    let answer = Message::PushPull(PushPull {
        from: "seed",
        join: false,
        reply: false,
    });
    let later = start + Duration::from_millis(300);
    n.handle_packet(
        addr(50),
        Some("seed"),
        &packet(&[answer, state("seed", 0, 50, WireState::Alive)]),
        later,
    )
    .unwrap();
    // Contact from the request's send time (then it must hold a while).
    assert!(matches!(
        n.standing(later),
        crate::Standing::Returning { .. }
    ));
    n.handle_timeout(later);
    let mut t = later;
    establish(&mut n, &mut t);
    // An unsolicited push-pull (a request, or from elsewhere) is not.
    let mut m = node_with(timing(), "me", 1, start);
    let request = Message::PushPull(PushPull {
        from: "seed",
        join: false,
        reply: false,
    });
    m.handle_packet(
        addr(50),
        Some("seed"),
        &packet(&[request, state("seed", 0, 50, WireState::Alive)]),
        later,
    )
    .unwrap();
    assert_eq!(
        m.standing(later),
        crate::Standing::NoContact { last_contact: None }
    );
}

#[test]
fn the_lease_needs_a_strict_majority_of_the_reference_set() {
    use crate::Standing;
    let start = Instant::now();
    // Five members: this node and x0..x3.
    let mut n = node_with_peers(majority(), 4, start);
    let mut t = start;
    establish(&mut n, &mut t);
    assert!(n.standing(t).is_valid());
    deliver(&mut n, &[suspect("x0", 1, 1, "x1")], t);
    assert!(n.standing(t).is_valid(), "4 of 5");
    deliver(&mut n, &[suspect("x1", 1, 1, "x0")], t);
    assert!(n.standing(t).is_valid(), "3 of 5");
    deliver(&mut n, &[suspect("x2", 1, 1, "x0")], t);
    assert_eq!(
        n.standing(t),
        Standing::NoMajority {
            reachable: 2,
            reference: 5
        }
    );
    assert!(
        standing_events(&mut n)
            .last()
            .is_some_and(|s| !s.is_valid())
    );
    // Lapsed: the reference set is frozen, so the minority's dead verdicts
    // do not make it a majority of what is left.
    for name in ["x0", "x1", "x2"] {
        deliver(&mut n, &[dead(name, 1, 1, "x3")], t);
    }
    assert_eq!(n.num_live(), 2);
    assert_eq!(
        n.standing(t),
        Standing::NoMajority {
            reachable: 2,
            reference: 5
        }
    );
    // They come back (refuted): valid again, and the set follows the view.
    for (i, name) in ["x0", "x1", "x2"].into_iter().enumerate() {
        deliver(&mut n, &[alive(name, 1, 2, 10 + i as u16)], t);
    }
    assert!(matches!(n.standing(t), Standing::Returning { .. }));
    establish(&mut n, &mut t);
    assert!(
        standing_events(&mut n)
            .last()
            .is_some_and(Standing::is_valid)
    );
    // x3 dies while the lease is valid: it counts as unreachable, and leaves
    // the set once the lease stayed valid for the takeover delay plus the
    // longest suspicion (6 × 0.8 s at this size).
    deliver(&mut n, &[dead("x3", 1, 1, "x0")], t);
    assert!(n.standing(t).is_valid());
    let settled = t + n.takeover_delay() + Duration::from_millis(4800);
    while t < settled {
        probe_and_ack(&mut n, &mut t);
    }
    assert!(n.standing(t).is_valid());
    // An exact half: the side holding the oldest member (x0: generation 1,
    // below ours) keeps it.
    deliver(
        &mut n,
        &[suspect("x1", 1, 2, "x0"), suspect("x2", 1, 2, "x0")],
        t,
    );
    assert!(n.standing(t).is_valid(), "2 of 4 with the oldest");
    deliver(
        &mut n,
        &[alive("x1", 1, 3, 11), suspect("x0", 1, 2, "x2")],
        t,
    );
    assert_eq!(
        n.standing(t),
        Standing::NoMajority {
            reachable: 2,
            reference: 4
        },
        "2 of 4 without the oldest"
    );
}

#[test]
fn early_verdicts_of_a_minority_do_not_shrink_the_reference_set() {
    use crate::Standing;
    let start = Instant::now();
    // Five members; this node and x0 are cut off from x1, x2, x3, whose
    // suspicions and verdicts arrive one by one.
    let mut n = node_with_peers(majority(), 4, start);
    let mut t = start;
    establish(&mut n, &mut t);
    deliver(&mut n, &[suspect("x1", 1, 1, "x0")], t);
    deliver(&mut n, &[dead("x1", 1, 1, "x0")], t);
    deliver(&mut n, &[suspect("x2", 1, 1, "x0")], t);
    deliver(&mut n, &[dead("x2", 1, 1, "x0")], t);
    assert!(n.standing(t).is_valid(), "3 of 5 (x3 not suspected yet)");
    deliver(&mut n, &[suspect("x3", 1, 1, "x0")], t);
    // Had the dead left the set at once, 2 of 3 would be a majority.
    assert_eq!(
        n.standing(t),
        Standing::NoMajority {
            reachable: 2,
            reference: 5
        }
    );
}

#[test]
fn other_strategies() {
    use crate::{LeaseStrategy, Standing};
    let start = Instant::now();
    let with = |lease| Config { lease, ..timing() };
    // Off: always valid, no events, no takeover delay.
    let mut n = node_with_peers(with(LeaseStrategy::Off), 4, start);
    assert_eq!(n.standing(start), Standing::Valid { until: None });
    assert_eq!(n.takeover_delay(), Duration::ZERO);
    n.handle_timeout(start + Duration::from_secs(5));
    assert!(standing_events(&mut n).is_empty());
    // ContactOnly: a minority that reaches someone keeps it.
    let mut n = node_with_peers(with(LeaseStrategy::ContactOnly), 4, start);
    let mut t = start;
    establish(&mut n, &mut t);
    for name in ["x0", "x1", "x2"] {
        deliver(&mut n, &[suspect(name, 1, 1, "x3")], t);
    }
    assert!(n.standing(t).is_valid());
    // StaticQuorum(3): at least three held alive, this node included.
    let mut n = node_with_peers(with(LeaseStrategy::StaticQuorum(3)), 4, start);
    let mut t = start;
    establish(&mut n, &mut t);
    for name in ["x0", "x1"] {
        deliver(&mut n, &[suspect(name, 1, 1, "x3")], t);
    }
    assert!(n.standing(t).is_valid());
    deliver(&mut n, &[suspect("x2", 1, 1, "x3")], t);
    assert_eq!(
        n.standing(t),
        Standing::NoMajority {
            reachable: 2,
            reference: 3
        }
    );
    // A node that left has no standing.
    let mut n = node_with_peers(timing(), 4, start);
    let mut t = start;
    establish(&mut n, &mut t);
    n.leave(t);
    assert_eq!(n.standing(t), Standing::Inactive);
}

#[test]
fn a_node_with_a_valid_lease_refutes_a_verdict_at_its_incarnation_instead_of_fencing() {
    let start = Instant::now();
    let mut n = node_with_peers(timing(), 4, start);
    let mut t = start;
    establish(&mut n, &mut t);
    drain_events(&mut n);
    let inc = n.local().incarnation;
    // A stale verdict (a cut-off node that could not reach us) while we
    // hold the majority and fresh contact: refuted, not a fence.
    deliver(&mut n, &[dead("me", 100, inc, "x0")], t);
    assert!(
        !drain_events(&mut n).contains(&Event::DeclaredFailed),
        "a node with standing fenced"
    );
    assert!(n.local().incarnation > inc, "refuted");
    // Without fresh contact the same kind of verdict fences: others may
    // have acted on it.
    t += timing().lease_period * 2;
    n.handle_timeout(t);
    drain_events(&mut n);
    assert!(!n.standing(t).is_valid());
    let inc = n.local().incarnation;
    deliver(&mut n, &[dead("me", 100, inc, "x1")], t);
    assert!(drain_events(&mut n).contains(&Event::DeclaredFailed));
}

// ----- witnesses (LeaseStrategy::Witnesses, the default) ---------------------

/// A node called `name` (port from its index in `all`) that knows every
/// other name of `all` alive, at generation 100 like itself, so every node
/// built this way holds the same members.
fn cluster_node(name: &str, all: &[&str], now: Instant) -> Node {
    let port = |n: &str| 10 + all.iter().position(|x| *x == n).unwrap() as u16;
    let mut node = node_with(timing(), name, port(name), now);
    let msgs: Vec<Message<'_>> = all
        .iter()
        .filter(|n| **n != name)
        .map(|n| alive(n, 100, 1, port(n)))
        .collect();
    if !msgs.is_empty() {
        deliver(&mut node, &msgs, now);
    }
    drain_events(&mut node);
    drain_transmits(&mut node);
    node
}

fn witness_names(n: &Node) -> Vec<String> {
    n.witnesses().map(|m| m.name.to_string()).collect()
}

/// Runs `n` in 10 ms steps until `until`; every ping to an address `reach`
/// accepts is answered by its target (an ack from the target's address).
/// Returns when the lease first lapsed, if it did.
fn run_answering(
    n: &mut Node,
    t: &mut Instant,
    until: Instant,
    reach: &dyn Fn(SocketAddr) -> bool,
) -> Option<Instant> {
    let mut lapsed = None;
    while *t < until {
        *t += Duration::from_millis(10);
        n.handle_timeout(*t);
        for tr in drain_transmits(n) {
            if !reach(tr.to) {
                continue;
            }
            let ack = wire::Messages::new(&tr.payload).find_map(|m| match m {
                Message::Ping(p) => Some(Message::Ack(p.seq)),
                _ => None,
            });
            if let Some(ack) = ack {
                let sender = name_at(n, tr.to);
                n.handle_packet(tr.to, sender.as_deref(), &packet(&[ack]), *t)
                    .unwrap();
            }
        }
        if lapsed.is_none() && n.stats().standing_lost > 0 && !n.standing(*t).is_valid() {
            lapsed = Some(*t);
        }
    }
    lapsed
}

#[test]
fn the_witness_set_size_is_odd_and_grows_with_the_log_of_the_cluster() {
    use crate::lease::witness_set_size;
    let sizes: Vec<usize> = [1, 2, 3, 4, 5, 6, 7, 16, 64, 200, 1_000, 10_000]
        .iter()
        .map(|&n| witness_set_size(n))
        .collect();
    assert_eq!(sizes, vec![1, 1, 3, 3, 5, 5, 7, 9, 13, 17, 21, 29]);
}

#[test]
fn a_witness_majority_keeps_the_lease_and_losing_it_lapses_within_lease_period() {
    use crate::Standing;
    let start = Instant::now();
    // Sixteen members: nine witnesses.
    let mut n = node_with_peers(timing(), 15, start);
    let mut t = start;
    let everyone = |_: SocketAddr| true;
    assert_eq!(
        run_answering(&mut n, &mut t, start + Duration::from_secs(4), &everyone),
        None
    );
    assert!(n.standing(t).is_valid(), "{:?}", n.standing(t));
    let witnesses: Vec<Member> = n.witnesses().cloned().collect();
    assert_eq!(witnesses.len(), 9);
    let local = usize::from(witnesses.iter().any(|w| w.name == n.local().name));
    let remote: Vec<SocketAddr> = witnesses
        .iter()
        .filter(|w| w.name != n.local().name)
        .map(|w| w.addr)
        .collect();
    // Only a bare majority of the witnesses answers: 5 of 16 members, and
    // the lease holds (the others are suspected and declared dead one by
    // one meanwhile).
    let majority: Vec<SocketAddr> = remote.iter().copied().take(5 - local).collect();
    let in_majority = |a: SocketAddr| majority.contains(&a);
    let kept = t + Duration::from_secs(20);
    assert_eq!(run_answering(&mut n, &mut t, kept, &in_majority), None);
    assert!(n.standing(t).is_valid());
    // Now one witness short of a majority of the set as it is answers: the
    // lease lapses within lease_period of the cut, whatever the view says.
    let cut = t;
    let now_witnesses: Vec<Member> = n.witnesses().cloned().collect();
    let needed = now_witnesses.len() / 2 + 1;
    let fewer: Vec<SocketAddr> = now_witnesses
        .iter()
        .filter(|w| w.name != n.local().name && majority.contains(&w.addr))
        .map(|w| w.addr)
        .take(needed - local - 1)
        .collect();
    let Standing::Valid { until: Some(until) } = n.standing(cut) else {
        panic!("{:?}", n.standing(cut));
    };
    assert!(until <= cut + timing().lease_period);
    let in_fewer = |a: SocketAddr| fewer.contains(&a);
    let end = cut + Duration::from_secs(3);
    let lapsed = run_answering(&mut n, &mut t, end, &in_fewer);
    let lapsed = lapsed.expect("lapsed");
    assert!(lapsed <= cut + timing().lease_period, "{:?}", lapsed - cut);
    assert!(
        matches!(n.standing(t), Standing::NoMajority { reachable, reference } if 2 * reachable < reference),
        "{:?}",
        n.standing(t)
    );
}

#[test]
fn a_lost_witness_ping_is_retried_at_the_next_round() {
    // On `lan` the lease lasts five probe intervals and a witness is pinged
    // again half a period after its last answer: a refresh ping that is
    // lost must be retried at the next round (a probe interval later), or
    // the answer it was to renew expires first.
    let start = Instant::now();
    let config = timing();
    let mut n = node_with_peers(config.clone(), 15, start);
    let mut t = start;
    run_answering(&mut n, &mut t, start + Duration::from_secs(4), &|_| true);
    assert!(n.standing(t).is_valid(), "{:?}", n.standing(t));
    let me = n.local().name.clone();
    let witness = n
        .witnesses()
        .find(|w| w.name != me)
        .map(|w| w.addr)
        .unwrap();
    // The first ping to that witness after `from` is lost; the next one
    // must follow within a probe interval, and the lease holds throughout.
    let from = t;
    let mut lost: Option<Instant> = None;
    let mut next: Option<Instant> = None;
    while t < from + Duration::from_secs(3) {
        t += Duration::from_millis(10);
        n.handle_timeout(t);
        for tr in drain_transmits(&mut n) {
            let ack = wire::Messages::new(&tr.payload).find_map(|m| match m {
                Message::Ping(p) => Some(Message::Ack(p.seq)),
                _ => None,
            });
            let Some(ack) = ack else { continue };
            if tr.to == witness && !tr.reliable {
                if lost.is_none() {
                    lost = Some(t);
                    continue;
                }
                next.get_or_insert(t);
            }
            let sender = name_at(&n, tr.to);
            n.handle_packet(tr.to, sender.as_deref(), &packet(&[ack]), t)
                .unwrap();
        }
        assert!(n.standing(t).is_valid(), "{:?}", n.standing(t));
    }
    let (lost, next) = (lost.unwrap(), next.unwrap());
    assert!(
        next - lost <= config.probe_interval,
        "pinged again {:?} after the lost ping",
        next - lost
    );
}

#[test]
fn an_even_split_keeps_the_side_holding_most_witnesses() {
    let start = Instant::now();
    let all = ["a", "b", "c", "d", "e", "f"];
    let nodes: Vec<Node> = all.iter().map(|n| cluster_node(n, &all, start)).collect();
    // Every node derives the same five witnesses from the same members.
    let witnesses = witness_names(&nodes[0]);
    assert_eq!(witnesses.len(), 5);
    for n in &nodes {
        assert_eq!(witness_names(n), witnesses);
    }
    // Split 3 | 3: exactly the side holding three or more witnesses keeps
    // its lease, for every split.
    let port = |name: &str| addr(10 + all.iter().position(|x| *x == name).unwrap() as u16);
    for mask in 0u32..64 {
        if mask.count_ones() != 3 || mask & 1 == 0 {
            continue;
        }
        let side = |i: usize| mask & (1 << i) != 0;
        let held = all
            .iter()
            .enumerate()
            .filter(|(i, name)| side(*i) && witnesses.contains(&name.to_string()))
            .count();
        for (i, name) in all.iter().enumerate() {
            let mut n = cluster_node(name, &all, start);
            let mut t = start;
            let mine: Vec<SocketAddr> = all
                .iter()
                .enumerate()
                .filter(|(j, _)| side(*j) == side(i))
                .map(|(_, other)| port(other))
                .collect();
            let everyone = |_: SocketAddr| true;
            run_answering(&mut n, &mut t, start + Duration::from_secs(4), &everyone);
            assert!(n.standing(t).is_valid());
            let reach = |a: SocketAddr| mine.contains(&a);
            let end = t + Duration::from_secs(3);
            run_answering(&mut n, &mut t, end, &reach);
            let wins = if side(i) {
                2 * held > 5
            } else {
                2 * (5 - held) > 5
            };
            assert_eq!(n.standing(t).is_valid(), wins, "{name} in split {mask:06b}");
        }
    }
}

#[test]
fn the_witness_set_is_frozen_while_the_lease_is_lapsed() {
    use crate::Standing;
    let start = Instant::now();
    let config = Config {
        reap_after: Duration::from_secs(3),
        ..timing()
    };
    let mut n = node_with_peers(config, 15, start);
    let mut t = start;
    run_answering(&mut n, &mut t, start + Duration::from_secs(4), &|_| true);
    assert!(n.standing(t).is_valid());
    let before = witness_names(&n);
    // Cut off from everyone: it lapses, and the set stays what it was while
    // every member dies, is reaped, and new members join.
    let cut = t;
    let lapsed = run_answering(&mut n, &mut t, cut + Duration::from_secs(3), &|_| false);
    assert!(lapsed.is_some_and(|at| at <= cut + timing().lease_period));
    let names: Vec<String> = (0..15).map(|i| format!("x{i}")).collect();
    for name in &names {
        deliver(&mut n, &[dead(name, 1, 1, "y")], t);
    }
    let newcomers: Vec<String> = (0..20).map(|i| format!("y{i}")).collect();
    let msgs: Vec<Message<'_>> = newcomers
        .iter()
        .zip(100..)
        .map(|(name, port)| alive(name, 1, 1, port))
        .collect();
    deliver(&mut n, &msgs, t);
    assert_eq!(witness_names(&n), before);
    // Reaped: gone from the list, still counted against the majority.
    let end = t + Duration::from_secs(5);
    run_answering(&mut n, &mut t, end, &|_| false);
    let left = witness_names(&n);
    assert!(left.iter().all(|w| before.contains(w)));
    assert!(left.len() <= 1, "{left:?}");
    assert!(
        matches!(
            n.standing(t),
            Standing::NoContact { .. } | Standing::NoMajority { .. }
        ),
        "{:?}",
        n.standing(t)
    );
    // The newcomers answer: contact, but no witness majority.
    let reach = |a: SocketAddr| a.port() >= 100;
    let end = t + Duration::from_secs(5);
    run_answering(&mut n, &mut t, end, &reach);
    assert_eq!(
        n.standing(t),
        Standing::NoMajority {
            reachable: left.len(),
            reference: 9
        }
    );
    assert_eq!(
        witness_names(&n),
        left,
        "the set does not follow the view while lapsed"
    );
}

#[test]
fn a_witness_declared_dead_under_a_valid_lease_is_replaced_after_the_linger() {
    let start = Instant::now();
    let mut n = node_with_peers(timing(), 15, start);
    let mut t = start;
    run_answering(&mut n, &mut t, start + Duration::from_secs(4), &|_| true);
    assert!(n.standing(t).is_valid());
    let before: Vec<Member> = n.witnesses().cloned().collect();
    let gone = before
        .iter()
        .find(|w| w.name != n.local().name)
        .unwrap()
        .clone();
    // It crashes; the cluster's verdict arrives.
    let alive_ones = |a: SocketAddr| a != gone.addr;
    let end = t + Duration::from_millis(500);
    run_answering(&mut n, &mut t, end, &alive_ones);
    deliver(&mut n, &[dead(&gone.name, 1, 1, "x9")], t);
    // It stays a witness (unreachable) for the takeover delay plus the
    // longest suspicion (6 × 0.96 s at this size) of valid lease...
    let verdict = t;
    run_answering(
        &mut n,
        &mut t,
        verdict + Duration::from_secs(2),
        &alive_ones,
    );
    assert!(witness_names(&n).contains(&gone.name.to_string()));
    // ...then leaves it; another member takes its place.
    let end = verdict + n.takeover_delay() + Duration::from_secs(7);
    let lapsed = run_answering(&mut n, &mut t, end, &alive_ones);
    assert_eq!(lapsed, None, "the lease held throughout");
    let after = witness_names(&n);
    assert_eq!(after.len(), 9);
    assert!(!after.contains(&gone.name.to_string()), "{after:?}");
    let kept = before
        .iter()
        .filter(|w| after.contains(&w.name.to_string()))
        .count();
    assert_eq!(kept, 8, "only the dead witness was replaced");
    assert!(n.standing(t).is_valid());
}

#[test]
fn clusters_of_one_and_two_have_one_witness() {
    use crate::Standing;
    let start = Instant::now();
    // Alone: its own witness, valid without contact (after the hysteresis).
    let mut n = cluster_node("a", &["a"], start);
    let mut t = start;
    run_answering(&mut n, &mut t, start + Duration::from_secs(3), &|_| false);
    assert_eq!(witness_names(&n), vec!["a".to_string()]);
    assert_eq!(n.standing(t), Standing::Valid { until: None });
    // Two: one witness, the same on both; both valid while they reach each
    // other, neither once cut (the witness lacks contact, the other the
    // witness).
    let all = ["a", "b"];
    let mut nodes: Vec<Node> = all.iter().map(|n| cluster_node(n, &all, start)).collect();
    let w = witness_names(&nodes[0]);
    assert_eq!(w.len(), 1);
    assert_eq!(witness_names(&nodes[1]), w);
    for n in &mut nodes {
        let mut t = start;
        run_answering(n, &mut t, start + Duration::from_secs(4), &|_| true);
        assert!(n.standing(t).is_valid(), "{:?}", n.standing(t));
        let cut = t;
        let lapsed = run_answering(n, &mut t, cut + Duration::from_secs(3), &|_| false);
        assert!(lapsed.is_some_and(|at| at <= cut + timing().lease_period));
        let is_witness = w[0] == *n.local().name;
        match n.standing(t) {
            Standing::NoContact { .. } => {}
            Standing::NoMajority { .. } => assert!(!is_witness),
            other => panic!("{other:?}"),
        }
    }
}

/// Node `a` of `all` reborn as generation 101 (same address), knowing the
/// others alive, with `evidence` inherited if given.
fn reborn_node(all: &[&str], evidence: Option<crate::LeaseEvidence>, now: Instant) -> Node {
    let port = |n: &str| 10 + all.iter().position(|x| *x == n).unwrap() as u16;
    let mut node = Membership::new(
        timing(),
        LocalNode {
            generation: 101,
            ..local("a", port("a"))
        },
        SmallRng::seed_from_u64(101),
        now,
    )
    .unwrap();
    if let Some(evidence) = evidence {
        assert!(node.inherit_lease(evidence, now));
    }
    let msgs: Vec<Message<'_>> = all
        .iter()
        .filter(|n| **n != "a")
        .map(|n| alive(n, 100, 1, port(n)))
        .collect();
    deliver(&mut node, &msgs, now);
    drain_events(&mut node);
    drain_transmits(&mut node);
    node
}

#[test]
fn a_reborn_node_keeps_its_predecessors_witnesses_and_gets_no_lease_in_a_minority() {
    use crate::Standing;
    let start = Instant::now();
    let all = ["a", "b", "c", "d", "e", "f", "g"];
    let port = |name: &str| addr(10 + all.iter().position(|x| *x == name).unwrap() as u16);
    // The predecessor: seven members, seven witnesses, a valid lease.
    let mut old = cluster_node("a", &all, start);
    let mut t = start;
    run_answering(&mut old, &mut t, start + Duration::from_secs(4), &|_| true);
    assert!(old.standing(t).is_valid());
    let evidence = old.lease_evidence();
    assert_eq!(evidence.len(), 7);
    // Reborn, then cut off with b and c (three of seven): the others are
    // suspected and declared dead, and it never gets a lease: of its
    // predecessor's witnesses only b and c answer (the predecessor, a dead
    // generation, does not count).
    let minority = [port("b"), port("c")];
    let reach = |a: SocketAddr| minority.contains(&a);
    let mut n = reborn_node(&all, Some(evidence.clone()), t);
    let mut t1 = t;
    let end = t + Duration::from_secs(20);
    while t1 < end {
        let step = t1 + Duration::from_secs(1);
        run_answering(&mut n, &mut t1, step, &reach);
        assert!(!n.standing(t1).is_valid(), "{:?}", n.standing(t1));
    }
    for name in ["d", "e", "f", "g"] {
        assert_eq!(n.member(name).unwrap().state, MemberState::Dead, "{name}");
    }
    assert_eq!(
        n.standing(t1),
        Standing::NoMajority {
            reachable: 2,
            reference: 7
        }
    );
    assert!(standing_events(&mut n).iter().all(|s| !s.is_valid()));
    // A new process in the same place (no evidence) draws its witnesses from
    // the members it sees alive, only that piece, and gets a lease there:
    // the gap the inherited set closes for a rebirth.
    let mut fresh = reborn_node(&all, None, t);
    let mut t2 = t;
    run_answering(&mut fresh, &mut t2, end, &reach);
    assert!(fresh.standing(t2).is_valid(), "{:?}", fresh.standing(t2));
    assert_eq!(witness_names(&fresh).len(), 3);
    // With the whole cluster in reach the reborn node gets its lease once the
    // witnesses' answers held for the takeover delay, and its witness set
    // then follows the view again (its own new generation included).
    let mut n = reborn_node(&all, Some(evidence), t);
    let mut t3 = t;
    let early = t + n.takeover_delay() - Duration::from_millis(10);
    run_answering(&mut n, &mut t3, early, &|_| true);
    assert!(
        matches!(n.standing(t3), Standing::Returning { .. }),
        "{:?}",
        n.standing(t3)
    );
    let late = t + n.takeover_delay() + Duration::from_secs(1);
    run_answering(&mut n, &mut t3, late, &|_| true);
    assert!(n.standing(t3).is_valid(), "{:?}", n.standing(t3));
    let mut after = witness_names(&n);
    after.sort();
    assert_eq!(after, all.map(String::from).to_vec());
    assert_eq!(n.lease_evidence().len(), 7);
}

#[test]
fn lease_evidence_is_refused_when_it_could_never_give_a_majority() {
    let start = Instant::now();
    // Two members: one witness. Whichever it is, a new generation of the
    // witness could never reach a majority of {its predecessor}: it starts
    // as a new process does; the other inherits.
    let all = ["a", "b"];
    let mut old = cluster_node("a", &all, start);
    let mut t = start;
    run_answering(&mut old, &mut t, start + Duration::from_secs(4), &|_| true);
    let evidence = old.lease_evidence();
    assert_eq!(evidence.len(), 1);
    let mut n = reborn_node(&all, None, t);
    let a_is_witness = witness_names(&old) == ["a"];
    assert_eq!(n.inherit_lease(evidence.clone(), t), !a_is_witness);
    // Never from another name, nor empty evidence.
    let mut other = cluster_node("b", &all, t);
    assert!(!other.inherit_lease(evidence, t));
    assert!(!n.inherit_lease(crate::LeaseEvidence::default(), t));
}

// ----- identity: who may say what ------------------------------------------------

/// A node that knows x (generation 1, incarnation 1, port 2) and y (port 3),
/// both first-hand.
fn node_knowing_x_and_y(now: Instant) -> Node {
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 1, 2), alive("y", 1, 1, 3)], now);
    drain_events(&mut n);
    drain_transmits(&mut n);
    n
}

/// Whether an `AliveRequest` (a claim check) went to `to`.
fn asked_alive(transmits: &[Transmit], to: SocketAddr) -> bool {
    transmits
        .iter()
        .any(|t| t.to == to && wire::Messages::new(&t.payload).any(|m| m == Message::AliveRequest))
}

#[test]
fn a_ping_under_another_name_is_not_answered() {
    let now = Instant::now();
    let mut n = node_knowing_x_and_y(now);
    deliver_as(&mut n, Some("mallory"), &[ping_from(7, "x", 1, 1)], now);
    assert!(drain_transmits(&mut n).is_empty());
    assert_eq!(n.stats().forged_claims, 1);
    deliver_as(&mut n, None, &[ping_from(8, "x", 1, 1)], now);
    assert!(drain_transmits(&mut n).is_empty());
    assert_eq!(n.stats().forged_claims, 2);
    deliver_as(&mut n, Some("x"), &[ping_from(9, "x", 1, 1)], now);
    assert_eq!(sent_messages(&drain_transmits(&mut n))[0], Message::Ack(9));
}

#[test]
fn a_push_pull_under_another_name_is_refused_whole() {
    let now = Instant::now();
    let mut n = node_knowing_x_and_y(now);
    let header = Message::PushPull(PushPull {
        from: "x",
        join: false,
        reply: true,
    });
    let ghost = Message::State(State {
        member: Alive {
            name: "x",
            generation: 2,
            incarnation: 0,
            addr: addr(66),
            ready: true,
            metadata: &[],
        },
        state: WireState::Alive,
    });
    deliver_as(&mut n, Some("mallory"), &[header, ghost], now);
    assert_eq!(n.member("x").unwrap().generation, 1);
    assert!(drain_transmits(&mut n).is_empty(), "no reply, no check");
    assert_eq!(n.stats().forged_claims, 1);
    assert_eq!(n.stats().push_pulls_received, 0);
}

#[test]
fn a_third_party_cannot_announce_a_new_generation_or_address() {
    let now = Instant::now();
    let mut n = node_knowing_x_and_y(now);
    // y says x restarted (generation 2), then that x moved (port 7).
    deliver_as(&mut n, Some("y"), &[alive("x", 2, 0, 2)], now);
    deliver_as(&mut n, Some("y"), &[alive("x", 1, 2, 7)], now);
    let x = n.member("x").unwrap();
    assert_eq!((x.generation, x.addr, x.incarnation), (1, addr(2), 1));
    assert!(!drain_events(&mut n).iter().any(|e| matches!(
        e,
        Event::Failed(_) | Event::Joined(_) | Event::NameConflict { .. }
    )));
    // Each claim is checked with the member, at the claimed address.
    let transmits = drain_transmits(&mut n);
    assert!(asked_alive(&transmits, addr(2)));
    assert!(asked_alive(&transmits, addr(7)));
    assert_eq!(n.stats().claims_checked, 2);
    // A repeated claim does not ask again while the check is in flight.
    deliver_as(&mut n, Some("y"), &[alive("x", 2, 0, 2)], now);
    assert!(drain_transmits(&mut n).is_empty());
    // The member's own word counts: x, restarted, answers the check.
    deliver_as(&mut n, Some("x"), &[alive("x", 2, 0, 2)], now);
    assert_eq!(n.member("x").unwrap().generation, 2);
}

#[test]
fn a_refutation_relayed_by_a_non_member_is_checked_not_applied() {
    let now = Instant::now();
    let mut n = node_knowing_x_and_y(now);
    deliver_as(&mut n, Some("y"), &[suspect("x", 1, 1, "y")], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Suspect, 1)));
    drain_transmits(&mut n);
    // A process that is no member relays x's refutation: x is asked.
    deliver_as(&mut n, Some("rogue"), &[alive("x", 1, 2, 2)], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Suspect, 1)));
    assert!(asked_alive(&drain_transmits(&mut n), addr(2)));
    assert_eq!(n.stats().claims_checked, 1);
    // A member's relay of it still counts (gossip), and x's own answer.
    deliver_as(&mut n, Some("y"), &[alive("x", 1, 2, 2)], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Alive, 2)));
    deliver_as(&mut n, Some("y"), &[suspect("x", 1, 2, "y")], now);
    deliver_as(&mut n, Some("x"), &[alive("x", 1, 3, 2)], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Alive, 3)));
    // An update of a live member from a non-member is applied as before
    // (x refutes one it did not make).
    deliver_as(&mut n, Some("rogue"), &[alive("x", 1, 4, 2)], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Alive, 4)));
}

#[test]
fn a_new_member_is_learned_from_itself_not_from_a_third_party() {
    let now = Instant::now();
    let mut n = node_knowing_x_and_y(now);
    deliver_as(&mut n, Some("y"), &[alive("ghost", 1, 0, 40)], now);
    assert!(n.member("ghost").is_none());
    assert!(asked_alive(&drain_transmits(&mut n), addr(40)));
    // Its answer (under its own name) adds it.
    deliver_as(&mut n, Some("ghost"), &[alive("ghost", 1, 0, 40)], now);
    assert_eq!(state_of(&n, "ghost"), Some((MemberState::Alive, 0)));
}

#[test]
fn another_identity_of_this_node_from_a_third_party_does_not_fence_it() {
    let now = Instant::now();
    let mut n = node_knowing_x_and_y(now);
    deliver_as(&mut n, Some("y"), &[alive("me", 101, 0, 1)], now);
    deliver_as(&mut n, Some("y"), &[alive("me", 100, 0, 9)], now);
    assert!(!n.is_superseded());
    assert!(
        !drain_events(&mut n)
            .iter()
            .any(|e| matches!(e, Event::DeclaredFailed | Event::NameConflict { .. }))
    );
    assert_eq!(n.stats().forged_claims, 2);
    // Only the other address is asked (our own is us).
    let transmits = drain_transmits(&mut n);
    assert!(asked_alive(&transmits, addr(9)));
    assert!(!asked_alive(&transmits, addr(1)));
    // A process holding our name's certificate does win it.
    deliver_as(&mut n, Some("me"), &[alive("me", 101, 0, 9)], now);
    assert!(n.is_superseded());
}

#[test]
fn incarnations_out_of_refutation_reach_are_refused() {
    let now = Instant::now();
    let mut n = node_knowing_x_and_y(now);
    let step = super::membership::MAX_INCARNATION_STEP;
    deliver_as(
        &mut n,
        Some("y"),
        &[suspect("x", 1, u64::MAX - 1, "y")],
        now,
    );
    deliver_as(&mut n, Some("y"), &[dead("x", 1, u64::MAX, "y")], now);
    deliver_as(&mut n, Some("y"), &[alive("x", 1, 2 + step, 2)], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Alive, 1)));
    assert_eq!(n.stats().incarnations_refused, 3);
    // Within reach: a suspicion the member can refute.
    deliver_as(&mut n, Some("y"), &[suspect("x", 1, 1 + step, "y")], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Suspect, 1 + step)));
    // About ourselves: refused too, so our incarnation stays answerable.
    deliver_as(
        &mut n,
        Some("y"),
        &[suspect("me", 100, u64::MAX - 1, "y")],
        now,
    );
    deliver_as(
        &mut n,
        Some("y"),
        &[dead("me", 100, u64::MAX - 1, "y")],
        now,
    );
    assert_eq!(n.local().incarnation, 0);
    assert_eq!(n.stats().incarnations_refused, 5);
    deliver_as(&mut n, Some("y"), &[suspect("me", 100, 5, "y")], now);
    assert_eq!(n.local().incarnation, 6, "a reachable one is refuted");
}

#[test]
fn an_acted_on_notice_counts_only_from_its_author() {
    let now = Instant::now();
    let mut n = node_knowing_x_and_y(now);
    deliver_as(&mut n, Some("y"), &[dead("me", 100, u64::MAX, "x")], now);
    assert!(!drain_events(&mut n).contains(&Event::DeclaredFailed));
    assert_eq!(n.stats().forged_claims, 1);
    deliver_as(&mut n, Some("x"), &[dead("me", 100, u64::MAX, "x")], now);
    assert!(drain_events(&mut n).contains(&Event::DeclaredFailed));
}

#[test]
fn a_relayed_leave_is_checked_with_the_member() {
    let now = Instant::now();
    let mut n = node_knowing_x_and_y(now);
    deliver_as(&mut n, Some("y"), &[dead("x", 1, 1, "x")], now);
    // Not left on y's word: a suspicion by y (x refutes it if it is there),
    // and x is asked.
    assert_eq!(state_of(&n, "x"), Some((MemberState::Suspect, 1)));
    assert!(
        !drain_events(&mut n)
            .iter()
            .any(|e| matches!(e, Event::Left(_)))
    );
    assert!(asked_alive(&drain_transmits(&mut n), addr(2)));
    // A member that left answers the check with its leave...
    let mut x = node_with(timing(), "x", 2, now);
    x.leave(now);
    drain_transmits(&mut x);
    x.handle_packet(addr(1), Some("me"), &packet(&[Message::AliveRequest]), now)
        .unwrap();
    let answer = drain_transmits(&mut x);
    let leave = sent_messages(&answer)
        .into_iter()
        .find(|m| matches!(m, Message::Dead(a) if a.name == "x" && a.from == "x"))
        .unwrap();
    // ... which counts, first-hand.
    let Message::Dead(acc) = leave else {
        unreachable!()
    };
    deliver_as(
        &mut n,
        Some("x"),
        &[dead("x", 1, acc.incarnation.max(1), "x")],
        now,
    );
    assert_eq!(state_of(&n, "x").map(|s| s.0), Some(MemberState::Left));
}

/// Steps `n` until it pings `target`; returns the ping's sequence number
/// and the time.
fn next_ping_to(n: &mut Node, target: SocketAddr, mut t: Instant) -> (u32, Instant) {
    for _ in 0..1000 {
        t += Duration::from_millis(1);
        n.handle_timeout(t);
        for tr in drain_transmits(n) {
            if tr.to == target
                && let Some(Message::Ping(p)) = wire::Messages::new(&tr.payload).next()
            {
                return (p.seq, t);
            }
        }
    }
    panic!("no ping to {target}");
}

#[test]
fn acks_count_only_from_the_probed_member() {
    let now = Instant::now();
    // (No lease: witness pings would be the first pings to x.)
    let config = Config {
        lease: crate::LeaseStrategy::Off,
        ..timing()
    };
    for (sender, refused) in [(Some("y"), true), (None, true), (Some("x"), false)] {
        let mut n = node_with(config.clone(), "me", 1, now);
        deliver(&mut n, &[alive("x", 1, 1, 2)], now);
        let (seq, t) = next_ping_to(&mut n, addr(2), now);
        deliver_as(&mut n, sender, &[Message::Ack(seq)], t);
        assert_eq!(n.stats().acks_refused, u64::from(refused));
        assert_eq!(n.stats().stray_acks, 0);
        // The probe period ends: a refused ack left it unanswered. (The
        // next probe, started at 200 ms, ends at 400 ms.)
        for ms in 1..=260 {
            n.handle_timeout(t + Duration::from_millis(ms));
        }
        assert_eq!(n.stats().probes_failed, u64::from(refused), "{sender:?}");
    }
}

#[test]
fn indirect_probes_name_only_known_members() {
    let now = Instant::now();
    let mut n = node_knowing_x_and_y(now);
    let req = |target, generation, port| {
        Message::IndirectPing(wire::IndirectPing {
            seq: 5,
            target,
            generation,
            addr: addr(port),
        })
    };
    // A stranger asks; a member asks about a ghost, about x at another
    // address, about x at another generation.
    deliver_as(&mut n, Some("stranger"), &[req("x", 1, 2)], now);
    deliver_as(&mut n, None, &[req("x", 1, 2)], now);
    deliver_as(&mut n, Some("y"), &[req("ghost", 1, 50)], now);
    deliver_as(&mut n, Some("y"), &[req("x", 1, 51)], now);
    deliver_as(&mut n, Some("y"), &[req("x", 2, 2)], now);
    assert!(drain_transmits(&mut n).is_empty());
    assert_eq!(n.stats().relays_refused, 5);
    assert_eq!(n.stats().relays, 0);
    // The real thing is relayed, and only x's ack is forwarded.
    deliver_as(&mut n, Some("y"), &[req("x", 1, 2)], now);
    let transmits = drain_transmits(&mut n);
    let Some(Message::Ping(p)) = transmits
        .iter()
        .find(|t| t.to == addr(2))
        .and_then(|t| wire::Messages::new(&t.payload).next())
    else {
        panic!("no relayed ping: {transmits:?}")
    };
    deliver_as(&mut n, Some("y"), &[Message::Ack(p.seq)], now);
    assert!(drain_transmits(&mut n).is_empty());
    assert_eq!(n.stats().acks_refused, 1);
    deliver_as(&mut n, Some("x"), &[Message::Ack(p.seq)], now);
    let forwarded = drain_transmits(&mut n);
    assert!(
        forwarded.iter().any(|t| t.to == addr(9999)
            && wire::Messages::new(&t.payload).next() == Some(Message::Ack(5)))
    );
}

#[test]
fn members_are_capped() {
    let now = Instant::now();
    let config = Config {
        max_members: 3,
        ..timing()
    };
    let mut n = node_with(config, "me", 1, now);
    deliver(
        &mut n,
        &[
            alive("a", 1, 0, 2),
            alive("b", 1, 0, 3),
            alive("c", 1, 0, 4),
        ],
        now,
    );
    assert_eq!(n.members().count(), 3);
    assert!(n.member("c").is_none());
    assert_eq!(n.stats().members_refused, 1);
    // A third party's claim of one more is not even checked.
    drain_transmits(&mut n);
    deliver_as(&mut n, Some("a"), &[alive("d", 1, 0, 5)], now);
    assert!(!asked_alive(&drain_transmits(&mut n), addr(5)));
    assert_eq!(n.stats().members_refused, 2);
}

#[test]
fn a_packet_of_too_many_messages_is_refused_whole() {
    let now = Instant::now();
    let mut n = node_knowing_x_and_y(now);
    let many = vec![Message::AliveRequest; wire::MAX_MESSAGES + 1];
    let mut bytes = wire::new_packet(1024);
    for m in &many {
        wire::encode(m, &mut bytes);
    }
    assert!(matches!(
        n.handle_packet(addr(2), Some("x"), &bytes, now),
        Err(DecodeError::TooManyMessages { .. })
    ));
    assert_eq!(n.stats().decode_errors, 1);
    assert!(drain_transmits(&mut n).is_empty());
}

#[test]
fn a_join_answer_lists_the_members_and_the_joiner_announces_itself_to_them() {
    let now = Instant::now();
    let mut n = node(now);
    n.join(&[addr(50)], now);
    drain_transmits(&mut n);
    let answer = Message::PushPull(PushPull {
        from: "seed",
        join: false,
        reply: false,
    });
    n.handle_packet(
        addr(50),
        Some("seed"),
        &packet(&[
            answer,
            state("seed", 0, 50, WireState::Alive),
            state("other", 0, 51, WireState::Alive),
        ]),
        now,
    )
    .unwrap();
    // The seed we chose is taken at its word for the members it lists...
    assert_eq!(state_of(&n, "other"), Some((MemberState::Alive, 0)));
    // ... and each hears of us from us (they take a new member only first-hand).
    let transmits = drain_transmits(&mut n);
    for to in [addr(50), addr(51)] {
        assert!(transmits.iter().any(|t| {
            t.to == to
                && wire::Messages::new(&t.payload)
                    .any(|m| matches!(m, Message::Alive(a) if a.name == "me"))
        }));
    }
    // Any other push-pull lists members only for a check.
    let unsolicited = Message::PushPull(PushPull {
        from: "other",
        join: false,
        reply: false,
    });
    deliver_as(
        &mut n,
        Some("other"),
        &[unsolicited, state("ghost", 0, 52, WireState::Alive)],
        now,
    );
    assert!(n.member("ghost").is_none());
    assert!(asked_alive(&drain_transmits(&mut n), addr(52)));
}

#[test]
fn only_verdicts_reached_under_a_valid_lease_are_told_as_acted_on() {
    // The heal storm: a node cut off into a minority declares the members
    // it no longer reaches dead while its own lease has lapsed, so it takes
    // nothing over; when they refute after the heal, telling them the
    // verdict was acted on would make them fence for nothing.
    let start = Instant::now();
    let mut n = node_with_peers(timing(), 4, start);
    let mut t = start;
    let everyone = |_: SocketAddr| true;
    run_answering(&mut n, &mut t, start + Duration::from_secs(4), &everyone);
    assert!(n.standing(t).is_valid(), "{:?}", n.standing(t));
    // x0 (port 10) stops answering while the others still do: it is
    // declared dead under a valid lease, which stays valid for longer than
    // the takeover delay after the verdict (its datums were taken over).
    let x0 = addr(10);
    let all_but_x0 = move |a: SocketAddr| a != x0;
    let until = t + Duration::from_secs(8);
    run_answering(&mut n, &mut t, until, &all_but_x0);
    assert!(matches!(state_of(&n, "x0"), Some((MemberState::Dead, _))));
    assert!(n.standing(t).is_valid(), "{:?}", n.standing(t));
    // Then nobody answers: the lease lapses, and the others are declared
    // dead without a lease.
    let nobody = |_: SocketAddr| false;
    let until = t + Duration::from_secs(15);
    let lapsed = run_answering(&mut n, &mut t, until, &nobody);
    assert!(lapsed.is_some());
    let names = ["x1", "x2", "x3"];
    for name in names {
        assert!(
            matches!(state_of(&n, name), Some((MemberState::Dead, _))),
            "{name}: {:?}",
            state_of(&n, name)
        );
    }
    // The heal: each refutes.
    drain_transmits(&mut n);
    for (name, port) in ["x0", "x1", "x2", "x3"].into_iter().zip(10..) {
        deliver_as(&mut n, Some(name), &[alive(name, 1, 50, port)], t);
    }
    let transmits = drain_transmits(&mut n);
    let acted_on: Vec<SocketAddr> = transmits
        .iter()
        .filter(|tr| {
            wire::Messages::new(&tr.payload)
                .any(|m| matches!(m, Message::Dead(a) if a.incarnation == wire::ACTED_ON))
        })
        .map(|tr| tr.to)
        .collect();
    assert!(acted_on.contains(&x0), "{acted_on:?}");
    for port in 11..14 {
        assert!(!acted_on.contains(&addr(port)), "{acted_on:?}");
    }
    for name in names {
        assert!(matches!(state_of(&n, name), Some((MemberState::Alive, 50))));
    }
}

#[test]
fn a_stale_accusation_is_answered_with_the_newer_record_to_its_accuser_once() {
    // x refuted a suspicion (incarnation 3), but y, which cannot hear x,
    // never got the refutation and still accuses it at incarnation 1: it
    // would declare x dead on its own and take datums x holds. Whoever
    // hears y's stale accusation sends x's newer record straight to y.
    let now = Instant::now();
    let mut n = node(now);
    deliver(&mut n, &[alive("x", 1, 3, 2), alive("y", 1, 1, 3)], now);
    drain_transmits(&mut n);
    let alive_x_to_y = |transmits: &[Transmit]| {
        transmits
            .iter()
            .filter(|t| t.to == addr(3))
            .flat_map(|t| wire::Messages::new(&t.payload))
            .filter(|m| matches!(m, Message::Alive(a) if a.name == "x" && a.incarnation == 3))
            .count()
    };
    deliver_as(&mut n, Some("y"), &[suspect("x", 1, 1, "y")], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Alive, 3)));
    assert!(alive_x_to_y(&drain_transmits(&mut n)) >= 1);
    assert_eq!(n.stats().stale_accusations_answered, 1);
    // Copies of the same accusation (gossip repeats it) are answered once;
    // its verdict is answered too, once.
    deliver_as(&mut n, Some("z"), &[suspect("x", 1, 1, "y")], now);
    drain_transmits(&mut n);
    deliver_as(&mut n, Some("y"), &[dead("x", 1, 2, "y")], now);
    assert_eq!(state_of(&n, "x"), Some((MemberState::Alive, 3)));
    drain_transmits(&mut n);
    assert_eq!(n.stats().stale_accusations_answered, 1);
    // An accusation at the current incarnation is a real one.
    deliver_as(&mut n, Some("y"), &[suspect("x", 1, 3, "y")], now);
    assert_eq!(state_of(&n, "x").map(|s| s.0), Some(MemberState::Suspect));
}
