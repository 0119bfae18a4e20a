//! Errors of placement.

/// Why a [`crate::PlacementTable`] could not be built. Every one of them is a
/// configuration mistake; nothing is built and nothing else changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// `copies` was 0: every datum needs at least a primary.
    #[error("copies must be at least 1")]
    ZeroCopies,
    /// A rendezvous strategy with 0 partitions.
    #[error("the number of partitions must be at least 1")]
    ZeroPartitions,
    /// A rendezvous strategy with more partitions than supported.
    #[error("{partitions} partitions is more than the maximum of {max}")]
    TooManyPartitions {
        /// Partitions asked for.
        partitions: u32,
        /// [`crate::Strategy::MAX_PARTITIONS`].
        max: u32,
    },
    /// More nodes than a [`crate::NodeIndex`] can number.
    #[error("{nodes} nodes is more than the maximum of {max}")]
    TooManyNodes {
        /// Nodes in the view.
        nodes: usize,
        /// Largest supported view.
        max: usize,
    },
    /// The owner rows (partitions × min(copies, nodes)) would exceed the
    /// table size limit.
    #[error("a table of {entries} owner entries is more than the maximum of {max}")]
    TableTooLarge {
        /// Entries the table would need.
        entries: u64,
        /// [`crate::PlacementTable::MAX_ENTRIES`].
        max: u64,
    },
}
