"""Malformed input over real TCP: every class of bad bytes or bad fields gets its documented
error code, the connection is closed exactly when DESIGN.md says so (connection errors)
and stays usable otherwise (request errors), and a healthy bystander connection on the
same server keeps sending and receiving while nothing it stored changes.

The server here runs with small limits (``max_frame`` 4096) so "over the limit" is cheap
to send; a test can override settings with ``@pytest.mark.parametrize("settings", [{...}],
indirect=True)``.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from conftest import Harness, WireClient, make_settings, mint
from tsmsg.protocol.limits import Limits
from tsmsg.server.settings import Settings

LIMITS = Limits(max_frame=4096, max_text_bytes=1024, max_meta_bytes=512, max_joined=8)
LOBBY = "lobby"


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    overrides = {"limits": LIMITS, **getattr(request, "param", {})}
    return make_settings(tmp_path / "data", **overrides)


# --- bytes -------------------------------------------------------------------------------------


def frame_of(body: bytes) -> bytes:
    """A frame around raw body bytes, which need not be valid msgpack."""
    return struct.pack(">I", len(body)) + body


def packed(obj: Any) -> bytes:
    return frame_of(msgpack.packb(obj))


def nested_lists(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def ping_with(**extra: Any) -> dict[str, Any]:
    return {"t": "ping", "rid": 1, **extra}


# Connection errors: (id, bytes, code). Every one is sent both before and after hello.
FATAL: list[tuple[str, bytes, str]] = [
    ("header-over-max-frame", struct.pack(">I", LIMITS.max_frame + 1), "frame_too_large"),
    ("header-4GiB", b"\xff\xff\xff\xff", "frame_too_large"),
    ("invalid-msgpack-c1", frame_of(b"\xc1"), "bad_frame"),
    ("empty-body", frame_of(b""), "bad_frame"),
    ("body-array", packed(["t", "ping"]), "bad_frame"),
    ("body-int", packed(5), "bad_frame"),
    ("body-str", packed("ping"), "bad_frame"),
    ("body-nil", packed(None), "bad_frame"),
    ("body-bin", packed(b"\x81\xa1t\xa4ping"), "bad_frame"),
    ("int-key", packed({1: "x", "t": "ping"}), "bad_frame"),
    ("nested-int-key", packed(ping_with(x={2: 3})), "bad_frame"),
    ("bin-key", packed({b"t": "ping"}), "bad_frame"),
    ("too-deep", packed(ping_with(x=nested_lists(LIMITS.max_depth))), "bad_frame"),
    ("ext-type", packed(ping_with(x=msgpack.ExtType(1, b"a"))), "bad_frame"),
    ("timestamp-ext", packed(ping_with(x=msgpack.Timestamp(1, 0))), "bad_frame"),
    ("str-overruns-frame", frame_of(b"\x81\xa1t\xd9\x0aabc"), "bad_frame"),
    ("array-overruns-frame", frame_of(b"\x82\xa1t\xa4ping\xa1x\xdd\xff\xff\xff\xff"), "bad_frame"),
    ("map-overruns-frame", frame_of(b"\x8f\xa1t\xa4ping"), "bad_frame"),
    ("trailing-bytes", frame_of(msgpack.packb({"t": "ping"}) + b"\x00"), "bad_frame"),
    ("invalid-utf8", frame_of(b"\x81\xa1t\xa2\xff\xfe"), "bad_frame"),
    ("no-t", packed({"rid": 1}), "bad_frame"),
    ("t-int", packed({"t": 5, "rid": 1}), "bad_frame"),
    ("t-nil", packed({"t": None, "rid": 1}), "bad_frame"),
    ("t-list", packed({"t": ["ping"], "rid": 1}), "bad_frame"),
    ("t-bin", packed({"t": b"ping", "rid": 1}), "bad_frame"),
    ("t-map", packed({"t": {"t": "ping"}, "rid": 1}), "bad_frame"),
]

# Only before hello.
FATAL_BEFORE_HELLO: list[tuple[str, bytes, str]] = [
    # (an HTTP request line gets a plain-text answer instead: tests/test_first_hour.py)
    ("http-like", b"GOT / HTTP/1.1\r\nHost: tsmsg\r\n\r\n", "frame_too_large"),
    ("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "frame_too_large"),
    ("garbage-small-frame", b"\x00\x00\x00\x04\xde\xad\xbe\xef", "bad_frame"),
    ("ping-first", packed({"t": "ping", "rid": 1}), "hello_required"),
    ("join-first", packed({"t": "join", "rid": 1, "channel": LOBBY}), "hello_required"),
    (
        "send-first",
        packed({"t": "send", "rid": 1, "channel": LOBBY, "cid": "c", "text": "x"}),
        "hello_required",
    ),
    ("welcome-first", packed({"t": "welcome", "v": 1}), "hello_required"),
    ("Hello-first", packed({"t": "Hello", "v": 1, "token": "x"}), "hello_required"),
]


# --- the bystander -----------------------------------------------------------------------------


class Bystander:
    """A healthy client in LOBBY that keeps talking; ``check`` proves it still can and
    that LOBBY holds exactly what it sent."""

    def __init__(self, client: WireClient) -> None:
        self.client = client
        self.sent: list[str] = []

    async def say(self) -> None:
        text = f"bystander-{len(self.sent)}"
        ok = await self.client.request("send", channel=LOBBY, cid=text, text=text)
        assert ok["t"] == "ok" and ok["dup"] is False, ok
        self.sent.append(text)
        event = await self.client.expect("event", seq=ok["seq"])
        assert event["text"] == text and event["sender"] == "bystander"

    async def check(self) -> None:
        await self.say()
        history = await self.client.request("history", channel=LOBBY, limit=LIMITS.history_max)
        assert [m["text"] for m in history["messages"]] == self.sent
        assert {m["sender"] for m in history["messages"]} == {"bystander"}
        assert all(m["kind"] == "message" and "edited" not in m for m in history["messages"])
        sync = await self.client.request("sync", channel=LOBBY, since=0)
        assert sync["head"] == len(self.sent) and len(sync["events"]) == len(self.sent)
        # nothing but its own events arrived: no typing, read or events of others
        assert [f for f in self.client.pending if f["t"] != "pong"] == []


@pytest.fixture
async def bystander(harness: Harness) -> AsyncIterator[Bystander]:
    client = await harness.connect("bystander")
    assert (await client.request("join", channel=LOBBY))["t"] == "ok"
    await client.expect("membership", channel=LOBBY)  # its join's notice, to its devices
    b = Bystander(client)
    await b.say()
    yield b
    await b.check()


async def attacker(harness: Harness, *, hello: bool) -> WireClient:
    """A client with full rights (every channel, every scope), so nothing it does is
    refused for lack of authorization: only the malformed input itself is."""
    if not hello:
        return await harness.raw()
    scopes = ("chat:read", "chat:send", "chat:moderate")
    return await harness.connect("mallory", channels=["*"], scopes=scopes)


async def assert_connection_error(client: WireClient, data: bytes, code: str) -> None:
    await client.send_raw(data)
    error = await client.next()
    assert error["t"] == "error" and error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert await client.closed()
    assert client.pending == []  # nothing after the error frame


def ids(cases: list[tuple[str, bytes, str]]) -> list[Any]:
    return [pytest.param(data, code, id=name) for name, data, code in cases]


# --- connection errors -------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "code"), ids(FATAL))
@pytest.mark.parametrize("hello", [False, True], ids=["before-hello", "after-hello"])
async def test_a_bad_frame_closes_the_connection(
    harness: Harness, bystander: Bystander, data: bytes, code: str, hello: bool
) -> None:
    client = await attacker(harness, hello=hello)
    await assert_connection_error(client, data, code)
    await bystander.check()


@pytest.mark.parametrize(("data", "code"), ids(FATAL_BEFORE_HELLO))
async def test_a_bad_first_frame_closes_the_connection(
    harness: Harness, bystander: Bystander, data: bytes, code: str
) -> None:
    client = await harness.raw()
    await assert_connection_error(client, data, code)
    await bystander.check()


async def test_frame_too_large_is_sent_on_the_header_alone(
    harness: Harness, bystander: Bystander
) -> None:
    client = await attacker(harness, hello=True)
    await client.send_raw(struct.pack(">I", LIMITS.max_frame + 1))
    error = await client.next()  # no body was sent: the header alone decided
    assert error == {"t": "error", "code": "frame_too_large", "message": error["message"]}
    assert str(LIMITS.max_frame) in error["message"]
    assert await client.closed()
    await bystander.check()


async def test_a_frame_of_exactly_max_frame_is_accepted(
    harness: Harness, bystander: Bystander
) -> None:
    client = await attacker(harness, hello=True)
    body = msgpack.packb({"t": "ping", "rid": 9, "pad": ""})
    pad = "x" * (LIMITS.max_frame - len(body) - 2)  # str8 -> str16 adds 2 header bytes
    exact = packed({"t": "ping", "rid": 9, "pad": pad})
    assert len(exact) == 4 + LIMITS.max_frame
    await client.send_raw(exact)
    assert (await client.next())["t"] == "pong"
    over = packed({"t": "ping", "rid": 9, "pad": pad + "x"})
    await assert_connection_error(client, over, "frame_too_large")
    await bystander.check()


async def test_nesting_at_the_depth_limit_is_accepted(
    harness: Harness, bystander: Bystander
) -> None:
    client = await attacker(harness, hello=True)
    pong = await client.request("ping", x=nested_lists(LIMITS.max_depth - 1))
    assert pong["t"] == "pong"
    await bystander.check()


async def test_a_valid_frame_cut_short_by_the_peer_closing(
    harness: Harness, bystander: Bystander
) -> None:
    for hello in (False, True):
        client = await attacker(harness, hello=hello)
        frame = packed({"t": "send", "rid": 5, "channel": LOBBY, "cid": "cut", "text": "half"})
        await client.send_raw(frame[: len(frame) // 2])
        await client.aclose()
        await bystander.check()
    await only_bystander_left(harness)


async def test_a_peer_closing_inside_the_header(harness: Harness, bystander: Bystander) -> None:
    client = await attacker(harness, hello=True)
    await client.send_raw(b"\x00\x00")
    await client.aclose()
    await bystander.check()


async def only_bystander_left(harness: Harness) -> None:
    """Wait until the server has dropped every connection but the bystander's."""
    with trio.fail_after(5):
        while len(harness.server.connections) > 1:
            await trio.sleep(0.01)


async def reset(client: WireClient) -> None:
    """Abort the connection with a TCP RST (SO_LINGER 0), as a crashing peer does."""
    client.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.aclose()


@pytest.mark.parametrize("unread", [False, True], ids=["idle", "unread-replies"])
async def test_a_peer_reset_is_not_an_internal_error(
    harness: Harness, bystander: Bystander, caplog: pytest.LogCaptureFixture, unread: bool
) -> None:
    client = await attacker(harness, hello=True)
    if unread:
        for _ in range(20):
            await client.send({"t": "history", "rid": 1, "channel": LOBBY})
        await client.request("ping")
    await reset(client)
    await only_bystander_left(harness)
    await bystander.check()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_nothing_is_read_after_a_connection_error(
    harness: Harness, bystander: Bystander
) -> None:
    """Valid requests written right behind a bad frame are never carried out."""
    client = await attacker(harness, hello=True)
    behind = packed({"t": "send", "rid": 2, "channel": LOBBY, "cid": "after", "text": "sneaky"})
    await client.send_raw(frame_of(b"\xc1") + behind + behind)
    error = await client.next()
    assert error["code"] == "bad_frame"
    assert await client.closed()
    assert [f for f in client.pending if f["t"] == "ok"] == []
    await bystander.check()


# --- the hello deadline ----------------------------------------------------------------------


def assert_told_hello_timeout(client: WireClient) -> None:
    [error] = client.pending
    assert error["t"] == "error" and error["code"] == "hello_timeout" and "rid" not in error


@pytest.mark.parametrize("settings", [{"hello_timeout_s": 0.3}], indirect=True)
async def test_a_silent_client_is_closed_after_the_hello_timeout(
    harness: Harness, bystander: Bystander
) -> None:
    start = trio.current_time()
    silent = await harness.raw()
    assert await silent.closed()
    assert 0.25 <= trio.current_time() - start < 3
    assert_told_hello_timeout(silent)
    await bystander.check()


@pytest.mark.parametrize("settings", [{"hello_timeout_s": 0.3}], indirect=True)
async def test_a_dribbling_hello_is_closed_after_the_hello_timeout(
    harness: Harness, bystander: Bystander
) -> None:
    slow = await harness.raw()
    hello = packed({"t": "hello", "v": 1, "rid": 1, "token": mint("slowpoke")})
    start = trio.current_time()
    with trio.move_on_after(3):
        for i in range(len(hello) - 1):  # never the last byte
            try:
                await slow.send_raw(hello[i : i + 1])
            except trio.BrokenResourceError:
                break
            await trio.sleep(0.05)
    assert await slow.closed()
    assert trio.current_time() - start < 3
    assert_told_hello_timeout(slow)
    await bystander.check()


@pytest.mark.parametrize("settings", [{"hello_timeout_s": 0.3}], indirect=True)
async def test_a_client_past_hello_is_not_closed_by_the_hello_timeout(
    harness: Harness, bystander: Bystander
) -> None:
    await trio.sleep(0.5)
    idle = await harness.connect("idle")
    await trio.sleep(0.5)
    assert (await idle.request("ping"))["t"] == "pong"
    await bystander.check()


# --- request errors: the connection stays open -----------------------------------------------

LONG_CHANNEL = "c" * 129
BAD_CHANNELS = ["", "a b", "room/1", "é", "room\x00", "room\n", "*", "room-?", LONG_CHANNEL]

# (t, fields without t and rid, code)
REQUEST_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    ("send", {"channel": LOBBY, "cid": "c"}, "bad_request"),
    ("send", {"channel": LOBBY, "cid": "c", "text": 5}, "bad_request"),
    ("send", {"channel": LOBBY, "cid": "c", "text": None}, "bad_request"),
    ("send", {"channel": LOBBY, "cid": "c", "text": b"bytes"}, "bad_request"),
    ("send", {"channel": LOBBY, "cid": "c", "text": ["x"]}, "bad_request"),
    ("send", {"channel": [LOBBY], "cid": "c", "text": "x"}, "bad_request"),
    ("send", {"channel": 1, "cid": "c", "text": "x"}, "bad_request"),
    ("send", {"cid": "c", "text": "x"}, "bad_request"),
    ("send", {"channel": LOBBY, "text": "x"}, "bad_request"),
    ("send", {"channel": LOBBY, "cid": 1, "text": "x"}, "bad_request"),
    ("send", {"channel": LOBBY, "cid": "", "text": "x"}, "bad_request"),
    ("send", {"channel": LOBBY, "cid": "c" * 65, "text": "x"}, "bad_request"),
    ("send", {"channel": LOBBY, "cid": "c", "text": "x", "meta": "m"}, "bad_request"),
    ("send", {"channel": LOBBY, "cid": "c", "text": "x", "meta": [1]}, "bad_request"),
    ("send", {"channel": LOBBY, "cid": "c", "text": "x" * 1025}, "limit_exceeded"),
    ("send", {"channel": LOBBY, "cid": "c", "text": "€" * 342}, "limit_exceeded"),
    (
        "send",
        {"channel": LOBBY, "cid": "c", "text": "x", "meta": {"k": "v" * 600}},
        "limit_exceeded",
    ),
    ("send", {"channel": LONG_CHANNEL, "cid": "c", "text": "x"}, "bad_request"),
    ("edit", {"channel": LOBBY, "id": 1, "text": "x"}, "bad_request"),
    ("edit", {"channel": LOBBY, "text": "x"}, "bad_request"),
    ("edit", {"channel": LOBBY, "id": "1-1"}, "bad_request"),
    ("edit", {"channel": LOBBY, "id": "1-1", "text": 7}, "bad_request"),
    ("edit", {"channel": LOBBY, "id": "1-1", "text": "x" * 1025}, "limit_exceeded"),
    ("edit", {"channel": LOBBY, "id": "nope", "text": "x"}, "not_found"),
    ("edit", {"channel": LOBBY, "id": "1-99", "text": "x"}, "not_found"),
    ("delete", {"channel": LOBBY, "id": ["1-1"]}, "bad_request"),
    ("delete", {"channel": LOBBY}, "bad_request"),
    ("delete", {"channel": LOBBY, "id": "x" * 1000}, "not_found"),
    ("history", {}, "bad_request"),
    ("history", {"channel": LOBBY, "before": "1"}, "bad_request"),
    ("history", {"channel": LOBBY, "before": 0}, "bad_request"),
    ("history", {"channel": LOBBY, "limit": -1}, "bad_request"),
    ("history", {"channel": LOBBY, "limit": 2**64 - 1}, "bad_request"),
    ("history", {"channel": LOBBY, "limit": 10.0}, "bad_request"),
    ("sync", {"channel": LOBBY}, "bad_request"),
    ("sync", {"channel": LOBBY, "since": -1}, "bad_request"),
    ("sync", {"channel": LOBBY, "since": "0"}, "bad_request"),
    ("sync", {"channel": LOBBY, "since": False}, "bad_request"),
    ("sync", {"channel": LOBBY, "since": 2**64 - 1}, "bad_request"),
    ("sync", {"channel": LOBBY, "since": 0, "limit": 0}, "bad_request"),
    ("read", {"channel": LOBBY}, "bad_request"),
    ("read", {"channel": LOBBY, "seq": "1"}, "bad_request"),
    ("read", {"channel": LOBBY, "seq": -1}, "bad_request"),
    ("read", {"channel": LOBBY, "seq": 1.5}, "bad_request"),
    ("typing", {"channel": LOBBY}, "bad_request"),
    ("typing", {"channel": LOBBY, "on": "true"}, "bad_request"),
    ("typing", {"channel": LOBBY, "on": 1}, "bad_request"),
    ("join", {}, "bad_request"),
    ("join", {"channel": None}, "bad_request"),
    ("join", {"channel": {"name": LOBBY}}, "bad_request"),
    ("join", {"channel": "dm:"}, "forbidden"),
    ("leave", {}, "bad_request"),
    ("leave", {"channel": 3}, "bad_request"),
    *[
        (t, {"channel": name}, "bad_request")
        for t in ("join", "leave", "history")
        for name in BAD_CHANNELS
    ],
    ("nonsense", {"channel": LOBBY}, "unknown_type"),
    ("hello", {"v": 1, "token": mint("mallory")}, "bad_request"),
]


def request_id(case: tuple[str, dict[str, Any], str]) -> str:
    t, fields, code = case
    text = ",".join(f"{k}={v!r}"[:24] for k, v in fields.items())
    return f"{t}({text})->{code}"


@pytest.mark.parametrize(
    ("t", "fields", "code"), REQUEST_ERRORS, ids=map(request_id, REQUEST_ERRORS)
)
async def test_a_bad_request_leaves_the_connection_open(
    harness: Harness, bystander: Bystander, t: str, fields: dict[str, Any], code: str
) -> None:
    client = await attacker(harness, hello=True)
    reply = await client.request(t, **fields)
    assert reply["t"] == "error" and reply["code"] == code, reply
    assert isinstance(reply["message"], str) and 0 < len(reply["message"]) < 400
    # the same request without rid: the same error, without rid
    await client.send({"t": t, **fields})
    bare = await client.next()
    assert bare["t"] == "error" and bare["code"] == code and "rid" not in bare, bare
    assert (await client.request("ping"))["t"] == "pong"
    ok = await client.request("history", channel=LOBBY)
    assert ok["t"] == "ok"
    await bystander.check()


@pytest.mark.parametrize(
    "rid", ["1", 1.0, True, [1], {"n": 1}, b"\x01", 2**63, 2**64 - 1], ids=repr
)
async def test_a_bad_rid_is_a_request_error_without_rid(
    harness: Harness, bystander: Bystander, rid: Any
) -> None:
    client = await attacker(harness, hello=True)
    await client.send({"t": "send", "rid": rid, "channel": LOBBY, "cid": "rid", "text": "x"})
    error = await client.next()
    assert error["t"] == "error" and error["code"] == "bad_request" and "rid" not in error
    assert (await client.request("ping"))["t"] == "pong"
    await bystander.check()  # and the send was not carried out


async def test_rid_at_the_int64_bounds_is_echoed(harness: Harness) -> None:
    client = await attacker(harness, hello=True)
    for rid in (0, -1, 2**63 - 1, -(2**63)):
        await client.send({"t": "ping", "rid": rid})
        pong = await client.next()
        assert pong == {"t": "pong", "rid": rid, "ts": pong["ts"]}


async def assert_no_second_chance(client: WireClient) -> None:
    """The connection was closed after its error: a valid hello now gets EOF, not a
    welcome (fails fast, where waiting for a close would take the whole timeout)."""
    try:
        await client.send({"t": "hello", "rid": 2, "v": 1, "token": mint("alice")})
    except trio.BrokenResourceError:
        return
    with pytest.raises((EOFError, trio.BrokenResourceError)):
        frame = await client.next()
        pytest.fail(f"the connection stayed open: {frame}")


async def test_a_non_hello_first_frame_with_a_bad_rid_closes(harness: Harness) -> None:
    client = await harness.raw()
    await client.send({"t": "join", "rid": "x", "channel": LOBBY})
    error = await client.next()
    assert error["code"] == "hello_required"
    await assert_no_second_chance(client)


async def test_a_hello_with_a_bad_rid_closes(harness: Harness) -> None:
    client = await harness.raw()
    await client.send({"t": "hello", "rid": "x", "v": 1, "token": mint("alice")})
    error = await client.next()
    assert error["t"] == "error"
    await assert_no_second_chance(client)


EXTRAS = "extras"  # the channel the extra-field requests use, so LOBBY stays the bystander's


@pytest.mark.parametrize(
    ("t", "fields"),
    [
        ("send", {"channel": EXTRAS, "cid": "extra", "text": "x"}),
        ("join", {"channel": EXTRAS}),
        ("history", {"channel": EXTRAS}),
        ("sync", {"channel": EXTRAS, "since": 0}),
        ("read", {"channel": EXTRAS, "seq": 1}),
        ("typing", {"channel": EXTRAS, "on": True}),
        ("leave", {"channel": EXTRAS}),
        ("ping", {}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
async def test_unknown_fields_are_ignored(
    harness: Harness, bystander: Bystander, t: str, fields: dict[str, Any]
) -> None:
    client = await attacker(harness, hello=True)
    assert (await client.request("join", channel=EXTRAS))["t"] == "ok"
    extra = {"zzz": 1, "nested": {"a": [1, 2, {"b": None}]}, "T": "hello", "blob": b"\x00\xff"}
    reply = await client.request(t, **fields, **extra)
    assert reply["t"] == ("pong" if t == "ping" else "ok"), reply
    assert not set(extra) & set(reply)
    if t == "send":
        event = await client.expect("event", seq=reply["seq"])
        assert not set(extra) & set(event) and "meta" not in event
        [stored] = (await client.request("history", channel=EXTRAS))["messages"]
        assert not set(extra) & set(stored) and stored["text"] == "x"
    await bystander.check()


async def test_joining_more_than_max_joined_channels_is_refused(
    harness: Harness, bystander: Bystander
) -> None:
    client = await attacker(harness, hello=True)
    for i in range(LIMITS.max_joined):
        assert (await client.request("join", channel=f"j{i}"))["t"] == "ok"
    reply = await client.request("join", channel="one-too-many")
    assert reply["t"] == "error" and reply["code"] == "limit_exceeded", reply
    assert (await client.request("join", channel="j0"))["t"] == "ok"  # already joined
    assert (await client.request("leave", channel="j0"))["t"] == "ok"
    assert (await client.request("join", channel="one-too-many"))["t"] == "ok"
    await bystander.check()


@pytest.mark.parametrize(
    "settings", [{"limits": replace(LIMITS, frame_burst=8, frame_rate=20.0)}], indirect=True
)
async def test_a_flood_is_rate_limited_per_connection(
    harness: Harness, bystander: Bystander
) -> None:
    client = await attacker(harness, hello=True)
    rids = [next(client.rids) for _ in range(16)]
    for rid in rids:
        await client.send({"t": "ping", "rid": rid})
    replies = [await client.next(lambda f, rid=rid: f.get("rid") == rid) for rid in rids]
    assert [r["t"] for r in replies[:7]] == ["pong"] * 7  # the burst, less the hello
    limited = [r for r in replies if r["t"] == "error"]
    assert limited and all(r["code"] == "rate_limited" for r in limited)
    assert all(isinstance(r["retry_after_ms"], int) and r["retry_after_ms"] > 0 for r in limited)
    await bystander.say()  # its own bucket: not limited by the flood next door
    await trio.sleep(0.5)  # both buckets refill
    assert (await client.request("ping"))["t"] == "pong"  # the flooder is still connected
    await bystander.check()


# --- all attacks at once -----------------------------------------------------------------------


async def test_all_connection_errors_at_once_leave_the_bystander_alone(
    harness: Harness, bystander: Bystander
) -> None:
    async def attack(data: bytes, code: str, hello: bool) -> None:
        client = await attacker(harness, hello=hello)
        await assert_connection_error(client, data, code)

    async def chatter(done: trio.Event) -> None:
        while not done.is_set():
            await bystander.say()

    done = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(chatter, done)
        async with trio.open_nursery() as attacks:
            for _, data, code in FATAL:
                attacks.start_soon(attack, data, code, True)
                attacks.start_soon(attack, data, code, False)
            for _, data, code in FATAL_BEFORE_HELLO:
                attacks.start_soon(attack, data, code, False)
        done.set()
    await bystander.check()
    await only_bystander_left(harness)
    closed = harness.server.metrics.value("tsmsg_connections_closed_total")
    assert closed >= 2 * len(FATAL) + len(FATAL_BEFORE_HELLO)
