"""Protocol fuzzing over TCP against one running server (a ``tsmsg serve`` subprocess).

A seeded generator makes ``INPUTS`` bad inputs, each sent on its own short-lived
connection (``CONCURRENCY`` at a time), before or after a valid ``hello``:

- valid frames with one field changed (a value replaced by one of another type, size or
  range; a field removed or added; a non-string key), hellos included;
- random bytes; valid frames cut short; length prefixes that lie (over ``max_frame``,
  shorter or longer than the body); nesting past ``max_depth`` (up to 100,000 deep);
  msgpack strings, binaries, arrays and maps declaring 2^32 - 1 bytes or elements;
- valid frames in invalid states: a request before ``hello``, a second ``hello``, a
  request pipelined after a frame that is a connection error.

Every answer is checked against PROTOCOL.md sections 3, 4 and 8 (the oracle is in
:func:`check_answer`): the server's bytes decode as frames; every error carries a code
of ``tsmsg.protocol.errors`` and never ``internal``; a connection error is the last frame
and is followed by the close, and a request error leaves the connection serving (a ``ping``
sent after the input is answered); an input that is a protocol violation gets an error
(or, when the client half-closes in the middle of a frame, a clean close); nothing is
answered after a connection error. Incomplete frames are answered after the hello and
frame deadlines, set to ``DEADLINE_S`` here so the run stays short.

Throughout, a healthy client keeps sending to its own channel and must get every ``ok``
and its own event, with no error; the server's RSS (``/proc/<pid>/status``) is sampled and
its growth must stay under ``RSS_GROWTH_BOUND_KIB``; the server's log must show no
internal error. TSMSG_FUZZ_SEED repeats a run's inputs; TSMSG_LONG=1 runs
``LONG_INPUTS`` of them (``make test-long``).
"""

from __future__ import annotations

import math
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from conftest import WireClient, mint
from server_proc import ServerProcess, server_process
from tsmsg.protocol import errors as E

INPUTS = 2000
LONG_INPUTS = 20_000
CONCURRENCY = 16  # fuzzing connections open at once
DEADLINE_S = 0.5  # the server's hello and frame deadlines in this test
ANSWER_TIMEOUT_S = 5.0  # an answer (or the close) to one input; well above DEADLINE_S
RUN_TIMEOUT_S = 120.0  # the default run takes about 15 s; the long one about ten times that
MAX_FRAME = 1 << 20  # the server's default max_frame
MAX_DEPTH = 32
HEALTHY_INTERVAL_S = 0.01  # between the healthy client's sends
# The server may hold, per fuzzing connection, one incomplete frame of up to max_frame
# bytes (a lying length prefix) plus its decoder's copy: CONCURRENCY * 2 MiB = 32 MiB, and
# 32 MiB more for allocator slack. A leak per input (2,000 inputs) would pass this.
RSS_GROWTH_BOUND_KIB = (CONCURRENCY * 2 * MAX_FRAME + (32 << 20)) >> 10
RSS_SAMPLE_S = 0.05

KNOWN_CODES = frozenset(
    getattr(E, name) for name in dir(E) if name.isupper() and isinstance(getattr(E, name), str)
)
# Errors that always close the connection (unauthorized and token_expired close at hello
# but are request errors in answer to refresh; rate_limited closes only in two cases).
ALWAYS_FATAL = frozenset(E.CONNECTION_ERRORS) - {E.UNAUTHORIZED, E.TOKEN_EXPIRED}
MAY_CLOSE = frozenset(E.CONNECTION_ERRORS) | {E.RATE_LIMITED}
PROBE_RID = 4_000_000_001  # the ping sent after an input that may leave the connection open
FUZZ_CHANNEL = "fuzz-room"
HEALTHY = "healthy"


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def packed(obj: Any) -> bytes:
    return frame_of(msgpack.packb(obj, use_bin_type=True))


# ---------------------------------------------------------------------- inputs


@dataclass
class Case:
    """One input. ``hello``: sent after a successful hello. ``violation``: the input breaks
    the protocol, so an error must come (unless the client half-closes mid-frame, when a
    clean close is enough). ``codes``: the error codes allowed for it (None: any known).
    ``complete``: the input ends on a frame boundary, so a probe ping can follow it.
    ``after``: a valid frame sent after a connection error; it must get no answer."""

    kind: str
    data: bytes
    hello: bool
    violation: bool
    codes: frozenset[str] | None = None
    complete: bool = True
    half_close: bool = False
    after: bytes = b""
    rid: int | None = None  # a request's valid rid: exactly one reply carries it
    answers: list[dict[str, Any]] = field(default_factory=list)
    closed: bool = False


def valid_frames(rng: random.Random, n: int) -> list[dict[str, Any]]:
    """A valid instance of each request (after hello), with rid ``n``."""
    channel = FUZZ_CHANNEL
    return [
        {"t": "send", "rid": n, "channel": channel, "cid": f"c{n}", "text": "hi", "meta": {"k": 1}},
        {"t": "join", "rid": n, "channel": channel},
        {"t": "leave", "rid": n, "channel": channel},
        {"t": "edit", "rid": n, "channel": channel, "id": "1-1", "text": "edited"},
        {"t": "delete", "rid": n, "channel": channel, "id": f"1-{rng.randrange(1, 5)}"},
        {"t": "history", "rid": n, "channel": channel, "before": 5, "limit": 10},
        {"t": "sync", "rid": n, "channel": channel, "since": 0, "limit": 10, "epoch": 0},
        {"t": "read", "rid": n, "channel": channel, "seq": 1},
        {"t": "typing", "rid": n, "channel": channel, "on": True},
        {"t": "ping", "rid": n},
        {"t": "refresh", "rid": n, "token": mint(f"fz{n % 50}", ["fuzz-*"])},
        {"t": "presence", "rid": n, "status": "away"},
        {"t": "presence", "rid": n, "users": ["fz1", HEALTHY]},
        {"t": "unread", "rid": n, "channels": [channel]},
    ]


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def random_value(rng: random.Random) -> Any:
    """A value of a random type, size or range: each is wrong for some field."""
    choices: list[Callable[[], Any]] = [
        lambda: None,
        lambda: rng.choice([True, False]),
        lambda: rng.choice([0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1, 2**32]),
        lambda: rng.randrange(-1000, 1000),
        lambda: rng.choice([0.5, -0.0, math.inf, -math.inf, math.nan, 1e300]),
        lambda: "",
        lambda: "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 40))),
        lambda: "x" * rng.choice([63, 64, 65, 128, 129, 8193, 16_384, 16_385, 70_000]),
        lambda: rng.choice(["a\x00b", "fuzz-room\n", "dm:a:b", "*", "1-1", "0-0", "é" * 9000]),
        lambda: rng.randbytes(rng.randrange(0, 40)),
        lambda: [random_scalar(rng) for _ in range(rng.randrange(0, 5))],
        lambda: {"k": random_scalar(rng), "n": {"m": [1, 2]}},
        lambda: nested(rng.randrange(1, 12)),
        lambda: {f"k{i}": "v" * 64 for i in range(rng.randrange(1, 200))},
    ]
    return rng.choice(choices)()


def random_scalar(rng: random.Random) -> Any:
    return rng.choice([None, True, 1, -1, 2**63 - 1, 1.5, "s", b"b"])


def valid_rid(frame: dict[Any, Any]) -> int | None:
    rid = frame.get("rid")
    return rid if type(rid) is int and -(2**63) <= rid < 2**63 else None


def mutated(rng: random.Random, frame: dict[str, Any]) -> tuple[bytes, int | None]:
    """The frame with one change; encoded with msgpack directly (which allows the
    non-string keys and ext types the server must refuse)."""
    frame = dict(frame)
    op = rng.random()
    key = rng.choice(sorted(frame))
    if op < 0.6:
        frame[key] = random_value(rng)
    elif op < 0.72:
        del frame[key]
    elif op < 0.82:
        frame[rng.choice(["x", "pad", "v", "rid", "t", "meta"])] = random_value(rng)
    elif op < 0.9:
        frame[rng.choice([1, -1, b"t", 2.5, None, True])] = "x"  # a non-string key: bad_frame
    elif op < 0.95:
        frame[key] = msgpack.ExtType(rng.randrange(0, 128), b"\x00" * rng.randrange(0, 9))
    else:
        frame["t"] = rng.choice(["hello", "HELLO", "", "pong", "welcome", "error", "x" * 300])
    return packed(frame), valid_rid(frame)


def make_cases(rng: random.Random, count: int) -> list[Case]:
    cases: list[Case] = []
    generators: list[tuple[float, Callable[[int], Case]]] = []

    def add(weight: float) -> Callable[[Callable[[int], Case]], Callable[[int], Case]]:
        def register(fn: Callable[[int], Case]) -> Callable[[int], Case]:
            generators.append((weight, fn))
            return fn

        return register

    @add(40)
    def mutated_request(n: int) -> Case:
        base = rng.choice(valid_frames(rng, n))
        data, rid = mutated(rng, base)
        return Case("mutated-request", data, hello=True, violation=False, rid=rid)

    @add(6)
    def mutated_hello(n: int) -> Case:
        hello = {"t": "hello", "rid": n, "v": 1, "token": mint(f"fz{n % 50}", ["fuzz-*"])}
        data, rid = mutated(rng, hello)
        return Case("mutated-hello", data, hello=False, violation=False, rid=rid)

    @add(6)
    def random_bytes(n: int) -> Case:
        data = rng.randbytes(rng.randrange(1, 80))
        if rng.random() < 0.5:  # a plausible length prefix, random body
            data = struct.pack(">I", len(data)) + data
        return Case("random-bytes", data, hello=rng.random() < 0.5, violation=True, complete=False)

    @add(6)
    def truncated(n: int) -> Case:
        whole = packed(rng.choice(valid_frames(rng, n)))
        data = whole[: rng.randrange(1, len(whole))]
        hello = rng.random() < 0.5
        deadline = E.FRAME_TIMEOUT if hello else E.HELLO_TIMEOUT
        return Case(
            "truncated", data, hello, violation=True, codes=frozenset({deadline}), complete=False
        )

    @add(6)
    def length_lie(n: int) -> Case:
        body = msgpack.packb(rng.choice(valid_frames(rng, n)))
        hello = rng.random() < 0.5
        lie = rng.random()
        if lie < 0.3:  # over max_frame: refused on the header alone
            size = rng.choice([MAX_FRAME + 1, 2**31, 2**32 - 1])
            return Case(
                "length-over-max", struct.pack(">I", size), hello, violation=True,
                codes=frozenset({E.FRAME_TOO_LARGE}), complete=False,
            )  # fmt: skip
        if lie < 0.6:  # shorter than the body: the value is cut short
            data = struct.pack(">I", rng.randrange(0, len(body))) + body
            return Case("length-short", data, hello, violation=True, complete=False)
        # longer than the body (up to max_frame): the server waits for the rest
        size = rng.choice([len(body) + 1, len(body) + 100, MAX_FRAME])
        deadline = E.FRAME_TIMEOUT if hello else E.HELLO_TIMEOUT
        return Case(
            "length-long", struct.pack(">I", size) + body, hello, violation=True,
            codes=frozenset({deadline}), complete=False,
        )  # fmt: skip

    @add(1)
    def big_partial(n: int) -> Case:
        # Most of a max_frame frame, never finished: the server holds it until the deadline.
        body = rng.randbytes(MAX_FRAME - rng.randrange(1, 1000))
        hello = rng.random() < 0.5
        deadline = E.FRAME_TIMEOUT if hello else E.HELLO_TIMEOUT
        return Case(
            "big-partial", struct.pack(">I", MAX_FRAME) + body, hello, violation=True,
            codes=frozenset({deadline}), complete=False,
        )  # fmt: skip

    @add(4)
    def deep(n: int) -> Case:
        depth = rng.choice([MAX_DEPTH, MAX_DEPTH + 1, 100, 10_000, 100_000])
        # The frame's map is depth 1: a list nested `depth` times inside it is too deep
        # from MAX_DEPTH on. Built as bytes: msgpack-python itself stops at depth 512.
        body = b"\x83\xa1t\xa4ping\xa3rid" + msgpack.packb(n) + b"\xa1x" + b"\x91" * depth + b"\x01"
        return Case(
            "deep", frame_of(body), hello=rng.random() < 0.8, violation=True,
            codes=frozenset({E.BAD_FRAME}),
        )  # fmt: skip

    @add(4)
    def huge_declared(n: int) -> Case:
        head = rng.choice([b"\xdb", b"\xc6", b"\xdd", b"\xdf"])  # str32 bin32 array32 map32
        size = rng.choice([2**32 - 1, 2**31, 1 << 20, 100])
        body = b"\x82\xa1t\xa4ping\xa1x" + head + struct.pack(">I", size) + rng.randbytes(8)
        return Case(
            "huge-declared", frame_of(body), hello=rng.random() < 0.8, violation=True,
            codes=frozenset({E.BAD_FRAME}),
        )  # fmt: skip

    @add(4)
    def before_hello(n: int) -> Case:
        frame = rng.choice([f for f in valid_frames(rng, n) if f["t"] != "hello"])
        return Case(
            "request-before-hello", packed(frame), hello=False, violation=True,
            codes=frozenset({E.HELLO_REQUIRED}),
        )  # fmt: skip

    @add(3)
    def second_hello(n: int) -> Case:
        hello = {"t": "hello", "rid": n, "v": 1, "token": mint(f"fz{n % 50}", ["fuzz-*"])}
        return Case(
            "second-hello", packed(hello), hello=True, violation=True,
            codes=frozenset({E.BAD_REQUEST}),
        )  # fmt: skip

    @add(4)
    def after_fatal(n: int) -> Case:
        fatal = rng.choice([frame_of(b"\xc1"), packed([1, 2]), packed({"t": 5}), frame_of(b"")])
        after = packed({"t": "join", "rid": n, "channel": FUZZ_CHANNEL})
        return Case(
            "request-after-fatal", fatal, hello=rng.random() < 0.8, violation=True,
            codes=frozenset({E.BAD_FRAME}), after=after,
        )  # fmt: skip

    @add(3)
    def unknown_type(n: int) -> Case:
        frame = {"t": rng.choice(["nope", "Join", "send ", "é", "x" * 1000]), "rid": n}
        return Case(
            "unknown-type", packed(frame), hello=True, violation=True,
            codes=frozenset({E.UNKNOWN_TYPE}),
        )  # fmt: skip

    weights = [w for w, _ in generators]
    for n in range(1, count + 1):
        case = rng.choices(generators, weights)[0][1](n)
        # Incomplete input: usually half-close (a clean close is then enough), sometimes
        # wait for the deadline's error.
        if not case.complete and rng.random() < 0.75:
            case.half_close = True
        cases.append(case)
    return cases


# ---------------------------------------------------------------------- running an input


async def read_until_closed(client: WireClient, case: Case, stop: Callable[[], bool]) -> None:
    """Collect frames until the close, or until ``stop()`` says enough."""
    with trio.fail_after(ANSWER_TIMEOUT_S):
        while not stop():
            try:
                await client._fill()
            except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
                case.closed = True
                return
            finally:
                case.answers.extend(client.pending)
                client.pending.clear()


async def run_case(port: int, case: Case, n: int) -> None:
    client = WireClient(await trio.open_tcp_stream("127.0.0.1", port))
    try:
        if case.hello:
            token = mint(f"fz{n % 50}", ["fuzz-*"])
            welcome = await client.request("hello", v=1, token=token)
            assert welcome["t"] == "welcome", welcome
            client.pending.clear()  # a presence push or two: not part of the answer
        try:
            await client.send_raw(case.data + case.after)
            if case.complete and not case.after:
                await client.send({"t": "ping", "rid": PROBE_RID})
            if case.half_close:
                await client.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server closed first: what it said is read below
        probed = case.complete and not case.after

        def answered() -> bool:
            rids = {f.get("rid") for f in case.answers}
            return probed and PROBE_RID in rids and (case.rid is None or case.rid in rids)

        await read_until_closed(client, case, answered)
    finally:
        await client.aclose()
    check_answer(case)


def check_answer(case: Case) -> None:
    """The oracle: PROTOCOL.md sections 3, 4 and 8."""
    what = f"{case.kind} {case.data[:60]!r}... (hello: {case.hello}) -> {case.answers}"
    errors = [f for f in case.answers if f.get("t") == "error"]
    for f in case.answers:
        assert isinstance(f.get("t"), str), what
    for err in errors:
        assert err.get("code") in KNOWN_CODES, f"unknown code: {what}"
        assert err["code"] != E.INTERNAL, f"internal error: {what}"
        assert isinstance(err.get("message"), str), what
    probe = [f for f in case.answers if f.get("rid") == PROBE_RID]
    # Before welcome every error is a connection error (section 8).
    welcomed = case.hello or any(f.get("t") == "welcome" for f in case.answers)
    fatal = [
        i
        for i, f in enumerate(case.answers)
        if f.get("t") == "error" and (f["code"] in ALWAYS_FATAL or not welcomed)
    ]
    if fatal:
        # A connection error is the last frame, and the close follows it.
        assert fatal[0] == len(case.answers) - 1, f"frames after a connection error: {what}"
        assert case.closed, f"not closed after a connection error: {what}"
    if case.closed:
        # Closed: after a documented connection error, or a clean close after the client
        # half-closed. The probe (if any) was not answered then.
        last = case.answers[-1] if case.answers else None
        documented = (
            last is not None
            and last.get("t") == "error"
            and (last["code"] in MAY_CLOSE or not welcomed)
        )
        assert documented or case.half_close, f"closed without a connection error: {what}"
        assert not probe, what
    elif case.complete and not case.after:
        assert len(probe) == 1 and probe[0]["t"] == "pong", f"no answer to the probe: {what}"
        if case.rid is not None:  # one reply to the request (writes answer after commit,
            # so possibly after the probe's: section 2 allows any order between replies)
            assert sum(f.get("rid") == case.rid for f in case.answers) == 1, f"replies: {what}"
    if case.violation and not (case.half_close and case.closed and not errors):
        assert errors, f"no error for a violation: {what}"
    if case.codes is not None and errors:
        assert errors[0]["code"] in case.codes, f"expected {sorted(case.codes)}: {what}"
    if case.after:
        assert not any(f.get("t") == "ok" for f in case.answers), f"served after fatal: {what}"


# ---------------------------------------------------------------------- the healthy client


@dataclass
class Healthy:
    acked: list[int] = field(default_factory=list)
    events: list[int] = field(default_factory=list)


async def healthy_client(port: int, stats: Healthy, done: trio.Event) -> None:
    """Sends to its own channel until ``done``; every send must be acked and its event
    seen, in order; any error fails the test."""
    client = WireClient(await trio.open_tcp_stream("127.0.0.1", port))
    try:
        assert (await client.request("hello", v=1, token=mint(HEALTHY, [HEALTHY])))[
            "t"
        ] == "welcome"
        join = await client.request("join", channel=HEALTHY)
        assert join["t"] == "ok" and join["head"] == 0, join
        await client.expect("membership", channel=HEALTHY)  # its join's, to its devices
        for k in range(1_000_000):
            if done.is_set():
                break
            ok = await client.request("send", channel=HEALTHY, cid=f"h{k}", text=f"healthy {k}")
            assert ok["t"] == "ok" and not ok["dup"] and ok["seq"] == k + 1, ok
            stats.acked.append(ok["seq"])
            event = await client.expect("event", channel=HEALTHY, seq=ok["seq"])
            assert event["sender"] == HEALTHY and event["text"] == f"healthy {k}", event
            stats.events.append(event["seq"])
            others = [f for f in client.pending if f.get("t") != "presence"]
            assert not others, f"the healthy client got {others}"
            await trio.sleep(HEALTHY_INTERVAL_S)
        page = await client.request("sync", channel=HEALTHY, since=0, limit=5000)
        assert [e["seq"] for e in page["events"]] == stats.acked
    finally:
        await client.aclose()


# ---------------------------------------------------------------------- the run


async def sample_rss(server: ServerProcess, peaks: dict[str, int], done: trio.Event) -> None:
    while not done.is_set():
        for key, value in server.status().items():
            if key in ("VmRSS", "RssAnon"):
                peaks[key] = max(peaks.get(key, 0), value)
        await trio.sleep(RSS_SAMPLE_S)


async def fuzz(tmp_path: Path, count: int) -> None:
    seed = int(os.environ.get("TSMSG_FUZZ_SEED", random.randrange(2**32)))
    print(f"TSMSG_FUZZ_SEED={seed}")
    cases = make_cases(random.Random(seed), count)
    env = {
        "TSMSG_HELLO_TIMEOUT_S": str(DEADLINE_S),
        "TSMSG_FRAME_TIMEOUT_S": str(DEADLINE_S),
        # Every input is a new connection from 127.0.0.1, many with a failing hello.
        "TSMSG_IP_CONNECT_RATE": "1000000",
        "TSMSG_IP_CONNECT_BURST": "1000000",
        "TSMSG_IP_LOGIN_FAIL_RATE": "1000000",
        "TSMSG_IP_LOGIN_FAIL_BURST": "1000000",
    }
    stats = Healthy()
    async with server_process(tmp_path / "data", tmp_path / "server.log", env=env) as server:
        with trio.fail_after(RUN_TIMEOUT_S):
            done = trio.Event()
            peaks: dict[str, int] = {}
            limiter = trio.CapacityLimiter(CONCURRENCY)

            async def one(n: int, case: Case) -> None:
                async with limiter:
                    await run_case(server.port, case, n)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(healthy_client, server.port, stats, done)
                # Warm up (imports, first allocations) before the baseline.
                for n, case in enumerate(cases[:20], 1):
                    await one(n, case)
                baseline = server.status()
                nursery.start_soon(sample_rss, server, peaks, done)
                async with trio.open_nursery() as inputs:
                    for n, case in enumerate(cases[20:], 21):
                        inputs.start_soon(one, n, case)
                        await trio.sleep(0)
                done.set()
            after = server.status()
        assert server.proc.poll() is None, "the server died"
        log = server.log()
    growth = {k: peaks[k] - baseline[k] for k in ("VmRSS", "RssAnon")}
    kinds: dict[str, int] = {}
    for case in cases:
        kinds[case.kind] = kinds.get(case.kind, 0) + 1
    codes: dict[str, int] = {}
    for case in cases:
        code = next((f["code"] for f in case.answers if f.get("t") == "error"), None)
        key = code or ("clean close" if case.closed else "no error")
        codes[key] = codes.get(key, 0) + 1
    print(f"inputs by kind: {dict(sorted(kinds.items()))}")
    print(f"first error code per input: {dict(sorted(codes.items()))}")
    print(
        f"RSS kB: baseline {baseline['VmRSS']}, peak {peaks['VmRSS']}, end {after['VmRSS']}; "
        f"RssAnon growth {growth['RssAnon']} kB; healthy sends acked {len(stats.acked)}"
    )
    assert "internal error" not in log and "Traceback" not in log, log[-5000:]
    assert max(growth.values()) < RSS_GROWTH_BOUND_KIB, growth
    assert len(stats.acked) >= 20 and stats.events == stats.acked


async def test_fuzzed_frames_get_documented_errors_and_spare_the_healthy(tmp_path: Path) -> None:
    await fuzz(tmp_path, INPUTS)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TSMSG_LONG") != "1", reason="TSMSG_LONG=1 (make test-long)")
async def test_fuzz_long(tmp_path: Path) -> None:
    await fuzz(tmp_path, LONG_INPUTS)
