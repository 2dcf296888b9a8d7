"""The Rust frame codec (tsmsg._native): round trips against msgpack-python, chunking,
fuzzing, every limit at and one past its value, and the message of every error class."""

from __future__ import annotations

import enum
import math
import os
import struct
import tracemalloc
from collections import OrderedDict
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tsmsg import _native
from tsmsg._native import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_FRAME,
    FrameDecoder,
    encode,
    encode_many,
    packb,
    unpackb,
)
from tsmsg.errors import (
    EncodeError,
    FrameError,
    FrameTooLarge,
    InvalidMsgpack,
    InvalidUtf8,
    LengthOverrun,
    NonStringKey,
    NotAMap,
    TooDeep,
    TrailingBytes,
    UnsupportedType,
)

# --- helpers and strategies ----------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)
bodies = st.dictionaries(st.text(max_size=8), values, max_size=6)


def frame_of(body: bytes) -> bytes:
    """A frame around raw body bytes (which need not be valid msgpack)."""
    return struct.pack(">I", len(body)) + body


def msgpack_frame(obj: Any) -> bytes:
    return frame_of(msgpack.packb(obj))


def decode_one(body: bytes, **limits: int) -> Any:
    frames = FrameDecoder(**limits).feed(frame_of(body))
    assert len(frames) == 1
    return frames[0]


def nested(depth: int) -> dict[str, Any]:
    """`depth` nested maps: {"a": {"a": ... 1}}; the outer map is depth 1."""
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value  # type: ignore[no-any-return]


def nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


# --- (a) round trips against msgpack-python --------------------------------------------------


@given(bodies)
def test_encode_is_byte_identical_to_msgpack(obj: dict[str, Any]) -> None:
    frame = encode(obj)
    body = msgpack.packb(obj)
    assert frame == struct.pack(">I", len(body)) + body
    assert msgpack.unpackb(frame[4:]) == obj


@given(bodies)
def test_decoder_reads_what_msgpack_writes(obj: dict[str, Any]) -> None:
    assert FrameDecoder().feed(msgpack_frame(obj)) == [obj]


@given(values)
def test_packb_unpackb_round_trip_any_value(value: Any) -> None:
    packed = packb(value)
    assert packed == msgpack.packb(value)
    assert unpackb(packed) == value
    assert unpackb(msgpack.packb(value)) == value


def test_nan_and_signed_zero_keep_their_bits() -> None:
    for value in (math.nan, -0.0, math.inf, -math.inf):
        assert packb(value) == msgpack.packb(value)
        assert unpackb(packb(value)) == value or math.isnan(unpackb(packb(value)))
    assert math.copysign(1.0, unpackb(packb(-0.0))) == -1.0


def test_float32_decodes_to_float() -> None:
    body = msgpack.packb({"f": 1.5}, use_single_float=True)
    assert body[3] == 0xCA
    assert decode_one(body) == {"f": 1.5}


def test_integer_boundaries() -> None:
    for v in (0, 127, 128, 255, 256, 65535, 65536, 2**32, 2**63 - 1, 2**63, 2**64 - 1):
        for n in (v, -v):
            if -(2**63) <= n <= 2**64 - 1:
                assert packb(n) == msgpack.packb(n)
                assert unpackb(packb(n)) == n
    assert packb(-(2**63)) == msgpack.packb(-(2**63))


def test_python_types_map_to_msgpack_types() -> None:
    class Color(enum.IntEnum):
        RED = 300

    class Name(enum.StrEnum):
        BOB = "bob"

    obj = {
        "tuple": (1, 2),
        "bytearray": bytearray(b"ab"),
        "memoryview": memoryview(b"cd"),
        "intenum": Color.RED,
        "strenum": Name.BOB,
        "ordered": OrderedDict(x=1),
    }
    assert encode(obj)[4:] == msgpack.packb(obj)
    assert FrameDecoder().feed(encode(obj)) == [
        {
            "tuple": [1, 2],
            "bytearray": b"ab",
            "memoryview": b"cd",
            "intenum": 300,
            "strenum": "bob",
            "ordered": {"x": 1},
        }
    ]


@given(st.lists(bodies, max_size=5))
def test_encode_many_is_the_concatenation_of_encode(objs: list[dict[str, Any]]) -> None:
    assert encode_many(objs) == b"".join(encode(obj) for obj in objs)
    assert encode_many(iter(objs)) == encode_many(objs)


def test_packb_unpackb_top_level_scalars() -> None:
    scalars: list[Any] = [None, True, False, 0, -1, 1.25, "", "héllo", b"", b"\x00", [], {}]
    for value in scalars:
        assert unpackb(packb(value)) == value
    assert unpackb(bytearray(packb([1]))) == [1]
    assert unpackb(memoryview(packb([1]))) == [1]


def test_unpackb_rejects_bad_input_with_frame_errors() -> None:
    with pytest.raises(TrailingBytes, match="offset 1 with 1 byte"):
        unpackb(b"\x01\x02")
    with pytest.raises(InvalidMsgpack, match="empty input"):
        unpackb(b"")
    with pytest.raises(InvalidMsgpack, match="reserved byte 0xc1"):
        unpackb(b"\xc1")
    with pytest.raises(NonStringKey):
        unpackb(b"\x81\x01\x02")
    with pytest.raises(UnsupportedType):
        unpackb(msgpack.packb(msgpack.ExtType(1, b"x")))
    with pytest.raises(TooDeep, match="max_depth 2"):
        unpackb(packb([[[1]]]), max_depth=2)
    assert unpackb(packb([[1]]), max_depth=2) == [[1]]


# --- (b) chunking ------------------------------------------------------------------------------


@given(st.lists(bodies, min_size=1, max_size=4), st.data())
def test_any_chunking_gives_the_same_frames(
    objs: list[dict[str, Any]], data: st.DataObject
) -> None:
    stream = encode_many(objs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    got: list[dict[str, Any]] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got.extend(decoder.feed(stream[start:end]))
    assert got == objs
    assert decoder.buffered == 0


def test_byte_at_a_time_and_all_at_once() -> None:
    objs = [{"t": "send", "text": "x" * 300, "rid": i} for i in range(5)]
    stream = encode_many(objs)
    decoder = FrameDecoder()
    got: list[dict[str, Any]] = []
    for i in range(len(stream)):
        got.extend(decoder.feed(stream[i : i + 1]))
        assert decoder.buffered <= len(encode(objs[0]))
    assert got == objs
    assert FrameDecoder().feed(stream) == objs


def test_partial_frame_is_buffered() -> None:
    frame = encode({"t": "ping"})
    decoder = FrameDecoder()
    assert decoder.feed(frame + frame[:5]) == [{"t": "ping"}]
    assert decoder.buffered == 5
    assert decoder.feed(frame[5:]) == [{"t": "ping"}]
    assert decoder.buffered == 0


def test_feed_accepts_bytearray_and_memoryview() -> None:
    frame = encode({"t": "ping"})
    assert FrameDecoder().feed(bytearray(frame)) == [{"t": "ping"}]
    assert FrameDecoder().feed(memoryview(frame)) == [{"t": "ping"}]
    assert FrameDecoder().feed(b"") == []


# --- (c) arbitrary and mutated bytes raise FrameError only ------------------------------------


def feed_all(data: bytes, chunk: int = 0) -> None:
    decoder = FrameDecoder(max_frame=4096)
    try:
        if chunk:
            for i in range(0, len(data), chunk):
                decoder.feed(data[i : i + chunk])
        else:
            decoder.feed(data)
    except FrameError:
        with pytest.raises(FrameError, match="decoder is in error state"):
            decoder.feed(b"\x00")


def unpack_any(data: bytes) -> None:
    try:
        unpackb(data)
    except FrameError:
        pass


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_frame_errors(data: bytes) -> None:
    feed_all(data)
    feed_all(frame_of(data))
    unpack_any(data)


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    data = bytearray(encode_many(draw(st.lists(bodies, min_size=1, max_size=3))))
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data.insert(at, draw(st.integers(0, 255)))
        elif op == "delete":
            del data[at]
        else:
            del data[at:]
    return bytes(data)


@given(mutated_streams(), st.integers(0, 9))
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_mutated_frames_raise_only_frame_errors(data: bytes, chunk: int) -> None:
    feed_all(data, chunk)
    unpack_any(data[4:])


# The long fuzz run: a bounded 200 examples by default; TSMSG_FUZZ_EXAMPLES raises it.
FUZZ_EXAMPLES = int(os.environ.get("TSMSG_FUZZ_EXAMPLES", "200"))


@pytest.mark.slow
@given(mutated_streams(), st.integers(0, 9))
@settings(max_examples=FUZZ_EXAMPLES, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_frames_raise_only_frame_errors_long(data: bytes, chunk: int) -> None:
    feed_all(data, chunk)
    unpack_any(data[4:])


# --- (d) every limit at and one past ------------------------------------------------------------


def body_of_size(size: int) -> bytes:
    """A valid map body of exactly `size` bytes (size >= 4): {"a": <str>}."""
    text_len = size - 3  # fixmap + fixstr "a" = 3 bytes, then a str with its header
    for header in (1, 2, 3, 5):
        s = "x" * (text_len - header)
        body: bytes = msgpack.packb({"a": s})
        if len(body) == size:
            return body
    raise AssertionError(size)


@pytest.mark.parametrize("max_frame", [4, 31, 100, 70_000])
def test_max_frame_at_and_past(max_frame: int) -> None:
    body = body_of_size(max_frame)
    assert len(body) == max_frame
    assert FrameDecoder(max_frame=max_frame).feed(frame_of(body)) == [msgpack.unpackb(body)]

    # One past: raised from the 4-byte header alone, before the body arrives.
    decoder = FrameDecoder(max_frame=max_frame)
    header = struct.pack(">I", max_frame + 1)
    decoder.feed(header[:2])
    with pytest.raises(FrameTooLarge, match=f"frame length {max_frame + 1} exceeds max_frame"):
        decoder.feed(header[2:])
    assert decoder.buffered == 0


def test_default_max_frame() -> None:
    assert DEFAULT_MAX_FRAME == 1024 * 1024 == FrameDecoder().max_frame
    body = body_of_size(DEFAULT_MAX_FRAME)
    assert FrameDecoder().feed(frame_of(body)) == [msgpack.unpackb(body)]
    with pytest.raises(FrameTooLarge, match="max_frame 1048576"):
        FrameDecoder().feed(struct.pack(">I", DEFAULT_MAX_FRAME + 1))
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(b"\xff\xff\xff\xff")


def test_encode_max_frame_at_and_past() -> None:
    obj = msgpack.unpackb(body_of_size(100))
    assert len(encode(obj, max_frame=100)) == 104
    with pytest.raises(FrameTooLarge, match="frame length 100 exceeds max_frame 99"):
        encode(obj, max_frame=99)
    with pytest.raises(FrameTooLarge):
        encode_many([{}, obj], max_frame=99)


def test_max_depth_at_and_past() -> None:
    assert DEFAULT_MAX_DEPTH == 32 == FrameDecoder().max_depth
    assert decode_one(msgpack.packb(nested(32))) == nested(32)
    with pytest.raises(TooDeep, match="max_depth 32 at offset 96"):
        decode_one(msgpack.packb(nested(33)))
    # Arrays count too: a map holding 31 nested lists is depth 32.
    assert decode_one(msgpack.packb({"a": nested_lists(31)})) == {"a": nested_lists(31)}
    with pytest.raises(TooDeep):
        decode_one(msgpack.packb({"a": nested_lists(32)}))
    # A custom limit.
    assert decode_one(msgpack.packb(nested(3)), max_depth=3) == nested(3)
    with pytest.raises(TooDeep, match="max_depth 3"):
        decode_one(msgpack.packb(nested(4)), max_depth=3)


def test_encode_max_depth_at_and_past() -> None:
    assert encode(nested(32))[4:] == msgpack.packb(nested(32))
    with pytest.raises(EncodeError, match="max_depth 32"):
        encode(nested(33))
    assert packb(nested_lists(32)) == msgpack.packb(nested_lists(32))
    with pytest.raises(EncodeError, match="max_depth 32"):
        packb(nested_lists(33))


def test_self_referential_values_hit_the_depth_limit() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(EncodeError, match="max_depth"):
        packb(loop)
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    with pytest.raises(EncodeError, match="max_depth"):
        encode(cycle)


# Each case: a body whose last value declares exactly the bytes left, and the same header
# declaring one more. {"a": ...} takes 3 bytes before the value.
DECLARED_LENGTHS = {
    # str8 of 2 bytes
    "str": (b"\x81\xa1a\xd9\x02xy", b"\x81\xa1a\xd9\x03xy"),
    # bin8 of 2 bytes
    "bin": (b"\x81\xa1a\xc4\x02xy", b"\x81\xa1a\xc4\x03xy"),
    # array16 of 2 one-byte elements
    "array": (b"\x81\xa1a\xdc\x00\x02\x01\x02", b"\x81\xa1a\xdc\x00\x03\x01\x02"),
    # map16 of 2 two-byte entries (each needs at least a key and a value byte)
    "map": (b"\x81\xa1a\xde\x00\x02\xa0\xc0\xa0\xc0", b"\x81\xa1a\xde\x00\x03\xa0\xc0\xa0\xc0"),
}


@pytest.mark.parametrize("kind", sorted(DECLARED_LENGTHS))
def test_declared_length_at_and_past_the_bytes_left(kind: str) -> None:
    at, past = DECLARED_LENGTHS[kind]
    assert decode_one(at) == msgpack.unpackb(at)
    with pytest.raises(LengthOverrun, match=f"^{kind} at offset 3 declares length 3"):
        decode_one(past)


def test_huge_declared_lengths_fail_without_allocating() -> None:
    for header in (b"\xdb", b"\xc6", b"\xdd", b"\xdf"):  # str32, bin32, array32, map32
        with pytest.raises(LengthOverrun, match="declares length 4294967295"):
            decode_one(b"\x81\xa1a" + header + b"\xff\xff\xff\xff")


@pytest.mark.parametrize(
    ("header", "entry"),
    [(b"\xdf", b"\xa0\xc0"), (b"\xdd", b"\xc0")],  # map32 {"": nil, ...}, array32 [nil, ...]
    ids=["map", "array"],
)
def test_memory_stays_a_small_multiple_of_the_frame(header: bytes, entry: bytes) -> None:
    count = 50_000
    good = b"\x81\xa1a" + header + struct.pack(">I", count) + entry * count
    bad = good[:-1] + b"\xc1"  # fails on the last element, after building the rest
    for body in (good, bad):
        tracemalloc.start()
        try:
            FrameDecoder().feed(frame_of(body))
        except InvalidMsgpack:
            pass
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < 10 * len(body), peak


# --- one test per error class: class and message ------------------------------------------------


def test_error_classes() -> None:
    for cls in (
        FrameTooLarge,
        InvalidMsgpack,
        TrailingBytes,
        NotAMap,
        NonStringKey,
        TooDeep,
        InvalidUtf8,
        LengthOverrun,
        UnsupportedType,
    ):
        assert issubclass(cls, FrameError)
        assert cls.__module__ == "tsmsg._native"
    assert issubclass(FrameError, ValueError)
    assert issubclass(EncodeError, ValueError)
    assert not issubclass(EncodeError, FrameError)
    assert _native.FrameError is FrameError


def test_frame_too_large_message() -> None:
    with pytest.raises(FrameTooLarge) as info:
        FrameDecoder(max_frame=10).feed(encode({}) + struct.pack(">I", 11))
    assert str(info.value) == "frame length 11 exceeds max_frame 10 (frame at stream offset 5)"


def test_invalid_msgpack_message() -> None:
    with pytest.raises(InvalidMsgpack) as info:
        decode_one(b"\x81\xa1a\xc1")
    assert str(info.value) == (
        "invalid msgpack at offset 3: reserved byte 0xc1 (frame at stream offset 0)"
    )
    with pytest.raises(InvalidMsgpack, match=r"at offset 4: truncated uint16: needs 2 byte"):
        decode_one(b"\x81\xa1a\xcd\x01")
    with pytest.raises(InvalidMsgpack, match="empty frame body"):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_trailing_bytes_message() -> None:
    with pytest.raises(TrailingBytes) as info:
        decode_one(b"\x80\x00\x00")
    assert str(info.value).startswith("trailing bytes: the value ends at offset 1 with 2 byte(s)")


def test_not_a_map_message() -> None:
    with pytest.raises(NotAMap, match="frame body must be a map, got array at offset 0"):
        decode_one(msgpack.packb([1]))
    for value in (None, 1, "s", b"b", 1.5, True):
        with pytest.raises(NotAMap):
            decode_one(msgpack.packb(value))


def test_non_string_key_message() -> None:
    with pytest.raises(NonStringKey, match="map key at offset 1 must be a string, got int"):
        decode_one(b"\x81\x01\x02")
    # At any nesting level: {"a": [{nil: 1}]}.
    with pytest.raises(NonStringKey, match="offset 5 must be a string, got nil"):
        decode_one(b"\x81\xa1a\x91\x81\xc0\x01")
    with pytest.raises(NonStringKey, match="got bin"):
        decode_one(msgpack.packb({"a": {b"k": 1}}))


def test_too_deep_message() -> None:
    with pytest.raises(TooDeep) as info:
        decode_one(msgpack.packb(nested(3)), max_depth=2)
    assert str(info.value) == (
        "nesting deeper than max_depth 2 at offset 6 (frame at stream offset 0)"
    )


def test_invalid_utf8_message() -> None:
    with pytest.raises(InvalidUtf8, match="invalid UTF-8 in a string at offset 5"):
        decode_one(b"\x81\xa1a\xa3x\xffy")
    with pytest.raises(InvalidUtf8, match="at offset 2"):
        decode_one(b"\x81\xa1\xfe\xc0")  # in a key


def test_length_overrun_message() -> None:
    with pytest.raises(LengthOverrun) as info:
        decode_one(b"\x81\xa1a\xd9\x03xy")
    assert str(info.value) == (
        "str at offset 3 declares length 3 but only 2 byte(s) remain in the frame "
        "(frame at stream offset 0)"
    )


def test_unsupported_type_message() -> None:
    # fixext 1/2/4/8/16, ext 8/16/32, and the timestamp ext (-1).
    for ext in (msgpack.ExtType(5, b"x" * n) for n in (1, 2, 4, 8, 16, 0, 3, 300, 70_000)):
        body = msgpack.packb({"a": ext})
        with pytest.raises(UnsupportedType, match=f"byte 0x{body[3]:02x}\\) at offset 3"):
            decode_one(body)
    with pytest.raises(UnsupportedType):
        decode_one(msgpack.packb({"ts": msgpack.Timestamp(1, 0)}))


def test_error_state_after_an_error() -> None:
    decoder = FrameDecoder()
    good = encode({"t": "ping"})
    with pytest.raises(InvalidMsgpack, match=f"stream offset {len(good)}"):
        decoder.feed(good + frame_of(b"\xc1"))
    assert decoder.buffered == 0
    with pytest.raises(FrameError, match="decoder is in error state after an earlier error"):
        decoder.feed(good)
    with pytest.raises(FrameError, match="decoder is in error state"):
        decoder.feed(b"")


# --- encode errors and the decoder's attributes ----------------------------------------------


@pytest.mark.parametrize("value", [object(), {1, 2}, 1j, frozenset(), type])
def test_encode_rejects_unsupported_types_by_name(value: object) -> None:
    with pytest.raises(EncodeError, match=f"type {type(value).__name__}$"):
        encode({"v": value})
    with pytest.raises(EncodeError, match=type(value).__name__):
        packb(value)


@pytest.mark.parametrize("n", [2**64, -(2**63) - 1, 10**30])
def test_encode_rejects_ints_out_of_range(n: int) -> None:
    with pytest.raises(EncodeError, match="int out of range"):
        encode({"n": n})


def test_encode_rejects_non_str_keys_and_non_dict_bodies() -> None:
    with pytest.raises(EncodeError, match="map keys must be str, got int"):
        encode({1: 2})  # type: ignore[dict-item]
    with pytest.raises(EncodeError, match="map keys must be str, got bytes"):
        packb({"a": {b"k": 1}})
    with pytest.raises(EncodeError, match="frame body must be a dict, got list"):
        encode([1])  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match="frame body must be a dict, got int"):
        encode_many([{}, 1])  # type: ignore[list-item]
    with pytest.raises(EncodeError, match="lone surrogate"):
        encode({"s": "\ud800"})


def test_decoder_attributes_are_read_only() -> None:
    decoder = FrameDecoder(max_frame=100, max_depth=4)
    assert (decoder.max_frame, decoder.max_depth, decoder.buffered) == (100, 4, 0)
    with pytest.raises(AttributeError):
        decoder.max_frame = 5  # type: ignore[misc]
    with pytest.raises(OverflowError):
        FrameDecoder(max_frame=-1)


def test_max_depth_is_capped_to_bound_native_recursion() -> None:
    assert FrameDecoder(max_depth=512).max_depth == 512
    with pytest.raises(ValueError, match="max_depth 513 is above the supported maximum 512"):
        FrameDecoder(max_depth=513)
    with pytest.raises(ValueError, match="max_depth 10000"):
        unpackb(b"\xc0", max_depth=10_000)
    deepest = b"\x91" * 511 + b"\x90"
    value: Any = unpackb(deepest, max_depth=512)
    for _ in range(511):
        value = value[0]
    assert value == []
