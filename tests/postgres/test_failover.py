"""Failover without loss (issue 14): a primary with a synchronous standby
(synchronous_standby_names), a node on a multi-host DSN with target_session_attrs=read-write,
the primary crashes in the middle of a bulk registration and the standby is promoted
(`pg_ctl promote`). Every UE the node acknowledged is on the new primary, and the node moved
there by itself. Both servers are throw-away clusters of this test (tests/pgcluster.py).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import psycopg

from msgd.gateway import ConnectionLost, UeResult
from tests.harness import ChildServer, connect
from tests.pgcluster import PgCluster, cluster_root
from tests.postgres.conftest import pg_node, start_node
from wire.constants import FailureCause

GW1 = "gw1.example"
N = 20_000  # enough that the crash lands while the node still has entries to decide
KILL_AT = 2_000


def _wait_sync(primary: PgCluster, name: str, timeout: float = 60.0) -> None:
    """Until the primary reports `name` as its synchronous standby, streaming."""
    deadline = time.monotonic() + timeout
    while True:
        rows = primary.sql("SELECT state, sync_state FROM pg_stat_replication "
                           f"WHERE application_name = '{name}'")
        if rows == [("streaming", "sync")]:
            return
        assert time.monotonic() < deadline, f"standby {name} not synchronous: {rows}"
        time.sleep(0.05)  # polling the primary for a condition, bounded


async def _promote_once_away(child: ChildServer, standby: PgCluster,
                             timeout: float = 60.0) -> None:
    """Promote `standby` once the node has logged that it cannot reach a primary."""
    deadline = time.monotonic() + timeout
    while "event=registry.unavailable" not in child.log_text():
        assert time.monotonic() < deadline, "the node never found the primary gone"
        await asyncio.sleep(0.02)  # polling the node's log for a condition, bounded
    await asyncio.to_thread(standby.promote)


async def test_promoting_the_synchronous_standby_mid_bulk_loses_nothing_acknowledged(
        tmp_path: Path, pki) -> None:
    root = cluster_root()
    primary = PgCluster(root, name="primary")
    standby = PgCluster(root, name="standby")
    child: ChildServer | None = None
    try:
        def build() -> str:
            primary.init().start()
            database = primary.create_database()
            standby.standby_of(primary, name="standby1").start()
            # Only now: with no standby connected, every commit would wait for one.
            primary.configure("synchronous_standby_names = 'standby1'")
            primary.sql("SELECT pg_reload_conf()")
            _wait_sync(primary, "standby1")
            return database

        database = await asyncio.to_thread(build)
        dsn = (f"postgresql://{primary.user}:{primary.password}@127.0.0.1:{primary.port},"
               f"127.0.0.1:{standby.port}/{database}?target_session_attrs=read-write")
        uids = [f"fo-{i:05d}@example" for i in range(N)]
        dep = pg_node(tmp_path, pki, dsn, name="node-a", ues={u: [GW1] for u in uids})
        child = await asyncio.to_thread(start_node, dep)

        results: dict[str, UeResult] = {}
        after_promotion = 0  # successes answered once the standby was promoted
        gw = await connect(dep, child.address, GW1, busy_retries=60)
        try:
            promotion: asyncio.Task[None] | None = None
            async for result in gw.bulk_register([dep.ue(u) for u in uids[:-1]]):
                results[result.ue_service_id] = result
                if len(results) == KILL_AT:
                    # A crash (no shutdown checkpoint, clients cut off), now, while the
                    # node has entries in flight; the promotion follows in the background,
                    # once the node has found no primary to reconnect to (promoted at once,
                    # the standby could take the node's first reconnect: a run on a fast
                    # machine never saw the database away).
                    primary.stop("immediate")
                    promotion = asyncio.create_task(_promote_once_away(child, standby))
                elif promotion is not None and promotion.done() and result.ok:
                    after_promotion += 1
            assert promotion is not None
            await promotion
            # And a single registration afterwards: the node is on the new primary.
            last = await gw.register(dep.ue(uids[-1]))
            results[last.ue_service_id] = last
            assert last.ok, last
        except ConnectionLost as exc:  # pragma: no cover - would fail below, with the cause
            raise AssertionError(f"the node dropped its gateway: {exc}") from exc
        finally:
            await gw.close()

        acked = {u for u, r in results.items() if r.ok}
        failed = {u: r for u, r in results.items() if not r.ok}
        assert len(results) == N
        # Only the group in flight at the crash may fail, with STORAGE_FAILURE (its commit
        # is unknown to the node); SERVER_BUSY was retried by the gateway until promotion.
        assert all(r.cause == FailureCause.STORAGE_FAILURE for r in failed.values()), failed
        assert len(failed) <= 2_000  # [registry] max_batch: one group, the one in flight
        # The node moved to the promoted standby by itself: UEs after the crash succeeded.
        assert after_promotion > 0 and len(acked) > KILL_AT
        with psycopg.connect(standby.dsn(database)) as conn:
            assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            stored = {row[0] for row in conn.execute(
                "SELECT ue_service_id FROM msgd_registration").fetchall()}
            writers = conn.execute("SELECT count(*) FROM pg_stat_activity "
                                   "WHERE application_name = 'msgd'").fetchone()
            assert uids[-1] in stored
        lost = acked - stored
        assert not lost, f"{len(lost)} acknowledged UEs missing on the new primary"
        assert writers is not None and writers[0] >= 1
        log = child.log_text()
        # Away, then back (the node also logs "available" when it opens the registry).
        away = log.index("event=registry.unavailable")
        assert "event=registry.available" in log[away:]
        assert child.terminate() == 0
        assert "Traceback" not in child.log_text()
        print(f"failover: {len(acked)} acknowledged ({after_promotion} after the promotion), "
              f"{len(failed)} STORAGE_FAILURE (the group in flight), 0 lost")
    finally:
        if child is not None and child.proc is not None and child.proc.poll() is None:
            child.kill9()
        for cluster in (standby, primary):
            await asyncio.to_thread(cluster.stop, "immediate")
        shutil.rmtree(root, ignore_errors=True)
