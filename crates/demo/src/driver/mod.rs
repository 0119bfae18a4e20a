//! The scenario driver: starts demo nodes as child processes on loopback,
//! drives load through random nodes, plays a scenario (join, leave, kill,
//! restart), drains, and computes the verdict from the store and the nodes'
//! reports.

mod faults;
mod load;
mod process;
mod report;
mod scenario;
mod verdict;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;
use shoal::Timing;
use shoal_transport::{ClusterCa, TrustError};

use crate::fault::{self, FaultError, Faults};
use crate::protocol::{MemberCounts, NodeEvent};
use crate::store::{Store, StoreError, StoreUrl, Writer};

pub use report::{FaultReport, KillLoss, Summary, TransitionTime, print_summary};
pub(crate) use report::{Mark, Sample};
pub use verdict::{HEAL_SETTLE_BOUND_S, KILL_SETTLE_BOUND_S};

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
}

/// The default work directory of a run under a cargo target directory.
pub fn work_dir_under(target: &Path) -> PathBuf {
    target.join("sim")
}
