"""The store against a plain in-memory model (a hypothesis rule-based state machine), on
every engine (LMDB, one Redis, a Redis Cluster: the ``store_engine`` fixture).

The model keeps, per channel, the log exactly as the store is specified to keep it: a
message entry rewritten to its current state on edit and delete (a tombstone keeps
neither text nor meta), edit entries redacted when their message is deleted, compaction
by the configured policy (Kafka's rule, tombstone retention, count and age retention) and
the horizon below which a sync is told to resync. Reads are compared exactly; after every
step the heads, the horizons, the whole log above the horizon (which must be dense), the
history, the read cursors and the unread counts must agree.

Message ids and epochs are the one place where engines differ on purpose: the model (and
LMDB) number channels 1, 2, 3..., Redis gives each channel log a random epoch. The machine
learns which store epoch is which model id and compares through that mapping.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from conftest import StoreEngine
from tsmsg.store import (
    AppendResult,
    CompactionPolicy,
    Forbidden,
    HistoryPage,
    NotFound,
    StoreConfig,
    StoreError,
    SyncPage,
    WriteOp,
    lmdb_store,
    redis_store,
)
from tsmsg.store.lmdb_store import id_prefix
from tsmsg.store.memory_store import MemoryData

CHANNELS = ["a", "b", "c"]  # messages go to a and b only: c stays an unknown channel
MESSAGE_CHANNELS = CHANNELS[:2]
USERS = ["u1", "u2", "u3"]
KEEP_RECENT = 3
TOMBSTONE_RETENTION_MS = 1000
MAX_COUNT = 10
MAX_AGE_MS = 4000
POLICY = CompactionPolicy(
    keep_recent=KEEP_RECENT,
    tombstone_retention_ms=TOMBSTONE_RETENTION_MS,
    max_count=MAX_COUNT,
    max_age_ms=MAX_AGE_MS,
)
WAIT_S = 10.0
JUNK_IDS = ["", "x", "1-", "-1", "0-0", "1-0", "999-1", "1-999", "a-b"]
MAX_EXAMPLES = {"lmdb": 100, "redis": 40, "redis-cluster": 25}  # a round trip per call

texts = st.text(max_size=6)
metas = st.none() | st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=2)


class Model(MemoryData):
    """The store's rules in plain dicts: :class:`MemoryData`, the state of the in-memory
    backend (so this test also holds MemoryStore to LmdbStore's answers), with this
    test's policy and a clock that the ``tick`` rule moves."""

    def __init__(self) -> None:
        super().__init__(POLICY, now=1_700_000_000_000)


class Clock:
    def __init__(self, model: Model) -> None:
        self.model = model

    def __call__(self) -> int:
        return self.model.now


def outcome(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The value or the error class (NotFound / Forbidden) of a call."""
    try:
        return fn(*args, **kwargs)
    except (NotFound, Forbidden) as exc:
        return type(exc)


def describe(result: Any) -> str:
    if isinstance(result, AppendResult):
        return "dup" if result.dup else "ok"
    if isinstance(result, int):
        return "cursor"
    return str(result.__name__)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self, engine: StoreEngine) -> None:
        super().__init__()
        self.engine = engine
        self.dir = tempfile.mkdtemp(prefix="tsmsg-model-")
        self.place = engine.place(Path(self.dir))
        self.model = Model()
        self.clock = Clock(self.model)
        self.config = StoreConfig(compaction=POLICY)
        self.store: Any = None
        self.cids: list[str] = []
        self.ids: list[str] = []
        self.counter = 0
        self.read_changed = False
        self.saved_chunk = (lmdb_store.COMPACT_CHUNK, redis_store.COMPACT_CHUNK)
        # The store's epochs and message id prefixes are its own (random on Redis): each is
        # paired with the model's at first sight, and must stay a one-to-one pairing.
        self.model_epoch: dict[int, int] = {0: 0}  # store epoch -> model epoch
        self.model_prefix: dict[str, str] = {}  # store id prefix -> model id prefix
        self.store_prefix: dict[str, str] = {}  # and back

    @initialize(
        durability=st.sampled_from(["fsync", "async"]),
        max_batch=st.sampled_from([1, 3, 1024]),
        chunk=st.sampled_from([1, 2, 4096]),
    )
    def open(self, durability: str, max_batch: int, chunk: int) -> None:
        """Vary what must not change any answer: durability mode, batch bound and the
        size of compaction steps."""
        lmdb_store.COMPACT_CHUNK = redis_store.COMPACT_CHUNK = chunk
        self.config = StoreConfig(durability=durability, max_batch=max_batch, compaction=POLICY)
        self.store = self.engine.open(self.place, self.config, clock=self.clock)

    @property
    def s(self) -> Any:
        assert self.store is not None
        return self.store

    def teardown(self) -> None:
        lmdb_store.COMPACT_CHUNK, redis_store.COMPACT_CHUNK = self.saved_chunk
        if self.store is not None:
            self.s.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- store epochs and ids <-> the model's

    def learn(self) -> None:
        """Pair each channel's store epoch with the model's (after a write)."""
        for name, c in self.model.channels.items():
            epoch = self.s.channel(name).epoch
            if epoch:
                assert self.model_epoch.setdefault(epoch, c.epoch) == c.epoch, name

    def pair(self, got: Any, expected: Any) -> None:
        """Pair the id prefixes of a store's and the model's result of one append."""
        if isinstance(got, AppendResult) and isinstance(expected, AppendResult):
            mine, theirs = got.id.partition("-")[0], expected.id.partition("-")[0]
            assert self.model_prefix.setdefault(mine, theirs) == theirs, (got, expected)
            assert self.store_prefix.setdefault(theirs, mine) == mine, (got, expected)

    def model_id(self, mid: str, table: dict[str, str] | None = None) -> str:
        """A message id with its channel part mapped (unknown ones stay as they are)."""
        head, dash, tail = mid.partition("-")
        table = self.model_prefix if table is None else table
        if dash and head in table:
            return f"{table[head]}-{tail}"
        return mid

    def as_model(self, value: Any) -> Any:
        """A store answer as the model gives it: epochs and message ids mapped."""
        if isinstance(value, AppendResult):
            return value._replace(id=self.model_id(value.id))
        if isinstance(value, SyncPage):
            entries = [self.as_model(e) for e in value.entries]
            epoch = self.model_epoch.get(value.epoch, -1)
            return dataclasses.replace(value, entries=entries, epoch=epoch)
        if isinstance(value, HistoryPage):
            return dataclasses.replace(value, messages=[self.as_model(e) for e in value.messages])
        if isinstance(value, dict) and "id" in value:
            return {**value, "id": self.model_id(value["id"])}
        return value

    def to_store(self, op: WriteOp) -> WriteOp:
        if op.target is not None:
            op.target = self.model_id(op.target, self.store_prefix)
        return op

    # ---- drawing ops

    def draw_message(self, data: st.DataObject) -> WriteOp:
        self.counter += 1
        fresh = f"k{self.counter}"
        cid = data.draw(st.sampled_from([fresh, *self.cids[-8:]]) if self.cids else st.just(fresh))
        if cid == fresh:
            self.cids.append(cid)
        return WriteOp(
            "message",
            data.draw(st.sampled_from(MESSAGE_CHANNELS)),
            data.draw(st.sampled_from(USERS)),
            cid=cid,
            text=data.draw(texts),
            meta=data.draw(metas),
        )

    def draw_target(self, data: st.DataObject, channel: str) -> str:
        choices = [st.sampled_from(JUNK_IDS)]
        if self.ids:
            choices.append(st.sampled_from(self.ids))
            choices.append(st.sampled_from(self.ids[-4:]))  # recent ones are likelier live
        c = self.model.channels.get(channel)
        if c is not None:  # any seq of the channel: edit entries, compacted, past the head
            prefix = id_prefix(c.id, c.salt)
            choices.append(st.integers(1, c.head + 1).map(lambda s: f"{prefix}-{s}"))
        return data.draw(st.one_of(*choices))

    def draw_change(self, data: st.DataObject, kind: str) -> WriteOp:
        channel = data.draw(st.sampled_from(CHANNELS))
        return WriteOp(
            kind,
            channel,
            data.draw(st.sampled_from(USERS)),
            text=data.draw(texts) if kind == "edit" else None,
            target=self.draw_target(data, channel),
            moderator=data.draw(st.booleans()),
        )

    def draw_read(self, data: st.DataObject) -> WriteOp:
        channel = data.draw(st.sampled_from(CHANNELS))
        c = self.model.channels.get(channel)
        top = c.head + 2 if c else 2
        seq = data.draw(st.integers(-1, top))
        return WriteOp("read", channel, data.draw(st.sampled_from(USERS)), seq=seq)

    def expect(self, op: WriteOp) -> Any:
        m = self.model
        if op.kind == "message":
            assert op.cid is not None and op.text is not None
            return m.append(op.channel, op.user, op.cid, op.text, op.meta)
        if op.kind == "read":
            old = m.cursors.get((op.user, op.channel), 0)
            cursor = m.set_read(op.user, op.channel, op.seq)
            self.read_changed = cursor != old
            return cursor
        assert op.target is not None
        return outcome(m.change, op.kind, op.channel, op.user, op.target, op.text, op.moderator)

    def note_result(self, op: WriteOp, result: Any) -> None:
        if op.kind == "message" and isinstance(result, AppendResult) and not result.dup:
            self.ids.append(result.id)

    # ---- writes

    def run_one(self, op: WriteOp) -> None:
        expected = self.expect(op)
        s = self.s
        self.to_store(op)
        if op.kind == "message":
            assert op.cid is not None and op.text is not None
            got = s.append(op.channel, op.user, op.cid, op.text, op.meta)
        elif op.kind == "read":
            got = s.set_read(op.user, op.channel, op.seq)
        elif op.kind == "edit":
            assert op.target is not None and op.text is not None
            got = outcome(s.edit, op.channel, op.user, op.target, op.text, moderator=op.moderator)
        else:
            assert op.target is not None
            got = outcome(s.delete, op.channel, op.user, op.target, moderator=op.moderator)
        self.learn()
        self.pair(got, expected)
        got = self.as_model(got)
        assert got == expected, (op, got, expected)
        self.note_result(op, got)
        event(f"{op.kind}: {describe(got)}")

    @rule(data=st.data(), n=st.integers(1, 3))
    def append(self, data: st.DataObject, n: int) -> None:
        for _ in range(n):
            self.run_one(self.draw_message(data))

    @rule(data=st.data())
    def edit(self, data: st.DataObject) -> None:
        self.run_one(self.draw_change(data, "edit"))

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        self.run_one(self.draw_change(data, "delete"))

    @rule(data=st.data())
    def set_read(self, data: st.DataObject) -> None:
        self.run_one(self.draw_read(data))

    @rule(data=st.data(), n=st.integers(2, 5))
    def burst(self, data: st.DataObject, n: int) -> None:
        """Several writes queued without waiting: group-committed in some batching, which
        must not change any result (the clock stands still meanwhile)."""
        drawers = [
            self.draw_message,
            self.draw_message,
            lambda d: self.draw_change(d, "edit"),
            lambda d: self.draw_change(d, "delete"),
            self.draw_read,
        ]
        ops = [data.draw(st.sampled_from(drawers))(data) for _ in range(n)]
        expected = []
        changed = []
        for op in ops:
            self.read_changed = False
            expected.append(self.expect(op))
            changed.append(self.read_changed)
        for i, op in enumerate(ops):
            if op.target is not None and op.target.partition("-")[0] not in self.store_prefix:
                # A target in an epoch whose store prefix no result has shown yet (a reset
                # channel whose first append is earlier in this burst): learn it first.
                for prev, exp in zip(ops[:i], expected, strict=False):
                    assert prev.done is not None and prev.done.wait(WAIT_S)
                    self.pair(prev.result, exp)
            op.done = threading.Event()
            self.s.submit(self.to_store(op))
        for op in ops:
            assert op.done is not None and op.done.wait(WAIT_S)
        self.learn()
        for op, exp, moved in zip(ops, expected, changed, strict=True):
            assert op.changed == moved, op
            self.pair(op.result, exp)
            got = type(op.error) if op.error is not None else self.as_model(op.result)
            assert not isinstance(op.error, StoreError) or got in (NotFound, Forbidden)
            assert got == exp, (op, got, exp)
            self.note_result(op, got)
            event(f"burst {op.kind}: {describe(got)}")

    @rule(ms=st.integers(0, 2500))
    def tick(self, ms: int) -> None:
        self.model.now += ms

    @rule(channel=st.sampled_from(CHANNELS))
    def compact(self, channel: str) -> None:
        c = self.model.channels.get(channel)
        before = len(c.log) if c else 0
        assert self.s.compact(channel) == self.model.compact(channel)
        if c is not None and len(c.log) < before:
            event("compact: dropped entries")
        if c is not None and any(e["ts"] < self.model.now - MAX_AGE_MS for e in c.log.values()):
            event("compact: entries past max_age kept (newest keep_recent)")

    @rule()
    def restart(self) -> None:
        self.s.close()
        self.store = self.engine.open(self.place, self.config, clock=self.clock)

    @rule(channel=st.sampled_from(CHANNELS))
    def reset_channel(self, channel: str) -> None:
        got = self.s.reset_channel(channel)
        expected = self.model.reset(channel)
        self.learn()
        assert self.model_epoch.get(got, -1) == expected

    # ---- reads

    @rule(data=st.data(), channel=st.sampled_from(CHANNELS), limit=st.integers(0, 6))
    def sync(self, data: st.DataObject, channel: str, limit: int) -> None:
        c = self.model.channels.get(channel)
        head = c.head if c else 0
        since = data.draw(st.integers(-1, head + 2))
        got = self.as_model(self.s.sync(channel, since, limit))
        assert got == self.model.sync(channel, since, limit)

    @rule(data=st.data(), channel=st.sampled_from(CHANNELS), limit=st.integers(0, 5))
    def history(self, data: st.DataObject, channel: str, limit: int) -> None:
        c = self.model.channels.get(channel)
        head = c.head if c else 0
        before = data.draw(st.none() | st.integers(-1, head + 2))
        got = self.as_model(self.s.history(channel, before, limit))
        assert got == self.model.history(channel, before, limit)

    @rule(data=st.data())
    def lookup_dup(self, data: st.DataObject) -> None:
        keys = sorted(self.model.dedup)
        if keys:
            key = data.draw(st.sampled_from(keys))
        else:
            key = ("a", "u1", "nothing")
        assert self.as_model(self.s.lookup_dup(*key)) == self.model.lookup_dup(*key)

    @rule(user=st.sampled_from(USERS), channel=st.sampled_from(CHANNELS))
    def unread(self, user: str, channel: str) -> None:
        assert self.s.unread(user, channel) == self.model.unread(user, channel)

    # ---- invariants

    @invariant()
    def channels_agree(self) -> None:
        assert self.s.channels() == sorted(self.model.channels)
        for name in CHANNELS:
            info = self.s.channel(name)
            c = self.model.channels.get(name)
            expected = (0, 0, 0) if c is None else (c.head, c.horizon, c.epoch)
            epoch = self.model_epoch.get(info.epoch, -1)
            assert (info.head, info.horizon, epoch) == expected, name

    @invariant()
    def log_dense_above_horizon_and_equal(self) -> None:
        for name, c in self.model.channels.items():
            page = self.s.sync(name, c.horizon, 10**6)
            assert not page.resync and not page.more
            assert [e["seq"] for e in page.entries] == list(range(c.horizon + 1, c.head + 1))
            got = self.as_model(page).entries
            assert got == [c.log[s] for s in sorted(c.log) if s > c.horizon]
            history = self.as_model(self.s.history(name, None, 10**6))
            assert history == self.model.history(name, None, 10**6)

    @invariant()
    def cursors_agree(self) -> None:
        for name in CHANNELS:
            for user in USERS:
                assert self.s.read_cursor(user, name) == self.model.cursors.get((user, name), 0)
                assert self.s.unread(user, name) == self.model.unread(user, name)


def test_store_model(store_engine: StoreEngine) -> None:
    run_state_machine_as_test(
        lambda: StoreMachine(store_engine),
        settings=settings(
            max_examples=MAX_EXAMPLES[store_engine.name], stateful_step_count=50, deadline=None
        ),
    )
