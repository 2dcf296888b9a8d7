"""The per-connection protocol state machine, without I/O.

A :class:`Session` takes decoded frames (``receive_frame``) and store completions
(``write_done``) and returns :data:`Action` values for the server to carry out: frames to
send, writes to submit, channel subscriptions, fan-out, closing. It imports no trio and no
socket and keeps no clock (``now_ms`` is passed in), so it is tested with plain calls.
Reads (join, history, sync) are plain synchronous store calls.

States: ``AWAITING_HELLO`` → ``READY`` → ``CLOSED``. A connection error (PROTOCOL.md)
sends its error frame, then ``Close``, and the session refuses further input.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tsmsg._native import FrameError, FrameTooLarge, packb
from tsmsg.auth import AuthError, Claims, TokenVerifier, valid_channel
from tsmsg.protocol import errors as E
from tsmsg.protocol.errors import RequestError
from tsmsg.protocol.limits import PROTOCOL_VERSION, Limits
from tsmsg.store.base import AppendResult, ChannelInfo, Entry, Store, WriteOp

Frame = dict[str, Any]
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
RID_RULE = "`rid` must be an integer from -2**63 to 2**63-1"
MAX_ID_CHARS = 64  # message ids are opaque strings of at most this length
# Bytes of a reply around its list of entries ({"t":"ok","rid":…,"channel":…,"more":…,…});
# kept generous so a page never exceeds max_frame.
PAGE_ENVELOPE = 512
EVENT_OVERHEAD = 24  # "t":"event" and the "channel" key added to each stored entry


@dataclass(frozen=True, slots=True)
class Reply:
    """Send this frame to this connection."""

    frame: Frame


@dataclass(frozen=True, slots=True)
class Close:
    """Close this connection after the frames before it are sent."""

    reason: str


@dataclass(frozen=True, slots=True)
class Submit:
    """Queue this write to the store; its completion comes back via ``write_done``."""

    op: WriteOp


@dataclass(frozen=True, slots=True)
class Subscribe:
    channel: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    channel: str


@dataclass(frozen=True, slots=True)
class Publish:
    """Send this frame to every connection joined to ``channel`` (except those of
    ``skip_user``). The server encodes it once for all of them."""

    channel: str
    frame: Frame
    skip_user: str | None = None


Action = Reply | Close | Submit | Subscribe | Unsubscribe | Publish


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
    if len(value) > max_bytes or len(value.encode()) > max_bytes:
        raise RequestError(E.LIMIT_EXCEEDED, f"`{key}` is over {max_bytes} bytes of UTF-8")
    return value


class Session:
    def __init__(
        self,
        store: Store,
        verifier: TokenVerifier,
        limits: Limits,
        session_id: str,
        now_ms: int,
    ) -> None:
        self.store = store
        self.verifier = verifier
        self.limits = limits
        self.session_id = session_id
        self.state = State.AWAITING_HELLO
        self.claims: Claims | None = None
        self.joined: set[str] = set()
        self.cut: set[str] = set()  # joined channels whose live stream was cut (slow consumer)
        self.close_reason: str | None = None
        self._tokens = float(limits.frame_burst)  # frame-rate token bucket
        self._last_ms = now_ms
        self._handlers: dict[str, Callable[[Frame, int | None, int], list[Action]]] = {
            "join": self._join,
            "leave": self._leave,
            "send": self._send,
            "edit": self._change,
            "delete": self._change,
            "history": self._history,
            "sync": self._sync,
            "read": self._read,
            "typing": self._typing,
            "ping": self._ping,
        }

    @property
    def user(self) -> str:
        assert self.claims is not None, "no user before hello"
        return self.claims.user

    # ------------------------------------------------------------------ input

    def receive_frame(self, frame: Frame, now_ms: int) -> list[Action]:
        if self.state is State.CLOSED:
            return []
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
            self._spend_token(now_ms)
            if bad_rid:
                raise RequestError(E.BAD_REQUEST, RID_RULE)
            handler = self._handlers.get(t)
            if handler is None:
                if t == "hello":
                    raise RequestError(E.BAD_REQUEST, "this connection already said hello")
                raise RequestError(E.UNKNOWN_TYPE, f"unknown frame type {t[:32]!r}")
            return handler(frame, rid, now_ms)
        except RequestError as exc:
            return self._refuse(exc, rid)

    def frame_error(self, exc: FrameError) -> list[Action]:
        """The decoder failed: a connection error."""
        if self.state is State.CLOSED:
            return []
        code = E.FRAME_TOO_LARGE if isinstance(exc, FrameTooLarge) else E.BAD_FRAME
        return self._refuse(RequestError(code, str(exc)), None)

    def hello_timeout(self) -> list[Action]:
        """The connection did not complete hello within the deadline (slowloris)."""
        return self._refuse(RequestError(E.HELLO_TIMEOUT, "no hello within the deadline"), None)

    def _refuse(self, exc: RequestError, rid: int | None) -> list[Action]:
        actions: list[Action] = [Reply(exc.frame(rid))]
        if exc.fatal:
            self.state = State.CLOSED
            self.close_reason = f"{exc.code}: {exc.message}"
            actions.append(Close(self.close_reason))
        return actions

    def closed(self, reason: str) -> None:
        """The connection is gone (peer closed, server shutdown)."""
        if self.state is not State.CLOSED:
            self.state = State.CLOSED
            self.close_reason = reason

    def _spend_token(self, now_ms: int) -> None:
        rate, burst = self.limits.frame_rate, self.limits.frame_burst
        elapsed = max(0, now_ms - self._last_ms)
        self._last_ms = now_ms
        self._tokens = min(float(burst), self._tokens + elapsed * rate / 1000)
        if self._tokens < 1:
            wait = math.ceil((1 - self._tokens) * 1000 / rate)
            raise RequestError(
                E.RATE_LIMITED, f"over {rate:g} frames/s", retry_after_ms=max(1, wait)
            )
        self._tokens -= 1

    def _ok(self, rid: int | None, **fields: Any) -> list[Action]:
        return [] if rid is None else [Reply({"t": "ok", "rid": rid, **fields})]

    # ------------------------------------------------------------------ handshake

    def _hello(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        v = frame.get("v")
        if type(v) is not int or v != PROTOCOL_VERSION:
            raise RequestError(
                E.UNSUPPORTED_VERSION, f"this server speaks protocol version {PROTOCOL_VERSION}"
            )
        token = frame.get("token")
        if not isinstance(token, str):
            raise RequestError(E.UNAUTHORIZED, "`token` must be a JWT string")
        try:
            self.claims = self.verifier.verify(token, now_ms // 1000)
        except AuthError as exc:
            raise RequestError(exc.code, exc.message) from None
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
        return [Reply(welcome)]

    # ------------------------------------------------------------------ channels

    def _channel(self, frame: Frame, *, send: bool = False) -> str:
        name: str = _field(frame, "channel", str, "a channel name")
        if not valid_channel(name):
            raise RequestError(E.BAD_REQUEST, "`channel` is not a valid channel name")
        assert self.claims is not None
        allowed = self.claims.may_send(name) if send else self.claims.may_read(name)
        if not allowed:
            need = "chat:send" if send else "chat:read"
            raise RequestError(E.FORBIDDEN, f"the token does not allow {need} in {name!r}")
        return name

    def _join(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        channel = self._channel(frame)
        if channel not in self.joined and len(self.joined) >= self.limits.max_joined:
            raise RequestError(
                E.LIMIT_EXCEEDED, f"a connection may join at most {self.limits.max_joined} channels"
            )
        info = self.store.channel(channel)
        read = self.store.read_cursor(self.user, channel)
        self.joined.add(channel)
        self.cut.discard(channel)
        return [
            Subscribe(channel),
            *self._ok(
                rid,
                channel=channel,
                head=info.head,
                read=read,
                epoch=info.epoch,
                horizon=info.horizon,
            ),
        ]

    def _leave(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        # No authorization: leaving is always allowed (also after a token lost access).
        channel: str = _field(frame, "channel", str, "a channel name")
        if not valid_channel(channel):
            raise RequestError(E.BAD_REQUEST, "`channel` is not a valid channel name")
        self.joined.discard(channel)
        self.cut.discard(channel)
        return [Unsubscribe(channel), *self._ok(rid, channel=channel)]

    # ------------------------------------------------------------------ writes

    def _send(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        channel = self._channel(frame, send=True)
        cid: str = _field(frame, "cid", str, f"a string of 1 to {self.limits.max_cid_chars} chars")
        if not 1 <= len(cid) <= self.limits.max_cid_chars:
            raise RequestError(
                E.BAD_REQUEST, f"`cid` must be 1 to {self.limits.max_cid_chars} characters"
            )
        text = _text(frame, "text", self.limits.max_text_bytes)
        meta = frame.get("meta")
        if meta is not None:
            if not isinstance(meta, dict):
                raise RequestError(E.BAD_REQUEST, "`meta` must be a map")
            if len(packb(meta)) > self.limits.max_meta_bytes:
                raise RequestError(
                    E.LIMIT_EXCEEDED, f"`meta` is over {self.limits.max_meta_bytes} bytes encoded"
                )
        dup = self.store.lookup_dup(channel, self.user, cid)
        if dup is not None:
            return self._ok(rid, channel=channel, seq=dup.seq, id=dup.id, ts=dup.ts, dup=True)
        op = WriteOp("message", channel, self.user, cid=cid, text=text, meta=meta or None)
        return [self._submit(op, rid)]

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
        actions: list[Action] = []
        live = self.state is State.READY
        if op.error is not None:
            if live:
                actions.append(Reply(RequestError(op.error.code, op.error.message).frame(op.rid)))
            return actions
        if op.kind == "read":
            cursor = op.result
            if live:
                actions += self._ok(op.rid, channel=op.channel, seq=cursor)
            if op.changed:
                read = {"t": "read", "channel": op.channel, "user": op.user, "seq": cursor}
                actions.append(Publish(op.channel, read))
            return actions
        result = op.result
        assert isinstance(result, AppendResult)
        if live:
            fields: dict[str, Any] = {"channel": op.channel, "seq": result.seq, "id": result.id}
            fields.update(ts=result.ts, dup=result.dup)
            actions += self._ok(op.rid, **fields)
        if result.dup:
            return actions
        entry: Entry = {"seq": result.seq, "kind": op.kind, "id": result.id, "sender": op.user}
        entry["ts"] = result.ts
        if op.text is not None:
            entry["text"] = op.text
        if op.meta:
            entry["meta"] = op.meta
        actions.append(Publish(op.channel, event_frame(op.channel, entry)))
        return actions

    # ------------------------------------------------------------------ reads

    def _page_bytes(self, channel: str) -> int:
        return self.limits.max_frame - PAGE_ENVELOPE - len(channel.encode())

    def _history(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        channel = self._channel(frame)
        before = None if frame.get("before") is None else _int(frame, "before", 1, INT64_MAX)
        limit = _int(frame, "limit", 1, self.limits.history_max, self.limits.history_default)
        page = self.store.history(channel, before, limit, max_bytes=self._page_bytes(channel))
        return self._ok(rid, channel=channel, messages=page.messages, more=page.more)

    def _sync(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        channel = self._channel(frame)
        since = _int(frame, "since", 0, INT64_MAX)
        limit = _int(frame, "limit", 1, self.limits.sync_max, self.limits.sync_default)
        overhead = EVENT_OVERHEAD + len(channel.encode())
        page = self.store.sync(
            channel, since, limit, max_bytes=self._page_bytes(channel), entry_overhead=overhead
        )
        epoch = None if frame.get("epoch") is None else _int(frame, "epoch", 0, INT64_MAX)
        if page.resync or (epoch is not None and epoch != page.epoch and since > 0):
            reason = "epoch" if epoch not in (None, page.epoch) else "ahead"
            if since <= page.head and reason != "epoch":
                reason = "compacted"
            return [Reply(resync_frame(channel, page.head, page.epoch, reason, rid))]
        if not page.more:
            self.cut.discard(channel)  # caught up: the live stream resumes
        events = [event_frame(channel, e) for e in page.entries]
        return self._ok(
            rid, channel=channel, events=events, more=page.more, head=page.head, epoch=page.epoch
        )

    def cut_stream(self, channel: str, info: ChannelInfo) -> Frame:
        """The server dropped live events of ``channel`` for this slow connection: no more
        are sent until a ``sync`` reaches the head (or a new ``join``)."""
        self.cut.add(channel)
        return resync_frame(channel, info.head, info.epoch, "cut")

    # ------------------------------------------------------------------ signals

    def _typing(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        channel = self._channel(frame)
        on = frame.get("on")
        if not isinstance(on, bool):
            raise RequestError(E.BAD_REQUEST, "`on` must be a boolean")
        push = {"t": "typing", "channel": channel, "user": self.user, "on": on}
        return [Publish(channel, push, skip_user=self.user), *self._ok(rid)]

    def _ping(self, frame: Frame, rid: int | None, now_ms: int) -> list[Action]:
        pong: Frame = {"t": "pong"} if rid is None else {"t": "pong", "rid": rid}
        pong["ts"] = now_ms
        return [Reply(pong)]
