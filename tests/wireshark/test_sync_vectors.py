"""The dissector on msgd's wire v1.1 vectors (tests/wire/vectors_v1_1.json), read by the real
tshark as tests/wireshark/test_vectors.py reads the spec's: every valid one decodes to its
message, in its number of frames (MORE on DIGEST RESPONSE and LIST RESPONSE is allowed, and
LIST RESPONSE has no indicator), with nothing above a note."""

from __future__ import annotations

import pytest

from tests.vectors import V1_1
from tests.wireshark.pcap import Capture
from tests.wireshark.test_vectors import field, message_name
from tests.wireshark.tools import Node, decode, frames_of, from_server


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict[str, list[Node]]:
    capture = Capture()
    names = []
    for port, vector in enumerate(V1_1["valid"], 41000):
        data = frames_of(vector)
        stream = capture.stream(port)
        stream.send(data, from_client=not from_server(data), cuts=(5, len(data) // 2))
        stream.close()
        names.append(vector["name"])
    pcap = capture.write(tmp_path_factory.mktemp("sync") / "sync.pcap")
    by_stream: dict[int, list[Node]] = {n: [] for n in range(len(names))}
    for packet in decode(pcap, decode_as=True):
        stream = int(next(n.show for layer in packet.layers for n in layer.walk()
                          if n.name == "tcp.stream"))
        by_stream[stream] += packet.pdus
    return {name: by_stream[n] for n, name in enumerate(names)}


@pytest.mark.parametrize("vector", V1_1["valid"], ids=lambda v: v["name"])
def test_sync_vector_decodes_quietly(decoded, vector):
    pdus = decoded[vector["name"]]
    want = vector["decoded"]
    assert {message_name(p) for p in pdus} == {want["message"]}
    assert len(pdus) == want.get("frames", 1)
    assert set(field(pdus, "tid")) == {str(want["transaction_id"])}
    if "bucket_bits" in want:
        assert field(pdus, "bucket_bits")[:1] == [str(want["bucket_bits"])]
    loud = [e for p in pdus for e in p.experts() if e.severity not in ("note", "chat")]
    assert not loud, loud
