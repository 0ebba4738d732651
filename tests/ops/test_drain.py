"""`msgctl drain` and its inverse `msgctl undrain`, against a real msgd process.

The daemon runs as a child (`python -m msgd`, tests/harness.py ChildServer) with its control
socket and metrics endpoint; msgctl runs its real main() in a thread; gateways connect over
TLS. "Refused" means the connection attempt ends in a refusal, reset, EOF or TLS alert within
a bound: a timeout is a hang and fails the test.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import urllib.request

from tests.harness import ChildServer, Gw, connect, make_deployment
from tests.ops.msgctl import Msgctl, control_ready
from wire.constants import ErrorCause

UES = {f"ue-{i}@gw1.example": ["gw1.example"] for i in range(4)}
REFUSAL_BOUND = 5.0  # seconds






async def _refused(dep, address) -> str:
    """Open TCP + TLS to `address` as gw1 and read: it must end in a refusal, reset, EOF or TLS
    alert within REFUSAL_BOUND seconds. Returns what ended it."""
    ctx = dep.client_ctx("gw1.example")
    writer = None
    try:
        async with asyncio.timeout(REFUSAL_BOUND):
            reader, writer = await asyncio.open_connection(
                address[0], address[1], ssl=ctx, server_hostname="localhost")
            data = await reader.read(1)  # TLS 1.3: a refusal after the handshake shows here
            assert data == b"", f"the server sent {data!r}: it accepted the connection"
            return "EOF"
    except TimeoutError:
        raise AssertionError(f"no refusal within {REFUSAL_BOUND} s: the attempt hung") from None
    except (ConnectionRefusedError, ConnectionResetError, ssl.SSLError) as exc:
        return type(exc).__name__
    finally:
        if writer is not None:
            writer.close()


def _draining_metric(metrics_address: str) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
    with opener.open(f"http://{metrics_address}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    (value,) = re.findall(r"(?m)^msgd_draining (\S+)$", text)
    return float(value)


def _deployment(tmp_path, pki, sock_dir):
    extra = f'[control]\nsocket = "{sock_dir / "ctl"}"\n[metrics]\nlisten = "127.0.0.1:0"\n'
    return make_deployment(tmp_path / "d", pki, ues=UES, gateways=(Gw("gw1.example"),),
                           extra=extra)


def _metrics_address(child: ChildServer) -> str:
    (address,) = re.findall(r"event=metrics\.listening address=(127\.0\.0\.1:\d+)",
                            child.log_text())[-1:]
    return address


async def test_drain_then_undrain_accepts_gateways_again(tmp_path, pki, sock_dir, capsys):
    dep = _deployment(tmp_path, pki, sock_dir)
    msgctl = Msgctl(sock_dir / "ctl", capsys)
    child = ChildServer(dep)
    await asyncio.to_thread(child.start)
    await control_ready(child)
    try:
        metrics = _metrics_address(child)
        gw = await connect(dep, child.address)
        assert (await gw.register(dep.ue("ue-0@gw1.example"))).ok

        code, result = await msgctl.json("drain")
        assert (code, result["draining"], result["gateways_told"]) == (0, True, 1)
        await asyncio.wait_for(gw.wait_closed(), 10)
        assert gw.goodbye.error_cause == ErrorCause.SHUTTING_DOWN
        assert await _refused(dep, child.address) == "ConnectionRefusedError"
        assert (await msgctl.json("status"))[1]["state"] == "draining"
        assert await asyncio.to_thread(_draining_metric, metrics) == 1

        code, out, err = await msgctl("undrain")
        assert (code, out) == (0, f"accepting gateways on 127.0.0.1:{child.port}\n"), err
        assert (await msgctl.json("status"))[1]["state"] == "running"
        assert await asyncio.to_thread(_draining_metric, metrics) == 0
        assert "event=server.undrained" in child.log_text()

        # The same address as before: a gateway connects and registers.
        async with await connect(dep, child.address) as again:
            assert (await again.register(dep.ue("ue-1@gw1.example"))).ok
        code, shown = await msgctl.json("registry", "show", "ue-1@gw1.example")
        assert code == 0 and shown["registered"]

        # Undrain when not draining changes nothing and says so.
        code, result = await msgctl.json("undrain")
        assert (code, result) == (0, {"draining": False, "was_draining": False,
                                      "listen": f"127.0.0.1:{child.port}"})
        # And a second drain/undrain round works like the first.
        assert (await msgctl("drain"))[0] == 0
        assert await _refused(dep, child.address) == "ConnectionRefusedError"
        assert (await msgctl("undrain"))[0] == 0
        async with await connect(dep, child.address) as third:
            assert (await third.register(dep.ue("ue-2@gw1.example"))).ok
    finally:
        assert child.terminate() == 0


async def test_undrain_stays_draining_when_the_address_is_taken(tmp_path, pki, sock_dir,
                                                                capsys):
    dep = _deployment(tmp_path, pki, sock_dir)
    msgctl = Msgctl(sock_dir / "ctl", capsys)
    child = ChildServer(dep)
    await asyncio.to_thread(child.start)
    await control_ready(child)
    try:
        assert (await msgctl("drain"))[0] == 0
        # Someone else listens on the port meanwhile.
        with socket.create_server(("127.0.0.1", child.port)):
            code, out, err = await msgctl("undrain")
            assert code == 1 and out == ""
            assert f"still draining: cannot listen on 127.0.0.1:{child.port}: " \
                "Address already in use" in err
            code, failed = await msgctl.json("undrain")
            assert code == 1 and failed["result"] == {"draining": True}
            assert (await msgctl.json("status"))[1]["state"] == "draining"
            assert "event=server.undrain_failed" in child.log_text()
        # The port is free again: undrain works and a gateway registers.
        code, out, err = await msgctl("undrain")
        assert code == 0, err
        async with await connect(dep, child.address) as gw:
            assert (await gw.register(dep.ue("ue-3@gw1.example"))).ok
    finally:
        assert child.terminate() == 0
