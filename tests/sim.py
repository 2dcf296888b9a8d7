"""Deterministic simulation of tsmsg (FoundationDB style): one seed decides everything.

The real server (:class:`tsmsg.server.app.Server` with its sessions and hub) and real
clients (the reference client's sans-IO :class:`~tsmsg.client.protocol.ClientProtocol`)
run in one process, in one ``trio.run`` under trio's ``MockClock`` (autojump: virtual time
jumps whenever every task waits, so a minute of chat takes a fraction of a second). What
would be I/O is simulated and driven by one ``random.Random(seed)``:

- the network: each connection is a pair of :class:`Pipe` objects (one per direction)
  with a window (a writer blocks while that many bytes are unread: TCP backpressure, so
  slow consumers are cut), random delivery delays and random chunking (frames arrive in
  pieces, reads return partial data), resets and closes;
- the store: a :class:`~tsmsg.store.memory_store.MemoryStore` on one
  :class:`~tsmsg.store.memory_store.MemoryData` that outlives servers, whose batches the
  simulation commits after a random latency, in random sizes, sometimes failing a batch
  (``store_unavailable``, as a full disk does);
- faults: connection resets, clients that stop reading for a while, server crashes
  (connections reset, uncommitted writes lost, the server task cancelled) and graceful
  restarts, each followed by a new Server on the same store state;
- the workload: clients (several users, some with two devices) join channels, send
  (and resend acked and pending cids), edit, delete, read, fetch history, type, set and
  ask presence, count unread; the app side takes events at its own pace, so client-side
  queues stall and catch up by sync.

trio's own scheduler randomness is seeded too: trio reverses or shuffles each batch of
runnable tasks with its private ``trio._core._run._r``; :func:`seed_trio` turns on its
``_ALLOW_DETERMINISTIC_SCHEDULING`` mode (batches sorted by task creation, then shuffled
by ``_r``, as trio does under Hypothesis) and seeds ``_r``. That private API is checked
against the trio versions this was verified with (:data:`TRIO_VERIFIED`); the determinism
test (tests/test_sim.py: same seed twice, and in a subprocess with another
PYTHONHASHSEED, gives the same trace hash) is the real guard.

Invariants, checked as events happen and at the end (after the faults stop and every
client has caught up): every acked message is in the log exactly once at its acked seq
with its id; no (channel, sender, cid) is stored twice and a dup answer names the first
seq; seqs are dense; acked edits and deletes are at their seqs; message entries hold the
state their edits and deletes give them; each client's event stream per channel is
gap-free, duplicate-free and ordered and, after catch-up, equals the log; read cursors
and read receipts never move back; every send is acked in the end; no ``internal``
error reaches a client and nothing is logged at ERROR.

Run: ``make sim SEED=123`` (one seed, its trace on failure), ``make sim`` (SIM_SEEDS
random seeds), or ``python tests/sim.py --help``.
"""

from __future__ import annotations

import argparse
import collections
import errno
import hashlib
import itertools
import logging
import math
import random
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Any

import trio
import trio.testing

from tsmsg._native import FrameDecoder
from tsmsg.auth import TokenIssuer, TokenVerifier
from tsmsg.client.events import (
    Ack,
    ConnectionChanged,
    Delete,
    Edit,
    JoinInfo,
    Left,
    Message,
    Presence,
    ReadReceipt,
    Resynced,
    Typing,
)
from tsmsg.client.protocol import (
    ClientProtocol,
    Completed,
    Disconnect,
    Failed,
    FollowChanged,
    HelloFailed,
    NeedToken,
    Output,
    Phase,
    SendCompleted,
    Welcomed,
)
from tsmsg.protocol.limits import Limits
from tsmsg.server.app import Server
from tsmsg.server.settings import Settings
from tsmsg.store import AppendResult, WriteOp
from tsmsg.store.memory_store import MemoryData, MemoryStore

SECRET = b"simulation-secret-simulation-secret!"
BASE_MS = 1_800_000_000_000  # the simulated wall clock at virtual time 0
TRIO_VERIFIED = ((0, 25), (0, 32))  # trio versions whose scheduler internals were checked
# After the faults the clients must catch up: each must keep moving (a client none of
# whose streams advanced for QUIESCE_STALL_S is stuck), within QUIESCE_LIMIT_S in all (a config
# with 2-entry sync pages and a slow network takes minutes of virtual time to replay).
QUIESCE_STALL_S = 120.0
QUIESCE_LIMIT_S = 3600.0
TRACE_TAIL = 150  # lines of the trace printed with a failure (the whole trace: --verbose)


class SimFailure(AssertionError):
    """An invariant broke."""


# ----------------------------------------------------------------------------- trio


def seed_trio(seed: int) -> None:
    """Make trio's scheduler deterministic and seed it (private API, see the module doc).

    trio (verified for 0.25 to 0.32) keeps ``_r = random.Random()`` in
    ``trio._core._run`` and, per batch of runnable tasks, either reverses it at random or,
    with ``_ALLOW_DETERMINISTIC_SCHEDULING`` (set by its Hypothesis plugin), sorts the
    batch by task creation order and shuffles it with ``_r``. Sorting first matters here:
    the order in which tasks are woken need not be reproducible (the server's own
    connection sets are: a connection hashes by its serial), but the sorted batch is."""
    from trio._core import _run

    version = tuple(int(p) for p in trio.__version__.split(".")[:2])
    lo, hi = TRIO_VERIFIED
    if not lo <= version <= hi:
        raise RuntimeError(
            f"trio {trio.__version__} is outside the versions whose scheduler internals the "
            f"simulation was verified with ({lo} to {hi}); check trio._core._run (the batch "
            "shuffle, _r, _ALLOW_DETERMINISTIC_SCHEDULING), run tests/test_sim.py's "
            "determinism test, then widen TRIO_VERIFIED in tests/sim.py"
        )
    if not isinstance(getattr(_run, "_r", None), random.Random) or not hasattr(
        _run, "_ALLOW_DETERMINISTIC_SCHEDULING"
    ):
        raise RuntimeError("trio._core._run has no _r / _ALLOW_DETERMINISTIC_SCHEDULING")
    _run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    _run._r.seed(seed)


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SimConfig:
    """Everything a seed draws before the run starts."""

    users: int
    devices: tuple[int, ...]  # devices per user
    channels: tuple[str, ...]
    duration_s: float  # virtual seconds of workload and faults
    think_s: float  # mean pause between a client's actions
    net_delay_s: float  # mean delivery delay of a chunk
    net_spike: float  # chance of a long delivery delay
    window: int  # bytes a pipe holds before the writer waits
    store_latency_s: float  # mean wait before a commit
    commit_fail: float  # chance that a commit fails
    fault_every_s: float  # mean time between faults
    max_queue_bytes: int
    heartbeat_ms: int
    sync_default: int
    max_queued: int  # client: events of a channel waiting for the app before it stalls

    @classmethod
    def draw(cls, rng: random.Random) -> SimConfig:
        users = rng.randint(2, 3)
        return cls(
            users=users,
            devices=tuple(rng.choice((1, 1, 2)) for _ in range(users)),
            channels=tuple(f"room-{i}" for i in range(rng.randint(1, 3))),
            duration_s=rng.uniform(5, 20),
            think_s=rng.choice((0.05, 0.2, 0.5)),
            net_delay_s=rng.choice((0.0005, 0.005, 0.05)),
            net_spike=rng.choice((0.0, 0.01, 0.05)),
            window=rng.choice((256, 4096, 1 << 16)),
            store_latency_s=rng.choice((0.0, 0.002, 0.02, 0.2)),
            commit_fail=rng.choice((0.0, 0.0, 0.02, 0.1)),
            fault_every_s=rng.choice((1.0, 3.0, 8.0)),
            max_queue_bytes=rng.choice((4 << 20, 8192, 2048)),
            heartbeat_ms=rng.choice((2_000, 5_000, 30_000)),
            sync_default=rng.choice((2, 10, 500)),
            max_queued=rng.choice((4, 50, 1000)),
        )


# ----------------------------------------------------------------------------- network


class Pipe:
    """One direction of a simulated TCP connection: bytes written and still in the
    network (``wire``), then arrived and not yet read (``ready``)."""

    def __init__(self, name: str, window: int) -> None:
        self.name = name
        self.window = window
        self.wire = bytearray()
        self.ready = bytearray()
        self.fin = False  # the writer closed: EOF once the wire is empty
        self.fin_arrived = False
        self.reset = False  # RST: reads and writes fail
        self.reader_gone = False  # the reading side closed: writes fail
        self.lot = trio.lowlevel.ParkingLot()

    def wake(self) -> None:
        self.lot.unpark_all()


class FakeSocket:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer

    def getpeername(self) -> tuple[str, int]:
        return self.peer


class SimStream(trio.abc.Stream):
    """One end of a simulated connection (what the server takes for a SocketStream: it
    only asks its ``socket`` for the peer's address)."""

    def __init__(self, net: Network, out: Pipe, inp: Pipe, peer: tuple[str, int]) -> None:
        self.net = net
        self.out = out
        self.inp = inp
        self.socket = FakeSocket(peer)
        self.closed = False

    def _check_send(self) -> None:
        if self.closed:
            raise trio.ClosedResourceError("stream closed")
        if self.out.reset or self.out.reader_gone:
            raise trio.BrokenResourceError("connection reset by peer")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self._check_send()
        self.out.wire += data
        self.out.wake()
        while len(self.out.wire) + len(self.out.ready) > self.out.window:
            await self.out.lot.park()  # the peer's window is full: a partial write
            self._check_send()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    def try_send(self, data: bytes) -> int:
        """The server's non-blocking write (``tsmsg.server.app.try_send_of``): what fits
        in the peer's window, at random less; BlockingIOError when nothing fits."""
        if self.closed:
            raise OSError(errno.EBADF, "stream closed")
        if self.out.reset or self.out.reader_gone:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        room = self.out.window - len(self.out.wire) - len(self.out.ready)
        if room <= 0:
            raise BlockingIOError(errno.EAGAIN, "window full")
        n = min(room, len(data))
        if n > 1 and self.net.rng.random() < 0.2:
            n = self.net.rng.randint(1, n)  # a short write
        self.out.wire += data[:n]
        self.out.wake()
        return n

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        while True:
            if self.closed:
                raise trio.ClosedResourceError("stream closed")
            if self.inp.reset:
                raise trio.BrokenResourceError("connection reset by peer")
            if self.inp.ready:
                n = len(self.inp.ready) if max_bytes is None else max_bytes
                if self.net.rng.random() < 0.2:
                    n = self.net.rng.randint(1, n)  # a short read
                chunk = bytes(self.inp.ready[:n])
                del self.inp.ready[:n]
                self.inp.wake()  # room in the window
                return chunk
            if self.inp.fin_arrived:
                return b""
            await self.inp.lot.park()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.out.fin = True
            self.inp.reader_gone = True
            self.out.wake()
            self.inp.wake()
        await trio.lowlevel.checkpoint()


@dataclass
class SimConn:
    name: str
    client_end: SimStream
    server_end: SimStream

    def reset(self) -> None:
        for pipe in (self.client_end.out, self.client_end.inp):
            pipe.reset = True
            pipe.wake()


class SimListener(trio.abc.Listener[SimStream]):
    def __init__(self) -> None:
        self.queue: collections.deque[SimConn] = collections.deque()
        self.lot = trio.lowlevel.ParkingLot()
        self.closed = False

    async def accept(self) -> SimStream:
        await trio.lowlevel.checkpoint()
        while not self.queue:
            await self.lot.park()
        return self.queue.popleft().server_end

    async def aclose(self) -> None:
        self.closed = True
        for conn in self.queue:
            conn.reset()  # connected, never accepted
        self.queue.clear()
        await trio.lowlevel.checkpoint()


class Network:
    def __init__(self, sim: Sim) -> None:
        self.sim = sim
        self.rng = sim.rng
        self.listener: SimListener | None = None
        self.conns: list[SimConn] = []
        self._ports = itertools.count(40000)

    def connect(self, client: SimClient) -> SimConn:
        listener = self.listener
        if listener is None or listener.closed:
            raise ConnectionRefusedError("no server listening")
        port = next(self._ports)
        name = f"{client.name}:{port}"
        window = self.sim.cfg.window
        up, down = Pipe(f"{name}>", window), Pipe(f"{name}<", window)
        conn = SimConn(
            name,
            SimStream(self, up, down, ("server", 7700)),
            SimStream(self, down, up, (client.host, port)),
        )
        self.conns.append(conn)
        self.sim.nursery.start_soon(self.pump, up)
        self.sim.nursery.start_soon(self.pump, down)
        listener.queue.append(conn)
        listener.lot.unpark_all()
        return conn

    def delay(self) -> float:
        cfg = self.sim.cfg
        if self.rng.random() < cfg.net_spike:
            return self.rng.uniform(0.2, 3.0)
        return self.rng.expovariate(1 / cfg.net_delay_s)

    async def pump(self, pipe: Pipe) -> None:
        """Deliver the pipe's bytes in random chunks after random delays, then its EOF."""
        while True:
            while not pipe.wire and not pipe.fin and not pipe.reset:
                await pipe.lot.park()
            await trio.sleep(self.delay())
            if pipe.reset:
                return
            if not pipe.wire:
                pipe.fin_arrived = True
                pipe.wake()
                return
            n = len(pipe.wire) if self.rng.random() < 0.5 else self.rng.randint(1, len(pipe.wire))
            pipe.ready += pipe.wire[:n]
            del pipe.wire[:n]
            pipe.wake()


# ----------------------------------------------------------------------------- store


class SimStore(MemoryStore):
    """The memory store whose batches the simulation commits (see Sim.committer)."""

    def __init__(self, sim: Sim, notify: Any) -> None:
        super().__init__(sim.data, notify=notify, clock=sim.now_ms, autocommit=False)
        self.sim = sim

    def submit(self, *ops: WriteOp) -> None:
        super().submit(*ops)
        self.sim.store_lot.unpark_all()

    def commit(self, most: int | None = None, *, fail: str | None = None) -> list[WriteOp]:
        """Every commit is recorded, the committer's and those of close() (a graceful
        stop commits what is pending: its writes are stored, their acks may be lost)."""
        batch = super().commit(most, fail=fail)
        for op in batch:
            self.sim.observe(op)
        return batch


# ----------------------------------------------------------------------------- clients


@dataclass
class Stream:
    """What one client's app has taken of one channel."""

    start: int | None = None  # head of the first Resynced (None: none yet)
    last: int = 0
    entries: list[tuple[int, str, str, str]] = field(default_factory=list)  # seq kind id sender


class SimClient:
    def __init__(self, sim: Sim, index: int, user: str, device: int) -> None:
        self.sim = sim
        self.name = f"c{index}"
        self.user = user
        self.host = f"10.0.0.{index + 1}"
        self.token = TokenIssuer(SECRET).issue(
            user, ["*"], ttl_s=7 * 24 * 3600, now=BASE_MS // 1000
        )
        self.proto = ClientProtocol(max_queued=sim.cfg.max_queued)
        self.rng = sim.rng
        self.conn: SimConn | None = None
        self.changed = trio.Event()
        self.paused = False
        self.resume = trio.Event()
        self.handles: dict[int, tuple[str, Any]] = {}  # app requests waiting: kind, detail
        self.cids = itertools.count(1)
        self.sent: dict[str, tuple[str, str]] = {}  # cid -> (channel, text)
        self.acked: dict[str, Ack] = {}
        self.streams: dict[str, Stream] = {}
        self.read_replies: dict[str, int] = {}
        self.receipts: dict[tuple[str, str], int] = {}
        self.joined: list[str] = []
        self.active = True  # the workload runs
        self.pushed: dict[str, int] = {}  # this connection: channel -> seq of its last event

    def log(self, msg: str) -> None:
        self.sim.log(f"{self.name} {msg}")

    def kick(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def fail(self, msg: str) -> None:
        self.sim.fail(f"{self.name} ({self.user}): {msg}")

    # ---- connection

    async def run(self) -> None:
        while True:
            try:
                conn = self.sim.net.connect(self)
            except ConnectionRefusedError:
                self.log("connect refused")
                await trio.sleep(self.rng.uniform(0.05, 1.0))
                continue
            self.conn = conn
            self.log(f"connect {conn.name}")
            reason = await self.connection(conn.client_end)
            self.conn = None
            self.log(f"lost: {reason}")
            self.handle(self.proto.connection_lost(reason, self.sim.now_ms()))
            with trio.CancelScope(shield=True):
                await conn.client_end.aclose()
            await trio.sleep(self.rng.uniform(0.01, 0.5))

    async def connection(self, stream: SimStream) -> str:
        """Run one connection: a reader, a writer and the protocol's timers."""
        self.proto.connection_made(self.token, self.sim.now_ms())
        self.pushed = {}
        reasons: list[str] = []
        async with trio.open_nursery() as nursery:

            def end(reason: str) -> None:
                reasons.append(reason)
                nursery.cancel_scope.cancel()

            nursery.start_soon(self.writer, stream, end)
            nursery.start_soon(self.timer, end)
            nursery.start_soon(self.reader, stream, end)
        return reasons[0] if reasons else "closed"

    async def writer(self, stream: SimStream, end: Any) -> None:
        while True:
            data = self.proto.data_to_send()
            if data:
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    end(f"write failed ({exc})")
                    return
                continue
            await self.changed.wait()

    async def timer(self, end: Any) -> None:
        while True:
            due = self.proto.next_deadline()
            changed = self.changed
            if due is None:
                await changed.wait()
                continue
            with trio.move_on_at((due - BASE_MS) / 1000):
                await changed.wait()
            now = self.sim.now_ms()
            if now >= due:
                if self.handle(self.proto.tick(now)):
                    end("client timer: disconnect")
                    return
                self.kick()

    async def reader(self, stream: SimStream, end: Any) -> None:
        decoder = FrameDecoder()
        while True:
            if self.paused:
                await self.resume.wait()
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                end(f"reset ({exc})")
                return
            if not data:
                end("eof")
                return
            for frame in decoder.feed(data):
                self.trace_frame(frame)
                self.check_frame(frame)
                outputs = self.proto.receive_frame(frame, self.sim.now_ms())
                if self.handle(outputs):
                    end("client disconnect")
                    return
            self.kick()

    def check_frame(self, f: dict[str, Any]) -> None:
        """What the server owes one connection, whatever the client does with it: no
        ``internal`` errors, and a channel's live events in seq order without a gap
        (the client would mend a gap by sync: that must not hide a lost event) except
        across a ``resync`` push (a slow consumer's cut stream)."""
        t, channel = f.get("t"), f.get("channel")
        if t == "error" and f.get("code") == "internal":
            self.fail(f"internal error from the server: {f}")
        elif t == "event" and isinstance(channel, str):
            last = self.pushed.get(channel)
            if last is not None and f["seq"] != last + 1:
                self.fail(f"{channel}: event {f['seq']} pushed after {last} (lost or reordered)")
            self.pushed[channel] = f["seq"]
        elif t == "resync" and "rid" not in f and isinstance(channel, str):
            self.pushed.pop(channel, None)

    def trace_frame(self, f: dict[str, Any]) -> None:
        t = f.get("t")
        parts = [f"rx {t}"]
        for key in ("rid", "channel", "seq", "code", "dup", "head", "more", "reason", "user"):
            if key in f and not (t == "welcome" and key == "user"):
                parts.append(f"{key}={f[key]}")
        if t == "ok" and "events" in f:
            parts.append(f"events={[e['seq'] for e in f['events']]}")
        self.log(" ".join(parts))

    # ---- protocol outputs

    def handle(self, outputs: list[Output]) -> bool:
        """Act on the protocol's outputs; True when the connection must close."""
        close = False
        for out in outputs:
            if isinstance(out, SendCompleted):
                self.send_completed(out)
            elif isinstance(out, Completed):
                self.completed(out.handle, out.result)
            elif isinstance(out, Failed):
                kind, detail = self.handles.pop(out.handle, ("?", None))
                self.log(f"failed {kind} {detail}: {out.error.code}")
                if out.error.code == "internal":
                    self.fail(f"{kind} answered internal: {out.error}")
                expected = ("store_unavailable",) if kind == "read" else ()
                if kind in ("join", "read", "history", "unread") and out.error.code not in expected:
                    self.fail(f"{kind} {detail} failed: {out.error}")
            elif isinstance(out, Disconnect):
                self.log(f"disconnect: {out.reason}")
                close = True
            elif isinstance(out, HelloFailed):
                self.log(f"hello failed: {out.error.code}")
            elif isinstance(out, Welcomed):
                self.log("welcomed")
            elif isinstance(out, NeedToken):
                self.fail(f"asked for a token: {out.reason}")
            elif isinstance(out, FollowChanged):
                self.log(f"follow {out.channel} {out.following}")
        return close

    def send_completed(self, out: SendCompleted) -> None:
        if out.ack is None:
            assert out.error is not None
            self.fail(f"send {out.cid} failed: {out.error}")
            return
        ack = out.ack
        self.log(f"acked {out.cid} seq={ack.seq} dup={ack.dup}")
        first = self.acked.get(out.cid)
        if first is not None and (ack.seq, ack.id, ack.dup) != (first.seq, first.id, True):
            self.fail(f"cid {out.cid} acked again as {ack}, first as {first}")
        stored = self.sim.committed.get((out.channel, self.user, out.cid))
        if stored != ack.seq:
            self.fail(f"cid {out.cid} acked at seq {ack.seq}, committed at {stored}")
        self.acked.setdefault(out.cid, ack)

    def completed(self, handle: int, result: Any) -> None:
        kind, detail = self.handles.pop(handle, ("?", None))
        self.log(f"done {kind} {detail}")
        if kind in ("edit", "delete"):
            assert isinstance(result, Ack)
            change = self.sim.changes.get((result.channel, result.seq))
            if change != (kind, detail, self.user):
                self.fail(f"{kind} of {detail} acked at {result.seq}, committed: {change}")
            self.sim.acked_changes.append((result.channel, result.seq, kind, detail, self.user))
        elif kind == "read":
            channel = detail[0]
            if result < self.read_replies.get(channel, 0):
                self.fail(f"read cursor of {channel} moved back to {result}")
            self.read_replies[channel] = result
        elif kind == "join":
            assert isinstance(result, JoinInfo)

    # ---- the application

    async def consumer(self) -> None:
        """The app takes events at its own pace (sometimes slowly: queues stall)."""
        while True:
            if not self.proto.queued_events:
                await self.changed.wait()
                continue
            if self.rng.random() < 0.02:
                await trio.sleep(self.rng.uniform(0.5, 3.0))
            else:
                await trio.sleep(self.rng.expovariate(1 / 0.005))
            for _ in range(self.rng.randint(1, 20)):
                event = self.proto.next_event()
                if event is None:
                    break
                self.on_event(event)
            self.kick()

    def on_event(self, ev: Any) -> None:
        if isinstance(ev, (Message, Edit, Delete)):
            s = self.streams.setdefault(ev.channel, Stream())
            kind = {Message: "message", Edit: "edit", Delete: "delete"}[type(ev)]
            self.log(f"event {ev.channel} {ev.seq} {kind}")
            if s.start is None:
                self.fail(f"{kind} {ev.seq} of {ev.channel} before its Resynced")
            elif ev.seq != s.last + 1:
                self.fail(f"{ev.channel}: event {ev.seq} after {s.last} (gap, dup or reorder)")
            s.last = ev.seq
            s.entries.append((ev.seq, kind, ev.id, ev.sender))
        elif isinstance(ev, Resynced):
            self.log(f"resynced {ev.channel} head={ev.head} messages={len(ev.messages)}")
            s = self.streams.setdefault(ev.channel, Stream())
            if s.start is not None:
                self.fail(f"{ev.channel}: unexpected Resynced (head {ev.head}) after {s.last}")
            s.start = s.last = ev.head
            seqs = [m.seq for m in ev.messages]
            if seqs != sorted(set(seqs)) or (seqs and seqs[-1] > ev.head):
                self.fail(f"{ev.channel}: Resynced history out of order: {seqs}")
        elif isinstance(ev, ReadReceipt):
            key = (ev.channel, ev.user)
            if ev.seq <= self.receipts.get(key, 0):
                self.fail(f"read receipt {key} went from {self.receipts[key]} to {ev.seq}")
            self.receipts[key] = ev.seq
        elif isinstance(ev, Left):
            self.fail(f"left {ev.channel}: {ev.reason}")
        elif isinstance(ev, (Typing, Presence, ConnectionChanged)):
            pass

    def request(self, kind: str, detail: Any, **fields: Any) -> None:
        handle = self.proto.request(kind, self.sim.now_ms(), **fields)
        self.handles[handle] = (kind, detail)
        self.log(f"request {kind} {detail}")

    async def workload(self) -> None:
        channels = self.sim.cfg.channels
        rng = self.rng
        for channel in rng.sample(channels, rng.randint(1, len(channels))):
            self.join(channel)
        while self.active:
            await trio.sleep(rng.expovariate(1 / self.sim.cfg.think_s))
            if not self.active:
                break
            self.act(rng.random())
            self.kick()

    def join(self, channel: str) -> None:
        self.joined.append(channel)
        self.handles[self.proto.join(channel)] = ("join", channel)
        self.log(f"join {channel}")

    def act(self, r: float) -> None:
        rng, now = self.rng, self.sim.now_ms()
        channel = rng.choice(self.joined)
        mine = list(self.acked.items())
        if r < 0.45:
            cid = f"{self.name}-{next(self.cids)}"
            text = f"{cid} " + "x" * rng.choice((0, 10, 300, 3000))
            self.sent[cid] = (channel, text)
            self.proto.send(channel, text, {"n": len(self.sent)} if r < 0.1 else None, cid, now)
            self.log(f"send {cid} to {channel}")
        elif r < 0.52 and self.sent:
            cid = rng.choice(sorted(self.sent))  # a resend: pending joins, acked is a dup
            ch, text = self.sent[cid]
            self.proto.send(ch, text, None, cid, now)
            self.log(f"resend {cid}")
        elif r < 0.62 and mine:
            cid, ack = rng.choice(mine)
            self.request("edit", ack.id, channel=ack.channel, id=ack.id, text=f"edit {now}")
        elif r < 0.67 and mine:
            cid, ack = rng.choice(mine)
            self.request("delete", ack.id, channel=ack.channel, id=ack.id)
        elif r < 0.70:
            others = [e for s in self.streams.values() for e in s.entries if e[3] != self.user]
            if others:  # forbidden (not a moderator), or not_found
                e = rng.choice(others)
                ch = next(c for c, s in self.streams.items() if e in s.entries)
                self.request("edit", e[2], channel=ch, id=e[2], text="not mine")
        elif r < 0.82:
            last = self.streams.get(channel, Stream()).last
            seq = rng.randint(0, last) if rng.random() < 0.3 else last
            self.request("read", (channel, seq), channel=channel, seq=seq)
        elif r < 0.86:
            self.request("history", channel, channel=channel, limit=rng.randint(1, 20))
        elif r < 0.90:
            self.request("typing", channel, channel=channel, on=rng.random() < 0.7)
        elif r < 0.93:
            users = [f"user{i}" for i in range(self.sim.cfg.users)]
            self.request("presence", "users", users=users)
        elif r < 0.95:
            self.request("presence", "status", status=rng.choice(("away", "busy", "online")))
        elif r < 0.97:
            self.request("unread", "channels", channels=list(self.joined))
        elif len(self.joined) < len(self.sim.cfg.channels):
            self.join(rng.choice([c for c in self.sim.cfg.channels if c not in self.joined]))

    def settled(self) -> str | None:
        """Why this client has not caught up yet (None: it has)."""
        p = self.proto
        if not p.ready:
            return "not connected"
        if p.outbox:
            return f"outbox {[c for c, *_ in p.outbox]}"
        if self.handles:
            return f"requests {sorted(self.handles.values(), key=repr)}"
        if p.queued_events:
            return f"{p.queued_events} events queued"
        for name in self.joined:
            ch = p.channels.get(name)
            head = self.sim.data.channels[name].head if name in self.sim.data.channels else 0
            if ch is None or ch.phase is not Phase.LIVE:
                return f"{name} {ch.phase if ch else 'not followed'}"
            s = self.streams.get(name)
            if s is None or s.last != head:
                return f"{name} at {s.last if s else None}, head {head}"
        return None


# ----------------------------------------------------------------------------- the run


class LogCheck(logging.Handler):
    def __init__(self, sim: Sim) -> None:
        super().__init__(logging.WARNING)
        self.sim = sim

    def emit(self, record: logging.LogRecord) -> None:
        self.sim.warnings[record.levelname] += 1
        if record.levelno >= logging.ERROR:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            self.sim.errors.append(f"{record.name} {record.levelname}: {text}")


@dataclass
class SimResult:
    seed: int
    ok: bool
    error: str | None
    trace: list[str]
    digest: str
    stats: dict[str, int]
    wall_s: float

    def replay(self) -> str:
        return f"make sim SEED={self.seed}"


class Sim:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.cfg = SimConfig.draw(self.rng)
        self.trace: list[str] = []
        self.virtual_s = 0.0
        self.errors: list[str] = []
        self.warnings: collections.Counter[str] = collections.Counter()
        self.failure: str | None = None
        self.data = MemoryData(now=BASE_MS, store_id=f"sim-{seed}")
        self.store: SimStore | None = None
        self.store_lot = trio.lowlevel.ParkingLot()
        self.committed: dict[tuple[str, str, str], int] = {}  # (channel, user, cid) -> seq
        self.changes: dict[tuple[str, int], tuple[str, str, str]] = {}  # -> kind target user
        self.cursors: dict[tuple[str, str], int] = {}
        self.acked_changes: list[tuple[str, int, str, str, str]] = []
        self.stats: collections.Counter[str] = collections.Counter()
        self.net = Network(self)
        self.server: Server | None = None
        self.server_scope: trio.CancelScope | None = None
        self.server_done = trio.Event()
        self.incarnation = 0
        self.faults = True
        limits = Limits(heartbeat_ms=self.cfg.heartbeat_ms, sync_default=self.cfg.sync_default)
        self.settings = replace(
            Settings(),
            max_queue_bytes=self.cfg.max_queue_bytes,
            limits=limits,
            shutdown_grace_s=2.0,
        )
        self.verifier = TokenVerifier(SECRET)
        self.clients: list[SimClient] = []
        index = 0
        for u, devices in enumerate(self.cfg.devices):
            for d in range(devices):
                self.clients.append(SimClient(self, index, f"user{u}", d))
                index += 1
        self.nursery: trio.Nursery

    def now_ms(self) -> int:
        return BASE_MS + round(trio.current_time() * 1000)

    def log(self, msg: str) -> None:
        self.virtual_s = trio.current_time()
        self.trace.append(f"{self.virtual_s:10.4f} {msg}")

    def fail(self, msg: str) -> None:
        if self.failure is None:
            self.failure = msg
            self.log(f"FAILURE: {msg}")
        raise SimFailure(msg)

    # ---- server lifecycle

    async def server_life(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.incarnation += 1
        self.server_done = trio.Event()
        listener = SimListener()
        self.net.listener = listener
        server = Server(self.settings, self.verifier, wall_ms=self.now_ms, inline_reads=True)
        self.server = server

        def open_store(notify: Any) -> SimStore:
            self.store = SimStore(self, notify)
            return self.store

        self.log(f"server {self.incarnation} starting")
        try:
            with trio.CancelScope() as scope:
                self.server_scope = scope
                await server.run(
                    open_store=open_store, listeners=[listener], task_status=task_status
                )
        finally:
            self.net.listener = None
            self.server = None
            self.log(f"server {self.incarnation} stopped")
            self.server_done.set()

    async def crash(self) -> None:
        assert self.server_scope is not None and self.store is not None
        lost = self.store.crash()
        self.log(f"CRASH: {len(lost)} uncommitted writes lost")
        self.stats["crashes"] += 1
        for conn in self.net.conns:
            conn.reset()
        self.server_scope.cancel()
        await self.server_done.wait()

    async def graceful_restart(self) -> None:
        assert self.server is not None
        self.log("graceful stop")
        self.stats["graceful_restarts"] += 1
        self.server.stopping.set()
        await self.server_done.wait()

    async def committer(self) -> None:
        """Commit the store's pending writes in random batches after random latencies;
        record what each commit did (the oracle the checks use)."""
        rng = self.rng
        while True:
            store = self.store
            if store is None or store.closed or not store.pending:
                await self.store_lot.park()
                continue
            latency = self.cfg.store_latency_s
            if latency:
                await trio.sleep(rng.expovariate(1 / latency))
            store = self.store
            if store is None or store.closed or not store.pending:
                continue
            fail = self.faults and rng.random() < self.cfg.commit_fail
            n = rng.randint(1, len(store.pending))
            batch = store.commit(n, fail="simulated ENOSPC" if fail else None)
            self.stats["commits"] += 1
            self.stats["failed_commits"] += fail
            self.log(f"commit {len(batch)}{' FAILED' if fail else ''}")

    def observe(self, op: WriteOp) -> None:
        if op.error is not None:
            return
        if op.kind == "message":
            assert op.cid is not None and isinstance(op.result, AppendResult)
            key = (op.channel, op.user, op.cid)
            res = op.result
            if not res.dup:
                if key in self.committed:
                    self.fail(f"cid {key} stored twice: seq {self.committed[key]} and {res.seq}")
                self.committed[key] = res.seq
                self.stats["messages"] += 1
            elif self.committed.get(key) != res.seq:
                self.fail(f"dup answer for {key}: seq {res.seq}, stored {self.committed.get(key)}")
        elif op.kind in ("edit", "delete"):
            assert isinstance(op.result, AppendResult) and op.target is not None
            self.changes[(op.channel, op.result.seq)] = (op.kind, op.target, op.user)
            self.stats[op.kind + "s"] += 1
        elif op.kind == "read":
            assert isinstance(op.result, int)
            key = (op.user, op.channel)
            if op.result < self.cursors.get(key, 0):
                self.fail(f"read cursor {key} moved back to {op.result}")
            self.cursors[key] = op.result

    async def chaos(self) -> None:
        rng = self.rng
        end = self.cfg.duration_s
        while trio.current_time() < end:
            await trio.sleep(rng.expovariate(1 / self.cfg.fault_every_s))
            if trio.current_time() >= end:
                break
            r = rng.random()
            if r < 0.35:
                live = [c for c in self.clients if c.conn is not None]
                if live:
                    client = rng.choice(live)
                    assert client.conn is not None
                    self.log(f"RESET {client.conn.name}")
                    self.stats["resets"] += 1
                    client.conn.reset()
            elif r < 0.55:
                client = rng.choice(self.clients)
                if not client.paused:
                    pause = rng.uniform(0.5, 8.0)
                    self.log(f"PAUSE {client.name} reading for {pause:.3f} s")
                    self.stats["pauses"] += 1
                    self.nursery.start_soon(self.pause, client, pause)
            elif self.server is not None:
                if r < 0.8:
                    await self.crash()
                else:
                    await self.graceful_restart()
                await trio.sleep(rng.uniform(0.0, 2.0))
                await self.nursery.start(self.server_life)

    async def pause(self, client: SimClient, seconds: float) -> None:
        client.paused = True
        await trio.sleep(seconds)
        client.paused = False
        client.resume.set()
        client.resume = trio.Event()

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self.server_life)
            nursery.start_soon(self.committer)
            for client in self.clients:
                nursery.start_soon(client.run)
                nursery.start_soon(client.consumer)
                nursery.start_soon(client.workload)
            await self.chaos()
            # Faults over: stop the workload, let every client catch up, check.
            self.faults = False
            self.log("quiesce")
            for client in self.clients:
                client.active = False
                if client.paused:
                    client.paused = False
                    client.resume.set()
            if self.server is None:
                await nursery.start(self.server_life)
            now = trio.current_time()
            deadline = now + QUIESCE_LIMIT_S
            moved: dict[str, tuple[Any, float]] = {}  # client -> (its positions, since when)
            while True:
                waiting = [(c, why) for c in self.clients if (why := c.settled())]
                if not waiting:
                    break
                now = trio.current_time()
                for client, why in waiting:
                    mark = sorted((n, s.last) for n, s in client.streams.items())
                    if moved.get(client.name, (None,))[0] != mark:
                        moved[client.name] = (mark, now)
                    elif now - moved[client.name][1] > QUIESCE_STALL_S:
                        self.fail(
                            f"{client.name} stopped catching up for {QUIESCE_STALL_S} s: {why}"
                        )
                if now > deadline:
                    names = [(c.name, why) for c, why in waiting]
                    self.fail(f"clients did not catch up in {QUIESCE_LIMIT_S} s: {names}")
                await trio.sleep(0.25)
            self.check_final()
            nursery.cancel_scope.cancel()

    # ---- the final checks

    def check_final(self) -> None:
        data = self.data
        logs: dict[str, dict[int, dict[str, Any]]] = {}
        for name, ch in data.channels.items():
            page = data.sync(name, 0, 10**9)
            seqs = [e["seq"] for e in page.entries]
            if seqs != list(range(1, ch.head + 1)):
                self.fail(f"{name}: log not dense: {seqs[:20]}... head {ch.head}")
            logs[name] = {e["seq"]: e for e in page.entries}
        # Every committed message is in its log at its seq, exactly once.
        by_seq = {(key[0], seq) for key, seq in self.committed.items()}
        for name, entries in logs.items():
            for seq, e in entries.items():
                if e["kind"] == "message" and (name, seq) not in by_seq:
                    self.fail(f"{name} {seq}: a message no commit stored")
        for (name, user, cid), seq in self.committed.items():
            e = logs[name].get(seq)
            if e is None or e["kind"] != "message" or e["sender"] != user:
                self.fail(f"cid {cid} committed at {name} {seq}, log has {e}")
        # Every send acked, at the stored seq with the stored id.
        for c in self.clients:
            for cid, (channel, _text) in c.sent.items():
                ack = c.acked.get(cid)
                if ack is None:
                    self.fail(f"{c.name}: send {cid} never acked")
                e = logs[channel][ack.seq]
                if (e["kind"], e["id"], e["sender"]) != ("message", ack.id, c.user):
                    self.fail(f"{c.name}: {cid} acked {ack}, log has {e}")
                self.stats["acked"] += 1
        # Acked edits and deletes at their seqs; message state follows its changes.
        for channel, seq, kind, target, user in self.acked_changes:
            e = logs[channel].get(seq)
            if e is None or (e["kind"], e["id"], e["sender"]) != (kind, target, user):
                self.fail(f"{kind} of {target} acked at {channel} {seq}, log has {e}")
        for name, entries in logs.items():
            changes: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
            for e in entries.values():
                if e["kind"] != "message":
                    changes[e["id"]].append(e)
            for e in entries.values():
                if e["kind"] != "message":
                    continue
                edits = [c for c in changes.get(e["id"], []) if c["kind"] == "edit"]
                deletes = [c for c in changes.get(e["id"], []) if c["kind"] == "delete"]
                if deletes:
                    ok = (
                        len(deletes) == 1
                        and deletes[0]["seq"] > max([c["seq"] for c in edits], default=0)
                        and e.get("deleted") is True
                        and not {"text", "meta", "edited"} & e.keys()
                        and all(c.get("deleted") and "text" not in c for c in edits)
                    )
                elif edits:
                    last = edits[-1]
                    ok = e.get("text") == last["text"] and e.get("edited") == last["ts"]
                else:
                    ok = "edited" not in e and "deleted" not in e
                if not ok:
                    self.fail(f"{name} message {e}: not the state its changes give: {changes}")
        # Each client's stream of each channel equals the log after its first Resynced.
        for c in self.clients:
            for name in c.joined:
                s = c.streams.get(name)
                head = data.channels[name].head if name in data.channels else 0
                assert s is not None and s.start is not None
                want = [
                    (seq, e["kind"], e["id"], e["sender"])
                    for seq, e in sorted(logs.get(name, {}).items())
                    if seq > s.start
                ]
                if s.entries != want or s.last != head:
                    self.fail(f"{c.name}: stream of {name} from {s.start} differs from the log")
                self.stats["events"] += len(s.entries)
        # Read cursors: the store holds the highest cursor any commit answered.
        for (user, channel), cursor in self.cursors.items():
            if data.cursors.get((user, channel), 0) != cursor:
                self.fail(f"cursor {user} {channel}: {data.cursors.get((user, channel))}")
        if self.errors:
            self.fail(f"errors logged: {self.errors}")


def run_sim(seed: int) -> SimResult:
    """Run one seed to the end; never raises for an invariant (see ``ok``/``error``)."""
    started = time.perf_counter()
    sim = Sim(seed)
    handler = LogCheck(sim)
    logger = logging.getLogger("tsmsg")
    logger.addHandler(handler)
    seed_trio(seed)
    error: str | None = None
    try:
        trio.run(sim.main, clock=trio.testing.MockClock(autojump_threshold=0))
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        error = sim.failure or "".join(traceback.format_exception(exc))
        if sim.failure is None:
            sim.trace.append(f"EXCEPTION: {error}")
    finally:
        logger.removeHandler(handler)
    digest = hashlib.sha256("\n".join(sim.trace).encode()).hexdigest()
    stats = dict(sorted(sim.stats.items()))
    stats["virtual_s"] = round(sim.virtual_s)
    stats["trace_lines"] = len(sim.trace)
    return SimResult(
        seed, error is None, error, sim.trace, digest, stats, time.perf_counter() - started
    )


def report(result: SimResult, *, verbose: bool) -> str:
    lines = []
    if not result.ok:
        trace = result.trace if verbose else result.trace[-TRACE_TAIL:]
        if not verbose:
            lines.append(f"... last {len(trace)} of {len(result.trace)} trace lines:")
        lines += trace
        lines.append(f"seed {result.seed} FAILED: {result.error}")
        lines.append(f"replay: {result.replay()}")
    elif verbose:
        lines += result.trace
    status = "ok" if result.ok else "FAILED"
    lines.append(
        f"seed {result.seed}: {status} in {result.wall_s:.2f} s, trace {result.digest[:16]}, "
        f"{result.stats}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, help="run this seed (its whole trace on failure)")
    parser.add_argument("--seeds", type=int, default=200, help="random seeds to run")
    parser.add_argument("--time", type=float, default=math.inf, help="stop after this many s")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the whole trace")
    parser.add_argument("--digest", action="store_true", help="print only the trace digest")
    args = parser.parse_args(argv)
    if args.seed is not None:  # the whole trace on failure
        result = run_sim(args.seed)
        verbose = args.verbose or not result.ok
        print(result.digest if args.digest else report(result, verbose=verbose))
        return 0 if result.ok else 1
    started = time.perf_counter()
    failed: list[int] = []
    runs = 0
    seeds = random.SystemRandom()
    for _ in range(args.seeds):
        if time.perf_counter() - started > args.time:
            break
        seed = seeds.randrange(2**32)
        result = run_sim(seed)
        runs += 1
        print(report(result, verbose=False), flush=True)
        if not result.ok:
            failed.append(seed)
    elapsed = time.perf_counter() - started
    print(f"{runs} seeds in {elapsed:.1f} s ({runs / elapsed:.2f} seeds/s), {len(failed)} failed")
    for seed in failed:
        print(f"replay: make sim SEED={seed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
