"""Per-gateway bucket digests over DURABLE registrations (wire v1.1, docs/protocol.md §6.1).

Each gateway with a UE has a table of the 4 096 digests of the finest level (b = 12); a DIGEST
REQUEST with a coarser b gets them XOR-folded (`wire.sync.fold`). A change enters the tables
once it is durable: the registry's completion hands it over (`defer`), and it is hashed in
(`apply_pending`) before any sync read, or in slices once PENDING_CAP wait; so the digests
never show what a success has not acknowledged, and a takeover XORs the UE out of the old
gateway's table and into the new one's, both at once.

Rebuilding at start hashes every registered UE (two SHA-256 each). Measured on the 2-core
development machine at 200,000 UEs: 1.8 µs per UE with wire.sync.hash_many (every UE of a
slice hashed by map()s of C functions; 2.3 µs with hash_ue per UE, which is itself 1.9 µs),
i.e. ~2-5 s at 1,000,000 UEs depending on the machine's load, which would break READY <= 3 s.
So the rebuild runs after READY=1 (`Registry.begin_sync_rebuild`), in slices on the event
loop (`rebuild_step`), over a copy of the state loaded from the file; durable changes that
arrive meanwhile wait (`defer`) and are applied once it is done (applied before it, a UE taken
over would come back into its old gateway's members from the copy), and a sync read waits
until both are done.

A table is a list of 4 096 Python ints (XOR of ints is faster than of octets): ~180 KiB per
gateway rather than the 64 KiB of its octets. Beside it, each gateway has the members of each
fine bucket (4 096 dicts whose keys are the UE Service IDs, the strings shared with the
registry's dict; dicts, not sets, because the cyclic GC never tracks a dict of strings): ~27
octets per registered UE, so that a LIST REQUEST hashes only the UEs of the buckets it names
instead of every UE of the gateway (5 s at 1,000,000).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

from msgd.registry.blobs import Op, Value
from wire.constants import BUCKET_BITS_MAX, DIGEST_SIZE
from wire.sync import FINE_BUCKETS, FineDigests, hash_many, hash_ue

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
        # Durable changes not hashed yet, a completion's list each: a sync read (or PENDING_CAP
        # of them) hashes them.
        self._pending: deque[Sequence[Op]] = deque()
        self._pending_count = 0
        # Each bucket's members as the keys of a dict, not a set: a dict of strings and None
        # is never tracked by the cyclic GC, a set always is, and every full collection walked
        # the members of every bucket (at 1,000,000 registered: 22 full collections, 0.97 s,
        # pauses up to 83 ms, during one bulk registration).
        self._members: dict[str, list[dict[str, None]]] = {}
        self._todo: Iterator[tuple[str, Value]] | None = iter(list(loaded))

    @property
    def ready(self) -> bool:
        return self._todo is None

    @property
    def pending_count(self) -> int:
        return self._pending_count

    def rebuild_step(self, limit: int = REBUILD_SLICE) -> bool:
        """Hash up to `limit` more UEs of the loaded state; True once all are done."""
        todo = self._todo
        if todo is None:
            return True
        items = list(islice(todo, limit))
        self._hash([uid for uid, _ in items], [value for _, value in items], None)
        if len(items) < limit:
            self._todo = None
            return True
        return False

    def defer(self, ops: Sequence[Op]) -> bool:
        """Durable changes, hashed later (`apply_pending`): the per-completion path costs a
        list append, not two SHA-256 per change, which made a timing-sensitive test of the
        compaction miss its window. True when more than PENDING_CAP wait (~14 MB of
        references): time to hash them."""
        if ops:
            self._pending.append(ops)
            self._pending_count += len(ops)
        return self._pending_count > PENDING_CAP

    def apply_pending(self, limit: int = REBUILD_SLICE) -> bool:
        """Hash up to `limit` deferred changes, oldest first (or a slice of the rebuild while
        it is not done); True once none wait. The slice is a bound on the loop turn: a
        completion can hold tens of thousands of changes."""
        if self._todo is not None:
            # The rebuild first: a change applied before it would be undone by it (a UE taken
            # over would enter its old gateway's members again from the loaded copy).
            self.rebuild_step(limit)
            return False
        pending = self._pending
        done = 0
        while pending and done < limit:
            ops = pending[0]
            take = limit - done
            if len(ops) > take:
                pending[0] = ops[take:]
                ops = ops[:take]
            else:
                pending.popleft()
            self._pending_count -= len(ops)
            done += len(ops)
            self.apply(ops)
        return not pending

    def apply(self, ops: Iterable[Op]) -> None:
        """Durable changes (ue, new, old): old leaves its gateway's digest, new enters. One
        pass sorts them out, `_hash` hashes them all at once (wire.sync.hash_many)."""
        uids: list[str] = []
        values: list[Value] = []
        enters: list[bool] = []
        for uid, new, old in ops:
            if new == old:
                continue  # re-registered as it was (same gateway, same profile): no change
            if old is not None:
                uids.append(uid)
                values.append(old)
                enters.append(False)
            if new is not None:
                uids.append(uid)
                values.append(new)
                enters.append(True)
        self._hash(uids, values, enters)

    def _hash(self, uids: list[str], values: list[Value], enters: list[bool] | None) -> None:
        """XOR each UE into (enters[i] or enters is None) or out of its gateway's digest."""
        gateways = [v if v.__class__ is str else v[0] for v in values]  # type: ignore[index]
        profiles = [None if v.__class__ is str else v[1] for v in values]  # type: ignore[index]
        buckets, hashes = hash_many(uids, profiles)
        tables = self._tables
        members = self._members
        last_gateway = None
        table: list[int] = []
        sets: list[dict[str, None]] = []
        for i, gateway in enumerate(gateways):
            if gateway != last_gateway:
                last_gateway = gateway
                fine = tables.get(gateway)
                if fine is None:
                    fine = tables[gateway] = FineDigests()
                    members[gateway] = [{} for _ in range(FINE_BUCKETS)]
                table = fine.table
                sets = members[gateway]
            bucket = buckets[i]
            table[bucket] ^= hashes[i]
            if enters is None or enters[i]:
                sets[bucket][uids[i]] = None
            else:
                sets[bucket].pop(uids[i], None)

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
