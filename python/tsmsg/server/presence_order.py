"""Which presence push of a user is the latest, on a shared engine (docs/cluster.md,
"Presence").

Each change of a user's presence in the engine gets the user's next presence order
(``{u:<user>}:pv``, moved atomically with the change: redis_scripts.py). The nodes push
their changes to one another with it, and each node, for itself and its members, hands
on a user's change only if its order is greater than the last one it handled for that
user: of two changes decided in one order in the engine and pushed in the other (a sweep
of a dead node's entry deciding "offline", then the user's device connecting to another
node, whose "online" is pushed before the sweep's "offline"), the older is dropped.
"""

from __future__ import annotations

import itertools


class LatestPresence:
    """user -> the order of the last presence change of the user handed on here, and
    when (monotonic s). An entry is kept ``keep_s`` (two presence TTLs: longer than any
    push takes between nodes), oldest first, trimmed as changes come: memory is bounded
    by the users whose presence changed lately."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s
        self.handled: dict[str, tuple[int, float]] = {}

    def fresh(self, user: str, order: int, now: float) -> bool:
        """Whether a change of ``user`` with ``order`` is to be handed on (and, if so,
        it is the user's latest here). An order of 0 (none: one node's store) always
        is."""
        if order <= 0:
            return True
        handled = self.handled
        held = handled.get(user)
        if held is not None and held[0] >= order and held[1] >= now - self.keep_s:
            return False  # (an order remembered longer than keep_s drops nothing)
        handled.pop(user, None)
        handled[user] = (order, now)  # at the end: oldest first
        for old, (_, at) in list(itertools.islice(handled.items(), 2)):
            if at < now - self.keep_s:
                del handled[old]
        return True
