//! Reading the node: the published view and its changes, members and
//! owners, snapshots, and the transport's counters and memory held.

use super::*;

impl Node {
    /// The cluster as last published: members, placement, this node. Never
    /// waits for the driver.
    pub fn view(&self) -> Arc<ClusterView> {
        Arc::clone(&self.shared.view_rx.borrow())
    }

    /// A stream of views: `changed().await` wakes on every join, leave,
    /// failure, ready or metadata change (local ones included) and on every
    /// installed placement; a slow reader sees only the newest view
    /// (coalesced). The seed's `NotifyClusterChanges`, with the view.
    pub fn changes(&self) -> watch::Receiver<Arc<ClusterView>> {
        let mut rx = self.shared.view_rx.clone();
        // Only later changes wake the new receiver.
        rx.borrow_and_update();
        rx
    }

    /// This node.
    pub fn local(&self) -> NodeInfo {
        self.shared.view_rx.borrow().local.clone()
    }

    /// Live members, ready or not, sorted by name.
    pub fn members(&self) -> Vec<NodeInfo> {
        self.shared.view_rx.borrow().members.clone()
    }

    /// Ready members in placement order (oldest first, ties by name).
    pub fn sorted_nodes(&self) -> Vec<NodeId> {
        self.shared.view_rx.borrow().ready.nodes().to_vec()
    }

    /// The owners of datum `id` (primary first) in the placement in force.
    /// For a hot path, keep [`Node::view`] and call
    /// [`ClusterView::owners`], which does not allocate.
    pub fn owners(&self, id: i64) -> Vec<NodeId> {
        self.shared.view_rx.borrow().owners(id).cloned().collect()
    }

    /// A picture of the node (members with state, datums owned, handoffs in
    /// flight, counters), printable as a table.
    ///
    /// # Errors
    /// [`Error::Shutdown`].
    pub async fn snapshot(&self) -> Result<Snapshot, Error> {
        let membership = self.membership_command(MembershipCommand::Snapshot).await?;
        self.command(|tx| Command::Snapshot(Box::new(membership), tx))
            .await
    }

    /// The transport's counters.
    pub fn transport_stats(&self) -> shoal_transport::StatsSnapshot {
        self.shared.transport.stats()
    }

    /// Bytes of messages from peers this node holds right now (decompressed,
    /// plus 128 bytes each), from the transport's reading to their
    /// consumer: at most `limits.inbound_bytes` (or 4 × `limits.max_message`
    /// if larger), one peer at most half of it. Membership messages and
    /// notice batches are not included: see [`Node::control_bytes_held`].
    pub fn inbound_bytes_held(&self) -> usize {
        self.shared.transport.inbound_bytes_charged()
    }

    /// Bytes of membership messages and notice batches from peers this
    /// node holds right now, in a budget of their own (4 × (the push-pull
    /// state cap + the notice batch cap), one peer at most half), so that
    /// they never wait for data messages nobody consumes.
    pub fn control_bytes_held(&self) -> usize {
        self.shared.transport.control_bytes_charged()
    }

    /// The most bytes [`Node::inbound_bytes_held`] ever reached since the
    /// node started: the high-water mark of memory held for peers' messages.
    pub fn inbound_bytes_held_peak(&self) -> usize {
        self.shared.transport.inbound_bytes_charged_peak()
    }

    /// Of [`Node::inbound_bytes_held`], the bytes from the peer called `name`.
    pub fn inbound_bytes_held_by(&self, name: &str) -> usize {
        NodeName::new(name).map_or(0, |n| self.shared.transport.inbound_bytes_charged_by(&n))
    }
}
