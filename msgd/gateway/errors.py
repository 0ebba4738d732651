"""The gateway client's errors: one base, `ClientError` (a `msgd.errors.MsgdError`), that names
the UEs left without a result, and one subclass per way a run can end early.

Expected per-UE outcomes (UE_NOT_PROVISIONED, AUTHENTICATION_FAILED...) are not errors: they
are `UeResult`s with ok False.
"""

from __future__ import annotations

from collections.abc import Iterable

from msgd.errors import MsgdError
from msgd.gateway.values import GatewayUe
from wire.constants import ErrorCause

__all__ = [
    "ClientError",
    "ConnectionLost",
    "HandshakeError",
    "TransactionError",
    "UeSourceError",
]


class ClientError(MsgdError):
    """Base of the gateway client's errors.

    `ues` holds, as GatewayUe in the order they were taken from your iterable, every UE that
    was handed to the client and has no result (sent without an answer, or not sent yet);
    `unanswered` is their UE Service IDs. UEs still in your iterable were not taken.
    """

    def __init__(self, message: str, *, ues: Iterable[GatewayUe] = ()) -> None:
        super().__init__(message)
        self.ues: list[GatewayUe] = list(ues)

    @property
    def unanswered(self) -> list[str]:
        return [ue.ue_service_id for ue in self.ues]


class HandshakeError(ClientError):
    """TCP, TLS, ALPN or HELLO failed. `retryable` is False when trying again cannot help
    (the server refused our certificate or our identity, or we refused the server's)."""

    def __init__(
        self,
        message: str,
        cause: ErrorCause | int | None = None,
        *,
        retryable: bool = True,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.cause = cause
        self.retryable = retryable
        # Milliseconds, from a GOODBYE/ERROR(OVERLOADED) that refused the session.
        self.retry_after = retry_after


class ConnectionLost(ClientError):
    """The connection ended (or the server said GOODBYE) with UEs still without a result.

    `goodbye_cause` / `retry_after` (milliseconds) are the GOODBYE's when there was one."""

    def __init__(
        self,
        message: str,
        *,
        ues: Iterable[GatewayUe] = (),
        goodbye_cause: ErrorCause | int | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message, ues=ues)
        self.goodbye_cause = goodbye_cause
        self.retry_after = retry_after


class TransactionError(ClientError):
    """The server ended a transaction with an ERROR this client does not recover from
    (e.g. INVALID_MESSAGE); entries without a result were not processed."""

    def __init__(
        self,
        cause: ErrorCause | int,
        diagnostic: str,
        *,
        ues: Iterable[GatewayUe] = (),
        retry_after: int | None = None,
    ) -> None:
        name = getattr(cause, "name", str(cause))
        super().__init__(f"server ended the transaction: {name} {diagnostic}".strip(), ues=ues)
        self.cause = cause
        self.retry_after = retry_after


class UeSourceError(ClientError):
    """Your iterable of UEs raised (the original exception is `__cause__`), or a UE cannot be
    sent (no key while the server requires a UE credential). UEs taken before it that were
    sent have had their results yielded; the rest are in `ues`."""
