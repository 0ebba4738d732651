"""The daemon as operators run it: bad config, SIGTERM with gateways connected, SIGHUP."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

from msgd.gateway import GatewayUe
from tests.harness import ROOT, ChildServer, Gw, RawGateway, connect, make_deployment
from wire.constants import ErrorCause, MessageType
from wire.messages import Goodbye, decode_body


def _run_msgd(config) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "msgd", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_bad_config_exits_2_with_one_line_naming_the_key(tmp_path, pki):
    dep = make_deployment(tmp_path / "d", pki, limits={"max_frame_size": 0})
    done = _run_msgd(dep.config_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "limits.max_frame_size" in lines[0]


def test_missing_config_file_exits_2(tmp_path):
    done = _run_msgd(tmp_path / "nope.toml")
    assert done.returncode == 2
    assert "nope.toml" in done.stderr


def test_bad_provisioning_file_at_start_exits_2(tmp_path, pki):
    dep = make_deployment(tmp_path / "d", pki)
    (dep.dir / "ues.csv").write_text("ue_service_id,key,gateways\nx@e,zz,gw1.example\n")
    done = _run_msgd(dep.config_path)
    assert done.returncode == 2
    assert "line 2" in done.stderr and "key" in done.stderr


async def test_sigterm_says_goodbye_finishes_and_exits_0(tmp_path, pki):
    uids = [f"ue-{i:05d}@gw1.example" for i in range(3000)]
    dep = make_deployment(tmp_path / "d", pki, ues={u: ["gw1.example"] for u in uids},
                          gateways=(Gw("gw1.example"),))
    child = ChildServer(dep)
    child.start()
    idle = await RawGateway.open(dep, child.address)
    await idle.hello()
    async with await connect(dep, child.address) as gw:
        results = []
        async for result in gw.bulk_register(dep.ue(u) for u in uids):
            results.append(result)
            if len(results) == 1:
                child.proc.send_signal(signal.SIGTERM)
        # The transaction in progress was finished, not cut: every UE has its answer.
        assert len(results) == len(uids) and all(r.ok for r in results)
        assert gw.goodbye is not None
        assert gw.goodbye.error_cause == ErrorCause.SHUTTING_DOWN
    mtype, _flags, tid, body = await idle.read_frame()
    goodbye = decode_body(MessageType(mtype), tid, body)
    assert isinstance(goodbye, Goodbye) and goodbye.error_cause == ErrorCause.SHUTTING_DOWN
    await idle.expect_eof()
    assert await asyncio.to_thread(child.proc.wait, 30) == 0
    assert "event=server.stopped" in child.log_text()


async def test_sighup_reloads_provisioning_and_keeps_sessions(tmp_path, pki):
    dep = make_deployment(tmp_path / "d", pki, ues={"old@example": ["gw1.example"]},
                          gateways=(Gw("gw1.example"),))
    child = ChildServer(dep)
    child.start()
    try:
        async with await connect(dep, child.address) as gw:
            assert (await gw.register(dep.ue("old@example"))).ok
            dep.write_provisioning([("old@example", dep.keys["old@example"], ["gw1.example"]),
                                    ("new@example", b"\x05" * 32, ["gw1.example"])])
            before = child.log_text().count("event=reload.provisioning")
            child.proc.send_signal(signal.SIGHUP)
            # Wait for the daemon to say it reloaded (an observable condition, bounded).
            for _ in range(500):
                if child.log_text().count("event=reload.provisioning") > before:
                    break
                await asyncio.sleep(0.01)
            result = await gw.register(GatewayUe("new@example", b"\x05" * 32))
            assert result.ok
            # The same session is still in use: the nonce did not change.
            assert (await gw.deregister(dep.ue("old@example"))).ok
    finally:
        assert child.terminate() == 0
