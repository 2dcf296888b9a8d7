"""What a trip to a read thread costs: the measurement behind server/threads.py (issue 17).

A request's store reads run off the event loop: the task hands a function to a thread
and is woken with its result. This times that trip, for a function that does nothing,
two ways, in alternating rounds:

- ``trio.to_thread``: ``trio.to_thread.run_sync(fn, limiter=CapacityLimiter(8))``, what
  the server did until 2026-12-07;
- ``ReadThreads``: the server's fixed pool of 8 threads (``server/threads.py``).

Printed: CPU µs of the whole process per trip (the event loop's and the thread's), one
trip at a time, and with ``--concurrent`` tasks making trips at once. Pinned to one core
the figures are steady (the server's benchmarks pin it there too); unpinned, a trip
also pays waking a thread on the other core:

    taskset -c 0 .venv/bin/python bench/readtrip.py [--trips 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable

import trio

from tsmsg.server.threads import ReadThreads

THREADS = 8  # the read_threads setting's default


def noop() -> None:
    return None


async def per_trip(
    trip: Callable[[Callable[[], None]], Awaitable[None]], trips: int, concurrent: int
) -> float:
    """Process CPU µs per trip: ``trips`` in all, by ``concurrent`` tasks at once."""

    async def worker(n: int) -> None:
        for _ in range(n):
            await trip(noop)

    start = time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrent):
            nursery.start_soon(worker, trips // concurrent)
    return (time.process_time() - start) / (trips // concurrent * concurrent) * 1e6


async def main(trips: int, rounds: int, concurrent: int) -> None:
    limiter = trio.CapacityLimiter(THREADS)

    async def via_trio(fn: Callable[[], None]) -> None:
        await trio.to_thread.run_sync(fn, limiter=limiter)

    pool = ReadThreads(THREADS)
    ways = {"trio.to_thread": via_trio, "ReadThreads": pool.run}
    try:
        for width in sorted({1, concurrent}):
            for r in range(rounds):
                for name, trip in ways.items():
                    cost = await per_trip(trip, trips, width)
                    print(f"round {r + 1}, {width} at once: {name:15} {cost:6.1f} µs CPU per trip")
    finally:
        pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trips", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=16)
    args = parser.parse_args()
    trio.run(main, args.trips, args.rounds, args.concurrent)
