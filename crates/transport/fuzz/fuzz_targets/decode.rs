//! Feeds arbitrary bytes to every decoder the transport runs on bytes from
//! the network, as a stream and as a datagram: nothing may panic, and no
//! allocation may exceed the limit passed in.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_transport::frame::{
    FrameReader, decode_datagram, decode_envelope, decode_hello, max_frame_len,
};
use shoal_transport::Bytes;

fuzz_target!(|data: &[u8]| {
    // The combined entry point (kind byte, chunked reassembly, envelopes).
    let _ = shoal_transport::frame::decode_untrusted(data, 64 * 1024);
    // Each decoder alone, on the whole input.
    let _ = decode_datagram(Bytes::copy_from_slice(data));
    let _ = decode_hello(data);
    let _ = decode_envelope(Bytes::copy_from_slice(data), 1024);
    let mut reader = FrameReader::new(max_frame_len(1024));
    reader.push(data);
    while let Ok(Some(frame)) = reader.next_frame() {
        let _ = decode_envelope(frame, 1024);
    }
});
