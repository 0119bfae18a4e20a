//! Faults and commands of the schedule applied ([`Action`]): crashes,
//! leaves, stalls, pauses, partitions, one-way cuts, loss, duplication,
//! metadata, garbage, and the end of the faults.

use rand::Rng;

use super::network::slot_addr;
use super::queue::Ev;
use super::{Action, Sim, Stall, node_name};
use crate::app::Application;
use crate::net::duration_ns;

impl<A: Application> Sim<A> {
    /// A fault happened: the cluster is no longer expected to be converged
    /// until the next [`Action::Quiet`].
    pub(super) fn unquiet(&mut self) {
        self.quiet_epoch += 1;
        self.quiet_at = None;
        self.converged_at = None;
        self.diverged_at = None;
    }

    pub(super) fn act(&mut self, action: Action) {
        tracing::info!(
            target: "shoal_sim::events",
            t = self.now_ns as f64 / 1e9,
            ?action,
            "action"
        );
        let now = self.instant(self.now_ns);
        if matches!(
            action,
            Action::Start { .. }
                | Action::Crash { .. }
                | Action::Leave { .. }
                | Action::Stall { .. }
                | Action::Pause { .. }
                | Action::Partition { .. }
                | Action::OneWay { .. }
                | Action::Heal
        ) {
            self.unquiet();
        }
        match action {
            Action::Start { slot } => self.start(slot),
            Action::Crash { slot, measure } => {
                if let Some(generation) = self.current_generation(slot) {
                    if measure {
                        self.measure_detection((slot, generation));
                    }
                    self.checks.fate_mut((slot, generation)).crashed = true;
                    self.stop(slot, true);
                }
            }
            Action::Leave { slot } => {
                if let Some(mut p) = self.take_proc(slot) {
                    self.begin_leave(&mut p);
                    self.drive(&mut p);
                    self.put_proc(slot, p);
                }
            }
            Action::Stall {
                slot,
                delay,
                duration,
                timers,
            } => {
                let now_ns = self.now_ns;
                if let Some(generation) = self.current_generation(slot)
                    && let Some(s) = self.slots.get_mut(slot as usize)
                {
                    s.stall = Some(Stall {
                        generation,
                        until_ns: now_ns + duration_ns(duration),
                        delay_ns: duration_ns(delay),
                        timers,
                    });
                    self.checks.fate_mut((slot, generation)).stalled = true;
                }
            }
            Action::Pause { slot, duration } => {
                let now_ns = self.now_ns;
                if let Some(generation) = self.current_generation(slot)
                    && let Some(s) = self.slots.get_mut(slot as usize)
                {
                    let until_ns = now_ns + duration_ns(duration);
                    // Nothing is handled before the wake-up: a stall with no
                    // delay of its own, timers included, behind a backlog
                    // that ends then.
                    s.stall = Some(Stall {
                        generation,
                        until_ns,
                        delay_ns: 0,
                        timers: true,
                    });
                    s.backlog_until = s.backlog_until.max(until_ns);
                    s.frozen = Some((generation, until_ns));
                    self.checks.fate_mut((slot, generation)).stalled = true;
                }
            }
            Action::Partition { groups } => {
                self.partitions.split(groups);
                self.mark_partitioned();
            }
            Action::OneWay { pairs } => {
                self.partitions.block(pairs);
                self.mark_partitioned();
            }
            Action::Heal => self.partitions.heal(),
            Action::SetLoss(p) => self.cfg.net.loss = p.clamp(0.0, 1.0),
            Action::SetDuplicate(p) => self.cfg.net.duplicate = p.clamp(0.0, 1.0),
            Action::SetMetadata {
                slot,
                metadata,
                measure,
            } => {
                if let Some(mut p) = self.take_proc(slot) {
                    match p.membership.set_metadata(metadata.clone(), now) {
                        Ok(()) if measure => {
                            self.measure_dissemination((slot, p.info.generation), metadata)
                        }
                        Ok(()) => {}
                        Err(e) => tracing::debug!(slot, error = %e, "metadata refused"),
                    }
                    self.drive(&mut p);
                    self.put_proc(slot, p);
                }
            }
            Action::SetReady { slot, ready } => {
                if let Some(mut p) = self.take_proc(slot) {
                    p.membership.set_ready(ready, now);
                    self.drive(&mut p);
                    self.put_proc(slot, p);
                }
            }
            Action::Garbage { slot, len } => {
                if let Some(mut p) = self.take_proc(slot) {
                    let bytes: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                    let from = slot_addr(slot.wrapping_add(1) % self.slot_count().max(1));
                    let sender = node_name(slot.wrapping_add(1) % self.slot_count().max(1));
                    match p.membership.handle_packet(from, Some(&sender), &bytes, now) {
                        Err(_) => self.traffic.garbage_rejected += 1,
                        Ok(()) => tracing::debug!(slot, len, "random bytes decoded as a packet"),
                    }
                    self.drive(&mut p);
                    self.put_proc(slot, p);
                }
            }
            Action::Quiet => {
                self.unquiet();
                self.quiet_at = Some(self.now_ns);
                self.push(
                    self.now_ns,
                    Ev::ConvergeCheck {
                        epoch: self.quiet_epoch,
                    },
                );
            }
        }
    }

    /// While the network is split, every live process counts as cut off
    /// (so it is not "healthy" for the false-positive count).
    pub(super) fn mark_partitioned(&mut self) {
        if !self.partitions.is_split() {
            return;
        }
        for i in 0..self.live.len() {
            let Some(&slot) = self.live.get(i) else { break };
            if let Some(generation) = self.current_generation(slot) {
                self.checks.fate_mut((slot, generation)).partitioned = true;
            }
        }
    }
}
