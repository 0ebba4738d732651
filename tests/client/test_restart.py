"""A server restart in the middle of a bulk run: the real `python -m msgd` child process,
killed (-9) or stopped (SIGTERM) and started again on the same port."""

from __future__ import annotations

import asyncio
import itertools
import re

import pytest

from msgd.gateway import Backoff, ConnectionLost, GatewaySession, GatewayUe
from msgd.registry.store import Registry
from tests.harness import ChildServer, connect, make_deployment

KEY = bytes(range(32))
COUNT = 10_000


def _provision(dep, n: int) -> list[str]:
    uids = [f"r-{i:06d}@gw1.example" for i in range(n)]
    lines = ["ue_service_id,key,gateways", *(f"{u},{KEY.hex()},gw1.example" for u in uids)]
    (dep.dir / "ues.csv").write_text("\n".join(lines) + "\n")
    return uids


def _pin_port(dep, port: int) -> None:
    """Restarts must come back where the gateway knows the server is."""
    text = dep.config_path.read_text()
    dep.config_path.write_text(
        re.sub(r'(?m)^listen = ".*"$', f'listen = "127.0.0.1:{port}"', text))


def _registered(dep, uids: list[str]) -> list[str]:
    registry = Registry.open(dep.config().registry.path)
    try:
        return [u for u in uids if (r := registry.registration(u)) is not None
                and r.gateway == "gw1.example"]
    finally:
        registry.close_sync()


@pytest.fixture
def dep(tmp_path, pki):
    return make_deployment(tmp_path / "d", pki)


async def test_kill9_mid_bulk_is_reported_precisely_and_resumable(dep):
    uids = _provision(dep, COUNT)
    child = ChildServer(dep)
    child.start()
    _pin_port(dep, child.port)
    taken: list[str] = []

    def source():
        for uid in uids:
            taken.append(uid)  # what the client has taken from us, in order
            yield GatewayUe(uid, KEY)

    ues = source()
    answered: dict[str, bool] = {}
    try:
        async with await connect(dep, child.address) as gw:
            with pytest.raises(ConnectionLost) as lost:
                async for result in gw.bulk_register(ues):
                    answered[result.ue_service_id] = result.ok
                    if len(answered) == 3_000:
                        child.kill9()
        unanswered = lost.value.unanswered
        # Precisely: every UE taken has a result or is named, never both, never neither.
        assert len(answered) >= 3_000 and all(answered.values())
        assert not set(answered) & set(unanswered)
        assert sorted([*answered, *unanswered]) == sorted(taken)
        assert unanswered == [u for u in taken if u not in answered]  # in our order
        assert [ue.ue_service_id for ue in lost.value.ues] == unanswered
        assert len(taken) < COUNT  # the rest was never taken: it is still in `ues`

        child.start()  # same file, same port
        async with await connect(dep, child.address) as gw:
            again = [r async for r in gw.bulk_register(itertools.chain(lost.value.ues, ues))]
        assert all(r.ok for r in again)
        assert sorted([*answered, *(r.ue_service_id for r in again)]) == uids
    finally:
        if child.proc is not None and child.proc.poll() is None:
            assert child.terminate() == 0
    assert _registered(dep, uids) == uids


async def test_session_resumes_across_a_graceful_restart(dep):
    uids = _provision(dep, COUNT)
    child = ChildServer(dep)
    child.start()
    _pin_port(dep, child.port)
    host, port = child.address
    reconnects: list[float] = []

    async def restart() -> None:
        # SIGTERM: GOODBYE(SHUTTING_DOWN), transactions in progress finish, exit 0; then a
        # new process on the same port. Threads, so this loop keeps serving the client.
        assert await asyncio.to_thread(child.terminate) == 0
        await asyncio.to_thread(child.start)

    results = []
    restarting = None
    try:
        async with GatewaySession(
                host, port, ssl_context=dep.client_ctx(), server_hostname="localhost",
                backoff=Backoff(initial=0.1, maximum=1.0), max_attempts=30, window=2000,
                on_reconnect=lambda _where, delay: reconnects.append(delay)) as session:
            async for result in session.bulk_register(GatewayUe(u, KEY) for u in uids):
                results.append(result)
                if len(results) == 3_000:
                    restarting = asyncio.create_task(restart())
            assert session.connections == 2
        await restarting
    finally:
        if child.proc is not None and child.proc.poll() is None:
            assert child.terminate() == 0
    assert reconnects  # it did wait and come back, by itself
    assert sorted(r.ue_service_id for r in results) == uids  # one result per UE
    assert all(r.ok for r in results)
    assert _registered(dep, uids) == uids
