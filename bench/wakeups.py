"""What waking a reader costs in trio: the measurement behind server/poller.py (issue 17).

N socket pairs; each round writes one byte into every pair and waits until every byte is
read, three ways:

- ``task per socket``: a task per socket waits with ``trio.lowlevel.wait_readable`` and
  reads (what the server's reader tasks did for every frame);
- ``poller, tasks woken``: one task waits for an epoll of its own and reschedules the
  socket's task, which reads (trio's registration churn gone, the task switch kept);
- ``poller, handled inline``: one task waits for the epoll and reads every ready socket
  itself (what the server's poller does).

Printed: CPU µs per socket wake-up beyond the write and read themselves (measured alone
first). Run pinned to one core for steady figures:

    taskset -c 0 .venv/bin/python bench/wakeups.py [--sockets 256] [--rounds 400]

``--echo 500,2000,10000``: what waking a process costs on this machine, without trio: a
forked echo process on CPU 0 (``recv`` then ``send``, nothing else) answers a sender on
CPU 1 paced at each rate for 3 s; printed: the echo process's CPU µs per message.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import socket
import struct
import time
from collections.abc import Callable

import trio
import trio.testing


def bare_cost(pairs: list[tuple[socket.socket, socket.socket]], rounds: int) -> float:
    """CPU seconds of the writes and reads alone, per socket per round."""
    start = time.process_time()
    for _ in range(rounds):
        for _, b in pairs:
            os.write(b.fileno(), b"x")
        for a, _ in pairs:
            os.read(a.fileno(), 100)
    return (time.process_time() - start) / rounds / len(pairs)


class Reads:
    """Counts a round's reads; ``finished`` is set at the last one."""

    def __init__(self, n: int) -> None:
        self.n, self.done, self.finished = n, 0, trio.Event()

    def count(self) -> None:
        self.done += 1
        if self.done == self.n:
            self.finished.set()


async def timed_rounds(
    pairs: list[tuple[socket.socket, socket.socket]], rounds: int, reads: list[Reads]
) -> float:
    """CPU seconds per socket per round, once the readers wait (``reads[0]``: the round's)."""
    await trio.testing.wait_all_tasks_blocked()
    start = time.process_time()
    for _ in range(rounds):
        reads[0] = Reads(len(pairs))
        for _, b in pairs:
            os.write(b.fileno(), b"x")
        await reads[0].finished.wait()
    return (time.process_time() - start) / rounds / len(pairs)


async def task_per_socket(pairs: list[tuple[socket.socket, socket.socket]], rounds: int) -> float:
    reads = [Reads(len(pairs))]

    async def reader(fd: int) -> None:
        while True:
            await trio.lowlevel.wait_readable(fd)
            os.read(fd, 65536)
            reads[0].count()

    async with trio.open_nursery() as nursery:
        for a, _ in pairs:
            nursery.start_soon(reader, a.fileno())
        cost = await timed_rounds(pairs, rounds, reads)
        nursery.cancel_scope.cancel()
    return cost


async def poller(
    pairs: list[tuple[socket.socket, socket.socket]], rounds: int, inline: bool
) -> float:
    epoll = select.epoll()
    waiting: dict[int, trio.lowlevel.Task] = {}
    reads = [Reads(len(pairs))]

    async def reader(fd: int) -> None:
        while True:
            waiting[fd] = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.SUCCEEDED)
            os.read(fd, 65536)
            reads[0].count()

    async def poll() -> None:
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            for fd, _ in epoll.poll(0, len(pairs)):
                if inline:
                    os.read(fd, 65536)
                    reads[0].count()
                elif fd in waiting:
                    trio.lowlevel.reschedule(waiting.pop(fd))

    async with trio.open_nursery() as nursery:
        for a, _ in pairs:
            epoll.register(a.fileno(), select.EPOLLIN)
            if not inline:
                nursery.start_soon(reader, a.fileno())
        nursery.start_soon(poll)
        cost = await timed_rounds(pairs, rounds, reads)
        nursery.cancel_scope.cancel()
    epoll.close()
    return cost


def echo_cost(rate: int, seconds: float = 3.0) -> float:
    """CPU µs per message of a process that only echoes, at ``rate`` messages/s."""
    n = int(rate * seconds)
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo process
        b.close()
        os.sched_setaffinity(0, {0})
        while data := a.recv(100):
            a.send(data)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        os.write(a.fileno(), struct.pack("d", usage.ru_utime + usage.ru_stime))
        os._exit(0)
    a.close()
    os.sched_setaffinity(0, {1})
    start = time.perf_counter()
    for i in range(n):
        due = start + i / rate
        while time.perf_counter() < due:
            pass
        b.send(b"x" * 100)
        b.recv(100)
    b.shutdown(socket.SHUT_WR)
    (cpu,) = struct.unpack("d", b.recv(8))
    os.waitpid(pid, 0)
    b.close()
    return cpu / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sockets", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--echo", help="comma-separated rates: the echo process instead")
    a = ap.parse_args()
    if a.echo:
        for rate in map(int, a.echo.split(",")):
            print(f"echo at {rate:6d} msgs/s: {echo_cost(rate):6.1f} µs CPU per message")
        return
    pairs = [socket.socketpair() for _ in range(a.sockets)]
    for x, y in pairs:
        x.setblocking(False)
        y.setblocking(False)
    bare = bare_cost(pairs, a.rounds)
    print(f"{a.sockets} sockets x {a.rounds} rounds; write + read alone: {bare * 1e6:.2f} µs")
    cases: dict[str, Callable[[], float]] = {
        "task per socket": lambda: trio.run(task_per_socket, pairs, a.rounds),
        "poller, tasks woken": lambda: trio.run(poller, pairs, a.rounds, False),
        "poller, handled inline": lambda: trio.run(poller, pairs, a.rounds, True),
    }
    for name, run in cases.items():
        print(f"{name:24s} {(run() - bare) * 1e6:6.2f} µs CPU per wake-up beyond them")
    for x, y in pairs:
        x.close()
        y.close()


if __name__ == "__main__":
    main()
