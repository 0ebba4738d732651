"""Numbers of wire-v1, spelled as the spec spells them (wire-v1 §2, §3, §4, §5, §7)."""

from __future__ import annotations

from enum import IntEnum, IntFlag

PROTOCOL_VERSION = 1
ALPN_PROTOCOL = "msgin5g-gw/1"
DEFAULT_PORT = 7554
HEADER_SIZE = 12

# wire-v1 §2: default announced maximum frame body, and the largest any side may announce.
DEFAULT_MAX_FRAME_SIZE = 65_535
MAX_FRAME_SIZE_LIMIT = 16_777_215

# wire-v1 §2: ids chosen by the server have the top bit set.
SERVER_TID_BIT = 0x8000_0000
MAX_TID = 0xFFFF_FFFF

# wire-v1 §4.1: the gateway sends HELLO within 10 s.
DEFAULT_HELLO_TIMEOUT = 10.0
DEFAULT_KEEPALIVE_INTERVAL = 30

COMPREHENSION_REQUIRED = 0x80


class MessageType(IntEnum):
    HELLO = 0x01
    HELLO_ACK = 0x02
    KEEPALIVE = 0x03
    KEEPALIVE_ACK = 0x04
    GOODBYE = 0x05
    ERROR = 0x06
    UE_REGISTRATION_REQUEST = 0x10
    UE_REGISTRATION_RESPONSE = 0x11
    UE_DEREGISTRATION_REQUEST = 0x12
    UE_DEREGISTRATION_RESPONSE = 0x13
    BULK_REGISTRATION_REQUEST = 0x14
    BULK_REGISTRATION_RESPONSE = 0x15
    BULK_DEREGISTRATION_REQUEST = 0x16
    BULK_DEREGISTRATION_RESPONSE = 0x17
    # v1.1, registry sync (docs/protocol.md §6.2).
    DIGEST_REQUEST = 0x18
    DIGEST_RESPONSE = 0x19
    LIST_REQUEST = 0x1A
    LIST_RESPONSE = 0x1B


# The message names used by the vectors file and by logs ("UE REGISTRATION REQUEST").
MESSAGE_NAMES: dict[MessageType, str] = {
    MessageType.HELLO: "HELLO",
    MessageType.HELLO_ACK: "HELLO ACK",
    MessageType.KEEPALIVE: "KEEPALIVE",
    MessageType.KEEPALIVE_ACK: "KEEPALIVE ACK",
    MessageType.GOODBYE: "GOODBYE",
    MessageType.ERROR: "ERROR",
    MessageType.UE_REGISTRATION_REQUEST: "UE REGISTRATION REQUEST",
    MessageType.UE_REGISTRATION_RESPONSE: "UE REGISTRATION RESPONSE",
    MessageType.UE_DEREGISTRATION_REQUEST: "UE DE-REGISTRATION REQUEST",
    MessageType.UE_DEREGISTRATION_RESPONSE: "UE DE-REGISTRATION RESPONSE",
    MessageType.BULK_REGISTRATION_REQUEST: "BULK REGISTRATION REQUEST",
    MessageType.BULK_REGISTRATION_RESPONSE: "BULK REGISTRATION RESPONSE",
    MessageType.BULK_DEREGISTRATION_REQUEST: "BULK DE-REGISTRATION REQUEST",
    MessageType.BULK_DEREGISTRATION_RESPONSE: "BULK DE-REGISTRATION RESPONSE",
    MessageType.DIGEST_REQUEST: "DIGEST REQUEST",
    MessageType.DIGEST_RESPONSE: "DIGEST RESPONSE",
    MessageType.LIST_REQUEST: "LIST REQUEST",
    MessageType.LIST_RESPONSE: "LIST RESPONSE",
}

BULK_REQUESTS = frozenset(
    {MessageType.BULK_REGISTRATION_REQUEST, MessageType.BULK_DEREGISTRATION_REQUEST}
)
BULK_RESPONSES = frozenset(
    {MessageType.BULK_REGISTRATION_RESPONSE, MessageType.BULK_DEREGISTRATION_RESPONSE}
)
BULK_MESSAGES = BULK_REQUESTS | BULK_RESPONSES
SINGLE_REQUESTS = frozenset(
    {MessageType.UE_REGISTRATION_REQUEST, MessageType.UE_DEREGISTRATION_REQUEST}
)
# v1.1 (docs/protocol.md §6): met only on a session whose HELLO ACK announced Sync supported;
# elsewhere they are unknown message types, as on a v1 server.
SYNC_REQUESTS = frozenset({MessageType.DIGEST_REQUEST, MessageType.LIST_REQUEST})
SYNC_RESPONSES = frozenset({MessageType.DIGEST_RESPONSE, MessageType.LIST_RESPONSE})
SYNC_MESSAGES = SYNC_REQUESTS | SYNC_RESPONSES
# wire-v1 §2 allows MORE on bulk messages only; v1.1 adds the two sync responses (§6.2).
FRAGMENTED_MESSAGES = BULK_MESSAGES | SYNC_RESPONSES
# Request type -> the response type that answers it.
RESPONSE_TO: dict[MessageType, MessageType] = {
    MessageType.HELLO: MessageType.HELLO_ACK,
    MessageType.KEEPALIVE: MessageType.KEEPALIVE_ACK,
    MessageType.UE_REGISTRATION_REQUEST: MessageType.UE_REGISTRATION_RESPONSE,
    MessageType.UE_DEREGISTRATION_REQUEST: MessageType.UE_DEREGISTRATION_RESPONSE,
    MessageType.BULK_REGISTRATION_REQUEST: MessageType.BULK_REGISTRATION_RESPONSE,
    MessageType.BULK_DEREGISTRATION_REQUEST: MessageType.BULK_DEREGISTRATION_RESPONSE,
    MessageType.DIGEST_REQUEST: MessageType.DIGEST_RESPONSE,
    MessageType.LIST_REQUEST: MessageType.LIST_RESPONSE,
}


class FrameFlag(IntFlag):
    MORE = 0x0001


RESERVED_FLAGS = 0xFFFF ^ FrameFlag.MORE.value


class IEI(IntEnum):
    UE_SERVICE_ID = 0x01
    UE_CREDENTIAL = 0x02
    NON_MSGIN5G_UE_PROFILE = 0x03
    REGISTRATION_RESULT = 0x04
    DEREGISTRATION_RESULT = 0x05
    FAILURE_CAUSE = 0x06
    BULK_REGISTRATION_INDICATOR = 0x07
    BULK_REGISTRATION_RESPONSE_INDICATOR = 0x08
    BULK_DEREGISTRATION_INDICATOR = 0x09
    BULK_DEREGISTRATION_RESPONSE_INDICATOR = 0x0A
    NUMBER_OF_INDIVIDUAL_ENTRIES = 0x0B
    REGISTRATION_ENTRY = 0x0C
    REGISTRATION_RESPONSE_ENTRY = 0x0D
    DEREGISTRATION_ENTRY = 0x0E
    DEREGISTRATION_RESPONSE_ENTRY = 0x0F
    PROTOCOL_VERSION = 0x10
    SERVER_NONCE = 0x11
    MAXIMUM_FRAME_SIZE = 0x12
    MAXIMUM_BULK_ENTRIES = 0x13
    MAXIMUM_OUTSTANDING_TRANSACTIONS = 0x14
    KEEPALIVE_INTERVAL = 0x15
    NODE_NAME = 0x16
    BULK_ALLOWED = 0x17
    RETRY_AFTER = 0x18
    ERROR_CAUSE = 0x19
    DIAGNOSTIC = 0x1A
    GATEWAY_TYPE = 0x1B
    UE_AUTHENTICATION_REQUIRED = 0x1C
    # v1.1, registry sync (docs/protocol.md §6.2).
    SYNC_SUPPORTED = 0x1D
    BUCKET_BITS = 0x1E
    FIRST_BUCKET = 0x1F
    BUCKET_DIGESTS = 0x20
    BUCKET_LIST = 0x21
    LISTED_UE = 0x22
    UE_HASH = 0x23
    # Release is IE 0x24 always sent with bit 7 (comprehension required) set, so that a v1
    # server refuses it (UNKNOWN_MANDATORY_IE) instead of skipping it: 0xA4 is its IEI on the
    # wire, and 0x24 alone is no known IE (docs/protocol.md §6.4).
    RELEASE = 0xA4
    # Profile sub-IEs (inside NON_MSGIN5G_UE_PROFILE).
    UE_TYPE = 0x30
    TRIGGERING_UE_IDENTIFIER = 0x31
    TRIGGERING_PORT = 0x32
    TRIGGERING_PROTOCOL = 0x33
    COMMUNICATION_AVAILABILITY = 0x34
    MAXIMUM_SEGMENT_SIZE = 0x35
    APPLICATION_DATA = 0x36


class Result(IntEnum):
    """Registration result / De-registration result (wire-v1 §3, IEI 0x04 / 0x05)."""

    SUCCESS = 0
    FAILURE = 1


class GatewayType(IntEnum):
    LEGACY_3GPP = 1
    NON_3GPP = 2


class UeType(IntEnum):
    LEGACY_3GPP_UE = 1
    NON_3GPP_UE = 2


class TriggeringProtocol(IntEnum):
    SMS = 1
    NIDD = 2
    IP = 3


class Operation(IntEnum):
    """The `op` octet of the UE credential proof (wire-v1 §6)."""

    REGISTRATION = 0x01
    DEREGISTRATION = 0x02


class FailureCause(IntEnum):
    """wire-v1 §7.1, per UE."""

    UE_NOT_PROVISIONED = 1
    AUTHENTICATION_FAILED = 2
    GATEWAY_NOT_AUTHORIZED = 3
    NOT_REGISTERED = 4
    REGISTERED_VIA_OTHER_GATEWAY = 5
    INVALID_ENTRY = 6
    SERVER_BUSY = 7
    STORAGE_FAILURE = 8


class ErrorCause(IntEnum):
    """wire-v1 §7.2, per transaction or connection."""

    NORMAL = 0
    UNSUPPORTED_VERSION = 1
    INVALID_FRAME = 2
    FRAME_TOO_LARGE = 3
    UNKNOWN_MESSAGE_TYPE = 4
    INVALID_MESSAGE = 5
    UNKNOWN_MANDATORY_IE = 6
    SESSION_NOT_ESTABLISHED = 7
    TRANSACTION_ID_IN_USE = 8
    TOO_MANY_OUTSTANDING = 9
    COUNT_MISMATCH = 10
    BULK_NOT_ALLOWED = 11
    TOO_MANY_ENTRIES = 12
    SHUTTING_DOWN = 13
    IDLE_TIMEOUT = 14
    INTERNAL_ERROR = 15
    OVERLOADED = 16
    GATEWAY_NOT_ALLOWED = 17


# wire-v1 §7.2, column "connection closed after?", as one table. NORMAL, SHUTTING_DOWN and
# OVERLOADED are GOODBYE causes: a GOODBYE always ends the connection once transactions finish,
# and an ERROR(OVERLOADED) with Retry after ends only its transaction.
CLOSES_CONNECTION: dict[ErrorCause, bool] = {
    ErrorCause.NORMAL: True,
    ErrorCause.UNSUPPORTED_VERSION: True,
    ErrorCause.INVALID_FRAME: True,
    ErrorCause.FRAME_TOO_LARGE: True,
    ErrorCause.UNKNOWN_MESSAGE_TYPE: False,
    ErrorCause.INVALID_MESSAGE: False,
    ErrorCause.UNKNOWN_MANDATORY_IE: False,
    ErrorCause.SESSION_NOT_ESTABLISHED: True,
    ErrorCause.TRANSACTION_ID_IN_USE: False,
    ErrorCause.TOO_MANY_OUTSTANDING: False,
    ErrorCause.COUNT_MISMATCH: False,
    ErrorCause.BULK_NOT_ALLOWED: False,
    ErrorCause.TOO_MANY_ENTRIES: False,
    ErrorCause.SHUTTING_DOWN: True,
    ErrorCause.IDLE_TIMEOUT: True,
    ErrorCause.INTERNAL_ERROR: False,
    ErrorCause.OVERLOADED: False,
    ErrorCause.GATEWAY_NOT_ALLOWED: True,
}

# Causes that belong to GOODBYE (wire-v1 §7.2, "(GOODBYE)" in the table). GOODBYE ends the
# connection once transactions finish; an ERROR carrying one of them (SHUTTING_DOWN refusing a new
# request after our GOODBYE, OVERLOADED with Retry after) ends only its transaction.
GOODBYE_CAUSES = frozenset({ErrorCause.NORMAL, ErrorCause.SHUTTING_DOWN, ErrorCause.OVERLOADED})


def error_closes_connection(cause: ErrorCause | int) -> bool:
    """Whether an ERROR with this cause closes the connection (unknown causes do not)."""
    try:
        cause = ErrorCause(cause)
    except ValueError:
        return False
    return CLOSES_CONNECTION[cause] and cause not in GOODBYE_CAUSES


# wire-v1 §3 value limits.
UE_SERVICE_ID_MAX = 255
NODE_NAME_MAX = 255
DIAGNOSTIC_MAX = 1024
PROFILE_MAX = 2048
TRIGGERING_UE_IDENTIFIER_MAX = 64
APPLICATION_DATA_MAX = 1024
CREDENTIAL_SIZE = 32
NONCE_SIZE = 32

# docs/protocol.md §6.1: a gateway splits its UEs into 2^b buckets, 0 <= b <= 12.
BUCKET_BITS_MAX = 12
DIGEST_SIZE = 16
UE_HASH_SIZE = 16
