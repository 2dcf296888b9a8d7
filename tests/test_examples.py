"""The scripts in ``examples/`` run as child processes against a real server (the in-process
``harness``) and do what their docstrings say."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from conftest import SECRET, Harness, mint
from tsmsg.client import Message, connect

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RUN_TIMEOUT = 60.0  # s: a child Python process start plus a short conversation
WAIT_TIMEOUT = 15.0  # s: any single wait for a child's output or a message


def example_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSMSG_")}
    env["TSMSG_SECRET"] = SECRET.decode()
    return env


def example(name: str, port: int, channel: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / name), "--port", str(port), "--channel", channel]


async def run_example(
    name: str, port: int, channel: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run an example to its end (bounded); its exit code, stdout and stderr."""
    with trio.fail_after(RUN_TIMEOUT):
        return await trio.run_process(
            example(name, port, channel),
            capture_stdout=True,
            capture_stderr=True,
            env=env,
            cwd=cwd,
            check=False,
        )


async def wait_for_output(proc: trio.Process, path: Path, needle: str) -> None:
    with trio.fail_after(WAIT_TIMEOUT):
        while needle not in path.read_text():
            assert proc.poll() is None, path.read_text()
            await trio.sleep(0.05)


async def test_two_users_prints_the_same_conversation_for_both(harness: Harness) -> None:
    proc = await run_example("two_users.py", harness.server.port, "ex-two", example_env())
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    conversation = [
        "  [1] alice: hi bob",
        "  [2] bob: hi alice",
        "  [3] alice: lunch at noon?",
        "  [4] bob: sure, see yuo there",
        "  [5] bob edited [4]: sure, see you there",
        "  [6] alice: great",
        "  [7] alice deleted [3]",
    ]
    assert out.splitlines() == ["alice saw:", *conversation, "bob saw:", *conversation]


async def test_two_users_without_a_secret_exits_1(harness: Harness) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TSMSG_")}
    proc = await run_example("two_users.py", harness.server.port, "ex-two", env)
    assert proc.returncode == 1
    assert "TSMSG_SECRET" in proc.stderr.decode()


async def test_echo_bot_answers_others_and_stops_on_ctrl_c(
    harness: Harness, tmp_path: Path
) -> None:
    channel = "ex-echo"
    out_path = tmp_path / "echo_bot.out"
    with open(out_path, "wb") as out:
        bot = await trio.lowlevel.open_process(
            example("echo_bot.py", harness.server.port, channel),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=example_env(),
        )
    try:
        await wait_for_output(bot, out_path, "listening")
        async with connect("127.0.0.1", harness.server.port, token=mint("alice")) as alice:
            await alice.join(channel)
            ping = await alice.send(channel, "ping")
            with trio.fail_after(WAIT_TIMEOUT):
                async for event in alice.events(channel):
                    if isinstance(event, Message) and event.sender == "echo-bot":
                        break
            assert event.text == "echo: ping" and event.seq == ping.seq + 1
        await wait_for_output(bot, out_path, "echoed")  # printed once the echo is acked
        bot.send_signal(signal.SIGINT)
        with trio.fail_after(WAIT_TIMEOUT):
            code = await bot.wait()
        text = out_path.read_text()
        assert code == 0, text
        assert text.splitlines() == [
            f"echo-bot listening in {channel} on 127.0.0.1:{harness.server.port}",
            f"echoed [{ping.seq}] alice: ping",
            "echo-bot stopped",
        ]
    finally:
        if bot.returncode is None:
            bot.kill()
            with trio.move_on_after(WAIT_TIMEOUT):
                await bot.wait()


async def test_examples_take_the_dev_secret_file_and_fail_in_one_line_without_a_server(
    harness: Harness, tmp_path: Path
) -> None:
    """As the README runs them after `make run`: the secret from data/dev-secret (here a
    copy, the default path relative to the working directory); with the server down, one
    line on stderr and exit 1, no traceback."""
    cwd = tmp_path / "project"  # (tmp_path/data is the harness's data directory)
    (cwd / "data").mkdir(parents=True)
    secret_file = cwd / "data" / "dev-secret"
    secret_file.write_bytes(SECRET + b"\n")
    secret_file.chmod(0o600)
    env = {k: v for k, v in example_env().items() if k != "TSMSG_SECRET"}
    ok = await run_example("two_users.py", harness.server.port, "ex-file", env, cwd=cwd)
    assert ok.returncode == 0, ok.stderr.decode()
    assert ok.stdout.decode().startswith("alice saw:\n")

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name in ("two_users.py", "echo_bot.py"):
        down = await run_example(name, port, "ex-down", env, cwd=cwd)
        err = down.stderr.decode()
        assert down.returncode == 1, err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"connection refused by 127.0.0.1:{port}" in err

    nowhere = await run_example("two_users.py", port, "ex-down", env)
    assert nowhere.returncode == 1
    assert "no secret: run `make run` first" in nowhere.stderr.decode()


async def test_examples_say_a_bad_channel_or_secret_in_one_line(
    harness: Harness, tmp_path: Path
) -> None:
    """A channel name the token cannot name, or a secret too short to sign with: one line
    on stderr and exit 1 at once, no traceback (nor a 10 s wait for a connection)."""
    short = {**example_env(), "TSMSG_SECRET": "short"}
    for name in ("two_users.py", "echo_bot.py"):
        for channel, env, says in (
            ("#general", example_env(), "invalid channel pattern '#general'"),
            ("ex-short", short, "TSMSG_SECRET must be at least 32 bytes"),
        ):
            with trio.fail_after(WAIT_TIMEOUT):
                done = await run_example(name, harness.server.port, channel, env)
            err = done.stderr.decode()
            assert done.returncode == 1, err
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert says in err, err
