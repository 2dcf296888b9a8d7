"""Summarize ``py-spy record --format raw --threads`` output (bench/run.py --py-spy).

For each profile: samples per thread, then per thread the functions with the most samples
on the stack (inclusive) and at the top of it (self). py-spy samples only threads that are
running (not idle in a syscall it knows as idle), so shares are of busy time.

    .venv/bin/python bench/pyspy_summary.py bench/results/<run>/py-spy/*.txt
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(.*) \(([^)]*)\)$")


def short(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    func, where = m.groups()
    path = where.split(":")[0]
    return f"{func} ({Path(path).name})"


def summarize(path: Path, top: int = 12) -> str:
    threads: Counter[str] = Counter()
    incl: dict[str, Counter[str]] = {}
    self_: dict[str, Counter[str]] = {}
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():  # py-spy sometimes reads a garbled name
            continue
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\d+\): ", "", frames[0])
        count = int(count_text)
        threads[thread] += count
        for f in {short(f) for f in frames[1:]}:
            incl.setdefault(thread, Counter())[f] += count
        if len(frames) > 1:
            self_.setdefault(thread, Counter())[short(frames[-1])] += count
    total = sum(threads.values())
    out = [f"## {path.stem}: {total} samples", ""]
    for thread, n in threads.most_common():
        out.append(f"### {thread}: {n} samples ({100 * n / total:.0f} %)")
        out.append("inclusive: " + "; ".join(
            f"{f} {100 * c / n:.0f}%" for f, c in incl.get(thread, Counter()).most_common(top + 8)
        ))  # fmt: skip
        out.append("self: " + "; ".join(
            f"{f} {100 * c / n:.0f}%" for f, c in self_.get(thread, Counter()).most_common(top)
        ))  # fmt: skip
        out.append("")
    return "\n".join(out)


# Where the trio (main) thread's time goes, by the first rule whose function is on the
# stack (rules in priority order; the socket syscall is attributed by its caller).
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("metrics", ("prometheus_client", "Metrics.", "Tally.", "Timings.")),
    ("store submit: queue.put, wakes the writer thread", ("Store.submit",)),
    ("recv syscalls (the reader's socket reads)", ("receive_some", "_receive_fd", "FdReceive")),
    ("send syscalls (Connection.writer)", ("SocketStream.send_all", "TlsStream.send_all")),
    ("flusher writes (Server._flusher: one write per connection)", ("Server._flusher",)),
    ("commit callback: acks, fan-out into member queues", ("Server.on_batch", "Server.publish")),
    ("frame decode + request handling (Session)", ("Session.receive_frame",)),
    ("writer task, excl. syscalls", ("Connection.writer",)),
    ("reader task, excl. recv and handling", ("Connection.reader",)),
    ("epoll_wait (idle, or waiting for the store's writer thread)", ("get_events",)),
    ("trio scheduler, other", ("",)),
]


def categories(path: Path, thread: str = "MainThread") -> dict[str, float]:
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if not stack or not n.isdigit() or re.sub(r"^thread \(\d+\): ", "", frames[0]) != thread:
            continue
        text = ";".join(frames[1:])
        for name, needles in CATEGORIES:
            if any(x in text for x in needles):
                counts[name] += int(n)
                break
    total = sum(counts.values()) or 1
    return {name: counts[name] / total for name, _ in CATEGORIES}


def main() -> None:
    for arg in sys.argv[1:]:
        print(summarize(Path(arg)))
        print("main thread by category: " + "; ".join(
            f"{k} {100 * v:.0f}%" for k, v in categories(Path(arg)).items()
        ))  # fmt: skip
        print()


if __name__ == "__main__":
    main()
