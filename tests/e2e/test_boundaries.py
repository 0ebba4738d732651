"""Who may talk to msgd: certificates, CAs, ALPN, gateway table, per-UE authorisation."""

from __future__ import annotations

import pytest

from tests.harness import Gw, RawGateway, make_deployment, running_server
from tests.hostile.tools import refused
from wire.constants import ErrorCause, MessageType
from wire.credential import compute_proof
from wire.messages import (
    BulkMessage,
    Error,
    RegistrationEntry,
    UeDeregistrationRequest,
    UeRegistrationRequest,
    UeRegistrationResponse,
    encode_message,
)

UES = {"a1@example": ["gw1.example"], "b1@example": ["gw2.example"]}


@pytest.fixture
def dep(tmp_path, pki):
    return make_deployment(tmp_path / "d", pki, ues=UES, gateways=(
        Gw("gw1.example"), Gw("gw2.example"), Gw("gw3.example", bulk_allowed=False)))


async def test_certificate_from_another_ca_is_refused(dep):
    async with running_server(dep) as server:
        other = dep.pki.other_gateway
        await refused(RawGateway.open(dep, server.address, None, cert=(other.cert, other.key)))


async def test_no_client_certificate_is_refused(dep):
    async with running_server(dep) as server:
        await refused(RawGateway.open(dep, server.address, None))


async def test_no_alpn_is_refused(dep):
    async with running_server(dep) as server:
        raw = await RawGateway.open(dep, server.address, "gw1.example", alpn=False)
        await raw.expect_eof()
        # The same gateway with ALPN is served.
        ok = await RawGateway.open(dep, server.address, "gw1.example")
        ack = await ok.hello()
        assert ack.ue_authentication_required == 1
        ok.close()


async def test_unknown_identity_gets_gateway_not_allowed(dep, tmp_path):
    dep2 = make_deployment(tmp_path / "d2", dep.pki, ues=UES, gateways=(Gw("gw2.example"),))
    async with running_server(dep2) as server:
        raw = await RawGateway.open(dep2, server.address, "gw1.example")
        from wire.messages import Hello

        raw.writer.write(encode_message(Hello(5, 2)))
        err = await raw.read_message()
        assert isinstance(err, Error) and err.error_cause == ErrorCause.GATEWAY_NOT_ALLOWED
        assert err.transaction_id == 5
        await raw.expect_eof()


async def test_gateway_a_cannot_touch_gateway_b_ues(dep):
    async with running_server(dep) as server:
        b = await RawGateway.open(dep, server.address, "gw2.example")
        await b.hello()
        key_b = dep.keys["b1@example"]
        await b.send(encode_message(UeRegistrationRequest(
            2, "b1@example", compute_proof(key_b, b.nonce, 1, "b1@example"))))
        rsp = await b.read_message()
        assert isinstance(rsp, UeRegistrationResponse) and rsp.result == 0
        a = await RawGateway.open(dep, server.address, "gw1.example")
        await a.hello()
        # Even with B's key (a stolen credential), A is not authorised for B's UE.
        await a.send(encode_message(UeRegistrationRequest(
            2, "b1@example", compute_proof(key_b, a.nonce, 1, "b1@example"))))
        rsp = await a.read_message()
        assert rsp.failure_cause == 3  # GATEWAY_NOT_AUTHORIZED
        await a.send(encode_message(UeDeregistrationRequest(
            3, "b1@example", compute_proof(key_b, a.nonce, 2, "b1@example"))))
        rsp = await a.read_message()
        assert rsp.failure_cause == 5  # REGISTERED_VIA_OTHER_GATEWAY
        # A proof made for B's connection is worthless on another connection (wire-v1 §6).
        replay = compute_proof(key_b, b.nonce, 1, "b1@example")
        b2 = await RawGateway.open(dep, server.address, "gw2.example")
        await b2.hello()
        await b2.send(encode_message(UeRegistrationRequest(2, "b1@example", replay)))
        rsp = await b2.read_message()
        assert rsp.failure_cause == 2  # AUTHENTICATION_FAILED
        assert server.registry.registration("b1@example").gateway == "gw2.example"
        for raw in (a, b, b2):
            raw.close()


async def test_bulk_not_allowed_for_gateway(dep):
    dep.write_provisioning([("c1@example", b"\x01" * 32, ["gw3.example"])])
    async with running_server(dep) as server:
        raw = await RawGateway.open(dep, server.address, "gw3.example")
        ack = await raw.hello()
        assert ack.bulk_allowed == 0
        entry = RegistrationEntry("c1@example", compute_proof(b"\x01" * 32, raw.nonce, 1,
                                                              "c1@example"))
        await raw.send(encode_message(
            BulkMessage(MessageType.BULK_REGISTRATION_REQUEST, 7, 1, (entry,))))
        err = await raw.read_message()
        assert err.error_cause == ErrorCause.BULK_NOT_ALLOWED and err.transaction_id == 7
        # The connection stays; the same UE registers individually (8.2.X step 1 fallback).
        await raw.send(encode_message(UeRegistrationRequest(8, "c1@example", entry.credential)))
        rsp = await raw.read_message()
        assert rsp.result == 0
        raw.close()


async def test_invalid_frames_get_errors_and_connection_survives_or_closes(dep):
    async with running_server(dep) as server:
        raw = await RawGateway.open(dep, server.address, "gw1.example")
        await raw.hello()
        await raw.send(bytes.fromhex("017f00000000000900000000"))  # unknown type
        err = await raw.read_message()
        assert err.error_cause == ErrorCause.UNKNOWN_MESSAGE_TYPE
        await raw.send(bytes.fromhex("020300000000000900000000"))  # version 2
        err = await raw.read_message()
        assert err.error_cause == ErrorCause.UNSUPPORTED_VERSION
        await raw.expect_eof()
        # FRAME_TOO_LARGE is decided from the header alone, before any body is buffered.
        raw2 = await RawGateway.open(dep, server.address, "gw1.example")
        await raw2.hello()
        await raw2.send(bytes.fromhex("0110000000000009") + (1 << 24).to_bytes(4, "big"))
        err = await raw2.read_message()
        assert err.error_cause == ErrorCause.FRAME_TOO_LARGE
        await raw2.expect_eof()
