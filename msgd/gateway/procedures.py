"""The per-procedure API, written once: TS 23.554 8.2.3 (`register`), 8.2.4 (`deregister`) and
8.2.X (`bulk_register`, `bulk_deregister`).

`GatewayClient` (one connection) and `GatewaySession` (reconnecting) both inherit it; each
says only how it produces the results of one run over some UEs (`_stream`), so a procedure
behaves the same on both, apart from what a lost connection does.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Iterable

from msgd.gateway.errors import ConnectionLost
from msgd.gateway.values import GatewayUe, UeResult
from wire.constants import Operation

__all__ = ["Procedures", "UeIterable"]

UeIterable = Iterable[GatewayUe] | AsyncIterable[GatewayUe]


class Procedures(abc.ABC):
    """register / deregister / bulk_register / bulk_deregister over `_stream`."""

    async def register(self, ue: GatewayUe) -> UeResult:
        """TS 23.554 8.2.3: register one UE (SERVER_BUSY is retried after Retry after; a
        GatewaySession also sends it again on a new connection if the answer was lost)."""
        return await self._single(ue, Operation.REGISTRATION)

    async def deregister(self, ue: GatewayUe) -> UeResult:
        """TS 23.554 8.2.4: de-register one UE (see UeResult.attempts about an answer lost with
        its connection)."""
        return await self._single(ue, Operation.DEREGISTRATION)

    def bulk_register(self, ues: UeIterable, *, bulk: bool = True) -> AsyncIterator[UeResult]:
        """TS 23.554 8.2.X: register UEs in bulk (8.2.3 one by one when the server does not
        allow bulk, or with bulk=False); yields one result per UE as the answers arrive."""
        return self._stream(ues, Operation.REGISTRATION, use_bulk=bulk)

    def bulk_deregister(self, ues: UeIterable, *, bulk: bool = True) -> AsyncIterator[UeResult]:
        """Bulk de-registration (8.2.4 one by one when bulk is not allowed or bulk=False)."""
        return self._stream(ues, Operation.DEREGISTRATION, use_bulk=bulk)

    async def _single(self, ue: GatewayUe, op: Operation) -> UeResult:
        async with contextlib.aclosing(self._stream((ue,), op, use_bulk=False)) as results:
            async for result in results:
                return result
        raise ConnectionLost("no result", ues=(ue,))  # pragma: no cover - the run raises

    @abc.abstractmethod
    def _stream(self, ues: UeIterable, op: Operation, *,
                use_bulk: bool) -> AsyncIterator[UeResult]:
        """One run of `op` over `ues`: a result per UE as it arrives; raises a ClientError
        naming the UEs left without a result."""
