"""Token buckets, without a clock: time (ms) is passed in.

A bucket holds up to ``burst`` tokens and refills at ``rate`` per second; taking one from
an empty bucket tells how long until one is there. :class:`Buckets` keeps many buckets by
key (user, (user, channel), IP, ...) with bounded memory: past ``max_keys`` the bucket
touched longest ago is dropped, which is harmless because a bucket left alone refills.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tsmsg.protocol.limits import Limits

DEFAULT_MAX_KEYS = 100_000  # buckets kept per kind; ~100 bytes each


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp_ms", "tokens")

    def __init__(self, rate: float, burst: int, now_ms: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp_ms = now_ms

    def take(self, now_ms: int) -> int:
        """Take a token: 0 if there was one, else the ms until there is one (nothing is
        taken then)."""
        wait = self.refill(now_ms)
        if not wait:
            self.tokens -= 1
        return wait

    def refill(self, now_ms: int) -> int:
        """Add the tokens earned since the last call; the ms until a token is there (0:
        one is there now). Per frame and per send: written for speed (no builtin calls
        on the common paths; a clock going backwards earns nothing)."""
        elapsed = now_ms - self.stamp_ms
        self.stamp_ms = now_ms
        if elapsed > 0:
            tokens = self.tokens + elapsed * self.rate / 1000
            self.tokens = tokens if tokens < self.burst else float(self.burst)
        if self.tokens >= 1:
            return 0
        return max(1, math.ceil((1 - self.tokens) * 1000 / self.rate))


class Buckets:
    """Buckets of one kind by key, at most ``max_keys`` of them."""

    def __init__(self, rate: float, burst: int, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def take(self, key: Hashable, now_ms: int) -> int:
        return self.bucket(key, now_ms).take(now_ms)

    def get(self, key: Hashable) -> TokenBucket | None:
        """The bucket of ``key`` if it has one (not touched: its place is kept)."""
        return self._buckets.get(key)

    def bucket(self, key: Hashable, now_ms: int) -> TokenBucket:
        """The bucket of ``key`` (a new one is full), as the most recently touched."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now_ms)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def peek(self, key: Hashable, now_ms: int) -> int:
        """The ms until ``key`` has a token, without taking one (0: it has one now)."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return 0
        elapsed = max(0, now_ms - bucket.stamp_ms)
        tokens = min(float(bucket.burst), bucket.tokens + elapsed * bucket.rate / 1000)
        return 0 if tokens >= 1 else max(1, math.ceil((1 - tokens) * 1000 / bucket.rate))

    def __len__(self) -> int:
        return len(self._buckets)


class UserLimits:
    """The buckets a session shares with the user's other sessions: sends (and edits and
    deletes) per user and per (user, channel), typing and presence status changes per user."""

    def __init__(self, limits: Limits) -> None:
        self.sends = Buckets(limits.send_rate, limits.send_burst)
        self.channel_sends = Buckets(limits.channel_send_rate, limits.channel_send_burst)
        self.typing = Buckets(limits.typing_rate, limits.typing_burst)
        self.presence = Buckets(limits.presence_rate, limits.presence_burst)

    def take_send(self, user: str, channel: str, now_ms: int) -> int:
        """A token from both buckets, or from neither (a refused send costs nothing).
        Once per send: the channel bucket's lookups are inlined (issue 17)."""
        mine, key, chans = self.sends.bucket(user, now_ms), (user, channel), self.channel_sends
        here = chans._buckets.get(key)  # none yet: a full one, which has a token
        wait = mine.refill(now_ms)
        if here is None:
            if wait:
                return wait
            here = chans.bucket(key, now_ms)  # made only for a granted send
        else:
            here_wait = here.refill(now_ms)
            if here_wait > wait:
                wait = here_wait
            if wait:
                return wait
            chans._buckets.move_to_end(key)
        mine.tokens -= 1
        here.tokens -= 1
        return 0
