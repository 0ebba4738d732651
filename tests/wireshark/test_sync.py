"""The dissector on wire v1.1 (registry sync, docs/protocol.md §6), read by the real tshark.

Every vector of tests/wire/vectors_v1_1.json travels in a plaintext TCP stream of its own (as
test_vectors.py does for the spec's v1 vectors), cut inside its header and inside its body.
An invalid vector whose fault needs a session around it (its "context": what the server
announced, which requests the gateway has open) is preceded in its stream by the frames that
make that context, so that the fault becomes visible in the octets of the stream. Then streams
built with wire's encoders show what the vectors do not: a whole exchange with fragmented
DIGEST and LIST RESPONSEs linked to their requests, and DIGEST RESPONSE fragments out of
sequence. One tshark run decodes them all.
"""

from __future__ import annotations

import pytest

from tests.vectors import V1_1
from tests.wireshark.pcap import Capture
from tests.wireshark.tools import Node, decode, from_server
from wire.constants import IEI, MESSAGE_NAMES, ErrorCause, MessageType
from wire.messages import (
    BulkMessage,
    DigestRequest,
    Error,
    Hello,
    HelloAck,
    ListedUe,
    ListRequest,
    UeDeregistrationRequest,
    UeDeregistrationResponse,
    encode_bulk,
    encode_digest_response,
    encode_frame,
    encode_ie,
    encode_message,
)

NONCE = bytes(32)
DIGEST_RSP = MessageType.DIGEST_RESPONSE


def hello_ack(sync: bool, max_frame_size: int = 65535) -> bytes:
    return encode_message(HelloAck(1, NONCE, max_frame_size, 100, 8, 30, 1, 1,
                                   sync_supported=1 if sync else None))


# The frames that make each vector's "context": (sent by the gateway, frame) in order. The
# vector itself then comes from the gateway when its context is a server's, and from the
# server when it is a gateway's.
CONTEXTS = {
    "server, sync announced": [(True, encode_message(Hello(1, 2))), (False, hello_ack(True))],
    "server, v1": [(True, encode_message(Hello(1, 2))), (False, hello_ack(False))],
    "gateway, awaiting DIGEST b = 2 (2) and LIST (4)": [
        (True, encode_message(Hello(1, 2))), (False, hello_ack(True)),
        (True, encode_message(DigestRequest(2, 2))),
        (True, encode_message(ListRequest(4, 2, (0, 1))))],
}
# What each invalid vector's octets (with its context) show, as the expert info naming it.
INVALID_EXPERT = {
    "bucket_bits_13": "bad_value",
    "list_bucket_too_large": "bucket_range",
    "list_not_ascending": "not_ascending",
    "list_repeated_bucket": "not_ascending",
    "list_empty": "ie_length",
    "list_odd_length": "ie_length",
    "list_without_bucket_bits": "missing_ie",
    "digest_request_more": "more_on_single",
    "digest_response_to_server": "wrong_direction",
    "release_value_2": "bad_value",
    "digest_request_v1": "sync_not_announced",
    "list_request_v1": "sync_not_announced",
    "digest_wrong_bucket_bits": "bucket_bits_mismatch",
    "digest_gap": "digest_sequence",
    "digest_short": "digest_count",
    "list_count_mismatch": "count_mismatch",
    "list_short_hash": "ie_length",
}
# "decoded" keys of the valid vectors -> display-filter field (after "msgin5g."), one value.
SCALARS = {"transaction_id": "tid", "node_name": "node_name", "max_frame_size": "max_frame_size",
           "sync_supported": "sync.supported", "bucket_bits": "sync.bucket_bits",
           "count": "count", "ue_service_id": "ue_id", "release": "release"}
OCTETS = {"sync.ue_hash", "sync.digest"}


def u16(v: int) -> bytes:
    return v.to_bytes(2, "big")


def digest_fragment(tid: int, first: int, count: int, *, bits: int | None = None,
                    more: bool = False) -> bytes:
    """One DIGEST RESPONSE frame written by hand (wire's encoder only writes good ones)."""
    body = encode_ie(IEI.BUCKET_BITS, bytes([bits])) if bits is not None else b""
    body += encode_ie(IEI.FIRST_BUCKET, u16(first))
    body += encode_ie(IEI.BUCKET_DIGESTS, b"".join(bytes([first + k]) * 16 for k in range(count)))
    return encode_frame(DIGEST_RSP, tid, body, more=more)


# The exchange stream: 512 digests at most 4 096 octets a frame, and 30 Listed UEs at most
# 400 a frame, so both responses come in several fragments.
EXCHANGE_BITS = 9
EXCHANGE_DIGESTS = b"".join(bytes([k % 256]) * 8 + u16(k) * 4 for k in range(1 << EXCHANGE_BITS))
LISTED = [ListedUe(f"ue-{n:02d}@gw1.example", bytes([n]) * 16) for n in range(30)]
BUCKETS = (5, 300, 511)


def exchange_stream(stream) -> None:
    stream.send(encode_message(Hello(1, 2)))
    stream.send(hello_ack(True, 4096), from_client=False)
    stream.send(encode_message(DigestRequest(2, EXCHANGE_BITS)))
    for frame in encode_digest_response(2, EXCHANGE_BITS, EXCHANGE_DIGESTS, max_frame_size=4096):
        stream.send(frame, from_client=False, cuts=(100,))
    stream.send(encode_message(ListRequest(3, EXCHANGE_BITS, BUCKETS)))
    listing = BulkMessage(MessageType.LIST_RESPONSE, 3, len(LISTED), tuple(LISTED))
    for frame in encode_bulk(listing, max_frame_size=400):
        stream.send(frame, from_client=False)
    stream.send(encode_message(UeDeregistrationRequest(4, LISTED[0].ue_service_id, release=1)))
    stream.send(encode_message(UeDeregistrationResponse(4, LISTED[0].ue_service_id, 0)),
                from_client=False)


def digest_faults_stream(stream) -> None:
    stream.send(encode_message(Hello(1, 2)))
    stream.send(hello_ack(True), from_client=False)
    # b = 2: buckets 0-1, then an overlap (from 1), then Bucket bits again in fragment 3.
    stream.send(digest_fragment(5, 0, 2, bits=2, more=True), from_client=False)
    stream.send(digest_fragment(5, 1, 2, more=True), from_client=False)
    stream.send(digest_fragment(5, 3, 1, bits=2), from_client=False)
    # b = 1 with three buckets.
    stream.send(digest_fragment(6, 0, 3, bits=1), from_client=False)
    # A first fragment (bucket 0) without Bucket bits; a fragment whose start the capture lacks.
    stream.send(digest_fragment(7, 0, 1), from_client=False)
    stream.send(digest_fragment(8, 5, 1), from_client=False)
    # A response started again before its last fragment, then finished.
    stream.send(digest_fragment(9, 0, 1, bits=1, more=True), from_client=False)
    stream.send(digest_fragment(9, 0, 1, bits=1, more=True), from_client=False)
    stream.send(digest_fragment(9, 1, 1), from_client=False)
    # MORE on LIST REQUEST; an ERROR ends a DIGEST RESPONSE whose next fragment then starts a
    # response of its own (the gateway dropped the first: docs/protocol.md §6.2).
    stream.send(encode_frame(MessageType.LIST_REQUEST, 10, encode_ie(IEI.BUCKET_BITS, b"\x00")
                             + encode_ie(IEI.BUCKET_LIST, u16(0)), more=True))
    stream.send(encode_message(DigestRequest(11, 1)))
    stream.send(digest_fragment(11, 0, 1, bits=1, more=True), from_client=False)
    stream.send(encode_message(Error(11, ErrorCause.INVALID_MESSAGE)))
    stream.send(digest_fragment(11, 1, 1), from_client=False)
    # MORE on the fragment that holds the last bucket.
    stream.send(digest_fragment(12, 0, 2, bits=1, more=True), from_client=False)


SCENARIOS = {"exchange": exchange_stream, "digest_faults": digest_faults_stream}


def vector_stream(vector: dict):
    def build(stream) -> None:
        context = vector.get("context")
        to_server = True
        if context is not None:
            assert context in CONTEXTS, f"{vector['name']}: say in CONTEXTS which frames " \
                f"make the context {context!r}"
            for from_gateway, frame in CONTEXTS[context]:
                stream.send(frame, from_client=from_gateway)
            to_server = context.startswith("server")
        data = bytes.fromhex(vector["hex"])
        if context is None:
            to_server = not from_server(data)
        stream.send(data, from_client=to_server, cuts=(5, len(data) // 2))
    return build


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict[str, list[tuple[int, Node]]]:
    """stream name (a vector's or a scenario's) -> (frame number, PDU) of its stream."""
    builds = {v["name"]: vector_stream(v) for v in V1_1["valid"] + V1_1["invalid"]}
    assert not set(builds) & set(SCENARIOS)
    builds.update(SCENARIOS)
    capture = Capture()
    for port, build in enumerate(builds.values(), 44000):
        stream = capture.stream(port)
        build(stream)
        stream.close()
    pcap = capture.write(tmp_path_factory.mktemp("sync") / "sync.pcap")
    names = list(builds)
    out: dict[str, list[tuple[int, Node]]] = {name: [] for name in names}
    for packet in decode(pcap, decode_as=True):
        out[names[packet.stream]] += [(packet.number, pdu) for pdu in packet.pdus]
    return out


def field(pdus: list[Node], name: str) -> list[str]:
    return [v for pdu in pdus for v in pdu.values(f"msgin5g.{name}")]


def raw(pdus: list[Node], name: str) -> list[str]:
    return [n.value for pdu in pdus for n in pdu.all(f"msgin5g.{name}")]


def mtype(pdu: Node) -> int:
    return int(pdu.one("msgin5g.type"), 16)


def kinds(pdu: Node) -> list[str]:
    return [e.kind.removeprefix("msgin5g.expert.") for e in pdu.experts()]


def entries(pdus: list[Node], *names: str) -> list[list[str]]:
    """Per bulk entry (numbered by the dissector), the values of `names` (after msgin5g.;
    octets as plain hex)."""
    def value(entry: Node, name: str) -> str:
        [node] = entry.all(f"msgin5g.{name}")
        return node.value if name in OCTETS else node.show

    return [[value(e, n) for n in names]
            for p in pdus for e in p.all("msgin5g.ie") if e.values("msgin5g.entry")]


def digest_records(pdus: list[Node]) -> list[tuple[int, str]]:
    """(bucket number, digest as hex) of every digest, in order."""
    return [(int(d.one("msgin5g.sync.bucket")), d.value)
            for p in pdus for d in p.all("msgin5g.sync.digest")]


@pytest.mark.parametrize("vector", V1_1["valid"], ids=lambda v: v["name"])
def test_valid_vector_decodes_to_its_fields(decoded, vector):
    pdus = [p for _, p in decoded[vector["name"]]]
    want = dict(vector["decoded"])
    assert {MESSAGE_NAMES[MessageType(mtype(p))] for p in pdus} == {want.pop("message")}
    assert len(pdus) == want.pop("frames", 1)
    if "digests" in want:  # every digest, numbered from bucket 0 across the fragments
        digests = bytes.fromhex(want.pop("digests"))
        assert digest_records(pdus) == [(k, digests[16 * k:16 * k + 16].hex())
                                        for k in range(len(digests) // 16)]
        assert field(pdus, "sync.first_bucket")[0] == str(want.pop("first_bucket"))
        assert field(pdus, "sync.bucket_count") == [str(len(digests) // 16)] * len(pdus)
        assert field(pdus, "sync.last")[-1] == "1"
    if "buckets" in want:
        assert field(pdus, "sync.bucket") == [str(b) for b in want.pop("buckets")]
    if "listed" in want:
        assert entries(pdus, "ue_id", "sync.ue_hash") == want.pop("listed")
        assert [h for h in raw(pdus, "sync.ue_hash")] == [h for _, h in vector["decoded"]
                                                         ["listed"]]
        if want["count"]:
            assert field(pdus, "bulk.entries_so_far")[-1] == str(want["count"])
    if "releases" in want:
        assert entries(pdus, "ue_id", "release") == [[u, str(r)] for u, r
                                                     in want.pop("releases")]
    for key, value in want.items():
        assert key in SCALARS, f"vector field {key!r} is not checked by this test"
        assert set(field(pdus, SCALARS[key])) == {str(value)}, key
    # A valid frame raises nothing.
    assert [e for p in pdus for e in p.experts()] == []


@pytest.mark.parametrize("vector", V1_1["invalid"], ids=lambda v: v["name"])
def test_invalid_vector_raises_expert_info(decoded, vector):
    assert vector["name"] in INVALID_EXPERT, f"new invalid vector {vector['name']}: say what " \
        "the dissector must flag in INVALID_EXPERT"
    pdus = [p for _, p in decoded[vector["name"]]]
    context = len(CONTEXTS.get(vector.get("context"), []))
    assert len(pdus) > context, f"{vector['name']}: nothing decoded"
    # The frames that make the context are good ones: all the faults are the vector's.
    assert [e for p in pdus[:context] for e in p.experts()] == []
    experts = [e for p in pdus[context:] for e in p.experts()]
    kind = INVALID_EXPERT[vector["name"]]
    named = [e for e in experts if e.kind == f"msgin5g.expert.{kind}"]
    assert named, f"{vector['name']}: expected msgin5g.expert.{kind}, got {experts}"
    assert all(e.severity == "error" for e in named), named
    assert any(vector["expect_error_cause"] in e.message for e in named), named


def test_exchange_with_fragments_linked_to_requests(decoded):
    frames = decoded["exchange"]
    assert [e for _, p in frames for e in p.experts()] == []
    by_type: dict[int, list[tuple[int, Node]]] = {}
    for number, pdu in frames:
        by_type.setdefault(mtype(pdu), []).append((number, pdu))
    assert frames[1][1].one("msgin5g.sync.supported") == "1"
    for req_type, rsp_type in [(MessageType.DIGEST_REQUEST, DIGEST_RSP),
                               (MessageType.LIST_REQUEST, MessageType.LIST_RESPONSE),
                               (MessageType.UE_DEREGISTRATION_REQUEST,
                                MessageType.UE_DEREGISTRATION_RESPONSE)]:
        [(req_frame, request)] = by_type[req_type]
        responses = by_type[rsp_type]
        # Every fragment points at the request, which points at the first fragment.
        assert {r.one("msgin5g.request_in") for _, r in responses} == {str(req_frame)}
        assert request.one("msgin5g.response_in") == str(responses[0][0])
    [(_, request)] = by_type[MessageType.DIGEST_REQUEST]
    assert request.one("msgin5g.sync.bucket_bits") == str(EXCHANGE_BITS)
    digests = [p for _, p in by_type[DIGEST_RSP]]
    total = 1 << EXCHANGE_BITS
    assert len(digests) == 3  # 8 192 octets of digests at most 4 096 a frame
    assert [p.one("msgin5g.flags.more") for p in digests] == ["1", "1", "0"]
    assert [p.one("msgin5g.sync.fragment") for p in digests] == ["1", "2", "3"]
    assert [len(p.values("msgin5g.sync.bucket_bits")) for p in digests] == [1, 0, 0]
    so_far = 0
    for pdu in digests:
        first, n = int(pdu.one("msgin5g.sync.first_bucket")), int(
            pdu.one("msgin5g.sync.fragment_buckets"))
        assert first == so_far
        so_far += n
        assert pdu.one("msgin5g.sync.buckets_so_far") == str(so_far)
        assert pdu.one("msgin5g.sync.bucket_count") == str(total)
    assert so_far == total
    assert digest_records(digests) == [(k, EXCHANGE_DIGESTS[16 * k:16 * k + 16].hex())
                                       for k in range(total)]
    [(_, listing)] = by_type[MessageType.LIST_REQUEST]
    assert listing.values("msgin5g.sync.bucket") == [str(b) for b in BUCKETS]
    listed = [p for _, p in by_type[MessageType.LIST_RESPONSE]]
    assert len(listed) > 2
    assert [p.one("msgin5g.bulk.fragment") for p in listed] == [
        str(n) for n in range(1, len(listed) + 1)]
    assert entries(listed, "ue_id", "sync.ue_hash") == [
        [e.ue_service_id, e.ue_hash.hex()] for e in LISTED]
    assert field(listed, "entry") == [str(n) for n in range(1, len(LISTED) + 1)]
    assert field(listed, "bulk.announced") == [str(len(LISTED))] * len(listed)
    [(_, release)] = by_type[MessageType.UE_DEREGISTRATION_REQUEST]
    assert release.one("msgin5g.release") == "1"
    assert release.values("msgin5g.credential") == []
    # Release travels as 0xA4: the comprehension-required bit set (docs/protocol.md §6.4).
    assert release.values("msgin5g.ie.iei") == ["0x01", "0xa4"]
    assert release.values("msgin5g.ie.comprehension_required")[-1] in ("1", "True")


def test_digest_fragments_out_of_sequence(decoded):
    pdus = [p for _, p in decoded["digest_faults"]][2:]
    (overlap_1, overlap_2, late_bits, too_many, no_bits, continuation, first, again, last,
     list_more, _request, before_error, _error, after_error, more_after_last) = pdus
    assert kinds(overlap_1) == []
    assert kinds(overlap_2) == ["digest_sequence"]
    assert "an overlap" in overlap_2.experts()[0].message
    assert kinds(late_bits) == ["digest_sequence"]
    assert "fragment 3" in late_bits.experts()[0].message
    assert late_bits.one("msgin5g.sync.buckets_so_far") == "4"  # counted on from the overlap
    assert kinds(too_many) == ["digest_count"]
    assert "3 buckets so far" in too_many.experts()[0].message
    assert kinds(no_bits) == ["digest_sequence"]
    assert "without Bucket bits" in no_bits.experts()[0].message
    assert kinds(continuation) == ["bulk_continuation"]
    assert [e.severity for e in continuation.experts()] == ["note"]
    assert continuation.values("msgin5g.sync.bucket") == ["5"]
    assert kinds(first) == [] and kinds(again) == ["bulk_restarted"] and kinds(last) == []
    assert last.one("msgin5g.sync.fragment") == "2"
    assert kinds(list_more) == ["more_on_single"]
    assert "INVALID_FRAME" in list_more.experts()[0].message
    assert kinds(before_error) == []
    # After the ERROR, the next fragment with that id is no continuation of the first.
    assert kinds(after_error) == ["bulk_continuation"]
    assert kinds(more_after_last) == ["digest_count"]
    assert "MORE after the last of 2 buckets" in more_after_last.experts()[0].message
