"""The relay's per-channel ordering (python/tsmsg/server/relay.py), by plain calls: what a
node delivers to its members is each seq once, in order, with no gap, whatever order,
repeats and losses pub/sub brings, the gaps filled from the log; or a reset."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tsmsg.server.relay import GAP_WAIT_MS, Relay, Reset

CH = "room-1"


def relay_at(head: int, epoch: int = 7, **kw: int) -> Relay[int]:
    relay: Relay[int] = Relay(**kw)
    relay.follow(CH)
    assert relay.position(CH, epoch, head, 0) == []
    return relay


def test_in_order_events_pass_through_and_repeats_are_dropped() -> None:
    relay = relay_at(3)
    assert relay.offer(CH, 7, 4, 4, 0) == [4]
    assert relay.offer(CH, None, 5, 5, 0) == [5]  # this node's own commit
    assert relay.offer(CH, 7, 5, 5, 0) == []  # the same seq through pub/sub
    assert relay.offer(CH, 7, 2, 2, 0) == []  # before the position
    assert relay.due(10_000) == []


def test_a_gap_is_held_then_filled_by_the_late_event() -> None:
    relay = relay_at(0)
    assert relay.offer(CH, 7, 2, 2, 0) == []
    assert relay.offer(CH, 7, 3, 3, 5) == []
    assert relay.offer(CH, 7, 1, 1, 10) == [1, 2, 3]
    assert relay.due(10_000) == []


def test_a_gap_not_filled_in_time_is_read_from_the_log() -> None:
    relay = relay_at(0)
    assert relay.offer(CH, 7, 3, 3, 0) == []
    assert relay.due(GAP_WAIT_MS - 1) == []
    assert relay.due(GAP_WAIT_MS) == [(CH, 0)]
    assert relay.due(GAP_WAIT_MS * 5) == []  # one read at a time
    assert relay.filled(CH, 7, 3, [(1, 1), (2, 2), (3, 3)], GAP_WAIT_MS) == [1, 2, 3]
    assert relay.offer(CH, 7, 4, 4, GAP_WAIT_MS) == [4]


def test_events_before_the_position_are_held_and_those_it_covers_dropped() -> None:
    relay: Relay[int] = Relay()
    relay.follow(CH)
    assert relay.offer(CH, 7, 5, 5, 0) == []
    assert relay.offer(CH, 7, 6, 6, 0) == []
    assert relay.position(CH, 7, 5, 0) == [6]  # 5 is in what the subscriber reads


def test_a_channel_without_a_log_takes_the_epoch_of_its_first_event() -> None:
    relay = relay_at(0, epoch=0)  # joined before anything was written
    assert relay.offer(CH, None, 1, 1, 0) == [1]  # this node's own first commit
    assert relay.offer(CH, 9, 2, 2, 0) == [2]  # another node's, in the epoch it created
    assert isinstance(relay.offer(CH, 10, 3, 3, 0), Reset)  # and later another epoch


def test_a_log_read_from_before_the_log_existed_is_no_other_epoch() -> None:
    """A gap read issued when the channel had no log (epoch 0) whose answer comes after
    the first events set the epoch: not a reset (the three-node cluster test reset its
    members this way, 2 runs in 6). The gap is read again."""
    relay = relay_at(0, epoch=0)
    relay.check(CH, 0)  # the subscription began: read the log after 0
    assert relay.due(0) == [(CH, 0)]  # the read runs now, before anything is written
    assert relay.offer(CH, 9, 2, 2, 1) == []  # the first events arrive, 1 is late
    assert relay.filled(CH, 0, 0, [], 2) == []  # the read's answer: no log yet
    assert relay.due(2 + GAP_WAIT_MS) == [(CH, 0)]  # read again, in epoch 9 now
    assert relay.filled(CH, 9, 2, [(1, 1), (2, 2)], 2 + GAP_WAIT_MS) == [1, 2]


def test_a_full_hold_is_read_from_the_log_at_once() -> None:
    relay = relay_at(0, max_held=3)
    for seq in (2, 3, 4, 5):
        assert relay.offer(CH, 7, seq, seq, 0) == []
    assert relay.due(1) == [(CH, 0)]  # not GAP_WAIT_MS later: the hold is full
    entries = [(s, s) for s in range(1, 6)]
    assert relay.filled(CH, 7, 5, entries, 1) == [1, 2, 3, 4, 5]


def test_another_epoch_or_a_compacted_gap_resets_the_channel() -> None:
    relay = relay_at(10)
    assert relay.offer(CH, 8, 1, 1, 0) == Reset(CH, 1, 8)  # the log restarted
    assert relay.offer(CH, 8, 2, 2, 0) == [2]  # and continues from there
    assert relay.offer(CH, 8, 4, 4, 0) == []
    assert relay.due(GAP_WAIT_MS) == [(CH, 2)]
    assert relay.filled(CH, 8, 50, [], GAP_WAIT_MS, resync=True) == Reset(CH, 50, 8)
    assert relay.offer(CH, 8, 51, 51, GAP_WAIT_MS) == [51]
    assert relay.lost(CH, 8, 60) == Reset(CH, 60, 8)
    assert relay.offer(CH, 8, 60, 60, 0) == []
    assert relay.offer(CH, 8, 61, 61, 0) == [61]


def test_unfollowed_channels_deliver_nothing() -> None:
    relay: Relay[int] = Relay()
    assert relay.offer(CH, 7, 1, 1, 0) == []
    relay.follow(CH)
    relay.unfollow(CH)
    assert relay.offer(CH, 7, 1, 1, 0) == []
    assert relay.filled(CH, 7, 1, [(1, 1)], 0) == []


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n=st.integers(1, 200),
    drop=st.floats(0, 0.5),
    dup=st.floats(0, 0.5),
    max_held=st.integers(1, 50),
)
def test_any_arrival_order_delivers_each_seq_once_in_order(
    seed: int, n: int, drop: float, dup: float, max_held: int
) -> None:
    """Pub/sub shuffles, drops and repeats a log of ``n`` entries; the log fills what
    the relay asks for. Delivered: 1, 2, 3, ... in order, each once, up to the last
    arrival at least."""
    rnd = random.Random(seed)
    arrivals = [s for s in range(1, n + 1) if rnd.random() >= drop]
    arrivals += [s for s in arrivals if rnd.random() < dup]
    rnd.shuffle(arrivals)
    relay = relay_at(0, max_held=max_held)
    delivered: list[int] = []
    now = 0
    for seq in arrivals:
        now += rnd.randint(0, 30)
        out = relay.offer(CH, 7, seq, seq, now)
        assert isinstance(out, list)
        delivered += out
        for channel, since in relay.due(now):
            filled = relay.filled(channel, 7, n, [(s, s) for s in range(since + 1, n + 1)], now)
            assert isinstance(filled, list)
            delivered += filled
    now += GAP_WAIT_MS  # the stream goes quiet: every gap left is read from the log
    for channel, since in relay.due(now):
        filled = relay.filled(channel, 7, n, [(s, s) for s in range(since + 1, n + 1)], now)
        assert isinstance(filled, list)
        delivered += filled
    # A dense prefix of the log (the fills read up to its end), past every arrival.
    assert delivered == list(range(1, len(delivered) + 1))
    assert len(delivered) >= max(arrivals, default=0)
