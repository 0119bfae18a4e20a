//! The state machine.

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tracing::{debug, info, warn};

use crate::broadcast::Broadcasts;
use crate::hash::{SeededState, SlotMap, witness_rank};
use crate::lease::{Lease, LeaseEvidence, LeaseStrategy, Standing, WitnessId, witness_set_size};
use crate::suspicion::{Suspicion, push_pull_scale, retransmit_limit, suspicion_min};
use crate::wire::{
    self, Accusation, Alive, IndirectPing, Limits, Message, Ping, PushPull, State, WireState,
};
use crate::{
    Claimant, Config, DecodeError, Error, Event, LocalNode, Member, MemberState, Stats, Transmit,
};

mod identity;
mod outputs;
mod probe;
mod push_pull;
mod standing;
mod table;
mod timers;
mod updates;

use outputs::{alive_of, ping_msg, wire_state};
use probe::{DeferredAck, Probe, Relay};
use table::Table;
use updates::{AliveInfo, Mode};

/// Broadcast-queue key of updates about this node.
const LOCAL_SLOT: u32 = u32::MAX;
/// A broadcast queued since the last gossip round brings the next round
/// forward to `gossip_interval / NEWS_GAP_DIVISOR` after that round (50 ms
/// on `lan`): news spreads at network speed, and gossip traffic is at most
/// this many times the periodic rate, only while news keeps coming.
const NEWS_GAP_DIVISOR: u32 = 4;
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

/// A death verdict a revived member still has to hear about.
#[derive(Debug, Clone)]
struct Notice {
    incarnation: u64,
    accuser: Arc<str>,
}

/// Join attempts in progress.
#[derive(Debug, Clone)]
struct Join {
    seeds: Vec<SocketAddr>,
    next_at: Instant,
    delay: Duration,
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
    /// The remote members (slots, name index, live count, probe order, when
    /// each went down): changed only through `table::Table`'s methods.
    table: Table,

    probe: Option<Probe>,
    next_probe_at: Instant,
    awareness: u32,
    next_seq: u32,
    relays: VecDeque<Relay>,

    suspicions: SlotMap<Suspicion>,
    suspicion_deadlines: BTreeSet<(Instant, u32)>,

    broadcasts: Broadcasts,
    next_gossip_at: Instant,
    /// When the last gossip round went out ([`NEWS_GAP_DIVISOR`]).
    last_gossip_at: Instant,
    /// A broadcast was queued since the last gossip round: the next round
    /// goes out early ([`Membership::gossip_due`]).
    news_queued: bool,
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
            .field("members", &self.table.len())
            .field("live", &self.live())
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
            table: Table::new(hasher, config.reap_after),
            probe: None,
            next_probe_at,
            awareness: 0,
            next_seq: rng.random(),
            relays: VecDeque::new(),
            suspicions: SlotMap::default(),
            suspicion_deadlines: BTreeSet::new(),
            broadcasts: Broadcasts::default(),
            next_gossip_at,
            last_gossip_at: now,
            news_queued: false,
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
            (!self.broadcasts.is_empty()).then_some(self.gossip_due()),
            live.then_some(self.next_push_pull_at),
            (live && (self.table.any_down() || !self.notices.is_empty()))
                .then_some(self.next_reconnect_at),
            self.suspicion_deadlines
                .first()
                .filter(|_| self.local.state == MemberState::Alive)
                .map(|(at, _)| *at),
            self.relays.front().map(|r| r.nack_at),
            self.table.next_reap_at(),
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
        std::iter::once(&self.local).chain(self.table.iter())
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
        self.table.by_name(name)
    }

    /// Number of alive and suspect members, this node included while live.
    pub fn num_live(&self) -> usize {
        self.live()
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

    /// How long after it started suspecting a member (or after its dead
    /// verdict: [`Config::takeover_from_suspicion`]) this node must wait
    /// before taking that member's datums: by then the member has lost its
    /// lease ([`Config::takeover_delay`]).
    pub fn takeover_delay(&self) -> Duration {
        self.config.takeover_delay()
    }

    /// A takeover gate for this node's events, set up as its configuration
    /// says (delay, and where the delay counts from).
    #[must_use]
    pub fn takeover_gate(&self) -> crate::TakeoverGate {
        crate::TakeoverGate::new(self.config.takeover_delay())
            .counting_from_suspicion(self.config.takeover_from_suspicion())
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

    // ----- lease ------------------------------------------------------------

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

    // A remote member's state changes only through these, and the table's
    // methods under them: the table keeps its live count, probe order and
    // down bookkeeping in step; here the lease hears of each change.

    fn slot(&self, slot: u32) -> Option<&Member> {
        self.table.get(slot)
    }

    /// Alive and suspect members, this node included while it is live.
    fn live(&self) -> usize {
        self.table.live() + usize::from(self.local.state.is_live())
    }

    /// Stores a new member in the state it carries (`room_for_member` was
    /// asked first); a live one changes the view.
    fn insert_member(&mut self, member: Member, now: Instant) -> u32 {
        let state = member.state;
        let slot = self.table.insert(member, now, &mut self.rng);
        self.note(slot, None, Some(state));
        if state.is_live() {
            self.view_dirty = true;
        }
        slot
    }

    fn insert_down(&mut self, info: AliveInfo<'_>, state: MemberState, now: Instant) {
        if !self.room_for_member() {
            return;
        }
        let member = info.to_member(state, &self.empty_metadata);
        self.insert_member(member, now);
    }

    /// Moves the member in `slot` to `state` at `now`; returns the state it
    /// was in (`None`: no member there). The lease hears of it; leaving
    /// `Suspect` ends the suspicion; a change of the live set changes the
    /// view, and going down ends a probe of the member.
    fn set_state(&mut self, slot: u32, state: MemberState, now: Instant) -> Option<MemberState> {
        let was = self.table.apply(slot, state, now, &mut self.rng)?;
        self.note(slot, Some(was), Some(state));
        if state != MemberState::Suspect {
            self.clear_suspicion(slot);
        }
        if was.is_live() != state.is_live() {
            self.view_dirty = true;
            if !state.is_live() && self.probe.is_some_and(|p| p.slot == slot) {
                self.probe = None;
            }
        }
        Some(was)
    }

    fn clear_suspicion(&mut self, slot: u32) {
        if let Some(s) = self.suspicions.remove(&slot) {
            self.suspicion_deadlines.remove(&(s.deadline, slot));
        }
    }

    fn remove_member(&mut self, slot: u32) {
        let Some(member) = self.table.remove(slot) else {
            return;
        };
        self.note(slot, Some(member.state), None);
        self.notices.remove(&slot);
        self.broadcasts.remove(slot);
        self.clear_suspicion(slot);
        if self.probe.is_some_and(|p| p.slot == slot) {
            self.probe = None;
        }
        self.stats.reaped += 1;
        debug!(member = %member.name, generation = member.generation, "reaped");
    }
}
