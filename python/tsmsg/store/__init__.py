"""Durable storage: the :class:`Store` interface and its LMDB backend."""

from tsmsg.store.base import (
    AppendResult,
    ChannelInfo,
    Entry,
    Forbidden,
    FormatError,
    HistoryPage,
    LimitExceeded,
    NotFound,
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
    "Store",
    "StoreConfig",
    "StoreError",
    "StoreObserver",
    "StoreUnavailable",
    "SyncPage",
    "WriteOp",
    "message_id",
]
