"""Adversarial tests of what crosses nodes in cluster mode (docs/cluster.md): presence,
typing, read receipts, memberships and shared send limits between tsmsg nodes on one
Redis, over real TCP, with real server nodes (in this process, and ``tsmsg serve`` child
processes where a node must die with SIGKILL).

"No push came" is never decided by a sleep alone: a **barrier** user (``zed``) connected
to the node that made the change sets a status of its own afterwards; that change goes
through the same queue, batch, signal queue and pub/sub topic as the change watched for,
so once the watcher has zed's push, any push of the earlier change has arrived too.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

import redis_servers
import test_cluster
from conftest import Harness, WireClient, fast_limits, make_settings, mint, running_server
from server_proc import ServerProcess
from test_cluster import (
    CHANNEL,
    DELIVERY_TIMEOUT_S,
    collect,
    intercept,
    join,
    nodes,
    presence_of,
    taken,
    until,
)
from tsmsg.store.base import StoreUnavailable
from tsmsg.store.redis_store import RedisStore

redis_engine = test_cluster.redis_engine  # the fixture: a fresh Redis of the test's own

pytestmark = pytest.mark.skipif(not redis_servers.available(), reason="needs redis-server")

TTL_S = 1.5  # engine_presence_ttl_s of the nodes that need an expiry
SHORT_TTL = {"engine_presence_ttl_s": TTL_S}
marks = itertools.count(1)


# ---------------------------------------------------------------- helpers


async def members(harness: Harness, users: list[str], channel: str = CHANNEL) -> None:
    """Wait until each user's membership of ``channel`` is stored (written after the ok)."""
    store = harness.server.store
    await until(lambda: all(channel in store.channels_of(u) for u in users))


async def on_node(harness: Harness, user: str) -> None:
    """Wait until ``harness``'s node counts a device of ``user`` (its memberships read,
    its presence change queued)."""
    await until(lambda: user in harness.server.devices)


async def gone_from(harness: Harness, user: str) -> None:
    await until(lambda: user not in harness.server.devices)


async def barrier(zed: WireClient, watcher: WireClient) -> None:
    """zed (connected to the node whose pushes are watched, a member of a channel the
    watcher joined) sets a new status: once its push reached the watcher, every presence
    push that node queued before has reached it too."""
    status = f"mark-{next(marks)}"
    assert (await zed.request("presence", status=status))["t"] == "ok"
    with trio.fail_after(DELIVERY_TIMEOUT_S):
        await watcher.next(lambda f: f.get("t") == "presence" and f.get("status") == status)


async def query(client: WireClient, user: str) -> dict[str, Any] | None:
    reply = await client.request("presence", users=[user])
    assert reply["t"] == "ok", reply
    found = [e for e in reply["users"] if e["user"] == user]
    return found[0] if found else None


async def eventually(
    what: Callable[[], Any], timeout: float = DELIVERY_TIMEOUT_S, poll: float = 0.1
) -> Any:
    """Poll an async ``what`` until it returns something true (or the timeout): the
    last value."""
    value = None
    with trio.move_on_after(timeout):
        while True:
            value = await what()
            if value:
                return value
            await trio.sleep(poll)
    return value


async def typing_reaches(member: WireClient, user: str, send_on: Any) -> None:
    """Call ``send_on`` (it makes a typing `on` of ``user``'s) again until ``member``, on
    another node, gets one: that node subscribes to the channel's topic a moment after
    the join, and a signal published before is not delivered there (best effort)."""

    async def reached() -> bool:
        await send_on()
        with trio.move_on_after(0.3):
            await member.expect("typing", channel=CHANNEL, user=user, on=True)
            return True
        return False

    assert await eventually(reached, poll=0.0)


def typing_on(typer: WireClient) -> Any:
    async def send() -> None:
        assert (await typer.request("typing", channel=CHANNEL, on=True))["t"] == "ok"

    return send


@contextlib.asynccontextmanager
async def doomed_node(
    tmp_path: Path, engine: str, name: str, **env: str
) -> AsyncIterator[ServerProcess]:
    """A started ``tsmsg serve`` child on ``engine``, for the test to kill with SIGKILL
    (killed on the way out whatever happens)."""
    node = ServerProcess(tmp_path / name, tmp_path / f"{name}.log", "--engine", engine, env=env)
    try:
        await node.start()
        yield node
    finally:
        node.kill()


async def hello(
    port: int, user: str, owner: Harness, channels: tuple[str, ...] = ("*",)
) -> WireClient:
    """A client of a child node, closed with ``owner``'s clients (whatever happens)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = WireClient(stream)
    owner.clients.append(client)
    welcome = await client.request("hello", v=1, token=mint(user, channels))
    assert welcome["t"] == "welcome", welcome
    return client


# ---------------------------------------------------------------- presence: the model


def node_entries(admin: redis.Redis, user: str) -> int:
    """How many nodes hold an entry of ``user`` (its presence hash also holds the user's
    status, field ``s``: STORAGE.md, "Presence between nodes")."""
    return sum(1 for field in admin.hgetall(f"tsmsg:{{u:{user}}}:pres") if field != b"s")


async def test_a_second_device_on_another_node_does_not_reset_the_status(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13: "Another device connecting while one is connected changes
    nothing". Alice (node A) is "busy"; her second device connects to node B: carol
    must get no presence push for her, and a query must still say "busy"."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        carol, zed = await a.connect("carol"), await b.connect("zed")
        phone = await a.connect("alice")
        for c in (carol, zed, phone):
            await join(c)
        await members(a, ["carol", "zed", "alice"])
        assert (await phone.request("presence", status="busy"))["t"] == "ok"
        assert (await carol.next(presence_of("alice")))["status"] == "busy"

        await b.connect("alice")  # a second device, on the other node
        await on_node(b, "alice")
        await barrier(zed, carol)
        pushed = [f["status"] for f in taken(carol, presence_of("alice"))]
        assert pushed == [], f"a second device on another node pushed {pushed}"
        entry = await query(zed, "alice")  # asked on node B
        assert entry is not None and entry["status"] == "busy", entry


async def test_a_status_set_on_one_node_is_what_a_query_on_the_other_node_says(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13: presence is the user's, not a device's; docs/cluster.md:
    "Everything PROTOCOL.md promises holds across nodes". Alice has a device on each node
    and sets "away" on node A: a query answered by node B must say "away"."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        carol, phone = await b.connect("carol"), await a.connect("alice")
        for c in (carol, phone):
            await join(c)
        await members(a, ["carol", "alice"])
        laptop = await b.connect("alice")  # node B reads her memberships: room-1
        await on_node(b, "alice")
        assert (await phone.request("presence", status="away"))["t"] == "ok"
        assert (await carol.next(presence_of("alice")))["status"] == "away"
        entry = await query(carol, "alice")  # node B, which also has a device of alice
        assert entry is not None and (entry["status"], entry["online"]) == ("away", True), entry
        await laptop.aclose()


async def test_setting_online_again_from_the_users_device_on_the_other_node(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13: "a presence {status} from any of the user's devices replaces
    it" and "Each time a user's status changes (to a different string), the server
    pushes presence". Alice sets "away" on node A, then "online" on node B: carol must
    be told "online", and a query on node A must say "online"."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        carol, zed = await a.connect("carol"), await b.connect("zed")
        phone, laptop = await a.connect("alice"), await b.connect("alice")
        for c in (carol, zed, phone):
            await join(c)
        await members(a, ["carol", "zed", "alice"])
        await on_node(b, "alice")
        # Node B reads alice's memberships again at the notice of the join on node A, a
        # moment later (STORAGE.md, "Presence between nodes").
        await until(lambda: CHANNEL in b.server.memberships.get("alice", ()))
        assert (await phone.request("presence", status="away"))["t"] == "ok"
        assert (await carol.next(presence_of("alice")))["status"] == "away"
        reply = await laptop.request("presence", status="online")
        assert (reply["t"], reply.get("status")) == ("ok", "online"), reply
        await barrier(zed, carol)  # zed is on node B, as the change
        pushed = [f["status"] for f in taken(carol, presence_of("alice"))]
        assert pushed == ["online"], f"away -> online from node B pushed {pushed}"
        entry = await query(carol, "alice")
        assert entry is not None and entry["status"] == "online", entry


async def test_a_status_stays_when_its_device_leaves_and_another_node_has_one(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13: "the status a device set stays after that device disconnects as
    long as another is connected". Alice's laptop is on node B; her phone on node A sets
    "busy" and disconnects: no push, and she is still "busy"."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        carol, zed = await b.connect("carol"), await a.connect("zed")
        laptop = await b.connect("alice")
        for c in (carol, zed, laptop):
            await join(c)
        await members(a, ["carol", "zed", "alice"])
        phone = await a.connect("alice")
        await on_node(a, "alice")
        assert (await phone.request("presence", status="busy"))["t"] == "ok"
        assert (await carol.next(presence_of("alice")))["status"] == "busy"
        await phone.aclose()
        await gone_from(a, "alice")
        await barrier(zed, carol)  # zed is on node A, as the change
        pushed = [f["status"] for f in taken(carol, presence_of("alice"))]
        assert pushed == [], f"the phone leaving pushed {pushed}"
        entry = await query(zed, "alice")  # node A: no device of alice there now
        assert entry is not None and entry["status"] == "busy", entry


async def test_offline_set_while_connected_shows_no_last_seen_on_another_node(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13: "setting "offline" while connected makes the user appear offline
    (and without last_seen)"; `last_seen` "when the user is offline with no device
    connected". Alice, once disconnected (last_seen recorded), reconnects to node A and
    sets "offline": a query on node B must not carry last_seen."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        carol = await b.connect("carol")
        first = await a.connect("alice")
        for c in (carol, first):
            await join(c)
        await members(a, ["carol", "alice"])
        await first.aclose()
        assert (await carol.next(presence_of("alice")))["status"] == "offline"
        store = b.server.store
        await until(lambda: store.last_seen("alice") is not None)
        again = await a.connect("alice")
        assert (await carol.next(presence_of("alice")))["status"] == "online"
        assert (await again.request("presence", status="offline"))["t"] == "ok"
        assert (await carol.next(presence_of("alice")))["status"] == "offline"
        entry = await query(carol, "alice")
        assert entry is not None and entry["online"] is False, entry
        assert "last_seen" not in entry, f"connected, offline by choice, yet {entry}"


# ---------------------------------------------------------------- presence: memberships


async def test_a_join_on_one_node_counts_for_queries_on_the_users_other_node(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13: a query lists "the asked users who are members of a channel that
    the asker is a member of"; 6.2: membership is "shared by all the user's devices".
    Alice (a device on each node) joins room-2 on node A; carol, a member of room-2 on
    node B, asks about alice on node B."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        phone, _laptop = await a.connect("alice"), await b.connect("alice")
        await on_node(b, "alice")
        carol = await b.connect("carol")
        await join(carol, "room-2")
        await join(phone, "room-2")
        await members(a, ["carol", "alice"], "room-2")
        await until(lambda: "room-2" in b.server.memberships.get("alice", ()))  # a notice
        entry = await query(carol, "alice")
        assert entry is not None, "alice, a member of room-2 like carol, was left out"
        assert entry["status"] == "online", entry


async def test_a_status_change_reaches_a_channel_joined_on_the_users_other_node(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13: a status change is pushed "to every connection joined to any
    channel the user is a member of and the token of the device that made the change
    may read". Alice joins room-2 on node A, then sets "away" from her device on node B:
    carol (room-2) must be told."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        phone, laptop = await a.connect("alice"), await b.connect("alice")
        await on_node(b, "alice")
        carol, zed = await a.connect("carol"), await b.connect("zed")
        for c in (carol, zed, phone):
            await join(c, "room-2")
        await members(a, ["carol", "zed", "alice"], "room-2")
        # Node B learns of the membership A recorded by a notice through the engine, a
        # moment later (STORAGE.md, "Presence between nodes").
        await until(lambda: "room-2" in b.server.memberships.get("alice", ()))
        assert (await laptop.request("presence", status="away"))["t"] == "ok"
        await barrier(zed, carol)  # zed is on node B, as the change
        pushed = [f["status"] for f in taken(carol, presence_of("alice"))]
        assert pushed == ["away"], f"alice's change on node B pushed {pushed} to room-2"


async def test_a_join_after_a_forget_on_the_other_node_makes_a_member_again(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.3: after a `leave` with `forget`, "a later join there makes the user
    a member again"; 6.2: "A join also records, durably, that the user is a member".
    Alice forgets room-1 on node A, then joins it again on node B: she is a member."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        phone = await a.connect("alice")
        await join(phone)
        await members(a, ["alice"])
        laptop = await b.connect("alice")  # node B reads her memberships: room-1
        await on_node(b, "alice")
        reply = await phone.request("leave", channel=CHANNEL, forget=True)
        assert reply.get("forgotten") is True, reply
        assert CHANNEL not in a.server.store.channels_of("alice")
        await join(laptop)
        store = b.server.store
        with trio.move_on_after(5):
            await until(lambda: CHANNEL in store.channels_of("alice"))
        listed = [c["channel"] for c in (await laptop.request("channels"))["channels"]]
        assert CHANNEL in listed, f"joined on node B after the forget, yet channels: {listed}"


async def test_a_forget_on_one_node_ends_sharing_for_queries_on_the_other_node(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13: a query leaves out users who share no channel with the asker,
    "so a query reveals nothing about strangers"; `leave` with `forget` removes the
    membership "for all the user's devices". Alice forgets room-1 on node A; carol
    (room-1 only) asks about her on node B, where alice has another device."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        phone, carol = await a.connect("alice"), await b.connect("carol")
        for c in (carol, phone):
            await join(c)
        await members(a, ["carol", "alice"])
        await b.connect("alice")  # node B reads her memberships: room-1
        await on_node(b, "alice")
        reply = await phone.request("leave", channel=CHANNEL, forget=True)
        assert reply.get("forgotten") is True, reply
        assert CHANNEL not in b.server.store.channels_of("alice")
        await until(lambda: CHANNEL not in b.server.memberships.get("alice", ()))  # a notice
        entry = await query(carol, "alice")
        assert entry is None, f"alice shares no channel with carol any more, yet {entry}"


async def test_a_query_answers_nothing_about_users_sharing_no_channel_across_nodes(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13 (control): alice on node A is in room-1; dave on node B only in
    room-2: dave's query about alice (and about a user who does not exist) is empty,
    while carol (room-1, node B) sees alice."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        alice = await a.connect("alice")
        await join(alice)
        dave, carol = await b.connect("dave"), await b.connect("carol")
        await join(dave, "room-2")
        await join(carol)
        await members(a, ["alice", "carol"])
        await members(a, ["dave"], "room-2")
        reply = await dave.request("presence", users=["alice", "nobody", "dave"])
        assert [e["user"] for e in reply["users"]] == ["dave"], reply
        entry = await query(carol, "alice")
        assert entry is not None and entry["online"] is True, entry


async def test_a_presence_push_goes_only_to_channels_the_changing_token_may_read(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13 (control): alice is a member of room-1 and room-2; her device on
    node A has a token for room-1 only. Her status change reaches carol (room-1, node B)
    and not dave (room-2, node B)."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        first = await a.connect("alice")
        await join(first)
        await join(first, "room-2")
        dave, carol = await b.connect("dave"), await b.connect("carol")
        await join(dave, "room-2")
        await join(carol)
        await members(a, ["alice", "carol"])
        await members(a, ["alice", "dave"], "room-2")
        zed = await a.connect("zed")
        await join(zed, "room-2")
        await members(a, ["zed"], "room-2")
        narrow = await a.connect("alice", channels=("room-1",))
        assert (await narrow.request("presence", status="away"))["t"] == "ok"
        assert (await carol.next(presence_of("alice")))["status"] == "away"
        await barrier(zed, dave)
        assert taken(dave, presence_of("alice")) == []


# ---------------------------------------------------------------- presence: dead nodes


async def test_a_user_back_on_another_node_before_the_ttl_is_not_announced_offline(
    tmp_path: Path, redis_engine: str
) -> None:
    """STORAGE.md "Presence between nodes": a dead node's entry expires, and "for each user
    now offline everywhere" last_seen is written and offline announced. Alice's node is
    killed -9; she reconnects to node B before the TTL: she never goes offline (no push),
    and when she leaves B she is announced offline once, with last_seen."""
    async with nodes(tmp_path, redis_engine, 1, **SHORT_TTL) as (b,):
        carol = await b.connect("carol")
        await join(carol)
        async with doomed_node(
            tmp_path, redis_engine, "doomed", TSMSG_ENGINE_PRESENCE_TTL_S=str(TTL_S)
        ) as doomed:
            alice = await hello(doomed.port, "alice", b)
            await join(alice)
            await members(b, ["alice", "carol"])
            doomed.kill()
            taken(carol, presence_of("alice"))
            back = await b.connect("alice")
            await on_node(b, "alice")
            # Well past the TTL plus a refresh period: the dead node's entry was swept.
            store = b.server.store
            with redis.Redis.from_url(redis_engine) as admin:
                await until(lambda: node_entries(admin, "alice") == 1)
            assert taken(carol, presence_of("alice")) == []
            entry = await query(carol, "alice")
            assert entry is not None and entry["online"] is True, entry
            before = store.last_seen("alice")
            await back.aclose()
            gone = await carol.next(presence_of("alice"))
            assert gone["status"] == "offline"
            await until(lambda: store.last_seen("alice") != before)
            entry = await query(carol, "alice")
            assert entry is not None and entry["status"] == "offline" and "last_seen" in entry
            await alice.aclose()


async def test_a_status_set_on_a_dead_node_is_replaced_by_a_push_when_it_expires(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13: "Each time a user's status changes (to a different string), the
    server pushes presence"; STORAGE.md: the status across nodes is "the most recently
    set status among the entries not expired". Alice is "busy" on a node that is killed
    -9, and connected to node B too: when that entry expires, whatever the status becomes,
    a query and the pushes must agree (no silent change)."""
    async with nodes(tmp_path, redis_engine, 1, **SHORT_TTL) as (b,):
        carol = await b.connect("carol")
        await join(carol)
        laptop = await b.connect("alice")
        await join(laptop)
        await members(b, ["alice", "carol"])
        async with doomed_node(
            tmp_path, redis_engine, "doomed", TSMSG_ENGINE_PRESENCE_TTL_S=str(TTL_S)
        ) as doomed:
            phone = await hello(doomed.port, "alice", b)
            assert (await phone.request("presence", status="busy"))["t"] == "ok"
            assert (await carol.next(presence_of("alice")))["status"] == "busy"
            doomed.kill()
            with redis.Redis.from_url(redis_engine) as admin:
                await until(lambda: node_entries(admin, "alice") == 1)
            entry = await query(carol, "alice")
            assert entry is not None
            pushed = [f["status"] for f in taken(carol, presence_of("alice"))]
            last_told = pushed[-1] if pushed else "busy"
            assert entry["status"] == last_told, (
                f"a query says {entry['status']!r}, carol was last told {last_told!r}"
            )
            await phone.aclose()


async def test_a_dead_nodes_entry_expiring_announces_nothing_for_a_user_still_connected(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13: "A change that leaves the status as it was ... pushes nothing";
    "setting "offline" while connected makes the user appear offline (and without
    last_seen)"; STORAGE.md: a sweep records last_seen and announces offline "for each
    user now offline everywhere". Alice is connected to node B, where she set "offline"
    (after her phone connected to a node that is then killed -9): the phone's entry
    expiring changes nothing: no second "offline" push, no last_seen written."""
    async with nodes(tmp_path, redis_engine, 1, **SHORT_TTL) as (b,):
        carol = await b.connect("carol")
        await join(carol)
        laptop = await b.connect("alice")
        await join(laptop)
        await members(b, ["alice", "carol"])
        store, presence = b.server.store, b.server.store.presence
        swept: list[list[str]] = []  # the users each sweep returned as gone
        real_expired = presence.expired

        def spy(now_ms: int) -> list[tuple[str, str]]:
            out = real_expired(now_ms)
            swept.append([user for user, _ in out])
            return out

        presence.expired = spy  # type: ignore[method-assign]
        async with doomed_node(
            tmp_path, redis_engine, "doomed", TSMSG_ENGINE_PRESENCE_TTL_S=str(TTL_S)
        ) as doomed:
            await hello(doomed.port, "alice", b)
            with redis.Redis.from_url(redis_engine) as admin:
                await until(lambda: node_entries(admin, "alice") == 2)
                assert (await laptop.request("presence", status="offline"))["t"] == "ok"
                assert (await carol.next(presence_of("alice")))["status"] == "offline"
                before = store.last_seen("alice")
                doomed.kill()
                await until(lambda: node_entries(admin, "alice") == 1)
            calls = len(swept)
            await until(lambda: len(swept) > calls)  # the sweep that took it has returned
            announced = [users for users in swept if "alice" in users]
            if announced:
                with trio.move_on_after(DELIVERY_TIMEOUT_S):
                    await until(lambda: store.last_seen("alice") != before)
                with trio.move_on_after(2):  # pushed before last_seen's commit, if at all
                    carol.pending.append(await carol.next(presence_of("alice")))
            pushed = [f["status"] for f in taken(carol, presence_of("alice"))]
            assert not announced, (
                f"alice, connected to node B, was swept as offline: pushes {pushed}, "
                f"last_seen {before} -> {store.last_seen('alice')}"
            )


async def test_last_seen_is_not_written_while_the_user_is_connected_to_another_node(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13: "when the user's last device disconnects ... the server stores
    the time as the user's last_seen"; STORAGE.md: last_seen is "when the user's last
    connected device disconnected". Alice's phone (node A) leaves while her laptop (node
    B) stays: nothing is written as her last_seen."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        phone, _laptop = await a.connect("alice"), await b.connect("alice")
        zed = await a.connect("zed")
        await join(zed)
        await on_node(b, "alice")
        store = a.server.store
        assert store.last_seen("alice") is None
        await phone.aclose()
        await gone_from(a, "alice")
        await until(lambda: not a.server.presence_unwritten)
        # A write of node A after it: once acknowledged, node A's earlier writes are too.
        assert (await zed.request("send", channel=CHANNEL, cid="c1", text="x"))["t"] == "ok"
        assert store.last_seen("alice") is None, (
            "alice's phone left node A while her laptop is connected to node B, yet "
            f"last_seen was written: {store.last_seen('alice')}"
        )


async def test_a_sweep_racing_a_reconnect_elsewhere_never_leaves_the_user_offline(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13: a push each time the user's status changes; STORAGE.md: a sweep
    announces offline "for each user now offline everywhere", and last_seen is when the
    user's last device anywhere left. Alice's node is killed -9; a sweep (node B's or
    C's) takes its entry while she is connected nowhere, and before that sweep has
    pushed anything she reconnects to node B (online pushed). The sweep's offline,
    decided first, must not reach members after her online (leaving her offline to them
    while a query says online), nor write last_seen while she is connected."""
    async with nodes(tmp_path, redis_engine, 2, **SHORT_TTL) as (b, c):
        carol, dave = await c.connect("carol"), await b.connect("dave")
        zeds = {id(b): await b.connect("zed"), id(c): await c.connect("zed2")}
        for client in (carol, dave, *zeds.values()):
            await join(client)
        swept = threading.Event()  # a sweep took alice's entry (and waits)
        release = threading.Event()
        sweeper: list[Harness] = []
        rounds: dict[int, int] = {id(b): 0, id(c): 0}  # each node's sweeps so far
        for node in (b, c):
            real = node.server.store.presence.expired

            def spy(now_ms: int, real: Any = real, node: Harness = node) -> list[Any]:
                out = real(now_ms)
                rounds[id(node)] += 1
                if any(user == "alice" for user, *_ in out):
                    sweeper.append(node)
                    swept.set()
                    release.wait(30)  # the sweep's push comes after alice's reconnect
                return out

            node.server.store.presence.expired = spy  # type: ignore[method-assign]
        try:
            async with doomed_node(
                tmp_path, redis_engine, "doomed", TSMSG_ENGINE_PRESENCE_TTL_S=str(TTL_S)
            ) as doomed:
                alice = await hello(doomed.port, "alice", b)
                await join(alice)
                await members(b, ["alice", "carol", "dave"])
                doomed.kill()
                await until(swept.is_set, timeout=4 * TTL_S + 5)
                taken(carol, presence_of("alice"))
                taken(dave, presence_of("alice"))
                await b.connect("alice")
                for watcher in (carol, dave):  # she was offline in the engine: pushed
                    with trio.fail_after(DELIVERY_TIMEOUT_S):
                        got = await watcher.next(presence_of("alice"))
                    assert got["status"] == "online", got
                store = b.server.store
                seen = store.last_seen("alice")
                release.set()
                (node,) = sweeper
                calls = rounds[id(node)]
                await until(lambda: rounds[id(node)] > calls)  # the sweeper's round is over
                for watcher in (carol, dave):
                    await barrier(zeds[id(node)], watcher)
                late = {
                    name: [f["status"] for f in taken(w, presence_of("alice"))]
                    for name, w in (("carol", carol), ("dave", dave))
                }
                entry = await query(carol, "alice")
                assert entry is not None and entry["status"] == "online", entry
                assert late == {"carol": [], "dave": []}, (
                    f"alice is connected to node B, yet after her online the members were "
                    f"told {late} (the sweep of her dead node's entry, decided before)"
                )
                assert store.last_seen("alice") == seen, (
                    "last_seen written while alice is connected to node B"
                )
                await alice.aclose()
        finally:
            release.set()


# ---------------------------------------------------------------- presence: memberships kept right


class Held(list[tuple[str, dict[str, Any]]]):
    seen: list[dict[str, Any]]
    release: Callable[[], Any]


def hold_signals(harness: Harness, keep: Callable[[dict[str, Any]], bool]) -> Held:
    """Signals of other nodes that ``keep`` matches are held back (not handled) by
    ``harness``'s node and appended to the list returned; the others are handled, and
    recorded in the list's ``seen`` attribute (``release()`` handles the held ones)."""
    handle = harness.server._remote_signal
    held = Held()
    held.seen = []

    def hook(channel: str, frame: dict[str, Any]) -> None:
        if keep(frame):
            held.append((channel, frame))
        else:
            held.seen.append(dict(frame))
            handle(channel, frame)

    intercept(harness, signal=lambda hop, channel, frame: hop._soon(hook, channel, frame))
    held.release = lambda: [handle(c, f) for c, f in held]
    return held


def notice(t: str, user: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("t") == t and f.get("to") == user


async def left_out(carol: WireClient, user: str) -> bool:
    return await query(carol, user) is None


async def test_a_dropped_forget_notice_is_made_good_by_the_version_check(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.3/6.13: after a forget a query leaves out a user who shares no
    channel; STORAGE.md: notices are at most once (a full publish queue drops them). Node
    A drops its `unmember` notice of alice's forget; node B, where alice is connected too,
    must still learn of it (by its refresh's check of the set's version)."""
    async with nodes(tmp_path, redis_engine, 2, **SHORT_TTL) as (a, b):
        phone, carol = await a.connect("alice"), await b.connect("carol")
        for c in (carol, phone):
            await join(c)
        await members(a, ["carol", "alice"])
        await b.connect("alice")
        await until(lambda: CHANNEL in b.server.memberships.get("alice", ()))
        publish = a.server.store.publish_signal

        def lossy(channel: str, frame: dict[str, Any]) -> None:
            if frame.get("t") != "unmember":  # as if the queue were full
                publish(channel, frame)

        a.server.store.publish_signal = lossy  # type: ignore[method-assign]
        reply = await phone.request("leave", channel=CHANNEL, forget=True)
        assert reply.get("forgotten") is True, reply
        assert await eventually(lambda: left_out(carol, "alice"), timeout=4 * TTL_S + 2), (
            "alice forgot room-1 (its notice lost), yet node B still shares it with carol"
        )


async def test_notices_of_a_join_and_a_forget_arriving_reversed_leave_no_membership(
    tmp_path: Path, redis_engine: str
) -> None:
    """Notices of two membership changes may reach a node reversed (STORAGE.md:
    "Repeats and reordering are possible"). Alice joins room-2 then forgets it on node A;
    node B gets the `unmember` first, the `membership` after: alice is no member, and
    carol (room-2, on node B) must not be answered about her. The default TTL: no refresh
    comes to the rescue within the test."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        phone, carol = await a.connect("alice"), await b.connect("carol")
        await join(carol, "room-2")
        await b.connect("alice")
        await on_node(b, "alice")
        held = hold_signals(b, notice("membership", "alice"))
        await join(phone, "room-2")
        await members(a, ["alice", "carol"], "room-2")
        reply = await phone.request("leave", channel="room-2", forget=True)
        assert reply.get("forgotten") is True, reply
        await until(lambda: held and any(f.get("t") == "unmember" for f in held.seen))
        held.release()
        assert await eventually(lambda: left_out(carol, "alice")), (
            "alice forgot room-2 after joining it; node B, told in reverse order, "
            "still shares it with carol"
        )


def slow_first_read(harness: Harness, user: str) -> Any:
    """``harness``'s store answers the first read of ``user``'s memberships as it is,
    then waits for the returned event (set by the test) before handing it over."""
    import threading

    store, release = harness.server.store, threading.Event()
    first = [True]

    def wrap(name: str) -> None:
        real = getattr(store, name, None)
        if real is None:
            return

        def slow(users: Any, *args: Any, **kw: Any) -> Any:
            result = real(users, *args, **kw)
            if first[0] and user in ([users] if isinstance(users, str) else users):
                first[0] = False
                release.wait(10)
            return result

        setattr(store, name, slow)

    wrap("channels_of")
    wrap("memberships_versioned")
    return release


async def test_a_forget_while_the_users_first_device_is_being_read_is_not_missed(
    tmp_path: Path, redis_engine: str
) -> None:
    """A notice that reaches a node while its copy of the user's memberships is being
    read must not be lost: alice's laptop connects to node B, whose read of her
    memberships answers (room-1) but is slow to come back; meanwhile her phone forgets
    room-1 on node A and node B gets the notice. Carol (room-1, node B) must not be
    answered about alice."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        phone, carol = await a.connect("alice"), await b.connect("carol")
        for c in (carol, phone):
            await join(c)
        await members(a, ["carol", "alice"])
        release = slow_first_read(b, "alice")
        seen = hold_signals(b, lambda f: False).seen
        try:
            await b.connect("alice")
            reply = await phone.request("leave", channel=CHANNEL, forget=True)
            assert reply.get("forgotten") is True, reply
            await until(lambda: any(notice("unmember", "alice")(f) for f in seen))
        finally:
            release.set()
        await on_node(b, "alice")
        assert await eventually(lambda: left_out(carol, "alice")), (
            "alice forgot room-1 while node B read her memberships; it still shares it"
        )


async def test_a_forget_notice_lost_with_the_pubsub_connection_is_read_again(
    tmp_path: Path, redis_engine: str
) -> None:
    """docs/cluster.md: a node's pub/sub connection dropping loses nothing lasting.
    Node B misses the `unmember` of alice's forget (as if it came while its pub/sub
    connection was down); once re-subscribed it reads its users' memberships again.
    The default TTL: no refresh comes to the rescue within the test."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        phone, carol = await a.connect("alice"), await b.connect("carol")
        for c in (carol, phone):
            await join(c)
        await members(a, ["carol", "alice"])
        await b.connect("alice")
        await until(lambda: CHANNEL in b.server.memberships.get("alice", ()))
        dropped = hold_signals(b, notice("unmember", "alice"))
        reply = await phone.request("leave", channel=CHANNEL, forget=True)
        assert reply.get("forgotten") is True, reply
        await until(lambda: bool(dropped))
        with redis.Redis.from_url(redis_engine) as admin:
            assert admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub") >= 2
        assert await eventually(lambda: left_out(carol, "alice")), (
            "node B lost a notice with its pub/sub connection and still shares room-1 "
            "between alice and carol"
        )


async def test_the_first_devices_online_reaches_the_channels_once_its_memberships_are_read(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.13: when the user's first device completes hello the status becomes
    online, pushed to every connection joined to a channel the user is a member of.
    Node B fails to read alice's memberships at her hello (the engine away for that
    read): her online must reach carol (room-1) once they are read."""
    async with nodes(tmp_path, redis_engine, 1) as (b,):
        carol, first = await b.connect("carol"), await b.connect("alice")
        for c in (carol, first):
            await join(c)
        await members(b, ["carol", "alice"])
        await first.aclose()
        assert (await carol.next(presence_of("alice")))["status"] == "offline"
        store, failures = b.server.store, [2]

        def failing(name: str) -> None:
            real = getattr(store, name, None)
            if real is None:
                return

            def read(users: Any, *args: Any, **kw: Any) -> Any:
                if failures[0] and "alice" in ([users] if isinstance(users, str) else users):
                    failures[0] -= 1
                    raise StoreUnavailable("Redis at test: away for this read")
                return real(users, *args, **kw)

            setattr(store, name, read)

        failing("channels_of")
        failing("memberships_versioned")
        await b.connect("alice")
        try:
            online = await carol.next(presence_of("alice"))
        except trio.TooSlowError:
            pytest.fail("alice's first device connected; carol (room-1) was never told")
        assert online["status"] == "online", online


# ---------------------------------------------------------------- presence: Redis away


@contextlib.asynccontextmanager
async def carol_on_b_alice_on_a(
    tmp_path: Path,
) -> AsyncIterator[tuple[redis_servers.RedisServer, Harness, Harness, WireClient, WireClient]]:
    """A Redis of the test's own (to kill and start again), two nodes on it with a short
    presence TTL, carol on node B and alice on node A, both members of CHANNEL."""
    server = redis_servers.RedisServer(tmp_path / "redis").start()
    try:
        async with nodes(tmp_path, server.url, 2, **SHORT_TTL) as (a, b):
            carol, alice = await b.connect("carol"), await a.connect("alice")
            for c in (carol, alice):
                await join(c)
            await members(a, ["carol", "alice"])
            yield server, a, b, carol, alice
    finally:
        server.stop()


async def redis_back(server: redis_servers.RedisServer, *harnesses: Harness) -> None:
    """Start the killed Redis again; until every node says it is ready."""
    await trio.to_thread.run_sync(server.start)
    await until(lambda: all(h.server.readiness() is None for h in harnesses))


async def test_a_user_who_left_while_redis_was_down_is_offline_after_the_ttl(
    tmp_path: Path,
) -> None:
    """STORAGE.md "Presence between nodes": "When Redis is unreachable, a change is logged
    and not recorded; ... the entries of users who left meanwhile expire after the TTL
    (then announced offline)"; PROTOCOL.md 6.13: last_seen recorded."""
    async with carol_on_b_alice_on_a(tmp_path) as (server, a, b, carol, alice):
        await trio.to_thread.run_sync(server.kill)
        await alice.aclose()
        await gone_from(a, "alice")
        await until(lambda: not a.server.presence_unwritten)  # failed, logged
        await redis_back(server, a, b)
        with trio.fail_after(DELIVERY_TIMEOUT_S):
            gone = await carol.next(presence_of("alice"))
        assert gone["status"] == "offline"
        entry = await query(carol, "alice")
        assert entry is not None and entry["online"] is False, entry
        assert "last_seen" in entry, entry


async def test_a_device_that_connected_while_redis_was_down_counts_once_it_is_back(
    tmp_path: Path,
) -> None:
    """STORAGE.md "Presence between nodes": "When Redis is unreachable, a change is logged
    and not recorded; the next refresh restores the node's entries for the users still
    connected"; docs/cluster.md, Failure modes: "everything recovers by itself when Redis
    answers"; PROTOCOL.md 6.1: "A successful hello is the user's device connecting, for
    presence". Alice connects to node A while Redis is down and stays: once Redis is back,
    carol on node B must see her online."""
    async with carol_on_b_alice_on_a(tmp_path) as (server, a, b, carol, first):
        await first.aclose()
        assert (await carol.next(presence_of("alice")))["status"] == "offline"
        await trio.to_thread.run_sync(server.kill)
        alice = await a.connect("alice")  # the hello needs no Redis
        assert (await alice.request("ping"))["t"] == "pong"
        await redis_back(server, a, b)

        async def online() -> bool:
            entry = await query(carol, "alice")
            return entry is not None and entry["online"] is True

        assert await eventually(online, timeout=4 * TTL_S + 2), (
            "alice has been connected to node A since before Redis came back, "
            "yet a query on node B says she is not online"
        )
        assert (await alice.request("ping"))["t"] == "pong"


async def test_a_status_set_while_redis_was_down_is_the_status_once_it_is_back(
    tmp_path: Path,
) -> None:
    """PROTOCOL.md 6.13: "a presence {status} from any of the user's devices replaces"
    the status, and the `ok` says it was set; STORAGE.md: "the next refresh restores the
    node's entries for the users still connected". Alice sets "away" on node A while
    Redis is down: once it is back, a query on node B must say "away" (not "online"),
    and the last push carol got must agree."""
    async with carol_on_b_alice_on_a(tmp_path) as (server, a, b, carol, alice):
        await trio.to_thread.run_sync(server.kill)
        assert (await alice.request("presence", status="away"))["t"] == "ok"
        await until(lambda: not a.server.presence_unwritten)  # failed, logged
        await redis_back(server, a, b)

        async def away() -> bool:
            entry = await query(carol, "alice")
            return entry is not None and entry["status"] == "away"

        assert await eventually(away, timeout=4 * TTL_S + 2), (
            f"alice set 'away' while Redis was down; now {await query(carol, 'alice')}"
        )
        pushed = [f["status"] for f in taken(carol, presence_of("alice"))]
        assert not pushed or pushed[-1] == "away", pushed


async def test_presence_typing_and_reads_flow_again_after_client_kill_pubsub(
    tmp_path: Path, redis_engine: str
) -> None:
    """docs/cluster.md, Failure modes: a node's pub/sub connection dropping (`CLIENT KILL
    TYPE pubsub`) costs nothing lasting: once re-subscribed, presence, typing and read
    pushes cross nodes again (signals in the gap are best effort)."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        alice, bob = await a.connect("alice"), await b.connect("bob")
        for c in (alice, bob):
            await join(c)
        await members(a, ["alice", "bob"])
        sent = await alice.request("send", channel=CHANNEL, cid="c1", text="hi")
        await collect(bob, 1)
        with redis.Redis.from_url(redis_engine) as admin:
            killed = admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert killed >= 2

        await typing_reaches(bob, "alice", typing_on(alice))  # until both subscribed again
        assert (await alice.request("typing", channel=CHANNEL, on=False))["t"] == "ok"
        off = await bob.expect("typing", channel=CHANNEL, user="alice", on=False)
        assert off["on"] is False
        assert (await bob.request("read", channel=CHANNEL, seq=sent["seq"]))["t"] == "ok"
        receipt = await alice.expect("read", channel=CHANNEL, user="bob")
        assert receipt["seq"] == sent["seq"]
        assert (await alice.request("presence", status="away"))["t"] == "ok"
        assert (await bob.next(presence_of("alice")))["status"] == "away"


async def test_presence_is_pushed_after_redis_lost_its_data(
    tmp_path: Path, redis_engine: str
) -> None:
    """A FLUSHALL takes the users' presence orders with it: the next change of alice's
    must still reach carol on the other node (found by review: the counter started again
    at 1, below the order both nodes remembered, and every change of hers was dropped
    there and here for good)."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        alice, carol = await a.connect("alice"), await b.connect("carol")
        for c in (alice, carol):
            await join(c)
        await members(a, ["alice", "carol"])
        await until(lambda: CHANNEL in a.server.memberships.get("alice", ()))
        for status in ("s1", "s2", "s3"):
            assert (await alice.request("presence", status=status))["t"] == "ok"
            with trio.fail_after(10):
                await carol.next(lambda f, s=status: f.get("t") == "presence" and f["status"] == s)
        admin = redis.Redis.from_url(redis_engine)
        await trio.to_thread.run_sync(admin.flushall)
        for c in (alice, carol):  # memberships were lost with the data: joined again
            await join(c, "room-2")
        await members(a, ["alice", "carol"], "room-2")
        await until(lambda: "room-2" in a.server.memberships.get("alice", ()))
        assert (await alice.request("presence", status="away"))["t"] == "ok"
        with trio.fail_after(10):
            await carol.next(lambda f: f.get("t") == "presence" and f["status"] == "away")


# ---------------------------------------------------------------- typing


async def test_typing_expires_for_members_on_another_node(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.10: "when the timer runs out, the server pushes on: false"; and not
    to the typer's own devices (on any node)."""
    limits = fast_limits(typing_timeout_ms=500)
    async with nodes(tmp_path, redis_engine, 2, limits=limits) as (a, b):
        alice, bob, alice2 = (
            await a.connect("alice"),
            await b.connect("bob"),
            await b.connect("alice"),
        )
        for c in (alice, bob, alice2):
            await join(c)
        await typing_reaches(bob, "alice", typing_on(alice))
        off = await bob.expect("typing", channel=CHANNEL, user="alice", on=False)
        assert off["on"] is False
        # alice's own device on node B got neither; a later event shows the order.
        assert (await alice.request("send", channel=CHANNEL, cid="x", text="x"))["t"] == "ok"
        await collect(alice2, 1)
        assert [f for f in alice2.pending if f.get("t") == "typing"] == []


async def test_typing_stops_when_the_typers_connection_closes_on_another_node(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.10: "when the connection closes, for whatever reason, the server
    pushes on: false for every channel where it was on" (the typer on node A, the
    member on node B; a long timeout, so it is not the expiry)."""
    limits = fast_limits(typing_timeout_ms=600_000)
    async with nodes(tmp_path, redis_engine, 2, limits=limits) as (a, b):
        alice, bob = await a.connect("alice"), await b.connect("bob")
        for c in (alice, bob):
            await join(c)
        await typing_reaches(bob, "alice", typing_on(alice))
        await alice.aclose()
        off = await bob.expect("typing", channel=CHANNEL, user="alice", on=False)
        assert off["on"] is False


@pytest.mark.parametrize("b_timeout_ms", [800, 600_000])
async def test_typing_of_a_node_killed_mid_typing_is_turned_off(
    tmp_path: Path, redis_engine: str, b_timeout_ms: int
) -> None:
    """PROTOCOL.md 6.10: "when the timer runs out, the server pushes on: false" and "when
    the connection closes, for whatever reason, the server pushes on: false";
    docs/cluster.md: "Everything PROTOCOL.md promises holds across nodes: ... typing".
    Alice types on a node that is killed -9: bob on node B must get on: false (at the
    latest once typing_timeout_ms has passed): the typer's node's, however node B is set
    (before, a node B set to 10 minutes kept alice typing for 10 minutes)."""
    timeout_ms = 800
    async with nodes(
        tmp_path, redis_engine, 1, limits=fast_limits(typing_timeout_ms=b_timeout_ms)
    ) as (b,):
        bob = await b.connect("bob")
        await join(bob)
        async with doomed_node(
            tmp_path, redis_engine, "doomed", TSMSG_LIMITS_TYPING_TIMEOUT_MS=str(timeout_ms)
        ) as doomed:
            alice = await hello(doomed.port, "alice", b)
            await join(alice)
            await typing_reaches(bob, "alice", typing_on(alice))
            doomed.kill()
            off = None
            with trio.move_on_after(timeout_ms / 1000 + 8):
                while off is None:
                    try:
                        off = await bob.expect("typing", channel=CHANNEL, user="alice", on=False)
                    except trio.TooSlowError:  # one wait of the client's: wait again
                        pass
            assert off is not None and off["on"] is False, (
                "alice's node died mid-typing; bob never got on: false"
            )
            await alice.aclose()


async def test_a_late_off_from_the_typers_node_is_not_pushed_twice(
    tmp_path: Path, redis_engine: str
) -> None:
    """A typer's node that sends its `off` after the other nodes timed its `on` out (it
    stalled past the grace) does not make them push a second `off`."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        bob = await b.connect("bob")
        await join(bob)
        alice = await a.connect("alice")
        await join(alice)
        on = {"t": "typing", "channel": CHANNEL, "user": "alice", "on": True}

        async def publish_on() -> None:  # as node A would, with a short timeout of its own
            a.server.store.publish_signal(CHANNEL, {**on, "timeout_ms": 50})

        await typing_reaches(bob, "alice", publish_on)
        off = await bob.expect("typing", channel=CHANNEL, user="alice", on=False)  # on B
        assert off["on"] is False
        a.server.store.publish_signal(CHANNEL, {**on, "on": False})  # node A's, late
        assert (await alice.request("send", channel=CHANNEL, cid="x", text="x"))["t"] == "ok"
        await collect(bob, 1)  # after the late off, had it been pushed
        assert [f for f in bob.pending if f.get("t") == "typing" and not f["on"]] == []


# ---------------------------------------------------------------- read receipts


async def test_a_read_reaches_the_readers_other_device_and_counts_on_every_node(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.9: "a read push goes to every connection joined to the channel: this
    one, the user's other devices and the other users"; 6.14/6.15: unread counts after
    the cursor, asked on another node; 6.9: a cursor never moves back, and a read that
    does not move it pushes nothing."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        alice, bob_phone, bob_laptop = (
            await a.connect("alice"), await a.connect("bob"), await b.connect("bob"),
        )  # fmt: skip
        for c in (alice, bob_phone, bob_laptop):
            await join(c)
        seqs = []
        for i in range(3):
            reply = await alice.request("send", channel=CHANNEL, cid=f"c{i}", text="x")
            seqs.append(reply["seq"])
        await collect(bob_laptop, 3)
        unread = await bob_laptop.request("unread", channels=[CHANNEL])
        assert unread["unread"] == {CHANNEL: 3}, unread
        assert (await bob_phone.request("read", channel=CHANNEL, seq=seqs[1]))["t"] == "ok"
        receipt = await bob_laptop.expect("read", channel=CHANNEL, user="bob")
        assert receipt["seq"] == seqs[1]
        unread = await bob_laptop.request("unread", channels=[CHANNEL])
        assert unread["unread"] == {CHANNEL: 1}, unread
        listed = (await bob_laptop.request("channels"))["channels"]
        assert [(c["channel"], c["read"], c["unread"]) for c in listed] == [(CHANNEL, seqs[1], 1)]
        # Backwards: no move, no push (the next push seen is the next forward move).
        back = await bob_laptop.request("read", channel=CHANNEL, seq=seqs[0])
        assert back["seq"] == seqs[1], back
        assert (await bob_laptop.request("read", channel=CHANNEL, seq=10**6))["seq"] == seqs[2]
        pushed = await alice.expect("read", channel=CHANNEL, user="bob")
        assert pushed["seq"] == seqs[1]
        pushed = await alice.expect("read", channel=CHANNEL, user="bob")
        assert pushed["seq"] == seqs[2], f"a read that did not move pushed {pushed}"
        joined = await join(await a.connect("bob"))
        assert joined["read"] == seqs[2]


# ---------------------------------------------------------------- memberships


async def test_a_dm_reaches_the_peers_devices_on_the_other_node(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 6.15: on the first message in a DM, the peer becomes a member and
    `membership` is pushed "to every connected device of the peer, on any node", after
    the commit (a sync right after it finds the message); 7.12 `by` is the sender. The
    peer's presence then reaches the sender through the DM."""
    async with nodes(tmp_path, redis_engine, 3) as (a, b, c):
        alice = await a.connect("alice")
        bob_b, bob_c = await b.connect("bob"), await c.connect("bob")
        await on_node(b, "bob")
        await on_node(c, "bob")
        dm = "dm:alice:bob"
        await join(alice, dm)
        sent = await alice.request("send", channel=dm, cid="hi", text="hello bob")
        assert sent["t"] == "ok", sent
        for bob in (bob_b, bob_c):
            push = await bob.expect("membership", channel=dm)
            assert push["by"] == "alice", push
            page = await bob.request("sync", channel=dm, since=0)
            assert [e["seq"] for e in page["events"]] == [sent["seq"]]
            listed = [ch["channel"] for ch in (await bob.request("channels"))["channels"]]
            assert dm in listed
        # bob's node B knows the DM now: his status change reaches alice through it.
        assert (await bob_b.request("presence", status="away"))["t"] == "ok"
        assert (await alice.next(presence_of("bob")))["status"] == "away"


async def test_a_join_pushes_membership_to_the_users_devices_on_other_nodes(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 7.12: `membership` is "Sent to every connected device of the user, on
    every node, when a membership is recorded that was not there before (every device:
    the joining one too)"; a second join records nothing new and pushes nothing."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        phone, laptop = await a.connect("alice"), await b.connect("alice")
        await on_node(b, "alice")
        await join(phone, "room-9")
        for dev in (phone, laptop):
            push = await dev.expect("membership", channel="room-9")
            assert push["by"] == "alice"
        await join(laptop, "room-9")  # not new: nothing to push
        await join(laptop, "room-10")  # new, from the same node's writer: the barrier
        await laptop.expect("membership", channel="room-10")
        await phone.expect("membership", channel="room-10")
        assert [f for f in laptop.pending if f.get("t") == "membership"] == []


# ---------------------------------------------------------------- shared send limits


async def test_the_per_channel_send_budget_is_shared_by_the_nodes(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 16.2: the per-(user, channel) bucket is counted "for all of them
    together"; a refusal is `rate_limited` with `retry_after_ms`, nothing stored; and "a
    refused request takes none" (the per-user bucket still pays room-2)."""
    limits = fast_limits(
        send_rate=0.01, send_burst=100, channel_send_rate=0.5, channel_send_burst=3
    )
    async with nodes(tmp_path, redis_engine, 2, limits=limits) as (a, b):
        on_a, on_b = await a.connect("alice"), await b.connect("alice")
        oks = []
        for i, dev in enumerate((on_a, on_b, on_a)):
            oks.append(await dev.request("send", channel=CHANNEL, cid=f"c{i}", text="x"))
        assert [r["t"] for r in oks] == ["ok"] * 3, oks
        for i, dev in enumerate((on_b, on_a)):
            r = await dev.request("send", channel=CHANNEL, cid=f"late{i}", text="x")
            assert (r["t"], r.get("code")) == ("error", "rate_limited"), r
            assert 1 <= r["retry_after_ms"] <= 2000, r
        edit = await on_b.request("edit", channel=CHANNEL, id=oks[0]["id"], text="y")
        assert (edit["t"], edit.get("code")) == ("error", "rate_limited"), edit
        other = await on_b.request("send", channel="room-2", cid="o", text="x")
        assert other["t"] == "ok", other
        page = await on_a.request("sync", channel=CHANNEL, since=0)
        assert [(e["seq"], e["kind"]) for e in page["events"]] == [
            (1, "message"), (2, "message"), (3, "message")
        ]  # fmt: skip


async def test_the_per_user_send_budget_is_shared_across_channels_and_nodes(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 16.2: the per-user bucket counts `send`, `edit`, `delete` "in any
    channel", shared by the nodes: sends on node A and deletes on node B spend one
    budget; the refused delete leaves its message in place."""
    limits = fast_limits(
        send_rate=0.01, send_burst=4, channel_send_rate=100.0, channel_send_burst=100
    )
    async with nodes(tmp_path, redis_engine, 2, limits=limits) as (a, b):
        on_a, on_b = await a.connect("alice"), await b.connect("alice")
        first = await on_a.request("send", channel="room-1", cid="a", text="x")
        second = await on_a.request("send", channel="room-2", cid="b", text="x")
        assert (first["t"], second["t"]) == ("ok", "ok")
        d = await on_b.request("delete", channel="room-1", id=first["id"])
        assert d["t"] == "ok", d
        e = await on_b.request("edit", channel="room-2", id=second["id"], text="y")
        assert e["t"] == "ok", e
        refused = await on_b.request("delete", channel="room-2", id=second["id"])
        assert (refused["t"], refused.get("code")) == ("error", "rate_limited"), refused
        assert refused["retry_after_ms"] >= 1
        refused = await on_a.request("send", channel="room-3", cid="c", text="x")
        assert (refused["t"], refused.get("code")) == ("error", "rate_limited"), refused
        history = await on_a.request("history", channel="room-2")
        assert [m.get("deleted", False) for m in history["messages"]] == [False]
        assert (await on_a.request("sync", channel="room-3", since=0))["events"] == []


async def test_a_refused_send_resent_with_its_cid_after_retry_after_ms_is_stored_once(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 16: `retry_after_ms` is "the time until that bucket has a token
    again"; a resend with the original cid is then accepted and stored once, whichever
    node it goes through."""
    limits = fast_limits(send_rate=4.0, send_burst=2, channel_send_rate=100.0)
    async with nodes(tmp_path, redis_engine, 2, limits=limits) as (a, b):
        on_a, on_b = await a.connect("alice"), await b.connect("alice")
        for i, dev in enumerate((on_a, on_b)):
            assert (await dev.request("send", channel=CHANNEL, cid=f"c{i}", text="x"))["t"] == "ok"
        refused = await on_a.request("send", channel=CHANNEL, cid="late", text="late")
        assert refused.get("code") == "rate_limited", refused
        await trio.sleep(refused["retry_after_ms"] / 1000 + 0.05)
        again = await on_b.request("send", channel=CHANNEL, cid="late", text="late")
        assert again["t"] == "ok" and again.get("dup") is False, again
        page = await on_a.request("sync", channel=CHANNEL, since=0)
        assert [e["text"] for e in page["events"]].count("late") == 1


async def test_concurrent_pipelined_sends_on_two_nodes_never_exceed_one_burst(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 16.2: "the connections of one user to different servers spend one
    budget": 3 nodes, each pipelining 10 sends at once; with a burst of 6 and a refill
    that is negligible over the test, at most 6 (+ the refill) are stored, and each
    refusal carries retry_after_ms."""
    limits = fast_limits(send_rate=0.01, send_burst=6, channel_send_rate=0.01, channel_send_burst=6)
    async with nodes(tmp_path, redis_engine, 3, limits=limits) as harnesses:
        devices = [await h.connect("alice") for h in harnesses]
        replies: list[dict[str, Any]] = []

        async def burst(i: int, dev: WireClient) -> None:
            rids = []
            for j in range(10):
                rid = 1000 + j
                rids.append(rid)
                frame = {"t": "send", "rid": rid, "channel": CHANNEL, "cid": f"{i}-{j}"}
                await dev.send({**frame, "text": "x"})
            for rid in rids:
                replies.append(await dev.next(lambda f, rid=rid: f.get("rid") == rid))

        start = time.monotonic()
        async with trio.open_nursery() as nursery:
            for i, dev in enumerate(devices):
                nursery.start_soon(burst, i, dev)
        elapsed = time.monotonic() - start
        oks = [r for r in replies if r["t"] == "ok"]
        refused = [r for r in replies if r["t"] == "error"]
        assert all(r["code"] == "rate_limited" and r["retry_after_ms"] >= 1 for r in refused)
        assert len(oks) <= 6 + int(0.01 * elapsed), f"{len(oks)} sends stored, burst 6"
        page = await devices[0].request("sync", channel=CHANNEL, since=0)
        assert len(page["events"]) == len(oks)


# ---------------------------------------------------------------- on a Redis Cluster


async def test_signals_and_shared_limits_cross_nodes_on_a_redis_cluster(
    tmp_path: Path, redis_cluster: redis_servers.RedisCluster
) -> None:
    """docs/cluster.md: on a Redis Cluster (sharded pub/sub; presence on its own topic,
    the user's buckets in the user's slot) presence, typing, reads, the DM membership
    push and the shared send budget cross nodes as on one Redis. Users of their own
    (the cluster is shared by the session's tests)."""
    tag = f"x{next(marks)}{int(time.time() * 1000) % 100000}"
    ann, ben = f"ann{tag}", f"ben{tag}"
    room = f"room-{tag}"
    limits = fast_limits(send_rate=0.01, send_burst=3, channel_send_rate=0.01, channel_send_burst=3)
    async with nodes(tmp_path, redis_cluster.url, 2, limits=limits) as (a, b):
        ann_a, ann_b, ben_b = await a.connect(ann), await b.connect(ann), await b.connect(ben)
        for c in (ann_a, ben_b):
            await join(c, room)
        await members(a, [ann, ben], room)
        # the shared budget: 3 in all, on two nodes
        replies = [
            await dev.request("send", channel=room, cid=f"c{i}", text="x")
            for i, dev in enumerate((ann_a, ann_b, ann_a, ann_b))
        ]
        assert [r["t"] for r in replies] == ["ok", "ok", "ok", "error"], replies
        assert replies[3]["code"] == "rate_limited" and replies[3]["retry_after_ms"] >= 1
        await collect(ben_b, 3, room)
        # typing and read receipts
        assert (await ann_a.request("typing", channel=room, on=True))["t"] == "ok"
        assert (await ben_b.expect("typing", channel=room, user=ann))["on"] is True
        assert (await ben_b.request("read", channel=room, seq=3))["t"] == "ok"
        assert (await ann_a.expect("read", channel=room, user=ben))["seq"] == 3
        # presence: ben (node B only) leaves; ann on node A is told
        await ben_b.aclose()
        assert (await ann_a.next(presence_of(ben)))["status"] == "offline"
        # a DM from ben's new device on node B reaches ann's devices on both nodes
        ben_again = await b.connect(ben)
        dm = f"dm:{ann}:{ben}"
        sent = await ben_again.request("send", channel=dm, cid="dm1", text="hi")
        assert sent["t"] == "ok", sent
        for dev in (ann_a, ann_b):
            push = await dev.expect("membership", channel=dm)
            assert push["by"] == ben, push


# ---------------------------------------------------------------- fan-out: gap reads


async def test_a_gap_read_does_not_push_the_senders_event_before_its_ok(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 9, rule 6. Alice (node B) sends: Redis commits seq 2, and node B's
    writer hands the batch over to the loop late (a WAIT for replicas, a busy loop: here
    held back). Meanwhile sam (node A) writes seq 3; its event reaches B, whose relay reads
    the gap (seq 2) from the log after GAP_WAIT_MS and pushed alice's own event to her
    connection before her `ok`, which was only queued when the batch was handed over."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        alice, sam = await b.connect("alice"), await a.connect("sam")
        await join(alice)
        await members(b, ["alice"])
        first = await sam.request("send", channel=CHANNEL, cid="s0", text="x")
        [seen] = await collect(alice, 1)  # B follows the channel, pub/sub confirmed
        assert seen["seq"] == first["seq"] == 1
        server, stash = b.server, []
        store = server.store
        assert isinstance(store, RedisStore)
        real = store._notify  # the writer thread's hand-over of a batch
        store._notify = stash.append  # held back, for the loop to handle below
        try:
            await alice.send({"t": "send", "rid": 99, "channel": CHANNEL, "cid": "a1", "text": "y"})
            await until(lambda: a.server.store.channel(CHANNEL).head == 2)
            assert (await sam.request("send", channel=CHANNEL, cid="s1", text="z"))["seq"] == 3
            early = None
            with trio.move_on_after(1.0):  # the gap read is due after GAP_WAIT_MS
                early = await alice.next(lambda f: f.get("t") == "event" and f["seq"] == 2)
            assert early is None, "alice's own event was pushed before her ok"
        finally:
            store._notify = real
            for batch in stash:
                server.on_batch(batch)
        order = []
        with trio.fail_after(DELIVERY_TIMEOUT_S):
            while len(order) < 2:
                f = await alice.next(lambda f: f.get("rid") == 99 or f.get("seq") == 2)
                order.append("ok" if f.get("rid") == 99 else "event")
        assert order == ["ok", "event"], "alice's own event was pushed before her ok"


async def test_a_slow_consumer_cut_while_redis_is_away_does_not_stop_the_node(
    tmp_path: Path, redis_engine: str
) -> None:
    """A member on node B reads nothing while node A's sender floods the channel: B cuts
    its live stream (section 14), and the `resync` push was made from a read of the
    channel's head in Redis, on the event loop, while the relay's delivery ran. Redis
    unreachable at that moment (here: that read fails as it then does) raised
    StoreUnavailable out of the pub/sub hand-over and ended node B."""
    from test_server_fanout import FLOOD_TEXT, QUEUE_LIMIT, connect_small_buffer

    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(
            running_server(make_settings(tmp_path / "a", engine=redis_engine))
        )
        b = await stack.enter_async_context(
            running_server(
                make_settings(tmp_path / "b", engine=redis_engine, max_queue_bytes=QUEUE_LIMIT)
            )
        )
        slow, other = await connect_small_buffer(b, "slow"), await b.connect("bob")
        await join(slow)
        await join(other)
        sender = await a.connect("alice")
        first = await sender.request("send", channel=CHANNEL, cid="w", text="warm")
        await collect(other, 1)  # B's subscription is confirmed
        assert first["seq"] == 1

        def away(name: str) -> Any:
            raise StoreUnavailable("Redis connection refused")

        b.server.store.channel = away  # type: ignore[method-assign]
        text = "x" * FLOOD_TEXT
        events: list[dict[str, Any]] = []

        async def receive() -> None:
            events.extend(await collect(other, 64))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)  # node B still serves its other member
            for k in range(64):  # 256 KiB: past B's queue bound and the slow one's buffers
                reply = await sender.request("send", channel=CHANNEL, cid=f"f{k}", text=text)
                assert reply["t"] == "ok", reply
        assert [e["seq"] for e in events] == list(range(2, 66))
        # and the slow one is told to sync
        with trio.fail_after(DELIVERY_TIMEOUT_S):
            cut = await slow.next(lambda f: f.get("t") == "resync")
        assert cut["reason"] == "cut", cut


async def test_a_node_whose_clock_is_ahead_does_not_refill_the_shared_budget(
    tmp_path: Path, redis_engine: str
) -> None:
    """docs/cluster.md: nodes' clocks agree "well within the TTL" (NTP), not exactly;
    PROTOCOL.md 16.2: the user's devices on different servers "spend one budget". Node
    A's clock 2 s ahead of B's: a bucket stamped by A and then charged by B must not go
    back to B's clock (A's next charge would refill the 2 s again): alternating sends
    between the nodes got each node's whole burst, the shared limit doubled. The skew
    may give its refill (2 s at 0.5/s: one token) once, not at every switch of node."""
    limits = fast_limits(
        send_rate=100.0, send_burst=100, channel_send_rate=0.5, channel_send_burst=3
    )
    async with nodes(tmp_path, redis_engine, 2, limits=limits) as (a, b):
        store = a.server.store
        ahead = store._clock
        store._clock = lambda: ahead() + 2000  # type: ignore[method-assign]
        on_a, on_b = await a.connect("alice"), await b.connect("alice")
        start = time.monotonic()
        oks = 0
        for i in range(8):
            dev = (on_b, on_a)[i % 2]
            r = await dev.request("send", channel=CHANNEL, cid=f"c{i}", text="x")
            oks += r["t"] == "ok"
        # the refill over the test, and once the skew's (A's first charge after B's)
        refill = 0.5 * (time.monotonic() - start) + 0.5 * 2.0
        assert oks <= 3 + int(refill), f"{oks} sends stored, one shared burst of 3"


async def test_read_pushes_of_two_nodes_published_reversed_never_move_a_cursor_back(
    tmp_path: Path, redis_engine: str
) -> None:
    """PROTOCOL.md 7.6: a `read` push carries "the new cursor", sent "when a user's read
    cursor moves forward". Bob's phone (node A) reads 1, then bob's laptop (node B)
    reads 2; A's writer is slow to publish (a stall between its commit and its publish):
    carol, on node C, got read 2 then read 1, the cursor going back (it is 2)."""
    async with nodes(tmp_path, redis_engine, 3) as (a, b, c):
        alice, phone, laptop, carol = (
            await a.connect("alice"), await a.connect("bob"), await b.connect("bob"),
            await c.connect("carol"),
        )  # fmt: skip
        for client in (alice, phone, laptop, carol):
            await join(client)
        for i in range(2):
            sent = await alice.request("send", channel=CHANNEL, cid=f"c{i}", text="x")
            assert sent["t"] == "ok", sent
        await collect(carol, 2)
        store, stalled = a.server.store, trio.Event()
        real_ack = store._ack

        def slow_ack(batch: Any) -> None:
            if any(op.kind == "read" for op in batch):
                trio.from_thread.run_sync(stalled.set, trio_token=token)
                time.sleep(0.5)  # A's writer stalls before its publish
            real_ack(batch)

        token = trio.lowlevel.current_trio_token()
        store._ack = slow_ack  # type: ignore[method-assign]
        await phone.send({"t": "read", "rid": 7, "channel": CHANNEL, "seq": 1})
        await stalled.wait()
        assert (await laptop.request("read", channel=CHANNEL, seq=2))["seq"] == 2
        assert (await phone.next(lambda f: f.get("rid") == 7))["seq"] == 1
        await trio.sleep(0.3)
        seen = []
        with trio.move_on_after(1.0):
            while True:
                f = await carol.next(lambda f: f.get("t") == "read")
                seen.append(f["seq"])
        assert seen == sorted(seen) and seen[-1] == 2, f"carol's read pushes: {seen}"
