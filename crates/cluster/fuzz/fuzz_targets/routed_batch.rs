//! Feeds arbitrary bytes to the splitter of routed-message batches: nothing
//! may panic, every message it returns lies inside the input, and what
//! splits encodes back to the same bytes.

#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use shoal::wire::{Routed, RoutedBatch};

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(messages) = RoutedBatch::split(&bytes, 1 << 20) {
        assert_eq!(RoutedBatch::encode(&messages), bytes);
        for m in &messages {
            let _ = Routed::decode_shared(m, 1 << 20);
        }
    }
});
