"""Fuzz target `connection`: the whole server connection adapter over an in-memory transport.

GatewayConnection (with its AnswerQueue, FrameClock and UeRules, all real) is driven by a
program the fuzzer writes: octets from the gateway (frames built from templates, or raw),
reads of what the gateway sent (in chunks, only while reading is not paused), timer firings,
the registrar's completions (the oldest batch first, outcomes chosen by the input), flow
control (pause/resume writing), EOF, the server's GOODBYE and revocation, and the loss of the
transport. The loop and the transport are fakes (`FakeLoop`, `FakeTransport`) and the registry
an in-memory `Registrar` (msgd.registry.port): rule 2 (real sockets) is for behaviour tests.

What counts as a crash (docs/fuzzing.md), besides any exception out of a callback:

* the connection's own catch-all (`fail`, "internal error") running at all;
* an octet written that is not part of a well-formed frame a gateway decodes;
* an answer to no request in progress, a second answer to one request, bulk answers out of the
  order of the entries received, or more of them than entries received;
* an answer whose outcome the registrar has not given yet (a success before its change was
  completed), or a rules cause that contradicts the provisioning;
* anything written after the transport was closed; pause/resume reading out of step;
* a change submitted to the registrar after the gateway was revoked (wire-v1 §4 item 6);
* IDLE_TIMEOUT while the gateway's octets wait unread because we paused reading;
* `connection_ended` not called exactly once; a GOODBYE sent that `closing` does not show;
* at the end, with the registrar's batches all completed and the connection still open, a
  request or entry received but never answered.

`python -m msgd.server.fuzz` runs this target and wire.fuzz's four (same flags as
`python -m wire.fuzz`), and `--coverage` prints the line coverage of wire/ and the adapter.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from msgd.config import GatewayPolicy
from msgd.log import EventLogger
from msgd.ops.metrics import Metrics
from msgd.registry.port import SUCCESS, Change, Decided, Outcome
from msgd.server.connection import GatewayConnection
from msgd.server.ports import ConnectionSettings, Refusal
from msgd.server.rules import UeRules
from wire import fuzz as wire_fuzz
from wire.bulk import BulkReader, bulk_header_ies
from wire.constants import (
    ALPN_PROTOCOL,
    BULK_RESPONSES,
    HEADER_SIZE,
    IEI,
    MAX_FRAME_SIZE_LIMIT,
    ErrorCause,
    FailureCause,
    MessageType,
    Operation,
    Result,
)
from wire.credential import compute_proof
from wire.errors import EntryError, WireError
from wire.events import (
    BulkEntriesReceived,
    BulkStarted,
    ConnectionClosed,
    ErrorReceived,
    RequestReceived,
    TransactionFailed,
)
from wire.frames import check_header, decode_header, encode_frame
from wire.fuzz import FuzzFailure
from wire.ies import encode_ie, split_ies
from wire.messages import (
    ENTRY_DECODERS,
    DeregistrationEntry,
    Error,
    Goodbye,
    Hello,
    Keepalive,
    KeepaliveAck,
    Profile,
    RegistrationEntry,
    UeDeregistrationRequest,
    UeRegistrationRequest,
    decode_body,
    encode_entry,
    encode_message,
)
from wire.session import Limits

__all__ = ["Harness", "run_connection", "seeds"]

GATEWAY = "gw1.example"
# UEs: provisioned for this gateway (two of them), for another gateway only, not provisioned.
KEY = bytes(range(32))
UES = ("ue-0001@gw1.example", "ue-0002@gw1.example", "ue-other@gw2.example", "ue-none@x")
PROVISIONED: dict[str, tuple[bytes, frozenset[str]]] = {
    UES[0]: (KEY, frozenset({GATEWAY})),
    UES[1]: (KEY, frozenset({GATEWAY, "gw2.example"})),
    UES[2]: (KEY, frozenset({"gw2.example"})),
}
# Causes only the rules give (never the registrar), and those only the registrar gives.
_RULES_ONLY = {FailureCause.UE_NOT_PROVISIONED, FailureCause.GATEWAY_NOT_AUTHORIZED,
               FailureCause.INVALID_ENTRY}
_REGISTRAR_OUTCOMES = (
    SUCCESS, SUCCESS, SUCCESS, Outcome(FailureCause.NOT_REGISTERED),
    Outcome(FailureCause.REGISTERED_VIA_OTHER_GATEWAY),
    Outcome(FailureCause.SERVER_BUSY, 500), Outcome(FailureCause.STORAGE_FAILURE),
)
_SINGLE_RESPONSE = {
    MessageType.UE_REGISTRATION_RESPONSE: MessageType.UE_REGISTRATION_REQUEST,
    MessageType.UE_DEREGISTRATION_RESPONSE: MessageType.UE_DEREGISTRATION_REQUEST,
}
_BULK_RESPONSE = {
    MessageType.BULK_REGISTRATION_RESPONSE: MessageType.BULK_REGISTRATION_REQUEST,
    MessageType.BULK_DEREGISTRATION_RESPONSE: MessageType.BULK_DEREGISTRATION_REQUEST,
}
_INBOUND_MAX = 32 * 1024
# Reads and timer firings one callback may cause before the harness calls it a livelock.
_READY_LIMIT = 10_000

# (a registration?, UE Service ID, cause, Retry after): how many outcomes so far.
_Key = tuple[bool, str, FailureCause | None, int | None]

_QUIET = logging.getLogger("msgd.fuzz.quiet")
_QUIET.propagate = False
_QUIET.setLevel(logging.CRITICAL + 1)
_METRICS: list[Metrics] = []


# --- the fakes ----------------------------------------------------------------------------------


class _Handle:
    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The parts of an asyncio loop a connection uses; time moves only when the harness says."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[_Handle] = []
        self.ready: deque[_Handle] = deque()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> _Handle:
        handle = _Handle(when, callback, args)
        self.timers.append(handle)
        return handle

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> _Handle:
        return self.call_at(self.now + delay, callback, *args)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> _Handle:
        handle = _Handle(self.now, callback, args)
        self.ready.append(handle)
        return handle

    def run_ready(self) -> None:
        """What asyncio runs before the next I/O: the callbacks made ready (call_soon)."""
        for _ in range(_READY_LIMIT):
            if not self.ready:
                return
            handle = self.ready.popleft()
            if not handle.cancelled:
                handle.callback(*handle.args)
        raise FuzzFailure("call_soon callbacks keep scheduling each other (livelock)")

    def fire_next(self, until: float | None = None) -> bool:
        """Advance to the earliest live timer (not past `until`) and run it."""
        live = [t for t in self.timers if not t.cancelled]
        self.timers = live
        if not live:
            return False
        first = min(live, key=lambda t: t.when)
        if until is not None and first.when > until:
            return False
        live.remove(first)
        self.now = max(self.now, first.when)
        first.callback(*first.args)
        return True


class _SslObject:
    def __init__(self, alpn: str | None, identity: str) -> None:
        self._alpn = alpn
        self._identity = identity

    def selected_alpn_protocol(self) -> str | None:
        return self._alpn

    def getpeercert(self, binary_form: bool = False) -> Any:
        if binary_form:
            return b"0\x03\x02\x01\x00"  # not parsed: revocation is the host's answer
        return {"subject": ((("commonName", self._identity),),)}


class FakeTransport:
    """An asyncio transport that hands what is written to the harness's checks at once."""

    def __init__(self, harness: Harness, alpn: str | None) -> None:
        self.harness = harness
        self.ssl_object = _SslObject(alpn, GATEWAY)
        self.closing = False
        self.aborted = False
        self.reading_paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 50000), "ssl_object": self.ssl_object}.get(
            name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        if self.closing:
            raise FuzzFailure("wrote to a transport already closed")
        self.harness.output.feed(data)

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        if self.reading_paused:
            raise FuzzFailure("pause_reading while paused")  # asyncio ignores it; we do not
        self.reading_paused = True

    def resume_reading(self) -> None:
        if not self.reading_paused:
            raise FuzzFailure("resume_reading while not paused")
        self.reading_paused = False

    def close(self) -> None:
        self.closing = True  # connection_lost once the flush completes (op FLUSHED)

    def abort(self) -> None:
        if not self.aborted:
            self.closing = self.aborted = True
            self.harness.loop.call_soon(self.harness.lose, None)


class MemoryRegistrar:
    """The registry port in memory: batches wait until the harness completes them, oldest
    first (the port's promise), or are decided inside `submit` (`synchronous`). A completed
    batch is decided as the embedded registry decides it: by a callback the loop runs soon,
    or earlier by `settle_completed` (which the connection calls after each read)."""

    def __init__(self, harness: Harness, synchronous: bool) -> None:
        self.harness = harness
        self.synchronous = synchronous
        self.pending: deque[tuple[Sequence[Change], Decided]] = deque()
        self.finished: deque[tuple[Decided, list[Outcome]]] = deque()
        self.closed = False

    def submit(self, gateway: str, changes: Sequence[Change], decided: Decided) -> None:
        if gateway != GATEWAY:
            raise FuzzFailure(f"batch submitted for {gateway!r}")
        if self.harness.revoked:
            # wire-v1 §4 item 6: once revoked, no further request or entry is decided.
            raise FuzzFailure("a change submitted after the gateway was revoked")
        if self.closed:
            return
        self.pending.append((list(changes), decided))
        if self.synchronous:
            self.complete(self.harness.byte())

    def complete(self, choice: int) -> bool:
        if not self.pending:
            return False
        changes, decided = self.pending.popleft()
        outcomes = []
        for k, change in enumerate(changes):
            outcome = _REGISTRAR_OUTCOMES[(choice + 3 * k) % len(_REGISTRAR_OUTCOMES)]
            if change.register and outcome.cause is FailureCause.NOT_REGISTERED:
                outcome = SUCCESS
            if not change.register and outcome.ok and change.verdict is not None:
                outcome = Outcome(change.verdict)
            outcomes.append(outcome)
            self.harness.decided[(change.register, change.ue_service_id, outcome.cause,
                                  outcome.retry_after)] += 1
        if self.synchronous:
            decided(outcomes)
        else:
            self.finished.append((decided, outcomes))
            self.harness.loop.call_soon(self.settle_completed)
        return True

    def settle_completed(self) -> None:
        finished = self.finished
        while finished:
            decided, outcomes = finished.popleft()
            decided(outcomes)


class _NoSyncReads:
    """RegistryReads without wire v1.1's sync reads: the harness's server does not announce
    Sync supported (msgd.server.sync answers in a task on a real event loop), so the session
    refuses DIGEST / LIST REQUESTs as UNKNOWN_MESSAGE_TYPE, a path the target still covers."""


class _Host:
    """The server as a connection sees it (msgd.server.ports.ConnectionHost)."""

    def __init__(self, harness: Harness, config: int, settings: ConnectionSettings) -> None:
        self.loop = harness.loop
        if not _METRICS:
            _METRICS.append(Metrics())
        self.metrics = _METRICS[0]
        self.rules = UeRules(PROVISIONED.get)
        self.registrar = harness.registrar
        self.reads = _NoSyncReads()
        self.settings = settings
        self._config = config
        self.started = self.ended = 0

    def admit(self, identity: str | None) -> GatewayPolicy | Refusal:
        mode = self._config & 7
        if mode == 6:
            return Refusal(ErrorCause.GATEWAY_NOT_ALLOWED, "not allowed", "unknown", "fuzz")
        if mode == 7:
            return Refusal(ErrorCause.OVERLOADED, "storm", "damped", "fuzz", retry_after=2500)
        assert identity is not None
        return GatewayPolicy(identity, ue_authentication=bool(self._config & 8),
                             bulk_allowed=not self._config & 16)

    def refuse_request(self, what: str, unsubmitted: int = 0) -> int | None:
        """Overload (docs/protocol.md §7) as the fuzzer chooses: mode 4 refuses singles,
        mode 5 every new request, with a Retry after."""
        mode = self._config & 7
        if mode == 5 or (mode == 4 and what == "single"):
            return 1500
        return None

    def revoked_since_handshake(self, conn: Any, peer_der: bytes | None) -> bool:
        return self._config >> 6 == 2

    def connection_started(self, conn: Any) -> None:
        self.started += 1

    def connection_ended(self, conn: Any) -> None:
        self.ended += 1


# --- what the gateway receives ------------------------------------------------------------------


class _Txn:
    __slots__ = ("answered", "entries", "reader", "request_type", "uid")

    def __init__(self, request_type: MessageType, uid: str = "") -> None:
        self.request_type = request_type
        self.uid = uid
        self.entries: list[tuple[str, bool]] = []  # (ue_service_id, decoded) per entry
        self.answered = 0
        self.reader: BulkReader | None = None  # its bulk response, once a frame of it came


class OutputChecker:
    """Decodes what the connection writes, frame by frame, and checks each answer against the
    requests the session delivered (`open`) and the registrar's outcomes (`decided`).

    `open` holds, per transaction id, the transactions still owed an answer, oldest first:
    the session ends a transaction when it queues the final answer, which the connection
    writes at the end of its turn, so a gateway that reuses the id at once (a protocol
    error on its side) has its new request delivered before the old answer is written."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.buf = bytearray()
        self.open: dict[int, deque[_Txn]] = {}
        self.answered: defaultdict[_Key, int] = defaultdict(int)
        self.keepalive_tid: int | None = None
        self.frames = 0
        self.session_closed = False  # what is still open then is owed nothing

    def feed(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= HEADER_SIZE:
            header = decode_header(bytes(buf[:HEADER_SIZE]))
            end = HEADER_SIZE + header.body_length
            if len(buf) < end:
                break
            body = bytes(buf[HEADER_SIZE:end])
            del buf[:end]
            try:
                check_header(header, MAX_FRAME_SIZE_LIMIT)
                self._frame(header, body)
            except WireError as exc:
                raise FuzzFailure(f"wrote a frame a gateway cannot decode: {exc!r}") from exc
            self.frames += 1

    def _frame(self, header: Any, body: bytes) -> None:
        mtype = MessageType(header.message_type)
        tid = header.transaction_id
        if mtype in BULK_RESPONSES:
            self._bulk_frame(mtype, tid, header.more, body)
            return
        if header.more:
            raise FuzzFailure(f"MORE set on {mtype.name}")
        message = decode_body(mtype, tid, body)
        if mtype in _SINGLE_RESPONSE:
            txn = self._oldest(tid)
            if txn is None or txn.request_type is not _SINGLE_RESPONSE[mtype] or txn.entries:
                raise FuzzFailure(f"{mtype.name} {tid}: no such request in progress")
            self._answered(tid)
            if message.ue_service_id != txn.uid:
                raise FuzzFailure(f"{mtype.name} {tid}: for {message.ue_service_id!r}, "
                                  f"asked for {txn.uid!r}")
            self._outcome(mtype, message)
        # An ERROR the session sends ends its transaction with a TransactionFailed event
        # (`event`); the frame alone does not say which (TRANSACTION_ID_IN_USE, second HELLO).
        elif mtype is MessageType.KEEPALIVE:
            self.keepalive_tid = tid

    def _oldest(self, tid: int) -> _Txn | None:
        txns = self.open.get(tid)
        return txns[0] if txns else None

    def _answered(self, tid: int) -> None:
        """The oldest transaction of `tid` got its final answer."""
        txns = self.open[tid]
        txns.popleft()
        if not txns:
            del self.open[tid]

    def _ended(self, tid: int) -> None:
        """The session ended the newest transaction of `tid` (TransactionFailed, ERROR)."""
        txns = self.open.get(tid)
        if txns:
            txns.pop()
            if not txns:
                del self.open[tid]

    def _bulk_frame(self, mtype: MessageType, tid: int, more: bool, body: bytes) -> None:
        txn = self._oldest(tid)
        if txn is None or txn.request_type is not _BULK_RESPONSE[mtype]:
            raise FuzzFailure(f"{mtype.name} {tid}: no such bulk in progress")
        reader = txn.reader
        first = reader is None
        if reader is None:
            reader = txn.reader = BulkReader(mtype, ENTRY_DECODERS)
        reader.start_frame(first)
        for iei, raw in split_ies(body):
            item = reader.feed_ie(iei, raw)
            if item is None or item[0] != "entry":
                continue
            entry = item[1]
            if isinstance(entry, EntryError):
                raise FuzzFailure(f"{mtype.name} {tid}: wrote a bad entry: {entry}")
            if txn.answered >= len(txn.entries):
                raise FuzzFailure(f"{mtype.name} {tid}: answer {txn.answered} to an entry "
                                  f"not received ({len(txn.entries)} were)")
            uid, decoded = txn.entries[txn.answered]
            if entry.ue_service_id != uid:
                raise FuzzFailure(f"{mtype.name} {tid}: answer {txn.answered} is for "
                                  f"{entry.ue_service_id!r}, entry was {uid!r}")
            if not decoded and entry.failure_cause != FailureCause.INVALID_ENTRY:
                raise FuzzFailure(f"{mtype.name} {tid}: a malformed entry not INVALID_ENTRY")
            txn.answered += 1
            self._outcome(mtype, entry)
        reader.end_frame()
        if not more:
            if reader.entries != reader.count:
                raise FuzzFailure(f"{mtype.name} {tid}: {reader.count} announced, "
                                  f"{reader.entries} sent")
            self._answered(tid)

    def _outcome(self, mtype: MessageType, answer: Any) -> None:
        """The cause of one answer is the registrar's (already given) or the rules' (right)."""
        uid = answer.ue_service_id
        cause = None if answer.result == Result.SUCCESS else FailureCause(answer.failure_cause)
        registration = mtype in (MessageType.UE_REGISTRATION_RESPONSE,
                                 MessageType.BULK_REGISTRATION_RESPONSE)
        # With the Retry after: the overload refusal below (1500 ms) is a SERVER_BUSY too, and
        # must not take a count the registrar's (500 ms) gave another answer for this UE.
        key = (registration, uid, cause, answer.retry_after)
        if self.answered[key] < self.harness.decided[key]:
            self.answered[key] += 1
            return
        if (cause is FailureCause.SERVER_BUSY and answer.retry_after == 1500
                and mtype in (MessageType.UE_REGISTRATION_RESPONSE,
                              MessageType.UE_DEREGISTRATION_RESPONSE)
                and self.harness.host.refuse_request("single") is not None):
            return  # refused by the overload contract (docs/protocol.md §7), as _Host chose
        if cause is None or not (cause in _RULES_ONLY or (
                registration and cause is FailureCause.AUTHENTICATION_FAILED)):
            raise FuzzFailure(f"{mtype.name}: {uid!r} answered {cause!r} before the registrar "
                              "decided it")
        provisioned = PROVISIONED.get(uid)
        if (cause is FailureCause.UE_NOT_PROVISIONED) != (provisioned is None):
            raise FuzzFailure(f"{uid!r}: UE_NOT_PROVISIONED is wrong")
        if cause is FailureCause.GATEWAY_NOT_AUTHORIZED and GATEWAY in provisioned[1]:
            raise FuzzFailure(f"{uid!r}: GATEWAY_NOT_AUTHORIZED is wrong")

    def event(self, event: Any) -> None:
        """An event the session handed the connection: what it must answer from now on."""
        kind = type(event)
        if kind is RequestReceived:
            request = event.request
            self.open.setdefault(request.transaction_id, deque()).append(
                _Txn(request.message_type, request.ue_service_id))
        elif kind is BulkStarted:
            self.open.setdefault(event.transaction_id, deque()).append(_Txn(event.message_type))
        elif kind is BulkEntriesReceived:
            txn = self.open[event.transaction_id][-1]
            if event.first_index != len(txn.entries):
                raise FuzzFailure(f"bulk {event.transaction_id}: entries from "
                                  f"{event.first_index}, {len(txn.entries)} seen")
            txn.entries += [(e.ue_service_id or "", type(e) is not EntryError)
                            for e in event.entries]
        elif kind is TransactionFailed:
            self._ended(event.transaction_id)
        elif kind is ErrorReceived:
            self._ended(event.error.transaction_id)
        elif kind is ConnectionClosed:
            # `open` stays: answers the session queued before it closed (a bulk answered by
            # the rules, then a fatal frame in the same read) are written after this event,
            # at the end of the turn, ahead of the ERROR. Nothing new can be queued now.
            self.session_closed = True
            if event.cause is ErrorCause.IDLE_TIMEOUT:
                self.harness.check_idle()


# --- the program --------------------------------------------------------------------------------


class Harness:
    """One connection, driven by one input (see `run_connection` for its layout)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.loop = FakeLoop()
        self.output = OutputChecker(self)
        self.decided: defaultdict[_Key, int] = defaultdict(int)  # the registrar's outcomes
        self.inbound = bytearray()
        self.lost = False
        self.eof = False
        self.revoked = False
        config, limits = self.byte(), self.byte()
        self.registrar = MemoryRegistrar(self, synchronous=bool(config & 32))
        settings = ConnectionSettings(
            limits=Limits(max_frame_size=4096 << (limits & 3), max_bulk_entries=8,
                          max_outstanding=(2, 4, 8, 64)[(limits >> 2) & 3],
                          keepalive_interval=5, hello_timeout=3.0),
            bulk_window=(1, 3, 8, 4096)[(limits >> 4) & 3], frame_timeout=2.0,
            node_name="msgd.fuzz" if limits & 64 else None)
        self.host = _Host(self, config, settings)
        self.transport = FakeTransport(self, None if config >> 6 == 3 else ALPN_PROTOCOL)
        self.conn = conn = GatewayConnection(self.host, accepted_at=0.0)  # type: ignore[arg-type]
        conn.fail = self._fail  # type: ignore[method-assign]
        conn.connection_made(self.transport)  # type: ignore[arg-type]
        conn.log = EventLogger(_QUIET)
        session = conn.session
        if session is not None:
            take = session.next_event
            tap = self.output.event

            def next_event() -> Any:
                event = take()
                tap(event)
                return event

            session.next_event = next_event  # type: ignore[method-assign]
            take_single = session.take_single_request

            def take_single_request(data: bytes, now: float) -> Any:
                # The second door of the receive path (docs/performance.md, "2026-12-07
                # (afternoon)"): a request it takes is an event the connection must answer.
                request = take_single(data, now)
                if request is not None:
                    tap(RequestReceived(request))
                return request

            session.take_single_request = take_single_request  # type: ignore[method-assign]

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def _fail(self, exc: Exception) -> None:
        raise FuzzFailure(f"the connection failed internally: {exc!r}") from exc

    def check_idle(self) -> None:
        """An idle timeout is fair only if the peer was silent, not if we did not read it."""
        conn = self.conn
        if self.inbound and conn._reading_paused and not conn._writing_paused:
            raise FuzzFailure("IDLE_TIMEOUT while the peer's octets waited unread: we had "
                              "paused reading (answers window or backlog), not the peer")

    def lose(self, exc: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            self.conn.connection_lost(exc)

    # --- ops ---

    def run(self) -> None:
        ops = self.OPS
        while self.pos < len(self.data) and not self.lost:
            ops[self.byte() % len(ops)](self)
            self.loop.run_ready()
        self.finish()

    def op_frame(self) -> None:
        self.inbound += self.template(self.byte(), self.byte(), self.byte())

    def op_raw(self) -> None:
        size = self.byte() % 48
        self.inbound += self.data[self.pos : self.pos + size]
        self.pos += size

    def op_flood(self) -> None:
        """Many copies of one frame: past the connection's per-turn budgets (256 events,
        16 KiB), which a program of at most 4 KiB cannot reach otherwise."""
        count = 1 + self.byte() * 4
        frame = self.template(self.byte(), self.byte(), self.byte())
        # At most 32 KiB waiting (twice a turn's octets): more costs time, not coverage.
        count = min(count, max(0, _INBOUND_MAX - len(self.inbound)) // len(frame))
        self.inbound += frame * count

    def _can_read(self) -> bool:
        # TLS still delivers what arrived while it flushes after close(); not after abort().
        return bool(self.inbound) and not (self.transport.reading_paused or self.eof
                                           or self.transport.aborted or self.lost)

    def op_read(self) -> None:
        size = 1 + self.byte() * 8
        if self._can_read():
            chunk = bytes(self.inbound[:size])
            del self.inbound[:size]
            self.conn.data_received(chunk)
            self._check_window()

    def op_read_all(self) -> None:
        """One read of up to 256 KiB, as uvloop does."""
        if self._can_read():
            chunk = bytes(self.inbound[: 256 * 1024])
            del self.inbound[: 256 * 1024]
            self.conn.data_received(chunk)
            self._check_window()

    def _check_window(self) -> None:
        """A read that leaves `bulk_window` answers owed stops reading (back-pressure: the
        gateway's next octets wait in TCP, not in our memory), whichever way it was read."""
        conn = self.conn
        if (not conn._closed and not self.transport.reading_paused
                and conn._answers.unanswered >= conn.server.settings.bulk_window):
            raise FuzzFailure(f"{conn._answers.unanswered} answers owed, bulk_window "
                              f"{conn.server.settings.bulk_window}, and still reading")

    def op_timer(self) -> None:
        self.loop.fire_next()

    def op_sleep(self) -> None:
        until = self.loop.now + self.byte() / 16
        while self.loop.fire_next(until):
            self.loop.run_ready()
        self.loop.now = until

    def op_complete(self) -> None:
        self.registrar.complete(self.byte())

    def op_complete_then_read(self) -> None:
        """The registrar completes its oldest batch and a read comes before the loop runs the
        callback that decides it (in msgd: the writer's completion queued behind other
        connections' reads): the read's settle_completed decides it, within data_received."""
        self.registrar.complete(self.byte())
        self.op_read()

    def op_pause_writing(self) -> None:
        if not self.transport.closing:
            self.conn.pause_writing()

    def op_resume_writing(self) -> None:
        if not self.transport.closing:
            self.conn.resume_writing()

    def op_eof(self) -> None:
        if not (self.transport.aborted or self.lost or self.eof
                or self.transport.reading_paused):
            self.inbound.clear()
            self.eof = True
            if not self.conn.eof_received():
                self.transport.closing = True  # asyncio closes the transport (half-close off)

    def op_goodbye(self) -> None:
        choice = self.byte()
        cause = (ErrorCause.SHUTTING_DOWN, ErrorCause.NORMAL, ErrorCause.OVERLOADED)[choice % 3]
        session = self.conn.session
        was_open = session is not None and not self.conn._closed and not session.is_closed
        self.conn.goodbye(cause, "fuzz", 1000 if choice & 4 else None)
        if was_open and not self.conn.closing:
            raise FuzzFailure("GOODBYE sent but the connection does not say it is closing")

    def op_revoke(self) -> None:
        if self.byte() & 1:
            self.conn.revoke("fuzz")
            self.revoked = True

    def op_flushed(self) -> None:
        if self.transport.closing:
            self.lose(None)

    def op_registry_closed(self) -> None:
        if self.byte() == 0xFF:
            self.registrar.closed = True
            self.registrar.pending.clear()

    def op_lost(self) -> None:
        if self.byte() & 1:
            self.lose(ConnectionResetError("fuzz") if self.byte() & 1 else None)

    OPS: tuple[Callable[[Harness], None], ...] = (
        op_frame, op_frame, op_frame, op_read, op_read, op_raw, op_timer, op_sleep,
        op_complete, op_complete_then_read, op_pause_writing, op_resume_writing, op_eof, op_goodbye,
        op_revoke, op_flushed, op_registry_closed, op_lost, op_flood, op_read_all,
    )

    def template(self, which: int, a: int, b: int) -> bytes:
        """One frame (or several, for a bulk) from the gateway, valid unless `b` says not."""
        tid = 1 + a % 8
        uid = UES[b % len(UES)]
        kind = which % 10
        if kind == 0:
            return encode_message(Hello(tid, 1 + (b & 1), node_name=GATEWAY if b & 2 else None))
        if kind in (1, 2):
            cred = self.credential(b >> 2, Operation.REGISTRATION, uid)
            profile = Profile(ue_type=1, triggering_port=b) if b & 64 else None
            return encode_message(UeRegistrationRequest(tid, uid, cred, profile))
        if kind == 3:
            cred = self.credential(b >> 2, Operation.DEREGISTRATION, uid)
            return encode_message(UeDeregistrationRequest(tid, uid, cred))
        if kind in (4, 5):
            return self.bulk(kind == 4, tid, b)
        if kind == 6:
            return encode_message(Keepalive(tid))
        if kind == 7:
            ack = self.output.keepalive_tid if self.output.keepalive_tid is not None else tid
            return encode_message(KeepaliveAck(ack))
        if kind == 8:
            return encode_message(Error(tid, (0, 5, 9, 15)[b & 3]))
        return encode_message(Goodbye(tid, int(ErrorCause.NORMAL)))

    def credential(self, choice: int, op: Operation, uid: str) -> bytes | None:
        nonce = self.conn.nonce
        if choice & 3 == 0 or len(nonce) != 32:
            return None
        proof = compute_proof(KEY, nonce, op, uid)
        return proof if choice & 3 != 3 else bytes(32)

    def bulk(self, registration: bool, tid: int, b: int) -> bytes:
        """A bulk request of 1..4 entries, one or two per frame; `b` picks the UEs, whether
        one entry is malformed and whether the announced number lies."""
        count = 1 + (b & 3)
        mtype = (MessageType.BULK_REGISTRATION_REQUEST if registration
                 else MessageType.BULK_DEREGISTRATION_REQUEST)
        op = Operation.REGISTRATION if registration else Operation.DEREGISTRATION
        ies = []
        for k in range(count):
            uid = UES[(b + k) % len(UES)]
            cred = self.credential(b >> 4, op, uid)
            entry = (RegistrationEntry(uid, cred) if registration
                     else DeregistrationEntry(uid, cred))
            ies.append(encode_entry(entry))
        if b & 4:  # an entry with a one-octet credential: INVALID_ENTRY
            iei = IEI.REGISTRATION_ENTRY if registration else IEI.DEREGISTRATION_ENTRY
            ies[-1] = encode_ie(iei, encode_ie(IEI.UE_SERVICE_ID, UES[0].encode())
                                + encode_ie(IEI.UE_CREDENTIAL, b"\x00"))
        announced = count + (1 if b & 0x80 else 0)
        per = 1 + ((b >> 3) & 1)
        frames = []
        for start in range(0, count, per):
            head = bulk_header_ies(mtype, announced) if start == 0 else b""
            body = head + b"".join(ies[start : start + per])
            frames.append(encode_frame(mtype, tid, body, more=start + per < count))
        return b"".join(frames)

    def finish(self) -> None:
        """The gateway stops; the registrar completes everything it holds. A connection still
        open now owes an answer to every request and entry it received."""
        loop = self.loop
        if self.lost:
            return
        if self.conn._writing_paused and not self.transport.closing:
            self.conn.resume_writing()
        loop.run_ready()
        for _ in range(_READY_LIMIT):
            while self.registrar.complete(0):
                loop.run_ready()
            if not self._can_read() or self.transport.closing:
                break
            self.conn.data_received(bytes(self.inbound))
            self.inbound.clear()
            loop.run_ready()
        if not self.transport.closing and not self.registrar.closed and not self.lost:
            self._check_all_answered()
        for _ in range(50):  # timers (keepalive, frame clock, abort) until the session ends
            if self.lost or not loop.fire_next():
                break
            loop.run_ready()
        if self.registrar.closed and not self.transport.closing:
            # Answers that never come hold reading paused, and with it the keepalive (we are
            # silent, not the peer): the daemon's shutdown ends such a connection.
            self.conn.goodbye(ErrorCause.SHUTTING_DOWN)
            self.conn.abort()
            loop.run_ready()
        if self.transport.closing:
            self.lose(None)
        if self.host.started and self.host.ended != 1:
            raise FuzzFailure(f"connection_ended called {self.host.ended} times")

    def _check_all_answered(self) -> None:
        if self.transport.reading_paused and self.conn._backlog:
            return  # events still waiting in the session (fairness)
        if self.output.session_closed:
            return
        for tid, txns in self.output.open.items():
            for txn in txns:
                if txn.answered < len(txn.entries) or (not txn.entries and txn.uid):
                    raise FuzzFailure(f"transaction {tid} ({txn.request_type.name}) has "
                                      f"answers owed: {txn.answered} of "
                                      f"{len(txn.entries) or 1} sent")


def run_connection(data: bytes) -> None:
    """octet 0: the host (admission, UE authentication, bulk allowed, a synchronous registrar,
    bad ALPN or a certificate revoked during the handshake); octet 1: the limits (frame size,
    outstanding, bulk window, node name); then ops, each an octet and its arguments."""
    if len(data) < 2:
        return
    Harness(data).run()


TARGETS: dict[str, Callable[[bytes], None]] = {"connection": run_connection}


def seeds() -> dict[str, bytes]:
    """Hand-written programs that reach each part of the adapter (the corpus starts here)."""
    op = {f.__name__[3:]: bytes([n]) for n, f in reversed(list(enumerate(Harness.OPS)))}

    def frame(which: int, a: int = 0, b: int = 0) -> bytes:
        return op["frame"] + bytes([which, a, b])

    hello = frame(0, 0, 2) + op["read"] + b"\xff"
    read = op["read"] + b"\xff"
    done = op["complete"] + b"\x00"
    out = {
        "hello": b"\x00\x00" + hello,
        "register": b"\x00\x00" + hello + frame(1, 1, 4) + read + done,
        "register-sync": b"\x20\x00" + hello + frame(1, 1, 4) + frame(3, 2, 4) + read,
        "deregister-auth": b"\x08\x00" + hello + frame(3, 1, 8) + frame(3, 2, 12) + read
        + done + done,
        "bulk": b"\x00\x00" + hello + frame(4, 1, 3) + frame(5, 2, 0x8a) + read + done + done,
        "bulk-window": b"\x00\x10" + hello + frame(4, 1, 7) + read + done + read + done,
        "rules": b"\x08\x00" + hello + frame(1, 1, 2) + frame(1, 2, 3) + frame(1, 3, 0x0c)
        + read + done,
        "keepalive": b"\x00\x00" + hello + op["sleep"] + b"\x60" + frame(7) + read
        + op["sleep"] + b"\xff" + op["sleep"] + b"\xff",
        "slow-frame": b"\x00\x00" + hello + frame(1, 1, 0) + op["read"] + b"\x00"
        + op["sleep"] + b"\x40",
        "goodbye": b"\x00\x00" + hello + frame(1, 1, 4) + read + op["goodbye"] + b"\x04"
        + done + op["flushed"],
        "revoke": b"\x00\x00" + hello + frame(4, 1, 1) + read + op["revoke"] + b"\x01",
        "peer-goodbye": b"\x00\x00" + hello + frame(1, 1, 4) + frame(9) + read + done,
        "peer-error": b"\x00\x00" + hello + frame(4, 1, 3) + read + frame(8, 1, 0) + read
        + done,
        "pause-writing": b"\x00\x00" + hello + op["pause_writing"] + frame(1, 1, 0) + read
        + done + op["resume_writing"],
        "eof": b"\x00\x00" + hello + frame(1, 1, 4) + read + op["eof"] + done,
        "refused": b"\x06\x00" + hello,
        "damped": b"\x07\x00" + hello,
        "bad-alpn": b"\xc0\x00" + hello,
        "revoked-handshake": b"\x80\x00" + hello,
        "flood": b"\x00\x30" + hello + (frame(6, 1) * 40) + read + read + read,
        # 301 second HELLOs: 301 events, over the 256 of one turn.
        "flood-events": b"\x00\x00" + hello + op["flood"] + b"\x4b\x00\x00\x00"
        + op["read_all"] + frame(1, 1, 4) + op["read_all"] + done,
        # 2 001 KEEPALIVEs (24 KiB) in one read, then EOF behind them: over 16 KiB a turn.
        "flood-octets": b"\x00\x00" + hello + op["flood"] + b"\xfa\x06\x00\x00"
        + op["read_all"] + op["eof"],
        "lost": b"\x00\x00" + hello + frame(4, 1, 3) + read + op["lost"] + b"\x01\x01",
    }
    return out


def _seeds(target: str, vectors: dict[str, Any] | None) -> dict[str, bytes]:
    return seeds() if target in TARGETS else wire_fuzz.seeds(target, vectors)


_HERE = Path(__file__).resolve().parent
SUITE = wire_fuzz.Suite(
    "msgd.server.fuzz",
    wire_fuzz.TARGETS | TARGETS,
    _seeds,
    wire_fuzz.WIRE.instrument | {"connection": (_HERE, *wire_fuzz.WIRE.instrument["frames"])},
    wire_fuzz.WIRE.coverage | {
        "adapter": tuple(_HERE / f for f in ("connection.py", "answers.py", "frame_clock.py")),
        "rules": (_HERE / "rules.py",),
    },
)


def main(argv: list[str] | None = None) -> int:
    """`python -m wire.fuzz`, with the connection target, and the adapter in --coverage."""
    return wire_fuzz.main(argv, SUITE)


if __name__ == "__main__":
    raise SystemExit(main())
