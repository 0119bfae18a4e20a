//! Membership invariants and measurements, fed incrementally from the
//! events every node emits.
//!
//! Costs: each membership event is checked in O(1) (hash map lookups); the
//! state kept is one small record per (observer, member) pair that ever
//! appeared in an event, so a 10,000-node run that disseminates one update
//! keeps about 10,000 records, not 10^8.

use std::collections::{HashMap, HashSet};

use shoal_membership::{Event, Member, MemberState, Standing};

/// A process: node slot and generation.
pub(crate) type ProcKey = (u32, u64);

/// What the observer last saw of one member.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seen {
    /// Highest incarnation seen.
    incarnation: u64,
    /// Incarnation at which the member was last seen dead or left, if it has
    /// not been seen alive at a higher incarnation since.
    dead_at: Option<u64>,
}

/// One "failed" verdict about a running process.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Verdict {
    pub(crate) accuser: ProcKey,
    /// The process's incarnation in the verdict.
    pub(crate) incarnation: u64,
    /// When the accuser marked it failed.
    pub(crate) at_ns: u64,
    /// When the accuser first saw it suspected at the verdict's
    /// incarnation, if it did (the takeover gate counts from there).
    pub(crate) suspected_ns: Option<u64>,
    /// When the accuser saw it alive again, if it did.
    pub(crate) revived_ns: Option<u64>,
}

impl Verdict {
    /// When the accuser's takeover gate released the failure: `delay_ns`
    /// after the suspicion behind the verdict (after the verdict when the
    /// accuser held none), never before the verdict, as
    /// `shoal_membership::TakeoverGate` does.
    pub(crate) fn takeover_at(&self, delay_ns: u64) -> u64 {
        self.suspected_ns
            .unwrap_or(self.at_ns)
            .saturating_add(delay_ns)
            .max(self.at_ns)
    }

    /// Whether the verdict still stood when the gate released it: the
    /// accuser's layers above took the datums over then.
    pub(crate) fn acted_on(&self, delay_ns: u64) -> bool {
        self.revived_ns
            .is_none_or(|r| r >= self.takeover_at(delay_ns))
    }
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
    /// Every verdict about this process while it was running.
    pub(crate) accusers: Vec<Verdict>,
    /// When this process learned the cluster declared it failed
    /// (`DeclaredFailed`), its own incarnation right after: it has learned
    /// of every verdict about a lower incarnation.
    pub(crate) fenced_below: Option<u64>,
    /// When it first received `DeclaredFailed` (the layers above fence for
    /// good).
    pub(crate) fenced_ns: Option<u64>,
    /// When it stopped (crash or exit).
    pub(crate) stopped_ns: Option<u64>,
    /// Changes of its lease: (effective time, valid). A lease lapsed for
    /// want of contact counts from its expiry (`last_contact +
    /// lease_period`), which may precede the event (a paused process).
    pub(crate) standing: Vec<(u64, bool)>,
}

impl Fate {
    /// An accuser (among those `still_running`) that marked this process
    /// failed at an incarnation it has not learned about, and acted on it
    /// (the verdict stood for `takeover_ns`): the layers above on this node
    /// would keep acting as an owner while that accuser fails its datums
    /// over. A verdict withdrawn sooner (the accuser saw the refutation)
    /// was never acted on.
    ///
    /// `held_lease(accuser, from, to)`: whether the accuser's lease was
    /// valid at some instant from `from` to `to` (`None`: up to now). An
    /// accuser takes datums over only while its lease is valid, so a verdict
    /// it reached without one (cut off into a minority) and withdrew before
    /// its lease came back was never acted on either.
    pub(crate) fn unfenced_by(
        &self,
        still_running: impl Fn(ProcKey) -> bool,
        held_lease: impl Fn(ProcKey, u64, Option<u64>) -> bool,
        takeover_ns: u64,
    ) -> Option<(ProcKey, u64)> {
        self.accusers
            .iter()
            .filter(|v| still_running(v.accuser) && v.acted_on(takeover_ns))
            .filter(|v| held_lease(v.accuser, v.takeover_at(takeover_ns), v.revived_ns))
            .find(|v| self.fenced_below.is_none_or(|f| v.incarnation >= f))
            .map(|v| (v.accuser, v.incarnation))
    }

    /// Whether the process held a valid lease at `t_ns` (`initial` before
    /// its first change).
    pub(crate) fn standing_at(&self, t_ns: u64, initial: bool) -> bool {
        self.standing
            .iter()
            .rev()
            .find(|(at, _)| *at <= t_ns)
            .map_or(initial, |(_, valid)| *valid)
    }

    /// Whether it held a valid lease at some instant from `from_ns` to
    /// `to_ns` (`None`: up to now).
    pub(crate) fn standing_during(&self, from_ns: u64, to_ns: Option<u64>, initial: bool) -> bool {
        self.standing_at(from_ns, initial)
            || self
                .standing
                .iter()
                .any(|(at, valid)| *valid && *at > from_ns && to_ns.is_none_or(|to| *at <= to))
    }

    /// When it last lost its lease at or before `t_ns`.
    pub(crate) fn lost_standing_at(&self, t_ns: u64) -> Option<u64> {
        self.standing
            .iter()
            .rev()
            .find(|(at, valid)| *at <= t_ns && !valid)
            .map(|(at, _)| *at)
    }
}

/// A takeover: an accuser holding a valid lease still held a process dead
/// when its takeover gate released the verdict ([`Verdict::takeover_at`]),
/// and took its datums.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Takeover {
    pub(crate) victim: ProcKey,
    pub(crate) accuser: ProcKey,
    /// The takeover instant ([`Verdict::takeover_at`]).
    pub(crate) at_ns: u64,
    /// How long before it the victim had lost its lease, been fenced or
    /// stopped (negative: it still held a valid lease then).
    pub(crate) margin_ns: i128,
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
    pub(crate) seen: HashMap<(ProcKey, ProcKey), Seen>,
    pub(crate) fates: HashMap<ProcKey, Fate>,
    pub(crate) false_positives: HashSet<ProcKey>,
    pub(crate) false_positive_events: u64,
    /// False-positive "failed" events whose accuser was a stalled process.
    pub(crate) false_positive_events_by_stalled: u64,
    pub(crate) stalled_marked_failed: bool,
    pub(crate) declared_failed_events: u64,
    pub(crate) detections: Vec<Detection>,
    pub(crate) disseminations: Vec<Dissemination>,
    /// (observer, member) → (incarnation, when the observer first saw the
    /// member suspected at it), until it is refuted, failed or gone.
    pub(crate) suspected: HashMap<(ProcKey, ProcKey), (u64, u64)>,
    /// The takeover delay counts from the suspicion
    /// (`Config::takeover_from_suspicion`).
    pub(crate) from_suspicion: bool,
    /// How long a verdict must stand before its accuser takes over
    /// (`Config::takeover_delay`).
    pub(crate) takeover_ns: u64,
    /// The lease period (a lease lapsed for want of contact counts from
    /// `last_contact + lease_period`).
    pub(crate) lease_period_ns: u64,
    /// Leases are off: every process holds one from its start.
    pub(crate) lease_off: bool,
    /// The simulator's base instant (virtual time 0).
    pub(crate) base: Option<std::time::Instant>,
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

    /// Every takeover up to `now_ns` about processes in `victims` (all when
    /// `None`): a verdict that still stood `takeover_delay` after it was
    /// made, by an accuser that held a valid lease at that instant; with
    /// the victim's margin.
    pub(crate) fn takeovers(&self, now_ns: u64) -> Vec<Takeover> {
        let initial = self.lease_off;
        let mut out = Vec::new();
        for (&victim, fate) in &self.fates {
            for v in &fate.accusers {
                let at = v.takeover_at(self.takeover_ns);
                if at > now_ns || !v.acted_on(self.takeover_ns) {
                    continue;
                }
                let accuser_holds = self.fates.get(&v.accuser).is_some_and(|a| {
                    a.stopped_ns.is_none_or(|s| s > at) && a.standing_at(at, initial)
                });
                if !accuser_holds {
                    continue;
                }
                // The victim is out of the way at its fence, its stop, or
                // the loss of its lease, whichever came first.
                let lost = if fate.standing_at(at, initial) {
                    None
                } else {
                    fate.lost_standing_at(at)
                };
                let out_at = [fate.fenced_ns, fate.stopped_ns, lost]
                    .into_iter()
                    .flatten()
                    .filter(|t| *t <= at)
                    .min();
                let margin_ns = match out_at {
                    Some(t) => i128::from(at) - i128::from(t),
                    None if !fate.standing_at(at, initial) => i128::from(at),
                    None => {
                        // Still owner: how long until it stopped holding.
                        let next = [fate.fenced_ns, fate.stopped_ns]
                            .into_iter()
                            .flatten()
                            .chain(
                                fate.standing
                                    .iter()
                                    .filter(|(t, valid)| *t > at && !valid)
                                    .map(|(t, _)| *t),
                            )
                            .min()
                            .unwrap_or(now_ns);
                        i128::from(at) - i128::from(next)
                    }
                };
                out.push(Takeover {
                    victim,
                    accuser: v.accuser,
                    at_ns: at,
                    margin_ns,
                });
            }
        }
        out.sort_by_key(|t| (t.at_ns, t.victim, t.accuser));
        out
    }

    /// A process stopped (crash or exit after leave): it no longer counts as
    /// a survivor that must detect anything.
    pub(crate) fn stopped(&mut self, key: ProcKey, now_ns: u64) {
        self.fate_mut(key).stopped_ns.get_or_insert(now_ns);
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
                fate.fenced_ns.get_or_insert(now_ns);
                return Ok(());
            }
            Event::StandingChanged(standing) => {
                let at = match standing {
                    Standing::NoContact {
                        last_contact: Some(c),
                    } => {
                        // The lease ran out at its expiry, even if the
                        // process (paused) only noticed now.
                        let expiry = self
                            .base
                            .and_then(|b| c.checked_duration_since(b))
                            .and_then(|d| u64::try_from(d.as_nanos()).ok())
                            .map(|c| c.saturating_add(self.lease_period_ns));
                        expiry.map_or(now_ns, |e| e.min(now_ns))
                    }
                    _ => now_ns,
                };
                let valid = standing.is_valid();
                self.fate_mut(observer).standing.push((at, valid));
                return Ok(());
            }
            Event::ViewChanged(_) | Event::NameConflict { .. } => return Ok(()),
        };
        let key = self.observe_member(observer, member, world)?;
        match event {
            Event::Failed(m) => {
                let suspected_ns = match self.suspected.remove(&(observer, key)) {
                    Some((incarnation, t))
                        if self.from_suspicion && incarnation == m.incarnation =>
                    {
                        Some(t)
                    }
                    _ => None,
                };
                self.on_failed(observer, key, m.incarnation, now_ns, suspected_ns);
            }
            Event::Suspected(m) => {
                let entry = self
                    .suspected
                    .entry((observer, key))
                    .or_insert((m.incarnation, now_ns));
                if entry.0 != m.incarnation {
                    *entry = (m.incarnation, now_ns);
                }
                for d in &mut self.detections {
                    if d.victim == key {
                        d.first_suspect_ns.get_or_insert(now_ns);
                    }
                }
            }
            Event::Updated(m) | Event::Joined(m) | Event::Alive(m) => {
                self.suspected.remove(&(observer, key));
                if is_live(&m.state)
                    && let Some(fate) = self.fates.get_mut(&key)
                    && let Some(v) = fate
                        .accusers
                        .iter_mut()
                        .rev()
                        .find(|v| v.accuser == observer && v.revived_ns.is_none())
                {
                    v.revived_ns = Some(now_ns);
                }
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
            Event::Left(_) => {
                self.suspected.remove(&(observer, key));
            }
            _ => {}
        }
        Ok(())
    }

    fn on_failed(
        &mut self,
        observer: ProcKey,
        key: ProcKey,
        incarnation: u64,
        now_ns: u64,
        suspected_ns: Option<u64>,
    ) {
        let fate = self.fate_mut(key);
        let running = fate.up && !fate.crashed && !fate.leaving;
        if running {
            fate.accusers.push(Verdict {
                accuser: observer,
                incarnation,
                at_ns: now_ns,
                suspected_ns,
                revived_ns: None,
            });
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
