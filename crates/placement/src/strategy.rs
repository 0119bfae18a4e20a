//! Which rule maps datums to nodes.

use serde::{Deserialize, Serialize};

/// Which rule maps datums to nodes. Deserialisable from configuration files.
///
/// serde form (externally tagged): `"ModN"`, or
/// `{"Rendezvous": {"partitions": 131072}}` (`partitions` may be left out for
/// [`Strategy::DEFAULT_PARTITIONS`]). The aliases `"mod_n"` and
/// `"rendezvous"` are accepted as well.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Strategy {
    /// The seed's rule: the owners of datum `id` are
    /// `ready[(id + i) mod n]` for `i` in `0..min(copies, n)`, primary first.
    /// Perfect balance for sequential ids and the fastest lookup, but a
    /// change of `n` moves about `n/(n+1)` of all datums.
    #[default]
    #[serde(alias = "mod_n")]
    ModN,
    /// Minimal movement: datum ids are mixed onto a fixed number of
    /// `partitions`; each partition goes to the node with the highest
    /// rendezvous weight among those with room under a load bound of
    /// [`Strategy::LOAD_BOUND_PERCENT`] % above the mean (bounded-load
    /// rendezvous, computed as a stable assignment); replicas are the
    /// next-best nodes by weight. A join moves about `1/(n+1)` of the datums,
    /// a leave about `1/n`.
    #[serde(alias = "rendezvous")]
    Rendezvous {
        /// Number of partitions; fixed for the life of a cluster (changing it
        /// moves nearly every datum). Large against the number of nodes: see
        /// [`Strategy::DEFAULT_PARTITIONS`].
        #[serde(default = "default_partitions")]
        partitions: u32,
    },
}

fn default_partitions() -> u32 {
    Strategy::DEFAULT_PARTITIONS
}

impl Strategy {
    /// Default partition count of [`Strategy::Rendezvous`]: 2^17. With the
    /// load bound no node is the primary of more than 1.05 times its share
    /// of partitions (plus rounding); for every cluster of up to 100 nodes a
    /// join moves at most 1.06/(n+1) of the datums and the most loaded node
    /// holds at most 1.08 times the mean of a million datums. Larger clusters
    /// want more partitions (see `docs/placement.md` for the figures and the
    /// trade-off).
    pub const DEFAULT_PARTITIONS: u32 = 1 << 17;

    /// Largest accepted partition count (2^24).
    pub const MAX_PARTITIONS: u32 = 1 << 24;

    /// The load bound of [`Strategy::Rendezvous`]: no node is the primary of
    /// more than `ceil(partitions × (100 + LOAD_BOUND_PERCENT) / (100 × n))`
    /// partitions.
    pub const LOAD_BOUND_PERCENT: u32 = 5;

    /// [`Strategy::Rendezvous`] with [`Strategy::DEFAULT_PARTITIONS`].
    #[must_use]
    pub const fn rendezvous() -> Strategy {
        Strategy::Rendezvous {
            partitions: Strategy::DEFAULT_PARTITIONS,
        }
    }

    /// Short lower-case name: `"modn"` or `"rendezvous"`.
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Strategy::ModN => "modn",
            Strategy::Rendezvous { .. } => "rendezvous",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_forms() {
        for s in [Strategy::ModN, Strategy::Rendezvous { partitions: 123 }] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<Strategy>(&json).unwrap(), s);
        }
        assert_eq!(serde_json::to_string(&Strategy::ModN).unwrap(), r#""ModN""#);
        assert_eq!(
            serde_json::to_string(&Strategy::Rendezvous { partitions: 8 }).unwrap(),
            r#"{"Rendezvous":{"partitions":8}}"#
        );
        assert_eq!(
            serde_json::from_str::<Strategy>(r#""mod_n""#).unwrap(),
            Strategy::ModN
        );
        assert_eq!(
            serde_json::from_str::<Strategy>(r#"{"rendezvous":{}}"#).unwrap(),
            Strategy::rendezvous()
        );
        assert_eq!(
            serde_json::from_str::<Strategy>(r#"{"Rendezvous":{"partitions":9}}"#).unwrap(),
            Strategy::Rendezvous { partitions: 9 }
        );
        assert!(serde_json::from_str::<Strategy>(r#""Ring""#).is_err());
        assert!(serde_json::from_str::<Strategy>(r#"{"Rendezvous":{"partitions":-1}}"#).is_err());
        assert_eq!(Strategy::default(), Strategy::ModN);
    }

    #[test]
    fn names() {
        assert_eq!(Strategy::ModN.name(), "modn");
        assert_eq!(Strategy::rendezvous().name(), "rendezvous");
    }
}
