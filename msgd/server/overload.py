"""The overload contract's policy: accept new work, or refuse it with a Retry after.

Sans-IO (time comes in as `now`, measurements as numbers): the daemon feeds it a sample every
`SAMPLE_INTERVAL` seconds (`sample`) and asks it, for each new request (a single request, or
a bulk request at its start: the entries of a bulk already accepted are accepted work, paced by
TCP flow control), whether to take it (`admit`: None, or the Retry after to refuse it with).
docs/protocol.md §7 is the contract it implements:

* the backlog is the larger of the registry writer's queue (changes submitted, not yet
  durable) and the answers owed to gateways (decided or not, not yet sent);
* the drain rate is how fast the writer made changes durable while it had work, smoothed;
  backlog / drain rate is how long new work would queue behind what is accepted already;
* new work is refused while that exceeds `max_delay` (above `min_backlog`, always allowed);
* while the event loop runs more than `max_loop_lag` late in two samples in a row (the queue
  is then in the sockets, where the backlog cannot see it; one late sample is a pause, not a
  queue), a share of new work is refused, spread evenly, raised by 0.1 per such sample and
  lowered by 0.05 per other, up to a half; at a half, the Retry after of these refusals
  grows by half per late sample (and shrinks by 30 % per other), so that gateways stay away
  long enough for the load to fall: it settles where the loop keeps up;
* Retry after is the time the backlog needs to drain to half its bound at the drain rate
  (the loop lag at least), within [min_retry_after, max_retry_after];
* an episode starts with the first refusal and ends `quiet` seconds after the last; it is
  logged once each way. During one, new sessions are refused (GOODBYE(OVERLOADED)) while all
  new requests are refused (backlog) or at least half of them (loop lag).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from msgd.config import OverloadConfig

__all__ = ["SAMPLE_INTERVAL", "Episode", "OverloadPolicy"]

# Seconds between samples: short enough that a burst is seen within a few of its requests'
# latency budget (max_delay), long enough to cost nothing measurable.
SAMPLE_INTERVAL = 0.05
# Weight of the newest drain-rate measurement: a few samples (a fraction of a second) follow
# a change of capacity, one slow commit does not halve the estimate.
_SMOOTHING = 0.3
# Steps of the share shed for loop lag, per sample: from none to the cap in 0.25 s of lag,
# back in 0.5 s without (slower down than up: a loop that just caught up is near its limit).
_SHED_UP = 0.1
_SHED_DOWN = 0.05
# The largest share shed; from there new sessions are refused too, and Retry after grows by
# _GROW per late sample (shrinks by _SHRINK per other): 50 ms to 30 s in about 0.8 s.
_SHED_MAX = 0.5
_SESSION_SHED = _SHED_MAX
_GROW = 1.5
_SHRINK = 0.7


class Episode(NamedTuple):
    """An overload episode that started or ended (for the log line and the gauge)."""

    started: bool
    at: float
    reason: str  # what was over its bound when it started ("backlog", "loop_lag")
    refused: int  # requests and sessions refused during it (0 when it starts)
    duration: float  # seconds (0 when it starts)


class OverloadPolicy:
    """The measured state and the decisions; one per daemon, on the event loop's thread."""

    def __init__(self, config: OverloadConfig, now: float) -> None:
        self.config = config
        self.drain_rate = 0.0  # changes made durable per second, while there was work
        self.loop_lag = 0.0  # seconds late: the smaller of the last two samples (sustained)
        self._last_lag = 0.0
        self.owed = 0  # answers owed to gateways, of the last sample
        self.overloaded = False
        self.reason = ""
        self._since = now
        self._last_refusal = -math.inf
        self._refused = 0
        self._last_at = now
        self._last_done: int | None = None
        self._last_backlog = 0
        self.shed = 0.0  # share of new requests refused for loop lag, 0.._SHED_MAX
        self.shed_retry = config.min_retry_after  # their Retry after (s): grows at the cap
        self._shed_credit = 0.0

    # --- measurements -----------------------------------------------------------------------

    def sample(
        self, now: float, *, loop_lag: float, durable: int, pending: int, owed: int
    ) -> Episode | None:
        """Take one sample: the loop's lateness, the registry's durable seq (monotonic),
        its pending changes and the answers owed. Returns the episode that ended, if any."""
        elapsed = now - self._last_at
        if self._last_done is not None and elapsed > 0 and self._last_backlog > 0:
            # Only while there was work: an idle writer's rate says nothing of its capacity.
            measured = (durable - self._last_done) / elapsed
            self.drain_rate = (measured if self.drain_rate == 0.0 else
                               (1 - _SMOOTHING) * self.drain_rate + _SMOOTHING * measured)
        self._last_at = now
        self._last_done = durable
        self._last_backlog = pending
        self.loop_lag = min(loop_lag, self._last_lag)
        self._last_lag = loop_lag
        self.owed = owed
        # The share shed for loop lag: up while the loop is late, down while it is not, so
        # that what is taken settles where the loop keeps up (refusing everything at once
        # would only trade latency for idle gaps: the gateways all come back together).
        # At the cap, Retry after grows instead: a refusal costs the loop about half what an
        # accepted request does (TLS, framing, the answer), so past a point only gateways
        # staying away longer lower the load (measured: shedding up to all of it kept 981 of
        # 8,210 reg/s at twice the load).
        config = self.config
        if config.enabled and self.loop_lag > config.max_loop_lag:
            if self.shed >= _SHED_MAX:
                self.shed_retry = min(config.max_retry_after,
                                      max(config.min_retry_after, self.shed_retry * _GROW))
            self.shed = min(_SHED_MAX, self.shed + _SHED_UP)
        else:
            self.shed = max(0.0, self.shed - _SHED_DOWN)
            self.shed_retry = max(config.min_retry_after, self.shed_retry * _SHRINK)
        if self.overloaded and now - self._last_refusal >= self.config.quiet:
            self.overloaded = False
            return Episode(False, now, self.reason, self._refused, now - self._since)
        return None

    # --- decisions --------------------------------------------------------------------------

    def bound(self) -> int:
        """The backlog above which new work waits longer than max_delay."""
        return max(self.config.min_backlog, int(self.drain_rate * self.config.max_delay))

    def admit(self, now: float, pending: int) -> tuple[int | None, Episode | None]:
        """One new request, with the writer's `pending` changes: (None, None) to take it,
        else (Retry after in ms, the episode this refusal starts or None). Refused: all while
        the backlog is at its bound; `shed` of them, spread evenly, while the loop lags."""
        if not self.room(pending):
            return self.retry_after_ms(pending), self.refused(now, 1, "backlog")
        if self.shed:
            self._shed_credit += self.shed
            if self._shed_credit >= 0.999_999:  # (ten times 0.1 is not quite 1.0)
                self._shed_credit -= 1.0
                retry = max(self.retry_after_ms(pending),
                            math.ceil(min(self.shed_retry, self.config.max_retry_after) * 1000))
                return retry, self.refused(now, 1, "loop_lag")
        return None, None

    def room(self, pending: int) -> int:
        """How many more entries the backlog has room for now (0: refuse new work)."""
        if not self.config.enabled:
            return 1 << 62
        return max(0, self.bound() - max(pending, self.owed))

    def retry_after_ms(self, pending: int) -> int:
        """When refused work should come back: the backlog drained to half its bound."""
        config = self.config
        excess = max(pending, self.owed) - self.bound() / 2
        if excess <= 0:
            wait = 0.0
        elif self.drain_rate > 0:
            wait = excess / self.drain_rate
        else:
            wait = config.max_retry_after  # nothing drains (a stalled writer): the longest
        wait = max(wait, self.loop_lag, config.min_retry_after)
        return math.ceil(min(wait, config.max_retry_after) * 1000)

    def refused(self, now: float, count: int, reason: str) -> Episode | None:
        """`count` pieces of work were refused: returns the episode if this starts one."""
        self._last_refusal = now
        if self.overloaded:
            self._refused += count
            return None
        self.overloaded = True
        self._since = now
        self._refused = count
        self.reason = reason
        return Episode(True, now, self.reason, 0, 0.0)

    def session_retry_ms(self, pending: int) -> int | None:
        """None: a new session is welcome; else the Retry after of its GOODBYE(OVERLOADED).
        Refused only when it must be: during an episode, while every new request is refused
        (the backlog at its bound) or most are (at least half shed for loop lag). In a
        milder overload a new session is taken and its requests share the refusals with the
        others: a gateway must not be locked out for as long as the others keep msgd busy.
        A refused session does not prolong the episode (only refused work does)."""
        if not self.config.enabled or not self.overloaded:
            return None
        if self.shed < _SESSION_SHED and self.room(pending):
            return None
        self._refused += 1
        return self.retry_after_ms(pending)
