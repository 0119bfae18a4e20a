//! The demo node: a time-series aggregator on a shoal node, controlled by
//! lines on stdin, reporting JSON lines on stdout (see [`crate::protocol`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use shoal::{
    DatumError, DistDatum, HandoffContext, MemberState, Node, NodeConfig, Sender, Timing, TlsConfig,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tracing::{debug, warn};

use crate::protocol::{MemberCounts, NodeCommand, NodeEvent};
use crate::store::{Aggregate, Delta, Store, StoreError, StoreUrl, WriteKind, Writer};

/// The datum type name of a series.
pub const SERIES: &str = "series";

/// Configuration of one demo node (flags or a JSON file).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoNodeConfig {
    /// Node name (its certificate's name).
    pub name: String,
    /// UDP address to bind.
    pub bind: SocketAddr,
    /// Address the other nodes reach this one at (required when `bind` is
    /// a wildcard such as `0.0.0.0:7946`).
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// Directory with `ca.crt`, `node.crt`, `node.key` (PEM).
    pub tls_dir: PathBuf,
    /// Addresses of members to join through (none: a cluster of one).
    #[serde(default)]
    pub seeds: Vec<SocketAddr>,
    /// Store URL (`sqlite:<path>`).
    pub store: String,
    /// Flush interval, milliseconds.
    #[serde(default = "default_flush_ms")]
    pub flush_ms: u64,
    /// Series ids are `0..series`.
    pub series: u32,
    /// Membership timing profile.
    #[serde(default)]
    pub timing: Timing,
}

fn default_flush_ms() -> u64 {
    500
}

/// Errors of a demo node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The shoal node did not start.
    #[error("start: {0}")]
    Start(#[from] shoal::StartError),
    /// A shoal call failed.
    #[error("shoal: {0}")]
    Shoal(#[from] shoal::Error),
    /// Reading stdin failed.
    #[error("stdin: {0}")]
    Io(#[from] std::io::Error),
}

/// A point as it travels to its series' owner.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// Unique id given by the driver.
    pub id: u64,
    /// The series (datum id).
    pub series: i64,
    /// The value.
    pub value: f64,
    /// The node that ingested it (gets the acknowledgement).
    pub origin: String,
}

/// A series' aggregate as its owner answers a read.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReadAnswer {
    /// The owner that answered.
    pub owner: String,
    /// The fencing token of its ownership.
    pub token: u64,
    /// Points (stored and not yet flushed).
    pub count: u64,
    /// Their sum.
    pub sum: f64,
}

/// Attempts of a read whose owner moved while it was on the way.
const READ_ATTEMPTS: u32 = 3;

/// How long a read waits for its owner's answer.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Acknowledgement of points accepted by an owner.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Ack {
    /// The owner that accepted them.
    pub owner: String,
    /// Its generation.
    pub generation: u64,
    /// How many points.
    pub count: u64,
    /// Their ids (the driver checks each point is acknowledged once).
    pub ids: Vec<u64>,
}

#[derive(Default)]
struct SeriesState {
    pending: Aggregate,
    relinquished: bool,
    /// The fencing token of this node's ownership (from the acquire).
    token: u64,
    /// The generation of this node that acquired it (0: not acquired):
    /// after a rebirth (a new generation in the same process) the points of
    /// an ownership of the old generation are still written, acknowledged
    /// and audited as that generation's.
    generation: u64,
}

/// The aggregator's state, shared by the datums and the tasks.
struct App {
    /// This node's name (the writer's; the generation is the ownership's).
    name: String,
    node: Node,
    store: Arc<Store>,
    series: Mutex<HashMap<i64, SeriesState>>,
    /// Serialises this node's store writes, so a periodic flush never
    /// commits after a relinquish of the same series.
    write_order: tokio::sync::Mutex<()>,
    accepted: AtomicU64,
    ingested: AtomicU64,
    /// Points ingested here that an owner acknowledged, or that could not
    /// be sent: a leaving node waits for all of them before it leaves.
    answered: AtomicU64,
    flush_errors: AtomicU64,
    /// Series writes the store refused (a newer owner's token was there).
    stale_writes_refused: AtomicU64,
    /// Accepted points lost to those refusals.
    points_refused: AtomicU64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Prints one event line on stdout (the driver reads it).
pub fn emit(event: &NodeEvent) {
    use std::io::Write;
    if let Ok(line) = serde_json::to_string(event) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

impl App {
    fn series_lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, SeriesState>> {
        self.series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The generation of this node now (a rebirth changes it).
    fn generation(&self) -> u64 {
        self.node.local().generation
    }

    /// Accepts a point unless the series was relinquished here; returns
    /// the generation whose ownership accepted it.
    fn accept(&self, p: &Point) -> Option<u64> {
        let now = self.generation();
        let mut map = self.series_lock();
        let st = map.entry(p.series).or_default();
        if st.relinquished {
            return None;
        }
        st.pending.add(p.value, now_ms());
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Some(if st.generation == 0 {
            now
        } else {
            st.generation
        })
    }

    /// A series' aggregate for a read: refused unless this node acts as
    /// its owner now (acquired, not relinquished, lease valid).
    async fn read(&self, series: i64) -> Result<ReadAnswer, String> {
        if !self.node.holds(SERIES, series).await.unwrap_or(false) {
            return Err(format!("{} does not own series {series} now", self.name));
        }
        let (pending, token) = {
            let map = self.series_lock();
            map.get(&series)
                .map(|st| (st.pending, st.token))
                .unwrap_or_default()
        };
        let store = Arc::clone(&self.store);
        let stored = tokio::task::spawn_blocking(move || store.load(series))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        Ok(ReadAnswer {
            owner: self.name.clone(),
            token,
            count: stored.count + pending.count,
            sum: stored.sum + pending.sum,
        })
    }

    fn pending_points(&self) -> u64 {
        self.series_lock().values().map(|s| s.pending.count).sum()
    }

    /// Writes through the store's fencing check. A refused series is not
    /// ours any more (a newer owner claimed it): its points are counted as
    /// lost and it takes no more points until acquired again.
    async fn write(
        &self,
        generation: u64,
        kind: WriteKind,
        deltas: Vec<Delta>,
    ) -> Result<(), StoreError> {
        let store = Arc::clone(&self.store);
        let writer = Writer {
            node: self.name.clone(),
            generation,
        };
        let view = self.node.view().view_id().0;
        let t = now_ms();
        let outcome =
            match tokio::task::spawn_blocking(move || store.write(&writer, view, kind, &deltas, t))
                .await
            {
                Ok(r) => r?,
                Err(e) => return Err(StoreError::Task(e.to_string())),
            };
        if !outcome.refused.is_empty() {
            let mut map = self.series_lock();
            for (series, points) in &outcome.refused {
                self.stale_writes_refused.fetch_add(1, Ordering::Relaxed);
                self.points_refused.fetch_add(*points, Ordering::Relaxed);
                warn!(
                    series,
                    points,
                    ?kind,
                    "store refused a write: a newer owner holds the series"
                );
                if kind != WriteKind::Acquire {
                    map.entry(*series).or_default().relinquished = true;
                }
            }
        }
        Ok(())
    }

    /// Writes every pending delta. On error the deltas go back to pending.
    async fn flush(&self) {
        let _order = self.write_order.lock().await;
        // One write per generation whose ownerships have points pending
        // (several only just after a rebirth).
        let now = self.generation();
        let mut by_generation: HashMap<u64, Vec<Delta>> = HashMap::new();
        {
            let mut map = self.series_lock();
            for (id, s) in map.iter_mut().filter(|(_, s)| s.pending.count > 0) {
                let generation = if s.generation == 0 { now } else { s.generation };
                by_generation.entry(generation).or_default().push(Delta {
                    series: *id,
                    token: s.token,
                    agg: std::mem::take(&mut s.pending),
                });
            }
        }
        for (generation, deltas) in by_generation {
            if let Err(error) = self
                .write(generation, WriteKind::Flush, deltas.clone())
                .await
            {
                self.flush_errors.fetch_add(1, Ordering::Relaxed);
                warn!(%error, "flush failed; points kept for the next flush");
                let mut map = self.series_lock();
                for d in deltas {
                    let st = map.entry(d.series).or_default();
                    merge(&mut st.pending, &d.agg);
                }
            }
        }
    }
}

fn merge(into: &mut Aggregate, d: &Aggregate) {
    if d.count == 0 {
        return;
    }
    if into.count == 0 {
        *into = *d;
        return;
    }
    into.count += d.count;
    into.sum += d.sum;
    into.min = into.min.min(d.min);
    into.max = into.max.max(d.max);
    into.last_ms = into.last_ms.max(d.last_ms);
}

/// A series as a shoal datum.
struct SeriesDatum {
    id: i64,
    app: Arc<Mutex<Option<Arc<App>>>>,
}

impl SeriesDatum {
    fn app(&self) -> Result<Arc<App>, DatumError> {
        self.app
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .ok_or_else(|| "the aggregator is not running".into())
    }
}

impl DistDatum for SeriesDatum {
    fn id(&self) -> i64 {
        self.id
    }
    fn type_name(&self) -> &str {
        SERIES
    }
    async fn relinquish(&self, ctx: HandoffContext) -> Result<(), DatumError> {
        let app = self.app()?;
        let _order = app.write_order.lock().await;
        let now = app.generation();
        let (delta, generation) = {
            let mut map = app.series_lock();
            let st = map.entry(self.id).or_default();
            st.relinquished = true;
            let generation = if st.generation == 0 {
                now
            } else {
                st.generation
            };
            (std::mem::take(&mut st.pending), generation)
        };
        let part = Delta {
            series: self.id,
            token: ctx.token.get(),
            agg: delta,
        };
        if let Err(error) = app
            .write(generation, WriteKind::Relinquish, vec![part])
            .await
        {
            // Keep the points and refuse: the handoff layer retries.
            let mut map = app.series_lock();
            let st = map.entry(self.id).or_default();
            merge(&mut st.pending, &delta);
            return Err(Box::new(error));
        }
        Ok(())
    }
    async fn acquire(&self, ctx: HandoffContext) -> Result<(), DatumError> {
        let app = self.app()?;
        let _order = app.write_order.lock().await;
        let store = Arc::clone(&app.store);
        let id = self.id;
        let loaded = tokio::task::spawn_blocking(move || store.load(id))
            .await
            .map_err(Box::new)??;
        debug!(series = id, persisted = loaded.map(|a| a.count), "acquired");
        // Claim the series in the store under the new token: from now on
        // the previous owner's writes are refused there.
        let claim = Delta {
            series: self.id,
            token: ctx.token.get(),
            agg: Aggregate::default(),
        };
        let refused_before = app.stale_writes_refused.load(Ordering::Relaxed);
        let generation = app.generation();
        app.write(generation, WriteKind::Acquire, vec![claim])
            .await?;
        if app.stale_writes_refused.load(Ordering::Relaxed) != refused_before {
            return Err(format!(
                "series {id}: the store holds a newer token than {}",
                ctx.token
            )
            .into());
        }
        let mut map = app.series_lock();
        let st = map.entry(self.id).or_default();
        st.relinquished = false;
        st.token = ctx.token.get();
        st.generation = generation;
        Ok(())
    }
}

fn member_counts(members: &[shoal::NodeInfo]) -> MemberCounts {
    let mut c = MemberCounts::default();
    for m in members {
        match m.state {
            MemberState::Alive => c.alive += 1,
            MemberState::Suspect => c.suspect += 1,
            MemberState::Dead => c.dead += 1,
            MemberState::Left => c.left += 1,
        }
    }
    c
}

/// Point ids whose acknowledgement is owed, by (origin, generation of the
/// ownership that accepted them).
type AcksOwed = HashMap<(String, u64), Vec<u64>>;

/// How often an owner sends the acknowledgements it owes.
const ACK_EVERY: Duration = Duration::from_millis(50);
/// Ticks an acknowledgement is tried before it is given up (5 s).
const ACK_ATTEMPTS: u32 = 100;

/// Longest a leaving node waits for the acknowledgements of the points it
/// ingested before it leaves.
const ACK_WAIT: Duration = Duration::from_secs(2);

/// Runs a demo node until `quit`, `leave` or the end of stdin.
///
/// # Errors
/// [`NodeError`] when the node cannot start.
pub async fn run_node(config: DemoNodeConfig) -> Result<(), NodeError> {
    // The PostgreSQL client blocks on its own runtime: open it off ours.
    let url = StoreUrl::parse(&config.store)?;
    let store = tokio::task::spawn_blocking(move || Store::open(&url))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))??;
    let store = Arc::new(store);
    let shoal_config = NodeConfig {
        name: config.name.clone(),
        bind: config.bind,
        advertise: config.advertise,
        tls: TlsConfig::Files {
            dir: config.tls_dir.clone(),
        },
        timing: config.timing,
        ..NodeConfig::default()
    };
    let node = Node::start(shoal_config).await?;
    let local = node.local();
    emit(&NodeEvent::Started {
        name: config.name.clone(),
        generation: local.generation,
        addr: local.addr.to_string(),
    });
    let app = Arc::new(App {
        name: config.name.clone(),
        node: node.clone(),
        store,
        series: Mutex::new(HashMap::new()),
        write_order: tokio::sync::Mutex::new(()),
        accepted: AtomicU64::new(0),
        ingested: AtomicU64::new(0),
        answered: AtomicU64::new(0),
        flush_errors: AtomicU64::new(0),
        stale_writes_refused: AtomicU64::new(0),
        points_refused: AtomicU64::new(0),
    });
    let slot = Arc::new(Mutex::new(Some(Arc::clone(&app))));
    let (points, mut inbox) = node.channel::<Point>("demo.points")?;
    let (acks, mut ack_inbox) = node.channel::<Ack>("demo.acks")?;
    let (reader, mut reads) = node.request_channel::<i64, ReadAnswer>("demo.read")?;

    // Owner side of reads: answer with the stored aggregate plus the points
    // not flushed yet, only while this node acts as the series' owner.
    {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            while let Some(request) = reads.recv().await {
                let app = Arc::clone(&app);
                tokio::spawn(async move {
                    let series = request.payload;
                    let answer = app.read(series).await;
                    let sent = match answer {
                        Ok(answer) => request.respond(&answer).await,
                        Err(reason) => request.refuse(&reason).await,
                    };
                    if let Err(error) = sent {
                        debug!(%error, series, "read answer not delivered");
                    }
                });
            }
        });
    }

    // Owner side: accept points, acknowledge them to their origin in batches.
    let pending_acks: Arc<Mutex<AcksOwed>> = Arc::default();
    {
        let app = Arc::clone(&app);
        let points = points.clone();
        let pending_acks = Arc::clone(&pending_acks);
        tokio::spawn(async move {
            while let Some(msg) = inbox.recv().await {
                let p = msg.payload;
                if let Some(generation) = app.accept(&p) {
                    let mut map = pending_acks
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    map.entry((p.origin, generation)).or_default().push(p.id);
                } else if let Err(error) = points.send_to_owner(SERIES, p.series, &p).await {
                    debug!(%error, id = p.id, "re-sending a point for a relinquished series failed");
                }
            }
        });
    }
    {
        let app = Arc::clone(&app);
        let pending_acks = Arc::clone(&pending_acks);
        let acks: Sender<Ack> = acks.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ACK_EVERY);
            // Acknowledgements that could not be sent (an origin that joined
            // a moment ago is not known here yet): tried again next tick,
            // for at most ACK_ATTEMPTS ticks.
            let mut retry: HashMap<(String, u64), (Vec<u64>, u32)> = HashMap::new();
            loop {
                tick.tick().await;
                let fresh = std::mem::take(
                    &mut *pending_acks
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                );
                for (key, ids) in fresh {
                    retry.entry(key).or_default().0.extend(ids);
                }
                for ((origin, generation), (ids, attempts)) in std::mem::take(&mut retry) {
                    let count = ids.len() as u64;
                    let ack = Ack {
                        owner: app.name.clone(),
                        generation,
                        count,
                        ids,
                    };
                    if let Err(error) = acks.send_to(&origin, &ack).await {
                        if attempts + 1 < ACK_ATTEMPTS {
                            retry.insert((origin, generation), (ack.ids, attempts + 1));
                        } else {
                            warn!(%error, %origin, count, "acknowledgement not delivered");
                        }
                    }
                }
            }
        });
    }
    // Origin side: report acknowledgements to the driver.
    {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            while let Some(msg) = ack_inbox.recv().await {
                app.answered
                    .fetch_add(msg.payload.ids.len() as u64, Ordering::Relaxed);
                emit(&NodeEvent::Acked {
                    owner: msg.payload.owner,
                    generation: msg.payload.generation,
                    count: msg.payload.count,
                    ids: msg.payload.ids,
                });
            }
        });
    }
    // Periodic flush.
    {
        let app = Arc::clone(&app);
        let every = Duration::from_millis(config.flush_ms.max(10));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                app.flush().await;
            }
        });
    }
    // Membership changes as events.
    {
        let mut changes = node.changes();
        let mut known: HashMap<String, (u64, MemberState)> = HashMap::new();
        tokio::spawn(async move {
            loop {
                let view = Arc::clone(&changes.borrow_and_update());
                let mut now: HashMap<String, (u64, MemberState)> = HashMap::new();
                for m in &view.members {
                    now.insert(m.name.to_string(), (m.generation, m.state));
                }
                for (name, (generation, state)) in &now {
                    if known.get(name) != Some(&(*generation, *state)) {
                        if let Some((old_gen, _)) = known.get(name)
                            && old_gen != generation
                        {
                            emit(&NodeEvent::Member {
                                peer: name.clone(),
                                generation: *old_gen,
                                state: "gone".into(),
                            });
                        }
                        emit(&NodeEvent::Member {
                            peer: name.clone(),
                            generation: *generation,
                            state: format!("{state:?}").to_lowercase(),
                        });
                    }
                }
                for (name, (generation, _)) in &known {
                    if !now.contains_key(name) {
                        emit(&NodeEvent::Member {
                            peer: name.clone(),
                            generation: *generation,
                            state: "gone".into(),
                        });
                    }
                }
                known = now;
                if changes.changed().await.is_err() {
                    break;
                }
            }
        });
    }

    let mut joined = config.seeds.is_empty();
    node.join(&config.seeds).await.or_else(|e| match e {
        shoal::Error::JoinTimeout(_) => Ok(()),
        e => Err(e),
    })?;
    for _ in 0..5 {
        if joined || node.members().len() > 1 {
            joined = true;
            break;
        }
        node.join(&config.seeds).await.or_else(|e| match e {
            shoal::Error::JoinTimeout(_) => Ok(()),
            e => Err(e),
        })?;
    }
    let datums: Vec<Arc<SeriesDatum>> = (0..i64::from(config.series))
        .map(|id| {
            Arc::new(SeriesDatum {
                id,
                app: Arc::clone(&slot),
            })
        })
        .collect();
    node.register(datums).await?;
    node.set_ready(true).await?;
    emit(&NodeEvent::Ready {
        name: config.name.clone(),
        joined,
    });

    let stdin = BufReader::new(tokio::io::stdin());
    let mut lines = stdin.lines();
    let mut last_status = (Instant::now(), 0u64);
    while let Some(line) = lines.next_line().await? {
        let Some(cmd) = NodeCommand::parse(&line) else {
            warn!(line, "unknown control line");
            continue;
        };
        match cmd {
            NodeCommand::Point { id, series, value } => {
                app.ingested.fetch_add(1, Ordering::Relaxed);
                let p = Point {
                    id,
                    series,
                    value,
                    origin: config.name.clone(),
                };
                if let Err(error) = points.send_to_owner(SERIES, series, &p).await {
                    debug!(%error, id, "point refused");
                    app.answered.fetch_add(1, Ordering::Relaxed);
                    emit(&NodeEvent::Refused { id });
                }
            }
            NodeCommand::Read { series } => {
                let reader = reader.clone();
                tokio::spawn(async move {
                    let mut outcome = Err(String::new());
                    for _ in 0..READ_ATTEMPTS {
                        outcome = reader
                            .ask_owner(SERIES, series, &series, READ_TIMEOUT)
                            .await
                            .map_err(|e| e.to_string());
                        // Refused: the series moved while the read was on
                        // its way; the next attempt finds the new owner.
                        if outcome.is_ok() {
                            break;
                        }
                    }
                    match outcome {
                        Ok(a) => emit(&NodeEvent::Read {
                            series,
                            owner: a.owner,
                            token: a.token,
                            count: a.count,
                            sum: a.sum,
                        }),
                        Err(error) => emit(&NodeEvent::ReadFailed { series, error }),
                    }
                });
            }
            NodeCommand::Status => {
                let snap = node.snapshot().await?;
                let ingested = app.ingested.load(Ordering::Relaxed);
                let secs = last_status.0.elapsed().as_secs_f64().max(1e-3);
                let rate = (ingested.saturating_sub(last_status.1)) as f64 / secs;
                last_status = (Instant::now(), ingested);
                let view = node.view();
                emit(&NodeEvent::Status {
                    name: config.name.clone(),
                    generation: snap.local.generation,
                    members: member_counts(&snap.members),
                    live: view.members.len(),
                    view_id: snap.view.0,
                    owned: snap.owned,
                    in_flight: snap.in_flight,
                    points_per_s: rate,
                    accepted: app.accepted.load(Ordering::Relaxed),
                    pending: app.pending_points(),
                    fenced: snap.fenced,
                    ready: snap.local.ready,
                    flush_errors: app.flush_errors.load(Ordering::Relaxed),
                    stale_writes_refused: app.stale_writes_refused.load(Ordering::Relaxed),
                    points_refused: app.points_refused.load(Ordering::Relaxed),
                });
            }
            NodeCommand::Flush => {
                app.flush().await;
                emit(&NodeEvent::Flushed {
                    name: config.name.clone(),
                    pending: app.pending_points(),
                });
            }
            NodeCommand::Leave => {
                // The acknowledgements of the points ingested here come back
                // here: wait for them (a few batches) before leaving.
                let waited = Instant::now();
                while app.answered.load(Ordering::Relaxed) < app.ingested.load(Ordering::Relaxed)
                    && waited.elapsed() < ACK_WAIT
                {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let report = match node.leave(Duration::from_secs(20)).await {
                    Ok(report) => report,
                    // The node left all the same; the series it could not
                    // relinquish were taken over on the done markers. Their
                    // unflushed points are reported as pending below.
                    Err(shoal::Error::LeaveIncomplete { datums, report }) => {
                        warn!(
                            series = datums.len(),
                            "left without relinquishing some series"
                        );
                        *report
                    }
                    Err(e) => return Err(e.into()),
                };
                app.flush().await;
                emit(&NodeEvent::Left {
                    name: config.name.clone(),
                    relinquished: report.relinquished,
                    completed: report.completed,
                    pending: app.pending_points(),
                });
                return Ok(());
            }
            NodeCommand::Quit => {
                app.flush().await;
                emit(&NodeEvent::Bye {
                    name: config.name.clone(),
                    pending: app.pending_points(),
                });
                node.shutdown().await;
                return Ok(());
            }
        }
    }
    // The driver went away: stop at once, like a crash would.
    Ok(())
}
