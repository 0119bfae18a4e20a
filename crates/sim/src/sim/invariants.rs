//! The invariants checked as a run goes, and the first one broken
//! ([`Violation`]): the per-event records, the application's checks, deep
//! checks at sampling points, convergence after the faults, self-fencing.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use super::queue::Ev;
use super::{Sim, node_name};
use crate::app::{Application, NodeView};
use crate::check::{ProcKey, World, is_live};
use crate::net::duration_ns;

/// A broken invariant, with what is needed to reproduce it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Seed of the run.
    pub seed: u64,
    /// Number of events processed when it was found (1-based).
    pub step: u64,
    /// Virtual time, in nanoseconds since the start.
    pub time_ns: u64,
    /// What broke.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invariant violated (seed {}, step {}, t={:.6}s): {}",
            self.seed,
            self.step,
            self.time_ns as f64 / 1e9,
            self.message
        )
    }
}

impl std::error::Error for Violation {}

pub(super) struct WorldRef<'a> {
    pub(super) by_name: &'a HashMap<Arc<str>, u32>,
}

impl World for WorldRef<'_> {
    fn slot_of(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }
}

impl<A: Application> Sim<A> {
    /// The first broken invariant, if any.
    pub fn violation(&self) -> Option<&Violation> {
        self.violation.as_ref()
    }

    pub(super) fn violate(&mut self, message: String) {
        if self.violation.is_none() {
            tracing::error!(seed = self.cfg.seed, step = self.steps, %message, "invariant violated");
            self.violation = Some(Violation {
                seed: self.cfg.seed,
                step: self.steps,
                time_ns: self.now_ns,
                message,
            });
        }
    }

    /// The application's check after every step
    /// ([`Application::check_step`]), over the processes in their slots.
    pub(super) fn step_check(&mut self) {
        let now_ns = self.now_ns;
        let now = self.instant(now_ns);
        let result = {
            let mut views = self.slots.iter().filter_map(|s| {
                s.proc.as_deref().map(|p| NodeView {
                    info: &p.info,
                    membership: &p.membership,
                    app: &p.app,
                    leaving: p.leaving,
                    frozen: s.frozen_at(p.info.generation, now_ns),
                })
            });
            A::check_step(&mut self.shared, now, &mut views)
        };
        if let Err(m) = result {
            self.violate(format!("application check: {m}"));
        }
    }

    pub(super) fn sample(&mut self) {
        if self.cfg.deep_checks {
            self.deep_check();
        }
        let result = {
            let mut views = self.slots.iter().filter_map(|s| {
                s.proc.as_deref().map(|p| NodeView {
                    info: &p.info,
                    membership: &p.membership,
                    app: &p.app,
                    leaving: p.leaving,
                    frozen: s.frozen_at(p.info.generation, self.now_ns),
                })
            });
            A::check(&self.shared, &mut views)
        };
        if let Err(m) = result {
            self.violate(format!("application check: {m}"));
        }
    }

    /// Every member record of every live node, against what that node
    /// reported before (incarnations only grow, no resurrection).
    pub(super) fn deep_check(&mut self) {
        let world = WorldRef {
            by_name: &self.by_name,
        };
        let mut broken = None;
        'nodes: for s in &self.slots {
            let Some(p) = s.proc.as_deref() else { continue };
            let observer = (p.info.slot, p.info.generation);
            for m in p.membership.members() {
                if *m.name == *p.info.name && m.generation == p.info.generation {
                    continue;
                }
                if let Err(msg) = self.checks.observe_member(observer, m, &world) {
                    broken = Some(msg);
                    break 'nodes;
                }
            }
        }
        if let Some(msg) = broken {
            self.violate(msg);
        }
    }

    pub(super) fn converge_check(&mut self) {
        let Some(quiet) = self.quiet_at else { return };
        // Not converged yet: the O(N) count test first, often.
        let counts = if self.converged_at.is_none() {
            self.live_counts_differ()
        } else {
            None
        };
        let polling = counts.is_some();
        let result = match counts {
            Some(why) => Err(why),
            None => self.check_converged(),
        };
        match result {
            Ok(()) => match self.converged_at {
                None => {
                    tracing::info!(t = self.now_ns as f64 / 1e9, "cluster converged");
                    self.converged_at = Some(self.now_ns);
                    self.fencing_checked = false;
                }
                Some(at) => {
                    if !self.fencing_checked
                        && self.now_ns >= at + duration_ns(self.cfg.fencing_grace)
                    {
                        self.fencing_checked = true;
                        self.check_fencing();
                    }
                }
            },
            Err(why) => {
                if self.converged_at.take().is_some() {
                    // Late consequences of a fault (a suspicion that started
                    // during it) may still play out: allowed, counted, and
                    // the cluster must converge again within the limit.
                    tracing::info!(t = self.now_ns as f64 / 1e9, %why, "cluster diverged again");
                    self.rediverged += 1;
                    self.diverged_at = Some(self.now_ns);
                }
                let since = self.diverged_at.unwrap_or(quiet).max(quiet);
                if self.now_ns >= since + duration_ns(self.cfg.settle_limit) {
                    self.violate(format!(
                        "no convergence {:.1}s after faults stopped: {why}",
                        self.cfg.settle_limit.as_secs_f64()
                    ));
                }
            }
        }
        let every = if polling {
            self.cfg
                .converge_poll_every
                .min(self.cfg.converge_check_every)
        } else {
            self.cfg.converge_check_every
        };
        let next = self.now_ns + duration_ns(every).max(1);
        self.push(
            next,
            Ev::ConvergeCheck {
                epoch: self.quiet_epoch,
            },
        );
    }

    /// Self-fencing: every running process that some node marked failed has
    /// learned it since (`Event::DeclaredFailed`); otherwise the others
    /// fail its datums over while it still acts as their owner. Checked once
    /// the cluster has stayed converged for `fencing_grace` after faults.
    pub(super) fn check_fencing(&mut self) {
        let running = |key: ProcKey| self.current_generation(key.0) == Some(key.1);
        let unfenced = self.live.iter().find_map(|&slot| {
            let generation = self.current_generation(slot)?;
            let fate = self.checks.fate((slot, generation))?;
            let held_lease = |accuser: ProcKey, from: u64, to: Option<u64>| {
                self.checks
                    .fate(accuser)
                    .is_some_and(|a| a.standing_during(from, to, self.checks.lease_off))
            };
            let (accuser, incarnation) =
                fate.unfenced_by(running, held_lease, self.checks.takeover_ns)?;
            Some((slot, generation, accuser, incarnation, fate.fenced_below))
        });
        if let Some((slot, generation, accuser, incarnation, fenced_below)) = unfenced {
            self.violate(format!(
                "{} (generation {generation}) was marked failed at incarnation {incarnation} by {} (still \
                 running) and never learned it (DeclaredFailed covers incarnations below {fenced_below:?}): \
                 it would keep acting as an owner while the other fails its datums over",
                node_name(slot),
                node_name(accuser.0),
            ));
        }
    }

    /// A live process (not leaving, itself live) whose count of live members
    /// differs from the number of live processes: then the cluster has not
    /// converged ([`check_converged`](Self::check_converged) fails too).
    /// Costs O(N).
    pub(super) fn live_counts_differ(&self) -> Option<String> {
        let live = self.live.len();
        self.slots.iter().find_map(|s| {
            let p = s.proc.as_deref()?;
            let counted = p.membership.num_live();
            (!p.leaving && p.membership.local().state.is_live() && counted != live).then(|| {
                format!(
                    "{} counts {counted} live members but {live} are live",
                    p.info.name
                )
            })
        })
    }

    /// Whether every live process sees exactly the live processes (name and
    /// generation) as alive or suspect. Costs O(N^2).
    pub fn check_converged(&self) -> Result<(), String> {
        let live = self.live.len();
        for s in &self.slots {
            let Some(p) = s.proc.as_deref() else { continue };
            if p.leaving {
                continue;
            }
            let mut seen = 0usize;
            let mut listed_self = false;
            for m in p.membership.members() {
                if !is_live(&m.state) {
                    continue;
                }
                let by_addr = self.slot_of_addr(m.addr).filter(|&s| {
                    self.slots
                        .get(s as usize)
                        .is_some_and(|s| *s.name == *m.name)
                });
                let Some(slot) = by_addr.or_else(|| self.by_name.get(&*m.name).copied()) else {
                    return Err(format!(
                        "{} sees unknown member {:?}",
                        p.info.name, &*m.name
                    ));
                };
                let ok = self
                    .slots
                    .get(slot as usize)
                    .and_then(|s| s.proc.as_deref())
                    .is_some_and(|q| q.info.generation == m.generation && !q.leaving);
                if !ok {
                    return Err(format!(
                        "{} sees {} (generation {}) as {:?}, but that process is not live",
                        p.info.name, &*m.name, m.generation, m.state
                    ));
                }
                if slot == p.info.slot {
                    listed_self = true;
                }
                seen += 1;
            }
            if !listed_self {
                seen += 1;
            }
            if seen != live {
                let missing = self
                    .live
                    .iter()
                    .copied()
                    .find(|&l| {
                        let Some(q) = self.slots.get(l as usize).and_then(|s| s.proc.as_deref())
                        else {
                            return false;
                        };
                        l != p.info.slot
                            && !p.membership.members().any(|m| {
                                *m.name == *q.info.name
                                    && m.generation == q.info.generation
                                    && is_live(&m.state)
                            })
                    })
                    .map(node_name)
                    .unwrap_or_default();
                return Err(format!(
                    "{} sees {seen} live members but {live} are live (missing e.g. {missing})",
                    p.info.name
                ));
            }
        }
        Ok(())
    }
}
