"""A send's session work in isolation: ``Session.receive_frame`` of 50,000 sends and
``Session.write_done`` of their results, GC off, best of 5 (µs per call).

    .venv/bin/python bench/results/2026-12-07-send-path/sans_io.py [prof]
"""

from __future__ import annotations

import cProfile
import dataclasses
import gc
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
from test_session import NOW_MS, connect, open_store
from tsmsg.protocol.ratelimit import UserLimits
from tsmsg.store import AppendResult

N = 50_000
UNLIMITED = {
    "send_rate": 1e9,
    "send_burst": 10**9,
    "channel_send_rate": 1e9,
    "channel_send_burst": 10**9,
}


def main() -> None:
    gc.disable()
    store = open_store(tempfile.mkdtemp() + "/db")
    session = connect(store)
    session._frames.rate = session._frames.tokens = 1e12  # no frame limit here
    session.user_limits = UserLimits(dataclasses.replace(session.limits, **UNLIMITED))
    frames = [
        {"t": "send", "rid": i, "channel": "room-1", "cid": f"c{i}", "text": "x" * 100}
        for i in range(N)
    ]
    best: dict[str, float] = {}
    for _ in range(5):
        t0 = time.perf_counter()
        acts = [session.receive_frame(f, NOW_MS) for f in frames]
        t1 = time.perf_counter()
        ops = [a[0].op for a in acts]
        for i, op in enumerate(ops):
            op.result = AppendResult("room-1", i + 1, f"m{i}", 1_700_000_000_000)
        t2 = time.perf_counter()
        for op in ops:
            session.write_done(op)
        t3 = time.perf_counter()
        for name, seconds in (("receive_frame", t1 - t0), ("write_done", t3 - t2)):
            best[name] = min(best.get(name, 1e9), seconds / N * 1e6)
    print(" ".join(f"{name} {us:.2f} us" for name, us in best.items()))
    if sys.argv[1:] == ["prof"]:
        profile = cProfile.Profile()
        profile.runcall(lambda: [session.receive_frame(f, NOW_MS) for f in frames])
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
