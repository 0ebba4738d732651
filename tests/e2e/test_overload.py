"""The overload contract (docs/protocol.md §7) over real TLS, provoked deterministically.

The registry's writer is held back by the harness (`writer_held`: a writer job that waits, so
nothing becomes durable), and [overload] has tiny thresholds: the backlog then reaches its
bound after `min_backlog` changes, whatever the machine's speed. Waits are bounded polls of
what the server exposes (its metrics), never sleeps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from msgd.gateway import GatewayUe, Trace
from msgd.gateway.errors import HandshakeError, TransactionError
from tests.harness import connect, make_deployment, running_server, writer_held
from wire.constants import ErrorCause, FailureCause

MIN_BACKLOG = 6
MAX_RETRY_MS = 400
# The bound is min_backlog whatever is measured (0.1 ms of work at any rate seen here), and a
# writer held back drains nothing: every Retry after is max_retry_after.
OVERLOAD = f"""
[overload]
max_delay = 0.0001
min_backlog = {MIN_BACKLOG}
min_retry_after = 0.05
max_retry_after = {MAX_RETRY_MS / 1000}
quiet = 1.0
"""


async def _until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """A bounded poll of an observable condition."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


def _refused(server, what: str) -> float:
    return server.metrics.registry.get_sample_value(
        "msgd_overload_refused_total", {"what": what}) or 0.0


def _overloaded(server) -> float:
    return server.metrics.registry.get_sample_value("msgd_overloaded") or 0.0


@pytest.fixture
def dep(tmp_path, pki):
    ues = {f"ue-{i:02d}": ["gw1.example", "gw2.example"] for i in range(40)}
    return make_deployment(tmp_path / "d", pki, ues=ues, extra=OVERLOAD)


def _ues(dep, count: int, first: int = 0) -> list[GatewayUe]:
    return [dep.ue(f"ue-{i:02d}") for i in range(first, first + count)]


async def test_refusals_say_why_and_when_and_recovery(dep, caplog):
    caplog.set_level(logging.INFO, logger="msgd.server")
    ues = _ues(dep, 10)
    async with running_server(dep) as server, await connect(
            dep, server.address, busy_retries=0) as gw, await connect(
            dep, server.address, "gw2.example", busy_retries=0) as other:
        async with writer_held(server.registry):
            # A bulk accepted at its start is accepted work: all its entries are taken (its
            # pace is TCP flow control's), and wait for durability.
            bulk = asyncio.ensure_future(_collect(gw.bulk_register(ues)))
            await _until(lambda: server.registry.pending() == 10, "10 changes pending")
            assert not bulk.done()
            # A whole new request while nothing can be accepted: ERROR(OVERLOADED). (On
            # another connection: answers are sent in request order, so this one's would
            # wait behind the accepted entries above.)
            with pytest.raises(TransactionError) as refused:
                await _collect(other.bulk_register(_ues(dep, 3, first=10)))
            assert refused.value.cause == ErrorCause.OVERLOADED
            assert refused.value.retry_after == MAX_RETRY_MS
            assert _refused(server, "bulk") == 1
            # A single request: SERVER_BUSY with Retry after in its response.
            single = await other.register(dep.ue("ue-20"))
            assert (single.cause, single.retry_after) == (FailureCause.SERVER_BUSY,
                                                          MAX_RETRY_MS)
            assert _refused(server, "single") == 1
            # A new session while every new request is refused: GOODBYE(OVERLOADED) with
            # Retry after.
            with pytest.raises(HandshakeError) as goodbye:
                await connect(dep, server.address, "gw2.example")
            assert goodbye.value.cause == ErrorCause.OVERLOADED
            assert goodbye.value.retry_after == MAX_RETRY_MS
            assert _refused(server, "session") == 1
            assert _overloaded(server) == 1
        results = await bulk
        assert all(r.ok for r in results)  # the accepted work, finished
        assert server.registry.registered_count() == 10
        # Recovery: once the backlog drained and a quiet second passed, the episode ends,
        # sessions are welcome and the refused work is accepted.
        await _until(lambda: _overloaded(server) == 0, "the episode ended")
        async with await connect(dep, server.address, "gw2.example") as gw2:
            assert (await gw2.register(dep.ue("ue-20"))).ok
        rest = await _collect(other.bulk_register(_ues(dep, 3, first=10)))
        assert all(r.ok for r in rest)
        assert server.registry.registered_count() == 14
    # One line when the episode started and one when it ended, not one per refusal.
    events = [r.getMessage() for r in caplog.records if r.name == "msgd.server"]
    assert sum("overload.started" in e for e in events) == 1, events
    assert sum("overload.ended" in e for e in events) == 1, events


async def test_client_backs_off_as_told_and_completes(dep):
    ues = _ues(dep, 30)
    trace: list[Trace] = []
    async with running_server(dep) as server, await connect(
            dep, server.address, tracer=trace.append, busy_retries=100) as gw:
        async with writer_held(server.registry):
            # Single procedures (bulk=False): the first MIN_BACKLOG are taken, the next get
            # SERVER_BUSY with Retry after until the writer is let go.
            run = asyncio.ensure_future(_collect(gw.bulk_register(ues, bulk=False)))
            await _until(lambda: _refused(server, "single") > 0, "a refusal")
        results = await run
    assert sorted(r.ue_service_id for r in results) == [u.ue_service_id for u in ues]
    assert all(r.ok for r in results)
    busy = [t for t in trace if t.event == "busy"]
    assert busy and all(t.retry_after and t.retry_after >= 50 for t in busy)
    sends: dict[str, list[float]] = {}
    for t in trace:
        if t.event == "sent":
            sends.setdefault(t.ue_service_id, []).append(t.time)
    for t in busy:
        later = [s for s in sends[t.ue_service_id] if s > t.time]
        assert later, f"{t.ue_service_id} never sent again"
        # Sent again no sooner than the Retry after (the loop's clock on both sides).
        assert later[0] - t.time >= t.retry_after / 1000, (t, later[0])


async def _collect(results) -> list:
    return [r async for r in results]
