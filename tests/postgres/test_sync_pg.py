"""wire v1.1 registry sync on PostgreSQL (issue 15, step 6): two msgd nodes on one database
answer the same digests, computed there from committed rows; the scenarios of the SQLite
end-to-end tests (tests/sync_scenarios.py), with the takeover made through the other node."""

from __future__ import annotations

from pathlib import Path

import psycopg

from tests import sync_scenarios as scenarios
from tests.harness import connect
from tests.postgres.conftest import pg_node, start_node
from wire.sync import digests_of


async def test_sync_on_two_postgresql_nodes(tmp_path: Path, pki, pg_dsn: str) -> None:
    dep_a = pg_node(tmp_path, pki, pg_dsn, name="node-a", ues=scenarios.SYNC_UES)
    dep_b = pg_node(tmp_path, pki, pg_dsn, name="node-b", like=dep_a)
    node_a, node_b = start_node(dep_a), start_node(dep_b)
    try:
        async def via_a(identity: str):
            return await connect(dep_a, node_a.address, identity=identity)

        async def via_b(identity: str):
            return await connect(dep_b, node_b.address, identity=identity)

        await scenarios.empty_gateway(via_a, "gw2.example")
        mine = await scenarios.ten_differences(dep_a, via_a)
        # Node B answers the same digests, read from the database.
        gw = await via_b("gw1.example")
        try:
            assert (await gw.sync(mine)).in_sync
        finally:
            await gw.close()
        await scenarios.takeover(dep_a, via_a, via_b, base=mine)
        await scenarios.bad_bucket_numbers(dep_b, node_b.address)
        # The database's bucket and ue_hash are those of docs/protocol.md §6.1.
        with psycopg.connect(pg_dsn) as conn:
            rows = conn.execute("SELECT ue_service_id, profile FROM msgd_registration"
                                " WHERE gateway = 'gw1.example'").fetchall()
        gw = await via_a("gw1.example")
        try:
            expected = digests_of(((u.encode(), p and bytes(p)) for u, p in rows), 12)
            assert await node_digests(gw) == expected
        finally:
            await gw.close()
    finally:
        for node in (node_a, node_b):
            assert node.terminate() == 0, node.log_text()[-2000:]
            assert "Traceback" not in node.log_text()


async def node_digests(gw) -> bytes:
    from wire.messages import DigestRequest

    return (await gw.sync_request(lambda tid: DigestRequest(tid, 12))).digests
