"""Prometheus metrics and the health endpoints (docs/metrics.md), over real TCP: a real
server with ``metrics`` on a free port, a scripted chat session over the wire protocol,
and ``/metrics`` scraped with a plain HTTP/1.1 client before and after, checking that
each counter moved by exactly what the session did. Also ``/healthz``, ``/readyz`` (ready,
failed store, a stalled writer), malformed HTTP, and metrics off by default.

No timing assertions: every wait is a bounded loop on a state the server reaches."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from conftest import (
    WIRE_TIMEOUT,
    Harness,
    fast_limits,
    make_settings,
    running_server,
)
from test_faults import FailingSync
from tsmsg.auth import AuthError, TokenIssuer, TokenVerifier
from tsmsg.server.app import Server
from tsmsg.server.http import MAX_REQUEST_BYTES
from tsmsg.server.metrics import STORE_COUNTERS, auth_reason, close_reason
from tsmsg.server.settings import Settings, load_settings, parse_address

ROOM = "room"
HOST = "127.0.0.1"
POLL_S = 0.01
POLLS = 500  # bounded waits: at most POLLS * POLL_S of trio time


# ---------------------------------------------------------------------- HTTP client


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the response to EOF: (status, headers, body)."""
    with trio.fail_after(WIRE_TIMEOUT):
        stream = await trio.open_tcp_stream(HOST, port)
        try:
            await stream.send_all(request)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
        finally:
            await stream.aclose()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert int(headers["content-length"]) == len(body), headers
    assert headers["connection"] == "close"
    return int(status), headers, body


async def get(port: int, path: str) -> tuple[int, bytes]:
    status, _, body = await http(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return status, body


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


class Delta:
    def __init__(self, before: Samples, after: Samples) -> None:
        self.before, self.after = before, after

    def __call__(self, name: str, **labels: str) -> float:
        return value(self.after, name, **labels) - value(self.before, name, **labels)


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(POLLS):
        if check():
            return
        await trio.sleep(POLL_S)
    pytest.fail(f"not reached in {POLLS} polls: {what}")


# ---------------------------------------------------------------------- fixtures


def metrics_settings(tmp_path: Path, **overrides: Any) -> Settings:
    # One typing frame per user, then rate_limited; an `on` never expires during the test.
    limits = fast_limits(typing_rate=0.001, typing_burst=1, typing_timeout_ms=3_600_000)
    return make_settings(tmp_path / "data", metrics=f"{HOST}:0", limits=limits, **overrides)


def port_of(h: Harness) -> int:
    assert h.server.metrics_port is not None
    return h.server.metrics_port


# ---------------------------------------------------------------------- the session


async def test_a_scripted_session_moves_each_metric_by_exactly_its_amount(
    tmp_path: Path,
) -> None:
    async with running_server(metrics_settings(tmp_path)) as h:
        port = port_of(h)
        before = await scrape(port)

        alice = await h.connect("alice")
        bob = await h.connect("bob")
        for client in (alice, bob):
            assert (await client.request("join", channel=ROOM))["t"] == "ok"
        acks = [
            await alice.request("send", channel=ROOM, cid=f"c{k}", text=f"hello {k}")
            for k in range(3)
        ]
        assert [a["seq"] for a in acks] == [1, 2, 3], acks
        dup = await alice.request("send", channel=ROOM, cid="c0", text="hello 0")
        assert dup["t"] == "ok" and dup["dup"], dup
        edit = await alice.request("edit", channel=ROOM, id=acks[0]["id"], text="edited")
        assert edit["t"] == "ok" and edit["seq"] == 4, edit
        for client in (alice, bob):
            await client.expect("event", channel=ROOM, seq=4)
        bogus = await alice.request("bogus")
        assert bogus["code"] == "unknown_type", bogus
        assert (await alice.request("typing", channel=ROOM, on=True))["t"] == "ok"
        limited = await alice.request("typing", channel=ROOM, on=True)
        assert limited["code"] == "rate_limited", limited
        await bob.expect("typing", channel=ROOM, user="alice")

        # A bad frame (0xc1 is no msgpack) closes its connection.
        mallory = await h.connect("mallory")
        await mallory.send_raw(b"\x00\x00\x00\x01\xc1")
        assert (await mallory.expect("error"))["code"] == "bad_frame"
        assert await mallory.closed()
        # A failed login.
        forged = TokenIssuer(b"not-the-secret-not-the-secret-!!!!").issue(
            "eve", ["*"], now=int(time.time())
        )
        eve = await h.raw()
        assert (await eve.request("hello", v=1, token=forged))["code"] == "unauthorized"
        assert await eve.closed()
        # A client coming back with a position resumes; its second sync is no resume.
        carol = await h.connect("carol")
        page = await carol.request("sync", channel=ROOM, since=2)
        assert [e["seq"] for e in page["events"]] == [3, 4], page
        assert (await carol.request("sync", channel=ROOM, since=0))["t"] == "ok"
        # bob leaves; alice is told he is offline.
        await bob.aclose()
        await alice.expect("presence", user="bob", status="offline")

        # Every write committed: 2 memberships, 3 messages, 1 edit, last_seen of bob and
        # mallory.
        await until(lambda: len(h.server.connections) == 2, "three connections closed")
        after = await scrape(port)
        for _ in range(POLLS):
            if Delta(before, after)("tsmsg_store_batch_size_sum") == 8:
                break
            await trio.sleep(POLL_S)
            after = await scrape(port)
        d = Delta(before, after)

    assert d("tsmsg_store_batch_size_sum") == 8
    assert d("tsmsg_store_batch_size_count") == d("tsmsg_store_commit_seconds_count") >= 1
    assert d("tsmsg_store_fsync_seconds_count") >= 1  # fsync durability syncs when idle
    assert value(after, "tsmsg_connections") == 2  # alice and carol
    assert d("tsmsg_connections_opened_total") == 5
    assert d("tsmsg_connections_closed_total") == 3
    for reason in ("bad_frame", "unauthorized", "peer_closed"):
        assert d("tsmsg_connections_closed_total", reason=reason) == 1, reason
    assert d("tsmsg_auth_failures_total") == d("tsmsg_auth_failures_total", reason="bad_signature")
    assert d("tsmsg_auth_failures_total") == 1

    frames_in = {"hello": 5, "join": 2, "send": 4, "edit": 1, "typing": 2, "sync": 2, "other": 1}
    for t, n in frames_in.items():
        assert d("tsmsg_frames_in_total", type=t) == n, t
    assert d("tsmsg_frames_in_total") == sum(frames_in.values())
    # ok: 2 joins, 4 sends, 1 edit, 1 typing, 2 syncs. event: 4 entries to 2 members.
    frames_out = {"welcome": 4, "ok": 10, "error": 4, "event": 8, "typing": 1, "presence": 1}
    frames_out["membership"] = 2  # each join a new membership: told to the user's device
    for t, n in frames_out.items():
        assert d("tsmsg_frames_out_total", type=t) == n, t
    assert d("tsmsg_frames_out_total") == sum(frames_out.values())
    for code in ("unknown_type", "rate_limited", "bad_frame", "unauthorized"):
        assert d("tsmsg_error_frames_total", code=code) == 1, code
    assert d("tsmsg_error_frames_total") == 4
    assert d("tsmsg_rate_limited_total") == d("tsmsg_rate_limited_total", scope="typing") == 1

    assert d("tsmsg_appends_total", kind="message") == 3  # not the duplicate
    assert d("tsmsg_appends_total", kind="edit") == 1
    assert d("tsmsg_appends_total", kind="delete") == 0
    assert d("tsmsg_send_ack_seconds_count") == 4  # 3 sends and the edit; the dup never waited
    assert d("tsmsg_store_read_seconds_count") >= 4  # 2 joins, 2 syncs (and presence loads)
    assert d("tsmsg_fanout_deliveries_total") == 8 + 1  # the events, bob's typing push
    assert d("tsmsg_resumes_total") == 1
    assert d("tsmsg_slow_consumer_resyncs_total") == 0
    assert d("tsmsg_signals_dropped_total") == 0
    assert value(after, "tsmsg_store_failed") == 0
    assert ("tsmsg_outbound_queue_bytes", frozenset()) in after


# ---------------------------------------------------------------------- health


async def test_healthz_and_readyz(tmp_path: Path) -> None:
    async with running_server(metrics_settings(tmp_path)) as h:
        port = port_of(h)
        assert await get(port, "/healthz") == (200, b"ok\n")
        assert await get(port, "/readyz") == (200, b"ok\n")
        assert await get(port, "/readyz?verbose=1") == (200, b"ok\n")  # a query is ignored


async def test_readyz_is_503_once_the_store_failed(tmp_path: Path) -> None:
    """Fail-stop (STORAGE.md): a sync that fails stops writes until a restart, so the
    server is alive (/healthz) but must get no traffic (/readyz)."""
    async with running_server(metrics_settings(tmp_path)) as h:
        port = port_of(h)
        alice = await h.connect("alice")
        assert (await alice.request("join", channel=ROOM))["t"] == "ok"
        assert (await alice.request("read", channel=ROOM, seq=0))["t"] == "ok"  # joins synced
        store: Any = h.server.store
        env = FailingSync(store._env)
        store._env = env
        try:
            env.failures = 1
            refused = await alice.request("send", channel=ROOM, cid="c1", text="one")
            assert refused["code"] == "store_unavailable", refused
            status, body = await get(port, "/readyz")
            assert status == 503 and body.startswith(b"store sync failed"), body
            assert await get(port, "/healthz") == (200, b"ok\n")
            samples = await scrape(port)
            assert value(samples, "tsmsg_store_failed") == 1
            assert value(samples, "tsmsg_error_frames_total", code="store_unavailable") == 1
        finally:
            store._env = env.real


async def test_readyz_is_503_while_the_writer_is_stalled(tmp_path: Path) -> None:
    """A write waiting longer than ready_max_write_age_s (a stalled disk) makes the
    server unready until the writer catches up."""
    async with running_server(metrics_settings(tmp_path, ready_max_write_age_s=0.05)) as h:
        port = port_of(h)
        alice = await h.connect("alice")
        stall, entered = threading.Event(), threading.Event()

        def stalled_commit() -> None:  # the store's fault hook, in the writer thread
            entered.set()
            stall.wait(WIRE_TIMEOUT)

        store: Any = h.server.store
        store._fault = stalled_commit
        try:
            await alice.send({"t": "send", "rid": 1, "channel": ROOM, "cid": "c", "text": "x"})
            status, body = 200, b""
            for _ in range(POLLS):
                status, body = await get(port, "/readyz")
                if status == 503:
                    break
                await trio.sleep(POLL_S)
            assert entered.is_set()
            assert status == 503 and body.startswith(b"store writer behind"), body
            lag = value(await scrape(port), "tsmsg_store_oldest_pending_write_seconds")
            assert lag > 0.05
        finally:
            store._fault = None
            stall.set()
        assert (await alice.next(lambda f: f.get("rid") == 1))["t"] == "ok"
        for _ in range(POLLS):
            if (await get(port, "/readyz"))[0] == 200:
                break
            await trio.sleep(POLL_S)
        assert await get(port, "/readyz") == (200, b"ok\n")


async def test_readyz_is_503_while_shutting_down(tmp_path: Path) -> None:
    async with running_server(metrics_settings(tmp_path)) as h:
        h.server.draining = True  # what shutdown() sets first
        status, body = await get(port_of(h), "/readyz")
        h.server.draining = False
    assert (status, body) == (503, b"shutting down\n")


# ---------------------------------------------------------------------- HTTP


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"garbage\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),  # no version
        (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /m\xe9trics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n", 400),  # the head never ends: EOF
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST_BYTES + b"\r\n\r\n", 431),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi", 405),
        (b"GET /nothing HTTP/1.1\r\n\r\n", 404),
    ],
    ids=[
        "garbage",
        "no-version",
        "http2",
        "relative-path",
        "bad-header",
        "not-ascii",
        "eof",
        "oversized",
        "post",
        "unknown-path",
    ],
)
async def test_bad_http_requests_are_answered_and_harmless(
    tmp_path: Path, request_bytes: bytes, status: int
) -> None:
    async with running_server(metrics_settings(tmp_path)) as h:
        port = port_of(h)
        if request_bytes.endswith(b"HTTP/1.1\r\n"):  # EOF before the end of the head
            with trio.fail_after(WIRE_TIMEOUT):
                stream = await trio.open_tcp_stream(HOST, port)
                await stream.send_all(request_bytes)
                await stream.send_eof()
                data = b""
                while chunk := await stream.receive_some(65536):
                    data += chunk
                await stream.aclose()
            assert data.startswith(b"HTTP/1.1 400 "), data
        else:
            got, headers, _ = await http(port, request_bytes)
            assert got == status
            if status == 405:
                assert headers["allow"] == "GET"
        # The server goes on: HTTP and chat.
        assert await get(port, "/healthz") == (200, b"ok\n")
        alice = await h.connect("alice")
        assert (await alice.request("ping"))["t"] == "pong"


# ---------------------------------------------------------------------- settings


async def test_metrics_are_off_by_default(harness: Harness) -> None:
    assert Settings().metrics == ""
    assert harness.server.settings.metrics == ""
    assert harness.server.metrics_port is None  # no listener
    # Counting goes on without the listener (the server's own registry).
    assert harness.server.metrics.value("tsmsg_connections_opened_total") == 0
    await harness.connect("alice")
    assert harness.server.metrics.value("tsmsg_connections_opened_total") == 1


def test_metrics_setting_from_file_env_and_flag(tmp_path: Path) -> None:
    config = tmp_path / "tsmsg.toml"
    config.write_text('metrics = "127.0.0.1:9700"\n')
    assert load_settings(str(config), {}).metrics == "127.0.0.1:9700"
    env = {"TSMSG_METRICS": "0.0.0.0:9701", "TSMSG_READY_MAX_WRITE_AGE_S": "2.5"}
    from_env = load_settings(str(config), env)
    assert (from_env.metrics, from_env.ready_max_write_age_s) == ("0.0.0.0:9701", 2.5)
    assert load_settings(str(config), env, {"metrics": "[::1]:9702"}).metrics == "[::1]:9702"
    assert parse_address("[::1]:9702", "metrics") == ("::1", 9702)
    for bad in ("9700", "localhost", "host:port", ":9700", "h:70000"):
        with pytest.raises(ValueError, match="metrics must be HOST:PORT"):
            load_settings(None, {"TSMSG_METRICS": bad})


def test_each_server_has_its_own_registry() -> None:
    one = Server(Settings(), TokenVerifier(b"x" * 32))
    two = Server(Settings(), TokenVerifier(b"x" * 32))
    one.metrics.opened.inc()
    assert one.metrics.value("tsmsg_connections_opened_total") == 1
    assert two.metrics.value("tsmsg_connections_opened_total") == 0


# ---------------------------------------------------------------------- label mapping


def test_close_reasons_map_to_a_bounded_set() -> None:
    assert close_reason("peer closed the connection") == "peer_closed"
    assert close_reason("connection lost: BrokenResourceError()") == "lost"
    assert close_reason("send timeout: the peer read nothing for 30 s") == "send_timeout"
    assert close_reason("server shutdown") == "shutdown"
    assert close_reason("internal error") == "internal_error"
    assert close_reason("idle_timeout: nothing received for 60000 ms") == "idle_timeout"
    assert close_reason("anything else: at all") == "other"


def test_auth_reasons_follow_the_verifiers_messages() -> None:
    now = int(time.time())
    verifier = TokenVerifier(b"s" * 32)
    tokens = {
        "expired": TokenIssuer(b"s" * 32).issue("a", ["*"], ttl_s=10, now=now - 100),
        "bad_signature": TokenIssuer(b"t" * 32).issue("a", ["*"], now=now),
        "malformed": "not.a.jwt",
    }
    for want, token in tokens.items():
        with pytest.raises(AuthError) as caught:
            verifier.verify(token, now)
        reason = f"{caught.value.code}: {caught.value.message}"
        assert auth_reason(reason) == want, reason
    assert auth_reason("unauthorized: something new") == "invalid"


async def test_store_fanout_counters_on_each_engine(engine_settings: Settings) -> None:
    """Redis: the sending node counts what it published, the other what it received.
    LMDB (one node): the same counters, always 0."""
    settings = replace(engine_settings, metrics=f"{HOST}:0")
    shared = settings.engine != "lmdb"
    async with running_server(settings) as a:
        second = running_server(settings) if shared else contextlib.nullcontext(a)
        async with second as b:
            alice, bob = await a.connect("alice"), await b.connect("bob")
            for client in (bob, alice):
                assert (await client.request("join", channel="room-1"))["t"] == "ok"
            sent = await alice.request("send", channel="room-1", cid="c1", text="hi")
            assert sent["t"] == "ok", sent
            await bob.next(lambda f: f.get("t") == "event" and f.get("seq") == sent["seq"])
            on_a, on_b = await scrape(port_of(a)), await scrape(port_of(b))
    names = [f"tsmsg_store_{name}_total" for name in STORE_COUNTERS]
    assert all((name, frozenset()) in on_a for name in names)
    if shared:
        assert value(on_a, "tsmsg_store_fanout_published_total") >= 1
        assert value(on_b, "tsmsg_store_fanout_received_total") >= 1
        assert value(on_a, "tsmsg_store_fanout_publish_failures_total") == 0
    else:
        assert [value(on_a, name) for name in names] == [0] * len(names)
