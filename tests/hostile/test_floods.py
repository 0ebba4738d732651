"""Floods: more connections than max_connections, more transactions than announced, and a
reconnect storm of one gateway identity, each beside a well-behaved gateway."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.harness import RawGateway
from tests.hostile.tools import (
    Witness,
    check_rss,
    client_hello,
    frame,
    ie,
    proof,
    read_message,
    record,
    refused,
    registration_body,
    witnessed_server,
)
from wire.constants import IEI, ErrorCause, FailureCause, MessageType
from wire.messages import (
    Error,
    Goodbye,
    Hello,
    HelloAck,
    UeDeregistrationResponse,
    UeRegistrationResponse,
    bulk_header_ies,
    encode_message,
)

MAX_CONNECTIONS = 24
MAX_OUTSTANDING = 8
RECONNECT_LIMIT = 5
RECONNECT_WINDOW = 3.0
WITNESS_UES = [f"w-{i:02d}@gw2.example" for i in range(11)]
FLOOD_UES = [f"f-{i:03d}@gw1.example" for i in range(200)]


def _server(tmp_path_factory, pki, name: str, limits: dict[str, object]):
    yield from witnessed_server(
        tmp_path_factory.mktemp(name), pki,
        gateways=("gw1.example", "gw2.example", "gw3.example"), limits=limits,
        witness_ues=WITNESS_UES, abuser_ues=FLOOD_UES)


@pytest.fixture(scope="module")
def flood(tmp_path_factory, pki):
    yield from _server(tmp_path_factory, pki, "flood", {
        "hello_timeout": 2, "max_connections": MAX_CONNECTIONS,
        "max_outstanding": MAX_OUTSTANDING, "reconnect_limit": 1_000_000})


@pytest.fixture(scope="module")
def storm(tmp_path_factory, pki):
    yield from _server(tmp_path_factory, pki, "storm", {
        "reconnect_limit": RECONNECT_LIMIT, "reconnect_window": RECONNECT_WINDOW})


async def _refused_before_tls(address: tuple[str, int], first_flight: bytes) -> str:
    """Connect and send a real ClientHello: the server closes (EOF, or a reset with our
    ClientHello unread) without sending one octet back. Returns how it closed."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(first_flight)
        # One octet back (an accepted connection answers at once with its ServerHello) is an
        # answer, not a refusal.
        return type(await refused(reader.readexactly(1))).__name__
    finally:
        writer.close()


async def test_connections_over_max_connections_are_refused_before_tls(flood):
    dep, child, baseline = flood
    hello_bytes = client_hello()
    async with Witness(dep, child.address, WITNESS_UES, identity="gw2.example") as witness:
        # Fill every slot: the witness has one, gw1 takes the rest (sessions established).
        holders = [await RawGateway.open(dep, child.address, "gw1.example")
                   for _ in range(MAX_CONNECTIONS - 1)]
        for raw in holders:
            await raw.hello()
        # 300 more, each with a real ClientHello: closed without a single octet of TLS.
        started = time.monotonic()
        closes = await asyncio.gather(  # each raises unless refused
            *(_refused_before_tls(child.address, hello_bytes) for _ in range(300)))
        refused_s = time.monotonic() - started
        await witness.progressed(1)
        # The held sessions are intact, and a freed slot is usable again.
        holders.pop().close()
        again = None
        for _attempt in range(200):  # until msgd has seen the close (bounded)
            try:
                again = await RawGateway.open(dep, child.address, "gw1.example")
                await again.hello()
                break
            except (OSError, EOFError, AssertionError):
                again = None
                await asyncio.sleep(0.01)
        assert again is not None
        again.close()
        for raw in holders:
            raw.writer.write(encode_message(Hello(9, 2)))  # a second HELLO: INVALID_MESSAGE
            err = await read_message(raw)
            assert err.error_cause == ErrorCause.INVALID_MESSAGE
            raw.close()
    record("max_connections flood", max_connections=MAX_CONNECTIONS, refused=300,
           refused_in_s=round(refused_s, 2),
           closed_by={how: closes.count(how) for how in sorted(set(closes))})
    check_rss(child, baseline, "max_connections flood")


async def test_more_outstanding_transactions_than_announced(flood):
    dep, child, baseline = flood
    async with Witness(dep, child.address, WITNESS_UES, identity="gw2.example") as witness:
        raw = await RawGateway.open(dep, child.address, "gw1.example")
        ack = await raw.hello()
        assert ack.max_outstanding == MAX_OUTSTANDING
        uids = FLOOD_UES[:40]
        # 40 registrations in one write: answers wait for durability, so the ninth onwards
        # arrive while eight are outstanding.
        await raw.send(b"".join(
            frame(MessageType.UE_REGISTRATION_REQUEST, 10 + n,
                  registration_body(u.encode(), proof(raw.nonce, 1, u)))
            for n, u in enumerate(uids)))
        answers = {}
        while len(answers) < 40:
            got = await read_message(raw)
            assert got.transaction_id not in answers, got
            answers[got.transaction_id] = got
        ok = [a for a in answers.values() if isinstance(a, UeRegistrationResponse)]
        refused = [a for a in answers.values() if isinstance(a, Error)]
        assert all(a.result == 0 for a in ok)
        assert {a.error_cause for a in refused} == {ErrorCause.TOO_MANY_OUTSTANDING}
        assert len(ok) >= MAX_OUTSTANDING and refused
        # A second bulk while the first is still being sent: TOO_MANY_OUTSTANDING for it.
        entry = ie(IEI.REGISTRATION_ENTRY, ie(IEI.UE_SERVICE_ID, uids[0].encode())
                   + ie(IEI.UE_CREDENTIAL, proof(raw.nonce, 1, uids[0])))
        await raw.send(frame(MessageType.BULK_REGISTRATION_REQUEST, 100,
                             bulk_header_ies(MessageType.BULK_REGISTRATION_REQUEST, 2) + entry,
                             more=True)
                       + frame(MessageType.BULK_REGISTRATION_REQUEST, 101,
                               bulk_header_ies(MessageType.BULK_REGISTRATION_REQUEST, 1) + entry))
        seen = []
        while not any(isinstance(m, Error) for m in seen):
            seen.append(await read_message(raw))
        err = next(m for m in seen if isinstance(m, Error))
        assert (err.transaction_id, err.error_cause) == (101, ErrorCause.TOO_MANY_OUTSTANDING)
        await raw.send(frame(MessageType.BULK_REGISTRATION_REQUEST, 100, entry))
        while True:
            got = await read_message(raw)
            if isinstance(got, tuple) and not got[1] & 1:
                break  # the last fragment of bulk 100's response
        # What is registered is exactly what was answered with success (and bulk 100's UE).
        registered = {a.ue_service_id for a in ok} | {uids[0]}
        for n, u in enumerate(uids):
            await raw.send(frame(MessageType.UE_DEREGISTRATION_REQUEST, 200 + n,
                                 registration_body(u.encode(), proof(raw.nonce, 2, u))))
            rsp = await read_message(raw)
            assert isinstance(rsp, UeDeregistrationResponse)
            expected = None if u in registered else FailureCause.NOT_REGISTERED
            assert rsp.failure_cause == expected, (u, rsp)
        raw.close()
        await witness.progressed(1)
    record("outstanding flood", sent=40, answered=len(ok), too_many_outstanding=len(refused))
    check_rss(child, baseline, "outstanding flood")


async def _hello_answer(dep, address, identity: str):
    raw = await RawGateway.open(dep, address, identity)
    raw.writer.write(encode_message(Hello(1, 2)))
    try:
        return await read_message(raw)
    finally:
        raw.close()


async def test_reconnect_storm_of_one_identity_is_damped(storm):
    dep, child, baseline = storm
    async with Witness(dep, child.address, WITNESS_UES, identity="gw2.example") as witness:
        # 40 sessions of one identity: TLS first, then the 40 HELLOs at once, so that every
        # HELLO is decided inside one reconnect_window whatever the machine's speed (one at
        # a time, a slow run spreads them over more than a window and more get through).
        raws = [await RawGateway.open(dep, child.address, "gw3.example") for _ in range(40)]
        started = time.monotonic()
        for raw in raws:
            raw.writer.write(encode_message(Hello(1, 2)))
        answers = await asyncio.gather(*(read_message(raw) for raw in raws))
        storm_s = time.monotonic() - started
        for raw in raws:
            raw.close()
        # msgd decided each HELLO between our first write and our last read.
        assert storm_s < RECONNECT_WINDOW, f"40 HELLOs took {storm_s:.2f} s: not one window"
        accepted = [a for a in answers if isinstance(a, HelloAck)]
        damped = [a for a in answers if isinstance(a, Goodbye)]
        assert (len(accepted), len(damped)) == (RECONNECT_LIMIT, 40 - RECONNECT_LIMIT)
        assert {g.error_cause for g in damped} == {ErrorCause.OVERLOADED}
        assert all(0 < g.retry_after <= RECONNECT_WINDOW * 1000 for g in damped)
        # Damping is per identity: another gateway connects meanwhile, the witness works.
        assert isinstance(await _hello_answer(dep, child.address, "gw1.example"), HelloAck)
        await witness.progressed(1)
        # Retrying when told to succeeds (waiting is what Retry after asks of a gateway).
        await asyncio.sleep(max(g.retry_after for g in damped) / 1000)
        again = await _hello_answer(dep, child.address, "gw3.example")
        assert isinstance(again, HelloAck), again
    record("reconnect storm", attempts=40, accepted=len(accepted), damped=len(damped),
           storm_s=round(storm_s, 2), retry_after_ms=[damped[0].retry_after,
                                                      damped[-1].retry_after])
    check_rss(child, baseline, "reconnect storm")
