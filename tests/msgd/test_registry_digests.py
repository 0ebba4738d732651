"""wire v1.1 sync reads of the SQLite registry (msgd/registry/digests.py): durable state only,
a takeover in both gateways' digests, a failed commit never seen, digests kept only for the
gateways that read them, and a build from the state equal to the digests kept incrementally.
Real SQLite files."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from msgd.errors import RegistryError
from msgd.registry.digests import KEEP_IDLE_S, DurableDigests
from msgd.registry.store import Registry
from wire.sync import digests_of, ue_hash


def _expected(ues: dict[str, bytes | None], bits: int = 12) -> bytes:
    return digests_of(((u.encode(), p) for u, p in ues.items()), bits)


async def test_reads_show_durable_state_only(tmp_path: Path) -> None:
    reg = Registry.open(tmp_path / "r.sqlite")
    reg.start(asyncio.get_running_loop())
    try:
        await reg.wait_durable(reg.submit_register("a", "gw1", None))
        assert await reg.sync_digests("gw1", 12) == _expected({"a": None})
        seq = reg.submit_register("b", "gw1", b"\x30\x00\x01\x01")
        reg.submit_deregister("a")
        # Same turn: neither change is durable, so neither is in a LIST or a DIGEST.
        assert await reg.sync_list("gw1", 0, (0,)) == [("a", ue_hash(b"a", None))]
        assert reg._digests.digests("gw1", 4) == _expected({"a": None}, 4)
        await reg.wait_durable(seq + 1)
        assert await reg.sync_list("gw1", 0, (0,)) == [("b", ue_hash(b"b", b"\x30\x00\x01\x01"))]
        assert await reg.sync_digests("gw1", 3) == _expected({"b": b"\x30\x00\x01\x01"}, 3)
        # Takeover: b leaves gw1's digest and enters gw2's.
        await reg.wait_durable(reg.submit_register("b", "gw2", None))
        assert await reg.sync_digests("gw1", 12) == bytes(16 * 4096)
        assert await reg.sync_digests("gw2", 12) == _expected({"b": None})
        assert await reg.sync_list("gw1", 12, tuple(range(4096))) == []
    finally:
        await reg.close()


async def test_a_failed_commit_never_reaches_the_digests(tmp_path: Path) -> None:
    reg = Registry.open(tmp_path / "r.sqlite")
    reg.start(asyncio.get_running_loop())
    try:
        await reg.wait_durable(reg.submit_register("keep", "gw1", None))
        before = await reg.sync_digests("gw1", 12)
        reg._debug_set_max_page_count(None)
        big = bytes(range(256)) * 32
        last = [reg.submit_register(f"ue-{n}", "gw1", big) for n in range(20)][-1]
        with pytest.raises(RegistryError):
            await reg.wait_durable(last)
        assert await reg.sync_digests("gw1", 12) == before
        assert await reg.sync_list("gw1", 0, (0,)) == [("keep", ue_hash(b"keep", None))]
    finally:
        reg._debug_set_max_page_count(1 << 30)
        await reg.close()


async def test_a_build_equals_the_kept_digests(tmp_path: Path) -> None:
    """Digests built at a first read (after a restart, or once dropped as idle) equal the ones
    kept change by change."""
    path = tmp_path / "r.sqlite"
    reg = Registry.open(path)
    reg.start(asyncio.get_running_loop())
    ues = {f"ue-{n}": (None if n % 2 else bytes([0x30, 0, 1, 1 + n % 2])) for n in range(300)}
    try:
        assert await reg.sync_digests("gw1", 12) == bytes(16 * 4096)  # kept from here on
        for uid, profile in ues.items():
            reg.submit_register(uid, "gw1", profile)
        await reg.wait_durable(reg.submit_deregister("ue-0"))
        del ues["ue-0"]
        kept = await reg.sync_digests("gw1", 12)
        assert reg._digests.forget_idle(time.monotonic() + KEEP_IDLE_S) == ["gw1"]
        assert not reg._digests.keeps("gw1")
        assert await reg.sync_digests("gw1", 12) == kept  # built again
    finally:
        await reg.close()
    assert kept == _expected(ues)
    reopened = Registry.open(path)
    reopened.start(asyncio.get_running_loop())
    try:
        assert await reopened.sync_digests("gw1", 12) == kept
        assert sorted(await reopened.sync_list("gw1", 1, (0, 1))) == sorted(
            (u, ue_hash(u.encode(), p)) for u, p in ues.items())
    finally:
        await reopened.close()


async def test_no_gateway_read_no_hashing(tmp_path: Path, caplog) -> None:
    """Until a gateway's first sync read, its changes cost nothing here; the read builds its
    digests from the durable state, changes not yet durable left out."""
    caplog.set_level("INFO", logger="msgd.registry")
    reg = Registry.open(tmp_path / "r.sqlite")
    reg.start(asyncio.get_running_loop())
    try:
        await reg.wait_durable([reg.submit_register(f"ue-{n}", "gw1", None)
                                for n in range(100)][-1])
        await reg.wait_durable(reg.submit_register("ue-0", "gw2", None))  # taken over
        assert reg._digests.pending_count == 0
        assert not reg._digests.keeps("gw1") and not reg._digests.keeps("gw2")
        # Not durable when the read begins: ue-1 is still there, ue-new not yet.
        reg.submit_deregister("ue-1")
        reg.submit_register("ue-new", "gw1", None)
        assert await reg.sync_digests("gw1", 12) == _expected(
            {f"ue-{n}": None for n in range(1, 100)})
        assert reg._digests.keeps("gw1") and not reg._digests.keeps("gw2")
        built = [r.getMessage() for r in caplog.records if "sync digests of" in r.getMessage()]
        assert len(built) == 1
        assert built[0].startswith("registry: sync digests of gw1 built (99 UEs")
    finally:
        await reg.close()


async def test_durable_changes_are_hashed_when_too_many_wait(tmp_path: Path, monkeypatch) -> None:
    """Durable changes of a kept gateway wait to be hashed (the per-change path stays a list
    append) until a sync read or PENDING_CAP of them; then a slice per loop turn hashes them."""
    from msgd.registry import digests

    monkeypatch.setattr(digests, "PENDING_CAP", 10)
    reg = Registry.open(tmp_path / "r.sqlite")
    reg.start(asyncio.get_running_loop())
    try:
        await reg.sync_digests("gw1", 12)
        ues = {f"ue-{n}": None for n in range(50)}
        seqs = [reg.submit_register(uid, "gw1", None) for uid in ues]
        await reg.wait_durable(seqs[-1])
        deadline = asyncio.get_running_loop().time() + 10.0
        while reg._digests._pending:  # bounded poll of an observable condition
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.01)
        assert reg._digests.digests("gw1", 12) == _expected(ues)
    finally:
        await reg.close()


def _hashed(digests: DurableDigests) -> None:
    while not digests.apply_pending(2):
        pass


def test_a_build_is_hashed_before_the_changes_deferred_meanwhile() -> None:
    """A UE taken over from a gateway while its digests are being built leaves them: the
    build goes first (the other way round, the build would put the UE back)."""
    digests = DurableDigests()
    digests.keep("gw1", [(f"ue-{n}", "gw1") for n in range(5)])
    digests.defer([("ue-0", "gw2", "gw1")])
    _hashed(digests)
    assert digests.digests("gw1", 12) == _expected({f"ue-{n}": None for n in range(1, 5)})
    assert sorted(digests.members("gw1", 0, [0])) == [f"ue-{n}" for n in range(1, 5)]


def test_changes_before_a_keep_are_in_its_build_and_those_after_are_applied() -> None:
    digests = DurableDigests()
    digests.defer([("ue-0", "gw1", None)])
    assert digests.pending_count == 0  # nothing kept: nothing to hash, nothing held
    digests.keep("gw2", [])
    digests.defer([("ue-1", "gw1", None)])  # durable before gw1 is kept: in its build ...
    digests.keep("gw1", [("ue-0", "gw1"), ("ue-1", "gw1")])
    digests.defer([("ue-2", "gw1", None), ("ue-1", "gw2", "gw1")])  # ... these after it
    _hashed(digests)
    assert digests.digests("gw1", 12) == _expected({"ue-0": None, "ue-2": None})
    assert digests.digests("gw2", 12) == _expected({"ue-1": None})


def test_idle_digests_are_dropped() -> None:
    digests = DurableDigests()
    digests.keep("gw1", [("ue-0", "gw1")])
    digests.read("gw1", 100.0)
    digests.keep("gw2", [])
    digests.read("gw2", 100.0 + KEEP_IDLE_S / 2)
    _hashed(digests)
    assert digests.forget_idle(100.0 + KEEP_IDLE_S - 1) == []
    assert digests.forget_idle(100.0 + KEEP_IDLE_S) == ["gw1"]
    assert not digests.keeps("gw1") and digests.keeps("gw2")
    digests.defer([("ue-1", "gw1", None)])  # gw1 is not kept: its changes are skipped
    _hashed(digests)
    assert not digests.keeps("gw1")
    assert digests.digests("gw1", 12) == bytes(16 * 4096)


def test_a_slice_of_pending_changes_is_bounded_within_a_completion() -> None:
    """apply_pending hashes at most `limit` changes per call, even out of one completion of
    many (a loop turn stays short: tens of thousands of changes can share one commit)."""
    digests = DurableDigests()
    digests.keep("gw1", [])
    assert digests.apply_pending() is True
    ops = [(f"ue-{n}", "gw1", None) for n in range(12)]
    digests.defer(ops)
    left = []
    for _ in range(3):
        done = digests.apply_pending(5)
        left.append((digests.pending_count, done))
    assert left == [(7, False), (2, False), (0, True)]
    assert digests.digests("gw1", 12) == _expected({f"ue-{n}": None for n in range(12)})


async def test_the_members_are_out_of_the_cyclic_gcs_reach(tmp_path: Path) -> None:
    """Each bucket's members are kept where the cyclic GC never looks (a dict of strings, not
    a set): a full collection would otherwise walk every registered UE's entry."""
    import gc

    reg = Registry.open(tmp_path / "r.sqlite")
    reg.start(asyncio.get_running_loop())
    try:
        await reg.wait_durable([reg.submit_register(f"ue-{n}", "gw1", None)
                                for n in range(300)][-1])
        await reg.sync_digests("gw1", 12)
        buckets = reg._digests._members["gw1"]
        assert sum(map(len, buckets)) == 300
        gc.collect()
        assert not any(gc.is_tracked(bucket) for bucket in buckets)
    finally:
        await reg.close()
