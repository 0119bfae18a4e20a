//! Membership and lifecycle: joining, the ready flag and metadata, leaving
//! gracefully, crashing, shutting down, and watching the driver's task.

use super::*;

/// How long a leaving node keeps refusing routed messages after its driver
/// stopped, before its transport shuts down.
const REFUSE_LINGER: Duration = Duration::from_millis(200);

impl Node {
    /// Joins the cluster through `seeds` (addresses of any members). With no
    /// seed this node is a cluster of one and this returns at once.
    /// Otherwise it returns once some seed answered and this node knows
    /// another member.
    ///
    /// # Errors
    /// [`Error::JoinTimeout`] after `join_timeout_ms` (membership keeps
    /// retrying in the background), [`Error::Shutdown`].
    pub async fn join(&self, seeds: &[SocketAddr]) -> Result<(), Error> {
        self.shared
            .membership_tx
            .send(MembershipCommand::Join(seeds.to_vec()))
            .await
            .map_err(|_| Error::Shutdown)?;
        if seeds.is_empty() {
            return Ok(());
        }
        let timeout = Duration::from_millis(self.shared.config.join_timeout_ms);
        let mut rx = self.shared.view_rx.clone();
        let joined = tokio::time::timeout(timeout, rx.wait_for(|v| v.members.len() > 1)).await;
        match joined {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(Error::Shutdown),
            Err(_) => Err(Error::JoinTimeout(timeout)),
        }
    }

    /// Announces this node ready (or not) to own datums: the seed's
    /// `Ready`. Every node then transitions (in auto mode).
    ///
    /// # Errors
    /// [`Error::Shutdown`].
    pub async fn set_ready(&self, ready: bool) -> Result<(), Error> {
        self.membership_command(|tx| MembershipCommand::SetReady(ready, tx))
            .await
    }

    /// Replaces this node's user metadata and gossips it: the seed's
    /// `SetMetaData`.
    ///
    /// # Errors
    /// [`Error::MetadataTooLarge`] above `limits.max_metadata` (nothing
    /// changes), [`Error::Shutdown`].
    pub async fn set_metadata(&self, metadata: Vec<u8>) -> Result<(), Error> {
        self.membership_command(|tx| MembershipCommand::SetMetadata(metadata, tx))
            .await?
    }

    /// Leaves gracefully within `timeout`, as the seed's applications do:
    /// marks this node not ready (every node transitions and this one
    /// relinquishes everything it owned), waits for its handoffs, announces
    /// the leave to the cluster, hands every message for a datum's owner
    /// still here (held, parked or queued) to the owner and waits until
    /// each was taken, then shuts down. From that point routed messages
    /// that reach this node are refused: handed back to the node that sent
    /// them, which routes them again. Local sends fail with
    /// [`SendError::Shutdown`](crate::SendError::Shutdown) from the last step
    /// on. Returns how the final transition went.
    ///
    /// A datum whose relinquish fails during the leave (the application's
    /// `relinquish` returned an error), or has not completed by `timeout`,
    /// is given up at once, not retried: this node stops holding it (a job
    /// still running is left to finish, its outcome ignored) and sends no
    /// notice for it; once nothing else is in flight it tells the others it
    /// holds nothing, so the datum's new owner acquires it then (on
    /// everyone's done markers, `AcquiredWithoutNotice` with reason
    /// `AllDone`), without waiting for the transition timeout. Only then is
    /// the departure announced, and the leave finishes as usual.
    ///
    /// # Errors
    /// [`Error::Shutdown`] if the node was already shut down;
    /// [`Error::LeaveIncomplete`] (after the node left) naming the datums
    /// given up: their unsaved state is lost unless the application kept it.
    pub async fn leave(&self, timeout: Duration) -> Result<TransitionReport, Error> {
        let deadline = Instant::now() + timeout;
        self.command(Command::BeginLeave).await?;
        self.set_ready(false).await?;
        self.command(|tx| Command::Leave { deadline, tx }).await?;
        let (given_up, report) = self.command(Command::GiveUp).await?;
        self.membership_command(|tx| MembershipCommand::Leave { deadline, tx })
            .await?;
        self.command(|tx| Command::Close { deadline, tx }).await?;
        // Refuse what still arrives for a moment (senders whose views lag),
        // and let the refusals reach their nodes, before the transport goes.
        let counts = &self.shared.counts;
        let linger = (Instant::now() + REFUSE_LINGER).min(deadline);
        while Instant::now() < deadline
            && (Instant::now() < linger || counts.refusals_in_flight.load(Ordering::SeqCst) > 0)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.shutdown().await;
        if given_up.is_empty() {
            Ok(report)
        } else {
            Err(Error::LeaveIncomplete {
                datums: given_up,
                report: Box::new(report),
            })
        }
    }

    /// Stops the node abruptly, as a crash would, for tests and fault drills
    /// in one process: the transport is severed first (from then on nothing
    /// is sent or received; peers are not told, their connections just go
    /// silent), then the node's tasks are aborted wherever they are. The
    /// others detect the failure as they would a killed process and fail its
    /// datums over. Nothing is relinquished; application jobs already
    /// running finish, but their results are discarded. Later calls on this
    /// node fail with [`Error::Shutdown`].
    pub async fn crash(&self) {
        if self.shared.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        self.shared.transport.sever();
        let tasks = self.take_tasks();
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
        self.shared.transport.shutdown().await;
        warn!(node = %self.shared.name, "node crashed (severed and aborted)");
    }

    /// The node's tasks, taken once (by `shutdown` or `crash`).
    fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(
            &mut *self
                .shared
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Stops the node at once: the driver ends, the transport closes. Other
    /// members will see it fail (use [`Node::leave`] to leave gracefully).
    pub async fn shutdown(&self) {
        if self.shared.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self.shared.cmd_tx.send(Command::Shutdown).await;
        let _ = self
            .shared
            .membership_tx
            .send(MembershipCommand::Shutdown)
            .await;
        let tasks = self.take_tasks();
        for task in tasks {
            let _ = task.await;
        }
        self.shared.transport.shutdown().await;
        info!(node = %self.shared.name, "node shut down");
    }
}

/// Aborts a task when dropped (the watcher of a task is aborted by `crash`).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits for the driver's task. The driver ends by itself only when told
/// (shutdown, the last step of a leave); if it ends by a panic instead (a
/// bug, or application code the driver runs outside a callback, such as a
/// datum's `Drop`), the node can no longer hand datums over: membership is
/// told at once that the node is not ready, and stops as soon as it finds
/// the driver's queue closed (the others then declare the node failed and
/// fail its datums over). Without this, membership would notice only at
/// its next event for the driver.
pub(super) async fn watch_driver(
    task: JoinHandle<()>,
    membership_tx: mpsc::Sender<MembershipCommand>,
    name: NodeName,
) {
    let _abort = AbortOnDrop(task.abort_handle());
    let Err(error) = task.await else { return };
    if !error.is_panic() {
        return;
    }
    let panic = crate::datum::panic_message(&*error.into_panic());
    tracing::error!(node = %name, %panic, "the driver panicked: this node is no longer ready");
    metrics::counter!("shoal_task_panics_total", "task" => "driver").increment(1);
    let (tx, _rx) = oneshot::channel();
    let _ = membership_tx
        .send(MembershipCommand::SetReady(false, tx))
        .await;
}
