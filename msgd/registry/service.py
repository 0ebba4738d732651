"""What the daemon uses of a registry beyond the port, whichever the backend.

`port.Registrar` is what gateway connections use. The process around them (server.daemon,
server.main, the watchdog, reload) and the admin socket need a little more: counts for
STATUS= and the gauges, the provisioning lookup, the settled-batch listener, start and close
(`RegistryService`, synchronous: the embedded `store.Registry` has it as it is), and reads of
the registrations for `msgctl registry show|list|count` (`RegistryReads`, asynchronous: in
PostgreSQL a read is a query, and the event loop must not wait for it).

`open_registry` picks the backend from [registry] backend; `make_registrar` and `reads_for`
give the port and the reads of either, so no caller tests which backend it runs on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from msgd.registry.compaction import CompactionPolicy
from msgd.registry.local import LocalRegistrar
from msgd.registry.port import Registrar
from msgd.registry.provisioning import ProvisionedUe
from msgd.registry.store import Listener, Registration, Registry

if TYPE_CHECKING:
    from msgd.config import RegistryConfig

__all__ = [
    "LocalReads",
    "ProvisioningAdmin",
    "RegistryReads",
    "RegistryService",
    "make_registrar",
    "open_registry",
    "reads_for",
]


class ProvisioningAdmin(Protocol):
    """The provisioning of a registry as the daemon uses it: the rules' lookup, and the admin
    changes of `msgctl provision ...` (blocking: call those through to_thread)."""

    def key_and_gateways(self, ue_service_id: str) -> tuple[bytes, frozenset[str]] | None: ...
    def provisioning_overrides(self) -> int: ...
    def upsert_provisioned_many(self, rows: Iterable[ProvisionedUe]) -> int: ...
    def remove_provisioned(self, ue_service_id: str) -> bool: ...
    def forget_provisioning_overrides(self, ues: Sequence[str] | None) -> list[str]: ...


class RegistryService(Protocol):
    """A registry as the daemon holds it: `store.Registry` and `postgres.PgRegistry`."""

    provisioning: Any  # a ProvisioningAdmin (Any: Registry's is a concrete class attribute)

    def provisioned(self, ue_service_id: str) -> ProvisionedUe | None: ...
    def provisioned_count(self) -> int: ...
    def registered_count(self) -> int: ...
    def pending(self) -> int: ...
    @property
    def durable_seq(self) -> int: ...
    def add_listener(self, callback: Listener) -> None: ...
    def remove_listener(self, callback: Listener) -> None: ...
    def replace_provisioning(self, rows: Iterable[ProvisionedUe]) -> int: ...
    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...
    async def close(self) -> None: ...
    def close_sync(self) -> None: ...  # before start(), or once its loop has stopped


class RegistryReads(Protocol):
    """Reads for the admin socket, and how the registry is doing (status, STATUS=)."""

    async def lookup(self, ue_service_id: str) -> Registration | None: ...
    def scan(self, gateway: str | None = None) -> AsyncGenerator[Registration, None]: ...
    async def count(self) -> int: ...
    def describe(self) -> dict[str, Any]: ...
    def health(self) -> str | None: ...
    # wire v1.1 sync (docs/protocol.md §6): over durable state only.
    async def sync_digests(self, gateway: str, bucket_bits: int) -> bytes: ...
    async def sync_list(self, gateway: str, bucket_bits: int,
                        buckets: tuple[int, ...]) -> list[tuple[str, bytes]]: ...


class LocalReads:
    """RegistryReads of the embedded registry: memory holds everything, nothing to await."""

    def __init__(self, registry: Registry, path: str) -> None:
        self._registry = registry
        self._path = path

    async def lookup(self, ue_service_id: str) -> Registration | None:
        return self._registry.registration(ue_service_id)

    async def scan(self, gateway: str | None = None) -> AsyncGenerator[Registration, None]:
        for registration in self._registry.iter_registrations(gateway):
            yield registration

    async def count(self) -> int:
        return self._registry.registered_count()

    def describe(self) -> dict[str, Any]:
        return {"backend": "sqlite", "path": self._path}

    async def sync_digests(self, gateway: str, bucket_bits: int) -> bytes:
        return await self._registry.sync_digests(gateway, bucket_bits)

    async def sync_list(self, gateway: str, bucket_bits: int,
                        buckets: tuple[int, ...]) -> list[tuple[str, bytes]]:
        return await self._registry.sync_list(gateway, bucket_bits, buckets)

    def health(self) -> str | None:
        return None


def make_registrar(
    registry: RegistryService, *, max_pending_writes: int,
    on_submit: Callable[[int], None] | None = None,
) -> Registrar:
    """The registry port of `registry`, with the server's overload limit and commit probe."""
    if isinstance(registry, Registry):
        return LocalRegistrar(registry, max_pending_writes=max_pending_writes,
                              on_submit=on_submit)
    return registry.registrar(  # type: ignore[attr-defined, no-any-return]
        max_pending_writes=max_pending_writes, on_submit=on_submit)


def reads_for(registry: RegistryService, path: str = "") -> RegistryReads:
    """The admin reads of `registry` (a PgRegistry is its own)."""
    if isinstance(registry, Registry):
        return LocalReads(registry, path)
    return registry  # type: ignore[return-value]


def open_registry(config: RegistryConfig, *, max_pending_writes: int) -> RegistryService:
    """Open the configured registry (blocking: before the loop runs). Raises RegistryError
    (RegistryCorruptError for a SQLite file that fails its check)."""
    if config.backend == "postgresql":
        from msgd.registry.postgres import PgRegistry, PgSettings

        return PgRegistry.open(PgSettings(
            dsn=config.dsn or "", statement_timeout=config.statement_timeout,
            connect_timeout=config.connect_timeout, max_batch=config.max_batch,
        ), max_pending_writes=max_pending_writes)
    return Registry.open(
        config.path,
        synchronous=config.synchronous,
        compaction=CompactionPolicy(
            journal_changes=config.compact_journal_changes,
            journal_ratio=config.compact_journal_ratio,
            min_interval=config.compact_min_interval,
        ),
    )
