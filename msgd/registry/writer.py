"""The registry's one writer thread: group commit of registration changes, and writer jobs.

The loop thread applies a change to memory and appends it to `Writer.ops`; the writer takes
everything queued (up to `max_batch`), encodes it as ONE journal row (`blobs.encode_batch`) and
writes it in one autocommit statement, which is one transaction. Only then does it post the
completion. SQLite releases the GIL while it writes and syncs, so the loop keeps submitting
during a commit. When the queue is small it first waits `commit_interval` so that more changes
can join (docs/registry.md, "Shape").

A failed commit is posted as a failure, and the writer then takes no more changes until the
loop thread, which alone can roll memory back consistently, tells it where the failed range
ends (`resume(cut)`). Jobs (provisioning writes, test hooks) run between batches on the same
connection, also while a failed batch awaits its cut, so a caller blocked in a job cannot
deadlock the writer. Before start() jobs run inline in the caller.

Online compaction (`compaction.Compactor`) also runs here, one bounded step after each batch
(or back to back while no change is queued), so a commit never waits behind a whole
compaction, only behind one step of it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from msgd.errors import RegistryError
from msgd.registry.blobs import Op, encode_batch
from msgd.registry.checkpoint import Checkpointer
from msgd.registry.compaction import Compactor
from msgd.registry.snapshot import JournalSize
from msgd.registry.sql import describe, one_line, rollback_quietly

__all__ = ["Writer", "gather_below"]

log = logging.getLogger("msgd.registry")

_SQL_JOURNAL_PUT = "INSERT OR REPLACE INTO journal(seq, ops) VALUES (?, ?)"


def gather_below(max_batch: int) -> int:
    """Queued changes under which a commit first waits `commit_interval` for more (group
    commit): a sixteenth of a batch."""
    return max(1, max_batch // 16)


class Writer:
    """The writer thread and the write connection it owns.

    Shared with the loop thread: `ops` (appended there, taken here), `idle` and `wake` (the
    idle flag protocol is in _step), `refusal`. CPython's GIL makes each deque/list operation
    and attribute store atomic, which is all the hand-off relies on.

    Completions go to an outbox, and `notify` (given to start()) is called once per message so
    that the loop thread collects them with take_completions(). A message is
      (True, first, last)             changes first..last are durable;
      (False, first, last, reason)    the batch first..last failed; resume(cut) is awaited;
      (False, None, None, reason)     the writer stopped: every change not durable fails.
    """

    def __init__(
        self,
        path: Path,
        conn: sqlite3.Connection,
        names: list[str],
        gw_index: dict[str, int],
        journal_seq: int,
        journal: JournalSize,
        *,
        commit_interval: float,
        max_batch: int,
    ) -> None:
        self.path = path
        self.conn = conn
        # The registry's gateway table: the loop thread appends (index first), the writer reads.
        self._names = names
        self._gw_index = gw_index
        self._commit_interval = commit_interval
        self._max_batch = max_batch
        self._gather_below = gather_below(max_batch)

        # Shared with the loop thread.
        self.ops: deque[Op] = deque()
        self.idle = False
        self.wake = threading.Event()
        self.refusal: str | None = None  # why no more work is taken: closing, or it died
        self._jobs: deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = deque()
        self._jobs_lock = threading.Lock()
        self._done = False
        self._stopping = False
        self._cut: int | None = None
        self._outbox: list[tuple[Any, ...]] = []
        self._outbox_cv = threading.Condition()
        self._notify: Callable[[], object] | None = None
        self._thread: threading.Thread | None = None
        self._inline_lock = threading.Lock()

        # Writer-thread state.
        self._taken = 0  # last seq taken from ops
        self._awaiting_cut = False
        self.journal_seq = journal_seq  # last journal row written durably
        self.journal = journal  # the live journal's size (compaction takes from it)
        self._gw_durable = len(names)  # gateway names the journal holds durably
        self._failing = False
        self.compactor: Compactor | None = None  # set by the registry before start()
        self.checkpointer: Checkpointer | None = None  # while the thread runs

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self, notify: Callable[[], object] | None) -> None:
        """Start the thread; `notify()` is called (from it) after each posted completion."""
        with self._inline_lock:  # waits for an inline job to finish
            self._notify = notify
            # Checkpoints move to their own thread (checkpoint.py): no commit waits for one.
            self.conn.execute("PRAGMA wal_autocheckpoint = 0")
            page_size = self.conn.execute("PRAGMA page_size").fetchone()[0]
            self.checkpointer = Checkpointer(self.path, page_size)
            if self.compactor is not None:
                self.compactor.wrote = self.checkpointer.wrote
            self._thread = threading.Thread(
                target=self._main, name="msgd-registry-writer", daemon=True
            )
            self._thread.start()

    def refuse(self, reason: str) -> None:
        """Take no more work from now on (closing), unless already refusing for a reason."""
        if self.refusal is None:
            self.refusal = reason

    def stop(self) -> None:
        """Let the thread finish what is queued, then join it (no-op if never started)."""
        thread = self._thread
        if thread is not None:
            self._stopping = True
            self.wake.set()
            thread.join()
        checkpointer, self.checkpointer = self.checkpointer, None
        if checkpointer is not None:
            checkpointer.close()

    def resume(self, cut: int) -> None:
        """Loop thread, after a failure: drop the queued changes up to `cut` and go on."""
        self._cut = cut
        self.wake.set()

    def take_completions(self) -> list[tuple[Any, ...]]:
        with self._outbox_cv:
            messages, self._outbox = self._outbox, []
        return messages

    def has_completions(self) -> bool:
        """Whether a completion waits (read without the lock: one that is posted meanwhile is
        drained by the call_soon_threadsafe that posting it scheduled)."""
        return bool(self._outbox)

    def wait_completions(self) -> None:
        """Block until a completion is posted (for a caller without a loop)."""
        with self._outbox_cv:
            self._outbox_cv.wait_for(lambda: bool(self._outbox))

    def run_job(self, job: Callable[[], Any]) -> Any:
        """Run `job` on the writer thread (inline before start) and return its result."""
        if self.refusal is not None:
            raise RegistryError(f"registry {self.refusal}")
        with self._inline_lock:  # start() takes it too: never two users of the connection
            thread = self._thread
            if thread is None:
                return job()
        if threading.current_thread() is thread:
            raise RuntimeError("a writer job cannot wait for another writer job")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._jobs_lock:  # the writer fails leftovers under it when it exits
            if self._done:
                raise RegistryError("registry is closed")
            self._jobs.append((job, future))
        self.wake.set()
        return future.result()

    def transaction(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """In a job: run `work` in one write transaction; storage errors become RegistryError."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = work(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            rollback_quietly(conn, self.path)
            raise RegistryError(f"registry {self.path}: {one_line(exc)}") from None
        except BaseException:
            rollback_quietly(conn, self.path)
            raise
        return result

    # -- the thread ---------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            while self._step():
                pass
        except BaseException as exc:
            log.critical("registry writer stopped by an unexpected error", exc_info=True)
            self.refusal = "writer stopped"
            self._post((False, None, None, f"registry writer stopped: {describe(exc)}"))
        finally:
            with self._jobs_lock:
                self._done = True
                leftovers = list(self._jobs)
                self._jobs.clear()
            for _job, future in leftovers:
                future.set_exception(RegistryError("registry is closed"))
            if self.compactor is not None:
                self.compactor.abandon("is closed")

    def _step(self) -> bool:
        """One round: apply a cut, commit a batch, step a job, or sleep. False = stop."""
        self.wake.clear()
        worked = False
        if self._awaiting_cut and self._cut is not None:
            cut, self._cut = self._cut, None
            ops = self.ops
            while self._taken < cut:  # drop the changes the loop thread failed
                ops.popleft()
                self._taken += 1
            self._awaiting_cut = False
            worked = True
        if not self._awaiting_cut and self.ops:
            self._commit_batch()
            worked = True
        if self._jobs:  # provisioning goes on while a failed batch awaits its cut
            self._job_step()
            worked = True
        checkpointer = self.checkpointer
        if checkpointer is not None and checkpointer.finish_wanted:
            checkpointer.finish_wanted = False
            self._finish_checkpoint()
            worked = True
        compactor = self.compactor
        # One bounded step per round, so batches and compaction steps alternate. Closing
        # drops a compaction (the close compacts offline anyway).
        if compactor is not None and not self._stopping and compactor.ready():
            compactor.step()
            worked = True
        if worked:
            return True
        if self._stopping and not self._awaiting_cut and not self.ops and not self._jobs:
            return False
        # Idle protocol: the flag is set before the re-check and submitters set it after
        # appending, so either the re-check sees their op or they see the flag and wake us.
        self.idle = True
        try:
            if not self._has_work():
                self.wake.wait()
        finally:
            self.idle = False
        return True

    def _finish_checkpoint(self) -> None:
        """Copy what commits added during the background checkpoint, so that the next commit
        rewinds the WAL (checkpoint.py says why only this thread can)."""
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the background thread reports lasting failures
            log.debug("registry %s: checkpoint on the writer failed: %s", self.path,
                      one_line(exc))

    def _has_work(self) -> bool:
        checkpointer = self.checkpointer
        if checkpointer is not None and checkpointer.finish_wanted:
            return True
        compacting = self.compactor is not None and self.compactor.ready()
        if self._awaiting_cut:
            return self._cut is not None or bool(self._jobs) or compacting
        return bool(self.ops) or bool(self._jobs) or self._stopping or compacting

    def _commit_batch(self) -> None:
        ops = self.ops
        compacting = self.compactor is not None and self.compactor.running
        if (len(ops) < self._gather_below and self._commit_interval and not self._stopping
                and not compacting):  # (a compaction step just let the queue fill)
            time.sleep(self._commit_interval)  # a small queue: let it fill (group commit)
        batch = [ops.popleft() for _ in range(min(len(ops), self._max_batch))]
        first = self._taken + 1
        self._taken += len(batch)
        last = self._taken
        try:
            blob, n_names = encode_batch(batch, self._gw_index, self._names, self._gw_durable)
            # One statement in autocommit mode is one transaction. OR REPLACE: a commit that
            # reported failure may still have left its row; the next batch overwrites it.
            self.conn.execute(_SQL_JOURNAL_PUT, (self.journal_seq + 1, blob))
        except Exception as exc:
            rollback_quietly(self.conn, self.path)
            self._awaiting_cut = True
            if not self._failing:
                self._failing = True
                log.error(
                    "registry %s: commit of changes %d..%d failed (%s); failing them, "
                    "later batches are retried",
                    self.path,
                    first,
                    last,
                    describe(exc),
                )
            self._post((False, first, last, describe(exc)))
            return
        self.journal_seq += 1
        self._gw_durable = n_names
        journal = self.journal
        journal.changes += len(batch)
        journal.rows += 1
        journal.octets += len(blob)
        if self.checkpointer is not None:
            self.checkpointer.wrote(len(blob))
        if self.compactor is not None:
            self.compactor.committed()
        if self._failing:
            self._failing = False
            log.warning("registry %s: commits succeed again", self.path)
        self._post((True, first, last))

    def _job_step(self) -> None:
        job, future = self._jobs.popleft()
        try:
            result = job()
        except BaseException as exc:  # handed to the waiting caller, never lost
            rollback_quietly(self.conn, self.path)
            future.set_exception(exc)
        else:
            future.set_result(result)
        if self.checkpointer is not None:
            self.checkpointer.request()  # a provisioning write may be large

    def _post(self, message: tuple[Any, ...]) -> None:
        """Hand a completion to whoever drains the outbox (one wake per batch)."""
        with self._outbox_cv:
            self._outbox.append(message)
            self._outbox_cv.notify_all()
        notify = self._notify
        if notify is not None:
            # A closed loop raises; close_sync() then drains the outbox itself.
            with contextlib.suppress(RuntimeError):
                notify()
