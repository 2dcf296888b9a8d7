"""MemoryStore's own behaviour: batches, failed commits, crash and close. (Its answers are
LmdbStore's: tests/test_store_model.py runs LmdbStore against MemoryData.)"""

from __future__ import annotations

import pytest

from tsmsg.store import AppendResult, MemoryData, MemoryStore, StoreUnavailable, WriteOp


def msg(cid: str, channel: str = "room") -> WriteOp:
    return WriteOp("message", channel, "alice", cid=cid, text=f"text {cid}")


def test_autocommit_and_blocking_helpers() -> None:
    batches: list[list[WriteOp]] = []
    store = MemoryStore(notify=batches.append, clock=lambda: 1000)
    first = store.append("room", "alice", "c1", "hello")
    assert first == AppendResult("room", 1, first.id, 1000) and first.id.endswith("-1")
    assert store.append("room", "alice", "c1", "again").dup
    assert store.set_read("bob", "room", 5) == 1
    assert len(batches) == 3
    assert store.sync("room", 0, 10).entries[0]["text"] == "hello"


def test_scheduled_batches_and_failed_commit() -> None:
    batches: list[list[WriteOp]] = []
    clock = iter(range(100, 200)).__next__
    store = MemoryStore(notify=batches.append, clock=clock, autocommit=False)
    ops = [msg(f"c{i}") for i in range(5)]
    for op in ops:
        store.submit(op)
    assert not batches and store.channel("room").head == 0
    assert store.commit(2) == ops[:2]
    failed = store.commit(1, fail="disk full")
    assert isinstance(failed[0].error, StoreUnavailable) and failed[0].result is None
    assert store.channel("room").head == 2  # the failed batch stored nothing
    store.commit()
    assert [op.result.seq for op in ops if isinstance(op.result, AppendResult)] == [1, 2, 3, 4]
    assert [op.result.ts for op in ops[:2]] == [100, 100]  # one clock reading per batch


def test_crash_loses_pending_close_commits_them() -> None:
    data = MemoryData()
    notified: list[WriteOp] = []
    store = MemoryStore(data, notify=notified.extend, autocommit=False)
    store.submit(msg("a"))
    store.commit()
    store.submit(msg("b"))
    assert [op.cid for op in store.crash()] == ["b"]
    with pytest.raises(StoreUnavailable):
        store.submit(msg("c"))
    reopened = MemoryStore(data, notify=notified.extend, autocommit=False)
    assert reopened.channel("room").head == 1
    reopened.submit(msg("b"))
    reopened.close()  # commits what is pending, then refuses writes
    assert [op.cid for op in notified] == ["a", "b"]
    assert MemoryStore(data).lookup_dup("room", "alice", "b") is not None
