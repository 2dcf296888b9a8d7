"""The server's poller (server/poller.py): idle plain TCP connections are read by one epoll
loop and their frames handled without waking their reader tasks; a task takes over
whenever there is something to await. First the Poller with plain sockets, then the
server over real TCP, where every hand-over must keep the replies' order and content."""

from __future__ import annotations

import gc
import logging
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import (
    TRANSPORTS,
    Harness,
    WireClient,
    fast_limits,
    make_settings,
    mint,
    running_server,
)
from tsmsg.server.poller import YIELD_EVERY_S, Poller
from tsmsg.server.wire import RECEIVE_CHUNK, FdReceive
from tsmsg.store.base import HistoryPage, SyncPage

ROOM = "room"


async def test_a_connections_first_read_is_tried_before_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FdReceive reads a new connection's input at once (a client's hello is mostly there
    when the server reads); waits for the fd first when told the peer waits (``drained``,
    after a WebSocket's 101), and after a read that emptied the socket."""
    waits: list[int] = []
    wait_readable = trio.lowlevel.wait_readable

    async def counted(fd: int) -> None:
        waits.append(fd)
        await wait_readable(fd)

    monkeypatch.setattr(trio.lowlevel, "wait_readable", counted)
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        b.send(b"hello")
        assert await FdReceive(a.fileno())() == b"hello"
        assert waits == []  # there already: no wait
        b.send(b"again")
        receive = FdReceive(a.fileno(), drained=True)
        assert await receive() == b"again"
        assert waits == [a.fileno()]
        fresh = FdReceive(a.fileno())
        with trio.move_on_after(0.05):  # nothing there: the read fails, then it waits
            await fresh()
        assert waits == [a.fileno()] * 2
        b.send(b"late")
        assert await fresh() == b"late"


class Recorder:
    """A Reader that keeps what it was given and hands back when ``keep`` says so."""

    def __init__(self, name: str, log: list[tuple[str, int]], keep: int = 10**9) -> None:
        self.name, self.log, self.keep = name, log, keep

    def input(self, data: bytes | OSError) -> bool:
        assert isinstance(data, bytes)
        self.log.append((self.name, len(data)))
        self.keep -= 1
        return bool(data) and self.keep > 0


Pair = tuple[socket.socket, socket.socket]


@asynccontextmanager
async def sockets(n: int) -> AsyncIterator[tuple[Poller, trio.Nursery, list[Pair]]]:
    """``n`` socket pairs (the first of each non-blocking) and a Poller, not yet running,
    with a nursery that is cancelled at the end; all of them closed afterwards."""
    poller, pairs = Poller(), [socket.socketpair() for _ in range(n)]
    for a, _ in pairs:
        a.setblocking(False)
    try:
        async with trio.open_nursery() as nursery:
            yield poller, nursery, pairs
            nursery.cancel_scope.cancel()
    finally:
        poller.close()
        for a, b in pairs:
            a.close()
            b.close()


async def test_parked_socket_is_read_by_the_poller_until_input_hands_it_back() -> None:
    log: list[tuple[str, int]] = []
    resumed = trio.Event()
    async with sockets(1) as (poller, nursery, [(a, b)]):

        async def task() -> None:
            await poller.park(a.fileno(), Recorder("a", log, keep=2))
            resumed.set()

        nursery.start_soon(poller.run)
        nursery.start_soon(task)
        await trio.testing.wait_all_tasks_blocked()
        assert len(poller) == 1
        b.send(b"x" * 10)
        await trio.testing.wait_all_tasks_blocked()
        assert log == [("a", 10)] and not resumed.is_set() and len(poller) == 1
        b.send(b"y" * 3)
        with trio.fail_after(5):
            await resumed.wait()
        assert log == [("a", 10), ("a", 3)] and len(poller) == 0
        b.send(b"z")  # no longer parked: the poller leaves it to its task
        await trio.testing.wait_all_tasks_blocked()
        assert log == [("a", 10), ("a", 3)] and a.recv(10) == b"z"


async def test_cancelled_park_unregisters_so_the_fd_can_park_again() -> None:
    log: list[tuple[str, int]] = []
    async with sockets(1) as (poller, nursery, [(a, b)]):
        nursery.start_soon(poller.run)
        for round_ in range(3):  # registering a registered fd would fail (EEXIST)
            with trio.move_on_after(0.05):
                await poller.park(a.fileno(), Recorder(f"r{round_}", log))
            assert len(poller) == 0
        b.send(b"late")  # nobody is parked: not read
        await trio.testing.wait_all_tasks_blocked()
        assert log == [] and a.recv(10) == b"late"


async def test_one_read_per_ready_socket_per_round() -> None:
    """A socket with more than one read's worth waiting does not hold the others back:
    each round reads every ready socket once, and the big one's rest comes later."""
    log: list[tuple[str, int]] = []
    async with sockets(2) as (poller, nursery, [(big, big_peer), (small, small_peer)]):
        big_peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * RECEIVE_CHUNK)
        big.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * RECEIVE_CHUNK)
        nursery.start_soon(poller.park, big.fileno(), Recorder("big", log))
        nursery.start_soon(poller.park, small.fileno(), Recorder("small", log))
        await trio.testing.wait_all_tasks_blocked()
        big_peer.sendall(b"b" * (3 * RECEIVE_CHUNK))
        small_peer.send(b"s")
        nursery.start_soon(poller.run)
        with trio.fail_after(5):
            while sum(n for name, n in log if name == "big") < 3 * RECEIVE_CHUNK:
                await trio.sleep(0.001)
        names = [name for name, _ in log]
        assert names.index("small") < 2, log  # in the first round, beside big's first read
        assert all(n <= RECEIVE_CHUNK for _, n in log)


class Busy:
    """A Reader whose peer keeps sending (its socket is ready again after every read) and
    whose every read takes ``cost`` seconds of CPU; it never hands back."""

    def __init__(self, name: str, log: list[tuple[str, int]], peer: socket.socket) -> None:
        self.name, self.log, self.peer = name, log, peer

    def input(self, data: bytes | OSError) -> bool:
        assert isinstance(data, bytes)
        self.log.append((self.name, len(data)))
        end = time.perf_counter() + YIELD_EVERY_S / 3
        while time.perf_counter() < end:
            pass
        self.peer.send(b"m" * 100)
        return True


async def test_a_round_cut_short_goes_on_with_the_sockets_it_did_not_reach() -> None:
    """Four always-ready sockets whose reads take a third of YIELD_EVERY_S each cut every
    round after their own reads; level-triggered epoll reports them first every time, so
    the four quiet sockets behind them must be taken from the cut round's rest, or they
    would never be read (a review found that)."""
    log: list[tuple[str, int]] = []
    async with sockets(8) as (poller, nursery, pairs):
        for i, (a, b) in enumerate(pairs):
            reader = Busy(f"busy{i}", log, b) if i < 4 else Recorder(f"quiet{i}", log)
            nursery.start_soon(poller.park, a.fileno(), reader)
        await trio.testing.wait_all_tasks_blocked()
        for _, b in pairs:
            b.send(b"x" * 100)
        nursery.start_soon(poller.run)
        quiet = {f"quiet{i}" for i in range(4, 8)}
        with trio.fail_after(5):
            while {name for name, _ in log if name.startswith("quiet")} != quiet:
                await trio.sleep(0.01)


# --- the real server, over TCP and WebSocket -------------------------------------------------


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def wire(client: WireClient, *frames: dict[str, Any]) -> bytes:
    """Frames as the client's transport puts them on the wire, in one piece."""
    return b"".join(client.framing.encode(f) for f in frames)


async def parked(harness: Harness, n: int) -> None:
    """Wait until ``n`` connections are parked in the server's poller."""
    poller = harness.server.poller
    assert poller is not None
    with trio.fail_after(5):
        while len(poller) != n:
            await trio.sleep(0.005)


async def joined(harness: Harness, user: str) -> WireClient:
    client = await harness.connect(user)
    assert (await client.request("join", channel=ROOM))["t"] == "ok"
    return client


async def test_idle_connections_past_hello_are_parked_and_closed_ones_leave(
    harness: Harness,
) -> None:
    before_hello = await harness.raw()
    with trio.fail_after(5):
        while not harness.server.connections:  # its session exists: it is being read
            await trio.sleep(0.005)
    await trio.sleep(0.05)
    await parked(harness, 0)  # a hello has a deadline: its task reads it
    alice = await joined(harness, "alice")
    bob = await joined(harness, "bob")
    await parked(harness, 2)
    assert (await alice.request("ping"))["t"] == "pong"
    await parked(harness, 2)  # answered by the poller, parked still (or again)
    await bob.aclose()
    await parked(harness, 1)
    carol = await joined(harness, "carol")  # may reuse bob's fd number
    await parked(harness, 2)
    assert (await carol.request("ping"))["t"] == "pong"
    welcome = await before_hello.request("hello", v=1, token=mint("dave", ("*",)))
    assert welcome["t"] == "welcome"
    await parked(harness, 3)


async def test_one_write_with_a_read_amid_sends_is_answered_in_order(harness: Harness) -> None:
    """send, history (a store read: the task takes over), send, ping in one write. The
    connection handles its frames in order, one at a time (PROTOCOL.md 16.1), so the history's
    reply precedes the later send's ok and the pong, and cannot hold the later send; the
    connection parks again afterwards."""
    alice = await joined(harness, "alice")
    await parked(harness, 1)
    burst = [
        {"t": "send", "rid": 101, "channel": ROOM, "cid": "c1", "text": "one"},
        {"t": "history", "rid": 102, "channel": ROOM},
        {"t": "send", "rid": 103, "channel": ROOM, "cid": "c2", "text": "two"},
        {"t": "ping", "rid": 104},
    ]
    await alice.send_raw(wire(alice, *burst))
    replies = {}
    while len(replies) < 4:
        reply = await alice.next(lambda f: f.get("rid") in (101, 102, 103, 104))
        replies[reply["rid"]] = reply
    order = list(replies)
    assert order.index(102) < min(order.index(103), order.index(104)), order
    assert (replies[101]["seq"], replies[103]["seq"]) == (1, 2)
    assert [m["text"] for m in replies[102]["messages"]] in ([], ["one"])
    assert replies[104]["t"] == "pong"
    await parked(harness, 1)


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 9])
async def test_a_frame_split_across_writes_after_hello_is_answered(
    harness: Harness, cut: int
) -> None:
    """The poller reads a partial frame, hands the connection to its task (the frame's
    deadline), which reads the rest; then it parks again."""
    alice = await joined(harness, "alice")
    await parked(harness, 1)
    data = wire(
        alice,
        {"t": "send", "rid": 7, "channel": ROOM, "cid": f"split-{cut}", "text": "x"},
        {"t": "ping", "rid": 8},
    )
    await alice.send_raw(data[:cut])
    await parked(harness, 0)
    await trio.sleep(0.02)
    await alice.send_raw(data[cut:])
    ok = await alice.next(lambda f: f.get("rid") == 7)
    assert ok["t"] == "ok" and ok["seq"] == 1, ok
    assert (await alice.next(lambda f: f.get("rid") == 8))["t"] == "pong"
    await parked(harness, 1)


async def test_eof_while_parked_still_acknowledges_and_stores(harness: Harness) -> None:
    """A send and the peer's EOF in one go: the send is stored (the store answers it
    after the reader ended) and another member gets its event."""
    alice = await joined(harness, "alice")
    bob = await joined(harness, "bob")
    await parked(harness, 2)
    await alice.send_raw(
        wire(alice, {"t": "send", "rid": 5, "channel": ROOM, "cid": "last", "text": "bye"})
    )
    await alice.stream.send_eof()
    ok = await alice.next(lambda f: f.get("rid") == 5)
    assert ok["t"] == "ok"
    event = await bob.expect("event", seq=ok["seq"])
    assert event["text"] == "bye"
    assert await alice.closed()


async def test_frames_handed_to_the_task_are_charged_when_they_were_read(
    tmp_path: Path,
) -> None:
    """PROTOCOL.md 16.1: a pipelined burst is charged when it was read, however long
    handling its first frames takes. 30 frames in one write, a slow store read (0.5 s)
    among them, with a full bucket of 20 at 10 frames/s: exactly 10 are refused. Charged
    after the read (the bucket refilled by 5 meanwhile), only ~5 would be."""
    settings = make_settings(tmp_path / "data", limits=fast_limits(frame_rate=10, frame_burst=20))
    async with running_server(settings) as h:
        alice = await joined(h, "alice")
        await parked(h, 1)
        await trio.sleep(0.3)  # the join's token back: a full bucket
        reads = h.server.reads
        assert reads is not None
        real_read = reads.run

        async def slow_read(query: Any) -> Any:
            await trio.sleep(0.5)
            return await real_read(query)

        reads.run = slow_read  # type: ignore[method-assign]
        burst: list[dict[str, Any]] = [{"t": "ping", "rid": 100 + i} for i in range(18)]
        burst.append({"t": "history", "rid": 118, "channel": ROOM})
        burst += [{"t": "ping", "rid": 119 + i} for i in range(11)]
        await alice.send_raw(wire(alice, *burst))
        replies = [await alice.next(lambda f, r=r: f.get("rid") == r) for r in range(100, 130)]
        refused = [f["rid"] for f in replies if f.get("code") == "rate_limited"]
        assert refused == list(range(120, 130)), refused


async def test_an_idle_connection_keeps_no_reply_of_its_last_read(harness: Harness) -> None:
    """Memory per idle connection: once a read's reply (a history page here) is sent, no
    page object outlives it, though the connection idles (a compiled coroutine that kept
    its finished callee's locals would keep it: tsmsg/compiled.py)."""
    alice = await joined(harness, "alice")
    for i in range(5):
        await alice.request("send", channel=ROOM, cid=f"c{i}", text="x" * 1000)
    page = await alice.request("history", channel=ROOM, limit=5)
    assert len(page["messages"]) == 5
    await parked(harness, 1)
    gc.collect()
    pages = [o for o in gc.get_objects() if isinstance(o, (HistoryPage, SyncPage))]
    assert pages == []


async def test_an_idle_connection_keeps_no_input_after_a_hand_over(harness: Harness) -> None:
    """After the task went on from a hand-over (a store read amid 20 sends of 3,000
    bytes) and parked again, its reader holds none of those frames (memory per idle
    connection)."""
    alice = await joined(harness, "alice")
    await parked(harness, 1)
    burst: list[dict[str, Any]] = [{"t": "history", "rid": 1, "channel": ROOM}]
    burst += [
        {"t": "send", "rid": 2 + i, "channel": ROOM, "cid": f"c{i}", "text": "x" * 3000}
        for i in range(20)
    ]
    await alice.send_raw(wire(alice, *burst))
    for rid in range(1, 22):
        await alice.next(lambda f, rid=rid: f.get("rid") == rid)
    await parked(harness, 1)
    # No list or tuple anywhere (the reader's locals included, compiled or not) holds
    # the server's decoded sends: only the test's own burst has 20.
    held = [
        type(o).__name__
        for o in gc.get_objects()
        if isinstance(o, (list, tuple))
        and o is not burst
        and sum(type(f) is dict and f.get("t") == "send" for f in o) >= 20
    ]
    assert not held, held


async def test_a_reset_while_parked_is_a_lost_peer_and_the_rest_go_on(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The poller's read fails (ECONNRESET): the connection ends as a lost peer, not an
    internal error, it leaves the poller, and the others are still served."""
    alice = await joined(harness, "alice")
    bob = await joined(harness, "bob")
    await parked(harness, 2)
    sock = bob.stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await bob.send({"t": "ping", "rid": 1})  # unread by the server when the reset comes
    sock.close()  # linger 0: a reset
    await parked(harness, 1)
    assert (await alice.request("ping"))["t"] == "pong"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
