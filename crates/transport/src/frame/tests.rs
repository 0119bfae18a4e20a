//! Unit and property tests of the wire format: round trips under any
//! chunking, and hostile frames refused by the decoder without panics.

use super::*;
use proptest::prelude::*;

fn caps(max: usize) -> Caps {
    Caps::new(max, u32::MAX, &[])
}

fn roundtrip(channel: u32, body: &[u8], compress_min: usize) -> (u32, Bytes, bool) {
    let frame = OutFrame::new(channel, Bytes::copy_from_slice(body), compress_min, 1);
    let compressed = frame.is_compressed();
    let wire = frame.to_bytes();
    assert_eq!(wire.len(), frame.wire_len());
    let mut reader = FrameReader::new(max_frame_len(1 << 20));
    reader.push(&wire);
    let f = reader.next_frame().unwrap().unwrap();
    assert!(!reader.has_partial());
    let (ch, msg) = decode_envelope(f, &caps(1 << 20)).unwrap();
    (ch, msg, compressed)
}

#[test]
fn stream_chunks_are_the_frame_after_its_kind_copied_or_not() {
    for len in [0, 100, COPY_BODY_MAX, COPY_BODY_MAX + 1, 100_000] {
        let body: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let f = OutFrame::new(9, Bytes::from(body), usize::MAX, 1);
        let chunks = f.stream_chunks(Some(StreamKind::Request));
        assert_eq!(chunks[1].is_empty(), len <= COPY_BODY_MAX, "len {len}");
        let mut want = vec![StreamKind::Request as u8];
        want.extend_from_slice(&f.to_bytes());
        assert_eq!([&chunks[0][..], &chunks[1][..]].concat(), want, "len {len}");
        let plain = f.stream_chunks(None);
        assert_eq!([&plain[0][..], &plain[1][..]].concat(), &want[1..]);
    }
}

#[test]
fn small_message_stays_plain_and_round_trips() {
    let (ch, msg, compressed) = roundtrip(7, b"hello", 0);
    assert_eq!(ch, 7);
    assert_eq!(&msg[..], b"hello");
    assert!(!compressed, "compression must not grow a small message");
}

#[test]
fn compressible_message_is_compressed_and_restored() {
    let body = vec![b'a'; 100_000];
    let (ch, msg, compressed) = roundtrip(u32::MAX, &body, 1024);
    assert!(compressed);
    assert_eq!(ch, u32::MAX);
    assert_eq!(&msg[..], &body[..]);
}

#[test]
fn incompressible_message_is_sent_plain() {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let body: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let (_, msg, compressed) = roundtrip(1, &body, 16);
    assert!(!compressed);
    assert_eq!(&msg[..], &body[..]);
}

#[test]
fn oversized_prefix_is_refused_before_buffering() {
    let mut reader = FrameReader::new(100);
    reader.push(&1000u32.to_le_bytes());
    assert!(matches!(
        reader.next_frame(),
        Err(DecodeError::TooLarge {
            announced: 1000,
            limit: 100
        })
    ));
}

#[test]
fn decompression_bomb_is_refused_by_announced_size() {
    let body = vec![0u8; 1 << 20];
    let frame = OutFrame::new(1, Bytes::from(body), 1, 1);
    assert!(frame.is_compressed());
    let wire = frame.to_bytes();
    let err = decode_envelope(wire.slice(LEN_PREFIX..), &caps(1000)).unwrap_err();
    assert!(matches!(err, DecodeError::TooLarge { .. }));
}

#[test]
fn lying_raw_len_is_refused() {
    let body = vec![7u8; 10_000];
    let mut frame = OutFrame::new(1, Bytes::from(body), 1, 1);
    frame.header.encoding = Encoding::Zstd { raw_len: 9_000 };
    let wire = frame.to_bytes();
    assert!(decode_envelope(wire.slice(LEN_PREFIX..), &caps(1 << 20)).is_err());
    frame.header.encoding = Encoding::Zstd { raw_len: 11_000 };
    let wire = frame.to_bytes();
    assert!(decode_envelope(wire.slice(LEN_PREFIX..), &caps(1 << 20)).is_err());
}

#[test]
fn wrong_version_is_refused() {
    let mut frame = OutFrame::new(1, Bytes::from_static(b"x"), 100, 1);
    frame.header.version = 2;
    let wire = frame.to_bytes();
    assert_eq!(
        decode_envelope(wire.slice(LEN_PREFIX..), &caps(100)),
        Err(DecodeError::Version(2))
    );
}

#[test]
fn exchange_frames_round_trip_and_malformed_ones_are_refused() {
    let frame = OutFrame::new(4, Bytes::from(vec![7u8; 3000]), 64, 1);
    let mut wire = BytesMut::new();
    frame.write_exchange(ExchangeTag::Response, u64::MAX - 1, &mut wire);
    write_refusal(9, code::NO_RESPONSE, &mut wire);
    assert_eq!(
        wire.len(),
        EXCHANGE_PREFIX + frame.wire_len() + LEN_PREFIX + EXCHANGE_PREFIX + 4
    );
    let mut reader = FrameReader::new(EXCHANGE_FRAME_MAX);
    reader.push(&wire);
    let x = split_exchange(reader.next_frame().unwrap().unwrap()).unwrap();
    assert_eq!((x.tag, x.id), (ExchangeTag::Response, u64::MAX - 1));
    let (ch, body) = decode_envelope(x.rest, &caps(1 << 20)).unwrap();
    assert_eq!((ch, &body[..]), (4, &[7u8; 3000][..]));
    let x = split_exchange(reader.next_frame().unwrap().unwrap()).unwrap();
    assert_eq!((x.tag, x.id), (ExchangeTag::Refusal, 9));
    assert_eq!(refusal_code(&x.rest), code::NO_RESPONSE);
    assert!(!reader.has_partial());
    // Too short, an unknown tag, a refusal without exactly a code.
    for bad in [
        &[1u8, 0, 0][..],
        &[4, 1, 0, 0, 0, 0, 0, 0, 0, 1],
        &[3, 1, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3],
    ] {
        assert_eq!(
            split_exchange(Bytes::copy_from_slice(bad)),
            Err(DecodeError::Exchange)
        );
    }
    // What fits a shared stream is decided by the size decompressed, which
    // is what its reader accepts.
    let plain = |n: usize| OutFrame::new(1, Bytes::from(vec![0u8; n]), usize::MAX, 1);
    assert!(plain(INLINE_FRAME_MAX - MAX_HEADER_LEN).fits_inline());
    assert!(!plain(INLINE_FRAME_MAX - MAX_HEADER_LEN + 1).fits_inline());
    let compressed = OutFrame::new(1, Bytes::from(vec![0u8; 1 << 20]), 1, 1);
    assert!(compressed.is_compressed() && compressed.wire_len() < 1000);
    assert!(!compressed.fits_inline());
}

#[test]
fn a_reader_frees_its_buffer_only_between_frames() {
    let wire = OutFrame::new(2, Bytes::from(vec![3u8; 500]), usize::MAX, 1).to_bytes();
    let mut reader = FrameReader::new(INLINE_FRAME_MAX);
    reader.push(&wire[..100]);
    reader.release();
    assert!(reader.has_partial(), "a partial frame is kept");
    reader.push(&wire[100..]);
    let frame = reader.next_frame().unwrap().unwrap();
    reader.release();
    assert!(!reader.holds_buffer() && !reader.has_partial());
    // The frame taken before keeps its bytes; the reader goes on.
    assert_eq!(decode_envelope(frame, &caps(1 << 20)).unwrap().1.len(), 500);
    reader.push(&wire);
    assert!(reader.next_frame().unwrap().is_some());
}

#[test]
fn hello_round_trips() {
    let hello = Hello {
        version: ENVELOPE_VERSION,
        instance: u64::MAX,
        features: features::ALL,
        app_features: u32::MAX,
    };
    let wire = encode_hello(&hello);
    assert_eq!(wire[0], StreamKind::Hello as u8);
    let mut reader = FrameReader::new(MAX_HELLO_LEN);
    reader.push(&wire[1..]);
    let frame = reader.next_frame().unwrap().unwrap();
    assert_eq!(decode_hello(&frame).unwrap(), hello);
}

/// Nodes of the version before the features and of this one understand
/// each other's hellos.
#[test]
fn hellos_with_and_without_features_are_understood_both_ways() {
    // A node without features decoded the two fields with `from_bytes`,
    // which ignores what follows them.
    let new = encode_hello(&Hello {
        version: ENVELOPE_VERSION,
        instance: 7,
        features: features::ALL,
        app_features: 5,
    });
    let old: (u8, u64) = postcard::from_bytes(&new[1 + LEN_PREFIX..]).unwrap();
    assert_eq!(old, (ENVELOPE_VERSION, 7));
    // Its hello: the two fields alone, features 0 here.
    let old = postcard::to_allocvec(&(ENVELOPE_VERSION, 7u64)).unwrap();
    let hello = decode_hello(&old).unwrap();
    assert_eq!(
        (hello.instance, hello.features, hello.app_features),
        (7, 0, 0)
    );
    // A later version's fields after the features are ignored.
    let mut later = new[1 + LEN_PREFIX..].to_vec();
    later.extend_from_slice(&[0xff, 0x01, 9]);
    let hello = decode_hello(&later).unwrap();
    assert_eq!((hello.features, hello.app_features), (features::ALL, 5));
    // Features cut short are malformed.
    let mut cut = old.clone();
    cut.push(0x80);
    assert!(decode_hello(&cut).is_err());
}

#[test]
fn datagram_tag_is_checked() {
    let d = encode_datagram(b"ping");
    assert_eq!(&decode_datagram(d).unwrap()[..], b"ping");
    assert!(decode_datagram(Bytes::new()).is_err());
    assert!(decode_datagram(Bytes::from_static(b"\x02ping")).is_err());
}

#[test]
fn bomb_is_refused_by_ratio_before_decompression() {
    // 16 MiB of zeros compress to a few hundred bytes.
    let frame = OutFrame::new(5, Bytes::from(vec![0u8; 16 << 20]), 1, 1);
    assert!(frame.is_compressed());
    let wire = frame.to_bytes();
    let caps = Caps::new(16 << 20, 64, &[]);
    let err = decode_envelope(wire.slice(LEN_PREFIX..), &caps).unwrap_err();
    assert!(
        matches!(err, DecodeError::Ratio { max_ratio: 64, .. }),
        "{err}"
    );
    // On a channel allowed a large ratio but a small size: too large.
    let small = Caps::new(
        16 << 20,
        64,
        &[(
            5,
            Cap {
                max_size: 1 << 20,
                max_ratio: u32::MAX,
            },
        )],
    );
    let err = decode_envelope(wire.slice(LEN_PREFIX..), &small).unwrap_err();
    assert!(matches!(err, DecodeError::TooLarge { .. }), "{err}");
    // The shared stream's caps: 64 KiB whatever the channel allows.
    assert_eq!(small.inline(5).max_size, INLINE_FRAME_MAX);
    assert_eq!(small.of(6).max_ratio, 64);
}

#[test]
fn sender_stays_within_the_ratio() {
    let zeros = Bytes::from(vec![0u8; 60_000]);
    assert!(OutFrame::within_ratio(1, zeros.clone(), 1, 1, u32::MAX).is_compressed());
    let f = OutFrame::within_ratio(1, zeros, 1, 1, 64);
    assert!(!f.is_compressed(), "over the ratio: sent plain");
    let caps = Caps::new(1 << 20, 64, &[]);
    assert!(decode_envelope(f.to_bytes().slice(LEN_PREFIX..), &caps).is_ok());
}

/// A bomb-shaped or garbled frame: a real zstd body (of zeros or noise),
/// then the header lies about the size, or the body is cut or flipped.
fn adversarial_frame() -> impl Strategy<Value = (Bytes, u64)> {
    (
        any::<u32>(),
        0usize..(3 << 20),
        any::<bool>(),
        0u8..4,
        any::<u64>(),
        any::<u16>(),
    )
        .prop_map(|(channel, raw, zeros, lie, lied_len, cut)| {
            let body: Vec<u8> = if zeros {
                vec![0u8; raw]
            } else {
                (0..raw.min(4096))
                    .map(|i| (i as u32).wrapping_mul(2_654_435_761) as u8 ^ (i >> 8) as u8)
                    .collect()
            };
            let mut f = OutFrame::new(channel, Bytes::from(body), 1, 1);
            let mut declared = f.header_raw_len();
            match lie {
                1 => {
                    declared = lied_len % (8 << 20);
                    f.header.encoding = Encoding::Zstd { raw_len: declared };
                }
                2 => {
                    let keep = f
                        .body
                        .len()
                        .saturating_sub(usize::from(cut))
                        .max(1)
                        .min(f.body.len());
                    f.body = f.body.slice(..keep);
                }
                3 => {
                    let mut b = f.body.to_vec();
                    let at = usize::from(cut) % b.len().max(1);
                    if let Some(x) = b.get_mut(at) {
                        *x ^= 0x5a;
                    }
                    f.body = Bytes::from(b);
                }
                _ => {}
            }
            (f.to_bytes().slice(LEN_PREFIX..), declared)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn adversarial_frames_are_refused_not_panicked(
        (frame, declared) in adversarial_frame(),
        max in (64usize << 10)..(4 << 20),
        ratio in 1u32..2000,
    ) {
        let caps = Caps::new(max, ratio, &[]);
        if let Ok((_, body)) = decode_envelope(frame.clone(), &caps) {
            // Whatever decodes is within the caps and as announced.
            prop_assert!(body.len() <= max);
            prop_assert_eq!(body.len() as u64, declared);
        }
        // The same bytes as a stream, in pieces.
        let mut stream = BytesMut::new();
        stream.put_u8(StreamKind::Single as u8);
        stream.put_u32_le(frame.len() as u32);
        stream.extend_from_slice(&frame);
        let _ = decode_untrusted(&stream, max);
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode_untrusted(&data, 1024);
    }

    #[test]
    fn frames_round_trip_in_any_chunking(
        msgs in proptest::collection::vec((any::<u32>(), proptest::collection::vec(any::<u8>(), 0..2000)), 1..20),
        chunk in 1usize..300,
    ) {
        let mut wire = BytesMut::new();
        for (ch, body) in &msgs {
            OutFrame::new(*ch, Bytes::copy_from_slice(body), 512, 1).write_to(&mut wire);
        }
        let mut reader = FrameReader::new(max_frame_len(4096));
        let mut out = Vec::new();
        for piece in wire.chunks(chunk) {
            reader.push(piece);
            while let Some(frame) = reader.next_frame().unwrap() {
                out.push(decode_envelope(frame, &caps(4096)).unwrap());
            }
        }
        prop_assert!(!reader.has_partial());
        prop_assert_eq!(out.len(), msgs.len());
        for ((ch, body), (och, obody)) in msgs.iter().zip(out) {
            prop_assert_eq!(*ch, och);
            prop_assert_eq!(&body[..], &obody[..]);
        }
    }
}
