//! The extension point: an application layer that runs on every simulated
//! node next to membership.
//!
//! Layers above membership (transition: relinquish / notice / acquire) plug
//! their own sans-IO state machine in by implementing [`Application`]. The
//! simulator then, on every node:
//!
//! - starts one instance per process (a restart is a new instance, with a new
//!   generation) with [`Application::start`];
//! - hands it every membership event that node's membership emits, in order,
//!   with [`Application::on_event`];
//! - delivers the reliable messages other nodes' instances sent it through
//!   the virtual network ([`Application::on_message`]), and tells every
//!   sender the outcome of each message, delivered or failed
//!   ([`Application::on_send_done`]), as a QUIC stream would;
//! - drives its timer ([`Application::poll_timeout`] /
//!   [`Application::on_timeout`]);
//! - tells it when its process stops ([`Application::on_stop`]);
//! - runs its cross-node invariant check at sampling points
//!   ([`Application::check`]), and records any violation it reports from a
//!   callback ([`AppCtx::violation`]), stopping the run with the seed and the
//!   step.
//!
//! [`Application::Shared`] is one value that lives in the simulator and that
//! every instance can reach from its callbacks: a ledger for incremental
//! invariant checks (e.g. "at most one live node holds datum 7 acquired"),
//! updated as things happen, so checks cost O(1) per step instead of a scan
//! of all nodes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use rand::rngs::SmallRng;
use shoal_membership::{Event, Membership};

/// Identity of one simulated process: the slot it runs in (its address and
/// name stay the same across restarts) and its generation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    /// Index of the node slot (0-based).
    pub slot: u32,
    /// Node name, the same for every generation of the slot.
    pub name: Arc<str>,
    /// Generation of this process (its virtual start time order); a restart
    /// is a new, higher generation.
    pub generation: u64,
    /// Address of the slot on the virtual network.
    pub addr: SocketAddr,
}

/// A request an application makes to its node's membership; applied by the
/// simulator right after the callback returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppCommand {
    /// `Membership::set_ready`.
    SetReady(bool),
    /// `Membership::set_metadata`.
    SetMetadata(Vec<u8>),
    /// `Membership::leave`, then the process exits after the configured
    /// linger time.
    Leave,
    /// The cluster declared this process dead: it comes back as a new
    /// generation of itself in the same process, as the facade does (a new
    /// membership, not ready, rejoining through the members the old one
    /// knew); the application then hears [`Application::on_reborn`].
    /// Ignored while leaving.
    Rebirth,
}

/// Identifies one message sent with [`AppCtx::send`]; its outcome comes
/// back with the same id in [`Application::on_send_done`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u64);

/// What the application produced during one callback.
#[derive(Debug, Default)]
pub(crate) struct AppOutput {
    pub(crate) sends: Vec<(MessageId, SocketAddr, Vec<u8>)>,
    pub(crate) commands: Vec<AppCommand>,
    pub(crate) violations: Vec<String>,
}

impl AppOutput {
    pub(crate) fn is_empty(&self) -> bool {
        self.sends.is_empty() && self.commands.is_empty() && self.violations.is_empty()
    }
}

/// What an application callback can see and do.
pub struct AppCtx<'a, S> {
    pub(crate) now: Instant,
    pub(crate) node: &'a NodeInfo,
    pub(crate) membership: &'a Membership<SmallRng>,
    pub(crate) shared: &'a mut S,
    pub(crate) rng: &'a mut SmallRng,
    pub(crate) out: &'a mut AppOutput,
    pub(crate) next_message_id: &'a mut u64,
}

impl<S> AppCtx<'_, S> {
    /// The virtual time of this callback.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// The process this callback runs on.
    pub fn node(&self) -> &NodeInfo {
        self.node
    }

    /// This node's membership, read-only (members, local state, stats).
    pub fn membership(&self) -> &Membership<SmallRng> {
        self.membership
    }

    /// The cross-node ledger shared by all instances.
    pub fn shared(&mut self) -> &mut S {
        self.shared
    }

    /// This process's own seeded random generator.
    pub fn rng(&mut self) -> &mut SmallRng {
        self.rng
    }

    /// Sends a reliable message to the node at `to`. It arrives once, after
    /// the network's latency, and the sender then gets
    /// [`Application::on_send_done`] with `delivered == true` once the
    /// acknowledgement travelled back; or, if the receiver is down,
    /// partitioned away, or crashes with the message still in its input
    /// backlog, the message is not handled and the sender gets
    /// `delivered == false` after `reliable_fail_after`. Exactly one outcome
    /// per message, unless the sender itself stops first.
    pub fn send(&mut self, to: SocketAddr, payload: Vec<u8>) -> MessageId {
        *self.next_message_id += 1;
        let id = MessageId(*self.next_message_id);
        self.out.sends.push((id, to, payload));
        id
    }

    /// Asks this node's membership to change its ready flag.
    pub fn set_ready(&mut self, ready: bool) {
        self.out.commands.push(AppCommand::SetReady(ready));
    }

    /// Asks this node's membership to change its metadata.
    pub fn set_metadata(&mut self, metadata: Vec<u8>) {
        self.out.commands.push(AppCommand::SetMetadata(metadata));
    }

    /// Asks this node to leave the cluster gracefully and then exit.
    pub fn leave(&mut self) {
        self.out.commands.push(AppCommand::Leave);
    }

    /// Asks for a new generation of this process (after `DeclaredFailed`):
    /// see [`AppCommand::Rebirth`].
    pub fn rebirth(&mut self) {
        self.out.commands.push(AppCommand::Rebirth);
    }

    /// Reports a broken invariant: the simulator stops the run and reports
    /// the seed, the step and this message.
    pub fn violation(&mut self, message: impl Into<String>) {
        self.out.violations.push(message.into());
    }
}

/// One live process as the cross-node check sees it.
pub struct NodeView<'a, A> {
    /// Which process.
    pub info: &'a NodeInfo,
    /// Its membership state machine.
    pub membership: &'a Membership<SmallRng>,
    /// Its application instance.
    pub app: &'a A,
    /// True once it called `leave` (it still runs until it exits).
    pub leaving: bool,
    /// Paused ([`Action::Pause`](crate::Action::Pause)) at this instant: it
    /// handles nothing, timers included, until it wakes.
    pub frozen: bool,
}

/// An application layer simulated on every node next to membership. See the
/// module documentation for when each method is called. Every method but
/// [`Application::start`] has a default that does nothing.
pub trait Application: Sized {
    /// One value shared by every instance (a ledger for incremental checks).
    type Shared;

    /// Starts the instance of a new process (first start or restart).
    fn start(ctx: &mut AppCtx<'_, Self::Shared>) -> Self;

    /// A membership event of this node, in the order membership emitted it.
    fn on_event(&mut self, event: &Event, ctx: &mut AppCtx<'_, Self::Shared>) {
        let _ = (event, ctx);
    }

    /// A reliable message another process sent to this node's address.
    fn on_message(&mut self, from: &NodeInfo, payload: &[u8], ctx: &mut AppCtx<'_, Self::Shared>) {
        let _ = (from, payload, ctx);
    }

    /// The outcome of message `id` this process sent to `to`: handled by
    /// the receiver (`delivered`), or not.
    fn on_send_done(
        &mut self,
        id: MessageId,
        to: SocketAddr,
        delivered: bool,
        ctx: &mut AppCtx<'_, Self::Shared>,
    ) {
        let _ = (id, to, delivered, ctx);
    }

    /// The deadline returned by [`Application::poll_timeout`] has passed.
    fn on_timeout(&mut self, ctx: &mut AppCtx<'_, Self::Shared>) {
        let _ = ctx;
    }

    /// When [`Application::on_timeout`] should next be called, if ever.
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }

    /// This process was reborn as a new generation ([`AppCommand::Rebirth`]):
    /// `ctx.node()` and `ctx.membership()` are the new ones; in-flight
    /// message outcomes of the old generation never come.
    fn on_reborn(&mut self, ctx: &mut AppCtx<'_, Self::Shared>) {
        let _ = ctx;
    }

    /// The process stops: `crashed` is true for a crash, false for the exit
    /// that follows a graceful leave. The instance is dropped afterwards.
    fn on_stop(&mut self, node: &NodeInfo, crashed: bool, shared: &mut Self::Shared) {
        let _ = (node, crashed, shared);
    }

    /// Whether [`Application::check_step`] runs after every step (it costs
    /// a pass over every process per step: for small clusters).
    const STEP_CHECKS: bool = false;

    /// Cross-node check after every step (every event the simulator
    /// processed), when [`Application::STEP_CHECKS`] is set, over the
    /// processes in their slots (leaving ones included) at virtual instant
    /// `now`. May update the ledger. Return a description of the first
    /// broken invariant.
    fn check_step(
        shared: &mut Self::Shared,
        now: Instant,
        nodes: &mut dyn Iterator<Item = NodeView<'_, Self>>,
    ) -> Result<(), String> {
        let _ = (shared, now, nodes);
        Ok(())
    }

    /// Cross-node invariant check, run at every sampling point over the live
    /// processes. Return a description of the first broken invariant.
    fn check(
        shared: &Self::Shared,
        nodes: &mut dyn Iterator<Item = NodeView<'_, Self>>,
    ) -> Result<(), String> {
        let _ = (shared, nodes);
        Ok(())
    }
}

/// No application: membership alone.
impl Application for () {
    type Shared = ();

    fn start(_ctx: &mut AppCtx<'_, ()>) -> Self {}
}
