"""Presence across nodes on the Redis engine (STORAGE.md, "Presence between nodes").

Each node keeps, per user with a device on it, an entry in the user's hash
``{u:<user>}:pres`` (since when and until when it holds), and the hash holds the user's
status (a user's, not a node's: PROTOCOL.md 6.13). A live node extends its entries every
third of the TTL (``engine_presence_ttl_s``, 30 s); the entries of a node that died
without a goodbye expire after the TTL. An index (a sorted set by expiry) lets any node
claim the expired entries, each exactly once, so that the user is announced offline and
its ``last_seen`` written by one node once no entry is left. The scripts
(redis_scripts.py) apply each change atomically and return the user's status before and
after, so a node learns whether a change is one for the user.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from tsmsg.store.base import (
    CONNECTED,
    Ordered,
    OrderedAgain,
    Presence,
    PresenceChange,
    StoreUnavailable,
)
from tsmsg.store.redis_scripts import fcall, function_missing

if TYPE_CHECKING:
    from tsmsg.store.redis_store import RedisStore

log = logging.getLogger("tsmsg.store")

PRESENCE_TTL_S = 30.0  # default: a dead node's users count as online this long at most
CLAIM_MAX = 256  # expired entries one sweep call claims
REFRESH_BATCH = 1024  # entries extended in one pipeline


class RedisPresence(Presence):
    shared = True

    def __init__(self, store: RedisStore, node: bytes, ttl_s: float = PRESENCE_TTL_S) -> None:
        super().__init__()
        self._ttl_ms = int(ttl_s * 1000)
        self.refresh_s = ttl_s / 3  # a live node extends its entries this often
        self._store = store
        self._node = node.hex().encode()  # fixed width: index members are node + user
        self._index = store._prefix + b"presence:expiry"
        self._since: dict[str, int] = {}  # user -> when this node's entry was set (ms)
        # user -> a status the user set whose write failed (Redis away): what the refresh
        # that sets the user's entry again writes, rather than the connected marker.
        self._unwritten: dict[str, str] = {}

    def _key(self, user: str) -> bytes:
        return self._store._user_key(user, b"pres")

    def _order_key(self, user: str) -> bytes:
        """The user's presence order (moved by each change: redis_scripts.py)."""
        return self._store._user_key(user, b"pv")

    def set(self, user: str, status: str | None, now_ms: int) -> Ordered:
        (result,) = self.set_many([(user, status, now_ms)])
        if isinstance(result, Exception):
            raise result
        return result

    def set_many(self, changes: Sequence[PresenceChange]) -> list[Ordered | Exception]:
        with self._lock:
            for change in changes:
                self._note(*change[:3])
        return self._write(changes)

    def _note(self, user: str, status: str | None, now_ms: int) -> None:
        """This node's entry of ``user`` as refresh() extends it (under the lock)."""
        if status is None:
            self._status.pop(user, None)
            self._since.pop(user, None)
            self._unwritten.pop(user, None)
        else:
            self._status[user], self._since[user] = status, now_ms

    def _write(self, changes: Sequence[PresenceChange]) -> list[Ordered | Exception]:
        """The changes' entry scripts in one pipeline, in order, then each user's place in
        the expiry index (by the user's last change written) in another. An entry's
        expiry counts from when it is written, not from when the change was queued."""
        store, ttl = self._store, self._ttl_ms
        written = store._clock()
        commands, expiries = [], []
        for user, status, now_ms, *rest in changes:
            expires = max(now_ms, written) + ttl
            # status None: "", the node's last device of the user gone; then a status the
            # user set just before the device change (queued with it), to apply first
            first = (rest[0] if rest else None) or ""
            args = (self._node, status or "", now_ms, expires, now_ms, expires + ttl, first)
            keys = [self._key(user), store._user_key(user, b"seen"), self._order_key(user)]
            commands.append(fcall("presence_set", keys, *args))
            expiries.append(expires)
        try:
            replies = self._pipeline(commands)
        except StoreUnavailable as exc:
            self._unwritten_note(changes, [exc] * len(changes))
            raise
        last = {change[0]: i for i, change in enumerate(changes)}
        if any(function_missing(r) for r in replies):
            # Redis lost the library (function_missing): once it is loaded, the last change
            # of each user with a change not written is written again, and only that one
            # (an earlier change written after a later one would undo it; another node's
            # FUNCTION LOAD can land within this pipeline, so a later change may have been
            # written). The others not written are superseded: nothing to announce.
            with store._using():
                store._load_library()  # on the store's client, as _pipeline
            again = sorted(
                {last[changes[i][0]] for i, r in enumerate(replies) if function_missing(r)}
            )
            for i, reply in zip(again, self._pipeline([commands[i] for i in again]), strict=True):
                replies[i] = reply
            for i, reply in enumerate(replies):
                final = replies[last[changes[i][0]]]
                if function_missing(reply) and not isinstance(final, Exception):
                    replies[i] = [final[1], final[1], final[2], 0]  # nothing moved
        self._unwritten_note(changes, replies)
        index: dict[str, tuple[Any, ...]] = {}
        for (user, status, *_), reply, expires in zip(changes, replies, expiries, strict=True):
            if not isinstance(reply, Exception):  # where a sweep finds the entry, if any
                member = self._node + user.encode()
                op = (
                    ("ZREM", self._index, member)
                    if status is None
                    else ("ZADD", self._index, expires, member)
                )
                index[user] = op
        try:  # a member left behind is harmless (presence_expire finds no entry); one
            self._pipeline(list(index.values()))  # missing is added by the next refresh
        except StoreUnavailable as exc:
            log.warning("presence index not updated: %s", exc)
        where = store.target.where
        return [
            StoreUnavailable(f"Redis at {where}: {reply}")
            if isinstance(reply, Exception)
            else Ordered(reply[0].decode(), reply[1].decode(), int(reply[3]))
            for reply in replies
        ]

    def _unwritten_note(self, changes: Sequence[PresenceChange], replies: list[Any]) -> None:
        """Keep the status a user set (alone, or queued with a device change) whose write
        failed, while the user is connected here: the refresh writes it (refresh())."""
        with self._lock:
            for (user, status, _, *rest), reply in zip(changes, replies, strict=True):
                if not isinstance(reply, Exception):
                    self._unwritten.pop(user, None)
                    continue
                set_ = status if status not in (None, CONNECTED) else (rest[0] if rest else None)
                if set_ and user in self._status:
                    self._unwritten[user] = set_

    def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One pipeline on the store's client: each command's error is its reply; a lost
        connection raises StoreUnavailable."""
        store = self._store
        with store._using():
            return store._pipeline(store._client, commands, False)

    def statuses(self, users: list[str], now_ms: int) -> dict[str, str]:
        # At most max_presence_users (100), each in its own slot: one pipeline.
        commands = [fcall("presence_status", [self._key(u)], now_ms) for u in users]
        store = self._store
        with store._using():  # (_execute loads the function library where it is missing)
            replies = store._execute(commands, wait=False, client=store._client) if users else []
        out = {}
        for user, reply in zip(users, replies, strict=True):
            if isinstance(reply, Exception):
                raise StoreUnavailable(f"Redis at {self._store.target.where}: {reply}")
            if reply is not None:
                out[user] = reply.decode()
        return out

    def refresh(self, now_ms: int) -> list[OrderedAgain]:
        expires = now_ms + self._ttl_ms
        with self._lock:
            entries = [(u, self._since[u]) for u in self._status]
        lost = []
        for i in range(0, len(entries), REFRESH_BATCH):
            batch = entries[i : i + REFRESH_BATCH]
            commands: list[tuple[Any, ...]] = []
            for user, since in batch:
                args = (self._node, since, expires, expires + self._ttl_ms)
                commands.append(fcall("presence_extend", [self._key(user)], *args))
                commands.append(("ZADD", self._index, expires, self._node + user.encode()))
            with self._store._using():
                replies = self._store._execute(commands, wait=False, client=self._store._client)
            failed = next((r for r in replies if isinstance(r, Exception)), None)
            if failed is not None:
                raise StoreUnavailable(f"Redis at {self._store.target.where}: {failed}")
            lost += [e for e, extended in zip(batch, replies[::2], strict=True) if not extended]
        # Entries a sweep took while this node was late (a long Redis outage), or whose
        # change was not written (Redis away): set again, unless a change of the user
        # replaced them meanwhile; with the status the user set, if its write failed.
        with self._lock:  # checked and noted at once: a disconnect must not slip between
            again = [
                (user, self._unwritten.get(user, CONNECTED), now_ms)
                for user, since in lost
                if self._since.get(user) == since
            ]
            for change in again:
                self._note(*change)
        moved: list[OrderedAgain] = []
        for (user, _, _), result in zip(again, self._write(again), strict=True):
            if isinstance(result, Exception):
                raise result
            moved.append(OrderedAgain(user, *result, order=result.order))
        return moved

    def expired(self, now_ms: int) -> list[Ordered]:
        """The users whose last entry a sweep took (offline, last_seen written): each
        decided here is returned, even when Redis fails before the others are swept
        (those are claimed again once the claim's lease runs out, a TTL on)."""
        store = self._store
        lease = f"{now_ms + self._ttl_ms}.5"  # no expiry's score (whole ms): presence_release
        due = store._eval("presence_claim", [self._index], now_ms, CLAIM_MAX, lease)
        gone: list[Ordered] = []
        swept = []
        for member in due:
            node, user = member[: len(self._node)], member[len(self._node) :].decode()
            keys = [self._key(user), store._user_key(user, b"seen"), self._order_key(user)]
            try:
                reply = store._eval("presence_expire", keys, node, now_ms)
            except (RedisError, StoreUnavailable) as exc:  # the rest: a later sweep's
                log.warning("presence sweep cut short: %r", exc)
                break
            swept.append(member)
            if reply and int(reply[1]) == 0:  # no entry left: no device anywhere
                gone.append(Ordered(user, reply[0].decode(), int(reply[2])))
        if swept:
            try:  # one left claimed is harmless: swept again, presence_expire finds nothing
                store._eval("presence_release", [self._index], lease, *swept)
            except (RedisError, StoreUnavailable) as exc:
                log.warning("presence sweep not released: %r", exc)
        return gone
