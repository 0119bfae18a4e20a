//! Feeds arbitrary bytes to the decoder of messages routed to a datum's
//! owner: nothing may panic, and what decodes must encode back to a message
//! that decodes the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::wire::Routed;

fuzz_target!(|data: &[u8]| {
    if let Ok(routed) = Routed::decode(data, 1 << 20) {
        let again = Routed::decode(&routed.encode(), 1 << 20);
        assert_eq!(again.as_ref(), Ok(&routed));
    }
});
