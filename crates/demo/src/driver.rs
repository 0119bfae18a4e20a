//! The scenario driver: starts demo nodes as child processes on loopback,
//! drives load through random nodes, plays a scenario (join, leave, kill,
//! restart), drains, and computes the verdict from the store and the nodes'
//! reports.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use shoal::Timing;
use shoal_transport::{ClusterCa, NodeName, TrustError};

use crate::fault::{self, Cut, FaultError, Faults, Freeze};
use crate::protocol::{MemberCounts, NodeEvent};
use crate::store::{Store, StoreError, StoreUrl, Writer};
use crate::svg;

/// What the driver plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// Join a node, a graceful leave, a SIGKILL, the restart of the victim.
    Default,
    /// One node joins.
    Join,
    /// One node leaves gracefully.
    Leave,
    /// One node is killed (SIGKILL) once the cluster settled.
    Kill,
    /// Two rounds of join, kill, restart, leave.
    Churn,
    /// The first two nodes cut from the others (both directions) for the
    /// fault duration (10 s), then healed.
    Partition,
    /// One node (not the oldest) frozen with SIGSTOP for the fault
    /// duration (8 s), then thawed.
    Pause,
    /// One node (not the oldest) cut from the others for the fault
    /// duration (1.5 s) and reconnected for as long, `flaps` (5) times.
    Flap,
}

impl Scenario {
    /// Parses a scenario name.
    pub fn parse(s: &str) -> Option<Scenario> {
        Some(match s {
            "default" => Scenario::Default,
            "join" => Scenario::Join,
            "leave" => Scenario::Leave,
            "kill" => Scenario::Kill,
            "churn" => Scenario::Churn,
            "partition" => Scenario::Partition,
            "pause" => Scenario::Pause,
            "flap" => Scenario::Flap,
            _ => return None,
        })
    }

    fn steps(self) -> Vec<Step> {
        use Step::*;
        match self {
            Scenario::Default => vec![Join, Leave, Kill, Restart, Pause],
            Scenario::Join => vec![Join],
            Scenario::Leave => vec![Leave],
            Scenario::Kill => vec![Kill],
            Scenario::Churn => vec![Join, Kill, Restart, Leave, Join, Kill, Restart, Leave],
            Scenario::Partition => vec![Partition],
            Scenario::Pause => vec![Pause],
            Scenario::Flap => vec![Flap],
        }
    }

    /// The fault duration when `--fault-s` is not given.
    fn default_fault(self) -> Duration {
        match self {
            Scenario::Pause | Scenario::Default => Duration::from_secs(8),
            Scenario::Flap => Duration::from_millis(1500),
            _ => Duration::from_secs(10),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Default => "default",
            Scenario::Join => "join",
            Scenario::Leave => "leave",
            Scenario::Kill => "kill",
            Scenario::Churn => "churn",
            Scenario::Partition => "partition",
            Scenario::Pause => "pause",
            Scenario::Flap => "flap",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Join,
    Leave,
    Kill,
    Restart,
    /// Cut the first half of the running nodes (rounded down) from the
    /// others, then heal.
    Partition,
    /// SIGSTOP a node that is not the oldest, then SIGCONT.
    Pause,
    /// Cut a node that is not the oldest from the others and reconnect it,
    /// repeatedly.
    Flap,
}

impl Step {
    fn is_fault(self) -> bool {
        matches!(self, Step::Partition | Step::Pause | Step::Flap)
    }
}

/// Configuration of a run.
#[derive(Clone, Debug)]
pub struct ScenarioConfig {
    /// Nodes at the start.
    pub nodes: usize,
    /// Series (datums).
    pub series: u32,
    /// Points per second, all nodes together.
    pub rate: u32,
    /// Load time, spread between the scenario's steps.
    pub duration: Duration,
    /// The scenario.
    pub scenario: Scenario,
    /// Store URL; `None`: a fresh SQLite file in `work_dir`.
    pub store: Option<String>,
    /// Seed of the driver's choices (victims, point routing, values).
    pub seed: u64,
    /// One JSON object per line instead of readable lines.
    pub json: bool,
    /// The `shoal-demo` binary.
    pub bin: PathBuf,
    /// Directory for certificates, the store, logs and the picture.
    pub work_dir: PathBuf,
    /// Membership timing profile of the nodes.
    pub timing: Timing,
    /// Flush interval of the nodes, milliseconds.
    pub flush_ms: u64,
    /// Longest wait for the cluster to settle after a step.
    pub settle_timeout: Duration,
    /// How long a fault lasts (the cut of a partition, the freeze of a
    /// pause, each down and each up phase of a flap); `None`: the
    /// scenario's default (10 s, 8 s, 1.5 s).
    pub fault: Option<Duration>,
    /// Down-up cycles of a flap.
    pub flaps: u32,
}

impl ScenarioConfig {
    /// The defaults of `cargo xtask sim`, for a binary and a work dir.
    pub fn new(bin: PathBuf, work_dir: PathBuf) -> ScenarioConfig {
        ScenarioConfig {
            nodes: 5,
            series: 64,
            rate: 1000,
            duration: Duration::from_secs(20),
            scenario: Scenario::Default,
            store: None,
            seed: 1,
            json: false,
            bin,
            work_dir,
            timing: Timing::Lan,
            flush_ms: 500,
            settle_timeout: Duration::from_secs(30),
            fault: None,
            flaps: 5,
        }
    }
}

/// Driver errors (setup failures; violations are in the [`Summary`]).
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// Files, processes or pipes.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// Certificates.
    #[error("certificates: {0}")]
    Trust(#[from] TrustError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A node did not come up.
    #[error("{0}")]
    Node(String),
    /// A fault could not be injected (nftables, signals).
    #[error("fault injection: {0}")]
    Fault(#[from] FaultError),
}

/// Loss attributed to one kill.
#[derive(Clone, Debug, Serialize)]
pub struct KillLoss {
    /// Victim name.
    pub node: String,
    /// Victim generation.
    pub generation: u64,
    /// Points it had acknowledged and not persisted.
    pub lost: u64,
    /// Points sent to a node and never acknowledged nor refused that this
    /// kill explains: ingested by the victim, or ingested from 1 s before
    /// the kill until its transition settled.
    pub unacknowledged: u64,
}

/// How much longer than its failure detection (by every survivor) a kill's
/// transition may take: above, the verdict fails (a timeout was waited out).
pub const KILL_SETTLE_BOUND_S: f64 = 2.0;

/// Points ingested this long before a kill and never acknowledged are
/// attributed to it (they were on their way to, or queued at, the victim).
const KILL_UNACKED_BEFORE_S: f64 = 1.0;

/// Longest time from the heal of a fault (the cut removed, the process
/// thawed) until every running node reports the same view, nothing in
/// flight, ready and not fenced: above, the verdict fails.
pub const HEAL_SETTLE_BOUND_S: f64 = 3.0;

/// What one fault (a partition, a pause, a flap) cost.
#[derive(Clone, Debug, Serialize)]
pub struct FaultReport {
    /// What it was (`partition n1,n2 | n3,n4,n5`, `pause n3`, ...).
    pub fault: String,
    /// Seconds from the start of the run when it began.
    pub at_s: f64,
    /// Seconds from the (last) heal until the cluster settled; `None` if
    /// it did not within the settle timeout.
    pub heal_to_settled_s: Option<f64>,
    /// Points sent to a node and never acknowledged nor refused that this
    /// fault explains: ingested from 1 s before it began until the cluster
    /// settled after the heal.
    pub unacknowledged: u64,
}

/// One transition: an event and how long until the cluster settled.
#[derive(Clone, Debug, Serialize)]
pub struct TransitionTime {
    /// What happened (`join n6`, `leave n2`, ...).
    pub event: String,
    /// Seconds from the event until every node agreed on the view and had
    /// nothing in flight; `None` if it did not settle in time.
    pub s: Option<f64>,
}

/// The verdict of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Always `"summary"`.
    pub event: &'static str,
    /// Scenario played.
    pub scenario: &'static str,
    /// Nodes at the start.
    pub nodes: usize,
    /// Series.
    pub series: u32,
    /// Points the driver sent to a node to ingest.
    pub points_ingested: u64,
    /// Points acknowledged to the driver (accepted by an owner).
    pub points_sent: u64,
    /// Points sent to a node and never acknowledged nor refused.
    pub points_unacknowledged: u64,
    /// Of those, not explained by a kill (see [`KillLoss::unacknowledged`]):
    /// a violation.
    pub unacknowledged_outside_kills: u64,
    /// Points acknowledged more than once (accepted twice): a violation.
    pub points_acked_twice: u64,
    /// Points in the store.
    pub points_persisted: u64,
    /// Acknowledged points not persisted.
    pub points_lost: u64,
    /// Of those, lost by a generation that was not killed.
    pub lost_outside_kills: u64,
    /// Loss per kill.
    pub lost_by_kill: Vec<KillLoss>,
    /// Points refused by the ingesting node (no owner; never acknowledged).
    pub points_refused: u64,
    /// Store rows written by a node after another had taken the series.
    pub double_owner_writes: u64,
    /// Kill → first survivor marks the victim failed, seconds (worst kill).
    pub detect_first_s: Option<f64>,
    /// Kill → every survivor marks the victim failed, seconds (worst kill).
    pub detect_all_s: Option<f64>,
    /// Every transition.
    pub transitions: Vec<TransitionTime>,
    /// The longest transition.
    pub max_transition_s: Option<f64>,
    /// Nodes that reported themselves fenced.
    pub fenced_nodes: usize,
    /// Nodes whose last status before the drain said fenced: a violation.
    pub fenced_nodes_at_end: usize,
    /// Series read at the end through the facade's request/response (each
    /// asked of a running node, answered by the series' owner).
    pub reads_answered: usize,
    /// Reads that failed or whose count differed from the store's after
    /// the final flush: a violation.
    pub reads_wrong: usize,
    /// Series writes the store refused for a stale fencing token, as the
    /// nodes reported them (their last status, summed).
    pub stale_writes_refused: u64,
    /// The same from the store's audit (`refused` rows of `writes`).
    pub stale_writes_refused_store: u64,
    /// Accepted (acknowledged) points lost to those refusals, as the nodes
    /// reported them.
    pub points_refused_by_store: u64,
    /// The same from the store's audit (points of the `refused` rows).
    pub points_refused_by_store_audit: u64,
    /// Acknowledged points not persisted because the store refused them
    /// (stale token) in a run with faults: attributed to the faults, not in
    /// `lost_outside_kills`.
    pub lost_to_fencing: u64,
    /// Every fault injected.
    pub faults: Vec<FaultReport>,
    /// The longest time from a heal until the cluster settled (worst
    /// fault); `None` without faults or when one never settled.
    pub heal_to_settled_s: Option<f64>,
    /// Longest time a series had no owner accepting its points, seconds,
    /// measured from the acknowledgements: for each series, the time from
    /// the first point ingested after its last acknowledgement until the
    /// next acknowledgement (of any of its points). The floor is the
    /// acknowledgement batching (50 ms) plus routing; a wait that no
    /// acknowledgement ends (the series never served again) is not in it.
    pub unavailable_s: Option<f64>,
    /// The series of `unavailable_s` and when that gap ended (seconds from
    /// the start of the run).
    pub unavailable_series: Option<(i64, f64)>,
    /// Failures other than the above (a node that died unasked, a stuck
    /// drain, a detection never observed).
    pub problems: Vec<String>,
    /// The timeline picture.
    pub svg: String,
    /// Run time, seconds.
    pub wall_s: f64,
    /// No violation.
    pub ok: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProcState {
    Starting,
    Running,
    /// SIGSTOPped by a pause: no points nor commands are sent to it.
    Frozen,
    Leaving,
    Killed,
    Stopped,
}

impl ProcState {
    fn label(self) -> &'static str {
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

#[derive(Clone, Debug)]
struct Status {
    at: Instant,
    members: MemberCounts,
    live: usize,
    view_id: u64,
    owned: usize,
    in_flight: usize,
    points_per_s: f64,
    fenced: bool,
    ready: bool,
    stale_writes_refused: u64,
    points_refused: u64,
}

/// One child process (one generation of a node). Killed on drop.
struct Proc {
    name: String,
    generation: u64,
    addr: Option<String>,
    child: Child,
    stdin: Option<ChildStdin>,
    state: ProcState,
    status: Option<Status>,
    flushed: bool,
    done: bool,
    eof: bool,
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
    fn send(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut()
            && stdin.write_all(line.as_bytes()).is_err()
        {
            self.stdin = None;
        }
    }
}

/// A fault in the run and what it explains.
struct FaultWindow {
    label: String,
    at: Instant,
    /// Seconds from `at` until the cluster settled after the heal.
    settled_s: Option<f64>,
    heal_to_settled_s: Option<f64>,
    unacknowledged: u64,
}

struct Msg {
    proc: usize,
    at: Instant,
    event: Option<NodeEvent>,
}

struct Kill {
    /// Index of the victim's process.
    proc: usize,
    name: String,
    generation: u64,
    at: Instant,
    survivors: Vec<String>,
    detected: HashMap<String, f64>,
    reported: bool,
    /// Seconds from the kill until the cluster settled.
    settled_s: Option<f64>,
}

/// A point of the timeline picture.
#[derive(Clone, Debug)]
pub(crate) struct Sample {
    pub(crate) t: f64,
    pub(crate) node: String,
    pub(crate) state: &'static str,
    pub(crate) owned: usize,
}

/// An event of the timeline picture.
#[derive(Clone, Debug)]
pub(crate) struct Mark {
    pub(crate) t: f64,
    pub(crate) label: String,
}

struct Sim<'a> {
    /// The faults in force. Declared first so that it is dropped first, on
    /// every path out of the driver (normal end, error, panic): the network
    /// heals and frozen nodes thaw before the children are killed.
    faults: Arc<Mutex<Faults>>,
    cfg: ScenarioConfig,
    out: &'a mut dyn Write,
    t0: Instant,
    store_url: StoreUrl,
    ca: ClusterCa,
    procs: Vec<Proc>,
    tx: mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    rng: SmallRng,
    next_point: u64,
    load_on: bool,
    load_carry: f64,
    acked: HashMap<Writer, u64>,
    refused: u64,
    /// Points sent to a node and not acknowledged nor refused yet: the
    /// ingesting process and when.
    outstanding: HashMap<u64, (usize, Instant, i64)>,
    /// Per series: when the first point ingested since its last
    /// acknowledgement was ingested.
    waiting_since: HashMap<i64, Instant>,
    /// The longest gap between acknowledgements of one series: seconds,
    /// series, when it ended.
    unavailable: Option<(f64, i64, f64)>,
    fault_windows: Vec<FaultWindow>,
    next_cut: u32,
    /// Running nodes whose last status (after the final flush) said fenced.
    fenced_at_end: Vec<String>,
    /// End-of-run reads answered by owners: series → (owner, count).
    reads: HashMap<i64, (String, u64)>,
    /// End-of-run reads that failed: (series, error).
    read_failures: Vec<(i64, String)>,
    injected: u64,
    acked_twice: u64,
    kills: Vec<Kill>,
    transitions: Vec<TransitionTime>,
    samples: Vec<Sample>,
    marks: Vec<Mark>,
    problems: Vec<String>,
    next_index: usize,
    last_tick: Instant,
    next_status: Instant,
    next_progress: Instant,
}

/// Runs a scenario and returns its verdict; progress and events go to
/// `out` (readable lines, or JSON lines with `cfg.json`).
///
/// # Errors
/// [`ScenarioError`] when the run cannot be set up (certificates, store,
/// processes). Violations are reported in the [`Summary`] (`ok: false`).
pub fn run(cfg: ScenarioConfig, out: &mut dyn Write) -> Result<Summary, ScenarioError> {
    std::fs::create_dir_all(&cfg.work_dir)?;
    // Certificates and logs are per run: a certificate of an earlier run's
    // CA would be refused by this run's nodes (and split the cluster).
    for stale in ["certs", "logs"] {
        let dir = cfg.work_dir.join(stale);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
    }
    let store_url = match &cfg.store {
        Some(url) => StoreUrl::parse(url)?,
        None => {
            let path = cfg.work_dir.join("store.db");
            for suffix in ["", "-wal", "-shm"] {
                let mut p = path.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(PathBuf::from(p));
            }
            StoreUrl::Sqlite(path)
        }
    };
    // Create the schema once before the nodes race for it; a run starts
    // from empty tables.
    Store::open(&store_url)?.reset()?;
    let ca = ClusterCa::generate()?;
    ca.write_pem_files(&cfg.work_dir.join("ca"))?;
    let (tx, rx) = mpsc::channel();
    let now = Instant::now();
    let seed = cfg.seed;
    let faults = Arc::new(Mutex::new(Faults::default()));
    if cfg
        .scenario
        .steps()
        .iter()
        .any(|s| matches!(s, Step::Partition | Step::Flap))
    {
        fault::ensure_nft()?;
        fault::remove_leftovers();
        fault::clear_on_signal(&faults)?;
    }
    let mut sim = Sim {
        faults,
        cfg,
        out,
        t0: now,
        store_url,
        ca,
        procs: Vec::new(),
        tx,
        rx,
        rng: SmallRng::seed_from_u64(seed),
        next_point: 0,
        load_on: false,
        load_carry: 0.0,
        acked: HashMap::new(),
        refused: 0,
        outstanding: HashMap::new(),
        waiting_since: HashMap::new(),
        unavailable: None,
        fault_windows: Vec::new(),
        next_cut: 0,
        fenced_at_end: Vec::new(),
        reads: HashMap::new(),
        read_failures: Vec::new(),
        injected: 0,
        acked_twice: 0,
        kills: Vec::new(),
        transitions: Vec::new(),
        samples: Vec::new(),
        marks: Vec::new(),
        problems: Vec::new(),
        next_index: 0,
        last_tick: now,
        next_status: now,
        next_progress: now + Duration::from_secs(1),
    };
    sim.play()
}

impl Sim<'_> {
    fn t(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.t0).as_secs_f64()
    }

    fn line(&mut self, text: &str, json: serde_json::Value) {
        let t = self.t(Instant::now());
        if self.cfg.json {
            let mut obj = json;
            if let Some(map) = obj.as_object_mut() {
                map.insert("t".into(), serde_json::json!((t * 1000.0).round() / 1000.0));
            }
            let _ = writeln!(self.out, "{obj}");
        } else {
            let _ = writeln!(self.out, "[{t:7.2}s] {text}");
        }
    }

    fn event(&mut self, kind: &str, node: &str, text: String) {
        let t = self.t(Instant::now());
        self.marks.push(Mark {
            t,
            label: format!("{kind} {node}"),
        });
        self.line(&text, serde_json::json!({"event": kind, "node": node}));
    }

    fn running(&self) -> impl Iterator<Item = (usize, &Proc)> {
        self.procs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.state == ProcState::Running)
    }

    fn spawn(&mut self, name: &str, seeds: Vec<String>) -> Result<usize, ScenarioError> {
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

    fn handle(&mut self, msg: Msg) {
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

    /// Handles events and runs the clock (load, status requests, progress)
    /// until `until`.
    fn pump(&mut self, until: Instant) {
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
    fn report_detections(&mut self, all: bool) {
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
            self.next_status = now + Duration::from_millis(250);
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

    fn progress(&mut self) {
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

    fn wait_settled(&mut self, what: &str, since: Instant) -> Option<f64> {
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

    fn wait_for(&mut self, timeout: Duration, cond: impl Fn(&Sim<'_>) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if cond(self) {
                return true;
            }
            self.pump(Instant::now() + Duration::from_millis(50));
        }
        cond(self)
    }

    fn seeds(&mut self) -> Vec<String> {
        let mut addrs: Vec<String> = self.running().filter_map(|(_, p)| p.addr.clone()).collect();
        while addrs.len() > 3 {
            let i = self.rng.random_range(0..addrs.len());
            addrs.swap_remove(i);
        }
        addrs
    }

    fn start_node(&mut self, name: &str, seeds: Vec<String>) -> Result<usize, ScenarioError> {
        let index = self.spawn(name, seeds)?;
        self.wait_started(index, name)?;
        Ok(index)
    }

    /// Waits until process `index` is ready (at most 60 s).
    fn wait_started(&mut self, index: usize, name: &str) -> Result<(), ScenarioError> {
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

    fn new_name(&mut self) -> String {
        self.next_index += 1;
        format!("n{}", self.next_index)
    }

    fn pick_running(&mut self) -> Option<usize> {
        let candidates: Vec<usize> = self.running().map(|(i, _)| i).collect();
        if candidates.len() < 2 {
            return None;
        }
        let i = self.rng.random_range(0..candidates.len());
        candidates.get(i).copied()
    }

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

    /// The process a writer was: the last one of that name started with a
    /// generation not above the writer's (a rebirth keeps the process and
    /// takes a higher generation; a restart is a new process).
    fn proc_of(&self, writer: &Writer) -> Option<usize> {
        self.procs
            .iter()
            .enumerate()
            .filter(|(_, p)| p.name == writer.node && p.generation <= writer.generation)
            .max_by_key(|(_, p)| p.generation)
            .map(|(i, _)| i)
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn names(&self, procs: &[usize]) -> String {
        let names: Vec<&str> = procs
            .iter()
            .filter_map(|i| self.procs.get(*i).map(|p| p.name.as_str()))
            .collect();
        names.join(",")
    }

    /// The UDP ports of processes `procs` (each node has one socket).
    fn ports(&self, procs: &[usize]) -> Vec<u16> {
        procs
            .iter()
            .filter_map(|i| self.procs.get(*i)?.addr.as_ref()?.parse().ok())
            .map(|a: std::net::SocketAddr| a.port())
            .collect()
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

    /// A running node other than the oldest (the lowest generation), at
    /// random.
    fn pick_not_oldest(&mut self) -> Option<usize> {
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

    /// Plays a fault step: injects it, keeps the load on for its duration,
    /// removes it, and waits until the cluster settles (bounded by
    /// [`HEAL_SETTLE_BOUND_S`] in the verdict).
    fn fault_step(&mut self, step: Step) -> Result<(), ScenarioError> {
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

    fn play(&mut self) -> Result<Summary, ScenarioError> {
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

    fn verdict(&mut self, started: Instant) -> Result<Summary, ScenarioError> {
        let store = Store::open(&self.store_url)?;
        let audit = store.audit()?;
        let persisted_total = store.total_points()?;
        let mut lost_by_kill = Vec::new();
        let mut lost_outside = 0u64;
        let mut lost_total = 0u64;
        let mut lost_to_fencing = 0u64;
        let with_faults = !self.fault_windows.is_empty();
        for (writer, acked) in &self.acked {
            let persisted = audit.persisted.get(writer).copied().unwrap_or(0);
            let all_lost = acked.saturating_sub(persisted);
            lost_total += all_lost;
            // What the store refused (a stale token) is the faults' doing
            // in a run with faults; without, it is a loss like any other.
            let fenced = if with_faults {
                audit
                    .refused_points
                    .get(writer)
                    .copied()
                    .unwrap_or(0)
                    .min(all_lost)
            } else {
                0
            };
            lost_to_fencing += fenced;
            let lost = all_lost - fenced;
            // A process may have had several generations (rebirths after
            // a declared death): its kill explains the loss of each.
            let proc = self.proc_of(writer);
            match self.kills.iter().find(|k| Some(k.proc) == proc) {
                Some(k) => match lost_by_kill
                    .iter_mut()
                    .find(|l: &&mut KillLoss| l.node == k.name && l.generation == k.generation)
                {
                    Some(l) => l.lost += lost,
                    None => lost_by_kill.push(KillLoss {
                        node: k.name.clone(),
                        generation: k.generation,
                        lost,
                        unacknowledged: 0,
                    }),
                },
                None => lost_outside += lost,
            }
        }
        for k in &self.kills {
            if !lost_by_kill
                .iter()
                .any(|l| l.node == k.name && l.generation == k.generation)
            {
                lost_by_kill.push(KillLoss {
                    node: k.name.clone(),
                    generation: k.generation,
                    lost: 0,
                    unacknowledged: 0,
                });
            }
        }
        // Points never acknowledged nor refused: explained by a kill, or a
        // violation.
        let mut unacked_outside = 0u64;
        let mut unacked_examples = Vec::new();
        let mut fault_unacked = vec![0u64; self.fault_windows.len()];
        for (id, (proc, at, _)) in &self.outstanding {
            let explained = self.kills.iter().find(|k| {
                let since = at.saturating_duration_since(k.at).as_secs_f64();
                let before = k.at.saturating_duration_since(*at).as_secs_f64();
                let settled = k.settled_s.unwrap_or(f64::INFINITY);
                k.proc == *proc || (before <= KILL_UNACKED_BEFORE_S && since <= settled)
            });
            let by_kill = explained.and_then(|k| {
                lost_by_kill
                    .iter_mut()
                    .find(|l| l.node == k.name && l.generation == k.generation)
            });
            let by_fault = || {
                self.fault_windows.iter().position(|w| {
                    let since = at.saturating_duration_since(w.at).as_secs_f64();
                    let before = w.at.saturating_duration_since(*at).as_secs_f64();
                    before <= KILL_UNACKED_BEFORE_S && since <= w.settled_s.unwrap_or(f64::INFINITY)
                })
            };
            match (by_kill, by_fault()) {
                (Some(l), _) => l.unacknowledged += 1,
                (None, Some(w)) => {
                    if let Some(w) = fault_unacked.get_mut(w) {
                        *w += 1;
                    }
                }
                (None, None) => {
                    unacked_outside += 1;
                    if unacked_examples.len() < 5 {
                        let name = self.procs.get(*proc).map(|p| p.name.clone());
                        unacked_examples.push((*id, name, self.t(*at)));
                    }
                }
            }
        }
        if unacked_outside > 0 {
            unacked_examples.sort_by(|a, b| a.2.total_cmp(&b.2));
            self.problems.push(format!(
                "{unacked_outside} points sent to a node were never acknowledged nor refused, outside any kill (id, ingesting node, t): {unacked_examples:?}"
            ));
        }
        if self.acked_twice > 0 {
            self.problems
                .push(format!("{} points acknowledged twice", self.acked_twice));
        }
        let mut detect_first: Option<f64> = None;
        let mut detect_all: Option<f64> = None;
        for k in &self.kills {
            let first = k.detected.values().copied().fold(f64::INFINITY, f64::min);
            let all = k.detected.values().copied().fold(0.0, f64::max);
            if k.survivors.iter().all(|s| k.detected.contains_key(s)) && first.is_finite() {
                detect_first = Some(detect_first.map_or(first, |d| d.max(first)));
                detect_all = Some(detect_all.map_or(all, |d| d.max(all)));
                // The handoff after a kill starts when the survivors see
                // it failed; taking much longer means a timeout was waited.
                if let Some(s) = k.settled_s
                    && s > all + KILL_SETTLE_BOUND_S
                {
                    self.problems.push(format!(
                        "kill of {}: the transition took {s:.2}s, more than its detection by every survivor ({all:.2}s) + {KILL_SETTLE_BOUND_S:.0}s",
                        k.name
                    ));
                }
            } else {
                let missing: Vec<&String> = k
                    .survivors
                    .iter()
                    .filter(|s| !k.detected.contains_key(*s))
                    .collect();
                self.problems.push(format!(
                    "kill of {}: never marked failed by {missing:?}",
                    k.name
                ));
            }
        }
        if audit.double_owner_writes > 0 {
            self.problems.push(format!(
                "double-owner writes on series {:?}",
                audit.double_owner_series
            ));
        }
        let fenced_nodes = self
            .procs
            .iter()
            .filter(|p| p.status.as_ref().is_some_and(|s| s.fenced))
            .count();
        let max_transition = self
            .transitions
            .iter()
            .filter_map(|t| t.s)
            .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))));
        let svg_path = self.cfg.work_dir.join("timeline.svg");
        let end = self.t(Instant::now());
        std::fs::write(
            &svg_path,
            svg::render(&self.samples, &self.marks, end, self.cfg.series),
        )?;
        for (w, n) in self.fault_windows.iter_mut().zip(&fault_unacked) {
            w.unacknowledged = *n;
        }
        let faults: Vec<FaultReport> = self
            .fault_windows
            .iter()
            .map(|w| FaultReport {
                fault: w.label.clone(),
                at_s: self.t(w.at),
                heal_to_settled_s: w.heal_to_settled_s,
                unacknowledged: w.unacknowledged,
            })
            .collect();
        let heal_to_settled = if faults.iter().any(|f| f.heal_to_settled_s.is_none()) {
            None
        } else {
            faults
                .iter()
                .filter_map(|f| f.heal_to_settled_s)
                .fold(None, |m: Option<f64>, s| Some(m.map_or(s, |m| m.max(s))))
        };
        if !self.fenced_at_end.is_empty() {
            self.problems
                .push(format!("nodes fenced at the end: {:?}", self.fenced_at_end));
        }
        let last = |f: fn(&Status) -> u64| -> u64 {
            self.procs
                .iter()
                .filter_map(|p| p.status.as_ref().map(f))
                .sum()
        };
        let stale_writes_refused = last(|s| s.stale_writes_refused);
        let points_refused_by_store = last(|s| s.points_refused);
        let points_sent: u64 = self.acked.values().sum();
        let mut reads_wrong = self.read_failures.len();
        for id in 0..i64::from(self.cfg.series) {
            let stored = store.load(id)?.map_or(0, |a| a.count);
            match self.reads.get(&id) {
                Some((_, count)) if *count == stored => {}
                Some((owner, count)) => {
                    reads_wrong += 1;
                    self.problems.push(format!(
                        "series {id}: its owner {owner} answered {count} points, the store holds {stored}"
                    ));
                }
                None if self.read_failures.iter().any(|(s, _)| *s == id) => {}
                None => {
                    reads_wrong += 1;
                    self.problems
                        .push(format!("series {id}: the read got no answer"));
                }
            }
        }
        for (id, error) in &self.read_failures {
            self.problems
                .push(format!("series {id}: the read failed: {error}"));
        }
        let ok = lost_outside == 0
            && self.fenced_at_end.is_empty()
            && unacked_outside == 0
            && self.acked_twice == 0
            && audit.double_owner_writes == 0
            && self.problems.is_empty()
            && points_sent > 0;
        Ok(Summary {
            event: "summary",
            scenario: self.cfg.scenario.name(),
            nodes: self.cfg.nodes,
            series: self.cfg.series,
            points_ingested: self.injected,
            points_sent,
            points_unacknowledged: self.outstanding.len() as u64,
            unacknowledged_outside_kills: unacked_outside,
            points_acked_twice: self.acked_twice,
            points_persisted: persisted_total,
            points_lost: lost_total,
            lost_outside_kills: lost_outside,
            lost_by_kill,
            points_refused: self.refused,
            double_owner_writes: audit.double_owner_writes,
            detect_first_s: detect_first,
            detect_all_s: detect_all,
            transitions: self.transitions.clone(),
            max_transition_s: max_transition,
            fenced_nodes,
            fenced_nodes_at_end: self.fenced_at_end.len(),
            reads_answered: self.reads.len(),
            reads_wrong,
            stale_writes_refused,
            stale_writes_refused_store: audit.stale_writes_refused,
            points_refused_by_store,
            points_refused_by_store_audit: audit.refused_points.values().sum(),
            lost_to_fencing,
            faults,
            heal_to_settled_s: heal_to_settled,
            unavailable_s: self.unavailable.map(|(g, _, _)| g),
            unavailable_series: self.unavailable.map(|(_, s, t)| (s, t)),
            problems: self.problems.clone(),
            svg: svg_path.display().to_string(),
            wall_s: started.elapsed().as_secs_f64(),
            ok,
        })
    }
}

/// Prints a summary as readable lines (the non-JSON form).
///
/// # Errors
/// Writing to `out`.
pub fn print_summary(s: &Summary, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "== verdict ({} scenario, {} nodes, {} series, {:.1}s)",
        s.scenario, s.nodes, s.series, s.wall_s
    )?;
    writeln!(out, "points ingested             {}", s.points_ingested)?;
    writeln!(out, "points sent (acknowledged)  {}", s.points_sent)?;
    writeln!(out, "points refused at ingest    {}", s.points_refused)?;
    writeln!(
        out,
        "points never acknowledged   {}",
        s.points_unacknowledged
    )?;
    writeln!(out, "points persisted            {}", s.points_persisted)?;
    writeln!(out, "points lost                 {}", s.points_lost)?;
    for k in &s.lost_by_kill {
        writeln!(
            out,
            "  lost by the kill of {} (generation {}): {} (points it had not flushed), {} never acknowledged",
            k.node, k.generation, k.lost, k.unacknowledged
        )?;
    }
    writeln!(out, "lost outside kills          {}", s.lost_outside_kills)?;
    writeln!(
        out,
        "unacknowledged outside kills {}",
        s.unacknowledged_outside_kills
    )?;
    writeln!(out, "acknowledged twice          {}", s.points_acked_twice)?;
    writeln!(out, "double-owner writes         {}", s.double_owner_writes)?;
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}s"));
    writeln!(
        out,
        "stale writes refused        {} (nodes) / {} (store rows)",
        s.stale_writes_refused, s.stale_writes_refused_store
    )?;
    writeln!(
        out,
        "points refused by the store {} (nodes) / {} (store rows); lost to fencing {}",
        s.points_refused_by_store, s.points_refused_by_store_audit, s.lost_to_fencing
    )?;
    for f in &s.faults {
        writeln!(
            out,
            "fault at {:.1}s: {}: settled {} after the heal, {} never acknowledged",
            f.at_s,
            f.fault,
            opt(f.heal_to_settled_s),
            f.unacknowledged
        )?;
    }
    writeln!(
        out,
        "longest series unavailable  {}{}",
        opt(s.unavailable_s),
        s.unavailable_series
            .map_or(String::new(), |(id, t)| format!(
                " (series {id}, until {t:.1}s)"
            ))
    )?;
    writeln!(out, "fenced nodes at the end     {}", s.fenced_nodes_at_end)?;
    writeln!(
        out,
        "end reads (ask the owner)   {} answered, {} wrong",
        s.reads_answered, s.reads_wrong
    )?;
    writeln!(
        out,
        "failure detection           first {} / all survivors {}",
        opt(s.detect_first_s),
        opt(s.detect_all_s)
    )?;
    for t in &s.transitions {
        writeln!(out, "transition {:<20} {}", t.event, opt(t.s))?;
    }
    for p in &s.problems {
        writeln!(out, "PROBLEM: {p}")?;
    }
    writeln!(out, "timeline picture            {}", s.svg)?;
    writeln!(out, "{}", if s.ok { "OK" } else { "FAILED" })?;
    Ok(())
}

/// The default work directory of a run under a cargo target directory.
pub fn work_dir_under(target: &Path) -> PathBuf {
    target.join("sim")
}
