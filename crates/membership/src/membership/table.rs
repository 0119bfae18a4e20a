//! The members table: the remote members' records (slots), the name index,
//! the live count, the probe order and the down/reap bookkeeping, kept in
//! step by the only methods that change a member's state: [`Table::insert`],
//! [`Table::apply`] and [`Table::remove`].
//!
//! The invariants it owns:
//! - `live` is the number of remote members alive or suspect;
//! - a member that becomes live (inserted live, or back from dead or left)
//!   joins the current probe round at a random place; one that goes down
//!   stays in the order and is skipped;
//! - a member is in `down_since` (and due for reaping `reap_after` later)
//!   exactly while it is dead or left, from the instant it went down;
//!   `suspected_from` is set only for a member dead here, and goes with
//!   `down_since`.
//!
//! What a state change means to the rest of `Membership` (the lease, the
//! suspicion timers, events) is the caller's: each method returns what it
//! changed.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rand::Rng;
use rand::seq::SliceRandom;

use super::{LOCAL_SLOT, SAMPLE_ATTEMPTS, later};
use crate::hash::{NameIndex, SeededState, SlotMap};
use crate::{Member, MemberState};

/// The remote members of one node's view (the node itself is not in it).
#[derive(Debug)]
pub(crate) struct Table {
    /// Remote members; `None` marks a reaped slot that `free` will reuse.
    members: Vec<Option<Member>>,
    free: Vec<u32>,
    index: NameIndex,
    /// Remote members alive or suspect.
    live: usize,
    probe_order: Vec<u32>,
    probe_pos: usize,
    /// When each dead or left member went down.
    down_since: SlotMap<Instant>,
    /// For a member declared dead here after this node had held it suspect
    /// at the incarnation of the verdict: when that suspicion started (the
    /// takeover gate counts the takeover delay from it).
    suspected_from: SlotMap<Instant>,
    /// (when due, slot): a down member is reaped `reap_after` after it went
    /// down (an entry whose time no longer matches `down_since` is stale).
    reap_queue: BTreeSet<(Instant, u32)>,
    reap_after: Duration,
}

impl Table {
    pub(crate) fn new(hasher: SeededState, reap_after: Duration) -> Self {
        Table {
            members: Vec::new(),
            free: Vec::new(),
            index: NameIndex::new(hasher),
            live: 0,
            probe_order: Vec::new(),
            probe_pos: 0,
            down_since: SlotMap::default(),
            suspected_from: SlotMap::default(),
            reap_queue: BTreeSet::new(),
            reap_after,
        }
    }

    // ----- reading ----------------------------------------------------------

    /// The member in `slot`.
    pub(crate) fn get(&self, slot: u32) -> Option<&Member> {
        self.members.get(slot as usize).and_then(Option::as_ref)
    }

    /// The slot of the member called `name`.
    pub(crate) fn find(&self, name: &str) -> Option<u32> {
        self.index.get(name, &self.members)
    }

    /// The member called `name`.
    pub(crate) fn by_name(&self, name: &str) -> Option<&Member> {
        self.find(name).and_then(|slot| self.get(slot))
    }

    /// Number of members (any state).
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// Number of members alive or suspect.
    pub(crate) fn live(&self) -> usize {
        self.live
    }

    /// Number of slots, occupied or not: every slot is below it.
    pub(crate) fn slots(&self) -> usize {
        self.members.len()
    }

    /// Every member, in slot order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().flatten()
    }

    /// Every member with its slot, in slot order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (u32, &Member)> {
        self.members.iter().enumerate().filter_map(|(slot, m)| {
            let slot = u32::try_from(slot).ok()?;
            m.as_ref().map(|m| (slot, m))
        })
    }

    /// Every slot and its member's state (`None`: an empty slot).
    pub(crate) fn states(&self) -> impl Iterator<Item = (u32, Option<MemberState>)> {
        self.members.iter().enumerate().map(|(slot, m)| {
            (
                u32::try_from(slot).unwrap_or(u32::MAX),
                m.as_ref().map(|m| m.state),
            )
        })
    }

    /// When the member in `slot` went down (dead or left), if it is down.
    pub(crate) fn down_since(&self, slot: u32) -> Option<Instant> {
        self.down_since.get(&slot).copied()
    }

    /// Whether any member is down.
    pub(crate) fn any_down(&self) -> bool {
        !self.down_since.is_empty()
    }

    /// When the suspicion behind this node's dead verdict about `slot`
    /// started, if it held one at the verdict's incarnation.
    pub(crate) fn suspected_from(&self, slot: u32) -> Option<Instant> {
        self.suspected_from.get(&slot).copied()
    }

    /// The next reap due.
    pub(crate) fn next_reap_at(&self) -> Option<Instant> {
        self.reap_queue.first().map(|(at, _)| *at)
    }

    // ----- changing ---------------------------------------------------------

    /// Makes room for `additional` more members.
    pub(crate) fn reserve(&mut self, additional: usize) {
        self.members.reserve(additional);
        self.index.reserve(additional, &self.members);
    }

    /// Stores a new member (its name not in the table) in a free slot, in
    /// the state it carries: live, it counts and joins the probe round;
    /// down, it is due for reaping from `now`.
    pub(crate) fn insert(&mut self, member: Member, now: Instant, rng: &mut impl Rng) -> u32 {
        let state = member.state;
        let slot = match self.free.pop() {
            Some(slot) => {
                if let Some(entry) = self.members.get_mut(slot as usize) {
                    *entry = Some(member);
                }
                slot
            }
            None => {
                let slot = u32::try_from(self.members.len()).unwrap_or(LOCAL_SLOT - 1);
                self.members.push(Some(member));
                slot
            }
        };
        self.index.insert(slot, &self.members);
        if state.is_live() {
            self.live += 1;
            self.add_to_probe_order(slot, rng);
        } else {
            self.mark_down(slot, now);
        }
        slot
    }

    /// Moves the member in `slot` to `state` at `now`, keeping the live
    /// count, the probe order and the down bookkeeping in step; returns
    /// the state it was in (`None`: no member there, nothing changed).
    /// Going down starts its reap timer; coming back ends it.
    pub(crate) fn apply(
        &mut self,
        slot: u32,
        state: MemberState,
        now: Instant,
        rng: &mut impl Rng,
    ) -> Option<MemberState> {
        let member = self
            .members
            .get_mut(slot as usize)
            .and_then(Option::as_mut)?;
        let was = member.state;
        member.state = state;
        match (was.is_live(), state.is_live()) {
            (false, true) => {
                self.clear_down(slot);
                self.live += 1;
                self.add_to_probe_order(slot, rng);
            }
            (true, false) => {
                self.live = self.live.saturating_sub(1);
                self.mark_down(slot, now);
            }
            (true, true) | (false, false) => {}
        }
        Some(was)
    }

    /// Changes the record in `slot` other than its state and name (those
    /// are the table's: `apply` changes the state, and a name is its slot's
    /// for as long as the member is stored).
    pub(crate) fn edit(&mut self, slot: u32, edit: impl FnOnce(&mut Member)) {
        let Some(member) = self.members.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        let state = member.state;
        edit(member);
        member.state = state;
    }

    /// Records when the suspicion behind this node's dead verdict about
    /// `slot` started; only for a member dead here.
    pub(crate) fn set_suspected_from(&mut self, slot: u32, start: Instant) {
        if self.get(slot).is_some_and(|m| m.state == MemberState::Dead)
            && self.down_since.contains_key(&slot)
        {
            self.suspected_from.insert(slot, start);
        }
    }

    /// Takes the member out of `slot` (the slot is reused later).
    pub(crate) fn remove(&mut self, slot: u32) -> Option<Member> {
        let member = self.members.get_mut(slot as usize).and_then(Option::take)?;
        self.index.remove(&member.name, slot);
        self.free.push(slot);
        self.clear_down(slot);
        if member.state.is_live() {
            self.live = self.live.saturating_sub(1);
        }
        Some(member)
    }

    /// The next member due for reaping at `now`: down since `reap_after`
    /// ago and down still. Taken off the queue; the caller removes it.
    pub(crate) fn next_reap(&mut self, now: Instant) -> Option<u32> {
        while let Some(&(at, slot)) = self.reap_queue.first() {
            if at > now {
                return None;
            }
            self.reap_queue.pop_first();
            let current = self
                .down_since
                .get(&slot)
                .is_some_and(|since| later(*since, self.reap_after) == at);
            if current && self.get(slot).is_some_and(|m| !m.state.is_live()) {
                return Some(slot);
            }
        }
        None
    }

    /// New members are probed in the current round, at a random place.
    fn add_to_probe_order(&mut self, slot: u32, rng: &mut impl Rng) {
        self.probe_order.push(slot);
        let len = self.probe_order.len();
        if self.probe_pos < len {
            let at = rng.random_range(self.probe_pos..len);
            self.probe_order.swap(at, len - 1);
        }
    }

    fn mark_down(&mut self, slot: u32, now: Instant) {
        if let Some(old) = self.down_since.insert(slot, now) {
            self.reap_queue.remove(&(later(old, self.reap_after), slot));
        }
        self.reap_queue.insert((later(now, self.reap_after), slot));
    }

    fn clear_down(&mut self, slot: u32) {
        self.suspected_from.remove(&slot);
        if let Some(old) = self.down_since.remove(&slot) {
            self.reap_queue.remove(&(later(old, self.reap_after), slot));
        }
    }

    // ----- choosing members -------------------------------------------------

    /// The next live member to probe: the probe order walked round by
    /// round, reshuffled at the end of each.
    pub(crate) fn next_probe_target(&mut self, rng: &mut impl Rng) -> Option<u32> {
        for _ in 0..2 {
            while let Some(&slot) = self.probe_order.get(self.probe_pos) {
                self.probe_pos += 1;
                if self.get(slot).is_some_and(|m| m.state.is_live()) {
                    return Some(slot);
                }
            }
            // End of a round: reshuffle the live members.
            self.probe_order.clear();
            self.probe_order.extend(
                self.members
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.as_ref().is_some_and(|m| m.state.is_live()))
                    .filter_map(|(slot, _)| u32::try_from(slot).ok()),
            );
            self.probe_order.shuffle(rng);
            self.probe_pos = 0;
            if self.probe_order.is_empty() {
                return None;
            }
        }
        None
    }

    /// Picks up to `count` distinct members passing `keep` into `out`, at
    /// random: random draws first (O(count) when most members qualify),
    /// then a scan of everyone.
    pub(crate) fn sample(
        &self,
        count: usize,
        out: &mut Vec<u32>,
        rng: &mut impl Rng,
        keep: impl Fn(u32, &Member) -> bool,
    ) {
        out.clear();
        let len = self.members.len();
        if count == 0 || len == 0 {
            return;
        }
        for _ in 0..SAMPLE_ATTEMPTS.max(count * 4) {
            if out.len() >= count {
                return;
            }
            let slot = rng.random_range(0..len);
            let Ok(slot) = u32::try_from(slot) else {
                continue;
            };
            if out.contains(&slot) {
                continue;
            }
            if self.get(slot).is_some_and(|m| keep(slot, m)) {
                out.push(slot);
            }
        }
        if out.len() >= count {
            return;
        }
        let mut all: Vec<u32> = self
            .entries()
            .filter(|(slot, m)| keep(*slot, m))
            .map(|(slot, _)| slot)
            .collect();
        let (chosen, _) = all.partial_shuffle(rng, count);
        out.clear();
        out.extend_from_slice(chosen);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::SmallRng;
    use std::sync::Arc;

    fn member(name: &str, state: MemberState) -> Member {
        Member {
            name: Arc::from(name),
            generation: 1,
            addr: "127.0.0.1:7000".parse().expect("address"),
            incarnation: 0,
            state,
            ready: false,
            metadata: Arc::from(&[][..]),
        }
    }

    /// The members the probe order visits over a few rounds (a round
    /// visits every live member once).
    fn probed(table: &mut Table, rng: &mut SmallRng) -> Vec<u32> {
        let mut seen = Vec::new();
        for _ in 0..table.slots() * 3 {
            if let Some(slot) = table.next_probe_target(rng)
                && !seen.contains(&slot)
            {
                seen.push(slot);
            }
        }
        seen.sort_unstable();
        seen
    }

    #[test]
    fn state_changes_keep_the_live_count_probe_order_and_reaping_in_step() {
        let mut rng = SmallRng::seed_from_u64(7);
        let t0 = Instant::now();
        let reap_after = Duration::from_secs(10);
        let mut table = Table::new(SeededState::new(3), reap_after);
        let a = table.insert(member("a", MemberState::Alive), t0, &mut rng);
        let b = table.insert(member("b", MemberState::Suspect), t0, &mut rng);
        let c = table.insert(member("c", MemberState::Dead), t0, &mut rng);
        assert_eq!((table.len(), table.live()), (3, 2));
        assert_eq!(table.find("b"), Some(b));
        assert_eq!(table.down_since(c), Some(t0));
        assert_eq!(probed(&mut table, &mut rng), vec![a, b]);

        // Down: out of the live count and the probe round, due for reaping.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            table.apply(a, MemberState::Dead, t1, &mut rng),
            Some(MemberState::Alive)
        );
        table.set_suspected_from(a, t0);
        assert_eq!(table.live(), 1);
        assert_eq!(table.down_since(a), Some(t1));
        assert_eq!(table.suspected_from(a), Some(t0));
        assert_eq!(probed(&mut table, &mut rng), vec![b]);
        // Down to down: the reap timer keeps running from the first.
        table.apply(a, MemberState::Left, t1 + reap_after, &mut rng);
        assert_eq!(table.down_since(a), Some(t1));

        // Back: counted and probed again, no longer reaped.
        assert_eq!(
            table.apply(c, MemberState::Alive, t1, &mut rng),
            Some(MemberState::Dead)
        );
        assert_eq!(table.live(), 2);
        assert_eq!(table.down_since(c), None);
        // In the rest of the current round, not only the next.
        let rest = table.probe_order.get(table.probe_pos..).unwrap_or(&[]);
        assert!(rest.contains(&c));
        assert_eq!(probed(&mut table, &mut rng), vec![b, c]);
        // An edit cannot change the state behind the table's back.
        table.edit(b, |m| {
            m.incarnation = 5;
            m.state = MemberState::Dead;
        });
        let edited = table.get(b).map(|m| (m.incarnation, m.state));
        assert_eq!(edited, Some((5, MemberState::Suspect)));
        assert_eq!(table.live(), 2);

        // Only `a` is due, once, `reap_after` after it went down.
        assert_eq!(table.next_reap_at(), Some(t1 + reap_after));
        assert_eq!(table.next_reap(t1), None);
        assert_eq!(table.next_reap(t1 + reap_after), Some(a));
        assert_eq!(table.next_reap(t1 + reap_after * 5), None);
        let reaped = table.remove(a).map(|m| m.name);
        assert_eq!(reaped.as_deref(), Some("a"));
        assert_eq!((table.len(), table.live(), table.find("a")), (2, 2, None));
        assert!(!table.any_down());
        // Its slot is reused.
        assert_eq!(
            table.insert(member("d", MemberState::Alive), t1, &mut rng),
            a
        );
        assert_eq!(table.live(), 3);
    }
}
