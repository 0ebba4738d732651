"""The answers of one gateway connection, from decision to the wire, in request order.

Requests and bulk entries decoded in one turn of the event loop form one batch: those the
server's own rules failed keep their cause; the others go to the registry port as one call
(`submit`). A batch is sent once the port has decided it and every batch before it has been
sent (wire-v1 §5: answers in order, a success only once durable).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from msgd.procedures import Procedure
from msgd.registry.port import Change, Outcome, Registrar
from wire.constants import FailureCause
from wire.session import Session

__all__ = ["DECIDED", "AnswerQueue"]

# In an answer's cause slot: the registry port decides this one (its batch's next outcome).
DECIDED: Any = object()

_FIRST_BULK = Procedure.BULK_REGISTRATION


class _Batch:
    """The answers of one turn and, once the port has decided them, its outcomes (one per
    answer whose cause is DECIDED, in order)."""

    __slots__ = ("answers", "outcomes")

    def __init__(self, answers: list[tuple[Any, ...]]) -> None:
        self.answers = answers
        self.outcomes: Sequence[Outcome] | None = None


class AnswerQueue:
    """The open batch (`answers`, `changes`: the connection appends to them while it decodes)
    and the submitted batches not yet sent.

    An answer is (tid, handle, kind, ue_service_id, cause): `handle` is the session's
    transaction handle, so an answer whose transaction has ended (the gateway's ERROR) is
    dropped, never sent to a new request reusing its id; `cause` is a FailureCause, or DECIDED
    for an answer with a Change in `changes`, or an Outcome (a cause with Retry after, decided
    without the port: an overloaded server's SERVER_BUSY). Tuples: a window of 4096 answers
    is held per connection.
    """

    def __init__(self) -> None:
        self.answers: list[tuple[Any, ...]] = []
        self.changes: list[Change] = []
        self._submitted: deque[_Batch] = deque()
        self.unanswered = 0  # answers in submitted batches, not yet sent
        # Bumped by drop(): the port's late verdicts on dropped batches are ignored.
        self._epoch = 0
        self._submitting = False

    def __bool__(self) -> bool:
        """Whether some submitted answer is not sent yet."""
        return bool(self._submitted)

    def submit(
        self, registrar: Registrar, gateway: str, on_decided: Callable[[], None]
    ) -> None:
        """Close the open batch and hand its changes to the port in one call.
        `on_decided` runs when the port decides it later than this call."""
        answers = self.answers
        if not answers:
            return
        changes = self.changes
        self.answers = []
        self.changes = []
        batch = _Batch(answers)
        self._submitted.append(batch)
        self.unanswered += len(answers)
        if not changes:
            batch.outcomes = ()
            return
        epoch = self._epoch

        def decided(outcomes: Sequence[Outcome]) -> None:
            if epoch != self._epoch:
                return  # dropped meanwhile (revoked, failed, closed)
            batch.outcomes = outcomes
            if not self._submitting:
                on_decided()

        self._submitting = True
        try:
            registrar.submit(gateway, changes, decided)
        finally:
            self._submitting = False

    def send_ready(
        self,
        session: Session,
        count: Callable[[dict[tuple[Procedure, FailureCause | None], int]], None],
    ) -> None:
        """Encode into `session` the answers of the decided batches at the head, in order;
        `count` those sent, by (procedure, cause actually sent), in one call. Consecutive
        entries of one bulk go to the session in one call, as (UE Service ID, cause, Retry
        after) tuples: no response entry object is built (send_bulk_results)."""
        order = self._submitted
        send_entries = session.send_bulk_results
        send_result = session.send_result
        tally: dict[tuple[Procedure, FailureCause | None], int] = {}
        run: list[Any] = []  # answers of one bulk transaction, not yet handed over
        run_tid = run_handle = run_kind = None
        run_causes: list[FailureCause | None] = []
        while order:
            batch = order[0]
            outcomes = batch.outcomes
            if outcomes is None:
                break
            order.popleft()
            self.unanswered -= len(batch.answers)
            decided = iter(outcomes)
            for tid, handle, kind, uid, cause in batch.answers:
                retry = None
                if cause is DECIDED:
                    cause, retry = next(decided)
                elif cause.__class__ is Outcome:  # decided by the server, with Retry after
                    cause, retry = cause
                cause_value = None if cause is None else int(cause)
                if kind >= _FIRST_BULK:
                    if run and (tid != run_tid or handle is not run_handle):
                        _send_run(send_entries, run_tid, run, run_handle, run_kind, run_causes,
                                  tally)
                        run, run_causes = [], []
                    run_tid, run_handle, run_kind = tid, handle, kind
                    run.append((uid, cause_value, retry))
                    run_causes.append(cause)
                    continue
                if run:
                    _send_run(send_entries, run_tid, run, run_handle, run_kind, run_causes,
                              tally)
                    run, run_causes = [], []
                if send_result(tid, uid, cause_value, retry, handle):
                    key = (kind, cause)
                    tally[key] = tally.get(key, 0) + 1
        if run:
            _send_run(send_entries, run_tid, run, run_handle, run_kind, run_causes, tally)
        if tally:
            count(tally)

    def drop(self) -> None:
        """Forget every answer not yet sent; batches still in the port are ignored when done."""
        self._epoch += 1
        self._submitted.clear()
        self.answers = []
        self.changes = []
        self.unanswered = 0


def _send_run(
    send_entries: Callable[..., bool], tid: Any, run: list[Any], handle: Any, kind: Any,
    causes: list[FailureCause | None], tally: dict[tuple[Procedure, FailureCause | None], int],
) -> None:
    """Hand one bulk transaction's consecutive response entries to the session; count them
    if it took them (False: the transaction ended meanwhile, they are dropped)."""
    if send_entries(tid, run, handle):
        for cause in causes:
            key = (kind, cause)
            tally[key] = tally.get(key, 0) + 1
