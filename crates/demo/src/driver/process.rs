//! Node processes: spawning, their control pipes and reports, naming and
//! picking them; a process is killed on drop.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use shoal::Timing;
use shoal_transport::NodeName;

use crate::protocol::NodeEvent;
use crate::store::Writer;

use super::{Msg, Proc, ProcState, ScenarioError, Sim, Status};

impl ProcState {
    pub(super) fn label(self) -> &'static str {
        match self {
            ProcState::Starting => "starting",
            ProcState::Running => "running",
            ProcState::Frozen => "frozen",
            ProcState::Leaving => "leaving",
            ProcState::Killed => "killed",
            ProcState::Stopped => "stopped",
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stdin = None;
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Proc {
    pub(super) fn send(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut()
            && stdin.write_all(line.as_bytes()).is_err()
        {
            self.stdin = None;
        }
    }
}

impl Sim<'_> {
    pub(super) fn running(&self) -> impl Iterator<Item = (usize, &Proc)> {
        self.procs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.state == ProcState::Running)
    }

    pub(super) fn spawn(&mut self, name: &str, seeds: Vec<String>) -> Result<usize, ScenarioError> {
        let dir = self.cfg.work_dir.join("certs").join(name);
        if !dir.join("node.crt").exists() {
            let node_name = NodeName::new(name)?;
            self.ca.issue(&node_name)?.write_pem_files(&dir)?;
        }
        let logs = self.cfg.work_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let index = self.procs.len();
        let log = std::fs::File::create(logs.join(format!("{name}.{index}.log")))?;
        let mut cmd = Command::new(&self.cfg.bin);
        cmd.arg("node")
            .args(["--name", name, "--bind", "127.0.0.1:0"])
            .arg("--tls-dir")
            .arg(&dir)
            .args(["--store", &self.store_url.to_string()])
            .args(["--series", &self.cfg.series.to_string()])
            .args(["--flush-ms", &self.cfg.flush_ms.to_string()])
            .args([
                "--timing",
                match self.cfg.timing {
                    Timing::Lan => "lan",
                    Timing::Wan => "wan",
                    Timing::Local => "local",
                },
            ]);
        if !seeds.is_empty() {
            cmd.args(["--seeds", &seeds.join(",")]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        if let Some(stdout) = stdout {
            let tx = self.tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(event) = serde_json::from_str::<NodeEvent>(&line) {
                        let msg = Msg {
                            proc: index,
                            at: Instant::now(),
                            event: Some(event),
                        };
                        if tx.send(msg).is_err() {
                            return;
                        }
                    }
                }
                let _ = tx.send(Msg {
                    proc: index,
                    at: Instant::now(),
                    event: None,
                });
            });
        }
        self.procs.push(Proc {
            name: name.to_owned(),
            generation: 0,
            addr: None,
            child,
            stdin,
            state: ProcState::Starting,
            status: None,
            flushed: false,
            done: false,
            eof: false,
        });
        Ok(index)
    }

    pub(super) fn handle(&mut self, msg: Msg) {
        let t = self.t(msg.at);
        let Some(proc) = self.procs.get_mut(msg.proc) else {
            return;
        };
        let Some(event) = msg.event else {
            proc.eof = true;
            proc.stdin = None;
            match proc.state {
                ProcState::Running | ProcState::Starting | ProcState::Frozen => {
                    let text = format!(
                        "{} (generation {}) exited unasked",
                        proc.name, proc.generation
                    );
                    proc.state = ProcState::Stopped;
                    self.problems.push(text);
                }
                ProcState::Leaving => proc.state = ProcState::Stopped,
                ProcState::Killed | ProcState::Stopped => {}
            }
            return;
        };
        match event {
            NodeEvent::Started {
                generation, addr, ..
            } => {
                proc.generation = generation;
                proc.addr = Some(addr);
            }
            NodeEvent::Ready { .. } => {
                if proc.state == ProcState::Starting {
                    proc.state = ProcState::Running;
                }
            }
            NodeEvent::Member {
                peer,
                generation,
                state,
            } => {
                if state == "gone" {
                    let observer = proc.name.clone();
                    for kill in &mut self.kills {
                        if kill.name == peer
                            && kill.generation == generation
                            && kill.survivors.contains(&observer)
                            && !kill.detected.contains_key(&observer)
                        {
                            let s = msg.at.saturating_duration_since(kill.at).as_secs_f64();
                            kill.detected.insert(observer.clone(), s);
                        }
                    }
                }
                let _ = t;
            }
            NodeEvent::Acked {
                owner,
                generation,
                count,
                ids,
            } => {
                *self
                    .acked
                    .entry(Writer {
                        node: owner,
                        generation,
                    })
                    .or_insert(0) += count;
                let mut series_acked = Vec::new();
                for id in ids {
                    match self.outstanding.remove(&id) {
                        Some((_, _, series)) => series_acked.push(series),
                        None => self.acked_twice += 1,
                    }
                }
                // A series waited from the first point ingested after its
                // last acknowledgement until this one.
                for series in series_acked {
                    if let Some(since) = self.waiting_since.remove(&series) {
                        let gap = msg.at.saturating_duration_since(since).as_secs_f64();
                        if self.unavailable.is_none_or(|(g, _, _)| gap > g) {
                            self.unavailable = Some((gap, series, t));
                        }
                    }
                }
            }
            NodeEvent::Refused { id } => {
                self.refused += 1;
                self.outstanding.remove(&id);
            }
            NodeEvent::Read {
                series,
                owner,
                count,
                ..
            } => {
                self.reads.insert(series, (owner, count));
            }
            NodeEvent::ReadFailed { series, error } => self.read_failures.push((series, error)),
            NodeEvent::Status {
                members,
                live,
                view_id,
                owned,
                in_flight,
                points_per_s,
                fenced,
                ready,
                stale_writes_refused,
                points_refused,
                ..
            } => {
                proc.status = Some(Status {
                    at: msg.at,
                    members,
                    live,
                    view_id,
                    owned,
                    in_flight,
                    points_per_s,
                    fenced,
                    ready,
                    stale_writes_refused,
                    points_refused,
                });
            }
            NodeEvent::Flushed { .. } => proc.flushed = true,
            NodeEvent::Left { .. } | NodeEvent::Bye { .. } => proc.done = true,
        }
    }

    pub(super) fn seeds(&mut self) -> Vec<String> {
        let mut addrs: Vec<String> = self.running().filter_map(|(_, p)| p.addr.clone()).collect();
        while addrs.len() > 3 {
            let i = self.rng.random_range(0..addrs.len());
            addrs.swap_remove(i);
        }
        addrs
    }

    pub(super) fn start_node(
        &mut self,
        name: &str,
        seeds: Vec<String>,
    ) -> Result<usize, ScenarioError> {
        let index = self.spawn(name, seeds)?;
        self.wait_started(index, name)?;
        Ok(index)
    }

    /// Waits until process `index` is ready (at most 60 s).
    pub(super) fn wait_started(&mut self, index: usize, name: &str) -> Result<(), ScenarioError> {
        let up = self.wait_for(Duration::from_secs(60), |s| {
            s.procs
                .get(index)
                .is_some_and(|p| p.state != ProcState::Starting)
        });
        if !up
            || self
                .procs
                .get(index)
                .is_none_or(|p| p.state != ProcState::Running)
        {
            return Err(ScenarioError::Node(format!(
                "{name} did not start (see its log in {})",
                self.cfg.work_dir.join("logs").display()
            )));
        }
        Ok(())
    }

    pub(super) fn new_name(&mut self) -> String {
        self.next_index += 1;
        format!("n{}", self.next_index)
    }

    pub(super) fn pick_running(&mut self) -> Option<usize> {
        let candidates: Vec<usize> = self.running().map(|(i, _)| i).collect();
        if candidates.len() < 2 {
            return None;
        }
        let i = self.rng.random_range(0..candidates.len());
        candidates.get(i).copied()
    }

    /// The process a writer was: the last one of that name started with a
    /// generation not above the writer's (a rebirth keeps the process and
    /// takes a higher generation; a restart is a new process).
    pub(super) fn proc_of(&self, writer: &Writer) -> Option<usize> {
        self.procs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.name == writer.node && p.generation <= writer.generation)
            .max_by_key(|(_, p)| p.generation)
            .map(|(i, _)| i)
    }

    pub(super) fn names(&self, procs: &[usize]) -> String {
        let names: Vec<&str> = procs
            .iter()
            .filter_map(|i| self.procs.get(*i).map(|p| p.name.as_str()))
            .collect();
        names.join(",")
    }

    /// The UDP ports of processes `procs` (each node has one socket).
    pub(super) fn ports(&self, procs: &[usize]) -> Vec<u16> {
        procs
            .iter()
            .filter_map(|i| self.procs.get(*i)?.addr.as_ref()?.parse().ok())
            .map(|a: std::net::SocketAddr| a.port())
            .collect()
    }

    /// A running node other than the oldest (the lowest generation), at
    /// random.
    pub(super) fn pick_not_oldest(&mut self) -> Option<usize> {
        let running: Vec<(usize, u64)> = self.running().map(|(i, p)| (i, p.generation)).collect();
        let oldest = running.iter().min_by_key(|(_, g)| *g).map(|(i, _)| *i);
        let candidates: Vec<usize> = running
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| Some(*i) != oldest)
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..candidates.len());
        candidates.get(i).copied()
    }
}
