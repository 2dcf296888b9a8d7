"""Durable storage: the :class:`Store` interface, its LMDB and Redis backends, and
:func:`open_store`, which picks one by the ``engine`` setting."""

from __future__ import annotations

import os
from collections.abc import Callable

from tsmsg.store.base import (
    AppendResult,
    ChannelInfo,
    Entry,
    Forbidden,
    FormatError,
    HistoryPage,
    LimitExceeded,
    NotFound,
    RateLimited,
    Remote,
    RemoteEntry,
    SendLimits,
    Store,
    StoreError,
    StoreObserver,
    StoreUnavailable,
    SyncPage,
    WriteOp,
)
from tsmsg.store.crypto import EncryptionError, Keyring
from tsmsg.store.lmdb_store import (
    CompactionPolicy,
    DataDirError,
    LmdbStore,
    StoreConfig,
    message_id,
)
from tsmsg.store.memory_store import MemoryData, MemoryStore
from tsmsg.store.redis_presence import PRESENCE_TTL_S
from tsmsg.store.redis_store import RedisStore, is_redis_url


def open_store(
    engine: str,
    data_dir: str | os.PathLike[str],
    config: StoreConfig | None = None,
    *,
    notify: Callable[[list[WriteOp]], None] | None = None,
    observer: StoreObserver | None = None,
    password_file: str | None = None,
    wait_replicas: int = 0,
    presence_ttl_s: float = PRESENCE_TTL_S,
    send_limits: SendLimits | None = None,
    remote: Remote | None = None,
) -> Store:
    """The store of an ``engine`` setting: ``lmdb`` (in ``data_dir``) or a Redis URL
    (``redis://``, ``rediss://``, ``redis-cluster://``; ``data_dir`` unused). The Redis
    options (``password_file``, ``wait_replicas``) are refused with LMDB; ``remote`` (what
    other nodes commit, see :class:`Remote`), ``presence_ttl_s`` and ``send_limits``
    (enforced across nodes) are unused by LMDB, a store of one node, whose server's
    sessions see every send.
    Blocking (it connects, or opens files): call it from a thread. Fails with one line:
    ValueError for a bad setting, StoreUnavailable for a Redis that cannot be reached."""
    if engine == "lmdb":
        if password_file is not None or wait_replicas:
            raise ValueError("engine_password_file and engine_wait_replicas need a Redis engine")
        return LmdbStore(data_dir, config, notify=notify, observer=observer)
    if not is_redis_url(engine):
        raise ValueError(
            f"engine must be lmdb or a Redis URL (redis://HOST:PORT[/DB], rediss://..., "
            f"redis-cluster://HOST:PORT[,HOST:PORT...]), not {engine!r}"
        )
    return RedisStore(
        engine,
        config,
        notify=notify,
        observer=observer,
        password_file=password_file,
        wait_replicas=wait_replicas,
        presence_ttl_s=presence_ttl_s,
        send_limits=send_limits,
        remote=remote,
    )


__all__ = [
    "AppendResult",
    "ChannelInfo",
    "CompactionPolicy",
    "DataDirError",
    "EncryptionError",
    "Entry",
    "Forbidden",
    "FormatError",
    "HistoryPage",
    "Keyring",
    "LimitExceeded",
    "LmdbStore",
    "MemoryData",
    "MemoryStore",
    "NotFound",
    "RateLimited",
    "RedisStore",
    "Remote",
    "RemoteEntry",
    "SendLimits",
    "Store",
    "StoreConfig",
    "StoreError",
    "StoreObserver",
    "StoreUnavailable",
    "SyncPage",
    "WriteOp",
    "message_id",
    "open_store",
]
