"""The example frames in PROTOCOL.md, checked against the code.

Every ``### Example: <name>`` section of PROTOCOL.md holds a ```json block (the frame) and a
```hex block (its bytes on the wire, ``hexdump -C`` style, length prefix included). For each
one: ``tsmsg.encode(frame)`` must give exactly those bytes, and ``FrameDecoder`` must give the
frame back, keys in the same order. Then a real :class:`Session` on an ``LmdbStore`` (fixed
clock, fixed session id) is driven through the documented session and must produce the
documented server frames: same keys, same order, same values and the same bytes (except an
error's ``message``, which is prose); the presence frames, which the server's hub makes
from the session's ``SetPresence``/``QueryPresence`` actions, are checked against a real
:class:`Server` hub with stand-in connections. Finally the error-code table must list
exactly the codes in ``tsmsg.protocol.errors`` with the right class.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import lmdb
import pytest
import trio
import trio.testing

from conftest import receive
from tsmsg import FrameDecoder, encode
from tsmsg.auth import TokenIssuer, TokenVerifier
from tsmsg.protocol import errors as E
from tsmsg.protocol.limits import Limits
from tsmsg.protocol.session import (
    Close,
    NotifyUser,
    Publish,
    QueryPresence,
    Reply,
    Session,
    SetPresence,
    Submit,
    Subscribe,
    Unsubscribe,
)
from tsmsg.server.app import Connection, Server
from tsmsg.server.settings import Settings
from tsmsg.store import CompactionPolicy, LmdbStore, StoreConfig, WriteOp
from tsmsg.store.lmdb_store import FORMAT_VERSION

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "PROTOCOL.md"
SECRET = b"protocol-examples-secret-protocol-examples"  # >= 32 bytes for HS256
WELCOME_TS = 1_767_225_600_000  # the examples' clock: 2026-01-01T00:00:00Z
STORE_TS = WELCOME_TS + 250  # the store's fixed clock: the ts of every committed entry
SESSION_ID = "1-5f3a9c2e"
WAIT_S = 10.0  # a store write commits well within this
EXAMPLE_STORE_ID = "5f3a9c2e" * 4  # the examples' store: fixes their message ids and epochs
TOKEN_TTL_S = 3600  # the hello's token expires an hour after the hello (as documented)
EXP_MS = (WELCOME_TS // 1000 + TOKEN_TTL_S) * 1000
# The examples the briefs for PROTOCOL.md require, at the least.
REQUIRED = {"hello", "welcome", "send", "ok (send)", "event", "ok (sync)", "resync (reply)"}
REQUIRED |= {
    "typing (push)",
    "presence (set)",
    "ok (presence)",
    "presence (push)",
    "presence (query)",
    "ok (presence query)",
    "unread",
    "ok (unread)",
    "membership (push)",
    "channels",
    "ok (channels)",
    "error (token_expired)",
    "refresh",
    "left",
    "ok (refresh)",
}
REQUIRED |= {"edit", "ok (edit)", "event (edit)", "history", "ok (history)", "delete"}
REQUIRED |= {"ok (delete)", "event (delete)", "ok (sync after the delete)", "read"}
REQUIRED |= {"ok (read)", "read (push)", "leave", "ok (leave)"}
REQUIRED |= {"sync (below the horizon)", "resync (compacted)", "bye"}

HEADING_RE = re.compile(r"^### Example: (.+)$", re.MULTILINE)
FENCE_RE = re.compile(r"^```(json|hex)\n(.*?)\n```$", re.MULTILINE | re.DOTALL)
HEX_LINE_RE = re.compile(r"^(?P<offset>[0-9a-f]{8})  (?P<bytes>[0-9a-f ]+?)\s*\|.*\|$")


def parse_hex(dump: str) -> bytes:
    """The bytes of a ``hexdump -C`` style dump; offsets must follow on from each other."""
    out = bytearray()
    for line in dump.splitlines():
        m = HEX_LINE_RE.match(line)
        assert m is not None, f"not a hex dump line: {line!r}"
        assert int(m["offset"], 16) == len(out), f"offset out of step: {line!r}"
        out += bytes.fromhex(m["bytes"])
    return bytes(out)


def load_examples() -> dict[str, tuple[dict[str, Any], bytes]]:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    examples: dict[str, tuple[dict[str, Any], bytes]] = {}
    headings = list(HEADING_RE.finditer(text))
    for i, heading in enumerate(headings):
        name = heading[1].strip()
        end = headings[i + 1].start() if i + 1 < len(headings) else len(text)
        # The section runs to the next heading of any level.
        section = re.split(r"^#", text[heading.end() : end], maxsplit=1, flags=re.MULTILINE)[0]
        blocks = FENCE_RE.findall(section)
        assert [kind for kind, _ in blocks] == ["json", "hex"], f"example {name!r}: {blocks}"
        assert name not in examples, f"two examples named {name!r}"
        examples[name] = (json.loads(blocks[0][1]), parse_hex(blocks[1][1]))
    return examples


EXAMPLES = load_examples()


def frame(name: str) -> dict[str, Any]:
    return EXAMPLES[name][0]


def ordered(value: Any) -> Any:
    """``value`` with every dict turned into its list of items: comparing two results
    compares key order too (plain dict equality ignores it)."""
    if isinstance(value, dict):
        return [(k, ordered(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [ordered(v) for v in value]
    return value


def assert_documented(actual: dict[str, Any], name: str) -> None:
    """``actual`` is the documented frame ``name``: the same keys in the same order, the same
    values, and the same bytes on the wire (so also the same types: 200.0 is not 200)."""
    doc_frame, wire = EXAMPLES[name]
    assert ordered(actual) == ordered(doc_frame)
    assert encode(actual) == wire


def without_message(f: dict[str, Any]) -> dict[str, Any]:
    """An error frame minus its prose ``message`` (which must still be a non-empty str)."""
    assert isinstance(f.get("message"), str) and f["message"]
    return {k: v for k, v in f.items() if k != "message"}


# ------------------------------------------------------------------- the document


def test_the_required_examples_are_documented() -> None:
    assert REQUIRED <= EXAMPLES.keys()
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_bytes_are_the_encoding_of_the_frame(name: str) -> None:
    doc_frame, wire = EXAMPLES[name]
    assert wire[:4] == (len(wire) - 4).to_bytes(4, "big"), "length prefix"
    assert encode(doc_frame) == wire


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_bytes_decode_to_the_frame(name: str) -> None:
    doc_frame, wire = EXAMPLES[name]
    decoded = FrameDecoder().feed(wire)
    assert decoded == [doc_frame]
    assert ordered(decoded[0]) == ordered(doc_frame)
    # Split anywhere, the stream decodes the same (a client reads TCP in arbitrary chunks).
    decoder = FrameDecoder()
    frames = [f for i in range(len(wire)) for f in decoder.feed(wire[i : i + 1])]
    assert frames == [doc_frame]


def test_error_code_table_matches_errors_py() -> None:
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    section = text.split("## 8. Error codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+?) \|", section, re.MULTILINE)
    documented = {code: cls.strip() for code, cls in rows}
    codes = {v for k, v in vars(E).items() if k.isupper() and isinstance(v, str) and v.islower()}
    assert documented.keys() == codes
    for code, cls in documented.items():
        if code in E.CONNECTION_ERRORS:
            assert cls == "connection", code
        elif code == E.SHUTTING_DOWN:
            assert "bye" in cls
        else:
            assert cls == "request", code


# ------------------------------------------------------------------- the real session


def example_dir(path: Path) -> Path:
    """A new data directory with the examples' store id, so that ids and epochs (keyed
    hashes of it, STORAGE.md) are the documented ones."""
    env = lmdb.open(str(path), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            meta = env.open_db(b"meta", txn=txn)
            txn.put(b"format", str(FORMAT_VERSION).encode(), db=meta)
            txn.put(b"store_id", EXAMPLE_STORE_ID.encode(), db=meta)
    finally:
        env.close()
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LmdbStore]:
    s = LmdbStore(
        example_dir(tmp_path / "db"), StoreConfig(durability="async"), clock=lambda: STORE_TS
    )
    try:
        yield s
    finally:
        s.close()


def hello_session(
    store: LmdbStore, limits: Limits | None = None, user: str = "alice"
) -> tuple[Session, list[Any]]:
    """A session for alice (``room-*``, chat:read + chat:send) after the documented hello,
    with a real token in place of the placeholder."""
    token = TokenIssuer(SECRET).issue(user, ["room-*"], ttl_s=TOKEN_TTL_S, now=WELCOME_TS // 1000)
    session = Session(store, TokenVerifier(SECRET), limits or Limits(), SESSION_ID, WELCOME_TS)
    actions = receive(session, {**frame("hello"), "token": token}, WELCOME_TS)
    return session, actions


def reply(actions: list[Any]) -> dict[str, Any]:
    """The frame of the one Reply among ``actions``."""
    replies = [a for a in actions if isinstance(a, Reply)]
    assert len(replies) == 1, actions
    result: dict[str, Any] = replies[0].frame
    return result


def commit(session: Session, store: LmdbStore, actions: list[Any]) -> list[Any]:
    """Run the session's one submitted write through the store, as the server does."""
    [submit] = actions
    assert isinstance(submit, Submit)
    store.write(submit.op, timeout=WAIT_S)
    return session.write_done(submit.op)


def join(session: Session, store: LmdbStore) -> list[Any]:
    """The documented join; its membership write (``Submit``, no reply) is committed."""
    actions = receive(session, frame("join"), WELCOME_TS)
    [submit] = [a for a in actions if isinstance(a, Submit)]
    assert submit.op.kind == "member" and submit.op.rid is None
    store.write(submit.op, timeout=WAIT_S)
    # A new membership: a notice to every device of the user (section 7.12).
    push = {"t": "membership", "channel": "room-1", "by": "alice"}
    assert session.write_done(submit.op) == [NotifyUser("alice", push)]
    return actions


def test_session_produces_the_documented_frames(store: LmdbStore) -> None:
    session, actions = hello_session(store)
    assert_documented(reply(actions), "welcome")
    assert actions[1:] == [SetPresence(None)]  # a device connected (the hub's business)

    actions = join(session, store)
    assert actions[0] == Subscribe("room-1")
    assert_documented(reply(actions), "ok (join)")

    actions = commit(session, store, receive(session, frame("send"), WELCOME_TS))
    assert_documented(reply(actions), "ok (send)")
    # The ok is queued before the event (PROTOCOL.md section 9, rule 6).
    assert [type(a) for a in actions] == [Reply, Publish]
    publish = actions[1]
    assert publish.channel == "room-1" and publish.skip_user is None
    assert_documented(publish.frame, "event")

    forbidden = {"t": "send", "rid": 4, "channel": "general", "cid": "x", "text": "hi"}
    error = reply(receive(session, forbidden, WELCOME_TS))
    assert ordered(without_message(error)) == ordered(without_message(frame("error (forbidden)")))

    actions = receive(session, frame("sync"), WELCOME_TS)
    assert_documented(reply(actions), "ok (sync)")

    too_new = {"t": "sync", "rid": 6, "channel": "room-1", "since": 7}
    actions = receive(session, too_new, WELCOME_TS)
    assert_documented(reply(actions), "resync (reply)")
    # Without a rid the reply has none either; its reason still tells it from the cut push.
    without_rid = {k: v for k, v in too_new.items() if k != "rid"}
    expected = {k: v for k, v in frame("resync (reply)").items() if k != "rid"}
    assert ordered(reply(receive(session, without_rid, WELCOME_TS))) == ordered(expected)

    actions = receive(session, frame("sync (epoch)"), WELCOME_TS)
    assert_documented(reply(actions), "resync (epoch)")
    # The same position without `epoch` looks valid: only the epoch reveals the reset.
    no_epoch = {k: v for k, v in frame("sync (epoch)").items() if k != "epoch"}
    ok = reply(receive(session, no_epoch, WELCOME_TS))
    assert ok["t"] == "ok" and ok["events"] == [] and ok["more"] is False

    push = session.cut_stream("room-1", store.channel("room-1"))
    assert_documented(push, "resync (push)")

    assert_documented(reply(receive(session, frame("ping"), WELCOME_TS)), "pong")
    # A nil rid is no rid (PROTOCOL.md section 2).
    pong = reply(receive(session, {"t": "ping", "rid": None}, WELCOME_TS))
    assert ordered(pong) == ordered({"t": "pong", "ts": WELCOME_TS})

    # typing: an ok without fields, and a push to the other users' connections.
    actions = receive(session, frame("typing"), WELCOME_TS)
    assert ordered(reply(actions)) == ordered({"t": "ok", "rid": 10})
    [push] = [a for a in actions if isinstance(a, Publish)]
    assert push.channel == "room-1" and push.skip_user == "alice"
    assert_documented(push.frame, "typing (push)")
    # Not renewed, it expires after typing_timeout_ms: the same push with on: false.
    timeout = Limits().typing_timeout_ms
    assert session.tick(WELCOME_TS + timeout - 1) == []
    [expired] = session.tick(WELCOME_TS + timeout)
    assert isinstance(expired, Publish) and expired.skip_user == "alice"
    assert ordered(expired.frame) == ordered({**frame("typing (push)"), "on": False})
    # An off that is not on pushes nothing.
    assert receive(session, {"t": "typing", "channel": "room-1", "on": False}, 0) == []

    # presence: the session answers a set and hands both forms to the hub (next test).
    actions = receive(session, frame("presence (set)"), WELCOME_TS)
    assert actions[0] == SetPresence("away")
    assert_documented(reply(actions), "ok (presence)")
    actions = receive(session, frame("presence (query)"), WELCOME_TS)
    assert actions == [QueryPresence(12, ["bob", "carol", "dave"])]

    # unread: bob has written one message in room-1 meanwhile.
    store.write(WriteOp("message", "room-1", "bob", cid="b-1", text="hello"), timeout=WAIT_S)
    assert_documented(reply(receive(session, frame("unread"), WELCOME_TS)), "ok (unread)")

    # bob writes to alice in their DM: once committed, alice becomes a member and her
    # devices are told; then her channel list shows the DM.
    bob, _ = hello_session(store, user="bob")
    dm = {"t": "send", "rid": 1, "channel": "dm:alice:bob", "cid": "b-2", "text": "psst"}
    [_, _, record] = commit(bob, store, receive(bob, dm, WELCOME_TS))
    assert isinstance(record, Submit) and record.op.user == "alice"
    [notice] = commit(bob, store, [record])
    assert isinstance(notice, NotifyUser) and notice.user == "alice"
    assert_documented(notice.frame, "membership (push)")
    assert_documented(reply(receive(session, frame("channels"), WELCOME_TS)), "ok (channels)")
    # bob's second message records nothing more: an ok and the event.
    assert len(commit(bob, store, receive(bob, {**dm, "cid": "b-3"}, WELCOME_TS))) == 2

    # An hour later (alice pinged all along) the token expires: the notice, not fatal.
    assert session.claims is not None and session.claims.exp * 1000 == EXP_MS
    receive(session, {"t": "ping"}, EXP_MS - 1)
    assert session.next_deadline() == EXP_MS
    [notice] = session.tick(EXP_MS)
    assert isinstance(notice, Reply)
    expected = without_message(frame("error (token_expired)"))
    assert ordered(without_message(notice.frame)) == ordered(expected)
    assert expected["refresh_within_ms"] == Limits().refresh_grace_ms
    # Meanwhile requests other than refresh and ping are refused, the connection stays.
    refused = receive(session, {"t": "sync", "rid": 99, "channel": "room-1", "since": 0}, EXP_MS)
    assert ordered(without_message(reply(refused))) == ordered(
        {"t": "error", "rid": 99, "code": "token_expired"}
    )
    assert not any(isinstance(a, Close) for a in refused)

    # refresh with a token that allows room-2 only: room-1 is left, then the ok.
    token = TokenIssuer(SECRET).issue("alice", ["room-2"], ttl_s=TOKEN_TTL_S, now=EXP_MS // 1000)
    actions = receive(session, {**frame("refresh"), "token": token}, EXP_MS + 1000)
    assert [type(a) for a in actions] == [Unsubscribe, Reply, Reply]
    assert actions[0] == Unsubscribe("room-1") and "room-1" not in session.joined
    assert_documented(actions[1].frame, "left")
    assert_documented(actions[2].frame, "ok (refresh)")
    assert session.tick(EXP_MS + 1000 + Limits().refresh_grace_ms) == []  # refreshed: no close


def test_edits_deletes_history_and_reads_produce_the_documented_frames(store: LmdbStore) -> None:
    """The second session of examples: edit, history, delete, a sync after the delete,
    read and leave, on a fresh store where alice has sent "hi" (seq 1)."""
    session, _ = hello_session(store)
    join(session, store)
    commit(session, store, receive(session, frame("send"), WELCOME_TS))

    def write(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The documented request committed: its ok, and the push to the channel."""
        actions = commit(session, store, receive(session, frame(name), WELCOME_TS))
        assert [type(a) for a in actions] == [Reply, Publish]
        assert actions[1].channel == "room-1" and actions[1].skip_user is None
        return actions[0].frame, actions[1].frame

    ok, event = write("edit")
    assert_documented(ok, "ok (edit)")
    assert_documented(event, "event (edit)")
    assert_documented(reply(receive(session, frame("history"), WELCOME_TS)), "ok (history)")
    ok, event = write("delete")
    assert_documented(ok, "ok (delete)")
    assert_documented(event, "event (delete)")
    actions = receive(session, frame("sync (after the delete)"), WELCOME_TS)
    assert_documented(reply(actions), "ok (sync after the delete)")
    ok, push = write("read")
    assert_documented(ok, "ok (read)")
    assert_documented(push, "read (push)")
    actions = receive(session, frame("leave"), WELCOME_TS)
    assert actions[0] == Unsubscribe("room-1") and "room-1" not in session.joined
    assert_documented(reply(actions), "ok (leave)")


def test_a_sync_below_the_horizon_is_the_documented_resync(tmp_path: Path) -> None:
    policy = CompactionPolicy(keep_recent=1)
    config = StoreConfig(durability="async", compaction=policy)
    store = LmdbStore(example_dir(tmp_path / "db"), config, clock=lambda: STORE_TS)
    try:
        for i in range(3):
            store.write(WriteOp("message", "room-1", "bob", cid=f"b-{i}", text="x"), timeout=WAIT_S)
        store.compact("room-1")
        assert store.channel("room-1").horizon == 2
        session, _ = hello_session(store)
        actions = receive(session, frame("sync (below the horizon)"), WELCOME_TS)
        assert_documented(reply(actions), "resync (compacted)")
    finally:
        store.close()


async def test_the_server_says_the_documented_bye(store: LmdbStore) -> None:
    """At a stop, once no write is in flight: bye on every connection, then the close."""
    server = Server(Settings(), TokenVerifier(SECRET))
    alice = connection(server, store, "alice")
    stopped: list[bool] = []
    await server.shutdown(lambda: stopped.append(True))
    [bye] = frames_of(alice)
    assert_documented(bye, "bye")
    assert alice.closing == "server shutdown" and stopped == [True]


def test_an_unrefreshed_token_closes_the_connection(store: LmdbStore) -> None:
    session, _ = hello_session(store)
    receive(session, {"t": "ping"}, EXP_MS - 1)  # not idle
    [notice] = session.tick(EXP_MS)
    grace = notice.frame["refresh_within_ms"]
    assert session.tick(EXP_MS + grace - 1) == []
    final, close = session.tick(EXP_MS + grace)
    assert isinstance(final, Reply) and isinstance(close, Close)
    assert ordered(without_message(final.frame)) == ordered({"t": "error", "code": "token_expired"})


def connection(server: Server, store: LmdbStore, user: str) -> Connection:
    """A real connection of ``user`` (past hello, ``room-*``) on a memory stream, as the
    hub sees it: its output is read back with :func:`frames_of`."""
    session, _ = hello_session(store, user=user)
    stream, _ = trio.testing.memory_stream_pair()
    conn = Connection(server, stream, session, f"{user}:1", len(server.connections) + 1)
    server.connections[session] = conn
    return conn


def frames_of(conn: Connection) -> list[dict[str, Any]]:
    """The frames queued for ``conn`` since the last call."""
    data = b"".join(d for d, _ in conn.queue)
    conn.queue.clear()
    conn.queued_bytes = 0
    return FrameDecoder().feed(data)


async def test_the_hub_produces_the_documented_presence_frames(
    store: LmdbStore, mock_clock: trio.testing.MockClock
) -> None:
    server = Server(Settings(), TokenVerifier(SECRET))
    server.store = store
    server._clock_base = (STORE_TS, trio.current_time())  # now_ms(): STORE_TS (clock stopped)
    session, hello = hello_session(store)
    join(session, store)  # alice is a member of room-1
    for user, channel in (("bob", "room-1"), ("carol", "room-1"), ("dave", "room-9")):
        store.write(WriteOp("member", channel, user), timeout=WAIT_S)
    store.write(WriteOp("seen", "", "carol"), timeout=WAIT_S)  # carol left at STORE_TS
    alice, alice2, bob = (connection(server, store, u) for u in ("alice", "alice", "bob"))
    server.members["room-1"] = {bob}  # bob is joined to room-1

    def perform(conn: Connection, actions: list[Any]) -> None:
        read = server.perform(conn, actions)
        while read is not None:  # the server's own reads (memberships), inline
            read = server.perform(conn, read.then(read.query()))

    perform(bob, [SetPresence(None)])  # bob's device connects: online
    perform(alice, [a for a in hello if isinstance(a, SetPresence)])
    online = {"t": "presence", "user": "alice", "status": "online", "ts": STORE_TS}
    assert ordered(frames_of(bob)) == ordered(
        [{"t": "presence", "user": "bob", "status": "online", "ts": STORE_TS}, online]
    )
    perform(alice2, [SetPresence(None)])  # a second device of alice: no change, no push
    assert frames_of(bob) == []

    perform(alice, receive(session, frame("presence (set)"), WELCOME_TS))
    assert_documented(frames_of(alice)[-1], "ok (presence)")
    [push] = frames_of(bob)
    assert_documented(push, "presence (push)")
    perform(alice2, [SetPresence("away")])  # the same status again: no push
    assert frames_of(bob) == []

    perform(alice, receive(session, frame("presence (query)"), WELCOME_TS))
    assert_documented(frames_of(alice)[-1], "ok (presence query)")


def test_rate_limited_error_is_the_documented_frame(store: LmdbStore) -> None:
    # A bucket of one frame: the second ping in the same millisecond finds it empty.
    session, _ = hello_session(store, replace(Limits(), frame_burst=1))
    assert_documented(reply(receive(session, frame("ping"), WELCOME_TS)), "pong")
    error = reply(receive(session, {"t": "ping", "rid": 9}, WELCOME_TS))
    doc = frame("error (rate_limited)")
    assert ordered(without_message(error)) == ordered(without_message(doc))
