"""Abusive frames against a running msgd, with a well-behaved gateway served at the same time.

One msgd child process serves the whole module (hello_timeout and frame_timeout of 1 s so the
slow cases are quick). Each test runs a Witness (tests/hostile/tools.py) beside the abuser and
checks the server's RSS against the module's baseline.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Iterator

import pytest

from tests.harness import ChildServer, Gw, RawGateway, make_deployment
from tests.hostile.tools import (
    CLOSED,
    KEY,
    Witness,
    assert_clean_log,
    check_rss,
    closed_by_server,
    frame,
    ie,
    proof,
    provisioning_csv,
    read_message,
    record,
    registration_body,
)
from tests.vectors import VECTORS
from wire.constants import HEADER_SIZE, IEI, ErrorCause, FailureCause, MessageType
from wire.ies import split_ies
from wire.messages import (
    Error,
    Keepalive,
    KeepaliveAck,
    UeDeregistrationResponse,
    UeRegistrationResponse,
    bulk_header_ies,
    decode_entry,
    encode_message,
)

ABUSER = "gw1.example"
WITNESS_UES = [f"w-{i:02d}@gw2.example" for i in range(11)]
ABUSE_UES = [f"a-{i:04d}@gw1.example" for i in range(1000)]
LONG_ASCII = "L" * (255 - len("@gw1.example")) + "@gw1.example"
LONG_UTF8 = "€" * 85  # 3 octets each: 255 octets
B_ONLY = [f"b-{i:03d}@gw2.example" for i in range(100)]
SHARED = [f"s-{i:03d}@both.example" for i in range(100)]
REG, DEREG = 1, 2
BULK_REG = MessageType.BULK_REGISTRATION_REQUEST
BULK_DEREG = MessageType.BULK_DEREGISTRATION_REQUEST


@pytest.fixture(scope="module")
def abuse(tmp_path_factory, pki):
    dep = make_deployment(
        tmp_path_factory.mktemp("abuse"), pki,
        gateways=(Gw("gw1.example"), Gw("gw2.example"), Gw("gw3.example")),
        limits={"hello_timeout": 1, "frame_timeout": 1, "max_outstanding": 8,
                "max_bulk_entries": 1000, "reconnect_limit": 1_000_000})
    rows = [(u, ["gw2.example"]) for u in WITNESS_UES + B_ONLY]
    rows += [(u, ["gw1.example"]) for u in [*ABUSE_UES, LONG_ASCII, LONG_UTF8]]
    rows += [(u, ["gw1.example", "gw2.example"]) for u in SHARED]
    provisioning_csv(dep.dir / "ues.csv", rows)
    child = ChildServer(dep)
    child.start()
    try:
        baseline = child.rss_bytes()
        yield dep, child, baseline
        assert child.proc is not None and child.proc.poll() is None, "msgd died"
        assert_clean_log(child)
    finally:
        assert child.terminate() == 0


async def hello(dep, address, identity: str = ABUSER) -> RawGateway:
    raw = await RawGateway.open(dep, address, identity)
    await raw.hello()
    return raw


async def bulk_answers(raw: RawGateway, tid: int) -> tuple[list, Error | None]:
    """Response entries of bulk `tid` until its last fragment, or the ERROR that ends it."""
    entries = []
    while True:
        got = await read_message(raw)
        if isinstance(got, Error):
            assert got.transaction_id == tid, got
            return entries, got
        _mtype, flags, rtid, body = got
        assert rtid == tid
        for iei, value in split_ies(body):
            if iei in (IEI.REGISTRATION_RESPONSE_ENTRY, IEI.DEREGISTRATION_RESPONSE_ENTRY):
                entries.append(decode_entry(IEI(iei), value))
        if not flags & 1:
            return entries, None


def entry(kind: MessageType, uid: bytes, nonce: bytes | None, extra: bytes = b"") -> bytes:
    """One (de-)registration entry IE, by hand; `nonce` None leaves the credential out."""
    op = REG if kind is BULK_REG else DEREG
    value = ie(IEI.UE_SERVICE_ID, uid)
    if nonce is not None:
        value += ie(IEI.UE_CREDENTIAL, proof(nonce, op, uid.decode("utf-8", "replace")))
    iei = IEI.REGISTRATION_ENTRY if kind is BULK_REG else IEI.DEREGISTRATION_ENTRY
    return ie(iei, value + extra)


async def single(raw: RawGateway, tid: int, op: int, uid: str, *, nonce: bytes | None = None):
    mtype = (MessageType.UE_REGISTRATION_REQUEST if op == REG
             else MessageType.UE_DEREGISTRATION_REQUEST)
    body = registration_body(uid.encode(), proof(nonce or raw.nonce, op, uid))
    await raw.send(frame(mtype, tid, body))
    return await read_message(raw)


# --- random and mutated frames ---------------------------------------------------------------


def _seed_frames() -> list[bytes]:
    frames = [bytes.fromhex(v["hex"]) for v in VECTORS["valid"]]
    frames += [bytes.fromhex(v["hex"]) for v in VECTORS["invalid"]]
    return [f for f in frames if len(f) >= 12]


def _mutants(rng: random.Random, seeds: list[bytes]) -> Iterator[tuple[str, bytes]]:
    """Endless mutated or random frames, named by how they were made."""
    while True:
        base = bytearray(rng.choice(seeds))
        how = rng.randrange(9)
        if how == 0:  # flip octets anywhere
            for _ in range(rng.randint(1, 4)):
                base[rng.randrange(len(base))] = rng.randrange(256)
            yield "flip", bytes(base)
        elif how == 1:  # a header field replaced
            field = rng.choice([(1, 2), (2, 4), (4, 8), (8, 12)])
            base[field[0]:field[1]] = rng.randbytes(field[1] - field[0])
            yield "header", bytes(base)
        elif how == 2:  # body truncated, length kept (a lying length)
            yield "truncated", bytes(base[: rng.randrange(12, len(base) + 1)])
        elif how == 3:  # garbage appended to the body, length updated
            extra = rng.randbytes(rng.randint(1, 300))
            body = bytes(base[12:]) + extra
            yield "appended", bytes(base[:8]) + len(body).to_bytes(4, "big") + body
        elif how == 4:  # a random IE-looking body with a valid header
            body = b"".join(ie(rng.randrange(256), rng.randbytes(rng.randint(0, 40)))
                            for _ in range(rng.randint(0, 20)))
            yield "random-ies", frame(rng.choice(list(MessageType)), rng.randint(1, 50), body)
        elif how == 5:  # entirely random octets
            yield "random", rng.randbytes(rng.randint(1, 200))
        elif how == 6:  # two frames spliced at a random point
            other = rng.choice(seeds)
            cut = rng.randrange(len(base))
            yield "splice", bytes(base[:cut]) + other[rng.randrange(len(other)):]
        elif how == 7:  # an IE length inside the body made to lie
            if len(base) > 15:
                pos = 12 + 1
                base[pos:pos + 2] = rng.randrange(65536).to_bytes(2, "big")
            yield "ie-length", bytes(base)
        else:  # MORE and reserved flags
            base[2:4] = rng.choice([1, 2, 0x8000, 0xFFFF, 0x0101]).to_bytes(2, "big")
            yield "flags", bytes(base)


def _swallowed(stream: bytes, probe_at: int) -> bool:
    """Whether the octets of `stream` from `probe_at` on only complete a frame begun before
    them, exactly: framed as msgd frames it (a 12-octet header ending in the body length,
    then the body), the probe there is then neither a frame of its own, to be answered, nor
    part of a frame left incomplete, which frame_timeout cuts."""
    pos = 0
    while pos < len(stream):
        if pos == probe_at or len(stream) - pos < HEADER_SIZE:
            return False
        pos += HEADER_SIZE + int.from_bytes(stream[pos + 8 : pos + HEADER_SIZE], "big")
    return pos == len(stream)


async def test_random_and_mutated_frames_after_hello(abuse):
    """Hundreds of mutated and random frames: every one is answered or the connection is
    closed within the frame bound; the probe after it tells which. Nothing hangs or leaks."""
    dep, child, baseline = abuse
    seed = int(os.environ.get("HOSTILE_SEED", "20260707"))
    seeds = _seed_frames()
    outcome = {"answered": 0, "closed": 0, "connections": 0, "probe_swallowed": 0}
    kinds: dict[str, int] = {}

    async def abuser(n: int, cases: int) -> None:
        rng = random.Random(seed * 100 + n)
        mutants = _mutants(rng, seeds)
        raw = None
        for case in range(cases):
            if raw is None:
                raw = await hello(dep, child.address)
                outcome["connections"] += 1
            how, data = next(mutants)
            kinds[how] = kinds.get(how, 0) + 1
            probe = 0x7F00_0000 + n * 1000 + case
            probes = encode_message(Keepalive(probe))
            if _swallowed(data + probes, len(data)):
                # The probe would end a frame the mutant left open: msgd answers that frame
                # and waits for the next, so a second probe tells whether msgd still serves.
                outcome["probe_swallowed"] += 1
                probe += 0x0080_0000
                probes += encode_message(Keepalive(probe))
            try:
                await raw.send(data + probes)
                # The probe is answered unless the mutant closed the connection or left a
                # frame incomplete (the probe then is body octets): the frame bound (1 s)
                # ends the connection.
                while True:
                    got = await read_message(raw, timeout=5)
                    if isinstance(got, KeepaliveAck) and got.transaction_id == probe:
                        outcome["answered"] += 1
                        break
            except CLOSED:  # closed: EOF, reset or a TLS alert (a read timeout is neither)
                outcome["closed"] += 1
                raw.close()
                raw = None
        if raw is not None:
            raw.close()

    async with Witness(dep, child.address, WITNESS_UES) as witness:
        before = witness.rounds
        await asyncio.gather(*(abuser(n, 20) for n in range(16)))
        during = witness.rounds - before
        assert during > 0, "the witness was not served while the abusers ran"
        await witness.progressed(2)
    check_rss(child, baseline, "mutated frames")
    record("mutated frames", seed=seed, frames=320, **outcome, kinds=kinds,
           witness_rounds_during=during)
    assert outcome["answered"] + outcome["closed"] == 320
    assert outcome["answered"] > 0 and outcome["closed"] > 0


# --- lying lengths and FRAME_TOO_LARGE --------------------------------------------------------


async def test_lying_frame_and_ie_lengths(abuse):
    dep, child, baseline = abuse
    async with Witness(dep, child.address, WITNESS_UES) as witness:
        uid = ABUSE_UES[0]
        # 1. Body shorter than the header says, then silence: cut by the frame bound.
        raw = await hello(dep, child.address)
        body = registration_body(uid.encode(), proof(raw.nonce, REG, uid))
        header = frame(MessageType.UE_REGISTRATION_REQUEST, 2, body)[:8]
        await raw.send(header + (len(body) + 500).to_bytes(4, "big") + body)
        seen = await closed_by_server(raw)
        assert [(type(m), m.error_cause) for m in seen] == [(Error, ErrorCause.IDLE_TIMEOUT)]
        # 2. Body longer than the header says: the message is cut inside an IE
        # (INVALID_MESSAGE) and the rest is read as the next header (version 7: closed).
        raw = await hello(dep, child.address)
        body = registration_body(uid.encode(), proof(raw.nonce, REG, uid))
        short = len(body) - 10  # the frame ends inside the credential IE
        data = (frame(MessageType.UE_REGISTRATION_REQUEST, 2, body)[:8]
                + short.to_bytes(4, "big") + body)
        await raw.send(data[: 12 + short] + b"\x07" + data[12 + short + 1:] + bytes(12))
        seen = await closed_by_server(raw)
        assert [(m.transaction_id, m.error_cause) for m in seen] == [
            (2, ErrorCause.INVALID_MESSAGE), (0, ErrorCause.UNSUPPORTED_VERSION)]
        # 3. An IE whose length runs past the body: INVALID_MESSAGE for that transaction,
        # single or bulk; the connection stays and serves the next request.
        raw = await hello(dep, child.address)
        lying = bytes([IEI.UE_SERVICE_ID]) + (4000).to_bytes(2, "big") + uid.encode()
        await raw.send(frame(MessageType.UE_REGISTRATION_REQUEST, 3, lying))
        err = await read_message(raw)
        assert (err.transaction_id, err.error_cause) == (3, ErrorCause.INVALID_MESSAGE)
        head = bulk_header_ies(BULK_REG, 2) + entry(BULK_REG, uid.encode(), raw.nonce)
        await raw.send(frame(BULK_REG, 4, head + lying))
        entries, err = await bulk_answers(raw, 4)
        assert [(e.ue_service_id, e.result) for e in entries] == [(uid, 0)]
        assert err is not None and err.error_cause == ErrorCause.INVALID_MESSAGE
        # 4. An IE length shorter than its value: the rest reads as IEs of its own.
        fake = ie(IEI.UE_SERVICE_ID, b"ab") + b"\x99\x00\x00"  # 0x99: unknown, mandatory
        await raw.send(frame(MessageType.UE_DEREGISTRATION_REQUEST, 5, fake))
        err = await read_message(raw)
        assert (err.transaction_id, err.error_cause) == (5, ErrorCause.UNKNOWN_MANDATORY_IE)
        rsp = await single(raw, 6, DEREG, uid)
        assert isinstance(rsp, UeDeregistrationResponse) and rsp.result == 0
        raw.close()
        await witness.progressed(1)
    check_rss(child, baseline, "lying lengths")


async def test_frame_too_large_is_decided_from_the_header(abuse):
    dep, child, baseline = abuse
    async with Witness(dep, child.address, WITNESS_UES) as witness:
        uid = ABUSE_UES[1]
        # Exactly the maximum (65 535 octets of body) is served: padded with an unknown
        # optional IE, which the receiver skips.
        raw = await hello(dep, child.address)
        body = registration_body(uid.encode(), proof(raw.nonce, REG, uid))
        body += ie(0x7E, bytes(65535 - len(body) - 3))
        assert len(body) == 65535
        await raw.send(frame(MessageType.UE_REGISTRATION_REQUEST, 2, body))
        rsp = await read_message(raw)
        assert isinstance(rsp, UeRegistrationResponse) and rsp.result == 0
        assert (await single(raw, 3, DEREG, uid)).result == 0
        # One octet more: refused on its header alone, no body octet sent or buffered.
        for length in (65536, 0xFFFF_FFFF):
            raw = await hello(dep, child.address)
            await raw.send(frame(MessageType.UE_REGISTRATION_REQUEST, 2, b"")[:8]
                           + length.to_bytes(4, "big"))
            seen = await closed_by_server(raw)
            assert [(m.transaction_id, m.error_cause) for m in seen] == [
                (0, ErrorCause.FRAME_TOO_LARGE)]
        await witness.progressed(1)
    check_rss(child, baseline, "frame too large")


# --- bulk counts that lie ---------------------------------------------------------------------


async def test_bulk_count_lies_in_both_directions(abuse):
    dep, child, baseline = abuse
    uids = ABUSE_UES[100:120]
    async with Witness(dep, child.address, WITNESS_UES) as witness:
        raw = await hello(dep, child.address)
        nonce = raw.nonce

        def entries(kind: MessageType, ues: list[str]) -> bytes:
            return b"".join(entry(kind, u.encode(), nonce) for u in ues)

        # Fewer than announced: those sent are processed and answered, then COUNT_MISMATCH.
        await raw.send(frame(BULK_REG, 2, bulk_header_ies(BULK_REG, 10) + entries(
            BULK_REG, uids[:5])))
        got, err = await bulk_answers(raw, 2)
        assert [(e.ue_service_id, e.result) for e in got] == [(u, 0) for u in uids[:5]]
        assert err is not None and err.error_cause == ErrorCause.COUNT_MISMATCH
        # More than announced, one frame: the first 5 stand, the rest were not processed.
        await raw.send(frame(BULK_REG, 3, bulk_header_ies(BULK_REG, 5) + entries(
            BULK_REG, uids[5:15])))
        got, err = await bulk_answers(raw, 3)
        assert [(e.ue_service_id, e.result) for e in got] == [(u, 0) for u in uids[5:10]]
        assert err is not None and err.error_cause == ErrorCause.COUNT_MISMATCH
        # More than announced over fragments: the surplus fragment is dropped to its end.
        await raw.send(frame(BULK_DEREG, 4, bulk_header_ies(BULK_DEREG, 3)
                             + entries(BULK_DEREG, uids[0:3]), more=True)
                       + frame(BULK_DEREG, 4, entries(BULK_DEREG, uids[3:6]), more=True)
                       + frame(BULK_DEREG, 4, entries(BULK_DEREG, uids[6:9])))
        got, err = await bulk_answers(raw, 4)
        assert [(e.ue_service_id, e.result) for e in got] == [(u, 0) for u in uids[0:3]]
        assert err is not None and err.error_cause == ErrorCause.COUNT_MISMATCH
        # Announced 0 but an entry follows.
        await raw.send(frame(BULK_DEREG, 5, bulk_header_ies(BULK_DEREG, 0)
                             + entries(BULK_DEREG, uids[3:4])))
        got, err = await bulk_answers(raw, 5)
        assert got == [] and err is not None and err.error_cause == ErrorCause.COUNT_MISMATCH
        # Announced far more than Maximum bulk entries (1000): refused at the count.
        for count in (1001, 0xFFFF_FFFF):
            await raw.send(frame(BULK_REG, 6, bulk_header_ies(BULK_REG, count)
                                 + entries(BULK_REG, uids[15:16])))
            got, err = await bulk_answers(raw, 6)
            assert got == [] and err is not None
            assert err.error_cause == ErrorCause.TOO_MANY_ENTRIES
        # What the registry holds is exactly what was answered: 3..9 registered (0..2 were
        # de-registered above), 10..19 never processed.
        expected = {u: u in uids[3:10] for u in uids}
        await raw.send(frame(BULK_DEREG, 7, bulk_header_ies(BULK_DEREG, 20)
                             + entries(BULK_DEREG, uids)))
        got, err = await bulk_answers(raw, 7)
        assert err is None
        assert {e.ue_service_id: e.result == 0 for e in got} == expected
        assert all(e.failure_cause == FailureCause.NOT_REGISTERED for e in got
                   if not expected[e.ue_service_id])
        # The same connection still serves the announced maximum exactly.
        await raw.send(frame(BULK_REG, 8, bulk_header_ies(BULK_REG, 1000), more=True))
        for chunk in range(0, 1000, 250):
            await raw.send(frame(BULK_REG, 8, entries(BULK_REG, ABUSE_UES[chunk:chunk + 250]),
                                 more=chunk < 750))
        got, err = await bulk_answers(raw, 8)
        assert err is None and len(got) == 1000 and all(e.result == 0 for e in got)
        await raw.send(frame(BULK_DEREG, 9, bulk_header_ies(BULK_DEREG, 1000)
                             + entries(BULK_DEREG, ABUSE_UES[:600]), more=True)
                       + frame(BULK_DEREG, 9, entries(BULK_DEREG, ABUSE_UES[600:])))
        got, err = await bulk_answers(raw, 9)
        assert err is None and len(got) == 1000 and all(e.result == 0 for e in got)
        raw.close()
        await witness.progressed(1)
    check_rss(child, baseline, "bulk count lies")


# --- UE Service ID lengths ----------------------------------------------------------------------


async def test_zero_and_255_octet_ue_service_ids(abuse):
    dep, child, baseline = abuse
    async with Witness(dep, child.address, WITNESS_UES) as witness:
        raw = await hello(dep, child.address)
        # 0 octets: a single request is INVALID_MESSAGE (the connection stays); a bulk entry
        # is INVALID_ENTRY with an empty UE Service ID, and the rest of the bulk proceeds.
        await raw.send(frame(MessageType.UE_REGISTRATION_REQUEST, 2,
                             ie(IEI.UE_SERVICE_ID, b"") + ie(IEI.UE_CREDENTIAL, bytes(32))))
        err = await read_message(raw)
        assert (err.transaction_id, err.error_cause) == (2, ErrorCause.INVALID_MESSAGE)
        # 256 octets: too long, likewise.
        await raw.send(frame(MessageType.UE_REGISTRATION_REQUEST, 3,
                             ie(IEI.UE_SERVICE_ID, LONG_ASCII.encode() + b"x")))
        err = await read_message(raw)
        assert (err.transaction_id, err.error_cause) == (3, ErrorCause.INVALID_MESSAGE)
        # 255 octets, ASCII and 3-octet UTF-8: registered and de-registered, single and bulk.
        for n, uid in enumerate((LONG_ASCII, LONG_UTF8)):
            assert len(uid.encode()) == 255
            rsp = await single(raw, 10 + n, REG, uid)
            assert (rsp.ue_service_id, rsp.result) == (uid, 0)
            rsp = await single(raw, 20 + n, DEREG, uid)
            assert (rsp.ue_service_id, rsp.result) == (uid, 0)
        body = bulk_header_ies(BULK_REG, 4) + b"".join([
            entry(BULK_REG, b"", raw.nonce),
            entry(BULK_REG, LONG_ASCII.encode(), raw.nonce),
            entry(BULK_REG, LONG_UTF8.encode() + b"x", raw.nonce),
            entry(BULK_REG, LONG_UTF8.encode(), raw.nonce)])
        await raw.send(frame(BULK_REG, 30, body))
        got, err = await bulk_answers(raw, 30)
        assert err is None
        assert [(e.ue_service_id, e.result, e.failure_cause) for e in got] == [
            ("", 1, FailureCause.INVALID_ENTRY), (LONG_ASCII, 0, None),
            ("", 1, FailureCause.INVALID_ENTRY), (LONG_UTF8, 0, None)]
        for n, uid in enumerate((LONG_ASCII, LONG_UTF8)):
            assert (await single(raw, 40 + n, DEREG, uid)).result == 0
        raw.close()
        await witness.progressed(1)
    check_rss(child, baseline, "ue service id lengths")


# --- deeply repeated IEs ----------------------------------------------------------------------


async def test_deeply_repeated_ies(abuse):
    """Open5GS crashed past a fixed IE-repetition cap (open5gs #3472, #3964). Here repetition
    is bounded by the frame only, and each kind has its rule."""
    dep, child, baseline = abuse
    uid = ABUSE_UES[200]
    async with Witness(dep, child.address, WITNESS_UES) as witness:
        raw = await hello(dep, child.address)
        # 21 000 unknown optional IEs around a valid request: skipped, the request is served.
        skip = ie(0x7F, b"") * 10_500
        body = registration_body(uid.encode(), proof(raw.nonce, REG, uid), prefix=skip,
                                 suffix=skip)
        await raw.send(frame(MessageType.UE_REGISTRATION_REQUEST, 2, body))
        rsp = await read_message(raw)
        assert isinstance(rsp, UeRegistrationResponse) and rsp.result == 0
        # The UE Service ID 10 000 times: INVALID_MESSAGE, the connection stays.
        body = ie(IEI.UE_SERVICE_ID, b"x@y") * 10_000
        await raw.send(frame(MessageType.UE_DEREGISTRATION_REQUEST, 3, body))
        err = await read_message(raw)
        assert (err.transaction_id, err.error_cause) == (3, ErrorCause.INVALID_MESSAGE)
        # An unknown mandatory IE 21 000 times: UNKNOWN_MANDATORY_IE.
        await raw.send(frame(MessageType.UE_DEREGISTRATION_REQUEST, 4, ie(0xF0, b"") * 21_000))
        err = await read_message(raw)
        assert (err.transaction_id, err.error_cause) == (4, ErrorCause.UNKNOWN_MANDATORY_IE)
        # A bulk of 20 full frames of unknown optional IEs (437 000 IEs) around 2 entries:
        # streamed IE by IE, nothing accumulates, both entries served.
        filler = ie(0x7F, b"") * 21_800
        uid2 = ABUSE_UES[201]
        frames = [frame(BULK_REG, 5, bulk_header_ies(BULK_REG, 2)
                        + entry(BULK_REG, uid2.encode(), raw.nonce) + filler, more=True)]
        frames += [frame(BULK_REG, 5, filler, more=True) for _ in range(18)]
        frames.append(frame(BULK_REG, 5, filler + entry(BULK_REG, uid.encode(), raw.nonce)))
        await raw.send(b"".join(frames))
        got, err = await bulk_answers(raw, 5)
        assert err is None and [(e.ue_service_id, e.result) for e in got] == [
            (uid2, 0), (uid, 0)]
        # Inside entries: a profile of 500 repeated UE type IEs, a profile holding a nested
        # registration entry, an entry with its UE Service ID twice: each INVALID_ENTRY; an
        # entry whose profile is 680 unknown optional sub-IEs is served.
        bad_profile = ie(IEI.NON_MSGIN5G_UE_PROFILE, ie(IEI.UE_TYPE, b"\x01") * 500)
        nested = ie(IEI.NON_MSGIN5G_UE_PROFILE, entry(BULK_REG, b"n@x", None))
        twice = ie(IEI.UE_SERVICE_ID, uid.encode())
        fine = ie(IEI.NON_MSGIN5G_UE_PROFILE, ie(0x6F, b"") * 680)
        targets = ABUSE_UES[202:206]
        body = bulk_header_ies(BULK_DEREG, 2) + b"".join(
            entry(BULK_DEREG, u.encode(), raw.nonce) for u in (uid, uid2))
        await raw.send(frame(BULK_DEREG, 6, body))
        got, err = await bulk_answers(raw, 6)
        assert err is None and all(e.result == 0 for e in got)
        body = bulk_header_ies(BULK_REG, 4) + b"".join([
            entry(BULK_REG, targets[0].encode(), raw.nonce, bad_profile),
            entry(BULK_REG, targets[1].encode(), raw.nonce, nested),
            ie(IEI.REGISTRATION_ENTRY, twice + twice),
            entry(BULK_REG, targets[3].encode(), raw.nonce, fine)])
        await raw.send(frame(BULK_REG, 7, body))
        got, err = await bulk_answers(raw, 7)
        assert err is None
        assert [(e.result, e.failure_cause) for e in got] == [
            (1, FailureCause.INVALID_ENTRY)] * 3 + [(0, None)]
        assert got[3].ue_service_id == targets[3]
        assert (await single(raw, 8, DEREG, targets[3])).result == 0
        raw.close()
        await witness.progressed(1)
    check_rss(child, baseline, "repeated IEs")


# --- a stolen certificate ----------------------------------------------------------------------


async def test_stolen_certificate_of_a_cannot_touch_b_ues(abuse):
    """The attacker holds gateway A's (gw1) valid certificate and key, not the UE keys. UEs
    B-only are authorised for gateway B (gw2) alone; SHARED for both A and B."""
    dep, child, baseline = abuse
    async with Witness(dep, child.address, WITNESS_UES) as witness:
        b = await hello(dep, child.address, "gw2.example")
        b_nonce = b.nonce

        def entries(kind: MessageType, ues: list[str], nonce: bytes, key: bytes = KEY) -> bytes:
            op = REG if kind is BULK_REG else DEREG
            iei = IEI.REGISTRATION_ENTRY if kind is BULK_REG else IEI.DEREGISTRATION_ENTRY
            return b"".join(ie(iei, ie(IEI.UE_SERVICE_ID, u.encode())
                               + ie(IEI.UE_CREDENTIAL, proof(nonce, op, u, key))) for u in ues)

        # B registers its UEs legitimately.
        await b.send(frame(BULK_REG, 2, bulk_header_ies(BULK_REG, 200)
                           + entries(BULK_REG, B_ONLY + SHARED, b_nonce)))
        got, err = await bulk_answers(b, 2)
        assert err is None and len(got) == 200 and all(e.result == 0 for e in got)

        a = await hello(dep, child.address, "gw1.example")
        wrong_key = bytes(32)
        # Register B-only UEs: not authorised, even with the right UE key (a stolen key too).
        for tid, key in ((2, wrong_key), (3, KEY)):
            await a.send(frame(BULK_REG, tid, bulk_header_ies(BULK_REG, 100)
                               + entries(BULK_REG, B_ONLY, a.nonce, key)))
            got, err = await bulk_answers(a, tid)
            assert err is None
            assert {e.failure_cause for e in got} == {FailureCause.GATEWAY_NOT_AUTHORIZED}
        # De-register B's UEs, both kinds: registered via another gateway.
        await a.send(frame(BULK_DEREG, 4, bulk_header_ies(BULK_DEREG, 200)
                           + entries(BULK_DEREG, B_ONLY + SHARED, a.nonce, wrong_key)))
        got, err = await bulk_answers(a, 4)
        assert err is None
        assert {e.failure_cause for e in got} == {FailureCause.REGISTERED_VIA_OTHER_GATEWAY}
        # Take over the shared UEs: without K_ue, with B's proofs replayed, or with none.
        await a.send(frame(BULK_REG, 5, bulk_header_ies(BULK_REG, 100)
                           + entries(BULK_REG, SHARED, a.nonce, wrong_key)))
        got, err = await bulk_answers(a, 5)
        assert {e.failure_cause for e in got} == {FailureCause.AUTHENTICATION_FAILED}
        await a.send(frame(BULK_REG, 6, bulk_header_ies(BULK_REG, 100)
                           + entries(BULK_REG, SHARED, b_nonce)))
        got, err = await bulk_answers(a, 6)
        assert {e.failure_cause for e in got} == {FailureCause.AUTHENTICATION_FAILED}
        for tid, uid in enumerate(SHARED[:5], start=7):
            await a.send(frame(MessageType.UE_REGISTRATION_REQUEST, tid,
                               ie(IEI.UE_SERVICE_ID, uid.encode())))
            rsp = await read_message(a)
            assert rsp.failure_cause == FailureCause.AUTHENTICATION_FAILED
        a.close()
        # Nothing moved: B de-registers every one of its UEs successfully.
        await b.send(frame(BULK_DEREG, 3, bulk_header_ies(BULK_DEREG, 200)
                           + entries(BULK_DEREG, B_ONLY + SHARED, b_nonce)))
        got, err = await bulk_answers(b, 3)
        assert err is None and len(got) == 200 and all(e.result == 0 for e in got)
        b.close()
        await witness.progressed(1)
    check_rss(child, baseline, "stolen certificate")
