"""The registry port over the embedded registry (memory + SQLite, `registry.store`).

Decisions are taken at once against memory, which already holds every change submitted;
the batch's outcomes are handed over when the registry has made durable everything they were
decided on: the batch's own changes and every earlier one (an answer decided on a change of
another gateway must not overtake it, wire-v1 §5). A commit that fails turns the batch's
successes whose changes it covered into STORAGE_FAILURE.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from msgd.log import get_logger
from msgd.registry.port import BUSY_RETRY_MS, SUCCESS, Change, Decided, Outcome
from msgd.registry.store import BatchAnswers, Registry
from wire.constants import FailureCause

__all__ = ["LocalRegistrar"]

log = get_logger("msgd.registry")

BUSY = Outcome(FailureCause.SERVER_BUSY, BUSY_RETRY_MS)
STORAGE_FAILED = Outcome(FailureCause.STORAGE_FAILURE)
NOT_REGISTERED = Outcome(FailureCause.NOT_REGISTERED)
VIA_OTHER_GATEWAY = Outcome(FailureCause.REGISTERED_VIA_OTHER_GATEWAY)
# One Outcome per cause, shared: outcomes are built per entry.
_FAILED = {cause: Outcome(cause) for cause in FailureCause}
_ANSWERS = BatchAnswers(SUCCESS, BUSY, NOT_REGISTERED, VIA_OTHER_GATEWAY, STORAGE_FAILED, _FAILED)


class LocalRegistrar:
    """`port.Registrar` for one `Registry`, on the event loop's thread."""

    def __init__(
        self,
        registry: Registry,
        *,
        max_pending_writes: int,
        on_submit: Callable[[int], None] | None = None,
    ) -> None:
        self.registry = registry
        # Changes submitted and not yet settled before entries get SERVER_BUSY (wire-v1 §5
        # Overload): load is shed before the writer's queue grows without bound.
        self.max_pending_writes = max_pending_writes
        # Told the last change seq of each batch that made changes (commit latency metric).
        self._on_submit = on_submit
        # (wait_seq, first_seq, outcomes, decided) per batch, in submission order.
        self._waiting: deque[tuple[int, int, list[Outcome], Decided]] = deque()
        self._refusals = 0
        registry.add_listener(self._on_settled)

    def submit(self, gateway: str, changes: Sequence[Change], decided: Decided) -> None:
        """Decide a batch against memory now; hand the outcomes over once durable."""
        registry = self.registry
        first_seq = registry.last_seq + 1
        outcomes, refused = registry.submit_batch(
            gateway, changes, self.max_pending_writes - registry.pending(), _ANSWERS)
        if refused:
            self._log_refusals(refused)
        wait_seq = registry.last_seq
        if wait_seq >= first_seq and self._on_submit is not None:
            self._on_submit(wait_seq)
        durable, _failed_first, failed_last = registry.settled()
        if not self._waiting and wait_seq <= max(durable, failed_last):
            decided(outcomes)  # nothing to wait for: no change, none pending before
            return
        self._waiting.append((wait_seq, first_seq, outcomes, decided))

    def settle_completed(self) -> None:
        self.registry.settle_completed()

    def _log_refusals(self, count: int) -> None:
        # The registry refused changes (its writer is gone, the file was refused): the
        # entries fail, the connection and the daemon stay. One line for the first refusal and
        # one per 10,000 after it: a bulk against a dead writer must not log a line per entry.
        before = self._refusals
        self._refusals += count
        if (before + count - 1) // 10_000 > (before - 1) // 10_000:
            log.error("registry.refused", reason=self.registry.refusal, refusals=self._refusals)

    def _on_settled(self, _first: int, _last: int, _ok: bool) -> None:
        """Registry listener: hand over every batch whose state is now settled."""
        waiting = self._waiting
        if not waiting:
            return
        durable, failed_first, failed_last = self.registry.settled()
        resolved = max(durable, failed_last)
        while waiting and waiting[0][0] <= resolved:
            wait_seq, first_seq, outcomes, decided = waiting.popleft()
            if first_seq <= failed_last and wait_seq >= failed_first:
                _fail_covered(outcomes, first_seq, failed_first, failed_last)
            try:
                decided(outcomes)
            except Exception:  # one caller's bug must not hold the others' answers
                log.exception("registry.decided_callback_failed")


def _fail_covered(
    outcomes: list[Outcome], first_seq: int, failed_first: int, failed_last: int
) -> None:
    """Successes whose change seq lies in [failed_first, failed_last] become STORAGE_FAILURE.

    The successes of a batch hold consecutive seqs from `first_seq` (the loop thread submits
    a batch without interleaving), in order.
    """
    seq = first_seq
    for index, outcome in enumerate(outcomes):
        if outcome is SUCCESS:
            if failed_first <= seq <= failed_last:
                outcomes[index] = STORAGE_FAILED
            seq += 1
