"""Store faults, SQLite's way: fail the Nth commit, for N = 1, 2, ... until a run commits
everything without reaching N, with each kind of failure a disk can produce.

The store's ``fault`` hook is called in the writer thread just before each commit; the
injector here raises from it on the chosen commits:

- ``enospc``: ``OSError(ENOSPC)``, a full disk;
- ``eio``: ``lmdb.DiskError`` (what py-lmdb raises for an I/O error);
- ``map_full``: ``lmdb.MapFullError``, which is not a failure at all: the store must grow
  the map and commit the same batch again, so nobody sees it.

Each run has writer threads append (with acks), edit and delete their own acked messages
and move read cursors in two channels, and checks, against a model built only from what
the calls returned:

- exactly the writes of the failed batch got ``StoreUnavailable`` (and no result), every
  other write succeeded;
- no seq was consumed: the acked entries of each channel are exactly seqs 1..head;
- reads (``channel``, ``sync``, ``history``, dup lookups) work while the fault is in
  place: they run from another thread inside the failing commit;
- writes resume: the failed appends retried with the same cid are stored once, at the
  next seqs, and failed edits and deletes retried succeed;
- after close and reopen an independent checker (raw LMDB reads and msgpack, not the
  store's code) finds exactly the acked entries, each message in its replayed latest
  state, and every acked cid answers dup with its seq.

The last test does the same over TCP: a server whose store fails every commit for a
while answers ``store_unavailable``, keeps the connection, and stores a retry once.
"""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest

from conftest import Harness
from tsmsg.store import AppendResult, LmdbStore, NotFound, StoreConfig, StoreUnavailable, WriteOp

CHANNELS = ("ch-a", "ch-b")
THREADS = 3
OPS_PER_THREAD = 8  # 24 writes: at most 24 commits, so N runs up to 25 at most
MAX_N = 40  # the loop's hard bound; it must end earlier by itself
READ_TIMEOUT_S = 10.0  # the reads run inside the failing commit


def enospc() -> Exception:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def eio() -> Exception:
    return lmdb.DiskError(f"mdb_txn_commit: {os.strerror(errno.EIO)}")


def map_full() -> Exception:
    return lmdb.MapFullError("mdb_txn_commit: MDB_MAP_FULL: Environment mapsize limit reached")


FAULTS: dict[str, Callable[[], Exception]] = {"enospc": enospc, "eio": eio, "map_full": map_full}


class CommitFaults:
    """The store's fault hook: fails the commits numbered in ``fail_at`` (1-based, counting
    every commit attempt), or every commit while ``active`` is set. ``during`` runs inside
    each failing commit, before the error is raised."""

    def __init__(
        self,
        make_error: Callable[[], Exception],
        fail_at: frozenset[int] = frozenset(),
        during: Callable[[], None] | None = None,
    ) -> None:
        self.make_error = make_error
        self.fail_at = fail_at
        self.during = during
        self.active = False
        self.calls = 0
        self.fired = 0

    def __call__(self) -> None:
        self.calls += 1
        if self.active or self.calls in self.fail_at:
            self.fired += 1
            if self.during is not None:
                self.during()
            raise self.make_error()


# ---------------------------------------------------------------------- the workload


@dataclass
class Write:
    """One store call of a writer thread and what it returned."""

    kind: str  # append, edit, delete, read
    channel: str
    user: str
    cid: str = ""  # append
    target: str = ""  # edit, delete
    text: str = ""  # append, edit
    seq: int = 0  # read: the position asked for
    result: AppendResult | int | None = None
    error: BaseException | None = None

    def call(self, store: LmdbStore) -> None:
        try:
            if self.kind == "append":
                self.result = store.append(self.channel, self.user, self.cid, self.text)
            elif self.kind == "edit":
                self.result = store.edit(self.channel, self.user, self.target, self.text)
            elif self.kind == "delete":
                self.result = store.delete(self.channel, self.user, self.target)
            else:
                self.result = store.set_read(self.user, self.channel, self.seq)
        except BaseException as exc:  # checked by the caller: only StoreUnavailable is allowed
            self.error = exc


@dataclass
class Workload:
    writes: list[Write] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def acked(self) -> list[Write]:
        with self.lock:
            return [w for w in self.writes if w.result is not None]


def writer_thread(store: LmdbStore, work: Workload, thread: int, seed: int) -> None:
    """A fixed script per (seed, thread): mostly appends; edits and deletes of the thread's
    own acked, undeleted messages; read cursor moves."""
    rng = random.Random(seed * 100 + thread)
    user = f"u{thread}"
    live: list[tuple[str, str]] = []  # (channel, message id) acked and not deleted
    for n in range(OPS_PER_THREAD):
        roll = rng.random()
        channel = rng.choice(CHANNELS)
        if roll < 0.15 and live:
            channel, target = rng.choice(live)
            w = Write("edit", channel, user, target=target, text=f"{user}.e{n}")
        elif roll < 0.25 and live:
            channel, target = live.pop(rng.randrange(len(live)))
            w = Write("delete", channel, user, target=target)
        elif roll < 0.4:
            w = Write("read", channel, user, seq=rng.randrange(1, 30))
        else:
            cid = f"{user}.c{n}"
            w = Write("append", channel, user, cid=cid, text=f"{cid}|text")
        w.call(store)
        with work.lock:
            work.writes.append(w)
        if w.kind == "append" and isinstance(w.result, AppendResult):
            live.append((channel, w.result.id))
        elif w.kind == "delete" and w.error is not None:
            live.append((channel, w.target))  # not deleted: it may be retried


def run_workload(store: LmdbStore, work: Workload, seed: int) -> None:
    threads = [
        threading.Thread(target=writer_thread, args=(store, work, t, seed), daemon=True)
        for t in range(THREADS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a writer thread hung"


def check_reads(store: LmdbStore, work: Workload) -> None:
    """What a reader must see at any moment: dense logs, working history, and every acked
    append answered as a dup with its seq."""
    for channel in CHANNELS:
        info = store.channel(channel)
        page = store.sync(channel, 0, 1000)
        assert [e["seq"] for e in page.entries] == list(range(1, info.head + 1)), channel
        history = store.history(channel, None, 1000)
        assert [m["seq"] for m in history.messages] == [
            e["seq"] for e in page.entries if e["kind"] == "message"
        ]
    for w in work.acked():
        if w.kind == "append":
            assert isinstance(w.result, AppendResult)
            dup = store.lookup_dup(w.channel, w.user, w.cid)
            assert dup is not None and (dup.seq, dup.id) == (w.result.seq, w.result.id), w


def reads_in_another_thread(
    store: LmdbStore, work: Workload, errors: list[BaseException]
) -> Callable[[], None]:
    """A ``during`` hook: run :func:`check_reads` from a fresh thread and wait for it (the
    writer thread is inside its failing commit meanwhile)."""

    def during() -> None:
        def reader() -> None:
            try:
                check_reads(store, work)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        t.join(READ_TIMEOUT_S)
        if t.is_alive():
            errors.append(TimeoutError("reads hung while a commit was failing"))

    return during


# ---------------------------------------------------------------------- the checker


U64 = struct.Struct(">Q")


def raw_logs(path: Path) -> tuple[dict[str, list[dict[str, Any]]], dict[tuple[str, str], int]]:
    """The log of every channel and every read cursor, read with plain LMDB and msgpack
    from the on-disk format of STORAGE.md: nothing of the store's code is used."""
    env = lmdb.open(str(path), readonly=True, max_dbs=12)
    try:
        channels_db = env.open_db(b"channels", create=False)
        log_db = env.open_db(b"log", create=False)
        cursors_db = env.open_db(b"cursors", create=False)
        with env.begin() as txn:
            names = {
                msgpack.unpackb(v)["id"]: bytes(k).decode() for k, v in txn.cursor(channels_db)
            }
            logs: dict[str, list[dict[str, Any]]] = {name: [] for name in names.values()}
            for k, v in txn.cursor(log_db):
                chan_id, seq = U64.unpack(k[:8])[0], U64.unpack(k[8:])[0]
                entry = msgpack.unpackb(v)
                assert entry["seq"] == seq, (k, entry)
                logs[names[chan_id]].append(entry)
            cursors = {}
            for k, v in txn.cursor(cursors_db):
                user, chan_id = bytes(k[:-9]).decode(), U64.unpack(k[-8:])[0]
                cursors[(user, names[chan_id])] = U64.unpack(v)[0]
    finally:
        env.close()
    return logs, cursors


def check_log(path: Path, acked: list[Write]) -> None:
    """The data directory holds exactly the acked writes, each message in its latest state."""
    logs, cursors = raw_logs(path)
    by_seq: dict[str, dict[int, Write]] = {ch: {} for ch in CHANNELS}
    for w in acked:
        if w.kind != "read":
            assert isinstance(w.result, AppendResult)
            assert w.result.seq not in by_seq[w.channel], f"seq acked twice: {w}"
            by_seq[w.channel][w.result.seq] = w
    for channel in CHANNELS:
        log = logs.get(channel, [])
        assert [e["seq"] for e in log] == sorted(by_seq[channel]), f"{channel}: not the acked"
        assert [e["seq"] for e in log] == list(range(1, len(log) + 1)), f"{channel}: gap"
        state: dict[str, dict[str, Any]] = {}  # message id -> latest text / deleted
        for e in log:
            w = by_seq[channel][e["seq"]]
            assert e["sender"] == w.user
            if w.kind == "append":
                assert isinstance(w.result, AppendResult)
                assert e["kind"] == "message" and e["id"] == w.result.id, (e, w)
                state[e["id"]] = {"text": w.text}
            else:
                assert e["kind"] == w.kind and e["id"] == w.target, (e, w)
                if w.kind == "edit":
                    state[w.target].update(text=w.text, edited=e["ts"])
                else:
                    state[w.target] = {"deleted": True}
        for e in log:
            if e["kind"] == "message":
                body = {k: v for k, v in e.items() if k not in ("seq", "kind", "id", "sender")}
                body.pop("ts")
                assert body == state[e["id"]], f"{channel} {e['id']}: not its latest state"
    expected_cursors: dict[tuple[str, str], int] = {}
    for w in acked:
        if w.kind == "read" and isinstance(w.result, int) and w.result:
            key = (w.user, w.channel)
            expected_cursors[key] = max(expected_cursors.get(key, 0), w.result)
    assert cursors == expected_cursors


# ---------------------------------------------------------------------- store tests


def run_with_fault(path: Path, kind: str, n: int) -> bool:
    """One run with the nth commit failing by ``kind``; True if the fault fired."""
    work = Workload()
    read_errors: list[BaseException] = []
    store = LmdbStore(path, StoreConfig(durability="fsync"))
    try:
        faults = CommitFaults(FAULTS[kind], frozenset({n}), None)
        faults.during = reads_in_another_thread(store, work, read_errors)
        map_size = store._env.info()["map_size"]
        store._fault = faults
        run_workload(store, work, seed=n)
        store._fault = None
        assert not read_errors, f"reads failed during the fault: {read_errors!r}"
        failed = [w for w in work.writes if w.error is not None]
        for w in failed:
            assert isinstance(w.error, StoreUnavailable) and w.result is None, w
        if kind == "map_full":
            # Transparent: nobody saw it, the map doubled, the batch went in on the retry.
            assert not failed, failed
            assert store._env.info()["map_size"] == (2 * map_size if faults.fired else map_size)
        elif faults.fired:
            assert len(failed) == store.batch_sizes[n - 1], "not exactly the failed batch"
        else:
            assert not failed
        check_reads(store, work)
        # The fault is gone: every failed write goes in when retried, at the next seqs;
        # but an edit or delete whose target a later write deleted is now not_found.
        deleted = {w.target for w in work.acked() if w.kind == "delete"}
        for w in failed:
            head = store.channel(w.channel).head
            w.error = None
            w.call(store)
            if w.target in deleted:
                assert isinstance(w.error, NotFound) and w.result is None, w
                continue
            assert w.error is None, w
            if w.kind != "read":
                assert isinstance(w.result, AppendResult)
                assert w.result.seq == head + 1 and not w.result.dup, w
            if w.kind == "delete":
                deleted.add(w.target)
        acked = work.acked()
        assert len(acked) == len(work.writes) - sum(w.error is not None for w in failed)
    finally:
        store.close()
    check_log(path, acked)
    with LmdbStore(path) as store:
        heads = {ch: store.channel(ch).head for ch in CHANNELS}
        for w in acked:
            if w.kind == "append":
                again = store.append(w.channel, w.user, w.cid, w.text)
                assert isinstance(w.result, AppendResult)
                assert again.dup and (again.seq, again.id) == (w.result.seq, w.result.id)
        assert {ch: store.channel(ch).head for ch in CHANNELS} == heads
    return faults.fired > 0


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_failing_the_nth_commit_for_every_n(tmp_path: Path, kind: str) -> None:
    for n in range(1, MAX_N + 1):
        if not run_with_fault(tmp_path / f"n{n}", kind, n):
            break  # the run had fewer than n commits: every position has been failed
    else:
        pytest.fail(f"the fault still fired at commit {MAX_N}: the loop did not cover the runs")
    assert n > 5, "the workload committed too few batches to be a test"


def test_a_lasting_fault_fails_writes_serves_reads_and_clears(tmp_path: Path) -> None:
    """Every commit fails for a while (a full disk): all writes fail fast, reads and dup
    answers keep working, and the writes retried after the disk is freed go in once."""
    work = Workload()
    store = LmdbStore(tmp_path / "data")
    try:
        faults = CommitFaults(enospc)
        store._fault = faults
        first = store.append("ch-a", "u0", "before", "before|text")
        faults.active = True
        failed = [
            Write("append", "ch-a", "u0", cid=f"during{k}", text=f"during{k}|text")
            for k in range(5)
        ]
        failed += [Write("edit", "ch-a", "u0", target=first.id, text="edited")]
        failed += [Write("delete", "ch-a", "u0", target=first.id)]
        failed += [Write("read", "ch-a", "u1", seq=1)]
        for w in failed:
            w.call(store)
            assert isinstance(w.error, StoreUnavailable) and w.result is None, w
        assert faults.fired == len(failed)
        assert store.channel("ch-a").head == 1
        assert store.sync("ch-a", 0, 10).entries[0]["text"] == "before|text"
        assert store.history("ch-a", None, 10).messages[0]["id"] == first.id
        assert store.read_cursor("u1", "ch-a") == 0
        # The server answers a retried cid from lookup_dup, before queueing a write.
        again = store.lookup_dup("ch-a", "u0", "before")
        assert again is not None and again.seq == 1
        faults.active = False
        for k, w in enumerate(failed):
            w.error = None
            w.call(store)
            assert w.error is None, w
            if w.kind == "append":
                assert isinstance(w.result, AppendResult)
                assert w.result.seq == k + 2 and not w.result.dup
        assert store.append("ch-a", "u0", "during0", "x").dup
        work.writes = [Write("append", "ch-a", "u0", cid="before", text="before|text")]
        work.writes[0].result = first
        work.writes += failed
    finally:
        store.close()
    check_log(tmp_path / "data", work.acked())


def test_a_real_map_full_grows_the_map_and_loses_nothing(tmp_path: Path) -> None:
    """Not injected: a map of 256 KiB fills up for real and must grow, several times,
    under concurrent appends, while nothing fails."""
    config = StoreConfig(map_size=256 << 10)
    work = Workload()
    filler = "y" * 2000
    with LmdbStore(tmp_path / "data", config) as store:

        def appender(t: int) -> None:
            for k in range(150):
                w = Write("append", CHANNELS[k % 2], f"u{t}", cid=f"{t}.{k}", text=filler)
                w.call(store)
                with work.lock:
                    work.writes.append(w)

        threads = [threading.Thread(target=appender, args=(t,)) for t in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [w for w in work.writes if w.error is not None] == []
        assert store._env.info()["map_size"] >= 4 * config.map_size
        check_reads(store, work)
    check_log(tmp_path / "data", work.acked())


# ---------------------------------------------------------------------- over TCP


async def test_store_unavailable_over_tcp_keeps_the_connection(harness: Harness) -> None:
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    for client in (alice, bob):
        assert (await client.request("join", channel="room"))["t"] == "ok"
    first = await alice.request("send", channel="room", cid="c1", text="one")
    assert first["t"] == "ok" and first["seq"] == 1

    faults = CommitFaults(enospc)
    harness.server.store._fault = faults
    faults.active = True
    refused = [
        await alice.request("send", channel="room", cid="c2", text="two"),
        await alice.request("edit", channel="room", id=first["id"], text="one, edited"),
        await alice.request("delete", channel="room", id=first["id"]),
        await alice.request("read", channel="room", seq=1),
    ]
    for reply in refused:
        assert reply["t"] == "error" and reply["code"] == "store_unavailable", reply
    assert faults.fired >= len(refused)
    # The connection stays and reads work while the store cannot write.
    assert (await alice.request("ping"))["t"] == "pong"
    page = await alice.request("sync", channel="room", since=0)
    assert [(e["seq"], e["text"]) for e in page["events"]] == [(1, "one")]
    history = await alice.request("history", channel="room")
    assert [m["text"] for m in history["messages"]] == ["one"]
    dup = await alice.request("send", channel="room", cid="c1", text="one")
    assert dup["t"] == "ok" and dup["dup"] and dup["seq"] == 1

    faults.active = False
    retry = await alice.request("send", channel="room", cid="c2", text="two")
    assert retry["t"] == "ok" and retry["seq"] == 2 and not retry["dup"], retry
    again = await alice.request("send", channel="room", cid="c2", text="two")
    assert again["t"] == "ok" and again["seq"] == 2 and again["dup"], again
    edit = await alice.request("edit", channel="room", id=first["id"], text="one, edited")
    assert edit["t"] == "ok" and edit["seq"] == 3, edit
    # Bob saw each stored entry once, and nothing of the refused writes.
    await bob.expect("event", channel="room", seq=3)
    seen = [f["seq"] for f in bob.pending if f.get("t") == "event" and f["channel"] == "room"]
    assert seen == [1, 2], bob.pending
    page = await bob.request("sync", channel="room", since=0)
    got = [(e["seq"], e["kind"], e.get("text")) for e in page["events"]]
    assert got == [(1, "message", "one, edited"), (2, "message", "two"), (3, "edit", "one, edited")]


class FailingSync:
    """Stands in for the store's LMDB environment and fails the next ``failures`` calls of
    ``sync`` with EIO (an fsync that reports a write-back error); everything else is the
    real environment's."""

    def __init__(self, env: Any) -> None:
        self.real = env
        self.failures = 0

    def sync(self, force: bool = False) -> None:
        if self.failures:
            self.failures -= 1
            raise lmdb.DiskError(f"mdb_env_sync: {os.strerror(errno.EIO)}")
        self.real.sync(force)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_a_bug_in_the_store_hand_off_fails_those_writes_only(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server hands a round's writes to the store in one call; if that call fails
    with anything but StoreUnavailable (a bug), the writes are refused with
    store_unavailable, nothing is left in flight, and the server goes on."""
    alice = await harness.connect("alice")
    assert (await alice.request("join", channel="room"))["t"] == "ok"
    # Acknowledged after the join's background membership write, so that one is no
    # longer in flight when the hand-off fails.
    assert (await alice.request("read", channel="room", seq=0))["t"] == "ok"
    store = harness.server.store
    real = store.submit

    def broken(*ops: object) -> None:
        monkeypatch.setattr(store, "submit", real)  # once
        raise RuntimeError("injected hand-off bug")

    monkeypatch.setattr(store, "submit", broken)
    refused = await alice.request("send", channel="room", cid="c1", text="one")
    assert refused["t"] == "error" and refused["code"] == "store_unavailable", refused
    assert "internal error" in refused["message"]
    (conn,) = [c for c in harness.server.connections.values() if c.user == "alice"]
    assert conn.inflight == 0
    ok = await alice.request("send", channel="room", cid="c1", text="one")
    assert ok["t"] == "ok" and ok["seq"] == 1 and not ok["dup"], ok


async def test_a_failed_sync_stops_writes_and_reads_go_on(harness: Harness) -> None:
    """Fail-stop (PROTOCOL.md 8, store_unavailable): a commit whose sync fails is visible
    but not known to be durable, and no transaction can be rolled back after commit. The
    sender is told store_unavailable with an unknown outcome; the store refuses every
    later write until it is reopened; reads, and dup answers for the cid, keep working."""
    alice = await harness.connect("alice")
    bob = await harness.connect("bob")
    for client in (alice, bob):
        assert (await client.request("join", channel="room"))["t"] == "ok"
    # A write acknowledged after the joins: their background membership writes are
    # synced, so the next sync is the one of alice's send.
    assert (await alice.request("read", channel="room", seq=0))["t"] == "ok"
    store = harness.server.store
    env = FailingSync(store._env)
    store._env = env
    try:
        env.failures = 1
        refused = await alice.request("send", channel="room", cid="c1", text="one")
        assert refused["t"] == "error" and refused["code"] == "store_unavailable", refused
        assert "outcome unknown" in refused["message"]
        assert env.failures == 0
        later = await alice.request("send", channel="room", cid="c2", text="two")
        assert later["t"] == "error" and later["code"] == "store_unavailable", later
        assert "writes stopped" in later["message"]
        # Refused at submit (the server's round hand-off), not at commit: nothing of it
        # is left in flight for the connection.
        (conn,) = [c for c in harness.server.connections.values() if c.user == "alice"]
        assert conn.inflight == 0
        # Reads go on, and the retried cid is answered from what the store holds.
        page = await bob.request("sync", channel="room", since=0)
        assert page["t"] == "ok" and [e["text"] for e in page["events"]] == ["one"]
        retry = await alice.request("send", channel="room", cid="c1", text="one")
        assert retry["t"] == "ok" and retry["dup"] is True and retry["seq"] == 1, retry
        assert (await bob.request("history", channel="room"))["t"] == "ok"
    finally:
        store._env = env.real


class BlockedSync(FailingSync):
    """A ``sync`` that waits until ``release`` is set (a slow disk), saying when it began."""

    def __init__(self, env: Any) -> None:
        super().__init__(env)
        self.began, self.release = threading.Event(), threading.Event()

    def sync(self, force: bool = False) -> None:
        self.began.set()
        self.release.wait()
        self.real.sync(force)


def test_a_retry_is_answered_from_memory_only_once_its_commit_is_durable(tmp_path: Path) -> None:
    """With ``fsync`` a commit is acknowledged after the next sync (STORAGE.md,
    Durability). Until then a retry of one of its cids must not be answered from the
    in-memory map (``cached_dup``, the event loop's answer: an ``ok`` with ``dup``), which
    would acknowledge a write a power loss can still take; the batch before it, made
    durable by its commit, is."""
    store = LmdbStore(tmp_path / "data", StoreConfig(durability="fsync", max_batch=1))
    env = BlockedSync(store._env)
    try:
        assert store.append("room", "alice", "c0", "zero").seq == 1
        store._env = env
        first = WriteOp("message", "room", "alice", cid="c1", text="one")
        second = WriteOp("message", "room", "alice", cid="c2", text="two")
        first.done, second.done = threading.Event(), threading.Event()
        store.submit(first, second)  # two batches of one: the second commits, then syncs
        assert env.began.wait(10), "no sync after the second commit"
        assert first.done.is_set() and not second.done.is_set()
        known = store.cached_dup("room", "alice", "c1")
        assert known is not None and known.seq == 2 and known.dup
        assert store.cached_dup("room", "alice", "c2") is None  # committed, not durable
        env.release.set()
        assert second.done.wait(10)
        again = store.cached_dup("room", "alice", "c2")
        assert again is not None and again.seq == 3 and again.dup
    finally:
        env.release.set()
        store._env = env.real
        store.close()


def test_a_cid_pruned_before_its_batch_is_acknowledged_is_forgotten(tmp_path: Path) -> None:
    """STORAGE.md, Dedup: the in-memory map forgets what a commit pruned, so a running
    store and a reopened one answer a retry alike. With ``fsync`` a batch's cids join the
    map only at its ack, after the next commit, and that commit may already have pruned
    them from the journal (here by ``dedup_retention_ms``: each commit is 5 s after the
    one before). They must not join the map then: a retry of a pruned cid is a new
    message, and the map stays in the journal's order (it went on forgetting nothing)."""
    now = [1_000_000]

    def five_seconds_later() -> None:  # called before each commit
        now[0] += 5000

    config = StoreConfig(durability="fsync", max_batch=1, dedup_retention_ms=1000)
    store = LmdbStore(tmp_path / "data", config, clock=lambda: now[0], fault=five_seconds_later)
    try:
        ops = [WriteOp("message", "room", "u", cid=f"c{i}", text=str(i)) for i in (1, 2, 3)]
        done = [threading.Event() for _ in ops]
        for op, event in zip(ops, done, strict=True):
            op.done = event
        store.submit(*ops)  # three batches of one: c2's commit prunes c1, c3's prunes c2
        assert all(event.wait(10) for event in done)
        assert [getattr(op.result, "seq", None) for op in ops] == [1, 2, 3]
        assert store.lookup_dup("room", "u", "c1") is None
        assert store.lookup_dup("room", "u", "c2") is None
        assert store.lookup_dup("room", "u", "c3") is not None
        again = store.append("room", "u", "c1", "again")  # its commit prunes c3
        assert (again.seq, again.dup) == (4, False)
        assert store.lookup_dup("room", "u", "c3") is None
    finally:
        store.close()
    store = LmdbStore(tmp_path / "data", config, clock=lambda: now[0])
    try:
        assert store.lookup_dup("room", "u", "c2") is None
        found = store.lookup_dup("room", "u", "c1")
        assert found is not None and found.seq == 4
    finally:
        store.close()


def test_a_cid_its_own_commit_prunes_is_stored_again_as_after_a_restart(tmp_path: Path) -> None:
    """The same with the size bound: a batch of three new cids with ``dedup_max`` 2
    prunes its own oldest from the journal, before it is acknowledged. A retry of it in
    the next batch is a new message, as in a reopened store, and the first batch's ack
    must not then put the pruned seq in the map over the retry's."""
    config = StoreConfig(durability="fsync", max_batch=3, dedup_max=2)
    store = LmdbStore(tmp_path / "data", config)
    try:
        ops = [WriteOp("message", "room", "u", cid=c, text=c) for c in ("c1", "c2", "c3", "c1")]
        done = [threading.Event() for _ in ops]
        for op, event in zip(ops, done, strict=True):
            op.done = event
        store.submit(*ops)  # two batches: c1, c2, c3 (pruning c1), then c1 again
        assert all(event.wait(10) for event in done)
        retry = ops[3].result
        assert isinstance(retry, AppendResult) and (retry.seq, retry.dup) == (4, False)
        found = store.lookup_dup("room", "u", "c1")
        assert found is not None and found.seq == 4
    finally:
        store.close()
    store = LmdbStore(tmp_path / "data", config)
    try:
        found = store.lookup_dup("room", "u", "c1")
        assert found is not None and found.seq == 4
    finally:
        store.close()


@pytest.mark.parametrize("job", ["compact", "reset_channel"])
def test_no_job_commits_after_a_failed_sync(tmp_path: Path, job: str) -> None:
    """STORAGE.md, Writes: after a failed sync the store stops (PostgreSQL's answer to
    "fsyncgate"): every later write is refused until an operator restarts it. A
    compaction pass or a reset, which run in the writer thread as jobs, are writes too:
    one that committed on would build on pages the kernel may have dropped."""
    store = LmdbStore(tmp_path / "data", StoreConfig(durability="fsync"))
    env = FailingSync(store._env)
    try:
        first = store.append("room", "alice", "c1", "one")
        store._env = env
        env.failures = 1
        with pytest.raises(StoreUnavailable, match="outcome unknown"):
            store.append("room", "alice", "c2", "two")
        before = store.channel("room")
        with pytest.raises(StoreUnavailable, match="writes stopped"):
            getattr(store, job)("room")
        assert store.channel("room") == before
        assert store.lookup_dup("room", "alice", "c1") == first._replace(dup=True)
    finally:
        store._env = env.real
        store.close()


class FailingCommit(FailingSync):
    """An environment whose write transactions numbered in ``fail_at`` (1-based, from the
    wrapping on) fail in LMDB's commit with ``error`` (nothing of them is stored), as when
    the page writes or, with ``fsync``, the fdatasync inside a commit fail."""

    def __init__(self, env: Any, fail_at: set[int], error: Exception) -> None:
        super().__init__(env)
        self.fail_at, self.error, self.begun = fail_at, error, 0

    def begin(self, write: bool = False, **kw: Any) -> Any:
        txn = self.real.begin(write=write, **kw)
        if write:
            self.begun += 1
        if not (write and self.begun in self.fail_at):
            return txn
        error = self.error

        class Txn:
            def commit(self) -> None:
                txn.abort()
                raise error

            def __getattr__(self, name: str) -> Any:
                return getattr(txn, name)

        return Txn()


@pytest.mark.parametrize("error", ["eio", "enospc"])
def test_an_io_error_in_an_fsync_commit_stops_the_store(tmp_path: Path, error: str) -> None:
    """With ``fsync`` a batch is made durable by the sync in the next commit (MDB_NOMETASYNC).
    When that commit fails with an I/O error, which may be its sync's, the batch before is
    not known to be durable, and a sync succeeding after it proves nothing (the kernel
    reports a write-back error once): that batch gets an unknown outcome and the store
    stops, as after a failed sync. Disk full (ENOSPC, reported when pages are written)
    stays an ordinary failed commit: the batch before is synced and acknowledged."""
    errors = {
        "eio": lmdb.Error(f"mdb_txn_commit: {os.strerror(errno.EIO)}"),
        "enospc": lmdb.DiskError(f"mdb_txn_commit: {os.strerror(errno.ENOSPC)}"),
    }
    store = LmdbStore(tmp_path / "data", StoreConfig(durability="fsync", max_batch=1))
    try:
        assert store.append("room", "alice", "c0", "zero").seq == 1
        store._env = FailingCommit(store._env, {2}, errors[error])
        first = WriteOp("message", "room", "alice", cid="c1", text="one")
        second = WriteOp("message", "room", "alice", cid="c2", text="two")
        first.done, second.done = threading.Event(), threading.Event()
        store.submit(first, second)  # two batches of one: the second's commit fails
        assert first.done.wait(10) and second.done.wait(10)
        assert isinstance(second.error, StoreUnavailable), second
        assert "store commit failed" in second.error.message
        if error == "enospc":
            assert first.error is None and store.failed is None
            assert store.append("room", "alice", "c3", "three").seq == 3
            return
        assert isinstance(first.error, StoreUnavailable), first
        assert "outcome unknown" in first.error.message
        assert store.failed is not None and "perhaps in its sync" in store.failed
        with pytest.raises(StoreUnavailable, match="writes stopped"):
            store.append("room", "alice", "c3", "three")
        retry = store.cached_dup("room", "alice", "c1")  # what is there is answered
        assert retry is not None and retry.seq == 2
    finally:
        store._env = getattr(store._env, "real", store._env)
        store.close()


def test_writes_go_on_while_the_periodic_sync_of_async_mode_runs(tmp_path: Path) -> None:
    """``async`` durability syncs in a thread of its own: a sync that takes long (here,
    one held until released) does not hold up commits and acks."""
    store = LmdbStore(tmp_path / "data", StoreConfig(durability="async", sync_interval_s=0.05))
    env = BlockedSync(store._env)
    try:
        store._env = env
        assert env.began.wait(10), "no periodic sync"
        op = store.write(WriteOp("message", "room", "alice", cid="c1", text="one"), timeout=10)
        assert op.result is not None and op.result.seq == 1  # committed meanwhile
        assert not env.release.is_set()
    finally:
        env.release.set()
        store._env = env.real
        store.close()


def test_a_failed_periodic_sync_in_async_mode_stops_writes(tmp_path: Path) -> None:
    """``async`` durability acks before the periodic sync; when that sync fails, what
    was acked may not be on disk: the store stops taking writes (fail-stop, as with
    fsync) instead of losing its writer thread, and reads go on."""
    store = LmdbStore(tmp_path / "data", StoreConfig(durability="async", sync_interval_s=0.05))
    try:
        assert store.append("room", "alice", "c1", "one").seq == 1
        env = FailingSync(store._env)
        env.failures = 1
        store._env = env
        deadline = time.monotonic() + 10
        while store.failed is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.failed is not None and "sync failed" in store.failed
        assert env.failures == 0
        with pytest.raises(StoreUnavailable, match="writes stopped"):
            store.append("room", "alice", "c2", "two")
        assert [e["text"] for e in store.sync("room", 0, 10).entries] == ["one"]
        store._env = env.real
    finally:
        store.close()
