"""The provisioning index packed into one bytes object per hash bucket.

Why not a dict: at 1,000,000 provisioned UEs a `dict[str, bytes]` costs ~217 B per UE (the id
string ~80 B, its dict slot ~40 B, a 34-octet bytes value ~80 B): more than two thirds of
issue 12's RSS budget of 300 B per provisioned and registered UE, all included. Packed, a UE
costs its id's octets plus 36 (K_ue, the gateway-set number, a separator and a record index)
plus its share of one bytes object per ~8 UEs: ~70 B for ids of 30 octets. A lookup costs
~0.25 µs more than the dict's (docs/registry.md, "Lookups"). The index is never changed once
built (every provisioning write has it rebuilt), so an immutable layout fits.

A bucket, for n ≤ 255 UEs (n is at most 254 as an index, so a record index is never 0xFF):

    n (1 octet) | n records of K_ue (32) + gateway-set number (u16 BE) |
    for each UE i: 0xFF, its id in UTF-8, i (1 octet) | 0xFF

0xFF never occurs in UTF-8, so `0xFF id` can only match at the start of an id, and a match is
that whole id exactly when the octet after it is a record index (not 0xFF) followed by 0xFF.
UEs that do not fit (a bucket's 256th and later, an empty id, one that does not encode as
UTF-8) are kept in a small dict beside the buckets.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["PackedIndex", "PackedIndexBuilder"]

_SEP = b"\xff"
_RECORD = 34  # K_ue + gateway-set number
_PER_BUCKET = 8  # mean UEs per bucket; 16 measured ~0.2 µs slower per lookup for ~4 B per UE
_MAX_BUCKET = 255
_OCTET = [bytes((value,)) for value in range(256)]


class PackedIndex:
    """UE id -> (K_ue, gateways allowed to serve it); read-only."""

    __slots__ = ("_buckets", "_count", "_mask", "_overflow", "_sets")

    def __init__(self, buckets: list[bytes], overflow: dict[str, bytes],
                 sets: Sequence[frozenset[str]], count: int) -> None:
        """Internal: use PackedIndexBuilder."""
        self._buckets = buckets
        self._mask = len(buckets) - 1
        self._overflow = overflow
        self._sets = sets
        self._count = count

    def __len__(self) -> int:
        return self._count

    def get(self, ue_service_id: str) -> tuple[bytes, frozenset[str]] | None:
        """K_ue and the gateway set of a provisioned UE, or None."""
        bucket = self._buckets[hash(ue_service_id) & self._mask]
        try:
            name = ue_service_id.encode()
        except UnicodeEncodeError:  # a lone surrogate: only the overflow can hold it
            name = b""
        if name:
            needle = _SEP + name
            at = bucket.find(needle, 1 + _RECORD * bucket[0])
            while at >= 0:
                end = at + len(needle)
                if bucket[end] != 0xFF and bucket[end + 1] == 0xFF:
                    at = 1 + _RECORD * bucket[end]
                    return bucket[at:at + 32], self._sets[(bucket[at + 32] << 8) | bucket[at + 33]]
                at = bucket.find(needle, at + 1)  # a longer id that starts with this one
        if self._overflow:
            value = self._overflow.get(ue_service_id)
            if value is not None:
                return value[:32], self._sets[(value[32] << 8) | value[33]]
        return None


class PackedIndexBuilder:
    """Collects the UEs of one index; `expected` (how many will be added) sizes the buckets.

    `buckets` overrides the bucket count (a power of two), for tests that fill buckets.
    """

    def __init__(self, expected: int, *, buckets: int | None = None) -> None:
        if buckets is None:
            buckets = 1
            while buckets * _PER_BUCKET < expected:
                buckets *= 2
        if buckets < 1 or buckets & (buckets - 1):
            raise ValueError(f"bucket count {buckets} is not a power of two")
        self._mask = buckets - 1
        self._names: list[list[bytes]] = [[] for _ in range(buckets)]
        self._records: list[list[bytes]] = [[] for _ in range(buckets)]
        self._overflow: dict[str, bytes] = {}
        self._count = 0

    def add(self, ue_service_id: str, key: bytes, gateway_set: int) -> None:
        """One UE; each id at most once (the table's primary key): a second add of an id
        would leave the first one's answer and count both."""
        if len(key) != 32 or not 0 <= gateway_set < 1 << 16:
            raise ValueError("K_ue must be 32 octets and a gateway-set number a u16")
        record = key + gateway_set.to_bytes(2, "big")
        self._count += 1
        slot = hash(ue_service_id) & self._mask
        names = self._names[slot]
        if len(names) < _MAX_BUCKET:
            try:
                name = ue_service_id.encode()
            except UnicodeEncodeError:
                name = b""
            if name:
                names.append(name)
                self._records[slot].append(record)
                return
        self._overflow[ue_service_id] = record

    def finish(self, sets: Sequence[frozenset[str]]) -> PackedIndex:
        """The index; `sets` are the gateway sets by number. The builder is spent."""
        buckets: list[bytes] = []
        octet = _OCTET
        # Every bucket is joined before the builder's lists go, all at once. Dropping each
        # bucket's lists as it is joined lowers the rebuild's peak (507 -> 467 MB at
        # 1,000,000) but leaves the new buckets in the arenas the lists freed, so those are
        # never returned: RSS at READY 287 -> 372 MB (bench `registered`, 2026-12-07).
        for names, records in zip(self._names, self._records, strict=True):
            parts = [octet[len(names)], *records]
            for index, name in enumerate(names):
                parts += (_SEP, name, octet[index])
            parts.append(_SEP)
            buckets.append(b"".join(parts))
        self._names = self._records = []
        return PackedIndex(buckets, self._overflow, sets, self._count)
