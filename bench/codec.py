"""Frame codec throughput: tsmsg._native against msgpack-python and msgspec, same run.

Each contender frames the same way (a 4-byte big-endian length, then a msgpack map): ours
in Rust, the others with ``struct`` in Python around their msgpack calls, as a server
using them would. Workloads are realistic chat frames: a ``send`` (50-500 bytes of text),
an ``event`` with ``meta``, and a ``sync`` reply carrying 100 events; each as single frames
and as 64 KiB buffers of many frames.

Run with ``make bench-codec`` (or ``.venv/bin/python bench/codec.py``). Prints a Markdown
table and writes ``results.json`` and ``results.md`` to ``bench/results/<date>-codec/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import struct
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import msgpack
import msgspec

from benchlib import machine, write_report
from tsmsg import _native

HEADER = struct.Struct(">I")
BUFFER_BYTES = 64 * 1024
WORDS = "the quick brown fox jumps over a lazy dog while we ship the release on friday".split()


def text(rng: random.Random, low: int, high: int) -> str:
    target = rng.randint(low, high)
    out: list[str] = []
    size = 0
    while size < target:
        word = rng.choice(WORDS)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)[:target]


def send_frame(rng: random.Random, rid: int) -> dict[str, Any]:
    return {
        "t": "send",
        "rid": rid,
        "channel": f"room-{rng.randint(1, 50)}",
        "cid": f"{rng.getrandbits(128):032x}",
        "text": text(rng, 50, 500),
    }


def event_frame(rng: random.Random, seq: int) -> dict[str, Any]:
    return {
        "t": "event",
        "channel": f"room-{rng.randint(1, 50)}",
        "seq": seq,
        "kind": "message",
        "id": f"m{rng.getrandbits(64):016x}",
        "sender": f"user-{rng.randint(1, 10_000)}",
        "ts": 1_764_000_000_000 + seq * 731,
        "text": text(rng, 50, 300),
        "meta": {
            "reply_to": f"m{rng.getrandbits(64):016x}",
            "mentions": [f"user-{rng.randint(1, 10_000)}" for _ in range(rng.randint(0, 3))],
            "client": rng.choice(["ios", "android", "web"]),
            "edited": False,
        },
    }


def sync_frame(rng: random.Random, rid: int) -> dict[str, Any]:
    return {
        "t": "ok",
        "rid": rid,
        "events": [event_frame(rng, rid * 100 + i) for i in range(100)],
        "more": True,
        "head": rid * 100 + 100,
    }


def frame(obj: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(obj)
    return HEADER.pack(len(body)) + body


def fill_buffer(make: Callable[[random.Random, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Frames of one kind whose wire size first reaches 64 KiB (at least one frame)."""
    rng = random.Random(7)
    objs: list[dict[str, Any]] = []
    size = 0
    while size < BUFFER_BYTES:
        obj = make(rng, len(objs) + 1)
        objs.append(obj)
        size += len(frame(obj))
    return objs


# --- decoders: bytes of whole frames -> list of dicts --------------------------------------


def decode_tsmsg() -> Callable[[bytes], list[dict[str, Any]]]:
    decoder = _native.FrameDecoder()
    return decoder.feed


def decode_msgpack_unpacker() -> Callable[[bytes], list[dict[str, Any]]]:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=_native.DEFAULT_MAX_FRAME)

    def decode(data: bytes) -> list[dict[str, Any]]:
        view = memoryview(data)
        out = []
        pos = 0
        end = len(data)
        while pos + 4 <= end:
            (n,) = HEADER.unpack_from(data, pos)
            unpacker.feed(view[pos + 4 : pos + 4 + n])
            out.append(unpacker.unpack())
            pos += 4 + n
        return out

    return decode


def decode_msgpack_unpackb() -> Callable[[bytes], list[dict[str, Any]]]:
    unpackb = msgpack.unpackb

    def decode(data: bytes) -> list[dict[str, Any]]:
        view = memoryview(data)
        out = []
        pos = 0
        end = len(data)
        while pos + 4 <= end:
            (n,) = HEADER.unpack_from(data, pos)
            out.append(unpackb(view[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        return out

    return decode


def decode_msgspec() -> Callable[[bytes], list[dict[str, Any]]]:
    msgspec_decode = msgspec.msgpack.Decoder().decode

    def decode(data: bytes) -> list[dict[str, Any]]:
        view = memoryview(data)
        out = []
        pos = 0
        end = len(data)
        while pos + 4 <= end:
            (n,) = HEADER.unpack_from(data, pos)
            out.append(msgspec_decode(view[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        return out

    return decode


# --- encoders: list of dicts -> one buffer of frames ----------------------------------------


def encode_tsmsg() -> Callable[[list[dict[str, Any]]], bytes]:
    encode, encode_many = _native.encode, _native.encode_many

    def run(objs: list[dict[str, Any]]) -> bytes:
        return encode(objs[0]) if len(objs) == 1 else encode_many(objs)

    return run


def framed(packb: Callable[[Any], bytes]) -> Callable[[list[dict[str, Any]]], bytes]:
    pack_header = HEADER.pack

    def run(objs: list[dict[str, Any]]) -> bytes:
        if len(objs) == 1:
            body = packb(objs[0])
            return pack_header(len(body)) + body
        parts = []
        for obj in objs:
            body = packb(obj)
            parts.append(pack_header(len(body)))
            parts.append(body)
        return b"".join(parts)

    return run


def encode_msgpack() -> Callable[[list[dict[str, Any]]], bytes]:
    return framed(msgpack.Packer().pack)


def encode_msgspec() -> Callable[[list[dict[str, Any]]], bytes]:
    return framed(msgspec.msgpack.Encoder().encode)


DECODERS = {
    "tsmsg": decode_tsmsg,
    "msgpack (Unpacker)": decode_msgpack_unpacker,
    "msgpack (unpackb)": decode_msgpack_unpackb,
    "msgspec": decode_msgspec,
}
ENCODERS = {
    "tsmsg": encode_tsmsg,
    "msgpack": encode_msgpack,
    "msgspec": encode_msgspec,
}


def best_and_median(fn: Callable[[], object], repeats: int, min_time: float) -> tuple[float, float]:
    """Seconds per call: best and median of `repeats` timed loops of >= `min_time` each."""
    fn()
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_time / 10:
            loops = max(1, round(loops * min_time / elapsed))
            break
        loops *= 2
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - start) / loops)
    return min(times), statistics.median(times)


def workloads() -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(1)
    return {
        "send, single frame": [send_frame(rng, 1)],
        "event, single frame": [event_frame(rng, 1)],
        "sync (100 events), single frame": [sync_frame(rng, 1)],
        "send, 64 KiB buffer": fill_buffer(send_frame),
        "event, 64 KiB buffer": fill_buffer(event_frame),
        "sync (100 events), 64 KiB buffer": fill_buffer(sync_frame),
    }


def bind(op: str, fn: Any, wire: bytes, objs: list[dict[str, Any]]) -> Callable[[], object]:
    """The zero-argument call to time: decode the wire bytes or encode the objects."""
    arg = wire if op == "decode" else objs
    return lambda: fn(arg)


def run(repeats: int, min_time: float) -> list[dict[str, Any]]:
    rows = []
    for name, objs in workloads().items():
        wire = b"".join(frame(obj) for obj in objs)
        assert _native.FrameDecoder().feed(wire) == objs
        assert _native.encode_many(objs) == wire
        contenders: dict[str, Callable[[], Any]]
        for op, contenders in (("decode", DECODERS), ("encode", ENCODERS)):
            for who, make in contenders.items():
                call = bind(op, make(), wire, objs)
                expected: object = objs if op == "decode" else wire
                assert call() == expected, (op, who)
                best, median = best_and_median(call, repeats, min_time)
                rows.append(
                    {
                        "workload": name,
                        "op": op,
                        "impl": who,
                        "frames": len(objs),
                        "bytes": len(wire),
                        "best_s": best,
                        "median_s": median,
                        "frames_per_s": len(objs) / best,
                        "mb_per_s": len(wire) / best / 1e6,
                    }
                )
                print(f"  {op} {name:34} {who:20} {len(wire) / best / 1e6:9.1f} MB/s", flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| op | workload | impl | frames/s (best) | MB/s (best) | MB/s (median) | tsmsg speedup |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    ours = {(r["op"], r["workload"]): r for r in rows if r["impl"] == "tsmsg"}
    for r in rows:
        mine = ours[(r["op"], r["workload"])]
        speedup = "" if r is mine else f"{r['best_s'] / mine['best_s']:.2f}x"
        lines.append(
            f"| {r['op']} | {r['workload']} | {r['impl']} | {r['frames_per_s']:,.0f} | "
            f"{r['mb_per_s']:,.1f} | {r['bytes'] / r['median_s'] / 1e6:,.1f} | {speedup} |"
        )
    return "\n".join(lines)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("tsmsg", "msgpack", "msgspec"):
        out[dist] = metadata.version(dist)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed loops per case")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per timed loop")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    args = parser.parse_args()

    command = " ".join([os.path.relpath(sys.executable), *sys.argv])
    info: dict[str, Any] = {"command": command, "machine": machine(), "versions": versions()}
    print(json.dumps(info, indent=2))
    rows = run(args.repeats, args.min_time)
    md_table = table(rows)
    print(md_table)

    date = datetime.date.today().isoformat()
    out = args.out or Path(__file__).parent / "results" / f"{date}-codec"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**info, "date": date, "rows": rows}, indent=2))
    m, v = info["machine"], info["versions"]
    write_report(
        out,
        f"# Frame codec benchmark, {date}\n\n"
        f"- command: `{command}` (from the repository root; `make bench-codec`)\n"
        f"- machine: {m['cpu']}, {m['nproc']} CPUs, {m['platform']}\n"
        f"- versions: Python {v['python']}, tsmsg {v['tsmsg']} (release build), "
        f"msgpack {v['msgpack']}, msgspec {v['msgspec']}\n"
        f"- timing: time.perf_counter, {args.repeats} repeats of loops of >= "
        f"{args.min_time} s; best and median per call. MB = 10^6 bytes of wire frames "
        "(headers included). Speedup = contender's best time / tsmsg's best time.\n\n"
        f"{md_table}\n",
    )


if __name__ == "__main__":
    main()
