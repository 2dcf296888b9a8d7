"""Crash test of the store: SIGKILL a writing process at random moments, then check.

A child (tests/crash_writer.py) writes to an LmdbStore from 16 threads, so group commit
builds real batches, and prints one line per call after the call returned: acked
messages, acked edits and deletes, and retries of acked cids. The parent kills it with
SIGKILL 50-400 ms after its first line, reopens the data directory itself and checks it
with an independent checker that reads the raw log with ``sync`` from 0 and replays it:

- every acked message is at its acked seq with its acked id; no cid is stored twice in
  a channel; a stored message that was never acked is the one its thread had in flight
  at the kill (the cid after the thread's last acked one), never anything else;
- each channel's seqs are dense, 1..head, and the horizon is 0 (nothing is compacted);
- every acked edit and delete is the entry at its acked seq and names its target; the
  replayed state of each message (latest edit text, or a tombstone) is what both the
  log's message entry and ``history`` (read back in pages) show; a deleted message's
  edits lost their text;
- a retry of acked cids after the restart answers dup with the original seq and id and
  stores nothing.

The same data directory goes through the rounds (a fresh one every ROUNDS_PER_DIR), so
each round also re-checks the earlier ones. TSMSG_CRASH_ROUNDS sets the number of fsync
rounds (default 20: the whole file takes about 10 s); TSMSG_CRASH_SEED repeats a run's
kill delays and retry picks (not its thread timing).
"""

from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tsmsg.store import Entry, LmdbStore, Store, StoreConfig

CHILD = Path(__file__).with_name("crash_writer.py")
CHANNELS = ["room-a", "room-b", "room-c", "dm:w0:w1"]
THREADS = 16  # concurrent appenders in the child
FSYNC_ROUNDS = int(os.environ.get("TSMSG_CRASH_ROUNDS", "20"))
ASYNC_ROUNDS = 3
KILL_DELAY_S = (0.05, 0.4)  # after the child's first acked line
STARTUP_TIMEOUT_S = 30.0  # the child's first line; generous for a loaded CI machine
RETRIES_PER_ROUND = 8
SYNC_PAGE = 500
HISTORY_PAGE = 300
# Each round re-checks the whole data directory; a long run starts a new one every so
# many rounds so that its checks stay linear in the number of rounds.
ROUNDS_PER_DIR = 50


def _load_writer() -> ModuleType:
    """The child's module, for its text and cid conventions (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("crash_writer", CHILD)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


writer = _load_writer()


@dataclass
class Acked:
    """Everything the children reported as done, over all rounds so far."""

    messages: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)  # (ch, cid)
    edits: list[tuple[str, str, int, str]] = field(default_factory=list)  # ch, id, seq, text
    deletes: list[tuple[str, str, int]] = field(default_factory=list)  # ch, id, seq
    last_n: dict[tuple[str, str], int] = field(default_factory=dict)  # (run, thread) -> n
    dups: int = 0

    def read(self, out: Path) -> int:
        """Add a child's output; returns its number of complete lines."""
        text = out.read_text()
        # Each line is one write() before the next call starts, so a SIGKILL cannot cut
        # one; drop an unterminated tail anyway rather than misparse it.
        lines = text.split("\n")[:-1]
        for line in lines:
            kind, *f = line.split(" ")
            if kind == "fail":
                pytest.fail(f"the child found a broken invariant: {line}")
            elif kind == "ack":
                channel, cid, seq, mid = f[0], f[1], int(f[2]), f[3]
                assert (channel, cid) not in self.messages, f"cid acked twice: {line}"
                self.messages[(channel, cid)] = (seq, mid)
                run, thread, n = cid.split(".")
                # A thread's calls block, so its cids are acked in order, none skipped.
                assert int(n) == self.last_n.get((run, thread), -1) + 1, f"cid skipped: {line}"
                self.last_n[(run, thread)] = int(n)
            elif kind == "dup":
                channel, cid, seq, mid = f[0], f[1], int(f[2]), f[3]
                assert self.messages[(channel, cid)] == (seq, mid), f"dup changed: {line}"
                self.dups += 1
            elif kind == "edit":
                self.edits.append((f[0], f[1], int(f[2]), f[3]))
            elif kind == "del":
                self.deletes.append((f[0], f[1], int(f[2])))
            else:
                pytest.fail(f"unexpected child output: {line!r}")
        return len(lines)


def run_child(data_dir: Path, run: int, durability: str, delay: float, out: Path) -> None:
    """Start a writer child, SIGKILL it ``delay`` s after its first line, reap it."""
    err = out.with_suffix(".err")
    cmd = [sys.executable, str(CHILD), str(data_dir), ",".join(CHANNELS)]
    cmd += ["--run", str(run), "--durability", durability, "--threads", str(THREADS)]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while out.stat().st_size == 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"child wrote nothing (exit {proc.poll()}):\n{err.read_text()}")
                time.sleep(0.002)
            time.sleep(delay)
            assert proc.poll() is None, f"child exited by itself:\n{err.read_text()}"
        finally:
            proc.kill()
            proc.wait(timeout=30)


def read_log(store: Store, channel: str) -> list[Entry]:
    """The raw log from seq 1 via sync pages; checks that it is dense and uncompacted."""
    info = store.channel(channel)
    assert info.horizon == 0
    entries: list[Entry] = []
    since = 0
    for _ in range(info.head // SYNC_PAGE + 2):
        page = store.sync(channel, since, limit=SYNC_PAGE)
        assert not page.resync and page.head == info.head
        entries.extend(page.entries)
        if not page.more:
            break
        since = page.entries[-1]["seq"]
    assert [e["seq"] for e in entries] == list(range(1, info.head + 1)), f"{channel}: gap"
    return entries


def read_history(store: Store, channel: str, count: int) -> list[Entry]:
    """All of a channel's messages (latest state) via history pages, newest page first."""
    pages: list[list[Entry]] = []
    before = None
    for _ in range(count // HISTORY_PAGE + 2):
        page = store.history(channel, before, HISTORY_PAGE)
        pages.append(page.messages)
        if not page.more:
            break
        before = page.messages[0]["seq"]
    else:
        pytest.fail(f"{channel}: history pages did not end after {count} messages")
    return [msg for page in reversed(pages) for msg in page]


def check_channel(store: Store, channel: str, acked: Acked, cids: set[str]) -> None:
    """Replay one channel's log against what was acked. A stored message that was never
    acked must be its thread's next cid: so each thread of each run has at most one.
    ``cids`` collects the cids seen in all channels (each child writes a cid to one)."""
    log = read_log(store, channel)
    acked_at = {
        seq: (cid, mid) for (ch, cid), (seq, mid) in acked.messages.items() if ch == channel
    }
    state: dict[str, dict[str, Any]] = {}  # message id -> replayed latest state
    for e in log:
        seq, kind, mid = e["seq"], e["kind"], e["id"]
        if kind == "message":
            assert mid not in state, f"{channel}: message id {mid} twice"
            if seq in acked_at:
                cid, acked_id = acked_at[seq]
                assert mid == acked_id, f"{channel} seq {seq}: id {mid}, acked {acked_id}"
            else:
                # Only acked messages are edited or deleted, so this one keeps its text.
                assert not e.get("deleted"), f"{channel}: unacked message {mid} deleted"
                cid = e["text"].split("|")[0]
                run, thread, n = cid.split(".")
                expected_n = acked.last_n.get((run, thread), -1) + 1
                assert int(n) == expected_n, f"{channel}: {cid} stored, never acked, not in flight"
            assert cid not in cids, f"{channel}: cid {cid} stored twice (or in two channels)"
            cids.add(cid)
            assert e["sender"] == writer.sender_of(cid)
            state[mid] = {"cid": cid, "text": writer.message_text(cid), "deleted": False}
            continue
        target = state.get(mid)
        assert target is not None, f"{channel} seq {seq}: {kind} of unknown message {mid}"
        assert not target["deleted"], f"{channel} seq {seq}: {kind} after the delete of {mid}"
        assert e["sender"] == writer.sender_of(target["cid"])
        if kind == "edit":
            target["edits"] = [*target.get("edits", []), e]
            target["text"], target["edited"] = e.get("text"), e["ts"]
        else:
            assert kind == "delete", e
            target["deleted"] = True

    messages = [e for e in log if e["kind"] == "message"]
    for msg in messages:
        st = state[msg["id"]]
        for edit in st.get("edits", []):
            if st["deleted"]:  # a delete redacts the text of the message's earlier edits
                assert "text" not in edit and edit.get("deleted") is True, edit
            else:
                assert edit["text"].startswith(st["cid"] + "|edit"), edit
        expected = {k: msg[k] for k in ("seq", "kind", "id", "sender", "ts")}
        if st["deleted"]:
            expected["deleted"] = True
        else:
            expected["text"] = st["text"]
            if "edited" in st:
                expected["edited"] = st["edited"]
        assert msg == expected, f"{channel}: log entry is not the replayed state"
    assert read_history(store, channel, len(messages)) == messages, f"{channel}: history"

    def acked_entry(what: str, seq: int) -> Entry:
        assert seq <= len(log), f"{channel}: acked {what} at seq {seq} lost (head {len(log)})"
        return log[seq - 1]

    for seq, (cid, mid) in acked_at.items():
        e = acked_entry(cid, seq)
        assert e["kind"] == "message" and e["id"] == mid, f"acked {cid} {seq} {mid}: {e}"
    for ch, mid, seq, text in acked.edits:
        if ch == channel:
            e = acked_entry(text, seq)
            assert e["kind"] == "edit" and e["id"] == mid, f"acked edit {seq} {mid}: {e}"
            assert e.get("text") == text or state[mid]["deleted"], f"acked edit {text}: {e}"
    for ch, mid, seq in acked.deletes:
        if ch == channel:
            e = acked_entry(f"delete of {mid}", seq)
            assert e["kind"] == "delete" and e["id"] == mid, f"acked delete {seq} {mid}: {e}"
            assert state[mid]["deleted"]


def check_retries(store: Store, acked: Acked, rng: random.Random) -> None:
    """Acked cids retried after the restart: dup with the first seq and id, nothing new."""
    heads = {ch: store.channel(ch).head for ch in CHANNELS}
    picks = rng.sample(sorted(acked.messages), min(RETRIES_PER_ROUND, len(acked.messages)))
    for channel, cid in picks:
        res = store.append(channel, writer.sender_of(cid), cid, writer.message_text(cid))
        assert res.dup and (res.seq, res.id) == acked.messages[(channel, cid)], (cid, res)
    assert {ch: store.channel(ch).head for ch in CHANNELS} == heads


def crash_rounds(tmp_path: Path, durabilities: list[str]) -> None:
    seed = int(os.environ.get("TSMSG_CRASH_SEED", random.randrange(2**32)))
    print(f"TSMSG_CRASH_SEED={seed}")
    rng = random.Random(seed)
    for run, durability in enumerate(durabilities):
        if run % ROUNDS_PER_DIR == 0:
            data_dir = tmp_path / f"data-{run}"
            acked = Acked()
        out = tmp_path / f"child-{run}.out"
        run_child(data_dir, run, durability, rng.uniform(*KILL_DELAY_S), out)
        assert acked.read(out) > 0
        # The parent reopens with fsync whatever the child used: the check reads what
        # the killed process left in the files, not what this process writes.
        with LmdbStore(data_dir, StoreConfig(durability="fsync")) as store:
            cids: set[str] = set()
            for channel in CHANNELS:
                check_channel(store, channel, acked, cids)
            check_retries(store, acked, rng)
        out.unlink()  # a failing round keeps its child's output for a look
        out.with_suffix(".err").unlink()
        # The rounds exercised what they claim to check.
        if run % ROUNDS_PER_DIR == ROUNDS_PER_DIR - 1 or run == len(durabilities) - 1:
            assert len(acked.messages) >= 10 * (run % ROUNDS_PER_DIR + 1)
            assert acked.edits and acked.deletes and acked.dups


@pytest.mark.slow
def test_sigkill_with_fsync_durability_loses_no_acked_write(tmp_path: Path) -> None:
    crash_rounds(tmp_path, ["fsync"] * FSYNC_ROUNDS)


@pytest.mark.slow
def test_sigkill_with_async_durability_loses_no_acked_write(tmp_path: Path) -> None:
    """``async`` opens LMDB with NOSYNC/NOMETASYNC: a commit writes its pages into the
    file (the OS page cache) and skips the fsync. A killed process loses nothing the
    kernel already has, so every acked write survives a process crash; only a power
    loss or kernel crash can lose the last ``sync_interval_s`` of acked writes, which
    this test cannot simulate."""
    crash_rounds(tmp_path, ["async"] * ASYNC_ROUNDS)
