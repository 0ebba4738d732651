"""What replace_provisioning() builds on: staging the new rows, the merge, the admin changes.

A provisioning file arrives in file order, and random-key inserts into the `WITHOUT ROWID`
table are slow (about 45 s for 1 000 000 rows), while holding the rows to sort them would cost
hundreds of MB. So they go to a private scratch database (`Staging`) with no journal and no
fsync, and come back sorted through SQLite's external sort, with the admin changes in place,
ready for a merge with the stored table (`Staging.diff`) or an append-only rebuild. The
functions below are the SQL the final transaction runs on the writer. The steps themselves
are ProvisioningStore.replace_provisioning (docs/registry.md, "Replacing it atomically").
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeAlias

from msgd.errors import ProvisioningError
from msgd.registry.provisioning import ProvisionedUe, encode_gateways, validate_provisioned
from msgd.registry.sql import readonly

__all__ = ["Diff", "Row", "Staging", "read_admin", "reapply_admin", "set_source_digest"]

log = logging.getLogger("msgd.registry")

# A provisioning row as stored: (ue_service_id, key, encoded gateways).
Row: TypeAlias = "tuple[str, bytes, str]"
# What changes from the stored table to the staged rows: (rows to upsert, ids to delete).
Diff: TypeAlias = "tuple[list[Row], list[tuple[str]]]"


class Staging:
    """A private scratch database next to the registry, holding new provisioning rows.

    It needs no journal and no fsync: it is rebuilt from the source after any failure. It lets
    rows arrive in any order with flat memory use, and come back sorted (SQLite's external
    sort), which is what the merge and the append-only rebuild need. The admin changes
    (`provisioning_admin`) are staged too and win over the file's rows on the way out, so the
    count, the diff and the rebuild all see the provisioning as it will be.
    """

    def __init__(self, registry_path: Path) -> None:
        self._registry_path = registry_path
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

    def __enter__(self) -> Staging:
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

    def diff(self, limit: int) -> Diff | None:
        """Merge the sorted new rows with the registry's table (also in key order).

        Returns (rows to upsert, ids to delete), or None once there are more than `limit`.
        """
        upserts: list[tuple[str, bytes, str]] = []
        deletes: list[tuple[str]] = []
        conn = readonly(self._registry_path)
        try:
            old_rows = conn.execute(
                "SELECT ue_service_id, key, gateways FROM provisioning ORDER BY ue_service_id"
            )
            new_rows = self.sorted_rows()
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


def read_admin(path: Path) -> list[tuple[str, bytes | None, str | None]]:
    """The admin changes as stored: (id, key, gateways), or (id, None, None) for a removal."""
    conn = readonly(path)
    try:
        return conn.execute(
            "SELECT ue_service_id, key, gateways FROM provisioning_admin"
        ).fetchall()
    finally:
        conn.close()


def reapply_admin(conn: sqlite3.Connection, path: Path) -> int:
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
    set_source_digest(conn, None)
    log.info("registry %s: admin changes made during the provisioning replace applied "
             "again", path)
    return int(conn.execute("SELECT count(*) FROM provisioning").fetchone()[0])


def set_source_digest(conn: sqlite3.Connection, digest: bytes | None) -> None:
    """Record (or, None, clear) the digest of the file the stored provisioning follows from."""
    if digest is None:
        conn.execute("DELETE FROM meta WHERE key = 'provisioning_source'")
    else:
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('provisioning_source', ?)",
            (digest,),
        )
