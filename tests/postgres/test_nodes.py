"""Two real msgd nodes (child processes, own listener, certificate and control socket) on one
PostgreSQL registry: issue 14's "same promises, several nodes". Gateways speak real mutual
TLS on 127.0.0.1; the database is a throw-away cluster (tests/pgcluster.py).
"""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from msgd.gateway import ConnectionLost, GatewayClient, UeResult
from tests.harness import ChildServer, Deployment, connect
from tests.ops.msgctl import Msgctl, control_ready
from tests.postgres.conftest import node_waits_on_a_lock, pg_node, start_node
from wire.constants import FailureCause

GW1, GW2 = "gw1.example", "gw2.example"
VIA_OTHER = FailureCause.REGISTERED_VIA_OTHER_GATEWAY


@dataclass
class Node:
    dep: Deployment
    child: ChildServer
    msgctl: Msgctl

    async def gateway(self, identity: str) -> GatewayClient:
        return await connect(self.dep, self.child.address, identity)


def owners(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute(
            "SELECT ue_service_id, gateway FROM msgd_registration").fetchall())


async def two_nodes(tmp_path: Path, pki, dsn: str, sock_dir: Path, capsys,
                    ues: dict[str, list[str]]) -> tuple[Node, Node]:
    dep_a = pg_node(tmp_path, pki, dsn, name="node-a", control=sock_dir / "a.ctl", ues=ues)
    dep_b = pg_node(tmp_path, pki, dsn, name="node-b", control=sock_dir / "b.ctl", like=dep_a)
    nodes = []
    for dep, sock in ((dep_a, "a.ctl"), (dep_b, "b.ctl")):
        child = start_node(dep)
        await control_ready(child)
        nodes.append(Node(dep, child, Msgctl(sock_dir / sock, capsys)))
    return nodes[0], nodes[1]


@pytest.fixture
async def nodes(tmp_path: Path, pki, pg_dsn: str, sock_dir: Path,
                capsys) -> AsyncIterator[tuple[Node, Node]]:
    ues = {f"ue-{i:04d}@example": [GW1, GW2] for i in range(2000)}
    node_a, node_b = await two_nodes(tmp_path, pki, pg_dsn, sock_dir, capsys, ues)
    yield node_a, node_b
    for node in (node_a, node_b):
        if node.child.proc is not None and node.child.proc.poll() is None:
            assert node.child.terminate() == 0, node.child.log_text()[-2000:]
        assert "Traceback" not in node.child.log_text()


async def test_a_ue_registered_through_node_a_is_seen_by_node_b_at_once(nodes) -> None:
    node_a, node_b = nodes
    ue = node_a.dep.ue("ue-0001@example")
    gw_a = await node_a.gateway(GW1)
    gw_b = await node_b.gateway(GW1)
    try:
        assert (await gw_a.register(ue)).ok
        # Node B answers from the database: no delay, no cache to wait for.
        code, shown = await node_b.msgctl.json("registry", "show", ue.ue_service_id)
        assert code == 0 and shown["registered"] and shown["gateway"] == GW1
        assert (await gw_b.deregister(ue)).ok
        second = await gw_a.deregister(ue)
        assert second.cause == FailureCause.NOT_REGISTERED
    finally:
        await gw_a.close()
        await gw_b.close()


async def test_takeover_and_registered_via_other_gateway_across_nodes(nodes, pg_dsn) -> None:
    node_a, node_b = nodes
    ue = node_a.dep.ue("ue-0002@example")
    gw1_a = await node_a.gateway(GW1)
    gw2_b = await node_b.gateway(GW2)
    try:
        assert (await gw1_a.register(ue)).ok
        assert (await gw2_b.deregister(ue)).cause == VIA_OTHER
        assert (await gw2_b.register(ue)).ok  # takeover through the other node
        assert (await gw1_a.deregister(ue)).cause == VIA_OTHER
        assert owners(pg_dsn) == {ue.ue_service_id: GW2}
        for node in nodes:
            code, shown = await node.msgctl.json("registry", "show", ue.ue_service_id)
            assert code == 0 and shown["gateway"] == GW2
    finally:
        await gw1_a.close()
        await gw2_b.close()


async def _bulk(client: GatewayClient, ues, register: bool) -> dict[str, UeResult]:
    results: dict[str, UeResult] = {}
    run = client.bulk_register(ues) if register else client.bulk_deregister(ues)
    async for result in run:
        results[result.ue_service_id] = result
    return results


async def test_two_gateways_on_two_nodes_racing_end_with_one_owner_per_ue(
        nodes, pg_dsn) -> None:
    """gw1 through node A registers every UE and then de-registers them; gw2 through node B
    registers them at the same time. Each UE ends with exactly one owner or none, the same
    from both nodes, and as the answers say: gw1's de-registration was
    REGISTERED_VIA_OTHER_GATEWAY exactly when gw2 had taken the UE over before it, in which
    case gw2 owns it; a UE that ends unregistered was de-registered by gw1 with SUCCESS."""
    node_a, node_b = nodes
    rng = random.Random(14)
    uids = [f"ue-{i:04d}@example" for i in range(2000)]
    gw1 = await node_a.gateway(GW1)
    gw2 = await node_b.gateway(GW2)
    try:
        async def first() -> tuple[dict[str, UeResult], dict[str, UeResult]]:
            registered = await _bulk(gw1, [node_a.dep.ue(u) for u in rng.sample(uids, 2000)],
                                     True)
            removed = await _bulk(gw1, [node_a.dep.ue(u) for u in rng.sample(uids, 2000)],
                                  False)
            return registered, removed

        (reg1, dereg1), reg2 = await asyncio.gather(
            first(), _bulk(gw2, [node_b.dep.ue(u) for u in rng.sample(uids, 2000)], True))
    finally:
        await gw1.close()
        await gw2.close()
    final = owners(pg_dsn)
    taken = 0
    for uid in uids:
        assert reg1[uid].ok and reg2[uid].ok, (reg1[uid], reg2[uid])
        assert dereg1[uid].ok or dereg1[uid].cause == VIA_OTHER, dereg1[uid]
        owner = final.get(uid)
        assert owner in (None, GW2), (uid, owner)  # gw1 always de-registered after itself
        if dereg1[uid].cause == VIA_OTHER:
            assert owner == GW2, uid
            taken += 1
        if owner is None:
            assert dereg1[uid].ok, uid
    # Both nodes list the same registrations as the database holds.
    for node in nodes:
        code, out, _err = await node.msgctl("registry", "list")
        assert code == 0
        listed = {line.split()[0] for line in out.splitlines() if line.strip()}
        assert listed == set(final), node.dep.dir
    print(f"taken over before gw1 de-registered: {taken} of {len(uids)}")


async def test_kill9_of_a_node_loses_nothing_acknowledged(nodes, pg_dsn) -> None:
    """A node is killed with SIGKILL in the middle of a bulk registration (while one of its
    groups waits on a row lock the test holds, so the kill is sure to find changes in
    flight): every UE it answered SUCCESS for is in the database, and the other node serves
    them at once."""
    node_a, node_b = nodes
    uids = [f"ue-{i:04d}@example" for i in range(2000)]
    blocker = uids[1900]
    gw1_b = await node_b.gateway(GW1)
    try:
        assert (await gw1_b.register(node_b.dep.ue(blocker))).ok
    finally:
        await gw1_b.close()
    lock = await psycopg.AsyncConnection.connect(pg_dsn)
    await lock.execute("SELECT 1 FROM msgd_registration WHERE ue_service_id = %s FOR UPDATE",
                       (blocker,))
    gw1 = await node_a.gateway(GW1)
    acked: set[str] = set()

    async def bulk() -> None:
        try:
            async for result in gw1.bulk_register([node_a.dep.ue(u) for u in uids]):
                assert result.ok, result
                acked.add(result.ue_service_id)
        except ConnectionLost:
            pass

    running = asyncio.create_task(bulk())
    try:
        await node_waits_on_a_lock(pg_dsn)
        node_a.child.kill9()
        await running
    finally:
        await lock.rollback()
        await lock.close()
        await gw1.close()
    assert 0 < len(acked) < len(uids) and blocker not in acked
    final = owners(pg_dsn)
    assert acked <= set(final) and all(final[u] == GW1 for u in acked)
    # Node B answers for every acknowledged UE: its gateway de-registers them.
    gw1_b = await node_b.gateway(GW1)
    try:
        removed = await _bulk(gw1_b, [node_b.dep.ue(u) for u in sorted(acked)], False)
    finally:
        await gw1_b.close()
    assert all(r.ok for r in removed.values()) and len(removed) == len(acked)


async def test_provisioning_is_the_csv_of_every_node(nodes, tmp_path: Path) -> None:
    """Provisioning comes from [provisioning] file on every node (docs/scale-out.md): admin
    changes, which would live on one node only, are refused with the reason; a UE added to
    the file and reloaded on both nodes can register through either."""
    node_a, node_b = nodes
    rows = tmp_path / "import.csv"
    rows.write_text("ue_service_id,key,gateways\nnew@example," + "ab" * 32 + ",gw1.example\n")
    code, _out, err = await node_a.msgctl("provision", "import", str(rows))
    assert code == 1 and "every node reads the same [provisioning] file" in err
    code, _out, err = await node_b.msgctl("provision", "remove", "ue-0001@example")
    assert code == 1 and "not available with [registry] backend" in err
    # The operator's way: the same file on every node, then a reload of each.
    fresh = {**{u: [GW1, GW2] for u in node_a.dep.keys}, "new@example": [GW1]}
    node_a.dep.write_provisioning(
        (u, node_a.dep.keys.get(u) or bytes(range(32)), gws) for u, gws in fresh.items())
    shutil.copy(node_a.dep.dir / "ues.csv", node_b.dep.dir / "ues.csv")
    for node in nodes:
        assert "2001 UEs provisioned" in await node.msgctl.ok("reload")
    ue = node_a.dep.ue("new@example")
    gw_b = await node_b.gateway(GW1)
    gw_a = await node_a.gateway(GW1)
    try:
        assert (await gw_b.register(ue)).ok
        assert (await gw_a.deregister(ue)).ok
    finally:
        await gw_a.close()
        await gw_b.close()
