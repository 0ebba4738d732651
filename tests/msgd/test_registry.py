"""Registry: durability (kill -9, full disk), rollback, corrupt files, migration, compaction.

Real SQLite files in tmp_path and real child processes; nothing is mocked and nothing sleeps
to synchronise. See docs/registry.md for the design these tests hold to.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from msgd.errors import RegistryCorruptError, RegistryError
from msgd.registry.schema import APPLICATION_ID, SCHEMA_VERSION
from msgd.registry.snapshot import COMPACT_MIN_OPS
from msgd.registry.store import Registration, Registry


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "registry.sqlite"


@pytest.fixture
async def registry(path: Path):
    reg = Registry.open(path)
    reg.start(asyncio.get_running_loop())
    yield reg
    await reg.close()


def snapshot_of(reg: Registry) -> dict[str, Registration]:
    return {r.ue_service_id: r for r in reg.iter_registrations()}


def query(path: Path, sql: str) -> list[tuple]:
    """Look at the file with a read-only connection of our own."""
    conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def crash_image(path: Path, dest: Path) -> Path:
    """Copy the database and its WAL as a crash would leave them (the writer must be idle)."""
    shutil.copyfile(path, dest)
    wal = path.with_name(path.name + "-wal")
    if wal.exists():
        shutil.copyfile(wal, dest.with_name(dest.name + "-wal"))
    return dest


# -- basic behaviour ---------------------------------------------------------------------------


async def test_reopen_keeps_registrations(path: Path, registry: Registry) -> None:
    registry.submit_register("ue-1", "gw-a", None)
    registry.submit_register("ue-2", "gw-a", b"\x30\x00\x01\x01")
    registry.submit_register("ue-3", "gw-b", b"")  # an empty profile IE is not "no profile"
    registry.submit_register("ue-4", "gw-b", None)
    await registry.wait_durable(registry.submit_deregister("ue-4"))
    expected = snapshot_of(registry)
    await registry.close()

    reopened = Registry.open(path)
    try:
        assert snapshot_of(reopened) == expected
        assert reopened.registered_count() == 3
        assert reopened.registration("ue-2") == Registration("ue-2", "gw-a", b"\x30\x00\x01\x01")
        assert reopened.registration("ue-3") == Registration("ue-3", "gw-b", b"")
        assert reopened.registration("ue-4") is None
    finally:
        reopened.close_sync()


async def test_reregistration_replaces(registry: Registry) -> None:
    registry.submit_register("ue-1", "gw-a", b"profile")
    seq = registry.submit_register("ue-1", "gw-b", None)
    # Reads see the change before it is durable (later entries of a bulk rely on it).
    assert registry.registration("ue-1") == Registration("ue-1", "gw-b", None)
    await registry.wait_durable(seq)
    assert registry.registration("ue-1") == Registration("ue-1", "gw-b", None)
    assert registry.registered_count() == 1


async def test_deregister_removes(registry: Registry) -> None:
    registry.submit_register("ue-1", "gw-a", b"p")
    await registry.wait_durable(registry.submit_deregister("ue-1"))
    assert registry.registration("ue-1") is None
    assert registry.registered_count() == 0
    # De-registering an unknown UE is a (durable) no-op change.
    await registry.wait_durable(registry.submit_deregister("never-registered"))
    assert registry.registered_count() == 0


async def test_iter_by_gateway(registry: Registry) -> None:
    for i in range(10):
        registry.submit_register(f"ue-{i}", "gw-even" if i % 2 == 0 else "gw-odd", bytes([i]))
    registry.submit_register("ue-1", "gw-even", None)  # moved
    assert {r.ue_service_id for r in registry.iter_registrations("gw-odd")} == {
        "ue-3",
        "ue-5",
        "ue-7",
        "ue-9",
    }
    even = {r.ue_service_id: r for r in registry.iter_registrations("gw-even")}
    assert set(even) == {"ue-0", "ue-1", "ue-2", "ue-4", "ue-6", "ue-8"}
    assert even["ue-1"].profile is None
    assert even["ue-2"].profile == b"\x02"
    assert list(registry.iter_registrations("gw-unknown")) == []
    assert len(list(registry.iter_registrations())) == 10


async def test_iteration_survives_changes(registry: Registry) -> None:
    for i in range(5):
        registry.submit_register(f"ue-{i}", "gw-a", None)
    seen = []
    for reg in registry.iter_registrations():
        seen.append(reg.ue_service_id)
        registry.submit_deregister("ue-4")
        registry.submit_register("ue-new", "gw-a", None)
    assert "ue-4" not in seen
    assert "ue-new" not in seen


# Ids and profiles that stress the encodings: non-ASCII, NUL (forces the length-prefixed
# string mode), the largest profile, and octets that look like our own framing.
ODD_IDS = ["imsi-001010000000001", "ué-ünïcödé-☃", "with\x00nul", "x" * 255, ""]
ODD_PROFILES = [None, b"", b"\x00" * 7, bytes(range(256)) * 8, b"\xff\xfe"]


@pytest.mark.parametrize("stage", ["journal", "snapshot"])
async def test_ids_and_profiles_round_trip(path: Path, registry: Registry, stage: str) -> None:
    for ue, profile in zip(ODD_IDS, ODD_PROFILES, strict=True):
        registry.submit_register(ue, f"gw-{len(ue)}", profile)
    await registry.wait_durable(registry.last_seq)
    expected = snapshot_of(registry)
    if stage == "journal":  # read back by replaying the journal, as after a crash
        target = crash_image(path, path.with_name("copy.sqlite"))
    else:  # read back from the snapshot written at close
        await registry.close()
        target = path
        assert query(path, "SELECT count(*) FROM journal") == [(0,)]
    reopened = Registry.open(target)
    try:
        assert snapshot_of(reopened) == expected
    finally:
        reopened.close_sync()


# -- completions -------------------------------------------------------------------------------


async def test_listener_order_and_durable_seq(registry: Registry) -> None:
    batches: list[tuple[int, int, bool]] = []
    registry.add_listener(lambda first, last, ok: batches.append((first, last, ok)))
    assert registry.durable_seq == 0
    last = 0
    for round_ in range(5):
        for i in range(40):
            last = registry.submit_register(f"ue-{round_}-{i}", "gw-a", None)
        await asyncio.sleep(0)  # let the loop run between rounds: several batches
    assert registry.pending() > 0
    await registry.wait_durable(last)
    assert last == 200
    assert registry.durable_seq == 200
    assert registry.pending() == 0
    # Batches are reported in order, contiguous, each once, all ok.
    assert batches[0][0] == 1
    assert batches[-1][1] == 200
    for (_, prev_last, _), (first, _, _) in itertools.pairwise(batches):
        assert first == prev_last + 1
    assert all(ok and first <= last_ for first, last_, ok in batches)


async def test_wait_durable_for_settled_and_unknown_seq(registry: Registry) -> None:
    seq = registry.submit_register("ue-1", "gw-a", None)
    await registry.wait_durable(seq)
    await registry.wait_durable(seq)  # already durable: returns at once
    with pytest.raises(ValueError):
        await registry.wait_durable(seq + 1)


async def test_remove_listener_and_failing_listener(registry: Registry) -> None:
    calls: list[int] = []

    def broken(first: int, last: int, ok: bool) -> None:
        raise RuntimeError("listener bug")

    def counting(first: int, last: int, ok: bool) -> None:
        calls.append(last)

    registry.add_listener(broken)  # must not stop the others
    registry.add_listener(counting)
    await registry.wait_durable(registry.submit_register("ue-1", "gw-a", None))
    registry.remove_listener(counting)
    await registry.wait_durable(registry.submit_register("ue-2", "gw-a", None))
    assert calls == [1]


async def test_refuses_changes_after_close(path: Path) -> None:
    reg = Registry.open(path)
    reg.start(asyncio.get_running_loop())
    await reg.close()
    with pytest.raises(RegistryError):
        reg.submit_register("ue-1", "gw-a", None)
    with pytest.raises(RegistryError):
        reg.submit_deregister("ue-1")


def test_close_sync_flushes_without_loop(path: Path) -> None:
    reg = Registry.open(path, synchronous="normal")
    reg.submit_register("ue-1", "gw-a", b"p")
    reg.submit_register("ue-2", "gw-a", None)
    assert reg.pending() == 2
    reg.close_sync()  # starts the writer just to flush, then compacts
    reopened = Registry.open(path)
    try:
        assert reopened.registration("ue-1") == Registration("ue-1", "gw-a", b"p")
        assert reopened.registered_count() == 2
    finally:
        reopened.close_sync()


def test_open_arguments_checked(path: Path) -> None:
    with pytest.raises(ValueError):
        Registry.open(path, synchronous="off")
    with pytest.raises(ValueError):
        Registry.open(path, max_batch=0)


def test_second_open_of_same_file_refused(path: Path) -> None:
    first = Registry.open(path)
    try:
        with pytest.raises(RegistryError, match="in use"):
            Registry.open(path)
    finally:
        first.close_sync()
    Registry.open(path).close_sync()  # the lock went with the first


# -- crash durability --------------------------------------------------------------------------

CRASH_CHILD = r"""
import asyncio, sys
from pathlib import Path
from msgd.registry.store import Registry

async def main(path, prefix):
    reg = Registry.open(Path(path), commit_interval=0.0002)
    reg.start(asyncio.get_running_loop())
    ops = {}
    out = sys.stdout

    def on_batch(first, last, ok):
        # An acknowledgement leaves this process only once the change is durable.
        if not ok:
            out.write("FAIL\n")
        else:
            out.write("".join(ops.pop(seq) + "\n" for seq in range(first, last + 1)))
        out.flush()

    reg.add_listener(on_batch)
    i = 0
    while True:
        for _ in range(50):
            ue = f"{prefix}-{i}"
            ops[reg.submit_register(ue, f"gw{i % 3}", ue.encode() if i % 2 else None)] = "R " + ue
            if i % 10 == 9:
                ops[reg.submit_deregister(ue)] = "D " + ue
            i += 1
        await asyncio.sleep(0)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_acknowledged_changes_survive_kill_9(path: Path) -> None:
    rng = random.Random()
    for round_ in range(4):
        prefix = f"r{round_}"
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_CHILD, str(path), prefix],
            stdout=subprocess.PIPE,
            text=True,
        )
        # A guard only: a stuck child would otherwise hang the test; it is never hit normally.
        guard = threading.Timer(60, proc.kill)
        guard.start()
        try:
            target = rng.randint(200, 4000)
            acked: list[str] = []
            assert proc.stdout is not None
            for line in proc.stdout:
                acked.append(line)
                if len(acked) >= target:
                    break
            proc.send_signal(signal.SIGKILL)  # at whatever point the writer happens to be
            # Printed before it died: acked too, except a line the kill cut short.
            acked.extend(line for line in proc.stdout.read().splitlines(keepends=True)
                         if line.endswith("\n"))
            proc.wait()
        finally:
            guard.cancel()
        assert proc.returncode == -signal.SIGKILL
        assert len(acked) >= target
        assert "FAIL" not in acked

        # The file as the crash left it is sound.
        assert query(path, "PRAGMA integrity_check") == [("ok",)]
        registered = {line.split()[1] for line in acked if line.startswith("R ")}
        deregistered = {line.split()[1] for line in acked if line.startswith("D ")}
        reg = Registry.open(path)
        try:
            for ue in registered - deregistered:
                i = int(ue.rsplit("-", 1)[1])
                found = reg.registration(ue)
                if i % 10 == 9:
                    continue  # its de-registration may have become durable unacknowledged
                assert found == Registration(ue, f"gw{i % 3}", ue.encode() if i % 2 else None)
            for ue in deregistered:
                assert reg.registration(ue) is None
        finally:
            reg.close_sync()
        assert query(path, "PRAGMA integrity_check") == [("ok",)]


# -- full disk ---------------------------------------------------------------------------------


async def test_full_disk_fails_batch_rolls_back_and_recovers(path: Path) -> None:
    reg = Registry.open(path)
    reg.start(asyncio.get_running_loop())
    try:
        reg.submit_register("keep", "gw-a", b"old")
        await reg.wait_durable(reg.submit_register("gone", "gw-a", None))
        batches: list[tuple[int, int, bool]] = []
        reg.add_listener(lambda first, last, ok: batches.append((first, last, ok)))

        reg._debug_set_max_page_count(None)  # no page beyond the current size
        big = bytes(range(256)) * 32  # 8 KiB: every batch needs new pages
        seqs = [reg.submit_register(f"ue-{i}", "gw-b", big) for i in range(20)]
        reg.submit_register("keep", "gw-b", None)
        last = reg.submit_deregister("gone")
        assert reg.registration("keep") == Registration("keep", "gw-b", None)

        with pytest.raises(RegistryError, match="full"):
            await reg.wait_durable(last)
        # One report for the failed batch and everything after it, then memory is back at
        # the last durable state (undone in reverse order).
        assert batches == [(seqs[0], last, False)]
        assert reg.durable_seq == last
        assert reg.pending() == 0
        assert reg.registration("keep") == Registration("keep", "gw-a", b"old")
        assert reg.registration("gone") == Registration("gone", "gw-a", None)
        assert reg.registration("ue-0") is None
        assert reg.registered_count() == 2
        with pytest.raises(RegistryError):
            await reg.wait_durable(seqs[0])

        # Space returns: the same registry carries on without a restart.
        reg._debug_set_max_page_count(1 << 30)
        await reg.wait_durable(reg.submit_register("ue-0", "gw-b", big))
        assert batches[-1][2] is True
    finally:
        await reg.close()
    reopened = Registry.open(path)
    try:
        assert reopened.registration("keep") == Registration("keep", "gw-a", b"old")
        assert reopened.registration("ue-0") == Registration("ue-0", "gw-b", big)
        assert reopened.registration("ue-1") is None
        assert reopened.registered_count() == 3
    finally:
        reopened.close_sync()
    assert query(path, "PRAGMA integrity_check") == [("ok",)]


FSIZE_CHILD = r"""
import asyncio, json, os, resource, signal, sys
from pathlib import Path
from msgd.errors import RegistryError
from msgd.registry.store import Registry

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG, like a full disk

async def main(path):
    reg = Registry.open(Path(path))
    reg.start(asyncio.get_running_loop())
    batches = []
    reg.add_listener(lambda first, last, ok: batches.append([first, last, ok]))
    await reg.wait_durable(reg.submit_register("keep", "gw-a", b"old"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    largest = max(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    resource.setrlimit(resource.RLIMIT_FSIZE, (largest + 8192, hard))
    seqs = [reg.submit_register(f"ue-{i}", "gw-b", os.urandom(2048)) for i in range(100)]
    last = reg.submit_deregister("keep")
    result = {"seqs": [seqs[0], last]}
    try:
        await reg.wait_durable(last)
        result["error"] = None
    except RegistryError as exc:
        result["error"] = str(exc)
    keep = reg.registration("keep")
    result["keep"] = keep and [keep.gateway, keep.profile.decode()]
    result["count"] = reg.registered_count()
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    await reg.wait_durable(reg.submit_register("after", "gw-c", None))
    result["batches"] = batches
    await reg.close()
    print(json.dumps(result))

asyncio.run(main(sys.argv[1]))
"""


def test_write_error_from_file_size_limit(path: Path) -> None:
    """A real I/O error (EFBIG from RLIMIT_FSIZE) fails the batch; the writer recovers."""
    out = subprocess.run(
        [sys.executable, "-c", FSIZE_CHILD, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    result = json.loads(out)
    assert result["error"] is not None
    assert result["keep"] == ["gw-a", "old"]
    assert result["count"] == 1
    first, last = result["seqs"]
    assert [first, last, False] in result["batches"]
    assert result["batches"][-1][2] is True
    assert query(path, "PRAGMA integrity_check") == [("ok",)]
    reg = Registry.open(path)
    try:
        assert reg.registration("keep") == Registration("keep", "gw-a", b"old")
        assert reg.registration("after") == Registration("after", "gw-c", None)
        assert reg.registration("ue-0") is None
    finally:
        reg.close_sync()


# -- files refused at start --------------------------------------------------------------------


def make_registry(path: Path, count: int) -> None:
    reg = Registry.open(path)
    for i in range(count):
        reg.submit_register(f"imsi-{i:015d}", f"gw-{i % 4}", bytes(40) if i % 3 else None)
    reg.close_sync()


@pytest.mark.parametrize(
    "damage", ["random-bytes", "truncated", "truncated-to-zero", "header-smashed"])
def test_corrupt_file_refused_and_left_alone(path: Path, damage: str) -> None:
    rng = random.Random(7)
    if damage == "random-bytes":
        path.write_bytes(rng.randbytes(64 * 1024))
    else:
        make_registry(path, 20_000)
        data = path.read_bytes()
        if damage == "truncated":
            path.write_bytes(data[: len(data) // 2])
        elif damage == "truncated-to-zero":
            path.write_bytes(b"")
        else:
            path.write_bytes(rng.randbytes(100) + data[100:])
    before = path.read_bytes()
    for _ in range(2):  # a failed open leaves no lock behind: the second says the same
        with pytest.raises(RegistryCorruptError) as info:
            Registry.open(path)
        message = str(info.value)
        assert str(path) in message
        assert "\n" not in message
        assert "untouched" in message
    assert path.read_bytes() == before


def test_new_registry_file_is_never_empty(path: Path) -> None:
    """The empty-file refusal relies on this: a new registry is checkpointed at creation, so
    a crash right after creating it leaves a non-empty file, which reopens as a registry."""
    reg = Registry.open(path)
    assert path.stat().st_size > 0
    reg.close_sync()
    Registry.open(path).close_sync()


FLIP_CHILD = r"""
import os, signal, sqlite3, sys
path, table, column, offset = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
conn = sqlite3.connect(path)
conn.execute("PRAGMA wal_autocheckpoint = 0")
rowid, blob = conn.execute(f"SELECT rowid, {column} FROM {table} LIMIT 1").fetchone()
damaged = bytearray(blob)
damaged[offset] ^= 0x40
conn.execute(f"UPDATE {table} SET {column} = ? WHERE rowid = ?", (bytes(damaged), rowid))
conn.commit()
os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: the damage stays in the WAL
"""


def flip_byte_in_wal(path: Path, table: str, column: str, offset: int) -> None:
    subprocess.run([sys.executable, "-c", FLIP_CHILD, str(path), table, column, str(offset)])


def files_of(path: Path) -> dict[str, bytes]:
    """The database and its WAL (the -shm index is scratch, the .lock file is ours)."""
    return {
        p.name: p.read_bytes()
        for p in path.parent.glob(path.name + "*")
        if not p.name.endswith(("-shm", ".lock"))
    }


@pytest.mark.parametrize("table", ["journal", "snapshot"])
async def test_damaged_blob_refused(path: Path, registry: Registry, table: str) -> None:
    """Damage quick_check cannot see (inside our blobs) is caught by the blob checksum.

    The damaged row sits in the WAL, which a read-write connection would checkpoint into the
    file on close: the file and its WAL must still be exactly as found.
    """
    for i in range(100):
        registry.submit_register(f"ue-{i}", "gw-a", None)
    await registry.wait_durable(registry.last_seq)
    if table == "journal":
        target = crash_image(path, path.with_name("crashed.sqlite"))
    else:
        await registry.close()
        target = path
    flip_byte_in_wal(target, table, "ops" if table == "journal" else "data", 40)
    assert target.with_name(target.name + "-wal").stat().st_size > 0
    before = files_of(target)
    with pytest.raises(RegistryCorruptError, match="damaged registration data"):
        Registry.open(target)
    assert files_of(target) == before


def test_foreign_database_and_newer_schema_refused(path: Path, tmp_path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers(id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()
    with pytest.raises(RegistryCorruptError, match="not an msgd registry"):
        Registry.open(path)

    newer = tmp_path / "newer.sqlite"
    make_registry(newer, 1)
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    before = newer.read_bytes()
    with pytest.raises(RegistryCorruptError, match="schema version"):
        Registry.open(newer)
    assert newer.read_bytes() == before


# -- schema migration --------------------------------------------------------------------------


def test_migrates_schema_1(path: Path) -> None:
    """Schema 1 kept one row per registration; opening moves it into the snapshot."""
    conn = sqlite3.connect(path)
    conn.executescript(
        f"""
        PRAGMA application_id = {APPLICATION_ID};
        CREATE TABLE registration(
            ue_service_id TEXT PRIMARY KEY, gateway TEXT NOT NULL, profile BLOB);
        CREATE TABLE provisioning(
            ue_service_id TEXT PRIMARY KEY, key BLOB NOT NULL, gateways TEXT NOT NULL
        ) WITHOUT ROWID;
        PRAGMA user_version = 1;
        """
    )
    conn.executemany(
        "INSERT INTO registration VALUES (?, ?, ?)",
        [("ue-1", "gw-a", None), ("ue-2", "gw-b", b"\x30\x00\x01\x02"), ("ue-3", "gw-a", b"")],
    )
    conn.execute("INSERT INTO provisioning VALUES ('ue-1', ?, 'gw-a;gw-b')", (bytes(32),))
    conn.commit()
    conn.close()

    reg = Registry.open(path)
    try:
        assert snapshot_of(reg) == {
            "ue-1": Registration("ue-1", "gw-a", None),
            "ue-2": Registration("ue-2", "gw-b", b"\x30\x00\x01\x02"),
            "ue-3": Registration("ue-3", "gw-a", b""),
        }
        provisioned = reg.provisioned("ue-1")
        assert provisioned is not None and provisioned.gateways == {"gw-a", "gw-b"}
    finally:
        reg.close_sync()
    assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert query(path, "SELECT value FROM meta WHERE key = 'schema_version'") == [(SCHEMA_VERSION,)]
    assert query(path, "SELECT name FROM sqlite_master WHERE name = 'registration'") == []


# -- compaction --------------------------------------------------------------------------------


async def test_close_compacts_and_reopen_matches(path: Path, registry: Registry) -> None:
    for i in range(30_000):
        registry.submit_register(f"ue-{i}", f"gw-{i % 5}", None)
        if i % 1000 == 0:
            await asyncio.sleep(0)
    for i in range(0, 30_000, 3):
        registry.submit_deregister(f"ue-{i}")
    for i in range(1, 30_000, 6):
        registry.submit_register(f"ue-{i}", "gw-moved", f"profile-{i}".encode())
    await registry.wait_durable(registry.last_seq)
    expected = snapshot_of(registry)
    assert query(path, "SELECT count(*) FROM journal")[0][0] > 0
    await registry.close()

    assert query(path, "SELECT count(*) FROM journal") == [(0,)]
    assert query(path, "SELECT value FROM meta WHERE key = 'snapshot_count'") == [(len(expected),)]
    reopened = Registry.open(path)
    try:
        assert snapshot_of(reopened) == expected
    finally:
        reopened.close_sync()


@pytest.mark.parametrize("churn", [True, False])
async def test_open_compacts_a_journal_of_churn(
    path: Path, registry: Registry, churn: bool
) -> None:
    # With churn: 3 ops per registered UE (more than twice the registrations): compact.
    # Without: one op per UE, as cheap to replay as a snapshot: leave it to close().
    ues = COMPACT_MIN_OPS // 2 if churn else COMPACT_MIN_OPS + 100
    for round_ in range(3 if churn else 1):
        for i in range(ues):
            registry.submit_register(f"ue-{i}", f"gw-{round_}", None)
        await asyncio.sleep(0)
    await registry.wait_durable(registry.last_seq)
    expected = snapshot_of(registry)
    copy = crash_image(path, path.with_name("crashed.sqlite"))
    journal_rows = query(copy, "SELECT count(*) FROM journal")[0][0]
    assert journal_rows > 0

    reopened = Registry.open(copy)  # replays the journal
    try:
        after = query(copy, "SELECT count(*) FROM journal")[0][0]
        assert after == (0 if churn else journal_rows)
        assert snapshot_of(reopened) == expected
    finally:
        reopened.close_sync()


# -- the in-memory provisioning index ----------------------------------------------------------


def published_index(reg: Registry):
    """The provisioning index lookups read now (None while there is none)."""
    return reg.provisioning._index.published


def _settle_index(reg: Registry) -> None:
    """Wait for the background index build to finish (joining its thread, no timing)."""
    thread = reg.provisioning._index.thread
    if thread is not None:
        thread.join(60)
        assert not thread.is_alive()


def test_provisioning_index_agrees_with_the_table(path: Path) -> None:
    from msgd.registry.provisioning import ProvisionedUe

    reg = Registry.open(path)
    try:
        rows = [
            ProvisionedUe(f"ue-{i:05d}", bytes([i % 256]) * 32,
                          frozenset({f"gw{i % 3}", "gw-x"} if i % 2 else {f"gw{i % 3}"}))
            for i in range(3000)
        ]
        reg.replace_provisioning(rows)
        _settle_index(reg)
        assert published_index(reg) is not None and len(published_index(reg)) == 3000
        for row in rows[:100] + rows[-100:]:
            assert reg.provisioned(row.ue_service_id) == row
        assert reg.provisioned("nobody") is None
        # Writes are seen at once (the index is dropped, lookups go to SQL) and after rebuild.
        new = ProvisionedUe("ue-new", b"\x09" * 32, frozenset({"gw9"}))
        reg.provisioning.upsert_provisioned(new)
        assert reg.provisioning.remove_provisioned("ue-00001")
        assert reg.provisioned("ue-new") == new
        assert reg.provisioned("ue-00001") is None
        _settle_index(reg)
        assert published_index(reg) is not None
        assert reg.provisioned("ue-new") == new
        assert reg.provisioned("ue-00001") is None
        assert reg.provisioned("ue-00002") == rows[2]
    finally:
        reg.close_sync()
    # And from a fresh open, built from the file.
    reg = Registry.open(path)
    try:
        _settle_index(reg)
        assert reg.provisioned("ue-new") == new and reg.provisioned("ue-00003") == rows[3]
    finally:
        reg.close_sync()


# -- provisioning writes racing the index build and a replace ----------------------------------


class Gate:
    """Parks the first thread that reaches a point until the test releases it."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        self.thread: threading.Thread | None = None

    def wait_reached(self) -> None:
        assert self.reached.wait(60), "the point was never reached"


class Pauser:
    """The provisioning store's test seam (_provisioning_pause), parking a thread at an armed
    point; installed on a registry's store with pausing()."""

    def __init__(self) -> None:
        self.gates: dict[str, Gate] = {}
        self.gates_lock = threading.Lock()

    def arm(self, point: str) -> Gate:
        gate = Gate()
        with self.gates_lock:
            self.gates[point] = gate
        return gate

    def __call__(self, point: str) -> None:
        with self.gates_lock:
            gate = self.gates.pop(point, None)
        if gate is not None:
            gate.thread = threading.current_thread()
            gate.reached.set()
            assert gate.release.wait(60), "never released"


def pausing(reg: Registry) -> Pauser:
    pauser = Pauser()
    reg.provisioning._provisioning_pause = pauser  # type: ignore[method-assign]
    return pauser


def _prov_rows(count: int):
    from msgd.registry.provisioning import ProvisionedUe

    return [ProvisionedUe(f"ue-{i:05d}", bytes([i % 256]) * 32, frozenset({"gw-a"}))
            for i in range(count)]


def _index_value(reg: Registry, ue: str) -> bytes | None:
    """What the published index holds for `ue` (None: no index, or no such UE in it)."""
    index = published_index(reg)
    found = None if index is None else index.get(ue)
    return None if found is None else found[0]


@pytest.mark.parametrize("writer_state", ["committed-not-ended", "ended"])
def test_index_read_before_a_commit_is_never_published(path: Path, writer_state: str) -> None:
    """A write commits while the index thread holds an index read from the old table: that
    index must not become what lookups see, not even for a moment."""
    from msgd.registry.provisioning import ProvisionedUe

    reg = Registry.open(path)
    pauser = pausing(reg)
    try:
        rows = _prov_rows(200)
        reg.replace_provisioning(rows)
        _settle_index(reg)
        target = rows[10]
        new = ProvisionedUe(target.ue_service_id, b"\xee" * 32, frozenset({"gw-new"}))

        # An unrelated write starts a rebuild; its read (the old key of `target`) is held
        # between reading and publishing.
        read = pauser.arm("index-read")
        reg.provisioning.upsert_provisioned(
            ProvisionedUe("ue-other", bytes(32), frozenset({"gw-a"})))
        read.wait_reached()

        # Now `target` changes and commits, while that read is parked.
        committed = pauser.arm("committed") if writer_state == "committed-not-ended" else None
        writer = threading.Thread(target=reg.provisioning.upsert_provisioned, args=(new,))
        writer.start()
        if committed is not None:
            committed.wait_reached()  # durable in the file, the write not yet over
        else:
            writer.join(60)
            assert not writer.is_alive()
        # The parked index thread goes on: it decides whether to publish, then either ends
        # (committed-not-ended) or parks again before publishing its next read (ended).
        again = pauser.arm("index-read")
        read.release.set()
        if committed is not None:
            read.thread.join(60)
            assert not read.thread.is_alive()
        else:
            again.wait_reached()
        # The change is committed: a lookup sees it, so the stale read was not published.
        assert _index_value(reg, target.ue_service_id) != target.key
        assert reg.provisioned(target.ue_service_id) == new

        again.release.set()
        if committed is not None:
            committed.release.set()
            writer.join(60)
            assert not writer.is_alive()
        _settle_index(reg)
        assert published_index(reg) is not None, "the index is built again once the writes are over"
        assert _index_value(reg, target.ue_service_id) == new.key
        assert reg.provisioned(target.ue_service_id) == new
    finally:
        reg.close_sync()


@pytest.mark.parametrize("path_taken", ["diff", "rebuild"])
def test_admin_change_during_a_replace_is_not_undone(path: Path, path_taken: str) -> None:
    """An admin change commits after a replace read the admin changes and merged, before it
    applies its result: the result still holds the change."""
    from msgd.registry.provisioning import ProvisionedUe
    from msgd.registry.provisioning_store import PROVISIONING_DIFF_MIN

    reg = Registry.open(path)
    pauser = pausing(reg)
    try:
        size = 300 if path_taken == "diff" else PROVISIONING_DIFF_MIN * 2 + 10
        rows = _prov_rows(size)
        if path_taken == "diff":
            # The merge must rewrite the rows the admin then changes: they differ now.
            old = ProvisionedUe("x", b"\x01" * 32, frozenset({"gw-old"}))
            reg.replace_provisioning(
                [ProvisionedUe(row.ue_service_id, old.key, old.gateways) if i in (3, 4)
                 else row for i, row in enumerate(rows)])
        else:
            reg.replace_provisioning(rows[:5])  # so different that the table is rebuilt
        changed = ProvisionedUe(rows[3].ue_service_id, b"\xaa" * 32, frozenset({"gw-admin"}))
        added = ProvisionedUe("ue-admin", b"\xbb" * 32, frozenset({"gw-admin"}))
        removed = rows[4].ue_service_id

        merged = pauser.arm("replace-merged")
        replacing = concurrent.futures.ThreadPoolExecutor(1)
        result = replacing.submit(reg.replace_provisioning, rows)
        merged.wait_reached()
        reg.provisioning.upsert_provisioned_many([changed, added])
        assert reg.provisioning.remove_provisioned(removed)
        merged.release.set()
        assert result.result(60) == size  # rows - removed + added
        replacing.shutdown()

        stored = dict(query(path, "SELECT ue_service_id, key FROM provisioning"))
        assert len(stored) == size == reg.provisioned_count()
        assert stored[changed.ue_service_id] == changed.key
        assert stored[added.ue_service_id] == added.key
        assert removed not in stored
        assert stored[rows[5].ue_service_id] == rows[5].key
        _settle_index(reg)
        assert reg.provisioned(changed.ue_service_id) == changed
        assert reg.provisioned(removed) is None
        # The raced replace cannot vouch for the stored rows: the next one reads its input.
        assert query(path, "SELECT value FROM meta WHERE key = 'provisioning_source'") == []
    finally:
        reg.close_sync()


def test_migrates_schema_2(path: Path) -> None:
    """Schema 3 adds provisioning_admin; a schema 2 file keeps its registrations and rows."""
    from msgd.registry.provisioning import ProvisionedUe

    reg = Registry.open(path)
    reg.replace_provisioning(_prov_rows(5))
    reg.submit_register("ue-00001", "gw-a", b"\x01")
    reg.close_sync()
    conn = sqlite3.connect(path)  # make it what msgd with schema 2 left behind
    conn.execute("DROP TABLE provisioning_admin")
    conn.execute("DELETE FROM meta WHERE key LIKE 'snapshot_chunk_%'")
    conn.execute("UPDATE meta SET value = 2 WHERE key = 'schema_version'")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()

    reg = Registry.open(path)
    try:
        assert reg.registration("ue-00001") == Registration("ue-00001", "gw-a", b"\x01")
        assert reg.provisioned_count() == 5 and reg.provisioning.provisioning_overrides() == 0
        reg.provisioning.upsert_provisioned(ProvisionedUe("ue-new", bytes(32), frozenset({"gw-b"})))
        assert reg.provisioning.provisioning_overrides() == 1
    finally:
        reg.close_sync()
    assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)] == [(4,)]
    assert query(path, "SELECT ue_service_id, key, gateways FROM provisioning_admin") == [
        ("ue-new", bytes(32), "gw-b")]
