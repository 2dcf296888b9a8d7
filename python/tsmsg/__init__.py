"""tsmsg: a real-time chat messaging server and its wire protocol.

The native codec lives in the private module ``tsmsg._native``; this package owns the
public API and re-exports what users need.
"""

from typing import Any

from tsmsg._native import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_FRAME,
    DedupRing,
    FrameDecoder,
    encode,
    encode_many,
)


def __getattr__(name: str) -> Any:
    # ``tsmsg.connect`` is the client's entry point; imported on first use so that the
    # server (and anything else importing tsmsg) does not load the client and anyio.
    if name == "connect":
        from tsmsg.client import connect

        return connect
    raise AttributeError(f"module 'tsmsg' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_FRAME",
    "DedupRing",
    "FrameDecoder",
    "connect",
    "encode",
    "encode_many",
]
__version__ = "0.1.0"
