"""The Message Gateway side of wire-v1: an asyncio client for registering Non-MSGin5G UEs.

    ctx = client_context(cert, key, ca)
    async with await GatewayClient.connect("127.0.0.1", 7554, ssl_context=ctx) as gw:
        result = await gw.register(GatewayUe("ue-0001@gw1.example", key))
        async for result in gw.bulk_register(ues):      # any iterable or async iterable
            ...

Results stream back as they arrive; nothing holds the whole list. The client keeps reading
while it sends, splits bulks to the server's announced limits (maximum bulk entries,
outstanding transactions, frame size), computes each UE's credential proof (wire-v1 §6) from
its key and this connection's nonce, and when the connection drops it raises
`ConnectionLost` naming the UEs that got no result — it never guesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from wire.constants import (
    ALPN_PROTOCOL,
    DEFAULT_MAX_FRAME_SIZE,
    ErrorCause,
    FailureCause,
    GatewayType,
    MessageType,
    Operation,
)
from wire.credential import compute_proof
from wire.events import (
    NEED_DATA,
    BulkEnded,
    BulkEntryReceived,
    BulkStarted,
    ConnectionClosed,
    ErrorReceived,
    GoodbyeReceived,
    HelloAckReceived,
    ProtocolErrorDetected,
    ResponseReceived,
    TransactionFailed,
)
from wire.messages import (
    DeregistrationEntry,
    Hello,
    HelloAck,
    Profile,
    RegistrationEntry,
    UeDeregistrationRequest,
    UeRegistrationRequest,
)
from wire.session import Limits, Role, Session

from .errors import MsgdError
from .log import get_logger

log = get_logger("msgd.client")


class ClientError(MsgdError):
    """Base of the gateway client's errors."""


class HandshakeError(ClientError):
    """TLS, ALPN or HELLO failed (e.g. GATEWAY_NOT_ALLOWED)."""

    def __init__(self, message: str, cause: ErrorCause | int | None = None) -> None:
        super().__init__(message)
        self.cause = cause


class ConnectionLost(ClientError):
    """The connection ended with UEs still unanswered; `unanswered` names them, in order."""

    def __init__(self, message: str, unanswered: list[str]) -> None:
        super().__init__(message)
        self.unanswered = unanswered


class TransactionError(ClientError):
    """The server ended a transaction with ERROR; entries without a result were not processed."""

    def __init__(
        self,
        cause: ErrorCause | int,
        diagnostic: str,
        unanswered: list[str],
        retry_after: int | None = None,
    ) -> None:
        name = getattr(cause, "name", str(cause))
        super().__init__(f"server ended the transaction: {name} {diagnostic}".strip())
        self.cause = cause
        self.unanswered = unanswered
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class GatewayUe:
    """One Non-MSGin5G UE as the gateway is configured for it (TS 23.554 clause 8.1.3)."""

    ue_service_id: str
    key: bytes | None = None
    profile: Profile | None = None

    def __repr__(self) -> str:  # never show the key
        return f"GatewayUe({self.ue_service_id!r})"


@dataclass(frozen=True, slots=True)
class UeResult:
    """The server's answer for one UE."""

    ue_service_id: str
    ok: bool
    cause: FailureCause | int | None = None
    retry_after: int | None = None

    @property
    def cause_name(self) -> str:
        if self.cause is None:
            return "SUCCESS"
        return getattr(self.cause, "name", str(self.cause))


def _cause(value: int | None) -> FailureCause | int | None:
    if value is None:
        return None
    try:
        return FailureCause(value)
    except ValueError:
        return value


def client_context(certificate: str, private_key: str, ca: str) -> ssl.SSLContext:
    """A mutual-TLS client context with ALPN msgin5g-gw/1 (TLS 1.2 minimum, 1.3 preferred)."""
    from .tls import client_context as _ctx

    return _ctx(certificate, private_key, ca)


class _Bulk:
    """Client-side state of one bulk transaction being sent and answered."""

    __slots__ = ("done", "error", "inflight", "results")

    def __init__(self) -> None:
        self.inflight: deque[str] = deque()  # UE ids sent and not yet answered, in order
        self.results: asyncio.Queue[Any] = asyncio.Queue()
        self.done = False
        self.error: BaseException | None = None


class GatewayClient(asyncio.Protocol):
    """One connection to an MSGin5G Server, in the GATEWAY role."""

    # Unanswered bulk entries we allow ourselves; keeps memory flat whatever the bulk size.
    WINDOW = 8192

    def __init__(
        self, *, gateway_type: GatewayType, node_name: str | None, max_frame_size: int
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.session = Session(
            Role.GATEWAY, self.loop.time(), Limits(max_frame_size=max_frame_size)
        )
        self.gateway_type = gateway_type
        self.node_name = node_name
        self.transport: asyncio.Transport | None = None
        self.hello_ack: HelloAck | None = None
        self._hello: asyncio.Future[HelloAck] = self.loop.create_future()
        self._singles: dict[int, tuple[asyncio.Future[UeResult], str]] = {}
        self._bulks: dict[int, _Bulk] = {}
        self._slots: asyncio.Semaphore | None = None
        self._bulk_lock = asyncio.Lock()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._window_open = asyncio.Event()
        self._window_open.set()
        self._closed = self.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self.goodbye: Any = None
        self.lost_reason: str | None = None

    # --- connecting -------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        gateway_type: GatewayType = GatewayType.NON_3GPP,
        node_name: str | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        timeout: float = 10.0,
    ) -> GatewayClient:
        loop = asyncio.get_running_loop()
        client: GatewayClient | None = None

        def factory() -> GatewayClient:
            nonlocal client
            client = cls(
                gateway_type=gateway_type, node_name=node_name, max_frame_size=max_frame_size
            )
            return client

        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    factory, host, port, ssl=ssl_context, server_hostname=server_hostname or host
                )
                assert client is not None
                await client._hello
        except TimeoutError as exc:
            if client is not None:
                client.abort()
            raise HandshakeError(f"no HELLO ACK from {host}:{port} within {timeout:g} s") from exc
        except ssl.SSLError as exc:
            raise HandshakeError(f"TLS handshake with {host}:{port} failed: {exc}") from exc
        assert client is not None
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_PROTOCOL:
            self._hello.set_exception(HandshakeError("server did not negotiate ALPN msgin5g-gw/1"))
            transport.abort()  # type: ignore[attr-defined]
            return
        tid = self.session.next_transaction_id()
        self.session.send_hello(
            Hello(
                tid,
                int(self.gateway_type),
                node_name=self.node_name,
                max_frame_size=self.session.limits.max_frame_size,
            )
        )
        self._flush()

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def nonce(self) -> bytes:
        assert self.hello_ack is not None
        return self.hello_ack.server_nonce

    @property
    def bulk_allowed(self) -> bool:
        return bool(self.hello_ack and self.hello_ack.bulk_allowed)

    @property
    def authentication_required(self) -> bool:
        return bool(self.hello_ack and self.hello_ack.ue_authentication_required)

    # --- bytes in ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.session.receive_data(data, self.loop.time())
        self._process()

    def eof_received(self) -> bool:
        self.session.receive_data(b"", self.loop.time())
        self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self.lost_reason or (str(exc) if exc else "connection closed")
        self._fail_all(reason)
        if self._timer is not None:
            self._timer.cancel()
        if not self._closed.done():
            self._closed.set_result(None)
        self._can_write.set()
        self._window_open.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def _process(self) -> None:
        session = self.session
        while (event := session.next_event()) is not NEED_DATA:
            kind = type(event)
            if kind is BulkEntryReceived:
                self._on_bulk_entry(event)
            elif kind is ResponseReceived:
                waiter = self._singles.pop(event.response.transaction_id, None)
                if waiter is not None and not waiter[0].done():
                    r = event.response
                    waiter[0].set_result(
                        UeResult(
                            r.ue_service_id, r.result == 0, _cause(r.failure_cause), r.retry_after
                        )
                    )
            elif kind is BulkEnded:
                bulk = self._bulks.pop(event.transaction_id, None)
                if bulk is not None:
                    bulk.done = True
                    bulk.results.put_nowait(None)
            elif kind is TransactionFailed:
                self._on_transaction_failed(event)
            elif kind is HelloAckReceived:
                self.hello_ack = event.hello_ack
                self._slots = asyncio.Semaphore(max(1, event.hello_ack.max_outstanding))
                if not self._hello.done():
                    self._hello.set_result(event.hello_ack)
            elif kind is ErrorReceived:
                err = event.error
                cause = _error_cause(err.error_cause)
                if not self._hello.done():
                    self._hello.set_exception(
                        HandshakeError(
                            f"server refused HELLO: {getattr(cause, 'name', cause)}", cause
                        )
                    )
                log.info(
                    "server.error",
                    cause=getattr(cause, "name", cause),
                    tid=err.transaction_id,
                    detail=err.diagnostic,
                )
            elif kind is GoodbyeReceived:
                self.goodbye = event.goodbye
                log.info(
                    "server.goodbye",
                    cause=getattr(_error_cause(event.goodbye.error_cause), "name", ""),
                    retry_after=event.goodbye.retry_after,
                )
            elif kind is ProtocolErrorDetected:
                log.warning(
                    "protocol.error", cause=event.error.cause.name, detail=event.error.diagnostic
                )
            elif kind is BulkStarted:
                pass
            elif kind is ConnectionClosed:
                self.lost_reason = event.reason
                if not self._hello.done():
                    self._hello.set_exception(HandshakeError(event.reason))
        self._flush()
        if session.is_closed or (
            session.goodbye_received and session.can_close and not self._singles and not self._bulks
        ):
            if self.transport is not None:
                self.transport.close()
        else:
            self._arm_timer()

    def _on_bulk_entry(self, event: BulkEntryReceived) -> None:
        bulk = self._bulks.get(event.transaction_id)
        if bulk is None:
            return
        uid = bulk.inflight.popleft() if bulk.inflight else ""
        entry = event.entry
        if entry is None:
            result = UeResult(uid, False, FailureCause.INVALID_ENTRY)
        else:
            result = UeResult(
                entry.ue_service_id or uid,
                entry.result == 0,
                _cause(entry.failure_cause),
                entry.retry_after,
            )
        bulk.results.put_nowait(result)
        if len(bulk.inflight) < self.WINDOW // 2:
            self._window_open.set()

    def _on_transaction_failed(self, event: TransactionFailed) -> None:
        tid = event.transaction_id
        single = self._singles.pop(tid, None)
        if single is not None:
            if not single[0].done():
                single[0].set_exception(
                    TransactionError(event.cause, event.diagnostic, [single[1]], event.retry_after)
                )
            return
        bulk = self._bulks.pop(tid, None)
        if bulk is not None:
            bulk.error = TransactionError(
                event.cause, event.diagnostic, list(bulk.inflight), event.retry_after
            )
            bulk.done = True
            bulk.results.put_nowait(None)
            self._window_open.set()

    def _fail_all(self, reason: str) -> None:
        if not self._hello.done():
            self._hello.set_exception(HandshakeError(reason))
        for fut, uid in self._singles.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(reason, [uid]))
        self._singles.clear()
        for bulk in self._bulks.values():
            bulk.error = ConnectionLost(reason, list(bulk.inflight))
            bulk.done = True
            bulk.results.put_nowait(None)
        self._bulks.clear()

    def _flush(self) -> None:
        data = self.session.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _arm_timer(self) -> None:
        when = self.session.get_timer()
        if when is None or self._timer is not None:
            return
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.session.handle_timer(self.loop.time())
        self._process()

    # --- procedures -------------------------------------------------------------------------

    def _proof(self, ue: GatewayUe, op: Operation) -> bytes | None:
        if ue.key is None:
            if self.authentication_required:
                raise ClientError(
                    f"{ue.ue_service_id}: the server requires a UE credential "
                    "and no key is configured"
                )
            return None
        return compute_proof(ue.key, self.nonce, op, ue.ue_service_id)

    def _check_open(self) -> None:
        if self.session.is_closed or self.transport is None or self.transport.is_closing():
            raise ConnectionLost(self.lost_reason or "connection closed", [])
        if self.goodbye is not None:
            raise ConnectionLost("server sent GOODBYE", [])

    async def register(self, ue: GatewayUe) -> UeResult:
        """TS 23.554 8.2.3: register one UE."""
        return await self._single(ue, Operation.REGISTRATION)

    async def deregister(self, ue: GatewayUe) -> UeResult:
        """TS 23.554 8.2.4: de-register one UE."""
        return await self._single(ue, Operation.DEREGISTRATION)

    async def _single(self, ue: GatewayUe, op: Operation) -> UeResult:
        self._check_open()
        assert self._slots is not None
        async with self._slots:
            self._check_open()
            await self._can_write.wait()
            tid = self.session.next_transaction_id()
            proof = self._proof(ue, op)
            if op is Operation.REGISTRATION:
                request: Any = UeRegistrationRequest(tid, ue.ue_service_id, proof, ue.profile)
            else:
                request = UeDeregistrationRequest(tid, ue.ue_service_id, proof)
            fut: asyncio.Future[UeResult] = self.loop.create_future()
            self._singles[tid] = (fut, ue.ue_service_id)
            self.session.send_request(request)
            self._flush()
            return await fut

    def bulk_register(
        self, ues: Iterable[GatewayUe] | AsyncIterable[GatewayUe]
    ) -> AsyncIterator[UeResult]:
        """TS 23.554 8.2.X: register UEs in bulk; yields one result per UE, in order."""
        return self._bulk(ues, Operation.REGISTRATION)

    def bulk_deregister(
        self, ues: Iterable[GatewayUe] | AsyncIterable[GatewayUe]
    ) -> AsyncIterator[UeResult]:
        """Bulk de-registration; yields one result per UE, in order."""
        return self._bulk(ues, Operation.DEREGISTRATION)

    async def _bulk(
        self, ues: Iterable[GatewayUe] | AsyncIterable[GatewayUe], op: Operation
    ) -> AsyncIterator[UeResult]:
        self._check_open()
        assert self.hello_ack is not None
        if not self.bulk_allowed:
            # TS 23.554 8.2.X step 1: what cannot be bulked goes through 8.2.3 / 8.2.4.
            async for result in self._pipelined(_aiter(ues), op):
                yield result
            return
        chunk_max = max(1, self.hello_ack.max_bulk_entries)
        source = _aiter(ues)
        sized = len(ues) if hasattr(ues, "__len__") else None  # type: ignore[arg-type]
        done = False
        async with self._bulk_lock:  # wire-v1 §5: one bulk request being sent at a time
            while not done:
                # The Number IE must be known before the first fragment: a sized input goes
                # in as few bulks as the server allows, an unsized one in bounded chunks.
                if sized is not None:
                    count = min(sized, chunk_max)
                    sized -= count
                    items: AsyncIterator[GatewayUe] = source
                    done = sized == 0
                else:
                    buffered = []
                    limit = min(chunk_max, 10_000)
                    async for ue in source:
                        buffered.append(ue)
                        if len(buffered) >= limit:
                            break
                    if len(buffered) < limit:
                        done = True
                    count = len(buffered)
                    items = _aiter(buffered)
                if count == 0:
                    return
                async for result in self._one_bulk(items, count, op):
                    yield result

    async def _pipelined(
        self, items: AsyncIterator[GatewayUe], op: Operation
    ) -> AsyncIterator[UeResult]:
        """Individual procedures, up to the server's outstanding limit at once, in order."""
        assert self.hello_ack is not None
        window = max(1, self.hello_ack.max_outstanding)
        running: deque[asyncio.Task[UeResult]] = deque()
        try:
            async for ue in items:
                running.append(self.loop.create_task(self._single(ue, op)))
                while len(running) >= window or (running and running[0].done()):
                    yield await running.popleft()
            while running:
                yield await running.popleft()
        finally:
            for task in running:
                task.cancel()

    async def _one_bulk(
        self, items: AsyncIterator[GatewayUe], count: int, op: Operation
    ) -> AsyncIterator[UeResult]:
        mtype = (
            MessageType.BULK_REGISTRATION_REQUEST
            if op is Operation.REGISTRATION
            else MessageType.BULK_DEREGISTRATION_REQUEST
        )
        assert self._slots is not None
        await self._slots.acquire()
        bulk = _Bulk()
        try:
            self._check_open()
            tid = self.session.next_transaction_id()
            self._bulks[tid] = bulk
            self.session.start_bulk(mtype, tid, count)
            sender = self.loop.create_task(self._send_entries(tid, bulk, items, count, op))
            try:
                received = 0
                while True:
                    result = await bulk.results.get()
                    if result is None:
                        break
                    received += 1
                    yield result
                if bulk.error is not None:
                    raise bulk.error
            finally:
                if not sender.done():
                    sender.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    exc = await sender if sender.done() else None
                    del exc
        finally:
            self._slots.release()

    async def _send_entries(
        self, tid: int, bulk: _Bulk, items: AsyncIterator[GatewayUe], count: int, op: Operation
    ) -> None:
        session = self.session
        sent = 0
        make = RegistrationEntry if op is Operation.REGISTRATION else None
        async for ue in items:
            if bulk.done:
                return
            if not self._can_write.is_set():
                self._flush()
                await self._can_write.wait()
            while len(bulk.inflight) >= self.WINDOW and not bulk.done:
                self._window_open.clear()
                self._flush()
                await self._window_open.wait()
            if bulk.done:
                return
            proof = self._proof(ue, op)
            if make is not None:
                entry: Any = RegistrationEntry(ue.ue_service_id, proof, ue.profile)
            else:
                entry = DeregistrationEntry(ue.ue_service_id, proof)
            bulk.inflight.append(ue.ue_service_id)
            session.send_bulk_entry(tid, entry)
            sent += 1
            if sent % 256 == 0:
                self._flush()
                await asyncio.sleep(0)  # let responses in while we send
            if sent == count:
                break
        self._flush()

    # --- closing ----------------------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """GOODBYE(NORMAL), let transactions finish, then close."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self.session.is_closed:
            with contextlib.suppress(Exception):
                self.session.send_goodbye(ErrorCause.NORMAL)
                self._flush()
        self.transport.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)
        if not self._closed.done():
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)


def _error_cause(value: int) -> ErrorCause | int:
    try:
        return ErrorCause(value)
    except ValueError:
        return value


async def _aiter(items: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if hasattr(items, "__aiter__"):
        async for item in items:  # type: ignore[union-attr]
            yield item
    else:
        for item in items:  # type: ignore[union-attr]
            yield item
