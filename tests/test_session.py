"""The sans-IO protocol core (``tsmsg.protocol.session``), with plain calls.

No trio and no sockets: a test builds a :class:`Session` on a real ``LmdbStore`` in a tmp
dir (fixed clock, so every ``ts`` is known), feeds it decoded frames with an explicit
``now_ms`` and compares the returned actions exactly. Writes the session submits are run
through the store with the blocking ``store.write`` and handed back with ``write_done``,
as the server does after a group commit. Error frames are compared field by field except
for ``message``, which is prose (it must be a non-empty string). Timers (idle peers, token
expiry, typing expiry) are driven the same way: ``tick(now_ms)`` at chosen instants, with
``next_deadline()`` checked against them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import receive
from tsmsg import DEFAULT_MAX_DEPTH, encode
from tsmsg._native import (
    FrameError,
    FrameTooLarge,
    InvalidMsgpack,
    NotAMap,
    TooDeep,
    packb,
)
from tsmsg.auth import SCOPE_MODERATE, SCOPE_READ, SCOPE_SEND, TokenIssuer, TokenVerifier
from tsmsg.protocol import errors as E
from tsmsg.protocol.limits import Limits
from tsmsg.protocol.ratelimit import UserLimits
from tsmsg.protocol.session import (
    META_PAGE_DEPTH,
    Action,
    Close,
    NotifyUser,
    Position,
    Publish,
    QueryPresence,
    Reply,
    Session,
    SetPresence,
    State,
    Submit,
    Subscribe,
    Unsubscribe,
    without_unsendable_meta,
)
from tsmsg.store import (
    AppendResult,
    CompactionPolicy,
    LmdbStore,
    StoreConfig,
    StoreError,
    StoreUnavailable,
    WriteOp,
)
from tsmsg.store.crypto import EncryptionError

SECRET = b"session-test-secret-session-test-secret"  # >= 32 bytes: pyjwt warns on short keys
OTHER_SECRET = b"another-secret-another-secret-another!!"
NOW_S = 1_700_000_000  # the "current time" every test passes in
NOW_MS = NOW_S * 1000
STORE_TS = NOW_MS + 123  # the store's fixed clock: the ts of every committed entry
WAIT_S = 10.0  # a store write commits well within this
ROOM = "room-1"
RW = (SCOPE_READ, SCOPE_SEND)
MOD = (SCOPE_READ, SCOPE_SEND, SCOPE_MODERATE)
VERIFIER = TokenVerifier(SECRET)
ISSUER = TokenIssuer(SECRET)
# Every code errors.py documents (module-level snake_case string constants).
ERROR_CODES = frozenset(
    v for k, v in vars(E).items() if k.isupper() and isinstance(v, str) and v.islower()
)
ACTION_TYPES = (
    NotifyUser,
    Reply,
    Close,
    Submit,
    Subscribe,
    Unsubscribe,
    Position,
    Publish,
    SetPresence,
    QueryPresence,
)


# ------------------------------------------------------------------- helpers


def open_store(path: Path | str, **config: Any) -> LmdbStore:
    # async durability: no fsync per commit; these tests never cut the power.
    return LmdbStore(path, StoreConfig(durability="async", **config), clock=lambda: STORE_TS)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LmdbStore]:
    s = open_store(tmp_path / "db")
    yield s
    s.close()


def token(
    user: str = "alice",
    channels: tuple[str, ...] = ("room-*",),
    scopes: tuple[str, ...] = RW,
    ttl_s: int = 3600,
) -> str:
    return ISSUER.issue(user, channels, scopes, ttl_s, now=NOW_S)


def new_session(
    store: LmdbStore,
    limits: Limits | None = None,
    sid: str = "s-1",
    user_limits: UserLimits | None = None,
) -> Session:
    return Session(store, VERIFIER, limits or Limits(), sid, NOW_MS, user_limits)


def connect(
    store: LmdbStore,
    user: str = "alice",
    *,
    channels: tuple[str, ...] = ("room-*",),
    scopes: tuple[str, ...] = RW,
    limits: Limits | None = None,
    sid: str = "s-1",
    ttl_s: int = 3600,
    user_limits: UserLimits | None = None,
) -> Session:
    """A session past hello."""
    session = new_session(store, limits, sid, user_limits)
    actions = receive(
        session, {"t": "hello", "v": 1, "token": token(user, channels, scopes, ttl_s)}, NOW_MS
    )
    assert len(actions) == 2 and isinstance(actions[0], Reply), actions
    assert actions[0].frame["t"] == "welcome", actions
    assert actions[1] == SetPresence(None)  # this device is online
    assert session.state is State.READY
    return session


def call(session: Session, t: str, now_ms: int = NOW_MS, **fields: Any) -> list[Action]:
    return receive(session, {"t": t, **fields}, now_ms)


def expect_error(
    actions: list[Action],
    code: str,
    *,
    rid: int | None = None,
    fatal: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """``actions`` is exactly the error reply (and ``Close`` if ``fatal``)."""
    assert len(actions) == (2 if fatal else 1), actions
    assert isinstance(actions[0], Reply), actions
    frame = actions[0].frame
    message = frame.get("message")
    assert isinstance(message, str) and message, frame
    expected = {"t": "error", "code": code, "message": message, **extra}
    if rid is not None:
        expected["rid"] = rid
    assert frame == expected
    if fatal:
        assert isinstance(actions[1], Close)
        assert actions[1].reason.startswith(code), actions[1]
    return frame


def expect_closed(session: Session) -> None:
    """A closed session refuses every further frame, even a perfect hello."""
    assert session.state is State.CLOSED
    assert receive(session, {"t": "ping", "rid": 1}, NOW_MS) == []
    assert receive(session, {"t": "hello", "v": 1, "token": token()}, NOW_MS) == []
    assert session.state is State.CLOSED


def only_submit(actions: list[Action]) -> WriteOp:
    assert len(actions) == 1 and isinstance(actions[0], Submit), actions
    return actions[0].op


def commit(store: LmdbStore, op: WriteOp) -> WriteOp:
    """Run ``op`` through the store as the server's writer would; a refused op keeps its
    ``error`` (``store.write`` raises it too)."""
    try:
        store.write(op, timeout=WAIT_S)
    except StoreError:
        assert op.error is not None
    return op


def done(store: LmdbStore, actions: list[Action]) -> list[Action]:
    """Commit the single ``Submit`` in ``actions`` and return its ``write_done`` actions."""
    op = commit(store, only_submit(actions))
    session = op.origin
    assert isinstance(session, Session)
    return session.write_done(op)


def ok(rid: int, **fields: Any) -> Reply:
    return Reply({"t": "ok", "rid": rid, **fields})


def member(session: Session, channel: str) -> Submit:
    """The fire-and-forget membership record a ``join`` submits (no rid: nothing answers),
    bounded in the store by max_memberships (joins of other devices may be in flight)."""
    op = WriteOp("member", channel, session.user, most=session.limits.max_memberships)
    op.origin = session
    return Submit(op)


def event(channel: str, **fields: Any) -> dict[str, Any]:
    return {"t": "event", "channel": channel, **fields}


def send(
    store: LmdbStore, session: Session, text: str, cid: str, rid: int = 1, channel: str = ROOM
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A committed send: its ``ok`` frame and its published ``event`` frame."""
    actions = done(store, call(session, "send", rid=rid, channel=channel, cid=cid, text=text))
    assert len(actions) == 2 and isinstance(actions[0], Reply), actions
    assert isinstance(actions[1], Publish), actions
    return actions[0].frame, actions[1].frame


def meta_reaching(depth: int) -> dict[str, Any]:
    """A meta map whose deepest container is at ``depth`` in its send frame (the send's
    map is depth 1, meta's depth 2)."""
    value: Any = 1
    for _ in range(depth - 2):
        value = [value]
    return {"k": value}


def meta_of_size(size: int) -> dict[str, str]:
    """A meta map whose msgpack encoding is exactly ``size`` bytes (size >= 262)."""
    meta = {"k": "x" * (size - 6)}  # fixmap(1) + fixstr "k"(2) + str16 header(3)
    assert len(packb(meta)) == size
    return meta


def encoded_size(frame: dict[str, Any]) -> int:
    return len(encode(frame)) - 4  # the body, without the 4-byte length header


# ------------------------------------------------------------------- states and hello


def test_new_session_awaits_hello(store: LmdbStore) -> None:
    session = new_session(store)
    assert session.state is State.AWAITING_HELLO
    assert session.joined == set() and session.cut == set()
    assert session.claims is None


def test_hello_answers_welcome_with_rid(store: LmdbStore) -> None:
    limits = Limits(heartbeat_ms=15_000, max_frame=65_536)
    session = new_session(store, limits, sid="abc-7")
    actions = receive(
        session, {"t": "hello", "v": 1, "token": token("alice"), "rid": 42}, NOW_MS + 5
    )
    assert actions == [
        Reply(
            {
                "t": "welcome",
                "rid": 42,
                "v": 1,
                "user": "alice",
                "session": "abc-7",
                "heartbeat_ms": 15_000,
                "max_frame": 65_536,
                "limits": limits.announce(),
                "ts": NOW_MS + 5,
            }
        ),
        SetPresence(None),  # the server decides whether this is the user's first device
    ]
    assert session.state is State.READY
    assert session.user == "alice"


def test_hello_without_rid_has_no_rid_in_welcome(store: LmdbStore) -> None:
    session = new_session(store)
    [reply, presence] = receive(session, {"t": "hello", "v": 1, "token": token("bob")}, NOW_MS)
    assert presence == SetPresence(None)
    assert isinstance(reply, Reply)
    assert reply.frame["t"] == "welcome" and "rid" not in reply.frame
    assert reply.frame["user"] == "bob"
    assert session.state is State.READY


@pytest.mark.parametrize("v", [None, 0, 2, -1, True, False, "1", [1], {"v": 1}], ids=repr)
def test_hello_wrong_version_is_a_connection_error(store: LmdbStore, v: Any) -> None:
    session = new_session(store)
    hello = {"t": "hello", "token": token(), "rid": 3}
    if v is not None:
        hello["v"] = v
    expect_error(receive(session, hello, NOW_MS), E.UNSUPPORTED_VERSION, rid=3, fatal=True)
    expect_closed(session)


@pytest.mark.parametrize("tok", [None, 123, b"a.b.c", ["x"], {"jwt": "x"}, True], ids=repr)
def test_hello_missing_or_non_string_token(store: LmdbStore, tok: Any) -> None:
    session = new_session(store)
    hello: dict[str, Any] = {"t": "hello", "v": 1, "rid": 1}
    if tok is not None:
        hello["token"] = tok
    expect_error(receive(session, hello, NOW_MS), E.UNAUTHORIZED, rid=1, fatal=True)
    expect_closed(session)


@pytest.mark.parametrize(
    "tok",
    [
        "",
        "not-a-jwt",
        "a.b.c",
        TokenIssuer(OTHER_SECRET).issue("alice", ["*"], RW, 3600, now=NOW_S),
        token()[:-3] + "AAA",
    ],
    ids=["empty", "garbage", "three-parts", "other-secret", "bad-signature"],
)
def test_hello_bad_token(store: LmdbStore, tok: str) -> None:
    session = new_session(store)
    hello = {"t": "hello", "v": 1, "token": tok, "rid": 9}
    expect_error(receive(session, hello, NOW_MS), E.UNAUTHORIZED, rid=9, fatal=True)
    expect_closed(session)
    assert session.claims is None


@pytest.mark.parametrize(
    ("now_ms", "accepted"),
    [
        (NOW_MS, True),
        (NOW_MS + 9_999, True),  # exp = now + 10 s; the last ms before it
        (NOW_MS + 10_000, False),
        (NOW_MS + 3_600_000, False),
    ],
)
def test_hello_token_expiry_uses_the_passed_in_time(
    store: LmdbStore, now_ms: int, accepted: bool
) -> None:
    session = Session(store, VERIFIER, Limits(), "s", now_ms)
    hello = {"t": "hello", "v": 1, "token": token(ttl_s=10), "rid": 1}
    actions = receive(session, hello, now_ms)
    if accepted:
        assert isinstance(actions[0], Reply) and actions[0].frame["t"] == "welcome"
        assert session.state is State.READY
    else:
        expect_error(actions, E.TOKEN_EXPIRED, rid=1, fatal=True)
        expect_closed(session)


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "join", "rid": 4, "channel": ROOM},
        {"t": "ping", "rid": 4},
        {"t": "welcome", "rid": 4},
        {"t": "nonsense", "rid": 4},
    ],
    ids=lambda f: f["t"],
)
def test_first_frame_not_hello(store: LmdbStore, frame: dict[str, Any]) -> None:
    session = new_session(store)
    expect_error(receive(session, frame, NOW_MS), E.HELLO_REQUIRED, rid=4, fatal=True)
    expect_closed(session)


def test_first_frame_not_hello_without_rid(store: LmdbStore) -> None:
    session = new_session(store)
    expect_error(receive(session, {"t": "ping"}, NOW_MS), E.HELLO_REQUIRED, fatal=True)
    expect_closed(session)


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "join", "rid": "x", "channel": ROOM},
        {"t": "hello", "v": 1, "token": "not-a-jwt", "rid": 1.5},
    ],
    ids=["join", "hello"],
)
def test_first_frame_with_bad_rid_is_still_a_connection_error(
    store: LmdbStore, frame: dict[str, Any]
) -> None:
    session = new_session(store)
    actions = receive(session, frame, NOW_MS)
    assert len(actions) == 2 and isinstance(actions[1], Close), actions
    assert session.state is State.CLOSED
    if frame["t"] != "hello":
        expect_error(actions, E.HELLO_REQUIRED, fatal=True)


def test_hello_with_bad_rid_and_good_token_does_not_authenticate(store: LmdbStore) -> None:
    # Whatever else happens, a hello that was refused never makes the session READY.
    session = new_session(store)
    actions = receive(session, {"t": "hello", "v": 1, "token": token(), "rid": "1"}, NOW_MS)
    assert isinstance(actions[0], Reply) and actions[0].frame["t"] == "error"
    assert actions[0].frame["code"] == E.BAD_REQUEST
    assert "rid" not in actions[0].frame
    assert session.state is not State.READY and session.claims is None


@pytest.mark.parametrize("ready", [False, True], ids=["awaiting-hello", "ready"])
@pytest.mark.parametrize(
    "frame",
    [{"rid": 5}, {"t": None, "rid": 5}, {"t": 1, "rid": 5}, {"t": b"ping", "rid": 5}],
    ids=["no-t", "t-none", "t-int", "t-bytes"],
)
def test_frame_without_string_t_is_bad_frame(
    store: LmdbStore, ready: bool, frame: dict[str, Any]
) -> None:
    session = connect(store) if ready else new_session(store)
    expect_error(receive(session, frame, NOW_MS), E.BAD_FRAME, rid=5, fatal=True)
    expect_closed(session)


def test_frame_without_t_and_without_rid(store: LmdbStore) -> None:
    session = connect(store)
    expect_error(receive(session, {"channel": ROOM}, NOW_MS), E.BAD_FRAME, fatal=True)
    expect_closed(session)


@pytest.mark.parametrize(
    "rid",
    ["1", 1.0, 1.5, True, False, [1], {"r": 1}, b"\x01", 2**63, 2**64 - 1, -(2**63) - 1],
    ids=repr,
)
def test_bad_rid_is_a_request_error_without_rid(store: LmdbStore, rid: Any) -> None:
    session = connect(store)
    expect_error(call(session, "ping", rid=rid), E.BAD_REQUEST)
    assert session.state is State.READY
    assert call(session, "ping", rid=1) == [Reply({"t": "pong", "ts": NOW_MS, "rid": 1})]


def test_nil_rid_is_absent(store: LmdbStore) -> None:
    session = connect(store)
    assert call(session, "ping", rid=None) == [Reply({"t": "pong", "ts": NOW_MS})]


@pytest.mark.parametrize("rid", [0, -1, 1, 2**31, 2**63 - 1, -(2**63) + 1], ids=repr)
def test_rid_range_is_echoed(store: LmdbStore, rid: int) -> None:
    session = connect(store)
    assert call(session, "ping", rid=rid) == [Reply({"t": "pong", "ts": NOW_MS, "rid": rid})]


def test_rid_int64_min_is_valid(store: LmdbStore) -> None:
    session = connect(store)
    rid = -(2**63)
    assert call(session, "ping", rid=rid) == [Reply({"t": "pong", "ts": NOW_MS, "rid": rid})]


def test_ping_without_rid(store: LmdbStore) -> None:
    session = connect(store)
    assert call(session, "ping", NOW_MS + 77) == [Reply({"t": "pong", "ts": NOW_MS + 77})]


def test_unknown_type_is_a_request_error(store: LmdbStore) -> None:
    session = connect(store)
    expect_error(call(session, "subscribe", rid=3, channel=ROOM), E.UNKNOWN_TYPE, rid=3)
    frame = expect_error(call(session, "x" * 10_000, rid=4), E.UNKNOWN_TYPE, rid=4)
    assert len(frame["message"]) < 100  # the echoed type is truncated
    expect_error(call(session, "welcome"), E.UNKNOWN_TYPE)
    assert session.state is State.READY


def test_second_hello_is_a_request_error(store: LmdbStore) -> None:
    session = connect(store)
    expect_error(call(session, "hello", rid=2, v=1, token=token("bob")), E.BAD_REQUEST, rid=2)
    assert session.state is State.READY
    assert session.user == "alice"


def test_closed_by_the_server(store: LmdbStore) -> None:
    session = connect(store)
    assert session.closed("peer closed the connection") == []  # nothing was typing
    assert session.close_reason == "peer closed the connection"
    expect_closed(session)
    session.closed("later")  # the first reason stays
    assert session.close_reason == "peer closed the connection"


def test_closed_after_a_connection_error_keeps_its_reason(store: LmdbStore) -> None:
    session = connect(store)
    expect_error(receive(session, {"rid": 1}, NOW_MS), E.BAD_FRAME, rid=1, fatal=True)
    reason = session.close_reason
    assert reason is not None and reason.startswith(E.BAD_FRAME)
    session.closed("peer closed the connection")
    assert session.close_reason == reason


@pytest.mark.parametrize("ready", [False, True], ids=["awaiting-hello", "ready"])
@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (FrameTooLarge("frame length 2000000 is over max_frame 1048576"), E.FRAME_TOO_LARGE),
        (InvalidMsgpack("invalid msgpack at byte 3"), E.BAD_FRAME),
        (NotAMap("frame body is not a map"), E.BAD_FRAME),
        (TooDeep("nesting deeper than max_depth 32 at byte 40"), E.BAD_FRAME),
        (FrameError("some decode failure"), E.BAD_FRAME),
    ],
    ids=["too-large", "msgpack", "not-map", "too-deep", "base"],
)
def test_frame_error_is_a_connection_error(
    store: LmdbStore, ready: bool, exc: FrameError, code: str
) -> None:
    session = connect(store) if ready else new_session(store)
    actions = session.frame_error(exc)
    frame = expect_error(actions, code, fatal=True)
    assert frame["message"] == str(exc)  # names the limit or the offset
    expect_closed(session)


def test_hello_timeout_is_a_connection_error(store: LmdbStore) -> None:
    session = new_session(store)
    expect_error(session.timed_out(E.HELLO_TIMEOUT), E.HELLO_TIMEOUT, fatal=True)
    expect_closed(session)


# ------------------------------------------------------------------- field validation


BAD_CHANNELS = [None, 5, True, b"room-1", ["room-1"], "", "room 1", "x" * 129, "röom", "room/1"]


@pytest.mark.parametrize(
    "t", ["join", "send", "edit", "delete", "history", "sync", "read", "typing"]
)
@pytest.mark.parametrize("channel", BAD_CHANNELS, ids=repr)
def test_invalid_channel_is_bad_request(store: LmdbStore, t: str, channel: Any) -> None:
    session = connect(store, channels=("*",))
    frame: dict[str, Any] = {
        "t": t,
        "rid": 8,
        "cid": "c",
        "text": "x",
        "id": "1-1",
        "since": 0,
        "seq": 1,
        "on": True,
    }
    if channel is not None:
        frame["channel"] = channel
    expect_error(receive(session, frame, NOW_MS), E.BAD_REQUEST, rid=8)
    assert session.state is State.READY and store.channels() == []


@pytest.mark.parametrize("channel", [None, 5, b"room-1"], ids=repr)
def test_leave_needs_a_channel_string(store: LmdbStore, channel: Any) -> None:
    session = connect(store)
    frame: dict[str, Any] = {"t": "leave", "rid": 2}
    if channel is not None:
        frame["channel"] = channel
    expect_error(receive(session, frame, NOW_MS), E.BAD_REQUEST, rid=2)


SEND = {"channel": ROOM, "cid": "c-1", "text": "hi"}


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"cid": None}, E.BAD_REQUEST),
        ({"cid": ""}, E.BAD_REQUEST),
        ({"cid": 7}, E.BAD_REQUEST),
        ({"cid": True}, E.BAD_REQUEST),
        ({"cid": b"c-1"}, E.BAD_REQUEST),
        ({"cid": "c" * 65}, E.BAD_REQUEST),
        ({"text": None}, E.BAD_REQUEST),
        ({"text": 5}, E.BAD_REQUEST),
        ({"text": b"hi"}, E.BAD_REQUEST),
        ({"text": ["hi"]}, E.BAD_REQUEST),
        ({"text": "x" * (16 * 1024 + 1)}, E.LIMIT_EXCEEDED),
        ({"text": "é" * (8 * 1024) + "x"}, E.LIMIT_EXCEEDED),  # 16385 bytes of UTF-8
        ({"meta": "x"}, E.BAD_REQUEST),
        ({"meta": [1, 2]}, E.BAD_REQUEST),
        ({"meta": 1}, E.BAD_REQUEST),
        ({"meta": meta_of_size(4 * 1024 + 1)}, E.LIMIT_EXCEEDED),
        # A page carries meta two levels deeper than the send (PROTOCOL.md 6.4).
        ({"meta": meta_reaching(DEFAULT_MAX_DEPTH - 1)}, E.LIMIT_EXCEEDED),
        ({"meta": meta_reaching(DEFAULT_MAX_DEPTH)}, E.LIMIT_EXCEEDED),
        ({"meta": {"a": [{"f": float("nan")}]}}, E.BAD_REQUEST),  # JSON has no NaN
        ({"meta": {"f": float("inf")}}, E.BAD_REQUEST),
        ({"meta": {"f": -float("inf")}}, E.BAD_REQUEST),
    ],
    ids=lambda c: repr(c)[:40] if isinstance(c, dict) else c,
)
def test_send_field_validation(store: LmdbStore, change: dict[str, Any], code: str) -> None:
    session = connect(store)
    frame = {"t": "send", "rid": 5, **SEND, **change}
    frame = {k: v for k, v in frame.items() if v is not None}
    expect_error(receive(session, frame, NOW_MS), code, rid=5)
    assert store.channels() == []


@pytest.mark.parametrize(
    "change",
    [
        {"cid": "c"},
        {"cid": "c" * 64},
        {"text": ""},
        {"text": "x" * (16 * 1024)},
        {"text": "é" * (8 * 1024)},  # exactly 16384 bytes of UTF-8
        {"meta": meta_of_size(4 * 1024)},
        {"meta": None},
        {"meta": {}},
        {"meta": meta_reaching(DEFAULT_MAX_DEPTH - 2)},
        {"meta": {"f": 1.5, "g": [-0.0, 1e308]}},
    ],
    ids=lambda c: repr(c)[:40],
)
def test_send_fields_at_their_limits_are_accepted(store: LmdbStore, change: dict[str, Any]) -> None:
    session = connect(store)
    op = only_submit(call(session, "send", rid=5, **{**SEND, **change}))
    assert op.kind == "message"
    assert op.cid == change.get("cid", "c-1")
    assert op.text == change.get("text", "hi")
    assert op.meta == (change.get("meta") or None)  # an empty map is no meta
    assert commit(store, op).error is None


@pytest.mark.parametrize("t", ["edit", "delete"])
@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"id": None}, E.BAD_REQUEST),
        ({"id": 11}, E.BAD_REQUEST),
        ({"id": True}, E.BAD_REQUEST),
        ({"id": ["1-1"]}, E.BAD_REQUEST),
        ({"id": "1" * 65}, E.NOT_FOUND),
    ],
    ids=repr,
)
def test_edit_delete_id_validation(
    store: LmdbStore, t: str, change: dict[str, Any], code: str
) -> None:
    session = connect(store)
    frame = {"t": t, "rid": 6, "channel": ROOM, "id": "1-1", "text": "new", **change}
    frame = {k: v for k, v in frame.items() if v is not None}
    expect_error(receive(session, frame, NOW_MS), code, rid=6)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        (None, E.BAD_REQUEST),
        (3, E.BAD_REQUEST),
        (b"x", E.BAD_REQUEST),
        ("x" * (16 * 1024 + 1), E.LIMIT_EXCEEDED),
    ],
    ids=lambda v: repr(v)[:20],
)
def test_edit_text_validation(store: LmdbStore, text: Any, code: str) -> None:
    session = connect(store)
    frame: dict[str, Any] = {"t": "edit", "rid": 6, "channel": ROOM, "id": "1-1"}
    if text is not None:
        frame["text"] = text
    expect_error(receive(session, frame, NOW_MS), code, rid=6)


def test_edit_and_delete_id_at_64_chars_is_submitted(store: LmdbStore) -> None:
    session = connect(store)
    edit = only_submit(call(session, "edit", rid=1, channel=ROOM, id="1" * 64, text="x"))
    assert edit.target == "1" * 64
    delete = only_submit(call(session, "delete", rid=2, channel=ROOM, id="1" * 64))
    assert delete.target == "1" * 64


@pytest.mark.parametrize(
    "fields",
    [
        {"before": 0},
        {"before": -1},
        {"before": True},
        {"before": "5"},
        {"before": 1.5},
        {"before": 2**63},
        {"limit": 0},
        {"limit": -1},
        {"limit": 501},
        {"limit": True},
        {"limit": "10"},
        {"limit": 10.0},
    ],
    ids=repr,
)
def test_history_field_validation(store: LmdbStore, fields: dict[str, Any]) -> None:
    session = connect(store)
    expect_error(call(session, "history", rid=3, channel=ROOM, **fields), E.BAD_REQUEST, rid=3)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"since": None},
        {"since": -1},
        {"since": True},
        {"since": False},
        {"since": "0"},
        {"since": 0.0},
        {"since": 2**63},
        {"since": 0, "limit": 0},
        {"since": 0, "limit": 5001},
        {"since": 0, "limit": True},
        {"since": 0, "limit": [1]},
    ],
    ids=repr,
)
def test_sync_field_validation(store: LmdbStore, fields: dict[str, Any]) -> None:
    session = connect(store)
    expect_error(call(session, "sync", rid=3, channel=ROOM, **fields), E.BAD_REQUEST, rid=3)


@pytest.mark.parametrize("seq", [None, -1, True, "1", 1.0, 2**63], ids=repr)
def test_read_field_validation(store: LmdbStore, seq: Any) -> None:
    session = connect(store)
    frame: dict[str, Any] = {"t": "read", "rid": 3, "channel": ROOM}
    if seq is not None:
        frame["seq"] = seq
    expect_error(receive(session, frame, NOW_MS), E.BAD_REQUEST, rid=3)


@pytest.mark.parametrize("on", [None, 1, 0, "true", [True]], ids=repr)
def test_typing_field_validation(store: LmdbStore, on: Any) -> None:
    session = connect(store)
    frame: dict[str, Any] = {"t": "typing", "rid": 3, "channel": ROOM}
    if on is not None:
        frame["on"] = on
    expect_error(receive(session, frame, NOW_MS), E.BAD_REQUEST, rid=3)


def test_field_limits_at_their_maximum_are_accepted(store: LmdbStore) -> None:
    session = connect(store)
    [reply] = call(session, "history", rid=1, channel=ROOM, before=2**63 - 1, limit=500)
    assert reply == ok(1, channel=ROOM, messages=[], more=False)
    [reply] = call(session, "history", rid=2, channel=ROOM, before=1, limit=1)
    assert reply == ok(2, channel=ROOM, messages=[], more=False)
    [reply] = call(session, "history", rid=3, channel=ROOM, before=None, limit=None)
    assert reply == ok(3, channel=ROOM, messages=[], more=False)
    [reply] = call(session, "sync", rid=4, channel=ROOM, since=0, limit=5000)
    assert reply == ok(4, channel=ROOM, events=[], more=False, head=0, epoch=0)
    op = only_submit(call(session, "read", rid=5, channel=ROOM, seq=2**63 - 1))
    assert op.seq == 2**63 - 1


# ------------------------------------------------------------------- authorization


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "join"},
        {"t": "sync", "since": 0},
        {"t": "history"},
        {"t": "read", "seq": 1},
        {"t": "typing", "on": True},
        {"t": "send", "cid": "c", "text": "x"},
        {"t": "edit", "id": "1-1", "text": "x"},
        {"t": "delete", "id": "1-1"},
    ],
    ids=lambda f: f["t"],
)
@pytest.mark.parametrize("channel", ["lobby", "room", "Room-1", "xroom-1", "dm:bob:carol"])
def test_channels_outside_the_token_are_forbidden(
    store: LmdbStore, frame: dict[str, Any], channel: str
) -> None:
    store.append(channel, "bob", "c0", "secret")
    session = connect(store, channels=("room-*",), scopes=MOD)
    actions = receive(session, {**frame, "rid": 4, "channel": channel}, NOW_MS)
    expect_error(actions, E.FORBIDDEN, rid=4)
    assert session.joined == set()
    assert store.channel(channel).head == 1


def test_dm_channels(store: LmdbStore) -> None:
    alice = connect(store, "alice", channels=())  # DMs need no pattern
    actions = call(alice, "join", rid=1, channel="dm:alice:bob")
    assert actions == [
        Subscribe("dm:alice:bob"),
        Position("dm:alice:bob", 0, 0),
        member(alice, "dm:alice:bob"),
        ok(1, channel="dm:alice:bob", head=0, read=0, epoch=0, horizon=0),
    ]
    only_submit(call(alice, "send", rid=2, channel="dm:alice:bob", cid="c", text="hi"))
    bob = connect(store, "bob", channels=("*",), sid="s-2")
    assert call(bob, "join", rid=1, channel="dm:alice:bob")[0] == Subscribe("dm:alice:bob")
    carol = connect(store, "carol", channels=("*", "dm:*"), scopes=MOD, sid="s-3")
    for t in ("join", "sync", "history"):
        expect_error(call(carol, t, rid=3, channel="dm:alice:bob", since=0), E.FORBIDDEN, rid=3)
    expect_error(
        call(carol, "send", rid=4, channel="dm:alice:bob", cid="c", text="x"), E.FORBIDDEN, rid=4
    )
    # A malformed DM name (unsorted, or a user with itself) is open to nobody.
    for name in ("dm:bob:alice", "dm:alice:alice", "dm:alice", "dm:alice:bob:carol"):
        expect_error(call(alice, "join", rid=5, channel=name), E.FORBIDDEN, rid=5)
    assert alice.joined == {"dm:alice:bob"}


def test_read_only_token_cannot_write(store: LmdbStore) -> None:
    session = connect(store, scopes=(SCOPE_READ,))
    assert call(session, "join", rid=1, channel=ROOM)[0] == Subscribe(ROOM)
    expect_error(call(session, "send", rid=2, channel=ROOM, cid="c", text="x"), E.FORBIDDEN, rid=2)
    expect_error(call(session, "edit", rid=3, channel=ROOM, id="1-1", text="x"), E.FORBIDDEN, rid=3)
    expect_error(call(session, "delete", rid=4, channel=ROOM, id="1-1"), E.FORBIDDEN, rid=4)
    # Reading is still allowed, the cursor too.
    assert only_submit(call(session, "read", rid=5, channel=ROOM, seq=0)).kind == "read"
    assert store.channels() == []


def test_send_only_token_cannot_read(store: LmdbStore) -> None:
    session = connect(store, scopes=(SCOPE_SEND,))
    expect_error(call(session, "join", rid=1, channel=ROOM), E.FORBIDDEN, rid=1)
    expect_error(call(session, "sync", rid=2, channel=ROOM, since=0), E.FORBIDDEN, rid=2)
    expect_error(call(session, "history", rid=3, channel=ROOM), E.FORBIDDEN, rid=3)
    expect_error(call(session, "typing", rid=4, channel=ROOM, on=True), E.FORBIDDEN, rid=4)
    assert only_submit(call(session, "send", rid=5, channel=ROOM, cid="c", text="x")).kind == (
        "message"
    )


def test_moderate_scope_alone_allows_no_changes(store: LmdbStore) -> None:
    session = connect(store, scopes=(SCOPE_READ, SCOPE_MODERATE))
    expect_error(call(session, "edit", rid=1, channel=ROOM, id="1-1", text="x"), E.FORBIDDEN, rid=1)
    expect_error(call(session, "delete", rid=2, channel=ROOM, id="1-1"), E.FORBIDDEN, rid=2)


@pytest.mark.parametrize(("scopes", "moderator"), [(RW, False), (MOD, True)], ids=["rw", "mod"])
def test_moderator_flag_on_edit_and_delete_ops(
    store: LmdbStore, scopes: tuple[str, ...], moderator: bool
) -> None:
    session = connect(store, scopes=scopes)
    edit = only_submit(call(session, "edit", rid=1, channel=ROOM, id="1-1", text="new"))
    assert (edit.kind, edit.channel, edit.user, edit.target, edit.text) == (
        "edit",
        ROOM,
        "alice",
        "1-1",
        "new",
    )
    assert (edit.moderator, edit.cid, edit.meta, edit.origin, edit.rid) == (
        moderator,
        None,
        None,
        session,
        1,
    )
    delete = only_submit(call(session, "delete", rid=2, channel=ROOM, id="1-1"))
    assert (delete.kind, delete.target, delete.text, delete.moderator, delete.rid) == (
        "delete",
        "1-1",
        None,
        moderator,
        2,
    )


def test_only_sender_or_moderator_changes_a_message(store: LmdbStore) -> None:
    alice = connect(store, "alice")
    ok_frame, _ = send(store, alice, "original", "c1")
    mid = ok_frame["id"]
    bob = connect(store, "bob", sid="s-2")
    actions = done(store, call(bob, "edit", rid=7, channel=ROOM, id=mid, text="hacked"))
    expect_error(actions, E.FORBIDDEN, rid=7)
    actions = done(store, call(bob, "delete", rid=8, channel=ROOM, id=mid))
    expect_error(actions, E.FORBIDDEN, rid=8)
    assert store.channel(ROOM).head == 1
    carol = connect(store, "carol", scopes=MOD, sid="s-3")
    actions = done(store, call(carol, "edit", rid=9, channel=ROOM, id=mid, text="moderated"))
    assert actions == [
        ok(9, channel=ROOM, seq=2, id=mid, ts=STORE_TS, dup=False),
        Publish(
            ROOM,
            event(ROOM, seq=2, kind="edit", id=mid, sender="carol", ts=STORE_TS, text="moderated"),
        ),
    ]


# ------------------------------------------------------------------- send


def test_send_submits_then_replies_and_publishes_after_commit(store: LmdbStore) -> None:
    session = connect(store)
    meta = {"reply_to": "x", "n": [1, 2]}
    actions = call(session, "send", rid=7, channel=ROOM, cid="c-1", text="hello", meta=meta)
    op = only_submit(actions)
    assert (op.kind, op.channel, op.user, op.cid, op.text, op.meta) == (
        "message",
        ROOM,
        "alice",
        "c-1",
        "hello",
        meta,
    )
    assert (op.target, op.moderator, op.result, op.error) == (None, False, None, None)
    assert op.origin is session and op.rid == 7
    assert store.channel(ROOM).head == 0  # nothing is stored before the commit

    commit(store, op)
    assert isinstance(op.result, AppendResult)
    mid = op.result.id
    actions = session.write_done(op)
    published = event(
        ROOM,
        seq=1,
        kind="message",
        id=mid,
        sender="alice",
        ts=STORE_TS,
        text="hello",
        meta=meta,
    )
    assert actions == [
        ok(7, channel=ROOM, seq=1, id=mid, ts=STORE_TS, dup=False),
        Publish(ROOM, published),
    ]
    assert isinstance(actions[1], Publish) and actions[1].skip_user is None
    assert list(published)[:2] == ["t", "channel"]
    # The pushed event is exactly what a later sync replays.
    [reply] = call(session, "sync", rid=8, channel=ROOM, since=0)
    assert isinstance(reply, Reply) and reply.frame["events"] == [published]


def test_send_without_rid_publishes_only(store: LmdbStore) -> None:
    session = connect(store)
    op = only_submit(call(session, "send", channel=ROOM, cid="c", text="x", meta={}))
    assert op.rid is None and op.meta is None
    actions = session.write_done(commit(store, op))
    assert isinstance(op.result, AppendResult)
    pushed = event(ROOM, seq=1, kind="message", id=op.result.id, sender="alice", ts=STORE_TS)
    assert actions == [Publish(ROOM, {**pushed, "text": "x"})]  # no meta: {} is no meta


def test_duplicate_cid_after_commit_is_answered_without_a_write(store: LmdbStore) -> None:
    session = connect(store)
    first, _ = send(store, session, "hello", "c-1", rid=1)
    # The retry may even carry other text: the first result stands.
    actions = call(session, "send", rid=2, channel=ROOM, cid="c-1", text="changed")
    assert actions == [ok(2, channel=ROOM, seq=first["seq"], id=first["id"], ts=STORE_TS, dup=True)]
    assert call(session, "send", channel=ROOM, cid="c-1", text="hello") == []  # no rid, no ok
    # Also from a new connection of the same user (a reconnect).
    again = connect(store, sid="s-2")
    [reply] = call(again, "send", rid=3, channel=ROOM, cid="c-1", text="hello")
    assert reply == ok(3, channel=ROOM, seq=1, id=first["id"], ts=STORE_TS, dup=True)
    assert store.channel(ROOM).head == 1
    # The same cid from another sender is a new message.
    bob = connect(store, "bob", sid="s-3")
    assert only_submit(call(bob, "send", rid=4, channel=ROOM, cid="c-1", text="hi")).cid == "c-1"


def test_duplicate_cid_in_flight_replies_dup_and_publishes_nothing(store: LmdbStore) -> None:
    session = connect(store)
    op1 = only_submit(call(session, "send", rid=1, channel=ROOM, cid="c", text="x"))
    op2 = only_submit(call(session, "send", rid=2, channel=ROOM, cid="c", text="x"))
    first = session.write_done(commit(store, op1))
    assert len(first) == 2 and isinstance(first[1], Publish)
    assert isinstance(op1.result, AppendResult)
    second = session.write_done(commit(store, op2))
    assert second == [ok(2, channel=ROOM, seq=1, id=op1.result.id, ts=STORE_TS, dup=True)]
    assert store.channel(ROOM).head == 1


def test_failed_write_replies_error_only(store: LmdbStore) -> None:
    session = connect(store)
    op = only_submit(call(session, "send", rid=5, channel=ROOM, cid="c", text="x"))
    op.error = StoreUnavailable("disk full")
    assert session.write_done(op) == [
        Reply({"t": "error", "rid": 5, "code": E.STORE_UNAVAILABLE, "message": "disk full"})
    ]
    # The client retries with the same cid; nothing was stored.
    assert only_submit(call(session, "send", rid=6, channel=ROOM, cid="c", text="x")).cid == "c"


def test_failed_write_of_a_closed_session_is_dropped(store: LmdbStore) -> None:
    session = connect(store)
    op = only_submit(call(session, "send", rid=5, channel=ROOM, cid="c", text="x"))
    session.closed("peer closed the connection")
    op.error = StoreUnavailable("disk full")
    assert session.write_done(op) == []


def test_write_done_after_close_still_publishes(store: LmdbStore) -> None:
    session = connect(store)
    op = only_submit(call(session, "send", rid=5, channel=ROOM, cid="c", text="x"))
    session.closed("peer closed the connection")
    commit(store, op)
    assert isinstance(op.result, AppendResult)
    assert session.write_done(op) == [
        Publish(
            ROOM,
            event(
                ROOM, seq=1, kind="message", id=op.result.id, sender="alice", ts=STORE_TS, text="x"
            ),
        )
    ]


def test_write_done_after_a_connection_error_still_publishes(store: LmdbStore) -> None:
    session = connect(store)
    op = only_submit(call(session, "send", rid=5, channel=ROOM, cid="c", text="x"))
    expect_error(session.frame_error(InvalidMsgpack("bad")), E.BAD_FRAME, fatal=True)
    actions = session.write_done(commit(store, op))
    assert len(actions) == 1 and isinstance(actions[0], Publish)


# ------------------------------------------------------------------- edit and delete


def test_edit_and_delete_reply_and_publish(store: LmdbStore) -> None:
    session = connect(store)
    first, _ = send(store, session, "helo", "c1")
    mid = first["id"]
    actions = done(store, call(session, "edit", rid=2, channel=ROOM, id=mid, text="hello"))
    edit_event = event(ROOM, seq=2, kind="edit", id=mid, sender="alice", ts=STORE_TS, text="hello")
    assert actions == [
        ok(2, channel=ROOM, seq=2, id=mid, ts=STORE_TS, dup=False),
        Publish(ROOM, edit_event),
    ]
    [reply] = call(session, "sync", rid=3, channel=ROOM, since=1)
    assert isinstance(reply, Reply) and reply.frame["events"] == [edit_event]

    actions = done(store, call(session, "delete", rid=4, channel=ROOM, id=mid))
    delete_event = event(ROOM, seq=3, kind="delete", id=mid, sender="alice", ts=STORE_TS)
    assert actions == [
        ok(4, channel=ROOM, seq=3, id=mid, ts=STORE_TS, dup=False),
        Publish(ROOM, delete_event),
    ]
    [reply] = call(session, "sync", rid=5, channel=ROOM, since=2)
    assert isinstance(reply, Reply) and reply.frame["events"] == [delete_event]
    # A deleted message is not_found to further changes.
    actions = done(store, call(session, "edit", rid=6, channel=ROOM, id=mid, text="again"))
    expect_error(actions, E.NOT_FOUND, rid=6)
    assert store.channel(ROOM).head == 3


@pytest.mark.parametrize("target", ["1-99", "nope", "2-1", ""])
def test_edit_of_an_unknown_message_is_not_found(store: LmdbStore, target: str) -> None:
    session = connect(store)
    send(store, session, "x", "c1")
    actions = done(store, call(session, "edit", rid=3, channel=ROOM, id=target, text="y"))
    expect_error(actions, E.NOT_FOUND, rid=3)


# ------------------------------------------------------------------- read cursor


def test_read_moves_the_cursor_and_publishes_only_changes(store: LmdbStore) -> None:
    for i in range(3):
        store.append(ROOM, "bob", f"c{i}", "x")
    session = connect(store)
    op = only_submit(call(session, "read", rid=1, channel=ROOM, seq=2))
    assert (op.kind, op.channel, op.user, op.seq, op.origin, op.rid) == (
        "read",
        ROOM,
        "alice",
        2,
        session,
        1,
    )
    read_push = {"t": "read", "channel": ROOM, "user": "alice", "seq": 2}
    assert session.write_done(commit(store, op)) == [
        ok(1, channel=ROOM, seq=2),
        Publish(ROOM, read_push),
    ]
    # Backwards changes nothing: the ok names the current cursor, nothing is pushed.
    assert done(store, call(session, "read", rid=2, channel=ROOM, seq=1)) == [
        ok(2, channel=ROOM, seq=2)
    ]
    assert done(store, call(session, "read", rid=3, channel=ROOM, seq=2)) == [
        ok(3, channel=ROOM, seq=2)
    ]
    # Past the head is clamped to it.
    assert done(store, call(session, "read", rid=4, channel=ROOM, seq=99)) == [
        ok(4, channel=ROOM, seq=3),
        Publish(ROOM, {**read_push, "seq": 3}),
    ]
    assert store.read_cursor("alice", ROOM) == 3


def test_read_without_rid_and_after_close(store: LmdbStore) -> None:
    store.append(ROOM, "bob", "c0", "x")
    store.append(ROOM, "bob", "c1", "x")
    session = connect(store)
    read_push = {"t": "read", "channel": ROOM, "user": "alice", "seq": 1}
    assert done(store, call(session, "read", channel=ROOM, seq=1)) == [Publish(ROOM, read_push)]
    op = only_submit(call(session, "read", rid=2, channel=ROOM, seq=2))
    session.closed("gone")
    assert session.write_done(commit(store, op)) == [Publish(ROOM, {**read_push, "seq": 2})]
    op = only_submit(
        connect(store, sid="s-2").receive_frame(
            {"t": "read", "rid": 3, "channel": ROOM, "seq": 1}, NOW_MS
        )
    )
    origin = op.origin
    origin.closed("gone")
    assert origin.write_done(commit(store, op)) == []  # unchanged and nobody to answer


# ------------------------------------------------------------------- typing, join, leave


def test_typing_publishes_to_the_others(store: LmdbStore) -> None:
    session = connect(store)
    push = {"t": "typing", "channel": ROOM, "user": "alice", "on": True}
    assert call(session, "typing", rid=3, channel=ROOM, on=True) == [
        Publish(ROOM, push, skip_user="alice"),
        Reply({"t": "ok", "rid": 3}),
    ]
    assert call(session, "typing", channel=ROOM, on=False) == [
        Publish(ROOM, {**push, "on": False}, skip_user="alice")
    ]
    assert store.channels() == []  # never stored


def test_join_subscribes_and_reports_the_channel(store: LmdbStore) -> None:
    for i in range(3):
        store.append(ROOM, "bob", f"c{i}", "x")
    store.set_read("alice", ROOM, 2)
    info = store.channel(ROOM)
    session = connect(store)
    assert call(session, "join", rid=1, channel=ROOM) == [
        Subscribe(ROOM),
        Position(ROOM, info.epoch, 3),  # the hub delivers what comes after the head
        member(session, ROOM),
        ok(1, channel=ROOM, head=3, read=2, epoch=info.epoch, horizon=0),
    ]
    assert session.joined == {ROOM}
    # An unknown channel joins empty; a join without rid subscribes and records only.
    assert call(session, "join", channel="room-2") == [
        Subscribe("room-2"),
        Position("room-2", 0, 0),
        member(session, "room-2"),
    ]
    assert session.joined == {ROOM, "room-2"}
    assert store.channels() == [ROOM]  # joining creates no channel


def test_join_limit(store: LmdbStore) -> None:
    session = connect(store, limits=Limits(max_joined=2))
    assert call(session, "join", rid=1, channel="room-1")[0] == Subscribe("room-1")
    assert call(session, "join", rid=2, channel="room-2")[0] == Subscribe("room-2")
    expect_error(call(session, "join", rid=3, channel="room-3"), E.LIMIT_EXCEEDED, rid=3)
    assert session.joined == {"room-1", "room-2"}
    # Joining again a channel already joined is fine.
    assert call(session, "join", rid=4, channel="room-2")[0] == Subscribe("room-2")
    assert call(session, "leave", rid=5, channel="room-1") == [
        Unsubscribe("room-1"),
        ok(5, channel="room-1"),
    ]
    assert session.joined == {"room-2"}
    assert call(session, "join", rid=6, channel="room-3")[0] == Subscribe("room-3")
    assert session.joined == {"room-2", "room-3"}


def test_leave_unsubscribes(store: LmdbStore) -> None:
    session = connect(store)
    call(session, "join", rid=1, channel=ROOM)
    assert call(session, "leave", channel=ROOM) == [Unsubscribe(ROOM)]
    assert session.joined == set()
    # Leaving a channel not joined is harmless.
    assert call(session, "leave", rid=2, channel="room-9") == [
        Unsubscribe("room-9"),
        ok(2, channel="room-9"),
    ]


# ------------------------------------------------------------------- sync


def test_sync_pages_and_event_shape(store: LmdbStore) -> None:
    results = [store.append(ROOM, "bob", f"c{i}", f"m{i}") for i in range(5)]
    epoch = store.channel(ROOM).epoch
    session = connect(store)
    events = [
        event(ROOM, seq=r.seq, kind="message", id=r.id, sender="bob", ts=STORE_TS, text=f"m{i}")
        for i, r in enumerate(results)
    ]
    assert call(session, "sync", rid=1, channel=ROOM, since=0) == [
        ok(1, channel=ROOM, events=events, more=False, head=5, epoch=epoch)
    ]
    [reply] = call(session, "sync", rid=2, channel=ROOM, since=1, limit=2)
    assert reply == ok(2, channel=ROOM, events=events[1:3], more=True, head=5, epoch=epoch)
    assert isinstance(reply, Reply)
    for ev in reply.frame["events"]:
        assert list(ev)[:2] == ["t", "channel"]
    assert call(session, "sync", rid=3, channel=ROOM, since=5) == [
        ok(3, channel=ROOM, events=[], more=False, head=5, epoch=epoch)
    ]
    assert call(session, "sync", channel=ROOM, since=0) == []  # no rid: nothing to answer


def test_sync_of_an_empty_channel(store: LmdbStore) -> None:
    session = connect(store)
    assert call(session, "sync", rid=1, channel=ROOM, since=0) == [
        ok(1, channel=ROOM, events=[], more=False, head=0, epoch=0)
    ]
    assert call(session, "sync", rid=2, channel=ROOM, since=3) == [
        Reply({"t": "resync", "rid": 2, "channel": ROOM, "head": 0, "epoch": 0, "reason": "ahead"})
    ]


def test_sync_with_another_epoch_is_resync(store: LmdbStore) -> None:
    store.append(ROOM, "bob", "c0", "x")
    epoch = store.channel(ROOM).epoch
    session = connect(store)
    [reply] = call(session, "sync", rid=1, channel=ROOM, since=1, epoch=epoch + 1)
    assert isinstance(reply, Reply)
    assert reply.frame == {
        "t": "resync",
        "rid": 1,
        "channel": ROOM,
        "head": 1,
        "epoch": epoch,
        "reason": "epoch",
    }
    # The right epoch, or a client starting from 0, replays normally.
    [ok1] = call(session, "sync", rid=2, channel=ROOM, since=0, epoch=epoch + 1)
    assert isinstance(ok1, Reply) and ok1.frame["t"] == "ok"
    [ok2] = call(session, "sync", rid=3, channel=ROOM, since=1, epoch=epoch)
    assert isinstance(ok2, Reply) and ok2.frame["events"] == []


def test_a_read_the_store_fails_is_a_request_error(
    store: LmdbStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored entry the server cannot read (here: it cannot decrypt it) answers the
    request with `internal` and leaves the connection open; the detail, which may name
    key ids, goes to the log only."""
    store.append(ROOM, "bob", "c1", "x")
    session = connect(store)

    def undecryptable(*args: Any, **kwargs: Any) -> Any:
        raise EncryptionError("entry sealed with key 'k7', which is not configured")

    monkeypatch.setattr(store, "sync", undecryptable)
    [reply] = call(session, "sync", rid=9, channel=ROOM, since=0)
    assert reply == Reply(
        {
            "t": "error",
            "rid": 9,
            "code": "internal",
            "message": "the server could not read the stored data",
        }
    )
    assert "k7" in caplog.text
    assert call(session, "ping", rid=10) == [Reply({"t": "pong", "rid": 10, "ts": NOW_MS})]


def test_a_read_the_store_refuses_keeps_its_code_and_message(
    store: LmdbStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store error other than `internal` on a read is answered with its own code and
    message (nothing secret in them), and the connection stays open."""
    session = connect(store)

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("store is closed")

    monkeypatch.setattr(store, "history", unavailable)
    [reply] = call(session, "history", rid=7, channel=ROOM)
    assert reply == Reply(
        {"t": "error", "rid": 7, "code": "store_unavailable", "message": "store is closed"}
    )
    assert call(session, "ping", rid=8) == [Reply({"t": "pong", "rid": 8, "ts": NOW_MS})]


def test_sync_past_the_head_is_resync(store: LmdbStore) -> None:
    for i in range(2):
        store.append(ROOM, "bob", f"c{i}", "x")
    epoch = store.channel(ROOM).epoch
    session = connect(store)
    resync = {"t": "resync", "channel": ROOM, "head": 2, "epoch": epoch, "reason": "ahead"}
    assert call(session, "sync", rid=4, channel=ROOM, since=3) == [Reply({**resync, "rid": 4})]
    # Without a rid the resync still goes out: it is the answer the client must act on.
    assert call(session, "sync", channel=ROOM, since=2**63 - 1) == [Reply(resync)]


def test_sync_below_the_compaction_horizon_is_resync(tmp_path: Path) -> None:
    with open_store(tmp_path / "c", compaction=CompactionPolicy(keep_recent=1)) as store:
        for i in range(3):
            store.append(ROOM, "bob", f"c{i}", "x")
        assert store.compact(ROOM) == 2
        info = store.channel(ROOM)
        session = connect(store)
        assert call(session, "sync", rid=1, channel=ROOM, since=1) == [
            Reply(
                {
                    "t": "resync",
                    "rid": 1,
                    "channel": ROOM,
                    "head": 3,
                    "epoch": info.epoch,
                    "reason": "compacted",
                }
            )
        ]
        # From 0 the epoch is not checked (PROTOCOL.md section 11): compacted, even with
        # a stale one.
        [stale] = call(session, "sync", rid=5, channel=ROOM, since=0, epoch=info.epoch + 1)
        assert isinstance(stale, Reply) and stale.frame["reason"] == "compacted"
        [reply] = call(session, "sync", rid=2, channel=ROOM, since=2)
        assert isinstance(reply, Reply) and [e["seq"] for e in reply.frame["events"]] == [3]
        [_, _, _, joined] = call(session, "join", rid=3, channel=ROOM)
        assert joined == ok(3, channel=ROOM, head=3, read=0, epoch=info.epoch, horizon=2)


def test_cut_stream_and_recovery_by_sync(store: LmdbStore) -> None:
    for i in range(4):
        store.append(ROOM, "bob", f"c{i}", "x")
    info = store.channel(ROOM)
    session = connect(store)
    call(session, "join", rid=1, channel=ROOM)
    push = session.cut_stream(ROOM, info)
    assert push == {"t": "resync", "channel": ROOM, "head": 4, "epoch": info.epoch, "reason": "cut"}
    assert session.cut == {ROOM}
    # A page that stops short of the head keeps the stream cut ...
    [reply] = call(session, "sync", rid=2, channel=ROOM, since=0, limit=2)
    assert isinstance(reply, Reply) and reply.frame["more"] is True
    assert session.cut == {ROOM}
    # ... so does a resync answer ...
    [reply] = call(session, "sync", rid=3, channel=ROOM, since=9)
    assert isinstance(reply, Reply) and reply.frame["t"] == "resync"
    assert session.cut == {ROOM}
    # ... and the page that reaches the head resumes it.
    [reply] = call(session, "sync", rid=4, channel=ROOM, since=2)
    assert isinstance(reply, Reply) and reply.frame["more"] is False
    assert session.cut == set()
    assert session.joined == {ROOM}


def test_cut_stream_cleared_by_join_and_leave(store: LmdbStore) -> None:
    store.append(ROOM, "bob", "c0", "x")
    session = connect(store)
    call(session, "join", rid=1, channel=ROOM)
    call(session, "join", rid=2, channel="room-2")
    session.cut_stream(ROOM, store.channel(ROOM))
    session.cut_stream("room-2", store.channel("room-2"))
    assert session.cut == {ROOM, "room-2"}
    call(session, "join", rid=3, channel=ROOM)
    assert session.cut == {"room-2"}
    call(session, "leave", rid=4, channel="room-2")
    assert session.cut == set()


# ------------------------------------------------------------------- history


def test_history_pages_newest_first_page_oldest_first(store: LmdbStore) -> None:
    results = [store.append(ROOM, "bob", f"c{i}", f"m{i}") for i in range(5)]
    session = connect(store)

    def msg(i: int) -> dict[str, Any]:
        r = results[i]
        return {
            "seq": r.seq,
            "kind": "message",
            "id": r.id,
            "sender": "bob",
            "ts": STORE_TS,
            "text": f"m{i}",
        }

    assert call(session, "history", rid=1, channel=ROOM, limit=2) == [
        ok(1, channel=ROOM, messages=[msg(3), msg(4)], more=True)
    ]
    assert call(session, "history", rid=2, channel=ROOM, before=4, limit=2) == [
        ok(2, channel=ROOM, messages=[msg(1), msg(2)], more=True)
    ]
    assert call(session, "history", rid=3, channel=ROOM, before=2, limit=2) == [
        ok(3, channel=ROOM, messages=[msg(0)], more=False)
    ]
    assert call(session, "history", rid=4, channel=ROOM) == [
        ok(4, channel=ROOM, messages=[msg(i) for i in range(5)], more=False)
    ]


def test_history_shows_latest_state(store: LmdbStore) -> None:
    a = store.append(ROOM, "bob", "c0", "first")
    b = store.append(ROOM, "bob", "c1", "second", {"k": 1})
    store.edit(ROOM, "bob", a.id, "first!")
    store.delete(ROOM, "bob", b.id)
    session = connect(store)
    assert call(session, "history", rid=1, channel=ROOM) == [
        ok(
            1,
            channel=ROOM,
            messages=[
                {
                    "seq": 1,
                    "kind": "message",
                    "id": a.id,
                    "sender": "bob",
                    "ts": STORE_TS,
                    "text": "first!",
                    "edited": STORE_TS,
                },
                {
                    "seq": 2,
                    "kind": "message",
                    "id": b.id,
                    "sender": "bob",
                    "ts": STORE_TS,
                    "deleted": True,
                },
            ],
            more=False,
        )
    ]


SMALL_FRAME = 8192


@pytest.fixture
def big_messages(store: LmdbStore) -> list[AppendResult]:
    """20 messages of about 1 KiB each: far more than one 8 KiB page."""
    return [store.append(ROOM, "bob", f"c{i}", f"{i:04d}" + "x" * 1020) for i in range(20)]


def test_history_pages_fit_in_max_frame(store: LmdbStore, big_messages: list[AppendResult]) -> None:
    session = connect(
        store, limits=Limits(max_frame=SMALL_FRAME, max_text_bytes=4096, max_meta_bytes=1024)
    )
    seen: list[int] = []
    before: int | None = None
    pages = 0
    while True:
        fields = {} if before is None else {"before": before}
        [reply] = call(session, "history", rid=pages, channel=ROOM, **fields)
        assert isinstance(reply, Reply) and reply.frame["t"] == "ok"
        assert encoded_size(reply.frame) <= SMALL_FRAME
        messages = reply.frame["messages"]
        assert 5 <= len(messages) < 20 or not reply.frame["more"]  # cut early, not tiny
        seen[:0] = [m["seq"] for m in messages]
        pages += 1
        if not reply.frame["more"]:
            break
        before = messages[0]["seq"]
    assert pages >= 3
    assert seen == list(range(1, 21))


def test_sync_pages_fit_in_max_frame(store: LmdbStore, big_messages: list[AppendResult]) -> None:
    session = connect(
        store, limits=Limits(max_frame=SMALL_FRAME, max_text_bytes=4096, max_meta_bytes=1024)
    )
    seen: list[int] = []
    since = 0
    pages = 0
    while True:
        [reply] = call(session, "sync", rid=pages, channel=ROOM, since=since)
        assert isinstance(reply, Reply) and reply.frame["t"] == "ok"
        assert encoded_size(reply.frame) <= SMALL_FRAME
        events = reply.frame["events"]
        assert 5 <= len(events) < 20 or not reply.frame["more"]
        seen += [e["seq"] for e in events]
        pages += 1
        if not reply.frame["more"]:
            break
        since = events[-1]["seq"]
    assert pages >= 3
    assert seen == list(range(1, 21))


# ------------------------------------------------------------------- frame rate


def rate_limited(session: Session, rid: int, now_ms: int, retry_after_ms: int) -> None:
    actions = call(session, "ping", now_ms, rid=rid)
    expect_error(actions, E.RATE_LIMITED, rid=rid, retry_after_ms=retry_after_ms)
    assert session.state is State.READY


def pong(session: Session, rid: int, now_ms: int) -> None:
    assert call(session, "ping", now_ms, rid=rid) == [
        Reply({"t": "pong", "ts": now_ms, "rid": rid})
    ]


def test_frame_rate_limit(store: LmdbStore) -> None:
    # 10 frames/s, burst 5: the bucket starts full and the hello did not spend from it.
    session = connect(store, limits=Limits(frame_rate=10, frame_burst=5))
    for rid in range(5):
        pong(session, rid, NOW_MS)
    rate_limited(session, 5, NOW_MS, retry_after_ms=100)  # one token takes 1000/10 ms
    pong(session, 6, NOW_MS + 100)
    rate_limited(session, 7, NOW_MS + 100, retry_after_ms=100)
    rate_limited(session, 8, NOW_MS + 150, retry_after_ms=50)  # half a token has refilled
    pong(session, 9, NOW_MS + 200)
    # A long pause refills the bucket to the burst, no more.
    for rid in range(10, 15):
        pong(session, rid, NOW_MS + 60_000)
    rate_limited(session, 15, NOW_MS + 60_000, retry_after_ms=100)


def test_rate_limit_counts_every_request_type(store: LmdbStore) -> None:
    session = connect(store, limits=Limits(frame_rate=10, frame_burst=2))
    expect_error(call(session, "nonsense", rid=1), E.UNKNOWN_TYPE, rid=1)
    expect_error(call(session, "join", rid=2, channel="lobby"), E.FORBIDDEN, rid=2)
    expect_error(
        call(session, "send", rid=3, channel=ROOM, cid="c", text="x"),
        E.RATE_LIMITED,
        rid=3,
        retry_after_ms=100,
    )
    assert store.channels() == []


def test_hello_is_not_rate_limited(store: LmdbStore) -> None:
    session = new_session(store, Limits(frame_rate=1, frame_burst=1))
    actions = receive(session, {"t": "hello", "v": 1, "token": token(), "rid": 1}, NOW_MS)
    assert isinstance(actions[0], Reply) and actions[0].frame["t"] == "welcome"
    pong(session, 2, NOW_MS)  # the one token of the burst is still there
    rate_limited(session, 3, NOW_MS, retry_after_ms=1000)


def test_frames_with_a_bad_rid_count_against_the_rate(store: LmdbStore) -> None:
    session = connect(store, limits=Limits(frame_rate=10, frame_burst=5))
    for _ in range(5):
        expect_error(call(session, "ping", rid="x"), E.BAD_REQUEST)
    rate_limited(session, 1, NOW_MS, retry_after_ms=100)


# ------------------------------------------------------------------- membership record


def test_join_records_membership_fire_and_forget(store: LmdbStore) -> None:
    session = connect(store)
    actions = call(session, "join", rid=1, channel=ROOM)
    assert actions[2] == member(session, ROOM)
    op = commit(store, only_submit([actions[2]]))
    assert op.error is None and op.rid is None
    # Nothing to answer, nothing to fan out: a notice to the user's devices (7.12).
    push = {"t": "membership", "channel": ROOM, "by": "alice"}
    assert session.write_done(op) == [NotifyUser("alice", push)]
    # Recorded already (another device joined meanwhile): no notice.
    again = commit(store, WriteOp("member", ROOM, "alice"))
    assert not again.changed and session.write_done(again) == []
    done(store, [call(session, "join", channel="room-2")[2]])
    assert store.channels_of("alice") == [ROOM, "room-2"]
    assert store.channels_of("bob") == []
    assert store.channels() == []  # a membership is no log entry


def test_a_member_rejoining_writes_nothing(store: LmdbStore) -> None:
    session = connect(store)
    commit(store, only_submit([call(session, "join", rid=1, channel=ROOM)[2]]))
    again = call(session, "join", rid=2, channel=ROOM)
    assert not any(isinstance(a, Submit) for a in again), again
    assert isinstance(again[0], Subscribe) and isinstance(again[-1], Reply)


def test_failed_membership_record_is_not_answered(store: LmdbStore) -> None:
    session = connect(store)
    op = call(session, "join", rid=1, channel=ROOM)[2]
    assert isinstance(op, Submit)
    op.op.error = StoreUnavailable("disk full")
    # The join's ok went out already; a rid-less error now would answer nothing it asked.
    assert session.write_done(op.op) == []


# ------------------------------------------------------------------- idle peers

HEARTBEAT = 1_000  # idle after 2 intervals: 2 s


def test_idle_connection_is_closed_after_two_heartbeats(store: LmdbStore) -> None:
    session = connect(store, limits=Limits(heartbeat_ms=HEARTBEAT))
    assert session.next_deadline() == NOW_MS + 2 * HEARTBEAT
    assert session.tick(NOW_MS + 2 * HEARTBEAT - 1) == []
    frame = expect_error(session.tick(NOW_MS + 2 * HEARTBEAT), E.IDLE_TIMEOUT, fatal=True)
    assert "rid" not in frame
    expect_closed(session)
    assert session.next_deadline() is None
    assert session.tick(NOW_MS + 10**6) == []


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "ping"},
        {"t": "ping", "rid": 1},
        {"t": "nonsense", "rid": 1},  # refused, but received
        {"t": "join", "rid": 1, "channel": "lobby"},  # forbidden
        {"t": "sync", "rid": "x", "channel": ROOM, "since": 0},  # bad rid
    ],
    ids=["ping", "ping-rid", "unknown", "forbidden", "bad-rid"],
)
def test_any_frame_resets_the_idle_timer(store: LmdbStore, frame: dict[str, Any]) -> None:
    session = connect(store, limits=Limits(heartbeat_ms=HEARTBEAT))
    receive(session, frame, NOW_MS + 1_500)
    assert session.state is State.READY
    assert session.next_deadline() == NOW_MS + 1_500 + 2 * HEARTBEAT
    assert session.tick(NOW_MS + 2 * HEARTBEAT) == []
    assert session.tick(NOW_MS + 1_499 + 2 * HEARTBEAT) == []
    expect_error(session.tick(NOW_MS + 1_500 + 2 * HEARTBEAT), E.IDLE_TIMEOUT, fatal=True)


def test_a_frame_read_earlier_never_moves_the_idle_timer_back(store: LmdbStore) -> None:
    """A frame held back by flow control is handled with the time it was read; the
    server kept the held connection's timer fresh meanwhile (last_rx_ms = now): handling
    the older frame must not undo that (a held WebSocket was closed as idle this way)."""
    session = connect(store, limits=Limits(heartbeat_ms=HEARTBEAT))
    session.last_rx_ms = NOW_MS + 5_000  # refreshed while held
    pong(session, 1, NOW_MS + 100)  # read at +100 ms, handled now
    assert session.next_deadline() == NOW_MS + 5_000 + 2 * HEARTBEAT
    assert session.tick(NOW_MS + 5_000 + 2 * HEARTBEAT - 1) == []


def test_rate_limited_frames_reset_the_idle_timer(store: LmdbStore) -> None:
    session = connect(store, limits=Limits(heartbeat_ms=HEARTBEAT, frame_rate=1, frame_burst=1))
    pong(session, 1, NOW_MS)
    rate_limited(session, 2, NOW_MS + 500, retry_after_ms=500)
    assert session.next_deadline() == NOW_MS + 500 + 2 * HEARTBEAT


def test_idle_timeout_turns_typing_off(store: LmdbStore) -> None:
    limits = Limits(heartbeat_ms=HEARTBEAT, typing_timeout_ms=60_000)
    session = connect(store, limits=limits)
    call(session, "typing", channel=ROOM, on=True)
    call(session, "typing", channel="room-2", on=True)
    actions = session.tick(NOW_MS + 2 * HEARTBEAT)
    assert actions[:2] == [typing_push(ROOM, False), typing_push("room-2", False)]
    expect_error(actions[2:], E.IDLE_TIMEOUT, fatal=True)
    assert session.typing == {}
    assert session.closed("gone") == []  # already turned off: not twice


def test_no_timers_before_hello(store: LmdbStore) -> None:
    # The hello deadline is the server's read deadline (timed_out), not a tick.
    session = new_session(store, Limits(heartbeat_ms=HEARTBEAT))
    assert session.next_deadline() is None
    assert session.tick(NOW_MS + 10**7) == []
    assert session.state is State.AWAITING_HELLO


# ------------------------------------------------------------------- token expiry and refresh

TTL_S = 10
EXP_MS = NOW_MS + TTL_S * 1000
GRACE = 5_000
GRACE_LIMITS = Limits(refresh_grace_ms=GRACE)


def expiring(store: LmdbStore, **kw: Any) -> Session:
    """A session whose token expires at EXP_MS, with a 5 s refresh grace."""
    return connect(store, ttl_s=TTL_S, limits=kw.pop("limits", GRACE_LIMITS), **kw)


def warn_expired(session: Session, now_ms: int = EXP_MS) -> None:
    expect_error(session.tick(now_ms), E.TOKEN_EXPIRED, refresh_within_ms=GRACE)
    assert session.state is State.READY


def test_token_expiry_warns_once_then_closes_after_the_grace(store: LmdbStore) -> None:
    session = expiring(store)
    assert session.next_deadline() == EXP_MS
    assert session.tick(EXP_MS - 1) == []
    warn_expired(session)  # non-fatal, no rid, says how long is left
    assert session.next_deadline() == EXP_MS + GRACE
    assert session.tick(EXP_MS + 1) == []  # told once
    assert session.tick(EXP_MS + GRACE - 1) == []
    pong(session, 1, EXP_MS + GRACE - 1)  # ping still works (and is no refresh)
    frame = expect_error(session.tick(EXP_MS + GRACE), E.TOKEN_EXPIRED, fatal=True)
    assert "rid" not in frame and "refresh_within_ms" not in frame
    expect_closed(session)


def test_late_tick_counts_the_grace_from_the_warning(store: LmdbStore) -> None:
    # The grace runs from when the client was told, not from exp.
    session = expiring(store)
    call(session, "ping", EXP_MS + 20_000)  # not idle
    warn_expired(session, EXP_MS + 30_000)
    assert session.next_deadline() == EXP_MS + 30_000 + GRACE
    assert session.tick(EXP_MS + 30_000 + GRACE - 1) == []
    expect_error(session.tick(EXP_MS + 30_000 + GRACE), E.TOKEN_EXPIRED, fatal=True)


def test_token_expiry_grace_end_turns_typing_off(store: LmdbStore) -> None:
    session = expiring(store, limits=Limits(refresh_grace_ms=GRACE, typing_timeout_ms=60_000))
    call(session, "typing", channel=ROOM, on=True)
    warn_expired(session)
    actions = session.tick(EXP_MS + GRACE)
    assert actions[0] == typing_push(ROOM, False)
    expect_error(actions[1:], E.TOKEN_EXPIRED, fatal=True)


GRACE_REQUESTS = [
    {"t": "join", "channel": ROOM},
    {"t": "leave", "channel": ROOM},
    {"t": "send", "channel": ROOM, "cid": "c", "text": "x"},
    {"t": "edit", "channel": ROOM, "id": "1-1", "text": "x"},
    {"t": "delete", "channel": ROOM, "id": "1-1"},
    {"t": "history", "channel": ROOM},
    {"t": "sync", "channel": ROOM, "since": 0},
    {"t": "read", "channel": ROOM, "seq": 1},
    {"t": "typing", "channel": ROOM, "on": True},
    {"t": "presence", "status": "away"},
    {"t": "presence", "users": ["bob"]},
    {"t": "unread", "channels": [ROOM]},
]


@pytest.mark.parametrize("warned", [True, False], ids=["after-tick", "before-tick"])
@pytest.mark.parametrize("frame", GRACE_REQUESTS, ids=lambda f: f["t"] + "-" + "-".join(f)[:20])
def test_requests_during_the_grace_are_token_expired(
    store: LmdbStore, frame: dict[str, Any], warned: bool
) -> None:
    session = expiring(store)
    if warned:
        warn_expired(session)
    actions = receive(session, {**frame, "rid": 7}, EXP_MS + 1)
    expect_error(actions, E.TOKEN_EXPIRED, rid=7)
    assert session.state is State.READY
    assert store.channels() == [] and session.joined == set()
    expect_error(receive(session, frame, EXP_MS + 2), E.TOKEN_EXPIRED)  # no rid


def test_ping_works_during_the_grace(store: LmdbStore) -> None:
    session = expiring(store)
    warn_expired(session)
    pong(session, 1, EXP_MS + 1)
    assert call(session, "ping", EXP_MS + 2) == [Reply({"t": "pong", "ts": EXP_MS + 2})]
    # Still an unknown type is unknown, and a bad frame is still fatal.
    expect_error(call(session, "nonsense", EXP_MS + 3, rid=2), E.UNKNOWN_TYPE, rid=2)


def test_refresh_in_the_grace_keeps_the_connection(store: LmdbStore) -> None:
    session = expiring(store)
    warn_expired(session)
    actions = call(session, "refresh", EXP_MS + 1_000, rid=1, token=token(ttl_s=20))
    assert actions == [ok(1, exp=NOW_S + 20)]
    assert session.claims is not None and session.claims.exp == NOW_S + 20
    assert session.next_deadline() == NOW_MS + 20_000  # the new token's exp
    assert session.tick(EXP_MS + GRACE) == []  # the old grace no longer closes it
    assert call(session, "join", EXP_MS + GRACE, rid=2, channel=ROOM)[0] == Subscribe(ROOM)
    only_submit(call(session, "send", EXP_MS + GRACE, rid=3, **SEND))
    # The new token expires in its turn: warned again, then closed.
    warn_expired(session, NOW_MS + 20_000)
    expect_error(session.tick(NOW_MS + 20_000 + GRACE), E.TOKEN_EXPIRED, fatal=True)


def test_refresh_before_expiry_moves_the_deadline(store: LmdbStore) -> None:
    session = expiring(store)
    assert call(session, "refresh", NOW_MS + 1_000, rid=1, token=token(ttl_s=7200)) == [
        ok(1, exp=NOW_S + 7200)
    ]
    assert session.next_deadline() == NOW_MS + 1_000 + 2 * Limits().heartbeat_ms  # idle first
    assert session.tick(EXP_MS) == []
    assert session.tick(EXP_MS + GRACE) == []
    assert session.state is State.READY


@pytest.mark.parametrize(
    ("tok", "code"),
    [
        (token("bob", ttl_s=7200), E.UNAUTHORIZED),  # another user
        ("not-a-jwt", E.UNAUTHORIZED),
        (TokenIssuer(OTHER_SECRET).issue("alice", ["*"], RW, 7200, now=NOW_S), E.UNAUTHORIZED),
        (token(ttl_s=5), E.TOKEN_EXPIRED),  # already expired itself
        (token(ttl_s=TTL_S), E.TOKEN_EXPIRED),  # the same, expired token
        (None, E.BAD_REQUEST),
        (5, E.BAD_REQUEST),
        (b"a.b.c", E.BAD_REQUEST),
    ],
    ids=[
        "other-user",
        "garbage",
        "other-secret",
        "expired",
        "same-expired",
        "none",
        "int",
        "bytes",
    ],
)
def test_refused_refresh_keeps_the_connection_and_the_grace(
    store: LmdbStore, tok: Any, code: str
) -> None:
    session = expiring(store)
    call(session, "join", channel=ROOM)
    warn_expired(session)
    claims = session.claims
    frame: dict[str, Any] = {"t": "refresh", "rid": 4}
    if tok is not None:
        frame["token"] = tok
    expect_error(receive(session, frame, EXP_MS + 1), code, rid=4)  # not fatal
    assert session.state is State.READY and session.claims is claims
    assert session.user == "alice" and session.joined == {ROOM}
    # The grace goes on: a good refresh still saves the connection ...
    assert call(session, "refresh", EXP_MS + 2, rid=5, token=token(ttl_s=7200)) == [
        ok(5, exp=NOW_S + 7200)
    ]


def test_refused_refresh_then_the_grace_ends(store: LmdbStore) -> None:
    session = expiring(store)
    warn_expired(session)
    expect_error(
        call(session, "refresh", EXP_MS + 1, rid=1, token=token("bob")), E.UNAUTHORIZED, rid=1
    )
    expect_error(session.tick(EXP_MS + GRACE), E.TOKEN_EXPIRED, fatal=True)
    expect_closed(session)


def test_refresh_leaves_channels_no_longer_allowed(store: LmdbStore) -> None:
    session = connect(store, channels=("room-*", "lobby", "hall"))
    for channel in (ROOM, "lobby", "hall"):
        call(session, "join", channel=channel)
    session.cut_stream("lobby", store.channel("lobby"))
    actions = call(
        session, "refresh", NOW_MS + 1_000, rid=3, token=token(channels=("room-*",), ttl_s=7200)
    )
    assert actions == [
        Unsubscribe("hall"),
        Reply({"t": "left", "channel": "hall", "reason": "forbidden"}),
        Unsubscribe("lobby"),
        Reply({"t": "left", "channel": "lobby", "reason": "forbidden"}),
        ok(3, exp=NOW_S + 7200),
    ]
    assert session.joined == {ROOM} and session.cut == set()
    expect_error(call(session, "join", rid=4, channel="lobby"), E.FORBIDDEN, rid=4)
    expect_error(call(session, "history", rid=5, channel="hall"), E.FORBIDDEN, rid=5)
    # Without a rid the left pushes still go out (they are pushes, not the reply).
    actions = call(session, "refresh", token=token(channels=("room-2",), ttl_s=7200))
    assert actions == [
        Unsubscribe(ROOM),
        Reply({"t": "left", "channel": ROOM, "reason": "forbidden"}),
    ]
    assert session.joined == set()


def test_refreshed_scopes_apply_from_then_on(store: LmdbStore) -> None:
    session = connect(store)
    call(session, "join", channel=ROOM)
    read_only = token(scopes=(SCOPE_READ,), ttl_s=7200)
    assert call(session, "refresh", rid=1, token=read_only) == [ok(1, exp=NOW_S + 7200)]
    expect_error(call(session, "send", rid=2, **SEND), E.FORBIDDEN, rid=2)
    assert session.joined == {ROOM}  # still allowed to read it
    # A send-only token loses read access to every joined channel.
    actions = call(session, "refresh", rid=3, token=token(scopes=(SCOPE_SEND,), ttl_s=7200))
    assert actions == [
        Unsubscribe(ROOM),
        Reply({"t": "left", "channel": ROOM, "reason": "forbidden"}),
        ok(3, exp=NOW_S + 7200),
    ]
    # Widening applies too.
    call(session, "refresh", rid=4, token=token(channels=("*",), scopes=MOD, ttl_s=7200))
    assert call(session, "join", rid=5, channel="lobby")[0] == Subscribe("lobby")
    assert session.claims is not None and session.claims.may_moderate("lobby")


def test_refresh_that_forbids_a_channel_ends_typing_there(store: LmdbStore) -> None:
    session = connect(store, channels=("room-*", "lobby", "hall"))
    call(session, "join", channel="lobby")
    call(session, "typing", channel="lobby", on=True)
    call(session, "typing", channel="hall", on=True)  # typing needs no join
    actions = call(session, "refresh", NOW_MS + 1_000, rid=1, token=token(channels=("room-*",)))
    # The others saw `on`: the joined channel's indicator ends with the leave ...
    assert actions == [
        typing_push("lobby", False),
        Unsubscribe("lobby"),
        Reply({"t": "left", "channel": "lobby", "reason": "forbidden"}),
        ok(1, exp=NOW_S + 3600),
    ]
    assert session.typing == {"hall": NOW_MS + Limits().typing_timeout_ms}
    # ... the other one (not joined, so not left) at its expiry, once each.
    assert session.tick(NOW_MS + Limits().typing_timeout_ms) == [typing_push("hall", False)]


# ------------------------------------------------------------------- typing


def typing_push(channel: str, on: bool, user: str = "alice") -> Publish:
    return Publish(channel, {"t": "typing", "channel": channel, "user": user, "on": on}, user)


TYPING_TIMEOUT = 6_000


def test_typing_on_expires_after_the_timeout(store: LmdbStore) -> None:
    session = connect(store, limits=Limits(typing_timeout_ms=TYPING_TIMEOUT))
    assert call(session, "typing", rid=1, channel=ROOM, on=True) == [
        typing_push(ROOM, True),
        Reply({"t": "ok", "rid": 1}),
    ]
    assert session.next_deadline() == NOW_MS + TYPING_TIMEOUT
    assert session.tick(NOW_MS + TYPING_TIMEOUT - 1) == []
    assert session.tick(NOW_MS + TYPING_TIMEOUT) == [typing_push(ROOM, False)]
    assert session.tick(NOW_MS + TYPING_TIMEOUT + 1) == []  # once
    assert session.next_deadline() == NOW_MS + 2 * Limits().heartbeat_ms
    # It expired: an `off` now has nothing to turn off.
    assert call(session, "typing", NOW_MS + 7_000, rid=2, channel=ROOM, on=False) == [
        Reply({"t": "ok", "rid": 2})
    ]
    assert store.channels() == []  # never stored


def test_typing_off_publishes_and_cancels_the_expiry(store: LmdbStore) -> None:
    session = connect(store, limits=Limits(typing_timeout_ms=TYPING_TIMEOUT))
    call(session, "typing", channel=ROOM, on=True)
    assert call(session, "typing", NOW_MS + 1_000, rid=2, channel=ROOM, on=False) == [
        typing_push(ROOM, False),
        Reply({"t": "ok", "rid": 2}),
    ]
    assert session.typing == {}
    assert session.tick(NOW_MS + TYPING_TIMEOUT) == []


def test_typing_off_without_on_publishes_nothing(store: LmdbStore) -> None:
    session = connect(store)
    assert call(session, "typing", rid=1, channel=ROOM, on=False) == [Reply({"t": "ok", "rid": 1})]
    assert call(session, "typing", channel=ROOM, on=False) == []
    call(session, "typing", channel="room-2", on=True)
    assert call(session, "typing", channel=ROOM, on=False) == []  # another channel's on


def test_typing_renewal_extends_the_deadline(store: LmdbStore) -> None:
    session = connect(store, limits=Limits(typing_timeout_ms=TYPING_TIMEOUT))
    call(session, "typing", channel=ROOM, on=True)
    # A client repeats `on` while typing; each one is pushed (receivers restart their timers).
    assert call(session, "typing", NOW_MS + 4_000, channel=ROOM, on=True) == [
        typing_push(ROOM, True)
    ]
    assert session.next_deadline() == NOW_MS + 4_000 + TYPING_TIMEOUT
    assert session.tick(NOW_MS + TYPING_TIMEOUT) == []
    assert session.tick(NOW_MS + 4_000 + TYPING_TIMEOUT - 1) == []
    assert session.tick(NOW_MS + 4_000 + TYPING_TIMEOUT) == [typing_push(ROOM, False)]


def test_typing_expiry_per_channel(store: LmdbStore) -> None:
    session = connect(store, limits=Limits(typing_timeout_ms=TYPING_TIMEOUT))
    call(session, "typing", channel=ROOM, on=True)
    call(session, "typing", NOW_MS + 1_000, channel="room-2", on=True)
    call(session, "typing", NOW_MS + 2_000, channel="room-3", on=True)
    assert session.next_deadline() == NOW_MS + TYPING_TIMEOUT
    assert session.tick(NOW_MS + TYPING_TIMEOUT) == [typing_push(ROOM, False)]
    assert session.next_deadline() == NOW_MS + 1_000 + TYPING_TIMEOUT
    # A late tick expires everything due, once each.
    assert session.tick(NOW_MS + 10_000) == [
        typing_push("room-2", False),
        typing_push("room-3", False),
    ]
    assert session.tick(NOW_MS + 10_001) == []


def test_closed_turns_typing_off(store: LmdbStore) -> None:
    session = connect(store)
    call(session, "typing", channel=ROOM, on=True)
    call(session, "typing", channel="room-2", on=True)
    call(session, "typing", channel="room-3", on=True)
    call(session, "typing", channel="room-3", on=False)
    assert session.closed("peer closed the connection") == [
        typing_push(ROOM, False),
        typing_push("room-2", False),
    ]
    assert session.closed("again") == []
    assert session.tick(NOW_MS + 10**6) == []
    assert connect(store, sid="s-2").closed("idle client") == []


def test_devices_of_one_user_type_independently(store: LmdbStore) -> None:
    phone = connect(store, limits=Limits(typing_timeout_ms=TYPING_TIMEOUT))
    laptop = connect(store, limits=Limits(typing_timeout_ms=TYPING_TIMEOUT), sid="s-2")
    assert call(phone, "typing", channel=ROOM, on=True) == [typing_push(ROOM, True)]
    assert call(laptop, "typing", channel=ROOM, on=False) == []  # the laptop was not typing
    assert phone.typing == {ROOM: NOW_MS + TYPING_TIMEOUT}
    assert laptop.closed("gone") == []
    assert phone.tick(NOW_MS + TYPING_TIMEOUT) == [typing_push(ROOM, False)]


def test_after_a_fatal_frame_closed_turns_typing_off(store: LmdbStore) -> None:
    session = connect(store)
    call(session, "typing", channel=ROOM, on=True)
    expect_error(receive(session, {"rid": 1}, NOW_MS), E.BAD_FRAME, rid=1, fatal=True)
    assert session.closed("bad_frame") == [typing_push(ROOM, False)]


@pytest.mark.parametrize("code", [E.HELLO_TIMEOUT, E.FRAME_TIMEOUT])
def test_timed_out_is_fatal_with_its_code(store: LmdbStore, code: str) -> None:
    session = new_session(store) if code == E.HELLO_TIMEOUT else connect(store)
    frame = expect_error(session.timed_out(code), code, fatal=True)
    assert "rid" not in frame
    assert session.close_reason is not None and session.close_reason.startswith(code)
    expect_closed(session)


def test_frame_timeout_turns_typing_off(store: LmdbStore) -> None:
    session = connect(store)
    call(session, "typing", channel=ROOM, on=True)
    actions = session.timed_out(E.FRAME_TIMEOUT)
    assert actions[0] == typing_push(ROOM, False)
    expect_error(actions[1:], E.FRAME_TIMEOUT, fatal=True)
    assert session.closed("frame_timeout") == []


def test_timed_out_after_close_does_nothing(store: LmdbStore) -> None:
    session = connect(store)
    session.closed("peer closed the connection")
    assert session.timed_out(E.FRAME_TIMEOUT) == []
    assert session.close_reason == "peer closed the connection"


TYPING_LIMITS = Limits(typing_rate=2, typing_burst=3)  # a token per 500 ms


def test_typing_rate_limit(store: LmdbStore) -> None:
    session = connect(store, limits=TYPING_LIMITS)
    call(session, "typing", rid=1, channel=ROOM, on=True)
    call(session, "typing", rid=2, channel=ROOM, on=False)
    assert call(session, "typing", rid=3, channel=ROOM, on=False) == [Reply({"t": "ok", "rid": 3})]
    actions = call(session, "typing", rid=4, channel="room-2", on=True)
    expect_error(actions, E.RATE_LIMITED, rid=4, retry_after_ms=500)
    assert session.typing == {}  # the refused `on` starts no indicator
    expect_error(
        call(session, "typing", NOW_MS + 250, channel=ROOM, on=True),
        E.RATE_LIMITED,
        retry_after_ms=250,
    )
    # Typing has its own budget: sends and pings go on.
    only_submit(call(session, "send", rid=5, **SEND))
    pong(session, 6, NOW_MS + 250)
    assert call(session, "typing", NOW_MS + 500, rid=7, channel="room-2", on=True) == [
        typing_push("room-2", True),
        Reply({"t": "ok", "rid": 7}),
    ]


def test_typing_rate_is_per_user_across_sessions(store: LmdbStore) -> None:
    shared = UserLimits(TYPING_LIMITS)
    phone = connect(store, limits=TYPING_LIMITS, user_limits=shared)
    laptop = connect(store, limits=TYPING_LIMITS, sid="s-2", user_limits=shared)
    bob = connect(store, "bob", limits=TYPING_LIMITS, sid="s-3", user_limits=shared)
    call(phone, "typing", channel=ROOM, on=True)
    call(laptop, "typing", channel=ROOM, on=True)
    call(phone, "typing", channel="room-2", on=True)
    expect_error(
        call(laptop, "typing", rid=1, channel=ROOM, on=True),
        E.RATE_LIMITED,
        rid=1,
        retry_after_ms=500,
    )
    assert call(bob, "typing", channel=ROOM, on=True) == [typing_push(ROOM, True, "bob")]


# ------------------------------------------------------------------- send rate limits


def send_at(
    session: Session, rid: int | None, now_ms: int = NOW_MS, channel: str = ROOM
) -> list[Action]:
    frame: dict[str, Any] = {"t": "send", "channel": channel, "cid": f"c{rid}-{now_ms}"}
    frame["text"] = "x"
    if rid is not None:
        frame["rid"] = rid
    return receive(session, frame, now_ms)


def limited(actions: list[Action], rid: int | None, retry_after_ms: int) -> None:
    expect_error(actions, E.RATE_LIMITED, rid=rid, retry_after_ms=retry_after_ms)


USER_RATE = Limits(send_rate=10, send_burst=3, channel_send_rate=1e6, channel_send_burst=10**6)


def test_send_rate_is_per_user_across_sessions(store: LmdbStore) -> None:
    shared = UserLimits(USER_RATE)  # the server passes one object to every session
    phone = connect(store, limits=USER_RATE, user_limits=shared)
    laptop = connect(store, limits=USER_RATE, sid="s-2", user_limits=shared)
    bob = connect(store, "bob", limits=USER_RATE, sid="s-3", user_limits=shared)
    only_submit(send_at(phone, 1))
    only_submit(send_at(laptop, 2, channel="room-2"))
    only_submit(send_at(phone, 3))
    limited(send_at(laptop, 4), 4, retry_after_ms=100)  # a token per 100 ms
    limited(send_at(phone, 5, NOW_MS + 50), 5, retry_after_ms=50)  # half a token is back
    limited(send_at(phone, None, NOW_MS + 50), None, retry_after_ms=50)  # no rid: still told
    for rid in range(6, 9):  # another user is unaffected
        only_submit(send_at(bob, rid))
    only_submit(send_at(laptop, 9, NOW_MS + 100))
    limited(send_at(phone, 10, NOW_MS + 100), 10, retry_after_ms=100)
    # A long pause refills the burst, no more.
    for rid in range(11, 14):
        only_submit(send_at(phone, rid, NOW_MS + 60_000))
    limited(send_at(laptop, 14, NOW_MS + 60_000), 14, retry_after_ms=100)
    assert store.channels() == []  # a refused send never reaches the store


def test_edits_and_deletes_spend_the_send_budget(store: LmdbStore) -> None:
    limits = Limits(send_rate=10, send_burst=2, channel_send_rate=1e6, channel_send_burst=10**6)
    session = connect(store, limits=limits)
    only_submit(call(session, "edit", rid=1, channel=ROOM, id="1-1", text="x"))
    only_submit(call(session, "delete", rid=2, channel=ROOM, id="1-1"))
    limited(send_at(session, 3), 3, retry_after_ms=100)
    limited(call(session, "edit", rid=4, channel=ROOM, id="1-1", text="y"), 4, retry_after_ms=100)
    limited(call(session, "delete", rid=5, channel=ROOM, id="1-1"), 5, retry_after_ms=100)
    # Reads, cursors and typing are not sends.
    only_submit(call(session, "read", rid=6, channel=ROOM, seq=0))
    assert call(session, "history", rid=7, channel=ROOM) == [
        ok(7, channel=ROOM, messages=[], more=False)
    ]


CHANNEL_RATE = Limits(send_rate=1e6, send_burst=10**6, channel_send_rate=5, channel_send_burst=2)


def test_send_rate_per_user_and_channel(store: LmdbStore) -> None:
    shared = UserLimits(CHANNEL_RATE)
    phone = connect(store, limits=CHANNEL_RATE, user_limits=shared)
    laptop = connect(store, limits=CHANNEL_RATE, sid="s-2", user_limits=shared)
    bob = connect(store, "bob", limits=CHANNEL_RATE, sid="s-3", user_limits=shared)
    only_submit(send_at(phone, 1))
    only_submit(send_at(laptop, 2))
    limited(send_at(phone, 3), 3, retry_after_ms=200)  # a token per 200 ms
    only_submit(send_at(phone, 4, channel="room-2"))  # another room has its own budget
    only_submit(send_at(laptop, 5, channel="room-2"))
    limited(send_at(laptop, 6, channel="room-2"), 6, retry_after_ms=200)
    only_submit(send_at(bob, 7))  # so has another user in the same room
    only_submit(send_at(bob, 8))
    limited(send_at(laptop, 9, NOW_MS + 100), 9, retry_after_ms=100)
    only_submit(send_at(laptop, 10, NOW_MS + 200))
    limited(send_at(phone, 11, NOW_MS + 200), 11, retry_after_ms=200)


SLOW = Limits(
    send_rate=1 / 64,  # a token per 64 s (a power of two: the refill math stays exact)
    send_burst=1,
    rate_limited_disconnect_ms=10_000,
)


def test_client_that_keeps_sending_while_limited_is_disconnected(store: LmdbStore) -> None:
    session = connect(store, limits=SLOW)
    only_submit(send_at(session, 0))
    for i in range(10):  # refused from NOW_MS to NOW_MS + 9 s: still connected
        limited(send_at(session, i + 1, NOW_MS + i * 1000), i + 1, 64_000 - i * 1000)
    actions = send_at(session, 11, NOW_MS + 10_000)
    frame = expect_error(actions, E.RATE_LIMITED, rid=11, fatal=True, retry_after_ms=54_000)
    assert "10000 ms" in frame["message"] and "disconnect" in frame["message"]
    assert isinstance(actions[1], Close) and "10000 ms" in actions[1].reason
    expect_closed(session)


def test_client_that_pauses_is_not_disconnected(store: LmdbStore) -> None:
    session = connect(store, limits=SLOW)
    only_submit(send_at(session, 0))
    limited(send_at(session, 1), 1, retry_after_ms=64_000)
    # It waits as told: the next send is accepted and ends the run of refusals.
    only_submit(send_at(session, 2, NOW_MS + 64_000))
    for i in range(10):
        limited(send_at(session, 3, NOW_MS + 64_000 + i * 1000), 3, 64_000 - i * 1000)
    # The bound counts from the first refusal of the new run.
    expect_error(
        send_at(session, 4, NOW_MS + 74_000),
        E.RATE_LIMITED,
        rid=4,
        fatal=True,
        retry_after_ms=54_000,
    )


def test_an_accepted_frame_ends_the_run_of_refusals(store: LmdbStore) -> None:
    session = connect(store, limits=SLOW)
    only_submit(send_at(session, 0))
    limited(send_at(session, 1), 1, retry_after_ms=64_000)
    limited(send_at(session, 2, NOW_MS + 500), 2, retry_after_ms=63_500)
    pong(session, 3, NOW_MS + 1_000)  # processed without error: the run is over
    for t in range(1_000, 11_000, 500):  # refused every 500 ms: one unbroken run
        limited(send_at(session, 4, NOW_MS + t), 4, retry_after_ms=64_000 - t)
    expect_error(
        send_at(session, 5, NOW_MS + 11_000),
        E.RATE_LIMITED,
        rid=5,
        fatal=True,
        retry_after_ms=53_000,
    )


def test_frame_rate_refusals_count_toward_the_disconnect(store: LmdbStore) -> None:
    session = connect(store, limits=Limits(frame_rate=1 / 64, frame_burst=1))
    pong(session, 0, NOW_MS)
    for t in range(0, 10_000, 500):
        rate_limited(session, 1, NOW_MS + t, retry_after_ms=64_000 - t)
    actions = call(session, "ping", NOW_MS + 10_000, rid=3)
    frame = expect_error(actions, E.RATE_LIMITED, rid=3, fatal=True, retry_after_ms=54_000)
    assert "10000 ms" in frame["message"]


def test_a_device_that_obeys_retry_after_is_not_disconnected(store: LmdbStore) -> None:
    # The buckets are the user's, the run of refusals the connection's: a device refused
    # once that waits far longer than it was told is not "sending while limited", even if
    # another device of the user keeps the shared bucket empty meanwhile.
    limits = Limits(send_rate=10, send_burst=1, channel_send_rate=1e6, channel_send_burst=10**6)
    shared = UserLimits(limits)
    phone = connect(store, limits=limits, user_limits=shared)
    laptop = connect(store, limits=limits, sid="s-2", user_limits=shared)
    only_submit(send_at(laptop, 0))
    limited(send_at(phone, 1), 1, retry_after_ms=100)
    for t in range(100, 10_001, 100):  # the laptop takes every token as it comes back
        only_submit(send_at(laptop, t, NOW_MS + t))
    limited(send_at(phone, 2, NOW_MS + 10_000), 2, retry_after_ms=100)
    assert phone.state is State.READY


def test_the_frame_rate_applies_before_token_expiry(store: LmdbStore) -> None:
    session = expiring(store, limits=Limits(refresh_grace_ms=GRACE, frame_rate=10, frame_burst=1))
    warn_expired(session)
    expect_error(call(session, "history", EXP_MS, rid=1, channel=ROOM), E.TOKEN_EXPIRED, rid=1)
    expect_error(
        call(session, "refresh", EXP_MS, rid=2, token=token(ttl_s=7200)),
        E.RATE_LIMITED,
        rid=2,
        retry_after_ms=100,
    )
    assert call(session, "refresh", EXP_MS + 100, rid=3, token=token(ttl_s=7200)) == [
        ok(3, exp=NOW_S + 7200)
    ]


# ------------------------------------------------------------------- presence


def test_presence_status(store: LmdbStore) -> None:
    session = connect(store)
    for rid, status in enumerate(["online", "away", "busy", "offline", "in a meeting 🙂"]):
        assert call(session, "presence", rid=rid, status=status) == [
            SetPresence(status),
            ok(rid, status=status),
        ]
    assert call(session, "presence", status="away") == [SetPresence("away")]  # no rid, no ok
    longest = "é" * Limits().max_status_chars  # counted in characters
    assert call(session, "presence", rid=9, status=longest) == [
        SetPresence(longest),
        ok(9, status=longest),
    ]


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("", E.LIMIT_EXCEEDED),
        ("x" * 65, E.LIMIT_EXCEEDED),
        (None, E.BAD_REQUEST),
        (5, E.BAD_REQUEST),
        (True, E.BAD_REQUEST),
        (b"away", E.BAD_REQUEST),
        (["away"], E.BAD_REQUEST),
    ],
    ids=repr,
)
def test_presence_status_validation(store: LmdbStore, status: Any, code: str) -> None:
    session = connect(store)
    frame: dict[str, Any] = {"t": "presence", "rid": 2}
    if status is not None:
        frame["status"] = status
    expect_error(receive(session, frame, NOW_MS), code, rid=2)  # no SetPresence


def test_presence_status_limit_is_a_setting(store: LmdbStore) -> None:
    session = connect(store, limits=Limits(max_status_chars=4))
    assert call(session, "presence", rid=1, status="busy")[0] == SetPresence("busy")
    expect_error(call(session, "presence", rid=2, status="busy!"), E.LIMIT_EXCEEDED, rid=2)


def test_presence_query(store: LmdbStore) -> None:
    session = connect(store)
    users = ["bob", "carol", "bob", "alice", "carol", "dave"]
    assert call(session, "presence", rid=3, users=users) == [
        QueryPresence(3, ["bob", "carol", "alice", "dave"])  # deduplicated, order kept
    ]
    assert call(session, "presence", users=["bob"]) == [QueryPresence(None, ["bob"])]
    assert call(session, "presence", rid=5, users=[]) == [QueryPresence(5, [])]  # may be empty
    # `users` wins over `status`: a query sets nothing.
    assert call(session, "presence", rid=4, users=["bob"], status="away") == [
        QueryPresence(4, ["bob"])
    ]


@pytest.mark.parametrize(
    "users",
    ["bob", 5, {"bob": 1}, [5], ["bob", None], ["bob", ""], ["a b"], [b"bob"], [["bob"]]],
    ids=repr,
)
def test_presence_query_validation(store: LmdbStore, users: Any) -> None:
    session = connect(store)
    expect_error(call(session, "presence", rid=5, users=users), E.BAD_REQUEST, rid=5)


def test_presence_query_limit(store: LmdbStore) -> None:
    session = connect(store)
    most = Limits().max_presence_users
    users = [f"u{i}" for i in range(most)]
    assert call(session, "presence", rid=1, users=users) == [QueryPresence(1, users)]
    expect_error(
        call(session, "presence", rid=2, users=[*users, "one-more"]), E.LIMIT_EXCEEDED, rid=2
    )
    small = connect(store, limits=Limits(max_presence_users=2), sid="s-2")
    expect_error(call(small, "presence", rid=3, users=["a", "b", "c"]), E.LIMIT_EXCEEDED, rid=3)


# ------------------------------------------------------------------- unread counts


@pytest.fixture
def unread_scenario(store: LmdbStore) -> LmdbStore:
    """room-1: bob 1, alice 2 (own), bob 3 (deleted), bob 4 (edited), carol 7; alice has
    read up to 1. room-2: two of bob's, never read. room-3 does not exist."""
    store.append(ROOM, "bob", "c1", "one")
    store.append(ROOM, "alice", "c2", "mine")
    gone = store.append(ROOM, "bob", "c3", "gone")
    kept = store.append(ROOM, "bob", "c4", "kept")
    store.delete(ROOM, "bob", gone.id)  # seq 5
    store.edit(ROOM, "bob", kept.id, "kept!")  # seq 6
    store.append(ROOM, "carol", "c7", "hi")
    store.set_read("alice", ROOM, 1)
    store.append("room-2", "bob", "c1", "a")
    store.append("room-2", "bob", "c2", "b")
    return store


def test_unread_counts(unread_scenario: LmdbStore) -> None:
    store = unread_scenario
    session = connect(store)
    channels = [ROOM, "room-2", "room-3"]
    assert call(session, "unread", rid=1, channels=channels) == [
        ok(1, unread={ROOM: 2, "room-2": 2, "room-3": 0}, capped=[])
    ]
    assert call(session, "unread", channels=channels) == []  # no rid: nothing to answer
    assert call(session, "unread", rid=2, channels=[]) == [ok(2, unread={}, capped=[])]
    # Reading moves the count: up to seq 4 leaves only carol's message.
    done(store, call(session, "read", rid=3, channel=ROOM, seq=4))
    assert call(session, "unread", rid=4, channels=[ROOM]) == [ok(4, unread={ROOM: 1}, capped=[])]
    # Bob's own messages are not unread to him; his cursor is 0.
    bob = connect(store, "bob", sid="s-2")
    assert call(bob, "unread", rid=5, channels=[ROOM, "room-2"]) == [
        ok(5, unread={ROOM: 2, "room-2": 0}, capped=[])
    ]


def test_unread_of_a_forbidden_channel(unread_scenario: LmdbStore) -> None:
    store = unread_scenario
    store.append("lobby", "bob", "c1", "x")
    session = connect(store)
    expect_error(call(session, "unread", rid=1, channels=[ROOM, "lobby"]), E.FORBIDDEN, rid=1)
    expect_error(call(session, "unread", rid=2, channels=["dm:bob:carol"]), E.FORBIDDEN, rid=2)
    send_only = connect(store, scopes=(SCOPE_SEND,), sid="s-2")
    expect_error(call(send_only, "unread", rid=3, channels=[ROOM]), E.FORBIDDEN, rid=3)


@pytest.mark.parametrize(
    "channels",
    [None, ROOM, 5, {ROOM: 1}, [5], [ROOM, None], [b"room-1"], [""], ["room 1"]],
    ids=repr,
)
def test_unread_validation(store: LmdbStore, channels: Any) -> None:
    session = connect(store)
    frame: dict[str, Any] = {"t": "unread", "rid": 6}
    if channels is not None:
        frame["channels"] = channels
    expect_error(receive(session, frame, NOW_MS), E.BAD_REQUEST, rid=6)


def test_unread_channel_count_limit(store: LmdbStore) -> None:
    session = connect(store, limits=Limits(max_presence_users=2))
    assert call(session, "unread", rid=1, channels=["room-1", "room-2"]) == [
        ok(1, unread={"room-1": 0, "room-2": 0}, capped=[])
    ]
    expect_error(
        call(session, "unread", rid=2, channels=["room-1", "room-2", "room-3"]),
        E.LIMIT_EXCEEDED,
        rid=2,
    )


def test_unread_scan_is_capped(store: LmdbStore) -> None:
    for i in range(5):
        store.append(ROOM, "bob", f"c{i}", "x")
    for i in range(3):
        store.append("room-2", "bob", f"c{i}", "x")
    session = connect(store, limits=Limits(unread_scan_max=3))
    assert call(session, "unread", rid=1, channels=[ROOM, "room-2"]) == [
        ok(1, unread={ROOM: 3, "room-2": 3}, capped=[ROOM])  # room-2: exactly 3, exact
    ]
    store.set_read("alice", ROOM, 1)  # 4 entries left: still capped
    assert call(session, "unread", rid=2, channels=[ROOM]) == [
        ok(2, unread={ROOM: 3}, capped=[ROOM])
    ]
    store.set_read("alice", ROOM, 2)  # 3 entries left: exact again
    assert call(session, "unread", rid=3, channels=[ROOM]) == [ok(3, unread={ROOM: 3}, capped=[])]


def test_unread_scan_counts_entries_not_messages(store: LmdbStore) -> None:
    # The bound is on log entries read: edits and deletes use it up too.
    first = store.append(ROOM, "bob", "c0", "x")
    store.edit(ROOM, "bob", first.id, "y")
    store.edit(ROOM, "bob", first.id, "z")
    store.append(ROOM, "bob", "c1", "x")
    session = connect(store, limits=Limits(unread_scan_max=3))
    assert call(session, "unread", rid=1, channels=[ROOM]) == [
        ok(1, unread={ROOM: 1}, capped=[ROOM])
    ]


def test_unread_names_each_capped_channel_once(store: LmdbStore) -> None:
    for i in range(5):
        store.append(ROOM, "bob", f"c{i}", "x")
    session = connect(store, limits=Limits(unread_scan_max=3))
    assert call(session, "unread", rid=1, channels=[ROOM, ROOM]) == [
        ok(1, unread={ROOM: 3}, capped=[ROOM])
    ]


# ------------------------------------------------------------------- welcome limits


def test_welcome_announces_the_signal_limits(store: LmdbStore) -> None:
    limits = Limits(
        heartbeat_ms=5_000,
        send_rate=3.5,
        typing_timeout_ms=4_000,
        refresh_grace_ms=7_000,
        max_status_chars=10,
        unread_scan_max=99,
    )
    session = new_session(store, limits)
    [welcome, _] = receive(session, {"t": "hello", "v": 1, "token": token()}, NOW_MS)
    assert isinstance(welcome, Reply)
    announced = welcome.frame["limits"]
    assert welcome.frame["heartbeat_ms"] == 5_000
    assert set(announced) >= {
        "send_rate",
        "send_burst",
        "channel_send_rate",
        "channel_send_burst",
        "typing_rate",
        "typing_burst",
        "typing_timeout_ms",
        "refresh_grace_ms",
        "max_status_chars",
        "max_presence_users",
        "unread_scan_max",
    }
    assert (announced["send_rate"], announced["typing_timeout_ms"]) == (3.5, 4_000)
    assert (announced["refresh_grace_ms"], announced["max_status_chars"]) == (7_000, 10)
    assert (announced["unread_scan_max"], announced["send_burst"]) == (99, 50)
    encode(welcome.frame, limits.max_frame)


# ------------------------------------------------------------------- fuzzing


REQUEST_TYPES = [
    "send",
    "edit",
    "delete",
    "read",
    "sync",
    "history",
    "join",
    "leave",
    "typing",
    "ping",
    "presence",
    "refresh",
    "unread",
]
OTHER_TYPES = ["hello", "event", "ok", "error", "welcome", "left", ""]
CHANNELS = ["room-1", "room-1", "room-2", "lobby", "dm:alice:bob", "dm:bob:carol", "dm:bob:alice"]
IDS = ["1-1", "1-2", "1-3", "2-1", "1-999", "x"]

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=8,
)


# Plausible values per field, so that most frames get past validation some of the time.
GOOD_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "cid": st.text(min_size=1, max_size=8),
    "text": st.text(max_size=16),
    "meta": st.dictionaries(st.text(max_size=4), values, max_size=3),
    "id": st.sampled_from(IDS),
    "seq": st.integers(min_value=0, max_value=5),
    "since": st.integers(min_value=0, max_value=5),
    "limit": st.integers(min_value=1, max_value=5),
    "before": st.integers(min_value=1, max_value=5),
    "on": st.booleans(),
    "v": st.just(1),
    "token": st.sampled_from(["not-a-jwt", token("alice", ("room-1",)), token("bob")]),
    "status": st.sampled_from(["online", "away", "", "x" * 65]),
    "users": st.lists(st.sampled_from(["alice", "bob", "carol", "", "a b"]), max_size=4),
    "channels": st.lists(st.sampled_from(CHANNELS), max_size=3),
}


@st.composite
def frames(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly well-typed requests with some fields absent or arbitrary, sometimes wholly
    arbitrary maps (no ``t``, ``t`` of any type, unknown keys)."""
    frame: dict[str, Any] = draw(st.dictionaries(st.text(max_size=6), values, max_size=3))
    for name, good in GOOD_FIELDS.items():
        how = draw(st.sampled_from(["good", "good", "absent", "any"]))
        if how != "absent":
            frame[name] = draw(good if how == "good" else values)
    kind = draw(st.integers(min_value=0, max_value=12))
    if kind < 11:
        frame["t"] = draw(st.sampled_from(REQUEST_TYPES))
    elif kind == 11:
        frame["t"] = draw(st.sampled_from(OTHER_TYPES) | st.text(max_size=8))
    else:
        frame["t"] = draw(values)  # also a missing `t`: None is dropped below
    how = draw(st.sampled_from(["good", "good", "absent", "any"]))
    if how != "absent":
        frame["channel"] = draw(st.sampled_from(CHANNELS) if how == "good" else values)
    how = draw(st.sampled_from(["good", "good", "good", "absent", "any"]))
    if how != "absent":
        rid = st.integers(min_value=-(2**63), max_value=2**63 - 1)
        frame["rid"] = draw(rid if how == "good" else values)
    if frame["t"] is None:
        del frame["t"]
    return frame


def check_actions(actions: object, limits: Limits) -> None:
    assert isinstance(actions, list)
    for action in actions:
        assert isinstance(action, ACTION_TYPES), action
        if isinstance(action, (Reply, Publish)):
            encode(action.frame, limits.max_frame)  # encodable, within max_frame
        if isinstance(action, Reply) and action.frame["t"] == "error":
            assert action.frame["code"] in ERROR_CODES, action.frame
            assert isinstance(action.frame["message"], str)


def snapshot(store: LmdbStore) -> dict[str, Any]:
    return {name: store.channel(name) for name in store.channels()}


def test_arbitrary_frames_never_raise(tmp_path: Path) -> None:
    limits = Limits()
    with open_store(tmp_path / "fuzz") as store:
        # Some data to aim at: room-1 holds messages 1-1..1-3 (two alice's, one bob's).
        store.append(ROOM, "alice", "c1", "one")
        store.append(ROOM, "bob", "c2", "two")
        store.append(ROOM, "alice", "c3", "three")

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(frame=frames(), moderator=st.booleans())
        def run(frame: dict[str, Any], moderator: bool) -> None:
            session = connect(store, scopes=MOD if moderator else RW, limits=limits)
            before = snapshot(store)
            actions = receive(session, frame, NOW_MS)
            check_actions(actions, limits)
            submits = [a.op for a in actions if isinstance(a, Submit)]
            if not submits:
                assert snapshot(store) == before  # bad input touches no stored data
            for op in submits:
                assert op.user == "alice" and op.origin is session
                assert session.claims is not None
                allowed = session.claims.may_read if op.kind == "read" else session.claims.may_send
                assert allowed(op.channel), op
                assert op.moderator == (moderator and op.kind in ("edit", "delete"))
                check_actions(session.write_done(commit(store, op)), limits)

        run()


@pytest.mark.parametrize("status", ["\0", "away\n", "a\x1fb", "\x7f"])
def test_a_status_with_a_control_character_is_refused(store: LmdbStore, status: str) -> None:
    """PROTOCOL.md 6.13: a status holds no control characters. A review found "\\0" (one
    character, so within the length) taken for the store's marker of a connected device:
    set in memory as "online", ignored on Redis, and echoed in the ok."""
    session = connect(store)
    expect_error(call(session, "presence", rid=3, status=status), E.BAD_REQUEST, rid=3)


def test_without_unsendable_meta_strips_only_the_refused_entries() -> None:
    """What a frame that could not be encoded is sent as (PROTOCOL.md 6.4): the ``meta``
    of an entry stored before the send checks is left out, every other field and entry
    kept; None when there is nothing to leave out (the encoding failed for another reason,
    which is then raised)."""
    deep: Any = 1
    for _ in range(DEFAULT_MAX_DEPTH - META_PAGE_DEPTH + 1):
        deep = [deep]
    ok_meta = {"a": [1.5]}
    event = {"t": "event", "channel": "c", "seq": 1, "text": "x", "meta": {"k": deep}}
    assert without_unsendable_meta(event) == {"t": "event", "channel": "c", "seq": 1, "text": "x"}
    assert without_unsendable_meta({**event, "meta": ok_meta}) is None
    nan = {"seq": 2, "meta": {"f": float("inf")}}
    page = {"t": "ok", "rid": 3, "events": [event, nan, {"seq": 3, "meta": ok_meta}]}
    fixed = without_unsendable_meta(page)
    assert fixed is not None and fixed["rid"] == 3
    assert [e.get("meta") for e in fixed["events"]] == [None, None, ok_meta]
    assert page["events"][1] is nan and "meta" in nan  # the original is untouched
    history = {"t": "ok", "rid": 4, "messages": [{"seq": 1, "meta": ok_meta}]}
    assert without_unsendable_meta(history) is None
