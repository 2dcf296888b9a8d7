"""The server's read threads (server/threads.py): results and exceptions reach the caller,
at most n reads run at once and the others start in order, a caller cancelled while its
read runs waits for it and one cancelled before it started does not (nor does the read
run), Ctrl-C stays a KeyboardInterrupt, and close() ends the threads."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import trio
import trio.testing

from tsmsg.server.threads import ReadThreads

WAIT_S = 10  # a bound on every wait here; none takes more than milliseconds


async def test_the_result_or_the_exception_reaches_the_caller() -> None:
    reads = ReadThreads(2)
    try:
        assert (await reads.run(lambda: threading.current_thread().name)).startswith("tsmsg-read-")

        def fails() -> None:
            raise LookupError("no such channel")

        with pytest.raises(LookupError, match="no such channel"):
            await reads.run(fails)
        assert await reads.run(lambda: 41 + 1) == 42  # the thread survived it
    finally:
        reads.close()


async def test_at_most_n_run_at_once_and_the_rest_start_in_order() -> None:
    n, total = 2, 7
    reads = ReadThreads(n)
    lock, running, most, started = threading.Lock(), [0], [0], []
    release = threading.Event()

    def read(i: int) -> int:
        with lock:
            started.append(i)
            running[0] += 1
            most[0] = max(most[0], running[0])
        release.wait(WAIT_S)
        with lock:
            running[0] -= 1
        return i * i

    results: dict[int, int] = {}

    async def call(i: int) -> None:
        results[i] = await reads.run(lambda: read(i))

    try:
        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                for i in range(total):
                    nursery.start_soon(call, i)
                    await trio.testing.wait_all_tasks_blocked()  # queued in this order
                while len(started) < n:
                    await trio.sleep(0.001)
                await trio.sleep(0.05)  # the others would have started by now
                assert sorted(started) == list(range(n))
                release.set()
        assert results == {i: i * i for i in range(total)}
        assert most[0] == n
        assert started[n:] == list(range(n, total))  # first come, first served
    finally:
        release.set()
        reads.close()


async def test_a_cancelled_caller_waits_for_its_read() -> None:
    reads = ReadThreads(1)
    release, done, got = threading.Event(), threading.Event(), []

    def read() -> str:
        release.wait(WAIT_S)
        done.set()
        return "page"

    try:
        with trio.fail_after(WAIT_S):
            with trio.CancelScope() as scope:
                scope.cancel()  # before the call: it does not start
                await reads.run(read)
            assert scope.cancelled_caught and not done.is_set()

            with trio.move_on_after(0.05) as scope:
                trio.lowlevel.spawn_system_task(trio.to_thread.run_sync, _release_later, release)
                got.append(await reads.run(read))  # not interrupted by the deadline
                await trio.sleep(0)  # the next checkpoint is
            assert done.is_set() and got == ["page"] and scope.cancelled_caught
    finally:
        release.set()
        reads.close()


def _release_later(release: threading.Event) -> None:
    threading.Event().wait(0.2)  # past the caller's deadline
    release.set()


async def test_close_ends_the_threads() -> None:
    reads = ReadThreads(3, name="test-read")
    assert await reads.run(lambda: "x") == "x"
    names = {t.name for t in threading.enumerate()}
    assert {"test-read-0", "test-read-1", "test-read-2"} <= names
    reads.close()
    assert not {t.name for t in threading.enumerate()} & {
        "test-read-0",
        "test-read-1",
        "test-read-2",
    }


async def test_a_caller_cancelled_before_its_read_starts_does_not_wait_for_it() -> None:
    """trio.to_thread.run_sync(limiter=CapacityLimiter(n)) lets a caller still queued for a
    thread leave at once when cancelled, its read never run. A read not started holds no
    read transaction, so nothing needs it to run: at shutdown (or a cut connection) a
    backlog of queued reads would otherwise all run, one slow store read after another,
    before the handlers' nursery can end."""
    reads = ReadThreads(1)
    release, ran = threading.Event(), []

    def first() -> str:
        release.wait(WAIT_S)
        return "first"

    try:
        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reads.run, first)  # holds the only thread
                await trio.testing.wait_all_tasks_blocked()
                timer = threading.Timer(0.5, release.set)  # the first read ends in 0.5 s
                timer.start()
                start = trio.current_time()
                with trio.move_on_after(0.05):
                    await reads.run(lambda: ran.append("second"))  # queued behind it
                waited = trio.current_time() - start
            await trio.sleep(0.1)
        assert waited < 0.4, f"the cancelled caller waited {waited:.2f} s for a thread"
        assert ran == [], "a read whose caller was cancelled before it started still ran"
    finally:
        release.set()
        reads.close()


def test_ctrl_c_right_after_a_read_is_queued_is_a_keyboard_interrupt() -> None:
    """A SIGINT lands between run()'s put() and its wait (trio raises KeyboardInterrupt in
    unprotected code; trio.to_thread.run_sync is KI-protected, so there it is delivered to
    the main task instead). The read's thread then reschedules a task that is not waiting:
    trio fails with TrioInternalError instead of the KeyboardInterrupt (exit 130)."""
    import signal

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("trio installs its Ctrl-C handler only over Python's default one")

    class CtrlCAfterPut:
        def __init__(self, jobs: Any) -> None:
            self.jobs, self.fired = jobs, False

        def put(self, item: Any) -> None:
            self.jobs.put(item)
            if item is not None and not self.fired:
                self.fired = True
                signal.raise_signal(signal.SIGINT)

        def get(self) -> Any:
            return self.jobs.get()

    got: list[str] = []

    async def main() -> None:
        reads = ReadThreads(1)
        reads._jobs = CtrlCAfterPut(reads._jobs)  # type: ignore[assignment]
        try:
            async with trio.open_nursery() as nursery:

                async def reader() -> None:
                    got.append(await reads.run(lambda: (threading.Event().wait(0.1), "page")[1]))

                nursery.start_soon(reader)
                await trio.sleep(WAIT_S)
        finally:
            reads.close()

    with pytest.raises(BaseException) as caught:
        trio.run(main)
    assert not isinstance(caught.value, trio.TrioInternalError), repr(caught.value)
    assert (
        caught.group_contains(KeyboardInterrupt)
        if isinstance(caught.value, BaseExceptionGroup)
        else isinstance(caught.value, KeyboardInterrupt)
    )
