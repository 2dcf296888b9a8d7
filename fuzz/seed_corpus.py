"""Writes the seed inputs of the fuzz targets into fuzz/seeds/<target>/ (not committed;
the committed fuzz/corpus/ is what `cargo fuzz cmin` kept of these plus what the fuzzer
found). Seeds: every example frame of PROTOCOL.md section 18 (parsed from its hex dumps),
the whole example session as one stream, and a few edge-case frames. The input layouts
are described in fuzz/src/checks.rs.

Run from the repository root: .venv/bin/python fuzz/seed_corpus.py
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fuzz" / "seeds"

# limits byte: low 2 bits 3 = max_frame 1 MiB, bits 2..4 = 0 = max_depth 32 (the defaults).
DEFAULTS = 0x03


def example_frames() -> list[bytes]:
    text = (ROOT / "PROTOCOL.md").read_text()
    frames = []
    for block in re.findall(r"```hex\n(.*?)```", text, re.S):
        data = bytearray()
        for line in block.splitlines():
            hexpart = line[10:].split("|")[0]
            data += bytes.fromhex(hexpart.replace(" ", ""))
        frames.append(bytes(data))
    return frames


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def edge_bodies() -> list[bytes]:
    s = b"\xa1t\xa4send"
    return [
        b"\x80",  # {}
        b"\x81" + s,
        b"\x82" + s + b"\xa1f\xca" + struct.pack(">f", 1.25),  # float32
        b"\x82" + s + b"\xa1d\xcb" + struct.pack(">d", float("nan")),  # NaN
        b"\x82" + s + b"\xa1u\xcf" + b"\xff" * 8,  # uint64 max
        b"\x82" + s + b"\xa1i\xd3\x80" + b"\x00" * 7,  # int64 min
        b"\x82" + s + b"\xa1b\xc4\x03\x00\x01\xff",  # bin8
        b"\x82" + s + b"\xa1x\xd4\x01\x00",  # fixext1: unsupported
        b"\x82" + s + b"\xa1s\xd9\x03h\xc3\xa9",  # str8 UTF-8
        b"\x82" + s + b"\xa1m\xde\x00\x01\xa0\xc0",  # map16
        b"\x82" + s + b"\xa1a\xdc\x00\x02\x01\x02",  # array16
        b"\x82" + s + b"\xa1a\xdd\x00\x00\x00\x01\x90",  # array32
        b"\x81\xa1a" + b"\x91" * 40 + b"\x90",  # nesting past 32
        b"\x81\xa1a\xdd\x00\x00\x00\x09" + b"\xdd\x00\x00\x00\x04" * 2,  # nested lies
        b"\x81\x01\x02",  # non-string key
        b"\x81\xa1a\xc1",  # reserved byte
        b"\x80\x00",  # trailing byte
    ]


def write(target: str, inputs: list[bytes]) -> None:
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    for data in inputs:
        (d / hashlib.sha1(data).hexdigest()).write_bytes(data)
    print(f"{target}: {len(inputs)} seeds in {d}")


def main() -> None:
    frames = example_frames()
    bodies = [f[4:] for f in frames] + edge_bodies()
    session = b"".join(frames)
    decode = [bytes([DEFAULTS, 7]) + f for f in frames]
    decode += [bytes([DEFAULTS, 7]) + frame(b) for b in edge_bodies()]
    # The whole session in chunks of every span, and with small limits.
    decode += [bytes([DEFAULTS, seed]) + session for seed in range(8)]
    decode += [bytes([cfg, 0x15]) + session for cfg in (0x00, 0x01, 0x02, 0x04, 0x1F)]
    decode.append(bytes([DEFAULTS, 0]) + session[:-3])  # incomplete tail
    write("decode_frames", decode)
    write("roundtrip", [bytes([DEFAULTS]) + b for b in bodies])
    # dedup_ring: capacity 3, max_key_len 4; inserts of keys "a" (0), "ab", a long key,
    # gets and contains; op byte = key_len << 2 | kind (0/1 insert, 2 get, 3 contains).
    ops = [
        bytes([2, 4, 1 << 2, 0, 9, 2 << 2 | 1, 0, 1, 7, 1 << 2 | 2, 0, 1 << 2 | 3, 1]),
        bytes([0, 4])
        + b"".join(bytes([1 << 2, k % 4, k]) for k in range(5))
        + bytes([1 << 2 | 2, 0]),
        bytes([3, 2, 5 << 2, 1, 2, 3, 0, 1, 9, 0 << 2, 5, 0 << 2 | 2]),
    ]
    write("dedup_ring", ops)


if __name__ == "__main__":
    main()
