"""Messages of wire-v1 §4–§5: dataclasses, their IE tables as data, and their codecs.

`MESSAGE_SPECS` / `ENTRY_SPECS` hold each message's IE table (order and M/O/C) as data, in the
manner of pycrate's MAND/OPT lists; one generic walker applies the rules of wire-v1 §3 to all of
them. Bulk messages are not decoded here as a whole: their IEs are streamed through
`bulk.BulkReader` (one per transaction, decoding entries with `ENTRY_DECODERS`), so a bulk
request is never held in memory; `BulkMessage`, `encode_bulk` and `decode_frames` are the
whole-message forms for tests and tools.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar

from .bulk import BULK_SPECS, BulkReader, BulkWriter, EntryDecoder, bulk_header_ies
from .constants import (
    APPLICATION_DATA_MAX,
    BUCKET_BITS_MAX,
    COMPREHENSION_REQUIRED,
    CREDENTIAL_SIZE,
    DEFAULT_MAX_FRAME_SIZE,
    DIGEST_SIZE,
    HEADER_SIZE,
    IEI,
    PROFILE_MAX,
    PROTOCOL_VERSION,
    TRIGGERING_UE_IDENTIFIER_MAX,
    UE_SERVICE_ID_MAX,
    ErrorCause,
    FailureCause,
    MessageType,
    Result,
)
from .errors import EntryError, InvalidMessage, LocalProtocolError, UnknownMandatoryIE, WireError
from .frames import encode_frame
from .ies import (
    FAST,
    IE_VALUE,
    KNOWN_IEIS,
    decode_value,
    encode_ie,
    octets_or_none,
    reference_split,
    reference_value,
    split_ies,
    text_or_none,
)


class Presence(Enum):
    M = "mandatory"
    O = "optional"
    C = "conditional"


# --- dataclasses -----------------------------------------------------------------------------


def frozen_builder(cls: type) -> Callable[..., Any]:
    """A fast constructor of the frozen slots dataclass `cls`, for the hot paths.

    A frozen dataclass's __init__ stores each field through object.__setattr__ (0.41 µs for a
    3-field entry). The function returned (0.25 µs) takes every field positionally, makes the
    object with object.__new__ and stores each field with its slot's own descriptor, which the
    frozen __setattr__ does not stand in front of: the result is an ordinary instance of `cls`,
    equal, hashable and frozen like one made by `cls(...)`, and no object ever changes class.
    Fields left out of the constructor (init=False, e.g. Profile.octets) are taken too, last.
    The body is generated straight-line code, as dataclasses generates __init__: the same
    stores in a loop take 0.46 µs. No __post_init__ runs, so classes with one are refused.
    docs/protocol.md §5 has the measurements.
    """
    names = [f.name for f in fields(cls)]
    if hasattr(cls, "__post_init__") or not all(
            type(cls.__dict__.get(name)).__name__ == "member_descriptor" for name in names):
        raise TypeError(f"{cls.__name__} is not a slots dataclass without __post_init__")
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls}
    for name in names:
        namespace[f"_set_{name}"] = cls.__dict__[name].__set__
    stores = "".join(f"    _set_{name}(obj, {name})\n" for name in names)
    exec(f"def build({', '.join(names)}):\n    obj = _new(_cls)\n{stores}    return obj\n",
         namespace)
    build = namespace["build"]
    build.__qualname__ = build.__name__ = f"build_{cls.__name__}"
    probe = build(*(None for _ in names))
    assert probe == cls(*(None for f in fields(cls) if f.init)) and type(probe) is cls
    return build


@dataclass(frozen=True, slots=True)
class Profile:
    """Non-MSGin5G UE profile (IEI 0x03), all sub-IEs optional (wire-v1 §3)."""

    ue_type: int | None = None
    triggering_ue_identifier: str | None = None
    triggering_port: int | None = None
    triggering_protocol: int | None = None
    communication_availability: tuple[int, int] | None = None
    maximum_segment_size: int | None = None
    application_data: bytes | None = None
    # The canonical value octets (`profile_octets`), when the decoder already holds them: a
    # profile read by the fast path *is* its canonical form, so the server stores the octets
    # it received instead of encoding them again. Not a field of the profile's meaning: left
    # out of equality, repr, the constructor and message_fields.
    octets: bytes | None = dataclasses.field(default=None, init=False, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RegistrationEntry:
    ue_service_id: str
    credential: bytes | None = None
    profile: Profile | None = None


@dataclass(frozen=True, slots=True)
class DeregistrationEntry:
    ue_service_id: str
    credential: bytes | None = None
    # v1.1 Release (docs/protocol.md §6.4): 1 asks the server to decide without a credential.
    release: int | None = None


@dataclass(frozen=True, slots=True)
class RegistrationResponseEntry:
    ue_service_id: str
    result: int
    failure_cause: int | None = None
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class DeregistrationResponseEntry:
    ue_service_id: str
    result: int
    failure_cause: int | None = None
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class ListedUe:
    """An entry of LIST RESPONSE (v1.1, docs/protocol.md §6.2): a UE the server holds for
    this gateway and its ue_hash (§6.1)."""

    ue_service_id: str
    ue_hash: bytes


Entry = (
    RegistrationEntry | DeregistrationEntry
    | RegistrationResponseEntry | DeregistrationResponseEntry | ListedUe
)


@dataclass(frozen=True, slots=True)
class Hello:
    message_type: ClassVar[MessageType] = MessageType.HELLO
    transaction_id: int
    gateway_type: int
    protocol_version: int = PROTOCOL_VERSION
    node_name: str | None = None
    max_frame_size: int | None = None
    # Unknown optional IEs kept for byte-exact re-encoding: (known IEs before it, IEI, value).
    unknown_ies: tuple[tuple[int, int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class HelloAck:
    message_type: ClassVar[MessageType] = MessageType.HELLO_ACK
    transaction_id: int
    server_nonce: bytes
    max_frame_size: int
    max_bulk_entries: int
    max_outstanding: int
    keepalive_interval: int
    bulk_allowed: int
    ue_authentication_required: int
    protocol_version: int = PROTOCOL_VERSION
    node_name: str | None = None
    # v1.1: 1 when the server speaks registry sync (docs/protocol.md §6); a v1 server omits it.
    sync_supported: int | None = None
    # Unknown optional IEs kept for byte-exact re-encoding: (known IEs before it, IEI, value).
    unknown_ies: tuple[tuple[int, int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Keepalive:
    message_type: ClassVar[MessageType] = MessageType.KEEPALIVE
    transaction_id: int
    # Unknown optional IEs kept for byte-exact re-encoding: (known IEs before it, IEI, value).
    unknown_ies: tuple[tuple[int, int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class KeepaliveAck:
    message_type: ClassVar[MessageType] = MessageType.KEEPALIVE_ACK
    transaction_id: int
    # Unknown optional IEs kept for byte-exact re-encoding: (known IEs before it, IEI, value).
    unknown_ies: tuple[tuple[int, int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Goodbye:
    message_type: ClassVar[MessageType] = MessageType.GOODBYE
    transaction_id: int
    error_cause: int
    retry_after: int | None = None
    diagnostic: str | None = None
    # Unknown optional IEs kept for byte-exact re-encoding: (known IEs before it, IEI, value).
    unknown_ies: tuple[tuple[int, int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Error:
    message_type: ClassVar[MessageType] = MessageType.ERROR
    transaction_id: int
    error_cause: int
    retry_after: int | None = None
    diagnostic: str | None = None
    # Unknown optional IEs kept for byte-exact re-encoding: (known IEs before it, IEI, value).
    unknown_ies: tuple[tuple[int, int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class UeRegistrationRequest:
    message_type: ClassVar[MessageType] = MessageType.UE_REGISTRATION_REQUEST
    transaction_id: int
    ue_service_id: str
    credential: bytes | None = None
    profile: Profile | None = None
    # Unknown optional IEs kept for byte-exact re-encoding: (known IEs before it, IEI, value).
    unknown_ies: tuple[tuple[int, int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class UeRegistrationResponse:
    message_type: ClassVar[MessageType] = MessageType.UE_REGISTRATION_RESPONSE
    transaction_id: int
    ue_service_id: str
    result: int
    failure_cause: int | None = None
    retry_after: int | None = None
    # Unknown optional IEs kept for byte-exact re-encoding: (known IEs before it, IEI, value).
    unknown_ies: tuple[tuple[int, int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class UeDeregistrationRequest:
    message_type: ClassVar[MessageType] = MessageType.UE_DEREGISTRATION_REQUEST
    transaction_id: int
    ue_service_id: str
    credential: bytes | None = None
    # v1.1 Release (docs/protocol.md §6.4): 1 asks the server to decide without a credential.
    release: int | None = None
    # Unknown optional IEs kept for byte-exact re-encoding: (known IEs before it, IEI, value).
    unknown_ies: tuple[tuple[int, int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class UeDeregistrationResponse:
    message_type: ClassVar[MessageType] = MessageType.UE_DEREGISTRATION_RESPONSE
    transaction_id: int
    ue_service_id: str
    result: int
    failure_cause: int | None = None
    retry_after: int | None = None
    # Unknown optional IEs kept for byte-exact re-encoding: (known IEs before it, IEI, value).
    unknown_ies: tuple[tuple[int, int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class DigestRequest:
    """v1.1 (docs/protocol.md §6.2): the gateway asks for its 2^bucket_bits bucket digests."""

    message_type: ClassVar[MessageType] = MessageType.DIGEST_REQUEST
    transaction_id: int
    bucket_bits: int
    # Unknown optional IEs kept for byte-exact re-encoding: (known IEs before it, IEI, value).
    unknown_ies: tuple[tuple[int, int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class DigestResponse:
    """v1.1: one frame of DIGEST RESPONSE (the digests of buckets first_bucket ...), or, from
    decode_frames / for encode_message, the whole response (first_bucket 0, every digest).
    `bucket_bits` is in the first frame only. `digests` holds n x 16 octets."""

    message_type: ClassVar[MessageType] = MessageType.DIGEST_RESPONSE
    transaction_id: int
    first_bucket: int
    digests: bytes
    bucket_bits: int | None = None
    # Unknown optional IEs kept for byte-exact re-encoding: (known IEs before it, IEI, value).
    unknown_ies: tuple[tuple[int, int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class ListRequest:
    """v1.1: the gateway asks for the UEs the server holds for it in `buckets` (of 2^b)."""

    message_type: ClassVar[MessageType] = MessageType.LIST_REQUEST
    transaction_id: int
    bucket_bits: int
    buckets: tuple[int, ...]
    # Unknown optional IEs kept for byte-exact re-encoding: (known IEs before it, IEI, value).
    unknown_ies: tuple[tuple[int, int, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class BulkMessage:
    """A whole bulk message, for tests, tools and small bulks; the session streams instead."""

    message_type: MessageType
    transaction_id: int
    count: int
    entries: tuple[Any, ...] = ()


Message = (
    Hello
    | HelloAck
    | Keepalive
    | KeepaliveAck
    | Goodbye
    | Error
    | UeRegistrationRequest
    | UeRegistrationResponse
    | UeDeregistrationRequest
    | UeDeregistrationResponse
    | DigestRequest
    | DigestResponse
    | ListRequest
    | BulkMessage
)

# --- IE tables as data -----------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    iei: IEI
    attr: str
    presence: Presence


class GroupSpec:
    """One IE table: the IEs of a message or grouped IE, in order, with their presence."""

    def __init__(self, name: str, cls: type, *specs: tuple[IEI, str, Presence]) -> None:
        self.name = name
        self.cls = cls
        self.fields = tuple(FieldSpec(i, a, p) for i, a, p in specs)
        self.index = {int(f.iei): n for n, f in enumerate(self.fields)}
        self.mandatory = tuple(f for f in self.fields if f.presence is Presence.M)
        self.attrs = {f.attr for f in self.fields}
        self.keeps_unknown = hasattr(cls, "unknown_ies")


M, O, C = Presence.M, Presence.O, Presence.C

PROFILE_SPEC = GroupSpec(
    "Non-MSGin5G UE profile",
    Profile,
    (IEI.UE_TYPE, "ue_type", O),
    (IEI.TRIGGERING_UE_IDENTIFIER, "triggering_ue_identifier", O),
    (IEI.TRIGGERING_PORT, "triggering_port", O),
    (IEI.TRIGGERING_PROTOCOL, "triggering_protocol", O),
    (IEI.COMMUNICATION_AVAILABILITY, "communication_availability", O),
    (IEI.MAXIMUM_SEGMENT_SIZE, "maximum_segment_size", O),
    (IEI.APPLICATION_DATA, "application_data", O),
)

_REG = ((IEI.UE_SERVICE_ID, "ue_service_id", M), (IEI.UE_CREDENTIAL, "credential", C),
        (IEI.NON_MSGIN5G_UE_PROFILE, "profile", O))
_DEREG = ((IEI.UE_SERVICE_ID, "ue_service_id", M), (IEI.UE_CREDENTIAL, "credential", C),
          (IEI.RELEASE, "release", O))
_REG_RSP = ((IEI.UE_SERVICE_ID, "ue_service_id", M), (IEI.REGISTRATION_RESULT, "result", M),
            (IEI.FAILURE_CAUSE, "failure_cause", C), (IEI.RETRY_AFTER, "retry_after", O))
_DEREG_RSP = ((IEI.UE_SERVICE_ID, "ue_service_id", M), (IEI.DEREGISTRATION_RESULT, "result", M),
              (IEI.FAILURE_CAUSE, "failure_cause", C), (IEI.RETRY_AFTER, "retry_after", O))
_CAUSE = ((IEI.ERROR_CAUSE, "error_cause", M), (IEI.RETRY_AFTER, "retry_after", O),
          (IEI.DIAGNOSTIC, "diagnostic", O))

ENTRY_SPECS: dict[IEI, GroupSpec] = {
    IEI.REGISTRATION_ENTRY: GroupSpec("Registration entry", RegistrationEntry, *_REG),
    IEI.DEREGISTRATION_ENTRY: GroupSpec("De-registration entry", DeregistrationEntry, *_DEREG),
    IEI.REGISTRATION_RESPONSE_ENTRY: GroupSpec(
        "Registration response entry", RegistrationResponseEntry, *_REG_RSP),
    IEI.DEREGISTRATION_RESPONSE_ENTRY: GroupSpec(
        "De-registration response entry", DeregistrationResponseEntry, *_DEREG_RSP),
    IEI.LISTED_UE: GroupSpec(
        "Listed UE", ListedUe,
        (IEI.UE_SERVICE_ID, "ue_service_id", M), (IEI.UE_HASH, "ue_hash", M)),
}
ENTRY_IEI_OF: dict[type, IEI] = {spec.cls: iei for iei, spec in ENTRY_SPECS.items()}
GROUP_SPECS: dict[IEI, GroupSpec] = {IEI.NON_MSGIN5G_UE_PROFILE: PROFILE_SPEC, **ENTRY_SPECS}

MESSAGE_SPECS: dict[MessageType, GroupSpec] = {
    MessageType.HELLO: GroupSpec(
        "HELLO", Hello,
        (IEI.PROTOCOL_VERSION, "protocol_version", M), (IEI.GATEWAY_TYPE, "gateway_type", M),
        (IEI.NODE_NAME, "node_name", O), (IEI.MAXIMUM_FRAME_SIZE, "max_frame_size", O)),
    MessageType.HELLO_ACK: GroupSpec(
        "HELLO ACK", HelloAck,
        (IEI.PROTOCOL_VERSION, "protocol_version", M), (IEI.SERVER_NONCE, "server_nonce", M),
        (IEI.MAXIMUM_FRAME_SIZE, "max_frame_size", M),
        (IEI.MAXIMUM_BULK_ENTRIES, "max_bulk_entries", M),
        (IEI.MAXIMUM_OUTSTANDING_TRANSACTIONS, "max_outstanding", M),
        (IEI.KEEPALIVE_INTERVAL, "keepalive_interval", M), (IEI.BULK_ALLOWED, "bulk_allowed", M),
        (IEI.UE_AUTHENTICATION_REQUIRED, "ue_authentication_required", M),
        (IEI.NODE_NAME, "node_name", O), (IEI.SYNC_SUPPORTED, "sync_supported", O)),
    MessageType.KEEPALIVE: GroupSpec("KEEPALIVE", Keepalive),
    MessageType.KEEPALIVE_ACK: GroupSpec("KEEPALIVE ACK", KeepaliveAck),
    MessageType.GOODBYE: GroupSpec("GOODBYE", Goodbye, *_CAUSE),
    MessageType.ERROR: GroupSpec("ERROR", Error, *_CAUSE),
    MessageType.UE_REGISTRATION_REQUEST: GroupSpec(
        "UE REGISTRATION REQUEST", UeRegistrationRequest, *_REG),
    MessageType.UE_REGISTRATION_RESPONSE: GroupSpec(
        "UE REGISTRATION RESPONSE", UeRegistrationResponse, *_REG_RSP),
    MessageType.UE_DEREGISTRATION_REQUEST: GroupSpec(
        "UE DE-REGISTRATION REQUEST", UeDeregistrationRequest, *_DEREG),
    MessageType.UE_DEREGISTRATION_RESPONSE: GroupSpec(
        "UE DE-REGISTRATION RESPONSE", UeDeregistrationResponse, *_DEREG_RSP),
    MessageType.DIGEST_REQUEST: GroupSpec(
        "DIGEST REQUEST", DigestRequest, (IEI.BUCKET_BITS, "bucket_bits", M)),
    # One frame of the response: Bucket bits is in the first frame only (wire/sync.py checks).
    MessageType.DIGEST_RESPONSE: GroupSpec(
        "DIGEST RESPONSE", DigestResponse, (IEI.BUCKET_BITS, "bucket_bits", O),
        (IEI.FIRST_BUCKET, "first_bucket", M), (IEI.BUCKET_DIGESTS, "digests", M)),
    MessageType.LIST_REQUEST: GroupSpec(
        "LIST REQUEST", ListRequest, (IEI.BUCKET_BITS, "bucket_bits", M),
        (IEI.BUCKET_LIST, "buckets", M)),
}
MESSAGE_CLASSES: dict[type, MessageType] = {s.cls: t for t, s in MESSAGE_SPECS.items()}


# --- decoding --------------------------------------------------------------------------------


def _walk(spec: GroupSpec, pairs: Iterable[tuple[int, bytes]], reference: bool) -> dict[str, Any]:
    """Apply wire-v1 §3's rules to an IE list: order, duplicates, 0x80 bit, presence."""
    values: dict[str, Any] = {}
    unknown: list[tuple[int, int, bytes]] = []
    last = -1
    index = spec.index
    for iei, raw in pairs:
        pos = index.get(iei)
        if pos is None:
            if iei in KNOWN_IEIS:
                raise InvalidMessage(f"{spec.name}: IE {IEI(iei).name} does not belong here")
            if iei & COMPREHENSION_REQUIRED:
                raise UnknownMandatoryIE(f"{spec.name}: unknown IEI 0x{iei:02x}")
            # wire-v1 §3: unknown IEI with bit 7 clear is skipped (kept aside for re-encoding).
            if spec.keeps_unknown:
                unknown.append((len(values), iei, bytes(raw)))
            continue
        if pos <= last:
            word = "twice" if pos == last else "out of order"
            raise InvalidMessage(f"{spec.name}: IE {IEI(iei).name} {word}")
        last = pos
        field = spec.fields[pos]
        group = GROUP_SPECS.get(field.iei)
        if group is not None:
            if len(raw) > GROUP_MAX.get(field.iei, 0xFFFF):
                raise InvalidMessage(f"{spec.name}: IE {field.iei.name} too long")
            fast = None if reference or group is not PROFILE_SPEC else _fast_profile(raw)
            values[field.attr] = (fast if fast is not None
                                  else decode_group(group, raw, reference=reference))
        elif reference:
            values[field.attr] = reference_value(field.iei, raw)
        else:
            values[field.attr] = decode_value(iei, raw)
    for field in spec.mandatory:
        if field.attr not in values:
            raise InvalidMessage(f"{spec.name}: mandatory IE {field.iei.name} missing")
    _check_conditions(spec, values)
    if unknown:
        values["unknown_ies"] = tuple(unknown)
    return values


GROUP_MAX = {IEI.NON_MSGIN5G_UE_PROFILE: PROFILE_MAX}


def _check_conditions(spec: GroupSpec, values: dict[str, Any]) -> None:
    if "result" in spec.attrs:
        # wire-v1 §3: "Failure cause is present if and only if the result is 1".
        failed = values["result"] == Result.FAILURE
        if failed != ("failure_cause" in values):
            raise InvalidMessage(f"{spec.name}: Failure cause present iff result is failure")
        invalid_entry = values.get("failure_cause") == FailureCause.INVALID_ENTRY
        if values["ue_service_id"] == "" and not invalid_entry:
            raise InvalidMessage(f"{spec.name}: empty UE Service ID outside INVALID_ENTRY")
        if spec.cls in (UeRegistrationResponse, UeDeregistrationResponse) and not values[
            "ue_service_id"
        ]:
            raise InvalidMessage(f"{spec.name}: empty UE Service ID")
    elif "ue_service_id" in values and values["ue_service_id"] == "":
        raise InvalidMessage(f"{spec.name}: UE Service ID of 0 octets")
    elif spec.cls is ListRequest and values["buckets"][-1] >> values["bucket_bits"]:
        # docs/protocol.md §6.3: a bucket number >= 2^b (the list is ascending: the last).
        raise InvalidMessage(f"{spec.name}: bucket {values['buckets'][-1]} >= "
                             f"2^{values['bucket_bits']}")


def decode_group(spec: GroupSpec, body: bytes, *, reference: bool = False) -> Any:
    """Decode an IE list against `spec` into its dataclass."""
    pairs = reference_split(body) if reference else split_ies(body)
    return spec.cls(**_walk(spec, pairs, reference))


def decode_body(
    message_type: MessageType, transaction_id: int, body: bytes, *, reference: bool = False
) -> Message:
    """Decode the body of a complete non-bulk message."""
    if not reference:
        fast = _FAST_REQUEST.get(message_type)
        if fast is not None:
            values = fast[0](body)
            if values is not None:
                return fast[1](transaction_id, *values, ())
    spec = MESSAGE_SPECS[message_type]
    pairs = reference_split(body) if reference else split_ies(body)
    return spec.cls(transaction_id=transaction_id, **_walk(spec, pairs, reference))


def decode_entry(entry_iei: IEI, raw: bytes, *, reference: bool = False) -> Any:
    """Decode one bulk entry's value; any defect becomes EntryError (INVALID_ENTRY)."""
    try:
        if not reference:
            fast = _FAST_ENTRY.get(entry_iei)
            if fast is not None:
                hit = fast(raw)
                if hit is not None:
                    return hit
        return decode_group(ENTRY_SPECS[entry_iei], raw, reference=reference)
    except WireError as exc:
        error = EntryError(str(exc))
        error.ue_service_id = _entry_ue_service_id(raw)
        raise error from exc


# --- the hand-written fast path (held to the reference by tests/wire/test_differential.py) --
#
# Each function below accepts only a shape it checks completely and returns None for anything
# else, so that the generic decoder (itself held to construct) decides: unknown IEs, errors,
# odd orders all take the generic path. The limits come from the same declarations.

_UE_TYPES = IE_VALUE[IEI.UE_TYPE].valids
_TRIGGERING_PROTOCOLS = IE_VALUE[IEI.TRIGGERING_PROTOCOL].valids
_TWO_U32 = struct.Struct(">II")
_U32 = struct.Struct(">I")
assert IE_VALUE[IEI.TRIGGERING_PORT].sizeof() == 2
assert IE_VALUE[IEI.MAXIMUM_SEGMENT_SIZE].sizeof() == 4
assert IE_VALUE[IEI.COMMUNICATION_AVAILABILITY].sizeof() == _TWO_U32.size
assert IE_VALUE[IEI.UE_CREDENTIAL].sizeof() == CREDENTIAL_SIZE
_UID, _CREDENTIAL, _PROFILE_IEI, _FIRST_SUB_IE = (
    int(IEI.UE_SERVICE_ID), int(IEI.UE_CREDENTIAL), int(IEI.NON_MSGIN5G_UE_PROFILE),
    int(IEI.UE_TYPE))

_REGISTRATION_ENTRY = frozen_builder(RegistrationEntry)
_DEREGISTRATION_ENTRY = frozen_builder(DeregistrationEntry)
_PROFILE = frozen_builder(Profile)


def _fast_profile(raw: bytes) -> Profile | None:
    """A profile made of known sub-IEs in order, every value valid; else None."""
    n = len(raw)
    pos = 0
    last = -1
    ue_type = identifier = port = protocol = availability = segment = data = None
    while pos < n:
        if n - pos < 3:
            return None
        k = raw[pos] - _FIRST_SUB_IE
        start = pos + 3
        pos = start + ((raw[pos + 1] << 8) | raw[pos + 2])
        if k <= last or k > 6 or pos > n:
            return None
        last = k
        length = pos - start
        if k == 0:
            if length != 1 or raw[start] not in _UE_TYPES:
                return None
            ue_type = raw[start]
        elif k == 1:
            identifier = text_or_none(raw, start, pos, 1, TRIGGERING_UE_IDENTIFIER_MAX)
            if identifier is None:
                return None
        elif k == 2:
            if length != 2:
                return None
            port = (raw[start] << 8) | raw[start + 1]
        elif k == 3:
            if length != 1 or raw[start] not in _TRIGGERING_PROTOCOLS:
                return None
            protocol = raw[start]
        elif k == 4:
            if length != 8:
                return None
            availability = _TWO_U32.unpack_from(raw, start)
        elif k == 5:
            if length != 4:
                return None
            segment = _U32.unpack_from(raw, start)[0]
        else:
            if length > APPLICATION_DATA_MAX:
                return None
            data = raw[start:pos]
    # Known sub-IEs, each once, in IEI order, bit 7 clear, every value valid: `raw` is the
    # canonical value (tests/wire/test_profile_octets.py holds it to encode_group).
    return _PROFILE(ue_type, identifier, port, protocol, availability, segment, data, raw)


def _fast_entry_decoder(build: Callable[..., Any], with_profile: bool) -> Callable[[bytes], Any]:
    """The shortcut for one entry IEI: UE Service ID, optional credential, then (Registration
    entry, `with_profile`) an optional profile; `build` makes the entry. Anything else (a
    De-registration entry with Release, v1.1) takes the generic path."""

    def decode(raw: bytes) -> Any:
        n = len(raw)
        if n < 4 or raw[0] != _UID:
            return None
        pos = 3 + ((raw[1] << 8) | raw[2])
        if pos > n:
            return None
        uid = text_or_none(raw, 3, pos, 1, UE_SERVICE_ID_MAX)
        if uid is None:
            return None
        credential = profile = None
        if pos < n and raw[pos] == _CREDENTIAL:
            end = pos + 3 + CREDENTIAL_SIZE
            if end > n or raw[pos + 1] != 0 or raw[pos + 2] != CREDENTIAL_SIZE:
                return None
            credential = raw[pos + 3 : end]
            pos = end
        if pos < n:
            if not with_profile or n - pos < 3 or raw[pos] != _PROFILE_IEI:
                return None
            start = pos + 3
            if start + ((raw[pos + 1] << 8) | raw[pos + 2]) != n or n - start > PROFILE_MAX:
                return None
            profile = _fast_profile(raw[start:])
            if profile is None:
                return None
        # (A De-registration entry's third field is Release, which this shape never has.)
        return build(uid, credential, profile)

    return decode


def _entry_ue_service_id(raw: bytes) -> str:
    """The first UE Service ID IE of a malformed entry, if the IEs up to it are readable and
    its value is valid per wire-v1 §3 (1..255 octets of UTF-8, no C0/C1 controls); else "".

    An INVALID_ENTRY answer echoes it (docs/protocol.md), so the gateway sees which UE failed.
    """
    pos, n = 0, len(raw)
    while n - pos >= 3:
        end = pos + 3 + ((raw[pos + 1] << 8) | raw[pos + 2])
        if end > n:
            return ""
        if raw[pos] == _UID:
            return text_or_none(raw, pos + 3, end, 1, UE_SERVICE_ID_MAX) or ""
        pos = end
    return ""


_FAST_ENTRY = {
    IEI.REGISTRATION_ENTRY: _fast_entry_decoder(_REGISTRATION_ENTRY, True),
    IEI.DEREGISTRATION_ENTRY: _fast_entry_decoder(_DEREGISTRATION_ENTRY, False),
}


# A single (de-)registration request has the IEs of the matching entry's value, in the same
# order (wire-v1 §4): the entry's shortcut reads it (values as a tuple), the request is built
# around them. tests/wire/test_differential.py holds it to the generic decoder.
_FAST_REQUEST = {
    MessageType.UE_REGISTRATION_REQUEST: (
        _fast_entry_decoder(lambda *values: values, True), frozen_builder(UeRegistrationRequest)),
    MessageType.UE_DEREGISTRATION_REQUEST: (
        _fast_entry_decoder(lambda *values: values, False),
        frozen_builder(UeDeregistrationRequest)),
}


def _entry_decoder(entry_iei: IEI) -> Any:
    """decode_entry() for one entry IEI that returns the EntryError instead of raising it."""
    spec = ENTRY_SPECS[entry_iei]
    fast = _FAST_ENTRY.get(entry_iei)

    def decode(raw: bytes) -> Any:
        if fast is not None:
            hit = fast(raw)
            if hit is not None:
                return hit
        try:
            return decode_group(spec, raw)
        except WireError as exc:
            error = EntryError(str(exc))
            error.__cause__ = exc
            error.ue_service_id = _entry_ue_service_id(raw)
            return error

    return decode


# Per entry IEI: one entry's value -> the entry, or an EntryError (INVALID_ENTRY); never raises.
# What a bulk.BulkReader decodes entries with.
ENTRY_DECODERS: dict[IEI, EntryDecoder] = {iei: _entry_decoder(iei) for iei in ENTRY_SPECS}


# --- encoding --------------------------------------------------------------------------------


def encode_group(spec: GroupSpec, obj: Any) -> bytes:
    """Encode a dataclass's IEs in its table's order (optional fields left out when None)."""
    parts: list[bytes] = []
    unknown = list(getattr(obj, "unknown_ies", ()))
    known = 0
    for field in spec.fields:
        value = getattr(obj, field.attr)
        while unknown and unknown[0][0] <= known:
            _, iei, raw = unknown.pop(0)
            parts.append(encode_ie(iei, raw))
        if value is None:
            if field.presence is Presence.M:
                raise LocalProtocolError(f"{spec.name}: mandatory {field.attr} is None")
            continue
        group = GROUP_SPECS.get(field.iei)
        try:
            raw = encode_group(group, value) if group is not None else FAST[field.iei].encode(value)
        except ValueError as exc:
            raise LocalProtocolError(f"{spec.name}: {exc}") from exc
        if group is not None and len(raw) > GROUP_MAX.get(field.iei, 0xFFFF):
            raise LocalProtocolError(f"{spec.name}: {field.iei.name} longer than allowed")
        parts.append(encode_ie(field.iei, raw))
        known += 1
    for _, iei, raw in unknown:
        parts.append(encode_ie(iei, raw))
    # What we send must decode: the same conditions as _walk() checks (Failure cause iff
    # failure, the 0-octet UE Service ID only answering an entry that had none).
    present = {f.attr: getattr(obj, f.attr) for f in spec.fields
               if getattr(obj, f.attr) is not None}
    try:
        _check_conditions(spec, present)
    except InvalidMessage as exc:
        raise LocalProtocolError(str(exc)) from exc
    return b"".join(parts)


def encode_entry(entry: Any) -> bytes:
    """One bulk entry as a complete IE (IEI | length | grouped value)."""
    fast = _FAST_RESPONSE.get(entry.__class__)
    if fast is not None and entry.retry_after is None:
        # The hot encode path of a bulk response: UE Service ID, result, optional cause.
        uid = octets_or_none(entry.ue_service_id, 1, UE_SERVICE_ID_MAX)
        if uid is not None:
            n = len(uid)
            iei, success, failure = fast
            result = entry.result
            cause = entry.failure_cause
            if result == 0 and cause is None:
                return _RESPONSE_HEAD.pack(iei, n + 7, _UID, n) + uid + success
            if result == 1 and cause is not None and 0 <= cause <= 0xFF:
                return _RESPONSE_HEAD.pack(iei, n + 11, _UID, n) + uid + failure[cause]
    iei = ENTRY_IEI_OF[type(entry)]
    return encode_ie(iei, encode_group(ENTRY_SPECS[iei], entry))


# Response entry -> (its IEI, the octets after the UE Service ID on success, and on failure
# by cause): UE Service ID | Registration/De-registration result | Failure cause.
_RESPONSE_HEAD = struct.Struct(">BHBH")
_FAST_RESPONSE = {
    cls: (int(iei), bytes((result, 0, 1, 0)),
          [bytes((result, 0, 1, 1, int(IEI.FAILURE_CAUSE), 0, 1, c)) for c in range(256)])
    for cls, iei, result in (
        (RegistrationResponseEntry, IEI.REGISTRATION_RESPONSE_ENTRY, IEI.REGISTRATION_RESULT),
        (DeregistrationResponseEntry, IEI.DEREGISTRATION_RESPONSE_ENTRY,
         IEI.DEREGISTRATION_RESULT),
    )
}


# A single (de-)registration response has the IEs of the matching response entry's value,
# in the same order (wire-v1 §4; the differential test holds them equal): the same octets.
_UID_HEAD = struct.Struct(">BH")
_FAST_SINGLE_RESPONSE = {
    UeRegistrationResponse: _FAST_RESPONSE[RegistrationResponseEntry][1:],
    UeDeregistrationResponse: _FAST_RESPONSE[DeregistrationResponseEntry][1:],
}


def _result_encoder(cls: type) -> Callable[[str, int | None, int | None], bytes]:
    """(UE Service ID, failure cause or None, Retry after or None) -> the response entry IE
    of `cls`, as encode_entry(cls(...)) gives it; without building the entry on the common
    path (no Retry after, a valid UE Service ID): the bulk answers' hot path."""
    iei, success, failure = _FAST_RESPONSE[cls]
    build = frozen_builder(cls)
    head = _RESPONSE_HEAD.pack

    def encode(ue_service_id: str, cause: int | None, retry_after: int | None) -> bytes:
        if retry_after is None:
            uid = octets_or_none(ue_service_id, 1, UE_SERVICE_ID_MAX)
            if uid is not None:
                n = len(uid)
                if cause is None:
                    return head(iei, n + 7, _UID, n) + uid + success
                if 0 <= cause <= 0xFF:
                    return head(iei, n + 11, _UID, n) + uid + failure[cause]
        result = Result.SUCCESS if cause is None else Result.FAILURE
        return encode_entry(build(ue_service_id, result, cause, retry_after))

    return encode


def _single_result_encoder(cls: type) -> Callable[..., bytes]:
    """(transaction id, UE Service ID, failure cause or None, Retry after or None, maximum
    frame size) -> the frame of the single response `cls`, as encode_message(cls(...)) gives
    it; without building the message on the common path (`_fast_single_body`): the single
    answers' hot path."""
    fast = _FAST_SINGLE_RESPONSE[cls]
    message_type = cls.message_type
    build = frozen_builder(cls)

    def encode(transaction_id: int, ue_service_id: str, cause: int | None,
               retry_after: int | None, max_frame_size: int) -> bytes:
        body = _fast_single_body(fast, ue_service_id, 0 if cause is None else 1, cause,
                                 retry_after)
        if body is not None:  # far below any frame size allowed (4096)
            return encode_frame(message_type, transaction_id, body)
        result = Result.SUCCESS if cause is None else Result.FAILURE
        return encode_message(build(transaction_id, ue_service_id, result, cause, retry_after, ()),
                              max_frame_size=max_frame_size)

    return encode


# Per single response type: what Session.send_result encodes its answers with.
SINGLE_RESULT_ENCODERS = {
    MessageType.UE_REGISTRATION_RESPONSE: _single_result_encoder(UeRegistrationResponse),
    MessageType.UE_DEREGISTRATION_RESPONSE: _single_result_encoder(UeDeregistrationResponse),
}


# Per bulk response entry IEI: what Session.send_bulk_results encodes its answers with.
RESULT_ENCODERS = {
    IEI.REGISTRATION_RESPONSE_ENTRY: _result_encoder(RegistrationResponseEntry),
    IEI.DEREGISTRATION_RESPONSE_ENTRY: _result_encoder(DeregistrationResponseEntry),
}


def _fast_single_response(message: Any) -> bytes | None:
    """The body of the common single response (no Retry after, no unknown IE), or None."""
    fast = _FAST_SINGLE_RESPONSE.get(message.__class__)
    if fast is None or message.unknown_ies:
        return None
    return _fast_single_body(fast, message.ue_service_id, message.result,
                             message.failure_cause, message.retry_after)


def _fast_single_body(fast: tuple[bytes, list[bytes]], ue_service_id: str, result: int,
                      cause: int | None, retry_after: int | None) -> bytes | None:
    """A single response's body from its fields with `fast` (_FAST_SINGLE_RESPONSE's octets
    after the UE Service ID), or None where the generic encoder is needed (a Retry after, an
    id that is not 1-255 octets of UTF-8, a result and cause that disagree)."""
    if retry_after is not None:
        return None
    uid = octets_or_none(ue_service_id, 1, UE_SERVICE_ID_MAX)
    if uid is None:
        return None
    success, failure = fast
    if result == 0 and cause is None:
        return _UID_HEAD.pack(_UID, len(uid)) + uid + success
    if result == 1 and cause is not None and 0 <= cause <= 0xFF:
        return _UID_HEAD.pack(_UID, len(uid)) + uid + failure[cause]
    return None


def encode_message(message: Message, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Encode a whole message as frames (bulk messages are split to fit `max_frame_size`)."""
    if isinstance(message, BulkMessage):
        return b"".join(encode_bulk(message, max_frame_size=max_frame_size))
    if (isinstance(message, DigestResponse) and message.bucket_bits is not None
            and message.first_bucket == 0 and not message.unknown_ies
            and len(message.digests) == DIGEST_SIZE << message.bucket_bits):
        # A whole DIGEST RESPONSE: fragmented to fit (docs/protocol.md §6.2). One decoded
        # with unknown IEs is encoded as it came, in one frame, so that they survive.
        return b"".join(encode_digest_response(
            message.transaction_id, message.bucket_bits, message.digests,
            max_frame_size=max_frame_size))
    message_type = MESSAGE_CLASSES[type(message)]
    body = _fast_single_response(message)
    if body is None:
        body = encode_group(MESSAGE_SPECS[message_type], message)
    if len(body) > max_frame_size:
        raise LocalProtocolError(f"{message_type.name}: body of {len(body)} octets too large")
    return encode_frame(message_type, message.transaction_id, body)


# Octets of a DIGEST RESPONSE frame around its digests: First bucket (3 + 2) and the Bucket
# digests IE header (3); the first frame adds Bucket bits (3 + 1).
_DIGEST_FRAME_OVERHEAD = 8
_BUCKET_BITS_IE = 4
_DIGESTS_PER_IE = 0xFFFF // DIGEST_SIZE


def encode_digest_response(
    transaction_id: int, bucket_bits: int, digests: bytes, *,
    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
) -> list[bytes]:
    """The frames of a DIGEST RESPONSE (docs/protocol.md §6.2): the 2^b digests in order, as
    many per frame as fit `max_frame_size` (and one IE's u16 length), MORE on all but the
    last; Bucket bits in the first frame only."""
    if not 0 <= bucket_bits <= BUCKET_BITS_MAX:
        raise LocalProtocolError(f"bucket bits {bucket_bits} outside 0..{BUCKET_BITS_MAX}")
    total = 1 << bucket_bits
    if len(digests) != total * DIGEST_SIZE:
        raise LocalProtocolError(f"{len(digests)} octets of digests for {total} buckets")
    frames = []
    first = 0
    while first < total:
        room = max_frame_size - _DIGEST_FRAME_OVERHEAD - (_BUCKET_BITS_IE if not first else 0)
        n = min(room // DIGEST_SIZE, _DIGESTS_PER_IE, total - first)
        if n < 1:
            raise LocalProtocolError("no digest fits the maximum frame size")
        fragment = DigestResponse(transaction_id, first,
                                  digests[first * DIGEST_SIZE:(first + n) * DIGEST_SIZE],
                                  bucket_bits if not first else None)
        body = encode_group(MESSAGE_SPECS[MessageType.DIGEST_RESPONSE], fragment)
        first += n
        frames.append(encode_frame(MessageType.DIGEST_RESPONSE, transaction_id, body,
                                   more=first < total))
    return frames


def encode_bulk(
    message: BulkMessage, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> Iterator[bytes]:
    """Yield the frames of a bulk message: entries packed greedily, MORE on all but the last."""
    if message.message_type not in BULK_SPECS:
        raise LocalProtocolError(f"{message.message_type!r} is not a bulk message")
    if len(message.entries) != message.count:
        raise LocalProtocolError("bulk count does not match its entries")
    writer = BulkWriter(message.message_type, message.transaction_id, message.count,
                        max_frame_size)
    for entry in message.entries:
        frame = writer.add(encode_entry(entry))
        if frame is not None:
            yield frame
    yield writer.finish()


def message_fields(message: Any) -> dict[str, Any]:
    """The dataclass's fields as a dict (for logs, JSON and tests); derived fields (not in the
    constructor, like Profile.octets) are left out."""
    return {f.name: getattr(message, f.name) for f in fields(message) if f.init}


def profile_octets(profile: Profile) -> bytes:
    """The canonical value octets of a profile (docs/protocol.md §6.1): its known sub-IEs in
    the spec's order. The one form a profile is stored in, listed in, and hashed for sync."""
    octets = profile.octets
    return octets if octets is not None else encode_group(PROFILE_SPEC, profile)


def decode_profile(octets: bytes) -> Profile:
    """A stored profile (profile_octets) back as a Profile; raises WireError if invalid."""
    return decode_group(PROFILE_SPEC, octets)  # type: ignore[no-any-return]


# BULK_SPECS, BulkReader, bulk_header_ies (wire.bulk) and encode_frame (wire.frames) are
# re-exported for the code that imported them from here before they moved.
__all__ = [
    "BULK_SPECS",
    "ENTRY_DECODERS",
    "ENTRY_SPECS",
    "HEADER_SIZE",
    "MESSAGE_SPECS",
    "BulkMessage",
    "BulkReader",
    "DeregistrationEntry",
    "DeregistrationResponseEntry",
    "DigestRequest",
    "DigestResponse",
    "Error",
    "ErrorCause",
    "Goodbye",
    "Hello",
    "HelloAck",
    "Keepalive",
    "KeepaliveAck",
    "ListRequest",
    "ListedUe",
    "Message",
    "Profile",
    "RegistrationEntry",
    "RegistrationResponseEntry",
    "UeDeregistrationRequest",
    "UeDeregistrationResponse",
    "UeRegistrationRequest",
    "UeRegistrationResponse",
    "bulk_header_ies",
    "decode_body",
    "decode_entry",
    "decode_group",
    "decode_profile",
    "encode_bulk",
    "encode_digest_response",
    "encode_entry",
    "encode_frame",
    "encode_message",
    "profile_octets",
]


def decode_frames(data: bytes, *, max_frame_size: int = 16_777_215) -> list[Message]:
    """Decode a complete octet string of frames into messages, bulk fragments joined.

    For tools and tests (the vectors file); a live connection streams through the session.
    """
    from .frames import FrameBuffer

    buf = FrameBuffer(max_frame_size)
    buf.feed(data)
    out: list[Message] = []
    bulks: dict[int, tuple[BulkReader, list[Any], int]] = {}
    digests: dict[int, tuple[list[DigestResponse], int]] = {}
    while len(buf):
        header = buf.read_header()
        if header is None:
            raise InvalidMessage("truncated frame header")
        body = buf.read_exact(header.body_length)
        if body is None:
            raise InvalidMessage("truncated frame body")
        try:
            mtype = MessageType(header.message_type)
        except ValueError as exc:
            from .errors import UnknownMessageType

            raise UnknownMessageType(f"message type 0x{header.message_type:02x}") from exc
        if mtype is MessageType.DIGEST_RESPONSE and (header.more or header.transaction_id
                                                     in digests):
            _join_digest_fragment(out, digests, header.transaction_id, header.more,
                                  decode_body(mtype, header.transaction_id, body))
            continue
        if mtype not in BULK_SPECS:
            if header.more:
                from .errors import InvalidFrame

                raise InvalidFrame(f"MORE set on {mtype.name}")
            out.append(decode_body(mtype, header.transaction_id, body))
            continue
        key = header.transaction_id
        reader, entries, position = bulks.get(
            key, (BulkReader(mtype, ENTRY_DECODERS), [], len(out)))
        reader.start_frame(first=key not in bulks)
        if key not in bulks:
            out.append(None)  # type: ignore[arg-type]  # placeholder keeps message order
        bulks[key] = (reader, entries, position)
        for iei, raw in split_ies(body):
            item = reader.feed_ie(iei, raw)
            if item is not None and item[0] == "entry":
                if isinstance(item[1], WireError):
                    raise item[1]
                entries.append(item[1])
        reader.end_frame()
        if not header.more:
            del bulks[key]
            if len(entries) != reader.count:
                raise InvalidMessage(f"{reader.count} entries announced, {len(entries)} sent")
            out[position] = BulkMessage(mtype, key, reader.count, tuple(entries))
    if bulks or digests:
        raise InvalidMessage("fragmented message without its last fragment")
    return out


def _join_digest_fragment(out: list[Any], pending: dict[int, tuple[list[DigestResponse], int]],
                          tid: int, more: bool, fragment: Any) -> None:
    """decode_frames(): the frames of one DIGEST RESPONSE joined as one whole DigestResponse
    (the gateway's session checks the same rules with sync.DigestAssembler)."""
    parts, position = pending.get(tid, ([], len(out)))
    if not parts:
        out.append(None)
    expected = sum(len(p.digests) for p in parts) // DIGEST_SIZE
    if fragment.first_bucket != expected or (fragment.bucket_bits is None) != bool(parts):
        raise InvalidMessage("DIGEST RESPONSE fragments out of order")
    parts.append(fragment)
    pending[tid] = (parts, position)
    if more:
        return
    del pending[tid]
    whole = b"".join(p.digests for p in parts)
    bits = parts[0].bucket_bits
    assert bits is not None
    if len(whole) != DIGEST_SIZE << bits:
        raise InvalidMessage(f"DIGEST RESPONSE: {len(whole) // DIGEST_SIZE} of {1 << bits} "
                             "buckets")
    # One frame: the message as decoded, unknown IEs and all; several: their digests joined.
    out[position] = fragment if len(parts) == 1 else DigestResponse(tid, 0, whole, bits)
