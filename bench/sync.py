"""`python -m bench --scenarios sync`: wire v1.1 registry sync at scale (issue 15).

Server E starts with every bulk UE registered through one gateway (the bulk scenario ran
before). The gateway's file then differs in 10 UEs: 5 the server lacks (released first, so
they are missing), 3 the file lacks (extra), 2 with another profile. Measured: sync with
repair from the first request octet to the last repair answer, protocol octets both ways;
the gateway's hashing of its file (LocalView) is timed apart, as reading the file is not
counted. Then a full re-registration of the same UEs through the same server, the cost sync
avoids. Runs in the bench process (the client) against the msgd child (the server).
"""

from __future__ import annotations

import time
from typing import Any

from bench.loadgen import client_context, ue_ids, ue_key
from msgd.gateway.client import GatewayClient
from msgd.gateway.sync import LocalView
from msgd.gateway.values import GatewayUe
from wire.messages import DigestRequest, Profile

CHANGED_PROFILE = Profile(ue_type=2, maximum_segment_size=1200)


async def first_digest(pki: dict[str, str], port: int, identity: str) -> float:
    """Seconds for the gateway's first DIGEST REQUEST (b = 0) of this server: the server
    builds the gateway's digests from its registrations then (msgd/registry/digests.py)."""
    client = await GatewayClient.connect("127.0.0.1", port,
                                         ssl_context=client_context(pki, identity),
                                         server_hostname="localhost")
    try:
        started = time.perf_counter()
        await client.sync_request(lambda tid: DigestRequest(tid, 0))
        return time.perf_counter() - started
    finally:
        await client.close()


async def measure_sync(pki: dict[str, str], secret_hex: str, port: int, identity: str,
                       seed: str, n: int) -> dict[str, Any]:
    secret = bytes.fromhex(secret_hex)
    uids = ue_ids(seed, n)
    missing, extra, changed = uids[:5], set(uids[5:8]), set(uids[8:10])
    client = await GatewayClient.connect("127.0.0.1", port,
                                         ssl_context=client_context(pki, identity),
                                         server_hostname="localhost")
    try:
        for uid in missing:  # the server must lack them: release them first
            if not (await client.release(uid)).ok:
                raise RuntimeError(f"could not release {uid}")
        started = time.perf_counter()
        ues = [GatewayUe(uid, ue_key(secret, uid), CHANGED_PROFILE if uid in changed else None)
               for uid in uids if uid not in extra]
        file_s = time.perf_counter() - started
        started = time.perf_counter()
        view = LocalView(ues)
        view_s = time.perf_counter() - started
        in0, out0 = client.octets_in, client.octets_out
        started = time.perf_counter()
        report = await client.sync(view, repair=True)
        wall = time.perf_counter() - started
        octets_in, octets_out = client.octets_in - in0, client.octets_out - out0
        after = await client.sync(view)
    finally:
        await client.close()
    return {
        "n": n,
        "missing": len(report.missing),
        "extra": len(report.extra),
        "profile_differs": len(report.profile_differs),
        "buckets_listed": report.buckets_listed,
        "repaired_ok": sum(1 for r in report.repaired if r.ok),
        "in_sync_after": after.in_sync,
        "wall_s": wall,
        "octets": octets_in + octets_out,
        "octets_in": octets_in,
        "octets_out": octets_out,
        "gateway_file_s": file_s,
        "gateway_hashing_s": view_s,
    }
