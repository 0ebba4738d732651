"""The dissector on a real registry sync (wire v1.1, docs/protocol.md §6) over TLS: msgd (a
child process) and the gateway client's sync (msgd.gateway.sync.compare) on 127.0.0.1,
captured on loopback by dumpcap and decrypted by tshark with the client's key log, as
test_tls_session.py does for v1.

The gateway registers 120 UEs, then syncs against a set that differs from them: 2 UEs
missing, 2 extra, 1 with another profile. With 1 bucket (b = 0) the LIST of that bucket names
all 120 UEs, more than one 4 096-octet frame holds; the repair registers 3 UEs and releases 2
(Release, no credential). A second sync with 4 096 buckets (b = 12) then finds no difference,
its 64 KiB of digests in 17 fragments. What the client sent and got is recorded beside it (a
thin wrapper around the client's sync requests) and compared with what tshark decoded.
"""

from __future__ import annotations

import re

import pytest

from msgd.gateway import GatewayClient, GatewayUe
from msgd.gateway.sync import compare
from tests.harness import ChildServer, make_deployment
from tests.wireshark.tools import LoopbackCapture, Node, decode, tshark
from wire.constants import DIGEST_SIZE, MESSAGE_NAMES, MessageType
from wire.messages import Profile

GW = "gw1.example"
UES = [f"ue-{i:04d}@{GW}" for i in range(1, 123)]
REGISTERED, MISSING, EXTRA = UES[:120], UES[120:], UES[118:120]
CHANGED = UES[3]  # held without a profile, the gateway's set has one


class Recording:
    """The client's sync requests and their answers, as the client saw them (the SyncClient
    port of msgd.gateway.sync, delegating to the real GatewayClient)."""

    def __init__(self, gw: GatewayClient) -> None:
        self.gw = gw
        self.exchanges: list[tuple[object, object]] = []
        self.released: list[tuple[str, object]] = []

    async def sync_request(self, make):
        sent = []

        def recorded(tid: int):
            sent.append(make(tid))
            return sent[-1]

        answer = await self.gw.sync_request(recorded)
        self.exchanges.append((sent[0], answer))
        return answer

    async def release(self, ue_service_id: str):
        result = await self.gw.release(ue_service_id)
        self.released.append((ue_service_id, result))
        return result

    async def register(self, ue: GatewayUe):
        return await self.gw.register(ue)


@pytest.fixture(scope="module")
def session(tmp_path_factory, pki):
    import asyncio

    tmp = tmp_path_factory.mktemp("tls_sync")
    dep = make_deployment(tmp / "d", pki, ues={u: [GW] for u in UES},
                          limits={"max_frame_size": 4096})
    server = ChildServer(dep)
    port = server.start()
    keylog = tmp / "keys.log"
    try:
        with LoopbackCapture(port) as capture, pytest.MonkeyPatch.context() as env:
            env.setenv("SSLKEYLOGFILE", str(keylog))
            sent = asyncio.run(_sync_session(dep, server.address))
            capture.probe(b"end")
        pcap = capture.write(tmp / "sync.pcap")
    finally:
        server.terminate()
    return {"pcap": pcap, "keylog": keylog, "sent": sent,
            "packets": decode(pcap, keylog=keylog)}


async def _sync_session(dep, address) -> dict:
    gw = await GatewayClient.connect(address[0], address[1], ssl_context=dep.client_ctx(GW),
                                     server_hostname="localhost", node_name="gw1-sync",
                                     max_frame_size=4096)
    try:
        registered = [r async for r in gw.bulk_register([dep.ue(u) for u in REGISTERED])]
        assert all(r.ok for r in registered)
        mine = [dep.ue(u) for u in UES if u not in EXTRA]
        mine = [GatewayUe(u.ue_service_id, u.key, Profile(ue_type=2))
                if u.ue_service_id == CHANGED else u for u in mine]
        recording = Recording(gw)
        repair = await compare(recording, mine, repair=True, bucket_bits=0)
        again = await compare(recording, mine, bucket_bits=12)
    finally:
        await gw.close()
    return {"recording": recording, "repair": repair, "again": again}


def of_type(session, mtype: MessageType) -> list[tuple[int, Node]]:
    return [(p.number, pdu) for p in session["packets"] for pdu in p.pdus
            if int(pdu.one("msgin5g.type"), 16) == mtype]


def digests_decoded(fragments: list[tuple[int, Node]]) -> tuple[list[int], bytes]:
    records = [d for _, f in fragments for d in f.all("msgin5g.sync.digest")]
    return ([int(d.one("msgin5g.sync.bucket")) for d in records],
            bytes.fromhex("".join(d.value for d in records)))


def test_the_session_did_a_sync_with_repairs(session):
    repair, again = session["sent"]["repair"], session["sent"]["again"]
    assert sorted(repair.missing) == MISSING and sorted(repair.extra) == EXTRA
    assert repair.profile_differs == [CHANGED]
    assert len(repair.repaired) == 5 and repair.remaining == 0
    assert again.in_sync and again.buckets_listed == 0
    [(_, ack)] = of_type(session, MessageType.HELLO_ACK)
    assert ack.one("msgin5g.sync.supported") == "1"


def test_digests_as_the_client_got_them(session):
    exchanges = session["sent"]["recording"].exchanges
    digest_exchanges = [(q, a) for q, a in exchanges if a.__class__.__name__ == "DigestReceived"]
    assert [q.bucket_bits for q, _ in digest_exchanges] == [0, 12]
    requests = of_type(session, MessageType.DIGEST_REQUEST)
    fragments = of_type(session, MessageType.DIGEST_RESPONSE)
    assert [r.one("msgin5g.sync.bucket_bits") for _, r in requests] == ["0", "12"]
    assert [r.one("msgin5g.tid") for _, r in requests] == [
        str(q.transaction_id) for q, _ in digest_exchanges]
    for (req_frame, request), (sent, got) in zip(requests, digest_exchanges, strict=True):
        mine = [(n, f) for n, f in fragments if f.one("msgin5g.tid") == str(sent.transaction_id)]
        buckets, digests = digests_decoded(mine)
        assert digests == got.digests
        assert buckets == list(range(len(got.digests) // DIGEST_SIZE))
        # Fragments numbered and counted, MORE on all but the last, linked to the request.
        assert [f.one("msgin5g.sync.fragment") for _, f in mine] == [
            str(k) for k in range(1, len(mine) + 1)]
        assert [f.one("msgin5g.flags.more") for _, f in mine] == ["1"] * (len(mine) - 1) + ["0"]
        assert mine[-1][1].one("msgin5g.sync.buckets_so_far") == str(1 << sent.bucket_bits)
        assert {f.one("msgin5g.request_in") for _, f in mine} == {str(req_frame)}
        assert request.one("msgin5g.response_in") == str(mine[0][0])
    assert len([f for _, f in fragments if f.one("msgin5g.sync.bucket_count") == "4096"]) == 17


def test_list_as_the_client_got_it(session):
    exchanges = session["sent"]["recording"].exchanges
    [(sent, got)] = [(q, a) for q, a in exchanges if a.__class__.__name__ == "ListReceived"]
    [(req_frame, request)] = of_type(session, MessageType.LIST_REQUEST)
    assert request.one("msgin5g.sync.bucket_bits") == str(sent.bucket_bits)
    assert request.values("msgin5g.sync.bucket") == [str(b) for b in sent.buckets]
    fragments = of_type(session, MessageType.LIST_RESPONSE)
    assert len(fragments) >= 2
    assert fragments[0][1].one("msgin5g.count") == str(len(got.entries)) == str(len(REGISTERED))
    listed = [(e.one("msgin5g.ue_id"), e.all("msgin5g.sync.ue_hash")[0].value)
              for _, f in fragments for e in f.all("msgin5g.ie") if e.values("msgin5g.entry")]
    assert listed == [(e.ue_service_id, e.ue_hash.hex()) for e in got.entries]
    assert [f.one("msgin5g.bulk.fragment") for _, f in fragments] == [
        str(k) for k in range(1, len(fragments) + 1)]
    assert fragments[-1][1].one("msgin5g.bulk.entries_so_far") == str(len(got.entries))
    assert {f.one("msgin5g.request_in") for _, f in fragments} == {str(req_frame)}


def test_release_without_credential(session):
    released = session["sent"]["recording"].released
    assert sorted(u for u, _ in released) == EXTRA and all(r.ok for _, r in released)
    requests = [r for _, r in of_type(session, MessageType.UE_DEREGISTRATION_REQUEST)]
    responses = [r for _, r in of_type(session, MessageType.UE_DEREGISTRATION_RESPONSE)]
    assert [r.one("msgin5g.ue_id") for r in requests] == [u for u, _ in released]
    assert [r.one("msgin5g.release") for r in requests] == ["1"] * len(released)
    assert [r.values("msgin5g.credential") for r in requests] == [[]] * len(released)
    assert [r.one("msgin5g.deregistration_result") for r in responses] == ["0"] * len(released)


def test_no_expert_info_on_a_good_sync(session):
    assert [e for p in session["packets"] for pdu in p.pdus for e in pdu.experts()] == []


def test_display_filters(session):
    """msgin5g.sync.bucket finds a bucket both where it is listed and where its digest is;
    msgin5g.release the releases."""
    expr = "msgin5g.sync.bucket == 0 || msgin5g.release == 1"
    out = tshark(session["pcap"], "-Y", expr, "-T", "fields", "-e", "msgin5g.type",
                 keylog=session["keylog"])
    found = {MESSAGE_NAMES[MessageType(int(t, 16))] for t in out.replace(",", " ").split()}
    assert found == {"LIST REQUEST", "DIGEST RESPONSE", "UE DE-REGISTRATION REQUEST"}


def test_info_column_lists_every_fragment_of_a_packet(session):
    """A TCP segment here carries several 16 KiB TLS records, each with parts of four
    4 108-octet frames: the Info column still lists every fragment the packet holds."""
    out = tshark(session["pcap"], "-2", "-Y", "msgin5g.sync.fragment", "-T", "fields",
                 "-e", "msgin5g.sync.fragment", "-e", "_ws.col.Info", keylog=session["keylog"])
    rows = [line.split("\t") for line in out.splitlines()]
    assert max(len(numbers.split(",")) for numbers, _ in rows) > 4  # records' worth
    for numbers, info in rows:
        assert re.findall(r"DIGEST RESPONSE tid=\d+ (?:b=\d+ )?fragment (\d+)", info) \
            == numbers.split(","), info
