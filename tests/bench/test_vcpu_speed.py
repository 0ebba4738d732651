"""bench/vcpu_speed.py: the share of a window the CPUs ran slowed, against their full speed."""

from __future__ import annotations

import os
import time

from bench.vcpu_speed import SLOW, SpeedProbe, quiet_latencies, summarize


def _samples(slow: range, slow_ns: int = 170_000) -> list[tuple[float, int]]:
    """100 samples 10 ms apart (10 bins of 100 ms), 100 µs each but those in `slow`."""
    return [(0.0 if i == 0 else i * 0.01 + 0.005, slow_ns if i in slow else 100_000)
            for i in range(100)]


def test_the_reference_is_full_speed_even_when_most_of_the_window_is_slowed() -> None:
    reading = summarize(_samples(range(30, 90)))  # bins 3..8 slowed: 60 % of the window
    assert reading["samples"] == 100 and reading["reference_us"] == 100.0
    assert reading["slow_share"] == 0.6
    assert reading["median_ratio"] == 1.7


def test_a_bin_at_the_threshold_is_slowed_and_one_below_is_not() -> None:
    at = summarize(_samples(range(50, 60), slow_ns=int(100_000 * SLOW)))
    below = summarize(_samples(range(50, 60), slow_ns=int(100_000 * SLOW) - 1_000))
    assert (at["slow_share"], below["slow_share"]) == (0.1, 0.0)


def test_no_samples_no_reading() -> None:
    assert summarize([])["slow_share"] is None


def test_the_probes_read_every_cpu_of_the_run() -> None:
    with SpeedProbe() as speed:
        deadline = time.perf_counter() + 0.3
        while time.perf_counter() < deadline:  # the measured window, busy as a run would be
            sum(i * i for i in range(1000))
    assert speed.result is not None
    per_cpu = speed.result["per_cpu"]
    assert set(per_cpu) == {str(cpu) for cpu in os.sched_getaffinity(0)}
    for reading in per_cpu.values():
        assert reading["samples"] >= 5 and reading["reference_us"] > 0
        assert 0.0 <= reading["slow_share"] <= 1.0
    assert 0.0 <= speed.result["slow_share"] <= 1.0


def test_quiet_requests_are_those_with_no_slowed_bin_since_a_second_before_they_fell_due() -> None:
    # Two CPUs watched from t = 100.0 to 103.0; CPU 1 slowed in [101.5, 101.6).
    bins = [[100.0 + k * 0.1, 1.0] for k in range(30)]
    slowed = [[start, 1.8 if abs(start - 101.5) < 1e-9 else ratio] for start, ratio in bins]
    result = {"per_cpu": {"0": {"bins": bins}, "1": {"bins": slowed}}}
    timeline = [
        (100.5, 0.010),  # due before a second was watched: left out
        (101.2, 0.050),  # answered by 101.25: quiet
        (101.45, 0.060),  # answered at 101.51, in the slowed bin: not quiet
        (102.55, 0.020),  # the slowed bin ended within the second before: not quiet
        (102.65, 0.030),  # a full second after it: quiet
        (102.99, 0.200),  # answered after the watch ended: left out
    ]
    reading = quiet_latencies(timeline, result)
    assert reading["n"] == 2 and reading["share"] == 2 / 6
    assert (reading["p50_ms"], reading["p99_ms"]) == (30.0, 50.0)
