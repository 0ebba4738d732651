"""The server's proof check (ProofChecker) against the standard library's HMAC-SHA256."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from wire.constants import Operation
from wire.credential import ProofChecker, compute_proof

keys = st.binary(min_size=32, max_size=32)
nonces = st.binary(min_size=32, max_size=32)
ops = st.sampled_from(list(Operation))
uids = st.text(min_size=0, max_size=255)


@given(keys, nonces, ops, uids)
def test_check_accepts_exactly_the_standard_hmac(
        key: bytes, nonce: bytes, op: Operation, uid: str) -> None:
    message = b"MSGin5G-GW/1\x00" + nonce + bytes((int(op),)) + uid.encode()
    proof = hmac.new(key, message, hashlib.sha256).digest()
    checker = ProofChecker(nonce)
    assert checker.check(key, op, uid, proof)
    assert proof == compute_proof(key, nonce, op, uid)
    for position in (0, 31):  # any octet wrong: refused
        wrong = bytearray(proof)
        wrong[position] ^= 0x01
        assert not checker.check(key, op, uid, bytes(wrong))


@given(keys, nonces, uids)
def test_proof_for_another_op_or_key_is_refused(key: bytes, nonce: bytes, uid: str) -> None:
    checker = ProofChecker(nonce)
    proof = compute_proof(key, nonce, Operation.REGISTRATION, uid)
    assert not checker.check(key, Operation.DEREGISTRATION, uid, proof)
    other = bytes((key[0] ^ 1,)) + key[1:]
    assert not checker.check(other, Operation.REGISTRATION, uid, proof)


def test_wrong_sizes_are_refused() -> None:
    checker = ProofChecker(bytes(32))
    key = bytes(range(32))
    proof = compute_proof(key, bytes(32), Operation.REGISTRATION, "ue")
    assert checker.check(key, Operation.REGISTRATION, "ue", proof)
    assert not checker.check(key, Operation.REGISTRATION, "ue", proof[:31])
    assert not checker.check(key + b"\x00", Operation.REGISTRATION, "ue", proof)
