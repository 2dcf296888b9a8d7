"""Real ``redis-server`` processes for the tests: one Redis, or a 3-master Redis Cluster
made with ``redis-cli --cluster create``, each on free 127.0.0.1 ports in a temporary
directory, AOF on with ``appendfsync always`` and no RDB snapshots (the configuration
STORAGE.md asks for). Never the system service. Every process is killed on the way out,
also when a test fails (the fixtures in conftest.py stop them; ``atexit`` is the backstop).

Plain blocking code with bounded waits: used from session fixtures and from threads.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
START_TIMEOUT_S = 15.0  # until a started redis-server answers PING (a loaded 2-core box)
CLUSTER_TIMEOUT_S = 30.0  # until all nodes report cluster_state:ok after the create
EXIT_TIMEOUT_S = 10.0
POLL_S = 0.02
PORT_TRIES = 50  # attempts at finding a free port (and, for a cluster node, its bus port)
CLUSTER_BUS_OFFSET = 10000  # Redis Cluster's bus port is the client port plus this

_running: set[RedisServer] = set()


def available() -> bool:
    return shutil.which("redis-server") is not None or Path(REDIS_SERVER).exists()


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A port nothing listens on now (for a cluster node: its bus port free as well)."""
    for _ in range(PORT_TRIES):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if not cluster or (
            port + CLUSTER_BUS_OFFSET < 65536 and _bindable(port + CLUSTER_BUS_OFFSET)
        ):
            return port
    raise RuntimeError(f"no free port pair found in {PORT_TRIES} tries")


class RedisServer:
    """One ``redis-server`` in ``directory`` on ``port`` (0: a free one). ``start`` again
    after ``kill`` restarts it on the same port and directory, so it replays its AOF."""

    def __init__(self, directory: Path, port: int = 0, *, cluster: bool = False) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster
        self.port = port or free_port(cluster)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=EXIT_TIMEOUT_S)

    def start(self) -> RedisServer:
        args = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port)]
        args += ["--dir", str(self.dir), "--appendonly", "yes", "--appendfsync", "always"]
        args += ["--save", "", "--logfile", "redis.log", "--daemonize", "no"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            args += ["--cluster-node-timeout", "5000"]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        _running.add(self)
        deadline = time.monotonic() + START_TIMEOUT_S
        with self.client() as c:
            while True:
                try:
                    if c.ping():
                        return self
                except redis.RedisError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {self.port} did not start:\n{self.log()}")
                time.sleep(POLL_S)

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"

    def kill(self) -> None:
        """SIGKILL: nothing is flushed that was not already (AOF ``always``: all acked)."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def _end(self, sig: int) -> None:
        proc, self.proc = self.proc, None
        _running.discard(self)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(EXIT_TIMEOUT_S)


def start_replica(directory: Path, primary: RedisServer) -> RedisServer:
    """A replica of ``primary`` in ``directory``, once its link is up (the primary is set
    to sync at once instead of its default 5 s wait). End it with ``kill``: a replica
    asked to stop waits 10 s for its primary."""
    replica = RedisServer(directory).start()
    with replica.client() as c, primary.client() as p:
        p.config_set("repl-diskless-sync-delay", 0)
        c.replicaof("127.0.0.1", primary.port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while c.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                replica.kill()
                raise RuntimeError(f"replica on {replica.port} did not connect:\n{replica.log()}")
            time.sleep(POLL_S)
    return replica


class RedisCluster:
    """Three masters, no replicas: the slots spread over them by ``redis-cli --cluster
    create``."""

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.nodes = [RedisServer(directory / f"node{i}", cluster=True) for i in range(masters)]

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisCluster:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=CLUSTER_TIMEOUT_S,
        )
        deadline = time.monotonic() + CLUSTER_TIMEOUT_S
        for node in self.nodes:
            with node.client() as c:
                while b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO"):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster not ok on {node.port}:\n{node.log()}")
                    time.sleep(POLL_S)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.kill()
