"""The wire v1.1 vectors (tests/wire/vectors_v1_1.json, docs/protocol.md §6.5): octets written
by hand from the text of §6, checked against the codec, the hash functions and both roles of
the session."""

from __future__ import annotations

from typing import Any

import pytest

from tests.vectors import V1_1, V1_1_VALID
from tests.wire.helpers import Pair, drain, errors_in, split_frames
from wire.constants import MESSAGE_NAMES, ErrorCause, MessageType
from wire.events import (
    BulkEntryReceived,
    ConnectionClosed,
    DigestReceived,
    ListReceived,
    SyncRequestReceived,
    TransactionFailed,
)
from wire.messages import (
    BulkMessage,
    DigestRequest,
    DigestResponse,
    Hello,
    ListRequest,
    decode_frames,
    encode_bulk,
    encode_message,
)
from wire.session import Role, Session
from wire.sync import bucket_of, ue_hash


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    return [(f.message_type, f.flags, f.transaction_id, f.body) for f in split_frames(data)]


@pytest.mark.parametrize("ue", V1_1["hashes"]["ues"], ids=lambda u: u["ue_service_id"])
def test_hash_vectors(ue: dict[str, Any]) -> None:
    uid = ue["ue_service_id"].encode()
    profile = None if ue["profile"] is None else bytes.fromhex(ue["profile"])
    assert ue_hash(uid, profile).hex() == ue["ue_hash"]
    for bits, bucket in ue.get("buckets", {}).items():
        assert bucket_of(uid, int(bits)) == bucket


def _describe(message: Any) -> dict[str, Any]:
    if isinstance(message, BulkMessage):
        out: dict[str, Any] = {"message": MESSAGE_NAMES[message.message_type],
                               "transaction_id": message.transaction_id, "count": message.count}
        if message.message_type is MessageType.LIST_RESPONSE:
            out["listed"] = [[e.ue_service_id, e.ue_hash.hex()] for e in message.entries]
        else:
            out["releases"] = [[e.ue_service_id, e.release] for e in message.entries]
        return out
    out = {"message": MESSAGE_NAMES[type(message).message_type]}
    for name in ("transaction_id", "bucket_bits", "first_bucket", "node_name", "max_frame_size",
                 "sync_supported", "ue_service_id", "release"):
        if getattr(message, name, None) is not None:
            out[name] = getattr(message, name)
    if isinstance(message, DigestResponse):
        out["digests"] = message.digests.hex()
    if isinstance(message, ListRequest):
        out["buckets"] = list(message.buckets)
    return out


@pytest.mark.parametrize("vector", V1_1["valid"], ids=lambda v: v["name"])
def test_valid_vector_decodes_and_reencodes(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    (message,) = decode_frames(data)
    described = _describe(message)
    expected = {k: v for k, v in vector["decoded"].items() if k != "frames"}
    assert {k: described.get(k) for k in expected} == expected
    frames = _frames(data)
    assert len(frames) == vector["decoded"].get("frames", 1)
    # Re-encoded with the same fragmentation (the first frame's body bounds it).
    size = len(frames[0][3]) if len(frames) > 1 else 65_535
    if isinstance(message, BulkMessage):
        again = b"".join(encode_bulk(message, max_frame_size=size))
    else:
        again = encode_message(message, max_frame_size=size)
    assert again == data


def _established(role: Role, *, sync: bool) -> Session:
    pair = Pair()
    pair.handshake(ue_auth=True, sync=sync)
    if role is Role.SERVER:
        return pair.server
    pair.gateway.send_request(DigestRequest(2, 2))
    pair.gateway.send_request(ListRequest(4, 12, (1,)))
    pair.gateway.data_to_send()
    return pair.gateway


def _drain(session: Session) -> list[Any]:
    return drain(session)


def test_hello_ack_vector_turns_sync_on_in_the_gateway() -> None:
    gateway = Session(Role.GATEWAY, now=0.0)
    gateway.send_hello(Hello(1, 2, node_name="gw1.example"))
    gateway.receive_data(bytes.fromhex(V1_1_VALID["hello_ack_sync"]["hex"]), 0.0)
    _drain(gateway)
    assert gateway.sync_enabled


@pytest.mark.parametrize("name", ["digest_request", "list_request"])
def test_request_vectors_reach_the_server_user(name: str) -> None:
    server = _established(Role.SERVER, sync=True)
    server.receive_data(bytes.fromhex(V1_1_VALID[name]["hex"]), 1.0)
    (event,) = _drain(server)
    assert isinstance(event, SyncRequestReceived)
    assert _describe(event.request) == V1_1_VALID[name]["decoded"]


def test_release_vectors_reach_the_server_user() -> None:
    server = _established(Role.SERVER, sync=False)  # Release does not depend on the announcement
    server.receive_data(bytes.fromhex(V1_1_VALID["deregistration_release"]["hex"]), 1.0)
    server.receive_data(bytes.fromhex(V1_1_VALID["bulk_deregistration_release"]["hex"]), 1.0)
    events = _drain(server)
    assert events[0].request.release == 1 and events[0].request.credential is None
    (entry,) = [e for e in events if isinstance(e, BulkEntryReceived)]
    assert entry.entry.release == 1


@pytest.mark.parametrize("name, tid", [("digest_response_b2_two_frames", 3),
                                       ("list_response_two_frames", 5)])
def test_response_vectors_are_assembled_by_the_gateway(name: str, tid: int) -> None:
    gateway = _established(Role.GATEWAY, sync=True)
    request = (DigestRequest(tid, 2) if name.startswith("digest")
               else ListRequest(tid, 12, (1, 2)))
    gateway.send_request(request)
    gateway.data_to_send()
    data = bytes.fromhex(V1_1_VALID[name]["hex"])
    for n in range(len(data)):  # byte by byte: the same as at once
        gateway.receive_data(data[n : n + 1], 1.0)
    (event,) = _drain(gateway)
    decoded = V1_1_VALID[name]["decoded"]
    if isinstance(event, DigestReceived):
        assert (event.bucket_bits, event.digests.hex()) == (2, decoded["digests"])
    else:
        assert isinstance(event, ListReceived)
        assert [[e.ue_service_id, e.ue_hash.hex()] for e in event.entries] == decoded["listed"]
    assert gateway.outstanding == 2 and gateway.data_to_send() == b""


@pytest.mark.parametrize("vector", V1_1["invalid"], ids=lambda v: v["name"])
def test_invalid_vector(vector: dict[str, Any]) -> None:
    context = vector["context"]
    if context.startswith("gateway"):
        session = _established(Role.GATEWAY, sync=True)
    else:
        session = _established(Role.SERVER, sync=context == "server, sync announced")
    session.receive_data(bytes.fromhex(vector["hex"]), 1.0)
    events = _drain(session)
    errors = errors_in(session.data_to_send())
    assert [e.error_cause for e in errors] == [ErrorCause[vector["expect_error_cause"]]]
    assert session.is_closed == vector["connection_closed"]
    assert any(isinstance(e, ConnectionClosed) for e in events) == vector["connection_closed"]
    if context.startswith("gateway"):
        # The gateway's ERROR ended its transaction (id 2 or 4); the other one is still open.
        (failed,) = [e for e in events if isinstance(e, TransactionFailed)]
        assert failed.sent and errors[0].transaction_id == failed.transaction_id
        assert session.outstanding == 1
