"""Information elements of wire-v1 §3, declared once with `construct`.

The `construct` declarations below are the single source of truth for every IE value. Two
decoders are derived from them:

* the *reference* decoder parses with construct itself (interpreted, never compiled: construct's
  docs warn compiled parsers skip checks on untrusted data);
* the *fast* decoder is generated from the same declarations by `_fast_codec()`, which reads the
  struct format, fixed length or text limits off each construct object. A differential fuzz test
  (tests/wire/test_differential.py) holds the two to the same results on every input.
"""

from __future__ import annotations

import itertools
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import construct as cs

from .constants import (
    APPLICATION_DATA_MAX,
    BUCKET_BITS_MAX,
    CREDENTIAL_SIZE,
    DIAGNOSTIC_MAX,
    DIGEST_SIZE,
    IEI,
    NODE_NAME_MAX,
    NONCE_SIZE,
    PROFILE_MAX,
    TRIGGERING_UE_IDENTIFIER_MAX,
    UE_HASH_SIZE,
    UE_SERVICE_ID_MAX,
    GatewayType,
    Result,
    TriggeringProtocol,
    UeType,
)
from .errors import InvalidMessage

# wire-v1 §3: IE = IEI (u8) | length (u16) | value.
RawIE = cs.Struct("iei" / cs.Int8ub, "value" / cs.Prefixed(cs.Int16ub, cs.GreedyBytes))
# Without Terminated, GreedyRange silently drops a malformed tail (style.md, "two traps").
RawIEList = cs.FocusedSeq("ies", "ies" / cs.GreedyRange(RawIE), cs.Terminated)

IE_HEADER = struct.Struct(">BH")
IE_VALUE_MAX = 0xFFFF

# wire-v1 §3: "no C0/C1 control characters" (U+0000–U+001F and U+0080–U+009F).
_CONTROL = re.compile("[\x00-\x1f\x80-\x9f]")


class Utf8Text(cs.Adapter):
    """UTF-8 text of `min_len`..`max_len` octets, optionally without C0/C1 controls."""

    def __init__(self, min_len: int, max_len: int, *, no_controls: bool) -> None:
        super().__init__(cs.GreedyBytes)
        self.min_len = min_len
        self.max_len = max_len
        self.no_controls = no_controls

    def _decode(self, obj: bytes, context: Any, path: str) -> str:
        return _decode_text(obj, self.min_len, self.max_len, self.no_controls)

    def _encode(self, obj: str, context: Any, path: str) -> bytes:
        data = obj.encode("utf-8")
        _decode_text(data, self.min_len, self.max_len, self.no_controls)
        return data


class BoundedBytes(cs.Adapter):
    """Opaque octets of at most `max_len`."""

    def __init__(self, max_len: int) -> None:
        super().__init__(cs.GreedyBytes)
        self.max_len = max_len

    def _decode(self, obj: bytes, context: Any, path: str) -> bytes:
        if len(obj) > self.max_len:
            raise cs.ValidationError(f"more than {self.max_len} octets", path=path)
        return bytes(obj)

    def _encode(self, obj: bytes, context: Any, path: str) -> bytes:
        return self._decode(obj, context, path)


def _decode_text(data: bytes, min_len: int, max_len: int, no_controls: bool) -> str:
    if not min_len <= len(data) <= max_len:
        raise cs.ValidationError(f"length {len(data)} outside {min_len}..{max_len} octets")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise cs.ValidationError("not UTF-8") from exc
    if no_controls and _CONTROL.search(text):
        raise cs.ValidationError("control character")
    return text


class OneOfValues(cs.Validator):
    """A value restricted to a set (construct's OneOf, keeping the set readable)."""

    def __init__(self, subcon: cs.Construct, valids: frozenset[int]) -> None:
        super().__init__(subcon)
        self.valids = valids

    def _validate(self, obj: Any, context: Any, path: str) -> bool:
        return obj in self.valids


class Records(cs.Adapter):
    """One or more records of `size` octets, kept as the octets (Bucket digests, v1.1)."""

    def __init__(self, size: int) -> None:
        super().__init__(cs.GreedyBytes)
        self.size = size

    def _decode(self, obj: bytes, context: Any, path: str) -> bytes:
        if not obj or len(obj) % self.size:
            raise cs.ValidationError(f"{len(obj)} octets: not n >= 1 records of {self.size}",
                                     path=path)
        return bytes(obj)

    def _encode(self, obj: bytes, context: Any, path: str) -> bytes:
        return self._decode(obj, context, path)


class AscendingU16s(cs.Adapter):
    """One or more u16, strictly ascending (Bucket list, v1.1). Whether each is below 2^b
    depends on the message's Bucket bits and is checked with the message (messages.py)."""

    def __init__(self) -> None:
        super().__init__(cs.GreedyRange(cs.Int16ub))

    def _decode(self, obj: Any, context: Any, path: str) -> tuple[int, ...]:
        values = tuple(obj)
        _check_ascending(values)
        return values

    def _encode(self, obj: Any, context: Any, path: str) -> list[int]:
        values = tuple(obj)
        _check_ascending(values)
        return list(values)


def _check_ascending(values: tuple[int, ...]) -> None:
    problem = _ascending_problem(values)
    if problem:
        raise cs.ValidationError(problem)


def _ascending_problem(values: tuple[int, ...]) -> str | None:
    if not values:
        return "empty"
    if any(a >= b for a, b in itertools.pairwise(values)):
        return "not strictly ascending"
    return None


def _one_of(subcon: cs.Construct, enum: Any) -> cs.Construct:
    return OneOfValues(subcon, frozenset(int(v) for v in enum))


Indicator = OneOfValues(cs.Int8ub, frozenset({1}))
Flag = OneOfValues(cs.Int8ub, frozenset({0, 1}))

# Grouped IEs carry an IE list; their content is checked by the group specs in messages.py.
Grouped = cs.GreedyBytes

# IEI -> construct for the value. This table *is* wire-v1 §3.
IE_VALUE: dict[IEI, cs.Construct] = {
    # UE Service ID: 0 octets are legal on the wire only in a response entry answering an entry
    # that had none; messages.py enforces the 1-octet minimum everywhere else.
    IEI.UE_SERVICE_ID: Utf8Text(0, UE_SERVICE_ID_MAX, no_controls=True),
    IEI.UE_CREDENTIAL: cs.Bytes(CREDENTIAL_SIZE),
    IEI.NON_MSGIN5G_UE_PROFILE: Grouped,
    IEI.REGISTRATION_RESULT: _one_of(cs.Int8ub, Result),
    IEI.DEREGISTRATION_RESULT: _one_of(cs.Int8ub, Result),
    IEI.FAILURE_CAUSE: cs.Int8ub,
    IEI.BULK_REGISTRATION_INDICATOR: Indicator,
    IEI.BULK_REGISTRATION_RESPONSE_INDICATOR: Indicator,
    IEI.BULK_DEREGISTRATION_INDICATOR: Indicator,
    IEI.BULK_DEREGISTRATION_RESPONSE_INDICATOR: Indicator,
    IEI.NUMBER_OF_INDIVIDUAL_ENTRIES: cs.Int32ub,
    IEI.REGISTRATION_ENTRY: Grouped,
    IEI.REGISTRATION_RESPONSE_ENTRY: Grouped,
    IEI.DEREGISTRATION_ENTRY: Grouped,
    IEI.DEREGISTRATION_RESPONSE_ENTRY: Grouped,
    IEI.PROTOCOL_VERSION: cs.Int8ub,
    IEI.SERVER_NONCE: cs.Bytes(NONCE_SIZE),
    IEI.MAXIMUM_FRAME_SIZE: cs.Int32ub,
    IEI.MAXIMUM_BULK_ENTRIES: cs.Int32ub,
    IEI.MAXIMUM_OUTSTANDING_TRANSACTIONS: cs.Int16ub,
    IEI.KEEPALIVE_INTERVAL: cs.Int32ub,
    IEI.NODE_NAME: Utf8Text(1, NODE_NAME_MAX, no_controls=False),
    IEI.BULK_ALLOWED: Flag,
    IEI.RETRY_AFTER: cs.Int32ub,
    IEI.ERROR_CAUSE: cs.Int8ub,
    IEI.DIAGNOSTIC: Utf8Text(0, DIAGNOSTIC_MAX, no_controls=False),
    IEI.GATEWAY_TYPE: _one_of(cs.Int8ub, GatewayType),
    IEI.UE_AUTHENTICATION_REQUIRED: Flag,
    IEI.UE_TYPE: _one_of(cs.Int8ub, UeType),
    IEI.TRIGGERING_UE_IDENTIFIER: Utf8Text(1, TRIGGERING_UE_IDENTIFIER_MAX, no_controls=True),
    IEI.TRIGGERING_PORT: cs.Int16ub,
    IEI.TRIGGERING_PROTOCOL: _one_of(cs.Int8ub, TriggeringProtocol),
    IEI.COMMUNICATION_AVAILABILITY: cs.Sequence(cs.Int32ub, cs.Int32ub),
    IEI.MAXIMUM_SEGMENT_SIZE: cs.Int32ub,
    IEI.APPLICATION_DATA: BoundedBytes(APPLICATION_DATA_MAX),
    # v1.1, registry sync (docs/protocol.md §6.2).
    IEI.SYNC_SUPPORTED: Indicator,
    IEI.BUCKET_BITS: OneOfValues(cs.Int8ub, frozenset(range(BUCKET_BITS_MAX + 1))),
    IEI.FIRST_BUCKET: cs.Int16ub,
    IEI.BUCKET_DIGESTS: Records(DIGEST_SIZE),
    IEI.BUCKET_LIST: AscendingU16s(),
    IEI.LISTED_UE: Grouped,
    IEI.UE_HASH: cs.Bytes(UE_HASH_SIZE),
    IEI.RELEASE: Indicator,
}

# wire-v1 §3: the profile is "at most 2 048 octets".
GROUP_VALUE_MAX: dict[IEI, int] = {IEI.NON_MSGIN5G_UE_PROFILE: PROFILE_MAX}
GROUPED = frozenset(
    {
        IEI.NON_MSGIN5G_UE_PROFILE,
        IEI.REGISTRATION_ENTRY,
        IEI.REGISTRATION_RESPONSE_ENTRY,
        IEI.DEREGISTRATION_ENTRY,
        IEI.DEREGISTRATION_RESPONSE_ENTRY,
        IEI.LISTED_UE,
    }
)
KNOWN_IEIS = frozenset(int(i) for i in IEI)


# --- the reference decoder: construct, interpreted -------------------------------------------

def _exact(subcon: cs.Construct) -> cs.Construct:
    # A value must fill its IE exactly: "a length that does not fit its type" is INVALID_MESSAGE.
    return cs.FocusedSeq("value", "value" / subcon, cs.Terminated)


_EXACT = {iei: _exact(c) for iei, c in IE_VALUE.items()}


def reference_split(body: bytes) -> list[tuple[int, bytes]]:
    """Split an IE list with construct (the reference for `split_ies`)."""
    try:
        return [(ie.iei, ie.value) for ie in RawIEList.parse(body)]
    except cs.ConstructError as exc:
        raise InvalidMessage(f"malformed IE list: {_reason(exc)}") from exc


def reference_value(iei: IEI, raw: bytes) -> Any:
    """Decode one IE value with construct (the reference for `decode_value`)."""
    try:
        value = _EXACT[iei].parse(raw)
    except cs.ConstructError as exc:
        raise InvalidMessage(f"IE {iei.name}: {_reason(exc)}") from exc
    return _normalise(value)


def _normalise(value: Any) -> Any:
    if isinstance(value, cs.ListContainer | list):
        return tuple(value)
    return value


def _reason(exc: cs.ConstructError) -> str:
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return text[:200]


# --- the fast decoder: generated from the same declarations ----------------------------------

Decoder = Callable[[bytes], Any]
Encoder = Callable[[Any], bytes]


@dataclass(frozen=True)
class FastCodec:
    decode: Decoder
    encode: Encoder


def _fast_codec(iei: IEI, c: cs.Construct) -> FastCodec:
    """Derive a struct-based codec from a construct declaration (raises on a shape it can't)."""
    name = iei.name
    if isinstance(c, cs.FormatField):
        return _fast_struct(name, struct.Struct(c.fmtstr), None, single=True)
    if isinstance(c, OneOfValues) and isinstance(c.subcon, cs.FormatField):
        return _fast_struct(name, struct.Struct(c.subcon.fmtstr), frozenset(c.valids), single=True)
    if isinstance(c, cs.Sequence) and all(isinstance(s, cs.FormatField) for s in c.subcons):
        fmt = ">" + "".join(s.fmtstr.lstrip("<>=!") for s in c.subcons)
        return _fast_struct(name, struct.Struct(fmt), None, single=False)
    if isinstance(c, cs.Bytes) and isinstance(c.length, int):
        return _fast_fixed_bytes(name, c.length)
    if isinstance(c, Utf8Text):
        return _fast_text(name, c.min_len, c.max_len, c.no_controls)
    if isinstance(c, BoundedBytes):
        return _fast_bounded(name, c.max_len)
    if c is Grouped:
        return FastCodec(bytes, bytes)
    if isinstance(c, Records):
        return _fast_records(name, c.size)
    if isinstance(c, AscendingU16s):
        return _fast_ascending_u16s(name)
    raise TypeError(f"no fast codec for {name}: {c!r}")


def _fast_struct(
    name: str, st: struct.Struct, valids: frozenset[int] | None, *, single: bool
) -> FastCodec:
    size = st.size
    unpack = st.unpack
    pack = st.pack

    def decode(raw: bytes) -> Any:
        if len(raw) != size:
            raise InvalidMessage(f"IE {name}: length {len(raw)}, expected {size}")
        value = unpack(raw)
        if single:
            value = value[0]
            if valids is not None and value not in valids:
                raise InvalidMessage(f"IE {name}: value {value} not allowed")
        return value

    def encode(value: Any) -> bytes:
        try:
            if single:
                if valids is not None and value not in valids:
                    raise ValueError(f"value {value} not allowed")
                return pack(value)
            return pack(*value)
        except (struct.error, TypeError) as exc:
            raise ValueError(f"IE {name}: {exc}") from exc

    return FastCodec(decode, encode)


def _fast_fixed_bytes(name: str, length: int) -> FastCodec:
    def decode(raw: bytes) -> bytes:
        if len(raw) != length:
            raise InvalidMessage(f"IE {name}: length {len(raw)}, expected {length}")
        return bytes(raw)

    def encode(value: bytes) -> bytes:
        if len(value) != length:
            raise ValueError(f"IE {name}: {len(value)} octets, expected {length}")
        return bytes(value)

    return FastCodec(decode, encode)


def text_or_none(raw: bytes, start: int, end: int, min_len: int, max_len: int,
                 no_controls: bool = True) -> str | None:
    """raw[start:end] as text when it is min_len..max_len octets of UTF-8 (and, with
    no_controls, holds no C0/C1 control: wire-v1 §3); else None. With `octets_or_none`, the
    one text check of the fast codec: the IE codecs below and the hand-written entry
    shortcuts (messages) use them; the construct reference (`Utf8Text`) has its own."""
    if end - start < min_len or end - start > max_len:
        return None
    try:
        text = raw[start:end].decode("utf-8")
    except UnicodeDecodeError:
        return None
    # isprintable() is False for every C0/C1 control, so True settles it cheaply.
    if no_controls and not text.isprintable() and _CONTROL.search(text):
        return None
    return text


def octets_or_none(text: str, min_len: int, max_len: int,
                   no_controls: bool = True) -> bytes | None:
    """`text` in UTF-8 when that is min_len..max_len octets and (with no_controls) `text`
    holds no C0/C1 control; else None. text_or_none's rule, for encoding."""
    data = text.encode("utf-8")
    if len(data) < min_len or len(data) > max_len:
        return None
    if no_controls and not text.isprintable() and _CONTROL.search(text):
        return None
    return data


def _fast_text(name: str, min_len: int, max_len: int, no_controls: bool) -> FastCodec:
    def decode(raw: bytes) -> str:
        text = text_or_none(raw, 0, len(raw), min_len, max_len, no_controls)
        if text is not None:
            return text
        n = len(raw)  # say what is wrong (the rare path)
        if n < min_len or n > max_len:
            raise InvalidMessage(f"IE {name}: length {n} outside {min_len}..{max_len} octets")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidMessage(f"IE {name}: not UTF-8") from exc
        raise InvalidMessage(f"IE {name}: control character")

    def encode(value: str) -> bytes:
        data = octets_or_none(value, min_len, max_len, no_controls)
        if data is not None:
            return data
        n = len(value.encode("utf-8"))  # say what is wrong (the rare path)
        if n < min_len or n > max_len:
            raise ValueError(f"IE {name}: length {n} outside {min_len}..{max_len} octets")
        raise ValueError(f"IE {name}: control character")

    return FastCodec(decode, encode)


def _fast_bounded(name: str, max_len: int) -> FastCodec:
    def decode(raw: bytes) -> bytes:
        if len(raw) > max_len:
            raise InvalidMessage(f"IE {name}: more than {max_len} octets")
        return bytes(raw)

    def encode(value: bytes) -> bytes:
        if len(value) > max_len:
            raise ValueError(f"IE {name}: more than {max_len} octets")
        return bytes(value)

    return FastCodec(decode, encode)


def _fast_records(name: str, size: int) -> FastCodec:
    def decode(raw: bytes) -> bytes:
        if not raw or len(raw) % size:
            raise InvalidMessage(f"IE {name}: {len(raw)} octets, not n >= 1 records of {size}")
        return bytes(raw)

    def encode(value: bytes) -> bytes:
        if not value or len(value) % size:
            raise ValueError(f"IE {name}: {len(value)} octets, not n >= 1 records of {size}")
        return bytes(value)

    return FastCodec(decode, encode)


def _fast_ascending_u16s(name: str) -> FastCodec:
    def decode(raw: bytes) -> tuple[int, ...]:
        if len(raw) % 2:
            raise InvalidMessage(f"IE {name}: odd length {len(raw)}")
        values = struct.unpack(f">{len(raw) // 2}H", raw)
        problem = _ascending_problem(values)
        if problem:
            raise InvalidMessage(f"IE {name}: {problem}")
        return values

    def encode(value: Any) -> bytes:
        values = tuple(value)
        problem = _ascending_problem(values)
        if problem:
            raise ValueError(f"IE {name}: {problem}")
        try:
            return struct.pack(f">{len(values)}H", *values)
        except struct.error as exc:
            raise ValueError(f"IE {name}: {exc}") from exc

    return FastCodec(decode, encode)


FAST: dict[int, FastCodec] = {int(iei): _fast_codec(iei, c) for iei, c in IE_VALUE.items()}


def split_ies(body: bytes) -> list[tuple[int, bytes]]:
    """Split an IE list into (IEI, value) pairs: the fast twin of `reference_split`."""
    out: list[tuple[int, bytes]] = []
    append = out.append
    pos = 0
    end = len(body)
    while pos < end:
        if end - pos < 3:
            raise InvalidMessage("malformed IE list: truncated IE header")
        iei = body[pos]
        length = (body[pos + 1] << 8) | body[pos + 2]
        start = pos + 3
        pos = start + length
        if pos > end:
            raise InvalidMessage("malformed IE list: IE length runs past the body")
        append((iei, body[start:pos]))
    return out


def decode_value(iei: int, raw: bytes) -> Any:
    """Decode one known IE value (fast path)."""
    return FAST[iei].decode(raw)


def encode_ie(iei: int, value_bytes: bytes) -> bytes:
    """IE = IEI | length | value."""
    n = len(value_bytes)
    if n > IE_VALUE_MAX:
        raise ValueError(f"IE 0x{iei:02x}: value of {n} octets does not fit a u16 length")
    return IE_HEADER.pack(iei, n) + value_bytes


def encode_value(iei: int, value: Any) -> bytes:
    return FAST[iei].encode(value)


def reference_encode_value(iei: IEI, value: Any) -> bytes:
    """Build one IE value with construct (the reference for `encode_value`)."""
    c = IE_VALUE[iei]
    if isinstance(value, tuple):
        value = list(value)
    return c.build(value)
