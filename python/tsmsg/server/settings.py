"""Server settings: defaults here, then a TOML file (``--config``), then ``TSMSG_*``
environment variables, then command-line flags; each later source wins.

Names map one to one: the field ``max_queue_bytes`` is ``max_queue_bytes = …`` in the
file's top level, ``TSMSG_MAX_QUEUE_BYTES`` in the environment; a protocol limit such as
``max_text_bytes`` lives in the file's ``[limits]`` table and is
``TSMSG_LIMITS_MAX_TEXT_BYTES`` in the environment.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from tsmsg.auth import DEFAULT_MAX_LIFETIME_S
from tsmsg.protocol.limits import Limits, check_minimums
from tsmsg.store import CompactionPolicy, StoreConfig
from tsmsg.store.crypto import load_keyring
from tsmsg.store.lmdb_store import DEFAULT_MAX_EDITS

ENV_PREFIX = "TSMSG_"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"  # plaintext is for loopback and development
    port: int = 7700
    data_dir: str = "./data"
    # Where channel logs live (STORAGE.md): "lmdb" (in data_dir; one node), or a Redis URL
    # shared by every node of a cluster (docs/cluster.md): redis://HOST:PORT[/DB],
    # rediss://... (TLS), redis-cluster://HOST:PORT[,HOST:PORT...] (seed nodes).
    engine: str = "lmdb"
    engine_password_file: str = ""  # the Redis password, from a file (mode 600)
    # Redis: an ack also waits for this many replicas to confirm the write (WAIT N).
    engine_wait_replicas: int = 0
    # Redis: a node's presence entries expire this long after its last refresh (every
    # third of it), so the users of a node that died count as offline after at most this.
    engine_presence_ttl_s: float = 30.0
    # Several nodes on one machine may listen on the same port (SO_REUSEPORT): the kernel
    # spreads connections over them, so a machine's cores are all used.
    reuse_port: bool = False
    durability: str = "fsync"  # see STORAGE.md: "fsync" or "async"
    # Encryption at rest of message text (STORAGE.md): a key file, `kid:base64` per line,
    # the first key active; empty: new messages are stored in plaintext.
    encryption_key_file: str = ""
    algorithm: str = "HS256"  # the pinned JWT algorithm
    public_key_file: str = ""  # PEM, for RS256/EdDSA instead of the HS256 secret
    audience: str = ""  # checked when set
    issuer: str = ""  # checked when set
    dev: bool = False  # allow starting without TSMSG_SECRET (a random one is generated)
    # HS256 secrets from a file instead of TSMSG_SECRET (e.g. a systemd credential): one per
    # line, the first current, the others previous ones still accepted (secret rotation).
    secret_file: str = ""
    log_format: str = "text"  # "text" or "json"
    log_level: str = "INFO"
    max_queue_bytes: int = 4 << 20  # outbound bytes queued per connection before its stream is cut
    max_inflight: int = 256  # writes one connection may have waiting for the store
    hello_timeout_s: float = 10.0  # a connection must complete hello within this (slowloris)
    send_timeout_s: float = 30.0  # a write to a peer that takes longer closes the connection
    shutdown_grace_s: float = 5.0  # how long shutdown waits to flush `bye` to clients
    frame_timeout_s: float = 30.0  # a frame once started must complete within this
    tick_ms: int = 250  # how often session timers (idle, token and typing expiry) are checked
    # Threads that run requests' store reads (join, sync, history, unread, presence) off
    # the event loop; more of them overlap a network store's round trips.
    read_threads: int = 8
    # Per client IP: new connections (loopback tests and load generators need >= 200/s)
    # and failed logins (a brute-force guard: past the burst, the IP is refused a while).
    ip_connect_rate: float = 200.0
    ip_connect_burst: int = 400
    ip_login_fail_rate: float = 1.0
    ip_login_fail_burst: int = 20
    # Connections open at once (PROTOCOL.md 16.3). Per IP: a NAT's worth of people, far
    # below the process's fds (raise it behind a proxy, whose address every client has).
    # Per user: a person's devices and tabs. In all: 0 derives it from RLIMIT_NOFILE minus
    # the fds kept for the store, logs and HTTP (tsmsg.server.app.FD_RESERVE); a value
    # above that is lowered to it.
    ip_max_connections: int = 256
    user_max_connections: int = 32
    max_connections: int = 0
    # The furthest a token's exp may lie ahead (30 days): a longer-lived token is refused,
    # and `tsmsg token --ttl` issues none (PROTOCOL.md 5.1).
    token_max_lifetime_s: int = DEFAULT_MAX_LIFETIME_S
    # TLS (PROTOCOL.md section 4): a PEM certificate chain and its key, both or neither;
    # with a client CA, clients must present a certificate it signed.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    tls_handshake_timeout_s: float = 10.0  # an accepted connection must finish TLS within this
    # Operator HTTP endpoints (docs/metrics.md): /metrics, /healthz, /readyz on HOST:PORT,
    # e.g. "127.0.0.1:9700"; empty: no listener. /readyz answers 503 while the oldest
    # write waiting for the store is older than ready_max_write_age_s (a stalled disk).
    metrics: str = ""
    # The WebSocket port (PROTOCOL.md section 19, docs/web.md): HOST:PORT, e.g.
    # "127.0.0.1:7780", serving the web chat page at / and the protocol at /connect, with
    # TLS (wss://, https://) when tls_cert_file is set; empty: no such port. An upgrade
    # whose Origin is not in ws_allowed_origins ("*": any; empty: the page's own origin
    # only) is refused with 403.
    ws: str = ""
    ws_allowed_origins: tuple[str, ...] = ()
    ready_max_write_age_s: float = 5.0
    # Compaction and retention, per channel (STORAGE.md "Compaction"): a background pass
    # every compact_interval_s (0: only when `tsmsg compact` runs). It keeps each message's
    # latest state, drops superseded entries and, after tombstone_retention_s, tombstones;
    # it leaves the newest compact_keep_recent seqs alone. Retention (0: keep all) drops
    # messages older than retention_max_age_s or beyond the newest retention_max_count
    # seqs, even among the newest compact_keep_recent.
    compact_interval_s: float = 3600.0
    compact_keep_recent: int = 1000
    tombstone_retention_s: float = 86400.0
    retention_max_age_s: float = 0.0
    retention_max_count: int = 0
    # Edits one message may have (STORAGE.md "Edits"); one more is refused with
    # limit_exceeded. Deleting a message rewrites each of its edits still in the log.
    max_edits_per_message: int = DEFAULT_MAX_EDITS
    limits: Limits = field(default_factory=Limits)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # log_level, any case


def _convert(name: str, value: Any, current: Any) -> Any:
    kind = type(current)
    if kind is tuple:  # a list of strings; in the environment, comma-separated
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"setting {name}: expected a list of strings, got {value!r}")
        return tuple(i.strip() for i in items if i.strip())
    if isinstance(value, str) and kind is not str:
        text = value.strip()
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"setting {name}: expected a boolean, got {value!r}")
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"setting {name}: expected {kind.__name__}, got {value!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"setting {name}: expected {kind.__name__}, got {value!r}")
    return value


def _apply(obj: Any, values: Mapping[str, Any], where: str) -> Any:
    known = {f.name for f in fields(obj)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"{where}: unknown setting {key!r}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}: [{name}] must be a table")
            changes[name] = _apply(current, value, f"{where} [{name}]")
        else:
            changes[name] = _convert(name, value, current)
    return replace(obj, **changes)


def _from_env(obj: Any, env: Mapping[str, str], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        current = getattr(obj, f.name)
        key = prefix + f.name.upper()
        if dataclasses.is_dataclass(current):
            nested = _from_env(current, env, key + "_")
            if nested:
                out[f.name] = nested
        elif key in env:
            out[f.name] = env[key]
    return out


def load_settings(
    config_file: str | None = None,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    settings: Settings = Settings()
    if config_file:
        try:
            fh = open(config_file, "rb")  # closed by the with below
        except OSError as exc:  # its message names no setting
            raise ValueError(f"config file {config_file}: {exc.strerror}") from None
        with fh:
            try:
                table = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:  # its message names no file
                raise ValueError(f"{config_file}: not valid TOML: {exc}") from None
        settings = _apply(settings, table, config_file)
    settings = _apply(settings, _from_env(settings, env, ENV_PREFIX), "environment")
    if overrides:
        settings = _apply(settings, {k: v for k, v in overrides.items() if v is not None}, "flags")
    if settings.durability not in ("fsync", "async"):
        raise ValueError(f"durability must be 'fsync' or 'async', not {settings.durability!r}")
    if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
        raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
    if settings.secret_file and settings.public_key_file:
        raise ValueError("secret_file (HS256) and public_key_file exclude each other: set one")
    if settings.tls_client_ca_file and not settings.tls_cert_file:
        raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
    check_minimums(settings, MINIMUMS)
    if settings.reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port needs SO_REUSEPORT, which this platform lacks: leave it off")
    if not settings.data_dir:
        raise ValueError("data_dir must be a directory path, not empty")
    if os.path.exists(settings.data_dir) and not os.path.isdir(settings.data_dir):
        raise ValueError(f"data_dir {settings.data_dir!r} exists and is not a directory")
    if not 0 <= settings.port <= 65535:
        raise ValueError(f"port must be from 0 to 65535, not {settings.port!r}")
    if 0 < settings.retention_max_age_s < 0.001:  # stored in whole ms: it would mean 0
        raise ValueError("retention_max_age_s must be 0 (keep all) or >= 0.001")
    if settings.log_level.upper() not in LOG_LEVELS:
        raise ValueError(
            f"log_level must be one of {', '.join(LOG_LEVELS)}, not {settings.log_level!r}"
        )
    if settings.log_format not in ("text", "json"):
        raise ValueError(f"log_format must be 'text' or 'json', not {settings.log_format!r}")
    if settings.metrics:
        parse_address(settings.metrics, "metrics")
    if settings.ws:
        parse_address(settings.ws, "ws")
    return settings


# The lowest valid value of each numeric setting, and whether it is excluded (a timeout or
# a rate must be > 0). Checked at start, NaN included, so that no value can break a
# running server (a max_inflight of 0, for one, would hang every connection).
MINIMUMS: dict[str, tuple[float, bool]] = {
    "max_queue_bytes": (1, False),
    "max_inflight": (1, False),
    "hello_timeout_s": (0, True),
    "send_timeout_s": (0, True),
    "shutdown_grace_s": (0, False),
    "frame_timeout_s": (0, True),
    "tick_ms": (1, False),
    "read_threads": (1, False),
    "engine_wait_replicas": (0, False),
    "engine_presence_ttl_s": (0, True),
    "ip_connect_rate": (0, True),
    "ip_connect_burst": (1, False),
    "ip_login_fail_rate": (0, True),
    "ip_login_fail_burst": (1, False),
    "ip_max_connections": (1, False),
    "user_max_connections": (1, False),
    "max_connections": (0, False),
    "token_max_lifetime_s": (1, False),
    "tls_handshake_timeout_s": (0, True),
    "ready_max_write_age_s": (0, True),
    "compact_interval_s": (0, False),
    "compact_keep_recent": (0, False),
    "tombstone_retention_s": (0, False),
    "retention_max_age_s": (0, False),
    "retention_max_count": (0, False),
    "max_edits_per_message": (1, False),
}


def store_config(settings: Settings) -> StoreConfig:
    """The store's configuration from the settings (``serve`` and ``compact`` alike);
    reads the encryption key file, so a bad one fails here."""

    def ms(seconds: float) -> int:
        return round(seconds * 1000)

    policy = CompactionPolicy(
        keep_recent=settings.compact_keep_recent,
        tombstone_retention_ms=ms(settings.tombstone_retention_s),
        max_age_ms=ms(settings.retention_max_age_s) or None,
        max_count=settings.retention_max_count or None,
        interval_s=settings.compact_interval_s or None,
    )
    return StoreConfig(
        durability=settings.durability,
        compaction=policy,
        max_edits=settings.max_edits_per_message,
        encryption=load_keyring(settings.encryption_key_file),
    )


def parse_address(value: str, name: str) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv6 host in brackets: ``[::1]:9700``) as (host, port)."""
    host, colon, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{name} must be HOST:PORT (e.g. 127.0.0.1:9700), not {value!r}")
    return host, int(port)
