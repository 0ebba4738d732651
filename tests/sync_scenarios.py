"""wire v1.1 sync scenarios run against both registries (tests/e2e/test_sync.py on SQLite,
tests/postgres/test_sync_pg.py on PostgreSQL nodes): only the gateway's view is used, so the
same assertions hold whichever registry and node answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from msgd.gateway import GatewayClient
from tests.harness import Deployment, RawGateway
from wire.constants import ErrorCause, FailureCause, MessageType
from wire.messages import DigestRequest, Hello, Profile, encode_message

Connect = Callable[[str], Awaitable[GatewayClient]]
UIDS = [f"ue-{n:02d}@gw1.example" for n in range(20)]
SHARED = "shared@example"
SYNC_UES: dict[str, list[str]] = {
    **{uid: ["gw1.example"] for uid in UIDS}, SHARED: ["gw1.example", "gw2.example"]}
OLD, NEW = Profile(ue_type=1), Profile(ue_type=2)


async def ten_differences(dep: Deployment, connect: Connect) -> list:
    """5 missing, 3 extra, 2 with another profile: found, repaired, then in sync. Returns
    the gateway's set."""
    gw = await connect("gw1.example")
    try:
        for n in range(15):  # the server holds 0..14, 10 and 11 with the old profile
            ue = dep.ue(UIDS[n])
            if n in (10, 11):
                ue = type(ue)(ue.ue_service_id, ue.key, OLD)
            assert (await gw.register(ue)).ok
        # The gateway's file: 0..9, 10 and 11 with the new profile, 15..19; not 12..14.
        mine = [dep.ue(UIDS[n]) for n in range(10)]
        mine += [type(u)(u.ue_service_id, u.key, NEW) for u in map(dep.ue, UIDS[10:12])]
        mine += [dep.ue(uid) for uid in UIDS[15:]]
        report = await gw.sync(mine)
        assert sorted(report.missing) == UIDS[15:]
        assert sorted(report.extra) == UIDS[12:15]
        assert sorted(report.profile_differs) == UIDS[10:12]
        repaired = await gw.sync(mine, repair=True)
        assert len(repaired.repaired) == 10 and repaired.remaining == 0
        again = await gw.sync(mine)
        assert again.in_sync and again.buckets_listed == 0
        return mine
    finally:
        await gw.close()


async def takeover(dep: Deployment, connect_1: Connect, connect_2: Connect,
                   base: list | None = None) -> None:
    """A UE taken over by gw2 (possibly through another node) leaves gw1's digest and
    enters gw2's; gw1 cannot Release it any more. `base`: what gw1 holds already."""
    base = base or []
    gw1, gw2 = await connect_1("gw1.example"), await connect_2("gw2.example")
    try:
        ue = dep.ue(SHARED)
        assert (await gw1.register(ue)).ok
        assert (await gw1.sync([*base, ue])).in_sync
        assert (await gw2.sync([])).in_sync
        assert (await gw2.register(ue)).ok  # takeover
        assert (await gw1.sync([*base, ue])).missing == [SHARED]
        assert (await gw1.sync(base)).in_sync
        assert (await gw2.sync([ue])).in_sync
        result = await gw1.release(SHARED)
        assert not result.ok and result.cause is FailureCause.REGISTERED_VIA_OTHER_GATEWAY
        assert (await gw2.release(SHARED)).ok
        assert (await gw2.sync([])).in_sync
    finally:
        await gw1.close()
        await gw2.close()


async def empty_gateway(connect: Connect, identity: str) -> None:
    gw = await connect(identity)
    try:
        report = await gw.sync([])
        assert report.in_sync and report.buckets_listed == 0
        result = await gw.release("nobody@example")
        assert not result.ok and result.cause is FailureCause.NOT_REGISTERED
    finally:
        await gw.close()


async def bad_bucket_numbers(dep: Deployment, address: tuple[str, int]) -> None:
    """LIST REQUEST b = 4 naming bucket 16: ERROR(INVALID_MESSAGE) saying so; the session
    goes on and answers a DIGEST REQUEST."""
    raw = await RawGateway.open(dep, address)
    try:
        ack = await raw.hello()
        assert ack.sync_supported == 1
        # (Our encoder refuses to build this request, so it is written out.)
        await raw.send(bytes.fromhex("011a000000000002000000091e0001042100020010"))
        error = await raw.read_message()
        assert error.error_cause == ErrorCause.INVALID_MESSAGE and error.transaction_id == 2
        assert "bucket 16" in error.diagnostic
        await raw.send(encode_message(DigestRequest(3, 0)))
        mtype, flags, tid, _body = await raw.read_frame()
        assert (mtype, flags, tid) == (MessageType.DIGEST_RESPONSE, 0, 3)
    finally:
        raw.close()


def v1_hello() -> Hello:
    """A HELLO as a v1 gateway sends it (nothing in it is v1.1)."""
    return Hello(1, 2, node_name="v1-gateway")
