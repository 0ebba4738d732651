"""The UE credential proof of wire-v1 §6 (compute and constant-time verify)."""

from __future__ import annotations

import hashlib
import hmac

from .constants import CREDENTIAL_SIZE, NONCE_SIZE, Operation

_LABEL = b"MSGin5G-GW/1\x00"
_sha256 = hashlib.sha256
KEY_SIZE = 32


def compute_proof(key: bytes, nonce: bytes, op: Operation | int, ue_service_id: str) -> bytes:
    """HMAC-SHA256(K_ue, "MSGin5G-GW/1" || 0x00 || server_nonce || op || ue_service_id)."""
    if len(key) != KEY_SIZE:
        raise ValueError("K_ue must be 32 octets")
    if len(nonce) != NONCE_SIZE:
        raise ValueError("server nonce must be 32 octets")
    msg = _LABEL + nonce + bytes((int(op),)) + ue_service_id.encode("utf-8")
    return hmac.new(key, msg, hashlib.sha256).digest()


# HMAC's pads (RFC 2104) as translation tables: `block.translate(_IPAD)` is block XOR 0x36.
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_KEY_FILL = bytes(hashlib.sha256().block_size - KEY_SIZE)


class ProofChecker:
    """verify_proof for one session's nonce, without per-call set-up: the label, nonce and op
    octets are joined once, and the HMAC is written out as RFC 2104 defines it, two SHA-256
    calls over the padded key. Measured on the benchmark VM (OpenSSL 3.0): 1.3-2.1 µs per
    proof against 2.6-4.5 µs for the one-shot `hmac.digest`, whose OpenSSL HMAC fetches and
    sets up a MAC context per call (docs/performance.md). A 32-octet key needs no hashing
    (RFC 2104: only keys longer than the 64-octet block are hashed first); the differential
    test holds this equal to `hmac`."""

    __slots__ = ("_prefixes",)

    def __init__(self, nonce: bytes) -> None:
        if len(nonce) != NONCE_SIZE:
            raise ValueError("server nonce must be 32 octets")
        self._prefixes = {
            int(op): _LABEL + nonce + bytes((int(op),)) for op in Operation
        }

    def check(self, key: bytes, op: Operation | int, ue_service_id: str, proof: bytes) -> bool:
        """True when `proof` is right for `key`; compared in constant time."""
        if len(proof) != CREDENTIAL_SIZE or len(key) != KEY_SIZE:
            return False
        block = key + _KEY_FILL
        inner = _sha256(block.translate(_IPAD) + self._prefixes[op]
                        + ue_service_id.encode("utf-8")).digest()
        return hmac.compare_digest(_sha256(block.translate(_OPAD) + inner).digest(), proof)


def verify_proof(
    key: bytes, nonce: bytes, op: Operation | int, ue_service_id: str, proof: bytes
) -> bool:
    """True when `proof` is right; compared in constant time."""
    if len(proof) != CREDENTIAL_SIZE:
        return False
    return hmac.compare_digest(compute_proof(key, nonce, op, ue_service_id), proof)
