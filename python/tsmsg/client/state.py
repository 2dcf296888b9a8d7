"""Persistent client state in one sqlite3 file: the followed channels with the position the
application has reached in each (last seq taken from ``events()`` and its epoch), and the
outbox of sends not yet acknowledged. A restarted application resumes where it left off:
it rejoins its channels, syncs each from its saved seq, and resends its outbox with the
original cids, so every outbox message is stored exactly once.

One file per user and server. Writes commit at once (WAL, ``synchronous=NORMAL``: they
survive an application crash; a power loss may lose the last ones, which only means some
events are delivered again, or a send is retried and answered ``dup``).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from tsmsg._native import packb, unpackb

_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    name TEXT PRIMARY KEY,
    last INTEGER NOT NULL,
    epoch INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    cid TEXT NOT NULL,
    channel TEXT NOT NULL,
    text TEXT NOT NULL,
    meta BLOB,
    UNIQUE (channel, cid)
);
"""

Send = tuple[str, str, str, dict[str, Any] | None]


class ClientState:
    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def load(self) -> tuple[list[tuple[str, int, int]], list[Send]]:
        """(channels as (name, last, epoch), outbox as (cid, channel, text, meta) in order)."""
        channels = [
            (str(n), int(last), int(epoch))
            for n, last, epoch in self._db.execute("SELECT name, last, epoch FROM channels")
        ]
        outbox: list[Send] = []
        rows = self._db.execute("SELECT cid, channel, text, meta FROM outbox ORDER BY pos")
        for cid, channel, text, meta in rows:
            outbox.append((cid, channel, text, None if meta is None else unpackb(meta)))
        return channels, outbox

    def follow(self, channel: str, following: bool) -> None:
        if following:
            self._db.execute(
                "INSERT OR IGNORE INTO channels (name, last, epoch) VALUES (?, 0, 0)", (channel,)
            )
        else:
            self._db.execute("DELETE FROM channels WHERE name = ?", (channel,))

    def save_position(self, channel: str, seq: int, epoch: int) -> None:
        self._db.execute(
            "UPDATE channels SET last = ?, epoch = ? WHERE name = ?", (seq, epoch, channel)
        )

    def add_send(self, cid: str, channel: str, text: str, meta: dict[str, Any] | None) -> None:
        blob = None if not meta else packb(meta)
        self._db.execute(
            "INSERT OR IGNORE INTO outbox (cid, channel, text, meta) VALUES (?, ?, ?, ?)",
            (cid, channel, text, blob),
        )

    def remove_send(self, cid: str, channel: str) -> None:
        self._db.execute("DELETE FROM outbox WHERE cid = ? AND channel = ?", (cid, channel))

    def close(self) -> None:
        self._db.close()
