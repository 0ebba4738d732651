"""The overload policy (msgd.server.overload), sans-IO: numbers in, decisions out.

The policy is fed samples with explicit times; nothing sleeps. Each test names the
docs/protocol.md §7 rule it holds.
"""

from __future__ import annotations

import math

import pytest

from msgd.config import OverloadConfig, parse_config
from msgd.errors import ConfigError
from msgd.server.overload import OverloadPolicy

CONFIG = OverloadConfig(max_delay=0.1, max_loop_lag=0.05, min_backlog=10,
                        min_retry_after=0.02, max_retry_after=5.0, quiet=1.0)


def busy_policy(rate: float, now: float = 0.0) -> OverloadPolicy:
    """A policy that measured `rate` changes/s over one busy second ending at `now`."""
    policy = OverloadPolicy(CONFIG, now - 2)
    policy.sample(now - 1, loop_lag=0.0, durable=0, pending=1, owed=0)
    policy.sample(now, loop_lag=0.0, durable=int(rate), pending=0, owed=0)
    assert policy.drain_rate == rate
    return policy


def test_room_is_the_bound_less_the_backlog() -> None:
    # No measurement yet: min_backlog is admitted.
    policy = OverloadPolicy(CONFIG, 0.0)
    assert policy.bound() == 10
    assert policy.room(0) == 10 and policy.room(7) == 3 and policy.room(12) == 0
    # 1000 changes/s drained: 0.1 s of queue is 100 changes.
    policy = busy_policy(1000.0)
    assert policy.bound() == 100
    assert policy.room(40) == 60
    # Answers owed count too, when they exceed the writer's queue.
    policy.sample(1.05, loop_lag=0.0, durable=1000, pending=0, owed=90)
    assert policy.room(40) == 10


def test_drain_rate_is_measured_only_while_there_is_work() -> None:
    policy = busy_policy(1000.0, now=1.0)
    # Idle (nothing pending at the last sample): the rate is kept, not measured as 0.
    policy.sample(2.0, loop_lag=0.0, durable=1000, pending=0, owed=0)
    policy.sample(3.0, loop_lag=0.0, durable=1000, pending=0, owed=0)
    assert policy.drain_rate == 1000.0
    # Work that does not drain (a writer held back): the rate falls towards 0 ...
    policy.sample(4.0, loop_lag=0.0, durable=1000, pending=500, owed=0)
    policy.sample(5.0, loop_lag=0.0, durable=1000, pending=500, owed=0)
    assert policy.drain_rate == 700.0
    for second in range(6, 40):
        policy.sample(float(second), loop_lag=0.0, durable=1000, pending=500, owed=0)
    assert policy.drain_rate < 1.0
    # ... and the bound to min_backlog.
    assert policy.bound() == 10 and policy.room(500) == 0


def test_sustained_loop_lag_sheds_a_growing_share() -> None:
    policy = busy_policy(1000.0)
    # One late sample is a pause, not a queue: the smaller of the last two counts.
    policy.sample(1.05, loop_lag=0.5, durable=1000, pending=0, owed=0)
    assert policy.shed == 0.0
    assert policy.admit(1.05, 0) == (None, None)
    # Late twice in a row: a tenth of new requests is refused, spread evenly ...
    policy.sample(1.10, loop_lag=0.06, durable=1000, pending=0, owed=0)
    assert policy.shed == 0.1
    verdicts = [policy.admit(1.1, 0)[0] for _ in range(20)]
    assert verdicts.count(None) == 18
    # ... with Retry after at least the lag, and the episode's reason says why.
    assert {v for v in verdicts if v is not None} == {60}
    assert policy.reason == "loop_lag"
    # Every late sample sheds more, up to a half ...
    for step in range(4):
        policy.sample(1.15 + step * 0.05, loop_lag=0.06, durable=1000, pending=0, owed=0)
    assert policy.shed == 0.5
    verdicts = [policy.admit(1.4, 0)[0] for _ in range(10)]
    assert verdicts.count(None) == 5 and set(verdicts) == {None, 60}
    assert policy.session_retry_ms(0) == 60  # most work shed: new sessions too
    # ... and from there the Retry after of these refusals grows by half per late sample,
    # up to max_retry_after.
    policy.sample(1.40, loop_lag=0.06, durable=1000, pending=0, owed=0)
    policy.sample(1.45, loop_lag=0.06, durable=1000, pending=0, owed=0)
    assert policy.shed == 0.5 and math.isclose(policy.shed_retry, 0.02 * 1.5 * 1.5)
    for step in range(30):
        policy.sample(1.5 + step * 0.05, loop_lag=0.06, durable=1000, pending=0, owed=0)
    assert policy.shed_retry == 5.0
    assert set(policy.admit(3.0, 0)[0] for _ in range(4)) == {None, 5000}
    # Every other sample sheds less, down to none, and the Retry after comes down.
    for step in range(25):
        policy.sample(3.0 + step * 0.05, loop_lag=0.0, durable=1000, pending=0, owed=0)
    assert policy.shed == 0.0 and policy.shed_retry < 0.1
    assert policy.admit(4.3, 0) == (None, None)


def test_retry_after_is_the_time_to_drain_to_half_the_bound() -> None:
    policy = busy_policy(1000.0)  # bound 100
    assert policy.retry_after_ms(150) == 100  # (150 - 50) / 1000 s
    assert policy.retry_after_ms(60) == 20  # 10 ms, raised to min_retry_after
    assert policy.retry_after_ms(10_000) == 5000  # 9.95 s, capped at max_retry_after
    # A writer that drains nothing: the longest Retry after.
    stalled = OverloadPolicy(CONFIG, 0.0)
    assert stalled.retry_after_ms(500) == 5000


def test_an_episode_starts_at_the_first_refusal_and_ends_when_quiet() -> None:
    policy = busy_policy(1000.0, now=10.0)
    assert policy.session_retry_ms(0) is None  # not overloaded: sessions welcome
    started = policy.refused(10.1, 3, "backlog")
    assert started is not None and started.started and started.reason == "backlog"
    assert policy.refused(10.5, 4, "backlog") is None  # the same episode
    # New sessions are refused while every new request is (the backlog at its bound), and
    # their refusal does not prolong the episode ...
    assert policy.session_retry_ms(150) == 100
    # ... but not in a milder overload: they share the refusals with the others.
    assert policy.session_retry_ms(99) is None
    assert policy.sample(11.4, loop_lag=0.0, durable=2000, pending=0, owed=0) is None
    ended = policy.sample(11.5, loop_lag=0.0, durable=2000, pending=0, owed=0)
    assert ended is not None and not ended.started
    assert ended.refused == 3 + 4 + 1 and math.isclose(ended.duration, 1.4)
    assert policy.session_retry_ms(150) is None  # over: no episode
    assert policy.session_retry_ms(0) is None


def test_disabled_never_refuses() -> None:
    policy = OverloadPolicy(OverloadConfig(enabled=False, min_backlog=1), 0.0)
    policy.sample(1.0, loop_lag=10.0, durable=0, pending=10**6, owed=10**6)
    assert policy.room(10**6) > 10**9
    assert policy.session_retry_ms(10**6) is None


def test_admit_takes_a_request_while_there_is_room() -> None:
    policy = busy_policy(1000.0, now=1.0)  # bound 100
    assert policy.admit(1.0, 99) == (None, None)
    retry, episode = policy.admit(1.01, 150)
    assert retry == 100 and episode is not None and episode.started
    assert policy.admit(1.02, 150) == (100, None)  # the same episode


_CONFIG = """\
[tls]
certificate = "server.pem"
private_key = "server.key"
gateway_ca = "ca.pem"
[registry]
path = "registry.sqlite"
[provisioning]
file = "ues.csv"
"""


def test_overload_table_defaults_values_and_mistakes(tmp_path) -> None:
    def parse(table: str):
        return parse_config(_CONFIG + "[overload]\n" + table, tmp_path, check_files=False)

    assert parse("").overload == OverloadConfig()
    assert OverloadConfig().max_delay == 0.25 and OverloadConfig().min_backlog == 8192
    config = parse("enabled = false\nmax_delay = 0.5\nmax_loop_lag = 0.2\nmin_backlog = 10\n"
                   "min_retry_after = 0.1\nmax_retry_after = 60\nquiet = 0\n").overload
    assert config == OverloadConfig(False, 0.5, 0.2, 10, 0.1, 60.0, 0.0)
    for table, key in (("max_delay = 0", "overload.max_delay"),
                       ("min_backlog = 0", "overload.min_backlog"),
                       ("enabled = 1", "overload.enabled"),
                       ("max_retry_after = 0.01", "overload.min_retry_after"),
                       ("max_dealy = 1", "max_dealy")):
        with pytest.raises(ConfigError, match=key):
            parse(table + "\n")
