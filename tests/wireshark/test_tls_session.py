"""The dissector on a real session: msgd (a child process) and the gateway client over TLS 1.3
on 127.0.0.1, captured on loopback by dumpcap and decrypted by tshark with the client's key log.

The client writes its TLS secrets because SSLKEYLOGFILE names a file in this test's tmp
directory; nothing is recorded in plaintext, so a decoded frame is proof that tshark decrypted
it and the dissector read it.
"""

from __future__ import annotations

import secrets

import pytest

from msgd.gateway import GatewayClient, GatewayUe
from tests.harness import ChildServer, RawGateway, make_deployment
from tests.wireshark.tools import LoopbackCapture, Node, Packet, decode, tshark
from wire.constants import (
    MESSAGE_NAMES,
    ErrorCause,
    FailureCause,
    GatewayType,
    MessageType,
    Operation,
)
from wire.credential import compute_proof
from wire.messages import Profile, UeRegistrationRequest, encode_message

GW = "gw1.example"
# Enough bulk entries that the request crosses TLS records (16 KiB) and, with the server's
# Maximum frame size of 4 096, several fragments both ways.
UES = [f"ue-{i:04d}@{GW}" for i in range(1, 303)]
UNKNOWN = f"nobody@{GW}"


@pytest.fixture(scope="module")
def session(tmp_path_factory, pki):
    """Run the session once; the tests below read its capture."""
    import asyncio

    tmp = tmp_path_factory.mktemp("tls")
    dep = make_deployment(tmp / "d", pki, ues={u: [GW] for u in UES},
                          limits={"max_frame_size": 4096})
    server = ChildServer(dep)
    port = server.start()
    keylog = tmp / "keys.log"
    try:
        with LoopbackCapture(port) as capture, pytest.MonkeyPatch.context() as env:
            # The client's context factory honours SSLKEYLOGFILE (as msgctl does).
            env.setenv("SSLKEYLOGFILE", str(keylog))
            sent = asyncio.run(_gateway_session(dep, server.address))
            capture.probe(b"end")
        pcap = capture.write(tmp / "session.pcap")
    finally:
        server.terminate()
    return {"pcap": pcap, "keylog": keylog, "sent": sent, "port": port,
            "packets": decode(pcap, keylog=keylog)}


async def _gateway_session(dep, address) -> dict:
    ctx = dep.client_ctx(GW)
    gw = await GatewayClient.connect(address[0], address[1], ssl_context=ctx,
                                     server_hostname="localhost", node_name="gw1-wireshark",
                                     max_frame_size=4096)
    try:
        single = await gw.register(dep.ue(UES[0]))
        wrong_key = await gw.register(dep.ue(UES[1], key=secrets.token_bytes(32)))
        bulk_ues = [GatewayUe(u, dep.keys[u], profile(n)) for n, u in enumerate(UES[2:])]
        bulk_ues.append(GatewayUe(UNKNOWN, secrets.token_bytes(32)))
        bulk = [r async for r in gw.bulk_register(bulk_ues)]
    finally:
        await gw.close()
    # A second connection writes one frame in three pieces, each its own TLS record (one
    # SSLObject.write per transport write), cut inside the header and inside the body.
    raw = await RawGateway.open(dep, address)
    try:
        await raw.hello()
        proof = compute_proof(dep.keys[UES[0]], raw.nonce, Operation.REGISTRATION, UES[0])
        frame = encode_message(UeRegistrationRequest(2, UES[0], proof))
        for piece in (frame[:5], frame[5:30], frame[30:]):
            await raw.send(piece)
        split_answer = await raw.read_message()
    finally:
        raw.close()
    return {"single": single, "wrong_key": wrong_key, "bulk_ues": [u.ue_service_id for u in
            bulk_ues], "bulk": bulk, "split_answer": split_answer}


def test_key_log_only_when_asked(tmp_path, pki, monkeypatch):
    from msgd.tls.contexts import client_context

    monkeypatch.delenv("SSLKEYLOGFILE", raising=False)
    assert client_context(None, None, pki.ca).keylog_filename is None
    monkeypatch.setenv("SSLKEYLOGFILE", str(tmp_path / "keys.log"))
    assert client_context(None, None, pki.ca).keylog_filename == str(tmp_path / "keys.log")


def profile(n: int) -> Profile:
    """A profile per bulk UE: with it an entry takes ~150 octets, so the client's writes of 256
    entries cross TLS records (16 KiB) in the middle of frames."""
    return Profile(ue_type=2, triggering_ue_identifier=f"+1555{n:07d}", triggering_port=2000,
                   triggering_protocol=1, communication_availability=(3600, 60),
                   application_data=bytes(range(48)))


def pdus(packets: list[Packet], stream: int = 0) -> list[tuple[int, Node]]:
    """(frame number, PDU) of every msgin5g PDU of one TCP connection, in capture order
    (0: the gateway client's; 1: the raw connection that splits a frame into records)."""
    return [(p.number, pdu) for p in packets if p.stream == stream for pdu in p.pdus]


def of_type(session, mtype: MessageType) -> list[tuple[int, Node]]:
    return [(n, pdu) for n, pdu in pdus(session["packets"])
            if int(pdu.one("msgin5g.type"), 16) == mtype]


def test_hello_and_hello_ack(session):
    [(hello_frame, hello)] = of_type(session, MessageType.HELLO)
    assert hello.one("msgin5g.sender") == "gateway"
    assert hello.one("msgin5g.protocol_version") == "1"
    assert hello.one("msgin5g.gateway_type") == str(int(GatewayType.NON_3GPP))
    assert hello.one("msgin5g.node_name") == "gw1-wireshark"
    assert hello.one("msgin5g.max_frame_size") == "4096"
    [(ack_frame, ack)] = of_type(session, MessageType.HELLO_ACK)
    assert ack.one("msgin5g.sender") == "server"
    assert ack.one("msgin5g.tid") == hello.one("msgin5g.tid")
    assert ack.one("msgin5g.max_frame_size") == "4096"  # the server's [limits]
    assert ack.one("msgin5g.node_name") == "msgd-test"
    assert len(ack.one("msgin5g.server_nonce").replace(":", "")) == 64
    assert ack.one("msgin5g.bulk_allowed") == "1"
    # Linked both ways by transaction id.
    assert ack.one("msgin5g.request_in") == str(hello_frame)
    assert hello.one("msgin5g.response_in") == str(ack_frame)


def test_single_registration_and_failure_with_cause(session):
    sent = session["sent"]
    requests = of_type(session, MessageType.UE_REGISTRATION_REQUEST)
    responses = of_type(session, MessageType.UE_REGISTRATION_RESPONSE)
    assert [r.one("msgin5g.ue_id") for _, r in requests] == [UES[0], UES[1]]
    assert [r.one("msgin5g.ue_id") for _, r in responses] == [UES[0], UES[1]]
    for (req_frame, req), (rsp_frame, rsp) in zip(requests, responses, strict=True):
        assert len(req.one("msgin5g.credential").replace(":", "")) == 64
        assert rsp.one("msgin5g.tid") == req.one("msgin5g.tid")
        assert rsp.one("msgin5g.request_in") == str(req_frame)
        assert req.one("msgin5g.response_in") == str(rsp_frame)
    ok, failed = responses[0][1], responses[1][1]
    assert sent["single"].ok and ok.one("msgin5g.registration_result") == "0"
    assert ok.values("msgin5g.cause") == []
    assert sent["wrong_key"].cause is FailureCause.AUTHENTICATION_FAILED
    assert failed.one("msgin5g.registration_result") == "1"
    assert failed.one("msgin5g.cause") == str(int(FailureCause.AUTHENTICATION_FAILED))
    assert "AUTHENTICATION_FAILED" in next(
        n.showname for n in failed.walk() if n.name == "msgin5g.cause")


def _fragments(session, mtype: MessageType, count: int) -> list[tuple[int, Node]]:
    frags = of_type(session, mtype)
    assert len(frags) >= 2, f"{mtype.name} in {len(frags)} fragment(s)"
    assert {f.one("msgin5g.tid") for _, f in frags} == {frags[0][1].one("msgin5g.tid")}
    # MORE on every fragment but the last; the indicator and Number only in the first.
    assert [f.one("msgin5g.flags.more") for _, f in frags] == ["1"] * (len(frags) - 1) + ["0"]
    assert [len(f.values("msgin5g.count")) for _, f in frags] == [1] + [0] * (len(frags) - 1)
    assert frags[0][1].one("msgin5g.count") == str(count)
    # Per-fragment entry counts add up, numbered on from fragment to fragment.
    first = 1
    for number, (_, f) in enumerate(frags, 1):
        entries = int(f.one("msgin5g.bulk.fragment_entries"))
        assert f.one("msgin5g.bulk.fragment") == str(number)
        assert len(f.all("msgin5g.entry")) == entries
        assert f.values("msgin5g.entry") == [str(i) for i in range(first, first + entries)]
        assert f.one("msgin5g.bulk.announced") == str(count)
        first += entries
    assert first - 1 == count
    return frags


def test_bulk_registration_in_fragments(session):
    sent = session["sent"]
    uids = sent["bulk_ues"]
    requests = _fragments(session, MessageType.BULK_REGISTRATION_REQUEST, len(uids))
    responses = _fragments(session, MessageType.BULK_REGISTRATION_RESPONSE, len(uids))
    assert [u for _, f in requests for u in f.values("msgin5g.ue_id")] == uids
    assert sum(len(f.values("msgin5g.credential")) for _, f in requests) == len(uids)
    assert [t for _, f in requests for t in f.values("msgin5g.triggering_ue_id")] == [
        profile(n).triggering_ue_identifier for n in range(len(uids) - 1)]
    # Response entries in request order, each with the result and cause the client got.
    decoded = []
    for _, f in responses:
        for entry in f.all("msgin5g.ie"):
            if entry.values("msgin5g.entry"):
                cause = entry.values("msgin5g.cause")
                decoded.append((entry.one("msgin5g.ue_id"),
                                entry.one("msgin5g.registration_result") == "0",
                                int(cause[0]) if cause else None))
    assert decoded == [(r.ue_service_id, r.ok, r.cause) for r in sent["bulk"]]
    assert decoded[-1] == (UNKNOWN, False, FailureCause.UE_NOT_PROVISIONED)
    assert [f.one("msgin5g.bulk.fragment_failures") for _, f in responses][-1] == "1"
    assert sum(int(f.one("msgin5g.bulk.fragment_failures")) for _, f in responses) == 1
    assert requests[0][1].values("msgin5g.bulk.fragment_failures") == []
    # Every response fragment points at the request (its first fragment), which points back.
    first_request = requests[0][0]
    assert {f.one("msgin5g.request_in") for _, f in responses} == {str(first_request)}
    assert requests[0][1].one("msgin5g.response_in") == str(responses[0][0])


def test_frame_across_tls_records(session):
    """A frame written in three TLS records is reassembled and decoded whole."""
    assert session["sent"]["split_answer"].result == 0
    split = [(p, pdu) for p in session["packets"] if p.stream == 1 for pdu in p.pdus
             if int(pdu.one("msgin5g.type"), 16) == MessageType.UE_REGISTRATION_REQUEST]
    [(packet, request)] = split
    assert request.one("msgin5g.ue_id") == UES[0]
    assert len(request.one("msgin5g.credential").replace(":", "")) == 64
    assert request.experts() == []
    reassembled = [n for layer in packet.layers for n in layer.walk() if n.name == "tls.segments"]
    assert reassembled and reassembled[0].showname.startswith("3 Reassembled TLS segments")
    [(_, response)] = [(n, p) for n, p in pdus(session["packets"], 1)
                       if int(p.one("msgin5g.type"), 16) == MessageType.UE_REGISTRATION_RESPONSE]
    assert response.one("msgin5g.request_in") == str(packet.number)


def test_goodbye(session):
    [(_, goodbye)] = of_type(session, MessageType.GOODBYE)
    assert goodbye.one("msgin5g.sender") == "gateway"
    assert goodbye.one("msgin5g.tid") == "0"
    assert goodbye.one("msgin5g.error_cause") == str(int(ErrorCause.NORMAL))


def test_no_warnings_on_a_good_session(session):
    found = [(n, e) for p in session["packets"] for n, pdu in [(p.number, x) for x in p.pdus]
             for e in pdu.experts()]
    assert found, "the failures should be noted"
    assert {e.kind for _, e in found} == {"msgin5g.expert.failure"}
    assert {e.severity for _, e in found} == {"note"}
    assert len(found) == 2  # AUTHENTICATION_FAILED (single), UE_NOT_PROVISIONED (bulk)


@pytest.mark.parametrize(("expr", "types"), [
    (f'msgin5g.ue_id == "{UES[0]}"', {"UE REGISTRATION REQUEST", "UE REGISTRATION RESPONSE"}),
    ("msgin5g.cause == 2", {"UE REGISTRATION RESPONSE"}),
    (f'msgin5g.ue_id == "{UNKNOWN}" && msgin5g.cause == 1', {"BULK REGISTRATION RESPONSE"}),
    ('msgin5g.node_name == "gw1-wireshark"', {"HELLO"}),
    ("msgin5g.error_cause == 0", {"GOODBYE"}),
    ("msgin5g.bulk.last == 1", {"BULK REGISTRATION REQUEST", "BULK REGISTRATION RESPONSE"}),
])
def test_display_filters(session, expr, types):
    """The field names work in display filters (the packets they select, by message type)."""
    out = tshark(session["pcap"], "-Y", expr, "-T", "fields", "-e", "msgin5g.type",
                 keylog=session["keylog"])
    found = {MESSAGE_NAMES[MessageType(int(t, 16))] for t in out.replace(",", " ").split()}
    assert found == types
