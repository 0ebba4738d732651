"""Provisioning: the CSV reader's checks and messages, and the registry's atomic replace."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from msgd.errors import ProvisioningError, RegistryError
from msgd.registry.provisioning import ProvisionedUe, read_provisioning_csv
from msgd.registry.provisioning_store import PROVISIONING_DIFF_MIN
from msgd.registry.store import Registry

HEADER = "ue_service_id,key,gateways\n"
KEY_A = "0123456789abcdef" * 4
KEY_B = "FEDCBA9876543210" * 4


def key_hex(i: int) -> str:
    return f"{i:064x}"


def write_csv(path: Path, body: str | bytes, header: str = HEADER) -> Path:
    data = header.encode() + (body.encode() if isinstance(body, str) else body)
    path.write_bytes(data)
    return path


@pytest.fixture
def csv_path(tmp_path: Path) -> Path:
    return tmp_path / "ues.csv"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry.open(tmp_path / "registry.sqlite")
    yield reg
    reg.close_sync()


def rows(count: int, *, gateway: str = "gw-a", start: int = 0) -> list[ProvisionedUe]:
    return [
        ProvisionedUe(f"ue-{i:08d}", bytes.fromhex(key_hex(i)), frozenset({gateway}))
        for i in range(start, start + count)
    ]


def contents(reg: Registry, ids: list[str]) -> dict[str, ProvisionedUe | None]:
    return {ue: reg.provisioned(ue) for ue in ids}


# -- reading the CSV file ----------------------------------------------------------------------


def test_reads_a_good_file(csv_path: Path) -> None:
    body = (
        f"imsi-001010000000001,{KEY_A},gw-a\n"
        "\n"  # blank lines are skipped
        f'"id,with,commas",{KEY_B},gw-a; gw-b ;gw-c\r\n'
        f"ué-☃,{KEY_A.upper()},gw-b\n"
    )
    path = write_csv(csv_path, b"\xef\xbb\xbf" + HEADER.encode() + body.encode(), header="")
    assert list(read_provisioning_csv(path)) == [
        ProvisionedUe("imsi-001010000000001", bytes.fromhex(KEY_A), frozenset({"gw-a"})),
        ProvisionedUe("id,with,commas", bytes.fromhex(KEY_B), frozenset({"gw-a", "gw-b", "gw-c"})),
        ProvisionedUe("ué-☃", bytes.fromhex(KEY_A), frozenset({"gw-b"})),
    ]


def test_id_rules_match_the_wire_codec(csv_path: Path) -> None:
    # DEL is neither C0 nor C1 (wire/ies.py accepts it), 255 octets is the maximum.
    ids = ["ue\x7fdel", "é" * 127 + "x"]
    path = write_csv(csv_path, "".join(f"{ue},{KEY_A},gw-a\n" for ue in ids))
    assert [row.ue_service_id for row in read_provisioning_csv(path)] == ids


def test_file_without_trailing_newline(csv_path: Path) -> None:
    path = write_csv(csv_path, f"ue-1,{KEY_A},gw-a\nue-2,{KEY_B},gw-b")
    assert [row.ue_service_id for row in read_provisioning_csv(path)] == ["ue-1", "ue-2"]


def test_many_rows_across_read_blocks(csv_path: Path) -> None:
    # More than one 1 MiB read block: lines split across blocks must come out whole.
    body = "".join(f"ue-{i:08d}-{'x' * (i % 50)},{key_hex(i)},gw-a\n" for i in range(20_000))
    path = write_csv(csv_path, body)
    assert path.stat().st_size > 1 << 20
    got = list(read_provisioning_csv(path))
    assert len(got) == 20_000
    assert got[12_345].ue_service_id == f"ue-{12_345:08d}-{'x' * (12_345 % 50)}"
    assert got[12_345].key == bytes.fromhex(key_hex(12_345))


GOOD = f"ue-good,{KEY_A},gw-a\n"

BAD_LINES = [
    pytest.param(f"ue-1,{KEY_B}\n", "line 3: expected 3 fields, found 2", id="too-few-fields"),
    pytest.param(f"ue-1,{KEY_B},gw-a,extra\n", "line 3: expected 3 fields, found 4", id="extra"),
    pytest.param(f",{KEY_B},gw-a\n", "line 3: ue_service_id is empty", id="empty-id"),
    pytest.param(
        f"{'é' * 128},{KEY_B},gw-a\n", "line 3: ue_service_id is 256 octets", id="id-too-long"
    ),
    pytest.param(f"ue\x01x,{KEY_B},gw-a\n", "line 3: ue_service_id contains a control", id="id-c0"),
    pytest.param(f"ue\x85x,{KEY_B},gw-a\n", "line 3: ue_service_id contains a control", id="id-c1"),
    pytest.param(f"ue-1,{KEY_B[:-1]},gw-a\n", "line 3: key must be 64 hex", id="key-short"),
    pytest.param(f"ue-1,{KEY_B}0,gw-a\n", "line 3: key must be 64 hex", id="key-long"),
    pytest.param(f"ue-1,{KEY_B[:-1]}g,gw-a\n", "line 3: key must be 64 hex", id="key-not-hex"),
    pytest.param(
        f"ue-1,{KEY_B[:30]} {KEY_B[31:]},gw-a\n", "line 3: key must be 64 hex", id="key-space"
    ),
    pytest.param(f"ue-1,{KEY_B},\n", "line 3: gateways must name at least one", id="no-gateways"),
    pytest.param(
        f"ue-1,{KEY_B},gw-a;;gw-b\n", "line 3: gateway identity is empty", id="empty-gateway"
    ),
    pytest.param(
        f"ue-1,{KEY_B},gw\x1fa\n", "line 3: gateway identity contains a control", id="gw-ctrl"
    ),
    pytest.param(f"ue-good,{KEY_B},gw-b\n", "line 3: duplicate ue_service_id", id="duplicate"),
    pytest.param(f'"ue-1,{KEY_B},gw-a\n', "line 3:", id="unterminated-quote"),
    pytest.param(
        b"ue-\xff\xfe," + KEY_B.encode() + b",gw-a\n", "line 3: not valid UTF-8", id="bad-utf8"
    ),
]


@pytest.mark.parametrize(("bad_line", "message"), BAD_LINES)
def test_bad_line_named_without_key(csv_path: Path, bad_line: str | bytes, message: str) -> None:
    body = GOOD.encode() + (bad_line if isinstance(bad_line, bytes) else bad_line.encode())
    path = write_csv(csv_path, body + f"ue-after,{KEY_A},gw-a\n".encode())
    with pytest.raises(ProvisioningError) as info:
        list(read_provisioning_csv(path))
    text = str(info.value)
    assert text.startswith(f"{path} {message}")
    assert "\n" not in text
    # Keys are secrets: no key of the file, nor a recognisable part of one, in the message.
    for key in (KEY_A, KEY_B):
        assert key[:16].lower() not in text.lower()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"", "empty file", id="empty"),
        pytest.param(b"ue_service_id,key\n", "line 1: header must be exactly", id="short-header"),
        pytest.param(b"id,key,gateways\n", "line 1: header must be exactly", id="renamed"),
    ],
)
def test_bad_header(csv_path: Path, content: bytes, message: str) -> None:
    csv_path.write_bytes(content)
    with pytest.raises(ProvisioningError, match=message):
        list(read_provisioning_csv(csv_path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProvisioningError, match="cannot open"):
        list(read_provisioning_csv(tmp_path / "absent.csv"))


def test_repr_hides_the_key() -> None:
    row = ProvisionedUe("ue-1", bytes.fromhex(KEY_A), frozenset({"gw-a"}))
    assert KEY_A[:8] not in repr(row)
    assert repr(bytes.fromhex(KEY_A))[2:10] not in repr(row)
    assert "32 octets" in repr(row)


# -- storing it: Registry.replace_provisioning and friends -------------------------------------


def test_replace_and_lookup(registry: Registry, csv_path: Path) -> None:
    path = write_csv(csv_path, f"ue-1,{KEY_A},gw-a;gw-b\nué-2,{KEY_B},gw-b\n")
    assert registry.replace_provisioning(read_provisioning_csv(path)) == 2
    assert registry.provisioned_count() == 2
    assert registry.provisioned("ue-1") == ProvisionedUe(
        "ue-1", bytes.fromhex(KEY_A), frozenset({"gw-a", "gw-b"})
    )
    assert registry.provisioned("ué-2") == ProvisionedUe(
        "ué-2", bytes.fromhex(KEY_B), frozenset({"gw-b"})
    )
    assert registry.provisioned("ue-3") is None


def test_replace_applies_a_small_diff(registry: Registry) -> None:
    registry.replace_provisioning(rows(100))
    changed = rows(100)
    changed[5] = ProvisionedUe(changed[5].ue_service_id, bytes(32), frozenset({"gw-z"}))
    del changed[7]
    changed += rows(3, start=1000)
    assert registry.replace_provisioning(changed) == 102
    assert registry.provisioned_count() == 102
    assert registry.provisioned("ue-00000005") == changed[5]
    assert registry.provisioned("ue-00000007") is None
    assert registry.provisioned("ue-00001002") == changed[-1]
    assert registry.provisioned("ue-00000050") == rows(1, start=50)[0]


def test_replace_rebuilds_on_a_large_change(registry: Registry, tmp_path: Path) -> None:
    big = PROVISIONING_DIFF_MIN * 2 + 5
    registry.replace_provisioning(rows(10))
    assert registry.replace_provisioning(rows(big, gateway="gw-new", start=5)) == big
    assert registry.provisioned_count() == big
    assert registry.provisioned("ue-00000004") is None
    assert registry.provisioned("ue-00000005") == rows(1, gateway="gw-new", start=5)[0]
    assert registry.provisioned(f"ue-{big + 4:08d}") is not None
    db = tmp_path / "registry.sqlite"
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        names = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    assert "provisioning_load" not in names
    assert not (tmp_path / "registry.sqlite.staging").exists()


class Boom(Exception):
    pass


def failing_rows(good: int) -> Iterator[ProvisionedUe]:
    yield from rows(good, gateway="gw-new")
    raise ProvisioningError("ues.csv line 99: key must be 64 hex characters")


@pytest.mark.parametrize("good", [5, PROVISIONING_DIFF_MIN * 2])
def test_replace_is_atomic(registry: Registry, good: int) -> None:
    old = rows(50)
    registry.replace_provisioning(old)
    with pytest.raises(ProvisioningError, match="line 99"):
        registry.replace_provisioning(failing_rows(good))
    assert registry.provisioned_count() == 50
    assert contents(registry, [row.ue_service_id for row in old]) == {
        row.ue_service_id: row for row in old
    }


def test_replace_rejects_duplicates_and_bad_rows(registry: Registry) -> None:
    registry.replace_provisioning(rows(3))
    with pytest.raises(ProvisioningError, match="duplicate"):
        registry.replace_provisioning(rows(3) + rows(1))
    with pytest.raises(ProvisioningError, match="key must be 32 octets"):
        registry.replace_provisioning([ProvisionedUe("ue-x", b"short", frozenset({"gw-a"}))])
    assert registry.provisioned_count() == 3
    assert registry.provisioned("ue-00000000") == rows(1)[0]


def test_bad_csv_keeps_old_provisioning(registry: Registry, csv_path: Path) -> None:
    registry.replace_provisioning(read_provisioning_csv(write_csv(csv_path, GOOD)))
    bad = "".join(f"ue-{i},{key_hex(i)},gw-a\n" for i in range(500)) + f"ue-x,{KEY_A[:9]},gw\n"
    with pytest.raises(ProvisioningError, match="line 502"):
        registry.replace_provisioning(read_provisioning_csv(write_csv(csv_path, bad)))
    assert registry.provisioned_count() == 1
    assert registry.provisioned("ue-good") is not None
    assert registry.provisioned("ue-1") is None


def test_unchanged_file_is_not_reloaded(
    registry: Registry, csv_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_csv(csv_path, f"ue-1,{KEY_A},gw-a\nue-2,{KEY_B},gw-b\n")
    registry.replace_provisioning(read_provisioning_csv(path))
    with caplog.at_level(logging.INFO, logger="msgd.registry"):
        assert registry.replace_provisioning(read_provisioning_csv(path)) == 2
    assert "UEs kept" in caplog.text
    # An admin change is part of what the stored rows follow from: the shortcut still holds,
    # and the admin's row stays.
    admin = ProvisionedUe("ue-1", bytes(32), frozenset({"gw-z"}))
    registry.provisioning.upsert_provisioned(admin)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="msgd.registry"):
        assert registry.replace_provisioning(read_provisioning_csv(path)) == 2
    assert "UEs kept" in caplog.text
    assert registry.provisioned("ue-1") == admin
    # Forgetting the change invalidates the shortcut: the file decides for ue-1 again.
    assert registry.provisioning.forget_provisioning_overrides(["ue-1", "ue-2"]) == ["ue-1"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="msgd.registry"):
        assert registry.replace_provisioning(read_provisioning_csv(path)) == 2
    assert "UEs kept" not in caplog.text
    assert registry.provisioned("ue-1") == ProvisionedUe(
        "ue-1", bytes.fromhex(KEY_A), frozenset({"gw-a"})
    )


def test_upsert_and_remove(registry: Registry) -> None:
    row = ProvisionedUe("ue-1", bytes(32), frozenset({"gw-a"}))
    registry.provisioning.upsert_provisioned(row)
    assert registry.provisioned_count() == 1
    moved = ProvisionedUe("ue-1", bytes(range(32)), frozenset({"gw-b", "gw-c"}))
    registry.provisioning.upsert_provisioned(moved)
    assert registry.provisioned_count() == 1
    assert registry.provisioned("ue-1") == moved
    with pytest.raises(ProvisioningError):
        registry.provisioning.upsert_provisioned(
            ProvisionedUe("ue-2", bytes(31), frozenset({"gw-a"})))
    with pytest.raises(ProvisioningError):
        registry.provisioning.upsert_provisioned(ProvisionedUe("ue-2", bytes(32), frozenset()))
    assert registry.provisioning.remove_provisioned("ue-1") is True
    assert registry.provisioning.remove_provisioned("ue-1") is False
    assert registry.provisioned_count() == 0
    assert registry.provisioned("ue-1") is None


def test_provisioning_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    reg = Registry.open(path)
    reg.replace_provisioning(rows(20))
    reg.provisioning.upsert_provisioned(ProvisionedUe("ue-extra", bytes(32), frozenset({"gw-b"})))
    reg.close_sync()
    reg = Registry.open(path)
    try:
        assert reg.provisioned_count() == 21
        assert reg.provisioned("ue-00000019") == rows(1, start=19)[0]
        assert reg.provisioned("ue-extra") is not None
    finally:
        reg.close_sync()
    with pytest.raises(RegistryError):
        reg.provisioned("ue-extra")


async def test_replace_runs_alongside_registrations(tmp_path: Path) -> None:
    """A large replace in a worker thread while registrations keep committing."""
    reg = Registry.open(tmp_path / "registry.sqlite")
    reg.start(asyncio.get_running_loop())
    try:
        big = PROVISIONING_DIFF_MIN * 3
        replace = asyncio.create_task(asyncio.to_thread(reg.replace_provisioning, rows(big)))
        durable_during = 0
        while not replace.done():
            seq = reg.submit_register(f"ue-{durable_during}", "gw-a", None)
            await reg.wait_durable(seq)
            durable_during += 1
        assert await replace == big
        assert reg.provisioned_count() == big
        assert durable_during > 1  # commits were not held up for the whole replace
        assert reg.registered_count() == durable_during
    finally:
        await reg.close()


# -- admin changes: one transaction, and kept over the file until forgotten --------------------


def table(path: Path) -> dict[str, ProvisionedUe]:
    """The provisioning table as a reader of the file sees it (a connection of our own)."""
    conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return {
            uid: ProvisionedUe(uid, bytes(key), frozenset(gateways.split(";")))
            for uid, key, gateways in conn.execute("SELECT * FROM provisioning")
        }
    finally:
        conn.close()


def published_index(reg: Registry):
    """The provisioning index lookups read now (None while there is none)."""
    return reg.provisioning._index.published


def settle_index(reg: Registry) -> None:
    thread = reg.provisioning._index.thread
    if thread is not None:
        thread.join(60)
        assert not thread.is_alive()


@pytest.mark.parametrize("path_taken", ["diff", "rebuild"])
def test_admin_changes_win_over_the_file_until_forgotten(tmp_path: Path, path_taken: str) -> None:
    db = tmp_path / "registry.sqlite"
    size = 100 if path_taken == "diff" else PROVISIONING_DIFF_MIN * 2 + 10
    file_rows = rows(size)
    changed = ProvisionedUe(file_rows[5].ue_service_id, bytes(32), frozenset({"gw-admin"}))
    extra = ProvisionedUe("ue-admin", bytes(range(32)), frozenset({"gw-admin"}))
    removed = file_rows[7].ue_service_id
    reg = Registry.open(db)
    try:
        # The rebuild path is taken when the stored table differs much from the new rows.
        reg.replace_provisioning(file_rows if path_taken == "diff" else rows(3, start=size))
        assert reg.provisioning.upsert_provisioned_many([changed, extra]) == (
            1 if path_taken == "diff" else 2)
        if path_taken == "rebuild":
            reg.provisioning.upsert_provisioned(file_rows[7])  # so that there is a row to remove
        assert reg.provisioning.remove_provisioned(removed) is True
        assert reg.provisioning.provisioning_overrides() == 3
        expected = {row.ue_service_id: row for row in file_rows}
        expected.update({changed.ue_service_id: changed, extra.ue_service_id: extra})
        del expected[removed]

        assert reg.replace_provisioning(file_rows) == len(expected) == size
        assert reg.provisioned_count() == size
        assert table(db) == expected
        settle_index(reg)
        assert published_index(reg) is not None
        for uid in (changed.ue_service_id, extra.ue_service_id, removed, "ue-00000006"):
            assert reg.provisioned(uid) == expected.get(uid)
    finally:
        reg.close_sync()

    # Across a restart, as the daemon starts: the same replace, the same result.
    reg = Registry.open(db)
    try:
        assert reg.provisioning.provisioning_overrides() == 3
        assert reg.replace_provisioning(file_rows) == size
        assert table(db) == expected
        # Forgotten: the next replace takes these UEs from the rows again.
        assert sorted(reg.provisioning.forget_provisioning_overrides()) == sorted(
            [changed.ue_service_id, extra.ue_service_id, removed])
        assert reg.provisioning.provisioning_overrides() == 0
        assert table(db) == expected  # nothing changes before the replace
        assert reg.replace_provisioning(file_rows) == size
        assert table(db) == {row.ue_service_id: row for row in file_rows}
        assert reg.provisioned(removed) == file_rows[7]
        assert reg.provisioned("ue-admin") is None
    finally:
        reg.close_sync()


def test_admin_removal_of_an_unprovisioned_ue_records_nothing(registry: Registry) -> None:
    registry.replace_provisioning(rows(3))
    assert registry.provisioning.remove_provisioned("ue-nobody") is False
    assert registry.provisioning.provisioning_overrides() == 0
    assert registry.provisioning.forget_provisioning_overrides(["ue-nobody"]) == []


def test_import_is_checked_whole_before_anything_is_stored(registry: Registry) -> None:
    registry.replace_provisioning(rows(3))
    new = rows(5, start=100)
    with pytest.raises(ProvisioningError, match="key must be 32 octets"):
        registry.provisioning.upsert_provisioned_many(
            [*new, ProvisionedUe("ue-bad", bytes(31), frozenset({"gw-a"}))])
    with pytest.raises(ProvisioningError, match="duplicate ue_service_id 'ue-00000100'"):
        registry.provisioning.upsert_provisioned_many([*new, new[0]])
    assert registry.provisioned_count() == 3
    assert all(registry.provisioned(row.ue_service_id) is None for row in new)
    assert registry.provisioning.provisioning_overrides() == 0


def test_import_that_fills_the_disk_stores_none_of_its_rows(tmp_path: Path) -> None:
    db = tmp_path / "registry.sqlite"
    reg = Registry.open(db)
    try:
        old = rows(50)
        reg.replace_provisioning(old)
        settle_index(reg)
        before = table(db)
        new = rows(3000, gateway="gw-new", start=1000)
        moved = ProvisionedUe(old[0].ue_service_id, bytes(32), frozenset({"gw-new"}))
        # A little room: committed one by one, the first rows would fit.
        pages = reg._debug_set_max_page_count(None)
        reg._debug_set_max_page_count(pages + 2)
        with pytest.raises(RegistryError, match="full"):
            reg.provisioning.upsert_provisioned_many([moved, *new])
        assert table(db) == before
        assert reg.provisioned_count() == 50
        assert reg.provisioning.provisioning_overrides() == 0
        assert reg.provisioned(moved.ue_service_id) == old[0]
        settle_index(reg)
        assert published_index(reg) is not None and len(published_index(reg)) == 50
        assert all(reg.provisioned(row.ue_service_id) is None for row in new[::100])

        # Space returns: the same import goes through whole.
        reg._debug_set_max_page_count(1 << 30)
        assert reg.provisioning.upsert_provisioned_many([moved, *new]) == 3000
        assert reg.provisioned_count() == 3050 == len(table(db))
        assert reg.provisioning.provisioning_overrides() == 3001
    finally:
        reg.close_sync()



def test_a_closed_registry_refuses_lookups_even_with_its_index_built(tmp_path: Path) -> None:
    """Once closed, lookups raise whether or not the in-memory index was published before:
    test_provisioning_survives_reopen failed when the builder thread won that race."""
    reg = Registry.open(tmp_path / "registry.sqlite")
    reg.replace_provisioning(rows(5))
    builder = reg.provisioning._index.thread
    if builder is not None:
        builder.join()
    assert reg.provisioning._index.published is not None  # answered from memory now
    reg.close_sync()
    with pytest.raises(RegistryError):
        reg.provisioned("ue-00000001")
