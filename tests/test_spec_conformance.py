"""PROTOCOL.md read as a client author in another language would read it: its normative
sentences checked against the real server over TCP (and a WebSocket where section 19
says so), at the edges the other suites leave out: nil fields, values exactly at and one
past a limit, Unicode counted in code points, epochs of 0, duplicate cids, pipelined
requests, the example frames' bytes as the running server writes them, and the token
claims of section 5.1 forged by hand (as a non-Python issuer would make them).

Each test names the section and sentence it checks. A test that fails documents a
deviation between the document and the server (see the report that came with it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from conftest import (
    SECRET,
    WS_JSON,
    WS_MSGPACK,
    Harness,
    WireClient,
    fast_limits,
    make_settings,
    mint,
    running_server,
    ws_connect,
)
from test_server_requests import assert_error, assert_open, frames_before_pong
from test_server_requests import send_ok as send
from tsmsg import DEFAULT_MAX_DEPTH
from tsmsg.server.settings import Settings
from tsmsg.store import WriteOp

ROOM = "room-1"
Frame = dict[str, Any]


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """The harness's settings; a test may override some (indirect parametrization)."""
    return make_settings(tmp_path / "data", **getattr(request, "param", {}))


def with_settings(**overrides: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("settings", [overrides], indirect=True)


# ----------------------------------------------------------------------------- helpers


async def join(client: WireClient, channel: str = ROOM) -> Frame:
    ok = await client.request("join", channel=channel)
    assert ok["t"] == "ok", ok
    return ok


async def quiet(client: WireClient, t: str | None = None) -> list[Frame]:
    """The frames (of type ``t``) queued for ``client`` before a ping sent now; no
    membership notices (they come whenever a membership record commits)."""
    frames = await frames_before_pong(client)
    return [f for f in frames if t is None or f.get("t") == t]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(payload: Any, header: Any = None, *, raw_payload: str | None = None) -> str:
    """An HS256 JWT made by hand, as an issuer in another language would (section 5.1)."""
    head = json.dumps(header if header is not None else {"alg": "HS256", "typ": "JWT"})
    body = raw_payload if raw_payload is not None else json.dumps(payload)
    signing = f"{b64url(head.encode())}.{b64url(body.encode())}"
    sig = hmac.new(SECRET, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64url(sig)}"


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "sub": "alice",
        "exp": now + 600,
        "scope": ["chat:read", "chat:send"],
        "channels": ["*"],
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


async def hello_with(h: Harness, token: str) -> tuple[WireClient, Frame]:
    client = await h.raw()
    reply = await client.request("hello", v=1, token=token)
    return client, reply


def hexdump_bytes(dump: str) -> bytes:
    """The bytes of a ``hexdump -C`` block of PROTOCOL.md."""
    out = bytearray()
    for line in dump.strip().splitlines():
        cols = line.split("|")[0].split()[1:]
        out += bytes(int(c, 16) for c in cols)
    return bytes(out)


class RawReader:
    """Whole frames of a connection as the bytes the server wrote (prefix included)."""

    def __init__(self, client: WireClient) -> None:
        self.client = client
        self.buf = b""

    async def frame(self) -> bytes:
        with trio.fail_after(5):
            while True:
                if len(self.buf) >= 4:
                    (n,) = struct.unpack(">I", self.buf[:4])
                    if len(self.buf) >= 4 + n:
                        out, self.buf = self.buf[: 4 + n], self.buf[4 + n :]
                        return out
                data = await self.client.stream.receive_some(65536)
                if not data:
                    raise EOFError
                self.buf += data

    async def until(self, t: str, **fields: Any) -> bytes:
        while True:
            raw = await self.frame()
            value = msgpack.unpackb(raw[4:])
            if value.get("t") == t and all(value.get(k) == v for k, v in fields.items()):
                return raw


# ======================================================== section 2: nil, types, rid


async def test_nil_rid_is_no_rid_for_a_request_that_answers_ok(harness: Harness) -> None:
    """2: "a field whose value is nil is treated as absent, in every frame and for every
    field (rid included)" and "A request without a rid gets no ok"."""
    alice = await harness.connect("alice")
    await alice.send({"t": "join", "rid": None, "channel": ROOM})
    await alice.send({"t": "ping", "rid": None})
    pong = await alice.expect("pong")
    assert "rid" not in pong
    assert await quiet(alice, "ok") == []


@pytest.mark.parametrize(
    ("t", "fields"),
    [
        ("send", {"channel": ROOM, "cid": "n1", "text": "x", "meta": None}),
        ("history", {"channel": ROOM, "before": None, "limit": None}),
        ("sync", {"channel": ROOM, "since": 0, "limit": None, "epoch": None}),
        ("leave", {"channel": ROOM, "forget": None}),
        ("channels", {"after": None}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
async def test_nil_optional_fields_are_absent(harness: Harness, t: str, fields: Frame) -> None:
    """2: a nil field "is treated as absent, in every frame and for every field"; 7:
    "Optional fields are absent when they do not apply (never nil)"."""
    alice = await harness.connect("alice")
    reply = await alice.request(t, **fields)
    assert reply["t"] == "ok", reply
    assert None not in reply.values(), reply
    if t == "send":
        [msg] = (await alice.request("history", channel=ROOM))["messages"]
        assert "meta" not in msg
    if t == "leave":
        assert "forgotten" not in reply


async def test_nil_users_in_presence_is_a_status_set(harness: Harness) -> None:
    """6.13: "A frame with a users field (not nil) is a query; otherwise it sets the
    status"."""
    alice = await harness.connect("alice")
    reply = await alice.request("presence", users=None, status="busy")
    assert reply == {"t": "ok", "rid": reply["rid"], "status": "busy"}


async def test_a_frame_with_users_and_status_is_a_query(harness: Harness) -> None:
    alice = await harness.connect("alice")
    reply = await alice.request("presence", users=["alice"], status="busy")
    assert reply["t"] == "ok" and "users" in reply and "status" not in reply, reply
    assert reply["users"][0]["status"] == "online"  # nothing was set


@pytest.mark.parametrize(
    "fields",
    [{"since": 0.0}, {"since": True}, {"since": 0, "epoch": True}, {"since": 0, "limit": True}],
    ids=repr,
)
async def test_float_or_bool_is_never_an_int(harness: Harness, fields: Frame) -> None:
    """2: "A float is never accepted where an int is expected, nor a bool"."""
    alice = await harness.connect("alice")
    assert_error(await alice.request("sync", channel=ROOM, **fields), "bad_request")


async def test_any_int_width_is_accepted(harness: Harness) -> None:
    """2: int: "any width; the value matters, not the encoding" (uint 64 for a 0, int 8 for
    a rid, uint 16 for a limit)."""
    alice = await harness.connect("alice")
    await send(alice, "x")
    body = (
        b"\x85"
        + b"\xa1t\xa4sync"
        + b"\xa3rid\xd0\x05"  # int 8: 5
        + b"\xa7channel\xa6room-1"
        + b"\xa5since\xcf\x00\x00\x00\x00\x00\x00\x00\x00"  # uint 64: 0
        + b"\xa5limit\xcd\x00\x01"  # uint 16: 1
    )
    await alice.send_raw(struct.pack(">I", len(body)) + body)
    reply = await alice.next(lambda f: f.get("rid") == 5)
    assert reply["t"] == "ok" and [e["seq"] for e in reply["events"]] == [1], reply


async def test_the_server_emits_the_smallest_int_encoding(harness: Harness) -> None:
    """2: "The server always emits the smallest encoding of each value"; ts as uint 64."""
    client = await harness.raw()
    raw = RawReader(client)
    await client.send({"t": "hello", "rid": 1, "v": 1, "token": mint("alice")})
    await raw.until("welcome")
    await client.send({"t": "ping", "rid": 300})
    pong = await raw.until("pong")
    assert b"\xa3rid\xcd\x01\x2c" in pong  # uint 16 for 300
    assert b"\xa2ts\xcf" in pong  # ms timestamps exceed 2**32: uint 64


# ===================================================== section 4: hello and pipelining


async def test_requests_pipelined_behind_hello_run_in_order(harness: Harness) -> None:
    """4.4: "A client MAY send requests right after hello without waiting for welcome;
    they are processed in order after the hello succeeds"."""
    client = await harness.raw()
    frames = [
        {"t": "hello", "rid": 1, "v": 1, "token": mint("alice")},
        {"t": "join", "rid": 2, "channel": ROOM},
        {"t": "send", "rid": 3, "channel": ROOM, "cid": "p", "text": "piped"},
        {"t": "sync", "rid": 4, "channel": ROOM, "since": 0},
    ]
    await client.send_raw(b"".join(client.framing.encode(f) for f in frames))
    welcome = await client.next(lambda f: f.get("rid") == 1)
    assert welcome["t"] == "welcome"
    assert (await client.next(lambda f: f.get("rid") == 2))["t"] == "ok"
    assert (await client.next(lambda f: f.get("rid") == 3))["seq"] == 1
    # the sync was processed after the send was; a read answers at once, so it may or may
    # not see the entry (section 2: a write is answered after its commit, a read at once)
    assert (await client.next(lambda f: f.get("rid") == 4))["t"] == "ok"


async def test_requests_pipelined_behind_a_failed_hello_are_discarded(harness: Harness) -> None:
    """4.4: pipelined requests are "discarded if it fails"."""
    client = await harness.raw()
    frames = [
        {"t": "hello", "rid": 1, "v": 1, "token": "not-a-jwt"},
        {"t": "send", "rid": 2, "channel": ROOM, "cid": "p", "text": "never"},
        {"t": "ping", "rid": 3},
    ]
    await client.send_raw(b"".join(client.framing.encode(f) for f in frames))
    error = await client.next()
    assert error["t"] == "error" and error["code"] == "unauthorized" and error["rid"] == 1
    assert await client.closed()
    assert client.pending == []
    bob = await harness.connect("bob")
    assert (await bob.request("sync", channel=ROOM, since=0))["head"] == 0


async def test_hello_required_error_then_close(harness: Harness) -> None:
    """4.1: "Any other frame type is answered with an error with code hello_required and
    the connection is closed" (a refresh first, too)."""
    client = await harness.raw()
    await client.send({"t": "refresh", "rid": 1, "token": mint("alice")})
    error = await client.next()
    assert error["t"] == "error" and error["code"] == "hello_required", error
    assert await client.closed()


async def test_half_close_still_answers_what_was_read(harness: Harness) -> None:
    """4.7: "A client that is done MAY half-close the connection ...: the server still
    answers the writes it had already read ... then closes"."""
    alice = await harness.connect("alice")
    await join(alice)
    await alice.send({"t": "send", "rid": 50, "channel": ROOM, "cid": "hc", "text": "last"})
    await alice.stream.send_eof()
    ok = await alice.next(lambda f: f.get("rid") == 50)
    assert ok["t"] == "ok" and ok["seq"] == 1
    assert await alice.closed()


# ====================================================== section 5: tokens and patterns


@pytest.mark.parametrize(
    ("case", "over"),
    [
        ("scope-as-string", {"scope": "chat:read chat:send"}),
        ("nbf-in-the-future", {"nbf": int(time.time()) + 3600}),
        ("sub-63-chars", {"sub": "a" * 63}),
        ("sub-bad-char", {"sub": "al ice"}),
        ("65-patterns", {"channels": [f"r{i}" for i in range(65)]}),
        ("pattern-257-chars", {"channels": ["r" * 257]}),
        ("pattern-bad-char", {"channels": ["room/1"]}),
        ("empty-pattern", {"channels": [""]}),
        ("channels-as-string", {"channels": "*"}),
        ("jti-not-a-string", {"jti": 5}),
        ("aud-unconfigured", {"aud": "tsmsg"}),
        ("aud-empty", {"aud": ""}),
        ("exp-missing", {"exp": None}),
        ("exp-a-float", {"exp": int(time.time()) + 600.5}),
        ("exp-beyond-30-days", {"exp": int(time.time()) + 31 * 86_400}),
        ("sub-missing", {"sub": None}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
async def test_hand_made_tokens_with_bad_claims_are_unauthorized(
    harness: Harness, case: str, over: Frame
) -> None:
    """5.1: the claims table; "Every failure is unauthorized except expiry"; the message
    "never contains the token"; 4.2: a failed hello closes."""
    token = forge(claims(**over))
    client, reply = await hello_with(harness, token)
    assert reply["t"] == "error" and reply["code"] == "unauthorized", (case, reply)
    assert token not in reply["message"]
    assert await client.closed()


@pytest.mark.parametrize(
    ("case", "token"),
    [
        ("crit-header", forge(claims(), {"alg": "HS256", "crit": ["exp"]})),
        ("b64-header", forge(claims(), {"alg": "HS256", "b64": False})),
        ("alg-none", forge(claims(), {"alg": "none"}).rsplit(".", 1)[0] + "."),
        ("alg-HS512", forge(claims(), {"alg": "HS512"})),
        (
            "duplicate-sub",
            forge(
                None,
                raw_payload=f'{{"sub":"alice","sub":"bob","exp":{int(time.time()) + 600},'
                '"channels":["*"],"scope":["chat:read"]}',
            ),
        ),
        ("padded-base64", forge(claims()) + "="),
        ("non-ascii", forge(claims()) + "é"),
        ("nan-claim", forge(None, raw_payload='{"sub":"alice","exp":NaN}')),
    ],
    ids=lambda v: v if v and len(v) < 20 else "",
)
async def test_hand_made_tokens_with_bad_form_are_unauthorized(
    harness: Harness, case: str, token: str
) -> None:
    """5.1: alg pinned (none refused), crit/b64 refused, duplicate members refused, base64url
    "without padding ... nothing else", ASCII only, NaN "not JSON"."""
    client, reply = await hello_with(harness, token)
    assert reply["t"] == "error" and reply["code"] == "unauthorized", (case, reply)
    assert await client.closed()


async def test_kid_and_typ_of_any_type_are_ignored(harness: Harness) -> None:
    """5.1: "Header fields other than alg (typ, kid, ...) are ignored, whatever their JSON
    type"; "Other claims (iat, custom ones) are ignored"; unknown scopes ignored."""
    token = forge(
        claims(iat="yesterday", custom={"x": [1]}, scope=["chat:read", "chat:fly"]),
        {"alg": "HS256", "typ": 7, "kid": ["k"]},
    )
    client, reply = await hello_with(harness, token)
    assert reply["t"] == "welcome" and reply["user"] == "alice", reply
    assert (await client.request("join", channel=ROOM))["t"] == "ok"
    assert_error(await client.request("send", channel=ROOM, cid="c", text="t"), "forbidden")


async def test_exp_equal_to_now_is_expired(harness: Harness) -> None:
    """5.1: "refused with token_expired when exp ≤ now"."""
    token = forge(claims(exp=int(time.time())))
    client, reply = await hello_with(harness, token)
    assert reply["t"] == "error" and reply["code"] == "token_expired", reply
    assert await client.closed()


async def test_sub_of_62_chars_and_every_allowed_char(harness: Harness) -> None:
    """2 / 5.1: a user id is 1 to 62 characters of [A-Za-z0-9_.@-]."""
    user = ("Az09_.@-" * 8)[:62]
    client, reply = await hello_with(harness, forge(claims(sub=user)))
    assert reply["t"] == "welcome" and reply["user"] == user, reply
    await join(client)
    ok = await send(client, "hi")
    assert (await client.expect("event", seq=ok["seq"]))["sender"] == user


PATTERN_CASES = [
    ("room-*", "room-", True),
    ("room-*", "room-a:b", True),
    ("room-*", "Room-1", False),
    ("room-*", "xroom-1", False),
    ("team.?", "team.a", True),
    ("team.?", "team.ab", False),
    ("[!abc]x", "dx", True),
    ("[!abc]x", "ax", False),
    ("[a-c]1", "b1", True),
    ("[a-c]1", "B1", False),
    ("*", "a:b.c@d", True),
    ("*", "dm:alice:bob", False),
    ("dm:*", "dm:carol:dave", False),
    ("dm:*", "dm:x", False),
]


@pytest.mark.parametrize(("pattern", "channel", "allowed"), PATTERN_CASES)
async def test_channel_patterns_over_the_wire(
    harness: Harness, pattern: str, channel: str, allowed: bool
) -> None:
    """5.2: the pattern table and its examples; 5.3: "a pattern never grants a dm:
    channel, not even * or dm:*"."""
    client = await harness.connect("eve", channels=[pattern])
    reply = await client.request("join", channel=channel)
    if allowed:
        assert reply["t"] == "ok", reply
    else:
        assert_error(reply, "forbidden")


@pytest.mark.parametrize(
    "name",
    ["dm:alice:alice", "dm:bob:alice", "dm:alice:bob:carol", "dm:alice:", "dm::bob", "dm:alice"],
)
async def test_malformed_dm_names_are_open_to_nobody(harness: Harness, name: str) -> None:
    """5.3: "Any other name in the dm: namespace (malformed, unsorted, three parts) is open to
    nobody: requests on it fail with forbidden"."""
    alice = await harness.connect("alice", channels=["*", "dm:*"])
    for t, fields in [
        ("join", {}),
        ("history", {}),
        ("sync", {"since": 0}),
        ("send", {"cid": "c", "text": "x"}),
    ]:
        assert_error(await alice.request(t, channel=name, **fields), "forbidden")


async def test_a_dm_needs_its_scopes(harness: Harness) -> None:
    """5.3: "a DM needs chat:read to join and chat:send to send"; with no channels at all
    the DM is still open."""
    reader = await harness.connect("alice", channels=[], scopes=["chat:read"])
    assert (await reader.request("join", channel="dm:alice:bob"))["t"] == "ok"
    assert_error(
        await reader.request("send", channel="dm:alice:bob", cid="c", text="x"), "forbidden"
    )
    writer = await harness.connect("alice", channels=[], scopes=["chat:send"])
    assert_error(await writer.request("join", channel="dm:alice:bob"), "forbidden")
    assert (await writer.request("send", channel="dm:alice:bob", cid="c", text="x"))["t"] == "ok"


async def test_leave_is_not_checked_against_the_token(harness: Harness) -> None:
    """6.3: leave is "not checked against the token's channels or scopes"."""
    alice = await harness.connect("alice", channels=["room-*"], scopes=[])
    for name in ("general", "dm:bob:carol", "dm:zed:alice"):
        reply = await alice.request("leave", channel=name)
        assert reply == {"t": "ok", "rid": reply["rid"], "channel": name}, reply


# ================================================================== section 6: requests


async def test_channel_name_of_128_chars_and_every_allowed_char(harness: Harness) -> None:
    """2: a channel name is 1 to 128 characters of [A-Za-z0-9_.:@-]."""
    name = ("Az09_.:@-" * 15)[:128]
    alice = await harness.connect("alice")
    ok = await join(alice, name)
    assert ok["channel"] == name
    assert (await send(alice, "x", channel=name))["channel"] == name
    assert_error(await alice.request("join", channel=name + "a"), "bad_request")


async def test_a_second_join_answers_again_without_a_new_membership(harness: Harness) -> None:
    """6.2: "Joining an already joined channel is allowed (it answers again ...)"; 7.12:
    membership is pushed "when a membership is recorded that was not there before"."""
    alice = await harness.connect("alice")
    await join(alice)
    push = await alice.expect("membership", channel=ROOM)
    assert push == {"t": "membership", "channel": ROOM, "by": "alice"}
    await send(alice, "x")
    again = await join(alice)
    assert again["head"] == 1
    frames = await frames_before_pong(alice)
    with trio.move_on_after(0.3):
        await alice.expect("membership")
        pytest.fail("a second membership push")
    assert [e["seq"] for e in frames if e["t"] == "event"] == [1]  # not twice


async def test_leave_forget_reply_and_bad_forget(harness: Harness) -> None:
    """6.3: with forget "the ok comes after that is stored, with forgotten: true"; 7.2: ok
    (leave) is channel; "a forget that is not a boolean" is bad_request."""
    alice = await harness.connect("alice")
    await join(alice)
    reply = await alice.request("leave", channel=ROOM, forget=True)
    assert reply == {"t": "ok", "rid": reply["rid"], "channel": ROOM, "forgotten": True}
    reply = await alice.request("leave", channel=ROOM, forget=False)
    assert reply == {"t": "ok", "rid": reply["rid"], "channel": ROOM}
    for bad in (1, "true", [True]):
        assert_error(await alice.request("leave", channel=ROOM, forget=bad), "bad_request")
    listing = await alice.request("channels")
    assert listing["channels"] == []


async def test_forget_then_join_is_a_new_membership(harness: Harness) -> None:
    """6.2/7.12: a membership removed by forget and recorded again is pushed again."""
    alice = await harness.connect("alice")
    await join(alice)
    await alice.expect("membership", channel=ROOM)
    await alice.request("leave", channel=ROOM, forget=True)
    await join(alice)
    assert await alice.expect("membership", channel=ROOM, by="alice")


@pytest.mark.parametrize("n", [1, 16, 64])
async def test_cid_limit_counts_code_points(harness: Harness, n: int) -> None:
    """6.4: cid is "1 to max_cid_chars (64) characters (Unicode code points)"."""
    alice = await harness.connect("alice")
    for i, char in enumerate(["é", "€", "😀"]):
        cid = char * n
        reply = await alice.request("send", channel=ROOM, cid=cid, text=f"t{i}")
        assert reply["t"] == "ok" and reply["dup"] is False, (char, n, reply)
        again = await alice.request("send", channel=ROOM, cid=cid, text="again")
        assert again["dup"] is True and again["seq"] == reply["seq"]


async def test_cid_of_65_code_points_is_bad_request(harness: Harness) -> None:
    alice = await harness.connect("alice")
    assert_error(await alice.request("send", channel=ROOM, cid="é" * 65, text="t"), "bad_request")


async def test_empty_text_is_a_message(harness: Harness) -> None:
    """6.4: text is "0 to max_text_bytes"; 7.4: text present on a message."""
    alice = await harness.connect("alice")
    await join(alice)
    ok = await send(alice, "")
    event = await alice.expect("event", seq=ok["seq"])
    assert event["text"] == ""
    edit = await alice.request("edit", channel=ROOM, id=ok["id"], text="")
    assert edit["t"] == "ok"
    assert (await alice.expect("event", seq=edit["seq"]))["text"] == ""


async def test_an_empty_meta_is_no_meta(harness: Harness) -> None:
    """6.4: meta: "An empty map is the same as none"; 7.4: meta is present on "message with
    meta"."""
    alice = await harness.connect("alice")
    await join(alice)
    ok = await send(alice, "m", meta={})
    event = await alice.expect("event", seq=ok["seq"])
    assert "meta" not in event, event
    [msg] = (await alice.request("history", channel=ROOM))["messages"]
    assert "meta" not in msg
    [entry] = (await alice.request("sync", channel=ROOM, since=0))["events"]
    assert "meta" not in entry


async def test_meta_float32_comes_back_as_float64(harness: Harness) -> None:
    """6.4: "a float32 comes back as a float64, every integer and length in its shortest
    form" (2: "floats as float 64")."""
    client = await harness.raw()
    raw = RawReader(client)
    await client.send({"t": "hello", "rid": 1, "v": 1, "token": mint("alice")})
    await raw.until("welcome")
    meta_f32 = b"\x82\xa1f\xca\x3f\xc0\x00\x00\xa1n\xcf\x00\x00\x00\x00\x00\x00\x00\x07"
    body = (
        b"\x86\xa1t\xa4send\xa3rid\x02\xa7channel\xa6room-1\xa3cid\xa1c\xa4text\xa1x\xa4meta"
        + meta_f32
    )
    await client.send_raw(struct.pack(">I", len(body)) + body)
    await raw.until("ok", rid=2)
    await client.send({"t": "history", "rid": 3, "channel": ROOM})
    history = await raw.until("ok", rid=3)
    assert b"\xa1f\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00" in history  # 1.5 as float 64
    assert b"\xa1n\x07" in history  # 7 as a fixint


async def test_meta_at_exactly_its_limit_after_reencoding(harness: Harness) -> None:
    """6.4: "max_meta_bytes applies to that re-encoding" (a wide encoding that shrinks
    fits)."""
    alice = await harness.connect("alice")
    limit = harness.server.settings.limits.max_meta_bytes
    # {"k": "x"*L}: 1 (fixmap) + 2 ("k") + 3 (str 16 header) + L; sent with str 32 headers
    # (5 bytes) and a uint 64 int for a padding key "n": 0 (which shrinks to 1 byte).
    s = "x" * (limit - 6 - 3)  # leaves room for "n": 0 as 3 bytes (fixstr n, fixint 0)
    wide = b"\x82\xa1k\xdb" + struct.pack(">I", len(s)) + s.encode() + b"\xa1n" + b"\xcf" + bytes(8)
    assert len(wide) > limit
    body = (
        b"\x86\xa1t\xa4send\xa3rid\x02\xa7channel\xa6room-1\xa3cid\xa1w\xa4text\xa1x\xa4meta" + wide
    )
    await alice.send_raw(struct.pack(">I", len(body)) + body)
    reply = await alice.next(lambda f: f.get("rid") == 2)
    assert reply["t"] == "ok", reply


async def test_a_dup_with_other_content_keeps_the_original(harness: Harness) -> None:
    """10: "The text and meta of the retry are not compared with the original's"; a dup
    "stores and pushes nothing"; and a retry after a delete "still answers dup with the
    original seq and id"."""
    alice = await harness.connect("alice")
    await join(alice)
    first = await send(alice, "original", cid="same", meta={"a": 1})
    await alice.expect("event", seq=first["seq"])
    retry = await alice.request("send", channel=ROOM, cid="same", text="other", meta={"b": 2})
    assert retry == {**first, "rid": retry["rid"], "dup": True}
    deleted = await alice.request("delete", channel=ROOM, id=first["id"])
    await alice.expect("event", seq=deleted["seq"])
    after = await alice.request("send", channel=ROOM, cid="same", text="third")
    assert after == {**first, "rid": after["rid"], "dup": True}
    assert await quiet(alice, "event") == []
    page = await alice.request("sync", channel=ROOM, since=0)
    assert page["head"] == 2


async def test_cid_space_is_per_channel_and_per_sender(harness: Harness) -> None:
    """10: "The same cid in another channel, or from another user, is a different message";
    "All devices of a user share the user's key space"."""
    phone, laptop = await harness.connect("alice"), await harness.connect("alice")
    a = await send(phone, "a", cid="k")
    b = await send(phone, "b", channel="room-2", cid="k")
    assert b["dup"] is False and b["seq"] == 1
    c = await laptop.request("send", channel=ROOM, cid="k", text="c")
    assert c["dup"] is True and c["id"] == a["id"]


async def test_edit_is_not_idempotent_and_ok_dup_is_false(harness: Harness) -> None:
    """6.5: "An edit is not idempotent: repeating it appends another edit entry"; 7.2:
    edit/delete ok: "dup bool: always false", id the target's."""
    alice = await harness.connect("alice")
    ok = await send(alice, "v1")
    e1 = await alice.request("edit", channel=ROOM, id=ok["id"], text="v2")
    e2 = await alice.request("edit", channel=ROOM, id=ok["id"], text="v2")
    assert (e1["seq"], e2["seq"]) == (2, 3)
    for e in (e1, e2):
        assert set(e) == {"t", "rid", "channel", "seq", "id", "ts", "dup"}
        assert e["dup"] is False and e["id"] == ok["id"] and e["channel"] == ROOM
    d = await alice.request("delete", channel=ROOM, id=ok["id"])
    assert d["dup"] is False and d["seq"] == 4 and d["id"] == ok["id"]


@pytest.mark.parametrize("id_len", [65, 200])
async def test_an_id_longer_than_64_is_not_found(harness: Harness, id_len: int) -> None:
    """15: "message ids at most 64 characters (a longer id is not_found)"."""
    alice = await harness.connect("alice")
    await send(alice, "x")
    assert_error(await alice.request("edit", channel=ROOM, id="1" * id_len, text="t"), "not_found")


async def test_an_id_of_another_channel_is_not_found(harness: Harness) -> None:
    """6.5: not_found: "no such message in this channel"."""
    alice = await harness.connect("alice")
    ok = await send(alice, "x", channel="room-a")
    await send(alice, "y", channel="room-b")
    assert_error(await alice.request("edit", channel="room-b", id=ok["id"], text="t"), "not_found")
    assert_error(await alice.request("delete", channel="room-b", id=ok["id"]), "not_found")


async def test_moderator_edit_event_names_the_editor(harness: Harness) -> None:
    """7.4: sender of an edit/delete is "the editor", "who deleted"."""
    alice = await harness.connect("alice")
    mod = await harness.connect("mod", scopes=["chat:read", "chat:send", "chat:moderate"])
    await join(mod)
    ok = await send(alice, "x")
    e = await mod.request("edit", channel=ROOM, id=ok["id"], text="moderated")
    event = await mod.expect("event", seq=e["seq"])
    assert (event["kind"], event["sender"], event["id"]) == ("edit", "mod", ok["id"])
    d = await mod.request("delete", channel=ROOM, id=ok["id"])
    event = await mod.expect("event", seq=d["seq"])
    assert (event["kind"], event["sender"]) == ("delete", "mod")
    assert "text" not in event and "meta" not in event
    [msg] = (await mod.request("history", channel=ROOM))["messages"]
    assert msg["sender"] == "alice" and msg["deleted"] is True


# ============================================== sections 11-12: edits, deletes, history


async def test_replayed_message_after_edit_carries_latest_text_and_edited(
    harness: Harness,
) -> None:
    """11: "After an edit, the message entry has the latest text and edited (the ts of the
    latest edit). Its meta is unchanged"; the edit entry replays with its own text."""
    alice = await harness.connect("alice")
    ok = await send(alice, "v1", meta={"m": 1})
    e1 = await alice.request("edit", channel=ROOM, id=ok["id"], text="v2")
    e2 = await alice.request("edit", channel=ROOM, id=ok["id"], text="v3")
    page = await alice.request("sync", channel=ROOM, since=0)
    msg, ed1, ed2 = page["events"]
    assert (msg["text"], msg["edited"], msg["meta"], msg["ts"]) == (
        "v3",
        e2["ts"],
        {"m": 1},
        ok["ts"],
    )
    assert "deleted" not in msg
    assert (ed1["kind"], ed1["text"], ed1["ts"], ed1["seq"]) == ("edit", "v2", e1["ts"], 2)
    assert "edited" not in ed1 and "deleted" not in ed1 and "meta" not in ed1
    assert ed2["text"] == "v3"
    [hist] = (await alice.request("history", channel=ROOM))["messages"]
    assert (hist["text"], hist["edited"], hist["meta"]) == ("v3", e2["ts"], {"m": 1})


async def test_delete_redacts_the_whole_log(harness: Harness) -> None:
    """11: a tombstone has "deleted: true, and no text, meta or edited"; earlier edit
    entries "get deleted: true and lose text"; "Edit and delete entries keep their sender
    and ts"; 12: history shows tombstones."""
    alice = await harness.connect("alice")
    ok = await send(alice, "secret", meta={"m": 1})
    e = await alice.request("edit", channel=ROOM, id=ok["id"], text="secret2")
    d = await alice.request("delete", channel=ROOM, id=ok["id"])
    other = await send(alice, "kept")
    page = await alice.request("sync", channel=ROOM, since=0)
    msg, ed, de, kept = page["events"]
    assert msg == {
        "t": "event",
        "channel": ROOM,
        "seq": 1,
        "kind": "message",
        "id": ok["id"],
        "sender": "alice",
        "ts": ok["ts"],
        "deleted": True,
    }
    assert ed == {
        "t": "event",
        "channel": ROOM,
        "seq": 2,
        "kind": "edit",
        "id": ok["id"],
        "sender": "alice",
        "ts": e["ts"],
        "deleted": True,
    }
    assert de == {
        "t": "event",
        "channel": ROOM,
        "seq": 3,
        "kind": "delete",
        "id": ok["id"],
        "sender": "alice",
        "ts": d["ts"],
    }
    assert kept["text"] == "kept" and kept["id"] == other["id"]
    hist = (await alice.request("history", channel=ROOM))["messages"]
    assert hist[0] == {
        "seq": 1,
        "kind": "message",
        "id": ok["id"],
        "sender": "alice",
        "ts": ok["ts"],
        "deleted": True,
    }
    assert [m["seq"] for m in hist] == [1, 4]
    for t, fields in (("edit", {"text": "x"}), ("delete", {})):
        assert_error(await alice.request(t, channel=ROOM, id=ok["id"], **fields), "not_found")


async def test_history_elements_have_no_t_or_channel(harness: Harness) -> None:
    """12: "There is no t or channel key in the elements"; seqs increasing, not dense."""
    alice = await harness.connect("alice")
    a = await send(alice, "a")
    await alice.request("edit", channel=ROOM, id=a["id"], text="a2")
    await send(alice, "b")
    page = await alice.request("history", channel=ROOM)
    assert [m["seq"] for m in page["messages"]] == [1, 3]
    for m in page["messages"]:
        assert "t" not in m and "channel" not in m and m["kind"] == "message"


async def test_history_default_limit_and_more(harness: Harness) -> None:
    """6.7/12: limit "default history_default (50)"; more is true when older messages
    exist; exactly limit messages: more false."""
    alice = await harness.connect("alice")
    for i in range(51):
        await alice.send(
            {"t": "send", "rid": 1000 + i, "channel": ROOM, "cid": f"h{i}", "text": f"{i}"}
        )
    for i in range(51):
        await alice.next(lambda f, r=1000 + i: f.get("rid") == r)
    page = await alice.request("history", channel=ROOM)
    assert len(page["messages"]) == 50 and page["more"] is True
    assert page["messages"][0]["seq"] == 2 and page["messages"][-1]["seq"] == 51
    rest = await alice.request("history", channel=ROOM, before=2)
    assert [m["seq"] for m in rest["messages"]] == [1] and rest["more"] is False
    exact = await alice.request("history", channel=ROOM, limit=51)
    assert len(exact["messages"]) == 51 and exact["more"] is False
    top = await alice.request("history", channel=ROOM, before=2**63 - 1, limit=1)
    assert [m["seq"] for m in top["messages"]] == [51] and top["more"] is True


async def test_history_limit_bounds(harness: Harness) -> None:
    """6.7: limit 1 to history_max (500)."""
    alice = await harness.connect("alice")
    assert (await alice.request("history", channel=ROOM, limit=500))["t"] == "ok"
    assert (await alice.request("history", channel=ROOM, limit=1))["t"] == "ok"
    for bad in (0, 501, 2**63):
        assert_error(await alice.request("history", channel=ROOM, limit=bad), "bad_request")
    assert_error(await alice.request("history", channel=ROOM, before=2**63), "bad_request")


# ================================================================ section 13: sync/epoch


async def test_sync_reply_fields_and_no_log(harness: Harness) -> None:
    """13.1: "A channel that has no log yet answers events: [], head: 0, epoch: 0 for
    since = 0, and resync for any other since"; 7.5: resync epoch 0 means no log."""
    alice = await harness.connect("alice")
    page = await alice.request("sync", channel=ROOM, since=0)
    assert page == {
        "t": "ok",
        "rid": page["rid"],
        "channel": ROOM,
        "events": [],
        "more": False,
        "head": 0,
        "epoch": 0,
    }
    for since in (1, 2**63 - 1):
        r = await alice.request("sync", channel=ROOM, since=since)
        assert r["t"] == "resync" and r["head"] == 0 and r["epoch"] == 0, r
        assert r["reason"] == "ahead", r
        assert set(r) == {"t", "rid", "channel", "head", "epoch", "reason"}


async def test_sync_since_max_int64_is_ahead(harness: Harness) -> None:
    alice = await harness.connect("alice")
    await send(alice, "x")
    r = await alice.request("sync", channel=ROOM, since=2**63 - 1)
    assert (r["t"], r["reason"], r["head"]) == ("resync", "ahead", 1), r


async def test_sync_epoch_zero_is_compared_like_any_value(harness: Harness) -> None:
    """13.1: the server "treats a sent epoch of 0 like any other value"."""
    alice = await harness.connect("alice")
    await send(alice, "x")
    r = await alice.request("sync", channel=ROOM, since=1, epoch=0)
    assert r["t"] == "resync" and r["reason"] == "epoch", r


async def test_sync_epoch_is_not_checked_from_zero(harness: Harness) -> None:
    """13.1: "It checks only when since > 0 (a sync from 0 replays the whole log of any
    epoch)"."""
    alice = await harness.connect("alice")
    await send(alice, "x")
    page = await alice.request("sync", channel=ROOM, since=0, epoch=12345)
    assert page["t"] == "ok" and len(page["events"]) == 1


async def test_sync_epoch_reason_takes_precedence_over_ahead(harness: Harness) -> None:
    """7.5: epoch "Takes precedence over compacted and ahead when several apply"."""
    alice = await harness.connect("alice")
    await send(alice, "x")
    r = await alice.request("sync", channel=ROOM, since=99, epoch=7)
    assert r["t"] == "resync" and r["reason"] == "epoch", r


async def test_sync_epoch_on_a_channel_without_log(harness: Harness) -> None:
    """9.2 / 7.5: a sent epoch that is not the channel's (0: no log) is reason epoch,
    which takes precedence over ahead."""
    alice = await harness.connect("alice")
    r = await alice.request("sync", channel=ROOM, since=3, epoch=7)
    assert r["t"] == "resync" and r["reason"] == "epoch" and r["epoch"] == 0, r


async def test_sync_matching_epoch_and_bad_epoch(harness: Harness) -> None:
    """6.8: epoch 0 to 2**63 - 1; "bad_request (also for an epoch that is not an int in
    range)"."""
    alice = await harness.connect("alice")
    await send(alice, "x")
    epoch = (await alice.request("sync", channel=ROOM, since=0))["epoch"]
    assert 0 < epoch < 2**63
    page = await alice.request("sync", channel=ROOM, since=1, epoch=epoch)
    assert page["t"] == "ok" and page["events"] == [] and page["epoch"] == epoch
    for bad in (-1, 2**63, "1", 1.0):
        assert_error(await alice.request("sync", channel=ROOM, since=1, epoch=bad), "bad_request")


async def test_join_epoch_matches_sync_epoch(harness: Harness) -> None:
    """9.2: each log has an epoch "reported by join, sync and resync"; 0 before the first
    write, then the real one."""
    alice = await harness.connect("alice")
    before = await join(alice)
    assert before["epoch"] == 0 and before["head"] == 0 and before["horizon"] == 0
    await send(alice, "x")
    after = await join(alice)
    page = await alice.request("sync", channel=ROOM, since=0)
    resync = await alice.request("sync", channel=ROOM, since=5)
    assert after["epoch"] == page["epoch"] == resync["epoch"] != 0


async def test_sync_limit_one_pages_exactly(harness: Harness) -> None:
    """13.1: more true "means entries after the last one returned exist"; since = head
    answers events [], more false."""
    alice = await harness.connect("alice")
    await send(alice, "a")
    await send(alice, "b")
    p1 = await alice.request("sync", channel=ROOM, since=0, limit=1)
    assert [e["seq"] for e in p1["events"]] == [1] and p1["more"] is True and p1["head"] == 2
    p2 = await alice.request("sync", channel=ROOM, since=1, limit=1)
    assert [e["seq"] for e in p2["events"]] == [2] and p2["more"] is False


async def test_sync_without_rid_reply_is_ok_nothing_and_resync_without_rid(
    harness: Harness,
) -> None:
    """2: "A request without a rid gets no ok; ... sync can get a resync" (without rid,
    with a reason that is never cut)."""
    alice = await harness.connect("alice")
    await send(alice, "x")
    await alice.send({"t": "sync", "channel": ROOM, "since": 0})
    await alice.send({"t": "sync", "channel": ROOM, "since": 1, "epoch": 1})
    resync = await alice.expect("resync")
    assert "rid" not in resync and resync["reason"] == "epoch"
    assert await quiet(alice, "ok") == []


# ============================================================ section 6.9: read cursors


async def test_read_clamps_huge_seq_to_head_and_pushes_to_self(harness: Harness) -> None:
    """6.9: "a seq past the head is clamped to the head"; the read push goes to "this one,
    the user's other devices and the other users"."""
    alice = await harness.connect("alice")
    await join(alice)
    bob = await harness.connect("bob")
    await join(bob)
    await send(alice, "a")
    await send(alice, "b")
    ok = await alice.request("read", channel=ROOM, seq=2**63 - 1)
    assert ok == {"t": "ok", "rid": ok["rid"], "channel": ROOM, "seq": 2}
    push = {"t": "read", "channel": ROOM, "user": "alice", "seq": 2}
    assert await alice.expect("read") == push
    assert await bob.expect("read") == push


async def test_read_backwards_answers_the_cursor_and_pushes_nothing(harness: Harness) -> None:
    """6.9: ok carries "the resulting cursor (which may be higher than the seq asked for)";
    "If the cursor moved, a read push goes" (not otherwise)."""
    alice = await harness.connect("alice")
    await join(alice)
    await send(alice, "a")
    await send(alice, "b")
    await alice.request("read", channel=ROOM, seq=2)
    await alice.expect("read")
    for seq in (0, 1, 2):
        ok = await alice.request("read", channel=ROOM, seq=seq)
        assert ok["seq"] == 2
    assert await quiet(alice, "read") == []


async def test_read_push_is_not_sent_to_a_reader_that_did_not_join(harness: Harness) -> None:
    """9.9: "Only joined connections receive a channel's pushes"."""
    alice = await harness.connect("alice")
    await send(alice, "a")
    assert (await alice.request("read", channel=ROOM, seq=1))["seq"] == 1
    assert await quiet(alice, "read") == []


# ====================================================================== typing, presence


async def test_typing_off_while_not_on_pushes_nothing_and_on_repeats(harness: Harness) -> None:
    """6.10: "on: false while not on ... is answered ok and pushes nothing"; "on: true pushes
    on: true (again, if it was already on)"; "The channel need not be joined"."""
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await join(bob)
    ok = await alice.request("typing", channel=ROOM, on=False)
    assert ok == {"t": "ok", "rid": ok["rid"]}
    assert await quiet(bob, "typing") == []
    await alice.request("typing", channel=ROOM, on=True)
    await alice.request("typing", channel=ROOM, on=True)
    assert [f["on"] for f in await quiet(bob, "typing")] == [True, True]


async def test_typing_devices_are_independent(harness: Harness) -> None:
    """6.10: "Two devices of one user are independent: each one's on is turned off by that
    device's off"."""
    phone, laptop = await harness.connect("alice"), await harness.connect("alice")
    bob = await harness.connect("bob")
    await join(bob)
    await phone.request("typing", channel=ROOM, on=True)
    await laptop.request("typing", channel=ROOM, on=True)
    await laptop.request("typing", channel=ROOM, on=False)
    assert [f["on"] for f in await quiet(bob, "typing")] == [True, True, False]
    await laptop.request("typing", channel=ROOM, on=False)  # laptop not on: nothing
    assert await quiet(bob, "typing") == []
    await phone.aclose()
    push = await bob.expect("typing")
    assert push == {"t": "typing", "channel": ROOM, "user": "alice", "on": False}


@pytest.mark.parametrize("status", ["x", "😀" * 64, "é" * 64, "online now, back at 5"])
async def test_status_limit_counts_code_points(harness: Harness, status: str) -> None:
    """6.13: status "1 to max_status_chars (64) characters (Unicode code points)"."""
    alice = await harness.connect("alice")
    reply = await alice.request("presence", status=status)
    assert reply == {"t": "ok", "rid": reply["rid"], "status": status}


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("", "limit_exceeded"),
        ("😀" * 65, "limit_exceeded"),
        (5, "bad_request"),
        (True, "bad_request"),
    ],
    ids=repr,
)
async def test_bad_status(harness: Harness, status: Any, code: str) -> None:
    """6.13: "bad_request (no users and no string status), limit_exceeded (an empty or too
    long status)"."""
    alice = await harness.connect("alice")
    assert_error(await alice.request("presence", status=status), code)
    assert_error(await alice.request("presence"), "bad_request")


async def test_presence_query_shapes(harness: Harness) -> None:
    """6.13: queries list "in the order asked and each once" the users sharing a channel
    "(and the asker itself, if asked)"; "may be empty"; up to 100 users; "an element that is
    not a valid user id" is bad_request."""
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await join(alice)
    await join(bob)
    await alice.expect("membership")
    await bob.expect("membership")
    with trio.fail_after(5):
        while True:  # the membership record is written after the join's ok
            reply = await alice.request("presence", users=["bob"])
            if reply["users"]:
                break
            await trio.sleep(0.02)
    reply = await alice.request("presence", users=["bob", "alice", "bob", "ghost", "alice"])
    assert [u["user"] for u in reply["users"]] == ["bob", "alice"], reply
    for u in reply["users"]:
        assert u["status"] == "online" and u["online"] is True and "last_seen" not in u
    empty = await alice.request("presence", users=[])
    assert empty == {"t": "ok", "rid": empty["rid"], "users": []}
    hundred = await alice.request("presence", users=[f"u{i}" for i in range(100)])
    assert hundred["t"] == "ok" and hundred["users"] == []
    for bad in (["bad user"], [""], ["a" * 63], [5], ["bob", None]):
        assert_error(await alice.request("presence", users=bad), "bad_request")


async def test_presence_query_without_rid_is_answered_by_nothing(harness: Harness) -> None:
    """6.13: "A query without rid is answered by nothing"."""
    alice = await harness.connect("alice")
    await alice.send({"t": "presence", "users": ["alice"]})
    assert await quiet(alice) == []


async def test_presence_push_once_per_connection_whatever_channels(harness: Harness) -> None:
    """6.13: pushed "once per connection, however many such channels it joined"."""
    alice = await harness.connect("alice")
    carol = await harness.connect("carol")
    for ch in ("room-a", "room-b", "room-c"):
        await join(alice, ch)
        await join(carol, ch)
    with trio.fail_after(5):
        while True:
            members = await trio.to_thread.run_sync(harness.server.store.channels_of, "alice")
            if {"room-a", "room-b", "room-c"} <= set(members):
                break
            await trio.sleep(0.02)
    await frames_before_pong(carol)
    await alice.request("presence", status="away")
    pushes = await quiet(carol, "presence")
    assert len(pushes) == 1 and pushes[0]["status"] == "away", pushes
    assert set(pushes[0]) == {"t", "user", "status", "ts"}


# ======================================================================= unread/channels


async def test_unread_counts_only_others_live_messages(harness: Harness) -> None:
    """6.14: unread counts entries after the cursor "that are messages (not edits or
    deletes), not deleted, and not sent by the user"."""
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    b1 = await send(bob, "1")
    await send(bob, "2")
    await bob.request("edit", channel=ROOM, id=b1["id"], text="1b")
    await send(alice, "mine")
    b4 = await send(bob, "4")
    await bob.request("delete", channel=ROOM, id=b4["id"])
    reply = await alice.request("unread", channels=[ROOM, "empty-room"])
    assert reply == {
        "t": "ok",
        "rid": reply["rid"],
        "unread": {ROOM: 2, "empty-room": 0},
        "capped": [],
    }
    await alice.request("read", channel=ROOM, seq=1)
    assert (await alice.request("unread", channels=[ROOM]))["unread"] == {ROOM: 1}


async def test_unread_list_bounds_and_refusals(harness: Harness) -> None:
    """6.14: "may be empty"; at most 100; "one refused channel fails the whole request"."""
    alice = await harness.connect("alice", channels=["room-*"])
    empty = await alice.request("unread", channels=[])
    assert empty == {"t": "ok", "rid": empty["rid"], "unread": {}, "capped": []}
    ok100 = await alice.request("unread", channels=[f"room-{i}" for i in range(100)])
    assert ok100["t"] == "ok" and len(ok100["unread"]) == 100
    assert_error(
        await alice.request("unread", channels=[f"room-{i}" for i in range(101)]), "limit_exceeded"
    )
    assert_error(await alice.request("unread", channels=[ROOM, "general"]), "forbidden")
    assert_error(await alice.request("unread", channels=[ROOM, "bad name"]), "bad_request")
    assert_error(await alice.request("unread", channels=ROOM), "bad_request")
    assert_error(await alice.request("unread"), "bad_request")


async def test_channels_listing_order_paging_and_after(harness: Harness) -> None:
    """6.15: channels "in name order (byte order)"; at most 100 per page with more; after
    lists names sorting after it; "bad_request (after not a string)"."""
    alice = await harness.connect("alice")
    names = sorted([f"c-{i:03d}" for i in range(101)] + ["Zed", "a", "_x"])
    for name in names:
        await alice.send({"t": "join", "channel": name})
    await alice.request("ping")
    with trio.fail_after(10):
        while len(await trio.to_thread.run_sync(harness.server.store.channels_of, "alice")) < 104:
            await trio.sleep(0.02)
    first = await alice.request("channels")
    assert len(first["channels"]) == 100 and first["more"] is True
    listed = [c["channel"] for c in first["channels"]]
    second = await alice.request("channels", after=listed[-1])
    listed += [c["channel"] for c in second["channels"]]
    assert second["more"] is False
    assert listed == sorted(names, key=lambda s: s.encode())
    for entry in first["channels"]:
        assert set(entry) == {"channel", "head", "read", "unread", "capped"}
    tail = await alice.request("channels", after="zzz")
    assert tail["channels"] == [] and tail["more"] is False
    assert_error(await alice.request("channels", after=5), "bad_request")


# =========================================================== refresh and expired tokens


async def test_refresh_leaves_several_channels_in_name_order_before_ok(harness: Harness) -> None:
    """5.5: "one per channel in channel-name order, all before the ok"; the ok carries the
    new exp."""
    alice = await harness.connect("alice")
    for ch in ("room-c", "keep", "room-a", "Room-b"):
        await join(alice, ch)
    await frames_before_pong(alice)
    exp = int(time.time()) + 900
    token = forge(claims(exp=exp, channels=["keep"]))
    await alice.send({"t": "refresh", "rid": 77, "token": token})
    ok = await alice.next(lambda f: f.get("rid") == 77)
    assert ok == {"t": "ok", "rid": 77, "exp": exp}
    lefts = [f for f in alice.pending if f["t"] == "left"]
    assert [f["channel"] for f in lefts] == ["Room-b", "room-a", "room-c"]
    assert all(f == {"t": "left", "channel": f["channel"], "reason": "forbidden"} for f in lefts)


async def test_refresh_narrowing_scopes_leaves_every_channel(harness: Harness) -> None:
    """5.5: channels the new claims "no longer allow to read (chat:read and access)" are
    left: dropping chat:read leaves all of them, DMs included."""
    alice = await harness.connect("alice")
    await join(alice, "dm:alice:bob")
    await join(alice)
    await frames_before_pong(alice)
    ok = await alice.request("refresh", token=forge(claims(scope=["chat:send"])))
    assert ok["t"] == "ok"
    lefts = [f["channel"] for f in alice.pending if f["t"] == "left"]
    assert lefts == ["dm:alice:bob", ROOM]


async def test_refresh_with_bad_tokens_keeps_the_connection(harness: Harness) -> None:
    """5.5 / 6.12: a non-string token is bad_request; another sub is unauthorized; exp
    beyond the lifetime is unauthorized; none closes; the old claims stay."""
    alice = await harness.connect("alice", channels=["room-*"])
    await join(alice)
    assert_error(await alice.request("refresh"), "bad_request")
    assert_error(await alice.request("refresh", token=None), "bad_request")
    assert_error(await alice.request("refresh", token=forge(claims(sub="bob"))), "unauthorized")
    far = forge(claims(exp=int(time.time()) + 40 * 86_400))
    assert_error(await alice.request("refresh", token=far), "unauthorized")
    assert_error(
        await alice.request("refresh", token=forge(claims(channels=["x" * 300]))), "unauthorized"
    )
    assert (await send(alice, "still"))["seq"] == 1
    assert_error(await alice.request("join", channel="general"), "forbidden")


async def test_refresh_without_rid_is_silent_on_success(harness: Harness) -> None:
    alice = await harness.connect("alice")
    await alice.send({"t": "refresh", "token": forge(claims())})
    assert await quiet(alice) == []


@with_settings(tick_ms=20, limits=fast_limits(refresh_grace_ms=20_000))
async def test_while_expired_only_refresh_and_ping_work(harness: Harness) -> None:
    """5.5.2: "every request other than refresh and ping is refused with a non-fatal
    token_expired error carrying the request's rid ...; this includes leave ... an unknown t
    is still unknown_type"."""
    now = time.time()
    exp = int(now) + (1 if now % 1 < 0.5 else 2)
    alice, welcome = await hello_with(harness, forge(claims(exp=exp)))
    assert welcome["t"] == "welcome"
    notice = await alice.next(lambda f: f.get("code") == "token_expired")
    assert "rid" not in notice and notice["refresh_within_ms"] == 20_000
    for t, fields in [
        ("leave", {"channel": ROOM}),
        ("presence", {"users": []}),
        ("presence", {"status": "away"}),
        ("channels", {}),
        ("unread", {"channels": []}),
        ("typing", {"channel": ROOM, "on": True}),
    ]:
        reply = await alice.request(t, **fields)
        assert reply["t"] == "error" and reply["code"] == "token_expired", (t, reply)
        assert "refresh_within_ms" not in reply and "rid" in reply
    assert_error(await alice.request("frobnicate"), "unknown_type")
    assert (await alice.request("ping"))["t"] == "pong"
    assert (await alice.request("refresh", token=forge(claims())))["t"] == "ok"
    assert (await alice.request("leave", channel=ROOM))["t"] == "ok"


@with_settings(tick_ms=20, limits=fast_limits(refresh_grace_ms=20_000))
async def test_a_second_hello_while_expired_is_bad_request(harness: Harness) -> None:
    """5.4: while the token is expired, every request other than refresh and ping is refused
    with token_expired, "(a second hello is still bad_request, section 4.4)"."""
    now = time.time()
    exp = int(now) + (1 if now % 1 < 0.5 else 2)
    alice, welcome = await hello_with(harness, forge(claims(exp=exp)))
    assert welcome["t"] == "welcome"
    await alice.next(lambda f: f.get("code") == "token_expired")
    reply = await alice.request("hello", v=1, token=mint("alice"))
    assert reply["t"] == "error" and reply["code"] == "bad_request", reply
    refused = await alice.request("join", channel=ROOM)
    assert refused["t"] == "error" and refused["code"] == "token_expired", refused


# ============================================================================ rate limits


@with_settings(limits=fast_limits(frame_rate=0.001, frame_burst=3))
async def test_frames_with_a_bad_rid_take_a_frame_token(harness: Harness) -> None:
    """16.1: "Every frame after hello (any type, ping and refresh included, and frames with
    an invalid rid) takes one token"; a refused frame with a rid gets it echoed, with
    retry_after_ms ≥ 1."""
    alice = await harness.connect("alice")
    await alice.send({"t": "ping", "rid": "bad"})
    await alice.send({"t": "refresh", "rid": 1, "token": mint("alice")})
    await alice.send({"t": "ping", "rid": 2})
    await alice.send({"t": "ping", "rid": 3})
    bad = await alice.next()
    assert bad["code"] == "bad_request" and "rid" not in bad
    assert (await alice.next(lambda f: f.get("rid") == 1))["t"] == "ok"
    assert (await alice.next(lambda f: f.get("rid") == 2))["t"] == "pong"
    refused = await alice.next(lambda f: f.get("rid") == 3)
    assert refused["t"] == "error" and refused["code"] == "rate_limited"
    assert isinstance(refused["retry_after_ms"], int) and refused["retry_after_ms"] >= 1


@with_settings(limits=fast_limits(typing_rate=0.001, typing_burst=2))
async def test_typing_off_counts_and_the_bucket_is_shared_by_devices(harness: Harness) -> None:
    """16.2: typing bucket counts "on: true and on: false", per user, shared by devices;
    "checked after the frame's fields are validated" (a bad one costs nothing)."""
    phone, laptop = await harness.connect("alice"), await harness.connect("alice")
    assert_error(await phone.request("typing", channel=ROOM, on="x"), "bad_request")
    assert_error(await phone.request("typing", channel="general!", on=True), "bad_request")
    assert (await phone.request("typing", channel=ROOM, on=False))["t"] == "ok"
    assert (await laptop.request("typing", channel=ROOM, on=False))["t"] == "ok"
    refused = await phone.request("typing", channel=ROOM, on=True)
    assert refused["code"] == "rate_limited" and refused["retry_after_ms"] >= 1, refused


@with_settings(limits=fast_limits(send_rate=0.001, send_burst=2))
async def test_forbidden_sends_cost_no_send_token(harness: Harness) -> None:
    """16.2: the send buckets "are checked after the frame's fields are validated and its
    token authorization passed ..., which cost no token when they refuse"."""
    alice = await harness.connect("alice", channels=["room-*"])
    for _ in range(3):
        assert_error(await alice.request("send", channel="general", cid="f", text="x"), "forbidden")
        assert_error(await alice.request("send", channel=ROOM, cid="", text="x"), "bad_request")
        assert_error(
            await alice.request("send", channel=ROOM, cid="big", text="x" * 20_000),
            "limit_exceeded",
        )
    assert (await send(alice, "1"))["seq"] == 1
    assert (await send(alice, "2"))["seq"] == 2
    refused = await alice.request("send", channel=ROOM, cid="3", text="3")
    assert refused["code"] == "rate_limited"


@with_settings(limits=fast_limits(send_rate=0.001, send_burst=2))
async def test_a_not_found_edit_spends_its_send_tokens(harness: Harness) -> None:
    """16.2: "a not_found or forbidden answer from that check has spent its tokens"."""
    alice = await harness.connect("alice")
    assert_error(await alice.request("edit", channel=ROOM, id="nope", text="x"), "not_found")
    assert_error(await alice.request("delete", channel=ROOM, id="nope"), "not_found")
    refused = await alice.request("send", channel=ROOM, cid="c", text="x")
    assert refused["code"] == "rate_limited", refused


@with_settings(limits=fast_limits(presence_rate=0.001, presence_burst=1))
async def test_presence_queries_take_no_presence_token(harness: Harness) -> None:
    """16.2: presence bucket counts "setting a status, changed or not; not queries"."""
    alice = await harness.connect("alice")
    for _ in range(3):
        assert (await alice.request("presence", users=["alice"]))["t"] == "ok"
    assert (await alice.request("presence", status="online"))["t"] == "ok"  # unchanged: counts
    refused = await alice.request("presence", status="away")
    assert refused["code"] == "rate_limited" and refused["retry_after_ms"] >= 1


# ================================================== section 18: example bytes on the wire


def example_block(title: str) -> bytes:
    text = (Path(__file__).parent.parent / "PROTOCOL.md").read_text()
    start = text.index(f"### Example: {title}\n")
    block = text[start:].split("```hex\n", 1)[1].split("```", 1)[0]
    return hexdump_bytes(block)


async def test_deterministic_examples_are_the_bytes_the_server_writes(harness: Harness) -> None:
    """18: "The examples in section 18 show the order the current server emits, byte for
    byte": the frames with nothing time- or id-dependent, as the running server writes
    them over TCP."""
    client = await harness.raw()
    raw = RawReader(client)
    await client.send({"t": "hello", "rid": 1, "v": 1, "token": mint("alice", ["room-*"])})
    await raw.until("welcome")
    await client.send_raw(example_block("join"))
    assert await raw.until("ok", rid=2) == example_block("ok (join)")
    await client.send({"t": "send", "rid": 4, "channel": "general", "cid": "x", "text": "x"})
    assert await raw.until("error", rid=4) == example_block("error (forbidden)")
    await client.send_raw(example_block("typing"))
    assert await raw.until("ok", rid=10) == hexdump_bytes(
        "00000000  00 00 00 0b 82 a1 74 a2  6f 6b a3 72 69 64 0a"
    )
    await client.send_raw(example_block("presence (set)"))
    assert await raw.until("ok", rid=11) == example_block("ok (presence)")
    bob = await harness.connect("bob")
    await bob.request("send", channel="room-1", cid="b", text="from bob")
    await client.send_raw(example_block("unread"))
    assert await raw.until("ok", rid=13) == example_block("ok (unread)")
    await client.send_raw(example_block("leave"))
    assert await raw.until("ok", rid=25) == example_block("ok (leave)")


async def test_read_and_left_examples_are_the_bytes_the_server_writes(harness: Harness) -> None:
    client = await harness.raw()
    raw = RawReader(client)
    await client.send({"t": "hello", "rid": 1, "v": 1, "token": mint("alice", ["room-*"])})
    await raw.until("welcome")
    await client.send({"t": "join", "rid": 2, "channel": "room-1"})
    await raw.until("ok", rid=2)
    for i in range(3):
        await client.send(
            {"t": "send", "rid": 90 + i, "channel": "room-1", "cid": f"{i}", "text": "x"}
        )
        await raw.until("ok", rid=90 + i)
    await client.send_raw(example_block("read"))
    assert await raw.until("ok", rid=24) == example_block("ok (read)")
    assert await raw.until("read") == example_block("read (push)")
    await client.send({"t": "refresh", "rid": 14, "token": mint("alice", ["room-2"])})
    assert await raw.until("left") == example_block("left")


# ================================================================= section 19: WebSocket


async def ws_client(h: Harness, subprotocol: str) -> WireClient:
    client = await ws_connect(h.server, subprotocol)
    h.clients.append(client)  # closed with the harness
    return client


def ws_pong_examples() -> dict[str, bytes]:
    """Section 19.3's two pong examples, read from PROTOCOL.md: name -> bytes."""
    text = (Path(__file__).parent.parent / "PROTOCOL.md").read_text()
    found = re.findall(r"#### `pong` as `(tsmsg\.v1\.\w+)`\n.*?```text\n(.*?)```", text, re.S)
    return {name: hexdump_bytes(dump) for name, dump in found}


async def test_ws_pong_example_bytes(harness: Harness) -> None:
    """19.3: the documented pong messages (rid 7) are what the server writes, but for
    `ts` (the server's clock; 7.8: always there), over each subprotocol. Found by this file:
    the examples had no ts."""
    examples = ws_pong_examples()
    assert set(examples) == {WS_MSGPACK, WS_JSON}, examples
    documented = examples[WS_MSGPACK]
    assert documented[:2] == bytes([0x82, len(documented) - 2])
    assert list(msgpack.unpackb(documented[2:])) == ["t", "rid", "ts"]
    assert msgpack.unpackb(documented[2:])["rid"] == 7
    documented_json = examples[WS_JSON]
    assert documented_json[:2] == bytes([0x81, len(documented_json) - 2])
    assert list(json.loads(documented_json[2:])) == ["t", "rid", "ts"]
    for subprotocol, example in ((WS_MSGPACK, documented), (WS_JSON, documented_json)):
        client = await ws_client(harness, subprotocol)
        await client.send({"t": "hello", "rid": 1, "v": 1, "token": mint("alice")})
        await client.expect("welcome")
        await client.send({"t": "ping", "rid": 7})
        pong = await client.expect("pong", rid=7)
        assert list(pong) == ["t", "rid", "ts"] and pong["rid"] == 7, pong
        ts = pong["ts"]
        if subprotocol == WS_MSGPACK:
            expect = example.replace((1767225600000).to_bytes(8, "big"), ts.to_bytes(8, "big"))
            assert expect == bytes([0x82, 25]) + msgpack.packb(pong)
        else:
            body = example[2:].replace(b"1767225600000", str(ts).encode())
            assert body == json.dumps(pong, separators=(",", ":")).encode()


async def test_ws_json_accepts_epoch_as_string_and_int(harness: Harness) -> None:
    """19.2: "the server accepts the epoch of a request as an int or as a string of decimal
    digits"; integers beyond 2**53 - 1 come as decimal strings."""
    client = await ws_client(harness, WS_JSON)
    await client.request("hello", v=1, token=mint("alice"))
    await send(client, "x")
    page = await client.request("sync", channel=ROOM, since=0)
    epoch = page["epoch"]  # exact_ints turned the string back into an int
    ok = await client.request("sync", channel=ROOM, since=1, epoch=str(epoch))
    assert ok["t"] == "ok", ok
    wrong = await client.request("sync", channel=ROOM, since=1, epoch=str(epoch + 1))
    assert wrong["t"] == "resync" and wrong["reason"] == "epoch"


@pytest.mark.parametrize(
    "text",
    [
        '{"t":"ping","rid":1e999}',
        '{"t":"ping","rid":NaN}',
        '{"t":"ping","rid":18446744073709551616}',
    ],
)
async def test_ws_json_bad_numbers_are_bad_frame(harness: Harness, text: str) -> None:
    """19.2: "Integers outside [-2^63, 2^64 - 1], and numbers that are not finite (1e999,
    NaN, Infinity), are bad_frame" (close 1007)."""
    client = await ws_client(harness, WS_JSON)
    await client.request("hello", v=1, token=mint("alice"))
    await client.send_raw(client.framing.message(text))  # type: ignore[union-attr]
    error = await client.next()
    assert error["t"] == "error" and error["code"] == "bad_frame", error
    assert await client.closed()
    assert client.framing.close_code == 1007  # type: ignore[union-attr]


async def test_ws_json_uint64_rid_is_bad_request_not_bad_frame(harness: Harness) -> None:
    """19.2 / 2: 2**63 is a valid JSON integer (≤ 2**64 - 1) but out of the rid range:
    bad_request without rid, the connection stays open."""
    client = await ws_client(harness, WS_JSON)
    await client.request("hello", v=1, token=mint("alice"))
    await client.send_raw(client.framing.message('{"t":"ping","rid":9223372036854775808}'))  # type: ignore[union-attr]
    error = await client.next()
    assert error["code"] == "bad_request" and "rid" not in error, error
    await assert_open(client)


async def test_ws_json_float_int_is_refused(harness: Harness) -> None:
    """19.2: "the server parses 1.0 as a float, which is refused where an int is
    expected"."""
    client = await ws_client(harness, WS_JSON)
    await client.request("hello", v=1, token=mint("alice"))
    await client.send_raw(
        client.framing.message('{"t":"sync","rid":3,"channel":"room-1","since":0.0}')  # type: ignore[union-attr]
    )
    error = await client.next(lambda f: f.get("rid") == 3)
    assert error["code"] == "bad_request", error


async def test_ws_json_large_meta_int_becomes_a_string(harness: Harness) -> None:
    """19.2: "the server sends every integer beyond ±(2^53 - 1) as its decimal string: in
    practice an epoch ..., or a large integer inside meta"; seqs and ts stay numbers."""
    msgpack_client = await ws_client(harness, WS_MSGPACK)
    await msgpack_client.request("hello", v=1, token=mint("alice"))
    await send(msgpack_client, "x", meta={"big": 2**60, "neg": -(2**60), "small": 2**53 - 1})
    stream = await ws_client(harness, WS_JSON)
    # read the raw JSON text (no exact_ints): a fresh framing parse
    await stream.send({"t": "hello", "rid": 1, "v": 1, "token": mint("bob")})
    await stream.send({"t": "history", "rid": 2, "channel": ROOM})
    texts: list[str] = []
    framing = stream.framing
    with trio.fail_after(5):
        while len(texts) < 2:
            data = await stream.stream.receive_some(65536)
            framing.ws.receive_data(data)  # type: ignore[union-attr]
            for ev in framing.ws.events():  # type: ignore[union-attr]
                if hasattr(ev, "data") and isinstance(ev.data, str):
                    texts.append(ev.data)
    history = json.loads(texts[1])
    [m] = history["messages"]
    assert m["meta"] == {"big": str(2**60), "neg": str(-(2**60)), "small": 2**53 - 1}
    assert isinstance(m["seq"], int) and isinstance(m["ts"], int)


# ====================================================================== second batch


async def members_of(h: Harness, user: str) -> list[str]:
    return list(await trio.to_thread.run_sync(h.server.store.channels_of, user))


async def until_member(h: Harness, user: str, channel: str, present: bool = True) -> None:
    with trio.fail_after(5):
        while (channel in await members_of(h, user)) != present:
            await trio.sleep(0.02)


@pytest.mark.parametrize(
    ("frame", "rid"),
    [
        ({"rid": 5}, 5),
        ({"t": 5, "rid": -3}, -3),
        ({"t": None, "rid": 2**63 - 1}, 2**63 - 1),
        ({"rid": "x"}, None),
        ({"rid": 2**63}, None),
    ],
    ids=repr,
)
async def test_a_map_without_string_t_echoes_a_valid_rid(
    harness: Harness, frame: Frame, rid: int | None
) -> None:
    """3: "a map without a string "t" | bad_frame (this one echoes the frame's rid if it had
    a valid one)"."""
    alice = await harness.connect("alice")
    await alice.send_raw(struct.pack(">I", len(msgpack.packb(frame))) + msgpack.packb(frame))
    error = await alice.next()
    assert error["t"] == "error" and error["code"] == "bad_frame", error
    assert error.get("rid") == rid, error
    assert await alice.closed()


async def test_welcome_limits_come_in_the_documented_order(harness: Harness) -> None:
    """7.1: limits "in this order: max_depth, max_text_bytes, ...", with the float rates as
    floats."""
    client = await harness.raw()
    welcome = await client.request("hello", v=1, token=mint("alice"))
    documented = [
        "max_depth",
        "max_text_bytes",
        "max_meta_bytes",
        "max_cid_chars",
        "history_default",
        "history_max",
        "sync_default",
        "sync_max",
        "max_joined",
        "frame_rate",
        "frame_burst",
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
        "max_memberships",
        "presence_rate",
        "presence_burst",
    ]
    assert list(welcome["limits"])[: len(documented)] == documented
    for key, value in welcome["limits"].items():
        assert isinstance(value, float if key.endswith("_rate") else int), (key, value)
        assert not isinstance(value, bool)


@with_settings(limits=fast_limits(send_rate=0.001, send_burst=2))
async def test_a_dup_answer_still_spends_a_send_token(harness: Harness) -> None:
    """6.4: "The send limits are checked after the fields and before the dedup lookup, so a
    retried send answered dup also counts"."""
    alice = await harness.connect("alice")
    first = await send(alice, "x", cid="k")
    dup = await alice.request("send", channel=ROOM, cid="k", text="x")
    assert dup["dup"] is True and dup["seq"] == first["seq"]
    refused = await alice.request("send", channel=ROOM, cid="k", text="x")
    assert refused["code"] == "rate_limited", refused


async def test_forget_on_one_device_leaves_the_others_joined(harness: Harness) -> None:
    """6.3: "Other connections of the user that joined the channel stay joined (a later join
    there makes the user a member again)"."""
    phone, laptop = await harness.connect("alice"), await harness.connect("alice")
    await join(phone)
    await join(laptop)
    await until_member(harness, "alice", ROOM)
    reply = await phone.request("leave", channel=ROOM, forget=True)
    assert reply["forgotten"] is True
    assert ROOM not in await members_of(harness, "alice")
    bob = await harness.connect("bob")
    ok = await send(bob, "still here")
    assert (await laptop.expect("event", seq=ok["seq"]))["text"] == "still here"
    assert await quiet(phone, "event") == []
    assert (await laptop.request("channels"))["channels"] == []
    await join(laptop)
    await until_member(harness, "alice", ROOM)
    [entry] = (await laptop.request("channels"))["channels"]
    assert entry["channel"] == ROOM and entry["unread"] == 1


async def test_a_dm_peer_who_forgot_returns_only_with_a_new_sender_connection(
    harness: Harness,
) -> None:
    """6.15: "When a connection's first message in a DM channel ... is committed, the server
    records the other user (the peer) as a member"; "A recipient who left the DM with
    forget becomes a member again with the next message of a new connection of the
    sender"."""
    dm = "dm:alice:bob"
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await send(alice, "one", channel=dm)
    assert await bob.expect("membership", channel=dm, by="alice")
    await until_member(harness, "bob", dm)
    await bob.request("leave", channel=dm, forget=True)
    await send(alice, "two", channel=dm)  # the same connection: not its first message
    await frames_before_pong(alice)
    with trio.move_on_after(0.5):
        await bob.expect("membership")
        pytest.fail("membership pushed again on the same sender connection")
    assert dm not in await members_of(harness, "bob")
    alice2 = await harness.connect("alice")
    await send(alice2, "three", channel=dm)
    assert await bob.expect("membership", channel=dm, by="alice")
    await until_member(harness, "bob", dm)
    [entry] = (await bob.request("channels"))["channels"]
    assert entry == {
        "channel": dm,
        "head": 3,
        "read": 0,
        "unread": 3,
        "capped": False,
        "peer": "alice",
    }


async def test_a_dm_to_oneself_side_a_first_message_from_a_joiner(harness: Harness) -> None:
    """6.15: the peer becomes a member when "a connection's first message in a DM" is
    committed, even if that connection joined the DM first (as the chat client does)."""
    dm = "dm:alice:bob"
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await join(alice, dm)
    await send(alice, "hi", channel=dm)
    assert await bob.expect("membership", channel=dm, by="alice")


async def test_presence_push_follows_the_changing_devices_token(harness: Harness) -> None:
    """6.13: pushed to connections joined to a channel the user is a member of "and the
    token of the device that made the change ... may read"; "a channel that the changing
    device's token does not allow carries none of that change's pushes"."""
    wide = await harness.connect("alice")
    await join(wide, "room-a")
    await join(wide, "room-b")
    await until_member(harness, "alice", "room-b")
    carol_a = await harness.connect("carol")
    await join(carol_a, "room-a")
    carol_b = await harness.connect("carol")
    await join(carol_b, "room-b")
    narrow = await harness.connect("alice", channels=["room-a"])
    await frames_before_pong(carol_a)
    await frames_before_pong(carol_b)
    await narrow.request("presence", status="away")
    assert [p["status"] for p in await quiet(carol_a, "presence")] == ["away"]
    assert await quiet(carol_b, "presence") == []
    await wide.request("presence", status="busy")
    assert [p["status"] for p in await quiet(carol_b, "presence")] == ["busy"]


async def test_presence_query_and_channels_follow_the_askers_token(harness: Harness) -> None:
    """6.13: a query lists users who are members of a channel "that the asker is a member
    of and the asker's token may read"; 6.15: channels lists memberships "that the token
    may read"."""
    alice = await harness.connect("alice")
    await join(alice, "room-b")
    bob = await harness.connect("bob")
    await join(bob, "room-b")
    await until_member(harness, "alice", "room-b")
    await until_member(harness, "bob", "room-b")
    narrow = await harness.connect("alice", channels=["room-a"])
    assert (await narrow.request("presence", users=["bob"]))["users"] == []
    assert (await narrow.request("channels"))["channels"] == []
    assert [u["user"] for u in (await alice.request("presence", users=["bob"]))["users"]] == ["bob"]


async def test_history_before_one_is_empty(harness: Harness) -> None:
    alice = await harness.connect("alice")
    await send(alice, "x")
    page = await alice.request("history", channel=ROOM, before=1)
    assert page["messages"] == [] and page["more"] is False


async def test_an_empty_id_is_not_found(harness: Harness) -> None:
    """6.5: id is "a message id (≤ 64 chars)"; not_found for "an id that is not a
    message's" (an empty string names no message)."""
    alice = await harness.connect("alice")
    await send(alice, "x")
    assert_error(await alice.request("edit", channel=ROOM, id="", text="t"), "not_found")
    assert_error(await alice.request("delete", channel=ROOM, id=""), "not_found")


async def test_hello_required_echoes_the_rid(harness: Harness) -> None:
    """4.1 says the error is sent; 2 says "A request with a rid gets exactly one reply
    carrying the same rid"."""
    client = await harness.raw()
    await client.send({"t": "ping", "rid": 42})
    error = await client.next()
    assert error["code"] == "hello_required" and error.get("rid") == 42, error


async def test_only_rate_limited_errors_carry_retry_after(harness: Harness) -> None:
    """7.3: retry_after_ms "with rate_limited"; refresh_within_ms "only in the token-expiry
    notice"."""
    alice = await harness.connect("alice", channels=["room-*"])
    for reply in [
        await alice.request("join", channel="general"),
        await alice.request("sync", channel=ROOM),
        await alice.request("edit", channel=ROOM, id="x", text="t"),
        await alice.request("nope"),
    ]:
        assert reply["t"] == "error"
        assert set(reply) == {"t", "rid", "code", "message"}, reply


# ======================================================================= third batch

SMALL = dict(max_text_bytes=1000, max_meta_bytes=500, max_frame=1000 + 500 + 2048)


def meta_of_size(n: int) -> dict[str, Any]:
    """A meta map whose msgpack encoding is exactly n bytes (n >= 6)."""
    value = {"k": "x" * (n - 6)} if n - 6 >= 32 else {"k": "x" * (n - 5)}
    assert len(msgpack.packb(value)) == n, len(msgpack.packb(value))
    return value


@with_settings(limits=fast_limits(**SMALL))
async def test_pages_of_maximal_entries_fit_max_frame_and_page_completely(
    harness: Harness,
) -> None:
    """3: "Every frame the server sends also fits in max_frame: sync and history replies end
    their page early (with "more": true) rather than exceed it"; 15: max_frame ≥ text +
    meta + 2,048 is enough "for an event or a one-entry page"; 12/13.1: paging by before /
    since then returns every entry once. Worst case names: a 128-char channel, a 62-char
    user, 3-byte characters, an edited message (edited key)."""
    channel = "c" * 128
    user = "u" * 62
    client = await harness.raw()
    raw = RawReader(client)
    await client.send({"t": "hello", "rid": 1, "v": 1, "token": mint(user)})
    await raw.until("welcome")
    await client.send({"t": "join", "rid": 2, "channel": channel})
    await raw.until("ok", rid=2)
    meta = meta_of_size(500)
    text = "€" * 333 + "x"  # 1000 bytes
    ids = []
    for i in range(5):
        await client.send(
            {
                "t": "send",
                "rid": 10 + i,
                "channel": channel,
                "cid": "c" * 60 + f"{i:04d}",
                "text": text,
                "meta": meta,
            }
        )
        ok = msgpack.unpackb((await raw.until("ok", rid=10 + i))[4:])
        ids.append(ok["id"])
    await client.send({"t": "edit", "rid": 20, "channel": channel, "id": ids[0], "text": text})
    await raw.until("ok", rid=20)
    limit = harness.server.settings.limits.max_frame
    # sync, page by page
    since, seqs, rid = 0, [], 100
    while True:
        rid += 1
        await client.send({"t": "sync", "rid": rid, "channel": channel, "since": since})
        frame = await raw.until("ok", rid=rid)
        assert len(frame) - 4 <= limit, (len(frame) - 4, limit)
        page = msgpack.unpackb(frame[4:])
        assert page["events"], page  # "at least one entry"
        seqs += [e["seq"] for e in page["events"]]
        since = seqs[-1]
        if not page["more"]:
            break
    assert seqs == [1, 2, 3, 4, 5, 6]
    # history, page by page
    before, hseqs = None, []
    while True:
        rid += 1
        req = {"t": "history", "rid": rid, "channel": channel, "limit": 500}
        if before is not None:
            req["before"] = before
        await client.send(req)
        frame = await raw.until("ok", rid=rid)
        assert len(frame) - 4 <= limit, (len(frame) - 4, limit)
        page = msgpack.unpackb(frame[4:])
        assert page["messages"], page
        hseqs = [m["seq"] for m in page["messages"]] + hseqs
        before = page["messages"][0]["seq"]
        if not page["more"]:
            break
    assert hseqs == [1, 2, 3, 4, 5]


@with_settings(tick_ms=5000, limits=fast_limits(refresh_grace_ms=20_000))
async def test_requests_are_refused_from_exp_even_before_the_notice(harness: Harness) -> None:
    """5.5.2: "From exp on (even before the notice arrives) until a refresh succeeds, every
    request other than refresh and ping is refused" (the ticker here runs every 5 s)."""
    now = time.time()
    exp = int(now) + (1 if now % 1 < 0.5 else 2)
    alice, welcome = await hello_with(harness, forge(claims(exp=exp)))
    assert welcome["t"] == "welcome"
    await trio.sleep(max(0.0, exp - time.time()) + 0.1)
    reply = await alice.request("history", channel=ROOM)
    assert reply["t"] == "error" and reply["code"] == "token_expired", reply


@with_settings(tick_ms=20, limits=fast_limits(refresh_grace_ms=20_000))
async def test_malformed_requests_while_expired_are_token_expired(harness: Harness) -> None:
    """5.4: "every request other than refresh and ping is refused with token_expired,
    whatever it needs"; 5.5.2: only the frame rate limit and unknown_type come first."""
    now = time.time()
    exp = int(now) + (1 if now % 1 < 0.5 else 2)
    alice, _ = await hello_with(harness, forge(claims(exp=exp)))
    await alice.next(lambda f: f.get("code") == "token_expired")
    for t, fields in [("join", {"channel": 5}), ("send", {}), ("sync", {"channel": "bad name"})]:
        reply = await alice.request(t, **fields)
        assert reply["code"] == "token_expired", (t, reply)


async def test_refresh_with_a_future_nbf_is_unauthorized(harness: Harness) -> None:
    """5.5: "The new token is verified like the hello's (signature, algorithm, exp, nbf,
    claims)"."""
    alice = await harness.connect("alice")
    token = forge(claims(nbf=int(time.time()) + 3600))
    assert_error(await alice.request("refresh", token=token), "unauthorized")
    await assert_open(alice)


async def test_epoch_as_a_string_over_msgpack_is_bad_request(harness: Harness) -> None:
    """6.8: epoch is an int; "bad_request (also for an epoch that is not an int in range)".
    (19.2 allows a decimal string on tsmsg.v1.json only.)"""
    alice = await harness.connect("alice")
    await send(alice, "x")
    epoch = (await alice.request("sync", channel=ROOM, since=0))["epoch"]
    reply = await alice.request("sync", channel=ROOM, since=1, epoch=str(epoch))
    assert_error(reply, "bad_request")


@with_settings(limits=fast_limits(frame_rate=0.001, frame_burst=1))
async def test_hello_takes_no_frame_token(harness: Harness) -> None:
    """6.1: hello is "Not counted by the rate limit"; 16.1: "Every frame after hello"."""
    alice = await harness.connect("alice")
    assert (await alice.request("ping"))["t"] == "pong"
    assert (await alice.request("ping"))["code"] == "rate_limited"


async def test_texts_and_names_are_exact(harness: Harness) -> None:
    """2: channel names are case-sensitive; 6.4: text is any UTF-8 and is delivered as
    sent."""
    alice = await harness.connect("alice")
    await join(alice, "Room-1")
    await join(alice, "room-1")
    text = "a\x00b \u202e\u05d0 e\u0301 😀 \ufeff"
    ok = await send(alice, text, channel="Room-1")
    event = await alice.expect("event", seq=ok["seq"])
    assert (event["channel"], event["text"]) == ("Room-1", text)
    assert (await alice.request("sync", channel="room-1", since=0))["head"] == 0


@pytest.mark.parametrize(
    "text",
    [
        '{"t":"ping","rid":-9223372036854775809}',
        '{"t":"ping","rid":Infinity}',
        '{"t":"ping","rid":-1e400}',
    ],
)
async def test_ws_json_more_bad_numbers_are_bad_frame(harness: Harness, text: str) -> None:
    """19.2: integers outside [-2^63, 2^64 - 1] and non-finite numbers are bad_frame."""
    client = await ws_client(harness, WS_JSON)
    await client.request("hello", v=1, token=mint("alice"))
    await client.send_raw(client.framing.message(text))  # type: ignore[union-attr]
    error = await client.next()
    assert error["code"] == "bad_frame", error
    assert await client.closed()


@pytest.mark.parametrize("epoch", ["-1", "+5", " 5", "5.0", "", "0x10", "99999999999999999999"])
async def test_ws_json_epoch_strings_that_are_not_digits_are_bad_request(
    harness: Harness, epoch: str
) -> None:
    """19.2: the server accepts the epoch "as an int or as a string of decimal digits"
    (in range, 6.8)."""
    client = await ws_client(harness, WS_JSON)
    await client.request("hello", v=1, token=mint("alice"))
    await send(client, "x")
    assert_error(await client.request("sync", channel=ROOM, since=1, epoch=epoch), "bad_request")


async def test_ws_json_large_rid_is_echoed_as_a_string(harness: Harness) -> None:
    """19.2: "the server sends every integer beyond ±(2^53 - 1) as its decimal string";
    2: a rid is "echoed"."""
    client = await ws_client(harness, WS_JSON)
    await client.request("hello", v=1, token=mint("alice"))
    await client.send_raw(client.framing.message('{"t":"ping","rid":1152921504606846976}'))  # type: ignore[union-attr]
    framing = client.framing
    texts: list[str] = []
    with trio.fail_after(5):
        while not texts:
            framing.ws.receive_data(await client.stream.receive_some(65536))  # type: ignore[union-attr]
            texts += [
                ev.data for ev in framing.ws.events() if isinstance(getattr(ev, "data", None), str)
            ]  # type: ignore[union-attr]
    pong = json.loads(texts[0])
    assert pong["rid"] == "1152921504606846976", pong


# ============================================================== WebSocket closing (19.2)


async def ws_raw_until_eof(client: WireClient) -> bytes:
    data = b""
    with trio.fail_after(5):
        while True:
            try:
                chunk = await client.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


async def test_ws_invalid_json_example_bytes(harness: Harness) -> None:
    """19.3 "bad_frame after invalid JSON": the error message bytes, "then the close frame
    with code 1007 (03 ef)"."""
    client = await ws_client(harness, WS_JSON)
    await client.request("hello", v=1, token=mint("alice"))
    await client.send_raw(client.framing.message("hello?"))  # type: ignore[union-attr]
    data = await ws_raw_until_eof(client)
    documented = hexdump_bytes(
        """
00000000  81 64 7b 22 74 22 3a 22  65 72 72 6f 72 22 2c 22  |.d{"t":"error","|
00000010  63 6f 64 65 22 3a 22 62  61 64 5f 66 72 61 6d 65  |code":"bad_frame|
00000020  22 2c 22 6d 65 73 73 61  67 65 22 3a 22 69 6e 76  |","message":"inv|
00000030  61 6c 69 64 20 4a 53 4f  4e 3a 20 45 78 70 65 63  |alid JSON: Expec|
00000040  74 69 6e 67 20 76 61 6c  75 65 3a 20 6c 69 6e 65  |ting value: line|
00000050  20 31 20 63 6f 6c 75 6d  6e 20 31 20 28 63 68 61  | 1 column 1 (cha|
00000060  72 20 30 29 22 7d                                 |r 0)"}|
"""
    )
    assert data.startswith(documented), data[:120]
    rest = data[len(documented) :]
    assert rest[:1] == b"\x88" and rest[2:4] == b"\x03\xef", rest


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"t": "ping", "rid": 1}, "hello_required"),
        ({"t": "hello", "rid": 1, "v": 1, "token": "nope"}, "unauthorized"),
        ({"t": "hello", "rid": 1, "v": 2, "token": "nope"}, "unsupported_version"),
    ],
    ids=["hello_required", "unauthorized", "unsupported_version"],
)
async def test_ws_other_connection_errors_close_with_1008(
    harness: Harness, frame: Frame, code: str
) -> None:
    """19.2: the server closes "with ... 1008 (policy violation) for any other error code
    (hello_timeout, idle_timeout, unauthorized, ...)"."""
    client = await ws_client(harness, WS_MSGPACK)
    await client.send(frame)
    error = await client.next()
    assert error["code"] == code and error.get("rid") == 1, error
    assert await client.closed()
    assert client.framing.close_code == 1008  # type: ignore[union-attr]


async def test_ws_unmasked_client_frame_is_bad_frame_1002(harness: Harness) -> None:
    """19.2: "a WebSocket protocol violation (an unmasked client frame, a bad opcode, ...)
    | bad_frame | 1002"."""
    client = await ws_client(harness, WS_MSGPACK)
    await client.request("hello", v=1, token=mint("alice"))
    body = msgpack.packb({"t": "ping", "rid": 9})
    await client.send_raw(bytes([0x82, len(body)]) + body)  # no mask bit
    frames = []
    with trio.move_on_after(5):
        try:
            while True:
                await client._fill()
        except (EOFError, trio.BrokenResourceError):
            pass
    frames = client.pending
    assert [f.get("code") for f in frames] == ["bad_frame"], frames
    assert client.framing.close_code == 1002  # type: ignore[union-attr]


async def test_ws_user_cap_rate_limited_hello_closes_1013(tmp_path: Path) -> None:
    """19.2: "1013 (try again later) after rate_limited"; 16.3: the per-user cap answers the
    hello "rate_limited (with its rid)"."""
    settings = make_settings(tmp_path / "data", user_max_connections=1)
    async with running_server(settings) as h:
        first = await ws_client(h, WS_JSON)
        assert (await first.request("hello", v=1, token=mint("alice")))["t"] == "welcome"
        second = await ws_client(h, WS_JSON)
        reply = await second.request("hello", v=1, token=mint("alice"))
        assert reply["code"] == "rate_limited" and reply["retry_after_ms"] == 1000, reply
        assert await second.closed()
        assert second.framing.close_code == 1013  # type: ignore[union-attr]


async def test_status_of_a_returning_user_is_online_again(harness: Harness) -> None:
    """6.13: "When the user's first device (connection) completes hello, the status becomes
    online" (a custom status set earlier does not survive the last disconnect); the asker
    itself is listed "if asked", member of nothing or not."""
    alice = await harness.connect("alice")
    me = await alice.request("presence", users=["alice"])
    assert me["users"] == [{"user": "alice", "status": "online", "online": True}], me
    await alice.request("presence", status="busy")
    await alice.aclose()
    with trio.fail_after(5):
        while "alice" in harness.server.devices:
            await trio.sleep(0.02)
    again = await harness.connect("alice")
    me = await again.request("presence", users=["alice"])
    assert me["users"] == [{"user": "alice", "status": "online", "online": True}], me


@with_settings(max_edits_per_message=2)
async def test_edits_past_the_bound_are_limit_exceeded_but_delete_works(harness: Harness) -> None:
    """6.5: limit_exceeded "also: the message already has max_edits_per_message edits ...;
    it can still be deleted"; nothing is stored for the refused edit."""
    alice = await harness.connect("alice")
    ok = await send(alice, "v0")
    for i in (1, 2):
        assert (await alice.request("edit", channel=ROOM, id=ok["id"], text=f"v{i}"))["t"] == "ok"
    assert_error(
        await alice.request("edit", channel=ROOM, id=ok["id"], text="v3"), "limit_exceeded"
    )
    assert (await alice.request("sync", channel=ROOM, since=0))["head"] == 3
    d = await alice.request("delete", channel=ROOM, id=ok["id"])
    assert d["t"] == "ok" and d["seq"] == 4


@with_settings(
    limits=fast_limits(send_rate=0.5, send_burst=1, channel_send_rate=0.1, channel_send_burst=1)
)
async def test_send_retry_after_is_the_longer_wait(harness: Harness) -> None:
    """16.2: a refused send's "retry_after_ms is the longer of the two waits"."""
    alice = await harness.connect("alice")
    await send(alice, "x")
    refused = await alice.request("send", channel=ROOM, cid="y", text="y")
    assert refused["code"] == "rate_limited"
    assert refused["retry_after_ms"] > 5000, refused  # the channel bucket's ~10 s, not 2 s


async def test_ws_close_after_bye_example_bytes(tmp_path: Path) -> None:
    """19.3 "The close after bye": 88 11 03 e9 "server shutdown", after the bye message."""
    async with running_server(make_settings(tmp_path / "data")) as h:
        client = await ws_client(h, WS_JSON)
        await client.request("hello", v=1, token=mint("alice"))
        h.server.stopping.set()
        data = await ws_raw_until_eof(client)
        bye = b'{"t":"bye","code":"shutting_down","message":"server stopping"}'
        close = hexdump_bytes(
            "00000000  88 11 03 e9 73 65 72 76  65 72 20 73 68 75 74 64\n00000010  6f 77 6e"
        )
        assert data.endswith(close), data[-40:]
        assert bye in data, data


@pytest.mark.parametrize("lists", [28, 29, 30])
async def test_meta_deeper_than_pages_allow_is_refused_at_send(
    harness: Harness, lists: int
) -> None:
    """6.4: a send's `meta` may reach depth `max_depth` - 2 (3: "the frame's own map is
    depth 1 (so meta inside send is depth 2)"), since a sync or history page carries it two
    levels deeper (ok map, events array, event map, meta) and every frame the server sends
    nests within max_depth. Deeper: `limit_exceeded`, nothing stored. Found by this file:
    a meta within max_depth was stored, and then every sync and history of its channel
    closed the reader's connection (the page could not be encoded)."""
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    await join(bob)
    meta: Any = 1
    for _ in range(lists):
        meta = [meta]
    meta = {"k": meta}  # send frame depth 1, meta depth 2, innermost list depth 2 + lists
    if 2 + lists > DEFAULT_MAX_DEPTH - 2:
        refused = await alice.request("send", channel=ROOM, cid="deep", text="deep", meta=meta)
        assert refused["t"] == "error" and refused["code"] == "limit_exceeded", refused
        info = await bob.request("sync", channel=ROOM, since=0)
        assert info["t"] == "ok" and info["events"] == [] and info["head"] == 0, info
        return
    ok = await send(alice, "deep", meta=meta)
    live = await bob.expect("event", seq=ok["seq"])
    assert live["meta"] == meta
    page = await bob.request("sync", channel=ROOM, since=0)
    assert page["t"] == "ok" and page["events"][0]["meta"] == meta, page
    hist = await bob.request("history", channel=ROOM)
    assert hist["t"] == "ok" and hist["messages"][0]["meta"] == meta, hist


def strict_json(text: str) -> Any:
    """RFC 8259 JSON: NaN, Infinity and -Infinity are not JSON (a browser's JSON.parse
    throws on them)."""

    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


async def test_non_finite_meta_floats_are_refused(harness: Harness) -> None:
    """6.4 / 19.2: on tsmsg.v1.json one message is "one JSON object (RFC 8259)", which has no
    NaN or infinity, so a msgpack client's meta holding one is refused (`bad_request`) and
    nothing is stored. Found by this file: it was stored, and JSON clients got `NaN` and
    `Infinity` in the event and in history (a browser's JSON.parse throws on them). A JSON
    client receiving every message meanwhile sees only JSON."""
    client = await ws_client(harness, WS_JSON)
    await client.send({"t": "hello", "rid": 1, "v": 1, "token": mint("bob")})
    await client.send({"t": "join", "rid": 2, "channel": ROOM})
    texts: list[str] = []
    framing = client.framing

    async def read_texts(n: int) -> None:
        with trio.fail_after(5):
            while len(texts) < n:
                chunk = await client.stream.receive_some(65536)
                if not chunk:
                    raise EOFError
                framing.ws.receive_data(chunk)  # type: ignore[union-attr]
                texts.extend(
                    ev.data
                    for ev in framing.ws.events()  # type: ignore[union-attr]
                    if isinstance(getattr(ev, "data", None), str)
                )

    await read_texts(2)  # welcome, ok (join)
    alice = await harness.connect("alice")
    for value in (float("nan"), float("inf"), -float("inf")):
        refused = await alice.request(
            "send", channel=ROOM, cid=f"c-{value}", text="x", meta={"a": [{"f": value}]}
        )
        assert refused["t"] == "error" and refused["code"] == "bad_request", refused
    ok = await send(alice, "x", meta={"f": 1.5})
    await read_texts(3)  # the live event (perhaps a membership notice first)
    await client.send({"t": "history", "rid": 3, "channel": ROOM})
    with trio.fail_after(5):
        while not any(strict_json(text).get("rid") == 3 for text in texts):
            await read_texts(len(texts) + 1)
    frames = [strict_json(text) for text in texts]  # every message is JSON
    assert ok["seq"] == 1
    history = next(f for f in frames if f.get("rid") == 3)
    assert [m["meta"] for m in history["messages"]] == [{"f": 1.5}], history


@pytest.mark.parametrize("over", ["tcp", WS_JSON, WS_MSGPACK])
async def test_meta_stored_before_its_checks_is_left_out_where_it_cannot_go(
    harness: Harness, over: str
) -> None:
    """6.4: entries stored before the send checks existed (a meta deeper than pages
    allow, a float JSON has no form for) go without their `meta` in a frame that could not
    be written with it, and with it where it can be (msgpack carries NaN, JSON any
    depth); the page
    arrives and the connection stays open. Before, every sync and history of such a
    channel closed the reader's connection, at every reconnect. The store keeps them."""
    deep: Any = 1
    for _ in range(DEFAULT_MAX_DEPTH - 2):
        deep = [deep]
    nan_room = f"{ROOM}-nan"
    writes = [(ROOM, {"k": deep}), (ROOM, {"f": 1.5}), (nan_room, {"f": float("nan")})]
    store = harness.server.store
    for i, (channel, meta) in enumerate(writes):  # as an older server stored them
        op = WriteOp("message", channel, "alice", cid=f"c{i}", text=f"t{i}", meta=meta)
        await trio.to_thread.run_sync(lambda op=op: store.write(op, timeout=5))
    bob = await harness.connect("bob") if over == "tcp" else await ws_client(harness, over)
    if over != "tcp":
        welcome = await bob.request("hello", v=1, token=mint("bob"))
        assert welcome["t"] == "welcome", welcome
    for channel in (ROOM, nan_room):
        page = await bob.request("sync", channel=channel, since=0)
        hist = await bob.request("history", channel=channel)
        for entries in (page["events"], hist["messages"]):
            if channel == ROOM:  # JSON has no depth limit: the deep meta goes as it is
                assert [e["text"] for e in entries] == ["t0", "t1"], entries
                assert entries[0].get("meta") == ({"k": deep} if over == WS_JSON else None)
                assert entries[1]["meta"] == {"f": 1.5}
            elif over == WS_JSON:
                assert [e["text"] for e in entries] == ["t2"] and "meta" not in entries[0]
            else:
                assert math.isnan(entries[0]["meta"]["f"]), entries
    await assert_open(bob)
    stored = await trio.to_thread.run_sync(lambda: store.sync(ROOM, 0, 10))
    assert stored.entries[0]["meta"] == {"k": deep}
