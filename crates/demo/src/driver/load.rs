//! The clock of a run: the load sent through random nodes, status requests,
//! progress lines, and waiting until the cluster settles.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::protocol::MemberCounts;

use super::{Proc, ProcState, Sample, Sim};

/// How often every running node is asked for its status. "Settled" is seen
/// at the first status round after it happened, so each measured transition
/// carries up to this much observation lag (it was 250 ms, a quarter of
/// what the kill target leaves after detection).
const STATUS_INTERVAL: Duration = Duration::from_millis(50);

impl Sim<'_> {
    /// Handles events and runs the clock (load, status requests, progress)
    /// until `until`.
    pub(super) fn pump(&mut self, until: Instant) {
        loop {
            let now = Instant::now();
            if now >= until {
                return;
            }
            let wait = (until - now).min(Duration::from_millis(20));
            match self.rx.recv_timeout(wait) {
                Ok(msg) => {
                    self.handle(msg);
                    while let Ok(msg) = self.rx.try_recv() {
                        self.handle(msg);
                    }
                    self.report_detections(false);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            self.tick();
        }
    }

    /// Prints each kill's detection once every survivor saw it (or, with
    /// `all`, whatever was seen so far).
    pub(super) fn report_detections(&mut self, all: bool) {
        let mut lines = Vec::new();
        for kill in &mut self.kills {
            let complete = kill.survivors.iter().all(|s| kill.detected.contains_key(s));
            if kill.reported || !(complete || all) {
                continue;
            }
            kill.reported = true;
            let first = kill
                .detected
                .values()
                .copied()
                .fold(f64::INFINITY, f64::min);
            let last = kill.detected.values().copied().fold(0.0, f64::max);
            let text = format!(
                "{} marked failed: by the first survivor after {:.2}s, by {} of {} survivors after {:.2}s",
                kill.name,
                first,
                kill.detected.len(),
                kill.survivors.len(),
                last
            );
            let json = serde_json::json!({"event": "detected", "node": kill.name,
                "first_s": first.is_finite().then_some(first), "all_s": last,
                "observers": kill.detected.len(), "survivors": kill.survivors.len()});
            lines.push((text, json));
        }
        for (text, json) in lines {
            self.line(&text, json);
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let dt = now.saturating_duration_since(self.last_tick).as_secs_f64();
        if dt < 0.02 {
            return;
        }
        self.last_tick = now;
        if self.load_on {
            self.inject(dt);
        }
        if now >= self.next_status {
            self.next_status = now + STATUS_INTERVAL;
            for p in &mut self.procs {
                if p.state == ProcState::Running {
                    p.send("status\n");
                }
            }
        }
        if now >= self.next_progress {
            self.next_progress += Duration::from_secs(1);
            self.progress();
        }
    }

    fn inject(&mut self, dt: f64) {
        let targets: Vec<usize> = self.running().map(|(i, _)| i).collect();
        if targets.is_empty() {
            return;
        }
        self.load_carry += f64::from(self.cfg.rate) * dt;
        let n = self.load_carry.floor();
        self.load_carry -= n;
        let mut batches: HashMap<usize, String> = HashMap::new();
        for _ in 0..(n as u64) {
            let pick = self.rng.random_range(0..targets.len());
            let Some(&target) = targets.get(pick) else {
                continue;
            };
            let series = self.rng.random_range(0..i64::from(self.cfg.series.max(1)));
            let value: f64 = self.rng.random_range(0.0..100.0);
            let id = self.next_point;
            self.next_point += 1;
            self.injected += 1;
            let now = Instant::now();
            self.outstanding.insert(id, (target, now, series));
            self.waiting_since.entry(series).or_insert(now);
            let line = format!("p {id} {series} {value:.3}\n");
            batches.entry(target).or_default().push_str(&line);
        }
        for (target, text) in batches {
            if let Some(p) = self.procs.get_mut(target) {
                p.send(&text);
            }
        }
    }

    pub(super) fn progress(&mut self) {
        let t = self.t(Instant::now());
        let mut first: Option<MemberCounts> = None;
        let mut rate = 0.0;
        let mut in_flight = 0;
        let mut owned = Vec::new();
        for p in &self.procs {
            let state = p.state.label();
            let o = p.status.as_ref().map_or(0, |s| s.owned);
            if matches!(p.state, ProcState::Running | ProcState::Leaving) {
                if let Some(s) = &p.status {
                    first.get_or_insert(s.members);
                    rate += s.points_per_s;
                    in_flight += s.in_flight;
                }
                owned.push(format!("{}:{o}", p.name));
            }
            if !(p.state == ProcState::Stopped && p.eof && p.status.is_none()) {
                self.samples.push(Sample {
                    t,
                    node: p.name.clone(),
                    state: if p.state == ProcState::Running
                        && p.status.as_ref().is_some_and(|s| s.fenced)
                    {
                        "fenced"
                    } else {
                        state
                    },
                    owned: if matches!(p.state, ProcState::Killed | ProcState::Stopped) {
                        0
                    } else {
                        o
                    },
                });
            }
        }
        let acked: u64 = self.acked.values().sum();
        if !self.cfg.json {
            let m = first.unwrap_or_default();
            let text = format!(
                "members alive {} suspect {} dead {} left {} | points/s {:6.0} | acked {:8} | in flight {:4} | owned {}",
                m.alive,
                m.suspect,
                m.dead,
                m.left,
                rate,
                acked,
                in_flight,
                owned.join(" ")
            );
            let _ = writeln!(self.out, "[{t:7.2}s] {text}");
        }
    }

    /// Whether every running node reports the same view, every running node
    /// live and nothing suspect, nothing in flight, ready and not fenced,
    /// each series owned once, in a status received after `since`.
    fn settled(&self, since: Instant) -> bool {
        let running: Vec<&Proc> = self.running().map(|(_, p)| p).collect();
        if running.is_empty() || self.procs.iter().any(|p| p.state == ProcState::Starting) {
            return false;
        }
        let mut view = None;
        let mut owned = 0;
        for p in &running {
            let Some(s) = &p.status else { return false };
            if s.at < since
                || s.live != running.len()
                || s.members.suspect > 0
                || s.in_flight > 0
                || s.fenced
                || !s.ready
            {
                return false;
            }
            if *view.get_or_insert(s.view_id) != s.view_id {
                return false;
            }
            owned += s.owned;
        }
        owned == self.cfg.series as usize
    }

    pub(super) fn wait_settled(&mut self, what: &str, since: Instant) -> Option<f64> {
        let deadline = Instant::now() + self.cfg.settle_timeout;
        // Statuses asked after `since` must come back.
        let since = since + Duration::from_millis(10);
        while Instant::now() < deadline {
            self.pump(Instant::now() + Duration::from_millis(50));
            if self.settled(since) {
                let s = Instant::now()
                    .saturating_duration_since(since)
                    .as_secs_f64();
                return Some(s);
            }
        }
        self.problems
            .push(format!("the cluster did not settle after {what}"));
        None
    }

    pub(super) fn wait_for(&mut self, timeout: Duration, cond: impl Fn(&Sim<'_>) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond(self) {
                return true;
            }
            self.pump(Instant::now() + Duration::from_millis(50));
        }
        cond(self)
    }
}
