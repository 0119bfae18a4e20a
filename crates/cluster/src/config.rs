//! Node configuration: serde-deserialisable, so it can come from a file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_placement::Strategy;

use crate::error::ConfigError;

/// Everything a node needs to start. Deserialisable (JSON, TOML, ...);
/// durations are whole milliseconds (`*_ms` fields).
///
/// ```
/// let config: shoal::NodeConfig = serde_json::from_str(r#"{
///     "name": "node-1",
///     "bind": "127.0.0.1:7946",
///     "tls": { "files": { "dir": "/etc/shoal" } },
///     "copies": 1,
///     "strategy": "ModN",
///     "timing": "lan",
///     "transition": "auto"
/// }"#).unwrap();
/// assert_eq!(config.transition_timeout_ms, 10_000);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// The node's name: unique in the cluster, a lowercase DNS-style name
    /// (`node-1`, `db7.rack3`), the name its certificate carries.
    pub name: String,
    /// UDP address to bind (one port carries everything). Port 0 picks one.
    pub bind: SocketAddr,
    /// Address the other nodes reach this node at, when it differs from the
    /// bound one (NAT, containers). Required when `bind` is a wildcard
    /// address (`0.0.0.0`, `::`).
    pub advertise: Option<SocketAddr>,
    /// Certificates: PEM files, or a development CA.
    pub tls: TlsConfig,
    /// Owners per datum (primary plus replicas). The seed's `Copies(n)`.
    pub copies: usize,
    /// Which rule places datums on ready nodes.
    pub strategy: Strategy,
    /// Membership timing profile.
    pub timing: Timing,
    /// Who starts transitions: every view change (`auto`) or the
    /// application through [`Node::transition`](crate::Node::transition)
    /// (`manual`, as the seed).
    pub transition: TransitionMode,
    /// How long a new owner waits for a relinquish notice before it acquires
    /// anyway. Every node of a cluster should use the same value.
    pub transition_timeout_ms: u64,
    /// How long [`Node::join`](crate::Node::join) waits for a seed to answer.
    pub join_timeout_ms: u64,
    /// Bounds of every queue and buffer.
    pub limits: Limits,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            name: String::new(),
            bind: SocketAddr::from(([0, 0, 0, 0], 7946)),
            advertise: None,
            tls: TlsConfig::default(),
            copies: 1,
            strategy: Strategy::ModN,
            timing: Timing::Lan,
            transition: TransitionMode::Auto,
            transition_timeout_ms: 10_000,
            join_timeout_ms: 10_000,
            limits: Limits::default(),
        }
    }
}

impl NodeConfig {
    /// A configuration for tests and local demos: `name`, bound to
    /// `127.0.0.1:0`, the `local` timing profile, and
    /// [`TlsConfig::Provided`]: the identity is given in code to
    /// [`Node::start_with_identity`] (for example one of
    /// [`throwaway_cluster`](crate::throwaway_cluster)'s). To start it with
    /// [`Node::start`], set `tls` first (`TlsConfig::DevCa` for a
    /// development CA kept in a directory, `TlsConfig::Files` in production);
    /// otherwise `start` fails with [`StartError::NoIdentity`].
    ///
    /// [`Node::start_with_identity`]: crate::Node::start_with_identity
    /// [`Node::start`]: crate::Node::start
    /// [`StartError::NoIdentity`]: crate::StartError::NoIdentity
    pub fn local(name: &str) -> NodeConfig {
        NodeConfig {
            name: name.to_owned(),
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            timing: Timing::Local,
            ..NodeConfig::default()
        }
    }

    /// The transition timeout as a duration.
    pub fn transition_timeout(&self) -> Duration {
        Duration::from_millis(self.transition_timeout_ms)
    }

    /// Checks the values the layers do not check themselves.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.copies == 0 {
            return Err(ConfigError::Invalid("copies must be at least 1"));
        }
        if self.transition_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "transition_timeout_ms must be positive",
            ));
        }
        if self.join_timeout_ms == 0 {
            return Err(ConfigError::Invalid("join_timeout_ms must be positive"));
        }
        self.limits.validate()
    }
}

/// Where the node's certificate comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsConfig {
    /// `node.crt`, `node.key` and `ca.crt` (PEM) in `dir`, as
    /// `shoal_transport::NodeIdentity::write_pem_files` writes them.
    Files {
        /// The directory.
        dir: PathBuf,
    },
    /// Development only: a cluster CA kept in `dir` (`ca.crt`, `ca.key`),
    /// created there if missing, issues this node a fresh certificate at
    /// start. Every node given the same directory joins the same cluster.
    /// Never use it in production: the CA key sits next to the data.
    DevCa {
        /// The directory holding the development CA.
        dir: PathBuf,
    },
    /// The identity is passed in code
    /// ([`Node::start_with_identity`](crate::Node::start_with_identity)).
    #[default]
    Provided,
}

/// Membership timing profile (see `shoal_membership::Config`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Timing {
    /// One data centre: probe every 100 ms, a crashed node is declared dead
    /// about 1.1–1.6 s after the crash (16 nodes), its datums taken over
    /// about 0.25 s after that (the lease's takeover delay).
    #[default]
    Lan,
    /// Regions apart: probe every 5 s.
    Wan,
    /// One host (tests, demos): probe every 100 ms.
    Local,
}

impl Timing {
    /// The membership configuration of this profile.
    pub fn membership(self) -> shoal_membership::Config {
        match self {
            Timing::Lan => shoal_membership::Config::lan(),
            Timing::Wan => shoal_membership::Config::wan(),
            Timing::Local => shoal_membership::Config::local(),
        }
    }
}

/// Who runs transitions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransitionMode {
    /// Every view change installs the new placement at once and the handoff
    /// runs by itself.
    #[default]
    Auto,
    /// A view change is only announced (change notifications); the
    /// application calls [`Node::transition`](crate::Node::transition), as
    /// with the seed.
    Manual,
}

/// Bounds of the node's queues. Each says what happens when it is full.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest user metadata, bytes. More is an error
    /// ([`Error::MetadataTooLarge`](crate::Error::MetadataTooLarge)).
    pub max_metadata: usize,
    /// Commands from API handles waiting for the driver. When full, API
    /// calls wait for room.
    pub command_queue: usize,
    /// Messages for datum owners waiting for the driver, from this node's
    /// `send_to_owner` calls and (a queue of their own) from peers. When
    /// full, `send_to_owner` waits, and so does the reading of peers'
    /// messages (backpressure). Messages from peers also hold their bytes
    /// in `inbound_bytes` while they wait.
    pub owner_queue: usize,
    /// Received messages waiting per typed channel. When full, peers'
    /// messages for the channel wait apart, in order, each holding its bytes
    /// in its sender's share of `inbound_bytes` (so a channel nobody reads
    /// pins at most the share of each peer that sends to it, which is then
    /// read no further and pushed back by QUIC flow control); other
    /// channels, other peers, membership and notices go on. Counted
    /// (`Snapshot::facade.channel_full`) and logged at warn with the
    /// channel and the peer. Messages from peers also hold their bytes in
    /// `inbound_bytes` until the application takes them.
    pub channel_queue: usize,
    /// Bytes of messages from peers (decompressed, plus 128 bytes each) this
    /// node holds at once: from the moment the transport reads a message's
    /// header until its consumer is done with it, wherever it waits (the
    /// transport's queue, the owner-routed queue, a channel's queue, held
    /// or parked work, early notices). One peer gets at most half. When
    /// full, the node stops reading that peer's (or every peer's) data
    /// messages and QUIC flow control makes the senders wait; each wait is
    /// counted (`Snapshot::transport.inbound_budget_waits`, and
    /// `inbound_budget_stalls` with a warning when it lasts over 1 s).
    /// Membership messages and notice batches are not charged here: they
    /// have a budget of their own (4 × (4 MiB + 1 MiB), one peer half), so
    /// they never wait for data nobody consumes. At least 4 ×
    /// `max_message` is used. Default 64 MiB.
    pub inbound_bytes: usize,
    /// Items waiting per peer to be handed to the transport. When full,
    /// membership datagrams are dropped (counted; SWIM tolerates loss) and
    /// messages wait in the driver's backlog, which pauses intake of new
    /// owner-routed messages until there is room.
    pub peer_queue: usize,
    /// Pieces of work held for datums in flight. When full, more work for a
    /// datum in flight is dropped and counted (`shoal_routed_dropped_total`,
    /// reason `hold_full`).
    pub hold_capacity: usize,
    /// Concurrent relinquish jobs (spawned tasks).
    pub max_relinquish_jobs: usize,
    /// Concurrent acquire jobs (spawned tasks).
    pub max_acquire_jobs: usize,
    /// Largest message, bytes (transport limit, both directions).
    pub max_message: usize,
    /// Times a message sent to a datum's owner may be forwarded again by a
    /// node that is no longer the owner.
    pub max_forward_hops: u8,
    /// Poll each relinquish / acquire future once on the driver before
    /// spawning it: one that completes without waiting costs no task. Its
    /// code up to its first `.await` then runs on the driver, so it must not
    /// block (do blocking work in `spawn_blocking`). `false` spawns every job.
    pub inline_first_poll: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_metadata: 512,
            command_queue: 1024,
            owner_queue: 8192,
            channel_queue: 8192,
            inbound_bytes: 64 << 20,
            peer_queue: 8192,
            hold_capacity: 65_536,
            max_relinquish_jobs: 256,
            max_acquire_jobs: 256,
            max_message: 16 << 20,
            max_forward_hops: 1,
            inline_first_poll: true,
        }
    }
}

impl Limits {
    /// Checks every bound is positive.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let zero = [
            (self.command_queue, "limits.command_queue"),
            (self.owner_queue, "limits.owner_queue"),
            (self.channel_queue, "limits.channel_queue"),
            (self.peer_queue, "limits.peer_queue"),
            (self.hold_capacity, "limits.hold_capacity"),
            (self.max_relinquish_jobs, "limits.max_relinquish_jobs"),
            (self.max_acquire_jobs, "limits.max_acquire_jobs"),
        ];
        if let Some((_, name)) = zero.iter().find(|(v, _)| *v == 0) {
            return Err(ConfigError::Zero(name));
        }
        if self.max_message < 64 * 1024 {
            return Err(ConfigError::Invalid(
                "limits.max_message must be at least 64 KiB",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_round_trip() {
        let config = NodeConfig::local("a");
        config.validate().unwrap();
        let json = serde_json::to_string(&config).unwrap();
        let back: NodeConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn bad_values_are_refused() {
        let mut c = NodeConfig::local("a");
        c.copies = 0;
        assert!(c.validate().is_err());
        let mut c = NodeConfig::local("a");
        c.limits.owner_queue = 0;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Zero("limits.owner_queue"))
        ));
        assert!(serde_json::from_str::<NodeConfig>(r#"{"nmae": "x"}"#).is_err());
    }

    #[test]
    fn file_forms() {
        let c: NodeConfig = serde_json::from_str(
            r#"{"name":"n1","tls":{"dev_ca":{"dir":"/tmp/ca"}},"timing":"wan",
                "strategy":{"Rendezvous":{"partitions":64}},"transition":"manual"}"#,
        )
        .unwrap();
        assert_eq!(c.timing, Timing::Wan);
        assert_eq!(c.transition, TransitionMode::Manual);
        assert_eq!(c.strategy, Strategy::Rendezvous { partitions: 64 });
        assert!(matches!(c.tls, TlsConfig::DevCa { .. }));
    }
}
