"""The registry file: its lock, its check at open, its schema and the migrations to it.

`open_file` is the start sequence of docs/registry.md ("Start"): take `<file>.lock`, check
the file through a read-only connection (a damaged file is refused and left exactly as found),
open the writer connection, create or migrate the schema one version at a time, and load the
durable state (`snapshot`). PRAGMA user_version is the schema version; each migration runs in
its own transaction together with the version bump, so an interrupted upgrade resumes where it
stopped.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from msgd.errors import RegistryCorruptError, RegistryError
from msgd.registry.blobs import Value
from msgd.registry.snapshot import State, load_state, write_snapshot
from msgd.registry.sql import one_line, readonly

__all__ = [
    "APPLICATION_ID",
    "MIGRATIONS",
    "PROVISIONING_TABLE",
    "SCHEMA_VERSION",
    "SYNCHRONOUS_MODES",
    "open_file",
]

log = logging.getLogger("msgd.registry")

SCHEMA_VERSION = 4
APPLICATION_ID = 0x4D534744  # "MSGD": tells our files from other SQLite databases
SYNCHRONOUS_MODES = ("full", "normal")
WAL_SIZE_LIMIT = 64 * 1024 * 1024

_SCHEMA_V2 = (
    "CREATE TABLE meta(key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "CREATE TABLE journal(seq INTEGER PRIMARY KEY, ops BLOB NOT NULL)",
    "CREATE TABLE snapshot(chunk INTEGER PRIMARY KEY, data BLOB NOT NULL)",
)
# Also the shape of `provisioning_load`, which a provisioning rebuild fills and swaps in.
PROVISIONING_TABLE = (
    "CREATE TABLE {table}(ue_service_id TEXT PRIMARY KEY, key BLOB NOT NULL, "
    "gateways TEXT NOT NULL) WITHOUT ROWID"
)
# Admin changes (msgctl provision import|remove): a row with its key and gateways, or NULLs for
# a UE the admin removed. replace_provisioning() applies them over the file's rows.
_ADMIN_TABLE = (
    "CREATE TABLE provisioning_admin(ue_service_id TEXT PRIMARY KEY, key BLOB NULL, "
    "gateways TEXT NULL) WITHOUT ROWID"
)


def _create_schema(conn: sqlite3.Connection) -> None:
    """Version 0 (new, empty file) -> the current schema."""
    for statement in _SCHEMA_V2:
        conn.execute(statement)
    conn.execute(PROVISIONING_TABLE.format(table="provisioning"))
    conn.execute(_ADMIN_TABLE)
    write_snapshot(conn, {}, [], 0)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")


def _migrate_1_to_2(conn: sqlite3.Connection) -> None:
    """Schema 1 kept one row per UE (`registration` table); move it into a snapshot.

    Schema 1 is the obvious row-per-UE layout, whose random-key inserts are the throughput
    limit the journal removes (docs/registry.md).
    """
    for statement in _SCHEMA_V2:
        conn.execute(statement)
    regs: dict[str, Value] = {}
    names: list[str] = []
    canon: dict[str, str] = {}
    rows = conn.execute("SELECT ue_service_id, gateway, profile FROM registration")
    for ue, gateway, profile in rows:
        name = canon.get(gateway)
        if name is None:
            name = canon[gateway] = gateway
            names.append(name)
        regs[ue] = name if profile is None else (name, bytes(profile))
    write_snapshot(conn, regs, names, 0)
    conn.execute("DROP TABLE registration")


def _migrate_2_to_3(conn: sqlite3.Connection) -> None:
    """Schema 3 adds `provisioning_admin`: admin changes that outlive reloads (docs/registry.md).

    A schema 2 file has none recorded (an admin change there was undone by the next reload),
    so the table starts empty and the stored provisioning is still exactly the file's.
    """
    conn.execute(_ADMIN_TABLE)


def _migrate_3_to_4(conn: sqlite3.Connection) -> None:
    """Schema 4 names the live snapshot chunks in `meta` (snapshot_chunk_first/_end).

    Online compaction writes a new snapshot beside the live one and switches to it by
    changing these two keys, so a reader must know which chunks are live. A schema 3 file
    holds only live chunks (compaction replaced them all in one transaction). The version
    bump also keeps an older msgd, which would read every chunk, off a schema 4 file.
    """
    first, end = conn.execute(
        "SELECT coalesce(min(chunk), 0), coalesce(max(chunk) + 1, 0) FROM snapshot").fetchone()
    conn.executemany(
        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
        [("snapshot_chunk_first", first), ("snapshot_chunk_end", end)],
    )


# from-version -> function that upgrades a database at that version to from-version + 1
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _migrate_1_to_2,
    2: _migrate_2_to_3,
    3: _migrate_3_to_4,
}


def open_file(path: Path, synchronous: str) -> tuple[int, sqlite3.Connection, State]:
    """Lock, check, create or migrate, and load the registry at `path`; blocking.

    Returns (lock descriptor, writer connection, durable state); the caller owns both and
    releases them on close. On failure both are released here: RegistryCorruptError for a
    file that fails its check (it is never modified), RegistryError when the file cannot be
    opened or is in use by another process. `synchronous` is checked by the caller.

Slightly over 60 lines: lock, check, create-or-migrate and load are one sequence whose every
failure must release the same two resources.
    """
    lock_fd = _acquire_lock(path)
    conn: sqlite3.Connection | None = None
    try:
        version = 0
        wal = path.with_name(path.name + "-wal")
        try:
            wal_size = wal.stat().st_size
        except FileNotFoundError:
            # None, or just removed: the last connection of a registry closed a moment ago
            # (its provisioning index builder's, which close() does not wait for) deletes
            # the WAL. exists() then stat() raced with that (a contract test's reopen).
            wal_size = 0
        if path.exists() and path.stat().st_size == 0 and wal_size == 0:
            # A registry is checkpointed into its file as soon as it is created, so an
            # empty file is a truncated one: SQLite would silently take it as a new one.
            raise RegistryCorruptError(
                f"registry {path} is empty (truncated?); refusing to start, the file is "
                "left untouched (remove it to start with an empty registry)"
            )
        if (path.exists() and path.stat().st_size > 0) or wal_size > 0:
            version = _check_file(path)
        state: State | None = None
        if version == SCHEMA_VERSION:
            # Decode everything before a read-write connection exists: its close would
            # checkpoint the WAL into a file that must stay as found if a blob is damaged.
            reader = readonly(path)
            try:
                state = load_state(reader, path)
            finally:
                reader.close()
        conn = sqlite3.connect(
            str(path), isolation_level=None, check_same_thread=False, cached_statements=32
        )
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise RegistryError(f"registry {path}: WAL mode unavailable")
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        conn.execute("PRAGMA busy_timeout = 5000")
        _prepare_schema(conn, path)
        if version == 0:
            # Put the new schema into the main file now (see the empty-file check above).
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if state is None:  # new or just migrated
            state = load_state(conn, path)
    except sqlite3.Error as exc:
        if conn is not None:
            conn.close()
        os.close(lock_fd)
        raise RegistryError(f"registry {path}: {one_line(exc)}") from None
    except BaseException:
        if conn is not None:
            conn.close()
        os.close(lock_fd)
        raise
    return lock_fd, conn, state


def _acquire_lock(path: Path) -> int:
    """Hold `<registry>.lock` so a second msgd cannot run on the same file.

    A separate file: closing any descriptor of the database itself would drop the POSIX locks
    SQLite holds on it.
    """
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise RegistryError(f"registry {path}: cannot create {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RegistryError(f"registry {path} is in use by another process ({lock_path})") from None
    return fd


# Errors that say the file could not be reached, not that it is damaged.
_NOT_DAMAGE = ("SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_BUSY", "SQLITE_NOMEM")


def _check_file(path: Path) -> int:
    """Refuse a file that is not a sound registry; return its schema version.

    It reads through a read-only connection.

    Read-only matters: a read-write connection checkpoints the WAL into the file when it
    closes, and a damaged file must be left exactly as found for whoever investigates.
    """
    try:
        conn = readonly(path)
    except sqlite3.Error as exc:
        raise RegistryError(f"registry {path}: cannot open: {one_line(exc)}") from None
    try:
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", "") in _NOT_DAMAGE:
            raise RegistryError(f"registry {path}: cannot read: {one_line(exc)}") from None
        raise RegistryCorruptError(
            f"registry {path} is damaged or not a database ({one_line(exc)}); "
            "refusing to start, the file is left untouched"
        ) from None
    finally:
        conn.close()
    if problems != ["ok"]:
        raise RegistryCorruptError(
            f"registry {path} failed PRAGMA quick_check ({one_line(problems[0])}"
            f"{f' and {len(problems) - 1} more' if len(problems) > 1 else ''}); "
            "refusing to start, the file is left untouched"
        )
    if tables and app_id != APPLICATION_ID:
        raise RegistryCorruptError(
            f"registry {path} is an SQLite database but not an msgd registry "
            f"(application_id {app_id:#x}); refusing to start, the file is left untouched"
        )
    known = version == SCHEMA_VERSION or version in MIGRATIONS or not tables
    if version > SCHEMA_VERSION or not known:
        raise RegistryCorruptError(
            f"registry {path} has schema version {version}, this msgd reads up to "
            f"{SCHEMA_VERSION}; refusing to start, the file is left untouched"
        )
    return version if tables else 0


def _prepare_schema(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        steps: list[tuple[int, Callable[[sqlite3.Connection], None]]] = [(0, _create_schema)]
    else:
        steps = [(v, MIGRATIONS[v]) for v in range(version, SCHEMA_VERSION)]
    for from_version, step in steps:
        target = SCHEMA_VERSION if from_version == 0 else from_version + 1
        conn.execute("BEGIN IMMEDIATE")
        try:
            step(conn)
            conn.execute(f"PRAGMA user_version = {target}")
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (target,)
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if from_version:
            log.info("registry %s: migrated schema %d -> %d", path, from_version, target)
    # An interrupted replace_provisioning() leaves its staging table; it was never live.
    conn.execute("DROP TABLE IF EXISTS provisioning_load")
