"""The frame header of wire-v1 §2: one declaration, and everything that packs or reads a header
agrees with it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire import fuzz
from wire.constants import HEADER_SIZE, MessageType
from wire.frames import (
    FRAME_HEADER,
    FrameBuffer,
    FrameHeaderStruct,
    body_length_of,
    decode_header,
    encode_frame,
)
from wire.messages import Keepalive, encode_message

U8, U16, U32 = st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF_FFFF)


@given(U8, U8, U16, U32, U32)
def test_the_struct_is_the_construct_declaration(version: int, mtype: int, flags: int,
                                                 tid: int, length: int) -> None:
    fields = {"version": version, "message_type": mtype, "flags": flags,
              "transaction_id": tid, "body_length": length}
    packed = FRAME_HEADER.pack(version, mtype, flags, tid, length)
    assert packed == FrameHeaderStruct.build(fields)
    parsed = FrameHeaderStruct.parse(packed)
    assert decode_header(packed) == decode_header(FrameHeaderStruct.build(parsed))
    assert body_length_of(packed) == length


@given(U8, U32, st.binary(max_size=40), st.booleans())
def test_encode_frame_reads_back(mtype: int, tid: int, body: bytes, more: bool) -> None:
    frame = encode_frame(mtype, tid, body, more=more)
    header = decode_header(frame[:HEADER_SIZE])
    assert (header.version, header.message_type, header.transaction_id) == (1, mtype, tid)
    assert header.more is more and header.flags == int(more)
    assert header.body_length == len(body) and frame[HEADER_SIZE:] == body
    buf = FrameBuffer(65_535)
    buf.feed(frame)
    if len(body) <= 65_535:
        assert buf.read_header() == header


def test_messages_frame_through_frames() -> None:
    """encode_message writes its header with frames.encode_frame (no second copy of it)."""
    import wire.messages

    assert wire.messages.encode_frame is encode_frame
    assert encode_message(Keepalive(9)) == encode_frame(MessageType.KEEPALIVE, 9, b"")


@pytest.mark.parametrize("mangle", [
    lambda f: b"\x02" + f[1:],  # version
    lambda f: f[:2] + b"\x80\x00" + f[4:],  # a reserved flag
    lambda f: f[:-1],  # shorter than its header says
    lambda f: f[:7],  # not even a header
], ids=["version", "reserved-flag", "short-body", "short-header"])
def test_the_fuzz_harness_reads_headers_with_frames(mangle: Callable[[bytes], bytes]) -> None:
    unknown_ie = b"\x7f\x00\x00"  # optional, skipped by the decoder
    good = encode_message(Keepalive(9)) + encode_frame(MessageType.KEEPALIVE_ACK, 9, unknown_ie)
    fuzz.check_sent(good)
    with pytest.raises(fuzz.FuzzFailure):
        fuzz.check_sent(mangle(good))
