"""Fuzz targets for the codec and the session, and an atheris (libFuzzer) runner.

    python -m wire.fuzz [--seconds N] [--target frames|messages|session-server|session-gateway]
                        [--corpus DIR] [--vectors PATH] [libFuzzer flags, e.g. -jobs=2]

What counts as a crash (docs/fuzzing.md):

* `frames`: `decode_frames()` and `FrameBuffer` raising anything but a `WireError`;
* `messages`: a decoder raising anything but a `WireError`, the fast decoder and the construct
  reference disagreeing (value, or error class), or a decoded value that does not survive
  encode → decode;
* `session-server` / `session-gateway`: `Session.next_event()` raising anything at all, the
  events of a stream fed at once differing from the same stream fed in chunks, or the session
  sending a frame that is not well-formed.

The seed corpus is written at run time from the spec vectors into `--corpus` (default
`fuzz-out/corpus/<target>`, ignored by git). The harness functions are plain Python and are
also driven by Hypothesis in tests/wire/test_fuzz.py. Nothing here imports atheris until the
runner starts, and wire's own modules are imported lazily so that atheris can instrument them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NONCE = bytes(range(0xA0, 0xC0))


class FuzzFailure(AssertionError):
    """The harness found a bug that is not an exception of the code under test."""


# --- outcomes ------------------------------------------------------------------------------


def _outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    """("ok", value) or ("error", WireError subclass); any other exception propagates."""
    from .errors import WireError

    try:
        return ("ok", call())
    except WireError as exc:
        return ("error", type(exc))


def _same(kind: str, fast: tuple[str, Any], reference: tuple[str, Any]) -> None:
    if fast != reference:
        raise FuzzFailure(f"{kind}: fast decoder {fast!r} but reference {reference!r}")


# --- target: frames ------------------------------------------------------------------------

_FRAME_SIZES = (4096, 65_535, 16_777_215)


def run_frames(data: bytes) -> None:
    """decode_frames() and the streaming FrameBuffer on arbitrary octets."""
    from .errors import WireError
    from .frames import FrameBuffer
    from .messages import decode_frames

    if not data:
        return
    size = _FRAME_SIZES[data[0] % len(_FRAME_SIZES)]
    stream = data[1:]
    with contextlib.suppress(WireError):
        decode_frames(stream, max_frame_size=size)
    # The streaming reader: headers, then the body IE by IE, fed in two pieces.
    buf = FrameBuffer(size)
    cut = len(stream) // 2
    buf.feed(stream[:cut])
    fed_all = False
    try:
        while True:
            header = buf.read_header()
            if header is None:
                if fed_all:
                    return
                buf.feed(stream[cut:])
                fed_all = True
                continue
            remaining = header.body_length
            while remaining:
                item = buf.read_ie(remaining)
                if item is None:
                    if fed_all:
                        return
                    buf.feed(stream[cut:])
                    fed_all = True
                    continue
                if not item:
                    buf.skip(remaining)
                    break
                remaining -= 3 + len(item[1])  # type: ignore[index]
    except WireError:
        return


# --- target: messages (differential) --------------------------------------------------------


def _message_kinds() -> list[tuple[str, Any]]:
    from .bulk import BULK_SPECS
    from .ies import IE_VALUE
    from .messages import ENTRY_SPECS, MESSAGE_SPECS

    return ([("message", t) for t in MESSAGE_SPECS] + [("entry", i) for i in ENTRY_SPECS]
            + [("profile", None), ("split", None)] + [("ie", i) for i in IE_VALUE]
            + [("bulk", t) for t in BULK_SPECS])


_KINDS: list[tuple[str, Any]] = []


def run_messages(data: bytes) -> None:
    """One decoder, chosen by the first octet, on the rest; fast against construct."""
    from .ies import decode_value, reference_split, reference_value, split_ies
    from .messages import (
        PROFILE_SPEC,
        decode_body,
        decode_entry,
        decode_group,
        encode_entry,
        encode_group,
        encode_message,
    )

    if not _KINDS:
        _KINDS.extend(_message_kinds())
    if not data:
        return
    kind, what = _KINDS[data[0] % len(_KINDS)]
    body = data[1:]
    if kind == "message":
        fast = _outcome(lambda: decode_body(what, 7, body))
        _same(what.name, fast, _outcome(lambda: decode_body(what, 7, body, reference=True)))
        if fast[0] == "ok":
            again = _decode_single(encode_message(fast[1]))
            if again != fast[1]:
                raise FuzzFailure(f"{what.name}: {fast[1]!r} re-decodes as {again!r}")
    elif kind == "entry":
        fast = _outcome(lambda: decode_entry(what, body))
        _same(what.name, fast, _outcome(lambda: decode_entry(what, body, reference=True)))
        if fast[0] == "ok":
            ie = encode_entry(fast[1])
            if decode_entry(what, ie[3:]) != fast[1]:
                raise FuzzFailure(f"{what.name}: {fast[1]!r} does not survive re-encoding")
    elif kind == "profile":
        fast = _outcome(lambda: decode_group(PROFILE_SPEC, body))
        _same("profile", fast, _outcome(lambda: decode_group(PROFILE_SPEC, body, reference=True)))
        if fast[0] == "ok" and decode_group(PROFILE_SPEC, encode_group(PROFILE_SPEC, fast[1])) \
                != fast[1]:
            raise FuzzFailure(f"profile {fast[1]!r} does not survive re-encoding")
    elif kind == "split":
        _same("split", _outcome(lambda: split_ies(body)), _outcome(lambda: reference_split(body)))
    elif kind == "ie":
        _same(what.name, _outcome(lambda: decode_value(what, body)),
              _outcome(lambda: reference_value(what, body)))
    else:
        _run_bulk_reader(what, body)


def _decode_single(wire: bytes) -> Any:
    from .messages import decode_frames

    (message,) = decode_frames(wire)
    return message


def _run_bulk_reader(message_type: Any, body: bytes) -> None:
    from .bulk import BulkReader
    from .errors import WireError
    from .ies import split_ies
    from .messages import ENTRY_DECODERS

    reader = BulkReader(message_type, ENTRY_DECODERS)
    try:
        for iei, raw in split_ies(body):
            reader.feed_ie(iei, raw)
        reader.end_frame()
    except WireError:
        return


# --- targets: the session, both roles -------------------------------------------------------


def normalize(event: Any) -> Any:
    """A comparable form of an event (exceptions compare by identity, so flatten them)."""
    from .events import BulkEntryReceived, ProtocolErrorDetected

    if isinstance(event, ProtocolErrorDetected):
        e = event.error
        return ("ProtocolErrorDetected", type(e).__name__, e.cause, e.transaction_id, e.diagnostic)
    if isinstance(event, BulkEntryReceived) and event.error is not None:
        return ("BulkEntryReceived", event.transaction_id, event.index, str(event.error))
    return event


def new_server(established: bool) -> Any:
    """A server session, before HELLO or right after accepting one."""
    from .messages import Hello, encode_message
    from .session import Limits, Role, Session

    server = Session(Role.SERVER, 0.0, Limits(max_bulk_entries=100, max_outstanding=8))
    if established:
        server.receive_data(encode_message(Hello(1, 2, node_name="gw1.example")), 0.0)
        server.next_event()
        server.accept_hello(server_nonce=NONCE, bulk_allowed=True,
                            ue_authentication_required=False, sync_supported=True)
        server.data_to_send()
    return server


def new_gateway(established: bool) -> Any:
    """A gateway session that sent HELLO (id 1); established, it also has transactions that
    the spec vectors answer: registration 2, de-registration 4, bulk registration 6 (3
    entries), bulk de-registration 7 (3 entries), registration 8, and (v1.1, answered by
    tests/wire/vectors_v1_1.json) DIGEST REQUEST 3 (b = 2) and LIST REQUEST 5."""
    from .constants import MessageType
    from .messages import (
        DeregistrationEntry,
        DigestRequest,
        Hello,
        HelloAck,
        ListRequest,
        RegistrationEntry,
        UeDeregistrationRequest,
        UeRegistrationRequest,
        encode_message,
    )
    from .session import Role, Session

    gateway = Session(Role.GATEWAY, 0.0)
    gateway.send_hello(Hello(1, 2, node_name="gw1.example"))
    if established:
        gateway.receive_data(encode_message(
            HelloAck(1, NONCE, 65535, 1000, 64, 30, 1, 0, sync_supported=1)), 0.0)
        gateway.next_event()
        gateway.send_request(UeRegistrationRequest(2, "ue-0001@gw1.example"))
        gateway.send_request(UeDeregistrationRequest(4, "ue-0001@gw1.example"))
        for tid, mtype, cls in ((6, MessageType.BULK_REGISTRATION_REQUEST, RegistrationEntry),
                                (7, MessageType.BULK_DEREGISTRATION_REQUEST,
                                 DeregistrationEntry)):
            gateway.start_bulk(mtype, tid, 3)
            for n in range(3):
                gateway.send_bulk_entry(tid, cls(f"ue-{n:04d}@gw1.example"))
        gateway.send_request(UeRegistrationRequest(8, "ue-0008@gw1.example"))
        gateway.send_request(DigestRequest(3, 2))
        gateway.send_request(ListRequest(5, 12, (1, 2)))
    gateway.data_to_send()
    return gateway


def answer(session: Any, event: Any) -> None:
    """A well-behaved server user: accept, answer every request and entry at once (success,
    or INVALID_ENTRY for a malformed entry). Shared with tests/wire."""
    from .constants import FailureCause, MessageType
    from .events import BulkEntryReceived, HelloReceived, RequestReceived, SyncRequestReceived
    from .messages import (
        DeregistrationResponseEntry,
        ListedUe,
        RegistrationResponseEntry,
        UeDeregistrationResponse,
        UeRegistrationResponse,
    )

    if isinstance(event, HelloReceived):
        session.accept_hello(server_nonce=NONCE, bulk_allowed=True,
                             ue_authentication_required=False, sync_supported=True)
    elif isinstance(event, SyncRequestReceived):
        request = event.request
        tid = request.transaction_id
        if request.message_type is MessageType.DIGEST_REQUEST:
            session.send_digest_response(tid, request.bucket_bits,
                                         bytes(16 << request.bucket_bits))
        else:
            session.start_list_response(tid, len(request.buckets))
            session.send_list_entries(tid, [ListedUe(f"ue-{b}", bytes(16))
                                            for b in request.buckets])
    elif isinstance(event, RequestReceived):
        request = event.request
        if request.transaction_id & 2:  # msgd's way: the answer from its fields
            session.send_result(request.transaction_id, request.ue_service_id, None)
        else:
            cls = (UeRegistrationResponse
                   if request.message_type is MessageType.UE_REGISTRATION_REQUEST
                   else UeDeregistrationResponse)
            session.send_response(cls(request.transaction_id, request.ue_service_id, 0))
    elif isinstance(event, BulkEntryReceived):
        txn = session._txns[event.transaction_id]
        entry_cls = (RegistrationResponseEntry
                     if txn.request_type is MessageType.BULK_REGISTRATION_REQUEST
                     else DeregistrationResponseEntry)
        if event.entry is None:
            entry = entry_cls("", 1, int(FailureCause.INVALID_ENTRY))
        else:
            entry = entry_cls(event.entry.ue_service_id, 0)
        session.send_bulk_entry(event.transaction_id, entry)


def _no_user(session: Any, event: Any) -> None:
    """The gateway's user only reads (its requests were sent up front)."""


def _chunks(seed: int, size: int) -> Iterable[int]:
    """Chunk sizes from one octet: 0 means byte by byte, else a repeating small pattern."""
    if seed == 0:
        return [1] * size
    pattern = [1 + (seed * k * 7) % 61 for k in range(1, 5)]
    out: list[int] = []
    total = 0
    k = 0
    while total < size:
        out.append(pattern[k % len(pattern)])
        total += out[-1]
        k += 1
    return out


def drive_session(make: Callable[[], Any], user: Callable[[Any, Any], None], stream: bytes,
                  chunks: Iterable[int] | None) -> tuple[list[Any], bytes, Any]:
    """Feed `stream` (at once, or in `chunks`), acting on every event: the normalized events,
    the octets the session sent, and the session. Nothing here may raise."""
    from .events import NEED_DATA, PAUSED

    session = make()
    events: list[Any] = []
    pieces = [len(stream)] if chunks is None else list(chunks)
    pos = 0
    for size in pieces:
        if pos >= len(stream):
            break
        session.receive_data(stream[pos : pos + size], 1.0)
        pos += size
        while (event := session.next_event()) is not NEED_DATA and event is not PAUSED:
            events.append(normalize(event))
            user(session, event)
    return events, session.data_to_send(), session


def _finish(session: Any) -> None:
    """Timers and EOF on top of what the session has seen: still nothing may raise."""
    from .events import NEED_DATA, PAUSED

    for now in (5.0, 11.0, 40.0, 75.0, 200.0):
        session.handle_timer(now)
        session.get_timer()
        while session.next_event() not in (NEED_DATA, PAUSED):
            pass
    session.receive_data(b"", 300.0)
    while session.next_event() not in (NEED_DATA, PAUSED):
        pass
    check_sent(session.data_to_send())


def check_sent(data: bytes) -> None:
    """Every frame we send is well-formed: a peer decodes it without error."""
    from .bulk import BULK_SPECS
    from .constants import HEADER_SIZE, MAX_FRAME_SIZE_LIMIT, MessageType
    from .errors import WireError
    from .frames import check_header, decode_header
    from .ies import split_ies
    from .messages import decode_body

    pos = 0
    while pos < len(data):
        raw_header = data[pos : pos + HEADER_SIZE]
        if len(raw_header) < HEADER_SIZE:
            raise FuzzFailure("we sent a truncated frame header")
        header = decode_header(raw_header)
        length = header.body_length
        body = data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]
        try:
            check_header(header, MAX_FRAME_SIZE_LIMIT)
        except WireError as exc:
            raise FuzzFailure(f"we sent a bad frame header {raw_header.hex()}: {exc}") from exc
        if len(body) != length:
            raise FuzzFailure(f"we sent a frame shorter than its header {raw_header.hex()}")
        try:
            if header.message_type in BULK_SPECS:  # (v1.1's LIST RESPONSE too)
                split_ies(body)
            else:
                decode_body(MessageType(header.message_type), header.transaction_id, body)
        except (WireError, ValueError) as exc:
            raise FuzzFailure(f"we sent a frame the peer cannot decode: {exc}") from exc
        pos += HEADER_SIZE + length


def _probes(session: Any) -> list[Callable[[], Any]]:
    """Calls a user may make at any moment, right or wrong for the role and the state."""
    from .constants import ErrorCause, MessageType
    from .messages import (
        Hello,
        RegistrationEntry,
        RegistrationResponseEntry,
        UeDeregistrationRequest,
        UeRegistrationRequest,
        UeRegistrationResponse,
    )

    bulk = MessageType.BULK_REGISTRATION_REQUEST
    return [
        lambda: session.send_request(UeRegistrationRequest(9, "ue-probe@gw1.example")),
        lambda: session.send_request(UeDeregistrationRequest(2, "ue-0001@gw1.example")),
        lambda: (session.start_bulk(bulk, 10, 2),
                 [session.send_bulk_entry(10, RegistrationEntry(f"ue-p{n}@gw1.example"))
                  for n in range(3)]),
        lambda: session.start_bulk(bulk, 11, 1 << 30),
        lambda: session.send_response(UeRegistrationResponse(2, "ue-0001@gw1.example", 0)),
        lambda: session.send_bulk_entry(6, RegistrationResponseEntry("ue-0000@gw1.example", 0)),
        lambda: session.send_error(2, ErrorCause.INTERNAL_ERROR, "probe", 100),
        lambda: session.send_goodbye(ErrorCause.NORMAL, None, "probe"),
        lambda: session.send_hello(Hello(1, 2)),
        lambda: session.accept_hello(server_nonce=NONCE, bulk_allowed=True,
                                     ue_authentication_required=False),
        lambda: session.reject_hello(ErrorCause.GATEWAY_NOT_ALLOWED, "probe"),
        lambda: session.next_transaction_id(),
        lambda: session.terminate(ErrorCause.GATEWAY_NOT_ALLOWED, "probe"),
        lambda: session.send_result(2, "ue-0001@gw1.example", 3, 500),
    ]


def probe(session: Any, choice: int) -> None:
    """The calls `choice` picks (its bits 1-7, spread over the 14 calls), in order: each works
    or raises LocalProtocolError (our bug, named), never anything else; what they send is
    well-formed."""
    from .errors import LocalProtocolError

    calls = _probes(session)
    mask = (choice >> 1) * 0x2F1B
    for n, call in enumerate(calls):
        if mask >> n & 1:
            with contextlib.suppress(LocalProtocolError):
                call()
    check_sent(session.data_to_send())


def run_session(role_name: str, data: bytes) -> None:
    """octet 0: context (bit 0: established; bits 1-7: API calls `probe` makes once the
    stream is read), octet 1: chunking; the rest is the stream."""
    from .events import ConnectionClosed

    if len(data) < 2:
        return
    established = bool(data[0] & 1)
    if role_name == "server":
        def make() -> Any:
            return new_server(established)
        user: Callable[[Any, Any], None] = answer
    else:
        def make() -> Any:
            return new_gateway(established)
        user = _no_user
    stream = data[2:]
    whole = drive_session(make, user, stream, None)
    if role_name == "server":
        user = answer
    chunked = drive_session(make, user, stream, _chunks(data[1], len(stream)))
    if whole[0] != chunked[0]:
        raise FuzzFailure(f"events differ by chunking:\n{whole[0]}\n{chunked[0]}")
    if sum(isinstance(e, ConnectionClosed) for e in whole[0]) > 1:
        raise FuzzFailure("ConnectionClosed twice")
    check_sent(whole[1])
    check_sent(chunked[1])
    probe(whole[2], data[0])
    _finish(whole[2])


def run_session_server(data: bytes) -> None:
    run_session("server", data)


def run_session_gateway(data: bytes) -> None:
    run_session("gateway", data)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frames": run_frames,
    "messages": run_messages,
    "session-server": run_session_server,
    "session-gateway": run_session_gateway,
}


# --- seed corpus ----------------------------------------------------------------------------


def find_vectors(explicit: str | None = None) -> Path | None:
    candidates = [Path(explicit)] if explicit else []
    if os.environ.get("MSGD_VECTORS"):
        candidates.append(Path(os.environ["MSGD_VECTORS"]))
    candidates += [REPO.parent / "shared" / "spec" / "vectors" / "v1.json",
                   REPO / "shared" / "spec" / "vectors" / "v1.json"]
    return next((p for p in candidates if p.is_file()), None)


_GATEWAY_SENDS = {0x01, 0x03, 0x04, 0x05, 0x06, 0x10, 0x12, 0x14, 0x16, 0x18, 0x1A}
_SERVER_SENDS = {0x02, 0x03, 0x04, 0x05, 0x06, 0x11, 0x13, 0x15, 0x17, 0x19, 0x1B}
# msgd's own v1.1 vectors (docs/protocol.md §6.5) seed every target beside the spec's.
_V1_1_VECTORS = REPO / "tests" / "wire" / "vectors_v1_1.json"


def seeds(target: str, vectors: dict[str, Any] | None) -> dict[str, bytes]:
    """Named seed inputs for `target`, from the spec vectors (and a few built here)."""
    from .ies import split_ies
    from .messages import ENTRY_SPECS, Hello, encode_message

    sets = [vectors or {}]
    if _V1_1_VECTORS.is_file():
        sets.append(json.loads(_V1_1_VECTORS.read_text()))
    valid = [(v["name"], bytes.fromhex(v["hex"])) for vs in sets for v in vs.get("valid", [])]
    invalid = [(v["name"], v["context"], bytes.fromhex(v["hex"]))
               for vs in sets for v in vs.get("invalid", [])]
    frames = [(n, d) for n, d in valid if len(d) >= 12 and d[0] == 1]
    hello = encode_message(Hello(1, 2, node_name="gw1.example"))
    out: dict[str, bytes] = {}
    if target == "frames":
        for name, data in frames + [(n, d) for n, _, d in invalid]:
            out[name] = b"\x01" + data
        out["all-valid"] = b"\x01" + b"".join(d for _, d in frames)
    elif target == "messages":
        kinds = _message_kinds()
        index = {k: n for n, k in enumerate(kinds)}
        for name, data in frames:
            for (kind, what), n in index.items():
                if kind in ("message", "bulk") and int(what) == data[1]:
                    out[name] = bytes([n]) + data[12:]
            entries = [(i, r) for i, r in _safe_split(split_ies, data[12:]) if i in ENTRY_SPECS]
            for k, (iei, raw) in enumerate(entries):
                out[f"{name}-entry{k}"] = bytes([index[("entry", iei)]]) + raw
        for name, data in valid:
            if data and data[0] == 0x02:  # the credential IE vector
                out[name] = bytes([index[("ie", 0x02)]]) + data[3:]
    else:
        server = target == "session-server"
        sends = _GATEWAY_SENDS if server else _SERVER_SENDS
        mine = [(n, d) for n, d in frames if d[1] in sends and n not in ("hello", "hello_ack")]
        for name, data in mine:
            out[f"after-{name}"] = b"\x01\x00" + data
            out[f"chunked-{name}"] = b"\x01\x05" + data
        if server:
            out["before-hello"] = b"\x00\x03" + hello + b"".join(d for _, d in mine)
            for name, context, data in invalid:
                established = context in ("after HELLO", "server, sync announced")
                out[f"invalid-{name}"] = (b"\x01\x02" if established else b"\x00\x02") + data
        else:
            ack = dict(frames).get("hello_ack")
            if ack:
                out["before-ack"] = b"\x00\x03" + ack + b"".join(d for _, d in mine)
        out["after-all"] = b"\x01\x09" + b"".join(d for _, d in mine)
        for bit in range(1, 8):  # the API probes, each of octet 0's bits 1-7 alone
            for established in (0, 1):
                out[f"probe-{bit}-{established}"] = bytes([1 << bit | established, 9]) + (
                    b"".join(d for _, d in mine[:3]))
    return out


def _safe_split(split: Callable[[bytes], Any], body: bytes) -> list[tuple[int, bytes]]:
    from .errors import WireError

    try:
        return split(body)
    except WireError:
        return []


# --- the corpora ---------------------------------------------------------------------------

# Kept in git, minimised (`--minimise`): inputs that reach code the seeds do not.
CORPUS = REPO / "fuzz" / "corpus"
# What a campaign finds, beside the seeds written from the vectors (ignored by git).
WORK = Path("fuzz-out")


@dataclass(frozen=True)
class Suite:
    """What a runner fuzzes: its targets, their seeds, the code atheris instruments for each
    (directories, whose functions are instrumented once imported), and the line-coverage
    groups `--coverage` prints. msgd.server.fuzz extends wire's with the connection target
    (wire does not import msgd)."""

    module: str
    targets: dict[str, Callable[[bytes], None]]
    seeds: Callable[[str, dict[str, Any] | None], dict[str, bytes]]
    instrument: dict[str, tuple[Path, ...]]
    coverage: dict[str, tuple[Path, ...]]  # label -> files


def _wire_files() -> tuple[Path, ...]:
    here = Path(__file__).resolve().parent
    return tuple(sorted(p for p in here.glob("*.py") if p.name != "fuzz.py"))


def _construct_dir() -> Path:
    import construct

    return Path(construct.__file__).resolve().parent


def _wire_instrument() -> dict[str, tuple[Path, ...]]:
    wire_dir = Path(__file__).resolve().parent
    return {t: (wire_dir,) for t in TARGETS} | {"messages": (wire_dir, _construct_dir())}


def corpus_inputs(suite: Suite, target: str, vectors: dict[str, Any] | None,
                  work: Path | None = None) -> list[tuple[str, bytes]]:
    """Every input of `target`: the seeds, the committed corpus and, if given, a campaign's."""
    out = [(f"seed-{name}", data) for name, data in suite.seeds(target, vectors).items()]
    for directory in (CORPUS / target, work):
        if directory is not None and directory.is_dir():
            out += [(str(p), p.read_bytes()) for p in sorted(directory.iterdir()) if p.is_file()]
    return out


def _arcs(run: Callable[[bytes], None], data: bytes, files: set[str]) -> set[tuple[str, int, int]]:
    """The (file, from line, to line) pairs one input runs in `files` (set coverage of arcs)."""
    arcs: set[tuple[str, int, int]] = set()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        name = frame.f_code.co_filename
        if name not in files:
            return None
        last = [frame.f_lineno]

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line":
                arcs.add((name, last[0], frame.f_lineno))
                last[0] = frame.f_lineno
            return local

        return local

    sys.settrace(tracer)
    try:
        with contextlib.suppress(Exception):
            run(data)
    finally:
        sys.settrace(None)
    return arcs


def minimise(suite: Suite, target: str, vectors: dict[str, Any] | None, work: Path) -> int:
    """Rewrite CORPUS/target with the smallest inputs (of the committed corpus and the
    campaign's) that run an arc the seeds and the smaller ones do not. Returns how many."""
    files = {str(f) for paths in suite.coverage.values() for f in paths}
    run = suite.targets[target]
    seen: set[tuple[str, int, int]] = set()
    for _, data in suite.seeds(target, vectors).items():
        seen |= _arcs(run, data, files)
    candidates = {data for name, data in corpus_inputs(suite, target, vectors, work)
                  if not name.startswith("seed-")}
    kept = []
    for data in sorted(candidates, key=lambda d: (len(d), d)):
        new = _arcs(run, data, files) - seen
        if new:
            seen |= new
            kept.append(data)
    out = CORPUS / target
    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():
        old.unlink()
    for data in kept:
        (out / hashlib.sha1(data).hexdigest()).write_bytes(data)
    return len(kept)


def replay(suite: Suite, targets: Iterable[str], vectors: dict[str, Any] | None,
           work: Path | None = None) -> int:
    """Run every input of each target (seeds, CORPUS and, if given, work/<target>) through
    it, without atheris; raises on the first failure. Returns how many ran."""
    count = 0
    for target in targets:
        run = suite.targets[target]
        inputs = corpus_inputs(suite, target, vectors, work / target if work else None)
        for name, data in inputs:
            try:
                run(data)
            except Exception as exc:
                raise FuzzFailure(f"{target}: {name}: {exc!r}") from exc
            count += 1
    return count


# --- the atheris runner ---------------------------------------------------------------------


def instrument_loaded(directories: Iterable[Path]) -> int:
    """Instrument the functions already imported from `directories` (atheris). Needed because
    `python -m wire.fuzz` imports wire (its __init__ imports every module) before main() runs,
    so `atheris.instrument_imports` sees nothing left to import: since 8201050 made
    wire/__init__ import the whole package, campaigns ran with no coverage feedback at all
    (libFuzzer: "no interesting inputs were found")."""
    import gc
    import types

    import atheris

    roots = tuple(str(d) + os.sep for d in directories)
    skip = {str(Path(__file__).resolve())}
    count = 0
    for obj in gc.get_objects():
        if isinstance(obj, types.FunctionType):
            name = obj.__code__.co_filename
            if name.startswith(roots) and name not in skip and not name.endswith("fuzz.py"):
                atheris.instrument_func(obj)
                count += 1
    return count


def _parser(suite: Suite) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {suite.module}",
        description="Fuzz with atheris (libFuzzer), or replay, minimise and measure the corpora. "
                    "Unknown arguments (e.g. -runs=1000, -jobs=2) go to libFuzzer.")
    parser.add_argument("--seconds", type=int, default=None,
                        help="stop after this many seconds (libFuzzer -max_total_time; default "
                             "60, and 0 with --coverage)")
    parser.add_argument("--target", choices=sorted(suite.targets), default=None,
                        help="default: session-server to fuzz, every target otherwise")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="the campaign's corpus directory (default fuzz-out/corpus/<target>)")
    parser.add_argument("--vectors", default=None, help="path to the spec vectors v1.json")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--replay", action="store_true",
                      help="run the seeds, fuzz/corpus and fuzz-out/corpus of every target "
                           "(or --target T) through it, without atheris")
    mode.add_argument("--minimise", action="store_true",
                      help="rewrite fuzz/corpus/<target> from itself and the campaign's corpus")
    mode.add_argument("--coverage", action="store_true",
                      help="fuzz every target --seconds, then print the line coverage the "
                           "corpora reach")
    return parser


def _vectors(explicit: str | None) -> dict[str, Any] | None:
    path = find_vectors(explicit)
    if path is None:
        print("spec vectors not found; seeding from built-in messages only", file=sys.stderr)
    return json.loads(path.read_text()) if path else None


def main(argv: list[str] | None = None, suite: Suite | None = None) -> int:
    import logging

    suite = suite or WIRE
    args, libfuzzer_args = _parser(suite).parse_known_args(argv)
    logging.getLogger("msgd").setLevel(logging.CRITICAL)  # a refused peer per execution
    targets = [args.target] if args.target else sorted(suite.targets)
    if args.replay:
        print(f"replayed {replay(suite, targets, _vectors(args.vectors), WORK / 'corpus')} inputs")
        return 0
    if args.minimise:
        for target in targets:
            work = args.corpus or WORK / "corpus" / target
            kept = minimise(suite, target, _vectors(args.vectors), work)
            print(f"{target}: {kept} inputs kept in {CORPUS / target}")
        return 0
    if args.coverage:
        return measure(suite, targets, args.seconds or 0, args.vectors)
    args.target = args.target or "session-server"
    return _fuzz(suite, args, libfuzzer_args)


def _fuzz(suite: Suite, args: argparse.Namespace, libfuzzer_args: list[str]) -> int:
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: pip install -e '.[fuzz]'", file=sys.stderr)
        return 2
    target = suite.targets[args.target]
    instrument_loaded(suite.instrument[args.target])
    work = args.corpus or WORK / "corpus" / args.target
    work.mkdir(parents=True, exist_ok=True)
    for name, data in suite.seeds(args.target, _vectors(args.vectors)).items():
        (work / f"seed-{name}").write_bytes(data)
    corpora = [str(work)] + ([str(CORPUS / args.target)]
                             if (CORPUS / args.target).is_dir() else [])
    # Files among the extra arguments are inputs to replay (libFuzzer runs just those).
    replaying = any(Path(a).is_file() for a in libfuzzer_args if not a.startswith("-"))
    seconds = 60 if args.seconds is None else args.seconds
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-artifact_prefix=fuzz-out/",
                   *libfuzzer_args, *([] if replaying else corpora)], target)
    atheris.Fuzz()
    return 0


def measure(suite: Suite, targets: list[str], seconds: int, vectors: str | None) -> int:
    """Fuzz each target `seconds` (if any), then replay every corpus under coverage.py in a
    fresh interpreter (so that lines run at import count) and print each group's line
    coverage. coverage.py's statements, not libFuzzer's edges."""
    import subprocess

    try:
        import coverage
    except ImportError:
        print("coverage is not installed: pip install -e '.[fuzz]'", file=sys.stderr)
        return 2
    extra = ["--vectors", vectors] if vectors else []
    for target in targets if seconds else ():
        subprocess.run([sys.executable, "-m", suite.module, "--target", target,
                        "--seconds", str(seconds), *extra], check=True)
    files = sorted({str(f) for paths in suite.coverage.values() for f in paths})
    data_file = WORK / "coverage.dat"
    WORK.mkdir(exist_ok=True)
    replayed = subprocess.run(
        [sys.executable, "-m", "coverage", "run", f"--data-file={data_file}",
         f"--include={','.join(files)}", "-m", suite.module, "--replay", *extra],
        capture_output=True, text=True)
    if replayed.returncode:
        print(replayed.stdout, replayed.stderr, file=sys.stderr)
        return 1
    print(replayed.stdout.strip(), f"(fuzzed {seconds} s per target first)" if seconds else "")
    cov = coverage.Coverage(data_file=str(data_file))
    cov.load()
    for label, paths in suite.coverage.items():
        total = missed = 0
        for path in paths:
            _, statements, _, missing, _ = cov.analysis2(str(path))
            total += len(statements)
            missed += len(missing)
            print(f"  {path.relative_to(REPO)}: {len(statements) - len(missing)}/"
                  f"{len(statements)}")
        print(f"{label}: {total - missed}/{total} lines, {100 * (total - missed) / total:.1f} %")
    return 0


def _wire_seeds(target: str, vectors: dict[str, Any] | None) -> dict[str, bytes]:
    return seeds(target, vectors)


WIRE = Suite("wire.fuzz", TARGETS, _wire_seeds, _wire_instrument(),
             {"wire/": _wire_files()})


if __name__ == "__main__":
    raise SystemExit(main())
