"""Sans-IO tests of v1.1 registry sync in the session (docs/protocol.md §6): both roles."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.wire.helpers import Pair, drain
from wire.constants import ErrorCause
from wire.errors import LocalProtocolError
from wire.events import (
    NEED_DATA,
    DigestReceived,
    ListReceived,
    ProtocolErrorDetected,
    SyncRequestReceived,
    TransactionFailed,
)
from wire.messages import DigestRequest, ListedUe, ListRequest, decode_frames
from wire.session import Limits, Session
from wire.sync import FineDigests, bucket_of, digests_of, fold, hash_many, hash_ue, ue_hash


def _pair(sync: bool = True, gateway_frame: int = 65_535) -> tuple[Session, Session]:
    pair = Pair(Limits(max_outstanding=4), Limits(max_frame_size=gateway_frame))
    pair.handshake(bulk_allowed=False, sync=sync)
    return pair.server, pair.gateway


def _pump(src: Session, dst: Session) -> list[Any]:
    dst.receive_data(src.data_to_send(), 1.0)
    return drain(dst)


def test_digest_round_trip_fragments_within_the_gateways_frame_size() -> None:
    server, gateway = _pair(gateway_frame=4096)
    gateway.send_request(DigestRequest(2, 12))  # allowed although bulk is not
    (event,) = _pump(gateway, server)
    assert isinstance(event, SyncRequestReceived) and server.outstanding == 1
    digests = os.urandom(16 * 4096)
    assert server.send_digest_response(2, 12, digests)
    wire = server.data_to_send()
    sizes = []
    pos = 0
    while pos < len(wire):
        sizes.append(int.from_bytes(wire[pos + 8 : pos + 12], "big"))
        pos += 12 + sizes[-1]
    assert len(sizes) == 17 and max(sizes) <= 4096
    gateway.receive_data(wire, 1.0)
    (got,) = [e for e in iter(gateway.next_event, NEED_DATA)]
    assert isinstance(got, DigestReceived) and got.digests == digests
    assert server.outstanding == gateway.outstanding == 0


def test_list_response_streams_and_the_gateways_error_stops_it() -> None:
    server, gateway = _pair()
    gateway.send_request(ListRequest(3, 4, (0, 15)))
    (event,) = _pump(gateway, server)
    assert event.request.buckets == (0, 15)
    assert server.start_list_response(3, 10_000)
    handle = server.transaction(3)
    assert server.send_list_entries(3, [ListedUe(f"ue-{n}", bytes(16)) for n in range(3000)],
                                    handle)
    first = server.data_to_send()
    assert first[2:4] == b"\x00\x01"  # fragments with MORE went out already
    gateway.receive_data(first, 1.0)
    assert gateway.next_event() is NEED_DATA  # assembling, nothing yet
    gateway.send_error(3, ErrorCause.INTERNAL_ERROR, "stop")
    assert isinstance(gateway.next_event(), TransactionFailed)
    events = _pump(gateway, server)
    assert any(isinstance(e, TransactionFailed) and not e.sent for e in events)
    assert not server.send_list_entries(3, [ListedUe("late", bytes(16))], handle)
    assert server.outstanding == 0
    # Fragments still on their way are dropped by the gateway without an answer.
    gateway.receive_data(first[:0] + b"\x01\x1b\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00", 2.0)
    assert gateway.next_event() is NEED_DATA and gateway.data_to_send() == b""


def test_list_response_whole() -> None:
    server, gateway = _pair()
    gateway.send_request(ListRequest(3, 0, (0,)))
    _pump(gateway, server)
    server.start_list_response(3, 2)
    server.send_list_entries(3, [ListedUe("a", bytes(16))])
    server.send_list_entries(3, [ListedUe("b", bytes(range(16)))])
    (event,) = _pump(server, gateway)
    assert isinstance(event, ListReceived)
    assert [e.ue_service_id for e in event.entries] == ["a", "b"]


def test_empty_list_response() -> None:
    server, gateway = _pair()
    gateway.send_request(ListRequest(3, 0, (0,)))
    _pump(gateway, server)
    server.start_list_response(3, 0)
    (event,) = _pump(server, gateway)
    assert isinstance(event, ListReceived) and event.entries == ()


def test_sync_requests_count_as_outstanding_and_ids_in_use() -> None:
    server, gateway = _pair()
    gateway.send_request(DigestRequest(2, 1))
    _pump(gateway, server)
    raw = gateway._out  # a second request with the same id, as a misbehaving gateway would
    from wire.messages import encode_message

    raw.append(encode_message(ListRequest(2, 1, (0,))))
    events = _pump(gateway, server)
    assert [e.error.cause for e in events if isinstance(e, ProtocolErrorDetected)] == [
        ErrorCause.TRANSACTION_ID_IN_USE]
    assert server.outstanding == 1


def test_server_user_error_ends_a_sync_transaction() -> None:
    server, gateway = _pair()
    gateway.send_request(DigestRequest(2, 3))
    _pump(gateway, server)
    server.send_error(2, ErrorCause.INTERNAL_ERROR, "registry unreadable")
    events = _pump(server, gateway)
    (failed,) = [e for e in events if isinstance(e, TransactionFailed)]
    assert failed.cause is ErrorCause.INTERNAL_ERROR and not failed.sent
    assert server.outstanding == gateway.outstanding == 0


def test_a_gateway_cannot_send_sync_unannounced_and_server_checks_its_answers() -> None:
    _server, gateway = _pair(sync=False)
    with pytest.raises(LocalProtocolError):
        gateway.send_request(DigestRequest(2, 1))
    server2, gateway2 = _pair()
    gateway2.send_request(DigestRequest(2, 1))
    _pump(gateway2, server2)
    with pytest.raises(LocalProtocolError):
        server2.send_digest_response(2, 1, bytes(16))  # 2^1 buckets need 32 octets
    with pytest.raises(LocalProtocolError):
        server2.start_list_response(2, 1)  # not a LIST REQUEST


def test_fold_agrees_with_hashing_at_each_level() -> None:
    ues = [(f"ue-{n}".encode(), None if n % 3 else bytes([0x30, 0, 1, 1])) for n in range(500)]
    fine = digests_of(ues, 12)
    for bits in (0, 1, 5, 11, 12):
        assert fold(fine, bits) == digests_of(ues, bits)
    assert ue_hash(b"a", None) != ue_hash(b"a", b"")
    for uid, profile in ues[:50]:
        assert hash_ue(uid.decode(), profile) == (bucket_of(uid, 12), ue_hash(uid, profile))
    fine = FineDigests()
    for uid, profile in ues:
        fine.xor(*hash_ue(uid.decode(), profile))
    assert fine.digests(5) == digests_of(ues, 5)


def test_hash_many_is_hash_ue_of_each() -> None:
    """The server's batch form (wire.sync.hash_many) against the one definition, over UE
    Service IDs of every length class, non-ASCII ones, and profiles of several sizes."""
    uids = ["a", "é" * 10, "x" * 255, *(f"imsi-{n:015d}" for n in range(200))]
    profiles = [None, b"", bytes([0x30, 0, 1, 1]), bytes(300)]
    pairs = [(u, profiles[n % len(profiles)]) for n, u in enumerate(uids)]
    buckets, hashes = hash_many([u for u, _ in pairs], [p for _, p in pairs])
    assert [(b, h.to_bytes(16, "big")) for b, h in zip(buckets, hashes, strict=True)] == [
        (bucket_of(u.encode(), 12), ue_hash(u.encode(), p)) for u, p in pairs]
    assert hash_many([], []) == ([], [])


def test_decode_frames_joins_a_fragmented_digest_response() -> None:
    server, gateway = _pair(gateway_frame=4096)
    gateway.send_request(DigestRequest(2, 12))
    _pump(gateway, server)
    digests = os.urandom(16 * 4096)
    server.send_digest_response(2, 12, digests)
    (whole,) = decode_frames(server.data_to_send())
    assert whole.digests == digests and whole.bucket_bits == 12
