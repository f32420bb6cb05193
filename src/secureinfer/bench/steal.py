"""CPU time the hypervisor gave to other guests while a run was timed (Linux's "steal" in /proc/stat).

On a shared VM this project's two-process schemes varied ~3x from hour to hour while `plain` held. A
bench that records steal per run lets a reader tell a slow hour the host caused from a slow runner: a high
share means the vCPUs waited for the host, a share near 0 rules that out (memory-bandwidth neighbours,
for one, do not show here). Elsewhere (no /proc/stat) every figure is None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
# The aggregate "cpu" line's columns, in clock ticks: user nice system idle iowait irq softirq steal guest
# guest_nice. guest and guest_nice are already inside user and nice, so the total stops at steal.
STEAL_COLUMN = 7


@dataclass(frozen=True)
class CpuTimes:
    steal: int
    total: int


def parse_cpu_times(stat_text: str) -> CpuTimes | None:
    """The all-CPU line of a /proc/stat text; None when it has none (or too few columns for a steal figure)."""
    for line in stat_text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            ticks = [int(value) for value in fields[1:]]
            if len(ticks) <= STEAL_COLUMN:
                return None
            return CpuTimes(steal=ticks[STEAL_COLUMN], total=sum(ticks[: STEAL_COLUMN + 1]))
    return None


def read_cpu_times() -> CpuTimes | None:
    try:
        return parse_cpu_times(PROC_STAT.read_text())
    except OSError:
        return None


def steal_share(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """The share of all CPUs' time between two readings that was stolen; None without both readings or with no
    tick between them (a run shorter than a clock tick says nothing)."""
    if before is None or after is None or after.total <= before.total:
        return None
    return (after.steal - before.steal) / (after.total - before.total)
