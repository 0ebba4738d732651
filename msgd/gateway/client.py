"""One connection to an MSGin5G Server in the GATEWAY role (wire-v1 §4, §5): `GatewayClient`.

Mutual TLS with ALPN msgin5g-gw/1, HELLO, keepalive and GOODBYE around a sans-IO
`wire.session.Session`, and the dispatch of the session's events to the owner of each
transaction (the table is `msgd.gateway.transactions.Outstanding`). The procedures come from
`Procedures`; the runs that stream UEs through it are `msgd.gateway.scheduler.Run`s, which use
it through the `Connection` interface declared there.

When the connection ends, a run raises `ConnectionLost` naming every UE that got no result;
this layer never reconnects and never guesses (that is `msgd.gateway.reconnecting`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Any

from msgd.gateway.errors import (
    ClientError,
    ConnectionLost,
    HandshakeError,
    TransactionError,
    UeSourceError,
)
from msgd.gateway.procedures import Procedures, UeIterable
from msgd.gateway.scheduler import Run, UeSource
from msgd.gateway.sync import LocalView, SyncReport, compare
from msgd.gateway.transactions import ConnectionEnding, Outstanding
from msgd.gateway.values import Tracer, UeResult, as_failure_cause
from msgd.log import get_logger
from msgd.tls.reads import TlsReads
from wire.constants import (
    ALPN_PROTOCOL,
    DEFAULT_MAX_FRAME_SIZE,
    ErrorCause,
    FailureCause,
    GatewayType,
    Operation,
)
from wire.events import (
    NEED_DATA,
    BulkEnded,
    BulkEntryReceived,
    BulkStarted,
    ConnectionClosed,
    DigestReceived,
    ErrorReceived,
    GoodbyeReceived,
    HelloAckReceived,
    ListReceived,
    ProtocolErrorDetected,
    ResponseReceived,
    TransactionFailed,
)
from wire.messages import Hello, HelloAck, UeDeregistrationRequest
from wire.session import Limits, Role, Session

__all__ = ["GatewayClient", "client_context"]

log = get_logger("msgd.client")  # one logger for the whole client, as before the split


def client_context(
    certificate: str, private_key: str, ca: str, *, min_version: str = "1.3"
) -> ssl.SSLContext:
    """A mutual-TLS client context with ALPN msgin5g-gw/1; TLSSetupError names a bad file."""
    from msgd.tls.contexts import client_context as _ctx

    return _ctx(certificate, private_key, ca, min_version=min_version)


def _error_cause(value: int) -> ErrorCause | int:
    try:
        return ErrorCause(value)
    except ValueError:
        return value


def _name(cause: Any) -> str:
    return str(getattr(cause, "name", cause))


class GatewayClient(Procedures, TlsReads):
    """One connection to an MSGin5G Server, in the GATEWAY role (wire-v1 §4, §5).

    `register`, `deregister`, `bulk_register` and `bulk_deregister` come from Procedures; the
    Runs of msgd.gateway.scheduler use it through that module's `Connection` interface, and
    its transactions through `outstanding` (msgd.gateway.transactions).

    Just over 400 lines: what is left is the asyncio Protocol of one connection (HELLO, the
    event dispatch, flow control, timers, close), all sharing its transport and session; the
    runs, the transaction table and the procedures are already out."""

    # Unanswered entries (sent, or answered and not yet consumed) one run allows itself.
    WINDOW = 8192
    # UEs per bulk transaction when the server allows more: a run takes this many from the
    # caller's iterable before it can announce the Number of individual entries.
    BULK_SIZE = 4096

    def __init__(
        self,
        *,
        gateway_type: GatewayType,
        node_name: str | None,
        max_frame_size: int,
        busy_retries: int = 3,
        bulk_size: int = BULK_SIZE,
        window: int = WINDOW,
        linger: float = 0.02,
        tracer: Tracer | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.session = Session(
            Role.GATEWAY, self.loop.time(), Limits(max_frame_size=max_frame_size)
        )
        self.gateway_type = gateway_type
        self.node_name = node_name
        self.busy_retries = busy_retries
        self.bulk_size = bulk_size
        self.window = window
        self.linger = linger
        self.tracer = tracer
        self.transport: asyncio.Transport | None = None
        self.hello_ack: HelloAck | None = None
        self.goodbye: Any = None
        self.lost_reason: str | None = None
        self.lost_exc: BaseException | None = None
        self._hello: asyncio.Future[HelloAck] = self.loop.create_future()
        # Single requests made through the session directly (tests poke here): tid -> waiter.
        self._singles: dict[int, tuple[asyncio.Future[UeResult], str]] = {}
        # v1.1 sync requests (msgd.gateway.sync) waiting for DigestReceived / ListReceived.
        self._sync_waiters: dict[int, asyncio.Future[Any]] = {}
        # Protocol octets (frames, not TLS records) received and written: what a bench counts.
        self.octets_in = self.octets_out = 0
        self.outstanding = Outstanding(self.session, is_open=lambda: self.is_open,
                                       flush=self.flush, on_end=self._maybe_close)
        self._runs: set[Run] = set()
        self.writable = asyncio.Event()  # cleared by pause_writing (asyncio flow control)
        self.writable.set()
        self._closed = self.loop.create_future()
        self._timer: asyncio.TimerHandle | None = None

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
        **options: Any,
    ) -> GatewayClient:
        """TCP + TLS + HELLO; returns once HELLO ACK arrived. `options`: busy_retries,
        bulk_size, window, linger, tracer (see GatewaySession)."""
        loop = asyncio.get_running_loop()
        client: GatewayClient | None = None

        def factory() -> GatewayClient:
            nonlocal client
            client = cls(gateway_type=gateway_type, node_name=node_name,
                         max_frame_size=max_frame_size, **options)
            return client

        where = f"{host}:{port}"
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
            raise HandshakeError(f"{where}: no HELLO ACK within {timeout:g} s") from exc
        except ssl.SSLCertVerificationError as exc:
            raise HandshakeError(
                f"{where}: server certificate not accepted: {exc.verify_message}",
                retryable=False) from exc
        except ssl.SSLError as exc:
            raise HandshakeError(f"{where}: TLS handshake failed: {exc.reason or exc}",
                                 retryable=not _is_alert(exc)) from exc
        except ConnectionRefusedError as exc:
            raise HandshakeError(f"{where}: connection refused") from exc
        except OSError as exc:
            raise HandshakeError(f"{where}: cannot connect: {exc.strerror or exc}") from exc
        except HandshakeError as exc:
            raise HandshakeError(f"{where}: {exc}", exc.cause, retryable=exc.retryable,
                                 retry_after=exc.retry_after) from exc.__cause__
        assert client is not None
        log.info("client.connected", server=where, bulk_allowed=client.bulk_allowed,
                 max_bulk_entries=client.hello_ack.max_bulk_entries if client.hello_ack else 0)
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN_PROTOCOL:
            self._hello.set_exception(HandshakeError(
                f"server did not negotiate ALPN {ALPN_PROTOCOL}", retryable=False))
            transport.abort()  # type: ignore[attr-defined]
            return
        tid = self.session.next_transaction_id()
        self.session.send_hello(
            Hello(tid, int(self.gateway_type), node_name=self.node_name,
                  max_frame_size=self.session.limits.max_frame_size)
        )
        self.flush()
        self._arm_timer()

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

    @property
    def is_open(self) -> bool:
        """Established, no GOODBYE either way, transport up: new transactions may start."""
        transport = self.transport
        return (self.hello_ack is not None and self.goodbye is None
                and not self.session.is_closed and not self.session.goodbye_sent
                and transport is not None and not transport.is_closing())

    @property
    def slots_free(self) -> int:
        assert self.hello_ack is not None
        return self.outstanding.slots_free

    # --- bytes in ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.octets_in += len(data)
        self.session.receive_data(data, self.loop.time())
        self._process()

    def eof_received(self) -> bool:
        self.session.receive_data(b"", self.loop.time())
        self._process()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost_exc = exc
        reason = self.lost_reason or (str(exc) if exc else "connection closed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._fail_all(reason, exc)
        if not self._closed.done():
            self._closed.set_result(None)
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def _process(self) -> None:
        """Long on purpose: the gateway role's event dispatch, one branch per session event;
        splitting it would add a call per event on the hot path."""
        session = self.session
        owners = self.outstanding.owners
        while (event := session.next_event()) is not NEED_DATA:
            kind = type(event)
            if kind is BulkEntryReceived:
                owner = owners.get(event.transaction_id)
                if owner is not None:
                    entry = event.entry
                    if entry is None:  # a response entry we cannot decode: that UE failed
                        owner.on_answer(event.transaction_id, 1, FailureCause.INVALID_ENTRY, None)
                    else:
                        owner.on_answer(event.transaction_id, entry.result, entry.failure_cause,
                                        entry.retry_after)
            elif kind is ResponseReceived:
                r = event.response
                tid = r.transaction_id
                waiter = self._singles.pop(tid, None)
                if waiter is not None:
                    if not waiter[0].done():
                        waiter[0].set_result(UeResult(
                            r.ue_service_id, r.result == 0, as_failure_cause(r.failure_cause),
                            r.retry_after))
                    continue
                owner = owners.get(tid)
                if owner is not None:
                    owner.on_answer(tid, r.result, r.failure_cause, r.retry_after)
                    owner.on_end(tid)
            elif kind is DigestReceived or kind is ListReceived:
                sync_waiter = self._sync_waiters.pop(event.transaction_id, None)
                if sync_waiter is not None and not sync_waiter.done():
                    sync_waiter.set_result(event)
            elif kind is BulkEnded:
                owner = owners.get(event.transaction_id)
                if owner is not None:
                    owner.on_end(event.transaction_id)
            elif kind is TransactionFailed:
                self._on_transaction_failed(event)
            elif kind is HelloAckReceived:
                self.hello_ack = event.hello_ack
                self.outstanding.limit = event.hello_ack.max_outstanding
                if not self._hello.done():
                    self._hello.set_result(event.hello_ack)
            elif kind is ErrorReceived:
                err = event.error
                cause = _error_cause(err.error_cause)
                if not self._hello.done():
                    self._hello.set_exception(HandshakeError(
                        f"server refused HELLO: {_name(cause)}"
                        + (f" ({err.diagnostic})" if err.diagnostic else ""), cause,
                        retryable=cause not in (ErrorCause.GATEWAY_NOT_ALLOWED,
                                                ErrorCause.UNSUPPORTED_VERSION),
                        retry_after=err.retry_after))
                log.info("server.error", cause=_name(cause), tid=err.transaction_id,
                         detail=err.diagnostic)
            elif kind is GoodbyeReceived:
                self.goodbye = event.goodbye
                if not self._hello.done():
                    # e.g. reconnect-storm damping: GOODBYE(OVERLOADED) with Retry after.
                    cause = _error_cause(event.goodbye.error_cause)
                    self._hello.set_exception(HandshakeError(
                        f"server said GOODBYE before HELLO ACK: {_name(cause)}"
                        + (f", retry after {event.goodbye.retry_after} ms"
                           if event.goodbye.retry_after is not None else ""),
                        cause, retry_after=event.goodbye.retry_after))
                log.info("server.goodbye", cause=_name(_error_cause(event.goodbye.error_cause)),
                         retry_after=event.goodbye.retry_after)
                for run in list(self._runs):
                    run.on_goodbye()
            elif kind is ProtocolErrorDetected:
                log.warning("protocol.error", cause=event.error.cause.name,
                            detail=event.error.diagnostic)
            elif kind is BulkStarted:
                pass
            elif kind is ConnectionClosed:
                self.lost_reason = event.reason
                if not self._hello.done():
                    # TLS 1.3: a server that rejects our certificate does so after our side
                    # of the handshake completed, and often all we see is the close.
                    self._hello.set_exception(HandshakeError(
                        f"the server closed the connection before HELLO ACK ({event.reason}); "
                        "did it refuse our certificate (revoked, or not from its gateway CA)?"))
        self.flush()
        self._maybe_close()
        if not session.is_closed:
            self._arm_timer()

    def _maybe_close(self) -> None:
        session = self.session
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # wire-v1 §4.5: after GOODBYE (either way) close once our transactions have finished.
        if session.is_closed or (
            (session.goodbye_received or session.goodbye_sent) and session.can_close
            and not self._singles and not self.outstanding.owners
        ):
            transport.close()

    def _on_transaction_failed(self, event: TransactionFailed) -> None:
        tid = event.transaction_id
        sync_waiter = self._sync_waiters.pop(tid, None)
        if sync_waiter is not None:
            if not sync_waiter.done():
                sync_waiter.set_exception(TransactionError(
                    event.cause, event.diagnostic, retry_after=event.retry_after))
            return
        single = self._singles.pop(tid, None)
        if single is not None:
            if not single[0].done():
                single[0].set_exception(TransactionError(
                    event.cause, event.diagnostic, retry_after=event.retry_after))
            return
        owner = self.outstanding.owners.get(tid)
        if owner is not None:
            owner.on_failed(tid, event.cause, event.diagnostic, event.retry_after)

    def _fail_all(self, reason: str, exc: BaseException | None) -> None:
        if not self._hello.done():
            retryable = not (isinstance(exc, ssl.SSLError) and _is_alert(exc))
            self._hello.set_exception(HandshakeError(
                _refusal(exc) if isinstance(exc, ssl.SSLError) else reason, retryable=retryable))
        for waiter in self._sync_waiters.values():
            if not waiter.done():
                waiter.set_exception(self._lost_error())
        self._sync_waiters.clear()
        for fut, _uid in self._singles.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(reason))
        self._singles.clear()
        self.outstanding.clear()
        for run in list(self._runs):
            run.on_lost(self._lost_error())

    def _lost_error(self) -> ConnectionLost:
        """A new ConnectionLost (one per run: each fills in its own UEs)."""
        goodbye = self.goodbye
        if goodbye is not None:
            cause = _error_cause(goodbye.error_cause)
            return ConnectionLost(f"server said GOODBYE({_name(cause)})"
                                  + (f": {goodbye.diagnostic}" if goodbye.diagnostic else ""),
                                  goodbye_cause=cause, retry_after=goodbye.retry_after)
        return ConnectionLost(self.lost_reason or "connection closed")

    def flush(self) -> None:
        data = self.session.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.octets_out += len(data)
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

    # --- runs ---------------------------------------------------------------------------------

    def _stream(self, ues: UeIterable, op: Operation, *,
                use_bulk: bool) -> AsyncIterator[UeResult]:
        return self.stream_from(UeSource(ues), op, use_bulk=use_bulk, own_source=True)

    async def stream_from(
        self, source: UeSource, op: Operation, *, use_bulk: bool, own_source: bool = False
    ) -> AsyncIterator[UeResult]:
        """Run procedures for the UEs of `source`. On an error the UEs without a result are
        put back in front of `source`, for a GatewaySession to send on its next connection;
        with own_source they go into the exception instead, and `source` is closed."""
        try:
            self._check_open()
            run = Run(self, op, source, use_bulk=use_bulk, bulk_size=self.bulk_size,
                      busy_retries=self.busy_retries, tracer=self.tracer)
            self._runs.add(run)
            sender = self.loop.create_task(run.send())
            try:
                while True:
                    result = run.take()
                    if result is not None:
                        yield result
                        continue
                    if run.error is not None:
                        raise run.error
                    if sender.done() and not run.txns:
                        failure = sender.exception()
                        if failure is not None and not isinstance(failure, ConnectionEnding):
                            raise failure
                        if run.finished:
                            if source.error is not None:
                                raise UeSourceError(
                                    f"reading the UEs failed: {source.error}") from source.error
                            return
                        # Sending stopped with UEs left: GOODBYE, or the connection ends.
                        raise self._lost_error()
                    await run.wait()
            finally:
                self._runs.discard(run)
                if not sender.done():
                    sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionEnding, Exception):
                    await sender
                run.abandon()
                self._maybe_close()
        except ClientError as exc:
            if own_source:
                exc.ues = source.take_front()
                source.close()
            raise
        finally:
            if own_source:
                source.close()

    # --- v1.1 registry sync (msgd.gateway.sync) ----------------------------------------------

    @property
    def sync_supported(self) -> bool:
        return self.hello_ack is not None and self.hello_ack.sync_supported == 1

    async def sync_request(self, make: Any) -> Any:
        """Send the DIGEST / LIST REQUEST `make(tid)`; its DigestReceived / ListReceived."""
        return await self._one_transaction(make, self._sync_waiters)

    async def release(self, ue_service_id: str) -> UeResult:
        """De-register a UE registered through us without its credential (v1.1 Release)."""
        return await self._one_transaction(
            lambda tid: UeDeregistrationRequest(tid, ue_service_id, None, 1),
            self._singles, ue_service_id)  # type: ignore[no-any-return]

    async def _one_transaction(self, make: Any, waiters: dict[int, Any], *extra: Any) -> Any:
        self._check_open()
        if not self.sync_supported:
            raise ClientError("the server does not support registry sync (wire v1.1)")
        await self.outstanding.acquire_slot()
        try:
            tid = self.session.next_transaction_id()
            future: asyncio.Future[Any] = self.loop.create_future()
            waiters[tid] = (future, *extra) if extra else future
            self.session.send_request(make(tid))
            self.flush()
            return await future
        finally:
            self.outstanding.release_slot()
            self._maybe_close()

    async def sync(self, ues: Any, *, repair: bool = False) -> SyncReport:
        """Compare the server's registrations through us with `ues` (GatewayUe), and with
        `repair` fix the differences (msgd.gateway.sync.compare)."""
        return await compare(self, ues if isinstance(ues, LocalView) else list(ues),
                             repair=repair)

    def _check_open(self) -> None:
        if self.hello_ack is None:
            raise ConnectionLost("not connected")
        if not self.is_open:
            raise self._lost_error()

    # --- closing ----------------------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """GOODBYE(NORMAL), let our transactions finish (at most `timeout` s), then close."""
        transport = self.transport
        if transport is None:
            return
        if not transport.is_closing() and not self.session.is_closed:
            with contextlib.suppress(Exception):
                self.session.send_goodbye(ErrorCause.NORMAL)
                self.flush()
            self._maybe_close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)
        if not self._closed.done():
            self.abort()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._closed), 1.0)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)


def _is_alert(exc: ssl.SSLError) -> bool:
    """The peer refused the handshake with a TLS alert (our certificate, our version...)."""
    reason = str(getattr(exc, "reason", "") or exc).upper()
    return "ALERT" in reason or isinstance(exc, ssl.SSLCertVerificationError)


def _refusal(exc: ssl.SSLError) -> str:
    reason = str(getattr(exc, "reason", "") or exc)
    if "ALERT" in reason.upper():
        return f"the server refused the TLS handshake ({reason.lower()}): check --cert/--key"
    return f"TLS failed: {reason}"

