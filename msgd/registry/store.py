"""The registration store: which Non-MSGin5G UE is registered through which gateway.

wire-v1 §5 "Semantics, per entry": a registration stores the UE Service ID, the serving gateway
and the profile, replacing any earlier registration of that UE; a de-registration deletes them;
and a success is reported only once the change is durable (it survives a crash of the server
process at any instant). `Registry` keeps that promise:

* Registrations live in memory (one compact dict) so reads cost a dict lookup. Writes are
  applied to memory at once, so later entries of the same bulk see them, and queued for the
  single writer thread (`writer`), which appends everything queued as ONE journal row (group
  commit) and only then posts the completion to the event loop.
* A failed commit fails that batch and every later change not yet durable, and memory is
  rolled back here to the last durable state.
* The durable state is a snapshot plus the journal rows after it (`snapshot`, encoded by
  `blobs`); `schema` opens, checks and migrates the file; compaction rewrites the snapshot at
  open (large journal) and at close, and online, on the writer thread, while msgd serves
  (`compaction`).
* The provisioned subscriber store (`provisioning_store`) is in the same file and writes
  through the same writer; `Registry.provisioning` is it.

The file layout, the blob formats and the reasons for them are in docs/registry.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeAlias, TypeVar

from msgd.errors import RegistryError
from msgd.registry.blobs import Op, Value
from msgd.registry.compaction import CompactionPolicy, CompactionReport, Compactor
from msgd.registry.digests import KEEP_IDLE_S, DurableDigests
from msgd.registry.provisioning import ProvisionedUe
from msgd.registry.provisioning_store import ProvisioningStore
from msgd.registry.schema import SYNCHRONOUS_MODES, open_file
from msgd.registry.snapshot import JournalSize, State, compact, worth_compacting
from msgd.registry.sql import one_line
from msgd.registry.writer import Writer

__all__ = ["COMMIT_INTERVAL", "MAX_BATCH", "BatchAnswers", "Listener", "Registration", "Registry"]

log = logging.getLogger("msgd.registry")

FAILED_HISTORY = 4_096  # failed seq ranges remembered for wait_durable()
# The writer's group commit (writer.py): a short queue waits this long for more, and one
# commit takes at most this many changes. The daemon uses these defaults.
COMMIT_INTERVAL = 0.001
MAX_BATCH = 20_000

Listener: TypeAlias = Callable[[int, int, bool], None]

T = TypeVar("T")


class BatchAnswers(NamedTuple, Generic[T]):
    """What `Registry.submit_batch` gives for each way a change can end: the caller's own
    objects (the port's outcomes), so that the batch's answers need no second pass."""

    applied: T  # in memory now, durable at its seq
    busy: T  # no room left in the batch (`room`)
    not_registered: T  # a de-registration of a UE not registered
    other_gateway: T  # a de-registration of a UE registered through another gateway
    refused: T  # the registry takes no more changes (its writer stopped, it is closing)
    failed: Mapping[Any, T]  # a change's verdict -> its answer


@dataclass(frozen=True, slots=True)
class Registration:
    """A registered Non-MSGin5G UE: the gateway serving it and its profile IE value, as is."""

    ue_service_id: str
    gateway: str
    profile: bytes | None  # the encoded value of the profile IE, stored as is


class Registry:
    """Registrations in memory, made durable by the writer thread; owns the file.

    Threads: submit_*, reads, listeners, wait_durable() and close() belong to the event-loop
    thread. The writer thread (`Writer`) owns the write connection. The provisioning store
    (`provisioning`, see ProvisioningStore for its threads) shares the file and the writer;
    provisioned(), provisioned_count() and replace_provisioning() are also offered here.

Just over 400 lines: what is left is the in-memory registrations and their change sequence
(submit, completions, rollback after a failed commit, listeners, open/close) plus the
compaction hooks; the writer, the file, the blobs, the snapshot, compaction and provisioning
are in modules of their own.
    """

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        lock_fd: int,
        state: State,
        *,
        commit_interval: float,
        max_batch: int,
        compaction: CompactionPolicy,
        synchronous: str = "full",
    ) -> None:
        """Internal: use Registry.open()."""
        regs, names = state.regs, state.names
        self._path = path
        self._lock_fd = lock_fd
        self._regs = regs
        self._names = names  # append-only while running; the index is the journal's reference
        self._gw_canon = {name: name for name in names}
        self._gw_index = {name: index for index, name in enumerate(names)}
        self._writer = Writer(path, conn, names, self._gw_index, state.journal_seq,
                              state.journal, commit_interval=commit_interval,
                              max_batch=max_batch)
        self._ops = self._writer.ops  # submit_* append here; the writer takes from it
        writer = self._writer
        self._compactor = Compactor(
            conn, path, journal_seq=lambda: writer.journal_seq, journal=writer.journal,
            registered=regs.__len__, policy=compaction, wake=writer.wake,
            garbage=state.garbage, synchronous=synchronous)
        writer.compactor = self._compactor

        # Loop-thread state.
        self._next_seq = 0  # last seq handed out
        self._durable_seq = 0  # every seq up to this one is settled (durable or failed)
        self._undo: list[Op] = []  # changes after _durable_seq, oldest first
        self._listeners: list[Listener] = []
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_ids = itertools.count()
        self._failed: deque[tuple[int, int, str]] = deque(maxlen=FAILED_HISTORY)
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

        self.provisioning = ProvisioningStore(path, self._writer)
        # wire v1.1 sync: digests of durable state, kept for the gateways that read them
        # (digests.py says why).
        self._digests = DurableDigests()
        self._hashing = False  # _hash_slice is scheduled
        self._idle_check = 0.0  # time.monotonic() of the last look for idle digests

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        synchronous: str = "full",
        commit_interval: float = COMMIT_INTERVAL,
        max_batch: int = MAX_BATCH,
        compaction: CompactionPolicy | None = None,
    ) -> Registry:
        """Open (create, migrate, check, load) the registry at `path`; blocking.

        `synchronous` is SQLite's PRAGMA synchronous: "full" (default) syncs the WAL on every
        commit and so survives power loss; "normal" survives a process crash only.
        `compaction` says when the writer folds the journal into the snapshot while running
        (default: CompactionPolicy()).
        Raises RegistryCorruptError for a file that fails its check (it is never modified) and
        RegistryError when the file cannot be opened or is in use by another process.
        """
        path = Path(path)
        mode = synchronous.lower()
        if mode not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, not {synchronous!r}")
        if commit_interval < 0 or max_batch < 1:
            raise ValueError("commit_interval must be >= 0 and max_batch >= 1")
        started = time.monotonic()
        lock_fd, conn, state = open_file(path, mode)
        try:
            registry = cls(
                path, conn, lock_fd, state, commit_interval=commit_interval, max_batch=max_batch,
                compaction=compaction or CompactionPolicy(), synchronous=mode,
            )
        except BaseException as exc:
            conn.close()
            os.close(lock_fd)
            if isinstance(exc, sqlite3.Error):
                raise RegistryError(f"registry {path}: {one_line(exc)}") from None
            raise
        regs, journal_ops = state.regs, state.journal.changes
        if worth_compacting(journal_ops, len(regs)):
            registry._compact()
        log.info(
            "registry %s: %d registrations, %d provisioned, loaded in %.2f s "
            "(journal %d ops replayed)",
            path,
            len(regs),
            registry.provisioned_count(),
            time.monotonic() - started,
            journal_ops,
        )
        return registry

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer thread; completions are delivered on `loop`."""
        if self._closed:
            raise RegistryError("registry is closed")
        if self._writer.started:
            raise RuntimeError("registry already started")
        self._loop = loop
        self._writer.start(functools.partial(loop.call_soon_threadsafe, self._drain_outbox))

    def _schedule_hashing(self) -> None:
        if not self._hashing:
            self._hashing = True
            assert self._loop is not None
            self._loop.call_soon(self._hash_slice)

    def _hash_slice(self) -> None:
        """One slice of digest work per loop turn (`DurableDigests.apply_pending`: builds
        first, then the deferred changes), until none is left."""
        if self._closed:
            self._hashing = False
            return
        if self._digests.apply_pending():
            self._hashing = False
        else:
            assert self._loop is not None
            self._loop.call_soon(self._hash_slice)

    # -- wire v1.1 sync reads (docs/protocol.md §6): durable state only ------------------------

    async def sync_digests(self, gateway: str, bucket_bits: int) -> bytes:
        """The 2^b bucket digests of `gateway`'s durable registrations."""
        await self._await_digests(gateway)
        return self._digests.digests(gateway, bucket_bits)

    async def sync_list(self, gateway: str, bucket_bits: int,
                        buckets: tuple[int, ...]) -> list[tuple[str, bytes]]:
        """(UE Service ID, ue_hash) of `gateway`'s durable registrations in `buckets`."""
        await self._await_digests(gateway)
        return self._digests.listed(self._regs, self._undone(), gateway, bucket_bits, buckets)

    async def _await_digests(self, gateway: str) -> None:
        if self._loop is None:
            raise RuntimeError("registry not started")
        built = None
        if not self._digests.keeps(gateway):
            durable = self._durable_of(gateway)
            self._digests.keep(gateway, durable)
            built = (len(durable), time.perf_counter())
        self._digests.read(gateway, time.monotonic())
        # Every durable change in, a slice per turn; the caller reads right after the last
        # slice, with no await between, so nothing durable is missing from what it reads.
        while not self._digests.apply_pending():
            await asyncio.sleep(0)  # a turn for the others, not a wait for a condition
        if built is not None:
            log.info("registry: sync digests of %s built (%d UEs, %.2f s)", gateway,
                     built[0], time.perf_counter() - built[1])

    def _durable_of(self, gateway: str) -> list[tuple[str, Value]]:
        """`gateway`'s durable registrations: memory with the changes not yet durable taken
        back. One pass over the dict (~0.15 s at 1,000,000 UEs), on the loop: the instant it
        is taken is the instant the digests start from (DurableDigests.keep)."""
        name = self._gw_canon.get(gateway, gateway)
        before = self._undone()
        durable = [(uid, value) for uid, value in self._regs.items()
                   if (value if value.__class__ is str else value[0]) == name  # type: ignore[index]
                   and uid not in before]
        durable += [(uid, old) for uid, old in before.items() if old is not None
                    and (old if old.__class__ is str else old[0]) == name]  # type: ignore[index]
        return durable

    def _undone(self) -> dict[str, Value | None]:
        """The durable value of each UE with changes not yet durable (None: not registered):
        memory with those changes taken back."""
        before: dict[str, Value | None] = {}
        for uid, _new, old in self._undo:  # oldest first: its old value is the durable one
            before.setdefault(uid, old)
        return before

    # -- provisioning (the store is `provisioning`) -------------------------------------------

    def provisioned(self, ue_service_id: str) -> ProvisionedUe | None:
        """The provisioning row of a UE, or None (ProvisioningStore.provisioned)."""
        return self.provisioning.provisioned(ue_service_id)

    def provisioned_count(self) -> int:
        """Number of provisioned UEs (ProvisioningStore.provisioned_count)."""
        return self.provisioning.provisioned_count()

    def replace_provisioning(self, rows: Iterable[ProvisionedUe]) -> int:
        """Replace all provisioning with `rows` atomically, admin changes kept over them;
        blocking, seconds for a million rows (ProvisioningStore.replace_provisioning)."""
        return self.provisioning.replace_provisioning(rows)

    # -- registrations: reads -----------------------------------------------------------------

    def registration(self, ue_service_id: str) -> Registration | None:
        """The current registration of a UE (including changes not yet durable), or None."""
        value = self._regs.get(ue_service_id)
        if value is None:
            return None
        if value.__class__ is str:
            return Registration(ue_service_id, value, None)  # type: ignore[arg-type]
        return Registration(ue_service_id, value[0], value[1])

    def registered_count(self) -> int:
        """Number of registered UEs (including changes not yet durable)."""
        return len(self._regs)

    def iter_registrations(self, gateway: str | None = None) -> Iterator[Registration]:
        """Iterate registrations, optionally only those through `gateway`.

        The UE ids are copied first, so the caller may submit changes while iterating: a UE
        changed meanwhile is reported as it is then, a removed one is skipped.
        """
        if gateway is not None:
            gateway = self._gw_canon.get(gateway)
            if gateway is None:
                return
        regs = self._regs
        for ue in list(regs):
            value = regs.get(ue)
            if value is None:
                continue
            if value.__class__ is str:
                if gateway is None or value is gateway:
                    yield Registration(ue, value, None)  # type: ignore[arg-type]
            elif gateway is None or value[0] is gateway:
                yield Registration(ue, value[0], value[1])

    # -- registrations: writes ----------------------------------------------------------------

    def submit_register(self, ue_service_id: str, gateway: str, profile: bytes | None) -> int:
        """Register (or re-register) a UE; applied to memory now, durable later. Returns its seq.

        One change at a time, for callers other than the registry port (tools, benchmarks,
        tests); the port's batches go through `submit_batch`. The gateway name is interned,
        so the stored value is shared.
        """
        refusal = self.refusal
        if refusal is not None:
            raise RegistryError(refusal)
        if ue_service_id.__class__ is not str:
            raise TypeError("ue_service_id must be str")
        name = self._gateway_name(gateway)
        if profile is None:
            new: Value = name
        else:
            new = (name, profile if profile.__class__ is bytes else bytes(profile))
        regs = self._regs
        op = (ue_service_id, new, regs.get(ue_service_id))
        regs[ue_service_id] = new
        return self._queue(op)

    def submit_batch(
        self,
        gateway: str,
        changes: Iterable[tuple[str, bool, bytes | None, Any]],
        room: int,
        answers: BatchAnswers[T],
    ) -> tuple[list[T], int]:
        """Decide and apply one gateway's changes (ue, register, profile, verdict) in order,
        each seeing the ones before it; returns an answer per change and how many the registry
        refused. The rules of wire-v1 §5 that need registry state: a de-registration of a UE
        not registered, or registered through another gateway, fails before its verdict is
        looked at; a registration reaches here only with a verdict of None unless it failed.
        Once `room` changes are applied, the rest are busy.

        The hot path of every bulk: one loop with the dict and the op list at hand, seqs handed
        out and the writer woken once per batch. The UE Service IDs come from the wire decoder
        (str); submit_register/submit_deregister check what other callers hand in."""
        name = self._gateway_name(gateway)
        refusal = self._writer.refusal
        regs = self._regs
        current = regs.get
        ops: list[Op] = []
        op = ops.append
        out: list[T] = []
        answer = out.append
        applied, busy, not_registered, other_gateway, refused, failed = answers
        refused_count = 0
        for ue, register, profile, verdict in changes:
            if room <= 0:
                answer(busy)
                continue
            old = current(ue)
            if register:
                if profile is None:
                    new: Value | None = name
                else:
                    new = (name, profile if profile.__class__ is bytes else bytes(profile))
            elif old is None:
                answer(not_registered)
                continue
            elif (old if old.__class__ is str else old[0]) != name:  # type: ignore[index]
                answer(other_gateway)
                continue
            else:
                new = None
            if verdict is not None:
                answer(failed[verdict])
                continue
            if refusal is not None:
                refused_count += 1
                answer(refused)
                continue
            op((ue, new, old))
            if new is None:
                del regs[ue]
            else:
                regs[ue] = new
            room -= 1
            answer(applied)
        if ops:
            self._undo.extend(ops)
            self._ops.extend(ops)
            self._next_seq += len(ops)
            self._wake_writer()
        return out, refused_count

    @property
    def refusal(self) -> str | None:
        """Why the registry takes no more changes (its writer stopped, it is closing)."""
        refusal = self._writer.refusal
        return None if refusal is None else f"registry {refusal}"

    def submit_deregister(self, ue_service_id: str) -> int:
        """De-register a UE (a no-op change if it is not registered). Returns its seq."""
        refusal = self.refusal
        if refusal is not None:
            raise RegistryError(refusal)
        if ue_service_id.__class__ is not str:
            raise TypeError("ue_service_id must be str")
        return self._queue((ue_service_id, None, self._regs.pop(ue_service_id, None)))

    def _queue(self, op: Op) -> int:
        self._undo.append(op)
        self._ops.append(op)
        self._next_seq = seq = self._next_seq + 1
        self._wake_writer()
        return seq

    def _wake_writer(self) -> None:
        writer = self._writer
        # See Writer._step for why this cannot miss a wake-up. An event already set needs no
        # second set(): it takes the event's lock, and a bulk would take it per change until
        # the writer thread runs (2.5 % of the loop thread in a profile of a bulk).
        if writer.idle and not writer.wake.is_set():
            writer.wake.set()

    def _gateway_name(self, gateway: str) -> str:
        """The registry's own string for a gateway name (interned: stored values share it)."""
        name = self._gw_canon.get(gateway)
        return self._intern_gateway(gateway) if name is None else name

    def _intern_gateway(self, gateway: str) -> str:
        if not isinstance(gateway, str):
            raise TypeError("gateway must be str")
        # Index first: the writer looks names up by index once it sees an op using them.
        self._gw_index[gateway] = len(self._names)
        self._names.append(gateway)
        self._gw_canon[gateway] = gateway
        return gateway

    # -- completions --------------------------------------------------------------------------

    def add_listener(self, callback: Listener) -> None:
        """Call callback(first_seq, last_seq, ok) on the loop thread for every settled batch.

        ok=True: changes first..last are durable. ok=False: they failed; memory is already
        rolled back to the last durable state when the callback runs.
        """
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        """Stop calling `callback`; unknown callbacks are ignored."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(callback)

    async def wait_durable(self, seq: int) -> None:
        """Return once change `seq` is durable; raise RegistryError if it failed."""
        if not 0 < seq <= self._next_seq:
            raise ValueError(f"no change {seq} was submitted")
        if seq <= self._durable_seq:
            reason = self._failure_of(seq)
            if reason is not None:
                raise RegistryError(f"change {seq} failed: {reason}")
            return
        if not self._writer.started:
            raise RuntimeError("registry not started")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (seq, next(self._waiter_ids), future))
        await future

    def _failure_of(self, seq: int) -> str | None:
        for first, last, reason in reversed(self._failed):
            if first <= seq <= last:
                return reason
        return None

    @property
    def durable_seq(self) -> int:
        """Highest seq settled: every change up to it is durable unless reported failed."""
        return self._durable_seq

    def settled(self) -> tuple[int, int, int]:
        """(durable_seq, first, last) where first..last is the latest range of changes that
        failed ((0, -1) when none did): the one owner of the state answers wait on."""
        if not self._failed:
            return self._durable_seq, 0, -1
        first, last, _reason = self._failed[-1]
        return self._durable_seq, first, last

    @property
    def last_seq(self) -> int:
        """The seq of the last change submitted (0 before the first)."""
        return self._next_seq

    def pending(self) -> int:
        """Changes submitted but not yet settled (for overload decisions: SERVER_BUSY)."""
        return self._next_seq - self._durable_seq

    def settle_completed(self) -> None:
        """Settle the batches the writer has posted, now rather than when the loop reaches the
        drain it scheduled (which then finds nothing); the listeners run here."""
        if self._writer.has_completions():
            self._drain_outbox()

    def _drain_outbox(self) -> None:
        for ok, first, last, *rest in self._writer.take_completions():
            if ok:
                self._on_durable(first, last)
            else:
                self._on_failed(first, rest[0], resume_writer=last is not None)

    def _on_durable(self, first: int, last: int) -> None:
        if first != self._durable_seq + 1:  # cannot happen; say so loudly if it does
            log.error("registry: completion %d..%d out of order", first, last)
        durable = last - first + 1
        if self._digests.defer(self._undo[:durable]):
            self._schedule_hashing()
        if self._digests.keeps_any:
            now = time.monotonic()
            if now - self._idle_check >= 60.0:
                self._idle_check = now
                for gateway in self._digests.forget_idle(now):
                    log.info("registry: sync digests of %s dropped (no sync read for %d s)",
                             gateway, KEEP_IDLE_S)
        del self._undo[:durable]
        self._durable_seq = last
        self._settle(first, last, None)

    def _on_failed(self, first: int | None, reason: str, *, resume_writer: bool) -> None:
        """A batch failed: fail it and everything after it, and roll memory back.

        The cut is taken here, on the loop thread, because only here is memory quiescent:
        every change up to `cut` was applied on top of the failed ones, so all of them go.
        """
        first = self._durable_seq + 1 if first is None else first
        cut = self._next_seq
        if first > cut:  # the writer died with nothing pending: nothing to fail
            return
        regs = self._regs
        for ue, _new, old in reversed(self._undo):
            if old is None:
                regs.pop(ue, None)
            else:
                regs[ue] = old
        self._undo.clear()
        self._durable_seq = cut
        self._failed.append((first, cut, reason))
        if resume_writer:
            self._writer.resume(cut)
        self._settle(first, cut, reason)

    def _settle(self, first: int, last: int, failure: str | None) -> None:
        ok = failure is None
        for callback in tuple(self._listeners):
            try:
                callback(first, last, ok)
            except Exception:
                log.exception("registry listener %r failed", callback)
        waiters = self._waiters
        while waiters and waiters[0][0] <= last:
            seq, _, future = heapq.heappop(waiters)
            if future.done():
                continue
            try:
                if ok:
                    future.set_result(None)
                else:
                    future.set_exception(RegistryError(f"change {seq} failed: {failure}"))
            except RuntimeError:
                pass  # the waiter's loop is closed

    # -- closing ------------------------------------------------------------------------------

    def _compact(self) -> None:
        """Rewrite the snapshot from memory; only when memory equals the durable state
        (nothing pending, the writer stopped or not started)."""
        writer = self._writer
        if compact(writer.conn, self._path, self._regs, self._names, writer.journal_seq):
            writer.journal.changes = writer.journal.rows = writer.journal.octets = 0
            self._compactor.forget_garbage()

    # -- online compaction --------------------------------------------------------------------

    async def compact(self) -> CompactionReport:
        """Fold the journal into the snapshot now, while changes go on (`msgctl registry
        compact`); returns what it did. Raises RegistryError if it failed (the file keeps
        the snapshot and journal it had) or the registry closed meanwhile."""
        if self._closed or self._writer.refusal is not None:
            raise RegistryError(f"registry {self._writer.refusal or 'is closed'}")
        if not self._writer.started:
            raise RuntimeError("registry not started")
        return await asyncio.wrap_future(self._compactor.request())

    @property
    def compaction(self) -> Compactor:
        """The online compaction's state (`running`, `phase`, `last`, counts): read-only."""
        return self._compactor

    @property
    def journal(self) -> JournalSize:
        """The live journal: changes, rows and octets not yet folded into the snapshot."""
        return self._writer.journal

    def file_sizes(self) -> tuple[int, int]:
        """(main file, WAL) sizes in octets, as on disk now (any thread)."""
        sizes = []
        for suffix in ("", "-wal"):
            try:
                sizes.append(os.stat(f"{self._path}{suffix}").st_size)
            except OSError:
                sizes.append(0)
        return sizes[0], sizes[1]

    async def close(self) -> None:
        """Flush pending changes, stop the writer, compact and close the file."""
        if self._closed:
            return
        self._writer.refuse("is closed")
        if self.pending():
            if not self._writer.started:
                self.start(asyncio.get_running_loop())
            with contextlib.suppress(RegistryError):
                await self.wait_durable(self._next_seq)
        await asyncio.to_thread(self._shutdown)

    def close_sync(self) -> None:
        """close() for callers without a running event loop (tests, tools)."""
        if self._closed:
            return
        if self._loop is not None and self._loop.is_running():
            # Its callbacks would drain the outbox concurrently with this thread.
            raise RuntimeError("close_sync() while the registry's loop runs; use await close()")
        self._writer.refuse("is closed")
        if self.pending() and not self._writer.started:
            self._writer.start(None)
        while self.pending():
            self._writer.wait_completions()
            self._drain_outbox()
        self._shutdown()

    def _shutdown(self) -> None:
        if self._closed:
            return
        writer = self._writer
        writer.stop()
        self._closed = True
        try:
            self.provisioning.close()
            if self._next_seq == self._durable_seq:
                self._compact()
            with contextlib.suppress(sqlite3.Error):
                writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            writer.conn.close()
            os.close(self._lock_fd)
        log.info("registry %s: closed", self._path)

    # -- test hooks ---------------------------------------------------------------------------

    def _debug_set_max_page_count(self, pages: int | None) -> int:
        """Test hook: cap the file at `pages` pages (None: its current size) on the writer.

        Writes that need more space then fail with SQLITE_FULL, exactly like a full disk.
        Returns the cap in force.
        """
        conn = self._writer.conn

        def work() -> int:
            limit = pages
            if limit is None:
                limit = conn.execute("PRAGMA page_count").fetchone()[0]
            return conn.execute(f"PRAGMA max_page_count = {int(limit)}").fetchone()[0]

        return int(self._writer.run_job(work))

    def __repr__(self) -> str:
        return (
            f"<Registry {self._path} registered={len(self._regs)} pending={self.pending()} "
            f"durable_seq={self._durable_seq}>"
        )
