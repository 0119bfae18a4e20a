//! Datums and transitions: registering datums and factories, their
//! handoff state and fencing tokens, and running or waiting for transitions.

use super::*;

impl Node {
    /// Registers datums (the seed's `LoadDistData`); registering a datum
    /// again replaces the object kept for it. Returns how many were new.
    ///
    /// # Errors
    /// [`Error::Registry`] for a bad type name (or, in the instant a fenced
    /// generation is replaced by its successor, `RegistryError::Fenced`:
    /// register again), [`Error::Shutdown`]. Datums before the failing one stay registered.
    pub async fn register<D: DistDatum>(
        &self,
        datums: impl IntoIterator<Item = Arc<D>>,
    ) -> Result<usize, Error> {
        // In slices, so the driver keeps serving probes and messages between
        // them (a million datums at once would stall it for a second).
        const SLICE: usize = 8192;
        let mut datums = datums.into_iter();
        let mut added = 0;
        loop {
            let batch: Vec<Arc<dyn ErasedDatum>> = datums
                .by_ref()
                .take(SLICE)
                .map(|d| d as Arc<dyn ErasedDatum>)
                .collect();
            if batch.is_empty() {
                return Ok(added);
            }
            added += self.command(|tx| Command::Register(batch, tx)).await??;
        }
    }

    /// Registers datum type `type_name` **on demand**: instead of every
    /// datum up front ([`Node::register`]), `factory(id)` makes a datum the
    /// first time this node needs it: when work for it (a message or ask to
    /// its owner) reaches this node as its primary, or when a notice hands
    /// it over from its previous holder. A datum is then acquired and
    /// relinquished like any other; a node relinquishes only the datums it
    /// has made (or was given). Every node that may own datums of the type
    /// registers the same factory. Datums made this way stay registered
    /// until [`Node::unregister`]; memory grows with the datums this node
    /// has owned.
    ///
    /// The factory runs on the node's driver: it must be quick and must not
    /// block (load state in `acquire`, not here), and must return a datum
    /// with this type name and id (another is refused and counted).
    ///
    /// # Errors
    /// [`Error::Registry`] for a bad type name, [`Error::Shutdown`].
    pub async fn register_factory<D, F>(&self, type_name: &str, factory: F) -> Result<(), Error>
    where
        D: DistDatum,
        F: Fn(i64) -> Arc<D> + Send + Sync + 'static,
    {
        let factory: crate::datum::Factory =
            Arc::new(move |id| factory(id) as Arc<dyn ErasedDatum>);
        let name = type_name.to_owned();
        self.command(|tx| Command::RegisterFactory(name, factory, tx))
            .await?
    }

    /// Forgets datums of `datum_type`; work held for them is dropped (and
    /// counted). Returns how many were registered.
    ///
    /// # Errors
    /// [`Error::Shutdown`].
    pub async fn unregister(
        &self,
        datum_type: &str,
        ids: impl IntoIterator<Item = i64>,
    ) -> Result<usize, Error> {
        let ids: Vec<i64> = ids.into_iter().collect();
        let ty = datum_type.to_owned();
        self.command(|tx| Command::Unregister(ty, ids, tx)).await
    }

    /// The fencing token under which this node holds datum `(type_name, id)`
    /// now (acquiring, held or relinquishing), or `None` when it does not
    /// hold it. Tokens strictly increase from one owner of a datum to the
    /// next; write through a store that refuses older tokens (see
    /// [`HandoffContext`](crate::HandoffContext)).
    ///
    /// # Errors
    /// [`Error::Shutdown`].
    pub async fn fencing_token(
        &self,
        type_name: &str,
        id: i64,
    ) -> Result<Option<FencingToken>, Error> {
        let type_name = type_name.to_owned();
        self.command(|tx| Command::Token(type_name, id, tx)).await
    }

    /// Whether this node acts as the owner of datum `id` of `type_name` now:
    /// it acquired the datum and has not begun to relinquish it, and its
    /// ownership lease is valid (see `docs/partitions.md`). `false` for a
    /// datum not registered here.
    ///
    /// The answer can change right after it is given (a view change starts a
    /// relinquish; a lease lapses): a handler that must not act on a datum it
    /// no longer owns checks again where it writes, with the fencing token
    /// ([`Node::fencing_token`]) at a store that refuses older tokens.
    ///
    /// # Errors
    /// [`Error::Shutdown`].
    pub async fn holds(&self, type_name: &str, id: i64) -> Result<bool, Error> {
        Ok(self
            .datum_state(type_name, id)
            .await?
            .is_some_and(|(_, acting)| acting))
    }

    /// The handoff state of datum `id` of `type_name` on this node (held,
    /// relinquishing, awaiting its notice, acquiring, …), and whether the
    /// node acts as its owner now (held and the lease valid, as
    /// [`Node::holds`]). `None` when the datum is not registered here.
    ///
    /// # Errors
    /// [`Error::Shutdown`].
    pub async fn datum_state(
        &self,
        type_name: &str,
        id: i64,
    ) -> Result<Option<(DatumState, bool)>, Error> {
        let type_name = type_name.to_owned();
        self.command(|tx| Command::DatumState(type_name, id, tx))
            .await
    }

    /// Runs a transition (manual mode, the seed's `Transition`): installs
    /// the newest placement and waits until nothing is in flight here, or
    /// `timeout`. In auto mode it only waits. The handoff goes on after
    /// `timeout` (its own timeout is `transition_timeout_ms`).
    ///
    /// # Errors
    /// [`Error::Shutdown`].
    pub async fn transition(&self, timeout: Duration) -> Result<TransitionReport, Error> {
        let deadline = Instant::now() + timeout;
        self.command(|tx| Command::Transition {
            install: true,
            deadline,
            tx,
        })
        .await
    }

    /// Waits until the cluster is settled as this node sees it
    /// ([`ClusterView::settled`]: every live member said done with the view
    /// in force here and nothing is in flight here), or `timeout`. Returns
    /// the settled view, or `None` at the timeout. Waiting on every node
    /// (or on one, then checking that every member's `view_id` matches) is
    /// not needed: the done markers a node collects already come from every
    /// member.
    ///
    /// # Errors
    /// [`Error::Shutdown`].
    pub async fn wait_settled(&self, timeout: Duration) -> Result<Option<Arc<ClusterView>>, Error> {
        let mut changes = self.shared.view_rx.clone();
        let wait = async {
            loop {
                let view = Arc::clone(&changes.borrow_and_update());
                if view.settled {
                    return Ok(view);
                }
                changes.changed().await.map_err(|_| Error::Shutdown)?;
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result.map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Progress of the current (or last) transition, now.
    ///
    /// # Errors
    /// [`Error::Shutdown`].
    pub async fn progress(&self) -> Result<TransitionReport, Error> {
        self.command(Command::Progress).await
    }

    /// Waits until nothing is in flight here, or `timeout`.
    ///
    /// # Errors
    /// [`Error::Shutdown`].
    pub async fn wait_idle(&self, timeout: Duration) -> Result<TransitionReport, Error> {
        let deadline = Instant::now() + timeout;
        self.command(|tx| Command::Transition {
            install: false,
            deadline,
            tx,
        })
        .await
    }
}
