"""The open-loop load generator's arrivals: independent gateways, not one shared schedule.

With one schedule for all gateways every gateway fell due at the same instants, and the
server saw bursts of one request per gateway (docs/performance.md, 2026-12-07).
"""

from __future__ import annotations

import itertools
import statistics
from collections import deque

from bench.loadgen import PoissonArrivals

GATEWAYS = 100
RATE_EACH = 2.0  # per second: 200/s in all
SPAN = 50.0  # seconds


def schedule(seed: str = "s") -> list[deque[float]]:
    arrivals = PoissonArrivals(seed, GATEWAYS, RATE_EACH, 1000.0)
    due = [deque() for _ in range(GATEWAYS)]
    # Taken in steps, as the generator's 1 ms ticks take them.
    for step in range(1, 501):
        for index in range(GATEWAYS):
            arrivals.take(index, 1000.0 + SPAN * step / 500, due[index])
    return due


def test_each_gateway_runs_at_its_rate_and_the_sum_at_the_total() -> None:
    due = schedule()
    total = sum(len(times) for times in due)
    assert abs(total - GATEWAYS * RATE_EACH * SPAN) < 0.05 * GATEWAYS * RATE_EACH * SPAN
    for times in due:
        assert list(times) == sorted(times)
        assert all(1000.0 < at <= 1000.0 + SPAN for at in times)
    # Exponential gaps: mean 1/rate, coefficient of variation 1 (a fixed period has 0).
    gaps = [b - a for times in due for a, b in itertools.pairwise(times)]
    mean = statistics.fmean(gaps)
    assert abs(mean - 1 / RATE_EACH) < 0.05 / RATE_EACH
    assert 0.9 < statistics.pstdev(gaps) / mean < 1.1


def test_gateways_do_not_fall_due_together() -> None:
    due = schedule()
    every = sorted(at for times in due for at in times)
    # Poisson at 200/s puts ~2 arrivals in 10 ms; one shared schedule put all 100 there.
    window, most, start = 0.010, 0, 0
    for end, at in enumerate(every):
        while every[start] < at - window:
            start += 1
        most = max(most, end - start + 1)
    assert most < 15
    assert not set(due[0]) & set(due[1])


def test_the_same_seed_gives_the_same_schedule() -> None:
    assert schedule("a") == schedule("a")
    assert schedule("a") != schedule("b")


def test_a_rate_of_zero_sends_nothing() -> None:
    arrivals = PoissonArrivals("s", 3, 0.0, 0.0)
    due: deque[float] = deque()
    for index in range(3):
        arrivals.take(index, 1e9, due)
    assert not due
