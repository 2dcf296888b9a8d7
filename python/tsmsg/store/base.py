"""The store interface: what the server needs from durable storage.

A backend keeps, per channel, an append-only log of entries keyed by a dense seq
(1, 2, 3, ...), the channel's metadata (head, compaction horizon, epoch), read cursors
per (user, channel) and a dedup index per (channel, sender, cid). Writes go through
:meth:`Store.submit` and are committed in groups by a single writer; reads are plain
synchronous calls. A second backend implements this class and nothing in the server
changes.

Entries are plain dicts shaped like the wire's ``event`` push minus ``t`` and
``channel`` (see STORAGE.md): ``seq``, ``kind``, ``id``, ``sender``, ``ts`` and the body
fields. Returning dicts lets the server put them on the wire without a conversion.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, Protocol, Self, TypeVar

Entry = dict[str, Any]
Kind = Literal["message", "edit", "delete"]

# Limits the store enforces itself (the protocol layer checks them first with clear
# error frames; these guard the on-disk format against any other caller).
MAX_CHANNEL_BYTES = 128  # channel names are short identifiers, not content
MAX_USER_BYTES = 128  # user ids come from the token's `sub`

log = logging.getLogger("tsmsg.store")


class StoreError(Exception):
    """A request the store refused or could not carry out. ``code`` is the wire error
    code the server sends for it (see PROTOCOL.md)."""

    code = "internal"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra  # more fields of the error frame (e.g. retry_after_ms)


class NotFound(StoreError):
    code = "not_found"


class Forbidden(StoreError):
    code = "forbidden"


class LimitExceeded(StoreError):
    """A write over a bound the store keeps (e.g. edits per message)."""

    code = "limit_exceeded"


class RateLimited(StoreError):
    """A send over a limit the store keeps for every node (shared send rate limits)."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)


@dataclass(frozen=True, slots=True)
class SendLimits:
    """The per-user send limits a shared store enforces across nodes (PROTOCOL.md 16.2:
    ``send_rate``/``send_burst`` per user, ``channel_send_rate``/``channel_send_burst``
    per user and channel); a node's sessions enforce the same on what reaches it."""

    rate: float
    burst: int
    channel_rate: float
    channel_burst: int


class StoreUnavailable(StoreError):
    """A commit failed (disk full, I/O error): nothing of the batch was stored, no seq
    was consumed, reads keep working."""

    code = "store_unavailable"


class FormatError(Exception):
    """The data directory was written by an incompatible on-disk format version."""


class AppendResult(NamedTuple):
    """What a committed message, edit or delete was given. A named tuple: the writer
    makes one per write, and a frozen dataclass costs four times as much to build."""

    channel: str
    seq: int
    id: str  # the message id (for edits and deletes: the target's id)
    ts: int
    dup: bool = False


@dataclass(frozen=True, slots=True)
class SyncPage:
    """Entries after ``since`` in seq order. ``resync`` is set (and ``entries`` empty)
    when ``since`` is below the compaction horizon or above the head: the client must
    reload with history and continue from ``head``, never skip a gap."""

    entries: list[Entry]
    more: bool
    head: int
    epoch: int
    resync: bool = False


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """The latest state of messages, oldest first. ``more``: the page stopped at its
    limit (count or bytes) before the start of the log; ask again with
    ``before = messages[0]["seq"]``."""

    messages: list[Entry]
    more: bool


@dataclass(frozen=True, slots=True)
class ChannelInfo:
    name: str
    head: int  # last committed seq, 0 for an empty channel
    horizon: int  # sync below this seq needs a resync (compacted or retained away)
    epoch: int  # changes if the log is ever reset; seqs restart then


@dataclass(slots=True)
class WriteOp:
    """One pending write. The writer fills ``result`` or ``error`` and then calls the
    store's ``notify`` hook once per committed batch."""

    # message, edit, delete: log entries; read: the user's cursor; member: the user is a
    # member of the channel (recorded at join); unmember: no longer (leave with forget);
    # seen: the user's last_seen (channel unused)
    kind: Literal["message", "edit", "delete", "read", "member", "unmember", "seen"]
    channel: str
    user: str
    cid: str | None = None  # message only: the idempotency key
    text: str | None = None  # message and edit
    meta: dict[str, Any] | None = None  # message only
    target: str | None = None  # edit and delete: the message id
    seq: int = 0  # read only: the cursor position asked for
    # member only: record it only while the user has fewer than this many memberships
    # (0: no bound; the DM peer's membership a message records, PROTOCOL.md 6.15)
    most: int = 0
    moderator: bool = False  # may change other users' messages
    result: AppendResult | int | None = None  # AppendResult, or the cursor for `read`
    changed: bool = False  # `read`: the cursor moved; `member`: the membership is new
    # message, edit, delete: the epoch of the log the entry went into (0: a dup, or
    # failed); a node's relay tells a reset log from a repeat by it (server/relay.py)
    epoch: int = 0
    error: StoreError | None = None
    origin: Any = field(default=None, repr=False)  # the caller's handle, e.g. its session
    rid: int | None = None  # the request id to answer
    done: threading.Event | None = field(default=None, repr=False)
    queued_at: float = 0.0  # time.monotonic() when submitted; set by the store


Notify = Callable[[list[WriteOp]], None]


@dataclass(frozen=True, slots=True)
class RemoteEntry:
    """An entry another node committed, as a shared engine tells this one (fan-out
    between nodes): shaped like a stored entry (``seq``, ``kind``, ``id``, ...)."""

    channel: str
    epoch: int
    entry: Entry


class Remote(Protocol):
    """What a shared engine tells a node about other nodes' writes, from the engine's
    own thread (the node hands it to its event loop). Must be cheap and thread-safe."""

    def entries(self, entries: list[RemoteEntry]) -> None:
        """Committed (and, as configured, replicated) entries of followed channels, in
        the order the engine delivered them: possibly late, repeated or with gaps."""

    def signal(self, channel: str, frame: dict[str, Any]) -> None:
        """A live signal (``typing``, ``read``) another node pushed to ``channel``."""

    def lost(self, channels: list[str]) -> None:
        """Entries of these followed channels may have been lost on the way (the
        engine's connection was cut): the node reads them from the log."""


class StoreObserver(Protocol):
    """Timings a store reports (for metrics), called from its own threads (the writer; the
    sync thread of ``async`` durability); the store knows nothing about what the observer
    does with them. Must be cheap and thread-safe."""

    def committed(self, writes: int, seconds: float) -> None:
        """A batch of ``writes`` was committed (or failed) in ``seconds``."""

    def synced(self, seconds: float) -> None:
        """An explicit sync of the environment to disk took ``seconds``."""


class Store(ABC):
    """Durable channel logs. Thread-safe: writes are queued to one writer thread; reads
    may be called from any thread."""

    @abstractmethod
    def submit(self, *ops: WriteOp) -> None:
        """Queue writes, in order (several at once cost one hand-off to the writer).
        When an op's batch is committed (or failed), its ``result`` or ``error`` is set
        and the ``notify`` hook given at open is called with the batch, from the writer
        thread. ``ok`` may be sent only after that. All or nothing: a submit that raises
        (StoreUnavailable) has queued none of ``ops``."""

    def write(self, op: WriteOp, timeout: float | None = 30.0) -> WriteOp:
        """Blocking convenience for tools and tests: submit and wait for the commit."""
        op.done = threading.Event()
        self.submit(op)
        if not op.done.wait(timeout):
            raise StoreUnavailable(f"write not committed within {timeout} s")
        if op.error is not None:
            raise op.error
        return op

    def append(
        self,
        channel: str,
        sender: str,
        cid: str,
        text: str,
        meta: dict[str, Any] | None = None,
    ) -> AppendResult:
        op = self.write(WriteOp("message", channel, sender, cid=cid, text=text, meta=meta))
        assert isinstance(op.result, AppendResult)
        return op.result

    def edit(
        self, channel: str, user: str, target: str, text: str, *, moderator: bool = False
    ) -> AppendResult:
        op = self.write(
            WriteOp("edit", channel, user, text=text, target=target, moderator=moderator)
        )
        assert isinstance(op.result, AppendResult)
        return op.result

    def delete(
        self, channel: str, user: str, target: str, *, moderator: bool = False
    ) -> AppendResult:
        op = self.write(WriteOp("delete", channel, user, target=target, moderator=moderator))
        assert isinstance(op.result, AppendResult)
        return op.result

    def set_read(self, user: str, channel: str, seq: int) -> int:
        """Move the user's read cursor forward to ``seq`` (clamped to the head); an
        older seq changes nothing. Returns the cursor."""
        op = self.write(WriteOp("read", channel, user, seq=seq))
        assert isinstance(op.result, int)
        return op.result

    @abstractmethod
    def lookup_dup(self, channel: str, sender: str, cid: str) -> AppendResult | None:
        """The first result of a cid, if it is known (a read: may block)."""

    def cached_dup(self, channel: str, sender: str, cid: str) -> AppendResult | None:
        """The first result of a cid if the store knows it without I/O over a network
        (the event loop asks on every send, to answer a retry without queueing a write);
        else None, and the write answers it (dedup is atomic with the append)."""
        return None

    @abstractmethod
    def channel(self, name: str) -> ChannelInfo: ...

    @abstractmethod
    def sync(
        self,
        channel: str,
        since: int,
        limit: int,
        max_bytes: int | None = None,
        entry_overhead: int = 0,
    ) -> SyncPage:
        """Raw entries with seq > since, in seq order: at most ``limit`` of them, and at
        most ``max_bytes`` counting each entry's packed size plus ``entry_overhead``
        (always at least one entry)."""

    @abstractmethod
    def history(
        self, channel: str, before: int | None, limit: int, max_bytes: int | None = None
    ) -> HistoryPage:
        """The latest state of the newest ``limit`` messages with seq < before
        (default: all) and at most ``max_bytes`` packed, oldest first. Deleted ones are
        tombstones: ``deleted: True``, no text and no meta."""

    @abstractmethod
    def read_cursor(self, user: str, channel: str) -> int: ...

    @abstractmethod
    def is_member(self, user: str, channel: str) -> bool:
        """Whether ``user`` is recorded as a member of ``channel``."""

    @abstractmethod
    def channels_of(self, user: str, limit: int | None = None) -> list[str]:
        """The channels ``user`` is a member of (joined and not forgotten), sorted; the
        first ``limit`` of them when given (the cost is bounded by it)."""

    def memberships_versioned(
        self, users: list[str], limit: int | None = None
    ) -> dict[str, tuple[list[str], int]]:
        """Each user's :meth:`channels_of` with the version of the user's memberships: a
        number that changes with each membership recorded or forgotten (a shared store's,
        whose nodes keep copies; one node's store answers 0: nothing else changes them)."""
        return {user: (self.channels_of(user, limit), 0) for user in users}

    def membership_versions(self, users: list[str]) -> dict[str, int]:
        """The version of each user's memberships (:meth:`memberships_versioned`)."""
        return dict.fromkeys(users, 0)

    @abstractmethod
    def last_seen(self, user: str) -> int | None:
        """When the user's last device disconnected (ms), if ever."""

    @abstractmethod
    def unread(self, user: str, channel: str, scan_max: int | None = None) -> int:
        """Messages after the user's cursor that are neither deleted nor the user's own,
        counted over at most ``scan_max`` entries after the cursor: log entries (LMDB) or
        messages (the Redis engine indexes them apart from edits and deletes). Either
        bounds the work; past the bound the count is a lower bound (PROTOCOL.md 6.14), and
        within it exact."""

    @abstractmethod
    def compact(self, channel: str) -> int:
        """Compact one channel by the configured policy; returns the new horizon."""

    @abstractmethod
    def channels(self) -> list[str]:
        """The names of every channel with a log, sorted (for tools and compaction)."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def counters(self) -> dict[str, int]:
        """The engine's own counters, for metrics (read when scraped, from any thread):
        the Redis engine's fan-out figures (``FanoutStats``); none for a store of one node."""
        return {}

    def health(self) -> tuple[str | None, float]:
        """For readiness checks, from any thread: why the store takes no writes now (closed,
        failed; None: it does) and how long, in seconds, the oldest write not yet
        acknowledged has waited (0: none waits)."""
        return None, 0.0

    # Fan-out between nodes. A store that several nodes share delivers the entries other
    # nodes commit in followed channels to the ``remote`` hook given at open, only after
    # they are acknowledged (durable, replicated as configured), and carries signals. A
    # store of one node (LMDB) has no other nodes: these do nothing.

    def follow(self, channel: str) -> None:
        """This node has members in ``channel``: deliver other nodes' entries of it."""
        return None

    def unfollow(self, channel: str) -> None:
        """No member of ``channel`` is left on this node."""
        return None

    def publish_signal(self, channel: str, frame: dict[str, Any]) -> None:
        """Push a live signal (``typing``, ``read``; ``presence`` on :data:`PRESENCE_TOPIC`)
        to the other nodes' members of ``channel``; best effort, never blocks."""
        return None

    @functools.cached_property
    def presence(self) -> Presence:
        """Presence across nodes (a user is online while any node has a device of
        theirs); a store of one node keeps this node's, in memory."""
        return Presence()


# What the backends share besides the interface: the queue between callers and the writer
# thread, and background compaction (LmdbStore, RedisStore: MemoryStore runs no thread);
# how a committed batch is announced (every store).

_Item = TypeVar("_Item")  # what a writer's queue carries: tuples of writes, stop marks, jobs
OP_OVERHEAD = 128  # bytes an op counts besides its text (ids, names, meta's usual size)


def queue_writes(
    ops: tuple[WriteOp, ...],
    waiting: collections.deque[float],
    writes: queue.SimpleQueue[Any],
) -> None:
    """Hand ``ops`` to the writer as one item (one wake-up, however many), stamped with
    the time (``queued_at``; ``waiting`` gets one per op, oldest first, which the writer
    drops as it acknowledges them: see :func:`oldest_wait`)."""
    if not ops:
        return
    now = time.monotonic()
    for op in ops:
        op.queued_at = now
    waiting.extend(itertools.repeat(now, len(ops)))
    writes.put(ops)


def oldest_wait(waiting: collections.deque[float]) -> float:
    """How long, in seconds, the oldest write not yet acknowledged has waited (0: none)."""
    try:  # a concurrent acknowledgement may make this slightly stale: harmless
        return max(0.0, time.monotonic() - waiting[0])
    except IndexError:
        return 0.0


def take_batch(
    ops: tuple[WriteOp, ...],
    writes: queue.SimpleQueue[_Item],
    most: int,
    most_bytes: int,
) -> tuple[list[WriteOp], tuple[WriteOp, ...] | _Item | None]:
    """The writer's next batch: ``ops`` and the writes queued after them, in order, until
    ``most`` writes or ``most_bytes`` of text (exceeded by one write at most); and what
    was taken but is left for later (the rest of a tuple, a stop mark, a job)."""
    batch: list[WriteOp] = []
    size = 0
    while True:
        for i, op in enumerate(ops):
            if len(batch) >= most or size >= most_bytes:
                return batch, ops[i:]
            batch.append(op)
            size += OP_OVERHEAD + (len(op.text) if op.text else 0)
        try:
            nxt = writes.get_nowait()
        except queue.Empty:
            return batch, None
        if not isinstance(nxt, tuple):
            return batch, nxt
        ops = nxt


def notify_batch(batch: list[WriteOp], notify: Notify | None) -> None:
    """A committed (or failed) batch: wake its blocking writers, then call the ``notify``
    hook with it; the hook's bug is logged, never raised (it must not stop the store)."""
    for op in batch:
        if op.done is not None:
            op.done.set()
    if notify is not None:
        try:
            notify(batch)
        except Exception:
            log.exception("store notify hook failed for a batch of %d", len(batch))


class BackgroundCompaction:
    """A store's :meth:`~Store.compact` of every channel, on request (:meth:`compact_all`)
    and every ``interval_s`` in a thread of its own (none when it is None or 0), until
    :meth:`stop`."""

    def __init__(self, store: Store, interval_s: float | None) -> None:
        self._store = store
        self._interval = interval_s
        self.stopping = threading.Event()  # set by stop(): passes end between channels
        self._thread: threading.Thread | None = None
        if interval_s:
            self._thread = threading.Thread(target=self._run, name="tsmsg-compactor", daemon=True)
            self._thread.start()

    def compact_all(self) -> dict[str, int]:
        """Compact every channel (its new horizon by name); stops between channels once
        :meth:`stop` was called."""
        done: dict[str, int] = {}
        for name in self._store.channels():
            if self.stopping.is_set():
                break
            done[name] = self._store.compact(name)
        return done

    def _run(self) -> None:
        interval = self._interval
        assert interval
        while not self.stopping.wait(interval):
            try:
                self.compact_all()
            except Exception:
                log.exception("background compaction failed; will retry in %.0f s", interval)

    def stop(self) -> None:
        """End compaction (a pass under way stops between channels) and wait for the
        thread."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join()


# The pseudo-channel (no channel has an empty name) of presence changes between nodes: a
# ``presence`` push with the user's ``channels``, for each node to reach its members; and
# of notices to one user's devices: a ``membership`` push with the user in ``to``.
PRESENCE_TOPIC = ""


# A presence change: (user, status, CONNECTED or None, ms[, a status set just before it]).
PresenceChange = tuple[str, str | None, int] | tuple[str, str | None, int, str | None]


class Ordered(tuple[str, str]):
    """A presence result, ``(before, after)`` of a change or ``(user, before)`` of a
    sweep: a plain pair (compares and unpacks as one) with ``order``, the user's presence
    order the change got in a shared engine (moved by each change of the user's: of two
    changes, the greater came last); 0 in one node's store, which orders nothing."""

    order: int

    def __new__(cls, first: str, second: str, order: int = 0) -> Ordered:
        self = super().__new__(cls, (first, second))
        self.order = order
        return self


class OrderedAgain(tuple[str, str, str]):
    """:meth:`Presence.refresh`'s ``(user, before, after)``, with ``order`` as
    :class:`Ordered`'s."""

    order: int

    def __new__(cls, user: str, before: str, after: str, order: int = 0) -> OrderedAgain:
        self = super().__new__(cls, (user, before, after))
        self.order = order
        return self


class Presence:
    """The users' presence, as a store keeps it (PROTOCOL.md 6.13: a user's status, not a
    device's). A change is a node's: its first device of a user connected
    (:data:`CONNECTED`: the user's status stays if another node has a device of the
    user, else it is ``"online"``), the status the user set, or its last device of the
    user gone (``None``: the user is offline once no node has a device). This base is a
    store of one node, in memory (``shared`` false: nothing to refresh or expire, and calls
    never block). A shared store's (Redis) keeps each node's entry with an expiry that its
    node refreshes, so a node that died stops counting (:meth:`expired`). The methods of a
    shared one block (network): call them off the event loop."""

    shared = False
    refresh_s = 0.0  # shared: how often a live node calls refresh()

    def __init__(self) -> None:
        self._status: dict[str, str] = {}
        self._lock = threading.Lock()

    def set(self, user: str, status: str | None, now_ms: int) -> Ordered:
        """A change of this node's (:class:`Presence`). Returns the user's status across
        all nodes before and after (``"offline"`` also when no device is connected)."""
        with self._lock:
            before = self._status.pop(user, OFFLINE)
            if status == CONNECTED:
                self._status[user] = "online"
            elif status is not None:
                self._status[user] = status
        return Ordered(before, self._status.get(user, OFFLINE))

    def set_many(self, changes: Sequence[PresenceChange]) -> list[Ordered | Exception]:
        """:meth:`set` of each ``(user, status, now_ms)`` in order, as one call where the
        store can (one round trip): each change's ``(before, after)``, or the error that
        kept it from the store. A change may carry a fourth item: a status the user set
        just before it (a node queued both), applied first."""
        out: list[Ordered | Exception] = []
        for user, status, now_ms, *first in changes:
            if first and first[0] is not None:
                before = self.set(user, first[0], now_ms)[0]
                out.append(Ordered(before, self.set(user, status, now_ms)[1]))
            else:
                out.append(self.set(user, status, now_ms))
        return out

    def statuses(self, users: list[str], now_ms: int) -> dict[str, str]:
        """The status of those of ``users`` who have a device connected to some node
        (``"offline"`` when such a user set it)."""
        with self._lock:
            return {u: self._status[u] for u in users if u in self._status}

    def refresh(self, now_ms: int) -> list[OrderedAgain]:
        """Extend this node's entries (a live node calls this every ``refresh_s``).
        Returns ``(user, before, after)`` of the users whose entry was gone (swept while
        this node was late) and is set again: their status across nodes changed back."""
        return []

    def expired(self, now_ms: int) -> list[Ordered]:
        """Users whose last entry (a dead node's) has just expired, with their status
        before: no device anywhere now (last_seen recorded by the store as it decided),
        for the caller to announce (if the status was not ``"offline"`` already). Each is
        returned to one caller."""
        return []


# A node's first device of a user connected (Presence.set): not a status a user can set
# (a status holds no control characters, PROTOCOL.md 6.13).
CONNECTED = "\0"
OFFLINE = "offline"
