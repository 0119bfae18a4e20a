//! The scenario played: its steps (join, leave, kill, restart), the drain
//! and the end-of-run reads.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{Kill, ProcState, ScenarioError, Sim, Step, Summary, TransitionTime};

impl Sim<'_> {
    fn step(&mut self, step: Step) -> Result<(), ScenarioError> {
        if step.is_fault() {
            return self.fault_step(step);
        }
        let at = Instant::now();
        let label;
        match step {
            Step::Join => {
                let name = self.new_name();
                let seeds = self.seeds();
                self.event("join", &name, format!("{name} joins"));
                self.start_node(&name, seeds)?;
                label = format!("join {name}");
            }
            Step::Leave => {
                let Some(i) = self.pick_running() else {
                    self.problems.push("no node to leave".into());
                    return Ok(());
                };
                let name = self
                    .procs
                    .get(i)
                    .map(|p| p.name.clone())
                    .unwrap_or_default();
                self.event("leave", &name, format!("{name} leaves gracefully"));
                if let Some(p) = self.procs.get_mut(i) {
                    p.state = ProcState::Leaving;
                    p.send("leave\n");
                }
                let left = self.wait_for(Duration::from_secs(40), |s| {
                    s.procs.get(i).is_none_or(|p| p.eof)
                });
                if !left {
                    self.problems.push(format!("{name} did not finish leaving"));
                }
                if let Some(p) = self.procs.get_mut(i) {
                    p.state = ProcState::Stopped;
                }
                label = format!("leave {name}");
            }
            Step::Kill => {
                let Some(i) = self.pick_running() else {
                    self.problems.push("no node to kill".into());
                    return Ok(());
                };
                let survivors: Vec<String> = self
                    .running()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| p.name.clone())
                    .collect();
                let Some(p) = self.procs.get_mut(i) else {
                    return Ok(());
                };
                let _ = p.child.kill();
                let killed_at = Instant::now();
                p.state = ProcState::Killed;
                p.stdin = None;
                let (name, generation) = (p.name.clone(), p.generation);
                self.kills.push(Kill {
                    proc: i,
                    name: name.clone(),
                    generation,
                    at: killed_at,
                    survivors,
                    detected: HashMap::new(),
                    reported: false,
                    settled_s: None,
                });
                self.event("kill", &name, format!("{name} killed (SIGKILL)"));
                label = format!("kill {name}");
            }
            Step::Partition | Step::Pause | Step::Flap => return Ok(()),
            Step::Restart => {
                let Some(name) = self.kills.last().map(|k| k.name.clone()) else {
                    return Ok(());
                };
                let seeds = self.seeds();
                self.event(
                    "restart",
                    &name,
                    format!("{name} restarts under the same name"),
                );
                self.start_node(&name, seeds)?;
                label = format!("restart {name}");
            }
        }
        let s = self.wait_settled(&label, at);
        if step == Step::Kill
            && let Some(kill) = self.kills.last_mut()
        {
            kill.settled_s = s;
        }
        self.report_detections(true);
        let text = match s {
            Some(s) => format!("{label}: settled after {s:.2}s"),
            None => format!("{label}: NOT settled"),
        };
        self.line(
            &text,
            serde_json::json!({"event": "settled", "after": label, "s": s}),
        );
        self.transitions.push(TransitionTime { event: label, s });
        Ok(())
    }

    pub(super) fn play(&mut self) -> Result<Summary, ScenarioError> {
        let started = Instant::now();
        let first = self.new_name();
        self.event(
            "start",
            &first,
            format!("starting {first} (a cluster of one)"),
        );
        self.start_node(&first, Vec::new())?;
        let seed_addr: Vec<String> = self.running().filter_map(|(_, p)| p.addr.clone()).collect();
        let mut names = Vec::new();
        for _ in 1..self.cfg.nodes {
            let name = self.new_name();
            let index = self.spawn(&name, seed_addr.clone())?;
            names.push((name, index));
        }
        for (name, index) in names {
            self.event("start", &name, format!("starting {name}"));
            self.wait_started(index, &name)?;
        }
        let at = Instant::now();
        let s = self.wait_settled("start", at);
        self.line(
            &format!("{} nodes up, settled: {s:?}", self.cfg.nodes),
            serde_json::json!({"event": "settled", "after": "start", "s": s}),
        );
        let steps = self.cfg.scenario.steps();
        let gap = self.cfg.duration / u32::try_from(steps.len() + 1).unwrap_or(1);
        self.load_on = true;
        self.line(
            &format!(
                "load on: {} points/s over {} series",
                self.cfg.rate, self.cfg.series
            ),
            serde_json::json!({"event": "load", "rate": self.cfg.rate}),
        );
        for step in steps {
            self.pump(Instant::now() + gap);
            self.step(step)?;
        }
        self.pump(Instant::now() + gap);
        self.load_on = false;
        self.line(
            "load off; draining",
            serde_json::json!({"event": "load_off"}),
        );
        self.drain();
        self.verdict(started)
    }

    fn drain(&mut self) {
        // Acknowledgements still in flight: wait until they stop changing.
        let mut last = (self.acked.values().sum::<u64>(), Instant::now());
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && last.1.elapsed() < Duration::from_millis(1500) {
            self.pump(Instant::now() + Duration::from_millis(100));
            let total: u64 = self.acked.values().sum();
            if total != last.0 {
                last = (total, Instant::now());
            }
        }
        for p in &mut self.procs {
            if p.state == ProcState::Running {
                p.send("flush\n");
            }
        }
        let flushed = self.wait_for(Duration::from_secs(20), |s| {
            s.running().all(|(_, p)| p.flushed)
        });
        if !flushed {
            self.problems
                .push("not every node confirmed its final flush".into());
        }
        // A last status after the final flush: its refusal counters are
        // final, and whether the node ended fenced.
        let asked = Instant::now();
        for p in &mut self.procs {
            if p.state == ProcState::Running {
                p.send("status\n");
            }
        }
        self.wait_for(Duration::from_secs(5), |s| {
            s.running()
                .all(|(_, p)| p.status.as_ref().is_some_and(|st| st.at > asked))
        });
        self.fenced_at_end = self
            .running()
            .filter(|(_, p)| p.status.as_ref().is_some_and(|s| s.fenced))
            .map(|(_, p)| p.name.clone())
            .collect();
        // Every series read from some running node, through the owner
        // (request/response): after the final flush the owner's answer is
        // what the store holds; the verdict compares them.
        let readers: Vec<usize> = self.running().map(|(i, _)| i).collect();
        if !readers.is_empty() {
            for id in 0..i64::from(self.cfg.series) {
                let Ok(k) = usize::try_from(id) else { break };
                if let Some(p) = readers
                    .get(k % readers.len())
                    .and_then(|&i| self.procs.get_mut(i))
                {
                    p.send(&format!("r {id}\n"));
                }
            }
            let want = self.cfg.series as usize;
            self.wait_for(Duration::from_secs(15), |s| {
                s.reads.len() + s.read_failures.len() >= want
            });
        }
        for p in &mut self.procs {
            if p.state == ProcState::Running {
                p.send("quit\n");
                p.state = ProcState::Leaving;
            }
        }
        let all_out = self.wait_for(Duration::from_secs(20), |s| {
            s.procs
                .iter()
                .all(|p| p.eof || p.state == ProcState::Killed)
        });
        if !all_out {
            self.problems
                .push("some node did not exit after quit".into());
        }
        self.progress();
        for p in &mut self.procs {
            if p.state == ProcState::Leaving {
                p.state = ProcState::Stopped;
            }
        }
    }
}
