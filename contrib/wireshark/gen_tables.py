"""Write the generated tables of msgin5g.lua from wire/ (the one source of truth).

    python contrib/wireshark/gen_tables.py           # rewrite the section in msgin5g.lua
    python contrib/wireshark/gen_tables.py --check   # exit 1 if the committed file differs

Numbers, names, value shapes and IE tables come from wire/ (constants, ies.IE_VALUE,
messages.MESSAGE_SPECS / ENTRY_SPECS / PROFILE_SPEC / BULK_SPECS, session._RECEIVES), wire
v1.1's sync messages (docs/protocol.md §6) included. What wire/ does not say is only how
Wireshark shows an IE: its label and display-filter name (PRESENTATION below), and how the
records of a Bucket digests IE are numbered (RECORDS). A new message type or IE is a change
in wire/ plus, for an IE, one line here; the generator refuses to run when wire/ has an IE
this table does not present.
tests/wireshark/test_tables.py fails when the committed .lua is not what this writes.
"""

from __future__ import annotations

import argparse
import sys
from enum import IntEnum
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import construct as cs  # noqa: E402

from wire import constants as C  # noqa: E402
from wire import ies, messages, session  # noqa: E402

LUA = Path(__file__).resolve().parent / "msgin5g.lua"
BEGIN = "-- BEGIN GENERATED TABLES"
END = "-- END GENERATED TABLES"

I = C.IEI
YES_NO = {0: "no", 1: "yes"}

# IEI -> (label as wire-v1 §3 spells it, display-filter name after "msgin5g.", value names).
# Value names are an IntEnum of wire.constants or a dict; None shows the number only.
PRESENTATION: dict[C.IEI, tuple[str, str, type[IntEnum] | dict[int, str] | None]] = {
    I.UE_SERVICE_ID: ("UE Service ID", "ue_id", None),
    I.UE_CREDENTIAL: ("UE credential", "credential", None),
    I.NON_MSGIN5G_UE_PROFILE: ("Non-MSGin5G UE profile", "profile", None),
    I.REGISTRATION_RESULT: ("Registration result", "registration_result", C.Result),
    I.DEREGISTRATION_RESULT: ("De-registration result", "deregistration_result", C.Result),
    I.FAILURE_CAUSE: ("Failure cause", "cause", C.FailureCause),
    I.BULK_REGISTRATION_INDICATOR: (
        "Bulk registration indicator", "bulk_registration_indicator", None),
    I.BULK_REGISTRATION_RESPONSE_INDICATOR: (
        "Bulk registration response indicator", "bulk_registration_response_indicator", None),
    I.BULK_DEREGISTRATION_INDICATOR: (
        "Bulk de-registration indicator", "bulk_deregistration_indicator", None),
    I.BULK_DEREGISTRATION_RESPONSE_INDICATOR: (
        "Bulk de-registration response indicator", "bulk_deregistration_response_indicator",
        None),
    I.NUMBER_OF_INDIVIDUAL_ENTRIES: ("Number of individual entries", "count", None),
    I.REGISTRATION_ENTRY: ("Registration entry", "registration_entry", None),
    I.REGISTRATION_RESPONSE_ENTRY: (
        "Registration response entry", "registration_response_entry", None),
    I.DEREGISTRATION_ENTRY: ("De-registration entry", "deregistration_entry", None),
    I.DEREGISTRATION_RESPONSE_ENTRY: (
        "De-registration response entry", "deregistration_response_entry", None),
    I.PROTOCOL_VERSION: ("Protocol version", "protocol_version", None),
    I.SERVER_NONCE: ("Server nonce", "server_nonce", None),
    I.MAXIMUM_FRAME_SIZE: ("Maximum frame size", "max_frame_size", None),
    I.MAXIMUM_BULK_ENTRIES: ("Maximum bulk entries", "max_bulk_entries", None),
    I.MAXIMUM_OUTSTANDING_TRANSACTIONS: (
        "Maximum outstanding transactions", "max_outstanding", None),
    I.KEEPALIVE_INTERVAL: ("Keepalive interval (s)", "keepalive_interval", None),
    I.NODE_NAME: ("Node name", "node_name", None),
    I.BULK_ALLOWED: ("Bulk allowed", "bulk_allowed", YES_NO),
    I.RETRY_AFTER: ("Retry after (ms)", "retry_after", None),
    I.ERROR_CAUSE: ("Error cause", "error_cause", C.ErrorCause),
    I.DIAGNOSTIC: ("Diagnostic", "diagnostic", None),
    I.GATEWAY_TYPE: ("Gateway type", "gateway_type", C.GatewayType),
    I.UE_AUTHENTICATION_REQUIRED: (
        "UE authentication required", "ue_authentication_required", YES_NO),
    I.UE_TYPE: ("UE type", "ue_type", C.UeType),
    I.TRIGGERING_UE_IDENTIFIER: ("Triggering UE identifier", "triggering_ue_id", None),
    I.TRIGGERING_PORT: ("Triggering port", "triggering_port", None),
    I.TRIGGERING_PROTOCOL: ("Triggering protocol", "triggering_protocol", C.TriggeringProtocol),
    I.COMMUNICATION_AVAILABILITY: ("Communication availability", "availability", None),
    I.MAXIMUM_SEGMENT_SIZE: ("Maximum segment size", "max_segment_size", None),
    I.APPLICATION_DATA: ("Application data", "application_data", None),
    # v1.1, registry sync (docs/protocol.md §6.2).
    I.SYNC_SUPPORTED: ("Sync supported", "sync.supported", YES_NO),
    I.BUCKET_BITS: ("Bucket bits", "sync.bucket_bits", None),
    I.FIRST_BUCKET: ("First bucket", "sync.first_bucket", None),
    I.BUCKET_DIGESTS: ("Bucket digests", "sync.digest", None),
    I.BUCKET_LIST: ("Bucket list", "sync.bucket", None),
    I.LISTED_UE: ("Listed UE", "sync.listed_ue", None),
    I.UE_HASH: ("UE hash", "sync.ue_hash", None),
    I.RELEASE: ("Release", "release", None),
}
# The parts of a value made of several numbers (wire-v1 §3: "u32 period, u32 window").
PARTS: dict[C.IEI, tuple[str, ...]] = {I.COMMUNICATION_AVAILABILITY: ("period", "window")}
# IEs made of numbered records -> (the IE of the same message whose value numbers the first
# record, the IE whose display-filter field shows the number). docs/protocol.md §6.2: digest k
# of a fragment is bucket First bucket + k, so `msgin5g.sync.bucket == 5` finds both the LIST
# REQUEST naming bucket 5 and the DIGEST RESPONSE carrying its digest.
RECORDS: dict[C.IEI, tuple[C.IEI, C.IEI]] = {I.BUCKET_DIGESTS: (I.FIRST_BUCKET, I.BUCKET_LIST)}
# The label of one record or element of a list-shaped IE.
ITEM_LABELS: dict[C.IEI, str] = {I.BUCKET_DIGESTS: "Digest", I.BUCKET_LIST: "Bucket"}


def lua_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def value_shape(iei: C.IEI) -> dict[str, object]:
    """The Lua description of an IE value, read off its construct declaration."""
    c = ies.IE_VALUE[iei]
    allowed = None
    if isinstance(c, ies.OneOfValues):
        allowed, c = sorted(c.valids), c.subcon
    if c is ies.Grouped:
        limit = messages.GROUP_MAX.get(iei, ies.IE_VALUE_MAX)
        return {"kind": "group", "max": limit}
    if isinstance(c, cs.FormatField):
        return {"kind": "uint", "size": c.sizeof(), "allowed": allowed}
    if isinstance(c, cs.Sequence) and all(isinstance(s, cs.FormatField) for s in c.subcons):
        sizes = [s.sizeof() for s in c.subcons]
        if set(sizes) != {4}:
            raise TypeError(f"{iei.name}: only sequences of u32 are shown")
        return {"kind": "uints", "size": 4, "count": len(sizes)}
    if isinstance(c, cs.Bytes) and isinstance(c.length, int):
        return {"kind": "bytes", "len": c.length}
    if isinstance(c, ies.BoundedBytes):
        return {"kind": "opaque", "max": c.max_len}
    if isinstance(c, ies.Records):
        first, index = RECORDS[iei]
        return {"kind": "records", "size": c.size, "item": ITEM_LABELS[iei],
                "first": IeiRef(first), "index": IeiRef(index)}
    if isinstance(c, ies.AscendingU16s):
        # docs/protocol.md §6.2: n x u16, n >= 1, strictly ascending.
        return {"kind": "list", "size": 2, "item": ITEM_LABELS[iei], "ascending": True}
    if isinstance(c, ies.Utf8Text):
        return {"kind": "text", "min": c.min_len, "max": c.max_len,
                "no_controls": c.no_controls}
    raise TypeError(f"no Lua shape for {iei.name}: {c!r}")


class IeiRef(int):
    """An IEI inside a value shape, written in hex like the other IEIs of the tables."""


def lua_value(value: object) -> str:
    if isinstance(value, IeiRef):
        return f"0x{int(value):02X}"
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return lua_str(value)
    if isinstance(value, list | tuple):
        return "{" + ", ".join(lua_value(v) for v in value) + "}"
    raise TypeError(repr(value))


def names_table(names: type[IntEnum] | dict[int, str]) -> str:
    pairs = names.items() if isinstance(names, dict) else ((int(m), m.name) for m in names)
    return "{" + ", ".join(f"[{v}] = {lua_str(n)}" for v, n in pairs) + "}"


def spec_table(spec: messages.GroupSpec) -> str:
    return "{" + ", ".join(f"{{0x{int(f.iei):02X}, {lua_str(f.presence.name)}}}"
                           for f in spec.fields) + "}"


def generate() -> str:
    missing = [i.name for i in I if i not in PRESENTATION]
    if missing:
        raise SystemExit(f"gen_tables.py: no PRESENTATION entry for IE {', '.join(missing)}")
    fields = [p[1] for p in PRESENTATION.values()]
    if len(set(fields)) != len(fields):
        raise SystemExit("gen_tables.py: two IEs share a display-filter name")
    receives = session._RECEIVES  # wire-v1 §4/§5 direction columns, as the session applies them
    out: list[str] = [
        BEGIN + " (contrib/wireshark/gen_tables.py from wire/; do not edit by hand)",
        f"local PROTOCOL_VERSION = {C.PROTOCOL_VERSION}",
        f"local ALPN_PROTOCOL = {lua_str(C.ALPN_PROTOCOL)}",
        f"local DEFAULT_PORT = {C.DEFAULT_PORT}",
        f"local HEADER_SIZE = {C.HEADER_SIZE}",
        f"local DEFAULT_MAX_FRAME_SIZE = {C.DEFAULT_MAX_FRAME_SIZE}",
        f"local MAX_FRAME_SIZE_LIMIT = {C.MAX_FRAME_SIZE_LIMIT}",
        f"local SERVER_TID_BIT = 0x{C.SERVER_TID_BIT:08X}",
        f"local FLAG_MORE = 0x{int(C.FrameFlag.MORE):04X}",
        f"local COMPREHENSION_REQUIRED = 0x{C.COMPREHENSION_REQUIRED:02X}",
        f"local INVALID_ENTRY = {int(C.FailureCause.INVALID_ENTRY)}",
        f"local RESULT_FAILURE = {int(C.Result.FAILURE)}",
        "",
        "-- wire-v1 §7",
        f"local FAILURE_CAUSES = {names_table(C.FailureCause)}",
        f"local ERROR_CAUSES = {names_table(C.ErrorCause)}",
        "",
        "-- wire-v1 §3: IEI -> label, filter name, value shape, value names",
        "local IES = {",
    ]
    for iei in I:
        label, field, names = PRESENTATION[iei]
        shape = value_shape(iei)
        parts = [f"name = {lua_str(label)}", f"field = {lua_str(field)}"]
        parts += [f"{k} = {lua_value(v)}" for k, v in shape.items() if v is not None]
        if iei in PARTS:
            parts.append(f"parts = {lua_value(PARTS[iei])}")
        if names is not None:
            parts.append(f"names = {names_table(names)}")
        out.append(f"    [0x{int(iei):02X}] = {{{', '.join(parts)}}},")
    out.append("}")
    out += ["", "-- names for the code below (wire/constants.py)"]
    out.append("local IEI = {" + ", ".join(f"{i.name} = 0x{int(i):02X}" for i in I) + "}")
    out.append("local MT = {" + ", ".join(f"{t.name} = 0x{int(t):02X}" for t in C.MessageType)
               + "}")
    out.append("local EC = {" + ", ".join(f"{e.name} = {int(e)}" for e in C.ErrorCause) + "}")
    out += ["", "-- Grouped IEs: their IE tables (IEI, presence M/O/C), in order",
            "local GROUPS = {"]
    for iei, spec in messages.GROUP_SPECS.items():
        out.append(f"    [0x{int(iei):02X}] = {spec_table(spec)},")
    out.append("}")
    out += ["", "-- wire-v1 §4, §5 and docs/protocol.md §6.2: message type -> name, sender, IE "
            "table or bulk",
            "-- layout, whether MORE may be set, whether it is a v1.1 sync message",
            "local MESSAGES = {"]
    for mtype in C.MessageType:
        to_server = mtype in receives[session.Role.SERVER]
        to_gateway = mtype in receives[session.Role.GATEWAY]
        sender = "both" if to_server and to_gateway else "gateway" if to_server else "server"
        parts = [f"name = {lua_str(C.MESSAGE_NAMES[mtype])}", f"sender = {lua_str(sender)}"]
        if mtype in messages.BULK_SPECS:
            # LIST RESPONSE (v1.1) has the bulk layout without an indicator.
            bulk = messages.BULK_SPECS[mtype]
            indicator = ("" if bulk.indicator is None
                         else f"indicator = 0x{int(bulk.indicator):02X}, ")
            parts.append(f"bulk = {{{indicator}entry = 0x{int(bulk.entry):02X}}}")
        else:
            parts.append(f"ies = {spec_table(messages.MESSAGE_SPECS[mtype])}")
        if mtype in C.FRAGMENTED_MESSAGES:
            parts.append("fragmented = true")  # MORE allowed (wire-v1 §2, amended by §6.2)
        if mtype in C.SYNC_MESSAGES:
            parts.append("sync = true")  # only after HELLO ACK announced Sync supported
        out.append(f"    [0x{int(mtype):02X}] = {{{', '.join(parts)}}},")
    out.append("}")
    out += ["", "-- request type -> the response type that answers it", "local RESPONSE_TO = {"]
    for req, rsp in C.RESPONSE_TO.items():
        out.append(f"    [0x{int(req):02X}] = 0x{int(rsp):02X},  -- {req.name} -> {rsp.name}")
    out.append("}")
    out.append(END)
    return "\n".join(out) + "\n"


def render(text: str) -> str:
    """`text` (the .lua) with its generated section replaced."""
    start = text.index(BEGIN)
    end = text.index(END, start) + len(END) + 1
    return text[:start] + generate() + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if msgin5g.lua differs from what would be written")
    args = parser.parse_args(argv)
    current = LUA.read_text()
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{LUA}: generated tables out of date; run {Path(__file__).name}",
                  file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        LUA.write_text(wanted)
        print(f"{LUA}: tables rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
