"""The deployment files in deploy/ cannot rot: the example config loads with the real
settings loader (with the flags the systemd unit adds), names every setting, and the
unit's ExecStart parses with the real ``tsmsg serve`` parser, uses only flags that
``tsmsg serve --help`` lists, and gets every credential it names from a LoadCredential=.
``systemd-analyze verify`` runs on the unit where it exists."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from tsmsg.cli import build_parser, main
from tsmsg.protocol.limits import Limits
from tsmsg.server.settings import Settings, load_settings
from tsmsg.store import LmdbStore

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "tsmsg.service"
CONFIG = DEPLOY / "tsmsg.toml"
CREDENTIALS = "/run/credentials/tsmsg.service"  # what systemd expands %d to
# Flags of `tsmsg serve` and the setting each one sets (cli.cmd_serve's overrides).
FLAG_SETTINGS = {
    "--host": "host",
    "--port": "port",
    "--data-dir": "data_dir",
    "--durability": "durability",
    "--encryption-key-file": "encryption_key_file",
    "--log-format": "log_format",
    "--metrics": "metrics",
    "--secret-file": "secret_file",
    "--tls-cert": "tls_cert_file",
    "--tls-key": "tls_key_file",
    "--tls-client-ca": "tls_client_ca_file",
}
NOT_IN_EXAMPLE = {"dev"}  # a development switch, never in a production config


def unit_entries() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit file (a key may repeat), continuation lines joined."""
    entries: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", UNIT.read_text())
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=value line: {line!r}"
        entries.setdefault(key.strip(), []).append(value.strip())
    return entries


def exec_start() -> list[str]:
    (line,) = unit_entries()["ExecStart"]
    return shlex.split(line)


def unit_overrides() -> dict[str, str]:
    """The settings ExecStart's flags set, %d expanded as systemd does."""
    args = build_parser().parse_args(exec_start()[1:])
    out: dict[str, str] = {}
    for flag, setting in FLAG_SETTINGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            out[setting] = str(value).replace("%d", CREDENTIALS)
    return out


def test_example_config_loads_with_the_units_flags() -> None:
    settings = load_settings(str(CONFIG), {}, unit_overrides())
    assert settings.host == "0.0.0.0"
    assert settings.tls_cert_file and settings.tls_key_file == f"{CREDENTIALS}/tls-key.pem"
    assert settings.secret_file == f"{CREDENTIALS}/secret"
    assert settings.data_dir == "/var/lib/tsmsg"
    assert settings.log_format == "json"
    assert settings.durability == "fsync"
    assert settings.metrics.startswith("127.0.0.1:")


def test_maintenance_commands_load_the_example_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/deploy.md runs ``tsmsg compact --config /etc/tsmsg/tsmsg.toml`` (with the
    server stopped, so without the unit's flags): the example must load on its own. It
    used to set tls_cert_file without tls_key_file, and compact refused it."""
    settings = load_settings(str(CONFIG), {})
    assert settings.tls_key_file == f"{CREDENTIALS}/tls-key.pem"  # what the unit passes too
    data = tmp_path / "data"
    LmdbStore(data).close()
    code = main(["compact", "--config", str(CONFIG), "--data-dir", str(data)])
    assert code == 0, capsys.readouterr().err


def test_example_config_names_every_setting() -> None:
    text = CONFIG.read_text()
    loaded = tomllib.loads(text)
    missing = [
        f.name
        for f in fields(Settings)
        if f.name not in NOT_IN_EXAMPLE
        and f.name != "limits"
        and not re.search(rf"^#? ?{f.name} = ", text, re.MULTILINE)
    ]
    assert not missing, f"settings missing from deploy/tsmsg.toml (set or commented): {missing}"
    limits = loaded["limits"]
    missing = [f.name for f in fields(Limits) if f.name not in limits]
    assert not missing, f"limits missing from deploy/tsmsg.toml's [limits]: {missing}"
    assert Limits(**limits) == Limits()  # the example states the defaults


def test_exec_start_flags_exist() -> None:
    argv = exec_start()
    assert argv[0].endswith("/tsmsg") and argv[1] == "serve"
    args = build_parser().parse_args(argv[1:])  # the real parser: unknown flags exit 2
    assert args.config == "/etc/tsmsg/tsmsg.toml"
    help_text = subprocess.run(
        [sys.executable, "-m", "tsmsg.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    flags = [a for a in argv[2:] if a.startswith("--")]
    assert flags
    for flag in flags:
        assert re.search(rf"(^|\s){re.escape(flag)}\b", help_text), flag


def test_unit_settings() -> None:
    entries = unit_entries()
    one = {key: values[-1] for key, values in entries.items()}
    assert one["User"] == "tsmsg" and one["StateDirectory"] == "tsmsg"
    assert one["ProtectSystem"] == "strict"
    assert one["NoNewPrivileges"] == "yes" and one["PrivateTmp"] == "yes"
    assert one["Restart"] == "on-failure" and one["KillSignal"] == "SIGTERM"
    assert int(one["LimitNOFILE"]) >= 10_000
    # A graceful stop takes up to 2 x shutdown_grace_s (acks, then `bye`) plus the store.
    grace = load_settings(str(CONFIG), {}, unit_overrides()).shutdown_grace_s
    assert int(one["TimeoutStopSec"]) >= 2 * grace + 10
    # Every credential ExecStart reads is loaded from a file.
    loaded = {value.partition(":")[0] for value in entries["LoadCredential"]}
    used = set(re.findall(r"%d/([\w.-]+)", one["ExecStart"]))
    assert used and used <= loaded, (used, loaded)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at this environment's.
    tsmsg = Path(sys.executable).with_name("tsmsg")
    if not tsmsg.exists():
        pytest.skip("no tsmsg script next to the Python executable")
    unit = tmp_path / "tsmsg.service"
    unit.write_text(UNIT.read_text().replace("/opt/tsmsg/venv/bin/tsmsg", str(tsmsg)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Unknown key" not in done.stderr and "Unknown section" not in done.stderr, done.stderr
