//! Feeds arbitrary bytes to the decoder of messages routed to a datum's
//! owner: nothing may panic, and what decodes must encode back to a message
//! that decodes the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::wire::Routed;

fn check(data: &[u8], max: usize) {
    if let Ok(routed) = Routed::decode(data, max) {
        assert!(routed.payload.len() <= max);
        let again = Routed::decode(&routed.encode(), max);
        assert_eq!(again.as_ref(), Ok(&routed));
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, 1 << 20);
    // Inputs up to 4 MiB against a node's default limit (16 MiB), and the
    // amplification case: what a small compressed frame decompresses to
    // (the input repeated up to 4 MiB).
    check(data, 16 << 20);
    if let Some((&pick, unit)) = data.split_first()
        && pick == 0xA5
        && !unit.is_empty()
    {
        let big: Vec<u8> = unit.iter().copied().cycle().take(4 << 20).collect();
        check(&big, 16 << 20);
    }
});
