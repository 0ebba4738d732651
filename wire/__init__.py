"""wire-v1, the gateway protocol of msgd, as a codec and a sans-IO session (no I/O, no clock).

What a user of the protocol needs is here; the submodules hold the details:

* `session`: `Session` in the SERVER or GATEWAY role, driven by `receive_data(data, now)`,
  `next_event()`, the `send_*` calls, `data_to_send()` and the timer pair; its two state
  machines (`SessionState`, and `TxnState` for each transaction) are tables in that module;
* `events`: what `next_event()` returns;
* `messages`: one dataclass per message and entry, `encode_message` / `decode_body`;
* `bulk`: bulk messages across frames, `BulkReader` (given `ENTRY_DECODERS`) and `BulkWriter`,
  for framing a bulk without a session;
* `constants`: message types, IEIs, causes, limits; `errors`: one exception base per kind;
* `credential`: the UE credential of wire-v1 §6; `frames`, `ies`: the layers below messages.
"""

from .bulk import BulkReader, BulkWriter
from .constants import ErrorCause, FailureCause, MessageType, Operation, Result
from .credential import compute_proof, verify_proof
from .errors import LocalProtocolError, WireError
from .events import (
    NEED_DATA,
    PAUSED,
    BulkEnded,
    BulkEntriesReceived,
    BulkEntryReceived,
    BulkStarted,
    ConnectionClosed,
    ErrorReceived,
    Event,
    GoodbyeReceived,
    HelloAckReceived,
    HelloReceived,
    ProtocolErrorDetected,
    RequestReceived,
    ResponseReceived,
    TransactionFailed,
)
from .messages import (
    ENTRY_DECODERS,
    DeregistrationEntry,
    DeregistrationResponseEntry,
    Error,
    Goodbye,
    Hello,
    HelloAck,
    Keepalive,
    KeepaliveAck,
    Profile,
    RegistrationEntry,
    RegistrationResponseEntry,
    UeDeregistrationRequest,
    UeDeregistrationResponse,
    UeRegistrationRequest,
    UeRegistrationResponse,
    decode_body,
    decode_profile,
    encode_message,
    profile_octets,
)
from .session import Limits, Role, Session, SessionState, TxnState

__all__ = [
    "ENTRY_DECODERS",
    "NEED_DATA",
    "PAUSED",
    "BulkEnded",
    "BulkEntriesReceived",
    "BulkEntryReceived",
    "BulkReader",
    "BulkStarted",
    "BulkWriter",
    "ConnectionClosed",
    "DeregistrationEntry",
    "DeregistrationResponseEntry",
    "Error",
    "ErrorCause",
    "ErrorReceived",
    "Event",
    "FailureCause",
    "Goodbye",
    "GoodbyeReceived",
    "Hello",
    "HelloAck",
    "HelloAckReceived",
    "HelloReceived",
    "Keepalive",
    "KeepaliveAck",
    "Limits",
    "LocalProtocolError",
    "MessageType",
    "Operation",
    "Profile",
    "ProtocolErrorDetected",
    "RegistrationEntry",
    "RegistrationResponseEntry",
    "RequestReceived",
    "ResponseReceived",
    "Result",
    "Role",
    "Session",
    "SessionState",
    "TransactionFailed",
    "TxnState",
    "UeDeregistrationRequest",
    "UeDeregistrationResponse",
    "UeRegistrationRequest",
    "UeRegistrationResponse",
    "WireError",
    "compute_proof",
    "decode_body",
    "decode_profile",
    "encode_message",
    "profile_octets",
    "verify_proof",
]
