"""The Redis backend of :class:`~tsmsg.store.base.Store` (redis-py with hiredis).

The same answers as :class:`~tsmsg.store.lmdb_store.LmdbStore` (the contract tests and
the model test run on both), kept in Redis so that several tsmsg nodes can share them.
The key layout and the promises of each Redis configuration are in STORAGE.md, "Redis
engine"; the Lua scripts are in :mod:`tsmsg.store.redis_scripts`.

Writes: one writer thread with group commit, as LMDB's. It takes every pending write (up
to ``max_batch``), sends one pipeline of script calls (one script per write: each is
atomic on its channel's slot), and only when Redis answered all of them (and, with
``wait_replicas``, WAIT confirmed the replicas) sets the results and calls ``notify``.
A lost connection fails the whole batch with ``store_unavailable`` (nothing is
acknowledged; a script that ran although its reply was lost is harmless: a retried send is
answered by its cid). The writer probes Redis until it answers again, so writes recover by
themselves; :meth:`RedisStore.health` reports the outage meanwhile.

Fan-out between nodes (:mod:`tsmsg.store.redis_fanout`): after acknowledging a batch the
writer publishes its new entries (and moved read cursors, as ``read`` signals) in one more
pipeline; a pub/sub thread follows the channels this node has members in and hands what
other nodes published to the ``remote`` hook.

Reads are plain blocking calls, safe from any thread (a connection pool); the server runs
them in worker threads, never on the trio thread.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import queue
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from tsmsg._native import packb, unpackb
from tsmsg.protocol.limits import MAX_CID_CHARS
from tsmsg.store.base import (
    MAX_CHANNEL_BYTES,
    MAX_USER_BYTES,
    AppendResult,
    BackgroundCompaction,
    ChannelInfo,
    Entry,
    Forbidden,
    HistoryPage,
    NotFound,
    Notify,
    RateLimited,
    Remote,
    SendLimits,
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
from tsmsg.store.export import ChannelDump, UserDump, edit_chains, with_prefix
from tsmsg.store.lmdb_store import (
    StoreConfig,
    _check_name,
    check_edits,
    now_ms,
    parse_message_id,
)
from tsmsg.store.redis_fanout import (
    FanoutStats,
    Subscriber,
    entries_message,
    publish_all,
    signal_message,
)
from tsmsg.store.redis_presence import PRESENCE_TTL_S, RedisPresence
from tsmsg.store.redis_scripts import FUNCTIONS, LIBRARY, LIBRARY_NAME, fcall, function_missing

log = logging.getLogger("tsmsg.store")

# Bounds of the work one script call does, so that no call blocks a Redis shard for long
# (a script runs alone on its shard).
COMPACT_CHUNK = 1024  # entries one compaction step drops or looks at
SYNC_CHUNK = 256  # entries one sync call fetches; a page of more takes several calls
HISTORY_CHUNK = 256  # messages one history call fetches
CHARGED_KINDS = ("message", "edit", "delete")  # the writes the send limits count
UNREAD_CHUNK = 1024  # messages one unread-count call looks at
DEDUP_PRUNE_PER_WRITE = 4  # old cids one append may forget: more than the one it adds
SEND_RATE_RUNS_MAX = 128  # runs of sends charged by one send_rate call
APPEND_RUN_MAX = 128  # messages to one channel stored by one script call (about 1 ms of Redis)
PUBLISH_ENTRIES_MAX = 128  # entries of one channel's log published in one pub/sub message
EXPORT_CHUNK = 1024  # log entries one export script call reads
EXPORT_RETRIES = 5  # times a channel's export starts again because a write moved its head
TAIL_MAX = 10_000  # entries `inspect --tail` reads in one script call
SCAN_COUNT = 1000  # keys per SCAN/HSCAN call (exports, inspect, the restore target check)
RESTORE_PIPELINE = 1024  # commands per pipeline while loading an export

# Connections.
CONNECT_TIMEOUT_S = 5.0  # a TCP connect to Redis that takes longer has failed
SOCKET_TIMEOUT_S = 10.0  # a reply later than this is a dead connection (scripts are short)
RECONNECT_INTERVAL_S = 0.5  # while Redis is down, the writer probes it this often
HEALTH_CHECK_S = 1.0  # an idle writer pings Redis this often (/readyz sees an outage)
MAX_CONNECTIONS = 64  # per store: the writer, the compactor, and the server's read threads
POOL_WAIT_S = 10.0  # a read waits this long for a free connection before failing
DEFAULT_WAIT_TIMEOUT_MS = 1000  # WAIT for replicas: longer means a replica is not keeping up
WAIT_MARK = b"wait"  # the key each batch writes before WAIT (_pipeline)
KEY_CACHE_SIZE = 4096  # channels whose key names are kept built (a dict, cleared when full)
EPOCH_BITS = 62  # epochs are random positive ints below 2**62: never reused in practice
KEY_PREFIX_CHARS = re.compile(r"[A-Za-z0-9_.:-]{0,64}")  # no hash tag braces, no globs

TOPIC_SUFFIX = b"fan"  # a channel's pub/sub topic: {c:<channel>}:fan, in the channel's slot
# The keys of one channel, all under one hash tag; their order is the scripts' KEYS.
CHANNEL_SUFFIXES = (b"meta", b"log", b"msgs", b"chg", b"tomb", b"idx", b"dd", b"dq", b"rc")
_P_TS = packb("ts")
_P_SENDER = packb("sender")
_P_TEXT = packb("text")
_P_META = packb("meta")
_P_ID = packb("id")
_P_EDITED = packb("edited")
# The order of an entry's fields as the scripts write them (ts third: compaction reads it
# at a known place); a restored entry is packed in this order too.
ENTRY_ORDER = ("seq", "kind", "ts", "id", "sender", "text", "meta", "edited", "deleted")
BASE_FIELDS = 5  # the leading fields the scripts keep as an entry's base (idx b<seq>)
RESTORING = b"restoring"  # a key (after the prefix) set while an export is being loaded


@dataclass(frozen=True, slots=True)
class RedisChannelStats:
    """A channel's figures for `tsmsg inspect` (LMDB's ChannelStats, without the id)."""

    name: str
    head: int
    horizon: int
    epoch: int
    entries: int  # log entries present
    bytes: int  # Redis's MEMORY USAGE estimate of the log hash (sampled)
    cursors: int
    dedup_entries: int


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where the engine URL points: one Redis (``redis://``, ``rediss://``) or a cluster."""

    url: str  # for redis-py (one Redis); the seed list for a cluster
    cluster: bool
    nodes: tuple[tuple[str, int], ...]  # (host, port): the server, or the cluster's seeds
    password: str | None
    username: str | None

    @property
    def where(self) -> str:
        return ",".join(f"{h}:{p}" for h, p in self.nodes)


def is_redis_url(engine: str) -> bool:
    return engine.split("://", 1)[0] in ("redis", "rediss", "redis-cluster")


def parse_redis_url(url: str) -> RedisTarget:
    """``redis://[[user]:password@]HOST:PORT[/DB]``, ``rediss://...`` (TLS), or
    ``redis-cluster://[[user]:password@]HOST:PORT[,HOST:PORT...]`` (seed nodes)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis", "rediss", "redis-cluster"):
        raise ValueError(
            f"engine must be lmdb, redis://HOST:PORT[/DB], rediss://... or "
            f"redis-cluster://HOST:PORT[,HOST:PORT...], not {url!r}"
        )
    creds, at, hosts = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = creds.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(pw) if colon else None
    hosts, _, query = hosts.partition("?")
    # redis-py takes the query's keys as connection arguments (a typo: a traceback): only
    # its TLS options (rediss://...?ssl_ca_certs=PATH, a private CA) are let through.
    for key in urllib.parse.parse_qs(query, keep_blank_values=True):
        if not key.startswith("ssl_"):
            raise ValueError(
                f"engine URL takes no ?{key} (only TLS options ssl_*, such as "
                f"ssl_ca_certs=PATH, with rediss://): {url!r}"
            )
    hosts, _, db = hosts.partition("/")
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        host, colon, port = part.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad Redis address {part!r} in engine URL: HOST:PORT expected")
        nodes.append((host.strip("[]"), int(port)))
    cluster = scheme == "redis-cluster"
    if not cluster and len(nodes) != 1:
        raise ValueError(f"{scheme}:// takes one HOST:PORT (a cluster: redis-cluster://)")
    if db and (cluster or not db.isdigit()):
        raise ValueError(f"bad database {db!r} in engine URL (a number, one Redis only)")
    return RedisTarget(url, cluster, tuple(nodes), password, username)


def new_epoch() -> int:
    return secrets.randbits(EPOCH_BITS) or 1


class _Stop:
    pass


class _Moved(Exception):
    """A channel changed between two steps of its export: read it again."""


@dataclass(slots=True)
class _Call:
    """What one command of a batch's pipeline carries: one write, or a run of messages to
    one channel (one ``append`` call); and its arguments (a message's own, until
    ``_calls`` groups it into a run)."""

    ops: list[WriteOp]
    args: tuple[Any, ...] | list[Any]


class RedisStore(Store):
    def __init__(
        self,
        url: str,
        config: StoreConfig | None = None,
        notify: Notify | None = None,
        clock: Callable[[], int] = now_ms,
        fault: Callable[[], None] | None = None,
        observer: StoreObserver | None = None,
        *,
        password_file: str | None = None,
        wait_replicas: int = 0,
        presence_ttl_s: float = PRESENCE_TTL_S,
        send_limits: SendLimits | None = None,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
        key_prefix: str = "tsmsg:",
        epochs: Callable[[], int] = new_epoch,
        remote: Remote | None = None,
    ) -> None:
        config = config or StoreConfig()
        if config.encryption is not None:
            raise ValueError("encryption at rest is not supported by the Redis engine yet")
        if not KEY_PREFIX_CHARS.fullmatch(key_prefix):
            raise ValueError(
                f"key prefix must be up to 64 of A-Z a-z 0-9 _ . : -, not {key_prefix!r}"
            )
        if wait_replicas < 0:
            raise ValueError(f"wait_replicas must be 0 or more, not {wait_replicas}")
        self.config = config
        self.target = parse_redis_url(url)
        if wait_replicas and self.target.cluster:
            raise ValueError("wait_replicas is not supported with redis-cluster:// yet")
        self._wait = (wait_replicas, wait_timeout_ms)
        self._send_limits = send_limits  # enforced across nodes, in Redis
        self._notify = notify
        self._clock = clock
        self._fault = fault  # test hook: called before each batch and compaction step
        self._observer = observer
        self._epochs = epochs
        self._prefix = key_prefix.encode()
        self._registry = self._prefix + b"channels"  # names of channels (one slot of its own)
        # New channels whose registration failed: sent again with the next batch (writer).
        self._unregistered: set[str] = set()
        self._key_cache: dict[str, tuple[bytes, ...]] = {}
        self._restored: list[str] = []  # channels a restore loaded (registered at its end)
        password = self.target.password
        if password_file is not None:
            with open(password_file, encoding="utf-8") as f:
                password = f.read().strip()
        self._closed = False
        self._client = self._connect(password)  # reads, compaction, scripts
        self._wclient = self._connect(password, retry=False)  # the writer's pipelines
        try:
            self._client.ping()
            self._load_library()
        except RedisError as exc:
            self._client.close()
            self._wclient.close()
            raise StoreUnavailable(
                f"cannot reach Redis at {self.target.where}: {exc or type(exc).__name__}"
            ) from None
        self._check_config()
        if self._client.exists(self._prefix + RESTORING):
            self._client.close()
            self._wclient.close()
            raise ValueError(
                f"a tsmsg restore into Redis {self.target.where} (key prefix "
                f"{key_prefix!r}) did not finish: delete the prefix's keys and restore again"
            )
        self.fanout = FanoutStats()
        self._subscriber = Subscriber(
            self._connect(password, retry=False),
            self.target.cluster,
            self._topic,
            remote,
            self.fanout,
        )
        self._publish_command = self._subscriber.publish_command
        self.presence = RedisPresence(self, self._subscriber.node, presence_ttl_s)
        self.down: str | None = None  # why writes fail now (Redis unreachable), if they do
        self._inflight = 0  # calls from callers' threads now using a connection
        self._inflight_changed = threading.Condition()
        self._waiting: collections.deque[float] = collections.deque()
        self._queue: queue.SimpleQueue[tuple[WriteOp, ...] | _Stop] = queue.SimpleQueue()
        self._writer = threading.Thread(
            target=self._run_writer, name="tsmsg-redis-writer", daemon=True
        )
        self._writer.start()
        self._compaction = BackgroundCompaction(self, config.compaction.interval_s)

    def __str__(self) -> str:
        return f"redis {self.target.where}"

    # ---------------------------------------------------------------- connection

    def _connect(self, password: str | None, *, retry: bool = True) -> Any:
        """A client with its own connection pool. Without ``retry`` a command that lost
        its connection is never sent again by redis-py: the writer's pipelines, where
        a resent edit or delete would be applied twice (the writer fails the batch
        instead, and the sender retries knowingly)."""
        t = self.target
        common: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "socket_timeout": SOCKET_TIMEOUT_S,
        }
        if not retry:
            common["retry"] = Retry(NoBackoff(), 0)
        if password is not None:
            common["password"] = password
        if t.username is not None:
            common["username"] = t.username
        if t.cluster:
            return redis.cluster.RedisCluster(
                startup_nodes=[
                    redis.cluster.ClusterNode(h, p)  # type: ignore[no-untyped-call]
                    for h, p in t.nodes
                ],
                max_connections=MAX_CONNECTIONS,
                **common,
            )
        pool = redis.BlockingConnectionPool.from_url(
            t.url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_S, **common
        )
        return redis.Redis.from_pool(pool)  # owns its pool: close() disconnects it

    def _load_library(self, client: Any = None) -> None:
        """Load the scripts' function library on every primary that lacks it (a replica
        gets it from its primary), as ``client`` (default: the store's) knows them: the
        client a call failed on, whose map of the cluster has the primary that failed it.
        Only where it is missing: a load is a write (refused over maxmemory, appended to
        the AOF, sent to replicas), a look a read."""
        for node in self._primaries(client):
            if not node.function_list(library=LIBRARY_NAME):
                node.function_load(LIBRARY, replace=True)  # another node may be loading it
                where = node.get_connection_kwargs()
                log.info(
                    "loaded the function library %s on Redis %s:%s",
                    LIBRARY_NAME, where.get("host"), where.get("port"),
                )  # fmt: skip

    def _primaries(self, client: Any = None) -> list[Any]:
        """One client per primary (one Redis: itself)."""
        client = client or self._client
        if not self.target.cluster:
            return [client]
        return [client.get_redis_connection(n) for n in client.get_primaries()]

    def _check_config(self) -> None:
        """Warn when Redis is configured so that it may lose acknowledged writes."""
        for node in self._primaries():
            where = (
                node.get_connection_kwargs().get("host"),
                node.get_connection_kwargs().get("port"),
            )
            try:
                conf: dict[str, str] = {}
                for key in ("appendonly", "appendfsync", "maxmemory-policy"):
                    for k, v in node.config_get(key).items():
                        conf[_text(k)] = _text(v)
            except RedisError as exc:  # CONFIG renamed or not permitted
                log.info("cannot check Redis configuration of %s:%s: %s", *where, exc)
                continue
            if conf.get("appendonly") != "yes" or conf.get("appendfsync") != "always":
                log.warning(
                    "Redis %s:%s has appendonly %s, appendfsync %s: a crash of Redis can lose "
                    "acknowledged writes (set appendonly yes and appendfsync always; STORAGE.md)",
                    *where,
                    conf.get("appendonly"),
                    conf.get("appendfsync"),
                )
            if conf.get("maxmemory-policy", "noeviction").startswith("allkeys"):
                log.warning(
                    "Redis %s:%s has maxmemory-policy %s: evicted keys lose channel data "
                    "(set noeviction; STORAGE.md)",
                    *where,
                    conf.get("maxmemory-policy"),
                )

    def _keys(self, channel: str) -> tuple[bytes, ...]:
        keys = self._key_cache.get(channel)
        if keys is None:
            if len(self._key_cache) >= KEY_CACHE_SIZE:
                self._key_cache.clear()
            base = self._prefix + b"{c:" + channel.encode() + b"}:"
            keys = self._key_cache[channel] = tuple(base + suffix for suffix in CHANNEL_SUFFIXES)
        return keys

    def _topic(self, channel: str) -> bytes:
        """The channel's pub/sub topic: its hash tag, so a sharded one is on its slot."""
        return self._prefix + b"{c:" + channel.encode() + b"}:" + TOPIC_SUFFIX

    def _user_key(self, user: str, what: bytes) -> bytes:
        return self._prefix + b"{u:" + user.encode() + b"}:" + what

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """A call from a caller's thread: refused once closed; close() waits for it, so
        no connection is in use when the client is closed. Redis errors become
        StoreUnavailable."""
        with self._inflight_changed:
            if self._closed:
                raise StoreUnavailable("store is closed")
            self._inflight += 1
        try:
            yield
        except RedisError as exc:
            if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):  # the probe clears it
                self.down = f"Redis at {self.target.where} is unreachable: {exc}"
            raise StoreUnavailable(f"Redis at {self.target.where} failed: {exc}") from None
        finally:
            with self._inflight_changed:
                self._inflight -= 1
                self._inflight_changed.notify_all()

    def _eval(self, name: str, keys: Sequence[bytes], *args: Any) -> Any:
        """One script call from the caller's thread."""
        with self._using():
            try:
                return self._client.fcall(FUNCTIONS[name], len(keys), *keys, *args)
            except RedisError as exc:
                if not function_missing(exc):
                    raise
                self._load_library()  # Redis lost it (see function_missing)
                return self._client.fcall(FUNCTIONS[name], len(keys), *keys, *args)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._using():
            return fn(*args)

    # ---------------------------------------------------------------- reads

    def channel(self, name: str) -> ChannelInfo:
        epoch, head, horizon = self._call(
            self._client.hmget, self._keys(name)[0], "epoch", "head", "horizon"
        )
        if epoch is None:
            return ChannelInfo(name, 0, 0, 0)
        return ChannelInfo(name, int(head), int(horizon), int(epoch))

    def channels(self) -> list[str]:
        names = self._call(self._client.smembers, self._registry)
        return sorted(n.decode() for n in names)

    def sync(
        self,
        channel: str,
        since: int,
        limit: int,
        max_bytes: int | None = None,
        entry_overhead: int = 0,
    ) -> SyncPage:
        keys = self._keys(channel)
        reply = self._eval("sync", keys, since, min(limit, SYNC_CHUNK))
        if not reply[0]:
            return SyncPage([], False, 0, 0, resync=since != 0)
        first_epoch = reply[0]
        epoch, head, horizon = int(reply[0]), int(reply[1]), int(reply[2])
        if since < horizon or since > head:
            return SyncPage([], False, head, epoch, resync=True)
        entries: list[Entry] = []
        size = 0
        last = since
        while True:
            # A later call that finds the channel reset, or `last` compacted away, gets
            # no entries (or a nil one): the page ends there, and the next sync resyncs.
            if reply[0] != first_epoch:
                break
            for raw in reply[3:]:
                if raw is None:
                    return SyncPage(entries, last < head, head, epoch)
                size += len(raw) + entry_overhead
                if max_bytes is not None and entries and size > max_bytes:
                    return SyncPage(entries, True, head, epoch)
                entries.append(unpackb(raw))
                last += 1
            want = min(limit - len(entries), head - last, SYNC_CHUNK)
            if want <= 0 or len(reply) <= 3:
                break
            reply = self._eval("sync", keys, last, want)
        return SyncPage(entries, last < head, head, epoch)

    def history(
        self, channel: str, before: int | None, limit: int, max_bytes: int | None = None
    ) -> HistoryPage:
        keys = self._keys(channel)
        top = "" if before is None else before - 1
        out: list[Entry] = []
        size = 0
        while True:
            # One more than the page holds tells whether there is more; never a count
            # below 1, which ZREVRANGEBYSCORE would read as "all".
            want = max(1, min(limit - len(out) + 1, HISTORY_CHUNK))
            reply = self._eval("history", keys, top, want)
            for i in range(0, len(reply), 2):
                raw = reply[i + 1]
                size += len(raw)
                if len(out) >= limit or (max_bytes is not None and out and size > max_bytes):
                    out.reverse()
                    return HistoryPage(out, True)
                out.append(unpackb(raw))
            if len(reply) < 2 * want:
                out.reverse()
                return HistoryPage(out, False)
            top = int(reply[-2]) - 1

    def read_cursor(self, user: str, channel: str) -> int:
        return int(self._eval("cursor", self._keys(channel), user))

    def unread(self, user: str, channel: str, scan_max: int | None = None) -> int:
        keys = self._keys(channel)
        count = scanned = 0
        start: Any = ""
        while scan_max is None or scanned < scan_max:
            want = UNREAD_CHUNK if scan_max is None else min(UNREAD_CHUNK, scan_max - scanned)
            n, looked, start = self._eval("unread", keys, user, start, want)
            count += n
            scanned += looked
            if looked < want:
                break
        return count

    def is_member(self, user: str, channel: str) -> bool:
        return bool(self._call(self._client.sismember, self._user_key(user, b"ch"), channel))

    def channels_of(self, user: str, limit: int | None = None) -> list[str]:
        # A set of at most max_memberships names (the server's bound): read whole.
        names = self._call(self._client.smembers, self._user_key(user, b"ch"))
        return sorted(n.decode() for n in names)[:limit]

    def memberships_versioned(
        self, users: list[str], limit: int | None = None
    ) -> dict[str, tuple[list[str], int]]:
        # The version first: a change between the two reads shows as a version behind
        # the set (read again later), never as a set behind its version.
        commands: list[tuple[Any, ...]] = []
        for user in users:
            commands.append(("GET", self._user_key(user, b"mv")))
            commands.append(("SMEMBERS", self._user_key(user, b"ch")))
        with self._using():
            replies = self._pipeline(self._client, commands, False) if users else []
        out = {}
        for i, user in enumerate(users):
            version, names = replies[2 * i], replies[2 * i + 1]
            for reply in (version, names):
                if isinstance(reply, Exception):
                    raise StoreUnavailable(f"Redis at {self.target.where}: {reply}")
            out[user] = (sorted(n.decode() for n in names)[:limit], int(version or 0))
        return out

    def membership_versions(self, users: list[str]) -> dict[str, int]:
        commands = [("GET", self._user_key(user, b"mv")) for user in users]
        with self._using():
            replies = self._pipeline(self._client, commands, False) if users else []
        for reply in replies:
            if isinstance(reply, Exception):
                raise StoreUnavailable(f"Redis at {self.target.where}: {reply}")
        return {user: int(reply or 0) for user, reply in zip(users, replies, strict=True)}

    def last_seen(self, user: str) -> int | None:
        raw = self._call(self._client.get, self._user_key(user, b"seen"))
        return None if raw is None else int(raw)

    def lookup_dup(self, channel: str, sender: str, cid: str) -> AppendResult | None:
        reply = self._eval("dup", self._keys(channel), _dedup_key(sender, cid))
        if not reply:
            return None
        return _dup_result(channel, reply[0].decode(), int(reply[1]), reply[2])

    # ---------------------------------------------------------------- writes

    def submit(self, *ops: WriteOp) -> None:
        if self._closed:
            raise StoreUnavailable("store is closed")
        queue_writes(ops, self._waiting, self._queue)

    def health(self) -> tuple[str | None, float]:
        if self._closed:
            return "store is closed", 0.0
        return self.down, oldest_wait(self._waiting)

    def _run_writer(self) -> None:
        held: tuple[WriteOp, ...] | _Stop | None = None
        while True:
            item, held = held, None
            if item is None:
                try:
                    wait = RECONNECT_INTERVAL_S if self.down else HEALTH_CHECK_S
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    self._probe()
                    continue
            if isinstance(item, _Stop):
                return
            batch, held = self._take_batch(item)
            start = time.perf_counter()
            self._commit(batch)
            if self._observer is not None:
                self._observer.committed(len(batch), time.perf_counter() - start)
            messages = self._fanout_messages(batch)
            self._ack(batch)
            # After the ack: a node never delivers what this one has not acknowledged.
            publish_all(self._wclient, self._publish_command, messages, self.fanout)

    def _probe(self) -> None:
        """An idle writer's check: does Redis answer (again)?"""
        try:
            self._wclient.ping()
        except RedisError as exc:
            if self.down is None:
                log.error("Redis at %s does not answer: %s", self.target.where, exc)
            self.down = f"Redis at {self.target.where} is unreachable: {exc}"
            return
        if self.down is not None:
            log.warning("Redis at %s answers again: writes resume", self.target.where)
        self.down = None

    def _take_batch(
        self, ops: tuple[WriteOp, ...]
    ) -> tuple[list[WriteOp], tuple[WriteOp, ...] | _Stop | None]:
        """The next batch (:func:`~tsmsg.store.base.take_batch`), as LMDB's writer takes it."""
        return take_batch(ops, self._queue, self.config.max_batch, self.config.max_batch_bytes)

    def _commit(self, batch: list[WriteOp]) -> None:
        """Send the batch as one pipeline; set every op's result or error (and the epoch
        of the log each new entry went to, for the fan-out)."""
        ts = self._clock()
        writes: list[_Call] = []
        for op in batch:
            op.result, op.error, op.changed = None, None, False
            try:
                writes.append(_Call([op], self._command(op, ts)))
            except StoreError as exc:
                op.error = exc
            except Exception as exc:  # a malformed op fails alone, never its batch
                op.error = StoreError(f"invalid write: {exc}")
        if not writes:
            return
        created: list[str] = []
        calls: list[_Call] = []
        try:
            if self._fault is not None:
                self._fault()
            calls = self._calls(self._charge_sends(writes, ts), ts)
            replies = self._execute([c.args for c in calls]) if calls else []
        except Exception as exc:  # connection lost, timeout, cluster down, injected fault
            if isinstance(exc, RedisError):
                self.down = f"Redis at {self.target.where} is unreachable: {exc}"
            log.error("store commit of %d writes failed: %r", len(writes), exc)
            err = StoreUnavailable(f"store commit failed: {exc}")
            for w in writes:
                if w.ops[0].error is None:
                    w.ops[0].error = err
            # Outcome unknown: the appends may have run and created their channels (a
            # retry is then a dup, which creates nothing): register them all the same,
            # now if Redis answered (WAIT not confirmed), else with the next batch.
            created = [c.ops[0].channel for c in calls if c.ops[0].kind == "message"]
            if isinstance(exc, RedisError):
                self._unregistered.update(created)
                return
            replies = None
        if replies is not None:
            self.down = None
            for c, reply in zip(calls, replies, strict=True):
                try:
                    self._finish(c.ops, reply, ts, created)
                except StoreError as exc:
                    for op in c.ops:
                        op.result, op.error, op.changed = None, exc, False
        # The registry of names is in another slot: a second, idempotent step, redone
        # with the next batch's until it succeeds (only compact_all() and tools read it).
        unregistered = self._unregistered
        unregistered.update(created)
        if unregistered:
            try:
                self._wclient.sadd(self._registry, *unregistered)
                unregistered.clear()
            except RedisError as exc:
                log.error("could not record new channels %s: %s", sorted(unregistered), exc)

    def _charge_sends(self, writes: list[_Call], ts: int) -> list[_Call]:
        """The shared send limits (``send_limits``): a token per send, edit and delete
        from the user's buckets in Redis, for all of a batch in one pipeline (one more
        round trip), before the writes, in the batch's order: a run of a user's sends in
        one channel (a connection's pipelined sends arrive together) is charged at once,
        and one script call charges the runs whose keys share a slot (on one Redis: all,
        up to SEND_RATE_RUNS_MAX per call). A refused one fails with ``rate_limited``; the
        writes left to send are returned."""
        limits = self._send_limits
        if limits is None:
            return writes
        runs: list[tuple[str, str, list[WriteOp]]] = []
        for w in writes:
            op = w.ops[0]
            if op.kind not in CHARGED_KINDS:
                continue
            if runs and runs[-1][:2] == (op.user, op.channel):
                runs[-1][2].append(op)
            else:
                runs.append((op.user, op.channel, [op]))
        if not runs:
            return writes
        groups: dict[int, list[tuple[str, str, list[WriteOp]]]] = {}
        for r in runs:
            slot = key_slot(self._user_key(r[0], b"")) if self.target.cluster else 0
            groups.setdefault(slot, []).append(r)
        calls = [
            group[i : i + SEND_RATE_RUNS_MAX]
            for group in groups.values()
            for i in range(0, len(group), SEND_RATE_RUNS_MAX)
        ]
        fixed = (
            ts,
            repr(limits.rate),
            limits.burst,
            repr(limits.channel_rate),
            limits.channel_burst,
        )
        commands = []
        for call in calls:
            keys: list[bytes] = []
            for user, channel, _ in call:
                keys += (
                    self._user_key(user, b"rate"),
                    self._user_key(user, b"rate:c:" + channel.encode()),
                )
            commands.append(fcall("send_rate", keys, *fixed, *(len(r[2]) for r in call)))
        for call, reply in zip(calls, self._execute(commands, wait=False), strict=True):
            if isinstance(reply, Exception):
                raise reply
            for i, (user, _, sends) in enumerate(call):
                granted, wait = int(reply[2 * i]), int(reply[2 * i + 1])
                for refused in sends[granted:]:
                    refused.error = RateLimited(
                        f"over the send rate of {user!r} (all nodes): retry in {wait} ms",
                        retry_after_ms=wait,
                    )
        return [w for w in writes if w.ops[0].error is None]

    def _calls(self, writes: list[_Call], ts: int) -> list[_Call]:
        """The batch's commands, in its order: consecutive messages to one channel go in
        one ``append`` call (up to ``APPEND_RUN_MAX``), every other write alone."""
        calls: list[_Call] = []
        for w in writes:
            op = w.ops[0]
            if op.kind != "message":
                calls.append(w)
                continue
            run = calls[-1] if calls else None
            if (
                run is not None
                and run.ops[0].kind == "message"
                and run.ops[-1].channel == op.channel
                and len(run.ops) < APPEND_RUN_MAX
            ):
                assert isinstance(run.args, list)  # a run's items, packed below
                run.ops.append(op)
                run.args.extend(w.args)
            else:
                calls.append(_Call([op], list(w.args)))
        policy = self.config
        for call in calls:
            if call.ops[0].kind == "message":
                call.args = fcall(
                    "append", self._keys(call.ops[0].channel),
                    self._epochs(), _P_TS + packb(ts), ts, policy.dedup_max,
                    ts - policy.dedup_retention_ms, DEDUP_PRUNE_PER_WRITE, _lua_strings(call.args),
                )  # fmt: skip
        return calls

    def _execute(
        self, commands: Sequence[Sequence[Any]], *, wait: bool = True, client: Any = None
    ) -> list[Any]:
        """One pipeline (on the writer's client unless ``client`` is given); WAIT at its
        end when replicas must confirm (and ``wait``). Each command's error is its reply.
        Commands whose function Redis did not have (``function_missing``) are sent again
        once the library is loaded, in their order, with every command after the first of
        them that calls no function (SET, ZADD: idempotent, their first replies
        stand): so those are applied after the calls they followed (a leave is not undone
        by its join sent again after it)."""
        client = client or self._wclient
        replies = self._pipeline(client, commands, wait)
        missing = {i for i, r in enumerate(replies) if function_missing(r)}
        if missing:
            self._load_library(client)
            again = [
                i
                for i in range(min(missing), len(commands))
                if i in missing or commands[i][0] != "FCALL"
            ]
            resent = self._pipeline(client, [commands[i] for i in again], wait)
            for i, reply in zip(again, resent, strict=True):
                if i in missing:
                    replies[i] = reply
        return replies

    def _pipeline(self, client: Any, commands: Sequence[Sequence[Any]], wait: bool) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        replicas, timeout_ms = self._wait if wait else (0, 0)
        if replicas:
            # A write first: since Redis 7.2, WAIT waits only for this connection's last
            # write that reached the replication stream, so a batch that wrote nothing (a
            # retried cid answered from the log) would confirm none of the writes it
            # acknowledges (the first attempt's, perhaps another node's, unconfirmed).
            pipe.execute_command("SET", self._prefix + WAIT_MARK, b"")
            pipe.execute_command("WAIT", replicas, timeout_ms)
        replies: list[Any] = pipe.execute(raise_on_error=False)
        if replicas:
            acked = replies.pop()
            replies.pop()  # the mark's OK
            if not isinstance(acked, int) or acked < replicas:
                raise StoreUnavailable(
                    f"only {acked} of {replicas} replicas confirmed the batch within "
                    f"{timeout_ms} ms; outcome unknown, retry with the same cid"
                )
        return replies

    def _command(self, op: WriteOp, ts: int) -> tuple[Any, ...]:
        """The command of one write (validated here, as LMDB's writer does)."""
        _check_name("user", op.user, MAX_USER_BYTES)
        if op.kind == "seen":
            return ("SET", self._user_key(op.user, b"seen"), ts)
        _check_name("channel", op.channel, MAX_CHANNEL_BYTES)
        if op.kind == "message":  # its part of an append call (``_calls``)
            cid, text = op.cid, op.text
            if cid is None or not 1 <= len(cid) <= MAX_CID_CHARS or text is None:
                raise ValueError(f"a message needs text and a cid of 1 to {MAX_CID_CHARS} chars")
            body = _P_TEXT + packb(text)
            meta = _P_META + packb(op.meta) if op.meta else b""
            dkey = _dedup_key(op.user, cid)
            return (dkey, op.user.encode(), body + meta, 2 if meta else 1, meta)
        if op.kind in ("member", "unmember"):
            mine = [self._user_key(op.user, b"ch"), self._user_key(op.user, b"mv")]
            most = (op.most,) if op.kind == "member" else ()
            return fcall(op.kind, mine, op.channel, *most, ts)
        keys = self._keys(op.channel)
        if op.kind == "read":
            return fcall("read", keys, op.user, op.seq)
        if op.kind not in ("edit", "delete"):
            raise ValueError(f"unknown write kind {op.kind!r}")
        if op.kind == "edit" and op.text is None:
            raise ValueError("an edit needs text")
        ts_pair = _P_TS + packb(ts)
        target = op.target or ""
        parsed = parse_message_id(target)
        if parsed is None:
            raise NotFound(f"no message {target!r} in channel {op.channel!r}")
        return fcall(
            "change", keys,
            op.kind[0], parsed[0], parsed[1], op.user, int(op.moderator), ts, ts_pair,
            _P_ID + packb(target) + _P_SENDER + packb(op.user),
            _P_TEXT + packb(op.text) if op.text is not None else b"", _P_EDITED + packb(ts),
            self.config.max_edits,
        )  # fmt: skip

    def _finish(self, ops: list[WriteOp], reply: Any, ts: int, created: list[str]) -> None:
        """Read one command's reply into its ops (a new entry's epoch into ``op.epoch``)."""
        op = ops[0]
        if isinstance(reply, Exception):  # OOM, READONLY after a failover, a script error
            log.error("Redis refused a %s in %r: %s", op.kind, op.channel, reply)
            raise StoreUnavailable(f"Redis refused the write: {reply}")
        if op.kind == "seen":
            op.result = ts
        elif op.kind in ("member", "unmember"):
            op.result, op.changed = 0, op.kind == "member" and reply == 1
        elif op.kind == "read":
            op.result, op.changed = int(reply[0]), bool(reply[1])
        elif op.kind == "message":
            prefix, epoch = reply[0].decode(), int(reply[1])
            if reply[2]:
                created.append(op.channel)
            for op, r in zip(ops, reply[3:], strict=True):
                if type(r) is int:
                    op.result = AppendResult(op.channel, r, f"{prefix}-{r}", ts)
                    op.epoch = epoch
                else:
                    op.result = _dup_result(
                        op.channel, prefix, int(r[0]), r[1] if len(r) > 1 else None
                    )
        elif reply[0] == b"ok":
            op.result = AppendResult(op.channel, int(reply[1]), op.target or "", ts)
            op.epoch = int(reply[2])
        elif reply[0] == b"fb":
            raise Forbidden(f"only the sender or a moderator may change message {op.target!r}")
        elif reply[0] == b"le":
            check_edits(op.target or "", int(reply[1]), self.config.max_edits)  # raises
        else:
            raise NotFound(f"no message {op.target!r} in channel {op.channel!r}")

    def _fanout_messages(self, batch: list[WriteOp]) -> list[tuple[bytes, bytes]]:
        """What to publish for a committed batch: its new entries as ``sync`` returns them
        (not dups, not failed writes), consecutive ones of a channel's log in one message;
        and each moved read cursor as a ``read`` signal. In the batch's order."""
        out: list[tuple[bytes, dict[str, Any]]] = []
        node = self._subscriber.node
        for op in batch:
            result = op.result
            if op.error is not None or result is None:
                continue
            if op.kind == "read":
                if op.changed:
                    frame = {"t": "read", "channel": op.channel, "user": op.user, "seq": result}
                    out.append((self._topic(op.channel), signal_message(node, op.channel, frame)))
                continue
            epoch = op.epoch
            if not isinstance(result, AppendResult) or result.dup or not epoch:
                continue
            entry: Entry = {"seq": result.seq, "kind": op.kind, "ts": result.ts, "id": result.id}
            entry["sender"] = op.user
            if op.kind != "delete":
                entry["text"] = op.text
            if op.kind == "message" and op.meta:
                entry["meta"] = op.meta
            last = out[-1][1] if out else None
            if (
                last is not None
                and last.get("channel") == op.channel
                and last.get("epoch") == epoch
                and len(last["entries"]) < PUBLISH_ENTRIES_MAX
            ):
                last["entries"].append(entry)
            else:
                out.append((self._topic(op.channel), entries_message(node, op.channel, epoch)))
                out[-1][1]["entries"].append(entry)
        return [(topic, packb(msg)) for topic, msg in out]

    def _ack(self, batch: list[WriteOp]) -> None:
        waiting = self._waiting
        for _ in range(min(len(batch), len(waiting))):
            waiting.popleft()
        notify_batch(batch, self._notify)

    # ---------------------------------------------------------------- fan-out

    def follow(self, channel: str) -> None:
        self._subscriber.follow(channel)

    def unfollow(self, channel: str) -> None:
        self._subscriber.unfollow(channel)

    def counters(self) -> dict[str, int]:
        return dataclasses.asdict(self.fanout)

    def publish_signal(self, channel: str, frame: dict[str, Any]) -> None:
        if not self._closed:
            self._subscriber.signal(channel, frame)

    # ---------------------------------------------------------------- compaction

    def compact(self, channel: str) -> int:
        """LMDB's rule (:meth:`LmdbStore.compact`), in script calls of at most
        ``COMPACT_CHUNK`` entries each, from the caller's thread: writes interleave with
        the steps, each step is atomic and moves the horizon over what it dropped."""
        policy = self.config.compaction
        now = self._clock()
        keys = self._keys(channel)
        fixed = (
            policy.keep_recent,
            -1 if policy.max_count is None else policy.max_count,
            0 if policy.max_age_ms is None else now - policy.max_age_ms,
            now - policy.tombstone_retention_ms,
        )
        plan: list[Any] = [b"", 0, 0, 0, 0]  # epoch, phase, point, drop_below, next tomb
        while True:
            if self._closed:
                raise StoreUnavailable("store is closed")
            if self._fault is not None:
                try:
                    self._fault()
                except Exception as exc:
                    raise StoreUnavailable(f"compaction of {channel!r} failed: {exc}") from exc
            reply = self._eval("compact", keys, plan[0], *fixed, COMPACT_CHUNK, *plan[1:])
            if reply[0]:
                return int(reply[1])
            plan = [reply[2], *reply[3:]]

    def compact_all(self) -> dict[str, int]:
        """Compact every channel; stops between channels when closing."""
        return self._compaction.compact_all()

    def reset_channel(self, channel: str) -> int:
        """Drop a channel's log and give it a new epoch (see LmdbStore.reset_channel)."""
        if self._closed:
            raise StoreUnavailable("store is closed")
        epoch = self._epochs()
        return epoch if self._eval("reset", self._keys(channel), epoch) else 0

    # ---------------------------------------------------------------- tools

    def tail(self, channel: str, n: int) -> tuple[ChannelInfo | None, list[Entry], dict[str, int]]:
        """As LmdbReader.tail: the channel's info and last ``n`` entries (one script call,
        at most ``TAIL_MAX``) and its read cursors (HSCAN, read just after)."""
        if n > TAIL_MAX:
            raise ValueError(f"--tail reads at most {TAIL_MAX} entries on Redis")
        keys = self._keys(channel)
        reply = self._eval("tail", keys, n)
        if not reply[0]:
            return None, [], {}
        info = ChannelInfo(channel, int(reply[1]), int(reply[2]), int(reply[0]))
        entries = [unpackb(raw) for raw in reply[3:] if raw]
        return info, entries, self._hash_ints(keys[8])

    def _hash_ints(self, key: bytes) -> dict[str, int]:
        with self._using():
            return {k.decode(): int(v) for k, v in self._client.hscan_iter(key, count=SCAN_COUNT)}

    def stats(self) -> list[RedisChannelStats]:
        """Every registered channel's figures, a pipeline per ``SCAN_COUNT`` channels."""
        names = self.channels()
        out: list[RedisChannelStats] = []
        for i in range(0, len(names), SCAN_COUNT):
            chunk = names[i : i + SCAN_COUNT]
            with self._using():
                pipe = self._client.pipeline(transaction=False)
                for name in chunk:
                    keys = self._keys(name)
                    pipe.hmget(keys[0], "epoch", "head", "horizon")
                    pipe.hlen(keys[1])
                    pipe.memory_usage(keys[1])
                    pipe.hlen(keys[8])
                    pipe.hlen(keys[6])
                replies = pipe.execute()
            for j, name in enumerate(chunk):
                (epoch, head, horizon), entries, size, cursors, dedup = replies[5 * j : 5 * j + 5]
                if epoch is None:
                    continue  # registered, then lost (a reset of its keys): no log
                figures = (int(head), int(horizon), int(epoch), entries, size or 0)
                out.append(RedisChannelStats(name, *figures, cursors, dedup))
        return out

    def _scan(self, pattern: bytes) -> Iterator[bytes]:
        """Keys matching ``pattern`` on every primary (SCAN: never blocks Redis)."""
        for node in self._primaries():
            with self._using():
                keys = list(node.scan_iter(match=pattern, count=SCAN_COUNT))
            yield from keys

    def _any_key(self, pattern: bytes) -> bool:
        for node in self._primaries():
            with self._using():
                if next(node.scan_iter(match=pattern, count=SCAN_COUNT), None) is not None:
                    return True
        return False

    # ---------------------------------------------------------------- export

    def export(self) -> Iterator[ChannelDump | UserDump]:
        """Every channel, each as one consistent state of it (a channel whose head or
        horizon moves while it is read is read again, up to ``EXPORT_RETRIES`` times),
        then every user's memberships and last_seen as read after the channels. Channels
        are not consistent with each other: for a point-in-time export, stop the servers
        first (STORAGE.md, "Exports")."""
        p = len(self._prefix)
        names = set(self.channels())
        for key in self._scan(self._prefix + b"{c:*}:meta"):
            names.add(key[p + 3 : -6].decode())
        for name in sorted(names):
            dump = self._export_channel(name)
            if dump is not None:
                yield dump
        members: dict[str, list[str]] = {}
        seen: dict[str, int] = {}
        for key in self._scan(self._prefix + b"{u:*"):
            who, _, what = key[p + 3 :].rpartition(b"}:")
            if what == b"ch":
                with self._using():
                    chans = self._client.smembers(key)
                members[who.decode()] = sorted(c.decode() for c in chans)
            elif what == b"seen":
                raw = self._call(self._client.get, key)
                if raw is not None:
                    seen[who.decode()] = int(raw)
        for user in sorted(members.keys() | seen.keys()):
            yield UserDump(user, members.get(user, []), seen.get(user))

    def _export_channel(self, name: str) -> ChannelDump | None:
        keys = self._keys(name)
        for _ in range(EXPORT_RETRIES):
            try:
                dump = self._read_channel(keys, name)
            except _Moved:
                continue
            if dump is None:
                return None
            now = self._call(self._client.hmget, keys[0], "epoch", "head", "horizon")
            if now[0] is not None and tuple(map(int, now)) == (dump.epoch, dump.head, dump.horizon):
                return dump
        raise StoreUnavailable(
            f"channel {name!r} kept changing during the export ({EXPORT_RETRIES} tries): "
            "stop the servers writing to it and export again"
        )

    def _read_channel(self, keys: tuple[bytes, ...], name: str) -> ChannelDump | None:
        """One read of a channel (None: it has no log); _Moved when a write moved its head,
        a compaction step its horizon or a reset changed its epoch between two steps."""
        entries: list[Entry] = []
        tombs: dict[int, int] = {}
        after, fixed = 0, None
        while True:
            reply = self._eval("dump", keys, after, EXPORT_CHUNK)
            if not reply[0]:
                return None
            # A compaction step moves the horizon (not the head) over what it dropped.
            state = (
                int(reply[0]), int(reply[1]), reply[3].decode() or reply[0].decode(),
                int(reply[2]),
            )  # fmt: skip
            if fixed is not None and state != fixed:
                raise _Moved
            fixed = state
            rows = reply[4:]
            for i in range(0, len(rows), 3):
                seq, raw, deleted = int(rows[i]), rows[i + 1], rows[i + 2]
                if raw:
                    entries.append(unpackb(raw))
                if deleted:
                    tombs[seq] = int(deleted)
                after = seq
            if len(rows) < 3 * EXPORT_CHUNK:
                break
        dedup = []
        for key, value in self._hash_bytes(keys[6]):
            sender, _, cid = key.partition(b"\0")
            first, _, ts = value.partition(b":")
            dedup.append((sender.decode(), cid.decode(), int(first), int(ts)))
        dedup.sort(key=lambda row: row[2])
        epoch, head, prefix, horizon = fixed
        cursors = self._hash_ints(keys[8])
        return ChannelDump(name, epoch, prefix, head, horizon, entries, tombs, cursors, dedup)

    def _hash_bytes(self, key: bytes) -> list[tuple[bytes, bytes]]:
        with self._using():
            return list(self._client.hscan_iter(key, count=SCAN_COUNT))

    # ---------------------------------------------------------------- restore

    def restore_begin(self) -> None:
        """Refuse a target with any key under this store's prefix; then mark the load as
        under way (a store does not open while the mark is there)."""
        where = f"Redis {self.target.where} (key prefix {self._prefix.decode()!r})"
        if self._any_key(self._prefix + b"*") or not self._call(
            lambda: self._client.set(self._prefix + RESTORING, b"1", nx=True)
        ):
            raise ValueError(f"restore target {where} is not empty")
        self._restored = []

    def restore_channel(self, dump: ChannelDump, new_epoch: bool) -> ChannelDump:
        """Load one exported channel: its keys exactly as the scripts would have left
        them; with ``new_epoch`` as a new log (a new epoch, ids under it)."""
        _check_name("channel", dump.name, MAX_CHANNEL_BYTES)
        if new_epoch:
            epoch = self._epochs()
            dump = with_prefix(dump, epoch, str(epoch))
        meta, log_, msgs, chg, tomb, idx, dd, dq, rc = self._keys(dump.name)
        commands: list[tuple[Any, ...]] = []
        fields: list[Any] = ["epoch", dump.epoch, "head", dump.head, "horizon", dump.horizon]
        if dump.prefix != str(dump.epoch):
            fields += ["pfx", dump.prefix]
        commands.append(("HSET", meta, *fields))
        chains = edit_chains(dump)
        for entry in dump.entries:
            seq, kind = entry["seq"], entry["kind"]
            pairs = [packb(k) + packb(entry[k]) for k in _entry_keys(entry)]
            commands.append(("HSET", log_, seq, bytes([0x80 + len(pairs)]) + b"".join(pairs)))
            base = b"".join(pairs[:BASE_FIELDS])
            deleted = bool(entry.get("deleted"))
            if kind == "message":
                commands.append(("ZADD", msgs, seq, seq))
                if deleted:
                    ts = dump.tombstones.get(seq, entry["ts"])
                    commands += [("ZADD", tomb, seq, seq), ("HSET", idx, f"t{seq}", ts)]
                    continue
                commands.append(("HSET", idx, f"b{seq}", base, f"s{seq}", entry["sender"]))
                if "meta" in entry:
                    commands.append(("HSET", idx, f"m{seq}", _P_META + packb(entry["meta"])))
                if seq in chains:
                    commands.append(("HSET", idx, f"e{seq}", ",".join(map(str, chains[seq]))))
            else:
                commands.append(("ZADD", chg, seq, seq))
                if kind == "edit" and not deleted:
                    commands.append(("HSET", idx, f"b{seq}", base))
        for sender, cid, seq, ts in dump.dedup:
            dkey = _dedup_key(sender, cid)
            commands += [("HSET", dd, dkey, f"{seq}:{ts}"), ("ZADD", dq, seq, dkey)]
        for user, cursor in dump.cursors.items():
            commands.append(("HSET", rc, user, cursor))
        self._load(commands)
        self._restored.append(dump.name)
        return dump

    def restore_users(self, users: list[UserDump]) -> None:
        commands: list[tuple[Any, ...]] = []
        for u in users:
            _check_name("user", u.user, MAX_USER_BYTES)
            if u.channels:
                commands.append(("SADD", self._user_key(u.user, b"ch"), *u.channels))
            if u.last_seen is not None:
                commands.append(("SET", self._user_key(u.user, b"seen"), u.last_seen))
        self._load(commands)

    def restore_end(self) -> None:
        """Register the channels, then lift the mark: the load is complete."""
        names = self._restored
        for i in range(0, len(names), RESTORE_PIPELINE):
            self._call(self._client.sadd, self._registry, *names[i : i + RESTORE_PIPELINE])
        self._call(self._client.delete, self._prefix + RESTORING)

    def _load(self, commands: list[tuple[Any, ...]]) -> None:
        for i in range(0, len(commands), RESTORE_PIPELINE):
            with self._using():
                pipe = self._client.pipeline(transaction=False)
                for args in commands[i : i + RESTORE_PIPELINE]:
                    pipe.execute_command(*args)
                pipe.execute()

    # ---------------------------------------------------------------- lifecycle

    def close(self) -> None:
        with self._inflight_changed:
            if self._closed:
                return
            self._closed = True
        self._compaction.stop()
        self._queue.put(_Stop())
        self._writer.join()
        closed = StoreUnavailable("store is closed")
        while True:  # whatever raced close() into the queue is failed, never left waiting
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, tuple):
                for op in item:
                    op.result, op.error = None, closed
                self._ack(list(item))
        with self._inflight_changed:  # reads and compaction steps still under way
            self._inflight_changed.wait_for(lambda: self._inflight == 0, SOCKET_TIMEOUT_S)
        self._subscriber.close()
        self._client.close()
        self._wclient.close()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entry_keys(entry: Entry) -> list[str]:
    """An entry's fields in the order the scripts write them, then any others."""
    return [k for k in ENTRY_ORDER if k in entry] + [k for k in entry if k not in ENTRY_ORDER]


def _lua_strings(items: Sequence[Any]) -> bytes:
    """A msgpack array of ``items`` (bytes, and small non-negative ints) with every bytes
    item as a msgpack *str*, whatever its bytes: Redis's Lua ``cmsgpack`` reads str into a
    Lua string byte for byte, but refuses the bin types that ``packb`` writes for bytes."""
    out = [_array_header(len(items))]
    for item in items:
        if type(item) is int:
            out.append(packb(item))
            continue
        n = len(item)
        if n < 32:
            out.append(_FIXSTR[n])
        elif n < 0x100:
            out.append(b"\xd9" + _FIXINT[n])
        elif n < 0x10000:
            out.append(b"\xda" + n.to_bytes(2, "big"))
        else:
            out.append(b"\xdb" + n.to_bytes(4, "big"))
        out.append(item)
    return b"".join(out)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 + n,))
    return b"\xdc" + n.to_bytes(2, "big") if n < 0x10000 else b"\xdd" + n.to_bytes(4, "big")


_FIXSTR = [bytes((0xA0 + n,)) for n in range(32)]
_FIXINT = [bytes((n,)) for n in range(256)]


def _dedup_key(sender: str, cid: str) -> bytes:
    return sender.encode() + b"\0" + cid.encode()


def _dup_result(channel: str, prefix: str, seq: int, raw: bytes | None) -> AppendResult:
    """The first result of a cid: its seq, id and ts (0 once retention dropped it)."""
    ts = unpackb(raw)["ts"] if raw else 0
    return AppendResult(channel, seq, f"{prefix}-{seq}", ts, dup=True)
