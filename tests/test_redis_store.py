"""What only the Redis engine has: lost keys (a new epoch), Redis killed and restarted
(no acked write lost, nothing acked in the outage, recovery by itself), the bound on a
compaction step, the slot of a channel's keys, WAIT, the engine URL and the checks at open.

The shared contract is tested on every engine by test_store.py and test_store_model.py;
the tests here that kill or flush a Redis start one of their own (``own_redis``).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import redis_servers
from conftest import fresh_redis_url
from tsmsg.store import (
    AppendResult,
    CompactionPolicy,
    LmdbStore,
    RedisStore,
    SendLimits,
    StoreConfig,
    StoreUnavailable,
    WriteOp,
    open_store,
    redis_store,
)
from tsmsg.store.redis_scripts import LIBRARY_NAME
from tsmsg.store.redis_store import CHANNEL_SUFFIXES, TOPIC_SUFFIX, WAIT_MARK, parse_redis_url

_prefixes = itertools.count(1)
WAIT_S = 10.0  # a write or a recovery settles well within this
OUTAGE_WRITES = 20  # writes submitted while Redis is down
RECOVERY_TRIES = 200  # attempts (WAIT_S / RECOVERY_TRIES apart) at a write after restart


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[redis_servers.RedisServer]:
    """A Redis of this test's own, to flush or kill."""
    if not redis_servers.available():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = redis_servers.RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def stores() -> Iterator[list[RedisStore]]:
    opened: list[RedisStore] = []
    yield opened
    for store in opened:
        store.close()


def _submit_all(store: RedisStore, ops: list[WriteOp]) -> None:
    """Submit ``ops`` at once (one batch) and wait until each is committed or failed."""
    for op in ops:
        op.done = threading.Event()
    store.submit(*ops)
    for op in ops:
        assert op.done is not None and op.done.wait(WAIT_S)


def _script_calls(url: str, store: RedisStore, ops: list[WriteOp]) -> int:
    """``_submit_all``, and how many script (function) calls Redis ran meanwhile."""
    with redis.Redis.from_url(url) as admin:
        admin.config_resetstat()
        _submit_all(store, ops)
        return int(admin.info("commandstats")["cmdstat_fcall"]["calls"])


def test_lost_keys_give_a_new_epoch_and_resync(
    own_redis: redis_servers.RedisServer, stores: list[RedisStore]
) -> None:
    store = RedisStore(own_redis.url)
    stores.append(store)
    old = [store.append("room", "u", f"c{i}", f"old {i}") for i in range(5)]
    epoch = store.channel("room").epoch
    assert epoch > 0 and all(r.id == f"{epoch}-{r.seq}" for r in old)
    with own_redis.client() as admin:
        admin.flushall()  # what a failover to an empty replica or a lost disk looks like
    assert store.channel("room").head == 0
    assert store.sync("room", 5, 10).resync  # a client's old position
    new = store.append("room", "u", "c0", "new 0")  # the cid is forgotten with the log
    assert (new.seq, new.dup) == (1, False)
    info = store.channel("room")
    assert info.epoch not in (0, epoch) and new.id == f"{info.epoch}-1"
    for since in (2, 5):  # a position of the old log is past the new head
        page = store.sync("room", since, 10)
        assert page.resync and page.epoch == info.epoch
    # Never two messages under one (epoch, seq): seq 1 exists in both logs, epochs differ.
    page = store.sync("room", 0, 10)
    assert [(page.epoch, e["seq"], e["text"]) for e in page.entries] == [(info.epoch, 1, "new 0")]


def test_redis_killed_and_restarted_loses_no_acked_write(
    own_redis: redis_servers.RedisServer, stores: list[RedisStore]
) -> None:
    """SIGKILL with AOF ``always``: every acked write is there after the restart; writes in
    the outage fail with store_unavailable and never get a result; writes then recover
    without anyone reopening the store."""
    store = RedisStore(own_redis.url)
    stores.append(store)
    acked: dict[str, AppendResult] = {}
    failed: list[WriteOp] = []
    stop = threading.Event()

    def writer() -> None:
        for i in itertools.count():
            if stop.is_set():
                return
            op = WriteOp("message", "room", "u", cid=f"c{i}", text=f"t{i}")
            try:
                store.write(op, timeout=WAIT_S)
            except StoreUnavailable:
                assert op.result is None
                failed.append(op)
                continue
            assert isinstance(op.result, AppendResult)
            acked[f"c{i}"] = op.result

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    wait_until(lambda: len(acked) >= 50)
    own_redis.kill()  # mid-stream
    outage = [
        WriteOp("message", "room", "u", cid=f"out{i}", text="x") for i in range(OUTAGE_WRITES)
    ]
    for op in outage:
        op.done = threading.Event()
    store.submit(*outage)
    for op in outage:
        assert op.done is not None and op.done.wait(WAIT_S)
        assert isinstance(op.error, StoreUnavailable) and op.result is None
    reason, _lag = store.health()
    assert reason is not None and str(own_redis.port) in reason
    stop.set()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    own_redis.start()  # same port, same directory: replays the AOF
    wait_until(lambda: store.health()[0] is None)
    again = store.append("room", "u", "after", "after")
    entries = store.sync("room", 0, 10**6).entries
    assert [e["seq"] for e in entries] == list(range(1, again.seq + 1))  # dense
    by_seq = {e["seq"]: e for e in entries}
    for cid, res in acked.items():  # every acked write, as acked
        assert by_seq[res.seq]["text"] == f"t{cid[1:]}" and by_seq[res.seq]["id"] == res.id
    # A write whose reply was lost may or may not be stored: a retry says which, and
    # never stores it twice.
    for op in failed:
        assert op.cid is not None and op.text is not None
        retry = store.append("room", "u", op.cid, op.text)
        assert retry.dup == (retry.seq < again.seq + 1)
    assert not [e for e in store.sync("room", 0, 10**6).entries if e["text"] == "x"]


def wait_until(condition: Any, tries: int = RECOVERY_TRIES) -> None:
    event = threading.Event()
    for _ in range(tries):
        if condition():
            return
        event.wait(WAIT_S / tries)
    raise AssertionError("condition not reached")


def test_compaction_steps_are_bounded(
    redis_server: redis_servers.RedisServer,
    stores: list[RedisStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No compaction script call drops more than COMPACT_CHUNK entries: the log shrinks
    by at most that much between two steps (the fault hook runs before each step)."""
    monkeypatch.setattr(redis_store, "COMPACT_CHUNK", 5)
    sizes: list[int] = []
    compacting = threading.Event()
    admin = redis_server.client()

    def before_step() -> None:  # also called before each write batch: those are skipped
        if compacting.is_set():
            sizes.append(admin.hlen(store._keys("room")[1]))

    store = RedisStore(
        redis_server.url,
        StoreConfig(compaction=CompactionPolicy(keep_recent=1)),
        key_prefix="bounded:",
        fault=before_step,
    )
    stores.append(store)
    for i in range(30):
        store.edit("room", "u", store.append("room", "u", f"c{i}", "x").id, "y")
    compacting.set()
    assert store.compact("room") == 59
    sizes.append(admin.hlen(store._keys("room")[1]))
    admin.close()
    assert sizes[0] == 60 and sizes[-1] == 31  # 30 messages and the newest edit remain
    assert len(sizes) >= 7
    assert all(0 <= a - b <= 5 for a, b in itertools.pairwise(sizes))


def test_a_channels_keys_share_one_cluster_slot(
    redis_cluster: redis_servers.RedisCluster, stores: list[RedisStore]
) -> None:
    store = RedisStore(redis_cluster.url, key_prefix="slots:")
    stores.append(store)
    for channel in ("room", "a}b", "{x}", "dm:alice:bob"):
        store.append(channel, "u", "c", "x")
        slots = {redis.cluster.key_slot(k) for k in store._keys(channel)}
        assert len(slots) == 1, channel
    assert store.channels() == sorted(["room", "a}b", "{x}", "dm:alice:bob"])
    assert {redis.cluster.key_slot(k) for c in ("a", "b", "c", "d") for k in store._keys(c)}


def test_messages_of_every_msgpack_str_size_pass_the_append_argument(
    redis_server: redis_servers.RedisServer, stores: list[RedisStore]
) -> None:
    """A run's messages reach the script as one msgpack array of str items (``_lua_strings``)
    and the script packs the sender itself: texts, metas and sender names at each size
    where msgpack's str header changes come back byte for byte, as LMDB stores them."""
    store = RedisStore(fresh_redis_url(redis_server))
    stores.append(store)
    sizes = [0, 1, 31, 32, 255, 256, 65535, 65536, 70000]
    senders = [1, 31, 32, 127, 128]  # bytes of the sender's name (the script packs it)
    ops = [
        WriteOp(
            "message", "room", "s" * senders[i % 5], cid=f"c{n}",
            text="é" * (n // 2) + "x" * (n % 2),  # n bytes of UTF-8
            meta={"k": "v" * n, "n": n} if i % 2 else None,
        )
        for i, n in enumerate(sizes)
    ]  # fmt: skip
    _submit_all(store, ops)
    assert all(op.error is None for op in ops)
    entries = store.sync("room", 0, 100).entries
    assert [(e["sender"], e["text"], e.get("meta")) for e in entries] == [
        (op.user, op.text, op.meta) for op in ops
    ]


@pytest.mark.parametrize("engine", ["redis", "redis-cluster"])
def test_a_batch_is_charged_for_sends_in_its_order(
    engine: str, request: pytest.FixtureRequest, stores: list[RedisStore]
) -> None:
    """One batch, several users and channels: the shared buckets grant a user's sends in
    the batch's order (a run of sends in one channel is charged at once; on one Redis one
    script call charges them all), whatever the channel; a refused send stores nothing
    and says when to retry."""
    limits = SendLimits(rate=0.01, burst=3, channel_rate=0.01, channel_burst=2)
    server = request.getfixturevalue("redis_server" if engine == "redis" else "redis_cluster")
    prefix = f"charge{next(_prefixes)}:"
    store = RedisStore(server.url, key_prefix=prefix, send_limits=limits)
    stores.append(store)
    plan = [("alice", "a")] * 3 + [("bob", "a")] + [("alice", "b")] * 2 + [("bob", "a")] * 2
    ops = [
        WriteOp("message", ch, user, cid=f"c{i}", text=f"c{i}") for i, (user, ch) in enumerate(plan)
    ]
    if engine == "redis":
        calls = _script_calls(server.url, store, ops)
    else:
        _submit_all(store, ops)
    granted = [op.error is None for op in ops]
    # alice: 2 in "a" (its channel burst), then 1 in "b" (her burst of 3 is spent);
    # bob: 2 in "a", the third over his channel burst.
    assert granted == [True, True, False, True, True, False, True, False]
    for op in ops:
        if op.error is not None:
            assert op.error.code == "rate_limited" and op.result is None
            assert op.error.extra["retry_after_ms"] >= 1
    if engine == "redis":  # one send_rate call, then appends: c0 c1 c3 | c4 | c6
        assert calls == 4
    assert [e["text"] for e in store.sync("a", 0, 10).entries] == ["c0", "c1", "c3", "c6"]
    assert [e["text"] for e in store.sync("b", 0, 10).entries] == ["c4"]


def test_send_budgets_live_in_memory_only(
    own_redis: redis_servers.RedisServer, stores: list[RedisStore]
) -> None:
    """The shared send buckets are no data: their writes are not appended to the AOF
    (their charge waits for no fsync), so a Redis that restarts from its AOF, with no
    rewrite since, has every message and every bucket full again: one burst more may be
    sent (STORAGE.md, "Shared send limits")."""
    limits = SendLimits(rate=0.01, burst=2, channel_rate=0.01, channel_burst=2)
    store = RedisStore(own_redis.url, send_limits=limits)
    stores.append(store)

    def send(cids: list[str]) -> list[bool]:
        ops = [WriteOp("message", "a", "alice", cid=c, text=c) for c in cids]
        _submit_all(store, ops)
        return [op.error is None for op in ops]

    assert send(["c0", "c1", "c2"]) == [True, True, False]  # a burst of 2
    with redis.Redis.from_url(own_redis.url) as admin:
        assert any(b":rate" in key for key in admin.keys())  # the buckets are there
    own_redis.kill()
    own_redis.start()  # replays the AOF
    wait_until(lambda: store.health()[0] is None)
    with redis.Redis.from_url(own_redis.url) as admin:
        assert not any(b":rate" in key for key in admin.keys())
    assert [e["text"] for e in store.sync("a", 0, 10).entries] == ["c0", "c1"]
    assert send(["c3", "c4", "c5"]) == [True, True, False]


def test_a_run_of_messages_to_a_channel_is_one_script_call(
    redis_server: redis_servers.RedisServer, stores: list[RedisStore]
) -> None:
    """A batch's consecutive messages to one channel are stored by one ``append`` call (at
    most APPEND_RUN_MAX each), with the same results as one call per message: dense seqs
    in the batch's order, a cid repeated in the run or known from before answered with its
    first result, another channel's message or an edit ending a run."""
    url = fresh_redis_url(redis_server)
    store = RedisStore(url)
    stores.append(store)
    known = store.append("a", "u", "known", "first")
    n = redis_store.APPEND_RUN_MAX + 10
    ops = [WriteOp("message", "a", "u", cid=f"m{i}", text=f"m{i}") for i in range(n)]
    ops[5] = WriteOp("message", "a", "u", cid="m1", text="again")  # a repeat in the run
    ops[7] = WriteOp("message", "a", "u", cid="known", text="again")  # known from before
    ops += [
        WriteOp("message", "b", "u", cid="b0", text="b0"),
        WriteOp("edit", "a", "u", target=known.id, text="edited"),
        WriteOp("message", "a", "u", cid="late", text="late"),
        WriteOp("message", "a", "v", cid="m3", text="another sender's m3"),
    ]
    # Runs: 128 + 10 messages to "a", "b0", the edit, then "late" and v's m3 to "a".
    assert _script_calls(url, store, ops) == 5
    assert all(op.error is None for op in ops)
    results = [op.result for op in ops]
    assert all(isinstance(r, AppendResult) for r in results)
    dups = [i for i, r in enumerate(results) if isinstance(r, AppendResult) and r.dup]
    assert dups == [5, 7]
    assert results[5] == results[1]._replace(dup=True)
    assert results[7] == known._replace(dup=True)
    stored = [r for i, r in enumerate(results[:n]) if i not in (5, 7)]
    assert [r.seq for r in stored if isinstance(r, AppendResult)] == list(range(2, n))
    texts = [e.get("text") for e in store.sync("a", 0, 1000).entries]
    expected = [f"m{i}" for i in range(n) if i not in (5, 7)]
    assert texts == ["edited", *expected, "edited", "late", "another sender's m3"]
    assert store.sync("b", 0, 10).entries[0]["text"] == "b0"


def test_a_runs_messages_keep_their_own_answers_in_a_new_or_restored_log(
    redis_server: redis_servers.RedisServer, stores: list[RedisStore]
) -> None:
    """A run that creates its channel answers a cid repeated in it with the first result;
    an invalid or rate-limited message amid a run fails alone, the others keep their own
    answers; in a log restored with its ids, a run's ids (and its dups') carry its prefix."""
    url = fresh_redis_url(redis_server)
    limits = SendLimits(rate=0.01, burst=100, channel_rate=0.01, channel_burst=3)
    store = RedisStore(url, send_limits=limits, epochs=lambda: 77, clock=lambda: 1000)
    stores.append(store)
    plan = [("u", "a"), ("u", "a"), ("u", ""), ("u", "b"), ("w", "c"), ("u", "d")]
    ops = [WriteOp("message", "new", u, cid=c, text=f"{u}{c}") for u, c in plan]
    store.append("old", "u", "x", "before the restore")
    with redis.Redis.from_url(url) as admin:
        admin.hset(store._keys("old")[0], "pfx", "00000000000000ab")  # as a restore keeps it
    ops += [WriteOp("message", "old", "w", cid=c, text=c) for c in ("y", "y", "x")]
    _submit_all(store, ops)
    got = [op.result if op.error is None else op.error.code for op in ops]
    assert got == [
        AppendResult("new", 1, "77-1", 1000),
        AppendResult("new", 1, "77-1", 1000, dup=True),
        "internal",  # no cid
        AppendResult("new", 2, "77-2", 1000),
        AppendResult("new", 3, "77-3", 1000),
        "rate_limited",  # u's fourth send to "new" (the dup counts: it was sent)
        AppendResult("old", 2, "00000000000000ab-2", 1000),
        AppendResult("old", 2, "00000000000000ab-2", 1000, dup=True),
        AppendResult("old", 3, "00000000000000ab-3", 1000),  # w's x, not u's
    ]
    assert [op.epoch for op in ops[:6]] == [77, 0, 0, 77, 77, 0]
    assert [e["text"] for e in store.sync("new", 0, 10).entries] == ["ua", "ub", "wc"]
    assert [e["id"] for e in store.sync("old", 1, 10).entries] == [
        "00000000000000ab-2", "00000000000000ab-3",
    ]  # fmt: skip


def test_more_runs_than_one_charge_call_takes_are_charged_in_order(
    redis_server: redis_servers.RedisServer, stores: list[RedisStore]
) -> None:
    """A batch of more runs than SEND_RATE_RUNS_MAX: the charge takes several calls, and a
    user's runs split over them are still charged in the batch's order."""
    most = redis_store.SEND_RATE_RUNS_MAX
    n = most + 72
    limits = SendLimits(rate=0.01, burst=n - 20, channel_rate=0.01, channel_burst=n)
    url = fresh_redis_url(redis_server)
    store = RedisStore(url, send_limits=limits)
    stores.append(store)
    ops = [  # alice alternates channels: every send is a run of its own
        WriteOp("message", "ab"[i % 2], "alice", cid=f"c{i}", text=f"c{i}") for i in range(n)
    ]
    calls = _script_calls(url, store, ops)
    assert [op.error is None for op in ops] == [True] * (n - 20) + [False] * 20
    assert all(op.error.code == "rate_limited" for op in ops[n - 20 :] if op.error)
    assert calls == 2 + (n - 20)  # two charge calls; then each message alone (channels alternate)


def test_runs_are_sent_again_when_redis_lost_the_library(
    own_redis: redis_servers.RedisServer, stores: list[RedisStore]
) -> None:
    """Redis lost the function library (FUNCTION FLUSH here; a Redis that lost its data):
    a batch's charge and append calls find no function, are sent again once the library
    is loaded, and every message gets its own result, once."""
    limits = SendLimits(rate=1000.0, burst=1000, channel_rate=1000.0, channel_burst=1000)
    store = RedisStore(own_redis.url, send_limits=limits)
    stores.append(store)
    first = store.append("room", "u", "c0", "before")
    with own_redis.client() as admin:
        admin.function_flush()
    ops = [WriteOp("message", "room", "uv"[i % 2], cid=f"c{i}", text=f"t{i}") for i in range(1, 9)]
    ops.insert(3, WriteOp("message", "room", "u", cid="c0", text="again"))  # known: a dup
    _submit_all(store, ops)
    assert [op.error for op in ops] == [None] * len(ops)
    results = [op.result for op in ops]
    assert results[3] == first._replace(dup=True)
    stored = [r for i, r in enumerate(results) if i != 3 and isinstance(r, AppendResult)]
    assert [r.seq for r in stored] == list(range(2, 10))
    assert [e["text"] for e in store.sync("room", 0, 20).entries] == ["before"] + [
        f"t{i}" for i in range(1, 9)
    ]
    with own_redis.client() as admin:
        admin.function_flush()
    assert store.history("room", None, 1).messages[0]["text"] == "t8"  # a read: loaded too


def test_a_leave_is_not_undone_by_its_join_sent_again(
    own_redis: redis_servers.RedisServer, stores: list[RedisStore]
) -> None:
    """After the library was lost, a batch's join (a function: not found) and then leave
    (a plain SREM: applied) of one user: the join is sent again once the library is
    loaded, and the leave with it, after it, so the user is not left a member."""
    store = RedisStore(own_redis.url)
    stores.append(store)
    with own_redis.client() as admin:
        admin.function_flush()
    join, leave = WriteOp("member", "room", "alice"), WriteOp("unmember", "room", "alice")
    _submit_all(store, [join, leave])
    assert (join.error, leave.error) == (None, None)
    assert store.channels_of("alice") == []


def _libraries(server: redis_servers.RedisServer) -> list[str]:
    with server.client() as c:
        return [
            dict(zip(lib[::2], lib[1::2], strict=True))[b"library_name"].decode()
            for lib in c.function_list()
        ]


def test_the_library_outlives_a_restart_and_reaches_replicas(
    own_redis: redis_servers.RedisServer, stores: list[RedisStore], tmp_path: Path
) -> None:
    """The scripts are a function library, which Redis keeps in its AOF and sends to its
    replicas (a script cache started empty after a restart or a failover, and calls sent
    again after a NOSCRIPT could land after later ones): a replica has it, a restarted
    Redis has it, and the node's writes after the restart find their functions, none
    sent again and no library loaded again."""
    store = RedisStore(own_redis.url)
    stores.append(store)
    store.append("room", "u", "c0", "before")
    replica = redis_servers.start_replica(tmp_path / "replica", own_redis)
    try:
        wait_until(lambda: _libraries(replica) == [LIBRARY_NAME])  # a failover finds it
    finally:
        replica.kill()
    own_redis.kill()
    own_redis.start()  # replays the AOF
    assert _libraries(own_redis) == [LIBRARY_NAME]
    with own_redis.client() as admin:
        admin.config_resetstat()
        wait_until(lambda: store.health()[0] is None)
        ops = [WriteOp("message", "room", "u", cid=f"c{i}", text=f"t{i}") for i in range(1, 4)]
        ops.append(WriteOp("member", "room", "u"))
        _submit_all(store, ops)
        assert [op.error for op in ops] == [None] * 4
        assert [e["text"] for e in store.sync("room", 0, 10).entries] == [
            "before",
            "t1",
            "t2",
            "t3",
        ]
        stats = admin.info("commandstats")
        assert stats["cmdstat_fcall"]["failed_calls"] == 0
        assert "cmdstat_function|load" not in stats


def test_a_primary_that_joined_without_the_library_gets_it_from_the_writer(
    stores: list[RedisStore], tmp_path: Path
) -> None:
    """A primary joins the cluster without the library (CLUSTER MEET; `redis-cli --cluster
    add-node` copies it) and a channel's slot moves to it: the writer's next call finds
    no function there, and the library is loaded through the writer's own client (the
    store's other client does not know the new primary yet), so the call sent again
    succeeds: the write is not refused."""
    if not redis_servers.available():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    cluster = redis_servers.RedisCluster(tmp_path / "cluster").start()
    new = redis_servers.RedisServer(tmp_path / "new", cluster=True).start()
    try:
        store = RedisStore(cluster.url)
        stores.append(store)
        store.append("room", "u", "c0", "before")
        key = store._keys("room")[0]
        slot = store._client.keyslot(key)
        port = store._client.get_node_from_key(key).port
        old = next(n for n in cluster.nodes if n.port == port)
        with old.client() as src, new.client() as dst:
            dst.execute_command("CLUSTER MEET", "127.0.0.1", old.port)
            new_id = dst.execute_command("CLUSTER MYID").decode()
            old_id = src.execute_command("CLUSTER MYID").decode()

            def known() -> bool:
                if b"cluster_state:ok" not in dst.execute_command(
                    "CLUSTER", "INFO", NEVER_DECODE=True
                ):
                    return False
                for node in cluster.nodes:
                    with node.client() as c:
                        if new_id.encode() not in c.execute_command(
                            "CLUSTER", "NODES", NEVER_DECODE=True
                        ):
                            return False
                return True

            wait_until(known)
            assert not dst.function_list()  # joined without it
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", old_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", new_id)
            while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", new.port, "", 0, 5000, "KEYS", *keys)
            for node in [*cluster.nodes, new]:
                with node.client() as c:
                    c.execute_command("CLUSTER SETSLOT", slot, "NODE", new_id)
            assert store.append("room", "u", "c1", "after").seq == 2
            assert _libraries(new) == [LIBRARY_NAME]
    finally:
        new.stop()
        cluster.stop()


def test_a_full_redis_lets_a_node_start_reads_and_compaction_free_memory(
    own_redis: redis_servers.RedisServer, stores: list[RedisStore]
) -> None:
    """Over maxmemory (noeviction) Redis refuses a function that may write before it runs,
    and FUNCTION LOAD: a node still opens (the library is there: it is looked for, not
    loaded again), reads work, a write is refused (store_unavailable), and compaction
    runs (declared allow-oom: it is how an operator frees memory)."""
    store = RedisStore(own_redis.url, StoreConfig(compaction=CompactionPolicy(keep_recent=1)))
    stores.append(store)
    for i in range(100):
        store.append("room", "u", f"c{i}", "x" * 2000)
    with own_redis.client() as admin:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", admin.info("memory")["used_memory"] - 50_000)
        try:
            with pytest.raises(redis.ResponseError, match="maxmemory"):
                admin.set("probe", "x")  # full
            again = RedisStore(own_redis.url)  # a node (re)starting
            stores.append(again)
            assert again.sync("room", 0, 5).entries[0]["text"] == "x" * 2000
            with pytest.raises(StoreUnavailable):
                again.append("room", "u", "new", "y")
            assert store.compact("room") == 99  # (when Redis frees it is Redis's affair)
            assert [e["seq"] for e in again.sync("room", 99, 200).entries] == [100]
        finally:
            admin.config_set("maxmemory", 0)


def test_a_run_redis_refuses_fails_whole_and_stores_nothing(
    own_redis: redis_servers.RedisServer, stores: list[RedisStore]
) -> None:
    """Redis refuses scripts that write (OOM under maxmemory with noeviction): every
    message of the run fails with store_unavailable and no result, nothing is stored, no
    seq is used; once Redis takes writes again they go on from the same head."""
    store = RedisStore(own_redis.url)
    stores.append(store)
    store.append("room", "u", "c0", "before")
    with own_redis.client() as admin:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        try:
            ops = [WriteOp("message", "room", "u", cid=f"c{i}", text=f"t{i}") for i in range(5)]
            _submit_all(store, ops)
        finally:
            admin.config_set("maxmemory", 0)
    for op in ops:
        assert op.error is not None and op.error.code == "store_unavailable", op.error
        assert op.result is None
    assert store.channel("room").head == 1
    again = [WriteOp("message", "room", "u", cid=f"c{i}", text=f"t{i}") for i in range(1, 5)]
    _submit_all(store, again)
    assert [op.result.seq for op in again if isinstance(op.result, AppendResult)] == [2, 3, 4, 5]


def test_wait_for_missing_replicas_acks_nothing(
    redis_server: redis_servers.RedisServer, stores: list[RedisStore]
) -> None:
    store = RedisStore(redis_server.url, key_prefix="wait:", wait_replicas=1, wait_timeout_ms=50)
    stores.append(store)
    with pytest.raises(StoreUnavailable, match="only 0 of 1 replicas"):
        store.append("room", "u", "c", "x")


def test_a_batch_under_wait_writes_so_that_wait_covers_what_it_acknowledges(
    own_redis: redis_servers.RedisServer, stores: list[RedisStore], tmp_path: Path
) -> None:
    """With ``wait_replicas``, a batch that writes nothing (a retried cid, answered from
    the log) is still acknowledged only after WAIT, and since Redis 7.2 WAIT waits only
    for the connection's last write that reached the replication stream: the original
    write, made by another connection (another node, whose WAIT failed), would be
    acknowledged unconfirmed. So every batch writes a mark before its WAIT, which the
    replica has once the batch is acknowledged (Redis 7.0, installed here, waits for the
    whole stream either way: this checks the mark)."""
    replica = redis_servers.start_replica(tmp_path / "replica", own_redis)
    try:
        with replica.client() as c, own_redis.client() as primary:
            prefix = f"mark{next(_prefixes)}:"
            first = RedisStore(own_redis.url, key_prefix=prefix, wait_replicas=1)
            stores.append(first)
            assert not first.append("room", "u", "c1", "x").dup
            mark = prefix.encode() + WAIT_MARK
            primary.delete(mark)
            primary.execute_command("WAIT", 1, int(WAIT_S * 1000))
            assert not c.exists(mark)
            other = RedisStore(own_redis.url, key_prefix=prefix, wait_replicas=1)
            stores.append(other)
            retry = other.append("room", "u", "c1", "x")  # answered from the log
            assert retry.dup and retry.seq == 1
            assert c.exists(mark)  # written by that batch, on the replica before its ack
    finally:
        replica.kill()


def test_a_channel_created_by_a_batch_of_unknown_outcome_is_registered(
    redis_server: redis_servers.RedisServer, stores: list[RedisStore]
) -> None:
    """A batch whose outcome is unknown (here WAIT not confirmed; a reply lost with its
    connection is the same) may have created channels: their names are registered all
    the same (at once, or with a later batch if Redis is away). Before, they never were:
    the retry of the cid is a dup (the channel is no longer new), so compact_all() (the
    hourly compaction and retention) and the tools never saw the channel."""
    prefix = f"reg{next(_prefixes)}:"
    waiting = RedisStore(redis_server.url, key_prefix=prefix, wait_replicas=1, wait_timeout_ms=50)
    stores.append(waiting)
    with pytest.raises(StoreUnavailable, match="only 0 of 1 replicas"):
        waiting.append("room", "u", "c1", "x")  # stored, not confirmed: outcome unknown
    other = RedisStore(redis_server.url, key_prefix=prefix)  # another node, no WAIT
    stores.append(other)
    assert other.append("room", "u", "c1", "x").dup  # the retry: the first seq
    assert other.channels() == ["room"]
    assert other.compact_all() == {"room": 0}


def test_unreachable_redis_fails_at_open_in_one_line() -> None:
    port = redis_servers.free_port()
    with pytest.raises(StoreUnavailable) as exc:
        RedisStore(f"redis://127.0.0.1:{port}")
    assert f"127.0.0.1:{port}" in exc.value.message and "\n" not in exc.value.message


def test_a_configuration_that_can_lose_acks_is_warned_about(
    own_redis: redis_servers.RedisServer,
    stores: list[RedisStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="tsmsg.store"):
        stores.append(RedisStore(own_redis.url))
    assert not caplog.records  # the fixtures' Redis runs as STORAGE.md asks
    with own_redis.client() as admin:
        admin.config_set("appendfsync", "everysec")
        admin.config_set("maxmemory-policy", "allkeys-lru")
    with caplog.at_level(logging.WARNING, logger="tsmsg.store"):
        stores.append(RedisStore(own_redis.url))
    text = caplog.text
    assert "appendfsync everysec" in text and "allkeys-lru" in text


def test_password_file(
    own_redis: redis_servers.RedisServer, stores: list[RedisStore], tmp_path: Path
) -> None:
    with own_redis.client() as admin:
        admin.config_set("requirepass", "s3cret")
    with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1"):
        RedisStore(own_redis.url)
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret\n")
    store = RedisStore(own_redis.url, password_file=str(secret))
    stores.append(store)
    assert store.append("room", "u", "c", "x").seq == 1
    stores.append(RedisStore(f"redis://:s3cret@127.0.0.1:{own_redis.port}"))


@pytest.mark.parametrize(
    "url",
    [
        "redis://",
        "redis://host",
        "redis://host:0",
        "redis://host:port",
        "redis://a:1,b:2",
        "redis://host:1/x",
        "redis-cluster://a:1/0",
        "http://host:1",
        "lmdb",
        "redis://host:1?tiemout=1",  # redis-py would take it as a connection argument
        "rediss://host:1/0?ssl_ca_certs=/ca.pem&socket_timeout=1",
    ],
)
def test_bad_engine_urls(url: str) -> None:
    with pytest.raises(ValueError, match=r"engine|Redis address|database|one HOST:PORT"):
        parse_redis_url(url)


def test_engine_urls() -> None:
    one = parse_redis_url("rediss://user:p%40ss@cache.example:6380/2")
    assert (one.cluster, one.nodes, one.username, one.password) == (
        False,
        (("cache.example", 6380),),
        "user",
        "p@ss",
    )
    private_ca = parse_redis_url("rediss://cache.example:6380/1?ssl_ca_certs=/etc/ca.pem")
    assert private_ca.nodes == (("cache.example", 6380),)  # TLS options go to redis-py
    many = parse_redis_url("redis-cluster://10.0.0.1:7000,10.0.0.2:7001")
    assert many.cluster and many.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert many.where == "10.0.0.1:7000,10.0.0.2:7001"


def test_open_store_chooses_the_engine(
    redis_server: redis_servers.RedisServer, tmp_path: Path
) -> None:
    for engine, kind in (("lmdb", LmdbStore), (redis_server.url, RedisStore)):
        store = open_store(engine, tmp_path / "data")
        try:
            assert isinstance(store, kind)
        finally:
            store.close()
    with pytest.raises(ValueError, match="engine must be lmdb or a Redis URL"):
        open_store("postgres://x", tmp_path)
    with pytest.raises(ValueError, match="need a Redis engine"):
        open_store("lmdb", tmp_path / "data", wait_replicas=1)


def test_key_layout_matches_storage_md() -> None:
    doc = (Path(__file__).parent.parent / "STORAGE.md").read_text()
    for suffix in (*CHANNEL_SUFFIXES, TOPIC_SUFFIX):
        assert f"`{{c:<channel>}}:{suffix.decode()}`" in doc, suffix
