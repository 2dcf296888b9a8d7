//! The tsmsg frame codec: length-prefixed msgpack maps, in plain Rust (no pyo3).
//!
//! A frame is a 4-byte big-endian length N and N bytes of msgpack holding one map with
//! string keys. Decoding validates the bytes and drives a [`Builder`] (a visitor), so the
//! Python wrapper builds Python objects directly and the tests here build a [`Value`];
//! no intermediate tree exists on the hot path. Encoding is a set of `write_*` functions
//! that append the smallest msgpack representation of a value to a `Vec<u8>`, byte for
//! byte what msgpack-python's `packb(obj)` writes.
//!
//! Nothing in here trusts a declared length: every str/bin/array/map length is checked
//! against the bytes left in the frame before it is used (for an array or map, the bytes
//! left besides those its enclosing containers' remaining elements need), and containers
//! are preallocated for at most that many elements, so all the containers open at once
//! hold at most one slot per input byte, no input allocates more than a small multiple of
//! its own size, and recursion is bounded by `max_depth`.

use std::fmt;

use crate::error::Error;

/// Bytes in the frame header: a big-endian u32 body length.
pub const HEADER_LEN: usize = 4;
/// Default largest frame body (1 MiB): a full `sync` page fits, and a connection cannot
/// make the server buffer more than this for one frame.
pub const DEFAULT_MAX_FRAME: usize = 1 << 20;
/// Default nesting limit: protocol frames nest 3 or 4 deep; 32 leaves room for a user's
/// `meta` while keeping the decoder's and encoder's recursion shallow.
pub const DEFAULT_MAX_DEPTH: usize = 32;
/// Largest `max_depth` accepted: decoding recurses once per level, and this bounds the
/// native stack used whatever limit a caller asks for (under 256 KiB in a release build,
/// measured by running the test below with RUST_MIN_STACK; threads get 8 MiB on Linux).
pub const MAX_DEPTH_LIMIT: usize = 512;
/// Spare capacity the streaming decoder keeps between frames; a larger buffer left by a
/// big frame is given back, so an idle connection holds at most this much.
pub const IDLE_BUFFER_CAPACITY: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------

/// Appends msgpack nil.
#[inline]
pub fn write_nil(out: &mut Vec<u8>) {
    out.push(0xc0);
}

/// Appends a msgpack bool.
#[inline]
pub fn write_bool(out: &mut Vec<u8>, v: bool) {
    out.push(if v { 0xc3 } else { 0xc2 });
}

/// Appends a signed integer in its smallest form (non-negative values use the uint forms,
/// as msgpack-python does).
#[inline]
pub fn write_int(out: &mut Vec<u8>, v: i64) {
    if v >= 0 {
        write_uint(out, v as u64);
    } else if v >= -32 {
        out.push(v as u8); // negative fixint: the low byte of the two's complement
    } else if v >= i64::from(i8::MIN) {
        out.extend_from_slice(&[0xd0, v as u8]);
    } else if v >= i64::from(i16::MIN) {
        out.push(0xd1);
        out.extend_from_slice(&(v as i16).to_be_bytes());
    } else if v >= i64::from(i32::MIN) {
        out.push(0xd2);
        out.extend_from_slice(&(v as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// Appends an unsigned integer in its smallest form.
#[inline]
pub fn write_uint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
    } else if v <= u64::from(u8::MAX) {
        out.extend_from_slice(&[0xcc, v as u8]);
    } else if v <= u64::from(u16::MAX) {
        out.push(0xcd);
        out.extend_from_slice(&(v as u16).to_be_bytes());
    } else if v <= u64::from(u32::MAX) {
        out.push(0xce);
        out.extend_from_slice(&(v as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// Appends a float64 (the encoder never narrows to float32, like msgpack-python).
#[inline]
pub fn write_f64(out: &mut Vec<u8>, v: f64) {
    out.push(0xcb);
    out.extend_from_slice(&v.to_be_bytes());
}

/// The header markers of one length-prefixed msgpack family.
struct Family {
    name: &'static str,
    /// The fix form's base marker and its exclusive length bound, if the family has one.
    fix: Option<(u8, usize)>,
    /// Markers of the 8-bit (if any), 16-bit and 32-bit length forms.
    len8: Option<u8>,
    len16: u8,
    len32: u8,
}

const STR: Family = Family {
    name: "str",
    fix: Some((0xa0, 32)),
    len8: Some(0xd9),
    len16: 0xda,
    len32: 0xdb,
};
const BIN: Family = Family {
    name: "bin",
    fix: None,
    len8: Some(0xc4),
    len16: 0xc5,
    len32: 0xc6,
};
const ARRAY: Family = Family {
    name: "array",
    fix: Some((0x90, 16)),
    len8: None,
    len16: 0xdc,
    len32: 0xdd,
};
const MAP: Family = Family {
    name: "map",
    fix: Some((0x80, 16)),
    len8: None,
    len16: 0xde,
    len32: 0xdf,
};

#[inline]
fn write_header(out: &mut Vec<u8>, family: &Family, len: usize) -> Result<(), Error> {
    match family.fix {
        Some((base, bound)) if len < bound => out.push(base | len as u8),
        _ => match family.len8 {
            Some(marker) if len <= usize::from(u8::MAX) => {
                out.extend_from_slice(&[marker, len as u8])
            }
            _ if len <= usize::from(u16::MAX) => {
                out.push(family.len16);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                let len32 = u32::try_from(len).map_err(|_| Error::Encode {
                    reason: format!(
                        "{} of length {len} exceeds the msgpack limit of {}",
                        family.name,
                        u32::MAX
                    ),
                })?;
                out.push(family.len32);
                out.extend_from_slice(&len32.to_be_bytes());
            }
        },
    }
    Ok(())
}

/// Appends a str.
#[inline]
pub fn write_str(out: &mut Vec<u8>, s: &str) -> Result<(), Error> {
    let len = s.len();
    if len < 32 {
        // fixstr, the common case (keys, ids), inline.
        out.reserve(1 + len);
        out.push(0xa0 | len as u8);
    } else {
        write_header(out, &STR, len)?;
    }
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Appends a bin (raw bytes).
#[inline]
pub fn write_bin(out: &mut Vec<u8>, b: &[u8]) -> Result<(), Error> {
    write_header(out, &BIN, b.len())?;
    out.extend_from_slice(b);
    Ok(())
}

/// Appends an array header; the caller writes `len` values after it.
#[inline]
pub fn write_array_header(out: &mut Vec<u8>, len: usize) -> Result<(), Error> {
    if len < 16 {
        out.push(0x90 | len as u8);
        return Ok(());
    }
    write_header(out, &ARRAY, len)
}

/// Appends a map header; the caller writes `len` key/value pairs after it.
#[inline]
pub fn write_map_header(out: &mut Vec<u8>, len: usize) -> Result<(), Error> {
    if len < 16 {
        out.push(0x80 | len as u8);
        return Ok(());
    }
    write_header(out, &MAP, len)
}

/// Reserves the frame header; returns the frame's start for [`finish_frame`].
#[inline]
pub fn begin_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    start
}

/// Fills in the header of the frame begun at `start`, checking the body against
/// `max_frame` (the header itself cannot hold more than `u32::MAX`).
pub fn finish_frame(out: &mut [u8], start: usize, max_frame: usize) -> Result<(), Error> {
    let len = out.len() - start - HEADER_LEN;
    let max = max_frame.min(u32::MAX as usize);
    if len > max {
        return Err(Error::FrameTooLarge {
            len: len as u64,
            max,
        });
    }
    out[start..start + HEADER_LEN].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Checks the nesting depth of a container about to be written at `depth` (the outermost
/// container is depth 1).
#[inline]
pub fn check_encode_depth(depth: usize, max_depth: usize) -> Result<(), Error> {
    if depth > max_depth {
        return Err(Error::Encode {
            reason: format!("nesting deeper than max_depth {max_depth}"),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------

/// What the decoder calls for each validated value, depth first. Map keys arrive through
/// [`Builder::key`] (always strings: the decoder rejects other keys).
pub trait Builder {
    type Value;
    type Array;
    type Map;
    /// Building can fail on its own (a Python `MemoryError`); codec errors convert into it.
    type Error: From<Error> + fmt::Display;

    fn nil(&mut self) -> Result<Self::Value, Self::Error>;
    fn bool(&mut self, v: bool) -> Result<Self::Value, Self::Error>;
    fn int(&mut self, v: i64) -> Result<Self::Value, Self::Error>;
    /// Only for values above `i64::MAX`.
    fn uint(&mut self, v: u64) -> Result<Self::Value, Self::Error>;
    fn float(&mut self, v: f64) -> Result<Self::Value, Self::Error>;
    fn str(&mut self, v: &str) -> Result<Self::Value, Self::Error>;
    fn bin(&mut self, v: &[u8]) -> Result<Self::Value, Self::Error>;
    fn key(&mut self, v: &str) -> Result<Self::Value, Self::Error> {
        self.str(v)
    }
    /// `len` is the declared length, already checked against the bytes left.
    fn begin_array(&mut self, len: usize) -> Result<Self::Array, Self::Error>;
    fn push(&mut self, array: &mut Self::Array, v: Self::Value) -> Result<(), Self::Error>;
    fn end_array(&mut self, array: Self::Array) -> Result<Self::Value, Self::Error>;
    /// `len` is the declared number of entries, already checked against the bytes left.
    fn begin_map(&mut self, len: usize) -> Result<Self::Map, Self::Error>;
    fn insert(
        &mut self,
        map: &mut Self::Map,
        key: Self::Value,
        v: Self::Value,
    ) -> Result<(), Self::Error>;
    fn end_map(&mut self, map: Self::Map) -> Result<Self::Value, Self::Error>;
}

/// A decode failure: the input's fault (`Codec`) or the builder's own (`Build`). Kept apart
/// so the streaming decoder can add the frame's stream offset to codec errors only.
enum Fail<E> {
    Codec(Error),
    Build(E),
}

impl<E> From<Error> for Fail<E> {
    fn from(e: Error) -> Self {
        Fail::Codec(e)
    }
}

type Step<T, B> = Result<T, Fail<<B as Builder>::Error>>;

/// A short name of the msgpack type a marker byte starts, for error messages.
fn type_name(marker: u8) -> &'static str {
    match marker {
        0x00..=0x7f | 0xcc..=0xd3 | 0xe0..=0xff => "int",
        0x80..=0x8f | 0xde | 0xdf => "map",
        0x90..=0x9f | 0xdc | 0xdd => "array",
        0xa0..=0xbf | 0xd9..=0xdb => "str",
        0xc0 => "nil",
        0xc1 => "reserved byte 0xc1",
        0xc2 | 0xc3 => "bool",
        0xc4..=0xc6 => "bin",
        0xc7..=0xc9 | 0xd4..=0xd8 => "ext",
        0xca | 0xcb => "float",
    }
}

fn reserved(offset: usize) -> Error {
    Error::InvalidMsgpack {
        offset,
        reason: "reserved byte 0xc1".to_owned(),
    }
}

/// Reads one msgpack value from `data`, validating as it goes.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    max_depth: usize,
    /// Bytes the open containers still need after the current value: at least one per
    /// array element and two per map entry not yet started.
    owed: usize,
}

impl<'a> Reader<'a> {
    #[inline]
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    /// The bytes left that the enclosing containers' unstarted elements do not need.
    #[inline]
    fn available(&self) -> usize {
        self.remaining().saturating_sub(self.owed)
    }

    /// The next `N` bytes of a fixed-size field.
    #[inline]
    fn fixed<const N: usize>(&mut self, what: &str) -> Result<[u8; N], Error> {
        match self.data.get(self.pos..self.pos + N) {
            Some(bytes) => {
                self.pos += N;
                // The slice has exactly N bytes.
                Ok(bytes.try_into().unwrap_or([0; N]))
            }
            None => Err(Error::InvalidMsgpack {
                offset: self.pos,
                reason: format!(
                    "truncated {what}: needs {N} byte(s), {} left",
                    self.remaining()
                ),
            }),
        }
    }

    #[inline]
    fn len8(&mut self, what: &str) -> Result<u64, Error> {
        Ok(u64::from(self.fixed::<1>(what)?[0]))
    }

    #[inline]
    fn len16(&mut self, what: &str) -> Result<u64, Error> {
        Ok(u64::from(u16::from_be_bytes(self.fixed(what)?)))
    }

    #[inline]
    fn len32(&mut self, what: &str) -> Result<u64, Error> {
        Ok(u64::from(u32::from_be_bytes(self.fixed(what)?)))
    }

    /// The `len` payload bytes of the str/bin that starts at `offset`.
    #[inline]
    fn payload(&mut self, len: u64, offset: usize, kind: &'static str) -> Result<&'a [u8], Error> {
        let remaining = self.remaining();
        if len > remaining as u64 {
            return Err(Error::LengthOverrun {
                offset,
                kind,
                declared: len,
                remaining,
            });
        }
        let start = self.pos;
        self.pos += len as usize;
        Ok(&self.data[start..self.pos])
    }

    #[inline]
    fn text(&mut self, len: u64, offset: usize) -> Result<&'a str, Error> {
        let bytes = self.payload(len, offset, "str")?;
        if bytes.is_ascii() {
            // SAFETY: ASCII is valid UTF-8. Nearly all frame strings are ASCII, and this
            // skips `from_utf8`, which cost 9% of decoding a `sync` page under perf.
            return Ok(unsafe { std::str::from_utf8_unchecked(bytes) });
        }
        std::str::from_utf8(bytes).map_err(|e| Error::InvalidUtf8 {
            offset: self.pos - bytes.len() + e.valid_up_to(),
        })
    }

    /// Enters a container that starts at `offset` inside `depth` enclosing containers.
    #[inline]
    fn enter(&self, depth: usize, offset: usize) -> Result<usize, Error> {
        let depth = depth + 1;
        if depth > self.max_depth {
            return Err(Error::TooDeep {
                offset,
                max: self.max_depth,
            });
        }
        Ok(depth)
    }

    fn value<B: Builder>(&mut self, b: &mut B, depth: usize) -> Step<B::Value, B> {
        let offset = self.pos;
        let marker = self.fixed::<1>("value")?[0];
        let built = match marker {
            0x00..=0x7f => b.int(i64::from(marker)),
            0x80..=0x8f => return self.map(b, u64::from(marker & 0x0f), offset, depth),
            0x90..=0x9f => return self.array(b, u64::from(marker & 0x0f), offset, depth),
            0xa0..=0xbf => {
                let s = self.text(u64::from(marker & 0x1f), offset)?;
                b.str(s)
            }
            0xc0 => b.nil(),
            0xc1 => return Err(reserved(offset).into()),
            0xc2 => b.bool(false),
            0xc3 => b.bool(true),
            0xc4..=0xc6 => {
                let len = match marker {
                    0xc4 => self.len8("bin8 length")?,
                    0xc5 => self.len16("bin16 length")?,
                    _ => self.len32("bin32 length")?,
                };
                let bytes = self.payload(len, offset, "bin")?;
                b.bin(bytes)
            }
            0xc7..=0xc9 | 0xd4..=0xd8 => {
                return Err(Error::UnsupportedType {
                    offset,
                    type_byte: marker,
                }
                .into())
            }
            0xca => b.float(f64::from(f32::from_be_bytes(self.fixed("float32")?))),
            0xcb => b.float(f64::from_be_bytes(self.fixed("float64")?)),
            0xcc => b.int(i64::from(self.fixed::<1>("uint8")?[0])),
            0xcd => b.int(i64::from(u16::from_be_bytes(self.fixed("uint16")?))),
            0xce => b.int(i64::from(u32::from_be_bytes(self.fixed("uint32")?))),
            0xcf => {
                let v = u64::from_be_bytes(self.fixed("uint64")?);
                match i64::try_from(v) {
                    Ok(v) => b.int(v),
                    Err(_) => b.uint(v),
                }
            }
            0xd0 => b.int(i64::from(i8::from_be_bytes(self.fixed("int8")?))),
            0xd1 => b.int(i64::from(i16::from_be_bytes(self.fixed("int16")?))),
            0xd2 => b.int(i64::from(i32::from_be_bytes(self.fixed("int32")?))),
            0xd3 => b.int(i64::from_be_bytes(self.fixed("int64")?)),
            0xd9..=0xdb => {
                let len = match marker {
                    0xd9 => self.len8("str8 length")?,
                    0xda => self.len16("str16 length")?,
                    _ => self.len32("str32 length")?,
                };
                let s = self.text(len, offset)?;
                b.str(s)
            }
            0xdc => {
                let len = self.len16("array16 length")?;
                return self.array(b, len, offset, depth);
            }
            0xdd => {
                let len = self.len32("array32 length")?;
                return self.array(b, len, offset, depth);
            }
            0xde => {
                let len = self.len16("map16 length")?;
                return self.map(b, len, offset, depth);
            }
            0xdf => {
                let len = self.len32("map32 length")?;
                return self.map(b, len, offset, depth);
            }
            0xe0..=0xff => b.int(i64::from(marker as i8)),
        };
        built.map_err(Fail::Build)
    }

    fn array<B: Builder>(
        &mut self,
        b: &mut B,
        len: u64,
        offset: usize,
        depth: usize,
    ) -> Step<B::Value, B> {
        let depth = self.enter(depth, offset)?;
        // Every element takes at least one byte, besides the bytes the enclosing containers
        // still need: so the slots preallocated by all open containers together stay below
        // the frame's size (checked per container alone, nesting multiplied them).
        let remaining = self.available();
        if len > remaining as u64 {
            return Err(Error::LengthOverrun {
                offset,
                kind: "array",
                declared: len,
                remaining,
            }
            .into());
        }
        let len = len as usize;
        let mut array = b.begin_array(len).map_err(Fail::Build)?;
        let owed = self.owed;
        for i in 0..len {
            self.owed = owed + (len - 1 - i);
            let v = self.value(b, depth)?;
            b.push(&mut array, v).map_err(Fail::Build)?;
        }
        self.owed = owed;
        b.end_array(array).map_err(Fail::Build)
    }

    fn map<B: Builder>(
        &mut self,
        b: &mut B,
        len: u64,
        offset: usize,
        depth: usize,
    ) -> Step<B::Value, B> {
        let depth = self.enter(depth, offset)?;
        // Every entry takes at least two bytes, a key and a value, besides the bytes the
        // enclosing containers still need (as for arrays).
        let remaining = self.available();
        if len.saturating_mul(2) > remaining as u64 {
            return Err(Error::LengthOverrun {
                offset,
                kind: "map",
                declared: len,
                remaining,
            }
            .into());
        }
        let len = len as usize;
        let mut map = b.begin_map(len).map_err(Fail::Build)?;
        let owed = self.owed;
        for i in 0..len {
            let key = self.key(b)?;
            self.owed = owed + 2 * (len - 1 - i);
            let v = self.value(b, depth)?;
            b.insert(&mut map, key, v).map_err(Fail::Build)?;
        }
        self.owed = owed;
        b.end_map(map).map_err(Fail::Build)
    }

    fn key<B: Builder>(&mut self, b: &mut B) -> Step<B::Value, B> {
        let offset = self.pos;
        let marker = self.fixed::<1>("map key")?[0];
        let len = match marker {
            0xa0..=0xbf => u64::from(marker & 0x1f),
            0xd9 => self.len8("str8 length")?,
            0xda => self.len16("str16 length")?,
            0xdb => self.len32("str32 length")?,
            0xc1 => return Err(reserved(offset).into()),
            other => {
                return Err(Error::NonStringKey {
                    offset,
                    found: type_name(other),
                }
                .into())
            }
        };
        let s = self.text(len, offset)?;
        b.key(s).map_err(Fail::Build)
    }

    /// The one value that must fill `data` exactly.
    fn whole<B: Builder>(&mut self, b: &mut B) -> Step<B::Value, B> {
        let v = self.value(b, 0)?;
        if self.pos < self.data.len() {
            return Err(Error::TrailingBytes {
                offset: self.pos,
                count: self.data.len() - self.pos,
            }
            .into());
        }
        Ok(v)
    }
}

/// Decodes a frame body: exactly one msgpack map with string keys.
fn frame_body<B: Builder>(body: &[u8], max_depth: usize, b: &mut B) -> Step<B::Value, B> {
    match body.first() {
        None => Err(Error::InvalidMsgpack {
            offset: 0,
            reason: "empty frame body".to_owned(),
        }
        .into()),
        Some(0x80..=0x8f | 0xde | 0xdf) => Reader {
            data: body,
            pos: 0,
            max_depth,
            owed: 0,
        }
        .whole(b),
        Some(0xc1) => Err(reserved(0).into()),
        Some(&marker) => Err(Error::NotAMap {
            found: type_name(marker),
        }
        .into()),
    }
}

fn finish<T, E: From<Error>>(
    step: Result<T, Fail<E>>,
    wrap: impl FnOnce(Error) -> Error,
) -> Result<T, E> {
    match step {
        Ok(v) => Ok(v),
        Err(Fail::Codec(e)) => Err(wrap(e).into()),
        Err(Fail::Build(e)) => Err(e),
    }
}

/// Checks a caller's `max_depth` against [`MAX_DEPTH_LIMIT`].
pub fn check_max_depth(max_depth: usize) -> Result<usize, Error> {
    if max_depth > MAX_DEPTH_LIMIT {
        return Err(Error::InvalidLimit {
            name: "max_depth",
            value: max_depth,
            max: MAX_DEPTH_LIMIT,
        });
    }
    Ok(max_depth)
}

/// Decodes one frame body (without its length header).
pub fn decode_body<B: Builder>(
    body: &[u8],
    max_depth: usize,
    b: &mut B,
) -> Result<B::Value, B::Error> {
    check_max_depth(max_depth)?;
    finish(frame_body(body, max_depth, b), |e| e)
}

/// Decodes one bare msgpack value of any supported type that fills `data` exactly.
pub fn unpack<B: Builder>(data: &[u8], max_depth: usize, b: &mut B) -> Result<B::Value, B::Error> {
    let mut reader = Reader {
        data,
        pos: 0,
        max_depth: check_max_depth(max_depth)?,
        owed: 0,
    };
    if data.is_empty() {
        return Err(Error::InvalidMsgpack {
            offset: 0,
            reason: "no value in empty input".to_owned(),
        }
        .into());
    }
    finish(reader.whole(b), |e| e)
}

/// Splits a byte stream into frames and decodes each one, whatever the chunking.
///
/// At most one incomplete frame is held (at most `max_frame + 3` bytes): complete frames
/// are decoded straight from the caller's bytes, and each byte is copied into the buffer at
/// most once, so feeding one byte at a time costs O(n) overall. A header declaring more
/// than `max_frame` fails as soon as its four bytes arrive. After any error the decoder
/// refuses all further input.
#[derive(Debug)]
pub struct FrameDecoder {
    /// The incomplete frame (header included) that the next `feed` continues.
    pending: Vec<u8>,
    /// Stream offset of `pending[0]`: the bytes of all complete frames so far.
    stream_offset: u64,
    max_frame: usize,
    max_depth: usize,
    /// The message of the first error, once one happened.
    failed: Option<String>,
}

/// Where `data` starts a frame: its body length once the header is complete.
fn declared_len(data: &[u8]) -> Option<usize> {
    let header: [u8; HEADER_LEN] = data.get(..HEADER_LEN)?.try_into().ok()?;
    Some(u32::from_be_bytes(header) as usize)
}

impl FrameDecoder {
    /// Fails if `max_depth` is above [`MAX_DEPTH_LIMIT`].
    pub fn new(max_frame: usize, max_depth: usize) -> Result<Self, Error> {
        Ok(FrameDecoder {
            pending: Vec::new(),
            stream_offset: 0,
            max_frame,
            max_depth: check_max_depth(max_depth)?,
            failed: None,
        })
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    pub fn max_depth(&self) -> usize {
        self.max_depth
    }

    /// Bytes held of an incomplete frame.
    pub fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// Whether an earlier error put the decoder into its error state.
    pub fn is_failed(&self) -> bool {
        self.failed.is_some()
    }

    /// Feeds stream bytes; appends each completed frame's value to `out`, in order.
    /// On error, `out` may hold the frames completed before the bad one.
    pub fn feed<B: Builder>(
        &mut self,
        data: &[u8],
        b: &mut B,
        out: &mut Vec<B::Value>,
    ) -> Result<(), B::Error> {
        if let Some(first) = &self.failed {
            return Err(Error::DecoderFailed {
                first: first.clone(),
            }
            .into());
        }
        let result = self.feed_inner(data, b, out);
        if let Err(e) = &result {
            self.failed = Some(e.to_string());
            self.pending = Vec::new();
        }
        result
    }

    fn too_large(&self, len: usize, frame_offset: u64) -> Error {
        Error::InFrame {
            stream_offset: frame_offset,
            source: Box::new(Error::FrameTooLarge {
                len: len as u64,
                max: self.max_frame,
            }),
        }
    }

    fn decode_frame<B: Builder>(
        &self,
        body: &[u8],
        frame_offset: u64,
        b: &mut B,
    ) -> Result<B::Value, B::Error> {
        finish(frame_body(body, self.max_depth, b), |e| Error::InFrame {
            stream_offset: frame_offset,
            source: Box::new(e),
        })
    }

    fn feed_inner<B: Builder>(
        &mut self,
        mut data: &[u8],
        b: &mut B,
        out: &mut Vec<B::Value>,
    ) -> Result<(), B::Error> {
        if !self.pending.is_empty() {
            // Complete the pending frame first: its header, then its body.
            if self.pending.len() < HEADER_LEN {
                let take = (HEADER_LEN - self.pending.len()).min(data.len());
                self.pending.extend_from_slice(&data[..take]);
                data = &data[take..];
            }
            let Some(len) = declared_len(&self.pending) else {
                return Ok(());
            };
            if len > self.max_frame {
                return Err(self.too_large(len, self.stream_offset).into());
            }
            let take = (HEADER_LEN + len - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() < HEADER_LEN + len {
                return Ok(());
            }
            let value = self.decode_frame(&self.pending[HEADER_LEN..], self.stream_offset, b)?;
            out.push(value);
            self.stream_offset += self.pending.len() as u64;
            self.pending.clear();
            if self.pending.capacity() > IDLE_BUFFER_CAPACITY {
                self.pending.shrink_to(IDLE_BUFFER_CAPACITY);
            }
        }
        // Nothing pending: decode complete frames in place, keep the incomplete tail.
        let mut pos = 0;
        while let Some(len) = declared_len(&data[pos..]) {
            let frame_offset = self.stream_offset + pos as u64;
            if len > self.max_frame {
                return Err(self.too_large(len, frame_offset).into());
            }
            let Some(body) = data.get(pos + HEADER_LEN..pos + HEADER_LEN + len) else {
                break;
            };
            out.push(self.decode_frame(body, frame_offset, b)?);
            pos += HEADER_LEN + len;
        }
        self.stream_offset += pos as u64;
        self.pending.extend_from_slice(&data[pos..]);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// A plain Rust value, for tests and tools
// ---------------------------------------------------------------------------------------

/// A decoded msgpack value; maps keep their entries in wire order.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Bin(Vec<u8>),
    Array(Vec<Value>),
    Map(Vec<(String, Value)>),
}

/// The [`Builder`] that makes [`Value`]s.
#[derive(Debug, Default)]
pub struct ValueBuilder;

impl Builder for ValueBuilder {
    type Value = Value;
    type Array = Vec<Value>;
    type Map = Vec<(String, Value)>;
    type Error = Error;

    fn nil(&mut self) -> Result<Value, Error> {
        Ok(Value::Nil)
    }
    fn bool(&mut self, v: bool) -> Result<Value, Error> {
        Ok(Value::Bool(v))
    }
    fn int(&mut self, v: i64) -> Result<Value, Error> {
        Ok(Value::Int(v))
    }
    fn uint(&mut self, v: u64) -> Result<Value, Error> {
        Ok(Value::UInt(v))
    }
    fn float(&mut self, v: f64) -> Result<Value, Error> {
        Ok(Value::Float(v))
    }
    fn str(&mut self, v: &str) -> Result<Value, Error> {
        Ok(Value::Str(v.to_owned()))
    }
    fn bin(&mut self, v: &[u8]) -> Result<Value, Error> {
        Ok(Value::Bin(v.to_vec()))
    }
    fn begin_array(&mut self, len: usize) -> Result<Vec<Value>, Error> {
        Ok(Vec::with_capacity(len))
    }
    fn push(&mut self, array: &mut Vec<Value>, v: Value) -> Result<(), Error> {
        array.push(v);
        Ok(())
    }
    fn end_array(&mut self, array: Vec<Value>) -> Result<Value, Error> {
        Ok(Value::Array(array))
    }
    fn begin_map(&mut self, len: usize) -> Result<Vec<(String, Value)>, Error> {
        Ok(Vec::with_capacity(len))
    }
    fn insert(
        &mut self,
        map: &mut Vec<(String, Value)>,
        key: Value,
        v: Value,
    ) -> Result<(), Error> {
        match key {
            Value::Str(k) => {
                map.push((k, v));
                Ok(())
            }
            // `Reader::key` only ever hands over strings.
            other => Err(Error::Encode {
                reason: format!("map key must be a string, got {other:?}"),
            }),
        }
    }
    fn end_map(&mut self, map: Vec<(String, Value)>) -> Result<Value, Error> {
        Ok(Value::Map(map))
    }
}

/// Appends the msgpack form of `value`; containers deeper than `max_depth` fail.
pub fn write_value(out: &mut Vec<u8>, value: &Value, max_depth: usize) -> Result<(), Error> {
    fn write(
        out: &mut Vec<u8>,
        value: &Value,
        depth: usize,
        max_depth: usize,
    ) -> Result<(), Error> {
        match value {
            Value::Nil => write_nil(out),
            Value::Bool(v) => write_bool(out, *v),
            Value::Int(v) => write_int(out, *v),
            Value::UInt(v) => write_uint(out, *v),
            Value::Float(v) => write_f64(out, *v),
            Value::Str(v) => write_str(out, v)?,
            Value::Bin(v) => write_bin(out, v)?,
            Value::Array(items) => {
                check_encode_depth(depth + 1, max_depth)?;
                write_array_header(out, items.len())?;
                for item in items {
                    write(out, item, depth + 1, max_depth)?;
                }
            }
            Value::Map(entries) => {
                check_encode_depth(depth + 1, max_depth)?;
                write_map_header(out, entries.len())?;
                for (k, v) in entries {
                    write_str(out, k)?;
                    write(out, v, depth + 1, max_depth)?;
                }
            }
        }
        Ok(())
    }
    write(out, value, 0, max_depth)
}

/// Appends one frame holding `value` (which must be a map).
pub fn write_frame(
    out: &mut Vec<u8>,
    value: &Value,
    max_frame: usize,
    max_depth: usize,
) -> Result<(), Error> {
    if !matches!(value, Value::Map(_)) {
        return Err(Error::Encode {
            reason: "frame body must be a map".to_owned(),
        });
    }
    let start = begin_frame(out);
    write_value(out, value, max_depth)?;
    finish_frame(out, start, max_frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, Value)]) -> Value {
        Value::Map(
            entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        )
    }

    fn s(v: &str) -> Value {
        Value::Str(v.to_owned())
    }

    fn sample() -> Value {
        map(&[
            ("t", s("send")),
            ("rid", Value::Int(7)),
            ("channel", s("room-1")),
            ("text", s("héllo wörld ✓")),
            ("n", Value::Int(-40_000)),
            ("big", Value::UInt(u64::MAX)),
            ("min", Value::Int(i64::MIN)),
            ("f", Value::Float(1.5)),
            ("nil", Value::Nil),
            ("ok", Value::Bool(true)),
            ("blob", Value::Bin(vec![0, 1, 2, 255])),
            (
                "list",
                Value::Array(vec![
                    Value::Int(1),
                    s("x"),
                    map(&[("k", Value::Bool(false))]),
                ]),
            ),
        ])
    }

    fn frame(value: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, value, DEFAULT_MAX_FRAME, DEFAULT_MAX_DEPTH).unwrap();
        out
    }

    /// A frame around raw body bytes.
    fn raw_frame(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    fn decode(body: &[u8]) -> Result<Value, Error> {
        decode_body(body, DEFAULT_MAX_DEPTH, &mut ValueBuilder)
    }

    fn feed_all(dec: &mut FrameDecoder, chunks: &[&[u8]]) -> Result<Vec<Value>, Error> {
        let mut out = Vec::new();
        for chunk in chunks {
            dec.feed(chunk, &mut ValueBuilder, &mut out)?;
        }
        Ok(out)
    }

    fn nested_maps(depth: usize) -> Value {
        let mut v = Value::Int(1);
        for _ in 0..depth {
            v = map(&[("a", v)]);
        }
        v
    }

    #[test]
    fn round_trip() {
        let value = sample();
        let bytes = frame(&value);
        assert_eq!(decode(&bytes[HEADER_LEN..]).unwrap(), value);
        let mut packed = Vec::new();
        write_value(&mut packed, &Value::Array(vec![value.clone()]), 32).unwrap();
        assert_eq!(
            unpack(&packed, 32, &mut ValueBuilder).unwrap(),
            Value::Array(vec![value])
        );
    }

    #[test]
    fn smallest_int_forms() {
        let cases: &[(i64, &[u8])] = &[
            (0, &[0x00]),
            (127, &[0x7f]),
            (128, &[0xcc, 0x80]),
            (255, &[0xcc, 0xff]),
            (256, &[0xcd, 0x01, 0x00]),
            (65_535, &[0xcd, 0xff, 0xff]),
            (65_536, &[0xce, 0, 1, 0, 0]),
            (4_294_967_296, &[0xcf, 0, 0, 0, 1, 0, 0, 0, 0]),
            (-1, &[0xff]),
            (-32, &[0xe0]),
            (-33, &[0xd0, 0xdf]),
            (-128, &[0xd0, 0x80]),
            (-129, &[0xd1, 0xff, 0x7f]),
            (-32_769, &[0xd2, 0xff, 0xff, 0x7f, 0xff]),
            (
                -2_147_483_649,
                &[0xd3, 0xff, 0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff],
            ),
        ];
        for (v, expected) in cases {
            let mut out = Vec::new();
            write_int(&mut out, *v);
            assert_eq!(&out, expected, "{v}");
            assert_eq!(unpack(&out, 1, &mut ValueBuilder).unwrap(), Value::Int(*v));
        }
    }

    #[test]
    fn smallest_length_forms() {
        let mut out = Vec::new();
        write_str(&mut out, &"x".repeat(31)).unwrap();
        assert_eq!(out[0], 0xbf);
        out.clear();
        write_str(&mut out, &"x".repeat(32)).unwrap();
        assert_eq!(&out[..2], &[0xd9, 32]);
        out.clear();
        write_str(&mut out, &"x".repeat(256)).unwrap();
        assert_eq!(&out[..3], &[0xda, 1, 0]);
        out.clear();
        write_bin(&mut out, &[]).unwrap();
        assert_eq!(&out, &[0xc4, 0]);
        out.clear();
        write_array_header(&mut out, 15).unwrap();
        write_array_header(&mut out, 16).unwrap();
        write_map_header(&mut out, 15).unwrap();
        write_map_header(&mut out, 65_536).unwrap();
        assert_eq!(&out, &[0x9f, 0xdc, 0, 16, 0x8f, 0xdf, 0, 1, 0, 0]);
    }

    #[test]
    fn float32_decodes() {
        let mut body = vec![0x81, 0xa1, b'f', 0xca];
        body.extend_from_slice(&1.25f32.to_be_bytes());
        assert_eq!(decode(&body).unwrap(), map(&[("f", Value::Float(1.25))]));
    }

    #[test]
    fn invalid_msgpack() {
        assert!(matches!(
            decode(&[]),
            Err(Error::InvalidMsgpack { offset: 0, .. })
        ));
        assert!(matches!(
            decode(&[0xc1]),
            Err(Error::InvalidMsgpack { offset: 0, .. })
        ));
        // fixmap{ "a": 0xc1 }
        assert!(matches!(
            decode(&[0x81, 0xa1, b'a', 0xc1]),
            Err(Error::InvalidMsgpack { offset: 3, .. })
        ));
        // A uint16 cut short inside the frame.
        assert!(matches!(
            decode(&[0x81, 0xa1, b'a', 0xcd, 0x01]),
            Err(Error::InvalidMsgpack { offset: 4, .. })
        ));
        // The map's second entry is missing: 2 entries declared, 4 bytes left, one entry.
        assert!(matches!(
            decode(&[0x82, 0xa1, b'a', 0x01, 0xa1]),
            Err(Error::InvalidMsgpack { .. }) | Err(Error::LengthOverrun { .. })
        ));
    }

    #[test]
    fn trailing_bytes() {
        assert_eq!(
            decode(&[0x80, 0x00, 0x00]),
            Err(Error::TrailingBytes {
                offset: 1,
                count: 2
            })
        );
        assert!(matches!(
            unpack(&[0x01, 0x02], 32, &mut ValueBuilder),
            Err(Error::TrailingBytes {
                offset: 1,
                count: 1
            })
        ));
    }

    #[test]
    fn not_a_map() {
        assert_eq!(decode(&[0x90]), Err(Error::NotAMap { found: "array" }));
        assert_eq!(decode(&[0x01]), Err(Error::NotAMap { found: "int" }));
        assert_eq!(decode(&[0xa0]), Err(Error::NotAMap { found: "str" }));
    }

    #[test]
    fn non_string_key_at_any_level() {
        assert_eq!(
            decode(&[0x81, 0x01, 0x02]),
            Err(Error::NonStringKey {
                offset: 1,
                found: "int"
            })
        );
        // {"a": [{nil: 1}]}
        assert_eq!(
            decode(&[0x81, 0xa1, b'a', 0x91, 0x81, 0xc0, 0x01]),
            Err(Error::NonStringKey {
                offset: 5,
                found: "nil"
            })
        );
    }

    #[test]
    fn depth_limit_at_and_past() {
        for max in [1, 2, DEFAULT_MAX_DEPTH] {
            let ok = frame(&nested_maps(max));
            assert_eq!(
                decode_body(&ok[HEADER_LEN..], max, &mut ValueBuilder).unwrap(),
                nested_maps(max)
            );
            let mut too_deep = Vec::new();
            write_value(&mut too_deep, &nested_maps(max + 1), max + 1).unwrap();
            let err = decode_body(&too_deep, max, &mut ValueBuilder).unwrap_err();
            // Each level is fixmap(1) + fixstr "a": 3 bytes.
            assert_eq!(
                err,
                Error::TooDeep {
                    offset: 3 * max,
                    max
                }
            );
            // The encoder applies the same limit.
            assert!(matches!(
                write_value(&mut Vec::new(), &nested_maps(max + 1), max),
                Err(Error::Encode { .. })
            ));
        }
    }

    #[test]
    fn invalid_utf8() {
        assert_eq!(
            decode(&[0x81, 0xa1, b'a', 0xa3, b'x', 0xff, b'y']),
            Err(Error::InvalidUtf8 { offset: 5 })
        );
        assert_eq!(
            decode(&[0x81, 0xa1, 0xfe, 0xc0]),
            Err(Error::InvalidUtf8 { offset: 2 })
        );
    }

    #[test]
    fn declared_lengths_at_and_past_the_remaining_bytes() {
        // {"a": str} with a str8 header declaring exactly the bytes left, then one more.
        let at = [0x81, 0xa1, b'a', 0xd9, 2, b'x', b'y'];
        assert_eq!(decode(&at).unwrap(), map(&[("a", s("xy"))]));
        let past = [0x81, 0xa1, b'a', 0xd9, 3, b'x', b'y'];
        assert_eq!(
            decode(&past),
            Err(Error::LengthOverrun {
                offset: 3,
                kind: "str",
                declared: 3,
                remaining: 2
            })
        );
        // bin
        let at = [0x81, 0xa1, b'a', 0xc4, 1, 7];
        assert_eq!(decode(&at).unwrap(), map(&[("a", Value::Bin(vec![7]))]));
        let past = [0x81, 0xa1, b'a', 0xc4, 2, 7];
        assert!(matches!(
            decode(&past),
            Err(Error::LengthOverrun { kind: "bin", .. })
        ));
        // array16 of 2 one-byte elements vs 3 declared
        let at = [0x81, 0xa1, b'a', 0xdc, 0, 2, 1, 2];
        assert_eq!(
            decode(&at).unwrap(),
            map(&[("a", Value::Array(vec![Value::Int(1), Value::Int(2)]))])
        );
        let past = [0x81, 0xa1, b'a', 0xdc, 0, 3, 1, 2];
        assert!(matches!(
            decode(&past),
            Err(Error::LengthOverrun {
                kind: "array",
                declared: 3,
                remaining: 2,
                ..
            })
        ));
        // map32 declaring 4 billion entries: rejected before any allocation.
        let past = [0x81, 0xa1, b'a', 0xdf, 0xff, 0xff, 0xff, 0xff, 0xa0, 0xc0];
        assert!(matches!(
            decode(&past),
            Err(Error::LengthOverrun { kind: "map", .. })
        ));
        // map16 with exactly 2 bytes per declared entry.
        let at = [0x81, 0xa1, b'a', 0xde, 0, 1, 0xa0, 0xc0];
        assert_eq!(
            decode(&at).unwrap(),
            map(&[("a", map(&[("", Value::Nil)]))])
        );
        // str32 declaring 4 GiB.
        let past = [0x81, 0xa1, b'a', 0xdb, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode(&past),
            Err(Error::LengthOverrun { kind: "str", .. })
        ));
    }

    #[test]
    fn nested_declared_lengths_share_the_bytes_left() {
        // {"a": [[[], []], []]}: the inner array's 2 elements fit beside the outer's 1 more.
        let at = [0x81, 0xa1, b'a', 0x92, 0x92, 0x90, 0x90, 0x90];
        let empty = || Value::Array(vec![]);
        assert_eq!(
            decode(&at).unwrap(),
            map(&[(
                "a",
                Value::Array(vec![Value::Array(vec![empty(), empty()]), empty()])
            )])
        );
        // [[x, x], x, x] with 2 bytes after the inner header, both owed to the outer array:
        // refused at the inner header, before its slots are allocated.
        let past = [0x81, 0xa1, b'a', 0x93, 0x92, 0x90, 0x90];
        assert_eq!(
            decode(&past),
            Err(Error::LengthOverrun {
                offset: 4,
                kind: "array",
                declared: 2,
                remaining: 0
            })
        );
        // Map entries owe 2 bytes each: {"a": {"b": {"c": nil, "d": ...}, ...}} with 5 bytes
        // after the inner header, 2 of them owed to the outer map's second entry.
        let past = [
            0x81, 0xa1, b'a', 0x82, 0xa1, b'b', 0x82, 0xa1, b'c', 0xc0, 0xa1, b'd',
        ];
        assert_eq!(
            decode(&past),
            Err(Error::LengthOverrun {
                offset: 6,
                kind: "map",
                declared: 2,
                remaining: 3
            })
        );

        /// Counts the slots preallocated by the containers open at once.
        #[derive(Default)]
        struct Slots {
            open: usize,
            peak: usize,
        }
        impl Builder for Slots {
            type Value = ();
            type Array = usize;
            type Map = usize;
            type Error = Error;
            fn nil(&mut self) -> Result<(), Error> {
                Ok(())
            }
            fn bool(&mut self, _: bool) -> Result<(), Error> {
                Ok(())
            }
            fn int(&mut self, _: i64) -> Result<(), Error> {
                Ok(())
            }
            fn uint(&mut self, _: u64) -> Result<(), Error> {
                Ok(())
            }
            fn float(&mut self, _: f64) -> Result<(), Error> {
                Ok(())
            }
            fn str(&mut self, _: &str) -> Result<(), Error> {
                Ok(())
            }
            fn bin(&mut self, _: &[u8]) -> Result<(), Error> {
                Ok(())
            }
            fn begin_array(&mut self, len: usize) -> Result<usize, Error> {
                self.open += len;
                self.peak = self.peak.max(self.open);
                Ok(len)
            }
            fn push(&mut self, _: &mut usize, _: ()) -> Result<(), Error> {
                Ok(())
            }
            fn end_array(&mut self, len: usize) -> Result<(), Error> {
                self.open -= len;
                Ok(())
            }
            fn begin_map(&mut self, len: usize) -> Result<usize, Error> {
                self.begin_array(len)
            }
            fn insert(&mut self, _: &mut usize, _: (), _: ()) -> Result<(), Error> {
                Ok(())
            }
            fn end_map(&mut self, len: usize) -> Result<(), Error> {
                self.end_array(len)
            }
        }
        // 60 nested array32 headers each declaring the bytes left after it, then zeros (the
        // shape the fuzzer found, fuzz/regressions/decode_frames/): each level used to
        // preallocate about the whole frame, 60 times over.
        let mut body = vec![0x81, 0xa1, b'a'];
        let size = 4096;
        for _ in 0..60 {
            let left = (size - body.len() - 5) as u32;
            body.push(0xdd);
            body.extend_from_slice(&left.to_be_bytes());
        }
        body.resize(size, 0);
        let mut slots = Slots::default();
        assert!(matches!(
            decode_body(&body, 64, &mut slots),
            Err(Error::LengthOverrun { kind: "array", .. })
        ));
        assert!(slots.peak <= body.len(), "{} slots", slots.peak);
    }

    #[test]
    fn ext_types_are_unsupported() {
        // fixext1 .. fixext16, ext8/16/32, and the timestamp ext (-1) in fixext4.
        for marker in [0xd4u8, 0xd5, 0xd6, 0xd7, 0xd8, 0xc7, 0xc8, 0xc9] {
            let body = [0x81, 0xa1, b'a', marker, 0xff, 0, 0, 0, 0];
            assert_eq!(
                decode(&body),
                Err(Error::UnsupportedType {
                    offset: 3,
                    type_byte: marker
                })
            );
        }
    }

    #[test]
    fn max_frame_at_and_past() {
        // A body of exactly 16 bytes: {"a": str of 11 bytes} = 1 + 2 + 1 + 11 + ... sized to fit.
        let value = map(&[("a", s(&"x".repeat(12)))]);
        let bytes = frame(&value);
        let body_len = bytes.len() - HEADER_LEN;
        let mut dec = FrameDecoder::new(body_len, DEFAULT_MAX_DEPTH).unwrap();
        assert_eq!(feed_all(&mut dec, &[&bytes]).unwrap(), vec![value.clone()]);

        // One byte over: fails from the header alone, before the body arrives.
        let mut dec = FrameDecoder::new(body_len - 1, DEFAULT_MAX_DEPTH).unwrap();
        let err = feed_all(&mut dec, &[&bytes[..HEADER_LEN]]).unwrap_err();
        assert_eq!(
            err.root(),
            &Error::FrameTooLarge {
                len: body_len as u64,
                max: body_len - 1
            }
        );
        assert!(dec.is_failed());
        assert_eq!(dec.buffered(), 0);

        // The encoder enforces the same limit.
        let mut out = Vec::new();
        write_frame(&mut out, &value, body_len, 32).unwrap();
        assert!(matches!(
            write_frame(&mut out, &value, body_len - 1, 32),
            Err(Error::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn header_split_across_feeds_still_checked_early() {
        let mut dec = FrameDecoder::new(10, 32).unwrap();
        let header = 11u32.to_be_bytes();
        let mut out = Vec::new();
        dec.feed(&header[..1], &mut ValueBuilder, &mut out).unwrap();
        dec.feed(&header[1..3], &mut ValueBuilder, &mut out)
            .unwrap();
        let err = dec
            .feed(&header[3..], &mut ValueBuilder, &mut out)
            .unwrap_err();
        assert!(matches!(
            err.root(),
            Error::FrameTooLarge { len: 11, max: 10 }
        ));
    }

    #[test]
    fn any_chunking_gives_the_same_frames() {
        let values = vec![sample(), map(&[("t", s("ping"))]), nested_maps(5), sample()];
        let stream: Vec<u8> = values.iter().flat_map(frame).collect();
        for chunk in [1, 2, 3, 5, 7, 64, stream.len()] {
            let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME, DEFAULT_MAX_DEPTH).unwrap();
            let chunks: Vec<&[u8]> = stream.chunks(chunk).collect();
            assert_eq!(
                feed_all(&mut dec, &chunks).unwrap(),
                values,
                "chunk {chunk}"
            );
            assert_eq!(dec.buffered(), 0);
        }
        // A partial frame stays buffered.
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME, DEFAULT_MAX_DEPTH).unwrap();
        let first = frame(&values[0]).len();
        assert_eq!(
            feed_all(&mut dec, &[&stream[..first + 3]]).unwrap(),
            vec![values[0].clone()]
        );
        assert_eq!(dec.buffered(), 3);
    }

    #[test]
    fn error_state_refuses_input_and_names_the_stream_offset() {
        let good = frame(&sample());
        let mut stream = good.clone();
        stream.extend_from_slice(&raw_frame(&[0x81, 0xa1, b'a', 0xc1]));
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME, DEFAULT_MAX_DEPTH).unwrap();
        let err = feed_all(&mut dec, &[&stream]).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "invalid msgpack at offset 3: reserved byte 0xc1 (frame at stream offset {})",
                good.len()
            )
        );
        let again = feed_all(&mut dec, &[&good]).unwrap_err();
        assert!(matches!(again, Error::DecoderFailed { .. }));
        assert!(again
            .to_string()
            .starts_with("decoder is in error state after"));
    }

    #[test]
    fn max_depth_is_capped() {
        assert!(FrameDecoder::new(1, MAX_DEPTH_LIMIT).is_ok());
        assert!(matches!(
            FrameDecoder::new(1, MAX_DEPTH_LIMIT + 1),
            Err(Error::InvalidLimit { .. })
        ));
        assert!(unpack(&[0xc0], MAX_DEPTH_LIMIT + 1, &mut ValueBuilder).is_err());
        // The deepest allowed nesting decodes. Unoptimised builds use far bigger stack
        // frames than release ones, hence the roomy thread.
        let deepest = std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn(|| {
                let mut deep = vec![0x91u8; MAX_DEPTH_LIMIT - 1];
                deep.push(0x90);
                unpack(&deep, MAX_DEPTH_LIMIT, &mut ValueBuilder)
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(matches!(deepest, Ok(Value::Array(_))));
    }

    #[test]
    fn zero_length_frame_is_invalid() {
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME, DEFAULT_MAX_DEPTH).unwrap();
        let err = feed_all(&mut dec, &[&[0, 0, 0, 0]]).unwrap_err();
        assert!(matches!(
            err.root(),
            Error::InvalidMsgpack { offset: 0, .. }
        ));
    }

    #[test]
    fn big_frame_fed_byte_by_byte_is_held_once() {
        let value = map(&[("text", s(&"z".repeat(200_000)))]);
        let bytes = frame(&value);
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME, DEFAULT_MAX_DEPTH).unwrap();
        let mut out = Vec::new();
        for byte in &bytes {
            dec.feed(std::slice::from_ref(byte), &mut ValueBuilder, &mut out)
                .unwrap();
            assert!(dec.buffered() <= bytes.len());
        }
        assert_eq!(out, vec![value]);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn mutated_input_never_panics() {
        // A small deterministic fuzz: flip, insert and delete bytes of a valid stream.
        let stream: Vec<u8> = [sample(), nested_maps(4)].iter().flat_map(frame).collect();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..5_000 {
            let mut data = stream.clone();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % data.len();
                match next() % 3 {
                    0 => data[at] ^= 1 << (next() % 8),
                    1 => data.insert(at, next() as u8),
                    _ => {
                        data.remove(at);
                    }
                }
            }
            let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME, DEFAULT_MAX_DEPTH).unwrap();
            let _ = feed_all(&mut dec, &data.chunks(7).collect::<Vec<_>>());
            let _ = unpack(&data, DEFAULT_MAX_DEPTH, &mut ValueBuilder);
        }
    }
}
