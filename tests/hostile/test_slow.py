"""Slow and silent clients: each is cut by a stated bound, never by luck (docs/protocol.md,
Decisions: the HELLO deadline counts from TCP accept; a frame must arrive whole within
frame_timeout of its first octet; a peer that does not read is not read from)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.harness import RawGateway
from tests.hostile.tools import (
    Witness,
    check_rss,
    client_hello,
    closed_by_server,
    frame,
    proof,
    read_message,
    record,
    registration_body,
    wait_for_log,
    witnessed_server,
)
from wire.constants import ErrorCause, MessageType
from wire.messages import Error, Hello, Keepalive, KeepaliveAck, encode_message

HELLO_TIMEOUT = 1.0
FRAME_TIMEOUT = 1.0
# Longer than the flood's 2 s drain wait below: the keepalive ends a session msgd stopped
# reading two intervals later, so the flood always ends at that wait, never in a race with it.
KEEPALIVE = 3
WITNESS_UES = [f"w-{i:02d}@gw2.example" for i in range(11)]
SLOW_UES = [f"s-{i:03d}@gw1.example" for i in range(100)]


@pytest.fixture(scope="module")
def slow(tmp_path_factory, pki):
    yield from witnessed_server(
        tmp_path_factory.mktemp("slow"), pki, gateways=("gw1.example", "gw2.example"),
        limits={"hello_timeout": HELLO_TIMEOUT, "frame_timeout": FRAME_TIMEOUT,
                "keepalive_interval": KEEPALIVE, "max_outstanding": 8,
                "reconnect_limit": 1_000_000},
        witness_ues=WITNESS_UES, abuser_ues=SLOW_UES)


async def _eof_after(reader: asyncio.StreamReader, timeout: float = 10.0) -> int:
    """Octets the server sent before it closed the connection."""
    got = 0
    async with asyncio.timeout(timeout):
        while True:
            try:
                data = await reader.read(65536)
            except OSError:
                return got
            if not data:
                return got
            got += len(data)


async def test_tls_handshake_that_never_completes(slow):
    """Silent TCP connections and ClientHello-then-silence are closed at hello_timeout."""
    dep, child, baseline = slow
    address = child.address
    async with Witness(dep, address, WITNESS_UES) as witness:
        started = time.monotonic()
        silent = [await asyncio.open_connection(*address) for _ in range(40)]
        half = []
        for _ in range(10):
            reader, writer = await asyncio.open_connection(*address)
            writer.write(client_hello())  # then never the client's second flight
            half.append((reader, writer))
        sent_back = await asyncio.gather(*(_eof_after(r) for r, _w in silent + half))
        elapsed = time.monotonic() - started
        # Silent ones got nothing; half-done ones got the server's first flight only.
        assert sent_back[:40] == [0] * 40
        assert all(n > 0 for n in sent_back[40:])
        # Closed by the deadline, not before it.
        assert elapsed >= HELLO_TIMEOUT * 0.9
        await witness.progressed(1)
        for _r, w in silent + half:
            w.close()
    record("tls handshake never completes", connections=50, closed_after_s=round(elapsed, 2))
    check_rss(child, baseline, "tls handshake never completes")


async def test_connection_that_never_sends_hello(slow):
    dep, child, baseline = slow
    async with Witness(dep, child.address, WITNESS_UES) as witness:
        started = time.monotonic()
        raws = [await RawGateway.open(dep, child.address) for _ in range(20)]
        seen = await asyncio.gather(*(closed_by_server(raw) for raw in raws))
        elapsed = time.monotonic() - started
        for messages in seen:
            assert [(type(m), m.error_cause) for m in messages] == [
                (Error, ErrorCause.IDLE_TIMEOUT)]
        assert elapsed >= HELLO_TIMEOUT * 0.9
        await witness.progressed(1)
    record("never sends HELLO", connections=20, closed_after_s=round(elapsed, 2))
    check_rss(child, baseline, "never sends HELLO")


async def test_hello_deadline_counts_from_accept(slow):
    """TLS started late and HELLO dribbled: the deadline is absolute from TCP accept."""
    dep, child, baseline = slow
    from msgd.tls.contexts import client_context

    ctx = client_context(dep.pki.gateway_cert("gw1.example"), dep.pki.gateway_key("gw1.example"),
                         dep.pki.ca, alpn_protocols=("msgin5g-gw/1",))
    async with Witness(dep, child.address, WITNESS_UES) as witness:
        # 1. TCP now, TLS after 60 % of the deadline, then nothing: the server closes
        # 40 % of the deadline after TLS, not a whole hello_timeout after it.
        accepted = time.monotonic()
        reader, writer = await asyncio.open_connection(*child.address)
        await asyncio.sleep(HELLO_TIMEOUT * 0.6)  # the abuse itself: a late TLS handshake
        await writer.start_tls(ctx, server_hostname="localhost")
        tls_done = time.monotonic()
        seen = await closed_by_server(RawGateway(reader, writer))
        closed = time.monotonic()
        assert [(type(m), m.error_cause) for m in seen] == [(Error, ErrorCause.IDLE_TIMEOUT)]
        assert closed - tls_done < HELLO_TIMEOUT * 0.9, (tls_done - accepted, closed - tls_done)
        # 2. HELLO one octet at a time, 5 per second: cut before it is complete.
        raw = await RawGateway.open(dep, child.address)
        hello = encode_message(Hello(1, 2, node_name="a slow gateway"))
        sent, answer = 0, None
        for octet in hello:
            try:
                await raw.send(bytes([octet]))
            except OSError:
                break
            sent += 1
            try:
                answer = await read_message(raw, timeout=0.2)  # the pace of the abuse
                break
            except TimeoutError:
                continue
        assert isinstance(answer, Error) and answer.error_cause == ErrorCause.IDLE_TIMEOUT
        assert sent < len(hello), "the whole HELLO went through"
        await witness.progressed(1)
    record("hello dribble", hello_octets=len(hello), octets_sent_before_close=sent,
           late_tls_closed_after_tls_s=round(closed - tls_done, 2))
    check_rss(child, baseline, "slow hello")


async def test_frame_dribbled_one_octet_at_a_time_is_cut(slow):
    dep, child, baseline = slow
    async with Witness(dep, child.address, WITNESS_UES) as witness:
        # Control: whole frames spaced out, each a KEEPALIVE: all answered, nothing cut.
        raw = await RawGateway.open(dep, child.address)
        await raw.hello()
        for tid in (2, 3, 4):
            await raw.send(encode_message(Keepalive(tid)))
            got = await read_message(raw)
            assert isinstance(got, KeepaliveAck) and got.transaction_id == tid
            await asyncio.sleep(FRAME_TIMEOUT * 0.6)  # idle between frames is allowed
        # A registration request, one octet every 0.2 s: cut FRAME_TIMEOUT after its start.
        uid = SLOW_UES[0]
        request = frame(MessageType.UE_REGISTRATION_REQUEST, 5,
                        registration_body(uid.encode(), proof(raw.nonce, 1, uid)))
        started = time.monotonic()
        sent = 0
        answer = None
        for octet in request:
            try:
                await raw.send(bytes([octet]))
            except OSError:
                break
            sent += 1
            try:
                answer = await read_message(raw, timeout=0.2)  # the pace of the abuse
                break
            except TimeoutError:
                continue
        assert isinstance(answer, Error) and answer.error_cause == ErrorCause.IDLE_TIMEOUT
        assert sent < len(request)
        elapsed = time.monotonic() - started
        await raw.expect_eof()
        # The request was never processed: the UE is not registered (a fresh connection
        # registers it, then de-registers it).
        raw = await RawGateway.open(dep, child.address)
        await raw.hello()
        await raw.send(frame(MessageType.UE_DEREGISTRATION_REQUEST, 2,
                             registration_body(uid.encode(), proof(raw.nonce, 2, uid))))
        rsp = await read_message(raw)
        assert rsp.failure_cause == 4  # NOT_REGISTERED
        raw.close()
        await witness.progressed(1)
    record("frame dribble", frame_octets=len(request), octets_sent_before_close=sent,
           cut_after_s=round(elapsed, 2))
    check_rss(child, baseline, "frame dribble")


async def test_peers_that_never_read_are_paused_not_buffered(slow):
    """A KEEPALIVE flood, never reading the answers: the witness is served while msgd reads
    the flood; msgd stops reading from the peer once its write buffer is full (after the
    kernel's socket buffers), memory stays flat, and the keepalive then ends the session; the
    peer gets frame_timeout to take msgd's last octets, after which the connection is
    aborted, not kept for ever."""
    dep, child, baseline = slow
    async with Witness(dep, child.address, WITNESS_UES) as witness:
        figures = {}
        hogs = []
        # KEEPALIVE is answered outside any transaction, so max_outstanding does not bound
        # it (a pipeline of requests is bounded by it; a bulk by bulk_window, tests/e2e).
        for name, unit in (
            ("keepalive flood", lambda n: encode_message(Keepalive(1 + n % 0x7FFF_FFFE))),
        ):
            offset = len(child.log_text())
            hog = await RawGateway.open(dep, child.address)
            await hog.hello()
            hog.writer.transport.pause_reading()  # never read again, not even into buffers
            hogs.append(hog)
            written, n, blocked = 0, 0, False
            before = witness.rounds
            progress: list[tuple[float, int]] = []  # (when, witness rounds) before each drain
            flood_started = time.monotonic()
            while written < 200 * 1024 * 1024:
                chunk = b"".join(unit(n + k) for k in range(1000))
                n += 1000
                hog.writer.write(chunk)
                written += len(chunk)
                # The witness runs in this process's loop too: drain() does not yield while
                # the socket takes the octets, so yield here, or the witness starves on our
                # side and the check below would measure the test, not msgd.
                await asyncio.sleep(0)
                progress.append((time.monotonic(), witness.rounds - before))
                try:
                    # Observing that msgd stopped reading: drain cannot finish.
                    await asyncio.wait_for(hog.writer.drain(), 2.0)
                except TimeoutError:
                    blocked = True
                    break
            assert blocked, f"{name}: msgd kept reading from a peer that never reads"
            # Served while msgd read the flood, not only once it had stopped reading it (msgd
            # takes a bounded share of one connection's octets per turn of its loop): two
            # whole rounds (the first may have begun before the flood) in the first half of
            # the time the flood was taken in. We see msgd stop reading only once the kernel's
            # buffers between us are full: the last stretch before the final drain may
            # already come after it, and the witness is served at once then.
            half = flood_started + (progress[-1][0] - flood_started) / 2
            served = max((rounds for when, rounds in progress if when <= half), default=0)
            figures["witness_rounds_first_half"] = served
            figures["witness_rounds_until_blocked"] = witness.rounds - before
            figures["flood_s"] = round(time.monotonic() - flood_started, 2)
            figures[name] = round(written / 2**20, 1)
            assert served >= 2, f"the witness starved while msgd read the flood {figures}"
            await witness.progressed(1)
            check_rss(child, baseline, name)
            # Two keepalive intervals without a byte from it end the session; then msgd
            # waits frame_timeout for the peer to read, and aborts the connection.
            paused_at = time.monotonic()
            await wait_for_log(child, "event=connection.aborted", after=offset)
            figures["aborted_after_s"] = round(time.monotonic() - paused_at, 1)
            hog.writer.transport.resume_reading()
            await _eof_after(hog.reader, timeout=30)  # what msgd had sent, then the end
        for hog in hogs:
            hog.writer.transport.abort()
    record("never reads", mib_written_before_paused=figures)

