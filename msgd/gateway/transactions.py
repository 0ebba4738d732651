"""The open transactions of one gateway connection, and who gets their answers.

wire-v1 §4: at most the server's Maximum outstanding transactions at once; wire-v1 §5: one
bulk request being sent at a time, and a bulk request cannot be left half sent (the next one
could not start), so one that is abandoned is ended with ERROR. Each transaction has an owner
(a `msgd.gateway.scheduler.Run`) that the connection hands its answers to; once the run has
ended, its transactions go to an orphan that drops their answers and frees their slots.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from wire.constants import ErrorCause
from wire.session import Session

__all__ = ["ConnectionEnding", "Outstanding", "TransactionOwner"]


class ConnectionEnding(Exception):
    """Internal: no transaction can start any more (GOODBYE, or the connection is going).
    Raised by `Outstanding.acquire_slot`; it stops a run's sender, and the code consuming
    the run decides what it means (a complete run, or ConnectionLost)."""


class TransactionOwner(Protocol):
    """What the connection calls for a transaction someone owns (never blocking: these run
    inside its event dispatch)."""

    def on_answer(self, tid: int, result: int, failure_cause: int | None,
                  retry_after: int | None) -> None:
        """One UE's answer: a response entry, or a single response."""

    def on_end(self, tid: int) -> None:
        """The transaction's response is complete."""

    def on_failed(self, tid: int, cause: ErrorCause | int, diagnostic: str,
                  retry_after: int | None) -> None:
        """The server (or the session) ended the transaction with ERROR."""


class _Orphan:
    """Owner of transactions whose run has ended: answers are dropped, slots given back."""

    def __init__(self, outstanding: Outstanding) -> None:
        self.outstanding = outstanding

    def on_answer(self, *_: Any) -> None:
        pass

    def on_end(self, tid: int) -> None:
        self.outstanding.end(tid)

    def on_failed(self, tid: int, *_: Any) -> None:
        self.outstanding.end(tid)


class Outstanding:
    """The connection's transactions from start to end (see the module docstring).

    `owners` maps each open transaction id to its owner (the connection looks answers up
    there); `limit` is Maximum outstanding, set when HELLO ACK arrives. The connection gives
    `is_open` (may new transactions start), `flush` (write what the session queued) and
    `on_end` (called after each transaction ends: a GOODBYE'd connection closes once the
    last one has).
    """

    def __init__(self, session: Session, *, is_open: Callable[[], bool],
                 flush: Callable[[], None], on_end: Callable[[], None]) -> None:
        self.session = session
        self.owners: dict[int, TransactionOwner] = {}
        self.limit = 0
        self.bulk_lock = asyncio.Lock()  # held while a bulk request's entries are sent
        self.sending_bulk: int | None = None  # that request's transaction id
        self._used = 0
        self._free = asyncio.Event()
        self._is_open = is_open
        self._flush = flush
        self._on_end = on_end
        self._orphan = _Orphan(self)

    @property
    def slots_free(self) -> int:
        return max(0, self.limit - self._used)

    async def acquire_slot(self) -> None:
        """Wait until fewer than `limit` transactions are open and take a slot; raises
        ConnectionEnding when the connection stops taking new ones meanwhile."""
        while self._used >= self.limit:
            if not self._is_open():
                raise ConnectionEnding()
            self._free.clear()
            await self._free.wait()
        self._used += 1

    def release_slot(self) -> None:
        """Give back a slot that no transaction was started in."""
        if self._used > 0:
            self._used -= 1
        self._free.set()

    def own(self, tid: int, owner: TransactionOwner, *, bulk: bool = False) -> None:
        """`owner` gets the answers to `tid`, which holds the slot it took; with bulk, the
        request's entries are still being sent (until bulk_sent)."""
        if bulk:
            self.sending_bulk = tid
        self.owners[tid] = owner

    def bulk_sent(self, tid: int) -> None:
        """Every entry of bulk request `tid` went out."""
        if self.sending_bulk == tid:
            self.sending_bulk = None

    def end(self, tid: int) -> None:
        """Transaction `tid` is over: its owner is forgotten and its slot free."""
        if self.owners.pop(tid, None) is not None:
            self.release_slot()
        if tid == self.sending_bulk:  # the server ended it before we sent it all
            self.sending_bulk = None
        self._on_end()

    def abandon(self, tid: int) -> None:
        """The owner no longer wants this transaction. A bulk request still being sent is
        ended with ERROR (it cannot be left half sent: the next bulk could not start);
        answers to the rest are dropped as they come."""
        if tid not in self.owners:
            return
        self.owners[tid] = self._orphan
        session = self.session
        if session.is_closed:
            return
        if tid == self.sending_bulk:
            self.sending_bulk = None
            if tid in session.in_progress():
                session.send_error(tid, ErrorCause.INTERNAL_ERROR,
                                   "gateway abandoned the request")
                self._flush()
            # Our ERROR ended the transaction: nothing more comes for it.
            self.end(tid)

    def clear(self) -> None:
        """The connection is gone: every transaction with it, every slot free."""
        self.owners.clear()
        self.sending_bulk = None
        self._used = 0
        self._free.set()
