"""Bulk messages across frames (wire-v1 §5 Fragmentation): the layout, a reader and a writer.

A bulk message is the indicator, the Number of individual entries, then that many entries,
cut into frames of the same type and transaction id; every frame but the last has MORE, and an
entry never spans two frames. `BulkReader` follows the incoming side IE by IE, so a bulk is
never held whole; `BulkWriter` frames the outgoing side entry by entry. Both are used by the
session (each direction of a bulk transaction) and by the whole-message helpers of `messages`
(`encode_bulk`, `decode_frames`).

This module sits below `messages`: it knows where entries go, not what they contain. The
reader is given the entry decoders (`messages.ENTRY_DECODERS`) and the writer takes entries
already encoded as IEs (`messages.encode_entry`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .constants import COMPREHENSION_REQUIRED, IEI, MessageType
from .errors import InvalidMessage, LocalProtocolError, UnknownMandatoryIE
from .frames import encode_frame
from .ies import KNOWN_IEIS, decode_value, encode_ie


@dataclass(frozen=True)
class BulkSpec:
    """Bulk message layout (wire-v1 §5): indicator, Number of individual entries, entries.
    v1.1's LIST RESPONSE (docs/protocol.md §6.2) has the same layout without an indicator."""

    indicator: IEI | None
    entry: IEI


BULK_SPECS: dict[MessageType, BulkSpec] = {
    MessageType.BULK_REGISTRATION_REQUEST: BulkSpec(
        IEI.BULK_REGISTRATION_INDICATOR, IEI.REGISTRATION_ENTRY),
    MessageType.BULK_REGISTRATION_RESPONSE: BulkSpec(
        IEI.BULK_REGISTRATION_RESPONSE_INDICATOR, IEI.REGISTRATION_RESPONSE_ENTRY),
    MessageType.BULK_DEREGISTRATION_REQUEST: BulkSpec(
        IEI.BULK_DEREGISTRATION_INDICATOR, IEI.DEREGISTRATION_ENTRY),
    MessageType.BULK_DEREGISTRATION_RESPONSE: BulkSpec(
        IEI.BULK_DEREGISTRATION_RESPONSE_INDICATOR, IEI.DEREGISTRATION_RESPONSE_ENTRY),
    MessageType.LIST_RESPONSE: BulkSpec(None, IEI.LISTED_UE),
}


def bulk_header_ies(message_type: MessageType, count: int) -> bytes:
    """The IEs that open a bulk message's first frame: its indicator and the number."""
    spec = BULK_SPECS[message_type]
    number = encode_ie(IEI.NUMBER_OF_INDIVIDUAL_ENTRIES, count.to_bytes(4, "big"))
    if spec.indicator is None:
        return number
    return encode_ie(spec.indicator, b"\x01") + number


# One entry's value -> the entry, or an EntryError (INVALID_ENTRY); never raises.
EntryDecoder = Callable[[bytes], Any]


class BulkReader:
    """Streams the IEs of one incoming bulk message across its frames.

    `start_frame()` is called for each frame, `feed_ie()` for each complete IE of it. It returns
    ("count", n) once, then ("entry", obj) or ("entry", EntryError) per entry, or None for a
    skipped unknown IE. A broken structure raises a MessageError, which ends the transaction.
    Once the count is known (`phase == 2`), the session hands an IE whose IEI is `entry_iei`
    straight to `decode_entry` (its hot path) instead of `feed_ie`.
    """

    __slots__ = ("count", "decode_entry", "entries", "entry_iei", "first_frame",
                 "message_type", "phase", "spec", "type_name")

    def __init__(self, message_type: MessageType,
                 entry_decoders: Mapping[IEI, EntryDecoder]) -> None:
        self.message_type = message_type
        self.spec = BULK_SPECS[message_type]
        self.entry_iei = int(self.spec.entry)
        self.type_name = message_type.name
        # 0: expect indicator, 1: expect number, 2: entries
        self.phase = 0 if self.spec.indicator is not None else 1
        self.count = -1
        self.entries = 0
        self.first_frame = True
        self.decode_entry = entry_decoders[self.spec.entry]

    def start_frame(self, first: bool) -> None:
        self.first_frame = first

    def end_frame(self) -> None:
        if self.phase < 2:
            raise InvalidMessage(f"{self.type_name}: indicator and Number of entries missing")

    def feed_entry(self, raw: bytes) -> Any:
        """One entry's value: the decoded entry, or an EntryError (INVALID_ENTRY)."""
        self.entries += 1
        return self.decode_entry(raw)

    def feed_ie(self, iei: int, raw: bytes) -> tuple[str, Any] | None:
        if iei == self.entry_iei and self.phase == 2:
            return ("entry", self.feed_entry(raw))
        spec = self.spec
        if self.phase == 0 and iei == spec.indicator and self.first_frame:
            decode_value(iei, raw)
            self.phase = 1
            return None
        if self.phase == 1 and iei == IEI.NUMBER_OF_INDIVIDUAL_ENTRIES:
            self.count = decode_value(iei, raw)
            self.phase = 2
            return ("count", self.count)
        if iei in KNOWN_IEIS:
            raise InvalidMessage(
                f"{self.type_name}: IE {IEI(iei).name} out of place (entry {self.entries})")
        if iei & COMPREHENSION_REQUIRED:
            raise UnknownMandatoryIE(f"{self.type_name}: unknown IEI 0x{iei:02x}")
        return None


class BulkWriter:
    """Frames one outgoing bulk message: entry IEs in, frames out.

    The first frame opens with `bulk_header_ies`; `add()` packs entries greedily and hands back
    a frame (MORE set) whenever the next entry would not fit `max_frame_size`; `flush()` cuts a
    frame (MORE set) from whatever is queued, so a streamed bulk need not wait for a full frame;
    `finish()` gives the last frame (MORE clear), and `end_early()` an empty one when the peer
    ended the transaction first. `frames` counts the frames handed out; `entry_iei` is the IEI
    of the entries this message carries. Entries are not counted against the announced number
    here, nor checked: the writer's user does that.
    """

    __slots__ = ("_buf", "entry_iei", "frames", "max_frame_size", "message_type",
                 "transaction_id")

    def __init__(self, message_type: MessageType, transaction_id: int, count: int,
                 max_frame_size: int) -> None:
        self.message_type = message_type
        self.entry_iei = BULK_SPECS[message_type].entry
        self.transaction_id = transaction_id
        self.max_frame_size = max_frame_size
        self.frames = 0
        self._buf = bytearray(bulk_header_ies(message_type, count))

    def add(self, ie: bytes) -> bytes | None:
        """Queue one entry IE; the frame it closed (MORE set) when it did not fit, else None."""
        buf = self._buf
        frame = None
        if len(buf) + len(ie) > self.max_frame_size:
            if len(ie) > self.max_frame_size:
                raise LocalProtocolError("one entry does not fit the maximum frame size")
            frame = self._cut(more=True)
            buf = self._buf
        buf += ie
        return frame

    def flush(self) -> bytes | None:
        """What is queued as a frame with MORE set; None when nothing is."""
        if not self._buf:
            return None
        return self._cut(more=True)

    def finish(self) -> bytes:
        """The last frame (MORE clear), with what is still queued (possibly nothing)."""
        return self._cut(more=False)

    def end_early(self) -> bytes | None:
        """The peer ended the transaction before our last fragment: an empty last fragment
        (what is queued is dropped), so that the peer stops discarding the ones to come
        (docs/protocol.md, "Ending a bulk early"). None when no fragment went out at all."""
        if not self.frames:
            return None
        self._buf = bytearray()
        return self._cut(more=False)

    def _cut(self, *, more: bool) -> bytes:
        frame = encode_frame(self.message_type, self.transaction_id, bytes(self._buf), more=more)
        self._buf = bytearray()
        self.frames += 1
        return frame


__all__ = [
    "BULK_SPECS",
    "BulkReader",
    "BulkSpec",
    "BulkWriter",
    "EntryDecoder",
    "bulk_header_ies",
]
