"""The tsmsg reference client: ``async with tsmsg.client.connect(host, port, token=...)``.

A sans-IO protocol core (:mod:`tsmsg.client.protocol`) under an anyio front end
(:mod:`tsmsg.client.client`) that runs under trio and asyncio alike. It reconnects with
backoff, resumes every followed channel from its last applied seq, keeps unacknowledged
sends in an outbox (resent with their cid: stored once), refreshes tokens, respects rate
limits, and hands the application each channel's events exactly once and in order.
"""

from tsmsg.client.client import Client, TokenProvider, connect, token_exp
from tsmsg.client.errors import (
    BadRequest,
    ClientError,
    ConnectionClosed,
    Forbidden,
    Internal,
    LimitExceeded,
    NotFound,
    ProtocolViolation,
    RateLimited,
    ResyncRequired,
    ShuttingDown,
    StoreUnavailable,
    TokenExpired,
    Unauthorized,
    UnknownType,
    UnsupportedVersion,
    error_from_frame,
)
from tsmsg.client.events import (
    Ack,
    ChannelEvent,
    ChannelSummary,
    ConnectionChanged,
    Delete,
    Edit,
    Event,
    HistoryPage,
    JoinInfo,
    Left,
    Membership,
    Message,
    Presence,
    PresenceInfo,
    ReadReceipt,
    Resynced,
    SyncPage,
    Typing,
)
from tsmsg.client.protocol import ClientProtocol

__all__ = [
    "Ack",
    "BadRequest",
    "ChannelEvent",
    "ChannelSummary",
    "Client",
    "ClientError",
    "ClientProtocol",
    "ConnectionChanged",
    "ConnectionClosed",
    "Delete",
    "Edit",
    "Event",
    "Forbidden",
    "HistoryPage",
    "Internal",
    "JoinInfo",
    "Left",
    "LimitExceeded",
    "Membership",
    "Message",
    "NotFound",
    "Presence",
    "PresenceInfo",
    "ProtocolViolation",
    "RateLimited",
    "ReadReceipt",
    "ResyncRequired",
    "Resynced",
    "ShuttingDown",
    "StoreUnavailable",
    "SyncPage",
    "TokenExpired",
    "TokenProvider",
    "Typing",
    "Unauthorized",
    "UnknownType",
    "UnsupportedVersion",
    "connect",
    "error_from_frame",
    "token_exp",
]
