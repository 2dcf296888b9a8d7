//! Python wrapper for [`crate::jwt`]: `HmacJwt` (a verifier's algorithm and secrets);
//! conversions only.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::jwt;

create_exception!(
    tsmsg._native,
    JwtRefused,
    PyException,
    "A token's shape, algorithm or signature was refused; args[0] says which: \
     'malformed', 'algorithm' or 'signature'."
);

/// Checks HMAC-signed tokens (HS256, HS384 or HS512) against one or more secrets, the
/// current one first. `payload(token)` gives the payload's JSON text as signed, or
/// raises `JwtRefused`; the claims are the caller's to check.
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

    fn payload<'py>(&self, py: Python<'py>, token: &str) -> PyResult<Bound<'py, PyBytes>> {
        match self.inner.payload(token) {
            Ok(json) => Ok(PyBytes::new(py, &json)),
            Err(refusal) => Err(JwtRefused::new_err(refusal.code())),
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("JwtRefused", m.py().get_type::<JwtRefused>())?;
    m.add_class::<HmacJwt>()?;
    Ok(())
}
