"""Registry sync from the gateway's side (wire v1.1, docs/protocol.md §6.4).

`compare` asks for the server's bucket digests of this gateway, lists the buckets that differ
from the gateway's own view, and compares them UE by UE; with `repair` it then registers what
the server lacks or holds with another profile (credentials as usual) and releases what the
server should not hold (Release: no credential needed, §6.4).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from msgd.gateway.values import GatewayUe, UeResult
from wire.constants import BUCKET_BITS_MAX
from wire.messages import DigestRequest, ListRequest, profile_octets
from wire.sync import FineDigests, hash_ue


class SyncClient(Protocol):
    """What of a connected GatewayClient sync uses."""

    async def sync_request(self, make: Any) -> Any: ...
    async def release(self, ue_service_id: str) -> UeResult: ...
    async def register(self, ue: GatewayUe) -> UeResult: ...


@dataclass
class SyncReport:
    """UEs missing on the server, held by it but not in the gateway's set (extra), and held
    with another profile; after a repair, `repaired` holds each repair's result and
    `remaining` the differences still there."""

    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    profile_differs: list[str] = field(default_factory=list)
    buckets_listed: int = 0
    repaired: list[UeResult] = field(default_factory=list)

    @property
    def in_sync(self) -> bool:
        return not (self.missing or self.extra or self.profile_differs)

    @property
    def remaining(self) -> int:
        """Differences a repair did not fix (all of them before a repair)."""
        if not self.repaired:
            return len(self.missing) + len(self.extra) + len(self.profile_differs)
        return sum(1 for r in self.repaired if not r.ok)


class LocalView:
    """The gateway's own set as sync sees it (§6.1): per UE its ue_hash and fine bucket, and
    the digests. Made once per set (~5 µs per UE), so that a caller timing the protocol can
    make it beforehand."""

    def __init__(self, ues: Iterable[GatewayUe]) -> None:
        self.ues = {ue.ue_service_id: ue for ue in ues}
        self.hashes: dict[str, tuple[bytes, int]] = {}
        self.fine = FineDigests()
        for uid, ue in self.ues.items():
            profile = profile_octets(ue.profile) if ue.profile is not None else None
            bucket, digest = hash_ue(uid, profile)
            self.hashes[uid] = (digest, bucket)
            self.fine.xor(bucket, digest)


async def compare(client: SyncClient, ues: Iterable[GatewayUe] | LocalView, *,
                  repair: bool = False, bucket_bits: int = BUCKET_BITS_MAX) -> SyncReport:
    """One sync: DIGEST, LIST of the differing buckets, the UE by UE comparison, repair."""
    local = ues if isinstance(ues, LocalView) else LocalView(ues)
    by_uid, view = local.ues, local.hashes
    shift = BUCKET_BITS_MAX - bucket_bits
    mine = local.fine.digests(bucket_bits)
    theirs = (await client.sync_request(lambda tid: DigestRequest(tid, bucket_bits))).digests
    differing = tuple(j for j in range(1 << bucket_bits)
                      if mine[16 * j:16 * j + 16] != theirs[16 * j:16 * j + 16])
    report = SyncReport(buckets_listed=len(differing))
    if not differing:
        return report
    wanted = frozenset(differing)
    listed = (await client.sync_request(
        lambda tid: ListRequest(tid, bucket_bits, differing))).entries
    server = {e.ue_service_id: e.ue_hash for e in listed}
    for uid, (digest, fine) in view.items():
        if fine >> shift not in wanted:
            continue
        held = server.get(uid)
        if held is None:
            report.missing.append(uid)
        elif held != digest:
            report.profile_differs.append(uid)
    report.extra = [uid for uid in server if uid not in view]
    if repair:
        for uid in report.missing + report.profile_differs:
            report.repaired.append(await client.register(by_uid[uid]))
        for uid in report.extra:
            report.repaired.append(await client.release(uid))
    return report


# At most this many buckets (b = 12) are listed to settle a dropped run: ~250 UEs each at
# 1,000,000 UEs through the gateway. More UEs in flight are simply sent again.
SETTLE_MAX_BUCKETS = 64


async def settle(client: SyncClient, in_flight: list[GatewayUe], registering: bool,
                 ) -> set[str] | None:
    """Which of the UEs a lost connection left without a result (sent, not answered) the
    server already settled: registered through us with our profile (a registration), or no
    longer registered through us (a de-registration). One LIST REQUEST of their buckets; None
    when there are too many buckets to ask for. Sending a de-registration again would be
    answered NOT_REGISTERED when the first one had been decided: this tells it apart."""
    view = LocalView(in_flight)
    buckets = tuple(sorted({bucket for _, bucket in view.hashes.values()}))
    if not buckets or len(buckets) > SETTLE_MAX_BUCKETS:
        return None
    listed = (await client.sync_request(
        lambda tid: ListRequest(tid, BUCKET_BITS_MAX, buckets))).entries
    held = {e.ue_service_id: e.ue_hash for e in listed}
    if registering:
        return {uid for uid, (digest, _) in view.hashes.items() if held.get(uid) == digest}
    return {uid for uid in view.hashes if uid not in held}
