"""C++ kernels for the small ops around each outsourced product, compiled once per machine.

A decode step crosses the boundary 121 times a token with one row each, so the steps around each product cost
their number of torch ops (~2-8 us each), not their arithmetic. Each kernel file here does one such step in one
pass. torch's C++ extension loader builds it on first use (~25 s with g++ and ninja) and caches the build; where
it cannot build, callers run the same step in torch, and tests hold the two to the same bits.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from types import ModuleType

# Set to 0 to run every step in torch (to compare, or where no C++ compiler may run).
NATIVE_ENV = "SECUREINFER_NATIVE"


@functools.cache
def build(source: str) -> tuple[ModuleType | None, str]:
    """(the compiled module of the kernel file `source` beside this one, "built"), or (None, why it is not)."""
    if os.environ.get(NATIVE_ENV, "1") == "0":
        return None, f"{NATIVE_ENV}=0"
    from torch.utils.cpp_extension import load

    path = Path(__file__).with_name(source)
    try:
        return load(f"secureinfer_{path.stem}", [str(path)], extra_cflags=["-O3"], verbose=False), "built"
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as error:  # no compiler or ninja, a failed build
        return None, f"{type(error).__name__}: {error}"[:300]


def status(source: str) -> dict:
    """Whether the kernel file `source` runs compiled here, and why not if it does not (`SecureLM.stats()`)."""
    module, reason = build(source)
    return {"compiled": module is not None, "reason": reason}


def statuses() -> dict[str, dict]:
    """`status` of every kernel file here, building each that has not been (`make install` prints this)."""
    return {path.name: status(path.name) for path in sorted(Path(__file__).parent.glob("*.cpp"))}
