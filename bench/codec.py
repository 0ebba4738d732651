"""`python -m bench.codec [--entries N] [--repeat R] [--json PATH]`: the codec's per-entry cost.

Prints JSON with microseconds per entry (the best of R runs), measured in one process:

* decode of bulk registration entries, with and without a profile, through the session's
  streaming path (`BulkReader.feed_entry`, what `Session` calls per entry IE) and through the
  whole session (request frames in → `BulkEntryReceived` events out);
* encode of response entries (`encode_entry`) and the session's `send_bulk_entry` (frames out);
* the floor: a hand-written `struct` decoder/encoder of the same entries to plain tuples,
  with no validation at all, measured in the same run; and the ratios to it;
* for context, the interpreted construct reference decoder on a sample.

The target (issue 2) is decoding within 3x of the floor.
"""

from __future__ import annotations

import argparse
import gc
import json
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from wire.bulk import BulkReader
from wire.constants import IEI, MessageType
from wire.events import NEED_DATA, BulkEntryReceived
from wire.messages import (
    ENTRY_DECODERS,
    BulkMessage,
    Hello,
    Profile,
    RegistrationEntry,
    RegistrationResponseEntry,
    decode_entry,
    encode_bulk,
    encode_entry,
    encode_message,
)
from wire.session import Limits, Role, Session

REG = MessageType.BULK_REGISTRATION_REQUEST
PROFILE = Profile(ue_type=2, triggering_ue_identifier="+15551230001", triggering_port=2000,
                  triggering_protocol=1, communication_availability=(3600, 60),
                  maximum_segment_size=1200)


def entries(n: int, profile: Profile | None) -> list[RegistrationEntry]:
    return [RegistrationEntry(f"ue-{i:06d}@gw1.example", bytes([i % 256]) * 32, profile)
            for i in range(n)]


def race(runs: dict[str, Callable[[], Any]], repeat: int) -> dict[str, float]:
    """CPU seconds of the fastest of `repeat` rounds of each run. Process CPU time, not wall
    time, and the runs take turns within a round: on a busy machine the numbers stay close to
    what the code costs and their ratios stay meaningful. GC is off while timing (timeit)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            gc.collect()
            gc.disable()
            try:
                start = time.process_time()
                run()
                times[name].append(time.process_time() - start)
            finally:
                gc.enable()
    return {name: min(t) for name, t in times.items()}


# --- the floor: hand-written struct code, no validation --------------------------------------

_IE = struct.Struct(">BH")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_TWO_U32 = struct.Struct(">II")


def floor_profile(raw: bytes) -> tuple[Any, ...]:
    out: list[Any] = [None] * 7
    pos, end = 0, len(raw)
    unpack_ie = _IE.unpack_from
    while pos < end:
        iei, length = unpack_ie(raw, pos)
        pos += 3
        if iei == 0x30 or iei == 0x33:
            value: Any = raw[pos]
        elif iei == 0x31:
            value = raw[pos : pos + length].decode("utf-8")
        elif iei == 0x32:
            value = _U16.unpack_from(raw, pos)[0]
        elif iei == 0x34:
            value = _TWO_U32.unpack_from(raw, pos)
        elif iei == 0x35:
            value = _U32.unpack_from(raw, pos)[0]
        else:
            value = raw[pos : pos + length]
        out[iei - 0x30] = value
        pos += length
    return tuple(out)


def floor_entry(raw: bytes) -> tuple[Any, Any, Any]:
    uid = credential = profile = None
    pos, end = 0, len(raw)
    unpack_ie = _IE.unpack_from
    while pos < end:
        iei, length = unpack_ie(raw, pos)
        pos += 3
        if iei == 0x01:
            uid = raw[pos : pos + length].decode("utf-8")
        elif iei == 0x02:
            credential = raw[pos : pos + length]
        else:
            profile = floor_profile(raw[pos : pos + length])
        pos += length
    return (uid, credential, profile)


def floor_encode(uid: str, result: int) -> bytes:
    data = uid.encode("utf-8")
    n = len(data)
    return _IE.pack(0x0D, n + 7) + _IE.pack(0x01, n) + data + _IE.pack(0x04, 1) + bytes((result,))


# --- measurements ----------------------------------------------------------------------------


def measure_decode(n: int, profile: Profile | None, repeat: int) -> dict[str, float]:
    items = entries(n, profile)
    raws = [encode_entry(e)[3:] for e in items]

    def reader() -> None:
        r = BulkReader(REG, ENTRY_DECODERS)
        r.phase = 2
        feed = r.feed_entry
        for raw in raws:
            feed(raw)

    def floor() -> None:
        for raw in raws:
            floor_entry(raw)

    # Sanity: the floor and the codec see the same entries.
    r = BulkReader(REG, ENTRY_DECODERS)
    r.phase = 2
    assert [r.feed_entry(raw) for raw in raws[:50]] == items[:50]
    assert floor_entry(raws[0])[0] == items[0].ue_service_id

    stream = b"".join(encode_bulk(BulkMessage(REG, 5, n, tuple(items)), max_frame_size=65535))
    hello = encode_message(Hello(1, 2))
    limits = Limits(max_bulk_entries=max(n, 1))

    def session() -> None:
        s = Session(Role.SERVER, 0.0, limits)
        s.receive_data(hello, 0.0)
        s.next_event()
        s.accept_hello(server_nonce=bytes(32), bulk_allowed=True,
                       ue_authentication_required=False)
        s.receive_data(stream, 0.0)
        got = 0
        next_event = s.next_event
        while (event := next_event()) is not NEED_DATA:
            if type(event) is BulkEntryReceived:
                got += 1
        assert got == n

    sample = raws[: max(n // 50, 20)]

    def reference() -> None:
        for raw in sample:
            decode_entry(IEI.REGISTRATION_ENTRY, raw, reference=True)

    t = race({"reader": reader, "session": session, "floor": floor}, repeat)
    us = 1e6 / n
    return {
        "reader_us": t["reader"] * us,
        "session_us": t["session"] * us,
        "floor_us": t["floor"] * us,
        "construct_reference_us": race({"r": reference}, max(repeat // 3, 1))["r"] * 1e6
        / len(sample),
        "entry_octets": len(raws[0]) + 3,
    }


def measure_encode(n: int, repeat: int) -> dict[str, float]:
    responses = [RegistrationResponseEntry(f"ue-{i:06d}@gw1.example", i % 2, 1 if i % 2 else None)
                 for i in range(n)]
    success = [RegistrationResponseEntry(r.ue_service_id, 0) for r in responses]
    assert floor_encode(success[0].ue_service_id, 0) == encode_entry(success[0])

    def codec() -> None:
        for r in responses:
            encode_entry(r)

    def floor() -> None:
        for r in success:
            floor_encode(r.ue_service_id, 0)

    request = b"".join(encode_bulk(BulkMessage(REG, 5, n, tuple(entries(n, None))),
                                   max_frame_size=65535))
    hello = encode_message(Hello(1, 2))

    def prepared() -> Session:
        s = Session(Role.SERVER, 0.0, Limits(max_bulk_entries=max(n, 1)))
        s.receive_data(hello, 0.0)
        s.next_event()
        s.accept_hello(server_nonce=bytes(32), bulk_allowed=True,
                       ue_authentication_required=False)
        s.receive_data(request, 0.0)
        while s.next_event() is not NEED_DATA:
            pass
        return s

    sessions = [prepared() for _ in range(repeat)]

    def session() -> None:
        s = sessions.pop()
        send = s.send_bulk_entry
        for r in responses:
            send(5, r)
        s.data_to_send()

    t = race({"codec": codec, "session": session, "floor": floor}, repeat)
    us = 1e6 / n
    return {
        "encode_entry_us": t["codec"] * us,
        "session_send_us": t["session"] * us,
        "floor_us": t["floor"] * us,
    }


def run(n: int, repeat: int) -> dict[str, Any]:
    without = measure_decode(n, None, repeat)
    with_profile = measure_decode(n, PROFILE, repeat)
    encode = measure_encode(n, repeat)

    def ratios(d: dict[str, float]) -> dict[str, float]:
        return {"reader_vs_floor": d["reader_us"] / d["floor_us"],
                "session_vs_floor": d["session_us"] / d["floor_us"]}

    return {
        "python": sys.version.split()[0],
        "entries": n,
        "repeat": repeat,
        "decode_without_profile": {**without, **ratios(without)},
        "decode_with_profile": {**with_profile, **ratios(with_profile)},
        "encode_response_entry": {
            **encode,
            "encode_vs_floor": encode["encode_entry_us"] / encode["floor_us"],
            "session_send_vs_floor": encode["session_send_us"] / encode["floor_us"],
        },
        "target": "decode reader_vs_floor <= 3.0",
    }


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.codec", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    text = json.dumps(_rounded(run(args.entries, args.repeat)), indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
