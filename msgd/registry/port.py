"""The registry port: what the server asks of any registry, in batches (wire-v1 §5).

The server decodes requests and verifies credentials (the rules that need only provisioning,
msgd.server.rules); everything that depends on registry state is decided behind this port:
NOT_REGISTERED, REGISTERED_VIA_OTHER_GATEWAY, SERVER_BUSY, STORAGE_FAILURE, and when an
outcome may be told (a success only once its change is durable). The embedded memory+SQLite
registry (`registry.local.LocalRegistrar`) is the first implementation; a database-backed one
decides the same rules in its database, one round trip per batch, without touching the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from wire.constants import FailureCause

__all__ = [
    "BUSY_RETRY_MS",
    "SUCCESS",
    "Change",
    "Decided",
    "Outcome",
    "Registrar",
]


class Change(NamedTuple):
    """One request of a gateway, decoded and with its credential checked.

    `verdict` is the credential check's result: None when it passed (or none was needed),
    else the cause to give (AUTHENTICATION_FAILED; STORAGE_FAILURE when the key could not be
    read). Registrations reach the port only with None; a de-registration carries it because
    wire-v1 §5 checks the registration first (NOT_REGISTERED, REGISTERED_VIA_OTHER_GATEWAY)
    and the credential after. A NamedTuple: one is built per entry on the hot path.
    """

    ue_service_id: str
    register: bool
    profile: bytes | None  # the profile IE's value octets as stored; None: no profile
    verdict: FailureCause | None = None


class Outcome(NamedTuple):
    """The final result of one entry: `cause` None is success."""

    cause: FailureCause | None
    retry_after: int | None = None

    @property
    def ok(self) -> bool:
        return self.cause is None


SUCCESS = Outcome(None)
BUSY_RETRY_MS = 500

# Called once per batch, on the event loop's thread, with one Outcome per Change in order,
# when every outcome is final (every success durable).
Decided = Callable[[Sequence[Outcome]], None]


class Registrar(Protocol):
    """A registry as the server sees it."""

    def submit(self, gateway: str, changes: Sequence[Change], decided: Decided) -> None:
        """Decide `changes` of `gateway` in order, as if one after the other, and apply the
        successful ones. `decided` is called exactly once, possibly before submit returns,
        unless the registry is closed first. The batches of one caller are decided, and their
        `decided` called, in submission order. Never raises for a registry fault: the
        entries get STORAGE_FAILURE.
        """
        ...

    def settle_completed(self) -> None:
        """Call now the `decided` of batches the store has already finished (cheap when there
        are none). The server calls it after each read: a completion otherwise waits in the
        loop's queue behind every other connection's read of this turn (a few ms at 17,500
        singles/s), and the answers with it."""
        ...
