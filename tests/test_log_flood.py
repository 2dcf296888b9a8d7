"""Repeated log lines are rate limited with a count (issue 18 item 9): a connect flood
from one address once wrote a WARNING per refused connection, 16,784 lines in 5 s.
:class:`RepeatFilter` with plain calls (the clock injected), then over TCP."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

import redis_servers
from conftest import make_settings, running_server
from tsmsg.server import app
from tsmsg.server.app import LOG_BURST, LOG_INTERVAL_S, RepeatFilter

FLOOD = 120  # connections refused in the TCP test


def record(msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord("tsmsg.server", level, __file__, 1, msg, args, None)


def test_first_burst_of_a_kind_passes_then_a_count() -> None:
    now = [0.0]
    repeats = RepeatFilter(3, 10.0, clock=lambda: now[0])
    template = "refusing connection from %s: %s"
    passed = [repeats.filter(record(template, f"10.0.0.1:{port}", "x")) for port in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert repeats.filter(record("another kind %s", 1))  # kinds are counted apart
    assert repeats.filter(record(template, "p", "x", level=logging.ERROR))  # levels too
    assert repeats.filter(record("one per connection %s", 1, level=logging.INFO))
    now[0] = 10.0
    later = record(template, "10.0.0.2:1", "x")
    assert repeats.filter(later)
    assert later.getMessage() == (
        "refusing connection from 10.0.0.2:1: x (7 similar messages suppressed in the last 10 s)"
    )
    assert [repeats.filter(record(template, "p", "x")) for _ in range(3)] == [True, True, False]


def test_info_lines_are_not_limited_by_default() -> None:
    repeats = RepeatFilter(1, 10.0, clock=lambda: 0.0)
    assert all(repeats.filter(record("connect %s", n, level=logging.INFO)) for n in range(50))


def test_flush_logs_one_summary_for_a_kind_gone_quiet(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    repeats = RepeatFilter(2, 10.0, clock=lambda: now[0])
    for port in range(6):
        repeats.filter(record("refused %s", port))
    repeats.flush()  # the window has not ended: nothing yet
    assert not caplog.records
    now[0] = 12.0
    with caplog.at_level(logging.WARNING, logger="tsmsg.server"):
        repeats.flush()
        repeats.flush()  # once
    assert [r.getMessage() for r in caplog.records] == [
        "4 similar messages suppressed in the last 12 s: refused %s"
    ]
    assert repeats.filter(record("refused %s", 7))  # a fresh window


def test_kinds_remembered_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app, "LOG_MAX_KINDS", 4)
    repeats = RepeatFilter(1, 10.0, clock=lambda: 0.0)
    for n in range(20):
        repeats.filter(record(f"formatted by the caller {n}"))
    assert len(repeats.windows) == 4


@pytest.mark.parametrize(
    ("port", "refusal"),
    [
        ("tcp", "refusing connection from %s: %s (retry in %d ms)"),
        ("ws", "refusing connection from %s: %s"),  # its own logger, tsmsg.server.web
    ],
)
async def test_a_connect_flood_logs_a_few_lines_and_a_count(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    port: str,
    refusal: str,
) -> None:
    """Refused connections on the TCP port, or on the WebSocket port (PROTOCOL.md 19:
    admission counted with the TCP port's): a few WARNING lines, then a count."""
    now = [0.0]
    monkeypatch.setattr(app.LOG_FILTER, "clock", lambda: now[0])
    monkeypatch.setattr(app.LOG_FILTER, "windows", {})
    settings = make_settings(tmp_path / "data", ip_max_connections=1, tick_ms=10)
    caplog.set_level(logging.INFO, logger="tsmsg.server")
    async with running_server(settings) as h:
        await h.connect("alice")  # the address's one connection (TCP: counted together)
        number = h.server.port if port == "tcp" else h.server.ws_port
        assert number is not None
        for _ in range(FLOOD):
            stream = await trio.open_tcp_stream("127.0.0.1", number)
            with trio.fail_after(5):
                reply = b""
                while chunk := await stream.receive_some(65536):
                    reply += chunk  # the refusal, then the close
            if port == "ws":
                assert reply.startswith(b"HTTP/1.1 503 "), reply
            await stream.aclose()
        refusals = [r for r in caplog.records if "refusing connection" in r.getMessage()]
        assert len(refusals) == LOG_BURST, len(refusals)
        now[0] = LOG_INTERVAL_S  # the ticker's next flush sums up the rest
        with trio.fail_after(5):
            while not any("suppressed" in r.getMessage() for r in caplog.records):
                await trio.sleep(0.01)
    summaries = [r.getMessage() for r in caplog.records if "suppressed" in r.getMessage()]
    assert summaries == [
        f"{FLOOD - LOG_BURST} similar messages suppressed in the last 10 s: {refusal}"
    ], summaries
    assert h.server.metrics.value("tsmsg_rate_limited_total") == FLOOD  # all still counted


@pytest.mark.skipif(not redis_servers.available(), reason="no redis-server")
async def test_store_read_failures_during_an_outage_log_a_few_lines_and_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis away: every request that reads the store fails (store_unavailable), and the
    session logs an ERROR for each. Repeated ERROR lines are limited like the others
    (deploy.md, "Logs"): a few, then a count."""
    now = [0.0]
    monkeypatch.setattr(app.LOG_FILTER, "clock", lambda: now[0])
    monkeypatch.setattr(app.LOG_FILTER, "windows", {})
    caplog.set_level(logging.INFO)
    redis = redis_servers.RedisServer(tmp_path / "redis").start()
    try:
        settings = make_settings(tmp_path / "data", engine=redis.url, tick_ms=10)
        async with running_server(settings) as h:
            alice = await h.connect("alice")
            assert (await alice.request("join", channel="room"))["t"] == "ok"
            await trio.to_thread.run_sync(redis.kill)
            for _ in range(FLOOD):
                reply = await alice.request("history", channel="room")
                assert reply["code"] == "store_unavailable", reply
            failures = [r for r in caplog.records if "failed in the store" in r.getMessage()]
            assert len(failures) == LOG_BURST, len(failures)
            now[0] = LOG_INTERVAL_S
            with trio.fail_after(5):
                while not any("suppressed" in r.getMessage() for r in caplog.records):
                    await trio.sleep(0.01)
    finally:
        redis.stop()
