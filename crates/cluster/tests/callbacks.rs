//! Faulty application callbacks on real nodes (loopback): a `relinquish` or
//! `acquire` that panics fails its job as an error would (retried), is
//! counted, and the node's driver goes on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use common::{config, eventually, join_all, start};
use shoal::{ClusterCa, DatumError, DistDatum, HandoffContext, Node};

/// What the panicking datums did, shared by both nodes.
#[derive(Default)]
struct Record {
    /// `(node, datum, "relinquish" | "acquire")` that panicked once already.
    panicked: HashSet<(String, i64, &'static str)>,
    /// Which node holds each datum.
    holder: HashMap<i64, String>,
}

/// A datum whose callbacks panic on their first call on each node.
struct Panicky {
    id: i64,
    node: String,
    record: Arc<Mutex<Record>>,
}

impl Panicky {
    /// Panics the first time `what` runs for this datum on this node.
    fn maybe_panic(&self, what: &'static str) {
        let first = self
            .record
            .lock()
            .unwrap()
            .panicked
            .insert((self.node.clone(), self.id, what));
        if first {
            panic!("{what} of {} on {} fails on purpose", self.id, self.node);
        }
    }
}

impl DistDatum for Panicky {
    fn id(&self) -> i64 {
        self.id
    }
    fn type_name(&self) -> &str {
        "panicky"
    }
    async fn relinquish(&self, _ctx: HandoffContext) -> Result<(), DatumError> {
        self.maybe_panic("relinquish");
        self.record.lock().unwrap().holder.remove(&self.id);
        Ok(())
    }
    async fn acquire(&self, _ctx: HandoffContext) -> Result<(), DatumError> {
        // Waits once before panicking, so the panic happens in the job's
        // own task rather than in the driver's first poll.
        if self.id % 2 == 0 {
            tokio::task::yield_now().await;
        }
        self.maybe_panic("acquire");
        self.record
            .lock()
            .unwrap()
            .holder
            .insert(self.id, self.node.clone());
        Ok(())
    }
}

const DATUMS: i64 = 16;

async fn register(node: &Node, record: &Arc<Mutex<Record>>) {
    let name = node.local().name.to_string();
    node.register((0..DATUMS).map(|id| {
        Arc::new(Panicky {
            id,
            node: name.clone(),
            record: Arc::clone(record),
        })
    }))
    .await
    .unwrap();
}

/// Every datum held by its primary in `node`'s view, and nothing in flight.
async fn settled(nodes: &[&Node], record: &Mutex<Record>) {
    common::eventually_async("every datum held by its primary", || async {
        for n in nodes {
            if !n.progress().await.unwrap().completed {
                return false;
            }
        }
        let view = nodes[0].view();
        let record = record.lock().unwrap();
        (0..DATUMS).all(|id| {
            let primary = view
                .placement
                .primary(id)
                .and_then(|i| view.placement.view().node(i))
                .map(|n| n.name.to_string());
            primary.is_some() && record.holder.get(&id) == primary.as_ref()
        })
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_callbacks_fail_their_job_and_the_driver_goes_on() {
    let ca = ClusterCa::generate().unwrap();
    let a = start(&ca, config("a")).await;
    let b = start(&ca, config("b")).await;
    join_all(&[a.clone(), b.clone()]).await;
    let record = Arc::new(Mutex::new(Record::default()));
    register(&a, &record).await;
    register(&b, &record).await;

    // a alone takes every datum: each acquire panics once, then succeeds.
    a.set_ready(true).await.unwrap();
    settled(&[&a], &record).await;
    let facade = a.snapshot().await.unwrap().facade;
    assert_eq!(facade.callback_panics, DATUMS as u64);

    // b becomes ready: a relinquishes b's datums (each panics once, is
    // retried) and b acquires them (each panics once, is retried).
    b.set_ready(true).await.unwrap();
    eventually("both see both ready", || {
        a.view().ready.len() == 2 && b.view().ready.len() == 2
    })
    .await;
    settled(&[&a, &b], &record).await;
    let moved = record
        .lock()
        .unwrap()
        .holder
        .values()
        .filter(|n| *n == "b")
        .count() as u64;
    assert!(moved > 0, "some datums moved to b");
    let sa = a.snapshot().await.unwrap();
    let sb = b.snapshot().await.unwrap();
    assert_eq!(sa.facade.callback_panics, DATUMS as u64 + moved);
    assert_eq!(sb.facade.callback_panics, moved);
    assert_eq!(sa.transition.relinquish_failures, moved);
    assert_eq!(sb.transition.acquire_failures, moved);
    // Both drivers still answer and both nodes are still ready.
    assert_eq!(a.view().ready.len(), 2);
    assert_eq!(b.view().ready.len(), 2);
    a.shutdown().await;
    b.shutdown().await;
}

/// A datum whose `Drop` panics (application code the driver runs when it
/// lets go of a datum, outside any callback it could catch).
struct DropBomb(i64);

impl DistDatum for DropBomb {
    fn id(&self) -> i64 {
        self.0
    }
    fn type_name(&self) -> &str {
        "drop-bomb"
    }
    async fn relinquish(&self, _ctx: HandoffContext) -> Result<(), DatumError> {
        Ok(())
    }
    async fn acquire(&self, _ctx: HandoffContext) -> Result<(), DatumError> {
        Ok(())
    }
}

impl Drop for DropBomb {
    fn drop(&mut self) {
        panic!("datum {} panics when dropped", self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_driver_died_is_no_longer_announced_ready() {
    let ca = ClusterCa::generate().unwrap();
    let a = start(&ca, config("a")).await;
    let b = start(&ca, config("b")).await;
    join_all(&[a.clone(), b.clone()]).await;
    a.register([Arc::new(DropBomb(0))]).await.unwrap();
    a.set_ready(true).await.unwrap();
    b.set_ready(true).await.unwrap();
    eventually("both see both ready", || {
        a.view().ready.len() == 2 && b.view().ready.len() == 2
    })
    .await;
    // Unregistering drops the datum in a's driver: its task ends by a panic.
    // a can no longer hand datums over: b must stop counting it as ready
    // (a is marked not ready, and its membership stops: it is declared
    // failed), and take its datums.
    let _ = a.unregister("drop-bomb", [0]).await;
    eventually("b no longer sees a ready", || {
        b.view().ready.nodes().iter().all(|n| &*n.name != "a")
    })
    .await;
    assert!(matches!(a.progress().await, Err(shoal::Error::Shutdown)));
    a.shutdown().await;
    b.shutdown().await;
}
