"""The frame clock of a connection (slow-drip defence), without I/O: where frames begin and
end in the octets read, and since when a frame has been incomplete.

A frame that takes longer than [limits] frame_timeout to arrive whole closes the connection
(docs/protocol.md, Decisions). Only the boundaries are followed here (12-octet header, then
`body length` octets); every check of the octets is wire.session's.
"""

from __future__ import annotations

from wire.constants import HEADER_SIZE
from wire.frames import body_length_of

__all__ = ["FrameClock"]


class FrameClock:
    """`since` is when the frame being received began (None: at a frame boundary)."""

    __slots__ = ("_head", "_left", "since")

    def __init__(self) -> None:
        self._left = 0  # octets still due in the frame being received
        self._head = bytearray()  # a partial header
        self.since: float | None = None

    def follow(self, data: bytes, now: float) -> tuple[int, bool]:
        """Account for `data` read at `now`. Returns (headers completed in it, whether the
        clock (re)started now: an incomplete frame began in this read)."""
        left = self._left
        head = self._head
        size = len(data)
        pos = 0
        began = False  # the last frame begun, if any, began in this read
        frames = 0
        while pos < size:
            if left:
                take = min(left, size - pos)
                left -= take
                pos += take
            else:
                began = began or not head
                take = min(HEADER_SIZE - len(head), size - pos)
                head += data[pos : pos + take]
                pos += take
                if len(head) == HEADER_SIZE:
                    left = body_length_of(head)
                    head.clear()
                    frames += 1
        self._left = left
        if not left and not head:
            self.since = None
            return frames, False
        if began or self.since is None:
            self.since = now
            return frames, True
        return frames, False

    def restart(self, now: float) -> bool:
        """Reading resumes after we paused it: octets of a partial frame waited in the kernel
        meanwhile, and the clock counts only time spent reading. True if a frame is open."""
        if self.since is None:
            return False
        self.since = now
        return True
