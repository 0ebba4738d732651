"""PostgreSQL away and back under a running msgd node (issue 14, "When PostgreSQL is away"):
entries fail with STORAGE_FAILURE or SERVER_BUSY with Retry after, the node stays up and keeps
its watchdog fed, STATUS= and `msgctl status` say what is wrong, and service resumes by
itself when the database returns. The node has a cluster of its own: this test stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psycopg

from tests.harness import ROOT, ChildServer, connect
from tests.ops.conftest import Manager
from tests.ops.msgctl import Msgctl, control_ready
from tests.pgcluster import PgCluster, cluster_root
from tests.postgres.conftest import node_waits_on_a_lock, pg_node
from wire.constants import FailureCause

GW1 = "gw1.example"
BULK = 4_000  # UEs of the bulk that the crash interrupts
BUSY, STORAGE = FailureCause.SERVER_BUSY, FailureCause.STORAGE_FAILURE


async def scrape(child: ChildServer) -> str:
    """The node's Prometheus metrics, from the address its log names."""
    match = re.search(r"event=metrics\.listening address=(\S+)", child.log_text())
    assert match is not None, "no metrics listener"
    url = f"http://{match.group(1)}/metrics"
    return await asyncio.to_thread(
        lambda: urllib.request.urlopen(url, timeout=10).read().decode())


async def status_line(manager: Manager, fragment: str, timeout: float = 30.0) -> str:
    """The first STATUS= sent after the manager's cursor that contains `fragment`."""
    deadline = time.monotonic() + timeout
    while True:
        for _when, lines in manager.messages[manager.cursor:]:
            for line in lines:
                if line.startswith("STATUS=") and fragment in line:
                    return line
        assert time.monotonic() < deadline, f"no STATUS= with {fragment!r}"
        await asyncio.sleep(0.05)  # polling what systemd received for a condition, bounded


async def test_database_away_then_back(tmp_path: Path, pki, sock_dir: Path, capsys) -> None:
    root = cluster_root()
    cluster = PgCluster(root)
    manager = Manager(sock_dir / "notify")
    child: ChildServer | None = None
    try:
        await asyncio.to_thread(lambda: cluster.init().start())
        dsn = cluster.dsn(await asyncio.to_thread(cluster.create_database))
        dep = pg_node(tmp_path, pki, dsn, name="node-a", control=sock_dir / "a.ctl",
                      ues={f"ue-{i}@example": [GW1] for i in range(BULK + 10)}, metrics=True)
        child = ChildServer(dep, env={"NOTIFY_SOCKET": str(manager.path),
                                      "WATCHDOG_USEC": "2000000"}, provisioning_index=False)
        await asyncio.to_thread(child.start)
        await control_ready(child)
        msgctl = Msgctl(sock_dir / "a.ctl", capsys)
        gw = await connect(dep, child.address, GW1, busy_retries=0)
        try:
            assert (await gw.register(dep.ue("ue-0@example"))).ok

            # PostgreSQL crashes (immediate stop: no goodbye to its clients, no shutdown
            # checkpoint) in the middle of a bulk registration: while a group of it waits on
            # a row lock this test holds, so the crash is sure to find it in flight.
            blocker = f"ue-{BULK}@example"
            assert (await gw.register(dep.ue(blocker))).ok
            lock = await psycopg.AsyncConnection.connect(dsn)
            await lock.execute(
                "SELECT 1 FROM msgd_registration WHERE ue_service_id = %s FOR UPDATE",
                (blocker,))
            acked: set[str] = set()
            failed: set[FailureCause | int | None] = set()
            bulk_gw = await connect(dep, child.address, GW1, busy_retries=0)

            async def bulk() -> None:
                async for result in bulk_gw.bulk_register(
                        dep.ue(f"ue-{i}@example") for i in range(10, BULK + 10)):
                    if result.ok:
                        acked.add(result.ue_service_id)
                    else:
                        failed.add(result.cause)

            running = asyncio.create_task(bulk())
            try:
                await node_waits_on_a_lock(dsn)
                await asyncio.to_thread(cluster.stop, "immediate")
                await running
            finally:
                await bulk_gw.close()
                with contextlib.suppress(psycopg.Error):
                    await lock.close()
            assert 0 < len(acked) < BULK and blocker not in acked
            assert failed and failed <= {STORAGE, BUSY}, failed
            first = await gw.register(dep.ue("ue-1@example"))
            assert first.cause in (STORAGE, BUSY), first
            # Once the writer found it cannot reconnect: SERVER_BUSY with a Retry after.
            second = await gw.register(dep.ue("ue-2@example"))
            assert second.cause == BUSY and second.retry_after and second.retry_after > 0
            code, status = await msgctl.json("status")
            assert code == 0 and status["registry"]["backend"] == "postgresql"
            assert status["registry"]["available"] is False
            assert status["registry"]["problem"] and status["registry"]["unavailable_since"]
            assert cluster.password not in str(status)
            human = await msgctl.ok("status")
            assert "registry     UNAVAILABLE since" in human
            assert "msgd_registry_available 0.0" in await scrape(child)
            assert "registry: database unavailable: " in await status_line(
                manager, "registry: database unavailable")
            # The node stays up and healthy for systemd: the watchdog keeps pinging (a
            # restart would not bring the database back).
            await manager.await_for("WATCHDOG=1")
            await manager.await_for("WATCHDOG=1")
            assert child.proc is not None and child.proc.poll() is None

            # A gateway that keeps retrying SERVER_BUSY gets through once the database is
            # back, without msgd being restarted.
            patient = await connect(dep, child.address, GW1, busy_retries=30)
            try:
                waiting = asyncio.create_task(patient.register(dep.ue("ue-3@example")))
                await asyncio.to_thread(cluster.start)
                assert (await waiting).ok
            finally:
                await patient.close()
            assert (await gw.register(dep.ue("ue-4@example"))).ok
            code, status = await msgctl.json("status")
            assert status["registry"]["available"] is True
            assert status["registry"]["problem"] is None
            assert "msgd_registry_available 1.0" in await scrape(child)
            code, shown = await msgctl.json("registry", "show", "ue-3@example")
            assert code == 0 and shown["registered"]
            # Nothing acknowledged before the crash was lost by it.
            with psycopg.connect(dsn) as conn:
                stored = {row[0] for row in conn.execute(
                    "SELECT ue_service_id FROM msgd_registration").fetchall()}
            assert acked | {"ue-0@example"} <= stored
            manager.cursor = len(manager.messages)
            assert "registry:" not in await status_line(manager, "UEs registered")
        finally:
            await gw.close()
        assert child.terminate() == 0
        log = child.log_text()
        assert "event=registry.unavailable" in log and "event=registry.available" in log
        assert "Traceback" not in log and cluster.password not in log
    finally:
        if child is not None and child.proc is not None and child.proc.poll() is None:
            child.kill9()
        manager.close()
        await asyncio.to_thread(cluster.stop, "immediate")
        shutil.rmtree(root, ignore_errors=True)


def test_a_node_that_cannot_reach_its_database_at_start_exits_1_naming_it_without_password(
        tmp_path: Path, pki, pg_cluster) -> None:
    """Exit code 1 (a runtime failure: systemd's Restart=on-failure tries again), one line,
    the DSN shown without its password."""
    from bench.pgcluster import free_port

    dsn = pg_cluster.dsn("msgd").replace(f":{pg_cluster.port}/", f":{free_port()}/")
    dep = pg_node(tmp_path, pki, dsn, name="node-a")
    proc = subprocess.run([sys.executable, "-m", "msgd", "--config", str(dep.config_path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("msgd: registry ") and "password=***" in last
    assert "Connection refused" in last
    assert pg_cluster.password not in proc.stderr + proc.stdout
