//! The seed's own example, in shoal: join a cluster of one, watch for a
//! change, run a transition on it, leave.
//!
//! `cargo run -p shoal --example seed_example`

use std::sync::Arc;
use std::time::Duration;

use shoal::{DatumError, DistDatum, HandoffContext, Node, NodeConfig, TransitionMode};

struct Series {
    id: i64,
}

impl DistDatum for Series {
    fn id(&self) -> i64 {
        self.id
    }
    fn type_name(&self) -> &str {
        "series"
    }
    async fn relinquish(&self, _ctx: HandoffContext) -> Result<(), DatumError> {
        Ok(())
    }
    async fn acquire(&self, _ctx: HandoffContext) -> Result<(), DatumError> {
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (_ca, ids) = shoal_transport::throwaway_cluster(&["seed-example"])?;
    let id = ids.into_iter().next().ok_or("no identity")?;
    let mut config = NodeConfig::local("seed-example");
    config.transition = TransitionMode::Manual; // the seed runs transitions itself
    let node = Node::start_with_identity(config, id).await?;
    node.join(&[]).await?; // joining nobody makes a cluster of one

    let mut changes = node.changes();
    let watcher = {
        let node = node.clone();
        tokio::spawn(async move {
            // Wait for the change that matters here: this node becoming ready.
            while changes.changed().await.is_ok() {
                if !changes.borrow_and_update().local.ready {
                    continue;
                }
                println!("A cluster change occurred, running a transition.");
                match node.transition(Duration::from_secs(1)).await {
                    Ok(report) => println!(
                        "Transition done: acquired {}, completed {}",
                        report.acquired, report.completed
                    ),
                    Err(e) => println!("Transition error: {e}"),
                }
                break;
            }
        })
    };
    node.register((0..10).map(|id| Arc::new(Series { id })))
        .await?;
    node.set_ready(true).await?;
    watcher.await?;

    // Leave the cluster (relinquishes everything, then announces the leave).
    node.leave(Duration::from_secs(1)).await?;
    Ok(())
}
