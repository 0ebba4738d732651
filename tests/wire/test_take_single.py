"""Session.take_single_request, the second door for a read that is one single request, held
equal to the general one: whatever it takes, receive_data + next_event would have delivered
as that one RequestReceived with the same session state after; whatever it refuses, it leaves
untouched for receive_data (which answers what is wrong with it)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.wire import strategies as ws
from tests.wire.helpers import Pair, drain
from wire.constants import SERVER_TID_BIT, MessageType
from wire.events import RequestReceived
from wire.frames import encode_frame
from wire.ies import encode_ie
from wire.messages import (
    Goodbye,
    Keepalive,
    UeDeregistrationRequest,
    UeRegistrationRequest,
    encode_message,
)
from wire.session import Limits, Session

NOW = 5.0
CREDENTIAL = bytes(range(32))


def _snapshot(session: Session) -> tuple[Any, ...]:
    """What the two doors must leave alike (private state read on purpose: the doors are the
    session's own)."""
    return (
        session.state,
        {tid: (txn.state, txn.request_type) for tid, txn in session._txns.items()},
        session._last_rx,
        session._keepalive_sent_at,
        len(session._buf),
        session._buf._skip,
        session._frame is None,
        session._eof,
        list(session._events),
        b"".join(session._out),
    )


def _server(history: dict[str, Any]) -> Session:
    """An established server session put in the state `history` describes."""
    pair = Pair(server_limits=Limits(max_outstanding=history["max_outstanding"],
                                     max_frame_size=history.get("max_frame_size", 65535)))
    pair.handshake()
    gw, server = pair.gateway, pair.server
    for tid in history["open"]:  # requests the server has not answered
        server.receive_data(encode_message(UeRegistrationRequest(tid, f"ue-{tid}", None)), 1.0)
        drain(server)
    if history["keepalive_sent"]:
        server.handle_timer(server.get_timer() or 0.0)  # our KEEPALIVE, unanswered
    if history["goodbye"]:
        server.receive_data(encode_message(Goodbye(gw.next_transaction_id(), 0)), 2.0)
        drain(server)
    if history["pending"]:  # a whole frame read, its event not taken yet
        server.receive_data(encode_message(Keepalive(7)), 3.0)
    if history["partial"]:
        server.receive_data(history["partial"], 3.0)
    server.data_to_send()
    return server


def _mostly(plain: Any, *others: Any) -> st.SearchStrategy[Any]:
    """`plain` three times in four: most examples should reach the door open."""
    return st.sampled_from([plain, plain, plain, *others] if len(others) == 1
                           else [plain] * (3 * len(others)) + list(others))


_histories = st.fixed_dictionaries({
    "max_outstanding": st.sampled_from([1, 2, 64]),
    "open": st.lists(st.sampled_from([1, 2, 3, 0x7FFF_FFFF]), max_size=2, unique=True),
    "keepalive_sent": st.booleans(),
    "goodbye": _mostly(False, True),
    "pending": _mostly(False, True),
    "partial": _mostly(b"", b"\x01", b"\x01\x11\x00\x00"),
})


@st.composite
def _reads(draw: Any) -> bytes:
    """One read: mostly a whole single request (some with an id in use, 0 or the server's
    bit), else one mangled in a way each check of the door is there for."""
    tid = draw(st.one_of(ws.tids, st.sampled_from([0, 1, 2, 3, 0x7FFF_FFFF, SERVER_TID_BIT | 5])))
    if draw(st.booleans()):
        uid = draw(ws.ue_service_ids)
        request: Any = UeRegistrationRequest(tid, uid, draw(st.none() | ws.credentials))
    else:
        request = draw(ws.deregistration_requests).__class__(
            tid, draw(ws.ue_service_ids), draw(st.none() | ws.credentials))
    frame = encode_message(request)
    how = draw(st.sampled_from([
        "as is", "as is", "as is", "flags", "version", "type", "short", "long", "two",
        "body", "bulk type", "empty body"]))
    if how == "flags":
        flags = draw(st.sampled_from([b"\x00\x01", b"\x00\x02", b"\x80\x00"]))
        return frame[:2] + flags + frame[4:]
    if how == "version":
        return b"\x02" + frame[1:]
    if how == "type":
        return frame[:1] + bytes([draw(st.integers(0, 255))]) + frame[2:]
    if how == "short":  # cut short, or (last) its final IE missing behind a right header
        return draw(st.sampled_from([frame[: draw(st.integers(0, len(frame) - 1))],
                                     frame[: 12 + 3 + len(request.ue_service_id.encode())]]))
    if how == "long":  # octets past the frame; an unknown optional IE would decode
        return frame + draw(st.sampled_from([b"\x70\x00\x00", b"\x00"]) | st.binary(max_size=4))
    if how == "two":
        return frame + encode_message(Keepalive(9))
    if how == "body":  # the body's IEs mangled, the length kept right
        body = bytearray(frame[12:])
        body[draw(st.integers(0, len(body) - 1))] ^= draw(st.integers(1, 255))
        return frame[:12] + bytes(body)
    if how == "bulk type":
        return encode_frame(MessageType.BULK_REGISTRATION_REQUEST, tid, frame[12:])
    return encode_frame(request.message_type, tid, b"")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(history=_histories, data=_reads())
def test_what_the_door_takes_the_general_path_delivers_alike(
    history: dict[str, Any], data: bytes
) -> None:
    door, general = _server(history), _server(history)
    before = _snapshot(door)
    request = door.take_single_request(data, NOW)
    if request is None:
        assert _snapshot(door) == before  # refused: nothing touched
        return
    general.receive_data(data, NOW)
    assert drain(general) == [RequestReceived(request)]
    assert _snapshot(door) == _snapshot(general)


def _plain() -> dict[str, Any]:
    return {"max_outstanding": 64, "open": [], "keepalive_sent": False, "goodbye": False,
            "pending": False, "partial": b""}


@pytest.mark.parametrize("request_", [
    UeRegistrationRequest(11, "ue-a@example.com", CREDENTIAL),
    UeDeregistrationRequest(12, "ue-b", None),
])
def test_a_whole_single_request_is_taken_and_its_transaction_opened(request_: Any) -> None:
    session = _server(_plain())
    taken = session.take_single_request(encode_message(request_), NOW)
    assert taken == request_
    assert session.transaction(request_.transaction_id) is not None
    assert session.get_timer() == NOW + session.limits.keepalive_interval


def _refused(history: dict[str, Any], data: bytes) -> None:
    session = _server(history)
    before = _snapshot(session)
    assert session.take_single_request(data, NOW) is None
    assert _snapshot(session) == before


REQUEST = encode_message(UeRegistrationRequest(21, "ue-c", CREDENTIAL))


@pytest.mark.parametrize("history", [
    {"open": [21]},  # its id in use: TRANSACTION_ID_IN_USE is the general path's
    {"open": [1], "max_outstanding": 1},  # TOO_MANY_OUTSTANDING
    {"goodbye": True},  # CLOSING: no new transaction after a GOODBYE
    {"pending": True},  # an earlier frame's event comes first
    {"partial": b"\x01"},  # octets of an earlier frame are buffered
])
def test_the_door_stays_shut_when_the_session_is_not_plain(history: dict[str, Any]) -> None:
    _refused(_plain() | history, REQUEST)


@pytest.mark.parametrize("data", [
    REQUEST[:-1],  # incomplete
    REQUEST + b"\x00",  # more than one frame's octets
    REQUEST + b"\x70\x00\x00",  # ... even where they would decode as an unknown IE
    REQUEST[:-35],  # its credential IE not read yet, the header's length right
    REQUEST + encode_message(Keepalive(3)),
    REQUEST[:2] + b"\x00\x01" + REQUEST[4:],  # MORE on a single request
    REQUEST[:2] + b"\x00\x02" + REQUEST[4:],  # a reserved flag
    b"\x02" + REQUEST[1:],  # another version
    encode_message(UeRegistrationRequest(0, "ue-c", None)),  # id 0
    encode_message(UeRegistrationRequest(SERVER_TID_BIT | 4, "ue-c", None)),  # a server's id
    encode_frame(MessageType.UE_REGISTRATION_REQUEST, 22, b""),  # no UE Service ID
    encode_message(Keepalive(23)),  # not a single request
    encode_frame(MessageType.BULK_REGISTRATION_REQUEST, 24, REQUEST[12:]),
])
def test_the_door_refuses_what_is_not_one_whole_valid_request(data: bytes) -> None:
    _refused(_plain(), data)


def test_the_door_refuses_a_frame_over_our_maximum() -> None:
    """FrameTooLarge is the general path's, even for a body that decodes (an unknown
    optional IE makes it long)."""
    padded = REQUEST[12:] + encode_ie(0x70, bytes(4096))
    _refused(_plain() | {"max_frame_size": 4096},
             encode_frame(MessageType.UE_REGISTRATION_REQUEST, 21, padded))


@pytest.mark.parametrize("earlier", [
    REQUEST[:12],  # a request's header read, its body still to come (the frame being read)
    encode_frame(0x7E, 40, bytes(100))[:12],  # an unknown type's body being skipped
    b"",  # the peer's EOF
])
def test_the_door_stays_shut_behind_an_earlier_frame_or_the_end(earlier: bytes) -> None:
    """States the general path reaches with nothing left in the buffer: the octets that come
    next belong to the frame before, or come after the end."""
    session = _server(_plain())
    session.receive_data(earlier, 3.0)
    if earlier:
        drain(session)  # (the EOF stays unread: drained, it closes the session)
    before = _snapshot(session)
    assert session.take_single_request(REQUEST, NOW) is None
    assert _snapshot(session) == before


def test_the_door_stays_shut_while_an_event_waits() -> None:
    session = _server(_plain())
    session._events.append(RequestReceived(UeDeregistrationRequest(30, "ue-d", None)))
    before = _snapshot(session)
    assert session.take_single_request(REQUEST, NOW) is None
    assert _snapshot(session) == before


def test_what_the_door_takes_answers_our_keepalive() -> None:
    """wire-v1 §4.4: anything received answers our KEEPALIVE, through either door."""
    session = _server(_plain() | {"keepalive_sent": True})
    assert session.take_single_request(REQUEST, NOW) is not None
    assert session.get_timer() == NOW + session.limits.keepalive_interval


def test_the_door_is_the_servers_only() -> None:
    pair = Pair()
    pair.handshake()
    assert pair.gateway.take_single_request(REQUEST, NOW) is None
