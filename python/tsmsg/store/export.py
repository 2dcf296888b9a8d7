"""Engine-neutral exports of a store (``tsmsg backup --export``, ``tsmsg restore``).

An export holds everything a store keeps, so that a store loaded from it answers clients
exactly as the source did (STORAGE.md, "Exports"): per channel its epoch, message id
prefix, head, horizon, every log entry present, the tombstones' delete times, the read
cursors and the dedup index; per user the memberships and last_seen.

File layout: ``EXPORT_MAGIC``, then records, each a big-endian u32 length and a msgpack
map with a ``t`` field: one ``header``, one ``channel`` per channel (all of its data: a
restore holds one channel in memory at a time), one ``users`` record per
``USERS_PER_RECORD`` users, and last an ``end`` record with the counts and the SHA-256
of every byte before it. A file is written under a temporary name and renamed when
complete; :func:`verify_export` reads it whole before anything is loaded, so a cut-short
or altered file is refused before the target is touched.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Protocol

from tsmsg._native import packb, unpackb
from tsmsg.store.base import Entry

EXPORT_MAGIC = b"TSMSG-EXPORT\n"
EXPORT_VERSION = 1
LENGTH = struct.Struct(">I")
MAX_RECORD_BYTES = (1 << 32) - 1  # a record's length field; one channel's data must fit
USERS_PER_RECORD = 4096  # users packed in one ``users`` record
PARTIAL_SUFFIX = ".partial"  # an export being written; renamed when complete
# An export holds every message's text in plaintext (also of an encrypted data directory)
# and every membership: private to its owner, like the data directory and the key file.
EXPORT_FILE_MODE = 0o600

DedupRow = tuple[str, str, int, int]  # sender, cid, seq, ts (when first stored)


class ExportError(Exception):
    """An export file that cannot be used (one line for the operator)."""


@dataclass(frozen=True, slots=True)
class ChannelDump:
    name: str
    epoch: int
    prefix: str  # message ids are f"{prefix}-{seq}"
    head: int
    horizon: int
    entries: list[Entry]  # every log entry present, in seq order, text in plaintext
    tombstones: dict[int, int]  # seq of a deleted message still in the log -> delete ts
    cursors: dict[str, int]  # user -> read cursor
    dedup: list[DedupRow]  # remembered cids, oldest first


@dataclass(frozen=True, slots=True)
class UserDump:
    user: str
    channels: list[str]  # the channels the user is a member of, sorted
    last_seen: int | None


@dataclass(frozen=True, slots=True)
class ExportSummary:
    source: str  # the engine it was taken from: "lmdb" or "redis"
    created: int  # ms
    channels: int
    users: int
    entries: int
    # The key ids the source stored text encrypted with (its text is plaintext here):
    # empty for a plaintext source (and an export from before this field).
    encryption: tuple[str, ...] = ()


class Exporter(Protocol):
    """A store (or LMDB reader) that can be exported: ``export`` yields every channel,
    then every user, from the state the engine promises (STORAGE.md, "Exports")."""

    def export(self) -> Iterator[ChannelDump | UserDump]: ...


class Restorer(Protocol):
    """A store an export can be loaded into. ``restore_begin`` refuses a target that
    holds data and marks the load as under way; ``restore_end`` marks it complete."""

    def restore_begin(self) -> None: ...

    def restore_channel(self, dump: ChannelDump, new_epoch: bool) -> ChannelDump: ...

    def restore_users(self, users: list[UserDump]) -> None: ...

    def restore_end(self) -> None: ...


# ------------------------------------------------------------------ entries


def entry_target(entry: Entry) -> int:
    """The seq of the message an entry is about (a message: itself)."""
    return int(str(entry["id"]).rpartition("-")[2])


def with_prefix(dump: ChannelDump, epoch: int, prefix: str) -> ChannelDump:
    """The channel as a new log: another epoch, and every message id (in entries) under
    ``prefix``, so no id of the old log names anything in the new one."""
    entries = [{**e, "id": f"{prefix}-{entry_target(e)}"} for e in dump.entries]
    return replace(dump, epoch=epoch, prefix=prefix, entries=entries)


def edit_chains(dump: ChannelDump) -> dict[int, list[int]]:
    """Message seq -> the seqs of its edits still in the log, oldest first, for every
    live (not deleted) message still in the log: what both engines index."""
    live = {e["seq"] for e in dump.entries if e["kind"] == "message" and not e.get("deleted")}
    chains: dict[int, list[int]] = {}
    for e in dump.entries:
        if e["kind"] == "edit" and entry_target(e) in live:
            chains.setdefault(entry_target(e), []).append(e["seq"])
    return chains


# ------------------------------------------------------------------ writing


def _channel_record(d: ChannelDump) -> dict[str, Any]:
    return {
        "t": "channel", "name": d.name, "epoch": d.epoch, "prefix": d.prefix,
        "head": d.head, "horizon": d.horizon, "entries": d.entries,
        "tombstones": sorted(d.tombstones.items()), "cursors": d.cursors,
        "dedup": [list(row) for row in d.dedup],
    }  # fmt: skip


class ExportWriter:
    """Writes ``path`` + ``PARTIAL_SUFFIX``; :meth:`finish` seals, syncs and renames it."""

    def __init__(
        self, path: str, source: str, created: int, encryption: Sequence[str] = ()
    ) -> None:
        if os.path.lexists(path):
            raise ExportError(f"export target {path} exists")
        self.path = path
        self._partial = path + PARTIAL_SUFFIX
        fd = os.open(self._partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, EXPORT_FILE_MODE)
        self._file: BinaryIO = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self._counts = {"channels": 0, "users": 0, "entries": 0}
        self._users: list[UserDump] = []
        self._write_raw(EXPORT_MAGIC)
        header = {"t": "header", "version": EXPORT_VERSION, "source": source, "ts": created}
        if encryption:  # the source encrypted its text: a restore says if it no longer is
            header["encryption"] = list(encryption)
        self._record(header)

    def _write_raw(self, data: bytes) -> None:
        self._hash.update(data)
        self._file.write(data)

    def _record(self, record: dict[str, Any]) -> None:
        body = packb(record)
        if len(body) > MAX_RECORD_BYTES:
            raise ExportError(f"a record of {len(body)} bytes is too large for an export")
        self._write_raw(LENGTH.pack(len(body)) + body)

    def channel(self, dump: ChannelDump) -> None:
        self._record(_channel_record(dump))
        self._counts["channels"] += 1
        self._counts["entries"] += len(dump.entries)

    def user(self, user: UserDump) -> None:
        self._users.append(user)
        self._counts["users"] += 1
        if len(self._users) >= USERS_PER_RECORD:
            self._flush_users()

    def _flush_users(self) -> None:
        if self._users:
            rows = [[u.user, u.channels, u.last_seen] for u in self._users]
            self._record({"t": "users", "users": rows})
            self._users = []

    def finish(self) -> dict[str, int]:
        self._flush_users()
        end = {"t": "end", **self._counts, "sha256": self._hash.hexdigest()}
        body = packb(end)
        self._file.write(LENGTH.pack(len(body)) + body)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.rename(self._partial, self.path)
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return dict(self._counts)

    def abort(self) -> None:
        self._file.close()
        os.unlink(self._partial)


def write_export(
    path: str, source: str, created: int, store: Exporter, encryption: Sequence[str] = ()
) -> dict[str, int]:
    """Export ``store`` to ``path`` (which must not exist); the counts written. Nothing is
    left at ``path`` (nor its partial file) if it fails. ``encryption``: the key ids the
    source's text is encrypted with (recorded in the header)."""
    writer = ExportWriter(path, source, created, encryption)
    try:
        for item in store.export():
            if isinstance(item, ChannelDump):
                writer.channel(item)
            else:
                writer.user(item)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


# ------------------------------------------------------------------ reading


def _records(path: str, fh: BinaryIO) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Each record and its raw bytes (length prefix included)."""
    while True:
        head = fh.read(LENGTH.size)
        if not head:
            return
        if len(head) < LENGTH.size:
            raise ExportError(f"{path} is cut short (a record's length is incomplete)")
        (size,) = LENGTH.unpack(head)
        body = fh.read(size)
        if len(body) < size:
            raise ExportError(f"{path} is cut short (a record of {size} bytes is incomplete)")
        try:
            record = unpackb(body)
        except Exception as exc:
            raise ExportError(f"{path} holds a corrupt record: {exc}") from None
        if not isinstance(record, dict) or not isinstance(record.get("t"), str):
            raise ExportError(f"{path} holds a record that is no export record")
        yield record, head + body


def _channel_of(r: dict[str, Any]) -> ChannelDump:
    dump = ChannelDump(
        name=r["name"], epoch=r["epoch"], prefix=r["prefix"], head=r["head"],
        horizon=r["horizon"], entries=r["entries"],
        tombstones={int(s): int(ts) for s, ts in r["tombstones"]},
        cursors={str(u): int(c) for u, c in r["cursors"].items()},
        dedup=[(str(s), str(c), int(q), int(ts)) for s, c, q, ts in r["dedup"]],
    )  # fmt: skip
    ints = (dump.epoch, dump.head, dump.horizon)
    if not (isinstance(dump.name, str) and isinstance(dump.prefix, str)) or not all(
        type(x) is int and x >= 0 for x in ints
    ):
        raise ValueError("bad channel fields")
    last = 0
    for e in dump.entries:
        if not (
            isinstance(e, dict)
            and type(e.get("seq")) is int
            and last < e["seq"] <= dump.head
            and e.get("kind") in ("message", "edit", "delete")
            and isinstance(e.get("id"), str)
            and isinstance(e.get("sender"), str)
            and type(e.get("ts")) is int
        ):
            raise ValueError(f"bad entry after seq {last}")
        entry_target(e)
        last = e["seq"]
    return dump


def _users_of(r: dict[str, Any]) -> list[UserDump]:
    users = [UserDump(str(u), [str(c) for c in chs], seen) for u, chs, seen in r["users"]]
    if not all(u.last_seen is None or type(u.last_seen) is int for u in users):
        raise ValueError("bad last_seen")
    return users


def _items(path: str, fh: BinaryIO) -> Iterator[tuple[str, Any, bytes]]:
    """(kind, parsed record, raw bytes) for each record, checked for its shape."""
    if fh.read(len(EXPORT_MAGIC)) != EXPORT_MAGIC:
        raise ExportError(f"{path} is not a tsmsg export")
    for record, raw in _records(path, fh):
        t = record["t"]
        try:
            parsed: Any = (
                _channel_of(record)
                if t == "channel"
                else _users_of(record)
                if t == "users"
                else record
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{path} holds a malformed {t} record: {exc!r}") from None
        yield t, parsed, raw


def verify_export(path: str) -> ExportSummary:
    """Read the whole file and check it (magic, version, every record's shape, counts
    and checksum); nothing is loaded. ExportError names what is wrong."""
    counts = {"channels": 0, "users": 0, "entries": 0}
    digest = hashlib.sha256(EXPORT_MAGIC)
    header: dict[str, Any] | None = None
    names: set[str] = set()  # one channel is one record: a second one is refused here
    with open(path, "rb") as fh:
        for t, parsed, raw in _items(path, fh):
            if t == "end":
                if fh.read(1):
                    raise ExportError(f"{path} has data after its end record")
                want = {k: parsed.get(k) for k in counts}
                if parsed.get("sha256") != digest.hexdigest() or want != counts:
                    raise ExportError(f"{path} is corrupt (its checksum or counts do not match)")
                if header is None:
                    raise ExportError(f"{path} has no header")
                kids = header.get("encryption")
                return ExportSummary(
                    header["source"], header["ts"], counts["channels"], counts["users"],
                    counts["entries"],
                    tuple(map(str, kids)) if isinstance(kids, list) else (),
                )  # fmt: skip
            digest.update(raw)
            if t == "header":
                if parsed.get("version") != EXPORT_VERSION:
                    raise ExportError(
                        f"{path} is export version {parsed.get('version')!r}; this tsmsg "
                        f"reads version {EXPORT_VERSION}"
                    )
                header = parsed
            elif t == "channel":
                if parsed.name in names:
                    raise ExportError(f"{path} holds channel {parsed.name!r} twice")
                names.add(parsed.name)
                counts["channels"] += 1
                counts["entries"] += len(parsed.entries)
            elif t == "users":
                counts["users"] += len(parsed)
            else:
                raise ExportError(f"{path} holds an unknown record {t!r}")
    raise ExportError(f"{path} is cut short (no end record)")


def read_export(path: str) -> Iterator[ChannelDump | list[UserDump]]:
    """The channels and user batches of a file :func:`verify_export` accepted."""
    with open(path, "rb") as fh:
        for t, parsed, _ in _items(path, fh):
            if t in ("channel", "users"):
                yield parsed


def restore(
    path: str,
    target: Restorer,
    *,
    new_epochs: bool = False,
    progress: Callable[[ChannelDump], None] | None = None,
) -> ExportSummary:
    """Verify the export at ``path``, then load it into ``target``, which refuses to
    start unless it is empty and marks itself complete only at the end."""
    summary = verify_export(path)
    target.restore_begin()
    for item in read_export(path):
        if isinstance(item, ChannelDump):
            loaded = target.restore_channel(item, new_epochs)
            if progress is not None:
                progress(loaded)
        else:
            target.restore_users(item)
    target.restore_end()
    return summary
