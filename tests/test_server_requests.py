"""Every request type over real TCP, and over a WebSocket of each subprotocol (the
``transport`` fixture), against the real server: its success path, its error paths, and
the authorization rules (token channels, DM privacy, scopes).

Each test gets a fresh server on port 0 with its LMDB store in a tmp dir (``harness``
from conftest). Pushes that must *not* arrive are checked with a ping barrier
(:func:`frames_before_pong`): the server queues a connection's frames in order, and a
fan-out is queued in the same commit callback as the writer's ``ok``, so once the writer
has its ``ok``, anything meant for another connection is queued before that
connection's next ``pong``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from conftest import SECRET, TRANSPORTS, Harness, WireClient, fast_limits, mint
from tsmsg.auth import TokenIssuer
from tsmsg.server.settings import Settings

LIMITS = fast_limits()  # the harness's limits
ROOM = "room-1"
ALL_SCOPES = ("chat:read", "chat:send", "chat:moderate")
READ_ONLY = ("chat:read",)


# --- helpers ---------------------------------------------------------------------------------


async def frames_before_pong(client: WireClient) -> list[dict[str, Any]]:
    """Every frame the server queued for ``client`` before it answered a ping sent now
    (the pong itself excluded, and the user's membership notices, section 7.12: a first
    join's comes whenever its record commits). Empties ``client.pending``."""
    await client.request("ping")
    frames, client.pending = client.pending, []
    return [f for f in frames if f.get("t") != "membership"]


async def joined(harness: Harness, user: str, channel: str = ROOM, **kw: Any) -> WireClient:
    client = await harness.connect(user, **kw)
    ok = await client.request("join", channel=channel)
    assert ok["t"] == "ok", ok
    return client


async def send_ok(client: WireClient, text: str, channel: str = ROOM, **fields: Any) -> dict:
    cid = fields.pop("cid", f"cid-{time.monotonic_ns()}")
    ok = await client.request("send", channel=channel, cid=cid, text=text, **fields)
    assert ok["t"] == "ok", ok
    return ok


async def send_many(client: WireClient, n: int, channel: str = ROOM) -> list[dict[str, Any]]:
    """``n`` pipelined sends (texts "m1".."mn"); their ``ok`` replies in order."""
    rids = []
    for i in range(1, n + 1):
        rid = next(client.rids)
        rids.append(rid)
        await client.send(
            {"t": "send", "rid": rid, "channel": channel, "cid": f"c{i}", "text": f"m{i}"}
        )
    oks = [await client.next(lambda f, rid=rid: f.get("rid") == rid) for rid in rids]
    assert all(ok["t"] == "ok" for ok in oks), oks
    return oks


def assert_error(reply: dict[str, Any], code: str) -> None:
    assert reply["t"] == "error", reply
    assert reply["code"] == code, reply
    assert isinstance(reply["message"], str) and reply["message"], reply


async def assert_open(client: WireClient) -> None:
    pong = await client.request("ping")
    assert pong["t"] == "pong", pong


async def assert_refused_and_closed(client: WireClient, frame: dict[str, Any], code: str) -> None:
    await client.send({**frame, "rid": 7})
    reply = await client.next()
    assert_error(reply, code)
    assert reply["rid"] == 7
    assert await client.closed()


def events(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["t"] == "event"]


# --- hello -----------------------------------------------------------------------------------


@pytest.fixture
def settings(engine_settings: Settings) -> Settings:
    """Every test here runs on LMDB and on Redis."""
    return engine_settings


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """And over TCP and a WebSocket of each subprotocol (PROTOCOL.md section 19)."""
    param: str = request.param
    return param


async def test_welcome_carries_the_session_parameters(harness: Harness) -> None:
    client = await harness.raw()
    welcome = await client.request("hello", v=1, token=mint("alice"))
    assert welcome["t"] == "welcome"
    assert welcome["rid"] == 1
    assert welcome["v"] == 1
    assert welcome["user"] == "alice"
    assert isinstance(welcome["session"], str) and welcome["session"]
    assert welcome["heartbeat_ms"] == LIMITS.heartbeat_ms
    assert welcome["max_frame"] == LIMITS.max_frame
    assert welcome["limits"] == LIMITS.announce()
    assert abs(welcome["ts"] - time.time() * 1000) < 60_000
    other = await harness.connect("alice")
    await assert_open(other)


async def test_hello_ignores_unknown_fields(harness: Harness) -> None:
    client = await harness.raw()
    welcome = await client.request("hello", v=1, token=mint("alice"), device="phone", x=[1])
    assert welcome["t"] == "welcome" and welcome["user"] == "alice"
    assert "device" not in welcome and "x" not in welcome


async def test_two_connections_get_distinct_sessions(harness: Harness) -> None:
    a, b = await harness.raw(), await harness.raw()
    wa = await a.request("hello", v=1, token=mint("alice"))
    wb = await b.request("hello", v=1, token=mint("alice"))
    assert wa["session"] != wb["session"]


async def test_hello_without_rid_gets_a_welcome_without_rid(harness: Harness) -> None:
    client = await harness.raw()
    await client.send({"t": "hello", "v": 1, "token": mint("alice")})
    welcome = await client.next()
    assert welcome["t"] == "welcome" and "rid" not in welcome
    await assert_open(client)


@pytest.mark.parametrize("v", [0, 2, -1, "1", 1.0, True, None, [1]], ids=repr)
async def test_hello_with_another_version_is_refused_and_closed(harness: Harness, v: Any) -> None:
    client = await harness.raw()
    frame: dict[str, Any] = {"t": "hello", "token": mint("alice")}
    if v is not None:
        frame["v"] = v
    await assert_refused_and_closed(client, frame, "unsupported_version")


def foreign_token() -> str:
    return TokenIssuer(b"another-secret-another-secret-!!!!").issue(
        "alice", ["*"], now=int(time.time())
    )


@pytest.mark.parametrize(
    "token",
    [None, 42, "", "garbage", "a.b.c", "x" * 9000, "foreign"],
    ids=["missing", "int", "empty", "garbage", "three-parts", "huge", "foreign-secret"],
)
async def test_hello_with_a_bad_token_is_unauthorized_and_closed(
    harness: Harness, token: Any
) -> None:
    client = await harness.raw()
    frame: dict[str, Any] = {"t": "hello", "v": 1}
    if token is not None:
        frame["token"] = foreign_token() if token == "foreign" else token
    await assert_refused_and_closed(client, frame, "unauthorized")


async def test_hello_with_an_expired_token_is_token_expired_and_closed(harness: Harness) -> None:
    expired = TokenIssuer(SECRET).issue("alice", ["*"], ttl_s=10, now=int(time.time()) - 100)
    client = await harness.raw()
    await assert_refused_and_closed(
        client, {"t": "hello", "v": 1, "token": expired}, "token_expired"
    )


async def test_a_second_hello_is_a_request_error(harness: Harness) -> None:
    client = await harness.connect("alice")
    reply = await client.request("hello", v=1, token=mint("mallory"))
    assert_error(reply, "bad_request")
    await assert_open(client)
    # still alice: the second hello changed nothing
    await client.request("join", channel=ROOM)
    ok = await send_ok(client, "hi")
    event = await client.expect("event", seq=ok["seq"])
    assert event["sender"] == "alice"


# --- join / leave ----------------------------------------------------------------------------


async def test_join_reports_head_read_epoch_and_horizon(harness: Harness) -> None:
    alice = await harness.connect("alice")
    ok = await alice.request("join", channel=ROOM)
    assert ok["t"] == "ok"
    assert ok["channel"] == ROOM
    assert ok["head"] == 0 and ok["read"] == 0
    assert isinstance(ok["epoch"], int) and isinstance(ok["horizon"], int)
    await send_many(alice, 3)
    await alice.request("read", channel=ROOM, seq=2)
    bob = await harness.connect("bob")
    ok_bob = await bob.request("join", channel=ROOM)
    assert (ok_bob["head"], ok_bob["read"]) == (3, 0)
    # (a never-written channel reports epoch 0; it gets its real epoch on the first write)
    assert ok_bob["epoch"] == (await bob.request("sync", channel=ROOM, since=0))["epoch"]
    again = await alice.request("join", channel=ROOM)
    assert (again["head"], again["read"]) == (3, 2)


async def test_join_of_a_channel_outside_the_token_is_forbidden(harness: Harness) -> None:
    client = await harness.connect("alice", channels=["room-*"])
    assert_error(await client.request("join", channel="lobby"), "forbidden")
    ok = await client.request("join", channel="room-7")
    assert ok["t"] == "ok"


async def test_after_leave_no_more_events_arrive(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    bob = await joined(harness, "bob")
    await send_ok(bob, "before")
    await alice.expect("event", text="before")
    ok = await alice.request("leave", channel=ROOM)
    assert ok == {"t": "ok", "rid": ok["rid"], "channel": ROOM}
    await send_ok(bob, "after")
    await bob.request("typing", channel=ROOM, on=True)
    await bob.request("read", channel=ROOM, seq=2)
    assert await frames_before_pong(alice) == []
    # and rejoining resumes the stream
    await alice.request("join", channel=ROOM)
    await send_ok(bob, "back")
    assert (await alice.expect("event"))["text"] == "back"


async def test_leave_of_a_channel_never_joined_is_ok(harness: Harness) -> None:
    alice = await harness.connect("alice")
    ok = await alice.request("leave", channel="never-joined")
    assert ok["t"] == "ok"


# --- send ------------------------------------------------------------------------------------


async def test_send_ok_and_event(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    bob = await joined(harness, "bob")
    ok = await alice.request("send", channel=ROOM, cid="c-1", text="hello")
    assert ok["t"] == "ok" and ok["channel"] == ROOM
    assert ok["seq"] == 1 and ok["dup"] is False
    assert isinstance(ok["id"], str) and ok["id"]
    assert isinstance(ok["ts"], int) and abs(ok["ts"] - time.time() * 1000) < 60_000
    expected = {
        "t": "event",
        "channel": ROOM,
        "seq": 1,
        "kind": "message",
        "id": ok["id"],
        "sender": "alice",
        "ts": ok["ts"],
        "text": "hello",
    }
    assert await bob.expect("event") == expected
    assert await alice.expect("event") == expected
    ok2 = await send_ok(alice, "again")
    assert ok2["seq"] == 2 and ok2["id"] != ok["id"]


async def test_send_retry_with_the_same_cid_is_a_dup(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    bob = await joined(harness, "bob")
    first = await alice.request("send", channel=ROOM, cid="same", text="once")
    await bob.expect("event", seq=first["seq"])
    retry = await alice.request("send", channel=ROOM, cid="same", text="twice?")
    assert retry["t"] == "ok" and retry["dup"] is True
    assert (retry["seq"], retry["id"], retry["ts"]) == (first["seq"], first["id"], first["ts"])
    assert events(await frames_before_pong(bob)) == []
    history = await bob.request("history", channel=ROOM)
    assert [m["text"] for m in history["messages"]] == ["once"]


async def test_pipelined_retries_store_one_message(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    bob = await joined(harness, "bob")
    rids = [next(alice.rids) for _ in range(5)]
    for rid in rids:
        await alice.send({"t": "send", "rid": rid, "channel": ROOM, "cid": "burst", "text": "x"})
    oks = [await alice.next(lambda f, rid=rid: f.get("rid") == rid) for rid in rids]
    assert {(ok["seq"], ok["id"]) for ok in oks} == {(1, oks[0]["id"])}
    assert [ok["dup"] for ok in oks].count(False) == 1
    assert len(events(await frames_before_pong(bob))) == 1
    head = (await bob.request("sync", channel=ROOM, since=0))["head"]
    assert head == 1


async def test_same_cid_from_another_sender_is_a_new_message(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    bob = await joined(harness, "bob")
    a = await send_ok(alice, "from alice", cid="shared")
    b = await send_ok(bob, "from bob", cid="shared")
    assert b["dup"] is False and b["seq"] == a["seq"] + 1 and b["id"] != a["id"]
    # the same cid in another channel is a new message too
    c = await send_ok(alice, "elsewhere", channel="room-2", cid="shared")
    assert c["dup"] is False and c["seq"] == 1


async def test_meta_round_trips(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    meta = {"reply_to": "1-1", "mentions": ["bob", "carol"], "n": 3, "nested": {"ok": True}}
    ok = await send_ok(alice, "with meta", meta=meta)
    event = await alice.expect("event", seq=ok["seq"])
    assert event["meta"] == meta
    history = await alice.request("history", channel=ROOM)
    assert history["messages"][-1]["meta"] == meta
    sync = await alice.request("sync", channel=ROOM, since=0)
    assert sync["events"][-1]["meta"] == meta


async def test_text_limit_is_counted_in_utf8_bytes(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    limit = LIMITS.max_text_bytes
    assert (await send_ok(alice, "a" * limit))["seq"] == 1
    assert (await send_ok(alice, "€" * (limit // 3) + "a" * (limit % 3)))["seq"] == 2
    too_long = [
        "a" * (limit + 1),
        "a" * (limit - 2) + "€",  # limit - 1 characters, limit + 1 bytes
        "é" * (limit // 2 + 1),
    ]
    for text in too_long:
        reply = await alice.request("send", channel=ROOM, cid="long", text=text)
        assert_error(reply, "limit_exceeded")
    assert (await alice.request("sync", channel=ROOM, since=0))["head"] == 2


async def test_meta_over_its_limit_is_refused(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    # {"k": s} packs to 6 + len(s) bytes: fixmap 1, fixstr "k" 2, str16 header 3
    fits = {"k": "x" * (LIMITS.max_meta_bytes - 6)}
    assert (await send_ok(alice, "ok", meta=fits))["seq"] == 1
    over = {"k": "x" * (LIMITS.max_meta_bytes - 5)}
    assert_error(
        await alice.request("send", channel=ROOM, cid="m", text="t", meta=over), "limit_exceeded"
    )
    not_a_map = await alice.request("send", channel=ROOM, cid="m", text="t", meta=["a"])
    assert_error(not_a_map, "bad_request")


@pytest.mark.parametrize("cid", ["", "x" * (LIMITS.max_cid_chars + 1), 7, None, ["a"]])
async def test_send_with_a_bad_cid_is_bad_request(harness: Harness, cid: Any) -> None:
    alice = await joined(harness, "alice")
    frame: dict[str, Any] = {"channel": ROOM, "text": "t"}
    if cid is not None:
        frame["cid"] = cid
    assert_error(await alice.request("send", **frame), "bad_request")
    ok = await send_ok(alice, "fine", cid="y" * LIMITS.max_cid_chars)
    assert ok["seq"] == 1


async def test_send_without_rid_does_its_work_silently(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    await alice.send({"t": "send", "channel": ROOM, "cid": "no-rid", "text": "quiet"})
    event = await alice.expect("event")
    assert event["text"] == "quiet"
    assert [f for f in await frames_before_pong(alice) if f["t"] == "ok"] == []


async def test_errors_of_requests_without_rid_carry_no_rid(harness: Harness) -> None:
    alice = await harness.connect("alice", channels=["room-*"])
    await alice.send({"t": "send", "channel": "lobby", "cid": "c", "text": "t"})
    error = await alice.next()
    assert error["t"] == "error" and error["code"] == "forbidden" and "rid" not in error
    await alice.send({"t": "send", "channel": ROOM, "text": "no cid"})
    error = await alice.next()
    assert error["t"] == "error" and error["code"] == "bad_request" and "rid" not in error
    await alice.send({"t": "nonsense"})
    error = await alice.next()
    assert error["t"] == "error" and error["code"] == "unknown_type" and "rid" not in error


# --- edit / delete ---------------------------------------------------------------------------


async def test_edit_and_delete_own_message(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    bob = await joined(harness, "bob")
    msg = await send_ok(alice, "tpyo", meta={"k": "v"})
    await bob.expect("event", seq=msg["seq"])
    edit = await alice.request("edit", channel=ROOM, id=msg["id"], text="typo")
    assert edit["t"] == "ok" and edit["seq"] == msg["seq"] + 1 and edit["id"] == msg["id"]
    pushed = await bob.expect("event", seq=edit["seq"])
    assert pushed == {
        "t": "event",
        "channel": ROOM,
        "seq": edit["seq"],
        "kind": "edit",
        "id": msg["id"],
        "sender": "alice",
        "ts": edit["ts"],
        "text": "typo",
    }
    [shown] = (await bob.request("history", channel=ROOM))["messages"]
    assert shown["text"] == "typo" and shown["edited"] == edit["ts"]
    assert shown["meta"] == {"k": "v"} and shown["seq"] == msg["seq"]

    delete = await alice.request("delete", channel=ROOM, id=msg["id"])
    assert delete["t"] == "ok" and delete["seq"] == edit["seq"] + 1
    pushed = await bob.expect("event", seq=delete["seq"])
    assert pushed["kind"] == "delete" and pushed["id"] == msg["id"] and pushed["sender"] == "alice"
    assert "text" not in pushed
    [tomb] = (await bob.request("history", channel=ROOM))["messages"]
    assert tomb["deleted"] is True and tomb["id"] == msg["id"] and tomb["seq"] == msg["seq"]
    assert "text" not in tomb and "meta" not in tomb and "edited" not in tomb

    sync = await bob.request("sync", channel=ROOM, since=0)
    assert [(e["seq"], e["kind"]) for e in sync["events"]] == [
        (1, "message"),
        (2, "edit"),
        (3, "delete"),
    ]
    assert all("text" not in e for e in sync["events"])  # a deleted message's text is gone


async def test_another_users_message_needs_moderation(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    bob = await joined(harness, "bob")
    msg = await send_ok(alice, "mine")
    assert_error(await bob.request("edit", channel=ROOM, id=msg["id"], text="yours"), "forbidden")
    assert_error(await bob.request("delete", channel=ROOM, id=msg["id"]), "forbidden")
    [shown] = (await alice.request("history", channel=ROOM))["messages"]
    assert shown["text"] == "mine" and "edited" not in shown
    assert (await alice.request("sync", channel=ROOM, since=0))["head"] == 1

    mod = await joined(harness, "mod", scopes=ALL_SCOPES)
    edit = await mod.request("edit", channel=ROOM, id=msg["id"], text="[redacted]")
    assert edit["t"] == "ok"
    event = await alice.expect("event", seq=edit["seq"])
    assert event["sender"] == "mod" and event["text"] == "[redacted]"
    delete = await mod.request("delete", channel=ROOM, id=msg["id"])
    assert delete["t"] == "ok"
    [tomb] = (await alice.request("history", channel=ROOM))["messages"]
    assert tomb["deleted"] is True and tomb["sender"] == "alice"


async def test_moderate_scope_alone_does_not_allow_changes(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    msg = await send_ok(alice, "mine")
    mod = await harness.connect("mod", scopes=("chat:read", "chat:moderate"))
    assert_error(await mod.request("delete", channel=ROOM, id=msg["id"]), "forbidden")


async def test_edit_or_delete_of_an_unknown_or_deleted_message_is_not_found(
    harness: Harness,
) -> None:
    alice = await joined(harness, "alice")
    msg = await send_ok(alice, "doomed")
    other = await send_ok(alice, "elsewhere", channel="room-2")
    unknown = ["nope", "1-999", "999-1", "", "x" * 65, other["id"]]
    for target in unknown:
        assert_error(await alice.request("edit", channel=ROOM, id=target, text="t"), "not_found")
        assert_error(await alice.request("delete", channel=ROOM, id=target), "not_found")
    assert (await alice.request("delete", channel=ROOM, id=msg["id"]))["t"] == "ok"
    assert_error(await alice.request("edit", channel=ROOM, id=msg["id"], text="t"), "not_found")
    assert_error(await alice.request("delete", channel=ROOM, id=msg["id"]), "not_found")
    mod = await harness.connect("mod", scopes=ALL_SCOPES)
    assert_error(await mod.request("delete", channel=ROOM, id=msg["id"]), "not_found")
    # an edit or delete entry's seq is not a message
    assert (await alice.request("sync", channel=ROOM, since=0))["head"] == 2
    room2 = await alice.request("history", channel="room-2")
    assert room2["messages"][0]["text"] == "elsewhere"


async def test_edit_text_limit_and_fields(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    msg = await send_ok(alice, "short")
    reply = await alice.request(
        "edit", channel=ROOM, id=msg["id"], text="a" * (LIMITS.max_text_bytes + 1)
    )
    assert_error(reply, "limit_exceeded")
    assert_error(await alice.request("edit", channel=ROOM, id=msg["id"]), "bad_request")
    assert_error(await alice.request("edit", channel=ROOM, id=5, text="t"), "bad_request")
    assert_error(await alice.request("delete", channel=ROOM), "bad_request")


# --- history ---------------------------------------------------------------------------------


async def test_history_pages_backwards_with_before_and_more(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    oks = await send_many(alice, 120)
    assert [ok["seq"] for ok in oks] == list(range(1, 121))

    page = await alice.request("history", channel=ROOM)
    assert page["channel"] == ROOM
    assert [m["seq"] for m in page["messages"]] == list(range(71, 121))  # default limit 50
    assert page["more"] is True
    first = page["messages"][0]
    assert first == {
        "seq": 71,
        "kind": "message",
        "id": oks[70]["id"],
        "sender": "alice",
        "ts": oks[70]["ts"],
        "text": "m71",
    }
    seen = page["messages"]
    while page["more"]:
        page = await alice.request("history", channel=ROOM, before=seen[0]["seq"], limit=30)
        assert len(page["messages"]) <= 30
        seen = page["messages"] + seen
    assert [m["seq"] for m in seen] == list(range(1, 121))
    assert [m["text"] for m in seen] == [f"m{i}" for i in range(1, 121)]

    exact = await alice.request("history", channel=ROOM, before=21, limit=20)
    assert [m["seq"] for m in exact["messages"]] == list(range(1, 21))
    assert exact["more"] is False
    full = await alice.request("history", channel=ROOM, limit=LIMITS.history_max)
    assert len(full["messages"]) == 120 and full["more"] is False
    assert (await alice.request("history", channel=ROOM, before=1))["messages"] == []
    beyond = await alice.request("history", channel=ROOM, before=10**6, limit=2)
    assert [m["seq"] for m in beyond["messages"]] == [119, 120]


async def test_history_of_an_empty_channel(harness: Harness) -> None:
    alice = await harness.connect("alice")
    page = await alice.request("history", channel="empty")
    assert page["t"] == "ok" and page["messages"] == [] and page["more"] is False


@pytest.mark.parametrize(
    "fields",
    [
        {"limit": 0},
        {"limit": LIMITS.history_max + 1},
        {"limit": -1},
        {"limit": "10"},
        {"limit": 1.5},
        {"limit": True},
        {"before": 0},
        {"before": -5},
        {"before": "9"},
    ],
    ids=repr,
)
async def test_history_with_bad_paging_is_bad_request(harness: Harness, fields: dict) -> None:
    alice = await harness.connect("alice")
    assert_error(await alice.request("history", channel=ROOM, **fields), "bad_request")
    await assert_open(alice)


# --- sync ------------------------------------------------------------------------------------


async def test_sync_replays_events_exactly_as_pushed(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    await send_ok(alice, "one")
    await send_ok(alice, "two", meta={"a": 1})
    await send_ok(alice, "three")
    pushed = [await alice.expect("event", seq=seq) for seq in (1, 2, 3)]
    sync = await alice.request("sync", channel=ROOM, since=0)
    assert sync["t"] == "ok" and sync["channel"] == ROOM
    assert sync["events"] == pushed
    assert sync["more"] is False and sync["head"] == 3
    assert isinstance(sync["epoch"], int)
    tail = await alice.request("sync", channel=ROOM, since=2)
    assert tail["events"] == pushed[2:]
    at_head = await alice.request("sync", channel=ROOM, since=3)
    assert at_head["events"] == [] and at_head["more"] is False and at_head["head"] == 3


async def test_sync_pages_with_limit_and_more(harness: Harness) -> None:
    alice = await harness.connect("alice")
    await send_many(alice, 10)
    since, seqs, pages = 0, [], 0
    while True:
        page = await alice.request("sync", channel=ROOM, since=since, limit=4)
        pages += 1
        assert len(page["events"]) <= 4 and page["head"] == 10
        seqs += [e["seq"] for e in page["events"]]
        since = seqs[-1]
        if not page["more"]:
            break
    assert seqs == list(range(1, 11)) and pages == 3


async def test_sync_of_an_empty_channel(harness: Harness) -> None:
    alice = await harness.connect("alice")
    page = await alice.request("sync", channel="empty", since=0)
    assert page["t"] == "ok"
    assert (page["events"], page["more"], page["head"]) == ([], False, 0)


async def test_sync_beyond_the_head_answers_resync(harness: Harness) -> None:
    alice = await harness.connect("alice")
    await send_many(alice, 3)
    reply = await alice.request("sync", channel=ROOM, since=4)
    assert reply["t"] == "resync"
    assert reply["channel"] == ROOM and reply["head"] == 3 and isinstance(reply["epoch"], int)
    empty = await alice.request("sync", channel="empty", since=1)
    assert empty["t"] == "resync" and empty["head"] == 0
    await alice.send({"t": "sync", "channel": ROOM, "since": 99})
    pushed = await alice.next()
    assert pushed["t"] == "resync" and "rid" not in pushed


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"since": -1},
        {"since": "0"},
        {"since": 2**63},
        {"since": None},
        {"since": 0, "limit": 0},
        {"since": 0, "limit": LIMITS.sync_max + 1},
    ],
    ids=repr,
)
async def test_sync_with_bad_fields_is_bad_request(harness: Harness, fields: dict) -> None:
    alice = await harness.connect("alice")
    assert_error(await alice.request("sync", channel=ROOM, **fields), "bad_request")
    await assert_open(alice)


async def test_sync_accepts_the_max_limit(harness: Harness) -> None:
    alice = await harness.connect("alice")
    await send_many(alice, 2)
    page = await alice.request("sync", channel=ROOM, since=0, limit=LIMITS.sync_max)
    assert len(page["events"]) == 2 and page["more"] is False


# --- read ------------------------------------------------------------------------------------


async def test_read_cursor_moves_forward_only_and_is_pushed(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    bob = await joined(harness, "bob")
    await send_many(alice, 5)
    await frames_before_pong(bob)

    ok = await alice.request("read", channel=ROOM, seq=3)
    assert ok == {"t": "ok", "rid": ok["rid"], "channel": ROOM, "seq": 3}
    push = await bob.expect("read")
    assert push == {"t": "read", "channel": ROOM, "user": "alice", "seq": 3}

    older = await alice.request("read", channel=ROOM, seq=2)
    assert older["seq"] == 3
    same = await alice.request("read", channel=ROOM, seq=3)
    assert same["seq"] == 3
    assert [f for f in await frames_before_pong(bob) if f["t"] == "read"] == []

    clamped = await alice.request("read", channel=ROOM, seq=10**12)
    assert clamped["seq"] == 5
    assert (await bob.expect("read"))["seq"] == 5
    rejoin = await alice.request("join", channel=ROOM)
    assert rejoin["read"] == 5
    other = await harness.connect("alice")
    assert (await other.request("join", channel=ROOM))["read"] == 5
    assert (await bob.request("join", channel=ROOM))["read"] == 0


async def test_read_on_an_empty_channel_stays_at_zero(harness: Harness) -> None:
    alice = await harness.connect("alice")
    ok = await alice.request("read", channel="empty", seq=4)
    assert ok["t"] == "ok" and ok["seq"] == 0


@pytest.mark.parametrize("seq", [None, -1, "3", 1.0, True, 2**63], ids=repr)
async def test_read_with_a_bad_seq_is_bad_request(harness: Harness, seq: Any) -> None:
    alice = await harness.connect("alice")
    frame: dict[str, Any] = {"channel": ROOM}
    if seq is not None:
        frame["seq"] = seq
    assert_error(await alice.request("read", **frame), "bad_request")
    await assert_open(alice)


# --- typing ----------------------------------------------------------------------------------


async def test_typing_reaches_other_members_only_and_is_not_stored(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    alice2 = await joined(harness, "alice")
    bob = await joined(harness, "bob")
    outsider = await harness.connect("carol")
    await send_ok(alice, "m")
    for c in (alice, alice2, bob):
        await frames_before_pong(c)

    ok = await alice.request("typing", channel=ROOM, on=True)
    assert ok == {"t": "ok", "rid": ok["rid"]}
    assert await bob.expect("typing") == {
        "t": "typing",
        "channel": ROOM,
        "user": "alice",
        "on": True,
    }
    await alice.request("typing", channel=ROOM, on=False)
    assert (await bob.expect("typing"))["on"] is False
    assert await frames_before_pong(alice) == []
    assert await frames_before_pong(alice2) == []
    assert await frames_before_pong(outsider) == []

    sync = await bob.request("sync", channel=ROOM, since=0)
    assert sync["head"] == 1 and len(sync["events"]) == 1
    assert len((await bob.request("history", channel=ROOM))["messages"]) == 1


@pytest.mark.parametrize("on", [None, 1, 0, "yes", []], ids=repr)
async def test_typing_with_a_non_bool_on_is_bad_request(harness: Harness, on: Any) -> None:
    alice = await harness.connect("alice")
    bob = await joined(harness, "bob")
    frame: dict[str, Any] = {"channel": ROOM}
    if on is not None:
        frame["on"] = on
    assert_error(await alice.request("typing", **frame), "bad_request")
    assert await frames_before_pong(bob) == []


# --- ping, unknown types, devices --------------------------------------------------------------


async def test_ping_answers_pong_with_rid(harness: Harness) -> None:
    alice = await harness.connect("alice")
    pong = await alice.request("ping")
    assert pong["t"] == "pong" and isinstance(pong["ts"], int)
    await alice.send({"t": "ping"})
    bare = await alice.next()
    assert bare["t"] == "pong" and "rid" not in bare


@pytest.mark.parametrize("t", ["nonsense", "", "OK", "welcome", "event", "x" * 500])
async def test_unknown_type_is_a_request_error(harness: Harness, t: str) -> None:
    alice = await joined(harness, "alice")
    reply = await alice.request(t, channel=ROOM)
    assert_error(reply, "unknown_type")
    assert len(reply["message"]) < 200  # a long `t` is not echoed whole
    ok = await send_ok(alice, "still here")
    assert (await alice.expect("event"))["seq"] == ok["seq"]


async def test_two_devices_of_one_user_both_receive_everything(harness: Harness) -> None:
    phone = await joined(harness, "alice")
    laptop = await joined(harness, "alice")
    bob = await joined(harness, "bob")
    a = await send_ok(phone, "from phone")
    b = await send_ok(laptop, "from laptop")
    c = await send_ok(bob, "from bob")
    for device in (phone, laptop):
        got = [await device.expect("event", seq=ok["seq"]) for ok in (a, b, c)]
        assert [e["text"] for e in got] == ["from phone", "from laptop", "from bob"]
    await phone.request("read", channel=ROOM, seq=3)
    assert (await laptop.expect("read"))["user"] == "alice"


# --- authorization -------------------------------------------------------------------------------


def channel_requests(channel: str, msg_id: str) -> list[dict[str, Any]]:
    """One of every request that names a channel."""
    return [
        {"t": "join", "channel": channel},
        {"t": "send", "channel": channel, "cid": "intruder", "text": "hi"},
        {"t": "edit", "channel": channel, "id": msg_id, "text": "defaced"},
        {"t": "delete", "channel": channel, "id": msg_id},
        {"t": "history", "channel": channel},
        {"t": "sync", "channel": channel, "since": 0},
        {"t": "read", "channel": channel, "seq": 1},
        {"t": "typing", "channel": channel, "on": True},
    ]


async def assert_all_forbidden(
    harness: Harness, user: str, owner: WireClient, channel: str, **token: Any
) -> None:
    """Every channel request in ``channel`` by ``user`` with a token of ``token`` is
    forbidden and changes nothing that ``owner`` (joined, one message in it) can see."""
    intruder = await harness.connect(user, **token)
    before = await owner.request("history", channel=channel)
    [msg] = before["messages"]
    await frames_before_pong(owner)
    for frame in channel_requests(channel, msg["id"]):
        t = frame.pop("t")
        reply = await intruder.request(t, **frame)
        assert_error(reply, "forbidden")
    await assert_open(intruder)
    assert await frames_before_pong(owner) == []  # no typing, read or event push
    after = await owner.request("history", channel=channel)
    assert after["messages"] == before["messages"]
    assert (await owner.request("sync", channel=channel, since=0))["head"] == 1
    if not channel.startswith("dm:"):
        # the intruder's read cursor did not move either
        spy = await harness.connect(user, channels=["*"])
        assert (await spy.request("join", channel=channel))["read"] == 0


async def test_every_channel_request_needs_the_tokens_channels(harness: Harness) -> None:
    owner = await joined(harness, "owner", channel="secret")
    await send_ok(owner, "classified", channel="secret")
    patterns = ["room-*", "secre", "secret?", "Secret"]
    await assert_all_forbidden(harness, "eve", owner, "secret", channels=patterns)
    # while the same token works in its own channels, without a join
    eve = await harness.connect("eve", channels=patterns)
    assert (await eve.request("history", channel="room-9"))["t"] == "ok"


async def test_a_token_without_channels_can_use_nothing_but_its_dms(harness: Harness) -> None:
    owner = await joined(harness, "owner", channel="secret")
    await send_ok(owner, "classified", channel="secret")
    await assert_all_forbidden(harness, "eve", owner, "secret", channels=[])
    eve = await harness.connect("eve", channels=[])
    assert (await eve.request("join", channel="dm:eve:owner"))["t"] == "ok"


async def test_reads_need_authorization_not_a_join(harness: Harness) -> None:
    alice = await harness.connect("alice", channels=["room-*"])
    await send_ok(alice, "unjoined", channel="room-5")
    history = await alice.request("history", channel="room-5")
    assert [m["text"] for m in history["messages"]] == ["unjoined"]
    sync = await alice.request("sync", channel="room-5", since=0)
    assert [e["text"] for e in sync["events"]] == ["unjoined"]
    assert (await alice.request("read", channel="room-5", seq=1))["seq"] == 1
    # not joined: no pushes
    assert events(await frames_before_pong(alice)) == []


async def test_dm_channels_are_private_to_their_two_users(harness: Harness) -> None:
    dm = "dm:alice:bob"
    alice = await harness.connect("alice", channels=[])
    bob = await harness.connect("bob", channels=[])
    assert (await alice.request("join", channel=dm))["t"] == "ok"
    assert (await bob.request("join", channel=dm))["t"] == "ok"
    ok = await send_ok(alice, "psst", channel=dm)
    assert (await bob.expect("event", seq=ok["seq"]))["text"] == "psst"
    patterns = ["*", "dm:*", "dm:alice:bob"]
    await assert_all_forbidden(harness, "carol", alice, dm, channels=patterns, scopes=ALL_SCOPES)


@pytest.mark.parametrize("user", ["alice", "bob", "carol"])
async def test_an_unsorted_dm_name_is_open_to_nobody(harness: Harness, user: str) -> None:
    client = await harness.connect(user, channels=["*"], scopes=ALL_SCOPES)
    for name in ("dm:bob:alice", "dm:alice:alice", "dm:alice:bob:carol", "dm:alice"):
        for frame in channel_requests(name, "1-1"):
            t = frame.pop("t")
            assert_error(await client.request(t, **frame), "forbidden")
    await assert_open(client)


async def test_a_read_only_token_reads_but_never_writes(harness: Harness) -> None:
    alice = await joined(harness, "alice")
    msg = await send_ok(alice, "hello")
    reader = await harness.connect("reader", scopes=READ_ONLY)
    assert (await reader.request("join", channel=ROOM))["head"] == 1
    assert len((await reader.request("history", channel=ROOM))["messages"]) == 1
    assert len((await reader.request("sync", channel=ROOM, since=0))["events"]) == 1
    assert (await reader.request("read", channel=ROOM, seq=1))["seq"] == 1
    assert (await reader.request("typing", channel=ROOM, on=True))["t"] == "ok"
    assert_error(await reader.request("send", channel=ROOM, cid="c", text="t"), "forbidden")
    assert_error(await reader.request("edit", channel=ROOM, id=msg["id"], text="t"), "forbidden")
    assert_error(await reader.request("delete", channel=ROOM, id=msg["id"]), "forbidden")
    await frames_before_pong(alice)
    assert (await alice.request("sync", channel=ROOM, since=0))["head"] == 1
    ok = await send_ok(alice, "still live")
    assert (await reader.expect("event"))["seq"] == ok["seq"]


async def test_a_token_without_read_scope_cannot_read(harness: Harness) -> None:
    writer = await harness.connect("writer", scopes=("chat:send",))
    ok = await send_ok(writer, "blind")
    assert ok["seq"] == 1
    for t, fields in [
        ("join", {}),
        ("history", {}),
        ("sync", {"since": 0}),
        ("read", {"seq": 1}),
        ("typing", {"on": True}),
    ]:
        assert_error(await writer.request(t, channel=ROOM, **fields), "forbidden")
