"""The full-screen terminal UI of ``tsmsg chat``, on prompt_toolkit.

Why prompt_toolkit (not Textual): the chat needs an input line with history and completion
under a scrolling log, a status bar and a side list, which is what prompt_toolkit's
layout and ``TextArea`` give directly; it is small (pure Python, one dependency:
wcwidth), maintained, runs inside the asyncio loop the client already runs on
(``Application.run_async``), and has no CSS or widget framework to learn or load.

The screen only draws: :class:`~tsmsg.chat.ChatView` keeps the state and makes the
lines, :class:`~tsmsg.chat.Chat` runs commands, exactly as in the line mode. This module
gives them an output (:meth:`ChatScreen.write`: lines go to the log pane; typing lines
become the transient typing bar) and an input (:meth:`ChatScreen.read_line`).
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections import deque
from collections.abc import Iterable

from prompt_toolkit.application import Application
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.data_structures import Point
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import StyleAndTextTuples
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.layout import HSplit, Layout, VSplit, Window
from prompt_toolkit.layout.controls import FormattedTextControl
from prompt_toolkit.styles import Style
from prompt_toolkit.widgets import TextArea

from tsmsg.chat import COMMANDS, NEW_MARKER, TYPING_MARK, ChatView

LOG_LINES = 2000  # lines the log pane keeps (older ones scroll away for good)
SIDE_WIDTH = 26  # columns of the channel list
NAME_COLOURS = ("ansicyan", "ansigreen", "ansimagenta", "ansiyellow", "ansiblue", "ansired")
TYPING_RE = re.compile(r"^\* \S+ (is typing|stopped typing)")
# "[channel] " prefix (another channel's line), "HH:MM " or "YYYY-MM-DD HH:MM ", sender
MESSAGE_RE = re.compile(r"^(\[\S+\] )?((?:\d{4}-\d\d-\d\d )?\d\d:\d\d) (\S+?)( edited| deleted|:)")

STYLE = Style.from_dict(
    {
        "status": "reverse",
        "side": "bg:#202020 #d0d0d0",
        "side.current": "bold reverse",
        "side.unread": "bold",
        "time": "#808080",
        "info": "#909090",
        "marker": "bold ansired",
        "typing": "italic #a0a0a0",
    }
)


def name_style(user: str) -> str:
    """A colour per user, the same in every run (crc32, not Python's salted hash)."""
    return f"bold {NAME_COLOURS[zlib.crc32(user.encode()) % len(NAME_COLOURS)]}"


def styled(line: str) -> StyleAndTextTuples:
    """One log line with its timestamp dimmed and its sender coloured."""
    if line == NEW_MARKER:
        return [("class:marker", line)]
    m = MESSAGE_RE.match(line)
    if m is None:
        return [("class:info" if line.startswith(("--", "*", "  ")) else "", line)]
    out: StyleAndTextTuples = []
    if m.group(1):
        out.append(("class:info", m.group(1)))
    out += [("class:time", m.group(2) + " "), (name_style(m.group(3)), m.group(3))]
    out.append(("", line[m.end(3) :]))
    return out


class ChatCompleter(Completer):
    """Commands after ``/``; user names after ``/dm``; channels after ``/join``."""

    def __init__(self, view: ChatView) -> None:
        self.view = view

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        command, space, word = text.partition(" ")
        if not space:
            choices: Iterable[str] = COMMANDS
            word = command
        elif command == "/dm":
            choices = sorted({*self.view.peers.values(), *self.view.recent_senders(100)})
        elif command == "/join":
            choices = sorted(c for c in self.view.unread if not c.startswith("dm:"))
        else:
            return
        for choice in choices:
            if choice.startswith(word) and choice != word:
                yield Completion(choice, start_position=-len(word))


class ChatScreen:
    """The application: log pane, channel list, typing bar, status bar, input line."""

    def __init__(self, view: ChatView, where: str) -> None:
        self.view = view
        self.where = where
        self.log: deque[str] = deque(maxlen=LOG_LINES)
        self.lines: asyncio.Queue[str] = asyncio.Queue()
        self.typed = asyncio.Event()  # a key changed the input: the chat sends `typing`
        self.input = TextArea(
            height=1,
            prompt="> ",
            multiline=False,
            completer=ChatCompleter(view),
            complete_while_typing=True,
            accept_handler=self._accept,
        )
        self.input.buffer.on_text_changed += self._changed
        log = Window(
            FormattedTextControl(self._log_text, get_cursor_position=self._log_end),
            wrap_lines=True,
            always_hide_cursor=True,
        )
        side = Window(FormattedTextControl(self._side_text), width=SIDE_WIDTH, style="class:side")
        typing = Window(FormattedTextControl(self._typing_text), height=1)
        status = Window(FormattedTextControl(self._status_text), height=1, style="class:status")
        keys = KeyBindings()

        @keys.add("c-d")
        @keys.add("c-c")
        def _quit(event: KeyPressEvent) -> None:
            self.lines.put_nowait("")  # the end of input: the chat quits

        root = HSplit([VSplit([side, Window(width=1, char="\u2502"), log]), typing, status])
        self.app: Application[None] = Application(
            layout=Layout(HSplit([root, self.input]), focused_element=self.input),
            key_bindings=keys,
            style=STYLE,
            full_screen=True,
            mouse_support=False,
        )

    # ------------------------------------------------------------------ the chat's I/O

    def write(self, text: str) -> int:
        """The chat's output (a TextIO's write): whole lines, each to the log, except
        typing lines, which the typing bar shows from the view's state instead."""
        for line in text.splitlines():
            if not TYPING_RE.match(line):
                self.log.append(line)
        self.app.invalidate()
        return len(text)

    def flush(self) -> None:
        self.app.invalidate()

    async def read_line(self) -> str:
        """The next line typed (with its newline), or "" when the user quits."""
        line = await self.lines.get()
        return line and line + "\n"

    def _changed(self, buffer: object) -> None:
        text = self.input.text
        if text and not text.startswith("/"):
            self.typed.set()

    def _accept(self, buffer: object) -> bool:
        text = self.input.text
        if text.strip():
            self.lines.put_nowait(text)
        return False  # clears the input line

    # ------------------------------------------------------------------ drawing

    def _log_text(self) -> StyleAndTextTuples:
        out: StyleAndTextTuples = []
        for i, line in enumerate(self.log):
            if i:
                out.append(("", "\n"))
            out += styled(line)
        return out

    def _log_end(self) -> Point:
        return Point(x=0, y=max(0, len(self.log) - 1))  # keeps the newest line in view

    def _side_text(self) -> StyleAndTextTuples:
        view = self.view
        names = sorted({*view.unread, view.current})
        out: StyleAndTextTuples = [("bold", " channels\n")]
        for name in names:
            label = f"@{view.peers[name]}" if name in view.peers else f"#{name}"
            count = view.unread.get(name, 0)
            text = f" {label[: SIDE_WIDTH - 7]}" + (f" ({count})" if count else "")
            style = "class:side.current" if name == view.current else ""
            if count and name != view.current:
                style = "class:side.unread"
            out.append((style, text.ljust(SIDE_WIDTH - 1) + "\n"))
        return out

    def _typing_text(self) -> StyleAndTextTuples:
        current = self.view.channels.get(self.view.current)
        users = sorted(u for u in (current.typing if current else ()) if u != self.view.user)
        if not users:
            return []
        verb = "is" if len(users) == 1 else "are"
        return [("class:typing", f" {', '.join(users)} {verb} typing{TYPING_MARK}")]

    def _status_text(self) -> StyleAndTextTuples:
        view = self.view
        state = {True: "connected", False: f"reconnecting{TYPING_MARK}", None: "connecting"}
        here = view.peers.get(view.current)
        channel = f"DM with {here}" if here else f"#{view.current}"
        text = f" {view.user} @ {self.where} \u2502 {channel} \u2502 {state[view.connected]}"
        return [("class:status", text + " \u2502 /help, Tab completes, Ctrl-D quits ")]
