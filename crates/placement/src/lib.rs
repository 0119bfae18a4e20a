//! Placement of datums on cluster nodes: the seed's mod-N with replica copies, and minimal-movement strategies. Sans-IO.
