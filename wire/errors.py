"""Exceptions of the wire package: every one carries its wire-v1 §7.2 cause (style: h2/aioquic).

A `WireError` is the *peer's* fault and maps to an ERROR frame; `LocalProtocolError` is ours.
"""

from __future__ import annotations

from .constants import ErrorCause, FailureCause, error_closes_connection


class WireError(Exception):
    """Base of every error the codec raises on bytes from the peer."""

    cause: ErrorCause = ErrorCause.INVALID_MESSAGE

    def __init__(self, message: str = "", *, transaction_id: int = 0) -> None:
        super().__init__(message or self.cause.name)
        self.diagnostic = message or self.cause.name
        self.transaction_id = transaction_id

    @property
    def closes_connection(self) -> bool:
        """Whether the ERROR answering this closes the connection (wire-v1 §7.2)."""
        return error_closes_connection(self.cause)


class FrameError(WireError):
    """The byte stream itself is broken; the connection cannot continue."""

    cause = ErrorCause.INVALID_FRAME


class UnsupportedVersion(FrameError):
    cause = ErrorCause.UNSUPPORTED_VERSION


class InvalidFrame(FrameError):
    cause = ErrorCause.INVALID_FRAME


class FrameTooLarge(FrameError):
    cause = ErrorCause.FRAME_TOO_LARGE


class MessageError(WireError):
    """One message is bad; its transaction ends, the connection stays."""

    cause = ErrorCause.INVALID_MESSAGE


class UnknownMessageType(MessageError):
    cause = ErrorCause.UNKNOWN_MESSAGE_TYPE


class InvalidMessage(MessageError):
    cause = ErrorCause.INVALID_MESSAGE


class UnknownMandatoryIE(MessageError):
    cause = ErrorCause.UNKNOWN_MANDATORY_IE


class SessionError(WireError):
    """A rule of the session (wire-v1 §4, §5) was broken; the cause says whether it closes."""

    def __init__(
        self, cause: ErrorCause, message: str = "", *, transaction_id: int = 0
    ) -> None:
        self.cause = cause
        super().__init__(message, transaction_id=transaction_id)


class EntryError(WireError):
    """A malformed entry inside a bulk: FailureCause.INVALID_ENTRY for that entry only.

    `ue_service_id` is the entry's UE Service ID when the entry carried that IE and its value
    is valid by itself (wire-v1 §3), so the response entry can echo it; "" otherwise.
    """

    failure_cause = FailureCause.INVALID_ENTRY
    ue_service_id = ""


class LocalProtocolError(Exception):
    """Our own code asked the session to send something wire-v1 forbids (a bug, not the peer)."""


_BY_CAUSE: dict[ErrorCause, type[WireError]] = {
    ErrorCause.UNSUPPORTED_VERSION: UnsupportedVersion,
    ErrorCause.INVALID_FRAME: InvalidFrame,
    ErrorCause.FRAME_TOO_LARGE: FrameTooLarge,
    ErrorCause.UNKNOWN_MESSAGE_TYPE: UnknownMessageType,
    ErrorCause.INVALID_MESSAGE: InvalidMessage,
    ErrorCause.UNKNOWN_MANDATORY_IE: UnknownMandatoryIE,
}


def error_for(cause: ErrorCause, message: str = "", *, transaction_id: int = 0) -> WireError:
    """The exception class that stands for `cause` (SessionError for the session's causes)."""
    cls = _BY_CAUSE.get(cause)
    if cls is None:
        return SessionError(cause, message, transaction_id=transaction_id)
    return cls(message, transaction_id=transaction_id)
