//! The LMDB store's hot path in its writer thread: a batch's new messages turned into the
//! rows LMDB keeps for them (the log entry, the message index row, the dedup journal row),
//! with the dedup check, in one call per message (python/tsmsg/store/lmdb_store.py,
//! `LmdbStore._write_batch`). In Python the same work was a dozen steps and ~4 µs per
//! message under the GIL. py-lmdb still writes the rows (`Cursor.putmulti`), and the store
//! keeps everything else: channel records, edits and deletes, encryption's keys.

use std::collections::HashMap;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyInt, PyList, PyString, PyTuple};
use pyo3::{PyTraverseError, PyVisit};

use crate::codec;
use crate::py_codec::write_obj;
use crate::py_dedup::{cid_key, DedupRing};

/// A channel this batch appends to, as the store's `channel` callable gave it.
struct Channel {
    /// The channel's record (a dict): its `head` moves with every append, its `epoch`
    /// is each write's.
    record: Py<PyDict>,
    /// The channel's id as a big-endian u64: the prefix of its log and dedup keys.
    key: [u8; 8],
    /// The message id prefix (`<prefix>-<seq>` is a message's id).
    id_prefix: String,
}

/// One batch's new messages. `append(op)` checks a message, answers a known cid with the
/// seq it was first given, or gives it the channel's next seq and queues its rows; the
/// store then writes `take()`'s rows, and at the end `journal` and `new_cids`.
#[pyclass(module = "tsmsg._native", name = "AppendBatch")]
pub struct AppendBatch {
    ring: Py<DedupRing>,
    /// Dedup keys committed by earlier batches and not yet acknowledged (dict).
    unsynced: Py<PyDict>,
    ts: i64,
    next_order: u64,
    /// `channel(name) -> (record, id as 8 bytes, message id prefix)`, once per channel
    /// (None once the garbage collector cleared this object: it may close a cycle).
    channel: Option<Py<PyAny>>,
    /// `seal(entry, key) -> entry`: encryption at rest, or None for plaintext.
    seal: Option<Py<PyAny>>,
    /// The store's `AppendResult` type, called with (channel, seq, id, ts).
    result: Py<PyAny>,
    max_user_bytes: usize,
    max_cid_chars: usize,
    channels: HashMap<String, Channel>,
    /// (key, entry) rows for the log and (key, b"") rows for the message index, queued.
    log: Py<PyList>,
    index: Py<PyList>,
    /// (order, [dedup key, seq, ts]) rows for the dedup journal, in order.
    journal: Py<PyList>,
    /// Dedup key -> seq of every cid this batch stored.
    new_cids: Py<PyDict>,
    empty: Py<PyBytes>,
    buf: Vec<u8>,
}

fn value_error(message: String) -> PyErr {
    PyValueError::new_err(message)
}

#[pymethods]
impl AppendBatch {
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        ring: Py<DedupRing>,
        unsynced: Py<PyDict>,
        ts: i64,
        next_order: u64,
        channel: Py<PyAny>,
        seal: Option<Py<PyAny>>,
        result: Py<PyAny>,
        max_user_bytes: usize,
        max_cid_chars: usize,
    ) -> Self {
        Self {
            ring,
            unsynced,
            ts,
            next_order,
            channel: Some(channel),
            seal,
            result,
            max_user_bytes,
            max_cid_chars,
            channels: HashMap::new(),
            log: PyList::empty(py).unbind(),
            index: PyList::empty(py).unbind(),
            journal: PyList::empty(py).unbind(),
            new_cids: PyDict::new(py).unbind(),
            empty: PyBytes::new(py, b"").unbind(),
            buf: Vec::new(),
        }
    }

    /// Appends the message `op` (a WriteOp): its `AppendResult`, or the seq its cid was
    /// first given (an int: a duplicate, nothing queued). A malformed op raises and
    /// changes nothing.
    fn append<'py>(&mut self, op: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let py = op.py();
        let user_obj = op.getattr(intern!(py, "user"))?;
        let user = user_obj.cast::<PyString>()?.to_str()?;
        if user.is_empty() || user.len() > self.max_user_bytes || user.contains('\0') {
            return Err(value_error(format!(
                "user must be 1 to {} bytes of UTF-8 without NUL: {}",
                self.max_user_bytes,
                user_obj.repr()?
            )));
        }
        let cid_obj = op.getattr(intern!(py, "cid"))?;
        let text = op.getattr(intern!(py, "text"))?;
        let cid = match cid_obj.cast::<PyString>() {
            Ok(cid) if !text.is_none() && (1..=self.max_cid_chars).contains(&cid.len()?) => {
                cid.to_str()?
            }
            _ => {
                return Err(value_error(format!(
                    "a message needs text and a cid of 1 to {} chars",
                    self.max_cid_chars
                )))
            }
        };
        let name_obj = op.getattr(intern!(py, "channel"))?;
        let name = name_obj.cast::<PyString>()?.to_str()?;
        if !self.channels.contains_key(name) {
            let channel = self
                .channel
                .as_ref()
                .ok_or_else(|| PyTypeError::new_err("the AppendBatch was cleared"))?;
            let got = channel.bind(py).call1((&name_obj,))?;
            let (record, key, id_prefix): (Bound<'py, PyDict>, Bound<'py, PyBytes>, String) =
                got.extract()?;
            let key: [u8; 8] = key
                .as_bytes()
                .try_into()
                .map_err(|_| PyTypeError::new_err("a channel key is 8 bytes"))?;
            let record = record.unbind();
            self.channels.insert(
                name.to_owned(),
                Channel {
                    record,
                    key,
                    id_prefix,
                },
            );
        }
        let chan = &self.channels[name];
        let record = chan.record.bind(py);

        let dkey = cid_key(&chan.key, user, cid);
        let dkey_obj = PyBytes::new(py, &dkey);
        let new_cids = self.new_cids.bind(py);
        for known in [new_cids, self.unsynced.bind(py)] {
            if let Some(first) = known.get_item(&dkey_obj)? {
                return Ok(first);
            }
        }
        if let Some(first) = self.ring.borrow(py).inner.get(&dkey) {
            return Ok(PyInt::new(py, first).into_any());
        }

        let head: u64 = record
            .get_item(intern!(py, "head"))?
            .ok_or_else(|| PyTypeError::new_err("a channel record has a head"))?
            .extract()?;
        let seq = head.checked_add(1).ok_or_else(|| {
            value_error("the channel's log is at the last seq (2**64 - 1)".into())
        })?;
        let mid = format!("{}-{seq}", chan.id_prefix);
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&chan.key);
        key[8..].copy_from_slice(&seq.to_be_bytes());
        let key_obj = PyBytes::new(py, &key);
        let meta = op.getattr(intern!(py, "meta"))?;
        let meta = if meta.is_truthy()? { Some(meta) } else { None };
        let out = &mut self.buf;
        out.clear();
        match &self.seal {
            None => {
                // The layout of `packb(entry)` for the entry dict below, written directly.
                codec::write_map_header(out, if meta.is_some() { 7 } else { 6 })?;
                codec::write_str(out, "seq")?;
                codec::write_uint(out, seq);
                codec::write_str(out, "kind")?;
                codec::write_str(out, "message")?;
                codec::write_str(out, "id")?;
                codec::write_str(out, &mid)?;
                codec::write_str(out, "sender")?;
                codec::write_str(out, user)?;
                codec::write_str(out, "ts")?;
                codec::write_int(out, self.ts);
                codec::write_str(out, "text")?;
                write_obj(out, &text, 1)?;
                if let Some(meta) = &meta {
                    codec::write_str(out, "meta")?;
                    write_obj(out, meta, 1)?;
                }
            }
            Some(seal) => {
                let entry = PyDict::new(py);
                entry.set_item(intern!(py, "seq"), seq)?;
                entry.set_item(intern!(py, "kind"), intern!(py, "message"))?;
                entry.set_item(intern!(py, "id"), &mid)?;
                entry.set_item(intern!(py, "sender"), &user_obj)?;
                entry.set_item(intern!(py, "ts"), self.ts)?;
                entry.set_item(intern!(py, "text"), &text)?;
                if let Some(meta) = &meta {
                    entry.set_item(intern!(py, "meta"), meta)?;
                }
                write_obj(out, &seal.bind(py).call1((entry, &key_obj))?, 0)?;
            }
        }
        let value = PyBytes::new(py, out);
        out.clear();
        codec::write_array_header(out, 3)?;
        codec::write_bin(out, &dkey)?;
        codec::write_uint(out, seq);
        codec::write_int(out, self.ts);
        let row = PyBytes::new(py, out);
        let order = self
            .next_order
            .checked_add(new_cids.len() as u64)
            .ok_or_else(|| value_error("the dedup journal's order passed 2**64 - 1".into()))?;
        let order = PyBytes::new(py, &order.to_be_bytes());

        // Nothing above changed anything: from here on the message is appended.
        self.log
            .bind(py)
            .append(PyTuple::new(py, [&key_obj, &value])?)?;
        let empty = self.empty.bind(py).as_any();
        self.index
            .bind(py)
            .append(PyTuple::new(py, [key_obj.as_any(), empty])?)?;
        self.journal
            .bind(py)
            .append(PyTuple::new(py, [order, row])?)?;
        new_cids.set_item(&dkey_obj, seq)?;
        record.set_item(intern!(py, "head"), seq)?;
        if let Some(epoch) = record.get_item(intern!(py, "epoch"))? {
            op.setattr(intern!(py, "epoch"), epoch)?;
        }
        self.result.bind(py).call1((name_obj, seq, mid, self.ts))
    }

    /// Its references, for the garbage collector (the `channel` callable may refer to
    /// what holds this object).
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.ring)?;
        visit.call(&self.unsynced)?;
        visit.call(&self.channel)?;
        visit.call(&self.seal)?;
        visit.call(&self.result)?;
        for channel in self.channels.values() {
            visit.call(&channel.record)?;
        }
        visit.call(&self.log)?;
        visit.call(&self.index)?;
        visit.call(&self.journal)?;
        visit.call(&self.new_cids)
    }

    fn __clear__(&mut self) {
        self.channel = None;
        self.channels.clear();
    }

    /// The log and index rows queued since the last `take()`, handed over (and cleared).
    fn take<'py>(&mut self, py: Python<'py>) -> (Bound<'py, PyList>, Bound<'py, PyList>) {
        let log = std::mem::replace(&mut self.log, PyList::empty(py).unbind());
        let index = std::mem::replace(&mut self.index, PyList::empty(py).unbind());
        (log.into_bound(py), index.into_bound(py))
    }

    /// The dedup journal's rows of this batch: (order, packed [dedup key, seq, ts]).
    #[getter]
    fn journal<'py>(&self, py: Python<'py>) -> Bound<'py, PyList> {
        self.journal.bind(py).clone()
    }

    /// Dedup key -> seq of every cid this batch stored.
    #[getter]
    fn new_cids<'py>(&self, py: Python<'py>) -> Bound<'py, PyDict> {
        self.new_cids.bind(py).clone()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<AppendBatch>()
}
