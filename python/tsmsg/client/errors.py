"""Client exceptions: one class per wire error code (PROTOCOL.md section 8), built from the
codes in :mod:`tsmsg.protocol.errors` so client and server share one table.

Branch on the class (``except Forbidden``) or on ``code``. A code this client does not know
becomes a plain :class:`ClientError`. :class:`ConnectionClosed` is local: the connection went
away while a request whose outcome cannot be known (``edit``, ``delete``) was in flight, or
the client was closed or gave up.
"""

from __future__ import annotations

from typing import Any

from tsmsg.protocol import errors as E


class ClientError(Exception):
    """An error the server answered (``code`` is its stable wire code), or a local check
    of the same rule before sending."""

    code: str = "error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BadRequest(ClientError):
    code = E.BAD_REQUEST


class LimitExceeded(ClientError):
    code = E.LIMIT_EXCEEDED


class UnknownType(ClientError):
    code = E.UNKNOWN_TYPE


class Forbidden(ClientError):
    code = E.FORBIDDEN


class NotFound(ClientError):
    code = E.NOT_FOUND


class RateLimited(ClientError):
    """``retry_after``: seconds to wait before sending the refused request again. The
    client retries rate-limited requests itself; this surfaces only where it cannot (a
    connection refused at admission while ``reconnect`` is off)."""

    code = E.RATE_LIMITED

    def __init__(self, code: str, message: str, retry_after: float = 0.0) -> None:
        super().__init__(code, message)
        self.retry_after = retry_after


class StoreUnavailable(ClientError):
    code = E.STORE_UNAVAILABLE


class Internal(ClientError):
    code = E.INTERNAL


class Unauthorized(ClientError):
    code = E.UNAUTHORIZED


class TokenExpired(ClientError):
    code = E.TOKEN_EXPIRED


class UnsupportedVersion(ClientError):
    code = E.UNSUPPORTED_VERSION


class ProtocolViolation(ClientError):
    """The server closed the connection over the client's framing or timing (``bad_frame``,
    ``frame_too_large``, ``hello_required``, ``hello_timeout``, ``idle_timeout``,
    ``frame_timeout``): a client bug or a stalled connection."""


class ShuttingDown(ClientError):
    code = E.SHUTTING_DOWN


class ConnectionClosed(ClientError):
    code = "connection_closed"

    def __init__(self, message: str) -> None:
        super().__init__(self.code, message)


class ResyncRequired(ClientError):
    """``Client.sync`` was answered ``resync``: the position is unusable (``reason``:
    compacted, ahead, epoch); reload from ``head`` with ``history``."""

    code = "resync"

    def __init__(self, channel: str, head: int, epoch: int, reason: str) -> None:
        super().__init__(self.code, f"{channel}: resync from head {head} ({reason})")
        self.channel, self.head, self.epoch, self.reason = channel, head, epoch, reason


_BY_CODE: dict[str, type[ClientError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        LimitExceeded,
        UnknownType,
        Forbidden,
        NotFound,
        RateLimited,
        StoreUnavailable,
        Internal,
        Unauthorized,
        TokenExpired,
        UnsupportedVersion,
        ShuttingDown,
    )
}
_VIOLATIONS = E.CONNECTION_ERRORS - set(_BY_CODE)


def error_from_frame(frame: dict[str, Any]) -> ClientError:
    """The exception for an ``error`` (or ``bye``) frame."""
    code = str(frame.get("code", "error"))
    message = str(frame.get("message", ""))
    if code == E.RATE_LIMITED:
        return RateLimited(code, message, retry_after_ms(frame) / 1000)
    if code in _VIOLATIONS:
        return ProtocolViolation(code, message)
    cls = _BY_CODE.get(code, ClientError)
    return cls(code, message)


def retry_after_ms(frame: dict[str, Any]) -> int:
    value = frame.get("retry_after_ms")
    return value if type(value) is int and value > 0 else 1
