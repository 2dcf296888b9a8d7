//! Python wrappers for [`crate::tls`]: `TlsConfig` (a server's certificate, key and client
//! CAs) and `TlsSession` (one connection's bytes in and out); conversions only.

use std::sync::Arc;

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::tls;

create_exception!(
    tsmsg._native,
    TlsError,
    PyException,
    "A TLS protocol failure (a failed handshake, a bad record, an alert from the peer)."
);

fn tls_error(err: tls::Error) -> PyErr {
    TlsError::new_err(err.to_string())
}

/// A server's TLS settings: a certificate chain and its private key (PEM), and with
/// `client_ca_pem` the CAs a client certificate must be signed by (then one is required).
/// TLS 1.2 and 1.3; a bad input is a ValueError saying what is wrong.
#[pyclass(module = "tsmsg._native", name = "TlsConfig", frozen)]
pub struct TlsConfig {
    inner: Arc<rustls::ServerConfig>,
    #[pyo3(get)]
    client_certificates: bool,
}

#[pymethods]
impl TlsConfig {
    #[new]
    #[pyo3(signature = (cert_pem, key_pem, client_ca_pem = None))]
    fn new(cert_pem: &[u8], key_pem: &[u8], client_ca_pem: Option<&[u8]>) -> PyResult<Self> {
        let inner =
            tls::server_config(cert_pem, key_pem, client_ca_pem).map_err(PyValueError::new_err)?;
        Ok(Self {
            inner,
            client_certificates: client_ca_pem.is_some(),
        })
    }

    /// The TLS versions a client may use, oldest first.
    #[getter]
    fn versions(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .crypto_provider()
            .cipher_suites
            .iter()
            .map(|suite| format!("{:?}", suite.version().version))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// One server-side TLS connection, driven by bytes: `receive(ciphertext)` gives the
/// plaintext of every record completed and whether close_notify came; `encrypt(plaintext)`
/// gives the bytes to write (first any handshake or alert bytes pending). The socket is the
/// caller's. After a `TlsError` every call raises it again; `take_outgoing()` then holds the
/// fatal alert for the peer.
#[pyclass(module = "tsmsg._native", name = "TlsSession")]
pub struct TlsSession {
    inner: tls::TlsSession,
}

#[pymethods]
impl TlsSession {
    #[new]
    fn new(config: &TlsConfig) -> PyResult<Self> {
        Ok(Self {
            inner: tls::TlsSession::new(config.inner.clone()).map_err(tls_error)?,
        })
    }

    /// The plaintext of the records `ciphertext` completes (b"" while a record is
    /// incomplete or the handshake goes on), and True once the peer sent close_notify.
    fn receive<'py>(
        &mut self,
        py: Python<'py>,
        ciphertext: &[u8],
    ) -> PyResult<(Bound<'py, PyBytes>, bool)> {
        let mut plaintext = Vec::new();
        self.inner
            .receive(ciphertext, &mut plaintext)
            .map_err(tls_error)?;
        Ok((PyBytes::new(py, &plaintext), self.inner.peer_closed()))
    }

    /// The bytes to write for `plaintext`: pending TLS bytes, then its records.
    fn encrypt<'py>(&mut self, py: Python<'py>, plaintext: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
        self.inner.send(plaintext).map_err(tls_error)?;
        Ok(PyBytes::new(py, &self.inner.take_outgoing()))
    }

    /// The TLS bytes for the peer not taken yet (handshake flights, KeyUpdate answers,
    /// session tickets, alerts); b"" if none.
    fn take_outgoing<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.take_outgoing())
    }

    #[getter]
    fn handshaking(&self) -> bool {
        self.inner.is_handshaking()
    }

    #[getter]
    fn peer_closed(&self) -> bool {
        self.inner.peer_closed()
    }

    /// The start of a record is held, its rest not received yet.
    #[getter]
    fn partial_record(&self) -> bool {
        self.inner.has_partial_record()
    }

    #[getter]
    fn wants_write(&self) -> bool {
        self.inner.wants_write()
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("TlsError", m.py().get_type::<TlsError>())?;
    m.add_class::<TlsConfig>()?;
    m.add_class::<TlsSession>()?;
    Ok(())
}
