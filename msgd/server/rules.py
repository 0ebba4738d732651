"""The per-UE rules of wire-v1 §5 that need only provisioning: pure policy, no wire details.

`UeRules.registrations` decides UE_NOT_PROVISIONED, GATEWAY_NOT_AUTHORIZED and
AUTHENTICATION_FAILED; `UeRules.deregistrations` gives the credential verdict of a
de-registration, which the registry port applies after its own checks (wire-v1 §5 orders
NOT_REGISTERED and REGISTERED_VIA_OTHER_GATEWAY first). Everything that depends on registry
state lives behind the port (msgd.registry.port), so another registry decides it in its own
store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from msgd.config import GatewayPolicy
from msgd.errors import RegistryError
from wire.constants import FailureCause, Operation
from wire.credential import ProofChecker

__all__ = ["Request", "UeRules"]

_REGISTRATION, _DEREGISTRATION = int(Operation.REGISTRATION), int(Operation.DEREGISTRATION)
_STORAGE_FAILURE = FailureCause.STORAGE_FAILURE
_NOT_PROVISIONED = FailureCause.UE_NOT_PROVISIONED
_NOT_AUTHORIZED = FailureCause.GATEWAY_NOT_AUTHORIZED
_AUTHENTICATION_FAILED = FailureCause.AUTHENTICATION_FAILED

# K_ue and the gateways allowed to serve a UE Service ID, None when it is not provisioned. May
# raise RegistryError when the provisioning store cannot answer.
ProvisioningLookup = Callable[[str], "tuple[bytes, frozenset[str]] | None"]


class Request(Protocol):
    """What the rules read of a request or bulk entry."""

    @property
    def ue_service_id(self) -> str: ...

    @property
    def credential(self) -> bytes | None: ...


class UeRules:
    """Provisioning and credential checks (wire-v1 §5, §6) for every connection, a run of
    requests per call: a bulk frame's entries, or the single requests of one read."""

    def __init__(self, provisioned: ProvisioningLookup) -> None:
        self._provisioned = provisioned

    def registrations(
        self, gateway: GatewayPolicy, proofs: ProofChecker, requests: Iterable[Request]
    ) -> list[FailureCause | None]:
        """Why `gateway` may not register each UE, None where it may."""
        return self._decide(gateway, proofs, requests, True)

    def deregistrations(
        self, gateway: GatewayPolicy, proofs: ProofChecker, requests: Iterable[Request]
    ) -> list[FailureCause | None]:
        """The credential verdict of each de-registration (`port.Change.verdict`): None when
        none is present and none is required, or when it verifies."""
        return self._decide(gateway, proofs, requests, False)

    def _decide(
        self, gateway: GatewayPolicy, proofs: ProofChecker, requests: Iterable[Request],
        registering: bool,
    ) -> list[FailureCause | None]:
        lookup = self._provisioned
        check = proofs.check
        operation = _REGISTRATION if registering else _DEREGISTRATION
        identity = gateway.identity
        required = gateway.ue_authentication
        causes: list[FailureCause | None] = []
        cause = causes.append
        for request in requests:
            credential = request.credential
            if credential is None and not registering:
                cause(_AUTHENTICATION_FAILED if required else None)
                continue
            uid = request.ue_service_id
            try:
                provisioned = lookup(uid)
            except RegistryError:
                cause(_STORAGE_FAILURE)
                continue
            if provisioned is None:
                # De-registering, a UE removed from provisioning has no key left to check a
                # proof against.
                cause(_NOT_PROVISIONED if registering else _AUTHENTICATION_FAILED)
            elif registering and identity not in provisioned[1]:
                cause(_NOT_AUTHORIZED)
            elif credential is None:
                # wire-v1 §6: a credential that is present is always verified.
                cause(_AUTHENTICATION_FAILED if required else None)
            elif check(provisioned[0], operation, uid, credential):
                cause(None)
            else:
                cause(_AUTHENTICATION_FAILED)
        return causes
