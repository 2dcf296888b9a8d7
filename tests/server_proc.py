"""A ``tsmsg serve`` child process for the crash-loop and fuzzing tests: started on port 0
with its log in a file, the port read back from the log, always killed on the way out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from conftest import SECRET, unlimited_env

START_TIMEOUT_S = 15.0  # the "serving on" log line; generous for a loaded 2-core machine
EXIT_TIMEOUT_S = 10.0
SERVING = re.compile(r"serving on 127\.0\.0\.1:(\d+)")


@dataclass
class ServerProcess:
    proc: trio.Process
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def kill(self) -> None:
        """SIGKILL, and reap it."""
        self.proc.kill()
        with trio.fail_after(EXIT_TIMEOUT_S):
            await self.proc.wait()

    def status(self) -> dict[str, int]:
        """The kB figures of /proc/<pid>/status (VmRSS, RssAnon, VmHWM, ...)."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[name] = int(parts[0])
        return out


def server_env(**extra: str) -> dict[str, str]:
    """This process's environment without any TSMSG_* setting, rate limits lifted, the
    tests' secret, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSMSG_")}
    env.update(unlimited_env())
    env["TSMSG_SECRET"] = SECRET.decode()
    env.update(extra)
    return env


@asynccontextmanager
async def server_process(
    data_dir: Path, log_path: Path, **env: str
) -> AsyncIterator[ServerProcess]:
    cmd = [sys.executable, "-m", "tsmsg.cli", "serve", "--port", "0", "--data-dir", str(data_dir)]
    with open(log_path, "wb") as log_file:
        proc = await trio.lowlevel.open_process(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            env=server_env(**env),
        )
    try:
        port = None
        with trio.move_on_after(START_TIMEOUT_S):
            while port is None and proc.poll() is None:
                match = SERVING.search(log_path.read_text(errors="replace"))
                port = int(match.group(1)) if match else None
                if port is None:
                    await trio.sleep(0.01)
        assert port is not None, f"server did not start:\n{log_path.read_text()}"
        yield ServerProcess(proc, port, log_path)
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(EXIT_TIMEOUT_S):
                await proc.wait()
