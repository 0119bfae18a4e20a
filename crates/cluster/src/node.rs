//! The application's handle on a running node: the [`Node`] type, what its
//! handles share, and how a node starts. Its other methods are grouped by
//! concern: `lifecycle` (join, ready flag, metadata, leave, crash,
//! shutdown), `datums` (registration, handoff state, transitions), `inspect`
//! (views, snapshots, counters) and `channels` (messaging).

use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shoal_membership::{LocalNode, Membership};
use shoal_placement::{NodeId, PlacementTable, View};
use shoal_transition::{DatumState, FencingToken};
use shoal_transport::{ChannelCap, ClusterCa, NodeIdentity, NodeName, Transport, TransportConfig};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::channel::{ChannelEntry, ChannelTable, Receiver, Sender};
use crate::config::{NodeConfig, TlsConfig, TransitionMode};
use crate::datum::{DistDatum, ErasedDatum};
use crate::driver::{Command, Core, Counts, Driver, DriverInputs};
use crate::error::{Error, StartError};
use crate::gossip::{MembershipCommand, MembershipTask};
use crate::request::{self, AckedReceiver, AckedSender, RequestChannel};
use crate::view::{ClusterView, NodeInfo, Snapshot, TransitionReport};
use crate::wire::{self, Routed};

mod channels;
mod datums;
mod inspect;
mod lifecycle;

/// What every handle of one node shares.
pub(crate) struct Shared {
    pub(crate) name: NodeName,
    pub(crate) name_arc: Arc<str>,
    pub(crate) transport: Transport,
    pub(crate) view_rx: watch::Receiver<Arc<ClusterView>>,
    pub(crate) cmd_tx: mpsc::Sender<Command>,
    membership_tx: mpsc::Sender<MembershipCommand>,
    pub(crate) owner_tx: mpsc::Sender<Routed>,
    pub(crate) channels: Arc<ChannelTable>,
    pub(crate) config: NodeConfig,
    counts: Arc<Counts>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    shut: AtomicBool,
}

/// A running shoal node: the seed's `Cluster`. Cheap to clone; every clone
/// drives the same node.
///
/// Two tasks per node own the state machines: the membership task (SWIM)
/// and the driver (handoff, routing). The methods here either read the last
/// published [`ClusterView`] (never waiting for either) or send one of them
/// a command through a bounded queue (`limits.command_queue`; a full queue
/// makes the call wait).
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.shared.name)
            .field("addr", &self.shared.view_rx.borrow().local.addr)
            .finish_non_exhaustive()
    }
}

/// Capacity of the queues between the membership task and the driver.
const MEMBERSHIP_EVENTS: usize = 1024;

/// Sends a request carrying its answer's sender; [`Error::Shutdown`] when
/// the task is gone or dropped the request.
async fn ask<C, T>(
    queue: &mpsc::Sender<C>,
    make: impl FnOnce(oneshot::Sender<T>) -> C,
) -> Result<T, Error> {
    let (tx, rx) = oneshot::channel();
    queue.send(make(tx)).await.map_err(|_| Error::Shutdown)?;
    rx.await.map_err(|_| Error::Shutdown)
}

pub(crate) fn generation_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(1)
        .max(1)
}

fn identity_from_config(config: &NodeConfig) -> Result<NodeIdentity, StartError> {
    match &config.tls {
        TlsConfig::Files { dir } => Ok(NodeIdentity::read_pem_files(dir)?),
        TlsConfig::DevCa { dir } => {
            let ca = match ClusterCa::read_pem_files(dir) {
                Ok(ca) => ca,
                Err(_) => {
                    let ca = ClusterCa::generate()?;
                    ca.write_pem_files(dir)?;
                    // Another node may have written it first: use what is there.
                    ClusterCa::read_pem_files(dir).unwrap_or(ca)
                }
            };
            Ok(ca.issue(&NodeName::new(&config.name)?)?)
        }
        TlsConfig::Provided => Err(StartError::NoIdentity),
    }
}

impl Node {
    /// Starts a node from its configuration, reading or creating its
    /// certificate as `config.tls` says. The node knows only itself and is
    /// not ready; call [`Node::join`] (with no seed for a cluster of one),
    /// register datums, then [`Node::set_ready`]. Must run inside a tokio
    /// runtime.
    ///
    /// # Errors
    /// [`StartError`].
    pub async fn start(config: NodeConfig) -> Result<Node, StartError> {
        let identity = identity_from_config(&config)?;
        Node::start_with_identity(config, identity).await
    }

    /// Starts a node with an identity built in code (tests, embedding).
    ///
    /// # Errors
    /// [`StartError`]; [`StartError::NameMismatch`] when the certificate
    /// names another node than `config.name`.
    pub async fn start_with_identity(
        config: NodeConfig,
        identity: NodeIdentity,
    ) -> Result<Node, StartError> {
        config.validate()?;
        if identity.name().as_str() != config.name {
            return Err(StartError::NameMismatch {
                cert: identity.name().to_string(),
                config: config.name.clone(),
            });
        }
        let mut tconfig = TransportConfig::default();
        tconfig.max_message_size = config.limits.max_message;
        // Each peer's share (half) of the inbound budget holds two messages.
        // Message bodies hold their budget until the node's consumers are
        // done with them (the dispatcher uses `recv_held`).
        tconfig.inbound_bytes = config
            .limits
            .inbound_bytes
            .max(config.limits.max_message.saturating_mul(4));
        // Membership state and notice batches are large and repetitive: a
        // looser compression ratio than user messages get (which keep the
        // transport's 64), but no larger than what their decoders accept:
        // a push-pull state of `max_state_size`, a notice batch of the
        // handoff's `wire.max_bytes`. Anything larger is refused from its
        // header, before it is read or decompressed.
        let state_cap = config.timing.membership().max_state_size;
        let notice_cap = shoal_transition::Config::default().wire.max_bytes;
        tconfig.channel_caps = [
            (wire::CH_MEMBERSHIP, state_cap),
            (wire::CH_NOTICES, notice_cap),
        ]
        .map(|(channel, max_size)| ChannelCap {
            channel,
            max_size: max_size.min(config.limits.max_message),
            max_ratio: 1024,
        })
        .to_vec();
        // Membership and notices (the handoff's notice batches and done
        // markers) are control traffic: their own budget, queue and
        // streams, so that peers' messages this node's application has not
        // consumed (which hold the data budget) never make them wait. Each
        // peer's share (half) holds a push-pull state and a notice batch
        // twice (while decompressing, compressed and decompressed bytes
        // are charged together).
        tconfig.control_channels = vec![wire::CH_MEMBERSHIP, wire::CH_NOTICES];
        // Batches of routed messages go out plain: compressing each costs
        // more than the bytes it saves on the links a cluster runs on (the
        // messages in them were compressed alone when large).
        tconfig.plain_channels = vec![wire::CH_ROUTED_BATCH];
        tconfig.app_features = wire::features::ALL;
        let max = config.limits.max_message;
        tconfig.control_bytes = (state_cap.min(max) + notice_cap.min(max))
            .saturating_mul(4)
            .min(u32::MAX as usize);
        let (transport, incoming) = Transport::bind(config.bind, &identity, tconfig)?;
        let addr = match config.advertise {
            Some(a) => a,
            None => {
                let a = transport.local_addr();
                if a.ip().is_unspecified() {
                    transport.shutdown().await;
                    return Err(StartError::NoAdvertiseAddress(a));
                }
                a
            }
        };
        let generation = generation_now();
        let now = Instant::now();
        let mut mconfig = config.timing.membership();
        mconfig.max_metadata_len = config.limits.max_metadata;
        let local = LocalNode {
            name: config.name.clone(),
            generation,
            addr,
            ready: false,
            metadata: Vec::new(),
        };
        // Seeded by the operating system: the probe order, sequence numbers
        // and the name index's hash keys must not be predictable from what
        // peers know (the name and generation are gossiped).
        let membership = Membership::new(mconfig.clone(), local, SmallRng::from_os_rng(), now)?;
        let hconfig = shoal_transition::Config {
            timeout: config.transition_timeout(),
            relinquish_timeout: config.transition_timeout().mul_f64(0.75),
            max_relinquish_jobs: config.limits.max_relinquish_jobs,
            max_acquire_jobs: config.limits.max_acquire_jobs,
            hold_capacity: config.limits.hold_capacity,
            ..shoal_transition::Config::default()
        };
        let me = NodeId::new(config.name.clone(), generation);
        let core_config = shoal_core::CoreConfig {
            strategy: config.strategy.clone(),
            copies: config.copies,
            install: match config.transition {
                TransitionMode::Auto => shoal_core::InstallMode::Auto,
                TransitionMode::Manual => shoal_core::InstallMode::Manual,
            },
            max_forward_hops: config.limits.max_forward_hops,
            park_capacity: config.limits.hold_capacity,
            park_expiry: config.transition_timeout(),
            ..shoal_core::CoreConfig::default()
        };
        let core = Core::new(membership.local().clone(), hconfig, core_config)?;
        // Fail early on a strategy or copies placement refuses.
        PlacementTable::build(View::from_nodes([me]), &config.strategy, config.copies)?;

        let local_info = NodeInfo::from_member(membership.local());
        let view = ClusterView {
            local: local_info.clone(),
            members: vec![local_info],
            ready: View::default(),
            placement: Arc::clone(core.handoff().table()),
            version: 0,
            fenced: false,
            standing: true,
            settled: false,
        };
        let (view_tx, view_rx) = watch::channel(Arc::new(view));
        let (cmd_tx, cmd_rx) = mpsc::channel(config.limits.command_queue);
        let (membership_tx, membership_cmd_rx) = mpsc::channel(config.limits.command_queue);
        let (owner_tx, owner_rx) = mpsc::channel(config.limits.owner_queue);
        // Membership events for the driver; when full, they wait in the
        // membership state machine's own bounded queue.
        let (events_tx, events_rx) = mpsc::channel(MEMBERSHIP_EVENTS);
        // Reliable membership messages from the control dispatcher; when
        // full, it waits (QUIC flow control pushes back on the senders'
        // control streams; data is not affected).
        let (packets_tx, packets_rx) = mpsc::channel(MEMBERSHIP_EVENTS);
        let channels = Arc::new(ChannelTable::default());
        let counts = Arc::new(Counts::default());
        let name = identity.name().clone();
        let (messages, datagrams) = incoming.split();
        let (driver, queues) = Driver::new(
            config.clone(),
            core,
            transport.clone(),
            Arc::clone(&channels),
            view_tx,
            Arc::clone(&counts),
        );
        let lease = driver.lease();
        let gossip = MembershipTask::new(
            membership,
            mconfig,
            transport.clone(),
            Arc::clone(&counts),
            config.limits.peer_queue,
            events_tx,
            lease,
        );
        let driver_task = tokio::spawn(driver.run(
            queues,
            DriverInputs {
                messages,
                membership_tx: packets_tx,
                membership_rx: events_rx,
                cmd_rx,
                owner_rx,
            },
        ));
        let tasks = vec![
            tokio::spawn(gossip.run(datagrams, packets_rx, membership_cmd_rx)),
            tokio::spawn(lifecycle::watch_driver(
                driver_task,
                membership_tx.clone(),
                name.clone(),
            )),
        ];
        info!(node = %name, %addr, generation, "node started");
        Ok(Node {
            shared: Arc::new(Shared {
                name_arc: Arc::from(name.as_str()),
                name,
                transport,
                view_rx,
                cmd_tx,
                membership_tx,
                owner_tx,
                channels,
                config,
                counts,
                tasks: Mutex::new(tasks),
                shut: AtomicBool::new(false),
            }),
        })
    }

    /// Asks the driver; waits for room in its queue, then for the answer.
    async fn command<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, Error> {
        ask(&self.shared.cmd_tx, make).await
    }

    /// Asks the membership task, likewise.
    async fn membership_command<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> MembershipCommand,
    ) -> Result<T, Error> {
        ask(&self.shared.membership_tx, make).await
    }
}
