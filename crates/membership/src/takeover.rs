//! The takeover gate: a member declared dead is reported failed to the
//! layers above only once its lease must have lapsed.
//!
//! [`Membership`](crate::Membership) declares a member dead as soon as its
//! suspicion times out, and gossips the verdict. The member may still be
//! acting as an owner: cut off, it keeps its lease until `lease_period`
//! after its last answered probe, or it was wrongly accused (a stale verdict
//! from a node that was itself cut off) and refutes as soon as it hears. A
//! layer that fails the member's datums over at the verdict would give them
//! two owners. [`TakeoverGate`] sits between the membership events and such
//! a layer: it holds each [`Event::Failed`] of a declared death back for
//! [`Config::takeover_delay`] after the start of the suspicion behind the
//! verdict (when this node held the member suspect at the verdict's
//! incarnation; otherwise after the verdict itself), keeps the member in
//! every [`Event::ViewChanged`] meanwhile (as suspect), and drops the
//! failure if the member comes back alive first (it refuted). A member
//! superseded by a new generation, or that left, is released at once: the
//! old generation has stopped. Sans-IO: inputs with `now`, outputs polled.
//!
//! Why the delay may count from the suspicion: the member has answered no
//! probe since the suspicion started (an answer, or a refutation, would
//! have ended it), so a member that is dead or cut off sent its last
//! answered lease ping before then, and its lease lapses at most
//! `lease_period` (stretched by the clock drift) later. Counting from the
//! verdict instead would add the whole suspicion timeout (about 1 s on
//! `lan` at 16 members) to every failover.
//!
//! The facade and the simulator both feed their membership events through
//! it, so the simulator checks the policy the product runs.
//!
//! [`Config::takeover_delay`]: crate::Config::takeover_delay

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{Event, Member, MemberState};

/// Most members held back at once; past it the oldest pending failure is
/// released early (counted in [`TakeoverGate::released_early`]). A cluster
/// losing this many members at once is failing over in bulk anyway.
const MAX_PENDING: usize = 65_536;

struct Pending {
    member: Member,
    due: Instant,
}

/// Holds failures of declared-dead members back for the takeover delay:
/// each [`Event::Failed`] of a declared death waits until
/// [`Config::takeover_delay`](crate::Config::takeover_delay) after this
/// node first saw the member suspected at the verdict's incarnation
/// ([`Event::Suspected`]), or after the verdict when it did not, and never
/// less than until the verdict; the member stays in every [`Event::ViewChanged`] meanwhile (as
/// suspect), and the failure is dropped if the member comes back alive
/// first; a superseded or departed member is released at once
/// (`docs/membership.md`, "Takeover gate").
pub struct TakeoverGate {
    delay: Duration,
    /// Count the delay from the suspicion behind a verdict (else from the
    /// verdict).
    from_suspicion: bool,
    pending: VecDeque<Pending>,
    out: VecDeque<Event>,
    /// The last view membership reported, without the pending members.
    view: Option<Vec<Member>>,
    /// Members seen suspected and not yet refuted, failed or gone: by
    /// (name, generation), the incarnation and when the suspicion was
    /// first seen. At most [`MAX_PENDING`]; past it a suspicion is not
    /// recorded and its failure waits the full delay after the verdict.
    suspected: HashMap<(Arc<str>, u64), (u64, Instant)>,
    released_early: u64,
    withdrawn: u64,
}

impl std::fmt::Debug for TakeoverGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TakeoverGate")
            .field("delay", &self.delay)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl TakeoverGate {
    /// A gate holding failures back for `delay` (use
    /// [`Membership::takeover_delay`](crate::Membership::takeover_delay)).
    /// A zero delay passes every event through unchanged.
    #[must_use]
    pub fn new(delay: Duration) -> TakeoverGate {
        TakeoverGate {
            delay,
            from_suspicion: true,
            pending: VecDeque::new(),
            out: VecDeque::new(),
            view: None,
            suspected: HashMap::new(),
            released_early: 0,
            withdrawn: 0,
        }
    }

    /// Whether the delay counts from the start of the suspicion behind a
    /// verdict (the default) or from the verdict itself
    /// ([`Config::takeover_from_suspicion`](crate::Config::takeover_from_suspicion);
    /// [`Membership::takeover_gate`](crate::Membership::takeover_gate) sets
    /// it from the configuration).
    #[must_use]
    pub fn counting_from_suspicion(mut self, yes: bool) -> TakeoverGate {
        self.from_suspicion = yes;
        self
    }

    /// Takes one membership event, in the order membership emitted them.
    /// Poll [`TakeoverGate::poll_event`] for what the layer above must see.
    pub fn handle_event(&mut self, event: Event, now: Instant) {
        self.release_due(now);
        match event {
            Event::Failed(m) if m.state == MemberState::Dead && !self.delay.is_zero() => {
                if self.pending.len() >= MAX_PENDING
                    && let Some(p) = self.pending.pop_front()
                {
                    self.released_early += 1;
                    self.release(p.member);
                }
                let from = match self.suspected.remove(&(Arc::clone(&m.name), m.generation)) {
                    Some((incarnation, since))
                        if self.from_suspicion && incarnation == m.incarnation =>
                    {
                        since
                    }
                    _ => now,
                };
                let due = (from + self.delay).max(now);
                self.pending.retain(|p| !same(&p.member, &m));
                // Kept in order of `due`: suspicions start at different times.
                let at = self.pending.partition_point(|p| p.due <= due);
                self.pending.insert(at, Pending { member: m, due });
                // The member stays in the view until it is released (at
                // once if its suspicion started a whole delay ago).
                self.push_view();
                self.release_due(now);
            }
            Event::Suspected(m) => {
                let key = (Arc::clone(&m.name), m.generation);
                match self.suspected.get(&key) {
                    Some((incarnation, _)) if *incarnation == m.incarnation => {}
                    _ if self.suspected.len() >= MAX_PENDING
                        && !self.suspected.contains_key(&key) => {}
                    _ => {
                        self.suspected.insert(key, (m.incarnation, now));
                    }
                }
                self.out.push_back(Event::Suspected(m));
            }
            Event::Alive(m) | Event::Updated(m) if self.is_pending(&m) => {
                self.forget_suspicion(&m);
                // It refuted the verdict before anyone took its datums.
                self.pending.retain(|p| !same(&p.member, &m));
                self.withdrawn += 1;
                self.out.push_back(Event::Alive(m));
            }
            Event::Alive(m) => {
                self.forget_suspicion(&m);
                self.out.push_back(Event::Alive(m));
            }
            Event::Updated(m) => {
                self.forget_suspicion(&m);
                self.out.push_back(Event::Updated(m));
            }
            Event::Joined(m) => {
                self.suspected.retain(|(name, _), _| *name != m.name);
                // A new generation of a pending name: the old one stopped.
                if let Some(i) = self.pending.iter().position(|p| p.member.name == m.name)
                    && let Some(p) = self.pending.remove(i)
                {
                    if p.member.generation == m.generation {
                        self.withdrawn += 1;
                    } else {
                        self.release(p.member);
                    }
                }
                self.out.push_back(Event::Joined(m));
            }
            Event::Left(m) => {
                self.forget_suspicion(&m);
                self.pending
                    .retain(|p| !(p.member.name == m.name && p.member.generation == m.generation));
                self.out.push_back(Event::Left(m));
            }
            Event::ViewChanged(members) => {
                self.view = Some(members);
                self.push_view();
            }
            other => self.out.push_back(other),
        }
    }

    /// Releases the failures whose delay has passed, as of `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.release_due(now);
    }

    /// The next event for the layer above.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.out.pop_front()
    }

    /// When [`TakeoverGate::handle_timeout`] must next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.front().map(|p| p.due)
    }

    /// Members declared dead whose failure is still held back.
    pub fn pending(&self) -> impl Iterator<Item = &Member> {
        self.pending.iter().map(|p| &p.member)
    }

    /// Failures withdrawn because the member came back alive in time.
    #[must_use]
    pub fn withdrawn(&self) -> u64 {
        self.withdrawn
    }

    /// Failures released before their delay because too many were pending.
    #[must_use]
    pub fn released_early(&self) -> u64 {
        self.released_early
    }

    fn forget_suspicion(&mut self, m: &Member) {
        if !self.suspected.is_empty() {
            self.suspected.remove(&(Arc::clone(&m.name), m.generation));
        }
    }

    fn is_pending(&self, m: &Member) -> bool {
        self.pending.iter().any(|p| same(&p.member, m))
    }

    fn release_due(&mut self, now: Instant) {
        while self.pending.front().is_some_and(|p| p.due <= now) {
            if let Some(p) = self.pending.pop_front() {
                self.release(p.member);
            }
        }
    }

    /// Reports the failure, then the view without the member.
    fn release(&mut self, member: Member) {
        self.out.push_back(Event::Failed(member));
        self.push_view();
    }

    /// The last view with the pending members in it, as suspects. One view
    /// event at most waits in the queue: an older one is replaced.
    fn push_view(&mut self) {
        let Some(view) = &self.view else {
            return;
        };
        let mut members = view.clone();
        for p in &self.pending {
            if !members.iter().any(|m| m.name == p.member.name) {
                let mut m = p.member.clone();
                m.state = MemberState::Suspect;
                members.push(m);
            }
        }
        members.sort_by(|a, b| a.name.cmp(&b.name));
        self.out.retain(|e| !matches!(e, Event::ViewChanged(_)));
        self.out.push_back(Event::ViewChanged(members));
    }
}

fn same(a: &Member, b: &Member) -> bool {
    Arc::ptr_eq(&a.name, &b.name) || (a.name == b.name && a.generation == b.generation)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::net::SocketAddr;

    fn member(name: &str, generation: u64, state: MemberState) -> Member {
        Member {
            name: name.into(),
            generation,
            addr: SocketAddr::from(([127, 0, 0, 1], 7000)),
            incarnation: 1,
            state,
            ready: true,
            metadata: Arc::from(&[][..]),
        }
    }

    fn drain(g: &mut TakeoverGate) -> Vec<Event> {
        std::iter::from_fn(|| g.poll_event()).collect()
    }

    fn names(e: &Event) -> Vec<String> {
        match e {
            Event::ViewChanged(v) => v.iter().map(|m| m.name.to_string()).collect(),
            _ => vec![],
        }
    }

    #[test]
    fn a_failure_waits_the_delay_with_the_member_still_in_the_view() {
        let t0 = Instant::now();
        let mut g = TakeoverGate::new(Duration::from_secs(2));
        let (a, b) = (
            member("a", 1, MemberState::Alive),
            member("b", 1, MemberState::Alive),
        );
        g.handle_event(Event::ViewChanged(vec![a.clone(), b.clone()]), t0);
        assert_eq!(drain(&mut g).len(), 1);
        let dead = member("b", 1, MemberState::Dead);
        g.handle_event(Event::Failed(dead.clone()), t0);
        g.handle_event(Event::ViewChanged(vec![a.clone()]), t0);
        let out = drain(&mut g);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(names(&out[0]), vec!["a", "b"]);
        assert_eq!(g.poll_timeout(), Some(t0 + Duration::from_secs(2)));
        g.handle_timeout(t0 + Duration::from_millis(1999));
        assert!(drain(&mut g).is_empty());
        g.handle_timeout(t0 + Duration::from_secs(2));
        let out = drain(&mut g);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0], Event::Failed(dead));
        assert_eq!(names(&out[1]), vec!["a"]);
        assert!(g.poll_timeout().is_none());
    }

    #[test]
    fn the_delay_counts_from_the_suspicion_at_the_verdicts_incarnation() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut g = TakeoverGate::new(s(2));
        g.handle_event(Event::Suspected(member("b", 1, MemberState::Suspect)), t0);
        g.handle_event(Event::Suspected(member("c", 1, MemberState::Suspect)), t0);
        // Seen again later at the same incarnation: the first sight counts.
        g.handle_event(
            Event::Suspected(member("b", 1, MemberState::Suspect)),
            t0 + s(1),
        );
        drain(&mut g);
        let b = member("b", 1, MemberState::Dead);
        g.handle_event(Event::Failed(b.clone()), t0 + s(1));
        assert_eq!(g.poll_timeout(), Some(t0 + s(2)));
        // A verdict at a later incarnation than the suspicion: full delay.
        let mut c = member("c", 1, MemberState::Dead);
        c.incarnation = 2;
        g.handle_event(Event::Failed(c.clone()), t0 + s(1));
        g.handle_timeout(t0 + s(2));
        let failed = |out: Vec<Event>| -> Vec<Member> {
            out.into_iter()
                .filter_map(|e| match e {
                    Event::Failed(m) => Some(m),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(failed(drain(&mut g)), vec![b]);
        assert_eq!(g.poll_timeout(), Some(t0 + s(3)));
        g.handle_timeout(t0 + s(3));
        assert_eq!(failed(drain(&mut g)), vec![c]);
        // A suspicion that started a whole delay before the verdict: the
        // failure is released at the verdict, never before it.
        g.handle_event(Event::Suspected(member("d", 1, MemberState::Suspect)), t0);
        let d = member("d", 1, MemberState::Dead);
        g.handle_event(Event::Failed(d.clone()), t0 + s(5));
        assert_eq!(failed(drain(&mut g)), vec![d]);
        // A refuted suspicion is forgotten: a later verdict waits the delay.
        g.handle_event(Event::Suspected(member("e", 1, MemberState::Suspect)), t0);
        g.handle_event(Event::Alive(member("e", 1, MemberState::Alive)), t0 + s(1));
        g.handle_event(Event::Failed(member("e", 1, MemberState::Dead)), t0 + s(3));
        assert!(failed(drain(&mut g)).is_empty());
        assert_eq!(g.poll_timeout(), Some(t0 + s(5)));
        // Counting from the verdict (the `Majority` lease): a suspicion
        // changes nothing.
        let mut g = TakeoverGate::new(s(2)).counting_from_suspicion(false);
        g.handle_event(Event::Suspected(member("b", 1, MemberState::Suspect)), t0);
        g.handle_event(Event::Failed(member("b", 1, MemberState::Dead)), t0 + s(1));
        assert_eq!(g.poll_timeout(), Some(t0 + s(3)));
    }

    #[test]
    fn a_refutation_in_time_withdraws_the_failure() {
        let t0 = Instant::now();
        let mut g = TakeoverGate::new(Duration::from_secs(2));
        let a = member("a", 1, MemberState::Alive);
        g.handle_event(Event::ViewChanged(vec![a.clone()]), t0);
        g.handle_event(Event::Failed(member("b", 1, MemberState::Dead)), t0);
        drain(&mut g);
        let back = member("b", 1, MemberState::Alive);
        g.handle_event(Event::Alive(back.clone()), t0 + Duration::from_secs(1));
        g.handle_event(
            Event::ViewChanged(vec![a, back.clone()]),
            t0 + Duration::from_secs(1),
        );
        g.handle_timeout(t0 + Duration::from_secs(5));
        let out = drain(&mut g);
        assert!(
            !out.iter().any(|e| matches!(e, Event::Failed(_))),
            "{out:?}"
        );
        assert_eq!(out[0], Event::Alive(back));
        assert_eq!(g.withdrawn(), 1);
    }

    #[test]
    fn a_new_generation_or_a_leave_ends_the_wait_at_once() {
        let t0 = Instant::now();
        let mut g = TakeoverGate::new(Duration::from_secs(2));
        g.handle_event(Event::Failed(member("b", 1, MemberState::Dead)), t0);
        g.handle_event(Event::Joined(member("b", 2, MemberState::Alive)), t0);
        let out = drain(&mut g);
        assert!(
            matches!(&out[0], Event::Failed(m) if m.generation == 1),
            "{out:?}"
        );
        assert!(matches!(&out[1], Event::Joined(m) if m.generation == 2));
        g.handle_event(Event::Failed(member("c", 1, MemberState::Dead)), t0);
        g.handle_event(Event::Left(member("c", 1, MemberState::Left)), t0);
        let out = drain(&mut g);
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Event::Left(_)));
        assert!(g.poll_timeout().is_none());
    }

    #[test]
    fn supersession_and_a_zero_delay_pass_through() {
        let t0 = Instant::now();
        let mut g = TakeoverGate::new(Duration::from_secs(2));
        // Superseded while alive: not a declared death.
        let old = member("b", 1, MemberState::Alive);
        g.handle_event(Event::Failed(old.clone()), t0);
        assert_eq!(drain(&mut g), vec![Event::Failed(old)]);
        let mut g = TakeoverGate::new(Duration::ZERO);
        let dead = member("b", 1, MemberState::Dead);
        g.handle_event(Event::Failed(dead.clone()), t0);
        assert_eq!(drain(&mut g), vec![Event::Failed(dead)]);
    }
}
