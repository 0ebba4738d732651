"""bench/hostcpu.py: a process tree's CPU counts descendants alive and reaped."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.hostcpu import CpuMeter, host_busy_s, tree_cpu_s

# A parent that starts a child burning `BURN` s of CPU and reaps it, then a second child that
# burns as much and waits on stdin: the tree holds one reaped and one live child.
PARENT = """
import subprocess, sys, time
burn = "import time\\nend = time.process_time() + {burn}\\nwhile time.process_time() < end: pass\\n"
subprocess.run([sys.executable, "-c", burn])
live = subprocess.Popen([sys.executable, "-c", burn + "import sys; sys.stdin.read()"],
                        stdin=subprocess.PIPE)
print(live.pid, flush=True)
sys.stdin.read()
live.stdin.close()
live.wait()
"""
BURN = 0.3


def _busy_wait_for(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + 30
    while tree_cpu_s(pid) < seconds:
        assert time.monotonic() < deadline, "the live child never burnt its CPU"
        time.sleep(0.05)  # polling a measurement, not synchronising with the child


def test_a_tree_counts_its_reaped_and_live_children() -> None:
    host0 = host_busy_s()
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(burn=BURN)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        live = int(parent.stdout.readline())
        meter = CpuMeter({"tree": [parent.pid]})
        _busy_wait_for(live, BURN)
        total = tree_cpu_s(parent.pid)
        # Both children's burn, the first one reaped before the line was printed.
        assert 2 * BURN <= total < 2 * BURN + 0.4  # interpreter start-ups; not a double count
        assert host_busy_s() - host0 >= 2 * BURN * 0.9
        # A tree without the live child: the reaped one's time stays, the live one's goes.
        without = tree_cpu_s(parent.pid, exclude=frozenset({live}))
        assert BURN <= without <= total - BURN * 0.9
        reading = meter.read(units=1000)
        assert meter.tree0 is not None
        used = reading["tree_us_per_ue"] * 1000 / 1e6
        assert used >= total - meter.tree0["tree"] - 1e-9
        assert reading["host_busy_cores"] + 0.05 >= reading["tree_cores"] > 0
    finally:
        assert parent.stdin is not None
        parent.stdin.close()
        parent.wait(timeout=30)
