"""The registry's blob formats: journal rows (one per group commit) and snapshot chunks.

Pure encoding and decoding, no SQLite: `writer` encodes a batch of changes as one journal row,
`snapshot` writes and loads the chunks and replays the journal. The layouts and the reasons
for them are in docs/registry.md ("Blobs"). Every blob is

    u8 format version (1) | u32 CRC-32 of the payload | payload

with little-endian integers. The CRC catches damage that PRAGMA quick_check cannot see (it
checks b-trees, not our bytes).
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator
from typing import Any, TypeAlias

from msgd.errors import MsgdError

__all__ = [
    "BlobFormatError",
    "Op",
    "Value",
    "apply_journal",
    "decode_gateway_names",
    "decode_snapshot_chunk",
    "encode_batch",
    "encode_gateway_names",
    "encode_snapshot_chunk",
    "fold_journal",
    "load_snapshot_chunk",
]

# A registration value in memory: the interned gateway name when there is no profile (the
# common case costs no object per UE), else (gateway, profile).
Value: TypeAlias = "str | tuple[str, bytes]"
# One change: (ue_service_id, new value or None for de-registration, value it replaced).
Op: TypeAlias = "tuple[str, Value | None, Value | None]"

# Journal op kinds.
_DEREGISTER = 0
_REGISTER = 1
_REGISTER_PROFILE = 2

_BLOB_VERSION = 1
_HEADER = struct.Struct("<BI")
_U32 = struct.Struct("<I")
_JOURNAL_HEAD = struct.Struct("<IIII")  # ops, first new gateway index, new gateways, profiles
_SNAPSHOT_HEAD = struct.Struct("<II")  # registrations, profiles
_U32_CODE = next(code for code in "ILH" if array(code).itemsize == 4)
_SWAP = sys.byteorder != "little"


class BlobFormatError(MsgdError):
    """A blob does not decode; the loader turns it into RegistryCorruptError naming the file."""


def _u32s(values: Iterable[int]) -> bytes:
    packed = array(_U32_CODE, values)
    if _SWAP:
        packed.byteswap()
    return packed.tobytes()


def _seal(parts: list[bytes]) -> bytes:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return _HEADER.pack(_BLOB_VERSION, crc) + b"".join(parts)


def _pack_strs(strs: list[str]) -> list[bytes]:
    """Encode strings compactly; the common case decodes with one split() at C speed.

    Mode 0 joins with NUL (UE Service IDs cannot hold C0 controls, wire-v1 §3); mode 1, with a
    length array, is the fallback for strings that do contain NUL, which the registry does not
    forbid. surrogatepass makes every Python str encodable, so encoding never fails a batch.
    """
    joined = "\x00".join(strs)
    if joined.count("\x00") == max(len(strs) - 1, 0):
        data = joined.encode("utf-8", "surrogatepass")
        return [b"\x00", _U32.pack(len(data)), data]
    data = "".join(strs).encode("utf-8", "surrogatepass")
    return [b"\x01", _U32.pack(len(data)), _u32s(map(len, strs)), data]


class _Reader:
    """Bounds-checked cursor over one blob; every shortfall is a BlobFormatError."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes, pos: int) -> None:
        self.buf = buf
        self.pos = pos

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if size < 0 or end > len(self.buf):
            raise BlobFormatError("truncated")
        chunk = self.buf[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[Any, ...]:
        return layout.unpack(self.take(layout.size))

    def u32s(self, count: int) -> array[int]:
        values = array(_U32_CODE)
        values.frombytes(self.take(4 * count))
        if _SWAP:
            values.byteswap()
        return values

    def strs(self, count: int) -> list[str]:
        mode = self.take(1)[0]
        (size,) = self.unpack(_U32)
        if mode == 0:
            text = self.take(size).decode("utf-8", "surrogatepass")
            out = text.split("\x00") if count else []
            if not count and text:
                raise BlobFormatError("text where none was announced")
        elif mode == 1:
            lengths = self.u32s(count)
            text = self.take(size).decode("utf-8", "surrogatepass")
            out, pos = [], 0
            for length in lengths:
                out.append(text[pos : pos + length])
                pos += length
            if pos != len(text):
                raise BlobFormatError("string lengths do not add up")
        else:
            raise BlobFormatError(f"unknown string mode {mode}")
        if len(out) != count:
            raise BlobFormatError("string count mismatch")
        return out

    def blobs(self, count: int) -> list[bytes]:
        lengths = self.u32s(count)
        data = self.take(sum(lengths))
        out, pos = [], 0
        for length in lengths:
            out.append(data[pos : pos + length])
            pos += length
        return out

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise BlobFormatError("trailing octets")


def _open_blob(blob: object) -> _Reader:
    if not isinstance(blob, bytes) or len(blob) < _HEADER.size:
        raise BlobFormatError("not a blob")
    version, crc = _HEADER.unpack_from(blob)
    if version != _BLOB_VERSION:
        raise BlobFormatError(f"unknown blob format {version}")
    if zlib.crc32(memoryview(blob)[_HEADER.size :]) != crc:
        raise BlobFormatError("checksum mismatch")
    return _Reader(blob, _HEADER.size)


def encode_batch(
    batch: list[Op], gw_index: dict[str, int], names: list[str], first_new: int
) -> tuple[bytes, int]:
    """Encode a group commit as one journal blob; returns it and the gateway count it defines.

    Gateways are referenced by index; names the journal does not yet hold durably (index >=
    first_new) travel in the same blob, so one row stays self-contained.
    """
    n_names = len(names)  # the loop thread may append meanwhile; every op here is below this
    kinds = bytearray()
    gws: list[int] = []
    ues: list[str] = []
    profiles: list[bytes] = []
    for ue, new, _old in batch:
        ues.append(ue)
        if new is None:
            kinds.append(_DEREGISTER)
            gws.append(0)
        elif new.__class__ is str:
            kinds.append(_REGISTER)
            gws.append(gw_index[new])  # type: ignore[index]
        else:
            kinds.append(_REGISTER_PROFILE)
            gws.append(gw_index[new[0]])
            profiles.append(new[1])  # type: ignore[arg-type]
    new_names = names[first_new:n_names]
    parts = [
        _JOURNAL_HEAD.pack(len(batch), first_new, len(new_names), len(profiles)),
        *_pack_strs(new_names),
        bytes(kinds),
        _u32s(gws),
        *_pack_strs(ues),
        _u32s(map(len, profiles)),
        *profiles,
    ]
    return _seal(parts), n_names


def _read_journal(
    blob: object, names: list[str]
) -> tuple[int, bytes, array[int], list[str], list[bytes]]:
    """Decode one journal row, extending `names` with the gateways it introduces."""
    reader = _open_blob(blob)
    n_ops, first_new, n_new, n_profiles = reader.unpack(_JOURNAL_HEAD)
    new_names = reader.strs(n_new)
    if first_new != len(names):
        raise BlobFormatError("gateway table out of step")
    names.extend(new_names)
    kinds = reader.take(n_ops)
    gws = reader.u32s(n_ops)
    ues = reader.strs(n_ops)
    profiles = reader.blobs(n_profiles)
    reader.end()
    return n_ops, kinds, gws, ues, profiles


def apply_journal(blob: object, regs: dict[str, Value], names: list[str]) -> int:
    """Replay one journal row into `regs`; returns the number of ops."""
    n_ops, kinds, gws, ues, profiles = _read_journal(blob, names)
    next_profile = 0
    try:
        for kind, gw, ue in zip(kinds, gws, ues, strict=True):
            if kind == _REGISTER:
                regs[ue] = names[gw]
            elif kind == _REGISTER_PROFILE:
                regs[ue] = (names[gw], profiles[next_profile])
                next_profile += 1
            elif kind == _DEREGISTER:
                regs.pop(ue, None)
            else:
                raise BlobFormatError(f"unknown op {kind}")
    except IndexError:
        raise BlobFormatError("index out of range") from None
    if next_profile != len(profiles):
        raise BlobFormatError("profile count mismatch")
    return n_ops


def fold_journal(
    blob: object, changes: dict[str, Value | None], names: list[str], *, slice_ops: int = 2_048
) -> Iterator[int]:
    """Fold one journal row into `changes`: each UE's latest value, None where de-registered.

    apply_journal() with tombstones: online compaction merges the changes into the old
    snapshot, where a de-registration must remove an entry that `changes` never held. A row
    can hold 20 000 ops, so this yields the number of ops folded after every `slice_ops`,
    and the caller may pause between slices (the row is decoded once, up front).
    """
    n_ops, kinds, gws, ues, profiles = _read_journal(blob, names)
    next_profile = 0
    for start in range(0, n_ops, slice_ops):
        stop = min(n_ops, start + slice_ops)
        try:
            for kind, gw, ue in zip(kinds[start:stop], gws[start:stop], ues[start:stop],
                                    strict=True):
                if kind == _REGISTER:
                    changes[ue] = names[gw]
                elif kind == _REGISTER_PROFILE:
                    changes[ue] = (names[gw], profiles[next_profile])
                    next_profile += 1
                elif kind == _DEREGISTER:
                    changes[ue] = None
                else:
                    raise BlobFormatError(f"unknown op {kind}")
        except IndexError:
            raise BlobFormatError("index out of range") from None
        yield stop - start
    if next_profile != len(profiles):
        raise BlobFormatError("profile count mismatch")


def encode_snapshot_chunk(
    keys: list[str], values: Iterable[Value], gw_index: dict[str, int]
) -> bytes:
    """One snapshot chunk of the registrations keys[i] -> values[i].

    Parallel lists rather than (key, value) pairs: online compaction builds them while msgd
    runs, and a million short-lived pair tuples would only feed the garbage collector.
    """
    gws: list[int] = []
    positions: list[int] = []
    profiles: list[bytes] = []
    for position, value in enumerate(values):
        if value.__class__ is str:
            gws.append(gw_index[value])  # type: ignore[index]
        else:
            gws.append(gw_index[value[0]])
            positions.append(position)
            profiles.append(value[1])  # type: ignore[arg-type]
    if len(gws) != len(keys):
        raise ValueError("keys and values differ in length")
    parts = [
        _SNAPSHOT_HEAD.pack(len(keys), len(profiles)),
        *_pack_strs(keys),
        _u32s(gws),
        _u32s(positions),
        _u32s(map(len, profiles)),
        *profiles,
    ]
    return _seal(parts)


def _read_snapshot_chunk(
    blob: object, names: list[str]
) -> tuple[list[str], array[int], array[int], list[bytes]]:
    reader = _open_blob(blob)
    count, n_profiles = reader.unpack(_SNAPSHOT_HEAD)
    keys = reader.strs(count)
    gws = reader.u32s(count)
    positions = reader.u32s(n_profiles)
    profiles = reader.blobs(n_profiles)
    reader.end()
    if gws and max(gws) >= len(names):
        raise BlobFormatError("gateway index out of range")
    if positions and max(positions) >= count:
        raise BlobFormatError("profile position out of range")
    return keys, gws, positions, profiles


def load_snapshot_chunk(blob: object, regs: dict[str, Value], names: list[str]) -> None:
    keys, gws, positions, profiles = _read_snapshot_chunk(blob, names)
    before = len(regs)
    # The bulk of a start: dict built from zip/map without a Python-level loop.
    regs.update(zip(keys, map(names.__getitem__, gws), strict=True))
    for position, profile in zip(positions, profiles, strict=True):
        regs[keys[position]] = (names[gws[position]], profile)
    if len(regs) - before != len(keys):
        raise BlobFormatError("a registration appears twice")


def decode_snapshot_chunk(blob: object, names: list[str]) -> tuple[list[str], list[Value]]:
    """A snapshot chunk as parallel lists of UE ids and values (online compaction reads the
    old snapshot through it without building a dict of it)."""
    keys, gws, positions, profiles = _read_snapshot_chunk(blob, names)
    values: list[Value] = list(map(names.__getitem__, gws))
    for position, profile in zip(positions, profiles, strict=True):
        values[position] = (names[gws[position]], profile)
    return keys, values


def encode_gateway_names(names: list[str]) -> bytes:
    """The gateway names a snapshot's indexes refer to (meta `snapshot_gateways`)."""
    return _seal([_U32.pack(len(names)), *_pack_strs(names)])


def decode_gateway_names(blob: object) -> list[str]:
    """The names encode_gateway_names() wrote."""
    reader = _open_blob(blob)
    (n_names,) = reader.unpack(_U32)
    names = reader.strs(n_names)
    reader.end()
    return names
