//! The wire format: stream preambles, length-prefixed frames and the postcard
//! envelope, with optional zstd compression.
//!
//! Everything here is pure (no I/O) so it can be fuzzed and property-tested.
//!
//! ```text
//! stream   = kind:u8 frame*            (kind: see StreamKind)
//! frame    = len:u32 little-endian, envelope (len bytes)
//! envelope = header (postcard) body    (body runs to the end of the frame)
//! header   = { version: u8 = 1, channel: u32 varint, encoding }
//! encoding = Plain | Zstd { raw_len: u64 varint }
//! datagram = DATAGRAM_TAG:u8 payload
//!
//! requests  = xframe*                 (after kind Requests)
//! answers   = xframe*                 (after kind Answers)
//! xframe    = len:u32 LE, tag:u8, id:u64 LE, rest  (len counts tag..rest)
//!   tag 1 request:  rest = envelope   (on a requests stream)
//!   tag 2 response: rest = envelope   (on an answers stream)
//!   tag 3 refusal:  rest = code:u32 LE (on an answers stream)
//! large answer = id:u64 LE, frame     (after kind LargeAnswer)
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Version written in every envelope header; a frame with another version is
/// refused (counted as malformed) and skipped.
pub const ENVELOPE_VERSION: u8 = 1;

/// First byte of every datagram; a datagram that does not start with it is
/// malformed.
pub const DATAGRAM_TAG: u8 = 0x01;

/// Bytes of the frame length prefix.
pub const LEN_PREFIX: usize = 4;

/// Upper bound of an encoded envelope header (version, channel, encoding).
pub const MAX_HEADER_LEN: usize = 20;

/// Largest frame sent on the shared per-peer message stream. Larger one-way
/// messages travel on a stream of their own (see [`StreamKind::Single`]); a
/// frame header announcing more on the shared stream is a protocol violation.
/// Every node's message limit is at least this large (checked by the config).
pub const INLINE_FRAME_MAX: usize = 64 * 1024;
/// Bodies up to this size are copied next to their header when a frame is
/// written on a stream of its own ([`OutFrame::stream_chunks`]).
pub const COPY_BODY_MAX: usize = 4096;

/// What a stream carries, from its first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum StreamKind {
    /// Uni: one frame holding a [`Hello`], then the end of the stream.
    Hello = 1,
    /// Uni, long-lived: one-way message frames back to back.
    Messages = 2,
    /// Bi: one one-way message too large for the shared stream; the receiver
    /// answers by finishing its half (accepted) or resetting it (refused).
    Single = 3,
    /// Bi: one request frame; the answer is one response frame.
    Request = 4,
    /// Uni: graceful close, phase 1: "I stopped sending; I opened this many
    /// message streams" (u32 LE), then the end of the stream.
    GoAway = 5,
    /// Uni: graceful close, phase 2: "I read all your streams and stopped
    /// sending; I opened this many message streams" (u32 LE).
    Done = 6,
    /// Uni, long-lived: requests of at most [`INLINE_FRAME_MAX`] bytes on
    /// data channels, as exchange frames ([`ExchangeTag::Request`]) naming
    /// each request by an id.
    Requests = 7,
    /// Uni, long-lived: the answers and refusals of the peer's requests
    /// (exchange frames, [`ExchangeTag::Response`] and
    /// [`ExchangeTag::Refusal`]). Apart from the requests, so that an
    /// answer never waits behind a request that waits for room here.
    Answers = 8,
    /// Uni: the request id (u64 LE), then one response frame too large for
    /// the answers stream, then the end of the stream.
    LargeAnswer = 9,
}

impl StreamKind {
    /// Parses a stream's first byte.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Hello),
            2 => Some(Self::Messages),
            3 => Some(Self::Single),
            4 => Some(Self::Request),
            5 => Some(Self::GoAway),
            6 => Some(Self::Done),
            7 => Some(Self::Requests),
            8 => Some(Self::Answers),
            9 => Some(Self::LargeAnswer),
            _ => None,
        }
    }
}

/// Application error codes used to stop or reset streams and close connections.
pub mod code {
    /// Normal end (graceful close).
    pub const OK: u32 = 0;
    /// A frame announced more than the receiver's limit.
    pub const TOO_LARGE: u32 = 1;
    /// The peer broke the framing protocol.
    pub const PROTOCOL: u32 = 2;
    /// The application dropped a request without answering.
    pub const NO_RESPONSE: u32 = 3;
    /// The peer failed a check after the handshake (name, hello).
    pub const REJECTED: u32 = 4;
    /// The connection was idle and is closed to free resources.
    pub const IDLE: u32 = 5;
    /// A newer connection to the same node replaced this one.
    pub const SUPERSEDED: u32 = 6;
    /// The endpoint shuts down.
    pub const SHUTDOWN: u32 = 7;
    /// The receiving application is gone (its inbound queue was dropped).
    pub const GONE: u32 = 8;
    /// A frame did not arrive completely within the receiver's deadline.
    pub const TIMED_OUT: u32 = 9;
}

/// Bytes before the envelope in an exchange frame: the tag and the id.
pub const EXCHANGE_PREFIX: usize = 9;

/// Largest exchange frame (without its length prefix).
pub const EXCHANGE_FRAME_MAX: usize = INLINE_FRAME_MAX + EXCHANGE_PREFIX;

/// What an exchange frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ExchangeTag {
    /// A request (an envelope) to answer with the same id.
    Request = 1,
    /// The answer (an envelope) to this side's request of that id.
    Response = 2,
    /// The request of that id is refused with a [`code`] (u32 LE): dropped
    /// unanswered, too large, malformed.
    Refusal = 3,
}

/// An exchange frame split into its parts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// What it carries.
    pub tag: ExchangeTag,
    /// The request's id, chosen by the requester, unique per connection.
    pub id: u64,
    /// An envelope (request, response) or a refusal's code.
    pub rest: Bytes,
}

/// Splits an exchange frame (without its length prefix), zero-copy.
///
/// # Errors
/// [`DecodeError::Exchange`] for a frame shorter than its prefix, an
/// unknown tag, or a refusal that is not exactly a code.
pub fn split_exchange(mut frame: Bytes) -> Result<Exchange, DecodeError> {
    if frame.len() < EXCHANGE_PREFIX {
        return Err(DecodeError::Exchange);
    }
    let head = frame.split_to(EXCHANGE_PREFIX);
    let tag = match head.first() {
        Some(1) => ExchangeTag::Request,
        Some(2) => ExchangeTag::Response,
        Some(3) if frame.len() == 4 => ExchangeTag::Refusal,
        _ => return Err(DecodeError::Exchange),
    };
    let mut id = [0u8; 8];
    id.copy_from_slice(head.get(1..).unwrap_or_default());
    Ok(Exchange {
        tag,
        id: u64::from_le_bytes(id),
        rest: frame,
    })
}

/// The code of a refusal's `rest` ([`split_exchange`] checked its length).
pub fn refusal_code(rest: &[u8]) -> u32 {
    let mut code = [0u8; 4];
    if let Some(src) = rest.get(..4) {
        code.copy_from_slice(src);
    }
    u32::from_le_bytes(code)
}

/// Appends a refusal exchange frame for request `id` with `code`.
pub fn write_refusal(id: u64, code: u32, out: &mut BytesMut) {
    out.put_u32_le((EXCHANGE_PREFIX + 4) as u32);
    out.put_u8(ExchangeTag::Refusal as u8);
    out.put_u64_le(id);
    out.put_u32_le(code);
}

/// How the body of an envelope is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Encoding {
    /// The body is the message itself.
    Plain,
    /// The body is a zstd frame that decompresses to exactly `raw_len` bytes.
    Zstd {
        /// Size of the message once decompressed.
        raw_len: u64,
    },
}

/// The envelope header (postcard). Fields are positional: only ever append
/// enum variants, and bump [`ENVELOPE_VERSION`] for anything else.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// [`ENVELOPE_VERSION`].
    pub version: u8,
    /// The application's channel (message type) id.
    pub channel: u32,
    /// How the body is encoded.
    pub encoding: Encoding,
}

/// The first and only frame of a [`StreamKind::Hello`] stream.
///
/// On the wire: `version: u8, instance: u64 varint` (postcard), then
/// `features: u32 varint, app_features: u32 varint`. A node from before the
/// features decodes the first two fields and ignores the rest; a hello
/// without features (from such a node) decodes with both 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    /// [`ENVELOPE_VERSION`].
    pub version: u8,
    /// Random per process start: tells a restarted peer from a racing dial.
    pub instance: u64,
    /// What the sender's transport speaks beyond the envelope version
    /// ([`features`]): a node uses a feature towards a peer only if the
    /// peer's hello names it, so that nodes of two versions can run in one
    /// cluster (a rolling upgrade).
    pub features: u32,
    /// The application's features, for the application: the transport only
    /// carries them ([`crate::TransportConfig::app_features`]).
    pub app_features: u32,
}

/// The features a [`Hello`] names.
pub mod features {
    /// Requests multiplexed on the requests and answers streams
    /// ([`super::StreamKind::Requests`], [`super::StreamKind::Answers`],
    /// [`super::StreamKind::LargeAnswer`]). Towards a peer without it, every
    /// request takes a bi stream of its own.
    pub const REQUEST_STREAMS: u32 = 1;
    /// Everything this version speaks.
    pub const ALL: u32 = REQUEST_STREAMS;
}

/// The two fields every hello starts with.
#[derive(Serialize, Deserialize)]
struct HelloHead {
    version: u8,
    instance: u64,
}

/// Why bytes from the network were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A frame announced more bytes than the receiver accepts.
    #[error("frame of {announced} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Length from the frame header (or decompressed length).
        announced: u64,
        /// The receiver's limit.
        limit: u64,
    },
    /// The envelope header did not parse.
    #[error("malformed envelope header: {0}")]
    Header(String),
    /// The envelope carries a version this node does not speak.
    #[error("unsupported envelope version {0}")]
    Version(u8),
    /// The compressed body did not decompress to its announced size.
    #[error("bad compressed body: {0}")]
    Compression(String),
    /// An exchange frame too short for its prefix, with an unknown tag, or
    /// a refusal without exactly a code.
    #[error("malformed exchange frame")]
    Exchange,
    /// A stream started with an unknown kind byte.
    #[error("unknown stream kind {0}")]
    StreamKind(u8),
    /// A datagram was empty or had an unknown tag.
    #[error("malformed datagram")]
    Datagram,
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// A compressed body announced more than its channel's compression ratio
    /// allows (a decompression bomb): refused before decompressing.
    #[error(
        "{raw_len} bytes from a {compressed}-byte compressed body exceed the ratio {max_ratio}"
    )]
    Ratio {
        /// Decompressed length the header announced.
        raw_len: u64,
        /// Length of the compressed body.
        compressed: u64,
        /// The channel's largest accepted ratio.
        max_ratio: u32,
    },
}

/// The receiver's caps on one channel's messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Largest message, decompressed.
    pub max_size: usize,
    /// Largest decompressed / compressed ratio of a zstd body.
    pub max_ratio: u32,
}

/// The caps of every channel: a default and per-channel overrides, each
/// within the node's message limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caps {
    default: Cap,
    channels: Vec<(u32, Cap)>,
}

impl Caps {
    /// Caps of `max_message` bytes and ratio `max_ratio` for every channel,
    /// except the `overrides` (each cut to `max_message`).
    pub fn new(max_message: usize, max_ratio: u32, overrides: &[(u32, Cap)]) -> Self {
        let mut channels: Vec<(u32, Cap)> = overrides
            .iter()
            .map(|&(ch, c)| {
                (
                    ch,
                    Cap {
                        max_size: c.max_size.min(max_message),
                        max_ratio: c.max_ratio.max(1),
                    },
                )
            })
            .collect();
        channels.sort_by_key(|&(ch, _)| ch);
        channels.dedup_by_key(|&mut (ch, _)| ch);
        Self {
            default: Cap {
                max_size: max_message,
                max_ratio: max_ratio.max(1),
            },
            channels,
        }
    }

    /// The caps of `channel`.
    pub fn of(&self, channel: u32) -> Cap {
        match self.channels.binary_search_by_key(&channel, |&(ch, _)| ch) {
            Ok(i) => self.channels.get(i).map_or(self.default, |&(_, c)| c),
            Err(_) => self.default,
        }
    }

    /// The caps of `channel` on the shared message stream, which carries
    /// messages of at most [`INLINE_FRAME_MAX`] bytes, decompressed.
    pub fn inline(&self, channel: u32) -> Cap {
        let c = self.of(channel);
        Cap {
            max_size: c.max_size.min(INLINE_FRAME_MAX),
            max_ratio: c.max_ratio,
        }
    }

    /// The largest message any channel accepts.
    pub fn max_size(&self) -> usize {
        self.channels
            .iter()
            .map(|(_, c)| c.max_size)
            .fold(self.default.max_size, usize::max)
    }
}

/// What a frame's header says, checked against the caps of its channel
/// before its body is decompressed (or, on a stream of its own, read).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inspected {
    /// The header.
    pub header: Header,
    /// Bytes of the encoded header (the body follows them).
    pub header_len: usize,
    /// Length of the message once decoded (verified when decoding).
    pub size: usize,
}

/// Parses the header at the start of a frame (without its length prefix)
/// whose total length is `frame_len`, and checks the announced size and
/// compression ratio against `caps(channel)`. `head` may hold only the first
/// bytes of the frame (at least the header, or all of a shorter frame).
pub fn inspect(
    head: &[u8],
    frame_len: usize,
    caps: impl Fn(u32) -> Cap,
) -> Result<Inspected, DecodeError> {
    let head = head.get(..frame_len.min(head.len())).unwrap_or(head);
    let (header, rest) = postcard::take_from_bytes::<Header>(head)
        .map_err(|e| DecodeError::Header(e.to_string()))?;
    if header.version != ENVELOPE_VERSION {
        return Err(DecodeError::Version(header.version));
    }
    let header_len = head.len() - rest.len();
    let body_len = frame_len - header_len;
    let cap = caps(header.channel);
    let size = match header.encoding {
        Encoding::Plain => body_len as u64,
        Encoding::Zstd { raw_len } => raw_len,
    };
    if size > cap.max_size as u64 {
        return Err(DecodeError::TooLarge {
            announced: size,
            limit: cap.max_size as u64,
        });
    }
    if let Encoding::Zstd { raw_len } = header.encoding
        && raw_len > (body_len as u64).saturating_mul(u64::from(cap.max_ratio))
    {
        return Err(DecodeError::Ratio {
            raw_len,
            compressed: body_len as u64,
            max_ratio: cap.max_ratio,
        });
    }
    Ok(Inspected {
        header,
        header_len,
        size: size as usize,
    })
}

thread_local! {
    /// This thread's zstd compression context, made on first use: making
    /// one costs more than compressing a few kilobytes.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    /// This thread's zstd decompression context, likewise.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Compresses `body` at `level` with this thread's context.
fn compress(body: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compressor = match cell.as_mut() {
            Some(c) => {
                c.set_compression_level(level)?;
                c
            }
            None => cell.insert(zstd::bulk::Compressor::new(level)?),
        };
        compressor.compress(body)
    })
}

/// Decompresses `body` into `out` (at most its capacity) with this
/// thread's context.
fn decompress(body: &[u8], out: &mut Vec<u8>) -> std::io::Result<usize> {
    DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decompressor = match cell.as_mut() {
            Some(d) => d,
            None => cell.insert(zstd::bulk::Decompressor::new()?),
        };
        decompressor.decompress_to_buffer(body, out)
    })
}

/// Decodes the body of a frame [`inspect`] accepted: zero-copy when plain; a
/// compressed body is decompressed into a buffer of exactly the announced
/// size, and must fill it exactly.
pub fn decode_body(frame: Bytes, inspected: &Inspected) -> Result<Bytes, DecodeError> {
    let body = frame.slice(inspected.header_len.min(frame.len())..);
    match inspected.header.encoding {
        Encoding::Plain => Ok(body),
        Encoding::Zstd { .. } => {
            let raw_len = inspected.size;
            let mut out = Vec::with_capacity(raw_len);
            // Writes at most `raw_len` bytes: a body that decompresses to
            // more fails here instead of growing the buffer.
            let n =
                decompress(&body, &mut out).map_err(|e| DecodeError::Compression(e.to_string()))?;
            if n != raw_len {
                return Err(DecodeError::Compression(format!(
                    "{n} bytes instead of the announced {raw_len}"
                )));
            }
            Ok(Bytes::from(out))
        }
    }
}

/// A message ready for the wire: its header and its (possibly compressed) body.
#[derive(Clone, Debug)]
pub struct OutFrame {
    /// The envelope header.
    pub header: Header,
    /// The encoded body.
    pub body: Bytes,
}

impl OutFrame {
    /// Prepares `body` for `channel`, compressing it with zstd when it is at
    /// least `compress_min` bytes long and compression makes it smaller.
    ///
    /// The caller checks the size limit first: this never refuses.
    pub fn new(channel: u32, body: Bytes, compress_min: usize, level: i32) -> Self {
        Self::within_ratio(channel, body, compress_min, level, u32::MAX)
    }

    /// As [`OutFrame::new`], but sends the body plain when compression would
    /// exceed `max_ratio` (the receiver refuses such frames as bombs; a
    /// sender with the same caps never has a message refused for it).
    pub fn within_ratio(
        channel: u32,
        body: Bytes,
        compress_min: usize,
        level: i32,
        max_ratio: u32,
    ) -> Self {
        let mut header = Header {
            version: ENVELOPE_VERSION,
            channel,
            encoding: Encoding::Plain,
        };
        if body.len() >= compress_min
            && let Ok(compressed) = compress(&body, level)
            && compressed.len() < body.len()
            && (body.len() as u64) <= (compressed.len() as u64).saturating_mul(u64::from(max_ratio))
        {
            header.encoding = Encoding::Zstd {
                raw_len: body.len() as u64,
            };
            return Self {
                header,
                body: Bytes::from(compressed),
            };
        }
        Self { header, body }
    }

    /// Size of the message before compression.
    pub fn header_raw_len(&self) -> u64 {
        match self.header.encoding {
            Encoding::Plain => self.body.len() as u64,
            Encoding::Zstd { raw_len } => raw_len,
        }
    }

    /// Whether the body is compressed.
    pub fn is_compressed(&self) -> bool {
        matches!(self.header.encoding, Encoding::Zstd { .. })
    }

    /// Length of the frame on the wire, prefix included.
    pub fn wire_len(&self) -> usize {
        LEN_PREFIX + header_len(&self.header) + self.body.len()
    }

    /// Appends the frame (length prefix, header, body) to `out`.
    pub fn write_to(&self, out: &mut BytesMut) {
        out.reserve(self.wire_len());
        self.write_head(out);
        out.put_slice(&self.body);
    }

    /// Appends the frame as an exchange frame (length prefix, `tag`, `id`,
    /// header, body) to `out`.
    pub fn write_exchange(&self, tag: ExchangeTag, id: u64, out: &mut BytesMut) {
        out.reserve(EXCHANGE_PREFIX + self.wire_len());
        let mut header = [0u8; MAX_HEADER_LEN];
        let used = postcard::to_slice(&self.header, &mut header)
            .map(|s| s.len())
            .unwrap_or(0);
        out.put_u32_le((EXCHANGE_PREFIX + used + self.body.len()) as u32);
        out.put_u8(tag as u8);
        out.put_u64_le(id);
        out.put_slice(header.get(..used).unwrap_or_default());
        out.put_slice(&self.body);
    }

    /// Whether the frame fits a shared stream: the message, decompressed,
    /// with the largest header, is at most [`INLINE_FRAME_MAX`] bytes (what
    /// a reader of a shared stream accepts, [`Caps::inline`]), so its
    /// envelope is too.
    pub fn fits_inline(&self) -> bool {
        self.header_raw_len() <= (INLINE_FRAME_MAX - MAX_HEADER_LEN) as u64
    }

    /// The frame as the chunks to write on a stream of its own: one buffer
    /// (one allocation, one chunk for quinn) for a body of at most
    /// [`COPY_BODY_MAX`] bytes, which is copied next to its header, or the
    /// head and the body, which is not copied. `kind`, if given, goes first.
    /// (The second chunk is empty in the first case.)
    pub fn stream_chunks(&self, kind: Option<StreamKind>) -> [Bytes; 2] {
        let kind_len = usize::from(kind.is_some());
        if self.body.len() <= COPY_BODY_MAX {
            let mut out = BytesMut::with_capacity(kind_len + self.wire_len());
            if let Some(k) = kind {
                out.put_u8(k as u8);
            }
            self.write_to(&mut out);
            return [out.freeze(), Bytes::new()];
        }
        let mut head = BytesMut::with_capacity(kind_len + LEN_PREFIX + MAX_HEADER_LEN);
        if let Some(k) = kind {
            head.put_u8(k as u8);
        }
        self.write_head(&mut head);
        [head.freeze(), self.body.clone()]
    }

    /// The length prefix and header alone (the body follows them on the wire).
    pub fn head_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(LEN_PREFIX + MAX_HEADER_LEN);
        self.write_head(&mut out);
        out.freeze()
    }

    fn write_head(&self, out: &mut BytesMut) {
        let mut header = [0u8; MAX_HEADER_LEN];
        // The header always fits MAX_HEADER_LEN: version 1 byte, channel at
        // most 5 (u32 varint), encoding tag 1, raw_len at most 10 (u64 varint).
        let used = postcard::to_slice(&self.header, &mut header)
            .map(|s| s.len())
            .unwrap_or(0);
        out.put_u32_le((used + self.body.len()) as u32);
        out.put_slice(header.get(..used).unwrap_or_default());
    }

    /// The frame as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.wire_len());
        self.write_to(&mut out);
        out.freeze()
    }
}

fn header_len(header: &Header) -> usize {
    let mut buf = [0u8; MAX_HEADER_LEN];
    postcard::to_slice(header, &mut buf)
        .map(|s| s.len())
        .unwrap_or(MAX_HEADER_LEN)
}

/// Largest frame (without its length prefix) that can carry a message of
/// `max_message` bytes.
pub fn max_frame_len(max_message: usize) -> usize {
    max_message.saturating_add(MAX_HEADER_LEN)
}

/// Checks a frame length prefix against the receiver's limits.
pub fn check_frame_len(len: u32, max_frame: usize) -> Result<usize, DecodeError> {
    let len = len as usize;
    if len > max_frame {
        return Err(DecodeError::TooLarge {
            announced: len as u64,
            limit: max_frame as u64,
        });
    }
    Ok(len)
}

/// Decodes one frame (without its length prefix) into `(channel, message)`,
/// refusing it when it exceeds the caps of its channel ([`inspect`]).
///
/// The message is a zero-copy slice of `frame` when uncompressed. A
/// compressed body is decompressed into a buffer of exactly its announced
/// size, allocated only after that size and the ratio were checked.
pub fn decode_envelope(frame: Bytes, caps: &Caps) -> Result<(u32, Bytes), DecodeError> {
    let inspected = inspect(&frame, frame.len(), |ch| caps.of(ch))?;
    let body = decode_body(frame, &inspected)?;
    Ok((inspected.header.channel, body))
}

/// Encodes a [`Hello`] as a frame.
pub fn encode_hello(hello: &Hello) -> Bytes {
    let mut body = [0u8; 32];
    let head = HelloHead {
        version: hello.version,
        instance: hello.instance,
    };
    // Head at most 1 + 10 bytes, features at most 2 × 5: always fits.
    let used = postcard::to_slice(&(head, hello.features, hello.app_features), &mut body)
        .map(|s| s.len())
        .unwrap_or(0);
    let mut out = BytesMut::with_capacity(1 + LEN_PREFIX + used);
    out.put_u8(StreamKind::Hello as u8);
    out.put_u32_le(used as u32);
    out.put_slice(body.get(..used).unwrap_or_default());
    out.freeze()
}

/// Largest hello frame accepted.
pub const MAX_HELLO_LEN: usize = 64;

/// Decodes a [`Hello`] frame body.
pub fn decode_hello(frame: &[u8]) -> Result<Hello, DecodeError> {
    let (head, rest) = postcard::take_from_bytes::<HelloHead>(frame)
        .map_err(|e| DecodeError::Header(e.to_string()))?;
    if head.version != ENVELOPE_VERSION {
        return Err(DecodeError::Version(head.version));
    }
    // Absent in a hello from a node without features; anything after them
    // is a later version's and ignored.
    let mut features = [0u32; 2];
    let mut rest = rest;
    for f in &mut features {
        if rest.is_empty() {
            break;
        }
        let (value, after) = postcard::take_from_bytes::<u32>(rest)
            .map_err(|e| DecodeError::Header(e.to_string()))?;
        (*f, rest) = (value, after);
    }
    let [features, app_features] = features;
    Ok(Hello {
        version: head.version,
        instance: head.instance,
        features,
        app_features,
    })
}

/// Splits a byte stream of length-prefixed frames back into frames.
///
/// Chunks go in with [`FrameReader::push`]; whole frames come out of
/// [`FrameReader::next_frame`] as zero-copy slices. A length prefix above the
/// reader's limit is an error and the stream must be abandoned: nothing is
/// allocated for it.
#[derive(Debug)]
pub struct FrameReader {
    buf: BytesMut,
    max_frame: usize,
}

impl FrameReader {
    /// A reader that refuses frames longer than `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max_frame,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete frame, `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, DecodeError> {
        let Some(prefix) = self.buf.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; LEN_PREFIX];
        len_bytes.copy_from_slice(prefix);
        let len = check_frame_len(u32::from_le_bytes(len_bytes), self.max_frame)?;
        if self.buf.len() < LEN_PREFIX + len {
            return Ok(None);
        }
        let _ = self.buf.split_to(LEN_PREFIX);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Whether bytes of an unfinished frame are buffered.
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Whether the reader holds a buffer (an allocation, empty or not).
    pub fn holds_buffer(&self) -> bool {
        self.buf.capacity() > 0
    }

    /// Frees the buffer when it holds no partial frame: its allocation,
    /// shared with the frames already taken from it, is freed when they
    /// are.
    pub fn release(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }
}

/// Checks a received datagram and returns its payload.
pub fn decode_datagram(datagram: Bytes) -> Result<Bytes, DecodeError> {
    match datagram.first() {
        Some(&DATAGRAM_TAG) => Ok(datagram.slice(1..)),
        _ => Err(DecodeError::Datagram),
    }
}

/// Frames a datagram payload.
pub fn encode_datagram(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(1 + payload.len());
    out.put_u8(DATAGRAM_TAG);
    out.put_slice(payload);
    out.freeze()
}

/// Runs every decoder over arbitrary bytes, as a peer could send them: the
/// entry point of the fuzz target and of the random-bytes property test.
/// Returns how many messages decoded; never panics.
pub fn decode_untrusted(data: &[u8], max_message: usize) -> usize {
    // Channel 1 with a larger ratio, like a node's state channels.
    let caps = Caps::new(
        max_message,
        64,
        &[(
            1,
            Cap {
                max_size: max_message,
                max_ratio: 1024,
            },
        )],
    );
    let mut decoded = 0;
    let _ = decode_datagram(Bytes::copy_from_slice(data));
    let _ = decode_hello(data);
    let Some((&kind, rest)) = data.split_first() else {
        return 0;
    };
    let _ = StreamKind::from_byte(kind);
    let mut reader = FrameReader::new(max_frame_len(max_message));
    // Feed in uneven chunks to exercise reassembly.
    for chunk in rest.chunks(usize::from(kind % 13) + 1) {
        reader.push(chunk);
        loop {
            match reader.next_frame() {
                Ok(Some(frame)) => {
                    // As on the shared stream: inline caps, then decode.
                    if let Ok(i) = inspect(&frame, frame.len(), |ch| caps.inline(ch))
                        && decode_body(frame.clone(), &i).is_ok()
                    {
                        decoded += 1;
                    }
                    if decode_envelope(frame.clone(), &caps).is_ok() {
                        decoded += 1;
                    }
                    // As on the exchange streams: the prefix, then the
                    // envelope of a request or response.
                    if let Ok(x) = split_exchange(frame) {
                        if x.tag == ExchangeTag::Refusal {
                            let _ = refusal_code(&x.rest);
                        } else if let Ok(i) = inspect(&x.rest, x.rest.len(), |ch| caps.inline(ch))
                            && decode_body(x.rest.clone(), &i).is_ok()
                        {
                            decoded += 1;
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return decoded,
            }
        }
    }
    decoded
}

#[cfg(test)]
mod tests;
