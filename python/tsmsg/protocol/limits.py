"""Protocol limits: every bound a client can hit, with its default and the reason for it.
They are settings (see tsmsg.server.settings); clients learn them from ``welcome``."""

from __future__ import annotations

from dataclasses import dataclass

from tsmsg._native import DEFAULT_MAX_DEPTH, DEFAULT_MAX_FRAME

PROTOCOL_VERSION = 1
# Bytes a reply or event needs besides its text and meta (keys, ids, names, a page's
# wrapping); a max_frame that cannot hold one maximal message is refused at start.
FRAME_ENVELOPE = 2048


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame: int = DEFAULT_MAX_FRAME  # 1 MiB: a page of history fits; a frame is buffered whole
    max_depth: int = DEFAULT_MAX_DEPTH  # 32: chat frames nest 3 deep; bounds decoder recursion
    max_text_bytes: int = 16 * 1024  # 16 KiB of UTF-8: a long message, not a file transfer
    max_meta_bytes: int = 4 * 1024  # 4 KiB encoded: attachments' references, not contents
    max_cid_chars: int = 64  # a UUID is 36; room for client prefixes
    history_default: int = 50  # a screenful of messages
    history_max: int = 500  # bounds one read transaction and one reply
    sync_default: int = 500  # catch-up pages are larger: they are replayed, not shown
    sync_max: int = 5000
    max_joined: int = 1024  # channels one connection may be joined to (fan-out set size)
    heartbeat_ms: int = 30_000  # announced in welcome; clients ping at least this often
    frame_rate: float = 200.0  # frames per second per connection, sustained
    frame_burst: int = 400  # frames a connection may send at once above the rate

    def __post_init__(self) -> None:
        # Every server frame fits in max_frame: an event or a one-entry page carries at
        # most the text, the meta and a bounded envelope.
        need = self.max_text_bytes + self.max_meta_bytes + FRAME_ENVELOPE
        if self.max_frame < need:
            raise ValueError(
                f"max_frame {self.max_frame} is too small for max_text_bytes + "
                f"max_meta_bytes + {FRAME_ENVELOPE} bytes of envelope = {need}"
            )
        if self.frame_rate <= 0 or self.frame_burst < 1:
            raise ValueError("frame_rate must be > 0 and frame_burst >= 1")

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
        }
