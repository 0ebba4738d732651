"""The 12-octet frame header and the frame buffer of wire-v1 §2.

The header's layout is declared once, `FrameHeaderStruct`; `FRAME_HEADER`, the `struct` the hot
paths use, is derived from it, and nothing outside this module packs or unpacks a header
(`encode_frame`, `decode_header`, `body_length_of`, `FrameBuffer`).

`FrameBuffer` checks version, reserved flags and the announced maximum body size as soon as a
header is complete, *before* any body octet is buffered for it (as h2's frame buffer does), so
a peer cannot make us hold more than one maximum-size frame.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import construct as cs

from .constants import (
    HEADER_SIZE,
    MAX_FRAME_SIZE_LIMIT,
    PROTOCOL_VERSION,
    RESERVED_FLAGS,
    FrameFlag,
)
from .errors import FrameTooLarge, InvalidFrame, UnsupportedVersion

# wire-v1 §2: the one declaration of the header's layout.
FrameHeaderStruct = cs.Struct(
    "version" / cs.Int8ub,
    "message_type" / cs.Int8ub,
    "flags" / cs.Int16ub,
    "transaction_id" / cs.Int32ub,
    "body_length" / cs.Int32ub,
)
# The same layout as a `struct`, read off the declaration: construct takes ~11 µs to parse a
# header, struct ~0.15 µs.
FRAME_HEADER = struct.Struct(
    ">" + "".join(sub.subcon.fmtstr.lstrip("<>=!") for sub in FrameHeaderStruct.subcons))
assert FRAME_HEADER.size == FrameHeaderStruct.sizeof() == HEADER_SIZE

_MORE = int(FrameFlag.MORE)

_new_header = tuple.__new__
# Compact the buffer once this many consumed octets sit at its front.
_COMPACT_AT = 1 << 16


class FrameHeader(NamedTuple):
    """A tuple: one is made per frame read, and `tuple.__new__` over the unpacked fields costs
    a quarter of a frozen dataclass's `__init__` (0.13 against 0.55 µs)."""

    version: int
    message_type: int
    flags: int
    transaction_id: int
    body_length: int

    @property
    def more(self) -> bool:
        # An int mask: `int & FrameFlag` goes through enum.Flag's operators (~1 µs a frame).
        return bool(self.flags & _MORE)


def encode_frame(
    message_type: int, transaction_id: int, body: bytes, *, more: bool = False
) -> bytes:
    """One frame: the header (MORE set when `more`) followed by `body`."""
    flags = FrameFlag.MORE if more else 0
    return (FRAME_HEADER.pack(PROTOCOL_VERSION, message_type, flags, transaction_id, len(body))
            + body)


def body_length_of(header: bytes | bytearray) -> int:
    """The body length a complete 12-octet header announces (no checks)."""
    return FRAME_HEADER.unpack(header)[4]


def decode_header(data: bytes) -> FrameHeader:
    """Decode 12 octets (no checks; see FrameBuffer for them)."""
    return _new_header(FrameHeader, FRAME_HEADER.unpack(data))


def check_header(header: FrameHeader, max_frame_size: int) -> None:
    """wire-v1 §2: version, reserved flags, announced maximum body size."""
    if header.version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"frame version {header.version}, only {PROTOCOL_VERSION} is spoken")
    if header.flags & RESERVED_FLAGS:
        raise InvalidFrame(f"reserved flag bits 0x{header.flags & RESERVED_FLAGS:04x} set")
    if header.body_length > max_frame_size:
        raise FrameTooLarge(
            f"frame body of {header.body_length} octets exceeds the maximum of {max_frame_size}"
        )


class FrameBuffer:
    """Bytes in; checked headers, bodies and IEs out. No I/O."""

    __slots__ = ("_buf", "_pos", "_skip", "max_frame_size")

    def __init__(self, max_frame_size: int) -> None:
        if not 1 <= max_frame_size <= MAX_FRAME_SIZE_LIMIT:
            raise ValueError(f"max_frame_size {max_frame_size} out of range")
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._pos = 0
        self._skip = 0

    def feed(self, data: bytes) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
        if data:
            self._buf += data

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    @property
    def empty(self) -> bool:
        """Nothing buffered, and nothing of an earlier frame still to skip."""
        return len(self._buf) == self._pos and not self._skip

    def read_header(self) -> FrameHeader | None:
        """The next frame header, checked, or None until 12 octets are there."""
        if len(self._buf) - self._pos < HEADER_SIZE:
            return None
        header = _new_header(FrameHeader, FRAME_HEADER.unpack_from(self._buf, self._pos))
        check_header(header, self.max_frame_size)
        self._advance(HEADER_SIZE)
        return header

    def read_exact(self, n: int) -> bytes | None:
        """`n` octets, or None until they are all there."""
        pos = self._pos
        if len(self._buf) - pos < n:
            return None
        data = bytes(self._buf[pos : pos + n])
        self._advance(n)
        return data

    def read_ie(self, limit: int) -> tuple[int, bytes] | tuple[()] | None:
        """The next IE within `limit` octets: (IEI, value), None if incomplete, or () when the
        IE would run past `limit` (malformed; the caller skips the rest of the body)."""
        buf = self._buf
        pos = self._pos
        have = len(buf) - pos
        if limit < 3:
            return ()
        if have < 3:
            return None
        length = (buf[pos + 1] << 8) | buf[pos + 2]
        if 3 + length > limit:
            return ()
        if have < 3 + length:
            return None
        end = pos + 3 + length
        item = (buf[pos], bytes(buf[pos + 3 : end]))
        # _advance(), written out: this runs once per bulk entry.
        if end >= _COMPACT_AT or end == len(buf):
            del buf[:end]
            self._pos = 0
        else:
            self._pos = end
        return item

    def read_run(self, limit: int, iei: int, most: int) -> tuple[list[bytes], int]:
        """Up to `most` consecutive complete IEs with IEI `iei` within `limit` octets: their
        values and the octets they took. Stops, consuming nothing of it, at the first IE that
        is incomplete, another IEI, or would run past `limit` (read_ie then says which)."""
        buf = self._buf
        pos = start = self._pos
        size = len(buf)
        values: list[bytes] = []
        append = values.append
        end_limit = pos + limit
        while len(values) < most:
            if size - pos < 3 or buf[pos] != iei:
                break
            end = pos + 3 + ((buf[pos + 1] << 8) | buf[pos + 2])
            if end > size or end > end_limit:
                break
            append(bytes(buf[pos + 3 : end]))
            pos = end
        used = pos - start
        if used:
            if pos >= _COMPACT_AT or pos == size:
                del buf[:pos]
                self._pos = 0
            else:
                self._pos = pos
        return values, used

    def clear(self) -> None:
        """Forget everything buffered (the connection is closed)."""
        self._buf = bytearray()
        self._pos = 0
        self._skip = 0

    def skip(self, n: int) -> None:
        """Discard `n` octets, including ones not received yet."""
        have = len(self._buf) - self._pos
        if n <= have:
            self._advance(n)
        else:
            self._advance(have)
            self._skip += n - have

    def _advance(self, n: int) -> None:
        self._pos += n
        if self._pos >= _COMPACT_AT or self._pos == len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
