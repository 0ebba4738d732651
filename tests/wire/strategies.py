"""Hypothesis strategies for every wire-v1 message and IE (values up to their maximum sizes)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from hypothesis import strategies as st

from wire.constants import (
    APPLICATION_DATA_MAX,
    DIAGNOSTIC_MAX,
    IEI,
    NODE_NAME_MAX,
    TRIGGERING_UE_IDENTIFIER_MAX,
    UE_SERVICE_ID_MAX,
    FailureCause,
    MessageType,
)
from wire.messages import (
    MESSAGE_SPECS,
    BulkMessage,
    DeregistrationEntry,
    DeregistrationResponseEntry,
    DigestRequest,
    DigestResponse,
    Error,
    Goodbye,
    Hello,
    HelloAck,
    Keepalive,
    KeepaliveAck,
    ListedUe,
    ListRequest,
    Profile,
    RegistrationEntry,
    RegistrationResponseEntry,
    UeDeregistrationRequest,
    UeDeregistrationResponse,
    UeRegistrationRequest,
    UeRegistrationResponse,
)

U8 = st.integers(0, 0xFF)
U16 = st.integers(0, 0xFFFF)
U32 = st.one_of(st.integers(0, 0xFFFF_FFFF), st.sampled_from([0, 1, 0xFFFF_FFFF]))

# Characters by UTF-8 width, without C0/C1 controls or surrogates (wire-v1 §3).
_CLEAN = st.characters(blacklist_categories=("Cs",),
                       blacklist_characters=[chr(c) for c in (*range(0x20), *range(0x80, 0xA0))])
_ANY = st.characters(blacklist_categories=("Cs",))
_WIDE = ["a", "\x7f", "é", "ÿ", "€", "中", "😀", "\U0010fffd"]  # 1, 1, 2, 2, 3, 3, 4, 4 octets


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


@st.composite
def _exactly(draw: Any, octets: int, alphabet: list[str]) -> str:
    """Text of exactly `octets` UTF-8 octets, mixing widths (multibyte at the limit)."""
    wide = draw(st.text(st.sampled_from(alphabet), max_size=octets // 4))
    pad = octets - _utf8_len(wide)
    split = draw(st.integers(0, len(wide)))
    return wide[:split] + "a" * pad + wide[split:]


def text(min_octets: int, max_octets: int, *, controls: bool) -> st.SearchStrategy[str]:
    """UTF-8 text of min..max octets; the maximum itself is drawn often."""
    alphabet = _ANY if controls else _CLEAN
    bounded = st.text(alphabet, min_size=min_octets, max_size=max(min_octets, max_octets // 4))
    return st.one_of(bounded, _exactly(max_octets, _WIDE), _exactly(max(min_octets, 1), _WIDE))


ue_service_ids = text(1, UE_SERVICE_ID_MAX, controls=False)
node_names = text(1, NODE_NAME_MAX, controls=True)
diagnostics = st.one_of(st.just(""), text(1, DIAGNOSTIC_MAX, controls=True))
credentials = st.binary(min_size=32, max_size=32)
tids = st.integers(1, 0x7FFF_FFFF)
any_tids = st.integers(0, 0xFFFF_FFFF)


def _opt(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


profiles = st.builds(
    Profile,
    ue_type=_opt(st.sampled_from([1, 2])),
    triggering_ue_identifier=_opt(text(1, TRIGGERING_UE_IDENTIFIER_MAX, controls=False)),
    triggering_port=_opt(U16),
    triggering_protocol=_opt(st.sampled_from([1, 2, 3])),
    communication_availability=_opt(st.tuples(U32, U32)),
    maximum_segment_size=_opt(U32),
    application_data=_opt(st.one_of(st.binary(max_size=APPLICATION_DATA_MAX),
                                    st.binary(min_size=APPLICATION_DATA_MAX,
                                              max_size=APPLICATION_DATA_MAX))),
)
full_profiles = st.builds(
    Profile,
    ue_type=st.just(2),
    triggering_ue_identifier=_exactly(TRIGGERING_UE_IDENTIFIER_MAX, _WIDE),
    triggering_port=st.just(0xFFFF),
    triggering_protocol=st.just(3),
    communication_availability=st.just((0xFFFF_FFFF, 0xFFFF_FFFF)),
    maximum_segment_size=st.just(0xFFFF_FFFF),
    application_data=st.binary(min_size=APPLICATION_DATA_MAX, max_size=APPLICATION_DATA_MAX),
)
any_profiles = st.one_of(profiles, full_profiles)

registration_entries = st.builds(RegistrationEntry, ue_service_ids, _opt(credentials),
                                 _opt(any_profiles))
deregistration_entries = st.builds(DeregistrationEntry, ue_service_ids, _opt(credentials),
                                   _opt(st.just(1)))
listed_ues = st.builds(ListedUe, ue_service_ids, st.binary(min_size=16, max_size=16))


@st.composite
def _response_fields(draw: Any) -> dict[str, Any]:
    failed = draw(st.booleans())
    cause = draw(st.one_of(st.sampled_from(list(FailureCause)).map(int), U8)) if failed else None
    uid = draw(ue_service_ids)
    if cause == FailureCause.INVALID_ENTRY and draw(st.booleans()):
        uid = ""  # wire-v1 §3: 0 octets only answering an entry that had none
    return {"ue_service_id": uid, "result": int(failed), "failure_cause": cause,
            "retry_after": draw(_opt(U32))}


registration_response_entries = _response_fields().map(lambda f: RegistrationResponseEntry(**f))
deregistration_response_entries = _response_fields().map(
    lambda f: DeregistrationResponseEntry(**f))

ENTRIES = {
    MessageType.BULK_REGISTRATION_REQUEST: registration_entries,
    MessageType.BULK_DEREGISTRATION_REQUEST: deregistration_entries,
    MessageType.BULK_REGISTRATION_RESPONSE: registration_response_entries,
    MessageType.BULK_DEREGISTRATION_RESPONSE: deregistration_response_entries,
    MessageType.LIST_RESPONSE: listed_ues,
}

# Unknown IEIs with bit 7 clear (skipped, kept for re-encoding) and with it set.
_KNOWN = {int(i) for i in IEI}
unknown_optional_ieis = st.integers(0x00, 0x7F).filter(lambda i: i not in _KNOWN)
unknown_mandatory_ieis = st.integers(0x80, 0xFF).filter(lambda i: i not in _KNOWN)


@st.composite
def unknown_ies(draw: Any, known_present: int) -> tuple[tuple[int, int, bytes], ...]:
    n = draw(st.integers(0, 3))
    positions = sorted(draw(st.lists(st.integers(0, known_present), min_size=n, max_size=n)))
    return tuple((p, draw(unknown_optional_ieis), draw(st.binary(max_size=40))) for p in positions)


def _with_unknown(base: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Add unknown optional IEs at random places between the message's known IEs."""

    @st.composite
    def build(draw: Any) -> Any:
        message = draw(base)
        spec = MESSAGE_SPECS[type(message).message_type]
        present = sum(getattr(message, f.attr) is not None for f in spec.fields)
        extra = draw(st.one_of(st.just(()), unknown_ies(present)))
        return replace(message, unknown_ies=extra)

    return build()


def _response(cls: type) -> st.SearchStrategy[Any]:
    return st.tuples(tids, _response_fields()).map(
        lambda t: cls(transaction_id=t[0], **{**t[1], "ue_service_id": t[1]["ue_service_id"]
                                              or "x"}))


hellos = st.builds(Hello, any_tids, gateway_type=st.sampled_from([1, 2]), protocol_version=U8,
                   node_name=_opt(node_names), max_frame_size=_opt(U32))
hello_acks = st.builds(HelloAck, any_tids, server_nonce=st.binary(min_size=32, max_size=32),
                       max_frame_size=U32, max_bulk_entries=U32, max_outstanding=U16,
                       keepalive_interval=U32, bulk_allowed=st.sampled_from([0, 1]),
                       ue_authentication_required=st.sampled_from([0, 1]), protocol_version=U8,
                       node_name=_opt(node_names), sync_supported=_opt(st.just(1)))
keepalives = st.builds(Keepalive, any_tids)
keepalive_acks = st.builds(KeepaliveAck, any_tids)
goodbyes = st.builds(Goodbye, any_tids, U8, _opt(U32), _opt(diagnostics))
errors = st.builds(Error, any_tids, U8, _opt(U32), _opt(diagnostics))
registration_requests = st.builds(UeRegistrationRequest, tids, ue_service_ids, _opt(credentials),
                                  _opt(any_profiles))
deregistration_requests = st.builds(UeDeregistrationRequest, tids, ue_service_ids,
                                    _opt(credentials), _opt(st.just(1)))
bucket_bits = st.integers(0, 12)
digest_requests = st.builds(DigestRequest, tids, bucket_bits)
# One frame of DIGEST RESPONSE (the whole response when it covers every bucket).
digest_responses = st.builds(DigestResponse, any_tids, st.integers(0, 4095),
                             st.integers(1, 8).map(lambda n: bytes(range(16)) * n),
                             _opt(bucket_bits))


@st.composite
def _list_requests(draw: Any) -> ListRequest:
    bits = draw(bucket_bits)
    buckets = draw(st.sets(st.integers(0, (1 << bits) - 1), min_size=1, max_size=20))
    return ListRequest(draw(tids), bits, tuple(sorted(buckets)))


list_requests = _list_requests()
registration_responses = _response(UeRegistrationResponse)
deregistration_responses = _response(UeDeregistrationResponse)

SINGLE = {
    MessageType.HELLO: hellos,
    MessageType.HELLO_ACK: hello_acks,
    MessageType.KEEPALIVE: keepalives,
    MessageType.KEEPALIVE_ACK: keepalive_acks,
    MessageType.GOODBYE: goodbyes,
    MessageType.ERROR: errors,
    MessageType.UE_REGISTRATION_REQUEST: registration_requests,
    MessageType.UE_DEREGISTRATION_REQUEST: deregistration_requests,
    MessageType.UE_REGISTRATION_RESPONSE: registration_responses,
    MessageType.UE_DEREGISTRATION_RESPONSE: deregistration_responses,
    MessageType.DIGEST_REQUEST: digest_requests,
    MessageType.DIGEST_RESPONSE: digest_responses,
    MessageType.LIST_REQUEST: list_requests,
}
SINGLE_WITH_UNKNOWN = {t: _with_unknown(s) for t, s in SINGLE.items()}


def bulk_messages(message_type: MessageType, *, max_entries: int = 6) -> st.SearchStrategy[Any]:
    return st.builds(
        lambda tid, entries: BulkMessage(message_type, tid, len(entries), tuple(entries)),
        tids, st.lists(ENTRIES[message_type], max_size=max_entries))


BULK = {t: bulk_messages(t) for t in ENTRIES}
any_message = st.one_of(*SINGLE_WITH_UNKNOWN.values(), *BULK.values())

# IEI -> values of that IE (what decode_value returns and encode_value takes).
_GROUPED = st.binary(max_size=64)
IE_VALUES: dict[IEI, st.SearchStrategy[Any]] = {
    IEI.UE_SERVICE_ID: st.one_of(st.just(""), ue_service_ids),
    IEI.UE_CREDENTIAL: credentials,
    IEI.NON_MSGIN5G_UE_PROFILE: _GROUPED,
    IEI.REGISTRATION_RESULT: st.sampled_from([0, 1]),
    IEI.DEREGISTRATION_RESULT: st.sampled_from([0, 1]),
    IEI.FAILURE_CAUSE: U8,
    IEI.BULK_REGISTRATION_INDICATOR: st.just(1),
    IEI.BULK_REGISTRATION_RESPONSE_INDICATOR: st.just(1),
    IEI.BULK_DEREGISTRATION_INDICATOR: st.just(1),
    IEI.BULK_DEREGISTRATION_RESPONSE_INDICATOR: st.just(1),
    IEI.NUMBER_OF_INDIVIDUAL_ENTRIES: U32,
    IEI.REGISTRATION_ENTRY: _GROUPED,
    IEI.REGISTRATION_RESPONSE_ENTRY: _GROUPED,
    IEI.DEREGISTRATION_ENTRY: _GROUPED,
    IEI.DEREGISTRATION_RESPONSE_ENTRY: _GROUPED,
    IEI.PROTOCOL_VERSION: U8,
    IEI.SERVER_NONCE: st.binary(min_size=32, max_size=32),
    IEI.MAXIMUM_FRAME_SIZE: U32,
    IEI.MAXIMUM_BULK_ENTRIES: U32,
    IEI.MAXIMUM_OUTSTANDING_TRANSACTIONS: U16,
    IEI.KEEPALIVE_INTERVAL: U32,
    IEI.NODE_NAME: node_names,
    IEI.BULK_ALLOWED: st.sampled_from([0, 1]),
    IEI.RETRY_AFTER: U32,
    IEI.ERROR_CAUSE: U8,
    IEI.DIAGNOSTIC: diagnostics,
    IEI.GATEWAY_TYPE: st.sampled_from([1, 2]),
    IEI.UE_AUTHENTICATION_REQUIRED: st.sampled_from([0, 1]),
    IEI.UE_TYPE: st.sampled_from([1, 2]),
    IEI.TRIGGERING_UE_IDENTIFIER: text(1, TRIGGERING_UE_IDENTIFIER_MAX, controls=False),
    IEI.TRIGGERING_PORT: U16,
    IEI.TRIGGERING_PROTOCOL: st.sampled_from([1, 2, 3]),
    IEI.COMMUNICATION_AVAILABILITY: st.tuples(U32, U32),
    IEI.MAXIMUM_SEGMENT_SIZE: U32,
    IEI.APPLICATION_DATA: st.one_of(st.binary(max_size=APPLICATION_DATA_MAX),
                                    st.binary(min_size=APPLICATION_DATA_MAX,
                                              max_size=APPLICATION_DATA_MAX)),
    IEI.SYNC_SUPPORTED: st.just(1),
    IEI.BUCKET_BITS: bucket_bits,
    IEI.FIRST_BUCKET: U16,
    IEI.BUCKET_DIGESTS: st.integers(1, 20).flatmap(
        lambda n: st.binary(min_size=16 * n, max_size=16 * n)),
    IEI.BUCKET_LIST: st.sets(U16, min_size=1, max_size=30).map(lambda v: tuple(sorted(v))),
    IEI.LISTED_UE: _GROUPED,
    IEI.UE_HASH: st.binary(min_size=16, max_size=16),
    IEI.RELEASE: st.just(1),
}
