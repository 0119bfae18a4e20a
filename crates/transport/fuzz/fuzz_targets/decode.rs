//! Feeds arbitrary bytes to every decoder the transport runs on bytes from
//! the network, as a stream and as a datagram: nothing may panic, and no
//! allocation may exceed the caps passed in (size and compression ratio per
//! channel, checked before decompression).

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_transport::frame::{
    Cap, Caps, FrameReader, decode_body, decode_datagram, decode_envelope, decode_hello, inspect,
    max_frame_len,
};
use shoal_transport::Bytes;

fuzz_target!(|data: &[u8]| {
    // The combined entry point (kind byte, chunked reassembly, envelopes).
    let _ = shoal_transport::frame::decode_untrusted(data, 64 * 1024);
    // Each decoder alone, on the whole input.
    let _ = decode_datagram(Bytes::copy_from_slice(data));
    let _ = decode_hello(data);
    // Channel 1 allows a large ratio (like a node's state channels).
    let caps = Caps::new(
        1024,
        64,
        &[(1, Cap { max_size: 1024, max_ratio: 1 << 20 })],
    );
    let _ = decode_envelope(Bytes::copy_from_slice(data), &caps);
    let mut reader = FrameReader::new(max_frame_len(1024));
    reader.push(data);
    while let Ok(Some(frame)) = reader.next_frame() {
        // As a stream of its own reads it: the header from the first bytes.
        if let Ok(i) = inspect(frame.get(..20).unwrap_or(&frame), frame.len(), |ch| caps.of(ch)) {
            let _ = decode_body(frame.clone(), &i);
        }
        let _ = decode_envelope(frame, &caps);
    }
});
