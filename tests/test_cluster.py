"""Cluster mode over real TCP: several tsmsg nodes on one shared Redis engine (issue 15).

Each test starts its own ``redis-server`` (AOF always, loopback, a temporary dir) or the
3-master Redis Cluster, and its tsmsg nodes in this process, each with its own listener:

- clients on different nodes join one channel and send concurrently: every member on
  every node receives every event exactly once, in seq order, seqs dense, and the sender's
  ``ok`` comes before its own event;
- one cid retried through two nodes is stored once;
- typing and read receipts reach members on other nodes;
- ``CLIENT KILL TYPE pubsub`` on Redis mid-stream: no member misses or doubles an event.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

import redis_servers
from conftest import Harness, WireClient, fast_limits, make_settings, mint, running_server
from server_proc import ServerProcess
from tsmsg.server.settings import Settings
from tsmsg.store.redis_store import RedisStore

CHANNEL = "room-1"
SENDS = 40  # per sender
DELIVERY_TIMEOUT_S = 20.0

pytestmark = pytest.mark.skipif(not redis_servers.available(), reason="needs redis-server")


@pytest.fixture
def redis_engine(tmp_path: Path) -> Iterator[str]:
    """A fresh Redis of this test's own (no state shared with any other test)."""
    server = redis_servers.RedisServer(tmp_path / "redis").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_cluster_engine(redis_cluster: redis_servers.RedisCluster) -> Iterator[str]:
    yield redis_cluster.url


@asynccontextmanager
async def nodes(
    tmp_path: Path, engine: str, n: int, **overrides: Any
) -> AsyncIterator[list[Harness]]:
    """``n`` tsmsg nodes on ``engine``, each with its own port."""
    async with AsyncExitStack() as stack:
        out = []
        for i in range(n):
            settings: Settings = make_settings(tmp_path / f"node{i}", engine=engine, **overrides)
            out.append(await stack.enter_async_context(running_server(settings)))
        yield out


async def join(client: WireClient, channel: str = CHANNEL) -> dict[str, Any]:
    reply = await client.request("join", channel=channel)
    assert reply["t"] == "ok", reply
    return reply


async def collect(client: WireClient, count: int, channel: str = CHANNEL) -> list[dict[str, Any]]:
    """The next ``count`` events of ``channel`` this client receives."""
    out = []
    with trio.fail_after(DELIVERY_TIMEOUT_S):
        while len(out) < count:
            out.append(await client.next(lambda f: f["t"] == "event" and f["channel"] == channel))
    return out


class Intercepted:
    """A node's ``Remote`` hook (its RemoteHop, which the engine's pub/sub thread calls)
    with some hooks replaced: each replacement is called with the real hop first."""

    def __init__(self, hop: Any, hooks: dict[str, Callable[..., None]]) -> None:
        self._hop, self._hooks = hop, hooks

    def __getattr__(self, name: str) -> Any:
        hook = self._hooks.get(name)
        return getattr(self._hop, name) if hook is None else functools.partial(hook, self._hop)


def intercept(node: Harness, **hooks: Callable[..., None]) -> None:
    """What ``node``'s engine reports from its pub/sub thread goes through ``hooks``
    (``entries``, ``signal``, ``lost``) first."""
    store = node.server.store
    assert isinstance(store, RedisStore)
    sub = store._subscriber
    sub._remote = Intercepted(sub._remote, hooks)


def check_stream(events: list[dict[str, Any]], first: int, last: int) -> None:
    """Exactly seqs first..last, in order, once each."""
    assert [e["seq"] for e in events] == list(range(first, last + 1))


async def chat_across(harnesses: list[Harness], per_node: int = 1) -> None:
    """A member and a sender on every node; all send at once; every member gets all."""
    members = [
        await h.connect(f"m{i}-{j}") for i, h in enumerate(harnesses) for j in range(per_node)
    ]
    heads = [(await join(m))["head"] for m in members]
    senders = [await h.connect(f"s{i}") for i, h in enumerate(harnesses)]
    total = SENDS * len(senders)
    ids = itertools.count()

    async def send_all(sender: WireClient) -> None:
        for _ in range(SENDS):
            reply = await sender.request("send", channel=CHANNEL, cid=f"c{next(ids)}", text="x")
            assert reply["t"] == "ok", reply

    streams: list[list[dict[str, Any]]] = []

    async def receive(member: WireClient) -> None:
        streams.append(await collect(member, total))

    async with trio.open_nursery() as nursery:
        for member in members:
            nursery.start_soon(receive, member)
        for sender in senders:
            nursery.start_soon(send_all, sender)
    for head, events in zip(heads, (s for s in streams), strict=True):
        assert events[0]["seq"] >= head + 1
    for events in streams:
        first = events[0]["seq"]
        check_stream(events, first, first + total - 1)
    # Every member saw the same entries under the same seqs.
    by_seq = [{e["seq"]: (e["id"], e["sender"]) for e in events} for events in streams]
    assert all(m == by_seq[0] for m in by_seq)


async def test_members_on_every_node_get_every_event_once_in_order(
    tmp_path: Path, redis_engine: str
) -> None:
    async with nodes(tmp_path, redis_engine, 3) as harnesses:
        await chat_across(harnesses)


async def test_three_nodes_on_a_redis_cluster(tmp_path: Path, redis_cluster_engine: str) -> None:
    async with nodes(tmp_path, redis_cluster_engine, 3) as harnesses:
        await chat_across(harnesses)


async def test_the_senders_ok_precedes_its_event_on_its_own_node(
    tmp_path: Path, redis_engine: str
) -> None:
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        alice = await a.connect("alice")
        await join(alice)
        bob = await b.connect("bob")
        await join(bob)
        await alice.send({"t": "send", "rid": 7, "channel": CHANNEL, "cid": "k", "text": "hi"})
        first = await alice.next(lambda f: f.get("rid") == 7 or f["t"] == "event")
        assert first["t"] == "ok", first
        [event] = await collect(alice, 1)
        assert event["seq"] == first["seq"]
        [remote] = await collect(bob, 1)
        assert remote == event


async def test_a_cid_retried_through_another_node_is_stored_once(
    tmp_path: Path, redis_engine: str
) -> None:
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        on_a, on_b = await a.connect("alice"), await b.connect("alice")
        first = await on_a.request("send", channel=CHANNEL, cid="retry-1", text="once")
        again = await on_b.request("send", channel=CHANNEL, cid="retry-1", text="once")
        assert again["dup"] is True
        assert (again["seq"], again["id"]) == (first["seq"], first["id"])
        page = await on_b.request("sync", channel=CHANNEL, since=0)
        assert [e["seq"] for e in page["events"]] == [first["seq"]]


async def test_typing_and_read_receipts_cross_nodes(tmp_path: Path, redis_engine: str) -> None:
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        alice, bob = await a.connect("alice"), await b.connect("bob")
        await join(alice)
        await join(bob)
        sent = await alice.request("send", channel=CHANNEL, cid="c", text="hello")
        await collect(bob, 1)
        assert (await alice.request("typing", channel=CHANNEL, on=True))["t"] == "ok"
        typing = await bob.expect("typing", channel=CHANNEL, user="alice")
        assert typing["on"] is True
        assert (await bob.request("read", channel=CHANNEL, seq=sent["seq"]))["t"] == "ok"
        receipt = await alice.expect("read", channel=CHANNEL, user="bob")
        assert receipt["seq"] == sent["seq"]


async def test_a_killed_pubsub_connection_loses_and_doubles_nothing(
    tmp_path: Path, redis_engine: str
) -> None:
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        sender, member = await a.connect("alice"), await b.connect("bob")
        await join(member)
        admin = redis.Redis.from_url(redis_engine)
        ids = itertools.count()

        async def send(n: int) -> None:
            for _ in range(n):
                cid = f"c{next(ids)}"
                reply = await sender.request("send", channel=CHANNEL, cid=cid, text="x")
                assert reply["t"] == "ok", reply

        async with trio.open_nursery() as nursery:
            received: list[dict[str, Any]] = []

            async def receive() -> None:
                received.extend(await collect(member, 3 * SENDS))

            nursery.start_soon(receive)
            await send(SENDS)
            killed = await trio.to_thread.run_sync(
                lambda: admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            )
            assert killed >= 1
            await send(2 * SENDS)
        check_stream(received, 1, 3 * SENDS)


async def send_each(client: WireClient, cids: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Send one message per cid, one at a time: the ``ok`` replies by cid, and the cids
    refused with ``store_unavailable`` (any other answer fails the test)."""
    acked: dict[str, Any] = {}
    refused: list[str] = []
    for cid in cids:
        reply = await client.request("send", channel=CHANNEL, cid=cid, text=f"text {cid}")
        if reply["t"] == "ok":
            acked[cid] = reply
        else:
            assert reply.get("code") == "store_unavailable", reply
            refused.append(cid)
    return acked, refused


async def full_log(client: WireClient) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    more = True
    while more:
        page = await client.request("sync", channel=CHANNEL, since=len(out))
        assert page["t"] == "ok", page
        out += page["events"]
        more = page["more"]
    return out


async def until(what: Any, timeout: float = DELIVERY_TIMEOUT_S) -> None:
    with trio.fail_after(timeout):
        while not what():
            await trio.sleep(0.05)


async def test_redis_killed_and_restarted_mid_stream_loses_no_acked_message(
    tmp_path: Path,
) -> None:
    """kill -9 of the one Redis (AOF always) while a node writes: every write in the
    outage is refused with store_unavailable (never an ok), /readyz says why, the nodes
    keep their connections and recover by themselves; nothing acknowledged is lost and
    the member on the other node gets every event once, in order."""
    redis_server = redis_servers.RedisServer(tmp_path / "redis").start()
    try:
        async with nodes(tmp_path, redis_server.url, 2) as (a, b):
            sender, member = await a.connect("alice"), await b.connect("bob")
            await join(member)
            acked, refused = await send_each(sender, [f"before-{i}" for i in range(SENDS)])
            assert not refused
            await trio.to_thread.run_sync(redis_server.kill)
            during, refused = await send_each(sender, [f"during-{i}" for i in range(5)])
            assert during == {} and len(refused) == 5
            assert a.server.readiness() is not None  # a failed write tells at once
            await until(lambda: b.server.readiness() is not None)  # an idle node's probe
            # tsmsg_store_failed says so too (metrics.md), and turns 0 again below
            assert [n.server.metrics.value("tsmsg_store_failed") for n in (a, b)] == [1, 1]
            assert (await member.request("ping"))["t"] == "pong"  # still connected
            await trio.to_thread.run_sync(redis_server.start)
            await until(lambda: a.server.readiness() is None and b.server.readiness() is None)
            assert [n.server.metrics.value("tsmsg_store_failed") for n in (a, b)] == [0, 0]
            # The refused ones again (same cids), and more.
            later = refused + [f"after-{i}" for i in range(SENDS)]
            more, still = await send_each(sender, later)
            assert not still
            acked.update(more)
            events = await collect(member, len(acked))
            log = await full_log(member)
        assert [e["seq"] for e in log] == list(range(1, len(acked) + 1))
        by_cid = {cid: reply["seq"] for cid, reply in acked.items()}
        assert sorted(by_cid.values()) == [e["seq"] for e in log]  # each cid stored once
        for cid, seq in by_cid.items():
            assert log[seq - 1]["text"] == f"text {cid}"
        check_stream(events, 1, len(acked))
    finally:
        redis_server.stop()


async def test_redis_data_lost_under_live_clients_shows_as_a_new_epoch(
    tmp_path: Path, redis_engine: str
) -> None:
    """FLUSHALL while members on two nodes follow a channel: the next write starts a new
    log; every member's live stream is cut, its sync answers ``resync`` (epoch), and no
    client sees two different messages under one (epoch, seq)."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        alice, bob = await a.connect("alice"), await b.connect("bob")
        joined = [await join(c) for c in (alice, bob)]
        old = await alice.request("send", channel=CHANNEL, cid="old", text="old 1")
        for c in (alice, bob):
            await collect(c, 1)
        epoch = (await alice.request("sync", channel=CHANNEL, since=0))["epoch"]
        assert epoch != 0 and all(j["epoch"] == 0 for j in joined)
        admin = redis.Redis.from_url(redis_engine)
        await trio.to_thread.run_sync(admin.flushall)
        new = await alice.request("send", channel=CHANNEL, cid="new", text="new 1")
        assert new["seq"] == old["seq"] == 1 and new["id"] != old["id"]
        for c in (alice, bob):
            cut = await c.expect("resync", channel=CHANNEL)
            assert cut["epoch"] != epoch
            page = await c.request("sync", channel=CHANNEL, since=1, epoch=epoch)
            assert (page["t"], page["reason"]) == ("resync", "epoch")
            fresh = await c.request("sync", channel=CHANNEL, since=0)
            assert fresh["epoch"] == cut["epoch"]
            assert [(e["seq"], e["text"]) for e in fresh["events"]] == [(1, "new 1")]
        # Neither saw "new 1" as a live event of the old epoch.
        for c in (alice, bob):
            assert not [f for f in c.pending if f.get("t") == "event"]


PRESENCE_TTL_S = 1.5  # the nodes' engine_presence_ttl_s here: a dead node's users expire fast
QUIET_S = 0.3  # how long "no push came" is watched for (a push between nodes takes ~1 ms)


def presence_of(user: str) -> Any:
    return lambda f: f.get("t") == "presence" and f.get("user") == user


def taken(client: WireClient, match: Any) -> list[dict[str, Any]]:
    hits = [f for f in client.pending if match(f)]
    client.pending = [f for f in client.pending if not match(f)]
    return hits


async def test_presence_across_nodes_once_per_change_and_after_a_node_dies(
    tmp_path: Path, redis_engine: str
) -> None:
    """A user is online while any device is connected to any node: pushed once per change
    of that, to members on every node; a query on a node without the user's devices
    answers from the engine; a node killed without a goodbye counts no longer after the
    TTL, and its user is announced offline with last_seen recorded."""
    ttl = {"engine_presence_ttl_s": PRESENCE_TTL_S}
    async with nodes(tmp_path, redis_engine, 2, **ttl) as (a, b):
        first = await a.connect("alice")
        await join(first)
        carol = await b.connect("carol")
        await join(carol)
        store = b.server.store
        await until(  # memberships are written after the join's ok
            lambda: all(CHANNEL in store.channels_of(u) for u in ("alice", "carol"))
        )
        await first.aclose()  # alice's only device, on the other node: offline
        assert (await carol.next(presence_of("alice")))["status"] == "offline"

        phone = await a.connect("alice")
        assert (await carol.next(presence_of("alice")))["status"] == "online"
        laptop = await b.connect("alice")  # a second device, another node: no change
        await trio.sleep(QUIET_S)
        assert taken(carol, presence_of("alice")) == []
        await phone.aclose()  # still on node b
        await trio.sleep(QUIET_S)
        assert taken(carol, presence_of("alice")) == []
        dave = await a.connect("dave")  # on node a, where alice has no device now
        await join(dave)
        (entry,) = (await dave.request("presence", users=["alice"]))["users"]
        assert (entry["status"], entry["online"]) == ("online", True), entry
        await laptop.aclose()
        assert (await carol.next(presence_of("alice")))["status"] == "offline"

        # A node that dies: its user counts as online until the TTL, then offline once.
        doomed = ServerProcess(
            tmp_path / "doomed",
            tmp_path / "doomed.log",
            "--engine",
            redis_engine,
            env={"TSMSG_ENGINE_PRESENCE_TTL_S": str(PRESENCE_TTL_S)},
        )
        try:
            await doomed.start()
            stream = await trio.open_tcp_stream("127.0.0.1", doomed.port)
            alice = WireClient(stream)
            assert (await alice.request("hello", v=1, token=mint("alice")))["t"] == "welcome"
            assert (await carol.next(presence_of("alice")))["status"] == "online"
            killed_at = time.time() * 1000
            doomed.kill()
            with trio.fail_after(DELIVERY_TIMEOUT_S):
                gone = await carol.next(presence_of("alice"))
            assert gone["status"] == "offline"
            assert gone["ts"] >= killed_at  # not before the TTL could run out
            await trio.sleep(QUIET_S)
            assert taken(carol, presence_of("alice")) == []  # one node announced it
            (entry,) = (await dave.request("presence", users=["alice"]))["users"]
            assert entry["status"] == "offline" and entry["last_seen"] >= killed_at, entry
            await alice.aclose()
        finally:
            doomed.kill()


async def test_send_limits_are_shared_by_the_nodes(tmp_path: Path, redis_engine: str) -> None:
    """One user's devices on two nodes share one send budget (per user, per user and
    channel): each node alone would let its device spend the whole burst."""
    burst = 4
    limits = fast_limits(send_rate=0.5, send_burst=burst, channel_send_rate=0.5)
    async with nodes(tmp_path, redis_engine, 2, limits=limits) as (a, b):
        on_a, on_b = await a.connect("alice"), await b.connect("alice")
        replies = []
        for i in range(burst):
            client = on_a if i % 2 else on_b
            replies.append(await client.request("send", channel=CHANNEL, cid=f"c{i}", text="x"))
        assert [r["t"] for r in replies] == ["ok"] * burst
        refused = [
            await c.request("send", channel=CHANNEL, cid=f"late-{i}", text="x")
            for i, c in enumerate((on_a, on_b))
        ]
        for r in refused:
            assert (r["t"], r["code"]) == ("error", "rate_limited"), r
            assert 1 <= r["retry_after_ms"] <= 2000, r
        page = await on_a.request("sync", channel=CHANNEL, since=0)
        assert [e["seq"] for e in page["events"]] == list(range(1, burst + 1))
        with redis.Redis.from_url(redis_engine) as admin:  # the buckets leave nothing for good
            for key in ("tsmsg:{u:alice}:rate", f"tsmsg:{{u:alice}}:rate:c:{CHANNEL}"):
                assert 0 < admin.pttl(key) <= (burst / 0.5 + 1) * 1000, key


async def test_quick_connects_and_disconnects_leave_the_user_offline(
    tmp_path: Path, redis_engine: str
) -> None:
    """Presence changes of one user reach the engine one at a time, in order: after a
    burst of connects and disconnects the user is offline there too (not left online,
    refreshed for ever, by a change that overtook the last one)."""
    async with nodes(tmp_path, redis_engine, 1) as (a,):
        for _ in range(20):
            client = await a.connect("alice")
            await client.aclose()
        await until(lambda: "alice" not in a.server.devices)
        await until(lambda: not a.server.presence_unwritten)
        presence = a.server.store.presence
        assert presence.statuses(["alice"], a.server.now_ms()) == {}
        presence.refresh(a.server.now_ms())  # what the node keeps alive: not alice
        assert presence.statuses(["alice"], a.server.now_ms()) == {}


async def test_a_node_stopping_announces_its_users_offline_before_it_exits(
    tmp_path: Path, redis_engine: str
) -> None:
    """A graceful stop (SIGTERM) writes the offline changes of its users before the node
    exits: members elsewhere are told at once, not after the presence TTL."""
    long_ttl = {"engine_presence_ttl_s": 600.0}  # an expiry could not be what announces it
    async with AsyncExitStack() as stack:
        b = await stack.enter_async_context(
            running_server(make_settings(tmp_path / "b", engine=redis_engine, **long_ttl))
        )
        carol = await b.connect("carol")
        await join(carol)
        async with running_server(
            make_settings(tmp_path / "a", engine=redis_engine, **long_ttl)
        ) as a:
            users = [f"user{i}" for i in range(30)]
            clients = [await a.connect(user) for user in users]
            for client in clients:
                await join(client)
            store = b.server.store
            await until(lambda: all(CHANNEL in store.channels_of(u) for u in users))
            online = store.presence.statuses(users, b.server.now_ms())
            assert online == dict.fromkeys(users, "online")
            presence, set_many = a.server.store.presence, a.server.store.presence.set_many

            def slow(changes: Any) -> Any:  # a Redis far away: batches are still being written
                time.sleep(0.2)  # when the last connection is closed
                return set_many(changes)

            presence.set_many = slow  # type: ignore[method-assign]
            await clients[0].aclose()  # its offline change is being written: a slow batch
            await until(lambda: a.server.presence_unwritten == 1 and not a.server._presence_queue)
            a.clients.clear()  # still connected when the node stops: the server closes them
            a.server.stopping.set()  # their changes: the next batch, after the slow one
        # node a's run() has returned
        assert store.presence.statuses(users, b.server.now_ms()) == {}
        with trio.fail_after(DELIVERY_TIMEOUT_S):
            told = {(await carol.next(presence_of(u)))["status"] for u in users}
        assert told == {"offline"}
        for client in clients:
            await client.aclose()


async def test_presence_changes_waiting_for_a_slow_engine_keep_one_per_user(
    tmp_path: Path, redis_engine: str
) -> None:
    """While a batch is being written (Redis slow or away), a user's next change replaces
    the one still waiting: one change per user is queued, however many happen, and the
    net one is written."""
    async with nodes(tmp_path, redis_engine, 1) as (a,):
        presence, set_many = a.server.store.presence, a.server.store.presence.set_many
        release = threading.Event()

        def held(changes: Any) -> Any:
            release.wait(DELIVERY_TIMEOUT_S)
            return set_many(changes)

        presence.set_many = held  # type: ignore[method-assign]
        bob = await a.connect("bob")  # his change: the batch being written
        await until(lambda: a.server.presence_unwritten == 1 and not a.server._presence_queue)
        for _ in range(10):
            alice = await a.connect("alice")
            await until(lambda: "alice" in a.server.devices)  # announced (its memberships read)
            await alice.aclose()
            await until(lambda: "alice" not in a.server.devices)
            assert list(a.server._presence_queue) == ["alice"]  # one change, the latest
        assert a.server.presence_unwritten == 2
        (gauge,) = a.server.metrics.presence_unwritten.collect()
        assert [sample.value for sample in gauge.samples] == [2]  # tsmsg_presence_unwritten
        release.set()
        await until(lambda: not a.server.presence_unwritten)
        now = a.server.now_ms()
        assert presence.statuses(["alice", "bob"], now) == {"bob": "online"}
        await bob.aclose()


@pytest.mark.parametrize("lost_first", [True, False], ids=["lost-first", "position-first"])
async def test_an_entry_written_between_the_join_read_and_the_subscription_is_pushed(
    tmp_path: Path, redis_engine: str, lost_first: bool
) -> None:
    """Alice is the first member of room-1 on node A. Her join subscribes A to the channel's
    topic and reads the head (1) at once, in another thread. Bob (node B) writes seq 2 after
    that read and before A's SUBSCRIBE takes effect: pub/sub loses it for A, which is what
    ``Remote.lost`` (the subscription's confirmation, then ``Relay.check``) is for. With
    ``lost-first`` the confirmation reaches A's loop before the read's answer
    (``Relay.position``): the check is kept until the position is known, and seq 2 is read
    from the log and pushed (it was dropped before: PROTOCOL.md section 9 rule 7, every
    entry after a join is in a sync reply or pushed live). ``position-first`` (the read
    answered before the confirmation) is the control."""
    async with nodes(tmp_path, redis_engine, 2) as (a, b):
        bob = await b.connect("bob")
        assert (await bob.request("send", channel="room-1", cid="c1", text="one"))["t"] == "ok"

        store = a.server.store
        sub = store._subscriber
        subscribe_now = threading.Event()  # A's pub/sub thread waits for it to subscribe
        answer_now = threading.Event()  # the join's read waits for it to answer
        read_done = trio.Event()
        lost_seen = trio.Event()
        token = trio.lowlevel.current_trio_token()

        real_subscribe = sub._subscribe

        def slow_subscribe(now: float) -> None:
            subscribe_now.wait(DELIVERY_TIMEOUT_S)
            real_subscribe(now)

        sub._subscribe = slow_subscribe
        real_channel = store.channel

        def slow_channel(name: str) -> Any:
            info = real_channel(name)
            token.run_sync_soon(read_done.set)
            answer_now.wait(DELIVERY_TIMEOUT_S)
            return info

        store.channel = slow_channel

        def lost(hop: Any, channels: list[str]) -> None:  # in A's pub/sub thread
            hop.lost(channels)  # the loop runs A's handling of it, then (in order) the set
            token.run_sync_soon(lost_seen.set)

        intercept(a, lost=lost)

        alice = await a.connect("alice")
        async with trio.open_nursery() as nursery:
            replies: list[dict[str, Any]] = []

            async def do_join() -> None:
                replies.append(await join(alice))

            nursery.start_soon(do_join)
            with trio.fail_after(DELIVERY_TIMEOUT_S):
                await read_done.wait()  # A read head 1
            reply = await bob.request("send", channel="room-1", cid="c2", text="two")
            assert reply["t"] == "ok" and reply["seq"] == 2  # published: A not subscribed yet
            await trio.sleep(0.2)
            if not lost_first:
                answer_now.set()
                with trio.fail_after(DELIVERY_TIMEOUT_S):
                    while not replies:
                        await trio.sleep(0.01)
            subscribe_now.set()
            with trio.fail_after(DELIVERY_TIMEOUT_S):
                await lost_seen.wait()  # the subscription is confirmed, reported lost
            answer_now.set()
        assert replies[0]["head"] == 1
        # Seq 2 must reach alice: it is after her join's head and in no sync of hers.
        with trio.move_on_after(DELIVERY_TIMEOUT_S):
            event = await alice.next(lambda f: f["t"] == "event")
            assert event["seq"] == 2
            return
        pytest.fail("seq 2, committed after alice's join read, was never pushed to her")
