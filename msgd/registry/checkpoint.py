"""WAL checkpoints on a thread of their own, so that no group commit pays for one.

By default SQLite checkpoints inside the commit that grows the WAL past 1000 pages: that
commit copies ~4 MiB into the database file and syncs it (11-20 ms on the benchmark VM)
before it returns, and the changes it carries wait that long for their answers. Online
compaction writes a whole new snapshot through the WAL, which makes such commits frequent.
So while the writer thread runs, its connection has `wal_autocheckpoint = 0`, and this
thread runs PASSIVE checkpoints on its own connection once the writer reports about
CHECKPOINT_PAGES written, or CHECKPOINT_EVERY seconds after the last one if anything was
(the page count is an estimate: Python's sqlite3 has no WAL hook). A PASSIVE checkpoint runs
alongside the writer (it needs no write lock, never waits and copies only frames that are
committed); SQLite's WAL locks make that safe. Durability is unchanged: a checkpoint only
copies frames already durable in the WAL.

One thing only the writer can do: SQLite rewinds the WAL (writes from its start again) only
when a write transaction begins with every frame copied, and commits land during a
background checkpoint. So after each one the writer runs a PASSIVE checkpoint of its own
between two commits (`finish_wanted`): it copies the few frames added meanwhile and syncs,
about one commit's time, and the WAL restarts at the next commit. Without that the WAL file
would grow for as long as commits keep coming.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

from msgd.registry.sql import one_line

__all__ = ["CHECKPOINT_EVERY", "CHECKPOINT_PAGES", "Checkpointer"]

log = logging.getLogger("msgd.registry")

CHECKPOINT_PAGES = 1_000  # SQLite's own wal_autocheckpoint default
CHECKPOINT_EVERY = 1.0  # seconds: bounds the WAL where the estimate runs short


class Checkpointer:
    """The checkpoint thread of one registry file (started and stopped by `Writer`)."""

    def __init__(self, path: Path, page_size: int, every: int = CHECKPOINT_PAGES) -> None:
        self.path = path
        self.page_size = page_size
        self.every = every
        self._written = 0  # pages since the last checkpoint (estimate)
        self._wanted = threading.Event()
        self.finish_wanted = False  # set here after a checkpoint, cleared by the writer
        self._stop = False
        self._failing = False
        self.checkpoints = 0
        self._conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        # A checkpoint syncs the WAL before it copies and the file after (as the writer's
        # own would in "full"; "normal" syncs at checkpoints too).
        self._conn.execute("PRAGMA synchronous = FULL")
        self._thread = threading.Thread(target=self._main, name="msgd-registry-checkpoint",
                                        daemon=True)
        self._thread.start()

    def wrote(self, octets: int) -> None:
        """The writer thread wrote a transaction of about `octets` to the WAL. Counted in
        pages plus the leaf, parent, freelist trunk and page 1 a transaction may rewrite;
        still short for small commits (about half the frames, measured), hence the timer."""
        self._written += octets // self.page_size + 4
        if self._written >= self.every:
            self._written = 0
            self._wanted.set()

    def request(self) -> None:
        """Checkpoint soon, whatever was written (after a provisioning write, say)."""
        self._written = 0
        self._wanted.set()

    def close(self) -> None:
        self._stop = True
        self._wanted.set()
        self._thread.join()
        self._conn.close()

    def _main(self) -> None:
        while True:
            asked = self._wanted.wait(CHECKPOINT_EVERY)
            self._wanted.clear()
            if self._stop:
                return
            if not asked and not self._written:
                continue  # nothing written since the last one
            self._written = 0
            try:
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:
                # Disk full, I/O error: the WAL just grows until a later one succeeds (the
                # close checkpoints too); commits themselves report storage failures.
                if not self._failing:
                    self._failing = True
                    log.warning("registry %s: WAL checkpoint failed (%s); retried after more "
                                "writes", self.path, one_line(exc))
                continue
            if self._failing:
                self._failing = False
                log.info("registry %s: WAL checkpoints succeed again", self.path)
            self.checkpoints += 1
            self.finish_wanted = True
