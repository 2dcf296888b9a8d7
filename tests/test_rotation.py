"""HS256 secret rotation, end to end: a secret file (``secret_file`` / ``--secret-file``,
one secret per line, the first current, the others previous) or ``TSMSG_SECRET`` with
``TSMSG_SECRET_PREVIOUS``. Over a real ``tsmsg serve`` process: before the rotation only
the old secret's tokens are accepted, during it both, after it only the new one's. And
every bad secret configuration stops ``serve`` (and ``token``) with one clear line that
never contains a secret."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from server_proc import ServerProcess, server_process
from tsmsg import FrameDecoder, encode
from tsmsg.auth import MAX_SECRETS, TokenIssuer, TokenVerifier, parse_secrets
from tsmsg.cli import load_secrets, main
from tsmsg.server.settings import load_settings

OLD = b"old-secret-old-secret-old-secret-0001"
NEW = b"new-secret-new-secret-new-secret-0002"
OTHER = b"other-secret-other-secret-other-0003"


def token(secret: bytes, user: str = "alice") -> str:
    return TokenIssuer(secret).issue(user, ["*"], now=int(time.time()))


def write_secrets(path: Path, *lines: bytes, mode: int = 0o600) -> str:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    path.chmod(mode)
    return str(path)


async def hello(port: int, tok: str) -> dict[str, Any]:
    """The server's answer to a hello with ``tok``: ``welcome`` or an ``error``."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    decoder = FrameDecoder()
    try:
        await stream.send_all(encode({"t": "hello", "v": 1, "token": tok, "rid": 1}))
        with trio.fail_after(10):
            while True:
                data = await stream.receive_some(65536)
                assert data, "server closed without answering hello"
                for frame in decoder.feed(data):
                    if frame.get("rid") == 1:
                        return frame
    finally:
        await stream.aclose()


async def accepted(port: int, secret: bytes) -> bool:
    frame = await hello(port, token(secret))
    if frame["t"] == "error":
        assert frame["code"] == "unauthorized", frame
        assert "signature" in frame["message"], frame
        return False
    assert frame["t"] == "welcome", frame
    return True


async def test_secret_file_rotation_over_a_server_process(tmp_path: Path) -> None:
    secrets = tmp_path / "secret"
    write_secrets(secrets, OLD)
    server = ServerProcess(
        tmp_path / "data", tmp_path / "server.log", "--secret-file", str(secrets), secret=False
    )
    try:
        # Before: the old secret only.
        await server.start()
        assert await accepted(server.port, OLD)
        assert not await accepted(server.port, NEW)

        # During: the new secret first (signs), the old one after it (verifies only).
        write_secrets(secrets, b"# rotation started", NEW, OLD)
        assert await server.terminate() == 0
        await server.restart()
        assert "the current one and 1 previous" in server.log()
        assert await accepted(server.port, OLD)
        assert await accepted(server.port, NEW)
        assert not await accepted(server.port, OTHER)

        # After: the old line removed; its tokens are refused.
        write_secrets(secrets, NEW)
        assert await server.terminate() == 0
        await server.restart()
        assert not await accepted(server.port, OLD)
        assert await accepted(server.port, NEW)
        assert OLD.decode() not in server.log() and NEW.decode() not in server.log()
    finally:
        server.kill()


async def test_env_previous_secret_over_a_server_process(tmp_path: Path) -> None:
    env = {"TSMSG_SECRET": NEW.decode(), "TSMSG_SECRET_PREVIOUS": OLD.decode()}
    async with server_process(
        tmp_path / "data", tmp_path / "server.log", secret=False, env=env
    ) as server:
        assert await accepted(server.port, OLD)
        assert await accepted(server.port, NEW)
        assert not await accepted(server.port, OTHER)


async def test_secret_file_from_the_config_file(tmp_path: Path) -> None:
    secrets = write_secrets(tmp_path / "secret", NEW, OLD)
    config = tmp_path / "tsmsg.toml"
    config.write_text(f'secret_file = "{secrets}"\n')
    async with server_process(
        tmp_path / "data", tmp_path / "server.log", "--config", str(config), secret=False
    ) as server:
        assert await accepted(server.port, OLD)
        assert await accepted(server.port, NEW)


def test_token_signs_with_the_first_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in [k for k in os.environ if k.startswith("TSMSG_")]:
        monkeypatch.delenv(key)
    secrets = write_secrets(tmp_path / "secret", NEW, OLD)
    assert main(["token", "--user", "alice", "--secret-file", secrets]) == 0
    tok = capsys.readouterr().out.strip()
    assert TokenVerifier(NEW).verify(tok, now=int(time.time())).user == "alice"
    # TSMSG_SECRET_FILE works too (the systemd unit's way for an operator's shell).
    monkeypatch.setenv("TSMSG_SECRET_FILE", secrets)
    assert main(["token", "--user", "bob"]) == 0
    tok = capsys.readouterr().out.strip()
    assert TokenVerifier(NEW).verify(tok, now=int(time.time())).user == "bob"


def test_parse_secrets() -> None:
    data = b"# current first\r\n  " + NEW + b"  \r\n\r\n" + OLD + b"\n# end"
    assert parse_secrets(data, "f") == (NEW, OLD)
    assert parse_secrets(NEW, "f") == (NEW,)  # no final newline
    assert load_secrets("", {"TSMSG_SECRET": NEW.decode()}) == (NEW,)
    env = {"TSMSG_SECRET": NEW.decode(), "TSMSG_SECRET_PREVIOUS": OLD.decode()}
    assert load_secrets("", env) == (NEW, OLD)
    env["TSMSG_SECRET_PREVIOUS"] = ""  # empty: rotation over
    assert load_secrets("", env) == (NEW,)
    assert load_secrets("", {}) is None


def secret_file_cases(tmp_path: Path) -> list[tuple[str, dict[str, str], list[str]]]:
    """(secret file or "", environment, fragments of the error)."""
    short = b"too-short-secret"
    many = [b"%02d" % i + NEW[2:] for i in range(MAX_SECRETS + 1)]
    return [
        (write_secrets(tmp_path / "short", NEW, short), {}, ["line 2", "at least 32 bytes"]),
        (write_secrets(tmp_path / "empty"), {}, ["holds no secret"]),
        (write_secrets(tmp_path / "comments", b"# " + NEW), {}, ["holds no secret"]),
        (write_secrets(tmp_path / "many", *many), {}, [f"at most {MAX_SECRETS}"]),
        (
            write_secrets(tmp_path / "open", NEW, mode=0o644),
            {},
            ["accessible by group or others", "chmod 600"],
        ),
        (str(tmp_path / "missing"), {}, ["secret file", "No such file"]),
        (
            write_secrets(tmp_path / "both", NEW),
            {"TSMSG_SECRET": NEW.decode()},
            ["both secret_file and TSMSG_SECRET"],
        ),
        (
            write_secrets(tmp_path / "both2", NEW),
            {"TSMSG_SECRET_PREVIOUS": OLD.decode()},
            ["both secret_file and"],
        ),
        ("", {"TSMSG_SECRET_PREVIOUS": OLD.decode()}, ["TSMSG_SECRET_PREVIOUS is set but"]),
        (
            "",
            {"TSMSG_SECRET": NEW.decode(), "TSMSG_SECRET_PREVIOUS": "short"},
            ["TSMSG_SECRET_PREVIOUS must be at least 32 bytes"],
        ),
    ]


def test_bad_secrets_stop_serve_and_token_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for path, env, fragments in secret_file_cases(tmp_path):
        for key in [k for k in os.environ if k.startswith("TSMSG_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        file_args = ["--secret-file", path] if path else []
        serve = ["serve", "--port", "0", "--data-dir", str(tmp_path / "data"), *file_args]
        for argv in (serve, ["token", "--user", "alice", *file_args]):
            # serve sets the root logger's handler on this test's captured stderr, closed
            # after the test: put the handlers back (a later test's log line failed)
            root = logging.getLogger()
            handlers, level = root.handlers[:], root.level
            try:
                code = main(argv)
            finally:
                root.handlers[:] = handlers
                root.setLevel(level)
            out, err = capsys.readouterr()
            assert code == 1, (argv, env, err)
            assert err.startswith("tsmsg: ") and err.count("\n") == 1, err
            assert "Traceback" not in err
            for fragment in fragments:
                assert fragment in err, (argv, err)
            for secret in (NEW, OLD, b"too-short-secret"):
                assert secret.decode() not in err + out
    assert not (tmp_path / "data").exists()  # serve stopped before opening the store


def test_secret_file_setting_checks(tmp_path: Path) -> None:
    env = {"TSMSG_SECRET_FILE": "/run/credentials/tsmsg.service/secret"}
    settings = load_settings(None, env)
    assert settings.secret_file == "/run/credentials/tsmsg.service/secret"
    env["TSMSG_PUBLIC_KEY_FILE"] = "/etc/tsmsg/issuer.pem"
    with pytest.raises(ValueError, match="exclude each other"):
        load_settings(None, env)
