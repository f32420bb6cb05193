"""Benchmarks: timings measured side by side in one run, reported as medians and ratios."""

from __future__ import annotations

import subprocess
from pathlib import Path


def source_commit() -> str | None:
    """The git commit of the code that produced a report, with "+changes" when the tree has edits; None outside a
    checkout. Reports record this, never a path: the committed figures name the code they measured."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "src" / "secureinfer" / "bench").is_dir():
        return None  # installed as a package: whatever repository encloses it is not this code's
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
