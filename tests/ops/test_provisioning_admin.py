"""Admin provisioning changes outlive reloads and restarts of a real msgd until forgotten.

`msgctl provision import|remove` against a real daemon process (tests/harness.py ChildServer)
over its control socket, `msgctl reload` (the same reload as SIGHUP) and a restart; a gateway
over TLS shows what is in force. Under systemd the daemon cannot write its provisioning file
(/etc/msgd is read-only), so the changes live in the registry file and win over the file.
"""

from __future__ import annotations

import asyncio
import secrets

from msgd.gateway import GatewayUe
from tests.harness import ChildServer, Gw, connect, make_deployment
from tests.ops import secret_scan
from tests.ops.msgctl import Msgctl, control_ready

UES = {"a1@example": ["gw1.example"], "a2@example": ["gw1.example"],
       "a3@example": ["gw1.example"]}






def _csv(path, rows) -> None:
    lines = ["ue_service_id,key,gateways"]
    for uid, key, gateways in rows:
        secret_scan.remember(key)
        lines.append(f"{uid},{key.hex()},{';'.join(gateways)}")
    path.write_text("\n".join(lines) + "\n")


async def _register(dep, address, uid: str, key: bytes) -> str:
    """Register `uid` with `key` through gw1 and de-register it again; the cause name."""
    async with await connect(dep, address) as gw:
        result = await gw.register(GatewayUe(uid, key))
        if result.ok:
            assert (await gw.deregister(GatewayUe(uid, key))).ok
        return result.cause_name


async def _provisioned(msgctl: Msgctl, uid: str) -> bool:
    code, shown = await msgctl.json("registry", "show", uid)
    if code == 1:
        assert "neither registered nor provisioned" in shown["error"]
        return False
    assert code == 0
    return shown["provisioned"]


async def test_admin_changes_survive_reload_and_restart_until_forgotten(
        tmp_path, pki, sock_dir, capsys):
    dep = make_deployment(tmp_path / "d", pki, ues=UES, gateways=(Gw("gw1.example"),),
                          extra=f'[control]\nsocket = "{sock_dir / "ctl"}"\n')
    file_keys = dict(dep.keys)
    new_key, a1_key = secrets.token_bytes(32), secrets.token_bytes(32)
    msgctl = Msgctl(sock_dir / "ctl", capsys)
    child = ChildServer(dep)
    await asyncio.to_thread(child.start)
    await control_ready(child)
    try:
        _csv(tmp_path / "admin.csv", [("new@example", new_key, ["gw1.example"]),
                                      ("a1@example", a1_key, ["gw1.example"])])
        await msgctl.ok("provision", "import", str(tmp_path / "admin.csv"))
        await msgctl.ok("provision", "remove", "a2@example")
        status = (await msgctl.json("status"))[1]
        assert status["registry"]["admin_overrides"] == 3

        # Reload: the file still says what it said; the admin's changes stay in force.
        assert (await msgctl.ok("reload")).startswith("reloaded: 3 UEs provisioned")
        assert await _register(dep, child.address, "new@example", new_key) == "SUCCESS"
        assert await _register(dep, child.address, "a1@example", a1_key) == "SUCCESS"
        assert await _register(dep, child.address, "a1@example", file_keys["a1@example"]) \
            == "AUTHENTICATION_FAILED"
        assert await _register(dep, child.address, "a2@example", file_keys["a2@example"]) \
            == "UE_NOT_PROVISIONED"
        assert not await _provisioned(msgctl, "a2@example")

        # A changed file does not win over them either; its other changes apply.
        changed_file_key = secrets.token_bytes(32)
        dep.write_provisioning([("a1@example", changed_file_key, ["gw1.example"]),
                                ("a2@example", file_keys["a2@example"], ["gw1.example"]),
                                ("a3@example", file_keys["a3@example"], ["gw1.example"]),
                                ("file@example", secrets.token_bytes(32), ["gw1.example"])])
        file_keys["a1@example"] = changed_file_key
        assert (await msgctl.ok("reload")).startswith("reloaded: 4 UEs provisioned")
        assert await _register(dep, child.address, "a1@example", a1_key) == "SUCCESS"
        assert not await _provisioned(msgctl, "a2@example")
        assert await _provisioned(msgctl, "file@example")

        # A restart loads the same file: the changes are still there.
        assert child.terminate() == 0
        await asyncio.to_thread(child.start)
        await control_ready(child, starts=2)
        status = (await msgctl.json("status"))[1]
        assert status["registry"]["admin_overrides"] == 3
        assert status["registry"]["provisioned"] == 4  # a1 a3 file new; a2 removed
        assert await _register(dep, child.address, "new@example", new_key) == "SUCCESS"
        assert await _register(dep, child.address, "a1@example", a1_key) == "SUCCESS"
        assert not await _provisioned(msgctl, "a2@example")

        # Forget the removal: after the reload, the file's row of a2 is back.
        await msgctl.ok("provision", "forget", "a2@example")
        assert not await _provisioned(msgctl, "a2@example")  # not before the reload
        await msgctl.ok("reload")
        assert await _register(dep, child.address, "a2@example", file_keys["a2@example"]) \
            == "SUCCESS"

        # Forget everything: the file alone decides.
        await msgctl.ok("provision", "forget", "--all")
        assert (await msgctl.ok("reload")).startswith("reloaded: 4 UEs provisioned")
        assert not await _provisioned(msgctl, "new@example")
        assert await _register(dep, child.address, "a1@example", changed_file_key) == "SUCCESS"
        assert await _register(dep, child.address, "a1@example", a1_key) \
            == "AUTHENTICATION_FAILED"
        status = (await msgctl.json("status"))[1]
        assert status["registry"]["admin_overrides"] == 0
    finally:
        assert child.terminate() == 0
