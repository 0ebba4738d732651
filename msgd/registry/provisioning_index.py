"""The in-memory provisioning index and the background thread that builds it.

`provisioned()` is on the hot path of every registration entry: a point SELECT costs 10-30 µs
here and was 45 % of the event loop in a bulk (docs/performance.md), the index ~1.3 µs.
The index (`packed_index`, ~70 B per UE) maps a UE id to K_ue and a number into the list of
distinct gateway sets. It is built from the `provisioning` table after open and after every
provisioning write (coalesced); until it is published, the store's lookups fall back to SQL.

An index read from a table that a write has since changed is never published, not even for a
moment: every write brackets its transaction with write_begins() / write_ends(), and the
thread publishes only if no write was in progress when it began reading and none has begun
since (docs/registry.md, "Lookups").
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from msgd.registry.packed_index import PackedIndex, PackedIndexBuilder
from msgd.registry.provisioning import decode_gateways
from msgd.registry.sql import one_line

__all__ = ["ProvisioningIndex"]

log = logging.getLogger("msgd.registry")


class ProvisioningIndex:
    """The published index (`published`, None while there is none) and its builder thread.

    `pause` is the provisioning store's test seam, called between reading the table and
    publishing ("index-read").
    """

    def __init__(self, path: Path, pause: Callable[[str], None]) -> None:
        self._path = path
        self._pause = pause
        self.published: PackedIndex | None = None
        self.thread: threading.Thread | None = None  # the builder, while it runs
        self._dirty = threading.Event()
        self._lock = threading.Lock()
        # Bumped under _lock as every provisioning write begins and again as it ends; _writing
        # counts the writes between the two (see _main).
        self._generation = 0
        self._writing = 0
        self._closed = False

    def rebuild(self) -> None:
        """Have the index rebuilt in the background (coalesced)."""
        with self._lock:
            self._request()

    def write_begins(self) -> None:
        """Before a write that may change `provisioning` takes BEGIN: drop the index and stop
        any read in progress from being published."""
        with self._lock:
            self._writing += 1
            self._generation += 1
            self.published = None

    def write_ends(self) -> None:
        """Once that write is over, committed or not: rebuild from the table as it is now."""
        with self._lock:
            self._writing -= 1
            self._generation += 1
            self.published = None
            self._request()

    def close(self) -> None:
        """A build in progress gives up, none starts again, and lookups stop answering from
        memory: a closed store refuses every lookup (RegistryError), whether or not its index
        had been published by then (which depends on the builder thread's timing)."""
        with self._lock:
            self._closed = True
            self.published = None
            builder = self.thread
        # Joined, so that no thread reads the file once its registry is closed (a test's
        # cleanup found the directory not empty: the builder's connection was still open).
        if builder is not None and builder is not threading.current_thread():
            builder.join()

    def _request(self) -> None:
        """rebuild() for a caller that holds _lock."""
        self._dirty.set()
        if self.thread is None and not self._closed:
            self.thread = threading.Thread(
                target=self._main, name="msgd-provisioning-index", daemon=True)
            self.thread.start()

    def _main(self) -> None:
        while True:
            with self._lock:  # so a write that comes as we leave starts a new thread
                # A write in progress requests a new build when it ends.
                if not self._dirty.is_set() or self._closed or self._writing:
                    self.thread = None
                    return
                self._dirty.clear()
                generation = self._generation
            try:
                index = self._read(generation)
            except (sqlite3.Error, ValueError) as exc:
                log.warning("registry %s: provisioning index not built (%s); lookups use SQL",
                            self._path, one_line(exc))
                continue
            if index is None:
                continue
            self._pause("index-read")
            with self._lock:
                # No write was in progress when the read began and none has begun since (each
                # bumps the generation under this lock before its BEGIN): the table read is
                # the table now, and no write can begin before the index is in place.
                if generation != self._generation or self._writing or self._closed:
                    continue
                self.published = index
            log.info("registry %s: provisioning index of %d UEs in memory",
                     self._path, len(index))

    def _read(self, generation: int) -> PackedIndex | None:
        """The index of the table as it is; None once a write began (generation moved)."""
        conn = sqlite3.connect(str(self._path), isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA query_only = ON")
            # Only sizes the buckets: a write between the two statements moves the generation.
            (expected,) = conn.execute("SELECT count(*) FROM provisioning").fetchone()
            index = PackedIndexBuilder(expected)
            numbers: dict[str, int] = {}
            sets: list[frozenset[str]] = []
            for uid, key, text in conn.execute(
                "SELECT ue_service_id, key, gateways FROM provisioning"
            ):
                if self._closed or self._generation != generation:
                    return None
                number = numbers.get(text)
                if number is None:
                    if len(sets) >= 1 << 16:
                        raise ValueError("more than 65536 distinct gateway sets")
                    number = numbers[text] = len(sets)
                    sets.append(decode_gateways(text))
                index.add(uid, bytes(key), number)
            return index.finish(sets)
        finally:
            conn.close()
