"""The store's defences against its own data growing or going wrong (issue 18): edits
in O(1) with a bound per message, history pages that cost their own size, a data file
checked before LMDB maps it, a store that refuses to start when its data was lost,
epochs that never repeat, and stored entries that fail a read cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from tsmsg._native import packb
from tsmsg.store import (
    DataDirError,
    LimitExceeded,
    LmdbStore,
    MemoryStore,
    StoreConfig,
    StoreError,
    lmdb_store,
)
from tsmsg.store.lmdb_store import LATEST_EDIT, STORE_FILE, U64
from tsmsg.store.memory_store import MemoryData

CHILD_TIMEOUT = 60.0


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir: Path) -> Iterator[LmdbStore]:
    s = LmdbStore(data_dir, StoreConfig(durability="async"))
    yield s
    s.close()


def raw_db(data_dir: Path, name: str) -> dict[bytes, bytes]:
    """Every row of a named database, read with plain LMDB (no tsmsg code)."""
    env = lmdb.open(str(data_dir), readonly=True, lock=False, max_dbs=16)
    try:
        db = env.open_db(name.encode(), create=False)
        with env.begin() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
    finally:
        env.close()


# ------------------------------------------------------------------ edits (item 4)


def test_an_edit_writes_constant_sized_rows(store: LmdbStore, data_dir: Path) -> None:
    """The message's edit record stays one fixed-size row however often it is edited
    (format 1 rewrote a list of every edit seq on each edit)."""
    msg = store.append("room", "u", "c1", "v0")
    for i in range(1, 201):
        store.edit("room", "u", msg.id, f"v{i}")
    store.close()
    rows = raw_db(data_dir, "edit_links")
    mkey = U64.pack(1) + U64.pack(msg.seq)
    assert LATEST_EDIT.unpack(rows[mkey]) == (201, 200)  # the latest edit's seq, the count
    assert max(len(v) for v in rows.values()) == LATEST_EDIT.size


@pytest.mark.parametrize("backend", ["lmdb", "memory"])
def test_edits_per_message_are_bounded(data_dir: Path, backend: str) -> None:
    s = (
        LmdbStore(data_dir, StoreConfig(durability="async", max_edits=3))
        if backend == "lmdb"
        else MemoryStore(MemoryData(max_edits=3))
    )
    try:
        msg = s.append("room", "u", "c1", "v0")
        for i in range(3):
            s.edit("room", "u", msg.id, f"v{i}")
        with pytest.raises(LimitExceeded, match=r"edited 3 times.*max_edits_per_message 3"):
            s.edit("room", "u", msg.id, "one too many")
        assert LimitExceeded.code == "limit_exceeded"
        assert s.history("room", None, 10).messages[0]["text"] == "v2"
        s.delete("room", "u", msg.id)  # still possible, and redacts every edit
        edits = [e for e in s.sync("room", 0, 100).entries if e["kind"] == "edit"]
        assert len(edits) == 3 and all(e.get("deleted") and "text" not in e for e in edits)
    finally:
        s.close()


def test_delete_after_compaction_redacts_the_edits_left(data_dir: Path) -> None:
    """Compaction drops old edits and their links; a later delete redacts the rest."""
    policy = lmdb_store.CompactionPolicy(keep_recent=2)
    s = LmdbStore(data_dir, StoreConfig(durability="async", compaction=policy))
    try:
        msg = s.append("room", "u", "c1", "v0")
        for i in range(6):
            s.edit("room", "u", msg.id, f"v{i}")
        s.compact("room")
        s.delete("room", "u", msg.id)
        left = s.sync("room", s.channel("room").horizon, 100).entries
        assert [e["kind"] for e in left] == ["edit", "edit", "delete"]
        assert all("text" not in e for e in left)
    finally:
        s.close()
    assert raw_db(data_dir, "edit_links") == {}


def test_history_reads_only_the_messages_of_its_page(
    store: LmdbStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page decodes its own messages, not the edit entries between them (item 1:
    36k edit entries made each history request cost 44-61 ms)."""
    first = store.append("room", "u", "c1", "old")
    for i in range(300):
        store.edit("room", "u", first.id, f"edit {i}")
    for i in range(3):
        store.append("room", "u", f"n{i}", f"new {i}")
    decoded: list[Any] = []
    real = lmdb_store.unpackb

    def counting(raw: bytes) -> Any:
        decoded.append(raw)
        return real(raw)

    monkeypatch.setattr(lmdb_store, "unpackb", counting)
    page = store.history("room", None, 2)
    assert [m["text"] for m in page.messages] == ["new 1", "new 2"] and page.more
    older = store.history("room", page.messages[0]["seq"], 10)
    assert [m["text"] for m in older.messages] == ["edit 299", "new 0"] and not older.more
    assert len(decoded) <= 2 + 2 + 2  # the channel records and the four messages


# ------------------------------------------------------------------ lost data (item 6)


def test_an_emptied_data_file_is_refused(data_dir: Path) -> None:
    s = LmdbStore(data_dir)
    s.append("room", "u", "c1", "hi")
    s.close()
    store_id = (data_dir / STORE_FILE).read_text().strip()
    os.truncate(data_dir / "data.mdb", 0)
    with pytest.raises(DataDirError, match=rf"held store {store_id}.*data.mdb is missing or empty"):
        LmdbStore(data_dir)
    (data_dir / "data.mdb").unlink()
    with pytest.raises(DataDirError, match="missing or empty"):
        LmdbStore(data_dir)
    assert not (data_dir / "data.mdb").exists()  # nothing was created


def test_epochs_never_repeat(tmp_path: Path) -> None:
    """A new store (as after a lost data file) and a reset give new epochs: never the
    counter a client may hold from before, always a positive int64."""
    epochs = []
    for name in ("one", "two"):
        with LmdbStore(tmp_path / name) as s:
            s.append("room", "u", "c1", "hi")
            epochs.append(s.channel("room").epoch)
            epochs.append(s.reset_channel("room"))
            s.append("room", "u", "c1", "hi")
            assert s.channel("room").epoch == epochs[-1]
    assert len(set(epochs)) == 4 and all(0 < e < 2**63 for e in epochs)
    assert not {1, 2, 3} & set(epochs)
    data = MemoryData()
    mem = MemoryStore(data)
    mem.append("room", "u", "c1", "hi")
    mem_epoch = mem.channel("room").epoch
    assert mem_epoch != 1 and mem.reset_channel("room") not in (mem_epoch, 2)


def test_epochs_and_ids_are_stable_across_restarts(data_dir: Path) -> None:
    with LmdbStore(data_dir) as s:
        msg = s.append("room", "u", "c1", "hi")
        info = s.channel("room")
    with LmdbStore(data_dir) as s:
        assert s.channel("room") == info
        assert s.append("room", "u", "c1", "again").id == msg.id  # a dup: the same id
        assert s.append("room", "u", "c2", "next").id.split("-")[0] == msg.id.split("-")[0]


# ------------------------------------------------------------------ cut-short files (item 7)


def open_in_child(data_dir: Path) -> subprocess.CompletedProcess[str]:
    """Open (and close) a store in a child process: before the check, LMDB's SIGBUS on a
    cut-short file killed the process that opened it."""
    code = f"from tsmsg.store import LmdbStore; LmdbStore({str(data_dir)!r}).close()"
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT
    )


@pytest.mark.parametrize("cut", ["12k", "half"])
def test_a_cut_short_data_file_is_one_clear_error(data_dir: Path, cut: str) -> None:
    with LmdbStore(data_dir) as s:
        for i in range(3000):
            s.submit(lmdb_store.WriteOp("message", "room", "u", cid=f"c{i}", text="x" * 200))
        s.append("room", "u", "last", "x")
    path = data_dir / "data.mdb"
    size = path.stat().st_size
    new_size = 12 << 10 if cut == "12k" else size // 2
    os.truncate(path, new_size)
    child = open_in_child(data_dir)
    assert child.returncode != -7, "SIGBUS"
    assert child.returncode == 1
    last = child.stderr.strip().splitlines()[-1]
    assert f"data.mdb is {new_size} bytes but its LMDB meta page says it holds" in last
    assert "cut short" in last
    with pytest.raises(DataDirError, match=rf"is {new_size} bytes"):
        lmdb_store.LmdbReader(data_dir)  # inspect and backup are covered too


def test_a_data_file_shorter_than_its_meta_pages(data_dir: Path) -> None:
    LmdbStore(data_dir).close()
    os.truncate(data_dir / "data.mdb", 5000)
    with pytest.raises(DataDirError, match=r"5000 bytes, shorter than LMDB's two meta pages"):
        LmdbStore(data_dir)


def test_a_new_store_on_a_full_filesystem(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    def full(path: Any) -> Any:
        st = real(path)
        return os.statvfs_result((*st[:4], 0, *st[5:]))  # f_bavail = 0

    monkeypatch.setattr(os, "statvfs", full)
    with pytest.raises(DataDirError, match=r"cannot create a store in .*: 0 bytes free"):
        LmdbStore(data_dir)
    assert not (data_dir / "data.mdb").exists()


# ------------------------------------------------------------------ corrupt entries (item 12)


def corrupt(data_dir: Path, seq: int, value: bytes) -> None:
    env = lmdb.open(str(data_dir), max_dbs=16)
    try:
        db = env.open_db(b"log", create=False)
        with env.begin(write=True) as txn:
            assert txn.replace(U64.pack(1) + U64.pack(seq), value, db=db) is not None
    finally:
        env.close()


@pytest.mark.parametrize("value", [b"\xc1", packb([1, 2]), packb({"seq": "1", "kind": "message"})])
def test_a_corrupt_entry_is_a_store_error(data_dir: Path, value: bytes) -> None:
    with LmdbStore(data_dir) as s:
        for i in range(3):
            s.append("room", "u", f"c{i}", f"m{i}")
    corrupt(data_dir, 2, value)
    with LmdbStore(data_dir) as s:
        for read in (
            lambda: s.sync("room", 0, 10),
            lambda: s.history("room", None, 10),
            lambda: s.unread("bob", "room"),
            lambda: s.edit("room", "u", s.sync("room", 2, 1).entries[0]["id"][:-1] + "2", "x"),
        ):
            with pytest.raises(StoreError, match="log entry 2 of channel id 1 is corrupt") as exc:
                read()
            assert exc.value.code == "internal"
        assert [e["seq"] for e in s.sync("room", 2, 10).entries] == [3]  # the rest reads


# ------------------------------------------------------------------ migration


def write_format_1(data_dir: Path) -> None:
    """A format 1 directory as the previous tsmsg left it: a message edited twice, and a
    second message; edit lists in `edits`, counter epochs, ids `<channel id>-<seq>`."""
    env = lmdb.open(str(data_dir), max_dbs=16)
    try:
        dbs = {n: env.open_db(n.encode()) for n in ("meta", "channels", "log", "edits")}
        key = lambda seq: U64.pack(1) + U64.pack(seq)  # noqa: E731
        base = {"sender": "u", "ts": 5}
        with env.begin(write=True) as txn:
            txn.put(b"format", b"1", db=dbs["meta"])
            txn.put(b"next_channel_id", U64.pack(2), db=dbs["meta"])
            rec = {"id": 1, "head": 4, "horizon": 0, "epoch": 1}
            txn.put(b"room", packb(rec), db=dbs["channels"])
            entries = [
                {"seq": 1, "kind": "message", "id": "1-1", "text": "v2", "edited": 5},
                {"seq": 2, "kind": "edit", "id": "1-1", "text": "v1"},
                {"seq": 3, "kind": "edit", "id": "1-1", "text": "v2"},
                {"seq": 4, "kind": "message", "id": "1-4", "text": "other"},
            ]
            for e in entries:
                txn.put(key(e["seq"]), packb({**e, **base}), db=dbs["log"])
            txn.put(key(1), packb([2, 3]), db=dbs["edits"])
    finally:
        env.close()


def test_format_1_is_migrated_on_open(data_dir: Path) -> None:
    write_format_1(data_dir)
    with LmdbStore(data_dir) as s:
        assert s.channel("room").epoch == 1  # clients' epochs and ids stay valid
        assert [m["id"] for m in s.history("room", None, 10).messages] == ["1-1", "1-4"]
        s.delete("room", "u", "1-1")  # its edits, linked by the migration, are redacted
        assert all("text" not in e for e in s.sync("room", 1, 2).entries)
        s.edit("room", "u", "1-4", "new")
        fresh = s.append("other", "u", "c1", "x")
        assert not fresh.id.startswith("2-")  # new channels get salted ids
    rows = raw_db(data_dir, "meta")
    assert rows[b"format"] == b"2" and len(rows[b"store_id"]) == 32
    assert (data_dir / STORE_FILE).read_text().strip() == rows[b"store_id"].decode()
