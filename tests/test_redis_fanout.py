"""Fan-out between nodes on the Redis engine: two RedisStores on one Redis (or one Redis
Cluster) play two nodes. What node A commits reaches node B's ``Remote`` hook exactly as
``sync`` returns it, only after A acknowledged it; dups are not published; unfollow stops
delivery; a killed pub/sub connection is reported with ``lost`` and delivery resumes;
signals reach B; a channel B does not follow delivers nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import redis_servers
from tsmsg._native import packb
from tsmsg.store import (
    RedisStore,
    RemoteEntry,
    StoreUnavailable,
    WriteOp,
    open_store,
    redis_fanout,
    redis_store,
)
from tsmsg.store.base import CONNECTED

WAIT_S = 10.0  # anything these tests wait for arrives well within this
QUIET_S = 0.3  # how long "nothing arrives" is watched for

_prefixes = itertools.count(1)
PRESENCE_TTL_MS = 30_000  # RedisStore's default engine_presence_ttl_s


def eventually(what: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not what():
        assert time.monotonic() < deadline, "not true in time"
        time.sleep(0.01)


class Recorder:
    """A Remote that records what it is told. ``acked``: when given, every entry must
    already be acknowledged to its writer when it arrives here."""

    def __init__(self, acked: Callable[[str, int], bool] | None = None) -> None:
        self.changed = threading.Condition()
        self.received: list[RemoteEntry] = []
        self.signals: list[tuple[str, dict[str, Any]]] = []
        self.losses: list[str] = []
        self.unacked: list[RemoteEntry] = []
        self.acked = acked
        self.sizes: list[int] = []  # entries per hand-over
        self.hold: threading.Event | None = None  # when given, a hand-over waits for it

    def entries(self, entries: list[RemoteEntry]) -> None:
        self.sizes.append(len(entries))
        if self.hold is not None:
            self.hold.wait(WAIT_S)
        with self.changed:
            if self.acked is not None:
                self.unacked += [e for e in entries if not self.acked(e.channel, e.entry["seq"])]
            self.received += entries
            self.changed.notify_all()

    def signal(self, channel: str, frame: dict[str, Any]) -> None:
        with self.changed:
            self.signals.append((channel, frame))
            self.changed.notify_all()

    def lost(self, channels: list[str]) -> None:
        with self.changed:
            self.losses += channels
            self.changed.notify_all()

    def wait(self, what: Callable[[], bool]) -> None:
        with self.changed:
            assert self.changed.wait_for(what, WAIT_S), "not delivered in time"

    def seqs(self, channel: str) -> list[int]:
        with self.changed:
            return [e.entry["seq"] for e in self.received if e.channel == channel]


class Engine:
    def __init__(self, url: str, servers: list[redis_servers.RedisServer]) -> None:
        self.url = url
        self.servers = servers

    def subscribers(self, topic: bytes) -> int:
        """How many connections Redis has subscribed to ``topic`` (all nodes)."""
        total = 0
        for server in self.servers:
            with server.client() as c:
                if len(self.servers) == 1:
                    total += c.pubsub_numsub(topic)[0][1]
                else:
                    total += c.execute_command("PUBSUB", "SHARDNUMSUB", topic)[1]
        return total

    def kill_pubsub_clients(self) -> None:
        for server in self.servers:
            with server.client() as c:
                c.client_kill_filter(_type="pubsub")


@pytest.fixture(params=["redis", "redis-cluster"])
def engine(request: pytest.FixtureRequest) -> Engine:
    if request.param == "redis":
        server: redis_servers.RedisServer = request.getfixturevalue("redis_server")
        return Engine(server.url, [server])
    cluster: redis_servers.RedisCluster = request.getfixturevalue("redis_cluster")
    return Engine(cluster.url, cluster.nodes)


class Nodes:
    """Node A (writes, records what it acknowledged) and node B (follows, records)."""

    def __init__(self, engine: Engine) -> None:
        prefix = f"fan{next(_prefixes)}:"
        self.acked: set[tuple[str, int]] = set()
        self.lock = threading.Lock()
        self.a = RedisStore(engine.url, key_prefix=prefix, notify=self._notify)
        self.rec = Recorder(self._was_acked)
        self.b = RedisStore(engine.url, key_prefix=prefix, remote=self.rec)

    def _notify(self, batch: list[WriteOp]) -> None:
        with self.lock:
            for op in batch:
                result = op.result
                if op.error is None and result is not None and hasattr(result, "seq"):
                    self.acked.add((op.channel, result.seq))

    def _was_acked(self, channel: str, seq: int) -> bool:
        with self.lock:
            return (channel, seq) in self.acked

    def follow(self, channel: str) -> None:
        """B follows ``channel`` and waits until Redis confirmed the subscription."""
        start = len(self.rec.losses)
        self.b.follow(channel)
        self.rec.wait(lambda: channel in self.rec.losses[start:])

    def close(self) -> None:
        self.a.close()
        self.b.close()


@pytest.fixture
def nodes(engine: Engine) -> Iterator[Nodes]:
    n = Nodes(engine)
    yield n
    n.close()
    assert not n.b._subscriber._thread.is_alive()


def test_entries_arrive_as_sync_returns_them_after_the_ack(nodes: Nodes) -> None:
    a, rec = nodes.a, nodes.rec
    nodes.follow("room")
    writes: list[Callable[[], Any]] = [
        lambda: a.append("room", "u1", "c1", "hello"),
        lambda: a.append("room", "u2", "c2", "with meta", {"k": [1, "x"], "n": 2**40}),
        lambda: a.edit("room", "u1", first.id, "hello, edited"),
        lambda: a.append("room", "u1", "c3", "to delete"),
        lambda: a.delete("room", "u1", f"{first.id.partition('-')[0]}-5"),
    ]
    first = a.append("room", "u1", "c0", "first")
    rec.wait(lambda: rec.seqs("room") == [1])
    for i, write in enumerate(writes, start=2):
        result = write()
        assert result.seq == i
        rec.wait(lambda i=i: len(rec.seqs("room")) == i)
        got = rec.received[-1]
        assert got.channel == "room"
        assert got.epoch == a.channel("room").epoch
        assert got.entry == a.sync("room", i - 1, 1).entries[0]  # before later changes
    assert [e.entry["kind"] for e in rec.received] == [
        "message", "message", "message", "edit", "message", "delete",
    ]  # fmt: skip
    assert rec.seqs("room") == [1, 2, 3, 4, 5, 6]
    assert rec.unacked == []
    assert nodes.b.fanout.bad_messages == 0 and nodes.a.fanout.publish_failures == 0


def test_a_batchs_entries_are_published_together_per_channel(nodes: Nodes) -> None:
    """Consecutive new entries of one channel's log in a batch go out as one pub/sub
    message (at most PUBLISH_ENTRIES_MAX entries each) and arrive one by one, in order."""
    a, rec = nodes.a, nodes.rec
    nodes.follow("room")
    nodes.follow("side")
    n = redis_store.PUBLISH_ENTRIES_MAX + 5
    ops = [WriteOp("message", "room", "u", cid=f"r{i}", text=f"r{i}") for i in range(n)]
    ops += [WriteOp("message", "side", "u", cid="s0", text="s0")]
    ops += [WriteOp("message", "room", "u", cid=f"t{i}", text=f"t{i}") for i in range(3)]
    ops.insert(1, WriteOp("message", "room", "u", cid="r0", text="r0"))  # a dup: not sent
    before = a.fanout.published
    a.submit(*ops)
    rec.wait(lambda: len(rec.received) == n + 4)
    assert rec.seqs("room") == list(range(1, n + 4))
    assert [e.entry["text"] for e in rec.received if e.channel == "room"][-3:] == [
        "t0", "t1", "t2",
    ]  # fmt: skip
    assert rec.seqs("side") == [1]
    # room's first 128, its next 5, side's one, room's last 3 (counted once Redis answered
    # the publishing pipeline: possibly after B got them).
    eventually(lambda: a.fanout.published - before == 4)
    assert rec.unacked == [] and nodes.b.fanout.bad_messages == 0


def test_a_hand_over_holds_at_most_read_batch_max_entries(nodes: Nodes) -> None:
    """Entries come many to a pub/sub message, yet what queued up while the pub/sub thread
    was busy is handed over in lists of at most READ_BATCH_MAX entries (each one call on
    the server's event loop), in order."""
    a, rec = nodes.a, nodes.rec
    nodes.follow("room")
    rec.hold = threading.Event()
    a.append("room", "u", "first", "first")
    eventually(lambda: rec.sizes == [1])  # the pub/sub thread waits in this hand-over
    n = 10 * redis_store.PUBLISH_ENTRIES_MAX
    ops = [
        WriteOp("message", "room", "u", cid=f"c{i}", text=f"c{i}", done=threading.Event())
        for i in range(n)
    ]
    before = a.fanout.published
    a.submit(*ops)
    for op in ops:
        assert op.done is not None and op.done.wait(WAIT_S) and op.error is None
    eventually(lambda: a.fanout.published - before >= n // redis_store.PUBLISH_ENTRIES_MAX)
    time.sleep(QUIET_S)  # the messages reach the pub/sub connection's socket
    rec.hold.set()
    rec.wait(lambda: len(rec.received) == n + 1)
    assert rec.seqs("room") == list(range(1, n + 2))
    assert max(rec.sizes) <= redis_fanout.READ_BATCH_MAX
    assert nodes.b.fanout.bad_messages == 0


def test_a_message_tsmsg_did_not_publish_is_counted_and_delivers_nothing(nodes: Nodes) -> None:
    """Garbage on a followed topic (not msgpack, not a map, another channel's, an entries
    message whose entries are not maps, an earlier single-entry shape) is ignored and
    counted; what node A commits next still arrives, in order."""
    a, b, rec = nodes.a, nodes.b, nodes.rec
    nodes.follow("room")
    topic = a._topic("room")
    bad = [
        b"\xc1 not msgpack",
        packb([1, 2, 3]),
        packb({"node": b"x" * 8, "channel": "other", "epoch": 1, "entries": [{"seq": 1}]}),
        packb({"node": b"x" * 8, "channel": "room", "epoch": 1, "entries": [1, 2]}),
        packb({"node": b"x" * 8, "channel": "room", "epoch": "1", "entries": []}),
        packb({"node": b"x" * 8, "channel": "room", "epoch": 1, "entry": {"seq": 1}}),
    ]
    for payload in bad:
        a._wclient.execute_command(a._publish_command, topic, payload)
    a.append("room", "u", "c1", "after the garbage")
    rec.wait(lambda: rec.seqs("room") == [1])
    eventually(lambda: b.fanout.bad_messages == len(bad))
    assert [e.entry["text"] for e in rec.received] == ["after the garbage"]


def test_a_dup_is_not_published_and_a_moved_read_cursor_is(nodes: Nodes) -> None:
    a, rec = nodes.a, nodes.rec
    nodes.follow("room")
    a.append("room", "u1", "same", "once")
    dup = a.append("room", "u1", "same", "once")
    assert dup.dup
    a.append("room", "u1", "other", "twice")
    rec.wait(lambda: len(rec.seqs("room")) >= 2)
    time.sleep(QUIET_S)
    assert rec.seqs("room") == [1, 2]
    assert a.set_read("u2", "room", 2) == 2
    assert a.set_read("u2", "room", 1) == 2  # did not move: nothing published
    a.publish_signal("room", {"t": "typing", "channel": "room", "user": "u9", "on": True})
    rec.wait(lambda: len(rec.signals) >= 2)
    time.sleep(QUIET_S)
    assert rec.signals == [
        ("room", {"t": "read", "channel": "room", "user": "u2", "seq": 2}),
        ("room", {"t": "typing", "channel": "room", "user": "u9", "on": True}),
    ]


def test_signals_queued_when_a_node_closes_are_still_sent(nodes: Nodes) -> None:
    """A stopping node's last signals (its users' offline presence) are published before
    its pub/sub thread ends, not dropped with the thread."""
    a, rec = nodes.a, nodes.rec
    nodes.follow("room")
    frames = [{"t": "typing", "channel": "room", "user": f"u{i}", "on": True} for i in range(50)]
    for frame in frames:
        a.publish_signal("room", frame)
    a.close()  # at once: the thread has most of them still queued
    rec.wait(lambda: len(rec.signals) >= len(frames))
    assert rec.signals == [("room", frame) for frame in frames]


def test_only_followed_channels_deliver_and_unfollow_stops(nodes: Nodes, engine: Engine) -> None:
    a, b, rec = nodes.a, nodes.b, nodes.rec
    nodes.follow("here")
    a.append("elsewhere", "u", "c1", "not followed")
    a.publish_signal("elsewhere", {"t": "typing", "channel": "elsewhere", "user": "u"})
    a.append("here", "u", "c1", "followed")
    rec.wait(lambda: rec.seqs("here") == [1])
    b.unfollow("here")
    eventually(lambda: engine.subscribers(b._topic("here")) == 0)
    a.append("here", "u", "c2", "after unfollow")
    time.sleep(QUIET_S)
    assert [e.channel for e in rec.received] == ["here"] and rec.signals == []
    nodes.follow("here")  # following again: confirmed, and delivered again
    a.append("here", "u", "c3", "followed again")
    rec.wait(lambda: rec.seqs("here") == [1, 3])


def test_a_killed_pubsub_connection_is_reported_lost_and_delivery_resumes(
    nodes: Nodes, engine: Engine
) -> None:
    a, b, rec = nodes.a, nodes.b, nodes.rec
    for channel in ("one", "two", "three"):
        nodes.follow(channel)
    assert b.fanout.reconnects == 0
    start = len(rec.losses)
    engine.kill_pubsub_clients()
    rec.wait(lambda: {"one", "two", "three"} <= set(rec.losses[start:]))
    assert b.fanout.reconnects >= 1
    for channel in ("one", "two", "three"):
        a.append(channel, "u", "c", f"after the kill in {channel}")
    rec.wait(lambda: len(rec.received) == 3)
    assert sorted(e.channel for e in rec.received) == ["one", "three", "two"]


def test_a_publish_that_fails_never_fails_the_acked_write(engine: Engine) -> None:
    store = RedisStore(engine.url, key_prefix=f"fan{next(_prefixes)}:")
    try:
        store._publish_command = "NO-SUCH-COMMAND"  # Redis refuses every publish
        result = store.append("room", "u", "c", "acked anyway")
        assert (result.seq, result.dup) == (1, False)
        eventually(lambda: store.fanout.publish_failures == 1)  # published after the ack
        assert store.fanout.published == 0
        assert store.sync("room", 0, 10).entries[0]["text"] == "acked anyway"
    finally:
        store.close()


def test_a_cluster_topic_lives_on_its_channels_slot(engine: Engine) -> None:
    store = RedisStore(engine.url, key_prefix="slots:")
    try:
        for channel in ("a", "b", "room-42"):
            keys = store._keys(channel)
            assert redis.cluster.key_slot(store._topic(channel)) == redis.cluster.key_slot(keys[0])
    finally:
        store.close()


def test_open_store_passes_the_remote_hook(engine: Engine) -> None:
    rec = Recorder()
    store = open_store(engine.url, "", remote=rec)
    try:
        assert isinstance(store, RedisStore) and store._subscriber._remote is rec
    finally:
        store.close()


def test_a_node_skips_what_it_published_itself(engine: Engine) -> None:
    """A node's own entries and signals reached its members before they were published:
    delivered again through pub/sub they would be pushed twice (a typing or read push)."""
    own = Recorder()
    store = RedisStore(engine.url, key_prefix=f"self{next(_prefixes)}:", remote=own)
    try:
        start = len(own.losses)
        store.follow("room")
        own.wait(lambda: "room" in own.losses[start:])
        store.append("room", "u1", "c1", "mine")
        store.set_read("u2", "room", 1)
        store.publish_signal("room", {"t": "typing", "channel": "room", "user": "u1"})
        time.sleep(QUIET_S)
        assert own.received == [] and own.signals == []
        assert store.fanout.published == 3 and store.fanout.bad_messages == 0
    finally:
        store.close()


def test_presence_changes_in_one_call_keep_their_order(engine: Engine) -> None:
    """set_many: one pipeline, each change's (before, after) in order, a user's several
    changes too. When Redis lost the function library, each user's last change is written once
    they are loaded, and the earlier ones are superseded (nothing to announce)."""
    store = RedisStore(engine.url, key_prefix=f"pres{next(_prefixes)}:")
    t = int(time.time() * 1000)
    try:
        presence = store.presence
        changes = [
            ("u1", "online", t),
            ("u2", "away", t),
            ("u1", None, t + 1),
            ("u1", "busy", t + 2),
            ("u3", "online", t + 3),
            ("u3", None, t + 4),
        ]
        assert presence.set_many(changes) == [
            ("offline", "online"),
            ("offline", "away"),
            ("online", "offline"),
            ("offline", "busy"),
            ("offline", "online"),
            ("online", "offline"),
        ]
        assert presence.statuses(["u1", "u2", "u3"], t + 5) == {"u1": "busy", "u2": "away"}
        index, node = store._prefix + b"presence:expiry", presence._node  # node + user
        assert sorted(store._client.zrange(index, 0, -1)) == [node + b"u1", node + b"u2"]

        for server in engine.servers:  # as after Redis lost its data: no library
            with server.client() as c:
                c.function_flush()
        again = [("u1", None, t + 6), ("u1", "away", t + 7), ("u2", None, t + 8)]
        assert presence.set_many(again) == [
            ("away", "away"),  # superseded by u1's last change
            ("busy", "away"),
            ("away", "offline"),
        ]
        assert presence.statuses(["u1", "u2"], t + 9) == {"u1": "away"}
        assert sorted(store._client.zrange(index, 0, -1)) == [node + b"u1"]

        store._client.set(store._user_key("u4", b"pres"), "not a hash")  # its script fails
        results = presence.set_many([("u4", "online", t + 10), ("u1", None, t + 11)])
        assert isinstance(results[0], StoreUnavailable), results
        assert results[1] == ("away", "offline")  # the others are written all the same

        # A change that waited (a slow batch ahead of it) holds for the TTL from when it
        # is written, not from when it was made: no sweep takes a connected user.
        late = t - 10 * PRESENCE_TTL_MS
        assert presence.set_many([("u5", "online", late)]) == [("offline", "online")]
        assert presence.statuses(["u5"], int(time.time() * 1000)) == {"u5": "online"}
        assert presence.expired(int(time.time() * 1000)) == []
    finally:
        store.close()


def test_a_refresh_redis_refuses_is_an_error_not_a_silent_loss(engine: Engine) -> None:
    """A refresh whose command Redis refuses (here the user's key is not a hash) raises
    StoreUnavailable (the upkeep logs it and tries again), and the entries it could not
    extend are not taken as swept."""
    store = RedisStore(engine.url, key_prefix=f"pres{next(_prefixes)}:")
    t = int(time.time() * 1000)
    try:
        presence = store.presence
        assert presence.set("u1", "online", t) == ("offline", "online")
        store._client.delete(store._user_key("u1", b"pres"))
        store._client.set(store._user_key("u1", b"pres"), "not a hash")
        with pytest.raises(StoreUnavailable):
            presence.refresh(t + 1)
        store._client.delete(store._user_key("u1", b"pres"))
        assert presence.refresh(t + 2) == [("u1", "offline", "online")]  # set again
    finally:
        store.close()


def test_presence_changes_sent_again_keep_each_users_last(engine: Engine) -> None:
    """Another node loads the library while Redis is between this pipeline's commands
    (after Redis lost its data every node does): u's connect finds no function, its
    disconnect is written. Only u's last change is sent again: u is offline, not left
    online by its connect written after its disconnect (and never refreshed, as this node
    knows u is gone), and nothing is announced."""
    store = RedisStore(engine.url, key_prefix=f"pres{next(_prefixes)}:")
    presence, pipeline = store.presence, store._pipeline
    t = int(time.time() * 1000)

    def interleaved(client: Any, commands: list[Any], wait: bool) -> list[Any]:
        if len(commands) != 2 or commands[0][0] != "FCALL":
            return pipeline(client, commands, wait)  # not the first call: as it is
        store._client.function_flush()  # Redis lost its data
        first = pipeline(client, commands[:1], wait)  # u online: no function
        store._load_library()  # another node's FUNCTION LOAD, between the two
        return first + pipeline(client, commands[1:], wait)  # u gone: written

    store._pipeline = interleaved  # type: ignore[method-assign]
    try:
        results = presence.set_many([("u", "online", t), ("u", None, t + 1)])
        store._pipeline = pipeline  # type: ignore[method-assign]
        assert [before == after for before, after in results] == [True, True], results
        assert presence.statuses(["u"], t + 2) == {}
        assert store._client.zscore(presence._index, presence._node + b"u") is None
    finally:
        store._pipeline = pipeline  # type: ignore[method-assign]
        store.close()


def test_a_disconnect_not_written_keeps_its_entry_where_a_sweep_finds_it(
    engine: Engine,
) -> None:
    """The user's entry and the expiry index may be on different Redis Cluster
    primaries: when the user's is down, its disconnect is not written (an error, the TTL
    corrects it) and the index keeps the entry's member, so that a sweep claims the
    entry once it expires (offline announced, last_seen written)."""
    store = RedisStore(engine.url, key_prefix=f"pres{next(_prefixes)}:", presence_ttl_s=1.0)
    presence, pipeline = store.presence, store._pipeline
    t = int(time.time() * 1000)

    def user_primary_down(client: Any, commands: list[Any], wait: bool) -> list[Any]:
        down = redis.ConnectionError("the user's primary is down")
        return [down if c[0] == "FCALL" else pipeline(client, [c], wait)[0] for c in commands]

    try:
        assert presence.set("u", "online", t) == ("offline", "online")
        store._pipeline = user_primary_down  # type: ignore[method-assign]
        (result,) = presence.set_many([("u", None, t + 10)])
        store._pipeline = pipeline  # type: ignore[method-assign]
        assert isinstance(result, StoreUnavailable), result
        assert presence.expired(t + 5_000) == [("u", "online")]
    finally:
        store._pipeline = pipeline  # type: ignore[method-assign]
        store.close()


def test_a_presence_refresh_extends_only_the_entry_it_knows(engine: Engine) -> None:
    """A refresh never brings back an entry a later change removed (a disconnect racing
    the refresh), and sets again one a sweep took while this node was late."""
    store = RedisStore(engine.url, key_prefix=f"pres{next(_prefixes)}:", presence_ttl_s=1.0)
    t = int(time.time() * 1000)  # the hash's own expiry is absolute: wall-clock times
    try:
        presence = store.presence
        assert presence.set("u1", "online", t + 1_000) == ("offline", "online")
        execute, raced = store._execute, []

        def disconnect_first(*args: Any, **kwargs: Any) -> Any:
            if not raced:  # the refresh's pipeline: u1 disconnects just before it runs
                raced.append(None)
                raced[0] = presence.set("u1", None, t + 1_100)
            return execute(*args, **kwargs)

        store._execute = disconnect_first  # type: ignore[method-assign]
        assert presence.refresh(t + 1_200) == []  # the gone entry is not extended or re-made
        store._execute = execute  # type: ignore[method-assign]
        assert raced == [("online", "offline")]
        assert presence.statuses(["u1"], t + 1_300) == {}
        assert presence.set("u2", "away", t + 2_000) == ("offline", "away")
        assert presence.expired(t + 3_500) == [("u2", "away")]  # swept: this node was late
        # Set again as a first device (the user's status went with the last entry), moved.
        assert presence.refresh(t + 3_600) == [("u2", "offline", "online")]
        assert presence.statuses(["u2"], t + 3_700) == {"u2": "online"}
        assert presence.refresh(t + 3_800) == []  # extended: nothing moved
    finally:
        store.close()


def test_a_user_gone_before_a_dead_nodes_entry_is_swept_is_announced_once(
    engine: Engine,
) -> None:
    """The user's status is held while the user is announced present (STORAGE.md,
    "Presence between nodes"). A user on nodes X ("away") and Y: X dies, and before the
    sweep claims X's expired entry the user's last device on Y leaves: that change is the
    user's offline (from "away"), and the later claim announces nothing again (a review
    found it announced "offline", and wrote last_seen, twice)."""
    prefix = f"pres{next(_prefixes)}:"
    x = RedisStore(engine.url, key_prefix=prefix, presence_ttl_s=1.0)
    y = RedisStore(engine.url, key_prefix=prefix, presence_ttl_s=1.0)
    t = int(time.time() * 1000)
    try:
        assert x.presence.set("u", CONNECTED, t) == ("offline", "online")
        assert y.presence.set("u", CONNECTED, t + 10) == ("online", "online")
        assert x.presence.set("u", "away", t + 20) == ("online", "away")
        # X dies (no refresh): its entry expires at about t + 1,020; Y's is refreshed.
        assert y.presence.refresh(t + 900) == []
        assert y.presence.set("u", None, t + 1_500) == ("away", "offline")
        assert y.presence.expired(t + 5_000) == []  # X's entry: nothing to announce
        assert x.presence.statuses(["u"], t + 5_000) == {}
    finally:
        x.close()
        y.close()


def test_a_status_set_queued_with_the_devices_end_stays_for_the_other_node(
    engine: Engine,
) -> None:
    """A node's queue keeps one change per user: a status set followed by that node's last
    device leaving (an app sets "away", then closes) is written as the device change with
    the status applied first. The user's device on the other node keeps it (a review found
    the status set dropped, so the other node's peers never saw "away")."""
    prefix = f"pres{next(_prefixes)}:"
    a = RedisStore(engine.url, key_prefix=prefix, presence_ttl_s=30.0)
    b = RedisStore(engine.url, key_prefix=prefix, presence_ttl_s=30.0)
    t = int(time.time() * 1000)
    try:
        assert a.presence.set("u", CONNECTED, t) == ("offline", "online")
        assert b.presence.set("u", CONNECTED, t + 10) == ("online", "online")
        assert a.presence.set_many([("u", None, t + 20, "away")]) == [("online", "away")]
        assert b.presence.statuses(["u"], t + 30) == {"u": "away"}
        # Alone: the status set first, then the last device gone: offline.
        assert b.presence.set_many([("u", None, t + 40, "busy")]) == [("away", "offline")]
        assert b.presence.statuses(["u"], t + 50) == {}
    finally:
        a.close()
        b.close()


def test_a_sweep_cut_short_by_redis_leaves_no_claimed_entry_unannounced(
    engine: Engine,
) -> None:
    """STORAGE.md, "Presence between nodes": a dead node's users are announced offline,
    and their last_seen written, once their entries expire. Node X dies with u1 and u2;
    node Y's sweep claims both entries, and Redis fails (a restart, a partition) after
    u1's expiry was decided and before u2's: u1's decision was lost with the error (its
    push never made, and not to be made again: the entry is gone), and u2's entry, taken
    off the index by the claim, was never swept: online in no query, yet never announced
    offline, its last_seen never written. Each is announced once, by a later sweep if
    not by this one."""
    prefix = f"pres{next(_prefixes)}:"
    x = RedisStore(engine.url, key_prefix=prefix, presence_ttl_s=1.0)
    y = RedisStore(engine.url, key_prefix=prefix, presence_ttl_s=1.0)
    t = int(time.time() * 1000)
    try:
        for user in ("u1", "u2"):
            assert x.presence.set(user, CONNECTED, t) == ("offline", "online")
        x.close()  # (no goodbye: its entries stay until they expire)
        real_eval, calls = y._eval, []

        def fails_second_expire(name: str, keys: Any, *args: Any) -> Any:
            if name == "presence_expire":
                calls.append(keys)
                if len(calls) == 2:
                    raise redis.ConnectionError("Redis went away mid-sweep")
            return real_eval(name, keys, *args)

        y._eval = fails_second_expire  # type: ignore[method-assign]
        announced = []
        for now in (t + 5_000, t + 8_000, t + 11_000):  # sweeps, a TTL and more apart
            with contextlib.suppress(redis.ConnectionError):
                announced += [(u, before) for u, before in y.presence.expired(now)]
        assert sorted(announced) == [("u1", "online"), ("u2", "online")]
        assert y.last_seen("u1") is not None and y.last_seen("u2") is not None
    finally:
        y.close()
