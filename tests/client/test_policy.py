"""The bulking decision of TS 23.554 8.2.X step 1: the pure policy, then the Batcher on a real
msgd (real TLS, real SQLite)."""

from __future__ import annotations

import asyncio

import pytest

from msgd.gateway import ClientError, GatewayUe
from msgd.gateway.batching import Action, Batcher, BulkingPolicy, Plan
from tests.harness import Gw, connect, make_deployment, running_server

KEY = bytes(range(32))
POLICY = BulkingPolicy(min_bulk=4, wait=0.5, max_bulk=10)


@pytest.mark.parametrize(("pending", "now", "due", "allowed", "plan"), [
    pytest.param(0, 0.0, None, True, Plan(Action.WAIT), id="nothing-pending"),
    pytest.param(3, 1.0, 1.5, True, Plan(Action.WAIT, 0, 1.5), id="window-open"),
    pytest.param(3, 1.5, 1.5, True, Plan(Action.INDIVIDUAL, 3), id="window-closed-too-few"),
    pytest.param(4, 1.5, 1.5, True, Plan(Action.BULK, 4), id="window-closed-enough"),
    pytest.param(12, 1.0, 1.5, True, Plan(Action.BULK, 10), id="full-bulk-goes-at-once"),
    pytest.param(12, 1.0, 1.5, False, Plan(Action.INDIVIDUAL, 12), id="bulk-not-allowed"),
])
def test_policy_decisions(pending, now, due, allowed, plan):
    assert POLICY.decide(pending, now=now, due=due, bulk_allowed=allowed) == plan


def test_policy_due_honours_a_shorter_wait_time():
    assert POLICY.due(10.0) == 10.5
    assert POLICY.due(10.0, max_wait=0.1) == pytest.approx(10.1)
    assert POLICY.due(10.0, max_wait=5.0) == 10.5  # the window is the longest wait
    with pytest.raises(ValueError):
        BulkingPolicy(min_bulk=0)
    with pytest.raises(ValueError):
        BulkingPolicy(min_bulk=5, max_bulk=4)


@pytest.fixture
def dep(tmp_path, pki):
    dep = make_deployment(tmp_path / "d", pki, gateways=(
        Gw("gw1.example"), Gw("gw2.example", bulk_allowed=False)))
    dep.write_provisioning((f"b-{i:03d}@gw.example", KEY, ["gw1.example", "gw2.example"])
                           for i in range(40))
    return dep


def _ue(i: int) -> GatewayUe:
    return GatewayUe(f"b-{i:03d}@gw.example", KEY)


async def test_batcher_bulks_what_arrives_together_and_sends_urgent_alone(dep):
    bulks: list[int] = []
    async with running_server(dep) as server, await connect(
            dep, server.address,
            tracer=lambda t: bulks.append(t.count) if t.event == "bulk" else None) as gw:
        async with Batcher(gw, BulkingPolicy(min_bulk=5, wait=0.2, max_bulk=100)) as batcher:
            together = [batcher.register(_ue(i)) for i in range(20)]
            urgent = batcher.register(_ue(20), urgent=True)
            results = await asyncio.gather(*together, urgent)
            assert [r.ue_service_id for r in results] == [_ue(i).ue_service_id
                                                          for i in range(21)]
            assert all(r.ok for r in results)
            assert bulks == [20]  # the twenty in one bulk; the urgent one alone (8.2.7)
            assert batcher.stats == {"bulks": 1, "bulked": 20, "individual": 1}
            # Too few within the window: individual procedures.
            few = await asyncio.gather(*(batcher.deregister(_ue(i)) for i in range(3)))
            assert all(r.ok for r in few)
            assert batcher.stats["individual"] == 4 and bulks == [20]
        assert server.registry.registered_count() == 18


async def test_batcher_refuses_a_second_request_for_a_pending_ue(dep):
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        batcher = Batcher(gw, BulkingPolicy(min_bulk=2, wait=0.2))
        first = asyncio.ensure_future(batcher.register(_ue(1)))
        await asyncio.sleep(0)  # let it be queued (ordering, not timing)
        with pytest.raises(ClientError, match="already pending"):
            await batcher.deregister(_ue(1))
        assert (await first).ok
        await batcher.aclose()


async def test_batcher_goes_individual_when_bulk_is_not_allowed(dep):
    async with (
        running_server(dep) as server,
        await connect(dep, server.address, "gw2.example") as gw,
        Batcher(gw, BulkingPolicy(min_bulk=2, wait=5.0)) as batcher,
    ):
        # A five second window is not waited for: without bulk there is nothing to gather.
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.register(_ue(i)) for i in range(6))), 4.0)
        assert all(r.ok for r in results)
        assert batcher.stats == {"bulks": 0, "bulked": 0, "individual": 6}
