"""The registry: which Non-MSGin5G UE is registered through which gateway, and the provisioning.

wire-v1 §5 "Semantics, per entry": a registration stores the UE Service ID, the serving gateway
and the profile, replacing any earlier registration of that UE; a de-registration deletes them;
and a success is reported only once the change is durable (it survives a crash of the server
process at any instant). This module keeps that promise:

* Registrations live in memory (one compact dict) so reads cost a dict lookup. Writes are
  applied to memory at once, so later entries of the same bulk see them, and queued for the
  single writer thread.
* The writer appends everything queued as ONE row of an append-only `journal` table (group
  commit) and only then posts the completion to the event loop. A failed commit fails that batch
  and every later change not yet durable, and memory is rolled back to the last durable state.
* A `snapshot` (chunked) plus the journal rows after it is the durable state. Start loads the
  snapshot and replays the journal; compaction rewrites the snapshot at open (large journal)
  and at close.
* The provisioned subscriber store (`provisioning` table) is in the same file; lookups use an
  in-memory index, and a dedicated read connection (WAL lets it read while the writer writes)
  until the index is built. Admin changes (`msgctl provision import|remove`) are also kept in
  `provisioning_admin` and win over the provisioning file at every replace until forgotten.

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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from msgd.errors import ProvisioningError, RegistryError
from msgd.registry.blobs import Op, Value
from msgd.registry.provisioning import (
    ProvisionedUe,
    ProvisioningCsv,
    decode_gateways,
    encode_gateways,
    file_digest,
    make_provisioned,
    validate_provisioned,
)
from msgd.registry.schema import PROVISIONING_TABLE, SYNCHRONOUS_MODES, open_file
from msgd.registry.snapshot import State, compact, worth_compacting
from msgd.registry.sql import one_line, readonly
from msgd.registry.writer import Writer

__all__ = ["Listener", "Registration", "Registry"]

log = logging.getLogger("msgd.registry")

PROVISIONING_CHUNK = 50_000  # sorted rows per transaction while rebuilding provisioning
PROVISIONING_DIFF_MIN = 10_000  # a replace changing fewer rows is applied as one transaction
FAILED_HISTORY = 4_096  # failed seq ranges remembered for wait_durable()
READ_CACHE_KIB = 16 * 1024  # page cache of the provisioning read connection

Listener: TypeAlias = Callable[[int, int, bool], None]

_SQL_PROVISIONED_GET = "SELECT key, gateways FROM provisioning WHERE ue_service_id = ?"
_SQL_PROVISIONING_UPSERT = (
    "INSERT INTO provisioning(ue_service_id, key, gateways) VALUES (?, ?, ?) "
    "ON CONFLICT(ue_service_id) DO UPDATE SET key = excluded.key, gateways = excluded.gateways"
)
# Admin changes (msgctl provision import|remove): a row with its key and gateways, or NULLs for
# a UE the admin removed. replace_provisioning() applies them over the file's rows.
_SQL_ADMIN_PUT = (
    "INSERT OR REPLACE INTO provisioning_admin(ue_service_id, key, gateways) VALUES (?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class Registration:
    """A registered Non-MSGin5G UE: the gateway serving it and its profile IE value, as is."""

    ue_service_id: str
    gateway: str
    profile: bytes | None  # the encoded value of the profile IE, stored as is


class _Staging:
    """A private scratch database next to the registry, holding new provisioning rows.

    It needs no journal and no fsync: it is rebuilt from the source after any failure. It lets
    rows arrive in any order with flat memory use, and come back sorted (SQLite's external
    sort), which is what the merge and the append-only rebuild need. The admin changes
    (`provisioning_admin`) are staged too and win over the file's rows on the way out, so the
    count, the diff and the rebuild all see the provisioning as it will be.
    """

    def __init__(self, registry_path: Path) -> None:
        self.path = registry_path.with_name(registry_path.name + ".staging")
        self.path.unlink(missing_ok=True)  # left by a crash; never holds anything live
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode = OFF")
        self.conn.execute("PRAGMA synchronous = OFF")
        self.conn.execute(
            "CREATE TABLE st(ue_service_id TEXT NOT NULL, key BLOB NOT NULL, "
            "gateways TEXT NOT NULL)"
        )
        self.conn.execute(
            "CREATE TABLE ov(ue_service_id TEXT PRIMARY KEY, key BLOB, gateways TEXT) "
            "WITHOUT ROWID"
        )
        self.overrides = 0

    def __enter__(self) -> _Staging:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.conn.close()
        self.path.unlink(missing_ok=True)

    def load(self, rows: Iterable[ProvisionedUe], *, checked: bool) -> int:
        """Store `rows` (checked here unless `checked`); errors from `rows` propagate."""
        encoded: dict[frozenset[str], str] = {}  # few distinct gateway sets: encode each once
        count = 0

        def params() -> Iterator[tuple[str, bytes, str]]:
            nonlocal count
            for row in rows:
                if not checked:
                    validate_provisioned(row)
                text = encoded.get(row.gateways)
                if text is None:
                    text = encoded[row.gateways] = encode_gateways(row.gateways)
                count += 1
                yield (row.ue_service_id, row.key, text)

        self.conn.execute("BEGIN")
        self.conn.executemany("INSERT INTO st VALUES (?, ?, ?)", params())
        self.conn.execute("COMMIT")
        return count

    def load_overrides(self, overrides: list[tuple[str, bytes | None, str | None]]) -> None:
        """Stage the admin changes: (id, key, gateways), or (id, None, None) for a removal."""
        self.conn.execute("BEGIN")
        self.conn.executemany("INSERT INTO ov VALUES (?, ?, ?)", overrides)
        self.conn.execute("COMMIT")
        self.overrides = len(overrides)

    def count(self, loaded: int) -> int:
        """How many rows sorted_rows() yields, given `loaded` rows from the source."""
        if not self.overrides:
            return loaded
        (kept,) = self.conn.execute(
            "SELECT count(*) FROM st WHERE ue_service_id NOT IN (SELECT ue_service_id FROM ov)"
        ).fetchone()
        (added,) = self.conn.execute("SELECT count(*) FROM ov WHERE key IS NOT NULL").fetchone()
        return int(kept) + int(added)

    def sorted_rows(self) -> Iterator[tuple[str, bytes, str]]:
        """The rows in key order (BINARY collation: the order of the provisioning table), each
        admin change in place of the source's row of that UE (a removal: no row)."""
        previous = None
        if not self.overrides:
            for row in self.conn.execute("SELECT * FROM st ORDER BY ue_service_id"):
                if row[0] == previous:
                    raise ProvisioningError("provisioning rows: duplicate ue_service_id")
                previous = row[0]
                yield row
            return
        # Source rows (0) and admin rows (1) of one UE come out together, the source's first.
        held: tuple[str, bytes, str] | None = None
        for uid, key, gateways, admin in self.conn.execute(
            "SELECT ue_service_id, key, gateways, 0 FROM st UNION ALL "
            "SELECT ue_service_id, key, gateways, 1 FROM ov ORDER BY 1, 4"
        ):
            if uid == previous:
                if not admin:
                    raise ProvisioningError("provisioning rows: duplicate ue_service_id")
                held = None if key is None else (uid, key, gateways)
                continue
            if held is not None:
                yield held
            previous = uid
            held = None if key is None else (uid, key, gateways)
        if held is not None:
            yield held


# ---------------------------------------------------------------------------------------------


class Registry:
    """Registrations in memory, made durable by one writer thread; provisioning in SQLite.

    Threads: submit_*, reads, listeners and wait_durable() belong to the event-loop thread.
    The writer thread owns the write connection. Provisioning writes block their caller until
    committed: admin upserts (one transaction for all rows), removals and forgets for one
    transaction, replace_provisioning for the whole load (seconds for a million rows, most of
    it in the caller's thread), so call these through asyncio.to_thread() when the loop must
    keep running.
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
    ) -> None:
        """Internal: use Registry.open().

        Long because Registry holds the store, the writer and provisioning state together (splitting
        it is issue 11's registry port)."""
        regs, names, journal_seq, _ops = state
        self._path = path
        self._lock_fd = lock_fd
        self._regs = regs
        self._names = names  # append-only while running; the index is the journal's reference
        self._gw_canon = {name: name for name in names}
        self._gw_index = {name: index for index, name in enumerate(names)}
        self._writer = Writer(path, conn, names, self._gw_index, journal_seq,
                              commit_interval=commit_interval, max_batch=max_batch)
        self._ops = self._writer.ops  # submit_* append here; the writer takes from it

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

        # Provisioning reads: their own connection, safe to use from any thread under the lock.
        self._rconn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._rconn.execute("PRAGMA query_only = ON")
        # Bounded: interior pages stay cached, leaves come from the OS page cache (not RSS).
        self._rconn.execute(f"PRAGMA cache_size = -{READ_CACHE_KIB}")
        self._rlock = threading.Lock()
        (self._prov_count,) = self._rconn.execute("SELECT count(*) FROM provisioning").fetchone()
        (self._admin_count,) = self._rconn.execute(
            "SELECT count(*) FROM provisioning_admin"
        ).fetchone()
        self._gwset_cache: dict[str, frozenset[str]] = {}
        # Bumped under _index_lock as every provisioning write begins and again as it ends;
        # _prov_writing counts the writes between the two (see _transaction, _index_main).
        self._prov_generation = 0
        self._prov_writing = 0
        # Bumped (writer thread) by every committed admin change, so a replace that read the
        # admin changes before it knows to apply them again (see _reapply_admin).
        self._admin_generation = 0
        self._replace_lock = threading.Lock()
        # The provisioning index: UE id -> K_ue (32 octets) + gateway-set number (2 octets),
        # with the distinct gateway sets in a list. A point SELECT costs 10-30 µs here and was
        # 45 % of the event loop in a bulk (docs/performance.md); a dict lookup is ~0.1 µs.
        # Built in a background thread after open and after every provisioning write; until it
        # is there (None), lookups fall back to the SELECT.
        self._prov_index: tuple[dict[str, bytes], list[frozenset[str]]] | None = None
        self._index_dirty = threading.Event()
        self._index_lock = threading.Lock()
        self._index_thread: threading.Thread | None = None
        self._rebuild_index()

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        synchronous: str = "full",
        commit_interval: float = 0.001,
        max_batch: int = 20000,
    ) -> Registry:
        """Open (create, migrate, check, load) the registry at `path`; blocking.

        `synchronous` is SQLite's PRAGMA synchronous: "full" (default) syncs the WAL on every
        commit and so survives power loss; "normal" survives a process crash only.
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
                path, conn, lock_fd, state, commit_interval=commit_interval, max_batch=max_batch
            )
        except BaseException as exc:
            conn.close()
            os.close(lock_fd)
            if isinstance(exc, sqlite3.Error):
                raise RegistryError(f"registry {path}: {one_line(exc)}") from None
            raise
        regs, _names, _seq, journal_ops = state
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

    # -- provisioning -------------------------------------------------------------------------

    def replace_provisioning(self, rows: Iterable[ProvisionedUe]) -> int:
        """Replace all provisioning with `rows` atomically; returns how many there are now.

        The admin changes recorded in `provisioning_admin` (upsert_provisioned_many,
        remove_provisioned) win over `rows` until forget_provisioning_overrides() drops them:
        the result is `rows` with each admin change in place of the row of its UE.

        Blocking, and most of the work runs in the calling thread: call it through
        asyncio.to_thread() from a running loop. If `rows` raises (e.g. ProvisioningError from
        read_provisioning_csv) or storage fails, the old provisioning stays. Steps:

        1. rows from read_provisioning_csv() of a file byte-identical to the one the stored
           provisioning came from (no admin change forgotten since): nothing to do;
        2. rows go to a private staging file (no journal, no fsync), the admin changes too, and
           come back sorted with the admin changes applied;
        3. a merge with the stored table finds the differences: if few, they are applied in one
           transaction; else the table is rebuilt from the sorted rows in short append-only
           transactions and swapped in with one transaction. Registration commits go on between
           these transactions; none of them holds the writer for long. An admin change committed
           meanwhile is applied again in that last transaction.

        Long on purpose: the three steps below share the staging file and the lock.
        """
        if self._writer.refusal is not None:
            raise RegistryError(f"registry {self._writer.refusal}")
        source = rows if isinstance(rows, ProvisioningCsv) else None
        with self._replace_lock:
            if source is not None and not source.started:
                stored = self._meta_value("provisioning_source")
                if stored is not None and stored == file_digest(source.path):
                    log.info(
                        "registry %s: provisioning file %s unchanged, %d UEs kept",
                        self._path,
                        source.path,
                        self._prov_count,
                    )
                    return self._prov_count
            with _Staging(self._path) as staging:
                loaded = staging.load(rows, checked=source is not None)
                digest = source.digest() if source is not None else None
                # Taken before the admin changes are read: any committed after shows as a
                # different generation when the result is applied (on the writer thread).
                admin_generation = self._admin_generation
                staging.load_overrides(self._read_admin())
                count = staging.count(loaded)
                limit = max(PROVISIONING_DIFF_MIN, count // 10)
                diff = self._provisioning_diff(staging, limit)
                self._provisioning_pause("replace-merged")
                if diff is not None:
                    upserts, deletes = diff
                    count = self._writer.run_job(
                        lambda: self._apply_provisioning_diff(
                            upserts, deletes, admin_generation, count, digest
                        )
                    )
                    log.info(
                        "registry %s: provisioning replaced, %d UEs (%d added or changed, "
                        "%d removed; %d admin changes kept over the file)",
                        self._path,
                        count,
                        len(upserts),
                        len(deletes),
                        staging.overrides,
                    )
                    return count
                count = self._rebuild_provisioning(staging, count, digest, admin_generation)
        log.info(
            "registry %s: provisioning replaced, %d UEs (rebuilt; %d admin changes kept over "
            "the file)",
            self._path,
            count,
            staging.overrides,
        )
        return count

    def provisioned(self, ue_service_id: str) -> ProvisionedUe | None:
        """The provisioning row of a UE, or None: from the in-memory index when it is built,
        else one indexed SELECT (docs/registry.md)."""
        index = self._prov_index
        if index is not None:
            value = index[0].get(ue_service_id)
            if value is None:
                return None
            gateways = index[1][(value[32] << 8) | value[33]]
            return make_provisioned(ue_service_id, value[:32], gateways)
        try:
            with self._rlock:
                row = self._rconn.execute(_SQL_PROVISIONED_GET, (ue_service_id,)).fetchone()
        except sqlite3.ProgrammingError:
            raise RegistryError("registry is closed") from None
        except sqlite3.Error as exc:
            raise RegistryError(f"registry {self._path}: {one_line(exc)}") from None
        if row is None:
            return None
        key, text = row
        gateways = self._gwset_cache.get(text)
        if gateways is None:
            if len(self._gwset_cache) > 4096:  # distinct gateway sets are few; bound it anyway
                self._gwset_cache.clear()
            gateways = self._gwset_cache[text] = decode_gateways(text)
        return make_provisioned(ue_service_id, key, gateways)

    def provisioned_count(self) -> int:
        """Number of provisioned UEs (kept as a counter; counting rows would scan the table)."""
        return self._prov_count

    def provisioning_overrides(self) -> int:
        """Number of admin changes that win over the provisioning file (msgctl status)."""
        return self._admin_count

    def upsert_provisioned(self, row: ProvisionedUe) -> None:
        """upsert_provisioned_many([row])."""
        self.upsert_provisioned_many([row])

    def upsert_provisioned_many(self, rows: Iterable[ProvisionedUe]) -> int:
        """Add or replace provisioning rows (admin `provision import`) in ONE transaction.

        Every row is checked first: a bad row or a duplicate UE raises ProvisioningError and
        nothing is stored. A storage failure raises RegistryError and none of the rows is
        stored either. Each row is also recorded as an admin change, which replace_provisioning()
        keeps over the provisioning file until forget_provisioning_overrides(). Durable when it
        returns; returns how many of the UEs were not provisioned before.
        """
        params: list[tuple[str, bytes, str]] = []
        seen: set[str] = set()
        encoded: dict[frozenset[str], str] = {}
        for row in rows:
            validate_provisioned(row)
            if row.ue_service_id in seen:
                raise ProvisioningError(
                    f"provisioning rows: duplicate ue_service_id {row.ue_service_id!r}"
                )
            seen.add(row.ue_service_id)
            text = encoded.get(row.gateways)
            if text is None:
                text = encoded[row.gateways] = encode_gateways(row.gateways)
            params.append((row.ue_service_id, row.key, text))
        if not params:
            return 0

        def work(conn: sqlite3.Connection) -> tuple[int, int]:
            added = 0
            for param in params:
                if conn.execute(
                    "SELECT 1 FROM provisioning WHERE ue_service_id = ?", (param[0],)
                ).fetchone() is None:
                    added += 1
                conn.execute(_SQL_PROVISIONING_UPSERT, param)
            conn.executemany(_SQL_ADMIN_PUT, params)
            return added, self._count_admin(conn)

        def job() -> int:
            added, overrides = self._transaction(work)
            # Counters change on the writer thread, after the commit, like every other write.
            self._prov_count += added
            self._admin_count = overrides
            self._admin_generation += 1
            return added

        return int(self._writer.run_job(job))

    def remove_provisioned(self, ue_service_id: str) -> bool:
        """Remove one provisioning row (admin `provision remove`); True if it existed.

        The removal is recorded as an admin change, so a reload of a provisioning file that
        still holds the UE does not bring it back until the change is forgotten. Nothing is
        recorded for a UE that was not provisioned. Registrations are not touched.
        """

        def work(conn: sqlite3.Connection) -> int | None:
            cursor = conn.execute(
                "DELETE FROM provisioning WHERE ue_service_id = ?", (ue_service_id,)
            )
            if not cursor.rowcount:
                return None
            conn.execute(_SQL_ADMIN_PUT, (ue_service_id, None, None))
            return self._count_admin(conn)

        def job() -> bool:
            overrides = self._transaction(work)
            if overrides is None:
                return False
            self._prov_count -= 1
            self._admin_count = overrides
            self._admin_generation += 1
            return True

        return bool(self._writer.run_job(job))

    def forget_provisioning_overrides(
        self, ue_service_ids: Iterable[str] | None = None
    ) -> list[str]:
        """Drop admin changes (those of `ue_service_ids`, or all with None); returns the UEs
        whose change was dropped.

        The provisioned rows stay as they are until the next replace_provisioning() (reload or
        restart), which then takes these UEs from the provisioning file again.
        """
        wanted = None if ue_service_ids is None else list(dict.fromkeys(ue_service_ids))

        def work(conn: sqlite3.Connection) -> tuple[list[str], int]:
            if wanted is None:
                dropped = [uid for (uid,) in conn.execute(
                    "SELECT ue_service_id FROM provisioning_admin")]
                conn.execute("DELETE FROM provisioning_admin")
            else:
                dropped = []
                for uid in wanted:
                    cursor = conn.execute(
                        "DELETE FROM provisioning_admin WHERE ue_service_id = ?", (uid,)
                    )
                    if cursor.rowcount:
                        dropped.append(uid)
            if dropped:
                # The stored rows no longer follow from the file and the admin changes: the
                # next replace must not take the unchanged-file shortcut.
                conn.execute("DELETE FROM meta WHERE key = 'provisioning_source'")
            return dropped, self._count_admin(conn)

        def job() -> list[str]:
            # The provisioning table is not touched: the index stays.
            dropped, overrides = self._transaction(work, provisioning=False)
            self._admin_count = overrides
            if dropped:
                self._admin_generation += 1
            return dropped

        return list(self._writer.run_job(job))

    @staticmethod
    def _count_admin(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT count(*) FROM provisioning_admin").fetchone()[0])

    def _read_admin(self) -> list[tuple[str, bytes | None, str | None]]:
        conn = readonly(self._path)
        try:
            return conn.execute(
                "SELECT ue_service_id, key, gateways FROM provisioning_admin"
            ).fetchall()
        finally:
            conn.close()

    def _transaction(
        self, work: Callable[[sqlite3.Connection], Any], *, provisioning: bool = True
    ) -> Any:
        """Writer: run `work` in one write transaction; storage errors become RegistryError.

        `provisioning`: the work may change the `provisioning` table (say False only when it
        cannot). Then, under _index_lock, the in-memory index is dropped, the write is marked
        in progress and the generation bumped before BEGIN, and again bumped (and a rebuild
        requested) once the transaction is over, committed or not. _index_main publishes an
        index only if it saw no write in progress when it started reading and the generation
        is unchanged when it publishes, under the same lock: an index read from a table that a
        write has changed (or may have) is never published.
        """
        if provisioning:
            with self._index_lock:
                self._prov_writing += 1
                self._prov_generation += 1
                self._prov_index = None
        try:
            result = self._writer.transaction(work)
            if provisioning:
                self._provisioning_pause("committed")
        finally:
            if provisioning:
                with self._index_lock:
                    self._prov_writing -= 1
                    self._prov_generation += 1
                    self._prov_index = None
                    self._request_index()
        return result

    def _provisioning_pause(self, point: str) -> None:
        """Test seam; does nothing. Called by the index thread between reading the table and
        publishing the index ("index-read"), by a provisioning write between its COMMIT and
        the end of the write ("committed"), and by replace_provisioning() between its merge
        and applying it ("replace-merged"). Tests override it to force interleavings."""

    def _rebuild_index(self) -> None:
        """Have the provisioning index rebuilt in the background (coalesced)."""
        with self._index_lock:
            self._request_index()

    def _request_index(self) -> None:
        """_rebuild_index() for a caller that holds _index_lock."""
        self._index_dirty.set()
        if self._index_thread is None and not self._closed:
            self._index_thread = threading.Thread(
                target=self._index_main, name="msgd-provisioning-index", daemon=True)
            self._index_thread.start()

    def _index_main(self) -> None:
        while True:
            with self._index_lock:  # so a write that comes as we leave starts a new thread
                # A write in progress requests a new build when it ends.
                if not self._index_dirty.is_set() or self._closed or self._prov_writing:
                    self._index_thread = None
                    return
                self._index_dirty.clear()
                generation = self._prov_generation
            try:
                index = self._read_index(generation)
            except (sqlite3.Error, ValueError) as exc:
                log.warning("registry %s: provisioning index not built (%s); lookups use SQL",
                            self._path, one_line(exc))
                continue
            if index is None:
                continue
            self._provisioning_pause("index-read")
            with self._index_lock:
                # No write was in progress when the read began and none has begun since (each
                # bumps the generation under this lock before its BEGIN): the table read is
                # the table now, and no write can begin before the index is in place.
                if generation != self._prov_generation or self._prov_writing or self._closed:
                    continue
                self._prov_index = index
            log.info("registry %s: provisioning index of %d UEs in memory",
                     self._path, len(index[0]))

    def _read_index(
        self, generation: int
    ) -> tuple[dict[str, bytes], list[frozenset[str]]] | None:
        """The index of the table as it is; None once a write began (generation moved)."""
        conn = sqlite3.connect(str(self._path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA query_only = ON")
            numbers: dict[str, int] = {}
            sets: list[frozenset[str]] = []
            index: dict[str, bytes] = {}
            for uid, key, text in conn.execute(
                "SELECT ue_service_id, key, gateways FROM provisioning"
            ):
                if self._closed or self._prov_generation != generation:
                    return None
                number = numbers.get(text)
                if number is None:
                    if len(sets) >= 1 << 16:
                        raise ValueError("more than 65536 distinct gateway sets")
                    number = numbers[text] = len(sets)
                    sets.append(decode_gateways(text))
                index[uid] = bytes(key) + number.to_bytes(2, "big")
            return index, sets
        finally:
            conn.close()

    def _meta_value(self, key: str) -> Any:
        with self._rlock:
            row = self._rconn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _provisioning_diff(
        self, staging: _Staging, limit: int
    ) -> tuple[list[tuple[str, bytes, str]], list[tuple[str]]] | None:
        """Merge the sorted new rows with the stored table (also in key order).

        Returns (rows to upsert, ids to delete), or None once there are more than `limit`.
        """
        upserts: list[tuple[str, bytes, str]] = []
        deletes: list[tuple[str]] = []
        conn = sqlite3.connect(self._path.absolute().as_uri() + "?mode=ro", uri=True)
        try:
            old_rows = conn.execute(
                "SELECT ue_service_id, key, gateways FROM provisioning ORDER BY ue_service_id"
            )
            new_rows = staging.sorted_rows()
            new = next(new_rows, None)
            old = next(old_rows, None)
            while new is not None or old is not None:
                if old is None or (new is not None and new[0] < old[0]):
                    upserts.append(new)  # type: ignore[arg-type]
                    new = next(new_rows, None)
                elif new is None or old[0] < new[0]:
                    deletes.append((old[0],))
                    old = next(old_rows, None)
                else:
                    if new != old:
                        upserts.append(new)
                    new = next(new_rows, None)
                    old = next(old_rows, None)
                if len(upserts) + len(deletes) > limit:
                    return None
        finally:
            conn.close()
        return upserts, deletes

    def _apply_provisioning_diff(
        self,
        upserts: list[tuple[str, bytes, str]],
        deletes: list[tuple[str]],
        admin_generation: int,
        count: int,
        digest: bytes | None,
    ) -> int:
        """Writer: apply a merge result in one transaction; returns the count now provisioned.

        An admin change committed since the merge read the admin changes is applied again on
        top (_reapply_admin), so it is never undone.
        """

        def work(conn: sqlite3.Connection) -> int:
            conn.executemany(_SQL_PROVISIONING_UPSERT, upserts)
            conn.executemany("DELETE FROM provisioning WHERE ue_service_id = ?", deletes)
            if admin_generation != self._admin_generation:
                return self._reapply_admin(conn)
            self._set_source_digest(conn, digest)
            return count

        count = self._transaction(work)
        self._prov_count = count
        return count

    def _reapply_admin(self, conn: sqlite3.Connection) -> int:
        """Writer, in a transaction: apply every admin change to `provisioning` as it is now.

        For a replace that raced an admin change: the rows it wrote came from the admin changes
        as they were when it started. A change forgotten meanwhile may still show, so the file
        digest is cleared and the next replace reads the file again. Returns the row count.
        """
        conn.execute(
            "DELETE FROM provisioning WHERE ue_service_id IN "
            "(SELECT ue_service_id FROM provisioning_admin WHERE key IS NULL)"
        )
        conn.execute(
            "INSERT INTO provisioning(ue_service_id, key, gateways) "
            "SELECT ue_service_id, key, gateways FROM provisioning_admin WHERE key IS NOT NULL "
            "ORDER BY ue_service_id "
            "ON CONFLICT(ue_service_id) DO UPDATE SET key = excluded.key, "
            "gateways = excluded.gateways"
        )
        self._set_source_digest(conn, None)
        log.info("registry %s: admin changes made during the provisioning replace applied "
                 "again", self._path)
        return int(conn.execute("SELECT count(*) FROM provisioning").fetchone()[0])

    def _rebuild_provisioning(
        self, staging: _Staging, count: int, digest: bytes | None, admin_generation: int
    ) -> int:
        """Fill provisioning_load from the sorted rows (appends only), then swap it in.

        Returns the count now provisioned.
        """

        def create(conn: sqlite3.Connection) -> None:
            conn.execute("DROP TABLE IF EXISTS provisioning_load")
            conn.execute(PROVISIONING_TABLE.format(table="provisioning_load"))

        def append(chunk: list[tuple[str, bytes, str]]) -> Callable[[sqlite3.Connection], None]:
            return lambda conn: conn.executemany(
                "INSERT INTO provisioning_load VALUES (?, ?, ?)", chunk
            )

        def swap(conn: sqlite3.Connection) -> int:
            # The one atomic step: readers see the old table or the new one.
            conn.execute("DROP TABLE provisioning")
            conn.execute("ALTER TABLE provisioning_load RENAME TO provisioning")
            if admin_generation != self._admin_generation:
                return self._reapply_admin(conn)
            self._set_source_digest(conn, digest)
            return count

        def swap_job() -> int:
            done = int(self._transaction(swap))
            self._prov_count = done
            return done

        def drop(conn: sqlite3.Connection) -> None:
            conn.execute("DROP TABLE IF EXISTS provisioning_load")

        # provisioning_load is not what lookups read: only the swap touches the index.
        self._writer.run_job(lambda: self._transaction(create, provisioning=False))
        try:
            rows = staging.sorted_rows()
            while chunk := list(itertools.islice(rows, PROVISIONING_CHUNK)):
                self._writer.run_job(
                    functools.partial(self._transaction, append(chunk), provisioning=False)
                )
            return int(self._writer.run_job(swap_job))
        except BaseException:
            with contextlib.suppress(Exception):  # else the next open or replace drops it
                self._writer.run_job(lambda: self._transaction(drop, provisioning=False))
            raise

    @staticmethod
    def _set_source_digest(conn: sqlite3.Connection, digest: bytes | None) -> None:
        if digest is None:
            conn.execute("DELETE FROM meta WHERE key = 'provisioning_source'")
        else:
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('provisioning_source', ?)",
                (digest,),
            )

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

        The hot path of every registration: a few dict/deque operations, no allocation beyond
        the op tuple (the gateway name is interned, so the stored value is shared).
        """
        refusal = self._writer.refusal
        if refusal is not None:
            raise RegistryError(f"registry {refusal}")
        if ue_service_id.__class__ is not str:
            raise TypeError("ue_service_id must be str")
        name = self._gw_canon.get(gateway)
        if name is None:
            name = self._intern_gateway(gateway)
        if profile is None:
            new: Value = name
        else:
            new = (name, profile if profile.__class__ is bytes else bytes(profile))
        regs = self._regs
        op = (ue_service_id, new, regs.get(ue_service_id))
        regs[ue_service_id] = new
        return self._queue(op)

    def submit_deregister(self, ue_service_id: str) -> int:
        """De-register a UE (a no-op change if it is not registered). Returns its seq."""
        refusal = self._writer.refusal
        if refusal is not None:
            raise RegistryError(f"registry {refusal}")
        if ue_service_id.__class__ is not str:
            raise TypeError("ue_service_id must be str")
        return self._queue((ue_service_id, None, self._regs.pop(ue_service_id, None)))

    def _queue(self, op: Op) -> int:
        self._undo.append(op)
        self._ops.append(op)
        self._next_seq = seq = self._next_seq + 1
        writer = self._writer
        if writer.idle:  # see Writer._step for why this cannot miss a wake-up
            writer.wake.set()
        return seq

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

    def _drain_outbox(self) -> None:
        for ok, first, last, *rest in self._writer.take_completions():
            if ok:
                self._on_durable(first, last)
            else:
                self._on_failed(first, rest[0], resume_writer=last is not None)

    def _on_durable(self, first: int, last: int) -> None:
        if first != self._durable_seq + 1:  # cannot happen; say so loudly if it does
            log.error("registry: completion %d..%d out of order", first, last)
        del self._undo[: last - first + 1]
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
        compact(writer.conn, self._path, self._regs, self._names, writer.journal_seq)

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
            if self._next_seq == self._durable_seq:
                self._compact()
            with contextlib.suppress(sqlite3.Error):
                writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            with self._rlock:
                self._rconn.close()
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
