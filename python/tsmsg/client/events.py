"""What the client hands to the application: typed, immutable events and request results.

Channel log entries (:class:`Message`, :class:`Edit`, :class:`Delete`) arrive through
``Client.events()`` exactly once and in seq order per channel. :class:`Resynced` is a reset
point: forget what you hold of the channel, show ``messages`` (its state up to ``head``),
and expect the next entry of the channel to have seq ``head + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Message:
    """A ``message`` entry. In a replay or a history page it holds the message's current
    state: ``text`` of the latest edit and ``edited`` (that edit's ts), or ``deleted`` with
    ``text`` and ``meta`` removed."""

    channel: str
    seq: int
    id: str
    sender: str
    ts: int
    text: str | None
    meta: dict[str, Any] | None = None
    edited: int | None = None
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Edit:
    """An ``edit`` entry: message ``id`` now reads ``text``. ``text`` is None when the
    message was deleted since (the edit's text was redacted with it)."""

    channel: str
    seq: int
    id: str
    sender: str
    ts: int
    text: str | None


@dataclass(frozen=True, slots=True)
class Delete:
    """A ``delete`` entry: message ``id`` is now a tombstone (drop its text and meta)."""

    channel: str
    seq: int
    id: str
    sender: str
    ts: int


@dataclass(frozen=True, slots=True)
class Typing:
    channel: str
    user: str
    on: bool


@dataclass(frozen=True, slots=True)
class ReadReceipt:
    channel: str
    user: str
    seq: int


@dataclass(frozen=True, slots=True)
class Presence:
    user: str
    status: str
    ts: int


@dataclass(frozen=True, slots=True)
class Membership:
    """The user is now a member of ``channel``: joined on one of its devices (``by`` is the
    user), or, for a DM, the other user wrote in it (``by`` is that user: "new message
    from ``by``"). Best effort, like presence (PROTOCOL.md 7.12)."""

    channel: str
    by: str


@dataclass(frozen=True, slots=True)
class Resynced:
    """The channel was (re)loaded: ``messages`` is its newest history page up to ``head``
    (oldest first); entries after ``head`` follow as ordinary events. Sent on the first
    join of a channel and whenever the server says the client's position is unusable
    (compacted away, or the log was reset: ``epoch`` changed)."""

    channel: str
    head: int
    epoch: int
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Left:
    """The client no longer follows ``channel`` (e.g. a refreshed token lost access)."""

    channel: str
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionChanged:
    connected: bool
    reason: str


ChannelEvent = Message | Edit | Delete
Event = (
    Message
    | Edit
    | Delete
    | Typing
    | ReadReceipt
    | Presence
    | Membership
    | Resynced
    | Left
    | ConnectionChanged
)


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Ack:
    """A stored write: ``seq``/``id``/``ts`` of the message (for edit/delete: ``seq`` and
    ``ts`` of the new entry, ``id`` its target). ``dup``: the cid was already stored."""

    channel: str
    seq: int
    id: str
    ts: int
    dup: bool


@dataclass(frozen=True, slots=True)
class JoinInfo:
    channel: str
    head: int
    read: int
    epoch: int
    horizon: int


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """Newest messages first fetched, oldest first in the tuple; the next older page is
    ``history(channel, before=messages[0].seq)`` while ``more``."""

    messages: tuple[Message, ...]
    more: bool


@dataclass(frozen=True, slots=True)
class SyncPage:
    """Raw log entries after a position (``Client.sync``); unknown kinds are left out."""

    channel: str
    events: tuple[ChannelEvent, ...]
    more: bool
    head: int
    epoch: int


@dataclass(frozen=True, slots=True)
class ChannelSummary:
    """One of the user's channels or DMs (``Client.list_channels``): its ``head``, the
    user's ``read`` cursor, the ``unread`` count (a lower bound when ``capped``) and, for a
    DM, the other user (``peer``)."""

    channel: str
    head: int
    read: int
    unread: int
    capped: bool = False
    peer: str | None = None


@dataclass(frozen=True, slots=True)
class PresenceInfo:
    user: str
    status: str
    online: bool
    last_seen: int | None = None


# ---------------------------------------------------------------------------- from frames


def message_from(channel: str, m: dict[str, Any]) -> Message:
    """A stored message entry (a history element or a replayed/live ``message`` event)."""
    return Message(
        channel=channel,
        seq=m["seq"],
        id=m["id"],
        sender=m["sender"],
        ts=m["ts"],
        text=m.get("text"),
        meta=m.get("meta"),
        edited=m.get("edited"),
        deleted=bool(m.get("deleted", False)),
    )


def entry_from(channel: str, e: dict[str, Any]) -> ChannelEvent | None:
    """A log entry as an app event; None for a kind this client does not know (the
    protocol says: skip it, still advancing the position)."""
    kind = e.get("kind")
    if kind == "message":
        return message_from(channel, e)
    if kind == "edit":
        return Edit(channel, e["seq"], e["id"], e["sender"], e["ts"], e.get("text"))
    if kind == "delete":
        return Delete(channel, e["seq"], e["id"], e["sender"], e["ts"])
    return None
