"""The trio TCP server: a listener, a reader and a writer task per connection, and the hub
that fans committed events out to the connections joined to a channel.

Threads: the store's writer thread commits batches and hands each one to the trio thread
with ``TrioToken.run_sync_soon``; those callbacks run in commit order, so every member
receives a channel's events in seq order. All hub and session state lives in the trio
thread.

Backpressure (PROTOCOL.md, "Flow control"):
- a connection's own requests: its reader stops reading while the replies it has queued
  exceed half of ``max_queue_bytes``, or while ``max_inflight`` of its writes wait for the
  store; TCP then pushes back on the client;
- live events from others cannot wait: when they would push a connection's queue past
  ``max_queue_bytes``, its queued events are dropped and each affected channel's live
  stream is cut with a ``resync`` push; the client syncs from its last seq and the stream
  resumes when that sync reaches the head. Memory stays bounded, nothing is lost.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import secrets
import signal
import time
from collections.abc import Callable
from typing import Any

import trio

from tsmsg._native import FrameDecoder, FrameError, encode
from tsmsg.auth import TokenVerifier
from tsmsg.protocol import errors as E
from tsmsg.protocol.session import (
    Action,
    Close,
    Publish,
    Reply,
    Session,
    State,
    Submit,
    Subscribe,
    Unsubscribe,
)
from tsmsg.server.settings import Settings
from tsmsg.store import LmdbStore, StoreConfig, StoreUnavailable, WriteOp

log = logging.getLogger("tsmsg.server")

RECEIVE_CHUNK = 64 * 1024  # bytes per socket read
PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Connection:
    """One client connection: its session, its outbound queue and its tasks."""

    def __init__(self, server: Server, stream: trio.SocketStream, session: Session, peer: str):
        self.server = server
        self.stream = stream
        self.session = session
        self.peer = peer
        # Outbound frames: (bytes, channel of a live event or None for a reply/push).
        self.queue: collections.deque[tuple[bytes, str | None]] = collections.deque()
        self.queued_bytes = 0
        self.has_data = trio.Event()
        self.drained = trio.Event()
        self.inflight = 0
        self.inflight_freed = trio.Event()
        self.closing: str | None = None  # set: flush what is queued, then close
        self.cancel = trio.CancelScope()
        self.limit = server.settings.max_queue_bytes

    def send_frame(self, frame: dict[str, Any]) -> None:
        self.send_bytes(encode(frame), None)

    def send_bytes(self, data: bytes, channel: str | None) -> None:
        if self.closing is not None:
            return
        if channel is not None:
            if channel in self.session.cut:
                return
            if self.queued_bytes + len(data) > self.limit:
                self._cut_streams(channel)
                return
        if not self.queue:
            self.has_data.set()  # else the writer has not taken the queue yet: it is set
        self.queue.append((data, channel))
        self.queued_bytes += len(data)

    def _cut_streams(self, channel: str) -> None:
        """Slow consumer: drop queued live events and tell the client to sync."""
        cut = {channel}
        kept: collections.deque[tuple[bytes, str | None]] = collections.deque()
        for data, ch in self.queue:
            if ch is None:
                kept.append((data, ch))
            else:
                cut.add(ch)
        self.queue = kept
        self.queued_bytes = sum(len(d) for d, _ in kept)
        for ch in sorted(cut):
            frame = self.session.cut_stream(ch, self.server.store.channel(ch))
            self.queue.append((encode(frame), None))
            self.queued_bytes += len(self.queue[-1][0])
        self.has_data.set()
        log.warning("slow consumer %s (%s): cut live streams of %s", self.peer, self.user, cut)
        self.server.stats["slow_consumer_cuts"] += 1

    @property
    def user(self) -> str | None:
        return self.session.claims.user if self.session.claims else None

    def close_after_flush(self, reason: str) -> None:
        if self.closing is None:
            self.closing = reason
            self.has_data.set()

    async def writer(self) -> None:
        """Send queued frames, coalescing whatever is queued into one write. One cancel
        scope for the connection's life: its deadline is armed only while a write waits
        for the peer (cheaper than a new scope per write)."""
        timeout = self.server.settings.send_timeout_s
        with trio.CancelScope() as deadline:
            while True:
                await self.has_data.wait()
                self.has_data = trio.Event()
                if self.queue:
                    data = b"".join([chunk for chunk, _ in self.queue])
                    self.queue.clear()
                    self.queued_bytes = 0
                    self.drained.set()
                    self.drained = trio.Event()
                    deadline.deadline = trio.current_time() + timeout
                    await self.stream.send_all(data)
                    deadline.deadline = math.inf
                if self.closing is not None and not self.queue:
                    self.cancel.cancel()
                    return
        self.closing = self.closing or f"send timeout: the peer read nothing for {timeout:g} s"
        self.cancel.cancel()

    async def wait_writable(self) -> None:
        """Reader backpressure: wait while replies pile up or writes are in flight."""
        while self.queued_bytes > self.limit // 2:
            await self.drained.wait()
        while self.inflight >= self.server.settings.max_inflight:
            await self.inflight_freed.wait()

    async def reader(self) -> None:
        decoder = FrameDecoder(
            max_frame=self.session.limits.max_frame, max_depth=self.session.limits.max_depth
        )
        settings = self.server.settings
        deadline = trio.current_time() + settings.hello_timeout_s
        while self.closing is None:
            if self.session.state is State.AWAITING_HELLO:
                with trio.move_on_at(deadline) as hello_wait:
                    data = await self.stream.receive_some(RECEIVE_CHUNK)
                if hello_wait.cancelled_caught:
                    self.server.perform(self, self.session.hello_timeout())
                    return
            else:
                data = await self.stream.receive_some(RECEIVE_CHUNK)
            if not data:
                return  # the peer closed its side: handle() still delivers pending acks
            try:
                frames = decoder.feed(data)
            except FrameError as exc:
                self.server.perform(self, self.session.frame_error(exc))
                return
            for frame in frames:
                await self.wait_writable()
                if self.server.draining:
                    break  # read and drop: unread input would make close() send a reset
                if self.closing is not None:
                    return
                self.server.stats["frames_in"] += 1
                self.server.perform(self, self.session.receive_frame(frame, now_ms()))


class Server:
    def __init__(self, settings: Settings, verifier: TokenVerifier) -> None:
        self.settings = settings
        self.verifier = verifier
        self.members: dict[str, set[Connection]] = collections.defaultdict(set)
        self.connections: dict[Session, Connection] = {}
        self.stats: collections.Counter[str] = collections.Counter()
        self._ids = itertools.count(1)
        self._token: trio.lowlevel.TrioToken | None = None
        self.store: LmdbStore  # opened in run()
        self.port = 0
        self.stopping = trio.Event()
        self.draining = False  # shutting down: no new requests are read

    # ------------------------------------------------------------------ actions

    def perform(self, conn: Connection | None, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Publish):
                self.publish(action.channel, action.frame, action.skip_user)
            elif conn is None:
                continue
            elif isinstance(action, Reply):
                conn.send_frame(action.frame)
            elif isinstance(action, Submit):
                self.submit(conn, action.op)
            elif isinstance(action, Subscribe):
                self.members[action.channel].add(conn)
            elif isinstance(action, Unsubscribe):
                self._unsubscribe(conn, action.channel)
            elif isinstance(action, Close):
                log.info("closing %s (%s): %s", conn.peer, conn.user, action.reason)
                conn.close_after_flush(action.reason)

    def _unsubscribe(self, conn: Connection, channel: str) -> None:
        members = self.members.get(channel)
        if members is not None:
            members.discard(conn)
            if not members:
                del self.members[channel]

    def publish(self, channel: str, frame: dict[str, Any], skip_user: str | None) -> None:
        members = self.members.get(channel)
        if not members:
            return
        data = encode(frame)  # once for every member
        for conn in members:
            if skip_user is None or conn.user != skip_user:
                conn.send_bytes(data, channel)
        self.stats["deliveries"] += len(members)

    def submit(self, conn: Connection, op: WriteOp) -> None:
        try:
            self.store.submit(op)
        except StoreUnavailable as exc:
            op.error = exc
            self.perform(conn, conn.session.write_done(op))
            return
        conn.inflight += 1

    def on_batch(self, batch: list[WriteOp]) -> None:
        """A committed batch, in commit order (runs in the trio thread)."""
        for op in batch:
            session: Session = op.origin
            conn = self.connections.get(session)
            if conn is not None:
                conn.inflight -= 1
                conn.inflight_freed.set()
                conn.inflight_freed = trio.Event()
            self.perform(conn, session.write_done(op))

    def _notify(self, batch: list[WriteOp]) -> None:
        """Called by the store's writer thread."""
        assert self._token is not None
        self._token.run_sync_soon(self.on_batch, batch)

    # ------------------------------------------------------------------ connections

    async def handle(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
        except OSError:
            peer = "?"
        session_id = f"{next(self._ids):x}-{secrets.token_hex(4)}"
        session = Session(self.store, self.verifier, self.settings.limits, session_id, now_ms())
        conn = Connection(self, stream, session, peer)
        self.connections[session] = conn
        self.stats["connections_opened"] += 1
        log.info("connect %s session %s", peer, session_id)
        try:
            with conn.cancel:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.writer)
                    await conn.reader()
                    # The reader is done: acknowledge the writes still in flight, let the
                    # writer flush, then close; all within a deadline.
                    with trio.move_on_after(self.settings.shutdown_grace_s):
                        while conn.inflight and conn.closing is None:
                            await conn.inflight_freed.wait()
                        conn.close_after_flush("peer closed the connection")
                        await trio.sleep_forever()
                    nursery.cancel_scope.cancel()
        except Exception as exc:
            # The nursery wraps errors in an ExceptionGroup: a lost peer is an ordinary
            # disconnect; anything else is a bug, which closes this connection only.
            group = exc if isinstance(exc, ExceptionGroup) else ExceptionGroup("", [exc])
            lost, bugs = group.split(PEER_GONE)
            if bugs is not None:
                log.error("internal error on %s (%s)", peer, conn.user, exc_info=bugs)
                conn.closing = "internal error"
            elif lost is not None:
                conn.closing = conn.closing or f"connection lost: {lost.exceptions[0]!r}"
        finally:
            reason = conn.closing or "closed"
            session.closed(reason)
            for channel in session.joined:
                self._unsubscribe(conn, channel)
            del self.connections[session]
            self.stats["connections_closed"] += 1
            log.info("disconnect %s (%s) session %s: %s", peer, conn.user, session_id, reason)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    # ------------------------------------------------------------------ lifecycle

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled or SIGTERM/SIGINT, then shut down gracefully."""
        self._token = trio.lowlevel.current_trio_token()
        settings = self.settings
        config = StoreConfig(durability=settings.durability)
        self.store = await trio.to_thread.run_sync(
            lambda: LmdbStore(settings.data_dir, config, notify=self._notify)
        )
        try:
            async with trio.open_nursery() as handlers:
                async with trio.open_nursery() as listening:
                    serve = functools.partial(
                        trio.serve_tcp,
                        self.handle,
                        settings.port,
                        host=settings.host,
                        handler_nursery=handlers,
                    )
                    listeners = await listening.start(serve)
                    self.port = listeners[0].socket.getsockname()[1]
                    log.info(
                        "serving on %s:%d, data in %s", settings.host, self.port, settings.data_dir
                    )
                    listening.start_soon(self._wait_for_signal)
                    task_status.started(self)
                    await self.stopping.wait()
                    listening.cancel_scope.cancel()  # stop accepting first
                log.info("shutting down: %d connections", len(self.connections))
                await self.shutdown(handlers.cancel_scope.cancel)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self.store.close)
            log.info("store closed")

    async def _wait_for_signal(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                self.stopping.set()
                return

    async def shutdown(self, stop: Callable[[], Any]) -> None:
        """Stop reading, let pending writes commit and be acknowledged, say ``bye``."""
        self.draining = True
        with trio.move_on_after(self.settings.shutdown_grace_s):
            while any(c.inflight for c in self.connections.values()):
                await trio.sleep(0.01)
        for conn in list(self.connections.values()):
            conn.send_frame({"t": "bye", "code": E.SHUTTING_DOWN, "message": "server stopping"})
            conn.close_after_flush("server shutdown")
        with trio.move_on_after(self.settings.shutdown_grace_s):
            while self.connections:
                await trio.sleep(0.01)
        stop()


async def serve(
    settings: Settings,
    verifier: TokenVerifier,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    server = Server(settings, verifier)
    await server.run(task_status=task_status)
