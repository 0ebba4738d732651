"""The provisioned subscriber store: K_ue and the authorised gateways of each UE, with the
admin changes made to it (`msgctl provision import|remove|forget`).

It lives in the registry file (tables `provisioning` and `provisioning_admin`) and writes
through the registry's writer thread, so its transactions interleave with group commits and
none holds the writer for long. Lookups come from the in-memory index (`provisioning_index`)
or, until it is built, from a dedicated read connection (WAL lets it read while the writer
writes). replace_provisioning() stages the new rows (`provisioning_staging`) and applies them
atomically. Rows and the CSV file they come from are in `provisioning`; the design and its
measurements are in docs/registry.md ("Provisioning").
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from msgd.errors import ProvisioningError, RegistryError
from msgd.registry.provisioning import (
    ProvisionedUe,
    ProvisioningCsv,
    decode_gateways,
    encode_gateways,
    file_digest,
    make_provisioned,
    validate_provisioned,
)
from msgd.registry.provisioning_index import ProvisioningIndex
from msgd.registry.provisioning_replace import (
    Staging,
    read_admin,
    reapply_admin,
    set_source_digest,
)
from msgd.registry.schema import PROVISIONING_TABLE
from msgd.registry.sql import one_line
from msgd.registry.writer import Writer

__all__ = ["PROVISIONING_CHUNK", "PROVISIONING_DIFF_MIN", "ProvisioningStore"]

log = logging.getLogger("msgd.registry")

PROVISIONING_CHUNK = 50_000  # sorted rows per transaction while rebuilding provisioning
PROVISIONING_DIFF_MIN = 10_000  # a replace changing fewer rows is applied as one transaction
READ_CACHE_KIB = 16 * 1024  # page cache of the provisioning read connection

_SQL_PROVISIONED_GET = "SELECT key, gateways FROM provisioning WHERE ue_service_id = ?"
_SQL_PROVISIONING_UPSERT = (
    "INSERT INTO provisioning(ue_service_id, key, gateways) VALUES (?, ?, ?) "
    "ON CONFLICT(ue_service_id) DO UPDATE SET key = excluded.key, gateways = excluded.gateways"
)
_SQL_ADMIN_PUT = (
    "INSERT OR REPLACE INTO provisioning_admin(ue_service_id, key, gateways) VALUES (?, ?, ?)"
)


class ProvisioningStore:
    """Provisioning lookups, counts, admin changes and replace_provisioning().

    Threads: provisioned() and the counts may be called from any thread. Every write runs on
    the registry's writer thread (inline before it starts) and blocks its caller until
    committed: admin upserts (one transaction for all rows), removals and forgets for one
    transaction, replace_provisioning for the whole load (seconds for a million rows, most of
    it in the caller's thread), so call these through asyncio.to_thread() when the loop must
    keep running. Counters change on the writer thread after a commit, never for a
    transaction that failed.
    """

    def __init__(self, path: Path, writer: Writer) -> None:
        self._path = path
        self._writer = writer
        # Reads: their own connection, safe to use from any thread under the lock.
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
        # Bumped (writer thread) by every committed admin change, so a replace that read the
        # admin changes before it knows to apply them again (see reapply_admin).
        self._admin_generation = 0
        self._replace_lock = threading.Lock()
        # The test seam is looked up at each call, so a test can replace it on this instance.
        self._index = ProvisioningIndex(path, lambda point: self._provisioning_pause(point))
        self._index.rebuild()

    def close(self) -> None:
        """Stop building the index and close the read connection (the registry closes)."""
        self._index.close()
        with self._rlock:
            self._rconn.close()

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
            with Staging(self._path) as staging:
                loaded = staging.load(rows, checked=source is not None)
                digest = source.digest() if source is not None else None
                # Taken before the admin changes are read: any committed after shows as a
                # different generation when the result is applied (on the writer thread).
                admin_generation = self._admin_generation
                staging.load_overrides(read_admin(self._path))
                count = staging.count(loaded)
                limit = max(PROVISIONING_DIFF_MIN, count // 10)
                diff = staging.diff(limit)
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
        index = self._index.published
        if index is not None:
            found = index.get(ue_service_id)
            return None if found is None else make_provisioned(ue_service_id, *found)
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

    def key_and_gateways(self, ue_service_id: str) -> tuple[bytes, frozenset[str]] | None:
        """What the per-UE rules need of a provisioned UE (K_ue and the gateways allowed to
        serve it), or None: provisioned() without building a row, for the hot path."""
        index = self._index.published
        if index is not None:
            return index.get(ue_service_id)
        row = self.provisioned(ue_service_id)
        return None if row is None else (row.key, row.gateways)

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

    def _transaction(
        self, work: Callable[[sqlite3.Connection], Any], *, provisioning: bool = True
    ) -> Any:
        """Writer: run `work` in one write transaction; storage errors become RegistryError.

        `provisioning`: the work may change the `provisioning` table (say False only when it
        cannot). Then the write is bracketed by the index's write_begins() before BEGIN and
        write_ends() once the transaction is over, committed or not, so that an index read
        from a table that a write has changed (or may have) is never published.
        """
        if not provisioning:
            return self._writer.transaction(work)
        self._index.write_begins()
        try:
            result = self._writer.transaction(work)
            self._provisioning_pause("committed")
        finally:
            self._index.write_ends()
        return result

    def _provisioning_pause(self, point: str) -> None:
        """Test seam; does nothing. Called by the index thread between reading the table and
        publishing the index ("index-read"), by a provisioning write between its COMMIT and
        the end of the write ("committed"), and by replace_provisioning() between its merge
        and applying it ("replace-merged"). Tests replace it on the instance to force
        interleavings."""

    def _meta_value(self, key: str) -> Any:
        with self._rlock:
            row = self._rconn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

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
        top (reapply_admin), so it is never undone.
        """

        def work(conn: sqlite3.Connection) -> int:
            conn.executemany(_SQL_PROVISIONING_UPSERT, upserts)
            conn.executemany("DELETE FROM provisioning WHERE ue_service_id = ?", deletes)
            if admin_generation != self._admin_generation:
                return reapply_admin(conn, self._path)
            set_source_digest(conn, digest)
            return count

        count = self._transaction(work)
        self._prov_count = count
        return count

    def _rebuild_provisioning(
        self, staging: Staging, count: int, digest: bytes | None, admin_generation: int
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
                return reapply_admin(conn, self._path)
            set_source_digest(conn, digest)
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
