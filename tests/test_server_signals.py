"""Live signals and protection over real TCP and a WebSocket of each subprotocol (issues 5
and 16: the ``transport`` fixture): presence across devices and
restarts, heartbeats and idle limits, typing and its expiry, read receipts and unread
counts, per-user / per-channel / per-IP rate limits, token expiry and refresh, the frame
deadline, and a slow consumer at scale (20 MB through a member that never reads).

Every time-based behaviour runs twice: with short real-time settings, and deterministically
under trio's ``MockClock(autojump_threshold=0)`` (the ``autojump_clock`` fixture) with the
default limits. The server's ``now_ms`` follows ``trio.current_time()``, so under the mock
clock its timers (ticker, idle, token and typing expiry, rate buckets) run in virtual time;
the waits there use virtual-time deadlines (``WireClient.next`` allows only 5 virtual s).

Tests override settings with ``@pytest.mark.parametrize("settings", [{...}], indirect=True)``
(rate limits are lifted unless a test sets them, see ``conftest.fast_limits``).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio

from conftest import (
    SECRET,
    TRANSPORTS,
    WIRE_TIMEOUT,
    Harness,
    WireClient,
    fast_limits,
    make_settings,
    mint,
    running_server,
)
from tsmsg.auth import TokenIssuer, TokenVerifier
from tsmsg.server.settings import Settings

ROOM = "room"
TICK_MS = 20  # the ticker's period in the real-time tests (the default is 250)

Frame = dict[str, Any]
Match = Callable[[Frame], bool]


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Each test over TCP and a WebSocket of each subprotocol (PROTOCOL.md section 19)."""
    param: str = request.param
    return param


@pytest.fixture
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    overrides = {"tick_ms": TICK_MS, **getattr(request, "param", {})}
    return make_settings(tmp_path / "data", **overrides)


def real(**overrides: Any) -> pytest.MarkDecorator:
    """Settings for a real-time test (a fast ticker), as an indirect parameter."""
    return pytest.mark.parametrize("settings", [overrides], indirect=True)


def mocked(**overrides: Any) -> pytest.MarkDecorator:
    """Settings for a mock-clock test: the default ticker; durability "async" so that fewer
    waits for the store's fsync let the autojump clock run ahead."""
    return pytest.mark.parametrize(
        "settings", [{"tick_ms": 250, "durability": "async", **overrides}], indirect=True
    )


# ------------------------------------------------------------------ wire helpers


def of(t: str, **fields: Any) -> Match:
    return lambda f: f.get("t") == t and all(f.get(k) == v for k, v in fields.items())


def of_rid(rid: int) -> Match:
    return lambda f: f.get("rid") == rid


async def wait_frame(client: WireClient, match: Match, timeout: float = WIRE_TIMEOUT) -> Frame:
    """Like ``client.next`` with a timeout of our own (virtual seconds under a mock clock)."""
    with trio.fail_after(timeout):
        while True:
            for i, frame in enumerate(client.pending):
                if match(frame):
                    return client.pending.pop(i)
            await client._fill()


async def until_closed(client: WireClient, timeout: float = WIRE_TIMEOUT) -> list[Frame]:
    """Read until the server closes the connection; the frames that came (pending first).
    Fails if it stays open for ``timeout``."""
    with trio.fail_after(timeout):
        try:
            while True:
                await client._fill()
        except (EOFError, trio.BrokenResourceError):
            pass
    frames, client.pending = client.pending, []
    return frames


async def barrier(*clients: WireClient) -> None:
    """A ping round trip on each: whatever the server queued for a client before it
    handled the ping is then in that client's ``pending``."""
    for client in clients:
        pong = await client.request("ping")
        assert pong["t"] == "pong", pong


def taken(client: WireClient, match: Match) -> list[Frame]:
    """Remove and return the pending frames that match."""
    hits = [f for f in client.pending if match(f)]
    client.pending = [f for f in client.pending if not match(f)]
    return hits


async def join(client: WireClient, channel: str = ROOM) -> Frame:
    reply = await client.request("join", channel=channel)
    assert reply["t"] == "ok", reply
    return reply


async def send(client: WireClient, text: str, channel: str = ROOM, cid: str = "") -> Frame:
    reply = await client.request("send", channel=channel, cid=cid or f"c-{text}", text=text)
    assert reply["t"] == "ok", reply
    return reply


async def sync_all(client: WireClient, since: int = 0, channel: str = ROOM) -> list[Frame]:
    out: list[Frame] = []
    while True:
        page = await client.request("sync", channel=channel, since=since, limit=5000)
        assert page["t"] == "ok", page
        out += page["events"]
        if page["events"]:
            since = page["events"][-1]["seq"]
        if not page["more"]:
            return out


async def poll(check: Callable[[], bool], timeout: float = WIRE_TIMEOUT) -> None:
    """Wait until ``check()`` (in-process server state) holds."""
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.005)


async def become_member(h: Harness, user: str, channel: str = ROOM) -> None:
    """``user`` joins ``channel`` in a connection of its own that then closes: membership
    is stored at join, so presence reaches the channel's members from then on."""
    client = await h.connect(user)
    await join(client, channel)
    await barrier(client)
    await client.aclose()
    await poll(lambda: channel in h.server.store.channels_of(user) and user not in h.server.devices)


def presence_of(user: str) -> Match:
    return lambda f: f.get("t") == "presence" and f.get("user") == user


def token_and_exp(user: str, channels: tuple[str, ...] = ("*",), ttl_s: int = 3600) -> Any:
    token = mint(user, channels, ttl_s=ttl_s)
    return token, TokenVerifier(SECRET).verify(token, int(time.time())).exp


def expiring_token(user: str, channels: tuple[str, ...] = ("*",)) -> tuple[str, int]:
    """A token that expires 0.5 to 1.5 s from now (``exp`` is whole seconds); its exp."""
    now = time.time()
    ttl = 1 if now % 1 < 0.5 else 2
    token = TokenIssuer(SECRET).issue(user, channels, ttl_s=ttl, now=int(now))
    return token, int(now) + ttl


async def hello(h: Harness, token: str) -> WireClient:
    client = await h.raw()
    welcome = await client.request("hello", v=1, token=token)
    assert welcome["t"] == "welcome", welcome
    return client


async def pinger(client: WireClient, every_s: float) -> None:
    """Keep a connection alive (a ping without rid; the pongs pile up in ``pending``)."""
    while True:
        await client.send({"t": "ping"})
        await trio.sleep(every_s)


# ====================================================================== presence


async def test_presence_two_devices_pushes_once_per_change_and_last_seen(
    engine_settings: Settings,
) -> None:
    async with running_server(engine_settings) as h:
        await become_member(h, "alice")
        carol = await h.connect("carol")
        await join(carol)
        dave = await h.connect("dave")  # a stranger: shares no channel with carol or alice
        await join(dave, "elsewhere")
        # Membership is written in the background after the join's ok (PROTOCOL.md 6.2).
        store = h.server.store
        await poll(lambda: ROOM in store.channels_of("carol"))
        await poll(lambda: "elsewhere" in store.channels_of("dave"))
        await barrier(carol)
        assert taken(carol, presence_of("dave")) == []
        taken(carol, of("presence"))

        # The first device: online, once.
        phone = await h.connect("alice")
        pushed = await carol.next(presence_of("alice"))
        assert (pushed["status"], type(pushed["ts"])) == ("online", int), pushed
        # The second device: nothing (the push for it would precede its welcome).
        laptop = await h.connect("alice")
        await barrier(carol)
        assert taken(carol, presence_of("alice")) == []
        await join(laptop)  # the user's own devices get its pushes when joined there

        # A status from one device: pushed once; the same status again: nothing.
        reply = await phone.request("presence", status="away")
        assert reply == {"t": "ok", "rid": reply["rid"], "status": "away"}
        assert (await carol.next(presence_of("alice")))["status"] == "away"
        assert (await laptop.next(presence_of("alice")))["status"] == "away"
        assert (await laptop.request("presence", status="away"))["t"] == "ok"
        await barrier(carol, laptop, phone)
        assert taken(carol, presence_of("alice")) == []
        assert taken(laptop, presence_of("alice")) == []
        assert taken(phone, presence_of("alice")) == []  # not joined to the room

        # Appearing offline while connected: offline, without last_seen; then back.
        await laptop.request("presence", status="offline")
        assert (await carol.next(presence_of("alice")))["status"] == "offline"
        (entry,) = (await carol.request("presence", users=["alice"]))["users"]
        assert entry == {"user": "alice", "status": "offline", "online": False}, entry
        await phone.request("presence", status="away")
        assert (await carol.next(presence_of("alice")))["status"] == "away"

        reply = await carol.request("presence", users=["alice", "dave", "carol", "ghost"])
        assert reply["users"] == [
            {"user": "alice", "status": "away", "online": True},
            {"user": "carol", "status": "online", "online": True},
        ], reply
        # A stranger learns nothing about alice either.
        assert (await dave.request("presence", users=["alice", "carol"]))["users"] == []

        # Closing one device: nothing; the last: offline, once.
        await phone.aclose()
        await poll(lambda: len(h.server.devices.get("alice", ())) == 1)
        await barrier(carol)
        assert taken(carol, presence_of("alice")) == []
        prior = h.server.store.last_seen("alice")  # from become_member's connection
        before_ms = time.time() * 1000
        await laptop.aclose()
        assert (await carol.next(presence_of("alice")))["status"] == "offline"
        await barrier(carol)
        assert taken(carol, presence_of("alice")) == []

        # last_seen is written after the push (a store write): wait for the new one.
        with trio.fail_after(WIRE_TIMEOUT):
            while True:
                (entry,) = (await carol.request("presence", users=["alice"]))["users"]
                if entry.get("last_seen") != prior:
                    break
                await trio.sleep(0.005)
        after_ms = time.time() * 1000
        assert (entry["status"], entry["online"]) == ("offline", False), entry
        last_seen = entry["last_seen"]
        assert before_ms - 5 <= last_seen <= after_ms + 5, (before_ms, entry, after_ms)
        assert h.server.store.last_seen("alice") == last_seen

    # After a restart on the same data dir: still offline with the same last_seen, for a
    # member who has not even joined in this connection (membership is stored).
    async with running_server(engine_settings) as h:
        carol = await h.connect("carol")
        reply = await carol.request("presence", users=["alice", "dave"])
        assert reply["users"] == [
            {"user": "alice", "status": "offline", "online": False, "last_seen": last_seen}
        ], reply


async def test_presence_limits(harness: Harness) -> None:
    alice = await harness.connect("alice")
    too_long = "x" * (harness.server.settings.limits.max_status_chars + 1)
    assert (await alice.request("presence", status=too_long))["code"] == "limit_exceeded"
    many = [f"u{i}" for i in range(harness.server.settings.limits.max_presence_users + 1)]
    assert (await alice.request("presence", users=many))["code"] == "limit_exceeded"
    assert (await alice.request("presence", users="alice"))["code"] == "bad_request"
    assert (await alice.request("presence", status="busy"))["t"] == "ok"  # still open


@real(limits=fast_limits(presence_rate=1.0, presence_burst=5))
async def test_presence_flood_is_rate_limited_per_user(harness: Harness) -> None:
    """Status changes reach everyone who shares a channel, so a flood of them is limited
    per user like typing (PROTOCOL.md 16.2): past the burst each is refused with
    ``rate_limited`` and pushes nothing; the user's other device shares the bucket."""
    await become_member(harness, "alice")
    carol = await harness.connect("carol")
    await join(carol)
    phone, laptop = await harness.connect("alice"), await harness.connect("alice")
    # alice's "online" follows a read of her memberships in a thread: waited for, not
    # raced by a barrier (under load it came after one, counted as a flood push).
    await carol.next(lambda f: f.get("t") == "presence" and f.get("user") == "alice")
    await barrier(carol)
    taken(carol, of("presence"))
    rids: list[int] = []
    for k in range(30):
        rid = next(phone.rids)
        rids.append(rid)
        await phone.send({"t": "presence", "rid": rid, "status": ("away", "busy")[k % 2]})
    replies = [await wait_frame(phone, of_rid(rid)) for rid in rids]
    accepted = [r for r in replies if r["t"] == "ok"]
    assert 5 <= len(accepted) <= 6, replies  # the burst (plus at most one refilled)
    assert replies[:5] == accepted[:5]
    for r in replies[len(accepted) :]:
        assert r["code"] == "rate_limited" and r["retry_after_ms"] > 0, r
    refused = await laptop.request("presence", status="online")  # the same user's bucket
    assert refused["code"] == "rate_limited", refused
    assert (await carol.request("presence", status="away"))["t"] == "ok"  # others unaffected
    await barrier(carol)
    assert len(taken(carol, presence_of("alice"))) == len(accepted)  # one push per change


async def _idle_device_goes_offline(h: Harness, heartbeat_s: float, slack_s: float) -> None:
    """alice's only device says nothing and is closed after two heartbeats with
    ``idle_timeout``; carol sees alice go offline; bob, who pings, stays."""
    await become_member(h, "alice")
    carol = await h.connect("carol")
    await join(carol)
    bob = await h.connect("bob")
    taken(carol, of("presence"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pinger, carol, heartbeat_s / 2)
        nursery.start_soon(pinger, bob, heartbeat_s / 2)
        start = trio.current_time()
        alice = await h.raw()
        welcome = await alice.request("hello", v=1, token=mint("alice"))
        assert welcome["heartbeat_ms"] == round(heartbeat_s * 1000), welcome
        assert (await wait_frame(carol, presence_of("alice")))["status"] == "online"
        frames = await until_closed(alice, 2 * heartbeat_s + slack_s + 5)
        idle = trio.current_time() - start
        assert [f["code"] for f in frames if f["t"] == "error"] == ["idle_timeout"], frames
        assert 2 * heartbeat_s <= idle <= 2 * heartbeat_s + slack_s, idle
        assert (await wait_frame(carol, presence_of("alice")))["status"] == "offline"
        # bob has pinged all along: still connected well past two heartbeats.
        await trio.sleep(3 * heartbeat_s)
        nursery.cancel_scope.cancel()
    await barrier(bob, carol)
    assert not bob.eof and not carol.eof


@real(limits=fast_limits(heartbeat_ms=200))
async def test_idle_device_is_disconnected_real_time(harness: Harness) -> None:
    await _idle_device_goes_offline(harness, 0.2, slack_s=0.5)


@mocked()
async def test_idle_device_is_disconnected_mock_clock(
    autojump_clock: trio.testing.MockClock, harness: Harness
) -> None:
    # The default heartbeat (30 s): closed at 60 s, within one tick (250 ms).
    assert harness.server.settings.limits.heartbeat_ms == 30_000
    await _idle_device_goes_offline(harness, 30.0, slack_s=0.26)


@real(limits=fast_limits(heartbeat_ms=300), max_inflight=1)
async def test_a_connection_held_back_by_flow_control_is_not_idle(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stops reading a connection whose one write waits for a stalled store
    (max_inflight 1); its pings stay unread for 2.5 x the idle timeout. The server, not
    the peer, is holding back: no idle_timeout (PROTOCOL.md section 4). Once the store
    moves, the write is acknowledged and every ping answered, in order."""
    client = await harness.connect("alice")
    store = harness.server.store
    held: list[Any] = []
    monkeypatch.setattr(store, "submit", lambda *ops: held.extend(ops))
    await client.send({"t": "send", "rid": 100, "channel": ROOM, "cid": "c1", "text": "x"})
    for i in range(10):  # 1.5 s; the idle timeout is 0.6 s
        await client.send({"t": "ping", "rid": 200 + i})
        await trio.sleep(0.15)
    monkeypatch.undo()
    store.submit(*held)
    assert (await client.next(of_rid(100)))["t"] == "ok"
    pongs = [await client.next(of_rid(200 + i)) for i in range(10)]
    assert [p["t"] for p in pongs] == ["pong"] * 10
    assert not [f for f in client.pending if f.get("t") == "error"]


@real(limits=fast_limits(heartbeat_ms=100), max_inflight=1, ready_max_write_age_s=0.05)
async def test_a_connection_held_back_by_a_stalled_store_times_out(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same hold, but the store reports its oldest write waiting longer than
    ready_max_write_age_s (stalled): its writes may never complete, so the held
    connection is not kept alive; the idle timeout applies as to any other."""
    client = await harness.connect("alice")
    store = harness.server.store
    monkeypatch.setattr(store, "submit", lambda *ops: None)
    monkeypatch.setattr(store, "health", lambda: (None, 1.0))
    await client.send({"t": "send", "rid": 100, "channel": ROOM, "cid": "c1", "text": "x"})
    closed = harness.server.metrics.value
    with trio.fail_after(5):
        while not closed("tsmsg_connections_closed_total", reason="idle_timeout"):
            await client.send({"t": "ping"})
            await trio.sleep(0.05)


# ====================================================================== typing


def typing_of(user: str, on: bool | None = None) -> Match:
    return lambda f: (
        f.get("t") == "typing" and f.get("user") == user and (on is None or f.get("on") is on)
    )


async def typing_room(h: Harness) -> tuple[WireClient, WireClient, WireClient]:
    """alice on two devices and carol, all joined to ROOM."""
    phone, laptop, carol = [await h.connect(u) for u in ("alice", "alice", "carol")]
    for client in (phone, laptop, carol):
        await join(client)
    return phone, laptop, carol


@real(limits=fast_limits(typing_timeout_ms=300))
async def test_typing_on_off_and_expiry_real_time(harness: Harness) -> None:
    phone, laptop, carol = await typing_room(harness)
    # on: reaches carol, not alice's own devices.
    reply = await phone.request("typing", channel=ROOM, on=True)
    assert reply == {"t": "ok", "rid": reply["rid"]}
    start = trio.current_time()
    assert await carol.next(typing_of("alice")) == {
        "t": "typing",
        "channel": ROOM,
        "user": "alice",
        "on": True,
    }
    # Not renewed: the server turns it off after typing_timeout_ms.
    await carol.next(typing_of("alice", on=False))
    waited = trio.current_time() - start
    # The server times a frame from when it read it (ms), a little before this test's
    # clock starts: 10 ms of slack below.
    assert 0.3 - 0.01 <= waited < 0.3 + 1.0, waited
    # on then off: both pushed, the off at once.
    await phone.request("typing", channel=ROOM, on=True)
    await carol.next(typing_of("alice", on=True))
    start = trio.current_time()
    await phone.request("typing", channel=ROOM, on=False)
    await carol.next(typing_of("alice", on=False))
    assert trio.current_time() - start < 0.3
    # off again with nothing on: no push; nor does the expiry of the turned-off one come.
    assert (await phone.request("typing", channel=ROOM, on=False))["t"] == "ok"
    await trio.sleep(0.5)
    await barrier(carol, phone, laptop)
    assert taken(carol, typing_of("alice")) == []
    assert taken(phone, of("typing")) == taken(laptop, of("typing")) == []


async def test_typing_stops_when_the_typer_disconnects(harness: Harness) -> None:
    # The default timeout (6 s) is far off: the off comes from the disconnect.
    phone, laptop, carol = await typing_room(harness)
    await phone.request("typing", channel=ROOM, on=True)
    await carol.next(typing_of("alice", on=True))
    start = trio.current_time()
    await phone.aclose()
    await wait_frame(carol, typing_of("alice", on=False), timeout=2)
    assert trio.current_time() - start < 2
    await barrier(carol, laptop)
    assert taken(carol, typing_of("alice")) == [] and taken(laptop, of("typing")) == []


@mocked()
async def test_typing_expiry_mock_clock(
    autojump_clock: trio.testing.MockClock, harness: Harness
) -> None:
    phone, laptop, carol = await typing_room(harness)
    timeout_s = harness.server.settings.limits.typing_timeout_ms / 1000  # 6 s by default
    tick_s = harness.server.settings.tick_ms / 1000
    await phone.request("typing", channel=ROOM, on=True)
    start = trio.current_time()
    await carol.next(typing_of("alice", on=True))
    await wait_frame(carol, typing_of("alice", on=False), timeout=3 * timeout_s)
    assert timeout_s <= trio.current_time() - start <= timeout_s + tick_s
    # Renewed before it expires: the expiry counts from the renewal.
    await phone.request("typing", channel=ROOM, on=True)
    start = trio.current_time()
    await wait_frame(carol, typing_of("alice", on=True))
    await trio.sleep(timeout_s - 2)
    await phone.request("typing", channel=ROOM, on=True)
    renewed = trio.current_time()
    await wait_frame(carol, typing_of("alice", on=True))
    await wait_frame(carol, typing_of("alice", on=False), timeout=3 * timeout_s)
    assert timeout_s <= trio.current_time() - renewed <= timeout_s + tick_s
    assert trio.current_time() - start > timeout_s + 1
    await barrier(carol, phone, laptop)
    assert taken(carol, typing_of("alice")) == []
    assert taken(phone, of("typing")) == taken(laptop, of("typing")) == []


@real(limits=fast_limits(typing_rate=2.0, typing_burst=5))
async def test_typing_flood_is_rate_limited_and_never_stored(harness: Harness) -> None:
    phone, laptop, carol = await typing_room(harness)
    await send(laptop, "hello")
    rids: list[int] = []
    for k in range(30):
        rid = next(phone.rids)
        rids.append(rid)
        await phone.send({"t": "typing", "rid": rid, "channel": ROOM, "on": k % 2 == 0})
    replies = [await wait_frame(phone, of_rid(rid)) for rid in rids]
    accepted = [r for r in replies if r["t"] == "ok"]
    refused = [r for r in replies if r["t"] != "ok"]
    assert 5 <= len(accepted) <= 6, replies  # the burst (plus at most one refilled)
    assert replies[:5] == accepted[:5]
    for r in refused:
        assert r["code"] == "rate_limited" and r["retry_after_ms"] > 0, r
    await barrier(carol)
    assert len(taken(carol, typing_of("alice"))) == len(accepted)  # each changed or renewed
    # Never stored: the log holds the one message, and the connection stays open.
    assert [e["text"] for e in await sync_all(carol)] == ["hello"]
    assert (await join(carol))["head"] == 1
    assert [m["text"] for m in (await carol.request("history", channel=ROOM))["messages"]] == [
        "hello"
    ]


# ====================================================================== read receipts


def read_of(user: str, seq: int | None = None) -> Match:
    return lambda f: (
        f.get("t") == "read" and f.get("user") == user and (seq is None or f.get("seq") == seq)
    )


async def test_read_receipts_forward_only_clamped_merged_and_pushed_once(
    harness: Harness,
) -> None:
    alice, bob, c1, c2 = [await harness.connect(u) for u in ("alice", "bob", "carol", "carol")]
    for client in (alice, bob, c1, c2):
        await join(client)
    acks = [await send(alice, f"m{k}") for k in range(1, 6)]
    assert [a["seq"] for a in acks] == [1, 2, 3, 4, 5]
    everyone = (alice, bob, c1, c2)

    async def read(client: WireClient, seq: int, cursor: int, pushed: bool) -> None:
        reply = await client.request("read", channel=ROOM, seq=seq)
        assert reply == {"t": "ok", "rid": reply["rid"], "channel": ROOM, "seq": cursor}, reply
        await barrier(*everyone)
        for member in everyone:
            pushes = taken(member, read_of("carol"))
            want = [{"t": "read", "channel": ROOM, "user": "carol", "seq": cursor}]
            assert pushes == (want if pushed else []), (member, pushes)

    await read(c1, 3, 3, pushed=True)
    await read(c2, 2, 3, pushed=False)  # another device, older: no-op (max wins)
    await read(c2, 3, 3, pushed=False)
    await read(c2, 99, 5, pushed=True)  # clamped to the head
    await read(c1, 4, 5, pushed=False)
    assert (await join(c1))["read"] == 5
    c3 = await harness.connect("carol")
    assert {k: (await join(c3))[k] for k in ("head", "read")} == {"head": 5, "read": 5}
    # A channel with no entries: the cursor stays 0, no push.
    assert (await c1.request("read", channel="empty", seq=7))["seq"] == 0

    # unread: after the cursor, not deleted, not one's own.
    new = [await send(alice, f"n{k}") for k in range(3)]  # seqs 6, 7, 8
    await send(c2, "mine")  # 9: carol's own
    deleted = await alice.request("delete", channel=ROOM, id=new[1]["id"])  # 10
    assert deleted["t"] == "ok", deleted
    channels = [ROOM, "empty", "never-used"]
    reply = await c1.request("unread", channels=channels)
    assert (reply["t"], reply["unread"], reply["capped"]) == (
        "ok",
        {ROOM: 2, "empty": 0, "never-used": 0},
        [],
    ), reply
    assert (await bob.request("unread", channels=[ROOM]))["unread"] == {ROOM: 8 - 1 + 1}
    assert (await alice.request("unread", channels=[ROOM]))["unread"] == {ROOM: 1}
    await c3.request("read", channel=ROOM, seq=10)
    assert (await c2.request("unread", channels=[ROOM]))["unread"] == {ROOM: 0}
    assert (await c2.request("unread", channels="room"))["code"] == "bad_request"


@real(limits=fast_limits(unread_scan_max=4))
async def test_unread_is_capped_past_the_scan_bound(harness: Harness) -> None:
    alice, carol = await harness.connect("alice"), await harness.connect("carol")
    for k in range(10):
        await send(alice, f"m{k}")
    reply = await carol.request("unread", channels=[ROOM])
    assert (reply["unread"], reply["capped"]) == ({ROOM: 4}, [ROOM]), reply
    await carol.request("read", channel=ROOM, seq=6)
    reply = await carol.request("unread", channels=[ROOM])
    assert (reply["unread"], reply["capped"]) == ({ROOM: 4}, []), reply
    await carol.request("read", channel=ROOM, seq=8)
    reply = await carol.request("unread", channels=[ROOM])
    assert (reply["unread"], reply["capped"]) == ({ROOM: 2}, []), reply


# ====================================================================== rate limits


@real(limits=fast_limits(send_rate=20.0, send_burst=10))
async def test_send_flood_accepted_dense_refused_not_stored_others_unaffected(
    harness: Harness,
) -> None:
    alice, bob, reader = [await harness.connect(u) for u in ("alice", "bob", "reader")]
    replies: dict[int, Frame] = {}
    sent: dict[int, str] = {}  # rid -> text
    flood_s = 1.0
    bob_acks: list[Frame] = []
    done = trio.Event()

    async def flood() -> None:
        end = trio.current_time() + flood_s
        k = 0
        while trio.current_time() < end:
            rid = next(alice.rids)
            sent[rid] = text = f"a{k}"
            await alice.send({"t": "send", "rid": rid, "channel": ROOM, "cid": text, "text": text})
            k += 1
            await trio.sleep(0.002)
        done.set()
        await alice.send({"t": "ping", "rid": next(alice.rids)})  # wakes collect() up

    async def collect() -> None:
        with trio.fail_after(flood_s + WIRE_TIMEOUT):
            while not (done.is_set() and len(replies) == len(sent)):
                reply = await alice.next(lambda f: f.get("rid") is not None)
                if reply["t"] != "pong":
                    replies[reply["rid"]] = reply

    async def steady_bob() -> None:  # within bob's own limit: 10/s for the flood's length
        for k in range(10):
            bob_acks.append(await bob.request("send", channel=ROOM, cid=f"b{k}", text=f"b{k}"))
            await trio.sleep(0.1)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        nursery.start_soon(steady_bob)
        await flood()
    elapsed = trio.current_time() - start

    accepted = {rid: r for rid, r in replies.items() if r["t"] == "ok"}
    refused = {rid: r for rid, r in replies.items() if r["t"] != "ok"}
    assert len(sent) > 200  # a real flood
    assert set(replies) == set(sent)
    # The bucket: the burst plus what refilled (20/s), nothing beyond.
    assert 10 + 20 * flood_s * 0.5 <= len(accepted) <= 10 + 20 * elapsed + 1, len(accepted)
    for r in refused.values():
        assert r["code"] == "rate_limited", r
        assert isinstance(r["retry_after_ms"], int) and 0 < r["retry_after_ms"] <= 50, r
    assert all(r["t"] == "ok" and not r["dup"] for r in bob_acks), bob_acks

    log = await sync_all(reader)
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))  # dense
    assert len(log) == len(accepted) + len(bob_acks)
    by_seq = {e["seq"]: e for e in log}
    assert len({r["seq"] for r in accepted.values()}) == len(accepted)  # unique
    for rid, r in accepted.items():
        assert (by_seq[r["seq"]]["text"], by_seq[r["seq"]]["sender"]) == (sent[rid], "alice")
    stored_texts = {e["text"] for e in log}
    assert not stored_texts & {sent[rid] for rid in refused}  # nothing refused was stored
    assert {e["text"] for e in log if e["sender"] == "bob"} == {f"b{k}" for k in range(10)}

    # A refused send retried after its retry_after_ms (same cid) is accepted, once.
    rid = max(refused)
    await trio.sleep(refused[rid]["retry_after_ms"] / 1000 + 0.06)
    retry = await alice.request("send", channel=ROOM, cid=sent[rid], text=sent[rid])
    assert retry["t"] == "ok" and not retry["dup"], retry
    assert retry["seq"] == len(log) + 1


@real(limits=fast_limits(channel_send_rate=0.01, channel_send_burst=3))
async def test_per_channel_send_limit(harness: Harness) -> None:
    alice, bob = await harness.connect("alice"), await harness.connect("bob")
    acks = [await send(alice, f"a{k}") for k in range(3)]
    for k in range(3, 5):
        refused = await alice.request("send", channel=ROOM, cid=f"a{k}", text=f"a{k}")
        assert refused["code"] == "rate_limited" and refused["retry_after_ms"] > 0, refused
    # Edits and deletes count as sends in that channel too.
    edit = await alice.request("edit", channel=ROOM, id=acks[0]["id"], text="edited")
    assert edit["code"] == "rate_limited", edit
    # Another channel of the same user, and another user in the same channel: unaffected.
    assert (await send(alice, "elsewhere", channel="other"))["seq"] == 1
    assert (await send(bob, "b0"))["seq"] == 4
    assert [e["text"] for e in await sync_all(bob)] == ["a0", "a1", "a2", "b0"]


@real(
    limits=fast_limits(send_rate=0.01, send_burst=6, channel_send_rate=0.01, channel_send_burst=3)
)
async def test_a_send_refused_by_the_channel_limit_does_not_spend_the_user_limit(
    harness: Harness,
) -> None:
    alice = await harness.connect("alice")
    for k in range(3):
        await send(alice, f"a{k}")
    for k in range(3, 6):
        refused = await alice.request("send", channel=ROOM, cid=f"a{k}", text=f"a{k}")
        assert refused["code"] == "rate_limited", refused
    # Three of alice's six user tokens are left: another channel still takes sends.
    for k in range(3):
        reply = await alice.request("send", channel="other", cid=f"o{k}", text=f"o{k}")
        assert reply["t"] == "ok", reply


async def _flood_until_disconnected(
    client: WireClient, every_s: float, timeout_s: float, pings_after: frozenset[int] = frozenset()
) -> tuple[list[Frame], float]:
    """Send a send every ``every_s`` (and a ping right after the sends numbered in
    ``pings_after``, counting from 0) until the server closes the connection; the frames
    received and the time from the first refusal to the close."""
    frames: list[Frame] = []
    first_refusal: list[float] = []

    async def sender() -> None:
        k = 0
        try:
            while True:
                rid = next(client.rids)
                text = f"f{k}"
                await client.send(
                    {"t": "send", "rid": rid, "channel": ROOM, "cid": text, "text": text}
                )
                k += 1
                if k - 1 in pings_after:
                    await client.send({"t": "ping", "rid": next(client.rids)})
                await trio.sleep(every_s)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    with trio.fail_after(timeout_s):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            try:
                while True:
                    await client._fill()
                    for f in client.pending:
                        if f.get("code") == "rate_limited" and not first_refusal:
                            first_refusal.append(trio.current_time())
                    frames += client.pending
                    client.pending = []
            except (EOFError, trio.BrokenResourceError):
                pass
            closed_at = trio.current_time()
            nursery.cancel_scope.cancel()
    assert first_refusal, frames
    return frames, closed_at - first_refusal[0]


def assert_disconnected_for_flooding(frames: list[Frame]) -> None:
    errors = [f for f in frames if f["t"] == "error"]
    assert errors and all(f["code"] == "rate_limited" for f in errors), errors
    last = errors[-1]
    assert "disconnected" in last["message"] and last["retry_after_ms"] > 0, last
    assert frames[-1] is last  # nothing after it


@real(limits=fast_limits(send_rate=0.2, send_burst=1, rate_limited_disconnect_ms=500))
async def test_flooding_while_limited_disconnects_real_time(harness: Harness) -> None:
    alice = await harness.connect("alice")
    frames, limited_s = await _flood_until_disconnected(alice, 0.02, timeout_s=5)
    assert_disconnected_for_flooding(frames)
    assert 0.5 <= limited_s < 0.5 + 1.0, limited_s
    assert [f["seq"] for f in frames if f["t"] == "ok"] == [1]
    # Other users, and alice on a new connection (after waiting), are fine.
    bob = await harness.connect("bob")
    assert (await send(bob, "still here"))["seq"] == 2


@mocked(limits=fast_limits(send_rate=0.01, send_burst=1))
async def test_flooding_while_limited_disconnects_mock_clock(
    autojump_clock: trio.testing.MockClock, harness: Harness
) -> None:
    # The default bound (10 s), a send every 0.5 s after the first is refused.
    bound_s = harness.server.settings.limits.rate_limited_disconnect_ms / 1000
    assert bound_s == 10
    alice = await harness.connect("alice")
    frames, limited_s = await _flood_until_disconnected(alice, 0.5, timeout_s=60)
    assert_disconnected_for_flooding(frames)
    assert limited_s == pytest.approx(bound_s, abs=1e-6)  # the 21st refusal, exactly at 10 s
    assert len([f for f in frames if f.get("code") == "rate_limited"]) == 21


@mocked(limits=fast_limits(send_rate=0.01, send_burst=1))
async def test_a_served_request_breaks_the_run_of_refusals_mock_clock(
    autojump_clock: trio.testing.MockClock, harness: Harness
) -> None:
    # PROTOCOL.md 16.4: the run is broken by any request served without error (a ping).
    # Sends every 0.5 s from t=0 (the first accepted); a ping right after the send at
    # 6 s; the next run starts with the send at 6.5 s, so the close comes at 16.5 s, with
    # the 33rd refusal (without the ping: at 10.5 s, the 21st).
    alice = await harness.connect("alice")
    start = trio.current_time()
    frames, _ = await _flood_until_disconnected(
        alice, 0.5, timeout_s=60, pings_after=frozenset({12})
    )
    assert_disconnected_for_flooding(frames)
    assert trio.current_time() - start == pytest.approx(16.5, abs=1e-6)
    assert len([f for f in frames if f.get("code") == "rate_limited"]) == 33
    assert len([f for f in frames if f["t"] == "pong"]) == 1


@real(ip_connect_rate=1.0, ip_connect_burst=5)
async def test_per_ip_connection_rate(harness: Harness) -> None:
    clients = [await harness.connect(f"u{k}") for k in range(5)]
    sixth = await harness.raw()
    frames = await until_closed(sixth)  # refused before it says anything
    assert len(frames) == 1, frames
    (refusal,) = frames
    assert refusal["t"] == "error" and refusal["code"] == "rate_limited", refusal
    assert 0 < refusal["retry_after_ms"] <= 1000, refusal
    # The message names the limit (PROTOCOL.md 4, "Admission"), not another one.
    assert "ip_connect_rate" in refusal["message"], refusal
    assert "login" not in refusal["message"], refusal
    await barrier(*clients)  # the admitted ones are unaffected
    await trio.sleep(refusal["retry_after_ms"] / 1000 + 0.05)
    await harness.connect("later")  # a token refilled
    assert harness.server.metrics.value("tsmsg_rate_limited_total", scope="ip_connect") == 1


@real(ip_login_fail_rate=0.01, ip_login_fail_burst=3)
async def test_failed_logins_from_an_ip_lock_it_out(harness: Harness) -> None:
    forged = TokenIssuer(b"another-secret-another-secret-!!!!").issue(
        "alice", ["*"], now=int(time.time())
    )
    expired = TokenIssuer(SECRET).issue("alice", ["*"], ttl_s=10, now=int(time.time()) - 100)

    async def login(token: str) -> list[Frame]:
        client = await harness.raw()
        await client.send({"t": "hello", "rid": 1, "v": 1, "token": token})
        return await until_closed(client)

    assert [f["code"] for f in await login(forged)] == ["unauthorized"]
    assert [f["code"] for f in await login(expired)] == ["token_expired"]
    ok = await harness.connect("alice")  # a good login in between still works
    assert [f["code"] for f in await login(forged)] == ["unauthorized"]
    # Past the burst: the next connection from this IP is refused, whatever its token.
    refused = await harness.raw()
    frames = await until_closed(refused)
    assert [(f["t"], f["code"]) for f in frames] == [("error", "rate_limited")], frames
    assert frames[0]["retry_after_ms"] > 0
    assert "ip_login_fail_rate" in frames[0]["message"], frames  # names the limit
    assert harness.server.metrics.value("tsmsg_auth_failures_total") == 3
    await barrier(ok)  # an established session is not affected


@real(ip_login_fail_rate=0.01, ip_login_fail_burst=3)
async def test_connections_opened_before_a_lockout_cannot_keep_guessing(
    harness: Harness,
) -> None:
    """The lockout is a brute-force guard of ip_login_fail_rate guesses a second: it holds
    for connections the address opened before it ran out of tokens too. Ten connections
    opened at once, then a forged hello on each: three guesses are answered, the other
    hellos are refused (rate_limited, with their rid) without their token being tried.
    (Checked only at admission, all ten were tried: up to ip_max_connections guesses for
    each token.)"""
    forged = TokenIssuer(b"another-secret-another-secret-!!!!").issue(
        "alice", ["*"], now=int(time.time())
    )
    clients = [await harness.raw() for _ in range(10)]
    for client in clients:
        await client.send({"t": "hello", "rid": 7, "v": 1, "token": forged})
    replies = [await until_closed(client) for client in clients]
    codes = [[f["code"] for f in frames] for frames in replies]
    assert sorted(codes) == [["rate_limited"]] * 7 + [["unauthorized"]] * 3, codes
    for frames in replies:
        assert frames[0]["rid"] == 7, frames
        if frames[0]["code"] == "rate_limited":
            assert frames[0]["retry_after_ms"] > 0, frames
    metrics = harness.server.metrics
    assert metrics.value("tsmsg_auth_failures_total") == 3
    assert metrics.value("tsmsg_rate_limited_total", scope="ip_login") == 7
    refused = await harness.raw()  # and a new connection is refused at admission, as before
    frames = await until_closed(refused)
    assert [(f["t"], f["code"]) for f in frames] == [("error", "rate_limited")], frames


@real(ip_login_fail_rate=0.01, ip_login_fail_burst=1)
async def test_failed_refreshes_are_not_failed_logins(harness: Harness) -> None:
    alice = await harness.connect("alice")
    for _ in range(3):
        assert (await alice.request("refresh", token=mint("bob")))["code"] == "unauthorized"
    assert (await alice.request("refresh", token="junk"))["code"] == "unauthorized"
    await harness.connect("alice")  # the IP is not locked out
    assert harness.server.metrics.value("tsmsg_auth_failures_total") == 0


def far_token(user: str, exp: int) -> str:
    """A token signed with the tests' secret whose exp is ``exp``, however large."""
    body = {"sub": user, "exp": exp, "scope": ["chat:read", "chat:send"], "channels": ["*"]}
    return jwt.encode(body, SECRET, algorithm="HS256")


@pytest.mark.parametrize("exp", [2**64, 10**30, int(time.time()) + 31 * 86_400])
async def test_a_token_beyond_the_maximum_lifetime_is_refused(harness: Harness, exp: int) -> None:
    """At hello (a connection error) and at refresh (a request error: the connection goes
    on with its old token). An exp of 2**64 once passed hello and then crashed refresh,
    whose ok echoes exp, with an EncodeError; 10**30 never expired."""
    client = await harness.raw()
    refused = await client.request("hello", v=1, token=far_token("alice", exp))
    assert refused["code"] == "unauthorized" and "too far ahead" in refused["message"], refused
    assert await client.closed()
    alice = await harness.connect("alice")
    refused = await alice.request("refresh", token=far_token("alice", exp))
    assert refused["code"] == "unauthorized" and "too far ahead" in refused["message"], refused
    assert (await alice.request("ping"))["t"] == "pong"  # still open, its old token kept
    assert harness.server.metrics.value("tsmsg_connections_closed_total") == 1  # the hello's


# ====================================================================== token expiry


@real(limits=fast_limits(refresh_grace_ms=10_000))
async def test_token_expiry_then_refresh_narrows_channels(harness: Harness) -> None:
    token, exp = expiring_token("alice")
    alice = await hello(harness, token)
    for channel in ("room-a", "room-b"):
        await join(alice, channel)
    bob = await harness.connect("bob")

    # Another user's token is refused, before and after expiry; the connection stays.
    wrong = await alice.request("refresh", token=mint("bob"))
    assert wrong["code"] == "unauthorized", wrong

    expired = await wait_frame(alice, of("error", code="token_expired"), timeout=3)
    assert time.time() >= exp - 0.05
    assert "rid" not in expired and expired["refresh_within_ms"] == 10_000, expired
    assert (await alice.request("ping"))["t"] == "pong"  # not fatal; ping still works
    refused = await alice.request("send", channel="room-a", cid="x", text="x")
    assert refused["code"] == "token_expired", refused
    assert (await alice.request("refresh", token=mint("bob")))["code"] == "unauthorized"
    assert (await alice.request("refresh", token="not-a-jwt"))["code"] == "unauthorized"
    assert (await alice.request("refresh", token=7))["code"] == "bad_request"
    stale = TokenIssuer(SECRET).issue("alice", ["*"], ttl_s=10, now=int(time.time()) - 100)
    assert (await alice.request("refresh", token=stale))["code"] == "token_expired"

    # Refresh with a narrower token: room-b is left with a push, then ok {exp}.
    new_token, new_exp = token_and_exp("alice", ("room-a",))
    rid = next(alice.rids)
    await alice.send({"t": "refresh", "rid": rid, "token": new_token})
    left = await alice.next(of("left"))
    assert left == {"t": "left", "channel": "room-b", "reason": "forbidden"}
    assert await alice.next(lambda f: f.get("rid") == rid) == {
        "t": "ok",
        "rid": rid,
        "exp": new_exp,
    }
    assert (await send(alice, "again", channel="room-a", cid="x"))["seq"] == 1
    assert (await alice.next(of("event")))["text"] == "again"  # its own, as a member
    assert (await alice.request("send", channel="room-b", cid="y", text="y"))["code"] == "forbidden"
    # No more events from room-b; room-a's still come.
    await send(bob, "b-in-b", channel="room-b")
    await send(bob, "b-in-a", channel="room-a")
    event = await alice.next(of("event"))
    assert (event["channel"], event["text"]) == ("room-a", "b-in-a")
    await barrier(alice)
    assert taken(alice, of("event")) == []
    # The grace period is over with the refresh: nothing fatal comes later.
    assert taken(alice, of("error")) == []


@real(limits=fast_limits(refresh_grace_ms=300))
async def test_no_refresh_within_the_grace_period_closes(harness: Harness) -> None:
    token, _ = expiring_token("alice")
    alice = await hello(harness, token)
    first = await wait_frame(alice, of("error", code="token_expired"), timeout=3)
    start = trio.current_time()
    assert first["refresh_within_ms"] == 300
    frames = await until_closed(alice, timeout=3)
    waited = trio.current_time() - start
    assert [f["code"] for f in frames] == ["token_expired"], frames
    assert "refresh_within_ms" not in frames[0]
    assert 0.3 - TICK_MS / 1000 <= waited < 0.3 + 1.0, waited


@mocked(limits=fast_limits(heartbeat_ms=600_000))
async def test_token_expiry_and_grace_mock_clock(
    autojump_clock: trio.testing.MockClock, harness: Harness
) -> None:
    server = harness.server
    tick_ms = server.settings.tick_ms
    grace_ms = server.settings.limits.refresh_grace_ms
    assert grace_ms == 30_000  # the default
    token_a, exp = token_and_exp("alice", ttl_s=60)
    token_b = mint("bob", ttl_s=60)
    alice, bob = await hello(harness, token_a), await hello(harness, token_b)

    async def expiry(client: WireClient) -> int:
        frame = await wait_frame(client, of("error", code="token_expired"), timeout=120)
        assert frame["refresh_within_ms"] == grace_ms, frame
        return server.now_ms()

    alice_expired = await expiry(alice)
    bob_expired = await expiry(bob)
    # Caught by the ticker at the first tick at or after exp.
    assert 0 <= alice_expired - exp * 1000 <= tick_ms
    assert bob_expired == alice_expired

    # Store writes are avoided from here on: under autojump, virtual time runs on while
    # the test waits for the store's thread. `history` is a read that needs a valid token.
    await trio.sleep(grace_ms / 1000 - 1)
    refused = await alice.request("history", channel=ROOM)
    assert refused["code"] == "token_expired", refused
    refreshed = await alice.request("refresh", token=mint("alice"))
    assert refreshed["t"] == "ok", refreshed
    assert (await alice.request("history", channel=ROOM))["t"] == "ok"

    frames = await until_closed(bob, timeout=10)
    assert [f["code"] for f in frames] == ["token_expired"], frames
    assert server.now_ms() - (bob_expired + grace_ms) == 0  # the tick at exactly the end
    await trio.sleep(2 * grace_ms / 1000)  # refreshed: alice stays
    await barrier(alice)
    assert taken(alice, of("error")) == []


# ====================================================================== frame deadline


@pytest.mark.parametrize("dribble", [False, True], ids=["stall", "dribble"])
@real(frame_timeout_s=0.3)
async def test_an_unfinished_frame_times_out_real_time(harness: Harness, dribble: bool) -> None:
    alice = await harness.connect("alice")
    # A frame in two pieces with a pause under the deadline is fine.
    data = alice.framing.encode({"t": "ping", "rid": 77})
    await alice.send_raw(data[:3])
    await trio.sleep(0.1)
    await alice.send_raw(data[3:])
    assert (await alice.next())["rid"] == 77

    start = trio.current_time()
    filler = alice.framing.filler
    await alice.send_raw(alice.framing.unfinished() + filler * 10)  # 100 bytes announced
    if dribble:  # more of it keeps coming, but the deadline counts from the frame's start
        for _ in range(4):
            await trio.sleep(0.05)
            await alice.send_raw(filler)
    frames = await until_closed(alice, timeout=3)
    waited = trio.current_time() - start
    assert [f["code"] for f in frames] == ["frame_timeout"], frames
    assert 0.3 <= waited < 0.3 + 1.0, waited


@mocked(limits=fast_limits(heartbeat_ms=600_000))
async def test_an_unfinished_frame_times_out_mock_clock(
    autojump_clock: trio.testing.MockClock, harness: Harness
) -> None:
    timeout_s = harness.server.settings.frame_timeout_s
    assert timeout_s == 30  # the default
    alice = await harness.connect("alice")
    # Between frames, silence is not a frame timeout.
    await trio.sleep(2 * timeout_s)
    await barrier(alice)
    start = trio.current_time()
    await alice.send_raw(alice.framing.unfinished())  # a header alone
    frames = await until_closed(alice, timeout=3 * timeout_s)
    assert [f["code"] for f in frames] == ["frame_timeout"], frames
    assert trio.current_time() - start == pytest.approx(timeout_s, abs=1e-6)


@real(limits=fast_limits(heartbeat_ms=200))
async def test_bytes_of_an_unfinished_frame_are_not_a_heartbeat(harness: Harness) -> None:
    # frame_timeout_s is the default 30 s: it is the idle limit (2 x 200 ms) that closes.
    start = trio.current_time()  # before hello, the last complete frame
    alice = await harness.connect("alice")
    await alice.send_raw(alice.framing.unfinished())
    for _ in range(3):
        await trio.sleep(0.08)
        await alice.send_raw(alice.framing.filler)
    frames = await until_closed(alice, timeout=3)
    assert [f["code"] for f in frames] == ["idle_timeout"], frames
    assert 0.4 - TICK_MS / 1000 <= trio.current_time() - start < 0.4 + 1.0


@mocked()
async def test_hello_deadline_mock_clock(
    autojump_clock: trio.testing.MockClock, harness: Harness
) -> None:
    timeout_s = harness.server.settings.hello_timeout_s
    assert timeout_s == 10  # the default
    start = trio.current_time()
    silent = await harness.raw()
    frames = await until_closed(silent, timeout=3 * timeout_s)
    assert [(f["t"], f["code"]) for f in frames] == [("error", "hello_timeout")], frames
    assert trio.current_time() - start == pytest.approx(timeout_s, abs=1e-6)


# ====================================================================== slow consumer


FLOOD_COUNT = 5000
FLOOD_TEXT = 4096  # 5,000 x 4 KiB = 20 MiB of text through the channel
# Heap growth allowed besides the outbound queue: allocator slack, acks, the sender's
# buffers. Well under the 20 MiB that flow: a server queueing the flood would exceed it.
RSS_SLACK = 8 << 20


def flood_text(k: int) -> str:
    """Generated, not kept: the test holds no copy of the 20 MiB itself."""
    return f"{k:05d}".ljust(FLOOD_TEXT, "x")


# Mapped pages of files other than the store's that the flood may touch (code paths first run).
FILE_SLACK = 2 << 20


def data_bytes(data_dir: str) -> int:
    """The size of the store's files (LMDB's data.mdb grows as pages are written)."""
    return sum(p.stat().st_size for p in Path(data_dir).rglob("*") if p.is_file())


def rss_kib() -> dict[str, int]:
    """This process's resident memory (the server runs in it): VmRSS, and RssAnon (the heap;
    VmRSS also counts RssFile, LMDB's mapped pages of the log file, which are page cache)."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    return out


@real(send_timeout_s=60.0)
async def test_slow_consumer_at_scale_memory_bounded_then_recovers_by_sync(
    harness: Harness,
) -> None:
    server = harness.server
    queue_limit = server.settings.max_queue_bytes
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    await sock.connect(("127.0.0.1", server.port))
    slow = WireClient(trio.SocketStream(sock))
    harness.clients.append(slow)
    assert (await slow.request("hello", v=1, token=mint("slow")))["t"] == "welcome"
    assert (await join(slow))["head"] == 0
    sender = await harness.connect("alice")
    await send(sender, "warm-up")  # the first write's one-off allocations
    await barrier(slow)
    warm = await slow.next(of("event"))
    assert warm["seq"] == 1
    await slow.expect("membership", channel=ROOM)  # its join's, before the flood

    base = rss_kib()
    base_files = data_bytes(server.settings.data_dir)
    peak = dict(base)
    acks: dict[int, tuple[int, str]] = {}  # k -> (seq, id)

    async def sample() -> None:
        while True:
            for key, value in rss_kib().items():
                peak[key] = max(peak[key], value)
            await trio.sleep(0.02)

    async def flood() -> None:
        window = trio.Semaphore(64)
        by_rid: dict[int, int] = {}

        async def receive() -> None:
            while len(acks) < FLOOD_COUNT:
                reply = await sender.next(lambda f: f.get("rid") in by_rid)
                assert reply["t"] == "ok", reply
                acks[by_rid.pop(reply["rid"])] = (reply["seq"], reply["id"])
                window.release()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            for k in range(FLOOD_COUNT):
                await window.acquire()
                rid = next(sender.rids)
                by_rid[rid] = k
                frame = {"t": "send", "rid": rid, "channel": ROOM, "cid": f"f{k}"}
                await sender.send({**frame, "text": flood_text(k)})

    start = trio.current_time()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            await flood()
            nursery.cancel_scope.cancel()
    flood_s = trio.current_time() - start
    after = rss_kib()
    for key, value in after.items():
        peak[key] = max(peak[key], value)

    growth = {key: (peak[key] - base[key]) * 1024 for key in base}
    file_growth = data_bytes(server.settings.data_dir) - base_files
    # The stated bound: heap growth (RssAnon) under max_queue_bytes (4 MiB) + 8 MiB while
    # 20 MiB flow through the channel. Besides the heap, VmRSS counts the mapped file pages
    # (RssFile): the store's pages just written, at most what its files grew by (a 4 KiB
    # text takes two 4 KiB overflow pages in LMDB, so up to ~40 MiB here: a bound on the
    # data written per message would be wrong by that factor).
    assert growth["RssAnon"] < queue_limit + RSS_SLACK, (growth, flood_s)
    assert growth["RssFile"] <= file_growth + FILE_SLACK, (growth, file_growth)
    assert server.metrics.value("tsmsg_slow_consumer_resyncs_total") >= 1
    assert slow.pending == []  # it has read nothing during the flood

    # It reads now: a dense live prefix, then the resync push (reason cut).
    head = FLOOD_COUNT + 1
    log: list[Frame] = [warm]
    with trio.fail_after(10):
        while True:
            frame = await slow.next()
            if frame["t"] == "resync":
                assert frame["channel"] == ROOM and frame["reason"] == "cut", frame
                assert "rid" not in frame and 1 < frame["head"] <= head, frame
                break
            assert frame["t"] == "event", frame
            log.append(frame)
        # Then sync from its last applied seq until caught up.
        since = log[-1]["seq"]
        while since < head:
            page = await slow.request("sync", channel=ROOM, since=since)
            assert page["t"] == "ok", page
            log += page["events"]
            since = page["events"][-1]["seq"] if page["events"] else since
            if not page["more"]:
                break
    assert [e["seq"] for e in log] == list(range(1, head + 1))  # every one, exactly once
    expected = {seq: (msg_id, flood_text(k)) for k, (seq, msg_id) in acks.items()}
    for e in log[1:]:
        assert (e["id"], e["text"]) == expected[e["seq"]], e["seq"]
    # Caught up: the live stream resumes.
    await send(sender, "live")
    assert (await slow.next(of("event")))["seq"] == head + 1


@mocked()
async def test_idle_connections_are_not_reexamined_every_tick(
    autojump_clock: trio.testing.MockClock,
    harness: Harness,
) -> None:
    """The ticker remembers each session's next deadline and skips it until then (or
    until it receives a frame): over 40 quiet ticks every connection keeps the deadline it
    was given, and one whose remembered deadline is later than its real one is not
    looked at before it (so a quiet connection costs no deadline computation per tick);
    the idle timeout still fires on time for the others."""
    clients = [await harness.connect(f"u{i}") for i in range(30)]
    connected = trio.current_time()
    tick_s = harness.server.settings.tick_ms / 1000
    await trio.sleep(40 * tick_s)  # well within the idle timeout
    conns = list(harness.server.connections.values())
    assert len(conns) == len(clients)
    for conn in conns:
        assert conn.next_check == conn.session.next_deadline() > harness.server.now_ms()
    idle_s = 2 * harness.server.settings.limits.heartbeat_ms / 1000
    late = conns[0]
    late.next_check += round(10 * idle_s * 1000)  # as if its deadline were much later
    # The idle timeout still fires on time for every other one; the late one is skipped.
    for client, user in zip(clients, [f"u{i}" for i in range(len(clients))], strict=True):
        if user == late.user:
            continue
        closing = await wait_frame(client, of("error"), timeout=2 * idle_s)
        assert closing["code"] == "idle_timeout", closing
    assert idle_s <= trio.current_time() - connected <= idle_s + 2 * tick_s
    await trio.sleep(4 * tick_s)
    assert late in harness.server.connections.values()
