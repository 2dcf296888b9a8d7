"""Issue 19, item 1: a DM is never invisible to its recipient (PROTOCOL.md 6.15, 7.12).

Over real TCP with the real server, on LMDB and on Redis, and across two nodes of one
Redis engine: the first message of a DM makes the peer a member and pushes `membership`
to every device of the peer; `channels` lists the user's channels and DMs with head, read
cursor and unread count, in pages; the bounds (`max_memberships`, `unread_scan_max`)
hold; and the Python client exposes both.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

import redis_servers
from conftest import SECRET, Harness, WireClient, fast_limits, make_settings, mint, running_server
from tsmsg.client import ChannelSummary, Membership, connect
from tsmsg.server.settings import Settings
from tsmsg.store import WriteOp

QUIET_S = 0.3  # how long "no push came" is watched for (a push takes ~1 ms)


async def dm(sender: WireClient, peer: str, me: str, text: str, cid: str) -> dict[str, Any]:
    channel = f"dm:{min(me, peer)}:{max(me, peer)}"
    ok = await sender.request("send", channel=channel, cid=cid, text=text)
    assert ok["t"] == "ok", ok
    return ok


async def no_frame(client: WireClient, t: str) -> bool:
    with trio.move_on_after(QUIET_S):
        await client.expect(t)
        return False
    return True


async def test_a_dm_is_pushed_to_every_device_of_its_recipient_and_listed(
    engine_settings: Settings,
) -> None:
    async with running_server(engine_settings) as h:
        alice = await h.connect("alice", ["room-*"])
        phone, laptop = await h.connect("bob", ["room-*"]), await h.connect("bob", ["room-*"])
        assert (await phone.request("join", channel="room-1"))["t"] == "ok"  # elsewhere
        for device in (phone, laptop):  # bob's own join: every device of his is told
            assert await device.expect("membership", channel="room-1", by="bob")
        assert (await alice.request("join", channel="dm:alice:bob"))["t"] == "ok"  # as /dm does
        await alice.expect("membership", channel="dm:alice:bob", by="alice")

        ok = await dm(alice, "bob", "alice", "hi bob", "a-1")
        for device in (phone, laptop):
            push = await device.expect("membership")
            assert push == {"t": "membership", "channel": "dm:alice:bob", "by": "alice"}
        # The message is there when the push comes: the recipient can open it at once.
        page = await laptop.request("history", channel="dm:alice:bob")
        assert [m["text"] for m in page["messages"]] == ["hi bob"]
        assert page["messages"][0]["seq"] == ok["seq"]

        # A second message: bob is a member already, nothing more is pushed.
        await dm(alice, "bob", "alice", "still there?", "a-2")
        assert await no_frame(phone, "membership")

        listing = await phone.request("channels")
        assert listing["t"] == "ok" and listing["more"] is False
        assert listing["channels"] == [
            {
                "channel": "dm:alice:bob",
                "head": 2,
                "read": 0,
                "unread": 2,
                "capped": False,
                "peer": "alice",
            },
            {"channel": "room-1", "head": 0, "read": 0, "unread": 0, "capped": False},
        ]
        # Read up to the first: one unread left. Alice's own list has the DM, none unread.
        assert (await phone.request("read", channel="dm:alice:bob", seq=1))["t"] == "ok"
        [entry, _] = (await laptop.request("channels"))["channels"]
        assert (entry["read"], entry["unread"]) == (1, 1)
        [mine] = (await alice.request("channels"))["channels"]
        assert mine["channel"] == "dm:alice:bob" and mine["unread"] == 0
        assert mine["peer"] == "bob"

        # A recipient offline at the time finds the DM in the list when it connects (the
        # membership is written just after the message: wait for that write, bounded).
        await dm(alice, "carol", "alice", "for later", "a-3")
        with trio.fail_after(10):
            while "dm:alice:carol" not in await trio.to_thread.run_sync(
                h.server.store.channels_of, "carol"
            ):
                await trio.sleep(0.01)
        carol = await h.connect("carol", ["room-*"])
        [entry] = (await carol.request("channels"))["channels"]
        assert entry["channel"] == "dm:alice:carol" and entry["unread"] == 1


async def test_channels_pages_and_bounds(tmp_path: Path) -> None:
    """Pages of max_presence_users names, `after` continues; a channel the token no
    longer reads is not listed; unread is capped at unread_scan_max; a DM peer already at
    max_memberships is not made a member (and not told); a bad `after` is bad_request."""
    limits = fast_limits(max_presence_users=2, unread_scan_max=3, max_memberships=4)
    async with running_server(make_settings(tmp_path / "data", limits=limits)) as h:
        bob = await h.connect("bob", ["room-*", "other"])
        for name in ("room-a", "room-b", "room-c", "other"):
            assert (await bob.request("join", channel=name))["t"] == "ok"
            await bob.expect("membership", channel=name)  # recorded (after the ok)
        first = await bob.request("channels")
        assert [c["channel"] for c in first["channels"]] == ["other", "room-a"]
        assert first["more"] is True
        second = await bob.request("channels", after="room-a")
        assert [c["channel"] for c in second["channels"]] == ["room-b", "room-c"]
        assert second["more"] is False
        # A token without `other`: not listed (membership stays).
        narrow = await h.connect("bob", ["room-*"])
        names = [c["channel"] for c in (await narrow.request("channels"))["channels"]]
        assert names == ["room-a", "room-b"]

        alice = await h.connect("alice", ["room-*"])
        for i in range(5):
            await alice.request("send", channel="room-a", cid=f"x{i}", text="x")
        [entry, _] = (await narrow.request("channels"))["channels"]
        assert entry["unread"] == 3 and entry["capped"] is True and entry["head"] == 5

        # bob has 4 memberships, the most: alice's DM does not make a fifth.
        await dm(alice, "bob", "alice", "hello", "d-1")
        assert await no_frame(bob, "membership")
        names = [
            c["channel"] for c in (await narrow.request("channels", after="room-b"))["channels"]
        ]
        assert names == ["room-c"]

        error = await bob.request("channels", after=7)
        assert error["t"] == "error" and error["code"] == "bad_request"


@pytest.mark.skipif(not redis_servers.available(), reason="needs redis-server")
async def test_a_dm_reaches_the_recipient_on_another_node(tmp_path: Path) -> None:
    server = redis_servers.RedisServer(tmp_path / "redis").start()
    try:
        async with AsyncExitStack() as stack:
            nodes: list[Harness] = []
            for i in range(2):
                settings = make_settings(tmp_path / f"node{i}", engine=server.url)
                nodes.append(await stack.enter_async_context(running_server(settings)))
            a, b = nodes
            alice = await a.connect("alice", ["room-*"])
            bob_b, bob_a = await b.connect("bob", ["room-*"]), await a.connect("bob", ["room-*"])
            await dm(alice, "bob", "alice", "across", "x-1")
            for device in (bob_b, bob_a):  # on the other node and on the sender's
                push = await device.expect("membership")
                assert push == {"t": "membership", "channel": "dm:alice:bob", "by": "alice"}
            [entry] = (await bob_b.request("channels"))["channels"]
            assert entry["channel"] == "dm:alice:bob" and entry["unread"] == 1
    finally:
        server.stop()


async def test_the_client_lists_channels_and_hands_over_membership(
    tmp_path: Path,
) -> None:
    settings = replace(make_settings(tmp_path / "data"), limits=fast_limits(max_presence_users=1))
    async with running_server(settings) as h:
        alice = await h.connect("alice", ["room-*"])
        port = h.server.port
        async with connect("127.0.0.1", port, token=mint("bob", ["room-*"])) as bob:
            await bob.join("room-1")
            await dm(alice, "bob", "alice", "psst", "c-1")
            seen: list[Membership] = []
            with trio.fail_after(5):
                async for event in bob.events():
                    if isinstance(event, Membership):
                        seen.append(event)
                        if len(seen) == 2:
                            break
            assert set(seen) == {Membership("room-1", "bob"), Membership("dm:alice:bob", "alice")}
            # Pages of one channel each, all followed.
            assert await bob.list_channels() == [
                ChannelSummary("dm:alice:bob", 1, 0, 1, False, "alice"),
                ChannelSummary("room-1", 0, 0, 0, False, None),
            ]
    assert SECRET  # the tokens above are signed with the harness's secret


def test_a_bounded_membership_write_on_every_engine(store_engine: Any, tmp_path: Path) -> None:
    """WriteOp("member", most=N): recorded (``changed``) only when new and while the user
    has fewer than N memberships; the DM peer's record relies on it (6.15)."""
    store = store_engine.open(store_engine.place(tmp_path / "db"))
    try:
        for name in ("a", "b"):
            assert store.write(WriteOp("member", name, "bob", most=2)).changed
        assert not store.write(WriteOp("member", "a", "bob", most=2)).changed  # not new
        assert not store.write(WriteOp("member", "dm:alice:bob", "bob", most=2)).changed
        assert store.channels_of("bob") == ["a", "b"]
        assert store.write(WriteOp("member", "c", "bob")).changed  # unbounded
        assert store.channels_of("bob") == ["a", "b", "c"]
    finally:
        store.close()
