//! Processes coming and going: starting (bootstrapped or joining through
//! seeds), joining again when alone, leaving, being reborn as a new
//! generation, stopping; and the set of live processes.

use std::net::SocketAddr;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use shoal_membership::{LocalNode, Member, Membership};

use super::network::slot_addr;
use super::queue::Ev;
use super::{Proc, Sim, TAG_APP, TAG_MEMBERSHIP};
use crate::app::{AppCtx, Application, NodeInfo};
use crate::check::{ProcKey, is_live};
use crate::net::duration_ns;
use crate::util::derive_seed;

/// Most addresses a reborn process rejoins through (members it knew, then
/// seeds), as the facade's rebirth.
const REJOIN_TARGETS: usize = 64;

impl<A: Application> Sim<A> {
    pub(super) fn live_insert(&mut self, slot: u32) {
        self.account();
        if let std::collections::hash_map::Entry::Vacant(e) = self.live_index.entry(slot) {
            e.insert(self.live.len());
            self.live.push(slot);
        }
    }

    pub(super) fn live_remove(&mut self, slot: u32) {
        self.account();
        if let Some(i) = self.live_index.remove(&slot) {
            self.live.swap_remove(i);
            if let Some(&moved) = self.live.get(i) {
                self.live_index.insert(moved, i);
            }
        }
    }

    /// Starts processes in slots `0..n` at once, each already knowing all
    /// the others as alive (membership's `bootstrap`), instead of simulating
    /// `n` joins. Events emitted by the bootstrap itself are dropped.
    pub fn bootstrap(&mut self, n: u32) -> Result<(), String> {
        let n = n.min(self.slot_count());
        let mut started = Vec::with_capacity(n as usize);
        for slot in 0..n {
            if self
                .slots
                .get(slot as usize)
                .is_some_and(|s| s.proc.is_none())
            {
                let p = self.new_proc(slot)?;
                started.push(p);
            }
        }
        let now = self.instant(self.now_ns);
        let members: Vec<Member> = started
            .iter()
            .map(|p| p.membership.local().clone())
            .collect();
        for mut p in started {
            p.membership.bootstrap(members.iter().cloned(), now);
            while p.membership.poll_event().is_some() {}
            let slot = p.info.slot;
            self.install(slot, p);
        }
        Ok(())
    }

    pub(super) fn new_proc(&mut self, slot: u32) -> Result<Box<Proc<A>>, String> {
        let generation = self.next_generation;
        self.next_generation += 1;
        let Some(s) = self.slots.get(slot as usize) else {
            return Err(format!("no slot {slot}"));
        };
        let info = NodeInfo {
            slot,
            name: s.name.clone(),
            generation,
            addr: s.addr,
        };
        let local = LocalNode {
            name: s.name.to_string(),
            generation,
            addr: s.addr,
            ready: self.cfg.ready_on_start,
            metadata: Vec::new(),
        };
        let now = self.instant(self.now_ns);
        let rng = SmallRng::seed_from_u64(derive_seed(self.cfg.seed, TAG_MEMBERSHIP, generation));
        let membership = Membership::new(self.cfg.membership.clone(), local, rng, now)
            .map_err(|e| format!("membership of {} rejected its configuration: {e}", s.name))?;
        let mut app_rng = SmallRng::seed_from_u64(derive_seed(self.cfg.seed, TAG_APP, generation));
        let mut out = std::mem::take(&mut self.app_out);
        let app = {
            let mut ctx = AppCtx {
                now,
                node: &info,
                membership: &membership,
                shared: &mut self.shared,
                rng: &mut app_rng,
                out: &mut out,
                next_message_id: &mut self.next_message_id,
            };
            A::start(&mut ctx)
        };
        self.app_out = out;
        let incarnation = membership.local().incarnation;
        *self.checks.fate_mut((slot, generation)) = crate::check::Fate {
            up: true,
            ..Default::default()
        };
        Ok(Box::new(Proc {
            info,
            membership,
            app,
            app_rng,
            leaving: false,
            incarnation,
        }))
    }

    /// Puts a freshly started process in its slot and drives its first
    /// outputs.
    pub(super) fn install(&mut self, slot: u32, mut p: Box<Proc<A>>) {
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.timer_armed = None;
            s.backlog_until = self.now_ns;
            s.stall = None;
            self.drive(&mut p);
            if let Some(s) = self.slots.get_mut(slot as usize) {
                s.proc = Some(p);
            }
            self.live_insert(slot);
        }
    }

    pub(super) fn start(&mut self, slot: u32) {
        while self.slots.len() <= slot as usize {
            let next = self.slot_count();
            self.add_slot(next);
        }
        if self.current_generation(slot).is_some() {
            return;
        }
        let mut p = match self.new_proc(slot) {
            Ok(p) => p,
            Err(e) => {
                self.violate(e);
                return;
            }
        };
        let seeds = self.pick_seeds(slot);
        tracing::debug!(
            target: "shoal_sim::events",
            t = self.now_ns as f64 / 1e9,
            node = %p.info.name,
            generation = p.info.generation,
            ?seeds,
            "start"
        );
        if !seeds.is_empty() {
            p.membership.join(&seeds, self.instant(self.now_ns));
        }
        let generation = p.info.generation;
        self.install(slot, p);
        self.mark_partitioned();
        let at = self.now_ns + duration_ns(self.cfg.rejoin_after);
        self.push(at, Ev::Rejoin { slot, generation });
    }

    /// Picks up to `seeds_per_join` live nodes as the seed list of `slot`,
    /// like a configured seed list: one it can reach now if there is one,
    /// the others at random whichever side of a partition they are on
    /// (membership retries unanswered seeds, so a node started during a
    /// partition finds the other side once it heals).
    pub(super) fn pick_seeds(&mut self, slot: u32) -> Vec<SocketAddr> {
        let want = self.cfg.seeds_per_join;
        let mut seeds = Vec::with_capacity(want);
        if self.live.is_empty() || want == 0 {
            return seeds;
        }
        let mut reachable_found = false;
        for attempt in 0..want * 8 {
            if seeds.len() >= want {
                break;
            }
            let i = self.rng.random_range(0..self.live.len());
            let Some(&candidate) = self.live.get(i) else {
                continue;
            };
            let addr = slot_addr(candidate);
            if candidate == slot || seeds.contains(&addr) {
                continue;
            }
            let reachable = self.partitions.connected(slot, candidate);
            // The first half of the attempts look for a reachable seed first.
            if !reachable && !reachable_found && attempt < want * 4 && seeds.len() + 1 >= want {
                continue;
            }
            reachable_found |= reachable;
            seeds.push(addr);
        }
        seeds
    }

    pub(super) fn on_rejoin(&mut self, slot: u32, generation: u64) {
        if self.current_generation(slot) != Some(generation) {
            return;
        }
        let Some(mut p) = self.take_proc(slot) else {
            return;
        };
        let knows_someone = p
            .membership
            .members()
            .any(|m| *m.name != *p.info.name && is_live(&m.state));
        if !knows_someone && !p.leaving {
            let seeds = self.pick_seeds(slot);
            if !seeds.is_empty() {
                tracing::debug!(
                    slot,
                    seeds = seeds.len(),
                    "node knows nobody: joining again"
                );
                p.membership.join(&seeds, self.instant(self.now_ns));
            }
            let at = self.now_ns + duration_ns(self.cfg.rejoin_after);
            self.push(at, Ev::Rejoin { slot, generation });
        }
        self.drive(&mut p);
        self.put_proc(slot, p);
    }

    pub(super) fn begin_leave(&mut self, p: &mut Proc<A>) {
        if p.leaving {
            return;
        }
        p.leaving = true;
        p.membership.leave(self.instant(self.now_ns));
        self.checks
            .fate_mut((p.info.slot, p.info.generation))
            .leaving = true;
        self.live_remove(p.info.slot);
        let at = self.now_ns + duration_ns(self.cfg.leave_linger);
        self.push(
            at,
            Ev::Exit {
                slot: p.info.slot,
                generation: p.info.generation,
            },
        );
    }

    /// The process, declared dead by the cluster, comes back as a new
    /// generation of itself: a new membership (not ready) that joins
    /// through every member the old one knew, in any state, and a few
    /// live seeds, with the old one's witness set
    /// (`Membership::inherit_lease`); the old generation counts as stopped
    /// (not crashed). The application instance stays and hears
    /// [`Application::on_reborn`].
    pub(super) fn rebirth(&mut self, p: &mut Proc<A>) {
        if p.leaving {
            return;
        }
        let slot = p.info.slot;
        let old: ProcKey = (slot, p.info.generation);
        let now = self.instant(self.now_ns);
        let mut targets: Vec<SocketAddr> = Vec::new();
        let known = p
            .membership
            .members()
            .filter(|m| *m.name != *p.info.name)
            .map(|m| m.addr);
        for addr in known.chain(self.pick_seeds(slot)) {
            if addr != p.info.addr && !targets.contains(&addr) && targets.len() < REJOIN_TARGETS {
                targets.push(addr);
            }
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let local = LocalNode {
            name: p.info.name.to_string(),
            generation,
            addr: p.info.addr,
            ready: false,
            metadata: p.membership.local().metadata.to_vec(),
        };
        let rng = SmallRng::seed_from_u64(derive_seed(self.cfg.seed, TAG_MEMBERSHIP, generation));
        let mut membership = match Membership::new(self.cfg.membership.clone(), local, rng, now) {
            Ok(m) => m,
            Err(e) => {
                self.violate(format!(
                    "membership of {} rejected its configuration: {e}",
                    p.info.name
                ));
                return;
            }
        };
        tracing::debug!(
            target: "shoal_sim::events",
            t = self.now_ns as f64 / 1e9,
            node = %p.info.name,
            old = old.1,
            generation,
            targets = targets.len(),
            "reborn"
        );
        // Its predecessor's witness set, frozen until its own lease has
        // been valid once (not one drawn from what it sees alive).
        membership.inherit_lease(p.membership.lease_evidence(), now);
        if !targets.is_empty() {
            membership.join(&targets, now);
        }
        self.checks.fate_mut(old).up = false;
        self.checks.stopped(old, self.now_ns);
        let split = self.partitions.is_split();
        *self.checks.fate_mut((slot, generation)) = crate::check::Fate {
            up: true,
            partitioned: split,
            ..Default::default()
        };
        p.incarnation = membership.local().incarnation;
        p.membership = membership;
        p.info.generation = generation;
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.timer_armed = None;
            s.stall = None;
        }
        self.app_call(p, |app, ctx| app.on_reborn(ctx));
        let at = self.now_ns + duration_ns(self.cfg.rejoin_after);
        self.push(at, Ev::Rejoin { slot, generation });
    }

    pub(super) fn stop(&mut self, slot: u32, crashed: bool) {
        let Some(mut p) = self.take_proc(slot) else {
            return;
        };
        let key = (slot, p.info.generation);
        self.live_remove(slot);
        let fate = self.checks.fate_mut(key);
        fate.up = false;
        self.checks.stopped(key, self.now_ns);
        p.app.on_stop(&p.info, crashed, &mut self.shared);
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.timer_armed = None;
            s.stall = None;
        }
    }
}
