"""What the daemon's adapters may use of the process around them, as typing Protocols.

A gateway connection (`transport.GatewayConnection`) sees the server only through
`ConnectionHost`; the control socket (`control.ControlServer`) only through `AdminHost`, and
the connections through `ConnectionView`. `server.Server` satisfies all three; neither adapter
imports it, so the modules form no import cycle (`../shared/tools/import_cycles.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from msgd.config import Config, GatewayPolicy
from msgd.ops.metrics import Metrics
from msgd.ops.systemd import Notifier
from msgd.registry.port import Registrar
from msgd.registry.service import RegistryReads, RegistryService
from msgd.server.rules import UeRules
from msgd.tls.contexts import ServerTls
from wire.constants import ErrorCause
from wire.session import Limits

__all__ = ["AdminHost", "ConnectionHost", "ConnectionSettings", "ConnectionView", "Refusal"]


@dataclass(frozen=True, slots=True)
class ConnectionSettings:
    """What connections read of the configuration: one frozen object, replaced whole on
    reload (a connection that began before keeps the session limits it announced)."""

    limits: Limits  # announced in HELLO ACK to sessions from now on
    bulk_window: int  # unanswered entries before reading pauses
    frame_timeout: float  # seconds a frame may take to arrive whole
    node_name: str | None

    @classmethod
    def from_config(cls, config: Config) -> ConnectionSettings:
        """What connections read of `config` (at start, and whole after a reload)."""
        limits = config.limits
        return cls(
            limits=Limits(
                max_frame_size=limits.max_frame_size,
                max_bulk_entries=limits.max_bulk_entries,
                max_outstanding=limits.max_outstanding,
                keepalive_interval=limits.keepalive_interval,
                hello_timeout=limits.hello_timeout,
            ),
            bulk_window=limits.bulk_window,
            frame_timeout=limits.frame_timeout,
            node_name=config.server.node_name,
        )


class Refusal(NamedTuple):
    """Why a gateway's HELLO is not accepted (the admission check of `ConnectionHost.admit`)."""

    cause: ErrorCause
    diagnostic: str
    reason: str  # the msgd_connections_refused_total label
    log_detail: str
    retry_after: int | None = None  # ms; with it the session ends with GOODBYE, not ERROR


class ConnectionHost(Protocol):
    """The server as one gateway connection sees it."""

    loop: asyncio.AbstractEventLoop
    metrics: Metrics
    rules: UeRules
    registrar: Registrar
    reads: RegistryReads  # wire v1.1 sync reads (msgd.server.sync)
    settings: ConnectionSettings

    def admit(self, identity: str | None) -> GatewayPolicy | Refusal: ...
    def refuse_request(self, what: str, unsubmitted: int = 0) -> int | None: ...
    def revoked_since_handshake(self, conn: Any, peer_der: bytes | None) -> bool: ...
    def connection_started(self, conn: Any) -> None: ...
    def connection_ended(self, conn: Any) -> None: ...


class ConnectionView(Protocol):
    """One live gateway connection as the admin commands show it."""

    identity: str | None
    peer: str
    connected_at: float
    entries_processed: int

    @property
    def closing(self) -> bool: ...


class AdminHost(Protocol):
    """The server as the control socket sees it: state to show, and the admin actions."""

    loop: asyncio.AbstractEventLoop
    config: Config
    registry: RegistryService
    reads: RegistryReads
    metrics: Metrics
    notifier: Notifier
    tls: ServerTls
    node_name: str | None
    started_at: float
    stopping: bool
    draining: bool
    address: tuple[str, int] | None
    last_reload: dict[str, Any] | None
    gateways: Mapping[str, GatewayPolicy]

    @property
    def connections(self) -> Collection[ConnectionView]: ...

    def drain(self) -> int: ...
    def undrain(self) -> str | None: ...
    async def reload_now(self, *, queued: bool = False) -> dict[str, Any]: ...
