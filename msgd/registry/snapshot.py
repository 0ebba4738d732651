"""The durable registration state in the file: the snapshot plus the journal rows after it.

`load_state` reads it at start (snapshot chunks, then the journal replayed on top);
`write_snapshot` and `compact` replace the snapshot with a given state and empty the journal
(offline: at open and close). Online compaction (`compaction`) writes a new snapshot beside
the live one and switches `meta` to it, so the live snapshot is the chunks in
[snapshot_chunk_first, snapshot_chunk_end) and the live journal the rows after snapshot_seq;
anything else is left by a compaction or a clean-up that was interrupted, and is ignored here.
The blob layouts are in `blobs`; why a journal and a snapshot rather than one row per UE is in
docs/registry.md ("The file", "Compaction").
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

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
    "JournalSize",
    "State",
    "compact",
    "has_garbage",
    "live_range",
    "load_state",
    "worth_compacting",
    "write_snapshot",
]

log = logging.getLogger("msgd.registry")

SNAPSHOT_CHUNK = 8_192  # registrations per snapshot row (online compaction reads one a step)
COMPACT_MIN_OPS = 10_000  # open() leaves a shorter journal alone



@dataclass
class JournalSize:
    """The live journal (rows after snapshot_seq): changes, rows and octets.

    Kept by the writer thread (it adds each commit, online compaction takes away what it
    folded); metrics read the ints from another thread, which the GIL makes safe."""

    changes: int = 0
    rows: int = 0
    octets: int = 0


class State(NamedTuple):
    """What a load yields."""

    regs: dict[str, Value]
    names: list[str]  # gateway names by index: the snapshot's, then those the journal added
    journal_seq: int  # the last journal row
    journal: JournalSize  # what was replayed
    garbage: bool  # rows an interrupted compaction or clean-up left (ignored, to delete)


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
    first, end = meta["snapshot_chunk_first"], meta["snapshot_chunk_end"]
    names = decode_gateway_names(meta["snapshot_gateways"])
    regs: dict[str, Value] = {}
    chunks = 0
    rows = conn.execute(
        "SELECT data FROM snapshot WHERE chunk >= ? AND chunk < ? ORDER BY chunk", (first, end))
    for (data,) in rows:
        load_snapshot_chunk(data, regs, names)
        chunks += 1
    if chunks != end - first:
        raise BlobFormatError("snapshot chunk missing")
    if len(regs) != meta["snapshot_count"]:
        raise BlobFormatError("snapshot count mismatch")
    last_seq = snapshot_seq
    journal = JournalSize()
    rows = conn.execute("SELECT seq, ops FROM journal WHERE seq > ? ORDER BY seq", (snapshot_seq,))
    for seq, blob in rows:
        journal.changes += apply_journal(blob, regs, names)
        journal.rows += 1
        journal.octets += len(blob)
        last_seq = seq
    return State(regs, names, last_seq, journal, has_garbage(conn))


def live_range(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """(snapshot_seq, snapshot_chunk_first, snapshot_chunk_end) as `meta` has them now."""
    # One row, not one per key: each row fetched gives the GIL away (compaction.py).
    seq, first, end = conn.execute(
        "SELECT (SELECT value FROM meta WHERE key = 'snapshot_seq'), "
        "(SELECT value FROM meta WHERE key = 'snapshot_chunk_first'), "
        "(SELECT value FROM meta WHERE key = 'snapshot_chunk_end')").fetchone()
    if seq is None or first is None or end is None:
        raise RegistryCorruptError("registry meta lacks the live snapshot's range")
    return seq, first, end


def has_garbage(conn: sqlite3.Connection) -> bool:
    """Whether the file holds snapshot chunks outside the live range or journal rows the
    snapshot covers: left by an online compaction or its clean-up that did not finish."""
    seq, first, end = live_range(conn)
    return bool(
        conn.execute("SELECT EXISTS(SELECT 1 FROM snapshot WHERE chunk < ?)", (first,))
        .fetchone()[0]
        or conn.execute("SELECT EXISTS(SELECT 1 FROM snapshot WHERE chunk >= ?)", (end,))
        .fetchone()[0]
        or conn.execute("SELECT EXISTS(SELECT 1 FROM journal WHERE seq <= ?)", (seq,))
        .fetchone()[0]
    )


def write_snapshot(
    conn: sqlite3.Connection, regs: dict[str, Value], names: list[str], covered_seq: int
) -> None:
    """Replace the snapshot with `regs` and empty the journal; the caller holds a transaction.

    The whole journal goes, not only rows up to covered_seq: a row above it can only be left
    by a commit that reported failure, and memory (rolled back) is the truth.
    """
    gw_index = {name: index for index, name in enumerate(names)}
    conn.execute("DELETE FROM snapshot")  # also whatever an online compaction left
    keys = iter(regs)
    chunks = 0
    for chunk in itertools.count():
        part = list(itertools.islice(keys, SNAPSHOT_CHUNK))
        if not part:
            break
        conn.execute(
            "INSERT INTO snapshot(chunk, data) VALUES (?, ?)",
            (chunk, encode_snapshot_chunk(part, map(regs.__getitem__, part), gw_index)),
        )
        chunks += 1
    conn.executemany(
        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
        [
            ("snapshot_seq", covered_seq),
            ("snapshot_count", len(regs)),
            ("snapshot_gateways", encode_gateway_names(names)),
            ("snapshot_chunk_first", 0),
            ("snapshot_chunk_end", chunks),
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
) -> bool:
    """Write a fresh snapshot of `regs` and empty the journal, in one transaction.

    Only valid when `regs` is the durable state (nothing pending, the writer idle) and
    `covered_seq` the last journal row written. A failure (e.g. disk full) keeps the old
    snapshot and journal, which stay consistent. Returns whether the file was rewritten.
    """
    empty = conn.execute("SELECT NOT EXISTS(SELECT 1 FROM journal)").fetchone()[0]
    if empty and not has_garbage(conn):
        return False
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
        return False
    log.info(
        "registry %s: compacted %d registrations in %.2f s",
        path,
        len(regs),
        time.monotonic() - started,
    )
    return True
