"""Store throughput and latency: LmdbStore against its disk and raw py-lmdb, same run.

Appends: 1 and 64 closed-loop appenders, ``fsync`` and ``async`` durability, 200-byte
messages spread over 8 channels. An appender submits its next ``WriteOp`` as soon as the
previous one is committed: the resubmission happens in the store's ``notify`` hook (in
the writer thread, right after the commit, one ``submit`` call for the batch's
appenders, as the server submits a scheduling round's writes), so 64 appenders cost no
threads and the writer always finds the whole population pending, as group commit would
under load.
Reported: appends/s, batch sizes (mean/p50/max) and append-to-commit latency (submit to
``notify``, p50/p99).

Named alternatives on the same disk: ``os.fdatasync`` after a 4 KiB ``pwrite`` (the cost
floor of one durable commit; an LMDB commit with sync and metasync does two of them: data
pages, then the meta page), and raw py-lmdb transactions of 1 and 64 puts of a packed
entry (what LMDB itself costs without the store's Python): into one key range, and laid
out as the store lays out a batch of the 64-appender case (8 channels' key ranges, the
dedup journal, the channel records), which is the ceiling the store can approach.

Sync reads: 100k entries of one channel read with ``store.sync`` pages, against a raw
py-lmdb cursor scan with and without ``unpackb``.

A cProfile of the writer thread (64 appenders, both durabilities) and of the sync reads
shows where the time goes. Run with ``.venv/bin/python bench/store.py`` (``make
bench-store``); writes ``results.json`` and ``results.md`` to ``bench/results/<date>-store/``.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import lmdb

from benchlib import machine, write_report
from tsmsg._native import packb, unpackb
from tsmsg.store import LmdbStore, StoreConfig, WriteOp

TEXT = ("the quick brown fox jumps over a lazy dog " * 5)[:200]  # 200 bytes of ASCII
CHANNELS = [f"room-{i}" for i in range(8)]
SYNC_ENTRIES = 100_000
SYNC_CHANNEL = "big"


def bytes_written() -> int:
    """This process's write()/pwrite() bytes so far (``wchar``; LMDB writes its dirty
    pages with pwrite), or 0 where /proc is missing."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- LmdbStore appends -----------------------------------------------------------------------


class ClosedLoop:
    """``appenders`` clients, each with one write in flight, resubmitting from ``notify``."""

    def __init__(self, appenders: int) -> None:
        self.appenders = appenders
        self.store: LmdbStore | None = None
        self.inflight: dict[int, tuple[int, float]] = {}  # id(op) -> (appender, submit time)
        self.next_cid = [0] * appenders
        self.completed = 0
        self.latencies: list[float] = []  # seconds, submit to notify
        self.batches: list[int] = []  # as notify saw them: one call per committed batch
        self.running = True
        self.outstanding = 0
        self.drained = threading.Event()
        self.error: BaseException | None = None  # a failed write ends the run (in stop)

    def next_op(self, appender: int) -> WriteOp:
        n = self.next_cid[appender]
        self.next_cid[appender] = n + 1
        op = WriteOp(
            "message",
            CHANNELS[appender % len(CHANNELS)],
            f"user-{appender}",
            cid=f"{appender}.{n}",
            text=TEXT,
        )
        self.inflight[id(op)] = (appender, time.perf_counter())
        return op

    def notify(self, batch: list[WriteOp]) -> None:
        """The batch's appenders each submit their next write, all in one ``submit``
        call, as the server hands a scheduling round's writes to the store."""
        now = time.perf_counter()
        self.batches.append(len(batch))
        again: list[WriteOp] = []
        for op in batch:
            appender, sent = self.inflight.pop(id(op))
            if op.error is not None and self.error is None:
                self.error = op.error  # raised by stop(): an exception here is only logged
                self.running = False
            self.latencies.append(now - sent)
            self.completed += 1
            if self.running:
                again.append(self.next_op(appender))
            else:
                self.outstanding -= 1
        if again:
            assert self.store is not None
            self.store.submit(*again)
        if not self.running and self.outstanding == 0:
            self.drained.set()

    def start(self, store: LmdbStore) -> None:
        self.store = store
        self.outstanding = self.appenders
        store.submit(*(self.next_op(appender) for appender in range(self.appenders)))

    def snapshot(self) -> tuple[float, int, int, int]:
        return time.perf_counter(), self.completed, len(self.latencies), len(self.batches)

    def stop(self) -> None:
        self.running = False
        if not self.drained.wait(30):
            raise RuntimeError("writes did not drain")
        if self.error is not None:
            raise RuntimeError("a write failed during the run") from self.error


class TimedStore(LmdbStore):
    """An LmdbStore that splits each batch's transaction into the Python that applies the
    ops and the commit (page writes and fsyncs), using the ``fault`` hook the store calls
    right before ``commit``; and optionally runs its writer thread under ``profiler``
    (cProfile profiles one thread)."""

    profiler: cProfile.Profile | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.apply_s = self.commit_s = self._before_commit = 0.0
        self._fault = self._mark  # no batch is written before the bench submits one

    def _mark(self) -> None:
        self._before_commit = time.perf_counter()

    def _write_batch(self, batch: list[WriteOp]) -> list[tuple[bytes, int]]:
        start = time.perf_counter()
        result = super()._write_batch(batch)
        self.apply_s += self._before_commit - start
        self.commit_s += time.perf_counter() - self._before_commit
        return result

    def _run_writer(self) -> None:
        if self.profiler is None:
            return super()._run_writer()
        self.profiler.enable()
        try:
            super()._run_writer()
        finally:
            self.profiler.disable()


def run_appends(
    path: Path,
    durability: str,
    appenders: int,
    seconds: float,
    warmup: float,
    profiler: cProfile.Profile | None = None,
) -> dict[str, Any]:
    loop = ClosedLoop(appenders)
    TimedStore.profiler = profiler
    store = TimedStore(path, StoreConfig(durability=durability), notify=loop.notify)
    try:
        loop.start(store)
        time.sleep(warmup)
        w0, a0, k0 = bytes_written(), store.apply_s, store.commit_s
        t0, c0, l0, b0 = loop.snapshot()
        time.sleep(seconds)
        w1, a1, k1 = bytes_written(), store.apply_s, store.commit_s
        t1, c1, l1, b1 = loop.snapshot()
        loop.stop()
        # The store's own record of batch sizes (bounded) agrees with notify's.
        assert store.batch_sizes[: len(loop.batches)] == loop.batches[: len(store.batch_sizes)]
    finally:
        store.close()
    batches = loop.batches[b0:b1]
    lat = loop.latencies[l0:l1]
    return {
        "case": f"LmdbStore, {appenders} appender{'s' * (appenders > 1)}",
        "durability": durability,
        "appenders": appenders,
        "appends": c1 - c0,
        "seconds": t1 - t0,
        "appends_per_s": (c1 - c0) / (t1 - t0),
        "batches": len(batches),
        "batch_mean": statistics.fmean(batches),
        "batch_p50": percentile([float(b) for b in batches], 0.5),
        "batch_max": max(batches),
        "commit_s": (t1 - t0) / len(batches),  # mean wall time per batch (commit cycle)
        "kib_written_per_commit": (w1 - w0) / len(batches) / 1024,
        # Per batch: applying the ops in Python (txn open to just before commit), the
        # commit, and the rest of the cycle (ring inserts, waking waiters, notify, queue).
        "apply_ms": (a1 - a0) / len(batches) * 1e3,
        "commit_ms": (k1 - k0) / len(batches) * 1e3,
        "latency_p50_ms": percentile(lat, 0.5) * 1e3,
        "latency_p99_ms": percentile(lat, 0.99) * 1e3,
    }


# --- named alternatives: the disk and raw py-lmdb ----------------------------------------------


def fdatasync_latency(path: Path, seconds: float) -> dict[str, Any]:
    """4 KiB pwrite + fdatasync in place in a preallocated file (as LMDB rewrites pages)."""
    block = os.urandom(4096)
    slots = 256
    fd = os.open(path / "fdatasync.bin", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, b"\0" * 4096 * slots, 0)
        os.fsync(fd)
        samples: list[float] = []
        end = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < end and i < 100_000:
            t = time.perf_counter()
            os.pwrite(fd, block, 4096 * (i % slots))
            os.fdatasync(fd)
            samples.append(time.perf_counter() - t)
            i += 1
    finally:
        os.close(fd)
    return {
        "samples": len(samples),
        "p50_ms": percentile(samples, 0.5) * 1e3,
        "p99_ms": percentile(samples, 0.99) * 1e3,
        "mean_ms": statistics.fmean(samples) * 1e3,
    }


def raw_lmdb(
    path: Path, durability: str, puts: int, seconds: float, layout: bool = False
) -> dict[str, Any]:
    """Transactions of ``puts`` puts of a packed 200-byte-text entry under a 16-byte key.
    With ``fsync``, LMDB's own durable commit: data pages synced, then the meta page synced
    (the store defers the second sync to the next commit, but in a closed loop nothing
    else is waiting, so each of its acknowledged batches costs the same two). With
    ``layout``, what the store itself writes per batch and nothing else: the entries spread
    over the 8 channels' key ranges of one log database, one dedup journal record per
    entry, and the channel records."""
    fsync = durability == "fsync"
    env = lmdb.open(str(path), map_size=1 << 30, max_dbs=4, sync=fsync, metasync=fsync)
    db = env.open_db(b"log")
    dedup, records = env.open_db(b"dedup"), env.open_db(b"channels")
    chans = len(CHANNELS) if layout else 1
    heads = [0] * chans
    seq = 0
    txns = 0
    commits: list[float] = []
    written = bytes_written()
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t = time.perf_counter()
            with env.begin(write=True) as txn:
                for i in range(puts):
                    seq += 1
                    chan = i % chans
                    heads[chan] += 1
                    n = heads[chan]
                    entry = {"seq": n, "kind": "message", "id": f"{chan + 1}-{n}"}
                    entry.update(sender=f"user-{i}", ts=1_764_000_000_000, text=TEXT)
                    key = (chan + 1).to_bytes(8, "big") + n.to_bytes(8, "big")
                    txn.put(key, packb(entry), db=db)
                    if layout:
                        dkey = key[:8] + f"user-{i}\0{i}.{n}".encode()
                        record = packb([dkey, n, 1_764_000_000_000])
                        txn.put(seq.to_bytes(8, "big"), record, db=dedup, append=True)
                if layout:
                    for chan, name in enumerate(CHANNELS):
                        record = {"id": chan + 1, "head": heads[chan], "horizon": 0}
                        txn.put(name.encode(), packb(record), db=records)
            commits.append(time.perf_counter() - t)
            txns += 1
        elapsed = sum(commits)
        written = bytes_written() - written
    finally:
        env.close()
    shape = ", store's layout" if layout else ""
    return {
        "case": f"raw py-lmdb, {puts} put{'s' * (puts > 1)}/txn{shape}",
        "durability": durability,
        "puts_per_txn": puts,
        "appends_per_s": seq / elapsed,
        "commit_p50_ms": percentile(commits, 0.5) * 1e3,
        "commit_p99_ms": percentile(commits, 0.99) * 1e3,
        "kib_written_per_commit": written / txns / 1024,
    }


# --- sync reads --------------------------------------------------------------------------------


def fill_channel(path: Path, entries: int) -> None:
    """``entries`` messages in one channel, submitted at once (batches of max_batch)."""
    done = threading.Event()
    count = [0]

    def notify(batch: list[WriteOp]) -> None:
        count[0] += len(batch)
        if count[0] >= entries:
            done.set()

    with LmdbStore(path, StoreConfig(durability="async"), notify=notify) as store:
        for n in range(entries):
            store.submit(WriteOp("message", SYNC_CHANNEL, "user-1", cid=str(n), text=TEXT))
        if not done.wait(300):
            raise RuntimeError("fill did not finish")
        assert store.channel(SYNC_CHANNEL).head == entries


def best_of(fn: Callable[[], int], repeats: int) -> tuple[float, int]:
    """Best wall time of ``repeats`` calls and the entry count the call returned."""
    best = float("inf")
    n = 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        best = min(best, time.perf_counter() - t)
    return best, n


def store_sync_reader(store: LmdbStore, limit: int, max_bytes: int | None) -> Callable[[], int]:
    def read_all() -> int:
        since, n = 0, 0
        while True:
            page = store.sync(SYNC_CHANNEL, since, limit=limit, max_bytes=max_bytes)
            n += len(page.entries)
            if not page.more:
                return n
            since = page.entries[-1]["seq"]

    return read_all


def raw_scan(path: Path, decode: bool) -> Callable[[], int]:
    def scan() -> int:
        env = lmdb.open(str(path), max_dbs=8, readonly=True, lock=False)
        try:
            db = env.open_db(b"log", create=False)
            n = 0
            with env.begin(buffers=False) as txn:
                # Entries are dropped as read, as the bench drops store.sync's pages.
                for _, value in txn.cursor(db=db):
                    if decode:
                        unpackb(value)
                    n += 1
            return n
        finally:
            env.close()

    return scan


def run_sync(path: Path, repeats: int) -> list[dict[str, Any]]:
    fill_channel(path, SYNC_ENTRIES)
    rows = []
    with LmdbStore(path, StoreConfig(durability="async")) as store:
        for limit, max_bytes in ((100, None), (1000, None), (1000, 1 << 20), (10_000, None)):
            best, n = best_of(store_sync_reader(store, limit, max_bytes), repeats)
            assert n == SYNC_ENTRIES
            mb = "" if max_bytes is None else f", max_bytes={max_bytes >> 20} MiB"
            rows.append({"case": f"store.sync, limit={limit}{mb}", "entries_per_s": n / best})
    for decode in (True, False):
        best, n = best_of(raw_scan(path, decode), repeats)
        what = "cursor scan + unpackb" if decode else "cursor scan, no decode"
        rows.append({"case": f"raw py-lmdb {what}", "entries_per_s": n / best})
    return rows


# --- profiles ----------------------------------------------------------------------------------


def profile_table(prof: cProfile.Profile, top: int) -> str:
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    lines = buf.getvalue().splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    return "\n".join(line.replace(str(Path.cwd()) + "/", "") for line in lines[start:])


def profile_split(prof: cProfile.Profile, ops: int, parts: dict[str, str]) -> dict[str, float]:
    """Microseconds per op, cumulative, in the function named by each ``parts`` value:
    ``file:function`` for Python code (the file as a path suffix), a builtin's repr as
    pstats names it otherwise."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]

    def matches(key: tuple[str, int, str], part: str) -> bool:
        if part.startswith("<"):  # a builtin: pstats files it under "~"
            return key[2] == part
        path, _, name = part.rpartition(":")
        return key[2] == name and key[0].endswith(path)

    return {
        label: sum(v[3] for k, v in stats.items() if matches(k, part)) / ops * 1e6
        for label, part in parts.items()
    }


WRITER_PARTS = {
    "writer total (_commit_batch)": "lmdb_store.py:_commit_batch",
    "_write_batch (txn, _append of each op, commit)": "lmdb_store.py:_write_batch",
    "_append (per-op Python, incl. its calls below)": "lmdb_store.py:_append",
    "_check_name (user per op, channel per batch)": "lmdb_store.py:_check_name",
    "_dedup_key": "lmdb_store.py:_dedup_key",
    "Cursor.put (the log entry, 1 per op)": "<method 'put' of 'Cursor' objects>",
    "Cursor.putmulti (the journal, 1 per batch)": "<method 'putmulti' of 'Cursor' objects>",
    "Transaction.put (channel records, per batch)": "<method 'put' of 'Transaction' objects>",
    "packb": "<built-in method tsmsg._native.packb>",
    "DedupRing.insert": "<method 'insert' of 'tsmsg._native.DedupRing' objects>",
    "_prune_dedup (per batch)": "lmdb_store.py:_prune_dedup",
    "Transaction.commit (writes pages; fsync)": "<method 'commit' of 'Transaction' objects>",
    "notify (bench hook: resubmit)": "bench/store.py:notify",
}
SYNC_PARTS = {
    "store.sync (cursor walk in C, loop, unpackb)": "lmdb_store.py:sync",
    "unpackb": "<built-in method tsmsg._native.unpackb>",
    "bytes.startswith (prefix check per key)": "<method 'startswith' of 'bytes' objects>",
}


def run_profiles(root: Path, seconds: float, top: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for durability in ("fsync", "async"):
        prof = cProfile.Profile()
        row = run_appends(root / f"profile-{durability}", durability, 64, seconds, 0.3, prof)
        # The profile covers the whole run (warm-up and drain too): divide by all ops.
        stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
        ops = sum(v[1] for k, v in stats.items() if k[2] == "_append")
        out[f"writer, 64 appenders, {durability}"] = {
            "appends_per_s_under_profile": row["appends_per_s"],
            "ops_profiled": ops,
            "us_per_op": profile_split(prof, ops, WRITER_PARTS),
            "table": profile_table(prof, top),
        }
    path = root / "profile-sync"
    fill_channel(path, SYNC_ENTRIES)
    with LmdbStore(path, StoreConfig(durability="async")) as store:
        reader = store_sync_reader(store, 1000, None)
        prof = cProfile.Profile()
        prof.enable()
        n = reader()
        prof.disable()
    out["store.sync, limit=1000"] = {
        "ops_profiled": n,
        "us_per_op": profile_split(prof, n, SYNC_PARTS),
        "table": profile_table(prof, top),
    }
    return out


# --- report ------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    return {
        "python": sys.version.split()[0],
        "tsmsg": metadata.version("tsmsg"),
        "py-lmdb": metadata.version("lmdb"),
        "liblmdb": ".".join(map(str, lmdb.version())),
    }


def append_table(rows: list[dict[str, Any]], sync_ms: float) -> str:
    lines = [
        "| case | durability | appends/s | batch mean / p50 / max | commit cycle ms | "
        "KiB written / commit | latency p50 / p99 ms | batch / (2 x fdatasync p50) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "batch_mean" in r:
            batch = f"{r['batch_mean']:.1f} / {r['batch_p50']:.0f} / {r['batch_max']}"
            cycle = f"{r['commit_s'] * 1e3:.3f}"
            lat = f"{r['latency_p50_ms']:.3f} / {r['latency_p99_ms']:.3f}"
            size = r["batch_mean"]
        else:
            batch = f"{r['puts_per_txn']} (fixed)"
            cycle = f"{r['commit_p50_ms']:.3f} (p50)"
            lat = f"{r['commit_p50_ms']:.3f} / {r['commit_p99_ms']:.3f}"
            size = r["puts_per_txn"]
        bound = f"{size / (2 * sync_ms / 1e3):,.0f}" if r["durability"] == "fsync" else "-"
        lines.append(
            f"| {r['case']} | {r['durability']} | {r['appends_per_s']:,.0f} | {batch} | "
            f"{cycle} | {r['kib_written_per_commit']:,.1f} | {lat} | {bound} |"
        )
    return "\n".join(lines)


def split_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | durability | cycle ms | apply ms | commit ms | rest ms | apply µs/op | "
        "commit µs/op |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "apply_ms" not in r:
            continue
        cycle, apply, commit = r["commit_s"] * 1e3, r["apply_ms"], r["commit_ms"]
        n = r["batch_mean"]
        lines.append(
            f"| {r['case']} | {r['durability']} | {cycle:.3f} | {apply:.3f} | {commit:.3f} | "
            f"{cycle - apply - commit:.3f} | {apply / n * 1e3:.1f} | {commit / n * 1e3:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per case")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured time per case")
    parser.add_argument("--repeats", type=int, default=5, help="sync read repeats (best)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile runs")
    parser.add_argument("--out", type=Path, default=None, help="results folder")
    parser.add_argument("--data-dir", type=Path, default=None, help="scratch (default out/tmp)")
    args = parser.parse_args()

    date = datetime.date.today().isoformat()
    out = args.out or Path(__file__).parent / "results" / f"{date}-store"
    scratch_parent = args.data_dir or out / "tmp"
    scratch_parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-", dir=scratch_parent))
    command = " ".join([Path(sys.executable).name, *sys.argv])
    info = {"command": command, "machine": machine(root), "versions": versions()}
    print(json.dumps(info, indent=2), flush=True)
    try:
        sync = fdatasync_latency(root, 2.0)
        print(f"fdatasync: {sync}", flush=True)
        appends: list[dict[str, Any]] = []
        for durability in ("fsync", "async"):
            for appenders in (1, 64):
                row = run_appends(
                    root / f"store-{durability}-{appenders}",
                    durability,
                    appenders,
                    args.seconds,
                    args.warmup,
                )
                print(row, flush=True)
                appends.append(row)
            for puts, layout in ((1, False), (64, False), (64, True)):
                row = raw_lmdb(
                    root / f"raw-{durability}-{puts}-{layout}",
                    durability,
                    puts,
                    args.seconds,
                    layout,
                )
                print(row, flush=True)
                appends.append(row)
        reads = run_sync(root / "sync", args.repeats)
        for row in reads:
            print(row, flush=True)
        profiles = {} if args.no_profile else run_profiles(root, 2.0, 25)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if args.data_dir is None and not any(scratch_parent.iterdir()):
            scratch_parent.rmdir()

    md_appends = append_table(appends, sync["p50_ms"])
    md_reads = "\n".join(
        ["| read | entries/s |", "| --- | ---: |"]
        + [f"| {r['case']} | {r['entries_per_s']:,.0f} |" for r in reads]
    )
    md_profiles = []
    for name, p in profiles.items():
        split = "\n".join(f"| {k} | {v:.2f} |" for k, v in p["us_per_op"].items())
        md_profiles.append(
            f"\n### {name} ({p['ops_profiled']:,} ops profiled)\n\n"
            f"| where (cumulative) | µs/op |\n| --- | ---: |\n{split}\n\n"
            f"```\n{p['table'].rstrip()}\n```\n"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {
                **info,
                "date": date,
                "fdatasync": sync,
                "appends": appends,
                "reads": reads,
                "profiles": profiles,
            },
            indent=2,
        )
    )
    m, v = info["machine"], info["versions"]
    report = (
        f"# Store benchmark, {date}\n\n"
        f"- command: `{command}` (from the repository root; `make bench-store`)\n"
        f"- machine: {m['cpu']}, {m['nproc']} CPUs, {m['platform']}; data dir on "
        f"{m['data_dir_device']} ({m['data_dir_fs']})\n"
        f"- versions: Python {v['python']}, tsmsg {v['tsmsg']} (release build), "
        f"py-lmdb {v['py-lmdb']}, liblmdb {v['liblmdb']}\n"
        f"- fdatasync of a 4 KiB in-place write, same disk: p50 {sync['p50_ms']:.3f} ms, "
        f"p99 {sync['p99_ms']:.3f} ms ({sync['samples']} samples)\n\n"
        "## Appends (200-byte text, 8 channels, closed loop)\n\n"
        f"{md_appends}\n\n"
        "Where each commit cycle goes (no profiler; from timestamps around the store's "
        "pre-commit hook):\n\n"
        f"{split_table(appends)}\n\n"
        "## Sync reads (100k entries of one channel)\n\n"
        f"{md_reads}\n\n"
        "## Profiles (cProfile; its overhead inflates Python-level costs)\n" + "".join(md_profiles)
    )
    print(report)
    write_report(out, report)


if __name__ == "__main__":
    main()
