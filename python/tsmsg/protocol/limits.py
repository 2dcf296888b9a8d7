"""Protocol limits: every bound a client can hit, with its default and the reason for it.
They are settings (see tsmsg.server.settings); clients learn them from ``welcome``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from tsmsg._native import DEFAULT_MAX_DEPTH, DEFAULT_MAX_FRAME, FrameDecoder

PROTOCOL_VERSION = 1
# The longest cid any server of this version stores (the store's dedup keys are sized
# for it); the max_cid_chars setting may only lower it.
MAX_CID_CHARS = 64
# Bytes a reply or event needs besides its text and meta (keys, ids, names, a page's
# wrapping); a max_frame that cannot hold one maximal message is refused at start.
FRAME_ENVELOPE = 2048


MAX_FRAME_LIMIT = 2**32 - 1  # the 4-byte length prefix (PROTOCOL.md section 2)
# The largest integer limit: welcome carries them, and msgpack's signed integers end here
# (a larger heartbeat_ms started a server whose every welcome failed to encode).
MAX_INT_LIMIT = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame: int = DEFAULT_MAX_FRAME  # 1 MiB: a page of history fits; a frame is buffered whole
    max_depth: int = DEFAULT_MAX_DEPTH  # 32: chat frames nest 3 deep; bounds decoder recursion
    max_text_bytes: int = 16 * 1024  # 16 KiB of UTF-8: a long message, not a file transfer
    max_meta_bytes: int = 4 * 1024  # 4 KiB encoded: attachments' references, not contents
    max_cid_chars: int = MAX_CID_CHARS  # a UUID is 36; room for client prefixes
    history_default: int = 50  # a screenful of messages
    history_max: int = 500  # bounds one read transaction and one reply
    sync_default: int = 500  # catch-up pages are larger: they are replayed, not shown
    sync_max: int = 5000
    max_joined: int = 1024  # channels one connection may be joined to (fan-out set size)
    heartbeat_ms: int = 30_000  # announced in welcome; clients ping at least this often
    frame_rate: float = 200.0  # frames per second per connection, sustained
    frame_burst: int = 400  # frames a connection may send at once above the rate
    # A person types a few messages a second at most; bursts cover pastes and outboxes.
    send_rate: float = 10.0  # sends, edits and deletes per second per user, all devices
    send_burst: int = 50
    channel_send_rate: float = 5.0  # the same per (user, channel): no one floods one room
    channel_send_burst: int = 30
    typing_rate: float = 2.0  # typing frames per second per user (clients send every ~3 s)
    typing_burst: int = 10
    # Status changes are pushed to everyone who shares a channel: a person sets one now
    # and then, a client maybe on each focus change; a flood would multiply by the audience.
    presence_rate: float = 1.0  # presence status changes per second per user, all devices
    presence_burst: int = 10
    typing_timeout_ms: int = 6_000  # an `on` not renewed or turned off expires after this
    refresh_grace_ms: int = 30_000  # after the token expires, time to send `refresh`
    # A client that goes on sending while refused for this long is disconnected.
    rate_limited_disconnect_ms: int = 10_000
    max_status_chars: int = 64  # presence status: a word or a short custom text
    # users (or channels) one presence (unread) query names; channels one `channels` page lists
    max_presence_users: int = 100
    # Log entries one unread count reads (per channel); past it, a bound. 10,000 entries
    # are ~20 ms of a worker thread; an app shows "9999+" long before that.
    unread_scan_max: int = 10_000
    # Durable memberships per user (every channel ever joined and not left with `forget`):
    # bounds what a join counts and what presence walks for a user.
    max_memberships: int = 1000

    def __post_init__(self) -> None:
        # Every server frame fits in max_frame: an event or a one-entry page carries at
        # most the text, the meta and a bounded envelope.
        need = self.max_text_bytes + self.max_meta_bytes + FRAME_ENVELOPE
        if self.max_frame < need:
            raise ValueError(
                f"max_frame {self.max_frame} is too small for max_text_bytes + "
                f"max_meta_bytes + {FRAME_ENVELOPE} bytes of envelope = {need}"
            )
        check_minimums(self, MINIMUMS)
        if self.max_frame > MAX_FRAME_LIMIT:  # the length prefix is a u32
            raise ValueError(f"max_frame must be <= {MAX_FRAME_LIMIT}")
        # The server writes frames as deep as max_depth (a page's meta) and its encoder
        # stops at DEFAULT_MAX_DEPTH: a deeper limit would accept sends it cannot page.
        # Checked before the decoder's own bounds, whose message names a larger maximum
        # and which overflow (a traceback) past 64 bits.
        if self.max_depth > DEFAULT_MAX_DEPTH:
            raise ValueError(f"max_depth must be <= {DEFAULT_MAX_DEPTH}, not {self.max_depth}")
        FrameDecoder(max_frame=self.max_frame, max_depth=self.max_depth)  # its own bounds
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, int) and value > MAX_INT_LIMIT:
                raise ValueError(f"{f.name} must be <= {MAX_INT_LIMIT}, not {value}")
        # The store's dedup keys hold at most MAX_CID_CHARS: a longer cid would pass the
        # protocol's check and then fail in the store.
        if not 1 <= self.max_cid_chars <= MAX_CID_CHARS:
            raise ValueError(f"max_cid_chars must be 1 to {MAX_CID_CHARS}")
        for page in ("history", "sync"):
            if not 1 <= getattr(self, f"{page}_default") <= getattr(self, f"{page}_max"):
                raise ValueError(f"{page}_default must be 1 to {page}_max")

    def announce(self) -> dict[str, int | float]:
        """The limits a client needs to know, sent in ``welcome.limits``."""
        return {
            "max_depth": self.max_depth,
            "max_text_bytes": self.max_text_bytes,
            "max_meta_bytes": self.max_meta_bytes,
            "max_cid_chars": self.max_cid_chars,
            "history_default": self.history_default,
            "history_max": self.history_max,
            "sync_default": self.sync_default,
            "sync_max": self.sync_max,
            "max_joined": self.max_joined,
            "frame_rate": self.frame_rate,
            "frame_burst": self.frame_burst,
            "send_rate": self.send_rate,
            "send_burst": self.send_burst,
            "channel_send_rate": self.channel_send_rate,
            "channel_send_burst": self.channel_send_burst,
            "typing_rate": self.typing_rate,
            "typing_burst": self.typing_burst,
            "typing_timeout_ms": self.typing_timeout_ms,
            "refresh_grace_ms": self.refresh_grace_ms,
            "max_status_chars": self.max_status_chars,
            "max_presence_users": self.max_presence_users,
            "unread_scan_max": self.unread_scan_max,
            "max_memberships": self.max_memberships,
            "presence_rate": self.presence_rate,
            "presence_burst": self.presence_burst,
        }


def check_minimums(obj: object, minimums: Mapping[str, tuple[float, bool]]) -> None:
    """Each named field at or above its lowest valid value (above it, when excluded: a
    timeout or a rate must be > 0), and finite: NaN and infinity fail (the limits go to
    clients in `welcome`, and JSON has neither). For the settings and the limits."""
    for name, (low, strict) in minimums.items():
        value = getattr(obj, name)
        if not (value > low if strict else value >= low) or not math.isfinite(value):
            what = f"{'>' if strict else '>='} {low:g} and finite"
            raise ValueError(f"{name} must be {what}, not {value!r}")


# The token buckets among the limits: each has a `_rate` (> 0) and a `_burst` (>= 1).
RATE_KINDS = ("frame", "send", "channel_send", "typing", "presence")

# The lowest valid value of each limit checked here, and whether it is excluded (a rate
# must be > 0): checked at start, NaN included, so that no value breaks a running server.
MINIMUMS: dict[str, tuple[float, bool]] = {
    "max_depth": (1, False),
    "max_text_bytes": (0, False),
    "max_meta_bytes": (0, False),
    "max_joined": (1, False),
    "heartbeat_ms": (1, False),
    "typing_timeout_ms": (1, False),
    "refresh_grace_ms": (0, False),
    "rate_limited_disconnect_ms": (1, False),
    "max_status_chars": (1, False),
    "max_presence_users": (1, False),
    "unread_scan_max": (1, False),
    "max_memberships": (1, False),
    **{f"{kind}_rate": (0, True) for kind in RATE_KINDS},
    **{f"{kind}_burst": (1, False) for kind in RATE_KINDS},
}
