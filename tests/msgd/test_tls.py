"""msgd.tls: real TLS handshakes over 127.0.0.1 between server_context and client_context."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from msgd.errors import TLSSetupError
from msgd.tls.contexts import (
    certificate_not_after,
    client_context,
    crl_next_update,
    days_until_expiry,
    negotiated_alpn_ok,
    peer_identity,
    server_context,
)
from wire.constants import ALPN_PROTOCOL

try:
    from tests.pki import Pki, make_pki
except ModuleNotFoundError:
    # `.venv/bin/pytest` puts only tests/msgd on sys.path while tests/msgd has no __init__.py;
    # `python -m pytest` (the Makefile) adds the repo root itself.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.pki import Pki, make_pki

TIMEOUT = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Outcome:
    server_error: BaseException | None = None
    client_error: BaseException | None = None
    identity: str | None = None
    alpn_ok: bool | None = None
    version: str | None = None
    server_seen_by_client: str | None = None
    received: bytes | None = None

    @property
    def accepted(self) -> bool:
        return self.server_error is None and self.client_error is None and self.received == b"ok"


def handshake(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, server_hostname: str = "localhost"
) -> Outcome:
    """Accept one connection in a thread; the client reads the server's "ok" after it."""
    outcome = Outcome()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            outcome.server_error = exc
            return
        conn.settimeout(TIMEOUT)
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                outcome.identity = peer_identity(tls)
                outcome.alpn_ok = negotiated_alpn_ok(tls)
                outcome.version = tls.version()
                tls.sendall(b"ok")
                tls.recv(1)  # returns b"" once the client has closed
        except (ssl.SSLError, OSError) as exc:
            outcome.server_error = exc
        finally:
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            outcome.server_seen_by_client = peer_identity(tls)
            # TLS 1.3: the server checks our certificate after our side of the handshake is
            # done, so its refusal arrives as an alert on the first read.
            outcome.received = tls.recv(2)
    except (ssl.SSLError, OSError) as exc:
        outcome.client_error = exc
    finally:
        thread.join(TIMEOUT)
        listener.close()
    assert not thread.is_alive()
    return outcome


def gateway_client(pki: Pki, identity: str = "gw1.example", **kwargs: object) -> ssl.SSLContext:
    return client_context(
        pki.gateway_cert(identity),
        pki.gateway_key(identity),
        pki.ca,
        **kwargs,  # type: ignore[arg-type]
    )


def test_mutual_tls_gives_gateway_identity_and_alpn(pki: Pki) -> None:
    outcome = handshake(server_context(pki.tls_config()), gateway_client(pki))
    assert outcome.accepted, outcome
    assert outcome.identity == "gw1.example"
    assert outcome.alpn_ok is True
    assert outcome.version == "TLSv1.3"
    assert outcome.server_seen_by_client == "localhost"


def test_second_gateway_identity(pki: Pki) -> None:
    outcome = handshake(server_context(pki.tls_config()), gateway_client(pki, "gw2.example"))
    assert outcome.accepted, outcome
    assert outcome.identity == "gw2.example"


def test_client_offering_no_alpn_is_flagged(pki: Pki) -> None:
    # wire-v1 §1: the server must refuse; the handshake itself succeeds, hence the check.
    outcome = handshake(server_context(pki.tls_config()), gateway_client(pki, alpn_protocols=()))
    assert outcome.server_error is None
    assert outcome.alpn_ok is False


def test_client_offering_other_alpn_is_flagged(pki: Pki) -> None:
    ctx = gateway_client(pki, alpn_protocols=("h2", "http/1.1"))
    outcome = handshake(server_context(pki.tls_config()), ctx)
    assert outcome.server_error is None
    assert outcome.alpn_ok is False


def test_client_certificate_from_another_ca_is_refused(pki: Pki) -> None:
    # Same CN as a real gateway, wrong issuer: the CN alone must not get in.
    ctx = client_context(pki.other_gateway.cert, pki.other_gateway.key, pki.ca)
    outcome = handshake(server_context(pki.tls_config()), ctx)
    assert isinstance(outcome.server_error, ssl.SSLCertVerificationError), outcome
    assert outcome.identity is None
    assert outcome.received != b"ok"


def test_client_without_certificate_is_refused(pki: Pki) -> None:
    outcome = handshake(server_context(pki.tls_config()), client_context(None, None, pki.ca))
    assert isinstance(outcome.server_error, ssl.SSLError), outcome
    assert "certificate" in str(outcome.server_error).lower()
    assert outcome.received != b"ok"


def test_revoked_gateway_is_refused_and_others_accepted(pki: Pki) -> None:
    crl = pki.crl(["gw2.example"], name="crl-gw2.pem")
    server_ctx = server_context(pki.tls_config(crl=crl))
    refused = handshake(server_ctx, gateway_client(pki, "gw2.example"))
    assert isinstance(refused.server_error, ssl.SSLCertVerificationError), refused
    assert "revoked" in refused.server_error.verify_message
    assert refused.received != b"ok"
    accepted = handshake(server_ctx, gateway_client(pki, "gw1.example"))
    assert accepted.accepted, accepted
    assert accepted.identity == "gw1.example"


def test_tls12_is_refused_by_default(pki: Pki) -> None:
    ctx = client_context(
        pki.gateway_cert("gw1.example"), pki.gateway_key("gw1.example"), pki.ca, min_version="1.2"
    )
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    outcome = handshake(server_context(pki.tls_config()), ctx)
    assert isinstance(outcome.server_error, ssl.SSLError), outcome
    assert isinstance(outcome.client_error, ssl.SSLError), outcome
    assert outcome.identity is None


def test_tls12_is_accepted_when_configured(pki: Pki) -> None:
    ctx = client_context(
        pki.gateway_cert("gw1.example"), pki.gateway_key("gw1.example"), pki.ca, min_version="1.2"
    )
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    outcome = handshake(server_context(pki.tls_config(min_version="1.2")), ctx)
    assert outcome.accepted, outcome
    assert outcome.version == "TLSv1.2"
    assert outcome.identity == "gw1.example"
    assert outcome.alpn_ok is True


def test_client_checks_server_hostname(pki: Pki) -> None:
    outcome = handshake(
        server_context(pki.tls_config()), gateway_client(pki), server_hostname="wrong.example"
    )
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError), outcome


def test_client_refuses_server_from_another_ca(pki: Pki) -> None:
    ctx = client_context(
        pki.gateway_cert("gw1.example"), pki.gateway_key("gw1.example"), pki.other_ca
    )
    outcome = handshake(server_context(pki.tls_config()), ctx)
    assert isinstance(outcome.client_error, ssl.SSLCertVerificationError), outcome


async def test_asyncio_server_sees_identity_on_ssl_object(pki: Pki) -> None:
    # The daemon gets an ssl.SSLObject from asyncio, not an SSLSocket.
    seen: asyncio.Future[tuple[str | None, bool]] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        seen.set_result((peer_identity(ssl_object), negotiated_alpn_ok(ssl_object)))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(
        handle, "127.0.0.1", 0, ssl=server_context(pki.tls_config())
    )
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=gateway_client(pki), server_hostname="localhost"
        )
        assert await asyncio.wait_for(reader.readexactly(2), TIMEOUT) == b"ok"
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == ALPN_PROTOCOL
        assert await asyncio.wait_for(seen, TIMEOUT) == ("gw1.example", True)
        writer.close()
        await writer.wait_closed()


# -- setup errors -------------------------------------------------------------------------


def test_key_not_matching_certificate(pki: Pki) -> None:
    cfg = replace(pki.tls_config(), private_key=pki.gateway_key("gw1.example"))
    with pytest.raises(TLSSetupError) as info:
        server_context(cfg)
    message = str(info.value)
    assert "tls.private_key" in message and "does not match tls.certificate" in message
    assert_no_key_material(message, pki.gateway_key("gw1.example"))


def test_garbage_key_is_reported_without_its_content(pki: Pki, tmp_path: Path) -> None:
    secret = "s3cr3t-k3y-m4t3r14l"
    bad = tmp_path / "bad.key"
    bad.write_text(f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n")
    with pytest.raises(TLSSetupError, match=r"tls\.private_key .*not a PEM private key") as info:
        server_context(replace(pki.tls_config(), private_key=bad))
    assert secret not in str(info.value)


def test_encrypted_key_is_reported(pki: Pki, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "enc.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass"),
        )
    )
    with pytest.raises(TLSSetupError, match=r"tls\.private_key .*encrypted"):
        server_context(replace(pki.tls_config(), private_key=path))


@pytest.mark.parametrize("field", ["certificate", "private_key", "gateway_ca", "crl"])
def test_missing_file_names_the_key(pki: Pki, tmp_path: Path, field: str) -> None:
    cfg = replace(pki.tls_config(), **{field: tmp_path / "absent.pem"})
    with pytest.raises(TLSSetupError, match=rf"^tls\.{field} .*absent\.pem: cannot read"):
        server_context(cfg)


def test_ca_file_without_certificate(pki: Pki, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing here\n")
    with pytest.raises(TLSSetupError, match=r"^tls\.gateway_ca "):
        server_context(replace(pki.tls_config(), gateway_ca=empty))


def test_crl_from_another_ca_is_refused(pki: Pki) -> None:
    from msgd.tls.devpki import CertPaths, make_crl

    other = CertPaths(pki.other_ca, pki.other_ca_key)
    crl = make_crl(other, [pki.other_gateway.cert], pki.dir / "other-crl.pem")
    with pytest.raises(TLSSetupError, match=r"^tls\.crl .*not signed by a CA in tls\.gateway_ca"):
        server_context(pki.tls_config(crl=crl))


def test_expired_crl_is_refused(pki: Pki) -> None:
    crl = pki.crl([], name="crl-empty.pem")
    next_update = crl_next_update(crl)
    assert next_update is not None
    later = next_update + dt.timedelta(seconds=1)
    with pytest.raises(TLSSetupError, match=r"^tls\.crl .*expired"):
        server_context(pki.tls_config(crl=crl), now=later)
    server_context(pki.tls_config(crl=crl), now=next_update - dt.timedelta(seconds=1))


def test_expired_certificate_is_refused(pki: Pki) -> None:
    later = certificate_not_after(pki.server_cert) + dt.timedelta(seconds=1)
    with pytest.raises(TLSSetupError, match=r"^tls\.certificate .*expired"):
        server_context(pki.tls_config(), now=later)


def test_min_version_below_12_is_refused(pki: Pki) -> None:
    with pytest.raises(TLSSetupError, match="min_version"):
        server_context(pki.tls_config(min_version="1.1"))
    with pytest.raises(TLSSetupError, match="min_version"):
        client_context(None, None, pki.ca, min_version="1.0")


def test_client_context_needs_cert_and_key_together(pki: Pki) -> None:
    with pytest.raises(TLSSetupError, match="both"):
        client_context(pki.gateway_cert("gw1.example"), None, pki.ca)


def test_certificate_dates(pki: Pki) -> None:
    not_after = certificate_not_after(pki.gateway_cert("gw1.example"))
    now = dt.datetime.now(dt.UTC)
    assert not_after.tzinfo is not None
    # msgd.certs makes leaf certificates for 825 days.
    assert dt.timedelta(days=824) < not_after - now <= dt.timedelta(days=825)
    assert 824 < days_until_expiry(pki.gateway_cert("gw1.example"), now) <= 825
    assert days_until_expiry(pki.server_cert, not_after + dt.timedelta(days=2)) < 0
    with pytest.raises(TLSSetupError):
        certificate_not_after(pki.dir / "absent.pem")


def assert_no_key_material(message: str, key_path: Path) -> None:
    assert "PRIVATE KEY" not in message
    for line in key_path.read_text().splitlines():
        if not line.startswith("-----"):
            assert line not in message
