//! Membership invariants and measurements, fed incrementally from the
//! events every node emits.
//!
//! Costs: each membership event is checked in O(1) (hash map lookups); the
//! state kept is one small record per (observer, member) pair that ever
//! appeared in an event, so a 10,000-node run that disseminates one update
//! keeps about 10,000 records, not 10^8.

use std::collections::{HashMap, HashSet};

use shoal_membership::{Event, Member, MemberState};

/// A process: node slot and generation.
pub(crate) type ProcKey = (u32, u64);

/// What the observer last saw of one member.
#[derive(Clone, Copy, Debug)]
struct Seen {
    /// Highest incarnation seen.
    incarnation: u64,
    /// Incarnation at which the member was last seen dead or left, if it has
    /// not been seen alive at a higher incarnation since.
    dead_at: Option<u64>,
}

/// What happened to a process during the run.
#[derive(Clone, Debug, Default)]
pub(crate) struct Fate {
    pub(crate) up: bool,
    pub(crate) crashed: bool,
    pub(crate) leaving: bool,
    pub(crate) stalled: bool,
    /// Was cut off from part of the cluster by a partition.
    pub(crate) partitioned: bool,
    /// Who marked this process failed while it was running, and the
    /// highest incarnation each did it at.
    pub(crate) accusers: Vec<(ProcKey, u64)>,
    /// When this process learned the cluster declared it failed
    /// (`DeclaredFailed`), its own incarnation right after: it has learned
    /// of every verdict about a lower incarnation.
    pub(crate) fenced_below: Option<u64>,
}

impl Fate {
    /// An accuser (among those `still_running`) that marked this process
    /// failed at an incarnation it has not learned about: the layers above
    /// on this node would keep acting as an owner while that accuser fails
    /// its datums over.
    pub(crate) fn unfenced_by(
        &self,
        still_running: impl Fn(ProcKey) -> bool,
    ) -> Option<(ProcKey, u64)> {
        self.accusers
            .iter()
            .copied()
            .filter(|&(accuser, _)| still_running(accuser))
            .find(|&(_, incarnation)| self.fenced_below.is_none_or(|f| incarnation >= f))
    }
}

/// Time from a measured crash to its detection.
#[derive(Clone, Debug)]
pub(crate) struct Detection {
    pub(crate) victim: ProcKey,
    pub(crate) crashed_ns: u64,
    pub(crate) survivors: HashSet<ProcKey>,
    pub(crate) first_ns: Option<u64>,
    pub(crate) all_ns: Option<u64>,
    pub(crate) first_suspect_ns: Option<u64>,
}

/// Dissemination of one measured metadata update.
#[derive(Clone, Debug)]
pub(crate) struct Dissemination {
    pub(crate) origin: ProcKey,
    pub(crate) metadata: Vec<u8>,
    pub(crate) started_ns: u64,
    /// Processes live when the update was made (the origin included).
    pub(crate) population: HashSet<ProcKey>,
    pub(crate) informed: HashSet<ProcKey>,
    /// `ceil(0.9999 x population)`.
    pub(crate) threshold: usize,
    pub(crate) threshold_ns: Option<u64>,
    pub(crate) all_ns: Option<u64>,
}

/// Incremental membership checks and measurements.
#[derive(Debug, Default)]
pub(crate) struct Checks {
    seen: HashMap<(ProcKey, ProcKey), Seen>,
    pub(crate) fates: HashMap<ProcKey, Fate>,
    pub(crate) false_positives: HashSet<ProcKey>,
    pub(crate) false_positive_events: u64,
    /// False-positive "failed" events whose accuser was a stalled process.
    pub(crate) false_positive_events_by_stalled: u64,
    pub(crate) stalled_marked_failed: bool,
    pub(crate) declared_failed_events: u64,
    pub(crate) detections: Vec<Detection>,
    pub(crate) disseminations: Vec<Dissemination>,
}

/// Facts about the world the checks need at an event, from the simulator.
pub(crate) trait World {
    /// The slot of the node with this name.
    fn slot_of(&self, name: &str) -> Option<u32>;
}

pub(crate) fn is_live(state: &MemberState) -> bool {
    matches!(state, MemberState::Alive | MemberState::Suspect)
}

impl Checks {
    pub(crate) fn fate_mut(&mut self, key: ProcKey) -> &mut Fate {
        self.fates.entry(key).or_default()
    }

    pub(crate) fn fate(&self, key: ProcKey) -> Option<&Fate> {
        self.fates.get(&key)
    }

    /// A process stopped (crash or exit after leave): it no longer counts as
    /// a survivor that must detect anything.
    pub(crate) fn stopped(&mut self, key: ProcKey, now_ns: u64) {
        for d in &mut self.detections {
            if d.survivors.remove(&key) && d.survivors.is_empty() && d.first_ns.is_some() {
                d.all_ns.get_or_insert(now_ns);
            }
        }
    }

    /// Checks one member record as `observer` reports it, against what the
    /// same observer reported before. Returns a violation message.
    pub(crate) fn observe_member(
        &mut self,
        observer: ProcKey,
        member: &Member,
        world: &dyn World,
    ) -> Result<ProcKey, String> {
        let Some(slot) = world.slot_of(&member.name) else {
            return Err(format!(
                "node {observer:?} reports a member named {:?} that no simulated node has",
                &*member.name
            ));
        };
        let key = (slot, member.generation);
        let live = is_live(&member.state);
        let dead = !live;
        let incarnation = member.incarnation;
        match self.seen.get_mut(&(observer, key)) {
            None => {
                self.seen.insert(
                    (observer, key),
                    Seen {
                        incarnation,
                        dead_at: dead.then_some(incarnation),
                    },
                );
            }
            Some(seen) => {
                if incarnation < seen.incarnation {
                    return Err(format!(
                        "incarnation went down: node {observer:?} saw member {key:?} at incarnation \
                         {} and now at {incarnation} ({:?})",
                        seen.incarnation, member.state
                    ));
                }
                if let Some(dead_at) = seen.dead_at
                    && live
                    && incarnation <= dead_at
                {
                    return Err(format!(
                        "resurrection: node {observer:?} saw member {key:?} dead or left at \
                         incarnation {dead_at} and now {:?} at incarnation {incarnation}",
                        member.state
                    ));
                }
                seen.incarnation = incarnation;
                if dead {
                    seen.dead_at = Some(incarnation);
                } else if seen.dead_at.is_some_and(|d| incarnation > d) {
                    seen.dead_at = None;
                }
            }
        }
        Ok(key)
    }

    /// One membership event emitted by `observer` at `now_ns`.
    /// `own_incarnation` is the observer's own incarnation after the input
    /// that produced the event.
    pub(crate) fn on_event(
        &mut self,
        observer: ProcKey,
        event: &Event,
        now_ns: u64,
        own_incarnation: u64,
        world: &dyn World,
    ) -> Result<(), String> {
        let member = match event {
            Event::Joined(m)
            | Event::Updated(m)
            | Event::Suspected(m)
            | Event::Alive(m)
            | Event::Failed(m)
            | Event::Left(m) => m,
            Event::DeclaredFailed => {
                self.declared_failed_events += 1;
                let fate = self.fate_mut(observer);
                fate.fenced_below = fate.fenced_below.max(Some(own_incarnation));
                return Ok(());
            }
            Event::ViewChanged(_) | Event::NameConflict { .. } => return Ok(()),
        };
        let key = self.observe_member(observer, member, world)?;
        match event {
            Event::Failed(m) => self.on_failed(observer, key, m.incarnation, now_ns),
            Event::Suspected(_) => {
                for d in &mut self.detections {
                    if d.victim == key {
                        d.first_suspect_ns.get_or_insert(now_ns);
                    }
                }
            }
            Event::Updated(m) | Event::Joined(m) | Event::Alive(m) => {
                for u in &mut self.disseminations {
                    if u.origin == key
                        && *m.metadata == *u.metadata
                        && u.population.contains(&observer)
                        && u.informed.insert(observer)
                    {
                        if u.informed.len() >= u.threshold {
                            u.threshold_ns.get_or_insert(now_ns);
                        }
                        if u.informed.len() >= u.population.len() {
                            u.all_ns.get_or_insert(now_ns);
                        }
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn on_failed(&mut self, observer: ProcKey, key: ProcKey, incarnation: u64, now_ns: u64) {
        let fate = self.fate_mut(key);
        let running = fate.up && !fate.crashed && !fate.leaving;
        if running {
            match fate.accusers.iter_mut().find(|(a, _)| *a == observer) {
                Some((_, inc)) => *inc = (*inc).max(incarnation),
                None => fate.accusers.push((observer, incarnation)),
            }
        }
        let stalled = fate.stalled;
        let healthy = running && !fate.stalled && !fate.partitioned;
        if stalled {
            self.stalled_marked_failed = true;
        }
        if healthy {
            self.false_positive_events += 1;
            if self.fate(observer).is_some_and(|f| f.stalled) {
                self.false_positive_events_by_stalled += 1;
            }
            self.false_positives.insert(key);
            tracing::warn!(
                observer_slot = observer.0,
                member_slot = key.0,
                generation = key.1,
                "false positive: a healthy member was marked failed"
            );
        }
        for d in &mut self.detections {
            if d.victim == key && d.survivors.remove(&observer) {
                d.first_ns.get_or_insert(now_ns);
                if d.survivors.is_empty() {
                    d.all_ns.get_or_insert(now_ns);
                }
            }
        }
    }
}
