"""The UE credential proof of wire-v1 §6 (compute and constant-time verify)."""

from __future__ import annotations

import hashlib
import hmac

from .constants import CREDENTIAL_SIZE, NONCE_SIZE, Operation

_LABEL = b"MSGin5G-GW/1\x00"
KEY_SIZE = 32


def compute_proof(key: bytes, nonce: bytes, op: Operation | int, ue_service_id: str) -> bytes:
    """HMAC-SHA256(K_ue, "MSGin5G-GW/1" || 0x00 || server_nonce || op || ue_service_id)."""
    if len(key) != KEY_SIZE:
        raise ValueError("K_ue must be 32 octets")
    if len(nonce) != NONCE_SIZE:
        raise ValueError("server nonce must be 32 octets")
    msg = _LABEL + nonce + bytes((int(op),)) + ue_service_id.encode("utf-8")
    return hmac.new(key, msg, hashlib.sha256).digest()


def verify_proof(
    key: bytes, nonce: bytes, op: Operation | int, ue_service_id: str, proof: bytes
) -> bool:
    """True when `proof` is right; compared in constant time."""
    if len(proof) != CREDENTIAL_SIZE:
        return False
    return hmac.compare_digest(compute_proof(key, nonce, op, ue_service_id), proof)
