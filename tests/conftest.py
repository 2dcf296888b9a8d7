"""Shared fixtures: a real server on 127.0.0.1 port 0 with its LMDB store in a tmp dir,
token minting, a small raw wire client (frames in, frames out) over TCP or a WebSocket
(either subprotocol: ``transport``), and the store engines (LMDB, one Redis, a Redis
Cluster) that the store's own tests run on."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from wsproto import WSConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

import redis_servers
from tsmsg import FrameDecoder, encode
from tsmsg._native import packb, unpackb
from tsmsg.auth import TokenIssuer, TokenVerifier
from tsmsg.protocol.limits import RATE_KINDS, Limits
from tsmsg.protocol.session import Action, Read, Session
from tsmsg.server.app import Server
from tsmsg.server.settings import Settings
from tsmsg.store import LmdbStore, StoreConfig
from tsmsg.store.redis_store import RedisStore

SECRET = b"test-secret-test-secret-test-secret!!"  # >= 32 bytes: pyjwt warns on short keys
WIRE_TIMEOUT = 5.0  # seconds any single wait for a frame may take in a test


def mint(
    user: str,
    channels: Iterable[str] = ("*",),
    scopes: Iterable[str] = ("chat:read", "chat:send"),
    ttl_s: int = 3600,
) -> str:
    return TokenIssuer(SECRET).issue(user, channels, scopes, ttl_s, now=int(time.time()))


# The transports a WireClient speaks (PROTOCOL.md sections 3 and 19). The over-TCP suites
# about the protocol run over each (a module overrides the ``transport`` fixture).
TCP = "tcp"
WS_MSGPACK = "tsmsg.v1.msgpack"
WS_JSON = "tsmsg.v1.json"
TRANSPORTS = [TCP, WS_MSGPACK, WS_JSON]


class TcpFraming:
    """Length-prefixed msgpack frames."""

    filler = b"\xa1"  # a byte of an unfinished frame's body

    def __init__(self) -> None:
        self.decoder = FrameDecoder()

    def unfinished(self) -> bytes:
        """The start of a frame that announces 100 bytes: its header alone."""
        return b"\x00\x00\x00\x64"

    def encode(self, frame: dict[str, Any]) -> bytes:
        return encode(frame)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        return self.decoder.feed(data)


def exact_ints(value: Any) -> Any:
    """A JSON frame with the integers the server sent as decimal strings (those beyond
    2**53 - 1: epochs, PROTOCOL.md 19.2) as integers again, so the suites compare the
    same values over every transport. (Only digit strings of 16 or more characters: no
    text in the tests looks like that.)"""
    if isinstance(value, str) and len(value) >= 16 and value.lstrip("-").isdigit():
        return int(value)
    if isinstance(value, dict):
        return {k: exact_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [exact_ints(v) for v in value]
    return value


class WsFraming:
    """A WebSocket client (wsproto) of one subprotocol: its handshake, then one frame per
    message. ``close_code``: the server's close frame, once received; ``rejected``: the
    HTTP status and body of a refused upgrade."""

    def __init__(self, subprotocol: str) -> None:
        self.subprotocol = subprotocol
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.parts: list[Any] = []
        self.accepted: str | None = None  # the subprotocol the server chose
        self.rejected: tuple[int, bytes] | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.out = b""  # pongs and the close reply, for the next send

    filler = b"a"  # a byte of an unfinished message (masked with a zero key: as it is)

    def unfinished(self) -> bytes:
        """The start of a message that announces 100 bytes: its frame header alone."""
        opcode = 0x81 if self.subprotocol == WS_JSON else 0x82  # a final text/binary frame
        return bytes([opcode, 0x80 | 100]) + b"\x00\x00\x00\x00"

    def upgrade(self, host: str, origin: str | None, subprotocols: list[str]) -> bytes:
        extra = [(b"origin", origin.encode())] if origin else []
        request = Request(
            host=host, target="/connect", subprotocols=subprotocols, extra_headers=extra
        )
        return self.ws.send(request)

    def encode(self, frame: dict[str, Any]) -> bytes:
        if self.ws.state is not ConnectionState.OPEN:  # the server closed it (read already):
            raise trio.BrokenResourceError("the WebSocket is closing")  # as a closed TCP stream
        if self.subprotocol == WS_JSON:
            return self.ws.send(TextMessage(json.dumps(frame)))
        return self.ws.send(BytesMessage(packb(frame)))

    def message(self, data: bytes | str) -> bytes:
        """A raw message: bytes as binary, str as text, whatever the subprotocol."""
        return self.ws.send(BytesMessage(data) if isinstance(data, bytes) else TextMessage(data))

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self.ws.receive_data(data)
        frames: list[dict[str, Any]] = []
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self.accepted = event.subprotocol
            elif isinstance(event, RejectConnection):
                self.rejected = (event.status_code, b"")
            elif isinstance(event, RejectData):
                assert self.rejected is not None
                self.rejected = (self.rejected[0], self.rejected[1] + event.data)
            elif isinstance(event, Ping):
                self.out += self.ws.send(event.response())
            elif isinstance(event, CloseConnection):
                self.close_code, self.close_reason = event.code, event.reason
            elif isinstance(event, Message):
                self.parts.append(event.data)
                if event.message_finished:
                    parts, self.parts = self.parts, []
                    if isinstance(event, TextMessage):
                        assert self.subprotocol == WS_JSON, "a text message on msgpack"
                        frames.append(exact_ints(json.loads("".join(parts))))
                    else:
                        assert self.subprotocol == WS_MSGPACK, "a binary message on json"
                        frames.append(unpackb(b"".join(parts)))
        return frames


class WireClient:
    """A raw protocol client: sends dicts, receives decoded frames. ``request`` sends a
    frame with a fresh rid and returns the reply with that rid, keeping every other frame
    (pushes, other replies) in ``pending`` for ``next``/``expect``. Over TCP by default,
    or a WebSocket (``framing``)."""

    def __init__(
        self, stream: trio.SocketStream, framing: TcpFraming | WsFraming | None = None
    ) -> None:
        self.stream = stream
        self.framing = framing or TcpFraming()
        self.pending: list[dict[str, Any]] = []
        self.rids = itertools.count(1)
        self.eof = False

    async def send(self, frame: dict[str, Any]) -> None:
        await self.stream.send_all(self.framing.encode(frame))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            self.eof = True
            raise EOFError("server closed the connection")
        self.pending.extend(self.framing.feed(data))

    async def next(
        self, match: Callable[[dict[str, Any]], bool] = lambda f: True
    ) -> dict[str, Any]:
        """The first pending or future frame for which ``match`` is true."""
        with trio.fail_after(WIRE_TIMEOUT):
            while True:
                for i, frame in enumerate(self.pending):
                    if match(frame):
                        return self.pending.pop(i)
                await self._fill()

    async def expect(self, t: str, **fields: Any) -> dict[str, Any]:
        return await self.next(
            lambda f: f.get("t") == t and all(f.get(k) == v for k, v in fields.items())
        )

    async def request(self, t: str, **fields: Any) -> dict[str, Any]:
        rid = next(self.rids)
        await self.send({"t": t, "rid": rid, **fields})
        return await self.next(lambda f: f.get("rid") == rid)

    async def closed(self) -> bool:
        """True when the server closes the connection within the timeout."""
        with trio.move_on_after(WIRE_TIMEOUT):
            try:
                while True:
                    await self._fill()
            except (EOFError, trio.BrokenResourceError):
                return True
        return False

    async def aclose(self) -> None:
        await self.stream.aclose()


class Harness:
    """A running server plus helpers to connect to it."""

    def __init__(self, server: Server, nursery: trio.Nursery, transport: str = TCP) -> None:
        self.server = server
        self.nursery = nursery
        self.transport = transport
        self.clients: list[WireClient] = []

    async def raw(self, rcvbuf: int | None = None) -> WireClient:
        """A connection, not yet past hello, over the harness's transport (a WebSocket:
        upgraded). ``rcvbuf``: its receive buffer, set before connecting."""
        if self.transport == TCP:
            client = WireClient(await tcp_stream(self.server.port, rcvbuf))
        else:
            client = await ws_connect(self.server, self.transport, rcvbuf=rcvbuf)
        self.clients.append(client)
        return client

    async def connect(self, user: str, channels: Iterable[str] = ("*",), **kw: Any) -> WireClient:
        """Connected and past hello."""
        client = await self.raw()
        welcome = await client.request("hello", v=1, token=mint(user, channels, **kw))
        assert welcome["t"] == "welcome", welcome
        return client


async def tcp_stream(port: int, rcvbuf: int | None = None) -> trio.SocketStream:
    if rcvbuf is None:
        return await trio.open_tcp_stream("127.0.0.1", port)
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def ws_upgrade(
    server: Server,
    subprotocols: list[str],
    *,
    origin: str | None = None,
    rcvbuf: int | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> WireClient:
    """A WebSocket upgrade to the server's ``/connect`` (over TLS with ``ssl_context``);
    the client, accepted or not (``framing.accepted``, ``framing.rejected``)."""
    assert server.ws_port is not None, "the server has no WebSocket port (setting ws)"
    stream: Any = await tcp_stream(server.ws_port, rcvbuf)
    if ssl_context is not None:
        stream = trio.SSLStream(stream, ssl_context, server_hostname="127.0.0.1")
    framing = WsFraming(subprotocols[0] if subprotocols else WS_MSGPACK)
    client = WireClient(stream, framing)
    await stream.send_all(framing.upgrade(f"127.0.0.1:{server.ws_port}", origin, subprotocols))
    with trio.fail_after(WIRE_TIMEOUT), contextlib.suppress(EOFError):
        while framing.accepted is None and framing.rejected is None:
            await client._fill()
        while framing.rejected is not None:  # its body, up to the server's close
            await client._fill()
    return client


async def ws_connect(server: Server, subprotocol: str, *, rcvbuf: int | None = None) -> WireClient:
    client = await ws_upgrade(server, [subprotocol], rcvbuf=rcvbuf)
    assert client.framing.accepted == subprotocol, getattr(client.framing, "rejected", None)  # type: ignore[union-attr]
    return client


# Tests send far faster than a person: the per-connection and per-user rate limits are
# lifted unless a test sets them (the rate-limit tests do).
UNLIMITED = {
    f"{kind}_{part}": value
    for kind in RATE_KINDS
    for part, value in (("rate", 1e6), ("burst", 10**6))
}
# And they open many connections from one address, some as one user: the caps on
# connections per IP and per user are lifted too (the tests of those caps set them).
UNCAPPED = {"ip_max_connections": 10**6, "user_max_connections": 10**6}


def fast_limits(**overrides: Any) -> Limits:
    return Limits(**{**UNLIMITED, **overrides})


def unlimited_env() -> dict[str, str]:
    """The same for a server subprocess, as TSMSG_LIMITS_* variables."""
    env = {f"TSMSG_LIMITS_{k.upper()}": str(v) for k, v in UNLIMITED.items()}
    return env | {f"TSMSG_{k.upper()}": str(v) for k, v in UNCAPPED.items()}


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    limits = overrides.pop("limits", None) or fast_limits()
    overrides = {**UNCAPPED, **overrides}
    overrides.setdefault("ws", "127.0.0.1:0")  # the WebSocket port too
    return replace(
        Settings(), host="127.0.0.1", port=0, data_dir=str(data_dir), limits=limits, **overrides
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


@pytest.fixture
def transport() -> str:
    """The transport of ``harness``'s clients: TCP, unless a module runs over each."""
    return TCP


@pytest.fixture
async def harness(settings: Settings, transport: str) -> AsyncIterator[Harness]:
    async with running_server(settings, transport) as h:
        yield h


@asynccontextmanager
async def running_server(settings: Settings, transport: str = TCP) -> AsyncIterator[Harness]:
    """A server of its own in this process (several per test, or restarts on one dir)."""
    async with trio.open_nursery() as nursery:
        mocked = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
        new = Server(settings, TokenVerifier(SECRET), inline_reads=mocked)
        server: Server = await nursery.start(new.run)
        h = Harness(server, nursery, transport)
        try:
            yield h
        finally:
            for client in h.clients:
                with trio.move_on_after(1):
                    await client.aclose()
            server.stopping.set()


async def sync_all(client: WireClient, since: int, channel: str) -> list[dict[str, Any]]:
    """Every entry after ``since``, following ``more`` across pages."""
    out: list[dict[str, Any]] = []
    while True:
        page = await client.request("sync", channel=channel, since=since)
        assert page["t"] == "ok", page
        out += page["events"]
        if page["events"]:
            since = page["events"][-1]["seq"]
        if not page["more"]:
            return out


# ------------------------------------------------------------------- store engines
# Redis servers are started once per session, only when a test asks for them, and killed
# at its end. Tests isolate themselves by key prefix (a fresh one per test), so nothing is
# flushed between tests.

ENGINES = ["lmdb", "redis", "redis-cluster"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis_servers.RedisServer]:
    if not redis_servers.available():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = redis_servers.RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[redis_servers.RedisCluster]:
    if not redis_servers.available():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    cluster = redis_servers.RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


_prefixes = itertools.count(1)


class StoreEngine:
    """One engine the store tests run on. ``place`` gives a fresh place for a store's
    data (a directory for LMDB, a key prefix for Redis); ``open`` opens a store there,
    again and again (a restart finds the data)."""

    def __init__(self, name: str, url: str | None) -> None:
        self.name = name
        self.url = url  # None: LMDB

    def place(self, path: Path) -> str:
        return str(path) if self.url is None else f"t{next(_prefixes)}:"

    def open(self, place: str, config: StoreConfig | None = None, **kwargs: Any) -> Any:
        if self.url is None:
            return LmdbStore(place, config or StoreConfig(), **kwargs)
        return RedisStore(self.url, config, key_prefix=place, **kwargs)


@pytest.fixture(params=ENGINES)
def store_engine(request: pytest.FixtureRequest) -> StoreEngine:
    """Each engine in turn; a test marked ``lmdb_only`` (it is about LMDB's files) runs
    on LMDB alone."""
    name: str = request.param
    if name == "lmdb":
        return StoreEngine(name, None)
    if request.node.get_closest_marker("lmdb_only") is not None:
        pytest.skip("about LMDB's files")
    server = request.getfixturevalue("redis_server" if name == "redis" else "redis_cluster")
    return StoreEngine(name, server.url)


def resolve(session: Session, actions: list[Action]) -> list[Action]:
    """Run each ``Read`` in ``actions`` inline, as the server does in a thread, and put
    what its reply brings in its place."""
    out: list[Action] = []
    for action in actions:
        if not isinstance(action, Read):
            out.append(action)
            continue
        try:
            result, error = action.query(), None
        except Exception as exc:
            result, error = None, exc
        out += resolve(session, session.read_done(action, result, error))
    return out


def receive(session: Session, frame: dict[str, Any], now_ms: int) -> list[Action]:
    """``Session.receive_frame`` with its reads run inline (``resolve``)."""
    return resolve(session, session.receive_frame(frame, now_ms))


_redis_dbs = itertools.count()
REDIS_DBS = 16  # a default redis-server's databases


def fresh_redis_url(server: redis_servers.RedisServer) -> str:
    """A URL of an emptied database of the shared test Redis, for one test's server
    (a single-node server on the Redis engine; tests run one after the other)."""
    db = next(_redis_dbs) % REDIS_DBS
    with server.client() as client:
        client.execute_command("SELECT", db)
        client.flushdb()
    return f"{server.url}/{db}"


@pytest.fixture(params=["lmdb", "redis"])
def engine_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings on each engine in turn: for the over-TCP suites about behavior (the
    same tests, whatever holds the logs)."""
    if request.param == "lmdb":
        return make_settings(tmp_path / "data")
    url = fresh_redis_url(request.getfixturevalue("redis_server"))
    return make_settings(tmp_path / "data", engine=url)
