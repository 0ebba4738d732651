"""The dissector on every vector of ../shared/spec/vectors/v1.json, read by the real tshark.

Each vector travels in a plaintext TCP stream of its own between 127.0.0.1 ports, written to a
pcap by tests/wireshark/pcap.py (no traffic is sent) and decoded with Decode As
(`-d tcp.port==7554,msgin5g`). Every vector is cut into three TCP segments, the first ending
inside the 12-octet header and the second inside the body, so each one also exercises the
dissector's desegmentation. Valid vectors must decode to their "decoded" fields with no
warning; each invalid one whose fault shows in its bytes must raise the expert info naming it
(and its wire-v1 error cause); none may raise a Lua error or a malformed-packet mark.
"""

from __future__ import annotations

import pytest

from tests.vectors import VECTORS
from tests.wireshark.pcap import Capture
from tests.wireshark.tools import Node, decode, frames_of, from_server

# What each invalid vector's bytes show, as the expert info that must name it. None: the fault
# is one of session state (the spec's "before HELLO"), which one stream cannot show.
INVALID_EXPERT = {
    "bad_version": "unsupported_version",
    "reserved_flag": "reserved_flags",
    "unknown_type": "unknown_message_type",
    "missing_mandatory": "missing_ie",
    "duplicate_ie": "duplicate_ie",
    "wrong_order": "ie_order",
    "bad_length": "ie_length",
    "truncated_ie": "truncated_ie",
    "unknown_mandatory_ie": "unknown_mandatory_ie",
    "empty_ue_id": "empty_ue_id",
    "control_char_ue_id": "control_char",
    "bad_utf8_ue_id": "not_utf8",
    "before_hello": None,
    "more_on_single": "more_on_single",
    "server_tid_from_gateway": "bad_tid",
    "zero_tid": "bad_tid",
    "count_mismatch": "count_mismatch",
}
# "decoded" keys of the vectors -> display-filter field (after "msgin5g.").
SCALARS = {
    "transaction_id": "tid", "protocol_version": "protocol_version",
    "gateway_type": "gateway_type", "node_name": "node_name", "max_frame_size": "max_frame_size",
    "max_bulk_entries": "max_bulk_entries", "max_outstanding": "max_outstanding",
    "keepalive_interval": "keepalive_interval", "bulk_allowed": "bulk_allowed",
    "ue_authentication_required": "ue_authentication_required", "ue_service_id": "ue_id",
    "failure_cause": "cause", "error_cause": "error_cause", "diagnostic": "diagnostic",
    "count": "count",
}
BYTES = {"server_nonce": "server_nonce", "credential": "credential"}
PROFILE = {"ue_type": "ue_type", "triggering_ue_identifier": "triggering_ue_id",
           "triggering_port": "triggering_port", "triggering_protocol": "triggering_protocol",
           "maximum_segment_size": "max_segment_size"}


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> dict[str, list[Node]]:
    """vector name -> the msgin5g PDUs of its stream, all vectors decoded by one tshark run."""
    capture = Capture()
    names = []
    for port, vector in enumerate(VECTORS["valid"] + VECTORS["invalid"], 40000):
        data = frames_of(vector)
        stream = capture.stream(port)
        stream.send(data, from_client=not from_server(data), cuts=(5, len(data) // 2))
        stream.close()
        names.append(vector["name"])
    pcap = capture.write(tmp_path_factory.mktemp("vectors") / "vectors.pcap")
    by_stream: dict[int, list[Node]] = {n: [] for n in range(len(names))}
    for packet in decode(pcap, decode_as=True):
        stream = int(next(n.show for layer in packet.layers for n in layer.walk()
                          if n.name == "tcp.stream"))
        by_stream[stream] += packet.pdus
    return {name: by_stream[n] for n, name in enumerate(names)}


def field(pdus: list[Node], name: str) -> list[str]:
    return [v for pdu in pdus for v in pdu.values(f"msgin5g.{name}")]


def hex_field(pdus: list[Node], name: str) -> list[str]:
    return [n.value for pdu in pdus for n in pdu.all(f"msgin5g.{name}")]


def message_name(pdu: Node) -> str:
    return next(n.showname for n in pdu.walk() if n.name == "msgin5g.type").split(": ", 1)[1] \
        .rsplit(" (", 1)[0]


@pytest.mark.parametrize("vector", VECTORS["valid"], ids=lambda v: v["name"])
def test_valid_vector_decodes_to_its_fields(decoded, vector):
    pdus = decoded[vector["name"]]
    want = dict(vector["decoded"])
    assert pdus, f"{vector['name']}: nothing decoded"
    if vector["name"] == "credential_register":
        assert hex_field(pdus, "credential") == [want["proof"]]
        assert field(pdus, "ue_id") == [want["ue_service_id"]]
        return
    assert {message_name(p) for p in pdus} == {want.pop("message")}
    assert len(pdus) == want.pop("frames", 1)
    if "results" in want:  # bulk response: (UE, result, cause) per entry, in order
        entries = [e for p in pdus for e in p.all("msgin5g.ie") if e.values("msgin5g.entry")]
        got = [[e.one("msgin5g.ue_id"), int(e.one("msgin5g.registration_result")),
                int(e.values("msgin5g.cause")[0]) if e.values("msgin5g.cause") else None]
               for e in entries]
        results = want.pop("results")
        assert got == results
        assert sum(map(int, field(pdus, "bulk.fragment_failures"))) == sum(
            1 for _, result, _ in results if result == 1)
    if "ue_service_ids" in want:  # bulk request: the entries' UE Service IDs, in order
        assert field(pdus, "ue_id") == want.pop("ue_service_ids")
        assert field(pdus, "bulk.entries_so_far")[-1] == str(want["count"])
    if "result" in want:
        result = want.pop("result")
        kind = "deregistration" if "DE-REGISTRATION" in message_name(pdus[0]) else "registration"
        assert field(pdus, f"{kind}_result") == [str(result)]
    profile = want.pop("profile", None)
    if profile is not None:
        period, window = profile.pop("communication_availability")
        assert field(pdus, "availability.period") == [str(period)]
        assert field(pdus, "availability.window") == [str(window)]
        for key, value in profile.items():
            assert field(pdus, PROFILE[key]) == [str(value)], key
    for key, value in want.items():
        if key in BYTES:
            assert hex_field(pdus, BYTES[key]) == [value], key
        else:
            assert key in SCALARS, f"vector field {key!r} is not checked by this test"
            assert set(field(pdus, SCALARS[key])) == {str(value)}, key
    # A valid frame raises nothing above a note (failures and skipped optional IEs are notes).
    loud = [e for p in pdus for e in p.experts() if e.severity not in ("note", "chat")]
    assert not loud, loud


def test_unknown_optional_ie_is_noted_and_skipped(decoded):
    [pdu] = decoded["unknown_optional_ie_skipped"]
    assert [e.kind for e in pdu.experts()] == ["msgin5g.expert.unknown_optional_ie"]


@pytest.mark.parametrize("vector", VECTORS["invalid"], ids=lambda v: v["name"])
def test_invalid_vector_raises_expert_info(decoded, vector):
    assert vector["name"] in INVALID_EXPERT, f"new invalid vector {vector['name']}: say what " \
        "the dissector must flag in INVALID_EXPERT"
    pdus = decoded[vector["name"]]
    assert pdus, f"{vector['name']}: nothing decoded"
    experts = [e for p in pdus for e in p.experts()]
    kind = INVALID_EXPERT[vector["name"]]
    if kind is None:
        assert all(e.severity in ("note", "chat") for e in experts), experts
        return
    named = [e for e in experts if e.kind == f"msgin5g.expert.{kind}"]
    assert named, f"{vector['name']}: expected msgin5g.expert.{kind}, got {experts}"
    # An error, or a warning for a message type a later version may define.
    assert all(e.severity in ("error", "warn") for e in named), named
    assert any(vector["expect_error_cause"] in e.message for e in named), named
