"""The sans-IO session of wire-v1 §4–§5, for both roles (server and gateway).

Rule 1 (h11): every state and transition of a session is in this file, as data.
Rule 2: no I/O and no clock. Bytes come in through `receive_data(data, now)`, events come out of
`next_event()`, messages go in through the `send_*` methods and bytes come out of
`data_to_send()`. Time is only ever the `now` the caller passes (aioquic's `get_timer()` /
`handle_timer(now)`).

Role checks (who sends HELLO, which transaction ids are whose) live in `_role_allows()` and
`_peer_tid_ok()`; the tables themselves are role-agnostic.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .constants import (
    BULK_MESSAGES,
    BULK_REQUESTS,
    CLOSES_CONNECTION,
    DEFAULT_HELLO_TIMEOUT,
    DEFAULT_KEEPALIVE_INTERVAL,
    DEFAULT_MAX_FRAME_SIZE,
    MAX_FRAME_SIZE_LIMIT,
    MAX_TID,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    RESPONSE_TO,
    SERVER_TID_BIT,
    SINGLE_REQUESTS,
    ErrorCause,
    MessageType,
)
from .errors import (
    InvalidFrame,
    InvalidMessage,
    LocalProtocolError,
    MessageError,
    SessionError,
    UnknownMessageType,
    UnsupportedVersion,
    WireError,
)
from .events import (
    NEED_DATA,
    PAUSED,
    BulkEnded,
    BulkEntryReceived,
    BulkStarted,
    ConnectionClosed,
    ErrorReceived,
    Event,
    GoodbyeReceived,
    HelloAckReceived,
    HelloReceived,
    ProtocolErrorDetected,
    RequestReceived,
    ResponseReceived,
    TransactionFailed,
)
from .frames import FrameBuffer, FrameHeader
from .messages import (
    BULK_SPECS,
    ENTRY_IEI_OF,
    BulkReader,
    Error,
    Goodbye,
    Hello,
    HelloAck,
    Keepalive,
    KeepaliveAck,
    bulk_header_ies,
    decode_body,
    encode_entry,
    encode_frame,
    encode_message,
)

log = logging.getLogger("wire.session")

# Smallest maximum frame size a peer may announce: one maximal entry (a 255-octet UE Service
# ID, credential and a 2 048-octet profile) must fit. wire-v1 is silent; see docs/protocol.md.
MIN_FRAME_SIZE = 4096


class Role(Enum):
    SERVER = "server"
    GATEWAY = "gateway"


class SessionState(Enum):
    IDLE = "idle"  # gateway, before HELLO is sent
    AWAIT_HELLO = "await_hello"  # server: waiting for HELLO; gateway: waiting for HELLO ACK
    HELLO_PENDING = "hello_pending"  # server: HELLO received, accept or reject pending
    ESTABLISHED = "established"
    CLOSING = "closing"  # GOODBYE sent or received: no new transactions
    CLOSED = "closed"


class SessionInput(Enum):
    SEND_HELLO = "send_hello"
    RECV_HELLO = "recv_hello"
    SEND_HELLO_ACK = "send_hello_ack"
    RECV_HELLO_ACK = "recv_hello_ack"
    SEND_GOODBYE = "send_goodbye"
    RECV_GOODBYE = "recv_goodbye"
    CLOSE = "close"


S, I = SessionState, SessionInput
TRANSITIONS: dict[tuple[SessionState, SessionInput], SessionState] = {
    (S.IDLE, I.SEND_HELLO): S.AWAIT_HELLO,
    (S.AWAIT_HELLO, I.RECV_HELLO): S.HELLO_PENDING,
    (S.HELLO_PENDING, I.SEND_HELLO_ACK): S.ESTABLISHED,
    (S.AWAIT_HELLO, I.RECV_HELLO_ACK): S.ESTABLISHED,
    (S.ESTABLISHED, I.SEND_GOODBYE): S.CLOSING,
    (S.ESTABLISHED, I.RECV_GOODBYE): S.CLOSING,
    (S.CLOSING, I.SEND_GOODBYE): S.CLOSING,
    (S.CLOSING, I.RECV_GOODBYE): S.CLOSING,
    **{(state, I.CLOSE): S.CLOSED for state in SessionState},
}

_ROLE_INPUTS = {
    Role.SERVER: {I.RECV_HELLO, I.SEND_HELLO_ACK, I.SEND_GOODBYE, I.RECV_GOODBYE, I.CLOSE},
    Role.GATEWAY: {I.SEND_HELLO, I.RECV_HELLO_ACK, I.SEND_GOODBYE, I.RECV_GOODBYE, I.CLOSE},
}

# Message types each role may receive once established (wire-v1 §4, §5 "direction" columns).
_RECEIVES = {
    Role.SERVER: frozenset(
        {MessageType.HELLO, MessageType.KEEPALIVE, MessageType.KEEPALIVE_ACK, MessageType.GOODBYE,
         MessageType.ERROR, *SINGLE_REQUESTS, *BULK_REQUESTS}
    ),
    Role.GATEWAY: frozenset(
        {MessageType.HELLO_ACK, MessageType.KEEPALIVE, MessageType.KEEPALIVE_ACK,
         MessageType.GOODBYE, MessageType.ERROR, MessageType.UE_REGISTRATION_RESPONSE,
         MessageType.UE_DEREGISTRATION_RESPONSE, MessageType.BULK_REGISTRATION_RESPONSE,
         MessageType.BULK_DEREGISTRATION_RESPONSE}
    ),
}

_MAX_DISCARDED = 64


def _role_allows(role: Role, inp: SessionInput) -> bool:
    return inp in _ROLE_INPUTS[role]


@dataclass
class Limits:
    """What a side announces: the server in HELLO ACK, the gateway (frame size) in HELLO."""

    max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
    max_bulk_entries: int = 1_000_000
    max_outstanding: int = 64
    keepalive_interval: int = DEFAULT_KEEPALIVE_INTERVAL
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT


class _Txn:
    """One transaction (h2's stream): what came in, what went out, and whether it failed."""

    __slots__ = (
        "failed", "in_count", "in_delivered", "in_done", "in_reader", "out_buf", "out_count",
        "out_done", "out_sent", "out_started", "request_type", "tid",
    )

    def __init__(self, tid: int, request_type: MessageType) -> None:
        self.tid = tid
        self.request_type = request_type
        self.in_reader: BulkReader | None = None
        self.in_count = -1
        self.in_delivered = 0
        self.in_done = False
        self.out_buf: bytearray | None = None
        self.out_count = -1
        self.out_sent = 0
        self.out_started = False
        self.out_done = False
        self.failed: SessionError | MessageError | None = None

    @property
    def is_bulk(self) -> bool:
        return self.request_type in BULK_REQUESTS


@dataclass
class _Frame:
    """The frame whose body is being read (bulk bodies are streamed IE by IE)."""

    header: FrameHeader
    remaining: int
    txn: _Txn | None
    mtype: MessageType


class Session:
    """One wire-v1 connection, either role, driven by bytes, calls and `now`."""

    def __init__(self, role: Role, now: float, limits: Limits | None = None) -> None:
        self.role = role
        self.limits = limits or Limits()
        if not MIN_FRAME_SIZE <= self.limits.max_frame_size <= MAX_FRAME_SIZE_LIMIT:
            raise LocalProtocolError("max_frame_size outside 4096..16777215")
        self.state = SessionState.AWAIT_HELLO if role is Role.SERVER else SessionState.IDLE
        self._buf = FrameBuffer(self.limits.max_frame_size)
        self._out: list[bytes] = []
        self._events: deque[Event] = deque()
        self._txns: dict[int, _Txn] = {}
        self._dirty: set[_Txn] = set()
        self._discarding: dict[int, MessageType] = {}
        self._frame: _Frame | None = None
        self._receiving_bulk: _Txn | None = None
        self._eof = False
        self.closed_reason: str | None = None
        # Announced by the peer: its max frame size limits what we send.
        self.peer_max_frame_size = DEFAULT_MAX_FRAME_SIZE
        self.peer_hello: Hello | None = None
        self.hello_ack: HelloAck | None = None
        self.bulk_allowed = True
        self.goodbye_sent = False
        self.goodbye_received = False
        # Timers (aioquic): deadlines derived from the last time anything was received.
        self._started = now
        self._last_rx = now
        self._keepalive_tid: int | None = None
        self._next_tid = 1 if role is Role.GATEWAY else SERVER_TID_BIT | 1

    # --- state machine ---------------------------------------------------------------------

    def _apply(self, inp: SessionInput) -> None:
        if not _role_allows(self.role, inp):
            raise LocalProtocolError(f"a {self.role.value} cannot {inp.value}")
        new = TRANSITIONS.get((self.state, inp))
        if new is None:
            raise LocalProtocolError(f"{inp.value} is not allowed in state {self.state.value}")
        if new is not self.state:
            log.debug("session %s: %s -> %s on %s", self.role.value, self.state.value, new.value,
                      inp.value)
        self.state = new

    @property
    def is_closed(self) -> bool:
        return self.state is SessionState.CLOSED

    @property
    def outstanding(self) -> int:
        return len(self._txns)

    @property
    def can_close(self) -> bool:
        """A GOODBYE was exchanged and every transaction in progress has finished."""
        return self.state is SessionState.CLOSED or (
            self.state is SessionState.CLOSING and not self._txns
        )

    def in_progress(self) -> list[int]:
        return list(self._txns)

    # --- bytes in ---------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Store received octets; b"" means the peer closed its side (EOF)."""
        if self.state is SessionState.CLOSED:
            return
        if not data:
            self._eof = True
            return
        self._last_rx = now
        self._buf.feed(data)

    def next_event(self) -> Event | Any:
        """The next event, NEED_DATA, or PAUSED while a HELLO awaits accept/reject."""
        while True:
            if self._events:
                return self._events.popleft()
            if self.state is SessionState.CLOSED:
                return NEED_DATA
            if self.state is SessionState.HELLO_PENDING:
                return PAUSED
            try:
                progressed = self._step()
            except WireError as exc:
                # Raised only for errors that end the connection (frame errors, a message
                # before HELLO, a bad protocol version); the rest are answered where found.
                self._fatal(exc)
                continue
            if not progressed:
                if self._eof:
                    self._close(None, "peer closed the connection", by_peer=True)
                    continue
                return NEED_DATA

    def _step(self) -> bool:
        """Advance by one header, body or IE; False when more octets are needed."""
        frame = self._frame
        if frame is None:
            header = self._buf.read_header()
            if header is None:
                return False
            self._start_frame(header)
            return True
        if frame.remaining == 0:
            self._frame = None
            self._end_bulk_frame(frame)
            return True
        if frame.txn is None:
            # A non-bulk message: read it whole (it is at most max_frame_size).
            body = self._buf.read_exact(frame.remaining)
            if body is None:
                return False
            self._frame = None
            self._on_message(frame.header, frame.mtype, body)
            return True
        item = self._buf.read_ie(frame.remaining)
        if item is None:
            return False
        if item == -1:
            self._buf.skip(frame.remaining)
            frame.remaining = 0
            self._frame = None
            txn = frame.txn
            self._fail(txn, InvalidMessage("IE length runs past the frame body",
                                           transaction_id=txn.tid), last=not frame.header.more)
            return True
        iei, raw = item  # type: ignore[misc]
        frame.remaining -= 3 + len(raw)
        self._on_bulk_ie(frame, iei, raw)
        return True

    def _skip_frame(self, header: FrameHeader) -> None:
        self._buf.skip(header.body_length)

    def _start_frame(self, header: FrameHeader) -> None:
        tid = header.transaction_id
        try:
            mtype = MessageType(header.message_type)
        except ValueError:
            mtype = None
        if self.state is SessionState.AWAIT_HELLO and self.role is Role.SERVER:
            if mtype is not MessageType.HELLO:
                raise SessionError(ErrorCause.SESSION_NOT_ESTABLISHED,
                                   "the first message must be HELLO")
        if mtype is None:
            self._skip_frame(header)
            self._reject(UnknownMessageType(
                f"message type 0x{header.message_type:02x}", transaction_id=tid))
            return
        if header.more and mtype not in BULK_MESSAGES:
            raise InvalidFrame(f"MORE set on {mtype.name}")
        if mtype not in _RECEIVES[self.role]:
            self._skip_frame(header)
            self._reject(InvalidMessage(f"{mtype.name} is not sent to a {self.role.value}",
                                        transaction_id=tid))
            return
        if mtype in BULK_MESSAGES:
            self._start_bulk_frame(header, mtype)
            return
        self._frame = _Frame(header, header.body_length, None, mtype)

    # --- single messages --------------------------------------------------------------------

    def _on_message(self, header: FrameHeader, mtype: MessageType, body: bytes) -> None:
        tid = header.transaction_id
        try:
            message = decode_body(mtype, tid, body)
        except MessageError as exc:
            exc.transaction_id = tid
            if mtype is MessageType.ERROR:
                # wire-v1 §7.2: a receiver never answers an ERROR with an ERROR.
                self._events.append(ProtocolErrorDetected(exc))
            else:
                self._reject(exc)
            return
        handler = getattr(self, "_on_" + mtype.name.lower())
        handler(message)

    def _on_hello(self, hello: Hello) -> None:
        if self.state is not SessionState.AWAIT_HELLO:
            self._reject(InvalidMessage("second HELLO", transaction_id=hello.transaction_id))
            return
        if not self._peer_tid_ok(hello.transaction_id):
            self._reject(InvalidMessage("HELLO with a server transaction id",
                                        transaction_id=hello.transaction_id))
            return
        if hello.protocol_version != PROTOCOL_VERSION:
            raise UnsupportedVersion(f"protocol version {hello.protocol_version}")
        if hello.max_frame_size is not None and not (
            MIN_FRAME_SIZE <= hello.max_frame_size <= MAX_FRAME_SIZE_LIMIT
        ):
            self._reject(InvalidMessage(
                f"Maximum frame size {hello.max_frame_size} outside 4096..16777215",
                transaction_id=hello.transaction_id))
            return
        self.peer_hello = hello
        if hello.max_frame_size is not None:
            self.peer_max_frame_size = hello.max_frame_size
        self._apply(I.RECV_HELLO)
        self._events.append(HelloReceived(hello))

    def _on_hello_ack(self, ack: HelloAck) -> None:
        if self.state is not SessionState.AWAIT_HELLO:
            self._reject(InvalidMessage("unexpected HELLO ACK", transaction_id=ack.transaction_id))
            return
        if ack.protocol_version != PROTOCOL_VERSION:
            raise UnsupportedVersion(f"protocol version {ack.protocol_version}")
        if not MIN_FRAME_SIZE <= ack.max_frame_size <= MAX_FRAME_SIZE_LIMIT:
            raise InvalidFrame(f"server announced Maximum frame size {ack.max_frame_size}")
        self._txns.pop(ack.transaction_id, None)
        self.hello_ack = ack
        self.peer_max_frame_size = ack.max_frame_size
        self.bulk_allowed = bool(ack.bulk_allowed)
        self._apply(I.RECV_HELLO_ACK)
        self._events.append(HelloAckReceived(ack))

    def _on_keepalive(self, message: Keepalive) -> None:
        if self.state is SessionState.AWAIT_HELLO:
            raise SessionError(ErrorCause.SESSION_NOT_ESTABLISHED, "KEEPALIVE before HELLO ACK")
        self._out.append(encode_message(KeepaliveAck(message.transaction_id)))

    def _on_keepalive_ack(self, message: KeepaliveAck) -> None:
        if message.transaction_id == self._keepalive_tid:
            self._keepalive_tid = None

    def _on_goodbye(self, goodbye: Goodbye) -> None:
        self.goodbye_received = True
        if self.state in (SessionState.ESTABLISHED, SessionState.CLOSING):
            self._apply(I.RECV_GOODBYE)
            self._events.append(GoodbyeReceived(goodbye))
        else:
            self._events.append(GoodbyeReceived(goodbye))
            self._close(ErrorCause(goodbye.error_cause) if goodbye.error_cause in ErrorCause._value2member_map_ else None,
                        "GOODBYE before the session was established", by_peer=True)

    def _on_error(self, error: Error) -> None:
        txn = self._txns.get(error.transaction_id) if error.transaction_id else None
        cause: Any = error.error_cause
        if cause in ErrorCause._value2member_map_:
            cause = ErrorCause(cause)
        if txn is not None:
            self._end_txn(txn)
            self._events.append(TransactionFailed(
                txn.tid, cause, error.diagnostic or "", sent=False, retry_after=error.retry_after))
        else:
            self._events.append(ErrorReceived(error))
        if self.state is SessionState.AWAIT_HELLO or (
            isinstance(cause, ErrorCause) and CLOSES_CONNECTION[cause]
            and cause not in (ErrorCause.NORMAL, ErrorCause.SHUTTING_DOWN)
        ):
            self._close(cause if isinstance(cause, ErrorCause) else None,
                        f"peer sent ERROR({getattr(cause, 'name', cause)})", by_peer=True)

    def _new_request_ok(self, tid: int, mtype: MessageType) -> bool:
        """Checks for a transaction the peer starts (server role)."""
        if not self._peer_tid_ok(tid):
            self._reject(InvalidMessage(
                "gateway transaction ids are non-zero with the top bit clear", transaction_id=tid))
            return False
        if tid in self._txns:
            self._reject(SessionError(ErrorCause.TRANSACTION_ID_IN_USE,
                                      f"transaction {tid} is in progress", transaction_id=tid))
            return False
        if self.state is SessionState.CLOSING:
            self._reject(SessionError(ErrorCause.SHUTTING_DOWN,
                                      "no new transaction after GOODBYE", transaction_id=tid))
            return False
        if len(self._txns) >= self.limits.max_outstanding:
            self._reject(SessionError(ErrorCause.TOO_MANY_OUTSTANDING,
                                      f"more than {self.limits.max_outstanding} outstanding",
                                      transaction_id=tid))
            return False
        return True

    def _on_request(self, request: Any) -> None:
        if self.role is not Role.SERVER:
            return
        mtype = type(request).message_type
        if not self._new_request_ok(request.transaction_id, mtype):
            return
        txn = _Txn(request.transaction_id, mtype)
        txn.in_done = True
        self._txns[txn.tid] = txn
        self._events.append(RequestReceived(request))

    _on_ue_registration_request = _on_request
    _on_ue_deregistration_request = _on_request

    def _on_response(self, response: Any) -> None:
        txn = self._txns.get(response.transaction_id)
        if txn is None or RESPONSE_TO[txn.request_type] is not type(response).message_type:
            self._reject(InvalidMessage("response to no request of that type",
                                        transaction_id=response.transaction_id))
            return
        del self._txns[txn.tid]
        self._events.append(ResponseReceived(response))

    _on_ue_registration_response = _on_response
    _on_ue_deregistration_response = _on_response

    # --- bulk messages (streamed) -----------------------------------------------------------

    def _start_bulk_frame(self, header: FrameHeader, mtype: MessageType) -> None:
        tid = header.transaction_id
        discarded = self._discarding.get(tid)
        txn = self._txns.get(tid)
        if txn is not None and txn.in_reader is not None and not txn.in_done:
            if _incoming_type(self.role, txn.request_type) is mtype:
                txn.in_reader.start_frame(first=False)
                if txn.failed is not None:
                    self._skip_frame(header)
                    if not header.more:
                        txn.in_done = True
                        self._maybe_finish(txn)
                    return
                self._frame = _Frame(header, header.body_length, txn, mtype)
                return
        if txn is None and discarded is mtype:
            self._skip_frame(header)
            if not header.more:
                del self._discarding[tid]
            return
        if self.role is Role.SERVER:
            txn = self._open_bulk_request(header, mtype)
        else:
            txn = self._open_bulk_response(header, mtype)
        if txn is None:
            self._skip_frame(header)
            if header.more:
                if len(self._discarding) >= _MAX_DISCARDED:
                    self._discarding.pop(next(iter(self._discarding)))
                self._discarding[tid] = mtype
            return
        txn.in_reader = BulkReader(mtype)
        self._frame = _Frame(header, header.body_length, txn, mtype)

    def _open_bulk_request(self, header: FrameHeader, mtype: MessageType) -> _Txn | None:
        tid = header.transaction_id
        if not self._new_request_ok(tid, mtype):
            return None
        if not self.bulk_allowed:
            self._reject(SessionError(ErrorCause.BULK_NOT_ALLOWED,
                                      "bulk is not allowed for this gateway", transaction_id=tid))
            return None
        if self._receiving_bulk is not None:
            self._reject(SessionError(ErrorCause.TOO_MANY_OUTSTANDING,
                                      "one bulk request at a time", transaction_id=tid))
            return None
        txn = _Txn(tid, mtype)
        self._txns[tid] = txn
        self._receiving_bulk = txn
        return txn

    def _open_bulk_response(self, header: FrameHeader, mtype: MessageType) -> _Txn | None:
        tid = header.transaction_id
        txn = self._txns.get(tid)
        if txn is None or RESPONSE_TO.get(txn.request_type) is not mtype or txn.in_reader:
            self._reject(InvalidMessage("bulk response to no bulk request of that type",
                                        transaction_id=tid))
            return None
        return txn

    def _on_bulk_ie(self, frame: _Frame, iei: int, raw: bytes) -> None:
        txn = frame.txn
        assert txn is not None and txn.in_reader is not None
        if txn.failed is not None:
            return
        try:
            item = txn.in_reader.feed_ie(iei, raw)
        except MessageError as exc:
            exc.transaction_id = txn.tid
            self._buf.skip(frame.remaining)
            frame.remaining = 0
            self._frame = None
            self._fail(txn, exc, last=not frame.header.more)
            return
        if item is None:
            return
        kind, value = item
        if kind == "count":
            if self.role is Role.SERVER and value > self.limits.max_bulk_entries:
                self._abort_frame(frame, SessionError(
                    ErrorCause.TOO_MANY_ENTRIES,
                    f"{value} entries announced, at most {self.limits.max_bulk_entries}",
                    transaction_id=txn.tid))
                return
            if self.role is Role.GATEWAY and value != txn.out_count:
                self._abort_frame(frame, SessionError(
                    ErrorCause.COUNT_MISMATCH,
                    f"response announces {value} entries, request had {txn.out_count}",
                    transaction_id=txn.tid))
                return
            txn.in_count = value
            self._events.append(BulkStarted(txn.tid, frame.mtype, value))
            return
        if txn.in_delivered >= txn.in_count:
            self._abort_frame(frame, SessionError(
                ErrorCause.COUNT_MISMATCH,
                f"{txn.in_count} entries announced, more sent", transaction_id=txn.tid))
            return
        index = txn.in_delivered
        txn.in_delivered += 1
        if isinstance(value, WireError):
            self._events.append(BulkEntryReceived(txn.tid, index, None, value))  # type: ignore[arg-type]
        else:
            self._events.append(BulkEntryReceived(txn.tid, index, value))

    def _abort_frame(self, frame: _Frame, exc: WireError) -> None:
        assert frame.txn is not None
        self._buf.skip(frame.remaining)
        frame.remaining = 0
        self._frame = None
        self._fail(frame.txn, exc, last=not frame.header.more)

    def _end_bulk_frame(self, frame: _Frame) -> None:
        txn = frame.txn
        if txn is None or txn.failed is not None or txn.in_reader is None:
            return
        try:
            txn.in_reader.end_frame()
        except MessageError as exc:
            exc.transaction_id = txn.tid
            self._fail(txn, exc, last=not frame.header.more)
            return
        if frame.header.more:
            return
        if txn.in_delivered != txn.in_count:
            self._fail(txn, SessionError(
                ErrorCause.COUNT_MISMATCH,
                f"{txn.in_count} entries announced, {txn.in_delivered} sent",
                transaction_id=txn.tid), last=True)
            return
        txn.in_done = True
        if self._receiving_bulk is txn:
            self._receiving_bulk = None
        self._events.append(BulkEnded(txn.tid, frame.mtype, txn.in_count))
        self._maybe_finish(txn)

    def _fail(self, txn: _Txn, exc: WireError, *, last: bool) -> None:
        """End a bulk transaction on a peer error; entries already delivered still get their
        answers first (wire-v1 §5 Count: "Entries that already have a response entry stand")."""
        txn.failed = exc  # type: ignore[assignment]
        if last:
            txn.in_done = True
        if self._receiving_bulk is txn:
            self._receiving_bulk = None
        self._events.append(ProtocolErrorDetected(exc))
        if self.role is Role.GATEWAY or txn.out_sent >= txn.in_delivered:
            self._send_txn_error(txn)
        self._maybe_finish(txn)

    def _send_txn_error(self, txn: _Txn) -> None:
        exc = txn.failed
        assert exc is not None
        if txn.out_buf is not None and self.role is Role.SERVER:
            self._flush_bulk(txn, final=False)
        txn.out_done = True
        self._dirty.discard(txn)
        self._out.append(encode_message(Error(txn.tid, int(exc.cause), None, exc.diagnostic[:1024])))
        self._events.append(TransactionFailed(txn.tid, exc.cause, exc.diagnostic, sent=True))

    def _maybe_finish(self, txn: _Txn) -> None:
        if txn.out_done and (txn.in_done or self.role is Role.GATEWAY):
            self._end_txn(txn)
            if not txn.in_done and txn.failed is not None:
                # Fragments still on their way are dropped without further answers.
                self._discarding[txn.tid] = _incoming_type(self.role, txn.request_type)

    def _end_txn(self, txn: _Txn) -> None:
        self._txns.pop(txn.tid, None)
        self._dirty.discard(txn)
        if self._receiving_bulk is txn:
            self._receiving_bulk = None
        txn.out_done = True

    # --- errors -----------------------------------------------------------------------------

    def _reject(self, exc: WireError) -> None:
        """Answer a peer error that concerns one message; close if its cause says so."""
        self._events.append(ProtocolErrorDetected(exc))
        if exc.closes_connection:
            self._fatal(exc, already_reported=True)
            return
        self._out.append(encode_message(
            Error(exc.transaction_id, int(exc.cause), None, exc.diagnostic[:1024])))

    def _fatal(self, exc: WireError, *, already_reported: bool = False) -> None:
        if not already_reported:
            self._events.append(ProtocolErrorDetected(exc))
        self._out.append(encode_message(
            Error(exc.transaction_id if exc.cause is ErrorCause.GATEWAY_NOT_ALLOWED else 0,
                  int(exc.cause), None, exc.diagnostic[:1024])))
        self._close(exc.cause, exc.diagnostic, by_peer=False)

    def _close(self, cause: ErrorCause | None, reason: str, *, by_peer: bool) -> None:
        if self.state is SessionState.CLOSED:
            return
        self._apply(I.CLOSE)
        self.closed_reason = reason
        self._frame = None
        self._events.append(ConnectionClosed(cause, reason, by_peer))

    def _peer_tid_ok(self, tid: int) -> bool:
        if self.role is Role.SERVER:
            return tid != 0 and not tid & SERVER_TID_BIT
        return bool(tid & SERVER_TID_BIT)

    # --- messages out -----------------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued so far, with partial bulk response fragments flushed (MORE set)."""
        if self._dirty:
            for txn in list(self._dirty):
                if txn.out_buf is not None and not txn.out_done:
                    self._flush_bulk(txn, final=False)
            self._dirty.clear()
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def next_transaction_id(self) -> int:
        """A free transaction id of our role (gateway: 1..2^31-1; server: top bit set)."""
        for _ in range(1 << 16):
            tid = self._next_tid
            if self.role is Role.GATEWAY:
                self._next_tid = tid + 1 if tid < SERVER_TID_BIT - 1 else 1
            else:
                self._next_tid = tid + 1 if tid < MAX_TID else SERVER_TID_BIT | 1
            if tid not in self._txns and tid != self._keepalive_tid:
                return tid
        raise LocalProtocolError("no free transaction id")

    def send_hello(self, hello: Hello) -> None:
        self._apply(I.SEND_HELLO)
        if hello.max_frame_size is not None and hello.max_frame_size != self.limits.max_frame_size:
            raise LocalProtocolError("HELLO must announce the session's own max_frame_size")
        self._txns[hello.transaction_id] = _Txn(hello.transaction_id, MessageType.HELLO)
        self._out.append(encode_message(hello))

    def accept_hello(
        self,
        *,
        server_nonce: bytes,
        bulk_allowed: bool,
        ue_authentication_required: bool,
        node_name: str | None = None,
    ) -> HelloAck:
        """Server: answer the pending HELLO with HELLO ACK."""
        if self.peer_hello is None or self.state is not SessionState.HELLO_PENDING:
            raise LocalProtocolError("no HELLO to accept")
        if len(server_nonce) != NONCE_SIZE:
            raise LocalProtocolError("the server nonce is 32 octets")
        ack = HelloAck(
            transaction_id=self.peer_hello.transaction_id,
            server_nonce=server_nonce,
            max_frame_size=self.limits.max_frame_size,
            max_bulk_entries=self.limits.max_bulk_entries,
            max_outstanding=self.limits.max_outstanding,
            keepalive_interval=self.limits.keepalive_interval,
            bulk_allowed=int(bulk_allowed),
            ue_authentication_required=int(ue_authentication_required),
            node_name=node_name,
        )
        self._apply(I.SEND_HELLO_ACK)
        self.hello_ack = ack
        self.bulk_allowed = bulk_allowed
        self._out.append(encode_message(ack, max_frame_size=self.peer_max_frame_size))
        return ack

    def reject_hello(self, cause: ErrorCause, diagnostic: str = "") -> None:
        """Server: refuse the pending HELLO (GATEWAY_NOT_ALLOWED) and close."""
        if self.peer_hello is None or self.state is not SessionState.HELLO_PENDING:
            raise LocalProtocolError("no HELLO to reject")
        self._out.append(encode_message(
            Error(self.peer_hello.transaction_id, int(cause), None, diagnostic[:1024] or None)))
        self._close(cause, diagnostic or cause.name, by_peer=False)

    def send_request(self, request: Any) -> None:
        """Gateway: a single UE (DE-)REGISTRATION REQUEST."""
        mtype = type(request).message_type
        if self.role is not Role.GATEWAY or mtype not in SINGLE_REQUESTS:
            raise LocalProtocolError(f"a {self.role.value} cannot send {mtype.name}")
        self._check_new_transaction(request.transaction_id)
        self._txns[request.transaction_id] = _Txn(request.transaction_id, mtype)
        self._out.append(encode_message(request, max_frame_size=self.peer_max_frame_size))

    def start_bulk(self, message_type: MessageType, transaction_id: int, count: int) -> None:
        """Gateway: open a bulk request of `count` entries; send them with send_bulk_entry()."""
        if self.role is not Role.GATEWAY or message_type not in BULK_REQUESTS:
            raise LocalProtocolError(f"a {self.role.value} cannot start {message_type.name}")
        self._check_new_transaction(transaction_id)
        if not self.bulk_allowed:
            raise LocalProtocolError("the server does not allow bulk for this gateway")
        assert self.hello_ack is not None
        if not 0 <= count <= self.hello_ack.max_bulk_entries:
            raise LocalProtocolError(f"count {count} above the server's maximum bulk entries")
        if any(t.is_bulk and t.out_sent < t.out_count for t in self._txns.values()):
            raise LocalProtocolError("one bulk request at a time")
        txn = _Txn(transaction_id, message_type)
        txn.out_count = count
        self._txns[transaction_id] = txn
        self._begin_bulk_out(txn)

    def _check_new_transaction(self, tid: int) -> None:
        if self.state is not SessionState.ESTABLISHED:
            raise LocalProtocolError(f"no new transaction in state {self.state.value}")
        if not 0 < tid < SERVER_TID_BIT or tid in self._txns:
            raise LocalProtocolError(f"transaction id {tid} is not free")
        assert self.hello_ack is not None
        if len(self._txns) >= self.hello_ack.max_outstanding:
            raise LocalProtocolError("the server's maximum outstanding transactions is reached")

    def _begin_bulk_out(self, txn: _Txn) -> None:
        response_type = _outgoing_type(self.role, txn.request_type)
        txn.out_buf = bytearray(bulk_header_ies(response_type, txn.out_count))
        txn.out_started = True
        if txn.out_count == 0:
            self._flush_bulk(txn, final=True)

    def send_bulk_entry(self, transaction_id: int, entry: Any) -> bool:
        """Queue the next entry of a bulk message (request or response, by role). False when
        the transaction has ended meanwhile (the peer's ERROR, our own)."""
        txn = self._txns.get(transaction_id)
        if txn is None or txn.out_done:
            return False
        if not txn.is_bulk:
            raise LocalProtocolError(f"transaction {transaction_id} is not a bulk")
        if self.role is Role.SERVER:
            if txn.out_buf is None:
                if txn.in_count < 0:
                    raise LocalProtocolError("answering a bulk before its count arrived")
                txn.out_count = txn.in_count
                self._begin_bulk_out(txn)
            if txn.out_sent >= txn.in_delivered:
                raise LocalProtocolError("more response entries than request entries")
        expected = BULK_SPECS[_outgoing_type(self.role, txn.request_type)].entry
        if ENTRY_IEI_OF.get(type(entry)) is not expected:
            raise LocalProtocolError(f"{type(entry).__name__} does not belong in this bulk")
        ie = encode_entry(entry)
        buf = txn.out_buf
        assert buf is not None
        if len(buf) + len(ie) > self.peer_max_frame_size:
            self._flush_bulk(txn, final=False)
            buf = txn.out_buf = bytearray()
        buf += ie
        txn.out_sent += 1
        if txn.out_sent == txn.out_count:
            self._flush_bulk(txn, final=True)
            self._maybe_finish(txn)
        elif txn.failed is not None and txn.out_sent >= txn.in_delivered:
            self._send_txn_error(txn)
            self._maybe_finish(txn)
        else:
            self._dirty.add(txn)
        return True

    def _flush_bulk(self, txn: _Txn, *, final: bool) -> None:
        buf = txn.out_buf
        if buf is None:
            return
        if not final and not buf:
            return
        mtype = _outgoing_type(self.role, txn.request_type)
        self._out.append(encode_frame(mtype, txn.tid, bytes(buf), more=not final))
        txn.out_buf = bytearray()
        if final:
            txn.out_buf = None
            self._dirty.discard(txn)
            if self.role is Role.SERVER:
                txn.out_done = True

    def send_response(self, response: Any) -> bool:
        """Server: answer a single request (False if its transaction has ended meanwhile)."""
        txn = self._txns.get(response.transaction_id)
        if txn is None:
            return False
        if RESPONSE_TO[txn.request_type] is not type(response).message_type:
            raise LocalProtocolError("response type does not answer the request")
        self._out.append(encode_message(response, max_frame_size=self.peer_max_frame_size))
        txn.out_done = True
        self._end_txn(txn)
        return True

    def send_error(
        self,
        transaction_id: int,
        cause: ErrorCause,
        diagnostic: str = "",
        retry_after: int | None = None,
    ) -> None:
        """End a transaction (or, with id 0, the connection) with ERROR."""
        txn = self._txns.get(transaction_id) if transaction_id else None
        if txn is not None and txn.is_bulk and self.role is Role.SERVER:
            # Entries delivered before this point are answered first.
            exc = SessionError(cause, diagnostic, transaction_id=transaction_id)
            txn.failed = exc
            if self._receiving_bulk is txn:
                self._receiving_bulk = None
            if txn.out_sent >= txn.in_delivered:
                self._send_txn_error(txn)
            self._maybe_finish(txn)
            return
        if txn is not None:
            self._end_txn(txn)
        self._out.append(encode_message(
            Error(transaction_id, int(cause), retry_after, diagnostic[:1024] or None)))
        if transaction_id == 0 and CLOSES_CONNECTION.get(cause, False):
            self._close(cause, diagnostic or cause.name, by_peer=False)

    def send_goodbye(
        self, cause: ErrorCause, retry_after: int | None = None, diagnostic: str = ""
    ) -> None:
        """Announce an orderly close: no new transactions, those in progress finish."""
        if self.state in (SessionState.ESTABLISHED, SessionState.CLOSING):
            self._apply(I.SEND_GOODBYE)
        elif self.state is not SessionState.CLOSED:
            self._close(cause, diagnostic or cause.name, by_peer=False)
        self.goodbye_sent = True
        self._out.append(encode_message(Goodbye(0, int(cause), retry_after, diagnostic or None)))

    # --- timers -----------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When handle_timer() must next be called, or None."""
        if self.state is SessionState.CLOSED:
            return None
        if self.state in (SessionState.AWAIT_HELLO, SessionState.HELLO_PENDING, SessionState.IDLE):
            if self.state is SessionState.IDLE:
                return None
            return self._started + self.limits.hello_timeout
        interval = self._keepalive_interval()
        if self._keepalive_tid is None:
            return self._last_rx + interval
        return self._last_rx + 2 * interval

    def _keepalive_interval(self) -> float:
        if self.role is Role.GATEWAY and self.hello_ack is not None:
            return float(self.hello_ack.keepalive_interval or self.limits.keepalive_interval)
        return float(self.limits.keepalive_interval)

    def handle_timer(self, now: float) -> None:
        """wire-v1 §4.1 HELLO deadline and §4.4 keepalive."""
        if self.state is SessionState.CLOSED:
            return
        if self.state in (SessionState.AWAIT_HELLO, SessionState.HELLO_PENDING):
            if now >= self._started + self.limits.hello_timeout:
                what = "HELLO" if self.role is Role.SERVER else "HELLO ACK"
                self._fatal(SessionError(
                    ErrorCause.IDLE_TIMEOUT,
                    f"no {what} within {self.limits.hello_timeout:g} s"))
            return
        if self.state is SessionState.IDLE:
            return
        interval = self._keepalive_interval()
        if now >= self._last_rx + 2 * interval:
            self._fatal(SessionError(ErrorCause.IDLE_TIMEOUT,
                                     f"nothing received for {2 * interval:g} s"))
        elif now >= self._last_rx + interval and self._keepalive_tid is None:
            tid = self.next_transaction_id()
            self._keepalive_tid = tid
            self._out.append(encode_message(Keepalive(tid)))


def _incoming_type(role: Role, request_type: MessageType) -> MessageType:
    return request_type if role is Role.SERVER else RESPONSE_TO[request_type]


def _outgoing_type(role: Role, request_type: MessageType) -> MessageType:
    return RESPONSE_TO[request_type] if role is Role.SERVER else request_type
