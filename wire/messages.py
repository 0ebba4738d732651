"""Messages of wire-v1 §4–§5: dataclasses, their IE tables as data, and their codecs.

`MESSAGE_SPECS` / `ENTRY_SPECS` hold each message's IE table (order and M/O/C) as data, in the
manner of pycrate's MAND/OPT lists; one generic walker applies the rules of wire-v1 §3 to all of
them. Bulk messages are not decoded here as a whole: their IEs are streamed through `BulkReader`
(one per transaction), so a bulk request is never held in memory.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, ClassVar

from .constants import (
    BULK_MESSAGES,
    COMPREHENSION_REQUIRED,
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    IEI,
    PROFILE_MAX,
    PROTOCOL_VERSION,
    ErrorCause,
    FailureCause,
    FrameFlag,
    MessageType,
    Result,
)
from .errors import EntryError, InvalidMessage, LocalProtocolError, UnknownMandatoryIE, WireError
from .ies import (
    _CONTROL,
    FAST,
    IE_HEADER,
    KNOWN_IEIS,
    decode_value,
    encode_ie,
    reference_split,
    reference_value,
    split_ies,
)

FRAME_HEADER = struct.Struct(">BBHII")


class Presence(Enum):
    M = "mandatory"
    O = "optional"  # noqa: E741 - the spec's letter
    C = "conditional"


# --- dataclasses -----------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class RegistrationEntry:
    ue_service_id: str
    credential: bytes | None = None
    profile: Profile | None = None


@dataclass(frozen=True, slots=True)
class DeregistrationEntry:
    ue_service_id: str
    credential: bytes | None = None


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


Entry = RegistrationEntry | DeregistrationEntry | RegistrationResponseEntry | DeregistrationResponseEntry


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
_DEREG = ((IEI.UE_SERVICE_ID, "ue_service_id", M), (IEI.UE_CREDENTIAL, "credential", C))
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
        (IEI.NODE_NAME, "node_name", O)),
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
}
MESSAGE_CLASSES: dict[type, MessageType] = {s.cls: t for t, s in MESSAGE_SPECS.items()}


@dataclass(frozen=True)
class BulkSpec:
    """Bulk message layout (wire-v1 §5): indicator, Number of individual entries, entries."""

    indicator: IEI
    entry: IEI


BULK_SPECS: dict[MessageType, BulkSpec] = {
    MessageType.BULK_REGISTRATION_REQUEST: BulkSpec(
        IEI.BULK_REGISTRATION_INDICATOR, IEI.REGISTRATION_ENTRY),
    MessageType.BULK_REGISTRATION_RESPONSE: BulkSpec(
        IEI.BULK_REGISTRATION_RESPONSE_INDICATOR, IEI.REGISTRATION_RESPONSE_ENTRY),
    MessageType.BULK_DEREGISTRATION_REQUEST: BulkSpec(
        IEI.BULK_DEREGISTRATION_INDICATOR, IEI.DEREGISTRATION_ENTRY),
    MessageType.BULK_DEREGISTRATION_RESPONSE: BulkSpec(
        IEI.BULK_DEREGISTRATION_RESPONSE_INDICATOR, IEI.DEREGISTRATION_RESPONSE_ENTRY),
}

_RESPONSE_ENTRY_CLASSES = (RegistrationResponseEntry, DeregistrationResponseEntry,
                           UeRegistrationResponse, UeDeregistrationResponse)

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
            values[field.attr] = decode_group(group, raw, reference=reference)
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
        if values["ue_service_id"] == "" and values.get("failure_cause") != FailureCause.INVALID_ENTRY:
            raise InvalidMessage(f"{spec.name}: empty UE Service ID outside INVALID_ENTRY")
        if spec.cls in (UeRegistrationResponse, UeDeregistrationResponse) and not values[
            "ue_service_id"
        ]:
            raise InvalidMessage(f"{spec.name}: empty UE Service ID")
    elif "ue_service_id" in values and values["ue_service_id"] == "":
        raise InvalidMessage(f"{spec.name}: UE Service ID of 0 octets")


def decode_group(spec: GroupSpec, body: bytes, *, reference: bool = False) -> Any:
    """Decode an IE list against `spec` into its dataclass."""
    pairs = reference_split(body) if reference else split_ies(body)
    return spec.cls(**_walk(spec, pairs, reference))


def decode_body(
    message_type: MessageType, transaction_id: int, body: bytes, *, reference: bool = False
) -> Message:
    """Decode the body of a complete non-bulk message."""
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
        raise EntryError(str(exc)) from exc


def _fast_registration_entry(raw: bytes) -> Any:
    """The common shape (UE Service ID, optional credential) without a generic walk.

    Returns None for anything else, and the generic decoder (which the differential test holds
    to the construct reference) decides. Only a shape it fully checks is accepted here.
    """
    n = len(raw)
    if n < 4 or raw[0] != 0x01:
        return None
    length = (raw[1] << 8) | raw[2]
    pos = 3 + length
    if length == 0 or length > 255 or pos > n:
        return None
    try:
        uid = raw[3:pos].decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _CONTROL.search(uid):
        return None
    if pos == n:
        return _new_reg(uid, None)
    if raw[pos] != 0x02 or pos + 35 != n or raw[pos + 1] != 0 or raw[pos + 2] != 32:
        return None
    return _new_reg(uid, raw[pos + 3 : n])


def _fast_deregistration_entry(raw: bytes) -> Any:
    hit = _fast_registration_entry(raw)
    if hit is None:
        return None
    return _new_dereg(hit.ue_service_id, hit.credential)


def _new_reg(uid: str, credential: bytes | None) -> RegistrationEntry:
    return RegistrationEntry(uid, credential, None)


def _new_dereg(uid: str, credential: bytes | None) -> DeregistrationEntry:
    return DeregistrationEntry(uid, credential)


_FAST_ENTRY = {
    IEI.REGISTRATION_ENTRY: _fast_registration_entry,
    IEI.DEREGISTRATION_ENTRY: _fast_deregistration_entry,
}


class BulkReader:
    """Streams the IEs of one bulk message across its frames (wire-v1 §5 Fragmentation).

    `start_frame()` is called for each frame, `feed_ie()` for each complete IE of it. It returns
    ("count", n) once, then ("entry", obj) or ("entry", EntryError) per entry, or None for a
    skipped unknown IE. A broken structure raises a MessageError, which ends the transaction.
    """

    __slots__ = ("count", "entries", "first_frame", "phase", "spec", "type_name")

    def __init__(self, message_type: MessageType) -> None:
        self.spec = BULK_SPECS[message_type]
        self.type_name = message_type.name
        self.phase = 0  # 0: expect indicator, 1: expect number, 2: entries
        self.count = -1
        self.entries = 0
        self.first_frame = True

    def start_frame(self, first: bool) -> None:
        self.first_frame = first

    def end_frame(self) -> None:
        if self.phase < 2:
            raise InvalidMessage(f"{self.type_name}: indicator and Number of entries missing")

    def feed_ie(self, iei: int, raw: bytes) -> tuple[str, Any] | None:
        spec = self.spec
        if iei == spec.entry and self.phase == 2:
            self.entries += 1
            try:
                return ("entry", decode_entry(spec.entry, raw))
            except EntryError as exc:
                return ("entry", exc)
        if self.phase == 0 and iei == spec.indicator and self.first_frame:
            decode_value(iei, raw)
            self.phase = 1
            return None
        if self.phase == 1 and iei == IEI.NUMBER_OF_INDIVIDUAL_ENTRIES:
            self.count = decode_value(iei, raw)
            self.phase = 2
            return ("count", self.count)
        if iei in KNOWN_IEIS:
            raise InvalidMessage(
                f"{self.type_name}: IE {IEI(iei).name} out of place (entry {self.entries})")
        if iei & COMPREHENSION_REQUIRED:
            raise UnknownMandatoryIE(f"{self.type_name}: unknown IEI 0x{iei:02x}")
        return None


# --- encoding --------------------------------------------------------------------------------


def encode_frame(message_type: int, transaction_id: int, body: bytes, *, more: bool = False) -> bytes:
    flags = FrameFlag.MORE if more else 0
    return FRAME_HEADER.pack(PROTOCOL_VERSION, message_type, flags, transaction_id, len(body)) + body


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
    if isinstance(obj, _RESPONSE_ENTRY_CLASSES):
        if (obj.result == Result.FAILURE) != (obj.failure_cause is not None):
            raise LocalProtocolError(f"{spec.name}: Failure cause iff result is failure")
    return b"".join(parts)


def encode_entry(entry: Any) -> bytes:
    """One bulk entry as a complete IE (IEI | length | grouped value)."""
    iei = ENTRY_IEI_OF[type(entry)]
    if type(entry) is RegistrationResponseEntry or type(entry) is DeregistrationResponseEntry:
        fast = _fast_response_entry(entry, iei)
        if fast is not None:
            return fast
    value = encode_group(ENTRY_SPECS[iei], entry)
    return encode_ie(iei, value)


_RESULT_IEI = {IEI.REGISTRATION_RESPONSE_ENTRY: 0x04, IEI.DEREGISTRATION_RESPONSE_ENTRY: 0x05}


def _fast_response_entry(entry: Any, iei: IEI) -> bytes | None:
    # The hot encode path of a bulk response: UE id, result, optional cause, no retry.
    if entry.retry_after is not None:
        return None
    uid = entry.ue_service_id.encode("utf-8")
    n = len(uid)
    if n > 255 or _CONTROL.search(entry.ue_service_id):
        return None
    result_iei = _RESULT_IEI[iei]
    if entry.result == 0 and entry.failure_cause is None:
        return IE_HEADER.pack(iei, n + 7) + b"\x01" + n.to_bytes(2, "big") + uid + bytes(
            (result_iei, 0, 1, 0))
    if entry.result == 1 and entry.failure_cause is not None and 0 <= entry.failure_cause < 256:
        return (IE_HEADER.pack(iei, n + 11) + b"\x01" + n.to_bytes(2, "big") + uid
                + bytes((result_iei, 0, 1, 1, 0x06, 0, 1, entry.failure_cause)))
    return None


def encode_message(message: Message, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> bytes:
    """Encode a whole message as frames (bulk messages are split to fit `max_frame_size`)."""
    if isinstance(message, BulkMessage):
        return b"".join(encode_bulk(message, max_frame_size=max_frame_size))
    message_type = MESSAGE_CLASSES[type(message)]
    body = encode_group(MESSAGE_SPECS[message_type], message)
    if len(body) > max_frame_size:
        raise LocalProtocolError(f"{message_type.name}: body of {len(body)} octets too large")
    return encode_frame(message_type, message.transaction_id, body)


def bulk_header_ies(message_type: MessageType, count: int) -> bytes:
    spec = BULK_SPECS[message_type]
    return encode_ie(spec.indicator, b"\x01") + encode_ie(
        IEI.NUMBER_OF_INDIVIDUAL_ENTRIES, count.to_bytes(4, "big"))


def encode_bulk(message: BulkMessage, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> Iterator[bytes]:
    """Yield the frames of a bulk message: entries packed greedily, MORE on all but the last."""
    if message.message_type not in BULK_MESSAGES:
        raise LocalProtocolError(f"{message.message_type!r} is not a bulk message")
    if len(message.entries) != message.count:
        raise LocalProtocolError("bulk count does not match its entries")
    body = bytearray(bulk_header_ies(message.message_type, message.count))
    for entry in message.entries:
        ie = encode_entry(entry)
        if len(ie) > max_frame_size:
            raise LocalProtocolError("one entry does not fit the maximum frame size")
        if len(body) + len(ie) > max_frame_size:
            yield encode_frame(message.message_type, message.transaction_id, bytes(body), more=True)
            body = bytearray()
        body += ie
    yield encode_frame(message.message_type, message.transaction_id, bytes(body))


def message_fields(message: Any) -> dict[str, Any]:
    """The dataclass's fields as a dict (for logs, JSON and tests)."""
    return {f.name: getattr(message, f.name) for f in fields(message)}


__all__ = [
    "BULK_SPECS",
    "ENTRY_SPECS",
    "FRAME_HEADER",
    "HEADER_SIZE",
    "MESSAGE_SPECS",
    "BulkMessage",
    "BulkReader",
    "DeregistrationEntry",
    "DeregistrationResponseEntry",
    "Error",
    "ErrorCause",
    "Goodbye",
    "Hello",
    "HelloAck",
    "Keepalive",
    "KeepaliveAck",
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
    "encode_bulk",
    "encode_entry",
    "encode_frame",
    "encode_message",
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
        if mtype not in BULK_MESSAGES:
            if header.more:
                from .errors import InvalidFrame

                raise InvalidFrame(f"MORE set on {mtype.name}")
            out.append(decode_body(mtype, header.transaction_id, body))
            continue
        key = header.transaction_id
        reader, entries, position = bulks.get(key, (BulkReader(mtype), [], len(out)))
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
    if bulks:
        raise InvalidMessage("bulk message without its last fragment")
    return out
