"""A minimal HTTP/1.1 listener on trio for the operator endpoints (``/metrics``,
``/healthz``, ``/readyz``).

Deliberately small rather than a web framework: a scraper or a probe sends one ``GET``
with a few headers, so this reads one request head (bounded in size and time), answers
it from a table of routes and closes the connection (``Connection: close``; no
keep-alive, no request bodies, no chunking). It runs in the server's own nursery, so it
starts and stops with the server and shares its event loop: nothing to lock.
prometheus_client's own ``start_http_server`` would run a separate thread outside the
nursery's lifecycle and could not serve the health routes next to the metrics.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import trio

log = logging.getLogger("tsmsg.http")

MAX_REQUEST_BYTES = 8192  # the request line and headers; a probe sends a few hundred
READ_TIMEOUT_S = 5.0  # the whole request head must arrive within this (slowloris)
WRITE_TIMEOUT_S = 10.0  # a client that does not read its response is dropped
# Concurrent HTTP connections; more are closed at once. Their descriptors come out of the
# server's FD_RESERVE (64, with the ~20 a server holds anyway and the store's Redis
# connections): a probe and a scraper need a few at a time.
MAX_CONNECTIONS = 16
DRAIN_BYTES = 64 * 1024  # after responding, unread input read and dropped (no RST)
TEXT = "text/plain; charset=utf-8"
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: dict[str, str] = field(default_factory=dict)


Route = Callable[[], Response]


def text(status: int, message: str) -> Response:
    return Response(status, message.encode() + b"\n")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_request(head: bytes) -> tuple[str, str]:
    """The method and path of a request head (without the final CRLF CRLF)."""
    try:
        lines = head.decode("ascii").split("\r\n")
    except UnicodeDecodeError:
        raise _BadRequest(400, "request head is not ASCII") from None
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[0].isupper():
        raise _BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1") or not target.startswith("/"):
        raise _BadRequest(400, "malformed request line")
    for line in lines[1:]:
        name, colon, _ = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(400, "malformed header line")
    return method, target.partition("?")[0]


async def read_head(stream: trio.abc.ReceiveStream) -> bytes:
    """Bytes up to the blank line ending the request head."""
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end > MAX_REQUEST_BYTES or (end < 0 and len(buf) > MAX_REQUEST_BYTES):
            raise _BadRequest(431, f"request head over {MAX_REQUEST_BYTES} bytes")
        if end >= 0:
            return bytes(buf[:end])
        data = await stream.receive_some(4096)
        if not data:
            raise _BadRequest(400, "incomplete request")
        buf += data


def encode_response(response: Response) -> bytes:
    lines = [
        f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in response.headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + response.body


async def respond(stream: trio.SocketStream, routes: Mapping[str, Route]) -> Response:
    """Read one request and the response to it."""
    with trio.move_on_after(READ_TIMEOUT_S):
        try:
            method, path = parse_request(await read_head(stream))
        except _BadRequest as exc:
            return text(exc.status, str(exc))
        if method != "GET":
            return Response(405, b"only GET is supported\n", headers={"Allow": "GET"})
        route = routes.get(path)
        if route is None:
            return text(404, f"no such path; try {', '.join(routes)}")
        try:
            return route()
        except Exception:
            log.exception("HTTP route %s failed", path)
            return text(500, "internal error")
    return text(408, f"no complete request within {READ_TIMEOUT_S:g} s")


async def drain(stream: trio.SocketStream) -> None:
    """Read and drop what the client still sends (a body, a pipelined request), a bounded
    amount for at most a second, so that closing does not reset the connection before
    the client has read the response."""
    drained = 0
    with trio.move_on_after(1):
        while drained < DRAIN_BYTES:
            data = await stream.receive_some(4096)
            if not data:
                return
            drained += len(data)


class HttpServer:
    """Serves ``routes`` (path → function returning a :class:`Response`)."""

    def __init__(self, routes: Mapping[str, Route]) -> None:
        self.routes = routes
        self.active = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        self.active += 1
        try:
            if self.active <= MAX_CONNECTIONS:
                response = await respond(stream, self.routes)
                with trio.move_on_after(WRITE_TIMEOUT_S):
                    await stream.send_all(encode_response(response))
                    await stream.send_eof()
                    await drain(stream)
        except PEER_GONE:
            pass
        except Exception:  # never let an HTTP client take the chat server down
            log.exception("HTTP connection failed")
        finally:
            self.active -= 1
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    async def serve(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        serve = functools.partial(trio.serve_tcp, self.handle, port, host=host)
        await serve(task_status=task_status)
