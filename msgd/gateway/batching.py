"""TS 23.554 8.2.X step 1 as code: which pending registrations go in a bulk, which go alone.

Step 1 says the Message Gateway "checks whether the Non-MSGin5G UE registrations can be
bulked"; NOTE 1 leaves the criteria to the implementation, and what cannot be bulked goes
through 8.2.3 (8.2.4 for de-registration). Our criteria, as a pure policy (`BulkingPolicy`,
numbers in, decision out, no clock and no I/O, so it is tested with plain numbers):

* requests that arrive within a wait window are collected; when the window of the oldest
  one closes (or a request's own `max_wait`, the "Wait time" of 8.2.7, passes first), they go
  as one bulk if at least `min_bulk` are pending, else one by one;
* `max_bulk` pending go at once, without waiting for the window;
* an urgent request never waits and never goes in a bulk (8.2.7's "Registration urgent
  degree": an urgent request must not be bulk-handled);
* when the server says bulk is not allowed (HELLO ACK), everything goes one by one at once.

`Batcher` applies a policy to requests that arrive one at a time (a device attaches, a device
leaves) over a GatewaySession or GatewayClient:

    async with Batcher(session, BulkingPolicy(min_bulk=8, wait=0.05)) as batcher:
        result = await batcher.register(ue)                 # may travel in a bulk
        result = await batcher.register(ue2, urgent=True)   # goes alone, now

A UE may have one request pending in a Batcher at a time (register then deregister the same
UE before the first is answered would race); a second raises ClientError.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Any

from msgd.gateway.client import GatewayClient
from msgd.gateway.errors import ClientError, ConnectionLost
from msgd.gateway.reconnecting import GatewaySession
from msgd.gateway.values import GatewayUe, UeResult
from wire.constants import Operation

__all__ = ["Action", "Batcher", "BulkingPolicy", "Plan"]


class Action(Enum):
    WAIT = "wait"  # decide again at Plan.at
    BULK = "bulk"  # 8.2.X: send Plan.count oldest pending requests as one bulk
    INDIVIDUAL = "individual"  # 8.2.3 / 8.2.4: send Plan.count oldest one by one


@dataclass(frozen=True, slots=True)
class Plan:
    action: Action
    count: int = 0
    at: float | None = None


@dataclass(frozen=True, slots=True)
class BulkingPolicy:
    """When pending requests are bulked (see the module docstring). Times are seconds."""

    min_bulk: int = 8
    wait: float = 0.05
    max_bulk: int = 4096

    def __post_init__(self) -> None:
        if self.min_bulk < 1 or self.max_bulk < self.min_bulk:
            raise ValueError("need 1 <= min_bulk <= max_bulk")
        if self.wait < 0:
            raise ValueError("wait must not be negative")

    def due(self, arrival: float, max_wait: float | None = None) -> float:
        """When a request that arrived at `arrival` must be sent at the latest."""
        wait = self.wait if max_wait is None else min(self.wait, max(0.0, max_wait))
        return arrival + wait

    def decide(self, pending: int, *, now: float, due: float | None,
               bulk_allowed: bool = True) -> Plan:
        """What to do with `pending` queued requests, the earliest of which is `due`."""
        if pending <= 0:
            return Plan(Action.WAIT)
        if not bulk_allowed:
            return Plan(Action.INDIVIDUAL, pending)
        if pending >= self.max_bulk:
            return Plan(Action.BULK, self.max_bulk)
        if due is None or now >= due:
            if pending >= self.min_bulk:
                return Plan(Action.BULK, pending)
            return Plan(Action.INDIVIDUAL, pending)
        return Plan(Action.WAIT, 0, due)


class _Queue:
    """Pending requests of one operation, oldest first."""

    def __init__(self, op: Operation) -> None:
        self.op = op
        self.items: deque[tuple[GatewayUe, asyncio.Future[UeResult], float]] = deque()
        self.timer: asyncio.TimerHandle | None = None

    def due(self) -> float | None:
        return min((due for _ue, _fut, due in self.items), default=None)


class Batcher:
    """Applies a BulkingPolicy to requests made one at a time; see the module docstring.

    `stats` counts what went out: bulk transactions requested ("bulks"), UEs in them
    ("bulked") and UEs sent one by one ("individual").
    """

    def __init__(
        self, gateway: GatewaySession | GatewayClient, policy: BulkingPolicy | None = None
    ) -> None:
        self.gateway = gateway
        self.policy = policy or BulkingPolicy()
        self.loop = asyncio.get_running_loop()
        self._queues = {op: _Queue(op) for op in Operation}
        self._pending: dict[str, Operation] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.stats = {"bulks": 0, "bulked": 0, "individual": 0}

    async def __aenter__(self) -> Batcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def register(
        self, ue: GatewayUe, *, urgent: bool = False, max_wait: float | None = None
    ) -> UeResult:
        """Register `ue`, alone at once when `urgent`, else as the policy decides."""
        return await self._submit(ue, Operation.REGISTRATION, urgent, max_wait)

    async def deregister(
        self, ue: GatewayUe, *, urgent: bool = False, max_wait: float | None = None
    ) -> UeResult:
        return await self._submit(ue, Operation.DEREGISTRATION, urgent, max_wait)

    async def flush(self) -> None:
        """Send everything pending now (as the policy would at the end of its window)."""
        for queue in self._queues.values():
            self._dispatch(queue, force=True)

    async def aclose(self) -> None:
        """Send what is pending, wait for every answer, accept no new request."""
        self._closed = True
        await self.flush()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # --- internals -----------------------------------------------------------------------------

    async def _submit(
        self, ue: GatewayUe, op: Operation, urgent: bool, max_wait: float | None
    ) -> UeResult:
        if self._closed:
            raise ClientError("the batcher is closed")
        uid = ue.ue_service_id
        if uid in self._pending:
            raise ClientError(f"{uid}: a request for this UE is already pending")
        self._pending[uid] = op
        future: asyncio.Future[UeResult] = self.loop.create_future()
        try:
            if urgent:
                # 8.2.7: an urgent request is not bulk-handled and does not wait.
                self._spawn(self._individual([(ue, future)], op))
            else:
                queue = self._queues[op]
                queue.items.append((ue, future, self.policy.due(self.loop.time(), max_wait)))
                self._dispatch(queue)
            return await future
        finally:
            self._pending.pop(uid, None)

    def _bulk_allowed(self) -> bool:
        # Before HELLO ACK we do not know: assume yes (bulk_register falls back anyway).
        return self.gateway.hello_ack is None or self.gateway.bulk_allowed

    def _dispatch(self, queue: _Queue, *, force: bool = False) -> None:
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None
        while queue.items:
            now = self.loop.time()
            plan = self.policy.decide(len(queue.items), now=now,
                                      due=now if force else queue.due(),
                                      bulk_allowed=self._bulk_allowed())
            if plan.action is Action.WAIT:
                if plan.at is not None:
                    queue.timer = self.loop.call_at(plan.at, self._dispatch, queue)
                return
            batch = [queue.items.popleft() for _ in range(min(plan.count, len(queue.items)))]
            pairs = [(ue, fut) for ue, fut, _due in batch]
            if plan.action is Action.BULK:
                self._spawn(self._bulk(pairs, queue.op))
            else:
                self._spawn(self._individual(pairs, queue.op))

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _bulk(
        self, pairs: list[tuple[GatewayUe, asyncio.Future[UeResult]]], op: Operation
    ) -> None:
        self.stats["bulks"] += 1
        self.stats["bulked"] += len(pairs)
        waiting = {ue.ue_service_id: fut for ue, fut in pairs}
        stream = (self.gateway.bulk_register if op is Operation.REGISTRATION
                  else self.gateway.bulk_deregister)([ue for ue, _fut in pairs])
        try:
            async with contextlib.aclosing(stream) as results:
                async for result in results:
                    future = waiting.pop(result.ue_service_id, None)
                    if future is not None and not future.done():
                        future.set_result(result)
        except ClientError as exc:
            _fail(waiting, exc)
        except Exception as exc:  # a bug must not leave callers waiting forever
            _fail(waiting, ClientError(f"bulk failed: {exc}"))
            raise
        else:
            _fail(waiting, ConnectionLost("no result"))

    async def _individual(
        self, pairs: list[tuple[GatewayUe, asyncio.Future[UeResult]]], op: Operation
    ) -> None:
        self.stats["individual"] += len(pairs)
        call = (self.gateway.register if op is Operation.REGISTRATION
                else self.gateway.deregister)

        async def one(ue: GatewayUe, future: asyncio.Future[UeResult]) -> None:
            try:
                result = await call(ue)
            except ClientError as exc:
                _fail({ue.ue_service_id: future}, exc)
            else:
                if not future.done():
                    future.set_result(result)

        await asyncio.gather(*(one(ue, fut) for ue, fut in pairs))


def _fail(waiting: dict[str, asyncio.Future[UeResult]], exc: ClientError) -> None:
    """Each caller gets its own exception naming only its UE."""
    for uid, future in waiting.items():
        if future.done():
            continue
        own = type(exc).__new__(type(exc))
        own.__dict__.update(exc.__dict__)
        own.args = exc.args
        own.ues = [ue for ue in exc.ues if ue.ue_service_id == uid]
        future.set_exception(own)
