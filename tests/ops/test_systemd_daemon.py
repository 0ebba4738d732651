"""msgd under a stand-in systemd: sd_notify on a real datagram socket, and the watchdog.

Each test runs the real daemon (`python -m msgd`, tests/harness.py ChildServer) with
NOTIFY_SOCKET and WATCHDOG_USEC set as systemd sets them, and reads what it sends.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import sqlite3
import time

from msgd.cli.admin import ControlClient
from tests.harness import ChildServer, Gw, connect, make_deployment

UES = {f"ue-{i}@gw1.example": ["gw1.example"] for i in range(3)}


def _deployment(tmp_path, pki, sock_dir, **kwargs):
    extra = f'[control]\nsocket = "{sock_dir / "ctl"}"\n'
    return make_deployment(tmp_path / "d", pki, ues=UES, gateways=(Gw("gw1.example"),),
                           extra=extra, **kwargs)


def _child(dep, manager, period_s: float, **env: str) -> ChildServer:
    return ChildServer(dep, env={"NOTIFY_SOCKET": str(manager.path),
                                 "WATCHDOG_USEC": str(int(period_s * 1_000_000)), **env})


async def _wait_log(child: ChildServer, text: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in child.log_text():
        assert time.monotonic() < deadline, f"{text!r} not logged: {child.log_text()[-1500:]}"
        await asyncio.sleep(0.02)  # polling a file for a condition, bounded


def _gaps(pings: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(pings)]


async def test_ready_watchdog_reload_and_stopping(tmp_path, pki, manager, sock_dir):
    dep = _deployment(tmp_path, pki, sock_dir)
    child = _child(dep, manager, period_s=2.0)
    starting = asyncio.create_task(asyncio.to_thread(child.start))
    try:
        _when, ready = await manager.await_for("READY=1")
        # READY=1 comes only after the listener is bound and the registry loaded: both were
        # logged before it was sent.
        log = child.log_text()
        assert "event=server.listening" in log and "event=provisioning.loaded" in log
        # What start-up loaded is frozen out of the cyclic GC's reach (main.py says why).
        frozen = re.search(r"event=server\.gc_frozen objects=(\d+)", log)
        assert frozen and int(frozen.group(1)) > 10_000, log[-1500:]
        assert "STATUS=0 gateways, 0 UEs registered" in ready
        await starting
        assert "READY=1" in manager.messages[0][1], "READY=1 is the first notification"

        # Pings keep coming, each well within the 2 s period systemd would enforce.
        await manager.await_for("WATCHDOG=1")
        for _ in range(3):
            await manager.await_for("WATCHDOG=1", timeout=2.0)
        assert max(_gaps(manager.pings())) < 2.0

        # STATUS= follows gateways and registered UEs.
        async with await connect(dep, child.address) as gw:
            assert (await gw.register(dep.ue("ue-0@gw1.example"))).ok
            await manager.await_for("STATUS=1 gateways, 1 UEs registered")

            # SIGHUP: RELOADING=1 with MONOTONIC_USEC (CLOCK_MONOTONIC is system-wide), then
            # READY=1; the session goes on.
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            child.proc.send_signal(signal.SIGHUP)
            _, reloading = await manager.await_for("RELOADING=1")
            usec = [int(a.partition("=")[2]) for a in reloading if a.startswith("MONOTONIC_USEC=")]
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert len(usec) == 1 and before <= usec[0] <= after
            _, ready_again = await manager.await_for("READY=1")
            assert any(a.startswith("STATUS=") for a in ready_again)
            assert "event=reload.done" in child.log_text()
            assert (await gw.register(dep.ue("ue-1@gw1.example"))).ok

        # SIGTERM: STOPPING=1, then a clean exit.
        child.proc.send_signal(signal.SIGTERM)
        _, stopping = await manager.await_for("STOPPING=1")
        assert stopping[0] == "STOPPING=1"
        assert await asyncio.to_thread(child.proc.wait, 30) == 0
    finally:
        if child.proc is not None and child.proc.poll() is None:
            child.kill9()


async def test_blocked_event_loop_stops_the_pings(tmp_path, pki, manager, sock_dir):
    # The debug.block control command (only with MSGD_TEST_HOOKS=1) blocks the daemon's event
    # loop in time.sleep(), as a runaway computation or a blocking call would.
    dep = _deployment(tmp_path, pki, sock_dir)
    child = _child(dep, manager, period_s=1.0, MSGD_TEST_HOOKS="1")
    await asyncio.to_thread(child.start)
    try:
        await manager.await_for("READY=1")
        for _ in range(3):
            await manager.await_for("WATCHDOG=1", timeout=1.0)
        blocked_at = time.monotonic()

        def block() -> object:
            with ControlClient(sock_dir / "ctl") as client:
                return client.request("debug.block", seconds=2.5)

        assert await asyncio.to_thread(block) == {"blocked": 2.5}
        resumed = await manager.await_ping_after(blocked_at, timeout=5.0)
        last_before = max(p for p in manager.pings() if p <= blocked_at)
        # No ping for longer than the 1 s period: systemd would have killed and restarted us.
        assert resumed - last_before > 2.0
        await _wait_log(child, "event=watchdog.withheld reason=loop_lag")
        # Healthy again: pings come back at their pace.
        again = await manager.await_ping_after(resumed, timeout=1.0)
        assert again - resumed < 1.0
    finally:
        assert child.terminate() == 0


async def test_blocked_database_write_stops_the_pings(tmp_path, pki, manager, sock_dir):
    # Another process holds SQLite's write lock on the registry file: the daemon's commit
    # waits (busy timeout) and changes stay pending, so the watchdog must go quiet.
    dep = _deployment(tmp_path, pki, sock_dir)
    child = _child(dep, manager, period_s=1.0)
    await asyncio.to_thread(child.start)
    lock = sqlite3.connect(dep.dir / "registry.sqlite", isolation_level=None, timeout=0)
    try:
        await manager.await_for("READY=1")
        async with await connect(dep, child.address) as gw:
            await manager.await_for("WATCHDOG=1", timeout=1.0)
            lock.execute("BEGIN IMMEDIATE")
            try:
                registering = asyncio.create_task(gw.register(dep.ue("ue-2@gw1.example")))
                await _wait_log(child, "event=watchdog.withheld reason=registry_stalled")
                # Hold the lock until the silence exceeds the 1 s period.
                while time.monotonic() - manager.pings()[-1] <= 1.2:
                    assert not registering.done(), "answered while its change was not durable"
                    await asyncio.sleep(0.05)
                silent_since = manager.pings()[-1]
            finally:
                lock.execute("ROLLBACK")
            result = await asyncio.wait_for(registering, 10)
            assert result.ok  # nothing lost: the change became durable once the lock went
            resumed = await manager.await_ping_after(silent_since, timeout=5.0)
            assert resumed - silent_since > 1.2
            await _wait_log(child, "event=watchdog.resumed")
    finally:
        lock.close()
        assert child.terminate() == 0
