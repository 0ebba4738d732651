"""Per-gateway bucket digests over DURABLE registrations (wire v1.1, docs/protocol.md §6.1).

Each gateway with a UE has a table of the 4 096 digests of the finest level (b = 12); a DIGEST
REQUEST with a coarser b gets them XOR-folded (`wire.sync.fold`). A change enters the tables
once it is durable: the registry's completion hands it over (`defer`), and it is hashed in
(`apply_pending`) before any sync read, or in slices once PENDING_CAP wait; so the digests
never show what a success has not acknowledged, and a takeover XORs the UE out of the old
gateway's table and into the new one's, both at once.

Rebuilding at start hashes every registered UE (two SHA-256 each). Measured on the 2-core
development machine: 4.9 µs per UE in the tightest Python loop (7.8 µs through the wire.sync
helpers), i.e. ~5 s at 1,000,000 UEs, which would break READY <= 3 s. So the rebuild runs
after READY=1 (`Registry.begin_sync_rebuild`), in slices on the event loop (`rebuild_step`),
over a copy of the state loaded from the file; durable changes that arrive meanwhile are
applied at once (XOR commutes, so the order of the two does not matter), and a sync read
waits until the rebuild is done.

A table is a list of 4 096 Python ints (XOR of ints is what makes the rebuild 4.9 µs and not
7.8): ~180 KiB per gateway rather than the 64 KiB of its octets. Beside it, each gateway has
the members of each fine bucket (4 096 sets of UE Service IDs, the strings shared with the
registry's dict): ~30 octets per registered UE, so that a LIST REQUEST hashes only the UEs of
the buckets it names instead of every UE of the gateway (5 s at 1,000,000).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

from msgd.registry.blobs import Op, Value
from wire.constants import BUCKET_BITS_MAX, DIGEST_SIZE
from wire.sync import FINE_BUCKETS, FineDigests, hash_ue

# UEs hashed per loop turn while rebuilding: ~25 ms (~60 ms on a loaded machine), so that
# the gateways served meanwhile wait no longer than that for a turn.
REBUILD_SLICE = 5_000
# Durable changes kept aside before they are hashed into the digests (see DurableDigests).
PENDING_CAP = 200_000


def _split(value: Value) -> tuple[str, bytes | None]:
    if value.__class__ is str:
        return value, None  # type: ignore[return-value]
    return value[0], value[1]  # type: ignore[index]


class DurableDigests:
    """The bucket digests of every gateway, kept over durable state."""

    def __init__(self, loaded: Iterable[tuple[str, Value]]) -> None:
        self._tables: dict[str, FineDigests] = {}
        # Durable changes not hashed yet: a sync read (or PENDING_CAP of them) hashes them.
        self._pending: deque[Op] = deque()
        self._members: dict[str, list[set[str]]] = {}
        self._todo: Iterator[tuple[str, Value]] | None = iter(list(loaded))

    @property
    def ready(self) -> bool:
        return self._todo is None

    def rebuild_step(self, limit: int = REBUILD_SLICE) -> bool:
        """Hash up to `limit` more UEs of the loaded state; True once all are done."""
        todo = self._todo
        if todo is None:
            return True
        xor = self._xor
        for _ in range(limit):
            item = next(todo, None)
            if item is None:
                self._todo = None
                return True
            xor(item[0], item[1])
        return False

    def defer(self, ops: Iterable[Op]) -> bool:
        """Durable changes, hashed later (`apply_pending`): the per-change path costs a list
        append, not two SHA-256 (3.8 µs a registration, 8.7 a takeover, measured on the loop
        thread), which made a timing-sensitive test of the compaction miss its window.
        True when more than PENDING_CAP wait (~14 MB of references): time to hash them."""
        self._pending.extend(ops)
        return len(self._pending) > PENDING_CAP

    def apply_pending(self, limit: int = REBUILD_SLICE) -> bool:
        """Hash up to `limit` deferred changes, oldest first; True once none wait."""
        pending = self._pending
        n = min(limit, len(pending))
        self.apply(pending.popleft() for _ in range(n))
        return not pending

    def apply(self, ops: Iterable[Op]) -> None:
        """Durable changes (ue, new, old): old leaves its gateway's digest, new enters."""
        xor = self._xor
        for uid, new, old in ops:
            if new == old:
                continue  # re-registered as it was (same gateway, same profile): no change
            if old is not None:
                xor(uid, old, False)
            if new is not None:
                xor(uid, new)

    def _xor(self, uid: str, value: Value, enters: bool = True) -> None:
        gateway, profile = _split(value)
        table = self._tables.get(gateway)
        if table is None:
            table = self._tables[gateway] = FineDigests()
            self._members[gateway] = [set() for _ in range(FINE_BUCKETS)]
        bucket, digest = hash_ue(uid, profile)
        table.xor(bucket, digest)
        if enters:
            self._members[gateway][bucket].add(uid)
        else:
            self._members[gateway][bucket].discard(uid)

    def members(self, gateway: str, bucket_bits: int, buckets: Iterable[int]) -> Iterator[str]:
        """The UEs durably registered through `gateway` in `buckets` of level b."""
        fine = self._members.get(gateway)
        if fine is None:
            return
        per = 1 << (BUCKET_BITS_MAX - bucket_bits)
        for bucket in buckets:
            for k in range(bucket * per, (bucket + 1) * per):
                yield from fine[k]

    def digests(self, gateway: str, bucket_bits: int) -> bytes:
        """The 2^b digests of `gateway` (zeros for a gateway without UEs)."""
        table = self._tables.get(gateway)
        if table is None:
            return bytes(DIGEST_SIZE << bucket_bits)
        return table.digests(bucket_bits)


    def listed(self, regs: dict[str, Value], undo: Iterable[Op], gateway: str,
               bucket_bits: int, buckets: Iterable[int]) -> list[tuple[str, bytes]]:
        """(UE Service ID, ue_hash) of `gateway`'s durable UEs in `buckets` of level b: the
        members, with each one's durable value (memory with the changes not yet durable,
        `undo` oldest first, taken back)."""
        before: dict[str, Value | None] = {}
        for uid, _new, old in undo:
            before.setdefault(uid, old)
        out = []
        for uid in self.members(gateway, bucket_bits, buckets):
            value = before[uid] if uid in before else regs.get(uid)
            if value is None:  # cannot happen: members are durable
                continue
            out.append((uid, hash_ue(uid, _split(value)[1])[1]))
        return out
