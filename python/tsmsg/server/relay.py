"""Per-channel delivery order on one node, whatever order events reach it in (sans-IO).

On one node with LMDB, committed events reach the hub in seq order. In a cluster, a
channel's events come from every node that writes to it: this node's own commits, and
the others' through Redis pub/sub, which is at-most-once and may reorder them against
this node's own commits. The :class:`Relay` restores the rules of PROTOCOL.md section 9
for this node's members: each event of a followed channel is delivered once, in seq order,
with no gap. Per channel it keeps the last seq delivered here (``last``):

- the next seq (``last + 1``) is delivered at once, and any held ones that follow it;
- a seq at or below ``last`` is a repeat and dropped;
- a seq past ``last + 1`` is held while the missing ones are probably in flight; after
  ``gap_wait_ms`` (or once ``max_held`` are held) the server is asked to read the gap from
  the log (:meth:`Relay.due`, then :meth:`Relay.filled`);
- events possibly lost with none after them to show a gap (pub/sub was cut or has just
  begun: :meth:`Relay.check`; an event dropped because ``max_held`` are held; a read that
  failed) make a log read after ``last`` owed, paid only by a read issued later;
- an event of another epoch, a log that can no longer replay the gap (compacted), or a
  position lost with pub/sub (:meth:`Relay.lost`) resets the channel: the server cuts
  the live stream of its members (a ``resync`` push: they catch up with ``sync``) and the
  relay continues from the head the log reports. Events held from the old epoch are
  dropped (their seqs mean nothing in the new log), and the answer of a read issued
  before the reset (or before the channel was left and joined again) is ignored.

A channel is followed from the first local subscription (:meth:`Relay.follow`): events
that arrive before its position is known (:meth:`Relay.position`, the head read after
subscribing) are held, then those at or below that head dropped (the subscriber reads
them with ``sync``). No clock, no I/O: time is passed in, tested with plain calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

E = TypeVar("E")  # an event as the server delivers it (a frame)

# A missing seq is usually another node's publish still on its way: wait this long before
# reading the log for it (a read costs more than a short wait).
GAP_WAIT_MS = 100
# Events held behind a gap, per channel: past this, the gap is read from the log at once
# (memory stays bounded whatever pub/sub delivers).
MAX_HELD = 1024
NOW = -(2**62)  # a time long past: a read owed since then is due at once


@dataclass(slots=True)
class Stream(Generic[E]):
    epoch: int | None = None  # None: not known yet (the first event or position tells)
    last: int | None = None  # the last seq delivered; None: position not known yet
    held: dict[int, E] = field(default_factory=dict)  # seq -> event, waiting for a gap
    gap_since: int | None = None  # ms: when the oldest unfilled gap was seen
    # ms since when a log read after ``last`` is owed whether or not a gap shows: events
    # may be missing with none after them (a check, an event dropped for a full hold, a
    # read that failed). Only a read issued later pays it: delivering in order does not.
    owed_since: int | None = None
    filling: bool = False  # a log read for the gap is under way
    stale: bool = False  # that read was issued before a reset: its answer is ignored


@dataclass(frozen=True, slots=True)
class Reset:
    """The channel's members must resync (their live stream is cut); the relay continues
    from ``head`` of ``epoch``."""

    channel: str
    head: int
    epoch: int


class Relay(Generic[E]):
    def __init__(self, gap_wait_ms: int = GAP_WAIT_MS, max_held: int = MAX_HELD) -> None:
        self.gap_wait_ms = gap_wait_ms
        self.max_held = max_held
        self.streams: dict[str, Stream[E]] = {}

    # ------------------------------------------------------------------ following

    def follow(self, channel: str) -> None:
        """This node subscribed to ``channel`` (its first local member): hold its events
        until :meth:`position` says where the subscriber starts."""
        self.streams.setdefault(channel, Stream())

    def follows(self, channel: str) -> bool:
        return channel in self.streams

    def unfollow(self, channel: str) -> None:
        self.streams.pop(channel, None)

    def position(self, channel: str, epoch: int, head: int, now_ms: int) -> list[E]:
        """The head of ``channel`` as read after :meth:`follow`: what was held past it is
        delivered now (in order, up to a gap). A position already known stays: the
        members that follow from it get every later event (a later subscriber's read
        covers the ones before its own head, and a repeat does no harm: rule 7). Epoch 0:
        the channel has no log yet; its first event tells the epoch."""
        s = self.streams.get(channel)
        if s is None:
            return []
        if s.last is None:
            if epoch and s.epoch is not None and epoch != s.epoch:
                # The held events and the read disagree on the log (reset between them):
                # epochs are not ordered, so a read tells which is the current one.
                s.held.clear()
                s.owed_since = NOW
            s.epoch, s.last = epoch or s.epoch, head
        elif s.epoch is None and epoch:
            s.epoch = epoch  # joined before the log existed: this read tells its epoch
        return self._drain(s, now_ms)

    # ------------------------------------------------------------------ events

    def offer(
        self, channel: str, epoch: int | None, seq: int, event: E, now_ms: int
    ) -> list[E] | Reset:
        """An event of ``channel`` reached this node (``epoch`` None: of the epoch already
        known). Returns the events to deliver now, in order,
        or a reset: the event belongs to another epoch (the log was lost and restarted)."""
        s = self.streams.get(channel)
        if s is None:
            return []  # nobody here follows the channel
        if epoch is not None and s.epoch is not None and epoch != s.epoch:
            return self._reset(channel, s, epoch, seq)  # the members' sync covers it
        if s.epoch is None:
            s.epoch = epoch
        if s.last is not None and seq <= s.last:
            return []  # a repeat
        if len(s.held) < self.max_held or seq in s.held:
            s.held[seq] = event
        else:
            s.owed_since = NOW  # too many held: dropped, read from the log at once
        return self._drain(s, now_ms)

    def _drain(self, s: Stream[E], now_ms: int) -> list[E]:
        if s.last is None:
            return []  # position unknown: keep holding
        out: list[E] = []
        for seq in [q for q in s.held if q <= s.last]:
            del s.held[seq]
        while (nxt := s.held.pop(s.last + 1, None)) is not None:
            out.append(nxt)
            s.last += 1
        if not s.held:
            s.gap_since = None
        elif s.gap_since is None:
            s.gap_since = now_ms
        return out

    # ------------------------------------------------------------------ gaps

    def due(self, now_ms: int) -> list[tuple[str, int]]:
        """Gaps waited on long enough: ``(channel, since)`` for the server to read from
        the log (entries after ``since``), then hand to :meth:`filled`."""
        out = []
        for channel, s in self.streams.items():
            if s.filling or s.last is None or (s.gap_since is None and s.owed_since is None):
                continue
            since = min(t for t in (s.gap_since, s.owed_since) if t is not None)
            if now_ms - since >= self.gap_wait_ms:
                s.filling, s.owed_since = True, None
                out.append((channel, s.last))
        return out

    def filled(
        self,
        channel: str,
        epoch: int,
        head: int,
        entries: Iterable[tuple[int, E]],
        now_ms: int,
        *,
        resync: bool = False,
        retry: bool = False,
        more: bool = False,
    ) -> list[E] | Reset:
        """A log read after :meth:`due`: ``entries`` (seq, event) in seq order after the
        position asked for, and the log's ``head``/``epoch``; ``resync`` when the log
        could not replay them (compacted, or a position past the head of a reset log);
        ``retry`` when the read failed: the gap is read again after ``gap_wait_ms``;
        ``more`` when the page was cut short of the head: the rest is read at once."""
        s = self.streams.get(channel)
        if s is None or not s.filling:
            return []  # not this stream's read (the channel was left and joined since)
        s.filling = False
        if s.stale:  # issued before a reset: of a position (or an epoch) now past
            s.stale = False
            return []
        if retry:  # (a gap waits again from now too: not read again at the next tick)
            s.owed_since = now_ms
            if s.gap_since is not None:
                s.gap_since = now_ms
            return []
        # Epoch 0: the read found no log yet (as in position): the events that created it
        # since, which may have set the epoch already, are no other epoch.
        if resync or (epoch and s.epoch is not None and epoch != s.epoch):
            return self._reset(channel, s, epoch, head)
        if epoch and s.epoch is None:
            s.epoch = epoch
        for seq, event in entries:
            if s.last is not None and seq > s.last:
                s.held.setdefault(seq, event)
        if more:
            s.owed_since = NOW
        return self._drain(s, now_ms)

    def check(self, channel: str, now_ms: int) -> None:
        """Events of ``channel`` may be missing without a later one showing the gap (the
        engine's subscription was cut, or has just begun): read the log after ``last``
        at the next :meth:`due`."""
        s = self.streams.get(channel)
        if s is not None:  # (before its position: once it is known)
            s.owed_since = NOW

    def lost(self, channel: str, epoch: int, head: int) -> Reset:
        """Events of ``channel`` may have been lost without a trace (pub/sub was cut, or
        the store reports another epoch): its members resync from ``head``."""
        s = self.streams.setdefault(channel, Stream())
        return self._reset(channel, s, epoch, head)

    def _reset(self, channel: str, s: Stream[E], epoch: int, head: int) -> Reset:
        # Events of the old log are dropped: their seqs mean nothing in the new one.
        s.held = {q: e for q, e in s.held.items() if q > head} if epoch == s.epoch else {}
        s.stale = s.filling  # a read under way answers for the old position: ignored
        s.epoch, s.last, s.gap_since = epoch, head, None
        return Reset(channel, head, epoch)
