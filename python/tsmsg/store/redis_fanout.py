"""Fan-out between nodes on the Redis engine (STORAGE.md, "Fan-out between nodes").

A node's writer publishes each entry it committed, once Redis acknowledged the batch (and
WAIT confirmed the replicas), to the channel's pub/sub topic; a node that has members in a
channel follows it: the :class:`Subscriber` thread holds the subscriptions and hands what
arrives to the node's :class:`~tsmsg.store.base.Remote` hook. Pub/sub is at-most-once:
whatever may have been missed (a dropped connection, the moment a subscription starts) is
reported with ``Remote.lost`` and the node reads it from the log.

On a Redis Cluster the topics are sharded pub/sub channels (SPUBLISH/SSUBSCRIBE) named with
the channel's hash tag: a channel's messages stay on its slot's primary, never broadcast
over the cluster bus. The Subscriber keeps one pub/sub connection per primary it needs.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.crc import key_slot
from redis.exceptions import RedisError

from tsmsg._native import packb, unpackb
from tsmsg.store.base import Remote, RemoteEntry

log = logging.getLogger("tsmsg.store")

SIGNAL_QUEUE_MAX = 4096  # signals waiting for the pub/sub thread: more means Redis lags, drop
SIGNAL_BATCH_MAX = 256  # signals sent in one pipeline (one round trip)
# Messages read from one connection before they are handed over, and the most entries one
# hand-over holds (a message may carry up to PUBLISH_ENTRIES_MAX of them).
READ_BATCH_MAX = 1024
BACKOFF_MIN_S = 0.05  # first re-subscribe attempt after a connection dropped
BACKOFF_MAX_S = 2.0  # the longest wait between attempts while Redis stays away
PING_IDLE_S = 5.0  # a pub/sub connection silent this long is pinged
PING_TIMEOUT_S = 5.0  # and counts as dead when the PING is not answered within this
WAIT_MAX_S = 1.0  # the thread wakes at least this often (pings, retries, closing)


@dataclass(slots=True)
class FanoutStats:
    """Counters for metrics. Each is written by one thread (``signals_dropped`` by the
    callers of publish_signal); a reader may see a value one step old."""

    published: int = 0  # pub/sub messages (runs of entries, signals) Redis accepted
    publish_failures: int = 0  # pub/sub messages not published (never retried)
    signals_dropped: int = 0  # signals refused because the queue was full
    received: int = 0  # entries handed to the remote hook
    bad_messages: int = 0  # messages on a followed topic that tsmsg did not publish
    reconnects: int = 0  # pub/sub connections lost (each is followed by ``lost``)


def entries_message(node: bytes, channel: str, epoch: int) -> dict[str, Any]:
    """What is published for committed entries of one log (each as ``sync`` returns it,
    appended to ``entries`` in seq order), by the node ``node`` (a node ignores its own:
    they reached its members already). Packed by the caller once complete."""
    return {"node": node, "channel": channel, "epoch": epoch, "entries": []}


def signal_message(node: bytes, channel: str, frame: dict[str, Any]) -> dict[str, Any]:
    """What is published for a live signal (a ``typing`` or ``read`` push)."""
    return {"node": node, "channel": channel, "signal": frame}


def publish_all(
    client: Any, command: str, messages: list[tuple[bytes, bytes]], stats: FanoutStats
) -> None:
    """Publish ``(topic, payload)`` pairs in one pipeline (one round trip per node).
    Best effort: a failure is logged and counted, never retried, never raised (the
    receivers read what they missed from the log)."""
    if not messages:
        return
    failed = len(messages)
    error: Exception | None = None
    try:
        pipe = client.pipeline(transaction=False)
        for topic, payload in messages:
            pipe.execute_command(command, topic, payload)
        replies = pipe.execute(raise_on_error=False)
        errors = [r for r in replies if isinstance(r, Exception)]
        failed, error = len(errors), (errors[0] if errors else None)
    except Exception as exc:  # connection lost, cluster down: the batch stays acked
        error = exc
    stats.published += len(messages) - failed
    if failed:
        stats.publish_failures += failed
        log.warning("%d of %d pub/sub messages not published: %s", failed, len(messages), error)


@dataclass(slots=True, eq=False)
class _Link:
    """One pub/sub connection: to the one Redis, or to one cluster primary."""

    pubsub: Any
    heard: float  # time.monotonic() of the last thing read from it (or its opening)
    topics: set[bytes] = field(default_factory=set)  # subscribed (sent) on it
    leaving: collections.Counter[bytes] = field(default_factory=collections.Counter)
    pinged: float | None = None  # a PING is unanswered since then


class Subscriber:
    """The pub/sub thread of one store. ``follow``/``unfollow``/``signal`` may be called
    from any thread and never block: they leave a request and wake the thread, which alone
    uses the pub/sub connections (redis-py's PubSub is not thread-safe).

    redis-py's own re-subscribing after a reconnect is bypassed (commands are sent with
    ``execute_command``, so the PubSub keeps no list of channels): a connection that fails
    is closed, and this thread subscribes again itself, with backoff, so that it knows when
    the new subscriptions took effect and can report them as ``lost``.
    """

    def __init__(
        self,
        client: Any,
        cluster: bool,
        topic: Callable[[str], bytes],
        remote: Remote | None,
        stats: FanoutStats,
    ) -> None:
        self._client = client  # this thread's own: pub/sub connections and signals
        self._cluster = cluster
        self._topic = topic
        self._remote = remote
        self.stats = stats
        self.node = os.urandom(8)  # this node's mark on what it publishes
        if cluster:
            self.publish_command, self._sub, self._unsub = "SPUBLISH", "SSUBSCRIBE", "SUNSUBSCRIBE"
        else:
            self.publish_command, self._sub, self._unsub = "PUBLISH", "SUBSCRIBE", "UNSUBSCRIBE"
        self._lock = threading.Lock()
        # channel -> follow (True) or not: the latest request per channel, so its size is
        # bounded by the channels the node has members in.
        self._requests: dict[str, bool] = {}
        self._signals: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(SIGNAL_QUEUE_MAX)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        # A wake-up byte is pending (until the thread drained it): no other is sent, so a
        # burst of signals (a reconnect storm's presence) costs one system call.
        self._woken = False
        self._stopping = False
        # The thread's own state.
        self._followed: dict[bytes, str] = {}  # topic -> channel
        self._links: dict[str, _Link] = {}  # node name ("" for one Redis) -> connection
        self._link_of: dict[bytes, _Link] = {}  # topic -> the connection it is subscribed on
        self._todo: set[bytes] = set()  # followed topics to (re)subscribe
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN_S
        self._refresh = False  # the cluster's slot map may be stale: read it again
        self._entries: list[RemoteEntry] = []  # received, to hand over
        self._lost: list[str] = []  # subscriptions confirmed, to report
        self._thread = threading.Thread(target=self._run, name="tsmsg-redis-pubsub", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ any thread

    def follow(self, channel: str) -> None:
        if self._remote is not None:
            self._request(channel, True)

    def unfollow(self, channel: str) -> None:
        if self._remote is not None:
            self._request(channel, False)

    def _request(self, channel: str, follow: bool) -> None:
        with self._lock:
            self._requests[channel] = follow
        self._wake()

    def signal(self, channel: str, frame: dict[str, Any]) -> None:
        try:
            self._signals.put_nowait((channel, frame))
        except queue.Full:
            self.stats.signals_dropped += 1
            return
        self._wake()

    def _wake(self) -> None:
        if self._woken:
            return
        self._woken = True
        with contextlib.suppress(OSError):  # full (already woken) or closed
            self._wake_w.send(b"\0")

    def close(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join()
        self._wake_r.close()
        self._wake_w.close()
        self._client.close()

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._apply_requests()
                now = time.monotonic()
                if self._todo and now >= self._retry_at:
                    self._subscribe(now)
                self._send_signals()
                busy = self._read(now)
                self._hand_over()
                self._check_alive(now)
            except Exception as exc:  # a bug here must not end fan-out: start over
                log.exception("pub/sub thread failed; re-subscribing every channel")
                for link in list(self._links.values()):
                    self._drop(link, exc)
                busy = False
            self._wait(0.0 if busy else self._timeout())
        # Closing: the signals still queued (a stopping node's offline pushes) are sent,
        # until the queue is empty or a batch fails (Redis is away).
        failures = self.stats.publish_failures
        while not self._signals.empty() and self.stats.publish_failures == failures:
            self._send_signals()
        for link in self._links.values():
            with contextlib.suppress(Exception):
                link.pubsub.reset()
        self._links.clear()

    def _apply_requests(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, {}
        for channel, follow in requests.items():
            topic = self._topic(channel)
            if follow:
                if topic not in self._followed:
                    self._followed[topic] = channel
                    self._todo.add(topic)
                continue
            if self._followed.pop(topic, None) is None:
                continue
            self._todo.discard(topic)
            link = self._link_of.pop(topic, None)
            if link is not None:
                link.topics.discard(topic)
                link.leaving[topic] += 1
                try:
                    link.pubsub.execute_command(self._unsub, topic)
                except RedisError as exc:
                    self._drop(link, exc)

    def _subscribe(self, now: float) -> None:
        """Send a subscribe for every topic to do; the confirmation arrives with the
        messages (``_read``), and only then is the channel reported as ``lost``."""
        link: _Link | None = None
        try:
            if self._refresh:
                self._client.nodes_manager.initialize()
                self._refresh = False
            for topic in list(self._todo):
                node = self._node_of(topic)
                link = self._links.get(node)
                if link is None:
                    link = self._links[node] = _Link(self._open(node), now)
                # One topic per command: SSUBSCRIBE refuses topics of several slots.
                link.pubsub.execute_command(self._sub, topic)
                link.topics.add(topic)
                self._link_of[topic] = link
                self._todo.discard(topic)
        except RedisError as exc:
            if link is not None:
                self._drop(link, exc)
            else:  # no connection yet: the cluster's slot map could not be read
                self._failed()

    def _node_of(self, topic: bytes) -> str:
        if not self._cluster:
            return ""
        name: str = self._client.nodes_manager.get_node_from_slot(key_slot(topic)).name
        return name

    def _open(self, node: str) -> Any:
        if not self._cluster:
            return self._client.pubsub()
        target = self._client.nodes_manager.get_node(node_name=node)
        return self._client.get_redis_connection(target).pubsub()

    def _read(self, now: float) -> bool:
        """Read what every connection has buffered. True: one had more than a batch."""
        busy = False
        for link in list(self._links.values()):
            for _ in range(READ_BATCH_MAX):
                try:
                    msg = link.pubsub.parse_response(block=False, timeout=0)
                except RedisError as exc:
                    self._drop(link, exc)
                    break
                if msg is None:
                    break
                link.heard, link.pinged = now, None
                if isinstance(msg, list) and len(msg) >= 3:
                    self._on_message(link, msg[0], msg[1], msg[2])
            else:
                busy = True
        return busy

    def _on_message(self, link: _Link, kind: bytes, topic: bytes, data: Any) -> None:
        if kind in (b"message", b"smessage"):
            channel = self._followed.get(topic)
            if channel is not None and self._link_of.get(topic) is link:
                self._on_payload(channel, data)
        elif kind in (b"subscribe", b"ssubscribe"):
            if self._link_of.get(topic) is link and topic in self._followed:
                self._backoff = BACKOFF_MIN_S
                if self._entries:
                    self._hand_over()
                self._lost.append(self._followed[topic])
        elif kind in (b"unsubscribe", b"sunsubscribe"):
            if link.leaving[topic] > 0:
                link.leaving[topic] -= 1
                if not link.leaving[topic]:
                    del link.leaving[topic]
            elif topic in link.topics:
                # Redis ended it (the slot moved to another node): subscribe again where
                # the slot is now; the confirmation reports the channel as lost.
                link.topics.discard(topic)
                self._link_of.pop(topic, None)
                if topic in self._followed:
                    self._todo.add(topic)
                    self._refresh = self._cluster

    def _on_payload(self, channel: str, data: bytes) -> None:
        try:
            msg = unpackb(data)
            if not isinstance(msg, dict) or msg.get("channel") != channel:
                raise ValueError("not a message of this channel")
            if msg.get("node") == self.node:
                return  # this node's own: its members had it before it was published
            if "entries" in msg:
                epoch, entries = msg["epoch"], msg["entries"]
                if not isinstance(epoch, int) or not isinstance(entries, list):
                    raise ValueError("an entries message without epoch or entries")
                if not all(isinstance(entry, dict) for entry in entries):
                    raise ValueError("an entry that is not a map")
                # Reported losses go first; and a hand-over stays within READ_BATCH_MAX
                # entries (one call on the server's loop), however many a message holds.
                if self._lost or len(self._entries) + len(entries) > READ_BATCH_MAX:
                    self._hand_over()
                self._entries.extend(RemoteEntry(channel, epoch, entry) for entry in entries)
                return
            frame = msg["signal"]
            if not isinstance(frame, dict):
                raise ValueError("a signal that is not a map")
        except Exception as exc:
            self.stats.bad_messages += 1
            log.warning("ignored a pub/sub message on %r: %s", channel, exc)
            return
        self._hand_over()
        self._call("signal", channel, frame)

    def _hand_over(self) -> None:
        """Give the remote hook what was received, in the order it came."""
        if self._entries:
            entries, self._entries = self._entries, []
            self.stats.received += len(entries)
            self._call("entries", entries)
        if self._lost:
            lost, self._lost = self._lost, []
            self._call("lost", lost)

    def _call(self, hook: str, *args: Any) -> None:
        if self._remote is None:
            return
        try:
            getattr(self._remote, hook)(*args)
        except Exception:  # the hook's bug must not end fan-out
            log.exception("remote hook %s failed", hook)

    def _send_signals(self) -> None:
        messages: list[tuple[bytes, bytes]] = []
        while len(messages) < SIGNAL_BATCH_MAX:
            try:
                channel, frame = self._signals.get_nowait()
            except queue.Empty:
                break
            message = packb(signal_message(self.node, channel, frame))
            messages.append((self._topic(channel), message))
        publish_all(self._client, self.publish_command, messages, self.stats)

    def _check_alive(self, now: float) -> None:
        """A connection that stopped answering (a dead peer sends no FIN) is dropped."""
        for link in list(self._links.values()):
            if link.pinged is not None:
                if now - link.pinged > PING_TIMEOUT_S:
                    self._drop(link, TimeoutError(f"no answer to PING in {PING_TIMEOUT_S} s"))
            elif now - link.heard > PING_IDLE_S:
                try:
                    link.pubsub.execute_command("PING")
                    link.pinged = now
                except RedisError as exc:
                    self._drop(link, exc)

    def _drop(self, link: _Link, exc: BaseException) -> None:
        """Close a connection that failed; its followed topics are subscribed again."""
        for node, other in list(self._links.items()):
            if other is link:
                del self._links[node]
        with contextlib.suppress(Exception):
            link.pubsub.reset()
        for topic in link.topics:
            if self._link_of.get(topic) is link:
                del self._link_of[topic]
            if topic in self._followed:
                self._todo.add(topic)
        self.stats.reconnects += 1
        log.warning(
            "Redis pub/sub connection lost (%s); re-subscribing %d channels in %.2f s",
            exc or type(exc).__name__,
            len(link.topics),
            self._backoff,
        )
        self._failed()

    def _failed(self) -> None:
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(2 * self._backoff, BACKOFF_MAX_S)
        self._refresh = self._cluster

    def _timeout(self) -> float:
        timeout = WAIT_MAX_S
        if self._todo:
            timeout = min(timeout, max(0.0, self._retry_at - time.monotonic()))
        if not self._signals.empty():
            timeout = 0.0
        return timeout

    def _wait(self, timeout: float) -> None:
        """Until a connection has data, a request comes, or ``timeout`` seconds."""
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        for link in self._links.values():
            conn = link.pubsub.connection
            sock = getattr(conn, "_sock", None)  # redis-py keeps no public handle to it
            if sock is not None:
                poller.register(sock, select.POLLIN)
        poller.poll(timeout * 1000)
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
        # After the drain, before the queues are looked at again: a request made from
        # here on sends a byte (the next poll returns at once); one made before it is
        # seen by the next round.
        self._woken = False
