"""Wire error codes (stable snake_case strings, listed in PROTOCOL.md) and the exception
the protocol core raises for a request it refuses."""

from __future__ import annotations

from typing import Any

# Connection errors: the server sends the error frame and closes the connection.
BAD_FRAME = "bad_frame"  # invalid msgpack, not a map, too deep, no string `t`, ...
FRAME_TOO_LARGE = "frame_too_large"  # declared length over max_frame
HELLO_REQUIRED = "hello_required"  # the first frame was not `hello`
HELLO_TIMEOUT = "hello_timeout"  # no `hello` within the server's deadline
IDLE_TIMEOUT = "idle_timeout"  # nothing received for two heartbeat intervals
FRAME_TIMEOUT = "frame_timeout"  # a frame started but did not complete within the deadline
UNSUPPORTED_VERSION = "unsupported_version"  # `hello.v` is not a version this server speaks
UNAUTHORIZED = "unauthorized"  # bad token at hello
TOKEN_EXPIRED = "token_expired"  # expired token at hello
SHUTTING_DOWN = "shutting_down"  # sent in `bye` when the server stops

# Request errors: the connection stays open.
BAD_REQUEST = "bad_request"  # missing or wrong-typed field, value out of range
LIMIT_EXCEEDED = "limit_exceeded"  # a value over its documented limit (text, meta, ...)
UNKNOWN_TYPE = "unknown_type"  # a `t` this server does not know
FORBIDDEN = "forbidden"  # the token does not allow this channel or action
NOT_FOUND = "not_found"  # no such message (or it was deleted)
RATE_LIMITED = "rate_limited"  # slow down: retry after `retry_after_ms`
STORE_UNAVAILABLE = "store_unavailable"  # the write was not stored; retry with the same cid
INTERNAL = "internal"  # a server bug; the request may be retried

CONNECTION_ERRORS = frozenset(
    {
        BAD_FRAME,
        FRAME_TOO_LARGE,
        HELLO_REQUIRED,
        HELLO_TIMEOUT,
        IDLE_TIMEOUT,
        FRAME_TIMEOUT,
        UNSUPPORTED_VERSION,
        UNAUTHORIZED,
        TOKEN_EXPIRED,
    }
)


class RequestError(Exception):
    """A request the server refuses: becomes ``{"t": "error", "rid", "code", "message"}``."""

    def __init__(self, code: str, message: str, *, fatal: bool | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra
        # Connection errors close the connection; so does any error before hello.
        self.fatal = code in CONNECTION_ERRORS if fatal is None else fatal

    def frame(self, rid: int | None) -> dict[str, Any]:
        frame: dict[str, Any] = {"t": "error"}
        if rid is not None:
            frame["rid"] = rid
        frame.update(code=self.code, message=self.message, **self.extra)
        return frame
