"""Provisioning held in memory, from the `[provisioning] file` CSV: what a node uses when its
registry is in PostgreSQL.

The credential check of every entry (wire-v1 §6) runs on the event loop before the registry
port, so a lookup must be a dict lookup, never a database round trip. With several nodes, each
node is given the same CSV (configuration management puts it there) and reloads it; the
reasons for this choice over a shared table are in docs/scale-out.md ("Provisioning").
Admin changes (`msgctl provision import|remove|forget`) are refused with that explanation:
recorded on one node only, they would make nodes disagree about who may register a UE.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from msgd.errors import RegistryError
from msgd.registry.provisioning import ProvisionedUe

__all__ = ["ADMIN_REFUSED", "MemoryProvisioning"]

ADMIN_REFUSED = (
    "provisioning admin changes are not available with [registry] backend = \"postgresql\": "
    "every node reads the same [provisioning] file; edit it and reload every node")


class MemoryProvisioning:
    """The provisioned UEs of the last file loaded; the ProvisioningAdmin of a PgRegistry.

    replace_provisioning() builds a new dict and swaps it in with one assignment, so a lookup
    on the loop thread sees the old rows or the new ones, never a mix, while a reload reads
    the file in a worker thread.
    """

    def __init__(self) -> None:
        self._rows: dict[str, ProvisionedUe] = {}

    def provisioned(self, ue_service_id: str) -> ProvisionedUe | None:
        return self._rows.get(ue_service_id)

    def key_and_gateways(self, ue_service_id: str) -> tuple[bytes, frozenset[str]] | None:
        """What the per-UE rules need of a provisioned UE (server.rules), or None."""
        row = self._rows.get(ue_service_id)
        return None if row is None else (row.key, row.gateways)

    def provisioned_count(self) -> int:
        return len(self._rows)

    def replace_provisioning(self, rows: Iterable[ProvisionedUe]) -> int:
        """Load `rows` (checked by their reader; a ProvisioningError leaves the old rows)."""
        fresh = {row.ue_service_id: row for row in rows}
        self._rows = fresh
        return len(fresh)

    # -- admin changes: refused (module docstring) --------------------------------------------

    def provisioning_overrides(self) -> int:
        return 0

    def upsert_provisioned_many(self, rows: Iterable[ProvisionedUe]) -> int:
        raise RegistryError(ADMIN_REFUSED)

    def remove_provisioned(self, ue_service_id: str) -> bool:
        raise RegistryError(ADMIN_REFUSED)

    def forget_provisioning_overrides(self, ues: Sequence[str] | None) -> list[str]:
        raise RegistryError(ADMIN_REFUSED)
