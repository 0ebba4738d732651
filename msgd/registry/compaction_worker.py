"""The CPU half of an online compaction, in a process of its own.

`python -m msgd.registry.compaction_worker PATH SNAPSHOT_SEQ FIRST END COVERED` reads the
registry file through a read-only connection: it folds the journal rows (SNAPSHOT_SEQ,
COVERED] into each UE's latest value, streams the live snapshot chunks [FIRST, END) with the
UEs the fold names taken out, and writes the new snapshot's chunks to stdout, then its
summary. It writes nothing to the file: the writer thread inserts the chunks and switches
(`compaction`). Those rows and chunks do not change while it reads them (the writer only
appends rows after COVERED, and deletes old ones only after the switch, which waits for this
process), and a read-only connection sees every row committed before it began.

Why a process: decoding, filtering and encoding a million registrations is seconds of
Python, and in the daemon's process each of those seconds is taken from the event loop by
the GIL (measured in the soak: the loop's lag p99 doubled while compactions ran on the
writer thread). Here it runs on another core, at a lower priority, and its memory (the fold
holds each UE it folds once) is returned when it exits.

Frames on stdout: one octet kind, u32 little-endian length, payload.
  C  u32 registrations, then an encoded snapshot chunk (`blobs.encode_snapshot_chunk`)
  E  JSON: changes, rows and octets folded, registrations, chunks, and the gateway names
     (`encode_gateway_names`, hex): the table a load holds after replaying up to COVERED
Exit code 0 after E; otherwise 1 with one line on stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import signal
import sqlite3
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from msgd.registry.blobs import (
    Value,
    decode_gateway_names,
    decode_snapshot_chunk,
    encode_gateway_names,
    encode_snapshot_chunk,
    fold_journal,
)
from msgd.registry.snapshot import SNAPSHOT_CHUNK
from msgd.registry.sql import describe, readonly

__all__ = ["COUNT", "FRAME", "WORKER_NICE", "fold", "frame_output", "lower_priority"]

FRAME = struct.Struct("<cI")
COUNT = struct.Struct("<I")  # the registrations of a C frame
WORKER_NICE = 10  # the daemon's event loop and writer come first


def fold(
    conn: sqlite3.Connection,
    snapshot_seq: int,
    first: int,
    end: int,
    covered: int,
    emit: Callable[[int, bytes], None],
    chunk_size: int = SNAPSHOT_CHUNK,
) -> dict[str, Any]:
    """The new snapshot as of journal row `covered`: emit(registrations, chunk) for each
    chunk in order, and return the summary (the E frame's content)."""
    (names_blob,) = conn.execute(
        "SELECT value FROM meta WHERE key = 'snapshot_gateways'").fetchone()
    names = decode_gateway_names(names_blob)
    changes: dict[str, Value | None] = {}
    summary = {"changes": 0, "rows": 0, "octets": 0, "registrations": 0, "chunks": 0}
    rows = conn.execute("SELECT ops FROM journal WHERE seq > ? AND seq <= ? ORDER BY seq",
                        (snapshot_seq, covered))
    for (blob,) in rows:
        summary["changes"] += sum(fold_journal(blob, changes, names))
        summary["rows"] += 1
        summary["octets"] += len(blob)
    # Rows after `covered` name gateways from index len(names) on: this table is exactly
    # the one a load holds after replaying up to `covered`.
    gw_index = {name: index for index, name in enumerate(names)}
    keys: list[str] = []
    values: list[Value] = []

    def flush(count: int) -> None:
        emit(count, encode_snapshot_chunk(keys[:count], values[:count], gw_index))
        del keys[:count], values[:count]
        summary["registrations"] += count
        summary["chunks"] += 1

    for chunk in range(first, end):
        row = conn.execute("SELECT data FROM snapshot WHERE chunk = ?", (chunk,)).fetchone()
        if row is None:
            raise ValueError(f"snapshot chunk {chunk} is missing")
        old_keys, old_values = decode_snapshot_chunk(row[0], names)
        kept = [key not in changes for key in old_keys]
        keys.extend(itertools.compress(old_keys, kept))
        values.extend(itertools.compress(old_values, kept))
        while len(keys) >= chunk_size:
            flush(chunk_size)
    for key, value in changes.items():
        if value is not None:
            keys.append(key)
            values.append(value)
            if len(keys) >= chunk_size:
                flush(chunk_size)
    if keys:
        flush(len(keys))
    summary["names"] = encode_gateway_names(names).hex()
    return summary


def _die_with_parent() -> None:
    """SIGKILL when the daemon dies (Linux): a kill -9 of msgd must not leave this running.
    (Strictly, when the thread that started it ends: msgd's writer thread, which lives as
    long as the registry and kills this process itself when it abandons a compaction.)"""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def lower_priority(pid: int) -> None:
    """Run process `pid` (0: this one) at nice WORKER_NICE and under SCHED_IDLE, which also
    puts its I/O in the idle class: it gets the CPU time nothing else wants, so not the event
    loop's (docs/registry.md, "Why a process": a nice value alone did not do it). Either call
    may be refused (a seccomp filter, a container): the worker then runs as it is."""
    with contextlib.suppress(OSError):
        if os.getpriority(os.PRIO_PROCESS, pid) < WORKER_NICE:
            os.setpriority(os.PRIO_PROCESS, pid, WORKER_NICE)
    idle = getattr(os, "SCHED_IDLE", None)  # Linux
    if idle is not None:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(pid, idle, os.sched_param(0))


def frame_output() -> BinaryIO:
    """Standard output as a buffered binary stream. Under `python -u` or PYTHONUNBUFFERED
    (common in containers, and inherited from the daemon) `sys.stdout.buffer` is the raw
    file, whose write into a full pipe returns having written only part of a frame when a
    signal interrupts it (SIGSTOP/SIGCONT, a profiler attaching); a BufferedWriter writes
    the rest."""
    return open(sys.stdout.fileno(), "wb", buffering=1 << 16, closefd=False)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent:  # the daemon died before prctl: nobody reads our output
        return 1
    lower_priority(0)  # the daemon did at spawn; run by hand, here
    out = frame_output()

    def emit(count: int, chunk: bytes) -> None:
        out.write(FRAME.pack(b"C", COUNT.size + len(chunk)))
        out.write(COUNT.pack(count))
        out.write(chunk)

    try:
        path, numbers = Path(args[0]), [int(arg) for arg in args[1:5]]
        conn = readonly(path)
        try:
            summary = fold(conn, *numbers, emit=emit)
        finally:
            conn.close()
        data = json.dumps(summary).encode()
        out.write(FRAME.pack(b"E", len(data)))
        out.write(data)
        out.flush()
    except BrokenPipeError:
        return 1  # the daemon is gone
    except Exception as exc:  # one line for the daemon's log; it aborts the compaction
        print(describe(exc), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
