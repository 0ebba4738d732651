"""A gateway whose permission or settings change while its session is live (wire-v1 §4 item 6).

Real msgd over real TLS: a child process reloaded with SIGHUP, or the in-process server's
reload_now() (the coroutine SIGHUP runs). A raw gateway sends its bulk in frames of 10 so the
test decides exactly which entries leave before and after the reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import time

from tests.harness import ChildServer, Gw, RawGateway, connect, make_deployment, running_server
from wire.constants import IEI, ErrorCause, FailureCause, MessageType
from wire.credential import compute_proof
from wire.ies import split_ies
from wire.messages import (
    Hello,
    RegistrationEntry,
    bulk_header_ies,
    decode_body,
    decode_entry,
    encode_entry,
    encode_frame,
    encode_message,
)

N = 200
PER_FRAME = 10
BEFORE = 50  # entries sent, and answered, before the reload
CLOSE_BOUND = 10.0  # seconds within which the server must have closed


def _uids(prefix: str = "ue") -> list[str]:
    return [f"{prefix}-{i:03d}@gw1.example" for i in range(N)]


def _frames(dep, uids: list[str], nonce: bytes | None, tid: int) -> list[bytes]:
    """One BULK REGISTRATION REQUEST in frames of PER_FRAME entries (credential when nonce)."""
    frames = []
    for start in range(0, len(uids), PER_FRAME):
        body = bulk_header_ies(MessageType.BULK_REGISTRATION_REQUEST, len(uids)) \
            if start == 0 else b""
        for uid in uids[start:start + PER_FRAME]:
            proof = compute_proof(dep.keys[uid], nonce, 1, uid) if nonce is not None else None
            body += encode_entry(RegistrationEntry(uid, proof))
        more = start + PER_FRAME < len(uids)
        frames.append(encode_frame(MessageType.BULK_REGISTRATION_REQUEST, tid, body, more=more))
    return frames


async def _answers(raw: RawGateway, count: int, tid: int) -> list[tuple[str, int | None]]:
    """The next `count` response entries of bulk `tid` as (UE, failure cause or None)."""
    out: list[tuple[str, int | None]] = []
    while len(out) < count:
        mtype, _flags, got_tid, body = await raw.read_frame(timeout=CLOSE_BOUND)
        assert (mtype, got_tid) == (MessageType.BULK_REGISTRATION_RESPONSE, tid), (mtype, body)
        for iei, value in split_ies(body):
            if iei == IEI.REGISTRATION_RESPONSE_ENTRY:
                entry = decode_entry(IEI.REGISTRATION_RESPONSE_ENTRY, value)
                out.append((entry.ue_service_id, entry.failure_cause))
    return out


async def _send_after_close(raw: RawGateway, frames: list[bytes]) -> None:
    """Send what the gateway would send next; the server may already have closed."""
    for frame in frames:
        try:
            await raw.send(frame)
        except (ConnectionError, ssl.SSLError):
            return


async def _expect_goodbye_and_close(raw: RawGateway, cause: ErrorCause) -> None:
    """The next frame is GOODBYE(cause), then the server closes within the bound (a timeout
    fails the test: a hang is not a close)."""
    started = time.monotonic()
    mtype, _flags, tid, body = await raw.read_frame(timeout=CLOSE_BOUND)
    assert mtype == MessageType.GOODBYE, (mtype, body)
    assert decode_body(MessageType.GOODBYE, tid, body).error_cause == cause
    await raw.expect_eof(timeout=CLOSE_BOUND - (time.monotonic() - started))


async def _probe(dep, address, uids: list[str]) -> dict[str, int | None]:
    """What another gateway (gw2) learns about each UE by trying to de-register it:
    REGISTERED_VIA_OTHER_GATEWAY means registered (through gw1), NOT_REGISTERED means not.
    Neither changes anything."""
    async with await connect(dep, address, "gw2.example") as gw2:
        results = [await gw2.deregister(dep.ue(uid, with_key=False)) for uid in uids]
    return {r.ue_service_id: r.cause for r in results}


def _wait_for_log(child: ChildServer, event: str, offset: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while f"event={event}" not in child.log_text()[offset:]:
        assert child.proc is not None and child.proc.poll() is None, child.log_text()[-2000:]
        assert time.monotonic() < deadline, f"no {event} in the log within {timeout} s"
        time.sleep(0.02)  # polling a log file for an observable condition, not timing


async def test_gateway_removed_mid_bulk_gets_no_further_entry_decided(tmp_path, pki):
    """issue 10, item 1: the 200-entry bulk in frames of 10; after 50 answers gw1 is removed
    from msgd.toml and msgd reloads (SIGHUP). None of the 150 entries sent after the reload is
    registered, the gateway gets GOODBYE(GATEWAY_NOT_ALLOWED) and the connection closes."""
    uids = _uids()
    dep = make_deployment(tmp_path / "d", pki, ues={uid: ["gw1.example"] for uid in uids},
                          gateways=(Gw("gw1.example"), Gw("gw2.example", ue_authentication=False)))
    child = ChildServer(dep)
    child.start()
    try:
        raw = await RawGateway.open(dep, child.address, "gw1.example")
        await raw.hello()
        frames = _frames(dep, uids, raw.nonce, tid=7)
        for frame in frames[: BEFORE // PER_FRAME]:
            await raw.send(frame)
        first = await _answers(raw, BEFORE, tid=7)
        assert first == [(uid, None) for uid in uids[:BEFORE]]

        text = dep.config_path.read_text()
        removed = text.replace('identity = "gw1.example"', 'identity = "gw9.example"')
        assert removed != text
        dep.config_path.write_text(removed)
        offset = len(child.log_text())
        assert child.proc is not None
        os.kill(child.proc.pid, signal.SIGHUP)
        await asyncio.to_thread(_wait_for_log, child, "reload.done", offset)

        await _send_after_close(raw, frames[BEFORE // PER_FRAME:])
        await _expect_goodbye_and_close(raw, ErrorCause.GATEWAY_NOT_ALLOWED)
        raw.close()

        seen = await _probe(dep, child.address, uids)
        assert [uid for uid in uids if seen[uid] == FailureCause.REGISTERED_VIA_OTHER_GATEWAY] \
            == uids[:BEFORE]
        assert [uid for uid in uids if seen[uid] == FailureCause.NOT_REGISTERED] \
            == uids[BEFORE:]
    finally:
        child.terminate()


async def test_gateway_revoked_by_reloaded_crl_mid_bulk_stops_at_once(tmp_path, pki):
    """The same with the gateway's certificate revoked by the CRL a reload brings in."""
    uids = _uids("rv")
    dep = make_deployment(tmp_path / "d", pki, ues={uid: ["gw1.example"] for uid in uids},
                          gateways=(Gw("gw1.example"), Gw("gw2.example", ue_authentication=False)))
    async with running_server(dep) as server:
        raw = await RawGateway.open(dep, server.address, "gw1.example")
        await raw.hello()
        frames = _frames(dep, uids, raw.nonce, tid=9)
        for frame in frames[: BEFORE // PER_FRAME]:
            await raw.send(frame)
        assert await _answers(raw, BEFORE, tid=9) == [(uid, None) for uid in uids[:BEFORE]]

        crl = pki.crl(["gw1.example"], name=f"crl-{tmp_path.name}.pem")
        dep.set_crl(crl)
        result = await server.reload_now()
        assert result["ok"], result
        assert result["changes"]["sessions_revoked"] == 1

        await _send_after_close(raw, frames[BEFORE // PER_FRAME:])
        await _expect_goodbye_and_close(raw, ErrorCause.GATEWAY_NOT_ALLOWED)
        raw.close()
        registered = {r.ue_service_id for r in server.registry.iter_registrations()}
        assert registered == set(uids[:BEFORE])
        seen = await _probe(dep, server.address, uids)
        assert {uid for uid, cause in seen.items()
                if cause == FailureCause.REGISTERED_VIA_OTHER_GATEWAY} == set(uids[:BEFORE])


async def test_changed_settings_apply_from_the_next_session(tmp_path, pki):
    """HELLO ACK's settings hold for the whole session: a reload that changes them sends
    GOODBYE(NORMAL); the bulk in progress finishes under the announced settings (no UE
    credential needed), and the reconnecting gateway learns the new ones."""
    uids = _uids("st")
    dep = make_deployment(tmp_path / "d", pki, ues={uid: ["gw1.example"] for uid in uids},
                          gateways=(Gw("gw1.example", ue_authentication=False),
                                    Gw("gw2.example")))
    async with running_server(dep) as server:
        raw = await RawGateway.open(dep, server.address, "gw1.example")
        ack = await raw.hello()
        assert (ack.ue_authentication_required, ack.bulk_allowed) == (0, 1)
        frames = _frames(dep, uids, None, tid=11)  # no credentials: the session trusts gw1
        for frame in frames[: BEFORE // PER_FRAME]:
            await raw.send(frame)
        assert await _answers(raw, BEFORE, tid=11) == [(uid, None) for uid in uids[:BEFORE]]

        text = dep.config_path.read_text()
        changed = text.replace(
            'identity = "gw1.example"\nue_authentication = false\nbulk_allowed = true',
            'identity = "gw1.example"\nue_authentication = true\nbulk_allowed = false')
        assert changed != text
        dep.config_path.write_text(changed)
        result = await server.reload_now()
        assert result["ok"], result
        assert result["changes"]["sessions_settings_changed"] == 1

        mtype, _flags, tid, body = await raw.read_frame(timeout=CLOSE_BOUND)
        assert mtype == MessageType.GOODBYE, (mtype, body)
        assert decode_body(MessageType.GOODBYE, tid, body).error_cause == ErrorCause.NORMAL
        for frame in frames[BEFORE // PER_FRAME:]:
            await raw.send(frame)
        rest = await _answers(raw, N - BEFORE, tid=11)
        assert rest == [(uid, None) for uid in uids[BEFORE:]]
        await raw.expect_eof(timeout=CLOSE_BOUND)
        raw.close()

        again = await RawGateway.open(dep, server.address, "gw1.example")
        ack = await again.hello()
        assert (ack.ue_authentication_required, ack.bulk_allowed) == (1, 0)
        again.close()
        assert server.registry.registered_count() == N


async def test_handshake_running_during_a_revoking_reload_is_refused(tmp_path, pki):
    """A connection accepted before the reload, whose TLS handshake completes after it, was
    checked against the old CRL: msgd checks it against the new one before any session."""
    dep = make_deployment(tmp_path / "d", pki, ues={"a@example": ["gw1.example"]})
    async with running_server(dep) as server:
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection(*server.address)
        # Accepted, and its handshake task started with the CRL-less context: wait until the
        # server counts it (an observable condition, polled on the loop).
        deadline = loop.time() + CLOSE_BOUND
        while server._handshaking == 0:
            assert loop.time() < deadline, "the server never accepted the connection"
            await asyncio.sleep(0.01)
        crl = pki.crl(["gw1.example"], name=f"crl-{tmp_path.name}.pem")
        dep.set_crl(crl)
        assert (await server.reload_now())["ok"]

        await writer.start_tls(dep.client_ctx("gw1.example"), server_hostname="localhost")
        gw = RawGateway(reader, writer)

        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await gw.send(encode_message(Hello(1, 2, node_name="raw")))
        await gw.expect_eof(timeout=CLOSE_BOUND)
        gw.close()
        assert not server.connections
