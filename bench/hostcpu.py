"""Where a phase's CPU went: the whole host's, and a process tree's (PostgreSQL's).

Ratios against a ceiling say how far msgd is from it; these say whether the host had any CPU
left to go further. A process tree's time is its processes' own plus what their reaped
children used (`cutime`, `cstime`): a PostgreSQL backend that ended during the phase counts.
A live process's time is read to the nanosecond, a reaped child's in the kernel's 10 ms ticks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK")
_CPUCLOCK_SCHED = 2  # Linux: a CPU clock of the whole process, in scheduler time


def host_busy_s() -> float:
    """CPU seconds all cores have spent on anything but idle, I/O wait and steal since boot
    (steal is time the hypervisor gave away: no process of ours has it)."""
    return _host()[0]


def _host() -> tuple[float, float]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user already)
    idle, iowait, steal = fields[3], fields[4], fields[7]
    return (sum(fields[:8]) - idle - iowait - steal) / _TICK, steal / _TICK


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


def process_cpu_s(pid: int) -> float:
    """CPU seconds of process `pid`, ended threads included, to the nanosecond: its
    process-wide CPU clock (the clock id glibc's `clock_getcpuclockid` makes; /proc's stat
    counts in 10 ms ticks, too coarse for a quick run's phases)."""
    try:
        return time.clock_gettime(((~pid) << 3) | _CPUCLOCK_SCHED)
    except OSError:
        return 0.0  # ended meanwhile


def tree_cpu_s(*roots: int, exclude: frozenset[int] = frozenset()) -> float:
    """CPU seconds of the processes `roots` and their descendants (but the trees of
    `exclude`, unless one is a root), reaped children included, from one listing of /proc. A
    child reaped between the reads of its parent and of itself would be missed, so the
    parents' reaped-children times are read again and the walk repeated when they moved."""
    for _attempt in range(5):
        total, reaped = _walk(roots, exclude)
        if sum(_stat_reaped_s(pid) for pid in reaped) == sum(reaped.values()):
            break
    return total


def _stat_reaped_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / _TICK  # cutime cstime


def _walk(roots: tuple[int, ...], exclude: frozenset[int]) -> tuple[float, dict[int, float]]:
    tree = _children()
    total, reaped, todo = 0.0, {}, list(roots)
    while todo:
        pid = todo.pop()
        if pid in exclude and pid not in roots:
            continue
        reaped[pid] = _stat_reaped_s(pid)
        total += process_cpu_s(pid) + reaped[pid]
        todo.extend(tree.get(pid, ()))
    return total, reaped


@dataclass
class CpuMeter:
    """Started at a phase's start, `read(units)` at its end: cores used and µs per unit."""

    trees: dict[str, list[int]]  # name -> root pids
    # pids whose trees count only where they are a root (PostgreSQL, if adopted by the client)
    exclude: set[int] = field(default_factory=set)
    started: float = 0.0
    host0: float = 0.0
    steal0: float = 0.0
    tree0: dict[str, float] | None = None

    def __post_init__(self) -> None:
        self.started = time.perf_counter()
        self.host0, self.steal0 = _host()
        self.tree0 = {name: self._tree(roots) for name, roots in self.trees.items()}

    def _tree(self, roots: list[int]) -> float:
        return tree_cpu_s(*roots, exclude=frozenset(self.exclude))

    def read(self, units: int, reported: dict[str, float] | None = None) -> dict[str, Any]:
        """Cores and µs per unit of each tree since the start, and of the `reported` CPU
        seconds of processes that have ended by now (and so cannot be read here)."""
        wall = time.perf_counter() - self.started
        host_now, steal_now = _host()
        host = host_now - self.host0
        assert self.tree0 is not None
        used = {name: self._tree(roots) - self.tree0[name] for name, roots in self.trees.items()}
        used.update(reported or {})
        out: dict[str, Any] = {"cores": os.cpu_count(), "host_busy_cores": host / wall,
                               "steal_cores": (steal_now - self.steal0) / wall}
        for name, seconds in used.items():
            out[f"{name}_s"] = seconds
            out[f"{name}_cores"] = seconds / wall
            out[f"{name}_us_per_ue"] = seconds / units * 1e6 if units else None
        rest = host - sum(used.values())
        out["rest_cores"] = rest / wall
        out["rest_us_per_ue"] = rest / units * 1e6 if units else None
        return out
