"""The ``tsmsg`` command line: every subcommand's success and error paths (``chat`` has
its own tests).

Most tests call :func:`tsmsg.cli.main` in-process and read stdout/stderr with capsys; a
few run ``python -m tsmsg.cli`` as a child process for the real exit code and ``--help``,
and for ``inspect`` and ``backup`` beside a writer that is busy in this process. (LMDB
forbids opening one environment twice in one process, so an in-process command only ever
runs on a data directory whose store has been closed.)
"""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from conftest import ENGINES, SECRET, fresh_redis_url
from tsmsg.auth import TokenVerifier
from tsmsg.cli import describe_horizon, main
from tsmsg.store import Entry, LmdbStore, RedisStore, Store, StoreConfig, WriteOp
from tsmsg.store.crypto import load_keyring
from tsmsg.store.export import read_export
from tsmsg.store.lmdb_store import FORMAT_VERSION, LmdbReader

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20.000Z
T0_ISO = "2023-11-14T22:13:20.000Z"
FAST = StoreConfig(durability="async")  # populating fixtures need no fsync per commit
CHILD_TIMEOUT = 60.0
SUBCOMMANDS = ["serve", "token", "compact", "inspect", "backup", "restore"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The command in this process; the root logger's handlers are put back after it (a
    command's handler writes to this test's captured stderr, closed after the test: a
    later test's log line, e.g. a Redis function library loaded, was a logging error)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        code = main(list(argv))
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    out, err = capsys.readouterr()
    return code, out, err


def run_child(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tsmsg.cli", *argv],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
        env=env,
        check=False,
    )


def assert_failure(code: int, err: str, *fragments: str) -> None:
    """Exit code 1, one ``tsmsg: ...`` line naming the problem, no traceback."""
    assert code == 1
    assert err.startswith("tsmsg: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("TSMSG_"):
            monkeypatch.delenv(key)


def digest(path: Path) -> str:
    return hashlib.sha256((path / "data.mdb").read_bytes()).hexdigest()


def populate(data_dir: Path) -> None:
    with LmdbStore(data_dir, FAST, clock=lambda: T0) as store:
        populate_store(store)


def populate_store(store: Store) -> None:
    """room-1: 30 messages, an edit of the last one, a delete of the first; dm: one
    message; read cursors for alice and bob; all at T0."""
    first = last = store.append("room-1", "alice", "c1", "hello 1 " + "x" * 80)
    for i in range(2, 31):
        sender = "alice" if i % 2 else "bob"
        last = store.append("room-1", sender, f"c{i}", f"hello {i} " + "x" * 80)
    store.edit("room-1", last_sender(30), last.id, "fixed\ntypo")
    store.delete("room-1", "alice", first.id)
    store.append("dm", "bob", "d1", "psst")
    store.set_read("alice", "room-1", 20)
    store.set_read("bob", "room-1", 32)
    store.set_read("bob", "dm", 1)


def channel_info(data_dir: Path, channel: str) -> tuple[int, str]:
    """A channel's epoch and message id prefix (both derived from the random store id)."""
    with LmdbReader(data_dir) as reader:
        info, entries, _ = reader.tail(channel, 1)
    assert info is not None
    return info.epoch, entries[0]["id"].rsplit("-", 1)[0]


def last_sender(i: int) -> str:
    return "alice" if i % 2 else "bob"


def write_format(data_dir: Path, version: bytes) -> None:
    """A data directory as another tsmsg version would leave it."""
    env = lmdb.open(str(data_dir), max_dbs=12)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"format", version, db=meta)
    env.close()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    populate(path)
    return path


class Target:
    """A store of one engine as the CLI selects it: ``args`` (--data-dir or --engine),
    the TOML line of it, and ``open`` for the test's own store (closed before the CLI)."""

    def __init__(self, engine: str, data_dir: Path) -> None:
        self.engine, self.data_dir = engine, data_dir
        self.args = ["--data-dir", str(data_dir)]
        if engine != "lmdb":
            self.args = ["--engine", engine, "--data-dir", str(data_dir)]
        self.toml = f'data_dir = "{data_dir}"\nengine = "{engine}"\n'

    def open(self, clock: Any = None) -> Store:
        kw = {} if clock is None else {"clock": clock}
        if self.engine == "lmdb":
            return LmdbStore(self.data_dir, FAST, **kw)
        return RedisStore(self.engine, **kw)


def make_target(request: pytest.FixtureRequest, name: str, data_dir: Path) -> Target:
    """An empty store of engine ``name``: LMDB in ``data_dir``, an emptied database of the
    test Redis, or the test cluster with tsmsg's default key prefix cleared."""
    if name == "lmdb":
        return Target("lmdb", data_dir)
    if name == "redis":
        return Target(fresh_redis_url(request.getfixturevalue("redis_server")), data_dir)
    cluster = request.getfixturevalue("redis_cluster")
    with RedisStore(cluster.url, key_prefix="tsmsg:") as store:
        for node in store._primaries():
            keys = list(node.scan_iter(match=b"tsmsg:*"))
            for key in keys:
                node.delete(key)
    return Target(cluster.url, data_dir)


@pytest.fixture(params=ENGINES)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    return make_target(request, request.param, tmp_path / "target")


@pytest.fixture
def bad_format_dir(tmp_path: Path) -> Path:
    path = tmp_path / "future"
    write_format(path, b"99")
    return path


# ------------------------------------------------------------------ help, exit codes


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help_of_every_subcommand_in_a_child_process(sub: str | None) -> None:
    proc = run_child(*([sub] if sub else []), "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: tsmsg {sub or ''}".rstrip())
    assert "exit codes:" in proc.stdout and "2    usage error" in proc.stdout
    if sub is None:
        for name in SUBCOMMANDS:
            assert name in proc.stdout


def test_exit_codes_of_a_child_process(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    usage = run_child()
    assert usage.returncode == 2 and "required: command" in usage.stderr
    assert run_child("inspect", "--tail", "3").returncode == 2
    assert run_child("backup").returncode == 2  # OUT is required
    failed = run_child("inspect", "--data-dir", str(missing))
    assert failed.returncode == 1
    assert failed.stderr == f"tsmsg: no tsmsg data directory at {missing}\n"
    assert not missing.exists()
    ok = run_child("token", "--user", "alice", env={**os.environ, "TSMSG_SECRET": SECRET.decode()})
    assert ok.returncode == 0 and ok.stdout.count(".") == 2  # a JWT: header.payload.sig


def test_usage_errors_exit_2_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        [],
        ["nope"],
        ["token"],  # --user is required
        ["token", "--user", "a", "--ttl", "soon"],
        ["inspect", "--tail", "5"],  # --tail needs --channel
        ["inspect", "--channel", "c", "--tail", "-1"],
        ["compact", "--bogus"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2, argv
        assert "usage: tsmsg" in capsys.readouterr().err


# ------------------------------------------------------------------ token


def test_token_is_signed_with_the_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TSMSG_SECRET", SECRET.decode())
    code, out, err = run(
        capsys, "token", "--user", "alice", "--channels", "room-*,dm", "--channels", "ops"
    )
    assert (code, err) == (0, "")
    claims = TokenVerifier(SECRET).verify(out.strip(), now=int(time.time()))
    assert claims.user == "alice"
    assert claims.channels == ("room-*", "dm", "ops")
    assert claims.scopes == {"chat:read", "chat:send"}
    assert claims.exp - time.time() == pytest.approx(3600, abs=60)

    code, out, _ = run(
        capsys, "token", "--user", "mod", "--scope", "chat:read,chat:moderate", "--ttl", "60"
    )
    claims = TokenVerifier(SECRET).verify(out.strip(), now=int(time.time()))
    assert code == 0 and claims.scopes == {"chat:read", "chat:moderate"} and not claims.channels
    assert claims.exp - time.time() == pytest.approx(60, abs=30)


def test_token_without_a_usable_secret_fails(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run(capsys, "token", "--user", "alice")
    assert out == ""
    assert_failure(code, err, "TSMSG_SECRET is not set")
    monkeypatch.setenv("TSMSG_SECRET", "short")
    code, out, err = run(capsys, "token", "--user", "alice")
    assert out == ""
    assert_failure(code, err, "TSMSG_SECRET must be at least 32 bytes")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--user", "bad user!"], "invalid user id 'bad user!'"),
        (["--user", ""], "invalid user id ''"),
        (["--user", "a", "--scope", "chat:write"], "unknown scopes ['chat:write']"),
        (["--user", "a", "--channels", "room 1"], "invalid channel pattern 'room 1'"),
        (["--user", "a", "--ttl", "0"], "--ttl must be at least 1 (seconds), not 0"),
        (["--user", "a", "--ttl", "-5"], "--ttl must be at least 1 (seconds), not -5"),
        (["--user", "a", "--ttl", str(10**30)], "token_max_lifetime_s (2592000 s)"),
        (["--user", "a", "--ttl", "2592001"], "--ttl 2592001 is over token_max_lifetime_s"),
    ],
)
def test_token_refuses_bad_arguments(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    message: str,
) -> None:
    monkeypatch.setenv("TSMSG_SECRET", SECRET.decode())
    code, out, err = run(capsys, "token", *args)
    assert out == ""
    assert_failure(code, err, message)


def test_token_ttl_bound_is_the_servers_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TSMSG_SECRET", SECRET.decode())
    monkeypatch.setenv("TSMSG_TOKEN_MAX_LIFETIME_S", "60")
    code, _, err = run(capsys, "token", "--user", "a", "--ttl", "61")
    assert_failure(code, err, "token_max_lifetime_s (60 s)")
    code, out, _ = run(capsys, "token", "--user", "a", "--ttl", "60")
    assert code == 0 and out.count(".") == 2


# ------------------------------------------------------------------ serve (failures; the
# running server is tested over TCP in test_server_lifecycle.py)


def test_serve_refuses_to_start_without_a_secret(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "serve", "--port", "0", "--data-dir", str(tmp_path / "d"))
    assert_failure(code, err, "TSMSG_SECRET is not set", "--dev")


def test_serve_refuses_bad_settings(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "tsmsg.toml"
    config.write_text('colour = "blue"\n')
    code, _, err = run(capsys, "serve", "--dev", "--config", str(config))
    assert_failure(code, err, "unknown setting 'colour'")
    code, _, err = run(capsys, "serve", "--dev", "--config", str(tmp_path / "none.toml"))
    assert_failure(code, err, "none.toml")


def test_serve_refuses_out_of_range_settings(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Values that would break a running server are refused at start, NaN included."""
    for line, message in [
        ("port = 70000", "port must be from 0 to 65535"),
        ("max_inflight = 0", "max_inflight must be >= 1"),
        ("send_timeout_s = nan", "send_timeout_s must be > 0"),
        ("shutdown_grace_s = -1.0", "shutdown_grace_s must be >= 0"),
        ("retention_max_age_s = 0.0004", "retention_max_age_s must be 0 (keep all) or"),
        ("[limits]\nmax_depth = 0", "max_depth must be >= 1"),
        ("[limits]\nframe_rate = nan", "frame_rate must be > 0"),
        ("[limits]\nsend_rate = inf", "send_rate must be > 0 and finite, not inf"),
        ("shutdown_grace_s = inf", "shutdown_grace_s must be >= 0 and finite"),
    ]:
        config = tmp_path / "tsmsg.toml"
        config.write_text(line + "\n")
        code, _, err = run(capsys, "serve", "--dev", "--config", str(config))
        assert_failure(code, err, message)


def test_serve_refuses_a_public_key_and_a_secret(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not read: refused before")
    monkeypatch.setenv("TSMSG_SECRET", "x" * 32)
    config = tmp_path / "c.toml"
    config.write_text(f'public_key_file = "{key}"\nalgorithm = "RS256"\n')
    code, _, err = run(capsys, "serve", "--config", str(config), "--data-dir", str(tmp_path))
    assert_failure(code, err, "both public_key_file and TSMSG_SECRET")


def test_serve_on_a_busy_port_fails_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        code, _, err = run(capsys, "serve", "--dev", "--port", port, "--data-dir", str(tmp_path))
    assert code == 1 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    reason = f"[Errno {errno.EADDRINUSE}] cannot listen on 127.0.0.1:{port}"
    assert last == f"tsmsg: {reason}: {os.strerror(errno.EADDRINUSE)}"


def test_serve_leaves_the_garbage_collector_as_it_found_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """serve tunes the GC while it serves (cli.GC_GEN0_THRESHOLD, startup objects frozen)
    and puts it back when it returns: main() also runs inside other programs."""
    before = (gc.get_threshold(), gc.get_freeze_count())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        code, _, _ = run(capsys, "serve", "--dev", "--port", port, "--data-dir", str(tmp_path))
    assert code == 1
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_serve_with_a_busy_metrics_port_fails_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        metrics = f"127.0.0.1:{busy.getsockname()[1]}"
        argv = ["serve", "--dev", "--port", "0", "--metrics", metrics, "--data-dir", str(tmp_path)]
        code, _, err = run(capsys, *argv)
    assert code == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(
        f"tsmsg: [Errno {errno.EADDRINUSE}] cannot listen on {metrics}"
    )


def test_serve_without_its_redis_fails_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as closed:  # a port with nothing listening
        closed.bind(("127.0.0.1", 0))
        engine = f"redis://127.0.0.1:{closed.getsockname()[1]}"
        argv = ["serve", "--dev", "--port", "0", "--engine", engine, "--data-dir", str(tmp_path)]
        code, _, err = run(capsys, *argv)
    assert code == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith(f"tsmsg: cannot reach Redis at {engine[8:]}: "), err


def test_serve_refuses_a_data_dir_that_is_a_file_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A data_dir that is a file (or empty) was an errno line naming no setting."""
    a_file = tmp_path / "data"
    a_file.write_text("")
    for data_dir, fragment in ((str(a_file), "is not a directory"), ("", "not empty")):
        for flag in ([], ["--dev"]):
            argv = ["serve", *flag, "--port", "0", "--data-dir", data_dir]
            code, _, err = run(capsys, *argv)
            assert_failure(code, err, "data_dir", fragment)


def test_serve_refuses_reuse_port_without_so_reuseport(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a platform without SO_REUSEPORT, --reuse-port was an AttributeError traceback."""
    monkeypatch.delattr(socket, "SO_REUSEPORT", raising=False)
    argv = ["serve", "--dev", "--reuse-port", "--port", "0", "--data-dir", str(tmp_path)]
    code, _, err = run(capsys, *argv)
    assert_failure(code, err, "reuse_port", "SO_REUSEPORT")


def test_serve_refuses_an_engine_url_with_a_query_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py took a ?key=value as a connection argument: a typo was a TypeError traceback."""
    monkeypatch.setenv("TSMSG_SECRET", SECRET.decode())
    engine = "redis://127.0.0.1:6379?tiemout=1"
    argv = ["serve", "--port", "0", "--engine", engine, "--data-dir", str(tmp_path)]
    code, _, err = run(capsys, *argv)
    assert_failure(code, err, "engine URL", "?")


@pytest.mark.parametrize("depth", ["999999", str(2**70)])
def test_serve_refuses_a_too_deep_max_depth_naming_its_maximum(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, depth: str
) -> None:
    """The decoder's check came first: it named 512 (the documented maximum is 32) and
    past 64 bits raised OverflowError, a traceback."""
    monkeypatch.setenv("TSMSG_SECRET", SECRET.decode())
    monkeypatch.setenv("TSMSG_LIMITS_MAX_DEPTH", depth)
    code, _, err = run(capsys, "serve", "--port", "0", "--data-dir", str(tmp_path))
    assert_failure(code, err, f"max_depth must be <= 32, not {depth}")


@pytest.mark.parametrize("command", ["serve", "inspect", "compact", "token"])
def test_a_missing_config_file_is_named_as_the_config_file(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    """A --config that did not exist was a bare "[Errno 2] No such file or directory"."""
    monkeypatch.setenv("TSMSG_SECRET", SECRET.decode())
    missing = str(tmp_path / "tsmsg.toml")
    extra = ["--user", "alice"] if command == "token" else ["--data-dir", str(tmp_path)]
    for path, reason in ((missing, "No such file or directory"), (str(tmp_path), "Is a directory")):
        code, _, err = run(capsys, command, "--config", path, *extra)
        assert_failure(code, err, f"config file {path}: {reason}")


@pytest.mark.parametrize("limit", ["HEARTBEAT_MS", "MAX_JOINED", "SEND_BURST"])
def test_serve_refuses_a_limit_welcome_cannot_carry(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: str
) -> None:
    """A limit above msgpack's integers started a server whose every welcome failed to
    encode (an internal error on each hello); it is refused at start, in one line."""
    monkeypatch.setenv("TSMSG_SECRET", SECRET.decode())
    monkeypatch.setenv(f"TSMSG_LIMITS_{limit}", str(2**64))
    code, _, err = run(capsys, "serve", "--port", "0", "--data-dir", str(tmp_path))
    assert_failure(code, err, f"{limit.lower()} must be <= {2**63 - 1}, not {2**64}")


def test_serve_refuses_an_incompatible_data_dir(
    capsys: pytest.CaptureFixture[str], bad_format_dir: Path
) -> None:
    code, _, err = run(capsys, "serve", "--dev", "--port", "0", "--data-dir", str(bad_format_dir))
    assert "Traceback" not in err
    assert code == 1
    assert err.splitlines()[-1].startswith("tsmsg: ")
    assert "on-disk format version 99, this tsmsg reads version 2" in err


# ------------------------------------------------------------------ missing and incompatible
# data directories: the same errors for inspect, compact and backup, and nothing created


def data_dir_commands(data_dir: Path, tmp_path: Path) -> list[list[str]]:
    out = str(tmp_path / "backup-out")
    return [
        ["inspect", "--data-dir", str(data_dir)],
        ["inspect", "--data-dir", str(data_dir), "--channel", "room-1", "--json"],
        ["compact", "--data-dir", str(data_dir)],
        ["backup", "--data-dir", str(data_dir), out],
    ]


def test_missing_data_dir_fails_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "missing"
    for argv in data_dir_commands(missing, tmp_path):
        code, out, err = run(capsys, *argv)
        assert out == ""
        assert_failure(code, err, f"no tsmsg data directory at {missing}")
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv in data_dir_commands(empty, tmp_path):
        code, out, err = run(capsys, *argv)
        assert_failure(code, err, f"no tsmsg data directory at {empty} (it has no data.mdb)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert list(empty.iterdir()) == []


def test_incompatible_data_dir_fails_and_is_left_alone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bad_format_dir: Path
) -> None:
    before = digest(bad_format_dir)
    for argv in data_dir_commands(bad_format_dir, tmp_path):
        code, out, err = run(capsys, *argv)
        assert out == ""
        assert_failure(
            code,
            err,
            f"data directory {str(bad_format_dir)!r} has on-disk format version 99, "
            f"this tsmsg reads version {FORMAT_VERSION} (and migrates 1); see STORAGE.md",
        )
    assert digest(bad_format_dir) == before
    assert not (tmp_path / "backup-out").exists()


def test_not_an_lmdb_file_fails_cleanly(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "data.mdb").write_bytes(b"not lmdb at all " * 512)
    for argv in data_dir_commands(junk, tmp_path):
        code, _, err = run(capsys, *argv)
        assert_failure(code, err)
    assert not (tmp_path / "backup-out").exists()


def test_foreign_lmdb_environment_is_not_a_tsmsg_data_dir(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    other = tmp_path / "other"
    env = lmdb.open(str(other))
    with env.begin(write=True) as txn:
        txn.put(b"some", b"thing")
    env.close()
    code, _, err = run(capsys, "inspect", "--data-dir", str(other))
    assert_failure(code, err, "is not a tsmsg data directory")


# ------------------------------------------------------------------ inspect


def test_inspect_prints_environment_and_channel_table(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    before = digest(data_dir)
    code, out, err = run(capsys, "inspect", "--data-dir", str(data_dir))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"data directory  {data_dir}"
    assert f"format version  {FORMAT_VERSION}" in lines
    assert any(line.startswith("map size        64.0 MiB") for line in lines)
    assert any(line.startswith("pages ") and " used (" in line for line in lines)
    assert "read cursors    3 (2 users)" in lines
    assert "dedup journal   31 entries" in lines
    table = lines[lines.index("") + 1 :]
    assert table[0].split() == ["channel", "head", "horizon", "epoch", "entries", "bytes"]
    rows = {row.split()[0]: row.split()[1:] for row in table[1:]}
    room_epoch, dm_epoch = channel_info(data_dir, "room-1")[0], channel_info(data_dir, "dm")[0]
    assert rows["room-1"][:4] == ["32", "0", str(room_epoch), "32"]  # 30 messages, edit, delete
    assert rows["dm"][:4] == ["1", "0", str(dm_epoch), "1"]
    assert digest(data_dir) == before  # inspect wrote nothing


def test_inspect_json(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    code, out, _ = run(capsys, "inspect", "--data-dir", str(data_dir), "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["format"] == FORMAT_VERSION
    assert doc["map_size"] == 64 << 20
    assert doc["used_bytes"] == doc["used_pages"] * doc["page_size"] >= doc["live_bytes"] > 0
    assert doc["file_bytes"] == (data_dir / "data.mdb").stat().st_size
    assert (doc["cursor_users"], doc["cursors"], doc["dedup_entries"]) == (2, 3, 31)
    channels = {c["name"]: c for c in doc["channels"]}
    assert channels["room-1"]["head"] == 32 and channels["room-1"]["entries"] == 32
    assert channels["dm"] == {
        "name": "dm",
        "head": 1,
        "horizon": 0,
        "epoch": channel_info(data_dir, "dm")[0],
        "entries": 1,
        "bytes": channels["dm"]["bytes"],
    }
    assert 8000 > channels["room-1"]["bytes"] > 30 * 80 > channels["dm"]["bytes"] > 0


def test_inspect_tail_of_a_channel(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    code, out, err = run(
        capsys, "inspect", "--data-dir", str(data_dir), "--channel", "room-1", "--tail", "4"
    )
    assert (code, err) == (0, "")
    lines = out.splitlines()
    epoch, p = channel_info(data_dir, "room-1")
    assert lines[0] == f"channel room-1: head 32, horizon 0, epoch {epoch}"
    assert lines[1].split() == ["seq", "kind", "id", "sender", "ts", "text"]
    rows = [line.split(maxsplit=5) for line in lines[2:6]]
    assert [r[:5] for r in rows] == [
        ["29", "message", f"{p}-29", "alice", T0_ISO],
        ["30", "message", f"{p}-30", "bob", T0_ISO],
        ["31", "edit", f"{p}-30", "bob", T0_ISO],
        ["32", "delete", f"{p}-1", "alice", T0_ISO],
    ]
    assert rows[0][5] == "hello 29 " + "x" * 50 + "\u2026"  # truncated to 60 characters
    assert rows[1][5] == "[edited] fixed\\ntypo"  # the message entry holds its latest state
    assert rows[2][5] == "fixed\\ntypo"
    assert len(rows[3]) == 5  # a delete has no text
    assert lines[6:] == ["read cursors:", "  alice\t20", "  bob\t32"]

    code, out, _ = run(capsys, "inspect", "--data-dir", str(data_dir), "--channel", "room-1")
    assert code == 0 and len(out.splitlines()) == 2 + 20 + 3  # --tail defaults to 20
    code, out, _ = run(
        capsys, "inspect", "--data-dir", str(data_dir), "--channel", "room-1", "--tail", "100"
    )
    first = out.splitlines()[2].split()
    assert first[:2] == ["1", "message"] and first[-1] == "[deleted]"


def test_inspect_tail_json_lines(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    code, out, _ = run(
        capsys,
        *["inspect", "--data-dir", str(data_dir), "--channel", "room-1", "--tail", "3", "--json"],
    )
    assert code == 0
    header, *entries = (json.loads(line) for line in out.splitlines())
    assert header == {
        "channel": "room-1",
        "head": 32,
        "horizon": 0,
        "epoch": channel_info(data_dir, "room-1")[0],
        "cursors": {"alice": 20, "bob": 32},
    }
    with LmdbStore(data_dir, FAST) as store:
        expected: list[Entry] = store.sync("room-1", 29, 100).entries
    assert entries == expected
    assert entries[0]["text"] == "fixed\ntypo"  # full text, not truncated


def test_inspect_empty_and_unknown(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    LmdbStore(fresh, FAST).close()
    code, out, _ = run(capsys, "inspect", "--data-dir", str(fresh))
    assert code == 0 and out.splitlines()[-1] == "no channels"
    code, out, err = run(capsys, "inspect", "--data-dir", str(fresh), "--channel", "room-1")
    assert out == ""
    assert_failure(code, err, f"no channel 'room-1' in {fresh}")

    # A format-1 directory from before `members` and `last_seen` existed (STORAGE.md).
    old = tmp_path / "old"
    write_format(old, str(FORMAT_VERSION).encode())
    code, out, _ = run(capsys, "inspect", "--data-dir", str(old), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["channels"] == [] and doc["members"] == 0


def test_inspect_tail_zero_shows_no_entries(
    capsys: pytest.CaptureFixture[str], data_dir: Path
) -> None:
    code, out, _ = run(
        capsys, "inspect", "--data-dir", str(data_dir), "--channel", "dm", "--tail", "0"
    )
    assert code == 0
    assert out.splitlines() == [
        f"channel dm: head 1, horizon 0, epoch {channel_info(data_dir, 'dm')[0]}",
        "no entries",
        "read cursors:",
        "  bob\t1",
    ]


# ------------------------------------------------------------------ compact


def test_compact_prints_each_channel_horizon(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "data"
    with LmdbStore(path, FAST) as store:
        for i in range(1010):  # the default policy keeps the newest 1000 seqs
            store.append("busy", "alice", f"c{i}", f"m{i}")
        store.append("quiet", "bob", "q", "hi")
    code, out, err = run(capsys, "compact", "--data-dir", str(path))
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"busy: {describe_horizon(10)}", f"quiet: {describe_horizon(0)}"]
    assert describe_horizon(0) == "nothing compacted (horizon 0: the whole log is kept)"
    with LmdbReader(path) as reader:
        busy = reader.channel("busy")
    assert busy is not None and busy.horizon == 10

    code, out, _ = run(capsys, "compact", "--data-dir", str(path), "--channel", "quiet")
    assert (code, out) == (0, f"quiet: {describe_horizon(0)}\n")
    code, out, err = run(capsys, "compact", "--data-dir", str(path), "--channel", "nope")
    assert out == ""
    assert_failure(code, err, f"no channel 'nope' in {path}")


def test_compact_applies_the_servers_retention_policy(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, target: Target
) -> None:
    with target.open() as store:
        for i in range(20):
            store.append("busy", "alice", f"c{i}", f"m{i}")
    config = tmp_path / "tsmsg.toml"
    config.write_text(target.toml + "retention_max_count = 5\n")
    code, out, err = run(capsys, "compact", "--config", str(config))
    assert (code, err, out) == (0, "", f"busy: {describe_horizon(15)}\n")
    code, out, _ = run(capsys, "inspect", *target.args, "--channel", "busy", "--json")
    assert [json.loads(line)["seq"] for line in out.splitlines()[1:]] == [16, 17, 18, 19, 20]
    config.write_text(target.toml + "retention_max_count = -1\n")
    code, out, err = run(capsys, "compact", "--config", str(config))
    assert_failure(code, err, "retention_max_count must be >= 0")


def test_compact_with_no_channels(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    LmdbStore(fresh, FAST).close()
    assert run(capsys, "compact", "--data-dir", str(fresh)) == (0, "no channels\n", "")


# ------------------------------------------------------------------ backup


def backup_entries(path: Path, channel: str, upto: int) -> list[Entry]:
    with LmdbStore(path, FAST) as store:
        return store.sync(channel, 0, upto + 1).entries[:upto]


def test_backup_of_a_quiet_data_dir(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path
) -> None:
    out_dir = tmp_path / "empty-out"
    out_dir.mkdir()  # an existing empty directory is fine
    code, out, err = run(capsys, "backup", "--data-dir", str(data_dir), str(out_dir))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    size = (out_dir / "data.mdb").stat().st_size
    assert lines[0].startswith(f"wrote {out_dir / 'data.mdb'}: ")
    assert f"({size} bytes), format {FORMAT_VERSION}, 2 channels" in lines[0]
    assert sorted(lines[1:]) == [
        "  dm\thead=1\thorizon=0\tentries=1",
        "  room-1\thead=32\thorizon=0\tentries=32",
    ]
    assert size < (data_dir / "data.mdb").stat().st_size  # compacted: no free pages
    code, copy_out, _ = run(capsys, "inspect", "--data-dir", str(out_dir), "--json")
    code, src_out, _ = run(capsys, "inspect", "--data-dir", str(data_dir), "--json")
    copy_doc, src_doc = json.loads(copy_out), json.loads(src_out)
    assert copy_doc["channels"] == src_doc["channels"]
    assert copy_doc["dedup_entries"] == src_doc["dedup_entries"]
    assert copy_doc["cursors"] == src_doc["cursors"]
    for channel, head in (("room-1", 32), ("dm", 1)):
        assert backup_entries(out_dir, channel, head) == backup_entries(data_dir, channel, head)


def test_backup_refuses_a_used_target(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path
) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, out, err = run(capsys, "backup", "--data-dir", str(data_dir), str(full))
    assert out == ""
    assert_failure(code, err, f"backup target {full} exists and is not an empty directory")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]

    a_file = tmp_path / "file"
    a_file.write_text("x")
    code, _, err = run(capsys, "backup", "--data-dir", str(data_dir), str(a_file))
    assert_failure(code, err, "exists and is not an empty directory")
    assert a_file.read_text() == "x"


class BusyWriter:
    """Threads appending to two channels (and moving read cursors) until stopped."""

    CHANNELS = ("alpha", "beta")

    def __init__(self, store: LmdbStore) -> None:
        self.store = store
        self.acked = {c: 0 for c in self.CHANNELS}  # the highest seq acknowledged
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, args=(c,), daemon=True) for c in self.CHANNELS
        ]

    def _run(self, channel: str) -> None:
        try:
            i = 0
            while not self.stop.is_set():
                i += 1
                res = self.store.append(channel, "writer", f"{channel}-{i}", f"{channel} {i}")
                self.acked[channel] = res.seq
                if i % 50 == 0:
                    self.store.set_read("reader", channel, res.seq - 10)
        except BaseException as exc:
            self.errors.append(exc)

    def wait_for(self, count: int) -> None:
        deadline = time.monotonic() + 30
        while min(self.acked.values()) < count:
            assert time.monotonic() < deadline and not self.errors, self.errors
            time.sleep(0.01)

    def __enter__(self) -> BusyWriter:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors


@pytest.fixture
def busy_store(tmp_path: Path) -> Iterator[tuple[Path, BusyWriter]]:
    path = tmp_path / "live"
    with LmdbStore(path) as store, BusyWriter(store) as writer:  # fsync, as a server runs
        writer.wait_for(100)
        yield path, writer


def test_backup_while_writes_happen(tmp_path: Path) -> None:
    out_dir = tmp_path / "nested" / "snap"
    path = tmp_path / "live"
    with LmdbStore(path) as store, BusyWriter(store) as writer:
        writer.wait_for(100)
        acked_before = dict(writer.acked)
        proc = run_child("backup", "--data-dir", str(path), str(out_dir))
        acked_during = dict(writer.acked)
        writer.wait_for(max(acked_during.values()) + 20)  # still writing after the copy
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert f"format {FORMAT_VERSION}, 2 channels" in proc.stdout.splitlines()[0]
    assert acked_during != acked_before  # the copy ran while commits happened

    with LmdbReader(out_dir, lock=False) as copy:
        assert copy.format == FORMAT_VERSION
        copied = {c.name: c for c in copy.stats().channels}
    with LmdbStore(out_dir, FAST) as copy_store:  # the copy opens as a data directory
        copy_logs = {c: copy_store.sync(c, 0, 1_000_000).entries for c in BusyWriter.CHANNELS}
    with LmdbStore(path, FAST) as source:
        heads = {c: source.channel(c).head for c in BusyWriter.CHANNELS}
        source_logs = {c: source.sync(c, 0, 1_000_000).entries for c in BusyWriter.CHANNELS}
    for channel in BusyWriter.CHANNELS:
        head = copied[channel].head
        assert acked_before[channel] <= head < heads[channel]
        assert f"  {channel}\thead={head}\thorizon=0\tentries={head}" in proc.stdout
        assert len(copy_logs[channel]) == head
        assert copy_logs[channel] == source_logs[channel][:head]


def test_inspect_while_writes_happen(busy_store: tuple[Path, BusyWriter]) -> None:
    path, writer = busy_store
    acked = dict(writer.acked)
    table = run_child("inspect", "--data-dir", str(path), "--json")
    tail = run_child("inspect", "--data-dir", str(path), "--channel", "alpha", "--tail", "5")
    assert table.returncode == 0 and tail.returncode == 0, table.stderr + tail.stderr
    channels = {c["name"]: c for c in json.loads(table.stdout)["channels"]}
    for name in BusyWriter.CHANNELS:
        assert channels[name]["head"] >= acked[name]
        assert channels[name]["entries"] == channels[name]["head"]
    rows = tail.stdout.splitlines()[2:7]
    seqs = [int(row.split()[0]) for row in rows]
    assert seqs == list(range(seqs[0], seqs[0] + 5)) and seqs[0] >= acked["alpha"] - 4


def test_backup_of_a_missing_or_bad_source_leaves_no_target(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bad_format_dir: Path
) -> None:
    out_dir = tmp_path / "out"
    code, _, err = run(capsys, "backup", "--data-dir", str(tmp_path / "nope"), str(out_dir))
    assert_failure(code, err, "no tsmsg data directory at")
    code, _, err = run(capsys, "backup", "--data-dir", str(bad_format_dir), str(out_dir))
    assert_failure(code, err, "format version 99")
    assert not out_dir.exists()


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    path = tmp_path / "data"
    with LmdbStore(path, FAST) as store:
        for i in range(3000):  # ~400 KB of lines: more than a pipe buffer holds
            store.submit(WriteOp("message", "c", "u", cid=f"c{i}", text="y" * 100))
        store.append("c", "u", "last", "done")
    cmd = [sys.executable, "-m", "tsmsg.cli", "inspect", "--data-dir", str(path)]
    cmd += ["--channel", "c", "--tail", "3001"]
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:  # like `tsmsg inspect ... | head -1`
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("channel c: head 3001")
        proc.stdout.close()
        assert proc.wait(CHILD_TIMEOUT) == 1
        assert proc.stderr.read() == ""


# ------------------------------------------------------------------ every engine


def test_inspect_on_each_engine(capsys: pytest.CaptureFixture[str], target: Target) -> None:
    with target.open(clock=lambda: T0) as store:
        populate_store(store)
    code, out, err = run(capsys, "inspect", *target.args, "--json")
    assert (code, err) == (0, "")
    rows = {c["name"]: c for c in json.loads(out)["channels"]}
    assert {n: (c["head"], c["horizon"], c["entries"]) for n, c in rows.items()} == {
        "room-1": (32, 0, 32),
        "dm": (1, 0, 1),
    }
    assert all(c["epoch"] > 0 and c["bytes"] > 0 for c in rows.values())
    code, out, _ = run(capsys, "inspect", *target.args)
    assert code == 0 and "room-1" in out and "channel  head  horizon" in out

    code, out, _ = run(
        capsys, "inspect", *target.args, "--channel", "room-1", "--tail", "3", "--json"
    )
    header, *entries = (json.loads(line) for line in out.splitlines())
    assert header["head"] == 32 and header["cursors"] == {"alice": 20, "bob": 32}
    assert header["epoch"] == rows["room-1"]["epoch"]
    assert [(e["seq"], e["kind"]) for e in entries] == [
        (30, "message"),
        (31, "edit"),
        (32, "delete"),
    ]
    assert entries[0]["text"] == "fixed\ntypo" and entries[0]["edited"] == T0
    code, out, _ = run(capsys, "inspect", *target.args, "--channel", "room-1", "--tail", "2")
    assert code == 0 and "[edited] fixed\\ntypo" not in out  # the tail is the edit, delete
    assert "alice\t20" in out and "bob\t32" in out
    code, _, err = run(capsys, "inspect", *target.args, "--channel", "nope")
    assert_failure(code, err, "no channel 'nope'")


def dumps(path: Path) -> tuple[list[Any], list[Any]]:
    """An export's channels and users, comparable whatever engine wrote it."""
    channels, users = [], []
    for item in read_export(str(path)):
        if isinstance(item, list):
            users += item
        else:
            channels.append(item)
    return channels, users


@pytest.mark.parametrize("via", ENGINES)
def test_export_round_trip_lmdb_to_an_engine_and_back(
    capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest, tmp_path: Path, via: str
) -> None:
    source = make_target(request, "lmdb", tmp_path / "source")
    with source.open(clock=lambda: T0) as store:
        populate_store(store)
        store.write(WriteOp("member", "room-1", "alice"))
        store.write(WriteOp("member", "dm", "bob"))
        store.write(WriteOp("seen", "", "alice"))
        original = store.lookup_dup("room-1", "bob", "c2")
    first, second = tmp_path / "first.export", tmp_path / "second.export"
    code, out, err = run(capsys, "backup", "--export", *source.args, str(first))
    assert (code, err) == (0, "") and "2 channels, 33 entries, 2 users" in out

    middle = make_target(request, via, tmp_path / "middle")
    code, out, err = run(capsys, "restore", *middle.args, str(first))
    assert (code, err) == (0, "") and "2 channels, 33 entries, 2 users" in out
    with middle.open(clock=lambda: T0) as store:  # answers as the source did
        assert store.lookup_dup("room-1", "bob", "c2") == original
        assert store.append("room-1", "bob", "c2", "again") == original
        assert store.is_member("alice", "room-1") and store.channels_of("bob") == ["dm"]
        assert store.read_cursor("bob", "room-1") == 32 and store.last_seen("alice") == T0
    code, _, err = run(capsys, "backup", "--export", *middle.args, str(second))
    assert (code, err) == (0, "")
    assert dumps(second) == dumps(first)

    back = make_target(request, "lmdb", tmp_path / "back")
    third = tmp_path / "third.export"
    assert run(capsys, "restore", *back.args, str(second))[0] == 0
    assert run(capsys, "backup", "--export", *back.args, str(third))[0] == 0
    assert dumps(third) == dumps(first)
    with back.open(clock=lambda: T0) as store:  # ids clients hold still name their messages
        assert original is not None
        edit = store.edit("room-1", "bob", original.id, "edited after the move")
        assert edit.seq == 33 and store.history("room-1", None, 30).messages[1]["edited"]


@pytest.mark.parametrize("via", ["lmdb", "redis"])
def test_restore_says_whether_the_text_is_stored_encrypted(
    capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest, tmp_path: Path, via: str
) -> None:
    """An export of an encrypted data directory holds plaintext; a restore of it without
    the key file (or into Redis, which has no encryption at rest) stored the text in
    plaintext and said nothing about it."""
    keys = tmp_path / "keys"
    assert run(capsys, "keygen", "--kid", "A", "--encryption-key-file", str(keys))[0] == 0
    sealed = StoreConfig(durability="async", encryption=load_keyring(str(keys)))
    with LmdbStore(tmp_path / "source", sealed, clock=lambda: T0) as store:
        populate_store(store)
    export = tmp_path / "x.export"
    code, _, err = run(
        capsys, "backup", "--export", "--data-dir", str(tmp_path / "source"),
        "--encryption-key-file", str(keys), str(export),
    )  # fmt: skip
    assert (code, err) == (0, "")

    first = make_target(request, via, tmp_path / "first")
    code, out, err = run(capsys, "restore", *first.args, str(export))
    assert code == 0 and "text stored in plaintext" in out
    assert err.startswith("tsmsg: warning: ") and err.count("\n") == 1, err
    assert "stored its text encrypted (key(s) 'A')" in err and "plaintext" in err
    hint = "--encryption-key-file" if via == "lmdb" else "Redis engine has no encryption"
    assert hint in err
    if via == "lmdb":  # with the key file: encrypted again, and said so
        second = tmp_path / "second"
        code, out, err = run(
            capsys, "restore", "--data-dir", str(second), "--encryption-key-file", str(keys),
            str(export),
        )  # fmt: skip
        assert (code, err) == (0, "") and "text stored encrypted with key 'A'" in out
        with LmdbReader(second) as reader:
            assert reader.encryption == ("A",)
            assert "enc" in reader.tail("dm", 1)[1][0]

    # a plaintext source: no warning
    plain = tmp_path / "plain.export"
    with LmdbStore(tmp_path / "plain-source", FAST, clock=lambda: T0) as store:
        populate_store(store)
    assert run(capsys, "backup", "--export", "--data-dir", str(tmp_path / "plain-source"),
               str(plain))[0] == 0  # fmt: skip
    code, out, err = run(capsys, "restore", "--data-dir", str(tmp_path / "third"), str(plain))
    assert (code, err) == (0, "") and "text stored in plaintext" in out


def test_restore_with_new_epochs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path, target: Target
) -> None:
    export = tmp_path / "x.export"
    assert run(capsys, "backup", "--export", "--data-dir", str(data_dir), str(export))[0] == 0
    code, out, err = run(capsys, "restore", "--new-epochs", *target.args, str(export))
    assert (code, err) == (0, "") and "new epochs" in out
    old = next(c for c in dumps(export)[0] if c.name == "dm")
    with target.open() as store:
        info = store.channel("dm")
        dup = store.lookup_dup("dm", "bob", "d1")
        entry = store.sync("dm", 0, 10).entries[0]
    assert info.epoch != old.epoch and info.head == old.head == 1
    assert dup is not None and dup.id == entry["id"] != old.entries[0]["id"]


def test_restore_refuses_a_store_that_is_not_empty(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path, target: Target
) -> None:
    export = tmp_path / "x.export"
    assert run(capsys, "backup", "--export", "--data-dir", str(data_dir), str(export))[0] == 0
    with target.open() as store:
        store.append("other", "carol", "k1", "already here")
    code, out, err = run(capsys, "restore", *target.args, str(export))
    assert out == ""
    assert_failure(code, err, "restore target", "is not empty")
    with target.open() as store:
        assert store.channels() == ["other"]


def test_restore_into_a_missing_parent_names_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path
) -> None:
    """A wrong target is refused in one line naming what is wrong: not the temporary
    ``*.restoring-*`` directory the operator never named."""
    export = tmp_path / "x.export"
    assert run(capsys, "backup", "--export", "--data-dir", str(data_dir), str(export))[0] == 0
    target = tmp_path / "nope" / "data"
    code, out, err = run(capsys, "restore", "--data-dir", str(target), str(export))
    assert out == ""
    assert_failure(code, err, f"no directory {tmp_path / 'nope'}", str(target))
    assert "restoring" not in err


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_restore_refuses_a_damaged_export_and_loads_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, data_dir: Path, target: Target, damage: str
) -> None:
    export = tmp_path / "x.export"
    assert run(capsys, "backup", "--export", "--data-dir", str(data_dir), str(export))[0] == 0
    raw = bytearray(export.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) * 2 // 3]
    else:
        raw[len(raw) // 2] ^= 0x01
    export.write_bytes(bytes(raw))
    code, _, err = run(capsys, "restore", *target.args, str(export))
    assert_failure(code, err, str(export))
    assert "cut short" in err if damage == "truncate" else ("corrupt" in err)
    if target.engine == "lmdb":  # no target, and no half-loaded directory beside it
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "x.export"]
    else:
        with target.open() as store:
            assert store.channels() == []


def test_backup_of_redis_needs_export(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    redis_target = make_target(request, "redis", tmp_path / "unused")
    code, _, err = run(capsys, "backup", *redis_target.args, str(tmp_path / "out"))
    assert_failure(code, err, "use tsmsg backup --export FILE")
    code, _, err = run(capsys, "backup", "--export", *redis_target.args, str(tmp_path))
    assert_failure(code, err, f"export target {tmp_path} exists")
