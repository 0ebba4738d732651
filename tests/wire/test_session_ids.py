"""Sans-IO: ids in use, transactions the gateway ends, and a session ended at once
(wire-v1 §2, §4 item 6, §5 Count, §7.2), driven with bytes only."""

from __future__ import annotations

import pytest

from tests.wire.helpers import Pair, bulk_frame, drain, errors_in, reg_entry, split_frames
from wire.constants import ErrorCause, FailureCause, MessageType
from wire.errors import LocalProtocolError
from wire.events import (
    BulkEntryReceived,
    ConnectionClosed,
    RequestReceived,
    TransactionFailed,
)
from wire.frames import encode_frame
from wire.ies import encode_ie
from wire.messages import (
    Error,
    RegistrationResponseEntry,
    UeDeregistrationRequest,
    UeDeregistrationResponse,
    UeRegistrationRequest,
    UeRegistrationResponse,
    encode_message,
)


def _established() -> Pair:
    pair = Pair()
    pair.handshake()
    return pair


def test_an_id_in_use_wins_over_every_other_fault() -> None:
    pair = _established()
    sv = pair.server
    reg = MessageType.BULK_REGISTRATION_REQUEST
    sv.receive_data(bulk_frame(reg, 4, [reg_entry("a")], count=2, more=True), 0)
    assert [type(e) for e in drain(sv)][-1] is BulkEntryReceived
    for frame in (
        encode_frame(0x7E, 4, b""),  # unknown type
        encode_frame(0x7E, 4, b"", more=True),  # unknown type with MORE
        encode_frame(MessageType.UE_REGISTRATION_REQUEST, 4, b"\x01\x00"),  # malformed
        encode_frame(MessageType.UE_DEREGISTRATION_RESPONSE, 4, b""),  # wrong direction
        encode_frame(MessageType.HELLO, 4, b""),  # a second HELLO
        encode_frame(MessageType.UE_REGISTRATION_REQUEST, 4,
                     encode_ie(0x01, b"x"), more=True),  # MORE on a single request
    ):
        sv.receive_data(frame, 0)
        drain(sv)
        (error,) = errors_in(sv.data_to_send())
        assert (error.transaction_id, error.error_cause) == (
            4, ErrorCause.TRANSACTION_ID_IN_USE), frame
    assert not sv.is_closed and sv.in_progress() == [4]
    # The bulk goes on: its last fragment completes it.
    sv.receive_data(bulk_frame(reg, 4, [reg_entry("b")], first=False), 0)
    entries = [e for e in drain(sv) if isinstance(e, BulkEntryReceived)]
    assert [e.entry.ue_service_id for e in entries] == ["b"]


def test_keepalive_and_error_are_not_new_transactions() -> None:
    pair = _established()
    sv = pair.server
    sv.receive_data(encode_message(UeRegistrationRequest(6, "a")), 0)
    drain(sv)
    sv.receive_data(encode_frame(MessageType.KEEPALIVE, 6, b""), 0)
    drain(sv)
    (ack,) = split_frames(sv.data_to_send())
    assert (ack.message_type, ack.transaction_id) == (MessageType.KEEPALIVE_ACK, 6)
    assert sv.in_progress() == [6]


def test_a_gateway_error_frees_the_id_and_the_old_handle_answers_nothing() -> None:
    pair = _established()
    sv = pair.server
    sv.receive_data(encode_message(UeRegistrationRequest(5, "a")), 0)
    drain(sv)
    old = sv.transaction(5)
    sv.receive_data(encode_message(Error(5, int(ErrorCause.INTERNAL_ERROR))), 0)
    (failed,) = drain(sv)
    assert isinstance(failed, TransactionFailed) and not failed.sent
    assert sv.transaction(5) is None
    sv.receive_data(encode_message(UeDeregistrationRequest(5, "a")), 0)
    (request,) = drain(sv)
    assert isinstance(request, RequestReceived)
    new = sv.transaction(5)
    assert new is not None and new is not old
    # The answer decided for the ended registration reaches nothing.
    assert not sv.send_response(UeRegistrationResponse(5, "a", 0), old)
    assert sv.send_response(UeDeregistrationResponse(5, "a", 1, FailureCause.NOT_REGISTERED),
                            new)
    (frame,) = split_frames(sv.data_to_send())
    assert frame.message_type == MessageType.UE_DEREGISTRATION_RESPONSE


def test_send_result_answers_the_request_its_transaction_holds() -> None:
    """send_result (the server's hot path) sends what send_response would, picks the response
    type from the request, and refuses what is not a single registration or de-registration."""
    pair = _established()
    sv = pair.server
    sv.receive_data(encode_message(UeRegistrationRequest(5, "a"))
                    + encode_message(UeDeregistrationRequest(7, "b")), 0)
    drain(sv)
    old = sv.transaction(5)
    assert not sv.send_result(5, "a", None, None, object())  # not the live transaction
    assert sv.send_result(5, "a", None, None, old)
    assert sv.send_result(7, "b", int(FailureCause.NOT_REGISTERED), 500)
    assert not sv.send_result(7, "b", None)  # answered: the transaction has ended
    assert sv.data_to_send() == (
        encode_message(UeRegistrationResponse(5, "a", 0))
        + encode_message(UeDeregistrationResponse(7, "b", 1, FailureCause.NOT_REGISTERED, 500)))
    with pytest.raises(LocalProtocolError):
        pair.gateway.send_result(9, "c", None)
    sv.receive_data(bulk_frame(MessageType.BULK_REGISTRATION_REQUEST, 9, [reg_entry("c")]), 0)
    drain(sv)
    with pytest.raises(LocalProtocolError):
        sv.send_result(9, "c", None)  # a bulk is answered entry by entry


def test_bulk_answers_with_an_old_handle_are_dropped() -> None:
    pair = _established()
    sv = pair.server
    reg = MessageType.BULK_REGISTRATION_REQUEST
    sv.receive_data(bulk_frame(reg, 3, [reg_entry("a")], count=2, more=True), 0)
    drain(sv)
    old = sv.transaction(3)
    sv.receive_data(encode_message(Error(3, int(ErrorCause.INTERNAL_ERROR))), 0)
    sv.receive_data(bulk_frame(reg, 3, [reg_entry("b")]), 0)
    drain(sv)
    new = sv.transaction(3)
    assert new is not None and new is not old
    assert not sv.send_bulk_entry(3, RegistrationResponseEntry("a", 0), old)
    assert sv.send_bulk_entry(3, RegistrationResponseEntry("b", 0), new)
    (frame,) = split_frames(sv.data_to_send())
    assert frame.message_type == MessageType.BULK_REGISTRATION_RESPONSE and not frame.more


def test_terminate_ends_at_once_with_goodbye() -> None:
    pair = _established()
    sv = pair.server
    reg = MessageType.BULK_REGISTRATION_REQUEST
    # Two entries arrive; the session has parsed them but the adapter has taken none yet.
    sv.receive_data(bulk_frame(reg, 3, [reg_entry("a"), reg_entry("b")], count=5, more=True), 0)
    first = sv.next_event()
    assert first.__class__.__name__ == "BulkStarted"
    sv.terminate(ErrorCause.GATEWAY_NOT_ALLOWED, "revoked")
    events = drain(sv)
    assert [type(e) for e in events] == [ConnectionClosed]
    assert sv.is_closed and sv.in_progress() == []
    (goodbye,) = split_frames(sv.data_to_send())
    assert goodbye.message_type == MessageType.GOODBYE
    assert goodbye.decode().error_cause == ErrorCause.GATEWAY_NOT_ALLOWED
    # Nothing more is taken from the wire.
    sv.receive_data(bulk_frame(reg, 3, [reg_entry("c")], first=False), 0)
    assert drain(sv) == [] and sv.data_to_send() == b""


def test_fragments_of_a_rejected_reusing_bulk_are_dropped_and_the_id_works_again() -> None:
    """A 3-fragment bulk reusing a live single request's id: one TRANSACTION_ID_IN_USE, the
    later fragments dropped silently (item 25); once the id is free, a new bulk on it is
    served (nothing left over from the rejected one swallows it)."""
    pair = _established()
    sv = pair.server
    reg = MessageType.BULK_REGISTRATION_REQUEST
    sv.receive_data(encode_message(UeRegistrationRequest(7, "a")), 0)
    drain(sv)
    sv.receive_data(bulk_frame(reg, 7, [reg_entry("x")], count=3, more=True)
                    + bulk_frame(reg, 7, [reg_entry("y")], first=False, more=True)
                    + bulk_frame(reg, 7, [reg_entry("z")], first=False), 0)
    drain(sv)
    errors = errors_in(sv.data_to_send())
    assert [(e.transaction_id, e.error_cause) for e in errors] == [
        (7, ErrorCause.TRANSACTION_ID_IN_USE)]
    assert sv.send_response(UeRegistrationResponse(7, "a", 0), sv.transaction(7))
    sv.data_to_send()
    sv.receive_data(bulk_frame(reg, 7, [reg_entry("b")]), 0)
    events = drain(sv)
    assert [e.entry.ue_service_id for e in events if isinstance(e, BulkEntryReceived)] == ["b"]
    assert sv.in_progress() == [7]


def test_a_rejected_bulk_of_another_type_on_a_live_bulk_id_leaves_nothing_behind() -> None:
    pair = _established()
    sv = pair.server
    reg, dereg = MessageType.BULK_REGISTRATION_REQUEST, MessageType.BULK_DEREGISTRATION_REQUEST
    dereg_entry = encode_ie(0x0E, encode_ie(0x01, b"d"))
    sv.receive_data(bulk_frame(reg, 4, [reg_entry("a")], count=1, more=True), 0)
    sv.receive_data(bulk_frame(dereg, 4, [dereg_entry], count=2, more=True)
                    + bulk_frame(dereg, 4, [dereg_entry], first=False), 0)
    drain(sv)
    errors = errors_in(sv.data_to_send())
    assert [e.error_cause for e in errors] == [ErrorCause.TRANSACTION_ID_IN_USE]
    sv.receive_data(bulk_frame(reg, 4, [], first=False), 0)  # the registration bulk ends
    drain(sv)
    handle = sv.transaction(4)
    assert sv.send_bulk_entry(4, RegistrationResponseEntry("a", 0), handle)
    sv.data_to_send()
    assert sv.in_progress() == []
    sv.receive_data(bulk_frame(dereg, 4, [dereg_entry]), 0)
    events = drain(sv)
    assert [e.entry.ue_service_id for e in events if isinstance(e, BulkEntryReceived)] == ["d"]
