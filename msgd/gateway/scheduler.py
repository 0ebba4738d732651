"""The bulk scheduler: how one run of procedures streams the caller's UEs over one connection.

A run (`Run`) takes UEs from the caller's iterable (`UeSource`) only as its window allows,
groups them into bulk transactions of at most the server's Maximum bulk entries (or single
requests when bulk is not allowed, TS 23.554 8.2.X step 1), keeps at most Maximum outstanding
transactions open, computes each UE's credential proof (wire-v1 §6) from its key and the
connection's nonce, and turns the answers into `UeResult`s. SERVER_BUSY and ERROR(OVERLOADED)
put UEs back for a later send (wire-v1 §5 Overload).

The run sees its connection only through `Connection` below, and its transactions through
the connection's `Outstanding` table (msgd.gateway.transactions), which hands it the answers
as their `TransactionOwner`: that is the whole interface with `msgd.gateway.client`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any, Protocol

from msgd.gateway.errors import ClientError, ConnectionLost, TransactionError, UeSourceError
from msgd.gateway.transactions import Outstanding
from msgd.gateway.values import GatewayUe, Trace, Tracer, UeResult, as_failure_cause
from wire.constants import ErrorCause, FailureCause, MessageType, Operation
from wire.credential import compute_proof
from wire.messages import (
    DeregistrationEntry,
    HelloAck,
    RegistrationEntry,
    UeDeregistrationRequest,
    UeRegistrationRequest,
)
from wire.session import Session

__all__ = ["Connection", "Run", "UeSource"]

# A Retry after is a hint; these are used when the server gave none (milliseconds).
DEFAULT_BUSY_RETRY_MS = 500
DEFAULT_OVERLOAD_RETRY_MS = 1000


class Connection(Protocol):
    """What a Run uses of its connection (`msgd.gateway.client.GatewayClient`)."""

    loop: asyncio.AbstractEventLoop
    session: Session  # the sans-IO wire session: the run sends through it directly
    hello_ack: HelloAck | None
    window: int  # unanswered UEs a run allows itself
    linger: float  # seconds a trickling async iterable may pause before a bulk goes
    writable: asyncio.Event  # set while the transport takes more (asyncio flow control)
    outstanding: Outstanding  # its transactions: slots, owners, the bulk being sent

    @property
    def nonce(self) -> bytes: ...

    @property
    def bulk_allowed(self) -> bool: ...

    @property
    def authentication_required(self) -> bool: ...

    @property
    def is_open(self) -> bool:
        """New transactions may start (established, no GOODBYE, transport up)."""

    def flush(self) -> None:
        """Write what the session has queued."""


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


class UeSource:
    """The caller's iterable, plus UEs put back (unanswered on a lost connection) in front.

    A pull from an async iterable runs as its own future and is never cancelled by a timeout:
    cancelling __anext__ would finalise the caller's generator. So a GatewaySession can hand
    the same UeSource, pending pull included, to the next connection.
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


class Run:
    """One bulk_register / bulk_deregister (or a single procedure) on one connection.

    The sender task takes UEs from the UeSource into `backlog`, sends them as bulk entries or
    single requests, and moves each to its transaction's deque in `txns`. Answers arrive as
    TransactionOwner callbacks from the connection's event dispatch (never blocking) and
    become UeResults in `results`, or go to `retry` on SERVER_BUSY. Every UE taken is always
    in exactly one of backlog, retry, txns or results, so whatever ends the run, the UEs
    without a result are known. The code that consumes the run (GatewayClient) starts `send`
    as a task and reads with `take` / `wait`.
    """

    def __init__(
        self,
        conn: Connection,
        op: Operation,
        source: UeSource,
        *,
        use_bulk: bool,
        bulk_size: int,
        busy_retries: int,
        tracer: Tracer | None,
    ) -> None:
        assert conn.hello_ack is not None
        self.conn = conn
        self.op = op
        self.source = source
        self.use_bulk = use_bulk and conn.bulk_allowed
        self.bulk_size = max(1, min(bulk_size, conn.hello_ack.max_bulk_entries))
        self.busy_retries = busy_retries
        self.tracer = tracer
        self.window = conn.window
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

    # --- answers: the TransactionOwner side (called from the connection; must not block) ----

    def on_answer(self, tid: int, result: int, failure_cause: int | None,
                  retry_after: int | None) -> None:
        inflight = self.txns.get(tid)
        if not inflight:
            return
        item = inflight.popleft()
        self.answers += 1
        now = self.conn.loop.time()
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
        outcome = UeResult(item.ue.ue_service_id, result == 0, as_failure_cause(failure_cause),
                           retry_after, item.sends)
        self.results.append(outcome)
        if self.tracer is not None:
            self.tracer(Trace("result", now, outcome.ue_service_id, item.sends,
                              retry_after, cause=outcome.cause))
        self._wake_consumer.set()

    def on_end(self, tid: int) -> None:
        inflight = self.txns.pop(tid, None)
        self.conn.outstanding.end(tid)
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
        self.conn.outstanding.end(tid)
        items = list(inflight or ())
        self.unanswered -= len(items)
        now = self.conn.loop.time()
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
        return self.error is None and self.conn.is_open

    async def send(self) -> None:
        conn = self.conn
        loop = conn.loop
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
        linger = self.conn.linger
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
                                   max(0.0, when - self.conn.loop.time()))

    async def _send_bulk(self) -> None:
        conn = self.conn
        session = conn.session
        outstanding = conn.outstanding
        await outstanding.acquire_slot()
        owned = False
        try:
            async with outstanding.bulk_lock:  # wire-v1 §5: one bulk request sent at a time
                if not self.backlog or not self._can_start():
                    return
                count = min(len(self.backlog), self.bulk_size)
                tid = session.next_transaction_id()
                mtype = (MessageType.BULK_REGISTRATION_REQUEST
                         if self.op is Operation.REGISTRATION
                         else MessageType.BULK_DEREGISTRATION_REQUEST)
                session.start_bulk(mtype, tid, count)
                inflight: deque[_Item] = deque()
                self.txns[tid] = inflight
                outstanding.own(tid, self, bulk=True)
                owned = True
                tracer = self.tracer
                if tracer is not None:
                    tracer(Trace("bulk", conn.loop.time(), count=count))
                await self._send_entries(tid, inflight, count, tracer)
        finally:
            if not owned:
                outstanding.release_slot()

    async def _send_entries(self, tid: int, inflight: deque[_Item], count: int,
                            tracer: Tracer | None) -> None:
        conn = self.conn
        session = conn.session
        nonce = conn.nonce
        op = self.op
        registration = op is Operation.REGISTRATION
        need_proof = conn.authentication_required
        backlog = self.backlog
        window = self.window
        writable = conn.writable
        sent = 0
        while sent < count and self.error is None:
            if self.unanswered >= window or not writable.is_set():
                conn.flush()
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
                tracer(Trace("sent", conn.loop.time(), uid, item.sends))
            if not sent & 255:
                # Let answers in while we send (wire-v1 §5: a gateway MUST keep reading).
                conn.flush()
                await asyncio.sleep(0)
        if sent == count:
            conn.outstanding.bulk_sent(tid)
        conn.flush()

    async def _wait_room(self) -> None:
        conn = self.conn
        if not conn.writable.is_set():
            await conn.writable.wait()
            return
        await self._wait_window()

    async def _send_single(self) -> None:
        conn = self.conn
        session = conn.session
        outstanding = conn.outstanding
        await outstanding.acquire_slot()
        if not self.backlog or not self._can_start():
            outstanding.release_slot()
            return
        item = self.backlog[0]
        ue = item.ue
        uid = ue.ue_service_id
        if ue.key is not None:
            proof: bytes | None = compute_proof(ue.key, conn.nonce, self.op, uid)
        elif conn.authentication_required:
            outstanding.release_slot()
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
        outstanding.own(tid, self)
        self.unanswered += 1
        if self.tracer is not None:
            self.tracer(Trace("sent", conn.loop.time(), uid, item.sends))
        conn.flush()

    def _no_key(self, ue: GatewayUe) -> None:
        self._fail(UeSourceError(
            f"{ue.ue_service_id}: the server requires a UE credential and no key is configured"
        ), ())

    def _abandon_txn(self, tid: int) -> None:
        inflight = self.txns.pop(tid, None)
        self.conn.outstanding.abandon(tid)
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
            self.conn.outstanding.abandon(tid)
        lost = self.unanswered_items()
        self.backlog.clear()
        self.retry.clear()
        self.txns.clear()
        self.source.put_back(lost)
