"""wire v1.1 registry sync end to end (docs/protocol.md §6): real msgd in this process, real
TLS on 127.0.0.1, a real SQLite file, the gateway client's sync and a raw gateway. The
scenarios are shared with the PostgreSQL nodes (tests/sync_scenarios.py)."""

from __future__ import annotations

import asyncio
import io

import pytest

from msgd.cli.gateway_sync import _sync
from msgd.cli.main import parse_args
from tests import sync_scenarios as scenarios
from tests.harness import Gw, connect, make_deployment, running_server
from tests.sync_scenarios import SHARED, UIDS


@pytest.fixture
def dep(tmp_path, pki):
    return make_deployment(tmp_path / "d", pki, ues=scenarios.SYNC_UES, gateways=(
        Gw("gw1.example"), Gw("gw2.example"), Gw("gw3.example")))


def _connector(dep, server):
    async def make(identity: str):
        return await connect(dep, server.address, identity=identity)
    return make


async def test_ten_differences_found_and_repaired(dep):
    async with running_server(dep) as server:
        await scenarios.ten_differences(dep, _connector(dep, server))
        assert server.registry.registration(UIDS[12]) is None
        assert server.registry.registration(UIDS[10]).profile == b"\x30\x00\x01\x02"
        assert server.registry.registered_count() == 17


async def test_takeover_moves_the_ue_between_the_two_digests(dep):
    async with running_server(dep) as server:
        connect_gw = _connector(dep, server)
        await scenarios.takeover(dep, connect_gw, connect_gw)
        assert server.registry.registration(SHARED) is None


async def test_an_empty_gateway_is_in_sync_with_an_empty_set(dep):
    async with running_server(dep) as server:
        await scenarios.empty_gateway(_connector(dep, server), "gw3.example")


async def test_bad_bucket_numbers_get_a_clear_error_and_the_session_goes_on(dep):
    async with running_server(dep) as server:
        await scenarios.bad_bucket_numbers(dep, server.address)


async def test_sync_during_a_bulk_of_the_same_gateway(dep):
    """A sync while a bulk of the same gateway is being answered: both finish, the sync
    finds no extra UE and no other profile (only UEs not yet durable are missing), what it
    found on the server stays there, and afterwards the two sets agree."""
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        ues = [dep.ue(uid) for uid in UIDS]
        results = []

        async def bulk() -> None:
            async for result in gw.bulk_register(ues):
                results.append(result)

        task = asyncio.create_task(bulk())
        report = await gw.sync(ues)
        durable_then = set(UIDS) - set(report.missing)
        await task
        assert all(r.ok for r in results) and len(results) == 20
        assert not report.extra and not report.profile_differs
        # What the sync saw on the server was durable: it is still there (nothing removes it).
        assert all(server.registry.registration(uid) for uid in durable_then)
        assert (await gw.sync(ues)).in_sync


async def test_msgctl_gateway_sync_reports_and_repairs(dep, tmp_path):
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        assert (await gw.register(dep.ue(UIDS[0]))).ok
        ues = tmp_path / "ues.csv"
        ues.write_text("ue_service_id,key\n" + f"{UIDS[1]},{dep.keys[UIDS[1]].hex()}\n")
        host, port = server.address
        argv = ["gateway", "sync", "--server", f"{host}:{port}",
                "--cert", str(dep.pki.gateway_cert("gw1.example")),
                "--key", str(dep.pki.gateway_key("gw1.example")), "--ca", str(dep.pki.ca),
                "--server-name", "localhost", "--ues", str(ues), "--json"]
        out, err = io.StringIO(), io.StringIO()
        assert await _sync(parse_args(argv), out, err) == 1, err.getvalue()
        assert '"missing": ["ue-01@gw1.example"]' in out.getvalue()
        assert '"extra": ["ue-00@gw1.example"]' in out.getvalue()
        out = io.StringIO()
        assert await _sync(parse_args([*argv, "--repair"]), out, err) == 0, err.getvalue()
        assert await _sync(parse_args(argv), io.StringIO(), err) == 0
        assert server.registry.registration(UIDS[0]) is None
        bad = tmp_path / "bad.csv"
        bad.write_text("ue_service_id,key\nue,zz\n")
        err = io.StringIO()
        assert await _sync(parse_args([*argv[:-3], "--ues", str(bad)]), io.StringIO(),
                           err) == 2
        assert "msgctl gateway sync:" in err.getvalue()


async def test_a_v1_gateway_never_meets_the_sync_messages(dep):
    """The server only announces sync, with an IE a v1 gateway skips (0x1D, bit 7 clear),
    and sends no v1.1 message to a gateway that asked nothing: a v1 session, frame by frame."""
    from tests.harness import RawGateway
    from wire.constants import MessageType
    from wire.credential import compute_proof
    from wire.ies import split_ies
    from wire.messages import UeRegistrationRequest, encode_message

    async with running_server(dep) as server:
        raw = await RawGateway.open(dep, server.address)
        try:
            await raw.send(encode_message(scenarios.v1_hello()))
            mtype, _flags, _tid, body = await raw.read_frame()
            assert mtype == MessageType.HELLO_ACK
            ieis = [iei for iei, _ in split_ies(body)]
            assert ieis[-1] == 0x1D and not ieis[-1] & 0x80 and 0x1D not in ieis[:-1]
            nonce = dict(split_ies(body))[0x11]
            uid = UIDS[0]
            await raw.send(encode_message(UeRegistrationRequest(
                2, uid, compute_proof(dep.keys[uid], nonce, 1, uid))))
            mtype, _flags, tid, _body = await raw.read_frame()
            assert (mtype, tid) == (MessageType.UE_REGISTRATION_RESPONSE, 2)
        finally:
            raw.close()
