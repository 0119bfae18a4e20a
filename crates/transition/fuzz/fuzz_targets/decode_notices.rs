//! Bytes from a peer: decode them as a notice batch, and feed them to a node
//! in the middle of a transition. Neither may panic; a refused batch must
//! change nothing.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use shoal_placement::{NodeId, PlacementTable, Strategy, View};
use shoal_transition::{Config, Handoff, NoticeBatch, WireLimits};

fn tables() -> &'static (Arc<PlacementTable>, Arc<PlacementTable>) {
    static T: OnceLock<(Arc<PlacementTable>, Arc<PlacementTable>)> = OnceLock::new();
    T.get_or_init(|| {
        let a = NodeId::new("a", 1);
        let b = NodeId::new("b", 2);
        let one = View::from_nodes([a.clone()]);
        let two = View::from_nodes([a, b]);
        (
            Arc::new(PlacementTable::build(one, &Strategy::ModN, 1).unwrap()),
            Arc::new(PlacementTable::build(two, &Strategy::ModN, 1).unwrap()),
        )
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = NoticeBatch::decode(data, &WireLimits::default());
    // The amplification case: what a small compressed frame decompresses to
    // (the input repeated up to 4 MiB), decoded with limits as large.
    if let Some((&pick, unit)) = data.split_first()
        && pick == 0xA5
        && !unit.is_empty()
    {
        let big: Vec<u8> = unit.iter().copied().cycle().take(4 << 20).collect();
        let limits = WireLimits {
            max_bytes: 4 << 20,
            ..WireLimits::default()
        };
        let _ = NoticeBatch::decode(&big, &limits);
    }

    let now = Instant::now();
    let a = NodeId::new("a", 1);
    let b = NodeId::new("b", 2);
    let (one, two) = tables();
    let mut node: Handoff<()> = Handoff::new(b, Config::default()).unwrap();
    for id in 0..8 {
        node.register_named("series", id, now).unwrap();
    }
    node.install(Arc::clone(one), now);
    node.install(Arc::clone(two), now);
    let before = node.progress();
    if node.handle_notices(&a, data, now).is_err() {
        assert_eq!(node.progress(), before, "a refused batch changed the state");
    }
});
