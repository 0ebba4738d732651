"""Session(batch_entries=True): BulkEntriesReceived carries exactly the entries, in the same
order and with the same errors, that BulkEntryReceived hands out one at a time, whatever the
chunking of the octets; only the grouping differs (issue 12, the server's batch path)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.wire.helpers import NONCE, bulk_frame, normalize, reg_entry
from wire.constants import IEI, MessageType
from wire.events import NEED_DATA, BulkEntriesReceived, BulkEntryReceived, HelloReceived
from wire.ies import encode_ie
from wire.messages import Hello, encode_message
from wire.session import ENTRIES_PER_EVENT, Role, Session

BULK = MessageType.BULK_REGISTRATION_REQUEST
HELLO = encode_message(Hello(1, 2, node_name="gw1"))


def _stream() -> bytes:
    """Two bulks: the first in three fragments with a malformed entry (a UE Service ID with a
    control character), an unknown optional IE between entries (it breaks a run), and a
    single request between its fragments; a bulk whose last entry runs past its frame; one that
    announces 2 and carries 3."""
    good = [reg_entry(f"ue-{i}@gw1") for i in range(700)]
    bad = reg_entry(b"ue-\x01-bad")
    skipped = encode_ie(0x7E, b"xyz")  # unknown, comprehension not required: skipped
    first = bulk_frame(BULK, 5, [*good[:300], bad, *good[300:310]], count=900, more=True)
    second = bulk_frame(BULK, 5, [*good[310:400], skipped, *good[400:600]], first=False,
                        more=True)
    single = encode_message(Hello(9, 2))  # a second HELLO: INVALID_MESSAGE, session goes on
    third = bulk_frame(BULK, 5, good[600:700] + [bad] * 98, first=False)
    over = bulk_frame(BULK, 7, good[:3], count=2)
    # An entry IE whose length runs past its frame's body, the next frame's octets behind it.
    cut = bulk_frame(BULK, 11, [*good[:5], reg_entry("ue-long-one")[:-3]], count=6)
    return HELLO + first + second + single + third + cut + over


def _events(data: bytes, cuts: list[int], *, batch: bool) -> list[Any]:
    session = Session(Role.SERVER, 0.0, batch_entries=batch)
    out: list[Any] = []
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    for piece in pieces:
        session.receive_data(piece, 0.0)
        while (event := session.next_event()) is not NEED_DATA:
            if isinstance(event, HelloReceived):
                session.accept_hello(server_nonce=NONCE, bulk_allowed=True,
                                     ue_authentication_required=False)
            out.append(event)
    out.append(session.data_to_send())
    return out


def _flat(events: list[Any]) -> list[Any]:
    """BulkEntriesReceived spelled out as the BulkEntryReceived events it stands for."""
    flat: list[Any] = []
    for event in events:
        if isinstance(event, BulkEntriesReceived):
            assert 1 <= len(event.entries) <= ENTRIES_PER_EVENT
            for offset, entry in enumerate(event.entries):
                index = event.first_index + offset
                if isinstance(entry, Exception):
                    flat.append(("entry", event.transaction_id, index, None, str(entry)))
                else:
                    flat.append(("entry", event.transaction_id, index, entry, None))
        elif isinstance(event, BulkEntryReceived):
            error = None if event.error is None else str(event.error)
            flat.append(("entry", event.transaction_id, event.index, event.entry, error))
        else:
            flat.append(normalize(event))
    return flat


def test_whole_stream_in_one_read() -> None:
    data = _stream()
    one_by_one = _events(data, [], batch=False)
    batched = _events(data, [], batch=True)
    assert _flat(batched) == _flat(one_by_one)
    runs = [e for e in batched if isinstance(e, BulkEntriesReceived)]
    # Far fewer events than entries: runs stop at the skipped IE, frame ends and the count.
    entries = sum(len(e.entries) for e in runs)
    assert entries == 700 + 1 + 98 + 5 + 2 and len(runs) < 15


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_chunking(data: st.DataObject) -> None:
    stream = _stream()
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=40)))
    assert _flat(_events(stream, cuts, batch=True)) == _flat(_events(stream, [], batch=False))


def test_octet_by_octet() -> None:
    stream = _stream()[: len(HELLO) + 2000]
    cuts = list(range(1, len(stream)))
    batched = _events(stream, cuts, batch=True)
    assert _flat(batched) == _flat(_events(stream, [], batch=False))
    # Fed one octet at a time, an entry is complete alone: one per event.
    assert all(len(e.entries) == 1 for e in batched if isinstance(e, BulkEntriesReceived))


def test_a_run_stops_at_the_announced_count_and_the_frame_end() -> None:
    entries = [reg_entry(f"ue-{i}") for i in range(ENTRIES_PER_EVENT + 10)]
    data = HELLO + bulk_frame(BULK, 3, entries, count=len(entries))
    runs = [e for e in _events(data, [], batch=True) if isinstance(e, BulkEntriesReceived)]
    assert [len(e.entries) for e in runs] == [ENTRIES_PER_EVENT, 10]
    assert [e.first_index for e in runs] == [0, ENTRIES_PER_EVENT]
    assert runs[1].entries[-1].ue_service_id == f"ue-{ENTRIES_PER_EVENT + 9}"
    assert IEI.REGISTRATION_ENTRY  # the entries above are Registration entries


def _server_with_entries(n: int) -> tuple[Session, int]:
    session = Session(Role.SERVER, 0.0, batch_entries=True)
    entries = [reg_entry(f"ue-{i}") for i in range(n)]
    session.receive_data(HELLO + bulk_frame(BULK, 4, entries, count=n), 0.0)
    while (event := session.next_event()) is not NEED_DATA:
        if isinstance(event, HelloReceived):
            session.accept_hello(server_nonce=NONCE, bulk_allowed=True,
                                 ue_authentication_required=False)
    session.data_to_send()
    return session, 4


def test_send_bulk_entries_is_send_bulk_entry_in_a_loop() -> None:
    from wire.messages import RegistrationResponseEntry

    answers = [RegistrationResponseEntry(f"ue-{i}", 0 if i % 3 else 1, None if i % 3 else 6)
               for i in range(2000)]
    one, tid = _server_with_entries(2000)
    for answer in answers:
        assert one.send_bulk_entry(tid, answer)
    many, _ = _server_with_entries(2000)
    assert many.send_bulk_entries(tid, answers[:700])
    assert many.send_bulk_entries(tid, answers[700:])
    assert many.data_to_send() == one.data_to_send()  # same frames, MORE flags, last fragment
    assert many.in_progress() == one.in_progress() == []


def test_send_bulk_entries_refuses_more_than_were_received() -> None:
    import pytest

    from wire.errors import LocalProtocolError
    from wire.messages import RegistrationResponseEntry

    session, tid = _server_with_entries(3)
    with pytest.raises(LocalProtocolError):
        session.send_bulk_entries(tid, [RegistrationResponseEntry(f"ue-{i}", 0) for i in range(4)])
    assert session.send_bulk_entries(tid, [RegistrationResponseEntry(f"ue-{i}", 0)
                                           for i in range(3)])


def test_send_bulk_results_is_send_bulk_entries_without_the_objects() -> None:
    from wire.messages import RegistrationResponseEntry

    # Successes, failures, a Retry after (the slow path) and a long UE Service ID.
    results = [(f"ue-{i}" + "x" * (i % 200), None if i % 3 else 6, 700 if i % 97 == 0 else None)
               for i in range(2000)]
    results = [(uid, 10 if retry else cause, retry) for uid, cause, retry in results]
    entries = [RegistrationResponseEntry(uid, 0 if cause is None else 1, cause, retry)
               for uid, cause, retry in results]
    objects, tid = _server_with_entries(2000)
    assert objects.send_bulk_entries(tid, entries)
    tuples, _ = _server_with_entries(2000)
    assert tuples.send_bulk_results(tid, results[:1234])
    assert tuples.send_bulk_results(tid, results[1234:])
    assert tuples.data_to_send() == objects.data_to_send()
    assert tuples.in_progress() == objects.in_progress() == []


def test_send_bulk_results_refuses_what_send_bulk_entries_refuses() -> None:
    import pytest

    from wire.errors import LocalProtocolError

    session, tid = _server_with_entries(3)
    with pytest.raises(LocalProtocolError):
        session.send_bulk_results(tid, [(f"ue-{i}", None, None) for i in range(4)])
    with pytest.raises(LocalProtocolError):  # a UE Service ID the wire cannot carry
        session.send_bulk_results(tid, [("", None, None)])
    assert session.send_bulk_results(tid, [(f"ue-{i}", None, None) for i in range(3)])
    assert session.send_bulk_results(tid + 2, [("ue-x", None, None)]) is False  # no such bulk
