"""The store contract, rule by rule, with plain calls and an injected clock, on every
engine: each test runs on LMDB, on one Redis and on a Redis Cluster (the ``store_engine``
fixture of conftest.py); the few that are about LMDB's files are marked ``lmdb_only``.

Every test opens its store (``LmdbStore(tmp_path / "db", ...)``, or a RedisStore under a
key prefix of its own) with ``StoreConfig(...)`` and ``clock=FakeClock`` through the
``open_store`` fixture, which closes whatever it opened (an unclosed store or a dead
writer thread fails the run under ``filterwarnings=error``). Writes that must land in one
group commit are queued behind a gate: the ``notify`` hook of the first batch blocks until
the rest have been submitted, so the writer takes them all in its next batch.
"""

from __future__ import annotations

import errno
import gc
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from conftest import StoreEngine
from tsmsg._native import AppendBatch, DedupRing, EncodeError, packb, unpackb
from tsmsg.store import (
    AppendResult,
    CompactionPolicy,
    Entry,
    Forbidden,
    FormatError,
    HistoryPage,
    LmdbStore,
    NotFound,
    StoreConfig,
    StoreError,
    StoreUnavailable,
    WriteOp,
    lmdb_store,
    redis_store,
)
from tsmsg.store.redis_store import RedisStore

AnyStore = LmdbStore | RedisStore
T0 = 1_700_000_000_000  # a plausible ms timestamp
WAIT_S = 10.0  # a committed write is answered well within this


class FakeClock:
    """The store's clock: ``ts`` of every entry and the reference for retention."""

    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> int:
        self.now += ms
        return self.now


class Gate:
    """A ``notify`` hook that records batches and, while armed, blocks the writer thread
    after the next batch until released, so the ops queued meanwhile share one batch."""

    def __init__(self) -> None:
        self.batches: list[list[WriteOp]] = []
        self._armed = False
        self._entered = threading.Event()
        self._release = threading.Event()

    def __call__(self, batch: list[WriteOp]) -> None:
        self.batches.append(list(batch))
        if self._armed:
            self._armed = False
            self._entered.set()
            assert self._release.wait(WAIT_S)

    def one_batch(self, store: AnyStore, ops: list[WriteOp]) -> list[WriteOp]:
        """Submit ``ops`` so that they are committed together; wait for all of them."""
        self._entered.clear()
        self._release.clear()
        self._armed = True
        blocker = WriteOp("read", "gate-channel", "gate-user", seq=0)
        blocker.done = threading.Event()
        store.submit(blocker)
        assert self._entered.wait(WAIT_S)
        for op in ops:
            op.done = threading.Event()
            store.submit(op)
        self._release.set()
        for op in ops:
            assert op.done is not None and op.done.wait(WAIT_S)
        assert any(all(op in batch for op in ops) for batch in self.batches), "not one batch"
        return ops


class Faults:
    """A ``fault`` hook: raises ``error`` on the listed commit numbers (1-based)."""

    def __init__(self, error: Callable[[], BaseException]) -> None:
        self.error = error
        self.fail_on: set[int] = set()
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls in self.fail_on:
            raise self.error()


OpenStore = Callable[..., AnyStore]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db"


@pytest.fixture
def open_store(store_engine: StoreEngine, db_path: Path, clock: FakeClock) -> Iterator[OpenStore]:
    opened: list[AnyStore] = []
    place = store_engine.place(db_path)  # reopening finds the same data

    def _open(config: StoreConfig | None = None, **kwargs: Any) -> AnyStore:
        store = store_engine.open(place, config or StoreConfig(), clock=clock, **kwargs)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()
    for store in opened:
        assert not store._writer.is_alive()


@pytest.fixture
def store(open_store: OpenStore) -> AnyStore:
    return open_store()


def write(store: AnyStore, op: WriteOp) -> WriteOp:
    """Like ``store.write`` but with a short timeout, so a dead writer fails fast."""
    return store.write(op, timeout=WAIT_S)


def log_of(store: AnyStore, channel: str, since: int = 0) -> list[dict[str, Any]]:
    page = store.sync(channel, since, 10**6)
    assert not page.resync and not page.more
    return page.entries


def history(store: AnyStore, channel: str, before: int | None, limit: int) -> list[Entry]:
    page = store.history(channel, before, limit)
    assert isinstance(page, HistoryPage)
    return page.messages


def set_compact_chunk(monkeypatch: pytest.MonkeyPatch, entries: int) -> None:
    """Compaction steps of ``entries`` entries, on every engine."""
    monkeypatch.setattr(lmdb_store, "COMPACT_CHUNK", entries)
    monkeypatch.setattr(redis_store, "COMPACT_CHUNK", entries)


def seqs(entries: list[dict[str, Any]]) -> list[int]:
    return [e["seq"] for e in entries]


# ------------------------------------------------------------------- appends


def test_seqs_are_dense_per_channel_and_channels_independent(store: AnyStore) -> None:
    got: dict[str, list[int]] = {"a": [], "b": []}
    for i in range(10):
        channel = "a" if i % 3 else "b"
        got[channel].append(store.append(channel, "u", f"c{i}", f"t{i}").seq)
    assert got == {"a": [1, 2, 3, 4, 5, 6], "b": [1, 2, 3, 4]}
    assert store.channel("a").head == 6
    assert store.channel("b").head == 4
    assert seqs(log_of(store, "a")) == [1, 2, 3, 4, 5, 6]
    assert store.channel("a").epoch != store.channel("b").epoch


def test_append_result_and_entry_shape(store: AnyStore, clock: FakeClock) -> None:
    res = store.append("room", "alice", "cid-1", "hello", {"k": [1, "x"]})
    assert isinstance(res, AppendResult)
    assert (res.channel, res.seq, res.ts, res.dup) == ("room", 1, T0, False)
    clock.advance(5)
    res2 = store.append("room", "bob", "cid-1", "hi")
    assert (res2.seq, res2.ts, res2.dup) == (2, T0 + 5, False)
    assert res.id != res2.id
    assert log_of(store, "room") == [
        {
            "seq": 1,
            "kind": "message",
            "id": res.id,
            "sender": "alice",
            "ts": T0,
            "text": "hello",
            "meta": {"k": [1, "x"]},
        },
        {"seq": 2, "kind": "message", "id": res2.id, "sender": "bob", "ts": T0 + 5, "text": "hi"},
    ]
    info = store.channel("room")
    assert (info.name, info.head, info.horizon) == ("room", 2, 0)


def test_unknown_channel_reads(store: AnyStore) -> None:
    info = store.channel("nowhere")
    assert (info.head, info.horizon, info.epoch) == (0, 0, 0)
    assert history(store, "nowhere", None, 10) == []
    page = store.sync("nowhere", 0, 10)
    assert (page.entries, page.more, page.head, page.resync) == ([], False, 0, False)
    assert store.sync("nowhere", 3, 10).resync
    assert store.read_cursor("u", "nowhere") == 0
    assert store.unread("u", "nowhere") == 0
    assert store.lookup_dup("nowhere", "u", "c") is None
    assert store.compact("nowhere") == 0


def test_ok_only_after_commit(open_store: OpenStore) -> None:
    """The writer sets the result, then ``done``, then calls notify: by the time anyone
    may answer ``ok`` the entry is readable by a fresh read transaction."""
    seen: list[tuple[int, int]] = []
    all_seen = threading.Event()
    holder: dict[str, AnyStore] = {}

    def notify(batch: list[WriteOp]) -> None:
        for op in batch:
            assert op.done is None or op.done.is_set()
            if isinstance(op.result, AppendResult):
                seen.append((op.result.seq, holder["s"].channel(op.channel).head))
        if len(seen) == 5:
            all_seen.set()

    store = holder["s"] = open_store(notify=notify)
    for i in range(5):
        res = store.append("room", "u", f"c{i}", "x")
        assert store.channel("room").head >= res.seq
        assert log_of(store, "room")[-1]["id"] == res.id
    assert all_seen.wait(WAIT_S)
    assert all(head >= seq for seq, head in seen)


# ------------------------------------------------------------------- dedup


def test_dup_from_same_sender_returns_original(store: AnyStore, clock: FakeClock) -> None:
    first = store.append("room", "alice", "cid", "one", {"a": 1})
    store.append("room", "bob", "other", "x")
    clock.advance(1000)
    again = store.append("room", "alice", "cid", "changed text", {"b": 2})
    assert again.dup is True
    assert (again.seq, again.id, again.ts, again.channel) == (
        first.seq,
        first.id,
        first.ts,
        "room",
    )
    assert store.channel("room").head == 2
    assert [e["text"] for e in log_of(store, "room")] == ["one", "x"]


def test_same_cid_other_sender_or_channel_is_new(store: AnyStore) -> None:
    a = store.append("room", "alice", "cid", "a")
    b = store.append("room", "bob", "cid", "b")
    c = store.append("other", "alice", "cid", "c")
    assert not (a.dup or b.dup or c.dup)
    assert (a.seq, b.seq, c.seq) == (1, 2, 1)
    assert len({a.id, b.id, c.id}) == 3


def test_dup_within_one_batch(open_store: OpenStore) -> None:
    gate = Gate()
    store = open_store(notify=gate)
    ops = gate.one_batch(
        store,
        [WriteOp("message", "room", "u", cid="same", text=f"t{i}") for i in range(3)],
    )
    results = [op.result for op in ops]
    assert all(isinstance(r, AppendResult) for r in results)
    assert [r.dup for r in results if isinstance(r, AppendResult)] == [False, True, True]
    assert len({(r.seq, r.id, r.ts) for r in results if isinstance(r, AppendResult)}) == 1
    assert store.channel("room").head == 1


def test_lookup_dup_answers_from_ring_after_commit(store: AnyStore, clock: FakeClock) -> None:
    assert store.lookup_dup("room", "alice", "cid") is None
    res = store.append("room", "alice", "cid", "x")
    clock.advance(10)
    hit = store.lookup_dup("room", "alice", "cid")
    assert hit == AppendResult("room", res.seq, res.id, res.ts, dup=True)
    assert store.lookup_dup("room", "bob", "cid") is None
    assert store.lookup_dup("room", "alice", "other") is None
    assert store.lookup_dup("elsewhere", "alice", "cid") is None
    # What the event loop asks on every send: the same answer, or none (a network store:
    # no round trip on the loop; the append answers the retry itself).
    assert store.cached_dup("room", "alice", "cid") in (None, hit)
    assert store.cached_dup("room", "bob", "cid") is None
    assert store.append("room", "alice", "cid", "x") == hit


def test_dedup_survives_reopen(open_store: OpenStore, clock: FakeClock) -> None:
    store = open_store()
    res = store.append("room", "alice", "cid", "x")
    store.append("room", "alice", "cid2", "y")
    store.close()
    clock.advance(50)
    store = open_store()
    original = AppendResult("room", res.seq, res.id, res.ts, dup=True)
    # lookup_dup is a fast path: it may not know the channel yet right after a restart,
    # but it never answers wrongly; the write path answers from the journal.
    assert store.lookup_dup("room", "alice", "cid") in (None, original)
    assert store.append("room", "alice", "cid", "x") == original
    assert store.lookup_dup("room", "alice", "cid") == original
    assert store.channel("room").head == 2
    assert store.append("room", "alice", "cid3", "z").seq == 3


def test_dedup_keeps_the_newest_dedup_max_cids(open_store: OpenStore) -> None:
    config = StoreConfig(dedup_max=3)
    store = open_store(config)
    for i in range(5):
        store.append("room", "u", f"c{i}", "x")
    # c0 and c1 are forgotten (oldest first); c2..c4 are still dups, also after a restart.
    assert store.lookup_dup("room", "u", "c1") is None
    assert store.lookup_dup("room", "u", "c2") is not None
    store.close()
    store = open_store(config)
    assert store.lookup_dup("room", "u", "c1") is None
    assert [store.append("room", "u", f"c{i}", "x").dup for i in (4, 3, 2)] == [True] * 3
    res = store.append("room", "u", "c0", "x")
    assert (res.seq, res.dup) == (6, False)


def test_dedup_retention(open_store: OpenStore, clock: FakeClock) -> None:
    config = StoreConfig(dedup_retention_ms=1000)
    store = open_store(config)
    store.append("room", "u", "old", "x")
    clock.advance(5000)
    store.append("room", "u", "new", "x")  # this commit prunes the journal
    store.close()
    store = open_store(config)
    assert store.lookup_dup("room", "u", "old") is None
    assert store.append("room", "u", "new", "x").dup
    res = store.append("room", "u", "old", "x")
    assert (res.seq, res.dup) == (3, False)


# ------------------------------------------------------------------- edits


def test_edit_is_a_new_entry_and_history_shows_latest(store: AnyStore, clock: FakeClock) -> None:
    msg = store.append("room", "alice", "c1", "first", {"m": 1})
    clock.advance(10)
    e1 = store.edit("room", "alice", msg.id, "second")
    clock.advance(10)
    e2 = store.edit("room", "alice", msg.id, "third")
    assert (e1.seq, e1.id, e1.ts, e1.dup) == (2, msg.id, T0 + 10, False)
    assert (e2.seq, e2.id, e2.ts) == (3, msg.id, T0 + 20)
    assert log_of(store, "room")[1:] == [
        {
            "seq": 2,
            "kind": "edit",
            "id": msg.id,
            "sender": "alice",
            "ts": T0 + 10,
            "text": "second",
        },
        {"seq": 3, "kind": "edit", "id": msg.id, "sender": "alice", "ts": T0 + 20, "text": "third"},
    ]
    [hist] = history(store, "room", None, 10)
    assert hist == {
        "seq": 1,
        "kind": "message",
        "id": msg.id,
        "sender": "alice",
        "ts": T0,
        "text": "third",
        "meta": {"m": 1},
        "edited": T0 + 20,
    }


def test_only_sender_or_moderator_may_edit_or_delete(store: AnyStore) -> None:
    msg = store.append("room", "alice", "c1", "mine")
    with pytest.raises(Forbidden) as exc:
        store.edit("room", "mallory", msg.id, "pwned")
    assert exc.value.code == "forbidden"
    with pytest.raises(Forbidden):
        store.delete("room", "mallory", msg.id)
    assert store.channel("room").head == 1
    mod = store.edit("room", "mod", msg.id, "moderated", moderator=True)
    assert mod.seq == 2
    assert log_of(store, "room")[-1]["sender"] == "mod"
    assert history(store, "room", None, 1)[0]["text"] == "moderated"
    assert store.delete("room", "mod", msg.id, moderator=True).seq == 3
    assert history(store, "room", None, 1)[0]["deleted"] is True


@pytest.mark.parametrize(
    "target",
    ["", "x", "1", "1-", "-1", "1-0", "1-99", "99-1", "abc-def", "1-1-1", "1-" + "9" * 40],
)
def test_edit_or_delete_unknown_or_malformed_id(store: AnyStore, target: str) -> None:
    store.append("room", "alice", "c1", "x")
    with pytest.raises(NotFound) as exc:
        store.edit("room", "alice", target, "y")
    assert exc.value.code == "not_found"
    with pytest.raises(NotFound):
        store.delete("room", "alice", target)
    assert store.channel("room").head == 1


def test_edit_of_an_id_from_another_channel(store: AnyStore) -> None:
    other = store.append("other", "alice", "c1", "x")
    store.append("room", "alice", "c1", "y")
    with pytest.raises(NotFound):
        store.edit("room", "alice", other.id, "z")
    with pytest.raises(NotFound):
        store.delete("room", "alice", other.id)
    with pytest.raises(NotFound):
        store.edit("nochannel", "alice", other.id, "z")
    assert store.channel("nochannel").head == 0


def test_edit_entry_id_is_not_a_message(store: AnyStore) -> None:
    msg = store.append("room", "alice", "c1", "x")
    edit = store.edit("room", "alice", msg.id, "y")
    edit_entry_id = msg.id.rsplit("-", 1)[0] + f"-{edit.seq}"
    with pytest.raises(NotFound):
        store.edit("room", "alice", edit_entry_id, "z")


def test_deleted_message_is_not_found_for_edit_and_delete(store: AnyStore) -> None:
    msg = store.append("room", "alice", "c1", "x")
    store.delete("room", "alice", msg.id)
    with pytest.raises(NotFound):
        store.edit("room", "alice", msg.id, "y")
    with pytest.raises(NotFound):
        store.delete("room", "alice", msg.id)
    with pytest.raises(NotFound):
        store.delete("room", "mod", msg.id, moderator=True)
    assert store.channel("room").head == 2


# ------------------------------------------------------------------- deletes


def test_delete_leaves_tombstone_and_redacts_edits(store: AnyStore, clock: FakeClock) -> None:
    msg = store.append("room", "alice", "c1", "secret", {"k": "v"})
    keep = store.append("room", "bob", "c1", "bob's")
    clock.advance(1)
    store.edit("room", "alice", msg.id, "secret 2")
    store.edit("room", "bob", keep.id, "bob's 2")
    clock.advance(1)
    d = store.delete("room", "alice", msg.id)
    assert (d.seq, d.id, d.ts) == (5, msg.id, T0 + 2)
    assert log_of(store, "room") == [
        {"seq": 1, "kind": "message", "id": msg.id, "sender": "alice", "ts": T0, "deleted": True},
        {
            "seq": 2,
            "kind": "message",
            "id": keep.id,
            "sender": "bob",
            "ts": T0,
            "text": "bob's 2",
            "edited": T0 + 1,
        },
        {"seq": 3, "kind": "edit", "id": msg.id, "sender": "alice", "ts": T0 + 1, "deleted": True},
        {"seq": 4, "kind": "edit", "id": keep.id, "sender": "bob", "ts": T0 + 1, "text": "bob's 2"},
        {"seq": 5, "kind": "delete", "id": msg.id, "sender": "alice", "ts": T0 + 2},
    ]
    tomb = history(store, "room", None, 10)[0]
    assert tomb["deleted"] is True
    assert "text" not in tomb and "meta" not in tomb and "edited" not in tomb


def test_deleted_text_is_gone_from_every_read(store: AnyStore) -> None:
    msg = store.append("room", "alice", "c1", "SECRET-1", {"s": "SECRET-M"})
    store.edit("room", "alice", msg.id, "SECRET-2")
    store.delete("room", "alice", msg.id)
    dumped = repr(log_of(store, "room")) + repr(history(store, "room", None, 10))
    assert "SECRET" not in dumped


# ------------------------------------------------------------------- sync


def test_sync_pages(store: AnyStore) -> None:
    ids = [store.append("room", "u", f"c{i}", f"t{i}").id for i in range(6)]
    store.edit("room", "u", ids[0], "t0'")
    page = store.sync("room", 0, 3)
    assert seqs(page.entries) == [1, 2, 3] and page.more and page.head == 7
    assert not page.resync
    page = store.sync("room", 3, 3)
    assert seqs(page.entries) == [4, 5, 6] and page.more
    page = store.sync("room", 6, 3)
    assert seqs(page.entries) == [7] and not page.more
    assert page.entries[0]["kind"] == "edit"
    page = store.sync("room", 7, 3)
    assert (page.entries, page.more, page.head, page.resync) == ([], False, 7, False)
    assert page.epoch == store.channel("room").epoch


def test_sync_max_bytes_always_returns_one_entry(store: AnyStore) -> None:
    for i in range(5):
        store.append("room", "u", f"c{i}", "x" * 100)
    one = len(packb(store.sync("room", 0, 1).entries[0]))
    page = store.sync("room", 0, 10, max_bytes=1)
    assert seqs(page.entries) == [1] and page.more
    page = store.sync("room", 0, 10, max_bytes=2 * one)
    assert seqs(page.entries) == [1, 2] and page.more
    page = store.sync("room", 0, 10, max_bytes=2 * one + one - 1)
    assert seqs(page.entries) == [1, 2] and page.more
    page = store.sync("room", 2, 10, max_bytes=3 * one)
    assert seqs(page.entries) == [3, 4, 5] and not page.more
    page = store.sync("room", 0, 2, max_bytes=10**6)
    assert seqs(page.entries) == [1, 2] and page.more


def test_sync_past_head_is_resync(store: AnyStore) -> None:
    for i in range(3):
        store.append("room", "u", f"c{i}", "x")
    page = store.sync("room", 4, 10)
    assert (page.entries, page.resync, page.head, page.more) == ([], True, 3, False)
    assert store.sync("room", -1, 10).resync


def test_sync_below_horizon_is_resync(open_store: OpenStore) -> None:
    store = open_store(StoreConfig(compaction=CompactionPolicy(keep_recent=3)))
    for i in range(10):
        store.append("room", "u", f"c{i}", "x")
    assert store.compact("room") == 7
    assert store.channel("room").horizon == 7
    for since in (0, 1, 6):
        page = store.sync("room", since, 10)
        assert page.resync and page.entries == [] and page.head == 10
    page = store.sync("room", 7, 10)
    assert not page.resync and seqs(page.entries) == [8, 9, 10]


# ------------------------------------------------------------------- history


def test_history_pages_newest_first_page_oldest_first(store: AnyStore) -> None:
    ids = [store.append("room", "u", f"c{i}", f"t{i}").id for i in range(1, 8)]
    store.edit("room", "u", ids[6], "t7'")  # seq 8: not a message
    store.delete("room", "u", ids[1])  # seq 9
    assert [m["seq"] for m in history(store, "room", None, 3)] == [5, 6, 7]
    assert history(store, "room", None, 3)[-1]["text"] == "t7'"
    assert [m["seq"] for m in history(store, "room", 5, 3)] == [2, 3, 4]
    assert history(store, "room", 5, 3)[0]["deleted"] is True
    assert [m["seq"] for m in history(store, "room", 3, 10)] == [1, 2]
    assert history(store, "room", 1, 10) == []
    assert [m["seq"] for m in history(store, "room", 10**9, 2)] == [6, 7]
    assert len(history(store, "room", None, 100)) == 7
    assert history(store, "room", None, 0) == []
    assert all(m["kind"] == "message" for m in history(store, "room", None, 100))


def test_history_of_two_channels_does_not_mix(store: AnyStore) -> None:
    for i in range(3):
        store.append("a", "u", f"c{i}", f"a{i}")
        store.append("b", "u", f"c{i}", f"b{i}")
    assert [m["text"] for m in history(store, "a", None, 10)] == ["a0", "a1", "a2"]
    assert [m["text"] for m in history(store, "b", None, 10)] == ["b0", "b1", "b2"]
    assert [m["text"] for m in history(store, "b", 2, 10)] == ["b0"]


def test_history_more_and_max_bytes(store: AnyStore) -> None:
    ids = [store.append("room", "u", f"c{i}", "x" * 50).id for i in range(1, 6)]
    store.edit("room", "u", ids[4], "y" * 50)  # seq 6: skipped, not counted
    assert store.history("room", None, 5) == HistoryPage(history(store, "room", None, 5), False)
    page = store.history("room", None, 4)
    assert seqs(page.messages) == [2, 3, 4, 5] and page.more
    page = store.history("room", 2, 1)
    assert seqs(page.messages) == [1] and not page.more
    page = store.history("room", 3, 1)
    assert seqs(page.messages) == [2] and page.more
    assert store.history("room", None, 0) == HistoryPage([], True)
    assert store.history("room", None, -3) == HistoryPage([], True)
    assert store.history("room", 1, 5) == HistoryPage([], False)
    assert store.history("nowhere", None, 5) == HistoryPage([], False)
    one = len(packb(history(store, "room", None, 1)[0]))
    page = store.history("room", None, 10, max_bytes=1)  # always at least one message
    assert seqs(page.messages) == [5] and page.more
    page = store.history("room", None, 10, max_bytes=2 * one + 2)
    assert seqs(page.messages) == [4, 5] and page.more
    page = store.history("room", None, 10, max_bytes=10**6)
    assert seqs(page.messages) == [1, 2, 3, 4, 5] and not page.more
    # Paging with before = messages[0]["seq"] walks the whole log exactly once.
    walked: list[int] = []
    before = None
    while True:
        page = store.history("room", before, 2)
        walked[:0] = seqs(page.messages)
        if not page.more:
            break
        before = page.messages[0]["seq"]
    assert walked == [1, 2, 3, 4, 5]


def test_sync_entry_overhead_counts_per_entry(store: AnyStore) -> None:
    for i in range(4):
        store.append("room", "u", f"c{i}", "x")
    one = len(packb(log_of(store, "room")[0]))
    page = store.sync("room", 0, 10, max_bytes=2 * one)
    assert seqs(page.entries) == [1, 2]
    page = store.sync("room", 0, 10, max_bytes=2 * one, entry_overhead=1)
    assert seqs(page.entries) == [1] and page.more
    page = store.sync("room", 0, 10, max_bytes=2 * (one + 10), entry_overhead=10)
    assert seqs(page.entries) == [1, 2] and page.more


# ------------------------------------------------------------------- read cursors


def test_read_cursor_forward_only_and_clamped(store: AnyStore) -> None:
    assert store.set_read("alice", "nochannel", 5) == 0
    assert store.channel("nochannel").head == 0
    for i in range(5):
        store.append("room", "bob", f"c{i}", "x")
    assert store.read_cursor("alice", "room") == 0
    assert store.set_read("alice", "room", 3) == 3
    assert store.set_read("alice", "room", 2) == 3
    assert store.read_cursor("alice", "room") == 3
    assert store.set_read("alice", "room", 99) == 5
    assert store.read_cursor("alice", "room") == 5
    assert store.set_read("alice", "room", -1) == 5
    assert store.read_cursor("bob", "room") == 0
    store.append("room", "bob", "c9", "x")
    assert store.set_read("alice", "room", 99) == 6


def test_read_op_changed_flag(store: AnyStore) -> None:
    for i in range(3):
        store.append("room", "bob", f"c{i}", "x")
    assert write(store, WriteOp("read", "room", "alice", seq=2)).changed is True
    assert write(store, WriteOp("read", "room", "alice", seq=2)).changed is False
    assert write(store, WriteOp("read", "room", "alice", seq=1)).changed is False
    assert write(store, WriteOp("read", "room", "alice", seq=9)).changed is True
    assert write(store, WriteOp("read", "room", "alice", seq=9)).changed is False
    assert write(store, WriteOp("read", "nowhere", "alice", seq=9)).changed is False


def test_unread_counts_others_live_messages_after_cursor(store: AnyStore, clock: FakeClock) -> None:
    b1 = store.append("room", "bob", "b1", "b1").id  # 1
    store.append("room", "alice", "a1", "a1")  # 2 own
    store.append("room", "bob", "b2", "b2")  # 3
    assert store.set_read("alice", "room", 3) == 3
    assert store.unread("alice", "room") == 0
    b3 = store.append("room", "bob", "b3", "b3").id  # 4
    store.delete("room", "bob", b1)  # 5: a delete before the cursor changes nothing
    b4 = store.append("room", "bob", "b4", "b4").id  # 6
    store.append("room", "alice", "a2", "a2")  # 7 own
    b5 = store.append("room", "carol", "c5", "c5").id  # 8
    assert store.unread("alice", "room") == 3  # b3, b4, c5
    store.delete("room", "bob", b4)  # 9: a delete after the cursor removes one
    store.edit("room", "carol", b5, "c5'")  # 10: edits are no messages
    store.edit("room", "bob", b3, "b3'")  # 11
    assert store.unread("alice", "room") == 2  # b3, c5
    assert store.unread("bob", "room") == 3  # a1, a2, c5 (b1 and b4 deleted or own)
    assert store.unread("carol", "room") == 4  # b2, a1, b3, a2
    assert store.unread("dave", "room") == 5  # b2, a1, b3, a2, c5
    assert store.set_read("alice", "room", 8) == 8
    assert store.unread("alice", "room") == 0


# ------------------------------------------------------------------- compaction


def compaction_scenario(store: AnyStore, clock: FakeClock) -> dict[str, str]:
    ids: dict[str, str] = {}
    ids["m1"] = store.append("room", "alice", "1", "m1").id  # 1
    ids["m2"] = store.append("room", "alice", "2", "m2").id  # 2
    store.edit("room", "alice", ids["m1"], "m1'")  # 3
    ids["m3"] = store.append("room", "bob", "3", "m3").id  # 4
    clock.advance(100)
    store.delete("room", "alice", ids["m2"])  # 5, tombstone at T0+100
    for name in ("m4", "m5", "m6"):  # 6, 7, 8
        ids[name] = store.append("room", "bob", name, name).id
    return ids


def test_compaction_keeps_latest_state_and_drops_changes(
    open_store: OpenStore, clock: FakeClock
) -> None:
    policy = CompactionPolicy(keep_recent=3, tombstone_retention_ms=1000)
    store = open_store(StoreConfig(compaction=policy))
    ids = compaction_scenario(store, clock)
    before = history(store, "room", None, 100)
    raw_tail = log_of(store, "room", 5)
    assert store.compact("room") == 5
    info = store.channel("room")
    assert (info.head, info.horizon) == (8, 5)
    assert history(store, "room", None, 100) == before
    assert log_of(store, "room", 5) == raw_tail
    # Below the horizon: the edit (3) and the delete (5) are gone, the messages remain.
    assert seqs(history(store, "room", None, 100)) == [1, 2, 4, 6, 7, 8]
    assert history(store, "room", None, 100)[0]["text"] == "m1'"
    assert history(store, "room", None, 100)[1]["deleted"] is True
    assert seqs(history(store, "room", 4, 10)) == [1, 2]
    assert seqs(history(store, "room", 5, 2)) == [2, 4]
    # A compacted message can still be edited.
    store.edit("room", "bob", ids["m3"], "m3'")
    assert history(store, "room", 5, 1)[0]["text"] == "m3'"


def test_tombstones_kept_until_retention(open_store: OpenStore, clock: FakeClock) -> None:
    policy = CompactionPolicy(keep_recent=3, tombstone_retention_ms=1000)
    store = open_store(StoreConfig(compaction=policy))
    ids = compaction_scenario(store, clock)  # the delete of m2 happened at T0 + 100
    clock.now = T0 + 100 + 999
    store.compact("room")
    assert 2 in seqs(history(store, "room", None, 100))
    clock.now = T0 + 100 + 1000
    assert store.compact("room") == 5
    assert seqs(history(store, "room", None, 100)) == [1, 4, 6, 7, 8]
    assert store.unread("carol", "room") == 5
    with pytest.raises(NotFound):
        store.edit("room", "alice", ids["m2"], "x")


def test_tombstone_in_recent_window_is_kept(open_store: OpenStore) -> None:
    policy = CompactionPolicy(keep_recent=5, tombstone_retention_ms=0)
    store = open_store(StoreConfig(compaction=policy))
    ids = [store.append("room", "u", f"c{i}", "x").id for i in range(5)]
    store.delete("room", "u", ids[4])  # seq 6 deletes seq 5: both in the newest 5
    assert store.compact("room") == 1
    hist = history(store, "room", None, 10)
    assert seqs(hist) == [1, 2, 3, 4, 5] and hist[-1]["deleted"] is True
    assert seqs(log_of(store, "room", 1)) == [2, 3, 4, 5, 6]


def test_max_count_retention(open_store: OpenStore) -> None:
    policy = CompactionPolicy(keep_recent=2, max_count=3)
    store = open_store(StoreConfig(compaction=policy))
    for i in range(10):
        store.append("room", "u", f"c{i}", f"t{i}")
    assert store.compact("room") == 8
    assert seqs(history(store, "room", None, 100)) == [8, 9, 10]
    assert store.sync("room", 7, 10).resync
    assert seqs(store.sync("room", 8, 10).entries) == [9, 10]
    assert store.unread("x", "room") == 3


def test_max_age_retention(open_store: OpenStore, clock: FakeClock) -> None:
    policy = CompactionPolicy(keep_recent=2, max_age_ms=1000)
    store = open_store(StoreConfig(compaction=policy))
    for i in range(3):
        store.append("room", "u", f"old{i}", "old")
    clock.advance(5000)
    for i in range(5):
        store.append("room", "u", f"new{i}", "new")
    clock.advance(500)  # the old ones are 5.5 s old, the new ones 0.5 s
    assert store.compact("room") == 6
    assert seqs(history(store, "room", None, 100)) == [4, 5, 6, 7, 8]
    assert store.sync("room", 5, 10).resync
    assert seqs(store.sync("room", 6, 10).entries) == [7, 8]


def test_compaction_horizon_is_monotonic_and_appends_continue(
    open_store: OpenStore, clock: FakeClock
) -> None:
    store = open_store(StoreConfig(compaction=CompactionPolicy(keep_recent=2)))
    for i in range(6):
        store.append("room", "u", f"c{i}", "x")
    assert store.compact("room") == 4
    assert store.compact("room") == 4
    assert store.append("room", "u", "c9", "x").seq == 7
    assert store.compact("room") == 5
    assert seqs(history(store, "room", None, 100)) == [1, 2, 3, 4, 5, 6, 7]
    assert store.append("room", "u", "c0", "again").dup  # dedup outlives compaction


def test_compaction_survives_reopen(open_store: OpenStore, clock: FakeClock) -> None:
    policy = CompactionPolicy(keep_recent=3, tombstone_retention_ms=1000)
    config = StoreConfig(compaction=policy)
    store = open_store(config)
    compaction_scenario(store, clock)
    store.compact("room")
    hist = history(store, "room", None, 100)
    store.close()
    store = open_store(config)
    assert history(store, "room", None, 100) == hist
    assert store.channel("room").horizon == 5
    assert store.sync("room", 4, 10).resync


def test_compaction_in_small_steps_interleaved_with_writes(
    open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one entry per compaction step, writes run between the steps; the plan (the
    point) is fixed by the first step and the result is what one big step gives."""
    set_compact_chunk(monkeypatch, 1)
    store = open_store(StoreConfig(compaction=CompactionPolicy(keep_recent=5)))
    ids = [store.append("room", "u", f"c{i}", f"t{i}").id for i in range(20)]
    for i, mid in enumerate(ids):
        store.edit("room", "u", mid, f"t{i}'")  # seqs 21..40
    result: dict[str, int] = {}
    worker = threading.Thread(target=lambda: result.update(h=store.compact("room")))
    worker.start()
    deadline = time.monotonic() + WAIT_S
    while store.channel("room").horizon == 0 and time.monotonic() < deadline:
        time.sleep(0.001)  # the first step fixes the plan; the writes race the rest
    for i in range(10):
        store.append("room", "v", f"late{i}", "late")
        store.edit("room", "u", ids[i], f"t{i}''")
    worker.join(WAIT_S)
    assert not worker.is_alive()
    assert result["h"] == 35 == store.channel("room").horizon
    entries = log_of(store, "room", 35)
    assert seqs(entries) == list(range(36, 61))
    hist = history(store, "room", None, 100)
    assert seqs(hist) == [*range(1, 21), *(s for s in range(41, 61) if s % 2)]
    assert [m["text"] for m in hist[:20]] == [f"t{i}''" for i in range(10)] + [
        f"t{i}'" for i in range(10, 20)
    ]
    assert store.compact("room") == 55
    assert seqs(history(store, "room", None, 100)) == seqs(hist)


def test_a_sync_between_compaction_steps_never_sees_a_gap(
    open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each compaction step commits its own transaction; a reader between two steps
    sees the horizon already above everything dropped so far: a sync from the horizon
    is dense, and one from below it is told to resync."""
    set_compact_chunk(monkeypatch, 1)
    seen: list[tuple[int, list[int], bool]] = []

    def look() -> None:  # in another thread: the writer's step transaction is open
        info = store.channel("room")
        page = store.sync("room", info.horizon, 1000)
        below = store.sync("room", info.horizon - 1, 1000) if info.horizon else None
        seen.append((info.horizon, seqs(page.entries), below is None or below.resync))

    def fault() -> None:  # before each step's commit: check what the last one left
        reader = threading.Thread(target=look)
        reader.start()
        reader.join(WAIT_S)

    store = open_store(StoreConfig(compaction=CompactionPolicy(keep_recent=2)), fault=fault)
    ids = [store.append("room", "u", f"c{i}", f"t{i}").id for i in range(6)]
    for mid in ids:
        store.edit("room", "u", mid, "edited")  # seqs 7..12
    store.delete("room", "u", ids[0])  # seq 13
    seen.clear()
    assert store.compact("room") == 11
    assert len(seen) > 3  # several steps were looked between
    for horizon, page, resync_below in seen:
        assert page == list(range(horizon + 1, 14)), (horizon, page)
        assert resync_below, horizon


@pytest.mark.lmdb_only
def test_an_interrupted_compaction_is_finished_by_the_next_pass(
    open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass cut short between steps (a crash, or close()) has already moved the horizon:
    the next pass still drops the edit entries below it that the first one did not reach."""
    set_compact_chunk(monkeypatch, 1)
    steps: list[int] = []

    def fault() -> None:
        if steps:
            steps.append(1)
            if len(steps) == 3:  # the second step: the first committed the horizon
                raise RuntimeError("crash between steps")

    store = open_store(StoreConfig(compaction=CompactionPolicy(keep_recent=1)), fault=fault)
    for i in range(5):
        store.edit("room", "u", store.append("room", "u", f"c{i}", "x").id, "y")
    steps.append(0)  # armed
    with pytest.raises(RuntimeError):
        store.compact("room")
    assert store.channel("room").horizon == 9
    steps.clear()
    assert store.compact("room") == 9
    with store._env.begin() as txn:
        rec = store._channel_record(txn, "room")
        assert rec is not None
        prefix = lmdb_store.U64.pack(rec["id"])
        kinds = [
            (lmdb_store.U64.unpack(bytes(k)[8:])[0], unpackb(v)["kind"])
            for k, v in txn.cursor(db=store._log)
            if bytes(k).startswith(prefix)
        ]
    assert kinds == [
        (1, "message"),
        (3, "message"),
        (5, "message"),
        (7, "message"),
        (9, "message"),
        (10, "edit"),
    ]


def test_reset_channel(store: AnyStore) -> None:
    old = store.append("room", "u", "c1", "x")
    store.append("room", "v", "c2", "y")
    store.append("other", "u", "c1", "z")
    store.set_read("u", "room", 2)
    epoch = store.channel("room").epoch
    new_epoch = store.reset_channel("room")
    info = store.channel("room")
    assert (info.head, info.horizon, info.epoch) == (0, 0, new_epoch) and new_epoch != epoch
    assert store.sync("room", 2, 10).resync
    assert store.sync("room", 0, 10).entries == []
    assert history(store, "room", None, 10) == []
    assert store.read_cursor("u", "room") == 0
    assert store.lookup_dup("room", "u", "c1") is None
    with pytest.raises(NotFound):
        store.edit("room", "u", old.id, "again")
    res = store.append("room", "u", "c1", "x")  # a new log: the cid is new
    assert (res.seq, res.dup) == (1, False) and res.id != old.id
    assert seqs(log_of(store, "other")) == [1]
    assert store.reset_channel("nowhere") == 0


# ------------------------------------------------------------------- format


@pytest.mark.lmdb_only
def test_format_version_mismatch(open_store: OpenStore, db_path: Path) -> None:
    open_store().close()
    env = lmdb.open(str(db_path), max_dbs=8)
    try:
        meta = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            assert txn.get(b"format", db=meta) == b"2"
            txn.put(b"format", b"999", db=meta)
    finally:
        env.close()
    with pytest.raises(FormatError, match=r"format version 999.*reads version 2"):
        LmdbStore(db_path, StoreConfig())


# ------------------------------------------------------------------- map growth


@pytest.mark.lmdb_only
def test_map_grows_without_losing_anything(open_store: OpenStore, db_path: Path) -> None:
    config = StoreConfig(map_size=64 << 10)
    store = open_store(config)
    start = store._env.info()["map_size"]
    n = 600
    for i in range(n):
        res = store.append(f"ch{i % 3}", "u", f"c{i}", f"{i:05d}" + "x" * 200)
        assert res.seq == i // 3 + 1
    grown = store._env.info()["map_size"]
    assert grown >= 8 * start, "expected several doublings"
    for ch in range(3):
        entries = log_of(store, f"ch{ch}")
        assert seqs(entries) == list(range(1, n // 3 + 1))
        assert [int(e["text"][:5]) for e in entries] == list(range(ch, n, 3))
    store.close()
    store = open_store(config)
    assert store.channel("ch0").head == n // 3
    assert store.append("ch0", "u", "c0", "dup").dup


# ------------------------------------------------------------------- write faults


@pytest.mark.parametrize(
    "error",
    [
        lambda: lmdb.DiskError("injected: no space left on device"),
        lambda: lmdb.Error("injected: input/output error"),
        lambda: OSError(errno.EIO, "injected I/O error"),
    ],
    ids=["DiskError", "lmdb.Error", "OSError"],
)
def test_write_fault_consumes_no_seq(
    open_store: OpenStore, error: Callable[[], BaseException]
) -> None:
    faults = Faults(error)
    store = open_store(fault=faults)
    first = store.append("room", "u", "c1", "one")  # commit 1
    store.set_read("u", "room", 1)
    faults.fail_on = {faults.calls + 2, faults.calls + 3}
    assert store.append("room", "u", "c2", "two").seq == 2
    with pytest.raises(StoreUnavailable) as exc:
        store.append("room", "u", "c3", "three")  # the next commit fails
    assert exc.value.code == "store_unavailable"
    with pytest.raises(StoreUnavailable):
        store.edit("room", "u", first.id, "changed")  # and the one after
    # Reads keep working and see nothing of the failed writes.
    assert store.channel("room").head == 2
    assert [e["text"] for e in log_of(store, "room")] == ["one", "two"]
    assert store.read_cursor("u", "room") == 1
    assert store.lookup_dup("room", "u", "c3") is None
    # The fault is gone: the next append gets the next dense seq, the retried cid is new.
    again = store.append("room", "u", "c3", "three")
    assert (again.seq, again.dup) == (3, False)
    assert store.edit("room", "u", first.id, "changed").seq == 4
    assert seqs(log_of(store, "room")) == [1, 2, 3, 4]


def test_write_fault_fails_the_whole_batch(open_store: OpenStore) -> None:
    gate = Gate()
    faults = Faults(lambda: lmdb.DiskError("injected"))
    store = open_store(notify=gate, fault=faults)
    store.append("room", "u", "c0", "x")  # commit 1
    faults.fail_on = {3}  # commit 2 is the gate's blocker, 3 the batch
    ops = gate.one_batch(
        store,
        [WriteOp("message", "room", "u", cid=f"c{i}", text="x") for i in range(1, 4)]
        + [WriteOp("read", "room", "u", seq=1)],
    )
    assert all(isinstance(op.error, StoreUnavailable) and op.result is None for op in ops)
    assert store.channel("room").head == 1
    assert store.read_cursor("u", "room") == 0
    ops = gate.one_batch(
        store, [WriteOp("message", "room", "u", cid=f"c{i}", text="x") for i in range(1, 4)]
    )
    assert [op.result.seq for op in ops if isinstance(op.result, AppendResult)] == [2, 3, 4]


def test_compaction_fault_leaves_log_unchanged(open_store: OpenStore) -> None:
    faults = Faults(lambda: lmdb.DiskError("injected"))
    store = open_store(StoreConfig(compaction=CompactionPolicy(keep_recent=1)), fault=faults)
    ids = [store.append("room", "u", f"c{i}", "x").id for i in range(3)]
    store.edit("room", "u", ids[0], "y")
    faults.fail_on = {faults.calls + 1}
    with pytest.raises((lmdb.Error, StoreUnavailable), match="injected"):
        store.compact("room")
    assert store.channel("room").horizon == 0
    assert seqs(log_of(store, "room")) == [1, 2, 3, 4]
    assert store.compact("room") == 3
    assert store.append("room", "u", "c9", "x").seq == 5


# ------------------------------------------------------------------- validation

BAD_NAMES = ["", "x" * 129, "é" * 65, "a\0b"]


@pytest.mark.parametrize("field", ["channel", "user"])
@pytest.mark.parametrize("bad", BAD_NAMES, ids=["empty", "long", "long-utf8", "nul"])
def test_bad_names_fail_only_their_op(open_store: OpenStore, field: str, bad: str) -> None:
    gate = Gate()
    store = open_store(notify=gate)
    msg = store.append("room", "u", "c0", "x")

    def op(kind: str, **kw: Any) -> WriteOp:
        names = {"channel": "room", "user": "u"}
        names[field] = bad
        return WriteOp(kind, names["channel"], names["user"], **kw)

    good = [WriteOp("message", "room", "u", cid=f"g{i}", text="ok") for i in range(3)]
    bad_ops = [
        op("message", cid="b1", text="bad"),
        op("edit", target=msg.id, text="bad"),
        op("delete", target=msg.id),
        op("read", seq=1),
    ]
    ops = gate.one_batch(store, [good[0], *bad_ops[:2], good[1], *bad_ops[2:], good[2]])
    for b in bad_ops:
        assert type(b.error) is StoreError and b.result is None, b
        assert field in b.error.message
    assert [g.result.seq for g in good if isinstance(g.result, AppendResult)] == [2, 3, 4]
    assert all(g.error is None for g in good)
    assert len(ops) == 7
    assert history(store, "room", None, 10)[0]["text"] == "x"
    assert store.channels() == ["room"]


def test_longest_valid_names(store: AnyStore) -> None:
    channel, user = "c" * 128, "é" * 64  # 128 bytes each
    res = store.append(channel, user, "k" * 64, "x")
    assert store.edit(channel, user, res.id, "y").seq == 2
    assert store.set_read(user, channel, 2) == 2
    assert history(store, channel, None, 1)[0]["sender"] == user


@pytest.mark.parametrize("cid", ["", "x" * 65, None], ids=["empty", "long", "none"])
def test_bad_cid_fails_only_its_op(open_store: OpenStore, cid: str | None) -> None:
    gate = Gate()
    store = open_store(notify=gate)
    good1 = WriteOp("message", "room", "u", cid="a", text="ok")
    bad = WriteOp("message", "room", "u", cid=cid, text="bad")
    good2 = WriteOp("message", "room", "u", cid="b", text="ok")
    gate.one_batch(store, [good1, bad, good2])
    assert type(bad.error) is StoreError and "cid" in bad.error.message
    assert isinstance(good1.result, AppendResult) and good1.result.seq == 1
    assert isinstance(good2.result, AppendResult) and good2.result.seq == 2
    assert store.channel("room").head == 2


def test_message_without_text_and_edit_without_text(store: AnyStore) -> None:
    with pytest.raises(StoreError):
        write(store, WriteOp("message", "room", "u", cid="c", text=None))
    msg = store.append("room", "u", "c", "x")
    with pytest.raises(StoreError):
        write(store, WriteOp("edit", "room", "u", target=msg.id, text=None))
    assert store.channel("room").head == 1


def test_unencodable_meta_fails_only_its_op(store: AnyStore) -> None:
    with pytest.raises(StoreError):
        write(store, WriteOp("message", "room", "u", cid="c", text="x", meta={"s": {1, 2}}))
    assert store.append("room", "u", "c2", "x").seq == 1


def test_a_failed_first_message_creates_no_channel(store: AnyStore) -> None:
    with pytest.raises(StoreError):
        write(store, WriteOp("message", "ghost", "u", cid="c", text="x", meta={"s": {1, 2}}))
    assert "ghost" not in store.channels()
    assert store.channel("ghost").head == 0
    if not isinstance(store, LmdbStore):
        return
    path = store._env.path()
    store.close()
    with lmdb_store.LmdbReader(path) as reader:  # nothing of it on disk either
        assert reader.channel("ghost") is None


def test_one_submit_of_many_writes_keeps_order_and_batch_limits(
    open_store: OpenStore,
) -> None:
    gate = Gate()
    store = open_store(StoreConfig(max_batch=3), notify=gate)
    ops = [WriteOp("message", "room", "u", cid=f"c{i}", text=f"t{i}") for i in range(8)]
    for op in ops:
        op.done = threading.Event()
    store.submit(*ops)  # one queue item, more writes than a batch holds
    for op in ops:
        assert op.done is not None and op.done.wait(WAIT_S)
    assert [len(batch) for batch in gate.batches] == [3, 3, 2]
    assert [op.result.seq for op in ops if isinstance(op.result, AppendResult)] == [*range(1, 9)]
    assert [e["text"] for e in log_of(store, "room")] == [f"t{i}" for i in range(8)]


@pytest.mark.lmdb_only
def test_a_batch_retried_after_map_full_gives_the_same_results(
    open_store: OpenStore,
) -> None:
    """One batch of every kind of op that depends on earlier ops of the same batch (a new
    channel, a cid repeated, an edit and a delete of messages appended just before, a
    read cursor, a bad op), failed once by MDB_MAP_FULL and committed on the retry."""
    faults = Faults(lambda: lmdb.MapFullError("injected"))
    gate = Gate()
    store = open_store(notify=gate, fault=faults)
    chan = store.append("room", "u", "c0", "m1").id.split("-")[0]  # seq 1
    faults.fail_on = {faults.calls + 2}  # the next batch after the gate's own
    batch = [
        WriteOp("message", "room", "u", cid="c1", text="m2"),  # seq 2, id 1-2
        WriteOp("edit", "room", "u", target=f"{chan}-2", text="m2 edited"),  # seq 3
        WriteOp("message", "room", "u", cid="c2", text="m4"),  # seq 4, id 1-4
        WriteOp("delete", "room", "u", target=f"{chan}-4"),  # seq 5
        WriteOp("message", "fresh", "u", cid="f1", text="f"),  # a new channel, seq 1
        WriteOp("message", "fresh", "u", cid="f1", text="again"),  # its cid again
        WriteOp("message", "ghost", "u", cid="g", text="x", meta={"s": {1, 2}}),  # fails
        WriteOp("read", "room", "v", seq=4),
    ]
    gate.one_batch(store, batch)
    assert faults.calls >= faults.fail_on.pop()  # the fault did fire, then the retry
    results = [op.result for op in batch]
    assert [getattr(r, "seq", r) for r in results] == [2, 3, 4, 5, 1, 1, None, 4]
    assert [getattr(r, "dup", None) for r in results[4:6]] == [False, True]
    assert [op.error is None for op in batch] == [True] * 6 + [False, True]
    assert batch[7].changed
    room = log_of(store, "room")
    assert [(e["seq"], e["kind"]) for e in room] == [
        (1, "message"), (2, "message"), (3, "edit"), (4, "message"), (5, "delete")
    ]  # fmt: skip
    assert room[1]["text"] == "m2 edited" and room[3].get("deleted") and "text" not in room[3]
    assert [e["text"] for e in log_of(store, "fresh")] == ["f"]
    assert "ghost" not in store.channels()
    assert store.read_cursor("v", "room") == 4


# ------------------------------------------------------------- the writer's appends
# LmdbStore hands a batch's new messages to the extension's AppendBatch (plain calls here).


def append_batch(
    rec: dict[str, int], seal: Callable[[Entry, bytes], Entry] | None = None
) -> AppendBatch:
    def channel(name: str) -> tuple[dict[str, int], bytes, str]:
        assert name == "room"
        return rec, lmdb_store.U64.pack(rec["id"]), "ab"

    ring = DedupRing(16, lmdb_store.MAX_DEDUP_KEY)
    return AppendBatch(ring, {}, T0, 10, channel, seal, AppendResult, 128, 64)


@pytest.mark.parametrize("meta", [None, {"k": [1, {"x": 2.5}], "b": True}])
@pytest.mark.parametrize("sealed", [False, True])
def test_append_batch_rows_are_the_entry_packed(meta: dict[str, Any] | None, sealed: bool) -> None:
    """The extension writes a message's rows itself: the log row must be what ``packb``
    of the entry dict gives (the layout every reader, export and older version reads),
    sealed by the key ring's function when one is set; the journal row and the cid are
    the dedup journal's."""
    rec = {"id": 7, "head": 41, "epoch": 3}
    seen: list[tuple[Entry, bytes]] = []

    def seal(entry: Entry, key: bytes) -> Entry:
        seen.append((dict(entry), key))
        return {**entry, "text": "sealed"}

    batch = append_batch(rec, seal if sealed else None)
    op = WriteOp("message", "room", "ü", cid="c1", text="hi", meta=meta)
    assert batch.append(op) == AppendResult("room", 42, "ab-42", T0)
    assert rec["head"] == 42 and op.epoch == 3
    entry: Entry = {"seq": 42, "kind": "message", "id": "ab-42", "sender": "ü", "ts": T0}
    entry["text"] = "hi"
    if meta:
        entry["meta"] = meta
    key = lmdb_store.U64.pack(7) + lmdb_store.U64.pack(42)
    stored = {**entry, "text": "sealed"} if sealed else entry
    assert batch.take() == ([(key, packb(stored))], [(key, b"")])
    assert seen == ([(entry, key)] if sealed else [])
    dkey = lmdb_store.U64.pack(7) + "ü".encode() + b"\0c1"
    assert batch.journal == [(lmdb_store.U64.pack(10), packb([dkey, 42, T0]))]
    assert batch.new_cids == {dkey: 42}
    assert batch.append(op) == 42  # its cid again: the first seq, nothing queued
    assert batch.take() == ([], []) and rec["head"] == 42
    op2 = WriteOp("message", "room", "ü", cid="c2", text="again")
    assert batch.append(op2).seq == 43  # the next order in the journal
    assert batch.journal[-1][0] == lmdb_store.U64.pack(11)


def test_append_batch_refuses_a_seq_past_the_last_and_changes_nothing() -> None:
    """A log at seq 2**64 - 1 (an export may bring one) takes no more messages: refused,
    not wrapped to seq 0 (which would overwrite the log from its start)."""
    rec = {"id": 7, "head": 2**64 - 1, "epoch": 1}
    batch = append_batch(rec)
    with pytest.raises(ValueError, match="last seq"):
        batch.append(WriteOp("message", "room", "u", cid="c", text="x"))
    assert batch.take() == ([], []) and rec["head"] == 2**64 - 1


@pytest.mark.lmdb_only
def test_a_batch_is_freed_when_it_is_done(open_store: OpenStore) -> None:
    """Nothing of a committed batch outlives it: no reference cycle holds its
    transaction, cursors and rows (with the collector off, as between its runs); and an
    AppendBatch in a cycle is collected (the extension tells the collector what it holds).
    Found by review: every batch was kept until a collection found nothing to free."""
    store = open_store()

    def alive(kind: type) -> int:
        return sum(1 for o in gc.get_objects() if type(o) is kind)

    gc.collect()
    gc.disable()
    try:
        before = alive(lmdb_store._Batch)
        for i in range(50):
            store.write(WriteOp("message", "room", "u", cid=f"c{i}", text="x"), timeout=WAIT_S)
        assert alive(lmdb_store._Batch) == before
    finally:
        gc.enable()
    holder: list[Any] = []  # holder -> AppendBatch -> holder.append -> holder
    holder.append(AppendBatch(DedupRing(4), {}, T0, 0, holder.append, None, AppendResult, 8, 8))
    del holder
    before = alive(AppendBatch)
    gc.collect()
    assert alive(AppendBatch) < before


@pytest.mark.parametrize(
    ("op", "error"),
    [
        (WriteOp("message", "room", "", cid="c", text="x"), ValueError),
        (WriteOp("message", "room", "a\0b", cid="c", text="x"), ValueError),
        (WriteOp("message", "room", "u" * 129, cid="c", text="x"), ValueError),
        (WriteOp("message", "room", "u", cid="", text="x"), ValueError),
        (WriteOp("message", "room", "u", cid="c" * 65, text="x"), ValueError),
        (WriteOp("message", "room", "u", cid=None, text="x"), ValueError),
        (WriteOp("message", "room", "u", cid="c", text=None), ValueError),
        (WriteOp("message", "room", "u", cid="c", text="x", meta={"s": {1}}), EncodeError),
        (WriteOp("message", "room", "u", cid="\ud800", text="x"), UnicodeEncodeError),
    ],
)
def test_append_batch_refuses_a_malformed_message_and_changes_nothing(
    op: WriteOp, error: type[Exception]
) -> None:
    rec = {"id": 7, "head": 5, "epoch": 1}
    batch = append_batch(rec)
    with pytest.raises(error):
        batch.append(op)
    assert batch.take() == ([], []) and batch.journal == [] and batch.new_cids == {}
    assert rec["head"] == 5 and op.epoch == 0


# ------------------------------------------------------------------- regressions
# Bugs found while writing these tests (each states the behaviour the store must have).


def test_longest_names_with_utf8_cid_do_not_kill_the_writer(store: AnyStore) -> None:
    """A 128-byte user id and a 64-character non-ASCII cid are both within the limits;
    their dedup key (8 + 128 + 1 + 128 bytes) once exceeded DedupRing's default
    max_key_len of 256, so ``ring.insert`` raised after the commit and killed the writer."""
    op = WriteOp("message", "room", "u" * 128, cid="é" * 64, text="hi")
    res = store.write(op, timeout=3).result
    assert isinstance(res, AppendResult) and res.seq == 1
    assert store.append("room", "v", "c", "next").seq == 2


@pytest.mark.parametrize("target", ["1-18446744073709551616", "1-\u00b2"])
def test_weird_numeric_ids_are_not_found_and_do_not_poison_the_batch(
    open_store: OpenStore, target: str
) -> None:
    gate = Gate()
    store = open_store(notify=gate)
    store.append("room", "u", "c0", "x")
    good = WriteOp("message", "room", "u", cid="c1", text="ok")
    bad = WriteOp("edit", "room", "u", target=target, text="y")
    gate.one_batch(store, [good, bad])
    assert isinstance(bad.error, NotFound)
    assert isinstance(good.result, AppendResult) and good.result.seq == 2


ARABIC_DIGITS = str.maketrans(
    "0123456789", "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669"
)
ALIASES: dict[str, Callable[[str], str]] = {
    "zero-channel": lambda chan: f"0{chan}-1",
    "zero-seq": lambda chan: f"{chan}-01",
    "arabic-seq": lambda chan: f"{chan}-\u0661",
    "arabic-channel": lambda chan: f"{chan.translate(ARABIC_DIGITS)}-1",
}


@pytest.mark.parametrize("alias", ALIASES)
def test_message_ids_are_canonical(store: AnyStore, alias: str) -> None:
    """Only the id the store handed out names a message; an alias that ``int()``
    happens to parse to the same numbers must not, or the edit entry's ``id`` (the
    alias) does not match the message the clients know. (The part before the dash is
    the channel's internal id on LMDB, its epoch on Redis.)"""
    msg = store.append("room", "u", "c0", "x")
    chan = msg.id.split("-")[0]
    assert msg.id == f"{chan}-1"
    with pytest.raises(NotFound):
        store.edit("room", "u", ALIASES[alias](chan), "y")
    if chan != chan.upper():  # a hex prefix (LMDB): its upper case is another id
        with pytest.raises(NotFound):
            store.edit("room", "u", f"{chan.upper()}-1", "y")


def test_lookup_dup_agrees_with_append_after_dedup_pruning(
    open_store: OpenStore, clock: FakeClock
) -> None:
    """After the journal pruned a cid (past ``dedup_retention_ms``), ``lookup_dup`` and
    ``append`` still give the same answer, and a dup never has ``ts`` 0 while its
    message is in the log."""
    store = open_store(StoreConfig(dedup_retention_ms=1000))
    store.append("room", "u", "c1", "x")
    clock.advance(5000)
    store.append("room", "u", "c2", "y")  # this commit prunes c1's dedup entry
    hit = store.lookup_dup("room", "u", "c1")
    res = store.append("room", "u", "c1", "x")
    assert (hit is None) == (not res.dup)
    assert hit is None or hit.ts != 0


def test_failed_read_is_not_changed(open_store: OpenStore) -> None:
    """A read whose batch failed to commit moved no cursor: ``changed`` must be False
    (a notify hook that pushes ``read`` events on ``changed`` would announce a cursor
    the store does not have)."""
    faults = Faults(lambda: lmdb.DiskError("injected"))
    store = open_store(fault=faults)
    store.append("room", "bob", "c0", "x")
    faults.fail_on = {faults.calls + 1}
    op = WriteOp("read", "room", "alice", seq=1)
    with pytest.raises(StoreUnavailable):
        write(store, op)
    assert store.read_cursor("alice", "room") == 0
    assert op.changed is False


def run_briefly(fn: Callable[[], Any], seconds: float = 5.0) -> tuple[bool, Any]:
    """Run ``fn`` in a daemon thread; (finished, its result or exception)."""
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except Exception as exc:
            out.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    return not worker.is_alive(), out[0] if out else None


def test_compact_or_reset_after_close_does_not_block(open_store: OpenStore) -> None:
    store = open_store()
    store.append("room", "u", "c", "x")
    store.close()
    for fn in (lambda: store.compact("room"), lambda: store.reset_channel("room")):
        finished, result = run_briefly(fn, 1.0)
        assert finished, "blocked forever: the job was queued behind the writer's stop"
        assert isinstance(result, StoreUnavailable)


def test_close_during_a_multi_step_compaction(
    open_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    set_compact_chunk(monkeypatch, 1)
    steps = threading.Semaphore(0)
    slow = threading.Event()

    def fault() -> None:
        if slow.is_set():
            steps.release()
            time.sleep(0.01)

    store = open_store(StoreConfig(compaction=CompactionPolicy(keep_recent=1)), fault=fault)
    for i in range(40):
        store.edit("room", "u", store.append("room", "u", f"c{i}", "x").id, "y")
    slow.set()
    out: list[Any] = []

    def compact() -> None:
        try:
            out.append(store.compact("room"))
        except StoreUnavailable as exc:
            out.append(exc)

    worker = threading.Thread(target=compact, daemon=True)
    worker.start()
    for _ in range(3):
        assert steps.acquire(timeout=WAIT_S)  # the compaction is a few steps in
    store.close()
    worker.join(2.0)
    assert not worker.is_alive(), "compact() never returns once close() stopped the writer"
    assert out and (out[0] == 79 or isinstance(out[0], StoreUnavailable))


def test_memberships_are_added_forgotten_and_listed_up_to_a_limit(store: AnyStore) -> None:
    for channel in ("b", "a", "c"):
        store.write(WriteOp("member", channel, "u"))
    store.write(WriteOp("member", "a", "u"))  # again: still one
    assert store.channels_of("u") == ["a", "b", "c"]
    assert store.channels_of("u", limit=2) == ["a", "b"]
    store.write(WriteOp("unmember", "b", "u"))
    store.write(WriteOp("unmember", "zz", "u"))  # not a member: nothing to end
    assert store.channels_of("u") == ["a", "c"]
    assert not store.is_member("u", "b") and store.is_member("u", "c")
    assert store.channels_of("v") == []
