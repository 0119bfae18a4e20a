//! Deterministic discrete-event simulator for shoal's sans-IO layers: many nodes on a virtual clock and network.
