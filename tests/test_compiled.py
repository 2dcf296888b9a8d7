"""The hot modules compiled by mypyc (python/tsmsg/compiled.py): used only while every
source matches the digest it was built from, all of them or none."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tsmsg import compiled

BUILT = compiled.MANIFEST.exists()


def module_file(module: str, **env: str) -> str:
    """Where ``module`` is loaded from in a fresh interpreter with ``env``."""
    code = f"import {module} as m; print(m.__file__)"
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.skipif(not BUILT, reason="compiled modules not built (make builds them)")
def test_after_make_the_hot_modules_run_compiled() -> None:
    """`make test` tests what `make run` serves: the compiled modules, up to date (a stale
    build would have made `import tsmsg` warn, an error under pytest's settings)."""
    assert compiled.why_sources is None
    for module in compiled.MODULES:
        file = sys.modules[module].__file__ if module in sys.modules else module_file(module)
        assert file is not None and Path(file).is_relative_to(compiled.OUT_DIR), file


@pytest.mark.skipif(not BUILT, reason="compiled modules not built (make builds them)")
def test_tsmsg_pure_runs_the_sources() -> None:
    file = module_file("tsmsg.server.app", TSMSG_PURE="1")
    assert file == str(compiled.source_of("tsmsg.server.app"))


def write_manifest(path: Path, **changes: object) -> None:
    sources = {m: compiled.digest(file) for m, file in compiled.dependencies().items()}
    manifest = {
        "cache_tag": sys.implementation.cache_tag,
        "modules": list(compiled.MODULES),
        "sources": sources,
        **changes,
    }
    path.write_text(json.dumps(manifest))


def test_a_changed_source_is_named_and_its_build_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = tmp_path / "manifest.json"
    monkeypatch.setattr(compiled, "MANIFEST", manifest)
    monkeypatch.setattr(compiled, "OUT_DIR", tmp_path)
    assert compiled._compiled_files() == "not built (make builds them)"

    write_manifest(manifest)
    sources = json.loads(manifest.read_text())["sources"]
    sources["tsmsg.server.wire"] = "0" * 64  # built from another version of wire.py
    write_manifest(manifest, sources=sources)
    found = compiled._compiled_files()
    assert found == "tsmsg.server.wire changed since they were built (make builds them again)"

    write_manifest(manifest)
    sources = json.loads(manifest.read_text())["sources"]
    sources["tsmsg.auth"] = "0" * 64  # imported by session.py: its types and Final constants
    write_manifest(manifest, sources=sources)
    found = compiled._compiled_files()
    assert found == "tsmsg.auth changed since they were built (make builds them again)"

    write_manifest(manifest, cache_tag="cpython-399")
    tag = sys.implementation.cache_tag
    assert compiled._compiled_files() == f"built for cpython-399, not {tag}"

    write_manifest(manifest, sources={"tsmsg.server.app": "x"})
    assert compiled._compiled_files() == "built for another list of modules"

    write_manifest(manifest)  # up to date, but the files are not there
    found = compiled._compiled_files()
    assert isinstance(found, str) and found.startswith("missing ") and "session" in found

    manifest.write_text("{")
    found = compiled._compiled_files()
    assert isinstance(found, str) and found.startswith("unreadable manifest")


def copy_package(tmp_path: Path) -> Path:
    """A copy of the package with its compiled modules, importable from ``tmp_path``."""
    package = tmp_path / "tsmsg"
    shutil.copytree(compiled.PACKAGE_DIR, package, ignore=shutil.ignore_patterns("__pycache__"))
    return package


def import_copy(tmp_path: Path) -> tuple[str, str, str]:
    """In a fresh interpreter, the copy's ``why_sources``, the file its session came from
    and what it wrote to stderr (the loader's warning)."""
    code = (
        "import tsmsg.protocol.session as s; from tsmsg import compiled; "
        "print(compiled.why_sources); print(s.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(tmp_path), "TSMSG_PURE": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    why, file = out.stdout.splitlines()
    return why, file, out.stderr


@pytest.mark.skipif(not BUILT, reason="compiled modules not built (make builds them)")
def test_a_changed_module_the_compiled_ones_import_is_named_and_the_build_not_used(
    tmp_path: Path,
) -> None:
    """mypyc builds a module against the types and ``Final`` constants of what it imports:
    compiled session.py has auth.py's DM_PREFIX inlined, so after an edit (or an upgrade)
    of auth.py alone the old build would still send a DM's first message without making
    its peer a member. A copy of the package with auth.py changed runs its sources."""
    package = copy_package(tmp_path)
    auth = package / "auth.py"
    text = auth.read_text()
    assert 'DM_PREFIX: Final = "dm:"' in text
    auth.write_text(text.replace('DM_PREFIX: Final = "dm:"', 'DM_PREFIX: Final = "pm:"'))
    why, file, stderr = import_copy(tmp_path)
    assert why == "tsmsg.auth changed since they were built (make builds them again)", why
    assert file == str(package / "protocol" / "session.py")
    assert "tsmsg runs its sources" in stderr


@pytest.mark.skipif(not BUILT, reason="compiled modules not built (make builds them)")
def test_a_build_of_another_list_of_modules_is_not_used_with_a_warning(tmp_path: Path) -> None:
    """An upgrade that compiles another list of modules leaves the old build: the sources
    run until it is compiled again, and the server warns at start (docs/deploy.md 1)."""
    package = copy_package(tmp_path)
    manifest_file = package / "_compiled" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["modules"] = manifest["modules"][:-1]  # built before the poller was compiled
    manifest_file.write_text(json.dumps(manifest))
    why, file, stderr = import_copy(tmp_path)
    assert why == "built for another list of modules", why
    assert file == str(package / "protocol" / "session.py")
    assert "tsmsg runs its sources, not its compiled modules: built for another" in stderr
