//! The one error type of the native core and its mapping to Python exceptions.
//!
//! `Error` itself is plain Rust so that `codec` and `dedup` stay free of pyo3; the pyo3
//! half of this file turns each variant into a named exception of `tsmsg._native`
//! (one class per failure class, all decode failures under `FrameError`). Every message
//! names the limit or the byte offset that was violated.

use std::fmt;

use pyo3::create_exception;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// Every failure of the frame codec and the dedup ring.
///
/// Decode offsets are byte offsets within the frame body (or within the buffer given to
/// `unpackb`); the streaming decoder wraps them in [`Error::InFrame`] to add where the
/// frame starts in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A frame header (or an encoded body) declares more than `max` bytes.
    FrameTooLarge { len: u64, max: usize },
    /// Not msgpack: a reserved byte, an empty body, a value cut short inside the frame.
    InvalidMsgpack { offset: usize, reason: String },
    /// The body decoded to one complete value with `count` bytes left over.
    TrailingBytes { offset: usize, count: usize },
    /// The frame body is a msgpack value of another type than map.
    NotAMap { found: &'static str },
    /// A map key (at any nesting level) is not a string.
    NonStringKey { offset: usize, found: &'static str },
    /// An array or map nests deeper than `max` (the outermost container is depth 1).
    TooDeep { offset: usize, max: usize },
    /// A string is not valid UTF-8; `offset` is the first invalid byte.
    InvalidUtf8 { offset: usize },
    /// A str/bin/array/map header declares more than the bytes left in the frame.
    LengthOverrun {
        offset: usize,
        kind: &'static str,
        declared: u64,
        remaining: usize,
    },
    /// An ext type (including the timestamp ext): not part of the tsmsg wire format.
    UnsupportedType { offset: usize, type_byte: u8 },
    /// The streaming decoder failed earlier and refuses further input.
    DecoderFailed { first: String },
    /// A decode error inside the frame whose header starts at `stream_offset`.
    InFrame {
        stream_offset: u64,
        source: Box<Error>,
    },
    /// A value that the encoder cannot represent (unsupported type, int out of range, a
    /// non-str map key, nesting deeper than the limit, a body that is not a dict, ...).
    Encode { reason: String },
    /// A limit given to a constructor is outside what the codec supports.
    InvalidLimit {
        name: &'static str,
        value: usize,
        max: usize,
    },
    /// A dedup key longer than the ring's limit.
    KeyTooLong { len: usize, max: usize },
}

impl Error {
    /// The innermost error: the one that decides the exception class.
    pub fn root(&self) -> &Error {
        match self {
            Error::InFrame { source, .. } => source.root(),
            other => other,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::FrameTooLarge { len, max } => {
                write!(f, "frame length {len} exceeds max_frame {max}")
            }
            Error::InvalidMsgpack { offset, reason } => {
                write!(f, "invalid msgpack at offset {offset}: {reason}")
            }
            Error::TrailingBytes { offset, count } => write!(
                f,
                "trailing bytes: the value ends at offset {offset} with {count} byte(s) left"
            ),
            Error::NotAMap { found } => {
                write!(f, "frame body must be a map, got {found} at offset 0")
            }
            Error::NonStringKey { offset, found } => {
                write!(
                    f,
                    "map key at offset {offset} must be a string, got {found}"
                )
            }
            Error::TooDeep { offset, max } => {
                write!(f, "nesting deeper than max_depth {max} at offset {offset}")
            }
            Error::InvalidUtf8 { offset } => {
                write!(f, "invalid UTF-8 in a string at offset {offset}")
            }
            Error::LengthOverrun {
                offset,
                kind,
                declared,
                remaining,
            } => write!(
                f,
                "{kind} at offset {offset} declares length {declared} but only {remaining} \
                 byte(s) remain in the frame"
            ),
            Error::UnsupportedType { offset, type_byte } => write!(
                f,
                "unsupported msgpack ext type (byte 0x{type_byte:02x}) at offset {offset}"
            ),
            Error::DecoderFailed { first } => {
                write!(
                    f,
                    "decoder is in error state after an earlier error: {first}"
                )
            }
            Error::InFrame {
                stream_offset,
                source,
            } => write!(f, "{source} (frame at stream offset {stream_offset})"),
            Error::Encode { reason } => f.write_str(reason),
            Error::InvalidLimit { name, value, max } => {
                write!(f, "{name} {value} is above the supported maximum {max}")
            }
            Error::KeyTooLong { len, max } => {
                write!(f, "dedup key of {len} bytes exceeds max_key_len {max}")
            }
        }
    }
}

impl std::error::Error for Error {}

create_exception!(
    tsmsg._native,
    FrameError,
    PyValueError,
    "A frame could not be decoded; the base of every decode failure class."
);
create_exception!(
    tsmsg._native,
    FrameTooLarge,
    FrameError,
    "A frame length exceeds max_frame."
);
create_exception!(
    tsmsg._native,
    InvalidMsgpack,
    FrameError,
    "The frame body is not valid msgpack (reserved byte, empty or truncated value)."
);
create_exception!(
    tsmsg._native,
    TrailingBytes,
    FrameError,
    "The frame body holds bytes after its value."
);
create_exception!(
    tsmsg._native,
    NotAMap,
    FrameError,
    "The frame body is not a msgpack map."
);
create_exception!(
    tsmsg._native,
    NonStringKey,
    FrameError,
    "A map key is not a string."
);
create_exception!(
    tsmsg._native,
    TooDeep,
    FrameError,
    "Arrays and maps nest deeper than max_depth."
);
create_exception!(
    tsmsg._native,
    InvalidUtf8,
    FrameError,
    "A msgpack string is not valid UTF-8."
);
create_exception!(
    tsmsg._native,
    LengthOverrun,
    FrameError,
    "A declared str/bin/array/map length exceeds the bytes left in the frame."
);
create_exception!(
    tsmsg._native,
    UnsupportedType,
    FrameError,
    "A msgpack ext type, which the tsmsg wire format does not use."
);
create_exception!(
    tsmsg._native,
    EncodeError,
    PyValueError,
    "A Python value cannot be encoded as a tsmsg frame or msgpack value."
);

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let msg = err.to_string();
        match err.root() {
            Error::FrameTooLarge { .. } => FrameTooLarge::new_err(msg),
            Error::InvalidMsgpack { .. } => InvalidMsgpack::new_err(msg),
            Error::TrailingBytes { .. } => TrailingBytes::new_err(msg),
            Error::NotAMap { .. } => NotAMap::new_err(msg),
            Error::NonStringKey { .. } => NonStringKey::new_err(msg),
            Error::TooDeep { .. } => TooDeep::new_err(msg),
            Error::InvalidUtf8 { .. } => InvalidUtf8::new_err(msg),
            Error::LengthOverrun { .. } => LengthOverrun::new_err(msg),
            Error::UnsupportedType { .. } => UnsupportedType::new_err(msg),
            // `root()` never returns `InFrame`; it would be a frame error all the same.
            Error::DecoderFailed { .. } | Error::InFrame { .. } => FrameError::new_err(msg),
            Error::Encode { .. } => EncodeError::new_err(msg),
            Error::KeyTooLong { .. } | Error::InvalidLimit { .. } => PyValueError::new_err(msg),
        }
    }
}

/// Adds the exception classes to `tsmsg._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("FrameError", py.get_type::<FrameError>())?;
    m.add("FrameTooLarge", py.get_type::<FrameTooLarge>())?;
    m.add("InvalidMsgpack", py.get_type::<InvalidMsgpack>())?;
    m.add("TrailingBytes", py.get_type::<TrailingBytes>())?;
    m.add("NotAMap", py.get_type::<NotAMap>())?;
    m.add("NonStringKey", py.get_type::<NonStringKey>())?;
    m.add("TooDeep", py.get_type::<TooDeep>())?;
    m.add("InvalidUtf8", py.get_type::<InvalidUtf8>())?;
    m.add("LengthOverrun", py.get_type::<LengthOverrun>())?;
    m.add("UnsupportedType", py.get_type::<UnsupportedType>())?;
    m.add("EncodeError", py.get_type::<EncodeError>())?;
    Ok(())
}
