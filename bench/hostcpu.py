"""Where a phase's CPU went: the whole host's, and a process tree's (PostgreSQL's).

Ratios against a ceiling say how far msgd is from it; these say whether the host had any CPU
left to go further. A process tree's time is its processes' own plus what their reaped
children used (`cutime`, `cstime`): a PostgreSQL backend that ended during the phase counts.
A live process's time is read to the nanosecond, a reaped child's in the kernel's 10 ms ticks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_CPUCLOCK_SCHED = 2  # Linux: a CPU clock of the whole process, in scheduler time


def host_busy_s() -> float:
    """CPU seconds all cores have spent on anything but idle and I/O wait since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, iowait = fields[3], fields[4]
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    return (sum(fields[:8]) - idle - iowait) / _TICK


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue  # ended meanwhile
            ppid = int(stat.rpartition(")")[2].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def _run_s(pid: int) -> float:
    """CPU seconds of process `pid`, ended threads included, to the nanosecond: its
    process-wide CPU clock (the clock id glibc's `clock_getcpuclockid` makes; /proc's stat
    counts in 10 ms ticks, too coarse for a quick run's phases)."""
    try:
        return time.clock_gettime(((~pid) << 3) | _CPUCLOCK_SCHED)
    except OSError:
        return 0.0  # ended meanwhile


def tree_cpu_s(root: int) -> float:
    """CPU seconds of process `root` and its descendants, reaped children included."""
    tree = _children()
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += _run_s(pid) + (int(fields[13]) + int(fields[14])) / _TICK  # + cutime cstime
        todo.extend(tree.get(pid, ()))
    return total


@dataclass
class CpuMeter:
    """Started at a phase's start, `read(units)` at its end: cores used and µs per unit."""

    trees: dict[str, list[int]]  # name -> root pids
    started: float = 0.0
    host0: float = 0.0
    tree0: dict[str, float] | None = None

    def __post_init__(self) -> None:
        self.started = time.perf_counter()
        self.host0 = host_busy_s()
        self.tree0 = {name: self._tree(roots) for name, roots in self.trees.items()}

    @staticmethod
    def _tree(roots: list[int]) -> float:
        return sum(tree_cpu_s(root) for root in roots)

    def read(self, units: int, reported: dict[str, float] | None = None) -> dict[str, Any]:
        """Cores and µs per unit of each tree since the start, and of the `reported` CPU
        seconds of processes that have ended by now (and so cannot be read here)."""
        wall = time.perf_counter() - self.started
        host = host_busy_s() - self.host0
        assert self.tree0 is not None
        used = {name: self._tree(roots) - self.tree0[name] for name, roots in self.trees.items()}
        used.update(reported or {})
        out: dict[str, Any] = {"cores": os.cpu_count(), "host_busy_cores": host / wall}
        for name, seconds in used.items():
            out[f"{name}_cores"] = seconds / wall
            out[f"{name}_us_per_ue"] = seconds / units * 1e6 if units else None
        rest = host - sum(used.values())
        out["rest_cores"] = rest / wall
        out["rest_us_per_ue"] = rest / units * 1e6 if units else None
        return out
