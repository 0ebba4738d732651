"""Broken input never breaks the dissector: mutants of every vector, read by the real tshark.

Each mutant (octets flipped, IE lengths changed, bodies cut short or replaced by random IEs,
header fields randomised, a body length that lies) travels in a TCP stream of its own, cut at
random places. tshark must read them all with no Lua error and no exception; what is wrong
shows as expert infos. HOSTILE_SEED=N varies the mutants (as for tests/hostile).
"""

from __future__ import annotations

import os
import random

from tests.vectors import VECTORS
from tests.wireshark.pcap import Capture
from tests.wireshark.tools import decode, frames_of

SEED = int(os.environ.get("HOSTILE_SEED", "16"))
PER_VECTOR = 12


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
            iei = rng.choice([rng.randrange(256), 0x03, 0x0C, 0x0D, 0x01, 0x0B])
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
    for vector in VECTORS["valid"] + VECTORS["invalid"]:
        frame = frames_of(vector)
        for _ in range(PER_VECTOR):
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
