"""The durable registration state in the file: the snapshot plus the journal rows after it.

`load_state` reads it at start (snapshot chunks, then the journal replayed on top);
`write_snapshot` and `compact` replace the snapshot with a given state and empty the journal.
The blob layouts are in `blobs`; why a journal and a snapshot rather than one row per UE is in
docs/registry.md ("The file", "Compaction").
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import struct
import time
from pathlib import Path
from typing import TypeAlias

from msgd.errors import RegistryCorruptError
from msgd.registry.blobs import (
    BlobFormatError,
    Value,
    apply_journal,
    decode_gateway_names,
    encode_gateway_names,
    encode_snapshot_chunk,
    load_snapshot_chunk,
)
from msgd.registry.sql import one_line, rollback_quietly

__all__ = [
    "COMPACT_MIN_OPS",
    "SNAPSHOT_CHUNK",
    "State",
    "compact",
    "load_state",
    "worth_compacting",
    "write_snapshot",
]

log = logging.getLogger("msgd.registry")

SNAPSHOT_CHUNK = 65_536  # registrations per snapshot row
COMPACT_MIN_OPS = 10_000  # open() leaves a shorter journal alone

# What a load yields: (registrations, gateway names, last journal seq, journal ops replayed).
State: TypeAlias = "tuple[dict[str, Value], list[str], int, int]"


def load_state(conn: sqlite3.Connection, path: Path) -> State:
    """Read the durable state: snapshot, then the journal after it.

    Returns (registrations, gateway names, last journal seq, journal ops replayed). Damage
    inside the data raises RegistryCorruptError naming the file.
    """
    try:
        return _load(conn)
    except (BlobFormatError, KeyError, TypeError, ValueError, struct.error) as exc:
        raise RegistryCorruptError(
            f"registry {path} holds damaged registration data ({one_line(exc)}); "
            "refusing to start, the file is left untouched"
        ) from None


def _load(conn: sqlite3.Connection) -> State:
    meta = dict(conn.execute("SELECT key, value FROM meta"))
    snapshot_seq = meta["snapshot_seq"]
    names = decode_gateway_names(meta["snapshot_gateways"])
    regs: dict[str, Value] = {}
    for (data,) in conn.execute("SELECT data FROM snapshot ORDER BY chunk"):
        load_snapshot_chunk(data, regs, names)
    if len(regs) != meta["snapshot_count"]:
        raise BlobFormatError("snapshot count mismatch")
    last_seq, n_ops = snapshot_seq, 0
    rows = conn.execute("SELECT seq, ops FROM journal WHERE seq > ? ORDER BY seq", (snapshot_seq,))
    for seq, blob in rows:
        n_ops += apply_journal(blob, regs, names)
        last_seq = seq
    return regs, names, last_seq, n_ops


def write_snapshot(
    conn: sqlite3.Connection, regs: dict[str, Value], names: list[str], covered_seq: int
) -> None:
    """Replace the snapshot with `regs` and empty the journal; the caller holds a transaction.

    The whole journal goes, not only rows up to covered_seq: a row above it can only be left
    by a commit that reported failure, and memory (rolled back) is the truth.
    """
    gw_index = {name: index for index, name in enumerate(names)}
    conn.execute("DELETE FROM snapshot")
    items = iter(regs.items())
    for chunk in itertools.count():
        part = list(itertools.islice(items, SNAPSHOT_CHUNK))
        if not part:
            break
        conn.execute(
            "INSERT INTO snapshot(chunk, data) VALUES (?, ?)",
            (chunk, encode_snapshot_chunk(part, gw_index)),
        )
    conn.executemany(
        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
        [
            ("snapshot_seq", covered_seq),
            ("snapshot_count", len(regs)),
            ("snapshot_gateways", encode_gateway_names(names)),
        ],
    )
    conn.execute("DELETE FROM journal")


def worth_compacting(journal_ops: int, registrations: int) -> bool:
    """Whether open() should compact after replaying `journal_ops`.

    Replaying an op costs about what loading a snapshot entry does, so compacting at open pays
    only when the journal is mostly churn (and close() compacts anyway).
    """
    return journal_ops >= COMPACT_MIN_OPS and journal_ops > 2 * registrations


def compact(
    conn: sqlite3.Connection,
    path: Path,
    regs: dict[str, Value],
    names: list[str],
    covered_seq: int,
) -> None:
    """Write a fresh snapshot of `regs` and empty the journal, in one transaction.

    Only valid when `regs` is the durable state (nothing pending, the writer idle) and
    `covered_seq` the last journal row written. A failure (e.g. disk full) keeps the old
    snapshot and journal, which stay consistent.
    """
    if conn.execute("SELECT count(*) FROM journal").fetchone()[0] == 0:
        return
    started = time.monotonic()
    try:
        conn.execute("BEGIN IMMEDIATE")
        write_snapshot(conn, regs, names, covered_seq)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        rollback_quietly(conn, path)
        log.warning(
            "registry %s: compaction failed (%s); the journal is kept", path, one_line(exc)
        )
        return
    log.info(
        "registry %s: compacted %d registrations in %.2f s",
        path,
        len(regs),
        time.monotonic() - started,
    )
