"""Events the session hands to its user (past tense, as h11's are)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .constants import ErrorCause, MessageType
from .errors import EntryError, WireError
from .messages import Error, Goodbye, Hello, HelloAck, frozen_builder


class Event:
    """Base of all session events."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HelloReceived(Event):
    """Server: a gateway said HELLO; answer with accept_hello() or reject_hello()."""

    hello: Hello


@dataclass(frozen=True, slots=True)
class HelloAckReceived(Event):
    """Gateway: the session is established with these limits."""

    hello_ack: HelloAck


@dataclass(frozen=True, slots=True)
class RequestReceived(Event):
    """Server: a single UE (DE-)REGISTRATION REQUEST; answer it with send_response()."""

    request: Any


@dataclass(frozen=True, slots=True)
class SyncRequestReceived(Event):
    """Server, v1.1: a DIGEST REQUEST or LIST REQUEST (docs/protocol.md §6.2); answer it with
    send_digest_response() or start_list_response() / send_list_entries()."""

    request: Any


@dataclass(frozen=True, slots=True)
class DigestReceived(Event):
    """Gateway, v1.1: the whole DIGEST RESPONSE, its fragments joined: 2^bucket_bits digests
    of 16 octets, bucket 0 first."""

    transaction_id: int
    bucket_bits: int
    digests: bytes


@dataclass(frozen=True, slots=True)
class ListReceived(Event):
    """Gateway, v1.1: the whole LIST RESPONSE, its fragments joined (ListedUe entries)."""

    transaction_id: int
    entries: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class ResponseReceived(Event):
    """Gateway: the answer to a single request."""

    response: Any


@dataclass(frozen=True, slots=True)
class BulkStarted(Event):
    """The first fragment of a bulk message named its Number of individual entries."""

    transaction_id: int
    message_type: MessageType
    count: int


@dataclass(frozen=True, slots=True)
class BulkEntryReceived(Event):
    """One entry of a bulk message, as soon as its octets are complete. `error` is set (and
    `entry` None) for a malformed entry: FailureCause.INVALID_ENTRY for that entry only."""

    transaction_id: int
    index: int
    entry: Any
    error: EntryError | None = None


# Built on the session's hot path without the frozen __init__ (see messages.frozen_builder).
_build_bulk_entry_received = frozen_builder(BulkEntryReceived)


@dataclass(frozen=True, slots=True)
class BulkEntriesReceived(Event):
    """Consecutive entries of a bulk message whose octets were complete together, from a
    session made with `batch_entries=True`: `entries[i]` is entry number `first_index + i`,
    decoded, or an EntryError for a malformed one (FailureCause.INVALID_ENTRY for that entry
    only). What BulkEntryReceived is one at a time, for a user that decides entries in
    batches (the server: one registry call per batch)."""

    transaction_id: int
    first_index: int
    entries: list[Any]


_build_bulk_entries_received = frozen_builder(BulkEntriesReceived)


@dataclass(frozen=True, slots=True)
class BulkEnded(Event):
    """The last fragment arrived and the count matched."""

    transaction_id: int
    message_type: MessageType
    count: int


@dataclass(frozen=True, slots=True)
class TransactionFailed(Event):
    """A transaction ended by an error. `sent` says whether we sent the ERROR (the session sends
    it once every entry already delivered has been answered); otherwise the peer sent it."""

    transaction_id: int
    cause: ErrorCause | int
    diagnostic: str
    sent: bool
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class ErrorReceived(Event):
    """The peer sent ERROR (for a transaction or, with id 0, for the connection)."""

    error: Error


@dataclass(frozen=True, slots=True)
class GoodbyeReceived(Event):
    goodbye: Goodbye


@dataclass(frozen=True, slots=True)
class ProtocolErrorDetected(Event):
    """The peer broke a rule; the session answered (or, for a bad ERROR, stayed silent)."""

    error: WireError


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """Terminal: the connection must be closed once data_to_send() is flushed."""

    cause: ErrorCause | None
    reason: str
    by_peer: bool


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")
