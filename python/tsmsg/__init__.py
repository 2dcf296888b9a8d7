"""tsmsg: a real-time chat messaging server and its wire protocol.

The native codec lives in the private module ``tsmsg._native``; this package owns the
public API and re-exports what users need.
"""

from tsmsg._native import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_FRAME,
    DedupRing,
    FrameDecoder,
    encode,
    encode_many,
)

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_FRAME",
    "DedupRing",
    "FrameDecoder",
    "encode",
    "encode_many",
]
__version__ = "0.1.0"
