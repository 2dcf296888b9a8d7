//! A tsmsg connection's frames, over either transport the server speaks:
//!
//! * TCP (PROTOCOL.md section 3), plaintext or TLS (`src/tls.rs`): each frame a 4-byte
//!   big-endian length, then one msgpack map. An address `host:port`.
//! * WebSocket (PROTOCOL.md section 19), subprotocol `tsmsg.v1.msgpack`: each frame one
//!   binary WebSocket message holding the same msgpack map, without the length prefix. An
//!   address `ws://host:port[/path]` (path default `/connect`). The upgrade sends `Origin:
//!   http://host:port`, the page's own origin, which a server with the default (empty)
//!   `ws_allowed_origins` accepts. tokio-tungstenite (the loadgen is a tokio program;
//!   tungstenite's sync API would need a thread per connection), plaintext only: `wss://`
//!   is not implemented.
//!
//! The adapter builds every frame one way, length-prefixed (`mp::begin`/`mp::finish`), and
//! queues those bytes; [`FrameWr::send`] writes them as they are over TCP and as one binary
//! message per frame over a WebSocket. [`FrameRd::read_frame`] yields one frame's map
//! either way, without a copy of the payload.

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::system::Bytes;
use crate::tls::{self, HandshakeRefused, Rd, TlsClient, Wr};

/// The read buffer of a TCP connection.
const READ_BUF: usize = 256 * 1024;
/// The subprotocol the loadgen speaks over a WebSocket (PROTOCOL.md section 19).
pub const SUBPROTOCOL: &str = "tsmsg.v1.msgpack";
/// The upgrade path when a `ws://` address has none.
const DEFAULT_PATH: &str = "/connect";

type Ws = WebSocketStream<tls::Conn>;

/// Where to connect: parsed from an `--addr` element.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port`: length-prefixed frames over TCP (TLS with `--tls`).
    Tcp(String),
    /// `ws://host:port/path`: a WebSocket upgrade at `path` of `host:port`.
    Ws { host_port: String, path: String },
}

impl Endpoint {
    pub fn parse(addr: &str) -> Result<Endpoint> {
        if let Some(rest) = addr.strip_prefix("ws://") {
            let (host_port, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, DEFAULT_PATH),
            };
            if host_port.is_empty() {
                bail!("{addr:?}: no host:port after ws://");
            }
            return Ok(Endpoint::Ws {
                host_port: host_port.to_owned(),
                path: path.to_owned(),
            });
        }
        if addr.contains("://") {
            bail!("{addr:?}: the loadgen speaks host:port (TCP) or ws://host:port[/path]");
        }
        Ok(Endpoint::Tcp(addr.to_owned()))
    }

    /// The `host:port` to connect to (and, with `--tls`, whose host to verify).
    pub fn host_port(&self) -> &str {
        match self {
            Endpoint::Tcp(addr) => addr,
            Endpoint::Ws { host_port, .. } => host_port,
        }
    }
}

/// Connect to `ep`: a TCP connection (with TLS if `tls` is set) or a WebSocket.
pub async fn connect(ep: &Endpoint, tls: Option<&TlsClient>) -> Result<(FrameRd, FrameWr)> {
    match ep {
        Endpoint::Tcp(addr) => {
            let (rd, wr) = tls::connect(addr, tls).await?;
            Ok((
                FrameRd::Tcp(BufReader::with_capacity(READ_BUF, rd)),
                FrameWr::Tcp(wr),
            ))
        }
        Endpoint::Ws { host_port, path } => {
            let (sink, stream) = connect_ws(host_port, path, tls).await?.split();
            Ok((FrameRd::Ws(stream), FrameWr::Ws(sink)))
        }
    }
}

/// A WebSocket at `path` of `host_port`: `wss://` (the upgrade inside TLS) with `tls`.
async fn connect_ws(host_port: &str, path: &str, tls: Option<&TlsClient>) -> Result<Ws> {
    let (ws, http) = if tls.is_some() {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    let url = format!("{ws}://{host_port}{path}");
    let stream = tls::open(host_port, tls).await?;
    let mut req = url.as_str().into_client_request()?;
    let h = req.headers_mut();
    h.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(SUBPROTOCOL),
    );
    h.insert(
        "Origin",
        HeaderValue::from_str(&format!("{http}://{host_port}"))?,
    );
    // The write buffer only collects the frames of one `send` (flushed at its end).
    let cfg = WebSocketConfig::default().write_buffer_size(256 * 1024);
    match tokio_tungstenite::client_async_with_config(req, stream, Some(cfg)).await {
        Ok((ws, resp)) => {
            let proto = resp.headers().get("Sec-WebSocket-Protocol");
            if proto.and_then(|v| v.to_str().ok()) != Some(SUBPROTOCOL) {
                bail!("{url}: the server did not accept subprotocol {SUBPROTOCOL} ({proto:?})");
            }
            Ok(ws)
        }
        // A refusal of the request itself (origin, subprotocol, path): retrying cannot help.
        // A 503 (a connection cap) or 429 (a rate) may pass later: retried by the caller.
        Err(WsError::Http(resp))
            if resp.status().is_client_error() && resp.status().as_u16() != 429 =>
        {
            let body = resp.body().as_deref().unwrap_or_default();
            Err(HandshakeRefused(format!(
                "WebSocket upgrade at {url} refused: HTTP {}: {}",
                resp.status(),
                String::from_utf8_lossy(body).trim()
            ))
            .into())
        }
        Err(e) => Err(anyhow!(e).context(format!("WebSocket upgrade at {url}"))),
    }
}

/// The read half of a connection.
pub enum FrameRd {
    Tcp(BufReader<Rd>),
    Ws(SplitStream<Ws>),
}

/// The write half of a connection.
pub enum FrameWr {
    Tcp(Wr),
    Ws(SplitSink<Ws, Message>),
}

impl FrameRd {
    /// The next frame's msgpack map (without a length prefix), at most `max` bytes.
    pub async fn read_frame(&mut self, max: usize) -> Result<Bytes> {
        let body = match self {
            FrameRd::Tcp(rd) => {
                let n = rd.read_u32().await.context("connection closed")? as usize;
                if n == 0 || n > max {
                    bail!("server sent a frame of {n} bytes (max_frame {max})");
                }
                let mut body = BytesMut::zeroed(n);
                rd.read_exact(&mut body)
                    .await
                    .context("connection closed mid-frame")?;
                return Ok(body.freeze());
            }
            FrameRd::Ws(rd) => loop {
                match rd.next().await.context("connection closed")?? {
                    Message::Binary(b) => break b,
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                    Message::Text(_) => bail!("a text message on a {SUBPROTOCOL} WebSocket"),
                    Message::Close(c) => bail!("connection closed by the server: {c:?}"),
                }
            },
        };
        if body.is_empty() || body.len() > max {
            bail!(
                "server sent a frame of {} bytes (max_frame {max})",
                body.len()
            );
        }
        Ok(body)
    }
}

/// The frames in `buf`, a concatenation of length-prefixed frames, without their prefixes.
pub fn frames(buf: &[u8]) -> impl Iterator<Item = Result<&[u8]>> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            rest = &[];
            return Some(Err(anyhow!("a truncated length prefix")));
        };
        let n = u32::from_be_bytes(*len) as usize;
        if tail.len() < n {
            rest = &[];
            return Some(Err(anyhow!(
                "a frame of {n} bytes with {} left",
                tail.len()
            )));
        }
        let (body, tail) = tail.split_at(n);
        rest = tail;
        Some(Ok(body))
    })
}

impl FrameWr {
    /// Write `buf` (length-prefixed frames, one or many) and flush it: as is over TCP
    /// (TLS may hold bytes back until a flush; TCP does not), one binary message per frame
    /// over a WebSocket.
    pub async fn send(&mut self, buf: &[u8]) -> Result<()> {
        match self {
            FrameWr::Tcp(wr) => {
                wr.write_all(buf).await?;
                wr.flush().await?;
            }
            FrameWr::Ws(wr) => {
                for body in frames(buf) {
                    wr.feed(Message::Binary(Bytes::copy_from_slice(body?)))
                        .await?;
                }
                wr.flush().await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
    use tokio_tungstenite::tungstenite::http::StatusCode;

    fn prefixed(bodies: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in bodies {
            out.extend((b.len() as u32).to_be_bytes());
            out.extend(*b);
        }
        out
    }

    #[test]
    fn parses_addresses() {
        assert_eq!(
            Endpoint::parse("127.0.0.1:7700").unwrap(),
            Endpoint::Tcp("127.0.0.1:7700".into())
        );
        assert_eq!(
            Endpoint::parse("ws://127.0.0.1:7780").unwrap(),
            Endpoint::Ws {
                host_port: "127.0.0.1:7780".into(),
                path: "/connect".into()
            }
        );
        assert_eq!(
            Endpoint::parse("ws://[::1]:80/chat/connect").unwrap(),
            Endpoint::Ws {
                host_port: "[::1]:80".into(),
                path: "/chat/connect".into()
            }
        );
        assert!(Endpoint::parse("wss://h:1").is_err());
        assert!(Endpoint::parse("ws:///connect").is_err());
    }

    #[test]
    fn splits_length_prefixed_frames() {
        let buf = prefixed(&[b"\x81\xa1t\xa4ping", b"\x80"]);
        let got: Vec<&[u8]> = frames(&buf).map(Result::unwrap).collect();
        assert_eq!(got, [&b"\x81\xa1t\xa4ping"[..], &b"\x80"[..]]);
        assert!(frames(&buf[..buf.len() - 1]).any(|f| f.is_err()));
        assert!(frames(&[0, 0]).any(|f| f.is_err()));
    }

    /// A one-connection WebSocket server on 127.0.0.1 that accepts only `Origin:
    /// http://<its address>` and subprotocol tsmsg.v1.msgpack (as the tsmsg server does by
    /// default), receives two messages and sends them back in one; its address.
    // The callback's Result is tungstenite's (`Callback`), large Err and all.
    #[allow(clippy::result_large_err)]
    async fn ws_server(status: Option<StatusCode>) -> String {
        ws_server_over(status, false).await
    }

    /// The same, inside TLS (`testdata/server.pem`) with `tls`: `wss://`, Origin https.
    #[allow(clippy::result_large_err)]
    async fn ws_server_over(status: Option<StatusCode>, tls: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let origin = format!("{}://{addr}", if tls { "https" } else { "http" });
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            if !tls {
                return serve_ws(tcp, origin, status).await;
            }
            if let Ok(s) = crate::tls::tests::acceptor().accept(tcp).await {
                serve_ws(s, origin, status).await;
            }
        });
        addr
    }

    #[allow(clippy::result_large_err)]
    async fn serve_ws<S: AsyncRead + AsyncWrite + Unpin>(
        stream: S,
        origin: String,
        status: Option<StatusCode>,
    ) {
        let check = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
            let h = req.headers();
            let ok = h.get("Origin").and_then(|v| v.to_str().ok()) == Some(origin.as_str())
                && h.get("Sec-WebSocket-Protocol")
                    .and_then(|v| v.to_str().ok())
                    == Some(SUBPROTOCOL)
                && req.uri().path() == "/connect";
            match (ok, status) {
                (true, None) => {
                    resp.headers_mut().insert(
                        "Sec-WebSocket-Protocol",
                        HeaderValue::from_static(SUBPROTOCOL),
                    );
                    Ok(resp)
                }
                (_, s) => {
                    let mut e = ErrorResponse::new(Some("origin not allowed".into()));
                    *e.status_mut() = s.unwrap_or(StatusCode::BAD_REQUEST);
                    Err(e)
                }
            }
        };
        let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
            return;
        };
        let mut got = Vec::new();
        for _ in 0..2 {
            if let Some(Ok(Message::Binary(b))) = ws.next().await {
                got.extend_from_slice(&b);
            }
        }
        let _ = ws.send(Message::Binary(got.into())).await;
    }

    #[tokio::test]
    async fn websocket_carries_one_frame_per_binary_message() {
        let addr = ws_server(None).await;
        let ep = Endpoint::parse(&format!("ws://{addr}")).unwrap();
        let (mut rd, mut wr) = connect(&ep, None).await.unwrap();
        wr.send(&prefixed(&[b"\x81\xa1t", b"\xa4ping"]))
            .await
            .unwrap();
        // The server saw two messages without prefixes; it answers with their concatenation.
        let body = rd.read_frame(1 << 20).await.unwrap();
        assert_eq!(&body[..], b"\x81\xa1t\xa4ping");
    }

    #[tokio::test]
    async fn wss_is_the_upgrade_inside_tls() {
        let addr = ws_server_over(None, true).await;
        let ep = Endpoint::parse(&format!("ws://{addr}")).unwrap();
        let tls = crate::tls::tests::client("ca.pem", None, ep.host_port());
        let (mut rd, mut wr) = connect(&ep, Some(&tls)).await.unwrap();
        wr.send(&prefixed(&[b"\x81\xa1t", b"\xa4ping"]))
            .await
            .unwrap();
        let body = rd.read_frame(1 << 20).await.unwrap();
        assert_eq!(&body[..], b"\x81\xa1t\xa4ping");
        // Not trusted: refused in the handshake, before any upgrade request is sent.
        let addr = ws_server_over(None, true).await;
        let ep = Endpoint::parse(&format!("ws://{addr}")).unwrap();
        let other = crate::tls::tests::client("other-ca.pem", None, ep.host_port());
        let err = connect(&ep, Some(&other)).await.err().unwrap();
        assert!(err.downcast_ref::<HandshakeRefused>().is_some(), "{err:#}");
    }

    #[tokio::test]
    async fn refused_upgrade_is_not_retried() {
        let addr = ws_server(Some(StatusCode::FORBIDDEN)).await;
        let ep = Endpoint::parse(&format!("ws://{addr}")).unwrap();
        let err = connect(&ep, None).await.err().unwrap();
        let msg = format!("{err:#}");
        assert!(err.downcast_ref::<HandshakeRefused>().is_some(), "{msg}");
        assert!(
            msg.contains("403") && msg.contains("origin not allowed"),
            "{msg}"
        );
    }
}
