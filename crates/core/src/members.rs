//! Membership to handoff: events and views, a declared death, a rebirth as
//! a new generation, and placement tables built and installed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use shoal_membership::{Event, Member};
use shoal_placement::{NodeId, PlacementTable, View, ViewMember};
use shoal_transition::{ConfigError, Handoff, SendId};
use tracing::{debug, info, warn};

use crate::{InstallMode, NodeCore, Output, Work};

/// The placement view of `members` (name, generation, ready).
pub(crate) fn ready_view(members: &HashMap<Arc<str>, Member>) -> View {
    View::new(
        members
            .values()
            .map(|m| ViewMember::new(&*m.name, m.generation, m.ready)),
    )
}

impl<W: Work, R> NodeCore<W, R> {
    /// One event from membership (after the takeover gate, which holds a
    /// declared death back until the member's lease must have lapsed).
    /// Failures and departures of peers come before the view that drops
    /// them, as membership emits them.
    pub fn handle_membership(&mut self, event: Event, now: Instant) {
        self.refresh_standing(now);
        match event {
            Event::Joined(m) | Event::Updated(m) | Event::Alive(m) => {
                debug!(node = %self.me, member = %m.name, state = ?m.state, ready = m.ready, "member");
                self.view_dirty = true;
            }
            Event::Suspected(m) => {
                info!(node = %self.me, member = %m.name, "member suspected");
                self.view_dirty = true;
            }
            Event::Failed(m) => {
                warn!(node = %self.me, member = %m.name, generation = m.generation, "member failed");
                let id = NodeId::new(&*m.name, m.generation);
                if id != self.me {
                    self.cancel_sends_to(&id, now);
                    if !self.handoff.has_standing() {
                        // Not failed over here (see `Handoff::peer_failed`)
                        // unless a newer generation shows it is gone.
                        if self.unresolved.len() >= self.config.max_unresolved {
                            self.unresolved.pop_front();
                        }
                        self.unresolved.push_back(id.clone());
                    }
                    self.handoff.peer_failed(&id, now);
                    self.outputs.push_back(Output::PeerGone(m.addr));
                }
                self.view_dirty = true;
            }
            Event::Left(m) => {
                info!(node = %self.me, member = %m.name, "member left");
                let id = NodeId::new(&*m.name, m.generation);
                if id != self.me {
                    self.handoff.peer_left(&id, now);
                    self.outputs.push_back(Output::PeerGone(m.addr));
                }
                self.view_dirty = true;
            }
            Event::NameConflict {
                name, local_lost, ..
            } => {
                warn!(node = %self.me, %name, local_lost, "two processes claim one name");
            }
            Event::ViewChanged(members) => self.on_members(members, now),
            // The lease comes in through `set_lease`.
            Event::StandingChanged(_) => {}
            Event::DeclaredFailed => {
                warn!(node = %self.me, "the cluster declared this node failed: fencing");
                self.handoff.fence(now);
                self.fenced = true;
                self.view_dirty = true;
            }
        }
    }

    /// Membership started a new generation of this node (`local`) after the
    /// cluster declared the old one dead: a new handoff for it, which
    /// continues the old one's epoch, installs the old one's table as its
    /// first view (it knows who held what, and waits for their notices
    /// instead of taking datums as their first owner), and knows the old
    /// generation failed. No datum is registered: the driver registers its
    /// datums again ([`Self::register`]). Jobs and sends of the old machine
    /// still running are ignored when they complete (a new
    /// [`Self::instance`]).
    ///
    /// # Errors
    /// When the new handoff cannot be made (the old one stays, fenced).
    pub fn reborn(&mut self, local: Member, now: Instant) -> Result<(), ConfigError> {
        let me = NodeId::new(&*local.name, local.generation);
        let mut handoff = Handoff::new(me.clone(), self.handoff.config().clone())?;
        // The old generation failed, and this node knows it for certain:
        // it was fenced just before, so it will neither send a notice nor a
        // done marker, and every job it still has running completes unheard
        // under a token the new generation's exceeds. Its datums are failed
        // over here as the other members fail them over: a datum this
        // generation is primary of is taken once every live member and
        // every node of the recent views said done with the view in force.
        let old_me = self.handoff.local().clone();
        handoff.observe_epoch(self.handoff.epoch());
        handoff.install(Arc::clone(self.handoff.table()), now);
        handoff.peer_failed(&old_me, now);
        for name in &self.on_demand {
            if let Ok(ty) = handoff.datum_type(name) {
                handoff.set_on_demand(ty, true);
            }
        }
        self.unresolved = self
            .handoff
            .table()
            .view()
            .nodes()
            .iter()
            .filter(|n| **n != old_me)
            .take(self.config.max_unresolved)
            .cloned()
            .collect();
        self.handoff = handoff;
        info!(node = %me, "new generation: handoff restarted");
        self.instance += 1;
        // The old machine's sends are ignored when they complete.
        self.sends.clear();
        self.me = me;
        self.local = local;
        self.members.clear();
        self.latest = None;
        self.fenced = false;
        self.view_dirty = true;
        Ok(())
    }

    /// A new member list: the peers whose done markers a first owner waits
    /// for, members departed, nodes superseded by a newer generation, and
    /// the placement table of the ready members.
    fn on_members(&mut self, members: Vec<Member>, now: Instant) {
        // Every live member, ready or not, says done before a datum is
        // taken without its notice: two nodes made ready at once each wait
        // for the other instead of both acquiring.
        let peers: Vec<NodeId> = members
            .iter()
            .filter(|m| m.state.is_live())
            .map(|m| NodeId::new(&*m.name, m.generation))
            .collect();
        self.handoff.set_peers(peers.iter(), now);
        let members: HashMap<Arc<str>, Member> = members
            .into_iter()
            .map(|m| (Arc::clone(&m.name), m))
            .collect();
        let grace = self.config.departed_grace;
        self.departed.retain(|name, at| {
            !members.contains_key(name) && now.saturating_duration_since(*at) < grace
        });
        for name in self.members.keys().filter(|n| !members.contains_key(*n)) {
            self.departed.insert(Arc::clone(name), now);
        }
        self.members = members;
        if !self.unresolved.is_empty() {
            let members = &self.members;
            let (gone, keep): (Vec<NodeId>, Vec<NodeId>) = std::mem::take(&mut self.unresolved)
                .into_iter()
                .partition(|n| {
                    members
                        .get(&*n.name)
                        .is_some_and(|m| m.generation > n.generation)
                });
            self.unresolved = keep.into();
            for n in gone {
                info!(node = %self.me, peer = %n, "superseded by a newer generation: failed over");
                self.handoff.peer_superseded(&n, now);
            }
        }
        // A node that refused is forgotten once it left the view.
        let members = &self.members;
        self.refusing.retain(|n| {
            members
                .get(&*n.name)
                .is_some_and(|m| m.generation == n.generation)
        });
        self.on_view(now);
    }

    /// Builds the table of the ready members, and installs it (`Auto`).
    fn on_view(&mut self, now: Instant) {
        self.view_dirty = true;
        let view = ready_view(&self.members);
        if self
            .latest
            .as_ref()
            .is_some_and(|t| t.view_id() == view.id())
        {
            return;
        }
        let built = PlacementTable::build_from(
            self.handoff.table(),
            view,
            &self.config.strategy,
            self.config.copies,
        );
        match built {
            Ok(table) => {
                let table = Arc::new(table);
                self.latest = Some(Arc::clone(&table));
                if self.config.install == InstallMode::Auto {
                    self.install(table, now);
                }
            }
            Err(error) => warn!(node = %self.me, %error, "placement table refused"),
        }
    }

    /// Installs `table` (unless it is the one in force) and routes the
    /// parked messages again under it.
    pub(crate) fn install(&mut self, table: Arc<PlacementTable>, now: Instant) {
        if table.view_id() == self.handoff.view_id() {
            return;
        }
        info!(node = %self.me, view = %table.view_id(), nodes = table.view().len(), "installing placement");
        self.handoff.install(table, now);
        // Notices that came before their view are taken now.
        self.release_early_notices(now);
        self.reroute_parked(now, true);
        self.view_dirty = true;
    }

    /// Stops the notice sends in flight to `node`, declared failed, and
    /// reports each failed: the handoff routes their notices again after
    /// its backoff, to the primary in force. Safe as a request timeout is:
    /// a batch the dead generation took before it was fenced gives it
    /// nothing to act on (it acquires nothing without its lease, which
    /// lapsed before the verdict reached this node through the takeover
    /// gate).
    fn cancel_sends_to(&mut self, node: &NodeId, now: Instant) {
        let ids: Vec<SendId> = self
            .sends
            .iter()
            .filter(|(_, to)| *to == node)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.sends.remove(&id);
            self.outputs.push_back(Output::CancelNotices(id));
            self.handoff
                .send_done(id, Err(format!("{node} was declared failed")), now);
        }
    }
}
