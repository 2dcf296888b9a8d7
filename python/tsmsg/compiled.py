"""The event loop's hot modules, compiled to C by mypyc (issue 17).

A message costs the server a few µs of Python spread over many small functions (the
session's checks, the connection's and the server's handling, the rate buckets, the
metrics): no single cut removes much of it. mypyc, the compiler of mypy's type-checked
Python, builds C extension modules from these same sources (mypy already checks them in
``make lint``), which run the same code with native calls and attribute access.

``make`` builds them (``python -m tsmsg.build_compiled``) into ``_compiled/`` beside this
file, with a manifest of the SHA-256 of each of their sources and of every tsmsg module
they import (mypyc copies an imported ``Final`` constant into the C). :func:`install`, run
by ``import tsmsg`` before any of them is imported, uses the compiled modules only when
every one of those still matches its digest, and all of them or none (they call each
other natively): after an edit the sources run, with a warning, until ``make`` builds
them again. ``TSMSG_PURE=1`` runs the
sources anyway (py-spy sees into them; a traceback shows every line).
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

# The modules a message goes through on the event loop, in import order. Not (yet)
# tsmsg.server.app, though compiled it about doubles the gain (bench/README.md): a
# coroutine compiled by mypyc 1.18 keeps its locals after it returned, for as long as its
# caller's coroutine lives, so a compiled connection's reader kept its last read's reply
# (a history or sync page) and its last input while idle. Its coroutines stay Python
# until they hold nothing big across their awaits. Those of the modules here are either
# awaited by Python coroutines (which let go of a finished one at once) or one per server.
MODULES = (
    "tsmsg.protocol.ratelimit",
    "tsmsg.protocol.session",
    "tsmsg.server.metrics",
    "tsmsg.server.wire",
    "tsmsg.server.poller",
)
GROUP = "tsmsg_compiled"  # mypyc's shared library of the modules: <GROUP>__mypyc
PACKAGE_DIR = Path(__file__).resolve().parent  # python/tsmsg
OUT_DIR = PACKAGE_DIR / "_compiled"
MANIFEST = OUT_DIR / "manifest.json"
PURE_ENV = "TSMSG_PURE"


def source_of(module: str) -> Path:
    return PACKAGE_DIR.parent.joinpath(*module.split(".")).with_suffix(".py")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file_of(module: str) -> Path | None:
    """The source mypy reads for a tsmsg module (a .py, or the extension's .pyi), if any."""
    path = PACKAGE_DIR.parent.joinpath(*module.split("."))
    for file in (path.with_suffix(".py"), path.with_suffix(".pyi"), path / "__init__.py"):
        if file.is_file():
            return file
    return None


def dependencies() -> dict[str, Path]:
    """:data:`MODULES` and every tsmsg module they import, directly or not (those under
    TYPE_CHECKING too): mypyc compiles a module against the types and the ``Final``
    constants of what it imports (a constant's value is copied into the C), so a
    change to any of them makes the build stale, as a change to the module itself does."""
    found: dict[str, Path] = {}
    todo = list(MODULES)
    while todo:
        module = todo.pop()
        file = None if module in found or not module.startswith("tsmsg.") else _file_of(module)
        if file is None:
            continue
        found[module] = file
        for node in ast.walk(ast.parse(file.read_bytes())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return dict(sorted(found.items()))


class _Finder(importlib.abc.MetaPathFinder):
    """Finds the compiled modules (and their shared library) in ``_compiled/``."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        file = self.files.get(fullname)
        return None if file is None else importlib.util.spec_from_file_location(fullname, file)


def _compiled_files() -> dict[str, Path] | str:
    """The compiled module files by module name, or why they cannot be used."""
    try:
        manifest = json.loads(MANIFEST.read_text())
    except FileNotFoundError:
        return "not built (make builds them)"
    except (OSError, ValueError) as exc:
        return f"unreadable manifest {MANIFEST}: {exc}"
    if manifest.get("cache_tag") != sys.implementation.cache_tag:
        return f"built for {manifest.get('cache_tag')}, not {sys.implementation.cache_tag}"
    digests = manifest.get("sources", {})
    if manifest.get("modules") != list(MODULES) or not set(MODULES) <= set(digests):
        return "built for another list of modules"
    # The modules compiled and every one they import (dependencies(), at build time).
    sources = {m: _file_of(m) for m in digests}
    changed = [m for m, file in sources.items() if file is None or digests[m] != digest(file)]
    if changed:
        return f"{', '.join(changed)} changed since they were built (make builds them again)"
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    files = {m: OUT_DIR.joinpath(*m.split(".")).with_suffix(suffix) for m in MODULES}
    files[f"{GROUP}__mypyc"] = OUT_DIR / f"{GROUP}__mypyc{suffix}"
    missing = [str(f) for f in files.values() if not f.exists()]
    return f"missing {', '.join(missing)}" if missing else files


# Why the sources run, not the compiled modules (None: they run compiled); set by install.
why_sources: str | None = "install() not called"


def install() -> None:
    """Import the compiled modules from now on, if they are up to date; else (or with
    ``TSMSG_PURE=1``) the sources, and :data:`why_sources` says why."""
    global why_sources
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        why_sources = None
        return
    found = f"{PURE_ENV} is set" if os.environ.get(PURE_ENV) else _compiled_files()
    if isinstance(found, str):
        if not found.startswith(("not built", PURE_ENV)):
            message = f"tsmsg runs its sources, not its compiled modules: {found}"
            warnings.warn(message, stacklevel=2)
        why_sources = found
    elif loaded := [m for m in MODULES if m in sys.modules]:
        why_sources = f"{', '.join(loaded)} imported before tsmsg"
    else:
        sys.meta_path.insert(0, _Finder(found))
        why_sources = None


def build() -> None:
    """Compile :data:`MODULES` into ``_compiled/`` and write its manifest (the digests of
    the sources compiled and of those they import, :func:`dependencies`, read before
    compiling: an edit meanwhile shows as a change)."""
    from mypyc.build import mypycify  # the build's tools: not needed to run
    from setuptools import Distribution  # type: ignore[import-untyped]

    # One build at a time (two `make` runs): each replaces the whole of _compiled/.
    with open(PACKAGE_DIR / ".compiled.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sources = {m: digest(file) for m, file in dependencies().items()}
        with tempfile.TemporaryDirectory(prefix="tsmsg-mypyc-") as tmp:
            # A copy of the package, compiled where nothing else is: run in an
            # installed package's site-packages, mypy would take its other modules for
            # the project's.
            root = Path(tmp, "src")
            skip = shutil.ignore_patterns("_compiled", "__pycache__", "*.so")
            shutil.copytree(PACKAGE_DIR, root / "tsmsg", ignore=skip)
            os.chdir(root)  # the module names come from the paths
            extensions = mypycify(
                # lmdb and msgpack have no type information (pyproject.toml says so to
                # mypy, which is not there in an installed package): they return Any
                ["--ignore-missing-imports"]
                + [str(source_of(m).relative_to(PACKAGE_DIR.parent)) for m in MODULES],
                group_name=GROUP,
                target_dir=os.path.join(tmp, "c"),
            )
            dist = Distribution({"name": GROUP, "ext_modules": extensions})
            cmd = dist.get_command_obj("build_ext")
            cmd.build_lib = os.path.join(tmp, "lib")
            cmd.build_temp = os.path.join(tmp, "obj")
            dist.run_command("build_ext")
            shutil.rmtree(OUT_DIR, ignore_errors=True)  # (a running server keeps its files)
            for built in Path(tmp, "lib").rglob("*"):
                if built.is_file():
                    target = OUT_DIR / built.relative_to(Path(tmp, "lib"))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(built, target)  # (/tmp may be another file system)
        manifest = {
            "cache_tag": sys.implementation.cache_tag,
            "modules": list(MODULES),
            "sources": sources,
        }
        partial = MANIFEST.with_suffix(".partial")
        partial.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(partial, MANIFEST)  # last, whole: until then the build reads as missing
