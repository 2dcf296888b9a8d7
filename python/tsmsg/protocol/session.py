"""The per-connection protocol state machine, without I/O.

A :class:`Session` takes decoded frames (``receive_frame``) and store completions
(``write_done``) and returns :data:`Action` values for the server to carry out: frames to
send, writes to submit, channel subscriptions, fan-out, closing. It imports no trio and no
socket and keeps no clock (``now_ms`` is passed in), so it is tested with plain calls.
A request that reads the store (join, history, sync, unread) returns a :class:`Read`: the
server runs its ``query`` off the event loop (a store read may scan a long log, or cross
the network) and hands the result back with ``read_done``; the session handles no other
frame of its connection meanwhile.

States: ``AWAITING_HELLO`` → ``READY`` → ``CLOSED``. A connection error (PROTOCOL.md)
sends its error frame, then ``Close``, and the session refuses further input.
"""

from __future__ import annotations

import enum
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from tsmsg._native import DEFAULT_MAX_DEPTH, FrameError, FrameTooLarge, packb
from tsmsg.auth import (
    DM_PREFIX,
    AuthError,
    Claims,
    TokenVerifier,
    parse_dm,
    valid_channel,
    valid_user,
)
from tsmsg.protocol import errors as E
from tsmsg.protocol.errors import RequestError
from tsmsg.protocol.limits import PROTOCOL_VERSION, Limits
from tsmsg.protocol.ratelimit import TokenBucket, UserLimits
from tsmsg.store.base import (
    AppendResult,
    ChannelInfo,
    Entry,
    HistoryPage,
    Store,
    StoreError,
    SyncPage,
    WriteOp,
)

log = logging.getLogger("tsmsg.session")

Frame = dict[str, Any]
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
RUN_GAP_MS = 1000  # a pause this long ends a run of rate-limited requests
RID_RULE = "`rid` must be an integer from -2**63 to 2**63-1"
SEND_LIMITED = "sending too fast: over the per-user or per-channel send rate"
MAX_ID_CHARS = 64  # message ids are opaque strings of at most this length
# Bytes of a reply around its list of entries ({"t":"ok","rid":…,"channel":…,"more":…,…});
# kept generous so a page never exceeds max_frame.
PAGE_ENVELOPE = 512
EVENT_OVERHEAD = 24  # "t":"event" and the "channel" key added to each stored entry
# DM channels a connection remembers having recorded the peer's membership of; past it the
# set starts over (a repeated record is an idempotent write, not an error).
NOTICED_MAX = 256


# Actions are plain slotted dataclasses, not frozen ones: a frozen one's __init__ costs
# twice as much, and a session makes several per message (issue 17). Nothing mutates them.
@dataclass(slots=True)
class Reply:
    """Send this frame to this connection."""

    frame: Frame


@dataclass(slots=True)
class Close:
    """Close this connection after the frames before it are sent."""

    reason: str


@dataclass(slots=True)
class Submit:
    """Queue this write to the store; its completion comes back via ``write_done``."""

    op: WriteOp


@dataclass(slots=True)
class Subscribe:
    channel: str


@dataclass(slots=True)
class Unsubscribe:
    channel: str


@dataclass(slots=True)
class Position:
    """Where a join found ``channel`` (read after its ``Subscribe``): the hub delivers
    the channel's events after ``head`` live, those up to it are the client's to sync."""

    channel: str
    epoch: int
    head: int


@dataclass(slots=True)
class Publish:
    """Send this frame to every connection joined to ``channel`` (except those of
    ``skip_user``). The server encodes it once for all of them."""

    channel: str
    frame: Frame
    skip_user: str | None = None
    # An event: its log's epoch, for the relay to tell a reset log from a repeat (routing
    # only: not compared, not sent).
    epoch: int = field(default=0, compare=False)


@dataclass(slots=True)
class NotifyUser:
    """Send this frame to every connected device of ``user``, on every node (a
    ``membership`` push: a channel or a DM appeared for them)."""

    user: str
    frame: Frame


@dataclass(slots=True)
class SetPresence:
    """This user's presence: ``None`` when this device has just connected (the server
    knows whether it is the user's first), else the status the user set."""

    status: str | None


@dataclass(slots=True)
class QueryPresence:
    """Answer ``rid`` with the presence of ``users`` (the server holds live presence)."""

    rid: int | None
    users: list[str]


@dataclass(slots=True)
class Read:
    """Run ``query`` (store reads only: it touches no session state) off the event loop,
    then give its result to :meth:`Session.read_done`, which calls ``then`` with it.
    ``hold``: a channel whose live pushes the connection keeps back until then, so that
    the reply comes before them and none committed during the read is lost (join, and
    the sync that resumes a cut stream)."""

    query: Callable[[], Any]
    then: Callable[[Any], list[Action]]
    rid: int | None
    what: str  # the request type, for logs
    hold: str | None = None


Action = (
    Reply
    | Close
    | Submit
    | Subscribe
    | Unsubscribe
    | Position
    | Publish
    | NotifyUser
    | SetPresence
    | QueryPresence
    | Read
)


class Logins(Protocol):
    """The server's guard on failed logins per client address (PROTOCOL.md 16.3), asked
    at each hello: before its token is tried, and when it was refused."""

    def check_login(self, session: Session) -> None:
        """Raise a fatal RequestError (rate_limited) while the session's address may not
        try a token."""

    def login_failed(self, session: Session) -> None:
        """The hello's token was refused (unauthorized, token_expired): a failed login."""


class State(enum.Enum):
    AWAITING_HELLO = "awaiting_hello"
    READY = "ready"
    CLOSED = "closed"


def event_frame(channel: str, entry: Entry) -> Frame:
    """A log entry as the wire's ``event`` push."""
    return {"t": "event", "channel": channel, **entry}


def resync_frame(channel: str, head: int, epoch: int, reason: str, rid: int | None = None) -> Frame:
    """``resync``: the client must reload the channel (history) and continue from ``head``.
    ``reason``: ``compacted`` (its position is below the compaction horizon), ``ahead``
    (its position is past the head: a log it knew was reset), ``epoch`` (the epoch it
    holds is not the channel's), ``cut`` (a push: its live stream was cut, see flow control)."""
    frame: Frame = {"t": "resync"} if rid is None else {"t": "resync", "rid": rid}
    frame.update(channel=channel, head=head, epoch=epoch, reason=reason)
    return frame


def _field(frame: Frame, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = frame.get(key)
    if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(E.BAD_REQUEST, f"`{key}` must be {what}")
    return value


def _int(frame: Frame, key: str, lo: int, hi: int, default: int | None = None) -> int:
    if default is not None and frame.get(key) is None:
        return default
    value: int = _field(frame, key, int, f"an integer from {lo} to {hi}")
    if not lo <= value <= hi:
        raise RequestError(E.BAD_REQUEST, f"`{key}` must be an integer from {lo} to {hi}")
    return value


def _text(frame: Frame, key: str, max_bytes: int) -> str:
    value: str = _field(frame, key, str, "a string")
    # isascii() is O(1) (CPython keeps the flag): most texts are never encoded here.
    if len(value) > max_bytes or (not value.isascii() and len(value.encode()) > max_bytes):
        raise RequestError(E.LIMIT_EXCEEDED, f"`{key}` is over {max_bytes} bytes of UTF-8")
    return value


# The depth of `meta`'s map in a sync or history page (ok, its `events`, an event, meta),
# two more than in the send (send, meta): a send's meta may reach depth `max_depth` - 2,
# so that every frame the server writes nests within `max_depth` (PROTOCOL.md 6.4).
META_PAGE_DEPTH = 4


def _check_meta_values(value: Any, levels: int) -> None:
    """Refuse a ``meta`` whose maps and arrays nest more than ``levels`` below its own
    map, or that holds a float which is not finite (JSON has no NaN or infinity: a
    WebSocket JSON client could not parse the event)."""
    if type(value) is float:
        if not math.isfinite(value):
            raise RequestError(E.BAD_REQUEST, "`meta` floats must be finite (no NaN, infinity)")
        return
    if type(value) is dict:
        items: Any = value.values()
    elif type(value) is list:
        items = value
    else:
        return
    if levels < 0:
        raise RequestError(
            E.LIMIT_EXCEEDED,
            "`meta` nests deeper than max_depth - 2 (pages carry it two levels deeper)",
        )
    for item in items:
        _check_meta_values(item, levels - 1)


def without_unsendable_meta(frame: Frame) -> Frame | None:
    """``frame`` (an ``event``, or a reply with a page of ``events`` or ``messages``)
    with the ``meta`` left out of each entry whose meta the send checks of section 6.4
    refuse at the encoder's depth; None if no entry has one. Such entries were stored
    before those checks existed, and a frame carrying one may not encode (section 6.4)."""

    def sendable(entry: Any) -> bool:
        try:
            _check_meta_values(entry.get("meta"), DEFAULT_MAX_DEPTH - META_PAGE_DEPTH)
        except RequestError:
            return False
        return True

    def strip(entry: Any) -> Any:
        return entry if sendable(entry) else {k: v for k, v in entry.items() if k != "meta"}

    if frame.get("t") == "event":
        return None if sendable(frame) else strip(frame)
    out = dict(frame)
    for key in ("events", "messages"):
        if isinstance(out.get(key), list):
            out[key] = [strip(e) if isinstance(e, dict) else e for e in out[key]]
    return out if out != frame else None


_CONTROL = re.compile("[\x00-\x1f\x7f]")  # not in a status (section 6.13)

NO_CUTS: frozenset[str] = frozenset()  # what a session's ``cut`` is while empty


class Session:
    __slots__ = (  # one per connection: no per-instance dict (memory per idle connection)
        "_frames",
        "_last_refused_ms",
        "admit_user",
        "claims",
        "close_reason",
        "cut",
        "expired_at",
        "joined",
        "last_rx_ms",
        "limited_since",
        "limits",
        "logins",
        "memberships",
        "noticed",
        "on_rate_limited",
        "session_id",
        "state",
        "store",
        "typing",
        "user_limits",
        "verifier",
    )

    def __init__(
        self,
        store: Store,
        verifier: TokenVerifier,
        limits: Limits,
        session_id: str,
        now_ms: int,
        user_limits: UserLimits | None = None,
        on_rate_limited: Callable[[str], None] | None = None,
        admit_user: Callable[[str], None] | None = None,
        logins: Logins | None = None,
    ) -> None:
        self.store = store
        self.verifier = verifier
        self.limits = limits
        self.session_id = session_id
        self.state = State.AWAITING_HELLO
        self.claims: Claims | None = None
        self.joined: set[str] = set()
        # Joined channels whose live stream was cut (slow consumer). Rare: a frozenset, so
        # the many sessions that never have one share the empty one.
        self.cut = NO_CUTS
        # DM channels this connection has sent in whose peer's membership it recorded
        # (the first message does, section 6.15); at most NOTICED_MAX, then forgotten.
        self.noticed = NO_CUTS
        self.close_reason: str | None = None
        # The user's memberships, when the server keeps them in memory (it sets this
        # after hello: one set for all the user's sessions); None: ask the store.
        self.memberships: set[str] | None = None
        self._frames = TokenBucket(limits.frame_rate, limits.frame_burst, now_ms)
        # Shared with the user's other sessions (the server passes one for all).
        self.user_limits = user_limits or UserLimits(limits)
        self.last_rx_ms = now_ms  # anything received counts as a heartbeat
        self.typing: dict[str, int] = {}  # channel -> when its `on` expires
        self.expired_at: int | None = None  # when we told the client its token expired
        self.limited_since: int | None = None  # first of an unbroken run of rate_limited
        self._last_refused_ms = 0
        # Told the scope of each refusal ("frame", "send", "typing"), e.g. for metrics.
        self.on_rate_limited = on_rate_limited
        # Called at hello with the verified user; raises RequestError to refuse the
        # connection (the server's cap on a user's connections).
        self.admit_user = admit_user
        self.logins = logins  # the guard on failed logins per address, if any

    @property
    def user(self) -> str:
        assert self.claims is not None, "no user before hello"
        return self.claims.user

    # ------------------------------------------------------------------ input

    def receive_frame(self, frame: Frame, now_ms: int) -> list[Action]:
        if self.state is State.CLOSED:
            return []
        # Frames held back by flow control are handled with the time they were read: a
        # refresh made meanwhile (the server's, for a held connection) is not undone.
        if now_ms > self.last_rx_ms:
            self.last_rx_ms = now_ms
        rid = frame.get("rid")
        bad_rid = rid is not None and (type(rid) is not int or not INT64_MIN <= rid <= INT64_MAX)
        if bad_rid or type(rid) is not int:
            rid = None
        t = frame.get("t")
        try:
            if not isinstance(t, str):
                raise RequestError(E.BAD_FRAME, "every frame needs a string `t`")
            if self.state is State.AWAITING_HELLO:
                if t != "hello":
                    raise RequestError(
                        E.HELLO_REQUIRED, f"the first frame must be hello, not {t!r}"
                    )
                if bad_rid:
                    raise RequestError(E.BAD_REQUEST, RID_RULE, fatal=True)
                return self._hello(frame, rid, now_ms)
            retry = self._frames.take(now_ms)
            if retry:  # (the message is not built per frame)
                self._limit(retry, "frame", f"over {self.limits.frame_rate:g} frames/s")
            if bad_rid:
                raise RequestError(E.BAD_REQUEST, RID_RULE)
            handler = HANDLERS.get(t)
            if handler is None:
                if t == "hello":
                    raise RequestError(E.BAD_REQUEST, "this connection already said hello")
                raise RequestError(E.UNKNOWN_TYPE, f"unknown frame type {t[:32]!r}")
            if self.claims is not None and now_ms >= self.claims.exp * 1000:
                if t not in ("refresh", "ping"):
                    raise RequestError(
                        E.TOKEN_EXPIRED, "the token expired: send refresh", fatal=False
                    )
            actions = handler(self, frame, rid, now_ms)
            self.limited_since = None
            return actions
        except RequestError as exc:
            if exc.code == E.RATE_LIMITED:
                # An unbroken run of refusals: a pause of a second or a served request ends it.
                if self.limited_since is None or now_ms - self._last_refused_ms > RUN_GAP_MS:
                    self.limited_since = now_ms
                self._last_refused_ms = now_ms
                if now_ms - self.limited_since >= self.limits.rate_limited_disconnect_ms:
                    exc = RequestError(
                        E.RATE_LIMITED,
                        "kept sending while rate limited for "
                        f"{self.limits.rate_limited_disconnect_ms} ms: disconnected",
                        fatal=True,
                        retry_after_ms=exc.extra.get("retry_after_ms", 1),
                    )
            return self._refuse(exc, rid)
        except StoreError as exc:
            return self._store_failed(exc, t, rid)

    def read_done(
        self, read: Read, result: Any = None, error: Exception | None = None
    ) -> list[Action]:
        """The ``query`` of ``read`` returned ``result`` (or raised ``error``)."""
        if self.state is State.CLOSED:
            return []
        try:
            if error is not None:
                raise error
            return read.then(result)
        except RequestError as exc:
            return self._refuse(exc, read.rid)
        except StoreError as exc:
            return self._store_failed(exc, read.what, read.rid)

    def _store_failed(self, exc: StoreError, what: object, rid: int | None) -> list[Action]:
        """A read the store failed (an entry it cannot decode or decrypt, the store is
        unreachable): a request error; the detail (key ids...) stays in the log."""
        log.error("%s of session %s failed in the store: %r", what, self.session_id, exc)
        internal = exc.code == E.INTERNAL
        message = "the server could not read the stored data" if internal else exc.message
        return self._refuse(RequestError(exc.code, message), rid)

    def frame_error(self, exc: FrameError) -> list[Action]:
        """The decoder failed: a connection error."""
        if self.state is State.CLOSED:
            return []
        code = E.FRAME_TOO_LARGE if isinstance(exc, FrameTooLarge) else E.BAD_FRAME
        return self._refuse(RequestError(code, str(exc)), None)

    def timed_out(self, code: str) -> list[Action]:
        """A read deadline passed: ``hello_timeout`` (no hello in time) or
        ``frame_timeout`` (a frame started and did not complete in time)."""
        if self.state is State.CLOSED:
            return []
        what = "no hello" if code == E.HELLO_TIMEOUT else "a frame did not complete"
        exc = RequestError(code, f"{what} within the deadline", fatal=True)
        return self._typing_off_all() + self._refuse(exc, None)

    def _refuse(self, exc: RequestError, rid: int | None) -> list[Action]:
        actions: list[Action] = [Reply(exc.frame(rid))]
        if exc.fatal:
            self.state = State.CLOSED
            self.close_reason = f"{exc.code}: {exc.message}"
            actions.append(Close(self.close_reason))
        return actions

    def closed(self, reason: str) -> list[Action]:
        """The connection is gone (peer closed, server shutdown): typing it had on stops."""
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.close_reason = reason
        return self._typing_off_all()

    def _typing_off_all(self) -> list[Action]:
        actions: list[Action] = [self._typing_push(ch, False) for ch in self.typing]
        self.typing.clear()
        return actions

    def _limit(self, retry_after_ms: int, scope: str, what: str) -> None:
        if retry_after_ms:
            if self.on_rate_limited is not None:
                self.on_rate_limited(scope)
            raise RequestError(E.RATE_LIMITED, what, retry_after_ms=retry_after_ms)

    # ------------------------------------------------------------------ time

    def next_deadline(self) -> int | None:
        """The earliest time (ms) at which ``tick`` has something to do."""
        if self.state is not State.READY or self.claims is None:
            return None
        deadlines = [self.last_rx_ms + 2 * self.limits.heartbeat_ms]
        if self.expired_at is None:
            deadlines.append(self.claims.exp * 1000)
        else:
            deadlines.append(self.expired_at + self.limits.refresh_grace_ms)
        deadlines.extend(self.typing.values())
        return min(deadlines)

    def tick(self, now_ms: int) -> list[Action]:
        """Timers: idle peers, token expiry and its grace period, typing expiry."""
        if self.state is not State.READY or self.claims is None:
            return []
        idle = 2 * self.limits.heartbeat_ms
        if now_ms - self.last_rx_ms >= idle:
            exc = RequestError(E.IDLE_TIMEOUT, f"nothing received for {idle} ms")
            return self._typing_off_all() + self._refuse(exc, None)
        actions: list[Action] = []
        if now_ms >= self.claims.exp * 1000:
            grace = self.limits.refresh_grace_ms
            if self.expired_at is None:
                self.expired_at = now_ms
                exc = RequestError(
                    E.TOKEN_EXPIRED,
                    f"the token expired: send refresh within {grace} ms",
                    fatal=False,
                )
                actions.append(Reply(exc.frame(None) | {"refresh_within_ms": grace}))
            elif now_ms >= self.expired_at + grace:
                exc = RequestError(
                    E.TOKEN_EXPIRED,
                    f"the token expired and was not refreshed within {grace} ms",
                    fatal=True,
                )
                return self._typing_off_all() + self._refuse(exc, None)
        for channel, until in list(self.typing.items()):
            if now_ms >= until:
                del self.typing[channel]
                actions.append(self._typing_push(channel, False))
        return actions

    def _ok(self, rid: int | None, **fields: Any) -> list[Action]:
        return [] if rid is None else [Reply({"t": "ok", "rid": rid, **fields})]

    # ------------------------------------------------------------------ handshake

    def _hello(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        v = frame.get("v")
        if type(v) is not int or v != PROTOCOL_VERSION:
            raise RequestError(
                E.UNSUPPORTED_VERSION, f"this server speaks protocol version {PROTOCOL_VERSION}"
            )
        logins = self.logins
        if logins is not None:
            logins.check_login(self)  # an address locked out gets no guess
        token = frame.get("token")
        try:
            if not isinstance(token, str):
                raise RequestError(E.UNAUTHORIZED, "`token` must be a JWT string")
            try:
                claims = self.verifier.verify(token, now_ms // 1000)
            except AuthError as exc:
                raise RequestError(exc.code, exc.message) from None
        except RequestError:
            if logins is not None:  # counted now, not at the close: the next hello sees it
                logins.login_failed(self)
            raise
        if self.admit_user is not None:
            self.admit_user(claims.user)
        self.claims = claims
        self.state = State.READY
        welcome = {
            "t": "welcome",
            "rid": rid,
            "v": PROTOCOL_VERSION,
            "user": self.claims.user,
            "session": self.session_id,
            "heartbeat_ms": self.limits.heartbeat_ms,
            "max_frame": self.limits.max_frame,
            "limits": self.limits.announce(),
            "ts": now_ms,
        }
        if rid is None:
            del welcome["rid"]
        return [Reply(welcome), SetPresence(None)]

    # ------------------------------------------------------------------ channels

    def _channel(self, frame: Frame, *, send: bool = False) -> str:
        name: str = _field(frame, "channel", str, "a channel name")
        assert self.claims is not None
        # The claims answer for valid names only (and remember them): an allowed name is
        # not matched against the name rules again.
        if self.claims.may_send(name) if send else self.claims.may_read(name):
            return name
        if not valid_channel(name):
            raise RequestError(E.BAD_REQUEST, "`channel` is not a valid channel name")
        need = "chat:send" if send else "chat:read"
        raise RequestError(E.FORBIDDEN, f"the token does not allow {need} in {name!r}")

    def _join(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        channel = self._channel(frame)
        if channel not in self.joined and len(self.joined) >= self.limits.max_joined:
            raise RequestError(
                E.LIMIT_EXCEEDED, f"a connection may join at most {self.limits.max_joined} channels"
            )
        store, user, most, mine = (
            self.store,
            self.user,
            self.limits.max_memberships,
            self.memberships,
        )

        def query() -> tuple[ChannelInfo, int, bool, int]:
            member, count = False, 0
            if mine is None:  # counted up to the bound only: a join's cost never grows past it
                member = store.is_member(user, channel)
                count = 0 if member else len(store.channels_of(user, limit=most))
            return store.channel(channel), store.read_cursor(user, channel), member, count

        def then(result: tuple[ChannelInfo, int, bool, int]) -> list[Action]:
            info, read, member, count = result
            if mine is not None:  # exact, with the joins whose writes are not committed yet
                member, count = channel in mine, len(mine)
            if not member and count >= most:
                raise RequestError(
                    E.LIMIT_EXCEEDED,
                    f"a user may be a member of at most {most} channels: "
                    "leave one with `forget` first",
                )
            self.joined.add(channel)
            self._uncut(channel)
            actions: list[Action] = [Position(channel, info.epoch, info.head)]
            if not member:  # for presence: who shares a channel (the store keeps the bound:
                # joins on other devices may be in flight)
                op = WriteOp("member", channel, user, most=most)
                actions.append(self._submit(op, None))
            fields = {"head": info.head, "read": read, "epoch": info.epoch}
            return actions + self._ok(rid, channel=channel, **fields, horizon=info.horizon)

        # Subscribed now, its pushes held until the reply: none committed during the read
        # is lost, and none comes before the `ok` (section 6.2).
        return [Subscribe(channel), Read(query, then, rid, "join", hold=channel)]

    def _leave(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        # No authorization: leaving is always allowed (also after a token lost access).
        channel: str = _field(frame, "channel", str, "a channel name")
        if not valid_channel(channel):
            raise RequestError(E.BAD_REQUEST, "`channel` is not a valid channel name")
        forget = frame.get("forget")
        if forget is None:  # nil is absent (section 2)
            forget = False
        elif not isinstance(forget, bool):
            raise RequestError(E.BAD_REQUEST, "`forget` must be a boolean")
        self.joined.discard(channel)
        self._uncut(channel)
        actions: list[Action] = [Unsubscribe(channel)]
        if forget:  # the membership ends too, durably: the ok waits for it
            return [*actions, self._submit(WriteOp("unmember", channel, self.user), rid)]
        return [*actions, *self._ok(rid, channel=channel)]

    # ------------------------------------------------------------------ writes

    def _spend_send(self, channel: str, now_ms: int) -> None:
        self._limit(self.user_limits.take_send(self.user, channel, now_ms), "send", SEND_LIMITED)

    def _send(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        # The most frequent request: the common case is checked inline (issue 17), the
        # helpers run only to word a refusal.
        limits, user = self.limits, self.user
        channel, cid, text = frame.get("channel"), frame.get("cid"), frame.get("text")
        assert self.claims is not None
        if type(channel) is not str or not self.claims.may_send(channel):
            channel = self._channel(frame, send=True)  # raises
        if type(cid) is not str or not 1 <= len(cid) <= limits.max_cid_chars:
            raise RequestError(
                E.BAD_REQUEST, f"`cid` must be a string of 1 to {limits.max_cid_chars} chars"
            )
        if type(text) is not str or len(text) > limits.max_text_bytes or not text.isascii():
            text = _text(frame, "text", limits.max_text_bytes)
        meta = frame.get("meta")
        if meta is not None:
            if not isinstance(meta, dict):
                raise RequestError(E.BAD_REQUEST, "`meta` must be a map")
            if len(packb(meta)) > limits.max_meta_bytes:
                raise RequestError(
                    E.LIMIT_EXCEEDED, f"`meta` is over {limits.max_meta_bytes} bytes encoded"
                )
            _check_meta_values(meta, limits.max_depth - META_PAGE_DEPTH)
        retry = self.user_limits.take_send(user, channel, now_ms)
        if retry:
            self._limit(retry, "send", SEND_LIMITED)
        dup = self.store.cached_dup(channel, user, cid)
        if dup is not None:
            return self._ok(rid, channel=channel, seq=dup.seq, id=dup.id, ts=dup.ts, dup=True)
        op = WriteOp("message", channel, user, cid, text, meta or None, origin=self, rid=rid)
        return [Submit(op)]

    def _change(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        channel = self._channel(frame, send=True)
        target: str = _field(frame, "id", str, "a message id")
        if len(target) > MAX_ID_CHARS:
            raise RequestError(E.NOT_FOUND, f"no message {target[:MAX_ID_CHARS]!r}...")
        assert self.claims is not None
        moderator = self.claims.may_moderate(channel)
        if frame["t"] == "edit":
            text = _text(frame, "text", self.limits.max_text_bytes)
            op = WriteOp("edit", channel, self.user, text=text, target=target, moderator=moderator)
        else:
            op = WriteOp("delete", channel, self.user, target=target, moderator=moderator)
        self._spend_send(channel, now_ms)
        return [self._submit(op, rid)]

    def _read(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        channel = self._channel(frame)
        seq = _int(frame, "seq", 0, INT64_MAX)
        return [self._submit(WriteOp("read", channel, self.user, seq=seq), rid)]

    def _submit(self, op: WriteOp, rid: int | None) -> Submit:
        op.origin, op.rid = self, rid
        return Submit(op)

    def write_done(self, op: WriteOp) -> list[Action]:
        """The store committed (or failed) ``op``: the reply to the requester and the
        fan-out to the channel. The fan-out happens even if this connection is gone."""
        result, kind = op.result, op.kind
        if type(result) is AppendResult and op.error is None:  # message, edit, delete
            return self._appended(op, result)
        actions: list[Action] = []
        live = self.state is State.READY
        if kind == "member":  # a background write: a failure is logged, not sent
            if op.error is None and op.changed:  # new: the user's devices learn of it
                push = {"t": "membership", "channel": op.channel, "by": self.user}
                actions.append(NotifyUser(op.user, push))
            return actions
        if kind == "seen":
            return actions  # a background write: a failure is logged by the store, not sent
        if op.error is not None:
            if live:
                error = RequestError(op.error.code, op.error.message, **op.error.extra)
                actions.append(Reply(error.frame(op.rid)))
            return actions
        if kind == "unmember":
            return self._ok(op.rid, channel=op.channel, forgotten=True) if live else actions
        assert kind == "read", kind
        if live:
            actions += self._ok(op.rid, channel=op.channel, seq=result)
        if op.changed:
            read = {"t": "read", "channel": op.channel, "user": op.user, "seq": result}
            actions.append(Publish(op.channel, read))
        return actions

    def _appended(self, op: WriteOp, result: AppendResult) -> list[Action]:
        """A message, edit or delete the store answered: the ``ok`` (unless the request
        had no rid, or this connection is gone) and, for a new entry, its event."""
        channel, seq, mid, ts, dup = op.channel, result.seq, result.id, result.ts, result.dup
        rid = op.rid
        actions: list[Action] = []
        if rid is not None and self.state is State.READY:
            ok = {
                "t": "ok", "rid": rid, "channel": channel, "seq": seq, "id": mid, "ts": ts,
                "dup": dup,
            }  # fmt: skip
            actions.append(Reply(ok))
        if dup:
            return actions
        # The event frame, built at once (event_frame's shape: the entry's fields).
        event: Frame = {
            "t": "event", "channel": channel, "seq": seq, "kind": op.kind, "id": mid,
            "sender": op.user, "ts": ts,
        }  # fmt: skip
        if op.text is not None:
            event["text"] = op.text
        if op.meta:
            event["meta"] = op.meta
        actions.append(Publish(channel, event, None, op.epoch))
        if op.kind == "message" and channel.startswith(DM_PREFIX):
            actions += self._dm_peer(channel)
        return actions

    def _dm_peer(self, channel: str) -> list[Action]:
        """After this connection's first message in a DM: the peer becomes a member (if
        not already, and under their max_memberships), which pushes ``membership`` to
        their devices, so a DM is never invisible to its recipient (section 6.15)."""
        users = parse_dm(channel)
        if users is None or channel in self.noticed:
            return []
        peer = users[1] if users[0] == self.user else users[0]
        if len(self.noticed) >= NOTICED_MAX:
            self.noticed = NO_CUTS
        self.noticed = self.noticed | {channel}
        op = WriteOp("member", channel, peer, most=self.limits.max_memberships)
        return [self._submit(op, None)]

    # ------------------------------------------------------------------ reads

    def _page_bytes(self, channel: str) -> int:
        return self.limits.max_frame - PAGE_ENVELOPE - len(channel.encode())

    def _history(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        channel = self._channel(frame)
        before = None if frame.get("before") is None else _int(frame, "before", 1, INT64_MAX)
        limit = _int(frame, "limit", 1, self.limits.history_max, self.limits.history_default)
        store, max_bytes = self.store, self._page_bytes(channel)

        def then(page: HistoryPage) -> list[Action]:
            return self._ok(rid, channel=channel, messages=page.messages, more=page.more)

        return [
            Read(lambda: store.history(channel, before, limit, max_bytes), then, rid, "history")
        ]

    def _sync(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        channel = self._channel(frame)
        since = _int(frame, "since", 0, INT64_MAX)
        limit = _int(frame, "limit", 1, self.limits.sync_max, self.limits.sync_default)
        epoch = None if frame.get("epoch") is None else _int(frame, "epoch", 0, INT64_MAX)
        overhead = EVENT_OVERHEAD + len(channel.encode())
        store, max_bytes = self.store, self._page_bytes(channel)

        def query() -> SyncPage:
            return store.sync(channel, since, limit, max_bytes=max_bytes, entry_overhead=overhead)

        def then(page: SyncPage) -> list[Action]:
            stale = epoch is not None and epoch != page.epoch and since > 0  # section 11
            if page.resync or stale:
                reason = "epoch" if stale else "compacted" if since <= page.head else "ahead"
                return [Reply(resync_frame(channel, page.head, page.epoch, reason, rid))]
            if not page.more:
                self._uncut(channel)  # caught up: the live stream resumes
            events = [event_frame(channel, e) for e in page.entries]
            fields = {"more": page.more, "head": page.head, "epoch": page.epoch}
            return self._ok(rid, channel=channel, events=events, **fields)

        # A cut stream resumes at this sync's reply if it reaches the head: its pushes are
        # held meanwhile, so an entry committed after the read is pushed, not lost.
        hold = channel if channel in self.cut else None
        return [Read(query, then, rid, "sync", hold=hold)]

    def _uncut(self, channel: str) -> None:
        if channel in self.cut:
            self.cut = self.cut - {channel} or NO_CUTS

    def cut_stream(self, channel: str, info: ChannelInfo) -> Frame:
        """The server dropped live events of ``channel`` for this slow connection: no more
        are sent until a ``sync`` reaches the head (or a new ``join``)."""
        self.cut |= {channel}
        return resync_frame(channel, info.head, info.epoch, "cut")

    # ------------------------------------------------------------------ signals

    def _typing(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        channel = self._channel(frame)
        on = frame.get("on")
        if not isinstance(on, bool):
            raise RequestError(E.BAD_REQUEST, "`on` must be a boolean")
        retry = self.user_limits.typing.take(self.user, now_ms)
        self._limit(retry, "typing", f"over {self.limits.typing_rate:g} typing frames/s")
        if on:
            self.typing[channel] = now_ms + self.limits.typing_timeout_ms
        elif self.typing.pop(channel, None) is None:
            return self._ok(rid)  # nothing to turn off: no push
        return [self._typing_push(channel, on), *self._ok(rid)]

    def _presence(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        """``{status}`` sets this user's status; ``{users}`` asks for others'."""
        users = frame.get("users")
        if users is not None:
            most = self.limits.max_presence_users
            if not isinstance(users, list) or not all(valid_user(u) for u in users):
                raise RequestError(E.BAD_REQUEST, "`users` must be a list of user ids")
            if len(users) > most:
                raise RequestError(E.LIMIT_EXCEEDED, f"at most {most} users per presence query")
            return [QueryPresence(rid, list(dict.fromkeys(users)))]
        status = _field(frame, "status", str, "a status string or `users`, a list")
        if not 1 <= len(status) <= self.limits.max_status_chars:
            raise RequestError(
                E.LIMIT_EXCEEDED, f"`status` must be 1 to {self.limits.max_status_chars} chars"
            )
        if _CONTROL.search(status):
            raise RequestError(E.BAD_REQUEST, "`status` must hold no control characters")
        retry = self.user_limits.presence.take(self.user, now_ms)
        self._limit(retry, "presence", f"over {self.limits.presence_rate:g} status changes/s")
        return [SetPresence(status), *self._ok(rid, status=status)]

    def _unread(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        channels = frame.get("channels")
        most = self.limits.max_presence_users
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise RequestError(E.BAD_REQUEST, "`channels` must be a list of channel names")
        if len(channels) > most:
            raise RequestError(E.LIMIT_EXCEEDED, f"at most {most} channels per unread request")
        names = [self._channel({"channel": name}) for name in dict.fromkeys(channels)]
        store, user, scan_max = self.store, self.user, self.limits.unread_scan_max

        def query() -> tuple[dict[str, int], list[str]]:
            counts: dict[str, int] = {}
            capped: list[str] = []
            for channel in names:
                counts[channel] = store.unread(user, channel, scan_max)
                if store.channel(channel).head - store.read_cursor(user, channel) > scan_max:
                    capped.append(channel)
            return counts, capped

        def then(result: tuple[dict[str, int], list[str]]) -> list[Action]:
            return self._ok(rid, unread=result[0], capped=result[1])

        return [Read(query, then, rid, "unread")]

    def _channels(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        """The user's memberships (channels and DMs it may still read), in name order,
        each with its head, read cursor and unread count: a page of at most
        ``max_presence_users``, the next after ``after`` (section 6.15)."""
        after = frame.get("after")
        if after is not None and not isinstance(after, str):
            raise RequestError(E.BAD_REQUEST, "`after` must be a channel name")
        store, user, claims = self.store, self.user, self.claims
        assert claims is not None
        most, page, scan_max = (
            self.limits.max_memberships,
            self.limits.max_presence_users,
            self.limits.unread_scan_max,
        )

        def query() -> tuple[list[Frame], bool]:
            names = [
                c
                for c in store.channels_of(user, limit=most)
                if (after is None or c > after) and claims.may_read(c)
            ]
            out: list[Frame] = []
            for channel in names[:page]:
                head = store.channel(channel).head
                read = store.read_cursor(user, channel)
                entry: Frame = {"channel": channel, "head": head, "read": read}
                entry["unread"] = store.unread(user, channel, scan_max)
                entry["capped"] = head - read > scan_max
                users = parse_dm(channel)
                if users is not None:
                    entry["peer"] = users[1] if users[0] == user else users[0]
                out.append(entry)
            return out, len(names) > page

        def then(result: tuple[list[Frame], bool]) -> list[Action]:
            return self._ok(rid, channels=result[0], more=result[1])

        return [Read(query, then, rid, "channels")]

    def _typing_push(self, channel: str, on: bool) -> Publish:
        push = {"t": "typing", "channel": channel, "user": self.user, "on": on}
        return Publish(channel, push, skip_user=self.user)

    def _refresh(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        token = frame.get("token")
        if not isinstance(token, str):
            raise RequestError(E.BAD_REQUEST, "`token` must be a JWT string")
        try:
            claims = self.verifier.verify(token, now_ms // 1000)
        except AuthError as exc:
            raise RequestError(exc.code, exc.message, fatal=False) from None
        if claims.user != self.user:
            raise RequestError(
                E.UNAUTHORIZED, "a refresh token must be for the same user", fatal=False
            )
        self.claims, self.expired_at = claims, None
        actions: list[Action] = []
        for channel in sorted(self.joined):
            if not claims.may_read(channel):
                self.joined.discard(channel)
                self._uncut(channel)
                if self.typing.pop(channel, None) is not None:
                    actions.append(self._typing_push(channel, False))
                left = {"t": "left", "channel": channel, "reason": "forbidden"}
                actions += [Unsubscribe(channel), Reply(left)]
        return actions + self._ok(rid, exp=claims.exp)

    def _ping(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        pong: Frame = {"t": "pong"} if rid is None else {"t": "pong", "rid": rid}
        pong["ts"] = now_ms
        return [Reply(pong)]


# The frame types a session takes after hello: one table for every session (a per-session
# table of bound methods cost 1.3 KiB per connection). Built after the class (mypyc
# compiles this module: a class body cannot name its own methods as values).
HANDLERS: dict[str, Callable[[Session, Frame, int | None, int], list[Action]]] = {
    "join": Session._join,
    "leave": Session._leave,
    "send": Session._send,
    "edit": Session._change,
    "delete": Session._change,
    "history": Session._history,
    "sync": Session._sync,
    "read": Session._read,
    "typing": Session._typing,
    "ping": Session._ping,
    "refresh": Session._refresh,
    "presence": Session._presence,
    "unread": Session._unread,
    "channels": Session._channels,
}
