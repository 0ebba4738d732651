"""The per-UE rules of wire-v1 §5 ("Semantics, per entry"): pure policy, no wire details.

One `Registrar` serves every connection. `register()` / `deregister()` decide an entry against
the provisioned subscriber store and the registry, and when the entry succeeds hand the change
to the registry, whose change sequence number says when the success may be sent (after the
commit that makes it durable).
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from msgd.config import GatewayPolicy
from msgd.errors import RegistryError
from msgd.log import get_logger
from msgd.registry.store import Registry
from wire.constants import FailureCause, Operation
from wire.credential import verify_proof
from wire.messages import PROFILE_SPEC, Profile, encode_group

log = get_logger("msgd.service")


class Procedure(IntEnum):
    """The four per-UE procedures an answer belongs to (metrics label them by `label`).

    An IntEnum: the connection keeps one per pending answer and compares them on its hot path.
    """

    REGISTRATION = 0
    DEREGISTRATION = 1
    BULK_REGISTRATION = 2
    BULK_DEREGISTRATION = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def is_bulk(self) -> bool:
        return self >= Procedure.BULK_REGISTRATION


class Outcome(NamedTuple):
    """The decision on one entry. `seq` is the registry change to wait for (None: no change).

    A NamedTuple, not a frozen dataclass: one is built per entry, and a frozen dataclass's
    __init__ (object.__setattr__ per field) cost 5x more, ~3 % of a bulk (bench/, profile).
    """

    cause: FailureCause | None
    seq: int | None = None
    retry_after: int | None = None

    @property
    def ok(self) -> bool:
        return self.cause is None


BUSY_RETRY_MS = 500
# The registry refused the change (its writer is gone, the file was refused): the entry fails,
# the connection and the daemon stay (wire-v1 §5, STORAGE_FAILURE).
STORAGE_FAILED = Outcome(FailureCause.STORAGE_FAILURE)


class Registrar:
    """wire-v1 §5 per-entry semantics over one Registry."""

    def __init__(self, registry: Registry, *, max_pending_writes: int) -> None:
        self.registry = registry
        self.max_pending_writes = max_pending_writes
        self._refusals = 0

    def _refused(self, op: str, exc: RegistryError) -> Outcome:
        # One line for the first refusal and one per 10,000 after it: a bulk against a dead
        # writer must not become a line per entry.
        if self._refusals % 10_000 == 0:
            log.error("registry.refused", op=op, reason=str(exc), refusals=self._refusals + 1)
        self._refusals += 1
        return STORAGE_FAILED

    def _busy(self) -> Outcome | None:
        # wire-v1 §5 Overload: shed load before the writer's queue grows without bound.
        if self.registry.pending() >= self.max_pending_writes:
            return Outcome(FailureCause.SERVER_BUSY, retry_after=BUSY_RETRY_MS)
        return None

    def register(
        self,
        gateway: GatewayPolicy,
        nonce: bytes,
        ue_service_id: str,
        credential: bytes | None,
        profile: Profile | None,
    ) -> Outcome:
        busy = self._busy()
        if busy is not None:
            return busy
        try:
            provisioned = self.registry.provisioned(ue_service_id)
            if provisioned is None:
                return Outcome(FailureCause.UE_NOT_PROVISIONED)
            if gateway.identity not in provisioned.gateways:
                return Outcome(FailureCause.GATEWAY_NOT_AUTHORIZED)
            # wire-v1 §6: a credential that is present is always verified.
            if (credential is not None or gateway.ue_authentication) and (
                credential is None
                or not verify_proof(
                    provisioned.key, nonce, Operation.REGISTRATION, ue_service_id, credential
                )
            ):
                return Outcome(FailureCause.AUTHENTICATION_FAILED)
            stored = encode_group(PROFILE_SPEC, profile) if profile is not None else None
            seq = self.registry.submit_register(ue_service_id, gateway.identity, stored)
        except RegistryError as exc:
            return self._refused("register", exc)
        return Outcome(None, seq)

    def deregister(
        self, gateway: GatewayPolicy, nonce: bytes, ue_service_id: str, credential: bytes | None
    ) -> Outcome:
        busy = self._busy()
        if busy is not None:
            return busy
        registration = self.registry.registration(ue_service_id)
        if registration is None:
            return Outcome(FailureCause.NOT_REGISTERED)
        if registration.gateway != gateway.identity:
            return Outcome(FailureCause.REGISTERED_VIA_OTHER_GATEWAY)
        try:
            if credential is not None or gateway.ue_authentication:
                provisioned = self.registry.provisioned(ue_service_id)
                # A UE removed from provisioning has no key left to check a proof against.
                if (
                    credential is None
                    or provisioned is None
                    or not verify_proof(
                        provisioned.key, nonce, Operation.DEREGISTRATION, ue_service_id,
                        credential,
                    )
                ):
                    return Outcome(FailureCause.AUTHENTICATION_FAILED)
            seq = self.registry.submit_deregister(ue_service_id)
        except RegistryError as exc:
            return self._refused("deregister", exc)
        return Outcome(None, seq)
