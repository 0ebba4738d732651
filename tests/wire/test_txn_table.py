"""The transaction table of wire/session.py (TxnState, TxnInput, TXN_TRANSITIONS).

Every pair outside the table raises (ours: LocalProtocolError, the peer's: a WireError), and
every pair in it is taken by a real session in one of the scenarios below, whose paths are
spelled out as the states a transaction goes through.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.wire.helpers import Pair, bulk_frame, drain, errors_in, reg_entry, split_frames
from wire.bulk import bulk_header_ies
from wire.constants import HEADER_SIZE, ErrorCause, MessageType
from wire.errors import InvalidMessage, LocalProtocolError, WireError
from wire.events import (
    BulkEnded,
    BulkEntryReceived,
    ConnectionClosed,
    ErrorReceived,
    ProtocolErrorDetected,
    ResponseReceived,
    TransactionFailed,
)
from wire.frames import encode_frame
from wire.messages import (
    Error,
    RegistrationEntry,
    RegistrationResponseEntry,
    UeRegistrationRequest,
    UeRegistrationResponse,
    encode_entry,
    encode_message,
)
from wire.session import (
    _PEER_TXN_INPUTS,
    TXN_TRANSITIONS,
    Role,
    Session,
    TxnInput,
    TxnState,
    _first_txn_state,
    next_txn_state,
)

REG, REG_RSP = MessageType.BULK_REGISTRATION_REQUEST, MessageType.BULK_REGISTRATION_RESPONSE
TID = 5  # the id of the raw bulk requests below
OOPS = ErrorCause.INTERNAL_ERROR


# --- the table as data -----------------------------------------------------------------------


@given(st.sampled_from(list(TxnState)), st.sampled_from(list(TxnInput)))
def test_every_pair_outside_the_table_raises(state: TxnState, inp: TxnInput) -> None:
    if (state, inp) in TXN_TRANSITIONS:
        assert next_txn_state(state, inp, 9) is TXN_TRANSITIONS[(state, inp)]
    elif inp in _PEER_TXN_INPUTS:
        with pytest.raises(InvalidMessage) as info:
            next_txn_state(state, inp, 9)
        assert info.value.transaction_id == 9
    else:
        with pytest.raises(LocalProtocolError):
            next_txn_state(state, inp, 9)


def test_every_pair_is_in_the_table_or_raises() -> None:
    """The same, exhaustively (Hypothesis may skip pairs)."""
    for state, inp in itertools.product(TxnState, TxnInput):
        try:
            new = next_txn_state(state, inp)
        except (LocalProtocolError, WireError):
            assert (state, inp) not in TXN_TRANSITIONS
        else:
            assert new is TXN_TRANSITIONS[(state, inp)]


def test_done_is_final_and_reached_from_every_state() -> None:
    assert not [key for key in TXN_TRANSITIONS if key[0] is TxnState.DONE]
    for start in TxnState:
        seen, todo = {start}, [start]
        while todo:
            state = todo.pop()
            for (s, _), new in TXN_TRANSITIONS.items():
                if s is state and new not in seen:
                    seen.add(new)
                    todo.append(new)
        assert TxnState.DONE in seen


def test_where_transactions_start() -> None:
    assert _first_txn_state(Role.SERVER, True) is TxnState.RECEIVING
    assert _first_txn_state(Role.SERVER, False) is TxnState.ANSWERING
    assert _first_txn_state(Role.GATEWAY, True) is TxnState.SENDING
    assert _first_txn_state(Role.GATEWAY, False) is TxnState.AWAITING


# --- every transition, taken by real sessions ------------------------------------------------

Step = tuple[Role, int, TxnState, TxnInput, TxnState]


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Step]]:
    """Every transition any session makes while the test runs."""
    seen: list[Step] = []
    real = Session._advance

    def spy(self: Session, txn: Any, inp: TxnInput) -> None:
        old = txn.state
        real(self, txn, inp)
        seen.append((self.role, txn.tid, old, inp, txn.state))

    monkeypatch.setattr(Session, "_advance", spy)
    yield seen


def path(steps: list[Step], role: Role, tid: int) -> str:
    """The states one transaction went through: "A -INPUT-> B -INPUT-> C"."""
    mine = [s for s in steps if s[0] is role and s[1] == tid]
    if not mine:
        return ""
    return mine[0][2].name + "".join(f" -{inp.name}-> {new.name}" for *_, inp, new in mine)


def _established() -> Pair:
    pair = Pair()
    pair.handshake()
    return pair


def _raw(pair: Pair, data: bytes) -> list[Any]:
    pair.server.receive_data(data, pair.now)
    return drain(pair.server)


def _answer(pair: Pair, n: int, tid: int = TID) -> None:
    for _ in range(n):
        pair.server.send_bulk_entry(tid, RegistrationResponseEntry("ue", 0))


def _first(tid: int = TID, count: int = 4) -> bytes:
    return bulk_frame(REG, tid, [reg_entry("a"), reg_entry("b")], count=count, more=True)


def _last(tid: int = TID, *, first: bool = False, count: int = 4) -> bytes:
    return bulk_frame(REG, tid, [reg_entry("c"), reg_entry("d")], count=count, first=first)


def _causes(pair: Pair) -> list[int]:
    """The causes of the ERRORs the server sends now."""
    return [e.error_cause for e in errors_in(pair.server.data_to_send())]


def _peer_error(tid: int = TID) -> bytes:
    return encode_message(Error(tid, int(OOPS)))


def single_answered(steps: list[Step]) -> dict[tuple[Role, int], str]:
    pair = _established()
    pair.gateway.send_request(UeRegistrationRequest(2, "ue-1"))
    pair.to_server()
    pair.server.send_response(UeRegistrationResponse(2, "ue-1", 0))
    assert [type(e) for e in pair.to_gateway()] == [ResponseReceived]
    return {(Role.SERVER, 2): "ANSWERING -SEND_LAST-> DONE",
            (Role.GATEWAY, 2): "AWAITING -RECV_LAST-> DONE",
            (Role.GATEWAY, 1): "AWAITING -RECV_LAST-> DONE"}  # the HELLO


def single_failed_by_the_server(steps: list[Step]) -> dict[tuple[Role, int], str]:
    pair = _established()
    pair.gateway.send_request(UeRegistrationRequest(2, "ue-1"))
    pair.to_server()
    pair.server.send_error(2, OOPS)
    pair.to_gateway()
    return {(Role.SERVER, 2): "ANSWERING -SEND_ERROR-> DONE",
            (Role.GATEWAY, 2): "AWAITING -RECV_ERROR-> DONE"}


def single_failed_by_the_gateway(steps: list[Step]) -> dict[tuple[Role, int], str]:
    pair = _established()
    pair.gateway.send_request(UeRegistrationRequest(2, "ue-1"))
    pair.gateway.send_error(2, OOPS)
    pair.to_server()
    return {(Role.GATEWAY, 2): "AWAITING -SEND_ERROR-> DONE",
            (Role.SERVER, 2): "ANSWERING -RECV_ERROR-> DONE"}


def bulk_answered(steps: list[Step]) -> dict[tuple[Role, int], str]:
    pair = _established()
    pair.gateway.start_bulk(REG, 2, 2)
    pair.gateway.send_bulk_entry(2, RegistrationEntry("a"))
    pair.gateway.send_bulk_entry(2, RegistrationEntry("b"))
    pair.to_server()
    _answer(pair, 2, tid=2)
    assert BulkEnded in [type(e) for e in pair.to_gateway()]
    return {(Role.GATEWAY, 2): "SENDING -SEND_LAST-> AWAITING -RECV_LAST-> DONE",
            (Role.SERVER, 2): "RECEIVING -RECV_LAST-> ANSWERING -SEND_LAST-> DONE"}


def bulk_too_short(steps: list[Step]) -> dict[tuple[Role, int], str]:
    pair = _established()
    _raw(pair, _last(first=True, count=3))  # 2 entries of 3: COUNT_MISMATCH at the end
    _answer(pair, 2)
    assert _causes(pair) == [ErrorCause.COUNT_MISMATCH]
    return {(Role.SERVER, TID): "RECEIVING -FAIL-> FAILED_RECEIVING -RECV_LAST-> FAILED_ANSWERING"
                                " -SEND_ERROR-> DONE"}


def failed_then_discarding(steps: list[Step]) -> dict[tuple[Role, int], str]:
    pair = _established()
    _raw(pair, _first())
    pair.server.send_error(TID, OOPS)
    _answer(pair, 2)  # the ERROR follows the answers, then the last fragment is dropped
    _raw(pair, _last())
    return {(Role.SERVER, TID): "RECEIVING -FAIL-> FAILED_RECEIVING -SEND_ERROR-> DISCARDING"
                                " -RECV_LAST-> DONE"}


def failed_while_receiving_then_complete(steps: list[Step]) -> dict[tuple[Role, int], str]:
    pair = _established()
    _raw(pair, _first())
    pair.server.send_error(TID, OOPS)
    _raw(pair, _last())
    _answer(pair, 2)
    return {(Role.SERVER, TID): "RECEIVING -FAIL-> FAILED_RECEIVING -RECV_LAST-> FAILED_ANSWERING"
                                " -SEND_ERROR-> DONE"}


def failed_while_answering(steps: list[Step]) -> dict[tuple[Role, int], str]:
    pair = _established()
    _raw(pair, _last(first=True, count=2))
    pair.server.send_error(TID, OOPS)
    _answer(pair, 2)
    return {(Role.SERVER, TID): "RECEIVING -RECV_LAST-> ANSWERING -FAIL-> FAILED_ANSWERING"
                                " -SEND_ERROR-> DONE"}


def peer_error_in_every_server_state(steps: list[Step]) -> dict[tuple[Role, int], str]:
    pair = _established()
    sv = pair.server
    # (One bulk request is received at a time; a failed one no longer counts.)
    _raw(pair, _last(13, first=True, count=2))
    sv.send_error(13, OOPS)
    _raw(pair, _first(14))
    sv.send_error(14, OOPS)
    _answer(pair, 2, tid=14)
    _raw(pair, _first(12))
    sv.send_error(12, OOPS)
    _raw(pair, _first(11))
    drain(sv)
    for tid in (11, 12, 13):
        assert [type(e) for e in _raw(pair, _peer_error(tid))] == [TransactionFailed], tid
    # An ERROR crossing ours is the peer's ERROR about a transaction we failed already.
    assert [type(e) for e in _raw(pair, _peer_error(14))] == [ErrorReceived]
    assert sv.in_progress() == []
    return {
        (Role.SERVER, 11): "RECEIVING -RECV_ERROR-> DONE",
        (Role.SERVER, 12): "RECEIVING -FAIL-> FAILED_RECEIVING -RECV_ERROR-> DONE",
        (Role.SERVER, 13): "RECEIVING -RECV_LAST-> ANSWERING -FAIL-> FAILED_ANSWERING"
                           " -RECV_ERROR-> DONE",
        (Role.SERVER, 14): "RECEIVING -FAIL-> FAILED_RECEIVING -SEND_ERROR-> DISCARDING"
                           " -RECV_ERROR-> DONE",
    }


def gateway_bulk_ended_by_the_server(steps: list[Step]) -> dict[tuple[Role, int], str]:
    pair = _established()
    gw, sv = pair.gateway, pair.server
    gw.start_bulk(REG, 2, 3)
    gw.send_bulk_entry(2, RegistrationEntry("a"))
    pair.to_server()  # a first fragment with MORE
    _answer(pair, 1, tid=2)
    sv.send_error(2, OOPS)
    pair.to_gateway()
    # docs/protocol.md "Ending a bulk early": an empty last fragment ends our fragment train,
    # and the server, which was discarding the rest of it, forgets the transaction.
    data = gw.data_to_send()
    (frame,) = split_frames(data)
    assert (frame.message_type, frame.more, frame.body) == (REG, False, b"")
    drain(sv)
    sv.receive_data(data, pair.now)
    assert drain(sv) == [] and sv.in_progress() == []
    return {(Role.GATEWAY, 2): "SENDING -RECV_ERROR-> DONE",
            (Role.SERVER, 2): "RECEIVING -FAIL-> FAILED_RECEIVING -SEND_ERROR-> DISCARDING"
                              " -RECV_LAST-> DONE"}


def gateway_bulk_answered_before_its_end(steps: list[Step]) -> dict[tuple[Role, int], str]:
    """A server that answers every entry before our last fragment (a broken one) ends it too."""
    pair = _established()
    gw = pair.gateway
    gw.start_bulk(REG, 2, 2)
    gw.send_bulk_entry(2, RegistrationEntry("a"))
    gw.data_to_send()
    answers = [encode_entry(RegistrationResponseEntry(u, 0)) for u in ("a", "b")]
    gw.receive_data(bulk_frame(REG_RSP, 2, answers), 0.0)
    assert BulkEnded in [type(e) for e in drain(gw)]
    (frame,) = split_frames(gw.data_to_send())
    assert (frame.message_type, frame.more, frame.body) == (REG, False, b"")
    return {(Role.GATEWAY, 2): "SENDING -RECV_LAST-> DONE"}


def gateway_bulk_failed_by_the_gateway(steps: list[Step]) -> dict[tuple[Role, int], str]:
    pair = _established()
    pair.gateway.start_bulk(REG, 2, 2)
    pair.gateway.send_bulk_entry(2, RegistrationEntry("a"))
    pair.gateway.send_error(2, OOPS)
    pair.gateway.start_bulk(REG, 3, 1)
    pair.gateway.send_bulk_entry(3, RegistrationEntry("a"))
    pair.gateway.send_error(3, OOPS)
    return {(Role.GATEWAY, 2): "SENDING -SEND_ERROR-> DONE",
            (Role.GATEWAY, 3): "SENDING -SEND_LAST-> AWAITING -SEND_ERROR-> DONE"}


def a_second_defect_replaces_the_pending_cause(steps: list[Step]) -> dict[tuple[Role, int], str]:
    """Our user fails the bulk while a frame is read; the frame then turns out malformed: the
    ERROR (sent once the delivered entry is answered) carries the frame's defect."""
    pair = _established()
    head = bulk_header_ies(REG, 3) + reg_entry("a")
    frame = encode_frame(REG, TID, head + b"\x0c\x00\x40")  # an IE running past the body
    _raw(pair, frame[: HEADER_SIZE + len(head)])
    pair.server.send_error(TID, OOPS)
    assert [type(e) for e in _raw(pair, frame[HEADER_SIZE + len(head) :])] == [
        ProtocolErrorDetected]
    _answer(pair, 1)
    assert _causes(pair) == [ErrorCause.INVALID_MESSAGE]
    return {(Role.SERVER, TID): "RECEIVING -FAIL-> FAILED_RECEIVING -FAIL-> FAILED_RECEIVING"
                                " -RECV_LAST-> FAILED_ANSWERING -SEND_ERROR-> DONE"}


SCENARIOS: list[Callable[[list[Step]], dict[tuple[Role, int], str]]] = [
    single_answered,
    single_failed_by_the_server,
    single_failed_by_the_gateway,
    bulk_answered,
    bulk_too_short,
    failed_then_discarding,
    failed_while_receiving_then_complete,
    failed_while_answering,
    peer_error_in_every_server_state,
    gateway_bulk_ended_by_the_server,
    gateway_bulk_answered_before_its_end,
    gateway_bulk_failed_by_the_gateway,
    a_second_defect_replaces_the_pending_cause,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_transaction_paths(scenario: Callable[..., Any], steps: list[Step]) -> None:
    expected = scenario(steps)
    for (role, tid), want in expected.items():
        assert path(steps, role, tid) == want, (role, tid)


def test_every_transition_is_taken(steps: list[Step]) -> None:
    for scenario in SCENARIOS:
        scenario(steps)
    taken = {(old, inp) for _, _, old, inp, _ in steps}
    assert taken == set(TXN_TRANSITIONS)


# --- an illegal transition in a session ------------------------------------------------------


def test_an_illegal_input_of_ours_raises_and_changes_nothing() -> None:
    pair = _established()
    _raw(pair, _first())
    txn = pair.server._txns[TID]
    for inp in (TxnInput.SEND_LAST, TxnInput.SEND_ERROR):  # a bulk answered before its end
        with pytest.raises(LocalProtocolError):
            pair.server._advance(txn, inp)
        assert txn.state is TxnState.RECEIVING and pair.server.in_progress() == [TID]


def test_an_illegal_input_from_the_peer_ends_the_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the session ever route the peer's octets to a transition the table lacks, that is
    the peer's error: next_event() answers ERROR and closes instead of raising."""
    pair = _established()
    pair.gateway.send_request(UeRegistrationRequest(2, "ue-1"))
    pair.to_server()
    pair.server.send_response(UeRegistrationResponse(2, "ue-1", 0))
    table = dict(TXN_TRANSITIONS)
    del table[(TxnState.AWAITING, TxnInput.RECV_LAST)]
    monkeypatch.setattr("wire.session.TXN_TRANSITIONS", table)
    events = pair.to_gateway()
    assert [type(e) for e in events] == [ProtocolErrorDetected, ConnectionClosed]
    assert isinstance(events[0].error, InvalidMessage) and events[0].error.transaction_id == 2
    assert [e.error_cause for e in errors_in(pair.gateway.data_to_send())] == [
        ErrorCause.INVALID_MESSAGE]


# --- behaviour kept as it was (pinned; a change here is a change of behaviour) ----------------


def _gateway_mid_response(tail: bytes) -> tuple[Pair, list[Any]]:
    """A gateway whose user sends ERROR for its bulk while a response frame is half read;
    `tail` is appended to that frame's body."""
    pair = _established()
    gw = pair.gateway
    gw.start_bulk(REG, 2, 3)
    for uid in ("a", "b", "c"):
        gw.send_bulk_entry(2, RegistrationEntry(uid))
    pair.to_server()
    answers = b"".join(encode_entry(RegistrationResponseEntry(u, 0)) for u in ("a", "b", "c"))
    head = bulk_header_ies(REG_RSP, 3)
    frame = encode_frame(REG_RSP, 2, head + answers + tail, more=bool(tail))
    cut = HEADER_SIZE + len(head) + 5
    gw.receive_data(frame[:cut], 0.0)
    drain(gw)
    gw.send_error(2, OOPS)
    assert [type(e) for e in drain(gw)] == [TransactionFailed]
    gw.receive_data(frame[cut:], 0.0)
    return pair, drain(gw)


def test_a_frame_half_read_when_the_gateway_ends_its_bulk_is_still_read_out() -> None:
    """The entries left in that frame are still handed out, and BulkEnded after them."""
    pair, events = _gateway_mid_response(b"")
    assert [type(e) for e in events] == [BulkEntryReceived] * 3 + [BulkEnded]
    assert pair.gateway.in_progress() == []


def test_a_defect_in_that_frame_gets_a_second_error() -> None:
    pair, events = _gateway_mid_response(b"\x0d\x00\x40")  # an IE running past the body
    assert [type(e) for e in events] == [BulkEntryReceived] * 3 + [ProtocolErrorDetected,
                                                                  TransactionFailed]
    assert [(e.transaction_id, e.error_cause) for e in errors_in(pair.gateway.data_to_send())] == [
        (2, OOPS), (2, ErrorCause.INVALID_MESSAGE)]


def test_the_server_too_answers_a_defect_after_its_error_with_a_second_error() -> None:
    pair = _established()
    head = bulk_header_ies(REG, 3) + reg_entry("a")
    frame = encode_frame(REG, TID, head + b"\x0c\x00\x40", more=True)
    _raw(pair, frame[: HEADER_SIZE + len(head)])
    _answer(pair, 1)
    pair.server.send_error(TID, OOPS)  # every entry delivered is answered: the ERROR goes now
    _raw(pair, frame[HEADER_SIZE + len(head) :])
    assert _causes(pair) == [OOPS, ErrorCause.INVALID_MESSAGE]
    assert pair.server._txns[TID].state is TxnState.DISCARDING  # up to the last fragment
    _raw(pair, _last())
    assert pair.server.in_progress() == []
