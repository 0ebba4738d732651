"""Per-gateway bucket digests over DURABLE registrations (wire v1.1, docs/protocol.md §6.1).

A gateway's digests are kept from its first sync read (DIGEST or LIST REQUEST) until
KEEP_IDLE_S pass without one; the next read builds them again. Kept for every gateway at all
times, they cost two SHA-256 and a Python loop per durable change, ~2.2 µs (measured at
200,000 changes on the 2-core benchmark VM: hash_many 1.4 µs, the rest 0.8), about a fifth
of the event loop in a bulk, and every gateway's members in memory (~27 octets per UE);
yet a gateway syncs rarely (after an outage, or when an operator asks), and reads only its
own digests. Building a gateway's digests costs its durable UEs picked from the registry's
dict (`Registry._durable_of`, one pass) and then ~1.8 µs per UE in slices on the loop; the
read that asked waits for it (before this, a rebuild of every gateway ran after each start).

Within a kept gateway: a change enters the tables once it is durable: the registry's
completion hands it over (`defer`), and it is hashed in (`apply_pending`) before any sync
read, or in slices once PENDING_CAP wait; so the digests never show what a success has not
acknowledged, and a takeover XORs the UE out of the old gateway's table and into the new
one's, both at once (when both are kept; a gateway not kept is built from the state later).

`keep` takes the gateway's durable UEs at that instant and puts a marker in the queue of
deferred changes: the changes before it are already in what was taken, so they are applied
to the gateway only after the marker (`_Keep`), and the build is hashed before any deferred
change (applied before it, a UE taken over would come back into its old gateway's members).

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

# UEs hashed per loop turn while building: ~10 ms (~30 ms on a loaded machine), so that the
# gateways served meanwhile wait no longer than that for a turn.
BUILD_SLICE = 5_000
# Durable changes kept aside before they are hashed into the digests (see DurableDigests).
PENDING_CAP = 200_000
# A gateway's digests are dropped once no sync read of it came for this long.
KEEP_IDLE_S = 600.0


def _split(value: Value) -> tuple[str, bytes | None]:
    if value.__class__ is str:
        return value, None  # type: ignore[return-value]
    return value[0], value[1]  # type: ignore[index]


class _Keep:
    """In the queue of deferred changes: `gateway`'s changes after this point are applied."""

    __slots__ = ("gateway",)

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway


class DurableDigests:
    """The bucket digests of the gateways that read them, kept over durable state."""

    def __init__(self) -> None:
        # Gateways kept or being built: their tables and members.
        self._tables: dict[str, FineDigests] = {}
        # Each bucket's members as the keys of a dict, not a set: a dict of strings and None
        # is never tracked by the cyclic GC, a set always is, and every full collection walked
        # the members of every bucket (at 1,000,000 registered: 22 full collections, 0.97 s,
        # pauses up to 83 ms, during one bulk registration).
        self._members: dict[str, list[dict[str, None]]] = {}
        # Gateways whose deferred changes are applied (their _Keep marker is behind).
        self._kept: set[str] = set()
        self._last_read: dict[str, float] = {}
        # Builds in progress, first in first out: (gateway, its durable UEs not hashed yet).
        self._builds: deque[tuple[str, Iterator[tuple[str, Value]]]] = deque()
        # Durable changes not hashed yet, a completion's list each, and _Keep markers: a sync
        # read (or PENDING_CAP of them) hashes them.
        self._pending: deque[Sequence[Op] | _Keep] = deque()
        self._pending_count = 0

    @property
    def pending_count(self) -> int:
        return self._pending_count

    @property
    def keeps_any(self) -> bool:
        return bool(self._kept)

    def keeps(self, gateway: str) -> bool:
        """Whether `gateway`'s digests are kept or being built."""
        return gateway in self._tables

    def keep(self, gateway: str, durable: list[tuple[str, Value]]) -> None:
        """Keep `gateway`'s digests from now on (it is not kept yet): build them from
        `durable`, its durable registrations at this instant, then apply its changes
        deferred after this call."""
        assert gateway not in self._tables, gateway
        self._tables[gateway] = FineDigests()
        self._members[gateway] = [{} for _ in range(FINE_BUCKETS)]
        self._builds.append((gateway, iter(durable)))
        self._pending.append(_Keep(gateway))

    def read(self, gateway: str, now: float) -> None:
        """A sync read of `gateway` (kept) at `now` (time.monotonic): not idle."""
        self._last_read[gateway] = now

    def forget_idle(self, now: float) -> list[str]:
        """Drop the digests of kept gateways with no sync read for KEEP_IDLE_S; their names."""
        idle = [gateway for gateway in self._kept
                if now - self._last_read[gateway] >= KEEP_IDLE_S]
        for gateway in idle:
            self._kept.discard(gateway)
            del self._tables[gateway], self._members[gateway], self._last_read[gateway]
        return idle

    def _build_step(self, limit: int) -> int:
        """Hash up to `limit` UEs of the first build; how many it hashed."""
        todo = self._builds[0][1]
        items = list(islice(todo, limit))
        self._hash([uid for uid, _ in items], [value for _, value in items], None)
        if len(items) < limit:
            self._builds.popleft()
        return len(items)

    def defer(self, ops: Sequence[Op]) -> bool:
        """Durable changes, hashed later (`apply_pending`): the per-completion path costs a
        list append, not two SHA-256 per change, which made a timing-sensitive test of the
        compaction miss its window; nothing at all while no gateway is kept. True when more
        than PENDING_CAP wait (~14 MB of references): time to hash them."""
        if ops and self._tables:
            self._pending.append(ops)
            self._pending_count += len(ops)
        return self._pending_count > PENDING_CAP

    def apply_pending(self, limit: int = BUILD_SLICE) -> bool:
        """Hash up to `limit` deferred changes, oldest first (or a slice of a build while one
        is not done); True once none wait. The slice is a bound on the loop turn: a
        completion can hold tens of thousands of changes."""
        done = 0
        # Builds first: a change applied before its gateway's build would be undone by it (a
        # UE taken over would enter its old gateway's members again).
        while self._builds and done < limit:
            done += self._build_step(limit - done)
        if self._builds:
            return False
        pending = self._pending
        while pending and done < limit:
            ops = pending[0]
            if isinstance(ops, _Keep):
                pending.popleft()
                self._kept.add(ops.gateway)
                continue
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
        """Durable changes (ue, new, old): old leaves its gateway's digest, new enters, for
        the gateways kept. One pass sorts them out, `_hash` hashes them all at once
        (wire.sync.hash_many)."""
        kept = self._kept
        if not kept:
            return
        uids: list[str] = []
        values: list[Value] = []
        enters: list[bool] = []
        for uid, new, old in ops:
            if new == old:
                continue  # re-registered as it was (same gateway, same profile): no change
            if old is not None and (old if old.__class__ is str else old[0]) in kept:
                uids.append(uid)
                values.append(old)
                enters.append(False)
            if new is not None and (new if new.__class__ is str else new[0]) in kept:
                uids.append(uid)
                values.append(new)
                enters.append(True)
        if uids:
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
                table = tables[gateway].table
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


    def listed(self, regs: dict[str, Value], before: dict[str, Value | None], gateway: str,
               bucket_bits: int, buckets: Iterable[int]) -> list[tuple[str, bytes]]:
        """(UE Service ID, ue_hash) of `gateway`'s durable UEs in `buckets` of level b: the
        members, with each one's durable value (`regs`, or `before` for a UE with changes
        not yet durable)."""
        out = []
        for uid in self.members(gateway, bucket_bits, buckets):
            value = before[uid] if uid in before else regs.get(uid)
            if value is None:  # cannot happen: members are durable
                continue
            out.append((uid, hash_ue(uid, _split(value)[1])[1]))
        return out
