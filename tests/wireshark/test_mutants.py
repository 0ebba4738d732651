"""Broken input never breaks the dissector: mutants of every vector (the spec's v1 ones and
msgd's v1.1 ones, tests/wire/vectors_v1_1.json), read by the real tshark.

Each mutant travels in a TCP stream of its own, cut at random places; tshark must read them all
with no Lua error and no exception, and what is wrong shows as expert infos. Two sets: every IE
of every vector, at any depth, one octet shorter and one longer with the lengths around it
kept right (so the dissector's value checks, not its framing, meet the fault); and seeded
random mutants (octets flipped, lengths changed, bodies cut or replaced by random IEs, header
fields randomised, a body length that lies). HOSTILE_SEED=N varies the random ones (as for
tests/hostile).
"""

from __future__ import annotations

import os
import random

from tests.vectors import V1_1, VECTORS
from tests.wireshark.pcap import Capture
from tests.wireshark.tools import decode, frames_of, load_gen_tables
from wire.constants import IEI

SEED = int(os.environ.get("HOSTILE_SEED", "16"))
# Random mutants per vector: fewer for v1.1's, whose few shapes (records, a u16 list, one
# grouped IE) many vectors share, to keep the test's time.
PER_VECTOR = 12
PER_V1_1_VECTOR = 6


def mutate(frame: bytes, rng: random.Random) -> bytes:
    data = bytearray(frame)
    body = len(data) - 12
    kind = rng.randrange(6)
    if kind == 0 and body:  # flip octets of the body
        for _ in range(rng.randint(1, 3)):
            data[12 + rng.randrange(body)] ^= 1 << rng.randrange(8)
    elif kind == 1 and body > 3:  # an IE length (or whatever is there) changed
        at = 12 + rng.randrange(body - 2)
        data[at:at + 2] = rng.randrange(0x10000).to_bytes(2, "big")
    elif kind == 2 and body:  # the body cut short, the header told
        data = data[:12 + rng.randrange(body)]
        data[8:12] = (len(data) - 12).to_bytes(4, "big")
    elif kind == 3:  # a body of random IEs, some grouped, some with lying lengths
        out = bytearray()
        for _ in range(rng.randint(1, 8)):
            iei = rng.choice([rng.randrange(256), 0x03, 0x0C, 0x0D, 0x01, 0x0B, 0x20, 0x21,
                              0x22])
            value = bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
            length = len(value) if rng.random() < 0.8 else rng.randrange(0x10000)
            out += bytes([iei]) + length.to_bytes(2, "big") + value
        data = data[:12] + out
        data[8:12] = len(out).to_bytes(4, "big")
    elif kind == 4:  # header fields at random (type, flags, transaction id)
        data[1] = rng.randrange(256)
        data[2:4] = rng.randrange(0x10000).to_bytes(2, "big")
        data[4:8] = rng.randrange(1 << 32).to_bytes(4, "big")
    else:  # a body length that lies (the stream ends before the frame would)
        data[8:12] = rng.randrange(1 << 32).to_bytes(4, "big")
    return bytes(data)


def test_mutants_decode_without_lua_errors(tmp_path):
    rng = random.Random(SEED)
    capture = Capture()
    port = 42000
    for vector, mutants in ([(v, PER_VECTOR) for v in VECTORS["valid"] + VECTORS["invalid"]]
                            + [(v, PER_V1_1_VECTOR) for v in V1_1["valid"] + V1_1["invalid"]]):
        frame = frames_of(vector)
        for _ in range(mutants):
            data = mutate(frame, rng)
            stream = capture.stream(port)
            port += 1
            cuts = sorted(rng.randrange(1, len(data)) for _ in range(rng.randint(0, 3)))
            stream.send(data, from_client=rng.random() < 0.7, cuts=cuts)
            stream.close()
    streams = port - 42000
    # decode() fails on a Lua error, an exception mark or anything on tshark's stderr.
    packets = decode(capture.write(tmp_path / "mutants.pcap"), decode_as=True)
    pdus = [pdu for p in packets for pdu in p.pdus]
    flagged = [pdu for pdu in pdus if any(e.severity in ("warn", "error")
                                          for e in pdu.experts())]
    # Most mutants are decoded (those with a lying length wait for octets that never come)
    # and most of what is decoded is flagged.
    assert len(pdus) > streams * 0.6, (len(pdus), streams)
    assert len(flagged) > len(pdus) * 0.4, (len(flagged), len(pdus))


GROUPED = {IEI.NON_MSGIN5G_UE_PROFILE, IEI.REGISTRATION_ENTRY, IEI.REGISTRATION_RESPONSE_ENTRY,
           IEI.DEREGISTRATION_ENTRY, IEI.DEREGISTRATION_RESPONSE_ENTRY, IEI.LISTED_UE}


def ie_spans(body: bytes, base: int = 0) -> list[tuple[int, int, list[int]]]:
    """(offset of the IE, IEI, offsets of the IEs enclosing it) for every IE of `body`, at
    any depth of grouping."""
    out, at = [], 0
    while at + 3 <= len(body):
        iei, length = body[at], int.from_bytes(body[at + 1:at + 3], "big")
        out.append((base + at, iei, []))
        if iei in GROUPED:
            for inner, inner_iei, parents in ie_spans(body[at + 3:at + 3 + length],
                                                      base + at + 3):
                out.append((inner, inner_iei, [base + at, *parents]))
        at += 3 + length
    return out


def resized(frame: bytes, at: int, parents: list[int], delta: int) -> bytes:
    """`frame` with the value of the IE at body offset `at` made `delta` octets longer (a zero
    octet added, or its last octet dropped), every enclosing length and the body length told."""
    data = bytearray(frame)
    body_at = 12 + at
    length = int.from_bytes(data[body_at + 1:body_at + 3], "big")
    end = body_at + 3 + length
    if delta > 0:
        data[end:end] = b"\0"
    else:
        del data[end - 1]
    for offset in [at, *parents]:
        o = 12 + offset
        data[o + 1:o + 3] = (int.from_bytes(data[o + 1:o + 3], "big") + delta).to_bytes(2, "big")
    data[8:12] = (len(data) - 12).to_bytes(4, "big")
    return bytes(data)


def test_every_ie_one_octet_off(tmp_path):
    shapes = load_gen_tables().value_shape
    capture = Capture()
    cases = []  # (IEI, delta) per stream
    port = 43000
    for vector in VECTORS["valid"] + V1_1["valid"]:
        data = frames_of(vector)
        frames = []
        while data:
            size = 12 + int.from_bytes(data[8:12], "big")
            frames.append(data[:size])
            data = data[size:]
        for frame in frames:
            for at, iei, parents in ie_spans(frame[12:]):
                for delta in (-1, 1):
                    if delta < 0 and int.from_bytes(frame[12 + at + 1:12 + at + 3], "big") == 0:
                        continue
                    stream = capture.stream(port)
                    port += 1
                    stream.send(resized(frame, at, parents, delta), from_client=True,
                                cuts=(7,))
                    stream.close()
                    cases.append((iei, delta))
    by_stream: dict[int, list] = {}
    for packet in decode(capture.write(tmp_path / "resized.pcap"), decode_as=True):
        by_stream.setdefault(packet.stream, []).extend(packet.pdus)
    assert len(by_stream) == len(cases)
    for n, (iei, delta) in enumerate(cases):
        experts = [e.kind for pdu in by_stream[n] for e in pdu.experts()]
        known = iei in {int(i) for i in IEI}
        if known and shapes(IEI(iei))["kind"] in ("uint", "uints", "bytes", "records", "list"):
            # A fixed-size value one octet off is always flagged as such, and so is a list
            # of records or u16 (its length no longer a multiple of their size).
            assert "msgin5g.expert.ie_length" in experts, (IEI(iei).name, delta, experts)
