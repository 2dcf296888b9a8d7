"""One epoll loop that reads every idle connection (issue 17).

A connection (TCP or WebSocket, plaintext or TLS) past its hello, with no partial frame
and no TLS input left undecrypted, parks its reader task here. The poller waits for
all parked sockets at once (its own epoll, level-triggered, each socket registered once
per park) and, when one is readable, reads it and hands the bytes to the connection's
:meth:`input` right here: the frames are decoded and handled without waking the reader
task. The task is woken only when it has something to await: EOF (a WebSocket close
too) or a socket error, a frame error, a partial frame (its deadline), backpressure, a
store read, a closing connection, or a burst longer than ``YIELD_EVERY_S``. It then goes
on from there as it would have after its own read, and parks again once it is idle.

Why: a trio wake-up per readable socket (the task rescheduled, its ``wait_readable``
re-armed with ``epoll_ctl``, trio's registration rebuilt) costs ~10 µs of CPU beyond the
read (``bench/wakeups.py``), and a connection's wake-up ~30 µs in the server, more than
handling a frame; with many connections each sending now and then (a chat server's usual
load) a message cost 22-28 % less without it (bench/README.md, "One epoll loop for the
readers").

Fairness is kept: one read (at most ``RECEIVE_CHUNK`` bytes) per ready socket per round,
the sockets in the kernel's ready order; a round yields to other tasks after
``YIELD_EVERY_S`` and the next one begins with the sockets it did not reach; a socket
with more to read stays ready (level-triggered) and is read again in a later round.
"""

from __future__ import annotations

import os
import select
import time
from typing import Protocol

import trio

from tsmsg.server.wire import RECEIVE_CHUNK

# A connection handling a pipelined batch of frames (and the poller, a round of reads)
# lets the others run after this long: one client's burst delays another's ping by about
# this much, not by the whole batch.
YIELD_EVERY_S = 0.002
MAX_EVENTS = 1024  # ready sockets taken per round at most (the rest: next round)


class Reader(Protocol):
    def input(self, data: bytes | OSError) -> bool:
        """Handle a read of the parked socket (bytes, b"" at EOF, or the read's error);
        False hands the connection back to its reader task. Never raises (an error is
        the task's to raise)."""
        ...


class Poller:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._parked: dict[int, tuple[Reader, trio.lowlevel.Task]] = {}

    def __len__(self) -> int:
        return len(self._parked)

    async def park(self, fd: int, reader: Reader) -> None:
        """In a reader task: return when the poller hands the connection back (its
        :meth:`Reader.input` returned False). Cancelling the task unparks it."""
        self._epoll.register(fd, select.EPOLLIN)
        self._parked[fd] = (reader, trio.lowlevel.current_task())

        def abort(_: object) -> trio.lowlevel.Abort:
            self._unpark(fd)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _unpark(self, fd: int) -> None:
        del self._parked[fd]
        self._epoll.unregister(fd)  # before the socket can be closed: its fd is reused

    async def run(self) -> None:
        """The poller's task: one round per wake-up of its epoll (see the module doc). A
        round cut short by ``YIELD_EVERY_S`` goes on with the sockets it did not reach
        before it polls again: level-triggered epoll reports ready sockets in the same
        order every time, so starting over would starve the ones past the cut."""
        epoll, parked = self._epoll, self._parked
        ready: list[tuple[int, int]] = []
        while True:
            if ready:
                await trio.lowlevel.checkpoint()
            else:
                await trio.lowlevel.wait_readable(epoll.fileno())
                ready = epoll.poll(0, MAX_EVENTS)
            start = time.perf_counter()
            for i, (fd, _) in enumerate(ready):
                entry = parked.get(fd)
                if entry is None:  # handed back, or unparked, since it was reported
                    continue
                reader, task = entry
                try:
                    data: bytes | OSError = os.read(fd, RECEIVE_CHUNK)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    data = exc
                if not reader.input(data):
                    self._unpark(fd)
                    trio.lowlevel.reschedule(task)
                if time.perf_counter() - start > YIELD_EVERY_S:
                    ready = ready[i + 1 :]  # first in the next round
                    break
            else:
                ready = []

    def close(self) -> None:
        """After every task has ended (the server's run)."""
        self._epoll.close()
