"""Online compaction: the journal folded into a new snapshot while changes go on.

Real SQLite files and real child processes killed with SIGKILL; nothing is mocked and nothing
sleeps to synchronise (a bounded poll of an observable counter is the only wait). The design
these tests hold to is in msgd/registry/compaction.py and docs/registry.md.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from msgd.errors import RegistryError
from msgd.registry import checkpoint
from msgd.registry.compaction import CompactionPolicy, CompactionReport
from msgd.registry.compaction_worker import WORKER_NICE
from msgd.registry.schema import APPLICATION_ID, SCHEMA_VERSION
from msgd.registry.snapshot import has_garbage
from msgd.registry.store import Registration, Registry

OFF = CompactionPolicy(journal_changes=0)  # only when asked


def query(path: Path, sql: str, *args: object) -> list[tuple]:
    conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def meta(path: Path) -> dict[str, object]:
    return dict(query(path, "SELECT key, value FROM meta"))


def crash_image(path: Path, dest: Path) -> Path:
    """The database and its WAL as a crash now would leave them (the writer keeps going: a
    copy of a file being written can be torn only across commits that had not returned, and
    the copy is read after the changes it must hold were acknowledged)."""
    shutil.copyfile(path, dest)
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        shutil.copyfile(wal, dest.with_name(dest.name + "-wal"))
    return dest


def registrations(reg: Registry) -> dict[str, Registration]:
    return {r.ue_service_id: r for r in reg.iter_registrations()}


async def churn(reg: Registry, rng: random.Random, count: int, population: int,
                gateways: list[str]) -> None:
    """`count` random changes over `population` UEs, yielding to the loop now and then."""
    for n in range(count):
        ue = f"ue-{rng.randrange(population):06d}"
        if rng.random() < 0.25:
            reg.submit_deregister(ue)
        else:
            profile = None if rng.random() < 0.7 else f"p{n}".encode()
            reg.submit_register(ue, rng.choice(gateways), profile)
        if n % 500 == 0:
            await asyncio.sleep(0)


async def until(condition, what: str, timeout: float = 30.0) -> None:
    """Poll an observable condition (bounded); a timeout fails the test."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.01)


# -- folding while changes go on ------------------------------------------------------------------


async def test_compaction_folds_the_journal_while_changes_go_on(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    rng = random.Random(11)
    reg = Registry.open(path, compaction=OFF)
    reg.start(asyncio.get_running_loop())
    await churn(reg, rng, 40_000, 20_000, ["gw-a", "gw-b", "gw-c"])
    await reg.wait_durable(reg.last_seq)
    await reg.close()  # an offline snapshot (several chunks) under what follows

    reg = Registry.open(path, compaction=OFF)
    reg.start(asyncio.get_running_loop())
    try:
        await churn(reg, rng, 30_000, 25_000, ["gw-a", "gw-d"])
        await reg.wait_durable(reg.last_seq)
        settled: list[int] = []
        reg.add_listener(lambda first, last, ok: settled.append(last))
        # Changes keep coming during the compaction, some through a gateway new to it.
        compaction = asyncio.ensure_future(reg.compact())
        more = asyncio.create_task(churn(reg, rng, 30_000, 25_000, ["gw-e", "gw-a"]))
        report = await compaction
        during = len(settled)
        await more
        await reg.wait_durable(reg.last_seq)
        assert report.ok and report.trigger == "manual"
        assert report.changes_folded >= 30_000
        # Batches were committed between its steps, not only before or after it.
        assert report.chunks_written >= 3 and during > 0
        state = meta(path)
        assert state["snapshot_seq"] == report.covered_seq
        assert state["snapshot_count"] == report.registrations
        assert (state["snapshot_chunk_end"] - state["snapshot_chunk_first"]
                == report.chunks_written)
        # The old generation and the folded rows are gone; the rows after it remain and
        # are exactly what the registry counts as its journal.
        assert not query(path, "SELECT 1 FROM journal WHERE seq <= ?", report.covered_seq)
        rows = query(path, "SELECT count(*), coalesce(sum(length(ops)), 0) FROM journal")[0]
        assert rows == (reg.journal.rows, reg.journal.octets)
        assert reg.journal.changes > 0
        expected = registrations(reg)
        copy = crash_image(path, tmp_path / "crashed.sqlite")
    finally:
        await reg.close()
    reopened = Registry.open(copy, compaction=OFF)
    try:
        assert registrations(reopened) == expected
    finally:
        reopened.close_sync()


async def test_a_second_compaction_folds_what_the_first_left(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    rng = random.Random(5)
    reg = Registry.open(path, compaction=OFF)
    reg.start(asyncio.get_running_loop())
    try:
        for _ in range(3):
            await churn(reg, rng, 8_000, 5_000, ["gw-a", "gw-b"])
            await reg.wait_durable(reg.last_seq)
            report = await reg.compact()
            assert report.ok and reg.journal.changes == 0 == reg.journal.rows
            assert query(path, "SELECT count(*) FROM journal") == [(0,)]
            assert not has_garbage(sqlite3.connect(path))
        nothing = await reg.compact()  # an empty journal: nothing to fold, nothing written
        assert nothing.ok and nothing.changes_folded == 0 and nothing.chunks_written == 0
        expected = registrations(reg)
    finally:
        await reg.close()
    reopened = Registry.open(path)
    try:
        assert registrations(reopened) == expected
    finally:
        reopened.close_sync()


async def test_policy_starts_compactions_on_its_own(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    policy = CompactionPolicy(journal_changes=3_000, journal_ratio=1.0, min_interval=0)
    reg = Registry.open(path, compaction=policy)
    reg.start(asyncio.get_running_loop())
    try:
        # 2 000 registered UEs: due at 3 000 changes (more than 1.0 x registered too).
        for i in range(2_000):
            reg.submit_register(f"ue-{i}", "gw-a", None)
        await reg.wait_durable(reg.last_seq)
        assert reg.compaction.ok_count == 0
        for i in range(1_500):
            reg.submit_register(f"ue-{i}", "gw-b", None)
        await reg.wait_durable(reg.last_seq)
        await until(lambda: reg.compaction.ok_count >= 1 and not reg.compaction.running,
                    "an automatic compaction")
        assert reg.compaction.last is not None and reg.compaction.last.trigger == "journal"
        assert reg.journal.changes < 3_000
    finally:
        await reg.close()


def test_policy_due() -> None:
    policy = CompactionPolicy(journal_changes=100, journal_ratio=0.5)
    assert not policy.due(99, 0)
    assert policy.due(100, 200)
    assert not policy.due(100, 201)  # under half the registry: replaying it is cheaper
    assert not CompactionPolicy(journal_changes=0).due(10**9, 0)


# -- bounded file, bounded start --------------------------------------------------------------


async def test_file_size_and_start_stay_bounded_under_churn(tmp_path: Path) -> None:
    """Re-registrations of the same 10 000 UEs: with compaction the file stops growing once
    freed pages are reused, and a start replays at most about a threshold of changes."""
    path = tmp_path / "registry.sqlite"
    threshold = 10_000
    policy = CompactionPolicy(journal_changes=threshold, journal_ratio=0.5, min_interval=0)
    reg = Registry.open(path, compaction=policy)
    reg.start(asyncio.get_running_loop())
    rng = random.Random(3)
    pages: list[int] = []
    try:
        for _round in range(24):
            done = reg.compaction.ok_count
            await churn(reg, rng, 10_000, 10_000, ["gw-a", "gw-b", "gw-c"])
            await reg.wait_durable(reg.last_seq)
            # A round's 10 000 changes reach the threshold: one compaction at least ends.
            await until(lambda done=done: reg.compaction.ok_count > done
                        and not reg.compaction.running, "a compaction in this round")
            pages.append(query(path, "PRAGMA page_count")[0][0])
        assert reg.compaction.failed_count == 0
        expected = registrations(reg)
        copy = crash_image(path, tmp_path / "crashed.sqlite")
        journal_changes = reg.journal.changes
    finally:
        await reg.close()
    # 240 000 changes went through: their journal alone (~30 octets a change) would take
    # some 1 800 pages. The file must stop growing after the first rounds.
    assert max(pages[8:]) <= max(pages[4:8]) * 1.25, pages
    assert max(pages) < 400, pages
    assert journal_changes < threshold + 10_000
    started = time.monotonic()
    reopened = Registry.open(copy, compaction=OFF)
    try:
        assert registrations(reopened) == expected
    finally:
        reopened.close_sync()
    assert time.monotonic() - started < 10  # a guard: what is bounded is the replay above


def wal_restarts(wal: Path) -> int:
    """How many times SQLite rewound this WAL: the checkpoint sequence number of its header
    (file format, WAL header offset 12), incremented at each restart."""
    with wal.open("rb") as f:
        return int.from_bytes(f.read(32)[12:16], "big")


async def test_wal_is_rewound_after_a_checkpoint_that_commits_outran(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A background checkpoint copies only the frames committed when it began; commits that
    land meanwhile leave the WAL with frames not copied, and SQLite rewinds a WAL only when a
    write begins with every frame copied, so without the writer's part the WAL would grow for
    as long as commits keep coming (checkpoint.py). The test builds that state exactly: a
    reader holds the checkpoint at the frames of batch A while batch B commits."""
    monkeypatch.setattr(checkpoint, "CHECKPOINT_EVERY", 3600.0)  # no timer checkpoint here
    path = tmp_path / "registry.sqlite"
    wal = path.with_name(path.name + "-wal")
    reg = Registry.open(path, compaction=OFF)
    reg.start(asyncio.get_running_loop())
    checkpointer = reg._writer.checkpointer
    assert checkpointer is not None
    checkpointer.every = 1 << 40  # only the checkpoint below

    async def commit(batch: str) -> None:
        for n in range(2_000):
            reg.submit_register(f"ue-{batch}-{n}", "gw-a", None)
        await reg.wait_durable(reg.last_seq)

    reader = sqlite3.connect(path, isolation_level=None)
    try:
        await commit("a")
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM meta").fetchall()  # holds a snapshot at A
        await commit("b")
        # The background checkpoint, as its thread runs it: it can copy A only.
        (busy, frames, copied), = await asyncio.to_thread(
            checkpointer._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall)
        assert busy == 0 and 0 < copied < frames, (busy, frames, copied)
        reader.execute("COMMIT")
        checkpointer.finish_wanted = True  # what its thread sets after each checkpoint
        before = wal_restarts(wal)
        await commit("c")  # the round that commits C also finishes the checkpoint
        await commit("d")  # so D writes from the WAL's start
        assert wal_restarts(wal) == before + 1
        assert not checkpointer.finish_wanted
    finally:
        reader.close()
        await reg.close()


# -- failures -----------------------------------------------------------------------------


async def test_failed_compaction_keeps_the_state_and_commits_go_on(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    reg = Registry.open(path, compaction=OFF)
    reg.start(asyncio.get_running_loop())
    try:
        for i in range(30_000):
            reg.submit_register(f"ue-{i}", "gw-a", b"x" * 16)
            if i % 1000 == 0:
                await asyncio.sleep(0)
        await reg.wait_durable(reg.last_seq)
        before = meta(path)
        # The file may not grow: the new snapshot beside the old one cannot be written.
        await asyncio.to_thread(reg._debug_set_max_page_count, None)
        with pytest.raises(RegistryError, match="compaction failed"):
            await reg.compact()
        assert reg.compaction.failed_count == 1 and not reg.compaction.running
        assert {k: meta(path)[k] for k in ("snapshot_seq", "snapshot_chunk_first")} == {
            k: before[k] for k in ("snapshot_seq", "snapshot_chunk_first")}
        await asyncio.to_thread(reg._debug_set_max_page_count, 1 << 30)
        # Commits go on, and the next compaction first deletes what the failed one wrote.
        reg.submit_deregister("ue-7")
        await reg.wait_durable(reg.last_seq)
        report = await reg.compact()
        assert report.ok and report.garbage_rows_deleted > 0
        expected = registrations(reg)
    finally:
        await reg.close()
    reopened = Registry.open(path)
    try:
        assert registrations(reopened) == expected and "ue-7" not in expected
    finally:
        reopened.close_sync()


async def _held_compaction(reg: Registry) -> tuple[asyncio.Future[CompactionReport], int]:
    """60,000 registrations made durable, then a compaction held with its worker stopped
    (SIGSTOP): it cannot end, it waits for the worker's last frame. Returns the compaction
    and the worker's pid. Polling the compaction's steps alone let a fast one end between
    two polls on a loaded machine (a fresh-clone run: DID NOT RAISE)."""
    for i in range(60_000):
        reg.submit_register(f"ue-{i}", "gw-a", None)
        if i % 2000 == 0:
            await asyncio.sleep(0)
    await reg.wait_durable(reg.last_seq)
    compaction = asyncio.ensure_future(reg.compact())
    # Shown once the daemon has set its priority.
    await until(lambda: reg.compaction.worker_pid is not None or compaction.done(),
                "the compaction's worker running")
    pid = reg.compaction.worker_pid
    assert pid is not None, "the compaction ended before its worker was seen"
    os.kill(pid, signal.SIGSTOP)
    return compaction, pid


async def test_close_during_a_compaction(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    reg = Registry.open(path, compaction=OFF)
    reg.start(asyncio.get_running_loop())
    compaction, _pid = await _held_compaction(reg)
    assert reg.compaction.running
    await reg.close()  # abandons it (SIGKILL reaches a stopped worker); compacts offline
    with pytest.raises(RegistryError, match="closed"):
        await compaction
    reopened = Registry.open(path)
    try:
        assert reopened.registered_count() == 60_000
        assert not has_garbage(reopened._writer.conn)
    finally:
        reopened.close_sync()


async def test_the_worker_runs_below_the_daemon_in_its_scheduling_group(tmp_path: Path) -> None:
    """The worker runs on CPU time msgd leaves (SCHED_IDLE, niced) from its first instant, and
    that counts against msgd's own threads: it stays in msgd's session (a session of its own
    is an autogroup of its own, docs/registry.md), in a process group of its own (a
    terminal's Ctrl-C for msgd does not reach it)."""
    path = tmp_path / "registry.sqlite"
    reg = Registry.open(path, compaction=OFF)
    reg.start(asyncio.get_running_loop())
    compaction = None
    try:
        compaction, pid = await _held_compaction(reg)
        try:
            own = os.getpriority(os.PRIO_PROCESS, 0)
            assert os.sched_getscheduler(pid) == os.SCHED_IDLE
            assert os.getpriority(os.PRIO_PROCESS, pid) >= max(WORKER_NICE, own)
            assert os.getsid(pid) == os.getsid(0)
            assert os.getpgid(pid) == pid != os.getpgid(0)
            mine = Path("/proc/self/autogroup")
            if mine.exists():  # kernels built with autogroup scheduling
                # "/autogroup-N nice K" names the group; a task in a cpu cgroup of its own has
                # no autogroup and the file is empty (CI's containers): the same there too
                assert Path(f"/proc/{pid}/autogroup").read_text() == mine.read_text()
        finally:
            os.kill(pid, signal.SIGCONT)
        report = await compaction
        assert report.ok and report.registrations == 60_000
    finally:
        if compaction is not None and not compaction.done():
            compaction.cancel()
        await reg.close()


FRAME_CHILD = """
import struct, sys
sys.path.insert(0, sys.argv[1])
from msgd.registry.compaction_worker import frame_output
out = frame_output()
for start in range(0, 6_000_000, 25_000):  # 48 MB of 8-octet words, each its own index
    out.write(b"".join(struct.pack("<Q", n) for n in range(start, start + 25_000)))
out.flush()
"""


def test_the_workers_frames_survive_stops_with_python_unbuffered() -> None:
    """Under PYTHONUNBUFFERED (inherited from the daemon) a raw write into a full pipe that a
    SIGSTOP/SIGCONT interrupts returns having written part of its octets; the worker's output
    must write the rest. Each write is larger than a pipe holds, so it blocks part-way, and
    the stops land there."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    child = subprocess.Popen([sys.executable, "-c", FRAME_CHILD, str(Path(__file__).parents[2])],
                             stdout=subprocess.PIPE, env=env)
    done = threading.Event()

    def stop_and_continue() -> None:
        while not done.wait(0.001):
            try:
                os.kill(child.pid, signal.SIGSTOP)
                os.kill(child.pid, signal.SIGCONT)
            except ProcessLookupError:
                return

    pester = threading.Thread(target=stop_and_continue)
    pester.start()
    try:
        assert child.stdout is not None
        got = child.stdout.read()
    finally:
        done.set()
        pester.join()
        child.wait(timeout=60)
    assert child.returncode == 0
    assert len(got) == 6_000_000 * 8
    words = struct.unpack(f"<{6_000_000}Q", got)
    assert words == tuple(range(6_000_000)), "octets lost or repeated"


async def test_load_ignores_garbage_and_cleans_it_up(tmp_path: Path) -> None:
    """Rows outside the live snapshot and journal rows it covers are never decoded (they
    may be half of an interrupted compaction), and the writer deletes them after start."""
    path = tmp_path / "registry.sqlite"
    reg = Registry.open(path)
    reg.submit_register("ue-1", "gw-a", None)
    reg.close_sync()
    conn = sqlite3.connect(path)
    end = meta(path)["snapshot_chunk_end"]
    conn.execute("INSERT INTO snapshot(chunk, data) VALUES (?, ?)", (end + 5, b"not a blob"))
    conn.execute("UPDATE meta SET value = 7 WHERE key = 'snapshot_seq'")
    conn.execute("INSERT INTO journal(seq, ops) VALUES (3, ?)", (b"garbage",))
    conn.commit()
    conn.close()
    reg = Registry.open(path)
    assert reg.registration("ue-1") is not None
    reg.start(asyncio.get_running_loop())
    try:
        await until(lambda: reg.compaction.ok_count == 1, "the clean-up")
        assert reg.compaction.last.trigger == "cleanup"
        assert reg.compaction.last.garbage_rows_deleted == 2
        assert not has_garbage(sqlite3.connect(path))
    finally:
        await reg.close()


# -- schema 4 -----------------------------------------------------------------------------


def test_migrates_schema_3(tmp_path: Path) -> None:
    """Schema 4 names the live chunks in meta; a schema 3 file had only live chunks."""
    path = tmp_path / "registry.sqlite"
    reg = Registry.open(path)
    for i in range(20_000):
        reg.submit_register(f"ue-{i}", "gw-a", None if i % 2 else b"\x01")
    reg.close_sync()
    chunks = query(path, "SELECT count(*) FROM snapshot")[0][0]
    assert chunks > 1
    conn = sqlite3.connect(path)  # what msgd with schema 3 left behind
    conn.execute("DELETE FROM meta WHERE key LIKE 'snapshot_chunk_%'")
    conn.execute("UPDATE meta SET value = 3 WHERE key = 'schema_version'")
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    reg = Registry.open(path)
    try:
        assert reg.registered_count() == 20_000
        assert reg.registration("ue-2") == Registration("ue-2", "gw-a", b"\x01")
    finally:
        reg.close_sync()
    assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)] == [(4,)]
    state = meta(path)
    assert (state["snapshot_chunk_first"], state["snapshot_chunk_end"]) == (0, chunks)
    assert query(path, "PRAGMA application_id") == [(APPLICATION_ID,)]


# -- kill -9 at random instants of compactions ----------------------------------------------

POPULATION = 6_000  # UEs each crash round changes over and over

CRASH_CHILD = r"""
import asyncio, sys
from pathlib import Path
from msgd.registry import checkpoint
from msgd.registry.compaction import CompactionPolicy
from msgd.registry.store import Registry
from tests.msgd.test_compaction import crash_op

IN_FLIGHT = 20_000

async def main(path, prefix):
    # Tiny thresholds: a compaction is almost always under way.
    policy = CompactionPolicy(journal_changes=4000, journal_ratio=0, min_interval=0)
    reg = Registry.open(Path(path), commit_interval=0.0002, compaction=policy)
    reg.start(asyncio.get_running_loop())
    out = sys.stdout
    shown = -1

    def on_batch(first, last, ok):
        # Printed only once durable: "A n" says ops 0..n-1 are acknowledged.
        out.write(f"A {last}\n" if ok else "FAIL\n")
        out.flush()

    reg.add_listener(on_batch)
    i = 0
    seq = 0
    while True:
        for _ in range(40):
            ue, gw, profile = crash_op(prefix, i)
            if gw is None:
                seq = reg.submit_deregister(ue)
            else:
                seq = reg.submit_register(ue, gw, profile)
            i += 1
        if reg.pending() > IN_FLIGHT:
            # Flow control: what is durable but not yet acknowledged at a kill is at most
            # what is in flight, so the parent's DURABLE_UNACKED bound holds by
            # construction, however long the loop's turns (digests, a slow machine).
            await reg.wait_durable(seq - IN_FLIGHT // 2)
        steps = reg.compaction.steps_total
        if steps != shown:
            shown = steps
            out.write(f"C {steps} {reg.compaction.phase}\n")
            out.flush()
        await asyncio.sleep(0)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

CRASH_ROUNDS = int(os.environ.get("MSGD_COMPACTION_CRASH_ROUNDS", "3"))


def crash_op(prefix: str, i: int) -> tuple[str, str | None, bytes | None]:
    """The child's i-th change (0-based, seq i + 1): (UE, gateway or None to de-register,
    profile). Every fourth registers a UE of its own, never changed again, so that a lost
    change cannot hide behind a later one; the rest change POPULATION UEs in turn, and every
    third pass de-registers the odd ones."""
    if i % 4 == 0:
        return f"{prefix}-f{i // 4}", f"gw{(i // 4) % 4}", None
    j = i - i // 4 - 1  # among the others
    n, cycle = j % POPULATION, j // POPULATION
    ue = f"{prefix}-{n}"
    if cycle % 3 == 2 and n % 2:
        return ue, None, None
    return ue, f"gw{cycle % 4}", (f"{ue}/{cycle}".encode() if n % 3 else None)


def test_kill_9_at_random_instants_of_compactions(tmp_path: Path) -> None:
    """A child keeps changing UEs while compactions run back to back, and is killed with
    SIGKILL after a random number of compaction steps. The file must hold exactly the
    changes up to some point at or after the last acknowledged one (durable changes form a
    prefix of those submitted; acknowledgements a prefix of that): nothing acknowledged is
    lost, nothing is invented. It passes integrity_check, opens, and its garbage is deleted
    after the next start. MSGD_COMPACTION_CRASH_ROUNDS sets the rounds (default 3)."""
    path = tmp_path / "registry.sqlite"
    rng = random.Random(int(os.environ.get("HOSTILE_SEED", "20261206")))
    kills: list[tuple[int, str, bool]] = []
    for round_ in range(CRASH_ROUNDS):
        prefix = f"r{round_}"
        proc = subprocess.Popen([sys.executable, "-c", CRASH_CHILD, str(path), prefix],
                                stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
        guard = threading.Timer(120, proc.kill)  # a stuck child would hang the test
        guard.start()
        target = rng.randint(3, 45)  # a compaction is ~10 steps here (a chunk or a delete each)
        lines: list[str] = []
        phase = "?"
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("C "):
                    _c, steps, phase = line.split()
                    # At the first step from the target on that the child saw inside a
                    # compaction: under load the steps come in bursts, and the first one at
                    # or past the target was often the last of one (phase idle: three idle
                    # kills of three once, on a loaded machine).
                    if int(steps) >= target and phase != "idle":
                        break
            proc.send_signal(signal.SIGKILL)  # wherever the compaction happens to be
            lines.extend(line for line in proc.stdout.read().splitlines(keepends=True)
                         if line.endswith("\n"))
            proc.wait()
        finally:
            guard.cancel()
        assert proc.returncode == -signal.SIGKILL, "the child ended before the kill"
        _no_worker_left(path)
        assert "FAIL\n" not in lines
        acked = max((int(line.split()[1]) for line in lines if line.startswith("A ")),
                    default=0)
        assert acked > 0
        assert query(path, "PRAGMA integrity_check") == [("ok",)]
        garbage = has_garbage(sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True))
        kills.append((target, phase, garbage))
        asyncio.run(_check_round(path, prefix, acked, garbage))
        assert query(path, "PRAGMA integrity_check") == [("ok",)]
    # The kills landed inside compactions, not only between them.
    assert sum(phase != "idle" for _t, phase, _g in kills) >= CRASH_ROUNDS // 2, kills


def _workers_of(path: Path) -> list[int]:
    """Compaction worker processes reading `path` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"msgd.registry.compaction_worker" in argv and str(path).encode() in argv:
            found.append(int(entry.name))
    return found


def _no_worker_left(path: Path, timeout: float = 10.0) -> None:
    """A compaction worker dies with the daemon that started it (bounded poll)."""
    deadline = time.monotonic() + timeout
    while _workers_of(path):
        assert time.monotonic() < deadline, f"compaction worker outlived msgd: {_workers_of(path)}"
        time.sleep(0.01)


# At most this many changes durable beyond the last acknowledged: the child keeps at most
# IN_FLIGHT (20,000) + 40 submitted and not acknowledged.
DURABLE_UNACKED = 50_000


async def _check_round(path: Path, prefix: str, acked: int, garbage: bool) -> None:
    reg = Registry.open(path, compaction=OFF)
    reg.start(asyncio.get_running_loop())
    try:
        ues = {f"{prefix}-{n}" for n in range(POPULATION)}
        ues.update(f"{prefix}-f{k}" for k in range((acked + DURABLE_UNACKED) // 4 + 1))
        found = {ue: reg.registration(ue) for ue in ues}
        state: dict[str, Registration | None] = dict.fromkeys(found)

        def apply(i: int) -> str:
            ue, gw, profile = crash_op(prefix, i)
            state[ue] = None if gw is None else Registration(ue, gw, profile)
            return ue

        for i in range(acked):
            apply(i)
        wrong = {ue for ue in found if found[ue] != state[ue]}
        durable = acked
        while wrong and durable < acked + DURABLE_UNACKED:  # durable, not acknowledged
            ue = apply(durable)
            durable += 1
            if found[ue] == state[ue]:
                wrong.discard(ue)
            else:
                wrong.add(ue)
        assert not wrong, (acked, durable, sorted(wrong)[:5])
        # What the kill interrupted is deleted: by the open's own compaction when the
        # journal was mostly churn, else in the background after start.
        reader = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
        try:
            await until(lambda: not reg.compaction.running and not has_garbage(reader),
                        "the clean-up after the crash")
        finally:
            reader.close()
        if garbage and reg.compaction.last is not None:
            assert reg.compaction.last.trigger == "cleanup"
    finally:
        await reg.close()


def test_a_clean_up_step_deletes_at_most_its_share_and_at_least_one_row(tmp_path: Path) -> None:
    """Garbage goes about DELETE_OCTETS a step, in key order: the rows whose sizes add up to
    at most that, or the first row alone when it is larger; chunks (on both sides of the live
    range) before journal rows; the live chunks and rows stay, and the report counts what
    went."""
    from types import SimpleNamespace

    from msgd.registry.compaction import DELETE_OCTETS, Compactor

    path = tmp_path / "registry.sqlite"
    Registry.open(path).close_sync()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        kib = 1024
        # Chunks 0-1 and 4-6 are garbage around the live range [2, 4).
        chunk_sizes = {0: 600 * kib, 1: 300 * kib, 2: 700 * kib, 3: 700 * kib,
                       4: 200 * kib, 5: 2 * DELETE_OCTETS, 6: 100 * kib}
        conn.executemany("INSERT INTO snapshot(chunk, data) VALUES (?, zeroblob(?))",
                         list(chunk_sizes.items()))
        conn.executemany("UPDATE meta SET value = ? WHERE key = ?",
                         [(2, "snapshot_chunk_first"), (4, "snapshot_chunk_end"),
                          (4, "snapshot_seq")])  # journal rows 1..4 covered: garbage
        conn.executemany("INSERT INTO journal(seq, ops) VALUES (?, zeroblob(?))",
                         [(n, 400 * kib) for n in range(1, 7)])
        report = CompactionReport(trigger="cleanup", started_at=time.time())
        steps = Compactor._delete_garbage(  # type: ignore[arg-type]
            SimpleNamespace(conn=conn, wrote=lambda octets: None), report)
        left = []
        for _ in steps:
            left.append(([c for (c,) in conn.execute("SELECT chunk FROM snapshot")],
                         [s for (s,) in conn.execute("SELECT seq FROM journal")]))
    finally:
        conn.close()
    journal = [1, 2, 3, 4, 5, 6]
    assert left == [
        ([2, 3, 4, 5, 6], journal),  # 600 + 300 KiB; with the next garbage (200), over 1 MiB
        ([2, 3, 5, 6], journal),     # 200 KiB; the next is 2 MiB
        ([2, 3, 6], journal),        # the 2 MiB chunk, alone
        ([2, 3], journal),
        ([2, 3], [3, 4, 5, 6]),      # 2 x 400 KiB of the journal
        ([2, 3], [5, 6]),            # the rest it covers; 5 and 6 are live
    ]
    garbage = [size for chunk, size in chunk_sizes.items() if chunk not in (2, 3)]
    assert report.garbage_rows_deleted == len(garbage) + 4
    assert report.garbage_octets_deleted == sum(garbage) + 4 * 400 * kib
