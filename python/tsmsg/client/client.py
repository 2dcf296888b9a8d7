"""The async front end of the reference client, on anyio (runs under trio and asyncio).

It moves bytes between a TCP connection and :class:`~tsmsg.client.protocol.ClientProtocol`
and runs the timers; every protocol decision is the sans-IO object's. Per connection there
are three tasks: the **reader** (frames in, completions out), the **timer** (heartbeat
pings every ``heartbeat_ms / 2``, a dead connection, rate-limited resends) and the
**token refresher** (calls the ``token_provider`` before the token's ``exp``, and at once on
a ``token_expired`` notice). Around them, the **reconnect loop** reconnects with
exponential backoff and full jitter (capped at ``backoff_max``), waiting at least the
``retry_after_ms`` of an admission refusal.

Backoff reset: the backoff starts again from ``BACKOFF_BASE`` only after a connection has
stayed up for ``backoff_max`` seconds from its ``welcome``. A connection that ends sooner
counts as a failed attempt: the next wait doubles, as after a refused connect. Resetting
at every welcome made a server that welcomes and then drops each connection (overloaded,
crashing on a later frame, a proxy cutting it) get a reconnect every 0.1 s from every
client for as long as it lasts: a thundering herd. With the reset tied to the cap, no
pattern of drops gets more than a handful of connects per ``backoff_max`` from a client
(the doublings up to the cap), while a real session, lost after minutes, is resumed at
once. tsmsg.js applies the same rule with its ``backoffMaxMs``.

Backpressure policy: events wait for the application in a bounded per-channel queue
(``max_queued``, default 1000) inside the protocol object. The reader never blocks on the
application: a channel whose queue is full stops applying its live events and, once the
application has taken half of them, catches up by ``sync`` from its last applied seq, in
pages no larger than the free room. So memory stays bounded, replies to the application's
own requests are never held up behind unread events, and nothing is lost or duplicated.
Best-effort signals (typing, read receipts, presence) are dropped when their queue is full.
"""

from __future__ import annotations

import base64
import collections
import json
import math
import random
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from tsmsg._native import FrameDecoder, FrameError
from tsmsg.client.errors import (
    ClientError,
    ConnectionClosed,
    RateLimited,
    TokenExpired,
    Unauthorized,
)
from tsmsg.client.events import (
    Ack,
    ChannelSummary,
    Delete,
    Edit,
    Event,
    HistoryPage,
    JoinInfo,
    Message,
    PresenceInfo,
    Resynced,
    SyncPage,
)
from tsmsg.client.protocol import (
    MAX_QUEUED,
    ClientProtocol,
    Completed,
    Disconnect,
    Failed,
    FollowChanged,
    HelloFailed,
    NeedToken,
    Output,
    SendCompleted,
    Welcomed,
)
from tsmsg.client.state import ClientState
from tsmsg.tls import client_tls_context

TokenProvider = Callable[[], Awaitable[str]]

CONNECT_TIMEOUT = 10.0  # s: TCP connect (and TLS handshake), then hello: the server's deadlines
WRITE_TIMEOUT = 30.0  # s: a write taking longer means a dead peer (the server's send_timeout_s)
BACKOFF_BASE = 0.1  # s: the first reconnect waits up to this, doubling up to backoff_max
# Doublings counted at most (0.1 s x 2**20 is 29 hours, past any backoff_max): the count
# grows no further, as in tsmsg.js (a float of 0.1 x 2**1024 does not exist).
BACKOFF_MAX_DOUBLINGS = 20
REFRESH_MARGIN = 30.0  # s: refresh this long before exp (or a fifth of a short token's life)
REFRESH_MIN_INTERVAL = 1.0  # s: a provider that returns no newer token is asked again after
READ_SIZE = 65536
# The largest frame the client accepts. The server sends none above its max_frame (1 MiB
# by default, announced in welcome); this bound is generous for servers configured higher
# and still keeps one buffered frame bounded.
MAX_FRAME_ACCEPTED = 64 << 20


def token_exp(token: str) -> int | None:
    """The ``exp`` claim of a JWT, read without verifying it (only to schedule a refresh)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
    except (IndexError, ValueError, AttributeError):
        return None
    return exp if type(exp) is int else None


class _Waiter:
    __slots__ = ("done", "error", "event", "result")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None

    def set(self, result: Any = None, error: BaseException | None = None) -> None:
        if not self.done:
            self.done, self.result, self.error = True, result, error
            self.event.set()


class _Session:
    """One connection: its stream and the scope of its tasks."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self.scope = anyio.CancelScope()
        self.sending: anyio.CancelScope | None = None  # a write in progress, in any task
        self.tg: anyio.abc.TaskGroup | None = None
        self.reason: str | None = None
        self.hello_error: ClientError | None = None
        self.retry_after = 0.0
        self.welcomed = anyio.Event()
        self.welcomed_at: float | None = None  # anyio's clock (monotonic) at the welcome
        self.write_due = anyio.Event()  # the reader queued frames: the writer's to write

    def end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.scope.cancel()
        if self.sending is not None:  # a caller's flush must not hold the send lock on
            self.sending.cancel()  # a connection that is gone (the next one's hello waits)


class Client:
    """A connected client; get one from :func:`connect`. Methods may be called from any
    task. While the connection is down they wait for it, without a deadline of their own
    (wrap them in ``anyio.fail_after`` for one): sends wait in the outbox; reads, ``read``,
    ``typing`` and presence are sent (again) once connected; an ``edit`` or ``delete``
    whose connection closes before its answer raises :class:`ConnectionClosed`, since
    repeating it could apply it twice. Rate-limited requests are resent after the
    server's ``retry_after_ms``; the caller just waits longer. With a ``token_provider``,
    a request refused ``token_expired`` waits for the refresh (the provider asked, the
    ``refresh`` answered) and is then resent once, the new token in place (tsmsg.js
    alike); without one it raises :class:`TokenExpired`."""

    def __init__(
        self,
        addresses: list[tuple[str, int]],
        *,
        token: str | None,
        token_provider: TokenProvider | None,
        state_path: str | Path | None,
        reconnect: bool,
        backoff_max: float,
        max_queued: int,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        if token is None and token_provider is None:
            raise ValueError("connect() needs a token or a token_provider")
        # Nodes of one deployment, tried in turn: the next one after a connection that
        # failed or ended before its welcome (a node that died refuses at once).
        self._addresses = addresses
        self._at = 0  # index of the address in use
        self._ssl_context = ssl_context  # None: plaintext
        self._last_error: str | None = None  # why the last connection attempt ended
        self._token, self._token_provider = token, token_provider
        self._token_since = time.time()
        self._token_fresh = False  # the token in use came from the provider for this hello
        self._reconnect, self._backoff_max = reconnect, backoff_max
        self._proto = ClientProtocol(max_queued=max_queued, can_refresh=token_provider is not None)
        self._state = ClientState(state_path) if state_path is not None else None
        if self._state is not None:
            self._proto.restore(*self._state.load())
        self._waiters: dict[int, _Waiter] = {}
        self._send_waiters: dict[str, list[_Waiter]] = {}
        self._session: _Session | None = None
        self._send_lock = anyio.Lock()
        self._changed = anyio.Event()  # set (and replaced) whenever something happened
        # channel -> how many times it stopped being followed (leave, a Left, a failed
        # join): an events(channel) iterator made before ends (_EventStream)
        self._unfollowed: collections.Counter[str] = collections.Counter()
        self._first = anyio.Event()  # the first welcome, or a fatal error
        self._fatal: ClientError | None = None
        self._closed = False
        self.refreshes = 0  # tokens obtained from the provider after the first

    # ------------------------------------------------------------------ public API

    @property
    def user(self) -> str:
        assert self._proto.user is not None, "no user before the first welcome"
        return self._proto.user

    @property
    def connected(self) -> bool:
        return self._session is not None and self._proto.ready

    @property
    def outbox(self) -> list[str]:
        """The cids of the sends not yet acknowledged, in order."""
        return [cid for cid, *_ in self._proto.outbox]

    @property
    def queued_events(self) -> int:
        """Events waiting for the application (bounded: see the module docstring)."""
        return self._proto.queued_events

    @property
    def channels(self) -> list[str]:
        return sorted(self._proto.channels)

    async def join(self, channel: str, *, replay: bool = False) -> JoinInfo:
        """Follow ``channel``; its events then come through :meth:`events`. The first time,
        a :class:`Resynced` event carries its newest history page (``replay``: every entry
        from seq 1 comes as an event instead). Followed channels are rejoined and caught
        up after every reconnect."""
        self._check()
        info: JoinInfo = await self._wait(self._proto.join(channel, replay=replay))
        return info

    async def leave(self, channel: str) -> None:
        """Stop following ``channel``. From the call on, no event of it comes through
        :meth:`events`: those not yet taken are dropped, a page in flight is ignored. A
        later :meth:`join` starts it afresh (a :class:`Resynced` first)."""
        self._check()
        handle, outputs = self._proto.leave(channel)
        await self._wait(handle, outputs)

    async def send(
        self,
        channel: str,
        text: str,
        meta: dict[str, Any] | None = None,
        cid: str | None = None,
    ) -> Ack:
        """Send a message; returns its :class:`Ack` once stored. Disconnected, it waits
        in the outbox and is sent after reconnecting; a send whose ack was lost is sent
        again with the same ``cid`` (so it is stored once: ``Ack.dup``). Cancelling the
        wait does not withdraw the message from the outbox."""
        self._check()
        cid = cid or str(uuid.uuid4())
        new = cid not in self.outbox
        self._proto.send(channel, text, meta, cid, self._now())
        if new and self._state is not None:
            self._state.add_send(cid, channel, text, meta)
        waiter = _Waiter()
        self._send_waiters.setdefault(cid, []).append(waiter)
        try:
            await self._flush()
            await waiter.event.wait()
        finally:
            waiters = self._send_waiters.get(cid, [])
            if waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._send_waiters[cid]
        if waiter.error is not None:
            raise waiter.error
        ack: Ack = waiter.result
        return ack

    async def edit(self, channel: str, id: str, text: str) -> Ack:
        ack: Ack = await self._request("edit", channel=channel, id=id, text=text)
        return ack

    async def delete(self, channel: str, id: str) -> Ack:
        ack: Ack = await self._request("delete", channel=channel, id=id)
        return ack

    async def history(
        self, channel: str, before: int | None = None, limit: int | None = None
    ) -> HistoryPage:
        page: HistoryPage = await self._request(
            "history", channel=channel, before=before, limit=limit
        )
        return page

    async def sync(
        self, channel: str, since: int = 0, limit: int | None = None, epoch: int | None = None
    ) -> SyncPage:
        """One page of raw log entries after ``since`` (raises ResyncRequired when the
        position is unusable). The followed channels need none of this: :meth:`events`."""
        page: SyncPage = await self._request(
            "sync", channel=channel, since=since, limit=limit, epoch=epoch
        )
        return page

    async def read(self, channel: str, seq: int) -> int:
        """Move the user's read cursor forward; returns the resulting cursor."""
        cursor: int = await self._request("read", channel=channel, seq=seq)
        return cursor

    async def typing(self, channel: str, on: bool = True) -> None:
        await self._request("typing", channel=channel, on=on)

    async def set_presence(self, status: str) -> None:
        await self._request("presence", status=status)

    async def presence(self, users: list[str]) -> list[PresenceInfo]:
        infos: list[PresenceInfo] = await self._request("presence", users=list(users))
        return infos

    async def unread(self, channels: list[str]) -> dict[str, int]:
        counts: dict[str, int] = await self._request("unread", channels=list(channels))
        return counts

    async def list_channels(self) -> list[ChannelSummary]:
        """The user's channels and DMs (memberships it may read), in name order, each
        with head, read cursor and unread count; every page of ``channels`` (PROTOCOL.md
        6.15). A DM another user opened is among them, and is pushed as a
        :class:`~tsmsg.client.events.Membership` event when it appears."""
        out: list[ChannelSummary] = []
        after: str | None = None
        while True:
            page: list[ChannelSummary]
            page, more = await self._request("channels", after=after)
            out += page
            if not more or not page:
                return out
            after = page[-1].channel

    @property
    def limits(self) -> dict[str, int | float]:
        """The server's limits from ``welcome.limits`` (protocol defaults before it)."""
        return dict(self._proto.limits)

    def events(self, channel: str | None = None) -> _EventStream:
        """Async iterator over app events (of ``channel`` only, if given): each channel's
        entries exactly once and in seq order, across reconnects and server restarts.
        Several iterators share one stream: each event goes to one of them. An iterator
        of one channel ends once the channel is no longer followed (:meth:`leave`, a
        :class:`Left` from the server, which it yields first, or its join failing);
        after a new :meth:`join`, iterate a new one."""
        return _EventStream(self, channel)

    # ------------------------------------------------------------------ requests

    def _check(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed:
            raise ConnectionClosed("the client is closed")

    async def _request(self, t: str, **fields: Any) -> Any:
        self._check()
        return await self._wait(self._proto.request(t, self._now(), **fields))

    async def _wait(self, handle: int, outputs: list[Output] | None = None) -> Any:
        waiter = self._waiters[handle] = _Waiter()
        try:
            if outputs:
                self._handle(outputs)
            await self._flush()
            await waiter.event.wait()
        finally:
            self._waiters.pop(handle, None)
            if not waiter.done:
                self._proto.cancel(handle)
        if waiter.error is not None:
            raise waiter.error
        return waiter.result

    def _handle(self, outputs: list[Output]) -> None:
        session = self._session
        for out in outputs:
            if isinstance(out, Completed):
                waiter = self._waiters.get(out.handle)
                if waiter is not None:
                    waiter.set(out.result)
            elif isinstance(out, Failed):
                waiter = self._waiters.get(out.handle)
                if waiter is not None:
                    waiter.set(error=out.error)
            elif isinstance(out, SendCompleted):
                if self._state is not None:
                    self._state.remove_send(out.cid, out.channel)
                for waiter in self._send_waiters.pop(out.cid, []):
                    waiter.set(out.ack, out.error)
            elif isinstance(out, FollowChanged):
                if self._state is not None:
                    self._state.follow(out.channel, out.following)
                if not out.following:
                    self._unfollowed[out.channel] += 1
                    self._notify()  # its iterators end
            elif isinstance(out, Welcomed):
                if session is not None:
                    session.welcomed_at = anyio.current_time()
                    session.welcomed.set()
                self._first.set()
            elif isinstance(out, HelloFailed):
                if session is not None:
                    session.hello_error = out.error
                    session.retry_after = out.retry_after_ms / 1000
                    session.end(f"hello refused: {out.error}")
            elif isinstance(out, NeedToken):
                if session is not None and session.tg is not None:
                    session.tg.start_soon(self._refresh_token, session)
            elif isinstance(out, Disconnect):
                if session is not None:
                    session.end(out.reason)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def _flush(self) -> None:
        """Write the frames the protocol has queued (one writer at a time, in order)."""
        session = self._session
        if session is None:
            return
        async with self._send_lock:
            if session is not self._session:
                return  # that connection is gone; the protocol dropped its frames
            data = self._proto.data_to_send()
            if not data:
                return
            try:
                with anyio.fail_after(WRITE_TIMEOUT) as session.sending:
                    if session.reason is None:  # not ended meanwhile
                        await session.stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                session.end(f"write failed: {exc!r}")
            except TimeoutError:
                session.end(f"a write took over {WRITE_TIMEOUT} s")
            finally:
                session.sending = None
        self._notify()  # wakes the timer too: deadlines may have changed

    @staticmethod
    def _now() -> int:
        return int(anyio.current_time() * 1000)

    # ------------------------------------------------------------------ connection

    async def _run(self) -> None:
        """The reconnect loop. Never raises: a fatal error fails every waiter."""
        attempt = 0
        refused = 0  # addresses in a row that refused the first connection
        try:
            while not self._closed:
                wait_at_least = 0.0
                try:
                    session = await self._connection()
                except ssl.SSLCertVerificationError as exc:  # fatal: retrying cannot help
                    what = f"TLS: the certificate of {self._host} failed verification"
                    self._fail(ConnectionClosed(f"{what}: {exc.verify_message}"))
                    return
                except OSError as exc:
                    reason = f"connect to {self._where} failed: {exc}"
                    # anyio reports a refusal as the cause of its "all attempts failed"
                    cause = exc if exc.__cause__ is None else exc.__cause__
                    if isinstance(cause, ConnectionRefusedError) and not self._first.is_set():
                        # Nothing listens there: said at once, not after connect_timeout
                        # (later, a refusal is a restarting server: retried).
                        refused += 1
                        if refused >= len(self._addresses):
                            what = ", ".join(f"{h}:{p}" for h, p in self._addresses)
                            self._fail(
                                ConnectionClosed(
                                    f"connection refused by {what}: is the server running?"
                                )
                            )
                            return
                    self._at = (self._at + 1) % len(self._addresses)
                else:
                    reason = session.reason or "closed"
                    wait_at_least = session.retry_after
                    error = session.hello_error
                    if error is not None and self._hello_fatal(error):
                        self._fail(_refusal(error))
                        return
                    if session.welcomed_at is not None:
                        # Up for backoff_max: a session, lost; sooner: a failed attempt
                        # (see the module docstring: no herd from a server that drops).
                        if anyio.current_time() - session.welcomed_at >= self._backoff_max:
                            attempt = 0
                    else:
                        self._at = (self._at + 1) % len(self._addresses)
                self._last_error = reason
                if not self._reconnect:
                    self._fail(ConnectionClosed(reason))
                    return
                cap = min(self._backoff_max, BACKOFF_BASE * 2**attempt)
                attempt = min(attempt + 1, BACKOFF_MAX_DOUBLINGS)
                await anyio.sleep(max(wait_at_least, random.uniform(0, cap)))
        except ClientError as exc:
            self._fail(exc)

    def _hello_fatal(self, error: ClientError) -> bool:
        if isinstance(error, (Unauthorized, TokenExpired)):
            # A token the provider has just made, refused: another would be too (a wrong
            # secret, a wrong user); retrying for ever would hide it.
            if self._token_provider is None or self._token_fresh:
                return True
            self._token = None  # ask the provider again
            return False
        if isinstance(error, RateLimited):
            return False  # an admission refusal: wait retry_after, then reconnect
        return error.code in ("unsupported_version", "bad_request")

    @property
    def _host(self) -> str:
        return self._addresses[self._at][0]

    @property
    def _where(self) -> str:
        host, port = self._addresses[self._at]
        return f"{host}:{port}"

    async def _open_stream(self) -> anyio.abc.ByteStream:
        host, port = self._addresses[self._at]
        if self._ssl_context is None:
            return await anyio.connect_tcp(host, port)
        try:
            # Not standard_compatible: close_notify is neither sent nor required
            # (PROTOCOL.md section 4): the framing delimits every frame.
            return await anyio.connect_tcp(
                host, port, ssl_context=self._ssl_context, tls_standard_compatible=False
            )
        except (anyio.BrokenResourceError, anyio.EndOfStream) as exc:
            raise OSError(f"TLS handshake: the server closed the connection ({exc!r})") from exc

    async def _connection(self) -> _Session:
        with anyio.fail_after(CONNECT_TIMEOUT):
            stream = await self._open_stream()
        session = _Session(stream)
        try:
            try:
                token = await self._current_token()
            except Exception as exc:  # the provider failed: try again after a backoff
                await stream.aclose()
                session.reason = f"the token provider failed: {exc!r}"
                return session
            async with stream:
                self._session = session
                self._proto.connection_made(token, self._now())
                with session.scope:
                    async with anyio.create_task_group() as tg:
                        session.tg = tg
                        tg.start_soon(self._reader, session)
                        tg.start_soon(self._writer, session)
                        tg.start_soon(self._timer, session)
                        tg.start_soon(self._refresher, session)
                        await self._flush()
                        with anyio.move_on_after(CONNECT_TIMEOUT):
                            await session.welcomed.wait()
                        if not session.welcomed.is_set() and session.reason is None:
                            session.end(f"no welcome within {CONNECT_TIMEOUT} s")
        finally:
            self._session = None
            if not self._closed:
                self._handle(self._proto.connection_lost(session.reason or "closed", self._now()))
            self._notify()
        return session

    async def _reader(self, session: _Session) -> None:
        decoder = FrameDecoder(MAX_FRAME_ACCEPTED)
        try:
            while True:
                data = await session.stream.receive(READ_SIZE)
                now = self._now()
                for frame in decoder.feed(data):
                    self._handle(self._proto.receive_frame(frame, now))
                self._notify()
                # Never a write here: a reader waiting for the socket to take a large
                # write (an outbox resent at connect) reads no replies, and the server,
                # whose replies then pile up, stops reading (PROTOCOL.md 14): a deadlock.
                session.write_due.set()
        except anyio.EndOfStream:
            session.end(self._proto.close_reason or "the server closed the connection")
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            session.end(self._proto.close_reason or f"connection lost: {exc!r}")
        except FrameError as exc:
            session.end(f"undecodable frame from the server: {exc}")

    async def _writer(self, session: _Session) -> None:
        """Writes what the reader's frames made the protocol queue (see _reader)."""
        while True:
            await session.write_due.wait()
            session.write_due = anyio.Event()
            await self._flush()

    async def _timer(self, session: _Session) -> None:
        while True:
            changed = self._changed
            deadline = self._proto.next_deadline()
            delay = math.inf if deadline is None else max(0, deadline - self._now()) / 1000
            with anyio.move_on_after(delay):
                await changed.wait()
            self._handle(self._proto.tick(self._now()))
            await self._flush()

    async def _current_token(self) -> str:
        if self._token_provider is not None:
            exp = None if self._token is None else token_exp(self._token)
            if self._token is None or (exp is not None and exp - time.time() < 1):
                self._token = await self._token_provider()
                self._token_since = time.time()
                self._token_fresh = True
            else:
                self._token_fresh = False
        assert self._token is not None
        return self._token

    async def _refresher(self, session: _Session) -> None:
        """Refresh the token before it expires (only with a token provider)."""
        if self._token_provider is None:
            return
        await session.welcomed.wait()
        while True:
            exp = token_exp(self._token or "")
            if exp is None:
                return
            margin = min(REFRESH_MARGIN, max(0.2, (exp - self._token_since) / 5))
            await anyio.sleep(max(REFRESH_MIN_INTERVAL / 4, exp - margin - time.time()))
            if token_exp(self._token or "") == exp:  # not refreshed meanwhile
                await self._refresh_token(session, exp)

    async def _refresh_token(self, session: _Session, old_exp: int | None = None) -> None:
        assert self._token_provider is not None
        try:
            token = await self._token_provider()
        except Exception as exc:
            session.end(f"the token provider failed: {exc!r}")
            return
        new_exp = token_exp(token)
        if old_exp is not None and new_exp is not None and new_exp <= old_exp:
            await anyio.sleep(REFRESH_MIN_INTERVAL)  # the provider had nothing newer yet
        self._token, self._token_since = token, time.time()
        self.refreshes += 1
        if session is self._session:
            self._proto.refresh(token)
            await self._flush()

    def _fail(self, error: ClientError) -> None:
        self._fatal = error
        for waiter in self._waiters.values():
            waiter.set(error=error)
        for waiters in self._send_waiters.values():
            for waiter in waiters:
                waiter.set(error=error)
        self._first.set()
        self._notify()

    def _close(self) -> None:
        self._closed = True
        self._notify()
        if self._state is not None:
            self._state.close()
            self._state = None

    def _taken(self, event: Event) -> None:
        """The app took ``event``: save the channel's position."""
        if self._state is not None and isinstance(event, (Message, Edit, Delete, Resynced)):
            position = self._proto.position(event.channel)
            if position is not None:
                self._state.save_position(event.channel, *position)


class _EventStream:
    """``async for event in client.events()`` (a class, not an async generator, so an
    iterator left early needs no finalization)."""

    def __init__(self, client: Client, channel: str | None) -> None:
        self._client, self._channel = client, channel
        self._unfollowed = None if channel is None else client._unfollowed[channel]

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> Event:
        client = self._client
        while True:
            changed = client._changed
            event = client._proto.next_event(self._channel)
            if event is not None:
                client._taken(event)
                # A stalled channel may have resumed (a sync to write). Taken, the event
                # must reach the caller: a cancellation here would lose it (the write is
                # bounded by WRITE_TIMEOUT all the same).
                with anyio.CancelScope(shield=True):
                    await client._flush()
                return event
            if client._fatal is not None:
                raise client._fatal
            if client._closed:
                raise StopAsyncIteration
            if self._channel is not None and client._unfollowed[self._channel] != self._unfollowed:
                raise StopAsyncIteration  # left since this iterator was made
            await changed.wait()


def _refusal(error: ClientError) -> ClientError:
    """A hello refusal as the error the application gets: a refused token says so."""
    if isinstance(error, (Unauthorized, TokenExpired)):
        refused = type(error)(error.code, error.message)
        refused.args = (f"token refused: {error.message} ({error.code})",)
        return refused
    return error


def _only(group: BaseExceptionGroup[BaseException], exc: BaseException) -> bool:
    """True when ``group`` holds nothing but ``exc`` (at any nesting)."""
    for leaf in group.exceptions:
        if isinstance(leaf, BaseExceptionGroup):
            if not _only(leaf, exc):
                return False
        elif leaf is not exc:
            return False
    return True


@asynccontextmanager
async def connect(
    host: str,
    port: int,
    *,
    token: str | None = None,
    token_provider: TokenProvider | None = None,
    state_path: str | Path | None = None,
    reconnect: bool = True,
    backoff_max: float = 10.0,
    connect_timeout: float | None = CONNECT_TIMEOUT,
    max_queued: int = MAX_QUEUED,
    tls: bool = False,
    ssl_context: ssl.SSLContext | None = None,
    fallback_addresses: Sequence[tuple[str, int]] = (),
) -> AsyncIterator[Client]:
    """Connect to a tsmsg server; the client stays connected (reconnecting as needed)
    until the block exits. Returns once the first hello succeeded; raises the server's
    refusal (``Unauthorized``, ...) or ``ConnectionClosed`` after ``connect_timeout``.

    ``token_provider``: an async function returning a fresh JWT, called for each hello that
    needs one, before the token's ``exp`` (to ``refresh`` it) and on ``token_expired``.
    ``state_path``: an sqlite3 file for the followed channels, their positions and the
    outbox, so a restarted application resumes where it left off. Without it, sends still
    pending when the block exits are dropped.

    ``tls``: connect over TLS, verifying the server's certificate and that it is for
    ``host`` against the system's CAs. ``ssl_context`` (implies TLS): your own, e.g.
    :func:`tsmsg.tls.client_tls_context` with a private CA or a client certificate. A
    certificate that fails verification is fatal (raised as ``ConnectionClosed``, never
    retried); other TLS failures are retried like any lost connection.

    ``backoff_max``: the longest wait (s) between reconnects (exponential backoff with
    full jitter from BACKOFF_BASE); a connection that stayed up this long after its
    welcome starts the backoff over, one that ended sooner doubles it (module docstring).

    ``fallback_addresses``: more ``(host, port)`` nodes of the same deployment (a cluster
    on one engine, docs/cluster.md). After a connection attempt that fails, or ends
    before its welcome, the client tries the next address in turn; it resumes there as
    on any reconnect (sync from its positions, the outbox resent with the same cids).
    """
    if tls and ssl_context is None:
        ssl_context = client_tls_context()
    client = Client(
        [(host, port), *fallback_addresses],
        token=token,
        token_provider=token_provider,
        state_path=state_path,
        reconnect=reconnect,
        backoff_max=backoff_max,
        max_queued=max_queued,
        ssl_context=ssl_context,
    )
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client._run)
            try:
                with anyio.move_on_after(math.inf if connect_timeout is None else connect_timeout):
                    await client._first.wait()
                if client._fatal is not None:
                    raise client._fatal
                if not client._first.is_set():
                    raise ConnectionClosed(
                        f"could not connect to {client._where} within {connect_timeout} s"
                        f" (last: {client._last_error or 'no attempt ended'})"
                    )
                yield client
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                client._close()
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The background tasks never raise: the group holds the body's own exception.
        if body_error is None or not _only(group, body_error):
            raise
    if body_error is not None:
        raise body_error
