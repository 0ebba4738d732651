"""Streaming bulk against a real msgd process: early responses, back-pressure, kill -9."""

from __future__ import annotations

import asyncio
import socket
import sqlite3

import pytest

from msgd.gateway import GatewayUe
from msgd.registry.store import Registry
from tests.harness import ChildServer, Gw, RawGateway, connect, make_deployment
from wire.constants import IEI, MessageType
from wire.credential import compute_proof
from wire.ies import split_ies
from wire.messages import (
    RegistrationEntry,
    bulk_header_ies,
    decode_entry,
    encode_entry,
    encode_frame,
)

KEY = bytes(range(32))
BIG = 200_000


def _write_ues(dep, n: int, prefix: str = "ue", gateway: str = "gw1.example") -> list[str]:
    uids = [f"{prefix}-{i:07d}@{gateway}" for i in range(n)]
    lines = ["ue_service_id,key,gateways"]
    lines += [f"{uid},{KEY.hex()},{gateway}" for uid in uids]
    (dep.dir / "ues.csv").write_text("\n".join(lines) + "\n")
    for uid in uids:
        dep.keys[uid] = KEY
    return uids


def _bulk_frames(uids, nonce: bytes, tid: int, max_frame: int = 65535):
    """The frames of one BULK REGISTRATION REQUEST, produced lazily."""
    body = bytearray(bulk_header_ies(MessageType.BULK_REGISTRATION_REQUEST, len(uids)))
    for n, uid in enumerate(uids):
        ie = encode_entry(RegistrationEntry(uid, compute_proof(KEY, nonce, 1, uid)))
        if len(body) + len(ie) > max_frame:
            yield encode_frame(MessageType.BULK_REGISTRATION_REQUEST, tid, bytes(body), more=True)
            body = bytearray()
        body += ie
        if n == len(uids) - 1:
            yield encode_frame(MessageType.BULK_REGISTRATION_REQUEST, tid, bytes(body))


async def _read_results(raw: RawGateway, expect: int, on_entry=None) -> list[tuple[str, int]]:
    out = []
    while len(out) < expect:
        mtype, _flags, _tid, body = await raw.read_frame(timeout=60)
        assert mtype == MessageType.BULK_REGISTRATION_RESPONSE, (mtype, body)
        for iei, value in split_ies(body):
            if iei == IEI.REGISTRATION_RESPONSE_ENTRY:
                entry = decode_entry(IEI.REGISTRATION_RESPONSE_ENTRY, value)
                out.append((entry.ue_service_id, entry.failure_cause or 0))
                if on_entry is not None:
                    on_entry(entry)
    return out


@pytest.fixture
def big_dep(tmp_path, pki):
    dep = make_deployment(tmp_path / "big", pki, gateways=(Gw("gw1.example"), Gw("gw2.example")),
                          limits={"bulk_window": 4096})
    return dep


async def test_200k_bulk_first_answer_arrives_before_the_request_ends(big_dep):
    """A 200,000-entry bulk: the gateway holds back its last request frame until the first
    response fragment has arrived. A server that waited for the whole request before answering
    would never answer, and the test would fail on its bound; a streaming one completes."""
    uids = _write_ues(big_dep, BIG)
    child = ChildServer(big_dep)
    child.start()
    try:
        raw = await RawGateway.open(big_dep, child.address)
        await raw.hello()
        frames = _bulk_frames(uids, raw.nonce, tid=2)
        first_answer = asyncio.Event()
        held_back: list[bytes] = []

        async def send() -> None:
            previous = next(frames)
            for frame in frames:
                raw.writer.write(previous)
                await raw.writer.drain()
                previous = frame
            held_back.append(previous)  # the last frame, MORE clear
            await asyncio.wait_for(first_answer.wait(), 120)
            raw.writer.write(previous)
            await raw.writer.drain()

        sender = asyncio.create_task(send())
        results = await _read_results(raw, BIG, lambda _e: first_answer.set())
        await sender
        assert held_back and not held_back[0][3] & 1  # it really was the final fragment
        assert len(results) == BIG
        assert [u for u, _ in results] == uids  # in request order, one per entry
        assert all(cause == 0 for _, cause in results)
        raw.close()
    finally:
        assert child.terminate() == 0


async def test_gateway_that_never_reads_cannot_grow_server_memory(big_dep):
    uids = _write_ues(big_dep, 300_000)
    others = _write_ues_extra(big_dep, 2_000)
    child = ChildServer(big_dep)
    child.start()
    try:
        baseline = child.rss_bytes()
        hog = await _small_buffer_gateway(big_dep, child.address)
        await hog.hello()
        # Never read again: not even into the client's own buffers.
        hog.writer.transport.pause_reading()
        written = 0
        blocked = False
        for frame in _bulk_frames(uids, hog.nonce, tid=2):
            hog.writer.write(frame)
            written += len(frame)
            try:
                # Observing that the server stopped reading: drain cannot finish.
                await asyncio.wait_for(hog.writer.drain(), 3.0)
            except TimeoutError:
                blocked = True
                break
        assert blocked, "the server kept reading from a gateway that never reads"
        assert written < 60_000_000
        during = child.rss_bytes()
        # Another gateway is served meanwhile, single and bulk.
        async with await connect(big_dep, child.address, "gw2.example") as gw2:
            first = await gw2.register(big_dep.ue(others[0]))
            assert first.ok
            results = [r async for r in gw2.bulk_register(
                [big_dep.ue(u) for u in others[1:]])]
            assert len(results) == len(others) - 1 and all(r.ok for r in results)
        after = child.rss_bytes()
        assert during - baseline < 64 * 1024 * 1024, (baseline, during)
        assert after - baseline < 64 * 1024 * 1024, (baseline, after)
        hog.writer.transport.abort()
    finally:
        assert child.terminate() == 0


async def _small_buffer_gateway(dep, address) -> RawGateway:
    """A raw gw1 whose socket buffers are fixed at 64 KiB. With autotuning, loopback buffers
    can grow to hold the whole response stream of the bulk (~9 MB) and much of the request,
    and then the server never has a reason to stop reading: the test would measure the
    kernel's buffers, not the server's back-pressure. The send buffer counts too: the server's
    own receive and send buffers still tune up to several MB, and with a tuned send buffer on
    this side as well the 300,000 entries fitted in kernel buffers once, on a loaded machine."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before connect: fixed sizes, no tuning.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    reader, writer = await asyncio.open_connection(
        sock=sock, ssl=dep.client_ctx("gw1.example"), server_hostname="localhost",
        limit=1 << 24)
    return RawGateway(reader, writer)


def _write_ues_extra(dep, n: int) -> list[str]:
    """Append gw2 UEs to the provisioning file written by _write_ues."""
    uids = [f"other-{i:05d}@gw2.example" for i in range(n)]
    with open(dep.dir / "ues.csv", "a") as fh:
        for uid in uids:
            fh.write(f"{uid},{KEY.hex()},gw2.example\n")
            dep.keys[uid] = KEY
    return uids


async def test_kill9_mid_bulk_loses_no_acknowledged_registration(big_dep):
    uids = _write_ues(big_dep, 100_000)
    child = ChildServer(big_dep)
    child.start()
    acknowledged: list[str] = []
    try:
        async with await connect(big_dep, child.address) as gw:
            with pytest.raises(Exception) as lost:
                async for result in gw.bulk_register(GatewayUe(u, KEY) for u in uids):
                    if result.ok:
                        acknowledged.append(result.ue_service_id)
                    if len(acknowledged) == 30_000:
                        child.kill9()
            assert type(lost.value).__name__ == "ConnectionLost"
            unanswered = lost.value.unanswered
    finally:
        if child.proc and child.proc.poll() is None:
            child.kill9()
    assert len(acknowledged) >= 30_000
    # Nothing the gateway was told is lost; the ones without an answer are named.
    assert set(unanswered).isdisjoint(acknowledged)
    path = big_dep.config().registry.path
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    registry = Registry.open(path)
    try:
        missing = [u for u in acknowledged if registry.registration(u) is None]
        assert missing == []
    finally:
        registry.close_sync()
    # And the daemon starts again on that file.
    again = ChildServer(big_dep)
    again.start()
    assert again.terminate() == 0
