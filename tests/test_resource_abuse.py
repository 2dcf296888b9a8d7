"""Resource abuse over real TCP against a ``tsmsg serve`` child process (issue 7 item 6):

- a flood of 2,000 concurrent connections that never complete hello (half of them silent,
  half stopping in the middle of a hello frame): the server survives, a client that was
  connected before keeps sending and getting acks throughout, and every flood connection
  is closed by the hello deadline with ``hello_timeout``;
- file-descriptor limit: the server's RLIMIT_NOFILE lowered (``prlimit`` on the child) so
  that its connection cap (the limit minus FD_RESERVE) is nearly reached, then more
  connections than the cap: the excess is refused at once with ``rate_limited``, the
  process never runs out of descriptors, the sessions that were already authenticated
  keep working, and once the flood goes away new clients are served again.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import resource
import socket
import struct
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import trio

from conftest import WireClient, mint
from server_proc import ServerProcess, server_process
from tsmsg import FrameDecoder, encode
from tsmsg.server import http
from tsmsg.server.app import (
    ACCEPT_ERROR_LOG_EVERY_S,
    FD_RESERVE,
    accept_error_filter,
)

FLOOD = 2_000
FLOOD_HELLO_TIMEOUT_S = 4.0
FLOOD_AT_CAP = 40
# Rate limits per IP lifted: every connection comes from 127.0.0.1.
NO_IP_LIMITS = {
    "TSMSG_IP_CONNECT_RATE": "1000000",
    "TSMSG_IP_CONNECT_BURST": "1000000",
    "TSMSG_IP_LOGIN_FAIL_RATE": "1000000",
    "TSMSG_IP_LOGIN_FAIL_BURST": "1000000",
}
CHANNEL = "room-1"
# A hello frame cut in the middle of its body: the header declares the whole body.
HELLO = encode({"t": "hello", "rid": 1, "v": 1, "token": "x" * 200})
HALF_HELLO = HELLO[: len(HELLO) // 2]
assert struct.unpack(">I", HALF_HELLO[:4])[0] == len(HELLO) - 4


@contextmanager
def own_nofile_at_least(n: int) -> Iterator[None]:
    """This (test) process's soft RLIMIT_NOFILE raised to ``n`` for the block."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {n}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def set_child_nofile(server: ServerProcess, soft: int, hard: int | None = None) -> None:
    """The running server's RLIMIT_NOFILE (prlimit(2) on the child)."""
    assert server.proc is not None
    _, old_hard = resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(server.proc.pid, resource.RLIMIT_NOFILE, (soft, hard or old_hard))


def open_fds(server: ServerProcess) -> int:
    assert server.proc is not None
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


@asynccontextmanager
async def member(port: int, user: str) -> AsyncIterator[WireClient]:
    """A client past hello that joined ``CHANNEL``."""
    client = WireClient(await trio.open_tcp_stream("127.0.0.1", port))
    try:
        welcome = await client.request("hello", v=1, token=mint(user, [CHANNEL]))
        assert welcome["t"] == "welcome", welcome
        joined = await client.request("join", channel=CHANNEL)
        assert joined["t"] == "ok", joined
        yield client
    finally:
        await client.aclose()


class Sender:
    """Sends numbered messages from one client and checks every ack."""

    def __init__(self, client: WireClient, name: str) -> None:
        self.client, self.name = client, name
        self.cids = (f"{name}-{k}" for k in itertools.count())
        self.acked: list[int] = []
        self.worst_s = 0.0

    async def send(self) -> int:
        cid = next(self.cids)
        start = trio.current_time()
        ok = await self.client.request("send", channel=CHANNEL, cid=cid, text=cid)
        assert ok["t"] == "ok" and not ok["dup"], ok
        self.worst_s = max(self.worst_s, trio.current_time() - start)
        self.acked.append(ok["seq"])
        return int(ok["seq"])

    async def keep_sending(self, done: trio.Event, interval_s: float = 0.05) -> None:
        while not done.is_set():
            await self.send()
            await trio.sleep(interval_s)


# ---------------------------------------------------------------------- connection flood


async def flood_connection(port: int, n: int, opened: list[int], outcomes: list[str]) -> None:
    """One flood connection: silent (even ``n``) or half a hello (odd ``n``), then read
    until the server closes it; records what the server sent before closing."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    opened.append(n)
    try:
        if n % 2:
            await stream.send_all(HALF_HELLO)
        decoder, frames = FrameDecoder(), []
        while data := await stream.receive_some(65536):
            frames.extend(decoder.feed(data))
        codes = [f.get("code") for f in frames if f.get("t") == "error"]
        outcomes.append(",".join(codes) or "closed without error")
    except trio.BrokenResourceError:
        outcomes.append("reset")
    finally:
        await stream.aclose()


@pytest.mark.parametrize("ip_limits", [False, True], ids=["ip-limits-lifted", "ip-limits-default"])
async def test_flood_of_2000_connections_without_hello(tmp_path: Path, ip_limits: bool) -> None:
    """With the per-IP connection limit lifted every flood connection is accepted and
    held until its hello deadline; with the default limit (200/s, burst 400) most are
    refused at once with ``rate_limited``, the rest time out the same way."""
    need = FLOOD + 256
    env = {} if ip_limits else dict(NO_IP_LIMITS)
    env["TSMSG_HELLO_TIMEOUT_S"] = str(FLOOD_HELLO_TIMEOUT_S)
    with own_nofile_at_least(need):
        async with server_process(tmp_path / "data", tmp_path / "server.log", env=env) as server:
            set_child_nofile(server, max(need, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))
            base_fds = open_fds(server)
            async with member(server.port, "alice") as alice:
                sender = Sender(alice, "alice")
                await sender.send()
                opened: list[int] = []
                outcomes: list[str] = []
                peak_fds = 0
                done = trio.Event()
                with trio.fail_after(FLOOD_HELLO_TIMEOUT_S + 25):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(sender.keep_sending, done)
                        async with trio.open_nursery() as flood:
                            for n in range(FLOOD):
                                flood.start_soon(flood_connection, server.port, n, opened, outcomes)
                                if n % 100 == 99:
                                    await trio.sleep(0)
                            while len(outcomes) < FLOOD:
                                peak_fds = max(peak_fds, open_fds(server))
                                await trio.sleep(0.1)
                        done.set()
                # The healthy client, after the flood too.
                for _ in range(5):
                    await sender.send()
            assert server.proc is not None and server.proc.poll() is None, "the server died"
            with trio.fail_after(10):  # alice's close too
                while open_fds(server) > base_fds:
                    await trio.sleep(0.05)
        log = server.log()
    assert len(opened) == FLOOD
    timed_out, refused = outcomes.count("hello_timeout"), outcomes.count("rate_limited")
    if ip_limits:
        # The burst and the refill while the server drains its accept queue are accepted
        # (and time out); the rest are refused at once.
        assert timed_out + refused == FLOOD, sorted(set(outcomes))
        assert timed_out >= 400 and refused > 0, (timed_out, refused)
    else:
        # Every flood connection was closed by the hello deadline, with its error frame,
        # and they were open at the same time (each holds a server fd until then).
        assert timed_out == FLOOD, sorted(set(outcomes))
        assert peak_fds >= base_fds + FLOOD * 9 // 10, peak_fds
    assert sender.acked == list(range(1, len(sender.acked) + 1))
    assert sender.worst_s < 5.0
    assert log.count("hello_timeout") >= timed_out
    assert "Traceback" not in log
    print(
        f"flood: {FLOOD} connections ({timed_out} hello_timeout, {refused} rate_limited), "
        f"peak server fds {peak_fds} (base {base_fds}), "
        f"{len(sender.acked)} sends acked, slowest ack {sender.worst_s * 1000:.0f} ms"
    )


# ---------------------------------------------------------------------- FD exhaustion


async def test_fd_limit_caps_connections_and_keeps_serving_open_ones(tmp_path: Path) -> None:
    """The server's RLIMIT_NOFILE lowered (prlimit) so that its connection cap, the limit
    minus FD_RESERVE, is 4 with alice and bob connected; then 40 more connections. Two are
    served; the rest are refused at once with ``rate_limited`` (max_connections) and
    closed, so the process never runs out of descriptors (no EMFILE, nothing left
    unanswered in the accept queue) and alice and bob keep being served throughout."""
    cap = 4
    env = {**NO_IP_LIMITS, "TSMSG_HELLO_TIMEOUT_S": "60"}
    async with server_process(tmp_path / "data", tmp_path / "server.log", env=env) as server:
        async with member(server.port, "alice") as alice, member(server.port, "bob") as bob:
            sender = Sender(alice, "alice")
            await sender.send()
            base_fds = open_fds(server)
            set_child_nofile(server, FD_RESERVE + cap)
            outcomes: list[str] = []
            opened: list[int] = []
            with trio.fail_after(20):
                async with trio.open_nursery() as flood:
                    for n in range(FLOOD_AT_CAP):
                        flood.start_soon(flood_connection, server.port, n, opened, outcomes)
                    # Refused ones close at once: their outcomes arrive while the two
                    # served ones (silent, or half a hello) stay open.
                    while len(outcomes) < FLOOD_AT_CAP - 2:
                        await trio.sleep(0.05)
                    peak_fds = open_fds(server)
                    # Served throughout: acked, and pushed to bob.
                    for _ in range(5):
                        seq = await sender.send()
                        event = await bob.expect("event", channel=CHANNEL, seq=seq)
                        assert event["sender"] == "alice", event
                    flood.cancel_scope.cancel()
            assert outcomes.count("rate_limited") == FLOOD_AT_CAP - 2, sorted(set(outcomes))
            assert peak_fds <= base_fds + 2, (base_fds, peak_fds)
            assert server.proc is not None and server.proc.poll() is None
            with trio.fail_after(10):  # the flood's two are gone: a new client is served
                while open_fds(server) > base_fds:
                    await trio.sleep(0.05)
                async with member(server.port, "carol") as carol:
                    await Sender(carol, "carol").send()
        log = server.log()
    assert "EMFILE" not in log and "Traceback" not in log, log
    assert "the server is at its connection limit (4 connections)" in log
    print(
        f"fd limit {FD_RESERVE + cap}: cap {cap}, {FLOOD_AT_CAP} flood connections, "
        f"{outcomes.count('rate_limited')} refused at once, peak fds {peak_fds} "
        f"(base {base_fds}), {len(sender.acked)} sends acked"
    )


async def test_a_burst_at_the_cap_leaves_the_descriptor_reserve_alone(tmp_path: Path) -> None:
    """A burst of connections queued in the kernel at once, more than the descriptors
    kept in reserve, with room for two under the cap: the accept loop takes no more than
    the room while the cap is near, then one a round, each refused and closed before the
    next, so the process never runs out of descriptors."""
    cap, burst = 4, FD_RESERVE * 3
    env = {**NO_IP_LIMITS, "TSMSG_HELLO_TIMEOUT_S": "60"}
    async with server_process(tmp_path / "data", tmp_path / "server.log", env=env) as server:
        async with member(server.port, "alice") as alice, member(server.port, "bob"):
            sender = Sender(alice, "alice")
            await sender.send()
            base_fds = open_fds(server)
            set_child_nofile(server, FD_RESERVE + cap)
            queued = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(burst)]
            refused = 0
            try:  # (closed whatever happens: a failure here must not leak them into others)
                for sock in queued[cap - 2 :]:  # past the two served: answered and closed
                    sock.settimeout(10)
                    reply = sock.recv(4096)
                    while chunk := sock.recv(4096):
                        reply += chunk
                    assert b"rate_limited" in reply, reply
                    refused += 1
                # the last refused one's descriptor may close a moment after its EOF came
                with trio.move_on_after(5):
                    while open_fds(server) > base_fds + cap - 2:
                        await trio.sleep(0.01)
                assert open_fds(server) <= base_fds + cap - 2
            finally:
                for sock in queued:
                    sock.close()
            await sender.send()  # served throughout
        log = server.log()
    assert refused == burst - (cap - 2)
    assert "EMFILE" not in log, log


def test_accept_error_filter_folds_repeats_into_one_line_per_period() -> None:
    now = [100.0]
    folder = accept_error_filter(clock=lambda: now[0])

    def record() -> logging.LogRecord:
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            exc_info = sys.exc_info()
        return logging.LogRecord(
            "trio.serve_listeners",
            logging.ERROR,
            __file__,
            1,
            "accept returned %s (%s); retrying in %s seconds",
            ("EMFILE", "Too many open files", 0.1),
            exc_info,
        )

    first = record()
    assert folder.filter(first) and first.exc_info is None
    assert (
        first.getMessage()
        == "accept returned EMFILE (Too many open files); retrying in 0.1 seconds"
    )
    for _ in range(5):
        now[0] += 0.1
        assert not folder.filter(record())
    now[0] = 100.0 + ACCEPT_ERROR_LOG_EVERY_S
    later = record()
    assert folder.filter(later)
    assert later.getMessage().endswith("seconds (5 similar messages suppressed in the last 10 s)")


async def test_the_http_endpoints_fit_in_the_descriptor_reserve(tmp_path: Path) -> None:
    """The operator endpoints' connections come out of the descriptors kept in reserve
    (FD_RESERVE: the store, logs, the HTTP endpoints): with the server at its connection
    cap and every HTTP connection it serves held open by a silent client (and more
    knocking), the process does not run out of descriptors, and a connection over the
    cap is still refused at once with ``rate_limited``."""
    cap = 4
    env = {**NO_IP_LIMITS, "TSMSG_HELLO_TIMEOUT_S": "60"}
    args = ("--metrics", "127.0.0.1:0")
    async with server_process(tmp_path / "data", tmp_path / "server.log", *args, env=env) as server:
        metrics_line = re.compile(r"health checks on http://127\.0\.0\.1:(\d+)/")
        with trio.move_on_after(10):  # logged just after "serving on", which start() waits for
            while (match := metrics_line.search(server.log())) is None:
                await trio.sleep(0.01)
        assert match is not None, server.log()
        http_port = int(match.group(1))
        async with member(server.port, "alice") as alice, member(server.port, "bob"):
            sender = Sender(alice, "alice")
            await sender.send()
            base_fds = open_fds(server)
            set_child_nofile(server, FD_RESERVE + cap)
            held: list[socket.socket] = []
            try:
                # Silent HTTP clients (each held until its READ_TIMEOUT_S), more than served.
                for _ in range(http.MAX_CONNECTIONS + 8):
                    held.append(socket.create_connection(("127.0.0.1", http_port)))
                served = base_fds + http.MAX_CONNECTIONS
                with trio.move_on_after(2):  # until the server took them (or ran out)
                    while open_fds(server) < served and "EMFILE" not in server.log():
                        await trio.sleep(0.01)
                # The cap's other two: silent chat connections.
                for _ in range(cap - 2):
                    held.append(socket.create_connection(("127.0.0.1", server.port)))
                late = WireClient(await trio.open_tcp_stream("127.0.0.1", server.port))
                try:
                    with trio.fail_after(http.READ_TIMEOUT_S / 2):  # before any HTTP one goes
                        reply = await late.next()
                    assert reply["code"] == "rate_limited", reply
                    assert "connection limit (4 connections)" in str(reply["message"]), reply
                finally:
                    await late.aclose()
                await sender.send()  # served throughout
            finally:
                for sock in held:
                    sock.close()
        log = server.log()
    assert "EMFILE" not in log, log
