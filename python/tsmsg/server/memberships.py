"""This node's copies of its connected users' memberships (server/app.py's presence).

A presence change of a user is pushed to the channels the user is a member of, and a
presence query walks the asker's and the asked users' channels: for users connected here
those sets are kept in memory, loaded when the user's first device connects and dropped
when its last device here leaves, so a change or a query walks a bounded set and asks the
store nothing.

On one node (an engine that is not shared) the copy is exact: only this node changes the
memberships, and it patches the copy as it submits each change. On a shared engine other
nodes change them too, and their notices (pub/sub) may come late, reordered or not at
all. There a copy is never patched by a notice: a notice marks it stale, and the server's
loader task reads it again from the engine, with the version the engine keeps of each
user's set (``{u:user}:mv``, moved by every change).

:class:`MembershipCopies` is that bookkeeping, without I/O or trio: the server calls it
from its trio thread, reads the stale sets off the loop, and hands the results back.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from tsmsg.auth import Claims

NOTICE_KEEP_S = 60.0  # longer than any read (the refresh's check of versions covers the rest)


class Owed(NamedTuple):
    """A presence change announced while the user's set was unread: pushed once read,
    to ``channels`` (the set, as the changing device's claims may read it)."""

    user: str
    status: str
    ts: int
    channels: list[str]
    order: int  # the change's presence order in the engine (presence_order.py)


class MembershipCopies:
    """user -> the channels the user is a member of, for the users connected here.

    Invariants (every map is keyed by user; ``sets`` is the only one read from outside):

    - ``sets`` holds a user from its first device's read (or that read's failure) until
      :meth:`forget` (its last device here gone). Every other per-user map except
      ``noticed`` holds only users in ``sets``: :meth:`forget` drops the user from all.
      ``sets`` is one dict for the server's life (``Server.memberships`` is this dict).
    - Not shared (one node): ``sets`` is exact, patched by :meth:`own_change` at each
      submit; nothing else is kept (``changed`` does nothing).
    - Shared: a set is replaced by a read from the engine, never patched by a notice.
      ``version`` is the engine's version of the set as last read (absent while never
      read). ``stale`` are the users to read (again), in order; ``wake`` is called when
      one is marked. ``gen`` is a number taken at each event that may change a set (a
      notice, a commit of one's own): a read is applied only if the user's number did
      not move while it ran, otherwise it is read again, so a read never puts back what
      a later change took away.
    - ``pending``: this node's own changes submitted and not yet committed (kind, channel,
      whether it moved the copy), applied over every read (a read may have run before
      their commit); dropped at their commit, which moves ``gen`` (a read that ran
      meanwhile may or may not have seen it).
    - ``unread``: users whose set was never read (the engine was away at their first
      device): :meth:`channels_for` says None (not "no channels"), and the latest
      presence change announced meanwhile is kept in ``owed``, pushed once read.
    - ``noticed``: when the last notice for a user came (even one not connected here
      yet), kept ``NOTICE_KEEP_S``: a first device's read that ran across it is made
      again. Oldest first, trimmed as notices come.
    """

    def __init__(self, wake: Callable[[], None] = lambda: None, *, shared: bool = False):
        self.wake = wake
        self.shared = shared
        self.sets: dict[str, set[str]] = {}
        self.version: dict[str, int] = {}
        self.stale: dict[str, None] = {}
        self.gen: dict[str, int] = {}
        self._gens = itertools.count(1)
        self.pending: dict[str, list[tuple[str, str, bool]]] = {}
        self.unread: set[str] = set()
        self.owed: dict[str, tuple[Claims | None, str, int, int]] = {}
        self.noticed: dict[str, float] = {}

    # ------------------------------------------------------------------ a user's devices

    def first_read(self, user: str, got: tuple[list[str], int] | None, started: float) -> None:
        """The read made for the user's first device, begun at ``started`` (monotonic):
        the set and its version, or None (the engine did not answer). Ignored if the set
        is here already (another device's read came first)."""
        if user in self.sets:
            return
        if got is not None:
            self.sets[user], self.version[user] = set(got[0]), got[1]
            if self.noticed.get(user, -math.inf) >= started:
                self.changed(user)  # a notice came during the read: again
        elif self.shared:
            # Read by the loader, again until the engine answers; a change announced
            # before is pushed then.
            self.sets[user] = set()
            self.unread.add(user)
            self.changed(user)

    def forget(self, user: str) -> None:
        """The user's last device here is gone: nothing of its memberships is kept."""
        self.sets.pop(user, None)
        for held in (self.version, self.stale, self.gen, self.pending, self.owed):
            held.pop(user, None)
        self.unread.discard(user)

    # ------------------------------------------------------------------ changes

    def changed(self, user: str) -> None:
        """The engine's set of a connected user's memberships may have changed: read it
        again (and not apply a read that was running meanwhile)."""
        if user in self.sets and self.shared:
            self.gen[user] = next(self._gens)
            self.stale[user] = None
            self.wake()

    def all_changed(self) -> None:
        """Notices may have been lost (pub/sub was): every set is read again."""
        for user in list(self.sets):
            self.changed(user)

    def note_notice(self, user: str, now: float) -> None:
        """A notice of another node's change of ``user``'s memberships came at ``now``
        (monotonic): marks the set stale, and is kept for a first device's read running
        now."""
        self.changed(user)
        noticed = self.noticed
        noticed.pop(user, None)
        noticed[user] = now
        for old, at in list(itertools.islice(noticed.items(), 2)):
            if at < now - NOTICE_KEEP_S:
                del noticed[old]

    def joined_by_other(self, user: str, channel: str) -> None:
        """Another user's doing made ``user`` a member (a DM peer's message), recorded:
        in the set at once, and read again."""
        mine = self.sets.get(user)
        if mine is not None:
            mine.add(channel)
            self.changed(user)  # (a read running meanwhile is read again)

    def own_change(self, user: str, kind: str, channel: str) -> None:
        """A connected user's own ``member``/``unmember`` submitted here: in the set at
        once; on a shared engine applied over every read until committed."""
        mine = self.sets.get(user)
        if mine is not None:
            moved = (channel not in mine) if kind == "member" else (channel in mine)
            (mine.add if kind == "member" else mine.discard)(channel)
            if self.shared:
                self.pending.setdefault(user, []).append((kind, channel, moved))

    def committed(
        self, user: str, kind: str, channel: str, failed: bool, recorded: bool = True
    ) -> None:
        """An :meth:`own_change` committed (or ``failed``; or not ``recorded``: a join at
        the memberships bound): a read that ran meanwhile may have missed it (not
        applied); if it failed, or was not recorded after it had moved the copy, the copy
        was ahead of the engine (read again)."""
        pending = self.pending.get(user)
        if pending is None:
            return
        entry = next((e for e in pending if e[:2] == (kind, channel)), None)
        if entry is not None:
            pending.remove(entry)
        if not pending:
            del self.pending[user]
        if user in self.gen:
            self.gen[user] = next(self._gens)
        if failed or (not recorded and entry is not None and entry[2]):
            self.changed(user)

    # ------------------------------------------------------------------ reads (the loader)

    def take_stale(self, most: int) -> dict[str, int | None]:
        """At most ``most`` stale users to read now, no longer stale: user -> its number
        (``gen``) as the read starts, for :meth:`read_done`."""
        users = list(itertools.islice(self.stale, most))
        for user in users:
            del self.stale[user]
        return {user: self.gen.get(user) for user in users}

    def read_failed(self, taken: Iterable[str]) -> None:
        """The read of ``taken`` failed: those still connected are stale again."""
        for user in taken:
            if user in self.sets:
                self.stale[user] = None

    def read_done(
        self, taken: Mapping[str, int | None], got: Mapping[str, tuple[list[str], int]]
    ) -> list[Owed]:
        """The read of ``taken`` (from :meth:`take_stale`): each set whose number did not
        move meanwhile is replaced (with this node's pending changes over it); the others
        are stale again. Returns the presence changes owed to the sets read now."""
        pushes = []
        for user, gen in taken.items():
            if user not in self.sets:
                continue  # its last device here left meanwhile
            if self.gen.get(user) != gen:
                self.stale[user] = None  # changed while read: read again
                continue
            channels, version = got[user]
            mine = set(channels)
            for kind, channel, _ in self.pending.get(user, ()):
                (mine.add if kind == "member" else mine.discard)(channel)
            self.sets[user], self.version[user] = mine, version
            self.unread.discard(user)
            owed = self.owed.pop(user, None)
            if owed is not None:  # announced before the set was known: pushed now
                claims, status, ts, order = owed
                may = [c for c in mine if claims is None or claims.may_read(c)]
                pushes.append(Owed(user, status, ts, may, order))
        return pushes

    def versioned(self) -> list[str]:
        """The users whose set was read, for a check of the engine's versions."""
        return [u for u in self.sets if u in self.version]

    def check_versions(self, versions: Mapping[str, int]) -> None:
        """The engine's versions of some sets: one that moved since it was read here (a
        notice lost on the way) is read again."""
        for user, version in versions.items():
            held = self.version.get(user)
            if held is not None and held != version:
                self.changed(user)

    # ------------------------------------------------------------------ uses

    def channels_for(self, user: str, claims: Claims | None) -> list[str] | None:
        """The channels a change of ``user`` is pushed to (those ``claims`` may read);
        None while the user's memberships were never read here (a shared engine)."""
        if user in self.unread:
            return None
        mine = self.sets.get(user, ())
        return [c for c in mine if claims is None or claims.may_read(c)]

    def known(self, user: str) -> set[str] | None:
        """The user's set if it is here and was read (None: ask the store)."""
        if user in self.unread:
            return None
        return self.sets.get(user)

    def owe(self, user: str, claims: Claims | None, status: str, ts: int, order: int) -> None:
        """A change of an unread user's status, written to the engine (its ``order``
        there): pushed once the set is read (the latest only), unless the user leaves
        first."""
        if user in self.sets:
            self.owed[user] = (claims, status, ts, order)
