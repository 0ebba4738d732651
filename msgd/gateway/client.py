"""The Message Gateway side of wire-v1: an asyncio client that registers Non-MSGin5G UEs.

Two layers (aioquic's connection / client split):

* `GatewayClient` is ONE connection: mutual TLS with ALPN msgin5g-gw/1, HELLO, keepalive,
  GOODBYE, and the procedures of TS 23.554 8.2.3 (register), 8.2.4 (deregister) and 8.2.X
  (bulk_register / bulk_deregister). When the connection ends it raises `ConnectionLost`
  naming every UE that got no result; it never reconnects and never guesses.
* `GatewaySession` is what a gateway runs in production: it owns a GatewayClient, reconnects
  with jittered exponential back-off (no sooner than a GOODBYE's Retry after), and resumes a
  bulk run on the new connection with exactly the UEs that had no result.

    ctx = client_context("gw1.pem", "gw1.key", "ca.pem")
    async with GatewaySession("msgin5g.example", 7554, ssl_context=ctx) as gw:
        result = await gw.register(GatewayUe("ue-0001@gw1.example", key))
        async for result in gw.bulk_register(ues):     # any iterable or async iterable
            print(result.ue_service_id, result.cause_name)

Bulk runs stream: UEs are pulled from the caller's iterable only as the window allows, each
result is yielded as it arrives, and nothing holds the whole list (memory is bounded by
`window` + `bulk_size` UEs whatever the count). A run splits its UEs into bulk transactions of
at most the server's Maximum bulk entries, keeps up to Maximum outstanding transactions open,
lets the session cut fragments to the server's Maximum frame size, and computes each UE's
credential proof (wire-v1 §6) from its key and this connection's nonce. When HELLO ACK says
bulk is not allowed it uses individual procedures instead (8.2.X step 1).

Overload (wire-v1 §5): a UE answered SERVER_BUSY is sent again once its Retry after has passed
(at most `busy_retries` times; the last answer is what you get), and no new transaction starts
before then; a transaction ended by ERROR(OVERLOADED) is treated the same way.

Results come in request order, except that a UE sent again (SERVER_BUSY, or a reconnect) gets
its result when the later attempt is answered. `UeResult.attempts` says how many times a UE
was sent: a de-registration answered NOT_REGISTERED after more than one attempt may mean an
earlier attempt, whose answer was lost with its connection, took effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from msgd.errors import MsgdError
from msgd.log import get_logger
from msgd.registry.provisioning import identity_problem
from wire.constants import (
    ALPN_PROTOCOL,
    DEFAULT_MAX_FRAME_SIZE,
    ErrorCause,
    FailureCause,
    GatewayType,
    MessageType,
    Operation,
)
from wire.credential import KEY_SIZE, compute_proof
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
    PROFILE_SPEC,
    DeregistrationEntry,
    Hello,
    HelloAck,
    Profile,
    RegistrationEntry,
    UeDeregistrationRequest,
    UeRegistrationRequest,
    encode_group,
)
from wire.session import Limits, Role, Session

__all__ = [
    "Backoff",
    "ClientError",
    "ConnectionLost",
    "GatewayClient",
    "GatewaySession",
    "GatewayUe",
    "HandshakeError",
    "Trace",
    "TransactionError",
    "UeResult",
    "UeSourceError",
    "client_context",
]

log = get_logger("msgd.client")

# A Retry after is a hint; these are used when the server gave none (milliseconds).
DEFAULT_BUSY_RETRY_MS = 500
DEFAULT_OVERLOAD_RETRY_MS = 1000


# --- errors ----------------------------------------------------------------------------------


class ClientError(MsgdError):
    """Base of the gateway client's errors.

    `ues` holds, as GatewayUe in the order they were taken from your iterable, every UE that
    was handed to the client and has no result (sent without an answer, or not sent yet);
    `unanswered` is their UE Service IDs. UEs still in your iterable were not taken.
    """

    def __init__(self, message: str, *, ues: Iterable[GatewayUe] = ()) -> None:
        super().__init__(message)
        self.ues: list[GatewayUe] = list(ues)

    @property
    def unanswered(self) -> list[str]:
        return [ue.ue_service_id for ue in self.ues]


class HandshakeError(ClientError):
    """TCP, TLS, ALPN or HELLO failed. `retryable` is False when trying again cannot help
    (the server refused our certificate or our identity, or we refused the server's)."""

    def __init__(
        self,
        message: str,
        cause: ErrorCause | int | None = None,
        *,
        retryable: bool = True,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.cause = cause
        self.retryable = retryable
        # Milliseconds, from a GOODBYE/ERROR(OVERLOADED) that refused the session.
        self.retry_after = retry_after


class ConnectionLost(ClientError):
    """The connection ended (or the server said GOODBYE) with UEs still without a result.

    `goodbye_cause` / `retry_after` (milliseconds) are the GOODBYE's when there was one."""

    def __init__(
        self,
        message: str,
        *,
        ues: Iterable[GatewayUe] = (),
        goodbye_cause: ErrorCause | int | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message, ues=ues)
        self.goodbye_cause = goodbye_cause
        self.retry_after = retry_after


class TransactionError(ClientError):
    """The server ended a transaction with an ERROR this client does not recover from
    (e.g. INVALID_MESSAGE); entries without a result were not processed."""

    def __init__(
        self,
        cause: ErrorCause | int,
        diagnostic: str,
        *,
        ues: Iterable[GatewayUe] = (),
        retry_after: int | None = None,
    ) -> None:
        name = getattr(cause, "name", str(cause))
        super().__init__(f"server ended the transaction: {name} {diagnostic}".strip(), ues=ues)
        self.cause = cause
        self.retry_after = retry_after


class UeSourceError(ClientError):
    """Your iterable of UEs raised (the original exception is `__cause__`), or a UE cannot be
    sent (no key while the server requires a UE credential). UEs taken before it that were
    sent have had their results yielded; the rest are in `ues`."""


# --- values ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GatewayUe:
    """One Non-MSGin5G UE as the gateway is configured for it (TS 23.554 clause 8.1.3).

    `key` is K_ue (32 octets; None for a gateway the server trusts, TS 33.501 Y.6); `profile`
    is the optional Non-MSGin5G UE profile sent with registrations. Checked when made, so a
    bad UE fails here and not in the middle of a bulk transaction.
    """

    ue_service_id: str
    key: bytes | None = None
    profile: Profile | None = None

    def __post_init__(self) -> None:
        problem = identity_problem(self.ue_service_id, "UE Service ID")
        if problem is not None:
            raise ValueError(problem)
        key = self.key
        if key is not None and (not isinstance(key, bytes) or len(key) != KEY_SIZE):
            raise ValueError(f"{self.ue_service_id}: the key must be {KEY_SIZE} octets")
        if self.profile is not None:
            try:
                encode_group(PROFILE_SPEC, self.profile)
            except Exception as exc:  # construct and wire errors alike: the profile is bad
                raise ValueError(f"{self.ue_service_id}: bad profile ({exc})") from None

    def __repr__(self) -> str:  # never show the key
        return f"GatewayUe({self.ue_service_id!r})"


@dataclass(frozen=True, slots=True)
class UeResult:
    """The server's answer for one UE (cause None means success)."""

    ue_service_id: str
    ok: bool
    cause: FailureCause | int | None = None
    retry_after: int | None = None
    attempts: int = 1

    @property
    def cause_name(self) -> str:
        if self.cause is None:
            return "SUCCESS"
        return getattr(self.cause, "name", str(self.cause))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what `msgctl gateway --json` prints)."""
        return {
            "ue_service_id": self.ue_service_id,
            "ok": self.ok,
            "cause": None if self.cause is None else self.cause_name,
            "retry_after": self.retry_after,
            "attempts": self.attempts,
        }


@dataclass(frozen=True, slots=True)
class Trace:
    """What a `tracer` callback receives: `event` is "sent" (a UE went out; `attempt` counts
    from 1), "busy" (SERVER_BUSY or OVERLOADED; it will be sent again after `retry_after` ms),
    "bulk" (a bulk transaction started; `count` entries) or "result". `time` is the event
    loop's clock."""

    event: str
    time: float
    ue_service_id: str = ""
    attempt: int = 0
    retry_after: int | None = None
    count: int = 0
    cause: FailureCause | int | None = None


Tracer = Callable[[Trace], None]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Reconnect delays: exponential, capped, with "equal jitter" (half fixed, half random) so
    a fleet of gateways that lost the same server does not come back in lock step."""

    initial: float = 0.25
    maximum: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.multiplier < 1:
            raise ValueError("need 0 < initial <= maximum and multiplier >= 1")

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before attempt number `failures` + 1 (0 for the first)."""
        if failures <= 0:
            return 0.0
        ceiling = min(self.maximum, self.initial * self.multiplier ** (failures - 1))
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def client_context(
    certificate: str, private_key: str, ca: str, *, min_version: str = "1.3"
) -> ssl.SSLContext:
    """A mutual-TLS client context with ALPN msgin5g-gw/1; TLSSetupError names a bad file."""
    from msgd.tls.contexts import client_context as _ctx

    return _ctx(certificate, private_key, ca, min_version=min_version)


def _cause(value: int | None) -> FailureCause | int | None:
    if value is None:
        return None
    try:
        return FailureCause(value)
    except ValueError:
        return value


def _error_cause(value: int) -> ErrorCause | int:
    try:
        return ErrorCause(value)
    except ValueError:
        return value


def _name(cause: Any) -> str:
    return str(getattr(cause, "name", cause))


# --- the caller's UEs --------------------------------------------------------------------------


class _Item:
    """A UE taken from the caller: `seq` is its place in the caller's order, `sends` how often
    it went out, `busy` how often it was answered SERVER_BUSY (or its transaction OVERLOADED)."""

    __slots__ = ("busy", "sends", "seq", "ue")

    def __init__(self, seq: int, ue: GatewayUe) -> None:
        self.seq = seq
        self.ue = ue
        self.sends = 0
        self.busy = 0


_EOF = object()
_TIMEOUT = object()


class _Source:
    """The caller's iterable, plus UEs put back (unanswered on a lost connection) in front.

    A pull from an async iterable runs as its own future and is never cancelled by a timeout:
    cancelling __anext__ would finalise the caller's generator. So a GatewaySession can hand
    the same _Source, pending pull included, to the next connection.
    """

    def __init__(self, ues: Iterable[GatewayUe] | AsyncIterable[GatewayUe]) -> None:
        self._sync: Iterator[GatewayUe] | None = None
        self._async: AsyncIterator[GatewayUe] | None = None
        if hasattr(ues, "__aiter__"):
            self._async = ues.__aiter__()  # type: ignore[union-attr]
        else:
            self._sync = iter(ues)  # type: ignore[arg-type]
        self._next: asyncio.Future[GatewayUe] | None = None
        self.front: deque[_Item] = deque()
        self.exhausted = False
        self.error: BaseException | None = None
        self._seq = 0

    @property
    def is_async(self) -> bool:
        return self._async is not None

    def _wrap(self, ue: Any) -> _Item:
        if not isinstance(ue, GatewayUe):
            raise TypeError(f"expected GatewayUe, got {type(ue).__name__}")
        self._seq += 1
        return _Item(self._seq, ue)

    def ready(self) -> bool:
        """Whether get(0) would return an item or end without waiting."""
        return bool(self.front) or self.exhausted or self._sync is not None or (
            self._next is not None and self._next.done())

    async def get(self, timeout: float | None, interrupt: asyncio.Event | None = None) -> Any:
        """The next _Item, _EOF, or _TIMEOUT when an async iterable has nothing within
        `timeout` seconds (or `interrupt` is set first). The iterable's own exception ends it
        and is kept in `error`."""
        if self.front:
            return self.front.popleft()
        if self.exhausted:
            return _EOF
        try:
            if self._sync is not None:
                try:
                    return self._wrap(next(self._sync))
                except StopIteration:
                    self.exhausted = True
                    return _EOF
            assert self._async is not None
            if self._next is None:
                self._next = asyncio.ensure_future(anext(self._async))
            if not self._next.done():
                if timeout is not None and timeout <= 0:
                    return _TIMEOUT
                # asyncio.wait never cancels what it waits for.
                waiter = asyncio.ensure_future(interrupt.wait()) if interrupt else None
                try:
                    await asyncio.wait((self._next, waiter) if waiter else (self._next,),
                                       timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if waiter is not None:
                        waiter.cancel()
                if not self._next.done():
                    return _TIMEOUT
            future, self._next = self._next, None
            try:
                return self._wrap(future.result())
            except StopAsyncIteration:
                self.exhausted = True
                return _EOF
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException as exc:  # reported as UeSourceError, after the drain
            self.exhausted = True
            self.error = exc
            return _EOF

    def put_back(self, items: Iterable[_Item]) -> None:
        """Unanswered UEs go in front, in the caller's order."""
        self.front.extendleft(sorted(items, key=lambda i: i.seq, reverse=True))

    def take_front(self) -> list[GatewayUe]:
        ues = [item.ue for item in self.front]
        self.front.clear()
        return ues

    def close(self) -> None:
        """Give up: a pull still in progress is cancelled (nothing was taken from it)."""
        if self._next is not None and not self._next.done():
            self._next.cancel()
        self._next = None


# --- one run of procedures over one connection ---------------------------------------------


class _Stop(Exception):
    """Internal: the sender stops (connection ending); the consumer decides what it means."""


class _Run:
    """One bulk_register / bulk_deregister (or a single procedure) on one connection.

    The sender task takes UEs from the _Source into `backlog`, sends them as bulk entries or
    single requests, and moves each to its transaction's deque in `txns`. Answers arrive as
    callbacks from GatewayClient._process (never blocking) and become UeResults in `results`,
    or go to `retry` on SERVER_BUSY. Every UE taken is always in exactly one of backlog,
    retry, txns or results, so whatever ends the run, the UEs without a result are known.
    """

    def __init__(
        self,
        client: GatewayClient,
        op: Operation,
        source: _Source,
        *,
        use_bulk: bool,
        bulk_size: int,
        busy_retries: int,
        tracer: Tracer | None,
    ) -> None:
        assert client.hello_ack is not None
        self.client = client
        self.op = op
        self.source = source
        self.use_bulk = use_bulk and client.bulk_allowed
        self.bulk_size = max(1, min(bulk_size, client.hello_ack.max_bulk_entries))
        self.busy_retries = busy_retries
        self.tracer = tracer
        self.window = client.window
        self.backlog: deque[_Item] = deque()
        self.retry: deque[_Item] = deque()
        self.txns: dict[int, deque[_Item]] = {}
        self.results: deque[UeResult] = deque()
        # Sent and unanswered, plus answered and not yet consumed: the sender stays below
        # `window`, so a slow consumer holds the sender back and memory stays bounded.
        self.unanswered = 0
        self.resume_at = 0.0
        self.error: ClientError | None = None
        self.sender_done = False
        self.answers = 0
        self._wake_consumer = asyncio.Event()
        self._wake_sender = asyncio.Event()
        self._window_waiting = False

    # --- answers (called from GatewayClient._process; must not block) -------------------------

    def on_answer(self, tid: int, result: int, failure_cause: int | None,
                  retry_after: int | None) -> None:
        inflight = self.txns.get(tid)
        if not inflight:
            return
        item = inflight.popleft()
        self.answers += 1
        now = self.client.loop.time()
        if failure_cause == FailureCause.SERVER_BUSY and item.busy < self.busy_retries:
            # wire-v1 §5 Overload: send it again once Retry after has passed.
            item.busy += 1
            delay = retry_after if retry_after is not None else DEFAULT_BUSY_RETRY_MS
            self.resume_at = max(self.resume_at, now + delay / 1000)
            self.retry.append(item)
            self.unanswered -= 1
            if self.tracer is not None:
                self.tracer(Trace("busy", now, item.ue.ue_service_id, item.sends, delay))
            self._wake_sender.set()
            return
        outcome = UeResult(item.ue.ue_service_id, result == 0, _cause(failure_cause),
                           retry_after, item.sends)
        self.results.append(outcome)
        if self.tracer is not None:
            self.tracer(Trace("result", now, outcome.ue_service_id, item.sends,
                              retry_after, cause=outcome.cause))
        self._wake_consumer.set()

    def on_end(self, tid: int) -> None:
        inflight = self.txns.pop(tid, None)
        self.client._end_owned(tid)
        if inflight:
            # The session checks the count, so this cannot happen; if it did, say so.
            self.unanswered -= len(inflight)
            self._fail(TransactionError(ErrorCause.COUNT_MISMATCH, "response ended early"),
                       inflight)
        self._wake_sender.set()
        self._wake_consumer.set()

    def on_failed(self, tid: int, cause: ErrorCause | int, diagnostic: str,
                  retry_after: int | None) -> None:
        inflight = self.txns.pop(tid, None)
        self.client._end_owned(tid)
        items = list(inflight or ())
        self.unanswered -= len(items)
        now = self.client.loop.time()
        if cause in (ErrorCause.OVERLOADED, ErrorCause.TOO_MANY_OUTSTANDING) and all(
                i.busy < self.busy_retries for i in items):
            delay = retry_after if retry_after is not None else DEFAULT_OVERLOAD_RETRY_MS
            self.resume_at = max(self.resume_at, now + delay / 1000)
            for item in items:
                item.busy += 1
                if self.tracer is not None:
                    self.tracer(Trace("busy", now, item.ue.ue_service_id, item.sends, delay))
            self.retry.extend(items)
        elif cause in (ErrorCause.BULK_NOT_ALLOWED, ErrorCause.SHUTTING_DOWN):
            # BULK_NOT_ALLOWED: the server changed its mind (reload); 8.2.X step 1 says use
            # 8.2.3 / 8.2.4. SHUTTING_DOWN: it said GOODBYE as we started; the UEs were not
            # processed and go to the next connection.
            if cause == ErrorCause.BULK_NOT_ALLOWED:
                self.use_bulk = False
            self.backlog.extendleft(reversed(items))
        else:
            self._fail(TransactionError(cause, diagnostic, retry_after=retry_after), items)
            return
        self._wake_sender.set()
        self._wake_consumer.set()

    def on_lost(self, exc: ConnectionLost) -> None:
        # Items in `txns` stay there: unanswered_items() collects them in the end.
        self._fail(exc, ())

    def on_goodbye(self) -> None:
        self._wake_sender.set()
        self._wake_consumer.set()

    def _fail(self, exc: ClientError, items: Iterable[_Item]) -> None:
        if self.error is None:
            self.error = exc
        # Items already in `txns` are collected by unanswered_items(); these were taken out.
        self.backlog.extendleft(reversed(list(items)))
        self._wake_consumer.set()
        self._wake_sender.set()

    # --- the sender --------------------------------------------------------------------------

    def _can_start(self) -> bool:
        client = self.client
        return self.error is None and client.goodbye is None and client.is_open

    async def send(self) -> None:
        client = self.client
        loop = client.loop
        source = self.source
        try:
            while self.error is None:
                if not self._can_start():
                    # GOODBYE or the connection is going: no new transaction (wire-v1 §4.5).
                    # A source that can say at once whether it has more is asked, so a run
                    # that is in fact complete ends as such.
                    if not self.backlog and not self.retry and source.ready():
                        item = await source.get(0)
                        if item is not _EOF and item is not _TIMEOUT:
                            self.backlog.append(item)
                    break
                now = loop.time()
                if self.retry and now < self.resume_at:
                    await self._sleep_until(self.resume_at)
                    continue
                if not self.backlog and self.retry and now >= self.resume_at:
                    self.backlog.extend(self.retry)
                    self.retry.clear()
                if not self.backlog:
                    if not source.exhausted or source.front:
                        await self._pull()
                        continue
                    if self.retry or self.txns:
                        await self._wait_sender()
                        continue
                    break
                if now < self.resume_at:
                    # Overloaded: no new transaction before Retry after (wire-v1 §5).
                    await self._sleep_until(self.resume_at)
                    continue
                if self.use_bulk:
                    await self._send_bulk()
                else:
                    await self._send_single()
        finally:
            self.sender_done = True
            self._wake_consumer.set()

    async def _pull(self) -> None:
        """Take UEs for the next transaction: up to bulk_size (1 for single procedures)."""
        want = self.bulk_size if self.use_bulk else 1
        source = self.source
        # An async source that trickles: send what we have once it pauses for `linger`.
        linger = self.client.linger
        while len(self.backlog) < want and self.error is None:
            if not self._window_has_room():
                if self.backlog:
                    return
                await self._wait_window()
                continue
            self._wake_sender.clear()
            item = await source.get(linger if self.backlog else None, self._wake_sender)
            if item is _EOF or item is _TIMEOUT:
                return
            self.backlog.append(item)
            if not len(self.backlog) & 255:
                # A plain iterable never suspends us: let answers in while we take UEs.
                await asyncio.sleep(0)

    def _window_has_room(self) -> bool:
        return self.unanswered + len(self.backlog) < self.window

    async def _wait_window(self) -> None:
        self._window_waiting = True
        try:
            await self._wait_sender()
        finally:
            self._window_waiting = False

    async def _wait_sender(self) -> None:
        self._wake_sender.clear()
        await self._wake_sender.wait()

    async def _sleep_until(self, when: float) -> None:
        self._wake_sender.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake_sender.wait(),
                                   max(0.0, when - self.client.loop.time()))

    async def _send_bulk(self) -> None:
        client = self.client
        session = client.session
        await client._acquire_slot()
        owned = False
        try:
            async with client._bulk_lock:  # wire-v1 §5: one bulk request being sent at a time
                if not self.backlog or not self._can_start():
                    return
                count = min(len(self.backlog), self.bulk_size)
                tid = session.next_transaction_id()
                mtype = (MessageType.BULK_REGISTRATION_REQUEST
                         if self.op is Operation.REGISTRATION
                         else MessageType.BULK_DEREGISTRATION_REQUEST)
                session.start_bulk(mtype, tid, count)
                client._sending_bulk = tid
                inflight: deque[_Item] = deque()
                self.txns[tid] = inflight
                client._own(tid, self)
                owned = True
                tracer = self.tracer
                if tracer is not None:
                    tracer(Trace("bulk", client.loop.time(), count=count))
                await self._send_entries(tid, inflight, count, tracer)
        finally:
            if not owned:
                client._release_slot()

    async def _send_entries(self, tid: int, inflight: deque[_Item], count: int,
                            tracer: Tracer | None) -> None:
        client = self.client
        session = client.session
        nonce = client.nonce
        op = self.op
        registration = op is Operation.REGISTRATION
        need_proof = client.authentication_required
        backlog = self.backlog
        window = self.window
        sent = 0
        while sent < count and self.error is None:
            if self.unanswered >= window or not client._can_write.is_set():
                client._flush()
                await self._wait_room()
                continue
            if self.txns.get(tid) is not inflight or not backlog:
                break  # the server ended it (its ERROR) or the connection went
            item = backlog[0]
            ue = item.ue
            uid = ue.ue_service_id
            if ue.key is not None:
                proof: bytes | None = compute_proof(ue.key, nonce, op, uid)
            elif need_proof:
                self._no_key(ue)
                # The transaction still needs its count of entries: it ends now, unfinished.
                self._abandon_txn(tid)
                return
            else:
                proof = None
            entry: Any = (RegistrationEntry(uid, proof, ue.profile) if registration
                          else DeregistrationEntry(uid, proof))
            if not session.send_bulk_entry(tid, entry):
                break
            backlog.popleft()
            item.sends += 1
            inflight.append(item)
            self.unanswered += 1
            sent += 1
            if tracer is not None:
                tracer(Trace("sent", client.loop.time(), uid, item.sends))
            if not sent & 255:
                # Let answers in while we send (wire-v1 §5: a gateway MUST keep reading).
                client._flush()
                await asyncio.sleep(0)
        if sent == count and client._sending_bulk == tid:
            client._sending_bulk = None
        client._flush()

    async def _wait_room(self) -> None:
        client = self.client
        if not client._can_write.is_set():
            await client._can_write.wait()
            return
        await self._wait_window()

    async def _send_single(self) -> None:
        client = self.client
        session = client.session
        await client._acquire_slot()
        if not self.backlog or not self._can_start():
            client._release_slot()
            return
        item = self.backlog[0]
        ue = item.ue
        uid = ue.ue_service_id
        if ue.key is not None:
            proof: bytes | None = compute_proof(ue.key, client.nonce, self.op, uid)
        elif client.authentication_required:
            client._release_slot()
            self._no_key(ue)
            return
        else:
            proof = None
        tid = session.next_transaction_id()
        request: Any = (UeRegistrationRequest(tid, uid, proof, ue.profile)
                        if self.op is Operation.REGISTRATION
                        else UeDeregistrationRequest(tid, uid, proof))
        session.send_request(request)
        self.backlog.popleft()
        item.sends += 1
        self.txns[tid] = deque((item,))
        client._own(tid, self)
        self.unanswered += 1
        if self.tracer is not None:
            self.tracer(Trace("sent", client.loop.time(), uid, item.sends))
        client._flush()

    def _no_key(self, ue: GatewayUe) -> None:
        self._fail(UeSourceError(
            f"{ue.ue_service_id}: the server requires a UE credential and no key is configured"
        ), ())

    def _abandon_txn(self, tid: int) -> None:
        inflight = self.txns.pop(tid, None)
        self.client._abandon(tid)
        if inflight:
            self.unanswered -= len(inflight)
            self.backlog.extendleft(reversed(inflight))

    # --- the consumer --------------------------------------------------------------------------

    def take(self) -> UeResult | None:
        if not self.results:
            return None
        self.unanswered -= 1
        if self._window_waiting and self.unanswered <= self.window // 2:
            self._wake_sender.set()
        return self.results.popleft()

    @property
    def finished(self) -> bool:
        return (self.sender_done and not self.results and not self.txns and not self.retry
                and not self.backlog)

    async def wait(self) -> None:
        self._wake_consumer.clear()
        await self._wake_consumer.wait()

    def unanswered_items(self) -> list[_Item]:
        items = list(self.backlog)
        items.extend(self.retry)
        for inflight in self.txns.values():
            items.extend(inflight)
        return items

    def abandon(self) -> None:
        """The run ends (error or the caller stopped): no transaction of ours stays owned."""
        for tid in list(self.txns):
            self.client._abandon(tid)
        lost = self.unanswered_items()
        self.backlog.clear()
        self.retry.clear()
        self.txns.clear()
        self.source.put_back(lost)


# --- one connection ----------------------------------------------------------------------------


class _Orphan:
    """Owner of transactions whose run has ended: answers are dropped, slots given back."""

    def __init__(self, client: GatewayClient) -> None:
        self.client = client

    def on_answer(self, *_: Any) -> None:
        pass

    def on_end(self, tid: int) -> None:
        self.client._end_owned(tid)

    def on_failed(self, tid: int, *_: Any) -> None:
        self.client._end_owned(tid)


class GatewayClient(asyncio.Protocol):
    """One connection to an MSGin5G Server, in the GATEWAY role (wire-v1 §4, §5)."""

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
        self._owners: dict[int, Any] = {}
        self._orphan = _Orphan(self)
        self._slots_used = 0
        self._slot_free = asyncio.Event()
        self._bulk_lock = asyncio.Lock()
        self._sending_bulk: int | None = None  # tid of the bulk request being sent
        self._runs: set[_Run] = set()
        self._can_write = asyncio.Event()
        self._can_write.set()
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
        self._flush()
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
        return max(0, self.hello_ack.max_outstanding - self._slots_used)

    # --- bytes in ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
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
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def _process(self) -> None:
        """Long on purpose: the gateway role's event dispatch, one branch per session event;
        splitting it would add a call per event on the hot path."""
        session = self.session
        owners = self._owners
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
                        waiter[0].set_result(UeResult(r.ue_service_id, r.result == 0,
                                                      _cause(r.failure_cause), r.retry_after))
                    continue
                owner = owners.get(tid)
                if owner is not None:
                    owner.on_answer(tid, r.result, r.failure_cause, r.retry_after)
                    owner.on_end(tid)
            elif kind is BulkEnded:
                owner = owners.get(event.transaction_id)
                if owner is not None:
                    owner.on_end(event.transaction_id)
            elif kind is TransactionFailed:
                self._on_transaction_failed(event)
            elif kind is HelloAckReceived:
                self.hello_ack = event.hello_ack
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
        self._flush()
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
            and not self._singles and not self._owners
        ):
            transport.close()

    def _on_transaction_failed(self, event: TransactionFailed) -> None:
        tid = event.transaction_id
        single = self._singles.pop(tid, None)
        if single is not None:
            if not single[0].done():
                single[0].set_exception(TransactionError(
                    event.cause, event.diagnostic, retry_after=event.retry_after))
            return
        owner = self._owners.get(tid)
        if owner is not None:
            owner.on_failed(tid, event.cause, event.diagnostic, event.retry_after)

    def _fail_all(self, reason: str, exc: BaseException | None) -> None:
        if not self._hello.done():
            retryable = not (isinstance(exc, ssl.SSLError) and _is_alert(exc))
            self._hello.set_exception(HandshakeError(
                _refusal(exc) if isinstance(exc, ssl.SSLError) else reason, retryable=retryable))
        for fut, _uid in self._singles.values():
            if not fut.done():
                fut.set_exception(ConnectionLost(reason))
        self._singles.clear()
        self._owners.clear()
        self._sending_bulk = None
        self._slots_used = 0
        self._slot_free.set()
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

    # --- transactions and slots ---------------------------------------------------------------

    async def _acquire_slot(self) -> None:
        """wire-v1 §4: at most Maximum outstanding transactions at once."""
        assert self.hello_ack is not None
        while self._slots_used >= self.hello_ack.max_outstanding:
            if not self.is_open:
                raise _Stop()
            self._slot_free.clear()
            await self._slot_free.wait()
        self._slots_used += 1

    def _release_slot(self) -> None:
        if self._slots_used > 0:
            self._slots_used -= 1
        self._slot_free.set()

    def _own(self, tid: int, owner: Any) -> None:
        self._owners[tid] = owner

    def _end_owned(self, tid: int) -> None:
        if self._owners.pop(tid, None) is not None:
            self._release_slot()
        if tid == self._sending_bulk:  # the server ended it before we sent it all
            self._sending_bulk = None
        self._maybe_close()

    def _abandon(self, tid: int) -> None:
        """Our run no longer wants this transaction. A bulk request still being sent is ended
        with ERROR (it cannot be left half sent: the next bulk could not start); answers to
        the rest are dropped as they come."""
        if tid not in self._owners:
            return
        self._owners[tid] = self._orphan
        session = self.session
        if session.is_closed:
            return
        if tid == self._sending_bulk:
            self._sending_bulk = None
            if tid in session.in_progress():
                session.send_error(tid, ErrorCause.INTERNAL_ERROR,
                                   "gateway abandoned the request")
                self._flush()
            # Our ERROR ended the transaction: nothing more comes for it.
            self._end_owned(tid)

    # --- procedures -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.hello_ack is None:
            raise ConnectionLost("not connected")
        if not self.is_open:
            raise self._lost_error()

    async def register(self, ue: GatewayUe) -> UeResult:
        """TS 23.554 8.2.3: register one UE (SERVER_BUSY is retried after Retry after)."""
        return await self._single(ue, Operation.REGISTRATION)

    async def deregister(self, ue: GatewayUe) -> UeResult:
        """TS 23.554 8.2.4: de-register one UE."""
        return await self._single(ue, Operation.DEREGISTRATION)

    async def _single(self, ue: GatewayUe, op: Operation) -> UeResult:
        stream = self._stream(_Source((ue,)), op, use_bulk=False, own_source=True)
        async with contextlib.aclosing(stream) as results:
            async for result in results:
                return result
        raise ConnectionLost("no result", ues=(ue,))  # pragma: no cover - the run raises

    def bulk_register(
        self, ues: Iterable[GatewayUe] | AsyncIterable[GatewayUe], *, bulk: bool = True
    ) -> AsyncIterator[UeResult]:
        """TS 23.554 8.2.X: register UEs in bulk (8.2.3 one by one when the server does not
        allow bulk, or with bulk=False); yields one result per UE as the answers arrive."""
        return self._stream(_Source(ues), Operation.REGISTRATION, use_bulk=bulk,
                            own_source=True)

    def bulk_deregister(
        self, ues: Iterable[GatewayUe] | AsyncIterable[GatewayUe], *, bulk: bool = True
    ) -> AsyncIterator[UeResult]:
        """Bulk de-registration (8.2.4 one by one when bulk is not allowed or bulk=False)."""
        return self._stream(_Source(ues), Operation.DEREGISTRATION, use_bulk=bulk,
                            own_source=True)

    async def _stream(
        self, source: _Source, op: Operation, *, use_bulk: bool, own_source: bool
    ) -> AsyncIterator[UeResult]:
        """Run procedures for the UEs of `source`. On an error the UEs without a result are
        put back in front of `source`; with own_source they also go into the exception."""
        try:
            self._check_open()
            run = _Run(self, op, source, use_bulk=use_bulk, bulk_size=self.bulk_size,
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
                        if failure is not None and not isinstance(failure, _Stop):
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
                with contextlib.suppress(asyncio.CancelledError, _Stop, Exception):
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

    # --- closing ----------------------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """GOODBYE(NORMAL), let our transactions finish (at most `timeout` s), then close."""
        transport = self.transport
        if transport is None:
            return
        if not transport.is_closing() and not self.session.is_closed:
            with contextlib.suppress(Exception):
                self.session.send_goodbye(ErrorCause.NORMAL)
                self._flush()
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


# --- the reconnecting session ------------------------------------------------------------------


class GatewaySession:
    """A gateway's link to one MSGin5G Server that survives restarts and GOODBYEs.

    Connects on first use (or `await session.connect()`); when the connection is lost it
    reconnects after Backoff delays (never before a GOODBYE's Retry after) and carries on:
    a single procedure is sent again, a bulk run resumes with the UEs that had no result.
    It gives up with ConnectionLost after `max_attempts` connections in a row produced no
    result, or at once on errors retrying cannot fix (HandshakeError.retryable False:
    certificates refused, gateway not allowed).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        gateway_type: GatewayType = GatewayType.NON_3GPP,
        node_name: str | None = None,
        connect_timeout: float = 10.0,
        backoff: Backoff | None = None,
        max_attempts: int = 8,
        busy_retries: int = 3,
        bulk_size: int = GatewayClient.BULK_SIZE,
        window: int = GatewayClient.WINDOW,
        tracer: Tracer | None = None,
        on_reconnect: Callable[[str, float], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.gateway_type = gateway_type
        self.node_name = node_name
        self.connect_timeout = connect_timeout
        self.backoff = backoff or Backoff()
        self.max_attempts = max_attempts
        self.options: dict[str, Any] = {
            "busy_retries": busy_retries, "bulk_size": bulk_size, "window": window,
            "tracer": tracer}
        self.on_reconnect = on_reconnect
        self.rng = rng or random.Random()
        self.client: GatewayClient | None = None
        self.connections = 0
        self._failures = 0  # connections in a row that ended without giving a result
        self._not_before = 0.0  # a GOODBYE's Retry after, on the loop clock
        self._lock = asyncio.Lock()
        self._closed = False

    async def __aenter__(self) -> GatewaySession:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def hello_ack(self) -> HelloAck | None:
        return self.client.hello_ack if self.client is not None else None

    @property
    def bulk_allowed(self) -> bool:
        return self.client is not None and self.client.bulk_allowed

    async def connect(self, *, retry: bool = True) -> GatewayClient:
        """The current connection, or a new one (after the back-off delay that applies).
        With retry=False a failed attempt raises its HandshakeError at once."""
        client = self.client
        if client is not None and client.is_open:
            return client
        async with self._lock:
            while True:
                if self._closed:
                    raise ConnectionLost("session closed")
                client = self.client
                if client is not None and client.is_open:
                    return client
                if client is not None:
                    client.abort()
                    self.client = None
                loop = asyncio.get_running_loop()
                delay = max(self.backoff.delay(self._failures, self.rng),
                            self._not_before - loop.time())
                if delay > 0:
                    if self.on_reconnect is not None:
                        self.on_reconnect(f"{self.host}:{self.port}", delay)
                    log.info("client.reconnect", server=f"{self.host}:{self.port}",
                             delay=round(delay, 3), failures=self._failures)
                    await asyncio.sleep(delay)  # back-off: waiting is the point
                try:
                    client = await GatewayClient.connect(
                        self.host, self.port, ssl_context=self.ssl_context,
                        server_hostname=self.server_hostname, gateway_type=self.gateway_type,
                        node_name=self.node_name, timeout=self.connect_timeout, **self.options)
                except HandshakeError as exc:
                    if not exc.retryable or not retry:
                        raise
                    if exc.retry_after is not None:
                        self._not_before = max(self._not_before,
                                               loop.time() + exc.retry_after / 1000)
                    self._count_failure(exc)
                    continue
                self.client = client
                self.connections += 1
                return client

    def _count_failure(self, exc: ClientError) -> None:
        self._failures += 1
        if self._failures >= self.max_attempts:
            if self.max_attempts == 1:
                raise ConnectionLost(f"{exc} (reconnecting is off)") from exc
            raise ConnectionLost(
                f"gave up after {self._failures} connections in a row without a result: "
                f"{exc}") from exc

    def _lost(self, client: GatewayClient, exc: ConnectionLost, progressed: bool) -> None:
        if progressed:
            self._failures = 0
        if exc.retry_after is not None:
            # wire-v1 §4.5: GOODBYE(OVERLOADED / SHUTTING_DOWN) with Retry after.
            self._not_before = max(self._not_before, client.loop.time() + exc.retry_after / 1000)
        if self.client is client:
            self.client = None
        client.abort()
        log.info("client.connection_lost", reason=str(exc), retry_after=exc.retry_after)
        self._count_failure(exc)

    async def register(self, ue: GatewayUe) -> UeResult:
        """8.2.3 with reconnects: sent again on a new connection if the answer was lost."""
        return await self._single(ue, Operation.REGISTRATION)

    async def deregister(self, ue: GatewayUe) -> UeResult:
        """8.2.4 with reconnects (see UeResult.attempts about a lost first answer)."""
        return await self._single(ue, Operation.DEREGISTRATION)

    async def _single(self, ue: GatewayUe, op: Operation) -> UeResult:
        async with contextlib.aclosing(self._stream((ue,), op, use_bulk=False)) as results:
            async for result in results:
                return result
        raise ConnectionLost("no result", ues=(ue,))  # pragma: no cover

    def bulk_register(
        self, ues: Iterable[GatewayUe] | AsyncIterable[GatewayUe], *, bulk: bool = True
    ) -> AsyncIterator[UeResult]:
        """Like GatewayClient.bulk_register, across reconnects: one result per UE."""
        return self._stream(ues, Operation.REGISTRATION, use_bulk=bulk)

    def bulk_deregister(
        self, ues: Iterable[GatewayUe] | AsyncIterable[GatewayUe], *, bulk: bool = True
    ) -> AsyncIterator[UeResult]:
        return self._stream(ues, Operation.DEREGISTRATION, use_bulk=bulk)

    async def _stream(
        self, ues: Iterable[GatewayUe] | AsyncIterable[GatewayUe], op: Operation,
        *, use_bulk: bool,
    ) -> AsyncIterator[UeResult]:
        source = _Source(ues)
        try:
            while True:
                try:
                    client = await self.connect()
                except ClientError as exc:
                    exc.ues = source.take_front()
                    raise
                progressed = False
                try:
                    async for result in client._stream(source, op, use_bulk=use_bulk,
                                                       own_source=False):
                        if not progressed:
                            progressed = True
                            self._failures = 0
                        yield result
                    return
                except ConnectionLost as exc:
                    try:
                        self._lost(client, exc, progressed)
                    except ConnectionLost as final:
                        final.ues = source.take_front()
                        raise
                except ClientError as exc:
                    exc.ues = source.take_front()
                    raise
        finally:
            source.close()

    async def close(self) -> None:
        self._closed = True
        client, self.client = self.client, None
        if client is not None:
            await client.close()
