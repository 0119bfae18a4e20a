//! Fault steps: cuts and pauses injected, held under load, and removed
//! (the [`Faults`] in force are dropped on every way out of the driver).

use std::time::Instant;

use crate::fault::{Cut, Faults, Freeze};

use super::{
    FaultWindow, HEAL_SETTLE_BOUND_S, ProcState, ScenarioError, Sim, Step, TransitionTime,
};

impl Sim<'_> {
    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Cuts `a` from `b`, both directions, until the next heal.
    fn cut(&mut self, a: &[usize], b: &[usize]) -> Result<(), ScenarioError> {
        let (pa, pb) = (self.ports(a), self.ports(b));
        if pa.is_empty() || pb.is_empty() {
            return Err(ScenarioError::Node(format!(
                "no address to cut between {} and {}",
                self.names(a),
                self.names(b)
            )));
        }
        self.next_cut += 1;
        let cut = Cut::new(self.next_cut, &pa, &pb, false)?;
        self.faults().cut(cut);
        Ok(())
    }

    /// Plays a fault step: injects it, keeps the load on for its duration,
    /// removes it, and waits until the cluster settles (bounded by
    /// [`HEAL_SETTLE_BOUND_S`] in the verdict).
    pub(super) fn fault_step(&mut self, step: Step) -> Result<(), ScenarioError> {
        let fault = self
            .cfg
            .fault
            .unwrap_or_else(|| self.cfg.scenario.default_fault());
        let at = Instant::now();
        let label;
        match step {
            Step::Partition => {
                let running: Vec<usize> = self.running().map(|(i, _)| i).collect();
                if running.len() < 2 {
                    self.problems.push("no two nodes to partition".into());
                    return Ok(());
                }
                let (a, b) = running.split_at(running.len() / 2);
                label = format!("partition {} | {}", self.names(a), self.names(b));
                self.cut(a, b)?;
                self.event(
                    "partition",
                    &self.names(a),
                    format!("{label}: cut for {:.1}s", fault.as_secs_f64()),
                );
                self.pump(Instant::now() + fault);
                self.faults().heal();
                self.event("heal", &self.names(a), format!("{label}: healed"));
            }
            Step::Pause => {
                let Some(i) = self.pick_not_oldest() else {
                    self.problems.push("no node to pause".into());
                    return Ok(());
                };
                let Some(p) = self.procs.get_mut(i) else {
                    return Ok(());
                };
                let freeze = Freeze::new(p.child.id())?;
                p.state = ProcState::Frozen;
                let name = p.name.clone();
                self.faults().freeze(freeze);
                label = format!("pause {name}");
                self.event(
                    "pause",
                    &name,
                    format!("{name} frozen (SIGSTOP) for {:.1}s", fault.as_secs_f64()),
                );
                self.pump(Instant::now() + fault);
                self.faults().thaw();
                if let Some(p) = self.procs.get_mut(i)
                    && p.state == ProcState::Frozen
                {
                    p.state = ProcState::Running;
                }
                self.event("thaw", &name, format!("{name} thawed (SIGCONT)"));
            }
            Step::Flap => {
                let Some(i) = self.pick_not_oldest() else {
                    self.problems.push("no node to flap".into());
                    return Ok(());
                };
                let others: Vec<usize> =
                    self.running().map(|(j, _)| j).filter(|j| *j != i).collect();
                let name = self.names(&[i]);
                label = format!("flap {name}");
                self.event(
                    "flap",
                    &name,
                    format!(
                        "{name}'s link flaps: down {:.1}s, up {:.1}s, {} times",
                        fault.as_secs_f64(),
                        fault.as_secs_f64(),
                        self.cfg.flaps
                    ),
                );
                for k in 0..self.cfg.flaps {
                    self.cut(&[i], &others)?;
                    self.line(
                        &format!("{name} cut off"),
                        serde_json::json!({"event": "link_down", "node": name}),
                    );
                    self.pump(Instant::now() + fault);
                    self.faults().heal();
                    self.line(
                        &format!("{name} reconnected"),
                        serde_json::json!({"event": "link_up", "node": name}),
                    );
                    if k + 1 < self.cfg.flaps {
                        self.pump(Instant::now() + fault);
                    }
                }
                self.event("heal", &name, format!("{label}: healed"));
            }
            Step::Join | Step::Leave | Step::Kill | Step::Restart => return Ok(()),
        }
        let healed = Instant::now();
        let s = self.wait_settled(&label, healed);
        if let Some(s) = s
            && s > HEAL_SETTLE_BOUND_S
        {
            self.problems.push(format!(
                "{label}: the cluster settled {s:.2}s after the heal, more than {HEAL_SETTLE_BOUND_S:.0}s"
            ));
        }
        let since_start = healed.saturating_duration_since(at).as_secs_f64();
        self.fault_windows.push(FaultWindow {
            label: label.clone(),
            at,
            settled_s: s.map(|s| s + since_start),
            heal_to_settled_s: s,
            unacknowledged: 0,
        });
        let text = match s {
            Some(s) => format!("{label}: settled {s:.2}s after the heal"),
            None => format!("{label}: NOT settled after the heal"),
        };
        self.line(
            &text,
            serde_json::json!({"event": "settled", "after": label, "s": s}),
        );
        self.transitions.push(TransitionTime { event: label, s });
        Ok(())
    }
}
