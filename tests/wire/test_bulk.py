"""wire/bulk.py: the layout of bulk messages, the reader and the writer (wire-v1 §5)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.wire.helpers import Pair, split_frames
from tests.wire.strategies import registration_entries
from wire.bulk import BULK_SPECS, BulkReader, BulkWriter, bulk_header_ies
from wire.constants import IEI, MessageType
from wire.errors import InvalidMessage, LocalProtocolError, UnknownMandatoryIE
from wire.ies import encode_ie, split_ies
from wire.messages import (
    ENTRY_DECODERS,
    BulkMessage,
    RegistrationEntry,
    decode_frames,
    encode_bulk,
    encode_entry,
)
from wire.session import Limits

REG = MessageType.BULK_REGISTRATION_REQUEST
HEADER_IES = bulk_header_ies(REG, 3)


def _ies(n: int, size: int = 20) -> list[bytes]:
    """`n` registration entry IEs of `size` octets each."""
    return [encode_entry(RegistrationEntry(f"ue-{k}".ljust(size - 6, "x"))) for k in range(n)]


# --- the writer ------------------------------------------------------------------------------


def test_writer_packs_greedily_and_sets_more_on_all_but_the_last() -> None:
    ies = _ies(5)
    writer = BulkWriter(REG, 7, 5, max_frame_size=len(HEADER_IES) + 2 * 20)
    frames = [f for f in (writer.add(ie) for ie in ies) if f is not None]
    frames.append(writer.finish())
    parsed = split_frames(b"".join(frames))
    assert [f.more for f in parsed] == [True, True, False]
    assert all(f.transaction_id == 7 and f.message_type == REG for f in parsed)
    assert parsed[0].body == bulk_header_ies(REG, 5) + ies[0] + ies[1]
    assert [f.body for f in parsed[1:]] == [ies[2] + ies[3], ies[4]]
    assert writer.frames == 3


def test_writer_flush_cuts_what_is_queued() -> None:
    ies = _ies(2)
    writer = BulkWriter(REG, 7, 2, max_frame_size=4096)
    assert writer.add(ies[0]) is None
    first = writer.flush()
    assert first is not None
    assert writer.flush() is None  # nothing queued: no empty MORE fragment
    assert writer.add(ies[1]) is None
    parsed = split_frames(first + writer.finish())
    assert [(f.more, f.body) for f in parsed] == [(True, bulk_header_ies(REG, 2) + ies[0]),
                                                   (False, ies[1])]


def test_writer_of_no_entries_is_one_frame_of_header_ies() -> None:
    (frame,) = split_frames(BulkWriter(REG, 7, 0, 4096).finish())
    assert (frame.more, frame.body) == (False, bulk_header_ies(REG, 0))


def test_writer_refuses_an_entry_larger_than_a_frame() -> None:
    writer = BulkWriter(REG, 7, 1, max_frame_size=30)
    with pytest.raises(LocalProtocolError):
        writer.add(_ies(1, size=31)[0])
    assert writer.frames == 0


def test_writer_ends_early_with_an_empty_last_fragment_once_one_went_out() -> None:
    writer = BulkWriter(REG, 7, 3, max_frame_size=4096)
    writer.add(_ies(1)[0])
    assert writer.end_early() is None  # the peer saw nothing of this bulk: nothing to end
    writer.flush()
    writer.add(_ies(1)[0])  # queued, dropped by end_early
    (frame,) = split_frames(writer.end_early() or b"")
    assert (frame.more, frame.body) == (False, b"")


@settings(max_examples=60, deadline=None)
@given(st.lists(registration_entries, max_size=12), st.integers(2400, 6000))
def test_the_session_frames_a_bulk_as_encode_bulk_does(entries: list[Any], size: int) -> None:
    """One fragmentation: the session's outgoing bulk is the writer's, as encode_bulk's is."""
    pair = Pair(server_limits=Limits(max_frame_size=4096), gateway_limits=Limits())
    pair.handshake()
    gw = pair.gateway
    gw.peer_max_frame_size = size  # as if the server had announced it
    tid = gw.next_transaction_id()
    gw.start_bulk(REG, tid, len(entries))
    for entry in entries:
        gw.send_bulk_entry(tid, entry)
    sent = gw.data_to_send()
    expected = b"".join(encode_bulk(BulkMessage(REG, tid, len(entries), tuple(entries)),
                                    max_frame_size=size))
    assert sent == expected
    assert decode_frames(sent) == [BulkMessage(REG, tid, len(entries), tuple(entries))]


# --- the reader ------------------------------------------------------------------------------


def _reader(calls: list[bytes] | None = None) -> BulkReader:
    if calls is None:
        return BulkReader(REG, ENTRY_DECODERS)

    def decode(raw: bytes) -> Any:
        calls.append(raw)
        return ("decoded", raw)

    return BulkReader(REG, {IEI.REGISTRATION_ENTRY: decode})


def test_reader_reads_indicator_count_then_entries_with_the_decoder_it_is_given() -> None:
    calls: list[bytes] = []
    reader = _reader(calls)
    reader.start_frame(first=True)
    items = [reader.feed_ie(i, v) for i, v in split_ies(HEADER_IES + b"".join(_ies(2)))]
    assert items[0] is None and items[1] == ("count", 3)
    assert [item[1][0] for item in items[2:]] == ["decoded", "decoded"]  # type: ignore[index]
    assert calls == [ie[3:] for ie in _ies(2)]
    reader.end_frame()
    reader.start_frame(first=False)
    assert reader.feed_ie(IEI.REGISTRATION_ENTRY, b"x") == ("entry", ("decoded", b"x"))
    assert reader.entries == 3


def test_reader_decodes_real_entries() -> None:
    reader = _reader()
    reader.start_frame(first=True)
    ies = split_ies(HEADER_IES + _ies(1)[0])
    reader.feed_ie(*ies[0])
    reader.feed_ie(*ies[1])
    assert reader.feed_ie(*ies[2]) == ("entry", RegistrationEntry("ue-0".ljust(14, "x")))


def test_reader_skips_an_unknown_optional_ie_and_refuses_a_mandatory_one() -> None:
    reader = _reader()
    reader.start_frame(first=True)
    assert reader.feed_ie(0x7F, b"?") is None
    with pytest.raises(UnknownMandatoryIE):
        reader.feed_ie(0xFF, b"?")


@pytest.mark.parametrize("first, ies", [
    (False, HEADER_IES),  # the indicator only opens the first fragment
    (True, encode_ie(IEI.NUMBER_OF_INDIVIDUAL_ENTRIES, bytes(4))),  # the number before it
    (True, HEADER_IES + HEADER_IES[:4]),  # a second indicator
    (True, _ies(1)[0]),  # an entry before the number
], ids=["indicator-later", "number-first", "indicator-twice", "entry-first"])
def test_reader_refuses_ies_out_of_place(first: bool, ies: bytes) -> None:
    reader = _reader()
    reader.start_frame(first=first)
    with pytest.raises(InvalidMessage):
        for iei, value in split_ies(ies):
            reader.feed_ie(iei, value)


def test_reader_refuses_a_first_fragment_without_its_number() -> None:
    reader = _reader()
    reader.start_frame(first=True)
    reader.feed_ie(*split_ies(HEADER_IES)[0])
    with pytest.raises(InvalidMessage):
        reader.end_frame()


def test_every_bulk_message_type_has_a_layout() -> None:
    from wire.constants import BULK_MESSAGES, MessageType

    # v1.1's LIST RESPONSE has the bulk layout without an indicator (docs/protocol.md §6.2).
    assert set(BULK_SPECS) == BULK_MESSAGES | {MessageType.LIST_RESPONSE}
    for mtype, spec in BULK_SPECS.items():
        assert BulkReader(mtype, ENTRY_DECODERS).entry_iei == spec.entry


def test_the_package_exports_what_frames_a_bulk_without_a_session() -> None:
    import wire

    assert len(set(wire.__all__)) == len(wire.__all__)
    assert all(hasattr(wire, name) for name in wire.__all__)
    assert {"BulkReader", "BulkWriter", "ENTRY_DECODERS", "TxnState"} <= set(wire.__all__)
    reader = wire.BulkReader(REG, wire.ENTRY_DECODERS)
    assert reader.decode_entry(_ies(1)[0][3:]) == RegistrationEntry("ue-0".ljust(14, "x"))
