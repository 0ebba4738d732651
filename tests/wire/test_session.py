"""The sans-IO session: chunking never changes events, and a gateway↔server pair in memory.

Time is always an explicit number passed as `now` (aioquic); nothing sleeps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.vectors import VALID
from tests.wire import strategies as ws
from tests.wire.helpers import (
    NONCE,
    Pair,
    answer,
    bulk_frame,
    drain,
    entry_ies,
    errors_in,
    normalize,
    of_type,
    reg_entry,
    split_frames,
)
from wire.constants import IEI, SERVER_TID_BIT, ErrorCause, FailureCause, MessageType
from wire.errors import EntryError, LocalProtocolError
from wire.events import (
    NEED_DATA,
    PAUSED,
    BulkEnded,
    BulkEntryReceived,
    BulkStarted,
    ConnectionClosed,
    ErrorReceived,
    GoodbyeReceived,
    HelloAckReceived,
    HelloReceived,
    ProtocolErrorDetected,
    RequestReceived,
    ResponseReceived,
    TransactionFailed,
)
from wire.frames import encode_frame
from wire.ies import encode_ie
from wire.messages import (
    BulkMessage,
    DeregistrationEntry,
    DeregistrationResponseEntry,
    Error,
    Hello,
    Keepalive,
    KeepaliveAck,
    Profile,
    RegistrationEntry,
    RegistrationResponseEntry,
    UeDeregistrationRequest,
    UeDeregistrationResponse,
    UeRegistrationRequest,
    UeRegistrationResponse,
    encode_bulk,
    encode_message,
)
from wire.session import Limits, Role, Session

REG, DEREG = MessageType.BULK_REGISTRATION_REQUEST, MessageType.BULK_DEREGISTRATION_REQUEST
REG_RSP = MessageType.BULK_REGISTRATION_RESPONSE


def _hex(name: str) -> bytes:
    return bytes.fromhex(VALID[name]["hex"])


# --- chunking: byte by byte == all at once ---------------------------------------------------

Responder = Callable[[Session, Any], None]


def _run(make: Callable[[], Session], data: bytes, chunks: list[int] | None,
         respond: Responder, *, flush_each: bool = False) -> tuple[list[Any], bytes]:
    """Feed `data` in chunks of the given sizes (None: at once), reacting to each event."""
    session = make()
    events: list[Any] = []
    out = bytearray()
    sizes = chunks if chunks is not None else [len(data)]
    pos = 0
    for size in [*sizes, len(data)]:
        if pos >= len(data):
            break
        session.receive_data(data[pos : pos + size], 1.0)
        pos += size
        while (event := session.next_event()) is not NEED_DATA and event is not PAUSED:
            events.append(normalize(event))
            respond(session, event)
        if flush_each:
            out += session.data_to_send()
    out += session.data_to_send()
    return events, bytes(out)


def _assert_same_all_ways(make: Callable[[], Session], data: bytes, respond: Responder,
                          chunks: list[int]) -> list[Any]:
    whole = _run(make, data, None, respond)
    assert _run(make, data, [1] * len(data), respond) == whole
    assert _run(make, data, chunks, respond) == whole
    # Flushing between chunks may cut response fragments elsewhere, never change the entries.
    events, out = _run(make, data, [1] * len(data), respond, flush_each=True)
    assert events == whole[0]
    assert _entries_sent(out) == _entries_sent(whole[1])
    return whole[0]


def _entries_sent(data: bytes) -> list[tuple[int, int, bytes]]:
    """What was sent, per transaction in order (transactions interleave differently when
    response fragments are flushed at other moments)."""
    out = []
    for f in split_frames(data):
        if f.message_type in (0x14, 0x15, 0x16, 0x17):
            out += [(f.transaction_id, iei, raw) for iei, raw in f.decode() if iei >= 0x0C]
        else:
            out.append((f.transaction_id, f.message_type, f.body))
    return sorted(out, key=lambda item: item[0])


def _server() -> Session:
    return Session(Role.SERVER, 0.0)


GATEWAY_VECTORS = ["registration_request", "deregistration_request", "deregistration_request_bare",
                   "bulk_registration_one_frame", "keepalive", "bulk_registration_two_frames",
                   "bulk_deregistration", "error", "unknown_optional_ie_skipped"]


def test_server_vector_stream_bytewise_equals_at_once() -> None:
    data = _hex("hello") + b"".join(_hex(n) for n in GATEWAY_VECTORS)
    events = _assert_same_all_ways(_server, data, answer, [5, 17, 1, 300, 2])
    assert not of_type(events, ProtocolErrorDetected)
    assert [e.count for e in of_type(events, BulkEnded)] == [3, 3, 3]
    assert len(of_type(events, BulkEntryReceived)) == 9
    assert len(of_type(events, RequestReceived)) == 4
    assert len(of_type(events, ErrorReceived)) == 1


def _gateway_plan(session: Session, event: Any) -> None:
    """The gateway side of the vector stream: on HELLO ACK, send what the responses answer."""
    if isinstance(event, HelloAckReceived):
        session.send_request(UeRegistrationRequest(2, "ue-0001@gw1.example"))
        session.send_request(UeDeregistrationRequest(4, "ue-0001@gw1.example"))
        session.start_bulk(REG, 6, 3)
        for n in range(3):
            session.send_bulk_entry(6, RegistrationEntry(f"ue-{n}"))


def _gateway() -> Session:
    gw = Session(Role.GATEWAY, 0.0)
    gw.send_hello(Hello(1, 2, node_name="gw1.example"))
    gw.data_to_send()
    return gw


def test_gateway_vector_stream_bytewise_equals_at_once() -> None:
    names = ["hello_ack", "registration_response_ok", "keepalive",
             "deregistration_response_fail", "bulk_registration_response", "error"]
    data = b"".join(_hex(n) for n in names)
    events = _assert_same_all_ways(_gateway, data, _gateway_plan, [3, 90, 7, 1, 64])
    assert not of_type(events, ProtocolErrorDetected)
    assert [type(e) for e in events if not isinstance(e, BulkEntryReceived)] == [
        HelloAckReceived, ResponseReceived, ResponseReceived, BulkStarted, BulkEnded,
        ErrorReceived]
    assert [e.entry.failure_cause for e in of_type(events, BulkEntryReceived)] == [None, 1, 7]


@st.composite
def _gateway_traffic(draw: Any) -> tuple[bytes, list[int]]:
    """HELLO, then single requests, KEEPALIVEs and bulks whose fragments have single messages
    between them (one bulk at a time, as wire-v1 §5 requires)."""
    out = [encode_message(Hello(1, 2))]
    tid = 1
    for _ in range(draw(st.integers(1, 5))):
        tid += 1
        kind = draw(st.sampled_from(["reg", "dereg", "keepalive", "bulk", "bulk"]))
        if kind == "bulk":
            mtype = draw(st.sampled_from([REG, DEREG]))
            bulk = draw(ws.bulk_messages(mtype, max_entries=5))
            bulk = BulkMessage(mtype, tid, bulk.count, bulk.entries)
            frames = list(encode_bulk(bulk, max_frame_size=draw(st.integers(1500, 6000))))
            for frame in frames[:-1]:
                out.append(frame)
                if draw(st.booleans()):
                    tid += 1
                    out.append(encode_message(UeRegistrationRequest(tid, f"between-{tid}")))
            out.append(frames[-1])
        elif kind == "keepalive":
            out.append(encode_message(Keepalive(tid)))
        else:
            strategy = ws.registration_requests if kind == "reg" else ws.deregistration_requests
            message = draw(strategy)
            out.append(encode_message(replace(message, transaction_id=tid)))
    data = b"".join(out)
    chunks = draw(st.lists(st.integers(1, 400), max_size=30))
    return data, chunks


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.data_too_large])
@given(_gateway_traffic())
def test_server_generated_stream_bytewise_equals_at_once(traffic: tuple[bytes, list[int]]) -> None:
    data, chunks = traffic
    events = _assert_same_all_ways(_server, data, answer, chunks)
    assert not of_type(events, ProtocolErrorDetected)
    assert len(of_type(events, BulkStarted)) == len(of_type(events, BulkEnded))


@st.composite
def _server_traffic(draw: Any) -> tuple[list[Any], bytes, list[int]]:
    """The gateway's requests, and the server's octets answering them (HELLO ACK first, bulk
    responses in several fragments, KEEPALIVEs between)."""
    requests: list[Any] = []
    out = [encode_message(_ack())]
    for tid in range(2, 2 + draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["reg", "dereg", "bulk", "bulk"]))
        if kind == "bulk":
            mtype = draw(st.sampled_from([REG, DEREG]))
            rsp_type = MessageType(mtype + 1)
            response = draw(ws.bulk_messages(rsp_type, max_entries=5))
            requests.append((mtype, tid, response.count))
            response = BulkMessage(rsp_type, tid, response.count, response.entries)
            frames = list(encode_bulk(response, max_frame_size=draw(st.integers(300, 2000))))
            for frame in frames:
                out.append(frame)
                if draw(st.booleans()):
                    out.append(encode_message(Keepalive(SERVER_TID_BIT | tid)))
        else:
            cls, rsp = ((UeRegistrationRequest, ws.registration_responses) if kind == "reg"
                        else (UeDeregistrationRequest, ws.deregistration_responses))
            requests.append(cls(tid, "ue"))
            message = draw(rsp)
            out.append(encode_message(replace(message, transaction_id=tid)))
    return requests, b"".join(out), draw(st.lists(st.integers(1, 300), max_size=30))


def _ack() -> Any:
    from wire.messages import HelloAck

    return HelloAck(1, NONCE, 65535, 1000, 64, 30, 1, 0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_server_traffic())
def test_gateway_generated_stream_bytewise_equals_at_once(
        traffic: tuple[list[Any], bytes, list[int]]) -> None:
    requests, data, chunks = traffic

    def plan(session: Session, event: Any) -> None:
        if isinstance(event, HelloAckReceived):
            for request in requests:
                if isinstance(request, tuple):
                    mtype, tid, count = request
                    session.start_bulk(mtype, tid, count)
                    entry = RegistrationEntry if mtype is REG else DeregistrationEntry
                    for n in range(count):
                        session.send_bulk_entry(tid, entry(f"ue-{n}"))
                else:
                    session.send_request(request)

    events = _assert_same_all_ways(_gateway, data, plan, chunks)
    assert not of_type(events, ProtocolErrorDetected)
    bulks = [r for r in requests if isinstance(r, tuple)]
    assert len(of_type(events, BulkEnded)) == len(bulks)
    assert len(of_type(events, ResponseReceived)) == len(requests) - len(bulks)


# --- the pair: handshake and procedures ------------------------------------------------------


def test_hello_and_hello_ack() -> None:
    pair = Pair()
    gw, sv = pair.gateway, pair.server
    gw.send_hello(Hello(gw.next_transaction_id(), 2, node_name="gw1",
                        max_frame_size=gw.limits.max_frame_size))
    assert sv.next_event() is NEED_DATA
    (event,) = pair.to_server()
    assert isinstance(event, HelloReceived) and event.hello.node_name == "gw1"
    assert sv.next_event() is PAUSED  # accept or reject first
    ack = sv.accept_hello(server_nonce=NONCE, bulk_allowed=True, ue_authentication_required=True)
    (event,) = pair.to_gateway()
    assert isinstance(event, HelloAckReceived) and event.hello_ack == ack
    assert ack.transaction_id == 1 and ack.ue_authentication_required == 1
    assert gw.state.value == sv.state.value == "established"
    assert gw.outstanding == sv.outstanding == 0
    with pytest.raises(LocalProtocolError):
        sv.accept_hello(server_nonce=NONCE, bulk_allowed=True, ue_authentication_required=True)


def test_reject_hello_answers_the_hello_id_and_closes() -> None:
    pair = Pair()
    pair.gateway.send_hello(Hello(7, 1))
    pair.to_server()
    pair.server.reject_hello(ErrorCause.GATEWAY_NOT_ALLOWED, "not in the table")
    assert pair.server.is_closed
    events = pair.to_gateway()
    assert pair.gateway.is_closed
    (failed,) = of_type(events, TransactionFailed)
    assert failed.transaction_id == 7 and failed.cause is ErrorCause.GATEWAY_NOT_ALLOWED
    assert of_type(events, ConnectionClosed)[0].by_peer


def test_second_hello_is_invalid_message() -> None:
    pair = Pair()
    pair.handshake()
    events = pair.to_server(encode_message(Hello(9, 2)))
    assert [e.error.cause for e in of_type(events, ProtocolErrorDetected)] == [
        ErrorCause.INVALID_MESSAGE]
    assert not pair.server.is_closed


def test_single_register_and_deregister() -> None:
    pair = Pair()
    pair.handshake()
    gw, sv = pair.gateway, pair.server
    tid = gw.next_transaction_id()
    gw.send_request(UeRegistrationRequest(tid, "ue-1", bytes(32)))
    (event,) = pair.to_server()
    assert isinstance(event, RequestReceived) and event.request.credential == bytes(32)
    assert sv.outstanding == 1 and gw.outstanding == 1
    assert sv.send_response(UeRegistrationResponse(tid, "ue-1", 0))
    (event,) = pair.to_gateway()
    assert event == ResponseReceived(UeRegistrationResponse(tid, "ue-1", 0))
    tid2 = gw.next_transaction_id()
    assert tid2 != tid and not tid2 & SERVER_TID_BIT
    gw.send_request(UeDeregistrationRequest(tid2, "ue-1"))
    (event,) = pair.to_server()
    sv.send_response(UeDeregistrationResponse(tid2, "ue-1", 1, FailureCause.NOT_REGISTERED))
    (event,) = pair.to_gateway()
    assert event.response.failure_cause == FailureCause.NOT_REGISTERED
    assert gw.outstanding == sv.outstanding == 0
    # A late answer to a finished transaction is refused quietly.
    assert not sv.send_response(UeDeregistrationResponse(tid2, "ue-1", 0))


def _big_entry(n: int) -> RegistrationEntry:
    profile = Profile(ue_type=2, application_data=bytes([n]) * 1024)
    return RegistrationEntry(f"ue-{n:04d}-" + "é" * 100, bytes(32), profile)


def test_bulk_with_fragmentation_both_ways() -> None:
    limits = Limits(max_frame_size=4096)
    pair = Pair(server_limits=limits, gateway_limits=limits)
    pair.handshake()
    gw, sv = pair.gateway, pair.server
    count = 12
    gw.start_bulk(REG, 5, count)
    for n in range(count):
        assert gw.send_bulk_entry(5, _big_entry(n))
    request_frames = split_frames(gw.data_to_send())
    assert len(request_frames) > 3
    assert all(f.more for f in request_frames[:-1]) and not request_frames[-1].more
    assert all(len(f.body) <= 4096 for f in request_frames)
    sv.receive_data(b"".join(encode_frame(f.message_type, f.transaction_id, f.body, more=f.more)
                             for f in request_frames), 0.0)
    events = drain(sv)
    entries = of_type(events, BulkEntryReceived)
    assert [e.entry for e in entries] == [_big_entry(n) for n in range(count)]
    assert isinstance(events[0], BulkStarted) and isinstance(events[-1], BulkEnded)
    # Long UE Service IDs make the response fragment too (each answer flushed as it comes).
    response_frames = []
    for e in entries:
        sv.send_bulk_entry(5, RegistrationResponseEntry(e.entry.ue_service_id, 0))
        response_frames += split_frames(sv.data_to_send())
    assert len(response_frames) > 1
    assert all(f.more for f in response_frames[:-1]) and not response_frames[-1].more
    gw.receive_data(b"".join(encode_frame(f.message_type, f.transaction_id, f.body, more=f.more)
                             for f in response_frames), 0.0)
    events = drain(gw)
    assert [e.entry.ue_service_id for e in of_type(events, BulkEntryReceived)] == [
        _big_entry(n).ue_service_id for n in range(count)]
    assert of_type(events, BulkEnded) == [BulkEnded(5, REG_RSP, count)]
    assert gw.outstanding == sv.outstanding == 0


def test_bulk_response_streams_before_the_request_ends() -> None:
    pair = Pair()
    pair.handshake()
    gw, sv = pair.gateway, pair.server
    gw.start_bulk(DEREG, 3, 4)
    gw.send_bulk_entry(3, DeregistrationEntry("a"))
    gw.send_bulk_entry(3, DeregistrationEntry("b"))
    events = pair.to_server()
    for e in of_type(events, BulkEntryReceived):
        sv.send_bulk_entry(3, DeregistrationResponseEntry(e.entry.ue_service_id, 0))
    events = pair.to_gateway()  # the first response fragment, MORE set
    assert len(of_type(events, BulkEntryReceived)) == 2 and not of_type(events, BulkEnded)
    gw.send_bulk_entry(3, DeregistrationEntry("c"))
    gw.send_bulk_entry(3, DeregistrationEntry("d"))
    for e in of_type(pair.to_server(), BulkEntryReceived):
        sv.send_bulk_entry(3, DeregistrationResponseEntry(e.entry.ue_service_id, 0))
    events = pair.to_gateway()
    assert [e.entry.ue_service_id for e in of_type(events, BulkEntryReceived)] == ["c", "d"]
    assert of_type(events, BulkEnded) and gw.outstanding == sv.outstanding == 0


def test_bulk_with_count_zero_is_answered() -> None:
    pair = Pair()
    pair.handshake()
    pair.gateway.start_bulk(REG, 4, 0)
    events = pair.to_server()
    assert events == [BulkStarted(4, REG, 0), BulkEnded(4, REG, 0)]
    events = pair.to_gateway()
    assert events == [BulkStarted(4, REG_RSP, 0), BulkEnded(4, REG_RSP, 0)]
    assert pair.gateway.outstanding == pair.server.outstanding == 0


def test_malformed_entry_is_invalid_entry_only() -> None:
    pair = Pair()
    pair.handshake()
    entries = [reg_entry("ue-a"), reg_entry(b"ue\x00b"), reg_entry("ue-c"),
               encode_ie(IEI.REGISTRATION_ENTRY, b"\x01\x00"), reg_entry("ue-e")]
    # The gateway's session cannot send a malformed entry: put one on the wire in its place.
    pair.gateway.start_bulk(REG, 9, len(entries))
    for n in range(len(entries)):
        pair.gateway.send_bulk_entry(9, RegistrationEntry(f"ue-{n}"))
    pair.gateway.data_to_send()
    events = pair.to_server(bulk_frame(REG, 9, entries))
    got = of_type(events, BulkEntryReceived)
    assert [e.index for e in got] == [0, 1, 2, 3, 4]
    assert [e.entry.ue_service_id if e.entry else None for e in got] == [
        "ue-a", None, "ue-c", None, "ue-e"]
    assert all(isinstance(e.error, EntryError) for e in got if e.entry is None)
    assert got[1].error.failure_cause is FailureCause.INVALID_ENTRY
    assert not of_type(events, ProtocolErrorDetected) and of_type(events, BulkEnded)
    for e in got:
        answer(pair.server, e)
    events = pair.to_gateway()
    results = [(e.entry.ue_service_id, e.entry.failure_cause)
               for e in of_type(events, BulkEntryReceived)]
    assert results == [("ue-a", None), ("", 6), ("ue-c", None), ("", 6), ("ue-e", None)]


# --- timers ----------------------------------------------------------------------------------


def test_keepalive_driven_by_handle_timer() -> None:
    pair = Pair(server_limits=Limits(keepalive_interval=30))
    pair.handshake()
    gw, sv = pair.gateway, pair.server
    assert sv.get_timer() == 30 and gw.get_timer() == 30
    sv.handle_timer(29.5)
    assert sv.data_to_send() == b""
    sv.handle_timer(30.0)
    (keepalive,) = split_frames(sv.data_to_send())
    assert keepalive.message_type == MessageType.KEEPALIVE
    assert keepalive.transaction_id & SERVER_TID_BIT  # the server's id space
    assert sv.get_timer() == 60  # a further interval
    sv.handle_timer(30.0)  # not twice
    assert sv.data_to_send() == b""
    gw.receive_data(encode_frame(MessageType.KEEPALIVE, keepalive.transaction_id, b""), 31.0)
    assert drain(gw) == []
    (ack,) = split_frames(gw.data_to_send())
    assert (ack.message_type, ack.transaction_id) == (MessageType.KEEPALIVE_ACK,
                                                      keepalive.transaction_id)
    assert gw.get_timer() == 61
    sv.receive_data(encode_message(KeepaliveAck(keepalive.transaction_id)), 31.0)
    assert drain(sv) == [] and sv.get_timer() == 61
    # The gateway keeps its own clock: its KEEPALIVE has a gateway id.
    gw.handle_timer(61.0)
    (gw_keepalive,) = split_frames(gw.data_to_send())
    assert gw_keepalive.message_type == MessageType.KEEPALIVE
    assert 0 < gw_keepalive.transaction_id < SERVER_TID_BIT
    assert gw.outstanding == 0  # KEEPALIVE is not a transaction


def test_idle_timeout_after_a_silent_interval() -> None:
    pair = Pair(server_limits=Limits(keepalive_interval=30))
    pair.handshake()
    sv = pair.server
    sv.handle_timer(30.0)
    sv.data_to_send()
    sv.handle_timer(59.9)
    assert not sv.is_closed
    sv.handle_timer(60.0)
    assert sv.is_closed and sv.get_timer() is None
    (error,) = errors_in(sv.data_to_send())
    assert (error.transaction_id, error.error_cause) == (0, ErrorCause.IDLE_TIMEOUT)
    events = drain(sv)
    assert of_type(events, ConnectionClosed)[0].cause is ErrorCause.IDLE_TIMEOUT


def test_traffic_restarts_the_keepalive_cycle() -> None:
    pair = Pair(server_limits=Limits(keepalive_interval=30))
    pair.handshake()
    sv = pair.server
    sv.handle_timer(30.0)
    sv.data_to_send()
    # Something other than the KEEPALIVE ACK arrives: the connection is alive.
    sv.receive_data(encode_message(Keepalive(77)), 45.0)
    drain(sv)
    sv.data_to_send()
    assert sv.get_timer() == 75.0
    sv.handle_timer(75.0)
    assert [f.message_type for f in split_frames(sv.data_to_send())] == [MessageType.KEEPALIVE]
    assert not sv.is_closed


def test_reading_resumed_restarts_the_keepalive_deadlines() -> None:
    """The user paused reading (its own flow control) from 20 s to 70 s: the peer's answer to
    the KEEPALIVE of 30 s waited unread, so the deadlines count from 70 s, not from 30 s."""
    pair = Pair(server_limits=Limits(keepalive_interval=30))
    pair.handshake()
    sv = pair.server
    sv.handle_timer(30.0)
    sv.data_to_send()
    sv.reading_resumed(70.0)
    assert sv.get_timer() == 100.0
    sv.handle_timer(70.0)
    assert not sv.is_closed
    sv.handle_timer(100.0)
    assert sv.is_closed  # still silent an interval after reading again: idle after all


def test_hello_timeout_on_the_server() -> None:
    sv = Session(Role.SERVER, 100.0)
    assert sv.get_timer() == 110.0
    sv.handle_timer(109.9)
    assert not sv.is_closed
    sv.handle_timer(110.0)
    assert sv.is_closed
    (error,) = errors_in(sv.data_to_send())
    assert (error.transaction_id, error.error_cause) == (0, ErrorCause.IDLE_TIMEOUT)


def test_hello_timeout_on_the_gateway() -> None:
    gw = Session(Role.GATEWAY, 0.0, Limits(hello_timeout=5.0))
    assert gw.get_timer() is None  # nothing to wait for before HELLO is sent
    gw.send_hello(Hello(1, 1))
    gw.data_to_send()
    assert gw.get_timer() == 5.0
    gw.handle_timer(5.0)
    assert gw.is_closed
    assert errors_in(gw.data_to_send())[0].error_cause == ErrorCause.IDLE_TIMEOUT


# --- GOODBYE ---------------------------------------------------------------------------------


def test_goodbye_drains_transactions_in_progress() -> None:
    pair = Pair()
    pair.handshake()
    gw, sv = pair.gateway, pair.server
    gw.send_request(UeRegistrationRequest(2, "single"))
    gw.start_bulk(REG, 3, 2)
    gw.send_bulk_entry(3, RegistrationEntry("first"))
    events = pair.to_server()
    assert len(of_type(events, RequestReceived)) == 1
    answer(sv, of_type(events, BulkEntryReceived)[0])
    sv.send_goodbye(ErrorCause.SHUTTING_DOWN, retry_after=1000)
    assert sv.state.value == "closing" and not sv.can_close
    events = pair.to_gateway()
    assert of_type(events, GoodbyeReceived)[0].goodbye.retry_after == 1000
    with pytest.raises(LocalProtocolError):
        gw.send_request(UeRegistrationRequest(4, "too late"))
    # A gateway that starts something anyway gets SHUTTING_DOWN for it; the rest goes on.
    events = pair.to_server(encode_message(UeRegistrationRequest(4, "too late")))
    (error,) = errors_in(sv.data_to_send())
    assert (error.transaction_id, error.error_cause) == (4, ErrorCause.SHUTTING_DOWN)
    assert not sv.is_closed
    assert sv.send_response(UeRegistrationResponse(2, "single", 0))
    gw.send_bulk_entry(3, RegistrationEntry("second"))
    for e in of_type(pair.to_server(), BulkEntryReceived):
        answer(sv, e)
    assert sv.can_close and sv.outstanding == 0
    events = pair.to_gateway()
    assert of_type(events, ResponseReceived) and of_type(events, BulkEnded)
    assert gw.can_close


def test_goodbye_from_the_gateway() -> None:
    pair = Pair()
    pair.handshake()
    pair.gateway.send_goodbye(ErrorCause.NORMAL)
    events = pair.to_server()
    assert of_type(events, GoodbyeReceived) and pair.server.can_close
    # New requests after the gateway's own GOODBYE are INVALID_MESSAGE, not SHUTTING_DOWN.
    pair.to_server(encode_message(UeRegistrationRequest(5, "x")))
    assert errors_in(pair.server.data_to_send())[0].error_cause == ErrorCause.INVALID_MESSAGE


# --- transaction rules -----------------------------------------------------------------------


def test_transaction_id_in_use_leaves_the_original_alone() -> None:
    pair = Pair()
    pair.handshake()
    gw, sv = pair.gateway, pair.server
    gw.send_request(UeRegistrationRequest(5, "original"))
    duplicate = encode_message(UeRegistrationRequest(5, "duplicate"))
    events = pair.to_server(duplicate)
    assert [e.request.ue_service_id for e in of_type(events, RequestReceived)] == ["original"]
    (error,) = errors_in(sv.data_to_send())
    assert (error.transaction_id, error.error_cause) == (5, ErrorCause.TRANSACTION_ID_IN_USE)
    gw.receive_data(encode_message(error), 0.0)
    assert of_type(drain(gw), ErrorReceived) and gw.outstanding == 1
    assert sv.send_response(UeRegistrationResponse(5, "original", 0))
    events = pair.to_gateway()
    assert events[0].response.ue_service_id == "original" and gw.outstanding == 0


def test_too_many_outstanding() -> None:
    pair = Pair(server_limits=Limits(max_outstanding=2))
    pair.handshake()
    sv = pair.server
    for tid in (2, 3):
        pair.gateway.send_request(UeRegistrationRequest(tid, "x"))
    with pytest.raises(LocalProtocolError):  # our own gateway keeps to the limit
        pair.gateway.send_request(UeRegistrationRequest(4, "x"))
    pair.gateway.data_to_send()  # not sent: the raw requests below stand in for them
    raw = b"".join(encode_message(UeRegistrationRequest(t, f"u{t}")) for t in (10, 11, 12))
    events = pair.to_server(raw)
    assert len(of_type(events, RequestReceived)) == 2
    errors = errors_in(sv.data_to_send())
    assert [(e.transaction_id, e.error_cause) for e in errors] == [
        (12, ErrorCause.TOO_MANY_OUTSTANDING)]
    sv.send_response(UeRegistrationResponse(10, "u10", 0))
    sv.receive_data(encode_message(UeRegistrationRequest(13, "u13")), 0.0)
    assert of_type(drain(sv), RequestReceived)


def test_second_bulk_while_one_is_arriving() -> None:
    pair = Pair()
    pair.handshake()
    sv = pair.server
    raw = (bulk_frame(REG, 10, [reg_entry("a")], count=2, more=True)
           + bulk_frame(REG, 11, [reg_entry("x")], count=2, more=True)
           + bulk_frame(REG, 11, [reg_entry("y")], first=False)  # discarded silently
           + bulk_frame(REG, 10, [reg_entry("b")], first=False))
    events = pair.to_server(raw)
    assert [(e.transaction_id, e.entry.ue_service_id)
            for e in of_type(events, BulkEntryReceived)] == [(10, "a"), (10, "b")]
    assert of_type(events, BulkEnded) == [BulkEnded(10, REG, 2)]
    errors = errors_in(sv.data_to_send())
    assert [(e.transaction_id, e.error_cause) for e in errors] == [
        (11, ErrorCause.TOO_MANY_OUTSTANDING)]
    # Once the first has fully arrived, another bulk may start.
    events = pair.to_server(bulk_frame(REG, 12, [reg_entry("c")]))
    assert of_type(events, BulkEnded) == [BulkEnded(12, REG, 1)]


def test_bulk_not_allowed() -> None:
    pair = Pair()
    pair.handshake(bulk_allowed=False)
    with pytest.raises(LocalProtocolError):
        pair.gateway.start_bulk(REG, 3, 1)
    raw = (bulk_frame(REG, 3, [reg_entry("a")], count=2, more=True)
           + bulk_frame(REG, 3, [reg_entry("b")], first=False))
    events = pair.to_server(raw)
    assert not of_type(events, BulkEntryReceived)
    errors = errors_in(pair.server.data_to_send())
    assert [(e.transaction_id, e.error_cause) for e in errors] == [
        (3, ErrorCause.BULK_NOT_ALLOWED)]
    assert pair.server.outstanding == 0


def test_too_many_entries() -> None:
    pair = Pair(server_limits=Limits(max_bulk_entries=2))
    pair.handshake()
    with pytest.raises(LocalProtocolError):
        pair.gateway.start_bulk(REG, 3, 3)
    raw = (bulk_frame(REG, 3, [reg_entry("a"), reg_entry("b")], count=3, more=True)
           + bulk_frame(REG, 3, [reg_entry("c")], first=False))
    events = pair.to_server(raw)
    assert not of_type(events, BulkEntryReceived) and not of_type(events, BulkStarted)
    assert of_type(events, TransactionFailed)[0].cause is ErrorCause.TOO_MANY_ENTRIES
    errors = errors_in(pair.server.data_to_send())
    assert [(e.transaction_id, e.error_cause) for e in errors] == [
        (3, ErrorCause.TOO_MANY_ENTRIES)]
    assert pair.server.outstanding == 0


def _responses_and_error(data: bytes) -> tuple[list[Any], list[bytes], Any]:
    frames = split_frames(data)
    assert frames[-1].message_type == MessageType.ERROR
    responses = [f for f in frames if f.message_type == REG_RSP]
    return responses, entry_ies(responses, 0x0D), frames[-1].decode()


def test_count_mismatch_too_few_at_the_last_fragment() -> None:
    pair = Pair()
    pair.handshake()
    sv = pair.server
    raw = (bulk_frame(REG, 8, [reg_entry("a")], count=3, more=True)
           + bulk_frame(REG, 8, [reg_entry("b")], first=False))
    events = pair.to_server(raw)
    assert len(of_type(events, BulkEntryReceived)) == 2 and not of_type(events, BulkEnded)
    (detected,) = of_type(events, ProtocolErrorDetected)
    assert detected.error.cause is ErrorCause.COUNT_MISMATCH
    assert errors_in(sv.data_to_send()) == []  # delivered entries are answered first
    for e in of_type(events, BulkEntryReceived):
        answer(sv, e)
    responses, entries, error = _responses_and_error(sv.data_to_send())
    assert len(entries) == 2 and all(f.more for f in responses)  # never a final fragment
    assert (error.transaction_id, error.error_cause) == (8, ErrorCause.COUNT_MISMATCH)
    assert sv.outstanding == 0
    assert not sv.send_bulk_entry(8, RegistrationResponseEntry("late", 0))


@pytest.mark.parametrize("answer_first", [True, False], ids=["answered-early", "answered-late"])
def test_count_mismatch_too_many_mid_stream(answer_first: bool) -> None:
    pair = Pair()
    pair.handshake()
    sv = pair.server
    first = bulk_frame(REG, 8, [reg_entry("a"), reg_entry("b"), reg_entry("extra")],
                       count=2, more=True)
    sv.receive_data(first, 0.0)
    events = []
    while (event := sv.next_event()) is not NEED_DATA:
        events.append(event)
        if answer_first and isinstance(event, BulkEntryReceived):
            answer(sv, event)  # all announced entries answered before the extra one is read
    assert [e.index for e in of_type(events, BulkEntryReceived)] == [0, 1]
    assert of_type(events, ProtocolErrorDetected)[0].error.cause is ErrorCause.COUNT_MISMATCH
    if not answer_first:
        for e in of_type(events, BulkEntryReceived):
            answer(sv, e)
    events += drain(sv)
    assert of_type(events, TransactionFailed) == [
        TransactionFailed(8, ErrorCause.COUNT_MISMATCH, "2 entries announced, more sent", True)]
    responses, entries, error = _responses_and_error(sv.data_to_send())
    assert len(entries) == 2 and all(f.more for f in responses)
    assert (error.transaction_id, error.error_cause) == (8, ErrorCause.COUNT_MISMATCH)
    assert sv.outstanding == 1  # fragments still to come are discarded up to the last one
    sv.receive_data(bulk_frame(REG, 8, [reg_entry("c")], first=False, more=True), 0.0)
    sv.receive_data(bulk_frame(REG, 8, [], first=False), 0.0)
    assert drain(sv) == [] and sv.data_to_send() == b"" and sv.outstanding == 0


def _gateway_bulk(pair: Pair, count: int) -> None:
    pair.gateway.start_bulk(REG, 6, count)
    for n in range(count):
        pair.gateway.send_bulk_entry(6, RegistrationEntry(f"u{n}"))
    pair.gateway.data_to_send()


def _rsp(uid: str) -> bytes:
    return encode_ie(0x0D, encode_ie(0x01, uid.encode()) + encode_ie(0x04, b"\x00"))


@pytest.mark.parametrize(("raw", "delivered"), [
    (bulk_frame(REG_RSP, 6, [_rsp("u0")], count=2), 1),
    (bulk_frame(REG_RSP, 6, [_rsp("u0"), _rsp("u1"), _rsp("u2")], count=3, more=True)
     + bulk_frame(REG_RSP, 6, [_rsp("u3")], first=False), 3),
    (bulk_frame(REG_RSP, 6, [_rsp("u0")], count=5), 0),
], ids=["too-few-at-last", "too-many-mid-stream", "wrong-count"])
def test_count_mismatch_on_the_gateway(raw: bytes, delivered: int) -> None:
    pair = Pair()
    pair.handshake()
    count = 3 if delivered == 3 else 2
    _gateway_bulk(pair, count)
    gw = pair.gateway
    gw.receive_data(raw, 0.0)
    events = drain(gw)
    assert len(of_type(events, BulkEntryReceived)) == delivered
    (failed,) = of_type(events, TransactionFailed)
    assert failed.sent and failed.cause is ErrorCause.COUNT_MISMATCH
    (error,) = errors_in(gw.data_to_send())
    assert (error.transaction_id, error.error_cause) == (6, ErrorCause.COUNT_MISMATCH)
    assert gw.outstanding == 0 and not of_type(events, BulkEnded)


def test_server_error_mid_request_and_the_gateway_ends_its_fragments() -> None:
    pair = Pair()
    pair.handshake()
    gw, sv = pair.gateway, pair.server
    gw.start_bulk(REG, 5, 4)
    gw.send_bulk_entry(5, RegistrationEntry("a"))
    gw.send_bulk_entry(5, RegistrationEntry("b"))
    events = pair.to_server()
    sv.send_error(5, ErrorCause.OVERLOADED, "busy", retry_after=500)
    assert errors_in(sv.data_to_send()) == []  # two entries still to answer
    for e in of_type(events, BulkEntryReceived):
        answer(sv, e)
    (failed,) = drain(sv)
    assert failed == TransactionFailed(5, ErrorCause.OVERLOADED, "busy", True, 500)
    events = pair.to_gateway()
    assert len(of_type(events, BulkEntryReceived)) == 2
    (failed,) = of_type(events, TransactionFailed)
    assert (failed.cause, failed.retry_after, failed.sent) == (ErrorCause.OVERLOADED, 500, False)
    assert not gw.send_bulk_entry(5, RegistrationEntry("c"))
    # The gateway closes its fragment train with an empty last fragment...
    (last,) = split_frames(gw.data_to_send())
    assert (last.message_type, last.more, last.body) == (REG, False, b"")
    assert sv.outstanding == 1
    sv.receive_data(encode_frame(REG, 5, b""), 0.0)
    # ...which lets the server forget the transaction without another ERROR.
    assert drain(sv) == [] and sv.outstanding == 0 and sv.data_to_send() == b""
    assert gw.outstanding == 0


def test_error_is_never_answered_with_error() -> None:
    bad_errors = [
        encode_frame(MessageType.ERROR, 3, b""),  # no Error cause
        encode_frame(MessageType.ERROR, 3, encode_ie(0x19, b"\x05\x05")),  # bad length
        encode_frame(MessageType.ERROR, 3, encode_ie(0x19, b"\x05") + encode_ie(0xF0, b"")),
        encode_message(Error(12345, 5)),  # about no transaction
        encode_message(Error(0, 200, diagnostic="\x00odd")),  # unknown cause, id 0
        encode_message(Error(0, ErrorCause.INVALID_MESSAGE)),
    ]
    for data in bad_errors:
        for role in Role:
            pair = Pair()
            pair.handshake()
            session = pair.server if role is Role.SERVER else pair.gateway
            session.receive_data(data, 0.0)
            events = drain(session)
            assert events and not session.is_closed, data.hex()
            assert errors_in(session.data_to_send()) == [], data.hex()
    # Before HELLO too: the server closes without a word.
    sv = Session(Role.SERVER, 0.0)
    sv.receive_data(encode_message(Error(0, 5)), 0.0)
    assert of_type(drain(sv), ConnectionClosed) and sv.data_to_send() == b""


def test_message_before_hello_closes() -> None:
    sv = Session(Role.SERVER, 0.0)
    sv.receive_data(encode_message(Keepalive(1)), 0.0)
    assert of_type(drain(sv), ConnectionClosed)
    (error,) = errors_in(sv.data_to_send())
    assert (error.transaction_id, error.error_cause) == (0, ErrorCause.SESSION_NOT_ESTABLISHED)
    gw = _gateway()
    gw.receive_data(encode_message(UeRegistrationResponse(0x8000_0001, "x", 0)), 0.0)
    assert of_type(drain(gw), ConnectionClosed)
    assert errors_in(gw.data_to_send())[0].error_cause == ErrorCause.SESSION_NOT_ESTABLISHED


def test_server_ids_have_the_top_bit_set() -> None:
    sv = Session(Role.SERVER, 0.0)
    gw = Session(Role.GATEWAY, 0.0)
    for _ in range(100):
        assert sv.next_transaction_id() & SERVER_TID_BIT
        tid = gw.next_transaction_id()
        assert 0 < tid < SERVER_TID_BIT
    pair = Pair()
    pair.handshake()
    # The server refuses gateway requests with ids of its own space or 0.
    for tid in (0, SERVER_TID_BIT, 0xFFFF_FFFF):
        pair.to_server(encode_message(UeRegistrationRequest(tid, "x")))
        (error,) = errors_in(pair.server.data_to_send())
        assert (error.transaction_id, error.error_cause) == (tid, ErrorCause.INVALID_MESSAGE)
    with pytest.raises(LocalProtocolError):
        pair.gateway.send_request(UeRegistrationRequest(SERVER_TID_BIT | 5, "x"))


def test_wrong_direction_is_invalid_message_and_bulk_fragments_are_dropped() -> None:
    pair = Pair()
    pair.handshake()
    raw = (bulk_frame(REG_RSP, 4, [_rsp("a")], count=2, more=True)
           + bulk_frame(REG_RSP, 4, [_rsp("b")], first=False)
           + encode_message(UeRegistrationResponse(5, "x", 0)))
    events = pair.to_server(raw)
    assert [e.error.cause for e in of_type(events, ProtocolErrorDetected)] == [
        ErrorCause.INVALID_MESSAGE] * 2
    errors = errors_in(pair.server.data_to_send())
    assert [(e.transaction_id, e.error_cause) for e in errors] == [
        (4, ErrorCause.INVALID_MESSAGE), (5, ErrorCause.INVALID_MESSAGE)]


def test_local_misuse_raises() -> None:
    pair = Pair()
    pair.handshake()
    gw, sv = pair.gateway, pair.server
    with pytest.raises(LocalProtocolError):
        sv.send_request(UeRegistrationRequest(3, "x"))
    with pytest.raises(LocalProtocolError):
        gw.send_hello(Hello(9, 1))
    gw.start_bulk(REG, 3, 1)
    with pytest.raises(LocalProtocolError):
        gw.start_bulk(REG, 4, 1)  # one bulk at a time
    with pytest.raises(LocalProtocolError):
        gw.send_bulk_entry(3, DeregistrationEntry("wrong kind"))
    gw.send_bulk_entry(3, RegistrationEntry("a"))
    with pytest.raises(LocalProtocolError):
        gw.send_bulk_entry(3, RegistrationEntry("one too many"))
    data = gw.data_to_send()
    sv.receive_data(data[:23], 0.0)  # the count, not the entry yet
    assert of_type(drain(sv), BulkStarted)
    with pytest.raises(LocalProtocolError):
        sv.send_bulk_entry(3, RegistrationResponseEntry("ahead", 0))  # nothing delivered yet
    sv.receive_data(data[23:], 0.0)
    events = drain(sv)
    assert of_type(events, BulkEntryReceived)
    with pytest.raises(LocalProtocolError):
        sv.send_bulk_entry(3, RegistrationResponseEntry("a", 1))  # failure without a cause
    assert sv.send_bulk_entry(3, RegistrationResponseEntry("a", 0))
    assert not sv.send_bulk_entry(3, RegistrationResponseEntry("b", 0))  # already answered


def test_closed_session_ignores_input_and_says_need_data() -> None:
    sv = Session(Role.SERVER, 0.0)
    sv.receive_data(b"\x02" + bytes(11), 0.0)  # version 2
    events = drain(sv)
    assert of_type(events, ConnectionClosed)[0].cause is ErrorCause.UNSUPPORTED_VERSION
    sv.receive_data(encode_message(Hello(1, 1)), 1.0)
    assert sv.next_event() is NEED_DATA and sv.get_timer() is None


def test_eof_closes() -> None:
    pair = Pair()
    pair.handshake()
    pair.server.receive_data(b"", 5.0)
    (closed,) = drain(pair.server)
    assert closed == ConnectionClosed(None, "peer closed the connection", True)


def test_final_response_fragment_waits_for_the_request_to_end() -> None:
    pair = Pair()
    pair.handshake()
    sv = pair.server
    events = pair.to_server(bulk_frame(REG, 7, [reg_entry("a"), reg_entry("b")], more=True))
    first, second = of_type(events, BulkEntryReceived)
    answer(sv, first)
    (fragment,) = split_frames(sv.data_to_send())
    assert fragment.more and len(entry_ies([fragment], 0x0D)) == 1
    answer(sv, second)  # every entry answered, but the request has not ended yet
    assert sv.data_to_send() == b""
    events = pair.to_server(bulk_frame(REG, 7, [], first=False))
    assert of_type(events, BulkEnded)
    (last,) = split_frames(sv.data_to_send())
    assert not last.more and len(entry_ies([last], 0x0D)) == 1
    assert sv.outstanding == 0
