"""tsmsg: a real-time chat messaging server and its wire protocol.

The native codec lives in the private module ``tsmsg._native``; this package owns the
public API and re-exports what users need.
"""

import importlib
from typing import Any

from tsmsg import compiled

compiled.install()  # before any compiled module is imported: tsmsg/compiled.py

from tsmsg._native import (  # noqa: E402
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_FRAME,
    DedupRing,
    FrameDecoder,
    encode,
    encode_many,
)

# Submodules an application reaches as ``tsmsg.<name>`` right after ``import tsmsg``.
_SUBMODULES = ("auth", "client", "tls")


def __getattr__(name: str) -> Any:
    # The client's API (``tsmsg.connect``, the event classes ``tsmsg.Message``...) and the
    # submodules are imported on first use, so that the server (and anything else
    # importing tsmsg) does not load the client and anyio.
    if name in _SUBMODULES:
        return importlib.import_module(f"tsmsg.{name}")
    if name == "TokenIssuer":
        from tsmsg.auth import TokenIssuer

        return TokenIssuer
    client = importlib.import_module("tsmsg.client")
    if name in client.__all__:
        return getattr(client, name)
    raise AttributeError(f"module 'tsmsg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_FRAME",
    # the client's API, from tsmsg.client (connect, Client, the events and errors)
    "Ack",
    "ChannelEvent",
    "ChannelSummary",
    "Client",
    "ClientError",
    "ConnectionChanged",
    "ConnectionClosed",
    "DedupRing",
    "Delete",
    "Edit",
    "Event",
    "Forbidden",
    "FrameDecoder",
    "HistoryPage",
    "JoinInfo",
    "Left",
    "Membership",
    "Message",
    "NotFound",
    "Presence",
    "PresenceInfo",
    "RateLimited",
    "ReadReceipt",
    "Resynced",
    "SyncPage",
    "TokenExpired",
    "TokenIssuer",
    "TokenProvider",
    "Typing",
    "Unauthorized",
    "auth",
    "client",
    "connect",
    "encode",
    "encode_many",
    "tls",
]
__version__ = "0.1.0"
