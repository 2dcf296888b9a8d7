"""The child process of test_store_crash.py: writes to a store until it is killed.

    python tests/crash_writer.py DATA_DIR CHANNELS --run R [--durability fsync|async]

CHANNELS is a comma-separated list. ``--threads`` writer threads (the "appenders") each
loop over blocking store calls, so several writes are pending at once and the store's
group commit builds real batches. Every call that returned is reported on stdout, one
flushed line each, written only after the call returned (that is, after its commit):

    ack  <channel> <cid> <seq> <id>      a new message
    dup  <channel> <cid> <seq> <id>      a retry of an acked cid (checked here: same seq/id)
    edit <channel> <id> <seq> <text>     an edit of one of the thread's own acked messages
    del  <channel> <id> <seq>            a delete of one of them
    fail <reason>                        an invariant broke in the child; it then exits 3

Thread ``t`` of run ``R`` is sender ``w<t>`` and uses the cids ``R.t.0``, ``R.t.1``, ...
in order, so the checker knows which unacknowledged message a thread may have had in
flight at the kill: only the one after its last ack. Message and edit texts start with
the cid and a ``|`` (see :func:`message_text`), so every stored message that is not a
tombstone names its own cid. The process exits by itself after ``--max-seconds`` in case
its parent died without killing it.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time

from tsmsg.store import LmdbStore, Store, StoreConfig

FILLER = "x" * 180  # with the cid prefix, messages are about 200 bytes, like the bench's


def message_text(cid: str) -> str:
    return f"{cid}|{FILLER}"


def edit_text(cid: str, n: int) -> str:
    """The text of a thread's n-th edit (no spaces: it ends an output line)."""
    return f"{cid}|edit{n}"


def sender_of(cid: str) -> str:
    """Thread t of any run writes as ``w<t>``: the cid's middle field."""
    return f"w{cid.split('.')[1]}"


class Output:
    """One stdout line per completed call, written and flushed under a lock so lines
    from different threads never interleave and each reaches the file before the next
    call starts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def line(self, *fields: object) -> None:
        text = " ".join(str(f) for f in fields) + "\n"
        with self._lock:
            sys.stdout.write(text)
            sys.stdout.flush()

    def fail(self, reason: str) -> None:
        self.line("fail", reason)
        os._exit(3)


def appender(
    store: Store, run: int, thread: int, channels: list[str], out: Output, deadline: float
) -> None:
    rng = random.Random(run * 1000 + thread)
    sender = f"w{thread}"
    acked: list[tuple[str, str, int, str]] = []  # (channel, cid, seq, id)
    live: list[tuple[str, str, str]] = []  # (channel, cid, id): acked and not deleted
    n_cid = n_edit = 0
    while time.monotonic() < deadline:
        roll = rng.random()
        if roll < 0.05 and acked:
            channel, cid, seq, mid = rng.choice(acked)
            res = store.append(channel, sender, cid, message_text(cid))
            if not (res.dup and res.seq == seq and res.id == mid):
                out.fail(f"retry of {channel} {cid} gave {res}, first was seq {seq} id {mid}")
            out.line("dup", channel, cid, res.seq, res.id)
        elif roll < 0.12 and live:
            channel, cid, mid = rng.choice(live)
            text = edit_text(cid, n_edit)
            n_edit += 1
            res = store.edit(channel, sender, mid, text)
            out.line("edit", channel, mid, res.seq, text)
        elif roll < 0.14 and live:
            channel, cid, mid = live.pop(rng.randrange(len(live)))
            res = store.delete(channel, sender, mid)
            out.line("del", channel, mid, res.seq)
        else:
            channel = rng.choice(channels)
            cid = f"{run}.{thread}.{n_cid}"
            n_cid += 1
            res = store.append(channel, sender, cid, message_text(cid))
            if res.dup:
                out.fail(f"new cid {channel} {cid} answered as a dup: {res}")
            out.line("ack", channel, cid, res.seq, res.id)
            acked.append((channel, cid, res.seq, res.id))
            live.append((channel, cid, res.id))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    parser.add_argument("channels", help="comma-separated channel names")
    parser.add_argument("--run", type=int, required=True, help="distinct per child started")
    parser.add_argument("--durability", choices=("fsync", "async"), default="fsync")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    args = parser.parse_args()

    out = Output()
    store = LmdbStore(args.data_dir, StoreConfig(durability=args.durability))
    channels = args.channels.split(",")
    deadline = time.monotonic() + args.max_seconds

    def guarded(thread: int) -> None:
        try:
            appender(store, args.run, thread, channels, out, deadline)
        except BaseException as exc:  # any error is a finding: report it, stop the child
            out.fail(f"thread {thread}: {exc!r}")

    threads = [
        threading.Thread(target=guarded, args=(t,), daemon=True) for t in range(args.threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()


if __name__ == "__main__":
    main()
