//! What each fuzz target asserts about one input. Shared by the fuzz targets and by the
//! root crate's `rust/tests/fuzz_corpus.rs` (which includes this file by path), so plain
//! `cargo test` replays every committed corpus and regression input with the same checks.
//!
//! Input layouts (the first bytes pick the limits, so the fuzzer explores them too):
//! - `decode_frames`: `[limits, chunking, stream...]`: the stream goes to one
//!   `FrameDecoder` in a single `feed` and to another in the chunks the second byte picks;
//!   both must give the same frames and the same error, every frame must be a map within
//!   `max_depth`, every error one of the documented decode errors at the right frame, and
//!   the decoder must not allocate more than a fixed multiple of the input.
//! - `roundtrip`: `[limits, body...]`: a body that decodes must encode, decode to the
//!   same value and encode to the same bytes again (also for bare values via `unpack`).
//! - `dedup_ring`: `[capacity, max_key_len, ops...]`: each op is an insert, get or contains
//!   on a `DedupRing` and on a `VecDeque` model of a FIFO ring; the answers must agree.
//! - `tls_session`: `[chunking, bytes...]`: a client's bytes to a fresh server
//!   `TlsSession` in the chunks the first byte picks: never a panic inside rustls (one
//!   crafted ClientHello record once made it panic and stopped the server), once an error
//!   always an error, nothing held after one, what it sends the peer bounded.
//! - `jws`: `[mode, bytes...]`: an even mode gives the bytes as a token's text, an odd
//!   one signs them first (header, 0xFF, payload) with the target's HS256 secret: never a
//!   panic; parts decoded only when they encode back to the very token; a token signed
//!   with the secret always decodes and verifies.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::VecDeque;
use std::num::NonZeroUsize;

use _native::codec::{
    decode_body, unpack, write_frame, write_value, FrameDecoder, Value, ValueBuilder,
    DEFAULT_MAX_DEPTH, DEFAULT_MAX_FRAME, HEADER_LEN, MAX_DEPTH_LIMIT,
};
use _native::dedup::DedupRing;
use _native::error::Error;
use _native::jwt::{self, HmacVerifier};
use _native::tls::{self, TlsSession, PANICKED};

// ---------------------------------------------------------------------------------------
// Allocation accounting
// ---------------------------------------------------------------------------------------

/// A global allocator that counts each thread's live heap bytes and their peak, so a
/// check can bound what one decode allocates (libFuzzer's `-malloc_limit_mb` needs a
/// sanitizer's malloc hooks, which a build without ASan does not have).
pub struct Tracking;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn count(delta: isize) {
    // `try_with`: allocations during thread teardown simply go uncounted.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; the bookkeeping only
// touches const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        count(-(layout.size() as isize));
        System.dealloc(p, layout);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let q = System.realloc(p, layout, new_size);
        if !q.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        q
    }
}

/// Runs `f` and returns its result and the most heap it held at once beyond what was live
/// before (0 unless [`Tracking`] is the global allocator).
pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, (peak - base).max(0) as usize)
}

/// The most one `feed` of `n` bytes may allocate at once: every declared but unfilled
/// array slot (a 32-byte `Value`) or map entry (56 bytes for at least 2 bytes) of all the
/// open containers together needs its own input byte(s), so at most 32 bytes per input
/// byte; plus copied str/bin bytes, the output `Vec` (at most one 32-byte value per
/// 5-byte frame, doubled by growth) and the incomplete-frame buffer.
pub fn alloc_bound(n: usize) -> usize {
    48 * n + 4096
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// `max_frame` and `max_depth` picked by one input byte.
pub fn limits(byte: u8) -> (usize, usize) {
    let max_frame = [16, 256, 65_536, DEFAULT_MAX_FRAME][usize::from(byte & 3)];
    let max_depth =
        [DEFAULT_MAX_DEPTH, 1, 2, 3, 8, 64, 100, MAX_DEPTH_LIMIT][usize::from((byte >> 2) & 7)];
    (max_frame, max_depth)
}

/// Splits `stream` into chunks picked by `seed`: the low 3 bits pick the largest chunk,
/// the rest seed a xorshift generator; some chunks are empty.
pub fn chunks(stream: &[u8], seed: u8) -> Vec<&[u8]> {
    let span = [1, 2, 3, 4, 7, 64, 4096, usize::MAX][usize::from(seed & 7)];
    let mut state = u64::from(seed >> 3).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state as usize
    };
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        if next() % 8 == 0 {
            out.push(&rest[..0]);
        }
        let len = if span == usize::MAX {
            rest.len()
        } else {
            (1 + next() % span).min(rest.len())
        };
        let (chunk, tail) = rest.split_at(len);
        out.push(chunk);
        rest = tail;
    }
    out
}

/// Structural equality that compares floats bit for bit (NaN payloads included).
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Float(x), Value::Float(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((kp, vp), (kq, vq))| kp == kq && same(vp, vq))
        }
        _ => a == b,
    }
}

fn all_same(a: &[Value], b: &[Value]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(p, q)| same(p, q))
}

/// Container nesting depth (the outermost container is 1).
pub fn depth(v: &Value) -> usize {
    match v {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Map(entries) => 1 + entries.iter().map(|(_, v)| depth(v)).max().unwrap_or(0),
        _ => 0,
    }
}

/// Whether `e` is one of the decode errors PROTOCOL.md section 3 lists (all `bad_frame`
/// or `frame_too_large` on the wire).
pub fn is_documented_decode_error(e: &Error) -> bool {
    matches!(
        e,
        Error::FrameTooLarge { .. }
            | Error::InvalidMsgpack { .. }
            | Error::TrailingBytes { .. }
            | Error::NotAMap { .. }
            | Error::NonStringKey { .. }
            | Error::TooDeep { .. }
            | Error::InvalidUtf8 { .. }
            | Error::LengthOverrun { .. }
            | Error::UnsupportedType { .. }
    )
}

/// Where each complete frame of `stream` starts, and the length of the incomplete tail:
/// the framing rule of PROTOCOL.md section 3, written out independently of the decoder.
fn frame_starts(stream: &[u8]) -> (Vec<(usize, usize)>, usize) {
    let mut starts = Vec::new();
    let mut pos = 0;
    while let Some(header) = stream.get(pos..pos + HEADER_LEN) {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        starts.push((pos, len));
        if stream.len() - pos - HEADER_LEN < len {
            break;
        }
        pos += HEADER_LEN + len;
    }
    (starts, stream.len() - pos)
}

// ---------------------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------------------

/// The `decode_frames` target.
pub fn decode_frames(data: &[u8]) {
    let [cfg, seed, stream @ ..] = data else {
        return;
    };
    let (max_frame, max_depth) = limits(*cfg);

    // The whole stream in one feed, with its allocations counted.
    let mut dec = FrameDecoder::new(max_frame, max_depth).expect("limits are valid");
    let mut whole = Vec::new();
    let (result, peak) = peak_during(|| dec.feed(stream, &mut ValueBuilder, &mut whole));
    assert!(
        peak <= alloc_bound(stream.len()),
        "decoding {} bytes allocated {peak} bytes at once",
        stream.len()
    );

    for v in &whole {
        assert!(matches!(v, Value::Map(_)), "a frame decoded to a non-map");
        assert!(depth(v) <= max_depth, "a frame nests past max_depth");
    }

    let (starts, tail) = frame_starts(stream);
    match &result {
        Ok(()) => {
            assert!(!dec.is_failed());
            // Every complete frame decoded; only the incomplete tail is held, and a tail
            // whose header is complete declares at most max_frame.
            let complete = starts
                .iter()
                .filter(|(pos, len)| pos + HEADER_LEN + len <= stream.len())
                .count();
            assert_eq!(whole.len(), complete);
            assert_eq!(dec.buffered(), tail);
            assert!(dec.buffered() < HEADER_LEN + max_frame);
        }
        Err(e) => {
            assert!(dec.is_failed());
            assert_eq!(dec.buffered(), 0, "a failed decoder keeps no buffer");
            // The error names the frame after the ones decoded, at its stream offset.
            let Error::InFrame {
                stream_offset,
                source,
            } = e
            else {
                panic!("a stream error without its frame offset: {e:?}");
            };
            assert!(is_documented_decode_error(source), "undocumented: {e:?}");
            let (pos, len) = starts[whole.len()];
            assert_eq!(*stream_offset, pos as u64);
            assert_eq!(
                matches!(**source, Error::FrameTooLarge { .. }),
                len > max_frame
            );
            assert!(matches!(
                dec.feed(b"\x00", &mut ValueBuilder, &mut Vec::new()),
                Err(Error::DecoderFailed { .. })
            ));
        }
    }

    // The same stream in chunks: the same frames and the same error.
    let mut dec = FrameDecoder::new(max_frame, max_depth).expect("limits are valid");
    let mut chunked = Vec::new();
    let mut chunked_result = Ok(());
    for chunk in chunks(stream, *seed) {
        chunked_result = dec.feed(chunk, &mut ValueBuilder, &mut chunked);
        if chunked_result.is_err() {
            break;
        }
        assert!(dec.buffered() < HEADER_LEN + max_frame);
    }
    assert_eq!(result, chunked_result, "the chunking changed the error");
    assert!(
        all_same(&whole, &chunked),
        "the chunking changed the frames"
    );
}

/// The `roundtrip` target.
pub fn roundtrip(data: &[u8]) {
    let [cfg, body @ ..] = data else {
        return;
    };
    let (_, max_depth) = limits(*cfg);
    let max_frame = u32::MAX as usize;

    match decode_body(body, max_depth, &mut ValueBuilder) {
        Ok(value) => {
            let mut encoded = Vec::new();
            write_frame(&mut encoded, &value, max_frame, max_depth)
                .expect("a decoded frame re-encodes");
            let len = u32::from_be_bytes([encoded[0], encoded[1], encoded[2], encoded[3]]);
            assert_eq!(len as usize, encoded.len() - HEADER_LEN);
            let again = decode_body(&encoded[HEADER_LEN..], max_depth, &mut ValueBuilder)
                .expect("an encoded frame decodes");
            assert!(same(&value, &again), "{value:?} != {again:?}");
            let mut reencoded = Vec::new();
            write_frame(&mut reencoded, &again, max_frame, max_depth).expect("re-encodes");
            assert_eq!(encoded, reencoded, "encoding is not canonical");
            // The streaming decoder agrees on the encoded frame.
            let mut dec = FrameDecoder::new(max_frame, max_depth).expect("limits are valid");
            let mut out = Vec::new();
            dec.feed(&encoded, &mut ValueBuilder, &mut out)
                .expect("the stream decodes");
            assert!(all_same(&out, &[value]));
        }
        Err(e) => assert!(is_documented_decode_error(&e), "undocumented: {e:?}"),
    }

    // Any bare value (not only maps) round-trips through unpack / write_value.
    if let Ok(value) = unpack(body, max_depth, &mut ValueBuilder) {
        let mut encoded = Vec::new();
        write_value(&mut encoded, &value, max_depth).expect("a decoded value re-encodes");
        let again = unpack(&encoded, max_depth, &mut ValueBuilder).expect("decodes again");
        assert!(same(&value, &again), "{value:?} != {again:?}");
    }
}

/// The `dedup_ring` target.
pub fn dedup_ring(data: &[u8]) {
    let [cap, key_limit, ops @ ..] = data else {
        return;
    };
    let capacity = usize::from(cap % 16) + 1;
    let max_key_len = usize::from(key_limit % 9);
    let mut ring = DedupRing::new(NonZeroUsize::new(capacity).expect("nonzero"), max_key_len);
    // The model: (key, seq) in insertion order, oldest first.
    let mut model: VecDeque<(Vec<u8>, u64)> = VecDeque::new();
    let lookup = |model: &VecDeque<(Vec<u8>, u64)>, key: &[u8]| {
        model.iter().find(|(k, _)| k == key).map(|&(_, seq)| seq)
    };

    let mut bytes = ops.iter().copied();
    while let Some(op) = bytes.next() {
        // Up to 10 bytes of a 4-letter alphabet: collisions are common, and keys run both
        // under and over max_key_len.
        let key_len = usize::from(op >> 2) % 11;
        let key: Vec<u8> = bytes.by_ref().take(key_len).map(|b| b % 4).collect();
        match op & 3 {
            0 | 1 => {
                let seq = u64::from(bytes.next().unwrap_or(0)).wrapping_mul(0x0101_0101_0101);
                let expected = if key.len() > max_key_len {
                    Err(Error::KeyTooLong {
                        len: key.len(),
                        max: max_key_len,
                    })
                } else if let Some(first) = lookup(&model, &key) {
                    Ok(Some(first))
                } else {
                    if model.len() == capacity {
                        model.pop_front();
                    }
                    model.push_back((key.clone(), seq));
                    Ok(None)
                };
                assert_eq!(ring.insert(&key, seq), expected);
            }
            2 => assert_eq!(ring.get(&key), lookup(&model, &key)),
            _ => assert_eq!(ring.contains(&key), lookup(&model, &key).is_some()),
        }
        assert_eq!(ring.len(), model.len());
        assert_eq!(ring.is_empty(), model.is_empty());
        assert!(ring.len() <= capacity);
    }
    for (key, seq) in &model {
        assert_eq!(ring.get(key), Some(*seq));
    }
}

/// The `tls_session` target.
pub fn tls_session(data: &[u8]) {
    thread_local! {
        static CONFIG: std::sync::Arc<tls::ServerConfig> = tls::server_config(
            include_bytes!("../../rust/testdata/server.pem"),
            include_bytes!("../../rust/testdata/server.key"),
            None,
        )
        .expect("the test certificate loads");
    }
    let [seed, stream @ ..] = data else {
        return;
    };
    let config = CONFIG.with(|c| c.clone());
    let mut session = TlsSession::new(config).expect("a session starts");
    let mut plaintext = Vec::new();
    let mut sent = 0;
    let mut failed = false;
    for chunk in chunks(stream, *seed) {
        match session.receive(chunk, &mut plaintext) {
            Ok(()) => assert!(!failed, "an input accepted after an error"),
            Err(err) => {
                let panicked = matches!(&err, tls::Error::General(m) if m == PANICKED);
                assert!(!panicked, "rustls panicked on this input");
                failed = true;
                assert!(!session.has_partial_record(), "input held after an error");
            }
        }
        sent += session.take_outgoing().len();
    }
    // The server's first flight (certificate chain and all) and an alert, at most: a
    // client's bytes before the handshake ends make it send no more than that.
    assert!(
        sent <= 16 * 1024,
        "{sent} bytes sent for {} received",
        stream.len()
    );
    assert!(
        plaintext.is_empty(),
        "plaintext before a handshake a fuzzer cannot complete"
    );
}

/// The `jws` target.
pub fn jws(data: &[u8]) {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    use ring::hmac;

    const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef-0123";
    let [mode, bytes @ ..] = data else {
        return;
    };
    let b64 = |part: &[u8]| URL_SAFE_NO_PAD.encode(part);
    let verifier = HmacVerifier::new(hmac::HMAC_SHA256, &[SECRET]);
    let (token, signed) = if mode % 2 == 0 {
        (String::from_utf8_lossy(bytes).into_owned(), false)
    } else {
        let cut = bytes.iter().position(|&b| b == 0xFF).unwrap_or(bytes.len());
        let (header, payload) = (&bytes[..cut], bytes.get(cut + 1..).unwrap_or_default());
        let input = format!("{}.{}", b64(header), b64(payload));
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, SECRET), input.as_bytes());
        (format!("{input}.{}", b64(tag.as_ref())), true)
    };
    match jwt::parts(&token) {
        Some((header, payload, signature)) => {
            let again = format!("{}.{}.{}", b64(&header), b64(&payload), b64(&signature));
            assert_eq!(again, token, "parts that do not encode back to the token");
            let input = &token[..token.rfind('.').expect("three parts")];
            let valid = verifier.verify(input.as_bytes(), &signature);
            assert!(!signed || valid, "a token signed with the secret refused");
        }
        None => assert!(!signed, "a token made of three encoded parts refused"),
    }
}
