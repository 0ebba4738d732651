"""Reload without restart: certificate rotation, broken files, CRL revocation, gateway removal.

In-process servers (tests/harness.py running_server) and Server.reload_now(), the coroutine
SIGHUP runs (tests/ops/test_systemd_daemon.py sends a real SIGHUP to a real daemon).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from msgd.gateway import ConnectionLost, HandshakeError
from msgd.tls.devpki import CertPaths, make_gateway_cert, make_server_cert
from tests.harness import Gw, RawGateway, connect, make_deployment, running_server
from tests.hostile.tools import refused
from wire.constants import ErrorCause, FailureCause

UES = {"a@example": ["gw1.example"], "b@example": ["gw2.example"],
       "a2@example": ["gw1.example"], "b2@example": ["gw2.example"]}


def _deployment(tmp_path, pki):
    """A deployment whose server certificate and key are its own files (so they can rotate)."""
    tls = tmp_path / "tls"
    tls.mkdir()
    shutil.copy(pki.server_cert, tls / "server.pem")
    shutil.copy(pki.server_key, tls / "server.key")
    dep = make_deployment(tmp_path / "d", pki, ues=UES,
                          gateways=(Gw("gw1.example"), Gw("gw2.example")))
    text = dep.config_path.read_text()
    text = text.replace(str(pki.server_cert), str(tls / "server.pem"))
    text = text.replace(str(pki.server_key), str(tls / "server.key"))
    dep.config_path.write_text(text)
    return dep, tls


def _events(caplog, name: str) -> list[dict]:
    """The fields of every `name` event logged (the daemon's structured log records)."""
    return [dict(getattr(r, "msgd_fields", {})) for r in caplog.records if r.getMessage() == name]


def _served_fingerprint(gw) -> str:
    der = gw.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


def _file_fingerprint(path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _replace(path, data: bytes) -> None:
    """As an operator's deploy tool should: write aside, then rename over."""
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


async def _refused(dep, server, identity: str) -> None:
    """New connections of `identity` are refused: a TLS alert, a reset or EOF within a bound,
    at the handshake or at the first read (TLS 1.3); a timeout is no refusal."""
    await refused(RawGateway.open(dep, server.address, identity))


async def test_rotated_certificate_is_served_to_new_connections_only(tmp_path, pki, caplog):
    dep, tls = _deployment(tmp_path, pki)
    old_fp = _file_fingerprint(tls / "server.pem")
    async with running_server(dep) as server, await connect(dep, server.address) as before:
        assert _served_fingerprint(before) == old_fp
        assert (await before.register(dep.ue("a@example"))).ok

        # A renewed certificate with a new key, written over the old files, then reload.
        make_server_cert(CertPaths(pki.ca, pki.ca_key), tls, "localhost",
                         ("localhost", "127.0.0.1"), force=True)
        new_fp = _file_fingerprint(tls / "server.pem")
        assert new_fp != old_fp
        result = await server.reload_now()
        assert result["ok"], result

        async with await connect(dep, server.address) as after:
            assert _served_fingerprint(after) == new_fp
            assert (await after.register(dep.ue("a2@example"))).ok
        # The session from before goes on, on the certificate it started with.
        assert _served_fingerprint(before) == old_fp
        assert (await before.deregister(dep.ue("a@example"))).ok
    serial = x509.load_pem_x509_certificate((tls / "server.pem").read_bytes()).serial_number
    assert _events(caplog, "reload.tls")[-1]["serial"] == f"{serial:x}"


@pytest.mark.parametrize("breakage", ["garbage", "key_mismatch", "key_missing"])
async def test_broken_new_certificate_leaves_the_old_one_serving(tmp_path, pki, breakage,
                                                                 caplog):
    dep, tls = _deployment(tmp_path, pki)
    old_fp = _file_fingerprint(tls / "server.pem")
    async with running_server(dep) as server:
        if breakage == "garbage":
            _replace(tls / "server.pem", b"-----BEGIN CERTIFICATE-----\nnot base64\n")
        elif breakage == "key_mismatch":
            # A valid certificate whose key is not the one configured.
            other = tmp_path / "other"
            other.mkdir()
            made = make_server_cert(CertPaths(pki.ca, pki.ca_key), other)
            _replace(tls / "server.pem", made.cert.read_bytes())
        else:
            (tls / "server.key").unlink()
        result = await server.reload_now()
        assert not result["ok"]
        assert result["part"] in ("tls", "config")  # a missing file fails the config check
        (failed,) = _events(caplog, "reload.failed")
        assert failed["effect"] == "nothing changed" and failed["part"] == result["part"]
        assert "PRIVATE KEY" not in failed["reason"]
        # Still the old certificate for new connections, and registrations still work.
        async with await connect(dep, server.address) as gw:
            assert _served_fingerprint(gw) == old_fp
            assert (await gw.register(dep.ue("a@example"))).ok
        assert server.metrics.registry.get_sample_value("msgd_config_last_reload_successful") == 0


async def test_revoked_gateway_is_refused_and_its_session_ended(tmp_path, pki):
    dep, _tls = _deployment(tmp_path, pki)
    async with running_server(dep) as server:
        revoked = await connect(dep, server.address, "gw1.example")
        kept = await connect(dep, server.address, "gw2.example")
        assert (await revoked.register(dep.ue("a@example"))).ok
        assert (await kept.register(dep.ue("b@example"))).ok

        crl = pki.crl(["gw1.example"], name=f"crl-{tmp_path.name}.pem")
        text = dep.config_path.read_text()
        dep.config_path.write_text(text.replace("[registry]", f'crl = "{crl}"\n[registry]', 1))
        result = await server.reload_now()
        assert result["ok"], result
        assert result["changes"]["sessions_ended"] == 1

        # The revoked gateway's established session gets GOODBYE and ends.
        await asyncio.wait_for(revoked.wait_closed(), 10)
        assert revoked.goodbye is not None
        assert revoked.goodbye.error_cause == ErrorCause.GATEWAY_NOT_ALLOWED
        with pytest.raises(ConnectionLost):
            await revoked.register(dep.ue("a2@example"))
        # Everyone else is untouched.
        assert (await kept.register(dep.ue("b2@example"))).ok
        # New connections: the revoked certificate is refused at the TLS handshake.
        await _refused(dep, server, "gw1.example")
        async with await connect(dep, server.address, "gw2.example") as again:
            assert (await again.deregister(dep.ue("b@example"))).ok
        # Registrations made before the revocation stay (revocation ends sessions, not UEs):
        # to another gateway a@example is still registered, via gw1; the registration the
        # ended session could not send registered nothing.
        stayed = await kept.deregister(dep.ue("a@example"))
        assert stayed.cause == FailureCause.REGISTERED_VIA_OTHER_GATEWAY, stayed
        never = await kept.deregister(dep.ue("a2@example"))
        assert never.cause == FailureCause.NOT_REGISTERED, never
        await kept.close()


async def test_reissued_certificate_for_a_revoked_gateway_connects(tmp_path, pki):
    # Revocation is per certificate: a new certificate for the same identity is served.
    dep, _tls = _deployment(tmp_path, pki)
    gw_dir = tmp_path / "gw"
    gw_dir.mkdir()
    fresh = make_gateway_cert(CertPaths(pki.ca, pki.ca_key), gw_dir, "gw1.example")
    crl = pki.crl(["gw1.example"], name=f"crl-{tmp_path.name}.pem")
    text = dep.config_path.read_text()
    dep.config_path.write_text(text.replace("[registry]", f'crl = "{crl}"\n[registry]', 1))
    async with running_server(dep) as server:
        await _refused(dep, server, "gw1.example")
        raw = await RawGateway.open(dep, server.address, None, cert=(fresh.cert, fresh.key))
        ack = await raw.hello()
        assert ack.server_nonce
        raw.close()


async def test_removed_gateway_gets_goodbye_others_stay(tmp_path, pki):
    dep, _tls = _deployment(tmp_path, pki)
    async with running_server(dep) as server:
        gw1 = await connect(dep, server.address, "gw1.example")
        gw2 = await connect(dep, server.address, "gw2.example")
        text = dep.config_path.read_text()
        text = text.replace('identity = "gw2.example"', 'identity = "gw3.example"')
        dep.config_path.write_text(text)
        result = await server.reload_now()
        assert result["ok"] and result["changes"]["gateways_removed"] == ["gw2.example"]
        assert result["changes"]["gateways_added"] == ["gw3.example"]
        await asyncio.wait_for(gw2.wait_closed(), 10)
        assert gw2.goodbye.error_cause == ErrorCause.GATEWAY_NOT_ALLOWED
        assert (await gw1.register(dep.ue("a@example"))).ok
        with pytest.raises(HandshakeError):
            await connect(dep, server.address, "gw2.example")
        await gw1.close()


async def test_bad_configuration_or_provisioning_changes_nothing(tmp_path, pki, caplog):
    dep, _tls = _deployment(tmp_path, pki)
    good_config = dep.config_path.read_text()
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        dep.config_path.write_text(good_config + "\n[limits]\nbogus = 1\n")
        result = await server.reload_now()
        assert not result["ok"] and result["part"] == "config"

        # A provisioning file broken on line 3, together with a gateway table change: the
        # table must not change either (all or nothing).
        dep.config_path.write_text(good_config.replace('identity = "gw2.example"',
                                                       'identity = "gw3.example"'))
        (dep.dir / "ues.csv").write_text(
            "ue_service_id,key,gateways\nnew@example," + "ab" * 32 + ",gw1.example\nbad,zz,gw1\n")
        result = await server.reload_now()
        assert not result["ok"] and result["part"] == "provisioning"
        assert "line 3" in result["error"]
        assert set(server.gateways) == {"gw1.example", "gw2.example"}
        assert server.registry.provisioned("new@example") is None
        assert (await gw.register(dep.ue("a@example"))).ok
    assert [e["part"] for e in _events(caplog, "reload.failed")] == ["config", "provisioning"]
