"""A ``tsmsg serve`` child process for the tests that need a real one: started on a given
port or port 0 with its output in a log file, the port read back from the log, restartable
on the same port and data directory, and always killed on the way out.

It runs under trio and under asyncio (the client's tests use both): the child is a plain
``subprocess.Popen`` and every wait is an anyio sleep loop, bounded."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from conftest import SECRET, unlimited_env

START_TIMEOUT_S = 15.0  # the "serving on" log line; generous for a loaded 2-core machine
EXIT_TIMEOUT_S = 10.0
POLL_S = 0.01
SERVING = re.compile(r"serving on 127\.0\.0\.1:(\d+)")


def server_env(*, secret: bool = True, **extra: str) -> dict[str, str]:
    """This process's environment without any TSMSG_* setting, rate limits lifted, the
    tests' secret (unless ``secret`` is false), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSMSG_")}
    env.update(unlimited_env())
    if secret:
        env["TSMSG_SECRET"] = SECRET.decode()
    env.update(extra)
    return env


class ServerProcess:
    """``tsmsg serve --port PORT --data-dir DATA_DIR *ARGS``, its stdout and stderr in
    ``log_path``. With port 0 the first start learns the port; a restart reuses it, the
    data directory and the log file (appended to)."""

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        *args: str,
        port: int = 0,
        secret: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir, self.log_path, self.args, self.port = data_dir, log_path, args, port
        self.env = server_env(secret=secret, **(env or {}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self) -> None:
        """Start the server (again) and wait for its "serving on" line."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        offset = self.log_path.stat().st_size if self.starts > 1 else 0
        cmd = [sys.executable, "-m", "tsmsg.cli", "serve", "--port", str(self.port)]
        cmd += ["--data-dir", str(self.data_dir), *self.args]
        with open(self.log_path, "ab" if offset else "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=self.env
            )
        match = None
        with anyio.move_on_after(START_TIMEOUT_S):
            while match is None and self.proc.poll() is None:
                match = SERVING.search(self.log_path.read_bytes()[offset:].decode(errors="replace"))
                if match is None:
                    await anyio.sleep(POLL_S)
        assert match is not None, f"server did not start:\n{self.log()}"
        self.port = int(match.group(1))

    async def restart(self) -> None:
        """Start again after a kill: the same port, data directory and log file."""
        await self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> int | None:
        """SIGKILL, and reap it (quick: no cleanup runs). Its exit code, None if it never
        started."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(timeout=EXIT_TIMEOUT_S)

    async def wait(self) -> int:
        """Its exit code, once it exits (the event loop runs meanwhile)."""
        assert self.proc is not None
        with anyio.fail_after(EXIT_TIMEOUT_S):
            while (code := self.proc.poll()) is None:
                await anyio.sleep(POLL_S)
        return code

    async def terminate(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGTERM: a graceful shutdown) and wait for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await self.wait()

    def status(self) -> dict[str, int]:
        """The kB figures of /proc/<pid>/status (VmRSS, RssAnon, VmHWM, ...)."""
        assert self.proc is not None
        out: dict[str, int] = {}
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[name] = int(parts[0])
        return out


@asynccontextmanager
async def server_process(
    data_dir: Path,
    log_path: Path,
    *args: str,
    port: int = 0,
    secret: bool = True,
    env: Mapping[str, str] | None = None,
) -> AsyncIterator[ServerProcess]:
    """A started :class:`ServerProcess`, SIGKILLed and reaped on the way out."""
    server = ServerProcess(data_dir, log_path, *args, port=port, secret=secret, env=env)
    try:
        await server.start()
        yield server
    finally:
        server.kill()
