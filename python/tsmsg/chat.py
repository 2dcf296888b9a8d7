"""The terminal chat of ``tsmsg chat``, on the client: full screen in a terminal
(:mod:`tsmsg.chat_ui`, prompt_toolkit), lines in and out otherwise (pipes, ``--lines``).

Two layers, like the client itself. :class:`ChatView` is the screen's state with no I/O
and no clock (time is passed in): client events in, lines to print out; it remembers each
followed channel's recent messages (to render edits and resolve ``/edit`` targets), who is
typing and who has read what. :func:`run_chat` is the anyio front end: it reads commands
from stdin in a worker thread (a blocking ``readline`` never stalls the event loop), runs
them one at a time in order, prints events as they arrive and moves the read cursor.

Messages print as ``HH:MM sender: text  [seq]``; ``seq`` is the message's stable number in
its channel, so ``/edit 12 ...`` names it. ``#1`` is your own latest message in the current
channel, ``#2`` the one before. The line mode cannot see keystrokes before Enter, so it
sends no typing indicator of its own; the screen does, and both show other users'.
"""

from __future__ import annotations

import contextlib
import ssl
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import date, datetime, tzinfo
from typing import Any, TextIO

import anyio
import anyio.abc

from tsmsg.auth import dm_channel, parse_dm, valid_channel
from tsmsg.client import (
    ChannelSummary,
    Client,
    ClientError,
    ConnectionChanged,
    Delete,
    Edit,
    Event,
    Left,
    Membership,
    Message,
    Presence,
    ReadReceipt,
    Resynced,
    Typing,
    connect,
)

SCROLLBACK = 20  # messages shown on joining a channel and by a bare /history
HISTORY_PAGE = 100  # /history N fetches pages of this many (the server's history_max is 500)
REMEMBERED = 1000  # messages kept per channel to render edits and resolve /edit targets
TYPING_TIMEOUT = 6.0  # s: the protocol's typing_timeout_ms; an `on` not renewed expires
TYPING_RENEW = 3.0  # s: the screen renews its own `typing` this often while keys come
TYPING_POLL = 0.5  # s: how late a typing indicator may be cleared after it expired
READ_DEBOUNCE = 0.2  # s: a burst of messages moves the read cursor once
QUIT_GRACE = 5.0  # s: on /quit or end of input, commands still running get this long
COMMAND_QUEUE = 100  # lines typed while earlier commands still run (e.g. offline sends)
CONNECT_TIMEOUT = 10.0  # s: the first connection; later ones are retried for ever
BACKOFF_MAX = 5.0  # s: the longest wait between reconnect attempts
TYPING_MARK = "\u2026"  # an ellipsis
NEW_MARKER = "---- new messages ----"
READ_MARK = "\u2713"  # a check mark

HELP = """\
commands:
  TEXT               send TEXT to the current channel (//TEXT sends /TEXT)
  /join CHANNEL      switch to CHANNEL (joining it the first time)
  /dm USER           switch to your direct-message channel with USER
  /list              your channels and DMs, with unread counts
  /edit REF TEXT     edit a message: REF is its [seq], #N (your Nth last message) or its id
  /delete REF        delete a message (REF as for /edit)
  /history [N]       show the last N messages (default 20)
  /who               presence of the current channel's recent senders
  /help              this text
  /quit              leave (end of input, Ctrl-D, does the same)"""


# ------------------------------------------------------------------------------ commands


class CommandError(ValueError):
    """A typed line that is no valid command; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class BySeq:
    """A message named by its seq in the current channel (``12``, as printed ``[12]``)."""

    seq: int


@dataclass(frozen=True, slots=True)
class ByOwn:
    """The user's ``n``-th last message in the current channel (``#1`` is the latest)."""

    n: int


@dataclass(frozen=True, slots=True)
class ById:
    """A message named by its server id."""

    id: str


Ref = BySeq | ByOwn | ById


@dataclass(frozen=True, slots=True)
class Say:
    text: str


@dataclass(frozen=True, slots=True)
class Join:
    channel: str


@dataclass(frozen=True, slots=True)
class Dm:
    user: str


@dataclass(frozen=True, slots=True)
class EditCmd:
    ref: Ref
    text: str


@dataclass(frozen=True, slots=True)
class DeleteCmd:
    ref: Ref


@dataclass(frozen=True, slots=True)
class HistoryCmd:
    n: int


@dataclass(frozen=True, slots=True)
class Who:
    pass


@dataclass(frozen=True, slots=True)
class Help:
    pass


@dataclass(frozen=True, slots=True)
class Quit:
    pass


@dataclass(frozen=True, slots=True)
class ListCmd:
    pass


Command = Say | Join | Dm | EditCmd | DeleteCmd | HistoryCmd | Who | Help | Quit | ListCmd
COMMANDS = ("/join", "/dm", "/list", "/edit", "/delete", "/history", "/who", "/help", "/quit")


def parse_ref(word: str) -> Ref:
    """``12`` (a seq), ``[12]`` (as printed), ``#2`` (own message) or a message id."""
    if word.startswith("#"):
        if not word[1:].isdigit() or int(word[1:]) < 1:
            raise CommandError(f"{word}: #N needs a number >= 1 (#1 is your last message)")
        return ByOwn(int(word[1:]))
    bare = word[1:-1] if word.startswith("[") and word.endswith("]") else word
    if bare.isdigit():
        return BySeq(int(bare))
    return ById(word)


def parse_command(line: str) -> Command | None:
    """The command a typed line asks for; None for a blank line. Raises CommandError."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    if not line.startswith("/"):
        return Say(line)
    if line.startswith("//"):
        return Say(line[1:])
    name, _, rest = line[1:].partition(" ")
    rest = rest.strip()
    args = rest.split()
    if name == "quit":
        return Quit()
    if name == "help":
        return Help()
    if name == "who":
        return Who()
    if name == "list":
        return ListCmd()
    if name == "join":
        if len(args) != 1:
            raise CommandError("usage: /join CHANNEL")
        if not valid_channel(args[0]):
            raise CommandError(f"{args[0]!r} is no channel name (letters, digits, _.:@-)")
        return Join(args[0])
    if name == "dm":
        if len(args) != 1:
            raise CommandError("usage: /dm USER")
        return Dm(args[0])
    if name == "edit":
        ref_word, _, text = rest.partition(" ")
        if not ref_word or not text.strip():
            raise CommandError("usage: /edit [seq]|#N|ID TEXT")
        return EditCmd(parse_ref(ref_word), text.strip())
    if name == "delete":
        if len(args) != 1:
            raise CommandError("usage: /delete [seq]|#N|ID")
        return DeleteCmd(parse_ref(args[0]))
    if name == "history":
        if len(args) > 1 or (args and (not args[0].isdigit() or int(args[0]) < 1)):
            raise CommandError("usage: /history [N] (N >= 1)")
        return HistoryCmd(int(args[0]) if args else SCROLLBACK)
    raise CommandError(f"unknown command /{name} (/help lists them)")


# ------------------------------------------------------------------------------ rendering


def clock(ts_ms: int, tz: tzinfo | None = None, today: date | None = None) -> str:
    """``HH:MM`` of a server timestamp, in ``tz`` (default: the local time zone); with
    ``today`` given, a day other than it is shown too (``2026-11-29 14:05``)."""
    when = datetime.fromtimestamp(ts_ms / 1000, tz=tz)
    return when.strftime("%H:%M" if today is None or when.date() == today else "%Y-%m-%d %H:%M")


def render_message(
    m: Message, tz: tzinfo | None = None, prefix: str = "", today: date | None = None
) -> str:
    """``HH:MM sender: text  [seq]`` with ``(edited)`` or ``[deleted]`` marked."""
    if m.deleted:
        body = "[deleted]"
    else:
        body = (m.text or "") + (" (edited)" if m.edited is not None else "")
    return f"{prefix}{clock(m.ts, tz, today)} {m.sender}: {body}  [{m.seq}]"


def last_n(n: int) -> str:
    return "the last message" if n == 1 else f"the last {n} messages"


def channel_prefix(channel: str) -> str:
    return f"[{channel}] "


@dataclass
class ChannelView:
    """What the screen knows of one followed channel."""

    name: str
    messages: OrderedDict[int, Message] = field(default_factory=OrderedDict)  # by seq
    seq_of: dict[str, int] = field(default_factory=dict)  # message id -> seq
    shown: int = 0  # the highest seq printed
    typing: dict[str, float] = field(default_factory=dict)  # user -> when the `on` expires
    read: dict[str, int] = field(default_factory=dict)  # other users' read cursors
    marked: int = 0  # the highest seq this user's read cursor was moved to

    def remember(self, m: Message) -> None:
        newest = next(reversed(self.messages), None)
        out_of_order = m.seq not in self.messages and newest is not None and m.seq < newest
        self.messages[m.seq] = m
        self.seq_of[m.id] = m.seq
        if out_of_order:  # an older history page: keep seq order
            self.messages = OrderedDict(sorted(self.messages.items()))
        while len(self.messages) > REMEMBERED:
            _, old = self.messages.popitem(last=False)
            self.seq_of.pop(old.id, None)

    def by_id(self, id: str) -> Message | None:
        seq = self.seq_of.get(id)
        return None if seq is None else self.messages.get(seq)

    def recent(self, n: int) -> list[Message]:
        return list(self.messages.values())[-n:]

    def own(self, user: str) -> list[Message]:
        """The user's messages still standing, newest first."""
        return [m for m in reversed(self.messages.values()) if m.sender == user and not m.deleted]


class ChatView:
    """The chat screen's state: :meth:`apply` takes a client event and returns the lines
    to print. No I/O, no clock: ``now`` (seconds, any monotonic origin) is passed in."""

    def __init__(
        self, user: str, channel: str, tz: tzinfo | None = None, today: date | None = None
    ) -> None:
        self.user = user
        self.current = channel
        self.tz = tz
        self.today = today  # set: messages of other days show their date
        self.channels: dict[str, ChannelView] = {}
        self.connected: bool | None = None
        # The user's channels and DMs with their unread counts (from `channels`, then
        # kept up to date by events); `peers`: a DM's other user.
        self.unread: dict[str, int] = {}
        self.peers: dict[str, str] = {}
        self.mark_new = False  # scrollback marks where the unread messages begin

    def seed(self, summaries: Sequence[ChannelSummary]) -> None:
        """The user's channels as ``list_channels`` gave them: counts and read cursors."""
        for s in summaries:
            self.unread[s.channel] = 0 if s.channel == self.current else s.unread
            if s.peer is not None:
                self.peers[s.channel] = s.peer
            view = self.view(s.channel) if s.channel != self.current else None
            if view is not None:
                view.marked = max(view.marked, s.read)
        self.mark_new = True

    def view(self, channel: str) -> ChannelView:
        view = self.channels.get(channel)
        if view is None:
            view = self.channels[channel] = ChannelView(channel)
        return view

    def switch(self, channel: str) -> list[str]:
        """Make ``channel`` current; if it is already followed, the lines of its scrollback
        (else its first Resynced event brings them)."""
        self.current = channel
        self.unread[channel] = 0
        if channel not in self.channels:
            return [f"-- joining {channel}"]
        return self.scrollback(channel, self.channels[channel].recent(SCROLLBACK))

    def scrollback(self, channel: str, messages: Sequence[Message], title: str = "") -> list[str]:
        """Lines showing ``messages`` (oldest first), remembered as well."""
        view = self.view(channel)
        for m in messages:
            view.remember(m)
        if messages:
            view.shown = max(view.shown, messages[-1].seq)
        title = title or f"{channel}: {last_n(len(messages))}"
        if not messages:
            return [f"-- {channel}: no messages"]
        lines = [f"-- {title}"]
        marked = False
        for m in messages:
            if self.mark_new and not marked and m.seq > view.marked and m.sender != self.user:
                lines.append(NEW_MARKER)
                marked = True
            lines.append(render_message(m, self.tz, today=self.today))
        return lines

    def apply(self, event: Event, now: float) -> list[str]:
        if isinstance(event, Message):
            return self._message(event)
        if isinstance(event, Edit):
            return self._edit(event)
        if isinstance(event, Delete):
            return self._delete(event)
        if isinstance(event, Typing):
            return self._typing(event, now)
        if isinstance(event, ReadReceipt):
            return self._receipt(event)
        if isinstance(event, Resynced):
            return self._resynced(event)
        if isinstance(event, Presence):
            if event.user == self.user:
                return []
            return [f"* {event.user} is {event.status}"]
        if isinstance(event, Membership):
            self.unread.setdefault(event.channel, 0)
            users = parse_dm(event.channel)
            if users is not None:
                self.peers[event.channel] = users[0] if users[1] == self.user else users[1]
            if event.by != self.user and event.channel != self.current:
                self.unread[event.channel] = max(1, self.unread[event.channel])
            return self._membership(event)
        if isinstance(event, Left):
            self.channels.pop(event.channel, None)
            return [f"-- left {event.channel}: {event.reason}"]
        if isinstance(event, ConnectionChanged):
            was, self.connected = self.connected, event.connected
            if was == event.connected:
                return []
            return ["-- connected"] if event.connected else [f"-- reconnecting{TYPING_MARK}"]
        return []

    def _membership(self, m: Membership) -> list[str]:
        """A DM another user opened (PROTOCOL.md 6.15): say so, with the command that
        opens it. The user's own joins (on any device) need no line."""
        users = parse_dm(m.channel)
        if m.by == self.user or users is None or m.channel == self.current:
            return []
        return [f"* new message from {m.by}: /dm {m.by} to read it"]

    def _prefix(self, channel: str) -> str:
        return "" if channel == self.current else channel_prefix(channel)

    def _message(self, m: Message) -> list[str]:
        view = self.view(m.channel)
        view.remember(m)
        lines: list[str] = []
        view.typing.pop(m.sender, None)  # a message ends its sender's typing, silently
        if m.seq > view.shown:
            view.shown = m.seq
            if m.channel != self.current and m.sender != self.user and m.seq > view.marked:
                self.unread[m.channel] = self.unread.get(m.channel, 0) + 1
            lines.append(render_message(m, self.tz, self._prefix(m.channel), self.today))
        return lines

    def _edit(self, e: Edit) -> list[str]:
        view = self.view(e.channel)
        m = view.by_id(e.id)
        if m is not None:
            view.remember(replace(m, text=e.text, edited=e.ts))
        if e.text is None:
            return []  # deleted since: the delete that follows says so
        what = f"[{m.seq}]" if m is not None else e.id
        return [
            f"{self._prefix(e.channel)}{clock(e.ts, self.tz)} {e.sender} edited {what}: {e.text}"
        ]

    def _delete(self, d: Delete) -> list[str]:
        view = self.view(d.channel)
        m = view.by_id(d.id)
        if m is not None:
            view.remember(replace(m, text=None, meta=None, deleted=True))
        what = f"[{m.seq}]" if m is not None else d.id
        return [f"{self._prefix(d.channel)}{clock(d.ts, self.tz)} {d.sender} deleted {what}"]

    def _typing(self, t: Typing, now: float) -> list[str]:
        view = self.view(t.channel)
        was = t.user in view.typing
        if t.on:
            view.typing[t.user] = now + TYPING_TIMEOUT
        else:
            view.typing.pop(t.user, None)
        if t.user == self.user or t.channel != self.current or was == t.on:
            return []
        return [typing_line(t.user, t.on)]

    def expire(self, now: float) -> list[str]:
        """Clear typing indicators whose `on` was not renewed in time (pushes are best
        effort, so an `off` may never come)."""
        lines: list[str] = []
        for view in self.channels.values():
            for user, deadline in list(view.typing.items()):
                if deadline <= now:
                    del view.typing[user]
                    if view.name == self.current and user != self.user:
                        lines.append(typing_line(user, on=False))
        return lines

    def _receipt(self, r: ReadReceipt) -> list[str]:
        view = self.view(r.channel)
        if r.user == self.user:
            view.marked = max(view.marked, r.seq)  # another device of ours read it
            return []
        if r.seq <= view.read.get(r.user, 0):
            return []
        view.read[r.user] = r.seq
        if r.channel != self.current:
            return []
        if r.seq >= view.shown:
            return [f"  {READ_MARK} read by {r.user}"]
        return [f"  {READ_MARK} read by {r.user} up to [{r.seq}]"]

    def _resynced(self, r: Resynced) -> list[str]:
        old = self.channels.pop(r.channel, None)
        view = self.view(r.channel)
        if old is not None:
            view.read, view.marked = old.read, old.marked
        for m in r.messages:
            view.remember(m)
        view.shown = r.head
        if r.channel != self.current:
            return []
        shown = r.messages[-SCROLLBACK:]
        title = f"{r.channel} was reloaded: {last_n(len(shown))}" if old is not None else ""
        return self.scrollback(r.channel, shown, title)

    def unread_mark(self) -> tuple[str, int] | None:
        """``(channel, seq)`` when the current channel shows another user's message past
        this user's read cursor (own messages need no marking: they never count unread)."""
        view = self.channels.get(self.current)
        if view is None:
            return None
        for m in reversed(view.messages.values()):
            if m.seq <= view.marked:
                return None
            if m.seq <= view.shown and m.sender != self.user:
                return self.current, m.seq
        return None

    def resolve(self, ref: Ref) -> Message | BySeq | ById:
        """The message ``ref`` names in the current channel: a remembered Message, or the
        BySeq/ById reference to look up on the server. Raises CommandError for ``#N``
        beyond the user's remembered messages."""
        view = self.view(self.current)
        if isinstance(ref, ByOwn):
            own = view.own(self.user)
            if ref.n > len(own):
                have = f"only {len(own)}" if own else "none"
                raise CommandError(f"#{ref.n}: you have {have} in {self.current} on screen")
            return own[ref.n - 1]
        found = view.messages.get(ref.seq) if isinstance(ref, BySeq) else view.by_id(ref.id)
        return ref if found is None else found

    def recent_senders(self, limit: int) -> list[str]:
        """The current channel's recent senders, newest first, with this user first."""
        users = [self.user]
        view = self.channels.get(self.current)
        for m in reversed(view.messages.values()) if view is not None else ():
            if m.sender not in users:
                users.append(m.sender)
        return users[:limit]


def list_lines(view: ChatView, summaries: Sequence[ChannelSummary]) -> list[str]:
    """``/list``: one line per channel or DM, the current one marked."""
    if not summaries:
        return ["-- no channels yet: /join CHANNEL or /dm USER"]
    lines = [f"-- your channels ({len(summaries)}):"]
    for s in summaries:
        name = f"{s.channel} (with {s.peer})" if s.peer else s.channel
        count = view.unread.get(s.channel, s.unread) if s.channel != view.current else 0
        unread = f"{count}{'+' if s.capped else ''} unread" if count else "read"
        here = "  <- here" if s.channel == view.current else ""
        lines.append(f"   {name}: {unread}{here}")
    return lines


def typing_line(user: str, on: bool) -> str:
    return f"* {user} is typing{TYPING_MARK}" if on else f"* {user} stopped typing"


def presence_line(user: str, status: str, last_seen: int | None, tz: tzinfo | None) -> str:
    seen = f" (last seen {clock(last_seen, tz)})" if last_seen is not None else ""
    return f"{user}: {status}{seen}"


# ------------------------------------------------------------------------------ front end


class Chat:
    """One running chat: the client, the view and the output."""

    def __init__(self, client: Client, view: ChatView, out: TextIO) -> None:
        self.client = client
        self.view = view
        self.out = out
        self.read_due = anyio.Event()
        self.failure: ClientError | None = None

    def emit(self, lines: Sequence[str]) -> None:
        for line in lines:
            self.out.write(line + "\n")
        self.out.flush()

    async def start(
        self, where: str, channel: str
    ) -> tuple[anyio.abc.ObjectSendStream[Command], anyio.abc.ObjectReceiveStream[Command]]:
        """Greet, join ``channel``; the queue of typed commands (both modes)."""
        self.emit([f"-- {self.client.user} on {where}; /help lists the commands"])
        await self.client.join(channel)
        return anyio.create_memory_object_stream[Command](COMMAND_QUEUE)

    def start_soon_in(self, tg: anyio.abc.TaskGroup) -> None:
        """The chat's own tasks: events shown (their end ends ``tg``), typing expired,
        the read cursor moved."""
        tg.start_soon(self.show_events, tg.cancel_scope.cancel)
        tg.start_soon(self.expire_typing)
        tg.start_soon(self.mark_read)

    def _maybe_mark_read(self) -> None:
        if self.view.unread_mark() is not None:
            self.read_due.set()

    async def show_events(self, stop: Callable[[], None]) -> None:
        try:
            async for event in self.client.events():
                self.emit(self.view.apply(event, anyio.current_time()))
                self._maybe_mark_read()
        except ClientError as exc:  # fatal: e.g. a token the server stopped accepting
            self.failure = exc
            stop()

    async def expire_typing(self) -> None:
        while True:
            await anyio.sleep(TYPING_POLL)
            self.emit(self.view.expire(anyio.current_time()))

    async def mark_read(self) -> None:
        """Move this user's read cursor to the newest message on screen."""
        while True:
            await self.read_due.wait()
            self.read_due = anyio.Event()
            await anyio.sleep(READ_DEBOUNCE)
            due = self.view.unread_mark()
            if due is None:
                continue
            channel, seq = due
            try:
                cursor = await self.client.read(channel, seq)
            except ClientError as exc:
                self.emit([f"-- could not mark {channel} read: {exc}"])
                continue
            view = self.view.view(channel)
            view.marked = max(view.marked, cursor)

    async def run_commands(self, commands: anyio.abc.ObjectReceiveStream[Command]) -> None:
        async with commands:
            async for command in commands:
                try:
                    await self.execute(command)
                except ClientError as exc:
                    self.emit([f"-- {describe(command)} failed: {exc}"])
                except CommandError as exc:
                    self.emit([f"-- {exc}"])

    async def execute(self, command: Command) -> None:
        client, view = self.client, self.view
        if isinstance(command, Say):
            most = int(client.limits.get("max_text_bytes", 16384))
            size = len(command.text.encode())
            if size > most:  # a long paste: said in one clear line, nothing sent
                raise CommandError(
                    f"not sent: the message is {size} bytes, the server takes at most {most} "
                    "(max_text_bytes): split it"
                )
            if not client.connected:
                self.emit(["-- offline: the message is sent once the connection is back"])
            await client.send(view.current, command.text)
        elif isinstance(command, Join | Dm):
            channel = command.channel if isinstance(command, Join) else self._dm(command.user)
            await self.switch(channel)
        elif isinstance(command, EditCmd | DeleteCmd):
            channel = view.current
            target = await self.find(command.ref)
            if isinstance(command, EditCmd):
                await client.edit(channel, target, command.text)
            else:
                await client.delete(channel, target)
        elif isinstance(command, HistoryCmd):
            messages = await self.history(view.current, command.n)
            self.emit(view.scrollback(view.current, messages))
            self._maybe_mark_read()
        elif isinstance(command, Who):
            users = view.recent_senders(limit=100)  # the server's max_presence_users
            infos = await client.presence(users)
            lines = [presence_line(i.user, i.status, i.last_seen, view.tz) for i in infos]
            self.emit([f"-- who in {view.current}: " + "; ".join(lines)])
        elif isinstance(command, Help):
            self.emit(HELP.splitlines())
        elif isinstance(command, ListCmd):
            summaries = await client.list_channels()
            self.emit(list_lines(view, summaries))

    def _dm(self, other: str) -> str:
        try:
            return dm_channel(self.view.user, other)
        except ValueError as exc:
            raise CommandError(str(exc)) from None

    async def switch(self, channel: str) -> None:
        if channel == self.view.current and channel in self.view.channels:
            self.emit([f"-- already in {channel}"])
            return
        previous = self.view.current
        listed = channel in self.view.unread
        self.emit(self.view.switch(channel))
        if channel not in self.client.channels:
            try:
                await self.client.join(channel)
            except ClientError:
                self.view.current = previous
                self.view.channels.pop(channel, None)
                if not listed:  # not the user's channel: no entry in the side list
                    self.view.unread.pop(channel, None)
                raise
        self._maybe_mark_read()

    async def find(self, ref: Ref) -> str:
        """The id of the message ``ref`` names in the current channel."""
        found = self.view.resolve(ref)
        if isinstance(found, Message):
            return found.id
        if isinstance(found, ById):
            return found.id  # not on screen: the server knows (or answers not_found)
        page = await self.client.history(self.view.current, before=found.seq + 1, limit=1)
        if not page.messages or page.messages[-1].seq != found.seq:
            raise CommandError(f"no message [{found.seq}] in {self.view.current}")
        return page.messages[-1].id

    async def history(self, channel: str, n: int) -> list[Message]:
        """The channel's last ``n`` messages, oldest first (several pages if need be)."""
        messages: list[Message] = []
        before: int | None = None
        while len(messages) < n:
            page = await self.client.history(
                channel, before=before, limit=min(HISTORY_PAGE, n - len(messages))
            )
            messages[:0] = page.messages
            if not page.more or not page.messages:
                break
            before = page.messages[0].seq
        return messages[-n:]


def describe(command: Command) -> str:
    return (
        "send" if isinstance(command, Say) else type(command).__name__.removesuffix("Cmd").lower()
    )


async def read_commands(
    read_line: Callable[[], Awaitable[str]],
    commands: anyio.abc.ObjectSendStream[Command],
    emit: Callable[[Sequence[str]], None],
) -> None:
    """Parse typed lines into ``commands`` until /quit or the end of input."""
    async with commands:
        while True:
            line = await read_line()
            if not line:
                return  # end of input
            try:
                command = parse_command(line)
            except CommandError as exc:
                emit([f"-- {exc}"])
                continue
            if isinstance(command, Quit):
                return
            if command is not None:
                await commands.send(command)


async def run_chat(
    host: str,
    port: int,
    channel: str,
    *,
    token: str | None = None,
    token_provider: Callable[[], Awaitable[str]] | None = None,
    user: str | None = None,
    stdin: TextIO | None = None,
    out: TextIO | None = None,
    tz: tzinfo | None = None,
    backoff_max: float = BACKOFF_MAX,
    quit_grace: float = QUIT_GRACE,
    ssl_context: ssl.SSLContext | None = None,
    screen: bool = False,
) -> int:
    """Run the chat until /quit or the end of ``stdin`` (then returns 0).

    ``screen``: the full-screen terminal UI (chat_ui: fixed input line, channel list with
    unread counts, status and typing bars, completion); needs a terminal and asyncio.
    Without it, the line mode: lines from ``stdin``, output to ``out`` (pipes, scripts).

    Raises ClientError when the server refuses the token or the channel, cannot be reached
    within CONNECT_TIMEOUT, or later stops accepting the connection for good (a token it
    no longer takes); ValueError when ``user`` is given and the token is another user's.
    ``ssl_context``: connect over TLS with it (``None``: plaintext).
    """
    source: TextIO = sys.stdin if stdin is None else stdin
    out = sys.stdout if out is None else out

    async def read_line() -> str:
        # A worker thread: a blocking readline never stalls the event loop. On cancel the
        # thread is abandoned (it ends with the process: worker threads are daemons).
        return await anyio.to_thread.run_sync(source.readline, abandon_on_cancel=True)

    if screen:
        return await _run_screen(host, port, channel, token, token_provider, user, tz, ssl_context)

    async with _connected(
        host, port, user, out, token=token, token_provider=token_provider,
        backoff_max=backoff_max, ssl_context=ssl_context,
    ) as client:  # fmt: skip
        chat = Chat(client, ChatView(client.user, channel, tz), out)
        send, receive = await chat.start(f"{host}:{port}", channel)
        async with anyio.create_task_group() as tg:
            chat.start_soon_in(tg)
            async with anyio.create_task_group() as io:
                io.start_soon(chat.run_commands, receive)
                await read_commands(read_line, send, chat.emit)
                # /quit or end of input: let queued commands (sends) finish, briefly.
                io.cancel_scope.deadline = anyio.current_time() + quit_grace
            if io.cancel_scope.cancelled_caught and chat.failure is None:
                chat.emit([f"-- gave up after {quit_grace:g} s: unsent messages are dropped"])
            tg.cancel_scope.cancel()
        if chat.failure is not None:
            raise chat.failure
        return 0


@asynccontextmanager
async def _connected(
    host: str, port: int, user: str | None, out: TextIO, **options: Any
) -> AsyncIterator[Client]:
    """The chat's client: "connecting to HOST:PORT..." said at once, then connected (a
    refused connection or token fails at once), and the token checked to be ``user``'s."""
    print(f"-- connecting to {host}:{port}{TYPING_MARK}", file=out, flush=True)
    async with connect(host, port, connect_timeout=CONNECT_TIMEOUT, **options) as client:
        if user is not None and client.user != user:
            raise ValueError(f"the token is for {client.user!r}, not {user!r}")
        yield client


async def _run_screen(
    host: str,
    port: int,
    channel: str,
    token: str | None,
    token_provider: Callable[[], Awaitable[str]] | None,
    user: str | None,
    tz: tzinfo | None,
    ssl_context: ssl.SSLContext | None,
) -> int:
    """The chat on the full-screen UI: the same Chat and ChatView as the line mode, with
    the screen as their input and output, and the user's channels listed at start."""
    from tsmsg.chat_ui import ChatScreen  # prompt_toolkit loads only for the screen

    async with _connected(  # the line is printed before the screen takes the terminal
        host, port, user, sys.stdout, token=token, token_provider=token_provider,
        ssl_context=ssl_context,
    ) as client:  # fmt: skip
        view = ChatView(client.user, channel, tz, today=datetime.now(tz).date())
        view.connected = True
        view.seed(await client.list_channels())
        screen = ChatScreen(view, f"{host}:{port}")
        chat = Chat(client, view, screen)  # type: ignore[arg-type]  # write/flush suffice
        send, receive = await chat.start(f"{host}:{port}", channel)
        async with anyio.create_task_group() as tg:
            chat.start_soon_in(tg)
            tg.start_soon(_run_app, screen, tg.cancel_scope)
            tg.start_soon(_send_typing, client, view, screen)
            async with anyio.create_task_group() as io:
                io.start_soon(chat.run_commands, receive)
                await read_commands(screen.read_line, send, chat.emit)
                io.cancel_scope.deadline = anyio.current_time() + QUIT_GRACE
            tg.cancel_scope.cancel()
        if chat.failure is not None:
            raise chat.failure
        return 0


async def _send_typing(client: Client, view: ChatView, screen: Any) -> None:
    """While the user types a message: ``typing`` on, renewed every TYPING_RENEW (the
    server expires it after typing_timeout_ms; a sent message ends it for the others)."""
    while True:
        await screen.typed.wait()
        screen.typed.clear()
        with contextlib.suppress(ClientError):
            await client.typing(view.current, True)
        await anyio.sleep(TYPING_RENEW)


async def _run_app(screen: Any, scope: anyio.CancelScope) -> None:
    try:
        await screen.app.run_async()
    finally:
        scope.cancel()


__all__ = [
    "ById",
    "ByOwn",
    "BySeq",
    "ChatView",
    "Command",
    "CommandError",
    "parse_command",
    "parse_ref",
    "render_message",
    "run_chat",
]
