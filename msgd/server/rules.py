"""The per-UE rules of wire-v1 §5 that need only provisioning: pure policy, no wire details.

`UeRules.registration` decides UE_NOT_PROVISIONED, GATEWAY_NOT_AUTHORIZED and
AUTHENTICATION_FAILED; `UeRules.deregistration` gives the credential verdict of a
de-registration, which the registry port applies after its own checks (wire-v1 §5 orders
NOT_REGISTERED and REGISTERED_VIA_OTHER_GATEWAY first). Everything that depends on registry
state lives behind the port (msgd.registry.port), so another registry decides it in its own
store.
"""

from __future__ import annotations

from collections.abc import Callable

from msgd.config import GatewayPolicy
from msgd.errors import RegistryError
from wire.constants import FailureCause, Operation
from wire.credential import ProofChecker

__all__ = ["UeRules"]

_REGISTRATION, _DEREGISTRATION = int(Operation.REGISTRATION), int(Operation.DEREGISTRATION)

# K_ue and the gateways allowed to serve a UE Service ID, None when it is not provisioned. May
# raise RegistryError when the provisioning store cannot answer.
ProvisioningLookup = Callable[[str], "tuple[bytes, frozenset[str]] | None"]


class UeRules:
    """Provisioning and credential checks (wire-v1 §5, §6) for every connection."""

    def __init__(self, provisioned: ProvisioningLookup) -> None:
        self._provisioned = provisioned

    def registration(
        self, gateway: GatewayPolicy, proofs: ProofChecker, ue_service_id: str,
        credential: bytes | None,
    ) -> FailureCause | None:
        """Why `gateway` may not register the UE, or None when it may."""
        try:
            provisioned = self._provisioned(ue_service_id)
        except RegistryError:
            return FailureCause.STORAGE_FAILURE
        if provisioned is None:
            return FailureCause.UE_NOT_PROVISIONED
        key, gateways = provisioned
        if gateway.identity not in gateways:
            return FailureCause.GATEWAY_NOT_AUTHORIZED
        # wire-v1 §6: a credential that is present is always verified.
        if (credential is not None or gateway.ue_authentication) and (
            credential is None
            or not proofs.check(key, _REGISTRATION, ue_service_id, credential)
        ):
            return FailureCause.AUTHENTICATION_FAILED
        return None

    def deregistration(
        self, gateway: GatewayPolicy, proofs: ProofChecker, ue_service_id: str,
        credential: bytes | None,
    ) -> FailureCause | None:
        """The credential verdict of a de-registration (`port.Change.verdict`): None when
        none is present and none is required, or when it verifies."""
        if credential is None:
            return FailureCause.AUTHENTICATION_FAILED if gateway.ue_authentication else None
        try:
            provisioned = self._provisioned(ue_service_id)
        except RegistryError:
            return FailureCause.STORAGE_FAILURE
        # A UE removed from provisioning has no key left to check a proof against.
        if provisioned is None or not proofs.check(
            provisioned[0], _DEREGISTRATION, ue_service_id, credential
        ):
            return FailureCause.AUTHENTICATION_FAILED
        return None
