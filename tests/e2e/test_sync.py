"""wire v1.1 registry sync end to end (docs/protocol.md §6): real msgd in this process, real
TLS on 127.0.0.1, a real SQLite file, the gateway client's sync and a raw gateway."""

from __future__ import annotations

import asyncio

import pytest

from tests.harness import Gw, RawGateway, connect, make_deployment, running_server
from wire.constants import ErrorCause, MessageType
from wire.messages import DigestRequest, Profile, encode_message

UIDS = [f"ue-{n:02d}@gw1.example" for n in range(20)]
SHARED = "shared@example"


@pytest.fixture
def dep(tmp_path, pki):
    ues = {uid: ["gw1.example"] for uid in UIDS}
    ues[SHARED] = ["gw1.example", "gw2.example"]
    return make_deployment(tmp_path / "d", pki, ues=ues, gateways=(
        Gw("gw1.example"), Gw("gw2.example"), Gw("gw3.example")))


async def test_ten_differences_found_and_repaired(dep):
    """5 missing, 3 extra, 2 with another profile: found, repaired, then in sync."""
    old, new = Profile(ue_type=1), Profile(ue_type=2)
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        for n in range(15):  # the server holds 0..14, 10 and 11 with the old profile
            ue = dep.ue(UIDS[n])
            if n in (10, 11):
                ue = type(ue)(ue.ue_service_id, ue.key, old)
            assert (await gw.register(ue)).ok
        # The gateway's file: 0..9, 10 and 11 with the new profile, 15..19; not 12..14.
        mine = [dep.ue(UIDS[n]) for n in range(10)]
        mine += [type(u)(u.ue_service_id, u.key, new) for u in map(dep.ue, UIDS[10:12])]
        mine += [dep.ue(uid) for uid in UIDS[15:]]
        report = await gw.sync(mine)
        assert sorted(report.missing) == UIDS[15:]
        assert sorted(report.extra) == UIDS[12:15]
        assert sorted(report.profile_differs) == UIDS[10:12]
        assert not report.in_sync and server.registry.registered_count() == 15
        repaired = await gw.sync(mine, repair=True)
        assert len(repaired.repaired) == 10 and repaired.remaining == 0
        again = await gw.sync(mine)
        assert again.in_sync and again.buckets_listed == 0
        assert server.registry.registration(UIDS[12]) is None
        assert server.registry.registration(UIDS[10]).profile == b"\x30\x00\x01\x02"


async def test_takeover_moves_the_ue_between_the_two_digests(dep):
    async with running_server(dep) as server, \
            await connect(dep, server.address) as gw1, \
            await connect(dep, server.address, identity="gw2.example") as gw2:
        ue = dep.ue(SHARED)
        assert (await gw1.register(ue)).ok
        assert (await gw1.sync([ue])).in_sync
        assert (await gw2.sync([])).in_sync
        assert (await gw2.register(ue)).ok  # takeover
        assert (await gw1.sync([ue])).missing == [SHARED]
        assert (await gw1.sync([])).in_sync
        assert (await gw2.sync([ue])).in_sync
        # Release refuses a UE registered through another gateway.
        result = await gw1.release(SHARED)
        assert not result.ok and result.cause.name == "REGISTERED_VIA_OTHER_GATEWAY"
        assert server.registry.registration(SHARED).gateway == "gw2.example"


async def test_an_empty_gateway_is_in_sync_with_an_empty_set(dep):
    async with running_server(dep) as server, \
            await connect(dep, server.address, identity="gw3.example") as gw3:
        report = await gw3.sync([])
        assert report.in_sync and report.buckets_listed == 0
        assert not (await gw3.release("nobody@example")).ok


async def test_sync_during_a_bulk_of_the_same_gateway(dep):
    async with running_server(dep) as server, await connect(dep, server.address) as gw:
        ues = [dep.ue(uid) for uid in UIDS]
        results = []

        async def bulk() -> None:
            async for result in gw.bulk_register(ues):
                results.append(result)

        task = asyncio.create_task(bulk())
        report = await gw.sync(ues)  # whatever is durable by then; must not break the bulk
        await task
        assert all(r.ok for r in results) and len(results) == 20
        assert len(report.missing) <= 20 and not report.extra
        assert (await gw.sync(ues)).in_sync


async def test_bad_bucket_numbers_get_a_clear_error_and_the_session_goes_on(dep):
    async with running_server(dep) as server:
        raw = await RawGateway.open(dep, server.address)
        try:
            ack = await raw.hello()
            assert ack.sync_supported == 1
            # LIST REQUEST b = 4 naming bucket 16 (our encoder refuses to build it).
            await raw.send(bytes.fromhex("011a0000 00000002 00000009 1e000104 210002 0010"
                                         .replace(" ", "")))
            error = await raw.read_message()
            assert error.error_cause == ErrorCause.INVALID_MESSAGE and error.transaction_id == 2
            assert "bucket 16" in error.diagnostic
            await raw.send(encode_message(DigestRequest(3, 0)))
            mtype, flags, tid, body = await raw.read_frame()
            assert (mtype, flags, tid) == (MessageType.DIGEST_RESPONSE, 0, 3)
            assert body.endswith(bytes(16))  # an empty gateway: a zero digest
        finally:
            raw.close()


async def test_msgctl_gateway_sync_reports_and_repairs(dep, tmp_path):
    import io

    from msgd.cli.gateway_sync import _sync
    from msgd.cli.main import parse_args

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
