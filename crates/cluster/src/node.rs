//! The application's handle on a running node.

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
use shoal_transition::{DatumState, FencingToken, Handoff};
use shoal_transport::{ChannelCap, ClusterCa, NodeIdentity, NodeName, Transport, TransportConfig};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::channel::{ChannelEntry, ChannelTable, Receiver, Sender};
use crate::config::{NodeConfig, TlsConfig};
use crate::datum::{DistDatum, ErasedDatum};
use crate::driver::{Command, Counts, Driver, DriverInputs};
use crate::error::{Error, StartError};
use crate::gossip::{MembershipCommand, MembershipTask};
use crate::request::{self, AckedReceiver, AckedSender, RequestChannel};
use crate::view::{ClusterView, NodeInfo, Snapshot, TransitionReport};
use crate::wire::{self, Routed};

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
/// How long a leaving node keeps refusing routed messages after its driver
/// stopped, before its transport shuts down.
const REFUSE_LINGER: Duration = Duration::from_millis(200);

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
        let handoff = Handoff::new(me.clone(), hconfig)?;
        // Fail early on a strategy or copies placement refuses.
        PlacementTable::build(View::from_nodes([me]), &config.strategy, config.copies)?;

        let local_info = NodeInfo::from_member(membership.local());
        let view = ClusterView {
            local: local_info.clone(),
            members: vec![local_info],
            ready: View::default(),
            placement: Arc::clone(handoff.table()),
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
            membership.local().clone(),
            handoff,
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
            tokio::spawn(watch_driver(
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

    /// A typed channel named `name`: messages of type `T` (postcard) sent
    /// with the [`Sender`] arrive at the [`Receiver`] of the node they are
    /// sent to. The id is derived from the name, so nodes may register
    /// channels in any order. Received messages wait in a queue of
    /// `limits.channel_queue`; when it is full the node stops reading from
    /// the network and the senders wait (nothing is dropped).
    ///
    /// # Errors
    /// [`Error::ChannelTaken`] when `name` (or a name with the same id) is
    /// registered here already, [`Error::BadChannelName`].
    pub fn channel<T: Serialize + DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<(Sender<T>, Receiver<T>), Error> {
        if name.is_empty() || name.len() > wire::MAX_NAME_LEN {
            return Err(Error::BadChannelName(name.len()));
        }
        let id = wire::channel_id(name);
        let name: Arc<str> = Arc::from(name);
        let (tx, rx) = mpsc::channel(self.shared.config.limits.channel_queue);
        let decode_errors = Arc::new(AtomicU64::new(0));
        {
            let mut map = self
                .shared
                .channels
                .map
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if map.contains_key(&id) {
                return Err(Error::ChannelTaken {
                    name: name.to_string(),
                    id,
                });
            }
            map.insert(
                id,
                ChannelEntry {
                    tx,
                    name: Arc::clone(&name),
                },
            );
        }
        let sender = Sender {
            shared: Arc::clone(&self.shared),
            id,
            name: Arc::clone(&name),
            _type: PhantomData,
        };
        let receiver = Receiver {
            rx,
            table: Arc::clone(&self.shared.channels),
            id,
            name,
            decode_errors,
            _type: PhantomData,
        };
        Ok((sender, receiver))
    }

    /// A request channel named `name`: [`Requester::ask_owner`](crate::Requester::ask_owner) sends a
    /// request of type `Q` to the owner of a datum (routed, forwarded and
    /// held like [`Sender::send_to_owner`]), [`Requester::ask`](crate::Requester::ask) to a named
    /// node; the application that takes it from [`Requests::recv`](crate::Requests::recv) answers
    /// with a `R`, which goes straight back to the node that asked,
    /// whoever forwarded the ask. Typed errors: timeout, refused, peer gone,
    /// no owner (see [`RequestError`](crate::RequestError)). Every node that
    /// asks or answers registers the channel.
    ///
    /// It uses two channels, `name` and `name` + `"\u{1f}answer"`.
    ///
    /// # Errors
    /// As [`Node::channel`]; [`Error::BadChannelName`] also for a name
    /// longer than 248 bytes.
    pub fn request_channel<Q, R>(&self, name: &str) -> Result<RequestChannel<Q, R>, Error>
    where
        Q: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
    {
        if name.len() > request::MAX_REQUEST_CHANNEL_NAME {
            return Err(Error::BadChannelName(name.len()));
        }
        let asks = self.channel(name)?;
        let answers = self.channel(&request::answer_channel(name))?;
        Ok(request::request_channel(
            asks,
            answers,
            self.shared.view_rx.clone(),
            Arc::clone(&self.shared.name_arc),
        ))
    }

    /// A channel whose sends resolve once the receiving application took
    /// the message: [`AckedSender::send_to_owner`] and
    /// [`AckedSender::send_to`] wait for the [`AckedReceiver`] on the
    /// other side to return it from `recv`, or fail with the reason
    /// (timeout, no owner, peer gone, …). The fire-and-forget
    /// [`Node::channel`] stays the cheaper choice where a lost message is
    /// acceptable.
    ///
    /// # Errors
    /// As [`Node::request_channel`].
    pub fn acked_channel<T>(&self, name: &str) -> Result<(AckedSender<T>, AckedReceiver<T>), Error>
    where
        T: Serialize + DeserializeOwned,
    {
        Ok(request::acked_channel(self.request_channel::<T, ()>(name)?))
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
async fn watch_driver(
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
