"""The server's read threads: a request's store reads run off the event loop.

``trio.to_thread.run_sync`` does the same for any caller: a capacity limiter, a copy of
the context, its thread cache, a cancellation protocol. A connect makes two store reads
(the user's memberships, the join's channel), and that machinery cost each ~40 µs of CPU
on one core against ~20 µs for this fixed pool (``bench/README.md``, "The read threads",
issue 17). What is kept: at most ``n`` reads run at once, the others wait in order; a
caller cancelled while its read waits for a thread leaves at once (the read never runs),
one whose read has started waits for it to end (the store's read transaction is never
left behind); an exception in the read is raised in the caller; Ctrl-C is delivered as
around ``to_thread`` (the method is KI-protected).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

# The read in a list of one: whoever pops it first, a thread (the read runs) or the
# caller's abort (cancelled before it started), owns it (list.pop is atomic).
_Job = tuple[list[Callable[[], Any]], trio.lowlevel.Task] | None


class ReadThreads:
    """``n`` threads that run the functions :meth:`run` is given, first come first
    served, and wake the waiting task with the outcome. Made in the trio thread;
    :meth:`close` ends the threads once no read is running."""

    def __init__(self, n: int, name: str = "tsmsg-read") -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(n)
        ]
        for thread in self._threads:
            thread.start()

    # KI-protected like trio.to_thread.run_sync: a Ctrl-C between the put and the wait
    # would leave a job whose thread reschedules a task that is not waiting.
    @trio.lowlevel.enable_ki_protection
    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in one of the threads; its result, or its exception raised here."""
        await trio.lowlevel.checkpoint_if_cancelled()
        cell = [fn]
        self._jobs.put((cell, trio.lowlevel.current_task()))

        def abort(_: Any) -> trio.lowlevel.Abort:
            try:
                cell.pop()  # not started: it never will be
            except IndexError:  # a thread runs it: to its end, then the caller sees it
                return trio.lowlevel.Abort.FAILED
            return trio.lowlevel.Abort.SUCCEEDED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def _work(self) -> None:
        reschedule, soon = trio.lowlevel.reschedule, self._token.run_sync_soon
        while (job := self._jobs.get()) is not None:
            cell, task = job
            try:
                fn = cell.pop()
            except IndexError:  # its caller was cancelled before it started
                del cell, job, task
                continue
            del cell
            result = outcome.capture(fn)
            try:
                soon(reschedule, task, result)
            except trio.RunFinishedError:  # the trio run is gone, and so is the caller
                return
            del fn, job, task, result  # nothing of a read outlives it in this thread

    def close(self) -> None:
        """End the threads (each after the read it runs, if any)."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
