"""Sizing: server memory per idle connection and disk per million messages.

**Memory.** A real ``tsmsg serve`` child process on a fresh data directory (the per-IP
connection limit lifted: every connection comes from 127.0.0.1); this process opens N
connections, each a distinct user that says ``hello`` and ``join``\\ s one channel, then
stays idle (a ``ping`` every 20 s, so the server's 60 s idle timeout never fires; every
received byte is read). At each step (N = 0, 1000, 2500, 5000, 10000 by default, 5000 at
most with TLS; the previous connections kept open) the server's ``VmRSS`` and
``RssAnon`` from ``/proc/<pid>/status`` are read after the server has settled; bytes per
connection is the least-squares slope.
Run once in plaintext and once with TLS (a trustme certificate; TLS 1.3; the server's TLS is
rustls in the extension, the clients' Python's ssl).
``RLIMIT_NOFILE`` is raised to its hard limit (the child inherits it); the handshake and
hello deadlines are lifted to 120 s (a loaded machine), the only settings changed.

**Disk.** 1,000,000 messages of 200 bytes of text appended through ``LmdbStore``
directly (``async`` durability, 100 channels, 1,000 senders, a UUID cid each, in chunks
of 256 so that dedup pruning, 256 per commit, keeps pace as it does under a server's
small batches). Reported: ``data.mdb``'s size and allocated blocks, ``tsmsg inspect
--json``'s used and live bytes, the dedup journal's entries, and the size of a ``tsmsg
backup`` of it (a compacted copy: the live data alone). The same with encryption at rest
(a key file from ``tsmsg keygen``). Then, on the plaintext directory, 10 % of the
messages are edited once and every channel is compacted (``tsmsg compact``'s rule:
edit entries below ``head - 1000`` dropped), with the figures after each step.

Memory and bytes are deterministic enough on a busy machine; the wall times printed are
not. Run with ``.venv/bin/python bench/sizing.py`` (``make bench-sizing``); ``--help`` for
the steps and sizes. Writes ``results.json`` and ``results.md`` to
``bench/results/<date>-sizing/``; a hand-written "## Analysis" section is kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import trio

from benchlib import machine, write_report
from tsmsg import FrameDecoder, encode
from tsmsg.auth import TokenIssuer
from tsmsg.store import LmdbStore, StoreConfig, WriteOp
from tsmsg.store.crypto import load_keyring

SECRET = b"sizing-bench-secret-sizing-bench-secret!"  # >= 32 bytes
TEXT = ("the quick brown fox jumps over a lazy dog " * 5)[:200]  # 200 bytes of ASCII
EDIT_TEXT = ("an edited text, as long as the first one " * 5)[:200]
CHANNEL = "lobby"
SERVING = re.compile(r"serving on 127\.0\.0\.1:(\d+)")
PING_EVERY_S = 20.0
SETTLE_S = 3.0
CHUNK = 256  # writes submitted at once: at most one batch, so dedup pruning keeps pace
MIB = 1 << 20


# --- memory per connection ----------------------------------------------------------------


def raise_nofile(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        soft = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def proc_status(pid: int) -> dict[str, int]:
    """The kB figures of /proc/<pid>/status, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            name, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[name] = int(parts[0]) * 1024
    return out


def slope(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of (x, y)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


class Server:
    """``tsmsg serve`` on port 0 in a fresh data directory, its log in a file."""

    def __init__(self, scratch: Path, tls: tuple[str, str] | None) -> None:
        self.data_dir = scratch / "data"
        self.log_path = scratch / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TSMSG_")}
        env.update(
            TSMSG_SECRET=SECRET.decode(),
            TSMSG_IP_CONNECT_RATE="1000000",
            TSMSG_IP_CONNECT_BURST="1000000",
            TSMSG_IP_MAX_CONNECTIONS="1000000",  # every connection is from 127.0.0.1
            # A loaded 2-core machine may take longer than the 10 s defaults to finish a
            # handshake and hello; neither deadline changes what an idle connection holds.
            TSMSG_TLS_HANDSHAKE_TIMEOUT_S="120",
            TSMSG_HELLO_TIMEOUT_S="120",
        )
        cmd = [sys.executable, "-m", "tsmsg.cli", "serve", "--port", "0"]
        cmd += ["--data-dir", str(self.data_dir)]
        if tls is not None:
            cmd += ["--tls-cert", tls[0], "--tls-key", tls[1]]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env
            )
        deadline = time.monotonic() + 30
        while True:
            match = SERVING.search(self.log_path.read_text(errors="replace"))
            if match is not None:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def rss(self) -> dict[str, int]:
        return proc_status(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Connection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def drain(self) -> None:
        """Read and drop everything the server sends (pongs, presence), until it closes."""
        try:
            while await self.stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def open_connection(port: int, token: str, ssl_context: ssl.SSLContext | None) -> Connection:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream: trio.abc.Stream = tcp
    if ssl_context is not None:
        stream = trio.SSLStream(tcp, ssl_context, server_hostname="localhost")
        await stream.do_handshake()
    hello = {"t": "hello", "v": 1, "token": token, "rid": 1}
    await stream.send_all(encode(hello) + encode({"t": "join", "channel": CHANNEL, "rid": 2}))
    decoder = FrameDecoder()
    replies: dict[int, dict[str, Any]] = {}
    while 2 not in replies:
        data = await stream.receive_some(65536)
        if not data:
            raise RuntimeError(f"server closed during hello/join: {replies}")
        for frame in decoder.feed(data):
            if frame.get("rid") in (1, 2):
                replies[frame["rid"]] = frame
    if replies[1].get("t") != "welcome" or replies[2].get("t") != "ok":
        raise RuntimeError(f"hello/join refused: {replies}")
    return Connection(stream)


async def measure_memory(
    steps: list[int], tls: tuple[str, str, str] | None, scratch: Path
) -> dict[str, Any]:
    server = Server(scratch, None if tls is None else (tls[0], tls[1]))
    ssl_context = None
    if tls is not None:
        ssl_context = ssl.create_default_context(cafile=tls[2])
    issuer = TokenIssuer(SECRET)
    now = int(time.time())
    conns: list[Connection] = []
    rows: list[dict[str, Any]] = []
    try:
        async with trio.open_nursery() as nursery:

            async def pinger() -> None:
                while True:
                    await trio.sleep(PING_EVERY_S)
                    for conn in list(conns):
                        try:
                            await conn.stream.send_all(encode({"t": "ping"}))
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass

            nursery.start_soon(pinger)
            limiter = trio.CapacityLimiter(16)

            async def add(i: int) -> None:
                async with limiter:
                    token = issuer.issue(f"user-{i}", [CHANNEL], ttl_s=86400, now=now)
                    conn = await open_connection(server.port, token, ssl_context)
                conns.append(conn)
                nursery.start_soon(conn.drain)

            for n in steps:
                t0 = time.perf_counter()
                async with trio.open_nursery() as opening:
                    for i in range(len(conns), n):
                        opening.start_soon(add, i)
                opened_s = time.perf_counter() - t0
                await trio.sleep(SETTLE_S)
                if server.proc.poll() is not None:
                    raise RuntimeError(f"server exited:\n{server.log_path.read_text()}")
                status = server.rss()
                row = {
                    "connections": len(conns),
                    "vm_rss": status["VmRSS"],
                    "rss_anon": status.get("RssAnon", 0),
                    "vm_hwm": status["VmHWM"],
                    "open_s": round(opened_s, 2),
                }
                rows.append(row)
                print(
                    f"  {'tls' if tls else 'plain'} {row['connections']:>6} connections: "
                    f"VmRSS {row['vm_rss'] / MIB:.1f} MiB, RssAnon {row['rss_anon'] / MIB:.1f} "
                    f"MiB (opened in {opened_s:.1f} s)",
                    flush=True,
                )
            for conn in conns:
                await conn.stream.aclose()
            nursery.cancel_scope.cancel()
    except BaseException:
        tail = server.log_path.read_text(errors="replace").splitlines()[-20:]
        print("server log (last lines):", *tail, sep="\n  ", file=sys.stderr)
        raise
    finally:
        server.stop()
    rss = slope([(r["connections"], r["vm_rss"]) for r in rows])
    anon = slope([(r["connections"], r["rss_anon"]) for r in rows])
    return {
        "tls": tls is not None,
        "steps": rows,
        "bytes_per_connection_rss": round(rss),
        "bytes_per_connection_anon": round(anon),
        "baseline_rss": rows[0]["vm_rss"] if rows and rows[0]["connections"] == 0 else None,
    }


def make_tls(scratch: Path) -> tuple[str, str, str]:
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key, ca_file = scratch / "cert.pem", scratch / "key.pem", scratch / "ca.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    # The chain file holds the key too; the server is given cert and key separately.
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return str(cert), str(key), str(ca_file)


# --- disk per million messages ------------------------------------------------------------


class Filler:
    """Submits writes in chunks of CHUNK and waits for each chunk's commit."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.committed = 0
        self.ids: dict[int, str] = {}  # index -> message id, for every 10th message

    def notify(self, batch: list[WriteOp]) -> None:
        for op in batch:
            if op.error is not None:
                raise RuntimeError(f"write failed: {op.error}")
            if op.origin is not None and op.result is not None:
                self.ids[op.origin] = op.result.id  # type: ignore[union-attr]
        with self.cond:
            self.committed += len(batch)
            self.cond.notify_all()

    def run(self, store: LmdbStore, ops: Any, total: int) -> None:
        submitted = 0
        for op in ops:
            store.submit(op)
            submitted += 1
            if submitted % CHUNK == 0 or submitted == total:
                self.wait_for(submitted)

    def wait_for(self, count: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.committed >= count, 120):
                raise RuntimeError("store did not commit")


def message_ops(n: int, channels: int, senders: int) -> Any:
    for i in range(n):
        yield WriteOp(
            "message",
            f"room-{i % channels}",
            f"user-{i % senders}",
            cid=str(uuid.uuid4()),
            text=TEXT,
            origin=i if i % 10 == 0 else None,
        )


def cli(*argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tsmsg.cli", *argv], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"tsmsg {' '.join(argv)} failed: {done.stderr}")
    return done.stdout


def disk_figures(data_dir: Path, scratch: Path, label: str) -> dict[str, Any]:
    stats = json.loads(cli("inspect", "--json", "--data-dir", str(data_dir)))
    mdb = data_dir / "data.mdb"
    backup = scratch / f"backup-{label}"
    shutil.rmtree(backup, ignore_errors=True)
    cli("backup", "--data-dir", str(data_dir), str(backup))
    backup_bytes = (backup / "data.mdb").stat().st_size
    shutil.rmtree(backup)
    return {
        "file_bytes": mdb.stat().st_size,
        "allocated_bytes": mdb.stat().st_blocks * 512,
        "used_bytes": stats["used_bytes"],
        "live_bytes": stats["live_bytes"],
        "channel_bytes": sum(c["bytes"] for c in stats["channels"]),
        "entries": sum(c["entries"] for c in stats["channels"]),
        "dedup_entries": stats["dedup_entries"],
        "backup_bytes": backup_bytes,
    }


def measure_disk(
    messages: int, channels: int, senders: int, encrypted: bool, edit: bool, scratch: Path
) -> dict[str, Any]:
    label = "encrypted" if encrypted else "plaintext"
    data_dir = scratch / f"disk-{label}"
    shutil.rmtree(data_dir, ignore_errors=True)
    keyring = None
    if encrypted:
        key_file = scratch / "keys"
        if not key_file.exists():
            cli("keygen", "--encryption-key-file", str(key_file))
        keyring = load_keyring(key_file)
    filler = Filler()
    config = StoreConfig(durability="async", encryption=keyring)
    result: dict[str, Any] = {"encrypted": encrypted, "messages": messages}
    t0 = time.perf_counter()
    with LmdbStore(data_dir, config, notify=filler.notify) as store:
        filler.run(store, message_ops(messages, channels, senders), messages)
    result["append_s"] = round(time.perf_counter() - t0, 1)
    result["after_append"] = disk_figures(data_dir, scratch, label)
    print(f"  {label}: {messages} messages: {result['after_append']}", flush=True)
    if edit:
        targets = sorted(filler.ids.items())
        edits = (
            WriteOp(
                "edit", f"room-{i % channels}", f"user-{i % senders}", target=mid, text=EDIT_TEXT
            )
            for i, mid in targets
        )
        with LmdbStore(data_dir, config, notify=filler.notify) as store:
            filler.committed = 0
            filler.run(store, edits, len(targets))
        result["edits"] = len(targets)
        result["after_edits"] = disk_figures(data_dir, scratch, label)
        print(f"  {label}: {len(targets)} edits: {result['after_edits']}", flush=True)
        t0 = time.perf_counter()
        with LmdbStore(data_dir, config) as store:
            store.compact_all()
        result["compact_s"] = round(time.perf_counter() - t0, 1)
        result["after_compact"] = disk_figures(data_dir, scratch, label)
        print(f"  {label}: compacted: {result['after_compact']}", flush=True)
    shutil.rmtree(data_dir)
    return result


# --- report -------------------------------------------------------------------------------


def per_million(value: int, messages: int) -> str:
    return f"{value * 1_000_000 / messages / MIB:,.1f} MiB"


def report(meta: dict[str, Any], memory: list[dict[str, Any]], disk: list[dict[str, Any]]) -> str:
    lines = [
        f"# Sizing, {meta['date']}",
        "",
        f"- command: `{meta['command']}` (from the repository root; `make bench-sizing`)",
        f"- machine: {meta['machine']['cpu']}, {meta['machine']['nproc']} CPUs, "
        f"{meta['machine']['platform']}; scratch on {meta['machine'].get('data_dir_device')} "
        f"({meta['machine'].get('data_dir_fs')})",
        f"- versions: Python {meta['python']}, tsmsg {meta['tsmsg']}",
        "",
        "## Server memory per idle connection",
        "",
        "Each connection a distinct user, `hello` + `join` of one channel, then idle "
        "(a ping every 20 s). RSS of the `tsmsg serve` process after settling.",
        "",
        "| transport | connections | VmRSS MiB | RssAnon MiB | opened in s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for run in memory:
        for row in run["steps"]:
            lines.append(
                f"| {'TLS' if run['tls'] else 'plaintext'} | {row['connections']:,} | "
                f"{row['vm_rss'] / MIB:.1f} | {row['rss_anon'] / MIB:.1f} | {row['open_s']} |"
            )
    lines += ["", "| transport | bytes per connection (VmRSS slope) | (RssAnon slope) |"]
    lines += ["| --- | ---: | ---: |"]
    for run in memory:
        lines.append(
            f"| {'TLS' if run['tls'] else 'plaintext'} | {run['bytes_per_connection_rss']:,} | "
            f"{run['bytes_per_connection_anon']:,} |"
        )
    if not disk:  # --skip-disk
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "## Disk per million messages",
        "",
        "200-byte texts, 100 channels, 1,000 senders, a UUID cid each; `async` durability. "
        "Figures per million messages (the run's figures scaled).",
        "",
        "| case | data.mdb | allocated | used (inspect) | live (inspect) | channel logs | "
        "dedup entries | backup copy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in disk:
        n = run["messages"]
        name = "encrypted" if run["encrypted"] else "plaintext"
        stages = [("after_append", f"{name}, {n:,} messages")]
        if "after_edits" in run:
            stages += [
                ("after_edits", f"{name}, + {run['edits']:,} edits"),
                ("after_compact", f"{name}, after compaction"),
            ]
        for key, title in stages:
            f = run[key]
            lines.append(
                f"| {title} | {per_million(f['file_bytes'], n)} | "
                f"{per_million(f['allocated_bytes'], n)} | {per_million(f['used_bytes'], n)} | "
                f"{per_million(f['live_bytes'], n)} | {per_million(f['channel_bytes'], n)} | "
                f"{f['dedup_entries']:,} | {per_million(f['backup_bytes'], n)} |"
            )
    lines += ["", "Wall times (noisy: shared CPU):"]
    lines += [
        f"- {'encrypted' if r['encrypted'] else 'plaintext'}: appends {r['append_s']} s"
        + (f", compaction {r['compact_s']} s" if "compact_s" in r else "")
        for r in disk
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        default="0,1000,2500,5000,10000",
        help="connection counts (default 0,1000,2500,5000,10000)",
    )
    parser.add_argument(
        "--tls-steps",
        default="0,1000,2500,5000",
        help="connection counts with TLS (default 0,1000,2500,5000: each handshake costs "
        "the server's one core a few ms)",
    )
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--senders", type=int, default=1000)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-disk", action="store_true")
    parser.add_argument("--no-tls", action="store_true", help="skip the TLS memory run")
    parser.add_argument("--out", type=Path, help="results directory")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    tls_steps = [int(s) for s in args.tls_steps.split(",")]
    date = datetime.date.today().isoformat()
    out: Path = args.out or Path(__file__).parent / "results" / f"{date}-sizing"
    scratch = Path(tempfile.mkdtemp(prefix="tsmsg-sizing-"))
    nofile = raise_nofile(2 * max(steps) + 256)
    if nofile < max(steps) + 256:
        raise SystemExit(f"RLIMIT_NOFILE {nofile} is too low for {max(steps)} connections")
    memory: list[dict[str, Any]] = []
    disk: list[dict[str, Any]] = []
    try:
        if not args.skip_memory:
            print("memory per connection:", flush=True)
            (scratch / "plain").mkdir()
            memory.append(trio.run(measure_memory, steps, None, scratch / "plain"))
            if not args.no_tls:
                (scratch / "tls").mkdir()
                tls = make_tls(scratch)
                memory.append(trio.run(measure_memory, tls_steps, tls, scratch / "tls"))
        if not args.skip_disk:
            print("disk per million messages:", flush=True)
            for encrypted in (False, True):
                disk.append(
                    measure_disk(
                        args.messages,
                        args.channels,
                        args.senders,
                        encrypted,
                        not encrypted,
                        scratch,
                    )
                )
        meta = {
            "date": date,
            "command": " ".join(["python bench/sizing.py", *sys.argv[1:]]),
            "machine": machine(scratch),
            "python": sys.version.split()[0],
            "tsmsg": metadata.version("tsmsg"),
            "rlimit_nofile": nofile,
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    results = {"meta": meta, "memory": memory, "disk": disk}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = report(meta, memory, disk)
    print(text)
    write_report(out, text)


if __name__ == "__main__":
    main()
