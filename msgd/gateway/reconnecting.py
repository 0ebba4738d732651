"""The reconnecting layer: `GatewaySession`, what a gateway runs in production.

It owns a `GatewayClient` and, when the connection is lost, reconnects with jittered
exponential back-off (`Backoff`; never sooner than a GOODBYE's Retry after, wire-v1 §4.5) and
carries on: a single procedure is sent again, a bulk run resumes on the new connection with
exactly the UEs that had no result (the run's `UeSource` is handed over, UEs put back in
front).
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from msgd.gateway.client import GatewayClient
from msgd.gateway.errors import ClientError, ConnectionLost, HandshakeError
from msgd.gateway.procedures import Procedures, UeIterable
from msgd.gateway.scheduler import UeSource
from msgd.gateway.sync import SyncReport, settle
from msgd.gateway.values import Tracer, UeResult
from msgd.log import get_logger
from wire.constants import GatewayType, Operation
from wire.messages import HelloAck

__all__ = ["Backoff", "GatewaySession"]

log = get_logger("msgd.client")  # one logger for the whole client, as before the split


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


class GatewaySession(Procedures):
    """A gateway's link to one MSGin5G Server that survives restarts and GOODBYEs.

    Connects on first use (or `await session.connect()`); when the connection is lost it
    reconnects after Backoff delays (never before a GOODBYE's Retry after) and carries on:
    a single procedure is sent again, a bulk run resumes with the UEs that had no result.
    It gives up with ConnectionLost after `max_attempts` connections in a row produced no
    result, or at once on errors retrying cannot fix (HandshakeError.retryable False:
    certificates refused, gateway not allowed).

    The procedures come from Procedures; `_stream` is what carries a run across connections.
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

    async def _stream(self, ues: UeIterable, op: Operation, *,
                      use_bulk: bool) -> AsyncIterator[UeResult]:
        source = UeSource(ues)
        try:
            while True:
                try:
                    client = await self.connect()
                except ClientError as exc:
                    exc.ues = source.take_front()
                    raise
                progressed = False
                try:
                    async for result in self._settle(client, source, op):
                        progressed = True
                        yield result
                    async for result in client.stream_from(source, op, use_bulk=use_bulk):
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

    async def _settle(self, client: GatewayClient, source: UeSource,
                      op: Operation) -> AsyncIterator[UeResult]:
        """After a reconnect, with a server that speaks v1.1 sync: the UEs sent on the lost
        connection and left without a result, which the server had already decided, get
        their result now instead of being sent again (msgd.gateway.sync.settle)."""
        sent = [item for item in source.front if item.sends]
        if not sent or not client.sync_supported:
            return
        try:
            done = await settle(client, [item.ue for item in sent],
                                op is Operation.REGISTRATION)
        except ClientError as exc:
            log.info("client.settle_failed", reason=str(exc))
            return
        if not done:
            return
        settled = [item for item in sent if item.ue.ue_service_id in done]
        kept = [item for item in source.front if item.ue.ue_service_id not in done]
        source.front.clear()
        source.front.extend(kept)
        log.info("client.settled", ues=len(settled), of=len(sent))
        for item in settled:
            yield UeResult(item.ue.ue_service_id, True, None, None, item.sends)

    async def sync(self, ues: Any, *, repair: bool = False) -> SyncReport:
        """v1.1 registry sync on the current connection (GatewayClient.sync): the UEs
        missing on the server, extra, and with another profile; with `repair`, fixed."""
        client = await self.connect()
        return await client.sync(ues, repair=repair)

    async def close(self) -> None:
        self._closed = True
        client, self.client = self.client, None
        if client is not None:
            await client.close()
