//! The state machine.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use rand::seq::SliceRandom;
use tracing::{debug, info, warn};

use crate::broadcast::Broadcasts;
use crate::hash::{NameIndex, SeededState, SlotMap, witness_rank};
use crate::lease::{Lease, LeaseEvidence, LeaseStrategy, Standing, WitnessId, witness_set_size};
use crate::suspicion::{Suspicion, push_pull_scale, retransmit_limit, suspicion_min};
use crate::wire::{
    self, Accusation, Alive, IndirectPing, Limits, Message, Ping, PushPull, State, WireState,
};
use crate::{
    Claimant, Config, DecodeError, Error, Event, LocalNode, Member, MemberState, Stats, Transmit,
};

/// Broadcast-queue key of updates about this node.
const LOCAL_SLOT: u32 = u32::MAX;
/// Random draws tried before falling back to a scan when picking members.
const SAMPLE_ATTEMPTS: usize = 32;
/// Notices re-sent per reconnect tick, at most.
const MAX_NOTICE_PINGS: usize = 16;
/// Seeds remembered for reconnecting, at most.
const MAX_SEEDS: usize = 64;
/// Accusers answered directly per incarnation, at most.
const MAX_TOLD: usize = 16;
/// Stale accusations about other members answered directly, remembered to
/// answer each once.
const MAX_STALE_ANSWERED: usize = 256;
/// Last-chance pings to suspects remembered, at most.
const MAX_CHECKS: usize = 64;
/// Death verdicts about this node remembered (to report each once), at most.
const MAX_VERDICTS: usize = 64;
/// Claim checks (`AliveRequest`s to a member a third party spoke for) in
/// flight, at most: each sends one small packet to an address a peer chose.
const MAX_CLAIM_CHECKS: usize = 256;
/// How far above the known incarnation a third party may move a member
/// (an `Alive`, `Suspect` or `Dead` it relays). A member raises its own
/// incarnation by one per refutation or update, so this is far more than
/// a partition's worth of them, and far enough below `u64::MAX` that a
/// refutation can always answer: pushing a member to the top would take
/// 2^44 accepted messages, each refuted by the member.
pub(crate) const MAX_INCARNATION_STEP: u64 = 1 << 20;

/// `now + d`, saturating far in the future instead of overflowing.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(1 << 32)))
        .unwrap_or(now)
}

/// The probe in progress.
#[derive(Debug, Clone, Copy)]
struct Probe {
    slot: u32,
    /// When the ping left: an ack proves contact from then on (lease).
    sent_at: Instant,
    generation: u64,
    /// The ping carried a death-verdict notice to its target.
    carries_notice: bool,
    seq: u32,
    indirect_at: Instant,
    deadline: Instant,
    indirect_sent: bool,
    expected_nacks: u32,
    nacks: u32,
}

/// An indirect probe this node runs for another member.
#[derive(Debug, Clone, Copy)]
struct Relay {
    seq: u32,
    /// Hash of the target's name: only its ack counts.
    target: u64,
    /// When this node pinged the target for the requester.
    sent_at: Instant,
    requester: SocketAddr,
    requester_seq: u32,
    nack_at: Instant,
}

/// A death verdict a revived member still has to hear about.
#[derive(Debug, Clone)]
struct Notice {
    incarnation: u64,
    accuser: Arc<str>,
}

/// An ack to send once the whole packet was applied.
#[derive(Debug, Clone, Copy)]
struct DeferredAck {
    to: SocketAddr,
    seq: u32,
    reliable: bool,
    extra: AckExtra,
}

/// What rides with an ack, about the pinger itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckExtra {
    Nothing,
    /// We do not know the pinger, or an older version of it: ask.
    AskAlive,
    /// We hold the pinger (in this slot) suspect or dead: tell it.
    Accuse(u32),
    /// We revived the pinger (in this slot) and it may not know it had been
    /// declared dead: tell it again.
    Notice(u32),
}

/// Join attempts in progress.
#[derive(Debug, Clone)]
struct Join {
    seeds: Vec<SocketAddr>,
    next_at: Instant,
    delay: Duration,
}

/// Where a member name comes from: borrowed from a packet, or shared.
#[derive(Clone, Copy)]
enum NameSrc<'a> {
    Wire(&'a str),
    Shared(&'a Arc<str>),
}

impl NameSrc<'_> {
    fn as_str(&self) -> &str {
        match self {
            NameSrc::Wire(name) => name,
            NameSrc::Shared(name) => name,
        }
    }

    fn to_arc(self) -> Arc<str> {
        match self {
            NameSrc::Wire(name) => Arc::from(name),
            NameSrc::Shared(name) => Arc::clone(name),
        }
    }
}

/// Where metadata comes from: borrowed from a packet, or shared.
#[derive(Clone, Copy)]
enum MetaSrc<'a> {
    Wire(&'a [u8]),
    Shared(&'a Arc<[u8]>),
}

impl MetaSrc<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            MetaSrc::Wire(meta) => meta,
            MetaSrc::Shared(meta) => meta,
        }
    }

    fn to_arc(self, empty: &Arc<[u8]>) -> Arc<[u8]> {
        match self {
            MetaSrc::Wire([]) => Arc::clone(empty),
            MetaSrc::Wire(meta) => Arc::from(meta),
            MetaSrc::Shared(meta) => Arc::clone(meta),
        }
    }
}

/// An alive announcement, from the wire or from a snapshot.
#[derive(Clone, Copy)]
struct AliveInfo<'a> {
    name: NameSrc<'a>,
    generation: u64,
    incarnation: u64,
    addr: SocketAddr,
    ready: bool,
    metadata: MetaSrc<'a>,
}

impl<'a> AliveInfo<'a> {
    fn from_wire(alive: &Alive<'a>) -> Self {
        AliveInfo {
            name: NameSrc::Wire(alive.name),
            generation: alive.generation,
            incarnation: alive.incarnation,
            addr: alive.addr,
            ready: alive.ready,
            metadata: MetaSrc::Wire(alive.metadata),
        }
    }

    fn from_member(member: &'a Member) -> Self {
        AliveInfo {
            name: NameSrc::Shared(&member.name),
            generation: member.generation,
            incarnation: member.incarnation,
            addr: member.addr,
            ready: member.ready,
            metadata: MetaSrc::Shared(&member.metadata),
        }
    }
}

/// Where an update comes from, which decides what it may do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A message (gossip, piggyback, own probe): events, re-broadcast, and a
    /// suspicion from a new accuser confirms an existing one.
    Announce,
    /// A push-pull state: events and re-broadcast, but it never confirms a
    /// suspicion (the sender only relays what it heard; counting it would
    /// let one node's suspicion confirm itself through others).
    Merge,
    /// A bootstrap snapshot: no per-member events, nothing re-broadcast.
    Quiet,
}

impl Mode {
    fn announces(self) -> bool {
        self != Mode::Quiet
    }
}

/// One node's view of the cluster: SWIM failure detection with the Lifeguard
/// extensions, and gossip of member state. Sans-IO: feed it packets and
/// timeouts, poll what it wants to send and what happened.
///
/// See the [crate documentation](crate) for the protocol and an example.
pub struct Membership<R: Rng> {
    config: Config,
    rng: R,
    limits: Limits,
    hasher: SeededState,
    empty_metadata: Arc<[u8]>,

    local: Member,
    /// True once another process won this node's name: the node is passive.
    superseded: bool,
    /// Death verdicts about us already reported: (incarnation, accuser hash).
    verdicts: VecDeque<(u64, u64)>,
    /// Members we revived that still have to hear they had been declared
    /// dead (repeated on pings and acks to them).
    notices: SlotMap<Notice>,
    /// Pings that carried only a notice: (seq, slot, send time).
    notice_pings: VecDeque<(u32, u32, Instant)>,
    /// Remote members; `None` marks a reaped slot that `free` will reuse.
    members: Vec<Option<Member>>,
    free: Vec<u32>,
    index: NameIndex,
    /// Alive and suspect members, this node included while it is live.
    live: usize,

    probe_order: Vec<u32>,
    probe_pos: usize,
    probe: Option<Probe>,
    next_probe_at: Instant,
    awareness: u32,
    next_seq: u32,
    relays: VecDeque<Relay>,

    suspicions: SlotMap<Suspicion>,
    suspicion_deadlines: BTreeSet<(Instant, u32)>,
    down_since: SlotMap<Instant>,
    reap_queue: BTreeSet<(Instant, u32)>,

    broadcasts: Broadcasts,
    next_gossip_at: Instant,
    next_push_pull_at: Instant,
    join: Option<Join>,
    /// Every seed ever given to `join` (bounded): one that is not a live
    /// member is contacted at each push-pull, so clusters that formed apart
    /// (a join during a partition) still merge.
    seeds: Vec<SocketAddr>,

    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    view_dirty: bool,
    stats: Stats,
    scratch_slots: Vec<u32>,
    deferred_acks: Vec<DeferredAck>,
    /// Relays asked for the probe in progress: their acks and nacks count.
    probe_relays: Vec<u32>,
    /// Claim checks in flight: (hash of the name, address asked, expiry).
    claim_checks: VecDeque<(u64, SocketAddr, Instant)>,
    /// Until then (shortly after our join was answered), a change of our
    /// ready flag or metadata goes straight to every member too: they
    /// learned us first-hand and would otherwise wait for the gossip.
    announce_until: Option<Instant>,
    /// Accusers already answered directly, for one incarnation of ours.
    told: (u64, Vec<u64>),
    /// Stale accusations already answered for a third member (accuser,
    /// member, incarnation hashed), oldest first, at most
    /// `MAX_STALE_ANSWERED`.
    stale_answered: VecDeque<u64>,
    /// Sequence numbers, slots and send times of last-chance pings to
    /// suspects (their acks are expected, not stray).
    checks: VecDeque<(u32, u32, Instant)>,
    /// Next ping to a dead member, and the one in flight (seq, slot, send
    /// time).
    next_reconnect_at: Instant,
    reconnect: Option<(u32, u32, Instant)>,
    /// Next round of witness pings (strategy `Witnesses`).
    next_witness_at: Instant,
    /// Lease evidence: contact and the reference set (`Membership::standing`).
    lease: Lease,
}

impl<R: Rng> std::fmt::Debug for Membership<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("local", &self.local)
            .field("members", &self.index.len())
            .field("live", &self.live)
            .field("awareness", &self.awareness)
            .field("broadcasts", &self.broadcasts.len())
            .finish_non_exhaustive()
    }
}

impl<R: Rng> Membership<R> {
    /// A node that knows only itself. Call [`join`](Self::join) with seed
    /// addresses, or [`bootstrap`](Self::bootstrap) with a snapshot.
    pub fn new(config: Config, local: LocalNode, mut rng: R, now: Instant) -> Result<Self, Error> {
        config.validate()?;
        if local.name.is_empty() || local.name.len() > config.max_name_len {
            return Err(Error::InvalidName {
                len: local.name.len(),
                max: config.max_name_len,
            });
        }
        if local.metadata.len() > config.max_metadata_len {
            return Err(Error::MetadataTooLarge {
                len: local.metadata.len(),
                max: config.max_metadata_len,
            });
        }
        let hasher = SeededState::new(rng.random());
        let empty_metadata: Arc<[u8]> = Arc::from(&[][..]);
        let metadata = if local.metadata.is_empty() {
            Arc::clone(&empty_metadata)
        } else {
            Arc::from(local.metadata)
        };
        let limits = Limits {
            max_len: config.max_state_size.max(config.max_packet_size),
            max_name_len: config.max_name_len,
            max_metadata_len: config.max_metadata_len,
            max_messages: wire::MAX_MESSAGES,
            max_states: config.max_members,
        };
        let jitter = |rng: &mut R, d: Duration| d.mul_f64(rng.random_range(0.0..1.0));
        let next_probe_at = later(now, jitter(&mut rng, config.probe_interval));
        let next_gossip_at = later(now, jitter(&mut rng, config.gossip_interval));
        let next_push_pull_at = later(now, jitter(&mut rng, config.push_pull_interval));
        let next_reconnect_at = later(now, jitter(&mut rng, config.reconnect_interval));
        let mut membership = Membership {
            limits,
            hasher,
            empty_metadata,
            local: Member {
                name: Arc::from(local.name),
                generation: local.generation,
                addr: local.addr,
                incarnation: 0,
                state: MemberState::Alive,
                ready: local.ready,
                metadata,
            },
            superseded: false,
            verdicts: VecDeque::new(),
            notices: SlotMap::default(),
            notice_pings: VecDeque::new(),
            members: Vec::new(),
            free: Vec::new(),
            index: NameIndex::new(hasher),
            live: 1,
            probe_order: Vec::new(),
            probe_pos: 0,
            probe: None,
            next_probe_at,
            awareness: 0,
            next_seq: rng.random(),
            relays: VecDeque::new(),
            suspicions: SlotMap::default(),
            suspicion_deadlines: BTreeSet::new(),
            down_since: SlotMap::default(),
            reap_queue: BTreeSet::new(),
            broadcasts: Broadcasts::default(),
            next_gossip_at,
            next_push_pull_at,
            join: None,
            seeds: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            view_dirty: true,
            stats: Stats::default(),
            scratch_slots: Vec::new(),
            deferred_acks: Vec::new(),
            probe_relays: Vec::new(),
            claim_checks: VecDeque::new(),
            announce_until: None,
            told: (0, Vec::new()),
            stale_answered: VecDeque::new(),
            checks: VecDeque::new(),
            next_reconnect_at,
            reconnect: None,
            next_witness_at: now,
            lease: Lease::new(
                config.lease,
                config.lease_period,
                config.takeover_delay(),
                now,
            ),
            config,
            rng,
        };
        membership.broadcast_local_alive();
        Ok(membership)
    }

    // ----- public API -------------------------------------------------------

    /// Contacts the seeds with a join push-pull (this node's state; each seed
    /// answers with its full state). Retried with backoff until some member
    /// answers. Rejoins after [`leave`](Self::leave).
    pub fn join(&mut self, seeds: &[SocketAddr], now: Instant) {
        if self.superseded {
            return;
        }
        if self.local.state == MemberState::Left {
            self.local.state = MemberState::Alive;
            self.local.incarnation = self.local.incarnation.saturating_add(1);
            self.live += 1;
            self.view_dirty = true;
            self.broadcast_local_alive();
            self.next_probe_at = now;
            info!(name = %self.local.name, incarnation = self.local.incarnation, "rejoining");
            self.update_standing(now);
        }
        let seeds: Vec<SocketAddr> = seeds
            .iter()
            .copied()
            .filter(|addr| *addr != self.local.addr)
            .collect();
        if seeds.is_empty() {
            return;
        }
        for seed in &seeds {
            if !self.seeds.contains(seed) && self.seeds.len() < MAX_SEEDS {
                self.seeds.push(*seed);
            }
        }
        self.join = Some(Join {
            seeds,
            next_at: now,
            delay: self.config.join_retry_interval,
        });
        self.fire_join(now);
    }

    /// Leaves gracefully: announces "left" (a dead message about itself) and
    /// stops probing. Keep driving the node for a few gossip intervals (until
    /// [`pending_broadcasts`](Self::pending_broadcasts) is 0) so the news
    /// spreads before the process exits.
    pub fn leave(&mut self, now: Instant) {
        if self.superseded || self.local.state != MemberState::Alive {
            return;
        }
        self.local.state = MemberState::Left;
        self.live = self.live.saturating_sub(1);
        self.probe = None;
        self.join = None;
        self.view_dirty = true;
        let msg = Message::Dead(Accusation {
            name: &self.local.name,
            generation: self.local.generation,
            incarnation: self.local.incarnation,
            from: &self.local.name,
        });
        let bytes = wire::encode_one(&msg);
        self.queue_broadcast(LOCAL_SLOT, bytes);
        self.emit(Event::Left(self.local.clone()));
        info!(name = %self.local.name, incarnation = self.local.incarnation, "leaving");
        self.next_gossip_at = now;
        self.fire_gossip(now);
        self.update_standing(now);
    }

    /// Announces this node ready (or not) to own datums.
    pub fn set_ready(&mut self, ready: bool, now: Instant) {
        if self.local.ready == ready {
            return;
        }
        self.local.ready = ready;
        self.local_changed();
        self.announce_if_joining(now);
    }

    /// Replaces this node's user metadata. More than `max_metadata_len` bytes
    /// is an error and changes nothing.
    pub fn set_metadata(&mut self, metadata: Vec<u8>, now: Instant) -> Result<(), Error> {
        if metadata.len() > self.config.max_metadata_len {
            return Err(Error::MetadataTooLarge {
                len: metadata.len(),
                max: self.config.max_metadata_len,
            });
        }
        if *self.local.metadata == *metadata {
            return Ok(());
        }
        self.local.metadata = if metadata.is_empty() {
            Arc::clone(&self.empty_metadata)
        } else {
            Arc::from(metadata)
        };
        self.local_changed();
        self.announce_if_joining(now);
        Ok(())
    }

    /// Right after a join, a change of ours goes straight to every member.
    fn announce_if_joining(&mut self, now: Instant) {
        if self.announce_until.is_some_and(|until| now < until) {
            self.announce_to_members();
        }
    }

    /// Handles one packet (unreliable or reliable) from `from`. A malformed
    /// or oversized packet is counted, dropped whole, and returned as an
    /// error; it changes nothing.
    ///
    /// `sender` is the name the transport authenticated for the peer (the
    /// name in its certificate), `None` if it has none. Claims only a member
    /// can make about itself (a ping's or push-pull's sender, a new
    /// generation or address, a leave, an acted-on notice) count only when
    /// they come from that member's own name; acks only from the member a
    /// ping went to or a relay that was asked. The rest is refused and
    /// counted (`Stats::forged_claims`, `acks_refused`, `relays_refused`,
    /// `incarnations_refused`, …; see `docs/membership.md`, "Identity").
    pub fn handle_packet(
        &mut self,
        from: SocketAddr,
        sender: Option<&str>,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(), DecodeError> {
        self.stats.packets_in += 1;
        self.stats.bytes_in += bytes.len() as u64;
        let mut msgs = Vec::new();
        if let Err(error) = wire::decode_packet(bytes, &self.limits, &mut msgs) {
            self.stats.decode_errors += 1;
            debug!(%from, %error, len = bytes.len(), "dropped malformed membership packet");
            return Err(error);
        }
        if self.superseded {
            return Ok(());
        }
        // A lease that lapsed before this packet: member changes below
        // must not move the frozen reference set.
        self.update_standing(now);
        let sender = sender.filter(|name| !name.is_empty());
        let mut push_pull: Option<PushPull<'_>> = None;
        for msg in msgs {
            self.stats.messages_in += 1;
            match msg {
                Message::Ping(ping) => self.on_ping(from, sender, &ping),
                Message::IndirectPing(req) => self.on_indirect_ping(from, sender, &req, now),
                Message::Ack(seq) => self.on_ack(from, sender, seq, now),
                Message::Nack(seq) => self.on_nack(sender, seq),
                Message::AliveRequest => self.on_alive_request(from),
                Message::Alive(alive) => {
                    let info = AliveInfo::from_wire(&alive);
                    if self.vet_alive(sender, &info, now) {
                        self.apply_alive(info, Mode::Announce, now);
                    }
                }
                Message::Suspect(acc) => {
                    if self.vet_accusation(sender, &acc, Mode::Announce, now) {
                        self.apply_suspect(&acc, Mode::Announce, now);
                    }
                }
                Message::Dead(acc) => {
                    if self.vet_accusation(sender, &acc, Mode::Announce, now) {
                        self.apply_dead(&acc, Mode::Announce, now);
                    }
                }
                Message::PushPull(header) => {
                    if sender != Some(header.from) {
                        // Someone else's state under this sender's name:
                        // refused whole, states and reply included.
                        self.stats.forged_claims += 1;
                        debug!(claimed = header.from, ?sender, %from, "refused a push-pull sent under another name");
                        continue;
                    }
                    self.stats.push_pulls_received += 1;
                    if header.join {
                        debug!(from = header.from, %from, "join request");
                    }
                    push_pull = Some(header);
                }
                Message::State(state) => {
                    if let Some(header) = push_pull {
                        // The answer to our join, from a seed we chose: the
                        // members it lists are taken as it says (the joiner
                        // needs the whole view at once, before it owns
                        // anything); any other state only first-hand.
                        let join_answer = !header.reply
                            && self.join.as_ref().is_some_and(|j| j.seeds.contains(&from));
                        self.merge_state(&state, header.from, join_answer, now);
                    }
                }
            }
        }
        // Acks leave after the whole packet was applied, so a refutation
        // triggered by a suspicion piggybacked on the ping rides on the ack.
        let acks = std::mem::take(&mut self.deferred_acks);
        for ack in &acks {
            self.send_ack(ack);
        }
        self.deferred_acks = acks;
        self.deferred_acks.clear();
        if let Some(header) = push_pull {
            // An answer from one of our seeds (not someone else's request,
            // e.g. a node joining through us, nor an answer from a node that
            // joined through us): the join is done.
            if !header.reply && self.join.as_ref().is_some_and(|j| j.seeds.contains(&from)) {
                self.join = None;
                self.announce_to_members();
                self.announce_until =
                    Some(later(now, self.config.probe_interval.saturating_mul(5)));
            }
            if header.reply && self.local.state.is_live() {
                self.send_state(from, false, false, now);
            }
            if !header.reply {
                // The answer to a push-pull of ours: contact.
                self.lease.pull_answered(from);
            }
        }
        self.update_standing(now);
        Ok(())
    }

    /// Runs every timer due at `now`: probes, indirect probes, suspicion
    /// timeouts, gossip, push-pull, join retries, reaping.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.superseded {
            return;
        }
        self.update_standing(now);
        self.fire_relays(now);
        self.fire_probe(now);
        // A node that left no longer judges anyone: its verdicts would make
        // members fence themselves for nothing.
        if self.local.state == MemberState::Alive {
            self.fire_suspicions(now);
        }
        self.fire_gossip(now);
        self.fire_push_pull(now);
        self.fire_reconnect(now);
        self.fire_witnesses(now);
        self.fire_join(now);
        self.fire_reap(now);
        self.update_standing(now);
    }

    /// The next packet to send, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next event, if any. Individual events first; then the coalesced
    /// `ViewChanged`, built from the current state.
    pub fn poll_event(&mut self) -> Option<Event> {
        if let Some(event) = self.events.pop_front() {
            return Some(event);
        }
        if self.view_dirty {
            self.view_dirty = false;
            if self.config.view_events {
                return Some(Event::ViewChanged(self.live_members().cloned().collect()));
            }
        }
        None
    }

    /// When [`handle_timeout`](Self::handle_timeout) must next be called
    /// (possibly already past). `None` once this node lost its name.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.superseded {
            return None;
        }
        let live = self.local.state.is_live();
        let candidates = [
            (live && self.probe.is_none()).then_some(self.next_probe_at),
            self.probe.map(|p| {
                if p.indirect_sent {
                    p.deadline
                } else {
                    p.indirect_at
                }
            }),
            (!self.broadcasts.is_empty()).then_some(self.next_gossip_at),
            live.then_some(self.next_push_pull_at),
            (live && !(self.down_since.is_empty() && self.notices.is_empty()))
                .then_some(self.next_reconnect_at),
            self.suspicion_deadlines
                .first()
                .filter(|_| self.local.state == MemberState::Alive)
                .map(|(at, _)| *at),
            self.relays.front().map(|r| r.nack_at),
            self.reap_queue.first().map(|(at, _)| *at),
            self.join.as_ref().map(|j| j.next_at),
            self.lease.expiry(),
            (self.local.state == MemberState::Alive
                && self.lease.strategy == LeaseStrategy::Witnesses)
                .then_some(self.next_witness_at),
        ];
        candidates.into_iter().flatten().min()
    }

    /// Every member known, this node first, in any state (dead and left
    /// members until they are reaped).
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        std::iter::once(&self.local).chain(self.members.iter().flatten())
    }

    /// Alive and suspect members, this node included while it is live: the
    /// view `ViewChanged` carries.
    pub fn live_members(&self) -> impl Iterator<Item = &Member> {
        self.members().filter(|m| m.state.is_live())
    }

    /// A member by name (this node included).
    pub fn member(&self, name: &str) -> Option<&Member> {
        if name == &*self.local.name {
            return Some(&self.local);
        }
        self.index
            .get(name, &self.members)
            .and_then(|slot| self.slot(slot))
    }

    /// Number of alive and suspect members, this node included while live.
    pub fn num_live(&self) -> usize {
        self.live
    }

    /// This node as it announces itself.
    pub fn local(&self) -> &Member {
        &self.local
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The Lifeguard local health score, 0 (healthy) to `awareness_max − 1`.
    /// The probe interval is multiplied by score + 1.
    pub fn awareness(&self) -> u32 {
        self.awareness
    }

    /// Updates waiting to be piggybacked (0 once a leave has been fully
    /// gossiped).
    pub fn pending_broadcasts(&self) -> usize {
        self.broadcasts.len()
    }

    /// Whether another process won this node's name: the node no longer
    /// announces itself, answers nothing, and should be shut down.
    pub fn is_superseded(&self) -> bool {
        self.superseded
    }

    /// Whether this node may act as an owner at `now`, and until when or why
    /// not: fresh contact (an acknowledged ping sent within
    /// `lease_period`) and, with the `Majority` strategy, a strict majority
    /// of the reference set held alive (see `docs/membership.md`, "Lease").
    /// `Event::StandingChanged` reports each change of validity; the expiry
    /// of a valid lease is folded into [`poll_timeout`](Self::poll_timeout).
    pub fn standing(&self, now: Instant) -> Standing {
        let active = self.local.state == MemberState::Alive && !self.superseded;
        let base = self.lease.evaluate(now, active, || {
            let oldest = self.lease.oldest.unwrap_or_else(|| self.oldest_in_ref());
            self.holds(oldest)
        });
        self.lease.hysteresis(base, now)
    }

    /// How long after this node's own dead verdict about a member it must
    /// wait before taking that member's datums: by then the member has lost
    /// its lease ([`Config::takeover_delay`]).
    pub fn takeover_delay(&self) -> Duration {
        self.config.takeover_delay()
    }

    /// The witness set of strategy [`LeaseStrategy::Witnesses`] (empty with
    /// the others), lowest witness rank first: this node if it is one, and
    /// the members it must reach. A witness reaped while the set was frozen
    /// (or, in a set inherited from a previous generation, this node's
    /// previous generation and the witnesses not in the member table yet)
    /// is not listed, but still counts against the majority.
    pub fn witnesses(&self) -> impl Iterator<Item = &Member> {
        self.lease
            .witnesses
            .list
            .iter()
            .filter(|_| self.lease.strategy == LeaseStrategy::Witnesses)
            .filter_map(|w| match w.id {
                WitnessId::Local => Some(&self.local),
                WitnessId::Slot(slot) => self.slot(slot),
                WitnessId::Gone | WitnessId::Unknown => None,
            })
    }

    /// This node's witness set by name, for a new generation of it started
    /// in the same process ([`inherit_lease`](Self::inherit_lease)): taken
    /// from a node declared dead, before it is replaced. Empty with a
    /// strategy other than `Witnesses`.
    pub fn lease_evidence(&self) -> LeaseEvidence {
        if self.lease.strategy != LeaseStrategy::Witnesses {
            return LeaseEvidence::default();
        }
        let w = &self.lease.witnesses;
        let witnesses = w
            .list
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let name = match x.id {
                    WitnessId::Local => Some(Arc::clone(&self.local.name)),
                    WitnessId::Slot(slot) => self.slot(slot).map(|m| Arc::clone(&m.name)),
                    WitnessId::Unknown => w
                        .inherited
                        .iter()
                        .find(|(at, _)| *at == i)
                        .map(|(_, name)| Arc::clone(name)),
                    WitnessId::Gone => None,
                };
                (name, x.rank)
            })
            .collect();
        LeaseEvidence {
            name: Some(Arc::clone(&self.local.name)),
            witnesses,
        }
    }

    /// Starts this node, a new generation of a process declared dead, with
    /// its predecessor's witness set ([`lease_evidence`](Self::lease_evidence)
    /// of the old `Membership`), frozen until this node's lease has been
    /// valid once; call right after [`new`](Self::new), before `join`. Its
    /// witnesses are known by name: one not in the member table (yet), and
    /// the predecessor itself (a dead generation), count as unreachable. A
    /// new process instead draws its witnesses from the members it sees
    /// alive, which inside a cut-off piece are only that piece's.
    ///
    /// Returns whether the evidence was taken. It is not (the node starts as
    /// a new process does) if it is empty, from another name, the strategy
    /// is not `Witnesses`, this node's lease was already valid, or its
    /// remote witnesses could never be a strict majority of it (a witness
    /// set of one: the predecessor itself).
    pub fn inherit_lease(&mut self, evidence: LeaseEvidence, now: Instant) -> bool {
        let own = &self.local.name;
        let remote = evidence
            .witnesses
            .iter()
            .filter(|(name, _)| name.as_ref().is_some_and(|n| n != own))
            .count();
        if self.lease.strategy != LeaseStrategy::Witnesses
            || evidence.name.as_ref() != Some(own)
            || !self.lease.starting()
            || self.lease.reported
            || 2 * remote <= evidence.witnesses.len()
        {
            return false;
        }
        let w = &mut self.lease.witnesses;
        w.list.clear();
        w.inherited.clear();
        w.entered.clear();
        w.stale = false;
        for (i, (name, rank)) in evidence.witnesses.into_iter().enumerate() {
            w.list.push(crate::lease::Witness {
                id: WitnessId::Gone,
                rank,
                acked: None,
                pinged: None,
            });
            if let Some(name) = name.filter(|n| n != own) {
                w.inherited.push((i, name));
            }
        }
        self.resolve_inherited();
        info!(name = %self.local.name, witnesses = self.lease.witnesses.list.len(),
            "inherited the previous generation's witness set");
        self.update_standing(now);
        true
    }

    /// Finds the members of an inherited witness set in the member table
    /// (by name, whatever their generation: a witness is a place on the
    /// network); one that is not there, or whose slot changed, has not
    /// answered yet.
    fn resolve_inherited(&mut self) {
        let (index, members) = (&self.index, &self.members);
        let w = &mut self.lease.witnesses;
        for (i, name) in &w.inherited {
            let id = index
                .get(name, members)
                .map_or(WitnessId::Unknown, WitnessId::Slot);
            if let Some(x) = w.list.get_mut(*i)
                && x.id != id
            {
                x.id = id;
                x.acked = None;
                x.pinged = None;
            }
        }
    }

    /// For simulators and restarts: merges a member snapshot as push-pull
    /// would, silently (no per-member events, nothing re-broadcast; one
    /// `ViewChanged` follows). Unknown members are inserted in the state
    /// given (a suspect one as alive); known ones follow the usual precedence
    /// rules. Entries about this node are ignored. Names and metadata are
    /// shared with the snapshot, not copied.
    pub fn bootstrap(&mut self, members: impl IntoIterator<Item = Member>, now: Instant) {
        let members = members.into_iter();
        let expected = members.size_hint().0;
        self.members.reserve(expected);
        self.index.reserve(expected, &self.members);
        for member in members {
            if member.name == self.local.name {
                continue;
            }
            if member.name.is_empty() || member.name.len() > self.config.max_name_len {
                continue;
            }
            if member.metadata.len() > self.config.max_metadata_len {
                continue;
            }
            let info = AliveInfo::from_member(&member);
            match (self.index.get(&member.name, &self.members), member.state) {
                (None, MemberState::Alive | MemberState::Suspect) => {
                    self.apply_alive(info, Mode::Quiet, now);
                }
                (None, state @ (MemberState::Dead | MemberState::Left)) => {
                    self.insert_down(info, state, now);
                }
                (Some(_), MemberState::Alive) => self.apply_alive(info, Mode::Quiet, now),
                (Some(_), state) => {
                    let from = if state == MemberState::Left {
                        Arc::clone(&member.name)
                    } else {
                        Arc::clone(&self.local.name)
                    };
                    let acc = Accusation {
                        name: &member.name,
                        generation: member.generation,
                        incarnation: member.incarnation,
                        from: &from,
                    };
                    if state == MemberState::Left {
                        self.apply_dead(&acc, Mode::Quiet, now);
                    } else {
                        self.apply_suspect(&acc, Mode::Quiet, now);
                    }
                }
            }
        }
        self.view_dirty = true;
        // Spread the first push-pull over the (size-scaled) interval, so nodes
        // bootstrapped together do not all exchange state at once.
        let interval = push_pull_scale(self.config.push_pull_interval, self.live);
        self.next_push_pull_at = later(now, interval.mul_f64(self.rng.random_range(0.0..1.0)));
    }

    // ----- lease ------------------------------------------------------------

    /// Re-judges the lease at `now`: the reference set follows the view
    /// again once the lease is valid (rebuilt from it on the way back), and
    /// a change of validity is reported.
    fn update_standing(&mut self, now: Instant) {
        if self.lease.strategy == LeaseStrategy::Off {
            return;
        }
        self.lease.clock = self.lease.clock.max(now);
        let longest_suspicion = suspicion_min(
            self.config.suspicion_mult,
            self.live,
            self.config.probe_interval,
        )
        .saturating_mul(self.config.suspicion_max_mult);
        self.lease.linger = self.lease.settle.saturating_add(longest_suspicion);
        if self.lease.tracking {
            let members = &self.members;
            self.lease.settle_deaths(|slot| {
                members
                    .get(slot as usize)
                    .and_then(Option::as_ref)
                    .map(|m| m.state)
            });
        }
        self.refresh_witnesses();
        let mut standing = self.judge(now);
        if standing.is_valid() && !self.lease.reported {
            // Back after a lapse (or at start): the evidence must hold for
            // the takeover delay first.
            self.lease.returning_since.get_or_insert(now);
            standing = self.lease.hysteresis(standing, now);
        } else if !standing.is_valid() {
            self.lease.returning_since = None;
        }
        if standing.is_valid() && !self.lease.tracking {
            let members = self.members.iter().enumerate().map(|(slot, m)| {
                (
                    u32::try_from(slot).unwrap_or(u32::MAX),
                    m.as_ref().map(|m| m.state),
                )
            });
            self.lease.thaw(members);
            self.lease.tracking = true;
            self.refresh_witnesses();
            standing = self.judge(now);
        }
        let valid = standing.is_valid();
        if !valid {
            self.lease.freeze();
        } else {
            self.lease.returning_since = None;
        }
        self.lease.tracking = valid;
        if valid != self.lease.reported {
            self.lease.reported = valid;
            if valid {
                info!(name = %self.local.name, ?standing, "lease valid");
            } else {
                self.lease.lapsed_at = Some(now);
                self.stats.standing_lost += 1;
                warn!(name = %self.local.name, ?standing, "lease lapsed: this node may not act as an owner");
            }
            self.emit(Event::StandingChanged(standing));
        }
    }

    /// Brings the witness set up to date with `R` (or, before the first
    /// valid lease, with the live view); frozen `R`, frozen set.
    fn refresh_witnesses(&mut self) {
        if self.lease.strategy != LeaseStrategy::Witnesses {
            return;
        }
        let starting = self.lease.starting();
        if !self.lease.tracking && !starting {
            return;
        }
        let n = if starting {
            self.live.max(1)
        } else {
            self.lease.reference_size()
        };
        let size = witness_set_size(n);
        let w = &self.lease.witnesses;
        if !w.stale && w.list.len() == size {
            if w.entered.is_empty() {
                return;
            }
            if !starting {
                let entered = std::mem::take(&mut self.lease.witnesses.entered);
                for &slot in &entered {
                    if !self.lease.in_ref(slot) {
                        continue;
                    }
                    if let Some(m) = self.slot(slot) {
                        let rank = witness_rank(&m.name, m.generation);
                        self.lease.witnesses.merge(slot, rank);
                    }
                }
                self.lease.witnesses.entered = entered;
                self.lease.witnesses.entered.clear();
                if !self.lease.witnesses.stale {
                    return;
                }
            }
        }
        let local = (
            WitnessId::Local,
            witness_rank(&self.local.name, self.local.generation),
        );
        let lease = &self.lease;
        let remote = self.members.iter().enumerate().filter_map(|(slot, m)| {
            let m = m.as_ref()?;
            let slot = u32::try_from(slot).ok()?;
            let candidate = if starting {
                m.state.is_live()
            } else {
                lease.in_ref(slot)
            };
            candidate.then(|| (WitnessId::Slot(slot), witness_rank(&m.name, m.generation)))
        });
        let candidates: Vec<(WitnessId, u64)> = std::iter::once(local).chain(remote).collect();
        self.lease.witnesses.rebuild(candidates.into_iter(), size);
    }

    /// A ping to `slot`, sent at `sent_at`, was acknowledged from `from`:
    /// a witness's answer if it came from the witness itself (an answer
    /// forwarded by a relay proves the relay reaches it, not this node).
    fn witness_acked(&mut self, slot: u32, from: SocketAddr, sent_at: Instant) {
        if self.lease.strategy == LeaseStrategy::Witnesses
            && self.slot(slot).is_some_and(|m| m.addr == from)
        {
            self.lease.witnesses.acked(slot, sent_at);
        }
    }

    /// Pings the witnesses whose last answer is getting old (strategy
    /// `Witnesses`), once per probe interval: each is due half a lease
    /// period after the send time of the ping it last answered, and again a
    /// probe interval after an unanswered witness ping; at most
    /// `⌈remote witnesses × probe interval / (lease_period / 2)⌉ + 1` per
    /// round, the longest unpinged first, so the pings spread evenly. Plain
    /// pings with their own sequence numbers (any member answers them),
    /// without piggybacked updates.
    fn fire_witnesses(&mut self, now: Instant) {
        if self.lease.strategy != LeaseStrategy::Witnesses || now < self.next_witness_at {
            return;
        }
        self.next_witness_at = later(now, self.config.probe_interval);
        if self.local.state != MemberState::Alive {
            return;
        }
        let period = self.config.lease_period;
        let refresh = period / 2;
        // An unanswered witness ping is retried at the next round: with
        // `lease_period` a few probe intervals long, waiting longer would
        // let one lost datagram expire the witness's last answer.
        let retry = self.config.probe_interval;
        let remote = self
            .lease
            .witnesses
            .list
            .iter()
            .filter(|w| matches!(w.id, WitnessId::Slot(_)))
            .count();
        if remote == 0 {
            return;
        }
        let per_round = self.config.probe_interval.as_nanos() * remote as u128;
        let budget = per_round.div_ceil(refresh.as_nanos().max(1)) as usize + 1;
        for _ in 0..budget {
            let due = self
                .lease
                .witnesses
                .list
                .iter()
                .filter_map(|w| match w.id {
                    WitnessId::Slot(slot) => Some((slot, w)),
                    _ => None,
                })
                .filter(|(_, w)| {
                    w.acked.is_none_or(|a| now >= later(a, refresh))
                        && w.pinged.is_none_or(|p| now >= later(p, retry))
                })
                .min_by_key(|(_, w)| w.pinged)
                .map(|(slot, _)| slot);
            let Some(slot) = due else {
                break;
            };
            self.send_witness_ping(slot, now);
        }
    }

    fn send_witness_ping(&mut self, slot: u32, now: Instant) {
        let seq = self.next_seq();
        self.lease.witnesses.ping_sent(seq, slot, now);
        let Some(m) = self.slot(slot) else {
            return;
        };
        let mut buf = self.new_packet();
        wire::encode(
            &ping_msg(&self.local, seq, &m.name, m.generation, false),
            &mut buf,
        );
        let addr = m.addr;
        self.stats.witness_pings += 1;
        // No piggybacked updates: the same few witnesses would use up each
        // update's retransmissions, and fewer members would hear it (the
        // witnesses' acks, to every member, carry updates instead).
        self.send(addr, false, buf);
    }

    /// The lease at `now`, caching the oldest member of the reference set.
    fn judge(&mut self, now: Instant) -> Standing {
        let active = self.local.state == MemberState::Alive && !self.superseded;
        let holds = if self.lease.needs_oldest() {
            let oldest = match self.lease.oldest {
                Some(oldest) => oldest,
                None => {
                    let oldest = self.oldest_in_ref();
                    self.lease.oldest = Some(oldest);
                    oldest
                }
            };
            self.holds(oldest)
        } else {
            false
        };
        self.lease.evaluate(now, active, || holds)
    }

    /// The oldest member of the reference set by (generation, name), the
    /// placement order: `None` for this node. O(N).
    fn oldest_in_ref(&self) -> Option<u32> {
        let mut best: (u64, &str, Option<u32>) = (self.local.generation, &self.local.name, None);
        for (slot, m) in self.members.iter().enumerate() {
            let (Some(m), Ok(slot)) = (m, u32::try_from(slot)) else {
                continue;
            };
            if self.lease.in_ref(slot) && (m.generation, &*m.name) < (best.0, best.1) {
                best = (m.generation, &m.name, Some(slot));
            }
        }
        best.2
    }

    /// Whether this node holds `oldest` (itself, or a member held alive).
    fn holds(&self, oldest: Option<u32>) -> bool {
        match oldest {
            None => true,
            Some(slot) => self
                .slot(slot)
                .is_some_and(|m| m.state == MemberState::Alive),
        }
    }

    /// The member in `slot` changed state (`None`: none there).
    fn note(&mut self, slot: u32, was: Option<MemberState>, now: Option<MemberState>) {
        if was != now {
            self.lease.member_changed(slot, was, now);
        }
        if (was.is_none() || now.is_none()) && self.lease.inherited() {
            // A member entered the table or was reaped from it.
            self.resolve_inherited();
        }
    }

    // ----- members table ----------------------------------------------------

    fn slot(&self, slot: u32) -> Option<&Member> {
        self.members.get(slot as usize).and_then(Option::as_ref)
    }

    fn slot_mut(&mut self, slot: u32) -> Option<&mut Member> {
        self.members.get_mut(slot as usize).and_then(Option::as_mut)
    }

    fn insert_member(&mut self, member: Member) -> u32 {
        let live = member.state.is_live();
        let state = member.state;
        let slot = match self.free.pop() {
            Some(slot) => {
                if let Some(entry) = self.members.get_mut(slot as usize) {
                    *entry = Some(member);
                }
                slot
            }
            None => {
                let slot = u32::try_from(self.members.len()).unwrap_or(LOCAL_SLOT - 1);
                self.members.push(Some(member));
                slot
            }
        };
        self.index.insert(slot, &self.members);
        self.note(slot, None, Some(state));
        if live {
            self.add_to_probe_order(slot);
        }
        slot
    }

    /// New members are probed in the current round, at a random place.
    fn add_to_probe_order(&mut self, slot: u32) {
        self.probe_order.push(slot);
        let len = self.probe_order.len();
        if self.probe_pos < len {
            let at = self.rng.random_range(self.probe_pos..len);
            self.probe_order.swap(at, len - 1);
        }
    }

    fn insert_down(&mut self, info: AliveInfo<'_>, state: MemberState, now: Instant) {
        if !self.room_for_member() {
            return;
        }
        let member = Member {
            name: info.name.to_arc(),
            generation: info.generation,
            addr: info.addr,
            incarnation: info.incarnation,
            state,
            ready: info.ready,
            metadata: info.metadata.to_arc(&self.empty_metadata),
        };
        let slot = self.insert_member(member);
        self.mark_down(slot, now);
    }

    fn mark_down(&mut self, slot: u32, now: Instant) {
        if let Some(old) = self.down_since.insert(slot, now) {
            self.reap_queue
                .remove(&(later(old, self.config.reap_after), slot));
        }
        self.reap_queue
            .insert((later(now, self.config.reap_after), slot));
    }

    fn clear_down(&mut self, slot: u32) {
        if let Some(old) = self.down_since.remove(&slot) {
            self.reap_queue
                .remove(&(later(old, self.config.reap_after), slot));
        }
    }

    fn clear_suspicion(&mut self, slot: u32) {
        if let Some(s) = self.suspicions.remove(&slot) {
            self.suspicion_deadlines.remove(&(s.deadline, slot));
        }
    }

    fn remove_member(&mut self, slot: u32) {
        let Some(member) = self.members.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        self.index.remove(&member.name, slot);
        self.note(slot, Some(member.state), None);
        self.free.push(slot);
        self.notices.remove(&slot);
        self.broadcasts.remove(slot);
        self.clear_suspicion(slot);
        self.clear_down(slot);
        if member.state.is_live() {
            self.live = self.live.saturating_sub(1);
        }
        if self.probe.is_some_and(|p| p.slot == slot) {
            self.probe = None;
        }
        self.stats.reaped += 1;
        debug!(member = %member.name, generation = member.generation, "reaped");
    }

    // ----- outputs ----------------------------------------------------------

    fn emit(&mut self, event: Event) {
        if self.events.len() >= self.config.max_queued_events {
            self.events.pop_front();
            self.stats.events_dropped += 1;
        }
        self.events.push_back(event);
    }

    fn send(&mut self, to: SocketAddr, reliable: bool, payload: Vec<u8>) {
        if self.transmits.len() >= self.config.max_queued_transmits {
            self.stats.transmits_dropped += 1;
            return;
        }
        if reliable {
            self.stats.reliable_out += 1;
            self.stats.reliable_bytes_out += payload.len() as u64;
        } else {
            self.stats.packets_out += 1;
            self.stats.bytes_out += payload.len() as u64;
        }
        self.transmits.push_back(Transmit {
            to,
            reliable,
            payload,
        });
    }

    fn retransmit_limit(&self) -> u32 {
        retransmit_limit(self.config.retransmit_mult, self.live.max(1))
    }

    fn new_packet(&self) -> Vec<u8> {
        wire::new_packet(self.config.max_packet_size)
    }

    /// Adds piggybacked updates to an unreliable packet and queues it.
    fn finish_unreliable(&mut self, to: SocketAddr, mut buf: Vec<u8>) {
        let limit = self.retransmit_limit();
        self.broadcasts
            .fill(&mut buf, self.config.max_packet_size, limit);
        self.send(to, false, buf);
    }

    fn send_ack(&mut self, ack: &DeferredAck) {
        let mut buf = self.new_packet();
        wire::encode(&Message::Ack(ack.seq), &mut buf);
        match ack.extra {
            AckExtra::Nothing => {}
            AckExtra::AskAlive => {
                self.stats.alive_requests += 1;
                wire::encode(&Message::AliveRequest, &mut buf);
            }
            AckExtra::Accuse(slot) => {
                if let Some(m) = self.slot(slot) {
                    let acc = Accusation {
                        name: &m.name,
                        generation: m.generation,
                        incarnation: m.incarnation,
                        from: &self.local.name,
                    };
                    match m.state {
                        MemberState::Suspect => wire::encode(&Message::Suspect(acc), &mut buf),
                        MemberState::Dead => wire::encode(&Message::Dead(acc), &mut buf),
                        MemberState::Alive | MemberState::Left => {}
                    }
                }
            }
            AckExtra::Notice(slot) => {
                self.append_notice(slot, &mut buf);
            }
        }
        if ack.reliable {
            self.send(ack.to, true, buf);
        } else {
            self.finish_unreliable(ack.to, buf);
        }
    }

    /// What to tell a pinger about itself: ask for its `Alive` if our record
    /// of it is missing or older, or tell it we hold it suspect or dead.
    fn pinger_extra(&self, ping: &Ping<'_>) -> AckExtra {
        if ping.from == &*self.local.name {
            return AckExtra::Nothing;
        }
        let Some(slot) = self.index.get(ping.from, &self.members) else {
            return AckExtra::AskAlive;
        };
        let Some(record) = self.slot(slot) else {
            return AckExtra::AskAlive;
        };
        let newer =
            (ping.from_generation, ping.from_incarnation) > (record.generation, record.incarnation);
        if newer {
            return AckExtra::AskAlive;
        }
        if ping.from_generation == record.generation
            && matches!(record.state, MemberState::Suspect | MemberState::Dead)
        {
            return AckExtra::Accuse(slot);
        }
        if self.notices.contains_key(&slot) {
            return AckExtra::Notice(slot);
        }
        AckExtra::Nothing
    }

    /// A member asked for our `Alive` (it did not know us, or an older us).
    ///
    /// Also how a claim a third party made about us is checked: our answer
    /// counts first-hand. Having left, we answer with our leave instead, so
    /// a relayed leave is confirmed by us.
    fn on_alive_request(&mut self, from: SocketAddr) {
        let mut buf = self.new_packet();
        match self.local.state {
            MemberState::Alive => {
                wire::encode(&Message::Alive(alive_of(&self.local)), &mut buf);
            }
            MemberState::Left if !self.superseded => wire::encode(
                &Message::Dead(Accusation {
                    name: &self.local.name,
                    generation: self.local.generation,
                    incarnation: self.local.incarnation,
                    from: &self.local.name,
                }),
                &mut buf,
            ),
            MemberState::Suspect | MemberState::Dead | MemberState::Left => return,
        }
        self.finish_unreliable(from, buf);
    }

    fn queue_broadcast(&mut self, slot: u32, bytes: Vec<u8>) {
        self.stats.broadcasts_queued += 1;
        self.broadcasts.push(slot, bytes);
    }

    fn broadcast_local_alive(&mut self) {
        let bytes = wire::encode_one(&Message::Alive(alive_of(&self.local)));
        self.queue_broadcast(LOCAL_SLOT, bytes);
    }

    fn broadcast_alive(&mut self, slot: u32) {
        let Some(member) = self.slot(slot) else {
            return;
        };
        let bytes = wire::encode_one(&Message::Alive(alive_of(member)));
        self.queue_broadcast(slot, bytes);
    }

    fn local_changed(&mut self) {
        self.view_dirty = self.view_dirty || self.local.state.is_live();
        if self.local.state != MemberState::Alive || self.superseded {
            return;
        }
        self.local.incarnation = self.local.incarnation.saturating_add(1);
        self.broadcast_local_alive();
        self.emit(Event::Updated(self.local.clone()));
    }

    // ----- identity: who may say what -------------------------------------

    /// Whether an `Alive` may be applied, given who sent it. The member
    /// itself (`sender` is its name) may announce anything about itself. A
    /// third party may relay what does not change the member's identity:
    /// the same generation and address, at an incarnation at most
    /// `MAX_INCARNATION_STEP` above the known one (a refutation or an
    /// update; one the member did not make it answers by refuting). A new
    /// member, generation or address from a third party is not applied but
    /// checked: the member is asked at the claimed address for its own
    /// `Alive`, which then counts first-hand.
    fn vet_alive(&mut self, sender: Option<&str>, info: &AliveInfo<'_>, now: Instant) -> bool {
        let name = info.name.as_str();
        if sender == Some(name) {
            return true;
        }
        if name == &*self.local.name {
            if info.generation < self.local.generation {
                return true; // an older process of ours: re-announced
            }
            if info.generation == self.local.generation && info.addr == self.local.addr {
                return self.incarnation_ok(info.incarnation, self.local.incarnation);
            }
            // Another process under our name: only its own word counts (a
            // restart of this node on another address). Ask it; if the
            // address is ours, nobody else can be there.
            self.stats.forged_claims += 1;
            debug!(?sender, generation = info.generation, addr = %info.addr, "refused another identity of this node from a third party");
            if info.addr != self.local.addr {
                self.check_claim(name, info.addr, now);
            }
            return false;
        }
        let Some(record) = self
            .index
            .get(name, &self.members)
            .and_then(|slot| self.slot(slot))
        else {
            if self.room_for_member() {
                self.check_claim(name, info.addr, now);
            }
            return false;
        };
        let (generation, addr, incarnation) = (record.generation, record.addr, record.incarnation);
        if info.generation < generation {
            return true; // stale: ignored by the precedence rules
        }
        if info.generation > generation || info.addr != addr {
            self.check_claim(name, info.addr, now);
            return false;
        }
        self.incarnation_ok(info.incarnation, incarnation)
    }

    /// Whether this node's dead verdict about a member, reached at
    /// `down_since`, may have been acted on by the layers above: it stood for
    /// the takeover delay, and this node's lease was valid at some instant
    /// since then (a node takes datums over only while its lease is valid).
    /// A node that was cut off into a minority reaches verdicts about the
    /// majority's members while its lease has lapsed; after the heal those
    /// members refute, and must not be told a verdict was acted on that
    /// never was (they would fence for nothing: the heal storm).
    fn acted_on(&self, down_since: Option<Instant>, now: Instant) -> bool {
        let Some(since) = down_since else {
            // No record of when: assume it was.
            return true;
        };
        let Some(takeover) = since.checked_add(self.config.takeover_delay()) else {
            return false;
        };
        if now < takeover {
            return false;
        }
        if self.lease.strategy == LeaseStrategy::Off {
            return true;
        }
        self.lease.reported
            || self.standing(now).is_valid()
            || self
                .lease
                .lapsed_at
                .is_some_and(|lapsed| lapsed >= takeover)
    }

    /// Whether a suspicion or death verdict may be applied, given who sent
    /// it. Anyone may accuse a member at an incarnation it can refute (at
    /// most `MAX_INCARNATION_STEP` above the known one). A leave counts only
    /// from the member itself; relayed, the member is asked (a member that
    /// left answers with its leave) and the relay's word counts as a
    /// suspicion by the relay (the member refutes it if it did not leave;
    /// if it left and stopped, the relays confirm one another and it is
    /// declared dead after the minimal suspicion timeout). An acted-on
    /// notice counts only from its author.
    fn vet_accusation(
        &mut self,
        sender: Option<&str>,
        acc: &Accusation<'_>,
        mode: Mode,
        now: Instant,
    ) -> bool {
        let left = acc.from == acc.name;
        if acc.name == &*self.local.name {
            if acc.incarnation == wire::ACTED_ON {
                if sender == Some(acc.from) && !left {
                    return true;
                }
                self.stats.forged_claims += 1;
                debug!(
                    ?sender,
                    accuser = acc.from,
                    "refused an acted-on notice not sent by its author"
                );
                return false;
            }
            return self.incarnation_ok(acc.incarnation, self.local.incarnation);
        }
        if acc.incarnation == wire::ACTED_ON {
            self.stats.incarnations_refused += 1;
            return false;
        }
        let Some(record) = self
            .index
            .get(acc.name, &self.members)
            .and_then(|slot| self.slot(slot))
        else {
            return true; // ignored by the precedence rules
        };
        let (addr, incarnation, state) = (record.addr, record.incarnation, record.state);
        if left && sender != Some(acc.name) {
            if state.is_live()
                && acc.generation == record.generation
                && self.incarnation_ok(acc.incarnation, incarnation)
            {
                self.check_claim(acc.name, addr, now);
                if let Some(relay) = sender {
                    let suspicion = Accusation {
                        from: relay,
                        ..*acc
                    };
                    self.apply_suspect(&suspicion, mode, now);
                }
            }
            return false;
        }
        self.incarnation_ok(acc.incarnation, incarnation)
    }

    /// Whether a third party's incarnation is within reach of the known one;
    /// counts a refusal.
    fn incarnation_ok(&mut self, claimed: u64, known: u64) -> bool {
        if claimed > known.saturating_add(MAX_INCARNATION_STEP) {
            self.stats.incarnations_refused += 1;
            debug!(claimed, known, "refused an incarnation out of reach");
            return false;
        }
        true
    }

    /// Whether one more member fits under `max_members`; counts a refusal.
    fn room_for_member(&mut self) -> bool {
        // The local node counts as one.
        if self.index.len() + 1 >= self.config.max_members {
            self.stats.members_refused += 1;
            return false;
        }
        true
    }

    /// Asks `name` at `addr` for its own `Alive` (the answer counts
    /// first-hand), once per name and address while a check is in flight.
    fn check_claim(&mut self, name: &str, addr: SocketAddr, now: Instant) {
        if addr == self.local.addr || self.local.state != MemberState::Alive {
            return;
        }
        while self.claim_checks.front().is_some_and(|c| c.2 <= now) {
            self.claim_checks.pop_front();
        }
        let key = self.hasher.hash_str(name);
        if self.claim_checks.iter().any(|c| c.0 == key && c.1 == addr) {
            return;
        }
        if self.claim_checks.len() >= MAX_CLAIM_CHECKS {
            self.stats.claim_checks_dropped += 1;
            return;
        }
        // Long enough for a round trip, short enough that a lost answer is
        // asked again at the next gossip of the claim.
        let expiry = later(now, self.config.probe_interval.saturating_mul(5));
        self.claim_checks.push_back((key, addr, expiry));
        self.stats.claims_checked += 1;
        let mut buf = self.new_packet();
        wire::encode(&Message::AliveRequest, &mut buf);
        self.finish_unreliable(addr, buf);
    }

    // ----- precedence rules -------------------------------------------------

    fn apply_alive(&mut self, info: AliveInfo<'_>, mode: Mode, now: Instant) {
        if info.name.as_str() == &*self.local.name {
            self.alive_about_self(&info);
            return;
        }
        let Some(slot) = self.index.get(info.name.as_str(), &self.members) else {
            if !self.room_for_member() {
                return;
            }
            let member = Member {
                name: info.name.to_arc(),
                generation: info.generation,
                addr: info.addr,
                incarnation: info.incarnation,
                state: MemberState::Alive,
                ready: info.ready,
                metadata: info.metadata.to_arc(&self.empty_metadata),
            };
            let slot = self.insert_member(member);
            self.live += 1;
            self.view_dirty = true;
            if mode.announces() {
                if let Some(m) = self.slot(slot) {
                    debug!(member = %m.name, generation = m.generation, incarnation = m.incarnation, addr = %m.addr, "joined");
                    self.emit(Event::Joined(m.clone()));
                }
                self.broadcast_alive(slot);
            }
            return;
        };
        let Some(record) = self.slot(slot) else {
            return;
        };
        let (generation, incarnation, addr, state) = (
            record.generation,
            record.incarnation,
            record.addr,
            record.state,
        );
        let down_since = self.down_since.get(&slot).copied();
        if info.generation < generation {
            self.stats.ignored_updates += 1;
            return;
        }
        if info.generation > generation {
            self.replace_identity(slot, info, mode, now);
            return;
        }
        if info.addr != addr && state.is_live() {
            // Two live processes claim one (name, generation): the higher
            // address wins, the same way everywhere.
            self.stats.name_conflicts += 1;
            let theirs = Claimant {
                generation: info.generation,
                addr: info.addr,
            };
            let ours = Claimant { generation, addr };
            let (winner, loser) = if info.addr > addr {
                (theirs, ours)
            } else {
                (ours, theirs)
            };
            warn!(member = info.name.as_str(), generation, winner = %winner.addr, loser = %loser.addr, "name conflict");
            if mode.announces() {
                self.emit(Event::NameConflict {
                    name: info.name.to_arc(),
                    winner,
                    loser,
                    local_lost: false,
                });
            }
            if info.addr > addr {
                self.replace_identity(slot, info, mode, now);
            }
            return;
        }
        if info.incarnation <= incarnation {
            self.stats.ignored_updates += 1;
            return;
        }
        let empty = Arc::clone(&self.empty_metadata);
        let Some(record) = self.slot_mut(slot) else {
            return;
        };
        let changed = record.ready != info.ready || *record.metadata != *info.metadata.as_slice();
        record.incarnation = info.incarnation;
        record.addr = info.addr;
        record.ready = info.ready;
        if changed {
            record.metadata = info.metadata.to_arc(&empty);
        }
        record.state = MemberState::Alive;
        self.note(slot, Some(state), Some(MemberState::Alive));
        match state {
            MemberState::Alive => {}
            MemberState::Suspect => self.clear_suspicion(slot),
            MemberState::Dead | MemberState::Left => {
                self.clear_down(slot);
                self.live += 1;
                self.view_dirty = true;
                self.add_to_probe_order(slot);
            }
        }
        let acted_on = self.acted_on(down_since, now);
        if state == MemberState::Dead && mode.announces() && acted_on {
            // Our verdict stood for the takeover delay: the layers above
            // have taken its datums over. It refuted, maybe without ever
            // hearing of the verdict, or only of an older one it could
            // answer: tell it the verdict was acted on (a notice no
            // refutation answers), so it fences. (A verdict withdrawn
            // sooner was never acted on: nothing to tell.)
            self.tell_declared_dead(slot, wire::ACTED_ON, &self.local.name.clone());
        }
        if changed {
            self.view_dirty = true;
        }
        if mode.announces() {
            if let Some(m) = self.slot(slot).cloned() {
                match state {
                    MemberState::Alive => {}
                    MemberState::Suspect | MemberState::Dead => {
                        debug!(member = %m.name, incarnation = m.incarnation, was = ?state, "alive again");
                        self.emit(Event::Alive(m.clone()));
                    }
                    MemberState::Left => {
                        debug!(member = %m.name, incarnation = m.incarnation, "rejoined");
                        self.emit(Event::Joined(m.clone()));
                    }
                }
                if changed && state != MemberState::Left {
                    self.emit(Event::Updated(m));
                }
            }
            self.broadcast_alive(slot);
        }
    }

    /// A new generation (or the winner of a name conflict) takes a record.
    fn replace_identity(&mut self, slot: u32, info: AliveInfo<'_>, mode: Mode, _now: Instant) {
        let empty = Arc::clone(&self.empty_metadata);
        let Some(record) = self.slot_mut(slot) else {
            return;
        };
        let old = record.clone();
        record.generation = info.generation;
        record.incarnation = info.incarnation;
        record.addr = info.addr;
        record.ready = info.ready;
        record.metadata = info.metadata.to_arc(&empty);
        record.state = MemberState::Alive;
        self.lease
            .member_replaced(slot, Some(old.state), Some(MemberState::Alive));
        self.clear_suspicion(slot);
        self.notices.remove(&slot);
        if old.state.is_live() {
            if self.probe.is_some_and(|p| p.slot == slot) {
                self.probe = None;
            }
        } else {
            self.clear_down(slot);
            self.live += 1;
            self.add_to_probe_order(slot);
        }
        self.view_dirty = true;
        debug!(member = %old.name, old_generation = old.generation, generation = info.generation, "new generation");
        if mode.announces() {
            if old.state.is_live() {
                self.emit(Event::Failed(old));
            }
            if let Some(m) = self.slot(slot).cloned() {
                self.emit(Event::Joined(m));
            }
            self.broadcast_alive(slot);
        } else {
            self.broadcasts.remove(slot);
        }
    }

    fn alive_about_self(&mut self, info: &AliveInfo<'_>) {
        let ours = Claimant {
            generation: self.local.generation,
            addr: self.local.addr,
        };
        let theirs = Claimant {
            generation: info.generation,
            addr: info.addr,
        };
        if info.generation < ours.generation {
            // An older process of ours is still talked about: re-announce.
            self.refresh_local_alive();
            return;
        }
        if info.generation == ours.generation && info.addr == ours.addr {
            if info.incarnation > self.local.incarnation && self.local.state == MemberState::Alive {
                self.refute(info.incarnation);
            }
            return;
        }
        // Another live process claims our name.
        self.stats.name_conflicts += 1;
        let we_lose = (info.generation, info.addr) > (ours.generation, ours.addr);
        if we_lose {
            warn!(name = %self.local.name, winner = %theirs.addr, winner_generation = theirs.generation,
                "another process took this node's name; going passive");
            self.emit(Event::NameConflict {
                name: Arc::clone(&self.local.name),
                winner: theirs,
                loser: ours,
                local_lost: true,
            });
            self.stats.declared_failed += 1;
            self.emit(Event::DeclaredFailed);
            if self.local.state.is_live() {
                self.live = self.live.saturating_sub(1);
            }
            self.local.state = MemberState::Dead;
            self.superseded = true;
            self.probe = None;
            self.join = None;
            self.broadcasts.remove(LOCAL_SLOT);
            self.view_dirty = true;
        } else {
            warn!(name = %self.local.name, loser = %theirs.addr, "another process claims this node's name; keeping it");
            self.emit(Event::NameConflict {
                name: Arc::clone(&self.local.name),
                winner: ours,
                loser: theirs,
                local_lost: false,
            });
            self.refresh_local_alive();
        }
    }

    /// Re-queues our alive announcement unless one is already queued.
    fn refresh_local_alive(&mut self) {
        if self.local.state == MemberState::Alive && !self.broadcasts.contains(LOCAL_SLOT) {
            self.broadcast_local_alive();
        }
    }

    /// Raises our incarnation above an accusation and announces it.
    fn refute(&mut self, accused: u64) {
        // Saturates: a (buggy) accusation at u64::MAX cannot be refuted, but
        // cannot overflow either.
        self.local.incarnation = self.local.incarnation.max(accused).saturating_add(1);
        self.stats.refutations += 1;
        self.bump_awareness(1);
        self.broadcast_local_alive();
        debug!(name = %self.local.name, incarnation = self.local.incarnation, "refuted");
    }

    /// Whether an accusation about this node is to be refuted: same process,
    /// not leaving, at least our incarnation. A stale one (we already refuted
    /// it) is answered directly to its accuser, whose timer may still run.
    fn accusation_about_self(&mut self, acc: &Accusation<'_>) -> bool {
        if self.local.state != MemberState::Alive {
            return false;
        }
        if acc.generation < self.local.generation {
            self.refresh_local_alive();
            return false;
        }
        if acc.generation != self.local.generation {
            return false;
        }
        if acc.incarnation < self.local.incarnation {
            self.tell_accuser(acc.from);
            return false;
        }
        true
    }

    /// Sends our alive announcement straight to an accuser (once per accuser
    /// and incarnation): gossip alone may miss exactly the node whose
    /// suspicion timer is running.
    fn tell_accuser(&mut self, accuser: &str) {
        if accuser == &*self.local.name {
            return;
        }
        let hash = self.hasher.hash_str(accuser);
        if self.told.0 != self.local.incarnation {
            self.told.0 = self.local.incarnation;
            self.told.1.clear();
        }
        if self.told.1.contains(&hash) || self.told.1.len() >= MAX_TOLD {
            return;
        }
        self.told.1.push(hash);
        let Some(addr) = self
            .member(accuser)
            .filter(|m| m.state != MemberState::Left)
            .map(|m| m.addr)
        else {
            return;
        };
        let mut buf = self.new_packet();
        wire::encode(&Message::Alive(alive_of(&self.local)), &mut buf);
        self.stats.direct_refutations += 1;
        self.finish_unreliable(addr, buf);
    }

    /// An accusation about a live member at an incarnation below the one
    /// known here: the member refuted it, but its refutation may not reach
    /// the accuser (one-way loss between them, or the gossip ran out before
    /// it got there), and an accuser that never hears it declares the
    /// member dead on its own and, after the takeover delay, takes datums the
    /// member still holds under a valid lease. So the newer record goes
    /// straight to the accuser, once per (accuser, member, incarnation).
    fn answer_stale_accusation(&mut self, slot: u32, acc: &Accusation<'_>, mode: Mode) {
        if !mode.announces() || acc.from == &*self.local.name || acc.from == acc.name {
            return;
        }
        let Some(record) = self.slot(slot) else {
            return;
        };
        if acc.generation != record.generation
            || acc.incarnation >= record.incarnation
            || record.state != MemberState::Alive
        {
            return;
        }
        let key = self.hasher.hash_str(acc.from)
            ^ self.hasher.hash_str(acc.name).rotate_left(21)
            ^ record.incarnation.rotate_left(42);
        if self.stale_answered.contains(&key) {
            return;
        }
        let Some(to) = self
            .member(acc.from)
            .filter(|m| m.state.is_live())
            .map(|m| m.addr)
        else {
            return;
        };
        let record = self.slot(slot).cloned();
        let Some(record) = record else {
            return;
        };
        if self.stale_answered.len() >= MAX_STALE_ANSWERED {
            self.stale_answered.pop_front();
        }
        self.stale_answered.push_back(key);
        let mut buf = self.new_packet();
        wire::encode(&Message::Alive(alive_of(&record)), &mut buf);
        self.stats.stale_accusations_answered += 1;
        self.finish_unreliable(to, buf);
    }

    fn apply_suspect(&mut self, acc: &Accusation<'_>, mode: Mode, now: Instant) {
        if acc.name == &*self.local.name {
            if self.accusation_about_self(acc) {
                self.refute(acc.incarnation);
                self.tell_accuser(acc.from);
            }
            return;
        }
        let Some(slot) = self.index.get(acc.name, &self.members) else {
            self.stats.ignored_updates += 1;
            return;
        };
        let Some(record) = self.slot(slot) else {
            return;
        };
        if acc.generation != record.generation || acc.incarnation < record.incarnation {
            self.stats.ignored_updates += 1;
            self.answer_stale_accusation(slot, acc, mode);
            return;
        }
        let accuser = self.hasher.hash_str(acc.from);
        match record.state {
            MemberState::Dead | MemberState::Left => {
                self.stats.ignored_updates += 1;
            }
            MemberState::Suspect => {
                let Some(s) = self.suspicions.get_mut(&slot) else {
                    return;
                };
                let old_deadline = s.deadline;
                if mode == Mode::Announce && s.confirm(accuser, now) {
                    let new_deadline = s.deadline;
                    self.suspicion_deadlines.remove(&(old_deadline, slot));
                    self.suspicion_deadlines.insert((new_deadline, slot));
                    if mode.announces() {
                        self.queue_broadcast(slot, wire::encode_one(&Message::Suspect(*acc)));
                    }
                } else {
                    self.stats.ignored_updates += 1;
                }
            }
            MemberState::Alive => {
                let n = self.live;
                let mut k = self.config.suspicion_mult.saturating_sub(2);
                if n.saturating_sub(2) < k as usize {
                    k = 0;
                }
                let min = suspicion_min(self.config.suspicion_mult, n, self.config.probe_interval);
                let max = min.saturating_mul(self.config.suspicion_max_mult);
                let suspicion = Suspicion::new(accuser, now, min, max, k);
                self.suspicion_deadlines.insert((suspicion.deadline, slot));
                self.suspicions.insert(slot, suspicion);
                self.stats.suspicions += 1;
                let Some(record) = self.slot_mut(slot) else {
                    return;
                };
                record.state = MemberState::Suspect;
                record.incarnation = acc.incarnation;
                self.note(slot, Some(MemberState::Alive), Some(MemberState::Suspect));
                if mode.announces() {
                    if let Some(m) = self.slot(slot).cloned() {
                        debug!(member = %m.name, incarnation = m.incarnation, accuser = acc.from, "suspected");
                        self.emit(Event::Suspected(m));
                    }
                    self.queue_broadcast(slot, wire::encode_one(&Message::Suspect(*acc)));
                }
            }
        }
    }

    fn apply_dead(&mut self, acc: &Accusation<'_>, mode: Mode, now: Instant) {
        let left = acc.from == acc.name;
        if acc.name == &*self.local.name {
            // A verdict at our current incarnation (or above) is one we never
            // answered: its author may have taken our datums over, so the
            // layers above must fence. A verdict about an older incarnation
            // was already refuted; its author revives us when our refutation
            // reaches it (answered directly below), within the takeover
            // delay or it tells us so at our new incarnation: no fence.
            // Reported once per (accuser, incarnation): copies of one
            // verdict arrive by many gossip paths.
            // A node whose ownership lease is valid refutes such a verdict
            // instead: with the majority in sight and fresh contact, the
            // verdict comes from a node that could not reach it (a cut-off
            // minority spreading stale verdicts after a heal); the others
            // hold a verdict back for the takeover delay and withdraw it
            // when the refutation arrives, and one that acted anyway sends
            // the acted-on notice, which always fences.
            let standing = self.standing(now).is_valid();
            if !left
                && self.local.state == MemberState::Alive
                && acc.generation == self.local.generation
                && acc.incarnation >= self.local.incarnation
                && (acc.incarnation == wire::ACTED_ON || !standing)
            {
                // (`ACTED_ON` is above every incarnation: a verdict its
                // author acted on, told after our refutation reached it.)
                // An acted-on notice is keyed by our incarnation: one per
                // accuser and refutation (its copies repeat until acked).
                let verdict = if acc.incarnation == wire::ACTED_ON {
                    (self.local.incarnation, !self.hasher.hash_str(acc.from))
                } else {
                    (acc.incarnation, self.hasher.hash_str(acc.from))
                };
                if !self.verdicts.contains(&verdict) {
                    if self.verdicts.len() >= MAX_VERDICTS {
                        self.verdicts.pop_front();
                    }
                    self.verdicts.push_back(verdict);
                    warn!(name = %self.local.name, incarnation = acc.incarnation, accuser = acc.from,
                        "the cluster declared this node failed");
                    self.stats.declared_failed += 1;
                    self.emit(Event::DeclaredFailed);
                }
            }
            if acc.incarnation == wire::ACTED_ON {
                // Not an accusation: the author already revived us.
                return;
            }
            if self.accusation_about_self(acc) {
                self.refute(acc.incarnation);
                self.tell_accuser(acc.from);
            }
            return;
        }
        if acc.incarnation == wire::ACTED_ON {
            // Only ever sent to the member itself: not a verdict to apply.
            self.stats.ignored_updates += 1;
            return;
        }
        let Some(slot) = self.index.get(acc.name, &self.members) else {
            self.stats.ignored_updates += 1;
            return;
        };
        let Some(record) = self.slot_mut(slot) else {
            return;
        };
        if acc.generation != record.generation
            || acc.incarnation < record.incarnation
            || !record.state.is_live()
        {
            self.stats.ignored_updates += 1;
            self.answer_stale_accusation(slot, acc, mode);
            return;
        }
        let was = record.state;
        record.state = if left {
            MemberState::Left
        } else {
            MemberState::Dead
        };
        record.incarnation = acc.incarnation;
        let state = record.state;
        self.note(slot, Some(was), Some(state));
        self.clear_suspicion(slot);
        self.live = self.live.saturating_sub(1);
        self.mark_down(slot, now);
        self.view_dirty = true;
        if self.probe.is_some_and(|p| p.slot == slot) {
            self.probe = None;
        }
        if !left {
            self.stats.failures += 1;
        }
        if mode.announces() {
            if let Some(m) = self.slot(slot).cloned() {
                if left {
                    info!(member = %m.name, incarnation = m.incarnation, "left");
                    self.emit(Event::Left(m));
                } else {
                    info!(member = %m.name, incarnation = m.incarnation, accuser = acc.from, "failed");
                    self.emit(Event::Failed(m));
                }
            }
            self.queue_broadcast(slot, wire::encode_one(&Message::Dead(*acc)));
        }
    }

    /// Sends a member our (or `accuser`'s) death verdict about it at
    /// `incarnation`, directly: only the member itself acts on it (it reports
    /// `DeclaredFailed` once per incarnation, and refutes if still needed).
    ///
    /// Sent on the reliable path, and repeated on every ping and ack to it
    /// until one of our pings carrying it is acked, so neither a lost packet
    /// nor a partition leaves it unfenced.
    fn tell_declared_dead(&mut self, slot: u32, incarnation: u64, accuser: &str) {
        let Some(m) = self.slot(slot) else { return };
        let mut buf = self.new_packet();
        wire::encode(
            &Message::Dead(Accusation {
                name: &m.name,
                generation: m.generation,
                incarnation,
                from: accuser,
            }),
            &mut buf,
        );
        let addr = m.addr;
        self.send(addr, true, buf);
        self.notices.insert(
            slot,
            Notice {
                incarnation,
                accuser: Arc::from(accuser),
            },
        );
    }

    /// Appends a pending death-verdict notice for the member in `slot` to a
    /// packet going to it; returns whether there was one. The notice stays
    /// pending until a probe of ours that carried it is acked (the member
    /// applies a whole packet before acking, so the ack proves delivery).
    fn append_notice(&self, slot: u32, buf: &mut Vec<u8>) -> bool {
        let Some(notice) = self.notices.get(&slot) else {
            return false;
        };
        let Some(m) = self.slot(slot) else {
            return false;
        };
        wire::encode(
            &Message::Dead(Accusation {
                name: &m.name,
                generation: m.generation,
                incarnation: notice.incarnation,
                from: &notice.accuser,
            }),
            buf,
        );
        true
    }

    /// One member of a push-pull state; `from` is the sender (authenticated),
    /// counted as the accuser of the suspect and dead members it reports.
    /// What it says about itself counts first-hand; about others, what a
    /// third party may say (`vet_alive`, `vet_accusation`).
    fn merge_state(&mut self, state: &State<'_>, from: &str, join_answer: bool, now: Instant) {
        let member = &state.member;
        let acc = Accusation {
            name: member.name,
            generation: member.generation,
            incarnation: member.incarnation,
            from,
        };
        let known = member.name == &*self.local.name
            || self.index.get(member.name, &self.members).is_some();
        let info = AliveInfo::from_wire(member);
        let first_hand = member.name == from;
        match state.state {
            _ if join_answer && !known => {
                // A seed's answer to our join: unknown members as it lists
                // them (the member cap still applies).
                match state.state {
                    WireState::Alive => self.apply_alive(info, Mode::Merge, now),
                    WireState::Suspect => {
                        self.apply_alive(info, Mode::Merge, now);
                        self.apply_suspect(&acc, Mode::Merge, now);
                    }
                    WireState::Dead => self.insert_down(info, MemberState::Dead, now),
                    WireState::Left => self.insert_down(info, MemberState::Left, now),
                }
                return;
            }
            WireState::Alive => {
                if self.vet_alive(Some(from), &info, now) {
                    self.apply_alive(info, Mode::Merge, now);
                }
                return;
            }
            WireState::Suspect | WireState::Dead | WireState::Left if first_hand => {
                // A member does not report itself down; a leaving node sends
                // its leave as a message. Nothing to apply.
                self.stats.ignored_updates += 1;
                return;
            }
            WireState::Dead | WireState::Left if !known => {
                // A tombstone from a third party could bar the name (a high
                // generation makes the real member's announcements stale).
                self.stats.unknown_down_refused += 1;
                return;
            }
            WireState::Suspect | WireState::Dead | WireState::Left => {
                if !self.vet_alive(Some(from), &info, now) {
                    return;
                }
            }
        }
        match state.state {
            WireState::Alive => {}
            WireState::Suspect | WireState::Dead if member.name == &*self.local.name => {
                if state.state == WireState::Dead {
                    self.apply_dead(&acc, Mode::Merge, now);
                } else {
                    self.apply_suspect(&acc, Mode::Merge, now);
                }
            }
            WireState::Suspect => {
                // Learn an unknown member first, then the suspicion.
                self.apply_alive(AliveInfo::from_wire(member), Mode::Merge, now);
                self.apply_suspect(&acc, Mode::Merge, now);
            }
            WireState::Dead
                if self
                    .index
                    .get(member.name, &self.members)
                    .and_then(|slot| self.slot(slot))
                    .is_some_and(|m| !m.state.is_live() && m.generation == member.generation) =>
            {
                // Already down here; the remote saw it refute and die again
                // at a later incarnation. Nothing to revive: keep it dead,
                // at the later incarnation (stale alives then stay stale).
                if let Some(slot) = self.index.get(member.name, &self.members)
                    && let Some(m) = self.slot_mut(slot)
                    && m.incarnation < member.incarnation
                {
                    let was = m.state;
                    m.incarnation = member.incarnation;
                    m.state = MemberState::Dead;
                    self.note(slot, Some(was), Some(MemberState::Dead));
                }
            }
            WireState::Dead => {
                // The remote may be wrong (a partition): only suspect. But
                // the member itself must learn it was declared dead.
                self.apply_alive(AliveInfo::from_wire(member), Mode::Merge, now);
                if let Some(slot) = self.index.get(member.name, &self.members)
                    && self.slot(slot).is_some_and(|m| {
                        m.state.is_live()
                            && m.generation == member.generation
                            && m.incarnation <= member.incarnation
                    })
                {
                    self.tell_declared_dead(slot, member.incarnation, from);
                }
                self.apply_suspect(&acc, Mode::Merge, now);
            }
            WireState::Left => {
                // Only the member's own word counts for a leave: ask it.
                let acc = Accusation {
                    from: member.name,
                    ..acc
                };
                if self.vet_accusation(Some(from), &acc, Mode::Merge, now) {
                    self.apply_dead(&acc, Mode::Merge, now);
                }
            }
        }
    }

    // ----- probing ----------------------------------------------------------

    fn next_seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1);
        self.next_seq
    }

    fn bump_awareness(&mut self, delta: i64) {
        let max = i64::from(self.config.awareness_max.saturating_sub(1));
        let score = (i64::from(self.awareness) + delta).clamp(0, max);
        self.awareness = u32::try_from(score).unwrap_or(0);
    }

    fn scaled_probe_interval(&self) -> Duration {
        self.config
            .probe_interval
            .saturating_mul(self.awareness + 1)
    }

    fn on_ping(&mut self, from: SocketAddr, sender: Option<&str>, ping: &Ping<'_>) {
        if sender != Some(ping.from) {
            // The pinger tells who it is; only its own name counts (the ack
            // and what rides on it are about the pinger).
            self.stats.forged_claims += 1;
            debug!(claimed = ping.from, ?sender, %from, "refused a ping sent under another name");
            return;
        }
        if ping.target != &*self.local.name {
            self.stats.ignored_updates += 1;
            return;
        }
        if ping.generation < self.local.generation {
            // Aimed at an older process of ours: do not ack for it, but make
            // sure the prober learns the new generation, directly (a
            // restarted node whose seeds are gone may know no one to gossip
            // to).
            self.refresh_local_alive();
            self.on_alive_request(from);
            return;
        }
        if ping.generation > self.local.generation {
            self.stats.ignored_updates += 1;
            return;
        }
        let extra = self.pinger_extra(ping);
        self.deferred_acks.push(DeferredAck {
            to: from,
            seq: ping.seq,
            reliable: ping.reliable,
            extra,
        });
    }

    fn on_indirect_ping(
        &mut self,
        from: SocketAddr,
        sender: Option<&str>,
        req: &IndirectPing<'_>,
        now: Instant,
    ) {
        // Only a live member may ask, under its own name, and only about a
        // live member at the generation and address known here: a relay
        // never pings an address a peer chose, nor reveals its sequence
        // numbers to a stranger.
        let requester_ok = sender.is_some_and(|name| {
            self.member(name)
                .is_some_and(|m| m.state.is_live() && name != &*self.local.name)
        });
        if !requester_ok {
            self.stats.relays_refused += 1;
            debug!(?sender, %from, target = req.target, "refused an indirect probe from a non-member");
            return;
        }
        if req.target == &*self.local.name {
            if req.generation == self.local.generation {
                self.deferred_acks.push(DeferredAck {
                    to: from,
                    seq: req.seq,
                    reliable: false,
                    extra: AckExtra::Nothing,
                });
            }
            return;
        }
        if !self.member(req.target).is_some_and(|m| {
            m.state.is_live() && m.generation == req.generation && m.addr == req.addr
        }) {
            self.stats.relays_refused += 1;
            debug!(?sender, target = req.target, addr = %req.addr, "refused an indirect probe of a member not known so");
            return;
        }
        if self.relays.len() >= self.config.max_relays {
            self.stats.relays_dropped += 1;
            return;
        }
        let target = self.hasher.hash_str(req.target);
        let seq = self.next_seq();
        let mut buf = self.new_packet();
        wire::encode(
            &ping_msg(&self.local, seq, req.target, req.generation, false),
            &mut buf,
        );
        self.finish_unreliable(req.addr, buf);
        self.stats.relays += 1;
        // The relay nacks at 80 % of the probe timeout so the nack reaches
        // the prober before its own deadline.
        let nack_at = later(now, self.config.probe_timeout.mul_f64(0.8));
        self.relays.push_back(Relay {
            seq,
            target,
            sent_at: now,
            requester: from,
            requester_seq: req.seq,
            nack_at,
        });
    }

    /// Sends our `Alive` straight to the live members our join answer
    /// listed (at most `MAX_CLAIM_CHECKS`): they take a new member only
    /// from itself, and this reaches them as fast as the seed's gossip
    /// would have (which they now only check with us).
    fn announce_to_members(&mut self) {
        if self.local.state != MemberState::Alive {
            return;
        }
        let targets: Vec<SocketAddr> = self
            .members
            .iter()
            .flatten()
            .filter(|m| m.state.is_live())
            .map(|m| m.addr)
            .take(MAX_CLAIM_CHECKS)
            .collect();
        for to in targets {
            let mut buf = self.new_packet();
            wire::encode(&Message::Alive(alive_of(&self.local)), &mut buf);
            self.finish_unreliable(to, buf);
        }
    }

    /// Whether `sender` is the member in `slot`.
    fn is_member(&self, slot: u32, sender: Option<&str>) -> bool {
        sender.is_some_and(|name| self.slot(slot).is_some_and(|m| *m.name == *name))
    }

    /// Whether `sender` is the target or one of the relays asked for the
    /// probe in progress.
    fn answers_probe(&self, probe: &Probe, sender: Option<&str>) -> bool {
        self.is_member(probe.slot, sender)
            || (probe.indirect_sent
                && self
                    .probe_relays
                    .iter()
                    .any(|&relay| self.is_member(relay, sender)))
    }

    fn refuse_ack(&mut self, sender: Option<&str>, seq: u32) {
        self.stats.acks_refused += 1;
        debug!(
            ?sender,
            seq, "refused an ack from a node that was not asked"
        );
    }

    fn on_ack(&mut self, from: SocketAddr, sender: Option<&str>, seq: u32, now: Instant) {
        if let Some(probe) = self.probe
            && probe.seq == seq
        {
            if !self.answers_probe(&probe, sender) {
                self.refuse_ack(sender, seq);
                return;
            }
            // Answered, directly or through a relay: contact since the ping
            // left (the lease counts from the send time).
            self.lease.contact(probe.sent_at);
            self.witness_acked(probe.slot, from, probe.sent_at);
            // A direct answer in time means we are healthy; an answer after
            // indirect probes proves nothing either way.
            if !probe.indirect_sent {
                self.bump_awareness(-1);
            }
            // Only the target's own ack proves it read a packet carrying the
            // notice (the direct and the reliable ping both carry it; an ack
            // forwarded by a relay does not).
            if probe.carries_notice && self.slot(probe.slot).is_some_and(|m| m.addr == from) {
                self.notices.remove(&probe.slot);
            }
            self.probe = None;
            return;
        }
        if let Some(pos) = self.relays.iter().position(|r| r.seq == seq) {
            let target = self.relays.get(pos).map(|r| r.target);
            if sender.map(|name| self.hasher.hash_str(name)) != target {
                self.refuse_ack(sender, seq);
                return;
            }
            if let Some(relay) = self.relays.remove(pos) {
                self.lease.contact(relay.sent_at);
                let mut buf = self.new_packet();
                wire::encode(&Message::Ack(relay.requester_seq), &mut buf);
                self.finish_unreliable(relay.requester, buf);
            }
            return;
        }
        if let Some(pos) = self.checks.iter().position(|(c, _, _)| *c == seq) {
            if !self
                .checks
                .get(pos)
                .is_some_and(|&(_, slot, _)| self.is_member(slot, sender))
            {
                self.refuse_ack(sender, seq);
                return;
            }
            if let Some((_, slot, sent_at)) = self.checks.remove(pos) {
                self.lease.contact(sent_at);
                self.witness_acked(slot, from, sent_at);
            }
            return;
        }
        if let Some(&(_, slot, _)) = self.lease.witnesses.pings.iter().find(|p| p.0 == seq)
            && !self.is_member(slot, sender)
        {
            self.refuse_ack(sender, seq);
            return;
        }
        if let Some((slot, sent_at)) = self.lease.witnesses.take_ping(seq) {
            self.lease.contact(sent_at);
            self.witness_acked(slot, from, sent_at);
            return;
        }
        if let Some(pos) = self.notice_pings.iter().position(|(s, _, _)| *s == seq) {
            if !self
                .notice_pings
                .get(pos)
                .is_some_and(|&(_, slot, _)| self.is_member(slot, sender))
            {
                self.refuse_ack(sender, seq);
                return;
            }
            if let Some((_, slot, sent_at)) = self.notice_pings.remove(pos) {
                self.lease.contact(sent_at);
                self.witness_acked(slot, from, sent_at);
                self.notices.remove(&slot);
            }
            return;
        }
        if let Some((reconnect_seq, slot, sent_at)) = self.reconnect
            && reconnect_seq == seq
        {
            if !self.is_member(slot, sender) {
                self.refuse_ack(sender, seq);
                return;
            }
            self.lease.contact(sent_at);
            self.witness_acked(slot, from, sent_at);
            // A dead member answers: the partition (or whatever it was) is
            // over. Exchange full state so both sides learn and refute.
            self.reconnect = None;
            if let Some(addr) = self
                .slot(slot)
                .filter(|m| m.state == MemberState::Dead)
                .map(|m| m.addr)
            {
                self.stats.reconnects += 1;
                self.send_state(addr, false, true, now);
            }
            return;
        }
        self.stats.stray_acks += 1;
    }

    fn on_nack(&mut self, sender: Option<&str>, seq: u32) {
        let Some(probe) = self.probe else {
            return;
        };
        if probe.seq == seq
            && !self
                .probe_relays
                .iter()
                .any(|&relay| self.is_member(relay, sender))
        {
            self.refuse_ack(sender, seq);
            return;
        }
        if let Some(probe) = self.probe.as_mut()
            && probe.seq == seq
            && probe.indirect_sent
        {
            probe.nacks = (probe.nacks + 1).min(probe.expected_nacks);
            self.stats.nacks_received += 1;
        }
    }

    fn fire_relays(&mut self, now: Instant) {
        while let Some(relay) = self.relays.front().copied() {
            if relay.nack_at > now {
                break;
            }
            self.relays.pop_front();
            let mut buf = self.new_packet();
            wire::encode(&Message::Nack(relay.requester_seq), &mut buf);
            self.finish_unreliable(relay.requester, buf);
        }
    }

    fn fire_probe(&mut self, now: Instant) {
        if let Some(probe) = self.probe {
            if !probe.indirect_sent && now >= probe.indirect_at {
                self.send_indirect_probes();
                // Woken late (this node was slow): still give the relays
                // their full window before accusing anyone.
                let window = probe.deadline.saturating_duration_since(probe.indirect_at);
                if let Some(p) = self.probe.as_mut() {
                    p.deadline = p.deadline.max(later(now, window));
                }
            } else if now >= probe.deadline {
                self.probe_failed(now);
            }
        }
        if self.probe.is_none()
            && now >= self.next_probe_at
            && self.local.state == MemberState::Alive
        {
            self.start_probe(now);
        }
    }

    fn next_probe_target(&mut self) -> Option<u32> {
        for _ in 0..2 {
            while let Some(&slot) = self.probe_order.get(self.probe_pos) {
                self.probe_pos += 1;
                if self.slot(slot).is_some_and(|m| m.state.is_live()) {
                    return Some(slot);
                }
            }
            // End of a round: reshuffle the live members.
            self.probe_order.clear();
            self.probe_order.extend(
                self.members
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.as_ref().is_some_and(|m| m.state.is_live()))
                    .filter_map(|(slot, _)| u32::try_from(slot).ok()),
            );
            self.probe_order.shuffle(&mut self.rng);
            self.probe_pos = 0;
            if self.probe_order.is_empty() {
                return None;
            }
        }
        None
    }

    fn start_probe(&mut self, now: Instant) {
        let interval = self.scaled_probe_interval();
        self.next_probe_at = later(now, interval);
        let Some(slot) = self.next_probe_target() else {
            return;
        };
        let seq = self.next_seq();
        let Some(target) = self.slot(slot) else {
            return;
        };
        let mut buf = self.new_packet();
        wire::encode(
            &ping_msg(&self.local, seq, &target.name, target.generation, false),
            &mut buf,
        );
        if target.state == MemberState::Suspect {
            // Lifeguard's buddy system: tell a suspect at once so it refutes.
            wire::encode(
                &Message::Suspect(Accusation {
                    name: &target.name,
                    generation: target.generation,
                    incarnation: target.incarnation,
                    from: &self.local.name,
                }),
                &mut buf,
            );
        }
        let (addr, generation) = (target.addr, target.generation);
        let carries_notice = self.append_notice(slot, &mut buf);
        self.probe = Some(Probe {
            slot,
            sent_at: now,
            generation,
            carries_notice,
            seq,
            indirect_at: later(now, self.config.probe_timeout),
            deadline: later(now, interval),
            indirect_sent: false,
            expected_nacks: 0,
            nacks: 0,
        });
        self.stats.probes += 1;
        self.finish_unreliable(addr, buf);
    }

    fn send_indirect_probes(&mut self) {
        let Some(mut probe) = self.probe else { return };
        probe.indirect_sent = true;
        let Some(target) = self.slot(probe.slot) else {
            self.probe = None;
            return;
        };
        if target.generation != probe.generation {
            self.probe = None;
            return;
        }
        let (name, addr) = (Arc::clone(&target.name), target.addr);
        let exclude = probe.slot;
        let mut relays = std::mem::take(&mut self.scratch_slots);
        self.sample_members(self.config.indirect_checks, &mut relays, |slot, m| {
            slot != exclude && m.state == MemberState::Alive
        });
        for &relay in &relays {
            let Some(relay_addr) = self.slot(relay).map(|m| m.addr) else {
                continue;
            };
            let mut buf = self.new_packet();
            wire::encode(
                &Message::IndirectPing(IndirectPing {
                    seq: probe.seq,
                    target: &name,
                    generation: probe.generation,
                    addr,
                }),
                &mut buf,
            );
            self.finish_unreliable(relay_addr, buf);
            self.stats.indirect_probes += 1;
        }
        probe.expected_nacks = u32::try_from(relays.len()).unwrap_or(u32::MAX);
        self.probe_relays.clone_from(&relays);
        self.scratch_slots = relays;
        self.probe = Some(probe);
        if self.config.reliable_ping {
            let mut buf = self.new_packet();
            wire::encode(
                &ping_msg(&self.local, probe.seq, &name, probe.generation, true),
                &mut buf,
            );
            if probe.carries_notice {
                self.append_notice(probe.slot, &mut buf);
            }
            self.send(addr, true, buf);
        }
    }

    fn probe_failed(&mut self, now: Instant) {
        let Some(probe) = self.probe.take() else {
            return;
        };
        // Lifeguard: missing nacks mean the problem may be ours.
        let delta = if probe.expected_nacks > 0 {
            probe.expected_nacks - probe.nacks.min(probe.expected_nacks)
        } else {
            1
        };
        self.bump_awareness(i64::from(delta));
        self.stats.probes_failed += 1;
        let Some(target) = self.slot(probe.slot) else {
            return;
        };
        if target.generation != probe.generation || !target.state.is_live() {
            return;
        }
        let name = Arc::clone(&target.name);
        let local = Arc::clone(&self.local.name);
        let acc = Accusation {
            name: &name,
            generation: target.generation,
            incarnation: target.incarnation,
            from: &local,
        };
        debug!(member = %name, awareness = self.awareness, nacks = probe.nacks, expected_nacks = probe.expected_nacks, "probe failed");
        self.apply_suspect(&acc, Mode::Announce, now);
    }

    /// Picks up to `count` distinct remote members passing `keep` into `out`,
    /// at random: random draws first (O(count) when most members qualify),
    /// then a scan of everyone.
    fn sample_members(
        &mut self,
        count: usize,
        out: &mut Vec<u32>,
        keep: impl Fn(u32, &Member) -> bool,
    ) {
        out.clear();
        let len = self.members.len();
        if count == 0 || len == 0 {
            return;
        }
        for _ in 0..SAMPLE_ATTEMPTS.max(count * 4) {
            if out.len() >= count {
                return;
            }
            let slot = self.rng.random_range(0..len);
            let Ok(slot) = u32::try_from(slot) else {
                continue;
            };
            if out.contains(&slot) {
                continue;
            }
            if self.slot(slot).is_some_and(|m| keep(slot, m)) {
                out.push(slot);
            }
        }
        if out.len() >= count {
            return;
        }
        let mut all: Vec<u32> = self
            .members
            .iter()
            .enumerate()
            .filter_map(|(slot, m)| {
                let slot = u32::try_from(slot).ok()?;
                m.as_ref().filter(|m| keep(slot, m)).map(|_| slot)
            })
            .collect();
        let (chosen, _) = all.partial_shuffle(&mut self.rng, count);
        out.clear();
        out.extend_from_slice(chosen);
    }

    /// A last-chance ping to a suspect (with the suspicion, so it refutes in
    /// its ack), unreliable and, if configured, reliable.
    fn send_check(&mut self, slot: u32, now: Instant) {
        let seq = self.next_seq();
        let Some(target) = self.slot(slot) else {
            return;
        };
        let ping = |reliable| ping_msg(&self.local, seq, &target.name, target.generation, reliable);
        let suspect = Message::Suspect(Accusation {
            name: &target.name,
            generation: target.generation,
            incarnation: target.incarnation,
            from: &self.local.name,
        });
        let mut buf = self.new_packet();
        wire::encode(&ping(false), &mut buf);
        wire::encode(&suspect, &mut buf);
        let reliable = self.config.reliable_ping.then(|| {
            let mut buf = wire::new_packet(64);
            wire::encode(&ping(true), &mut buf);
            wire::encode(&suspect, &mut buf);
            buf
        });
        let addr = target.addr;
        if self.checks.len() >= MAX_CHECKS {
            self.checks.pop_front();
        }
        self.checks.push_back((seq, slot, now));
        self.stats.suspicion_checks += 1;
        self.finish_unreliable(addr, buf);
        if let Some(buf) = reliable {
            self.send(addr, true, buf);
        }
    }

    /// Re-sends pending death-verdict notices, each in a ping of its own:
    /// the member's ack proves it applied the notice (then it is dropped).
    fn resend_notices(&mut self, now: Instant) {
        let pending: Vec<u32> = self
            .notices
            .keys()
            .copied()
            .take(MAX_NOTICE_PINGS)
            .collect();
        for slot in pending {
            let seq = self.next_seq();
            let Some(m) = self.slot(slot) else {
                self.notices.remove(&slot);
                continue;
            };
            let mut buf = self.new_packet();
            wire::encode(
                &ping_msg(&self.local, seq, &m.name, m.generation, false),
                &mut buf,
            );
            self.append_notice(slot, &mut buf);
            let addr = m.addr;
            if self.notice_pings.len() >= MAX_CHECKS {
                self.notice_pings.pop_front();
            }
            self.notice_pings.push_back((seq, slot, now));
            self.send(addr, false, buf);
        }
    }

    /// Pings one random dead member; an ack means it is reachable again (a
    /// healed partition) and triggers a push-pull with it.
    fn fire_reconnect(&mut self, now: Instant) {
        if now < self.next_reconnect_at {
            return;
        }
        self.next_reconnect_at = later(now, self.config.reconnect_interval);
        self.reconnect = None;
        if self.local.state != MemberState::Alive {
            return;
        }
        self.resend_notices(now);
        if self.down_since.is_empty() {
            return;
        }
        let mut targets = std::mem::take(&mut self.scratch_slots);
        self.sample_members(1, &mut targets, |_, m| m.state == MemberState::Dead);
        let target = targets.first().copied();
        self.scratch_slots = targets;
        let Some(slot) = target else { return };
        let seq = self.next_seq();
        let Some(member) = self.slot(slot) else {
            return;
        };
        let mut buf = self.new_packet();
        wire::encode(
            &ping_msg(&self.local, seq, &member.name, member.generation, false),
            &mut buf,
        );
        let addr = member.addr;
        self.reconnect = Some((seq, slot, now));
        self.send(addr, false, buf);
    }

    fn fire_suspicions(&mut self, now: Instant) {
        while let Some(&(at, slot)) = self.suspicion_deadlines.first() {
            if at > now {
                break;
            }
            self.suspicion_deadlines.pop_first();
            // Woken long after the deadline: this node was stalled, and a
            // refutation may be waiting in its input. Grant one probe
            // interval to read it before declaring anyone dead (once).
            // Not confirmed by enough independent members: ping the suspect
            // once more ourselves, carrying the suspicion, so its refutation
            // comes straight back even if the gossip of it missed us.
            if let Some(s) = self.suspicions.get_mut(&slot)
                && !s.graced
            {
                let late =
                    now.saturating_duration_since(at.max(s.set_at)) >= self.config.probe_interval;
                let unconfirmed = s.confirmations() < s.k.max(1);
                if late || unconfirmed {
                    s.graced = true;
                    s.deadline = later(now, self.config.probe_interval);
                    let deadline = s.deadline;
                    self.suspicion_deadlines.insert((deadline, slot));
                    if unconfirmed {
                        self.send_check(slot, now);
                    }
                    continue;
                }
            }
            let Some(suspicion) = self.suspicions.remove(&slot) else {
                continue;
            };
            let Some(member) = self.slot(slot) else {
                continue;
            };
            if member.state != MemberState::Suspect {
                continue;
            }
            let name = Arc::clone(&member.name);
            let local = Arc::clone(&self.local.name);
            let acc = Accusation {
                name: &name,
                generation: member.generation,
                incarnation: member.incarnation,
                from: &local,
            };
            debug!(member = %name, confirmations = suspicion.confirmations(),
                after_ms = u64::try_from(now.saturating_duration_since(suspicion.start).as_millis()).unwrap_or(u64::MAX),
                "suspicion timed out");
            self.apply_dead(&acc, Mode::Announce, now);
        }
    }

    // ----- dissemination ----------------------------------------------------

    fn fire_gossip(&mut self, now: Instant) {
        if now < self.next_gossip_at {
            return;
        }
        self.next_gossip_at = later(now, self.config.gossip_interval);
        if self.broadcasts.is_empty() {
            return;
        }
        let gossip_to_dead = self.config.gossip_to_dead;
        let mut targets = std::mem::take(&mut self.scratch_slots);
        // The filter reads `down_since` while sampling needs `&mut self`.
        let down_since = std::mem::take(&mut self.down_since);
        self.sample_members(self.config.gossip_fanout, &mut targets, |slot, m| {
            match m.state {
                MemberState::Alive | MemberState::Suspect => true,
                MemberState::Dead => down_since
                    .get(&slot)
                    .is_some_and(|since| now.saturating_duration_since(*since) < gossip_to_dead),
                MemberState::Left => false,
            }
        });
        self.down_since = down_since;
        let limit = self.retransmit_limit();
        for &slot in &targets {
            let Some(addr) = self.slot(slot).map(|m| m.addr) else {
                continue;
            };
            let mut buf = self.new_packet();
            if self
                .broadcasts
                .fill(&mut buf, self.config.max_packet_size, limit)
                == 0
            {
                break;
            }
            self.stats.gossip_packets += 1;
            self.send(addr, false, buf);
        }
        self.scratch_slots = targets;
    }

    fn fire_push_pull(&mut self, now: Instant) {
        if now < self.next_push_pull_at {
            return;
        }
        let interval = push_pull_scale(self.config.push_pull_interval, self.live);
        self.next_push_pull_at = later(now, interval);
        if !self.local.state.is_live() {
            return;
        }
        // Dead members too, so the two sides of a healed partition meet.
        let mut targets = std::mem::take(&mut self.scratch_slots);
        self.sample_members(1, &mut targets, |_, m| m.state != MemberState::Left);
        let target = targets
            .first()
            .and_then(|slot| self.slot(*slot))
            .map(|m| m.addr);
        self.scratch_slots = targets;
        if let Some(addr) = target {
            self.send_state(addr, false, true, now);
        }
        // A seed that is not a live member here: maybe another cluster that
        // formed while we were apart. One of them per round.
        if self.seeds.is_empty() || self.join.is_some() {
            return;
        }
        let unknown: Vec<SocketAddr> = self
            .seeds
            .iter()
            .copied()
            .filter(|seed| {
                !self
                    .members
                    .iter()
                    .flatten()
                    .any(|m| m.addr == *seed && m.state.is_live())
            })
            .collect();
        if unknown.is_empty() {
            return;
        }
        let pick = self.rng.random_range(0..unknown.len());
        if let Some(&seed) = unknown.get(pick)
            && Some(seed) != target
        {
            self.stats.seed_push_pulls += 1;
            self.send_state(seed, false, true, now);
        }
    }

    /// Sends this node's full state (reliable), truncated to
    /// `max_state_size` from a random starting member if need be.
    fn send_state(&mut self, to: SocketAddr, join: bool, reply: bool, now: Instant) {
        if reply {
            // A request: its answer is contact, from now (lease).
            self.lease.pull_sent(to, now);
        }
        let max = self.config.max_state_size;
        let mut buf = wire::new_packet(self.config.max_packet_size.min(max));
        wire::encode(
            &Message::PushPull(PushPull {
                from: &self.local.name,
                join,
                reply,
            }),
            &mut buf,
        );
        let local_state = wire_state(self.local.state);
        wire::encode(
            &Message::State(State {
                member: alive_of(&self.local),
                state: local_state,
            }),
            &mut buf,
        );
        let len = self.members.len();
        let start = if len == 0 {
            0
        } else {
            self.rng.random_range(0..len)
        };
        let mut truncated = false;
        for i in 0..len {
            let Some(Some(m)) = self.members.get((start + i) % len) else {
                continue;
            };
            let before = buf.len();
            wire::encode(
                &Message::State(State {
                    member: alive_of(m),
                    state: wire_state(m.state),
                }),
                &mut buf,
            );
            if buf.len() > max {
                buf.truncate(before);
                truncated = true;
                break;
            }
        }
        if truncated {
            self.stats.states_truncated += 1;
        }
        self.stats.push_pulls += 1;
        self.send(to, true, buf);
    }

    fn fire_join(&mut self, now: Instant) {
        let Some(join) = self.join.as_mut() else {
            return;
        };
        if now < join.next_at {
            return;
        }
        // Already in touch with a seed (it is a live member here): done.
        let seeds_known = join.seeds.iter().any(|addr| {
            self.members
                .iter()
                .flatten()
                .any(|m| m.addr == *addr && m.state == MemberState::Alive)
        });
        if seeds_known {
            self.join = None;
            return;
        }
        let Some(join) = self.join.as_mut() else {
            return;
        };
        join.next_at = later(now, join.delay);
        join.delay = join
            .delay
            .saturating_mul(2)
            .min(self.config.push_pull_interval);
        let seeds = join.seeds.clone();
        for seed in seeds {
            self.send_state(seed, true, true, now);
        }
    }

    fn fire_reap(&mut self, now: Instant) {
        while let Some(&(at, slot)) = self.reap_queue.first() {
            if at > now {
                break;
            }
            self.reap_queue.pop_first();
            let current = self
                .down_since
                .get(&slot)
                .is_some_and(|since| later(*since, self.config.reap_after) == at);
            if current && self.slot(slot).is_some_and(|m| !m.state.is_live()) {
                self.remove_member(slot);
            }
        }
    }
}

/// A ping from this node (`local`), telling the target who is asking and at
/// which incarnation, so a target that is behind can catch up.
fn ping_msg<'a>(
    local: &'a Member,
    seq: u32,
    target: &'a str,
    generation: u64,
    reliable: bool,
) -> Message<'a> {
    Message::Ping(Ping {
        seq,
        target,
        generation,
        reliable,
        from: &local.name,
        from_generation: local.generation,
        from_incarnation: local.incarnation,
    })
}

fn alive_of(member: &Member) -> Alive<'_> {
    Alive {
        name: &member.name,
        generation: member.generation,
        incarnation: member.incarnation,
        addr: member.addr,
        ready: member.ready,
        metadata: &member.metadata,
    }
}

fn wire_state(state: MemberState) -> WireState {
    match state {
        MemberState::Alive => WireState::Alive,
        MemberState::Suspect => WireState::Suspect,
        MemberState::Dead => WireState::Dead,
        MemberState::Left => WireState::Left,
    }
}
