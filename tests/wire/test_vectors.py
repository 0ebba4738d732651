"""Every vector of ../shared/spec/vectors/v1.json, valid and invalid."""

from __future__ import annotations

from typing import Any

import pytest

from tests.vectors import VALID, VECTORS
from wire.constants import MESSAGE_NAMES, ErrorCause, MessageType
from wire.credential import ProofChecker, compute_proof, verify_proof
from wire.events import NEED_DATA, BulkEntryReceived, ConnectionClosed, HelloReceived
from wire.frames import encode_frame
from wire.ies import split_ies
from wire.messages import (
    BulkMessage,
    RegistrationResponseEntry,
    decode_frames,
    encode_bulk,
    encode_message,
    message_fields,
)
from wire.session import Role, Session

MESSAGE_VECTORS = [v for v in VECTORS["valid"] if "message" in v["decoded"]]


def _as_vector(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_as_vector(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return {k: _as_vector(v) for k, v in message_fields(value).items() if v is not None}
    return int(value) if isinstance(value, int) else value


def _describe(message: Any, frames: int) -> dict[str, Any]:
    if isinstance(message, BulkMessage):
        out: dict[str, Any] = {
            "message": MESSAGE_NAMES[message.message_type],
            "transaction_id": message.transaction_id,
            "count": message.count,
            "frames": frames,
        }
        if message.message_type in (MessageType.BULK_REGISTRATION_RESPONSE,
                                    MessageType.BULK_DEREGISTRATION_RESPONSE):
            out["results"] = [[e.ue_service_id, e.result, e.failure_cause] for e in message.entries]
        else:
            out["ue_service_ids"] = [e.ue_service_id for e in message.entries]
        return out
    out = {"message": MESSAGE_NAMES[type(message).message_type]}
    out.update(_as_vector(message))
    return out


@pytest.mark.parametrize("vector", MESSAGE_VECTORS, ids=lambda v: v["name"])
def test_valid_vector_decodes_to_its_fields_and_reencodes(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    (message,) = decode_frames(data)
    frames = _count_frames(data)
    described = _describe(message, frames)
    for key, expected in vector["decoded"].items():
        assert described.get(key) == expected, key
    if isinstance(message, BulkMessage):
        # Re-encode with the same fragmentation: the first frame's body size bounds it.
        first_body = int.from_bytes(data[8:12], "big")
        again = b"".join(encode_bulk(message, max_frame_size=first_body if frames > 1 else 65535))
    else:
        again = encode_message(message)
    assert again == data


@pytest.mark.parametrize("vector", MESSAGE_VECTORS, ids=lambda v: v["name"])
def test_valid_vector_reference_decoder_agrees(vector: dict[str, Any]) -> None:
    from wire.messages import decode_body

    data = bytes.fromhex(vector["hex"])
    mtype = MessageType(data[1])
    if mtype in (MessageType.BULK_REGISTRATION_REQUEST, MessageType.BULK_REGISTRATION_RESPONSE,
                 MessageType.BULK_DEREGISTRATION_REQUEST, MessageType.BULK_DEREGISTRATION_RESPONSE):
        return  # bulk bodies go through BulkReader, covered by test_differential
    tid = int.from_bytes(data[4:8], "big")
    assert decode_body(mtype, tid, data[12:], reference=True) == decode_body(mtype, tid, data[12:])


def _count_frames(data: bytes) -> int:
    n = pos = 0
    while pos < len(data):
        pos += 12 + int.from_bytes(data[pos + 8 : pos + 12], "big")
        n += 1
    return n


def test_credential_vector() -> None:
    vector = VALID["credential_register"]
    decoded = vector["decoded"]
    ((iei, value),) = split_ies(bytes.fromhex(vector["hex"]))
    assert iei == 0x02
    key, nonce = bytes.fromhex(decoded["key"]), bytes.fromhex(decoded["nonce"])
    assert key == bytes.fromhex(VECTORS["key_ue"])
    assert nonce == bytes.fromhex(VECTORS["server_nonce"])
    proof = compute_proof(key, nonce, decoded["op"], decoded["ue_service_id"])
    assert proof.hex() == decoded["proof"] == value.hex()
    assert verify_proof(key, nonce, decoded["op"], decoded["ue_service_id"], value)
    assert not verify_proof(key, nonce, 2, decoded["ue_service_id"], value)


def test_vector_proofs_in_messages_verify() -> None:
    """The credentials inside the registration, de-registration and bulk vectors are real."""
    key = bytes.fromhex(VECTORS["key_ue"])
    nonce = bytes.fromhex(VECTORS["server_nonce"])
    (req,) = decode_frames(bytes.fromhex(VALID["registration_request"]["hex"]))
    assert verify_proof(key, nonce, 1, req.ue_service_id, req.credential)
    (dereg,) = decode_frames(bytes.fromhex(VALID["deregistration_request"]["hex"]))
    assert verify_proof(key, nonce, 2, dereg.ue_service_id, dereg.credential)
    (bulk,) = decode_frames(bytes.fromhex(VALID["bulk_registration_one_frame"]["hex"]))
    for entry in bulk.entries:
        assert verify_proof(key, nonce, 1, entry.ue_service_id, entry.credential)


def _server_after_hello() -> Session:
    server = Session(Role.SERVER, now=0.0)
    server.receive_data(bytes.fromhex(VALID["hello"]["hex"]), now=0.0)
    event = server.next_event()
    assert isinstance(event, HelloReceived)
    server.accept_hello(server_nonce=bytes(32), bulk_allowed=True, ue_authentication_required=True)
    server.data_to_send()
    return server


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, tid, body) per frame, as sent (fragments are not joined)."""
    out = []
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 8 : pos + 12], "big")
        out.append((data[pos + 1], int.from_bytes(data[pos + 2 : pos + 4], "big"),
                    int.from_bytes(data[pos + 4 : pos + 8], "big"),
                    data[pos + 12 : pos + 12 + length]))
        pos += 12 + length
    return out


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vector(vector: dict[str, Any]) -> None:
    if vector["context"] == "after HELLO":
        server = _server_after_hello()
    else:
        assert vector["context"] == "first frame"
        server = Session(Role.SERVER, now=0.0)
    server.receive_data(bytes.fromhex(vector["hex"]), now=1.0)
    events = []
    answered = 0
    while (event := server.next_event()) is not NEED_DATA:
        events.append(event)
        if isinstance(event, BulkEntryReceived):
            answered += 1
            server.send_bulk_entry(event.transaction_id,
                                   RegistrationResponseEntry(event.entry.ue_service_id, 0))
    frames = _frames(server.data_to_send())
    errors = [decode_frames(encode_frame(t, tid, body))[0] for t, _, tid, body in frames
              if t == MessageType.ERROR]
    assert len(errors) == 1, frames
    assert errors[0].error_cause == ErrorCause[vector["expect_error_cause"]]
    assert server.is_closed == vector["connection_closed"]
    assert any(isinstance(e, ConnectionClosed) for e in events) == vector["connection_closed"]
    # ERROR comes last: every entry delivered before it was answered first (wire-v1 §5 Count),
    # in response fragments that all carry MORE (the response never gets a final fragment).
    assert frames[-1][0] == MessageType.ERROR
    responses = [f for f in frames[:-1] if f[0] == MessageType.BULK_REGISTRATION_RESPONSE]
    assert all(flags & 1 for _, flags, _, _ in responses)
    entries = [iei for _, _, _, body in responses for iei, _ in split_ies(body) if iei == 0x0D]
    assert len(entries) == answered
    if vector["name"] == "count_mismatch":
        assert answered == 2


def test_proof_checker_agrees_with_verify_proof() -> None:
    """ProofChecker (the server's per-session check) accepts exactly what verify_proof does:
    the vector's proof, and not one with another op, UE, nonce, key or a flipped octet."""
    key = bytes.fromhex(VECTORS["key_ue"])
    nonce = bytes.fromhex(VECTORS["server_nonce"])
    (req,) = decode_frames(bytes.fromhex(VALID["registration_request"]["hex"]))
    proof, uid = req.credential, req.ue_service_id
    checker = ProofChecker(nonce)
    assert checker.check(key, 1, uid, proof)
    assert not checker.check(key, 2, uid, proof)
    assert not checker.check(key, 1, uid + "x", proof)
    assert not ProofChecker(bytes(32)).check(key, 1, uid, proof)
    assert not checker.check(bytes(32), 1, uid, proof)
    assert not checker.check(key, 1, uid, proof[:-1] + bytes([proof[-1] ^ 1]))
    assert not checker.check(key, 1, uid, proof[:-1])  # a short proof is simply wrong
    assert not checker.check(key[:-1], 1, uid, proof)
    for op in (1, 2):
        made = compute_proof(key, nonce, op, "ue-ü@example.net")
        assert checker.check(key, op, "ue-ü@example.net", made)
        assert verify_proof(key, nonce, op, "ue-ü@example.net", made)
    with pytest.raises(ValueError):
        ProofChecker(bytes(31))
