"""The WebSocket port (setting ``ws``, PROTOCOL.md section 19): one HTTP/1.1 request per
connection, either the upgrade to a WebSocket at ``/connect``, which then carries the
protocol through the same Connection and Session as a TCP connection (server/wire.py is
the only difference), or a file of the web chat page (``/``, ``/app.js``, ``/tsmsg.js``,
``/tsmsg.d.ts``), or, with ``--dev`` only, a token for a typed user name.

The request head is parsed by h11 and the upgrade answered by wsproto's handshake (both
sans-IO, driven here by trio). Admission (the connection caps and per-IP rates) is the
TCP port's: a connection refused at a cap gets an HTTP 503 at once; one refused by a rate
gets its ``rate_limited`` error frame inside the WebSocket (a browser's script cannot
read an HTTP status), then a close with code 1013.
"""

from __future__ import annotations

import base64
import importlib.resources
import json
import logging
import re
import time
import urllib.parse
from typing import TYPE_CHECKING

import h11
import trio
from wsproto.utilities import generate_accept_token

from tsmsg.auth import SCOPE_READ, SCOPE_SEND, TokenIssuer
from tsmsg.protocol import errors as E
from tsmsg.protocol.errors import RequestError
from tsmsg.server.http import PEER_GONE, Response, drain, encode_response, text
from tsmsg.server.tls_stream import TlsStream
from tsmsg.server.wire import SUBPROTOCOLS, WebSocket, close_stream

if TYPE_CHECKING:
    from tsmsg.server.app import Refusal, Server

log = logging.getLogger("tsmsg.server.web")

MAX_HEAD_BYTES = 16 * 1024  # a request line and headers; browsers send 1-2 KiB with cookies
RECEIVE_CHUNK = 4096  # bytes per read of a request head
WRITE_TIMEOUT_S = 10.0  # a client that does not read its HTTP response is dropped
CONNECT_PATH = "/connect"
DEV_TOKEN_PATH = "/dev/token"  # exists only with --dev
DEV_TOKEN_TTL_S = 3600  # a dev token's life (at most); the page asks for a new one before it ends
USER_ID = re.compile(r"[A-Za-z0-9_.@-]{1,62}")  # PROTOCOL.md section 2, "Names"
# The page's files (package data in tsmsg/web/): path -> (file, content type).
FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/tsmsg.js": ("tsmsg.js", "text/javascript; charset=utf-8"),
    "/tsmsg.d.ts": ("tsmsg.d.ts", "text/plain; charset=utf-8"),
}
# Defence in depth for the page (its script renders message text as text, never HTML):
# no inline or foreign script, connections to this origin only.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}

    def response(self) -> Response:
        out = text(self.status, str(self))
        return Response(out.status, out.body, out.content_type, self.headers)


async def read_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    """A request head (through its blank line) and the bytes received after it."""
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if (end < 0 and len(buf) > MAX_HEAD_BYTES) or end > MAX_HEAD_BYTES:
            raise HttpError(431, f"request head over {MAX_HEAD_BYTES} bytes")
        if end >= 0:
            return bytes(buf[: end + 4]), bytes(buf[end + 4 :])
        data = await stream.receive_some(RECEIVE_CHUNK)
        if not data:
            raise HttpError(400, "incomplete request head")
        buf += data


def parse_head(head: bytes) -> h11.Request:
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    parser.receive_data(head)
    try:
        event = parser.next_event()
    except h11.RemoteProtocolError as exc:
        raise HttpError(400, f"malformed request: {exc}") from None
    if not isinstance(event, h11.Request):
        raise HttpError(400, "malformed request")
    return event


def header(request: h11.Request, name: bytes) -> str | None:
    """A header's value (repeated ones joined with commas), or None."""
    values = [v.decode("latin-1") for k, v in request.headers if k == name]
    return ", ".join(values) if values else None


def comma_list(value: str | None) -> list[str]:
    """A comma-separated header's items, spaces and tabs around each removed and nothing
    else (RFC 9110 5.6.1: a non-breaking space is no whitespace), empty ones dropped."""
    return [item for item in (i.strip(" \t") for i in (value or "").split(",")) if item]


def has_token(value: str | None, token: str) -> bool:
    """``token`` (lower case) is an item of a comma-separated header, in any case."""
    return token in (item.lower() for item in comma_list(value))


def _nonce(key: str) -> bool:
    """An upgrade's Sec-WebSocket-Key: 16 bytes in base64 (RFC 6455 4.1, 4.2.1)."""
    if len(key) != 24 or not key.isascii():
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def origin_allowed(
    origin: str | None, host: str | None, tls: bool, allowed: tuple[str, ...]
) -> bool:
    """An upgrade's Origin against ``ws_allowed_origins`` (empty: the page's own origin).
    No Origin: not a browser, which could send any Origin anyway; allowed."""
    if origin is None:
        return True
    if allowed:
        return "*" in allowed or origin in allowed
    return host is not None and origin == f"{'https' if tls else 'http'}://{host}"


def choose_subprotocol(offered: str | None) -> str:
    """The first subprotocol of the client's list that the server speaks."""
    names = comma_list(offered)  # case-sensitive (RFC 6455 4.1)
    for name in names:
        if name in SUBPROTOCOLS:
            return name
    raise HttpError(
        400,
        f"offer a subprotocol in Sec-WebSocket-Protocol: one of {', '.join(SUBPROTOCOLS)} "
        f"(offered: {', '.join(names) or 'none'})",
    )


class Web:
    """The WebSocket port's requests, for one server."""

    def __init__(self, server: Server, dev_issuer: TokenIssuer | None = None) -> None:
        self.server = server
        self.dev_issuer = dev_issuer  # set with --dev only: then DEV_TOKEN_PATH exists
        self.files: dict[str, bytes] = {}

    async def handle(
        self, stream: trio.abc.Stream, host: str, peer: str, refusal: Refusal | None
    ) -> None:
        server = self.server
        if refusal is not None and refusal.now:  # at a cap: at once, as on the TCP port
            from tsmsg.server.app import refuse_now  # (app imports this module)

            log.warning("refusing connection from %s: %s", peer, refusal.message)
            server.metrics.limited(refusal.scope)
            response = HttpError(503, *self._refusal(refusal)).response()
            refuse_now(stream, encode_response(response))
            await trio.aclose_forcefully(stream)
            return
        if isinstance(stream, TlsStream) and not await server._tls_handshake(stream, peer):
            return
        try:
            with trio.move_on_after(server.settings.hello_timeout_s) as waited:
                head, rest = await read_head(stream)
            if waited.cancelled_caught:
                raise HttpError(408, "no complete request head in time")
            request = parse_head(head)
            path = request.target.decode("latin-1").partition("?")[0]
            if path == CONNECT_PATH:
                transport, accept = self._upgrade(request)
                await self._send(stream, accept)
                if refusal is not None:
                    await self._refuse(stream, peer, transport, refusal)
                    return
            elif refusal is not None:
                log.warning("refusing connection from %s: %s", peer, refusal.message)
                server.metrics.limited(refusal.scope)
                raise HttpError(429, *self._refusal(refusal))
            else:
                await self._finish(stream, self.respond(request, path))
                return
        except HttpError as exc:
            await self._finish(stream, exc.response())
            return
        except (*PEER_GONE, trio.TooSlowError):
            await trio.aclose_forcefully(stream)
            return
        except Exception:  # a bug: this connection ends, never the server
            log.exception("request from %s failed", peer)
            await self._finish(stream, text(500, "internal error"))
            return
        # Upgraded: from here on a connection like a TCP one (it closes the stream). The
        # upgrade's request and response are dropped first: kept in this frame for the
        # connection's life they cost 2.35 KiB per idle WebSocket (bench, 2026-12-06-ws).
        del head, request, accept
        await server._serve_connection(stream, host, peer, transport, rest)

    def _refusal(self, refusal: Refusal) -> tuple[str, dict[str, str]]:
        """An HTTP refusal's message and Retry-After header."""
        retry_s = -(-refusal.retry_after_ms // 1000)
        return f"rate_limited: {refusal.message}", {"Retry-After": f"{retry_s}"}

    def _upgrade(self, request: h11.Request) -> tuple[WebSocket, bytes]:
        """Check an upgrade request; the WebSocket and the 101 response to send."""
        if request.method != b"GET":
            raise HttpError(405, "the WebSocket upgrade is a GET", {"Allow": "GET"})
        if not has_token(header(request, b"upgrade"), "websocket"):
            raise HttpError(
                426,
                f"{CONNECT_PATH} is a WebSocket endpoint (RFC 6455): send an upgrade request",
                {"Upgrade": "websocket", "Sec-WebSocket-Version": "13"},
            )
        settings, tls = self.server.settings, self.server.tls is not None
        origin = header(request, b"origin")
        if not origin_allowed(origin, header(request, b"host"), tls, settings.ws_allowed_origins):
            raise HttpError(403, f"origin {origin} is not allowed (setting ws_allowed_origins)")
        subprotocol = choose_subprotocol(header(request, b"sec-websocket-protocol"))
        # The rest of RFC 6455 4.2.1 on the request h11 parsed, and the 101 of 4.2.2 (a
        # second parse by wsproto's handshake cost 15 % of a WebSocket connect).
        if request.http_version != b"1.1":  # RFC 6455 4.1: HTTP/1.1 at least (h11: 1.0 too)
            raise HttpError(400, "bad WebSocket upgrade: an HTTP/1.1 request is needed")
        if not has_token(header(request, b"connection"), "upgrade"):
            raise HttpError(400, "bad WebSocket upgrade: no 'Connection: Upgrade'")
        if header(request, b"sec-websocket-version") != "13":
            raise HttpError(
                400,
                "bad WebSocket upgrade: Sec-WebSocket-Version must be 13",
                {"Sec-WebSocket-Version": "13"},
            )
        key = header(request, b"sec-websocket-key") or ""
        if not _nonce(key):
            raise HttpError(400, "bad WebSocket upgrade: Sec-WebSocket-Key is not 16 base64 bytes")
        accept = generate_accept_token(key.encode("ascii"))
        response = b"".join((
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
            b"Sec-WebSocket-Accept: %s\r\nSec-WebSocket-Protocol: %s\r\n\r\n"
            % (accept, subprotocol.encode("ascii")),
        ))  # fmt: skip
        return WebSocket(subprotocol), response

    async def _refuse(
        self, stream: trio.abc.Stream, peer: str, transport: WebSocket, refusal: Refusal
    ) -> None:
        """A connection over a per-IP rate: its error frame in the WebSocket, then a close."""
        log.warning("refusing connection from %s: %s", peer, refusal.message)
        error = RequestError(E.RATE_LIMITED, refusal.message, retry_after_ms=refusal.retry_after_ms)
        frame = error.frame(None)
        self.server.metrics.limited(refusal.scope)
        self.server.metrics.frame_out(frame)
        data = transport.codec.encode(frame) + transport.goodbye(f"{E.RATE_LIMITED}: refused")
        await self._finish_bytes(stream, data)

    def respond(self, request: h11.Request, path: str) -> Response:
        if request.method != b"GET":
            raise HttpError(405, "only GET is supported", {"Allow": "GET"})
        if path == DEV_TOKEN_PATH and self.dev_issuer is not None:
            return self._dev_token(request)
        if path not in FILES:
            raise HttpError(404, "no such path; the chat page is at /, the client at /tsmsg.js")
        name, content_type = FILES[path]
        body = self.files.get(name)
        if body is None:
            body = self.files[name] = (
                importlib.resources.files("tsmsg") / "web" / name
            ).read_bytes()
        return Response(200, body, content_type, PAGE_HEADERS)

    def _dev_token(self, request: h11.Request) -> Response:
        """--dev only: a token for any user name (every channel, read and send), valid
        for ``ttl_s`` (default and most: DEV_TOKEN_TTL_S; short ones test refreshes)."""
        assert self.dev_issuer is not None
        query = urllib.parse.parse_qs(request.target.decode("latin-1").partition("?")[2])
        user = (query.get("user") or [""])[0]
        if not USER_ID.fullmatch(user):
            raise HttpError(400, "user must be 1 to 62 characters of A-Z a-z 0-9 _ . @ -")
        ttl = (query.get("ttl_s") or [str(DEV_TOKEN_TTL_S)])[0]
        # ASCII digits, few enough for int(): isdigit() alone is true of '²' and of any
        # number of digits, which int() refuses (a 500).
        decimal = ttl.isascii() and ttl.isdigit() and len(ttl) <= 9
        if not decimal or not 1 <= int(ttl) <= DEV_TOKEN_TTL_S:
            raise HttpError(400, f"ttl_s must be an integer from 1 to {DEV_TOKEN_TTL_S}")
        ttl_s = int(ttl)
        token = self.dev_issuer.issue(
            user, ("*",), (SCOPE_READ, SCOPE_SEND), ttl_s, now=int(time.time())
        )
        body = json.dumps({"user": user, "token": token, "ttl_s": ttl_s}).encode()
        return Response(200, body, "application/json", {"Cache-Control": "no-store"})

    async def _send(self, stream: trio.abc.Stream, data: bytes) -> None:
        with trio.fail_after(WRITE_TIMEOUT_S):
            await stream.send_all(data)

    async def _finish(self, stream: trio.abc.Stream, response: Response) -> None:
        await self._finish_bytes(stream, encode_response(response))

    async def _finish_bytes(self, stream: trio.abc.Stream, data: bytes) -> None:
        """Send the last bytes and close; a plain TCP peer's unread input is drained
        first, so that the close sends no reset that could destroy the response."""
        try:
            with trio.move_on_after(WRITE_TIMEOUT_S):
                await stream.send_all(data)
                if isinstance(stream, trio.SocketStream):
                    await stream.send_eof()
                    await drain(stream)
        except PEER_GONE:
            pass
        finally:
            await close_stream(stream)
