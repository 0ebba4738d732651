"""The packed provisioning index answers exactly as a dict of the same UEs would.

The layout's hazards are matches that are not a whole id: an id that begins another (the
longer one's next octet looks like a record index), one that ends another, one that runs into
the record index after the id, and the octets of K_ue before the ids. Buckets are forced small
so that many ids share one, and past 255 so that the overflow is used.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from msgd.registry.packed_index import PackedIndex, PackedIndexBuilder

SETS = [frozenset({"gw-a"}), frozenset({"gw-a", "gw-b"}), frozenset({"gw-c"})]


def build(ids: list[str], buckets: int | None = None) -> tuple[PackedIndex, dict]:
    builder = PackedIndexBuilder(len(ids), buckets=buckets)
    expected = {}
    for number, uid in enumerate(ids):
        key = os.urandom(32)
        builder.add(uid, key, number % len(SETS))
        expected[uid] = (key, SETS[number % len(SETS)])
    return builder.finish(SETS), expected


def neighbours(uid: str) -> list[str]:
    """Strings that share octets with uid without being it."""
    out = [uid[:-1], uid[1:], uid + "a", "a" + uid, uid + "\x00", uid + uid]
    # The octet after an id in its bucket is its record index (0..254): as a character
    # appended to the id, each could be mistaken for one.
    out += [uid + chr(index) for index in range(0, 128, 7)]
    return out


def check(index: PackedIndex, expected: dict) -> None:
    assert len(index) == len(expected)
    for uid, value in expected.items():
        assert index.get(uid) == value, uid
    for uid in expected:
        for other in neighbours(uid):
            assert index.get(other) == expected.get(other), (uid, other)


@pytest.mark.parametrize("buckets", [1, 2, 64, None])
def test_prefixes_suffixes_and_record_indexes_are_not_ids(buckets: int | None) -> None:
    ids = ["a", "ab", "abc", "b", "bc", "ab\x01", "ab\x02c", "xab", "\u00e9t\u00e9",
           "\u00e9", "\U0001f600", "ue-1@gw", "ue-1@gw.example", "ue-10@gw"]
    ids += [f"ue-{i}" for i in range(200)]
    index, expected = build(ids, buckets)
    check(index, expected)


def test_one_bucket_past_255_ids_uses_the_overflow() -> None:
    ids = [f"ue-{i:04d}" for i in range(600)]
    index, expected = build(ids, buckets=1)
    assert len(index._overflow) == 600 - 255
    check(index, expected)


def test_ids_the_buckets_cannot_hold_are_found_in_the_overflow() -> None:
    ids = ["", "lone-\ud800-surrogate", "ue-1", "ue-2"]
    index, expected = build(ids, buckets=1)
    assert set(index._overflow) == {"", "lone-\ud800-surrogate"}
    check(index, expected)
    assert build(["ue-1"], buckets=1)[0].get("") is None
    assert build(["ue-1"], buckets=1)[0].get("\ud800") is None


def test_empty_index_and_empty_buckets_find_nothing() -> None:
    index, _ = build([])
    assert len(index) == 0
    assert index.get("ue-1") is None
    index, expected = build(["ue-1"], buckets=256)  # 255 empty buckets
    check(index, expected)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="power of two"):
        PackedIndexBuilder(10, buckets=3)
    with pytest.raises(ValueError, match="32 octets"):
        PackedIndexBuilder(1).add("ue", bytes(31), 0)
    with pytest.raises(ValueError, match="u16"):
        PackedIndexBuilder(1).add("ue", bytes(32), 1 << 16)


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.text(min_size=0, max_size=12), unique=True, max_size=60),
       buckets=st.sampled_from([1, 2, 8, None]))
def test_answers_as_a_dict_would(ids: list[str], buckets: int | None) -> None:
    index, expected = build(ids, buckets)
    check(index, expected)


def test_octets_of_k_ue_are_never_read_as_an_id() -> None:
    """Records come before the ids; a key holding 0xFF, an id and a record index is a key."""
    builder = PackedIndexBuilder(1, buckets=1)
    builder.add("x", (b"\xffab\x00\xff" * 7)[:32], 0)
    index = builder.finish(SETS)
    assert index.get("ab") is None
    assert index.get("x") == ((b"\xffab\x00\xff" * 7)[:32], SETS[0])
