//! Python wrapper for [`crate::dedup::DedupRing`]: converts keys and arguments, nothing more.

use std::num::NonZeroUsize;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

use crate::dedup;

/// Fixed-capacity map from a key (str or bytes; a str is keyed by its UTF-8 bytes) to the
/// seq first assigned to it. When full, inserting a new key evicts the oldest insertion.
#[pyclass(module = "tsmsg._native", name = "DedupRing")]
pub struct DedupRing {
    pub(crate) inner: dedup::DedupRing,
}

/// A cid's dedup key: the channel's id (big-endian u64, its log key prefix), the
/// sender's UTF-8, NUL, the cid's UTF-8 (STORAGE.md: the dedup journal). The one place
/// that lays it out: the writer's appends (`AppendBatch`) and the event loop's lookups.
pub(crate) fn cid_key(chan_key: &[u8; 8], sender: &str, cid: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(8 + sender.len() + 1 + cid.len());
    key.extend_from_slice(chan_key);
    key.extend_from_slice(sender.as_bytes());
    key.push(0);
    key.extend_from_slice(cid.as_bytes());
    key
}

/// The bytes of a str or bytes key, borrowed from the Python object (a str through its
/// cached UTF-8 form), or `None` if `key` is neither.
fn key_bytes<'a>(key: &'a Bound<'_, PyAny>) -> PyResult<Option<&'a [u8]>> {
    if let Ok(bytes) = key.cast::<PyBytes>() {
        return Ok(Some(bytes.as_bytes()));
    }
    if let Ok(text) = key.cast::<PyString>() {
        return Ok(Some(text.to_str()?.as_bytes()));
    }
    Ok(None)
}

/// Like [`key_bytes`], but a key of any other type is a `TypeError`.
fn require_key_bytes<'a>(key: &'a Bound<'_, PyAny>) -> PyResult<&'a [u8]> {
    key_bytes(key)?.ok_or_else(|| {
        let type_name = key
            .get_type()
            .name()
            .map_or_else(|_| "?".to_owned(), |name| name.to_string());
        PyTypeError::new_err(format!(
            "DedupRing key must be str or bytes, not {type_name}"
        ))
    })
}

// The `#[new]` signature spells the default as a literal because pyo3 renders any other
// expression as `...` in `__text_signature__` (which the stub is checked against).
const _: () = assert!(dedup::DedupRing::DEFAULT_MAX_KEY_LEN == 256);

#[pymethods]
impl DedupRing {
    #[new]
    #[pyo3(signature = (capacity, max_key_len = 256))]
    fn new(capacity: usize, max_key_len: usize) -> PyResult<Self> {
        let capacity = NonZeroUsize::new(capacity)
            .ok_or_else(|| PyValueError::new_err("DedupRing capacity must be at least 1, got 0"))?;
        Ok(Self {
            inner: dedup::DedupRing::new(capacity, max_key_len),
        })
    }

    #[getter]
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }

    #[getter]
    fn max_key_len(&self) -> usize {
        self.inner.max_key_len()
    }

    /// The seq first assigned to `key`, or None if it is not held. Does not refresh its age.
    fn get(&self, key: &Bound<'_, PyAny>) -> PyResult<Option<u64>> {
        Ok(self.inner.get(require_key_bytes(key)?))
    }

    /// `get` of the dedup key of (`chan_id`, `sender`, `cid`), built here: the event
    /// loop's check of every send (one call, no key object).
    fn get_cid(&self, chan_id: u64, sender: &str, cid: &str) -> Option<u64> {
        self.inner
            .get(&cid_key(&chan_id.to_be_bytes(), sender, cid))
    }

    /// Records `seq` for `key` and returns None, evicting the oldest entry if full; if `key`
    /// is already held, changes nothing and returns its first seq. A key longer than
    /// `max_key_len` bytes raises ValueError.
    fn insert(&mut self, key: &Bound<'_, PyAny>, seq: u64) -> PyResult<Option<u64>> {
        Ok(self.inner.insert(require_key_bytes(key)?, seq)?)
    }

    /// `insert` of every (key, seq) of `items`, in the dict's order (a batch's cids).
    fn insert_all(&mut self, items: &Bound<'_, PyDict>) -> PyResult<()> {
        for (key, seq) in items.iter() {
            self.inner
                .insert(require_key_bytes(&key)?, seq.extract()?)?;
        }
        Ok(())
    }

    /// Forgets `key` if it is the oldest entry held (True), else changes nothing (False):
    /// a journal kept in the same order and pruned oldest first is mirrored with it.
    fn forget_oldest(&mut self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(key_bytes(key)?.is_some_and(|key| self.inner.forget_oldest(key)))
    }

    /// Any object other than str or bytes is simply not held (like `"x" in range(3)`).
    fn __contains__(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        Ok(key_bytes(key)?.is_some_and(|key| self.inner.contains(key)))
    }

    fn __len__(&self) -> usize {
        self.inner.len()
    }

    fn __repr__(&self) -> String {
        format!(
            "DedupRing(len={}, capacity={}, max_key_len={})",
            self.inner.len(),
            self.inner.capacity(),
            self.inner.max_key_len()
        )
    }
}

/// The dedup key of (`chan_id`, `sender`, `cid`), as the store's journal keeps it.
#[pyfunction]
fn dedup_key<'py>(py: Python<'py>, chan_id: u64, sender: &str, cid: &str) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &cid_key(&chan_id.to_be_bytes(), sender, cid))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<DedupRing>()?;
    m.add_function(wrap_pyfunction!(dedup_key, m)?)
}
