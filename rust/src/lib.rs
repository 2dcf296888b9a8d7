//! `tsmsg._native`: the module declaration only. Logic lives in plain-Rust modules
//! (`codec`, `dedup`, `jwt`, `tls`) with their own tests; the `py_*` modules are thin pyo3 wrappers.
//! One exception: `py_append`, the LMDB writer's append step, works on the store's Python
//! objects (its op, the channel record's dict) and is tested from Python (tests/test_store.py).

pub mod codec;
pub mod dedup;
pub mod error;
pub mod jwt;
mod py_append;
mod py_codec;
mod py_dedup;
mod py_jwt;
mod py_tls;
pub mod tls;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    error::register(m)?;
    py_append::register(m)?;
    py_codec::register(m)?;
    py_dedup::register(m)?;
    py_jwt::register(m)?;
    py_tls::register(m)?;
    Ok(())
}
