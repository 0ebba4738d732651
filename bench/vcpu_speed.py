"""How fast this machine's CPUs ran during a measurement, from inside the guest.

A virtual CPU is not a fixed amount of compute: on the benchmark VM the same work takes 1.6 to
2.1 times as long in stretches of 100 ms to minutes (by its shape, a busy sibling
hyper-thread on the host, invisible to the guest, which reports no steal time), in a fifth to
three quarters of the time, even idle (docs/performance.md, "Where the tail at half load
comes from"). Latency percentiles of a busy event loop follow those stretches, so a run
reports how much of its window ran slowed.

`SpeedProbe` runs one probe process pinned to each CPU the benchmark may use: every 10 ms it
times the CPU time of a fixed piece of Python (~60 µs at full speed; preemption is not
counted, only how fast the CPU ran it). The reference is the tenth percentile of a probe's
own samples (full speed); a 100 ms bin is slowed when its samples take 1.3 × that or more.

`python -m bench.vcpu_speed --seconds 30` reports the machine at rest.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from bench.loadgen import percentile

SLOW = 1.3  # a bin at least this many times the reference is slowed
BIN_S = 0.1
INTERVAL_S = 0.010
WORK_ITERATIONS = 1500


def _work() -> int:
    total = 0
    for i in range(WORK_ITERATIONS):
        total += i * i
    return total


def probe(cpu: int) -> None:
    """Pinned to `cpu`, sample until stdin closes; then print the samples as JSON."""
    os.sched_setaffinity(0, {cpu})
    # Below what it measures: it needs ~0.6 % of a CPU, which a niced task still gets, and
    # preemption does not count in the CPU time it reads.
    os.nice(10)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    print("ready", flush=True)
    while not stop.is_set():
        started = time.perf_counter()
        cpu0 = time.thread_time_ns()
        _work()
        samples.append((started, time.thread_time_ns() - cpu0))
        stop.wait(INTERVAL_S)
    json.dump(samples, sys.stdout)


def summarize(samples: list[tuple[float, int]]) -> dict[str, Any]:
    """One CPU's reading: its reference (full speed), the share of 100 ms bins slowed, and the
    median ratio to the reference."""
    if not samples:
        return {"samples": 0, "reference_us": None, "slow_share": None, "median_ratio": None,
                "bins": []}
    times = sorted(ns for _, ns in samples)
    reference = times[len(times) // 10]
    first = samples[0][0]
    bins: dict[int, list[float]] = {}
    for at, ns in samples:
        bins.setdefault(int((at - first) / BIN_S), []).append(ns / reference)
    means = [statistics.fmean(ratios) for ratios in bins.values()]
    return {"samples": len(samples), "reference_us": reference / 1000,
            "slow_share": sum(1 for m in means if m >= SLOW) / len(means),
            "median_ratio": statistics.median(ns / reference for ns in times),
            # [start, mean ratio] of each bin, on the perf_counter clock every process shares
            "bins": [[first + k * BIN_S, statistics.fmean(ratios)]
                     for k, ratios in sorted(bins.items())]}


def quiet_latencies(timeline: list[tuple[float, float]], result: dict[str, Any],
                    lookback: float = 1.0) -> dict[str, Any]:
    """Of `timeline`'s requests ([due, latency] pairs), those answered while every CPU had
    run at full speed since `lookback` seconds before they fell due (no bin slowed), and
    their latency percentiles: the same run where the machine was quiet."""
    slowed = sorted(start for reading in result["per_cpu"].values()
                    for start, ratio in reading.get("bins") or () if ratio >= SLOW)
    starts = sorted(start for reading in result["per_cpu"].values()
                    for start, _ratio in reading.get("bins") or ())
    quiet: list[float] = []
    if starts:
        watched_from, watched_to = starts[0], starts[-1] + BIN_S
        for due, latency in timeline:
            since, until = due - lookback, due + latency
            if since < watched_from or until > watched_to:
                continue  # not watched all along
            at = bisect.bisect_right(slowed, since - BIN_S)  # the first bin ending after since
            if at < len(slowed) and slowed[at] < until:
                continue  # a slowed bin overlaps [since, until]
            quiet.append(latency)
    quiet.sort()
    return {"lookback_s": lookback, "n": len(quiet),
            "share": len(quiet) / len(timeline) if timeline else None,
            "p50_ms": percentile(quiet, 0.50) * 1000 if quiet else None,
            "p99_ms": percentile(quiet, 0.99) * 1000 if quiet else None}


class SpeedProbe:
    """`with SpeedProbe() as probe: ...` then `probe.result`: per CPU and overall."""

    def __init__(self, cpus: set[int] | None = None) -> None:
        self.cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
        self._procs: list[subprocess.Popen[str]] = []
        self.result: dict[str, Any] | None = None

    def __enter__(self) -> SpeedProbe:
        try:
            for cpu in self.cpus:
                self._procs.append(subprocess.Popen(
                    [sys.executable, "-m", "bench.vcpu_speed", "--probe", str(cpu)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                    cwd=os.path.dirname(os.path.dirname(__file__))))
            for proc in self._procs:
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "ready":  # EOF when it failed
                    raise RuntimeError("a vCPU speed probe did not start")
        except BaseException:
            self._kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        # A probe that failed costs its reading (None), never the measurement around it.
        per_cpu: dict[str, Any] = {}
        for cpu, proc in zip(self.cpus, self._procs, strict=True):
            try:
                out, _ = proc.communicate("", timeout=60)
                per_cpu[str(cpu)] = summarize([tuple(s) for s in json.loads(out)])
            except (subprocess.TimeoutExpired, ValueError, TypeError):
                proc.kill()
                proc.wait()
                per_cpu[str(cpu)] = summarize([])
        shares = [c["slow_share"] for c in per_cpu.values() if c["slow_share"] is not None]
        self.result = {"slow_threshold": SLOW, "per_cpu": per_cpu,
                       "slow_share": statistics.fmean(shares) if shares else None}

    def _kill(self) -> None:
        for proc in self._procs:
            proc.kill()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vcpu_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to watch")
    parser.add_argument("--probe", type=int, help=argparse.SUPPRESS)  # one probe (internal)
    args = parser.parse_args(argv)
    if args.probe is not None:
        probe(args.probe)
        return 0
    with SpeedProbe() as speed:
        time.sleep(args.seconds)  # the measured window: the probes sample meanwhile
    print(json.dumps(speed.result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
