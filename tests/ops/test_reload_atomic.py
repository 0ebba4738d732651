"""Reload is all-or-nothing in fact: every input is read once and checked before anything
is switched, and the switch itself cannot stop halfway."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
from pathlib import Path

from msgd.tls.contexts import load_server_tls
from tests.harness import Gw, RawGateway, connect, make_deployment, running_server
from wire.constants import ErrorCause, MessageType
from wire.messages import decode_body

BOUND = 10.0


def _fifo_serving(path: Path, data: bytes) -> threading.Thread:
    """Replace `path` by a named pipe that hands out `data` to exactly one reader: a second
    read of the file blocks in open() (no writer is left)."""
    path.unlink()
    os.mkfifo(path)

    def serve() -> None:
        with open(path, "wb") as pipe:
            pipe.write(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_every_tls_file_is_read_exactly_once(tmp_path, pki):
    """Certificate, key, gateway CA and CRL are each served once through a pipe; a loader
    that opened any of them twice (to check, then to load) would block and fail here."""
    files = {}
    for name, source in (("cert.pem", pki.server_cert), ("key.pem", pki.server_key),
                         ("ca.pem", pki.ca), ("crl.pem", pki.crl(["gw2.example"]))):
        files[name] = tmp_path / name
        files[name].write_bytes(Path(source).read_bytes())
    config = dataclasses.replace(
        pki.tls_config(crl=files["crl.pem"]), certificate=files["cert.pem"],
        private_key=files["key.pem"], gateway_ca=files["ca.pem"])
    servers = [_fifo_serving(path, path.read_bytes()) for path in files.values()]
    outcome: dict[str, object] = {}

    def load() -> None:
        try:
            outcome["tls"] = load_server_tls(config)
        except BaseException as exc:  # reported by the assertion below
            outcome["error"] = exc

    loader = threading.Thread(target=load, daemon=True)
    loader.start()
    loader.join(BOUND)
    if loader.is_alive():
        for path in files.values():  # release the blocked open() so the thread can end
            with contextlib.suppress(OSError):  # ENXIO: nobody is reading that one
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        raise AssertionError("a TLS file was opened a second time (the loader blocked)")
    assert "error" not in outcome, outcome
    tls = outcome["tls"]
    assert tls.crl is not None and len(tls.crl) == 1
    for thread in servers:  # each file was read: its pipe's writer got to the end
        thread.join(BOUND)
        assert not thread.is_alive()


async def test_a_failing_connection_does_not_stop_the_switch(tmp_path, pki, caplog):
    """A reload whose CRL revokes gw1 and gw2: gw1's check fails (injected); gw1 is closed
    with a log line, gw2 still gets GOODBYE(GATEWAY_NOT_ALLOWED), and the reload is applied."""
    dep = make_deployment(tmp_path / "d", pki, ues={"a@example": ["gw3.example"]},
                          gateways=(Gw("gw1.example"), Gw("gw2.example"), Gw("gw3.example")))
    async with running_server(dep) as server:
        raw1 = await RawGateway.open(dep, server.address, "gw1.example")
        await raw1.hello()
        raw2 = await RawGateway.open(dep, server.address, "gw2.example")
        await raw2.hello()
        (conn1,) = [c for c in server.connections if c.identity == "gw1.example"]

        def broken() -> bytes:
            raise RuntimeError("injected: certificate unreadable")

        conn1.peer_der = broken  # fault injection on one live connection
        crl = pki.crl(["gw1.example", "gw2.example"], name=f"crl-{tmp_path.name}.pem")
        dep.set_crl(crl)
        with caplog.at_level(logging.ERROR, logger="msgd.connection"):
            result = await server.reload_now()
        assert result["ok"], result
        assert result["changes"]["sessions_revoked"] == 1
        assert server.tls.crl is not None and len(server.tls.crl) == 2
        assert any(r.getMessage() == "connection.internal_error" for r in caplog.records)
        await raw1.expect_eof(timeout=BOUND)
        mtype, _flags, tid, body = await raw2.read_frame(timeout=BOUND)
        assert mtype == MessageType.GOODBYE
        assert decode_body(MessageType.GOODBYE, tid, body).error_cause == \
            ErrorCause.GATEWAY_NOT_ALLOWED
        await raw2.expect_eof(timeout=BOUND)
        raw1.close()
        raw2.close()
        async with await connect(dep, server.address, "gw3.example") as gw3:
            assert (await gw3.register(dep.ue("a@example"))).ok


async def test_a_refused_reload_changes_nothing(tmp_path, pki):
    """New CRL, a gateway removed, another's settings changed, the log level changed, and a
    broken provisioning file: the reload is refused and every session, setting and level is
    as before."""
    dep = make_deployment(tmp_path / "d", pki,
                          ues={"a@example": ["gw1.example"], "b@example": ["gw2.example"]},
                          gateways=(Gw("gw1.example"), Gw("gw2.example")))
    async with running_server(dep) as server:
        gw1 = await connect(dep, server.address, "gw1.example")
        gw2 = await connect(dep, server.address, "gw2.example")
        level = logging.getLogger().level
        tls = server.tls
        crl = pki.crl(["gw1.example"], name=f"crl-{tmp_path.name}.pem")
        text = dep.config_path.read_text()
        text = text.replace("[registry]", f'crl = "{crl}"\n[registry]', 1)
        text = text.replace('identity = "gw2.example"\nue_authentication = true',
                            'identity = "gw2.example"\nue_authentication = false')
        text = text.replace("[limits]", '[log]\nlevel = "debug"\n[limits]', 1)
        dep.config_path.write_text(text)
        (dep.dir / "ues.csv").write_text("ue_service_id,key,gateways\nbroken,zz,gw1.example\n")
        result = await server.reload_now()
        assert not result["ok"] and result["part"] == "provisioning", result
        assert server.tls is tls and logging.getLogger().level == level
        assert server.gateways["gw2.example"].ue_authentication
        assert (await gw1.register(dep.ue("a@example"))).ok
        assert (await gw2.register(dep.ue("b@example"))).ok
        assert gw1.is_open and gw2.is_open and len(server.connections) == 2
        await gw1.close()
        await gw2.close()
