"""The client side of the tsmsg protocol, without I/O (PROTOCOL.md section 13).

:class:`ClientProtocol` builds request frames, consumes server frames and keeps the
client's state: the channels it follows with their position (last applied seq and epoch),
a reorder buffer per channel, the requests in flight by rid and the **outbox** of sends not
yet acknowledged (cid → send, in order). It imports no socket, no anyio and keeps no clock:
``now_ms`` is passed in, so reconnects, rate limits and heartbeats are tested with plain
calls. The async front end (:mod:`tsmsg.client.client`) moves bytes and waits on timers.

Use::

    proto.connection_made(token, now_ms)      # queues hello
    sock.send(proto.data_to_send())
    for frame in decoder.feed(sock.recv()):
        outputs = proto.receive_frame(frame, now_ms)   # completions, token requests, ...
    event = proto.next_event()                # app events: exactly once, in seq order
    proto.tick(now_ms)  at  proto.next_deadline()      # pings, rate-limit retries
    proto.connection_lost(reason, now_ms)     # then reconnect: connection_made again

After ``welcome`` the protocol rejoins every followed channel and catches each one up: a
``sync`` from its last applied seq (with its epoch) page by page until ``more: false``,
live events meanwhile held in the reorder buffer; a ``resync`` reply (or a changed epoch)
reloads the channel: the newest history page up to the server's head becomes a
:class:`~tsmsg.client.events.Resynced` event and the channel continues from that head.
Then every unacknowledged send is sent again with its original cid (the server answers
``dup`` for one already stored, so it is stored once).

Bounded memory: at most ``max_queued`` events of a channel wait for the application. A
channel whose queue is full is **stalled**: its live events are dropped, not applied, and
when the application has taken half of the queue the channel catches up with ``sync``
from its last applied seq, in pages no larger than the free room. So a slow application
never grows the client's memory and never loses an event (the server's slow-consumer rule,
mirrored).
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tsmsg._native import EncodeError, FrameTooLarge, encode_many, packb
from tsmsg.auth import valid_channel, valid_user
from tsmsg.client.errors import (
    BadRequest,
    ClientError,
    ConnectionClosed,
    LimitExceeded,
    ResyncRequired,
    error_from_frame,
    retry_after_ms,
)
from tsmsg.client.events import (
    Ack,
    ChannelSummary,
    ConnectionChanged,
    Delete,
    Edit,
    Event,
    HistoryPage,
    JoinInfo,
    Left,
    Membership,
    Message,
    Presence,
    PresenceInfo,
    ReadReceipt,
    Resynced,
    SyncPage,
    Typing,
    entry_from,
    message_from,
)
from tsmsg.protocol import errors as E
from tsmsg.protocol.limits import PROTOCOL_VERSION, Limits

Frame = dict[str, Any]

DEFAULT_LIMITS = Limits()  # until welcome announces the server's
MAX_QUEUED = 1000  # events of one channel waiting for the app before the channel stalls
MAX_SIGNALS = 1000  # presence pushes waiting for the app; more are dropped (best effort)
MAX_REORDER = 10_000  # live events held per channel while it syncs; past it, dropped (one
# more sync fetches them), so a long catch-up under a busy channel stays bounded
STORE_RETRY_MS = 500  # first wait before resending a send refused with store_unavailable
STORE_RETRY_MAX_MS = 30_000  # ... doubling up to this
MAX_INTERNAL_RETRIES = 3  # a send answered `internal` is retried this often, then fails


class Phase(enum.Enum):
    IDLE = "idle"  # not joined on this connection (disconnected, or join not sent yet)
    JOINING = "joining"
    RELOADING = "reloading"  # fetching the history page of a resync
    SYNCING = "syncing"  # catching up; live events wait in the reorder buffer
    LIVE = "live"  # applying live events as they come
    STALLED = "stalled"  # the app's queue of this channel is full: wait, then sync


@dataclass
class ChannelState:
    name: str
    known: bool = False  # holds a position (after the first join, or restored)
    replay: bool = False  # the first join replays the log from seq 1 instead of a reload
    epoch: int = 0  # of the log ``last`` belongs to; 0: not known
    last: int = 0  # seq of the last entry applied (queued for the app)
    phase: Phase = Phase.IDLE
    # Set anew (from the protocol's one counter) on (re)join, reload and disconnect:
    # replies to older requests are ignored, those of a follow since left included.
    gen: int = 0
    pending: dict[int, Frame] = field(default_factory=dict)  # the reorder buffer
    join_waiters: list[int] = field(default_factory=list)  # app handles awaiting JoinInfo
    queued: int = 0  # events of this channel in the app queue
    delivered: tuple[int, int] = (0, 0)  # (seq, epoch) of the last event the app took
    reload_pending: bool = False  # a reload's history page has not come: redo it on rejoin
    # The sync in flight may miss live events: a `cut` push came while it was in flight
    # (its read may predate the cut, its reply still resumes the stream), or the reorder
    # buffer dropped some. Its last page then does not end the catch-up: a sync sent
    # after that moment does (it fetches them all).
    sync_again: bool = False


# ------------------------------------------------------------------------------ outputs


@dataclass(frozen=True, slots=True)
class Completed:
    """The app request ``handle`` succeeded with ``result``."""

    handle: int
    result: Any


@dataclass(frozen=True, slots=True)
class Failed:
    handle: int
    error: ClientError


@dataclass(frozen=True, slots=True)
class SendCompleted:
    """The outbox send ``cid`` is done: ``ack``, or ``error`` when it cannot succeed."""

    cid: str
    channel: str
    ack: Ack | None
    error: ClientError | None = None


@dataclass(frozen=True, slots=True)
class Welcomed:
    user: str
    heartbeat_ms: int


@dataclass(frozen=True, slots=True)
class HelloFailed:
    """The hello was refused; the server closes the connection. ``retry_after_ms``: the
    least wait before connecting again (admission refusals)."""

    error: ClientError
    retry_after_ms: int = 0


@dataclass(frozen=True, slots=True)
class NeedToken:
    """Call the token provider and pass the new token to :meth:`ClientProtocol.refresh`."""

    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the connection (and reconnect): it is dead or unusable."""

    reason: str


@dataclass(frozen=True, slots=True)
class FollowChanged:
    """The set of followed channels changed (for persistent state)."""

    channel: str
    following: bool


Output = (
    Completed
    | Failed
    | SendCompleted
    | Welcomed
    | HelloFailed
    | NeedToken
    | Disconnect
    | FollowChanged
)


# ------------------------------------------------------------------------------ requests


@dataclass
class _Request:
    frame: Frame  # without rid
    kind: str  # call, leave, send, join, sync, history, ping, refresh
    handle: int | None = None  # the app's, for call and leave
    channel: str | None = None
    gen: int = 0
    retry: bool = True  # resend after a reconnect (its outcome is safe to repeat)
    rid: int | None = None  # while in flight on this connection
    not_before: int = 0  # rate limited or backing off until then
    needs_token: bool = False  # refused token_expired: resend after a refresh
    attempts: int = 0  # store_unavailable / internal refusals so far (sends)

    @property
    def cid(self) -> str:
        cid: str = self.frame["cid"]
        return cid


_INTERNAL = frozenset({"join", "sync", "history", "ping", "refresh"})


@dataclass(frozen=True, slots=True)
class _Queued:
    event: Event
    channel: str | None
    seq: int  # the position it moves the channel to (Resynced: head)
    epoch: int


class _Conn(enum.Enum):
    DOWN = "down"
    HELLO = "hello"
    READY = "ready"


def _check_utf8(value: str, what: str) -> None:
    """Refuse here a string the wire cannot carry (a lone surrogate is not UTF-8): queued,
    it would fail the connection's whole flush, and a saved outbox every restart's."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise BadRequest(E.BAD_REQUEST, f"`{what}` is not valid UTF-8") from None


def _epoch_changed(held: int, epoch: int) -> bool:
    """A reset between two known epochs (a change from 0 is the log's first write)."""
    return held != 0 and epoch != 0 and epoch != held


class ClientProtocol:
    def __init__(self, *, max_queued: int = MAX_QUEUED, can_refresh: bool = False) -> None:
        self.max_queued = max_queued
        # True when a token provider exists: token_expired refusals wait for a refresh.
        self.can_refresh = can_refresh
        self.user: str | None = None
        self.heartbeat_ms = DEFAULT_LIMITS.heartbeat_ms
        self.max_frame = DEFAULT_LIMITS.max_frame
        self.limits: dict[str, Any] = DEFAULT_LIMITS.announce()
        self.close_reason: str | None = None  # the server's last word (error code, bye)
        self.channels: dict[str, ChannelState] = {}  # followed channels, by name
        self._conn = _Conn.DOWN
        self._rids = itertools.count(1)
        self._handles = itertools.count(1)
        # Channel generations: one counter for all, so a channel left and joined again (a
        # new ChannelState) never takes a generation a request of the old one still holds.
        self._gens = itertools.count(1)
        self._out: list[Frame] = []
        self._inflight: dict[int, _Request] = {}  # rid -> request sent on this connection
        self._calls: dict[int, _Request] = {}  # handle -> app request not yet answered
        self._outbox: dict[str, _Request] = {}  # cid -> send not yet acknowledged, in order
        self._held: list[_Request] = []  # internal requests waiting out a rate limit
        self._inbox: deque[_Queued] = deque()
        self._signals = 0  # presence events in the inbox
        self._refreshing = False
        self._next_ping = 0
        self._ping_sent: int | None = None
        self._last_rx = 0

    # ------------------------------------------------------------------ state

    @property
    def ready(self) -> bool:
        return self._conn is _Conn.READY

    @property
    def outbox(self) -> list[tuple[str, str, str, dict[str, Any] | None]]:
        """The unacknowledged sends, in order: (cid, channel, text, meta)."""
        return [
            (r.cid, r.frame["channel"], r.frame["text"], r.frame.get("meta"))
            for r in self._outbox.values()
        ]

    def restore(
        self,
        channels: Iterable[tuple[str, int, int]],
        outbox: Iterable[tuple[str, str, str, dict[str, Any] | None]],
    ) -> None:
        """Load saved state: followed channels as (name, last seq, epoch), and the outbox
        as (cid, channel, text, meta) in send order. Call before the first connect."""
        for name, last, epoch in channels:
            ch = ChannelState(name, known=True, epoch=epoch, last=last)
            ch.delivered = (last, epoch)
            self.channels[name] = ch
        for cid, channel, text, meta in outbox:
            self._enqueue_send(channel, text, meta, cid)

    def position(self, channel: str) -> tuple[int, int] | None:
        """(seq, epoch) of the last event of ``channel`` the app has taken: what to save."""
        ch = self.channels.get(channel)
        return ch.delivered if ch is not None and ch.known else None

    def limit(self, name: str) -> int:
        value = self.limits.get(name)
        return value if type(value) is int else int(getattr(DEFAULT_LIMITS, name))

    # ------------------------------------------------------------------ connection

    def connection_made(self, token: str, now_ms: int) -> None:
        """A new connection: queues the hello."""
        self._conn = _Conn.HELLO
        self._out.clear()
        self._inflight.clear()
        self.close_reason = None
        self._last_rx = now_ms
        self._ping_sent = None
        self._refreshing = False
        self._out.append({"t": "hello", "rid": next(self._rids), "v": PROTOCOL_VERSION})
        self._out[-1]["token"] = token

    def connection_lost(self, reason: str, now_ms: int) -> list[Output]:
        """The connection is gone. Sends stay in the outbox; idempotent app requests wait
        for the next connection; an edit or delete in flight fails (unknown outcome)."""
        was_ready = self._conn is _Conn.READY
        self._conn = _Conn.DOWN
        self._out.clear()
        self._inflight.clear()
        self._held.clear()
        self._ping_sent = None
        outputs: list[Output] = []
        for handle, req in list(self._calls.items()):
            sent, req.rid, req.needs_token = req.rid is not None, None, False
            if req.kind == "leave":
                del self._calls[handle]
                outputs.append(Completed(handle, None))  # not followed: nothing to undo
            elif sent and not req.retry:
                del self._calls[handle]
                what = f"the connection closed ({reason}) before {req.frame['t']} was answered"
                outputs.append(Failed(handle, ConnectionClosed(what)))
        for req in self._outbox.values():
            req.rid, req.needs_token = None, False
        for ch in self.channels.values():
            ch.phase, ch.gen = Phase.IDLE, next(self._gens)
            ch.pending.clear()
        if was_ready:
            self._push_signal(ConnectionChanged(False, reason))
        return outputs

    def data_to_send(self) -> bytes:
        """The frames queued since the last call, encoded."""
        if not self._out:
            return b""
        frames, self._out = self._out, []
        return encode_many(frames, self.max_frame)

    def next_deadline(self) -> int | None:
        """When :meth:`tick` next has something to do (ms), or None."""
        if self._conn is not _Conn.READY:
            return None
        times = [self._next_ping]
        if self._ping_sent is not None:
            times.append(max(self._ping_sent, self._last_rx) + self.heartbeat_ms)
        times += self._resend_times()
        return min(times)

    def tick(self, now_ms: int) -> list[Output]:
        """Timers: the heartbeat ping, a dead connection, rate-limited resends."""
        if self._conn is not _Conn.READY:
            return []
        if self._ping_sent is not None:
            if now_ms - max(self._ping_sent, self._last_rx) >= self.heartbeat_ms:
                return [Disconnect(f"no pong within {self.heartbeat_ms} ms")]
        elif now_ms >= self._next_ping:
            self._ping_sent = now_ms
            self._send(_Request({"t": "ping"}, "ping"))
        if now_ms >= self._next_ping:
            self._next_ping = now_ms + max(1, self.heartbeat_ms // 2)
        self._pump(now_ms)
        return []

    # ------------------------------------------------------------------ app requests

    def join(self, channel: str, *, replay: bool = False) -> int:
        """Follow ``channel``: returns a handle completed with :class:`JoinInfo`. A channel
        joined for the first time loads its newest history page as a ``Resynced`` event
        (or, with ``replay``, replays its whole log as events)."""
        self._check_channel(channel)
        handle = next(self._handles)
        ch = self.channels.get(channel)
        if ch is None:
            ch = self.channels[channel] = ChannelState(channel, replay=replay)
        ch.join_waiters.append(handle)
        if self._conn is _Conn.READY and ch.phase is not Phase.JOINING:
            self._start_join(ch)
        return handle

    def leave(self, channel: str) -> tuple[int, list[Output]]:
        """Stop following ``channel``, forget its position and drop its events not yet
        taken by the app (a later join starts afresh, with a Resynced). From here on no
        event of the old follow reaches the app: a page still in flight is ignored."""
        self._check_channel(channel)
        handle = next(self._handles)
        ch = self.channels.pop(channel, None)
        outputs: list[Output] = []
        if ch is not None:
            self._purge(ch)
            outputs.append(FollowChanged(channel, False))
            error = ConnectionClosed(f"left {channel} while joining")
            outputs += [Failed(h, error) for h in ch.join_waiters]
        if self._conn is _Conn.READY:
            req = _Request({"t": "leave", "channel": channel}, "leave", handle, channel)
            self._calls[handle] = req
            self._send(req)
        else:
            outputs.append(Completed(handle, None))
        return handle, outputs

    def send(
        self, channel: str, text: str, meta: dict[str, Any] | None, cid: str, now_ms: int
    ) -> str:
        """Put a message in the outbox (sent now if connected, else after reconnecting);
        :class:`SendCompleted` with this ``cid`` reports its ack. The same ``cid`` again
        while it is pending joins the pending send."""
        self._check_channel(channel)
        max_cid = self.limit("max_cid_chars")
        if not isinstance(cid, str) or not 1 <= len(cid) <= max_cid:
            raise BadRequest(E.BAD_REQUEST, f"`cid` must be 1 to {max_cid} characters")
        _check_utf8(cid, "cid")
        self._check_text(text)
        if meta is not None:
            if not isinstance(meta, dict):
                raise BadRequest(E.BAD_REQUEST, "`meta` must be a dict")
            try:
                size = len(packb(meta))
            except EncodeError as exc:
                raise BadRequest(E.BAD_REQUEST, f"`meta` cannot be encoded: {exc}") from None
            if size > self.limit("max_meta_bytes"):
                raise LimitExceeded(
                    E.LIMIT_EXCEEDED, f"`meta` is over {self.limit('max_meta_bytes')} bytes"
                )
        pending = self._outbox.get(cid)
        if pending is not None and pending.channel != channel:
            raise BadRequest(E.BAD_REQUEST, f"cid {cid!r} is pending in another channel")
        if pending is None:
            self._enqueue_send(channel, text, meta or None, cid)
            self._pump(now_ms)
        return cid

    def request(self, t: str, now_ms: int, **fields: Any) -> int:
        """An app request (``history``, ``sync``, ``read``, ``typing``, ``presence``,
        ``unread``, ``channels``, ``edit``, ``delete``): returns its handle, completed with
        the typed result. Sent now if connected, else once connected; an edit or delete whose
        connection closes before its answer fails with ConnectionClosed (resending would
        repeat it), every other request is resent."""
        channel = fields.get("channel")
        if channel is not None:
            self._check_channel(channel)
        if "text" in fields:
            self._check_text(fields["text"])
        if t == "presence" and "users" in fields:
            if not all(valid_user(u) for u in fields["users"]):
                raise BadRequest(E.BAD_REQUEST, "`users` must be user ids")
        handle = next(self._handles)
        frame = {"t": t, **{k: v for k, v in fields.items() if v is not None}}
        req = _Request(frame, "call", handle, channel, retry=t not in ("edit", "delete"))
        self._calls[handle] = req
        self._pump(now_ms)
        return handle

    def cancel(self, handle: int) -> None:
        """The app stopped waiting for ``handle``: forget it (a late answer is ignored)."""
        req = self._calls.pop(handle, None)
        if req is not None and req.rid is not None:
            self._inflight.pop(req.rid, None)
        for ch in self.channels.values():
            if handle in ch.join_waiters:
                ch.join_waiters.remove(handle)

    def refresh(self, token: str) -> None:
        """Send ``refresh`` with a new token (after :class:`NeedToken`, or before ``exp``)."""
        self._refreshing = True
        if self._conn is _Conn.READY:
            self._send(_Request({"t": "refresh", "token": token}, "refresh"))

    # ------------------------------------------------------------------ app events

    def next_event(self, channel: str | None = None) -> Event | None:
        """The oldest event waiting for the app (of ``channel`` only, if given)."""
        index = 0
        if channel is not None:
            for index, item in enumerate(self._inbox):  # noqa: B007
                if item.channel == channel:
                    break
            else:
                return None
        elif not self._inbox:
            return None
        item = self._inbox[index]
        del self._inbox[index]
        if item.channel is None:
            self._signals -= 1  # presence and connection changes: bounded, see _push_signal
            return item.event
        ch = self.channels.get(item.channel)
        if ch is not None:
            ch.queued -= 1
            if isinstance(item.event, (Message, Edit, Delete, Resynced)):
                ch.delivered = (item.seq, item.epoch)
            if ch.phase is Phase.STALLED and ch.queued <= self.max_queued // 2:
                if self._conn is _Conn.READY:
                    self._catch_up(ch)
        return item.event

    @property
    def queued_events(self) -> int:
        return len(self._inbox)

    # ------------------------------------------------------------------ input

    def receive_frame(self, frame: Frame, now_ms: int) -> list[Output]:
        self._last_rx = now_ms
        t = frame.get("t")
        if self._conn is _Conn.HELLO:
            if t == "welcome":
                return self._welcome(frame, now_ms)
            if t == "error":
                wait = retry_after_ms(frame) if frame.get("code") == E.RATE_LIMITED else 0
                self.close_reason = str(frame.get("code"))
                return [HelloFailed(error_from_frame(frame), wait)]
            return []
        if self._conn is not _Conn.READY:
            return []
        rid = frame.get("rid")
        if type(rid) is int and t in ("ok", "error", "resync", "pong"):
            req = self._inflight.pop(rid, None)
            return [] if req is None else self._reply(req, frame, now_ms)
        channel = frame.get("channel")
        ch = self.channels.get(channel) if isinstance(channel, str) else None
        if t == "event":
            if ch is not None and type(frame.get("seq")) is int:
                self._live(ch, frame)
        elif t == "resync":
            if ch is not None:
                self._resync_push(ch, frame)
        elif t == "typing":
            if ch is not None:
                self._signal(ch, Typing(ch.name, frame["user"], bool(frame["on"])))
        elif t == "read":
            if ch is not None:
                self._signal(ch, ReadReceipt(ch.name, frame["user"], frame["seq"]))
        elif t == "presence":
            self._push_signal(Presence(frame["user"], frame["status"], frame["ts"]))
        elif t == "membership":
            if isinstance(channel, str) and isinstance(frame.get("by"), str):
                self._push_signal(Membership(channel, frame["by"]))
        elif t == "left":
            if ch is not None:
                return self._left(ch, str(frame.get("reason", "")))
        elif t == "error":
            return self._connection_error(frame)
        elif t == "bye":
            self.close_reason = str(frame.get("code", E.SHUTTING_DOWN))
        return []

    def _connection_error(self, frame: Frame) -> list[Output]:
        code = str(frame.get("code"))
        if code == E.TOKEN_EXPIRED and "refresh_within_ms" in frame:
            return self._need_token("the token expired") if self.can_refresh else []
        self.close_reason = code  # a connection error: the close follows
        return []

    def _welcome(self, frame: Frame, now_ms: int) -> list[Output]:
        self._conn = _Conn.READY
        self.user = str(frame["user"])
        self.heartbeat_ms = int(frame.get("heartbeat_ms", self.heartbeat_ms))
        self.max_frame = int(frame.get("max_frame", self.max_frame))
        limits = frame.get("limits")
        if isinstance(limits, dict):
            self.limits = {**DEFAULT_LIMITS.announce(), **limits}
        self._next_ping = now_ms + max(1, self.heartbeat_ms // 2)
        self._push_signal(ConnectionChanged(True, "connected"))
        for ch in sorted(self.channels.values(), key=lambda c: c.name):
            self._start_join(ch)
        outputs: list[Output] = [Welcomed(self.user, self.heartbeat_ms)]
        outputs += self._refuse_oversized(self.max_frame)
        self._pump(now_ms)
        return outputs

    def _refuse_oversized(self, max_frame: int) -> list[Output]:
        """Fail the outbox's sends this server's ``max_frame`` cannot take (queued under
        another server's limits, or restored): sent, one would fail the whole write."""
        outputs: list[Output] = []
        for req in list(self._outbox.values()):
            try:
                encode_many([{"rid": -(2**63), **req.frame}], max_frame)
            except FrameTooLarge:
                del self._outbox[req.cid]
                error = LimitExceeded(E.LIMIT_EXCEEDED, f"over this server's {max_frame} bytes")
                outputs.append(SendCompleted(req.cid, req.frame["channel"], None, error))
        return outputs

    # ------------------------------------------------------------------ replies

    def _reply(self, req: _Request, frame: Frame, now_ms: int) -> list[Output]:
        req.rid = None
        t = frame["t"]
        if t == "error":
            error = error_from_frame(frame)
            if error.code == E.RATE_LIMITED:
                req.not_before = now_ms + retry_after_ms(frame)
                self._hold(req)
                return []
            if error.code == E.TOKEN_EXPIRED and self.can_refresh and req.kind != "refresh":
                req.needs_token = True
                self._hold(req)
                return self._need_token("a request was refused: token expired")
            return self._failed(req, error, now_ms)
        if req.kind == "ping":
            self._ping_sent = None
            return []
        if req.kind == "refresh":
            self._refreshing = False
            for waiting in self._waiting():
                waiting.needs_token = False
            self._pump(now_ms)
            return []
        if req.kind == "send":
            self._outbox.pop(req.cid, None)
            ack = Ack(frame["channel"], frame["seq"], frame["id"], frame["ts"], frame["dup"])
            return [SendCompleted(req.cid, ack.channel, ack)]
        if req.kind in ("call", "leave"):
            assert req.handle is not None
            if self._calls.pop(req.handle, None) is None:
                return []  # cancelled
            if t == "resync":
                reason = str(frame.get("reason", ""))
                exc = ResyncRequired(frame["channel"], frame["head"], frame["epoch"], reason)
                return [Failed(req.handle, exc)]
            return [Completed(req.handle, self._result(req.frame, frame))]
        ch = self.channels.get(req.channel or "")
        if ch is None or req.gen != ch.gen:
            return []  # a reply for a channel state that has moved on
        if req.kind == "join":
            return self._joined(ch, frame)
        if t == "resync":
            self._reload(ch, frame["head"], frame["epoch"])
        elif req.kind == "sync":
            self._synced(ch, frame)
        elif req.kind == "history":
            self._reloaded(ch, frame)
        return []

    def _back_off(self, req: _Request, error: ClientError, now_ms: int) -> bool:
        """A refusal to retry later (PROTOCOL.md 8): ``store_unavailable`` always, with a
        doubling wait; ``internal`` up to MAX_INTERNAL_RETRIES times. True if ``req``
        waits for it now."""
        if error.code not in (E.STORE_UNAVAILABLE, E.INTERNAL) or (
            error.code == E.INTERNAL and req.attempts >= MAX_INTERNAL_RETRIES
        ):
            return False
        req.not_before = now_ms + min(STORE_RETRY_MS << min(req.attempts, 16), STORE_RETRY_MAX_MS)
        req.attempts += 1
        return True

    def _failed(self, req: _Request, error: ClientError, now_ms: int) -> list[Output]:
        if req.kind == "send":
            if self._back_off(req, error, now_ms):
                return []
            self._outbox.pop(req.cid, None)
            return [SendCompleted(req.cid, req.frame["channel"], None, error)]
        if req.kind in ("call", "leave"):
            assert req.handle is not None
            if self._calls.pop(req.handle, None) is None:
                return []
            return [Failed(req.handle, error)]
        if req.kind == "refresh":
            self._refreshing = False
            return [Disconnect(f"refresh failed: {error}")]
        ch = self.channels.get(req.channel or "")
        if ch is None or req.gen != ch.gen:
            return []
        if self._back_off(req, error, now_ms):  # the store is away: the same step, later
            self._hold(req)
            return []
        if error.code in (E.STORE_UNAVAILABLE, E.INTERNAL):  # retried enough: start over
            return [Disconnect(f"{req.kind} of {ch.name} failed: {error}")]
        if req.kind == "join":
            if error.code == E.TOKEN_EXPIRED and ch.known:
                # The token expired (no provider to refresh it), not the channel: keep it
                # and its position for the next connection, on a new token.
                ch.phase = Phase.IDLE
                failed: list[Output] = [Failed(h, error) for h in ch.join_waiters]
                ch.join_waiters.clear()
                return failed
            # The token no longer allows the channel (or it is not valid): stop following.
            return self._left(ch, error.code, error)
        # A sync or history refused (forbidden after a refresh, ...): rejoining decides.
        ch.phase = Phase.IDLE
        return []

    def _result(self, req: Frame, f: Frame) -> Any:
        t = req["t"]
        if t in ("edit", "delete"):
            return Ack(f["channel"], f["seq"], f["id"], f["ts"], bool(f.get("dup", False)))
        if t == "history":
            messages = tuple(message_from(f["channel"], m) for m in f["messages"])
            return HistoryPage(messages, bool(f["more"]))
        if t == "sync":
            entries = (entry_from(f["channel"], e) for e in f["events"])
            events = tuple(e for e in entries if e is not None)
            return SyncPage(f["channel"], events, bool(f["more"]), f["head"], f["epoch"])
        if t == "read":
            return f["seq"]
        if t == "presence":
            if "users" in req:
                return [
                    PresenceInfo(u["user"], u["status"], u["online"], u.get("last_seen"))
                    for u in f["users"]
                ]
            return f["status"]
        if t == "unread":
            return dict(f["unread"])
        if t == "channels":
            summaries = [
                ChannelSummary(
                    c["channel"],
                    c["head"],
                    c["read"],
                    c["unread"],
                    bool(c.get("capped", False)),
                    c.get("peer"),
                )
                for c in f["channels"]
            ]
            return summaries, bool(f["more"])
        return None

    # ------------------------------------------------------------------ channel flow

    def _start_join(self, ch: ChannelState) -> None:
        ch.phase, ch.gen = Phase.JOINING, next(self._gens)
        ch.pending.clear()
        self._internal("join", ch, {"t": "join", "channel": ch.name})

    def _joined(self, ch: ChannelState, f: Frame) -> list[Output]:
        info = JoinInfo(ch.name, f["head"], f["read"], f["epoch"], f["horizon"])
        outputs: list[Output] = [Completed(h, info) for h in ch.join_waiters]
        ch.join_waiters.clear()
        if not ch.known:
            ch.known = True
            outputs.append(FollowChanged(ch.name, True))
            if ch.replay:
                self._catch_up(ch)
            else:
                self._reload(ch, info.head, info.epoch)
        elif ch.reload_pending or _epoch_changed(ch.epoch, info.epoch):
            self._reload(ch, info.head, info.epoch)  # (a reload cut short by a disconnect)
        else:
            self._catch_up(ch)
        return outputs

    def _catch_up(self, ch: ChannelState) -> None:
        """Sync from the last applied seq; live events wait in the reorder buffer."""
        room = self.max_queued - ch.queued
        if room <= 0:
            ch.phase = Phase.STALLED
            ch.pending.clear()
            return
        ch.phase = Phase.SYNCING
        ch.sync_again = False  # this sync is sent after whatever the flag was set for
        limit = min(room, self.limit("sync_default"), self.limit("sync_max"))
        frame: Frame = {"t": "sync", "channel": ch.name, "since": ch.last, "limit": limit}
        if ch.epoch != 0:
            frame["epoch"] = ch.epoch  # a reset log answers resync, reason "epoch"
        self._internal("sync", ch, frame)

    def _synced(self, ch: ChannelState, f: Frame) -> None:
        if _epoch_changed(ch.epoch, f["epoch"]):
            self._reload(ch, f["head"], f["epoch"])
            return
        if f["epoch"] != 0:
            ch.epoch = f["epoch"]
        for e in f["events"]:
            self._apply(ch, e)
        if f["more"] or ch.sync_again:
            self._catch_up(ch)
            return
        ch.phase = Phase.LIVE
        pending, ch.pending = sorted(ch.pending.items()), {}
        for seq, e in pending:
            if ch.phase is Phase.LIVE:
                self._live(ch, e)
            elif ch.phase is Phase.SYNCING:
                ch.pending[seq] = e  # a gap remains: another sync runs

    def _reload(self, ch: ChannelState, head: int, epoch: int) -> None:
        """Forget the channel and continue from the server's ``head``: the newest history
        page up to it becomes a Resynced event."""
        ch.gen = next(self._gens)
        ch.pending.clear()
        self._purge(ch)
        ch.known, ch.epoch, ch.last = True, epoch, head
        ch.reload_pending = head != 0  # an empty channel needs no history page
        if head == 0:
            self._push(Resynced(ch.name, 0, epoch, ()), ch.name, 0, epoch)
            ch.queued += 1
            self._catch_up(ch)
            return
        ch.phase = Phase.RELOADING
        history = {"t": "history", "channel": ch.name, "before": head + 1}
        self._internal("history", ch, history)

    def _reloaded(self, ch: ChannelState, f: Frame) -> None:
        ch.reload_pending = False
        messages = tuple(message_from(ch.name, m) for m in f["messages"])
        self._push(Resynced(ch.name, ch.last, ch.epoch, messages), ch.name, ch.last, ch.epoch)
        ch.queued += 1
        self._catch_up(ch)

    def _purge(self, ch: ChannelState) -> None:
        """Drop the channel's events the app has not taken: a reload supersedes them."""
        if ch.queued:
            self._inbox = deque(q for q in self._inbox if q.channel != ch.name)
            ch.queued = 0

    def _apply(self, ch: ChannelState, e: Frame) -> None:
        seq = e["seq"]
        if seq <= ch.last:
            return  # already applied
        event = entry_from(ch.name, e)
        ch.last = seq
        if event is not None:  # an unknown kind still moves the position
            self._push(event, ch.name, seq, ch.epoch)
            ch.queued += 1

    def _live(self, ch: ChannelState, e: Frame) -> None:
        """An ``event`` push (or one held in the reorder buffer)."""
        seq = e["seq"]
        if ch.phase in (Phase.JOINING, Phase.RELOADING, Phase.SYNCING):
            if seq <= ch.last:
                return  # already applied (or below a reload's head): never worth holding
            if len(ch.pending) < MAX_REORDER:
                ch.pending[seq] = e
            else:  # dropped: possibly above the head of the sync in flight
                ch.sync_again = True
            return
        if ch.phase is not Phase.LIVE or seq <= ch.last:
            return  # idle or stalled: a sync will fetch it; or a duplicate
        if seq == ch.last + 1:
            if ch.queued >= self.max_queued:
                ch.phase = Phase.STALLED  # resumes by sync when the app catches up
                return
            self._apply(ch, e)
        else:  # a gap: fetch what is missing, hold this one
            ch.pending[seq] = e
            self._catch_up(ch)

    def _resync_push(self, ch: ChannelState, f: Frame) -> None:
        if f.get("reason") == "cut":
            if ch.phase is Phase.LIVE:
                self._catch_up(ch)  # the sync reaching the head resumes the stream
            elif ch.phase is Phase.SYNCING:
                ch.sync_again = True  # the sync in flight may have been read before the cut
        elif ch.phase not in (Phase.RELOADING, Phase.JOINING):  # a join's reply decides
            self._reload(ch, f["head"], f["epoch"])

    def _left(
        self, ch: ChannelState, reason: str, error: ClientError | None = None
    ) -> list[Output]:
        self.channels.pop(ch.name, None)
        outputs: list[Output] = [FollowChanged(ch.name, False)]
        if ch.join_waiters:
            failure = error or ConnectionClosed(f"left {ch.name}: {reason}")
            outputs += [Failed(h, failure) for h in ch.join_waiters]
        else:
            self._push(Left(ch.name, reason), ch.name, 0, 0)  # its iterator ends with it
        return outputs

    def _signal(self, ch: ChannelState, event: Typing | ReadReceipt) -> None:
        if ch.queued < self.max_queued:  # best effort: dropped when the queue is full
            self._push(event, ch.name, 0, 0)
            ch.queued += 1

    def _push(self, event: Event, channel: str | None, seq: int, epoch: int) -> None:
        self._inbox.append(_Queued(event, channel, seq, epoch))

    def _push_signal(self, event: Event) -> None:
        """A channel-less event (presence, connection changes): at most MAX_SIGNALS wait
        for the app, so an app reading only channel iterators never grows the inbox."""
        if self._signals < MAX_SIGNALS:
            self._signals += 1
            self._push(event, None, 0, 0)

    # ------------------------------------------------------------------ sending

    def _need_token(self, reason: str) -> list[Output]:
        if self._refreshing:
            return []
        self._refreshing = True
        return [NeedToken(reason)]

    def _enqueue_send(self, channel: str, text: str, meta: dict[str, Any] | None, cid: str) -> None:
        frame: Frame = {"t": "send", "channel": channel, "cid": cid, "text": text}
        if meta:
            frame["meta"] = meta
        self._outbox[cid] = _Request(frame, "send", channel=channel)

    def _internal(self, kind: str, ch: ChannelState, frame: Frame) -> None:
        self._send(_Request(frame, kind, channel=ch.name, gen=ch.gen))

    def _send(self, req: _Request) -> None:
        req.rid = next(self._rids)
        self._inflight[req.rid] = req
        self._out.append({"t": req.frame["t"], "rid": req.rid, **req.frame})

    def _hold(self, req: _Request) -> None:
        """A refused request waits to be sent again. App requests and sends stay in their
        tables; an internal one is kept here (until the connection closes)."""
        if req.kind in _INTERNAL:
            self._held.append(req)

    def _waiting(self) -> list[_Request]:
        return [*self._calls.values(), *self._outbox.values(), *self._held]

    def _resend_times(self) -> list[int]:
        """When a request waiting out a rate limit or a backoff may go: the ones `_pump`
        would send then. Not those in flight (their old ``not_before`` has passed: counting
        it made the timer spin until the answer came) and, of the outbox, only the first
        unsent send (the ones behind it wait for it, to keep their order)."""
        times = [
            r.not_before
            for r in (*self._calls.values(), *self._held)
            if r.rid is None and r.not_before and not r.needs_token
        ]
        for r in self._outbox.values():
            if r.rid is None:
                if r.not_before and not r.needs_token:
                    times.append(r.not_before)
                break
        return times

    def _pump(self, now_ms: int) -> None:
        """Send every waiting request that may go now: app requests, then the outbox in
        order (stopping at the first one that must wait, so sends keep their order)."""
        if self._conn is not _Conn.READY:
            return
        for req in self._calls.values():
            if req.rid is None and not req.needs_token and req.not_before <= now_ms:
                self._send(req)
        for req in self._outbox.values():
            if req.rid is not None:
                continue
            if req.needs_token or req.not_before > now_ms:
                break
            self._send(req)
        for req in list(self._held):
            if not req.needs_token and req.not_before <= now_ms:
                self._held.remove(req)
                ch = self.channels.get(req.channel or "")
                if req.channel is None or (ch is not None and req.gen == ch.gen):
                    self._send(req)  # (a channel request that has moved on is dropped)

    # ------------------------------------------------------------------ checks

    def _check_channel(self, channel: object) -> None:
        if not valid_channel(channel):
            raise BadRequest(E.BAD_REQUEST, f"not a valid channel name: {channel!r}")

    def _check_text(self, text: object) -> None:
        if not isinstance(text, str):
            raise BadRequest(E.BAD_REQUEST, "`text` must be a string")
        _check_utf8(text, "text")
        most = self.limit("max_text_bytes")
        if len(text) > most or len(text.encode()) > most:
            raise LimitExceeded(E.LIMIT_EXCEEDED, f"`text` is over {most} bytes of UTF-8")
