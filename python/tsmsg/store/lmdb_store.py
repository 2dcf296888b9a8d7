"""The LMDB backend of :class:`~tsmsg.store.base.Store` (py-lmdb).

One environment, named databases, one writer thread with group commit. The on-disk
format is specified in STORAGE.md; ``FORMAT_VERSION`` below must change with it.

Why one writer thread: LMDB allows one write transaction at a time, and an fsync per
commit costs far more than the puts in it. The writer takes every write that is pending
when it becomes free (up to ``max_batch``) and commits them in one transaction, so the
batch grows with the load and a lone write is committed at once: no timer ever delays a
commit.
"""

from __future__ import annotations

import collections
import fcntl
import hashlib
import heapq
import logging
import os
import queue
import re
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import lmdb

from tsmsg._native import AppendBatch, DedupRing, dedup_key, packb, unpackb
from tsmsg.protocol.limits import MAX_CID_CHARS
from tsmsg.store.base import (
    MAX_CHANNEL_BYTES,
    MAX_USER_BYTES,
    AppendResult,
    BackgroundCompaction,
    ChannelInfo,
    Entry,
    Forbidden,
    FormatError,
    HistoryPage,
    LimitExceeded,
    NotFound,
    Notify,
    Store,
    StoreError,
    StoreObserver,
    StoreUnavailable,
    SyncPage,
    WriteOp,
    notify_batch,
    oldest_wait,
    queue_writes,
    take_batch,
)
from tsmsg.store.crypto import ENCRYPTED_FIELDS, EncryptionError, Keyring, entry_kid, open_entry
from tsmsg.store.export import ChannelDump, UserDump, edit_chains, with_prefix

log = logging.getLogger("tsmsg.store")

FORMAT_VERSION = 2
# Format 1 (no message index, edit lists, counter epochs) is migrated on open (STORAGE.md).
MIGRATED_FORMATS = (1,)
U64 = struct.Struct(">Q")
LATEST_EDIT = struct.Struct(">QQ")  # edit_links row of a message: latest edit seq, edit count
SEQ_MAX = 2**64 - 1
EPOCH_BITS = 63  # epochs are positive and fit the wire's int64 (0 means "no log yet")
SALT_BITS = 64  # a channel's random message id prefix: ids cannot be guessed across channels

# Files tsmsg keeps beside LMDB's data.mdb and lock.mdb in a data directory.
LOCK_FILE = "LOCK"  # flock()ed by the one process that writes; holds its pid
STORE_FILE = "STORE_ID"  # written when the store is created: its random id (STORAGE.md)
LMDB_MAGIC = 0xBEEFC0DE  # LMDB's meta page magic (mdb.c MDB_MAGIC)
# A new store's first commits need room; a full filesystem would otherwise surface as a
# SIGBUS when LMDB touches a page it could not write.
NEW_STORE_MIN_FREE = 16 << 20
DEFAULT_MAX_EDITS = 1000  # edits per message: deleting it rewrites each one still in the log
MIGRATE_CHUNK = 65536  # rows per transaction while migrating format 1, to bound dirty pages

# Sizing defaults; each is a field of StoreConfig so an operator can change it.
DEFAULT_MAP_SIZE = 64 << 20  # the map grows by doubling when full; start small
DEFAULT_MAX_BATCH = 1024  # writes per transaction: bounds the time one commit holds the lock
# Text bytes per transaction: one batch is fanned out at once, so this keeps a batch's
# events well under a connection's outbound bound (max_queue_bytes, 4 MiB by default).
DEFAULT_MAX_BATCH_BYTES = 1 << 20
# cids remembered for dedup, oldest dropped first. All of them are answered from memory
# (about 150 bytes each, so 40 MB at the default) and journaled in LMDB for restarts.
DEFAULT_DEDUP_MAX = 250_000
MAX_DEDUP_KEY = 8 + MAX_USER_BYTES + 1 + 4 * MAX_CID_CHARS  # channel id, sender, NUL, cid
DEFAULT_DEDUP_RETENTION_MS = 7 * 24 * 3600 * 1000  # a client retries within days, not weeks
DEFAULT_SYNC_INTERVAL_S = 1.0  # `async` durability: at most this much is lost on power loss
DEDUP_PRUNE_PER_BATCH = 256  # bounds the pruning work a single commit does
COMPACT_CHUNK = 4096  # entries per compaction transaction, so appends interleave
ENTRY_KINDS = frozenset(("message", "edit", "delete"))
# A new data directory and its files are the owner's only: they hold every message.
DATA_DIR_MODE = 0o700
DATA_FILE_MODE = 0o600


def check_format(path: str, raw: bytes | None, has_data: bool) -> int | None:
    """The format version of a data directory (None: a fresh one): this one or one that
    :class:`LmdbStore` migrates on open; FormatError if this tsmsg cannot read it."""
    if raw is None:
        if has_data:
            raise FormatError(f"data directory {path!r} has channel data but no format version")
        return None
    text = bytes(raw).decode(errors="replace")
    version = int(text) if text.isascii() and text.isdigit() else None
    if version != FORMAT_VERSION and version not in MIGRATED_FORMATS:
        raise FormatError(
            f"data directory {path!r} has on-disk format version {text}, this tsmsg reads "
            f"version {FORMAT_VERSION} (and migrates {', '.join(map(str, MIGRATED_FORMATS))}); "
            "see STORAGE.md for upgrading"
        )
    return version


class DataDirError(FormatError):
    """The data directory cannot be used as it is: another process holds it, or its data
    file is missing, empty or cut short. The message is one line naming the file."""


def check_data_file(path: str) -> int:
    """Check ``data.mdb`` against LMDB's own expectations before it is mapped (a page
    past the end of the file is a SIGBUS, not an error): both meta pages present with
    LMDB's magic, and the file long enough for the last page the newer one uses.
    Returns the file's size (0: no file or an empty one, which LMDB would initialize)."""
    data = os.path.join(path, "data.mdb")
    try:
        size = os.path.getsize(data)
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(data, "rb") as f:
        head = f.read(META_PROBE)
    if len(head) < META_OFFSETS["txnid"] + 8:
        raise DataDirError(f"{data} is {size} bytes, too short for an LMDB meta page")
    page_size = int.from_bytes(head[META_OFFSETS["psize"] :][:4], "little")
    if page_size < 512 or page_size & (page_size - 1) or size < 2 * page_size:
        raise DataDirError(
            f"{data} is {size} bytes, shorter than LMDB's two meta pages "
            f"(page size {page_size}): the file was cut short"
        )
    with open(data, "rb") as f:
        pages = f.read(2 * page_size)
    metas = []
    for n in (0, 1):
        base = n * page_size

        def field(name: str, width: int, base: int = base) -> int:
            start = base + META_OFFSETS[name]
            return int.from_bytes(pages[start : start + width], "little")

        if field("magic", 4) != LMDB_MAGIC:
            raise DataDirError(f"{data}: meta page {n} has no LMDB magic: not an LMDB file")
        metas.append((field("txnid", 8), field("last_pg", 8)))
    last_pg = max(metas)[1]  # the newer meta page is the one LMDB opens
    need = (last_pg + 1) * page_size
    if need > size:
        raise DataDirError(
            f"{data} is {size} bytes but its LMDB meta page says it holds {need} "
            f"({last_pg + 1} pages of {page_size}): the file was cut short; restore it from "
            "a backup"
        )
    return size


# Offsets in an LMDB meta page on a 64-bit build (mdb.c: a 16-byte page header, then
# MDB_meta: magic, version, address, mapsize, two MDB_db of 48 bytes, last_pg, txnid).
# The page size is stored in the free-space MDB_db's md_pad.
META_OFFSETS = {"magic": 16, "psize": 40, "last_pg": 136, "txnid": 144}
META_PROBE = 4096  # enough for page 0's meta fields whatever the page size


def lock_data_dir(path: str) -> int:
    """Take the data directory's exclusive lock (``flock`` on ``LOCK``, which then holds
    this pid) and return its descriptor; the lock dies with the process, so a kill never
    leaves a stale one. DataDirError, naming the holder's pid, if another process has it."""
    lock_path = os.path.join(path, LOCK_FILE)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, DATA_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DataDirError(
            f"data directory {path!r} is in use by another tsmsg process (pid {holder}, "
            f"lock {lock_path}): one process per data directory"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:  # a full disk: the lock holds without the pid in it
        pass
    return fd


def read_store_id(path: str) -> str | None:
    """The store id in the directory's ``STORE_ID`` file, if it has one."""
    try:
        with open(os.path.join(path, STORE_FILE), encoding="ascii") as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def write_store_id(path: str, store_id: str) -> None:
    """Write ``STORE_ID`` durably (a new file renamed into place, both synced)."""
    target = os.path.join(path, STORE_FILE)
    tmp = target + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, DATA_FILE_MODE)
    try:
        os.write(fd, f"{store_id}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def check_new_store_room(path: str) -> None:
    """Refuse to create a store on a filesystem without room for its first commits."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if free < NEW_STORE_MIN_FREE:
        raise DataDirError(
            f"cannot create a store in {path!r}: {free} bytes free on its filesystem, a new "
            f"store needs at least {NEW_STORE_MIN_FREE}"
        )


def derive_bits(store_id: str, what: bytes, chan_id: int, bits: int) -> int:
    """``bits`` bits of a keyed hash of (``what``, internal channel id) under the store's
    random id: unpredictable without it, stable for the store's lifetime (restarts,
    compaction, backups) and different in every new store."""
    digest = hashlib.blake2b(
        what + U64.pack(chan_id), key=store_id.encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big") >> (64 - bits)


def new_channel_record(store_id: str, chan_id: int) -> dict[str, int]:
    """A new log's record: its internal id, its epoch and its message id salt, both
    derived from the random store id. Epochs are never 0 and never a counter, so a
    reset, or a store that lost its data and started anew, shows as a new epoch to every
    client that holds the old one."""
    return {
        "id": chan_id, "head": 0, "horizon": 0,
        "epoch": derive_bits(store_id, b"epoch", chan_id, EPOCH_BITS) or 1,
        "salt": derive_bits(store_id, b"salt", chan_id, SALT_BITS),
    }  # fmt: skip


def check_edits(target: str, count: int, most: int) -> None:
    """Refuse an edit past the per-message bound (``StoreConfig.max_edits``)."""
    if count >= most:
        raise LimitExceeded(
            f"message {target!r} was edited {count} times, the most a message may be "
            f"(max_edits_per_message {most})"
        )


class SharedLock:
    """Held by any number of readers at once, or by one exclusive holder (who waits for
    the readers to leave and keeps new ones out). threading has no such lock."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True  # new readers wait from now on
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class CompactionPolicy:
    """Kafka's log-compaction rule, per channel. Entries in the newest ``keep_recent``
    seqs are never compacted (clients that are only briefly behind replay them raw);
    retention (``max_age_ms``, ``max_count``) may still drop them."""

    keep_recent: int = 1000
    tombstone_retention_ms: int = 24 * 3600 * 1000  # a deleted message's tombstone lives this long
    max_age_ms: int | None = None  # retention by age: older messages are dropped
    max_count: int | None = None  # retention by count: only the newest N seqs are kept
    interval_s: float | None = None  # background compaction period; None: only on request


@dataclass(frozen=True, slots=True)
class StoreConfig:
    durability: str = "fsync"  # "fsync": an ack means on disk; "async": see STORAGE.md
    map_size: int = DEFAULT_MAP_SIZE
    max_batch: int = DEFAULT_MAX_BATCH
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    dedup_max: int = DEFAULT_DEDUP_MAX
    dedup_retention_ms: int = DEFAULT_DEDUP_RETENTION_MS
    sync_interval_s: float = DEFAULT_SYNC_INTERVAL_S
    compaction: CompactionPolicy = CompactionPolicy()
    max_edits: int = DEFAULT_MAX_EDITS  # edits per message; one more is limit_exceeded
    # Encryption at rest of message text (STORAGE.md); None: new entries in plaintext.
    encryption: Keyring | None = None


def id_prefix(chan_id: int, salt: int | None) -> str:
    """The message id prefix of a channel's log: its random salt in hex, so ids say
    nothing about other channels. A log created by format 1 has no salt and keeps its
    internal id as the prefix, so ids that clients hold stay valid."""
    return str(chan_id) if salt is None else f"{salt:016x}"


def record_prefix(rec: Mapping[str, Any]) -> str:
    """A record's message id prefix: its own ``prefix`` when it was restored from an
    export with its ids kept (STORAGE.md, "Exports"), else derived from id and salt."""
    prefix = rec.get("prefix")
    return prefix if isinstance(prefix, str) else id_prefix(rec["id"], rec.get("salt"))


def message_id(prefix: str, seq: int) -> str:
    return f"{prefix}-{seq}"


_MESSAGE_ID = re.compile(r"([0-9a-f]{16}|[1-9][0-9]{0,19})-([1-9][0-9]{0,19})", re.ASCII)


def parse_message_id(mid: str) -> tuple[str, int] | None:
    """The (id prefix, seq) of a canonical message id, or None for anything else."""
    m = _MESSAGE_ID.fullmatch(mid)
    if m is None:
        return None
    seq = int(m[2])
    return (m[1], seq) if seq <= SEQ_MAX else None


def _check_name(what: str, value: str, max_bytes: int) -> bytes:
    raw = value.encode()
    if not raw or len(raw) > max_bytes or b"\0" in raw:
        raise ValueError(f"{what} must be 1 to {max_bytes} bytes of UTF-8 without NUL: {value!r}")
    return raw


class _Job:
    """Work other than appends that must run in the writer thread (compaction, reset)."""

    def __init__(self, fn: Callable[[], bool]) -> None:
        self.fn = fn  # returns True when finished; False re-queues it after pending writes
        self.done = threading.Event()
        self.error: BaseException | None = None


class _Stop:
    pass


class _CommitIOError(Exception):
    """LMDB's commit itself failed (not disk full): with ``fsync`` the commit's sync may be
    what failed, which makes the batch committed before it as unknown as a failed sync."""


@dataclass(slots=True)
class _Batch:
    """One batch's transaction and what its ops have done so far (writer thread only)."""

    txn: lmdb.Transaction
    ts: int  # every entry of the batch has this time
    log: lmdb.Cursor  # the log's cursor: entries are written through it
    index: lmdb.Cursor  # the message index's
    records: dict[str, dict[str, int]] = field(default_factory=dict)  # channels touched
    heads: dict[str, int] = field(default_factory=dict)  # their heads before this batch


class LmdbStore(Store):
    def __init__(
        self,
        path: str | os.PathLike[str],
        config: StoreConfig | None = None,
        notify: Notify | None = None,
        clock: Callable[[], int] = now_ms,
        fault: Callable[[], None] | None = None,
        observer: StoreObserver | None = None,
    ) -> None:
        config = config or StoreConfig()
        if config.durability not in ("fsync", "async"):
            raise ValueError(f"durability must be 'fsync' or 'async', not {config.durability!r}")
        self.config = config
        self._notify = notify
        self._clock = clock
        self._fault = fault  # test hook: called before each commit, may raise lmdb errors
        self._observer = observer  # commit and sync timings, from the writer (and sync) thread
        self._keyring = config.encryption
        path = self.path = os.fspath(path)
        # Private: the files hold every message (and --dev's secret sits beside them).
        os.makedirs(path, mode=DATA_DIR_MODE, exist_ok=True)
        # Every opener that writes takes the directory's lock first, before looking at
        # any file: a second server (or `tsmsg compact` beside one) is refused here.
        self._lock_fd: int | None = lock_data_dir(path)
        try:
            self._open_env(path)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._ring = DedupRing(config.dedup_max, MAX_DEDUP_KEY)
        # channel name -> internal id, filled by the writer after each commit (only the
        # writer changes ids, so no reader can put a stale one back).
        self._chan_ids: dict[str, int] = {}
        with self._env.begin() as txn:
            for name, raw in txn.cursor(db=self._channels):
                self._chan_ids[bytes(name).decode()] = unpackb(raw)["id"]
        self._next_order = self._load_dedup()
        self._unsynced_cids: dict[bytes, int] = {}  # committed, not yet acknowledged
        self.failed: str | None = None  # set when a sync failed: no more writes
        # When each write not yet acknowledged was submitted, oldest first (writes are
        # acknowledged in submission order): the writer's lag, for readiness checks.
        self._waiting: collections.deque[float] = collections.deque()
        # Writes arrive as the tuples given to one submit() call.
        self._queue: queue.SimpleQueue[tuple[WriteOp, ...] | _Job | _Stop] = queue.SimpleQueue()
        self._closed = False
        self.batch_sizes: list[int] = []  # the first 100,000 batch sizes, for benchmarks
        self._writer = threading.Thread(
            target=self._run_writer, name="tsmsg-store-writer", daemon=True
        )
        self._writer.start()
        self._compaction = BackgroundCompaction(self, config.compaction.interval_s)
        self._syncer: threading.Thread | None = None
        self._stop_syncer = threading.Event()
        if config.durability == "async":
            self._syncer = threading.Thread(
                target=self._run_syncer, name="tsmsg-store-sync", daemon=True
            )
            self._syncer.start()

    def __str__(self) -> str:
        return self.path

    # ---------------------------------------------------------------- format

    def _open_env(self, path: str) -> None:
        """Open the LMDB environment of a locked data directory, after checking that its
        data file is whole (a cut-short file would SIGBUS), that a store that existed
        still has its data, and that a new one has room; migrate format 1; record the
        store id in ``STORE_ID``."""
        known_id = read_store_id(path)
        if check_data_file(path) == 0:
            if known_id is not None:
                raise DataDirError(
                    f"data directory {path!r} held store {known_id} ({STORE_FILE}) but its "
                    "data.mdb is missing or empty: restore data.mdb from a backup (or, to "
                    f"start an empty store and have every client resync, remove {STORE_FILE})"
                )
            check_new_store_room(path)
        self._env = lmdb.open(
            path,
            map_size=self.config.map_size,
            max_dbs=12,
            sync=self.config.durability == "fsync",
            metasync=False,  # the writer acknowledges a commit after the next sync instead
            readahead=False,
            max_readers=256,
            mode=DATA_FILE_MODE,
        )
        # Resizing the map needs no transaction open in this process: readers share this
        # lock (the server's read threads read at once), the resize takes it alone.
        self._resize_lock = SharedLock()
        env = self._env
        self._meta = env.open_db(b"meta")
        self._channels = env.open_db(b"channels")
        self._log = env.open_db(b"log")
        self._messages = env.open_db(b"messages")
        self._edit_links = env.open_db(b"edit_links")
        self._tombstones = env.open_db(b"tombstones")
        self._cursors = env.open_db(b"cursors")
        self._dedup = env.open_db(b"dedup")
        self._members = env.open_db(b"members")
        self._seen = env.open_db(b"last_seen")
        try:
            self.store_id = self._check_format()
            if known_id != self.store_id:
                if known_id is not None:  # another store's data.mdb was put here
                    log.warning(
                        "%s named store %s, data.mdb is store %s: recording the latter",
                        STORE_FILE, known_id, self.store_id,
                    )  # fmt: skip
                write_store_id(path, self.store_id)
            self._check_encryption()
        except BaseException:
            self._env.close()
            raise

    def _check_format(self) -> str:
        """Initialize a new store (format, random store id) or migrate an older format;
        returns the store id."""
        with self._env.begin(write=True) as txn:
            raw = txn.get(b"format", db=self._meta)
            has_data = bool(txn.stat(self._log)["entries"] or txn.stat(self._channels)["entries"])
            version = check_format(self._env.path(), raw, has_data)
            if version is None:
                txn.put(b"format", str(FORMAT_VERSION).encode(), db=self._meta)
            store_id = txn.get(b"store_id", db=self._meta)
            if store_id is None:
                store_id = secrets.token_hex(16).encode()
                txn.put(b"store_id", store_id, db=self._meta)
        if version is not None and version != FORMAT_VERSION:
            self._migrate_v1()
        return bytes(store_id).decode()

    def _migrate_v1(self) -> None:
        """Format 1 to 2, in transactions of ``MIGRATE_CHUNK`` rows, restartable (every
        step is idempotent; the format key changes last): index the message entries
        (``messages``) and turn each message's list of edit seqs (``edits``) into its
        ``edit_links`` rows. Channel records keep their epochs and id prefixes."""
        log.warning("migrating data directory %r to format %d", self._env.path(), FORMAT_VERSION)
        step = {"db": "log", "after": b""}
        while True:
            with self._env.begin(write=True) as txn:
                if step["db"] == "log":
                    db = self._log
                else:
                    db = self._env.open_db(b"edits", txn=txn)
                cur = txn.cursor(db=db)
                ok = cur.set_range(step["after"]) if step["after"] else cur.first()
                if ok and step["after"] and cur.key() == step["after"]:
                    ok = cur.next()
                rows = 0
                while ok and rows < MIGRATE_CHUNK:
                    key, value = cur.key(), cur.value()
                    if step["db"] == "log":
                        if unpackb(value)["kind"] == "message":
                            txn.put(key, b"", db=self._messages)
                    else:  # a message's key -> msgpack array of its edit seqs
                        for edit_seq in unpackb(value):
                            self._link_edit(txn, key, edit_seq)
                    step["after"] = key
                    rows += 1
                    ok = cur.next()
                if not ok and step["db"] == "log":
                    step.update(db="edits", after=b"")
                elif not ok:
                    txn.drop(db, delete=True)
                    txn.put(b"format", str(FORMAT_VERSION).encode(), db=self._meta)
                    return

    # ---------------------------------------------------------------- edit links
    #
    # edit_links holds, under a message's log key, its latest edit seq and edit count
    # (LATEST_EDIT), and under each edit's log key the seq of the message's previous edit
    # (0: none). An edit writes two small rows, whatever the message's history; a delete
    # walks the chain to redact the edits still in the log. Compaction drops an edit's
    # row with the edit, which ends the chain there: every older edit is below it too.

    def _edit_count(self, txn: lmdb.Transaction, mkey: bytes) -> tuple[int, int]:
        raw = txn.get(mkey, db=self._edit_links)
        return (0, 0) if raw is None else LATEST_EDIT.unpack(raw)

    def _link_edit(self, txn: lmdb.Transaction, mkey: bytes, edit_seq: int) -> None:
        """Record edit ``edit_seq`` as message ``mkey``'s latest."""
        latest, count = self._edit_count(txn, mkey)
        txn.put(mkey, LATEST_EDIT.pack(edit_seq, count + 1), db=self._edit_links)
        txn.put(mkey[:8] + U64.pack(edit_seq), U64.pack(latest), db=self._edit_links)

    def _redact_edits(self, txn: lmdb.Transaction, mkey: bytes) -> None:
        """A deleted message's edits lose their text, newest first, and its links go."""
        latest = self._edit_count(txn, mkey)[0]
        txn.delete(mkey, db=self._edit_links)
        while latest:
            ek = mkey[:8] + U64.pack(latest)
            link = txn.get(ek, db=self._edit_links)
            edit_raw = txn.get(ek, db=self._log)
            if edit_raw is not None:
                edit = self._decode(ek, edit_raw)
                edit.pop("text", None)
                edit.pop("enc", None)
                edit["deleted"] = True
                txn.put(ek, packb(edit), db=self._log)
            txn.delete(ek, db=self._edit_links)
            latest = 0 if link is None else U64.unpack(link)[0]

    def _check_encryption(self) -> None:
        """Meta ``encryption`` lists the key ids entries may be encrypted with. Without a
        key ring such a directory is refused; with one, its active key is recorded."""
        with self._env.begin(write=True) as txn:
            raw = txn.get(b"encryption", db=self._meta)
            kids: list[str] = [] if raw is None else unpackb(raw)
            if self._keyring is None:
                if kids:
                    raise EncryptionError(
                        f"data directory {self._env.path()!r} holds message text encrypted "
                        f"with key(s) {', '.join(map(repr, kids))}: pass --encryption-key-file"
                    )
                return
            if self._keyring.active not in kids:
                txn.put(b"encryption", packb([*kids, self._keyring.active]), db=self._meta)
        missing = [k for k in kids if k not in self._keyring.kids]
        if missing:
            log.warning(
                "entries may be encrypted with key(s) %s, which the key file lacks: reading "
                "them fails (rewrite them with `tsmsg compact --rekey` before removing a key)",
                ", ".join(map(repr, missing)),
            )

    @staticmethod
    def _decode(key: bytes, raw: bytes) -> Entry:
        """A log entry as stored at ``key``, still sealed if it is encrypted. An entry
        that is no msgpack map of the entry's shape is a StoreError (``internal``): the
        request fails with an error frame, the connection stays open."""
        try:
            entry = unpackb(raw)
            if not (
                isinstance(entry, dict)
                and type(entry.get("seq")) is int
                and entry.get("kind") in ENTRY_KINDS
                and isinstance(entry.get("id"), str)
                and isinstance(entry.get("sender"), str)
                and type(entry.get("ts")) is int
            ):
                raise ValueError("not a log entry")
        except Exception as exc:
            raise StoreError(
                f"log entry {U64.unpack(key[8:16])[0]} of channel id {U64.unpack(key[:8])[0]} "
                f"is corrupt: {exc}"
            ) from None
        return entry

    def _load(self, key: bytes, raw: bytes) -> Entry:
        """A log entry as stored at ``key``, its body decrypted if it is encrypted."""
        entry = self._decode(key, raw)
        return open_entry(entry, key, self._keyring) if "enc" in entry else entry

    def _pack(self, key: bytes, entry: Entry) -> bytes:
        """A log entry to store at ``key``: its body encrypted if a key ring is set."""
        if self._keyring is not None:
            entry = self._keyring.seal(entry, key)
        return packb(entry)

    def _load_dedup(self) -> int:
        """Rebuild the in-memory dedup map from the journal; returns the next order."""
        with self._env.begin() as txn:
            cur = txn.cursor(db=self._dedup)
            for _, value in cur:
                dkey, seq, _ts = unpackb(value)
                self._ring.insert(dkey, seq)
            return U64.unpack(cur.key())[0] + 1 if cur.last() else 0

    # ---------------------------------------------------------------- reads

    @contextmanager
    def _read(self) -> Iterator[lmdb.Transaction]:
        with self._resize_lock.shared(), self._env.begin(buffers=False) as txn:
            yield txn

    def _channel_record(self, txn: lmdb.Transaction, name: str) -> dict[str, int] | None:
        raw = txn.get(name.encode(), db=self._channels)
        if raw is None:
            return None
        try:
            rec: dict[str, int] = unpackb(raw)
            if not all(type(rec.get(k)) is int for k in ("id", "head", "horizon", "epoch")):
                raise ValueError("not a channel record")
        except Exception as exc:
            raise StoreError(f"the record of channel {name!r} is corrupt: {exc}") from None
        return rec

    def channel(self, name: str) -> ChannelInfo:
        with self._read() as txn:
            rec = self._channel_record(txn, name)
        if rec is None:
            return ChannelInfo(name, 0, 0, 0)
        return ChannelInfo(name, rec["head"], rec["horizon"], rec["epoch"])

    def sync(
        self,
        channel: str,
        since: int,
        limit: int,
        max_bytes: int | None = None,
        entry_overhead: int = 0,
    ) -> SyncPage:
        with self._read() as txn:
            rec = self._channel_record(txn, channel)
            if rec is None:
                return SyncPage([], False, 0, 0, resync=since != 0)
            head, epoch = rec["head"], rec["epoch"]
            if since < rec["horizon"] or since > head:
                return SyncPage([], False, head, epoch, resync=True)
            prefix = U64.pack(rec["id"])
            entries: list[Entry] = []
            size = 0
            cur = txn.cursor(db=self._log)
            if cur.set_range(prefix + U64.pack(since + 1)):
                for key, value in cur:
                    if not key.startswith(prefix) or len(entries) >= limit:
                        break
                    size += len(value) + entry_overhead
                    if max_bytes is not None and entries and size > max_bytes:
                        break
                    entries.append(self._load(key, value))
        last = entries[-1]["seq"] if entries else since
        return SyncPage(entries, last < head, head, epoch)

    def history(
        self, channel: str, before: int | None, limit: int, max_bytes: int | None = None
    ) -> HistoryPage:
        out: list[Entry] = []
        more = False
        with self._read() as txn:
            rec = self._channel_record(txn, channel)
            top = (
                0
                if rec is None
                else rec["head"]
                if before is None
                else min(before - 1, rec["head"])
            )
            if rec is None or top < 1:
                return HistoryPage(out, False)
            # Walk the index of message seqs, not the log: a page costs its own size,
            # however many edit and delete entries lie between its messages.
            prefix = U64.pack(rec["id"])
            cur = txn.cursor(db=self._messages)
            if cur.set_range(prefix + U64.pack(top + 1)):
                positioned = cur.prev()
            else:
                positioned = cur.last()
            size = 0
            for key in cur.iterprev(values=False) if positioned else ():
                if not key.startswith(prefix):
                    break
                value = txn.get(key, db=self._log)
                if value is None:  # never: the index follows the log in every transaction
                    continue
                size += len(value)
                if len(out) >= limit or (max_bytes is not None and out and size > max_bytes):
                    more = True
                    break
                out.append(self._load(key, value))
        out.reverse()
        return HistoryPage(out, more)

    def is_member(self, user: str, channel: str) -> bool:
        with self._read() as txn:
            return txn.get(user.encode() + b"\0" + channel.encode(), db=self._members) is not None

    def channels_of(self, user: str, limit: int | None = None) -> list[str]:
        prefix = user.encode() + b"\0"
        out: list[str] = []
        with self._read() as txn:
            cur = txn.cursor(db=self._members)
            if cur.set_range(prefix):
                for key in cur.iternext(values=False):
                    if not key.startswith(prefix) or len(out) == limit:
                        break
                    out.append(bytes(key[len(prefix) :]).decode())
        return out

    def _count_members(self, txn: Any, user: bytes, most: int) -> int:
        """The user's memberships, counted up to ``most`` (the cost is bounded by it)."""
        prefix, count = user + b"\0", 0
        cur = txn.cursor(db=self._members)
        if cur.set_range(prefix):
            for key in cur.iternext(values=False):
                if not key.startswith(prefix) or count >= most:
                    break
                count += 1
        return count

    def last_seen(self, user: str) -> int | None:
        with self._read() as txn:
            raw = txn.get(user.encode(), db=self._seen)
        return None if raw is None else int(U64.unpack(raw)[0])

    def read_cursor(self, user: str, channel: str) -> int:
        with self._read() as txn:
            rec = self._channel_record(txn, channel)
            if rec is None:
                return 0
            raw = txn.get(self._cursor_key(user, rec["id"]), db=self._cursors)
        return 0 if raw is None else int(U64.unpack(raw)[0])

    def unread(self, user: str, channel: str, scan_max: int | None = None) -> int:
        with self._read() as txn:
            rec = self._channel_record(txn, channel)
            if rec is None:
                return 0
            raw = txn.get(self._cursor_key(user, rec["id"]), db=self._cursors)
            since = 0 if raw is None else U64.unpack(raw)[0]
            prefix = U64.pack(rec["id"])
            count = 0
            cur = txn.cursor(db=self._log)
            if cur.set_range(prefix + U64.pack(since + 1)):
                for scanned, (key, value) in enumerate(cur):
                    if not key.startswith(prefix) or scanned == scan_max:
                        break
                    e = self._decode(key, value)
                    if e["kind"] == "message" and not e.get("deleted") and e["sender"] != user:
                        count += 1
        return count

    def lookup_dup(self, channel: str, sender: str, cid: str) -> AppendResult | None:
        # The common case (a new cid) is answered from memory alone, with no transaction.
        chan_id = self._chan_ids.get(channel)
        if chan_id is None:
            return None
        seq = self._ring.get_cid(chan_id, sender, cid)
        if seq is None:
            return None
        with self._read() as txn:
            rec = self._channel_record(txn, channel)
            if rec is None or rec["id"] != chan_id:
                return None  # reset since: the writer answers from the current log
            return self._dup_result(txn, channel, rec, seq)

    cached_dup = lookup_dup  # the ring in memory, then the mapped file: no network

    def _dup_result(
        self, txn: lmdb.Transaction, channel: str, rec: dict[str, int], seq: int
    ) -> AppendResult:
        """The first result of a cid: its seq, id and ts (0 once retention dropped it)."""
        key = U64.pack(rec["id"]) + U64.pack(seq)
        raw = txn.get(key, db=self._log)
        ts = self._decode(key, raw)["ts"] if raw is not None else 0
        return AppendResult(channel, seq, message_id(record_prefix(rec), seq), ts, dup=True)

    # ---------------------------------------------------------------- keys

    @staticmethod
    def _cursor_key(user: str, chan_id: int) -> bytes:
        return user.encode() + b"\0" + U64.pack(chan_id)

    # ---------------------------------------------------------------- writes

    def submit(self, *ops: WriteOp) -> None:
        if self._closed:
            raise StoreUnavailable("store is closed")
        if self.failed is not None:
            raise StoreUnavailable(self.failed)
        queue_writes(ops, self._waiting, self._queue)

    def health(self) -> tuple[str | None, float]:
        if self._closed:
            return "store is closed", 0.0
        return self.failed, oldest_wait(self._waiting)

    def _run_writer(self) -> None:
        """The writer loop: take every pending write (a batch), commit it, acknowledge.

        With ``fsync`` durability LMDB runs with MDB_NOMETASYNC: a commit syncs its data
        pages once and writes its meta page without a second sync. The next commit's
        sync (or an explicit one as soon as the queue runs dry) makes that meta page
        durable, so a batch is acknowledged only after that next sync: one fdatasync per
        commit instead of two, and no waiting when the load is low."""
        fsync = self.config.durability == "fsync"
        unsynced: list[WriteOp] = []  # committed; durable at the next sync
        unsynced_cids: dict[bytes, int] = {}  # the cids it stored
        held: tuple[WriteOp, ...] | _Job | _Stop | None = None  # taken, for after the batch
        while True:
            item, held = held, None
            if item is None:
                try:
                    item = self._queue.get(block=not unsynced)
                except queue.Empty:
                    item = None
            if unsynced and not isinstance(item, tuple):
                self._sync_and_ack(unsynced, unsynced_cids)  # idle, or a job next: now
                unsynced = []
            if item is None:
                continue
            if isinstance(item, _Stop):
                return
            if isinstance(item, _Job):
                self._run_job(item)
                continue
            batch, held = self._take_batch(item)
            if self.failed is not None:  # queued before the failure: refused, not written
                for op in batch:
                    op.result, op.error, op.changed = None, StoreUnavailable(self.failed), False
                self._ack(batch, {})
                continue
            cids = self._commit_batch(batch)
            if not fsync:
                self._ack(batch, cids or {})
            elif cids is not None:
                # This commit's sync made the previous one durable (this one is not yet:
                # its cids stay out of the map that answers retries until it is).
                self._ack(unsynced, unsynced_cids)
                unsynced, unsynced_cids = batch, cids
            else:  # they carry their errors
                if self.failed is None:
                    self._sync_and_ack(unsynced, unsynced_cids)
                else:  # in the commit's sync, perhaps, which was to make them durable
                    self._fail_stop(unsynced)
                    self._ack(unsynced, unsynced_cids)
                unsynced = []
                self._ack(batch, {})

    def _run_syncer(self) -> None:
        """``async`` durability: sync every ``sync_interval_s``, in a thread of its own
        (LMDB's sync is an fdatasync of the data file, which needs no transaction): a sync
        took 10-25 ms under load here, a stall of every write when the writer ran it."""
        while not self._stop_syncer.wait(self.config.sync_interval_s):
            try:
                with self._resize_lock.shared():  # not while the map is being resized
                    self._timed_sync()
            except Exception as exc:  # acked writes may not be on disk: stop writing
                if self.failed is None:
                    self._fail_stop([], exc)

    def _take_batch(
        self, ops: tuple[WriteOp, ...]
    ) -> tuple[list[WriteOp], tuple[WriteOp, ...] | _Job | _Stop | None]:
        """The next batch (:func:`~tsmsg.store.base.take_batch`), up to ``max_batch``
        writes or ``max_batch_bytes`` of text."""
        return take_batch(ops, self._queue, self.config.max_batch, self.config.max_batch_bytes)

    def _run_job(self, job: _Job) -> None:
        if self.failed is not None:  # a sync failed: a job's commits are writes too
            job.error = StoreUnavailable(self.failed)
            job.done.set()
            return
        try:
            finished = self._with_map_growth(job.fn)
        except BaseException as exc:  # reported to the waiter, never kills the writer
            job.error = exc
            finished = True
        if finished:
            job.done.set()
        else:
            self._queue.put(job)

    def _with_map_growth(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (which commits or aborts its own transaction); when the map is full,
        double it and run ``fn`` again. Nothing of a failed attempt was committed."""
        while True:
            try:
                return fn()
            except lmdb.MapFullError:
                with self._resize_lock.exclusive():
                    size = self._env.info()["map_size"] * 2
                    self._env.set_mapsize(size)
                log.info("store map full: grew LMDB map to %d MiB", size >> 20)

    def _commit_batch(self, batch: list[WriteOp]) -> dict[bytes, int] | None:
        """Commit a batch (without acknowledging it): the cids it stored (dedup key ->
        seq, for :meth:`_ack`); None if the commit failed, in which case every op of the
        batch carries the error and nothing was stored."""
        if len(self.batch_sizes) < 100_000:
            self.batch_sizes.append(len(batch))
        start = time.perf_counter()
        try:
            new_cids: dict[bytes, int] = self._with_map_growth(lambda: self._write_batch(batch))
        except Exception as exc:  # a failed batch must never stop the writer thread
            log.error("store commit of %d writes failed: %r", len(batch), exc)
            if isinstance(exc, _CommitIOError) and self.config.durability == "fsync":
                self._fail_stop([], exc, "store commit failed in LMDB, perhaps in its sync")
            err = StoreUnavailable(f"store commit failed: {exc}")
            for op in batch:
                op.result, op.error, op.changed = None, err, False
            return None
        if self._observer is not None:
            self._observer.committed(len(batch), time.perf_counter() - start)
        self._next_order += len(new_cids)
        return new_cids

    def _timed_sync(self) -> None:
        start = time.perf_counter()
        self._env.sync(True)
        if self._observer is not None:
            self._observer.synced(time.perf_counter() - start)

    def _sync_and_ack(self, batch: list[WriteOp], cids: dict[bytes, int]) -> None:
        try:
            self._timed_sync()
        except Exception as exc:
            self._fail_stop(batch, exc)
        self._ack(batch, cids)

    def _fail_stop(
        self, batch: list[WriteOp], exc: Exception | None = None, what: str = "store sync failed"
    ) -> None:
        """A sync failed (``exc``, ``what``; None: the one that stopped the store) after a
        commit: the batch is visible but not known to be durable (after an fsync error the
        kernel may have dropped the pages: PostgreSQL's "fsyncgate"). Its writers get
        store_unavailable with an unknown outcome (their cids stay remembered, so a retry
        is answered as a duplicate if it is there) and the store stops accepting writes
        until it is reopened; reads keep working."""
        if exc is not None:
            self.failed = f"{what} ({exc!r}); writes stopped until restart"
        assert self.failed is not None
        log.critical("%s: %d committed writes have an unknown outcome", self.failed, len(batch))
        err = StoreUnavailable(f"{self.failed}; outcome unknown, retry with the same cid")
        for op in batch:
            op.result, op.error, op.changed = None, err, False

    def _ack(self, batch: list[WriteOp], cids: dict[bytes, int]) -> None:
        """The batch is durable (or failed): remember the ``cids`` it stored (a retry is
        answered from the map only from now on), wake its writers."""
        if not batch:
            return
        waiting = self._waiting
        for _ in range(min(len(batch), len(waiting))):
            waiting.popleft()
        unsynced, kept = self._unsynced_cids, {}
        for key, seq in cids.items():
            if unsynced.get(key) == seq:  # else pruned since its commit (and stored again?)
                del unsynced[key]
                kept[key] = seq
        self._ring.insert_all(kept)
        notify_batch(batch, self._notify)

    def _write_batch(self, batch: list[WriteOp]) -> dict[bytes, int]:
        """Apply a batch in one transaction; returns the cids it stored (dedup key → seq),
        which join the in-memory map only once the commit succeeded. Sets every op's
        ``result`` and ``error`` (a retried batch overwrites the failed attempt's)."""
        txn = self._env.begin(write=True)
        try:
            ts = self._clock()
            seal = None if self._keyring is None else self._keyring.seal
            appends = AppendBatch(
                self._ring, self._unsynced_cids, ts, self._next_order,
                lambda name: self._append_channel(b, name), seal, AppendResult,
                MAX_USER_BYTES, MAX_CID_CHARS,
            )  # fmt: skip
            # New messages (the hot path) are the extension's: their rows wait there until
            # _flush_appends writes them. (Not held by `b`, which its callback holds: a
            # cycle would keep every batch until a collection.)
            b = _Batch(txn, ts, txn.cursor(db=self._log), txn.cursor(self._messages))
            append = appends.append
            for op in batch:
                error: StoreError | None = None
                result: AppendResult | int | None = None
                try:
                    if op.kind == "message":  # the hot path: nothing else on the way
                        result = append(op)
                        if type(result) is int:  # a known cid: the seq it was first given
                            self._flush_appends(b, appends)  # (perhaps by this batch)
                            rec = b.records[op.channel]
                            result = self._dup_result(txn, op.channel, rec, result)
                    else:
                        self._flush_appends(b, appends)  # the log as earlier ops left it
                        result = self._apply(b, op)
                except EncryptionError as exc:  # logged here; the client learns no key ids
                    log.error("%s %s in %r failed: %s", op.kind, op.target, op.channel, exc)
                    error = EncryptionError("the message text cannot be decrypted")
                except StoreError as exc:
                    error = exc
                except lmdb.Error:
                    raise  # fails the whole batch: the transaction is aborted
                except Exception as exc:  # a malformed op fails alone, never its batch
                    error = StoreError(f"invalid write: {exc}")
                op.result, op.error = result, error
            self._flush_appends(b, appends)
            journal, new_cids = appends.journal, appends.new_cids
            if journal:
                added = txn.cursor(db=self._dedup).putmulti(journal, append=True)[1]
                if added != len(journal):  # order keys out of step: never lose cids
                    raise RuntimeError(f"dedup journal took {added} of {len(journal)}")
            # Only records whose head moved: a channel that a failed message would have
            # created is never stored, and reads rewrite nothing.
            changed = {n: rec for n, rec in b.records.items() if rec["head"] != b.heads[n]}
            for name, rec in changed.items():
                txn.put(name.encode(), packb(rec), db=self._channels)
            pruned = self._prune_dedup(txn, ts, DEDUP_PRUNE_PER_BATCH + 2 * len(new_cids))
            if self._fault is not None:
                self._fault()
            try:
                txn.commit()
            except (lmdb.MapFullError, lmdb.DiskError):  # the map grows; disk full: refused
                raise
            except lmdb.Error as exc:  # an I/O error, perhaps in LMDB's own sync (fsync)
                raise _CommitIOError(f"{exc}") from exc
        except BaseException:
            txn.abort()
            raise
        # Committed: not acknowledged yet (until its sync, with fsync), and only then in
        # the ring. What the commit pruned is forgotten as a reopened store would: by the
        # ring, or, committed but not acknowledged (the ring has it not yet), by
        # _unsynced_cids, so that it never joins the ring (_ack).
        unsynced = self._unsynced_cids
        unsynced.update(new_cids)
        for key, seq in pruned:
            if not self._ring.forget_oldest(key) and unsynced.get(key) == seq:
                del unsynced[key]
        for name, rec in changed.items():
            self._chan_ids[name] = rec["id"]
        return new_cids

    def _flush_appends(self, b: _Batch, appends: AppendBatch) -> None:
        """Write the rows of the messages appended so far: before an op that reads or
        rewrites the log, and at the batch's end."""
        log, index = appends.take()
        if log:
            b.log.putmulti(log)
            b.index.putmulti(index)

    def _append_channel(self, b: _Batch, name: str) -> tuple[dict[str, int], bytes, str]:
        """For the extension's appends, once per channel and batch: the channel's record
        (created if new), its id as a key prefix and its message id prefix."""
        rec = self._record(b, name, create=True)
        assert rec is not None
        return rec, U64.pack(rec["id"]), record_prefix(rec)

    def _record(self, b: _Batch, name: str, create: bool) -> dict[str, int] | None:
        """The channel's record as this batch left it; its name is checked here, once
        per batch, before it reaches LMDB."""
        rec = b.records.get(name)
        if rec is None:
            raw = b.txn.get(_check_name("channel", name, MAX_CHANNEL_BYTES), db=self._channels)
            if raw is not None:
                rec = unpackb(raw)
            elif not create:
                return None
            else:  # stored only once a message is appended (an unused id is harmless)
                raw = b.txn.get(b"next_channel_id", db=self._meta)
                chan_id = 1 if raw is None else U64.unpack(raw)[0]
                b.txn.put(b"next_channel_id", U64.pack(chan_id + 1), db=self._meta)
                rec = new_channel_record(self.store_id, chan_id)
            b.records[name] = rec
            b.heads[name] = rec["head"]
        return rec

    def _apply(self, b: _Batch, op: WriteOp) -> AppendResult | int:
        """Any write but a message."""
        user = _check_name("user", op.user, MAX_USER_BYTES)
        if op.kind == "seen":
            b.txn.put(user, U64.pack(b.ts), db=self._seen)
            return b.ts
        if op.kind in ("member", "unmember"):
            key = user + b"\0" + _check_name("channel", op.channel, MAX_CHANNEL_BYTES)
            if op.kind == "unmember":
                b.txn.delete(key, db=self._members)
                return 0
            if b.txn.get(key, db=self._members) is not None:
                return 0
            if op.most and self._count_members(b.txn, user, op.most) >= op.most:
                return 0  # at the bound: not recorded (changed stays False)
            op.changed = bool(b.txn.put(key, b"", db=self._members, overwrite=False))
            return 0
        if op.kind == "read":
            return self._apply_read(b, op)
        return self._apply_change(b, op)

    def _put_entry(
        self,
        put: Callable[[bytes, bytes], Any],
        rec: dict[str, int],
        entry: Entry,
        chan_key: bytes | None = None,
    ) -> bytes:
        """Store ``entry`` in the channel's log and move its head; returns the entry's key.
        ``chan_key``: the channel's id as a key prefix, if the caller has it."""
        key = (chan_key or U64.pack(rec["id"])) + U64.pack(entry["seq"])
        put(key, self._pack(key, entry))
        rec["head"] = entry["seq"]
        return key

    def _apply_change(self, b: _Batch, op: WriteOp) -> AppendResult:
        """An edit or a delete: a new entry naming its target, and the target's message
        entry rewritten to the message's current state (a delete redacts its text and
        meta, and the text of its earlier edits)."""
        txn, ts = b.txn, b.ts
        target = op.target or ""
        rec = self._record(b, op.channel, create=False)
        parsed = parse_message_id(target)
        if rec is None or parsed is None or parsed[0] != record_prefix(rec):
            raise NotFound(f"no message {target!r} in channel {op.channel!r}")
        mkey = U64.pack(rec["id"]) + U64.pack(parsed[1])
        raw = txn.get(mkey, db=self._log)
        msg = None if raw is None else self._decode(mkey, raw)  # decrypted only for an edit
        if msg is None or msg["kind"] != "message" or msg.get("deleted"):
            raise NotFound(f"no message {target!r} in channel {op.channel!r}")
        if msg["sender"] != op.user and not op.moderator:
            raise Forbidden(f"only the sender or a moderator may change message {target!r}")
        seq = rec["head"] + 1
        if op.kind == "edit":
            if op.text is None:
                raise ValueError("an edit needs text")
            check_edits(target, self._edit_count(txn, mkey)[1], self.config.max_edits)
            entry: Entry = {"seq": seq, "kind": "edit", "id": target, "sender": op.user}
            entry.update(ts=ts, text=op.text)
            msg = open_entry(msg, mkey, self._keyring) if "enc" in msg else msg
            msg["text"], msg["edited"] = op.text, ts
            self._link_edit(txn, mkey, seq)
        else:
            entry = {"seq": seq, "kind": "delete", "id": target, "sender": op.user, "ts": ts}
            for key in ("text", "meta", "edited", "enc"):
                msg.pop(key, None)
            msg["deleted"] = True
            self._redact_edits(txn, mkey)
            txn.put(mkey, U64.pack(ts), db=self._tombstones)
        b.log.put(mkey, self._pack(mkey, msg))
        self._put_entry(b.log.put, rec, entry)
        op.epoch = rec["epoch"]
        return AppendResult(op.channel, seq, target, ts)

    def _apply_read(self, b: _Batch, op: WriteOp) -> int:
        op.changed = False  # also when a retried batch applies it again
        txn = b.txn
        rec = self._record(b, op.channel, create=False)
        if rec is None:
            return 0
        key = self._cursor_key(op.user, rec["id"])
        raw = txn.get(key, db=self._cursors)
        old = 0 if raw is None else U64.unpack(raw)[0]
        new = min(max(op.seq, 0), rec["head"])
        if new <= old:
            return int(old)
        txn.put(key, U64.pack(new), db=self._cursors)
        op.changed = True
        return new

    def _prune_dedup(self, txn: lmdb.Transaction, now: int, most: int) -> list[tuple[bytes, int]]:
        """Drop the oldest journal entries past the size bound or the retention window,
        a bounded number per commit; returns their dedup keys and seqs, oldest first, for
        the in-memory map (FIFO in the same order) to forget once the commit succeeded."""
        excess = txn.stat(self._dedup)["entries"] - self.config.dedup_max
        cutoff = now - self.config.dedup_retention_ms
        cur = txn.cursor(db=self._dedup)
        pruned: list[tuple[bytes, int]] = []
        while len(pruned) < most and cur.first():
            key, seq, ts = unpackb(cur.value())
            if len(pruned) >= excess and ts >= cutoff:
                break
            cur.delete()
            pruned.append((key, seq))
        return pruned

    # ---------------------------------------------------------------- compaction

    def _submit_job(self, fn: Callable[[], bool], timeout: float | None = None) -> None:
        if self._closed:
            raise StoreUnavailable("store is closed")
        job = _Job(fn)
        self._queue.put(job)
        if not job.done.wait(timeout):
            raise StoreUnavailable("store job did not finish in time")
        if job.error is not None:
            raise job.error

    def compact(self, channel: str) -> int:
        """Kafka's rule, for seqs at or below the compaction point ``head - keep_recent``:
        keep each message's latest state (its message entry, which edits and deletes keep
        current), drop edit and delete entries, keep tombstones until
        ``tombstone_retention_ms`` after the delete; retention by ``max_count`` and
        ``max_age_ms`` drops old messages entirely. The horizon moves up to the point: a
        sync from below it is told to resync. Runs in steps of at most ``COMPACT_CHUNK``
        entries, each its own transaction, so appends interleave with it."""
        policy = self.config.compaction
        plan: dict[str, int] = {}  # fixed by the first step, so a busy channel finishes
        phase = [self._compact_retention, self._compact_changes, self._compact_tombstones]

        def step() -> bool:
            with self._env.begin(write=True) as txn:
                rec = self._channel_record(txn, channel)
                if rec is None:
                    return True
                if not plan:
                    head = rec["head"]
                    keep = head - policy.max_count if policy.max_count is not None else 0
                    now = self._clock()
                    age = now - policy.max_age_ms if policy.max_age_ms is not None else 0
                    # Phase 2 resumes where the last finished pass left off, not at the
                    # horizon: an interrupted pass (close, crash) has moved the horizon
                    # already, and its edit and delete entries below it are still there.
                    done = rec.setdefault("compacted", rec["horizon"])  # an older record
                    plan.update(phase=0, next=done + 1, now=now, age_cutoff=age)
                    plan.update(
                        drop_below=max(0, keep), point=max(0, head - policy.keep_recent, keep)
                    )
                elif self._compaction.stopping.is_set():
                    return True  # closing: the rest waits for the next pass
                budget = COMPACT_CHUNK
                while plan["phase"] < len(phase) and budget > 0:
                    budget = phase[plan["phase"]](txn, U64.pack(rec["id"]), plan, budget)
                finished = plan["phase"] == len(phase)
                # The horizon covers the point in every step's transaction, so what a step
                # drops is below it when it commits: a sync between two steps is told to
                # resync, never shown a gap.
                rec["horizon"] = max(rec["horizon"], min(plan["point"], rec["head"]))
                if finished:
                    rec["compacted"] = max(rec.get("compacted", 0), plan["point"])
                txn.put(channel.encode(), packb(rec), db=self._channels)
                plan["horizon"] = rec["horizon"]
                if self._fault is not None:
                    self._fault()
            return finished

        self._submit_job(step)
        return plan.get("horizon", 0)

    def _drop_side_rows(self, txn: lmdb.Transaction, key: bytes) -> None:
        """The rows other databases keep under a log key that is being dropped."""
        for db in (self._messages, self._edit_links, self._tombstones):
            txn.delete(key, db=db)

    def _drop(self, txn: lmdb.Transaction, cur: lmdb.Cursor, key: bytes) -> bool:
        """Delete the log entry under ``cur`` (and its side rows); the cursor moves on."""
        self._drop_side_rows(txn, key)
        return bool(cur.delete())

    def _compact_retention(
        self, txn: lmdb.Transaction, prefix: bytes, plan: dict[str, int], budget: int
    ) -> int:
        """Phase 1: from the start of the log, drop entries below the count limit or
        older than the age limit."""
        cur = txn.cursor(db=self._log)
        ok = cur.set_range(prefix)
        while ok:
            key = cur.key()
            if not key.startswith(prefix):
                break
            seq = U64.unpack(key[8:])[0]
            if seq > plan["drop_below"] and unpackb(cur.value())["ts"] >= plan["age_cutoff"]:
                break
            if budget == 0:
                return 0
            budget -= 1
            plan["point"] = max(plan["point"], seq)
            ok = self._drop(txn, cur, key)
        plan["phase"] += 1
        return budget

    def _compact_changes(
        self, txn: lmdb.Transaction, prefix: bytes, plan: dict[str, int], budget: int
    ) -> int:
        """Phase 2: between the old horizon and the point, drop edit and delete entries."""
        cur = txn.cursor(db=self._log)
        ok = cur.set_range(prefix + U64.pack(plan["next"]))
        while ok:
            key = cur.key()
            if not key.startswith(prefix) or U64.unpack(key[8:])[0] > plan["point"]:
                break
            if budget == 0:
                plan["next"] = U64.unpack(key[8:])[0]
                return 0
            budget -= 1
            if unpackb(cur.value())["kind"] != "message":
                ok = self._drop(txn, cur, key)
            else:
                ok = cur.next()
        plan["phase"] += 1
        return budget

    def _compact_tombstones(
        self, txn: lmdb.Transaction, prefix: bytes, plan: dict[str, int], budget: int
    ) -> int:
        """Phase 3: drop tombstones at or below the point whose retention is over."""
        retention = self.config.compaction.tombstone_retention_ms
        cur = txn.cursor(db=self._tombstones)
        ok = cur.set_range(prefix)
        while ok:
            key = cur.key()
            if not key.startswith(prefix) or U64.unpack(key[8:])[0] > plan["point"]:
                break
            if U64.unpack(cur.value())[0] + retention > plan["now"]:
                ok = cur.next()
                continue
            if budget == 0:
                return 0
            budget -= 1
            txn.delete(key, db=self._log)
            txn.delete(key, db=self._messages)
            txn.delete(key, db=self._edit_links)
            ok = cur.delete()
        plan["phase"] += 1
        return budget

    def channels(self) -> list[str]:
        with self._read() as txn:
            return [bytes(k).decode() for k, _ in txn.cursor(db=self._channels)]

    def rekey(self, channel: str) -> int:
        """Re-encrypt under the active key the body of every entry of ``channel`` that is
        in plaintext or under an older key, in steps of ``COMPACT_CHUNK`` entries (each its
        own transaction, like compaction). Returns how many entries were rewritten."""
        keyring = self._keyring
        if keyring is None:
            raise EncryptionError("rekey needs an encryption key file")
        state = {"next": 1, "count": 0}

        def step() -> bool:
            # The resume point and the count move only once the step has committed: a
            # step that fails (the map full at its commit) runs again from the same seq.
            count, resume = 0, 0
            with self._env.begin(write=True) as txn:
                rec = self._channel_record(txn, channel)
                if rec is None:
                    return True
                prefix = U64.pack(rec["id"])
                cur = txn.cursor(db=self._log)
                ok = cur.set_range(prefix + U64.pack(state["next"]))
                budget = COMPACT_CHUNK
                while ok and cur.key().startswith(prefix):
                    key = cur.key()
                    if budget == 0:
                        resume = U64.unpack(key[8:])[0]
                        break
                    budget -= 1
                    entry = unpackb(cur.value())
                    kid = entry_kid(entry)
                    if kid != keyring.active and (
                        kid is not None or any(f in entry for f in ENCRYPTED_FIELDS)
                    ):
                        entry = open_entry(entry, key, keyring)
                        cur.put(key, packb(keyring.seal(entry, key)))
                        count += 1
                    ok = cur.next()
            state["count"] += count
            if resume:
                state["next"] = resume
                return False
            return True

        self._submit_job(step)
        return state["count"]

    def rekey_all(self) -> dict[str, int]:
        """:meth:`rekey` every channel, then record that only the active key is in use
        (from then on the older keys may be removed from the key file)."""
        counts = {name: self.rekey(name) for name in self.channels()}
        assert self._keyring is not None
        active = self._keyring.active

        def record() -> bool:
            with self._env.begin(write=True) as txn:
                txn.put(b"encryption", packb([active]), db=self._meta)
            return True

        self._submit_job(record)
        return counts

    def compact_all(self) -> dict[str, int]:
        """Compact every channel; stops between channels (and steps) when closing."""
        return self._compaction.compact_all()

    def reset_channel(self, channel: str) -> int:
        """Drop a channel's log and give it a new epoch (an operator's last resort, e.g.
        after restoring a damaged backup). Clients holding positions get a resync."""
        result: dict[str, int] = {}

        def step() -> bool:
            with self._env.begin(write=True) as txn:
                rec = self._channel_record(txn, channel)
                if rec is None:
                    return True
                prefix = U64.pack(rec["id"])
                for db in (
                    self._log, self._messages, self._edit_links, self._tombstones
                ):  # fmt: skip
                    cur = txn.cursor(db=db)
                    if cur.set_range(prefix):
                        while cur.key().startswith(prefix) and cur.delete():
                            pass
                raw = txn.get(b"next_channel_id", db=self._meta)
                new_id = 1 if raw is None else U64.unpack(raw)[0]
                txn.put(b"next_channel_id", U64.pack(new_id + 1), db=self._meta)
                new = new_channel_record(self.store_id, new_id)
                txn.put(channel.encode(), packb(new), db=self._channels)
                result["epoch"] = new["epoch"]
            self._chan_ids[channel] = new_id  # committed: the old id's cids no longer match
            return True

        self._submit_job(step)
        return result.get("epoch", 0)

    # ---------------------------------------------------------------- restore

    def restore_begin(self) -> None:
        """An export is loaded only into a store that has never been written to."""
        with self._read() as txn:
            used = any(
                txn.stat(db)["entries"] for db in (self._channels, self._members, self._seen)
            )
        if used:
            raise ValueError(f"restore target {self.path} is not empty")

    def restore_channel(self, dump: ChannelDump, new_epoch: bool) -> ChannelDump:
        """Load one exported channel (absent from this store) in one transaction, under a
        new internal id; with ``new_epoch`` as a new log (its own epoch and id prefix),
        else with the export's epoch and message ids. Returns what was loaded."""
        loaded: list[ChannelDump] = []

        def step() -> bool:
            with self._env.begin(write=True) as txn:
                done, chan_id, cids = self._restore_channel(txn, dump, new_epoch)
            for dkey, seq in cids:  # committed: the in-memory dedup map learns them
                self._ring.insert(dkey, seq)
            self._next_order += len(cids)
            self._chan_ids[dump.name] = chan_id
            loaded[:] = [done]
            return True

        self._submit_job(step)
        return loaded[0]

    def _restore_channel(
        self, txn: lmdb.Transaction, dump: ChannelDump, new_epoch: bool
    ) -> tuple[ChannelDump, int, list[tuple[bytes, int]]]:
        name = _check_name("channel", dump.name, MAX_CHANNEL_BYTES)
        if txn.get(name, db=self._channels) is not None:
            raise ValueError(f"channel {dump.name!r} is in the export twice")
        raw = txn.get(b"next_channel_id", db=self._meta)
        chan_id = 1 if raw is None else U64.unpack(raw)[0]
        txn.put(b"next_channel_id", U64.pack(chan_id + 1), db=self._meta)
        rec: dict[str, Any] = dict(new_channel_record(self.store_id, chan_id))
        if new_epoch:
            dump = with_prefix(dump, rec["epoch"], record_prefix(rec))
        else:
            rec.update(epoch=dump.epoch, prefix=dump.prefix)
        changes = [e["seq"] for e in dump.entries if e["kind"] != "message"]
        # The next compaction pass looks at every edit and delete entry the export has.
        compacted = min(dump.horizon, min(changes, default=dump.horizon + 1) - 1)
        rec.update(head=dump.head, horizon=dump.horizon, compacted=compacted)
        txn.put(name, packb(rec), db=self._channels)
        prefix = U64.pack(chan_id)
        for entry in dump.entries:
            key = prefix + U64.pack(entry["seq"])
            txn.put(key, self._pack(key, entry), db=self._log)
            if entry["kind"] == "message":
                txn.put(key, b"", db=self._messages)
        for mseq, edits in edit_chains(dump).items():
            for seq in edits:
                self._link_edit(txn, prefix + U64.pack(mseq), seq)
        for seq, ts in dump.tombstones.items():
            txn.put(prefix + U64.pack(seq), U64.pack(ts), db=self._tombstones)
        for user, seq in dump.cursors.items():
            txn.put(self._cursor_key(user, chan_id), U64.pack(seq), db=self._cursors)
        cids = [(dedup_key(chan_id, s, cid), seq) for s, cid, seq, _ in dump.dedup]
        journal = [
            (U64.pack(self._next_order + i), packb([dkey, seq, row[3]]))
            for i, ((dkey, seq), row) in enumerate(zip(cids, dump.dedup, strict=True))
        ]
        txn.cursor(db=self._dedup).putmulti(journal, append=True)
        return dump, chan_id, cids

    def restore_users(self, users: list[UserDump]) -> None:
        def step() -> bool:
            with self._env.begin(write=True) as txn:
                for u in users:
                    user = _check_name("user", u.user, MAX_USER_BYTES)
                    for channel in u.channels:
                        key = user + b"\0" + _check_name("channel", channel, MAX_CHANNEL_BYTES)
                        txn.put(key, b"", db=self._members)
                    if u.last_seen is not None:
                        txn.put(user, U64.pack(u.last_seen), db=self._seen)
            return True

        self._submit_job(step)

    def restore_end(self) -> None:
        """Nothing to mark: an LMDB restore is written to a new directory that is renamed
        into place once complete (``tsmsg restore``). The dedup journal, written one
        channel after another, is put back in the cids' age order (their ts, then as
        exported), keeping the newest ``dedup_max``: the newest cids are remembered and
        pruning goes oldest first, as in the exported store (STORAGE.md, Dedup)."""

        def step() -> bool:
            with self._env.begin(write=True) as txn:
                rows = enumerate(unpackb(v) for _, v in txn.cursor(db=self._dedup))
                newest = heapq.nlargest(self.config.dedup_max, rows, key=lambda r: (r[1][2], r[0]))
                newest.reverse()
                txn.drop(self._dedup, delete=False)
                journal = [(U64.pack(i), packb(row)) for i, (_, row) in enumerate(newest)]
                txn.cursor(db=self._dedup).putmulti(journal, append=True)
            ring = DedupRing(self.config.dedup_max, MAX_DEDUP_KEY)
            for _, (dkey, seq, _ts) in newest:
                ring.insert(dkey, seq)
            self._ring, self._next_order = ring, len(newest)
            return True

        self._submit_job(step)

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._compaction.stop()
        self._queue.put(_Stop())
        self._writer.join()
        self._stop_syncer.set()
        if self._syncer is not None:
            self._syncer.join()
        # Whatever raced close() into the queue after the stop is failed, never left waiting.
        closed = StoreUnavailable("store is closed")
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                for op in item:
                    op.error = closed
                self._ack(list(item), {})
            elif isinstance(item, _Job):
                item.error = closed
                item.done.set()
        self._env.sync(True)
        self._env.close()
        if self._lock_fd is not None:  # the directory is free for the next opener
            os.close(self._lock_fd)
            self._lock_fd = None


# ======================================================================================
# Read-only access for operator tools (`tsmsg inspect`, `tsmsg backup`).
#
# Nothing below writes: the environment is opened with MDB_RDONLY (only the reader table
# in lock.mdb is touched, as every LMDB reader does), no format key is written and no
# writer thread runs, so these run beside a live server in another process. LMDB forbids
# opening one environment twice in one process: never use a reader on a directory that
# an LmdbStore of the same process has open.

_NAMED_DBS = (
    "meta",
    "channels",
    "log",
    "messages",
    "edit_links",
    "edits",  # format 1
    "tombstones",
    "cursors",
    "dedup",
    "members",
    "last_seen",
)


@dataclass(frozen=True, slots=True)
class ChannelStats:
    name: str
    id: int  # the internal id that prefixes the channel's log keys
    head: int
    horizon: int
    epoch: int
    entries: int  # log entries present (compaction and retention remove some)
    bytes: int  # their keys plus packed values: roughly the channel's share of the file


@dataclass(frozen=True, slots=True)
class EnvStats:
    format: int | None  # None: a fresh environment no store has initialized
    map_size: int
    page_size: int
    used_pages: int  # high-water mark (last page + 1): the size the file needs
    live_pages: int  # pages of the B-trees; the rest of used_pages is free for reuse
    cursor_users: int  # users with at least one read cursor
    cursors: int
    dedup_entries: int  # rows in the dedup journal
    members: int  # (user, channel) membership rows
    channels: list[ChannelStats]
    encryption: tuple[str, ...] = ()  # key ids entries may be encrypted with (meta)

    @property
    def used_bytes(self) -> int:
        return self.used_pages * self.page_size

    @property
    def live_bytes(self) -> int:
        return self.live_pages * self.page_size


class LmdbReader:
    """A read-only view of an existing data directory. Raises :class:`FormatError` for
    a directory that is not a tsmsg environment of this format version."""

    def __init__(
        self, path: str | os.PathLike[str], *, lock: bool = True, keyring: Keyring | None = None
    ) -> None:
        self.path = os.fspath(path)
        self.keyring = keyring  # decrypts entries in tail(); without it they keep `enc`
        check_data_file(self.path)  # a cut-short file would SIGBUS when mapped
        try:
            self._env = lmdb.open(
                self.path,
                readonly=True,
                create=False,
                lock=lock,
                max_dbs=12,
                readahead=False,
                max_readers=256,
            )
        except (lmdb.InvalidError, lmdb.VersionMismatchError) as exc:
            raise FormatError(f"data directory {self.path!r} is not usable: {exc}") from None
        try:
            self._env.set_mapsize(0)  # adopt the writer's map size: it may have grown
            self._dbs: dict[str, Any] = {}
            for name in _NAMED_DBS:
                try:
                    self._dbs[name] = self._env.open_db(name.encode(), create=False)
                except lmdb.NotFoundError:
                    pass  # added later within the format (STORAGE.md): empty
                except lmdb.Error as exc:
                    raise FormatError(
                        f"data directory {self.path!r} is not a tsmsg data directory: {exc}"
                    ) from None
            if "meta" not in self._dbs:
                raise FormatError(
                    f"data directory {self.path!r} is not a tsmsg data directory (no meta database)"
                )
            with self.snapshot() as txn:
                self.format = self._check_format(txn)
                raw = txn.get(b"encryption", db=self._dbs["meta"])
                self.encryption: tuple[str, ...] = () if raw is None else tuple(unpackb(raw))
        except BaseException:
            self._env.close()
            raise

    def _check_format(self, txn: lmdb.Transaction) -> int | None:
        raw = txn.get(b"format", db=self._dbs["meta"])
        has_data = bool(self._count(txn, "log") or self._count(txn, "channels"))
        return check_format(self.path, None if raw is None else bytes(raw), has_data)

    def _count(self, txn: lmdb.Transaction, name: str) -> int:
        db = self._dbs.get(name)
        return 0 if db is None else int(txn.stat(db)["entries"])

    @contextmanager
    def snapshot(self) -> Iterator[lmdb.Transaction]:
        """A read transaction (values are memoryviews, valid only inside it)."""
        for attempt in range(3):
            try:
                txn = self._env.begin(buffers=True)
                break
            except lmdb.MapResizedError:  # the writer grew the map since we mapped it
                if attempt == 2:
                    raise
                self._env.set_mapsize(0)
        try:
            yield txn
        finally:
            txn.abort()

    def _records(self, txn: lmdb.Transaction) -> dict[str, dict[str, int]]:
        db = self._dbs.get("channels")
        if db is None:
            return {}
        return {bytes(k).decode(): unpackb(v) for k, v in txn.cursor(db=db)}

    def stats(self, txn: lmdb.Transaction | None = None) -> EnvStats:
        """Environment and per-channel figures, from one snapshot (``txn`` if given).
        Counting a channel's entries and bytes scans the whole log once."""
        if txn is None:
            with self.snapshot() as own:
                return self.stats(own)
        records = self._records(txn)
        counts: dict[int, list[int]] = {rec["id"]: [0, 0] for rec in records.values()}
        if "log" in self._dbs:
            for key, value in txn.cursor(db=self._dbs["log"]):
                chan_id = U64.unpack(key[:8])[0]
                acc = counts.setdefault(chan_id, [0, 0])
                acc[0] += 1
                acc[1] += len(key) + len(value)
        users: set[bytes] = set()
        if "cursors" in self._dbs:
            for key in txn.cursor(db=self._dbs["cursors"]).iternext(values=False):
                users.add(bytes(key[: len(key) - 9]))  # user + NUL + u64 channel id
        info, env_stat = self._env.info(), self._env.stat()
        live = sum(
            txn.stat(db)[k]
            for db in self._dbs.values()
            for k in ("branch_pages", "leaf_pages", "overflow_pages")
        )
        live += env_stat["branch_pages"] + env_stat["leaf_pages"] + env_stat["overflow_pages"]
        channels = [
            ChannelStats(
                name, rec["id"], rec["head"], rec["horizon"], rec["epoch"], *counts[rec["id"]]
            )
            for name, rec in records.items()
        ]
        return EnvStats(
            format=self.format,
            map_size=int(info["map_size"]),
            page_size=int(env_stat["psize"]),
            used_pages=int(info["last_pgno"]) + 1,
            live_pages=int(live),
            cursor_users=len(users),
            cursors=self._count(txn, "cursors"),
            dedup_entries=self._count(txn, "dedup"),
            members=self._count(txn, "members"),
            channels=channels,
            encryption=self.encryption,
        )

    def channel(self, name: str) -> ChannelInfo | None:
        with self.snapshot() as txn:
            rec = self._records(txn).get(name)
        return None if rec is None else ChannelInfo(name, rec["head"], rec["horizon"], rec["epoch"])

    def tail(self, channel: str, n: int) -> tuple[ChannelInfo | None, list[Entry], dict[str, int]]:
        """The channel's info, its last ``n`` log entries (oldest first) and its read
        cursors (user → seq), from one snapshot; (None, [], {}) for an unknown channel."""
        with self.snapshot() as txn:
            rec = self._records(txn).get(channel)
            if rec is None:
                return None, [], {}
            info = ChannelInfo(channel, rec["head"], rec["horizon"], rec["epoch"])
            prefix = U64.pack(rec["id"])
            entries: list[Entry] = []
            cur = txn.cursor(db=self._dbs["log"]) if "log" in self._dbs else None
            if cur is not None and n > 0:
                positioned = cur.prev() if cur.set_range(U64.pack(rec["id"] + 1)) else cur.last()
                for key, value in cur.iterprev() if positioned else ():
                    if bytes(key[:8]) != prefix or len(entries) >= n:
                        break
                    entry = unpackb(value)
                    if "enc" in entry and self.keyring is not None:
                        entry = open_entry(entry, bytes(key), self.keyring)
                    entries.append(entry)
            entries.reverse()
            cursors: dict[str, int] = {}
            if "cursors" in self._dbs:
                suffix = b"\0" + prefix
                for key, value in txn.cursor(db=self._dbs["cursors"]):
                    key = bytes(key)
                    if key.endswith(suffix):
                        cursors[key[: -len(suffix)].decode()] = U64.unpack(value)[0]
        return info, entries, cursors

    def export(self) -> Iterator[ChannelDump | UserDump]:
        """Every channel, then every user, all from one read transaction: the export is
        the state of one moment, also while a server writes (STORAGE.md, "Exports").
        Encrypted text is decrypted with the reader's key ring; without one, an encrypted
        entry fails the export (an export holds plaintext)."""
        with self.snapshot() as txn:
            cursors: dict[int, dict[str, int]] = collections.defaultdict(dict)
            for key, value in self._rows(txn, "cursors"):
                user, chan = key[:-9].decode(), U64.unpack(key[-8:])[0]
                cursors[chan][user] = U64.unpack(value)[0]
            dedup: dict[int, list[tuple[str, str, int, int]]] = collections.defaultdict(list)
            for _, value in self._rows(txn, "dedup"):
                dkey, seq, ts = unpackb(value)
                sender, _, cid = dkey[8:].partition(b"\0")
                dedup[U64.unpack(dkey[:8])[0]].append((sender.decode(), cid.decode(), seq, ts))
            for name, rec in self._records(txn).items():
                chan_id = rec["id"]
                prefix = U64.pack(chan_id)
                entries = [self._plain(key, v) for key, v in self._rows(txn, "log", prefix)]
                tombs = self._rows(txn, "tombstones", prefix)
                yield ChannelDump(
                    name, rec["epoch"], record_prefix(rec), rec["head"], rec["horizon"],
                    entries, {U64.unpack(k[8:])[0]: U64.unpack(v)[0] for k, v in tombs},
                    cursors.get(chan_id, {}), dedup.get(chan_id, []),
                )  # fmt: skip
            seen = {k.decode(): U64.unpack(v)[0] for k, v in self._rows(txn, "last_seen")}
            members: dict[str, list[str]] = collections.defaultdict(list)
            for key, _ in self._rows(txn, "members"):
                who, _, channel = key.partition(b"\0")
                members[who.decode()].append(channel.decode())
            for user in sorted(members.keys() | seen.keys()):
                yield UserDump(user, members.get(user, []), seen.get(user))

    def _rows(
        self, txn: lmdb.Transaction, db: str, prefix: bytes = b""
    ) -> list[tuple[bytes, bytes]]:
        """The rows of a named database (those whose key starts with ``prefix``), copied."""
        handle = self._dbs.get(db)
        if handle is None:
            return []
        cur = txn.cursor(db=handle)
        out: list[tuple[bytes, bytes]] = []
        if cur.set_range(prefix):
            for key, value in cur:
                if not bytes(key[: len(prefix)]) == prefix:
                    break
                out.append((bytes(key), bytes(value)))
        return out

    def _plain(self, key: bytes, raw: bytes) -> Entry:
        entry = LmdbStore._decode(key, raw)
        if "enc" not in entry:
            return entry
        if self.keyring is None:
            raise EncryptionError(
                f"data directory {self.path!r} holds encrypted text: pass "
                "--encryption-key-file to export it (an export holds plaintext)"
            )
        return open_entry(entry, key, self.keyring)

    def backup(self, dest: str | os.PathLike[str]) -> EnvStats:
        """Copy a consistent snapshot, compacted (free pages omitted, pages renumbered),
        into the existing empty directory ``dest`` as ``data.mdb``, and fsync it.
        Returns the figures of exactly the snapshot that was copied."""
        dest = os.fspath(dest)
        with self.snapshot() as txn:
            self._env.copy(dest, compact=True, txn=txn)
            stats = self.stats(txn)
        fd = os.open(os.path.join(dest, "data.mdb"), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fd = os.open(dest, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return stats

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> LmdbReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
