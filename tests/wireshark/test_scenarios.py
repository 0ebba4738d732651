"""What the vectors do not show: state across frames (links, announced limits, directions, bulk
fragments), the rules beyond one IE, and frames cut anyhow by TCP.

Streams are built with wire's own encoder (and by hand where a rule must be broken), written as
plaintext TCP between 127.0.0.1 ports by tests/wireshark/pcap.py and decoded by one tshark run
with Decode As.
"""

from __future__ import annotations

import pytest

from tests.vectors import VECTORS
from tests.wireshark.pcap import Capture
from tests.wireshark.tools import Node, decode, frames_of, from_server
from wire.constants import IEI, ErrorCause, FailureCause, MessageType
from wire.messages import (
    BulkMessage,
    Error,
    Hello,
    HelloAck,
    Keepalive,
    KeepaliveAck,
    RegistrationEntry,
    RegistrationResponseEntry,
    UeRegistrationRequest,
    UeRegistrationResponse,
    encode_entry,
    encode_frame,
    encode_ie,
    encode_message,
)

CREDENTIAL = bytes(range(32))
NONCE = bytes(32)
BULK_REQ = MessageType.BULK_REGISTRATION_REQUEST
BULK_RSP = MessageType.BULK_REGISTRATION_RESPONSE


def u8(v: int) -> bytes:
    return v.to_bytes(1, "big")


def u32(v: int) -> bytes:
    return v.to_bytes(4, "big")


def uid(text: str) -> bytes:
    return encode_ie(IEI.UE_SERVICE_ID, text.encode())


def session_stream(stream) -> None:
    """HELLO / HELLO ACK (max frame 4 096, at most 2 bulk entries), then traffic with state."""
    stream.send(encode_message(Hello(1, 2, node_name="gw")))
    stream.send(encode_message(HelloAck(1, NONCE, 4096, 2, 8, 30, 1, 1)), from_client=False)
    stream.send(encode_message(Keepalive(0x8000_0001)), from_client=False)
    stream.send(encode_message(KeepaliveAck(0x8000_0001)))
    stream.send(encode_message(UeRegistrationRequest(2, "ue-a", CREDENTIAL)))
    stream.send(encode_message(Error(2, ErrorCause.INVALID_MESSAGE, diagnostic="no")),
                from_client=False)
    three = BulkMessage(BULK_REQ, 3, 3, tuple(RegistrationEntry(f"ue-{n}", CREDENTIAL)
                                              for n in range(3)))
    stream.send(encode_message(three))
    # A request type coming from the server's side.
    stream.send(encode_message(UeRegistrationRequest(4, "ue-b", CREDENTIAL)), from_client=False)
    # A body over the 4 096 the server announced (an unknown optional IE pads it).
    big = uid("ue-c") + encode_ie(0x7E, bytes(5000))
    stream.send(encode_frame(MessageType.UE_REGISTRATION_REQUEST, 5, big), cuts=(1000, 3000))
    # TRANSACTION_ID_IN_USE rejects the message that reused the id, not the transaction: the
    # response that follows still answers the request.
    stream.send(encode_message(UeRegistrationRequest(6, "ue-d", CREDENTIAL)))
    stream.send(encode_message(Error(6, ErrorCause.TRANSACTION_ID_IN_USE)), from_client=False)
    stream.send(encode_message(UeRegistrationResponse(6, "ue-d", 0)), from_client=False)


def bulk_response_stream(stream) -> None:
    """A bulk response: an INVALID_ENTRY answer with an empty UE Service ID (legal), a failure
    without its cause (not), then a single response with an empty UE Service ID (not)."""
    entries = [
        RegistrationResponseEntry("", 1, FailureCause.INVALID_ENTRY),
        encode_ie(IEI.REGISTRATION_RESPONSE_ENTRY, uid("ue-x") + encode_ie(
            IEI.REGISTRATION_RESULT, u8(1))),
    ]
    body = (encode_ie(IEI.BULK_REGISTRATION_RESPONSE_INDICATOR, u8(1))
            + encode_ie(IEI.NUMBER_OF_INDIVIDUAL_ENTRIES, u32(2)))
    body += encode_entry(entries[0]) + entries[1]
    stream.send(encode_frame(BULK_RSP, 7, body), from_client=False)
    single = uid("") + encode_ie(IEI.REGISTRATION_RESULT, u8(1)) + encode_ie(
        IEI.FAILURE_CAUSE, u8(FailureCause.INVALID_ENTRY))
    stream.send(encode_frame(MessageType.UE_REGISTRATION_RESPONSE, 8, single), from_client=False)


def misplaced_stream(stream) -> None:
    # A profile sub-IE at message level; a Gateway type outside its table; an empty Node name.
    stream.send(encode_frame(MessageType.UE_REGISTRATION_REQUEST, 9,
                             uid("ue-y") + encode_ie(IEI.UE_TYPE, u8(1))))
    stream.send(encode_frame(MessageType.HELLO, 10, encode_ie(IEI.PROTOCOL_VERSION, u8(1))
                             + encode_ie(IEI.GATEWAY_TYPE, u8(3))
                             + encode_ie(IEI.NODE_NAME, b"")))
    # A bulk whose second fragment repeats the indicator.
    entry = encode_ie(IEI.REGISTRATION_ENTRY, uid("ue-z"))
    first = (encode_ie(IEI.BULK_REGISTRATION_INDICATOR, u8(1))
             + encode_ie(IEI.NUMBER_OF_INDIVIDUAL_ENTRIES, u32(2)) + entry)
    stream.send(encode_frame(BULK_REQ, 11, first, more=True))
    stream.send(encode_frame(BULK_REQ, 11, entry + encode_ie(
        IEI.BULK_REGISTRATION_INDICATOR, u8(1))))


def continuation_stream(stream) -> None:
    # The capture starts in the middle of a bulk: a fragment of entries only. Then a bulk
    # whose first fragment (MORE) is followed by another first fragment with its id.
    entry = encode_ie(IEI.REGISTRATION_ENTRY, uid("ue-w"))
    stream.send(encode_frame(BULK_REQ, 12, entry + entry))
    first = (encode_ie(IEI.BULK_REGISTRATION_INDICATOR, u8(1))
             + encode_ie(IEI.NUMBER_OF_INDIVIDUAL_ENTRIES, u32(1)) + entry)
    stream.send(encode_frame(BULK_REQ, 13, first, more=True))
    stream.send(encode_frame(BULK_REQ, 13, first))


def oversized_stream(stream) -> None:
    # A body length past 16 777 215: the header is shown, the rest is not decoded.
    stream.send(bytes.fromhex("01100000000000050100000001000475652d71") + bytes(64))


def all_vectors(cut_every: int):
    """Every valid vector's frames, each direction in one stream, cut every `cut_every` octets
    (so frames start and end anywhere in segments, several per segment)."""
    def build(stream) -> None:
        for server in (False, True):
            data = b"".join(frames_of(v) for v in VECTORS["valid"]
                            if from_server(frames_of(v)) == server)
            stream.send(data, from_client=not server, cuts=range(cut_every, len(data), cut_every))
    return build


STREAMS = {
    "session": session_stream,
    "bulk_response": bulk_response_stream,
    "misplaced": misplaced_stream,
    "continuation": continuation_stream,
    "oversized": oversized_stream,
    "three_octet_segments": all_vectors(3),
    "big_segments": all_vectors(1000),
}


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict[str, list[tuple[int, Node]]]:
    """stream name -> (frame number, PDU) in order."""
    capture = Capture()
    for port, build in enumerate(STREAMS.values(), 41000):
        stream = capture.stream(port)
        build(stream)
        stream.close()
    pcap = capture.write(tmp_path_factory.mktemp("scenarios") / "scenarios.pcap")
    out: dict[str, list[tuple[int, Node]]] = {name: [] for name in STREAMS}
    names = list(STREAMS)
    for packet in decode(pcap, decode_as=True):
        stream = int(next(n.show for layer in packet.layers for n in layer.walk()
                          if n.name == "tcp.stream"))
        out[names[stream]] += [(packet.number, pdu) for pdu in packet.pdus]
    return out


def kinds(pdu: Node) -> list[str]:
    return [e.kind.removeprefix("msgin5g.expert.") for e in pdu.experts()]


def mtype(pdu: Node) -> int:
    return int(pdu.one("msgin5g.type"), 16)


def test_links_limits_and_directions(streams):
    frames = [n for n, _ in streams["session"]]
    pdus = [p for _, p in streams["session"]]
    hello, ack, keepalive, keepalive_ack, request, error, bulk, backwards, big, *in_use = pdus
    assert [mtype(p) for p in pdus[:6]] == [
        MessageType.HELLO, MessageType.HELLO_ACK, MessageType.KEEPALIVE,
        MessageType.KEEPALIVE_ACK, MessageType.UE_REGISTRATION_REQUEST, MessageType.ERROR]
    assert [p.one("msgin5g.sender") for p in (hello, ack)] == ["gateway", "server"]
    # Answers point at their requests and back, by transaction id: HELLO, the server's
    # KEEPALIVE (answered by the gateway), and an ERROR that ends a transaction.
    for req, req_frame, rsp, rsp_frame in [(hello, frames[0], ack, frames[1]),
                                           (keepalive, frames[2], keepalive_ack, frames[3]),
                                           (request, frames[4], error, frames[5])]:
        assert rsp.one("msgin5g.request_in") == str(req_frame)
        assert req.one("msgin5g.response_in") == str(rsp_frame)
        assert rsp.values("msgin5g.time")
    assert kinds(error) == ["error"]  # an ERROR is noted with its cause
    assert "INVALID_MESSAGE" in error.experts()[0].message
    # The bulk announces 3 entries to a server that accepts 2 (its HELLO ACK).
    assert "too_many_entries" in kinds(bulk)
    assert any("TOO_MANY_ENTRIES" in e.message for e in bulk.experts())
    # A request type sent by the server's side.
    assert backwards.one("msgin5g.sender") == "server"
    assert "wrong_direction" in kinds(backwards)
    # A body of 5 010 octets to a server that announced 4 096, reassembled from 3 segments.
    assert big.one("msgin5g.length") == "5010"
    assert "frame_too_large" in kinds(big)
    assert any("FRAME_TOO_LARGE" in e.message and "4096" in e.message for e in big.experts())
    # The response after ERROR(TRANSACTION_ID_IN_USE) still answers its request.
    again, in_use_error, response = in_use
    assert in_use_error.one("msgin5g.request_in") == str(frames[9])
    assert response.one("msgin5g.request_in") == str(frames[9])
    assert again.one("msgin5g.response_in") == str(frames[10])


def test_response_entry_conditions(streams):
    (_, bulk), (_, single) = streams["bulk_response"]
    entries = [e for e in bulk.all("msgin5g.ie") if e.values("msgin5g.entry")]
    invalid_entry, no_cause = entries
    assert invalid_entry.one("msgin5g.ue_id") == ""
    assert invalid_entry.one("msgin5g.cause") == str(int(FailureCause.INVALID_ENTRY))
    assert "empty_ue_id" not in kinds(invalid_entry)  # legal in a response entry
    assert "failure_cause" in kinds(no_cause)
    assert any("INVALID_ENTRY" in e.message for e in no_cause.experts()
               if e.kind.endswith("failure_cause"))  # a defect inside an entry
    assert "empty_ue_id" in kinds(single)  # never legal in a single response


def test_misplaced_ies_and_values(streams):
    (_, request), (_, hello), (_, first), (_, second) = streams["misplaced"]
    assert "unexpected_ie" in kinds(request)
    assert "bad_value" in kinds(hello) and "text_length" in kinds(hello)
    assert kinds(first) == []
    assert "bulk_header" in kinds(second)
    assert second.one("msgin5g.bulk.fragment") == "2"
    assert second.values("msgin5g.entry") == ["2"]


def test_bulk_fragment_without_its_start(streams):
    (_, fragment), (_, first), (_, again) = streams["continuation"]
    assert kinds(fragment) == ["bulk_continuation"]
    assert fragment.values("msgin5g.entry") == ["1", "2"]
    assert fragment.values("msgin5g.bulk.announced") == []
    assert kinds(first) == []
    assert kinds(again) == ["bulk_restarted"]
    assert again.one("msgin5g.bulk.fragment") == "1" and again.values("msgin5g.entry") == ["1"]


def test_body_length_past_the_limit(streams):
    [(_, frame)] = streams["oversized"]
    assert "frame_too_large" in kinds(frame)
    assert any("16777215" in e.message for e in frame.experts())


@pytest.mark.parametrize("name", ["three_octet_segments", "big_segments"])
def test_frames_cut_anywhere(streams, name):
    """Every valid vector's frames, reassembled from 3-octet segments or packed many to a
    segment, decode as the same messages in the same order."""
    frames = [f for v in VECTORS["valid"] for f in _split(frames_of(v))]
    expected = ([f for f in frames if not from_server(f)] + [f for f in frames if from_server(f)])
    pdus = [p for _, p in streams[name]]
    assert [(mtype(p), int(p.one("msgin5g.tid")), int(p.one("msgin5g.length"))) for p in pdus] \
        == [(f[1], int.from_bytes(f[4:8], "big"), len(f) - 12) for f in expected]
    # Same fields as when each vector came alone: the UE Service IDs, in order.
    assert [u for p in pdus for u in p.values("msgin5g.ue_id")] == [
        u for f in expected for u in _ue_ids(f)]


def _split(data: bytes) -> list[bytes]:
    out = []
    while data:
        size = 12 + int.from_bytes(data[8:12], "big")
        out.append(data[:size])
        data = data[size:]
    return out


def _ue_ids(frame: bytes) -> list[str]:
    """UE Service IDs in a frame, at any depth of grouping (a test-side IE walk)."""
    found = []

    def walk(body: bytes) -> None:
        while len(body) >= 3:
            iei, length = body[0], int.from_bytes(body[1:3], "big")
            value = body[3:3 + length]
            if iei == IEI.UE_SERVICE_ID:
                found.append(value.decode())
            elif iei in (IEI.REGISTRATION_ENTRY, IEI.REGISTRATION_RESPONSE_ENTRY,
                         IEI.DEREGISTRATION_ENTRY, IEI.DEREGISTRATION_RESPONSE_ENTRY):
                walk(value)
            body = body[3 + length:]

    walk(frame[12:])
    return found
