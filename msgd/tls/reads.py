"""Bytes in from a TLS transport without a 256 KiB allocation per read.

uvloop's TLS transport hands a plain `asyncio.Protocol` its bytes by calling
`SSLObject.read(256 KiB)`, and CPython's ssl allocates a bytes object of the full size for
every call before it shrinks it to what was read. At that size glibc maps and unmaps the
memory each time (the daemon pins glibc's mmap threshold at 128 KiB for idle connections'
sake, msgd/server/main.py): 14-15 µs per read measured on the benchmark VM for a 120-octet
record, against 1.2 µs for the same read into an existing buffer (docs/performance.md,
"2026-12-07").
A connection of single requests pays it per request. Given a `BufferedProtocol`, uvloop (and
asyncio) reads into the buffer that `get_buffer` returns instead.

`TlsReads` is that protocol for classes written against `data_received(bytes)`: one buffer
per thread, shared by every connection of its event loop (a transport fills it and calls
`buffer_updated` before any other transport reads), copied out as bytes of what was read.
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["READ_BUFFER_SIZE", "TlsReads"]

READ_BUFFER_SIZE = 256 * 1024  # what uvloop asks of SSLObject.read for a plain Protocol


class _Buffer(threading.local):
    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_BUFFER_SIZE))


_buffer = _Buffer()


class TlsReads(asyncio.BufferedProtocol):
    """An asyncio.BufferedProtocol that calls `data_received` with the bytes of each read."""

    def get_buffer(self, sizehint: int) -> memoryview:
        return _buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_buffer.view[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError
