"""An in-memory :class:`~tsmsg.store.base.Store`: the second backend.

It keeps what :class:`~tsmsg.store.lmdb_store.LmdbStore` keeps (per channel a dense log,
head, horizon and epoch; read cursors; the dedup index; members; last_seen) in plain
dicts, with the same answers: ``tests/test_store_model.py`` checks LmdbStore against
:class:`MemoryData`, the model this store is built on. Nothing is durable and nothing
runs in a thread:

- :class:`MemoryData` is the state (and the reference model of the on-disk format's
  rules: edits and deletes rewrite the message entry, compaction by Kafka's rule and
  retention). It survives a :class:`MemoryStore`: open a new store on the same data to
  simulate a server restart.
- :class:`MemoryStore` queues writes and commits them in batches, one clock reading per
  batch (as LMDB does), then calls ``notify`` with the batch in the caller's thread. With
  ``autocommit`` (the default) ``submit`` commits at once, so the blocking helpers
  (``append``, ``set_read``...) work; without it the owner decides when a batch commits
  (:meth:`MemoryStore.commit`), which is how the deterministic simulation
  (``tests/sim.py``) schedules store latency, batching and failed commits.

Differences from LMDB, on purpose: the dedup index is never pruned (no ``dedup_max`` or
retention), compaction runs at once instead of in steps, and the store is meant for one
thread (the trio thread of a server, or a test).
"""

from __future__ import annotations

import bisect
import collections
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tsmsg._native import packb
from tsmsg.protocol.limits import MAX_CID_CHARS
from tsmsg.store.base import (
    MAX_CHANNEL_BYTES,
    MAX_USER_BYTES,
    AppendResult,
    ChannelInfo,
    Entry,
    Forbidden,
    HistoryPage,
    NotFound,
    Notify,
    Store,
    StoreError,
    StoreUnavailable,
    SyncPage,
    WriteOp,
    notify_batch,
)
from tsmsg.store.lmdb_store import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_EDITS,
    CompactionPolicy,
    _check_name,
    check_edits,
    id_prefix,
    message_id,
    new_channel_record,
    now_ms,
    parse_message_id,
)


@dataclass
class MemChannel:
    id: int  # the internal id: a reset gives the channel a new one
    epoch: int  # derived from the store id, as LmdbStore's: a reset is a new epoch
    salt: int  # the message id prefix, derived likewise
    log: dict[int, Entry] = field(default_factory=dict)  # seq -> stored entry, seq order
    head: int = 0
    horizon: int = 0
    tombstones: dict[int, int] = field(default_factory=dict)  # message seq -> delete ts
    edits: dict[int, list[int]] = field(default_factory=dict)  # message seq -> edit seqs
    messages: list[int] = field(default_factory=list)  # the message seqs, ascending


class MemoryData:
    """The stored state and the rules that change it. Writes use ``now`` as their ts
    (the store sets it once per batch); reads return copies of the stored entries."""

    def __init__(
        self,
        policy: CompactionPolicy | None = None,
        now: int = 0,
        *,
        store_id: str | None = None,
        max_edits: int = DEFAULT_MAX_EDITS,
    ) -> None:
        self.policy = policy or CompactionPolicy()
        self.now = now
        # Epochs and id salts derive from it (random; given in the simulation and tests)
        self.store_id = store_id or secrets.token_hex(16)
        self.max_edits = max_edits
        self.channels: dict[str, MemChannel] = {}
        self.next_id = 1
        self.dedup: dict[tuple[str, str, str], tuple[int, str, int]] = {}
        self.cursors: dict[tuple[str, str], int] = {}
        self.members: set[tuple[str, str]] = set()  # (user, channel)
        self.seen: dict[str, int] = {}  # user -> last_seen ms

    # ---- writes: return an AppendResult / int, or raise NotFound / Forbidden

    def apply(self, op: WriteOp) -> AppendResult | int:
        """One write of a batch (``op.changed`` is set for a read cursor that moved)."""
        _check_name("user", op.user, MAX_USER_BYTES)
        if op.kind == "seen":
            self.seen[op.user] = self.now
            return self.now
        _check_name("channel", op.channel, MAX_CHANNEL_BYTES)
        if op.kind == "member":
            key = (op.user, op.channel)
            count = sum(1 for u, _ in self.members if u == op.user)
            if key not in self.members and not (op.most and count >= op.most):
                self.members.add(key)
                op.changed = True
            return 0
        if op.kind == "unmember":
            self.members.discard((op.user, op.channel))
            return 0
        if op.kind == "read":
            old = self.cursors.get((op.user, op.channel), 0)
            cursor = self.set_read(op.user, op.channel, op.seq)
            op.changed = cursor != old
            return cursor
        if op.kind == "message":
            if op.cid is None or not 1 <= len(op.cid) <= MAX_CID_CHARS or op.text is None:
                raise ValueError(f"a message needs text and a cid of 1 to {MAX_CID_CHARS} chars")
            return self.append(op.channel, op.user, op.cid, op.text, op.meta)
        if op.kind == "edit" and op.text is None:
            raise ValueError("an edit needs text")
        return self.change(op.kind, op.channel, op.user, op.target or "", op.text, op.moderator)

    def append(
        self, channel: str, user: str, cid: str, text: str, meta: dict[str, Any] | None
    ) -> AppendResult:
        key = (channel, user, cid)
        if key in self.dedup:
            return self.dup_result(key)
        c = self.channels.get(channel)
        if c is None:
            c = self.channels[channel] = self._new_channel()
        c.head += 1
        mid = message_id(id_prefix(c.id, c.salt), c.head)
        entry: Entry = {"seq": c.head, "kind": "message", "id": mid, "sender": user}
        entry.update(ts=self.now, text=text)
        if meta:
            entry["meta"] = meta
        c.log[c.head] = entry
        c.messages.append(c.head)
        self.dedup[key] = (c.head, mid, self.now)
        return AppendResult(channel, c.head, mid, self.now)

    def change(
        self,
        kind: str,
        channel: str,
        user: str,
        target: str,
        text: str | None,
        moderator: bool,
    ) -> AppendResult:
        """An edit or a delete: a new entry naming its target, and the target's message
        entry rewritten to its current state (a delete redacts its text and meta, and
        the text of its earlier edits)."""
        c = self.channels.get(channel)
        parsed = parse_message_id(target)
        if c is None or parsed is None or parsed[0] != id_prefix(c.id, c.salt):
            raise NotFound(f"no message {target!r} in channel {channel!r}")
        mseq = parsed[1]
        msg = c.log.get(mseq)
        if msg is None or msg["kind"] != "message" or msg.get("deleted"):
            raise NotFound(f"no message {target!r} in channel {channel!r}")
        if msg["sender"] != user and not moderator:
            raise Forbidden(f"only the sender or a moderator may change message {target!r}")
        if kind == "edit":
            check_edits(target, len(c.edits.get(mseq, ())), self.max_edits)
        c.head += 1
        entry: Entry = {"seq": c.head, "kind": kind, "id": target, "sender": user, "ts": self.now}
        if kind == "edit":
            entry["text"] = text
            msg["text"], msg["edited"] = text, self.now
            c.edits.setdefault(mseq, []).append(c.head)
        else:
            for k in ("text", "meta", "edited"):
                msg.pop(k, None)
            msg["deleted"] = True
            for eseq in c.edits.pop(mseq, []):
                if eseq in c.log:
                    c.log[eseq].pop("text", None)
                    c.log[eseq]["deleted"] = True
            c.tombstones[mseq] = self.now
        c.log[c.head] = entry
        return AppendResult(channel, c.head, target, self.now)

    def set_read(self, user: str, channel: str, seq: int) -> int:
        c = self.channels.get(channel)
        if c is None:
            return 0
        old = self.cursors.get((user, channel), 0)
        new = min(max(seq, 0), c.head)
        if new <= old:
            return old
        self.cursors[(user, channel)] = new
        return new

    def compact(self, channel: str) -> int:
        """Retention first (count and age drop the oldest entries, whatever their kind,
        and may move the point into the recent window), then Kafka's rule at or below
        the point: edit and delete entries go, tombstones go when their retention is
        over."""
        c = self.channels.get(channel)
        if c is None:
            return 0
        p = self.policy
        drop_below = max(0, c.head - p.max_count) if p.max_count is not None else 0
        point = max(0, c.head - p.keep_recent, drop_below)
        cutoff = self.now - p.max_age_ms if p.max_age_ms is not None else 0
        for seq in list(c.log):
            if seq > drop_below and c.log[seq]["ts"] >= cutoff:
                break
            self._drop(c, seq)
            point = max(point, seq)
        for seq in list(c.log):
            if seq > point:
                break
            e = c.log[seq]
            if e["kind"] != "message":
                self._drop(c, seq)
            elif e.get("deleted") and c.tombstones[seq] + p.tombstone_retention_ms <= self.now:
                self._drop(c, seq)
        c.horizon = max(c.horizon, min(point, c.head))
        return c.horizon

    @staticmethod
    def _drop(c: MemChannel, seq: int) -> None:
        if c.log.pop(seq)["kind"] == "message":
            del c.messages[bisect.bisect_left(c.messages, seq)]
        c.tombstones.pop(seq, None)
        c.edits.pop(seq, None)

    def _new_channel(self) -> MemChannel:
        """A new log: the next internal id, its epoch and id salt (as LmdbStore's)."""
        rec = new_channel_record(self.store_id, self.next_id)
        self.next_id += 1
        return MemChannel(rec["id"], rec["epoch"], rec["salt"])

    def reset(self, channel: str) -> int:
        """A new log under a new id (the epoch); positions and cids of the old one are
        gone with it."""
        if channel not in self.channels:
            return 0
        self.channels[channel] = self._new_channel()
        for key in [k for k in self.dedup if k[0] == channel]:
            del self.dedup[key]
        for ckey in [k for k in self.cursors if k[1] == channel]:
            del self.cursors[ckey]
        return self.channels[channel].epoch

    # ---- reads

    def sync(
        self,
        channel: str,
        since: int,
        limit: int,
        max_bytes: int | None = None,
        entry_overhead: int = 0,
    ) -> SyncPage:
        c = self.channels.get(channel)
        if c is None:
            return SyncPage([], False, 0, 0, resync=since != 0)
        if since < c.horizon or since > c.head:
            return SyncPage([], False, c.head, c.epoch, resync=True)
        entries: list[Entry] = []
        size = 0
        for seq in range(since + 1, c.head + 1):
            e = c.log.get(seq)
            if e is None:
                continue
            if len(entries) >= limit:
                break
            size += len(packb(e)) + entry_overhead
            if max_bytes is not None and entries and size > max_bytes:
                break
            entries.append(dict(e))
        last = entries[-1]["seq"] if entries else since
        return SyncPage(entries, last < c.head, c.head, c.epoch)

    def history(
        self, channel: str, before: int | None, limit: int, max_bytes: int | None = None
    ) -> HistoryPage:
        c = self.channels.get(channel)
        if c is None:
            return HistoryPage([], False)
        top = c.head if before is None else min(before - 1, c.head)
        out: list[Entry] = []
        more = False
        size = 0
        for i in range(bisect.bisect_right(c.messages, top) - 1, -1, -1):
            e = c.log[c.messages[i]]
            size += len(packb(e))
            if len(out) >= limit or (max_bytes is not None and out and size > max_bytes):
                more = True
                break
            out.append(dict(e))
        out.reverse()
        return HistoryPage(out, more)

    def unread(self, user: str, channel: str, scan_max: int | None = None) -> int:
        c = self.channels.get(channel)
        if c is None:
            return 0
        cursor = self.cursors.get((user, channel), 0)
        count = 0
        scanned = 0
        for seq, e in c.log.items():
            if seq <= cursor:
                continue
            if scanned == scan_max:
                break
            scanned += 1
            if e["kind"] == "message" and not e.get("deleted") and e["sender"] != user:
                count += 1
        return count

    def lookup_dup(self, channel: str, user: str, cid: str) -> AppendResult | None:
        key = (channel, user, cid)
        return self.dup_result(key) if key in self.dedup else None

    def dup_result(self, key: tuple[str, str, str]) -> AppendResult:
        """The first result of a cid; its ts is read from the message entry, so it is 0
        once retention dropped the message (as LmdbStore answers)."""
        seq, mid, ts = self.dedup[key]
        if seq not in self.channels[key[0]].log:
            ts = 0
        return AppendResult(key[0], seq, mid, ts, dup=True)


class MemoryStore(Store):
    """The :class:`Store` interface over a :class:`MemoryData` (see the module doc)."""

    def __init__(
        self,
        data: MemoryData | None = None,
        *,
        notify: Notify | None = None,
        clock: Callable[[], int] = now_ms,
        autocommit: bool = True,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.data = data if data is not None else MemoryData()
        self._notify = notify
        self._clock = clock
        self.autocommit = autocommit
        self.max_batch = max_batch
        self.pending: collections.deque[WriteOp] = collections.deque()
        self.closed = False

    # ---- writes

    def submit(self, *ops: WriteOp) -> None:
        if self.closed:
            raise StoreUnavailable("store is closed")
        self.pending.extend(ops)
        if self.autocommit:
            while self.pending:
                self.commit()

    def commit(self, most: int | None = None, *, fail: str | None = None) -> list[WriteOp]:
        """Commit the oldest pending writes (at most ``most`` and ``max_batch``) as one
        batch and notify it. With ``fail`` the commit fails instead, as a full disk's
        does: every write of the batch gets ``store_unavailable``, nothing is stored."""
        n = min(len(self.pending), self.max_batch, most if most is not None else len(self.pending))
        batch = [self.pending.popleft() for _ in range(n)]
        if not batch:
            return batch
        self.data.now = self._clock()
        for op in batch:
            op.result, op.error, op.changed = None, None, False
            if fail is not None:
                op.error = StoreUnavailable(f"store commit failed: {fail}")
                continue
            try:
                op.result = result = self.data.apply(op)
                if isinstance(result, AppendResult) and not result.dup:
                    op.epoch = self.data.channels[op.channel].epoch
            except StoreError as exc:
                op.error = exc
            except (ValueError, TypeError) as exc:  # a malformed op fails alone
                op.error = StoreError(f"invalid write: {exc}")
        notify_batch(batch, self._notify)  # as LmdbStore's writer
        return batch

    def crash(self) -> list[WriteOp]:
        """Power loss: the writes not yet committed are gone, never notified; the store
        is closed. Returns them."""
        lost = list(self.pending)
        self.pending.clear()
        self.closed = True
        return lost

    def close(self) -> None:
        """Commit what is pending (as LmdbStore's writer drains its queue), then refuse
        writes. The data stays for the next store opened on it."""
        if self.closed:
            return
        while self.pending:
            self.commit()
        self.closed = True

    # ---- reads

    def lookup_dup(self, channel: str, sender: str, cid: str) -> AppendResult | None:
        return self.data.lookup_dup(channel, sender, cid)

    def cached_dup(self, channel: str, sender: str, cid: str) -> AppendResult | None:
        return self.lookup_dup(channel, sender, cid)

    def channel(self, name: str) -> ChannelInfo:
        c = self.data.channels.get(name)
        if c is None:
            return ChannelInfo(name, 0, 0, 0)
        return ChannelInfo(name, c.head, c.horizon, c.epoch)

    def sync(
        self,
        channel: str,
        since: int,
        limit: int,
        max_bytes: int | None = None,
        entry_overhead: int = 0,
    ) -> SyncPage:
        return self.data.sync(channel, since, limit, max_bytes, entry_overhead)

    def history(
        self, channel: str, before: int | None, limit: int, max_bytes: int | None = None
    ) -> HistoryPage:
        return self.data.history(channel, before, limit, max_bytes)

    def read_cursor(self, user: str, channel: str) -> int:
        return self.data.cursors.get((user, channel), 0)

    def is_member(self, user: str, channel: str) -> bool:
        return (user, channel) in self.data.members

    def channels_of(self, user: str, limit: int | None = None) -> list[str]:
        return sorted(ch for u, ch in self.data.members if u == user)[:limit]

    def last_seen(self, user: str) -> int | None:
        return self.data.seen.get(user)

    def unread(self, user: str, channel: str, scan_max: int | None = None) -> int:
        return self.data.unread(user, channel, scan_max)

    def channels(self) -> list[str]:
        return sorted(self.data.channels)

    # ---- maintenance

    def compact(self, channel: str) -> int:
        self.data.now = self._clock()
        return self.data.compact(channel)

    def reset_channel(self, channel: str) -> int:
        return self.data.reset(channel)
