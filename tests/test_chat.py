"""``tsmsg chat``: command parsing and the screen's state by plain calls; the chat front end
in process against a real server (stdin a pipe), across a SIGKILL and restart of a server
subprocess; the command line's error paths; and two chats driven in tmux for a round trip.
Every wait is bounded."""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import SECRET, Harness, fast_limits, make_settings, mint
from server_proc import server_env, server_process
from tsmsg.auth import TokenVerifier
from tsmsg.chat import (
    NEW_MARKER,
    ById,
    ByOwn,
    BySeq,
    Chat,
    ChatView,
    CommandError,
    DeleteCmd,
    Dm,
    EditCmd,
    Help,
    HistoryCmd,
    Join,
    ListCmd,
    Quit,
    Say,
    Who,
    list_lines,
    parse_command,
    render_message,
    run_chat,
)
from tsmsg.cli import main
from tsmsg.client import (
    ChannelSummary,
    ConnectionChanged,
    Delete,
    Edit,
    Forbidden,
    Left,
    Membership,
    Message,
    Presence,
    ReadReceipt,
    Resynced,
    TokenExpired,
    Typing,
    connect,
)
from tsmsg.server.app import Server

CH = "room-1"
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
WAIT = 10.0  # s: any single wait for output, a process or a message


def msg(seq: int, sender: str, text: str | None, **kw: Any) -> Message:
    return Message(CH, seq, f"id-{seq}", sender, T0 + seq * 60_000, text, **kw)


# ------------------------------------------------------------------------ command parsing


@pytest.mark.parametrize(
    ("line", "command"),
    [
        ("hello there\n", Say("hello there")),
        ("//not a command", Say("/not a command")),
        ("/join room-2", Join("room-2")),
        ("/dm bob", Dm("bob")),
        ("/edit 12 new text", EditCmd(BySeq(12), "new text")),
        ("/edit [12] new text", EditCmd(BySeq(12), "new text")),
        ("/edit #1  fixed  typo ", EditCmd(ByOwn(1), "fixed  typo")),
        ("/edit 3-4 by id", EditCmd(ById("3-4"), "by id")),
        ("/delete #2", DeleteCmd(ByOwn(2))),
        ("/delete 7", DeleteCmd(BySeq(7))),
        ("/history", HistoryCmd(20)),
        ("/history 5", HistoryCmd(5)),
        ("/who", Who()),
        ("/help", Help()),
        ("/quit", Quit()),
        ("", None),
        ("   \n", None),
    ],
)
def test_parse_command(line: str, command: object) -> None:
    assert parse_command(line) == command


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("/nope", "unknown command /nope"),
        ("/join", "usage: /join CHANNEL"),
        ("/join a b", "usage: /join CHANNEL"),
        ("/join bad/name", "no channel name"),
        ("/dm", "usage: /dm USER"),
        ("/edit 12", "usage: /edit"),
        ("/edit", "usage: /edit"),
        ("/edit #0 text", "#N needs a number >= 1"),
        ("/edit #x text", "#N needs a number >= 1"),
        ("/delete", "usage: /delete"),
        ("/history 0", "usage: /history"),
        ("/history many", "usage: /history"),
    ],
)
def test_parse_command_errors(line: str, error: str) -> None:
    with pytest.raises(CommandError, match=re.escape(error)):
        parse_command(line)


# ------------------------------------------------------------------------ the screen's state


def test_render_message_marks_edits_and_deletes() -> None:
    assert render_message(msg(3, "bob", "hi"), UTC) == "22:16 bob: hi  [3]"
    assert render_message(msg(3, "bob", "hi!", edited=T0), UTC) == "22:16 bob: hi! (edited)  [3]"
    deleted = msg(3, "bob", None, deleted=True)
    assert render_message(deleted, UTC, "[room-2] ") == "[room-2] 22:16 bob: [deleted]  [3]"


def test_view_scrollback_live_edit_delete_and_other_channels() -> None:
    view = ChatView("alice", CH, UTC)
    older = tuple(msg(s, "bob", f"m{s}") for s in range(1, 26))
    lines = view.apply(Resynced(CH, 25, 0, older), 0)
    assert lines[0] == f"-- {CH}: the last 20 messages"
    assert lines[1] == "22:19 bob: m6  [6]" and len(lines) == 21
    assert view.apply(Resynced("empty", 0, 0, ()), 0) == []  # not the current channel
    assert view.apply(msg(26, "alice", "mine"), 0) == ["22:39 alice: mine  [26]"]
    assert view.apply(msg(26, "alice", "mine"), 0) == []  # already shown
    edit = Edit(CH, 27, "id-26", "alice", T0, "mine!")
    assert view.apply(edit, 0) == ["22:13 alice edited [26]: mine!"]
    assert view.apply(Delete(CH, 28, "id-5", "bob", T0), 0) == ["22:13 bob deleted [5]"]
    assert view.channels[CH].messages[5].deleted
    assert view.apply(Delete(CH, 29, "gone", "bob", T0), 0) == ["22:13 bob deleted gone"]
    assert view.apply(Edit(CH, 30, "id-4", "bob", T0, None), 0) == []  # redacted: deleted
    other = Message("room-2", 1, "x", "carol", T0, "psst")
    assert view.apply(other, 0) == ["[room-2] 22:13 carol: psst  [1]"]
    assert view.switch("room-2") == ["-- room-2: the last message", "22:13 carol: psst  [1]"]
    assert view.switch("room-3") == ["-- joining room-3"]
    assert view.apply(Resynced("room-3", 0, 0, ()), 0) == ["-- room-3: no messages"]


def test_view_reload_keeps_read_state_and_says_so() -> None:
    view = ChatView("alice", CH, UTC)
    view.apply(Resynced(CH, 1, 0, (msg(1, "bob", "a"),)), 0)
    view.apply(ReadReceipt(CH, "bob", 1), 0)
    lines = view.apply(Resynced(CH, 9, 2, (msg(9, "bob", "z"),)), 0)
    assert lines == [f"-- {CH} was reloaded: the last message", "22:22 bob: z  [9]"]
    assert view.channels[CH].read == {"bob": 1} and list(view.channels[CH].messages) == [9]


def test_view_typing_once_per_on_cleared_by_off_message_or_expiry() -> None:
    view = ChatView("alice", CH, UTC)
    view.apply(Resynced(CH, 0, 0, ()), 0)
    assert view.apply(Typing(CH, "bob", True), 0) == ["* bob is typing\u2026"]
    assert view.apply(Typing(CH, "bob", True), 3) == []  # a renewal
    assert view.apply(Typing(CH, "bob", False), 4) == ["* bob stopped typing"]
    assert view.apply(Typing(CH, "bob", False), 4) == []
    assert view.apply(Typing(CH, "bob", True), 5) == ["* bob is typing\u2026"]
    assert view.apply(msg(1, "bob", "done"), 6) == ["22:14 bob: done  [1]"]  # ends it silently
    assert view.apply(Typing(CH, "bob", False), 6) == []
    assert view.apply(Typing(CH, "carol", True), 10) == ["* carol is typing\u2026"]
    assert view.expire(15.9) == []
    assert view.expire(16.0) == ["* carol stopped typing"]
    assert view.expire(17.0) == []
    assert view.apply(Typing("elsewhere", "bob", True), 20) == []  # not the current channel
    assert view.apply(Typing(CH, "alice", True), 20) == []  # another device of ours


def test_view_read_receipts_and_the_read_mark() -> None:
    view = ChatView("alice", CH, UTC)
    view.apply(Resynced(CH, 2, 0, (msg(1, "bob", "a"), msg(2, "alice", "b"))), 0)
    assert view.unread_mark() == (CH, 1)  # bob's message; own ones need no marking
    view.channels[CH].marked = 1
    assert view.unread_mark() is None
    assert view.apply(ReadReceipt(CH, "bob", 2), 0) == ["  \u2713 read by bob"]
    assert view.apply(ReadReceipt(CH, "bob", 2), 0) == []  # no news
    assert view.apply(ReadReceipt(CH, "carol", 1), 0) == ["  \u2713 read by carol up to [1]"]
    assert view.apply(ReadReceipt(CH, "alice", 2), 0) == []  # our own cursor moved
    assert view.channels[CH].marked == 2
    view.apply(msg(3, "bob", "c"), 0)
    assert view.unread_mark() == (CH, 3)


def test_view_presence_connection_and_left() -> None:
    view = ChatView("alice", CH, UTC)
    assert view.apply(ConnectionChanged(True, "connected"), 0) == ["-- connected"]
    assert view.apply(ConnectionChanged(False, "lost"), 0) == ["-- reconnecting\u2026"]
    assert view.apply(ConnectionChanged(False, "refused"), 0) == []  # still down
    assert view.apply(ConnectionChanged(True, "connected"), 0) == ["-- connected"]
    assert view.apply(Presence("bob", "away", T0), 0) == ["* bob is away"]
    assert view.apply(Presence("alice", "online", T0), 0) == []
    assert view.apply(Left(CH, "forbidden"), 0) == [f"-- left {CH}: forbidden"]
    # A DM bob opened: said, with the command that opens it; her own joins are not.
    new_dm = ["* new message from bob: /dm bob to read it"]
    assert view.apply(Membership("dm:alice:bob", "bob"), 0) == new_dm
    assert view.apply(Membership("room-2", "alice"), 0) == []


def test_view_resolves_refs_and_lists_recent_senders() -> None:
    view = ChatView("alice", CH, UTC)
    messages = (msg(1, "alice", "a"), msg(2, "bob", "b"), msg(3, "alice", "c"))
    view.apply(Resynced(CH, 3, 0, (*messages, msg(4, "alice", None, deleted=True))), 0)
    assert view.resolve(ByOwn(1)) == messages[2]  # the deleted one does not count
    assert view.resolve(ByOwn(2)) == messages[0]
    with pytest.raises(CommandError, match="#3: you have only 2"):
        view.resolve(ByOwn(3))
    assert view.resolve(BySeq(2)) == messages[1]
    assert view.resolve(BySeq(99)) == BySeq(99)  # not on screen: looked up on the server
    assert view.resolve(ById("id-2")) == messages[1]
    assert view.resolve(ById("3-9")) == ById("3-9")
    assert view.recent_senders(10) == ["alice", "bob"]


# ------------------------------------------------------------------------ the front end


class PipedChat:
    """``run_chat`` in this process: lines go in through a pipe, output into a buffer."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.out = io.StringIO()
        read_fd, self.write_fd = os.pipe()
        self.stdin = open(read_fd, encoding="utf-8")
        self.code: int | None = None

    def type(self, line: str) -> None:
        os.write(self.write_fd, (line + "\n").encode())

    def text(self) -> str:
        return self.out.getvalue()

    async def wait_for(self, needle: str, count: int = 1) -> str:
        with trio.fail_after(WAIT):
            while self.text().count(needle) < count:
                await trio.sleep(0.02)
        return self.text()

    def end_input(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def close(self) -> None:
        self.end_input()
        self.stdin.close()


@asynccontextmanager
async def chat_session(port: int, user: str, **kw: Any) -> AsyncIterator[PipedChat]:
    """A chat as ``user`` on ``port``; on the way out, the end of input must end it with 0."""
    chat = PipedChat(user)

    async def run() -> None:
        chat.code = await run_chat(
            "127.0.0.1", port, CH, token=mint(user), stdin=chat.stdin, out=chat.out, **kw
        )

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await chat.wait_for("-- connected")
            yield chat
            chat.end_input()
            with trio.fail_after(WAIT):
                while chat.code is None:
                    await trio.sleep(0.02)
        assert chat.code == 0
    finally:
        chat.close()


async def test_chat_commands_against_a_server(harness: Harness) -> None:
    port = harness.server.port
    async with connect("127.0.0.1", port, token=mint("bob")) as bob:
        await bob.join(CH)
        await bob.send(CH, "before alice came")
        async with chat_session(port, "alice") as alice:
            await alice.wait_for("bob: before alice came  [1]")
            assert f"-- {CH}: the last message" in alice.text()
            # Alice sees bob's message: her cursor moves and bob gets the receipt.
            with trio.fail_after(WAIT):
                async for event in bob.events(CH):
                    if isinstance(event, ReadReceipt) and event.user == "alice":
                        break
            assert event.seq == 1
            await bob.typing(CH, True)
            await alice.wait_for("* bob is typing\u2026")
            await bob.typing(CH, False)
            await alice.wait_for("* bob stopped typing")

            alice.type("hello bob")
            alice.type("a typo: helo")
            await alice.wait_for("alice: a typo: helo  [3]")
            alice.type("/edit #1 fixed: hello")
            await alice.wait_for("alice edited [3]: fixed: hello")
            alice.type("/delete 2")
            await alice.wait_for("alice deleted [2]")
            alice.type("/delete 1")  # bob's: no moderator scope
            await alice.wait_for("-- delete failed: forbidden")
            alice.type("/edit 4 not a message")  # seq 4 is the edit entry
            await alice.wait_for(f"-- no message [4] in {CH}")
            alice.type("/history 2")
            text = await alice.wait_for(f"-- {CH}: the last 2 messages")
            tail = text.split(f"-- {CH}: the last 2 messages\n")[1].splitlines()[:2]
            assert tail[0].endswith("alice: [deleted]  [2]")
            assert tail[1].endswith("alice: fixed: hello (edited)  [3]")
            alice.type("/who")
            await alice.wait_for(f"-- who in {CH}: alice: online; bob: online")
            alice.type("/nope")
            await alice.wait_for("-- unknown command /nope")
            await bob.read(CH, 5)
            await alice.wait_for("  \u2713 read by bob")

            # bob writes to alice first: she is told, in the room she is in (issue 19).
            await bob.join("dm:alice:bob")
            await bob.send("dm:alice:bob", "psst")
            await alice.wait_for("* new message from bob: /dm bob to read it")
            alice.type("/dm bob")
            await alice.wait_for("bob: psst  [1]")
            await bob.send(CH, "back in the room")
            await alice.wait_for(f"[{CH}] ")  # another channel's message, prefixed
            alice.type(f"/join {CH}")
            await alice.wait_for("bob: back in the room  [6]", count=2)
            alice.type("/help")
            await alice.wait_for("/quit              leave")

        page = await bob.history(CH)
        assert [(m.sender, m.text, m.deleted) for m in page.messages] == [
            ("bob", "before alice came", False),
            ("alice", None, True),
            ("alice", "fixed: hello", False),
            ("bob", "back in the room", False),
        ]


async def test_chat_quit_sends_what_was_typed_first(harness: Harness) -> None:
    async with chat_session(harness.server.port, "alice") as alice:
        alice.type("last words")
        alice.type("/quit")
        with trio.fail_after(WAIT):
            while alice.code is None:
                await trio.sleep(0.02)
    async with connect("127.0.0.1", harness.server.port, token=mint("bob")) as bob:
        page = await bob.history(CH)
    assert [m.text for m in page.messages] == ["last words"]


async def test_chat_refused_channel_and_wrong_user(harness: Harness) -> None:
    port = harness.server.port
    with open(os.devnull, encoding="utf-8") as stdin:
        with pytest.raises(Forbidden, match="forbidden"):
            await run_chat(
                "127.0.0.1",
                port,
                CH,
                token=mint("alice", ["other"]),
                stdin=stdin,
                out=io.StringIO(),
            )
        with pytest.raises(ValueError, match="the token is for 'alice', not 'bob'"):
            await run_chat(
                "127.0.0.1",
                port,
                CH,
                token=mint("alice"),
                user="bob",
                stdin=stdin,
                out=io.StringIO(),
            )


async def test_chat_a_refused_join_leaves_no_channel_behind(harness: Harness) -> None:
    """A /join the server refuses: the chat stays where it was, and the refused channel is
    not left in the view's channels (the screen's side list, /join's completion)."""
    async with connect("127.0.0.1", harness.server.port, token=mint("alice", [CH])) as client:
        view = ChatView("alice", CH)
        chat = Chat(client, view, io.StringIO())
        send, receive = await chat.start("here", CH)
        send.close()
        receive.close()
        with pytest.raises(Forbidden):
            await chat.execute(Join("secret-room"))
        assert view.current == CH
        assert "secret-room" not in view.unread
        assert "secret-room" not in view.channels


# ------------------------------------------------------------------------ a server subprocess


async def test_chat_survives_a_server_restart_and_catches_up(tmp_path: Path) -> None:
    async with server_process(tmp_path / "data", tmp_path / "server.log") as server:
        async with chat_session(server.port, "alice", backoff_max=0.3) as alice:
            await alice.wait_for(f"-- {CH}: no messages")
            server.kill()
            await alice.wait_for("-- reconnecting\u2026")
            alice.type("typed while the server was down")
            await alice.wait_for("-- offline: the message is sent once the connection is back")
            await server.restart()
            async with connect("127.0.0.1", server.port, token=mint("bob")) as bob:
                await bob.join(CH)
                await bob.send(CH, "after the restart")
            text = await alice.wait_for("bob: after the restart")
            assert "-- connected" in text.split("-- reconnecting\u2026")[1]
            await alice.wait_for("alice: typed while the server was down")
        async with connect("127.0.0.1", server.port, token=mint("carol")) as carol:
            page = await carol.history(CH)
        assert sorted(m.text or "" for m in page.messages) == [
            "after the restart",
            "typed while the server was down",
        ]


async def test_chat_quitting_while_offline_waits_briefly_for_unsent_messages(
    tmp_path: Path,
) -> None:
    async with server_process(tmp_path / "data", tmp_path / "server.log") as server:
        async with chat_session(server.port, "alice", quit_grace=0.3) as alice:
            server.kill()
            await alice.wait_for("-- reconnecting\u2026")
            alice.type("never sent")
        assert alice.text().endswith("-- gave up after 0.3 s: unsent messages are dropped\n")


async def test_chat_ends_with_the_error_when_the_server_stops_taking_the_token(
    tmp_path: Path,
) -> None:
    """A token without a provider expires: the server closes the connection after its
    refresh grace and refuses the next hello, so the chat cannot go on."""
    settings = make_settings(tmp_path / "data", limits=fast_limits(refresh_grace_ms=100))
    chat = PipedChat("alice")  # nothing is typed: only the error can end it
    try:
        async with trio.open_nursery() as nursery:
            server: Server = await nursery.start(Server(settings, TokenVerifier(SECRET)).run)
            with trio.fail_after(WAIT), pytest.raises(TokenExpired):
                await run_chat(
                    "127.0.0.1",
                    server.port,
                    CH,
                    token=mint("alice", ttl_s=1),
                    stdin=chat.stdin,
                    out=chat.out,
                )
            server.stopping.set()
    finally:
        chat.close()
    assert "-- reconnecting" in chat.text()


# ------------------------------------------------------------------------ the command line


@pytest.fixture
def no_tsmsg_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("TSMSG_"):
            monkeypatch.delenv(key)


def test_cli_chat_without_secret_or_token_exits_1(
    no_tsmsg_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["chat", "--user", "alice"]) == 1
    err = capsys.readouterr().err
    assert err == "tsmsg: no token: pass --token, or --secret-file (or TSMSG_SECRET) to mint one\n"


def test_cli_chat_usage_errors_exit_2(
    no_tsmsg_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["chat"])
    assert exc.value.code == 2
    assert "--user is required (unless --token is given)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["chat", "--user", "alice", "--channel", "no/such"])
    assert exc.value.code == 2


def test_cli_chat_bad_user_or_short_secret_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TSMSG_SECRET", SECRET.decode())
    assert main(["chat", "--user", "not a user"]) == 1
    assert capsys.readouterr().err.startswith("tsmsg: invalid user id 'not a user'")
    monkeypatch.setenv("TSMSG_SECRET", "short")
    assert main(["chat", "--user", "alice"]) == 1
    assert "TSMSG_SECRET must be at least 32 bytes" in capsys.readouterr().err


def run_cli(*argv: str, env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tsmsg.cli", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


async def test_cli_chat_in_a_child_process(tmp_path: Path) -> None:
    """--help; a refused token and a refused channel exit 1; piped input is sent and the end
    of input exits 0."""
    async with server_process(tmp_path / "data", tmp_path / "server.log") as server:
        env = server_env(secret=False)
        port = str(server.port)
        helped = await trio.to_thread.run_sync(lambda: run_cli("chat", "--help", env=env))
        assert helped.returncode == 0 and helped.stdout.startswith("usage: tsmsg chat")
        assert "exit codes:" in helped.stdout

        bad = await trio.to_thread.run_sync(
            lambda: run_cli("chat", "--token", "garbage", "--port", port, env=env)
        )
        expected = "tsmsg: token refused: malformed token (unauthorized)\n"
        assert bad.returncode == 1 and bad.stderr == expected

        token = mint("alice", ["other"])
        refused = await trio.to_thread.run_sync(
            lambda: run_cli("chat", "--token", token, "--port", port, env=env)
        )
        assert refused.returncode == 1 and refused.stderr.startswith("tsmsg: forbidden: ")

        piped = await trio.to_thread.run_sync(
            lambda: run_cli(
                "chat", "--user", "alice", "--port", port, env=server_env(), stdin="hi\n"
            )
        )
        assert piped.returncode == 0, piped.stderr
        assert piped.stdout.startswith(f"-- connecting to 127.0.0.1:{port}\u2026\n")
        assert f"-- alice on 127.0.0.1:{port}" in piped.stdout
        assert f"-- {CH}: no messages" in piped.stdout


# ------------------------------------------------------------------------ tmux

TMUX = shutil.which("tmux")


class Tmux:
    """A private tmux server (its own socket), so no other session is touched."""

    def __init__(self) -> None:
        assert TMUX is not None
        self.base = [TMUX, "-L", f"tsmsg-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"]

    def run(self, *args: str) -> str:
        return subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=WAIT, check=True
        ).stdout

    def new(self, name: str, command: str) -> None:
        self.run("new-session", "-d", "-s", name, "-x", "200", "-y", "50", command)

    def keys(self, name: str, text: str) -> None:
        self.run("send-keys", "-t", name, "-l", text)  # -l: literally, no key names

    def type(self, name: str, text: str) -> None:
        self.keys(name, text)
        self.run("send-keys", "-t", name, "Enter")

    def pane(self, name: str) -> str:
        return self.run("capture-pane", "-p", "-t", name)

    async def wait_for(self, name: str, needle: str) -> str:
        deadline = time.monotonic() + WAIT
        while True:
            text = await trio.to_thread.run_sync(self.pane, name)
            if needle in text:
                return text
            assert time.monotonic() < deadline, f"{needle!r} not in pane {name}:\n{text}"
            await trio.sleep(0.1)

    def kill(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=WAIT, check=False)


@contextmanager
def tmux_server() -> Iterator[Tmux]:
    tmux = Tmux()
    try:
        yield tmux
    finally:
        tmux.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def chat_command(user: str, port: int) -> str:
    """A shell command for a tmux pane: the chat, then its exit code (the pane stays)."""
    env = {"TSMSG_SECRET": SECRET.decode(), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    argv = [sys.executable, "-m", "tsmsg.cli", "chat", "--user", user, "--port", str(port)]
    return f"env {assignments} {shlex.join(argv)}; echo chat-exit=$?; sleep 60"


REPO = Path(__file__).resolve().parent.parent
README_CHAT = re.compile(
    r"^(\.venv/bin/tsmsg chat --user \w+ --secret-file data/dev-secret)$", re.M
)
HINT_CHAT = re.compile(r"^    (\S+ chat --user (\w+) .*)$", re.M)
TEXT_LIMIT = 100  # the walkthrough server's max_text_bytes: a "paste" over it is refused


def walkthrough_dir(tmp_path: Path) -> Path:
    """A directory laid out as the project after `make run`: `.venv` (this virtualenv,
    linked) so that the README's `.venv/bin/tsmsg ...` commands run as printed."""
    home = tmp_path / "project"
    home.mkdir()
    (home / ".venv").symlink_to(sys.prefix)
    return home


async def start_make_run(home: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """What `make run` runs (asked of make itself, the venv taken as built), started in
    ``home`` with PORT (and the web page's WS port) set; returns once it serves."""
    ws = f"127.0.0.1:{free_port()}"
    lines = subprocess.run(
        ["make", "-s", "-n", "-o", ".venv/.tsmsg-installed", "run"],
        cwd=REPO,
        env={**os.environ, "PORT": str(port), "WS": ws},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert any(f"web chat page at http://{ws}/" in line for line in lines), lines
    [printed] = [line for line in lines if line.startswith(".venv/bin/tsmsg serve ")]
    assert "--dev" in printed and f"--ws {ws}" in printed, printed
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSMSG_")}
    env["TSMSG_LIMITS_MAX_TEXT_BYTES"] = str(TEXT_LIMIT)
    with open(log, "wb") as out:
        # exec: the server is the process killed at the end, not a shell that would leave
        # it running (it kept serving after the test, until the machine stopped)
        proc = subprocess.Popen(
            ["sh", "-c", f"exec {printed}"], cwd=home, stdout=out, stderr=out, env=env
        )
    with trio.fail_after(WAIT):
        while "serving on" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            await trio.sleep(0.05)
    return proc


@pytest.mark.skipif(TMUX is None, reason="tmux is not on PATH (needed to drive a terminal)")
async def test_the_readme_walkthrough_in_real_terminals(tmp_path: Path) -> None:
    """README "Quick start", as printed: `make run`, then the two chat commands it prints
    (the README's, plus --port: this server's is not the default), in two tmux terminals;
    alice and bob chat in room-1, then alice opens a DM and bob finds it. Along the way,
    the full-screen UI: status bar, channel list with unread counts, typing shown while
    keys come, Tab completion, /list, the new-messages marker, a too long paste refused
    in one line. Every wait is bounded."""
    home = walkthrough_dir(tmp_path)
    port = free_port()
    readme = (REPO / "README.md").read_text()
    documented = README_CHAT.findall(readme)
    assert len(documented) == 2, documented
    server = await start_make_run(home, port, tmp_path / "server.log")
    try:
        hint = (tmp_path / "server.log").read_text()
        printed = {user: command for command, user in HINT_CHAT.findall(hint)}
        assert sorted(printed) == ["alice", "bob"], hint
        for command in documented:  # the README's commands are the ones printed
            user = command.split("--user ")[1].split()[0]
            assert printed[user] == f"{command} --port {port}"
        with tmux_server() as tmux:
            for user, command in printed.items():
                shell = f"cd {shlex.quote(str(home))} && {command}; echo chat-exit=$?; sleep 60"
                tmux.new(user, shell)
            for user in ("alice", "bob"):
                pane = await tmux.wait_for(user, f"-- {CH}: no messages")
                assert f"{user} @ 127.0.0.1:{port} \u2502 #{CH} \u2502 connected" in pane
                assert f" #{CH}" in pane.splitlines()[1]  # the channel list

            tmux.type("alice", "hello from alice")
            pane = await tmux.wait_for("bob", "alice: hello from alice  [1]")
            assert re.search(r"\u2502\d\d:\d\d alice: hello from alice  \[1\]$", pane, re.M)
            tmux.keys("bob", "hi alice")  # typed, not yet sent: alice sees it transiently
            await tmux.wait_for("alice", "bob is typing\u2026")
            tmux.run("send-keys", "-t", "bob", "Enter")
            await tmux.wait_for("alice", "bob: hi alice  [2]")

            tmux.type("alice", "x" * (TEXT_LIMIT + 1))  # a paste too long: one clear line
            await tmux.wait_for("alice", f"not sent: the message is {TEXT_LIMIT + 1} bytes")

            tmux.type("alice", "/dm bob")
            tmux.type("alice", "psst, just for you")
            await tmux.wait_for("alice", "alice: psst, just for you  [1]")
            await tmux.wait_for("bob", "* new message from alice: /dm alice to read it")
            await tmux.wait_for("bob", "@alice (1)")  # unread, in the channel list
            tmux.keys("bob", "/li")
            tmux.run("send-keys", "-t", "bob", "Tab")  # completes the command
            await tmux.wait_for("bob", "> /list")
            tmux.run("send-keys", "-t", "bob", "Enter", "Enter")  # take it, then send it
            await tmux.wait_for("bob", "dm:alice:bob (with alice): 1 unread")
            tmux.type("bob", "/dm alice")
            pane = await tmux.wait_for("bob", "alice: psst, just for you  [1]")
            assert "---- new messages ----" in pane
            assert "DM with alice" in pane  # the status bar

            for user in ("alice", "bob"):
                tmux.type(user, "/quit")
            for user in ("alice", "bob"):
                await tmux.wait_for(user, "chat-exit=0")
    finally:
        server.kill()
        server.wait(timeout=WAIT)


def test_view_counts_unread_marks_new_messages_and_dates_old_ones() -> None:
    """What the screen shows beside the log: unread counts per channel (seeded from
    list_channels, then kept by events), the marker before the first unread message,
    the date of a message from another day, and /list's lines."""
    today = datetime.fromtimestamp(T0 / 1000, UTC).date()
    view = ChatView("alice", CH, UTC, today=today)
    view.seed(
        [
            ChannelSummary(CH, 3, 1, 2),
            ChannelSummary("dm:alice:bob", 1, 0, 1, False, "bob"),
        ]
    )
    assert view.unread == {CH: 0, "dm:alice:bob": 1} and view.peers == {"dm:alice:bob": "bob"}
    view.apply(Message("dm:alice:bob", 2, "e-2", "bob", T0, "again"), 0)
    view.apply(Message("room-2", 1, "e-1", "carol", T0, "hey"), 0)
    assert view.unread == {CH: 0, "dm:alice:bob": 2, "room-2": 1}
    assert list_lines(view, [ChannelSummary("dm:alice:bob", 2, 0, 2, True, "bob")]) == [
        "-- your channels (1):",
        "   dm:alice:bob (with bob): 2+ unread",
    ]
    yesterday = T0 - 86_400_000
    lines = view.scrollback(
        "dm:alice:bob",
        [
            Message("dm:alice:bob", 1, "e-1", "bob", yesterday, "hi"),
            Message("dm:alice:bob", 2, "e-2", "bob", T0, "again"),
        ],
    )
    assert lines == [
        "-- dm:alice:bob: the last 2 messages",
        NEW_MARKER,
        "2023-11-13 22:13 bob: hi  [1]",
        "22:13 bob: again  [2]",
    ]
    view.switch("dm:alice:bob")
    assert view.unread["dm:alice:bob"] == 0
    # A DM someone opens shows in the list at once, at least 1 unread.
    view.apply(Membership("dm:alice:carol", "carol"), 0)
    assert view.unread["dm:alice:carol"] == 1 and view.peers["dm:alice:carol"] == "carol"


def test_parse_list() -> None:
    assert parse_command("/list") == ListCmd()
