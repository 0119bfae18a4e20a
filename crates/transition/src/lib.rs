//! The relinquish / notice / acquire handoff of datums between nodes, as a sans-IO state machine.
