"""A node's record of each user's latest presence change handed on
(server/presence_order.py), by plain calls."""

from __future__ import annotations

from tsmsg.server.presence_order import LatestPresence


def test_a_change_older_than_the_last_handed_on_is_dropped() -> None:
    latest = LatestPresence(keep_s=10.0)
    assert latest.fresh("alice", 5, now=0.0)
    assert not latest.fresh("alice", 3, now=1.0)  # decided before: dropped
    assert not latest.fresh("alice", 5, now=1.0)  # the same change again
    assert latest.fresh("alice", 6, now=1.0)
    assert latest.fresh("bob", 1, now=1.0)  # per user
    assert latest.fresh("alice", 0, now=1.0) and latest.fresh("alice", 0, now=1.0)  # none


def test_entries_are_forgotten_after_keep_s() -> None:
    latest = LatestPresence(keep_s=10.0)
    latest.fresh("alice", 5, now=0.0)
    latest.fresh("bob", 5, now=1.0)
    latest.fresh("carol", 1, now=20.0)
    assert list(latest.handled) == ["carol"]
    assert latest.fresh("alice", 3, now=20.0)  # forgotten: handed on


def test_an_order_remembered_longer_than_keep_s_drops_nothing() -> None:
    """A change whose order is below one remembered past keep_s is handed on: after
    Redis lost a user's counter, a node that has seen no other change of the user since
    must not drop the user's changes until it trims (found by review: dropped for good)."""
    latest = LatestPresence(keep_s=10.0)
    assert latest.fresh("alice", 50, now=0.0)
    assert not latest.fresh("alice", 1, now=9.0)
    assert latest.fresh("alice", 1, now=100.0)
