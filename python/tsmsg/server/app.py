"""The trio TCP server: a listener, a reader task per connection, one poller task that
reads the idle ones, one flusher task, and the hub that fans committed events out to the
connections joined to a channel. A WebSocket connection (the ``ws`` port, server/web.py)
is served by the same Connection once upgraded; only its Transport (server/wire.py: how
bytes become frames and back) differs.

The flusher runs once per scheduling round in which there is work. First it hands the
round's writes (from every connection) to the store in one call: one wake-up of the
store's writer thread. Then it writes every connection that queued frames, with one
non-blocking ``write`` each (TLS: records made and written by ``TlsStream.try_send``):
fanning an event out to N members costs N syscalls and one task wake-up, not N wake-ups
and N trio ``send_all`` calls. A connection whose socket buffer is full hands its bytes
to a writer task of its own, started then, which waits for the peer under
``send_timeout_s`` and ends once everything is sent; until then the flusher leaves the
connection alone, so bytes stay in order.

The poller (server/poller.py) reads every connection that is past its hello and has no
partial frame, with one epoll of its own, and hands the bytes (TLS: decrypted by
``TlsStream.decrypt``) to ``Connection.input``, which handles the frames without waking
the reader task; the task (parked meanwhile) takes over whenever there is something to
await: a store read, backpressure, a partial frame's deadline, EOF or an error. An idle
plain TCP connection is its reader task parked in the poller and a few small objects (no
nursery, writer task, Event or cancel scope of its own beyond the one around its reader):
about 8 KiB of server memory (bench workload (f)).
Writer tasks run in the server's task nursery; the connection cancels and awaits its
own when it closes.

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
import contextlib
import functools
import itertools
import logging
import math
import os
import random
import resource
import select
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, NamedTuple, TypeVar

import trio

from tsmsg import compiled
from tsmsg._native import FrameError, TlsConfig, encode
from tsmsg.auth import Claims, TokenIssuer, TokenVerifier
from tsmsg.protocol import errors as E
from tsmsg.protocol.errors import RequestError
from tsmsg.protocol.ratelimit import Buckets, UserLimits
from tsmsg.protocol.session import (
    Action,
    Close,
    NotifyUser,
    Position,
    Publish,
    QueryPresence,
    Read,
    Reply,
    Session,
    SetPresence,
    State,
    Submit,
    Subscribe,
    Unsubscribe,
    event_frame,
    without_unsendable_meta,
)
from tsmsg.server.accept import Address, Gate, serve_connections, tcp_acceptors
from tsmsg.server.http import HttpServer, Response, Route, text
from tsmsg.server.memberships import MembershipCopies
from tsmsg.server.metrics import (
    CONTENT_TYPE,
    HTTP_REQUEST,
    PEER_CLOSED,
    Metrics,
    auth_reason,
    close_reason,
)
from tsmsg.server.poller import YIELD_EVERY_S, Poller
from tsmsg.server.presence_order import LatestPresence
from tsmsg.server.relay import Relay, Reset
from tsmsg.server.settings import Settings, parse_address, store_config
from tsmsg.server.threads import ReadThreads
from tsmsg.server.tls_stream import TlsStream
from tsmsg.server.web import Web
from tsmsg.server.wire import (
    RECEIVE_CHUNK,
    TCP,
    Codec,
    Decoder,
    FdReceive,
    Transport,
    close_stream,
)
from tsmsg.store import AppendResult, SendLimits, Store, StoreUnavailable, WriteOp
from tsmsg.store import open_store as open_engine
from tsmsg.store.base import (
    CONNECTED,
    OFFLINE,
    PRESENCE_TOPIC,
    ChannelInfo,
    Notify,
    RemoteEntry,
    StoreError,
)
from tsmsg.tls import server_tls_context

log = logging.getLogger("tsmsg.server")
T = TypeVar("T")

PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)
# The writer task's step: a write waits for the peer at most send_timeout_s per this many
# bytes (a peer that reads nothing for that long is closed, a slow one is not).
WRITE_CHUNK = 16 * 1024
REFUSE_DRAIN_S = 0.25  # a refused connection: how long its input is read before the close
REFUSE_NOW_READS = 4  # refused at a cap: reads of input already there (no wait) before the close
# Descriptors a derived max_connections leaves free: the store's files, log files, the
# listeners, trio's wake-up pipe, worker threads (baseline ~20), the HTTP endpoints'
# connections (http.MAX_CONNECTIONS, 16), the Redis engine's connections.
FD_RESERVE = 64
# The retry_after_ms of a refusal at a connection cap: unlike a bucket's, no clock says
# when a slot frees (when some connection closes); a second is a polite reconnect pace.
CAP_RETRY_AFTER_MS = 1_000
ACCEPT_ERROR_LOG_EVERY_S = 10.0  # out of file descriptors: one log line per this period
# A scheduler round this much later than the tick asked for means the event loop was
# stalled (by the server itself): that time is not held against idle peers.
LOOP_STALL_S = 1.0
PRESENCE_BATCH = 256  # presence changes written to a shared engine in one call at most
# On a shared engine, connected users' memberships read again in one call at most, and the
# pause after a read that failed (doubled up to the most).
MEMBERS_BATCH = 256
MEMBERS_RETRY_S, MEMBERS_RETRY_MAX_S = 0.25, 2.0
# Another node's typing `on` is turned off here this long after its timeout unless renewed
# or turned off (its node died): the typer's own node would have sent the `off` by then.
TYPING_GRACE_MS = 1000
# A user's read push in a channel is handed on here only if its cursor is beyond the last
# one handed on (within this long): two nodes' reads, published in the other order than
# they were committed, must not move a cursor back for the members (PROTOCOL.md 7.6).
READ_ORDER_KEEP_S = 10.0
GAP_CHECK_S = 0.05  # how often the relay's gaps are looked at (it waits GAP_WAIT_MS on each)
ENTRY_KINDS = frozenset(("message", "edit", "delete"))  # writes that make an event
# Repeated log lines (RepeatFilter): of one kind (a message template), the first LOG_BURST
# per LOG_INTERVAL_S, then a count. A connect flood once wrote 16,784 WARNING lines in 5 s.
LOG_BURST = 10
LOG_INTERVAL_S = 10.0
LOG_FILTER_MIN_LEVEL = logging.WARNING  # INFO lines are one per accepted connection: kept
LOG_MAX_KINDS = 1024  # kinds remembered: templates are few; bounds memory all the same

# An event that is already set: what a Connection holds while nobody waits. Setting it
# again does nothing; a waiter arms a fresh one, and puts this back once woken. An idle
# connection then holds no Event of its own (memory per idle connection, bench (f)).
SET = trio.Event()
SET.set()


class RepeatFilter(logging.Filter):
    """Lets the first ``burst`` records of a kind (logger, level, message template) through
    per ``interval_s``, drops the rest, and says how many it dropped: the next record of
    that kind let through ends with "(N similar messages suppressed in the last S s)", and
    so does a summary line that :meth:`flush` logs for a kind gone quiet. Kinds are
    templates, not formatted messages: a flood from many peers is one kind."""

    def __init__(
        self,
        burst: int = LOG_BURST,
        interval_s: float = LOG_INTERVAL_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_level: int = LOG_FILTER_MIN_LEVEL,
        keep_traceback: bool = True,
    ) -> None:
        super().__init__()
        self.burst, self.interval_s, self.clock = burst, interval_s, clock
        self.min_level, self.keep_traceback = min_level, keep_traceback
        # kind -> [window start, records let through in it, records suppressed in it]
        self.windows: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level or getattr(record, "suppressed_summary", False):
            return True
        if not self.keep_traceback:
            record.exc_info = record.exc_text = None
        now = self.clock()
        kind = (record.name, record.levelno, str(record.msg))
        window = self.windows.get(kind)
        if window is None or now - window[0] >= self.interval_s:
            if window is not None and window[2]:
                record.msg = f"{record.getMessage()} ({_suppressed(window, now)})"
                record.args = None
            if window is None and len(self.windows) >= LOG_MAX_KINDS:
                self.windows.pop(next(iter(self.windows)))
            self.windows[kind] = [now, 1, 0]
            return True
        if window[1] < self.burst:
            window[1] += 1
            return True
        window[2] += 1
        return False

    def flush(self) -> None:
        """One summary line for each kind whose window has ended with records suppressed
        and which has been quiet since (the server's ticker calls this)."""
        now = self.clock()
        for (name, level, msg), window in list(self.windows.items()):
            if window[2] and now - window[0] >= self.interval_s:
                note = _suppressed(window, now)
                del self.windows[(name, level, msg)]
                extra = {"suppressed_summary": True}
                logging.getLogger(name).log(level, "%s: %s", note, msg, extra=extra)


def _suppressed(window: list[float], now: float) -> str:
    return f"{window[2]:.0f} similar messages suppressed in the last {now - window[0]:.0f} s"


def accept_error_filter(clock: Callable[[], float] = time.monotonic) -> RepeatFilter:
    """While the process is out of file descriptors (EMFILE), trio's accept loop retries
    every 100 ms and logs each failure with a traceback: ~90 lines a second. Keep one
    line per ``ACCEPT_ERROR_LOG_EVERY_S``, without the traceback."""
    return RepeatFilter(
        1, ACCEPT_ERROR_LOG_EVERY_S, clock=clock, min_level=logging.DEBUG, keep_traceback=False
    )


# The server's own repeated lines (refused connections, slow consumers...), and trio's.
# A logger's filter sees only the records logged on it, not its children's: the WebSocket
# port's logger (its refusals) and the sessions' (a store read failed: one per request
# while Redis is away) get the same one. All three log from the event loop's thread only.
LOG_FILTER = RepeatFilter()
for _name in ("tsmsg.server", "tsmsg.server.web", "tsmsg.session"):
    logging.getLogger(_name).addFilter(LOG_FILTER)
ACCEPT_FILTER = accept_error_filter()
logging.getLogger("trio.serve_listeners").addFilter(ACCEPT_FILTER)


def connection_cap(configured: int, nofile: int) -> int:
    """The most client connections a process holds at once: ``configured`` (0: no such
    setting), never more than the fd limit ``nofile`` minus FD_RESERVE, and at least 1."""
    cap = configured or sys.maxsize
    if nofile != resource.RLIM_INFINITY:
        cap = min(cap, nofile - FD_RESERVE)
    return max(1, cap)


class Rest(NamedTuple):
    """What a parked connection's reader task goes on with (Connection.input): a read to
    run (begun: Connection.begin_read), then frames to dispatch, which were read at
    ``arrived`` (ms: the frame rate limit's time, PROTOCOL.md 16.1); ``partial_since``:
    when the incomplete frame in the decoder began (its deadline runs), or inf."""

    frames: list[dict[str, Any]]
    read: Read | None
    arrived: int
    partial_since: float


class Refusal(NamedTuple):
    """Why a new connection is refused (with ``rate_limited``), before it gets a session."""

    retry_after_ms: int
    scope: str  # of the tsmsg_rate_limited_total metric
    message: str
    now: bool  # at a cap: closed at once, without waiting for the peer


@contextlib.contextmanager
def listen_error(host: str, port: int) -> Iterator[None]:
    """A listener that cannot start says where (the port in use, the address not ours)."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def try_send_of(stream: trio.abc.Stream) -> Callable[[bytes], int] | None:
    """A stream's non-blocking write: bytes written, BlockingIOError when none fit. Plain
    TCP: ``write`` on the socket (non-blocking under trio; POSIX, where Python ignores
    SIGPIPE, so a gone peer is an EPIPE/ECONNRESET error); a stream may bring its own
    (TLS: :meth:`TlsStream.try_send`; the simulation's); None: the writer task sends
    everything."""
    if isinstance(stream, trio.SocketStream):
        return functools.partial(os.write, stream.socket.fileno())
    send: Callable[[bytes], int] | None = getattr(stream, "try_send", None)
    return send


# The start of an HTTP request: a length prefix of 0x47455420 ("GET ") and the like would
# be a frame of about 1.2 GB; a connection that opens with one of these is answered in
# plain text instead, as Redis does (the methods a browser or curl sends first).
HTTP_METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"OPTIONS ", b"DELETE ", b"PATCH ")


def http_hint(settings: Settings) -> bytes:
    """The answer to an HTTP request on the protocol port: a minimal HTTP response whose
    body is one line saying what this port speaks and where HTTP clients should go."""
    ws = getattr(settings, "ws", "")  # the WebSocket listener, where the server has one
    where = (
        f"WebSocket clients connect to ws://{ws}/"
        if ws
        else "browsers need the WebSocket port, if this server has one configured"
    )
    line = (
        "This is a tsmsg port: length-prefixed msgpack frames over TCP (PROTOCOL.md), "
        f"not HTTP; {where}.\n"
    )
    body = line.encode()
    head = (
        "HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def refuse_now(stream: trio.abc.Stream, frame: bytes) -> bool:
    """Best effort without waiting, before the close: on plain TCP the frame in one
    non-blocking write (a fresh socket's buffer takes it), FIN, then the input already
    received (a pipelined hello), so the close sends no reset that could destroy the
    frame. Over TLS nothing: no handshake is spent on a refused connection. Whether the
    frame was written."""
    send = try_send_of(stream)
    if send is None or not isinstance(stream, trio.SocketStream):
        return False
    sock = stream.socket
    written = False
    try:
        written = send(frame) == len(frame)
        sock.shutdown(trio.socket.SHUT_WR)
        for _ in range(REFUSE_NOW_READS):
            if not os.read(sock.fileno(), RECEIVE_CHUNK):
                break
    except OSError:  # BlockingIOError: nothing more to read; or the peer is gone
        pass
    return written


Receive = Callable[[], Awaitable[bytes | bytearray]]  # b"" at EOF


def receive_of(stream: trio.abc.Stream, first_input: bytes = b"", drained: bool = False) -> Receive:
    """The reader's receive: up to RECEIVE_CHUNK bytes, b"" at the peer's EOF. Plain TCP:
    ``read`` on the socket, waiting with ``wait_readable`` on its fd when there is
    nothing, the way trio's own socket calls do, minus their layers: an idle connection
    is suspended in one small frame (memory per idle connection, bench (f)); ``drained``:
    nothing is expected yet (the first read waits, see FdReceive). Any other stream (TLS,
    the simulation's): its ``receive_some``. ``first_input``, if any, is returned first."""
    if first_input:
        return functools.partial(_receive_first, [first_input], receive_of(stream))
    if not isinstance(stream, trio.SocketStream):
        return functools.partial(stream.receive_some, RECEIVE_CHUNK)
    return FdReceive(stream.socket.fileno(), drained)


async def _receive_first(first: list[bytes], receive: Receive) -> bytes | bytearray:
    if first:
        await trio.lowlevel.checkpoint()
        return first.pop()
    return await receive()


async def receive_before(receive: Receive, deadline: float) -> bytes | bytearray | None:
    """``receive()``, or None if ``deadline`` passes first."""
    with trio.move_on_at(deadline):
        return await receive()
    return None


class Connection:
    """One client connection: its session, its outbound queue and its tasks."""

    __slots__ = (  # no per-instance dict (memory per idle connection)
        "blocked",
        "cancel",
        "closing",
        "decoder",
        "drained",
        "first_sync",
        "handoff",
        "has_data",
        "held",
        "holding",
        "inflight",
        "inflight_freed",
        "limit",
        "next_check",
        "nursery",
        "peer",
        "pending",
        "queue",
        "queued_bytes",
        "serial",
        "server",
        "session",
        "stream",
        "transport",
        "try_send",
        "write_error",
        "writer_done",
        "writer_scope",
    )

    def __init__(
        self,
        server: Server,
        stream: trio.abc.Stream,
        session: Session,
        peer: str,
        serial: int,
        transport: Transport = TCP,
    ):
        self.server = server
        self.transport = transport  # how frames become bytes and back (server/wire.py)
        self.serial = serial  # this server's connection number: the hash, see __hash__
        self.stream = stream
        self.session = session
        self.peer = peer
        # Outbound frames: (bytes, channel of a live event or None for a reply/push).
        self.queue: list[tuple[bytes, str | None]] = []
        self.queued_bytes = 0
        # The flusher's non-blocking write, used only while the writer task is not
        # sending (``blocked``); None once the stream is closed (TLS too has one:
        # TlsStream.try_send).
        self.try_send = try_send_of(stream)
        self.blocked = self.try_send is None  # the writer task sends; the flusher stays out
        self.pending = b""  # bytes the flusher could not write, for the writer task
        # the flusher's, raised by the writer task
        self.write_error: OSError | trio.BrokenResourceError | None = None
        self.has_data = SET  # wakes the writer task
        # The writer task exists only while needed (a full socket). It runs in the server's
        # task nursery, which handle() sets here and clears when the connection closes.
        self.nursery: trio.Nursery | None = None
        self.writer_scope: trio.CancelScope | None = None  # the running writer's
        self.writer_done = SET  # set when the running writer has ended
        # Set when the queue is taken / a write is acknowledged; a waiter arms a new one.
        self.drained = SET
        self.inflight = 0
        self.inflight_freed = SET
        self.held = False  # the reader waits in wait_writable or for a read: not idle
        # Channels whose live pushes wait for a read's reply (Read.hold): rare, so None
        # while there is none (memory per idle connection).
        self.holding: dict[str, list[bytes] | None] | None = None
        self.closing: str | None = None  # set: flush what is queued, then close
        self.cancel = trio.CancelScope()  # around the reader, in handle(): see abort()
        self.limit = server.settings.max_queue_bytes
        self.first_sync = True  # no sync seen yet (metrics: a sync from a position resumes)
        # The session's next timer deadline as of the last check (ms; 0: unknown). Only a
        # received frame can move a deadline earlier (typing, refresh), and it resets
        # this, so the ticker skips the connection until then: idle ones cost nothing.
        self.next_check = 0
        self.decoder: Decoder | None = None  # the reader's (set when it starts)
        # What the poller hands back to the reader task (see input()); None while parked.
        self.handoff: bytes | Exception | Rest | None = None

    def __hash__(self) -> int:
        # Sets of connections (a channel's members) are iterated to fan out, and the
        # flusher writes in that order: hashing by a serial, not the object's address,
        # makes it the same in every run (the simulation replays a seed exactly).
        return self.serial

    def send_frame(self, frame: dict[str, Any]) -> None:
        if self.send_bytes(encode_frame(self.transport.codec, frame), None):
            self.server.metrics.frame_out(frame)

    def send_bytes(self, data: bytes, channel: str | None) -> bool:
        """Queue a frame; False if it was dropped (closing, a cut or full live stream)."""
        if self.closing is not None:
            return False
        if channel is not None:
            if self.holding is not None and channel in self.holding:
                return self._hold(data, channel)
            if channel in self.session.cut:
                return False
            if self.queued_bytes + len(data) > self.limit:
                self._cut_streams(channel)
                return False
        if not self.queue:  # else the flusher or the writer is due already
            if self.blocked:
                self.wake_writer()
            else:
                self.server.want_flush(self)
        self.queue.append((data, channel))
        self.queued_bytes += len(data)
        return True

    def _hold(self, data: bytes, channel: str) -> bool:
        """Keep a live push of a held channel for after the read's reply. It counts
        against the outbound bound like a queued one; past it, the stream is cut."""
        assert self.holding is not None
        held = self.holding[channel]
        if held is None:
            return False  # cut while held
        if self.queued_bytes + len(data) > self.limit:
            self._cut_streams(channel)
            return False
        held.append(data)
        self.queued_bytes += len(data)
        return True

    def _release(self, channel: str) -> None:
        """The read that held ``channel`` is answered: its held pushes follow the reply,
        unless the stream is (still) cut or the join failed."""
        assert self.holding is not None
        held = self.holding.pop(channel)
        if not self.holding:
            self.holding = None
        if held is not None:
            self.queued_bytes -= sum(map(len, held))
        if channel not in self.session.joined:
            self.server.unsubscribe(self, channel)  # a join that failed
        elif held is None:  # cut while held: after the reply, the stream is cut
            self._queue_resync(channel)
        elif channel not in self.session.cut:  # else the sync did not reach the head
            for data in held:
                self.send_bytes(data, channel)

    def begin_read(self, read: Read) -> None:
        """A request's read begins, in the same step that handled the request (before
        anything else can be queued here): the live pushes of the channel it holds wait
        for its reply (PROTOCOL.md 6.2: a join's ``ok`` precedes them), and the
        connection counts as busy, not idle, until :meth:`read` ends."""
        hold = read.hold
        if hold is not None:
            if self.holding is None:
                self.holding = {}
            self.holding[hold] = []
        self.held = True

    async def read(self, read: Read) -> None:
        """Run a begun read's store reads off the event loop (the server's read threads),
        then its reply and what follows; this connection handles no other frame
        meanwhile."""
        server, hold = self.server, read.hold
        try:
            result, error = await server.run_read(read.query), None
        except Exception as exc:  # the session answers it (a StoreError: its code)
            result, error = None, exc
        finally:
            self.held = False
        follow = server.perform(self, self.session.read_done(read, result, error))
        if hold is not None:
            self._release(hold)
        if follow is not None:
            self.begin_read(follow)
            await self.read(follow)

    def _take_queue(self) -> bytes:
        data = b"".join(map(itemgetter(0), self.queue))
        self.queue.clear()
        self.queued_bytes = 0
        self.drained.set()
        return data

    def flush(self) -> None:
        """The flusher's part: write the queue with one non-blocking write; what the
        socket does not take (or an error, which the writer's send then reports) goes to
        the writer task."""
        if self.blocked or not self.queue or self.try_send is None:
            return
        data = self._take_queue()
        try:
            sent = self.try_send(data)
        except BlockingIOError:
            sent = 0
        except (OSError, trio.BrokenResourceError) as exc:  # the writer task raises it
            self.write_error = exc
            sent = 0
        if sent < len(data) or self.backlogged:
            self.pending = data[sent:]
            self.blocked = True
            self.wake_writer()

    @property
    def unsent(self) -> bool:
        """Bytes queued, or taken and not yet written (the writer task's to send)."""
        return bool(self.queue or self.pending or self.backlogged or self.writing)

    @property
    def backlogged(self) -> bool:
        """The stream took bytes it has not written yet (TLS records the socket did not
        take): the writer task writes them."""
        stream = self.stream
        return type(stream) is TlsStream and bool(stream.backlog)

    def push_signal(self, data: bytes, t: str = "presence") -> None:
        """A best-effort push (presence, membership: of type ``t``): dropped, not queued,
        past the outbound bound."""
        if self.closing is None and self.queued_bytes + len(data) <= self.limit:
            self.send_bytes(data, None)
            self.server.metrics.frames_out_of(t, 1)
        else:
            self.server.metrics.signals_dropped.inc()

    def _cut_streams(self, channel: str) -> None:
        """Slow consumer: drop queued live events and tell the client to sync. A held
        channel's pushes are dropped too; its resync follows the read's reply."""
        queued, cut = self.queued_bytes, {channel}
        kept: list[tuple[bytes, str | None]] = []
        for data, ch in self.queue:
            if ch is None:
                kept.append((data, ch))
            else:
                cut.add(ch)
        self.queue = kept
        self.queued_bytes = sum(len(d) for d, _ in kept)
        if self.holding is not None:
            for ch in self.holding:
                self.holding[ch] = None
            cut |= self.holding.keys()
        for ch in sorted(cut):
            if self.holding is None or ch not in self.holding:
                self._queue_resync(ch)
        self.wake_writer()
        log.warning(
            "slow consumer %s (%s): cut live streams of %s (%d bytes queued, max_queue_bytes %d)",
            self.peer, self.user, cut, queued, self.limit,
        )  # fmt: skip
        metrics = self.server.metrics
        metrics.slow_consumer_resyncs.inc(len(cut))
        metrics.frames_out["resync"].inc(len(cut))

    def _queue_resync(self, channel: str) -> None:
        self.resync(channel, self.server.cut_position(channel))

    def resync(self, channel: str, info: ChannelInfo) -> None:
        """Cut the channel's live stream (a ``resync`` push: the client syncs), after the
        reply of a read that holds the channel."""
        if self.holding is not None and channel in self.holding:
            held = self.holding[channel]
            if held is not None:
                self.queued_bytes -= sum(map(len, held))
                self.holding[channel] = None  # _release resyncs after the reply
            return
        if channel not in self.session.cut:
            frame = self.session.cut_stream(channel, info)
            self.send_bytes(self.transport.codec.encode(frame), None)

    @property
    def user(self) -> str | None:
        return self.session.claims.user if self.session.claims else None

    def close_after_flush(self, reason: str) -> None:
        if self.closing is None:
            goodbye = self.transport.goodbye(reason)  # a WebSocket's close frame
            if goodbye:
                self.queue.append((goodbye, None))
                self.queued_bytes += len(goodbye)
            self.closing = reason
            self.wake_writer()

    @property
    def writing(self) -> bool:
        """A writer task runs (its scope is set while it does)."""
        return self.writer_scope is not None

    def abort(self) -> None:
        """Close the connection now: cancel its reader and its writer task; handle() then
        cleans up."""
        self.cancel.cancel()
        if self.writer_scope is not None:
            self.writer_scope.cancel()

    def failed(self, exc: Exception) -> None:
        """An exception ended the reader or the writer, or came from the flusher: a lost
        peer is an ordinary disconnect; anything else is a bug, which closes this
        connection only."""
        if isinstance(exc, PEER_GONE):
            self.closing = self.closing or f"connection lost: {exc!r}"
        else:
            log.error("internal error on %s (%s)", self.peer, self.user, exc_info=exc)
            self.closing = "internal error"
        self.abort()

    def wake_writer(self) -> None:
        """Wake the writer task, starting it if none runs."""
        self.has_data.set()
        if self.writer_scope is None and self.nursery is not None:
            self.writer_scope = trio.CancelScope()
            self.writer_done = trio.Event()
            self.nursery.start_soon(self.writer, self.writer_scope)

    async def stop_writer(self) -> None:
        """The connection is closing: start no more writer tasks, and end a running one
        (cancelled; waited for a second at most, also while the server is being
        cancelled) before the socket is closed. Without one: no wait, no scopes."""
        self.nursery = None
        if self.writer_scope is not None:
            self.writer_scope.cancel()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.writer_done.wait()

    async def writer(self, scope: trio.CancelScope) -> None:
        """Send what the flusher could not, coalescing whatever is queued into one
        write, until the queue is empty; then hand the socket back to the flusher and
        end (an idle connection has no writer task), or close
        the connection if it is closing. ``scope`` is for the task's life: abort() and
        stop_writer() cancel it. Each write waits for the peer for at most
        ``send_timeout_s``, under a deadline of its own: a write that completes is sent,
        however late."""
        timeout = self.server.settings.send_timeout_s
        try:
            with scope:
                while True:
                    await self.has_data.wait()
                    self.has_data = trio.Event()
                    self.blocked = True
                    if self.write_error is not None:  # as trio's send_all would have
                        exc, self.write_error = self.write_error, None
                        if isinstance(exc, trio.BrokenResourceError):
                            raise exc
                        msg = f"socket connection broken: {exc}"
                        raise trio.BrokenResourceError(msg) from exc
                    while self.pending or self.queue or self.backlogged:
                        data = self.pending + self._take_queue() if self.queue else self.pending
                        self.pending = b""
                        if not await self._send(data, timeout):
                            reason = f"send timeout: the peer read nothing for {timeout:g} s"
                            self.closing = self.closing or reason
                            self.abort()
                            return
                    self.blocked = self.try_send is None
                    if self.closing is not None and not self.queue:
                        self.abort()
                        return
                    if not self.blocked:
                        return  # the flusher's again
        except Exception as exc:  # never into the server's nursery: it would stop the server
            self.failed(exc)
        finally:
            self.writer_scope = None
            self.has_data = SET  # the next writer task starts with data to send
            self.writer_done.set()  # stop_writer() holds it if it waits
            self.writer_done = SET

    async def _send(self, data: bytes, timeout: float) -> bool:
        """The writer's write of ``data`` (after a TLS stream's backlog), in steps of at
        most ``WRITE_CHUNK`` bytes, each under a ``timeout`` deadline of its own: False
        when the peer took nothing of a step for that long. One deadline for all of it (up
        to twice ``max_queue_bytes``) closed a peer that kept reading, only slower than
        that many bytes per ``send_timeout_s``. A step that completes is sent, however
        late."""
        stream = self.stream
        if type(stream) is TlsStream:
            while stream.backlog:
                with trio.move_on_after(timeout) as sending:
                    await stream.write_backlog(WRITE_CHUNK)
                if sending.cancelled_caught:
                    return False
        view = memoryview(data)
        for start in range(0, len(view), WRITE_CHUNK):
            with trio.move_on_after(timeout) as sending:
                await stream.send_all(view[start : start + WRITE_CHUNK])
            if sending.cancelled_caught:
                return False
        return True

    async def wait_writable(self) -> None:
        """Reader backpressure: wait while replies pile up or writes are in flight."""
        try:
            while self.queued_bytes > self.limit // 2:
                self.held = True
                self.drained = trio.Event()  # armed by the waiter: setting one costs nothing
                await self.drained.wait()
            while self.inflight >= self.server.settings.max_inflight:
                self.held = True
                self.inflight_freed = trio.Event()
                await self.inflight_freed.wait()
        finally:
            self.held = False
            self.drained = self.inflight_freed = SET

    async def reader(self, first_input: bytes = b"") -> None:
        """Decode frames and hand them to the session. Two deadlines guard the reads:
        hello must arrive within ``hello_timeout_s``, and a frame once started must
        complete within ``frame_timeout_s`` (slowloris); idle peers are the ticker's.
        ``first_input``: bytes already read (after a WebSocket upgrade request).

        Past its hello, a connection with no partial frame (and no TLS input left to
        decrypt) parks in the server's poller (server/poller.py), which reads it and
        handles its frames in :meth:`input` without waking this task, until there is
        something to await."""
        session, server, transport = self.session, self.server, self.transport
        self.decoder = decoder = transport.decoder(
            session.limits.max_frame, session.limits.max_depth
        )
        settings = server.settings
        # A WebSocket client sends its hello once it has read the 101: not there yet.
        receive = receive_of(self.stream, first_input, drained=transport is not TCP)
        park = None  # waits in the poller until it hands the connection back
        stream = self.stream
        tls = stream if isinstance(stream, TlsStream) else None
        if server.poller is not None and isinstance(stream, trio.SocketStream | TlsStream):
            park = functools.partial(server.poller.park, stream.socket.fileno(), self)
        hello_deadline = trio.current_time() + settings.hello_timeout_s
        partial_since = math.inf  # when the incomplete frame in the decoder began
        while self.closing is None:
            if session.state is State.AWAITING_HELLO:
                deadline, code = hello_deadline, E.HELLO_TIMEOUT
            else:
                deadline, code = partial_since + settings.frame_timeout_s, E.FRAME_TIMEOUT
            if deadline == math.inf and park is not None and not (tls is not None and tls.buffered):
                await park()
                handoff, self.handoff = self.handoff, None
                if type(handoff) is Rest:
                    frames, read, arrived, partial_since = handoff
                    handoff = None  # while it waits, an idle connection keeps no input
                    if read is not None:
                        await self.read(read)
                    if not await self._dispatch(frames, arrived) or transport.ended:
                        return
                    frames, read = [], None
                    continue
                if isinstance(handoff, FrameError):
                    server.perform(self, session.frame_error(handoff))
                    return
                if isinstance(handoff, Exception):  # a lost peer, or a bug (Connection.failed)
                    raise handoff
                return  # EOF: handle() still delivers pending acks
            if deadline == math.inf:  # no frame begun: idle peers are the ticker's
                data: bytes | bytearray | None = await receive()
            else:
                data = await receive_before(receive, deadline)
            if data is None:
                server.perform(self, session.timed_out(code))
                return
            if not data:
                return  # the peer closed its side: handle() still delivers pending acks
            # The TCP port only: on a WebSocket such bytes are a frame like any other (a
            # protocol violation, section 19.2), and a plain-text answer would corrupt it.
            if session.state is State.AWAITING_HELLO and transport is TCP and not decoder.buffered:
                if data[:8].startswith(HTTP_METHODS):  # a browser, curl: say where to go
                    self.send_bytes(http_hint(settings), None)
                    self.close_after_flush(f"{HTTP_REQUEST}: {bytes(data[:8])!r}")
                    return
            try:
                frames = self._decode(data)
            except FrameError as exc:
                server.perform(self, session.frame_error(exc))
                return
            if not decoder.buffered:
                partial_since = math.inf
            elif frames or partial_since == math.inf:
                partial_since = trio.current_time()  # the deadline is per frame
            if not await self._dispatch(frames, server.now_ms()) or transport.ended:
                return
            data, frames = b"", []  # while it waits, an idle connection keeps no input

    def input(self, data: bytes | OSError) -> bool:
        """The poller's read of this parked connection: its frames decoded and handled
        here (TLS: once decrypted) by :meth:`_handle_frames`, without waking the reader
        task. False, with what the task goes on with in ``handoff``, when it has something
        to await: EOF (close_notify, a WebSocket close too) or an error, a frame error, a
        partial frame, backpressure, a store read, closing, or a burst of frames longer
        than ``YIELD_EVERY_S``."""
        if isinstance(data, OSError):  # as FdReceive reports it
            exc = trio.BrokenResourceError(f"socket connection broken: {data}")
            exc.__cause__ = data
            self.handoff = exc
            return False
        if not data:
            self.handoff = data
            return False
        server, stream = self.server, self.stream
        eof = False
        try:
            if type(stream) is TlsStream:
                data, eof = stream.decrypt(data)  # b"" while a record is incomplete
            frames = self._decode(data) if data else []
            assert self.decoder is not None
            partial_since = trio.current_time() if self.decoder.buffered else math.inf
            arrived = server.now_ms()
            i, read = self._handle_frames(frames, 0, arrived, time.perf_counter())
            if read is not None or i < len(frames):  # the rest is the task's
                self.handoff = Rest(frames[i:], read, arrived, partial_since)
                return False
        except Exception as exc:  # a FrameError, or a bug: the task's to report
            self.handoff = exc
            return False
        if eof or self.transport.ended:  # close_notify, a WebSocket close: as an EOF
            self.handoff = b""
            return False
        if partial_since != math.inf or self.closing is not None:
            self.handoff = Rest([], None, 0, partial_since)
            return False
        return True

    def _decode(self, data: bytes | bytearray) -> list[dict[str, Any]]:
        """The frames ``data`` completes (FrameError on bad input); a WebSocket's pongs
        are queued, except for a peer that reads nothing."""
        assert self.decoder is not None
        frames = self.decoder.feed(data)
        control = self.transport.take_control()
        if control and self.queued_bytes + len(control) <= self.limit // 2:
            self.send_bytes(control, None)
        return frames

    async def _dispatch(self, frames: list[dict[str, Any]], arrived: int) -> bool:
        """Hand decoded frames to the session (:meth:`_handle_frames`), awaiting what it
        stops for: a read, backpressure, a yield to other connections; False once the
        connection is closing."""
        i, since = 0, time.perf_counter()
        while True:
            i, read = self._handle_frames(frames, i, arrived, since)
            if read is not None:
                await self.read(read)
                since = time.perf_counter()
            elif i == len(frames):
                return True
            elif self.closing is not None:
                return False
            elif time.perf_counter() - since > YIELD_EVERY_S:
                await trio.lowlevel.checkpoint()
                since = time.perf_counter()
            else:
                await self.wait_writable()  # not per frame: an await costs as much as a send

    def _handle_frames(
        self, frames: list[dict[str, Any]], i: int, arrived: int, since: float
    ) -> tuple[int, Read | None]:
        """Hand ``frames[i:]`` to the session, one at a time, until one must wait: while
        the replies queued exceed half of ``max_queue_bytes`` or ``max_inflight`` writes
        wait for the store (backpressure), once the connection is closing, or after
        ``YIELD_EVERY_S`` since ``since`` (others' turn). Returns the index of the first
        frame not handled, and the read the last handled one needs (begun), if any. Every
        frame counts as received at ``arrived``, when it was read (the frame rate limit
        charges a pipelined burst at once, however long handling it takes). While the
        server drains, frames are read and dropped (unread input would make the close
        send a reset)."""
        server, session, metrics = self.server, self.session, self.server.metrics
        half, most = self.limit // 2, server.settings.max_inflight
        while i < len(frames):
            if (
                self.queued_bytes > half
                or self.inflight >= most
                or self.closing is not None
                or time.perf_counter() - since > YIELD_EVERY_S
            ):
                return i, None
            if server.draining:
                return len(frames), None
            frame = frames[i]
            i += 1
            t = frame.get("t")
            metrics.frame_in(t)
            if t == "sync" and self.first_sync:  # a sync from a position: a resume
                self.first_sync = False
                since_seq = frame.get("since")
                if type(since_seq) is int and since_seq > 0 and not session.cut:
                    metrics.resumes.inc()
            self.next_check = 0
            read = server.perform(self, session.receive_frame(frame, arrived))
            if read is not None:
                self.begin_read(read)  # at once: see begin_read
                return i, read
        return i, None


def encode_frame(codec: Codec, frame: dict[str, Any]) -> bytes:
    """``frame`` as ``codec`` writes it. An entry stored before the send checks of
    section 6.4 may hold a meta that cannot be written (deeper than a page allows, a float
    JSON has no form for): then the frame goes with that entry's meta left out."""
    try:
        return codec.encode(frame)
    except ValueError as exc:
        fixed = without_unsendable_meta(frame)
        if fixed is None:
            raise
        log.warning(
            "%s of channel %r sent without the meta of an entry stored before the send "
            "checks (%s)", frame.get("t"), frame.get("channel"), exc,
        )  # fmt: skip
        return codec.encode(fixed)


def _encoded(frame: dict[str, Any], codec: Codec, cache: dict[Codec, bytes]) -> bytes:
    """``frame`` as ``codec`` writes it, encoded once per fan-out (``cache``)."""
    data = cache.get(codec)
    if data is None:
        data = cache[codec] = encode_frame(codec, frame)
    return data


class RemoteHop:
    """What a shared engine reports from its own thread (other nodes' entries, signals,
    losses; the store's ``Remote`` hook), handed to the server on the event loop."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def _soon(self, fn: Callable[..., None], *args: Any) -> None:
        token = self.server._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):  # the server has stopped
                token.run_sync_soon(fn, *args)

    def entries(self, entries: list[RemoteEntry]) -> None:
        self._soon(self.server._remote_entries, entries)

    def signal(self, channel: str, frame: dict[str, Any]) -> None:
        self._soon(self.server._remote_signal, channel, frame)

    def lost(self, channels: list[str]) -> None:
        self._soon(self.server._remote_lost, channels)


class Server:
    def __init__(
        self,
        settings: Settings,
        verifier: TokenVerifier,
        *,
        wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
        inline_reads: bool = False,
        dev_issuer: TokenIssuer | None = None,
    ) -> None:
        self.settings = settings
        # The WebSocket port's requests (setting ws); dev_issuer: --dev's token endpoint.
        self.web = Web(self, dev_issuer if settings.dev else None)
        self.ws_port: int | None = None  # the WebSocket port, when serving it
        # Reads in the trio thread: only for a deterministic simulation or a test on
        # trio's mock clock (which jumps ahead while the loop waits for a thread).
        self.inline_reads = inline_reads
        self.verifier = verifier
        self.members: dict[str, set[Connection]] = collections.defaultdict(set)
        # Work for the end of the scheduling round (the flusher task): connections' writes
        # for the store, and connections with queued frames to write.
        self._to_submit: list[WriteOp] = []
        self._to_flush: list[Connection] = []
        self._round_due = trio.Event()
        self.connections: dict[Session, Connection] = {}
        self.devices: dict[str, set[Connection]] = {}  # user -> connected devices
        # The connected users' memberships (server/memberships.py): on a shared engine
        # read again from it (_memberships_loader, woken by _members_due) whenever they
        # may have changed. ``memberships``: user -> channels, while connected.
        self._members_due = trio.Event()
        self.copies = MembershipCopies(lambda: self._members_due.set())
        self.memberships = self.copies.sets
        self._latest_presence = LatestPresence(0.0)  # (kept two TTLs once the store is open)
        self._latest_read = LatestPresence(READ_ORDER_KEEP_S)  # "<channel>\0<user>" -> seq
        # (channel, user) -> when other nodes' typing `on` runs out here (ms): _remote_typing
        self._typing_elsewhere: dict[tuple[str, str], int] = {}
        # Presence changes for a shared engine, in order: user -> (status, CONNECTED or
        # None, ms, channels, a status set to write first or None), a user's latest only
        # (_presence_writer), and how many are written.
        self._presence_queue: dict[
            str, tuple[str | None, int, list[str] | None, str | None, Claims | None]
        ] = {}
        self._presence_due = trio.Event()
        self._presence_writing = 0
        self.relay: Relay[dict[str, Any]] = Relay()
        # This node's writes of entries (messages, edits, deletes) handed to the store and
        # not handed back yet (on_batch): id(op) -> serial, oldest first. A gap read waits
        # for those submitted before it returned (_writes_settled): an entry it found may
        # be one of them, whose `ok` must precede its event (PROTOCOL.md 9, rule 6).
        # Kept on a shared engine only (one node's relay never reads a gap).
        self._unsettled: dict[int, int] = {}
        self._track_unsettled = False  # set by run()
        self._write_serials = itertools.count(1)
        self._settled = trio.Event()
        # Store reads of requests run in the read threads (run_read), read_threads at once.
        self.reads: ReadThreads | None = None  # made by run(), unless inline_reads
        self.metrics = metrics = Metrics()  # docs/metrics.md; served with --metrics
        self._limited = metrics.limited  # one bound method for every session
        self._tasks: trio.Nursery | None = None  # run()'s handler nursery
        metrics.connections.set_function(lambda: len(self.connections))
        metrics.queued_bytes.set_function(
            lambda: sum(c.queued_bytes for c in self.connections.values())
        )
        metrics.store_lag.set_function(lambda: self._store_health()[1])
        metrics.store_failed.set_function(lambda: self._store_health()[0] is not None)
        metrics.presence_unwritten.set_function(lambda: self.presence_unwritten)
        self.metrics_port: int | None = None  # the HTTP endpoints' port, when serving them
        self._ids = itertools.count(1)
        limits = settings.limits
        self.user_limits = UserLimits(limits)  # shared by all sessions of a user
        self.ip_connections = Buckets(settings.ip_connect_rate, settings.ip_connect_burst)
        self.ip_login_failures = Buckets(settings.ip_login_fail_rate, settings.ip_login_fail_burst)
        # Open sockets (refused ones until closed, too) in all and per IP, and sessions
        # past hello per user: the connection caps (PROTOCOL.md 16.3).
        self.open_sockets = 0
        # How many connections the accept loops take at once: what the cap leaves.
        self.gate = Gate(lambda: self.max_connections() - self.open_sockets)
        self.open_by_ip: collections.Counter[str] = collections.Counter()
        self.open_by_user: collections.Counter[str] = collections.Counter()
        self._wall_ms = wall_ms  # the wall clock (injected by the simulation)
        self._clock_base = (wall_ms(), 0.0)  # wall ms at a trio time
        self._token: trio.lowlevel.TrioToken | None = None
        self.store: Store  # opened in run()
        self.port = 0
        self.stopping = trio.Event()
        self.draining = False  # shutting down: no new requests are read
        self.poller: Poller | None = None  # reads the idle connections; made in run()
        self.tls: TlsConfig | None = None  # loaded here: a bad file fails at startup
        if settings.tls_cert_file:
            self.tls = server_tls_context(
                settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
            )

    # ------------------------------------------------------------------ writes

    def want_flush(self, conn: Connection) -> None:
        self._round_due.set()
        self._to_flush.append(conn)

    async def _flusher(self) -> None:
        """Once per scheduling round in which there is work: submit the round's writes,
        then write every connection that queued frames (see the module docstring). A
        connection is listed at its first queued frame, or again if its writer task
        emptied the queue since (flushing it twice is harmless)."""
        while True:
            await self._round_due.wait()
            self._round_due = trio.Event()
            if self._to_submit:
                self._submit_round()
            conns, self._to_flush = self._to_flush, []
            for conn in conns:
                try:
                    conn.flush()
                except Exception as exc:  # a bug: it closes this connection, not the server
                    conn.failed(exc)

    # ------------------------------------------------------------------ actions

    def perform(self, conn: Connection | None, actions: list[Action]) -> Read | None:
        """Carry out a session's actions; a read among them (at most one, the last) is
        returned for the connection's reader to run (:meth:`Connection.read`)."""
        read: Read | None = None
        for action in actions:
            # The most frequent first (a reply, a write, an event); exact types: no subclasses.
            if type(action) is Reply and conn is not None:
                conn.send_frame(action.frame)
            elif type(action) is Submit and conn is not None:
                self.submit(conn, action.op)
            elif type(action) is Publish:
                self.publish_action(action)
            elif type(action) is NotifyUser:
                self.notify_user(action.user, action.frame)
            elif conn is None:
                if type(action) is Submit:  # a write done's follow-up (a DM's peer)
                    self._round_due.set()
                    self._to_submit.append(action.op)
                continue
            elif isinstance(action, Subscribe):
                self.subscribe(conn, action.channel)
            elif isinstance(action, Unsubscribe):
                self.unsubscribe(conn, action.channel)
            elif isinstance(action, Position):
                out = self.relay.position(action.channel, action.epoch, action.head, self.now_ms())
                self.deliver(action.channel, out)
            elif isinstance(action, Close):
                log.info("closing %s (%s): %s", conn.peer, conn.user, action.reason)
                conn.close_after_flush(action.reason)
            elif isinstance(action, Read):
                read = action
            elif isinstance(action, SetPresence):
                read = self._set_presence(conn, action.status)
            elif isinstance(action, QueryPresence):
                read = self._query_presence(conn, action.rid, action.users)
        return read

    async def run_read(self, query: Callable[[], T]) -> T:
        """A request's store reads, in one of the server's read threads: a long scan or a
        network store's round trip never stalls the event loop."""
        if self.inline_reads:
            await trio.lowlevel.checkpoint()
            return query()
        start = time.perf_counter()
        assert self.reads is not None, "made by run()"
        try:
            return await self.reads.run(query)
        finally:
            self.metrics.read_seconds.observe(time.perf_counter() - start)

    # ------------------------------------------------------------------ presence
    #
    # Who shares a channel with whom: the durable memberships (at most max_memberships a
    # user). Those of connected users are kept here, loaded when their first device
    # connects, so a presence change or query walks a bounded set in memory.

    def _set_presence(self, conn: Connection, status: str | None) -> Read | None:
        """A device connected (``None``) or the user set a status. Pushed once per
        change, not once per device."""
        user = conn.user
        assert user is not None
        if user not in self.memberships:  # its first device: load them first
            store, most = self.store, self.settings.limits.max_memberships
            started = time.monotonic()

            def query() -> tuple[list[str], int] | None:
                try:
                    return store.memberships_versioned([user], most)[user]
                except StoreUnavailable:  # the device counts all the same (the engine's
                    return None  # refresh records it once back)

            def then(got: tuple[list[str], int] | None) -> list[Action]:
                self.copies.first_read(user, got, started)
                self._use_memberships(conn)
                self._presence_changed(conn, status)
                return []

            return Read(query, then, None, "presence")
        self._use_memberships(conn)
        self._presence_changed(conn, status)
        return None

    async def _memberships_loader(self) -> None:
        """On a shared engine: read the sets of memberships marked stale, in batches of at
        most ``MEMBERS_BATCH`` users (one round trip); a read that fails is tried again
        after a pause (the engine is away)."""
        copies = self.copies
        most, pause = self.settings.limits.max_memberships, MEMBERS_RETRY_S
        while True:
            if not copies.stale:
                self._members_due = trio.Event()
                await self._members_due.wait()
            taken = copies.take_stale(MEMBERS_BATCH)
            read = functools.partial(self.store.memberships_versioned, list(taken), most)
            try:
                got = await self.run_read(read)
            except Exception as exc:
                log.warning("memberships of %d users not read: %r", len(taken), exc)
                copies.read_failed(taken)
                await trio.sleep(pause)
                pause = min(2 * pause, MEMBERS_RETRY_MAX_S)
                continue
            pause = MEMBERS_RETRY_S
            for owed in copies.read_done(taken, got):  # announced before the set was known
                self._presence_moved(owed.user, "", owed.status, owed.ts, owed.channels, owed.order)

    async def _check_memberships(self) -> None:
        """The versions of the connected users' sets in the engine: a set whose version
        moved since it was read here (a notice lost on the way) is read again."""
        users = self.copies.versioned()
        for i in range(0, len(users), MEMBERS_BATCH * 4):
            batch = users[i : i + MEMBERS_BATCH * 4]
            read = functools.partial(self.store.membership_versions, batch)
            self.copies.check_versions(await self.run_read(read))

    def _use_memberships(self, conn: Connection) -> None:
        """The session's joins count on this node's set of the user's memberships, which
        is exact on one node. On a shared engine another node's join or forget reaches
        the set a moment later (a notice through the engine), so a join asks the store
        (a membership must never be left unrecorded because this node thought it was)."""
        shared = self.store.presence.shared
        conn.session.memberships = None if shared else self.memberships.get(conn.user or "")

    def _presence_changed(self, conn: Connection, status: str | None) -> None:
        user = conn.user
        assert user is not None
        devices = self.devices.setdefault(user, set())
        first = not devices
        devices.add(conn)
        if status is None:  # a device connected: the user's status stays, or is "online"
            if not first:
                return
            status = CONNECTED
        self._announce(conn, status)  # the store tells whether the user's status changed

    def _device_gone(self, conn: Connection) -> None:
        user = conn.user
        devices = self.devices.get(user or "")
        if user is None or devices is None or conn not in devices:
            return
        devices.discard(conn)
        if devices:
            return
        del self.devices[user]
        # Always, "offline" set by the user too: this node's entry ends (no push if the
        # user's status across nodes does not change).
        self._announce(conn, None)
        self.copies.forget(user)
        if self.store.presence.shared:
            return  # last_seen: written by the engine with the user's last entry anywhere
        try:
            self.store.submit(WriteOp("seen", "", user))  # last_seen, kept across restarts
        except StoreUnavailable:
            log.warning("store closed: last_seen of %s not recorded", user)

    def _announce(self, conn: Connection, status: str | None) -> None:
        """This node's status of the device's user changed (None: its last device here
        is gone). Recorded in the store; when that changes the user's status across
        nodes, it is pushed to the members here and on the other nodes (of the channels
        the user is a member of and may still read, by the token of this device)."""
        claims = conn.session.claims
        assert claims is not None
        user, presence, now = claims.user, self.store.presence, self.now_ms()
        channels = self.copies.channels_for(user, claims)
        if not presence.shared:  # in memory: no need to leave the loop
            self._presence_moved(user, *presence.set(user, status, now), now, channels or [])
            return
        # On the engine, off the loop, in order (a quick connect and disconnect must not
        # reach the engine reversed), in batches: _presence_writer. A change still
        # waiting is replaced by the user's next one (moved to the end): what is written
        # and announced is the net change, and the queue holds one change per user
        # however long the engine is slow or away. A status set that a device change
        # replaces is kept with it, to be written first: the status is the user's, and
        # stays for the user's devices on other nodes ("away", then the app closes).
        prev = self._presence_queue.pop(user, None)
        first = None
        if status is None or status == CONNECTED:
            if prev is not None:
                first = prev[3] if prev[0] is None or prev[0] == CONNECTED else prev[0]
        self._presence_queue[user] = (status, now, channels, first, claims)
        self._presence_due.set()

    @property
    def presence_unwritten(self) -> int:
        """Presence changes queued or being written to a shared engine."""
        return len(self._presence_queue) + self._presence_writing

    async def _presence_writer(self) -> None:
        """On a shared engine: the presence changes queued meanwhile, at most
        ``PRESENCE_BATCH`` in one call (one round trip), one batch at a time, in order."""
        presence, queue = self.store.presence, self._presence_queue
        while True:
            if not queue:
                self._presence_due = trio.Event()
                await self._presence_due.wait()
            batch = list(itertools.islice(queue.items(), PRESENCE_BATCH))
            for user, _ in batch:
                del queue[user]
            changes = [(user, status, now, first) for user, (status, now, _, first, _) in batch]
            self._presence_writing = len(batch)
            try:
                try:
                    results = await self.run_read(functools.partial(presence.set_many, changes))
                except Exception as exc:  # the engine is down: the TTL corrects it later
                    results = [exc] * len(batch)
                for (user, (_, now, channels, _, claims)), result in zip(
                    batch, results, strict=True
                ):
                    if isinstance(result, Exception):
                        log.warning("presence of %s not recorded: %r", user, result)
                    else:
                        self._presence_result(user, *result, now, channels, claims, result.order)
            finally:
                self._presence_writing = 0

    def _presence_result(
        self,
        user: str,
        before: str,
        after: str,
        now: int,
        channels: list[str] | None,
        claims: Claims | None,
        order: int,
    ) -> None:
        """A change written to the engine (its ``order`` there): pushed, or (``channels``
        None: the user's memberships not read yet here) pushed once they are read, if the
        user is still connected here by then."""
        if channels is None:
            channels = self.copies.channels_for(user, claims)  # read since: known now
        if channels is not None:
            self._presence_moved(user, before, after, now, channels, order)
        elif before != after and user in self.devices:
            self.copies.owe(user, claims, after, now, order)

    def _presence_moved(
        self, user: str, before: str, after: str, now: int, channels: list[str], order: int = 0
    ) -> None:
        """A change of the user's status across nodes, with its ``order`` in the engine
        (0: one node's store), pushed here and to the other nodes, unless a later change
        of the user's was handled here already (presence_order.py)."""
        if before == after or not self._latest_presence.fresh(user, order, time.monotonic()):
            return
        frame = {"t": "presence", "user": user, "status": after, "ts": now}
        self._push_presence(frame, channels)
        self.store.publish_signal(PRESENCE_TOPIC, {**frame, "channels": channels, "order": order})

    def _push_presence(self, frame: dict[str, Any], channels: list[str]) -> None:
        """Once to every connection here joined to any of ``channels``."""
        encoded: dict[Codec, bytes] = {}  # once per transport's codec
        recipients: set[Connection] = set()
        for channel in channels:
            members = self.members.get(channel)
            if members:
                recipients.update(members)
        for conn in recipients:
            conn.push_signal(_encoded(frame, conn.transport.codec, encoded))

    async def _presence_upkeep(self) -> None:
        """On a shared engine: keep this node's presence entries alive, and announce the
        users of dead nodes whose entries expired (offline, last_seen recorded)."""
        presence, most = self.store.presence, self.settings.limits.max_memberships
        while True:
            await trio.sleep(presence.refresh_s)
            now = self.now_ms()
            try:
                back = await self.run_read(functools.partial(presence.refresh, now))
                for moved in back:  # swept while this node was late
                    user, before, after = moved
                    channels = self.copies.channels_for(user, None)
                    self._presence_result(user, before, after, now, channels, None, moved.order)
                await self._check_memberships()  # notices lost on the way
                gone = await self.run_read(functools.partial(presence.expired, now))
                for expired in gone:  # last_seen: written by the engine as it decided
                    user, before = expired
                    channels = await self.run_read(
                        functools.partial(self.store.channels_of, user, limit=most)
                    )
                    log.info("presence of %s expired (its node is gone): offline", user)
                    self._presence_moved(user, before, OFFLINE, now, channels, expired.order)
            except Exception as exc:  # the engine is down: try again at the next round
                log.warning("presence upkeep failed: %r", exc)

    def _query_presence(self, conn: Connection, rid: int | None, users: list[str]) -> Read:
        """Presence of the asked users who share a channel with the asker (others are
        left out, so a query reveals nothing about strangers). The memberships and
        last_seen of users not connected here are read off the loop."""
        claims = conn.session.claims
        assert claims is not None
        asker = claims.user
        store, most = self.store, self.settings.limits.max_memberships
        known = {u: mine for u in (asker, *users) if (mine := self.copies.known(u)) is not None}
        absent = [u for u in dict.fromkeys((asker, *users)) if u not in known]

        now = self.now_ms()

        def query() -> tuple[dict[str, tuple[set[str], int | None]], dict[str, str]]:
            loaded = {
                u: (set(store.channels_of(u, limit=most)), store.last_seen(u)) for u in absent
            }
            # The users' statuses across nodes (the user's, whichever device set it).
            return loaded, store.presence.statuses(list(dict.fromkeys(users)), now)

        def then(
            got: tuple[dict[str, tuple[set[str], int | None]], dict[str, str]],
        ) -> list[Action]:
            loaded, connected = got

            def channels(user: str) -> set[str]:
                return known[user] if user in known else loaded[user][0]

            mine = {c for c in channels(asker) if claims.may_read(c)}
            found = []
            for user in users:
                if user != asker and mine.isdisjoint(channels(user)):
                    continue
                # "offline" also when the user set it; connected here, the engine may not
                # have it yet (a change queued, Redis away): online all the same.
                here = user in self.devices
                status = connected.get(user, "online" if here else OFFLINE)
                entry: dict[str, Any] = {"user": user, "status": status}
                entry["online"] = status != OFFLINE
                gone = user in loaded and user not in connected and not here
                seen = loaded[user][1] if gone else None
                if seen is not None:  # no device anywhere (not one set "offline")
                    entry["last_seen"] = seen
                found.append(entry)
            return [] if rid is None else [Reply({"t": "ok", "rid": rid, "users": found})]

        return Read(query, then, rid, "presence")

    # ------------------------------------------------------------------ fan-out
    #
    # A channel with members here is followed: its events, this node's commits and (on a
    # shared engine) other nodes', reach the members through the relay, which delivers
    # each seq once, in order, filling gaps from the log (server/relay.py).

    def subscribe(self, conn: Connection, channel: str) -> None:
        members = self.members[channel]
        if not members:
            self.relay.follow(channel)
            self.store.follow(channel)
        members.add(conn)

    def unsubscribe(self, conn: Connection, channel: str) -> None:
        members = self.members.get(channel)
        if members is not None:
            members.discard(conn)
            if not members:
                del self.members[channel]
                self.relay.unfollow(channel)
                self.store.unfollow(channel)

    def cut_position(self, channel: str) -> ChannelInfo:
        """Where a cut live stream's ``resync`` push says the channel stands: the store's
        head, or, when the store cannot answer (a shared engine that is away; this runs in
        the middle of a delivery, where an error would end the server), the last seq this
        node delivered (the client syncs from its own position either way)."""
        try:
            return self.store.channel(channel)
        except StoreError as exc:
            log.warning("channel %s: head not read for a cut (%s)", channel, exc)
        s = self.relay.streams.get(channel)
        last, epoch = (s.last, s.epoch) if s is not None else (None, None)
        return ChannelInfo(channel, last or 0, 0, epoch or 0)

    def deliver(self, channel: str, out: list[dict[str, Any]] | Reset) -> None:
        """What the relay let through: events in order, or a reset (every member here
        resyncs: its live stream is cut, the client syncs)."""
        if isinstance(out, Reset):
            log.warning("channel %s: events lost on the way, members resync", channel)
            info = ChannelInfo(channel, out.head, 0, out.epoch)
            for conn in list(self.members.get(channel, ())):
                conn.resync(channel, info)
            return
        for frame in out:
            self.publish(channel, frame, None)

    def _remote_entries(self, entries: list[RemoteEntry]) -> None:
        """Other nodes' commits (the engine's thread hands them over in order)."""
        now = self.now_ms()
        for r in entries:
            frame = event_frame(r.channel, r.entry)
            self.deliver(
                r.channel, self.relay.offer(r.channel, r.epoch, r.entry["seq"], frame, now)
            )

    def _remote_signal(self, channel: str, frame: dict[str, Any]) -> None:
        if channel == PRESENCE_TOPIC:  # another node's presence change or user notice
            t, to, name = frame.get("t"), frame.pop("to", None), frame.get("channel")
            if t in ("membership", "unmember") and isinstance(to, str) and isinstance(name, str):
                # Another node recorded it: the set is read again, not changed by the
                # notice (notices of two nodes may come reordered, or one not at all).
                self.copies.note_notice(to, time.monotonic())
                if t == "membership":
                    self._notify_here(to, frame)
                return
            channels, order = frame.pop("channels", None), frame.pop("order", 0)
            if frame.get("t") == "presence" and isinstance(channels, list):
                user, latest = frame.get("user"), self._latest_presence
                if isinstance(order, int) and isinstance(user, str):
                    if not latest.fresh(user, order, time.monotonic()):
                        return  # older than a change of the user's handled here: dropped
                self._push_presence(frame, channels)
            return
        if frame.get("t") == "typing" and not self._remote_typing(channel, frame):
            return
        if frame.get("t") == "read" and not self._read_moved(channel, frame):
            return
        self.publish(channel, frame, frame.get("user") if frame.get("t") == "typing" else None)

    def _remote_typing(self, channel: str, frame: dict[str, Any]) -> bool:
        """Another node's typing push: its `on` expires here too, after the typer's node's
        own timeout (``timeout_ms``, taken off the frame) and TYPING_GRACE_MS, in case
        that node dies before it sends the `off` (its session's timer would have;
        PROTOCOL.md 6.10). Whether to push it here: an `off` of an `on` that ran out here
        already (its node late) is not pushed a second time."""
        user, timeout_ms = frame.get("user"), frame.pop("timeout_ms", None)
        if not isinstance(user, str):
            return False
        if frame.get("on") is True:
            if type(timeout_ms) is not int or timeout_ms <= 0:
                timeout_ms = self.settings.limits.typing_timeout_ms  # an older node's push
            self._typing_elsewhere[(channel, user)] = self.now_ms() + timeout_ms + TYPING_GRACE_MS
            return True
        return self._typing_elsewhere.pop((channel, user), None) is not None

    def _read_moved(self, channel: str, frame: dict[str, Any]) -> bool:
        """Whether a read push (this node's or another's) moves the user's cursor beyond
        the last one pushed here: each node publishes its own commits, so the pushes of
        two nodes' reads can arrive in the other order than the engine moved them."""
        user, seq = frame.get("user"), frame.get("seq")
        if not isinstance(user, str) or type(seq) is not int:
            return True
        return self._latest_read.fresh(f"{channel}\0{user}", seq, time.monotonic())

    def _expire_remote_typing(self, now: int) -> None:
        """The `off` of each other node's typing whose `on` ran out unrenewed here."""
        due = [key for key, until in self._typing_elsewhere.items() if until <= now]
        for channel, user in due:
            del self._typing_elsewhere[(channel, user)]
            off = {"t": "typing", "channel": channel, "user": user, "on": False}
            self.publish(channel, off, user)

    def _remote_lost(self, channels: list[str]) -> None:
        if PRESENCE_TOPIC in channels:  # notices of other nodes' membership changes too
            self.copies.all_changed()
        now = self.now_ms()
        for channel in channels:
            self.relay.check(channel, now)
        self._round_due.set()

    async def _fill_gaps(self) -> None:
        """Read from the log the gaps the relay has waited on long enough."""
        limits = self.settings.limits
        while True:
            await trio.sleep(GAP_CHECK_S)
            for channel, since in self.relay.due(self.now_ms()):
                try:
                    page = await self.run_read(
                        functools.partial(self.store.sync, channel, since, limits.sync_max)
                    )
                except Exception as exc:  # the store is unreachable: try again later
                    log.warning("filling a gap of %s from the log failed: %r", channel, exc)
                    self.relay.filled(channel, 0, since, [], self.now_ms(), retry=True)
                    continue
                await self._writes_settled()
                entries = [(e["seq"], event_frame(channel, e)) for e in page.entries]
                out = self.relay.filled(
                    channel, page.epoch, page.head, entries, self.now_ms(),
                    resync=page.resync, more=page.more,
                )  # fmt: skip
                self.deliver(channel, out)

    async def _writes_settled(self) -> None:
        """Until this node's entry writes submitted so far are handed back (their `ok`
        queued and their event offered to the relay): a log read may have found them
        committed before their batch came back, and the relay must not push an entry to
        its sender before the `ok` (PROTOCOL.md 9, rule 6)."""
        upto = next(self._write_serials)
        while self._unsettled and next(iter(self._unsettled.values())) < upto:
            self._settled = trio.Event()
            await self._settled.wait()

    def notify_user(self, user: str, frame: dict[str, Any]) -> None:
        """A notice to every device of ``user``: those here, and (through the engine's
        presence topic) those on other nodes."""
        self._notify_here(user, frame)
        self.store.publish_signal(PRESENCE_TOPIC, {**frame, "to": user})

    def _notify_here(self, user: str, frame: dict[str, Any]) -> None:
        # Another user's doing (a DM peer's message): presence walks it too. The user's
        # own joins are in the set since their submit (in order with a later forget,
        # which this notice, sent after the join's commit, must not undo).
        if frame.get("t") == "membership" and frame.get("by") != user:
            if isinstance(frame.get("channel"), str):
                self.copies.joined_by_other(user, frame["channel"])
        devices = self.devices.get(user)
        if devices:
            encoded: dict[Codec, bytes] = {}  # once per transport's codec (TCP, WebSocket)
            for conn in devices:
                conn.push_signal(_encoded(frame, conn.transport.codec, encoded), frame["t"])

    def publish_action(self, action: Publish) -> None:
        """A session's push: events go through the relay (in order, once); signals
        reach this node's members, and the other nodes' through the engine."""
        frame, channel = action.frame, action.channel
        if frame["t"] == "event":
            if not self.relay.follows(channel):
                return  # no member on this node (and no clock read for nothing)
            out = self.relay.offer(
                channel, action.epoch or None, frame["seq"], frame, self.now_ms()
            )
            self.deliver(channel, out)
            return
        if frame["t"] == "typing":  # read pushes: the engine publishes them with the cursor
            # with this node's timeout: the other nodes expire an `on` after it (a node
            # that dies mid-typing sends no `off`), however their own is set
            timeout_ms = self.settings.limits.typing_timeout_ms
            self.store.publish_signal(channel, {**frame, "timeout_ms": timeout_ms})
        elif frame["t"] == "read" and not self._read_moved(channel, frame):
            return  # a later read of the user's was pushed here already
        self.publish(channel, frame, action.skip_user)

    def publish(self, channel: str, frame: dict[str, Any], skip_user: str | None) -> None:
        members = self.members.get(channel)
        if not members:
            return
        encoded: dict[Codec, bytes] = {}  # once for every member of a transport's codec
        sent = 0
        codec, data = None, b""  # the last member's: most members share one codec
        for conn in members:
            if skip_user is not None and conn.user == skip_user:
                continue
            if conn.transport.codec is not codec:
                codec = conn.transport.codec
                data = _encoded(frame, codec, encoded)
            if conn.send_bytes(data, channel):
                sent += 1
        if sent:
            self.metrics.deliveries.inc(sent)
            self.metrics.frames_out_of(frame["t"], sent)

    def submit(self, conn: Connection, op: WriteOp) -> None:
        """A connection's write, handed to the store with the round's others (below)."""
        if op.kind in ("member", "unmember") and op.user == conn.user:
            # the connected user's memberships, here (another user's, a DM peer's, once
            # the store recorded it: notify_user)
            self.copies.own_change(op.user, op.kind, op.channel)
        self._round_due.set()
        self._to_submit.append(op)
        conn.inflight += 1

    def _submit_round(self) -> None:
        """The writes of this round, to the store in one call: one wake-up of its writer
        thread, not one per write. If the store refuses them, each fails alone."""
        ops, self._to_submit = self._to_submit, []
        if self._track_unsettled:
            for op in ops:
                if op.kind in ENTRY_KINDS:
                    self._unsettled[id(op)] = next(self._write_serials)
        try:
            self.store.submit(*ops)  # all or nothing
            return
        except StoreUnavailable as exc:
            error = exc
        except Exception as exc:  # a bug: these writes fail, the server goes on
            log.exception("submitting %d writes to the store failed", len(ops))
            error = StoreUnavailable(f"internal error: {exc!r}")
        for op in ops:
            op.error = error
        self.on_batch(ops)

    def on_batch(self, batch: list[WriteOp]) -> None:
        """A committed batch, in commit order (runs in the trio thread)."""
        metrics, connections, now = self.metrics, self.connections, time.monotonic()
        acks, appended = metrics.ack_seconds, dict.fromkeys(metrics.appends, 0)
        if self._unsettled:
            for op in batch:
                self._unsettled.pop(id(op), None)
            self._settled.set()
        for op in batch:
            result = op.result
            if type(result) is AppendResult and op.error is None and not result.dup:
                appended[op.kind] += 1  # counted per batch, not per write
            if op.kind in ("member", "unmember"):  # a read of the set may have missed it
                recorded = op.kind == "unmember" or op.changed  # (not: a member already, or
                failed = op.error is not None  # a join at the bound: the copy was ahead)
                self.copies.committed(op.user, op.kind, op.channel, failed, recorded)
            session: Session | None = op.origin
            if session is None:
                continue  # the server's own write (last_seen)
            if op.rid is not None and op.queued_at:  # a client waits for this reply
                acks.observe(now - op.queued_at)
            conn = connections.get(session)
            if conn is not None:
                conn.inflight -= 1
                conn.inflight_freed.set()  # its reader may wait for in-flight room
            if op.kind == "unmember" and op.error is None:  # other nodes' sets of it
                notice = {"t": "unmember", "channel": op.channel, "to": op.user}
                self.store.publish_signal(PRESENCE_TOPIC, notice)
            self.perform(conn, session.write_done(op))
        for kind, n in appended.items():
            if n:
                metrics.appends[kind].inc(n)

    def _notify(self, batch: list[WriteOp]) -> None:
        """Called by the store's writer thread."""
        assert self._token is not None
        self._token.run_sync_soon(self.on_batch, batch)

    # ------------------------------------------------------------------ connections

    def now_ms(self) -> int:
        """Wall-clock ms that advance with trio's clock (so a test's mock clock drives
        every timer: heartbeats, typing expiry, token expiry)."""
        wall, base = self._clock_base
        return wall + round((trio.current_time() - base) * 1000)

    def max_connections(self) -> int:
        """The cap on open client connections: the setting, never above RLIMIT_NOFILE
        (read now: an operator's prlimit counts at once) minus FD_RESERVE."""
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return connection_cap(self.settings.max_connections, nofile)

    def _admission(self, host: str) -> Refusal | None:
        """Whether a new connection from ``host`` may go on to its session (section 4,
        "Admission"): the caps first (they spend no token), then the per-IP buckets."""
        cap = self.max_connections()
        if self.open_sockets >= cap:
            message = f"the server is at its connection limit ({cap} connections)"
            return Refusal(CAP_RETRY_AFTER_MS, "max_connections", message, True)
        most = self.settings.ip_max_connections
        if self.open_by_ip[host] >= most:
            message = f"too many connections from this address (ip_max_connections {most})"
            return Refusal(CAP_RETRY_AFTER_MS, "ip_connections", message, True)
        now = self.now_ms()
        locked = self.ip_login_failures.peek(host, now)
        if locked:
            return Refusal(locked, "ip_login", self._lockout_message(), False)
        retry = self.ip_connections.take(host, now)
        if not retry:
            return None
        rate = self.settings.ip_connect_rate
        message = f"too many new connections from this address (ip_connect_rate {rate:g}/s)"
        return Refusal(retry, "ip_connect", message, False)

    def _admit_user(self, user: str) -> None:
        """At hello: a user with ``user_max_connections`` sessions open is refused (a
        ``rate_limited`` connection error); else the session counts from now on."""
        most = self.settings.user_max_connections
        if self.open_by_user[user] >= most:
            self.metrics.limited("user_connections")
            message = f"too many connections for this user (user_max_connections {most})"
            raise RequestError(
                E.RATE_LIMITED, message, fatal=True, retry_after_ms=CAP_RETRY_AFTER_MS
            )
        self.open_by_user[user] += 1

    def _host_of(self, session: Session) -> str:
        peer = self.connections[session].peer  # f"{host}:{port}" (handle), or "?"
        return peer.rpartition(":")[0] or peer

    def check_login(self, session: Session) -> None:
        """At hello, before its token is tried (session.Logins): an address locked out
        after failed logins is refused on the connections it opened before too (a
        ``rate_limited`` connection error), not only at admission; else ip_max_connections
        connections opened at once would each get a guess for every token of the bucket."""
        wait = self.ip_login_failures.peek(self._host_of(session), self.now_ms())
        if wait:
            self.metrics.limited("ip_login")
            message = self._lockout_message()
            raise RequestError(E.RATE_LIMITED, message, fatal=True, retry_after_ms=wait)

    def _lockout_message(self) -> str:
        """The refusal of an address locked out after failed logins, at admission or hello."""
        rate = self.settings.ip_login_fail_rate
        return f"too many failed logins from this address (ip_login_fail_rate {rate:g}/s)"

    def login_failed(self, session: Session) -> None:
        """A hello refused for its token (session.Logins): a failed login of the address,
        counted at once (the next hello, on any connection, sees it)."""
        self.ip_login_failures.take(self._host_of(session), self.now_ms())

    async def _refuse_connection(
        self, stream: trio.abc.Stream, peer: str, refusal: Refusal
    ) -> None:
        retry, scope, what, now = refusal
        log.warning("refusing connection from %s: %s (retry in %d ms)", peer, what, retry)
        frame = RequestError(E.RATE_LIMITED, what, retry_after_ms=retry).frame(None)
        self.metrics.limited(scope)
        if now:  # at a cap: no TLS handshake, no waiting; its fd is freed at once
            if refuse_now(stream, encode(frame)):  # (over TLS no frame: none counted)
                self.metrics.frame_out(frame)
            await trio.aclose_forcefully(stream)
            return
        self.metrics.frame_out(frame)
        with trio.move_on_after(1):
            try:
                await stream.send_all(encode(frame))  # over TLS, after the handshake
                if isinstance(stream, trio.SocketStream):
                    # A close with unread input sends a reset, which can destroy the
                    # frame before the peer reads it (a client that already sent its
                    # hello): FIN after the frame, then read what the peer sent, briefly.
                    await stream.send_eof()
                    with trio.move_on_after(REFUSE_DRAIN_S):
                        while await stream.receive_some(RECEIVE_CHUNK):
                            pass
            except PEER_GONE:
                pass  # the peer is gone, or its TLS handshake failed: close all the same
        await close_stream(stream)

    async def _tls_handshake(self, stream: TlsStream, peer: str) -> bool:
        """Complete the TLS handshake within its deadline. A failed or slow one is logged
        and closed, and counts as nothing else (not a connection, not a failed login)."""
        timeout = self.settings.tls_handshake_timeout_s
        try:
            with trio.fail_after(timeout):
                await stream.do_handshake()
            return True
        except trio.TooSlowError:
            reason = f"no handshake within {timeout:g} s"
        except trio.BrokenResourceError as exc:
            reason = str(exc.__cause__ or exc)  # the TLS error, or the peer's reset
        except BaseException:  # cancelled: the server is stopping
            await trio.aclose_forcefully(stream)
            raise
        self.metrics.tls_handshake_failures.inc()
        log.info("TLS handshake failed from %s: %s", peer, reason)
        await trio.aclose_forcefully(stream)
        return False

    async def handle(
        self, tcp: trio.SocketStream, address: Address | None, *, web: bool = False
    ) -> None:
        """A new connection on the TCP port, or (``web``) on the WebSocket port, from
        ``address`` (as accept gave it; None: asked of the socket)."""
        try:
            host, port = (address or tcp.socket.getpeername())[:2]
            if host.startswith("::ffff:") and "." in host:  # IPv4, via an IPv6 socket
                host = host[7:]  # one address whichever port (family) it came in by
            peer = f"{host}:{port}"
        except OSError:
            host, peer = "?", "?"
        del address  # not kept for the connection's life (memory per idle connection)
        stream: trio.abc.Stream = tcp
        if self.tls is not None:
            # No close_notify is sent or required (PROTOCOL.md section 4).
            stream = TlsStream(tcp, self.tls)
        refusal = self._admission(host)
        # Every accepted socket counts until it is closed, a refused one too: a flood of
        # refusals holds at most the IP's share of descriptors.
        self.open_sockets += 1
        self.open_by_ip[host] += 1
        try:
            if web:
                await self.web.handle(stream, host, peer, refusal)
            elif refusal is not None:
                await self._refuse_connection(stream, peer, refusal)
            else:
                await self._serve_connection(stream, host, peer)
        finally:
            self.open_sockets -= 1
            self.open_by_ip[host] -= 1
            if not self.open_by_ip[host]:
                del self.open_by_ip[host]

    async def _serve_connection(
        self,
        stream: trio.abc.Stream,
        host: str,
        peer: str,
        transport: Transport = TCP,
        first_input: bytes = b"",
    ) -> None:
        now = self.now_ms()
        if isinstance(stream, TlsStream) and not await self._tls_handshake(stream, peer):
            return
        serial = next(self._ids)
        # Opaque, for logs and support, not a secret (PROTOCOL.md, welcome): the random
        # part tells this process's sessions from another's, from the process's PRNG
        # rather than a getrandom system call per connection.
        session_id = f"{serial:x}-{random.getrandbits(32):08x}"
        session = Session(
            self.store,
            self.verifier,
            self.settings.limits,
            session_id,
            now,
            self.user_limits,
            on_rate_limited=self._limited,
            admit_user=self._admit_user,
            logins=self,
        )
        conn = Connection(self, stream, session, peer, serial, transport)
        self.connections[session] = conn
        self.metrics.opened.inc()
        log.info("connect %s session %s (%s)", peer, session_id, transport.name)
        try:
            with conn.cancel:
                assert self._tasks is not None, "handle() runs under run()"
                conn.nursery = self._tasks
                if conn.try_send is None:  # a stream without one: every write by the task
                    conn.wake_writer()
                await conn.reader(first_input)
                # The reader is done: acknowledge the writes still in flight, let the
                # writer flush, then close; all within a deadline.
                with trio.move_on_after(self.settings.shutdown_grace_s):
                    while conn.inflight and conn.closing is None:
                        conn.inflight_freed = trio.Event()
                        await conn.inflight_freed.wait()
                    if conn.closing is None and conn.transport is TCP and not conn.unsent:
                        conn.closing = PEER_CLOSED  # nothing to send: no writer task to start
                    else:
                        conn.close_after_flush(PEER_CLOSED)  # the writer sends it, aborts
                        await trio.sleep_forever()
        except Exception as exc:
            conn.failed(exc)
        finally:
            await conn.stop_writer()
            if conn.writing:  # closed under it: it ends as a lost peer
                log.warning("writer of %s (%s) still running at close", peer, conn.user)
            reason = conn.closing or "closed"
            self.perform(None, session.closed(reason))
            if session.claims is None and reason.startswith((E.UNAUTHORIZED, E.TOKEN_EXPIRED)):
                self.metrics.auth_failures[auth_reason(reason)].inc()  # (login_failed counted it)
            for channel in session.joined | (conn.holding or {}).keys():
                self.unsubscribe(conn, channel)
            self._device_gone(conn)  # after unsubscribing: its own offline push skips it
            del self.connections[session]
            if session.claims is not None:  # admitted at hello (_admit_user)
                self.open_by_user[session.claims.user] -= 1
                if not self.open_by_user[session.claims.user]:
                    del self.open_by_user[session.claims.user]
            self.metrics.closed[close_reason(reason)].inc()
            log.info("disconnect %s (%s) session %s: %s", peer, conn.user, session_id, reason)
            conn.try_send = None  # closed below: its fd may be reused by the next socket
            await close_stream(stream)

    # ------------------------------------------------------------------ lifecycle

    async def run(
        self,
        *,
        open_store: Callable[[Notify], Store] | None = None,
        listeners: Sequence[trio.abc.Listener[trio.SocketStream]] | None = None,
        task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled or SIGTERM/SIGINT, then shut down gracefully.

        Injection (the deterministic simulation, ``tests/sim.py``): ``open_store`` builds
        the store from the notify hook instead of opening LMDB in ``data_dir``; it is
        opened and closed in the trio thread. ``listeners`` are served instead of TCP
        (their streams need ``socket.getpeername()``), without signal handling."""
        self._token = trio.lowlevel.current_trio_token()
        self._clock_base = (self._wall_ms(), trio.current_time())
        settings = self.settings
        if open_store is not None:
            self.store = open_store(self._notify)
        else:
            config = store_config(settings)  # a bad key file fails here
            limits = settings.limits
            self.store = await trio.to_thread.run_sync(
                lambda: open_engine(
                    settings.engine,
                    settings.data_dir,
                    config,
                    notify=self._notify,
                    observer=self.metrics,
                    password_file=settings.engine_password_file or None,
                    wait_replicas=settings.engine_wait_replicas,
                    presence_ttl_s=settings.engine_presence_ttl_s,
                    send_limits=SendLimits(
                        limits.send_rate,
                        limits.send_burst,
                        limits.channel_send_rate,
                        limits.channel_send_burst,
                    ),
                    remote=RemoteHop(self),
                )
            )
        # other nodes change memberships too, and commit entries a gap read may find
        self.copies.shared = self._track_unsettled = self.store.presence.shared
        # a user's presence changes handled here: kept two TTLs (presence_order.py)
        self._latest_presence = LatestPresence(6 * self.store.presence.refresh_s)
        self.metrics.store_counters.source = self.store.counters
        if not self.inline_reads:
            self.reads = ReadThreads(settings.read_threads)
        try:
            async with trio.open_nursery() as handlers:
                self._tasks = handlers  # the connections' writer tasks run here too
                if hasattr(select, "epoll"):  # server/poller.py: Linux only
                    self.poller = Poller()
                    handlers.start_soon(self.poller.run)
                async with trio.open_nursery() as listening:
                    if listeners is not None:
                        await listening.start(
                            functools.partial(
                                serve_connections,
                                self.handle,
                                list(listeners),
                                self.gate,
                                handler_nursery=handlers,
                            )
                        )
                    else:
                        with listen_error(settings.host, settings.port):
                            own = await tcp_acceptors(
                                settings.host, settings.port, settings.reuse_port
                            )
                            await listening.start(
                                functools.partial(
                                    serve_connections,
                                    self.handle,
                                    own,
                                    self.gate,
                                    handler_nursery=handlers,
                                )
                            )
                        self.port = own[0].port
                        if self.tls is None:
                            log.info("TLS off: plaintext, for loopback and development only")
                        else:
                            who = "with" if settings.tls_client_ca_file else "without"
                            log.info("TLS on (TLS 1.2+), %s client certificates", who)
                        log.info(
                            "serving on %s:%d, data in %s (%s)",
                            settings.host,
                            self.port,
                            self.store,
                            "compiled modules"
                            if compiled.why_sources is None
                            else f"Python sources: {compiled.why_sources}",
                        )
                        listening.start_soon(self._wait_for_signal)
                    handlers.start_soon(self._tick_sessions)
                    handlers.start_soon(self._flusher)
                    handlers.start_soon(self._fill_gaps)
                    if self.store.presence.shared:
                        self.store.follow(PRESENCE_TOPIC)
                        handlers.start_soon(self._presence_upkeep)
                        handlers.start_soon(self._presence_writer)
                        handlers.start_soon(self._memberships_loader)
                    if settings.metrics:  # in `handlers`: /readyz says 503 while draining
                        await self._serve_http(handlers, settings.metrics)
                    if settings.ws:  # in `listening`: stops accepting with the TCP port
                        await self._serve_web(listening, handlers, settings.ws)
                    task_status.started(self)
                    await self.stopping.wait()
                    listening.cancel_scope.cancel()  # stop accepting first
                log.info("shutting down: %d connections", len(self.connections))
                await self.shutdown(handlers.cancel_scope.cancel)
        finally:
            if self.poller is not None:
                self.poller.close()
            if self.reads is not None:  # every read has ended: their tasks have
                self.reads.close()
            with trio.CancelScope(shield=True):
                if open_store is None:
                    await trio.to_thread.run_sync(self.store.close)
                else:
                    self.store.close()
            log.info("store closed")

    # ------------------------------------------------------------------ operator HTTP

    def _store_health(self) -> tuple[str | None, float]:
        store: Store | None = getattr(self, "store", None)
        return ("store is not open", 0.0) if store is None else store.health()

    def store_problem(self) -> str | None:
        """Why the store cannot be counted on to complete writes now (failed, closed, or
        a write waiting longer than ready_max_write_age_s); None: it can."""
        problem, lag = self._store_health()
        most = self.settings.ready_max_write_age_s
        if problem is None and lag > most:
            problem = f"store writer behind: a write has waited {lag:.1f} s (limit {most:g} s)"
        return problem

    def readiness(self) -> str | None:
        """Why this server should get no new traffic now; None: it should."""
        if self.draining or self.stopping.is_set():
            return "shutting down"
        return self.store_problem()

    def http_routes(self) -> dict[str, Route]:
        def metrics() -> Response:
            return Response(200, self.metrics.exposition(), CONTENT_TYPE)

        def healthz() -> Response:
            return text(200, "ok")  # the event loop answers: the process is serving

        def readyz() -> Response:
            problem = self.readiness()
            return text(200, "ok") if problem is None else text(503, problem)

        return {"/metrics": metrics, "/healthz": healthz, "/readyz": readyz}

    async def _serve_http(self, nursery: trio.Nursery, address: str) -> None:
        host, port = parse_address(address, "metrics")
        http = HttpServer(self.http_routes())
        with listen_error(host, port):
            sockets = await nursery.start(http.serve, host, port)
        self.metrics_port = sockets[0].socket.getsockname()[1]
        log.info("metrics and health checks on http://%s:%d/", host, self.metrics_port)

    async def _serve_web(
        self, listening: trio.Nursery, handlers: trio.Nursery, address: str
    ) -> None:
        host, port = parse_address(address, "ws")
        with listen_error(host, port):
            own = await tcp_acceptors(host, port, self.settings.reuse_port)
        handle = functools.partial(self.handle, web=True)
        serve = functools.partial(
            serve_connections, handle, own, self.gate, handler_nursery=handlers
        )
        await listening.start(serve)
        self.ws_port = own[0].port
        scheme = "http" if self.tls is None else "https"
        log.info("web chat page on %s://%s:%d/ (WebSocket at /connect)", scheme, host, self.ws_port)

    async def _tick_sessions(self) -> None:
        """Run each session's timers (idle peers, token expiry, typing expiry) when due."""
        tick_s = self.settings.tick_ms / 1000
        while True:
            asked = trio.current_time() + tick_s
            await trio.sleep(tick_s)
            stall_ms = round((trio.current_time() - asked) * 1000)
            if stall_ms > LOOP_STALL_S * 1000:
                # The loop was stalled: peers' frames waited unread in their sockets.
                log.warning("event loop stalled for %d ms: idle timers extended", stall_ms)
                for conn in self.connections.values():
                    conn.session.last_rx_ms += stall_ms
            LOG_FILTER.flush()
            ACCEPT_FILTER.flush()
            now = self.now_ms()
            if self._typing_elsewhere:
                self._expire_remote_typing(now)
            # A connection the server holds back (flow control) is not idle: the server,
            # not the peer, is not reading. Unless the store has stalled (or failed): then
            # its writes may never complete, and the idle timeout applies as to any other.
            stalled = self.store_problem() is not None
            for conn in list(self.connections.values()):
                if conn.held and not stalled:
                    conn.session.last_rx_ms = now
                if conn.next_check > now:
                    continue
                due = conn.session.next_deadline()
                if due is not None and due <= now:
                    self.perform(conn, conn.session.tick(now))
                    due = None  # the tick may have set new timers: look again next time
                conn.next_check = due or 0

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
            # the users' offline changes too, on a shared engine (not left to its TTL)
            while self.connections or self.presence_unwritten:
                await trio.sleep(0.01)
        stop()


async def serve(
    settings: Settings,
    verifier: TokenVerifier,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
    dev_issuer: TokenIssuer | None = None,
) -> None:
    server = Server(settings, verifier, dev_issuer=dev_issuer)
    await server.run(task_status=task_status)
