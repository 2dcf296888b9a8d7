"""Durable storage: the :class:`Store` interface and its LMDB backend."""

from tsmsg.store.base import (
    AppendResult,
    ChannelInfo,
    Entry,
    Forbidden,
    FormatError,
    HistoryPage,
    NotFound,
    Store,
    StoreError,
    StoreUnavailable,
    SyncPage,
    WriteOp,
)
from tsmsg.store.lmdb_store import CompactionPolicy, LmdbStore, StoreConfig, message_id

__all__ = [
    "AppendResult",
    "ChannelInfo",
    "CompactionPolicy",
    "Entry",
    "Forbidden",
    "FormatError",
    "HistoryPage",
    "LmdbStore",
    "NotFound",
    "Store",
    "StoreConfig",
    "StoreError",
    "StoreUnavailable",
    "SyncPage",
    "WriteOp",
    "message_id",
]
