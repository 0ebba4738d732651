"""The fast decoders against the construct reference: same value, or same error class.

The fast path (ies.split_ies / decode_value, the generated struct codecs, and the hand-written
entry decoders in messages.py) may only ever be an optimisation of the interpreted construct
declarations (style.md: a compiled/fast parser is acceptable only behind a differential test).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.wire import strategies as ws
from tests.wire.test_fuzz import mutated
from wire.bulk import BULK_SPECS, BulkReader
from wire.constants import IEI, MessageType
from wire.errors import WireError
from wire.frames import encode_frame
from wire.ies import (
    IE_VALUE,
    decode_value,
    encode_ie,
    encode_value,
    reference_split,
    reference_value,
    split_ies,
)
from wire.messages import (
    _FAST_ENTRY,
    _FAST_REQUEST,
    ENTRY_DECODERS,
    ENTRY_SPECS,
    MESSAGE_SPECS,
    PROFILE_SPEC,
    UeDeregistrationResponse,
    UeRegistrationResponse,
    _fast_single_response,
    decode_body,
    decode_entry,
    decode_group,
    encode_entry,
    encode_group,
    encode_message,
)

DIFF = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def outcome(call: Any) -> tuple[str, Any]:
    try:
        return ("ok", call())
    except WireError as exc:
        return ("error", type(exc))


def assert_same(fast: Any, reference: Any) -> tuple[str, Any]:
    a, b = outcome(fast), outcome(reference)
    assert a == b
    return a


# --- IE values -------------------------------------------------------------------------------


@st.composite
def ie_inputs(draw: Any) -> tuple[IEI, bytes]:
    """An IEI and a value: valid, random, or a valid one mutated."""
    iei = draw(st.sampled_from(list(IE_VALUE)))
    valid = encode_value(iei, draw(ws.IE_VALUES[iei]))
    raw = draw(st.one_of(st.just(valid), st.binary(max_size=70), mutated([valid]),
                         st.binary(min_size=len(valid), max_size=len(valid))))
    return iei, raw


@DIFF
@given(ie_inputs())
@example((IEI.UE_SERVICE_ID, b"\xed\xa0\x80"))  # an encoded surrogate is not UTF-8
@example((IEI.UE_SERVICE_ID, b"\xc2\x85"))  # U+0085, a C1 control
@example((IEI.UE_SERVICE_ID, b"\xf4\x90\x80\x80"))  # beyond U+10FFFF
@example((IEI.NODE_NAME, b"\x00"))  # controls allowed here
@example((IEI.DIAGNOSTIC, b""))
@example((IEI.COMMUNICATION_AVAILABILITY, bytes(9)))
def test_ie_values(item: tuple[IEI, bytes]) -> None:
    iei, raw = item
    assert_same(lambda: decode_value(iei, raw), lambda: reference_value(iei, raw))


@DIFF
@given(st.one_of(st.binary(max_size=80),
                 st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=20))).map(
                     lambda ies: b"".join(encode_ie(i, v) for i, v in ies)).flatmap(
                     lambda body: st.one_of(st.just(body), mutated([body or b"\x01"])))))
def test_ie_lists(body: bytes) -> None:
    result = assert_same(lambda: split_ies(body), lambda: reference_split(body))
    if result[0] == "ok":
        assert b"".join(encode_ie(i, v) for i, v in result[1]) == body


# --- messages, entries, profiles -------------------------------------------------------------


@DIFF
@given(st.sampled_from(list(MESSAGE_SPECS)).flatmap(
    lambda t: st.tuples(st.just(t), ws.SINGLE_WITH_UNKNOWN[t])), st.data())
def test_message_bodies(item: tuple[Any, Any], data: st.DataObject) -> None:
    mtype, message = item
    body = encode_message(message)[12:]
    body = data.draw(st.one_of(st.just(body), mutated([body])))
    assert_same(lambda: decode_body(mtype, 5, body),
                lambda: decode_body(mtype, 5, body, reference=True))


SINGLE_REQUESTS = [MessageType.UE_REGISTRATION_REQUEST, MessageType.UE_DEREGISTRATION_REQUEST]


@DIFF
@given(st.sampled_from(SINGLE_REQUESTS).flatmap(
    lambda t: st.tuples(st.just(t), ws.SINGLE_WITH_UNKNOWN[t])), st.data())
def test_single_request_bodies(item: tuple[Any, Any], data: st.DataObject) -> None:
    """The single requests' shortcut (_FAST_REQUEST) against the reference decoder."""
    test_message_bodies.hypothesis.inner_test(item, data)


@pytest.mark.parametrize("mtype", SINGLE_REQUESTS, ids=lambda t: t.name)
def test_the_single_request_shortcut_is_exercised(mtype: MessageType) -> None:
    message = MESSAGE_SPECS[mtype].cls(5, "ue-1@gw1.example", bytes(32))
    body = encode_message(message)[12:]
    assert _FAST_REQUEST[mtype][0](body) is not None
    assert decode_body(mtype, 5, body) == message


ENTRY_STRATEGIES = {
    IEI.REGISTRATION_ENTRY: ws.registration_entries,
    IEI.DEREGISTRATION_ENTRY: ws.deregistration_entries,
    IEI.REGISTRATION_RESPONSE_ENTRY: ws.registration_response_entries,
    IEI.DEREGISTRATION_RESPONSE_ENTRY: ws.deregistration_response_entries,
    IEI.LISTED_UE: ws.listed_ues,
}


@st.composite
def entry_inputs(draw: Any) -> tuple[IEI, bytes]:
    iei = draw(st.sampled_from(list(ENTRY_SPECS)))
    valid = encode_entry(draw(ENTRY_STRATEGIES[iei]))[3:]
    return iei, draw(st.one_of(st.just(valid), mutated([valid]), st.binary(max_size=60)))


@settings(DIFF, max_examples=300)
@given(entry_inputs())
@example((IEI.REGISTRATION_ENTRY, b"\x01\x00\x01a\x02\x00\x20" + bytes(32)))
@example((IEI.REGISTRATION_ENTRY, b"\x01\x00\x01a\x02\x00\x20" + bytes(31)))
@example((IEI.REGISTRATION_ENTRY, b"\x01\x00\x01a\x03\x00\x00"))  # empty profile
@example((IEI.REGISTRATION_ENTRY, b"\x01\x00\x01a\x03\x00\x03\x30\x00\x01\x03"))  # bad UE type
@example((IEI.REGISTRATION_ENTRY, b"\x01\x00\x01a\x03\x00\x04\x7f\x00\x01\x00"))  # unknown sub-IE
@example((IEI.REGISTRATION_ENTRY, b"\x01\x00\x01a\x03\x00\x04\xff\x00\x01\x00"))
@example((IEI.REGISTRATION_ENTRY, b"\x01\x00\x01a\x03\x00\x08\x32\x00\x02\x00\x01\x30\x00\x01"))
@example((IEI.DEREGISTRATION_ENTRY, b"\x01\x00\x00"))
@example((IEI.DEREGISTRATION_ENTRY, b"\x01\x00\x01a\x03\x00\x04\x30\x00\x01\x01"))  # a profile
@example((IEI.DEREGISTRATION_ENTRY,
          b"\x01\x00\x01a\x02\x00\x20" + bytes(32) + b"\x03\x00\x04\x30\x00\x01\x01"))
@example((IEI.DEREGISTRATION_ENTRY, b"\x01\x00\x02a\x00"))
@example((IEI.REGISTRATION_RESPONSE_ENTRY, b"\x01\x00\x00\x04\x00\x01\x01\x06\x00\x01\x06"))
def test_entries(item: tuple[IEI, bytes]) -> None:
    """decode_entry's fast path (hand-written for the common shapes) against construct."""
    iei, raw = item
    spec = ENTRY_SPECS[iei]
    fast = outcome(lambda: decode_entry(iei, raw))
    reference = outcome(lambda: decode_group(spec, raw, reference=True))
    generic = outcome(lambda: decode_group(spec, raw))
    assert generic == reference
    if reference[0] == "ok":
        assert fast == reference
    else:
        assert fast[0] == "error"  # any defect is INVALID_ENTRY for that entry
    # The hand-written shortcut never accepts what construct refuses, nor differs in value.
    shortcut = _FAST_ENTRY.get(iei)
    if shortcut is not None:
        hit = shortcut(raw)
        if hit is not None:
            assert reference == ("ok", hit)
    # The session's reader gives the same.
    reader = BulkReader(next(t for t, s in BULK_SPECS.items() if s.entry == iei), ENTRY_DECODERS)
    got = reader.feed_entry(raw)
    if reference[0] == "ok":
        assert got == reference[1]
    else:
        assert isinstance(got, WireError)


@DIFF
@given(ws.any_profiles, st.data())
def test_profiles(profile: Any, data: st.DataObject) -> None:
    raw = encode_group(PROFILE_SPEC, profile)
    raw = data.draw(st.one_of(st.just(raw), mutated([raw or b"\x30\x00\x01\x01"])))
    assert_same(lambda: decode_group(PROFILE_SPEC, raw),
                lambda: decode_group(PROFILE_SPEC, raw, reference=True))


@DIFF
@given(st.one_of(ws.registration_response_entries, ws.deregistration_response_entries))
def test_fast_response_entry_encoder(entry: Any) -> None:
    """encode_entry's shortcut against the generic table-driven encoder."""
    from wire.messages import ENTRY_IEI_OF

    iei = ENTRY_IEI_OF[type(entry)]
    assert encode_entry(entry) == encode_ie(iei, encode_group(ENTRY_SPECS[iei], entry))


@DIFF
@given(st.one_of(ws.registration_response_entries, ws.deregistration_response_entries))
def test_result_encoders(entry: Any) -> None:
    """Session.send_bulk_results' encoders against encode_entry of the same answer (entries
    whose result and cause agree: the only ones an answer tuple can express)."""
    from hypothesis import assume

    from wire.messages import ENTRY_IEI_OF, RESULT_ENCODERS

    assume((entry.result == 0) == (entry.failure_cause is None))
    encode = RESULT_ENCODERS[ENTRY_IEI_OF[type(entry)]]
    assert_same(lambda: encode(entry.ue_service_id, entry.failure_cause, entry.retry_after),
                lambda: encode_entry(entry))


@DIFF
@given(st.one_of(ws.registration_responses, ws.deregistration_responses))
def test_fast_single_response_encoder(message: Any) -> None:
    """encode_message's shortcut for single responses against the generic encoder."""
    message_type = type(message).message_type
    body = encode_group(MESSAGE_SPECS[message_type], message)
    assert encode_message(message) == encode_frame(message_type, message.transaction_id, body)


@DIFF
@given(st.one_of(ws.registration_responses, ws.deregistration_responses),
       st.sampled_from([4096, 65535]))
def test_single_result_encoders(message: Any, max_frame_size: int) -> None:
    """Session.send_result's encoders against encode_message of the same response (responses
    whose result and cause agree, without unknown IEs: the only ones its fields express)."""
    from hypothesis import assume

    from wire.messages import SINGLE_RESULT_ENCODERS

    assume((message.result == 0) == (message.failure_cause is None) and not message.unknown_ies)
    encode = SINGLE_RESULT_ENCODERS[type(message).message_type]
    assert_same(lambda: encode(message.transaction_id, message.ue_service_id,
                               message.failure_cause, message.retry_after, max_frame_size),
                lambda: encode_message(message, max_frame_size=max_frame_size))


def test_the_single_response_shortcut_is_exercised() -> None:
    """Success and failure shapes do take the shortcut (else the test above proves little)."""
    for cls in (UeRegistrationResponse, UeDeregistrationResponse):
        assert _fast_single_response(cls(7, "ue-1@gw1.example", 0)) is not None
        assert _fast_single_response(cls(7, "ue-1@gw1.example", 1, 3)) is not None
        assert _fast_single_response(cls(7, "ue-1@gw1.example", 1, 3, 500)) is None


@pytest.mark.parametrize("iei", list(_FAST_ENTRY), ids=lambda i: i.name)
def test_the_shortcut_is_exercised(iei: IEI) -> None:
    """The hand-written decoders do take the common shapes (else the test above is empty)."""
    entry = ENTRY_SPECS[iei].cls("ue-1@gw1.example", bytes(32))
    assert _FAST_ENTRY[iei](encode_entry(entry)[3:]) == entry
