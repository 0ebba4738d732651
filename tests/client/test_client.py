"""msgd.client against the real msgd in this event loop: real TLS on 127.0.0.1, real SQLite.

Splitting, fallback, SERVER_BUSY / OVERLOADED retry-after, GOODBYE, streaming sources and
abandoned runs. Restarts and memory are in test_restart.py / test_memory.py (child process).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import pytest

from msgd.gateway import (
    Backoff,
    GatewaySession,
    GatewayUe,
    Trace,
    UeSourceError,
)
from tests.harness import Gw, connect, make_deployment, running_server
from wire.constants import ErrorCause, FailureCause, TriggeringProtocol, UeType
from wire.messages import PROFILE_SPEC, Profile, encode_group

KEY = bytes(range(32))


def _ues(dep, n: int, prefix: str = "ue", gateways=("gw1.example",)) -> list[GatewayUe]:
    """Provision n UEs (all with KEY) and return them as the gateway sees them."""
    rows = [(f"{prefix}-{i:05d}@gw.example", KEY, gateways) for i in range(n)]
    dep.write_provisioning(rows)
    return [GatewayUe(uid, KEY) for uid, _k, _g in rows]


def _session(dep, server, identity: str = "gw1.example", **kwargs) -> GatewaySession:
    host, port = server.address
    kwargs.setdefault("backoff", Backoff(initial=0.05, maximum=0.5))
    return GatewaySession(host, port, ssl_context=dep.client_ctx(identity),
                          server_hostname="localhost", **kwargs)


def _sample(server, name: str, labels: dict[str, str]) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def dep(tmp_path, pki):
    return make_deployment(tmp_path / "d", pki, gateways=(
        Gw("gw1.example"), Gw("gw2.example", bulk_allowed=False),
        Gw("gw3.example", ue_authentication=False)))


async def test_single_and_bulk_register_deregister(dep):
    ues = _ues(dep, 40)
    profile = Profile(ue_type=UeType.NON_3GPP_UE, triggering_ue_identifier="+15550001",
                      triggering_port=2000, triggering_protocol=TriggeringProtocol.SMS,
                      communication_availability=(86400, 600), maximum_segment_size=1200,
                      application_data=b"\x01\x02")
    first = GatewayUe(ues[0].ue_service_id, KEY, profile)
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        single = await gw.register(first)
        assert single.ok and single.attempts == 1
        stored = server.registry.registration(first.ue_service_id)
        assert stored.gateway == "gw1.example"
        assert stored.profile == encode_group(PROFILE_SPEC, profile)

        stranger = GatewayUe("nobody@gw.example", KEY)
        results = [r async for r in gw.bulk_register([*ues[1:], stranger])]
        assert [r.ue_service_id for r in results] == [u.ue_service_id for u in ues[1:]] + [
            "nobody@gw.example"]
        assert all(r.ok for r in results[:-1])
        assert results[-1].cause is FailureCause.UE_NOT_PROVISIONED
        assert server.registry.registered_count() == 40

        gone = await gw.deregister(ues[0])
        assert gone.ok and server.registry.registration(ues[0].ue_service_id) is None
        results = [r async for r in gw.bulk_deregister(ues)]
        assert [r.cause for r in results] == [FailureCause.NOT_REGISTERED] + [None] * 39
        assert server.registry.registered_count() == 0


async def test_bulk_split_to_max_bulk_entries_in_order(tmp_path, pki):
    dep = make_deployment(tmp_path / "d", pki, limits={"max_bulk_entries": 1000})
    ues = _ues(dep, 4500)
    bulks: list[int] = []

    def tracer(t: Trace) -> None:
        if t.event == "bulk":
            bulks.append(t.count)

    async with running_server(dep) as server, \
            await connect(dep, server.address, tracer=tracer) as gw:
        assert gw.hello_ack.max_bulk_entries == 1000
        results = [r async for r in gw.bulk_register(iter(ues))]
        assert [r.ue_service_id for r in results] == [u.ue_service_id for u in ues]
        # The server refuses a bulk over its limit (TOO_MANY_ENTRIES): every UE succeeding
        # means no transaction was larger than 1000.
        assert all(r.ok for r in results)
        assert bulks == [1000, 1000, 1000, 1000, 500]
        assert _sample(server, "msgd_bulk_entries_total",
                       {"procedure": "bulk_registration"}) == 4500
        assert server.registry.registered_count() == 4500


async def test_falls_back_to_individual_procedures_when_bulk_not_allowed(dep):
    ues = _ues(dep, 300, gateways=("gw2.example",))
    events: list[str] = []
    async with running_server(dep) as server, await connect(
            dep, server.address, "gw2.example", tracer=lambda t: events.append(t.event)) as gw:
        assert not gw.bulk_allowed
        results = [r async for r in gw.bulk_register(ues)]
        assert [r.ue_service_id for r in results] == [u.ue_service_id for u in ues]
        assert all(r.ok for r in results)
        assert "bulk" not in events
        # The server saw 300 individual UE REGISTRATION REQUESTs (8.2.3) and no bulk.
        assert _sample(server, "msgd_procedures_total", {
            "procedure": "registration", "result": "success", "cause": ""}) == 300
        assert _sample(server, "msgd_bulk_entries_total",
                       {"procedure": "bulk_registration"}) == 0
        results = [r async for r in gw.bulk_deregister(ues)]
        assert all(r.ok for r in results) and server.registry.registered_count() == 0


async def test_server_busy_is_retried_after_retry_after(tmp_path, pki):
    # max_pending_writes = 1: while one change waits for its commit, the server answers every
    # other entry SERVER_BUSY with Retry after (wire-v1 §5 Overload).
    dep = make_deployment(tmp_path / "d", pki, limits={"max_pending_writes": 1})
    ues = _ues(dep, 60)
    trace: list[Trace] = []
    async with running_server(dep) as server, await connect(
            dep, server.address, tracer=trace.append, busy_retries=2) as gw:
        results = [r async for r in gw.bulk_register(ues)]
        registered = server.registry.registered_count()
    assert sorted(r.ue_service_id for r in results) == sorted(u.ue_service_id for u in ues)
    busy = [t for t in trace if t.event == "busy"]
    assert busy, "the server never said SERVER_BUSY"
    assert all(t.retry_after and t.retry_after > 0 for t in busy)
    sends: dict[str, list[float]] = {}
    for t in trace:
        if t.event == "sent":
            sends.setdefault(t.ue_service_id, []).append(t.time)
    for t in busy:
        later = [s for s in sends[t.ue_service_id] if s > t.time]
        if later:  # sent again no sooner than Retry after (the loop's clock on both sides)
            assert later[0] - t.time >= t.retry_after / 1000, (t, later[0])
    for r in results:
        attempts = len(sends[r.ue_service_id])
        assert r.attempts == attempts <= 3  # at most busy_retries resends
        if not r.ok:
            assert r.cause is FailureCause.SERVER_BUSY and attempts == 3
    retried = {t.ue_service_id for t in busy}
    assert any(r.ok for r in results if r.ue_service_id in retried)
    assert registered == sum(r.ok for r in results)


async def test_goodbye_overloaded_delays_the_reconnect(tmp_path, pki):
    dep = make_deployment(tmp_path / "d", pki, limits={"max_bulk_entries": 250})
    ues = _ues(dep, 3000)
    # A window of 1000 keeps most UEs unsent when GOODBYE comes: the transactions in
    # progress finish on this connection, the rest must wait for Retry after.
    async with running_server(dep) as server, _session(dep, server, window=1000) as session:
        loop = asyncio.get_running_loop()
        results = []
        said_goodbye_at = None
        async for result in session.bulk_register(ues):
            results.append(result)
            if len(results) == 500:
                said_goodbye_at = loop.time()
                for conn in list(server.connections):
                    conn.goodbye(ErrorCause.OVERLOADED, "test", retry_after=700)
        assert session.connections == 2
        (second,) = server.connections
        # wire-v1 §4.5: no new connection before Retry after.
        assert second.connected_at - said_goodbye_at >= 0.7
    assert [r.ue_service_id for r in results[:500]] == [u.ue_service_id for u in ues[:500]]
    assert sorted(r.ue_service_id for r in results) == sorted(u.ue_service_id for u in ues)
    assert all(r.ok for r in results)


async def test_overloaded_transaction_error_is_retried(dep):
    """ERROR(OVERLOADED, Retry after) on a transaction: the UEs go again after the delay."""
    ues = _ues(dep, 5)
    trace: list[Trace] = []
    async with running_server(dep) as server, await connect(
            dep, server.address, tracer=trace.append) as gw:
        (conn,) = server.connections
        original = conn._on_request
        refused: list[float] = []

        def refuse_once(request, singles):  # the server's own ERROR path, once
            if not refused:
                refused.append(asyncio.get_running_loop().time())
                conn.session.send_error(request.transaction_id, ErrorCause.OVERLOADED,
                                        "busy", retry_after=300)
                return
            original(request, singles)

        conn._on_request = refuse_once
        result = await gw.register(ues[0])
        assert result.ok and result.attempts == 2
        sent = [t.time for t in trace if t.event == "sent"]
        assert len(sent) == 2 and sent[1] - refused[0] >= 0.3


async def test_async_source_that_pauses_is_sent_without_waiting_for_more(dep):
    """A trickling async iterable: what arrived goes out when it pauses (no deadlock)."""
    ues = _ues(dep, 30)
    first_batch_answered = asyncio.Event()

    async def source():
        for ue in ues[:10]:
            yield ue
        await first_batch_answered.wait()  # more only once the first ten are answered
        for ue in ues[10:]:
            yield ue

    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        results = []
        async with asyncio.timeout(20):
            async for result in gw.bulk_register(source()):
                results.append(result)
                if len(results) == 10:
                    first_batch_answered.set()
        assert [r.ue_service_id for r in results] == [u.ue_service_id for u in ues]
        assert all(r.ok for r in results)


async def test_abandoned_run_leaves_the_connection_usable(dep):
    ues = _ues(dep, 6000)
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        stream = gw.bulk_register(ues[:5000])
        async with contextlib.aclosing(stream) as results:
            async for result in results:
                if result.ue_service_id == ues[9].ue_service_id:
                    break
        # The half-sent bulk was ended (ERROR); a new one starts at once on the same session.
        more = [r async for r in gw.bulk_register(ues[5000:])]
        assert len(more) == 1000 and all(r.ok for r in more)
        assert (await gw.register(ues[0])).ok
        assert server.registry.registration(ues[5999].ue_service_id) is not None


async def test_missing_key_stops_the_run_and_names_the_rest(dep):
    ues = _ues(dep, 20)
    keyless = GatewayUe(ues[10].ue_service_id)  # no key, and gw1 must prove every UE
    mixed = [*ues[:10], keyless, *ues[11:]]
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        assert gw.authentication_required
        got = []
        with pytest.raises(UeSourceError) as stopped:
            async for result in gw.bulk_register(mixed):
                got.append(result.ue_service_id)
        assert keyless.ue_service_id in stopped.value.unanswered
        assert "no key" in str(stopped.value)
        # Every UE taken has either a result or a place in `unanswered`, never both.
        assert not set(got) & set(stopped.value.unanswered)
        assert set(got) | set(stopped.value.unanswered) >= {u.ue_service_id for u in ues[:11]}
        assert all(server.registry.registration(uid) is not None for uid in got)


async def test_trusted_gateway_sends_no_credential(dep):
    uids = [f"t-{i}@gw.example" for i in range(5)]
    dep.write_provisioning((uid, secrets.token_bytes(32), ["gw3.example"]) for uid in uids)
    async with running_server(dep) as server, \
            await connect(dep, server.address, "gw3.example") as gw:
        assert not gw.authentication_required
        results = [r async for r in gw.bulk_register(GatewayUe(uid) for uid in uids)]
        assert all(r.ok for r in results)


def test_gateway_ue_checks_its_values():
    with pytest.raises(ValueError, match="32 octets"):
        GatewayUe("a@b", b"short")
    with pytest.raises(ValueError, match="empty"):
        GatewayUe("", KEY)
    with pytest.raises(ValueError, match="control"):
        GatewayUe("a\nb", KEY)
    with pytest.raises(ValueError, match="bad profile"):
        GatewayUe("a@b", KEY, Profile(triggering_port=70000))
    assert KEY.hex() not in repr(GatewayUe("a@b", KEY))


def test_backoff_grows_with_jitter_and_a_cap():
    import random

    backoff = Backoff(initial=0.1, maximum=2.0)
    rng = random.Random(7)
    assert backoff.delay(0) == 0
    for failures, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (6, 2.0), (30, 2.0)):
        delays = [backoff.delay(failures, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # jittered, not lock step


async def test_keepalive_keeps_an_idle_connection(tmp_path, pki):
    # keepalive_interval = 1: a peer that answers nothing is closed after 2 s (wire-v1 §4.4).
    dep = make_deployment(tmp_path / "d", pki, limits={"keepalive_interval": 1})
    ues = _ues(dep, 1)
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        (conn,) = server.connections
        # Idle for three intervals: the point of the test is that time passes.
        await asyncio.sleep(3.0)
        assert gw.is_open and server.connections == {conn}
        assert (await gw.register(ues[0])).ok
