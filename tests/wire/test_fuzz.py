"""Random and mutated octets never raise anything but the package's own errors.

Decoders may raise only WireError subclasses; Session.next_event() may raise nothing at all (it
turns peer errors into ERROR frames and events). The checks themselves are wire.fuzz's targets,
the same ones atheris runs (docs/fuzzing.md); here Hypothesis feeds them.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.vectors import VECTORS
from wire import fuzz
from wire.constants import MessageType
from wire.errors import WireError
from wire.events import NEED_DATA, PAUSED
from wire.messages import ENTRY_SPECS, MESSAGE_SPECS, decode_body, decode_entry, decode_frames

SEEDS = {target: list(fuzz.seeds(target, VECTORS).values()) for target in fuzz.TARGETS}
VECTOR_BYTES = [bytes.fromhex(v["hex"]) for v in VECTORS["valid"] + VECTORS["invalid"]]

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def mutated(draw: Any, bases: list[bytes]) -> bytes:
    """A base input with a few byte-level edits (flip, insert, delete, cut, splice, repeat)."""
    data = bytearray(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["set", "insert", "delete", "cut", "splice", "repeat"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[pos:]
        elif op == "splice":
            data[pos:pos] = draw(st.sampled_from(bases))
        elif op == "repeat" and data:
            end = pos + draw(st.integers(1, 32))
            data[pos:pos] = data[pos:end]
    return bytes(data)


def test_seeds_exist_for_every_target() -> None:
    for target, seeds in SEEDS.items():
        assert len(seeds) >= 5, target
        for data in seeds:
            fuzz.TARGETS[target](data)


@pytest.mark.parametrize("target", list(fuzz.TARGETS))
@FUZZ
@given(data=st.data())
def test_mutated_seeds(target: str, data: st.DataObject) -> None:
    fuzz.TARGETS[target](data.draw(mutated(SEEDS[target])))


@pytest.mark.parametrize("target", list(fuzz.TARGETS))
@settings(FUZZ, max_examples=100)
@given(raw=st.binary(max_size=600))
def test_random_bytes(target: str, raw: bytes) -> None:
    fuzz.TARGETS[target](raw)


@FUZZ
@given(st.one_of(st.binary(max_size=400), mutated(VECTOR_BYTES)))
def test_decode_frames_raises_only_wire_errors(data: bytes) -> None:
    with contextlib.suppress(WireError):
        decode_frames(data)


@FUZZ
@given(st.sampled_from(list(MESSAGE_SPECS) + list(ENTRY_SPECS)),
       st.one_of(st.binary(max_size=300), mutated([v[12:] for v in VECTOR_BYTES])))
def test_decode_body_raises_only_wire_errors(kind: Any, body: bytes) -> None:
    try:
        if isinstance(kind, MessageType):
            decode_body(kind, 1, body)
        else:
            decode_entry(kind, body)
    except WireError:
        pass


@FUZZ
@given(st.sampled_from(["server", "gateway"]), st.booleans(),
       st.one_of(st.binary(max_size=400), mutated(VECTOR_BYTES)),
       st.lists(st.integers(1, 50), max_size=20))
def test_next_event_never_raises(role: str, established: bool, stream: bytes,
                                 chunks: list[int]) -> None:
    make = fuzz.new_server if role == "server" else fuzz.new_gateway
    session = make(established)
    pos = 0
    for size in [*chunks, len(stream)]:
        session.receive_data(stream[pos : pos + size], 2.0)
        pos += size
        while session.next_event() not in (NEED_DATA, PAUSED):
            pass
    session.handle_timer(1000.0)
    session.receive_data(b"", 1000.0)
    while session.next_event() not in (NEED_DATA, PAUSED):
        pass
    fuzz.check_sent(session.data_to_send())


def test_the_harness_catches_a_broken_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The targets fail when the code misbehaves (so the passing tests above mean something)."""
    import wire.ies

    def broken(iei: int, raw: bytes) -> Any:
        raise IndexError("boom")

    monkeypatch.setattr(wire.ies, "decode_value", broken)
    index = fuzz._message_kinds().index(("ie", 0x10))
    with pytest.raises(IndexError):
        fuzz.run_messages(bytes([index, 1]))
    monkeypatch.undo()
    monkeypatch.setattr(wire.ies, "decode_value", lambda iei, raw: 99)
    with pytest.raises(fuzz.FuzzFailure):
        fuzz.run_messages(bytes([index, 1]))


def test_the_harness_catches_chunking_differences(monkeypatch: pytest.MonkeyPatch) -> None:
    from wire.frames import FrameBuffer

    original = FrameBuffer.feed
    calls = {"n": 0}

    def forgetful(self: FrameBuffer, data: bytes) -> None:
        calls["n"] += 1
        if len(data) == 1 and calls["n"] % 7 == 3:
            return  # loses an octet now and then: only byte-by-byte feeding notices
        original(self, data)

    monkeypatch.setattr(FrameBuffer, "feed", forgetful)
    seed = next(s for s in SEEDS["session-server"] if s[0] == 1 and len(s) > 60)
    with pytest.raises(fuzz.FuzzFailure):
        fuzz.run_session_server(seed[:1] + b"\x00" + seed[2:])
