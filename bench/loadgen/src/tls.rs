//! TLS for the tsmsg adapter (PROTOCOL.md section 4): rustls (ring), TLS 1.2 or newer, no
//! ALPN, the server's certificate chain and name always verified (there is no switch to turn
//! that off). Trusted roots: `--tls-ca FILE` (that PEM bundle only) or the platform's.
//!
//! [`Rd`] and [`Wr`] are the two halves of either a plaintext or a TLS connection, so the
//! adapter has one code path for both; the plaintext halves are tokio's owned TCP halves,
//! exactly what the adapter used before TLS existed. A writer must `flush` after its writes:
//! TLS may hold bytes that did not fit into the socket until the next write or flush (for
//! TCP the flush is a no-op).

use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// The `--tls*` command-line options.
#[derive(Clone, Debug, Default)]
pub struct TlsArgs {
    /// PEM bundle of the CAs to trust instead of the platform's.
    pub ca: Option<PathBuf>,
    /// The name to verify the certificate against (and send as SNI unless an IP address);
    /// default: the host of `--addr`.
    pub server_name: Option<String>,
    /// A client certificate chain (PEM) for servers that require one, and its key (default:
    /// the key in the same file).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A TLS client for one server: the rustls configuration and the name to verify.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    name: ServerName<'static>,
}

/// The host of `host:port` (`[v6]:port` too).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn roots(ca: Option<&PathBuf>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("--tls-ca: cannot read PEM certificates from {path:?}"))?;
            if certs.is_empty() {
                bail!("--tls-ca: no certificates in {path:?}");
            }
            for c in certs {
                roots
                    .add(c)
                    .with_context(|| format!("--tls-ca: a bad CA certificate in {path:?}"))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                bail!(
                    "no trusted CA certificates found on this system ({:?}): pass --tls-ca FILE",
                    found.errors
                );
            }
        }
    }
    Ok(roots)
}

impl TlsClient {
    pub fn new(args: &TlsArgs, addr: &str) -> Result<Self> {
        let host = args.server_name.as_deref().unwrap_or_else(|| host_of(addr));
        let name = ServerName::try_from(host.to_owned())
            .with_context(|| format!("--tls-server-name: {host:?} is not a DNS name or IP"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_root_certificates(roots(args.ca.as_ref())?);
        let config = match &args.cert {
            Some(cert) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .with_context(|| format!("--tls-cert: cannot read {cert:?}"))?;
                let key_file = args.key.as_ref().unwrap_or(cert);
                let key = PrivateKeyDer::from_pem_file(key_file)
                    .with_context(|| format!("--tls-key: no private key in {key_file:?}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .context("--tls-cert/--tls-key")?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            name,
        })
    }
}

/// A TLS handshake refused by either side (certificate not trusted, wrong name, an alert
/// from the server): retrying cannot help, and the token must not be sent (section 4).
#[derive(Debug)]
pub struct HandshakeRefused(pub String);

impl std::fmt::Display for HandshakeRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HandshakeRefused {}

/// Connect to `addr` (TCP_NODELAY), with TLS if `tls` is set; the two halves.
pub async fn connect(addr: &str, tls: Option<&TlsClient>) -> Result<(Rd, Wr)> {
    Ok(match open(addr, tls).await? {
        Conn::Plain(tcp) => {
            let (rd, wr) = tcp.into_split();
            (Rd::Plain(rd), Wr::Plain(wr))
        }
        Conn::Tls(stream) => {
            let (rd, wr) = tokio::io::split(*stream);
            (Rd::Tls(rd), Wr::Tls(wr))
        }
    })
}

/// Connect to `addr` (TCP_NODELAY), with TLS if `tls` is set; the whole stream (a
/// WebSocket runs over it: `wss://`).
pub async fn open(addr: &str, tls: Option<&TlsClient>) -> Result<Conn> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let Some(tls) = tls else {
        return Ok(Conn::Plain(tcp));
    };
    match tls.connector.connect(tls.name.clone(), tcp).await {
        Ok(stream) => Ok(Conn::Tls(Box::new(stream))),
        Err(e) => match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(te) => Err(HandshakeRefused(format!(
                "TLS handshake with {addr} failed, verifying the server as {:?}: {te} \
                 (check --tls-ca and --tls-server-name)",
                tls.name.to_str()
            ))
            .into()),
            None => Err(anyhow::Error::new(e).context(format!("TLS handshake with {addr}"))),
        },
    }
}

/// A plaintext or TLS connection, whole.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The read half of a plaintext or TLS connection.
pub enum Rd {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<TlsStream<TcpStream>>),
}

/// The write half of a plaintext or TLS connection.
pub enum Wr {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

impl AsyncRead for Rd {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Rd::Plain(r) => Pin::new(r).poll_read(cx, buf),
            Rd::Tls(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Wr {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Wr::Plain(w) => Pin::new(w).poll_write(cx, buf),
            Wr::Tls(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Wr::Plain(w) => Pin::new(w).poll_flush(cx),
            Wr::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Wr::Plain(w) => Pin::new(w).poll_shutdown(cx),
            Wr::Tls(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Certificates in `testdata/` come from a throwaway `trustme` CA (valid until 3000):
    //! `ca.pem` signed `server.pem` (key `server.key`) for 127.0.0.1 and localhost;
    //! `other-ca.pem` is an unrelated CA.
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::rustls::ServerConfig;
    use tokio_rustls::TlsAcceptor;

    pub(crate) fn testdata(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("testdata")
            .join(name)
    }

    /// The TLS side of a test server: `testdata/server.pem` and its key.
    pub(crate) fn acceptor() -> TlsAcceptor {
        let chain = CertificateDer::pem_file_iter(testdata("server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(testdata("server.key")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        TlsAcceptor::from(Arc::new(cfg))
    }

    /// A one-connection TLS echo server on 127.0.0.1; its address.
    pub(crate) async fn echo_server() -> String {
        let acceptor = acceptor();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            if let Ok(mut s) = acceptor.accept(tcp).await {
                let mut b = [0u8; 5];
                if s.read_exact(&mut b).await.is_ok() {
                    let _ = s.write_all(&b).await;
                    let _ = s.flush().await;
                }
            }
        });
        addr
    }

    pub(crate) fn client(ca: &str, server_name: Option<&str>, addr: &str) -> TlsClient {
        let args = TlsArgs {
            ca: Some(testdata(ca)),
            server_name: server_name.map(str::to_owned),
            ..TlsArgs::default()
        };
        TlsClient::new(&args, addr).unwrap()
    }

    #[test]
    fn host_of_addr() {
        assert_eq!(host_of("127.0.0.1:7700"), "127.0.0.1");
        assert_eq!(host_of("chat.example.com:443"), "chat.example.com");
        assert_eq!(host_of("[::1]:7700"), "::1");
    }

    #[tokio::test]
    async fn trusted_ca_connects_and_carries_bytes() {
        let addr = echo_server().await;
        let tls = client("ca.pem", None, &addr);
        let (mut rd, mut wr) = connect(&addr, Some(&tls)).await.unwrap();
        wr.write_all(b"hello").await.unwrap();
        wr.flush().await.unwrap();
        let mut b = [0u8; 5];
        rd.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hello");
    }

    #[tokio::test]
    async fn wrong_ca_is_refused_clearly() {
        let addr = echo_server().await;
        let tls = client("other-ca.pem", None, &addr);
        let err = connect(&addr, Some(&tls)).await.err().unwrap();
        assert!(err.downcast_ref::<HandshakeRefused>().is_some(), "{err:#}");
        let msg = format!("{err:#}");
        assert!(msg.contains("invalid peer certificate"), "{msg}");
        assert!(msg.contains("UnknownIssuer"), "{msg}");
        assert!(msg.contains("--tls-ca"), "{msg}");
    }

    #[tokio::test]
    async fn wrong_server_name_is_refused() {
        let addr = echo_server().await;
        let tls = client("ca.pem", Some("chat.example.com"), &addr);
        let err = connect(&addr, Some(&tls)).await.err().unwrap();
        let msg = format!("{err:#}");
        assert!(err.downcast_ref::<HandshakeRefused>().is_some(), "{msg}");
        assert!(
            msg.contains("not valid for name \"chat.example.com\""),
            "{msg}"
        );
    }

    #[test]
    fn bad_ca_file_is_a_clear_error() {
        let args = TlsArgs {
            ca: Some(testdata("no-such-file.pem")),
            ..TlsArgs::default()
        };
        let err = TlsClient::new(&args, "127.0.0.1:7700").err().unwrap();
        assert!(format!("{err:#}").contains("--tls-ca"), "{err:#}");
    }
}
