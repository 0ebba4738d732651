"""Online compaction: the journal folded into a new snapshot while msgd serves.

The durable state is the live snapshot (chunks [snapshot_chunk_first, snapshot_chunk_end))
plus the journal rows after snapshot_seq (`snapshot`). A compaction builds the state as of
journal row `covered` (the last row committed when it begins) from the file alone, never
from memory:

1. it deletes what an earlier compaction or clean-up left unfinished (garbage);
2. a worker process (`compaction_worker`) folds the journal rows (snapshot_seq, covered]
   into each UE's latest value, streams the live snapshot with the UEs the fold names
   taken out, and sends the new chunks, then the UEs the fold registers;
3. the writer thread inserts each chunk, numbered after every chunk in the table;
4. in ONE transaction it points `meta` at the new chunks, with snapshot_seq = covered;
5. it deletes the old chunks and the journal rows up to `covered` (now garbage).

So the new snapshot is exactly what a load would compute from rows up to `covered`, whatever
the daemon does meanwhile: later commits land in rows after `covered`, which stay and are
replayed on top, and a commit that fails never reaches the rows read. A kill -9 at any
instant leaves either the old `meta` (the new chunks are garbage) or the new one (the old
chunks and rows are garbage), and loads ignore garbage.

The worker holds the CPU work (seconds of Python for a million registrations, which in this
process the GIL would take from the event loop) and the fold's memory. Every step on the
writer thread is small (one chunk insert, one delete of about 1 MiB, the switch) and runs
between group commits (`Writer._step`: a batch, then one step), so a commit waits for at
most about one commit's time. Policy (`CompactionPolicy`): begin when the live journal
holds at least `journal_changes` changes and at least `journal_ratio` times the registered
UEs, `min_interval` seconds after the previous one ended. docs/registry.md ("Online
compaction") has the measurements.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import queue
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from msgd.errors import RegistryError
from msgd.registry.blobs import decode_gateway_names
from msgd.registry.compaction_worker import COUNT, FRAME, lower_priority
from msgd.registry.snapshot import JournalSize, live_range
from msgd.registry.sql import describe, one_line, rollback_quietly

__all__ = ["CompactionPolicy", "CompactionReport", "Compactor"]

log = logging.getLogger("msgd.registry")

DELETE_OCTETS = 1 << 20  # garbage deleted per step: freeing pages reads overflow chains
FAILURE_BACKOFF = 10.0  # seconds before an automatic retry after a failed compaction
_WAIT = object()  # yielded by a step that waits for the worker
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # where `msgd` was imported from


@dataclass(frozen=True)
class CompactionPolicy:
    """When the writer begins a compaction on its own ([registry] compact_* keys)."""

    journal_changes: int = 100_000  # 0: never on its own (msgctl registry compact still works)
    journal_ratio: float = 0.25
    min_interval: float = 10.0

    def due(self, changes: int, registered: int) -> bool:
        """Whether a journal of `changes` changes over `registered` UEs is worth folding.

        A compaction rewrites every registration, so it pays for itself once the journal is
        a fair share of the registry; replaying a change at start costs about what loading
        a snapshot entry does, so the ratio also bounds the start time.
        """
        return (self.journal_changes > 0 and changes >= self.journal_changes
                and changes >= self.journal_ratio * registered)


@dataclass
class CompactionReport:
    """What one compaction did (`msgctl registry compact` shows it; metrics the last one)."""

    trigger: str  # "journal" (the policy), "manual" (msgctl) or "cleanup" (garbage only)
    started_at: float  # Unix time
    ok: bool = False
    error: str | None = None
    seconds: float = 0.0
    covered_seq: int = 0  # journal rows up to this one are folded
    registrations: int = 0  # in the new snapshot
    changes_folded: int = 0
    journal_rows_folded: int = 0
    journal_octets_folded: int = 0
    chunks_written: int = 0
    garbage_rows_deleted: int = 0
    garbage_octets_deleted: int = 0
    steps: int = 0
    longest_step_ms: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Compactor:
    """Runs online compactions on the writer thread, one bounded step at a time.

    Threads: request() from any thread; the attributes shown to metrics (`running`, `phase`,
    `last`, `ok_count`, `failed_count`) are read from any thread; everything else runs on
    the writer thread, which owns the connection (`Writer` calls committed(), ready(),
    step() and abandon()).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        journal_seq: Callable[[], int],
        journal: JournalSize,
        registered: Callable[[], int],
        policy: CompactionPolicy,
        wake: threading.Event,
        garbage: bool,
        synchronous: str = "full",
    ) -> None:
        self.conn = conn
        self._synchronous = synchronous.upper()
        # Told how much each step wrote (the writer points it at its checkpointer).
        self.wrote: Callable[[int], None] = lambda octets: None
        self.path = path
        self.policy = policy
        self._journal_seq = journal_seq
        self.journal = journal
        self._registered = registered
        self._wake = wake
        self._requests: list[concurrent.futures.Future[CompactionReport]] = []
        self._requests_lock = threading.Lock()

        # Writer-thread state.
        self._job: Iterator[object] | None = None
        self._blocked = False  # the last step waits for the worker
        self._worker: _Worker | None = None
        self._report: CompactionReport | None = None
        self._waiting: list[concurrent.futures.Future[CompactionReport]] = []
        self._due: str | None = "cleanup" if garbage else None
        self._not_before = 0.0  # monotonic: no automatic start before this
        self._started = 0.0

        # Shown to other threads (each a single attribute store).
        self.running = False
        self.phase = "idle"
        self.last: CompactionReport | None = None
        self.ok_count = 0
        self.failed_count = 0
        self.steps_total = 0  # steps run, ever (tests kill msgd at a chosen one)

    # -- any thread ---------------------------------------------------------------------------

    @property
    def worker_pid(self) -> int | None:
        """The running worker's process id (set once its priority is lowered), or None."""
        worker = self._worker
        return None if worker is None else worker.proc.pid

    def request(self) -> concurrent.futures.Future[CompactionReport]:
        """Ask for a compaction now; the future gets its report (or RegistryError).

        A compaction already running began before this request, so the request is served by
        the next one: it folds every change committed before it was asked for.
        """
        future: concurrent.futures.Future[CompactionReport] = concurrent.futures.Future()
        with self._requests_lock:
            self._requests.append(future)
        self._wake.set()
        return future

    # -- writer thread ------------------------------------------------------------------------

    def committed(self) -> None:
        """A group commit added a journal row (`journal` counts it): begin a compaction if
        the policy says so."""
        journal = self.journal
        if (self._job is None and self._due is None
                and time.monotonic() >= self._not_before
                and self.policy.due(journal.changes, self._registered())):
            self._due = "journal"

    def forget_garbage(self) -> None:
        """An offline compaction rewrote the file: nothing is left to clean (before start)."""
        if self._due == "cleanup":
            self._due = None

    def ready(self) -> bool:
        """Whether step() has work now (not while it only waits for the worker)."""
        if self._job is not None:
            return not self._blocked or (self._worker is not None and self._worker.ready())
        return self._due is not None or bool(self._requests)

    def step(self) -> None:
        """One bounded step: begin a compaction, advance it, or end it."""
        if self._job is None and not self._begin():
            return
        job = self._job
        report = self._report
        assert job is not None and report is not None
        started = time.perf_counter()
        conn = self.conn
        # No fsync of its own: the next group commit syncs the WAL, and the WAL's frames
        # before it with it; until then a power loss can only lose compaction work, and
        # SQLite keeps the file consistent (a valid prefix of the WAL is replayed).
        relaxed = self._synchronous == "FULL"
        try:
            if relaxed:
                conn.execute("PRAGMA synchronous = NORMAL")
            self._blocked = next(job) is _WAIT
        except StopIteration:
            self._end(None)
        except sqlite3.Error as exc:
            rollback_quietly(self.conn, self.path)
            self._end(one_line(exc))
        except Exception as exc:  # a bug must not take the writer (and every commit) down
            rollback_quietly(self.conn, self.path)
            log.error("registry %s: online compaction failed", self.path, exc_info=True)
            self._end(describe(exc))
        finally:
            if relaxed:
                # Group commits must sync again. Should this ever fail, the error stops the
                # writer thread (Writer._main): better no acknowledgement than an unsynced one.
                conn.execute("PRAGMA synchronous = FULL")
        took = time.perf_counter() - started
        report.steps += 1
        report.longest_step_ms = max(report.longest_step_ms, took * 1000)
        self.steps_total += 1

    def abandon(self, reason: str) -> None:
        """The writer stops: drop the compaction in progress (its chunks are garbage that the
        next compaction deletes) and fail whoever waits for one."""
        if self._job is not None:
            self._job.close()  # closes its worker too (the generator's finally)
            rollback_quietly(self.conn, self.path)
            self._job = None
            self.running = False
            self.phase = "idle"
        with self._requests_lock:
            waiting, self._requests = self._waiting + self._requests, []
        self._waiting = []
        for future in waiting:
            if not future.done():
                future.set_exception(RegistryError(f"registry {reason}"))

    # -- the job ------------------------------------------------------------------------------

    def _begin(self) -> bool:
        with self._requests_lock:
            requests, self._requests = self._requests, []
        if requests:
            trigger = "manual"
        elif self._due is not None:
            trigger = self._due
        else:
            return False
        self._due = None
        self._waiting = requests
        self._report = CompactionReport(trigger=trigger, started_at=time.time())
        self._started = time.monotonic()
        self._job = self._run(self._report, fold=trigger != "cleanup")
        self.running = True
        log.info("registry %s: online compaction (%s) started: %d changes in %d journal rows",
                 self.path, trigger, self.journal.changes, self.journal.rows)
        return True

    def _end(self, error: str | None) -> None:
        report = self._report
        assert report is not None
        report.ok = error is None
        report.error = error
        report.seconds = time.monotonic() - self._started
        self._job = None
        self._blocked = False
        self._report = None
        self.running = False
        self.phase = "idle"
        self.last = report
        now = time.monotonic()
        if error is None:
            self.ok_count += 1
            self._not_before = now + self.policy.min_interval
            if report.trigger != "cleanup" or report.garbage_rows_deleted:
                log.info(
                    "registry %s: online compaction (%s) folded %d changes (%d journal rows, "
                    "%.1f MiB) into a snapshot of %d registrations in %.2f s; deleted %d old "
                    "rows (%.1f MiB); %d steps, longest %.1f ms",
                    self.path, report.trigger, report.changes_folded,
                    report.journal_rows_folded, report.journal_octets_folded / 2**20,
                    report.registrations, report.seconds, report.garbage_rows_deleted,
                    report.garbage_octets_deleted / 2**20, report.steps,
                    report.longest_step_ms)
        else:
            self.failed_count += 1
            self._not_before = now + max(self.policy.min_interval, FAILURE_BACKOFF)
            # What it wrote is garbage now; the next run deletes it first.
            log.warning("registry %s: online compaction failed (%s); the snapshot and journal "
                        "in use are unchanged", self.path, error)
        waiting, self._waiting = self._waiting, []
        for future in waiting:
            if future.done():
                continue
            if error is None:
                future.set_result(report)
            else:
                future.set_exception(RegistryError(f"registry compaction failed: {error}"))

    def _run(self, report: CompactionReport, *, fold: bool) -> Iterator[object]:
        """The compaction as a generator: each `yield` ends a step, `yield _WAIT` one that
        waits for the worker (see the module doc).

Long on purpose: the steps share the fold's local state (the seq it started from, the
chunks written so far), and a yield between them is what lets group commits run between
steps; split into functions, that state would have to live on an object."""
        conn = self.conn
        self.phase = "cleanup"
        yield from self._delete_garbage(report)
        if not fold:
            return
        snapshot_seq, first, end = live_range(conn)
        covered = self._journal_seq()  # every row up to it is committed; later ones come after
        report.covered_seq = covered
        if covered <= snapshot_seq:
            return  # nothing to fold

        # 2-3. The worker folds and encodes; this thread inserts what it sends.
        self.phase = "fold"
        (base,) = conn.execute("SELECT coalesce(max(chunk) + 1, 0) FROM snapshot").fetchone()
        worker = _Worker(self.path, (snapshot_seq, first, end, covered), self._wake)
        self._worker = worker
        try:
            chunk_no = base
            while True:
                frame = worker.take()
                if frame is None:
                    yield _WAIT
                    continue
                kind, payload = frame
                if kind == b"C":
                    self.phase = "write"
                    (count,) = COUNT.unpack_from(payload)
                    data = payload[COUNT.size:]
                    conn.execute("INSERT INTO snapshot(chunk, data) VALUES (?, ?)",
                                 (chunk_no, data))
                    self.wrote(len(data))
                    chunk_no += 1
                    report.registrations += count
                    report.chunks_written += 1
                    yield
                elif kind == b"E":
                    summary = json.loads(payload)
                    break
                else:
                    raise RegistryError(f"compaction worker failed: {worker.failure()}")
        finally:
            worker.close()
            self._worker = None
        if (summary["registrations"], summary["chunks"]) != (report.registrations,
                                                             report.chunks_written):
            raise RegistryError("compaction worker: its summary does not match its chunks")
        report.changes_folded = summary["changes"]
        report.journal_rows_folded = summary["rows"]
        report.journal_octets_folded = summary["octets"]
        names_blob = bytes.fromhex(summary["names"])
        decode_gateway_names(names_blob)  # a table this msgd reads, or the switch fails

        # 4. The switch: one transaction makes the new snapshot the live one.
        self.phase = "switch"
        conn.execute("BEGIN IMMEDIATE")
        if live_range(conn) != (snapshot_seq, first, end):  # nobody else writes these
            raise RegistryError("the live snapshot changed under the compaction")
        conn.executemany(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
            [
                ("snapshot_seq", covered),
                ("snapshot_count", report.registrations),
                ("snapshot_gateways", names_blob),
                ("snapshot_chunk_first", base),
                ("snapshot_chunk_end", chunk_no),
            ],
        )
        conn.execute("COMMIT")
        journal = self.journal
        journal.changes -= report.changes_folded
        journal.rows -= report.journal_rows_folded
        journal.octets -= report.journal_octets_folded
        yield

        # 5. The old chunks and the folded rows are garbage now.
        self.phase = "cleanup"
        yield from self._delete_garbage(report)

    def _delete_garbage(self, report: CompactionReport) -> Iterator[None]:
        """Delete chunks outside the live range and journal rows the snapshot covers, about
        DELETE_OCTETS per step (freeing a row's pages reads its overflow chain).

        Each step is three statements whatever it deletes: the live range, the cut (one row:
        where this step's rows end, how many, how large) and one DELETE, its own
        transaction. Fetching the candidates row by row gave the GIL away once per row, and
        a busy event loop took up to a switch interval to hand it back each time: steps of
        ~1 MiB took 27-111 ms beside it for 3-13 ms of work (docs/performance.md)."""
        conn = self.conn
        while True:
            seq, first, end = live_range(conn)
            cut, rows, octets = conn.execute(_CHUNKS_CUT, (first, end, DELETE_OCTETS)).fetchone()
            if rows:
                conn.execute("DELETE FROM snapshot WHERE chunk <= ? AND (chunk < ? OR chunk >= ?)",
                             (cut, first, end))
            else:
                cut, rows, octets = conn.execute(_JOURNAL_CUT, (seq, DELETE_OCTETS)).fetchone()
                if not rows:
                    return
                conn.execute("DELETE FROM journal WHERE seq <= ?", (cut,))
            report.garbage_rows_deleted += rows
            report.garbage_octets_deleted += octets
            self.wrote(octets // 64)  # the freelist pages and b-tree leaves it rewrote
            yield


def _cut(table: str, key: str, value: str, candidates: str, limit: str) -> str:
    """A step's cut: of the first 256 candidate rows in key order, those whose sizes add up
    to at most the limit (at least the first): (the last key, how many, their octets)."""
    return f"""
SELECT max({key}), count(*), coalesce(sum(size), 0) FROM (
    SELECT {key}, size, sum(size) OVER (ORDER BY {key} ROWS UNBOUNDED PRECEDING) AS upto
      FROM (SELECT {key}, length({value}) AS size FROM {table}
             WHERE {candidates} ORDER BY {key} LIMIT 256))
 WHERE upto <= {limit} OR upto = size"""


_CHUNKS_CUT = _cut("snapshot", "chunk", "data", "chunk < ?1 OR chunk >= ?2", "?3")
_JOURNAL_CUT = _cut("journal", "seq", "ops", "seq <= ?1", "?2")


class _Worker:
    """The compaction worker process (`compaction_worker`), and a thread that reads its
    frames into a small queue (the pipe and the queue hold back a worker that runs ahead of
    the inserts) and wakes the writer for each."""

    def __init__(self, path: Path, numbers: tuple[int, int, int, int],
                 wake: threading.Event) -> None:
        env = dict(os.environ)
        # The child imports msgd from where this msgd was imported, however it was started.
        env["PYTHONPATH"] = os.pathsep.join(
            [str(_PACKAGE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "msgd.registry.compaction_worker", str(path),
             *map(str, numbers)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # Its own process group: a Ctrl-C meant for msgd must not kill it mid-way (msgd's
            # close does); it dies with the writer thread that started it (PR_SET_PDEATHSIG).
            # Not its own session: with autogroup scheduling a session is a scheduling group
            # of its own, weighed like all of msgd whatever its priority (docs/registry.md).
            close_fds=True, process_group=0, env=env)
        lower_priority(self.proc.pid)  # at once, not after its imports
        self._wake = wake
        self._frames: queue.Queue[tuple[bytes, bytes]] = queue.Queue(maxsize=8)
        self._closing = False
        self._thread = threading.Thread(target=self._read, name="msgd-registry-compaction",
                                        daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            while True:
                head = stdout.read(FRAME.size)
                if len(head) < FRAME.size:
                    break
                kind, size = FRAME.unpack(head)
                payload = stdout.read(size)
                if len(payload) < size:
                    break
                self._put((kind, payload))
        except (OSError, ValueError):
            pass  # closed under us by close(): nobody waits for more
        self._put((b"", b""))  # the end of the stream (after an E frame, or instead of it)

    def _put(self, frame: tuple[bytes, bytes]) -> None:
        while not self._closing:
            try:
                self._frames.put(frame, timeout=0.1)
            except queue.Full:
                continue
            self._wake.set()
            return

    def ready(self) -> bool:
        return not self._frames.empty()

    def take(self) -> tuple[bytes, bytes] | None:
        try:
            return self._frames.get_nowait()
        except queue.Empty:
            return None

    def failure(self) -> str:
        """Why the worker ended without its summary: its stderr, or its exit status."""
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            return "it stopped answering"
        assert self.proc.stderr is not None
        text = one_line(self.proc.stderr.read().decode(errors="replace"))[:300]
        return text or f"exit status {self.proc.returncode}"

    def close(self) -> None:
        self._closing = True
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._thread.join()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
