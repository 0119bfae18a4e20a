//! Feeds arbitrary bytes to every decoder the transport runs on bytes from
//! the network, as a stream and as a datagram: nothing may panic, and no
//! allocation may exceed the caps passed in (size and compression ratio per
//! channel, checked before decompression).
//!
//! Inputs go up to 4 MiB (`cargo xtask fuzz` passes `-max_len=4194304`).
//! Random bytes are almost never a valid zstd body, so the input is also
//! compressed for real and framed with an honest or a lying decompressed
//! size, and (the amplification case) repeated up to 4 MiB first, which
//! compresses to a few hundred bytes: a bomb the caps must refuse unread.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_transport::Bytes;
use shoal_transport::frame::{
    Cap, Caps, DecodeError, ENVELOPE_VERSION, Encoding, FrameReader, Header, OutFrame, decode_body,
    decode_datagram, decode_envelope, decode_hello, inspect, max_frame_len,
};

/// Largest expansion of the input (what a small compressed frame may
/// decompress to).
const EXPANDED: usize = 4 << 20;

/// Caps like a node's: 16 MiB messages, ratio 64, and channel 1 (like the
/// membership and notice channels) at 4 MiB with ratio 1,024.
fn node_caps() -> Caps {
    Caps::new(
        16 << 20,
        64,
        &[(
            1,
            Cap {
                max_size: 4 << 20,
                max_ratio: 1024,
            },
        )],
    )
}

fn small_caps() -> Caps {
    Caps::new(
        1024,
        64,
        &[(
            1,
            Cap {
                max_size: 1024,
                max_ratio: 1 << 20,
            },
        )],
    )
}

/// The frame decoders of a stream, with `caps`.
fn decode_stream(data: &[u8], caps: &Caps) {
    let _ = decode_envelope(Bytes::copy_from_slice(data), caps);
    let mut reader = FrameReader::new(max_frame_len(caps.max_size()));
    reader.push(data);
    while let Ok(Some(frame)) = reader.next_frame() {
        // As a stream of its own reads it: the header from the first bytes.
        if let Ok(i) = inspect(frame.get(..20).unwrap_or(&frame), frame.len(), |ch| {
            caps.of(ch)
        }) {
            if let Ok(body) = decode_body(frame.clone(), &i) {
                assert!(body.len() <= caps.of(i.header.channel).max_size);
            }
        }
        let _ = decode_envelope(frame, caps);
    }
}

/// A real zstd body of `raw`, framed on `channel` announcing `raw_len`:
/// accepted only if honest and within the channel's caps.
fn compressed_frame(raw: &[u8], channel: u32, raw_len: u64, caps: &Caps) {
    let Ok(z) = zstd::bulk::compress(raw, 1) else {
        return;
    };
    let frame = OutFrame {
        header: Header {
            version: ENVELOPE_VERSION,
            channel,
            encoding: Encoding::Zstd { raw_len },
        },
        body: Bytes::from(z),
    };
    let bytes = frame.to_bytes();
    // Without the length prefix: the envelope.
    let envelope = bytes.slice(4..);
    let cap = caps.of(channel);
    match decode_envelope(envelope, caps) {
        Ok((ch, body)) => {
            assert_eq!(ch, channel);
            assert_eq!(body.len() as u64, raw_len, "announced size not enforced");
            assert!(body.len() <= cap.max_size, "size cap not enforced");
            assert!(
                raw_len <= (frame.body.len() as u64).saturating_mul(u64::from(cap.max_ratio)),
                "ratio cap not enforced"
            );
            assert_eq!(&body[..], raw);
        }
        Err(DecodeError::TooLarge { .. } | DecodeError::Ratio { .. }) => {}
        Err(DecodeError::Compression(_)) if raw_len != raw.len() as u64 => {}
        Err(e) => panic!("unexpected refusal of a well-formed frame: {e}"),
    }
    // Through the stream reader too.
    decode_stream(&bytes, caps);
}

fuzz_target!(|data: &[u8]| {
    // The combined entry point (kind byte, chunked reassembly, envelopes).
    let _ = shoal_transport::frame::decode_untrusted(data, 64 * 1024);
    // Each decoder alone, on the whole input.
    let _ = decode_datagram(Bytes::copy_from_slice(data));
    let _ = decode_hello(data);
    decode_stream(data, &small_caps());
    let caps = node_caps();
    decode_stream(data, &caps);

    // Real compressed bodies. The first byte picks the case.
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let raw: Vec<u8> = if pick & 0xF0 == 0xA0 && !rest.is_empty() {
        // Amplification (1 input in 16: compressing 4 MiB is slow): the
        // rest repeated up to 4 MiB.
        rest.iter().copied().cycle().take(EXPANDED).collect()
    } else {
        rest.to_vec()
    };
    let channel = u32::from(pick & 1);
    let honest = raw.len() as u64;
    let raw_len = match (pick >> 1) & 3 {
        0 => honest,
        1 => honest.saturating_sub(1),
        2 => honest + 1,
        _ => u64::from(u32::MAX),
    };
    compressed_frame(&raw, channel, raw_len, &caps);
});
