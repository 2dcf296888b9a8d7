"""Token buckets (``tsmsg.protocol.ratelimit``) with plain calls: time (ms) is passed in.

Rates are chosen so the refill arithmetic is exact in binary floating point (whole tokens,
halves, 1/64ths), so every ``retry_after_ms`` is compared exactly.
"""

from __future__ import annotations

import pytest

from tsmsg.protocol.limits import RATE_KINDS, Limits
from tsmsg.protocol.ratelimit import DEFAULT_MAX_KEYS, Buckets, TokenBucket, UserLimits

T0 = 1_700_000_000_000


# ------------------------------------------------------------------- TokenBucket


def test_bucket_starts_full_and_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3, now_ms=T0)  # a token per 100 ms
    assert [bucket.take(T0) for _ in range(3)] == [0, 0, 0]
    assert bucket.take(T0) == 100
    assert bucket.take(T0) == 100  # a refusal takes nothing
    assert bucket.take(T0 + 50) == 50  # half a token is back
    assert bucket.take(T0 + 75) == 25
    assert bucket.take(T0 + 100) == 0
    assert bucket.take(T0 + 100) == 100
    assert bucket.take(T0 + 350) == 0  # 2.5 tokens back
    assert bucket.take(T0 + 350) == 0
    assert bucket.take(T0 + 350) == 50


def test_bucket_refill_is_capped_at_the_burst() -> None:
    bucket = TokenBucket(rate=10, burst=3, now_ms=T0)
    for _ in range(3):
        bucket.take(T0)
    assert bucket.take(T0 + 3_600_000) == 0  # an hour idle: the burst, no more
    assert bucket.take(T0 + 3_600_000) == 0
    assert bucket.take(T0 + 3_600_000) == 0
    assert bucket.take(T0 + 3_600_000) == 100


def test_bucket_slow_rate_and_fractions() -> None:
    bucket = TokenBucket(rate=1 / 64, burst=1, now_ms=T0)  # a token per 64 s
    assert bucket.take(T0) == 0
    assert bucket.take(T0) == 64_000
    assert bucket.take(T0 + 1_000) == 63_000
    assert bucket.take(T0 + 63_000) == 1_000
    assert bucket.take(T0 + 64_000) == 0


def test_bucket_retry_is_at_least_one_ms() -> None:
    bucket = TokenBucket(rate=1_000_000, burst=1, now_ms=T0)  # a token per microsecond
    assert bucket.take(T0) == 0
    assert bucket.take(T0) == 1  # less than a ms away still says 1, never 0
    assert bucket.take(T0 + 1) == 0


def test_bucket_ignores_time_going_backwards() -> None:
    bucket = TokenBucket(rate=10, burst=1, now_ms=T0)
    assert bucket.take(T0) == 0
    assert bucket.take(T0 - 500) == 100  # no refill from a negative interval


# ------------------------------------------------------------------- Buckets


def test_buckets_are_independent_per_key() -> None:
    buckets = Buckets(rate=10, burst=2)
    assert [buckets.take("alice", T0) for _ in range(3)] == [0, 0, 100]
    assert [buckets.take("bob", T0) for _ in range(3)] == [0, 0, 100]
    assert buckets.take(("alice", "room-1"), T0) == 0  # any hashable key
    assert len(buckets) == 3
    assert buckets.take("alice", T0 + 50) == 50


def test_peek_does_not_take() -> None:
    buckets = Buckets(rate=10, burst=2)
    assert buckets.peek("k", T0) == 0
    assert len(buckets) == 0  # peeking at an unknown key creates no bucket
    assert buckets.take("k", T0) == 0
    assert buckets.peek("k", T0) == 0
    assert buckets.peek("k", T0) == 0  # still the one token
    assert buckets.take("k", T0) == 0
    assert buckets.peek("k", T0) == 100
    assert buckets.peek("k", T0 + 50) == 50
    assert buckets.peek("k", T0 + 100) == 0
    assert buckets.peek("k", T0 + 10**6) == 0
    # None of the peeks refilled or took anything: the bucket is where the takes left it.
    assert buckets.take("k", T0 + 50) == 50
    assert buckets.take("k", T0 + 100) == 0
    assert buckets.take("k", T0 + 100) == 100


def test_buckets_keep_at_most_max_keys() -> None:
    buckets = Buckets(rate=1, burst=1, max_keys=3)
    for key in "abc":
        assert buckets.take(key, T0) == 0
    assert len(buckets) == 3
    assert buckets.take("a", T0) == 1_000  # touching "a" makes it the most recent
    assert buckets.take("d", T0) == 0  # drops the bucket touched longest ago: "b"
    assert len(buckets) == 3
    assert buckets.peek("b", T0) == 0  # forgotten: it would start full
    assert [buckets.peek(k, T0) for k in "acd"] == [1_000, 1_000, 1_000]  # kept
    assert buckets.take("b", T0) == 0  # back, and "c" (now the oldest) is dropped
    assert buckets.peek("c", T0) == 0 and buckets.peek("a", T0) == 1_000


def test_buckets_memory_is_bounded_whatever_the_keys() -> None:
    buckets = Buckets(rate=1, burst=1, max_keys=100)
    for i in range(10_000):
        buckets.take(("user", i), T0 + i)
    assert len(buckets) == 100
    # The survivors are the 100 most recent keys.
    assert buckets.peek(("user", 9_999), T0 + 9_999) == 1_000
    assert buckets.peek(("user", 9_899), T0 + 9_999) == 0


def test_default_max_keys() -> None:
    assert Buckets(rate=1, burst=1).max_keys == DEFAULT_MAX_KEYS
    limits = UserLimits(Limits())
    for buckets in (limits.sends, limits.channel_sends, limits.typing, limits.presence):
        assert buckets.max_keys == DEFAULT_MAX_KEYS


# ------------------------------------------------------------------- UserLimits


def test_user_limits_take_their_rates_from_limits() -> None:
    limits = Limits(
        send_rate=1.5,
        send_burst=7,
        channel_send_rate=2.5,
        channel_send_burst=8,
        typing_rate=3.5,
        typing_burst=9,
    )
    user = UserLimits(limits)
    assert (user.sends.rate, user.sends.burst) == (1.5, 7)
    assert (user.channel_sends.rate, user.channel_sends.burst) == (2.5, 8)
    assert (user.typing.rate, user.typing.burst) == (3.5, 9)


def test_a_refused_send_makes_no_channel_bucket() -> None:
    """A user whose send budget is spent, sending to ever new channels, is refused each
    time and adds no (user, channel) bucket: the bounded set of buckets is not flushed
    of other users' spent ones (which would come back full)."""
    rates = Limits(send_rate=1, send_burst=2, channel_send_rate=1, channel_send_burst=1)
    limits = UserLimits(rates)
    limits.channel_sends.max_keys = 10
    assert limits.take_send("bob", "room", T0) == 0
    assert limits.take_send("bob", "room", T0) > 0  # bob's channel bucket is spent
    assert limits.take_send("mallory", "a", T0) == 0
    assert limits.take_send("mallory", "b", T0) == 0  # her user bucket is spent
    keys = len(limits.channel_sends)
    for i in range(100):
        assert limits.take_send("mallory", f"c{i}", T0) > 0
    assert len(limits.channel_sends) == keys
    assert limits.take_send("bob", "room", T0) > 0  # still limited


def test_take_send_retry_is_that_of_the_bucket_that_refused() -> None:
    # Per user: a token per 1000 ms; per (user, channel): a token per 250 ms.
    user = UserLimits(Limits(send_rate=1, send_burst=1, channel_send_rate=4, channel_send_burst=1))
    assert user.take_send("alice", "room-1", T0) == 0
    assert user.take_send("alice", "room-2", T0) == 1_000  # the per-user bucket
    assert user.take_send("bob", "room-1", T0) == 0  # another user is unaffected
    assert user.take_send("alice", "room-1", T0 + 1_000) == 0

    user = UserLimits(
        Limits(send_rate=1_000, send_burst=100, channel_send_rate=4, channel_send_burst=1)
    )
    assert user.take_send("alice", "room-1", T0) == 0
    assert user.take_send("alice", "room-1", T0) == 250  # the per-(user, channel) bucket
    assert user.take_send("alice", "room-1", T0 + 125) == 125
    assert user.take_send("alice", "room-2", T0) == 0
    assert user.take_send("alice", "room-1", T0 + 250) == 0


def test_presence_has_its_own_bucket() -> None:
    user = UserLimits(Limits(typing_rate=1, typing_burst=1, presence_rate=4, presence_burst=2))
    assert (user.presence.rate, user.presence.burst) == (4, 2)
    assert user.typing.take("alice", T0) == 0
    assert user.presence.take("alice", T0) == 0  # typing did not spend it
    assert user.presence.take("alice", T0) == 0
    assert user.presence.take("alice", T0) == 250
    assert user.presence.take("bob", T0) == 0  # per user


def test_typing_has_its_own_bucket() -> None:
    user = UserLimits(Limits(send_rate=1, send_burst=1, typing_rate=2, typing_burst=1))
    assert user.take_send("alice", "room-1", T0) == 0
    assert user.typing.take("alice", T0) == 0  # sends did not spend it
    assert user.typing.take("alice", T0) == 500
    assert user.take_send("alice", "room-1", T0 + 1_000) == 0  # nor typing the sends'


@pytest.mark.parametrize("kind", RATE_KINDS)
@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0), (1, -5)])
def test_limits_refuse_empty_buckets(kind: str, rate: float, burst: int) -> None:
    with pytest.raises(ValueError, match=kind):
        Limits(**{f"{kind}_rate": rate, f"{kind}_burst": burst})


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"max_cid_chars": 65}, "max_cid_chars"),  # the store's dedup keys hold 64
        ({"max_cid_chars": 0}, "max_cid_chars"),
        ({"history_default": 101, "history_max": 100}, "history_default"),
        ({"sync_default": 0}, "sync_default"),
        ({"max_depth": 513}, "max_depth must be <= 32, not 513"),  # not the decoder's 512
        ({"max_depth": 33}, "max_depth must be <= 32, not 33"),  # the encoder's depth
        ({"max_frame": 2**32}, "max_frame must be <= 4294967295"),
        ({"send_rate": float("nan")}, "send_rate must be > 0"),
        # limits go to clients in `welcome`: JSON has no infinity (a JSON client's hello
        # was answered by a closed connection)
        ({"send_rate": float("inf")}, "send_rate must be > 0 and finite, not inf"),
        ({"typing_rate": float("inf")}, "typing_rate must be > 0 and finite"),
    ],
)
def test_limits_refuse_values_the_server_cannot_serve(fields: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Limits(**fields)
