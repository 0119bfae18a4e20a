//! The core's policies, one or two cores driven by hand on a virtual clock.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal_membership::{Event, Member, MemberState};

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Msg {
    id: i64,
    hops: u8,
    origin: String,
}

impl Work for Msg {
    fn datum_type(&self) -> &str {
        "d"
    }
    fn datum_id(&self) -> i64 {
        self.id
    }
    fn hops(&self) -> u8 {
        self.hops
    }
    fn set_hops(&mut self, hops: u8) {
        self.hops = hops;
    }
    fn origin(&self) -> Option<&str> {
        Some(&self.origin)
    }
    fn set_origin(&mut self, origin: &str) {
        self.origin = origin.to_owned();
    }
}

fn msg(id: i64, hops: u8, origin: &str) -> Msg {
    Msg {
        id,
        hops,
        origin: origin.to_owned(),
    }
}

fn member(name: &str, port: u16) -> Member {
    Member {
        name: name.into(),
        generation: 1,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        incarnation: 0,
        state: MemberState::Alive,
        ready: true,
        metadata: [].into(),
    }
}

type TestCore = NodeCore<Msg, u32>;

fn core(name: &str, port: u16) -> TestCore {
    let mut core = TestCore::new(
        member(name, port),
        shoal_transition::Config::default(),
        CoreConfig::default(),
    )
    .unwrap();
    core.set_lease(Lease::Forever, Instant::now());
    core
}

/// Runs every job at once (all succeed) and returns the other outputs.
fn settle(core: &mut TestCore, now: Instant) -> Vec<Output<Msg, u32>> {
    let mut out = Vec::new();
    loop {
        let mut any = false;
        while let Some(job) = core.poll_job() {
            let instance = core.instance();
            core.job_done(instance, job, Ok(()), now);
            any = true;
        }
        while let Some(o) = core.poll_output(now) {
            out.push(o);
            any = true;
        }
        if !any {
            return out;
        }
    }
}

fn forwards(out: &[Output<Msg, u32>]) -> Vec<(String, Msg)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Forward { to, work, .. } => Some((to.name.clone(), work.clone())),
            _ => None,
        })
        .collect()
}

fn delivered(out: &[Output<Msg, u32>]) -> Vec<Msg> {
    out.iter()
        .filter_map(|o| match o {
            Output::Deliver(w) => Some(w.clone()),
            _ => None,
        })
        .collect()
}

/// Core `a` in the view of `a` and `b`, and a datum `b` owns there.
fn a_next_to_b(now: Instant) -> (TestCore, i64) {
    let mut a = core("a", 1);
    a.handle_membership(
        Event::ViewChanged(vec![member("a", 1), member("b", 2)]),
        now,
    );
    settle(&mut a, now);
    let id = owned_by(&a, "b");
    (a, id)
}

/// A datum id whose primary in the view of `a` and `b` is `owner`.
fn owned_by(core: &TestCore, owner: &str) -> i64 {
    let table = core.handoff().table();
    (0..64)
        .find(|&id| {
            table
                .primary(id)
                .and_then(|i| table.view().node(i))
                .is_some_and(|n| n.name == owner)
        })
        .unwrap()
}

#[test]
fn work_for_another_owner_is_forwarded_once_then_parked_and_routed_again() {
    let now = Instant::now();
    let (mut a, id) = a_next_to_b(now);
    // Sent here by the application: forwarded, its hop count unchanged.
    a.route_local(msg(id, 0, "a"), now);
    let out = settle(&mut a, now);
    assert_eq!(forwards(&out), vec![("b".to_owned(), msg(id, 0, "a"))]);
    // From a peer, first hop: forwarded with one hop more.
    a.route_from_peer(msg(id, 0, "c"), "c", now);
    assert_eq!(
        forwards(&settle(&mut a, now)),
        vec![("b".into(), msg(id, 1, "c"))]
    );
    // Already forwarded once (the sender thinks `a` owns it): parked, not
    // bounced on, and routed again after the re-route delay.
    a.route_from_peer(msg(id, 1, "c"), "b", now);
    assert!(forwards(&settle(&mut a, now)).is_empty());
    assert_eq!(a.parked(), 1);
    let retry = a.poll_timeout().unwrap();
    assert_eq!(retry, now + CoreConfig::default().reroute_delay);
    a.handle_timeout(retry);
    assert_eq!(
        forwards(&settle(&mut a, retry)),
        vec![("b".into(), msg(id, 2, "c"))]
    );
    assert_eq!(a.parked(), 0);
    assert_eq!(a.counters().forwarded, 3);
}

#[test]
fn an_origin_that_does_not_fit_its_sender_is_replaced() {
    let now = Instant::now();
    let mut a = core("a", 1);
    a.handle_membership(Event::ViewChanged(vec![member("a", 1)]), now);
    settle(&mut a, now);
    // A first hop must come from its origin.
    a.route_from_peer(msg(3, 0, "mallory"), "b", now);
    // A forwarded one from a member (or one that just left): `z` is neither.
    a.route_from_peer(msg(4, 1, "mallory"), "z", now);
    a.route_from_peer(msg(5, 1, "c"), "a", now);
    let got = delivered(&settle(&mut a, now));
    assert_eq!(
        got,
        vec![msg(3, 0, "b"), msg(4, 1, "z"), msg(5, 1, "c")],
        "the origins that did not fit were replaced by their senders"
    );
    assert_eq!(a.counters().origin_replaced, 2);
}

#[test]
fn without_a_lease_work_for_a_held_datum_waits_and_goes_out_once_it_is_valid() {
    let now = Instant::now();
    let mut a = core("a", 1);
    a.handle_membership(Event::ViewChanged(vec![member("a", 1)]), now);
    a.register("d", 1, now).unwrap();
    settle(&mut a, now);
    a.set_lease(Lease::Until(now + Duration::from_secs(1)), now);
    let later = now + Duration::from_secs(2);
    // The lease lapsed at its deadline: nothing is processed.
    a.route_local(msg(1, 0, "a"), later);
    assert!(delivered(&settle(&mut a, later)).is_empty());
    assert!(!a.lease_valid(later));
    a.set_lease(Lease::Until(later + Duration::from_secs(1)), later);
    assert_eq!(delivered(&settle(&mut a, later)), vec![msg(1, 0, "a")]);
}

#[test]
fn a_notice_batch_for_a_view_not_installed_waits_for_it() {
    let now = Instant::now();
    let (ma, mb) = (member("a", 1), member("b", 2));
    let mut a = core("a", 1);
    let mut b = core("b", 2);
    a.register("d", 0, now).unwrap();
    a.register("d", 1, now).unwrap();
    a.handle_membership(Event::ViewChanged(vec![ma.clone()]), now);
    settle(&mut a, now);
    b.handle_membership(Event::ViewChanged(vec![mb.clone()]), now);
    // `a` sees `b` join first and relinquishes what moves to it.
    a.handle_membership(Event::ViewChanged(vec![ma.clone(), mb.clone()]), now);
    let batches: Vec<_> = settle(&mut a, now)
        .into_iter()
        .filter_map(|o| match o {
            Output::SendNotices { batch, .. } => Some(batch),
            _ => None,
        })
        .collect();
    assert!(!batches.is_empty());
    for (i, batch) in batches.iter().enumerate() {
        b.handle_notices("a", &batch.encode(), i as u32, now);
    }
    // Not answered yet: `b` has not installed that view.
    assert_eq!(b.early_notices(), batches.len());
    assert!(
        settle(&mut b, now)
            .iter()
            .all(|o| !matches!(o, Output::AnswerNotices { .. }))
    );
    // The view arrives within the grace: the batches sent under it are
    // taken; the one sent under `a`'s former view waits out its grace.
    let answers = |out: Vec<Output<Msg, u32>>| -> Vec<(u32, bool)> {
        out.into_iter()
            .filter_map(|o| match o {
                Output::AnswerNotices { reply, accepted } => Some((reply, accepted)),
                _ => None,
            })
            .collect()
    };
    let soon = now + Duration::from_millis(100);
    b.handle_membership(Event::ViewChanged(vec![ma, mb]), soon);
    let ab = b.handoff().view_id();
    let taken = answers(settle(&mut b, soon));
    let under_ab: Vec<u32> = (0..batches.len() as u32)
        .filter(|&i| batches[i as usize].view == ab)
        .collect();
    assert!(!under_ab.is_empty() && under_ab.len() < batches.len());
    assert_eq!(
        taken,
        under_ab.iter().map(|&i| (i, true)).collect::<Vec<_>>()
    );
    let grace = now + CoreConfig::default().notice_grace;
    assert_eq!(b.poll_timeout(), Some(grace));
    b.handle_timeout(grace);
    assert_eq!(
        answers(settle(&mut b, grace)).len(),
        batches.len() - under_ab.len()
    );
    assert_eq!(b.early_notices(), 0);
}

#[test]
fn an_undecodable_notice_batch_is_refused_and_counted() {
    let now = Instant::now();
    let mut a = core("a", 1);
    a.handle_notices("b", &[0xff, 0x00, 0x13], 7, now);
    let out = settle(&mut a, now);
    assert!(matches!(
        out.as_slice(),
        [Output::AnswerNotices {
            reply: 7,
            accepted: false
        }]
    ));
    assert_eq!(a.counters().malformed_notices, 1);
}

#[test]
fn sends_to_a_failed_member_are_cancelled_and_their_late_outcome_ignored() {
    let now = Instant::now();
    let (ma, mb) = (member("a", 1), member("b", 2));
    let mut a = core("a", 1);
    a.register("d", 0, now).unwrap();
    a.register("d", 1, now).unwrap();
    a.handle_membership(Event::ViewChanged(vec![ma.clone()]), now);
    settle(&mut a, now);
    a.handle_membership(Event::ViewChanged(vec![ma.clone(), mb.clone()]), now);
    let sends: Vec<_> = settle(&mut a, now)
        .into_iter()
        .filter_map(|o| match o {
            Output::SendNotices { instance, id, .. } => Some((instance, id)),
            _ => None,
        })
        .collect();
    assert!(!sends.is_empty());
    a.handle_membership(Event::Failed(mb.clone()), now);
    let out = settle(&mut a, now);
    let mut cancelled: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::CancelNotices(id) => Some(*id),
            _ => None,
        })
        .collect();
    cancelled.sort();
    assert_eq!(cancelled, sends.iter().map(|s| s.1).collect::<Vec<_>>());
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::PeerGone(addr) if *addr == mb.addr))
    );
    // The cancelled sends' outcomes arrive anyway: ignored.
    let before = a.handoff().counters().clone();
    for (instance, id) in sends {
        a.send_done(instance, id, Ok(()), now);
    }
    assert_eq!(*a.handoff().counters(), before);
}

#[test]
fn after_a_rebirth_the_old_generation_s_completions_are_ignored() {
    let now = Instant::now();
    let ma = member("a", 1);
    let mut a = core("a", 1);
    a.handle_membership(Event::ViewChanged(vec![ma.clone()]), now);
    a.register("d", 0, now).unwrap();
    let job = a.poll_job().unwrap();
    let old = a.instance();
    a.handle_membership(Event::DeclaredFailed, now);
    assert!(a.is_fenced());
    let mut next = ma.clone();
    next.generation = 2;
    a.reborn(next, now).unwrap();
    assert!(!a.is_fenced());
    assert_ne!(a.instance(), old);
    assert_eq!(a.me().generation, 2);
    // The new machine knows nothing of the old one's job.
    a.job_done(old, job, Ok(()), now);
    assert_eq!(a.handoff().counters().acquired, 0);
}

#[test]
fn a_closing_node_forwards_with_acknowledgement_and_parks_nothing() {
    let now = Instant::now();
    let (mut a, id) = a_next_to_b(now);
    a.close(now);
    // Past the hop limit: a closing node forwards anyway.
    a.route_from_peer(msg(id, 1, "c"), "b", now);
    let out = settle(&mut a, now);
    assert!(matches!(
        out.as_slice(),
        [Output::Forward {
            acknowledged: true,
            ..
        }]
    ));
    assert_eq!((a.parked(), a.forwards_in_flight()), (0, 1));
    assert!(!a.routed_idle());
    // The receiver took it: nothing is left here.
    let to = a.me().clone();
    a.forward_done(to, msg(id, 2, "c"), ForwardOutcome::Taken, now);
    assert!(a.routed_idle());
}
