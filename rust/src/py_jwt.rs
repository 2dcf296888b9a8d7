//! Python wrappers for [`crate::jwt`]: `jws_parts` and `HmacJwt`; conversions only.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::jwt;

create_exception!(
    tsmsg._native,
    MalformedJws,
    PyException,
    "A token that is not three parts of canonical unpadded base64url."
);

type Parts<'py> = (
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
);

/// A token's three parts decoded (header JSON, payload JSON, signature), or
/// `MalformedJws`.
#[pyfunction]
fn jws_parts<'py>(py: Python<'py>, token: &str) -> PyResult<Parts<'py>> {
    let (header, payload, signature) =
        jwt::parts(token).ok_or_else(|| MalformedJws::new_err("malformed token"))?;
    Ok((
        PyBytes::new(py, &header),
        PyBytes::new(py, &payload),
        PyBytes::new(py, &signature),
    ))
}

/// Verifies HMAC signatures (HS256, HS384 or HS512) against one or more secrets, the
/// current one first: `verify(signing_input, signature) -> bool`.
#[pyclass(module = "tsmsg._native", name = "HmacJwt", frozen)]
pub struct HmacJwt {
    inner: jwt::HmacVerifier,
}

#[pymethods]
impl HmacJwt {
    #[new]
    fn new(algorithm: &str, secrets: Vec<Vec<u8>>) -> PyResult<Self> {
        let alg = jwt::hmac_algorithm(algorithm)
            .ok_or_else(|| PyValueError::new_err(format!("not an HMAC algorithm: {algorithm}")))?;
        if secrets.is_empty() {
            return Err(PyValueError::new_err("at least one secret"));
        }
        let keys: Vec<&[u8]> = secrets.iter().map(Vec::as_slice).collect();
        Ok(Self {
            inner: jwt::HmacVerifier::new(alg, &keys),
        })
    }

    fn verify(&self, signing_input: &[u8], signature: &[u8]) -> bool {
        self.inner.verify(signing_input, signature)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MalformedJws", m.py().get_type::<MalformedJws>())?;
    m.add_function(wrap_pyfunction!(jws_parts, m)?)?;
    m.add_class::<HmacJwt>()?;
    Ok(())
}
