"""Adversarial tests of the two storage engines (LMDB, Redis): where they disagree with
each other or with STORAGE.md, and where an operation (export, restore, compaction,
retention, dedup pruning, lost Redis keys) loses or changes stored data.

Fixtures and helpers are the suites' own: ``open_store``/``store_engine`` (test_store.py,
conftest.py) run a test on LMDB, one Redis and a Redis Cluster; ``make_target``/``run``/
``dumps`` (test_cli.py) drive ``tsmsg backup --export`` and ``tsmsg restore``.
"""

# ruff: noqa: F811  (the suites' fixtures are imported by name and taken as parameters)

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import redis

from conftest import StoreEngine
from test_cli import Target, data_dir, dumps, make_target, run  # noqa: F401
from test_encryption import keyring, write_key_file
from test_store import (  # noqa: F401  (fixtures used by name)
    T0,
    AnyStore,
    FakeClock,
    OpenStore,
    clock,
    db_path,
    open_store,
    set_compact_chunk,
    store,
)
from tsmsg.store import (
    AppendResult,
    CompactionPolicy,
    LimitExceeded,
    LmdbStore,
    NotFound,
    RedisStore,
    StoreConfig,
    WriteOp,
)
from tsmsg.store import redis_store as redis_store_module
from tsmsg.store.export import ChannelDump, ExportWriter, restore, write_export

POLICY = CompactionPolicy(keep_recent=4, tombstone_retention_ms=1000)
FAST = StoreConfig(durability="async", compaction=POLICY)
KEY = ("k1", bytes(range(32)))

# Names at the store's limits (STORAGE.md: "Names (channels, users) are UTF-8 without NUL
# bytes, at most 128 bytes").
CH_UNI = "ü-room-名前"
CH_MAX = "\U0001d11e" * 32  # 32 four-byte characters: exactly 128 bytes
CH_PLAIN = "plain"
CH_RESET = "reset-me"
CH_EMPTY = "emptied"
U_MAX = "ä" * 64  # 128 bytes
BOB, CAROL = "bob", "carol"
META = {
    "a": {"b": [1, "ü", None, True, 2**40, -7, 1.5, 2**64 - 1, -(2**63)]},
    "ключ": "значение",
    "": {},
    "bin": b"\x00\xff\xc1",
}
BIG = "x" * 70_000 + "€"  # over msgpack str16: str32 on every path


def open_engine(target: Target, clock: FakeClock, config: StoreConfig = FAST) -> AnyStore:
    """A store on ``target`` with this module's policy and the test's clock."""
    if target.engine == "lmdb":
        return LmdbStore(target.data_dir, config, clock=clock)
    return RedisStore(target.engine, config, clock=clock)


def every_cid(dump_channels: list[Any]) -> dict[str, list[tuple[str, str]]]:
    return {c.name: [(s, cid) for s, cid, _, _ in c.dedup] for c in dump_channels}


def observe(
    store: AnyStore, channels: list[str], users: list[str], cids: dict[str, list[tuple[str, str]]]
) -> dict[str, Any]:
    """Everything a client can read from ``store`` about these channels and users."""
    out: dict[str, Any] = {"channels": store.channels()}
    for ch in channels:
        info = store.channel(ch)
        page = store.sync(ch, info.horizon, 10**6)
        pages, before = [], None
        while True:  # history, three messages a page, newest first
            h = store.history(ch, before, 3)
            pages.append(h.messages)
            if not h.more or not h.messages:
                break
            before = h.messages[0]["seq"]
        out[ch] = {
            "info": (info.head, info.horizon, info.epoch),
            "sync": (page.entries, page.more, page.resync, page.head, page.epoch),
            "below": store.sync(ch, info.horizon - 1, 5).resync if info.horizon else None,
            "past": store.sync(ch, info.head + 1, 5).resync,
            "history": pages,
            "cursors": {u: store.read_cursor(u, ch) for u in users},
            "unread": {u: store.unread(u, ch) for u in users},
            "dups": {f"{s}/{c}": store.lookup_dup(ch, s, c) for s, c in cids.get(ch, [])},
        }
    for u in users:
        member = [store.is_member(u, c) for c in channels]
        out[u] = (store.channels_of(u), store.last_seen(u), member)
    return out


def build_source(store: LmdbStore, clock: FakeClock) -> dict[str, str]:
    """Every kind of stored state, in plain and unicode names at the limits: messages
    (empty, large, with nested meta), edits, deletes of edited messages, compaction with a
    tombstone kept and one dropped, edits and deletes of messages below the horizon, a reset
    channel, cursors below the horizon, at and past the head, memberships, last_seen."""
    ids: dict[str, str] = {}
    for i in range(12):
        sender = U_MAX if i % 2 == 0 else BOB
        text = ["", "héllo\x00wörld", BIG, "plain"][i % 4]
        meta = META if i % 3 == 0 else None
        ids[f"a{i}"] = store.append(CH_UNI, sender, f"a{i}", text, meta).id
    store.edit(CH_UNI, U_MAX, ids["a0"], "first edit")
    store.edit(CH_UNI, U_MAX, ids["a0"], "second edit ✓")
    store.edit(CH_UNI, BOB, ids["a1"], "bob's edit")
    store.edit(CH_UNI, U_MAX, ids["a2"], "edit before delete")
    store.delete(CH_UNI, U_MAX, ids["a2"])  # tombstone at T0: expires before compaction
    clock.advance(2000)
    store.delete(CH_UNI, BOB, ids["a5"], moderator=True)  # tombstone kept (recent)
    assert store.compact(CH_UNI) > 0
    for i in range(12, 15):
        ids[f"a{i}"] = store.append(CH_UNI, CAROL, f"a{i}", f"after {i}").id
    store.edit(CH_UNI, U_MAX, ids["a0"], "edited below the horizon")  # target < horizon
    store.delete(CH_UNI, BOB, ids["a1"])  # below the horizon, its edit compacted away
    store.set_read(U_MAX, CH_UNI, 3)  # below the horizon
    store.set_read(BOB, CH_UNI, 10**6)  # clamped to the head
    store.set_read(CAROL, CH_UNI, store.channel(CH_UNI).horizon)

    for i in range(5):
        ids[f"b{i}"] = store.append(CH_MAX, U_MAX, f"b{i}", f"max {i}", {"n": i, "ü": [i]}).id
    store.edit(CH_MAX, U_MAX, ids["b4"], "")
    store.set_read(BOB, CH_MAX, 2)

    for i in range(8):
        ids[f"c{i}"] = store.append(CH_PLAIN, BOB, f"c{i}", f"c {i}").id
    ids["nul"] = store.append(CH_PLAIN, CAROL, "nul\x00cid", "a cid with a NUL").id
    store.set_read(CAROL, CH_PLAIN, 1)

    store.append(CH_RESET, BOB, "r0", "before the reset")
    store.set_read(CAROL, CH_RESET, 1)
    store.reset_channel(CH_RESET)
    ids["r0"] = store.append(CH_RESET, BOB, "r0", "after the reset").id  # a new message
    store.append(CH_EMPTY, BOB, "e0", "dropped by a reset")
    store.reset_channel(CH_EMPTY)  # an empty log under a new epoch: kept as such

    for user, ch in [(U_MAX, CH_UNI), (U_MAX, CH_MAX), (BOB, CH_UNI), (BOB, "never-written")]:
        store.write(WriteOp("member", ch, user))
    store.write(WriteOp("seen", "", U_MAX))
    clock.advance(7)
    store.write(WriteOp("seen", "", CAROL))
    return ids


def retention_pass(store: AnyStore) -> None:
    """CH_PLAIN under retention by count (a store of another policy): dups of dropped
    messages answer ts 0 from then on."""
    store.compact(CH_PLAIN)


CHANNELS = [CH_UNI, CH_MAX, CH_PLAIN, CH_RESET, CH_EMPTY]
USERS = [U_MAX, BOB, CAROL]


def follow_up(store: AnyStore, clock: FakeClock, ids: dict[str, str], cids: Any) -> list[Any]:
    """The same writes on a source and on its restored copies: retried cids, new writes on
    restored messages (edit chains and indexes the restore derived), a compaction."""
    out: list[Any] = []
    for ch, pairs in cids.items():
        for sender, cid in pairs:
            out.append(store.append(ch, sender, cid, "retried"))
    out.append(store.edit(CH_UNI, U_MAX, ids["a0"], "after the move"))
    out.append(store.edit(CH_MAX, U_MAX, ids["b4"], "after the move"))
    out.append(store.delete(CH_MAX, U_MAX, ids["b4"]))  # redacts the restored edits
    out.append(store.delete(CH_UNI, CAROL, ids["a13"]))
    for target in (ids["a2"], ids["a1"]):  # deleted: tombstone gone / tombstone kept
        try:
            store.edit(CH_UNI, U_MAX, target, "nope", moderator=True)
            out.append("edited")
        except NotFound:
            out.append("not_found")
    out.append(store.append(CH_UNI, BOB, "fresh", "new"))
    out.append(store.append(CH_EMPTY, BOB, "e0", "first of the new log"))
    out.append(store.set_read(U_MAX, CH_UNI, 16))
    clock.advance(5000)  # every tombstone's retention is over
    out.append(store.compact(CH_UNI))
    out.append(store.compact(CH_MAX))
    return out


ROUND_TRIPS = [
    pytest.param("redis", False, id="via-redis"),
    pytest.param("redis-cluster", False, id="via-cluster"),
    pytest.param("redis", True, id="via-redis-encrypted"),
]


@pytest.mark.parametrize(("via", "encrypted"), ROUND_TRIPS)
def test_round_trip_lmdb_redis_lmdb_answers_exactly_as_the_source(
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    via: str,
    encrypted: bool,
) -> None:
    """STORAGE.md, Exports: "The loaded store answers every read and every retried cid as
    the exported one did: same epochs, heads, horizons, entries (so the same sync and
    history pages), message ids ..., cursors, memberships and last_seen." Checked on the
    whole read surface, before and after the same follow-up writes on every copy."""
    clock = FakeClock()
    key_args: list[str] = []
    config = FAST
    if encrypted:
        key_file = write_key_file(tmp_path / "keys", KEY)
        key_args = ["--encryption-key-file", str(key_file)]
        config = StoreConfig(durability="async", compaction=POLICY, encryption=keyring(KEY))
    source = make_target(request, "lmdb", tmp_path / "source")
    with open_engine(source, clock, config) as s:
        ids = build_source(s, clock)
    retention = StoreConfig(
        durability="async",
        compaction=CompactionPolicy(keep_recent=4, tombstone_retention_ms=1000, max_count=3),
        encryption=config.encryption,
    )
    with open_engine(source, clock, retention) as s:
        retention_pass(s)
        assert s.channel(CH_PLAIN).horizon == 6

    first = tmp_path / "first.export"
    code, _, err = run(capsys, "backup", "--export", *source.args, *key_args, str(first))
    assert (code, err) == (0, "")
    channels, _ = dumps(first)
    cids = every_cid(channels)
    assert len(cids[CH_UNI]) == 15 and cids[CH_RESET] == [(BOB, "r0")]

    with open_engine(source, clock, config) as s:
        expected = observe(s, CHANNELS, USERS, cids)
    middle = make_target(request, via, tmp_path / "middle")
    code, _, err = run(capsys, "restore", *middle.args, str(first))
    assert code == 0
    if encrypted:  # Redis has no encryption at rest: the text lands in plaintext, said so
        assert err.startswith("tsmsg: warning: ") and err.count("\n") == 1, err
        assert "stored here in plaintext" in err
    else:
        assert err == ""
    with open_engine(middle, clock) as m:
        assert observe(m, CHANNELS, USERS, cids) == expected
    second = tmp_path / "second.export"
    assert run(capsys, "backup", "--export", *middle.args, str(second))[0] == 0
    assert dumps(second) == dumps(first)

    back = make_target(request, "lmdb", tmp_path / "back")
    code, _, err = run(capsys, "restore", *back.args, *key_args, str(second))
    assert (code, err) == (0, "")
    with open_engine(back, clock, config) as b:
        assert observe(b, CHANNELS, USERS, cids) == expected
    third = tmp_path / "third.export"
    assert run(capsys, "backup", "--export", *back.args, *key_args, str(third))[0] == 0
    assert dumps(third) == dumps(first)
    if encrypted:  # the restored directory holds no plaintext of a live message
        assert b"after 12" not in (tmp_path / "back" / "data.mdb").read_bytes()

    # The same writes on each copy give the same answers and leave the same state.
    now = clock.now
    results, states = [], []
    for target, cfg in ((source, config), (middle, FAST), (back, config)):
        clock.now = now
        with open_engine(target, clock, cfg) as st:
            results.append(follow_up(st, clock, ids, cids))
            states.append(observe(st, CHANNELS, USERS, cids))
    assert results[1] == results[0]
    assert results[2] == results[0]
    assert states[1] == states[0]
    assert states[2] == states[0]


# ------------------------------------------------------------------ edits per message


def test_edits_per_message_are_bounded_on_every_engine(open_store: OpenStore) -> None:
    """STORAGE.md, Log entries: "A message may have at most `max_edits_per_message` edits
    (1,000; `StoreConfig.max_edits`): one more is refused with `limit_exceeded`, which
    bounds what a delete rewrites in its transaction." Redis engine: "everything above
    lives in Redis instead of LMDB ..., with the same answers"."""
    store = open_store(StoreConfig(max_edits=3))
    msg = store.append("room", "u", "c1", "v0")
    for i in range(3):
        store.edit("room", "u", msg.id, f"v{i + 1}")
    with pytest.raises(LimitExceeded):
        store.edit("room", "u", msg.id, "one too many")
    assert store.channel("room").head == 4  # nothing stored for the refused edit
    assert store.history("room", None, 5).messages[0]["text"] == "v3"


# ------------------------------------------------------------------ dedup


def test_a_cid_at_the_edge_of_the_dedup_window(open_store: OpenStore, clock: FakeClock) -> None:
    """STORAGE.md, Dedup: journal entries older than `dedup_retention_ms` are pruned
    (oldest first, at each commit). A cid exactly `dedup_retention_ms` old is still in the
    window; one millisecond older it is pruned by the next commit, and a retry is a new
    message -- the same answer on every engine, before and after a restart."""
    config = StoreConfig(dedup_retention_ms=1000)
    store = open_store(config)
    old = store.append("room", "u", "old", "x")
    clock.advance(1000)
    store.append("room", "u", "edge", "y")  # prunes what is older than now - 1000
    assert store.lookup_dup("room", "u", "old") == old._replace(dup=True)
    assert store.append("room", "u", "old", "again") == old._replace(dup=True)
    clock.advance(1)
    store.append("room", "u", "later", "z")  # "old" is now 1001 ms old: pruned
    before_restart = store.append("room", "u", "old", "retried")
    store.close()
    store = open_store(config)
    clock.advance(1)
    after_restart = store.lookup_dup("room", "u", "old")
    # Before the restart the engines must agree with each other and with the restarted
    # store: a pruned cid is forgotten (new seq 4), never a dup in one process only.
    assert (before_restart.seq, before_restart.dup) == (4, False)
    assert after_restart is not None and after_restart.seq == 4


def test_dup_after_a_reset_is_a_new_message_and_old_ids_are_not_found(store: AnyStore) -> None:
    """STORAGE.md: `epoch` changes whenever a channel's log is reset (seq 1 again); a
    cid of the old log names nothing in the new one, nor does an old message id."""
    first = store.append("room", "u", "cid", "old text")
    store.append("room", "v", "cid", "other sender")
    epoch = store.channel("room").epoch
    store.reset_channel("room")
    assert store.lookup_dup("room", "u", "cid") is None
    again = store.append("room", "u", "cid", "new text")
    info = store.channel("room")
    assert (again.seq, again.dup) == (1, False) and info.epoch not in (0, epoch)
    assert again.id != first.id
    with pytest.raises(NotFound):
        store.edit("room", "u", first.id.rsplit("-", 1)[0] + "-2", "x")
    assert store.append("room", "v", "cid", "new other").seq == 2


def test_dup_of_a_message_retention_dropped_answers_ts_0(
    open_store: OpenStore, clock: FakeClock
) -> None:
    """STORAGE.md, Dedup: "A retried cid ... returns the first seq stored for it, its
    message id and its `ts` (0 if retention has since dropped the message)"."""
    store = open_store(StoreConfig(compaction=CompactionPolicy(max_count=2)))
    first = store.append("room", "u", "c0", "x")
    for i in range(1, 4):
        clock.advance(10)
        store.append("room", "u", f"c{i}", "x")
    assert store.compact("room") == 2
    dup = store.append("room", "u", "c0", "again")
    assert dup == AppendResult("room", first.seq, first.id, 0, dup=True)
    assert store.lookup_dup("room", "u", "c0") == dup
    assert store.lookup_dup("room", "u", "c3").ts == T0 + 30
    assert store.channel("room").head == 4


# ------------------------------------------------------------------ read cursors


@pytest.mark.parametrize("asked", [0, -1, -(2**63), 2**63 - 1, 2**64 + 5, 10**30])
def test_read_cursor_edge_values(store: AnyStore, asked: int) -> None:
    """Store.set_read: "Move the user's read cursor forward to `seq` (clamped to the
    head); an older seq changes nothing." A cursor never passes the head, never goes
    below 0, whatever the integer."""
    for i in range(3):
        store.append("room", "u", f"c{i}", "x")
    assert store.set_read("r", "room", 1) == 1
    want = 1 if asked <= 1 else 3
    assert store.set_read("r", "room", asked) == want
    assert store.read_cursor("r", "room") == want
    assert store.unread("r", "room") == 3 - want
    assert store.set_read("r", "nowhere", asked) == 0 and store.read_cursor("r", "nowhere") == 0


def test_unread_after_compaction_and_retention(open_store: OpenStore, clock: FakeClock) -> None:
    """PROTOCOL.md 6.14: "entries already removed by compaction or retention are not
    counted"; deleted messages are not counted, nor the user's own."""
    store = open_store(StoreConfig(compaction=CompactionPolicy(keep_recent=2, max_count=6)))
    ids = [store.append("room", "a" if i % 3 else "b", f"c{i}", "x").id for i in range(8)]
    store.edit("room", "a", ids[1], "e")  # seq 9
    store.delete("room", "b", ids[3])  # seq 10
    assert store.unread("r", "room") == 7
    assert store.compact("room") == 8  # max_count 6: seqs 1..4 dropped; point 10 - 2
    assert store.unread("r", "room") == 4  # 5, 6, 7, 8
    assert store.unread("a", "room") == 1  # 7 (b's)
    assert [e["seq"] for e in store.sync("room", 8, 10).entries] == [9, 10]
    assert store.sync("room", 7, 10).resync


def test_unread_scan_max_bounds_the_count_from_below(store: AnyStore) -> None:
    """Store.unread counts over at most ``scan_max`` entries after the cursor (log entries
    on LMDB, messages on Redis); PROTOCOL.md 6.14: past the bound the count is a lower
    bound, within it exact. A helper found the engines counting different prefixes (the
    docstring said log entries for both): either is a lower bound, and both are exact when
    the bound covers the log."""
    m1 = store.append("room", "bob", "c1", "one")  # seq 1
    store.edit("room", "bob", m1.id, "one'")  # seq 2
    store.edit("room", "bob", m1.id, "one''")  # seq 3
    store.append("room", "bob", "c4", "four")  # seq 4
    assert store.unread("alice", "room") == 2
    assert store.unread("alice", "room", scan_max=4) == 2
    assert 1 <= store.unread("alice", "room", scan_max=2) <= 2
    assert store.unread("alice", "room", scan_max=1) == 1


# ------------------------------------------------------------------ compaction


def test_sync_from_exactly_the_horizon_after_bounded_steps(
    open_store: OpenStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STORAGE.md, Compaction: "The channel's `horizon` then moves up to the compaction
    point: a sync from below it answers *resync*, never a silent gap." From exactly the
    horizon a sync is a dense run up to the head; history shows each message's latest
    state and tombstones still kept."""
    set_compact_chunk(monkeypatch, 2)
    policy = CompactionPolicy(keep_recent=3, tombstone_retention_ms=100, max_age_ms=10_000)
    store = open_store(StoreConfig(compaction=policy))
    ids = [store.append("room", "u", f"c{i}", f"t{i}").id for i in range(6)]  # 1..6, T0
    clock.advance(20_000)
    ids += [store.append("room", "u", f"c{i}", f"t{i}").id for i in range(6, 12)]  # 7..12
    store.edit("room", "u", ids[7], "t7'")  # 13
    store.delete("room", "u", ids[8])  # 14
    store.delete("room", "u", ids[2])  # 15: a message retention drops
    store.edit("room", "u", ids[9], "t9'")  # 16
    clock.advance(200)
    store.delete("room", "u", ids[10])  # 17: recent tombstone
    for _ in range(3):
        store.append("room", "u", "x" + str(store.channel("room").head), "pad")  # 18..20
    horizon = store.compact("room")
    info = store.channel("room")
    assert horizon == info.horizon == 17
    page = store.sync("room", horizon, 100)
    assert not page.resync and [e["seq"] for e in page.entries] == [18, 19, 20]
    assert store.sync("room", horizon - 1, 100).resync
    msgs = store.history("room", None, 100).messages
    # 1..6 dropped by age; 9's tombstone dropped (100 ms retention over), 11's kept
    # (deleted at compaction time is not over); edits applied.
    assert [m["seq"] for m in msgs] == [7, 8, 10, 11, 12, 18, 19, 20]
    assert msgs[1]["text"] == "t7'" and msgs[2]["text"] == "t9'"
    assert msgs[3].get("deleted") is True and "text" not in msgs[3]
    with pytest.raises(NotFound):
        store.edit("room", "u", ids[8], "gone")  # its tombstone was compacted away
    with pytest.raises(NotFound):
        store.delete("room", "u", ids[0])  # dropped by retention
    e = store.edit("room", "u", ids[6], "below the horizon")  # still in the log
    assert e.seq == 21


# ------------------------------------------------------------------ Redis: lost keys


@pytest.fixture
def redis_engine(redis_server: Any) -> StoreEngine:
    return StoreEngine("redis", redis_server.url)


def _channel_keys(r: redis.Redis, prefix: str, channel: str) -> list[bytes]:
    return list(r.scan_iter(match=f"{prefix}{{c:{channel}}}:*".encode()))


def test_redis_one_channels_keys_lost_is_a_new_epoch(
    redis_engine: StoreEngine, redis_server: Any, tmp_path: Path
) -> None:
    """STORAGE.md, Redis engine: "Lost keys show as a new epoch, never as a gap or a
    reused seq." One channel's keys deleted: that channel starts again under a new epoch,
    its old cids and cursors are forgotten, other channels are untouched."""
    prefix = redis_engine.place(tmp_path)
    with redis_engine.open(prefix) as store:
        for i in range(4):
            store.append("lost", "u", f"c{i}", f"old {i}")
            store.append("kept", "u", f"c{i}", f"kept {i}")
        store.set_read("r", "lost", 3)
        old = store.channel("lost")
        kept = store.channel("kept")
        with redis_server.client() as admin:
            keys = _channel_keys(admin, prefix, "lost")
            assert len(keys) >= 6
            admin.delete(*keys)
        assert store.channel("lost").epoch == 0 and store.read_cursor("r", "lost") == 0
        new = store.append("lost", "u", "c3", "new")
        info = store.channel("lost")
        assert (new.seq, new.dup) == (1, False) and info.epoch not in (0, old.epoch)
        assert store.sync("lost", 3, 10).resync
        assert store.channel("kept") == kept
        assert store.append("kept", "u", "c3", "retry").dup


def test_redis_meta_lost_reads_show_no_log(
    redis_engine: StoreEngine, redis_server: Any, tmp_path: Path
) -> None:
    """STORAGE.md: a missing `meta` is a lost log ("if it is missing ... the script deletes
    whatever is left of the channel's other keys and starts the log again"); PROTOCOL.md
    6.14: "a channel with no log counts 0". Until the next write, what is left of the old
    log must not be read as the channel's state: no unread count, no cursor past the head."""
    prefix = redis_engine.place(tmp_path)
    with redis_engine.open(prefix) as store:
        for i in range(5):
            store.append("room", "bob", f"c{i}", f"old {i}")
        store.set_read("alice", "room", 2)
        with redis_server.client() as admin:
            admin.delete(f"{prefix}{{c:room}}:meta".encode())
        info = store.channel("room")
        assert (info.head, info.epoch) == (0, 0)
        assert store.sync("room", 0, 10).entries == []
        assert store.history("room", None, 10).messages == []
        assert store.unread("alice", "room") == 0
        assert store.read_cursor("alice", "room") <= info.head


def test_redis_channel_registry_is_redone_after_a_lost_update(
    redis_engine: StoreEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STORAGE.md, Scripts: "a new channel's name is added to `channels` by a second
    command after its first message: each update is idempotent, so one that is lost is
    redone by the next." A lost registration must not keep the channel out of
    `channels()` (and so out of `compact_all`, retention) for good."""
    prefix = redis_engine.place(tmp_path)
    with redis_engine.open(prefix) as store:
        assert isinstance(store, RedisStore)
        real = store._wclient.sadd
        calls = {"n": 0}

        def lossy(*args: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise redis.ConnectionError("injected: the registry update is lost")
            return real(*args)

        monkeypatch.setattr(store._wclient, "sadd", lossy)
        store.append("room", "u", "c1", "x")
        for i in range(2, 5):
            store.append("room", "u", f"c{i}", "x")
        assert store.channel("room").head == 4
        assert "room" in store.channels()
        assert "room" in store.compact_all()


# ------------------------------------------------------------------ engines side by side


def normalize(value: Any) -> Any:
    """Message ids without their (engine-specific) prefix; epochs dropped by the caller."""
    if isinstance(value, str):
        return re.sub(r"^[0-9a-f]+-(\d+)$", r"ID-\1", value)
    if isinstance(value, AppendResult):
        return value._replace(id=normalize(value.id))
    if isinstance(value, dict):
        return {k: normalize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalize(v) for v in value]
    return value


HP = ("messages", "more")


def scenario(store: AnyStore, clock: FakeClock) -> list[Any]:
    """One deterministic run of writes, compactions and reads; every answer recorded."""
    out: list[Any] = []

    def rec(fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            res = fn(*args, **kw)
        except Exception as exc:
            res = type(exc).__name__
        out.append(normalize(res))
        return res

    ids = [rec(store.append, "c", "u" if i % 2 else "v", f"k{i}", f"t{i}", {"i": i}).id
           for i in range(10)]  # fmt: skip
    rec(store.append, "c", "u", "", "empty cid")
    rec(store.append, "c", "u", "k1", "retry")
    rec(store.edit, "c", "u", ids[1], "")
    rec(store.edit, "c", "v", ids[1], "not hers")
    rec(store.edit, "c", "v", ids[1], "moderated", moderator=True)
    rec(store.delete, "c", "u", ids[1])
    rec(store.delete, "c", "u", ids[1])
    rec(store.edit, "c", "u", ids[1] + "0", "x")
    rec(store.edit, "c", "u", ids[1].upper(), "x")
    rec(store.set_read, "r", "c", 4)
    clock.advance(1500)
    rec(store.delete, "c", "v", ids[4])
    for step in range(3):
        clock.advance(700)
        rec(store.append, "c", "v", f"s{step}", f"step {step}")
        rec(store.compact, "c")
        info = store.channel("c")
        rec(lambda i=info: (i.head, i.horizon))
        rec(lambda i=info: store.sync("c", i.horizon, 100).entries)
        rec(lambda: tuple(store.history("c", None, 100).__getattribute__(f) for f in HP))
        rec(store.unread, "r", "c")
        rec(store.unread, "u", "c")
    rec(store.edit, "c", "v", ids[4], "gone?")
    rec(store.lookup_dup, "c", "u", "k1")
    rec(store.lookup_dup, "c", "v", "k0")
    rec(store.set_read, "r", "c", 2**63)
    rec(lambda: store.sync("c", 0, 100).resync)
    rec(lambda: store.sync("c", -1, 100).resync)
    rec(lambda: store.sync("c", 2**64 + 1, 100).resync)
    rec(store.append, "c", "u", "sur", "\ud800 lone surrogate")
    rec(store.append, "\udc00", "u", "sur", "x")
    rec(store.append, "c", "u", "sur", "after the refused ones")
    for before in (0, 1, 9, 10**20, 2**64 + 1):
        rec(lambda b=before: tuple(store.history("c", b, 2).__getattribute__(f) for f in HP))
    return out


@pytest.mark.parametrize("other", ["redis", "redis-cluster"])
def test_engines_answer_a_scenario_alike(
    request: pytest.FixtureRequest, tmp_path: Path, other: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STORAGE.md, Redis engine: "everything above lives in Redis instead of LMDB ...,
    with the same answers". The same writes, compactions (in steps of 3 entries) and
    reads at the same clock give the same answers on LMDB and Redis, ids aside."""
    set_compact_chunk(monkeypatch, 3)
    config = StoreConfig(
        durability="async",
        compaction=CompactionPolicy(keep_recent=2, tombstone_retention_ms=1000, max_count=9),
    )
    server = request.getfixturevalue("redis_server" if other == "redis" else "redis_cluster")
    answers = []
    for engine in (StoreEngine("lmdb", None), StoreEngine(other, server.url)):
        clock = FakeClock()
        with engine.open(engine.place(tmp_path / "db"), config, clock=clock) as store:
            answers.append(scenario(store, clock))
    for i, (a, b) in enumerate(zip(*answers, strict=True)):
        assert a == b, f"answer {i} differs"


# ------------------------------------------------------------------ restore targets


@pytest.mark.parametrize("engine", ["lmdb", "redis"])
def test_restore_refuses_an_export_holding_a_channel_twice(
    capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest, tmp_path: Path, engine: str
) -> None:
    """STORAGE.md, Exports: "One channel is one record"; a restore loads "a store that
    cannot be taken for complete until it is". A well-formed export (checksum and counts
    right) that holds one channel twice is refused, and leaves the target empty, on
    every engine: never two logs merged under one name (LMDB: "channel ... is in the
    export twice")."""
    export = tmp_path / "twice.export"

    def dump(epoch: int, text: str) -> ChannelDump:
        entry = {"seq": 1, "kind": "message", "id": f"{epoch}-1", "sender": "u", "ts": T0}
        return ChannelDump(
            "room", epoch, str(epoch), 1, 0, [{**entry, "text": text}], {}, {"u": 1},
            [("u", f"cid-{epoch}", 1, T0)],
        )  # fmt: skip

    writer = ExportWriter(str(export), "lmdb", T0)
    writer.channel(dump(11, "first log"))
    writer.channel(dump(22, "second log"))
    writer.finish()
    target = make_target(request, engine, tmp_path / "target")
    code, _, err = run(capsys, "restore", *target.args, str(export))
    assert code != 0 and "twice" in err
    if engine == "lmdb":
        assert not (tmp_path / "target").exists()
    else:
        with redis.Redis.from_url(target.engine) as admin:
            assert admin.keys(b"tsmsg:*") == []


@pytest.mark.parametrize("engine", ["lmdb", "redis"])
@pytest.mark.parametrize("what", ["member", "seen"])
def test_restore_refuses_a_target_holding_only_user_data(
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    tmp_path: Path,
    data_dir: Path,
    engine: str,
    what: str,
) -> None:
    """STORAGE.md, Exports: "It refuses a target that holds any data." A store holding
    only a membership or a last_seen (no channel) is not empty; it is left as it was."""
    export = tmp_path / "x.export"
    assert run(capsys, "backup", "--export", "--data-dir", str(data_dir), str(export))[0] == 0
    target = make_target(request, engine, tmp_path / "target")
    with target.open(clock=lambda: T0) as st:
        st.write(WriteOp(what, "somewhere", "zed"))
    code, out, err = run(capsys, "restore", *target.args, str(export))
    assert code != 0 and "not empty" in err and out == ""
    with target.open() as st:
        assert st.channels() == []
        assert (st.channels_of("zed"), st.last_seen("zed")) == (
            (["somewhere"], None) if what == "member" else ([], T0)
        )


# ------------------------------------------------------------------ export consistency


def test_redis_export_is_one_state_of_a_channel_compacted_while_it_is_read(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STORAGE.md, Exports: on Redis "each channel is one consistent state of that
    channel". A compaction step between two of the export's script calls moves the
    horizon and drops entries (here: messages past retention) without moving the head;
    the export took the entries read before it and the horizon read after it: a state
    that never existed (the dropped messages kept, under the new horizon)."""
    clock = FakeClock()
    url = make_target(request, "redis", tmp_path / "unused").engine
    policy = CompactionPolicy(keep_recent=2, max_count=4)
    with RedisStore(url, StoreConfig(compaction=policy), clock=clock) as store:
        for i in range(12):
            store.append("room", "u", f"c{i}", f"m{i}")
        store.set_read("v", "room", 1)
        before = next(iter(store.export()))
        monkeypatch.setattr(redis_store_module, "EXPORT_CHUNK", 4)
        real_eval = store._eval
        calls = []

        def eval_then_compact(name: str, *args: Any) -> Any:
            reply = real_eval(name, *args)
            if name == "dump":
                calls.append(name)
                if len(calls) == 1:  # another node's compaction, between two reads
                    store.compact("room")
            return reply

        monkeypatch.setattr(store, "_eval", eval_then_compact)
        during = next(iter(store.export()))
        monkeypatch.undo()
        after = next(iter(store.export()))
        assert after.horizon > 0 and after.entries != before.entries
        assert during in (before, after)


def test_lmdb_restore_keeps_the_newest_cids_and_prunes_the_oldest_first(
    request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock
) -> None:
    """STORAGE.md, Dedup: "The newest `dedup_max` cids are remembered; older ones, and
    journal entries older than `dedup_retention_ms`, are pruned oldest first"; Exports: a
    retried cid is answered as the exported store did. A restore wrote LMDB's journal one
    channel after another (in name order), so the journal's order was no longer the cids'
    age: with more cids than ``dedup_max`` (a Redis source bounds them per channel) the
    restored store forgot channel a's newest cid and kept b's older ones, and retention
    pruning stopped at a's recent cid, keeping b's expired ones."""
    url = make_target(request, "redis", tmp_path / "unused").engine
    with RedisStore(url, clock=clock) as source:
        for i in range(3):
            source.append("b", "u", f"b{i}", "old")
        clock.advance(500)
        newest = source.append("a", "u", "a0", "new")
        write_export(str(tmp_path / "x.export"), "redis", clock.now, source)
        assert source.lookup_dup("a", "u", "a0") == newest._replace(dup=True)

    config = StoreConfig(durability="async", dedup_max=3, dedup_retention_ms=1000)
    start = clock.now
    for reopen in (False, True):  # the ring restore filled, and the journal it wrote
        clock.now = start
        target = LmdbStore(tmp_path / f"lmdb-{reopen}", config, clock=clock)
        restore(str(tmp_path / "x.export"), target)
        if reopen:
            target.close()
            target = LmdbStore(tmp_path / f"lmdb-{reopen}", config, clock=clock)
        with target as st:
            assert st.lookup_dup("a", "u", "a0") == newest._replace(dup=True), reopen
            assert st.lookup_dup("b", "u", "b0") is None  # the oldest one is forgotten
            clock.advance(600)  # b's cids are past the retention window, a's is not
            st.append("c", "u", "c0", "a commit prunes")
            assert [st.lookup_dup("b", "u", f"b{i}") for i in range(3)] == [None] * 3
            assert st.lookup_dup("a", "u", "a0") == newest._replace(dup=True)
