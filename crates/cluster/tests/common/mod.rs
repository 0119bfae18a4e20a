//! Helpers of the facade's loopback tests: a ledger of relinquish / acquire
//! calls that checks the single-owner invariant as they happen (with the
//! project's one set of ownership rules, `shoal_core::check::Ledger`, plus
//! the fencing tokens only real callbacks carry), and cluster start-up
//! helpers.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal::{
    ClusterCa, DatumError, DistDatum, HandoffContext, JobReason, Node, NodeConfig, NodeId, NodeName,
};

/// Generous bound on anything a test waits for: only bounds hangs.
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct LedgerInner {
    /// Which node (by name) holds each datum acquired and not relinquished,
    /// and the single-owner rule: a datum is acquired only where no live
    /// node holds it. A node declared failed (`declare_dead`: killed, or a
    /// generation the cluster fenced) may be taken over.
    pub owners: shoal_core::check::Ledger<String>,
    /// When the ledger was made: the origin of the times in violations.
    pub start: Instant,
    pub relinquished: Vec<(String, i64)>,
    pub acquired: Vec<(String, i64)>,
    /// Violations of the facade's own checks (tokens, processing).
    pub violations: Vec<String>,
    /// Per datum, the fencing token of its latest acquisition: the next
    /// acquisition's must be higher, and a relinquish carries it.
    pub tokens: HashMap<i64, u64>,
    /// `(node, datum)` whose relinquish fails on that node: the node gives
    /// the datum up (it stops holding it) and the call returns an error.
    pub fail_relinquish: HashSet<(String, i64)>,
    /// In order: `(node, "relinquish failed" | "acquired", datum)`.
    pub log: Vec<(String, &'static str, i64)>,
    /// Why each acquisition ran: `(node, datum, reason)`.
    pub acquire_reasons: Vec<(String, i64, JobReason, Option<NodeId>)>,
}

impl Default for LedgerInner {
    fn default() -> Self {
        LedgerInner {
            owners: shoal_core::check::Ledger::new(false),
            start: Instant::now(),
            relinquished: Vec::new(),
            acquired: Vec::new(),
            violations: Vec::new(),
            tokens: HashMap::new(),
            fail_relinquish: HashSet::new(),
            log: Vec::new(),
            acquire_reasons: Vec::new(),
        }
    }
}

impl LedgerInner {
    /// The node holding `id` (the latest to acquire it).
    pub fn holder(&self, id: i64) -> Option<&String> {
        self.owners.holders(id).last()
    }

    /// How many datums `node` holds.
    pub fn held_by(&self, node: &str) -> u64 {
        self.owners.held_by(&node.to_owned()).len() as u64
    }

    /// Whether nobody holds anything.
    pub fn nothing_held(&self) -> bool {
        self.owners.held_count() == 0
    }

    /// `node` was killed or fenced: its holdings may be taken over.
    pub fn declare_dead(&mut self, node: &str) {
        self.owners.declare_failed(&node.to_owned());
    }

    /// `node` (a new generation of it) is live again.
    pub fn revive(&mut self, node: &str) {
        self.owners.revive(&node.to_owned());
    }
}

/// Every node's datums report here.
#[derive(Default)]
pub struct Ledger {
    pub inner: Mutex<LedgerInner>,
}

impl Ledger {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, LedgerInner> {
        self.inner.lock().unwrap()
    }

    /// Both the ownership rules' violations and the facade's own.
    pub fn violations(&self) -> Vec<String> {
        let l = self.lock();
        let mut v = l.owners.violations().to_vec();
        v.extend(l.violations.iter().cloned());
        v
    }

    pub fn clear_history(&self) {
        let mut l = self.lock();
        l.relinquished.clear();
        l.acquired.clear();
        l.acquire_reasons.clear();
    }
}

pub struct TestDatum {
    pub id: i64,
    pub node: String,
    pub ledger: Arc<Ledger>,
}

impl DistDatum for TestDatum {
    fn id(&self) -> i64 {
        self.id
    }
    fn type_name(&self) -> &str {
        "series"
    }
    async fn relinquish(&self, ctx: HandoffContext) -> Result<(), DatumError> {
        let mut l = self.ledger.lock();
        if l.fail_relinquish.contains(&(self.node.clone(), self.id)) {
            l.owners.stop_holding(&self.node, self.id);
            l.log
                .push((self.node.clone(), "relinquish failed", self.id));
            return Err("cannot save the datum".into());
        }
        if l.tokens.get(&self.id) != Some(&ctx.token.get()) {
            let v = format!(
                "{} relinquished {} under token {} (acquired under {:?})",
                self.node,
                self.id,
                ctx.token,
                l.tokens.get(&self.id)
            );
            l.violations.push(v);
        }
        if l.owners.holds(&self.node, self.id) {
            l.owners.stop_holding(&self.node, self.id);
        } else {
            let v = format!(
                "{} relinquished {} held by {:?}",
                self.node,
                self.id,
                l.owners.holders(self.id)
            );
            l.violations.push(v);
        }
        l.relinquished.push((self.node.clone(), self.id));
        Ok(())
    }
    async fn acquire(&self, ctx: HandoffContext) -> Result<(), DatumError> {
        let mut l = self.ledger.lock();
        l.acquire_reasons
            .push((self.node.clone(), self.id, ctx.reason, ctx.previous.clone()));
        let token = ctx.token.get();
        if let Some(&prev) = l.tokens.get(&self.id)
            && token <= prev
            && !l.owners.holds(&self.node, self.id)
        {
            let v = format!(
                "{} acquired {} under token {} after token {}",
                self.node, self.id, token, prev
            );
            l.violations.push(v);
        }
        l.tokens.insert(self.id, token);
        let at = l.start.elapsed();
        l.owners.take_over(&self.node, self.id, at);
        l.acquired.push((self.node.clone(), self.id));
        l.log.push((self.node.clone(), "acquired", self.id));
        Ok(())
    }
}

pub fn config(name: &str) -> NodeConfig {
    let mut c = NodeConfig::local(name);
    // Long enough that a test finishing in time proves nothing waited it out.
    c.transition_timeout_ms = 30_000;
    c
}

pub async fn start(ca: &ClusterCa, config: NodeConfig) -> Node {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let id = ca.issue(&NodeName::new(&config.name).unwrap()).unwrap();
    Node::start_with_identity(config, id).await.unwrap()
}

pub async fn register(node: &Node, datums: i64, ledger: &Arc<Ledger>) {
    let name = node.local().name.to_string();
    node.register((0..datums).map(|id| {
        Arc::new(TestDatum {
            id,
            node: name.clone(),
            ledger: Arc::clone(ledger),
        })
    }))
    .await
    .unwrap();
}

/// Polls `f` every 20 ms until it holds; panics after [`PATIENCE`].
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `names` (the first joins nobody, the others join it) and waits
/// until every node sees all of them.
pub async fn cluster(ca: &ClusterCa, names: &[&str]) -> Vec<Node> {
    let mut nodes = Vec::new();
    for name in names {
        nodes.push(start(ca, config(name)).await);
    }
    join_all(&nodes).await;
    nodes
}

pub async fn join_all(nodes: &[Node]) {
    nodes[0].join(&[]).await.unwrap();
    let seed = nodes[0].local().addr;
    for n in &nodes[1..] {
        n.join(&[seed]).await.unwrap();
    }
    let want = nodes.len();
    eventually("every node sees every node", || {
        nodes.iter().all(|n| n.members().len() == want)
    })
    .await;
}

/// Registers `datums` on every node of `nodes`, then makes them ready one
/// at a time, each once every node has seen the previous one ready (a node
/// that becomes ready before it heard of the others' readiness would take
/// datums as their first owner).
pub async fn ready_all(nodes: &[&Node], datums: i64, ledger: &Arc<Ledger>) {
    for n in nodes {
        register(n, datums, ledger).await;
    }
    for (i, n) in nodes.iter().enumerate() {
        n.set_ready(true).await.unwrap();
        eventually("every node sees the ready nodes", || {
            nodes.iter().all(|m| m.view().ready.len() > i)
        })
        .await;
    }
}

/// Waits until every node has the same placement of `ready` ready nodes,
/// nothing is in flight, and the ledger says each of `datums` is held by
/// exactly its primary.
pub async fn settled(nodes: &[&Node], ready: usize, datums: i64, ledger: &Ledger) {
    let start = tokio::time::Instant::now();
    let mut why = String::new();
    loop {
        assert!(start.elapsed() < PATIENCE, "cluster did not settle: {why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let views: Vec<_> = nodes.iter().map(|n| n.view()).collect();
        if views
            .iter()
            .any(|v| v.placement.view().len() != ready || v.view_id() != views[0].view_id())
        {
            why = format!(
                "views {:?}",
                views
                    .iter()
                    .map(|v| (
                        v.local.name.to_string(),
                        v.placement.view().len(),
                        v.view_id()
                    ))
                    .collect::<Vec<_>>()
            );
            continue;
        }
        let mut busy = Vec::new();
        for n in nodes {
            let p = n.progress().await.unwrap();
            if !p.completed {
                busy.push((n.local().name.to_string(), p));
            }
        }
        if !busy.is_empty() {
            why = format!("in flight {busy:?}");
            continue;
        }
        let l = ledger.lock();
        let wrong: Vec<_> = (0..datums)
            .filter_map(|id| {
                let primary = views[0].primary(id).map(|n| n.name.as_str());
                let holder = l.holder(id).map(String::as_str);
                (holder != primary)
                    .then(|| (id, holder.map(str::to_owned), primary.map(str::to_owned)))
            })
            .take(5)
            .collect();
        if wrong.is_empty() {
            return;
        }
        let acquired: Vec<_> = l
            .acquired
            .iter()
            .filter(|(_, id)| *id == wrong[0].0)
            .collect();
        let relinquished: Vec<_> = l
            .relinquished
            .iter()
            .filter(|(_, id)| *id == wrong[0].0)
            .collect();
        why = format!(
            "misplaced (id, holder, primary) {wrong:?}; first: acquired {acquired:?} relinquished {relinquished:?}"
        );
    }
}

/// A cluster of `names` with a 4 s transition timeout, every node ready with
/// `datums` registered, settled, and the views of its forming older than
/// that timeout. A failover happens at once only when every node that was
/// the datum's primary in a recent view (replaced less than the transition
/// timeout ago) is declared failed, so a test of failover waits this out.
pub async fn settled_past_forming(
    ca: &ClusterCa,
    names: &[&str],
    datums: i64,
    ledger: &Arc<Ledger>,
) -> Vec<Node> {
    let mut nodes = Vec::new();
    for name in names {
        let mut cfg = config(name);
        cfg.transition_timeout_ms = 4_000;
        nodes.push(start(ca, cfg).await);
    }
    join_all(&nodes).await;
    let refs: Vec<&Node> = nodes.iter().collect();
    ready_all(&refs, datums, ledger).await;
    settled(&refs, names.len(), datums, ledger).await;
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    nodes
}

/// Like [`eventually`], with a condition that awaits.
pub async fn eventually_async<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !f().await {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// UDP traffic between two sets of loopback ports dropped with nftables
/// (both ways) until dropped. `None` when nftables cannot be used here (not
/// root, or `nft` missing: `.ci/run` installs it).
pub struct Cut {
    table: String,
}

impl Cut {
    pub fn new(a: &[u16], b: &[u16]) -> Option<Cut> {
        use std::process::Command;
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let table = format!("shoal_test_{}_{n}", std::process::id());
        let set = |ports: &[u16]| {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            format!("{{ {} }}", list.join(", "))
        };
        let (a, b) = (set(a), set(b));
        let script = format!(
            "add table inet {table}\n\
             add chain inet {table} input {{ type filter hook input priority -10 ; }}\n\
             add rule inet {table} input udp sport {a} udp dport {b} drop\n\
             add rule inet {table} input udp sport {b} udp dport {a} drop\n"
        );
        let ok = Command::new("nft")
            .arg(&script)
            .output()
            .is_ok_and(|o| o.status.success());
        let cut = Cut { table };
        ok.then_some(cut)
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .output();
    }
}
