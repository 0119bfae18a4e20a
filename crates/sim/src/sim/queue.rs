//! The virtual clock and the event queue: events keyed by (virtual time,
//! sequence number), run in that order and folded into the trace hash.

use std::cmp::Ordering;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::network::Channel;
use super::{Action, Sim, Violation};
use crate::app::Application;
use crate::net::duration_ns;

pub(super) enum Ev {
    Packet {
        to: u32,
        from: u32,
        from_generation: u64,
        channel: Channel,
        payload: Vec<u8>,
        /// Set once the packet sits in the receiver's input backlog: the
        /// generation that accepted it.
        accepted_by: Option<u64>,
    },
    Timer {
        slot: u32,
        generation: u64,
        deferred: bool,
    },
    SendDone {
        slot: u32,
        generation: u64,
        id: u64,
        to: SocketAddr,
        delivered: bool,
    },
    Rejoin {
        slot: u32,
        generation: u64,
    },
    Exit {
        slot: u32,
        generation: u64,
    },
    Act(Action),
    Sample,
    ConvergeCheck {
        epoch: u64,
    },
}

pub(super) struct Entry {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    /// Reversed, so the max-heap pops the earliest (time, sequence).
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl<A: Application> Sim<A> {
    /// Virtual time since the start.
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.now_ns)
    }

    /// The instant of virtual time `ns`.
    pub(super) fn instant(&self, ns: u64) -> Instant {
        self.base + Duration::from_nanos(ns)
    }

    pub(super) fn ns_of(&self, at: Instant) -> u64 {
        duration_ns(at.saturating_duration_since(self.base))
    }

    /// Events processed so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Hash of every event processed so far (time, kind, node, payload).
    pub fn trace_hash(&self) -> u64 {
        self.trace.value()
    }

    /// Schedules `action` at virtual time `at` (at "now" if `at` has passed).
    pub fn schedule(&mut self, at: Duration, action: Action) {
        let at = duration_ns(at).max(self.now_ns);
        self.push(at, Ev::Act(action));
    }

    pub(super) fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Entry {
            at,
            seq: self.seq,
            ev,
        });
    }

    /// Runs events until virtual time `until` (or the first violation).
    pub fn run_until(&mut self, until: Duration) -> Result<(), Violation> {
        if !self.samples_started {
            self.samples_started = true;
            let first = self.now_ns + duration_ns(self.cfg.sample_every);
            self.push(first, Ev::Sample);
        }
        let until = duration_ns(until);
        while let Some(top) = self.queue.peek() {
            if top.at > until {
                break;
            }
            let Some(entry) = self.queue.pop() else { break };
            self.now_ns = entry.at;
            self.steps += 1;
            self.dispatch(entry.ev);
            if A::STEP_CHECKS && self.violation.is_none() {
                self.step_check();
            }
            if let Some(v) = &self.violation {
                return Err(v.clone());
            }
        }
        self.now_ns = self.now_ns.max(until);
        self.account();
        Ok(())
    }

    /// Runs until `until` or until `done` holds, checked every `every` of
    /// virtual time. Returns whether `done` held.
    pub fn run_while(
        &mut self,
        until: Duration,
        every: Duration,
        mut done: impl FnMut(&mut Self) -> bool,
    ) -> Result<bool, Violation> {
        let every = every.max(Duration::from_millis(1));
        loop {
            if done(self) {
                return Ok(true);
            }
            let now = self.now();
            if now >= until {
                return Ok(false);
            }
            self.run_until((now + every).min(until))?;
        }
    }

    pub(super) fn dispatch(&mut self, ev: Ev) {
        self.trace.word(self.now_ns);
        match ev {
            Ev::Packet {
                to,
                from,
                from_generation,
                channel,
                payload,
                accepted_by,
            } => {
                self.trace.word(0x10 | channel.tag());
                self.trace.word((u64::from(to) << 32) | u64::from(from));
                self.trace.bytes(&payload);
                self.on_packet(to, from, from_generation, channel, payload, accepted_by);
            }
            Ev::Timer {
                slot,
                generation,
                deferred,
            } => {
                self.trace.word(0x20 | u64::from(deferred));
                self.trace.word(u64::from(slot));
                self.on_timer(slot, generation, deferred);
            }
            Ev::SendDone {
                slot,
                generation,
                id,
                to,
                delivered,
            } => {
                self.trace.word(0x30 | u64::from(delivered));
                self.trace.word(u64::from(slot));
                self.trace.word(id);
                self.on_send_done(slot, generation, id, to, delivered);
            }
            Ev::Rejoin { slot, generation } => {
                self.trace.word(0x40);
                self.trace.word(u64::from(slot));
                self.on_rejoin(slot, generation);
            }
            Ev::Exit { slot, generation } => {
                self.trace.word(0x50);
                self.trace.word(u64::from(slot));
                if self.current_generation(slot) == Some(generation) {
                    self.stop(slot, false);
                }
            }
            Ev::Act(action) => {
                self.trace.word(0x60);
                self.act(action);
            }
            Ev::Sample => {
                self.trace.word(0x70);
                self.sample();
                let next = self.now_ns + duration_ns(self.cfg.sample_every).max(1);
                self.push(next, Ev::Sample);
            }
            Ev::ConvergeCheck { epoch } => {
                self.trace.word(0x80);
                if epoch == self.quiet_epoch {
                    self.converge_check();
                }
            }
        }
    }
}
