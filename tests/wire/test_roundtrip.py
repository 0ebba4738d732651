"""Round trips of every IE and message (construct's `parse(build(x)) == x`), with maximum-size
values and empty optional parts; and the session's state machine against its table (h2)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.wire import strategies as ws
from tests.wire.helpers import NONCE, drain
from wire.constants import (
    IEI,
    PROFILE_MAX,
    ErrorCause,
    MessageType,
)
from wire.errors import InvalidMessage, LocalProtocolError, WireError
from wire.ies import (
    IE_VALUE,
    decode_value,
    encode_ie,
    encode_value,
    reference_encode_value,
    reference_value,
)
from wire.messages import (
    MESSAGE_SPECS,
    BulkMessage,
    Error,
    Goodbye,
    Hello,
    Profile,
    RegistrationEntry,
    UeRegistrationRequest,
    decode_body,
    decode_entry,
    decode_frames,
    encode_bulk,
    encode_entry,
    encode_message,
)
from wire.session import (
    TRANSITIONS,
    Role,
    Session,
    SessionInput,
    SessionState,
    _role_allows,
    next_state,
)

SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- IEs -------------------------------------------------------------------------------------


def test_every_ie_has_a_strategy() -> None:
    assert set(ws.IE_VALUES) == set(IE_VALUE)


@pytest.mark.parametrize("iei", list(IE_VALUE), ids=lambda i: i.name)
@settings(SETTINGS, max_examples=25)
@given(data=st.data())
def test_ie_value_round_trip(iei: IEI, data: st.DataObject) -> None:
    value = data.draw(ws.IE_VALUES[iei])
    raw = encode_value(iei, value)
    assert raw == reference_encode_value(iei, value)
    assert decode_value(iei, raw) == value
    assert reference_value(iei, raw) == value
    # The whole IE too: IEI | length | value.
    ie = encode_ie(iei, raw)
    assert ie[0] == iei and int.from_bytes(ie[1:3], "big") == len(raw) and ie[3:] == raw


@pytest.mark.parametrize(("iei", "value"), [
    (IEI.UE_SERVICE_ID, "é" * 127 + "a"),  # 255 octets, multibyte
    (IEI.UE_SERVICE_ID, "😀" * 63 + "abc"),
    (IEI.UE_SERVICE_ID, "中" * 85),
    (IEI.NODE_NAME, "\x01" * 255),  # controls are allowed in Node name
    (IEI.DIAGNOSTIC, "€" * 341 + "a"),  # 1 024 octets
    (IEI.DIAGNOSTIC, ""),
    (IEI.APPLICATION_DATA, bytes(1024)),
    (IEI.APPLICATION_DATA, b""),
    (IEI.TRIGGERING_UE_IDENTIFIER, "😀" * 16),  # 64 octets
    (IEI.NUMBER_OF_INDIVIDUAL_ENTRIES, 0xFFFF_FFFF),
    (IEI.RETRY_AFTER, 0xFFFF_FFFF),
    (IEI.MAXIMUM_OUTSTANDING_TRANSACTIONS, 0xFFFF),
    (IEI.COMMUNICATION_AVAILABILITY, (0xFFFF_FFFF, 0)),
])
def test_ie_at_its_limit(iei: IEI, value: Any) -> None:
    raw = encode_value(iei, value)
    assert decode_value(iei, raw) == reference_value(iei, raw) == value


@pytest.mark.parametrize(("iei", "raw"), [
    (IEI.UE_SERVICE_ID, "é".encode() * 128),  # 256 octets
    (IEI.UE_SERVICE_ID, "😀".encode()[:3]),  # cut inside a character
    (IEI.UE_SERVICE_ID, b"a\x85b"),  # not UTF-8 (a lone continuation octet)
    (IEI.UE_SERVICE_ID, "a\u0085".encode()),  # C1 control
    (IEI.UE_SERVICE_ID, b"a\x1f"),  # C0 control
    (IEI.NODE_NAME, b""),
    (IEI.NODE_NAME, b"x" * 256),
    (IEI.DIAGNOSTIC, b"x" * 1025),
    (IEI.APPLICATION_DATA, bytes(1025)),
    (IEI.TRIGGERING_UE_IDENTIFIER, b"1" * 65),
    (IEI.UE_CREDENTIAL, bytes(33)),
    (IEI.NUMBER_OF_INDIVIDUAL_ENTRIES, bytes(5)),
    (IEI.REGISTRATION_RESULT, b"\x02"),
    (IEI.BULK_REGISTRATION_INDICATOR, b"\x00"),
    (IEI.GATEWAY_TYPE, b"\x03"),
    (IEI.UE_TYPE, b"\x00"),
    (IEI.TRIGGERING_PROTOCOL, b"\x04"),
    (IEI.BULK_ALLOWED, b"\x02"),
    (IEI.COMMUNICATION_AVAILABILITY, bytes(7)),
])
def test_ie_beyond_its_limit(iei: IEI, raw: bytes) -> None:
    with pytest.raises(InvalidMessage):
        decode_value(iei, raw)
    with pytest.raises(InvalidMessage):
        reference_value(iei, raw)


def test_del_is_not_a_control_character() -> None:
    assert decode_value(IEI.UE_SERVICE_ID, b"a\x7fb") == "a\x7fb"


# --- messages --------------------------------------------------------------------------------


@pytest.mark.parametrize("mtype", list(ws.SINGLE_WITH_UNKNOWN), ids=lambda t: t.name)
@SETTINGS
@given(data=st.data())
def test_message_round_trip(mtype: MessageType, data: st.DataObject) -> None:
    message = data.draw(ws.SINGLE_WITH_UNKNOWN[mtype])
    wire = encode_message(message)
    assert decode_frames(wire) == [message]
    body = wire[12:]
    assert decode_body(mtype, message.transaction_id, body, reference=True) == message
    assert encode_message(decode_frames(wire)[0]) == wire


@pytest.mark.parametrize("mtype", list(ws.BULK), ids=lambda t: t.name)
@SETTINGS
@given(data=st.data())
def test_bulk_round_trip(mtype: MessageType, data: st.DataObject) -> None:
    message = data.draw(ws.BULK[mtype])
    size = data.draw(st.integers(1500, 65535))
    frames = list(encode_bulk(message, max_frame_size=size))
    assert all(len(f) - 12 <= size for f in frames)
    assert decode_frames(b"".join(frames)) == [message]
    again = decode_frames(b"".join(frames))[0]
    assert list(encode_bulk(again, max_frame_size=size)) == frames
    for entry in message.entries:
        ie = encode_entry(entry)
        assert decode_entry(IEI(ie[0]), ie[3:]) == entry
        assert decode_entry(IEI(ie[0]), ie[3:], reference=True) == entry


@SETTINGS
@given(ws.full_profiles, ws.credentials)
def test_largest_registration_entry(profile: Profile, credential: bytes) -> None:
    uid = "é" * 127 + "a"  # 255 octets
    entry = RegistrationEntry(uid, credential, profile)
    request = UeRegistrationRequest(1, uid, credential, profile)
    assert decode_frames(encode_message(request)) == [request]
    ie = encode_entry(entry)
    assert decode_entry(IEI.REGISTRATION_ENTRY, ie[3:]) == entry


def _request_with_profile(profile_value: bytes) -> bytes:
    body = (encode_ie(IEI.UE_SERVICE_ID, b"ue") + encode_ie(IEI.NON_MSGIN5G_UE_PROFILE,
                                                             profile_value))
    return body


def test_profile_of_2048_octets_is_accepted_and_2049_is_not() -> None:
    # Known sub-IEs add up to at most 1 125 octets; unknown optional ones fill the rest.
    head = encode_ie(IEI.UE_TYPE, b"\x01")
    tail = encode_ie(IEI.APPLICATION_DATA, bytes(1024))
    for size, ok in ((PROFILE_MAX, True), (PROFILE_MAX + 1, False)):
        profile = head + encode_ie(0x7E, bytes(size - len(head) - len(tail) - 3)) + tail
        assert len(profile) == size
        body = _request_with_profile(profile)
        for reference in (False, True):
            if ok:
                request = decode_body(MessageType.UE_REGISTRATION_REQUEST, 1, body,
                                      reference=reference)
                assert request.profile == Profile(ue_type=1, application_data=bytes(1024))
            else:
                with pytest.raises(InvalidMessage):
                    decode_body(MessageType.UE_REGISTRATION_REQUEST, 1, body,
                                reference=reference)


def test_empty_optional_parts() -> None:
    request = UeRegistrationRequest(3, "ue", None, Profile())
    wire = encode_message(request)
    assert wire.endswith(bytes([IEI.NON_MSGIN5G_UE_PROFILE, 0, 0]))
    assert decode_frames(wire) == [request]
    for message in (Error(0, 5, None, ""), Goodbye(0, 0, 0, ""), Hello(1, 1, node_name=None)):
        assert decode_frames(encode_message(message)) == [message]
    empty_bulk = BulkMessage(MessageType.BULK_DEREGISTRATION_REQUEST, 9, 0, ())
    assert decode_frames(encode_message(empty_bulk)) == [empty_bulk]


def test_unknown_cause_values_are_kept_as_ints() -> None:
    error = Error(0, 250, None, None)
    (decoded,) = decode_frames(encode_message(error))
    assert decoded.error_cause == 250 and type(decoded.error_cause) is int


@SETTINGS
@given(ws.any_message, st.data())
def test_unknown_mandatory_ie_is_rejected(message: Any, data: st.DataObject) -> None:
    assume(not isinstance(message, BulkMessage))
    iei = data.draw(ws.unknown_mandatory_ieis)
    wire = encode_message(message) + encode_ie(iei, b"x")
    wire = wire[:8] + (len(wire) - 12).to_bytes(4, "big") + wire[12:]
    with pytest.raises(WireError) as info:
        decode_frames(wire)
    assert info.value.cause is ErrorCause.UNKNOWN_MANDATORY_IE


def test_messages_dataclasses_match_their_specs() -> None:
    for mtype, spec in MESSAGE_SPECS.items():
        assert spec.cls.message_type is mtype
        names = set(spec.cls.__dataclass_fields__) - {"message_type"}
        assert {f.attr for f in spec.fields} | {"transaction_id", "unknown_ies"} == names


# --- the state machine (h2 style) ------------------------------------------------------------

STATES = list(SessionState)
INPUTS = list(SessionInput)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Role)), st.sampled_from(STATES), st.sampled_from(INPUTS))
def test_every_pair_not_in_the_table_raises(role: Role, state: SessionState,
                                            inp: SessionInput) -> None:
    session = Session(role, 0.0)
    session.state = state
    allowed = (state, inp) in TRANSITIONS and _role_allows(role, inp)
    if allowed:
        assert next_state(role, state, inp) is TRANSITIONS[(state, inp)]
        session._apply(inp)
        assert session.state is TRANSITIONS[(state, inp)]
    else:
        with pytest.raises(LocalProtocolError):
            next_state(role, state, inp)
        with pytest.raises(LocalProtocolError):
            session._apply(inp)
        assert session.state is state  # a refused input changes nothing


def test_table_is_complete_for_close() -> None:
    for state in STATES:
        assert TRANSITIONS[(state, SessionInput.CLOSE)] is SessionState.CLOSED


def _reachable(role: Role, start: SessionState) -> set[SessionState]:
    seen = {start}
    todo = [start]
    while todo:
        state = todo.pop()
        for (s, inp), new in TRANSITIONS.items():
            if s is state and _role_allows(role, inp) and new not in seen:
                seen.add(new)
                todo.append(new)
    return seen


class PairMachine(RuleBasedStateMachine):
    """Drive a real gateway/server pair through its public API in any order: local calls that
    the table refuses raise LocalProtocolError and change nothing, and every state change
    either side makes is a path through TRANSITIONS."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.sessions = {Role.GATEWAY: Session(Role.GATEWAY, 0.0),
                         Role.SERVER: Session(Role.SERVER, 0.0)}
        self.before = {r: s.state for r, s in self.sessions.items()}

    def _local(self, role: Role, inp: SessionInput, call: Any) -> None:
        session = self.sessions[role]
        state = session.state
        ok = (state, inp) in TRANSITIONS and _role_allows(role, inp)
        try:
            call(session)
        except LocalProtocolError:
            assert not ok, f"{role.value} {inp.value} in {state.value} raised"
            assert session.state is state
            return
        assert ok, f"{role.value} {inp.value} in {state.value} should have raised"

    @rule()
    def gateway_sends_hello(self) -> None:
        self._local(Role.GATEWAY, SessionInput.SEND_HELLO,
                    lambda s: s.send_hello(Hello(s.next_transaction_id(), 2)))

    @rule()
    def server_sends_hello_ack(self) -> None:
        self._local(Role.SERVER, SessionInput.SEND_HELLO_ACK,
                    lambda s: s.accept_hello(server_nonce=NONCE, bulk_allowed=True,
                                             ue_authentication_required=False))

    @rule()
    def gateway_tries_hello_ack(self) -> None:
        self._local(Role.GATEWAY, SessionInput.SEND_HELLO_ACK,
                    lambda s: s.accept_hello(server_nonce=NONCE, bulk_allowed=True,
                                             ue_authentication_required=False))

    @rule()
    def server_tries_hello(self) -> None:
        self._local(Role.SERVER, SessionInput.SEND_HELLO, lambda s: s.send_hello(Hello(1, 2)))

    @rule(role=st.sampled_from(list(Role)))
    def sends_goodbye(self, role: Role) -> None:
        session = self.sessions[role]
        state = session.state
        session.send_goodbye(ErrorCause.NORMAL)
        if (state, SessionInput.SEND_GOODBYE) in TRANSITIONS:
            assert session.state is TRANSITIONS[(state, SessionInput.SEND_GOODBYE)]
        else:  # before the session exists, GOODBYE just closes
            assert session.is_closed

    @rule()
    def gateway_sends_request(self) -> None:
        session = self.sessions[Role.GATEWAY]
        try:
            session.send_request(UeRegistrationRequest(session.next_transaction_id(), "ue"))
        except LocalProtocolError:
            assert session.state is not SessionState.ESTABLISHED
        else:
            assert session.state is SessionState.ESTABLISHED

    @rule(role=st.sampled_from(list(Role)))
    def deliver(self, role: Role) -> None:
        sender = self.sessions[role]
        receiver = self.sessions[Role.SERVER if role is Role.GATEWAY else Role.GATEWAY]
        data = sender.data_to_send()
        if data:
            receiver.receive_data(data, self.now)
        for event in drain(receiver):
            assert event is not None
        for event in drain(sender):
            assert event is not None

    @rule(dt=st.sampled_from([1.0, 5.0, 31.0]), role=st.sampled_from(list(Role)))
    def time_passes(self, dt: float, role: Role) -> None:
        self.now += dt
        self.sessions[role].handle_timer(self.now)

    @precondition(lambda self: self.sessions[Role.SERVER].state is SessionState.HELLO_PENDING)
    @rule()
    def server_rejects(self) -> None:
        self.sessions[Role.SERVER].reject_hello(ErrorCause.GATEWAY_NOT_ALLOWED)
        assert self.sessions[Role.SERVER].is_closed

    @invariant()
    def states_move_along_the_table(self) -> None:
        for role, session in self.sessions.items():
            assert session.state in _reachable(role, self.before[role])
            self.before[role] = session.state


PairMachine.TestCase.settings = settings(max_examples=80, stateful_step_count=25, deadline=None)
test_pair_state_machine = PairMachine.TestCase


def test_replace_keeps_unknown_ies_in_place() -> None:
    request = UeRegistrationRequest(5, "ue", None, None, ((0, 0x70, b"a"), (1, 0x71, b"")))
    wire = encode_message(request)
    assert wire[12] == 0x70 and decode_frames(wire) == [request]
    assert encode_message(replace(request, unknown_ies=())) != wire
