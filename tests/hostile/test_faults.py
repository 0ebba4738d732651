"""Faults: kill -9 at random instants, a full disk, a damaged registry file, an unreadable
provisioning file on SIGHUP. Nothing acknowledged is lost; nothing is half-applied."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from msgd.registry.store import Registry
from tests.harness import ROOT, ChildServer, Gw, RawGateway, connect, make_deployment
from tests.hostile.tools import (
    KEY,
    assert_clean_log,
    ie,
    proof,
    provisioning_csv,
    record,
    stream_bulk,
    wait_for_log,
)
from wire.constants import IEI, FailureCause, MessageType
from wire.messages import PROFILE_SPEC, Profile, decode_group, encode_group

GW = "gw1.example"
BULK_REG = MessageType.BULK_REGISTRATION_REQUEST
BULK_DEREG = MessageType.BULK_DEREGISTRATION_REQUEST
_LOADED = re.compile(r"registry \S+: (\d+) registrations, \d+ provisioned, loaded in [\d.]+ s "
                     r"\(journal (\d+) ops replayed\)")


def _reg_entry(nonce: bytes, profile: Profile | None = None):
    extra = ie(IEI.NON_MSGIN5G_UE_PROFILE, encode_group(PROFILE_SPEC, profile)) if profile else b""

    def make(uid: str) -> bytes:
        return ie(IEI.REGISTRATION_ENTRY, ie(IEI.UE_SERVICE_ID, uid.encode())
                  + ie(IEI.UE_CREDENTIAL, proof(nonce, 1, uid)) + extra)
    return make


def _dereg_entry(nonce: bytes):
    def make(uid: str) -> bytes:
        return ie(IEI.DEREGISTRATION_ENTRY, ie(IEI.UE_SERVICE_ID, uid.encode())
                  + ie(IEI.UE_CREDENTIAL, proof(nonce, 2, uid)))
    return make


def _integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def _crash_copy(path: Path, into: Path) -> Path:
    """The registry as kill -9 left it (file and WAL), copied so the daemon's own restart
    replays the original untouched."""
    into.mkdir(parents=True, exist_ok=True)
    copy = into / path.name
    for suffix in ("", "-wal"):
        source = Path(str(path) + suffix)
        if source.exists():
            shutil.copyfile(source, Path(str(copy) + suffix))
    return copy


# --- kill -9 ------------------------------------------------------------------------------------


class _Killer:
    """Collects the answers of a round's bulks, and kills msgd with SIGKILL when asked to."""

    def __init__(self, child: ChildServer) -> None:
        self.child = child
        self.answered = 0
        self.acked_add: set[str] = set()
        self.acked_drop: set[str] = set()

    def kill(self) -> None:
        if self.child.proc.poll() is None:
            self.child.kill9()

    def _answer(self, acked: set[str], entry) -> None:
        assert entry.result == 0, entry  # nothing fails in this workload
        acked.add(entry.ue_service_id)
        self.answered += 1

    def added(self, _index: int, entry) -> None:
        self._answer(self.acked_add, entry)

    def dropped(self, _index: int, entry) -> None:
        self._answer(self.acked_drop, entry)


KILLS = 20  # kills that must land while changes are in flight
# A budget of rounds, not a behaviour check: a kill lands at a random instant of the time the
# first (unkilled) round took, so a round that runs faster than that one can end first.
# The instant used to be "after a random number of answers, up to 70 %, had been read": once
# msgd's GC pauses were gone it often answered everything before this test had read that
# many, and 48 rounds did not give 20 kills in flight (a fresh-clone CI run).
MAX_ROUNDS = 48
POPULATION = 8_000
PER_ROUND = 1_500


async def test_kill9_at_20_random_instants_of_bulk_registration_and_deregistration(
        tmp_path, pki):
    """Each round registers PER_ROUND unregistered UEs on one connection and de-registers
    PER_ROUND registered ones on another, and msgd is killed with SIGKILL at a random instant
    of the first round's duration (the first round is not killed, so that
    there is something to de-register). After each kill: every acknowledged change is in the
    registry, each UE is exactly before or after its change (gateway and profile included),
    the file passes PRAGMA integrity_check, and msgd restarts on it (replaying the journal)
    and reports the same count. Rounds go on until KILLS kills have caught changes in flight
    (answers the server never sent)."""
    seed = int(os.environ.get("HOSTILE_SEED", "20260707"))
    rng = random.Random(seed)
    dep = make_deployment(tmp_path / "k9", pki, gateways=(Gw(GW),))
    uids = [f"k-{i:05d}@gw1.example" for i in range(POPULATION)]
    provisioning_csv(dep.dir / "ues.csv", [(u, [GW]) for u in uids])
    path = dep.config().registry.path
    registered: dict[str, Profile] = {}
    child = ChildServer(dep)
    totals = {"acknowledged": 0, "unanswered": 0, "unanswered_applied": 0, "lost": 0}
    instants: list[tuple[int, int]] = []
    rounds = 0
    round_s = 0.0  # a round's duration, as last measured
    while len([i for i in instants if i[1]]) < KILLS:
        assert rounds < MAX_ROUNDS, instants
        offset = len(child.log_text())
        child.start()
        # The daemon replayed the crashed journal cleanly and holds exactly the model.
        loaded = _LOADED.search(child.log_text(), offset)
        assert loaded is not None and int(loaded.group(1)) == len(registered), loaded
        profile = Profile(ue_type=2, application_data=f"round {rounds}".encode())
        free = [u for u in uids if u not in registered]
        add = rng.sample(free, min(PER_ROUND, len(free)))
        drop = rng.sample(sorted(registered), min(PER_ROUND, len(registered)))
        total = len(add) + len(drop)
        killer = _Killer(child)
        # Entries are made before the bulks start, so that sending them is quick and the
        # server, not this test, sets the pace of the round.
        reg = await RawGateway.open(dep, child.address, GW)
        await reg.hello()
        made = _reg_entry(reg.nonce, profile)
        entries = {u: made(u) for u in add}
        bulks = [stream_bulk(reg, BULK_REG, 2, add, entries.__getitem__,
                             on_answer=killer.added)]
        raws = [reg]
        if drop:  # from the second round on, de-registrations run at the same time
            dereg = await RawGateway.open(dep, child.address, GW)
            await dereg.hello()
            raws.append(dereg)
            made = _dereg_entry(dereg.nonce)
            dentries = {u: made(u) for u in drop}
            bulks.append(stream_bulk(dereg, BULK_DEREG, 2, drop, dentries.__getitem__,
                                     on_answer=killer.dropped))
        # The instant: a random point of the first 80 % of a round's expected duration, as
        # bench/crash.py draws its own (the answers come in the last few milliseconds of a
        # round, after its commits). The first round is not killed: it measures (and leaves
        # something to de-register); the others do twice its work, and a round that ends
        # before its kill measures a whole round.
        started = time.monotonic()
        instant = rng.uniform(0.02, 0.8) * round_s if rounds else None
        timer = (asyncio.get_running_loop().call_later(instant, killer.kill)
                 if instant is not None else None)  # the random instant, not a synchronisation
        results = await asyncio.gather(*bulks)
        if timer is not None:
            timer.cancel()
        if killer.child.proc.poll() is None:
            round_s = (time.monotonic() - started) * (2 if not rounds else 1)
        killer.kill()  # the first round is killed after its end; a round that ended early too
        for raw in raws:
            raw.writer.transport.abort()
        assert all(error is None for _answers, error in results)
        acked_add, acked_drop = killer.acked_add, killer.acked_drop

        adding, dropping = set(add), set(drop)
        copy = _crash_copy(path, tmp_path / f"crash-{rounds}")
        assert _integrity(copy) == "ok"
        registry = Registry.open(copy)
        try:
            for uid in uids:
                found = registry.registration(uid)
                state = None if found is None else (
                    found.gateway, decode_group(PROFILE_SPEC, found.profile or b""))
                before = (GW, registered[uid]) if uid in registered else None
                if uid in acked_add:
                    assert state == (GW, profile), (uid, state)
                elif uid in acked_drop:
                    assert state is None, (uid, state)
                elif uid in adding:
                    assert state in (before, (GW, profile)), (uid, state)
                    totals["unanswered"] += 1
                    totals["unanswered_applied"] += state is not None
                elif uid in dropping:
                    assert state in (before, None), (uid, state)
                    totals["unanswered"] += 1
                    totals["unanswered_applied"] += state is None
                else:
                    assert state == before, (uid, state)
                if state is None:
                    registered.pop(uid, None)
                else:
                    registered[uid] = state[1]
        finally:
            registry.close_sync()
        shutil.rmtree(copy.parent)
        totals["acknowledged"] += len(acked_add) + len(acked_drop)
        if instant is not None:  # (ms into the round, answers the server never sent)
            instants.append((round(instant * 1000), total - killer.answered))
        rounds += 1
    # A last clean start and stop on the file the kills left.
    offset = len(child.log_text())
    child.start()
    loaded = _LOADED.search(child.log_text(), offset)
    assert loaded is not None and int(loaded.group(1)) == len(registered)
    assert child.terminate() == 0
    assert _integrity(path) == "ok"
    record("kill -9", rounds=rounds, kills=len(instants), seed=seed,
           killed_at_ms_and_unanswered=instants, **totals)


# --- a full disk -------------------------------------------------------------------------------


class _SmallDisk:
    """A real small filesystem for the registry (tmpfs, mount needs root), filled and emptied
    on demand with a ballast file. Where mounting is not permitted, the equivalent real limit:
    RLIMIT_FSIZE of the msgd process, lowered and raised with prlimit(2)."""

    def __init__(self, directory: Path, size_mib: int) -> None:
        self.dir = directory
        directory.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs",
                               str(directory)], capture_output=True, text=True)
        self.mounted = done.returncode == 0
        self.kind = f"tmpfs of {size_mib} MiB" if self.mounted else "RLIMIT_FSIZE (prlimit)"
        self.pid = 0

    def fill(self) -> None:
        if not self.mounted:
            size = max(f.stat().st_size for f in self.dir.iterdir())
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
            return
        with open(self.dir / "ballast", "wb", buffering=0) as fh:
            for chunk in (1 << 20, 1 << 12, 1 << 9):
                try:
                    while True:
                        fh.write(bytes(chunk))
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        assert shutil.disk_usage(self.dir).free < 64 * 1024

    def empty(self) -> None:
        if not self.mounted:
            resource.prlimit(self.pid, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            return
        (self.dir / "ballast").unlink()

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.dir)], check=False)


async def test_disk_full_during_a_bulk_fails_entries_and_recovers(tmp_path, pki):
    disk = _SmallDisk(tmp_path / "disk", 32)
    try:
        dep = make_deployment(tmp_path / "full", pki, gateways=(Gw(GW),))
        text = dep.config_path.read_text()
        dep.config_path.write_text(text.replace('path = "registry.sqlite"',
                                                f'path = "{disk.dir}/registry.sqlite"'))
        uids = [f"d-{i:05d}@gw1.example" for i in range(6000)]
        provisioning_csv(dep.dir / "ues.csv", [(u, [GW]) for u in uids])
        child = ChildServer(dep)
        child.start()
        disk.pid = child.proc.pid
        raw = await RawGateway.open(dep, child.address, GW)
        await raw.hello()
        # One bulk of 6000: 2000 entries, then the disk fills, 2000 more, then space
        # returns, 2000 more. The sender pauses between the parts until their answers arrive.
        parts = {2000: asyncio.Event(), 4000: asyncio.Event()}
        answers: list = []

        def on_answer(index: int, entry) -> None:
            answers.append(entry)
            if index == 1999:
                disk.fill()
                parts[2000].set()
            elif index == 3999:
                disk.empty()
                parts[4000].set()

        got, error = await stream_bulk(raw, BULK_REG, 2, uids, _reg_entry(raw.nonce),
                                       pauses=parts, on_answer=on_answer)
        assert error is None and len(got) == 6000
        first, full, after = got[:2000], got[2000:4000], got[4000:]
        assert all(e.result == 0 for e in first)
        causes = {e.failure_cause for e in full}
        # Every entry decided while the disk was full failed as STORAGE_FAILURE (a commit
        # that still found room in the WAL may have succeeded).
        assert causes <= {FailureCause.STORAGE_FAILURE, None}
        assert FailureCause.STORAGE_FAILURE in causes
        assert all(e.result == 0 for e in after), "msgd did not recover by itself"
        assert child.proc.poll() is None, "msgd died on a full disk"
        # The session survived; a single registration works too.
        await wait_for_log(child, "registry.commit_failed")
        raw.writer.transport.abort()
        async with await connect(dep, child.address, GW) as gw:
            from msgd.gateway import GatewayUe

            result = await gw.register(GatewayUe(uids[2000], KEY))
            assert result.ok
        # Every success is durable: kill -9, then look.
        child.kill9()
        path = disk.dir / "registry.sqlite"
        copy = _crash_copy(path, tmp_path / "crash")
        assert _integrity(copy) == "ok"
        acked = [e.ue_service_id for e in got if e.result == 0] + [uids[2000]]
        registry = Registry.open(copy)
        try:
            assert [u for u in acked if registry.registration(u) is None] == []
        finally:
            registry.close_sync()
        assert_clean_log(child)
        failed = sum(e.failure_cause == FailureCause.STORAGE_FAILURE for e in full)
        record("disk full", limit=disk.kind, entries=6000, storage_failure=failed,
               ok_while_full=2000 - failed, ok_after_space_returned=len(after), lost=0)
    finally:
        disk.close()


# --- a damaged registry file at start --------------------------------------------------------


def _msgd(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "msgd", "--config", str(config)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def _fingerprint(directory: Path) -> dict[str, str]:
    """The registry file and its WAL, by content. SQLite's -shm is a scratch index rebuilt
    from the WAL, and an empty WAL holds nothing: a read-only open of a WAL-mode file may
    create both, and neither changes what the file holds."""
    found = {}
    for path in sorted(directory.glob("registry.sqlite*")):
        if path.name.endswith((".lock", "-shm")):
            continue
        data = path.read_bytes()
        if path.name.endswith("-wal") and not data:
            continue
        found[path.name] = hashlib.sha256(data).hexdigest()
    return found


async def test_damaged_registry_file_refused_with_exit_3_and_left_untouched(tmp_path, pki):
    dep = make_deployment(tmp_path / "good", pki, gateways=(Gw(GW),))
    uids = [f"r-{i:05d}@gw1.example" for i in range(3000)]
    provisioning_csv(dep.dir / "ues.csv", [(u, [GW]) for u in uids])
    child = ChildServer(dep)
    child.start()
    raw = await RawGateway.open(dep, child.address, GW)
    await raw.hello()
    got, _error = await stream_bulk(raw, BULK_REG, 2, uids, _reg_entry(raw.nonce))
    assert len(got) == 3000
    raw.close()
    assert child.terminate() == 0
    good = dep.config().registry.path.read_bytes()
    rng = random.Random(7)
    page = 4096
    middle = (len(good) // page // 2) * page
    damages = {
        "truncated to half": good[: len(good) // 2],
        "truncated to 100 octets": good[:100],
        "a page of random octets": good[:middle] + rng.randbytes(page) + good[middle + page:],
        "header overwritten": b"\0" * 100 + good[100:],
        "random file": rng.randbytes(len(good)),
    }
    refused = {}
    for name, data in damages.items():
        case = tmp_path / name.replace(" ", "-")
        shutil.copytree(dep.dir, case)
        for stale in case.glob("registry.sqlite*"):
            stale.unlink()
        (case / "registry.sqlite").write_bytes(data)
        before = _fingerprint(case)
        done = _msgd(case / "msgd.toml")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 3, (name, done.returncode, done.stderr)
        assert len(lines) == 1 and lines[0].startswith("msgd: registry "), (name, lines)
        assert "refusing to start" in lines[0] and str(case) in lines[0]
        assert _fingerprint(case) == before, f"{name}: the file was changed"
        refused[name] = lines[0].split("(")[0].strip()[-60:]
    record("damaged registry", cases=len(damages), exit_code=3, files_changed=0)


# --- an unreadable provisioning file on SIGHUP ---------------------------------------------------


async def test_unreadable_provisioning_on_sighup_keeps_the_old(tmp_path, pki):
    dep = make_deployment(tmp_path / "hup", pki, gateways=(Gw(GW),))
    old = [f"old-{i}@gw1.example" for i in range(10)]
    csv = dep.dir / "ues.csv"
    provisioning_csv(csv, [(u, [GW]) for u in old])
    child = ChildServer(dep)
    child.start()
    from msgd.gateway import GatewayUe

    try:
        async with await connect(dep, child.address, GW) as gw:
            good_rows = "ue_service_id,key,gateways\n" + "".join(
                f"new-{i}@gw1.example,{KEY.hex()},{GW}\n" for i in range(4))
            variants = {
                "a directory": None,
                "binary garbage": os.urandom(4096),
                "not UTF-8": b"ue_service_id,key,gateways\n\xff\xfe\xfd,00,gw1.example\n",
                "a bad key on line 4": (good_rows.splitlines(keepends=True)[0] + "".join(
                    good_rows.splitlines(keepends=True)[1:3])
                    + f"bad@gw1.example,zz,{GW}\n").encode(),
                "truncated mid-row": good_rows.encode()[:-30],
            }
            failed = 0
            for n, (name, content) in enumerate(variants.items()):
                csv.unlink() if csv.is_file() else shutil.rmtree(csv)
                if content is None:
                    csv.mkdir()
                else:
                    csv.write_bytes(content)
                offset = len(child.log_text())
                child.proc.send_signal(signal.SIGHUP)
                await wait_for_log(child, "event=reload.failed", after=offset)
                failed += 1
                # The old provisioning is in force: old UEs register, rows of the bad file
                # that parsed before the error were not applied.
                uid = old[n]
                assert (await gw.register(GatewayUe(uid, KEY))).ok, name
                rejected = await gw.register(GatewayUe("new-0@gw1.example", KEY))
                assert rejected.cause == FailureCause.UE_NOT_PROVISIONED, name
            # A good file is taken again at the next SIGHUP.
            if csv.is_dir():
                shutil.rmtree(csv)
            csv.write_text(good_rows)
            offset = len(child.log_text())
            child.proc.send_signal(signal.SIGHUP)
            await wait_for_log(child, "event=reload.provisioning", after=offset)
            assert (await gw.register(GatewayUe("new-0@gw1.example", KEY))).ok
        assert_clean_log(child)
    finally:
        assert child.terminate() == 0
    record("unreadable provisioning on SIGHUP", variants=len(variants), reloads_refused=failed,
           old_provisioning_kept=True)


@pytest.fixture(autouse=True)
def _no_leftover_mounts(tmp_path):
    yield
    with open("/proc/mounts") as fh:
        assert str(tmp_path) not in fh.read(), "a test left a filesystem mounted"
