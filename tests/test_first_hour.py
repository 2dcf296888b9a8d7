"""Issue 19: the first hour of a new user, item by item (the DM notice has its own file,
test_channels_list.py; the README walkthrough and the terminal UI, test_walkthrough.py).

- ``serve --dev`` keeps its secret in the data directory (mode 600, directory 700): a
  restart keeps tokens valid; its hint prints commands that work when pasted;
- a client whose token the server refuses stops and says ``token refused: ...``, also
  when a token provider would mint another one just as bad;
- a client says "connecting to HOST:PORT" at once and reports a refused connection at
  once, not after its connect timeout.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from conftest import SECRET, WireClient, make_settings, running_server
from server_proc import server_env, server_process
from tsmsg.auth import TokenIssuer
from tsmsg.cli import main
from tsmsg.client import ConnectionClosed, Unauthorized, connect
from tsmsg.store import LmdbStore, StoreConfig

WAIT = 10.0  # s: the bound of any single wait for a process or a reply
HINT_COMMAND = re.compile(r"^    (\S.*)$", re.MULTILINE)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A printed command line, run by a shell exactly as a user would paste it."""
    return subprocess.run(
        ["sh", "-c", command],
        cwd=cwd,
        env=server_env(secret=False),
        capture_output=True,
        text=True,
        timeout=WAIT * 3,
        check=False,
    )


async def hello(port: int, token: str) -> dict[str, object]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = WireClient(stream)
    try:
        return await client.request("hello", v=1, token=token)
    finally:
        await client.aclose()


async def test_dev_secret_is_kept_in_the_data_dir_and_the_hint_works_pasted(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    async with server_process(data, tmp_path / "log", "--dev", secret=False) as server:
        secret_file = data / "dev-secret"
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        log = server.log()
        assert f"--dev: generated a secret in {secret_file}" in log
        commands = HINT_COMMAND.findall(log)
        assert [c.split(" chat ")[1].split()[:2] for c in commands[:2]] == [
            ["--user", "alice"],
            ["--user", "bob"],
        ]
        token_command = commands[2]
        assert " token --user alice " in token_command
        # Pasted into a shell, from any directory: it prints a token the server takes.
        minted = shell(token_command, tmp_path)
        assert minted.returncode == 0, minted.stderr
        token = minted.stdout.strip()
        assert (await hello(server.port, token))["t"] == "welcome"

        # A restart reuses the secret: the token minted before is still good.
        server.kill()
        await server.restart()
        assert f"--dev: reusing the secret in {secret_file}" in server.log()
        assert (await hello(server.port, token))["t"] == "welcome"


async def test_refused_tokens_and_refused_connections(tmp_path: Path) -> None:
    """A wrong secret stops the client at once, with a token or a provider (asked once);
    then, nothing listening on the port, a refusal is reported at once, not after the
    60 s connect timeout."""
    wrong = TokenIssuer(b"a-wrong-secret-a-wrong-secret-a-wrong!!")
    minted: list[str] = []

    async def provider() -> str:
        minted.append(wrong.issue("alice", ["*"], ttl_s=600, now=int(time.time())))
        return minted[-1]

    async with running_server(make_settings(tmp_path / "data")) as h:
        port = h.server.port
        token = wrong.issue("alice", ["*"], ttl_s=600, now=int(time.time()))
        for kwargs in ({"token": token}, {"token_provider": provider}):
            with trio.fail_after(WAIT), pytest.raises(Unauthorized) as refused:
                async with connect("127.0.0.1", port, connect_timeout=60, **kwargs):  # type: ignore[arg-type]
                    pass
            assert str(refused.value).startswith("token refused: ")
            assert "(unauthorized)" in str(refused.value)
        assert len(minted) == 1  # the provider was asked once: its token was refused

    with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
        async with connect("127.0.0.1", port, token="x", connect_timeout=60):
            pass
    assert f"connection refused by 127.0.0.1:{port}" in str(closed.value)


def test_the_chat_says_where_it_connects_and_that_it_was_refused() -> None:
    port = free_port()
    env = {**server_env(), "TSMSG_SECRET": SECRET.decode()}
    argv = [sys.executable, "-m", "tsmsg.cli", "chat", "--user", "alice", "--port", str(port)]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=WAIT * 3, env=env, check=False, input=""
    )
    assert done.returncode == 1
    assert done.stdout == f"-- connecting to 127.0.0.1:{port}\u2026\n"
    assert done.stderr.startswith(f"tsmsg: connection refused by 127.0.0.1:{port}")
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------- operator nits (item 9)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def refused(result: tuple[int, str, str], *fragments: str) -> None:
    """Exit 1, one line that names the problem, no traceback."""
    code, _, err = result
    assert code == 1 and err.startswith("tsmsg: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def test_operator_errors_name_what_is_wrong(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in [k for k in os.environ if k.startswith("TSMSG_")]:
        monkeypatch.delenv(key)
    config = tmp_path / "tsmsg.toml"
    config.write_text("port = \n")
    refused(cli(capsys, "serve", "--dev", "--config", str(config)), str(config), "not valid TOML")
    monkeypatch.setenv("TSMSG_LOG_LEVEL", "LOUD")
    refused(cli(capsys, "serve", "--dev", "--data-dir", str(tmp_path)), "log_level", "'LOUD'")
    monkeypatch.delenv("TSMSG_LOG_LEVEL")

    monkeypatch.setenv("TSMSG_SECRET", SECRET.decode())
    refused(cli(capsys, "token", "--user", "a", "--ttl", "0"), "--ttl must be at least 1")
    refused(cli(capsys, "token", "--user", "a", "--ttl", str(10**20)), "--ttl", "2592000")
    refused(cli(capsys, "token", "--user", "a", "--channels", "dm:*"), "'dm:*' grants nothing")
    assert "ttl_s" not in capsys.readouterr().err

    keys = tmp_path / "missing" / "keys"
    refused(
        cli(capsys, "keygen", "--encryption-key-file", str(keys)), f"no directory {keys.parent}"
    )
    assert not keys.parent.exists()


def test_compact_says_what_it_did_and_data_files_are_private(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    with LmdbStore(data, StoreConfig(durability="async")) as store:
        store.append("room-1", "alice", "c1", "hi")
    code, out, _ = cli(capsys, "compact", "--data-dir", str(data))
    assert (code, out) == (0, "room-1: nothing compacted (horizon 0: the whole log is kept)\n")
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for f in data.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    backup = tmp_path / "backup"
    assert cli(capsys, "backup", "--data-dir", str(data), str(backup))[0] == 0
    assert stat.S_IMODE(backup.stat().st_mode) == 0o700
    assert stat.S_IMODE((backup / "data.mdb").stat().st_mode) == 0o600


# ------------------------------------------------------------------- HTTP on the TCP port


async def test_an_http_request_on_the_tcp_port_gets_a_plain_text_hint(tmp_path: Path) -> None:
    async with running_server(make_settings(tmp_path / "data")) as h:
        stream = await trio.open_tcp_stream("127.0.0.1", h.server.port)
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = b""
        with trio.fail_after(WAIT):
            while chunk := await stream.receive_some(65536):
                answer += chunk
        await stream.aclose()
        head, _, body = answer.decode().partition("\r\n\r\n")
        assert head.startswith("HTTP/1.0 400 Bad Request\r\n")
        assert "Content-Type: text/plain" in head
        assert body.count("\n") == 1 and body.startswith("This is a tsmsg port:")
        assert "not HTTP" in body and "WebSocket" in body
        metrics = h.server.metrics
        assert metrics.value("tsmsg_error_frames_total", code="frame_too_large") == 0
        # The next connection is served as usual.
        assert (await h.connect("alice")).pending == []


def test_the_readme_api_is_reachable_from_import_tsmsg() -> None:
    """`import tsmsg` alone reaches what the README uses: tsmsg.tls, the event classes,
    TokenIssuer, connect; and importing tsmsg does not load the client (the server does
    not need it)."""
    code = (
        "import sys, tsmsg\n"
        "assert 'tsmsg.client' not in sys.modules and 'anyio' not in sys.modules\n"
        "tsmsg.tls.client_tls_context\n"
        "for name in tsmsg.__all__: getattr(tsmsg, name)\n"
        "assert tsmsg.Message is tsmsg.client.Message and tsmsg.Resynced\n"
        "assert tsmsg.TokenIssuer is tsmsg.auth.TokenIssuer\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT * 3, check=False
    )
    assert done.stdout == "ok\n", done.stderr


# ------------------------------------------------------------------- set-up weight (item 8)

REPO = Path(__file__).resolve().parent.parent
DEV_TOOLS = ("pytest", "mypy", "ruff", "hypothesis", "matplotlib", "nats-server", "msgspec")


def make_dry_run(target: str) -> str:
    """The commands `make TARGET` would run from scratch (-B: as if nothing were built)."""
    return subprocess.run(
        ["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout


def test_make_run_installs_only_what_serving_needs() -> None:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    assert not [tool for tool in DEV_TOOLS if tool in runtime]
    run = make_dry_run("run")
    # Serving installs the runtime and the `compile` extra only: mypy's compiler (mypyc)
    # and setuptools build the hot modules (tsmsg/compiled.py); no test or bench tool.
    assert "maturin develop" in run and "--locked -E compile " in run
    assert "-E test" not in run and "-E bench" not in run
    assert "-m tsmsg.build_compiled" in run
    assert sorted(d.split(">")[0] for d in project["optional-dependencies"]["compile"]) == [
        "mypy",
        "setuptools",
    ]
    assert "--locked -E test " in make_dry_run("test-python")
    assert "--locked -E bench " in make_dry_run("bench-codec")
    extras = project["optional-dependencies"]
    assert any(d.startswith("pytest>") for d in extras["test"])
    assert any(d.startswith("matplotlib>") for d in extras["bench"])
