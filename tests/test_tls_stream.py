"""TlsStream (the server's own TLS on the socket's fd) over real TCP with
the real server: a backlogged peer that keeps sending, ordering and slow readers over TLS
(TCP and WebSocket ports), pipelining with the handshake's last flight, EOF with and
without close_notify, garbage, resets, renegotiation and KeyUpdate (openssl s_client),
a peer that never reads (send timeout, bounded backlog), frames of max_frame size."""

from __future__ import annotations

import logging
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import test_tls
from conftest import (
    WIRE_TIMEOUT,
    WS_MSGPACK,
    Harness,
    WireClient,
    mint,
    running_server,
    tcp_stream,
    ws_upgrade,
)
from test_tls import HOST, Pki, tls_client, tls_settings
from tsmsg import FrameDecoder, encode
from tsmsg.server.app import Connection
from tsmsg.server.tls_stream import TlsStream

pki = test_tls.pki  # the fixture: a throwaway CA and the server's certificate
CH = "room-1"
OPEN: list[trio.abc.AsyncResource] = []  # client streams, closed after each test, failed or not


@pytest.fixture(autouse=True)
def server_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tsmsg.server")


@pytest.fixture(autouse=True)
async def close_clients() -> AsyncIterator[None]:
    yield
    while OPEN:
        with trio.move_on_after(1):
            await OPEN.pop().aclose()


def conn_of(h: Harness, user: str) -> Connection:
    return next(c for c in h.server.connections.values() if c.user == user)


async def wait_for(cond: Callable[[], bool]) -> None:
    with trio.fail_after(WIRE_TIMEOUT):
        while not cond():
            await trio.sleep(0.01)


async def settled(value: Callable[[], Any], quiet: float = 0.2) -> None:
    """Until ``value()`` has not changed for ``quiet`` seconds (bounded)."""
    with trio.fail_after(WIRE_TIMEOUT):
        last = value()
        while True:
            await trio.sleep(quiet)
            if value() == last:
                return
            last = value()


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def disconnects(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("disconnect ")]


def hello(user: str, rid: int = 1) -> dict[str, Any]:
    return {"t": "hello", "v": 1, "token": mint(user), "rid": rid}


async def tls_wire(
    h: Harness, pki: Pki, user: str, transport: str = "tcp", **kw: Any
) -> WireClient:
    """A raw client over TLS past hello, on the TCP port or (``ws``) the WebSocket port."""
    if transport == "tcp":
        client = await tls_client(h.server.port, pki, user, **kw)
    else:
        client = await ws_upgrade(h.server, [WS_MSGPACK], ssl_context=pki.client(), **kw)
        OPEN.append(client.stream)
        welcome = await client.request("hello", v=1, token=mint(user))
        assert welcome["t"] == "welcome", welcome
    OPEN.append(client.stream)
    return client


def small_send_buffer(conn: Connection) -> TlsStream:
    """The server's socket of ``conn`` with a small send buffer (no autotuning): with a
    peer's small receive buffer, a socket that is full for sure."""
    stream = conn.stream
    assert isinstance(stream, TlsStream)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return stream


# ---------------------------------------------------------------------- a backlogged peer


@pytest.mark.parametrize("transport", ["tcp", "ws"])
async def test_a_backlogged_member_that_sends_a_request_is_not_dropped(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, transport: str
) -> None:
    """A member whose socket is full (TLS records in the stream's backlog, the writer task
    in wait_writable) sends a ping. The reader must not wait to write the backlog itself:
    two tasks in wait_writable on one fd is trio.BusyResourceError, an "internal error"
    that drops the connection. It must get every event, then its pong."""
    texts = [f"{i:04d}" + "x" * 12000 for i in range(20)]
    async with running_server(tls_settings(tmp_path, pki)) as h:
        late = await tls_wire(h, pki, "bob", transport, rcvbuf=4096)
        assert (await late.request("join", channel=CH))["t"] == "ok"
        bob = conn_of(h, "bob")
        stream = small_send_buffer(bob)
        sender = await tls_wire(h, pki, "alice")
        for i, text in enumerate(texts):
            await sender.request("send", channel=CH, cid=f"c{i}", text=text)
        # Full: records wait in the backlog and the writer task waits for the socket,
        # and nothing moves (how much is in the backlog rather than the queue depends on
        # when the writer task took the queue over: not asserted).
        await wait_for(lambda: bool(stream.backlog) and bob.writing)
        await settled(lambda: (len(stream.backlog), bob.queued_bytes))
        assert bob.writing and stream.backlog  # the writer task waits for the socket
        await late.send({"t": "ping", "rid": 999})
        await trio.sleep(0.2)
        assert not errors_logged(caplog)
        events = [await late.expect("event", seq=i + 1) for i in range(len(texts))]
        assert [e["text"] for e in events] == texts
        await late.expect("pong", rid=999)


async def test_pipelined_writes_of_a_late_reader_keep_ok_before_event_over_tls(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """PROTOCOL.md 9.4 and 9.6 over TLS: a member that pipelines sends and reads late
    (its socket full, TLS records waiting in the backlog) gets, in one FIFO stream, each
    write's ok before its event, the events in seq order, and stays connected."""
    n = 40
    async with running_server(tls_settings(tmp_path, pki)) as h:
        c = await RawTls.connect(h.server.port, pki, rcvbuf=4096)
        c.write(hello("alice"), {"t": "join", "channel": CH, "rid": 2})
        await c.flush()
        await c.expect("ok", rid=2)
        small_send_buffer(conn_of(h, "alice"))
        for i in range(n):
            c.write({"t": "send", "channel": CH, "cid": f"c{i}", "text": "p" * 8000, "rid": 10 + i})
            await c.flush()
            await trio.sleep(0.005)  # one frame per read: the reader passes its backlog check
        await trio.sleep(0.2)
        assert not errors_logged(caplog)
        with trio.fail_after(WIRE_TIMEOUT):
            while sum(f["t"] == "event" for f in c.frames) < n:
                await c.fill()
        order = [
            (f["t"], f.get("rid") or f.get("seq")) for f in c.frames if f["t"] in ("ok", "event")
        ]
        acks = {f["rid"]: f["seq"] for f in c.frames if f["t"] == "ok"}
        assert [seq for t, seq in order if t == "event"] == list(range(1, n + 1))
        for rid, seq in acks.items():
            assert order.index(("ok", rid)) < order.index(("event", seq)), order


# ---------------------------------------------------------------------- a raw TLS client


class RawTls:
    """A TLS client on an SSLObject over memory BIOs: the test decides when ciphertext
    goes out (with the handshake's last flight, garbage, close_notify, FIN)."""

    def __init__(self, tcp: trio.SocketStream, ctx: ssl.SSLContext) -> None:
        self.tcp = tcp
        OPEN.append(tcp)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.inc, self.out, server_hostname=HOST)
        self.decoder = FrameDecoder()
        self.frames: list[dict[str, Any]] = []
        self.alert: str | None = None  # the reason of a fatal alert the server sent

    @classmethod
    async def connect(
        cls, port: int, pki: Pki, *, flush: bool = True, rcvbuf: int | None = None
    ) -> RawTls:
        client = cls(await tcp_stream(port, rcvbuf), pki.client())
        with trio.fail_after(WIRE_TIMEOUT):
            while True:
                try:
                    client.tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                await client.flush()
                data = await client.tcp.receive_some(65536)
                assert data, "the server closed during the handshake"
                client.inc.write(data)
        if flush:  # else the client's last flight goes out with the next flush
            await client.flush()
        return client

    def write(self, *frames: dict[str, Any]) -> None:
        """Encrypt frames; they go out at the next flush."""
        self.tls.write(b"".join(encode(f) for f in frames))

    async def flush(self, extra: bytes = b"") -> None:
        data = self.out.read() + extra
        if data:
            await self.tcp.send_all(data)

    async def fill(self) -> None:
        """Read once; EOFError at the server's close (or reset)."""
        data = b""
        try:
            data = await self.tcp.receive_some(65536)
        except trio.BrokenResourceError:
            pass
        if not data:
            raise EOFError
        self.inc.write(data)
        while True:
            try:
                plain = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLError as exc:  # the server's fatal alert: it closes next
                self.alert = exc.reason
                raise EOFError from exc
            if not plain:
                return
            self.frames += self.decoder.feed(plain)

    async def expect(self, t: str, **fields: Any) -> dict[str, Any]:
        with trio.fail_after(WIRE_TIMEOUT):
            while True:
                for i, f in enumerate(self.frames):
                    if f.get("t") == t and all(f.get(k) == v for k, v in fields.items()):
                        return self.frames.pop(i)
                await self.fill()

    async def until_closed(self) -> list[tuple[str, Any]]:
        """Read until the server closes (bounded); (t, rid) of every frame received."""
        with trio.fail_after(WIRE_TIMEOUT):
            try:
                while True:
                    await self.fill()
            except EOFError:
                pass
        return [(f["t"], f.get("rid")) for f in self.frames]


# ---------------------------------------------------------------------- pipelining, EOF


async def test_requests_pipelined_with_the_last_handshake_flight_then_fin(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """TLS 1.3: the client's Finished, hello, join and send in one segment, then FIN
    without close_notify: a half-close "handled like any TCP close" (PROTOCOL.md 4, 4.7),
    so the server still answers the write it read, then closes."""
    async with running_server(tls_settings(tmp_path, pki)) as h:
        c = await RawTls.connect(h.server.port, pki, flush=False)
        assert c.tls.version() == "TLSv1.3"
        c.write(hello("alice"), {"t": "join", "channel": CH, "rid": 2})
        c.write({"t": "send", "channel": CH, "cid": "c1", "text": "hi", "rid": 3})
        await c.flush()  # Finished + the three frames
        c.tcp.socket.shutdown(socket.SHUT_WR)
        frames = await c.until_closed()
        assert [f for f in frames if f[1]] == [("welcome", 1), ("ok", 2), ("ok", 3)], frames
        assert ("event", None) in frames
    assert any(m.endswith("peer closed the connection") for m in disconnects(caplog))


async def test_close_notify_then_the_server_still_answers_what_it_read(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """close_notify (the socket left open): a clean EOF; the server answers the writes it
    read before it, then closes, as the peer's close."""
    async with running_server(tls_settings(tmp_path, pki)) as h:
        c = await RawTls.connect(h.server.port, pki)
        c.write(hello("alice"), {"t": "join", "channel": CH, "rid": 2})
        c.write({"t": "send", "channel": CH, "cid": "c1", "text": "hi", "rid": 3})
        with pytest.raises(ssl.SSLWantReadError):
            c.tls.unwrap()  # close_notify, after the frames
        await c.flush()
        frames = await c.until_closed()
        assert [f for f in frames if f[1]] == [("welcome", 1), ("ok", 2), ("ok", 3)], frames
    assert any(m.endswith("peer closed the connection") for m in disconnects(caplog))


async def test_past_hello_the_poller_reads_records_split_anywhere_and_close_notify(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Past its hello a TLS connection is read by the server's poller (server/poller.py):
    a record cut at any byte is decrypted once whole, frames are answered, and a
    close_notify read with a history and a send is the EOF after both are answered."""
    async with running_server(tls_settings(tmp_path, pki)) as h:
        assert h.server.poller is not None
        c = await RawTls.connect(h.server.port, pki)
        c.write(hello("alice"))
        await c.flush()
        await c.expect("welcome", rid=1)
        with trio.fail_after(WIRE_TIMEOUT):
            while len(h.server.poller) != 1:
                await trio.sleep(0.005)
        c.write({"t": "join", "channel": CH, "rid": 2})
        record = c.out.read()
        for cut in (1, 5, len(record) - 1):  # the 5-byte record header, the last byte
            c.write({"t": "ping", "rid": 100 + cut})
            split = c.out.read()
            await c.flush(record + split[:cut])
            await trio.sleep(0.02)
            await c.flush(split[cut:])
            await c.expect("pong", rid=100 + cut)
            record = b""
        await c.expect("ok", rid=2)
        # A store read (history) hands the connection to its task mid-input: the
        # close_notify read with it must still end the connection once it is answered.
        c.write({"t": "history", "channel": CH, "rid": 3})
        c.write({"t": "send", "channel": CH, "cid": "c1", "text": "hi", "rid": 4})
        with pytest.raises(ssl.SSLWantReadError):
            c.tls.unwrap()  # close_notify, right after them, in one write
        await c.flush()
        frames = await c.until_closed()
        assert ("ok", 3) in frames and ("ok", 4) in frames, frames
    assert any(m.endswith("peer closed the connection") for m in disconnects(caplog))


# ---------------------------------------------------------------------- misbehaving peers


@pytest.mark.parametrize(
    ("junk", "alert"),
    [
        # an application record that fails to decrypt
        (b"\x17\x03\x03\x00\x20" + b"\xa5" * 32, "SSLV3_ALERT_BAD_RECORD_MAC"),
        # a plaintext fatal alert (TLS 1.3 encrypts alerts after the handshake)
        (b"\x15\x03\x03\x00\x02\x02\x28", "SSLV3_ALERT_BAD_RECORD_MAC"),
        (b"GET / HTTP/1.1\r\n\r\n", "TLSV1_ALERT_DECODE_ERROR"),  # not TLS at all
    ],
    ids=["bad-record", "alert", "plaintext"],
)
async def test_garbage_after_the_handshake_is_a_lost_peer(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture, junk: bytes, alert: str
) -> None:
    """The peer is told why (a fatal alert), then closed; nothing else is disturbed."""
    async with running_server(tls_settings(tmp_path, pki)) as h:
        other = await tls_wire(h, pki, "bob")
        c = await RawTls.connect(h.server.port, pki)
        c.write(hello("alice"))
        await c.flush()
        await c.expect("welcome", rid=1)
        await c.flush(junk)
        await c.until_closed()
        assert c.alert == alert
        assert (await other.request("ping"))["t"] == "pong"
    assert not errors_logged(caplog)
    assert any("(alice)" in m and "connection lost" in m for m in disconnects(caplog))


async def test_reset_mid_handshake_and_mid_stream(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A reset during the handshake is a failed handshake and nothing else; one while the
    server writes to a full socket is a lost peer; no internal error, the server goes on."""

    def reset(tcp: trio.SocketStream) -> None:
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tcp.socket.close()

    async with running_server(tls_settings(tmp_path, pki)) as h:
        port = h.server.port
        tcp = await tcp_stream(port)
        OPEN.append(tcp)
        out = ssl.MemoryBIO()
        obj = pki.client().wrap_bio(ssl.MemoryBIO(), out, server_hostname=HOST)
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        await tcp.send_all(out.read())  # the ClientHello, then a reset
        await trio.sleep(0.1)
        reset(tcp)
        bob = await RawTls.connect(port, pki, rcvbuf=4096)
        bob.write(hello("bob"), {"t": "join", "channel": CH, "rid": 2})
        await bob.flush()
        await bob.expect("ok", rid=2)
        sender = await tls_wire(h, pki, "alice")
        for i in range(60):
            await sender.request("send", channel=CH, cid=f"c{i}", text="z" * 3000)
        reset(bob.tcp)
        await wait_for(lambda: len(h.server.connections) == 1)
        assert (await sender.request("ping"))["t"] == "pong"
    assert not errors_logged(caplog)
    assert h.server.metrics.value("tsmsg_tls_handshake_failures_total") == 1
    assert any("(bob)" in m and "connection lost" in m for m in disconnects(caplog))


async def test_a_peer_that_never_reads_is_cut_then_closed_with_a_bounded_backlog(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Its live stream is cut at max_queue_bytes (resync), the TLS backlog plus the queue
    stay within about twice the bound, and it is closed once a write waits longer than
    send_timeout_s (a history page it asks for and does not read: after the cut, the
    socket may have taken everything queued)."""
    bound = 64 * 1024
    settings = tls_settings(tmp_path, pki, max_queue_bytes=bound, send_timeout_s=0.5)
    async with running_server(settings) as h:
        deaf = await tls_wire(h, pki, "bob", rcvbuf=4096)
        assert (await deaf.request("join", channel=CH))["t"] == "ok"
        conn = conn_of(h, "bob")
        stream = small_send_buffer(conn)
        sender = await tls_wire(h, pki, "alice")
        most = 0
        for i in range(100):
            await sender.request("send", channel=CH, cid=f"c{i}", text="y" * 4000)
            most = max(most, len(stream.backlog) + conn.queued_bytes)
        await deaf.send({"t": "history", "rid": 99, "channel": CH})  # ~400 KB, never read
        await wait_for(lambda: all(c.user != "bob" for c in h.server.connections.values()))
        assert most <= 2 * bound + 16 * 1024, most
    assert not errors_logged(caplog)
    assert any("(bob)" in m and "send timeout" in m for m in disconnects(caplog))
    assert h.server.metrics.value("tsmsg_slow_consumer_resyncs_total") >= 1


async def test_frames_of_max_frame_size_both_ways_over_tls(tmp_path: Path, pki: Pki) -> None:
    """A client frame of nearly max_frame (1 MiB) is read whole and answered; a history
    page of many full messages reaches a reader with a small socket buffer whole."""
    async with running_server(tls_settings(tmp_path, pki)) as h:
        limits = h.server.settings.limits
        sender = await tls_wire(h, pki, "alice")
        assert (await sender.request("join", channel=CH))["t"] == "ok"
        text = "t" * limits.max_text_bytes
        for i in range(40):
            await sender.request("send", channel=CH, cid=f"c{i}", text=text)
        c = await RawTls.connect(h.server.port, pki, rcvbuf=4096)
        c.write(hello("bob"), {"t": "join", "channel": CH, "rid": 2})
        c.write({"t": "ping", "rid": 3, "pad": "p" * (limits.max_frame - 100)})
        await c.flush()
        await c.expect("pong", rid=3)
        c.write({"t": "history", "channel": CH, "limit": 100, "rid": 4})
        await c.flush()
        page = await c.expect("ok", rid=4)
        assert len(page["messages"]) >= 5 and all(m["text"] == text for m in page["messages"])


# ---------------------------------------------------------------------- openssl s_client

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")


class SClient:
    """``openssl s_client`` as the peer: the one client here that renegotiates (TLS 1.2,
    command R) or sends a KeyUpdate (TLS 1.3, K: update requested); ``-msg`` shows the
    protocol messages it receives."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.out = b""

    @classmethod
    async def start(cls, port: int, pki: Pki, *args: str) -> SClient:
        cmd = ["openssl", "s_client", "-connect", f"{HOST}:{port}", "-CAfile", pki.ca_file]
        cmd += ["-msg", "-no_ign_eof", *args]
        proc = await trio.lowlevel.open_process(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        return cls(proc)

    async def send(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send_all(data)
        await trio.sleep(0.1)  # one read of s_client's stdin per send (its commands)

    async def until(self, needle: bytes) -> bool:
        """Read its output until ``needle`` (True) or its exit (False); bounded."""
        assert self.proc.stdout is not None
        with trio.fail_after(WIRE_TIMEOUT):
            while needle not in self.out:
                data = await self.proc.stdout.receive_some(65536)
                if not data:
                    return False
                self.out += data
            return True

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            if self.proc.returncode is None:
                self.proc.kill()
            await self.proc.wait()


@asynccontextmanager
async def alice_by_s_client(port: int, pki: Pki, version: str) -> AsyncIterator[SClient]:
    """``openssl s_client`` (``version``: -tls1_2, -tls1_3) past alice's hello."""
    c = await SClient.start(port, pki, version)
    try:
        await c.send(encode(hello("alice")))
        assert await c.until(b"welcome")
        yield c
    finally:
        await c.aclose()


@needs_openssl
async def test_tls13_key_update_from_the_client_is_answered(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_server(tls_settings(tmp_path, pki)) as h:
        async with alice_by_s_client(h.server.port, pki, "-tls1_3") as c:
            await c.send(b"K\n")
            await c.send(encode({"t": "ping", "rid": 2}))
            assert await c.until(b"pong")
            after = c.out[c.out.index(b"KEYUPDATE") :]
            assert b"<<< TLS 1.3, Handshake [length 0005], KeyUpdate" in after  # the answer
    assert not errors_logged(caplog)


@needs_openssl
async def test_tls12_client_renegotiation_is_refused_cleanly(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """A no_renegotiation alert; the client gives up; a lost peer, the server goes on."""
    async with running_server(tls_settings(tmp_path, pki)) as h:
        async with alice_by_s_client(h.server.port, pki, "-tls1_2") as c:
            await c.send(b"R\n")
            assert await c.until(b"warning no_renegotiation")
            assert not await c.until(b"never printed")  # s_client ends: the server closed
        await wait_for(lambda: not h.server.connections)
        other = await tls_wire(h, pki, "bob")
        assert (await other.request("ping"))["t"] == "pong"
    assert not errors_logged(caplog)
    assert any("(alice)" in m and "connection lost" in m for m in disconnects(caplog))
