"""Prometheus metrics of one server (docs/metrics.md lists them all).

Each :class:`~tsmsg.server.app.Server` owns a :class:`Metrics` with its own
``CollectorRegistry`` (never prometheus_client's global one), so several servers in one
process count separately. Labels are bounded: every label value comes from a fixed set
built here (free-text close reasons and unknown frame types map to a small enum, never
to the text), and there are no per-channel or per-user labels.

Hot path: what the event loop counts per frame is a :class:`Tally` (a plain int, no
lock: only the trio thread touches it) or a :class:`Timings` histogram (one ``bisect``),
bound once per label value here (``frames_in["send"]`` is a ready tally), and exported
in Prometheus's format when scraped (:class:`Tallies`). prometheus_client's own
counters take a lock per ``inc()``: 3-4 % of the trio thread's time in fan-in (issue
17's profile). Gauges that are sums over connections (queued bytes) are computed when
scraped, not maintained on every enqueue. The store's writer thread reports commit and
sync timings through the :class:`~tsmsg.store.StoreObserver` methods below, into
prometheus_client's thread-safe histograms (once per batch, not per message).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from tsmsg.protocol import errors as E

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes

# Frame types of the wire protocol (PROTOCOL.md sections 6 and 7); anything else: "other".
FRAMES_IN = (
    "hello",
    "join",
    "leave",
    "send",
    "edit",
    "delete",
    "history",
    "sync",
    "read",
    "typing",
    "ping",
    "refresh",
    "presence",
    "unread",
    "channels",
)
FRAMES_OUT = (
    "welcome",
    "ok",
    "error",
    "event",
    "resync",
    "read",
    "typing",
    "pong",
    "bye",
    "presence",
    "left",
    "membership",
)
OTHER = "other"
ERROR_CODES = tuple(sorted(v for k, v in vars(E).items() if k.isupper() and isinstance(v, str)))
# Log entries a write appends (the store's op kinds "read", "member", "seen" append none).
APPEND_KINDS = ("message", "edit", "delete")
RATE_LIMIT_SCOPES = (
    "frame",  # per connection: frames/s (PROTOCOL.md 16.1)
    "send",  # per user and per (user, channel): sends, edits, deletes (16.2)
    "typing",  # per user: typing frames (16.2)
    "presence",  # per user: presence status changes (16.2)
    "ip_connect",  # per IP: new connections (16.3)
    "ip_login",  # per IP: locked out after failed logins (16.3)
    "ip_connections",  # per IP: connections open at once (16.3)
    "user_connections",  # per user: connections open at once (16.3)
    "max_connections",  # the server's connections in all, at its cap (16.3)
)

# Why a connection closed. The server's own reasons are fixed strings (below); a
# protocol error closes with "<code>: <message>" and is counted by its code.
PEER_CLOSED = "peer closed the connection"
LOST = "connection lost"
SEND_TIMEOUT = "send timeout"
INTERNAL_ERROR = "internal error"
SHUTDOWN = "server shutdown"
HTTP_REQUEST = "http request"  # an HTTP client on the protocol port (answered, closed)
_CLOSE_PREFIXES = {
    PEER_CLOSED: "peer_closed",
    LOST: "lost",
    SEND_TIMEOUT: "send_timeout",
    INTERNAL_ERROR: "internal_error",
    SHUTDOWN: "shutdown",
    HTTP_REQUEST: "http_request",
    # Protocol errors that close the connection (the connection errors, a flood of
    # rate-limited requests, a bad `rid` on hello).
    **{code: code for code in sorted(E.CONNECTION_ERRORS)},
    E.RATE_LIMITED: E.RATE_LIMITED,
    E.BAD_REQUEST: E.BAD_REQUEST,
}
CLOSE_REASONS = (*dict.fromkeys(_CLOSE_PREFIXES.values()), OTHER)

# Failed logins (a refused hello), by what was wrong with the token. The auth module's
# messages are stable wording (tsmsg.auth); an unknown one counts as "invalid".
_AUTH_PREFIXES = (
    ("token has expired", "expired"),
    ("token signature is invalid", "bad_signature"),
    ("malformed token", "malformed"),
    ("token must be", "malformed"),
    ("`token` must be", "malformed"),
    ("token is longer", "malformed"),
    ("token is not valid yet", "not_yet_valid"),
    ("token algorithm", "bad_algorithm"),
    ("token audience", "wrong_audience"),
    ("token issuer", "wrong_issuer"),
    ("token lacks", "bad_claims"),
    ("claim ", "bad_claims"),
)
AUTH_REASONS = (*dict.fromkeys(reason for _, reason in _AUTH_PREFIXES), "invalid")

# Store commits take ~0.1-2 ms with fsync on an SSD (bench/results/*-store); the top
# buckets catch a stalling disk.
STORE_SECONDS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1]
STORE_SECONDS += [0.25, 0.5, 1.0, 2.5, 5.0]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]  # max_batch is 1024
ACK_SECONDS = [0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]
ACK_SECONDS += [0.5, 1.0, 2.5, 5.0, 10.0]


# The store's own counters (Store.counters()), read when scraped: the Redis engine's
# fan-out between nodes (FanoutStats). LMDB has no fan-out: they stay 0.
STORE_COUNTERS = {
    "fanout_published": ("published", "Entries and signals published to other nodes."),
    "fanout_publish_failures": (
        "publish_failures",
        "Entries and signals that could not be published (never retried).",
    ),
    "fanout_signals_dropped": (
        "signals_dropped",
        "Signals (typing, read) dropped because the engine's signal queue was full.",
    ),
    "fanout_received": ("received", "Messages from other nodes handed to this node."),
    "fanout_bad_messages": (
        "bad_messages",
        "Messages on a followed topic that tsmsg did not publish (ignored).",
    ),
    "fanout_reconnects": (
        "reconnects",
        "Pub/sub connections lost and made again (each followed by a read of the log).",
    ),
}


class Tally:
    """A counter the trio thread increments: a plain int (no lock, no timestamp)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n


class Timings:
    """A histogram of durations observed by the trio thread: counts per bucket (``le``
    upper bounds, seconds) and their sum, cumulated when scraped."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


class Tallies(Collector):
    """Exports the :class:`Tally` counters and :class:`Timings` histograms, in the
    format prometheus_client's own would have (``<name>_total``; ``_bucket``, ``_sum``,
    ``_count``), plus ``_created`` for each counter (prometheus_client's histogram family
    has no ``_created``: these two histograms have none)."""

    def __init__(self) -> None:
        # (name, doc, label, tally): a Tally without a label, else one per label value
        self.counters: list[tuple[str, str, str, Tally | dict[str, Tally]]] = []
        self.timings: list[tuple[str, str, Timings]] = []
        self.created = time.time()

    def collect(self) -> Iterator[Metric]:
        for name, doc, label, tally in self.counters:
            if isinstance(tally, Tally):
                yield CounterMetricFamily(name, doc, value=tally.value, created=self.created)
                continue
            family = CounterMetricFamily(name, doc, labels=[label])
            for value, child in tally.items():
                family.add_metric([value], child.value, created=self.created)
            yield family
        for name, doc, timings in self.timings:
            running, buckets = 0, []
            for bound, count in zip([*timings.bounds, float("inf")], timings.counts, strict=True):
                running += count
                buckets.append((str(bound) if bound != float("inf") else "+Inf", running))
            yield HistogramMetricFamily(name, doc, buckets=buckets, sum_value=timings.total)


class StoreCounters(Collector):
    """Exports ``Store.counters()`` at scrape time: no cost per message."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, int]] = dict  # no store yet: zeros

    def collect(self) -> Iterator[Metric]:
        values = self.source()
        for name, (key, doc) in STORE_COUNTERS.items():
            yield CounterMetricFamily(f"tsmsg_store_{name}", doc, value=values.get(key, 0))


def close_reason(text: str) -> str:
    """The bounded label for a connection's free-text close reason."""
    head = text.partition(":")[0]
    return _CLOSE_PREFIXES.get(head, OTHER)


def auth_reason(text: str) -> str:
    """The bounded label for a refused hello, from its close reason
    ("unauthorized: token signature is invalid", "token_expired: token has expired")."""
    message = text.partition(": ")[2]
    for prefix, reason in _AUTH_PREFIXES:
        if message.startswith(prefix):
            return reason
    return "invalid"


class Metrics:
    """The metrics of one server, in their own registry. Also the store's observer."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        tallies = Tallies()  # registered once filled (below): the registry learns its names

        def counter(name: str, doc: str, label: str | None = None, values: Any = ()) -> Any:
            tally: Tally | dict[str, Tally] = (
                Tally() if label is None else {value: Tally() for value in values}
            )
            tallies.counters.append((name, doc, label or "", tally))
            return tally

        # Connections.
        self.connections = Gauge(
            "tsmsg_connections", "Connections with a session now.", registry=registry
        )
        self.opened: Tally = counter(
            "tsmsg_connections_opened", "Connections accepted and given a session."
        )
        self.closed: dict[str, Tally] = counter(
            "tsmsg_connections_closed", "Connections closed, by reason.", "reason", CLOSE_REASONS
        )
        self.auth_failures: dict[str, Tally] = counter(
            "tsmsg_auth_failures",
            "Hellos refused for their token (failed logins), by reason.",
            "reason",
            AUTH_REASONS,
        )
        self.tls_handshake_failures: Tally = counter(
            "tsmsg_tls_handshake_failures", "TLS handshakes that failed or timed out."
        )
        self.resumes: Tally = counter(
            "tsmsg_resumes",
            "Connections whose first sync started from a position (since > 0): a client "
            "reconnecting with state it kept.",
        )
        # Frames.
        self.frames_in: dict[str, Tally] = counter(
            "tsmsg_frames_in", "Frames received, by type.", "type", (*FRAMES_IN, OTHER)
        )
        self.frames_out: dict[str, Tally] = counter(
            "tsmsg_frames_out",
            "Frames queued to connections, by type (each fan-out copy counts).",
            "type",
            (*FRAMES_OUT, OTHER),
        )
        self.errors: dict[str, Tally] = counter(
            "tsmsg_error_frames", "Error frames sent, by code.", "code", (*ERROR_CODES, OTHER)
        )
        self.rate_limited: dict[str, Tally] = counter(
            "tsmsg_rate_limited",
            "Requests and connections refused with rate_limited, by scope.",
            "scope",
            RATE_LIMIT_SCOPES,
        )
        # Fan-out and flow control.
        self.deliveries: Tally = counter(
            "tsmsg_fanout_deliveries",
            "Pushes (events, typing, read) queued to channel members by fan-out.",
        )
        self.queued_bytes = Gauge(
            "tsmsg_outbound_queue_bytes",
            "Bytes queued for sending, summed over connections.",
            registry=registry,
        )
        self.slow_consumer_resyncs: Tally = counter(
            "tsmsg_slow_consumer_resyncs",
            "Live streams cut because a connection read too slowly (a resync push each).",
        )
        self.signals_dropped: Tally = counter(
            "tsmsg_signals_dropped",
            "Presence pushes dropped because the connection's outbound queue was full.",
        )
        # Writes.
        self.appends: dict[str, Tally] = counter(
            "tsmsg_appends",
            "Log entries stored (not counting duplicate sends), by kind.",
            "kind",
            APPEND_KINDS,
        )
        self.ack_seconds = Timings(ACK_SECONDS)
        tallies.timings.append(
            (
                "tsmsg_send_ack_seconds",
                "From the store accepting a client's write (send, edit, delete, read) to its "
                "reply being queued: group commit, sync, hand-off back to the server.",
                self.ack_seconds,
            )
        )
        self.commit_seconds = Histogram(
            "tsmsg_store_commit_seconds",
            "Duration of one store commit (a batch's transaction; with durability fsync "
            "it includes the sync of the data pages).",
            buckets=STORE_SECONDS,
            registry=registry,
        )
        self.read_seconds = Timings(STORE_SECONDS)
        tallies.timings.append(
            (
                "tsmsg_store_read_seconds",
                "A request's store reads (sync, history, unread, presence, ...): from asking a "
                "read thread to the answer, waiting for a free thread included.",
                self.read_seconds,
            )
        )
        self.batch_size = Histogram(
            "tsmsg_store_batch_size",
            "Writes per committed batch (group commit).",
            buckets=BATCH_SIZES,
            registry=registry,
        )
        self.fsync_seconds = Histogram(
            "tsmsg_store_fsync_seconds",
            "Duration of an explicit sync of the store to disk (fsync durability: the one "
            "that makes an idle writer's last commit durable; async: the periodic one).",
            buckets=STORE_SECONDS,
            registry=registry,
        )
        self.store_lag = Gauge(
            "tsmsg_store_oldest_pending_write_seconds",
            "Age of the oldest write not yet committed and acknowledged (0: none waits).",
            registry=registry,
        )
        self.presence_unwritten = Gauge(
            "tsmsg_presence_unwritten",
            "Presence changes queued for a shared engine (Redis) or being written, one per "
            "user at most.",
            registry=registry,
        )
        self.store_counters = StoreCounters()
        registry.register(self.store_counters)
        self.store_failed = Gauge(
            "tsmsg_store_failed",
            "1 while the store takes no writes: LMDB after a failed sync (restart needed), "
            "Redis while it is unreachable (recovers by itself).",
            registry=registry,
        )
        registry.register(tallies)

    # -------------------------------------------------------------- hot-path helpers

    # Per frame: the counter's value is added to directly (one call less than inc).
    def frame_in(self, t: object) -> None:
        counter = self.frames_in.get(t) if type(t) is str else None  # t may be unhashable
        (self.frames_in[OTHER] if counter is None else counter).value += 1

    def frame_out(self, frame: dict[str, Any]) -> None:
        t = frame["t"]
        counter = self.frames_out.get(t)
        (self.frames_out[OTHER] if counter is None else counter).value += 1
        if t == "error":
            self.error_code(frame.get("code"))

    def frames_out_of(self, t: str, n: int) -> None:
        counter = self.frames_out.get(t)
        (self.frames_out[OTHER] if counter is None else counter).inc(n)

    def error_code(self, code: object) -> None:
        counter = self.errors.get(code) if type(code) is str else None
        (self.errors[OTHER] if counter is None else counter).inc()

    def limited(self, scope: str) -> None:
        self.rate_limited[scope].inc()

    # -------------------------------------------------------------- StoreObserver

    def committed(self, writes: int, seconds: float) -> None:
        self.commit_seconds.observe(seconds)
        self.batch_size.observe(writes)

    def synced(self, seconds: float) -> None:
        self.fsync_seconds.observe(seconds)

    # -------------------------------------------------------------- reading

    def exposition(self) -> bytes:
        """The registry in Prometheus text format (version 0.0.4)."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels`` (so
        without labels: the total over all of them). For tests and tools: it collects
        the whole registry."""
        return sum(
            sample.value
            for metric in self.registry.collect()
            for sample in metric.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )
