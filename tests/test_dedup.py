"""DedupRing: first assignment wins, FIFO eviction at capacity, str/bytes keys, limits.

The stateful test checks the ring against an independent model (an insertion-ordered dict)
over random sequences of inserts and lookups.
"""

from collections import OrderedDict

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from tsmsg import DedupRing
from tsmsg._native import dedup_key

U64_MAX = 2**64 - 1


def test_str_and_bytes_are_the_same_key() -> None:
    ring = DedupRing(4)
    assert ring.insert("é", 1) is None
    assert ring.get("é".encode()) == 1
    assert "é".encode() in ring
    assert ring.insert(b"\xc3\xa9", 2) == 1
    assert ring.insert(b"a", 3) is None
    assert ring.get("a") == 3
    assert len(ring) == 2


def test_cid_keys_are_the_journals_layout() -> None:
    """``dedup_key`` lays out (channel id, sender, cid) as the store's journal keeps it,
    and ``get_cid`` looks that key up without building it in Python."""
    key = dedup_key(258, "ann", "c-\u00e9")
    assert key == (258).to_bytes(8, "big") + b"ann\0c-\xc3\xa9"
    r = DedupRing(4)
    r.insert(key, 7)
    assert r.get_cid(258, "ann", "c-\u00e9") == 7
    assert r.get_cid(259, "ann", "c-\u00e9") is None  # another channel
    assert r.get_cid(258, "an", "nc-\u00e9") is None  # the NUL keeps sender and cid apart
    with pytest.raises(OverflowError):
        r.get_cid(-1, "ann", "c")


def test_first_assignment_wins() -> None:
    ring = DedupRing(4)
    assert ring.insert(b"k", 7) is None
    assert ring.insert(b"k", 8) == 7
    assert ring.insert("k", 9) == 7
    assert ring.get(b"k") == 7
    assert len(ring) == 1


def test_evicts_oldest_first_exactly_at_capacity() -> None:
    ring = DedupRing(3)
    for seq, key in enumerate([b"a", b"b", b"c"]):
        assert ring.insert(key, seq) is None
    assert len(ring) == 3
    assert [ring.get(k) for k in (b"a", b"b", b"c")] == [0, 1, 2]

    # One past capacity: the oldest insertion goes, whatever was read or re-inserted since
    # (eviction is FIFO, not LRU).
    assert ring.get(b"a") == 0
    assert ring.insert(b"a", 99) == 0
    assert ring.insert(b"d", 3) is None
    assert len(ring) == 3
    assert b"a" not in ring
    assert [ring.get(k) for k in (b"b", b"c", b"d")] == [1, 2, 3]

    assert ring.insert(b"e", 4) is None
    assert b"b" not in ring
    assert [ring.get(k) for k in (b"c", b"d", b"e")] == [2, 3, 4]


def test_insert_all_is_insert_of_each_in_order() -> None:
    """The store's writer hands a committed batch's cids over in one call: the same as
    inserting them one by one (a known key keeps its seq, the oldest goes first), and a key that is
    too long is the same ValueError."""
    one, all_ = DedupRing(3, max_key_len=4), DedupRing(3, max_key_len=4)
    items = {b"a": 1, b"b": 2, b"c": 3, b"d": 4}
    for ring in (one, all_):
        ring.insert(b"b", 9)
    for key, seq in items.items():
        one.insert(key, seq)
    all_.insert_all(items)
    assert [all_.get(k) for k in (b"a", b"b", b"c", b"d")] == [1, None, 3, 4]
    assert [one.get(k) for k in (b"a", b"b", b"c", b"d")] == [1, None, 3, 4]
    with pytest.raises(ValueError):
        all_.insert_all({b"e": 5, b"long!": 6})
    assert all_.get(b"e") == 5 and len(all_) == 3


def test_evicted_key_gets_a_new_seq() -> None:
    ring = DedupRing(1)
    assert ring.insert(b"a", 1) is None
    assert ring.insert(b"b", 2) is None
    assert ring.insert(b"a", 3) is None
    assert ring.get(b"a") == 3


def test_key_length_limit_counts_utf8_bytes() -> None:
    ring = DedupRing(4)
    assert ring.max_key_len == 256
    assert ring.insert(b"x" * 256, 1) is None
    assert ring.insert("é" * 128, 2) is None  # 128 characters, 256 bytes
    with pytest.raises(ValueError, match="256"):
        ring.insert(b"x" * 257, 3)
    with pytest.raises(ValueError, match="256"):
        ring.insert("é" * 128 + "a", 4)
    # A key the ring could never hold is simply absent from it.
    assert ring.get(b"x" * 257) is None
    assert b"x" * 257 not in ring
    assert len(ring) == 2


def test_custom_key_length_limit() -> None:
    ring = DedupRing(2, max_key_len=4)
    assert ring.insert(b"abcd", 1) is None
    assert ring.insert(b"", 2) is None
    with pytest.raises(ValueError, match="4"):
        ring.insert(b"abcde", 3)


def test_rejected_key_leaves_full_ring_unchanged() -> None:
    ring = DedupRing(1, max_key_len=2)
    ring.insert(b"ok", 1)
    with pytest.raises(ValueError):
        ring.insert(b"long", 2)
    assert ring.get(b"ok") == 1
    assert len(ring) == 1


@pytest.mark.parametrize(("capacity", "error"), [(0, ValueError), (-1, OverflowError)])
def test_capacity_must_be_positive(capacity: int, error: type[Exception]) -> None:
    with pytest.raises(error):
        DedupRing(capacity)


def test_seq_is_u64() -> None:
    ring = DedupRing(4)
    assert ring.insert(b"max", U64_MAX) is None
    assert ring.get(b"max") == U64_MAX
    with pytest.raises(OverflowError):
        ring.insert(b"neg", -1)
    with pytest.raises(OverflowError):
        ring.insert(b"big", U64_MAX + 1)
    assert len(ring) == 1


def test_key_must_be_str_or_bytes() -> None:
    ring = DedupRing(4)
    for bad in (1, bytearray(b"a"), memoryview(b"a"), None):
        with pytest.raises(TypeError, match="str or bytes"):
            ring.insert(bad, 1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="str or bytes"):
            ring.get(bad)  # type: ignore[arg-type]
        assert bad not in ring
    # A str that has no UTF-8 form (a lone surrogate) is rejected, not keyed lossily.
    with pytest.raises(UnicodeEncodeError):
        ring.insert("\udc80", 1)
    assert len(ring) == 0


def test_repr_shows_size_and_limits() -> None:
    ring = DedupRing(8, max_key_len=16)
    ring.insert(b"a", 1)
    assert repr(ring) == "DedupRing(len=1, capacity=8, max_key_len=16)"
    assert ring.capacity == 8


# Few, partly multi-byte characters: keys repeat often, and a str and its UTF-8 bytes meet.
key_texts = st.text(alphabet="abé€", max_size=3)
seqs = st.integers(min_value=0, max_value=U64_MAX)


class DedupRingMachine(RuleBasedStateMachine):
    """Drives a DedupRing and an insertion-ordered dict model with the same operations."""

    keys = Bundle("keys")

    @initialize(capacity=st.integers(min_value=1, max_value=5))
    def create(self, capacity: int) -> None:
        self.capacity = capacity
        self.ring = DedupRing(capacity)
        self.model: OrderedDict[bytes, int] = OrderedDict()

    @staticmethod
    def as_key(text: str, as_bytes: bool) -> str | bytes:
        return text.encode() if as_bytes else text

    def check_insert(self, text: str, as_bytes: bool, seq: int) -> None:
        key = text.encode()
        expected = self.model.get(key)
        if expected is None:
            if len(self.model) == self.capacity:
                self.model.popitem(last=False)
            self.model[key] = seq
        assert self.ring.insert(self.as_key(text, as_bytes), seq) == expected

    @rule(target=keys, text=key_texts, as_bytes=st.booleans(), seq=seqs)
    def insert_any(self, text: str, as_bytes: bool, seq: int) -> str:
        self.check_insert(text, as_bytes, seq)
        return text

    # Re-inserts a key inserted earlier, whether still held or since evicted.
    @rule(text=keys, as_bytes=st.booleans(), seq=seqs)
    def insert_again(self, text: str, as_bytes: bool, seq: int) -> None:
        self.check_insert(text, as_bytes, seq)

    @rule(text=keys | key_texts, as_bytes=st.booleans())
    def get_key(self, text: str, as_bytes: bool) -> None:
        assert self.ring.get(self.as_key(text, as_bytes)) == self.model.get(text.encode())

    @rule(text=keys | key_texts, as_bytes=st.booleans())
    def contains_key(self, text: str, as_bytes: bool) -> None:
        assert (self.as_key(text, as_bytes) in self.ring) == (text.encode() in self.model)

    @invariant()
    def sizes_agree(self) -> None:
        assert len(self.ring) == len(self.model) <= self.capacity

    @invariant()
    def every_model_entry_is_held(self) -> None:
        for key, seq in self.model.items():
            assert self.ring.get(key) == seq


# Bounded so `make test` stays quick: the space (≤ 5 slots, 85 possible keys) is small.
DedupRingMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None
)
TestDedupRingMachine = DedupRingMachine.TestCase
