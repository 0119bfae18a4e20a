//! Driving a process: its inputs (packets, timers, send outcomes, late
//! while it is stalled) handed to membership and the application, and
//! everything they produce collected and routed, checked on the way.

use std::net::SocketAddr;

use shoal_membership::Event;

use super::invariants::WorldRef;
use super::network::{Channel, slot_addr};
use super::queue::Ev;
use super::{Proc, Sim, node_name};
use crate::app::{AppCommand, AppCtx, AppOutput, Application, MessageId, NodeInfo};
use crate::check::ProcKey;

/// Logs a membership event (target `shoal_sim::events`, level debug; run
/// with `RUST_LOG=shoal_sim::events=debug` to see the story of a run).
fn log_event(now_ns: u64, node: &NodeInfo, ev: &Event) {
    if !tracing::enabled!(target: "shoal_sim::events", tracing::Level::DEBUG) {
        return;
    }
    let t = now_ns as f64 / 1e9;
    let (kind, member) = match ev {
        Event::Joined(m) => ("joined", Some(m)),
        Event::Updated(m) => ("updated", Some(m)),
        Event::Suspected(m) => ("suspected", Some(m)),
        Event::Alive(m) => ("alive", Some(m)),
        Event::Failed(m) => ("failed", Some(m)),
        Event::Left(m) => ("left", Some(m)),
        Event::NameConflict { .. } => ("name-conflict", None),
        Event::ViewChanged(_) => return,
        Event::DeclaredFailed => ("declared-failed", None),
        Event::StandingChanged(standing) => {
            tracing::debug!(
                target: "shoal_sim::events",
                t,
                node = %node.name,
                generation = node.generation,
                valid = standing.is_valid(),
                ?standing,
                "standing"
            );
            return;
        }
    };
    match member {
        Some(m) => tracing::debug!(
            target: "shoal_sim::events",
            t,
            node = %node.name,
            generation = node.generation,
            member = %m.name,
            member_generation = m.generation,
            incarnation = m.incarnation,
            "{kind}"
        ),
        None => tracing::debug!(target: "shoal_sim::events", t, node = %node.name, "{kind}"),
    }
}

impl<A: Application> Sim<A> {
    /// When an input arriving now at `slot` gets handled, if later than now:
    /// during a stall `delay` later, and never before earlier inputs.
    pub(super) fn deferral(&mut self, slot: u32, timer: bool) -> Option<u64> {
        let now = self.now_ns;
        let s = self.slots.get_mut(slot as usize)?;
        let generation = s.proc.as_ref()?.info.generation;
        let stall = s.stall.as_ref().filter(|st| st.generation == generation);
        if timer && !stall.is_some_and(|st| st.timers) {
            return None;
        }
        let mut at = match stall {
            Some(st) if now < st.until_ns => now.saturating_add(st.delay_ns),
            _ => now,
        };
        at = at.max(s.backlog_until);
        if at > now {
            s.backlog_until = at;
            Some(at)
        } else {
            None
        }
    }

    pub(super) fn on_packet(
        &mut self,
        to: u32,
        from: u32,
        from_generation: u64,
        channel: Channel,
        payload: Vec<u8>,
        accepted_by: Option<u64>,
    ) {
        let current = self.current_generation(to);
        let deliverable = match accepted_by {
            // Already in the receiver's input backlog: lost if it restarted.
            Some(generation) => current == Some(generation),
            None => {
                current.is_some()
                    && match channel {
                        Channel::Unreliable => self.partitions.connected(from, to),
                        Channel::Reliable | Channel::App(_) => {
                            self.partitions.connected_both(from, to)
                        }
                    }
            }
        };
        if !deliverable {
            self.traffic.dropped += 1;
            if let Channel::App(id) = channel {
                self.send_done(from, from_generation, id, slot_addr(to), false);
            }
            return;
        }
        if accepted_by.is_none()
            && let Some(at) = self.deferral(to, false)
        {
            self.push(
                at,
                Ev::Packet {
                    to,
                    from,
                    from_generation,
                    channel,
                    payload,
                    accepted_by: current,
                },
            );
            return;
        }
        let Some(mut p) = self.take_proc(to) else {
            return;
        };
        let now = self.instant(self.now_ns);
        let from_addr = slot_addr(from);
        match channel {
            Channel::Unreliable | Channel::Reliable => {
                // The simulated network authenticates the sender's name, as
                // the transport's certificates do.
                let sender = node_name(from);
                if let Err(e) = p
                    .membership
                    .handle_packet(from_addr, Some(&sender), &payload, now)
                {
                    self.violate(format!(
                        "{} could not decode a {} byte packet that {} sent: {e}",
                        p.info.name,
                        payload.len(),
                        node_name(from)
                    ));
                }
            }
            Channel::App(id) => {
                let peer = NodeInfo {
                    slot: from,
                    name: self
                        .slots
                        .get(from as usize)
                        .map(|s| s.name.clone())
                        .unwrap_or_else(|| node_name(from).into()),
                    generation: from_generation,
                    addr: from_addr,
                };
                self.app_call(&mut p, |app, ctx| app.on_message(&peer, &payload, ctx));
                self.send_done(from, from_generation, id, slot_addr(to), true);
            }
        }
        self.drive(&mut p);
        self.put_proc(to, p);
    }

    pub(super) fn on_timer(&mut self, slot: u32, generation: u64, deferred: bool) {
        let now = self.now_ns;
        if self.current_generation(slot) != Some(generation) {
            return;
        }
        if !deferred {
            let Some(s) = self.slots.get_mut(slot as usize) else {
                return;
            };
            if s.timer_armed != Some(now) {
                return; // superseded by an earlier deadline
            }
            s.timer_armed = None;
            if let Some(at) = self.deferral(slot, true) {
                self.push(
                    at,
                    Ev::Timer {
                        slot,
                        generation,
                        deferred: true,
                    },
                );
                return;
            }
        }
        let Some(mut p) = self.take_proc(slot) else {
            return;
        };
        let at = self.instant(now);
        if p.membership.poll_timeout().is_some_and(|d| d <= at) {
            p.membership.handle_timeout(at);
        }
        if p.app.poll_timeout().is_some_and(|d| d <= at) {
            self.app_call(&mut p, |app, ctx| app.on_timeout(ctx));
        }
        if let Some(s) = self.slots.get_mut(slot as usize) {
            if s.spin_ns == now {
                s.spins += 1;
            } else {
                s.spin_ns = now;
                s.spins = 0;
            }
        }
        self.drive(&mut p);
        self.put_proc(slot, p);
    }

    pub(super) fn on_send_done(
        &mut self,
        slot: u32,
        generation: u64,
        id: u64,
        to: SocketAddr,
        delivered: bool,
    ) {
        if self.current_generation(slot) != Some(generation) {
            return;
        }
        let Some(mut p) = self.take_proc(slot) else {
            return;
        };
        let id = MessageId(id);
        self.app_call(&mut p, |app, ctx| app.on_send_done(id, to, delivered, ctx));
        self.drive(&mut p);
        self.put_proc(slot, p);
    }

    pub(super) fn app_call(
        &mut self,
        p: &mut Proc<A>,
        f: impl FnOnce(&mut A, &mut AppCtx<'_, A::Shared>),
    ) {
        let now = self.instant(self.now_ns);
        let Proc {
            info,
            membership,
            app,
            app_rng,
            ..
        } = p;
        let mut ctx = AppCtx {
            now,
            node: info,
            membership,
            shared: &mut self.shared,
            rng: app_rng,
            out: &mut self.app_out,
            next_message_id: &mut self.next_message_id,
        };
        f(app, &mut ctx);
    }

    /// Collects everything a process produced after an input: membership
    /// packets and events (checked, then given to the application), the
    /// application's messages and commands; then re-arms its timer.
    pub(super) fn drive(&mut self, p: &mut Proc<A>) {
        // Commands can produce more output; loop until nothing is left.
        let mut rounds = 0u32;
        loop {
            while let Some(t) = p.membership.poll_transmit() {
                self.send_transmit(p.info.slot, p.info.generation, t);
            }
            // A rebirth (a command) replaces the generation mid-drive.
            let observer: ProcKey = (p.info.slot, p.info.generation);
            while let Some(ev) = p.membership.poll_event() {
                log_event(self.now_ns, &p.info, &ev);
                let checked = {
                    let world = WorldRef {
                        by_name: &self.by_name,
                    };
                    let mut checked = self.checks.on_event(
                        observer,
                        &ev,
                        self.now_ns,
                        p.membership.local().incarnation,
                        &world,
                    );
                    if checked.is_ok()
                        && self.cfg.deep_checks
                        && let Event::ViewChanged(view) = &ev
                    {
                        checked = view.iter().try_for_each(|m| {
                            self.checks.observe_member(observer, m, &world).map(|_| ())
                        });
                    }
                    checked
                };
                if let Err(m) = checked {
                    self.violate(m);
                }
                self.app_call(p, |app, ctx| app.on_event(&ev, ctx));
            }
            if self.app_out.is_empty() {
                break;
            }
            rounds += 1;
            if rounds > 1_000 {
                self.violate(format!(
                    "{}: the application keeps issuing commands that produce events that make it \
                     issue more (1,000 rounds in one step)",
                    p.info.name
                ));
                self.app_out = AppOutput::default();
                break;
            }
            let out = std::mem::take(&mut self.app_out);
            for (id, to, payload) in out.sends {
                self.send_app(p.info.slot, p.info.generation, id, to, payload);
            }
            for v in out.violations {
                self.violate(format!(
                    "{} (application at {}): {v}",
                    p.info.name, p.info.slot
                ));
            }
            for c in out.commands {
                self.command(p, c);
            }
        }
        let incarnation = p.membership.local().incarnation;
        if incarnation < p.incarnation {
            self.violate(format!(
                "{} lowered its own incarnation from {} to {incarnation}",
                p.info.name, p.incarnation
            ));
        }
        p.incarnation = incarnation;
        self.rearm(p);
    }

    pub(super) fn command(&mut self, p: &mut Proc<A>, c: AppCommand) {
        let now = self.instant(self.now_ns);
        match c {
            AppCommand::SetReady(ready) => p.membership.set_ready(ready, now),
            AppCommand::SetMetadata(metadata) => {
                if let Err(e) = p.membership.set_metadata(metadata, now) {
                    tracing::debug!(node = %p.info.name, error = %e, "metadata refused");
                }
            }
            AppCommand::Leave => self.begin_leave(p),
            AppCommand::Rebirth => self.rebirth(p),
        }
    }

    pub(super) fn rearm(&mut self, p: &Proc<A>) {
        let deadline = match (p.membership.poll_timeout(), p.app.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let Some(deadline) = deadline else { return };
        let mut at = self.ns_of(deadline).max(self.now_ns);
        let slot = p.info.slot;
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if at == self.now_ns && s.spin_ns == at && s.spins >= 1_000 {
            let name = p.info.name.clone();
            self.violate(format!(
                "{name}'s timer keeps asking to fire at the same instant: handle_timeout does not \
                 move poll_timeout forward"
            ));
            at += 1_000_000;
        }
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return;
        };
        if s.timer_armed.is_some_and(|armed| armed <= at) {
            return;
        }
        s.timer_armed = Some(at);
        self.push(
            at,
            Ev::Timer {
                slot,
                generation: p.info.generation,
                deferred: false,
            },
        );
    }
}
