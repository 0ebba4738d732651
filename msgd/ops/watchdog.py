"""systemd's watchdog: WATCHDOG=1 only while the loop runs and the registry's writes land.

Also the event-loop lag metrics, measured by the same tick.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from msgd.log import get_logger

if TYPE_CHECKING:
    from msgd.ops.metrics import Metrics
    from msgd.ops.systemd import Notifier
    from msgd.registry.service import RegistryService

__all__ = ["HealthProbe", "LoopLagProbe", "run_lag_probe", "run_watchdog"]

log = get_logger("msgd.server")


class LoopLagProbe:
    """Measures how late a periodic callback runs: the event loop's health."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.expected = time.monotonic() + interval

    def tick(self) -> float:
        now = time.monotonic()
        lag = max(0.0, now - self.expected)
        self.expected = now + self.interval
        return lag


class HealthProbe:
    """Whether msgd is healthy enough to send WATCHDOG=1: its loop runs and its writes land.

    check() is called every `tick` seconds from a task on the event loop. Unhealthy is:

    * the loop ran that tick more than `max_lag` seconds late (a loop blocked for longer than
      the watchdog period sends nothing at all: the check never runs);
    * registry changes have been pending for `max_stall` seconds while no batch settled
      (a commit hung in fsync, a database lock held by someone else, a dead writer thread).

    `pending` and `durable` are the registry's public pending() and durable_seq.
    """

    def __init__(
        self,
        tick: float,
        *,
        max_lag: float,
        max_stall: float,
        pending: Callable[[], int],
        durable: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tick = tick
        self.max_lag = max_lag
        self.max_stall = max_stall
        self._pending = pending
        self._durable = durable
        self._clock = clock
        self._lag = LoopLagProbe(tick)
        self._last_durable = durable()
        self._stalled_since: float | None = None

    def check(self) -> tuple[bool, float, float]:
        """(healthy, loop lag of this tick, seconds the writer has made no progress)."""
        lag = self._lag.tick()
        now = self._clock()
        durable = self._durable()
        if self._pending() == 0 or durable != self._last_durable:
            self._stalled_since = None
        elif self._stalled_since is None:
            # Counted from the first tick that saw no progress: errs on the side of pinging.
            self._stalled_since = now
        self._last_durable = durable
        stall = 0.0 if self._stalled_since is None else now - self._stalled_since
        return lag <= self.max_lag and stall < self.max_stall, lag, stall


async def run_watchdog(
    period: float | None,
    notifier: Notifier,
    metrics: Metrics,
    registry: RegistryService,
    on_tick: Callable[[], None],
) -> None:
    """Probe the daemon's health every tick; WATCHDOG=1 only while it is healthy.

    `period` is WatchdogSec (None: no watchdog; the probe still feeds the loop-lag metric and
    STATUS=). Pings go out every period/4 (at most every second), so one withheld ping does
    not by itself make systemd restart us. A loop blocked for the whole period sends nothing;
    a loop more than period/2 late, or registry changes pending for period/2 with no batch
    settling (a hung fsync, a database lock held elsewhere), withholds the pings until it
    recovers, and systemd restarts msgd if that lasts.
    """
    tick = min(1.0, period / 4) if period else 1.0
    limit = period / 2 if period else float("inf")
    probe = HealthProbe(
        tick, max_lag=limit, max_stall=limit, pending=registry.pending,
        durable=lambda: registry.durable_seq,
    )
    if period:
        log.info("watchdog.enabled", period=period, ping_every=tick)
        notifier.watchdog()
    withheld_since: float | None = None
    worst = 0.0
    while True:
        await asyncio.sleep(tick)
        healthy, lag, stall = probe.check()
        metrics.loop_lag.set(lag)
        if lag > worst:
            worst = lag
            metrics.loop_lag_max.set(lag)
        on_tick()  # STATUS= stays current without a datagram per change
        if healthy:
            if period:
                notifier.watchdog()
            if withheld_since is not None:
                withheld_for = round(time.monotonic() - withheld_since, 3)
                log.info("watchdog.resumed", withheld_for=withheld_for)
                withheld_since = None
            continue
        reason = "loop_lag" if lag > limit else "registry_stalled"
        metrics.watchdog_withheld.labels(reason).inc()
        if withheld_since is None:
            withheld_since = time.monotonic()
            log.warning("watchdog.withheld", reason=reason, loop_lag=round(lag, 3),
                        registry_stalled_for=round(stall, 3), pending=registry.pending())


async def run_lag_probe(metrics: Metrics, interval: float = 0.1) -> None:
    """Observe how late a timer every `interval` seconds fires, into a histogram: its p99 is
    what a request waits for the loop (the watchdog's tick is too coarse for that)."""
    probe = LoopLagProbe(interval)
    while True:
        await asyncio.sleep(interval)
        metrics.loop_lag_samples.observe(probe.tick())
