"""The per-UE rules that need only provisioning (msgd.server.rules, wire-v1 §5 and §6).

A run of requests is decided in one call; each case states the rule it holds. Provisioning is
the real in-memory store a PostgreSQL node uses (MemoryProvisioning); keys are made per run.
The end-to-end tests see the same rules through a server; these pin the cases a server test
does not reach (a de-registration of a UE removed from provisioning, or through a gateway the
UE's provisioning no longer names).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from msgd.config import GatewayPolicy
from msgd.errors import RegistryError
from msgd.registry.memory_provisioning import MemoryProvisioning
from msgd.registry.provisioning import ProvisionedUe
from msgd.server.rules import UeRules
from wire.constants import FailureCause, Operation
from wire.credential import ProofChecker, compute_proof

AUTH = FailureCause.AUTHENTICATION_FAILED
NONCE = os.urandom(32)
KEYS = {ue: os.urandom(32) for ue in ("ue-a", "ue-b", "gone")}
GW1 = GatewayPolicy("gw1")
TRUSTED = GatewayPolicy("gw1", ue_authentication=False)


@dataclass(frozen=True)
class Request:
    ue_service_id: str
    credential: bytes | None


def proof(ue: str, operation: Operation, key: bytes | None = None) -> bytes:
    return compute_proof(key or KEYS[ue], NONCE, operation, ue)


@pytest.fixture
def rules() -> UeRules:
    provisioning = MemoryProvisioning()
    provisioning.replace_provisioning([
        ProvisionedUe("ue-a", KEYS["ue-a"], frozenset({"gw1"})),
        ProvisionedUe("ue-b", KEYS["ue-b"], frozenset({"gw2"})),
    ])  # "gone" was provisioned once: a gateway may still hold its key
    return UeRules(provisioning.key_and_gateways)


def test_registrations(rules: UeRules) -> None:
    reg = Operation.REGISTRATION
    causes = rules.registrations(GW1, ProofChecker(NONCE), [
        Request("ue-a", proof("ue-a", reg)),
        Request("nobody", proof("gone", reg)),                  # not provisioned
        Request("ue-b", proof("ue-b", reg)),                    # provisioned for gw2 only
        Request("ue-a", None),                                  # a credential is required
        Request("ue-a", proof("ue-a", Operation.DEREGISTRATION)),  # proof of the other op
        Request("ue-a", proof("ue-a", reg, KEYS["ue-b"])),      # proof under another key
        Request("ue-a", proof("ue-a", reg)[:31]),               # truncated
    ])
    assert causes == [None, FailureCause.UE_NOT_PROVISIONED,
                      FailureCause.GATEWAY_NOT_AUTHORIZED, AUTH, AUTH, AUTH, AUTH]


def test_a_trusted_gateway_needs_no_credential_but_one_present_is_verified(
    rules: UeRules,
) -> None:
    reg = Operation.REGISTRATION
    causes = rules.registrations(TRUSTED, ProofChecker(NONCE), [
        Request("ue-a", None),
        Request("ue-a", proof("ue-a", reg, KEYS["ue-b"])),
        Request("ue-b", None),   # provisioning is checked all the same
        Request("nobody", None),
    ])
    assert causes == [None, AUTH, FailureCause.GATEWAY_NOT_AUTHORIZED,
                      FailureCause.UE_NOT_PROVISIONED]


def test_deregistration_verdicts(rules: UeRules) -> None:
    dereg = Operation.DEREGISTRATION
    causes = rules.deregistrations(GW1, ProofChecker(NONCE), [
        Request("ue-a", proof("ue-a", dereg)),
        Request("ue-a", proof("ue-a", Operation.REGISTRATION)),
        Request("ue-a", None),
        # Removed from provisioning: no key left to check the proof against.
        Request("gone", proof("gone", dereg)),
        # Provisioned for gw2 only now: who may serve it is the registry's question
        # (REGISTERED_VIA_OTHER_GATEWAY); the proof alone is judged here.
        Request("ue-b", proof("ue-b", dereg)),
    ])
    assert causes == [None, AUTH, AUTH, AUTH, None]


def test_a_trusted_gateway_deregisters_without_a_credential_even_when_unprovisioned(
    rules: UeRules,
) -> None:
    causes = rules.deregistrations(TRUSTED, ProofChecker(NONCE), [
        Request("gone", None),
        Request("gone", proof("gone", Operation.DEREGISTRATION)),
    ])
    assert causes == [None, AUTH]


def test_a_provisioning_store_that_cannot_answer_gives_storage_failure() -> None:
    def broken(_ue: str) -> tuple[bytes, frozenset[str]] | None:
        raise RegistryError("registry is closed")

    rules = UeRules(broken)
    proofs = ProofChecker(NONCE)
    request = Request("ue-a", proof("ue-a", Operation.REGISTRATION))
    assert rules.registrations(GW1, proofs, [request]) == [FailureCause.STORAGE_FAILURE]
    assert rules.deregistrations(GW1, proofs, [request]) == [FailureCause.STORAGE_FAILURE]
    # Nothing to look up: a de-registration without a credential is decided all the same.
    assert rules.deregistrations(TRUSTED, proofs, [Request("ue-a", None)]) == [None]
