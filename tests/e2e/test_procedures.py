"""The four procedures end to end: real TLS on 127.0.0.1, real certificates, real SQLite."""

from __future__ import annotations

import secrets

import pytest

from msgd.gateway import GatewayUe, HandshakeError
from msgd.registry.store import Registry
from tests.harness import Gw, connect, make_deployment, running_server
from wire.constants import FailureCause

UES = {f"ue-{i:04d}@gw1.example": ["gw1.example"] for i in range(1, 6)}
UES["shared@example"] = ["gw1.example", "gw2.example"]
UES["gw2-only@example"] = ["gw2.example"]


@pytest.fixture
def dep(tmp_path, pki):
    return make_deployment(tmp_path / "d", pki, ues=UES, gateways=(
        Gw("gw1.example"), Gw("gw2.example"), Gw("gw3.example", ue_authentication=False,
                                                  bulk_allowed=False)))


async def test_register_and_deregister_single(dep):
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        ue = dep.ue("ue-0001@gw1.example")
        result = await gw.register(ue)
        assert result.ok and result.ue_service_id == ue.ue_service_id
        reg = server.registry.registration(ue.ue_service_id)
        assert reg is not None and reg.gateway == "gw1.example"
        assert server.registry.durable_seq >= server.registry.last_seq
        result = await gw.deregister(ue)
        assert result.ok
        assert server.registry.registration(ue.ue_service_id) is None
        again = await gw.deregister(ue)
        assert not again.ok and again.cause is FailureCause.NOT_REGISTERED


async def test_per_entry_failures(dep):
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        unknown = await gw.register(GatewayUe("nobody@example", secrets.token_bytes(32)))
        assert unknown.cause is FailureCause.UE_NOT_PROVISIONED
        other = await gw.register(dep.ue("gw2-only@example"))
        assert other.cause is FailureCause.GATEWAY_NOT_AUTHORIZED
        wrong_key = await gw.register(dep.ue("ue-0002@gw1.example", key=secrets.token_bytes(32)))
        assert wrong_key.cause is FailureCause.AUTHENTICATION_FAILED
        assert server.registry.registered_count() == 0


async def test_credential_required_unless_trusted(dep):
    async with running_server(dep) as server:
        async with await connect(dep, server.address) as gw1:
            assert gw1.authentication_required
            # A gateway that omits the credential when it is required is refused per UE; the
            # client library refuses to send it at all, so talk to the session directly.
            from wire.messages import UeRegistrationRequest
            tid = gw1.session.next_transaction_id()
            fut = gw1.loop.create_future()
            gw1._singles[tid] = (fut, "ue-0003@gw1.example")
            gw1.session.send_request(UeRegistrationRequest(tid, "ue-0003@gw1.example"))
            gw1.flush()
            result = await fut
            assert result.cause is FailureCause.AUTHENTICATION_FAILED
        dep.write_provisioning([("trusted@example", secrets.token_bytes(32), ["gw3.example"])])
        assert (await server.reload_now())["ok"]  # what SIGHUP runs, awaited
        async with await connect(dep, server.address, "gw3.example") as gw3:
            assert not gw3.authentication_required and not gw3.bulk_allowed
            ok = await gw3.register(GatewayUe("trusted@example"))
            assert ok.ok
            # A credential that is present is always verified, even for a trusted gateway.
            bad = await gw3.deregister(GatewayUe("trusted@example", secrets.token_bytes(32)))
            assert bad.cause is FailureCause.AUTHENTICATION_FAILED


async def test_reregistration_replaces_and_other_gateway_cannot_deregister(dep):
    async with (
        running_server(dep) as server,
        await connect(dep, server.address, "gw1.example") as gw1,
        await connect(dep, server.address, "gw2.example") as gw2,
    ):
        shared = dep.ue("shared@example")
        assert (await gw1.register(shared)).ok
        assert server.registry.registration("shared@example").gateway == "gw1.example"
        # wire-v1 §5: registration through another authorised gateway replaces it.
        assert (await gw2.register(shared)).ok
        assert server.registry.registration("shared@example").gateway == "gw2.example"
        denied = await gw1.deregister(shared)
        assert denied.cause is FailureCause.REGISTERED_VIA_OTHER_GATEWAY
        assert server.registry.registration("shared@example") is not None
        assert (await gw2.deregister(shared)).ok


async def test_bulk_register_and_deregister(dep):
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        ues = [dep.ue(f"ue-{i:04d}@gw1.example") for i in range(1, 6)]
        ues.append(GatewayUe("nobody@example", secrets.token_bytes(32)))
        results = [r async for r in gw.bulk_register(ues)]
        assert [r.ue_service_id for r in results] == [u.ue_service_id for u in ues]
        assert [r.ok for r in results] == [True] * 5 + [False]
        assert results[-1].cause is FailureCause.UE_NOT_PROVISIONED
        assert server.registry.registered_count() == 5
        results = [r async for r in gw.bulk_deregister(ues[:5])]
        assert all(r.ok for r in results)
        assert server.registry.registered_count() == 0


async def test_bulk_not_allowed_and_gateway_not_allowed(dep, pki, tmp_path):
    async with running_server(dep) as server:
        async with await connect(dep, server.address, "gw3.example") as gw3:
            # The client library falls back to individual registrations (8.2.X step 1).
            results = [r async for r in gw3.bulk_register([GatewayUe("x@example")])]
            assert [r.cause for r in results] == [FailureCause.UE_NOT_PROVISIONED]
        dep2 = make_deployment(tmp_path / "d2", pki, ues=UES, gateways=(Gw("gw2.example"),))
        async with running_server(dep2) as server2:
            with pytest.raises(HandshakeError) as refused:
                await connect(dep2, server2.address, "gw1.example")
            assert "GATEWAY_NOT_ALLOWED" in str(refused.value)


async def test_registrations_survive_restart(dep):
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        assert (await gw.register(dep.ue("ue-0004@gw1.example"))).ok
    registry = Registry.open(dep.config().registry.path)
    try:
        assert registry.registration("ue-0004@gw1.example").gateway == "gw1.example"
    finally:
        registry.close_sync()
