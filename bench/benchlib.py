"""What every benchmark records about the machine it ran on."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path


def _run(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""


def machine(data_dir: Path | None = None) -> dict[str, str]:
    """CPU model, usable CPUs, platform and, given a data dir, its device and filesystem."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in _run("lscpu").splitlines()
            if line.startswith("Model name:")
        ),
        "unknown",
    )
    info = {"cpu": model, "nproc": _run("nproc").strip(), "platform": platform.platform()}
    if data_dir is not None:
        df = _run("df", "-T", str(data_dir)).splitlines()
        fs = df[-1].split() if len(df) > 1 else ["?", "?"]
        info.update(data_dir_device=fs[0], data_dir_fs=fs[1])
    return info


ANALYSIS = "\n## Analysis"  # a hand-written section below the generated report


def write_report(out: Path, report: str) -> None:
    """Write ``out/results.md``, keeping a hand-written ``## Analysis`` section (where
    the time goes, what to change) across re-runs, then say so."""
    md = out / "results.md"
    old = md.read_text() if md.exists() else ""
    analysis = old[old.index(ANALYSIS) :] if ANALYSIS in old else ""
    md.write_text(report + analysis)
    print(f"wrote {out}/results.md and results.json")
