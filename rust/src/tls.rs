//! Server-side TLS for the event loop: rustls's unbuffered connection driven by bytes in and
//! bytes out, so the socket stays the server's (read and written like a plaintext one).
//!
//! Why not Python's `ssl` (issue 17): an idle `SSLObject` with its two memory BIOs holds
//! 16.8 KiB of OpenSSL state, read and write buffers included. Here a connection owns only
//! the bytes of a record not yet complete (none between records: [`TlsSession::receive`]
//! frees the buffer) and the TLS bytes not yet taken by the caller
//! ([`TlsSession::take_outgoing`]); rustls's unbuffered API keeps no buffer of its own
//! while idle.
//!
//! Semantics, as the server's `TlsStream` uses them: TLS 1.2 and 1.3 (ring's suites), no
//! ALPN, no early data, renegotiation refused (rustls's warning alert), a TLS 1.3
//! KeyUpdate answered, a close_notify reported once. After a TLS error every call fails
//! with it; the fatal alert rustls queued is in [`TlsSession::take_outgoing`].

use std::sync::Arc;

use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{UnbufferedServerConnection, WebPkiClientVerifier};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use rustls::RootCertStore;

pub use rustls::{Error, ServerConfig};

/// A server's TLS settings from PEM: its certificate chain (leaf first), its private key
/// (PKCS#8, PKCS#1 or SEC1; in `key_pem`, which may be the chain's own file) and, for
/// client certificates, the CAs that must have signed them. Errors say what is wrong in
/// words an operator can act on.
pub fn server_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<Arc<ServerConfig>, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format!("not a PEM certificate chain: {err}"))?;
    if chain.is_empty() {
        return Err("no PEM certificate found".into());
    }
    if is_encrypted_key(key_pem) {
        return Err("the private key is encrypted with a passphrase".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|err| format!("no PEM private key found ({err})"))?;
    let provider = Arc::new(ring::default_provider());
    // ring signs with fewer key types than OpenSSL (no P-521, no Ed448, no RSA over 4096
    // bits) and says "failed to parse private key", which reads as a damaged file.
    provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|_| {
            format!(
                "the private key is of a type or size not supported (or damaged): use {KEY_TYPES}"
            )
        })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions() // TLS 1.2 and 1.3
        .map_err(|err| err.to_string())?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => builder.with_client_cert_verifier(client_verifier(pem, provider)?),
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|err| match err {
            Error::InconsistentKeys(_) => "the private key does not match the certificate".into(),
            other => format!("unusable certificate or key: {other}"),
        })?;
    Ok(Arc::new(config))
}

/// The private keys a server can sign with (ring's).
pub const KEY_TYPES: &str = "RSA of 2048 to 4096 bits, ECDSA P-256 or P-384, or Ed25519";

/// A PEM private key with a passphrase: PKCS#8's encrypted form or OpenSSL's legacy one.
fn is_encrypted_key(pem: &[u8]) -> bool {
    let has = |needle: &[u8]| pem.windows(needle.len()).any(|w| w == needle);
    has(b"-----BEGIN ENCRYPTED PRIVATE KEY-----") || has(b"Proc-Type: 4,ENCRYPTED")
}

fn client_verifier(
    ca_pem: &[u8],
    provider: Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|err| format!("not a PEM certificate: {err}"))?;
        roots
            .add(cert)
            .map_err(|err| format!("not a usable CA certificate: {err}"))?;
    }
    if roots.is_empty() {
        return Err("no PEM certificate found".into());
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|err| err.to_string())
}

/// One server-side TLS connection: ciphertext in, plaintext out, and back.
pub struct TlsSession {
    conn: UnbufferedServerConnection,
    /// Ciphertext received but not yet processed: the start of an incomplete record.
    incoming: Vec<u8>,
    /// TLS bytes for the peer (handshake flights, alerts, records) not yet taken.
    outgoing: Vec<u8>,
    peer_closed: bool,
    failed: Option<Error>,
}

/// Bytes rustls adds to a record (header, content type, AEAD tag), with room to spare.
const RECORD_OVERHEAD: usize = 64;
/// The largest plaintext of one record.
const MAX_FRAGMENT: usize = 16 * 1024;
/// The largest record (TLS 1.2's ciphertext limit: 2^14 + 2048, and its 5-byte header).
const MAX_RECORD: usize = MAX_FRAGMENT + 2048 + 5;

impl TlsSession {
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, Error> {
        Ok(Self {
            conn: UnbufferedServerConnection::new(config)?,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            peer_closed: false,
            failed: None,
        })
    }

    /// Still in the handshake: application data cannot be sent yet.
    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// The peer sent close_notify (it sends nothing more).
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Ciphertext held: the start of a record whose rest has not arrived.
    pub fn has_partial_record(&self) -> bool {
        !self.incoming.is_empty()
    }

    /// TLS bytes are waiting in [`Self::take_outgoing`].
    pub fn wants_write(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// The TLS bytes for the peer produced so far, in order.
    pub fn take_outgoing(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.outgoing)
    }

    /// Process `ciphertext` from the peer: the plaintext of every record it completes is
    /// appended to `plaintext`, handshake answers to the outgoing bytes.
    pub fn receive(&mut self, ciphertext: &[u8], plaintext: &mut Vec<u8>) -> Result<(), Error> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        self.incoming.extend_from_slice(ciphertext);
        let result = self.guarded(|s| s.process(plaintext));
        if self.incoming.is_empty() {
            self.incoming = Vec::new(); // nothing held between records
        } else if self.incoming.capacity() > 2 * MAX_RECORD {
            self.incoming.shrink_to(MAX_RECORD); // a partial record: not a whole read's room
        }
        result.inspect_err(|err| self.fail(err.clone()))
    }

    /// Encrypt `plaintext` as application data records (after the outgoing bytes already
    /// there). An error before the handshake completes.
    pub fn send(&mut self, plaintext: &[u8]) -> Result<(), Error> {
        if let Some(err) = &self.failed {
            return Err(err.clone());
        }
        self.guarded(|s| s.encrypt(plaintext))
    }

    /// `f`, with a panic inside rustls made this connection's error (it fails for good),
    /// not the process's: a panic would reach Python as a BaseException and stop the
    /// server. One peer's crafted records once made rustls panic (fixed: see
    /// `drain_alerts`); this is the second line.
    fn guarded<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T, Error>) -> Result<T, Error> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))) {
            Ok(result) => result,
            Err(_) => {
                let err = Error::General(PANICKED.into());
                self.fail(err.clone());
                Err(err)
            }
        }
    }

    fn encrypt(&mut self, plaintext: &[u8]) -> Result<(), Error> {
        let guess = plaintext.len() + (plaintext.len() / MAX_FRAGMENT + 1) * RECORD_OVERHEAD;
        loop {
            // `receive` processed every complete record: only a partial one can be left.
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            debug_assert_eq!(discard, 0);
            match state {
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let written = append_with(&mut self.outgoing, guess, |out| {
                        match traffic.encrypt(plaintext, out) {
                            Ok(n) => Ok(n),
                            Err(EncryptError::InsufficientSize(InsufficientSizeError {
                                required_size,
                            })) => Err(Some(required_size)),
                            Err(_) => Err(None),
                        }
                    });
                    return written.map_err(|()| Error::EncryptError);
                }
                // A KeyUpdate that encrypting asked for: it goes out first.
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(&mut self.outgoing, &mut data)
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                Ok(_) => return Err(Error::HandshakeNotComplete),
                Err(err) => return Err(err),
            }
        }
    }

    /// The records rustls processes are discarded once, at the end: `start` moves past
    /// them (one `drain` per call, not one per record: a read of many tiny records would
    /// otherwise move the rest of the buffer once per record).
    fn process(&mut self, plaintext: &mut Vec<u8>) -> Result<(), Error> {
        let mut start = 0;
        let result = loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming[start..]);
            let more = match state {
                Err(err) => {
                    start += discard;
                    // The rest of the buffer, not an empty one: rustls's handshake
                    // deframer may hold spans into it (messages after the failed one).
                    drain_alerts(
                        &mut self.conn,
                        &mut self.incoming[start..],
                        &mut self.outgoing,
                    );
                    break Err(err);
                }
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    let mut failed = None;
                    while let Some(record) = traffic.next_record() {
                        match record {
                            Ok(record) => {
                                discard += record.discard;
                                plaintext.extend_from_slice(record.payload);
                            }
                            Err(err) => {
                                failed = Some(err);
                                break;
                            }
                        }
                    }
                    if let Some(err) = failed {
                        start += discard;
                        break Err(err);
                    }
                    true
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(&mut self.outgoing, &mut data);
                    true
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done(); // the caller writes what take_outgoing returns
                    true
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    true
                }
                Ok(ConnectionState::ReadEarlyData(_)) => {
                    // Never offered (max_early_data_size is 0): a protocol violation.
                    break Err(Error::General("unexpected early data".into()));
                }
                // Blocked on the peer's next handshake flight, idle, or closed both ways.
                Ok(_) => false,
            };
            start += discard;
            if !more {
                break Ok(());
            }
        };
        self.incoming.drain(..start);
        result
    }

    fn fail(&mut self, err: Error) {
        self.failed = Some(err);
        self.incoming = Vec::new();
    }
}

/// After an error: the fatal alert rustls queued, into the outgoing bytes. `incoming`: the
/// buffer rustls was given, less what it said to discard (as its contract requires: its
/// handshake deframer may hold spans into it). One call: rustls hands out what it queued
/// before it reads more input, and reading past the error would only fail again (a
/// second fatal alert, which rustls's debug assertions refuse: the fuzzer found it).
fn drain_alerts(
    conn: &mut UnbufferedServerConnection,
    incoming: &mut [u8],
    outgoing: &mut Vec<u8>,
) {
    let UnbufferedStatus { state, .. } = conn.process_tls_records(incoming);
    if let Ok(ConnectionState::EncodeTlsData(mut data)) = state {
        encode(outgoing, &mut data);
    }
}

/// The error of a connection whose call into rustls panicked (`TlsSession::guarded`).
pub const PANICKED: &str = "internal error in the TLS library: connection closed";

fn encode(
    out: &mut Vec<u8>,
    data: &mut rustls::unbuffered::EncodeTlsData<'_, rustls::server::ServerConnectionData>,
) {
    // A record of the handshake is at most 64 KiB; the first try usually fits.
    let _ = append_with(out, 4096, |buf| match data.encode(buf) {
        Ok(n) => Ok(n),
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            Err(Some(required_size))
        }
        Err(_) => Err(None),
    });
}

/// Append what `write` puts into a slice at the end of `out`: first `guess` bytes of
/// room, then, if `write` asks for more (`Err(Some(required))`), that much.
fn append_with(
    out: &mut Vec<u8>,
    guess: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> Result<(), ()> {
    let start = out.len();
    out.resize(start + guess, 0);
    let result = match write(&mut out[start..]) {
        Err(Some(required)) => {
            out.resize(start + required, 0);
            write(&mut out[start..])
        }
        other => other,
    };
    match result {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(_) => {
            out.truncate(start);
            Err(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    const CA: &[u8] = include_bytes!("../testdata/ca.pem");
    const CERT: &[u8] = include_bytes!("../testdata/server.pem");
    const KEY: &[u8] = include_bytes!("../testdata/server.key");
    const LOCKED_KEY: &[u8] = include_bytes!("../testdata/server-encrypted.key");
    const P521_KEY: &[u8] = include_bytes!("../testdata/p521.key"); // OpenSSL's, not ring's
    /// A ClientHello record of Python's ssl (OpenSSL 3.0, TLS 1.2 and 1.3 offered).
    const OPENSSL_HELLO: &[u8] = include_bytes!("../testdata/client-hello-openssl.bin");

    fn client(versions: &[&'static rustls::SupportedProtocolVersion]) -> rustls::ClientConnection {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(CA).unwrap())
            .unwrap();
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap()
    }

    fn from_client(c: &mut rustls::ClientConnection) -> Vec<u8> {
        let mut out = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut out).unwrap();
        }
        out
    }

    fn to_client(c: &mut rustls::ClientConnection, mut data: &[u8]) -> Vec<u8> {
        let mut plain = Vec::new();
        while !data.is_empty() {
            c.read_tls(&mut data).unwrap();
            c.process_new_packets().unwrap();
            let _ = c.reader().read_to_end(&mut plain); // WouldBlock at the end
        }
        plain
    }

    /// A handshake over memory; returns the server and the client, handshaken.
    fn pair(
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> (TlsSession, rustls::ClientConnection) {
        let mut s = TlsSession::new(server_config(CERT, KEY, None).unwrap()).unwrap();
        let mut c = client(versions);
        for _ in 0..8 {
            let mut plain = Vec::new();
            s.receive(&from_client(&mut c), &mut plain).unwrap();
            assert!(plain.is_empty());
            to_client(&mut c, &s.take_outgoing());
            if !s.is_handshaking() && !c.is_handshaking() {
                return (s, c);
            }
        }
        panic!("no handshake");
    }

    #[test]
    fn both_versions_carry_data_both_ways_and_hold_no_buffer_between_records() {
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let (mut s, mut c) = pair(&[version]);
            c.writer().write_all(b"hello server").unwrap();
            let record = from_client(&mut c);
            let mut plain = Vec::new();
            // Split anywhere: nothing until the record is complete, then all of it.
            for (i, byte) in record.iter().enumerate() {
                s.receive(&[*byte], &mut plain).unwrap();
                assert_eq!(s.has_partial_record(), i + 1 < record.len());
            }
            assert_eq!(plain, b"hello server");
            assert_eq!(s.incoming.capacity(), 0);
            s.send(b"hello client").unwrap();
            let big = vec![7u8; 3 * MAX_FRAGMENT + 5];
            s.send(&big).unwrap();
            let got = to_client(&mut c, &s.take_outgoing());
            assert_eq!(&got[..12], b"hello client");
            assert_eq!(&got[12..], &big[..]);
            assert!(!s.wants_write());
        }
    }

    #[test]
    fn a_read_of_many_tiny_records_and_a_partial_one() {
        let (mut s, mut c) = pair(&[&rustls::version::TLS13]);
        let mut read = Vec::new();
        for i in 0..2000u32 {
            c.writer().write_all(&i.to_be_bytes()).unwrap();
            read.extend(from_client(&mut c));
        }
        c.writer().write_all(b"the end").unwrap();
        let last = from_client(&mut c);
        read.extend_from_slice(&last[..10]);
        let mut plain = Vec::new();
        s.receive(&read, &mut plain).unwrap();
        let expected: Vec<u8> = (0..2000u32).flat_map(|i| i.to_be_bytes()).collect();
        assert_eq!(plain, expected);
        assert!(s.has_partial_record());
        assert!(s.incoming.capacity() <= MAX_RECORD); // not the whole read's room
        s.receive(&last[10..], &mut plain).unwrap();
        assert_eq!(&plain[expected.len()..], b"the end");
        assert!(!s.has_partial_record());
    }

    #[test]
    fn a_client_hello_record_with_more_messages_is_an_error_with_an_alert() {
        // The ClientHello's record with two more handshake messages in it: rustls's
        // deframer then held spans into the buffer, and the alert's drain with an empty
        // buffer panicked (a remote crash of the server before the fix).
        let mut s = TlsSession::new(server_config(CERT, KEY, None).unwrap()).unwrap();
        let mut record = OPENSSL_HELLO.to_vec(); // the trigger needs OpenSSL's hello
        let extra = b"\x14\x00\x00\x04abcd\x14\x00\x00\x04abcd";
        record.extend_from_slice(extra);
        let len = u16::from_be_bytes([record[3], record[4]]) as usize + extra.len();
        record[3..5].copy_from_slice(&(len as u16).to_be_bytes());
        let mut plain = Vec::new();
        let err = s.receive(&record, &mut plain).unwrap_err();
        assert!(matches!(err, Error::PeerMisbehaved(_)), "{err:?}"); // rustls's, no panic
        assert_eq!(s.take_outgoing()[..1], [0x15]); // a fatal alert for the peer
        assert!(s.receive(b"more", &mut plain).is_err()); // and it stays failed
    }

    #[test]
    fn a_panic_is_the_connections_error_for_good() {
        let (mut s, _c) = pair(&[&rustls::version::TLS13]);
        let err = s.guarded(|_| -> Result<(), Error> { panic!("a bug in the library") });
        assert!(matches!(err, Err(Error::General(m)) if m == PANICKED));
        assert!(s.send(b"after it").is_err()); // failed: nothing more goes through
        assert!(s.receive(b"", &mut Vec::new()).is_err());
    }

    #[test]
    fn close_notify_is_reported_once_and_data_before_it_kept() {
        let (mut s, mut c) = pair(&[&rustls::version::TLS13]);
        c.writer().write_all(b"last words").unwrap();
        c.send_close_notify();
        let mut plain = Vec::new();
        s.receive(&from_client(&mut c), &mut plain).unwrap();
        assert_eq!(plain, b"last words");
        assert!(s.peer_closed());
        s.send(b"still answered").unwrap(); // the replies to what was read still go out
        assert_eq!(to_client(&mut c, &s.take_outgoing()), b"still answered");
    }

    #[test]
    fn a_key_update_is_answered() {
        let (mut s, mut c) = pair(&[&rustls::version::TLS13]);
        c.refresh_traffic_keys().unwrap();
        c.writer().write_all(b"after update").unwrap();
        let mut plain = Vec::new();
        s.receive(&from_client(&mut c), &mut plain).unwrap();
        assert_eq!(plain, b"after update");
        s.send(b"new keys").unwrap();
        assert_eq!(to_client(&mut c, &s.take_outgoing()), b"new keys");
    }

    #[test]
    fn garbage_fails_with_an_alert_and_keeps_failing() {
        let (mut s, _c) = pair(&[&rustls::version::TLS13]);
        let mut plain = Vec::new();
        let err = s.receive(
            &[
                0x17, 3, 3, 0, 20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,
                19, 20,
            ],
            &mut plain,
        );
        assert!(err.is_err());
        // A fatal alert for the peer (TLS 1.3 encrypts it: an application data record).
        assert_eq!(s.take_outgoing().first(), Some(&0x17));
        assert!(s.receive(b"", &mut plain).is_err());
        assert!(s.send(b"x").is_err());
        assert!(plain.is_empty());
    }

    #[test]
    fn plaintext_before_the_handshake_is_an_error_and_sending_waits_for_it() {
        let mut s = TlsSession::new(server_config(CERT, KEY, None).unwrap()).unwrap();
        assert!(s.send(b"too early").is_err());
        let mut plain = Vec::new();
        let hello = b"\x00\x00\x00\x10\x82\xa1t\xa5hello\xa1v\x01xxxx";
        assert!(s.receive(hello, &mut plain).is_err());
    }

    #[test]
    fn bad_inputs_are_explained() {
        let err = |r: Result<Arc<ServerConfig>, String>| r.err().unwrap();
        assert!(err(server_config(b"junk", KEY, None)).contains("no PEM certificate"));
        assert!(err(server_config(CERT, b"junk", None)).contains("no PEM private key"));
        assert!(err(server_config(CERT, LOCKED_KEY, None)).contains("encrypted with a passphrase"));
        assert!(err(server_config(CA, KEY, None)).contains("does not match the certificate"));
        let unsupported = err(server_config(CERT, P521_KEY, None));
        assert!(
            unsupported.contains("type or size not supported") && unsupported.contains(KEY_TYPES)
        );
        assert!(err(server_config(CERT, KEY, Some(b"junk"))).contains("no PEM certificate"));
        assert!(server_config(CERT, KEY, Some(CA)).is_ok());
        let mut both = CERT.to_vec();
        both.extend_from_slice(KEY);
        assert!(server_config(&both, &both, None).is_ok()); // chain and key in one file
    }
}
