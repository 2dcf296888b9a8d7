//! Thin pyo3 wrappers over `codec`: Python values in and out, no codec logic.
//!
//! Decoding builds Python objects directly from the validated bytes (a `codec::Builder`);
//! short map keys come from a small shared cache of Python strings, as msgspec and orjson
//! do, because the same few keys (`t`, `rid`, `channel`, ...) start every frame.
//! Encoding walks Python objects with exact-type checks first (the common case) and
//! subclass checks after, writing through the `codec::write_*` functions.

use std::sync::Mutex;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyRuntimeError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyDict, PyFloat, PyInt, PyList, PyMemoryView, PyString, PyTuple,
};

use crate::codec::{self, Builder, DEFAULT_MAX_DEPTH, DEFAULT_MAX_FRAME};
use crate::error::Error;

/// Number of slots in the map-key cache (a power of two): enough for every key of the
/// protocol and the common `meta` keys, small enough to stay in the CPU cache.
const KEY_CACHE_SLOTS: usize = 512;
/// Longest key that is cached; longer keys are rare and would crowd out the short ones.
const KEY_CACHE_MAX_LEN: usize = 32;

/// A cached key: its length, the words that make up its bytes (see [`key_words`]), and
/// its interned Python string.
struct KeySlot {
    len: usize,
    words: [u64; 4],
    string: Py<PyString>,
}

/// Loads 8 bytes at `at` (in bounds by the caller's length check) as one word.
#[inline(always)]
fn load8(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Loads 4 bytes at `at` (in bounds by the caller's length check) as one word.
#[inline(always)]
fn load4(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u64::from(u32::from_le_bytes(w))
}

/// Words that, with the length, determine a key of at most 32 bytes: overlapping loads
/// from both ends cover every byte. Comparing these (and hashing them) replaced a padded
/// copy whose store-forwarding stalls perf showed as a quarter of decode time.
#[inline(always)]
fn key_words(b: &[u8]) -> [u64; 4] {
    let n = b.len();
    match n {
        0 => [0; 4],
        1..=3 => [
            u64::from(b[0]) | u64::from(b[n / 2]) << 8 | u64::from(b[n - 1]) << 16,
            0,
            0,
            0,
        ],
        4..=7 => [load4(b, 0), load4(b, n - 4), 0, 0],
        8..=16 => [load8(b, 0), load8(b, n - 8), 0, 0],
        _ => [load8(b, 0), load8(b, 8), load8(b, n - 16), load8(b, n - 8)],
    }
}

/// A direct-mapped cache from key bytes to an interned Python string.
struct KeyCache {
    slots: Vec<Option<KeySlot>>,
}

impl KeyCache {
    const fn new() -> Self {
        KeyCache { slots: Vec::new() }
    }

    fn get<'py>(&mut self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyString>> {
        let bytes = key.as_bytes();
        if bytes.len() > KEY_CACHE_MAX_LEN {
            return new_string(py, key);
        }
        if self.slots.is_empty() {
            self.slots.resize_with(KEY_CACHE_SLOTS, || None);
        }
        let words = key_words(bytes);
        let mut hash = bytes.len() as u64;
        for word in words {
            hash = (hash ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        let slot = &mut self.slots[(hash >> 32) as usize & (KEY_CACHE_SLOTS - 1)];
        if let Some(cached) = slot {
            if cached.len == bytes.len() && cached.words == words {
                return Ok(cached.string.bind(py).clone());
            }
        }
        let string = PyString::intern(py, key);
        *slot = Some(KeySlot {
            len: bytes.len(),
            words,
            string: string.clone().unbind(),
        });
        Ok(string)
    }
}

/// Shared by every decoder: the GIL serialises access; `try_lock` (never `lock`) so that a
/// decode re-entered from a finalizer during a decode just skips the cache.
static KEY_CACHE: Mutex<KeyCache> = Mutex::new(KeyCache::new());

/// A Python str from decoded text.
#[inline]
fn new_string<'py>(py: Python<'py>, s: &str) -> PyResult<Bound<'py, PyString>> {
    if !s.is_ascii() {
        return Ok(PyString::new(py, s));
    }
    // ASCII (nearly every frame string): allocate the compact str and copy the bytes in,
    // skipping CPython's UTF-8 decoder, which perf showed re-validating every string.
    let len = ffi::Py_ssize_t::try_from(s.len())?;
    // SAFETY: `PyUnicode_New(len, 127)` returns a new compact ASCII str with room for `len`
    // one-byte characters (or NULL with an exception set, which `from_owned_ptr_or_err`
    // turns into `Err`). We fill exactly `len` bytes, all below 128 as maxchar 127 requires,
    // before the object is visible to anything else.
    unsafe {
        let ptr = ffi::PyUnicode_New(len, 127);
        let string = Bound::from_owned_ptr_or_err(py, ptr)?;
        std::ptr::copy_nonoverlapping(s.as_ptr(), ffi::PyUnicode_1BYTE_DATA(ptr), s.len());
        Ok(string.cast_into_unchecked())
    }
}

/// Most entries a decoded dict is presized for; protocol frames have fewer than 20 keys.
const DICT_PRESIZE_MAX: usize = 64;

/// A list being filled by the decoder: created at its final length, items set in order.
struct ListFill<'py> {
    list: Bound<'py, PyList>,
    len: usize,
    next: usize,
}

/// Builds Python objects for `codec`'s decoder.
struct PyBuilder<'py, 'c> {
    py: Python<'py>,
    keys: Option<&'c mut KeyCache>,
}

impl<'py> Builder for PyBuilder<'py, '_> {
    type Value = Bound<'py, PyAny>;
    type Array = ListFill<'py>;
    type Map = Bound<'py, PyDict>;
    type Error = PyErr;

    fn nil(&mut self) -> PyResult<Self::Value> {
        Ok(self.py.None().into_bound(self.py))
    }
    fn bool(&mut self, v: bool) -> PyResult<Self::Value> {
        Ok(PyBool::new(self.py, v).to_owned().into_any())
    }
    fn int(&mut self, v: i64) -> PyResult<Self::Value> {
        Ok(v.into_pyobject(self.py)?.into_any())
    }
    fn uint(&mut self, v: u64) -> PyResult<Self::Value> {
        Ok(v.into_pyobject(self.py)?.into_any())
    }
    fn float(&mut self, v: f64) -> PyResult<Self::Value> {
        Ok(PyFloat::new(self.py, v).into_any())
    }
    fn str(&mut self, v: &str) -> PyResult<Self::Value> {
        Ok(new_string(self.py, v)?.into_any())
    }
    fn bin(&mut self, v: &[u8]) -> PyResult<Self::Value> {
        Ok(PyBytes::new(self.py, v).into_any())
    }
    fn key(&mut self, v: &str) -> PyResult<Self::Value> {
        match &mut self.keys {
            Some(cache) => Ok(cache.get(self.py, v)?.into_any()),
            None => self.str(v),
        }
    }
    fn begin_array(&mut self, len: usize) -> PyResult<Self::Array> {
        let size = ffi::Py_ssize_t::try_from(len)?;
        // SAFETY: `PyList_New` returns a new list of `len` NULL slots, or NULL with an
        // exception set (turned into `Err`). CPython's list traversal and deallocation
        // accept NULL slots, so a list abandoned half-filled on error is safe to drop.
        let list = unsafe { Bound::from_owned_ptr_or_err(self.py, ffi::PyList_New(size))? };
        Ok(ListFill {
            // SAFETY: `PyList_New` returned a list.
            list: unsafe { list.cast_into_unchecked() },
            len,
            next: 0,
        })
    }
    fn push(&mut self, array: &mut Self::Array, v: Self::Value) -> PyResult<()> {
        if array.next >= array.len {
            return Err(PyRuntimeError::new_err(
                "decoder pushed past the array length",
            ));
        }
        // SAFETY: the slot `next` is in bounds (checked above) and still NULL (slots are
        // filled once, in order), so `PyList_SET_ITEM` stealing the reference leaks nothing.
        unsafe {
            ffi::PyList_SET_ITEM(
                array.list.as_ptr(),
                array.next as ffi::Py_ssize_t,
                v.into_ptr(),
            );
        }
        array.next += 1;
        Ok(())
    }
    fn end_array(&mut self, array: Self::Array) -> PyResult<Self::Value> {
        if array.next != array.len {
            return Err(PyRuntimeError::new_err("decoder ended an array early"));
        }
        Ok(array.list.into_any())
    }
    fn begin_map(&mut self, len: usize) -> PyResult<Self::Map> {
        // Presized: an `event` has 9 keys, past the 5 an empty dict holds without a resize.
        // Capped, because a dict slot costs far more than the 2 bytes an entry needs on
        // the wire (and duplicate keys never fill it): bigger maps grow as usual.
        let size = ffi::Py_ssize_t::try_from(len.min(DICT_PRESIZE_MAX))?;
        // SAFETY: `_PyDict_NewPresized` returns a new dict or NULL with an exception set.
        unsafe {
            let dict = Bound::from_owned_ptr_or_err(self.py, ffi::_PyDict_NewPresized(size))?;
            Ok(dict.cast_into_unchecked())
        }
    }
    fn insert(&mut self, map: &mut Self::Map, key: Self::Value, v: Self::Value) -> PyResult<()> {
        map.set_item(key, v)
    }
    fn end_map(&mut self, map: Self::Map) -> PyResult<Self::Value> {
        Ok(map.into_any())
    }
}

/// Runs `f` with a `PyBuilder` that uses the shared key cache when it is free.
fn with_builder<'py, R>(py: Python<'py>, f: impl FnOnce(&mut PyBuilder<'py, '_>) -> R) -> R {
    let mut guard = KEY_CACHE.try_lock().ok();
    let mut builder = PyBuilder {
        py,
        keys: guard.as_deref_mut(),
    };
    f(&mut builder)
}

/// Runs `f` on the bytes of a bytes, bytearray or memoryview (only bytes avoids a copy).
fn with_bytes<R>(data: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
    if let Ok(bytes) = data.cast::<PyBytes>() {
        return Ok(f(bytes.as_bytes()));
    }
    if let Ok(array) = data.cast::<PyByteArray>() {
        return Ok(f(&array.to_vec()));
    }
    let buffer = PyBuffer::<u8>::get(data)?;
    Ok(f(&buffer.to_vec(data.py())?))
}

fn encode_error(reason: String) -> PyErr {
    Error::Encode { reason }.into()
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |name| name.to_string())
}

/// Appends the msgpack form of `obj`, which sits inside `depth` containers.
pub(crate) fn write_obj(out: &mut Vec<u8>, obj: &Bound<'_, PyAny>, depth: usize) -> PyResult<()> {
    // Exact types first: they are nearly all of what frames hold.
    if obj.is_exact_instance_of::<PyString>() {
        return write_pystr(out, obj);
    }
    if obj.is_exact_instance_of::<PyInt>() {
        return write_pyint(out, obj);
    }
    if let Ok(dict) = obj.cast_exact::<PyDict>() {
        return write_dict(out, dict, depth);
    }
    if let Ok(list) = obj.cast_exact::<PyList>() {
        return write_seq(out, list.len(), list.iter(), depth);
    }
    if obj.is_none() {
        codec::write_nil(out);
        return Ok(());
    }
    if let Ok(b) = obj.cast_exact::<PyBool>() {
        codec::write_bool(out, b.is_true());
        return Ok(());
    }
    if let Ok(f) = obj.cast_exact::<PyFloat>() {
        codec::write_f64(out, f.value());
        return Ok(());
    }
    if let Ok(b) = obj.cast_exact::<PyBytes>() {
        return Ok(codec::write_bin(out, b.as_bytes())?);
    }
    if let Ok(t) = obj.cast_exact::<PyTuple>() {
        return write_seq(out, t.len(), t.iter(), depth);
    }
    // Subclasses (IntEnum, StrEnum, OrderedDict, ...) encode as their base type, like
    // msgpack-python does.
    if obj.is_instance_of::<PyString>() {
        return write_pystr(out, obj);
    }
    if obj.is_instance_of::<PyInt>() {
        return write_pyint(out, obj);
    }
    if let Ok(dict) = obj.cast::<PyDict>() {
        return write_dict(out, dict, depth);
    }
    if let Ok(list) = obj.cast::<PyList>() {
        return write_seq(out, list.len(), list.iter(), depth);
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return write_seq(out, t.len(), t.iter(), depth);
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        codec::write_f64(out, f.value());
        return Ok(());
    }
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(codec::write_bin(out, b.as_bytes())?);
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(codec::write_bin(out, &b.to_vec())?);
    }
    if obj.is_instance_of::<PyMemoryView>() {
        let bytes = obj.call_method0("tobytes")?;
        return Ok(codec::write_bin(out, bytes.cast::<PyBytes>()?.as_bytes())?);
    }
    Err(encode_error(format!(
        "cannot encode objects of type {}",
        type_name(obj)
    )))
}

fn write_pystr(out: &mut Vec<u8>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
    let s = obj.cast::<PyString>()?;
    // SAFETY: `s` is a str. A compact ASCII str stores its `len` one-byte characters right
    // after its header (valid UTF-8, as ASCII), and the borrow ends before `s` can change
    // or be freed (we hold a reference and run no Python code). Perf showed the call into
    // `PyUnicode_AsUTF8AndSize` as a third of encoding time for string-heavy frames.
    // (CPython's full API: the crate is built without abi3, see Cargo.toml.)
    unsafe {
        let ptr = s.as_ptr();
        if ffi::PyUnicode_IS_COMPACT_ASCII(ptr) != 0 {
            let len = ffi::PyUnicode_GET_LENGTH(ptr) as usize;
            let data = ffi::_PyUnicode_COMPACT_DATA(ptr) as *const u8;
            let text = std::str::from_utf8_unchecked(std::slice::from_raw_parts(data, len));
            return Ok(codec::write_str(out, text)?);
        }
    }
    // Other strs: the UTF-8 form, cached on the object. Fails only for lone surrogates,
    // which UTF-8 (and so msgpack) cannot carry.
    let text = s.to_str().map_err(|_| {
        encode_error("str is not valid UTF-8 (it holds a lone surrogate)".to_owned())
    })?;
    Ok(codec::write_str(out, text)?)
}

fn write_pyint(out: &mut Vec<u8>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
    if let Ok(v) = obj.extract::<i64>() {
        codec::write_int(out, v);
    } else if let Ok(v) = obj.extract::<u64>() {
        codec::write_uint(out, v);
    } else {
        return Err(encode_error(
            "int out of range: msgpack holds integers from -2**63 to 2**64-1".to_owned(),
        ));
    }
    Ok(())
}

fn write_dict(out: &mut Vec<u8>, dict: &Bound<'_, PyDict>, depth: usize) -> PyResult<()> {
    codec::check_encode_depth(depth + 1, DEFAULT_MAX_DEPTH)?;
    codec::write_map_header(out, dict.len())?;
    for (key, value) in dict.iter() {
        if !key.is_instance_of::<PyString>() {
            return Err(encode_error(format!(
                "map keys must be str, got {}",
                type_name(&key)
            )));
        }
        write_pystr(out, &key)?;
        write_obj(out, &value, depth + 1)?;
    }
    Ok(())
}

fn write_seq<'py>(
    out: &mut Vec<u8>,
    len: usize,
    items: impl Iterator<Item = Bound<'py, PyAny>>,
    depth: usize,
) -> PyResult<()> {
    codec::check_encode_depth(depth + 1, DEFAULT_MAX_DEPTH)?;
    codec::write_array_header(out, len)?;
    for item in items {
        write_obj(out, &item, depth + 1)?;
    }
    Ok(())
}

/// Appends one frame holding `obj`, which must be a dict.
fn write_frame(out: &mut Vec<u8>, obj: &Bound<'_, PyAny>, max_frame: usize) -> PyResult<()> {
    let dict = obj
        .cast::<PyDict>()
        .map_err(|_| encode_error(format!("frame body must be a dict, got {}", type_name(obj))))?;
    let start = codec::begin_frame(out);
    write_dict(out, dict, 0)?;
    Ok(codec::finish_frame(out, start, max_frame)?)
}

/// Encode output capacity kept between calls: a full 1 MiB frame's worth, so encoding
/// reuses one buffer instead of regrowing a new one per call, while bounding idle memory.
const ENCODE_BUFFER_RETAIN: usize = DEFAULT_MAX_FRAME + codec::HEADER_LEN;

/// The reusable encode buffer; `try_lock` (never `lock`) so a re-entered encode (from a
/// finalizer) just uses a fresh buffer.
static ENCODE_BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Runs `write` on an empty buffer and returns what it wrote as `bytes`.
fn encode_with<'py>(
    py: Python<'py>,
    write: impl FnOnce(&mut Vec<u8>) -> PyResult<()>,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut guard = ENCODE_BUFFER.try_lock().ok();
    let mut fresh = Vec::new();
    let out = guard.as_deref_mut().unwrap_or(&mut fresh);
    out.clear();
    let result = write(out).map(|()| PyBytes::new(py, out));
    if out.capacity() > ENCODE_BUFFER_RETAIN {
        out.clear();
        out.shrink_to(ENCODE_BUFFER_RETAIN);
    }
    result
}

// Python signatures spell the defaults as literals so that `__text_signature__` (and so
// `inspect` and mypy.stubtest) shows them; these keep the literals equal to the constants.
const _: () = assert!(DEFAULT_MAX_FRAME == 1048576);
const _: () = assert!(DEFAULT_MAX_DEPTH == 32);

/// Encodes `obj` (a dict) as one frame: the 4-byte length and the msgpack map.
#[pyfunction]
#[pyo3(signature = (obj, max_frame=None))]
fn encode<'py>(obj: &Bound<'py, PyAny>, max_frame: Option<usize>) -> PyResult<Bound<'py, PyBytes>> {
    let max_frame = max_frame.unwrap_or(usize::MAX);
    encode_with(obj.py(), |out| write_frame(out, obj, max_frame))
}

/// Encodes each dict of `objs` as a frame, all in one contiguous buffer.
#[pyfunction]
#[pyo3(signature = (objs, max_frame=None))]
fn encode_many<'py>(
    objs: &Bound<'py, PyAny>,
    max_frame: Option<usize>,
) -> PyResult<Bound<'py, PyBytes>> {
    let max_frame = max_frame.unwrap_or(usize::MAX);
    encode_with(objs.py(), |out| {
        for obj in objs.try_iter()? {
            write_frame(out, &obj?, max_frame)?;
        }
        Ok(())
    })
}

/// Encodes any supported value as bare msgpack (no length prefix).
#[pyfunction]
fn packb<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    encode_with(obj.py(), |out| write_obj(out, obj, 0))
}

/// Decodes one bare msgpack value that fills `data` exactly.
#[pyfunction]
#[pyo3(signature = (data, max_depth=32))]
fn unpackb<'py>(data: &Bound<'py, PyAny>, max_depth: usize) -> PyResult<Bound<'py, PyAny>> {
    let py = data.py();
    with_bytes(data, |bytes| {
        with_builder(py, |b| codec::unpack(bytes, max_depth, b))
    })?
}

/// Streaming frame decoder: feed it bytes as they arrive, get complete frames back.
#[pyclass(module = "tsmsg._native", name = "FrameDecoder")]
struct FrameDecoder {
    inner: codec::FrameDecoder,
}

#[pymethods]
impl FrameDecoder {
    #[new]
    #[pyo3(signature = (max_frame=1048576, max_depth=32))]
    fn new(max_frame: usize, max_depth: usize) -> PyResult<Self> {
        Ok(FrameDecoder {
            inner: codec::FrameDecoder::new(max_frame, max_depth)?,
        })
    }

    /// Largest frame body accepted, in bytes.
    #[getter]
    fn max_frame(&self) -> usize {
        self.inner.max_frame()
    }

    /// Deepest nesting of arrays and maps accepted (the frame's map is depth 1).
    #[getter]
    fn max_depth(&self) -> usize {
        self.inner.max_depth()
    }

    /// Bytes held of an incomplete frame.
    #[getter]
    fn buffered(&self) -> usize {
        self.inner.buffered()
    }

    /// Feeds stream bytes; returns the frames they complete, in order.
    fn feed<'py>(&mut self, data: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyList>> {
        let py = data.py();
        let mut frames = Vec::new();
        with_bytes(data, |bytes| {
            with_builder(py, |b| self.inner.feed(bytes, b, &mut frames))
        })??;
        PyList::new(py, frames)
    }
}

/// Adds the codec's functions, class and constants to `tsmsg._native`.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("DEFAULT_MAX_FRAME", DEFAULT_MAX_FRAME)?;
    m.add("DEFAULT_MAX_DEPTH", DEFAULT_MAX_DEPTH)?;
    m.add_function(wrap_pyfunction!(encode, m)?)?;
    m.add_function(wrap_pyfunction!(encode_many, m)?)?;
    m.add_function(wrap_pyfunction!(packb, m)?)?;
    m.add_function(wrap_pyfunction!(unpackb, m)?)?;
    m.add_class::<FrameDecoder>()?;
    Ok(())
}
