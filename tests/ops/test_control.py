"""`msgctl` admin commands against a running daemon, over its real control socket.

The daemon is in-process (running_server plus the ControlServer serve() starts); msgctl runs
its real main() in a thread (it is a blocking client), or as a separate process where another
uid is needed.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import stat
import sys

import pytest

from msgd.cli import main as cli
from msgd.gateway import HandshakeError
from msgd.ops.control import ControlServer, peer_allowed, peer_credentials
from tests.harness import Gw, connect, make_deployment, running_server
from tests.ops import secret_scan
from tests.ops.msgctl import Msgctl
from wire.constants import ErrorCause

UES = {"a1@example": ["gw1.example"], "a2@example": ["gw1.example"],
       "a3@example": ["gw1.example"], "b1@example": ["gw2.example", "gw1.example"]}
NOBODY = 65534


@pytest.fixture
async def daemon(tmp_path, pki, sock_dir):
    dep = make_deployment(tmp_path / "d", pki, ues=UES,
                          gateways=(Gw("gw1.example"), Gw("gw2.example", bulk_allowed=False)))
    async with running_server(dep) as server:
        control = ControlServer(server, sock_dir / "ctl")
        await control.start()
        try:
            yield dep, server, control
        finally:
            await control.close()




@pytest.fixture
def msgctl(sock_dir, capsys) -> Msgctl:
    return Msgctl(sock_dir / "ctl", capsys)


async def _registered(dep, server, *uids: str, identity: str = "gw1.example"):
    gw = await connect(dep, server.address, identity)
    for uid in uids:
        assert (await gw.register(dep.ue(uid))).ok
    return gw


async def test_status(daemon, msgctl):
    dep, server, _control = daemon
    async with await _registered(dep, server, "a1@example", "a2@example"):
        code, out, _ = await msgctl("status")
        assert code == 0
        assert "msgd-test: running" in out
        assert "1 connected, 2 configured" in out
        assert "2 registered, 4 provisioned, 0 pending" in out
        assert "certificate  server: CN=localhost" in out
        code, status = await msgctl.json("status")
        assert code == 0
        assert status["state"] == "running" and status["pid"] == os.getpid()
        assert status["listen"] == f"127.0.0.1:{server.address[1]}"
        assert status["gateways"] == {"configured": 2, "connected": 1}
        assert status["registry"]["registered"] == 2 and status["registry"]["pending"] == 0
        server_cert = [c for c in status["tls"]["certificates"] if c["role"] == "server"]
        assert len(server_cert) == 1 and 824 < server_cert[0]["days_left"] <= 825


async def test_gateways(daemon, msgctl):
    dep, server, _control = daemon
    async with await _registered(dep, server, "a1@example", "a2@example", "a3@example") as gw:
        local = gw.transport.get_extra_info("sockname")
        code, out, _ = await msgctl("gateways")
        assert code == 0
        lines = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
        assert lines["gw1.example"][1] == "yes" and lines["gw1.example"][4] == "3"
        assert lines["gw1.example"][3] == f"{local[0]}:{local[1]}"
        assert lines["gw2.example"][1] == "no"
        code, result = await msgctl.json("gateways")
        by_id = {g["identity"]: g for g in result["gateways"]}
        gw1 = by_id["gw1.example"]
        assert gw1["connected"] and gw1["entries_processed"] == 3
        (conn,) = gw1["connections"]
        assert conn["peer"] == f"{local[0]}:{local[1]}" and conn["since"].endswith("Z")
        assert by_id["gw2.example"] == {
            "identity": "gw2.example", "configured": True, "ue_authentication": True,
            "bulk_allowed": False, "connected": False, "connections": [],
            "entries_processed": 0}


async def test_registry_count_show_and_list(daemon, msgctl):
    dep, server, _control = daemon
    gw1 = await _registered(dep, server, "a1@example", "a2@example")
    gw2 = await _registered(dep, server, "b1@example", identity="gw2.example")
    try:
        code, out, _ = await msgctl("registry", "count")
        assert (code, out) == (0, "3 registered, 4 provisioned, 0 pending\n")
        assert await msgctl.json("registry", "count") == (
            0, {"registered": 3, "provisioned": 4, "pending": 0})

        code, out, _ = await msgctl("registry", "show", "b1@example")
        assert code == 0 and "yes, through gw2.example" in out
        assert "yes, for gw1.example, gw2.example" in out
        code, shown = await msgctl.json("registry", "show", "b1@example")
        assert shown["gateway"] == "gw2.example" and shown["registered"]
        assert shown["authorized_gateways"] == ["gw1.example", "gw2.example"]
        # The key is never part of the answer.
        assert "key" not in shown and dep.keys["b1@example"].hex() not in json.dumps(shown)
        code, shown = await msgctl.json("registry", "show", "a3@example")
        assert code == 0 and not shown["registered"] and shown["provisioned"]
        code, out, err = await msgctl("registry", "show", "nobody@example")
        assert code == 1 and "neither registered nor provisioned" in err
        code, failed = await msgctl.json("registry", "show", "nobody@example")
        assert code == 1 and failed["ok"] is False

        code, out, _ = await msgctl("registry", "list")
        assert code == 0
        assert sorted(out.splitlines()) == ["a1@example\tgw1.example", "a2@example\tgw1.example",
                                            "b1@example\tgw2.example"]
        code, out, _ = await msgctl("registry", "list", "--gateway", "gw2.example")
        assert out.splitlines() == ["b1@example\tgw2.example"]
        code, listed = await msgctl.json("registry", "list", "--gateway", "gw1.example")
        assert listed["count"] == 2
        assert sorted(r["ue_service_id"] for r in listed["registrations"]) == [
            "a1@example", "a2@example"]
        code, listed = await msgctl.json("registry", "list", "--limit", "1")
        assert listed["count"] == 1 and len(listed["registrations"]) == 1
        code, listed = await msgctl.json("registry", "list", "--gateway", "gw9.example")
        assert (code, listed) == (0, {"registrations": [], "count": 0})
    finally:
        await gw1.close()
        await gw2.close()


def _csv(path, rows) -> None:
    lines = ["ue_service_id,key,gateways"]
    for uid, key, gateways in rows:
        secret_scan.remember(key)  # the session's log scan must look for these too
        lines.append(f"{uid},{key.hex()},{';'.join(gateways)}")
    path.write_text("\n".join(lines) + "\n")


async def test_provision_import_and_remove(daemon, msgctl, tmp_path):
    dep, server, _control = daemon
    new_key, json_key = secrets.token_bytes(32), secrets.token_bytes(32)
    _csv(tmp_path / "new.csv", [("new@example", new_key, ["gw1.example"])])
    code, out, err = await msgctl("provision", "import", str(tmp_path / "new.csv"))
    assert code == 0 and out == "imported 1 UEs (5 provisioned)\n"
    assert "kept over the provisioning file across reloads and restarts" in err
    _csv(tmp_path / "more.csv", [("json@example", json_key, ["gw2.example"]),
                                 ("a1@example", secrets.token_bytes(32), ["gw2.example"])])
    code, result = await msgctl.json("provision", "import", str(tmp_path / "more.csv"))
    assert (code, result) == (0, {"imported": 2, "provisioned": 6, "admin_overrides": 3})

    # In force at once: the new UE registers with its key; a1 now belongs to gw2 only.
    from msgd.gateway import GatewayUe

    async with await connect(dep, server.address) as gw:
        assert (await gw.register(GatewayUe("new@example", new_key))).ok
        refused = await gw.register(dep.ue("a1@example"))
        assert refused.cause_name == "GATEWAY_NOT_AUTHORIZED"

    (tmp_path / "bad.csv").write_text("ue_service_id,key,gateways\nx@e,zz,gw1.example\n")
    code, out, err = await msgctl("provision", "import", str(tmp_path / "bad.csv"))
    assert code == 1 and "line 2" in err and out == ""
    assert server.registry.provisioned("x@e") is None

    code, out, _ = await msgctl("provision", "remove", "new@example")
    assert code == 0
    assert out == "removed new@example (its registration stays until it de-registers)\n"
    assert server.registry.provisioned("new@example") is None
    code, result = await msgctl.json("provision", "remove", "json@example")
    assert (code, result) == (0, {"removed": "json@example", "still_registered": False,
                                  "provisioned": 4})
    code, _out, err = await msgctl("provision", "remove", "json@example")
    assert code == 1 and "not provisioned" in err


@pytest.mark.parametrize("as_json", [False, True])
async def test_drain(daemon, msgctl, as_json):
    dep, server, _control = daemon
    gw = await _registered(dep, server, "a1@example")
    if as_json:
        code, result = await msgctl.json("drain")
        assert (code, result) == (0, {"draining": True, "gateways_told": 1, "connected": 1})
    else:
        code, out, _ = await msgctl("drain")
        assert code == 0 and out.startswith("draining: GOODBYE sent to 1 gateways")
    await asyncio.wait_for(gw.wait_closed(), 10)
    assert gw.goodbye.error_cause == ErrorCause.SHUTTING_DOWN
    # Refused: the listener is closed, so the attempt ends in a refusal, not a timeout.
    with pytest.raises(HandshakeError) as refused:
        await connect(dep, server.address, timeout=5)
    assert isinstance(refused.value.__cause__, ConnectionRefusedError), refused.value
    code, status = await msgctl.json("status")
    assert status["state"] == "draining"


async def test_reload(daemon, msgctl):
    dep, _server, _control = daemon
    code, out, _ = await msgctl("reload")
    assert code == 0 and out == "reloaded: 4 UEs provisioned\n"
    text = dep.config_path.read_text()
    dep.config_path.write_text(text.replace('identity = "gw2.example"', 'identity = "gw3.example"'))
    code, result = await msgctl.json("reload")
    assert code == 0 and result["ok"]
    assert result["changes"]["gateways_added"] == ["gw3.example"]
    dep.config_path.write_text(text.replace("[limits]", "[limits]\nnope = 1"))
    code, out, err = await msgctl("reload")
    assert code == 1 and "reload failed (config)" in err and "limits.nope" in err
    code, failed = await msgctl.json("reload")
    assert code == 1 and failed["result"]["part"] == "config"
    code, status = await msgctl.json("status")
    assert status["last_reload"]["ok"] is False


async def test_socket_is_private_and_replaced_when_stale(tmp_path, pki, sock_dir, msgctl):
    path = sock_dir / "ctl"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays behind, as after a crash
    dep = make_deployment(tmp_path / "d", pki, ues=UES)
    async with running_server(dep) as server:
        control = ControlServer(server, path)
        await control.start()
        try:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert (await msgctl("registry", "count"))[0] == 0
            # A second daemon configured with the same path leaves the first one alone.
            second = ControlServer(server, path)
            await second.start()
            assert second._server is None
            assert (await msgctl("registry", "count"))[0] == 0
        finally:
            await control.close()
        assert not path.exists()
        # Something that is not a socket is never replaced.
        path.write_text("precious")
        third = ControlServer(server, path)
        await third.start()
        assert third._server is None and path.read_text() == "precious"
        code, _out, err = await msgctl("status")
        assert code == 3 and "no msgd is listening" in err


async def test_protocol_errors(daemon, sock_dir):
    reader, writer = await asyncio.open_unix_connection(str(sock_dir / "ctl"))
    try:
        for request, expected in [
            (b'{"cmd": "registry.count"}\n', True),
            (b'{"cmd": "no.such"}\n', "unknown command 'no.such'"),
            # The watchdog test hook exists only with MSGD_TEST_HOOKS=1.
            (b'{"cmd": "debug.block", "seconds": 1}\n', "unknown command 'debug.block'"),
            (b'{"cmd": "registry.show", "ue": ""}\n', "ue is empty"),
            (b'{"cmd": "provision.import", "rows": [{"ue_service_id": "x", "key": "00",'
             b' "gateways": ["g"]}]}\n', "row 1: key must be 64 hex characters"),
        ]:
            writer.write(request)
            answer = json.loads(await reader.readline())
            if expected is True:
                assert answer["ok"] is True
            else:
                assert answer == {"ok": False, "error": expected}
        writer.write(b"not json\n")
        answer = json.loads(await reader.readline())
        assert answer["ok"] is False and answer["error"].startswith("bad request")
        assert await reader.readline() == b""  # and the connection is closed
    finally:
        writer.close()


def test_peer_credentials_of_a_real_socketpair():
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert peer_credentials(left) == (os.getpid(), os.getuid(), os.getgid())
    assert peer_allowed(0, own_uid=1000)
    assert peer_allowed(1000, own_uid=1000)
    assert not peer_allowed(NOBODY, own_uid=1000)


def _msgctl_as_nobody(*argv: str) -> tuple[int, str, str]:
    """Run msgctl's main() as uid/gid 65534 in a forked child; (exit code, stdout, stderr).

    A fork rather than a new interpreter: this one lives under /root (0700), which another
    uid cannot execute. The child only parses arguments and talks over the socket, with
    stdout and stderr in memory, and leaves with os._exit.
    """
    import io

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 99
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
            try:
                code = cli.main(list(argv))
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 2
            report = {"code": code, "out": sys.stdout.getvalue(), "err": sys.stderr.getvalue()}
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0 if code != 99 else 99)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the child failed"
    report = json.loads(data)
    return report["code"], report["out"], report["err"]


async def test_other_uid_is_kept_out_by_the_socket_mode(daemon, sock_dir):
    # The socket is 0600 (and its directory 0700): another user cannot even connect.
    code, _out, err = await asyncio.to_thread(_msgctl_as_nobody, "status", "--socket",
                                              str(sock_dir / "ctl"))
    assert code == 3, err
    assert "permission denied (run as root or as the daemon's user)" in err


async def test_other_uid_is_refused_by_peer_credentials(daemon, sock_dir, caplog):
    # Even if the file permissions are loosened by mistake, SO_PEERCRED refuses the peer.
    os.chmod(sock_dir, 0o711)
    os.chmod(sock_dir / "ctl", 0o666)
    code, out, err = await asyncio.to_thread(_msgctl_as_nobody, "status", "--json",
                                             "--socket", str(sock_dir / "ctl"))
    assert code == 1, err
    assert json.loads(out)["error"].startswith(f"permission denied: uid {NOBODY} ")
    refused = [r for r in caplog.records if r.getMessage() == "control.refused"]
    assert refused and refused[0].msgd_fields["peer_uid"] == NOBODY


async def test_socket_found_through_the_configuration_file(daemon, sock_dir, capsys):
    dep, _server, _control = daemon
    with_control = dep.dir / "with-control.toml"
    with_control.write_text(dep.config_path.read_text()
                            + f'\n[control]\nsocket = "{sock_dir / "ctl"}"\n')
    code = await asyncio.to_thread(cli.main, ["registry", "count", "--config", str(with_control)])
    assert (code, capsys.readouterr().out) == (0, "0 registered, 4 provisioned, 0 pending\n")
    # Without [control] socket there is nothing to reach: a usage error naming the way out.
    code = await asyncio.to_thread(cli.main, ["status", "--config", str(dep.config_path)])
    assert code == 2 and "has no [control] socket; pass --socket PATH" in capsys.readouterr().err


async def test_provision_import_is_one_transaction(daemon, msgctl, tmp_path):
    """Storage fails part-way through an import: none of its rows is applied, and msgctl says
    so (before, it stopped half-way and said "stored N of M rows")."""
    dep, server, _control = daemon
    registry = server.registry
    rows = [(f"bulk-{i:04d}@example", secrets.token_bytes(32), ["gw1.example"])
            for i in range(2000)]
    rows.append(("a1@example", secrets.token_bytes(32), ["gw2.example"]))  # an existing UE
    _csv(tmp_path / "big.csv", rows)
    # Room for a few more pages: committed one by one, the first rows would fit.
    pages = await asyncio.to_thread(registry._debug_set_max_page_count, None)
    await asyncio.to_thread(registry._debug_set_max_page_count, pages + 2)
    try:
        code, out, err = await msgctl("provision", "import", str(tmp_path / "big.csv"))
        assert code == 1 and out == ""
        assert "import failed, nothing was applied" in err and "full" in err
        code, failed = await msgctl.json("provision", "import", str(tmp_path / "big.csv"))
        assert code == 1 and failed["result"] == {"imported": 0}
    finally:
        await asyncio.to_thread(registry._debug_set_max_page_count, 1 << 30)
    assert registry.provisioned_count() == 4
    assert all(registry.provisioned(uid) is None for uid, _key, _gws in rows[:-1])
    assert registry.provisioned("a1@example").gateways == {"gw1.example"}
    code, status = await msgctl.json("status")
    assert status["registry"]["admin_overrides"] == 0 and status["registry"]["provisioned"] == 4
    # The old provisioning still serves: a1 registers through gw1 with the file's key.
    async with await _registered(dep, server, "a1@example"):
        pass
    # With space again, the same file goes in whole.
    code, result = await msgctl.json("provision", "import", str(tmp_path / "big.csv"))
    assert (code, result) == (0, {"imported": 2001, "provisioned": 2004,
                                  "admin_overrides": 2001})


async def test_provision_forget_and_status(daemon, msgctl, tmp_path):
    dep, server, _control = daemon
    _csv(tmp_path / "one.csv", [("a1@example", secrets.token_bytes(32), ["gw2.example"])])
    assert (await msgctl("provision", "import", str(tmp_path / "one.csv")))[0] == 0
    assert (await msgctl("provision", "remove", "a2@example"))[0] == 0
    code, out, _ = await msgctl("status")
    assert code == 0 and "provisioning 2 admin changes kept over the provisioning file" in out

    code, out, err = await msgctl("provision", "forget")
    assert code == 2 and "give UE Service IDs or --all" in err
    code, out, err = await msgctl("provision", "forget", "a3@example")
    assert code == 1 and "no admin change is recorded for 'a3@example'" in err
    code, out, err = await msgctl("provision", "forget", "a2@example", "a3@example")
    assert code == 0 and out.startswith("forgot 1 admin changes (1 left); the provisioning file")
    assert "no admin change was recorded for: a3@example" in err
    code, result = await msgctl.json("provision", "forget", "--all")
    assert (code, result) == (0, {"forgotten": 1, "unknown": [], "admin_overrides": 0})
    # Until the next reload the rows stay as the admin left them; then the file decides.
    assert server.registry.provisioned("a2@example") is None
    assert (await msgctl("reload"))[0] == 0
    assert server.registry.provisioned("a2@example").key == dep.keys["a2@example"]
    assert server.registry.provisioned("a1@example").key == dep.keys["a1@example"]

